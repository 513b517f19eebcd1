"""Tests for stage1_tokenizer.quantizer: lookup, straight-through gradients, EMA/restart/k-means updates,
N-d grids, fp32 under autocast, code statistics and codebook synchronisation across ranks."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from stage1_tokenizer.quantizer import CodebookStats, QuantizerConfig, VectorQuantizer

from conftest import launch_two_processes


pytestmark = pytest.mark.usefixtures("one_thread")


def make_q(seed: int = 0, **kw) -> VectorQuantizer:
    torch.manual_seed(seed)
    cfg = {"codebook_size": 32, "dim": 8, **kw}
    return VectorQuantizer(QuantizerConfig(**cfg))


def flat_of(z: torch.Tensor) -> torch.Tensor:
    """(B, D, *S) -> (N, D), rows in the order the quantizer's codes use."""
    return z.movedim(1, -1).reshape(-1, z.shape[1]).float()


def brute_nearest(f: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    return torch.cdist(f.double(), embed.double()).argmin(1)


def assert_nearest(codes: torch.Tensor, f: torch.Tensor, embed: torch.Tensor) -> None:
    """Every code is a nearest one (up to fp32 rounding) and nearly all agree with brute force exactly."""
    d = torch.cdist(f.double(), embed.double())
    chosen = d.gather(1, codes.reshape(-1, 1)).squeeze(1)
    assert torch.all(chosen - d.min(1).values <= 1e-4)
    assert (codes.reshape(-1) == d.argmin(1)).float().mean() > 0.98


# ---- nearest code ------------------------------------------------------------------------------
@pytest.mark.parametrize("cosine", [False, True])
def test_nearest_code_matches_brute_force(cosine):
    q = make_q(codebook_size=64, dim=16, cosine=cosine).eval()
    z = torch.randn(4, 16, 7, 5)
    codes = q.encode(z)
    f = flat_of(z)
    if cosine:
        f = F.normalize(f, dim=1)
        assert torch.allclose(q.embed.norm(dim=1), torch.ones(64), atol=1e-5)
    assert codes.shape == (4, 7, 5) and codes.dtype == torch.long
    assert_nearest(codes, f, F.normalize(q.embed, dim=1) if cosine else q.embed)
    # forward (eval) picks the same codes as encode
    assert torch.equal(q(z).codes, codes)


def test_nearest_code_in_projected_space():
    q = make_q(codebook_size=64, dim=16, code_dim=4).eval()
    assert q.embed.shape == (64, 4)
    z = torch.randn(3, 16, 6, 6)
    codes = q.encode(z)
    with torch.no_grad():
        projected = q.in_proj(flat_of(z))
    assert_nearest(codes, projected, q.embed)
    out = q(z)
    assert out.z_q.shape == z.shape
    assert torch.allclose(q.lookup(codes), out.z_q, atol=1e-6)


# ---- straight-through and losses ------------------------------------------------------------------
def test_straight_through_gradient_is_identity():
    q = make_q(restart_threshold=0).train()
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    out = q(z)
    out.z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


def test_ema_codebook_gets_no_gradient():
    q = make_q(ema=True).train()
    assert "embed" not in dict(q.named_parameters())
    assert list(q.parameters()) == []
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    out = q(z)
    assert not out.codebook_loss.requires_grad and float(out.codebook_loss) == 0.0


def test_gradient_codebook_learns_only_through_codebook_loss():
    q = make_q(ema=False, restart_threshold=0).train()
    assert isinstance(q.embed, torch.nn.Parameter)
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    out = q(z)
    (out.z_q.sum() + out.commitment_loss).backward(retain_graph=True)
    assert q.embed.grad is None or torch.all(q.embed.grad == 0)
    q.embed.grad = None
    out.codebook_loss.backward()
    # d/de_k mean((e_c(i) - f_i)^2) = 2 / (N d) * sum_{i: c(i)=k} (e_k - f_i)
    f, codes = flat_of(z.detach()), out.codes.reshape(-1)
    expected = torch.zeros_like(q.embed).index_add_(0, codes, q.embed.detach()[codes] - f) * 2 / f.numel()
    assert torch.allclose(q.embed.grad, expected, atol=1e-6)
    unused = torch.bincount(codes, minlength=32) == 0
    assert unused.any() and torch.all(q.embed.grad[unused] == 0)


@pytest.mark.parametrize("ema", [True, False])
def test_commitment_loss_is_beta_mse(ema):
    q = make_q(commitment_weight=0.4, ema=ema).eval()
    z = torch.randn(2, 8, 5, 3)
    out = q(z)
    f = flat_of(z)
    target = q.embed.detach()[out.codes.reshape(-1)]
    assert torch.allclose(out.commitment_loss, 0.4 * F.mse_loss(f, target), rtol=1e-5)
    if not ema:
        assert torch.allclose(out.codebook_loss, F.mse_loss(target, f), rtol=1e-5)


@pytest.mark.parametrize("ema", [True, False])
def test_training_forward_quantizes_with_the_codebook_it_searched(ema):
    """z_q and the losses use the codes as they were when the nearest ones were picked, not the codebook
    after this step's EMA update and restarts (a restarted code would hand the decoder some other
    position's features)."""
    q = make_q(ema=ema, commitment_weight=0.5, decay=0.9).train()  # 32 codes, 18 vectors: restarts happen
    z = torch.randn(2, 8, 3, 3)
    before = q.embed.detach().clone()
    out = q(z)
    assert int(q.restarts) > 0
    chosen = before[out.codes.reshape(-1)]
    assert torch.allclose(flat_of(out.z_q), chosen, atol=1e-6)
    assert torch.allclose(out.commitment_loss, 0.5 * F.mse_loss(flat_of(z), chosen), rtol=1e-5)
    if not ema:
        assert torch.allclose(out.codebook_loss, F.mse_loss(chosen, flat_of(z)), rtol=1e-5)


def test_code_restarted_in_its_own_step_still_quantizes_its_input():
    q = VectorQuantizer(QuantizerConfig(codebook_size=4, dim=2, decay=0.5, restart_threshold=1.0))
    e0 = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [20.0, 20.0]])
    q.embed.copy_(e0)
    q.embed_sum.copy_(e0)
    q.cluster_size[3] = 0.5  # rarely used: one hit leaves it at 0.75 < 1, so it restarts this step
    q.embed_sum[3] *= 0.5
    f = torch.tensor([[0.1, 0.0], [5.1, 0.0], [0.0, 5.1], [0.1, 0.1], [20.1, 20.0]])
    out = q.train()(f.t().reshape(1, 2, 5))
    assert out.codes.tolist() == [[0, 1, 2, 0, 3]] and int(q.restarts) == 1
    assert torch.allclose(out.z_q[0, :, 4], e0[3])  # not the restarted code's new value
    assert (q.embed[3] - f).abs().sum(1).min() == 0


