"""Tests for stage2_prior.transformer (TransformerPrior) and stage2_prior.sampling: causality on 1-D, 2-D
and 3-D grids, KV cache == full forward, seeded sampling, logit filters, input checks, save/load, nll."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stage2_prior.registry import load_prior
from stage2_prior.sampling import filter_logits, sample
from stage2_prior import transformer
from stage2_prior.transformer import Attention, TransformerPrior, TransformerPriorConfig, biased_causal_attention

from conftest import Tiny

V = 11  # vocabulary
CLASSES = 3
COND_V = 5
GRIDS = {  # grid -> upper-level grid it is conditioned on
    (16,): (8,),
    (4, 5): (2, 3),
    (2, 3, 4): (1, 2, 2),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_prior(grid=(4, 5), num_classes=CLASSES, cond=True, seed=0, **kw) -> TransformerPrior:
    torch.manual_seed(seed)
    cfg = TransformerPriorConfig(grid_shape=grid, vocab_size=V, num_classes=num_classes,
                                 cond_grid_shape=GRIDS[grid] if cond else None, cond_vocab_size=COND_V if cond else 0,
                                 dim=32, num_layers=2, num_heads=4, **kw)
    prior = TransformerPrior(cfg).eval()
    # Larger weights than the 0.02 init, so that every input visibly moves the logits.
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return prior


inputs = Tiny.prior_inputs


# ---- causality ---------------------------------------------------------------------------------
@pytest.mark.parametrize("relative_bias", [False, True])
@pytest.mark.parametrize("grid", list(GRIDS))
def test_causality(grid, relative_bias):
    prior = make_prior(grid, relative_bias=relative_bias)
    codes, labels, cond = inputs(prior)
    n = prior.num_tokens
    with torch.no_grad():
        base = prior(codes, labels, cond).flatten(1, -2)  # (B, N, V)
        assert base.shape == (2, n, V)
        for t in (0, n // 2, n - 2):
            changed = codes.flatten(1).clone()
            changed[:, t] = (changed[:, t] + 1) % V
            out = prior(changed.view_as(codes), labels, cond).flatten(1, -2)
            # positions <= t predict codes <= t from codes < t: untouched
            assert torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0), t
            # position t + 1 sees code t, so something later changes
            assert (out[:, t + 1 :] - base[:, t + 1 :]).abs().max() > 1e-4, t


@pytest.mark.parametrize("grid", list(GRIDS))
def test_conditioning_reaches_every_position(grid):
    prior = make_prior(grid)
    codes, labels, cond = inputs(prior)
    with torch.no_grad():
        base = prior(codes, labels, cond).flatten(1, -2)
        other_class = prior(codes, (labels + 1) % CLASSES, cond).flatten(1, -2)
        other_cond = prior(codes, labels, (cond + 1) % COND_V).flatten(1, -2)
    # class and upper-level codes are known up front: even position 0 depends on them
    assert (other_class[:, 0] - base[:, 0]).abs().max() > 1e-4
    assert (other_cond[:, 0] - base[:, 0]).abs().max() > 1e-4


# ---- KV cache ----------------------------------------------------------------------------------
@pytest.mark.parametrize("relative_bias", [False, True])
@pytest.mark.parametrize("grid", list(GRIDS))
def test_cached_steps_match_forward(grid, relative_bias):
    prior = make_prior(grid, relative_bias=relative_bias)
    codes, labels, cond = inputs(prior, batch=3)
    with torch.no_grad():
        full = prior(codes, labels, cond).flatten(1, -2)
        state = prior.start_state(3, labels, cond)
        flat = codes.flatten(1)
        steps = [prior.step(state, flat[:, t - 1] if t else None) for t in range(prior.num_tokens)]
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-5, rtol=0)
    with pytest.raises(IndexError):
        prior.step(state, flat[:, -1])


def test_cached_steps_unconditional():
    prior = make_prior((4, 5), num_classes=0, cond=False)
    codes, labels, cond = inputs(prior)
    assert labels is None and cond is None
    with torch.no_grad():
        full = prior(codes).flatten(1, -2)
        state = prior.start_state(2)
        steps = [prior.step(state, codes.flatten(1)[:, t - 1] if t else None) for t in range(20)]
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-5, rtol=0)


# ---- attention with a relative bias, in query blocks ----------------------------------------------
def _biased_inputs(n: int, dtype=torch.float32):
    """q, k, v (2, 3, n, 8) and a (3, n, n) bias table, all needing gradients; ``masked`` makes the causal bias."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    table = torch.randn(3, n, n, requires_grad=True)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return q, k, v, table, lambda: table.masked_fill(~causal, float("-inf"))


