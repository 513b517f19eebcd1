"""Single files people give and open: one input read as a tokenizer takes it, one decoded item written as
WAV/FLAC, MP4/GIF or PNG."""
from __future__ import annotations

import warnings
from pathlib import Path

import soundfile as sf
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision.utils import save_image

from .audio import DEFAULT_SAMPLE_RATE, load_audio, window
from .common import match_channels, pil_to_tensor, resize_shorter
from .limits import MAX_INPUT_SIZE, InputTooLarge, check_input_size
from .video import frames_to_clip, read_frames

DEFAULT_FPS = 8  # frame rate of written videos (the tokenizer does not know one)
AUDIO_OUT_FORMATS = {".wav": "WAV", ".flac": "FLAC"}
VIDEO_OUT_SUFFIXES = (".mp4", ".gif")
OUTPUT_SUFFIX = {"image": ".png", "audio": ".wav", "video": ".mp4"}  # what a modality is written as by default


# ---- writing ------------------------------------------------------------------------------------
def write_audio(wave: torch.Tensor, path: str | Path, sample_rate: int = DEFAULT_SAMPLE_RATE) -> Path:
    """(1, T) or (T,) in [-1, 1] -> 16-bit PCM WAV or FLAC (by suffix) at ``sample_rate``."""
    path = Path(path)
    fmt = AUDIO_OUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot write audio to {path}: use a .wav or .flac file name")
    data = wave.detach().float().cpu().clamp(-1, 1).reshape(-1, wave.shape[-1]).mean(0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, int(sample_rate), subtype="PCM_16", format=fmt)
    return path


def _even_rgb_uint8(clip: torch.Tensor) -> torch.Tensor:
    """(C, T, H, W) in [0, 1] -> uint8 (T, 3, H', W') with even H', W' (edge-replicated): what yuv420p needs."""
    frames = (clip.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).transpose(0, 1)
    if frames.shape[1] == 1:
        frames = frames.expand(-1, 3, -1, -1)
    h, w = frames.shape[-2:]
    if h % 2 or w % 2:
        frames = F.pad(frames.float(), (0, w % 2, 0, h % 2), mode="replicate").to(torch.uint8)
    return frames.contiguous()


def _encode_torchcodec(frames: torch.Tensor, path: Path, fps: int) -> None:
    from torchcodec.encoders import VideoEncoder  # optional: needs a system FFmpeg to import

    errors = []
    for codec in ("libx264", "h264", "mpeg4"):
        try:
            VideoEncoder(frames, frame_rate=fps).to_file(str(path), codec=codec, pixel_format="yuv420p")
            return
        except Exception as err:  # encoder missing from this FFmpeg build
            errors.append(f"{codec}: {err}")
    raise RuntimeError("; ".join(errors))


def _encode_pyav(frames: torch.Tensor, path: Path, fps: int) -> None:
    import av  # optional: the fallback encoder

    errors = []
    for codec in ("libx264", "h264", "mpeg4"):
        try:
            with av.open(str(path), "w") as container:
                stream = container.add_stream(codec, rate=fps)
                stream.height, stream.width = frames.shape[-2:]
                stream.pix_fmt = "yuv420p"
                for frame in frames:
                    image = av.VideoFrame.from_ndarray(frame.permute(1, 2, 0).contiguous().numpy(), format="rgb24")
                    container.mux(stream.encode(image))
                container.mux(stream.encode())
            return
        except Exception as err:
            errors.append(f"{codec}: {err}")
    raise RuntimeError("; ".join(errors))


