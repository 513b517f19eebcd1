"""Moving-digits variants, and prior variants of any single-level demo, scored as the demo scores itself
(BENCHMARKS.md §10a, §10b).

``tokenizer OUT '{"model": {...}, "max_steps": 500}'``: train the moving-digits tokenizer preset with these
overrides into ``OUT/tokenizer_run``, then report the held-out per-frame PSNR and SSIM, codebook usage, and
the share of the tokenizer's reconstructions of the held-out clips that the demo's judge
(``pipelines.judge``, trained on the real training clips, seed 0) labels as their digit.

``prior DEMO_DIR OUT '{"model": {"relative_bias": true}}' [--per-class 10] [--temperatures 1.0,0.8]
[--guidances 1,2]``: train the prior preset of a single-level class-conditional ``tokgen demo`` folder
(moving-digits; also spoken-digits or digits) with these overrides on its tokens, report its held-out
bits/token, then sample ``per-class`` items of every class with the demo's tokenizer at each temperature
and classifier-free guidance scale, and report the share the judge labels as the class asked for.

``step [--rounds 6]``: seconds per tokenizer train step (forward, loss, backward, Adam; batch 8 of
8 x 64 x 64 clips) of the previous video preset (8/16/32/32 channels at full resolution) with its convs
in the default layout and channels-last, and of the shipped preset (patch 1x2x2), interleaved round by
round in one process; medians after one warm-up round. Prints and returns the medians, writes nothing.

Each of the first two writes ``OUT/result.json`` with the resolved config and the figures; an existing trained model in
OUT is reused (re-scoring costs seconds). ``python -m benchmarks.video_variants {tokenizer,prior} ...``
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import machine_info
from harness.config import merge, preset
from harness.config import config_from_dict


def _judge(tokenizer_cfg):
    from pipelines.judge import train_judge
    from stage1_tokenizer.train import build_dataset

    return train_judge(build_dataset(tokenizer_cfg, "train"), "video", 10, seed=0)


def tokenizer_variant(out: Path, overrides: dict) -> dict:
    from data import collate_samples
    from stage1_tokenizer import train as tok_train
    from stage1_tokenizer.evaluate import evaluate
    from stage1_tokenizer.registry import load_tokenizer

    cfg = config_from_dict(tok_train.TokenizerTrainConfig, merge(preset("tokenizer-moving-digits"), overrides))
    started = time.perf_counter()
    model_dir = out / "tokenizer_run" / "model"
    if not model_dir.is_dir():
        tok_train.train(cfg, out / "tokenizer_run", quiet=True)
    train_s = time.perf_counter() - started
    tokenizer = load_tokenizer(model_dir).eval()
    held_out = tok_train.build_dataset(cfg, "eval")
    metrics = evaluate(tokenizer, held_out, lpips=False, preview_path=out / "reconstructions.png", quiet=True)
    judge, hits = _judge(cfg), []
    for start in range(0, len(held_out), 50):
        batch = collate_samples([held_out[i] for i in range(start, min(start + 50, len(held_out)))])
        with torch.no_grad():
            hits.append(judge.hits(tokenizer.decode(tokenizer.encode(batch["x"])).clamp(0, 1), batch["label"]))
    return {"train_s": round(train_s, 1), "psnr_db": metrics["psnr_db"], "ssim": metrics["ssim"],
            "codebook_usage": metrics["codebook_usage"], "reconstructions_judged": float(torch.cat(hits).mean()),
            "config": json.loads((out / "tokenizer_run" / "config.json").read_text())}


def prior_variant(demo: Path, out: Path, overrides: dict, per_class: int, temperatures: list[float],
                  guidances: list[float]) -> dict:
    from dataclasses import replace

    from pipelines.demo import DEMOS
    from pipelines.judge import train_judge
    from data.pictures import write_samples
    from pipelines.pipeline import TokgenPipeline
    from pipelines.sample import generate
    from stage2_prior.sampling import SamplingOptions
    from stage1_tokenizer.train import TokenizerTrainConfig, build_dataset
    from stage2_prior import train as prior_train

    dataset = json.loads((demo / "metrics.json").read_text())["dataset"]
    spec = DEMOS[dataset]
    if len(spec.priors) != 1:
        raise ValueError("prior variants are for single-level demos")
    values = merge(preset(spec.priors[0]), {**overrides, "tokens": str(demo / "tokens"), "level": 0})
    cfg = config_from_dict(prior_train.PriorTrainConfig, values)
    started = time.perf_counter()
    if not (out / "model").is_dir():
        prior_train.train(cfg, out, quiet=True)
    train_s = time.perf_counter() - started
    info = json.loads((out / "prior.json").read_text())["eval"]
    pipe = TokgenPipeline.from_runs(demo / "tokenizer_run" / "model", [out], class_names=[str(c) for c in range(10)])
    tok_cfg = config_from_dict(TokenizerTrainConfig, json.loads((demo / "tokenizer_run" / "config.json").read_text()))
    sized = replace(tok_cfg, size=spec.export_size or tok_cfg.size)  # the items the prior learned, as the demo judges
    modality, rate = pipe.modality, tok_cfg.model_config.sample_rate or 16000
    judge = train_judge(build_dataset(sized, "train"), modality, 10, sample_rate=rate, seed=0)
    labels = torch.arange(10).repeat_interleave(per_class)
    result = {"dataset": dataset, "train_s": round(train_s, 1),
              "bits_per_token": info["bits_per_token"], "num_samples": len(labels), "samples_judged": {},
              "config": json.loads((out / "config.json").read_text())}
    for g in guidances:
        for t in temperatures:
            samples, _, _ = generate(pipe, len(labels), labels, 0, 100, SamplingOptions(temperature=t, guidance=g),
                                     quiet=True)
            key = str(t) if g == 1.0 else f"{t}, guidance {g}"
            result["samples_judged"][key] = float(judge.hits(samples, labels).mean())
            print(key, result["samples_judged"][key], flush=True)
            if t == temperatures[0]:  # two of every digit to look at (audio: WAVs and spectrograms)
                write_samples(modality, samples.view(10, per_class, *samples.shape[1:])[:, :2].flatten(0, 1),
                              out / ("look" if g == 1.0 else f"look_guidance_{g}"), nrow=2, sample_rate=rate)
    return result


PREVIOUS_VIDEO = {"channels": [8, 16, 32, 32], "factors": [2, 8, 8], "patch": None}


def step_times(rounds: int) -> dict:
    from stage1_tokenizer import modules
    from stage1_tokenizer.train import TokenizerTrainConfig
    from stage1_tokenizer.vqvae import VQVAE

    shipped = preset("tokenizer-moving-digits")
    previous = merge(shipped, {"model": PREVIOUS_VIDEO})
    variants = {"previous preset, default layout": (previous, False), "previous preset, channels-last": (previous, True),
                "shipped preset (patch 1x2x2), channels-last": (shipped, True)}
    built = {}
    for name, (values, last) in variants.items():
        torch.manual_seed(0)
        model = VQVAE(config_from_dict(TokenizerTrainConfig, values).model_config)
        if not last:
            model = model.to(memory_format=torch.contiguous_format)
        built[name] = (model, torch.optim.Adam(model.parameters()), last)
    times = {name: [] for name in variants}
    convert = modules.as_conv_input
    try:
        for _ in range(rounds + 1):
            for name, (model, optimizer, last) in built.items():
                modules.as_conv_input = convert if last else (lambda x: x)  # the default layout all through
                x = torch.rand(8, 1, 8, 64, 64)
                started = time.perf_counter()
                model(x).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                times[name].append(time.perf_counter() - started)
    finally:
        modules.as_conv_input = convert
    return {name: round(sorted(t[1:])[len(t[1:]) // 2], 3) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.video_variants", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("tokenizer")
    t.add_argument("out", type=Path)
    t.add_argument("overrides", nargs="?", default="{}", help="JSON merged into the tokenizer preset")
    q = sub.add_parser("prior")
    q.add_argument("demo", type=Path, help="a single-level class-conditional `tokgen demo` folder "
                                           "(moving-digits, spoken-digits, digits)")
    q.add_argument("out", type=Path)
    q.add_argument("overrides", nargs="?", default="{}", help="JSON merged into the prior preset")
    q.add_argument("--per-class", type=int, default=10)
    q.add_argument("--temperatures", default="1.0")
    q.add_argument("--guidances", default="1.0", help="classifier-free guidance scales to sample with")
    s = sub.add_parser("step")
    s.add_argument("--rounds", type=int, default=6)
    args = p.parse_args(argv)
    if args.what == "step":
        print(json.dumps({"median_step_s": step_times(args.rounds), "machine": machine_info()}))
        return
    overrides = json.loads(args.overrides)
    if args.what == "tokenizer":
        result = tokenizer_variant(args.out, overrides)
    else:
        if args.per_class < 2:
            p.error("--per-class must be at least 2")
        result = prior_variant(args.demo, args.out, overrides, args.per_class,
                               [float(x) for x in args.temperatures.split(",")],
                               [float(x) for x in args.guidances.split(",")])
    result["machine"] = machine_info()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("config", "machine")}))


if __name__ == "__main__":
    main()
