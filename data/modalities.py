"""What a modality is, and one entry point that picks a modality's reader.

Images are (C, H, W) in [0, 1], audio (1, T) in [-1, 1], video (C, T, H, W) in [0, 1]: the value range of
a modality (``value_range``, ``clamp_to_range``) and its number of spatial dims (``MODALITY_DIMS``) are
facts of the data, which every tokenizer, metric and writer reads from here.
"""
from __future__ import annotations

import torch

from .audio import DEFAULT_SAMPLE_RATE, build_audio_dataset
from .folders import DEFAULT_EVAL_FRACTION
from .images import build_image_dataset
from .video import DEFAULT_FRAMES, build_video_dataset

__all__ = ["BITS_PER_VALUE", "DEFAULT_EVAL_FRACTION", "DEFAULT_FRAMES", "DEFAULT_SAMPLE_RATE", "MODALITIES",
           "MODALITY_DIMS", "build_dataset", "check_modality", "clamp_to_range", "held_out_source", "value_range",
           "value_span"]

MODALITIES = ("image", "audio", "video")
MODALITY_DIMS = {"audio": 1, "image": 2, "video": 3}
BITS_PER_VALUE = {"audio": 16, "image": 8, "video": 8}  # of the raw data: 16-bit PCM, 8-bit pixels


def check_modality(modality: str) -> None:
    if modality not in MODALITY_DIMS:
        raise ValueError(f"unknown modality {modality!r}; choose one of {MODALITIES}")


def value_range(modality: str) -> tuple[float, float]:
    """(low, high) of the modality's values: audio waveforms lie in [-1, 1], images and video in [0, 1]."""
    check_modality(modality)
    return (-1.0, 1.0) if modality == "audio" else (0.0, 1.0)


def value_span(modality: str) -> float:
    """high - low of the value range: the peak signal PSNR is measured against (2 for audio, 1 otherwise)."""
    low, high = value_range(modality)
    return high - low


def clamp_to_range(x: torch.Tensor, modality: str) -> torch.Tensor:
    """x clamped to the modality's value range."""
    return x.clamp(*value_range(modality))


def held_out_source(data: str, split: str, eval_fraction: float, eval_data: str | None) -> tuple[str, float]:
    """(source, eval_fraction) of ``split``: with a separate held-out source ``eval_data``, eval reads all of it and
    train all of ``data``; otherwise both read ``data``, split by ``eval_fraction``."""
    if eval_data:
        return (eval_data if split == "eval" else data), 0.0
    return data, eval_fraction


def build_dataset(source: str, *, modality: str = "image", split: str = "train", size: int = 32,
                  channels: int = 3, seed: int = 0, process_index: int = 0, num_processes: int = 1,
                  sample_rate: int = 0, eval_fraction: float = DEFAULT_EVAL_FRACTION, **options):
    """A dataset of ``{"x", "label", "key", "skipped"}`` samples for ``modality``.

    size: crop size for images, clip length in samples for audio, frame side for video.
    image: x (channels, size, size) in [0, 1]; sources digits | photos | folder | .tar shards.
    audio: x (1, size) in [-1, 1] at ``sample_rate`` (16000 when 0); sources spoken-digits | folder | shards.
    video: x (channels, frames, size, size) in [0, 1]; sources moving-digits | folder | shards;
    options ``frames`` (default 16), ``frame_stride`` (folder: hop between clip starts in source
    frames, default: non-overlapping clips), ``frame_step`` (take every n-th frame, default 1).
    ``eval_fraction``: the share of a folder's files (of a shard set's samples) held out for ``split="eval"``, by a
    stable hash of the path (key), so train and eval never share a file; 0 = no held-out part (both splits are
    everything). The built-in sets have fixed splits. Other ``options`` go to the reader (e.g. webdataset
    ``shuffle_buffer``).
    """
    check_modality(modality)
    common = dict(split=split, size=size, seed=seed, process_index=process_index, num_processes=num_processes,
                  eval_fraction=eval_fraction)
    if modality == "image":
        return build_image_dataset(source, channels=channels, **common, **options)
    if modality == "audio":
        if channels != 1:
            raise ValueError(f"audio is mono: a tokenizer with in_channels=1 reads it, got channels={channels}")
        return build_audio_dataset(source, sample_rate=sample_rate or DEFAULT_SAMPLE_RATE, **common, **options)
    return build_video_dataset(source, channels=channels, **common, **options)
