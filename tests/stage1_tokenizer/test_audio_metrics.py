"""Audio metrics on known signals: SI-SDR at known SNRs, STOI and ViSQOL on clean, noisy and delayed speech,
the multi-scale mel distance, bitrate, FD-logmel."""
from __future__ import annotations

import math
import shutil
import subprocess

import pytest
import torch
import torchaudio

from data.audio import decode_audio
from stage1_tokenizer import audio_metrics as am

RATE = 16000


def speech_like(seconds: float, seed: int = 0, rate: int = RATE) -> torch.Tensor:
    """(1, T) voiced syllables: harmonics of a gliding pitch under two formants, 4 syllables a second with gaps."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * rate), dtype=torch.float64) / rate
    f0 = 110 + 60 * torch.rand((), generator=g, dtype=torch.float64) + 30 * torch.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / rate
    wave = torch.zeros_like(t)
    for k in range(1, 30):
        formants = torch.exp(-((k * f0 - 600) / 300) ** 2) + 0.5 * torch.exp(-((k * f0 - 1800) / 500) ** 2)
        wave += (formants + 0.02) / k * torch.sin(k * phase)
    syllables = 0.05 + torch.sin(math.pi * 4 * t).clamp(min=0) ** 2  # quiet gaps between syllables
    wave = wave * syllables
    return (0.5 * wave / wave.abs().max()).float().unsqueeze(0)


def espeak_speech(seconds: float) -> torch.Tensor:
    """(1, T) espeak-ng speech at 16 kHz (about 0.2 s to synthesize)."""
    out = subprocess.run(["espeak-ng", "-v", "en-us+m1", "-s", "160", "--stdout", "three seven nine four two"],
                         capture_output=True, check=True, timeout=60)
    wave, rate = decode_audio(out.stdout)
    wave = torchaudio.functional.resample(wave.mean(0, keepdim=True), rate, RATE)
    start = int((wave.abs()[0] > 0.02).nonzero()[0])  # from the first word, not the leading silence
    return wave[:, start:start + int(seconds * RATE)]


@pytest.fixture(scope="module", params=["espeak-ng", "synthetic"])
def speech(request) -> torch.Tensor:
    """(1, 1, 1.28 s) speech: real where espeak-ng is installed, speech-like harmonics in any case."""
    if request.param == "espeak-ng":
        if shutil.which("espeak-ng") is None:
            pytest.skip("espeak-ng is not installed")
        return espeak_speech(1.28).unsqueeze(0)
    return speech_like(1.28).unsqueeze(0)


def noise_like(x: torch.Tensor, snr_db: float, seed: int = 1, orthogonal: bool = False) -> torch.Tensor:
    """White noise at ``snr_db`` below x's power (per clip); ``orthogonal``: exactly uncorrelated with zero-mean x."""
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    s = x.double() - x.double().mean(-1, keepdim=True)
    n = n - n.mean(-1, keepdim=True)
    if orthogonal:
        n = n - (n * s).sum(-1, keepdim=True) / s.square().sum(-1, keepdim=True) * s
    n = n * (s.square().sum(-1, keepdim=True) / n.square().sum(-1, keepdim=True) / 10 ** (snr_db / 10)).sqrt()
    return n


# ---------------------------------------------------------------- SI-SDR

def test_si_sdr_identical_scaled_and_offset():
    x = speech_like(0.5).unsqueeze(0).repeat(2, 1, 1)
    assert (am.si_sdr(x, x) >= 60).all()
    y = x.double() + noise_like(x, 12.0)
    base = am.si_sdr(x, y)
    torch.testing.assert_close(am.si_sdr(x, 0.3 * y), base, rtol=0, atol=1e-6)  # gain
    torch.testing.assert_close(am.si_sdr(x, y + 0.1), base, rtol=0, atol=1e-6)  # DC offset: zero-mean


@pytest.mark.parametrize("snr_db", [-5.0, 0.0, 10.0, 30.0])
def test_si_sdr_is_the_snr_of_uncorrelated_noise(snr_db):
    x = speech_like(0.5, seed=2).unsqueeze(0).double()
    torch.testing.assert_close(am.si_sdr(x, x + noise_like(x, snr_db, orthogonal=True)),
                               torch.tensor([snr_db], dtype=torch.float64), rtol=0, atol=1e-6)


def test_si_sdr_of_equal_power_independent_noise_is_about_0_db():
    x = torch.randn(1, 1, 160000, generator=torch.Generator().manual_seed(3)) * 0.2
    assert abs(float(am.si_sdr(x, x.double() + noise_like(x, 0.0)))) < 0.5


def test_shapes_must_match():
    with pytest.raises(ValueError, match="differ"):
        am.si_sdr(torch.zeros(1, 1, 100), torch.zeros(1, 1, 99))


# ---------------------------------------------------------------- STOI

