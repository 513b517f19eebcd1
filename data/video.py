"""Video readers: folder of video files, WebDataset video shards and the built-in ``moving-digits``.

Every video dataset yields ``{"x": (C, T, size, size) float in [0, 1], "label", "key", "skipped"}``
(channels first, then time, as the video tokenizer takes it): clips of ``frames`` frames, the shorter
side resized to ``size`` and a square crop (random for train, centred for eval; one crop per clip).

Decoding uses torchcodec's ``VideoDecoder`` (FFmpeg) and falls back to PyAV when torchcodec or its
FFmpeg libraries are unavailable.
"""
from __future__ import annotations

import functools
import io
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .builtin import digits_indices, load_digits
from .common import crop_square, make_sample, match_channels, resize_shorter
from .limits import MAX_INPUT_SIZE, check_input_size
from .folders import (DEFAULT_EVAL_FRACTION, SkippingDataset, check_split, folder_labels, list_media_files,
                      split_indices)
from .webdataset_io import WebDatasetImages, is_shard_source, sample_label

VIDEO_EXTENSIONS = (".mp4", ".webm", ".gif", ".avi", ".mov", ".mkv")
VIDEO_KEYS = ("mp4", "webm", "gif", "avi", "mov", "mkv")
DEFAULT_FRAMES = 16  # frames per clip

_ACCEPTED_FORMS = (
    "accepted video sources: 'moving-digits' (built-in); an existing directory of videos "
    "(.mp4 .webm .gif .avi .mov .mkv, searched recursively); or WebDataset .tar shards with mp4/webm/gif entries"
)


# ---------------------------------------------------------------- decoding


@functools.lru_cache(maxsize=1)
def torchcodec_available() -> bool:
    """torchcodec importable and its FFmpeg libraries loadable (it needs a system FFmpeg).

    torchcodec and PyAV are imported where they decode: either may be missing, and importing torchcodec
    without FFmpeg raises."""
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except Exception:  # ImportError, or RuntimeError/OSError when the FFmpeg libraries are missing
        return False
    return True


def _source(source: str | os.PathLike | bytes):
    return source if isinstance(source, bytes) else str(source)


def count_frames(source: str | os.PathLike | bytes) -> int:
    """Exact number of frames (demuxes the file; no decoding with torchcodec); raises if unreadable."""
    if torchcodec_available():
        from torchcodec.decoders import VideoDecoder

        n = len(VideoDecoder(_source(source), seek_mode="exact"))
    else:
        import av

        with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
            stream = container.streams.video[0]
            n = sum(1 for packet in container.demux(stream) if packet.size)
    if n <= 0:
        raise ValueError("video has no frames")
    return n


def _frame_count(path: str) -> int:
    """count_frames, or 0 for a file that cannot be opened."""
    try:
        return count_frames(path)
    except Exception:  # decoders raise many types
        return 0


def read_frames(source: str | os.PathLike | bytes, indices: list[int] | None = None,
                max_values: int = MAX_INPUT_SIZE) -> torch.Tensor:
    """Decode frames ``indices`` (all when None) -> uint8 (T, 3, H, W) RGB; raises if unreadable, and before
    decoding when the frames would hold more than ``max_values`` pixels."""
    if torchcodec_available():
        from torchcodec.decoders import VideoDecoder

        decoder = VideoDecoder(_source(source), seek_mode="exact")
        if indices is None:
            indices = list(range(len(decoder)))
        if not indices:
            raise ValueError("video has no frames")
        meta = decoder.metadata
        check_input_size((len(indices), meta.height or 0, meta.width or 0), max_values, "a video")
        return decoder.get_frames_at(indices).data
    import av

    wanted = None if indices is None else set(indices)
    frames = {}
    with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
        stream = container.streams.video[0]
        claimed = len(indices) if indices is not None else (stream.frames or 0)
        check_input_size((claimed, stream.codec_context.height or 0, stream.codec_context.width or 0), max_values,
                         "a video")
        for i, frame in enumerate(container.decode(video=0)):  # sequential: simple and exact
            if wanted is None or i in wanted:
                frames[i] = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
            if wanted is not None and i >= max(wanted):
                break
    order = sorted(frames) if indices is None else indices
    missing = [i for i in order if i not in frames]
    if missing or not order:
        raise ValueError(f"video has {len(frames)} decodable frames, frames {missing[:5]} missing")
    return torch.stack([frames[i] for i in order])


