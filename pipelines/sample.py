"""``tokgen sample PIPELINE --num N --out DIR``: sample, decode, and write files people open.

DIR gets ``codes.npz`` (the codes layout of :mod:`data.codes`: ``tokgen decode`` reads it), ``labels.npy``
for class-conditional pipelines, the decoded samples (``samples.png`` / ``sample_*.wav`` / ``sample_*.mp4``,
``samples.npy``) and ``sampling.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from data.codes import save_codes
from data.pictures import write_samples
from harness.devices import add_device_arguments
from harness.output import add_output_arguments, emit
from pipelines.pipeline import TokgenPipeline
from stage2_prior.sampling import SamplingOptions

CODES_FILE = "codes.npz"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", type=Path, help="pipeline folder (pipeline.json)")
    p.add_argument("--num", type=int, default=16, help="number of samples (default: 16)")
    p.add_argument("--class", dest="class_label",
                   help="class name or index to sample (class-conditional pipelines; default: the classes in turn)")
    p.add_argument("--seed", type=int, default=0, help="seeds the draws: the same seed gives the same codes (default: 0)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="divides the logits: < 1 sharper, > 1 more varied (default: 1)")
    p.add_argument("--top-k", type=int, help="draw among the k most likely codes only (default: all)")
    p.add_argument("--top-p", type=float, help="draw among the smallest set of codes reaching probability p "
                                               "(default: all)")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance scale: 1 = none, > 1 = closer to the class asked for "
                        "(priors trained with class_dropout; default: 1)")
    p.add_argument("--batch-size", type=int, default=64, help="samples drawn together (default: 64)")
    p.add_argument("--no-cache", action="store_true", help="full recompute per token (to verify/benchmark the cache)")
    p.add_argument("--static-cache", action=argparse.BooleanOptionalAction, default=None,
                   help="transformer priors: a fixed-shape KV cache, replayed as one CUDA graph per token on a GPU "
                        "(several times the tokens/s there; BENCHMARKS.md §14; the growing cache's codes); default: on a CUDA "
                        "device only; other priors are unchanged")
    p.add_argument("--codes-only", action="store_true", help="write codes, do not decode")
    p.add_argument("--size", type=int, help="images: sample at this side length (convolutional priors)")
    p.add_argument("--length", type=int,
                   help="video frames / audio samples to generate; longer than training slides a window")
    add_device_arguments(p)
    add_output_arguments(p)
    p.add_argument("--out", required=True, type=Path, help="folder for the samples, codes.npz and sampling.json")


def class_labels_for(pipe: TokgenPipeline, num: int, class_label: str | int | None) -> torch.Tensor | None:
    """The requested class (a name or an index) for every sample, or classes in turn when none is given."""
    if pipe.num_classes == 0:
        if class_label is not None:
            raise ValueError("--class given, but this pipeline is unconditional")
        return None
    if class_label is not None:
        return torch.full((num,), pipe.class_index(class_label), dtype=torch.long)
    return torch.arange(num) % pipe.num_classes


def generate(pipe: TokgenPipeline, num: int, labels, seed: int, batch_size: int, options: SamplingOptions,
             decode: bool = True, quiet: bool = False,
             length: int | None = None) -> tuple[torch.Tensor | None, list[torch.Tensor], float]:
    """Samples in batches with one seeded generator; returns (samples, codes per level, seconds).

    length: generate this many frames/samples along the first axis (``TokgenPipeline.sample_long``).
    """
    long = length is not None and length != pipe.input_shape[1]
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=num if long else num * pipe.num_tokens, desc="sample", disable=quiet,
               unit="sample" if long else "tok")
    chunks, codes, started = [], [], time.perf_counter()
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        lab = labels[start : start + n] if labels is not None else None
        if long:
            out = pipe.sample_long(length, n, lab, options, generator=generator)
            bar.update(n)
        else:
            out = pipe(n, lab, options, generator=generator, output_type="decoded" if decode else "codes",
                       progress=lambda k: bar.update(k * n))
        codes.append(out.codes)
        if out.samples is not None:
            chunks.append(out.samples.cpu())
    bar.close()
    seconds = time.perf_counter() - started
    levels = [torch.cat([c[level] for c in codes]).cpu() for level in range(len(codes[0]))]
    return (torch.cat(chunks) if chunks else None), levels, seconds


def write_outputs(pipe: TokgenPipeline, out: Path, codes: list[torch.Tensor], labels: torch.Tensor | None,
                  samples: torch.Tensor | None, nrow: int = 10) -> None:
    """codes.npz, labels.npy and the decoded samples' files in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    save_codes(out / CODES_FILE, codes, pipe.tokenizer.codebook_sizes)
    if labels is not None:
        np.save(out / "labels.npy", labels.numpy(), allow_pickle=False)
    if samples is not None:
        write_samples(pipe.modality, samples, out, nrow=nrow, sample_rate=pipe.tokenizer.sample_rate)


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> dict:
    if args is None:
        parser = argparse.ArgumentParser(prog="tokgen sample")
        add_arguments(parser)
        args = parser.parse_args(argv)
    if args.num < 1 or args.batch_size < 1:
        raise ValueError(f"--num and --batch-size must be >= 1, got {args.num} and {args.batch_size}")
    pipe = TokgenPipeline.from_pretrained(args.pipeline, map_location=args.device, dtype=args.dtype)
    if args.size:
        if pipe.modality != "image":
            raise ValueError("--size is for images; use --length for audio and video")
        pipe = pipe.with_input_shape((pipe.input_shape[0], args.size, args.size))
    options = SamplingOptions(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              guidance=args.guidance, use_cache=not args.no_cache,
                              static_cache=args.static_cache)
    labels = class_labels_for(pipe, args.num, args.class_label)
    samples, codes, seconds = generate(pipe, args.num, labels, args.seed, args.batch_size, options,
                                       decode=not args.codes_only, quiet=args.quiet, length=args.length)
    write_outputs(pipe, args.out, codes, labels, samples)
    tokens = sum(c.numel() for c in codes)
    report = {"num": args.num, "seconds": seconds, "tokens_per_s": tokens / seconds, "cache": not args.no_cache,
              "static_cache": "auto" if args.static_cache is None else args.static_cache}
    (args.out / "sampling.json").write_text(json.dumps(report, indent=2) + "\n")
    emit(args, f"{args.num} samples in {seconds:.1f} s ({report['tokens_per_s']:.0f} tokens/s) written to "
               f"{args.out}", report)
    return report
