"""``tokgen demo``: the whole two-stage workflow on built-in data, end to end.

digits: train the tokenizer, evaluate it, export tokens to shards, train a class-conditional prior,
save the pipeline, sample 10 images of every digit (row i = digit i), and write pictures and metrics.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipelines.config import preset
from pipelines.hub import config_from_dict

DATASETS = ("digits",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits", choices=DATASETS)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tokenizer-steps", type=int, help="override the tokenizer's training steps")
    p.add_argument("--prior-steps", type=int, help="override the prior's training steps")
    p.add_argument("--samples-per-class", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")


class Stages:
    """Times each stage and prints a header so a long run reads as a sequence of steps."""

    def __init__(self, quiet: bool):
        self.times: dict[str, float] = {}
        self.quiet = quiet

    def run(self, name: str, fn, *args, **kwargs):
        if not self.quiet:
            print(f"\n== {name} ==", flush=True)
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        self.times[name] = round(time.perf_counter() - started, 2)
        return result


def run_digits(args: argparse.Namespace) -> dict:
    from data import build_dataset
    from pipelines.pipeline import TokgenPipeline
    from pipelines.sample import generate
    from pipelines.media import save_comparison, save_image_grid
    from stage1_tokenizer import VQVAE
    from stage1_tokenizer import train as tok_train
    from stage1_tokenizer.evaluate import evaluate
    from stage2_prior import train as prior_train
    from stage2_prior.export import export_tokens

    out, stages, started = args.out, Stages(args.quiet), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    tok_cfg = config_from_dict(tok_train.TokenizerTrainConfig, preset("tokenizer-digits"))
    tok_cfg = replace(tok_cfg, seed=args.seed, max_steps=args.tokenizer_steps or tok_cfg.max_steps)
    model_dir = stages.run("train tokenizer", tok_train.train, tok_cfg, out / "tokenizer_run", quiet=args.quiet)
    tokenizer = VQVAE.from_pretrained(model_dir)

    def dataset(split):
        return build_dataset("digits", split=split, size=tok_cfg.size, channels=tok_cfg.model_config.in_channels)

    tok_metrics = stages.run("evaluate tokenizer", evaluate, tokenizer, dataset("eval"), lpips=True,
                             preview_path=out / "reconstructions.png", quiet=args.quiet)
    stages.run("export tokens", export_tokens, tokenizer, {"train": dataset("train"), "eval": dataset("eval")},
               out / "tokens", batch_size=128, shard_size=1000, progress=not args.quiet, seed=args.seed,
               source="digits")
    prior_cfg = config_from_dict(prior_train.PriorTrainConfig, {**preset("prior-digits"), "tokens": str(out / "tokens")})
    prior_cfg = replace(prior_cfg, seed=args.seed, max_steps=args.prior_steps or prior_cfg.max_steps)
    stages.run("train prior", prior_train.train, prior_cfg, out / "prior_run", quiet=args.quiet)
    pipe = TokgenPipeline.from_runs(model_dir, [out / "prior_run"], class_names=[str(d) for d in range(10)])
    pipe.save_pretrained(out / "pipeline")
    per_class = args.samples_per_class
    labels = torch.arange(10).repeat_interleave(per_class)
    samples, codes, seconds = stages.run("sample", generate, pipe, len(labels), labels, args.seed, 100,
                                         quiet=args.quiet)
    np.save(out / "samples.npy", samples.numpy(), allow_pickle=False)
    np.save(out / "labels.npy", labels.numpy(), allow_pickle=False)
    np.save(out / "codes.npy", codes[0].numpy().astype(np.uint8 if tokenizer.codebook_sizes[0] <= 256 else np.int32),
            allow_pickle=False)
    save_image_grid(samples, out / "samples.png", nrow=per_class)
    prior_info = json.loads((out / "prior_run" / "prior.json").read_text())["eval"]
    metrics = {
        "dataset": "digits",
        "tokenizer": {k: tok_metrics[k] for k in ("psnr_db", "ssim", "codebook_usage", "perplexity",
                                                   "codes_per_input", "compression_ratio") if k in tok_metrics}
        | ({"lpips": tok_metrics["lpips"]} if "lpips" in tok_metrics else {}),
        "prior": {"bits_per_token": prior_info["bits_per_token"], "bits_per_dim": prior_info["bits_per_dim"],
                  "bits_per_sample": prior_info["bits_per_sample"]},
        "sampling": {"num_samples": len(labels), "seconds": seconds,
                     "tokens_per_s": len(labels) * pipe.priors[0].num_tokens / seconds},
        "timing": {**{f"{k.replace(' ', '_')}_s": v for k, v in stages.times.items()},
                   "total_s": round(time.perf_counter() - started, 2)},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def summary(metrics: dict, out: Path) -> str:
    t, p, s = metrics["tokenizer"], metrics["prior"], metrics["sampling"]
    return "\n".join([
        "",
        f"tokgen demo ({metrics['dataset']}) finished in {metrics['timing']['total_s']:.0f} s",
        f"  tokenizer: {t['psnr_db']:.2f} dB PSNR held-out, codebook usage {t['codebook_usage']:.2f}",
        f"  prior:     {p['bits_per_token']:.3f} bits/token, {p['bits_per_dim']:.4f} bits/dim held-out",
        f"  sampling:  {s['tokens_per_s']:.0f} tokens/s",
        f"  look at:   {out / 'samples.png'} (row i = digit i), {out / 'reconstructions.png'}",
        f"  pipeline:  {out / 'pipeline'}  (try: tokgen sample {out / 'pipeline'} --num 16 --class 3 --out samples3)",
    ])


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> dict:
    if args is None:
        parser = argparse.ArgumentParser(prog="tokgen demo")
        add_arguments(parser)
        args = parser.parse_args(argv)
    metrics = run_digits(args)
    print(summary(metrics, args.out))
    return metrics