def frames_to_clip(frames: torch.Tensor, size: int | None, channels: int, train: bool) -> torch.Tensor:
    """uint8/float (T, C, H, W) -> float (channels, T, size, size) in [0, 1].

    Shorter side resized to ``size`` (antialiased), then one square crop shared by all frames
    (random for train via the global torch RNG, centred for eval). ``size=None`` keeps the frames.
    """
    x = frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()
    t, c, h, w = x.shape
    if size is not None:
        x = resize_shorter(x.reshape(t * c, h, w), size)  # frames as channels: one interpolate call
        x = crop_square(x, size, train).reshape(t, c, size, size)
    return match_channels(x.permute(1, 0, 2, 3), channels).clamp_(0.0, 1.0).contiguous()


def clip_span(frames: int, frame_step: int) -> int:
    """Source frames covered by a clip of ``frames`` frames taking every ``frame_step``-th."""
    return (frames - 1) * frame_step + 1


def clip_starts(num_frames: int, frames: int, frame_stride: int, frame_step: int = 1) -> list[int]:
    """First frame of every clip: 0, stride, 2 * stride, ... while the clip fits."""
    return list(range(0, num_frames - clip_span(frames, frame_step) + 1, frame_stride))


# ---------------------------------------------------------------- folder


class VideoFolderDataset(SkippingDataset):
    """Map-style dataset of clips from a directory tree of videos (.mp4 .webm .gif .avi .mov .mkv).

    Item = (file, clip start), enumerated at construction from each file's frame count: clips of
    ``frames`` frames (every ``frame_step``-th source frame), starting every ``frame_stride``
    source frames (default: the clip's span, so clips do not overlap). Files that cannot be
    opened at construction are warned about, listed in ``self.unindexed`` and reported with the
    sample at index 0; clips
    that fail to decode later are skipped for the next index and reported. Files shorter than
    one clip give no items (warned). Labels: immediate subfolder, like images.
    """

    kind = "video"

    def __init__(self, root: str, *, split: str = "train", size: int = 64, channels: int = 3,
                 frames: int = DEFAULT_FRAMES, frame_stride: int | None = None, frame_step: int = 1,
                 eval_fraction: float = DEFAULT_EVAL_FRACTION):
        if frames <= 0 or frame_step <= 0 or (frame_stride is not None and frame_stride <= 0):
            raise ValueError(f"frames, frame_stride and frame_step must be positive, got {frames}, "
                             f"{frame_stride}, {frame_step}")
        self.root, self.train, self.size, self.channels = root, split == "train", size, channels
        self.frames, self.frame_step = frames, frame_step
        self.frame_stride = frame_stride or clip_span(frames, frame_step)
        files = list_media_files(root, VIDEO_EXTENSIONS)
        if not files:
            raise ValueError(f"no videos found under {root!r} (extensions: {' '.join(VIDEO_EXTENSIONS)})")
        self.classes, labels = folder_labels(files)
        keep = split_indices(files, split, eval_fraction, readable=lambda f: _frame_count(os.path.join(root, f)) > 0)
        self.files, self.labels = [files[i] for i in keep], [labels[i] for i in keep]
        self.num_frames: dict[str, int] = {}
        self.unindexed, short = [], []
        self.items: list[tuple[int, int]] = []
        for f, name in enumerate(self.files):
            path = os.path.join(root, name)
            try:
                n = count_frames(path)
            except Exception as err:
                warnings.warn(f"skipping unreadable video {path}: {err}")
                self.unindexed.append(path)
                continue
            self.num_frames[name] = n
            starts = clip_starts(n, frames, self.frame_stride, frame_step)
            if not starts:
                short.append(f"{name} ({n})")
            self.items += [(f, s) for s in starts]
        if short:
            warnings.warn(f"{len(short)} video(s) under {root} have fewer than the {clip_span(frames, frame_step)} "
                          f"frames a clip needs and give no clips: {', '.join(short[:10])}")
        if not self.items:
            raise ValueError(f"no clips of {frames} frames (step {frame_step}) in the videos under {root!r}")

    def __len__(self) -> int:
        return len(self.items)

    def item_path(self, i: int) -> str:
        f, start = self.items[i]
        return f"{os.path.join(self.root, self.files[f])}@{start}"

    def load_item(self, i: int) -> dict:
        f, start = self.items[i]
        indices = list(range(start, start + clip_span(self.frames, self.frame_step), self.frame_step))
        frames = read_frames(os.path.join(self.root, self.files[f]), indices)
        x = frames_to_clip(frames, self.size, self.channels, self.train)
        return make_sample(x, self.labels[f], f"{self.files[f]}@{start}")


