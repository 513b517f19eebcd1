"""How much a file may claim before a reader allocates for it.

A few bytes can claim a 40000 x 40000 image, hours of audio or a million frames; every reader of user files
checks the size a header claims against ``MAX_INPUT_SIZE`` values (pixels, frames x pixels, samples) before it
allocates or decodes. The default is Pillow's decompression-bomb limit; commands that read such files take
``--max-input-size`` to raise it for a file one trusts.
"""
from __future__ import annotations

import math

from PIL import Image

MAX_INPUT_SIZE = Image.MAX_IMAGE_PIXELS or 89_478_485


class InputTooLarge(ValueError):
    """A file claims a bigger input than the reader will allocate."""


def check_input_size(shape: tuple[int, ...], limit: int = MAX_INPUT_SIZE, what: str = "an input") -> None:
    """Refuse a claimed ``shape`` (no channels) above ``limit`` values, with one line naming both."""
    values = math.prod(int(n) for n in shape)
    if values > limit:
        raise InputTooLarge(f"the file claims {what} of {' x '.join(str(n) for n in shape)} = {values:,} values, above "
                            f"the limit of {limit:,} (raise it with --max-input-size if you trust the file)")
