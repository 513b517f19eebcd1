"""A shipped tokenizer preset against a cheaper cut of it, at equal wall-clock (issue 19 item 2).

``python -m benchmarks.preset_cuts --preset NAME [--cut JSON] [--cut-training JSON] [--seconds S] [--seeds 0,1]
[--quick] [--tag T]``; ``--cut`` holds the model fields the cut changes, e.g. ``'{"patch": [4]}'``,
``--cut-training`` its training fields, e.g. ``'{"mixed_precision": "auto"}'``; ``--tag`` names a second
result file of the same preset. ``--preset`` is the one measured first: give the shipped preset and the
variant to weigh against it (the cut may also be the more expensive side).

Method:

* FLOPs: the train step (forward and backward of the loss) of each, per input value, with
  ``torch.utils.flop_counter``, against the peer's 118 kFLOP per value of a 64x64x3 image (BENCHMARKS §13).
* Step times: both train steps timed side by side in one process, one thread, interleaved rounds, medians.
* Equal wall-clock: the preset trains its own ``max_steps`` (or the steps that take ``--seconds``: the GPU
  presets' 20,000 steps do not fit a CPU run); the cut trains the steps that take the same time by those step
  times (schedules scaled to them: warmup as the preset, level dropout annealed over half of the steps as the
  shipped presets do). Both run at the same time, each ``tokgen train-tokenizer`` in its own process with one
  thread, so both see the same machine load; then ``tokgen evaluate-tokenizer`` scores each on the held-out split
  (every metric of the protocol but the slow FD-VGG16).

``--quick`` trains each for a tenth of the time (a smoke run, not a result).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, count_flops, interleaved, machine_info, median, table, write_result
from benchmarks.peer_vqvae import PEER_TRAIN_FLOPS_PER_64PX_IMAGE, TokgenSide, preset_input

PEER_FLOPS_PER_VALUE = PEER_TRAIN_FLOPS_PER_64PX_IMAGE / (3 * 64 * 64)  # 118 kFLOP
METRICS = {"audio": ("snr_db", "si_sdr_db", "stoi", "mel_distance_multiscale"),
           "image": ("psnr_db", "ssim", "lpips"), "video": ("psnr_db", "ssim", "lpips")}


def variant(name: str, cut: dict, training: dict | None = None) -> dict:
    """The preset's values with ``cut`` merged into its model fields (nested ones, e.g. the quantizer's, key by key)
    and ``training`` into its training fields."""
    from harness.config import merge, preset

    if "model" in (training or {}):
        raise ValueError("the training fields of a cut cannot hold 'model': give model fields as the cut")
    return merge(preset(name), {**(training or {}), "model": cut})


def _side(values: dict, run_dir: Path) -> TokgenSide:
    """Timed in the precision ``train-tokenizer`` trains the values in (``auto`` resolved on this machine)."""
    return TokgenSide(values, values["size"], values["batch_size"], run_dir, values.get("mixed_precision") or "no")


def cost(values: dict[str, dict]) -> dict[str, dict]:
    """{side: FLOPs per input value and seconds per train step}, measured side by side in this process."""
    import torch

    torch.set_num_threads(1)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        sides = {k: _side(v, Path(tmp) / k) for k, v in values.items()}
        cfg = sides["preset"].cfg
        x = preset_input(cfg).repeat_interleave(cfg.batch_size, dim=0)  # speed and FLOPs do not depend on values
        for k, side in sides.items():
            flops = count_flops(lambda: side.model(x).loss.backward())
            side.model.zero_grad(set_to_none=True)
            out[k] = {"flops_per_value": flops / x.numel(), "parameters": sum(p.numel() for p in side.parameters())}
        times = interleaved({k: (lambda s=s: s.train_step(x)) for k, s in sides.items()}, repeats=7, warmup=2)
    for k in out:
        out[k]["step_seconds"] = median(times[k])
    return out


def training_config(values: dict, steps: int, seed: int) -> dict:
    run = {**values, "max_steps": steps, "checkpoint_every": steps, "image_every": 0, "seed": seed, "log_with": "none"}
    if "level_dropout_steps" in values:
        run["level_dropout_steps"] = steps // 2
    return run


def train_both(configs: dict[str, dict], folder: Path) -> dict[str, float]:
    """Both trainings at once, one process and one thread each; {side: wall seconds until it ended}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs, start = {}, time.perf_counter()
    for k, cfg in configs.items():
        (folder / f"{k}.json").write_text(json.dumps(cfg))
        cmd = [sys.executable, "-m", "pipelines.cli", "train-tokenizer", "--config", str(folder / f"{k}.json"),
               "--out", str(folder / k), "--quiet"]
        with open(folder / f"{k}.log", "w") as log:
            procs[k] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
    seconds = {}
    while len(seconds) < len(procs):  # polled, so each side's time is its own, not the slower one's
        for k, proc in procs.items():
            if k not in seconds and proc.poll() is not None:
                seconds[k] = time.perf_counter() - start
                if proc.returncode:
                    for other in procs.values():
                        other.kill()
                    raise RuntimeError(f"train-tokenizer ({k}) failed:\n{(folder / f'{k}.log').read_text()[-3000:]}")
        time.sleep(0.5)
    return seconds


