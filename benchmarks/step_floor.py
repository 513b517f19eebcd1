"""Each prior's cached sampling step against this machine's floor, at batch 8 on one thread.

    python -m benchmarks.step_floor [--repeats 3] [--batch 8] [--threads 1] [--quick]

For the PixelCNN and WaveNet of ``benchmarks.conv_sampling`` and the transformer of ``benchmarks.sampling``
(random weights: the work does not depend on the values), ``prior.step`` runs over the whole grid with fixed
codes fed back (the sampler's own draw is left out), ``--repeats`` grids back to back (the first warms up);
the table gives the median time per step. The floor of one step is

    max(bytes it must read / copy bandwidth, FLOPs / peak FLOP/s) + ops it needs x per-op dispatch cost

* bytes: the weights the step applies, its share of the per-row work (PixelCNN) and the cache entries it
  reads (conv taps, the transformer's keys and values, averaged over the grid), as in ``conv_sampling``;
* FLOPs: counted by ``torch.utils.flop_counter`` over the whole grid, divided by its length; the peak is
  ``benchmarks.common.peak_gflops``. The issue's floor has no compute term; at batch 8 the PixelCNN's row
  convolutions make a step compute-bound, and a floor below the FLOPs would be no floor;
* ops it needs: one per weight matrix applied plus one per fused elementwise chain (a gate, a norm, an
  activation, attention), counted from the architecture (``needed_ops``); the per-op cost is the median time
  of a tiny ``torch.add`` called from Python.

The ops a step runs are counted with a ``TorchDispatchMode`` (views, slices and other aliasing ops are not
counted: they launch no kernel). The gap between a step and its floor then splits into the dispatch of the
ops beyond those it needs (``excess ops x per-op cost``) and the rest: kernels running below bandwidth or
peak (8-row GEMMs through ``F.linear``, a row convolution below the peak), and Python time per op.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import (count_flops, interleaved, machine_info, machine_line, median,
                               peak_gflops, table, write_result)
from benchmarks.conv_sampling import _nbytes, bandwidth, build, pixelcnn_step_bytes, wavenet_step_bytes
from benchmarks.sampling import make_prior

NAME = "step_floor"
# Ops that make a view or alias of their input: no kernel runs, so they are not dispatch the floor counts.
ALIASING = {"view", "_unsafe_view", "t", "transpose", "permute", "slice", "select", "as_strided", "split",
            "split_with_sizes", "unbind", "chunk", "expand", "narrow", "alias", "detach", "unsqueeze", "squeeze",
            "_reshape_alias", "reshape", "unfold", "lift_fresh"}


class OpCounter(TorchDispatchMode):
    """Counts the kernel-launching aten ops run inside it, by name."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in ALIASING:
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def needed_ops(prior) -> int:
    """Kernels one cached step cannot do without: a GEMM per weight matrix, one per fused elementwise chain."""
    cfg = prior.config
    if prior.model_type == "pixelcnn":  # per layer: taps GEMM, gate, out GEMM; head: GEMM, ReLU, GEMM (+ ReLU)
        attn = len(prior.attn) * 4  # norm, qkv GEMM, attention, proj GEMM
        return 3 * cfg.num_layers + 4 + attn
    if prior.model_type == "wavenet":
        return 3 * len(cfg.dilations) + 4
    if prior.model_type == "transformer":  # per block: 2 norms, 4 GEMMs, attention, GELU; head: norm, GEMM
        return 8 * cfg.num_layers + 2
    raise ValueError(f"no op count for a {prior.model_type} prior")


def transformer_step_bytes(prior, batch: int) -> float:
    """Weights + the mean keys and values a step reads (position t reads t + 1 of each per layer)."""
    cfg, f = prior.config, 4
    weights = sum(_nbytes(block) for block in prior.blocks) + _nbytes(prior.head, prior.ln_f)
    kv = cfg.num_layers * 2 * batch * cfg.dim * (prior.num_tokens + 1) / 2 * f
    return weights + kv


