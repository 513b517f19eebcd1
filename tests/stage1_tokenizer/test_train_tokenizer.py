"""End-to-end tests of ``tokgen train-tokenizer`` / ``evaluate-tokenizer`` on a tiny digits config:
run-folder layout, checkpoint rotation, exact resume (also from a corrupt checkpoint), evaluation and
the non-finite-loss guard. ``train.main`` runs in-process on CPU."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from harness import loop
from harness.checkpoints import verify_checkpoint
from harness.config import config_from_dict
from harness.devices import resolve_mixed_precision
from stage1_tokenizer import evaluate, train
from stage1_tokenizer.registry import training_data
from stage1_tokenizer.vqvae import VQVAE

from conftest import HostReads

TINY = {
    "model": {"modality": "image", "in_channels": 1, "channels": [8, 8], "num_res_blocks": 1, "factors": [4, 4],
              "quantizer": {"codebook_size": 32, "dim": 8}},
    "data": "digits",
    "size": 16,
    "batch_size": 8,
    "image_every": 0,
    "log_every": 5,
    "checkpoint_every": 4,
    "keep_checkpoints": 3,
    "max_steps": 12,
}


# Each run builds its own Accelerator (don't let one test's singleton state leak into another); a tiny model's
# extra intra-op threads only contend on a shared machine.
pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate")


def write_config(tmp_path: Path, **overrides) -> Path:
    cfg = json.loads(json.dumps(TINY))
    for key, value in overrides.items():
        cfg[key] = value
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*.json')))}.json"
    path.write_text(json.dumps(cfg))
    return path


def run(out: Path, *args: str) -> Path:
    return train.main(["--out", str(out), "--quiet", *args])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        if a[key].is_floating_point():
            assert torch.allclose(a[key], b[key], atol=atol, rtol=0), (key, (a[key] - b[key]).abs().max())
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, accelerate_reset) -> Path:
    """An uninterrupted 12-step run (checkpoints at 4, 8, 12)."""
    tmp = tmp_path_factory.mktemp("reference")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model_dir = run(tmp / "run", "--config", str(write_config(tmp)))
    finally:
        torch.set_num_threads(n)
        accelerate_reset()
    assert model_dir == tmp / "run" / "model"
    return tmp / "run"


# ---- run folder -------------------------------------------------------------------------------------
def test_run_folder_layout(reference_run):
    resolved = json.loads((reference_run / "config.json").read_text())
    assert resolved["max_steps"] == 12 and resolved["batch_size"] == 8 and resolved["size"] == 16
    assert resolved["model"]["channels"] == [8, 8]
    assert resolved["model"]["quantizer"]["decay"] == 0.95  # from the digits preset: the config is resolved
    assert resolved["lr"] == 0.002 and "max_bad_steps" in resolved

    assert sorted(p.name for p in (reference_run / "model").iterdir()) == ["config.json", "model.safetensors"]
    model = VQVAE.from_pretrained(reference_run / "model")
    assert model.config.in_channels == 1 and model.config.quantizer.codebook_size == 32
    assert model.encode(torch.rand(2, 1, 16, 16)).shape == (2, 4, 4)
    assert (reference_run / "reconstructions.png").stat().st_size > 0
    assert any((reference_run / "logs").rglob("events.out.tfevents.*"))

    ckpts = sorted(p.name for p in (reference_run / "checkpoints").iterdir())
    assert ckpts == ["step_00000004", "step_00000008", "step_00000012"]  # no .tmp leftovers either
    for name in ckpts:
        folder = reference_run / "checkpoints" / name
        index = json.loads((folder / "index.json").read_text())
        assert "model.safetensors" in index and "trainer.json" in index
        assert verify_checkpoint(folder) is None
    trainer = json.loads((reference_run / "checkpoints" / "step_00000012" / "trainer.json").read_text())
    assert trainer == {"step": 12, "batches": 12, "data_position": {"epoch": 0, "batch": 12}, "bad_steps": 0,
                       "skipped_inputs": 0}
    # the last checkpoint holds the final model's weights
    final = weights(reference_run / "model" / "model.safetensors")
    assert_same_weights(weights(reference_run / "checkpoints" / "step_00000012" / "model.safetensors"), final)
    assert {"quantizer.embed", "quantizer.cluster_size", "quantizer.embed_sum"} <= final.keys()


def test_tensorboard_scalars(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (reference_run / "logs").glob("tokenizer/events.out.tfevents.*")  # the scalars; hparams beside
    acc = EventAccumulator(str(events))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("loss", "recon_loss", "usage", "bad_steps", "lr"):
        assert tag in tags, tags
    assert [e.step for e in acc.Scalars("loss")] == [5, 10, 12]
    # the resolved config is logged as hyper-parameters (flattened), next to the scalars
    (hparams,) = (reference_run / "logs").rglob("hparams.yml")
    text = hparams.read_text()
    assert "model/quantizer/codebook_size: 32" in text and "max_steps: 12" in text


def test_keep_checkpoints(tmp_path):
    run(tmp_path / "run", "--config", str(write_config(tmp_path, keep_checkpoints=2)), "--checkpoint-every", "2",
        "--max-steps", "8")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000006",
                                                                                  "step_00000008"]


# ---- exact resume ------------------------------------------------------------------------------------
def test_exact_resume(tmp_path, reference_run):
    out = tmp_path / "run"
    run(out, "--config", str(write_config(tmp_path)), "--max-steps", "8")
    at8 = weights(out / "model" / "model.safetensors")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004", "step_00000008"]
    run(out, "--resume", "--max-steps", "12")
    assert json.loads((out / "config.json").read_text())["max_steps"] == 12
    resumed = weights(out / "model" / "model.safetensors")
    expected = weights(reference_run / "model" / "model.safetensors")
    assert_same_weights(resumed, expected)
    # the comparison has teeth: four more steps changed the weights and the EMA codebook
    assert not torch.allclose(at8["quantizer.embed"], resumed["quantizer.embed"])
    assert not torch.allclose(at8["encoder.net.0.weight"], resumed["encoder.net.0.weight"])


def test_resume_skips_corrupt_checkpoint(tmp_path, reference_run, caplog):
    caplog.set_level(logging.INFO, logger="tokgen")  # run events go to the "tokgen" logger
    out = tmp_path / "run"
    run(out, "--config", str(write_config(tmp_path)), "--max-steps", "8")
    broken = out / "checkpoints" / "step_00000008" / "model.safetensors"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])  # truncated mid-write
    assert "checksum" in verify_checkpoint(broken.parent)
    caplog.clear()
    with pytest.warns(UserWarning, match="step_00000008 is unusable"):
        run(out, "--resume", "--max-steps", "12")
    printed = caplog.text
    assert "resumed from" in printed and "step_00000004 at step 4" in printed
    assert_same_weights(weights(out / "model" / "model.safetensors"),
                        weights(reference_run / "model" / "model.safetensors"))
    assert verify_checkpoint(out / "checkpoints" / "step_00000008") is None  # rewritten by the replay


def test_exact_resume_after_crash_with_cosine_schedule(tmp_path, crash_after_checkpoint):
    """A run killed right after its step-8 checkpoint and resumed with the same budget, while the
    learning rate is already decaying: the schedule position must be restored too."""
    cfg = write_config(tmp_path, warmup_steps=2)
    run(tmp_path / "whole", "--config", str(cfg))
    disarm = crash_after_checkpoint(8)
    with pytest.raises(crash_after_checkpoint.error):
        run(tmp_path / "crashed", "--config", str(cfg))
    disarm()
    assert not (tmp_path / "crashed" / "model").exists()
    run(tmp_path / "crashed", "--resume")
    assert_same_weights(weights(tmp_path / "crashed" / "model" / "model.safetensors"),
                        weights(tmp_path / "whole" / "model" / "model.safetensors"))


def test_resume_without_checkpoint_starts_from_scratch(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tokgen")
    out = tmp_path / "run"
    run(out, "--config", str(write_config(tmp_path)), "--max-steps", "2", "--resume")
    assert "no checkpoint" in caplog.text
    assert (out / "model" / "model.safetensors").is_file()


# ---- evaluation ------------------------------------------------------------------------------------
def test_evaluate_tokenizer(reference_run, tmp_path):
    out = tmp_path / "eval"
    metrics = evaluate.main([str(reference_run), "--data", "digits", "--out", str(out), "--limit", "48",
                             "--batch-size", "16", "--no-lpips", "--no-fd-vgg16"])
    saved = json.loads((out / "metrics.json").read_text())
    assert "fd_vgg16" not in saved and "lpips" not in saved  # both skipped when asked (tests/stage1_tokenizer/test_fidelity.py)
    assert saved == json.loads(json.dumps(metrics))
    for key in ("psnr_db", "codebook_usage", "perplexity", "ssim", "mse"):
        assert key in saved, key
    assert saved["num_samples"] == 48
    assert saved["code_grid_shapes"] == [[4, 4]]  # the run's training size (16) was picked up
    assert 0 < saved["codebook_usage"] <= 1
    assert 1 <= saved["perplexity"] <= 32 * saved["codebook_usage"] + 1e-6
    assert saved["psnr_db"] > 5
    assert (out / "reconstructions.png").stat().st_size > 0


# ---- non-finite losses -------------------------------------------------------------------------------
def _nan_on(monkeypatch, bad_calls: set[int] | None = None, from_call: int | None = None) -> list[int]:
    """Make VQVAE's training forward return a NaN loss on chosen calls (1-based)."""
    calls = [0]
    original = VQVAE.forward

    def forward(self, x):
        out = original(self, x)
        calls[0] += 1
        if (bad_calls and calls[0] in bad_calls) or (from_call and calls[0] >= from_call):
            out.recon_loss = out.recon_loss * float("nan")
        return out

    monkeypatch.setattr(VQVAE, "forward", forward)
    return calls


