"""The ``tokgen`` command: one subcommand per job. Modules load lazily so ``tokgen --help`` is quick."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

# name -> (module with add_arguments/main, one-line help)
COMMANDS = {
    "train-tokenizer": ("stage1_tokenizer.train", "train a VQ-VAE tokenizer"),
    "evaluate-tokenizer": ("stage1_tokenizer.evaluate", "held-out PSNR/SSIM/LPIPS and codebook usage"),
    "export-tokens": ("stage2_prior.export", "encode a dataset into WebDataset token shards"),
    "train-prior": ("stage2_prior.train", "train an autoregressive prior on exported tokens"),
    "evaluate-prior": ("stage2_prior.evaluate", "held-out NLL in bits per token and per dimension"),
    "make-pipeline": ("pipelines.assemble", "assemble a pipeline from a tokenizer run and prior runs"),
    "sample": ("pipelines.sample", "sample from a pipeline and decode"),
    "encode": ("pipelines.codec", "encode one file into codes (.npy)"),
    "decode": ("pipelines.codec", "decode codes (.npy) into a file"),
    "compress": ("pipelines.compress", "losslessly code an input's tokens with the prior"),
    "decompress": ("pipelines.compress", "recover the codes and decode them"),
    "demo": ("pipelines.demo", "end-to-end demo on built-in data"),
}


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (module, help_) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            out[name] = (module, help_)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Before torch loads OpenMP: spinning worker threads make a busy machine (another job on the same
    # cores) up to 14x slower per step here; passive waiting costs little when the machine is idle.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not sys.stderr.isatty():
        # Progress bars in log files: a line every 20 s instead of a redraw every 0.1 s.
        os.environ.setdefault("TQDM_MININTERVAL", "20")
    parser = argparse.ArgumentParser(prog="tokgen", description="two-stage tokenized generation")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = _available()
    # Only the chosen subcommand's module is imported: building every parser would import them all.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_) in commands.items():
        p = sub.add_parser(name, help=help_)
        if name == chosen:
            mod = importlib.import_module(module)
            getattr(mod, f"add_{name.replace('-', '_')}_arguments", mod.add_arguments)(p)
    args = parser.parse_args(argv)
    mod = importlib.import_module(commands[args.command][0])
    entry = getattr(mod, f"{args.command.replace('-', '_')}_main", mod.main)
    try:
        entry(args=args)
    except (FileNotFoundError, ValueError) as err:
        if os.environ.get("TOKGEN_DEBUG"):
            raise
        print(f"tokgen {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