@pytest.mark.parametrize("n", [5, 64, 150])  # one block, exactly one, three with a short last one
def test_biased_attention_in_blocks_equals_sdpa_with_its_gradients(n):
    q, k, v, table, masked = _biased_inputs(n)
    outs, grads = [], []
    for attend in (biased_causal_attention, F.scaled_dot_product_attention):
        out = attend(q, k, v, masked())
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)  # every output gets its own gradient
        outs.append(out)
        grads.append(torch.autograd.grad((out * weights).sum(), (q, k, v, table)))
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=0)
    for mine, sdpa in zip(*grads):
        assert torch.allclose(mine, sdpa, atol=1e-5, rtol=0)


def test_biased_attention_runs_in_fp32_under_bf16_autocast():
    """As SDPA's math path does by default: the bf16 inputs are upcast, the scores and softmax are fp32, the
    output comes back in the inputs' dtype."""
    q, k, v, _, masked = _biased_inputs(100, torch.bfloat16)
    bias = masked()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = biased_causal_attention(q, k, v, bias)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), expected, atol=1e-2, rtol=0)
    # the fp32 result rounded once at the end: within half a bf16 step of it (bf16 matmuls inside are not)
    assert ((out.float() - expected).abs() <= expected.abs() * 2**-8 + 1e-6).all()


def test_query_blocks_keep_the_prior_causal_and_its_cache_exact(monkeypatch):
    monkeypatch.setattr(transformer, "QUERY_BLOCK", 5)  # 24 positions: blocks of 5 and a short last one
    grid = (2, 3, 4)
    test_causality(grid, relative_bias=True)
    test_cached_steps_match_forward(grid, relative_bias=True)


# ---- the static (fixed-shape) cache ------------------------------------------------------------
def static_logits(prior, codes, labels, cond, graph=None):
    stepper = prior.start_static(codes.shape[0], labels, cond, graph=graph)
    flat = codes.flatten(1).to(prior.start.device)
    return torch.stack([stepper.step(flat[:, t - 1] if t else None) for t in range(prior.num_tokens)], 1), stepper


@pytest.mark.parametrize("relative_bias", [False, True])
@pytest.mark.parametrize("grid", list(GRIDS))
def test_static_steps_match_forward(grid, relative_bias):
    """The fixed-shape step (full-length cache, position as a tensor, masked keys) gives the full forward's logits."""
    prior = make_prior(grid, relative_bias=relative_bias)
    codes, labels, cond = inputs(prior, batch=3)
    with torch.no_grad():
        full = prior(codes, labels, cond).flatten(1, -2)
        steps, stepper = static_logits(prior, codes, labels, cond)
        assert stepper.graph is None  # a CPU runs it eagerly
        assert torch.allclose(steps, full, atol=1e-5, rtol=0)
        with pytest.raises(IndexError):
            stepper.step(codes.flatten(1)[:, -1])


def test_static_cache_samples_the_same_codes():
    prior = make_prior((4, 5))
    _, labels, cond = inputs(prior, batch=3)
    a = sample(prior, 3, labels, cond, generator=gen(4), top_p=0.95)
    b = sample(prior, 3, labels, cond, generator=gen(4), top_p=0.95, static_cache=True)
    prefix = a.flatten(1)[:, :7]
    c = sample(prior, 3, labels, cond, generator=gen(5), prefix=prefix)
    d = sample(prior, 3, labels, cond, generator=gen(5), prefix=prefix, static_cache=True)
    assert torch.equal(a, b) and torch.equal(c, d)
    assert torch.equal(d.flatten(1)[:, :7], prefix)


def test_static_cache_is_used_on_cuda_only_unless_asked(monkeypatch):
    prior = make_prior((4, 5))
    _, labels, cond = inputs(prior)
    built = []
    start_static = prior.start_static
    monkeypatch.setattr(prior, "start_static", lambda *a, **k: built.append(1) or start_static(*a, **k))
    default = sample(prior, 2, labels, cond, generator=gen(1))
    assert built == []  # the default on a CPU: the growing cache
    asked = sample(prior, 2, labels, cond, generator=gen(1), static_cache=True)
    assert built == [1] and torch.equal(default, asked)


