"""benchmarks/preset_cuts.py: the cut differs from the preset only where asked, both train configs resolve, the
equal-time schedule scales with the steps, and (slow) a quick run trains and scores both sides."""
from __future__ import annotations

import pytest

from benchmarks.preset_cuts import markdown, run, training_config, variant
from harness.config import config_from_dict, preset
from stage1_tokenizer.train import TokenizerTrainConfig


@pytest.mark.parametrize("name, cut", [("tokenizer-audio-3level", {"patch": [2]}),
                                       ("tokenizer-moving-digits", {"patch": [1, 2, 2], "channels": [16, 32, 32]})])
def test_the_cut_changes_only_its_fields_and_its_schedule_follows_the_steps(name, cut):
    base, cheaper = preset(name), variant(name, cut)
    assert {k: v for k, v in cheaper["model"].items() if k not in cut} == \
           {k: v for k, v in base["model"].items() if k not in cut}
    assert all(cheaper["model"][k] == v for k, v in cut.items())
    values = training_config(cheaper, steps=300, seed=3)
    cfg = config_from_dict(TokenizerTrainConfig, values)  # a valid training config
    assert cfg.max_steps == cfg.checkpoint_every == 300 and cfg.seed == 3 and cfg.image_every == 0
    if "level_dropout_steps" in base:
        assert values["level_dropout_steps"] == 150  # annealed over half the steps, as the shipped presets do
    assert {k: v for k, v in values.items() if k not in ("model", "max_steps", "checkpoint_every", "image_every",
                                                          "seed", "log_with", "level_dropout_steps")} == \
           {k: v for k, v in base.items() if k not in ("model", "max_steps", "checkpoint_every", "image_every",
                                                        "level_dropout_steps")}


@pytest.mark.slow
def test_a_quick_run_trains_and_scores_both_sides():
    result = run("tokenizer-digits", {"channels": [16, 16]}, seeds=[0], quick=True)
    costs = result["costs"]
    assert costs["cut"]["flops_per_value"] < costs["preset"]["flops_per_value"]
    assert result["steps"]["cut"] > result["steps"]["preset"]  # the cheaper side gets more steps in the same time
    assert [r["side"] for r in result["rows"]] == ["preset", "cut"]
    assert all(r["metrics"]["psnr_db"] > 5 for r in result["rows"])
    assert "tokenizer-digits" in markdown(result)


def test_a_cut_of_training_fields_changes_those_alone_and_is_named_in_the_table():
    base, cut = preset("tokenizer-digits"), variant("tokenizer-digits", {"norm": "none"}, {"mixed_precision": "auto"})
    assert "mixed_precision" not in base and "norm" not in base["model"]  # else the cut would be the preset
    assert cut["mixed_precision"] == "auto" and cut["model"] == {**base["model"], "norm": "none"}
    assert {k: v for k, v in cut.items() if k not in ("model", "mixed_precision")} == \
           {k: v for k, v in base.items() if k not in ("model", "mixed_precision")}
    config_from_dict(TokenizerTrainConfig, training_config(cut, steps=10, seed=0))  # a valid training config
    with pytest.raises(ValueError, match="model"):
        variant("tokenizer-digits", {}, {"model": {"norm": "none"}})
    metrics = {"psnr_db": 20.0, "ssim": 0.5, "lpips": 0.3, "codebook_usage_per_level": [0.5, 0.9]}
    costs = {"flops_per_value": 1e5, "step_seconds": 0.1}
    result = {"preset": "tokenizer-photos", "cut": {"norm": "none"}, "cut_training": {"mixed_precision": "auto"},
              "costs": {"preset": costs, "cut": costs},
              "rows": [{"seed": 0, "side": s, "steps": 5, "train_seconds": 1.0, "metrics": metrics}
                       for s in ("preset", "cut")]}
    assert 'cut {"norm": "none", "mixed_precision": "auto"}' in markdown(result)
