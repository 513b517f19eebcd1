"""``tokgen evaluate-tokenizer``: held-out reconstruction quality and codebook statistics.

Writes ``metrics.json`` (psnr_db, ssim, lpips when the backbone is available, codebook_usage and
perplexity per level, codes per input, compression ratio) and ``reconstructions.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from data import build_dataset, collate_samples
from data.modalities import BITS_PER_VALUE
from data.pictures import save_comparison
from harness.devices import add_device_arguments, autocast, resolve_device, resolve_dtype
from harness.output import add_output_arguments, emit
from stage1_tokenizer.metrics import batch_metrics
from stage1_tokenizer.perceptual import PerceptualLoss
from stage1_tokenizer.quantizer import CodebookStats
from stage1_tokenizer.registry import add_held_out_arguments, held_out_report, load_tokenizer, training_data


def _try_lpips():
    try:
        return PerceptualLoss()
    except Exception as err:  # reported, not fatal: LPIPS is an extra metric
        warnings.warn(f"LPIPS not computed: {err}")
        return None


@torch.no_grad()
def evaluate(tokenizer, dataset, batch_size: int = 64, max_items: int | None = None, lpips: bool = True,
             preview_path: Path | None = None, quiet: bool = False, dtype: torch.dtype = torch.float32) -> dict:
    """Metrics over a whole held-out dataset (codebook usage needs all of it).

    image: psnr_db, ssim, lpips (when the backbone is available); video: per-frame psnr_db and ssim;
    audio: snr_db and mel_distance (dB); all: mse, codebook usage and perplexity (per level).
    """
    tokenizer.eval()
    device = next(tokenizer.parameters()).device
    modality, sample_rate = tokenizer.modality, tokenizer.sample_rate
    stats = [CodebookStats(k) for k in tokenizer.codebook_sizes]
    perceptual = _try_lpips() if lpips and modality == "image" else None
    perceptual = perceptual.to(device) if perceptual is not None else None
    sums: dict[str, float] = {}
    count, preview, input_shape = 0, None, None
    n = len(dataset) if max_items is None else min(max_items, len(dataset))
    for start in tqdm(range(0, n, batch_size), desc="evaluate", disable=quiet):
        batch = collate_samples([dataset[i] for i in range(start, min(n, start + batch_size))])
        x = batch["x"].to(device)
        input_shape = tuple(x.shape[1:])
        with autocast(device, dtype):
            codes = tokenizer.encode_levels(x)
            recon = tokenizer.decode_clamped(codes).float()
        for s, c in zip(stats, codes):
            s.update(c)
        for key, value in batch_metrics(x, recon, modality, sample_rate, perceptual).items():
            sums[key] = sums.get(key, 0.0) + value
        if preview is None:
            preview = (x[:16].cpu(), recon[:16].cpu())
        count += x.shape[0]
    if count == 0:
        raise ValueError("the evaluation dataset is empty")
    metrics = {k: v / count for k, v in sums.items()}
    if modality == "audio":
        metrics["sample_rate"] = sample_rate
    metrics.update(_code_metrics(tokenizer, stats, input_shape), num_samples=count)
    if preview_path is not None and preview is not None:
        save_comparison(*preview, preview_path, modality=modality, sample_rate=sample_rate)
    return metrics


def _code_metrics(tokenizer, stats: list[CodebookStats], input_shape) -> dict:
    shapes = tokenizer.code_shapes(input_shape)
    codes_per_input = sum(math.prod(s) for s in shapes)
    code_bits = sum(math.prod(s) * math.log2(k) for s, k in zip(shapes, tokenizer.codebook_sizes))
    raw_bits = math.prod(input_shape) * BITS_PER_VALUE[tokenizer.modality]
    out = {
        "codebook_usage": min(s.usage for s in stats),
        "perplexity": stats[0].perplexity if len(stats) == 1 else [s.perplexity for s in stats],
        "codes_per_input": codes_per_input,
        "code_grid_shapes": [list(s) for s in shapes],
        "compression_ratio": raw_bits / code_bits,
    }
    if len(stats) > 1:
        out["codebook_usage_per_level"] = [s.usage for s in stats]
    return out


def summary_line(metrics: dict) -> str:
    """One line of what the evaluation found."""
    quality = (f"{metrics['snr_db']:.2f} dB SNR, mel distance {metrics['mel_distance']:.2f} dB" if "snr_db" in metrics
               else f"{metrics['psnr_db']:.2f} dB PSNR, SSIM {metrics['ssim']:.3f}"
               + (f", LPIPS {metrics['lpips']:.3f}" if "lpips" in metrics else ""))
    return f"{metrics['num_samples']} held-out items: {quality}, codebook usage {metrics['codebook_usage']:.2f}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="run folder, model folder or pipeline folder")
    p.add_argument("--data", required=True, help="built-in name, folder or shard pattern (held-out split)")
    p.add_argument("--out", required=True, type=Path, help="folder for metrics.json and reconstructions.png")
    p.add_argument("--batch-size", type=int, default=64, help="items per forward pass (default: 64)")
    p.add_argument("--limit", type=int, help="evaluate at most this many held-out items")
    p.add_argument("--size", type=int, help="input size (default: the training size from the run config)")
    p.add_argument("--no-lpips", action="store_true", help="do not compute LPIPS")
    add_held_out_arguments(p)
    add_device_arguments(p)
    add_output_arguments(p)


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> dict:
    if args is None:
        parser = argparse.ArgumentParser(prog="tokgen evaluate-tokenizer")
        add_arguments(parser)
        args = parser.parse_args(argv)
    tokenizer, device = load_tokenizer(args.model), resolve_device(args.device)
    tokenizer.to(device)
    source, options = training_data(args.model, args.size).held_out(args.data, "eval", args.eval_fraction,
                                                                     args.eval_data)
    dataset = build_dataset(source, modality=tokenizer.modality, split="eval", channels=tokenizer.config.in_channels,
                            sample_rate=tokenizer.sample_rate, **options)
    args.out.mkdir(parents=True, exist_ok=True)
    metrics = evaluate(tokenizer, dataset, args.batch_size, args.limit, not args.no_lpips,
                       args.out / "reconstructions.png", quiet=args.quiet, dtype=resolve_dtype(args.dtype))
    metrics["held_out"] = held_out_report(source, options, dataset)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    emit(args, summary_line(metrics) + f"; wrote {args.out / 'metrics.json'}", metrics)
    return metrics
