"""The step-floor benchmark counts kernels, not views, and never asks a step for fewer ops than the
architecture needs: every prior's real cached step runs at least the ops the floor charges it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.step_floor import OpCounter, needed_ops, run_grid, transformer_step_bytes
from stage2_prior.pixelcnn import GatedPixelCNNPrior, GatedPixelCNNPriorConfig
from stage2_prior.transformer import TransformerPrior, TransformerPriorConfig
from stage2_prior.wavenet import WaveNetPrior, WaveNetPriorConfig


def test_counter_counts_kernels_and_skips_views():
    x, w, b = torch.randn(8, 16), torch.randn(4, 16), torch.randn(4)
    with OpCounter() as counter:
        y = F.linear(x, w, b)  # addmm plus a transpose view of w
        y.view(2, 16)[:, 1:].t()
        torch.tanh(y)
    assert counter.ops == {"addmm": 1, "tanh": 1}


PRIORS = {
    "pixelcnn": lambda: GatedPixelCNNPrior(GatedPixelCNNPriorConfig(grid_shape=(4, 5), vocab_size=16, channels=8,
                                                                    num_layers=3, attn_every=2, attn_heads=2)),
    "wavenet": lambda: WaveNetPrior(WaveNetPriorConfig(grid_shape=(12,), vocab_size=16, channels=8, skip_channels=8,
                                                       head_channels=8, layers_per_cycle=3, num_cycles=2)),
    "transformer": lambda: TransformerPrior(TransformerPriorConfig(grid_shape=(3, 4), vocab_size=16, dim=16,
                                                                   num_layers=2, num_heads=2)),
}


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_every_step_runs_at_least_the_ops_the_floor_charges(name):
    prior = PRIORS[name]().eval()
    codes = torch.randint(16, (2, prior.num_tokens))
    with torch.no_grad(), OpCounter() as counter:
        run_grid(prior, codes)
    assert counter.total / prior.num_tokens >= needed_ops(prior) > 0


def test_transformer_step_reads_its_weights_and_the_mean_cache():
    prior = PRIORS["transformer"]()
    weights = sum(p.numel() * 4 for p in prior.blocks.parameters())
    kv = 2 * 2 * 2 * 16 * (12 + 1) / 2 * 4  # layers x (k, v) x batch x dim x mean positions x fp32
    assert transformer_step_bytes(prior, 2) == pytest.approx(weights + kv + sum(
        p.numel() * 4 for m in (prior.head, prior.ln_f) for p in m.parameters()))
