"""The field's audio metrics: SI-SDR, STOI, multi-scale mel distance and ViSQOL per clip; bitrate; FD-logmel.

The clip metrics take waves (B, 1, T) or (B, T) in [-1, 1] (reference first, as each metric's paper does) and
returns one value per clip as a float64 CPU tensor (B,), so an evaluator can average over batches. Clips too
short for STOI or ViSQOL get NaN (see each function): average them with ``nanmean`` and report the count.

Cost per 0.5 s clip at 16 kHz on one CPU thread (measured on a shared 2-core machine): SI-SDR < 0.1 ms,
multi-scale mel distance ~8 ms, STOI ~10 ms, so ~2 s for 100 clips; ViSQOL (needs >= 0.64 s) ~0.35 s per
1 s clip, ~35 s for 100 clips, so it runs only when asked.
The protocol (implementation, resampling, clip length, sample count): the audio part of BENCHMARKS.md.
"""
from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch
import torchaudio

from data.spectrogram import waves_2d
from stage1_tokenizer.audio_loss import multiscale_mel_per_item
from stage1_tokenizer.fidelity import audio_features, frechet_distance

try:  # the optional extra `pip install tokgen[visqol]`
    import visqol as visqol_lib
except ImportError:
    visqol_lib = None

VISQOL_MISSING = "ViSQOL is not installed: `pip install tokgen[visqol]` (the visqol-python package)"
VISQOL_SAMPLE_RATE = 16000  # ViSQOL's speech mode is defined at 16 kHz
# speech mode needs one 20-frame patch after its first 9 frames of 80 ms windows at a 20 ms hop:
# 1280 + 28 * 320 samples; shorter clips raise inside visqol-python (an empty patch list)
VISQOL_MIN_SAMPLES = 10240
# pystoi's sentinel for "fewer than 30 frames after removing the silent ones" (30 frames of 25.6 ms at
# 10 kHz, hop 12.8 ms: about 0.4 s of non-silent speech)
_STOI_TOO_SHORT = 1e-5


def visqol_available() -> bool:
    """Whether the optional visqol-python package imported."""
    return visqol_lib is not None