def test_nonfinite_loss_steps_are_skipped(tmp_path, monkeypatch):
    calls = _nan_on(monkeypatch, bad_calls={3, 4, 7})
    cfg = write_config(tmp_path, max_bad_steps=2, checkpoint_every=8)
    run(tmp_path / "run", "--config", str(cfg), "--max-steps", "8")
    assert calls[0] == 11  # 8 optimizer steps took 11 batches
    trainer = json.loads((tmp_path / "run" / "checkpoints" / "step_00000008" / "trainer.json").read_text())
    assert trainer["bad_steps"] == 3 and trainer["batches"] == 11
    final = weights(tmp_path / "run" / "model" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values() if t.is_floating_point())


def test_too_many_nonfinite_losses_in_a_row(tmp_path, monkeypatch):
    _nan_on(monkeypatch, from_call=3)
    cfg = write_config(tmp_path, max_bad_steps=3)
    with pytest.raises(RuntimeError, match=r"loss was not finite for 4 steps in a row"):
        run(tmp_path / "run", "--config", str(cfg), "--max-steps", "20")


HIERARCHICAL = {"modality": "image", "in_channels": 1, "channels": [8, 8], "hidden": 8, "num_res_blocks": 1,
                "factors": [[2, 2], [2, 2]], "quantizer": {"codebook_size": 16, "dim": 8}, "level_dropout": 0.5}


