"""Are a demo's samples as recognizable as its tokenizer allows? The judge on real, reconstructed and sampled items.

Method: ``pipelines.judge`` trains its classifiers on the real training items of the demo's dataset (the
tokenizer's resolved training config, at the demo's export size), seeded by ``--seed`` (0: the demo's judge). It then
labels every held-out real item, the tokenizer's reconstruction of each of them, and the demo's samples as written
(``samples.npy`` with ``labels.npy``; the spoken-digits demo writes 100 of the 400 it judges). Reconstruction accuracy
is the most the samples can be expected to reach.
A last column checks the judge itself: the real items with white noise at ``NOISE_SNR_DB`` (relative to
each item's RMS; clearly audible or visible, but leaving the class obvious to a person) should be labelled
about as well as the clean ones.

``python -m benchmarks.judge DEMO_DIR [DEMO_DIR ...]`` (folders written by ``tokgen demo``)
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_info, table, write_result


NOISE_SNR_DB = 30.0


def with_noise(x: torch.Tensor, snr_db: float, generator: torch.Generator) -> torch.Tensor:
    """x (N, C, *S) plus white noise ``snr_db`` below each item's RMS."""
    rms = x.flatten(1).square().mean(1).sqrt().view(-1, *[1] * (x.dim() - 1))
    return x + torch.randn(x.shape, generator=generator) * rms * 10 ** (-snr_db / 20)


def judge_demo(demo: Path, seed: int = 0) -> dict:
    from data import collate_samples
    from pipelines.demo import DEMOS
    from harness.config import config_from_dict
    from pipelines.judge import train_judge
    from stage1_tokenizer.registry import load_tokenizer
    from stage1_tokenizer.train import TokenizerTrainConfig, build_dataset

    metrics = json.loads((demo / "metrics.json").read_text())
    cfg = config_from_dict(TokenizerTrainConfig, json.loads((demo / "tokenizer_run" / "config.json").read_text()))
    cfg = replace(cfg, size=DEMOS[metrics["dataset"]].export_size or cfg.size)
    m = cfg.model_config
    labels = torch.from_numpy(np.load(demo / "labels.npy"))
    samples = torch.from_numpy(np.load(demo / "samples.npy"))
    if m.modality == "video":  # samples.npy is (N, T, C, H, W); the tokenizer's layout is (N, C, T, H, W)
        samples = samples.transpose(1, 2)
    num_classes = int(labels.max()) + 1
    judged = train_judge(build_dataset(cfg, "train"), m.modality, num_classes, m.sample_rate or 16000, seed=seed)
    tokenizer = load_tokenizer(demo / "tokenizer_run" / "model").eval()
    held_out = build_dataset(cfg, "eval")
    real, recon, noisy = [], [], []
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, len(held_out), 64):
        batch = collate_samples([held_out[i] for i in range(start, min(start + 64, len(held_out)))])
        x, y = batch["x"], batch["label"]
        low = -1 if m.modality == "audio" else 0
        real.append(judged.hits(x, y))
        noisy.append(judged.hits(with_noise(x, NOISE_SNR_DB, generator).clamp(low, 1), y))
        with torch.no_grad():
            recon.append(judged.hits(tokenizer.decode(tokenizer.encode(x)).clamp(low, 1), y))
    return {"dataset": metrics["dataset"], "real": float(torch.cat(real).mean()),
            "reconstructions": float(torch.cat(recon).mean()), "samples": float(judged.hits(samples, labels).mean()),
            f"real_noise_{NOISE_SNR_DB:g}db": float(torch.cat(noisy).mean()),
            "num_real": len(held_out), "num_samples": len(samples)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.judge")
    p.add_argument("demos", nargs="+", type=Path)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    started = time.perf_counter()
    rows = [judge_demo(d, args.seed) for d in args.demos]
    noisy = f"real_noise_{NOISE_SNR_DB:g}db"
    print(table(["demo", "dataset", "real", "reconstructions", "samples", "held-out items", "samples n",
                 f"real + noise at {NOISE_SNR_DB:g} dB SNR"],
                [[str(d), r["dataset"], r["real"], r["reconstructions"], r["samples"], r["num_real"], r["num_samples"],
                  r[noisy]] for d, r in zip(args.demos, rows)]))
    write_result("judge", {"rows": [{"demo": str(d), **r} for d, r in zip(args.demos, rows)]}, machine_info(),
                 "python -m benchmarks.judge " + " ".join(map(str, args.demos)), time.perf_counter() - started)


if __name__ == "__main__":
    main()