def _write_gif(clip: torch.Tensor, path: Path, fps: int) -> None:
    frames = (clip.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).transpose(0, 1)
    mode = "L" if frames.shape[1] == 1 else "RGB"
    images = [Image.fromarray(f[0].numpy() if mode == "L" else f.permute(1, 2, 0).numpy(), mode) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


def write_video(clip: torch.Tensor, path: str | Path, fps: int = DEFAULT_FPS) -> Path:
    """(C, T, H, W) in [0, 1] -> a video file; returns the path written.

    ``.mp4``: H.264 (else MPEG-4) through torchcodec, else PyAV; when neither can encode, a
    ``.gif`` beside it (Pillow; a warning says so). ``.gif``: Pillow.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_OUT_SUFFIXES:
        raise ValueError(f"cannot write video to {path}: use a .mp4 or .gif file name")
    if clip.dim() != 4 or clip.shape[0] not in (1, 3):
        raise ValueError(f"expected one clip (C, T, H, W) with C in (1, 3), got shape {tuple(clip.shape)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        _write_gif(clip, path, fps)
        return path
    frames = _even_rgb_uint8(clip)
    errors = []
    for encode in (_encode_torchcodec, _encode_pyav):
        try:
            encode(frames, path, fps)
            return path
        except Exception as err:  # torchcodec without FFmpeg, PyAV without encoders...
            errors.append(f"{encode.__name__[8:]}: {err}")
    gif = path.with_suffix(".gif")
    warnings.warn(f"no MP4 encoder available ({'; '.join(errors)}); wrote {gif} instead")
    path.unlink(missing_ok=True)
    _write_gif(clip, gif, fps)
    return gif


def write_output(modality: str, x: torch.Tensor, path: str | Path, sample_rate: int = DEFAULT_SAMPLE_RATE) -> Path:
    """One decoded item (C, *S) to a file people open; returns the path written.

    image: PNG/JPEG by extension; audio (1, T): .wav/.flac at ``sample_rate``; video (C, T, H, W): .mp4/.gif.
    """
    path = Path(path)
    if modality == "audio":
        return write_audio(x, path, sample_rate)
    if modality == "video":
        return write_video(x, path)
    if modality != "image":
        raise ValueError(f"unknown modality {modality!r}; choose image, audio or video")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(x.detach().float().clamp(0, 1).cpu(), str(path))
    return path


# ---- reading ------------------------------------------------------------------------------------

def read_input(modality: str, path: str | Path, channels: int, multiple: tuple[int, ...], size: int | None = None,
               sample_rate: int = DEFAULT_SAMPLE_RATE) -> torch.Tensor:
    """One input file as the tokenizer takes it, without batch.

    image (C, H, W) in [0, 1]; audio (1, T) in [-1, 1], mono, resampled to ``sample_rate``;
    video (C, T, H, W) in [0, 1] (every frame). The input is center-cropped so each axis is a multiple
    of the tokenizer's downsampling (a fully convolutional tokenizer encodes any such size).
    ``size``: image/video resize the shorter side first; audio takes the first ``size`` samples
    (zero-padded when shorter).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} not found")
    readers = {"audio": lambda: _read_audio(path, channels, size, sample_rate),
               "video": lambda: _read_video(path, channels, size), "image": lambda: _read_image(path, channels, size)}
    if modality not in readers:
        raise ValueError(f"unknown modality {modality!r}; choose image, audio or video")
    return center_crop_to_multiple(readers[modality](), multiple)


def _read_audio(path: Path, channels: int, size: int | None, sample_rate: int) -> torch.Tensor:
    if channels != 1:
        raise ValueError(f"audio is mono, but the tokenizer takes {channels} channels")
    try:
        x = load_audio(path, sample_rate)
    except ValueError as err:
        raise ValueError(f"cannot read audio {path}: {err}") from err
    return window(x, size, 0) if size is not None else x


def _read_video(path: Path, channels: int, size: int | None) -> torch.Tensor:
    try:
        frames = read_frames(path)
    except Exception as err:  # torchcodec raises RuntimeError, PyAV its own errors
        raise ValueError(f"cannot read video {path}: {err}") from err
    x = frames_to_clip(frames, None, channels, train=False)
    if size is None:
        return x
    c, t, h, w = x.shape
    x = resize_shorter(x.reshape(c * t, h, w), size)
    return x.reshape(c, t, *x.shape[-2:])


def _read_image(path: Path, channels: int, size: int | None) -> torch.Tensor:
    try:
        with Image.open(path) as img:
            x = pil_to_tensor(img)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    if size is not None:
        x = resize_shorter(x, size)
    return match_channels(x, channels)


def center_crop_to_multiple(x: torch.Tensor, multiple: tuple[int, ...]) -> torch.Tensor:
    """(C, *S) -> (C, *S') with each S'_i the largest multiple of multiple[i] <= S_i, centered."""
    slices = [slice(None)]
    for n, m in zip(x.shape[1:], multiple):
        keep = (n // m) * m
        if keep == 0:
            raise ValueError(f"input of size {tuple(x.shape[1:])} is smaller than the tokenizer's downsampling {multiple}")
        start = (n - keep) // 2
        slices.append(slice(start, start + keep))
    return x[tuple(slices)]