def test_hierarchical_training_anneals_level_dropout(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from stage1_tokenizer.hvqvae import HierarchicalVQVAE

    config = write_config(tmp_path, arch="hvqvae", model=HIERARCHICAL, level_dropout_steps=8, log_every=1, max_steps=10,
                          checkpoint_every=10)
    folder = run(tmp_path / "run", "--config", str(config))
    assert HierarchicalVQVAE.from_pretrained(folder).config.level_dropout == 0.5
    (events,) = (tmp_path / "run" / "logs").glob("tokenizer/events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    rates = [round(e.value, 4) for e in acc.Scalars("level_dropout")]
    assert rates == [0.5, 0.4375, 0.375, 0.3125, 0.25, 0.1875, 0.125, 0.0625, 0.0, 0.0]


def test_hierarchical_exact_resume_mid_annealing(tmp_path, crash_after_checkpoint):
    """Killed after its step-4 checkpoint while level dropout is still annealing, then resumed: the
    blanking masks (global RNG) and the rate (scheduler position) replay exactly."""
    cfg = write_config(tmp_path, arch="hvqvae", model=HIERARCHICAL, level_dropout_steps=6, max_steps=8)
    run(tmp_path / "whole", "--config", str(cfg))
    disarm = crash_after_checkpoint(4)
    with pytest.raises(crash_after_checkpoint.error):
        run(tmp_path / "crashed", "--config", str(cfg))
    disarm()
    run(tmp_path / "crashed", "--resume")
    assert_same_weights(weights(tmp_path / "crashed" / "model" / "model.safetensors"),
                        weights(tmp_path / "whole" / "model" / "model.safetensors"))


def test_data_options_reach_the_reader_and_follow_the_source(tmp_path):
    video = {"model": {"modality": "video", "in_channels": 1, "channels": [4, 4], "factors": [2, 2, 2],
                       "quantizer": {"codebook_size": 16, "dim": 4}},
             "data": "moving-digits", "size": 16, "frames": 4, "data_options": {"max_digits": 1}}
    cfg = train.TokenizerTrainConfig(**video)
    keys = [train.build_dataset(cfg, split)[i]["key"] for split in ("train", "eval") for i in range(40)]
    assert all(k.split(":", 1)[1].count("-") == 0 for k in keys)  # one "index:class" per clip
    two = train.build_dataset(train.TokenizerTrainConfig(**{**video, "data_options": {}}), "train")
    assert any(two[i]["key"].split(":", 1)[1].count("-") == 1 for i in range(40))  # the default shows up to 2
    (tmp_path / "config.json").write_text(json.dumps(video))
    # evaluation and export read the same source with the run's options, another source without them
    run = training_data(tmp_path)
    assert run.held_out("moving-digits", "eval") == ("moving-digits", {"size": 16, "frames": 4, "max_digits": 1,
                                                                       "eval_fraction": 0.1})
    assert run.held_out("clips/", "eval") == ("clips/", {"size": 16, "frames": 4, "eval_fraction": 0.1})
    with pytest.raises(TypeError, match="colour"):
        train.build_dataset(train.TokenizerTrainConfig(**{**video, "data_options": {"colour": 1}}), "train")


def test_data_options_are_dropped_when_data_names_another_source(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    preset = str(Path(__file__).parents[2] / "harness" / "presets" / "tokenizer-moving-digits.json")
    same = train.parse_config(parser.parse_args(["--out", str(tmp_path), "--config", preset]))
    assert same.data == "moving-digits" and same.data_options == {"max_digits": 1}
    other = train.parse_config(parser.parse_args(["--out", str(tmp_path), "--config", preset, "--data", "clips/"]))
    assert other.data == "clips/" and other.data_options == {}  # max_digits would break a video folder reader


def test_a_one_level_config_over_the_two_level_default_keeps_none_of_its_model_fields(tmp_path):
    """A folder gets the hierarchical tokenizer-image preset; a config file for another arch replaces its model."""
    import argparse

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    default = train.parse_config(parser.parse_args(["--out", str(tmp_path), "--data", "photos/"]))
    assert default.arch == "hvqvae" and default.level_dropout_steps > 0
    one_level = train.parse_config(parser.parse_args(["--out", str(tmp_path), "--data", "photos/",
                                                      "--config", "tokenizer-digits"]))
    assert one_level.arch == "vqvae" and one_level.level_dropout_steps == 0
    assert one_level.model == train.preset("tokenizer-digits")["model"]
    wider = tmp_path / "wider.json"  # no arch: the default's, with its other model fields kept
    wider.write_text('{"model": {"hidden": 96}}')
    merged = train.parse_config(parser.parse_args(["--out", str(tmp_path), "--data", "photos/", "--config", str(wider)]))
    assert merged.arch == "hvqvae" and merged.model["hidden"] == 96 and merged.model["patch"] == [4, 4]


def test_a_compiled_model_trains_the_same_and_resumes(tmp_path, crash_after_checkpoint):
    """`"dynamo_backend"` compiles the model through Accelerate (torch.compile): the same weights as eager
    training, checkpoints without compile's name prefix, and exact resume. aot_eager keeps this test fast;
    `inductor` (the GPU default) runs in test-slow."""
    eager = run(tmp_path / "eager", "--config", str(write_config(tmp_path, max_steps=6)))
    compiled_config = write_config(tmp_path, max_steps=6, dynamo_backend="aot_eager")
    compiled = run(tmp_path / "compiled", "--config", str(compiled_config))
    assert_same_weights(weights(compiled / "model.safetensors"), weights(eager / "model.safetensors"), atol=1e-5)
    assert not any(k.startswith("_orig_mod") for k in weights(compiled / "model.safetensors"))
    disarm = crash_after_checkpoint(4)
    with pytest.raises(crash_after_checkpoint.error):
        run(tmp_path / "crashed", "--config", str(compiled_config))
    disarm()
    resumed = run(tmp_path / "crashed", "--resume")
    assert_same_weights(weights(resumed / "model.safetensors"), weights(compiled / "model.safetensors"))


@pytest.mark.parametrize("arch", ["vqvae", "hvqvae"])
def test_a_train_step_reads_the_device_once(tmp_path, arch):
    """Forward, loss, backward, clipping and the optimizer step of a tokenizer read nothing back to the host but
    the bad-step guard's one flag (is this step's loss finite on every rank?): on a GPU the queue then empties once
    a step, and a compiled step has nothing in it that breaks its graph."""
    values = json.loads(json.dumps(TINY))
    if arch == "hvqvae":
        values.update(arch="hvqvae", level_dropout_steps=10)
        values["model"].update(hidden=8, factors=[[2, 2], [2, 2]], level_dropout=0.5)
    cfg = config_from_dict(train.TokenizerTrainConfig, values)
    accelerator = loop.make_accelerator(tmp_path, "no", 1, log_with="none")
    state, guard = train.build(cfg, accelerator), loop.BadStepGuard(cfg.max_bad_steps)
    batch = {"x": torch.rand(8, 1, 16, 16)}
    assert train.train_step(state, batch, accelerator, guard) is not None
    with HostReads() as host:
        assert train.train_step(state, batch, accelerator, guard) is not None
    assert [(call, where.split(":")[0]) for call, where in host.reads] == [("item", "harness/loop.py")], host.reads


def test_dynamo_mode_reaches_torch_compile_and_a_bad_one_is_refused(tmp_path):
    accelerator = loop.make_accelerator(tmp_path, "no", 1, log_with="none", dynamo_backend="inductor",
                                        dynamo_mode="reduce-overhead")
    assert accelerator.state.dynamo_plugin.to_kwargs()["mode"] == "reduce-overhead"
    loop.make_accelerator(tmp_path, "no", 1, log_with="none")  # leave no compile backend to the next test
    with pytest.raises(ValueError, match="dynamo_mode must be one of default, reduce-overhead"):
        run(tmp_path / "run", "--config", str(write_config(tmp_path, dynamo_mode="fast")))


@pytest.mark.slow
def test_inductor_compiled_training_runs(tmp_path):
    model = run(tmp_path / "run", "--config", str(write_config(tmp_path, max_steps=3, dynamo_backend="inductor")))
    assert VQVAE.from_pretrained(model).config.quantizer.codebook_size == 32


def test_fsdp_is_refused_with_one_line():
    """Under `accelerate launch --use_fsdp` a tokenizer would hang in the codebook's all-reduce: refuse it."""
    with pytest.raises(ValueError, match="runs under DDP, not FSDP"):
        train.build(None, SimpleNamespace(distributed_type=DistributedType.FSDP))


def test_a_config_file_for_another_modality_does_not_inherit_the_default_presets_model_fields():
    """The default preset (digits) folds 2x2 patches; a config file's audio or video model must not get them."""
    base = train.preset("tokenizer-digits")
    audio = {"model": {"modality": "audio", "in_channels": 1, "factors": [8]}}
    assert "patch" not in train.merge(train.for_file(base, audio), audio)["model"]
    image = {"model": {"channels": [16, 16]}}  # same modality: the file overrides field by field
    assert train.merge(train.for_file(base, image), image)["model"]["patch"] == base["model"]["patch"]


def test_auto_precision_trains_in_the_precision_this_machine_runs_natively_and_records_it(tmp_path):
    """``"mixed_precision": "auto"`` (the image preset's): the run's config.json holds what it resolved to, so a
    resume on another machine keeps the run's precision."""
    run_dir = tmp_path / "run"
    run(run_dir, "--config", str(write_config(tmp_path, mixed_precision="auto", max_steps=2)))
    stored = json.loads((run_dir / "config.json").read_text())["mixed_precision"]
    assert stored == resolve_mixed_precision("auto", torch.device("cpu")) and stored in ("bf16", "no")
