"""Tests for the convolutional priors: stage2_prior.pixelcnn (Gated PixelCNN, optional attention),
stage2_prior.wavenet (WaveNet) and their shared stage2_prior.causal_conv: no blind spot, causality, cached
steps == full forward, seeded sampling with and without cache, conditioning, save/load, input checks."""
from __future__ import annotations

import pytest
import torch

from stage2_prior.causal_conv import CausalConv1d, HorizontalConv, VerticalConv
from stage2_prior.pixelcnn import GatedPixelCNNPriorConfig, GatedPixelCNNPrior
from stage2_prior.registry import load_prior
from stage2_prior.sampling import sample
from stage2_prior.train import PriorTrainConfig, model_config
from stage2_prior.wavenet import WaveNetPriorConfig, WaveNetPrior

from conftest import Tiny

V = 11  # vocabulary
CLASSES = 3
COND_V = 5


pytestmark = pytest.mark.usefixtures("one_thread")


def _perturb(prior, seed):
    # Larger weights than the default init, so that every input visibly moves the logits.
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return prior.eval()


def make_pixelcnn(grid=(4, 5), attn_every=0, conditional=True, seed=0, **kw) -> GatedPixelCNNPrior:
    torch.manual_seed(seed)
    cfg = GatedPixelCNNPriorConfig(grid_shape=grid, vocab_size=V, num_classes=CLASSES if conditional else 0,
                              cond_grid_shape=(2, 3) if conditional else None,
                              cond_vocab_size=COND_V if conditional else 0,
                              channels=16, head_channels=16, attn_every=attn_every, attn_heads=2,
                              **{"num_layers": 4, "kernel_size": 3, **kw})
    return _perturb(GatedPixelCNNPrior(cfg), seed)


def make_wavenet(length=24, conditional=True, seed=0, **kw) -> WaveNetPrior:
    torch.manual_seed(seed)
    cfg = WaveNetPriorConfig(grid_shape=(length,), vocab_size=V, num_classes=CLASSES if conditional else 0,
                        cond_grid_shape=(6,) if conditional else None, cond_vocab_size=COND_V if conditional else 0,
                        channels=16, skip_channels=12, head_channels=16,
                        **{"kernel_size": 3, "layers_per_cycle": 3, "num_cycles": 2, **kw})
    return _perturb(WaveNetPrior(cfg), seed)


inputs = Tiny.prior_inputs


PRIORS = {
    "pixelcnn": lambda **kw: make_pixelcnn(**kw),
    "pixelcnn_attn": lambda **kw: make_pixelcnn(attn_every=2, **kw),
    "wavenet": lambda **kw: make_wavenet(**kw),
}


# ---- shared convolutions -----------------------------------------------------------------------
@pytest.mark.parametrize("kernel,dilation", [(2, 1), (3, 4), (2, 8)])
def test_causal_conv1d_sees_its_taps_only(kernel, dilation):
    """Output t depends on inputs t - (k-1) d, ..., t - d, t and on no other (the cached steps are checked at the
    prior level: test_cached_steps_match_forward)."""
    torch.manual_seed(0)
    conv = CausalConv1d(3, 5, kernel, dilation)
    x = torch.randn(2, 3, 40)
    with torch.no_grad():
        full = conv(x)
        for t in (5, 20, 39):
            x2 = x.clone()
            x2[:, :, t] += 1
            diff = (conv(x2) - full).abs().amax((0, 1))
            changed = set(diff.nonzero().flatten().tolist())
            assert changed == {t + m * dilation for m in range(kernel) if t + m * dilation < 40}


@pytest.mark.parametrize("mask", ["A", "B"])
def test_2d_convs_see_what_their_masks_allow(mask):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 6)
    hconv, vconv = HorizontalConv(3, 5, 5, mask), VerticalConv(3, 5, 5)
    with torch.no_grad():
        hfull, vfull = hconv(x), vconv(x)
        rows = vconv.start_rows(2, 6)
        for i in range(4):  # the vertical conv's row cache gives its rows
            rows = vconv.push_row(rows, x[:, :, i])
            assert torch.allclose(vconv.row(rows)[:, :, 0], vfull[:, :, i], atol=1e-6)
    # mask A: (i, j) sees (i, < j); mask B: (i, <= j); never another row
    x2 = x.clone()
    x2[:, :, 2, 3] += 1
    with torch.no_grad():
        diff = (hconv(x2) - hfull).abs().amax((0, 1))
    changed = {tuple(p) for p in diff.nonzero().tolist()}
    assert changed == ({(2, 4), (2, 5)} if mask == "A" else {(2, 3), (2, 4), (2, 5)})


