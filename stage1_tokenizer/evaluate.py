"""``tokgen evaluate-tokenizer``: held-out reconstruction quality and codebook statistics.

Writes ``metrics.json`` (images and video: psnr_db, ssim, lpips when the backbone is available; audio: snr_db,
si_sdr_db, stoi, mel distances, bitrate_kbps and ViSQOL when asked; all: codebook_usage and perplexity per level
(and per stage for a residual quantizer: ``codebook_usage_per_stage``), codes per input, compression ratio, each
counting every stage of a code stack) and ``reconstructions.png``. Distribution distances between the held-out
originals and their reconstructions: ``fd_vgg16`` always (offline VGG16 features; video: ``fd_vgg16_frames``,
per frame), for images rFID as ``fid`` with ``kid``/``kid_std`` and the reconstructions' ``inception_score`` when
the user names the Inception file (``--fid-weights`` or ``$TOKGEN_FID_WEIGHTS``), and for video ``fvd`` when the
user names the I3D file (``--fvd-weights`` or ``$TOKGEN_FVD_WEIGHTS``; clips of at least 9 frames).
Features are computed batch by batch; only they are kept.
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
from data.video import DEFAULT_FRAMES
from harness.devices import add_device_arguments, autocast, resolve_device, resolve_dtype
from harness.output import add_output_arguments, emit, log
from stage1_tokenizer.fidelity import (FID_WEIGHTS_ENV, FVD_MIN_FRAMES, FVD_WEIGHTS_ENV, I3DFeatures,
                                       InceptionFeatures, PairedFeatures, VGGFeatures, check_fid_weights,
                                       check_fvd_frames, check_fvd_weights, fid_weights_hint, fid_weights_path,
                                       fvd_weights_hint, fvd_weights_path)
from stage1_tokenizer.audio_metrics import VISQOL_MISSING, bitrate_kbps, visqol_available
from stage1_tokenizer.metrics import LPIPS_MIN_SIZE, MetricMeans, batch_metrics
from stage1_tokenizer.perceptual import PerceptualLoss
from stage1_tokenizer.quantizer import CodebookStats
from stage1_tokenizer.registry import add_held_out_arguments, held_out_report, load_tokenizer, training_data


def _try_lpips():
    try:
        return PerceptualLoss()
    except Exception as err:  # reported, not fatal: LPIPS is an extra metric
        warnings.warn(f"LPIPS not computed: {err}")
        return None


def _try_vgg():
    try:
        return VGGFeatures.from_shared_weights()
    except Exception as err:  # reported, not fatal: the offline distance needs the shared backbone
        warnings.warn(f"FD-VGG16 not computed: {err}")
        return None


def _distances(modality: str, n: int, fd_vgg16: bool, fid_weights: Path | None, fvd_weights: Path | None,
               device) -> PairedFeatures | None:
    """What gathers the distribution distances' features, or None (audio, fewer than 2 items, nothing asked)."""
    if modality not in ("image", "video") or n < 2:
        return None
    vgg = _try_vgg() if fd_vgg16 else None
    inception = InceptionFeatures(fid_weights) if fid_weights is not None and modality == "image" else None
    i3d = I3DFeatures(fvd_weights) if fvd_weights is not None and modality == "video" else None
    if vgg is None and inception is None and i3d is None:
        return None
    return PairedFeatures(modality, *(m.to(device) if m is not None else None for m in (vgg, inception, i3d)))


