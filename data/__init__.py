"""Dataset readers for tokgen.

Every image dataset yields ``{"x": (C, H, W) float in [0, 1], "label": int,
"key": str, "skipped": list[str]}``; batch them with ``collate_samples``.
Heavy optional dependencies (scikit-learn, scikit-image, webdataset) are
imported lazily, so ``import data`` stays cheap.
"""

from .builtin import PHOTOS_EVAL, PHOTOS_TRAIN, DigitsDataset, PhotosDataset, load_photo
from .common import IMAGE_EXTENSIONS, collate_samples, make_sample
from .modalities import build_dataset
from .images import BUILTIN_SOURCES, ImageFolderDataset, build_image_dataset, describe_source
from .webdataset_io import WebDatasetImages, expand_shards

__all__ = [
    "BUILTIN_SOURCES",
    "IMAGE_EXTENSIONS",
    "PHOTOS_EVAL",
    "PHOTOS_TRAIN",
    "DigitsDataset",
    "ImageFolderDataset",
    "PhotosDataset",
    "WebDatasetImages",
    "build_dataset",
    "build_image_dataset",
    "collate_samples",
    "describe_source",
    "expand_shards",
    "load_photo",
    "make_sample",
]
