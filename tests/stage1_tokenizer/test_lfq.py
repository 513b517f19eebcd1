"""Tests for stage1_tokenizer.lfq: codes as binary numbers, round trips, straight-through gradients, the entropy
penalty against brute force over the codebook (and its groups), its weight as a trainer sets it, fp32 under bf16
autocast, usage statistics, and the same penalty and state on every rank with the global batch's gradient."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from stage1_tokenizer.lfq import LookupFreeQuantizer, bit_patterns
from stage1_tokenizer.quantizer import CodebookStats, QuantizerConfig

from conftest import launch_two_processes


pytestmark = pytest.mark.usefixtures("one_thread")


def make_lfq(seed: int = 0, bits: int = 4, dim: int | None = None, **kw) -> LookupFreeQuantizer:
    torch.manual_seed(seed)
    return LookupFreeQuantizer(QuantizerConfig(kind="lfq", bits=bits, dim=dim or bits, **kw))


def flat_of(z: torch.Tensor) -> torch.Tensor:
    return z.movedim(1, -1).reshape(-1, z.shape[1]).float()


def brute_force_entropies(h: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, bits) -> mean per-sample entropy and batch entropy of softmax(-||h - c||^2 / T) over all 2^bits codes."""
    codebook = bit_patterns(h.shape[1], "cpu").double() * 2 - 1  # (2^bits, bits) of +-1
    probs = torch.softmax(-torch.cdist(h.double(), codebook) ** 2 / temperature, dim=1)
    per_sample = -(probs * probs.clamp(min=1e-300).log()).sum(1).mean()
    mean = probs.mean(0)
    return per_sample, -(mean * mean.clamp(min=1e-300).log()).sum()


# ---- codes ---------------------------------------------------------------------------------------
def test_codes_are_the_bits_as_a_binary_number():
    q = make_lfq().eval()
    assert q.codebook_size == 16 and q.config.codebook_size == 16
    signs = torch.tensor([[1.0, -1, -1, -1], [-1, -1, -1, 1], [1, 1, 1, 1], [-1, -1, -1, -1], [-1, 1, -1, 1]])
    z = (signs * torch.rand(5, 4).add(0.1)).t()[None]  # (1, 4, 5): position i has the signs of row i
    assert q.encode(z).tolist() == [[8, 1, 15, 0, 5]]  # channel 0 is the most significant bit
    assert torch.equal(q.lookup(torch.tensor([[8, 1, 15, 0, 5]])), signs.t()[None])


@pytest.mark.parametrize("spatial", [(10,), (4, 6), (2, 3, 5)])
@pytest.mark.parametrize("dim", [None, 12])
def test_round_trip_matches_the_forward(spatial, dim):
    q = make_lfq(bits=6, dim=dim).eval()
    z = torch.randn(3, q.config.dim, *spatial)
    out = q(z)
    codes = q.encode(z)
    assert codes.shape == (3, *spatial) and codes.dtype == torch.long and torch.equal(out.codes, codes)
    assert 0 <= int(codes.min()) and int(codes.max()) < 64
    with torch.no_grad():
        assert torch.allclose(q.lookup(codes), out.z_q, atol=1e-6)


# ---- gradients and losses --------------------------------------------------------------------------
def test_straight_through_gradient_is_identity():
    q = make_lfq(entropy_weight=0.0).train()
    z = torch.randn(2, 4, 5, 5, requires_grad=True)
    out = q(z)
    assert float(out.aux_loss) == 0.0
    out.z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