# ---- no blind spot, causality ------------------------------------------------------------------
@pytest.mark.parametrize("attn_every", [0, 2])
def test_pixelcnn_no_blind_spot(attn_every):
    """d logits(i, j) / d embeddings is nonzero exactly at the positions before (i, j) in raster order:
    5 layers of 3x3 cover the whole 5x5 grid, so a blind spot would show as a zero."""
    prior = make_pixelcnn((5, 5), attn_every=attn_every, conditional=False, num_layers=5)
    codes, _, _ = inputs(prior, batch=1)
    seen = {}

    def keep(module, args, out):
        out.retain_grad()
        seen["emb"] = out

    prior.tok_emb.register_forward_hook(keep)
    n = 25
    for t in range(n):
        i, j = divmod(t, 5)
        prior.zero_grad()
        logits = prior(codes)
        logits[0, i, j].sum().backward()
        grad = seen["emb"].grad[0].abs().sum(-1).flatten()  # (25,)
        assert (grad[:t] > 0).all(), (t, grad[:t])
        assert (grad[t:] == 0).all(), (t, grad[t:])


@pytest.mark.parametrize("name", list(PRIORS))
def test_causality(name):
    prior = PRIORS[name]()
    codes, labels, cond = inputs(prior)
    n = prior.num_tokens
    with torch.no_grad():
        base = prior(codes, labels, cond).flatten(1, -2)  # (B, N, V)
        assert base.shape == (2, n, V)
        for t in (0, 1, n // 2, n - 2):
            changed = codes.flatten(1).clone()
            changed[:, t] = (changed[:, t] + 1) % V
            out = prior(changed.view_as(codes), labels, cond).flatten(1, -2)
            assert torch.equal(out[:, : t + 1], base[:, : t + 1]), t  # logits <= t do not see code t
            assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 1e-4, t  # the next one does
            assert (out[:, t + 1 :] - base[:, t + 1 :]).abs().max() > 1e-4, t


# ---- cache --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PRIORS))
@pytest.mark.parametrize("conditional", [True, False])
def test_cached_steps_match_forward(name, conditional):
    prior = PRIORS[name](conditional=conditional)
    codes, labels, cond = inputs(prior, batch=3)
    flat = codes.flatten(1)
    with torch.no_grad():
        full = prior(codes, labels, cond).flatten(1, -2)
        state = prior.start_state(3, labels, cond)
        steps = [prior.step(state, flat[:, t - 1] if t else None) for t in range(prior.num_tokens)]
        assert torch.allclose(torch.stack(steps, 1), full, atol=1e-5, rtol=0)
        with pytest.raises(IndexError):
            prior.step(state, flat[:, -1])
        state = prior.start_state(3, labels, cond)
        prior.step(state, None)
        with pytest.raises(ValueError, match="prev"):
            prior.step(state, None)


def test_cached_steps_match_forward_large():
    """Default-size networks (15 PixelCNN layers with 5x5 kernels and attention; 30 WaveNet layers)."""
    priors = [make_pixelcnn((12, 12), attn_every=5, num_layers=15, kernel_size=5),
              make_wavenet(300, kernel_size=2, layers_per_cycle=10, num_cycles=3)]
    for prior in priors:
        codes, labels, cond = inputs(prior)
        flat = codes.flatten(1)
        with torch.no_grad():
            full = prior(codes, labels, cond).flatten(1, -2)
            state = prior.start_state(2, labels, cond)
            steps = torch.stack([prior.step(state, flat[:, t - 1] if t else None)
                                 for t in range(prior.num_tokens)], 1)
        assert torch.allclose(steps, full, atol=1e-5, rtol=0), type(prior).__name__


@pytest.mark.parametrize("name", list(PRIORS))
def test_sample_cache_and_recompute_agree(name):
    prior = PRIORS[name]()
    _, labels, cond = inputs(prior)
    draws = [sample(prior, 2, labels, cond, generator=torch.Generator().manual_seed(7), use_cache=c)
             for c in (True, False)]
    assert draws[0].shape == (2, *prior.config.grid_shape)
    assert torch.equal(draws[0], draws[1])
    # a prefix is kept and completed the same way
    prefix = draws[0].flatten(1)[:, :5]
    done = sample(prior, 2, labels, cond, generator=torch.Generator().manual_seed(3), prefix=prefix)
    assert torch.equal(done.flatten(1)[:, :5], prefix)


# ---- conditioning -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PRIORS))
def test_conditioning_changes_logits(name):
    prior = PRIORS[name]()
    codes, labels, cond = inputs(prior)
    with torch.no_grad():
        base = prior(codes, labels, cond).flatten(1, -2)
        other_class = prior(codes, (labels + 1) % CLASSES, cond).flatten(1, -2)
        other_cond = prior(codes, labels, (cond + 1) % COND_V).flatten(1, -2)
    # known before sampling starts: even position 0 depends on them
    assert (other_class[:, 0] - base[:, 0]).abs().max() > 1e-4
    assert (other_cond[:, 0] - base[:, 0]).abs().max() > 1e-4
    assert (other_cond - base).abs().amax(-1).min() > 0  # every position sees its upper-level codes
    with pytest.raises(ValueError, match="class_labels"):
        prior(codes, None, cond)
    with pytest.raises(ValueError, match="cond"):
        prior(codes, labels, None)


# ---- save / load, config -------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PRIORS))
def test_save_load(name, tmp_path):
    prior = PRIORS[name]()
    codes, labels, cond = inputs(prior)
    prior.save_pretrained(tmp_path / "m")
    for loaded in (type(prior).from_pretrained(tmp_path / "m"), load_prior(tmp_path / "m")):
        assert type(loaded) is type(prior) and loaded.config == prior.config
        with torch.no_grad():
            assert torch.equal(loaded(codes, labels, cond), prior(codes, labels, cond))
    assert prior.nll(codes, labels, cond).shape == (2,)


def test_model_config_from_manifest():
    manifest = {"levels": [{"grid_shape": [3, 4], "codebook_size": 7}, {"grid_shape": [6, 8], "codebook_size": 9}],
                "num_classes": 4}
    cfg = model_config(PriorTrainConfig(arch="pixelcnn", level=1, model={"channels": 8, "num_layers": 2}), manifest)
    assert cfg == GatedPixelCNNPriorConfig(grid_shape=(6, 8), vocab_size=9, num_classes=4, cond_grid_shape=(3, 4),
                                      cond_vocab_size=7, channels=8, num_layers=2)
    audio = {"levels": [{"grid_shape": [16], "codebook_size": 7}, {"grid_shape": [64], "codebook_size": 9}]}
    cfg = model_config(PriorTrainConfig(arch="wavenet", level=1, model={"channels": 8}), audio)
    assert cfg.grid_shape == (64,) and cfg.cond_grid_shape == (16,) and cfg.num_classes == 0
    with pytest.raises(ValueError, match="2-D"):
        model_config(PriorTrainConfig(arch="pixelcnn", level=0), audio)
    with pytest.raises(ValueError, match="1-D"):
        model_config(PriorTrainConfig(arch="wavenet", level=0), manifest)


def test_wrong_rank_is_a_clear_error():
    for grid in [(16,), (2, 3, 4)]:
        with pytest.raises(ValueError, match="PixelCNN prior models 2-D"):
            GatedPixelCNNPriorConfig(grid_shape=grid, vocab_size=V)
    for grid in [(4, 4), (2, 3, 4)]:
        with pytest.raises(ValueError, match="WaveNet prior models 1-D"):
            WaveNetPriorConfig(grid_shape=grid, vocab_size=V)
    with pytest.raises(ValueError, match="cond_grid_shape"):
        GatedPixelCNNPriorConfig(grid_shape=(4, 4), cond_grid_shape=(8,), cond_vocab_size=3)
    with pytest.raises(ValueError, match="cond_grid_shape"):
        WaveNetPriorConfig(grid_shape=(16,), cond_grid_shape=(2, 2), cond_vocab_size=3)
    prior = make_pixelcnn(conditional=False)
    with pytest.raises(ValueError, match="code grids"):
        prior(torch.zeros(1, 20, dtype=torch.long))
