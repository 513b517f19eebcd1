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
