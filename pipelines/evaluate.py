"""``tokgen evaluate-prior PIPELINE --data SRC --out DIR``: exact held-out NLL of a pipeline's priors.

The held-out split (``split="eval"``) of ``--data`` (a built-in name, a folder or shards) is tokenized
with the pipeline's tokenizer and every level's codes are scored by its prior (teacher forcing, the
full forward, batched): bits per token per level and overall (a token is a code: every stage of a residual
quantizer's code stack counts), bits per dimension of the raw data
(per level and total) and total bits per sample. That total is the lossless code length of the
tokens, which ``tokgen compress`` achieves to within about a byte plus its header;
``--compress N`` checks this on the first N samples (real files, decoded back and compared).
Writes ``metrics.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from data import build_dataset, collate_samples
from data.common import iterate_items
from data.modalities import DEFAULT_EVAL_FRACTION, held_out_source
from harness.devices import add_device_arguments
from harness.output import add_output_arguments, emit, log
from pipelines.bitstream import BitstreamError
from pipelines.compress import coder_for
from pipelines.pipeline import TokgenPipeline


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", type=Path, help="pipeline folder (pipeline.json)")
    p.add_argument("--data", required=True, help="held-out data: built-in name, folder or WebDataset shards")
    p.add_argument("--out", required=True, type=Path, help="folder for metrics.json")
    p.add_argument("--split", default="eval", choices=["train", "eval"],
                   help="dataset split to score (default: eval, the held-out one)")
    p.add_argument("--batch-size", type=int, default=64, help="items per forward pass (default: 64)")
    p.add_argument("--limit", type=int, help="score at most this many samples")
    p.add_argument("--size", type=int, help="data size option (default: from the pipeline's input shape)")
    p.add_argument("--eval-fraction", type=float, default=DEFAULT_EVAL_FRACTION,
                   help="share of a folder's files (a shard set's samples) held out, by a stable hash of the path, "
                        f"as export-tokens splits them (default: {DEFAULT_EVAL_FRACTION}; 0 = score every file)")
    p.add_argument("--eval-data", help="a separate held-out source to score instead of --data's held-out part")
    p.add_argument("--data-options", type=data_options, default={},
                   help="the reader options the tokenizer was trained with, as the run config's \"data_options\" "
                        "(JSON; e.g. '{\"max_digits\": 1}' for the moving-digits demo; default: none)")
    add_device_arguments(p)
    p.add_argument("--compress", type=int, default=0, metavar="N",
                   help="also compress the first N samples, check the round trip and report real sizes")
    add_output_arguments(p)


def _labels(pipe: TokgenPipeline, batch: dict) -> torch.Tensor | None:
    if pipe.num_classes == 0:
        return None
    labels = batch["label"]
    if int(labels.min()) < 0:
        raise ValueError(f"this pipeline is class-conditional ({pipe.num_classes} classes) but the data "
                         "has unlabelled samples: use labelled data (class subfolders)")
    if int(labels.max()) >= pipe.num_classes:
        raise ValueError(f"data label {int(labels.max())} is out of this pipeline's range [0, {pipe.num_classes})")
    return labels


def batches(dataset, batch_size: int, limit: int | None):
    """Collated batches from a map-style or iterable dataset, at most ``limit`` samples in all."""
    buf, seen = [], 0
    for sample in iterate_items(dataset):
        if limit is not None and seen >= limit:
            break
        buf.append(sample)
        seen += 1
        if len(buf) == batch_size:
            yield collate_samples(buf)
            buf = []
    if buf:
        yield collate_samples(buf)


@torch.no_grad()
def evaluate_pipeline(pipe: TokgenPipeline, dataset, batch_size: int = 64, limit: int | None = None,
                      compress: int = 0, progress: bool = False) -> dict:
    """Exact NLL of the dataset's codes under the pipeline's priors (and, optionally, real file sizes)."""
    bits = np.zeros(len(pipe.priors))
    count, shape, sized = 0, None, None
    coded: list[dict] = []
    started = time.perf_counter()
    for batch in batches(dataset, batch_size, limit):
        x = batch["x"]
        if shape is None:
            shape = tuple(x.shape[1:])
            sized = _sized(pipe, shape)
        elif tuple(x.shape[1:]) != shape:
            raise ValueError(f"held-out inputs of different shapes ({shape}, {tuple(x.shape[1:])}): set --size")
        labels = _labels(pipe, batch)
        codes = pipe.encode(x)
        bits += sized.nll_bits(codes, labels).sum(0).cpu().numpy()
        if len(coded) < compress:
            coded += _compress_check(pipe, sized, x, codes, labels, compress - len(coded))
        count += x.shape[0]
        if progress:
            log.info(f"  {count} samples, {bits.sum() / count:.2f} bits/sample")
    if count == 0:
        raise ValueError("no held-out samples to evaluate")
    metrics = _nll_metrics(sized, bits / count, shape)
    metrics.update(num_samples=count, seconds=round(time.perf_counter() - started, 2))
    if coded:
        metrics["compression"] = _compression_metrics(coded, math.prod(shape))
    return metrics


def _nll_metrics(sized: TokgenPipeline, per_sample: np.ndarray, shape: tuple[int, ...]) -> dict:
    """Bits per token, per dimension and per sample, overall and per level, from the bits per sample per level."""
    total, dims = float(per_sample.sum()), math.prod(shape)
    tokens = [p.num_tokens for p in sized.priors]
    return {
        "bits_per_token": total / sum(tokens),
        "bits_per_token_per_level": [float(b / n) for b, n in zip(per_sample, tokens)],
        "bits_per_dim": total / dims,
        "bits_per_sample": total,
        "levels": [_level_metrics(level, p, n, b, dims)
                   for level, (p, n, b) in enumerate(zip(sized.priors, tokens, per_sample))],
        "input_shape": list(shape),
        "tokens_per_sample": sum(tokens),
        "dims_per_sample": dims,
    }


def _level_metrics(level: int, prior, tokens: int, bits: float, dims: int) -> dict:
    """One level's entry: its tokens count every stage of a code stack (whose ``depth`` it then records)."""
    out = {"level": level, "grid_shape": list(prior.config.grid_shape), "codebook_size": prior.config.vocab_size,
           "tokens_per_sample": tokens, "bits_per_token": float(bits / tokens), "bits_per_sample": float(bits),
           "bits_per_dim": float(bits / dims)}
    if prior.config.depth:
        out["depth"] = prior.config.depth
    return out


