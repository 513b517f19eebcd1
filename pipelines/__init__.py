"""The roof: the pipeline that assembles a tokenizer and its priors, sampling, lossless compression, evaluation
of a pipeline, the demo and the ``tokgen`` command.

The public names load on first use (PEP 562), so that ``tokgen --help`` and ``tokgen --version`` start
without importing torch.
"""
from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tokgen")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

_PUBLIC = {
    "TokgenPipeline": "pipelines.pipeline",
    "PipelineOutput": "pipelines.pipeline",
    "compress": "pipelines.compress",
    "decompress": "pipelines.compress",
    "compress_batch": "pipelines.compress",
    "decompress_batch": "pipelines.compress",
    "evaluate_pipeline": "pipelines.evaluate",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