def _pair(reference: torch.Tensor, estimate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two wave batches of one shape -> float (B, T) each."""
    x, y = waves_2d(reference), waves_2d(estimate)
    if x.shape != y.shape:
        raise ValueError(f"reference {tuple(x.shape)} and estimate {tuple(y.shape)} differ")
    return x, y


def si_sdr(reference: torch.Tensor, estimate: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Scale-invariant SDR in dB (Le Roux et al. 2019, "SDR - half-baked or well done?"): (B,) float64.

    Both signals zero-mean; target = <s, s^> / |s|^2 s, SI-SDR = 10 log10(|target|^2 / |s^ - target|^2).
    Invariant to the estimate's gain and DC offset. ``eps`` regularises both ratios, so identical clips give
    a large finite value (~ 10 log10(|s|^2 / eps), >= 100 dB for audible clips) rather than inf.
    """
    s, e = (w.double().cpu() for w in _pair(reference, estimate))
    s, e = s - s.mean(1, keepdim=True), e - e.mean(1, keepdim=True)
    alpha = ((s * e).sum(1, keepdim=True) + eps) / (s.square().sum(1, keepdim=True) + eps)
    target = alpha * s
    return 10 * torch.log10((target.square().sum(1) + eps) / ((e - target).square().sum(1) + eps))


def stoi(reference: torch.Tensor, estimate: torch.Tensor, sample_rate: int, extended: bool = False) -> torch.Tensor:
    """Short-time objective intelligibility (Taal et al. 2011) per clip through pystoi: (B,) float64 in ~[0, 1].

    pystoi resamples to 10 kHz itself and drops the frames 40 dB below the loudest. A clip with fewer than
    30 frames left (about 0.4 s of non-silent speech) gets NaN, where pystoi would return 1e-5 with a
    warning. STOI was designed for utterances of several seconds: on 0.5 s clips it averages 1-10 windows of
    384 ms, so compare values only at one clip length. ``extended``: ESTOI (Jensen & Taal 2016).
    """
    from pystoi import stoi as pystoi_stoi  # imported here: it loads scipy's signal module, ~0.3 s

    x, y = (w.double().cpu().numpy() for w in _pair(reference, estimate))
    out = []
    for ref, est in zip(x, y):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the too-short warning: reported as NaN instead
            value = float(pystoi_stoi(ref, est, int(sample_rate), extended=extended))
        out.append(math.nan if value == _STOI_TOO_SHORT else value)
    return torch.tensor(out, dtype=torch.float64)


def multiscale_mel_distance(reference: torch.Tensor, estimate: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Mean absolute difference of log10 mel magnitudes, averaged over the scales of ``MEL_SCALES``: (B,) float64.

    DAC's mel distance: windows 32..2048 with 5..320 mel bands (Slaney), hop = window // 4, Hann window,
    magnitude clamped at 1e-5 before log10, L1 averaged over bands and frames. DAC's loss *sums* its 7 scales;
    this averages them (x7 to compare), over the scales whose window fits the clip. Units: log10 magnitude
    (x20 for dB). Zero for identical clips. Computed in fp32 on the inputs' device, also under autocast: the
    training loss ``audio_loss.MultiScaleMelLoss`` is the same function.
    """
    x, y = _pair(reference, estimate)
    return multiscale_mel_per_item(x, y, sample_rate).double().cpu()


@functools.lru_cache(maxsize=1)
def _visqol_api():
    api = visqol_lib.VisqolApi()
    # the polynomial MOS mapping, fixed: auto mode would switch to the lattice model wherever ai-edge-litert
    # happens to be installed, and the same clips would score 1-2 MOS apart between machines
    api.create(mode="speech", use_lattice_model=False)
    return api


def visqol_mos(reference: torch.Tensor, estimate: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """ViSQOL v3 MOS-LQO per clip (Chinen et al. 2020) through visqol-python, speech mode: (B,) float64 in [1, 5].

    Clips are resampled to 16 kHz (speech mode's rate; torchaudio's windowed sinc); the MOS comes from the
    polynomial mapping scaled to 5 (``use_lattice_model=False``), so it is not comparable with the C++
    tool's lattice-model default. Clips under 0.64 s at 16 kHz (``VISQOL_MIN_SAMPLES``) get NaN: ViSQOL
    needs at least one 400 ms patch after its first 180 ms. Costs ~0.35 s per 1 s clip on a CPU core.
    Raises ImportError with the install line when the optional extra is missing.
    """
    if visqol_lib is None:
        raise ImportError(VISQOL_MISSING)
    x, y = _pair(reference, estimate)
    if int(sample_rate) != VISQOL_SAMPLE_RATE:
        x, y = (torchaudio.functional.resample(w.cpu(), int(sample_rate), VISQOL_SAMPLE_RATE) for w in (x, y))
    if x.shape[-1] < VISQOL_MIN_SAMPLES:
        return torch.full((x.shape[0],), math.nan, dtype=torch.float64)
    api = _visqol_api()
    x, y = (w.double().cpu().numpy() for w in (x, y))
    scores = [api.measure_from_arrays(np.ascontiguousarray(r), np.ascontiguousarray(e), VISQOL_SAMPLE_RATE).moslqo
              for r, e in zip(x, y)]
    return torch.tensor(scores, dtype=torch.float64)


def bitrate_kbps(codebook_sizes: list[int], code_shapes: list[tuple[int, ...]], input_samples: int,
                 sample_rate: int) -> float:
    """Bits of one clip's codes per second, in kbit/s: sum over levels of log2(K) x codes, / clip duration.

    ``codebook_sizes`` and ``code_shapes`` per level, as a tokenizer's ``codebook_sizes`` and
    ``code_shapes(input_shape)`` give them (a level with several codebooks counts each in its shape).
    One 256-code book, 64 codes per 8192-sample clip at 16 kHz: 8 x 64 bits / 0.512 s = 1.0 kbps.
    """
    if len(codebook_sizes) != len(code_shapes):
        raise ValueError(f"{len(codebook_sizes)} codebook sizes for {len(code_shapes)} code shapes")
    if input_samples <= 0 or sample_rate <= 0:
        raise ValueError(f"input_samples ({input_samples}) and sample_rate ({sample_rate}) must be positive")
    bits = sum(math.prod(shape) * math.log2(k) for k, shape in zip(codebook_sizes, code_shapes))
    return bits / (input_samples / sample_rate) / 1000


def reconstruction_metrics(reference: torch.Tensor, estimate: torch.Tensor, sample_rate: int,
                           visqol: bool = False) -> dict[str, torch.Tensor]:
    """Per-clip si_sdr_db, stoi, mel_distance_multiscale (and visqol_mos when ``visqol``), each (B,) float64.

    ``visqol`` is opt-in: it costs ~0.35 s a clip, against ~10 ms for the rest together.
    """
    out = {"si_sdr_db": si_sdr(reference, estimate),
           "stoi": stoi(reference, estimate, sample_rate),
           "mel_distance_multiscale": multiscale_mel_distance(reference, estimate, sample_rate)}
    if visqol:
        out["visqol_mos"] = visqol_mos(reference, estimate, sample_rate)
    return out


def audio_frechet_distance(real: torch.Tensor, generated: torch.Tensor, sample_rate: int) -> float:
    """FD-logmel: the Frechet distance between the clips' log-mel statistics (``fidelity.audio_features``).

    Each clip (N, 1, T) -> mean and std over time of 64 log-mel bands (dB), 128 values; not FAD (no VGGish
    embedding). Needs >= 2 clips a set; with fewer clips than 128 the covariances are singular and the
    value is biased upwards, so compare only at one set size.
    """
    return frechet_distance(audio_features(real, sample_rate), audio_features(generated, sample_rate))
