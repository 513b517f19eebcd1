"""train-prior streams its tokens: peak memory stays flat as the token set grows, at the in-memory path's speed.

Method: token folders of N, 10 N and 100 N samples shaped like the digits demo's (N = 1,497 training samples of
8x8 codes from a 128-code book, 10 classes; shards of 1,000 samples) are written with ``data.token_writer`` from
random codes (the prior's cost does not depend on what the codes are). For each size, a fresh process trains the
digits prior preset (``prior-digits``: transformer dim 128, 3 layers, batch 32, class dropout 0.1) for K steps
through ``stage2_prior.train.train``, reading the tokens either as ``tokgen train-prior`` does (streaming
``TokenDataset``: shuffle buffer 1,000) or the way it did before (the whole split in memory: ``load_all``, then an
in-memory dataset). Reported per run: the peak RSS increase over the process's RSS before training (imports
done; the high-water mark reset), the training-step rate after 10 warm-up steps (median of the per-step
times) and the median time the loop waits for a batch (all of the reader's cost with no data-loader workers).
K = 500 steps: memory reaches its plateau once the shuffle buffer has turned over. Runs alternate sizes and modes
round by round.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import PeakRSS, median, run_worker, table

N = 1497  # the digits demo's training samples
GRID, VOCAB, CLASSES = (8, 8), 128, 10


def write_tokens(out: Path, samples: int, seed: int = 0) -> Path:
    """A token folder of ``samples`` training samples of random codes (no eval split)."""
    from data.token_writer import ShardWriter, TokenizerInfo, build_manifest, mark_done
    from harness.folders import write_json

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    settings = {"tokenizer_fingerprint": "0" * 64, "world_size": 1, "shard_size": 1000, "dataset_size": samples,
                "seed": seed}
    writer = ShardWriter(out, "train", 0, settings, [VOCAB])
    for start in range(0, samples, 100):
        n = min(100, samples - start)
        codes = torch.randint(0, VOCAB, (n, *GRID), generator=g)
        batch = {"x": torch.zeros(n, 1, 32, 32), "key": [f"s{start + i}" for i in range(n)],
                 "label": torch.arange(start, start + n) % CLASSES, "skipped": []}
        writer.write((start // 1000), list(range(start, start + n)), batch, [codes])
        if writer.count >= 1000:
            writer.close()
    writer.close()
    mark_done(out, "train", 0, settings)
    info = TokenizerInfo("0" * 64, "image", [VOCAB], lambda shape: [GRID])
    write_json(out / "manifest.json", build_manifest(out, ["train"], 1, info, None, 0.0, "synthetic"))
    return out


class InMemory(torch.utils.data.Dataset):
    """What train-prior did before it streamed: the whole split loaded (``load_all``) and indexed."""

    def __init__(self, tokens: str, split: str, levels: list[int]):
        from data.tokens import load_all

        self.codes, self.labels, self.keys = load_all(tokens, split, levels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"codes": [c[i] for c in self.codes], "label": int(self.labels[i]), "key": self.keys[i]}


def worker(tokens: str, mode: str, steps: int) -> dict:
    """Train the digits prior for ``steps`` steps on ``tokens``; peak RSS increase and step times."""
    from harness import data_order
    from harness.config import config_from_dict, preset
    from stage2_prior import train as prior_train

    if mode == "memory":
        prior_train.token_stream = lambda cfg, split, accelerator, shuffle: (
            InMemory(cfg.tokens, split, [cfg.level]) if split == "train" else None)
    stamps: list[float] = []
    step = prior_train.train_step

    def timed(*args, **kwargs):
        out = step(*args, **kwargs)
        stamps.append(time.perf_counter())
        return out

    prior_train.train_step = timed
    waits: list[float] = []  # time the loop waits for each batch: the reader's whole cost on one process
    next_batch = data_order.BatchStream.__next__

    def timed_next(self):
        t0 = time.perf_counter()
        out = next_batch(self)
        waits.append(time.perf_counter() - t0)
        return out

    data_order.BatchStream.__next__ = timed_next
    values = {**preset("prior-digits"), "tokens": tokens, "max_steps": steps, "checkpoint_every": 0,
              "eval_every": 0, "log_with": "none", "warmup_steps": 10}
    if mode.startswith("stream") and mode != "stream":
        values["num_workers"] = int(mode[len("stream"):])
    cfg = config_from_dict(prior_train.PriorTrainConfig, values)
    with tempfile.TemporaryDirectory() as run, PeakRSS() as rss:
        started = time.perf_counter()
        prior_train.train(cfg, Path(run), quiet=True)
        seconds = time.perf_counter() - started
    gaps = [b - a for a, b in zip(stamps[10:], stamps[11:])]
    return {**rss.as_dict(), "seconds": seconds, "median_step_s": median(gaps), "steps": len(stamps),
            "median_batch_wait_s": median(waits[10:])}


def run(quick: bool = False) -> dict:
    sizes = [N, 10 * N] if quick else [N, 10 * N, 100 * N]
    steps, rounds = (40, 1) if quick else (500, 2)  # 500 steps: past the shuffle buffer's warm-up, memory at its plateau
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="tokgen-stream-") as tmp:
        folders = {n: write_tokens(Path(tmp) / f"tokens-{n}", n) for n in sizes}
        for _ in range(rounds):
            for n in sizes:
                for mode in ("stream", "memory"):
                    out = run_worker("benchmarks.prior_stream", [str(folders[n]), mode, str(steps)])
                    results.setdefault(f"{mode} {n}", []).append(out)
    rows, summary = [], {}
    for key, runs in results.items():
        mode, n = key.split()
        peak, step = median([r["peak_increase_mib"] for r in runs]), median([r["median_step_s"] for r in runs])
        wait = median([r["median_batch_wait_s"] for r in runs])
        summary[key] = {"samples": int(n), "mode": mode, "peak_increase_mib": peak, "median_step_s": step,
                        "median_batch_wait_s": wait, "seconds": median([r["seconds"] for r in runs]), "runs": runs}
        rows.append([mode, int(n), round(peak, 1), round(1 / step, 2), round(1000 * wait, 2),
                     round(summary[key]["seconds"], 1)])
    for n in sizes:
        summary[f"speed stream/memory {n}"] = summary[f"memory {n}"]["median_step_s"] / summary[f"stream {n}"]["median_step_s"]
    markdown = table(["reader", "training samples", "peak RSS increase (MiB)", "steps/s", "wait per batch (ms)",
                      "run (s)"], rows)
    ratios = ", ".join(f"{n}: {summary[f'speed stream/memory {n}']:.2f}" for n in sizes)
    return {"title": "train-prior: streaming tokens vs the whole split in memory",
            "markdown": markdown + f"\n\nstreaming speed / in-memory speed: {ratios}", "results": summary,
            "steps": steps, "rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prior_stream", description=__doc__.split("\n")[0])
    p.add_argument("--worker", nargs=3, metavar=("TOKENS", "MODE", "STEPS"), help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.worker:
        tokens, mode, steps = args.worker
        print(json.dumps(worker(tokens, mode, int(steps))))
        return 0
    result = run(args.quick)
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
