"""``tokgen encode`` / ``tokgen decode``: one file to codes and back.

Codes are saved with numpy (no pickle) in the smallest integer dtype for the codebook: a single-level
tokenizer writes one (*grid) array to CODES.npy; a hierarchical one writes ``level_0`` (top), ``level_1``
... arrays into an .npz.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from pipelines.media import read_input, write_output


def load_tokenizer_any(path: Path):
    """A tokenizer from a pipeline, run or model folder."""
    from stage1_tokenizer.evaluate import load_tokenizer

    return load_tokenizer(path)


def downsampling(tokenizer) -> tuple[int, ...]:
    factors = tokenizer.config.factors
    return tuple(factors) if isinstance(factors[0], int) else tuple(math.prod(f) for f in zip(*factors))


def add_encode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="pipeline, run or tokenizer folder")
    p.add_argument("input", type=Path)
    p.add_argument("--out", required=True, type=Path, help="CODES.npy (.npz for hierarchical tokenizers)")
    p.add_argument("--size", type=int, help="resize the shorter side first")


def add_decode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="pipeline, run or tokenizer folder")
    p.add_argument("codes", type=Path, help="CODES.npy / .npz from `tokgen encode` or `tokgen sample`")
    p.add_argument("--out", required=True, type=Path, help="output file (e.g. .png)")


def save_codes_file(codes: list[torch.Tensor], sizes: list[int], out: Path) -> None:
    from stage2_prior.export import code_dtype

    arrays = [c.cpu().numpy().astype(code_dtype(k)) for c, k in zip(codes, sizes)]
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(arrays) == 1:
        np.save(out, arrays[0], allow_pickle=False)
    else:
        np.savez(out, **{f"level_{i}": a for i, a in enumerate(arrays)})


def load_codes_file(path: Path) -> list[np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"codes file {path} not found")
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"{path} is not a numpy codes file (or needs pickle, which is refused): {err}") from err
    arrays = [loaded] if isinstance(loaded, np.ndarray) else [loaded[f"level_{i}"] for i in range(len(loaded.files))]
    for a in arrays:
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{path} holds {a.dtype} values, not integer codes")
    return arrays


def encode_main(argv=None, args=None) -> list[torch.Tensor]:
    if args is None:
        parser = argparse.ArgumentParser(prog="tokgen encode")
        add_encode_arguments(parser)
        args = parser.parse_args(argv)
    tokenizer = load_tokenizer_any(args.model)
    cfg = tokenizer.config
    x = read_input(cfg.modality, args.input, cfg.in_channels, downsampling(tokenizer), args.size,
                   getattr(cfg, "sample_rate", 0))
    with torch.no_grad():
        codes = [c[0] for c in tokenizer.encode_levels(x[None])]
    save_codes_file(codes, tokenizer.codebook_sizes, args.out)
    print(f"{args.input} {tuple(x.shape)} -> codes {[tuple(c.shape) for c in codes]} in {args.out}")
    return codes


def decode_main(argv=None, args=None) -> torch.Tensor:
    if args is None:
        parser = argparse.ArgumentParser(prog="tokgen decode")
        add_decode_arguments(parser)
        args = parser.parse_args(argv)
    tokenizer = load_tokenizer_any(args.model)
    arrays = load_codes_file(args.codes)
    if len(arrays) != tokenizer.num_levels:
        raise ValueError(f"{args.codes} holds {len(arrays)} level(s) but the tokenizer has {tokenizer.num_levels}")
    codes = [torch.from_numpy(a.astype(np.int64)) for a in arrays]
    batched = codes[0].dim() == tokenizer.dims + 1
    if not batched:
        codes = [c[None] for c in codes]
    with torch.no_grad():
        x = tokenizer.decode_levels(codes)
    if batched and x.shape[0] > 1:
        raise ValueError(f"{args.codes} holds a batch of {x.shape[0]} code grids: decode them with `tokgen sample`'s outputs")
    write_output(tokenizer.config.modality, x[0], args.out, getattr(tokenizer.config, "sample_rate", 0))
    print(f"decoded {args.codes} -> {args.out} {tuple(x.shape[1:])}")
    return x[0]


main = encode_main
add_arguments = add_encode_arguments