# ---- EMA update ---------------------------------------------------------------------------------
def test_ema_update_math():
    decay, eps, k = 0.9, 1e-5, 4
    q = VectorQuantizer(QuantizerConfig(codebook_size=k, dim=2, decay=decay, eps=eps, restart_threshold=0))
    e0 = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    q.embed.copy_(e0)
    q.embed_sum.copy_(e0)  # cluster_size starts at ones, so sums = codes
    f = torch.tensor([[0.1, 0.2], [-0.3, 0.1], [9.5, 0.5], [10.2, -0.1], [0.4, -0.2]])
    z = f.t().reshape(1, 2, 5)  # (B, D, L) with rows of f along L
    out = q.train()(z)
    assert out.codes.tolist() == [[0, 0, 1, 1, 0]]

    counts = torch.tensor([3.0, 2.0, 0.0, 0.0])
    sums = torch.stack([f[[0, 1, 4]].sum(0), f[[2, 3]].sum(0), torch.zeros(2), torch.zeros(2)])
    cluster_size = decay * torch.ones(k) + (1 - decay) * counts
    embed_sum = decay * e0 + (1 - decay) * sums
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + k * eps) * n
    embed = embed_sum / smoothed[:, None]
    assert torch.allclose(q.cluster_size, cluster_size, atol=1e-6)
    assert torch.allclose(q.embed_sum, embed_sum, atol=1e-6)
    assert torch.allclose(q.embed, embed, atol=1e-5)
    assert int(q.restarts) == 0 and int(q.skipped_updates) == 0
    # the used codes moved toward their members, the unused ones (barely) kept their place
    assert (q.embed[0] - f[[0, 1, 4]].mean(0)).norm() < (e0[0] - f[[0, 1, 4]].mean(0)).norm()
    assert torch.allclose(q.embed[2:], e0[2:], atol=0.01)


def test_eval_forward_does_not_update():
    q = make_q().eval()
    before = copy.deepcopy(q.state_dict())
    q(torch.randn(2, 8, 4, 4))
    for name, t in q.state_dict().items():
        assert torch.equal(t, before[name]), name


# ---- dead-code restarts --------------------------------------------------------------------------
def _restart_case(threshold: float):
    k = 8
    q = VectorQuantizer(QuantizerConfig(codebook_size=k, dim=2, decay=0.5, restart_threshold=threshold))
    e0 = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]] + [[1000.0 + i, 1000.0] for i in range(4)])
    q.embed.copy_(e0)
    q.embed_sum.copy_(e0)
    torch.manual_seed(1)
    f = (e0[:4, None] + 0.1 * torch.randn(4, 6, 2)).reshape(-1, 2)  # 6 points near each of codes 0..3
    z = f.t().reshape(1, 2, -1)
    out = q.train()(z)
    return q, e0, f, out


