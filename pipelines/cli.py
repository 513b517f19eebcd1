"""The ``tokgen`` command: one subcommand per job.

Only the chosen subcommand's module is imported (it brings torch); ``tokgen --help`` and ``tokgen --version``
import none of them.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys

from pipelines import __version__

# name -> (module with add_arguments/main, or add_<name>_arguments/<name>_main; one-line help)
COMMANDS = {
    "train-tokenizer": ("stage1_tokenizer.train", "train a VQ-VAE tokenizer"),
    "evaluate-tokenizer": ("stage1_tokenizer.evaluate", "held-out PSNR/SSIM/LPIPS and codebook usage"),
    "export-tokens": ("stage1_tokenizer.export", "encode a dataset into WebDataset token shards"),
    "train-prior": ("stage2_prior.train", "train an autoregressive prior on exported tokens"),
    "evaluate-prior": ("pipelines.evaluate", "held-out NLL in bits per token and per dimension"),
    "evaluate-samples": ("pipelines.evaluate_samples", "distance to real, judge, diversity, memorization of samples"),
    "make-pipeline": ("pipelines.assemble", "assemble a pipeline from a tokenizer run and prior runs"),
    "sample": ("pipelines.sample", "sample from a pipeline and decode"),
    "encode": ("stage1_tokenizer.codec", "encode one file into codes (.npz)"),
    "decode": ("stage1_tokenizer.codec", "decode codes (.npz) into files"),
    "compress": ("pipelines.compress", "losslessly code an input's tokens with the prior"),
    "decompress": ("pipelines.compress", "recover the codes and decode them"),
    "demo": ("pipelines.demo", "end-to-end demo on built-in data"),
}


def _entry(module, name: str, kind: str):
    """``add_<name>_arguments`` / ``<name>_main`` when the module serves several commands, else the plain ones."""
    plain = "add_arguments" if kind == "add" else "main"
    specific = f"add_{name.replace('-', '_')}_arguments" if kind == "add" else f"{name.replace('-', '_')}_main"
    return getattr(module, specific, None) or getattr(module, plain)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Before torch loads OpenMP (GNU libgomp in torch's Linux wheels): its default spin-wait of 300,000 spins makes a
    # busy machine (another job on the same cores) 4x slower per step here, passive waiting makes an idle one 1.7x
    # slower (a thread sleeps between every pair of parallel ops); 5,000 spins keep the idle speed and cost 1.3x
    # against passive on a busy machine (BENCHMARKS.md §16c). A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "5000")
    if not sys.stderr.isatty():
        # Progress bars in log files: a line every 20 s instead of a redraw every 0.1 s.
        os.environ.setdefault("TQDM_MININTERVAL", "20")
    args = build_parser(argv).parse_args(argv)
    entry = _entry(importlib.import_module(COMMANDS[args.command][0]), args.command, "main")
    from harness.output import events_to_stderr  # here, not at the top: `tokgen --help` imports no torch

    try:
        with events_to_stderr(getattr(args, "quiet", False)):
            entry(args=args)
    except KeyboardInterrupt:
        print(f"tokgen {args.command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError) as err:  # a user's error, a missing tool or file, a diverged run
        if os.environ.get("TOKGEN_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__  # one line, whatever the message holds
        print(f"tokgen {args.command}: error: {message} (TOKGEN_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    return 0


def description(module, fallback: str) -> str:
    """A command's description: the first paragraph of its module's docstring, as plain text."""
    doc = inspect.getdoc(module) or fallback
    return " ".join(doc.split("\n\n", 1)[0].split()).replace("``", "`")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The ``tokgen`` parser; only the chosen subcommand's module is imported (building every subcommand's
    options would import them all, and torch with them)."""
    parser = argparse.ArgumentParser(prog="tokgen", description="two-stage tokenized generation: tokenizers, "
                                     "priors over their codes, pipelines that sample, compress and evaluate")
    parser.add_argument("--version", action="version", version=f"tokgen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_) in COMMANDS.items():
        if name != chosen:
            sub.add_parser(name, help=help_, description=help_)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_, description=description(module, help_))
        _entry(module, name, "add")(p)
    return parser


if __name__ == "__main__":
    sys.exit(main())
