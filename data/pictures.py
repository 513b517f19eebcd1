"""Pictures people look at: image grids, coloured log-mel spectrograms, frame strips, originals beside
reconstructions, and a folder of decoded samples as files people open."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.utils import save_image

from .audio import DEFAULT_SAMPLE_RATE
from .files import DEFAULT_FPS, write_audio, write_video
from .spectrogram import log_mel_spectrogram

# "magma"-like colormap: control points (value, RGB) interpolated linearly.
_COLORMAP = torch.tensor([[0.001, 0.000, 0.014], [0.232, 0.060, 0.437], [0.550, 0.161, 0.506],
                          [0.868, 0.288, 0.409], [0.994, 0.624, 0.427], [0.987, 0.991, 0.750]])


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> None:
    """images (N, C, H, W) in [0, 1] -> one PNG grid."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(images.detach().float().clamp(0, 1).cpu(), str(path), nrow=nrow, padding=2, pad_value=1.0)


def colormap(values: torch.Tensor) -> torch.Tensor:
    """values (..., H, W) in [0, 1] -> RGB (..., 3, H, W) through a magma-like colormap."""
    stops = _COLORMAP.to(values.device)
    pos = values.clamp(0, 1) * (len(stops) - 1)
    lo = pos.floor().long().clamp(max=len(stops) - 2)
    frac = (pos - lo).unsqueeze(-1)
    rgb = stops[lo] * (1 - frac) + stops[lo + 1] * frac  # (..., H, W, 3)
    return rgb.movedim(-1, -3)


def spectrogram_images(waves: torch.Tensor, sample_rate: int = DEFAULT_SAMPLE_RATE, top_db: float = 80.0,
                       min_width: int = 256) -> torch.Tensor:
    """waves (N, 1, T) or (N, T) in [-1, 1] -> coloured log-mel spectrograms (N, 3, 2 * mels, W), low at bottom.

    One dB scale for the whole batch (the loudest bin is the brightest colour, ``top_db`` below it
    is black), so originals and reconstructions drawn together compare directly. Short clips
    are widened (nearest neighbour) to at least ``min_width`` pixels.
    """
    db = log_mel_spectrogram(waves.detach().float().cpu(), sample_rate)  # (N, mels, frames)
    top = db.amax()
    values = ((db - (top - top_db)) / top_db).clamp(0, 1).flip(-2)  # low frequencies at the bottom
    mels, frames = values.shape[-2:]
    values = F.interpolate(values[:, None], size=(2 * mels, frames * max(1, -(-min_width // frames))),
                           mode="nearest")[:, 0]
    return colormap(values)


def _video_frames(x: torch.Tensor) -> torch.Tensor:
    """One clip (C, T, H, W) -> its frames (T, C, H, W)."""
    return x.transpose(0, 1)


def save_comparison(original: torch.Tensor, recon: torch.Tensor, path: str | Path, modality: str = "image",
                    sample_rate: int = DEFAULT_SAMPLE_RATE) -> None:
    """Originals beside reconstructions.

    image: row pairs (originals, then their reconstructions); audio (N, 1, T): log-mel spectrogram
    rows, originals above their reconstructions; video (N, C, T, H, W): per clip, a row of its frames
    and below it a row of the reconstruction's frames (8 clips at most).
    """
    if modality == "video":
        n = min(original.shape[0], 8)
        rows = [torch.cat([_video_frames(original[i]), _video_frames(recon[i])]) for i in range(n)]
        save_image_grid(torch.cat(rows), path, nrow=original.shape[2])
        return
    if modality == "audio":
        both = spectrogram_images(torch.cat([original, recon]), sample_rate)
        original, recon = both[: original.shape[0]], both[original.shape[0] :]
    elif modality != "image":
        raise ValueError(f"unknown modality {modality!r}; choose image, audio or video")
    n = original.shape[0]
    nrow = min(n, 4 if modality == "audio" else 8)
    rows = []
    for start in range(0, n, nrow):
        rows += [original[start : start + nrow], recon[start : start + nrow]]
    save_image_grid(torch.cat(rows), path, nrow=nrow)


def write_samples(modality: str, samples: torch.Tensor, out_dir: str | Path, nrow: int = 10,
                  sample_rate: int = DEFAULT_SAMPLE_RATE, fps: int = DEFAULT_FPS) -> None:
    """Decoded samples as files people open, plus ``samples.npy``.

    image: ``samples.png`` grid, samples.npy (N, C, H, W) in [0, 1].
    audio (N, 1, T) in [-1, 1]: ``sample_000.wav``... (16-bit PCM at ``sample_rate``), ``spectrograms.png``,
    samples.npy (N, 1, T).
    video (N, C, T, H, W) in [0, 1]: ``sample_000.mp4``... (H.264, else MPEG-4, else ``.gif``) at
    ``fps``, ``frames.png`` (a row of frames per sample), samples.npy (N, T, C, H, W).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = samples.detach().float().cpu()
    if modality == "image":
        np.save(out / "samples.npy", samples.numpy(), allow_pickle=False)
        save_image_grid(samples, out / "samples.png", nrow=nrow)
        return
    if modality == "audio":
        samples = samples.clamp(-1, 1)
        np.save(out / "samples.npy", samples.numpy(), allow_pickle=False)
        for i, wave in enumerate(samples):
            write_audio(wave, out / f"sample_{i:03d}.wav", sample_rate)
        save_image_grid(spectrogram_images(samples, sample_rate), out / "spectrograms.png", nrow=min(4, nrow))
        return
    if modality == "video":
        samples = samples.clamp(0, 1)
        np.save(out / "samples.npy", samples.transpose(1, 2).contiguous().numpy(), allow_pickle=False)
        for i, clip in enumerate(samples):
            write_video(clip, out / f"sample_{i:03d}.mp4", fps)
        frames = samples.transpose(1, 2).reshape(-1, *samples.shape[1:2], *samples.shape[3:])
        save_image_grid(frames, out / "frames.png", nrow=samples.shape[2])
        return
    raise ValueError(f"unknown modality {modality!r}; choose image, audio or video")
