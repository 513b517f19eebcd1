"""Files <-> tensors: dataset readers for every modality, the codes and token-shard formats, and the files and
pictures people open. Knows no model.

Every dataset yields ``{"x", "label": int, "key": str, "skipped": list[str]}`` samples; batch them with
``collate_samples``. x is (C, H, W) in [0, 1] for images, (1, T) in [-1, 1] for audio and (C, T, H, W) in
[0, 1] for video; ``build_dataset(source, modality=...)`` picks the reader. scikit-learn, scikit-image,
torchcodec and PyAV are imported where they are used (the built-in sets, the video decoders), so a
missing optional package only affects what needs it.
"""

from .audio import (AUDIO_EXTENSIONS, AudioFolderDataset, SpokenDigitsDataset, WebDatasetAudio, build_audio_dataset,
                    load_audio)
from .builtin import PHOTOS_EVAL, PHOTOS_TRAIN, DigitsDataset, PhotosDataset, load_photo
from .codes import code_dtype, load_codes, save_codes
from .common import IMAGE_EXTENSIONS, collate_samples, make_sample
from .files import read_input, write_output
from .images import BUILTIN_SOURCES, ImageFolderDataset, build_image_dataset
from .modalities import (DEFAULT_FRAMES, DEFAULT_SAMPLE_RATE, MODALITIES, MODALITY_DIMS, build_dataset,
                         clamp_to_range, value_range)
from .pictures import save_comparison, save_image_grid, write_samples
from .tokens import TokenDataset, collate_tokens, load_all, read_manifest
from .video import (VIDEO_EXTENSIONS, MovingDigitsDataset, VideoFolderDataset, WebDatasetVideo, build_video_dataset,
                    read_frames)
from .webdataset_io import WebDatasetImages, expand_shards

__all__ = [
    "AUDIO_EXTENSIONS", "BUILTIN_SOURCES", "DEFAULT_FRAMES", "DEFAULT_SAMPLE_RATE", "IMAGE_EXTENSIONS", "MODALITIES",
    "MODALITY_DIMS", "PHOTOS_EVAL", "PHOTOS_TRAIN", "VIDEO_EXTENSIONS", "AudioFolderDataset", "DigitsDataset",
    "ImageFolderDataset", "MovingDigitsDataset", "PhotosDataset", "SpokenDigitsDataset", "TokenDataset",
    "VideoFolderDataset", "WebDatasetAudio", "WebDatasetImages", "WebDatasetVideo", "build_audio_dataset",
    "build_dataset", "build_image_dataset", "build_video_dataset", "clamp_to_range", "code_dtype", "collate_samples",
    "collate_tokens", "expand_shards", "load_all", "load_audio", "load_codes", "load_photo", "make_sample",
    "read_frames", "read_input", "read_manifest", "save_codes", "save_comparison", "save_image_grid", "value_range",
    "write_output", "write_samples",
]
