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
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipelines.media import save_comparison
from stage1_tokenizer.quantizer import CodebookStats


def load_tokenizer(path: str | Path):
    """A tokenizer from a model folder, a run folder (its ``model/``) or a pipeline folder."""
    from pipelines.hub import read_config

    path = Path(path)
    for candidate in (path, path / "model", path / "tokenizer"):
        if (candidate / "config.json").is_file():
            kind = read_config(candidate).get("model_type")
            if kind == "vqvae":
                from stage1_tokenizer.vqvae import VQVAE

                return VQVAE.from_pretrained(candidate)
            if kind == "hvqvae":
                from stage1_tokenizer.hvqvae import HierarchicalVQVAE

                return HierarchicalVQVAE.from_pretrained(candidate)
    raise FileNotFoundError(f"no tokenizer found at {path} (looked for config.json in it, model/ and tokenizer/)")


def psnr(x: torch.Tensor, y: torch.Tensor, peak: float = 1.0) -> torch.Tensor:
    """Per-sample PSNR in dB of (B, ...) tensors."""
    mse = (x - y).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return 10 * torch.log10(peak**2 / mse)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004, Gaussian window) of (B, C, H, W) images in [0, 1]."""
    c = x.shape[1]
    window = min(window, x.shape[-1], x.shape[-2])
    coords = torch.arange(window, dtype=x.dtype, device=x.device) - window // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum())[None, :]
    kernel = (g.t() @ g)[None, None].expand(c, 1, window, window)
    blur = lambda t: F.conv2d(t, kernel, groups=c)  # noqa: E731  (valid conv, as in the reference)
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def _try_lpips():
    try:
        from stage1_tokenizer.perceptual import PerceptualLoss

        return PerceptualLoss()
    except Exception as err:  # reported, not fatal: LPIPS is an extra metric
        warnings.warn(f"LPIPS not computed: {err}")
        return None


def snr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-clip signal-to-noise ratio in dB of a reconstruction y of x, (B,)."""
    signal = x.pow(2).flatten(1).sum(1)
    noise = (x - y).pow(2).flatten(1).sum(1).clamp(min=1e-10)
    return 10 * torch.log10(signal.clamp(min=1e-10) / noise)


def batch_metrics(x: torch.Tensor, recon: torch.Tensor, modality: str, sample_rate: int, perceptual) -> dict:
    """Per-item metric sums of one batch: what a modality's users compare tokenizers by."""
    out = {"mse": (recon - x).pow(2).flatten(1).mean(1)}
    if modality == "audio":
        from stage1_tokenizer.audio_loss import mel_distance

        out["snr_db"] = snr(x, recon)
        out["mel_distance"] = mel_distance(recon, x, sample_rate)
    elif modality == "video":
        frames = lambda t: t.transpose(1, 2).flatten(0, 1)  # noqa: E731  (B, C, T, H, W) -> (B*T, C, H, W)
        out["psnr_db"] = psnr(frames(recon), frames(x)).view(x.shape[0], -1).mean(1)  # per-frame PSNR
        out["ssim"] = ssim(frames(recon), frames(x)).view(x.shape[0], -1).mean(1)
    else:
        out["psnr_db"] = psnr(recon, x)
        out["ssim"] = ssim(recon, x)
        if perceptual is not None:
            out["lpips"] = perceptual(recon, x)
    return {k: float(v.sum()) for k, v in out.items()}


@torch.no_grad()
def evaluate(tokenizer, dataset, batch_size: int = 64, max_items: int | None = None, lpips: bool = True,
             preview_path: Path | None = None, quiet: bool = False) -> dict:
    """Metrics over a whole held-out dataset (codebook usage needs all of it).

    image: psnr_db, ssim, lpips (when the backbone is available); video: per-frame psnr_db and ssim;
    audio: snr_db and mel_distance (dB); all: mse, codebook usage and perplexity (per level).
    """
    from data import collate_samples

    tokenizer.eval()
    modality = tokenizer.config.modality
    sample_rate = getattr(tokenizer.config, "sample_rate", 0) or 16000
    stats = [CodebookStats(k) for k in tokenizer.codebook_sizes]
    perceptual = _try_lpips() if lpips and modality == "image" else None
    sums: dict[str, float] = {}
    count, preview, input_shape = 0, None, None
    n = len(dataset) if max_items is None else min(max_items, len(dataset))
    for start in tqdm(range(0, n, batch_size), desc="evaluate", disable=quiet):
        batch = collate_samples([dataset[i] for i in range(start, min(n, start + batch_size))])
        x = batch["x"]
        input_shape = tuple(x.shape[1:])
        codes = tokenizer.encode_levels(x)
        recon = tokenizer.decode_levels(codes).clamp(-1 if modality == "audio" else 0, 1)
        for s, c in zip(stats, codes):
            s.update(c)
        for key, value in batch_metrics(x, recon, modality, sample_rate, perceptual).items():
            sums[key] = sums.get(key, 0.0) + value
        if preview is None:
            preview = (x[:16], recon[:16])
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
    raw_bits = math.prod(input_shape) * (16 if tokenizer.config.modality == "audio" else 8)
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="run folder, model folder or pipeline folder")
    p.add_argument("--data", required=True, help="built-in name, folder or shard pattern (held-out split)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-items", type=int)
    p.add_argument("--size", type=int, help="input size (default: the training size from the run config)")
    p.add_argument("--no-lpips", action="store_true")


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> dict:
    if args is None:
        parser = argparse.ArgumentParser(prog="tokgen evaluate-tokenizer")
        add_arguments(parser)
        args = parser.parse_args(argv)
    from data import build_dataset

    tokenizer = load_tokenizer(args.model)
    cfg = tokenizer.config
    dataset = build_dataset(args.data, modality=cfg.modality, split="eval", channels=cfg.in_channels,
                            sample_rate=getattr(cfg, "sample_rate", 0), **training_data(args.model, args.size, args.data))
    args.out.mkdir(parents=True, exist_ok=True)
    metrics = evaluate(tokenizer, dataset, args.batch_size, args.max_items, not args.no_lpips,
                       args.out / "reconstructions.png")
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}, indent=2))
    return metrics


def training_data(path: Path, size: int | None = None, source: str | None = None) -> dict:
    """Input size (and video clip length) the tokenizer was trained at, from its run's config.json:
    what evaluation and export should feed it unless told otherwise. The run's ``data_options`` come
    too when ``source`` is the source it was trained on (they are that reader's options)."""
    for candidate in (Path(path) / "config.json", Path(path).parent / "config.json"):
        if candidate.is_file():
            cfg = json.loads(candidate.read_text())
            if isinstance(cfg.get("size"), int):
                out = {"size": size or cfg["size"]}
                if cfg.get("model", {}).get("modality") == "video":
                    out["frames"] = cfg.get("frames", 16)
                if source is not None and source == cfg.get("data"):
                    out.update(cfg.get("data_options") or {})
                return out
    return {"size": size or 32}
