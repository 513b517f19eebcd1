"""The distribution distances of ``stage1_tokenizer.fidelity`` on real photos (scikit-image's bundled ones):
FD-VGG16 is ~0 between a set and itself, grows with noise and blur and is larger for shuffled pixels than for
other real photos; the Frechet formula matches torch-fidelity's; the FID path refuses a wrong weights file in
one line and, with a stand-in file of the right layout, runs through torch-fidelity without a download. FVD:
a wrong I3D file is refused in one line and never opened; a TorchScript stand-in with StyleGAN-V's call and the
I3D's arithmetic in time runs the FVD path of both commands; clips under 9 frames are refused.

VGG16 at 128x128 costs ~0.4 s an image on one core: sets of 6 photos, features computed once per set."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torchvision.transforms.functional import gaussian_blur

from data.video import MovingDigitsDataset
from pipelines.cli import main
from pipelines.pipeline import TokgenPipeline
from stage1_tokenizer import fidelity
from stage1_tokenizer.fidelity import (InceptionFeatures, VGGFeatures, frechet_distance, image_features,
                                       inception_metrics)
from stage1_tokenizer.perceptual import find_backbone

skimage_data = pytest.importorskip("skimage.data")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")

pytestmark = pytest.mark.usefixtures("one_thread")


def crops(corner: str, size: int = 64) -> torch.Tensor:
    """(6, 3, size, size) in [0, 1]: one corner of each photo, shrunk to 1.5 x size first (whole objects)."""
    out = []
    for name in PHOTOS:
        photo = torch.from_numpy(getattr(skimage_data, name)()[..., :3].copy()).permute(2, 0, 1).float() / 255
        side = size * 3 // 2
        photo = torch.nn.functional.interpolate(photo[None], size=(side, side), mode="bilinear", antialias=True)[0]
        out.append(photo[:, :size, :size] if corner == "top_left" else photo[:, -size:, -size:])
    return torch.stack(out).clamp(0, 1)


def shuffle_pixels(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The same pixels in random places (one permutation per image, shared by its channels)."""
    g = torch.Generator().manual_seed(seed)
    flat = images.flatten(2)
    order = torch.stack([torch.randperm(flat.shape[-1], generator=g) for _ in images])
    return flat.gather(2, order[:, None].expand_as(flat)).view_as(images)


@pytest.fixture(scope="module")
def vgg() -> VGGFeatures:
    try:
        return VGGFeatures.from_shared_weights()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return crops("top_left")


@pytest.fixture(scope="module")
def photo_features(vgg, photos) -> torch.Tensor:
    return image_features(vgg, photos)


def test_fd_vgg16_is_zero_for_a_set_and_itself_and_grows_with_noise_and_blur(vgg, photos, photo_features):
    assert frechet_distance(photo_features, photo_features) < 1e-6 * photo_features.var(0).sum()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(photos.shape, generator=g)
    noisy = [frechet_distance(photo_features, image_features(vgg, (photos + s * noise).clamp(0, 1)))
             for s in (0.03, 0.1, 0.3)]
    blurred = [frechet_distance(photo_features, image_features(vgg, gaussian_blur(photos, 2 * int(3 * s) + 1, s)))
               for s in (0.7, 1.5, 3.0)]
    assert 0 < noisy[0] < noisy[1] < noisy[2], noisy
    assert 0 < blurred[0] < blurred[1] < blurred[2], blurred


def test_fd_vgg16_is_larger_for_shuffled_pixels_than_for_other_real_photos(vgg, photo_features):
    others = crops("bottom_right")
    real = frechet_distance(photo_features, image_features(vgg, others))
    shuffled = frechet_distance(photo_features, image_features(vgg, shuffle_pixels(others)))
    assert shuffled > 1.5 * real, (real, shuffled)


def test_frechet_distance_matches_torch_fidelity():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(40, 6, generator=g, dtype=torch.float64)
    b = torch.randn(30, 6, generator=g, dtype=torch.float64) * 1.5 + 0.3
    reference = fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b), False)
    assert frechet_distance(a, b) == pytest.approx(reference["frechet_inception_distance"], rel=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], b)


