"""Pictures and files people open: image grids, spectrograms and frame strips; WAV/FLAC and MP4/GIF files."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_FPS = 8  # frame rate of written videos (the tokenizer does not know one)
# "magma"-like colormap: control points (value, RGB) interpolated linearly.
_COLORMAP = torch.tensor([[0.001, 0.000, 0.014], [0.232, 0.060, 0.437], [0.550, 0.161, 0.506],
                          [0.868, 0.288, 0.409], [0.994, 0.624, 0.427], [0.987, 0.991, 0.750]])


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> None:
    """images (N, C, H, W) in [0, 1] -> one PNG grid."""
    from torchvision.utils import save_image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(images.detach().float().clamp(0, 1).cpu(), str(path), nrow=nrow, padding=2, pad_value=1.0)


def _sample_rate(sample_rate: int) -> int:
    from data.modalities import DEFAULT_SAMPLE_RATE

    return int(sample_rate) or DEFAULT_SAMPLE_RATE


def colormap(values: torch.Tensor) -> torch.Tensor:
    """values (..., H, W) in [0, 1] -> RGB (..., 3, H, W) through a magma-like colormap."""
    stops = _COLORMAP.to(values.device)
    pos = values.clamp(0, 1) * (len(stops) - 1)
    lo = pos.floor().long().clamp(max=len(stops) - 2)
    frac = (pos - lo).unsqueeze(-1)
    rgb = stops[lo] * (1 - frac) + stops[lo + 1] * frac  # (..., H, W, 3)
    return rgb.movedim(-1, -3)


def spectrogram_images(waves: torch.Tensor, sample_rate: int = 0, top_db: float = 80.0,
                       min_width: int = 256) -> torch.Tensor:
    """waves (N, 1, T) or (N, T) in [-1, 1] -> coloured log-mel spectrograms (N, 3, 2 * mels, W), low at bottom.

    One dB scale for the whole batch (the loudest bin is the brightest colour, ``top_db`` below it
    is black), so originals and reconstructions drawn together compare directly. Short clips
    are widened (nearest neighbour) to at least ``min_width`` pixels.
    """
    from stage1_tokenizer.audio_loss import log_mel_spectrogram

    db = log_mel_spectrogram(waves.detach().float().cpu(), _sample_rate(sample_rate))  # (N, mels, frames)
    top = db.amax()
    values = ((db - (top - top_db)) / top_db).clamp(0, 1).flip(-2)  # low frequencies at the bottom
    mels, frames = values.shape[-2:]
    values = F.interpolate(values[:, None], size=(2 * mels, frames * max(1, -(-min_width // frames))),
                           mode="nearest")[:, 0]
    return colormap(values)


def _video_frames(x: torch.Tensor) -> torch.Tensor:
    """One clip (C, T, H, W) -> its frames (T, C, H, W)."""
    return x.transpose(0, 1)


def save_comparison(original: torch.Tensor, recon: torch.Tensor, path: str | Path, modality: str = "image",
                    sample_rate: int = 0) -> None:
    """Originals beside reconstructions.

    image: row pairs (originals, then their reconstructions); audio (N, 1, T): log-mel spectrogram
    rows, originals above their reconstructions (``sample_rate`` 0 = 16 kHz); video (N, C, T, H, W):
    per clip, a row of its frames and below it a row of the reconstruction's frames (8 clips at most).
    """
    if modality == "video":
        n = min(original.shape[0], 8)
        rows = [torch.cat([_video_frames(original[i]), _video_frames(recon[i])]) for i in range(n)]
        save_image_grid(torch.cat(rows), path, nrow=original.shape[2])
        return
    if modality == "audio":
        both = spectrogram_images(torch.cat([original, recon]), sample_rate)
        original, recon = both[: original.shape[0]], both[original.shape[0] :]
    elif modality != "image":
        raise ValueError(f"unknown modality {modality!r}; choose image, audio or video")
    n = original.shape[0]
    nrow = min(n, 4 if modality == "audio" else 8)
    rows = []
    for start in range(0, n, nrow):
        rows += [original[start : start + nrow], recon[start : start + nrow]]
    save_image_grid(torch.cat(rows), path, nrow=nrow)


def write_samples(modality: str, samples: torch.Tensor, out_dir: str | Path, nrow: int = 10,
                  sample_rate: int = 0, fps: int = DEFAULT_FPS) -> None:
    """Decoded samples as files people open, plus ``samples.npy``.

    image: ``samples.png`` grid, samples.npy (N, C, H, W) in [0, 1].
    audio (N, 1, T) in [-1, 1]: ``sample_000.wav``... (16-bit PCM at ``sample_rate``, 0 = 16 kHz),
    ``spectrograms.png``, samples.npy (N, 1, T).
    video (N, C, T, H, W) in [0, 1]: ``sample_000.mp4``... (H.264, else MPEG-4, else ``.gif``) at
    ``fps``, ``frames.png`` (a row of frames per sample), samples.npy (N, T, C, H, W).
    """
    import numpy as np

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = samples.detach().float().cpu()
    if modality == "image":
        np.save(out / "samples.npy", samples.numpy(), allow_pickle=False)
        save_image_grid(samples, out / "samples.png", nrow=nrow)
        return
    if modality == "audio":
        samples = samples.clamp(-1, 1)
        np.save(out / "samples.npy", samples.numpy(), allow_pickle=False)
        for i, wave in enumerate(samples):
            write_audio(wave, out / f"sample_{i:03d}.wav", sample_rate)
        save_image_grid(spectrogram_images(samples, sample_rate), out / "spectrograms.png", nrow=min(4, nrow))
        return
    if modality == "video":
        samples = samples.clamp(0, 1)
        np.save(out / "samples.npy", samples.transpose(1, 2).contiguous().numpy(), allow_pickle=False)
        for i, clip in enumerate(samples):
            write_video(clip, out / f"sample_{i:03d}.mp4", fps)
        frames = samples.transpose(1, 2).reshape(-1, *samples.shape[1:2], *samples.shape[3:])
        save_image_grid(frames, out / "frames.png", nrow=samples.shape[2])
        return
    raise ValueError(f"unknown modality {modality!r}; choose image, audio or video")


# ---- single files -------------------------------------------------------------------------------
AUDIO_OUT_FORMATS = {".wav": "WAV", ".flac": "FLAC"}
VIDEO_OUT_SUFFIXES = (".mp4", ".gif")


def write_audio(wave: torch.Tensor, path: str | Path, sample_rate: int = 0) -> Path:
    """(1, T) or (T,) in [-1, 1] -> 16-bit PCM WAV or FLAC (by suffix) at ``sample_rate`` (0 = 16 kHz)."""
    import soundfile as sf

    path = Path(path)
    fmt = AUDIO_OUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot write audio to {path}: use a .wav or .flac file name")
    data = wave.detach().float().cpu().clamp(-1, 1).reshape(-1, wave.shape[-1]).mean(0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, _sample_rate(sample_rate), subtype="PCM_16", format=fmt)
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
    from torchcodec.encoders import VideoEncoder

    errors = []
    for codec in ("libx264", "h264", "mpeg4"):
        try:
            VideoEncoder(frames, frame_rate=fps).to_file(str(path), codec=codec, pixel_format="yuv420p")
            return
        except Exception as err:  # encoder missing from this FFmpeg build
            errors.append(f"{codec}: {err}")
    raise RuntimeError("; ".join(errors))


def _encode_pyav(frames: torch.Tensor, path: Path, fps: int) -> None:
    import av

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
    from PIL import Image

    frames = (clip.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).transpose(0, 1)
    mode = "L" if frames.shape[1] == 1 else "RGB"
    images = [Image.fromarray(f[0].numpy() if mode == "L" else f.permute(1, 2, 0).numpy(), mode) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


def write_video(clip: torch.Tensor, path: str | Path, fps: int = DEFAULT_FPS) -> Path:
    """(C, T, H, W) in [0, 1] -> a video file; returns the path written.

    ``.mp4``: H.264 (else MPEG-4) through torchcodec, else PyAV; when neither can encode, a
    ``.gif`` beside it (Pillow; a warning says so). ``.gif``: Pillow.
    """
    import warnings

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


def read_input(modality: str, path: str | Path, channels: int, multiple: tuple[int, ...], size: int | None = None,
               sample_rate: int = 0) -> torch.Tensor:
    """One input file as the tokenizer takes it, without batch.

    image (C, H, W) in [0, 1]; audio (1, T) in [-1, 1], mono, resampled to ``sample_rate`` (0 = 16 kHz);
    video (C, T, H, W) in [0, 1] (every frame). The input is center-cropped so each axis is a multiple
    of the tokenizer's downsampling (a fully convolutional tokenizer encodes any such size).
    ``size``: image/video resize the shorter side first; audio takes the first ``size`` samples
    (zero-padded when shorter).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} not found")
    if modality == "audio":
        from data.audio import load_audio, window

        if channels != 1:
            raise ValueError(f"audio is mono, but the tokenizer takes {channels} channels")
        try:
            x = load_audio(path, _sample_rate(sample_rate))
        except ValueError as err:
            raise ValueError(f"cannot read audio {path}: {err}") from err
        if size is not None:
            x = window(x, size, 0)
        return center_crop_to_multiple(x, multiple)
    if modality == "video":
        from data.video import frames_to_clip, read_frames

        try:
            frames = read_frames(path)
        except Exception as err:  # torchcodec raises RuntimeError, PyAV its own errors
            raise ValueError(f"cannot read video {path}: {err}") from err
        x = frames_to_clip(frames, None, channels, train=False)
        if size is not None:
            from data.common import resize_shorter

            c, t, h, w = x.shape
            x = resize_shorter(x.reshape(c * t, h, w), size)
            x = x.reshape(c, t, *x.shape[-2:])
        return center_crop_to_multiple(x, multiple)
    if modality != "image":
        raise ValueError(f"unknown modality {modality!r}; choose image, audio or video")
    from PIL import Image, UnidentifiedImageError

    from data.common import match_channels, pil_to_tensor, resize_shorter

    try:
        with Image.open(path) as img:
            x = pil_to_tensor(img)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    if size is not None:
        x = resize_shorter(x, size)
    x = match_channels(x, channels)
    return center_crop_to_multiple(x, multiple)


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


def write_output(modality: str, x: torch.Tensor, path: str | Path, sample_rate: int = 0) -> None:
    """One decoded item (C, *S) to a file people open.

    image: PNG/JPEG by extension; audio (1, T): .wav/.flac at ``sample_rate`` (0 = 16 kHz);
    video (C, T, H, W): .mp4/.gif.
    """
    path = Path(path)
    if modality == "audio":
        write_audio(x, path, sample_rate)
        return
    if modality == "video":
        write_video(x, path)
        return
    if modality != "image":
        raise ValueError(f"unknown modality {modality!r}; choose image, audio or video")
    path.parent.mkdir(parents=True, exist_ok=True)
    from torchvision.utils import save_image

    save_image(x.detach().float().clamp(0, 1).cpu(), str(path))
