"""Tests for stage1_tokenizer.fsq: the mixed-radix codes, round trips, straight-through gradients, every code reachable
in fp32 under bf16 autocast, usage statistics, non-finite features and identical state across ranks."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from stage1_tokenizer.fsq import FiniteScalarQuantizer
from stage1_tokenizer.quantizer import CodebookStats, QuantizerConfig

from conftest import launch_two_processes


pytestmark = pytest.mark.usefixtures("one_thread")

LEVELS = (8, 5, 5, 5)


def make_fsq(seed: int = 0, levels=LEVELS, dim: int | None = None, **kw) -> FiniteScalarQuantizer:
    torch.manual_seed(seed)
    return FiniteScalarQuantizer(QuantizerConfig(kind="fsq", levels=levels, dim=dim or len(levels), **kw))


def reference_codes(z: torch.Tensor, levels=LEVELS) -> torch.Tensor:
    """The paper's recipe in float64, channel by channel: (B, d, *S) -> (B, *S) mixed-radix indices."""
    index, place = torch.zeros(z.shape[0], *z.shape[2:], dtype=torch.long), 1
    for i, L in enumerate(levels):
        half_l = (L - 1) * (1 - 1e-3) / 2
        offset = 0.5 if L % 2 == 0 else 0.0
        v = torch.round(torch.tanh(z[:, i].double() + math.atanh(offset / half_l)) * half_l - offset)
        index += (v.long() + L // 2) * place
        place *= L
    return index


def features_hitting_every_code(levels=LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, d, 1) features whose codes are 0..N-1 (N = prod(levels)): each channel aims at 0.9 of its level's value,
    inside the rounding interval by at least 0.4 (room for bf16's rounding of the features)."""
    codes = torch.arange(math.prod(levels))
    z, place = [], 1
    for L in levels:
        digit = (codes // place) % L
        place *= L
        half_l = (L - 1) * (1 - 1e-3) / 2
        offset = 0.5 if L % 2 == 0 else 0.0
        target = 0.9 * (digit - L // 2).double()
        z.append(torch.atanh((target + offset) / half_l) - math.atanh(offset / half_l))
    return torch.stack(z, 1)[..., None].float(), codes


# ---- codes ---------------------------------------------------------------------------------------
def test_codebook_size_is_the_product_of_levels():
    q = make_fsq()
    assert q.codebook_size == 1000 and q.config.codebook_size == 1000
    assert list(q.parameters()) == []  # no projection when dim == len(levels): nothing to learn


def test_codes_are_mixed_radix_indices_of_the_rounded_bound():
    q = make_fsq().eval()
    z = 2 * torch.randn(4, 4, 6, 5)
    codes = q.encode(z)
    assert codes.shape == (4, 6, 5) and codes.dtype == torch.long
    assert torch.equal(codes, reference_codes(z))
    assert 0 <= int(codes.min()) and int(codes.max()) < 1000


def test_every_code_is_reachable_and_decodes_to_its_grid_point():
    q = make_fsq().eval()
    z, codes = features_hitting_every_code()
    assert torch.equal(q.encode(z).flatten(), codes)
    values = q.lookup(codes.view(-1, 1)).squeeze(-1)  # (N, d) grid values
    assert values.abs().max() <= 1.0 and torch.unique(values, dim=0).shape[0] == 1000
    # channel 0 (8 levels) takes the values -4/4 .. 3/4; the 5-level channels -2/2 .. 2/2
    assert sorted(set(values[:, 0].tolist())) == [v / 4 for v in range(-4, 4)]
    assert sorted(set(values[:, 1].tolist())) == [v / 2 for v in range(-2, 3)]


@pytest.mark.parametrize("spatial", [(10,), (4, 6), (2, 3, 5)])
@pytest.mark.parametrize("dim", [None, 16])
def test_round_trip_matches_the_forward(spatial, dim):
    q = make_fsq(dim=dim).eval()
    z = torch.randn(3, q.config.dim, *spatial)
    out = q(z)
    codes = q.encode(z)
    assert codes.shape == (3, *spatial) and torch.equal(out.codes, codes)
    assert out.z_q.shape == z.shape
    with torch.no_grad():
        assert torch.allclose(q.lookup(codes), out.z_q, atol=1e-6)
    assert float(out.commitment_loss) == float(out.codebook_loss) == float(out.aux_loss) == 0.0


# ---- gradients ------------------------------------------------------------------------------------
def test_straight_through_gradient_is_that_of_the_bound():
    q = make_fsq().train()
    z = torch.randn(2, 4, 5, 5, requires_grad=True)
    q(z).z_q.sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    flat = z2.movedim(1, -1).reshape(-1, 4)
    (q.bound(flat) / q.half_width).sum().backward()  # rounding passes the gradient through unchanged
    assert torch.allclose(z.grad, z2.grad, atol=1e-6)
    assert z.grad.abs().min() > 0


def test_projections_learn_through_the_quantizer():
    q = make_fsq(dim=16).train()
    z = torch.randn(2, 16, 4, 4, requires_grad=True)
    (q(z).z_q ** 2).sum().backward()
    assert q.in_proj.weight.grad.abs().sum() > 0 and q.out_proj.weight.grad.abs().sum() > 0
    assert z.grad.abs().sum() > 0


# ---- fp32 under bf16 autocast -------------------------------------------------------------------------
def test_bf16_autocast_keeps_every_code():
    """In bf16 the index of [8, 5, 5, 5] codes cannot be represented above 256 (codes merge); ours is computed in
    fp32 and integers, so every one of the 1000 codes comes out under autocast from bf16 features."""
    # the premise: bf16 merges codes of this size
    assert torch.arange(1000).bfloat16().long().unique().numel() < 1000
    z, codes = features_hitting_every_code()
    z = z.bfloat16()
    q = make_fsq()
    for mode in ("eval", "train"):
        getattr(q, mode)()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = q(z)
            encoded = q.encode(z)
        assert torch.equal(encoded.flatten(), codes) and torch.equal(out.codes.flatten(), codes), mode
        assert out.z_q.dtype == torch.bfloat16 and torch.isfinite(out.z_q.float()).all()
    assert torch.equal(q.encode(z.float()).flatten(), codes)  # the same codes as fp32 features
    assert torch.allclose(q.lookup(codes.view(-1, 1)), out.z_q.float(), atol=1e-2)


def test_bf16_autocast_with_projection_matches_fp32():
    q = make_fsq(dim=16).eval()
    z = torch.randn(4, 16, 8, 8).bfloat16()
    reference = q.encode(z.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
        assert torch.equal(q.encode(z), reference)
    assert torch.equal(out.codes, reference)
    assert out.z_q.dtype == torch.bfloat16


# ---- usage statistics ---------------------------------------------------------------------------------
def test_training_updates_the_usage_histogram_by_ema():
    q = make_fsq(decay=0.5).train()
    z, codes = features_hitting_every_code()
    first = z[:10]  # codes 0..9
    q(first)
    assert torch.equal(q.usage.counts[:10], torch.full((10,), 0.5)) and q.usage.counts[10:].sum() == 0
    assert q.active_fraction() == pytest.approx(10 / 1000)
    q(z[10:20])  # codes 10..19: the first ten decay
    assert torch.allclose(q.usage.counts[:10], torch.full((10,), 0.25))
    assert torch.allclose(q.usage.counts[10:20], torch.full((10,), 0.5))
    assert q.active_fraction() == pytest.approx(20 / 1000)
    before = q.usage.counts.clone()
    q.eval()(z)  # evaluation does not count
    assert torch.equal(q.usage.counts, before)


def test_batch_perplexity_and_whole_set_usage():
    q = make_fsq().eval()
    z, codes = features_hitting_every_code()
    assert float(q(z).perplexity) == pytest.approx(1000.0, rel=1e-4)  # every code once
    stats = CodebookStats(q.codebook_size)
    for chunk in z.split(100):
        stats.update(q.encode(chunk))
    assert stats.usage == 1.0 and stats.perplexity == pytest.approx(1000.0)
    half = CodebookStats(q.codebook_size)
    half.update(q.encode(z[:500]))
    assert half.usage == 0.5


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_features_give_valid_codes_and_skip_the_usage_update(bad):
    q = make_fsq().train()
    z = torch.randn(2, 4, 4, 4)
    z[1, 2, 1, 1] = bad
    out = q(z)
    assert 0 <= int(out.codes.min()) and int(out.codes.max()) < 1000
    assert int(q.usage.skipped_updates) == 1 and q.usage.counts.sum() == 0
    q(torch.randn(2, 4, 4, 4))
    assert q.usage.counts.sum() > 0


@pytest.mark.parametrize("bad", [1000, -1])
def test_lookup_rejects_codes_out_of_range(bad):
    codes = torch.zeros(1, 2, 2, dtype=torch.long)
    codes[0, 1, 1] = bad
    with pytest.raises(ValueError, match="another tokenizer"):
        make_fsq().lookup(codes)


def test_eval_forward_changes_no_state():
    q = make_fsq(dim=16).eval()
    before = copy.deepcopy(q.state_dict())
    q(torch.randn(2, 16, 4, 4))
    for name, t in q.state_dict().items():
        assert torch.equal(t, before[name]), name


# ---- identical state across ranks ---------------------------------------------------------------------
def _sync_worker():
    """Runs in each of 2 forked processes (gloo) under accelerate.debug_launcher."""
    import torch

    from accelerate import Accelerator

    from conftest import reset_accelerate
    from stage1_tokenizer.quantizer import check_codebooks_in_sync

    reset_accelerate()
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    rank = acc.process_index
    q = make_fsq(dim=8, decay=0.8).train()  # same seed: the same projections on both ranks
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        q(torch.randn(2, 8, 3, 3, generator=g) * (1 + rank))  # different data on every rank
    local = torch.bincount(q.encode(torch.randn(2, 8, 3, 3, generator=g) * (1 + rank)).flatten(), minlength=1000)
    gathered_local = acc.gather(local[None].float())
    assert not torch.equal(gathered_local[0], gathered_local[1])  # the premise: the ranks saw other codes
    counts = acc.gather(q.usage.counts[None])
    assert torch.equal(counts[0], counts[1]) and counts[0].sum() > 0
    assert check_codebooks_in_sync(acc, q) == "codebooks in sync across 2 ranks"
    if rank == 1:
        q.usage.counts[5] += 1e-3  # negative control
    with pytest.raises(RuntimeError, match="differ"):
        check_codebooks_in_sync(acc, q)
    acc.wait_for_everyone()


def test_usage_identical_across_ranks():
    launch_two_processes(__file__, "_sync_worker")
