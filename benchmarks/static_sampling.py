"""Sampling speed of the transformer prior: the growing KV cache against the static cache (one CUDA graph per code).

    python -m benchmarks.static_sampling [--device auto] [--repeats 3] [--quick]

Method: random-init ``TransformerPrior``s (random weights cost what trained ones cost) over a 32x32 grid (1,024
codes): the §14 one (dim 256, 6 layers, 8 heads, 512 codes, 5M parameters) and, on a GPU, one of LlamaGen-B's
size (dim 768, 12 layers, 12 heads, 1,024 codes, 87M parameters), in bf16. For each batch and precision (fp32;
bf16 under autocast, as ``--dtype bf16`` runs it) the ways of stepping run interleaved, medians of ``--repeats``:

- ``growing``: ``TransformerPrior.step``, the cache one position longer each call (what ``sample`` uses off a GPU);
- ``static, eager``: ``StaticStep`` run op by op (the fixed-shape step without a graph);
- ``static, graph``: ``StaticStep`` captured once as a CUDA graph and replayed per code (GPU only).

Two figures each: the model step alone (all 1,024 steps fed a fixed code, one device sync at the end) and a whole
``sample()`` call (the step plus the sampler's logit filter, its draw on the CPU generator and the copy back),
as tokens per second (batch x 1,024 codes over the seconds). The floor of the model step is the bytes it must
read (the weights, and at the last position the whole cache) over the device's copy bandwidth, measured here.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.common import interleaved, machine_info, machine_line, median, table, write_result
from benchmarks.conv_sampling import bandwidth, sync
from harness.devices import autocast, resolve_device

GRID = (32, 32)
MODELS = {"dim 256, 6 layers (§14)": dict(dim=256, num_layers=6, num_heads=8, vocab_size=512),
          "dim 768, 12 layers (LlamaGen-B size)": dict(dim=768, num_layers=12, num_heads=12, vocab_size=1024)}


def make_prior(values: dict, device: torch.device):
    from stage2_prior.transformer import TransformerPrior, TransformerPriorConfig

    torch.manual_seed(0)
    return TransformerPrior(TransformerPriorConfig(grid_shape=GRID, **values)).to(device).eval()


def step_seconds(prior, batch: int, how: str, dtype: torch.dtype) -> float:
    """Seconds for all steps of one batch, the model alone (a fixed previous code; one sync at the end)."""
    device = prior.start.device
    prev = torch.zeros(batch, dtype=torch.long, device=device)
    with torch.no_grad(), autocast(device, dtype):
        if how == "growing":
            state = prior.start_state(batch)
            step = lambda p: prior.step(state, p)  # noqa: E731
        else:
            step = prior.start_static(batch, graph=how == "static, graph").step
        sync(device)
        t0 = time.perf_counter()
        for t in range(prior.num_tokens):
            step(prev if t else None)
        sync(device)
    return time.perf_counter() - t0


def sample_seconds(prior, batch: int, how: str, dtype: torch.dtype) -> float:
    """Seconds for one whole ``sample()`` of a batch (model, filter, draw), timed inside the autocast."""
    from stage2_prior.sampling import sample

    device = prior.start.device
    with autocast(device, dtype):
        sync(device)
        t0 = time.perf_counter()
        sample(prior, batch, generator=torch.Generator().manual_seed(0), static_cache=how != "growing")
        sync(device)
    return time.perf_counter() - t0


def floor_seconds(prior, batch: int, dtype: torch.dtype, bytes_per_s: float) -> float:
    """The model steps' floor: each step reads the weights, and on average half of the full cache of its layers."""
    cfg, n = prior.config, prior.num_tokens
    weights = sum(p.numel() for p in prior.parameters()) * 4  # fp32 weights (autocast casts them each step)
    element = 2 if dtype == torch.bfloat16 else 4
    cache = 2 * cfg.num_layers * batch * n * cfg.dim * element
    return n * (weights + cache / 2) / bytes_per_s


