"""Reconstruction metrics: SSIM against scikit-image's reference on real photos, video metrics per frame, and
``evaluate`` on a tiny video tokenizer (per-frame LPIPS, FD-VGG16 on per-frame features)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from stage1_tokenizer.evaluate import evaluate
from stage1_tokenizer.metrics import batch_metrics, psnr, ssim
from stage1_tokenizer.perceptual import PerceptualLoss, find_backbone

skimage_data = pytest.importorskip("skimage.data")
from skimage.metrics import structural_similarity  # noqa: E402
from skimage.transform import resize  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def small_photo(name: str, shape=(48, 64)) -> np.ndarray:
    """(H, W) or (H, W, 3) float64 in [0, 1]: a scikit-image photo shrunk to ``shape``."""
    photo = getattr(skimage_data, name)().astype(np.float64) / 255
    return resize(photo, shape, anti_aliasing=True)


def as_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W[, C]) -> (1, C, H, W) float32."""
    image = image[..., None] if image.ndim == 2 else image
    return torch.from_numpy(image).permute(2, 0, 1)[None].float()


@pytest.mark.parametrize("name", ["astronaut", "camera", "coffee", "moon"])
def test_ssim_matches_scikit_image(name):
    photo = small_photo(name)
    rng = np.random.default_rng(0)
    noisy = np.clip(photo + rng.normal(0, 0.08, photo.shape), 0, 1)
    shifted = np.roll(photo, 2, axis=1)  # a structural change, not only noise
    for other in (photo, noisy, shifted):
        reference = structural_similarity(photo, other, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False, data_range=1,
                                          channel_axis=-1 if photo.ndim == 3 else None)
        assert float(ssim(as_tensor(photo), as_tensor(other))) == pytest.approx(reference, abs=1e-3)


class Stub(torch.nn.Module):
    """A per-image 'perceptual' distance that is easy to check: mean absolute difference, (B,)."""

    def forward(self, x, y):
        return (x - y).abs().flatten(1).mean(1)


def test_video_metrics_are_per_frame_averages():
    g = torch.Generator().manual_seed(0)
    clips = torch.rand(2, 3, 4, 32, 32, generator=g)
    recon = (clips + 0.1 * torch.randn(clips.shape, generator=g)).clamp(0, 1)
    recon[:, :, 0] = clips[:, :, 0]  # a perfect first frame: PSNR per frame, not over the clip
    metrics = {k: float(v.sum()) for k, v in batch_metrics(clips, recon, "video", 16000, Stub()).items()}
    frames = [(recon[:, :, t], clips[:, :, t]) for t in range(4)]
    expected_psnr = torch.stack([psnr(r, c) for r, c in frames], 1).mean(1).sum()
    expected_ssim = torch.stack([ssim(r, c) for r, c in frames], 1).mean(1).sum()
    expected_lpips = torch.stack([Stub()(r, c) for r, c in frames], 1).mean(1).sum()
    assert metrics["psnr_db"] == pytest.approx(float(expected_psnr), rel=1e-5)
    assert metrics["ssim"] == pytest.approx(float(expected_ssim), rel=1e-5)
    assert metrics["lpips"] == pytest.approx(float(expected_lpips), rel=1e-5)
    assert "lpips" not in batch_metrics(clips, recon, "video", 16000, None)
    small = clips[..., :16, :16]
    assert "lpips" not in batch_metrics(small, small, "video", 16000, Stub())  # LPIPS needs 32x32


class TinyClips(Dataset):
    def __init__(self, n: int = 2):
        self.clips = torch.rand(n, 1, 2, 32, 32, generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.clips[i], "label": 0, "key": f"clip{i}", "skipped": []}


def test_evaluate_video_reports_per_frame_lpips_and_fd_vgg16(tiny):
    if find_backbone("vgg") is None or find_backbone("alex") is None:
        pytest.skip("the shared VGG16/AlexNet backbones are not here")
    tokenizer = tiny.vqvae(modality="video", factors=(2, 4, 4), codebook_size=16)
    metrics = evaluate(tokenizer, TinyClips(), batch_size=1, quiet=True, fd_vgg16=True)  # 2 batches
    for key in ("psnr_db", "ssim", "lpips", "fd_vgg16_frames", "codebook_usage"):
        assert key in metrics, key
    assert metrics["fd_vgg16_frames"] > 0 and "fid" not in metrics  # no Inception file named
    lpips = PerceptualLoss()
    with torch.no_grad():
        recon = tokenizer.decode_clamped(tokenizer.encode_levels(TinyClips().clips)).float()
        direct = float(batch_metrics(TinyClips().clips, recon, "video", 16000, lpips)["lpips"].mean())
    assert metrics["lpips"] == pytest.approx(direct, rel=1e-4)
    capped = evaluate(tokenizer, TinyClips(3), batch_size=2, quiet=True, lpips=False, fd_vgg16=True, distance_items=2)
    assert capped["distance_items"] == 2 and capped["num_samples"] == 3  # the distance saw the first 2 clips only
    assert capped["fd_vgg16_frames"] == pytest.approx(metrics["fd_vgg16_frames"], rel=1e-6)  # the same 2 clips
    assert "fd_vgg16_frames" not in evaluate(tokenizer, TinyClips(1), quiet=True, lpips=False, fd_vgg16=True)  # needs 2


class TinyWaves(Dataset):
    """Harmonic clips with a gliding pitch and a syllable-like envelope, 0.512 s at 16 kHz (long enough for STOI)."""

    def __init__(self, n: int = 3, samples: int = 8192, sample_rate: int = 16000):
        t = torch.arange(samples) / sample_rate
        pitch = 120 + 40 * torch.arange(n)[:, None] + 30 * t
        phase = 2 * torch.pi * torch.cumsum(pitch / sample_rate, dim=1)
        envelope = 0.5 + 0.5 * torch.sin(2 * torch.pi * 4 * t).abs()
        self.waves = (0.3 * envelope * sum(torch.sin(k * phase) / k for k in range(1, 6)))[:, None]

    def __len__(self) -> int:
        return len(self.waves)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.waves[i], "label": 0, "key": f"clip{i}", "skipped": []}


def test_evaluate_audio_reports_the_fields_metrics_and_bitrate(tiny):
    tokenizer = tiny.vqvae(modality="audio", factors=(16,), codebook_size=256)
    metrics = evaluate(tokenizer, TinyWaves(), batch_size=2, quiet=True)  # 2 batches
    for key in ("snr_db", "si_sdr_db", "stoi", "mel_distance", "mel_distance_multiscale", "codebook_usage"):
        assert math.isfinite(metrics[key]), key
    assert -1 <= metrics["stoi"] <= 1 and "visqol_mos" not in metrics  # ViSQOL only when asked
    assert metrics["bitrate_kbps"] == pytest.approx(8 * 8192 / 16 / 0.512 / 1000)  # 512 codes of 8 bits in 0.512 s
    assert "unscored_items" not in metrics
    short = TinyWaves(samples=2048)  # 0.128 s: too short for STOI, scored by the rest
    metrics = evaluate(tokenizer, short, batch_size=2, quiet=True)
    assert metrics["unscored_items"] == {"stoi": 3} and "stoi" not in metrics and math.isfinite(metrics["si_sdr_db"])
