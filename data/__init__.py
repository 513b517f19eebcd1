"""Dataset readers for tokgen.

Every dataset yields ``{"x", "label": int, "key": str, "skipped": list[str]}`` samples; batch them
with ``collate_samples``. x is (C, H, W) in [0, 1] for images, (1, T) in [-1, 1] for audio and
(C, T, H, W) in [0, 1] for video; ``build_dataset(source, modality=...)`` picks the reader.
Heavy optional dependencies (scikit-learn, scikit-image, webdataset, torchaudio, torchcodec, PyAV)
are imported lazily, so ``import data`` stays cheap.
"""

from .builtin import PHOTOS_EVAL, PHOTOS_TRAIN, DigitsDataset, PhotosDataset, load_photo
from .common import IMAGE_EXTENSIONS, collate_samples, make_sample
from .modalities import DEFAULT_FRAMES, DEFAULT_SAMPLE_RATE, MODALITIES, build_dataset
from .images import BUILTIN_SOURCES, ImageFolderDataset, build_image_dataset, describe_source
from .webdataset_io import WebDatasetImages, expand_shards
from .audio import (AUDIO_EXTENSIONS, AudioFolderDataset, SpokenDigitsDataset, WebDatasetAudio,
                    build_audio_dataset, load_audio)
from .video import (VIDEO_EXTENSIONS, MovingDigitsDataset, VideoFolderDataset, WebDatasetVideo,
                    build_video_dataset, read_frames)

__all__ = [
    "AUDIO_EXTENSIONS",
    "BUILTIN_SOURCES",
    "DEFAULT_FRAMES",
    "DEFAULT_SAMPLE_RATE",
    "IMAGE_EXTENSIONS",
    "MODALITIES",
    "PHOTOS_EVAL",
    "PHOTOS_TRAIN",
    "VIDEO_EXTENSIONS",
    "AudioFolderDataset",
    "DigitsDataset",
    "ImageFolderDataset",
    "MovingDigitsDataset",
    "PhotosDataset",
    "SpokenDigitsDataset",
    "VideoFolderDataset",
    "WebDatasetAudio",
    "WebDatasetImages",
    "WebDatasetVideo",
    "build_audio_dataset",
    "build_dataset",
    "build_image_dataset",
    "build_video_dataset",
    "collate_samples",
    "describe_source",
    "expand_shards",
    "load_audio",
    "load_photo",
    "make_sample",
    "read_frames",
]
