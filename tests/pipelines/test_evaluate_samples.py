"""tokgen evaluate-samples on a tiny random pipeline and the built-in digits; the memorization check on a copy."""
from __future__ import annotations

import json

import pytest
import torch

from pipelines import evaluate_samples as ES
from pipelines.cli import main
from stage1_tokenizer.perceptual import find_backbone

pytestmark = pytest.mark.usefixtures("quiet_cli")
needs_vgg = pytest.mark.skipif(find_backbone("vgg") is None or find_backbone("alex") is None,
                               reason="the shared VGG16/AlexNet backbones are not here")

FAST = ["--num-train", "20", "--num-real", "10", "--pairs", "20", "--judge-steps", "5", "--closest", "4",
        "--device", "cpu"]


@pytest.fixture(autouse=True)
def _small_features(monkeypatch):
    """VGG16 at 32x32 instead of 128x128: 16x cheaper, the same code path."""
    monkeypatch.setattr("stage1_tokenizer.fidelity.FEATURE_SIZE", 32)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory, tiny) -> dict:
    root = tmp_path_factory.mktemp("pipes")
    out = {}
    for name, classes in (("cond", 10), ("uncond", 0)):
        tiny.pipeline(1, num_classes=classes, size=16).save_pretrained(root / name)
        out[name] = root / name
    return out


@needs_vgg
def test_cli_writes_metrics_and_pictures(pipes, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate-samples", str(pipes["cond"]), "--data", "digits", "--num", "10", "--out", str(out),
                 "--seed", "3", "--temperature", "0.9", "--judges", "2", "--judge-seed", "7", "--json", *FAST]) == 0
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert printed == metrics
    s = metrics["sampling"]
    assert (s["num_samples"], s["seed"], s["temperature"], s["guidance"], s["batch_size"]) == (10, 3, 0.9, 1.0, 64)
    d = metrics["distance_to_real"]
    assert d["fd_vgg16"] > 0 and d["fd_vgg16_train_vs_held_out"] >= 0 and d["num_held_out"] == 10
    j = metrics["judge"]
    assert 0 <= j["sample_accuracy"] <= 1 and 0 <= j["real_accuracy"] <= 1 and j["num_samples"] == 10
    assert (j["num_judges"], j["seed"], j["steps"]) == (2, 7, 5)  # the judge's seed is its own, not the draws'
    assert list(j["per_class_sample_accuracy"]) == [str(c) for c in range(10)]  # one sample per class
    v = metrics["diversity"]
    assert v["lpips_samples"] > 0 and v["feature_distance_samples"] > 0 and v["num_pairs"] == 20
    assert 0 < v["distinct_codes_top_level"] <= v["distinct_codes_all_levels"] <= 1
    m = metrics["memorization"]
    assert m["num_train_compared"] == 20 and m["num_train_cap"] == 20 and len(m["closest"]) == 4
    assert [c["distance"] for c in m["closest"]] == sorted(c["distance"] for c in m["closest"])
    assert 0 <= m["possible_copies"] <= 1 and m["samples_nearest_train"]["median"] > 0
    assert "only 10 held-out items" in m["note"]  # the threshold is about their minimum: said so
    for picture in ("samples.png", "closest_pairs.png"):
        assert (out / picture).stat().st_size > 0 and picture in metrics["pictures"]
    assert (out / "codes.npz").is_file() and (out / "labels.npy").is_file()


