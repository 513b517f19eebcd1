"""Priors over code stacks (stage2_prior.stacks; a residual quantizer's codes (B, *grid, depth)): for the transformer
(spatial + depth transformer), the gated PixelCNN (with and without attention) and WaveNet (channel-group masks):
causality in (position, stage) order, no blind spot, cached steps == full forward, sampling (cache and recompute,
top-k/top-p, prefixes, classifier-free guidance), likelihoods over every stage, save/load, configs and manifests."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stage2_prior.base import NULL_CLASS
from stage2_prior.pixelcnn import GatedPixelCNNPrior, GatedPixelCNNPriorConfig
from stage2_prior.registry import load_prior
from stage2_prior.sampling import sample
from stage2_prior.stacks import group_ids, group_mask
from stage2_prior.train import PriorTrainConfig, model_config
from stage2_prior.transformer import TransformerPrior, TransformerPriorConfig
from stage2_prior.wavenet import WaveNetPrior, WaveNetPriorConfig

D, V, CLASSES, COND_V, COND_D = 3, 7, 3, 5, 2

pytestmark = pytest.mark.usefixtures("one_thread")


def _perturb(prior, scale: float = 0.3, seed: int = 1):
    """Larger weights than an init's, so that every input visibly moves the logits (not so large for the wide conv
    priors that their gates saturate, which makes a dependence too faint to see)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(torch.randn_like(p) * scale)
    return prior.eval()


def _common(conditional: bool, grid_cond, null_class: bool = False) -> dict:
    return dict(vocab_size=V, depth=D, num_classes=CLASSES if conditional else 0, null_class=null_class and conditional,
                cond_grid_shape=grid_cond if conditional else None, cond_vocab_size=COND_V if conditional else 0,
                cond_depth=COND_D if conditional else 0)


def make(arch: str, conditional: bool = True, null_class: bool = False, **kw):
    """A small prior of ``arch`` over depth-3 stacks, conditioned (when asked) on a class and on upper-level stacks
    of depth 2. The conv priors get 16 channels per stage group (32 in the head): a group of 4 behind a ReLU is often
    all zero at a position, which hides a dependence from the checks below without being a blind spot."""
    torch.manual_seed(0)
    c = 48
    if arch.startswith("transformer"):
        grid = {"transformer_1d": (10,), "transformer_3d": (2, 2, 3)}.get(arch, (3, 4))
        cond = {2: (1, 2), 1: (5,), 3: (1, 1, 3)}[len(grid)]
        cfg = TransformerPriorConfig(grid_shape=grid, dim=24, num_layers=2, num_heads=2, depth_layers=2,
                                     relative_bias=arch == "transformer_rel", **_common(conditional, cond, null_class),
                                     **kw)
        return _perturb(TransformerPrior(cfg))
    if arch.startswith("pixelcnn"):
        cfg = GatedPixelCNNPriorConfig(grid_shape=(4, 5), channels=c, head_channels=2 * c, num_layers=4, kernel_size=3,
                                       attn_every=2 if arch == "pixelcnn_attn" else 0, attn_heads=3,
                                       **_common(conditional, (2, 3), null_class), **kw)
        return _perturb(GatedPixelCNNPrior(cfg), 0.1)
    cfg = WaveNetPriorConfig(grid_shape=(10,), channels=c, skip_channels=c, head_channels=2 * c,
                             kernel_size=3 if arch == "wavenet_k3" else 2,
                             **{"layers_per_cycle": 3, "num_cycles": 1, **kw}, **_common(conditional, (5,), null_class))
    return _perturb(WaveNetPrior(cfg), 0.1)


ARCHS = ["transformer", "transformer_1d", "transformer_3d", "transformer_rel", "pixelcnn", "pixelcnn_attn", "wavenet"]


def inputs(prior, batch: int = 2, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, V, (batch, *prior.code_shape), generator=g)
    labels = torch.randint(0, CLASSES, (batch,), generator=g) if prior.config.num_classes else None
    cond = torch.randint(0, COND_V, (batch, *prior.cond_code_shape), generator=g) if prior.config.cond_vocab_size else None
    return codes, labels, cond


# ---- the order: causality, no blind spot --------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_causality_in_position_stage_order(arch):
    """Changing code t (of codes.flatten(1): stage fastest) moves no logit <= t and moves the next one."""
    prior = make(arch)
    codes, labels, cond = inputs(prior)
    n = prior.num_tokens
    assert prior.code_shape[-1] == D and n == prior.num_positions * D
    with torch.no_grad():
        base = prior(codes, labels, cond)
        assert base.shape == (2, *prior.code_shape, V)
        base = base.flatten(1, -2)
        for t in range(n - 1):
            changed = codes.flatten(1).clone()
            changed[:, t] = (changed[:, t] + 1) % V
            out = prior(changed.view_as(codes), labels, cond).flatten(1, -2)
            assert torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0), t
            assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 1e-5, t  # the next stage / position sees it


