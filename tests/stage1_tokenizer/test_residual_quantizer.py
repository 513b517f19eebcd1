"""Tests for stage1_tokenizer.residual_quantizer: codes with a depth axis, encode/lookup at any number of stages,
error falling with stages, gradients, quantizer dropout (the same draws on every rank, resumed exactly), per-stage
usage and identical state across ranks."""
from __future__ import annotations

import copy

import pytest
import torch

from stage1_tokenizer.quantizer import CodebookStats, QuantizerConfig, VectorQuantizer
from stage1_tokenizer.residual_quantizer import ResidualVectorQuantizer

from conftest import launch_two_processes


pytestmark = pytest.mark.usefixtures("one_thread")


def make_rvq(seed: int = 0, **kw) -> ResidualVectorQuantizer:
    torch.manual_seed(seed)
    cfg = {"codebook_size": 16, "dim": 8, "num_stages": 4, **kw}
    return ResidualVectorQuantizer(QuantizerConfig(kind="rvq", **cfg))


def blobs(seed: int = 0, n: int = 512, dim: int = 8) -> torch.Tensor:
    """(1, dim, n) features with structure at several scales (what residual stages refine)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(8, dim, generator=g) * 4
    fine = torch.randn(n, dim, generator=g)
    return (coarse[torch.arange(n) % 8] + fine).t()[None]


# ---- shapes and round trips --------------------------------------------------------------------------------
def test_stages_are_vector_quantizers_of_the_shared_fields():
    q = make_rvq(code_dim=4, cosine=True, decay=0.9)
    assert len(q.stages) == 4 and all(isinstance(s, VectorQuantizer) for s in q.stages)
    assert q.stages[0].config.kind == "vq" and q.stages[0].config.code_dim == 4 and q.stages[0].config.cosine
    assert q.stages[0].embed.shape == (16, 4)  # factorised, l2-normalised low-dimensional lookups (DAC style)
    assert q.codebook_size == 16
    assert not torch.equal(q.stages[0].embed, q.stages[1].embed)  # every stage has its own codebook


@pytest.mark.parametrize("spatial", [(10,), (4, 6), (2, 3, 5)])
def test_codes_carry_a_depth_axis_last(spatial):
    q = make_rvq().eval()
    z = torch.randn(3, 8, *spatial)
    full = q.encode(z)
    assert full.shape == (3, *spatial, 4) and full.dtype == torch.long
    for k in (1, 2, 4):
        codes = q.encode(z, num_stages=k)
        assert codes.shape == (3, *spatial, k)
        assert torch.equal(codes, full[..., :k])  # a prefix of the stages is the coarser code


@pytest.mark.parametrize("code_dim", [None, 4])
def test_lookup_at_any_depth_matches_the_forward(code_dim):
    q = make_rvq(code_dim=code_dim).eval()
    z = torch.randn(2, 8, 5, 5)
    for k in (1, 2, 4):
        out = q(z, num_stages=k)
        codes = q.encode(z, num_stages=k)
        assert torch.equal(out.codes, codes) and out.stage_perplexity.shape == (k,)
        with torch.no_grad():
            looked_up = q.lookup(codes)
            assert torch.allclose(looked_up, out.z_q, atol=1e-5)
            stagewise = sum(s.lookup(codes[..., i]) for i, s in enumerate(q.stages[:k]))
            assert torch.allclose(looked_up, stagewise)
    assert q(z).codes.shape[-1] == 4  # eval: all stages


def test_reconstruction_error_falls_as_stages_rise():
    """After a few EMA steps on fixed data, each stage takes away part of what the ones before it left."""
    q = make_rvq(kmeans_init=True, decay=0.8).train()
    z = blobs()
    for _ in range(5):
        q(z)
    q.eval()
    errors = [float(((q.lookup(q.encode(z, num_stages=k)) - z) ** 2).mean()) for k in range(1, 5)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.6 * errors[0], errors
    assert errors[0] < float((z ** 2).mean())


@pytest.mark.parametrize("bad", [0, 5])
def test_wrong_numbers_of_stages_are_errors(bad):
    q = make_rvq()
    z = torch.randn(1, 8, 3, 3)
    with pytest.raises(ValueError, match="num_stages"):
        q.encode(z, num_stages=bad)
    with pytest.raises(ValueError, match="num_stages"):
        q(z, num_stages=bad)
    with pytest.raises(ValueError, match="stages"):
        q.lookup(torch.zeros(1, 3, 3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="another tokenizer"):
        q.lookup(torch.full((1, 3, 3, 2), 16))


# ---- gradients and losses ---------------------------------------------------------------------------------
def test_straight_through_gradient_is_identity():
    q = make_rvq(restart_threshold=0).train()
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    q(z).z_q.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z), atol=1e-6)


def test_factorised_stages_learn_through_their_projections():
    q = make_rvq(code_dim=4, cosine=True).train()
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    out = q(z)
    (out.z_q.pow(2).sum() + out.commitment_loss).backward()
    for i, stage in enumerate(q.stages):
        assert stage.in_proj.weight.grad.abs().sum() > 0 and stage.out_proj.weight.grad.abs().sum() > 0, i


def test_skipped_stages_get_zero_gradients_not_none():
    """DDP (without find_unused_parameters) needs a gradient for every parameter in every step, also for the
    projections of the stages quantizer dropout skipped."""
    q = make_rvq(code_dim=4, ema=False).train()
    out = q(torch.randn(2, 8, 3, 3), num_stages=1)
    (out.z_q.sum() + out.commitment_loss + out.codebook_loss + out.aux_loss).backward()
    for name, p in q.named_parameters():
        assert p.grad is not None, name
        assert (p.grad.abs().sum() > 0) == name.startswith("stages.0."), name
    assert float(out.aux_loss.detach()) == 0.0


def test_losses_sum_the_stages():
    q = make_rvq(commitment_weight=0.5, ema=False).eval()
    z = torch.randn(2, 8, 3, 3)
    out = q(z, num_stages=3)
    residual, commitment, codebook = z, 0.0, 0.0
    for stage in q.stages[:3]:
        o = stage(residual)
        commitment, codebook = commitment + o.commitment_loss, codebook + o.codebook_loss
        residual = residual - o.z_q
    assert torch.allclose(out.commitment_loss, commitment) and torch.allclose(out.codebook_loss, codebook)
    assert float(out.aux_loss.detach()) == 0.0 and torch.equal(out.perplexity, out.stage_perplexity[0])


# ---- quantizer dropout --------------------------------------------------------------------------------------
def test_quantizer_dropout_draws_stage_counts_per_batch():
    q = make_rvq(quantizer_dropout=0.5, restart_threshold=0).train()
    z = torch.randn(2, 8, 3, 3)
    depths = [q(z).codes.shape[-1] for _ in range(60)]
    assert set(depths) == {1, 2, 3, 4}
    assert 0.4 < depths.count(4) / 60 < 0.9  # half the batches keep all stages, and k = 4 in a quarter of the rest
    assert int(q.dropout_draws) == 60
    assert q.eval()(z).codes.shape[-1] == 4  # never in evaluation
    assert make_rvq(restart_threshold=0).train()(z).codes.shape[-1] == 4  # nor without dropout


def test_dropout_draws_follow_the_saved_state_not_the_global_rng():
    a = make_rvq(quantizer_dropout=1.0)
    b = copy.deepcopy(a)
    torch.manual_seed(1)
    first = [a.draw_num_stages() for _ in range(10)]
    torch.manual_seed(2)
    assert [b.draw_num_stages() for _ in range(10)] == first  # another global RNG state: the same draws
    # a resumed run continues the sequence: the seed and the draw counter are in the state dict
    resumed = make_rvq(seed=5, quantizer_dropout=1.0)
    resumed.load_state_dict(a.state_dict())
    assert [resumed.draw_num_stages() for _ in range(10)] == [a.draw_num_stages() for _ in range(10)]
    assert make_rvq(seed=3, quantizer_dropout=1.0).dropout_seed != a.dropout_seed  # runs differ by seed


def test_skipped_stages_keep_their_codebooks():
    q = make_rvq(restart_threshold=0).train()
    before = copy.deepcopy(q.state_dict())
    q(torch.randn(2, 8, 4, 4), num_stages=2)
    after = q.state_dict()
    assert not torch.equal(after["stages.0.embed"], before["stages.0.embed"])
    assert not torch.equal(after["stages.1.embed"], before["stages.1.embed"])
    for name in ("stages.2.embed", "stages.3.embed", "stages.3.cluster_size"):
        assert torch.equal(after[name], before[name]), name


# ---- usage ----------------------------------------------------------------------------------------------------
def test_usage_per_stage():
    q = make_rvq(decay=0.5).train()
    z = blobs(n=128)
    q(z)
    assert q.active_fraction() == min(s.active_fraction() for s in q.stages)
    q.eval()
    codes = q.encode(z)
    stats = [CodebookStats(16) for _ in range(4)]
    for i, s in enumerate(stats):
        s.update(codes[..., i])
        assert s.counts.sum() == 128 and 0 < s.usage <= 1, i


def test_bf16_autocast_keeps_fp32_codes():
    q = make_rvq(num_stages=3, codebook_size=64, code_dim=4)
    z = torch.randn(4, 8, 6, 6).bfloat16()
    reference = q.eval().encode(z.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
        assert torch.equal(q.encode(z), reference)
    assert torch.equal(out.codes, reference) and out.z_q.dtype == torch.bfloat16
    assert all(s.embed.dtype == torch.float32 for s in q.stages)


# ---- identical state across ranks ---------------------------------------------------------------------------
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
    q = make_rvq(num_stages=3, quantizer_dropout=0.6, kmeans_init=True, kmeans_iters=2, decay=0.8).train()
    torch.manual_seed(1000 + rank)  # the ranks' global RNGs differ (as they do in training)
    g = torch.Generator().manual_seed(rank)
    depths = []
    for _ in range(12):
        depths.append(q(torch.randn(2, 8, 3, 3, generator=g) * (1 + rank) + rank).codes.shape[-1])
    gathered = acc.gather(torch.tensor([depths]))
    assert torch.equal(gathered[0], gathered[1]), gathered.tolist()  # the same stages on both ranks
    assert len(set(depths)) > 1  # the premise: dropout did vary the depth
    assert int(sum(s.restarts for s in q.stages)) > 0
    checksums = acc.gather(torch.stack([s.checksum() for s in q.stages] + [q.checksum()])[None])
    assert torch.equal(checksums[0], checksums[1]), checksums.tolist()
    assert check_codebooks_in_sync(acc, q) == "codebooks in sync across 2 ranks"
    if rank == 1:
        q.stages[2].embed[0, 0] += 1e-4  # negative control: the last stage drifts on one rank
    with pytest.raises(RuntimeError, match="differ"):
        check_codebooks_in_sync(acc, q)
    acc.wait_for_everyone()


def test_stages_and_dropout_identical_across_ranks():
    launch_two_processes(__file__, "_sync_worker")