@needs_vgg
def test_unconditional_pipeline_has_no_judge(pipes, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate-samples", str(pipes["uncond"]), "--data", "digits", "--num", "4", "--out", str(out),
                 *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "judge" not in metrics and metrics["diversity"]["num_pairs"] == 6  # all pairs of 4
    line = capsys.readouterr().out
    assert "4 samples: fd_vgg16" in line and "possible copies" in line


@needs_vgg
def test_top_k_reaches_the_sampler(pipes, tmp_path):
    """``--top-k 1`` draws the most likely code every time: four unconditional samples are one sample."""
    out = tmp_path / "eval"
    assert main(["evaluate-samples", str(pipes["uncond"]), "--data", "digits", "--num", "4", "--out", str(out),
                 "--top-k", "1", *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["sampling"]["top_k"], metrics["sampling"]["top_p"]) == (1, None)
    assert metrics["diversity"]["distinct_codes_all_levels"] == 0.25


def test_memorization_flags_a_copy_of_a_training_item():
    g = torch.Generator().manual_seed(0)
    train, held_out = torch.randn(200, 64, generator=g), torch.randn(100, 64, generator=g)
    samples = torch.randn(12, 64, generator=g)
    samples[5] = train[17] * 3.0  # a copy (features are compared after normalising their length)
    mem = ES.memorization(samples, train, held_out)
    assert mem.copy.tolist() == [i == 5 for i in range(12)]
    assert int(mem.index[5]) == 17 and float(mem.distance[5]) == pytest.approx(0, abs=1e-6)
    assert mem.closest(3)[0] == 5 and mem.threshold > 0
    summary = mem.to_dict(num_train=200, k=3)
    assert summary["num_possible_copies"] == 1 and summary["closest"][0] == {"sample": 5, "train_item": 17,
                                                                             "distance": pytest.approx(0, abs=1e-6)}
    assert summary["held_out_nearest_train"]["p1"] == pytest.approx(mem.threshold) and "note" not in summary


def test_pairs_and_distinct_codes():
    assert ES.random_pairs(4, 10, 0).tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    pairs = ES.random_pairs(50, 30, 0)
    assert pairs.shape == (30, 2) and bool((pairs[:, 0] != pairs[:, 1]).all())
    top = torch.tensor([[[1, 2]], [[1, 2]], [[3, 4]], [[1, 2]]])
    bottom = torch.tensor([[0], [1], [0], [0]])
    assert ES.distinct_share([top, bottom]) == {"distinct_codes_top_level": 0.5, "distinct_codes_all_levels": 0.75}
    assert ES.sample_labels(type("P", (), {"num_classes": 3})(), 7).tolist() == [0, 0, 0, 1, 1, 2, 2]


def test_audio_diversity_uses_features_only():
    waves = torch.randn(4, 1, 2048, generator=torch.Generator().manual_seed(1)) * 0.1
    space = ES.FeatureSpace("audio", 16000, None)
    feats = space(waves)
    assert feats.shape == (4, 128)
    out = ES.diversity(waves, waves, (feats, feats), [torch.zeros(4, 3, dtype=torch.long)], "audio", 10, 0, "cpu")
    assert "lpips_samples" not in out and out["feature_distance_samples"] > 0
    assert out["distinct_codes_top_level"] == 0.25


@pytest.mark.parametrize("extra, message", [
    (["--num", "0"], "--num must be >= 2"),
    (["--num-train", "1"], "--num-train must be >= 2"),
    (["--judges", "0"], "--judges must be >= 1"),
    (["--top-p", "0"], "top_p must lie in (0, 1]"),
    (["--data", "spoken-digits"], "spoken-digits is audio data, but this pipeline makes image"),
    (["--guidance", "2"], "for class-conditional pipelines"),
])
def test_bad_input_is_one_clear_line(pipes, tmp_path, capsys, extra, message):
    args = ["evaluate-samples", str(pipes["uncond"]), "--data", "digits", "--out", str(tmp_path / "e"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@needs_vgg
def test_video_features_and_lpips_per_frame():
    from stage1_tokenizer.perceptual import PerceptualLoss

    clips = torch.rand(3, 1, 2, 16, 16, generator=torch.Generator().manual_seed(2))
    space = ES.FeatureSpace("video", 16000, ES.VGGFeatures.from_shared_weights())
    assert space(clips).shape == (3, 512)
    perceptual = PerceptualLoss()
    same = torch.stack([clips[0], clips[0]])
    assert ES.mean_pairwise_lpips(same, torch.tensor([[0, 1]]), "video", perceptual) == pytest.approx(0, abs=1e-6)
    assert ES.mean_pairwise_lpips(clips, ES.random_pairs(3, 10, 0), "video", perceptual) > 0.01


def test_data_options_are_a_json_object():
    import argparse

    assert ES.data_options('{"max_digits": 1}') == {"max_digits": 1}
    for bad in ("max_digits=1", "[1]"):
        with pytest.raises(argparse.ArgumentTypeError):
            ES.data_options(bad)