def dispatch_cost(calls: int = 20000, repeats: int = 5) -> float:
    """Seconds of one tiny op called from Python (the per-op cost every kernel launch pays at least)."""
    x = torch.zeros(8, 4)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.add(x, x)
        times.append((time.perf_counter() - t0) / calls)
    return median(times)


def run_grid(prior, codes: torch.Tensor) -> None:
    """Every cached step of one grid, codes (B, N) fed back as the previous positions."""
    state = prior.start_state(codes.shape[0])
    for t in range(prior.num_tokens):
        prior.step(state, codes[:, t - 1] if t else None)


def priors(quick: bool) -> dict:
    """name -> (prior, bytes per step(prior, batch), architecture)."""
    out = dict(build(quick))
    out["transformer"] = (make_prior((16, 16) if quick else (32, 32)), transformer_step_bytes,
                          "dim 256, 6 layers, 8 heads, V 512")
    return out


def measure(prior, step_bytes, batch: int, repeats: int, machine: dict) -> dict:
    n = prior.num_tokens
    codes = torch.randint(prior.config.vocab_size, (batch, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        times = interleaved({"grid": lambda: run_grid(prior, codes)}, repeats, warmup=0)["grid"]
        with OpCounter() as counter:
            run_grid(prior, codes)
        flops = count_flops(lambda: run_grid(prior, codes)) / n
    step, nbytes = median(times) / n, step_bytes(prior, batch)
    bytes_s = nbytes / machine["bandwidth"]
    compute_s = flops / (machine["peak_gflops"] * 1e9)
    ops_run, ops_needed = counter.total / n, needed_ops(prior)
    floor = max(bytes_s, compute_s) + ops_needed * machine["dispatch"]
    return {"tokens": n, "batch": batch, "step_s_median": step, "step_s_all": [t / n for t in times],
            "bytes_per_step": nbytes, "flops_per_step": flops, "bytes_floor_s": bytes_s,
            "compute_floor_s": compute_s, "ops_run_per_step": ops_run, "ops_needed_per_step": ops_needed,
            "ops_by_name_per_step": {k: v / n for k, v in sorted(counter.ops.items(), key=lambda kv: -kv[1])},
            "floor_s": floor, "step_over_floor": step / floor,
            "excess_dispatch_s": max(ops_run - ops_needed, 0) * machine["dispatch"]}


def row(name: str, arch: str, r: dict) -> list:
    us = 1e6
    rest = r["step_s_median"] - r["floor_s"] - r["excess_dispatch_s"]
    return [name, arch, r["tokens"], r["step_s_median"] * us, r["bytes_floor_s"] * us, r["compute_floor_s"] * us,
            f"{r['ops_needed_per_step']} / {r['ops_run_per_step']:.0f}", r["floor_s"] * us, r["step_over_floor"],
            r["excess_dispatch_s"] * us, rest * us]


COLUMNS = ["prior", "architecture", "tokens", "step µs", "bytes µs", "FLOPs µs", "ops needed / run", "floor µs",
           "step/floor", "excess dispatch µs", "rest µs"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="small grids (16x16, 256) for a smoke run")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    info, started = machine_info(), time.perf_counter()
    machine = {"bandwidth": bandwidth(torch.device("cpu")), "peak_gflops": peak_gflops()["peak"],
               "dispatch": dispatch_cost()}
    results, rows = {}, []
    for name, (prior, step_bytes, arch) in priors(args.quick).items():
        results[name] = measure(prior, step_bytes, args.batch, args.repeats, machine) | {"arch": arch}
        rows.append(row(name, arch, results[name]))
    print(f"{machine_line(info)}; copy bandwidth {machine['bandwidth'] / 1e9:.1f} GB/s, peak "
          f"{machine['peak_gflops']:.0f} GFLOP/s, per-op dispatch {machine['dispatch'] * 1e6:.2f} µs; "
          f"batch {args.batch}")
    print(table(COLUMNS, rows))
    result = {"machine": machine, "batch": args.batch, "repeats": args.repeats, "results": results,
              "quick": args.quick}
    command = "python -m benchmarks.step_floor " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"wrote {write_result(NAME, result, info, command.strip(), time.perf_counter() - started)}")
    return result


if __name__ == "__main__":
    main()
