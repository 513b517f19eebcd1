"""Sampling speed of the transformer prior: KV cache (``use_cache=True``) against full recompute.

Issue goal: the cache samples >= 10x more tokens/s than no-cache at 1024 tokens per sample.

Method: a random-init ``TransformerPrior`` (dim 256, 6 layers, 8 heads, vocab 512) samples batches of 8
with ``stage2_prior.sampling.sample``; grids (8, 8) = 64 and (32, 32) = 1024 tokens per sample. Random
weights sample as fast as trained ones (the work does not depend on the values). Cached and no-cache runs
alternate (interleaved rounds) and we quote medians.

At 64 tokens both paths sample the whole grid. At 1024 tokens a no-cache sample would take tens of
minutes, so it is stopped (through ``sample``'s ``progress`` callback) after the first P positions and its
time is extrapolated as ``t(P) * 1024 / P``. That is exact in expectation, not an estimate of a trend:
without the cache every position runs the same full forward pass over all 1024 positions (the
causal mask hides the future ones but they are still computed), so each position costs the same. The cached
path is timed over the whole grid (its later positions cost more than its first, so timing only P of them
would flatter it). For reference the table also gives the cached time for the same first P positions.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import interleaved, median, table

BATCH = 8


class _Stop(Exception):
    pass


def make_prior(grid: tuple[int, int]):
    from stage2_prior.transformer import TransformerPrior, TransformerPriorConfig

    torch.manual_seed(0)
    return TransformerPrior(TransformerPriorConfig(grid_shape=grid, vocab_size=512, dim=256, num_layers=6,
                                                   num_heads=8)).eval()


def timed_sample(prior, use_cache: bool, positions: int | None, seed: int = 0) -> float:
    """Seconds to sample the first ``positions`` positions (None: all) of a batch with ``sample``."""
    from stage2_prior.sampling import sample

    n = prior.num_tokens
    stop_at = n if positions is None else positions
    done = [0, 0.0]
    t0 = time.perf_counter()

    def progress(k: int) -> None:
        done[0] += k
        if done[0] >= stop_at:
            done[1] = time.perf_counter() - t0
            raise _Stop

    try:
        sample(prior, BATCH, generator=torch.Generator().manual_seed(seed), use_cache=use_cache, progress=progress)
    except _Stop:
        pass
    return done[1]


def run(quick: bool = False) -> dict:
    torch.manual_seed(0)
    cases = [((8, 8), None, 2 if quick else 5), ((32, 32), 2 if quick else 8, 1 if quick else 3)]
    rows, data = [], []
    for grid, partial, repeats in cases:
        prior = make_prior(grid)
        n = prior.num_tokens
        fns = {"cached": lambda: timed_sample(prior, True, None),
               "no-cache": lambda: timed_sample(prior, False, partial)}
        if partial is not None:
            fns["cached, first P"] = lambda: timed_sample(prior, True, partial)
        times = interleaved(fns, repeats=repeats, warmup=1)
        cached = median(times["cached"])
        nocache_measured = median(times["no-cache"])
        nocache_full = nocache_measured * (n / partial if partial else 1)
        entry = {"grid": list(grid), "tokens_per_sample": n, "batch": BATCH, "repeats": repeats,
                 "no_cache_positions_timed": partial or n, "times_s": times,
                 "cached_s": cached, "no_cache_s_full_grid": nocache_full,
                 "cached_tokens_per_s": BATCH * n / cached, "no_cache_tokens_per_s": BATCH * n / nocache_full,
                 "speedup": nocache_full / cached, "extrapolated": partial is not None}
        if partial is not None:
            entry["cached_first_p_s"] = median(times["cached, first P"])
            entry["speedup_same_positions"] = nocache_measured / entry["cached_first_p_s"]
        data.append(entry)
        how = "whole grid" if partial is None else f"first {partial} positions, x{n // partial} extrapolated"
        rows.append([f"{grid[0]}x{grid[1]} = {n}", BATCH, repeats, f"{cached:.2f}",
                     f"{entry['cached_tokens_per_s']:,.0f}", f"{nocache_full:.1f} ({how})",
                     f"{entry['no_cache_tokens_per_s']:,.1f}", f"{entry['speedup']:.1f}x",
                     f"{entry['speedup_same_positions']:.1f}x" if partial else "-"])
    big = data[-1]["speedup"]
    md = table(["tokens/sample", "batch", "repeats", "cached s/batch", "cached tokens/s", "no-cache s/batch",
                "no-cache tokens/s", "speedup", "speedup over the same first P positions"], rows)
    md += f"\n\nGoal >= 10x at 1024 tokens: {'met' if big >= 10 else 'NOT met'} ({big:.1f}x)."
    return {"title": "Sampling: KV cache vs no cache", "markdown": md, "cases": data, "goal_met": big >= 10,
            "quick": quick}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    print(run(p.parse_args().quick)["markdown"])
