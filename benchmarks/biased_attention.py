"""Train step of a transformer prior with a relative attention bias: SDPA against query blocks, on a CPU.

    python -m benchmarks.biased_attention [--repeats 15] [--quick]

Method: the prior of ``harness/presets/prior-moving-digits.json`` (dim 128, 3 layers, 4 heads, relative bias, class
labels with a null class) over the moving-digits demo's code grid (4 x 8 x 8 = 256 positions, 512 codes), random
init, batch 16 of random codes. A step is what the trainer runs around the model: forward, cross-entropy, backward,
AdamW (``stage2_prior.train.train_step`` less its Accelerate bookkeeping), in fp32 and under bf16 autocast. The ways
of computing the biased causal attention in the forward run interleaved, medians of ``--repeats``:

- ``SDPA``: ``F.scaled_dot_product_attention`` with the (heads, N, N) bias as its mask (what the prior ran before:
  with a mask that needs a gradient, a CPU has only SDPA's math path, in fp32 under bf16 autocast);
- ``one block``: ``biased_causal_attention`` with the whole sequence as one block (the same math, written out);
- ``blocks of 64``: ``biased_causal_attention`` as shipped (``QUERY_BLOCK`` rows a block; each scores only the
  keys up to its last row).

The threads are torch's default (the demo's); the logits of the three agree to rounding (the tests check outputs
and gradients against SDPA).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.common import interleaved, machine_info, machine_line, median, table, write_result
from stage2_prior import transformer

GRID = (4, 8, 8)  # the moving-digits demo's codes
BATCH = 16  # the preset's batch
SHIPPED = transformer.biased_causal_attention


def sdpa(q, k, v, bias):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))


def one_block(q, k, v, bias):
    return _with_block(q.shape[2], q, k, v, bias)


def _with_block(rows: int, q, k, v, bias):
    shipped, transformer.QUERY_BLOCK = transformer.QUERY_BLOCK, rows
    try:
        return SHIPPED(q, k, v, bias)
    finally:
        transformer.QUERY_BLOCK = shipped


WAYS = {"SDPA (before)": sdpa, "one block": one_block, f"blocks of {transformer.QUERY_BLOCK}": SHIPPED}


def make_prior(grid: tuple[int, ...]) -> transformer.TransformerPrior:
    from harness.config import preset

    values = preset("prior-moving-digits")["model"]
    torch.manual_seed(0)
    config = transformer.TransformerPriorConfig(grid_shape=grid, vocab_size=512, num_classes=10, null_class=True,
                                                **values)
    return transformer.TransformerPrior(config).train()


def step_fn(prior, optimizer, codes, labels, bf16: bool, attention):
    """One train step with ``attention`` in the forward; returns its seconds."""
    def step() -> float:
        transformer.biased_causal_attention = attention
        try:
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = prior(codes, labels)
                loss = F.cross_entropy(logits.flatten(0, -2).float(), codes.flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - t0
        finally:
            transformer.biased_causal_attention = SHIPPED
    return step


def run(repeats: int, grid: tuple[int, ...] = GRID, batch: int = BATCH) -> dict:
    prior = make_prior(grid)
    optimizer = torch.optim.AdamW(prior.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 512, (batch, *grid), generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    fns = {f"{precision}|{way}": step_fn(prior, optimizer, codes, labels, precision == "bf16", attention)
           for precision in ("fp32", "bf16") for way, attention in WAYS.items()}
    times = interleaved(fns, repeats=repeats, warmup=2)
    rows, data = [], []
    for precision in ("fp32", "bf16"):
        before = median(times[f"{precision}|SDPA (before)"])
        for way in WAYS:
            seconds = median(times[f"{precision}|{way}"])
            data.append({"precision": precision, "way": way, "step_s": seconds, "times_s": times[f"{precision}|{way}"]})
            rows.append([precision, way, f"{1e3 * seconds:.1f}", f"{before / seconds:.2f}x"])
    md = table(["precision", "attention", "ms a train step", "vs SDPA"], rows)
    md += (f"\n\nGrid {'x'.join(map(str, grid))} ({prior.num_tokens} positions), batch {batch}, "
           f"{torch.get_num_threads()} torch threads, medians of {repeats} interleaved rounds.")
    return {"title": "A prior with a relative attention bias: train step, SDPA against query blocks",
            "markdown": md, "rows": data, "grid": list(grid), "batch": batch}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.biased_attention", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="two rounds")
    args = p.parse_args(argv)
    info, t0 = machine_info(), time.perf_counter()
    result = run(2 if args.quick else args.repeats)
    command = "python -m benchmarks.biased_attention " + " ".join(sys.argv[1:] if argv is None else argv)
    name = "biased_attention" + (".quick" if args.quick else "")
    path = write_result(name, result, info, command, time.perf_counter() - t0)
    print(f"# {result['title']}\n\n`{command}`\n\nMachine: {machine_line(info)}\n\n{result['markdown']}\n\n({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