def test_dead_codes_restart_from_encoder_outputs():
    q, e0, f, out = _restart_case(threshold=1.0)
    assert set(out.codes.flatten().tolist()) == {0, 1, 2, 3}
    assert int(q.restarts) == 4
    for c in range(4, 8):  # each restarted code is exactly one of the batch's feature rows
        assert (q.embed[c] - f).abs().sum(1).min() == 0, c
        assert q.cluster_size[c] == 1.0
        assert torch.equal(q.embed_sum[c], q.embed[c] * q.cluster_size[c])
    assert torch.all((q.embed[:4] - e0[:4]).norm(dim=1) < 1.0)  # live codes were not restarted


def test_no_restart_with_zero_threshold():
    q, e0, f, out = _restart_case(threshold=0.0)
    assert int(q.restarts) == 0
    assert torch.all(q.embed[4:] > 900)  # still far away: not replaced by features


# ---- k-means init --------------------------------------------------------------------------------
def test_kmeans_init_finds_blobs():
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    for seed in range(12):  # uniformly drawn seeds miss a blob in about a third of such cases
        torch.manual_seed(seed)
        f = (means[:, None] + 0.1 * torch.randn(4, 32, 2)).reshape(-1, 2)
        f = f[torch.randperm(f.shape[0])]
        q = VectorQuantizer(QuantizerConfig(codebook_size=4, dim=2, kmeans_init=True))
        assert not bool(q.initialized)
        q.eval()(f.t()[None])
        assert not bool(q.initialized)  # eval forwards never initialise
        q.train()(f.t()[None])
        assert bool(q.initialized)
        dist = torch.cdist(means, q.embed).min(1).values
        assert torch.all(dist < 0.2), (seed, dist)
        assert int(q.restarts) == 0
        assert sorted(q.cluster_size.round().tolist()) == [32.0] * 4  # decay * 32 + (1 - decay) * 32


def test_kmeans_init_with_fewer_points_than_codes():
    q = VectorQuantizer(QuantizerConfig(codebook_size=16, dim=2, kmeans_init=True))
    f = torch.randn(5, 2)
    q.train()(f.t()[None])
    assert bool(q.initialized) and torch.isfinite(q.embed).all()
    assert torch.cdist(q.embed, f).min(1).values.max() < 0.05  # every code sits on a data point


def test_kmeans_init_skipped_on_nan_batch():
    q = VectorQuantizer(QuantizerConfig(codebook_size=4, dim=2, kmeans_init=True))
    before = q.embed.clone()
    z = torch.randn(1, 2, 16)
    z[0, 0, 3] = float("nan")
    q.train()(z)
    assert torch.isfinite(q.embed).all() and torch.equal(q.embed, before)
    assert not bool(q.initialized) and int(q.skipped_updates) == 1
    q(torch.randn(1, 2, 16))
    assert bool(q.initialized) and torch.isfinite(q.embed).all()


# ---- grids of any rank ------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial", [(10,), (4, 6), (2, 3, 5)])
@pytest.mark.parametrize("code_dim", [None, 4])
def test_grids_of_any_rank(spatial, code_dim):
    q = make_q(code_dim=code_dim)
    z = torch.randn(3, 8, *spatial)
    q.train()(z)  # one update, then check eval consistency
    q.eval()
    out = q(z)
    codes = q.encode(z)
    assert codes.shape == (3, *spatial) and out.codes.shape == (3, *spatial)
    assert out.z_q.shape == z.shape
    assert torch.equal(codes, out.codes)
    with torch.no_grad():
        looked_up = q.lookup(codes)
    if code_dim is None:
        assert torch.allclose(looked_up, out.z_q, atol=1e-6)
        # z_q holds codebook rows in the right positions
        assert torch.equal(flat_of(looked_up), q.embed[codes.reshape(-1)])
    else:
        assert torch.allclose(looked_up, out.z_q, atol=1e-5)


def test_rejects_features_without_grid():
    with pytest.raises(ValueError, match="spatial"):
        make_q()(torch.randn(4, 8))


# ---- fp32 under autocast ----------------------------------------------------------------------------
def test_autocast_bf16_uses_fp32_codes_and_buffers():
    q = make_q(codebook_size=64, dim=16)
    z = torch.randn(4, 16, 8, 8).bfloat16()
    ref = copy.deepcopy(q).eval().encode(z.float())
    q_eval = copy.deepcopy(q).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q_eval(z)
        enc = q_eval.encode(z)
    assert torch.equal(out.codes, ref) and torch.equal(enc, ref)
    assert out.z_q.dtype == torch.bfloat16

    q.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
    assert torch.equal(out.codes, ref)  # the training forward picks codes before it updates
    for name in ("embed", "embed_sum", "cluster_size"):
        assert getattr(q, name).dtype == torch.float32, name
    assert out.commitment_loss.dtype == torch.float32


