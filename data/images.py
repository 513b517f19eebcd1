"""Image-folder reader and the ``build_image_dataset`` entry point."""

from __future__ import annotations

import os

import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from .builtin import DigitsDataset, PhotosDataset, tile_grid
from .common import IMAGE_EXTENSIONS, image_to_tensor, make_sample, match_channels, pil_to_tensor, resize_shorter
from .folders import (DEFAULT_EVAL_FRACTION, SkippingDataset, check_split, folder_labels, list_media_files,
                      split_indices)
from .webdataset_io import WebDatasetImages, is_shard_source

BUILTIN_SOURCES = ("digits", "photos")

_ACCEPTED_FORMS = (
    "accepted sources: a built-in name ('digits' or 'photos'); an existing directory of images "
    "(.png .jpg .jpeg .bmp .gif .webp .tif .tiff, searched recursively); or WebDataset .tar shards "
    "(a path, a comma-separated list, or a brace pattern like 'shards/train-{000000..000009}.tar')"
)


class ImageFolderDataset(SkippingDataset):
    """Map-style dataset over an image directory tree, split into training and held-out files.

    Files inside immediate subfolders get label = index of that subfolder in ``self.classes`` (sorted,
    ImageFolder convention, over all files); files at the root get -1. The split is by file
    (``data.folders.split_indices``: a hash of the relative path against ``eval_fraction``).
    train: one item per training file, a random ``size`` crop (shorter side resized to ``size`` first).
    eval: every non-overlapping ``size`` x ``size`` tile of every held-out file at its own resolution (a file
    smaller than a tile is resized up first), so evaluation measures whole pictures, not one centre crop.
    Unreadable files are skipped (with a warning) in favour of the next index and reported.
    """

    kind = "image"

    def __init__(self, root: str, *, split: str = "train", size: int = 32, channels: int = 3,
                 eval_fraction: float = DEFAULT_EVAL_FRACTION):
        self.root, self.train, self.size, self.channels = root, split == "train", size, channels
        files = list_media_files(root, IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"no images found under {root!r} (extensions: {' '.join(IMAGE_EXTENSIONS)})")
        self.classes, labels = folder_labels(files)
        keep = split_indices(files, split, eval_fraction, readable=lambda f: self._oriented_size(f) is not None)
        self.files, self.labels = [files[i] for i in keep], [labels[i] for i in keep]
        self.unindexed: list[str] = []
        self.items = [(f, 0, 0) for f in range(len(self.files))] if self.train else self._tiles()
        self._cache: tuple[int, torch.Tensor] | None = None  # the last decoded held-out file: its tiles follow

    def _oriented_size(self, name: str) -> tuple[int, int] | None:
        """(height, width) after the EXIF rotation, from the header only; None when the file cannot be opened."""
        try:
            with Image.open(os.path.join(self.root, name)) as img:
                w, h = img.size
                rotated = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
        except Exception:  # decoders raise many types
            return None
        return (w, h) if rotated else (h, w)

    def _tiles(self) -> list[tuple[int, int, int]]:
        tiles = []
        for f, name in enumerate(self.files):
            hw = self._oriented_size(name)
            if hw is None:
                self.unindexed.append(self.item_path_of(f))
                continue
            scale = max(1.0, self.size / min(hw))
            h, w = (max(self.size, round(n * scale)) for n in hw)
            tiles += [(f, top, left) for top, left in tile_grid(h, w, self.size)]
        if not tiles:
            raise ValueError(f"no readable held-out image under {self.root!r}")
        return tiles

    def __len__(self) -> int:
        return len(self.items)

    def item_path_of(self, f: int) -> str:
        return os.path.join(self.root, self.files[f])

    def item_path(self, i: int) -> str:
        return self.item_path_of(self.items[i][0])

    def load(self, index: int) -> torch.Tensor:
        """Item ``index`` -> (channels, size, size) float in [0, 1]; raises on bad files."""
        f, top, left = self.items[index]
        if self.train:
            with Image.open(self.item_path_of(f)) as img:
                return image_to_tensor(img, self.size, self.channels, True)
        if self._cache is None or self._cache[0] != f:
            with Image.open(self.item_path_of(f)) as img:
                whole = pil_to_tensor(ImageOps.exif_transpose(img))
            whole = resize_shorter(whole, self.size) if min(whole.shape[-2:]) < self.size else whole
            self._cache = (f, match_channels(whole, self.channels))
        return self._cache[1][:, top : top + self.size, left : left + self.size].contiguous()

    def load_item(self, i: int) -> dict:
        f, top, left = self.items[i]
        key = self.files[f] if self.train else f"{self.files[f]}@y{top}_x{left}"
        return make_sample(self.load(i), self.labels[f], key)


def build_image_dataset(source: str, *, split: str = "train", size: int = 32, channels: int = 3, seed: int = 0,
                        process_index: int = 0, num_processes: int = 1,
                        eval_fraction: float = DEFAULT_EVAL_FRACTION, **options) -> Dataset:
    """Dataset of sample dicts (x: (channels, size, size) in [0, 1]) for any supported source.

    ``split`` "train" allows random crops/augmentation, "eval" is deterministic.
    Map-style readers (folder, digits, photos) ignore ``process_index`` /
    ``num_processes`` (the distributed sampler shards them); the WebDataset reader
    splits shards by process itself and uses ``seed`` for shuffling.
    ``eval_fraction``: the share of a folder's files (of a shard set's samples) held out; the built-in sets
    have fixed splits. ``options`` go to the reader (photos: ``crops_per_epoch``; webdataset: ``shuffle_buffer``).
    """
    check_split(split)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    common = dict(split=split, size=size, channels=channels)
    if source == "digits":
        return DigitsDataset(**common, **options)
    if source == "photos":
        return PhotosDataset(**common, **options)
    if os.path.isdir(source):
        return ImageFolderDataset(source, **common, eval_fraction=eval_fraction, **options)
    if is_shard_source(source):
        return WebDatasetImages(source, **common, seed=seed, process_index=process_index,
                                num_processes=num_processes, eval_fraction=eval_fraction, **options)
    raise ValueError(f"unknown image source {source!r}; {_ACCEPTED_FORMS}")