def evaluate(run: Path, values: dict) -> dict:
    cmd = [sys.executable, "-m", "pipelines.cli", "evaluate-tokenizer", str(run), "--out", str(run / "eval"),
           "--data", values["data"], "--no-fd-vgg16", "--quiet", "--json"]  # reader options: from the run's config
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if done.returncode:
        raise RuntimeError(f"evaluate-tokenizer {run} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def run(preset_name: str, cut: dict, seeds: list[int], quick: bool, seconds: float | None = None,
        training: dict | None = None) -> dict:
    values = {"preset": variant(preset_name, {}), "cut": variant(preset_name, cut, training)}
    costs = cost(values)
    budget = (seconds or values["preset"]["max_steps"] * costs["preset"]["step_seconds"]) * (0.1 if quick else 1.0)
    steps = {k: max(2, int(budget / costs[k]["step_seconds"])) for k in values}
    rows = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            wall = train_both({k: training_config(v, steps[k], seed) for k, v in values.items()}, folder)
            for k, v in values.items():
                rows.append({"seed": seed, "side": k, "steps": steps[k], "train_seconds": wall[k],
                             "metrics": evaluate(folder / k, v)})
    return {"preset": preset_name, "cut": cut, "cut_training": training or {}, "costs": costs,
            "budget_seconds": budget, "steps": steps, "rows": rows}


def markdown(result: dict) -> str:
    modality = variant(result["preset"], {})["model"]["modality"]
    names = METRICS[modality]
    changed = {**result["cut"], **result.get("cut_training", {})}
    label = {"preset": result["preset"], "cut": f"cut {json.dumps(changed)}"}
    rows = []
    for r in result["rows"]:
        c, m = result["costs"][r["side"]], r["metrics"]
        usage = m.get("codebook_usage_per_level") or [m.get("codebook_usage")]
        rows.append([r["seed"], label[r["side"]], f"{c['flops_per_value'] / PEER_FLOPS_PER_VALUE:.2f}x",
                     f"{c['step_seconds'] * 1e3:.0f}", r["steps"], f"{r['train_seconds']:.0f}"]
                    + [f"{m[n]:.4g}" for n in names] + [" / ".join(f"{u:.2f}" for u in usage)])
    return table(["seed", "model", "FLOPs per value vs peer", "ms a step (1 thread)", "steps", "train s"]
                 + list(names) + ["codes used (per level)"], rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.preset_cuts", description=__doc__.split("\n")[0])
    p.add_argument("--preset", required=True)
    p.add_argument("--cut", default={}, type=json.loads, help="model fields of the variant, as JSON")
    p.add_argument("--cut-training", default={}, type=json.loads,
                   help="training fields of the variant, as JSON (e.g. '{\"mixed_precision\": \"auto\"}')")
    p.add_argument("--seconds", type=float, help="training time of each side (default: the preset's max_steps)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tag", help="suffix of the result file, so a second cut of a preset keeps the first's file")
    args = p.parse_args(argv)
    if not args.cut and not args.cut_training:
        p.error("give --cut, --cut-training or both: what the variant changes")
    start, info = time.time(), machine_info()
    result = run(args.preset, args.cut, [int(s) for s in args.seeds.split(",")], args.quick, args.seconds,
                 args.cut_training)
    result["markdown"] = markdown(result)
    print(result["markdown"])
    name = ".".join(["preset_cuts", args.preset] + ([args.tag] if args.tag else []) + (["quick"] if args.quick else []))
    command = "python -m benchmarks.preset_cuts " + " ".join(
        [f"--preset {args.preset}"] + ([f"--cut '{json.dumps(args.cut)}'"] if args.cut else [])
        + ([f"--cut-training '{json.dumps(args.cut_training)}'"] if args.cut_training else [])
        + [f"--seeds {args.seeds}"]
        + ([f"--seconds {args.seconds:g}"] if args.seconds else [])
        + (["--quick"] if args.quick else []) + ([f"--tag {args.tag}"] if args.tag else []))
    print(f"\n({write_result(name, result, info, command, time.time() - start)})")


if __name__ == "__main__":
    main()
