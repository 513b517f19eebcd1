"""The biased-attention benchmark runs end to end on a tiny grid, times every way in both precisions, and leaves the
prior's attention as shipped."""
from __future__ import annotations

from benchmarks import biased_attention
from stage2_prior import transformer


def test_biased_attention_benchmark_runs_and_restores_the_shipped_attention():
    shipped, block = transformer.biased_causal_attention, transformer.QUERY_BLOCK
    result = biased_attention.run(repeats=1, grid=(2, 3, 4), batch=2)
    assert {(r["precision"], r["way"]) for r in result["rows"]} == {
        (p, w) for p in ("fp32", "bf16") for w in biased_attention.WAYS}
    assert all(r["step_s"] > 0 for r in result["rows"]) and "vs SDPA" in result["markdown"]
    assert transformer.biased_causal_attention is shipped and transformer.QUERY_BLOCK == block