@torch.no_grad()
def evaluate(tokenizer, dataset, batch_size: int = 64, max_items: int | None = None, lpips: bool = True,
             preview_path: Path | None = None, quiet: bool = False, dtype: torch.dtype = torch.float32,
             fd_vgg16: bool = False, fid_weights: Path | None = None, visqol: bool = False,
             distance_items: int | None = None, fvd_weights: Path | None = None) -> dict:
    """Metrics over a whole held-out dataset (codebook usage needs all of it).

    image: psnr_db, ssim, lpips (when the backbone is available), fd_vgg16, and fid (rFID), kid, kid_std,
    inception_score(_std) with ``fid_weights`` (the checked Inception file); video: per-frame psnr_db, ssim and
    lpips, fd_vgg16_frames on per-frame features, and fvd (with fvd_frames) with ``fvd_weights`` (the checked I3D
    file; clips of at least 9 frames); audio: snr_db, mel_distance (dB), si_sdr_db, stoi,
    mel_distance_multiscale, visqol_mos (opt-in) and bitrate_kbps; all: mse, codebook usage and perplexity (per
    level, and per stage of a residual quantizer's code stacks, whose every stage counts in the codes, bits and
    kbps); ``unscored_items`` counts the items a metric could not score (clips too short for STOI/ViSQOL). The distances compare the originals with their reconstructions (>= 2 items).
    ``fd_vgg16`` is opt-in here (the command turns it on): ~0.4 s an item on one CPU core, twice per item;
    ``distance_items`` gives the distances only the first that many items (recorded as ``distance_items``).
    """
    tokenizer.eval()
    device = next(tokenizer.parameters()).device
    modality, sample_rate = tokenizer.modality, tokenizer.sample_rate
    stats = [[CodebookStats(k) for _ in range(max(tokenizer.code_depth, 1))] for k in tokenizer.codebook_sizes]
    perceptual = _try_lpips() if lpips and modality in ("image", "video") else None
    perceptual = perceptual.to(device) if perceptual is not None else None
    means = MetricMeans()
    count, preview, input_shape = 0, None, None
    n = len(dataset) if max_items is None else min(max_items, len(dataset))
    distances = _distances(modality, n, fd_vgg16, fid_weights, fvd_weights, device)
    for start in tqdm(range(0, n, batch_size), desc="evaluate", disable=quiet):
        batch = collate_samples([dataset[i] for i in range(start, min(n, start + batch_size))])
        x = batch["x"].to(device)
        input_shape = tuple(x.shape[1:])
        with autocast(device, dtype):
            codes = tokenizer.encode_levels(x)
            recon = tokenizer.decode_clamped(codes).float()
        for level_stats, c in zip(stats, codes):
            _update_stats(level_stats, c, tokenizer.code_depth)
        means.update(batch_metrics(x, recon, modality, sample_rate, perceptual, visqol and modality == "audio"))
        room = x.shape[0] if distance_items is None else max(0, distance_items - count)
        if distances is not None and room > 0:
            distances.update(x[:room].float(), recon[:room])
        if preview is None:
            preview = (x[:16].cpu(), recon[:16].cpu())
        count += x.shape[0]
    if count == 0:
        raise ValueError("the evaluation dataset is empty")
    if perceptual is not None and "lpips" not in means.sums:
        warnings.warn(f"LPIPS not computed: it needs items of at least {LPIPS_MIN_SIZE}x{LPIPS_MIN_SIZE}, "
                      f"got {input_shape[-2]}x{input_shape[-1]}")
    metrics = means.means()
    if means.unscored(count):
        metrics["unscored_items"] = means.unscored(count)
    if distances is not None:
        metrics.update(distances.metrics(), distance_items=min(count, distance_items or count))
    if modality == "audio":
        metrics["sample_rate"] = sample_rate
    metrics.update(_code_metrics(tokenizer, stats, input_shape), num_samples=count)
    if preview_path is not None and preview is not None:
        save_comparison(*preview, preview_path, modality=modality, sample_rate=sample_rate)
    return metrics


def _update_stats(level_stats: list[CodebookStats], codes: torch.Tensor, depth: int) -> None:
    """One level's codes (B, *grid), or (B, *grid, depth) with one CodebookStats per stage."""
    if not depth:
        level_stats[0].update(codes)
        return
    for stage, s in enumerate(level_stats):
        s.update(codes[..., stage])


def _code_metrics(tokenizer, stats: list[list[CodebookStats]], input_shape) -> dict:
    """Usage, perplexity, codes and bits per input; every stage of a code stack is a code (and its bits)."""
    grids, shapes = tokenizer.code_shapes(input_shape), tokenizer.code_tensor_shapes(input_shape)
    codes_per_input = sum(math.prod(s) for s in shapes)
    code_bits = sum(math.prod(s) * math.log2(k) for s, k in zip(shapes, tokenizer.codebook_sizes))
    raw_bits = math.prod(input_shape) * BITS_PER_VALUE[tokenizer.modality]
    firsts = [level[0] for level in stats]  # the level's only codebook, or its first stage
    out = {
        "codebook_usage": min(s.usage for level in stats for s in level),
        "perplexity": firsts[0].perplexity if len(firsts) == 1 else [s.perplexity for s in firsts],
        "codes_per_input": codes_per_input,
        "code_grid_shapes": [list(s) for s in grids],
        "compression_ratio": raw_bits / code_bits,
    }
    if len(stats) > 1:
        out["codebook_usage_per_level"] = [min(s.usage for s in level) for level in stats]
    if tokenizer.code_depth:  # per level, one entry per stage
        out.update(code_depth=tokenizer.code_depth,
                   codebook_usage_per_stage=[[s.usage for s in level] for level in stats],
                   perplexity_per_stage=[[s.perplexity for s in level] for level in stats])
    if tokenizer.modality == "audio":  # what audio codecs are compared at (a stack's shape counts its stages)
        out["bitrate_kbps"] = bitrate_kbps(tokenizer.codebook_sizes, shapes, input_shape[-1], tokenizer.sample_rate)
    return out


SUMMARY_DISTANCES = (("fd_vgg16", "FD-VGG16", 2), ("fd_vgg16_frames", "FD-VGG16 (frames)", 2), ("fid", "rFID", 2),
                     ("kid", "KID", 4), ("fvd", "FVD", 2))  # (key, name in the summary line, decimals)


