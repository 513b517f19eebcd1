"""One entry point for every modality: the tokenizer's modality picks the reader."""
from __future__ import annotations


def build_dataset(source: str, *, modality: str = "image", split: str = "train", size: int = 32,
                  channels: int = 3, seed: int = 0, process_index: int = 0, num_processes: int = 1,
                  sample_rate: int = 0):
    """A dataset of ``{"x", "label", "key", "skipped"}`` samples for ``modality``.

    size: crop size for images, clip length in samples for audio, frame size for video.
    """
    if modality == "image":
        from data.images import build_image_dataset

        return build_image_dataset(source, split=split, size=size, channels=channels, seed=seed,
                                   process_index=process_index, num_processes=num_processes)
    raise ValueError(f"no data reader for modality {modality!r} yet (image is supported)")