def cases(device: torch.device, quick: bool) -> list[tuple]:
    """(model, batch, dtype, ways): on a CPU the small model at batch 8; on a GPU batches 8 and 64, the small model
    in bf16 (and at batch 8 in fp32) and the LlamaGen-B-sized one in bf16 (how a GPU user runs it)."""
    ways = ["growing", "static, eager"] + (["static, graph"] if device.type == "cuda" else [])
    small, big = MODELS
    if device.type == "cpu" or quick:
        return [(small, 8, d, ways) for d in ([torch.float32] if quick else [torch.float32, torch.bfloat16])]
    ways = ["growing", "static, graph"]  # a GPU: the eager static step is the CPU's check, not a way to sample
    bf16 = torch.bfloat16
    return [(small, 8, bf16, ways), (big, 8, bf16, ways), (big, 64, bf16, ways), (small, 8, torch.float32, ways),
            (small, 64, bf16, ways)]


def run(device: torch.device, repeats: int, quick: bool) -> dict:
    bytes_per_s = bandwidth(device)
    rows, data = [], []
    for model, batch, dtype, ways in cases(device, quick):
        prior = make_prior(MODELS[model], device)
        fns = {}
        for how in ways:
            fns[f"{how}|step"] = lambda how=how: step_seconds(prior, batch, how, dtype)
            fns[f"{how}|sample"] = lambda how=how: sample_seconds(prior, batch, how, dtype)
        times = interleaved(fns, repeats=repeats, warmup=1)
        floor = floor_seconds(prior, batch, dtype, bytes_per_s)
        tokens = batch * prior.num_tokens
        name = "fp32" if dtype == torch.float32 else "bf16"
        base = median(times["growing|step"])
        for how in ways:
            step, whole = median(times[f"{how}|step"]), median(times[f"{how}|sample"])
            print(f"{model}, batch {batch}, {name}, {how}: {1e6 * step / prior.num_tokens:,.0f} µs a step, "
                  f"{tokens / whole:,.0f} tokens/s in sample()", flush=True)
            data.append({"model": model, "batch": batch, "dtype": name, "way": how, "step_s": step,
                         "sample_s": whole, "floor_s": floor, "times_s": {k: times[f"{how}|{k}"]
                                                                          for k in ("step", "sample")}})
            rows.append([model, batch, name, how, f"{1e6 * step / prior.num_tokens:,.0f}",
                         f"{tokens / step:,.0f}", f"{base / step:.1f}x", f"{step / floor:.1f}x",
                         f"{tokens / whole:,.0f}"])
    md = table(["prior", "batch", "precision", "step", "µs per step", "model tokens/s", "vs growing",
                "vs floor", "sample() tokens/s"], rows)
    md += (f"\n\nFloor: the weights (fp32) and half the full cache read per step at {bytes_per_s / 1e9:,.0f} GB/s "
           f"(a device copy, read + write). Grid {GRID[0]}x{GRID[1]} = {GRID[0] * GRID[1]} codes.")
    return {"title": "Sampling: growing cache against the static cache (CUDA graph)", "markdown": md,
            "rows": data, "bandwidth_bytes_per_s": bytes_per_s, "device": str(device)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.static_sampling", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto (CUDA if there is one), cpu or cuda")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one model, batch 8, fp32, one repeat")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    info, t0 = machine_info(), time.perf_counter()
    result = run(device, 1 if args.quick else args.repeats, args.quick)
    command = "python -m benchmarks.static_sampling " + " ".join(sys.argv[1:] if argv is None else argv)
    name = "static_sampling." + device.type + (".quick" if args.quick else "")
    path = write_result(name, result, info, command, time.perf_counter() - t0)
    print(f"# {result['title']}\n\n`{command}`\n\nMachine: {machine_line(info)}\n\n{result['markdown']}\n\n({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
