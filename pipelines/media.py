"""Pictures people look at: image grids (and, per modality, spectrograms and frame strips)."""
from __future__ import annotations

from pathlib import Path

import torch


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> None:
    """images (N, C, H, W) in [0, 1] -> one PNG grid."""
    from torchvision.utils import save_image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(images.detach().float().clamp(0, 1).cpu(), str(path), nrow=nrow, padding=2, pad_value=1.0)


def save_comparison(original: torch.Tensor, recon: torch.Tensor, path: str | Path, modality: str = "image") -> None:
    """Originals beside reconstructions: row pairs (originals, then their reconstructions)."""
    if modality != "image":
        raise NotImplementedError(f"no comparison picture for modality {modality!r} yet")
    n = original.shape[0]
    nrow = min(n, 8)
    rows = []
    for start in range(0, n, nrow):
        rows += [original[start : start + nrow], recon[start : start + nrow]]
    save_image_grid(torch.cat(rows), path, nrow=nrow)


def write_samples(modality: str, samples: torch.Tensor, out_dir: str | Path, nrow: int = 10,
                  sample_rate: int = 0) -> None:
    """Decoded samples as files people open, plus ``samples.npy``.

    image: ``samples.png`` grid, samples.npy (N, C, H, W) in [0, 1].
    """
    import numpy as np

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if modality == "image":
        np.save(out / "samples.npy", samples.float().numpy(), allow_pickle=False)
        save_image_grid(samples, out / "samples.png", nrow=nrow)
        return
    raise NotImplementedError(f"no sample writer for modality {modality!r} yet")


def read_input(modality: str, path: str | Path, channels: int, multiple: tuple[int, ...], size: int | None = None,
               sample_rate: int = 0) -> torch.Tensor:
    """One input file as the tokenizer takes it, without batch: image (C, H, W) in [0, 1].

    The input is center-cropped so each axis is a multiple of the tokenizer's downsampling (a fully
    convolutional tokenizer encodes any such size); ``size`` first resizes the shorter side.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} not found")
    if modality != "image":
        raise NotImplementedError(f"no single-file reader for modality {modality!r} yet")
    from PIL import Image, UnidentifiedImageError

    from data.common import match_channels, pil_to_tensor, resize_shorter

    try:
        with Image.open(path) as img:
            x = pil_to_tensor(img)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    if size is not None:
        x = resize_shorter(x, size)
    x = match_channels(x, channels)
    return center_crop_to_multiple(x, multiple)


def center_crop_to_multiple(x: torch.Tensor, multiple: tuple[int, ...]) -> torch.Tensor:
    """(C, *S) -> (C, *S') with each S'_i the largest multiple of multiple[i] <= S_i, centered."""
    slices = [slice(None)]
    for n, m in zip(x.shape[1:], multiple):
        keep = (n // m) * m
        if keep == 0:
            raise ValueError(f"input of size {tuple(x.shape[1:])} is smaller than the tokenizer's downsampling {multiple}")
        start = (n - keep) // 2
        slices.append(slice(start, start + keep))
    return x[tuple(slices)]


def write_output(modality: str, x: torch.Tensor, path: str | Path, sample_rate: int = 0) -> None:
    """One decoded item (C, *S) to a file people open (image: PNG/JPEG by extension)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if modality != "image":
        raise NotImplementedError(f"no single-file writer for modality {modality!r} yet")
    from torchvision.utils import save_image

    save_image(x.detach().float().clamp(0, 1).cpu(), str(path))