def summary_line(metrics: dict) -> str:
    """One line of what the evaluation found."""
    quality = (f"{metrics['snr_db']:.2f} dB SNR, SI-SDR {metrics['si_sdr_db']:.2f} dB, STOI {metrics.get('stoi', float('nan')):.3f}, "
               f"mel distance {metrics['mel_distance']:.2f} dB at {metrics['bitrate_kbps']:.2f} kbps" if "snr_db" in metrics
               else f"{metrics['psnr_db']:.2f} dB PSNR, SSIM {metrics['ssim']:.3f}"
               + (f", LPIPS {metrics['lpips']:.3f}" if "lpips" in metrics else ""))
    distances = "".join(f", {name} {metrics[key]:.{digits}f}" for key, name, digits in SUMMARY_DISTANCES
                        if key in metrics)
    return (f"{metrics['num_samples']} held-out items: {quality}{distances}, "
            f"codebook usage {metrics['codebook_usage']:.2f}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="run folder, model folder or pipeline folder")
    p.add_argument("--data", required=True, help="built-in name, folder or shard pattern (held-out split)")
    p.add_argument("--out", required=True, type=Path, help="folder for metrics.json and reconstructions.png")
    p.add_argument("--batch-size", type=int, default=64, help="items per forward pass (default: 64)")
    p.add_argument("--limit", type=int, help="evaluate at most this many held-out items")
    p.add_argument("--size", type=int, help="input size (default: the training size from the run config)")
    p.add_argument("--no-lpips", action="store_true", help="do not compute LPIPS")
    p.add_argument("--no-fd-vgg16", action="store_true",
                   help="do not compute the offline Frechet distance on VGG16 features (about 0.4 s an item on "
                        "one CPU core)")
    p.add_argument("--visqol", action="store_true",
                   help="audio: also ViSQOL MOS-LQO (speech mode; about 0.35 s a clip; clips of at least 0.64 s; "
                        "needs `pip install tokgen[visqol]`) (default: off)")
    p.add_argument("--fid-weights", type=Path,
                   help=f"the standard FID Inception file (torch-fidelity's weights-inception-2015-12-05-"
                        f"6726825d.pth, checked by sha256) for rFID, KID and IS on images (default: "
                        f"${FID_WEIGHTS_ENV}; without either, no FID)")
    p.add_argument("--fvd-weights", type=Path,
                   help=f"StyleGAN-V's I3D file (i3d_torchscript.pt, checked by sha256) for FVD on video clips of at "
                        f"least {FVD_MIN_FRAMES} frames (default: ${FVD_WEIGHTS_ENV}; without either, no FVD)")
    add_held_out_arguments(p)
    add_device_arguments(p)
    add_output_arguments(p)


def check_weights(fid_weights: Path | None, fvd_weights: Path | None) -> None:
    """A named weights file that is not the standard one stops the command here, before any model is loaded."""
    for path, check in ((fid_weights, check_fid_weights), (fvd_weights, check_fvd_weights)):
        if path is not None:
            check(path)


def log_weights_hints(modality: str, fid_weights: Path | None, fvd_weights: Path | None) -> None:
    """Where to get the file of the field's metric this modality has and the user did not name."""
    if fid_weights is None and modality == "image":
        log.info(fid_weights_hint())
    if fvd_weights is None and modality == "video":
        log.info(fvd_weights_hint())


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> dict:
    if args is None:
        parser = argparse.ArgumentParser(prog="tokgen evaluate-tokenizer")
        add_arguments(parser)
        args = parser.parse_args(argv)
    fid_weights, fvd_weights = fid_weights_path(args.fid_weights), fvd_weights_path(args.fvd_weights)
    if args.visqol and not visqol_available():
        raise ValueError(VISQOL_MISSING)
    check_weights(fid_weights, fvd_weights)  # a wrong file stops here, before the evaluation's minutes
    tokenizer, device = load_tokenizer(args.model), resolve_device(args.device)
    tokenizer.to(device)
    source, options = training_data(args.model, args.size).held_out(args.data, "eval", args.eval_fraction,
                                                                     args.eval_data)
    if fvd_weights is not None and tokenizer.modality == "video":
        check_fvd_frames(options.get("frames", DEFAULT_FRAMES))  # refused, not padded: see benchmarks/PROTOCOL.md
    dataset = build_dataset(source, modality=tokenizer.modality, split="eval", channels=tokenizer.config.in_channels,
                            sample_rate=tokenizer.sample_rate, **options)
    args.out.mkdir(parents=True, exist_ok=True)
    log_weights_hints(tokenizer.modality, fid_weights, fvd_weights)
    metrics = evaluate(tokenizer, dataset, args.batch_size, args.limit, not args.no_lpips,
                       args.out / "reconstructions.png", quiet=args.quiet, dtype=resolve_dtype(args.dtype),
                       fd_vgg16=not args.no_fd_vgg16, fid_weights=fid_weights, visqol=args.visqol,
                       fvd_weights=fvd_weights)
    metrics["held_out"] = held_out_report(source, options, dataset)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    emit(args, summary_line(metrics) + f"; wrote {args.out / 'metrics.json'}", metrics)
    return metrics
