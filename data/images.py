"""Image-folder reader and the ``build_image_dataset`` entry point."""

from __future__ import annotations

import os
import warnings

import torch
from PIL import Image
from torch.utils.data import Dataset

from .common import image_to_tensor, is_image_file, make_sample

BUILTIN_SOURCES = ("digits", "photos")
SPLITS = ("train", "eval")

_ACCEPTED_FORMS = (
    "accepted sources: a built-in name ('digits' or 'photos'); an existing directory of images "
    "(.png .jpg .jpeg .bmp .gif .webp .tif .tiff, searched recursively); or WebDataset .tar shards "
    "(a path, a comma-separated list, or a brace pattern like 'shards/train-{000000..000009}.tar')"
)


def list_image_files(root: str) -> list[str]:
    """Sorted relative POSIX paths of all image files under root (hidden files/dirs skipped)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Hidden entries are VCS/OS clutter (.git, macOS "._x.jpg" resource forks), never data.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if not name.startswith(".") and is_image_file(name):
                found.append(os.path.normpath(os.path.join(rel_dir, name)).replace(os.sep, "/"))
    return sorted(found)


class ImageFolderDataset(Dataset):
    """Map-style dataset over an image directory tree.

    Files inside immediate subfolders get label = index of that subfolder in
    ``self.classes`` (sorted, ImageFolder convention); files at the root get -1.
    Unreadable files are skipped (with a warning) in favour of the next index.
    """

    def __init__(self, root: str, *, split: str = "train", size: int = 32, channels: int = 3):
        self.root, self.train, self.size, self.channels = root, split == "train", size, channels
        self.files = list_image_files(root)
        if not self.files:
            raise ValueError(f"no images found under {root!r} (extensions: .png .jpg .jpeg .bmp .gif .webp .tif .tiff)")
        self.classes = sorted({f.split("/")[0] for f in self.files if "/" in f})
        class_index = {name: i for i, name in enumerate(self.classes)}
        self.labels = [class_index[f.split("/")[0]] if "/" in f else -1 for f in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> torch.Tensor:
        """Decode file ``index`` -> (channels, size, size) float in [0, 1]; raises on bad files."""
        with Image.open(os.path.join(self.root, self.files[index])) as img:
            return image_to_tensor(img, self.size, self.channels, self.train)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.files):  # keeps plain `for sample in dataset` finite
            raise IndexError(index)
        skipped = []
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            try:
                x = self.load(i)
            except Exception as err:  # decoders raise many types (OSError, ValueError, SyntaxError...)
                path = os.path.join(self.root, self.files[i])
                warnings.warn(f"skipping unreadable image {path}: {err}")
                skipped.append(path)
                continue
            return make_sample(x, self.labels[i], self.files[i], skipped)
        raise RuntimeError(f"all {len(self.files)} images under {self.root!r} are unreadable")


def _is_webdataset_source(source: str) -> bool:
    return ".tar" in source


def describe_source(source: str) -> str:
    """One-line human description of a source string, for logs (no file I/O)."""
    if source == "digits":
        return "built-in digits (scikit-learn load_digits: 1797 8x8 grayscale digits, eval = every 6th)"
    if source == "photos":
        from .builtin import PHOTOS_EVAL, PHOTOS_TRAIN

        return f"built-in photos (scikit-image): train {', '.join(PHOTOS_TRAIN)}; eval {', '.join(PHOTOS_EVAL)}"
    if os.path.isdir(source):
        return f"image folder {os.path.abspath(source)}"
    if _is_webdataset_source(source):
        from .webdataset_io import expand_shards

        shards = expand_shards(source)
        return f"webdataset: {len(shards)} shard(s) from {source}"
    return f"unrecognised source {source!r}"


def build_image_dataset(
    source: str,
    *,
    split: str = "train",
    size: int = 32,
    channels: int = 3,
    seed: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
    **options,
) -> Dataset:
    """Dataset of sample dicts (x: (channels, size, size) in [0, 1]) for any supported source.

    ``split`` "train" allows random crops/augmentation, "eval" is deterministic.
    Map-style readers (folder, digits, photos) ignore ``process_index`` /
    ``num_processes`` (the distributed sampler shards them); the WebDataset reader
    splits shards by process itself and uses ``seed`` for shuffling.
    ``options`` go to the reader (photos: ``crops_per_epoch``; webdataset: ``shuffle_buffer``).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    common = dict(split=split, size=size, channels=channels)
    if source == "digits":
        from .builtin import DigitsDataset

        return DigitsDataset(**common, **options)
    if source == "photos":
        from .builtin import PhotosDataset

        return PhotosDataset(**common, **options)
    if os.path.isdir(source):
        return ImageFolderDataset(source, **common, **options)
    if _is_webdataset_source(source):
        from .webdataset_io import WebDatasetImages

        return WebDatasetImages(
            source, **common, seed=seed, process_index=process_index, num_processes=num_processes, **options
        )
    raise ValueError(f"unknown image source {source!r}; {_ACCEPTED_FORMS}")
