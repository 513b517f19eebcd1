"""Shared image decoding, resizing/cropping, sample dicts and collation.

Every image dataset in ``data`` yields the same sample dict::

    {"x": FloatTensor (C, H, W) in [0, 1],
     "label": int (-1 when none),
     "key": str (stable id),
     "skipped": list[str] (corrupt items skipped to produce this sample)}
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import IterableDataset

# Suffixes PIL can decode; matched case-insensitively.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# ITU-R BT.601 luma weights, the same ones PIL uses for convert("L").
_LUMA = (0.299, 0.587, 0.114)
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def make_sample(x: torch.Tensor, label: int = -1, key: str = "", skipped: list[str] | None = None) -> dict:
    """Build the canonical sample dict from x: (C, H, W) float in [0, 1]."""
    return {"x": x, "label": int(label), "key": key, "skipped": list(skipped or [])}


def collate_samples(samples: list[dict]) -> dict:
    """Batch sample dicts.

    Returns {"x": (B, C, H, W), "label": LongTensor (B,), "key": list[str],
    "skipped": flat list[str]} -- skipped lists are concatenated, never dropped,
    because the training loop reports them.
    """
    return {
        "x": torch.stack([s["x"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "key": [s["key"] for s in samples],
        "skipped": [p for s in samples for p in s["skipped"]],
    }


def iterate_items(dataset) -> Iterator[dict]:
    """The samples of a map-style (by index, in order) or iterable dataset."""
    if isinstance(dataset, IterableDataset):
        return iter(dataset)
    return (dataset[i] for i in range(len(dataset)))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """Decode a PIL image of any common mode to float (C, H, W) in [0, 1], C in {1, 3}.

    Grayscale stays 1 channel; 16-bit grayscale is divided by 65535 (not clipped
    at 255); anything with transparency is composited on white; other modes
    (P, CMYK, YCbCr, 1, ...) go through RGB / L.
    """
    mode = img.mode
    if mode in _16BIT_MODES:
        # "I" is what older Pillow / some TIFFs use for 16-bit data, so treat it as 16-bit too.
        arr = np.asarray(img).astype(np.float32) / 65535.0
    elif mode == "F":
        arr = np.array(img, dtype=np.float32)  # copy: asarray would be read-only
    elif mode in ("L", "1"):
        arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    elif mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3:]
        arr = rgba[..., :3] * alpha + (1.0 - alpha)  # composite over white
    else:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(np.ascontiguousarray(arr))
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    return x.clamp_(0.0, 1.0)


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(C, *S) with C in {1, 3} -> (channels, *S): replicate gray or take BT.601 luminance."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if x.shape[0] == channels:
        return x
    if channels == 3:
        return x.expand(3, *x.shape[1:]).contiguous()
    weights = torch.tensor(_LUMA, dtype=x.dtype).view(3, *([1] * (x.dim() - 1)))
    return (x * weights).sum(0, keepdim=True)


def resize_shorter(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (C, H, W) so that min(H, W) == size, keeping aspect ratio (antialiased bilinear)."""
    h, w = x.shape[-2:]
    if min(h, w) == size:
        return x
    scale = size / min(h, w)
    new_hw = (max(size, round(h * scale)), max(size, round(w * scale)))
    out = F.interpolate(x[None], size=new_hw, mode="bilinear", align_corners=False, antialias=True)
    return out[0].clamp_(0.0, 1.0)


def crop_square(x: torch.Tensor, size: int, train: bool) -> torch.Tensor:
    """Crop (C, H, W) -> (C, size, size): random for train, centered for eval.

    Random offsets come from torch's global RNG so a restored RNG state
    (accelerate checkpoints) replays the exact same crops.
    """
    h, w = x.shape[-2:]
    if train:
        top = int(torch.randint(0, h - size + 1, (1,)))
        left = int(torch.randint(0, w - size + 1, (1,)))
    else:
        top, left = (h - size) // 2, (w - size) // 2
    return x[:, top : top + size, left : left + size]


def image_to_tensor(img: Image.Image, size: int, channels: int, train: bool) -> torch.Tensor:
    """Open PIL image -> (channels, size, size) float in [0, 1]: resize shorter side, then crop."""
    # JPEG only: decode at a reduced DCT scale that still keeps both sides >= size (big speedup).
    img.draft(None, (size, size))
    img = ImageOps.exif_transpose(img)  # camera photos store rotation in EXIF
    x = resize_shorter(pil_to_tensor(img), size)
    return match_channels(crop_square(x, size, train), channels).contiguous()
