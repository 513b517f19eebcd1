"""Reliability: safe loading, clear errors offline, kill/resume from the command line, 1 vs 2 processes."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness import checkpoints

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("harness", "data", "stage1_tokenizer", "stage2_prior", "pipelines")


# ---- safe loading ---------------------------------------------------------------------------------
UNSAFE = re.compile(r"torch\.load\(|pickle\.loads?\(|allow_pickle=True|weights_only=False|dill\.|joblib\.load")


def test_no_unpickling_anywhere_in_the_library():
    """Weights come from safetensors, codes from np.load(allow_pickle=False), state via accelerate."""
    offenders = []
    for package in PACKAGES:
        for file in (ROOT / package).rglob("*.py"):
            for number, line in enumerate(file.read_text().splitlines(), 1):
                if UNSAFE.search(line) and not line.lstrip().startswith("#"):
                    offenders.append(f"{file.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "unsafe deserialization:\n" + "\n".join(offenders)


class _Payload:
    """Unpickling this runs code: what a malicious checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tiny_config(tmp_path: Path, **overrides) -> Path:
    cfg = {
        "model": {"in_channels": 1, "channels": [8, 8], "num_res_blocks": 1, "factors": [4, 4],
                  "quantizer": {"codebook_size": 16, "dim": 8}},
        "data": "digits", "size": 16, "batch_size": 8, "image_every": 0, "log_every": 5, "warmup_steps": 2,
        **overrides,
    }
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    return path


def test_checkpoint_with_a_pickle_payload_is_refused(tmp_path):
    from stage1_tokenizer import train

    run = tmp_path / "run"
    train.main(["--config", str(_tiny_config(tmp_path)), "--out", str(run), "--max-steps", "4",
                "--checkpoint-every", "4", "--quiet"])
    ckpt = checkpoints.list_checkpoints(run)[-1]
    marker = tmp_path / "pwned"
    torch.save({"state": _Payload(str(marker))}, ckpt / "optimizer.bin")
    # Re-index so the checksum check passes: the loader itself must refuse the pickle.
    checkpoints.write_json(ckpt / "index.json", checkpoints._index(ckpt))
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|not allowed|unsupported global"):
        train.main(["--out", str(run), "--resume", "--max-steps", "8", "--quiet"])
    assert not marker.exists(), "the checkpoint's pickle payload ran"


def test_codes_files_with_pickles_are_refused(tmp_path):
    import numpy as np

    from data.codes import load_codes

    path = tmp_path / "codes.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        load_codes(path)