@pytest.mark.parametrize("arch", ["transformer", "pixelcnn", "pixelcnn_attn", "wavenet"])
def test_no_blind_spot(arch):
    """d logits(code q) / d embeddings is nonzero at every code before q and zero at q and after: the stages < k
    of q's position and every stage of every earlier position (the receptive fields cover the whole grid)."""
    prior = make(arch, conditional=False, **({"layers_per_cycle": 4} if arch == "wavenet" else {}))  # sees all 10
    codes, _, _ = inputs(prior, batch=1)
    seen = []

    def keep(module, args, out):
        out.retain_grad()
        seen.append(out)

    prior.tok_emb.register_forward_hook(keep)
    for q in range(prior.num_tokens):
        prior.zero_grad()
        seen.clear()
        prior(codes).flatten(1, -2)[0, q].sum().backward()
        # WaveNet embeds the codes twice: positions 0..N-2 as the next positions' input, then each at its own
        grads = [e.grad[0].flatten(0, -2 if arch != "transformer" else -3) for e in seen]  # (positions, ...)
        grad = sum(F.pad(g, (0, 0) * (g.dim() - 1) + (0, prior.num_positions - len(g))) for g in grads)
        # per code: the transformer embeds each stage on its own, the conv priors side by side in channel groups
        grad = grad if arch == "transformer" else grad.unflatten(-1, (D, -1))
        grad = grad.abs().sum(-1).flatten()
        assert (grad[:q] > 0).all(), (q, grad[:q])
        assert (grad[q:] == 0).all(), (q, grad[q:])


def test_group_masks():
    ids = group_ids([6, 6], 3)  # two gate halves of 3 groups of 2 channels
    assert ids.tolist() == [0, 0, 1, 1, 2, 2] * 2
    a, b = group_mask(ids, group_ids([3], 3), "A"), group_mask(ids, group_ids([3], 3), "B")
    assert a[:2].sum() == 0 and a[2:4].tolist() == [[1, 0, 0]] * 2 and a[4:6].tolist() == [[1, 1, 0]] * 2
    assert b[:2].tolist() == [[1, 0, 0]] * 2 and b[4:6].tolist() == [[1, 1, 1]] * 2


# ---- cached steps -------------------------------------------------------------------------------
@pytest.mark.parametrize("conditional", [True, False])
@pytest.mark.parametrize("arch", ARCHS + ["wavenet_k3"])  # k = 3: a tap between t and the furthest one
def test_cached_steps_match_forward(arch, conditional):
    prior = make(arch, conditional)
    codes, labels, cond = inputs(prior, batch=3)
    flat = codes.flatten(1)
    with torch.no_grad():
        full = prior(codes, labels, cond).flatten(1, -2)
        state = prior.start_state(3, labels, cond)
        steps = torch.stack([prior.step(state, flat[:, t - 1] if t else None) for t in range(prior.num_tokens)], 1)
        assert torch.allclose(steps, full, atol=1e-5, rtol=0)
        with pytest.raises(IndexError):
            prior.step(state, flat[:, -1])
        state = prior.start_state(3, labels, cond)
        prior.step(state, None)
        with pytest.raises(ValueError, match="prev"):
            prior.step(state, None)


