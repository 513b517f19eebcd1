"""Image-folder reader and the ``build_image_dataset`` entry point."""

from __future__ import annotations

import os

import torch
from PIL import Image
from torch.utils.data import Dataset

from .builtin import DigitsDataset, PhotosDataset
from .common import IMAGE_EXTENSIONS, image_to_tensor, make_sample
from .folders import SkippingDataset, check_split, folder_labels, list_media_files
from .webdataset_io import WebDatasetImages, is_shard_source

BUILTIN_SOURCES = ("digits", "photos")

_ACCEPTED_FORMS = (
    "accepted sources: a built-in name ('digits' or 'photos'); an existing directory of images "
    "(.png .jpg .jpeg .bmp .gif .webp .tif .tiff, searched recursively); or WebDataset .tar shards "
    "(a path, a comma-separated list, or a brace pattern like 'shards/train-{000000..000009}.tar')"
)


class ImageFolderDataset(SkippingDataset):
    """Map-style dataset over an image directory tree.

    Files inside immediate subfolders get label = index of that subfolder in
    ``self.classes`` (sorted, ImageFolder convention); files at the root get -1.
    Unreadable files are skipped (with a warning) in favour of the next index.
    """

    kind = "image"

    def __init__(self, root: str, *, split: str = "train", size: int = 32, channels: int = 3):
        self.root, self.train, self.size, self.channels = root, split == "train", size, channels
        self.files = list_media_files(root, IMAGE_EXTENSIONS)
        if not self.files:
            raise ValueError(f"no images found under {root!r} (extensions: {' '.join(IMAGE_EXTENSIONS)})")
        self.classes, self.labels = folder_labels(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def item_path(self, i: int) -> str:
        return os.path.join(self.root, self.files[i])

    def load(self, index: int) -> torch.Tensor:
        """Decode file ``index`` -> (channels, size, size) float in [0, 1]; raises on bad files."""
        with Image.open(self.item_path(index)) as img:
            return image_to_tensor(img, self.size, self.channels, self.train)

    def load_item(self, i: int) -> dict:
        return make_sample(self.load(i), self.labels[i], self.files[i])


def build_image_dataset(source: str, *, split: str = "train", size: int = 32, channels: int = 3, seed: int = 0,
                        process_index: int = 0, num_processes: int = 1, **options) -> Dataset:
    """Dataset of sample dicts (x: (channels, size, size) in [0, 1]) for any supported source.

    ``split`` "train" allows random crops/augmentation, "eval" is deterministic.
    Map-style readers (folder, digits, photos) ignore ``process_index`` /
    ``num_processes`` (the distributed sampler shards them); the WebDataset reader
    splits shards by process itself and uses ``seed`` for shuffling.
    ``options`` go to the reader (photos: ``crops_per_epoch``; webdataset: ``shuffle_buffer``).
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
        return ImageFolderDataset(source, **common, **options)
    if is_shard_source(source):
        return WebDatasetImages(source, **common, seed=seed, process_index=process_index,
                                num_processes=num_processes, **options)
    raise ValueError(f"unknown image source {source!r}; {_ACCEPTED_FORMS}")
