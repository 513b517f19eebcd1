"""Quantizers at matched bitrate (issue 18): VQ, residual VQ of 2 and 4 stages, FSQ and LFQ in one tokenizer,
trained on the same data for the same steps, each with a small prior on its exported tokens.

Method. A testbed is a demo's tokenizer preset and its prior preset(s) (``TESTBEDS``): ``speech`` the spoken-digits
demo (1-D VQ-VAE, 32x hop, 500 positions a second; WaveNet prior), ``photos`` the photos demo (2-level VQ-VAE-2
on 32 px crops; gated PixelCNN per level), ``video`` the moving-digits demo (3-D VQ-VAE; transformer prior). Every variant replaces only the preset's ``quantizer`` kind and size,
so that each position of each level carries the testbed's ``bits`` bits (``VARIANTS``: a 2^bits-code VQ, RVQ
stages of 2^(bits / k) codes, FSQ levels whose product is 2^bits, LFQ with ``bits`` bits); the network, the seed,
the data order and the steps are the preset's (``--tokenizer-steps``, ``--prior-steps`` override the steps of all
variants alike). Per variant, one after the other in this process (one torch thread with ``--threads 1``):

1. ``stage1_tokenizer.train.train`` with the variant's config (the preset's losses: STFT and mel for speech);
2. held-out reconstruction metrics by ``stage1_tokenizer.evaluate.evaluate`` under benchmarks/PROTOCOL.md, on the
   items the demo evaluates (spoken digits: the 400 held-out 0.512 s clips; photos: the 64 px held-out tiles),
   with codebook usage per level and per stage; speech also has the demo's judge (``pipelines.judge``, trained on
   the real training clips) on the reconstructions of the held-out clips;
3. the tokens exported at the size the demo exports (every stage; the reader's default training windows), and the
   testbed's prior preset(s) trained on them (level 0 first, then each lower level conditioned on the one above),
   giving the held-out bits per dimension (summed over levels) and bits per token;
4. after all variants trained: encode and decode speed, milliseconds per item for a batch of ``SPEED_BATCH``
   held-out items, the variants interleaved round by round (a shared machine's load hits all alike), medians.

``python -m benchmarks.quantizers [--testbed speech,photos,video] [--only vq,fsq] [--threads 1] [--keep DIR]``
(hours on one thread at the presets' steps; BENCHMARKS.md §16d ran 20-40 minutes a testbed with
``--tokenizer-steps``/``--prior-steps``); results in ``benchmarks/results/quantizers.json``
(``quantizers_speech.json`` for ``--testbed speech``).
``--keep DIR`` keeps every run (tokenizers, tokens, priors) and reuses the finished ones when run again.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from benchmarks.common import (THREADS_ENV, apply_threads, interleaved, machine_info, machine_line,
                               median, table, write_result)
from data import collate_samples
from harness.config import config_from_dict, preset
from pipelines.judge import train_judge
from stage1_tokenizer import train as tok_train
from stage1_tokenizer.evaluate import evaluate
from stage1_tokenizer.export import export_tokens
from stage1_tokenizer.quantizer import KIND_FIELDS
from stage1_tokenizer.registry import load_tokenizer
from stage2_prior import train as prior_train

SPEED_BATCH = 16
SPEED_ROUNDS = 7


@dataclass(frozen=True)
class Testbed:
    tokenizer: str  # preset of the tokenizer training config
    priors: tuple[str, ...]  # prior preset per level, top first
    bits: int  # bits per position (per level) every variant codes
    eval_size: int | None = None  # items of this size are evaluated and exported (None: the training size)
    judge: bool = False  # class-labelled data: the demo's judge on the reconstructions
    image: bool = False  # LPIPS and FD-VGG16 (on ``distance_items`` items; video: per frame)
    distance_items: int | None = None
    video: bool = False


TESTBEDS = {
    # 12 bits a position: 6 kbit/s at 500 positions a second (the demo's VQ codes 8 bits: 4 kbit/s)
    "speech": Testbed("tokenizer-spoken-digits", ("prior-spoken-digits",), bits=12, eval_size=8192, judge=True),
    # 8 bits a position at both levels (the photos demo codes 8 at the top, 9 at the bottom): RVQ of 2 and 4 stages
    "photos": Testbed("tokenizer-photos", ("prior-photos-top", "prior-photos-bottom"), bits=8, eval_size=64,
                      image=True, distance_items=200),
    # the moving-digits demo's 3-D VQ-VAE (8 frames of 64x64 -> 4x4x4 codes of 8 bits) and its transformer prior
    "video": Testbed("tokenizer-moving-digits", ("prior-moving-digits",), bits=8, image=True, distance_items=40,
                     video=True),
}


def variants(bits: int) -> dict[str, dict]:
    """name -> the quantizer fields a variant sets, each coding ``bits`` bits a position."""
    out = {"vq": {"kind": "vq", "codebook_size": 2 ** bits}}
    for k in (2, 4):  # the priors' widths split into one channel group per stage: 3 would not divide them
        if bits % k == 0:
            out[f"rvq{k}"] = {"kind": "rvq", "num_stages": k, "codebook_size": 2 ** (bits // k)}
    out["fsq"] = {"kind": "fsq", "levels": fsq_levels(bits)}
    out["lfq"] = {"kind": "lfq", "bits": bits}
    return out


def fsq_levels(bits: int) -> list[int]:
    """FSQ levels with 2^bits codes in all: eights (the paper's largest per-dimension level in its tables), then
    one 2 or 4 for what is left."""
    levels = [8] * (bits // 3)
    return levels + ([2 ** (bits % 3)] if bits % 3 else [])


def variant_config(bed: Testbed, quantizer: dict, tokenizer_steps: int | None, seed: int) -> dict:
    """The testbed's tokenizer preset with the variant's quantizer (kind and size; the preset's shared VQ fields kept,
    which FSQ and LFQ ignore, its kind's own fields dropped) and, for a hierarchy, one codebook size for every level."""
    values = copy.deepcopy(preset(bed.tokenizer))
    model = values["model"]
    shared = {k: v for k, v in model["quantizer"].items() if not any(k in f for f in KIND_FIELDS.values())}
    model["quantizer"] = {**shared, **quantizer}
    model.pop("codebook_sizes", None)  # every level codes bed.bits bits
    values["seed"] = seed
    if tokenizer_steps:
        values["max_steps"] = values["checkpoint_every"] = tokenizer_steps
    values["image_every"] = 0
    return values


# ---- one variant ---------------------------------------------------------------------------------------------------
def train_tokenizer(values: dict, run: Path) -> tuple[Path, float]:
    """The tokenizer trained into ``run`` (reused when its model folder exists); (model folder, seconds or NaN)."""
    if (run / "model" / "config.json").is_file():
        return run / "model", float("nan")
    started = time.perf_counter()
    model_dir = tok_train.train(config_from_dict(tok_train.TokenizerTrainConfig, values), run, quiet=True)
    return model_dir, time.perf_counter() - started


def held_out_metrics(bed: Testbed, cfg, tokenizer) -> dict:
    """Reconstruction metrics of the held-out split (benchmarks/PROTOCOL.md) and the fixed-rate bits of one item's
    codes (``code_bits``, every level and stage); with ``bed.judge`` also the demo's judge (trained as the demo
    trains it) on the held-out real items and on their reconstructions."""
    sized = replace(cfg, size=bed.eval_size or cfg.size)
    held_out = tok_train.build_dataset(sized, "eval")
    metrics = evaluate(tokenizer, held_out, lpips=bed.image, fd_vgg16=bed.image, distance_items=bed.distance_items,
                       quiet=True)
    x = collate_samples([held_out[i] for i in range(len(held_out))])
    shapes = tokenizer.code_tensor_shapes(tuple(x["x"].shape[1:]))
    metrics["input_shape"] = list(x["x"].shape[1:])
    metrics["code_bits"] = sum(math.prod(s) * math.log2(k) for s, k in zip(shapes, tokenizer.codebook_sizes))
    if bed.judge:
        m = cfg.model_config
        judged = train_judge(tok_train.build_dataset(sized, "train"), m.modality, 10, m.sample_rate, seed=cfg.seed)
        real, recon = [], []
        for xs, ys in zip(x["x"].split(64), x["label"].split(64)):
            real.append(judged.hits(xs, ys))
            recon.append(judged.hits(tokenizer.reconstruct(xs), ys))
        metrics["judge_real"] = float(torch.cat(real).mean())
        metrics["judge_reconstructions"] = float(torch.cat(recon).mean())
    return metrics


def export(bed: Testbed, cfg, tokenizer, out: Path) -> Path:
    """Train and held-out tokens, as the demo exports them (reused when the manifest exists)."""
    if not (out / "manifest.json").is_file():
        sized = replace(cfg, size=bed.eval_size or cfg.size)
        datasets = {split: tok_train.build_dataset(sized, split) for split in ("train", "eval")}
        export_tokens(tokenizer, datasets, out, batch_size=64, shard_size=1000, progress=False, seed=cfg.seed,
                      source=cfg.data)
    return out


def train_priors(bed: Testbed, tokens: Path, out: Path, prior_steps: int | None, seed: int) -> dict:
    """Each level's prior preset on the tokens (reused when trained); held-out bits per dimension summed over the
    levels, bits per token over all of them, and the training seconds (NaN when reused)."""
    infos, seconds = [], 0.0
    for level, name in enumerate(bed.priors):
        run = out / f"prior_level{level}"
        if not (run / "prior.json").is_file() or "eval" not in json.loads((run / "prior.json").read_text()):
            cfg = config_from_dict(prior_train.PriorTrainConfig,
                                   {**preset(name), "tokens": str(tokens), "level": level, "seed": seed})
            if prior_steps:
                cfg = replace(cfg, max_steps=prior_steps, checkpoint_every=prior_steps,
                              eval_every=min(cfg.eval_every, prior_steps))
            started = time.perf_counter()
            prior_train.train(cfg, run, quiet=True)
            seconds += time.perf_counter() - started
        else:
            seconds = float("nan")
        infos.append(json.loads((run / "prior.json").read_text())["eval"])
    bits = sum(i["bits_per_sample"] for i in infos)
    tokens_per_item = sum(i["bits_per_sample"] / i["bits_per_token"] for i in infos)
    return {"bits_per_dim": sum(i["bits_per_dim"] for i in infos), "bits_per_token": bits / tokens_per_item,
            "per_level": infos, "train_s": seconds}


def measure_variant(bed: Testbed, quantizer: dict, out: Path, tokenizer_steps: int | None,
                    prior_steps: int | None, seed: int) -> dict:
    values = variant_config(bed, quantizer, tokenizer_steps, seed)
    model_dir, train_s = train_tokenizer(values, out / "tokenizer")
    cfg = config_from_dict(tok_train.TokenizerTrainConfig, values)
    tokenizer = load_tokenizer(model_dir).eval()
    metrics = held_out_metrics(bed, cfg, tokenizer)
    tokens = export(bed, cfg, tokenizer, out / "tokens")
    prior = train_priors(bed, tokens, out, prior_steps, seed)
    return {"quantizer": quantizer, "tokenizer_train_s": train_s, "metrics": metrics, "prior": prior,
            "model_dir": str(model_dir)}


# ---- speed ---------------------------------------------------------------------------------------------------------
def speeds(bed: Testbed, results: dict[str, dict], rounds: int) -> dict[str, dict]:
    """name -> {"encode_ms", "decode_ms"} per item: medians over ``rounds`` interleaved rounds of encoding and of
    decoding the first ``SPEED_BATCH`` held-out items."""
    any_cfg = config_from_dict(tok_train.TokenizerTrainConfig, variant_config(bed, {}, None, 0))
    held_out = tok_train.build_dataset(replace(any_cfg, size=bed.eval_size or any_cfg.size), "eval")
    x = collate_samples([held_out[i] for i in range(SPEED_BATCH)])["x"]
    fns = {}
    for name, r in results.items():
        tok = load_tokenizer(r["model_dir"]).eval()
        codes = tok.encode_levels(x)

        def encode(tok=tok) -> None:
            with torch.no_grad():
                tok.encode_levels(x)

        def decode(tok=tok, codes=codes) -> None:
            with torch.no_grad():
                tok.decode_levels(codes)

        fns[f"{name}/encode"], fns[f"{name}/decode"] = encode, decode
    times = {key: median(t) for key, t in interleaved(fns, rounds, warmup=1).items()}
    return {name: {"encode_ms": 1000 * times[f"{name}/encode"] / SPEED_BATCH,
                   "decode_ms": 1000 * times[f"{name}/decode"] / SPEED_BATCH} for name in results}


# ---- tables --------------------------------------------------------------------------------------------------------
def usage(metrics: dict) -> str:
    """Codebook usage per level (top first), per stage in brackets for code stacks."""
    stages = metrics.get("codebook_usage_per_stage")
    levels = metrics.get("codebook_usage_per_level") or [metrics["codebook_usage"]]
    if stages:
        return " / ".join("[" + " ".join(f"{u:.2f}" for u in level) + "]" for level in stages)
    return " / ".join(f"{u:.2f}" for u in levels)


def rows_for(bed_name: str, bed: Testbed, results: dict[str, dict]) -> tuple[list[str], list[list]]:
    if bed.image:
        frames = " of frames" if bed.video else ""
        quality = ["PSNR (dB)", "SSIM", "LPIPS", f"FD-VGG16{frames} ({bed.distance_items} items)"]
        keys = ["psnr_db", "ssim", "lpips", "fd_vgg16_frames" if bed.video else "fd_vgg16"]
    else:
        quality = ["SNR (dB)", "SI-SDR (dB)", "STOI", "mel distance (multi-scale)", "judge: reconstructions / real"]
        keys = ["snr_db", "si_sdr_db", "stoi", "mel_distance_multiscale"]
    columns = ["quantizer", "codes a position", *quality, "kbps" if not bed.image else "bits/pixel",
               "usage per level [per stage]", "encode / decode ms per item", "tokenizer train s",
               "prior: held-out bits/dim", "bits/token"]
    rows = []
    for name, r in results.items():
        m, p = r["metrics"], r["prior"]
        row = [name, describe(r["quantizer"]), *[m.get(k, float("nan")) for k in keys]]
        if bed.judge:
            row.append(f"{m['judge_reconstructions']:.1%} / {m['judge_real']:.1%}")
        rate = m["bitrate_kbps"] if not bed.image else bits_per_pixel(m)
        row += [rate, usage(m), f"{r['speed']['encode_ms']:.2f} / {r['speed']['decode_ms']:.2f}",
                r["tokenizer_train_s"], p["bits_per_dim"], p["bits_per_token"]]
        rows.append(row)
    return columns, rows


def describe(q: dict) -> str:
    if q["kind"] == "rvq":
        return f"{q['num_stages']} x {q['codebook_size']}"
    if q["kind"] == "fsq":
        return "levels " + "x".join(map(str, q["levels"]))
    if q["kind"] == "lfq":
        return f"{q['bits']} bits"
    return str(q["codebook_size"])


def bits_per_pixel(metrics: dict) -> float:
    """Fixed-rate bits of all levels' codes over the input's pixels (channels not counted)."""
    return metrics["code_bits"] / math.prod(metrics["input_shape"][1:])


# ---- the run -------------------------------------------------------------------------------------------------------
def run(quick: bool = False, testbeds: list[str] | None = None, only: list[str] | None = None,
        keep: Path | None = None, tokenizer_steps: int | None = None, prior_steps: int | None = None,
        seed: int = 0) -> dict:
    apply_threads()
    if quick:
        tokenizer_steps, prior_steps = tokenizer_steps or 20, prior_steps or 20
    out: dict[str, dict] = {}
    markdown = []
    with tempfile.TemporaryDirectory(prefix="tokgen-quantizers-") as tmp:
        root = keep or Path(tmp)
        for bed_name in testbeds or list(TESTBEDS):
            bed = TESTBEDS[bed_name]
            results = {}
            for name, quantizer in variants(bed.bits).items():
                if only and name not in only:
                    continue
                print(f"[quantizers] {bed_name} / {name} ...", file=sys.stderr, flush=True)
                results[name] = measure_variant(bed, quantizer, root / bed_name / name, tokenizer_steps,
                                                prior_steps, seed)
            for name, speed in speeds(bed, results, 2 if quick else SPEED_ROUNDS).items():
                results[name]["speed"] = speed
            columns, rows = rows_for(bed_name, bed, results)
            markdown.append(f"### {bed_name} ({bed.tokenizer}, {bed.bits} bits a position)\n\n{table(columns, rows)}")
            out[bed_name] = {"bits": bed.bits, "tokenizer": bed.tokenizer, "priors": list(bed.priors),
                             "variants": results}
    return {"title": "Quantizers at matched bitrate", "markdown": "\n\n".join(markdown), "results": out,
            "tokenizer_steps": tokenizer_steps or "preset", "prior_steps": prior_steps or "preset"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quantizers", description=__doc__.split("\n")[0])
    p.add_argument("--testbed", help=f"comma-separated subset of {', '.join(TESTBEDS)}")
    p.add_argument("--only", help="comma-separated subset of the variants: vq, rvq2, rvq4, fsq, lfq")
    p.add_argument("--tokenizer-steps", type=int, help="override the preset's tokenizer steps (every variant)")
    p.add_argument("--prior-steps", type=int, help="override the preset's prior steps (every variant)")
    p.add_argument("--threads", type=int, help="torch threads (1 on a shared machine)")
    p.add_argument("--keep", type=Path, help="keep every run here and reuse the finished ones")
    p.add_argument("--quick", action="store_true", help="smoke run (20 steps each), not the reported numbers")
    args = p.parse_args(argv)
    if args.threads:
        os.environ[THREADS_ENV] = str(args.threads)
    split = lambda s: [v.strip() for v in s.split(",")] if s else None  # noqa: E731
    started = time.perf_counter()
    apply_threads()  # before machine_info, which records the thread count
    info = machine_info()
    result = run(args.quick, split(args.testbed), split(args.only), args.keep, args.tokenizer_steps,
                 args.prior_steps)
    seconds = time.perf_counter() - started
    command = "python -m benchmarks.quantizers " + " ".join(sys.argv[1:] if argv is None else argv)
    beds = split(args.testbed)
    name = "quantizers" + (f"_{'_'.join(beds)}" if beds else "") + (".quick" if args.quick else "")
    path = write_result(name, result, info, command, seconds)
    print(f"Machine: {machine_line(info)}\n\n## {result['title']}\n\n{result['markdown']}\n\n({seconds:.0f} s; {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
