"""One entry point for every modality: the tokenizer's modality picks the reader.

Also the pieces the audio and video file readers share: recursive file listing and a map-style
folder dataset whose unreadable items are warned about, skipped in favour of the next index and
reported in the sample's ``skipped`` list (the image folder reader's policy).
"""
from __future__ import annotations

import os
import warnings

from torch.utils.data import Dataset

MODALITIES = ("image", "audio", "video")
DEFAULT_SAMPLE_RATE = 16000  # audio: the rate used when a tokenizer says 0 (and spoken-digits' own rate)
DEFAULT_FRAMES = 16  # video: frames per clip


def build_dataset(source: str, *, modality: str = "image", split: str = "train", size: int = 32,
                  channels: int = 3, seed: int = 0, process_index: int = 0, num_processes: int = 1,
                  sample_rate: int = 0, **options):
    """A dataset of ``{"x", "label", "key", "skipped"}`` samples for ``modality``.

    size: crop size for images, clip length in samples for audio, frame side for video.
    image: x (channels, size, size) in [0, 1]; sources digits | photos | folder | .tar shards.
    audio: x (1, size) in [-1, 1] at ``sample_rate`` (16000 when 0); sources spoken-digits | folder | shards.
    video: x (channels, frames, size, size) in [0, 1]; sources moving-digits | folder | shards;
    options ``frames`` (default 16), ``frame_stride`` (folder: hop between clip starts in source
    frames, default: non-overlapping clips), ``frame_step`` (take every n-th frame, default 1).
    Other ``options`` go to the reader (e.g. webdataset ``shuffle_buffer``).
    """
    common = dict(split=split, size=size, seed=seed, process_index=process_index, num_processes=num_processes)
    if modality == "image":
        from data.images import build_image_dataset

        return build_image_dataset(source, channels=channels, **common, **options)
    if modality == "audio":
        from data.audio import build_audio_dataset

        if channels != 1:
            raise ValueError(f"audio is mono: a tokenizer with in_channels=1 reads it, got channels={channels}")
        return build_audio_dataset(source, sample_rate=sample_rate or DEFAULT_SAMPLE_RATE, **common, **options)
    if modality == "video":
        from data.video import build_video_dataset

        return build_video_dataset(source, channels=channels, **common, **options)
    raise ValueError(f"unknown modality {modality!r}; choose one of {MODALITIES}")


def check_split(split: str) -> None:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be one of ('train', 'eval'), got {split!r}")


def list_media_files(root: str, extensions: tuple[str, ...]) -> list[str]:
    """Sorted relative POSIX paths of files under root whose suffix (any case) is in ``extensions``.

    Hidden files and folders (.git, macOS "._x" forks) are skipped, as by the image reader.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(extensions):
                found.append(os.path.normpath(os.path.join(rel_dir, name)).replace(os.sep, "/"))
    return sorted(found)


def folder_labels(files: list[str]) -> tuple[list[str], list[int]]:
    """ImageFolder convention: classes = sorted immediate subfolders; files at the root get -1."""
    classes = sorted({f.split("/")[0] for f in files if "/" in f})
    index = {name: i for i, name in enumerate(classes)}
    return classes, [index[f.split("/")[0]] if "/" in f else -1 for f in files]


class SkippingDataset(Dataset):
    """Map-style base: ``__getitem__`` tries ``load_item(i)`` for index, index + 1, ... (wrapping).

    Subclasses set ``self.kind`` (for messages) and implement ``__len__``, ``load_item(i) -> sample
    dict`` (raises on unreadable data) and ``item_path(i)``. ``self.unindexed`` lists files found
    unreadable while indexing (construction); they are reported in the ``skipped`` list of the
    sample at index 0, i.e. once per pass over the dataset.
    """

    kind = "file"
    unindexed: list[str] = []

    def item_path(self, i: int) -> str:
        raise NotImplementedError

    def load_item(self, i: int) -> dict:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if not 0 <= index < n:  # keeps plain `for sample in dataset` finite
            raise IndexError(index)
        skipped = list(self.unindexed) if index == 0 else []
        for offset in range(n):
            i = (index + offset) % n
            try:
                sample = self.load_item(i)
            except Exception as err:  # decoders raise many types (RuntimeError, ValueError, OSError...)
                path = self.item_path(i)
                warnings.warn(f"skipping unreadable {self.kind} {path}: {err}")
                skipped.append(path)
                continue
            sample["skipped"] = skipped + sample["skipped"]
            return sample
        raise RuntimeError(f"all {n} {self.kind} items are unreadable")