# ---- FID through torch-fidelity ---------------------------------------------------------------------
@pytest.fixture
def no_download(monkeypatch):
    """torch-fidelity downloads when given no file: make that an error here."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch-fidelity tried to download the Inception weights")
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", refuse)


def test_evaluate_tokenizer_refuses_a_wrong_fid_weights_file(tmp_path, capsys, monkeypatch, no_download):
    monkeypatch.delenv("TOKGEN_DEBUG", raising=False)
    monkeypatch.setenv("TQDM_MININTERVAL", "20")  # cli.main would set it for the rest of the session
    wrong = tmp_path / fidelity.INCEPTION_FILE  # the right name does not make it the right file
    wrong.write_bytes(np.random.default_rng(0).bytes(4096))
    args = ["evaluate-tokenizer", str(tmp_path / "no_run"), "--data", "digits", "--out", str(tmp_path / "e")]
    assert main([*args, "--fid-weights", str(wrong)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not the standard Inception file" in err, err
    assert fidelity.INCEPTION_SHA256 in err and fidelity.INCEPTION_URL in err
    monkeypatch.setenv(fidelity.FID_WEIGHTS_ENV, str(wrong))  # the same from the environment
    assert main(args) == 2
    assert "not the standard Inception file" in capsys.readouterr().err
    assert main([*args, "--fid-weights", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth: no such file" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()  # refused before any work
    with pytest.raises(ValueError, match="sha256"):
        InceptionFeatures(wrong)


def test_fid_kid_is_through_torch_fidelity_from_a_checked_local_file(tmp_path, monkeypatch, no_download, photos):
    # A randomly initialised Inception in the standard file's layout, accepted by its digest for this test:
    # it runs the whole path (check, torch-fidelity's loader and network, FID/KID/IS) offline.
    with monkeypatch.context() as building:
        building.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        building.setattr(tf_inception.torch, "load", lambda *args, **kwargs: {})
        torch.manual_seed(0)
        stand_in = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="x")
    path = tmp_path / "stand_in.pth"
    torch.save(stand_in.state_dict(), path)
    monkeypatch.setattr(fidelity, "INCEPTION_SHA256", fidelity.sha256_of(path))

    pool, logits = InceptionFeatures(path)(photos[:2])  # Inception costs ~0.5 s an image on one core
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008) and pool.dtype == torch.float64
    # the formulas on 256 of the 2048 values: FID's general eigvals of a 2048x2048 matrix take ~10 s on a CPU
    pool = pool[:, :256]
    metrics = inception_metrics(pool, pool, logits)
    assert set(metrics) == {"fid", "kid", "kid_std", "inception_score", "inception_score_std"}
    # random weights give tiny features (std ~1e-7): a set and itself is ~0 relative to their spread
    assert abs(metrics["fid"]) < 1e-3 * pool.var(0).sum() and abs(metrics["kid"]) < 1e-12
    assert metrics["inception_score"] == pytest.approx(1.0)  # 2 splits of one image each
    assert metrics["inception_score"] >= 1.0


# ---- FVD: StyleGAN-V's TorchScript I3D, here a stand-in of the same call and arithmetic in time ----------------
class StandInI3D(torch.nn.Module):
    """StyleGAN-V's detector call ``forward(x, rescale, resize, return_features)`` with the I3D's arithmetic in
    time: [0, 255] -> [-1, 1], frames resized to 224x224, space pooled to 7x7, time halved three times with
    ceil (TensorFlow "SAME"), a last average pool over 2 steps (fails below 9 frames, as the real one does),
    then a fixed random projection of the (3, 7, 7) map to 400 features (B, 400)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("projection", torch.randn(3 * 7 * 7, 400, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if rescale:
            x = x / 127.5 - 1
        if resize:
            x = torch.nn.functional.interpolate(x, size=[x.shape[2], 224, 224], mode="trilinear", align_corners=False)
        x = torch.nn.functional.avg_pool3d(x, kernel_size=[1, 32, 32])
        for _ in range(3):
            x = torch.nn.functional.max_pool3d(x, kernel_size=[2, 1, 1], stride=[2, 1, 1], ceil_mode=True)
        x = torch.nn.functional.avg_pool3d(x, kernel_size=[2, 1, 1], stride=[1, 1, 1]).mean(2)
        logits = x.flatten(1) @ self.projection
        return logits if return_features else logits.softmax(1)


@pytest.fixture
def i3d_file(tmp_path, monkeypatch):
    """The stand-in saved as a TorchScript file, accepted by its digest for this test."""
    path = tmp_path / "stand_in_i3d.pt"
    torch.jit.script(StandInI3D()).save(str(path))
    monkeypatch.setattr(fidelity, "I3D_SHA256", fidelity.sha256_of(path))
    return path


@pytest.fixture
def jit_loads(monkeypatch):
    """The paths torch.jit.load opened during the test (loading still happens)."""
    opened, load = [], torch.jit.load

    def spy(path, *args, **kwargs):
        opened.append(str(path))
        return load(path, *args, **kwargs)
    monkeypatch.setattr(fidelity.torch.jit, "load", spy)
    return opened


def moving_clips(n: int, frames: int = 9, size: int = 32) -> torch.Tensor:
    """(n, 1, frames, size, size) held-out moving digits in [0, 1]."""
    data = MovingDigitsDataset(split="eval", size=size, frames=frames, max_digits=1)
    return torch.stack([data[i]["x"] for i in range(n)])


def test_fvd_refuses_a_wrong_i3d_file_before_loading_it(tmp_path, capsys, monkeypatch, jit_loads):
    monkeypatch.delenv("TOKGEN_DEBUG", raising=False)
    monkeypatch.delenv(fidelity.FVD_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TQDM_MININTERVAL", "20")
    # A working TorchScript file under the right name, but not the published one: it must never be opened.
    wrong = tmp_path / fidelity.I3D_FILE
    torch.jit.script(StandInI3D()).save(str(wrong))
    for command in ("evaluate-tokenizer", "evaluate-samples"):
        args = [command, str(tmp_path / "no_model"), "--data", "moving-digits", "--out", str(tmp_path / "e")]
        assert main([*args, "--fvd-weights", str(wrong)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "not the standard I3D file i3d_torchscript.pt" in err, err
        assert fidelity.I3D_SHA256 in err and fidelity.I3D_URL in err
        monkeypatch.setenv(fidelity.FVD_WEIGHTS_ENV, str(wrong))  # the same from the environment
        assert main(args) == 2
        assert "not the standard I3D file" in capsys.readouterr().err
        monkeypatch.delenv(fidelity.FVD_WEIGHTS_ENV)
        assert main([*args, "--fvd-weights", str(tmp_path / "missing.pt")]) == 2
        assert "missing.pt: no such file" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()  # refused before any work
    with pytest.raises(ValueError, match="sha256"):
        fidelity.I3DFeatures(wrong)
    assert jit_loads == []


def test_fvd_through_the_stand_in_i3d(i3d_file, jit_loads):
    i3d = fidelity.I3DFeatures(i3d_file)
    assert jit_loads == [str(i3d_file)]  # opened once its digest matched
    clips = moving_clips(12)
    features = fidelity.i3d_features(i3d, clips, batch_size=5)
    assert features.shape == (12, 400) and features.dtype == torch.float64
    # StyleGAN-V's call: 3 channels of uint8 levels as floats, the detector rescales and resizes
    levels = (clips * 255).round().expand(-1, 3, -1, -1, -1)
    direct = i3d.net(levels, rescale=True, resize=True, return_features=True).double()
    # batches of 5 and of 12 can take different fp32 kernels (they do on an AMD EPYC): equal up to fp32 rounding
    assert torch.allclose(features, direct, rtol=1e-5, atol=1e-4)
    same = frechet_distance(features, features)
    brighter = frechet_distance(features, fidelity.i3d_features(i3d, (clips + 0.2).clamp(0, 1)))
    shifted = frechet_distance(features, fidelity.i3d_features(i3d, clips.roll(8, dims=-1)))
    assert same < 1e-9 * features.var(0).sum() and brighter > 0.01 * features.var(0).sum() and shifted > 0
    paired = fidelity.PairedFeatures("video", i3d=i3d)
    paired.update(clips[:6], clips[:6])
    paired.update(clips[6:], (clips[6:] + 0.2).clamp(0, 1))
    metrics = paired.metrics()
    assert set(metrics) == {"fvd", "fvd_frames"} and metrics["fvd_frames"] == 9 and metrics["fvd"] > 0


def test_fvd_refuses_clips_shorter_than_the_i3d_takes(i3d_file):
    i3d = fidelity.I3DFeatures(i3d_file)
    assert fidelity.FVD_MIN_FRAMES == 9
    with pytest.raises(ValueError, match="at least 9 frames.*these have 8"):
        i3d(torch.rand(2, 1, 8, 16, 16))
    # the I3D's strides in time: 9 frames leave the last pool its 2 steps, 8 do not
    assert i3d.net(torch.zeros(1, 3, 9, 16, 16), rescale=True, resize=True, return_features=True).shape == (1, 400)
    with pytest.raises(RuntimeError):
        i3d.net(torch.zeros(1, 3, 8, 16, 16), rescale=True, resize=True, return_features=True)


def _video_tokenizer(folder, tiny, frames: int | None = None):
    """A tiny video VQ-VAE saved in folder/model; with ``frames``, beside a run config of that clip length."""
    tiny.vqvae(modality="video", factors=(2, 4, 4), codebook_size=16).save_pretrained(folder / "model")
    if frames is not None:
        (folder / "config.json").write_text(json.dumps({"data": "moving-digits", "size": 16, "frames": frames,
                                                        "model": {"modality": "video"}}))
    return folder / "model"


def test_evaluate_tokenizer_reports_fvd_of_video_reconstructions(tmp_path, tiny, i3d_file, capsys, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    model = _video_tokenizer(tmp_path / "run", tiny)
    args = ["evaluate-tokenizer", str(model), "--data", "moving-digits", "--size", "16", "--limit", "4",
            "--no-lpips", "--no-fd-vgg16", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "e"), "--fvd-weights", str(i3d_file)]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["fvd"] > 0 and metrics["fvd_frames"] == 16 and metrics["distance_items"] == 4
    printed = capsys.readouterr()
    assert "FVD" in printed.out and "FVD not computed" not in printed.err
    assert main([*args, "--out", str(tmp_path / "e2")]) == 0  # without the file: no FVD, and where to get it
    assert "fvd" not in json.loads((tmp_path / "e2" / "metrics.json").read_text())
    hint = capsys.readouterr().err
    assert f"FVD not computed: download {fidelity.I3D_URL}" in hint and "--fvd-weights" in hint


def test_evaluate_tokenizer_refuses_fvd_on_short_clips(tmp_path, tiny, i3d_file, capsys, monkeypatch):
    monkeypatch.delenv("TOKGEN_DEBUG", raising=False)
    model = _video_tokenizer(tmp_path / "run", tiny, frames=8)
    args = ["evaluate-tokenizer", str(model), "--data", "moving-digits", "--out", str(tmp_path / "e")]
    assert main([*args, "--fvd-weights", str(i3d_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "FVD needs clips of at least 9 frames" in err and "have 8" in err, err
    assert not (tmp_path / "e").exists()
    tokenizer = tiny.vqvae(modality="video", factors=(2, 4, 4), codebook_size=16)  # the same for samples of 8
    TokgenPipeline(tokenizer, [tiny.transformer(None, grid=(4, 4, 4), vocab=16)], (1, 8, 16, 16)).save_pretrained(
        tmp_path / "pipe")
    assert main(["evaluate-samples", str(tmp_path / "pipe"), "--data", "moving-digits", "--out", str(tmp_path / "e"),
                 "--fvd-weights", str(i3d_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "FVD needs clips of at least 9 frames" in err and "have 8" in err, err
    assert not (tmp_path / "e").exists()


@pytest.mark.skipif(find_backbone("vgg") is None or find_backbone("alex") is None,
                    reason="evaluate-samples needs the shared VGG16/AlexNet backbones")
def test_evaluate_samples_reports_fvd_of_a_video_pipeline(tmp_path, tiny, i3d_file, monkeypatch, capsys):
    monkeypatch.setattr(fidelity, "FEATURE_SIZE", 32)  # VGG16 features 16x cheaper, the same code path
    monkeypatch.setenv("TQDM_DISABLE", "1")
    tokenizer = tiny.vqvae(modality="video", factors=(2, 4, 4), codebook_size=16)
    TokgenPipeline(tokenizer, [tiny.transformer(None, grid=(5, 4, 4), vocab=16)], (1, 10, 16, 16)).save_pretrained(
        tmp_path / "pipe")
    out = tmp_path / "es"
    assert main(["evaluate-samples", str(tmp_path / "pipe"), "--data", "moving-digits", "--num", "4", "--out",
                 str(out), "--fvd-weights", str(i3d_file), "--num-train", "8", "--num-real", "6", "--pairs", "6",
                 "--closest", "2", "--device", "cpu"]) == 0
    d = json.loads((out / "metrics.json").read_text())["distance_to_real"]
    assert d["fvd"] > 0 and d["fvd_train_vs_held_out"] > 0 and d["fvd_frames"] == 10 and d["fd_vgg16_frames"] > 0
    assert "FVD" in capsys.readouterr().out