def test_static_cache_errors():
    prior = make_prior((4, 5))
    _, labels, cond = inputs(prior)
    with pytest.raises(ValueError, match="use_cache"):
        sample(prior, 2, labels, cond, use_cache=False, static_cache=True)
    with pytest.raises(ValueError, match="eval"):
        prior.train().start_static(2, labels, cond)
    prior.eval()
    with pytest.raises(ValueError, match="labels|class"):
        prior.start_static(2, None, cond)  # a class-conditional prior needs its labels, as start_state does
    stepper = prior.start_static(2, labels, cond)
    stepper.step(None)
    with pytest.raises(ValueError, match="prev"):
        stepper.step(None)
    stacks = TransformerPrior(TransformerPriorConfig(grid_shape=(2, 2), vocab_size=V, depth=2, dim=16, num_layers=1,
                                                     num_heads=2)).eval()
    with pytest.raises(ValueError, match="stack"):
        stacks.start_static(2)
    # in the sampler a code-stack prior keeps its growing cache
    assert sample(stacks, 2, generator=gen(0), static_cache=True).shape == (2, 2, 2, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_cache_cuda_graph_matches_eager(dtype):
    """On a GPU the step is one CUDA graph replay: the same logits as the eager fixed-shape step and the full
    forward, in fp32 and under bf16 autocast; the sampler draws the same codes through it."""
    prior = make_prior((4, 5), relative_bias=True).cuda()
    codes, labels, cond = (t.cuda() for t in inputs(prior, batch=3))
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        full = prior(codes, labels, cond).flatten(1, -2).float()
        eager, _ = static_logits(prior, codes, labels, cond, graph=False)
        graphed, stepper = static_logits(prior, codes, labels, cond)
        assert stepper.graph is not None
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # relative to the logits' norm
        assert float((graphed.float() - eager.float()).norm() / eager.float().norm()) < tol
        assert float((graphed.float() - full).norm() / full.norm()) < tol
    if dtype == torch.float32:
        a = sample(prior, 3, labels, cond, generator=gen(3))
        b = sample(prior, 3, labels, cond, generator=gen(3), static_cache=True)
        assert torch.equal(a, b)


def test_attention_chunked_cache_matches_full():
    """The cache path also takes chunks of several positions (with a causal mask)."""
    torch.manual_seed(0)
    cfg = TransformerPriorConfig(dim=16, num_heads=2)
    attn = Attention(cfg).eval()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        full = attn(x)
        cache = {"k": torch.zeros(2, 2, 9, 8), "v": torch.zeros(2, 2, 9, 8), "pos": 0}
        parts = []
        for start, end in ((0, 4), (4, 5), (5, 9)):
            cache["pos"] = start
            parts.append(attn(x[:, start:end], cache))
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


def test_relative_bias_depends_on_offsets_only():
    """Any two (query, key) pairs with the same offset along every axis share a bias; different offsets
    use different table entries; keys after the query are masked."""
    from stage2_prior.transformer import _relative_index

    grid = (2, 3, 4)
    index = _relative_index(grid)
    coords = torch.stack(torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")).flatten(1).T  # (N, 3)
    offsets = {}
    for q in range(index.shape[0]):
        for k in range(index.shape[1]):
            offsets.setdefault(tuple((coords[q] - coords[k]).tolist()), set()).add(int(index[q, k]))
    assert all(len(v) == 1 for v in offsets.values())  # one entry per offset
    assert len({next(iter(v)) for v in offsets.values()}) == len(offsets) == 3 * 5 * 7  # distinct entries
    prior = make_prior(grid, relative_bias=True)
    bias = prior.attention_bias()
    assert bias.shape == (4, 24, 24)
    later = torch.ones(24, 24, dtype=torch.bool).triu(1)
    assert (bias[:, later] == float("-inf")).all() and torch.isfinite(bias[:, ~later]).all()
    q, k = 1 * 12 + 2 * 4 + 3, 0 * 12 + 1 * 4 + 1  # (1, 2, 3) and (0, 1, 1): offset (1, 1, 2)
    q2, k2 = 1 * 12 + 1 * 4 + 2, 0 * 12 + 0 * 4 + 0  # (1, 1, 2) and (0, 0, 0): the same offset
    assert torch.equal(bias[:, q, k], bias[:, q2, k2])


def test_relative_bias_learns_a_shifted_copy_everywhere():
    """With the bias, "copy the code one step back along an axis" is one offset; a prior trained on
    sequences where frame t repeats frame t-1 predicts the copies far better than without it."""
    torch.manual_seed(0)
    grid, vocab = (4, 3, 3), 16

    def data(n):
        first = torch.randint(0, vocab, (n, 1, 3, 3))
        return first.expand(n, 4, 3, 3).contiguous()

    losses = {}
    for relative_bias in (False, True):
        torch.manual_seed(0)
        prior = TransformerPrior(TransformerPriorConfig(grid_shape=grid, vocab_size=vocab, dim=32, num_layers=1,
                                                        num_heads=2, relative_bias=relative_bias))
        opt = torch.optim.Adam(prior.parameters(), 3e-3)
        for _ in range(150):
            codes = data(32)
            loss = F.cross_entropy(prior(codes)[:, 1:].flatten(0, -2), codes[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            codes = data(256)
            losses[relative_bias] = float(F.cross_entropy(prior(codes)[:, 1:].flatten(0, -2), codes[:, 1:].flatten()))
    assert losses[True] < 0.5 * losses[False], losses


# ---- sampling ----------------------------------------------------------------------------------
def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("grid", [(16,), (2, 3, 4)])
def test_sampling_seeded_and_cache_free_agree(grid):
    prior = make_prior(grid)
    _, labels, cond = inputs(prior, batch=3)
    a = sample(prior, 3, labels, cond, generator=gen(7))
    b = sample(prior, 3, labels, cond, generator=gen(7))
    c = sample(prior, 3, labels, cond, generator=gen(7), use_cache=False)
    d = sample(prior, 3, labels, cond, generator=gen(8))
    assert a.shape == (3, *grid) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < V
    assert torch.equal(a, b)
    assert torch.equal(a, c)
    assert not torch.equal(a, d)


def test_sampling_with_filters_and_progress():
    prior = make_prior((4, 5))
    _, labels, cond = inputs(prior)
    calls = []
    a = sample(prior, 2, labels, cond, temperature=0.7, top_k=3, top_p=0.9, generator=gen(1), progress=calls.append)
    b = sample(prior, 2, labels, cond, temperature=0.7, top_k=3, top_p=0.9, generator=gen(1), use_cache=False)
    assert torch.equal(a, b)
    assert sum(calls) == 20
    # top_k=1 is greedy: every code is the argmax of its logits
    greedy = sample(prior, 2, labels, cond, top_k=1, generator=gen(2))
    with torch.no_grad():
        logits = prior(greedy, labels, cond)
    assert torch.equal(logits.argmax(-1), greedy)


def test_sample_completion_keeps_prefix():
    prior = make_prior((4, 5))
    codes, labels, cond = inputs(prior, batch=2)
    prefix = codes.flatten(1)[:, :7]
    for use_cache in (True, False):
        out = sample(prior, 2, labels, cond, generator=gen(3), prefix=prefix, use_cache=use_cache)
        assert torch.equal(out.flatten(1)[:, :7], prefix)
    a = sample(prior, 2, labels, cond, generator=gen(3), prefix=prefix)
    b = sample(prior, 2, labels, cond, generator=gen(3), prefix=prefix, use_cache=False)
    assert torch.equal(a, b)
    full = sample(prior, 2, labels, cond, generator=gen(3), prefix=codes.flatten(1))
    assert torch.equal(full, codes)
    with pytest.raises(ValueError, match="prefix"):
        sample(prior, 3, None, None, prefix=prefix)


# ---- filter_logits -------------------------------------------------------------------------------
def test_filter_top_k():
    logits = torch.randn(4, 50, generator=gen(0))
    out = filter_logits(logits, top_k=5)
    kept = torch.isfinite(out)
    assert (kept.sum(-1) == 5).all()
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, logits.topk(5).indices, True))
    assert torch.allclose(out[kept], logits[kept])
    assert torch.isfinite(filter_logits(logits, top_k=50)).all()  # k >= V keeps everything


def test_filter_top_p_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.05, 0.05, 0.85, 0.05]])
    logits = probs.log()
    kept = torch.isfinite(filter_logits(logits, top_p=0.75))
    # 0.5 + 0.3 = 0.8 >= 0.75 is the smallest set; a single 0.85 is already enough
    assert kept.tolist() == [[True, False, True, False], [False, False, True, False]]
    kept = torch.isfinite(filter_logits(logits, top_p=0.8001))
    assert kept.tolist()[0] == [True, False, True, True]
    # top_p >= 1 keeps everything; the top token always survives
    assert torch.isfinite(filter_logits(logits, top_p=1.0)).all()
    assert torch.isfinite(filter_logits(logits, top_p=1e-6)).sum(-1).tolist() == [1, 1]