def _compression_metrics(coded: list[dict], dims: int) -> dict:
    sizes = np.array([c["bytes"] for c in coded], dtype=np.float64)
    nll = np.array([c["nll_bits"] for c in coded])
    return {
        "num_samples": len(coded),
        "round_trips_exact": all(c["exact"] for c in coded),
        "bytes_per_sample": float(sizes.mean()),
        "bits_per_dim": float(8 * sizes.mean() / dims),
        "nll_bytes_per_sample": float(nll.mean() / 8),
        "header_bytes": int(coded[0]["header_bytes"]),
        "max_excess_bytes": float((sizes - nll / 8 * 1.01).max()),  # the bound: <= 16
        "within_bound": bool((sizes <= nll / 8 * 1.01 + 16).all()),
    }


def _sized(pipe: TokgenPipeline, shape: tuple[int, ...]) -> TokgenPipeline:
    """The pipeline for inputs of this shape (convolutional priors take any size; a transformer refuses)."""
    try:
        return pipe.with_input_shape(shape)
    except ValueError as err:
        raise ValueError(f"the data gives inputs of shape {shape}, this pipeline models {tuple(pipe.input_shape)}: "
                         f"{err} (set --size)") from None


def _compress_check(pipe, sized, x, codes, labels, n: int) -> list[dict]:
    """Compress the first n samples one at a time (as the CLI does), decode them back, compare."""
    coder = coder_for(pipe)
    out = []
    for i in range(min(n, x.shape[0])):
        sample = [c[i : i + 1].cpu() for c in codes]
        lab = None if labels is None else labels[i : i + 1]
        enc = coder.encode(sample, tuple(x.shape[1:]), lab)[0]
        try:
            dec = coder.decode([enc.blob])[0]
            exact = all(torch.equal(a, b[0]) for a, b in zip(dec.codes, sample))
        except BitstreamError:
            exact = False
        nll = float(sized.nll_bits(sample, lab).sum())
        out.append({"bytes": len(enc.blob), "header_bytes": enc.header_bytes, "nll_bits": nll, "exact": exact})
    return out


def data_options(text: str) -> dict:
    """``--data-options``: a JSON object of reader options."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object of reader options, got {text!r}")
    return value


def dataset_options(pipe: TokgenPipeline, split: str = "eval", size: int | None = None) -> dict:
    """``build_dataset`` keywords giving inputs of the pipeline's shape (``size`` overrides the side/length)."""
    shape = tuple(pipe.input_shape)
    out = {"modality": pipe.modality, "split": split, "size": size or int(shape[-1]),
           "channels": int(pipe.tokenizer.config.in_channels), "sample_rate": pipe.tokenizer.sample_rate}
    if pipe.modality == "video":
        out["frames"] = int(shape[1])
    return out


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> dict:
    if args is None:
        parser = argparse.ArgumentParser(prog="tokgen evaluate-prior", description=__doc__)
        add_arguments(parser)
        args = parser.parse_args(argv)
    pipe = TokgenPipeline.from_pretrained(args.pipeline, map_location=args.device, dtype=args.dtype)
    source, fraction = held_out_source(args.data, args.split, args.eval_fraction, args.eval_data)
    reader = args.data_options if source == args.data else {}  # they belong to --data's reader
    dataset = build_dataset(source, **dataset_options(pipe, args.split, args.size), eval_fraction=fraction, **reader)
    metrics = evaluate_pipeline(pipe, dataset, args.batch_size, args.limit, args.compress)
    metrics = {"pipeline": str(args.pipeline), "fingerprint": pipe.fingerprint(), "data": args.data,
               "split": args.split, **metrics}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    emit(args, _summary_line(pipe, metrics) + f"; wrote {args.out / 'metrics.json'}", metrics)
    return metrics


def _summary_line(pipe: TokgenPipeline, metrics: dict) -> str:
    line = (f"{metrics['num_samples']} held-out samples: {metrics['bits_per_token']:.4f} bits/token, "
            f"{metrics['bits_per_dim']:.4f} bits/dim, {metrics['bits_per_sample']:.1f} bits/sample")
    if len(pipe.priors) > 1:
        line += " (per level: " + ", ".join(f"{b:.3f}" for b in metrics["bits_per_token_per_level"]) + " bits/token)"
    if "compression" in metrics:
        c = metrics["compression"]
        line += (f"; compressed {c['num_samples']}: {c['bytes_per_sample']:.1f} bytes/sample vs NLL "
                 f"{c['nll_bytes_per_sample']:.1f}, exact round trips: {c['round_trips_exact']}")
    return line
