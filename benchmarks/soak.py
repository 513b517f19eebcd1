"""Soak: tokenizer training killed with SIGKILL after every Nth checkpoint and resumed, again and again.

The run must end with exactly the weights of an uninterrupted run (same seed), and each resumed
process's peak memory must stay flat across cycles (no growth from reloading state).

    python -m benchmarks.soak [--steps 200] [--every 20] [--data digits]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def _cmd(*args: str) -> list[str]:
    # /usr/bin/time would add a dependency; the child reports its own peak RSS through getrusage.
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak.
    wrapper = ("import re, runpy, sys; sys.argv = ['tokgen'] + sys.argv[1:]; "
               "exec('try:\\n runpy.run_module(\"pipelines.cli\", run_name=\"__main__\")\\n"
               "finally:\\n print(\"PEAK_RSS_KB\", re.search(r\"VmHWM:\\\\s+(\\\\d+)\", "
               "open(\"/proc/self/status\").read()).group(1), file=sys.stderr)')")
    return [sys.executable, "-c", wrapper, *args]


def _peak(stderr: str) -> int | None:
    for line in stderr.splitlines()[::-1]:
        if line.startswith("PEAK_RSS_KB"):
            return int(line.split()[1])
    return None


def run_cycle(args: list[str], run: Path, kill_at: int | None) -> tuple[bool, int | None]:
    """One process: until killed after checkpoint ``kill_at`` (None: to the end). Returns (finished, peak KB)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(_cmd(*args), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    if kill_at is None:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(err[-2000:])
        return True, _peak(err)
    target = run / "checkpoints" / f"step_{kill_at:08d}" / "index.json"
    while not target.exists():
        if proc.poll() is not None:
            return True, _peak(proc.stderr.read())
        time.sleep(0.05)
    peak = _read_rss(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return False, peak


def _read_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=20, help="checkpoint interval; killed after each checkpoint")
    p.add_argument("--data", default="digits")
    opts = p.parse_args(argv)
    base = ["train-tokenizer", "--data", opts.data, "--max-steps", str(opts.steps), "--checkpoint-every",
            str(opts.every), "--seed", "0", "--quiet"]
    with TemporaryDirectory() as tmp:
        straight, soaked = Path(tmp) / "straight", Path(tmp) / "soaked"
        started = time.perf_counter()
        _, straight_peak = run_cycle([*base, "--out", str(straight)], straight, None)
        straight_s = time.perf_counter() - started
        peaks, cycles, started = [], 0, time.perf_counter()
        finished = False
        while not finished:
            kill_at = min(opts.steps, (cycles + 1) * opts.every)
            resume = ["--resume"] if cycles else []
            finished, peak = run_cycle([*base, "--out", str(soaked), *resume], soaked,
                                       None if kill_at >= opts.steps else kill_at)
            peaks.append(peak)
            cycles += 1
        soaked_s = time.perf_counter() - started
        a = load_file(str(straight / "model" / "model.safetensors"))
        b = load_file(str(soaked / "model" / "model.safetensors"))
        max_diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    result = {
        "command": "python -m benchmarks.soak " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "steps": opts.steps, "checkpoint_every": opts.every, "processes": cycles,
        "max_abs_weight_diff": max_diff, "identical_within_1e-6": max_diff <= 1e-6,
        "uninterrupted_s": round(straight_s, 1), "soaked_s": round(soaked_s, 1),
        "uninterrupted_peak_rss_mb": straight_peak and round(straight_peak / 1024, 1),
        "peak_rss_mb_per_process": [p and round(p / 1024, 1) for p in peaks],
    }
    out = ROOT / "benchmarks" / "results" / "soak.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
