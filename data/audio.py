"""Audio readers: folder of sound files, WebDataset audio shards and the built-in ``spoken-digits``.

Every audio dataset yields ``{"x": (1, size) float in [-1, 1], "label", "key", "skipped"}``: mono,
resampled to the dataset's ``sample_rate``, cropped (random for train, deterministic for eval) or
zero-padded to ``size`` samples.

Decoding goes through soundfile (libsndfile: WAV, FLAC, OGG, MP3) and falls back to torchcodec
(FFmpeg) for anything libsndfile cannot read. Resampling uses ``torchaudio.functional.resample``.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from torch.utils.data import Dataset

from .common import make_sample
from .limits import MAX_INPUT_SIZE, check_input_size
from .folders import (DEFAULT_EVAL_FRACTION, SkippingDataset, check_split, folder_labels, list_media_files,
                      split_indices)
from .webdataset_io import WebDatasetImages, is_shard_source, sample_label

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")
AUDIO_KEYS = ("wav", "flac", "mp3", "ogg")
DEFAULT_SAMPLE_RATE = 16000  # the rate used when a tokenizer says 0 (and spoken-digits' own rate)

_ACCEPTED_FORMS = (
    "accepted audio sources: 'spoken-digits' (built-in, needs espeak-ng); an existing directory of audio files "
    "(.wav .flac .mp3 .ogg, searched recursively); or WebDataset .tar shards with wav/flac/mp3/ogg entries"
)


# ---------------------------------------------------------------- decoding and cropping


def decode_audio(source: str | os.PathLike | bytes, max_values: int = MAX_INPUT_SIZE) -> tuple[torch.Tensor, int]:
    """File path or encoded bytes -> (float32 (channels, T), sample_rate); raises on unreadable/empty audio and on a
    file claiming more than ``max_values`` samples (before decoding it)."""
    _check_claimed_length(source, max_values)
    try:
        data, rate = sf.read(io.BytesIO(source) if isinstance(source, bytes) else str(source),
                             dtype="float32", always_2d=True)
        wave = torch.from_numpy(np.ascontiguousarray(data.T))
    except Exception as sf_err:  # libsndfile lacks some codecs (AAC, some MP3s): try FFmpeg
        try:
            from torchcodec.decoders import AudioDecoder  # optional: needs a system FFmpeg to import

            samples = AudioDecoder(source if isinstance(source, bytes) else str(source)).get_all_samples()
            wave, rate = samples.data.float(), int(samples.sample_rate)
        except Exception as tc_err:
            raise ValueError(f"cannot decode audio (soundfile: {sf_err}; torchcodec: {tc_err})") from None
    if wave.numel() == 0 or wave.shape[-1] == 0:
        raise ValueError("audio has no samples (zero length)")
    if not torch.isfinite(wave).all():
        raise ValueError("audio holds NaN/inf samples")
    return wave, int(rate)


def _check_claimed_length(source, max_values: int) -> None:
    """The header's frames x channels against ``max_values``: libsndfile's header, else FFmpeg's when it loads."""
    opened = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    try:
        info = sf.info(opened)
        claimed = (info.frames, info.channels)
    except Exception:  # not a libsndfile format: FFmpeg's header says its duration
        try:
            from torchcodec.decoders import AudioDecoder  # optional: needs a system FFmpeg to import

            meta = AudioDecoder(source if isinstance(source, bytes) else str(source)).metadata
            claimed = (int((meta.duration_seconds_from_header or 0) * (meta.sample_rate or 0)), meta.num_channels or 1)
        except Exception:  # the decoder below reports what is wrong with the file
            return
    check_input_size(claimed, max_values, "audio")


def to_mono(wave: torch.Tensor, rate: int, sample_rate: int) -> torch.Tensor:
    """(channels, T) at ``rate`` -> (1, T') at ``sample_rate``: channel mean, then resample; in [-1, 1]."""
    wave = wave.float().mean(0, keepdim=True)
    if rate != sample_rate:
        wave = AF.resample(wave, rate, sample_rate)
    return wave.clamp_(-1.0, 1.0)


