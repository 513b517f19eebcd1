"""``tokgen make-pipeline``: a pipeline folder from a tokenizer run and one prior run per level."""
from __future__ import annotations

import argparse
from pathlib import Path

from harness.output import add_output_arguments, emit
from pipelines.pipeline import TokgenPipeline


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", required=True, type=Path, help="tokenizer run or model folder")
    p.add_argument("--priors", required=True, nargs="+", type=Path, help="prior run folders, top level first")
    p.add_argument("--class-names", nargs="*", help="names of the classes, in label order (for --class NAME)")
    p.add_argument("--out", required=True, type=Path, help="pipeline folder to write")
    add_output_arguments(p)


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> TokgenPipeline:
    if args is None:
        parser = argparse.ArgumentParser(prog="tokgen make-pipeline")
        add_arguments(parser)
        args = parser.parse_args(argv)
    pipe = TokgenPipeline.from_runs(args.tokenizer, args.priors, class_names=args.class_names)
    pipe.save_pretrained(args.out)
    emit(args, f"pipeline ({pipe.modality}, {len(pipe.priors)} level(s), input {pipe.input_shape}) saved to {args.out}",
         {"pipeline": str(args.out), "modality": pipe.modality, "levels": len(pipe.priors),
          "input_shape": list(pipe.input_shape), "fingerprint": pipe.fingerprint()})
    return pipe