# ---------------------------------------------------------------- webdataset


class WebDatasetVideo(WebDatasetImages):
    """Iterable dataset of video clips from WebDataset shards (entries mp4/webm/gif/avi/mov/mkv).

    One clip per tar sample: a random start for train, the first frames for eval. Videos shorter
    than a clip are skipped and reported. Process/worker split, shuffling and skip-and-report
    are the image reader's (``WebDatasetImages``).
    """

    def __init__(self, source: str | list[str], *, split: str = "train", size: int = 64, channels: int = 3,
                 frames: int = DEFAULT_FRAMES, frame_step: int = 1, seed: int = 0, process_index: int = 0,
                 num_processes: int = 1, shuffle_buffer: int = 1000, eval_fraction: float = DEFAULT_EVAL_FRACTION):
        super().__init__(source, split=split, size=size, channels=channels, seed=seed, process_index=process_index,
                         num_processes=num_processes, shuffle_buffer=shuffle_buffer, eval_fraction=eval_fraction)
        self.frames, self.frame_step = frames, frame_step

    def decode(self, sample: dict) -> dict:
        key = next((k for k in VIDEO_KEYS if k in sample), None)
        if key is None:
            raise ValueError(f"no video entry (have {sorted(k for k in sample if not k.startswith('__'))})")
        data = sample[key]
        n, span = count_frames(data), clip_span(self.frames, self.frame_step)
        if n < span:
            raise ValueError(f"video has {n} frames, fewer than the {span} a clip needs")
        start = int(torch.randint(0, n - span + 1, (1,))) if self.train else 0
        frames = read_frames(data, list(range(start, start + span, self.frame_step)))
        x = frames_to_clip(frames, self.size, self.channels, self.train)
        return make_sample(x, sample_label(sample), sample["__key__"])


# ---------------------------------------------------------------- moving-digits

MOVING_CANVAS = 64  # reference frame side: digit sizes and speeds below are for 64 x 64
MOVING_DIGIT_PX = (20, 28)  # digit side range at 64 x 64
MOVING_SPEED = (2.0, 4.0)  # pixels per frame at 64 x 64
MOVING_LENGTH = {"train": 2000, "eval": 200}
_SPLIT_SEED = {"train": 0, "eval": 1}