def resample_many(waves: list[torch.Tensor], rate: int, sample_rate: int) -> list[torch.Tensor]:
    """to_mono for many clips of one rate: a single batched resample (the filter is built once).

    Zero padding at the end of shorter clips changes nothing: the resampler pads with zeros anyway.
    """
    waves = [w.float().mean(0) for w in waves]
    if rate == sample_rate or not waves:
        return [w[None].clamp(-1.0, 1.0) for w in waves]
    batch = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    out = AF.resample(batch, rate, sample_rate).clamp_(-1.0, 1.0)
    lengths = [-(-w.shape[-1] * sample_rate // rate) for w in waves]  # ceil, as torchaudio does
    return [out[i : i + 1, :n].clone() for i, n in enumerate(lengths)]


def load_audio(source: str | os.PathLike | bytes, sample_rate: int) -> torch.Tensor:
    """Decode + mono + resample: (1, T) float in [-1, 1] at ``sample_rate``."""
    wave, rate = decode_audio(source)
    return to_mono(wave, rate, sample_rate)


def window(wave: torch.Tensor, size: int, start: int) -> torch.Tensor:
    """(1, L) -> (1, size) = wave[:, start : start + size], zeros where it falls outside (start may be < 0)."""
    out = wave.new_zeros(wave.shape[0], size)
    lo, hi = max(start, 0), min(start + size, wave.shape[-1])
    if hi > lo:
        out[:, lo - start : hi - start] = wave[:, lo:hi]
    return out


def random_start(length: int, size: int) -> int:
    """Uniform random crop start (torch global RNG, so restored RNG states replay it); 0 when shorter."""
    return int(torch.randint(0, length - size + 1, (1,))) if length > size else 0


def loudest_start(wave: torch.Tensor, size: int) -> int:
    """Start of the ``size``-sample window with the most energy; shorter clips are centred (negative start)."""
    length = wave.shape[-1]
    if length <= size:
        return -((size - length) // 2)
    energy = torch.cat([wave.new_zeros(1), wave.double().pow(2).sum(0).cumsum(0)])
    sums = energy[size:] - energy[:-size]  # sums[s] = energy of wave[s : s + size]
    return int(sums.argmax())


def crop_audio(wave: torch.Tensor, size: int, train: bool) -> torch.Tensor:
    """Folder/shard crop: random for train, centred for eval; shorter clips are zero-padded at the end."""
    start = random_start(wave.shape[-1], size) if train else max(0, (wave.shape[-1] - size) // 2)
    return window(wave, size, start)


# ---------------------------------------------------------------- folder


class AudioFolderDataset(SkippingDataset):
    """Map-style dataset over a directory tree of .wav .flac .mp3 .ogg files (any case).

    Labels: index of the immediate subfolder in ``self.classes`` (sorted, over all files), -1 for files at the
    root. Training and held-out files are split by a hash of the relative path (``data.folders.split_indices``).
    Unreadable or empty files are warned about and replaced by the next index, and reported in ``skipped``.
    """

    kind = "audio file"

    def __init__(self, root: str, *, split: str = "train", size: int = 16000,
                 sample_rate: int = DEFAULT_SAMPLE_RATE, eval_fraction: float = DEFAULT_EVAL_FRACTION):
        self.root, self.train, self.size, self.sample_rate = root, split == "train", size, sample_rate
        files = list_media_files(root, AUDIO_EXTENSIONS)
        if not files:
            raise ValueError(f"no audio files found under {root!r} (extensions: {' '.join(AUDIO_EXTENSIONS)})")
        self.classes, labels = folder_labels(files)
        keep = split_indices(files, split, eval_fraction, readable=self._readable)
        self.files, self.labels = [files[i] for i in keep], [labels[i] for i in keep]

    def _readable(self, name: str) -> bool:
        """From the header: libsndfile's, else FFmpeg's (torchcodec) when it can load."""
        path = os.path.join(self.root, name)
        try:
            return sf.info(path).frames > 0
        except Exception:  # not something libsndfile reads (some MP3s, AAC): ask FFmpeg
            pass
        try:
            from torchcodec.decoders import AudioDecoder  # optional: needs a system FFmpeg to import
        except Exception:
            return os.path.getsize(path) > 0  # nothing to ask: do not count it out
        try:
            return AudioDecoder(path).metadata.duration_seconds_from_header not in (None, 0)
        except Exception:
            return False

    def __len__(self) -> int:
        return len(self.files)

    def item_path(self, i: int) -> str:
        return os.path.join(self.root, self.files[i])

    def read(self, i: int) -> torch.Tensor:
        """The whole file ``i`` as (1, T) at ``sample_rate`` (before cropping); raises on bad files."""
        return load_audio(self.item_path(i), self.sample_rate)

    def load_item(self, i: int) -> dict:
        return make_sample(crop_audio(self.read(i), self.size, self.train), self.labels[i], self.files[i])


# ---------------------------------------------------------------- webdataset


class WebDatasetAudio(WebDatasetImages):
    """Iterable dataset of audio samples from WebDataset shards (entries wav/flac/mp3/ogg).

    Shard assignment per process and worker, shuffling and skip-and-report are the image reader's
    (``WebDatasetImages``); only the decoding differs.
    """

    def __init__(self, source: str | list[str], *, split: str = "train", size: int = 16000,
                 sample_rate: int = DEFAULT_SAMPLE_RATE, seed: int = 0, process_index: int = 0,
                 num_processes: int = 1, shuffle_buffer: int = 1000, eval_fraction: float = DEFAULT_EVAL_FRACTION):
        super().__init__(source, split=split, size=size, channels=1, seed=seed, process_index=process_index,
                         num_processes=num_processes, shuffle_buffer=shuffle_buffer, eval_fraction=eval_fraction)
        self.sample_rate = sample_rate

    def decode(self, sample: dict) -> dict:
        key = next((k for k in AUDIO_KEYS if k in sample), None)
        if key is None:
            raise ValueError(f"no audio entry (have {sorted(k for k in sample if not k.startswith('__'))})")
        wave = load_audio(sample[key], self.sample_rate)
        return make_sample(crop_audio(wave, self.size, self.train), sample_label(sample), sample["__key__"])


# ---------------------------------------------------------------- spoken-digits (espeak-ng)

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# espeak-ng voice = language + "+" + variant; only voices built into espeak-ng (no mbrola).
SPOKEN_TRAIN_VOICES = ("en-us+m1", "en-us+f2", "en-gb+m3", "en-gb+f1", "en-gb-scotland+m2", "en-gb-x-rp+f3",
                       "en-029+m4", "en-gb-x-gbclan+f4", "en-us+m7", "en-gb-x-rp+m5")
SPOKEN_EVAL_VOICES = ("en-us-nyc+m6", "en-gb-x-gbcwmd+f5")  # held out: never in train
SPOKEN_SPEEDS = (120, 145, 170, 195, 220)  # words per minute
SPOKEN_PITCHES = (25, 40, 55, 70)  # 0..99
SPOKEN_SAMPLE_RATE = DEFAULT_SAMPLE_RATE
_SPOKEN_VERSION = 2  # bump when the recipe changes: the cache is then regenerated


def _spoken_recipe() -> dict:
    return {"version": _SPOKEN_VERSION, "words": DIGIT_WORDS, "voices": SPOKEN_TRAIN_VOICES + SPOKEN_EVAL_VOICES,
            "speeds": SPOKEN_SPEEDS, "pitches": SPOKEN_PITCHES, "sample_rate": SPOKEN_SAMPLE_RATE}


def cache_root() -> Path:
    """``$TOKGEN_CACHE`` if set, else ``~/.cache/tokgen``."""
    return Path(os.environ.get("TOKGEN_CACHE") or Path.home() / ".cache" / "tokgen")


def spoken_digits_dir() -> Path:
    return cache_root() / "spoken-digits"


def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError(
            "the built-in 'spoken-digits' dataset is synthesized with espeak-ng, which is not installed: "
            "install it (Debian/Ubuntu: `sudo apt-get install espeak-ng`; macOS: `brew install espeak-ng`; "
            "`make install` tries apt-get) or use an audio folder / WebDataset shards instead"
        )
    return exe


def _trim_silence(wave: torch.Tensor, rate: int, threshold: float = 0.02, margin_s: float = 0.01) -> torch.Tensor:
    """Drop leading/trailing samples quieter than ``threshold`` * peak, keeping a short margin."""
    loud = (wave.abs().amax(0) >= threshold * wave.abs().max()).nonzero()
    if loud.numel() == 0:
        return wave
    margin = int(margin_s * rate)
    return wave[:, max(0, int(loud[0]) - margin) : int(loud[-1]) + 1 + margin]


def _synthesize(exe: str, voice: str, speed: int, pitch: int, word: str) -> tuple[torch.Tensor, int]:
    """One espeak-ng utterance -> (float (channels, T), its sample rate)."""
    out = subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
                         capture_output=True, check=False, timeout=60)
    if out.returncode != 0 or not out.stdout:
        raise RuntimeError(f"espeak-ng -v {voice} failed: {out.stderr.decode(errors='replace').strip()}")
    return decode_audio(out.stdout)


def generate_spoken_digits(target: Path | None = None, workers: int = 4) -> Path:
    """Synthesize every (voice, speed, pitch, word) clip into ``target`` (default: the cache folder).

    Written into a temporary sibling folder and renamed into place, so a crash or a concurrent
    process never leaves a half-written dataset. Returns the folder.
    """
    exe = _espeak()
    target = Path(target or spoken_digits_dir())
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    jobs = [(voice, speed, pitch, label, word)
            for voice in SPOKEN_TRAIN_VOICES + SPOKEN_EVAL_VOICES for speed in SPOKEN_SPEEDS
            for pitch in SPOKEN_PITCHES for label, word in enumerate(DIGIT_WORDS)]
    tmp = Path(tempfile.mkdtemp(prefix=".spoken-digits.tmp-", dir=target.parent))
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:  # espeak-ng runs in subprocesses
            raw = list(pool.map(lambda job: _synthesize(exe, job[0], job[1], job[2], job[4]), jobs))
        raw = [(_trim_silence(wave.mean(0, keepdim=True), rate), rate) for wave, rate in raw]
        waves: list[torch.Tensor | None] = [None] * len(raw)
        for rate in {r for _, r in raw}:  # espeak-ng speaks at 22050 Hz: one batched resample per rate
            picked = [i for i, (_, r) in enumerate(raw) if r == rate]
            for i, wave in zip(picked, resample_many([raw[i][0] for i in picked], rate, SPOKEN_SAMPLE_RATE)):
                waves[i] = wave
        waves = [w * (0.9 / w.abs().max().clamp_min(1e-6)) for w in waves]  # peak 0.9
        clips = []
        for (voice, speed, pitch, label, word), wave in zip(jobs, waves):
            name = f"{voice.replace('+', '_')}/{word}_s{speed}_p{pitch}.wav"
            (tmp / name).parent.mkdir(exist_ok=True)
            buffer = io.BytesIO()  # one write per file: libsndfile's own flushes are slow on busy disks
            sf.write(buffer, wave[0].numpy(), SPOKEN_SAMPLE_RATE, subtype="PCM_16", format="WAV")
            (tmp / name).write_bytes(buffer.getvalue())
            clips.append({"file": name, "label": label, "word": word, "voice": voice, "speed": speed,
                          "pitch": pitch, "samples": int(wave.shape[-1])})
        manifest = {**_spoken_recipe(), "clips": clips,
                    "generated_seconds": round(time.perf_counter() - started, 2)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if _manifest_ok(target):  # another process finished first: keep theirs
            return target
        if target.exists():  # stale recipe: move it aside first (rename is atomic, rmtree is not)
            stale = Path(tempfile.mkdtemp(prefix=".spoken-digits.old-", dir=target.parent))
            try:
                os.rename(target, stale / "old")
            except FileNotFoundError:
                pass
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not _manifest_ok(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _manifest_ok(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    recipe = json.loads(json.dumps(_spoken_recipe()))  # tuples -> lists, as stored
    return manifest if all(manifest.get(k) == v for k, v in recipe.items()) else None


def spoken_digits_manifest() -> dict:
    """The cached dataset's manifest, generating the cache first when missing or stale."""
    folder = spoken_digits_dir()
    manifest = _manifest_ok(folder)
    if manifest is None:
        generate_spoken_digits(folder)
        manifest = _manifest_ok(folder)
        if manifest is None:
            raise RuntimeError(f"spoken-digits cache {folder} is unreadable after generation")
    return manifest


SPOKEN_WINDOWS = ("random", "loudest")  # how spoken-digits cuts its training windows (eval: always the loudest)


class SpokenDigitsDataset(Dataset):
    """Digits "zero".."nine" spoken by espeak-ng in many voices, speeds and pitches; labels 0..9.

    train: voices ``SPOKEN_TRAIN_VOICES``, random ``size``-sample window (global torch RNG; clips
    shorter than ``size`` land at a random offset in zeros), or with ``window="loudest"`` the window eval takes
    (what a prior should learn when its samples are to be whole words placed as the held-out items are). eval:
    the held-out voices ``SPOKEN_EVAL_VOICES``, the loudest ``size``-sample window (shorter clips centred):
    deterministic. Clips are 16 kHz and trimmed of silence (about 0.3-0.8 s); they are
    resampled once at construction if ``sample_rate`` differs. Generated on first use into
    ``$TOKGEN_CACHE/spoken-digits`` (default ``~/.cache/tokgen/spoken-digits``).
    """

    def __init__(self, *, split: str = "train", size: int = 8192, sample_rate: int = SPOKEN_SAMPLE_RATE,
                 window: str = "random"):
        check_split(split)
        if window not in SPOKEN_WINDOWS:
            raise ValueError(f"spoken-digits window must be one of {list(SPOKEN_WINDOWS)}, got {window!r}")
        self.train, self.size, self.sample_rate = split == "train", size, sample_rate
        self.random_window = self.train and window == "random"
        voices = set(SPOKEN_TRAIN_VOICES if self.train else SPOKEN_EVAL_VOICES)
        folder = spoken_digits_dir()
        self.clips = [c for c in spoken_digits_manifest()["clips"] if c["voice"] in voices]
        raw = []
        for clip in self.clips:
            data, rate = sf.read(folder / clip["file"], dtype="float32", always_2d=True)
            raw.append(torch.from_numpy(np.ascontiguousarray(data.T)))
            if rate != SPOKEN_SAMPLE_RATE:
                raise RuntimeError(f"{folder / clip['file']} is {rate} Hz, expected {SPOKEN_SAMPLE_RATE}: "
                                   f"delete {folder} to regenerate it")
        self.waves = resample_many(raw, SPOKEN_SAMPLE_RATE, sample_rate)
        self.labels = [c["label"] for c in self.clips]
        self.voices = sorted(voices)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        wave = self.waves[i]
        if self.random_window:
            length = wave.shape[-1]
            start = int(torch.randint(min(0, length - self.size), max(0, length - self.size) + 1, (1,)))
        else:
            start = loudest_start(wave, self.size)
        clip = self.clips[i]
        key = f"spoken-digits/{clip['voice']}/{clip['word']}_s{clip['speed']}_p{clip['pitch']}"
        return make_sample(window(wave, self.size, start), clip["label"], key)


# ---------------------------------------------------------------- entry point


def build_audio_dataset(source: str, *, split: str = "train", size: int = 16000,
                        sample_rate: int = DEFAULT_SAMPLE_RATE, seed: int = 0, process_index: int = 0,
                        num_processes: int = 1, eval_fraction: float = DEFAULT_EVAL_FRACTION, **options):
    """Audio dataset of sample dicts (x: (1, size) in [-1, 1] at ``sample_rate``) for any audio source
    (``eval_fraction``: the held-out share of a folder's files or a shard set's samples)."""
    check_split(split)
    if size <= 0 or sample_rate <= 0:
        raise ValueError(f"size and sample_rate must be positive, got {size} and {sample_rate}")
    common = dict(split=split, size=size, sample_rate=sample_rate)
    if source == "spoken-digits":
        return SpokenDigitsDataset(**common, **options)
    if os.path.isdir(source):
        return AudioFolderDataset(source, **common, eval_fraction=eval_fraction, **options)
    if is_shard_source(source):
        return WebDatasetAudio(source, **common, seed=seed, process_index=process_index,
                               num_processes=num_processes, eval_fraction=eval_fraction, **options)
    raise ValueError(f"unknown audio source {source!r}; {_ACCEPTED_FORMS}")