# ---- sampling ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["transformer", "pixelcnn_attn", "wavenet"])
def test_sampling_cache_recompute_filters_and_prefix(arch):
    prior = make(arch)
    _, labels, cond = inputs(prior)
    for knobs in ({}, {"top_k": 2}, {"top_p": 0.5, "temperature": 0.7}):
        draws = [sample(prior, 2, labels, cond, generator=torch.Generator().manual_seed(7), use_cache=c, **knobs)
                 for c in (True, False)]
        assert draws[0].shape == (2, *prior.code_shape) and torch.equal(draws[0], draws[1])
        assert int(draws[0].min()) >= 0 and int(draws[0].max()) < V
    # top-k 1 draws each stage's most likely code given what came before: the argmax of a teacher-forced forward
    greedy = sample(prior, 2, labels, cond, top_k=1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(prior(greedy, labels, cond).argmax(-1), greedy)
    # a prefix of whole positions and part of the next one's stages is kept
    prefix = greedy.flatten(1)[:, : D + 2]
    done = sample(prior, 2, labels, cond, generator=torch.Generator().manual_seed(3), prefix=prefix)
    assert torch.equal(done.flatten(1)[:, : D + 2], prefix)


@pytest.mark.parametrize("arch", ["transformer", "pixelcnn", "wavenet"])
def test_guidance_on_stacks(arch):
    prior = make(arch, null_class=True)
    _, labels, cond = inputs(prior)
    codes = torch.randint(0, V, (2, *prior.code_shape), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():  # the null class is a class of its own, at every stage
        assert not torch.allclose(prior(codes, labels, cond), prior(codes, torch.full((2,), NULL_CLASS), cond))
    draws = {g: [sample(prior, 2, labels, cond, guidance=g, generator=torch.Generator().manual_seed(5), use_cache=c)
                 for c in (True, False)] for g in (1.0, 3.0)}
    for g, (cached, full) in draws.items():
        assert torch.equal(cached, full), g
    assert not torch.equal(draws[1.0][0], draws[3.0][0])


# ---- likelihoods, save/load, configs ---------------------------------------------------------------
@pytest.mark.parametrize("arch", ["transformer", "pixelcnn", "wavenet"])
def test_nll_counts_every_stage_and_save_load(arch, tmp_path):
    prior = make(arch)
    codes, labels, cond = inputs(prior)
    with torch.no_grad():
        logp = prior(codes, labels, cond).log_softmax(-1)
        expected = -logp.gather(-1, codes[..., None]).flatten(1).sum(1)
        assert torch.allclose(prior.nll(codes, labels, cond), expected, atol=1e-4)
    prior.save_pretrained(tmp_path / "m")
    loaded = load_prior(tmp_path / "m")
    assert loaded.config == prior.config and loaded.config.depth == D
    assert set(loaded.state_dict()) == set(prior.state_dict())  # masks and offsets are not saved
    with torch.no_grad():
        assert torch.equal(loaded(codes, labels, cond), prior(codes, labels, cond))
    assert loaded.fingerprint() == prior.fingerprint()


def test_wrong_shapes_and_widths_are_clear_errors():
    prior = make("transformer")
    codes, labels, cond = inputs(prior)
    with pytest.raises(ValueError, match="code stacks"):
        prior(codes[..., :2], labels, cond)
    with pytest.raises(ValueError, match="cond must be"):
        prior(codes, labels, cond[..., 0])
    with pytest.raises(ValueError, match="multiple of 3"):
        GatedPixelCNNPriorConfig(grid_shape=(4, 4), vocab_size=V, depth=3, channels=16, head_channels=12)
    with pytest.raises(ValueError, match="multiple of 3"):
        WaveNetPriorConfig(grid_shape=(8,), vocab_size=V, depth=3, channels=12, skip_channels=10, head_channels=12)
    with pytest.raises(ValueError, match="cond_depth"):
        TransformerPriorConfig(vocab_size=V, cond_depth=2)


def test_model_config_from_a_stacked_manifest():
    manifest = {"levels": [{"grid_shape": [2, 2], "codebook_size": 9, "depth": 2, "stage_codebook_sizes": [9, 9]},
                           {"grid_shape": [4, 4], "codebook_size": 7, "depth": 2, "stage_codebook_sizes": [7, 7]}]}
    cfg = model_config(PriorTrainConfig(arch="pixelcnn", level=1, model={"channels": 8, "head_channels": 8}), manifest)
    assert (cfg.grid_shape, cfg.vocab_size, cfg.depth, cfg.cond_grid_shape, cfg.cond_depth) == ((4, 4), 7, 2, (2, 2), 2)
    top = model_config(PriorTrainConfig(arch="transformer", level=0), manifest)
    assert top.depth == 2 and top.cond_depth == 0
    flat = model_config(PriorTrainConfig(level=0), {"levels": [{"grid_shape": [2, 2], "codebook_size": 9}]})
    assert flat.depth == 0 and flat.cond_depth == 0


def test_depth_transformer_inputs_sum_earlier_stages():
    prior = make("transformer", conditional=False)
    stages = torch.randn(1, 1, D, 24)
    u = prior.stack.inputs(torch.zeros(1, 1, 24), stages) - prior.stack.pos.weight
    assert torch.allclose(u[0, 0, 0], torch.zeros(24)) and torch.allclose(u[0, 0, 2], stages[0, 0, :2].sum(0))
    assert math.prod(prior.code_shape) == prior.num_tokens == 12 * D
    with torch.no_grad():  # the first stage of the first position sees nothing: the same for any codes
        a, b = (prior(torch.randint(0, V, (1, 3, 4, D)))[0, 0, 0, 0] for _ in range(2))
    assert torch.allclose(F.softmax(a, -1), F.softmax(b, -1))
