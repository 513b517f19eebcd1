"""Run the benchmarks: ``python -m benchmarks.run [--only NAME[,NAME]] [--quick]``.

Prints a markdown table per benchmark and writes ``benchmarks/results/NAME.json`` (``NAME.quick.json``
with ``--quick``) holding the numbers, the machine (CPU model, cores, torch version, date, load average)
and the command. ``--threads N`` fixes torch's thread count in every benchmark process (and
its subprocesses). ``--quick`` is a smoke run (fewer steps and repeats, smaller inputs in places): its
numbers are not the ones quoted in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from benchmarks.common import THREADS_ENV, apply_threads, command_line, machine_info, machine_line, write_result

BENCHMARKS = ["tokenizer_step", "codebook_usage", "sampling", "prior_train", "export", "prior_stream"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    p.add_argument("--quick", action="store_true", help="smoke run (minutes), not the reported numbers")
    p.add_argument("--threads", type=int, help="torch threads in every benchmark process (default: torch's "
                   "own choice, one per core); on a shared machine 1 avoids oversubscribed cores")
    args = p.parse_args(argv)
    if args.threads:
        os.environ[THREADS_ENV] = str(args.threads)
    apply_threads()
    names = BENCHMARKS if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {BENCHMARKS}")
    info = machine_info()
    command = command_line()
    print(f"# tokgen benchmarks{' (quick)' if args.quick else ''}\n\n`{command}`\n\nMachine: {machine_line(info)}\n",
          flush=True)
    started = time.perf_counter()
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        t0 = time.perf_counter()
        load_before = os.getloadavg()[0]
        result = module.run(quick=args.quick)
        seconds = time.perf_counter() - t0
        result["loadavg_1min_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        path = write_result(name + (".quick" if args.quick else ""), result, info, command, seconds)
        print(f"## {result['title']}\n\n{result['markdown']}\n\n({seconds:.0f} s; 1-min load average "
              f"{result['loadavg_1min_before_after'][0]} -> {result['loadavg_1min_before_after'][1]}; "
              f"{path.relative_to(path.parent.parent.parent)})\n", flush=True)
    print(f"All done in {time.perf_counter() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