class MovingDigitsDataset(Dataset):
    """Moving-MNIST recipe with scikit-learn's 8x8 digits; labels = the first digit's class.

    Item i shows 1 or 2 digits (upsampled to 20-28 px at 64 x 64, scaled with ``size``) that
    bounce off the edges of a black ``size`` x ``size`` frame for ``frames`` frames; overlapping
    digits combine by maximum. Everything about item i comes from a generator seeded by (split, i),
    so both splits are fixed; train draws digits from ``digits_indices("train")``, eval from the
    held-out ``digits_indices("eval")``. ``length`` is virtual (default 2000 train, 200 eval). The
    key names every digit's class and scikit-learn index, e.g. ``moving-digits/train/7:3-1021:8-5``.
    """

    def __init__(self, *, split: str = "train", size: int = MOVING_CANVAS, channels: int = 1,
                 frames: int = DEFAULT_FRAMES, length: int | None = None, max_digits: int = 2):
        check_split(split)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.split, self.size, self.channels, self.frames = split, size, channels, frames
        self.length = MOVING_LENGTH[split] if length is None else length
        self.max_digits = max_digits
        images, labels = load_digits()
        self.pool = digits_indices(split, len(labels))
        self.images, self.digit_labels = images, labels

    def __len__(self) -> int:
        return self.length

    def render(self, i: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Item i -> ((1, T, size, size) float in [0, 1], [(sklearn index, class) per digit])."""
        rng = np.random.default_rng([20240607, _SPLIT_SEED[self.split], i])
        scale = self.size / MOVING_CANVAS
        canvas = torch.zeros(self.frames, self.size, self.size)
        digits = []
        for _ in range(int(rng.integers(1, self.max_digits + 1))):
            index = self.pool[int(rng.integers(len(self.pool)))]
            side = max(4, min(self.size, round(rng.uniform(*MOVING_DIGIT_PX) * scale)))
            sprite = F.interpolate(self.images[index][None], size=(side, side), mode="bilinear",
                                   align_corners=False)[0, 0].clamp_(0, 1)
            room = self.size - side
            pos = rng.uniform(0, room, size=2)  # (y, x)
            angle = rng.uniform(0, 2 * np.pi)
            vel = rng.uniform(*MOVING_SPEED) * scale * np.array([np.sin(angle), np.cos(angle)])
            for t in range(self.frames):
                y, x = (int(round(v)) for v in pos)
                region = canvas[t, y : y + side, x : x + side]
                torch.maximum(region, sprite, out=region)
                pos = pos + vel
                for axis in range(2):  # bounce: reflect the position and flip the velocity
                    if pos[axis] < 0:
                        pos[axis], vel[axis] = -pos[axis], -vel[axis]
                    elif pos[axis] > room:
                        pos[axis], vel[axis] = 2 * room - pos[axis], -vel[axis]
                    pos[axis] = min(max(pos[axis], 0.0), room)
            digits.append((index, int(self.digit_labels[index])))
        return canvas[None], digits

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        x, digits = self.render(i)
        key = f"moving-digits/{self.split}/{i}:" + "-".join(f"{index}:{label}" for index, label in digits)
        return make_sample(match_channels(x, self.channels).contiguous(), digits[0][1], key)


# ---------------------------------------------------------------- entry point


def build_video_dataset(source: str, *, split: str = "train", size: int = 64, channels: int = 3,
                        frames: int = DEFAULT_FRAMES, frame_stride: int | None = None, frame_step: int = 1,
                        seed: int = 0, process_index: int = 0, num_processes: int = 1,
                        eval_fraction: float = DEFAULT_EVAL_FRACTION, **options):
    """Video dataset of sample dicts (x: (channels, frames, size, size) in [0, 1]) for any video source
    (``eval_fraction``: the held-out share of a folder's files or a shard set's samples)."""
    check_split(split)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    common = dict(split=split, size=size, channels=channels, frames=frames)
    if source == "moving-digits":
        if frame_step != 1 or frame_stride is not None:
            raise ValueError("moving-digits renders its clips: frame_stride/frame_step do not apply")
        return MovingDigitsDataset(**common, **options)
    if os.path.isdir(source):
        return VideoFolderDataset(source, **common, frame_stride=frame_stride, frame_step=frame_step,
                                  eval_fraction=eval_fraction, **options)
    if is_shard_source(source):
        return WebDatasetVideo(source, **common, frame_step=frame_step, seed=seed, process_index=process_index,
                               num_processes=num_processes, eval_fraction=eval_fraction, **options)
    raise ValueError(f"unknown video source {source!r}; {_ACCEPTED_FORMS}")