# ---- missing LPIPS weights offline ----------------------------------------------------------------
def test_missing_lpips_weights_offline_is_a_clear_error(monkeypatch, tmp_path):
    from stage1_tokenizer import perceptual

    monkeypatch.setattr(perceptual, "weight_dirs", lambda: [tmp_path / "nowhere"])

    def offline(**kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(perceptual, "_quiet_lpips", offline)
    with pytest.raises(RuntimeError) as err:
        perceptual.load_lpips("alex")
    message = str(err.value)
    assert "alexnet_features.safetensors" in message and "TOKGEN_WEIGHTS" in message
    assert "download" in message and "name resolution" in message


# ---- kill -9 and resume from the command line -----------------------------------------------------
def _free_port() -> str:
    """A port nothing listens on now: each `accelerate launch` gets its own rendezvous port, so one launched right
    after another never meets the last one's socket still closing."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _tokgen(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", *args]


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def _kill_after_checkpoint(cmd: list[str], run: Path, step: int, timeout: float = 300) -> None:
    """Start ``cmd``, SIGKILL it as soon as the checkpoint of ``step`` is complete."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = run / "checkpoints" / f"step_{step:08d}" / "index.json"
    deadline = time.time() + timeout
    while not target.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.stderr.read().decode()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the checkpoint")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "model").exists(), "the run finished before it could be killed"


def _resume_equals_uninterrupted(tmp_path: Path, args: list[str], kill_at: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_tokgen("train-tokenizer", *args, "--out", str(straight), "--quiet"), cwd=ROOT, env=env,
                   check=True, capture_output=True, timeout=600)
    _kill_after_checkpoint(_tokgen("train-tokenizer", *args, "--out", str(killed), "--quiet"), killed, kill_at)
    done = subprocess.run(_tokgen("train-tokenizer", "--out", str(killed), "--resume"), cwd=ROOT,
                          env={**env, "TQDM_DISABLE": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout + done.stderr
    a, b = _final_weights(straight), _final_weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), atol=1e-6, rtol=0), key


def test_sigkill_and_resume_matches_uninterrupted_tiny(tmp_path):
    config = _tiny_config(tmp_path)
    _resume_equals_uninterrupted(tmp_path, ["--config", str(config), "--max-steps", "12", "--checkpoint-every",
                                            "4", "--seed", "0"], kill_at=4)


# a PatchGAN from step 2, its term ramping in over 4 steps, adaptive weight and LeCam on: every part of the
# discriminator's state (weights, Adam moments, running logit means) must come back for the weights to match
TINY_GAN = {"weight": 0.5, "disc_start": 2, "ramp_steps": 4, "lecam_weight": 0.01,
            "discriminator": {"channels": 8, "num_layers": 2}}


def test_sigkill_and_resume_with_a_discriminator_matches_uninterrupted(tmp_path):
    config = _tiny_config(tmp_path, adversarial=TINY_GAN)
    _resume_equals_uninterrupted(tmp_path, ["--config", str(config), "--max-steps", "10", "--checkpoint-every",
                                            "4", "--seed", "0"], kill_at=4)
    # the discriminator in the last checkpoint too, and the model folder is the tokenizer's alone
    disc = [load_file(str(run / "checkpoints" / "step_00000010" / "model_1.safetensors"))
            for run in (tmp_path / "straight", tmp_path / "killed")]
    assert disc[0].keys() == disc[1].keys() and any("ema_real" in k for k in disc[0])
    for key in disc[0]:
        assert torch.allclose(disc[0][key].double(), disc[1][key].double(), atol=1e-6, rtol=0), key
    assert not any("discriminator" in key for key in _final_weights(tmp_path / "killed"))


def test_two_process_gan_training_equals_one_process_at_the_same_global_batch(tmp_path):
    """`accelerate launch` with 2 CPU processes and a discriminator: no hang, no unused-parameter error, the
    discriminator's gradients and running means synchronised (checked at the checkpoint, logged), and the same
    tokenizer and discriminator as one process at the same global batch. (A fixed GAN weight and no code restarts:
    the adaptive weight and the restarts are computed from each rank's own half batch by design.)"""
    gan = {**TINY_GAN, "adaptive_weight": False}
    quantizer = {"codebook_size": 16, "dim": 8, "restart_threshold": 0.0}
    common = {"max_steps": 6, "checkpoint_every": 6, "log_with": "none", "adversarial": gan}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    launch = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--main_process_port", _free_port(), "--mixed_precision", "no",
              "--dynamo_backend", "no", "-m"]
    for name, launcher, batch in (("one", [sys.executable, "-m"], 8), ("two", launch, 4)):
        folder = tmp_path / name
        folder.mkdir()
        config = _tiny_config(folder, batch_size=batch, **common)
        config.write_text(json.dumps({**json.loads(config.read_text()),
                                      "model": {**json.loads(config.read_text())["model"], "quantizer": quantizer}}))
        done = subprocess.run(launcher + ["pipelines.cli", "train-tokenizer", "--config", str(config), "--out",
                                          str(folder / "run")],
                              cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    assert "discriminator in sync across 2 ranks" in done.stdout + done.stderr
    for file in ("model.safetensors", "model_1.safetensors"):
        one, two = (load_file(str(tmp_path / name / "run" / "checkpoints" / "step_00000006" / file))
                    for name in ("one", "two"))
        assert one.keys() == two.keys()
        for key in one:
            assert torch.allclose(one[key].double(), two[key].double(), atol=1e-5, rtol=1e-4), (file, key)


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted_digits_cli(tmp_path):
    """The issue's command: the digits preset, 80 steps, checkpoints every 20, killed after one."""
    _resume_equals_uninterrupted(tmp_path, ["--data", "digits", "--max-steps", "80", "--checkpoint-every", "20",
                                            "--seed", "0"], kill_at=40)


# ---- a 2-process prior run equals a 1-process run at the same global batch -----------------------
def _prior_cfg(tokens: Path, batch_size: int):
    from stage2_prior.train import PriorTrainConfig

    return PriorTrainConfig(tokens=str(tokens), model={"dim": 16, "num_layers": 1, "num_heads": 2},
                            batch_size=batch_size, max_steps=6, warmup_steps=1, checkpoint_every=0, eval_every=0,
                            log_every=3)


def _prior_worker(tokens: str, run: str):
    from stage2_prior.train import train

    torch.set_num_threads(1)
    train(_prior_cfg(Path(tokens), 4), Path(run), quiet=True)


def _launch_prior(tokens: str, run: str):
    from accelerate import debug_launcher

    debug_launcher(_prior_worker, args=(tokens, run), num_processes=2)


def _make_tokens(tmp_path: Path, tiny) -> Path:
    from stage1_tokenizer.export import export_tokens

    images = tiny.images(48, seed=0, classes=3)
    export_tokens(tiny.vqvae(codebook_size=16), {"train": images, "eval": images}, tmp_path / "tokens",
                  batch_size=16, shard_size=100, progress=False)
    return tmp_path / "tokens"


def test_two_process_prior_equals_one_process_at_the_same_global_batch(tmp_path, tiny):
    from stage2_prior.train import train

    tokens = _make_tokens(tmp_path, tiny)
    train(_prior_cfg(tokens, 8), tmp_path / "one", quiet=True)
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_reliability as t; "
            f"t._launch_prior({str(tokens)!r}, {str(tmp_path / 'two')!r})")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5, rtol=1e-4), key