def test_filter_temperature():
    logits = torch.randn(2, 7, generator=gen(1))
    assert torch.allclose(filter_logits(logits, temperature=0.5), logits * 2)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            filter_logits(logits, temperature=bad)


# ---- input checks ------------------------------------------------------------------------------
def test_check_inputs_errors():
    prior = make_prior((4, 5))
    codes, labels, cond = inputs(prior)
    with pytest.raises(ValueError, match=r"\(4, 5\)"):
        prior(codes.view(2, 5, 4), labels, cond)
    with pytest.raises(ValueError, match="another codebook"):
        prior(codes + V, labels, cond)
    with pytest.raises(ValueError, match="another codebook"):
        prior(codes - V, labels, cond)
    with pytest.raises(ValueError, match="class_labels"):
        prior(codes, None, cond)
    with pytest.raises(ValueError, match="class_labels"):
        prior(codes, torch.tensor([0, CLASSES]), cond)
    with pytest.raises(ValueError, match="class_labels"):
        prior(codes, torch.tensor([0, 1, 2]), cond)
    with pytest.raises(ValueError, match="pass cond"):
        prior(codes, labels, None)
    with pytest.raises(ValueError, match="cond must be"):
        prior(codes, labels, cond[:, :1])
    with pytest.raises(ValueError, match="class_labels"):
        prior.start_state(2, None, cond)
    with pytest.raises(ValueError, match="pass cond"):
        prior.start_state(2, labels, None)
    with pytest.raises(ValueError, match="class_labels"):
        sample(prior, 2, None, cond)