def test_stoi_clean_noisy_delayed(speech):
    clean = float(am.stoi(speech, speech, RATE))
    mild = float(am.stoi(speech, speech.double() + noise_like(speech, 10.0), RATE))
    heavy = float(am.stoi(speech, speech.double() + noise_like(speech, -10.0), RATE))
    delayed = float(am.stoi(speech, torch.roll(speech, int(0.1 * RATE), -1), RATE))  # 100 ms late
    assert clean > 0.99
    assert clean > mild > heavy and heavy < 0.7
    assert delayed < 0.6


def test_stoi_short_or_mostly_silent_clips_are_nan():
    short = speech_like(0.2).unsqueeze(0)  # < 30 STOI frames
    assert torch.isnan(am.stoi(short, short, RATE)).all()
    mostly_silent = torch.cat([short, torch.zeros(1, 1, RATE)], -1)  # the silent frames are dropped first
    assert torch.isnan(am.stoi(mostly_silent, mostly_silent, RATE)).all()
    ok = speech_like(1.0).unsqueeze(0)
    assert not torch.isnan(am.stoi(ok, ok, RATE)).any()


# ---------------------------------------------------------------- mel distance

def test_multiscale_mel_distance_zero_for_identical_and_grows_with_noise():
    x = torch.cat([speech_like(0.512, seed=s).unsqueeze(0) for s in range(2)])
    assert torch.equal(am.multiscale_mel_distance(x, x, RATE), torch.zeros(2, dtype=torch.float64))
    d = [am.multiscale_mel_distance(x, x.double() + noise_like(x, snr), RATE) for snr in (30.0, 10.0, -5.0)]
    assert ((d[0] > 0) & (d[0] < d[1]) & (d[1] < d[2])).all()


def test_multiscale_mel_distance_short_clips_use_the_scales_that_fit():
    x = speech_like(0.02).unsqueeze(0)  # 320 samples: windows 32..256
    y = x.double() + noise_like(x, 10.0)
    assert float(am.multiscale_mel_distance(x, y, RATE)) > 0
    with pytest.raises(ValueError, match="shorter than the smallest mel window"):
        am.multiscale_mel_distance(x[..., :16], y[..., :16], RATE)


# ---------------------------------------------------------------- bitrate

def test_bitrate_kbps_on_known_configs():
    assert am.bitrate_kbps([256], [(64,)], 8192, RATE) == pytest.approx(1.0)
    # two levels: 512 codes x 16 on top, 256 codes x 64 below
    assert am.bitrate_kbps([512, 256], [(16,), (64,)], 8192, RATE) == pytest.approx((9 * 16 + 8 * 64) / 512)
    with pytest.raises(ValueError, match="codebook sizes"):
        am.bitrate_kbps([256], [(64,), (16,)], 8192, RATE)


# ---------------------------------------------------------------- ViSQOL

def test_visqol_orders_clean_above_noisy(speech):
    pytest.importorskip("visqol")
    x = speech[..., :RATE]  # 1 s
    clean = float(am.visqol_mos(x, x, RATE))
    noisy = [float(am.visqol_mos(x, x.double() + noise_like(x, snr), RATE)) for snr in (15.0, 0.0)]
    assert clean > 4.5 and clean > noisy[0] > noisy[1]


def test_visqol_resamples_and_gives_nan_for_short_clips():
    pytest.importorskip("visqol")
    x = speech_like(0.5).unsqueeze(0)
    assert torch.isnan(am.visqol_mos(x, x, RATE)).all()  # 8000 < VISQOL_MIN_SAMPLES
    x24 = speech_like(0.7, rate=24000).unsqueeze(0)  # resampled to 16 kHz: 11200 samples
    assert float(am.visqol_mos(x24, x24, 24000)) > 4.5


def test_visqol_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(am, "visqol_lib", None)
    assert not am.visqol_available()
    with pytest.raises(ImportError, match=r"pip install tokgen\[visqol\]"):
        am.visqol_mos(torch.zeros(1, 1, RATE), torch.zeros(1, 1, RATE), RATE)


# ---------------------------------------------------------------- together, and FD-logmel

def test_reconstruction_metrics_per_item():
    x = torch.cat([speech_like(0.512, seed=s).unsqueeze(0) for s in range(3)])
    out = am.reconstruction_metrics(x, x.double() + noise_like(x, 10.0), RATE)
    assert set(out) == {"si_sdr_db", "stoi", "mel_distance_multiscale"}
    assert all(v.shape == (3,) and v.dtype == torch.float64 for v in out.values())
    torch.testing.assert_close(out["si_sdr_db"], torch.full((3,), 10.0, dtype=torch.float64), rtol=0, atol=0.3)


def test_audio_frechet_distance_self_and_noise():
    real = torch.cat([speech_like(0.25, seed=s).unsqueeze(0) for s in range(24)])
    assert am.audio_frechet_distance(real, real, RATE) < 1e-6
    fd = [am.audio_frechet_distance(real, real.double() + noise_like(real, snr), RATE) for snr in (20.0, 0.0)]
    assert 0 < fd[0] < fd[1]