def test_prior_in_auto_precision_records_it_and_saves_fp32_weights(tmp_path, tiny, caplog):
    """``"mixed_precision": "auto"`` (the moving-digits prior preset's): bf16 autocast where the CPU runs it natively.
    The run's config.json records what auto resolved to (a resume keeps it); bf16 really trains under autocast (its
    weights differ from fp32's), the saved weights stay fp32, and the loaded prior scores the held-out codes as the
    run reported, both at the end and in the last step's held-out log line (no autocast left around forward)."""
    from dataclasses import replace

    from data.tokens import TokenDataset
    from harness.devices import resolve_mixed_precision
    from stage2_prior.registry import load_prior
    from stage2_prior.train import evaluate, train

    tokens = _make_tokens(tmp_path, tiny)
    weights = {}
    for precision in ("no", "bf16", "auto"):  # bf16 asked explicitly runs autocast (emulated where not native)
        run = tmp_path / precision
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="tokgen"):
            model_dir = train(replace(_prior_cfg(tokens, 8), mixed_precision=precision, eval_every=6), run, quiet=True)
        logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 6: held-out")]
        stored = json.loads((run / "config.json").read_text())["mixed_precision"]
        assert stored == resolve_mixed_precision(precision, torch.device("cpu"))
        weights[precision] = _final_weights(run)
        assert {w.dtype for w in weights[precision].values()} == {torch.float32}
        reported = json.loads((run / "prior.json").read_text())["eval"]["bits_per_token"]
        held_out = evaluate(load_prior(model_dir), TokenDataset(tokens, "eval", [0]), dims_per_sample=1)
        assert held_out["bits_per_token"] == pytest.approx(reported, rel=1e-5) and 0 < reported < 5
        assert logged and f"{held_out['bits_per_token']:.4f} bits/token" in logged[0]
    assert any(not torch.equal(weights["no"][k], weights["bf16"][k]) for k in weights["no"])
    resolved = weights["bf16" if resolve_mixed_precision("auto", torch.device("cpu")) == "bf16" else "no"]
    assert all(torch.equal(weights["auto"][k], resolved[k]) for k in resolved)


# ---- unreadable inputs: skip and list (default) or fail fast --------------------------------------
def _folder_with_a_corrupt_image(tmp_path: Path) -> Path:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        Image.new("L", (20, 20), color=i * 20).save(folder / f"ok_{i:02d}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    return folder


def test_bad_input_is_skipped_counted_and_listed_by_default(tmp_path):
    from stage1_tokenizer import train

    folder = _folder_with_a_corrupt_image(tmp_path)
    config = _tiny_config(tmp_path, data=str(folder), batch_size=13)
    with pytest.warns(UserWarning, match="broken.png"):
        train.main(["--config", str(config), "--out", str(tmp_path / "run"), "--max-steps", "2", "--quiet"])
    listed = (tmp_path / "run" / "skipped.txt").read_text().splitlines()
    assert listed and all(line.endswith("broken.png") for line in listed)
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_bad_input_policy_fail_stops_with_the_file_named(tmp_path):
    from stage1_tokenizer import train

    folder = _folder_with_a_corrupt_image(tmp_path)
    config = _tiny_config(tmp_path, data=str(folder), batch_size=13)
    with pytest.raises(RuntimeError, match="broken.png"):
        train.main(["--config", str(config), "--out", str(tmp_path / "run"), "--max-steps", "2", "--quiet",
                    "--bad-input", "fail"])
    assert not (tmp_path / "run" / "model").exists()


# ---- a prior sharded with FSDP across 2 CPU processes ------------------------------------------------
def test_fsdp_prior_on_two_cpu_processes_equals_one_process(tmp_path, tiny):
    """`accelerate launch --use_fsdp --fsdp_version 2` (FSDP2: parameters sharded across the 2 processes, on the
    CPU with gloo) trains the same prior as one process at the same global batch, and saves the full weights."""
    tokens = _make_tokens(tmp_path, tiny)
    config = {"model": {"dim": 16, "num_layers": 1, "num_heads": 2, "dropout": 0.0}, "class_dropout": 0.0,
              "max_steps": 6, "warmup_steps": 1, "checkpoint_every": 0, "eval_every": 0, "log_every": 3,
              "log_with": "none"}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    runs = {"one": ([], 8), "fsdp": ([str(Path(sys.executable).with_name("accelerate")), "launch", "--use_fsdp",
                                      "--fsdp_version", "2", "--num_processes", "2", "--num_machines", "1",
                                      "--main_process_port", _free_port(),
                                      "--mixed_precision", "no", "--dynamo_backend", "no", "-m"], 4)}
    for name, (launcher, batch) in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({**config, "batch_size": batch}))
        command = (launcher or [sys.executable, "-m"]) + ["pipelines.cli", "train-prior", "--tokens", str(tokens),
                                                          "--out", str(tmp_path / name), "--config",
                                                          str(tmp_path / f"{name}.json"), "--quiet"]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    one, fsdp = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "fsdp")
    assert one.keys() == fsdp.keys()
    for key in one:
        assert one[key].shape == fsdp[key].shape, key  # the full weights, not one process's shard
        assert torch.allclose(one[key], fsdp[key], atol=1e-5), key
