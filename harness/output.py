"""What commands print, and where.

stdout carries the result: one summary line, or with ``--json`` one JSON object (nothing else, so it pipes into
``jq``), or nothing with ``--quiet``. Run events (resumed, checkpoints, held-out scores, skipped files) go to
stderr through the ``tokgen`` logger, which ``tokgen`` sets up and a library user may configure as they like.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import time

log = logging.getLogger("tokgen")


def add_output_arguments(p, json_output: bool = True) -> None:
    p.add_argument("--quiet", action="store_true", help="print nothing but errors: no progress bars, no summary")
    if json_output:
        p.add_argument("--json", action="store_true",
                       help="print the result as one JSON object on stdout instead of the summary line")


def emit(args, line: str, result: dict | None = None) -> None:
    """The command's result on stdout: ``result`` as JSON with ``--json``, else ``line`` unless ``--quiet``."""
    if getattr(args, "json", False):
        print(json.dumps(result if result is not None else {"summary": line}, default=str))
    elif not getattr(args, "quiet", False):
        print(line)


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (a test's capture, a redirected file)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


@contextlib.contextmanager
def events_to_stderr(quiet: bool = False):
    """Within: run events to stderr, one line each (``quiet``: warnings only); as it was afterwards."""
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


class Stages:
    """Times each stage of a long command and logs a header as it starts, so the run reads as a sequence of steps.

    ``times``: stage name (spaces as underscores) + "_s" -> seconds; ``header`` formats the logged line."""

    def __init__(self, header: str = "== {} =="):
        self.header = header
        self.times: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        log.info(self.header.format(name))
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        self.times[name.replace(" ", "_") + "_s"] = round(time.perf_counter() - started, 2)
        return result
