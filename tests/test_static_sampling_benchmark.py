"""The static-cache sampling benchmark runs end to end on a CPU (tiny priors) and reports both ways of stepping."""
from __future__ import annotations

import torch

from benchmarks import static_sampling


def test_static_sampling_benchmark_runs_on_a_cpu(monkeypatch):
    monkeypatch.setattr(static_sampling, "GRID", (3, 4))
    tiny = dict(dim=16, num_layers=2, num_heads=2, vocab_size=16)
    monkeypatch.setattr(static_sampling, "MODELS", {"tiny": tiny, "tiny too": tiny})
    result = static_sampling.run(torch.device("cpu"), repeats=1, quick=False)
    ways = {(r["dtype"], r["way"]) for r in result["rows"]}
    assert ways == {(d, w) for d in ("fp32", "bf16") for w in ("growing", "static, eager")}  # no graph on a CPU
    for r in result["rows"]:
        assert r["step_s"] > 0 and r["sample_s"] > 0 and 0 < r["floor_s"] < r["step_s"]
    assert result["bandwidth_bytes_per_s"] > 0 and "static, eager" in result["markdown"]
