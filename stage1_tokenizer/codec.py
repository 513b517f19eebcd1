"""``tokgen encode`` / ``tokgen decode``: files to codes and back, with any tokenizer.

Codes files are the one layout of :mod:`data.codes` (``.npz``, ``level_0`` the top level, ``(N, *grid)``;
``(N, *grid, stages)`` for a residual quantizer, whose ``tokgen encode --stages K`` keeps the first K stages: a
lower bitrate, which ``tokgen decode`` decodes as it decodes all of them).
``tokgen encode`` writes N = 1; ``tokgen decode`` reads what ``tokgen encode``, ``tokgen sample`` and
``tokgen decompress --codes-out`` write, any number of items and levels. One item is written to
``--out``; N items to ``--out`` with ``_000``, ``_001``... before its suffix, or into ``--out`` as a folder
when it has no suffix.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from data.codes import load_codes, save_codes
from data.files import OUTPUT_SUFFIX, read_input, write_output
from harness.devices import add_device_arguments, autocast, resolve_device, resolve_dtype
from harness.output import add_output_arguments, emit
from stage1_tokenizer.base import Tokenizer
from stage1_tokenizer.registry import load_tokenizer


def add_encode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="pipeline, run or tokenizer folder")
    p.add_argument("input", type=Path, help="image, audio or video file")
    p.add_argument("--out", required=True, type=Path, help="codes file to write (.npz)")
    p.add_argument("--size", type=int, help="resize the shorter side first (audio: keep the first SIZE samples)")
    p.add_argument("--stages", type=int,
                   help="residual quantizers (kind rvq): keep the first K stages of each position (a lower "
                        "bitrate; default: all)")
    add_device_arguments(p)
    add_output_arguments(p)


def add_decode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="pipeline, run or tokenizer folder")
    p.add_argument("codes", type=Path, help="codes file (.npz) from `tokgen encode`, `tokgen sample` or "
                                            "`tokgen decompress --codes-out`")
    p.add_argument("--out", required=True, type=Path,
                   help="output file (one item) or name pattern / folder (several items)")
    add_device_arguments(p)
    add_output_arguments(p)


def read_file(tokenizer: Tokenizer, path: Path, size: int | None = None) -> torch.Tensor:
    """One input file as ``tokenizer`` takes it, (C, *S), cropped to a multiple of its downsampling."""
    return read_input(tokenizer.modality, path, tokenizer.config.in_channels, tokenizer.downsampling, size,
                      tokenizer.sample_rate)


def encode_main(argv=None, args=None) -> list[torch.Tensor]:
    if args is None:
        parser = argparse.ArgumentParser(prog="tokgen encode")
        add_encode_arguments(parser)
        args = parser.parse_args(argv)
    tokenizer, device, dtype = load_for_inference(args)
    x = read_file(tokenizer, args.input, args.size)
    # other kinds refuse num_stages with a message; a caller's Namespace may predate --stages
    stages = {} if getattr(args, "stages", None) is None else {"num_stages": args.stages}
    with torch.no_grad(), autocast(device, dtype):
        codes = [c.cpu() for c in tokenizer.encode_levels(x[None].to(device), **stages)]
    save_codes(args.out, codes, tokenizer.codebook_sizes)
    emit(args, f"{args.input} {tuple(x.shape)} -> codes {[tuple(c.shape[1:]) for c in codes]} in {args.out}",
         {"input": str(args.input), "input_shape": list(x.shape), "codes": str(args.out),
          "code_shapes": [list(c.shape[1:]) for c in codes]})
    return codes


def output_paths(out: Path, count: int, modality: str) -> list[Path]:
    """Where ``count`` decoded items go: ``out`` for one item with a suffix; else numbered beside it or in it."""
    if out.suffix and count == 1:
        return [out]
    if out.suffix:
        return [out.with_name(f"{out.stem}_{i:03d}{out.suffix}") for i in range(count)]
    return [out / f"{i:03d}{OUTPUT_SUFFIX[modality]}" for i in range(count)]


def load_for_inference(args) -> tuple[Tokenizer, torch.device, torch.dtype]:
    """The tokenizer ``args.model`` names, on ``args.device``, with the dtype ``args.dtype`` says."""
    device = resolve_device(args.device)
    return load_tokenizer(args.model).to(device), device, resolve_dtype(args.dtype)


def decode_codes(tokenizer: Tokenizer, codes: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes per level, (N, *grid) or one item's (*grid), top first (code stacks: (N, *grid, stages) or
    (*grid, stages)) -> decoded items (N, C, *S), clamped, on the CPU."""
    if len(codes) != tokenizer.num_levels:
        raise ValueError(f"the codes hold {len(codes)} level(s) but the tokenizer has {tokenizer.num_levels}")
    item_dims = tokenizer.dims + (1 if tokenizer.code_depth else 0)  # one item's codes: the grid (+ stages)
    codes = [c[None] if c.dim() == item_dims else c for c in codes]
    if len({c.shape[0] for c in codes}) != 1:
        raise ValueError(f"the levels hold different numbers of items: {[tuple(c.shape) for c in codes]}")
    device = next(tokenizer.parameters()).device
    with torch.no_grad(), autocast(device, dtype):
        return tokenizer.decode_clamped([c.to(device) for c in codes]).float().cpu()


def decode_main(argv=None, args=None) -> list[Path]:
    if args is None:
        parser = argparse.ArgumentParser(prog="tokgen decode")
        add_decode_arguments(parser)
        args = parser.parse_args(argv)
    tokenizer, _, dtype = load_for_inference(args)
    x = decode_codes(tokenizer, load_codes(args.codes), dtype)
    paths = [write_output(tokenizer.modality, item, path, tokenizer.sample_rate)
             for item, path in zip(x, output_paths(args.out, x.shape[0], tokenizer.modality))]
    where = paths[0] if len(paths) == 1 else f"{len(paths)} files ({paths[0]} ...)"
    emit(args, f"decoded {args.codes} -> {where}, each {tuple(x.shape[1:])}",
         {"codes": str(args.codes), "outputs": [str(p) for p in paths], "shape": list(x.shape[1:])})
    return paths
