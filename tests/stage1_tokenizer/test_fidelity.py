"""The distribution distances of ``stage1_tokenizer.fidelity`` on real photos (scikit-image's bundled ones):
FD-VGG16 is ~0 between a set and itself, grows with noise and blur and is larger for shuffled pixels than for
other real photos; the Frechet formula matches torch-fidelity's; the FID path refuses a wrong weights file in
one line and, with a stand-in file of the right layout, runs through torch-fidelity without a download.

VGG16 at 128x128 costs ~0.4 s an image on one core: sets of 6 photos, features computed once per set."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torchvision.transforms.functional import gaussian_blur

from pipelines.cli import main
from stage1_tokenizer import fidelity
from stage1_tokenizer.fidelity import (InceptionFeatures, VGGFeatures, frechet_distance, image_features,
                                       inception_metrics)

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