def test_config_rejects_bad_heads():
    with pytest.raises(ValueError, match="divisible"):
        TransformerPriorConfig(dim=30, num_heads=4)


# ---- save / load -------------------------------------------------------------------------------
@pytest.mark.parametrize("relative_bias", [False, True])
def test_save_load_roundtrip(tmp_path, relative_bias):
    prior = make_prior((2, 3, 4), relative_bias=relative_bias)
    codes, labels, cond = inputs(prior)
    prior.save_pretrained(tmp_path / "prior")
    assert sorted(p.name for p in (tmp_path / "prior").iterdir()) == ["config.json", "model.safetensors"]
    for loaded in (TransformerPrior.from_pretrained(tmp_path / "prior"), load_prior(tmp_path / "prior")):
        assert isinstance(loaded, TransformerPrior) and not loaded.training
        assert loaded.config == prior.config
        assert loaded.config.grid_shape == (2, 3, 4) and loaded.config.cond_grid_shape == (1, 2, 2)
        assert loaded.fingerprint() == prior.fingerprint()
        for key, value in prior.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        with torch.no_grad():
            assert torch.equal(loaded(codes, labels, cond), prior(codes, labels, cond))
        assert torch.equal(sample(loaded, 2, labels, cond, generator=gen(4)),
                           sample(prior, 2, labels, cond, generator=gen(4)))


def test_load_prior_rejects_other_models(tmp_path, tiny):
    tiny.vqvae(codebook_size=8).save_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match="not a prior"):
        load_prior(tmp_path / "tok")


# ---- likelihood ----------------------------------------------------------------------------------
def test_nll_is_sum_of_token_log_probs():
    prior = make_prior((4, 5))
    codes, labels, cond = inputs(prior, batch=3)
    with torch.no_grad():
        nll = prior.nll(codes, labels, cond)
        logp = F.log_softmax(prior(codes, labels, cond).double(), -1)
    expected = -logp.gather(-1, codes[..., None]).squeeze(-1).flatten(1).sum(1)
    assert nll.shape == (3,)
    assert torch.allclose(nll.double(), expected, atol=1e-4, rtol=1e-6)
    # an untrained prior is near uniform over V codes, but not exactly
    assert abs(float(nll.mean()) / 20 - math.log(V)) < math.log(V)