def test_commitment_loss_pulls_features_to_their_signs():
    q = make_lfq(commitment_weight=0.3).eval()
    z = torch.randn(2, 4, 3, 3)
    f = flat_of(z)
    assert torch.allclose(q(z).commitment_loss, 0.3 * F.mse_loss(f, torch.sign(f)), rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_entropy_penalty_matches_brute_force_over_the_codebook(temperature):
    q = make_lfq(entropy_weight=0.2, diversity_weight=1.5, entropy_temperature=temperature).eval()
    z = torch.randn(3, 4, 4, 4)
    out = q(z)
    per_sample, batch = brute_force_entropies(flat_of(z), temperature)
    assert float(out.per_sample_entropy) == pytest.approx(float(per_sample), rel=1e-4)
    assert float(out.batch_entropy) == pytest.approx(float(batch), rel=1e-4)
    assert float(out.aux_loss) == pytest.approx(0.2 * float(per_sample - 1.5 * batch), rel=1e-4, abs=1e-6)


def test_grouped_batch_entropy_sums_the_groups_exact_entropies():
    q = make_lfq(bits=4, entropy_group_bits=2, entropy_temperature=1.0).eval()
    z = torch.randn(2, 4, 5, 5)
    h = flat_of(z)
    out = q(z)
    expected = sum(brute_force_entropies(h[:, i:i + 2], 1.0)[1] for i in (0, 2))
    exact = brute_force_entropies(h, 1.0)[1]
    assert float(out.batch_entropy) == pytest.approx(float(expected), rel=1e-4)
    assert float(out.batch_entropy) >= float(exact) - 1e-5  # the sum bounds the joint entropy from above
    assert float(out.per_sample_entropy) == pytest.approx(float(brute_force_entropies(h, 1.0)[0]), rel=1e-4)


def test_entropy_penalty_spreads_collapsed_codes():
    """Minimising the penalty alone on features that all share one code moves them onto many codes."""
    torch.manual_seed(0)
    q = make_lfq(bits=4, entropy_weight=1.0, entropy_temperature=1.0).train()
    z = (0.3 + 0.1 * torch.randn(1, 4, 64)).requires_grad_(True)  # every position: code 15
    assert q.encode(z.detach()).unique().numel() == 1
    before = float(q(z).aux_loss.detach())
    opt = torch.optim.SGD([z], lr=0.5)
    for _ in range(100):
        opt.zero_grad()
        q(z).aux_loss.backward()
        opt.step()
    assert q.encode(z.detach()).unique().numel() >= 12
    assert float(q(z).aux_loss.detach()) < before - 0.5


def test_entropy_weight_is_the_modules_attribute_a_trainer_may_anneal():
    q = make_lfq(entropy_weight=0.1).eval()
    z = torch.randn(2, 4, 3, 3)
    base = q(z)
    q.entropy_weight = 0.4
    assert float(q(z).aux_loss) == pytest.approx(4 * float(base.aux_loss), rel=1e-5)
    q.entropy_weight = 0.0
    assert float(q(z).aux_loss) == 0.0
    assert "entropy_weight" not in q.state_dict()  # the schedule belongs to the trainer, not to the weights


# ---- fp32 under bf16 autocast -------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [None, 16])
def test_bf16_autocast_picks_the_fp32_codes(dim):
    q = make_lfq(bits=10, dim=dim, entropy_weight=0.1)
    z = torch.randn(4, q.config.dim, 8, 8).bfloat16()
    reference = q.eval().encode(z.float())
    for mode in ("eval", "train"):
        getattr(q, mode)()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = q(z)
            assert torch.equal(q.encode(z), reference), mode
        assert torch.equal(out.codes, reference), mode
        assert out.z_q.dtype == torch.bfloat16 and torch.isfinite(out.z_q.float()).all()
        assert out.aux_loss.dtype == out.commitment_loss.dtype == torch.float32
        assert torch.isfinite(out.aux_loss) and torch.isfinite(out.commitment_loss)


# ---- usage statistics ---------------------------------------------------------------------------------
def test_usage_histogram_and_whole_set_statistics():
    q = make_lfq(decay=0.5).train()
    codes = torch.arange(16)
    z = (bit_patterns(4, "cpu") * 2 - 1).t()[None] * 0.7  # (1, 4, 16): every code once
    assert torch.equal(q.encode(z).flatten(), codes)
    out = q(z)
    assert float(out.perplexity) == pytest.approx(16.0, rel=1e-5)
    assert torch.equal(q.usage.counts, torch.full((16,), 0.5)) and q.active_fraction() == 1.0
    q(z[..., :4])  # codes 0..3 only
    assert torch.allclose(q.usage.counts[:4], torch.full((4,), 0.75))
    assert torch.allclose(q.usage.counts[4:], torch.full((12,), 0.25))
    stats = CodebookStats(16)
    stats.update(q.encode(z[..., :8]))
    assert stats.usage == 0.5


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_features_give_valid_codes_and_skip_the_usage_update(bad):
    q = make_lfq().train()
    z = torch.randn(2, 4, 4, 4)
    z[0, 1, 2, 3] = bad
    out = q(z)
    assert 0 <= int(out.codes.min()) and int(out.codes.max()) < 16
    assert int(q.usage.skipped_updates) == 1 and q.usage.counts.sum() == 0


def test_lookup_rejects_codes_out_of_range():
    with pytest.raises(ValueError, match="another tokenizer"):
        make_lfq().lookup(torch.tensor([[16]]))


def test_eval_forward_changes_no_state():
    q = make_lfq(dim=8).eval()
    before = copy.deepcopy(q.state_dict())
    q(torch.randn(2, 8, 4, 4))
    for name, t in q.state_dict().items():
        assert torch.equal(t, before[name]), name


# ---- the same penalty on every rank -----------------------------------------------------------------------
def _sync_worker():
    """Runs in each of 2 forked processes (gloo) under accelerate.debug_launcher: different data per rank; the
    codebook entropy is that of both ranks' positions, the same on both, and its gradient is the global one."""
    import torch

    from accelerate import Accelerator

    from conftest import reset_accelerate
    from stage1_tokenizer.quantizer import check_codebooks_in_sync

    reset_accelerate()
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    q = make_lfq(bits=4, dim=4, entropy_temperature=1.0, decay=0.8).train()
    data = [torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(r)) * (1 + r) + r for r in range(world)]
    z = data[rank].clone().requires_grad_(True)
    out = q(z)
    both = acc.gather(torch.stack([out.batch_entropy, out.per_sample_entropy])[None])
    assert both[0, 0] == both[1, 0]  # the codebook entropy: the same on both ranks
    assert both[0, 1] != both[1, 1]  # the per-sample entropy is each rank's own (the premise: other data)
    reference = make_lfq(bits=4, dim=4, entropy_temperature=1.0).eval()  # one process, both ranks' positions
    h = torch.cat([flat_of(d) for d in data])
    expected = reference.entropies(h)[1]
    assert float(out.batch_entropy) == pytest.approx(float(expected), rel=1e-5)

    # gradients: the all-reduce sums the ranks' gradients back, so once DDP averages them (/ world) the update
    # is the gradient of the global batch entropy
    q.entropy_weight = 1.0
    (-q.entropies(flat_of(z))[1]).backward()
    g = torch.cat([d.clone().requires_grad_(True)[None] for d in data])
    g.retain_grad()
    (-reference.entropies(torch.cat([flat_of(d) for d in g]))[1]).backward()
    assert torch.allclose(z.grad / world, g.grad[rank], atol=1e-6, rtol=1e-4)
    assert z.grad.abs().sum() > 0

    counts = acc.gather(q.usage.counts[None])
    assert torch.equal(counts[0], counts[1]) and counts[0].sum() > 0
    assert check_codebooks_in_sync(acc, q) == "codebooks in sync across 2 ranks"
    acc.wait_for_everyone()


def test_entropy_penalty_and_state_identical_across_ranks():
    launch_two_processes(__file__, "_sync_worker")


def test_codebook_size_limits_are_checked():
    with pytest.raises(ValueError, match="entropy_group_bits"):
        QuantizerConfig(kind="lfq", bits=14)  # 2^14 probabilities per position: needs groups
    assert QuantizerConfig(kind="lfq", bits=14, entropy_group_bits=7).codebook_size == 2 ** 14
    assert QuantizerConfig(kind="lfq", bits=14, entropy_weight=0.0).codebook_size == 2 ** 14
    with pytest.raises(ValueError, match="divide"):
        QuantizerConfig(kind="lfq", bits=6, entropy_group_bits=4)
    with pytest.raises(ValueError, match="bits"):
        QuantizerConfig(kind="lfq", bits=0)
    assert math.log2(QuantizerConfig(kind="lfq", bits=18, entropy_group_bits=9).codebook_size) == 18