# ---- non-finite features ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_features_skip_the_update(bad):
    q = make_q().train()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    z = torch.randn(2, 8, 4, 4)
    z[1, 3, 2, 2] = bad
    q(z)
    assert int(q.skipped_updates) == 1
    for name in ("embed", "embed_sum", "cluster_size", "restarts"):
        assert torch.equal(getattr(q, name), before[name]), name
    q(torch.randn(2, 8, 4, 4))
    assert int(q.skipped_updates) == 1 and not torch.equal(q.embed, before["embed"])


# ---- statistics -------------------------------------------------------------------------------------
def _perplexity_np(counts):
    p = [c / sum(counts) for c in counts if c > 0]
    return math.exp(-sum(x * math.log(x) for x in p))


def test_codebook_stats_over_batches():
    k = 16
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 10, (4, 3, 3), generator=g) for _ in range(3)]
    batches.append(torch.full((2, 3, 3), 12))
    stats = CodebookStats(k)
    for b in batches:
        stats.update(b)
    hist = torch.bincount(torch.cat([b.flatten() for b in batches]), minlength=k)
    assert stats.counts.tolist() == hist.double().tolist()
    assert stats.usage == pytest.approx(float((hist > 0).sum()) / k)
    assert stats.perplexity == pytest.approx(_perplexity_np(hist.tolist()), rel=1e-9)
    # one batch alone sees fewer codes than the whole set
    one = CodebookStats(k)
    one.update(batches[-1])
    assert one.usage == 1 / k and one.perplexity == pytest.approx(1.0)


def test_uniform_usage_gives_perplexity_k():
    stats = CodebookStats(8)
    stats.update(torch.arange(8).repeat(5).view(5, 8))
    assert stats.usage == 1.0
    assert stats.perplexity == pytest.approx(8.0)
    assert CodebookStats(8).usage == 0.0


def test_batch_perplexity_in_output():
    q = make_q(codebook_size=4, dim=2).eval()
    q.embed.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    z = q.embed.clone().repeat(3, 1).t()[None]  # each code exactly three times
    assert float(q(z).perplexity) == pytest.approx(4.0, rel=1e-5)


# ---- lookup errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [32, -1, 1000])
def test_lookup_out_of_range(bad):
    q = make_q()
    codes = torch.zeros(2, 3, 3, dtype=torch.long)
    codes[1, 2, 0] = bad
    with pytest.raises(ValueError, match="another tokenizer"):
        q.lookup(codes)


def test_lookup_rejects_float_codes():
    with pytest.raises(TypeError):
        make_q().lookup(torch.zeros(1, 2, 2))


# ---- identical codebooks across ranks ---------------------------------------------------------------
def _sync_worker():
    """Runs in each of 2 forked processes (gloo) under accelerate.debug_launcher."""
    import torch

    from accelerate import Accelerator

    from conftest import reset_accelerate  # loaded in the pytest process this one is forked from
    from stage1_tokenizer.quantizer import check_codebooks_in_sync

    reset_accelerate()  # a forked child must not reuse the parent's single-process state
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2
    rank = acc.process_index

    torch.manual_seed(0)  # the same initial codebook everywhere, as a seeded training script has
    q = VectorQuantizer(QuantizerConfig(codebook_size=32, dim=4, decay=0.8, restart_threshold=1.0,
                                        kmeans_init=True, kmeans_iters=3)).train()
    torch.manual_seed(1000 + rank)  # ranks' RNGs differ too (only rank 0's restart picks count)
    g = torch.Generator().manual_seed(rank)
    local_sums = []
    for step in range(4):
        z = torch.randn(2, 4, 3, 3, generator=g) * (1 + rank) + rank  # different data on every rank
        local_sums.append(float(z.sum()))
        q(z)
    # the premise: ranks really saw different data, and restarts and k-means init did happen
    data = acc.gather(torch.tensor([local_sums], dtype=torch.float64))
    assert not torch.equal(data[0], data[1])
    assert bool(q.initialized) and int(q.restarts) > 0

    checksums = acc.gather(q.checksum()[None])
    assert checksums.shape == (2,)
    assert torch.equal(checksums, checksums[:1].expand(2)), checksums.tolist()
    assert check_codebooks_in_sync(acc, q) == "codebooks in sync across 2 ranks"

    # negative control: one rank drifts -> every rank raises
    if rank == 1:
        q.embed[3, 1] += 1e-4
    try:
        check_codebooks_in_sync(acc, q)
    except RuntimeError as err:
        assert "differ" in str(err)
    else:
        raise AssertionError("a desynchronised codebook went unnoticed")
    acc.wait_for_everyone()


def test_codebooks_identical_across_ranks():
    launch_two_processes(__file__, "_sync_worker")
