"""Classifier-free guidance: the null class of every prior (stage2_prior.base), label dropout in training
(stage2_prior.train) and guided sampling (stage2_prior.sampling, the pipeline, ``tokgen sample``)."""
from __future__ import annotations

import pytest
import torch

from stage2_prior.base import NULL_CLASS
from stage2_prior.pixelcnn import GatedPixelCNNPriorConfig, GatedPixelCNNPrior
from stage2_prior.registry import load_prior
from stage2_prior.sampling import guide, sample
from stage2_prior.train import PriorTrainConfig, drop_labels, model_config
from stage2_prior.transformer import TransformerPrior, TransformerPriorConfig
from stage2_prior.wavenet import WaveNetPriorConfig, WaveNetPrior

V, CLASSES, COND_V = 11, 3, 5

pytestmark = pytest.mark.usefixtures("one_thread")


def make(arch: str, null_class: bool = True, seed: int = 0):
    """A small prior of each kind, class- and upper-level-conditional, weights scaled up so every input
    visibly moves the logits."""
    torch.manual_seed(seed)
    common = dict(vocab_size=V, num_classes=CLASSES, null_class=null_class, cond_vocab_size=COND_V)
    if arch == "transformer":
        prior = TransformerPrior(TransformerPriorConfig(grid_shape=(2, 3, 2), cond_grid_shape=(1, 2, 1), dim=32,
                                                        num_layers=2, num_heads=4, relative_bias=True, **common))
    elif arch == "pixelcnn":
        prior = GatedPixelCNNPrior(GatedPixelCNNPriorConfig(grid_shape=(3, 4), cond_grid_shape=(2, 2), channels=16,
                                                       head_channels=16, num_layers=3, kernel_size=3, **common))
    else:
        prior = WaveNetPrior(WaveNetPriorConfig(grid_shape=(12,), cond_grid_shape=(3,), channels=16, skip_channels=12,
                                           head_channels=16, layers_per_cycle=3, num_cycles=1, **common))
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return prior.eval()


def cond_for(prior, batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, COND_V, (batch, *prior.config.cond_grid_shape), generator=g)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


ARCHS = ["transformer", "pixelcnn", "wavenet"]


@pytest.mark.parametrize("arch", ARCHS)
def test_null_class_is_its_own_embedding_and_survives_save_load(arch, tmp_path):
    prior = make(arch)
    assert prior.class_emb.num_embeddings == CLASSES + 1
    codes = torch.randint(0, V, (3, *prior.config.grid_shape), generator=gen(2))
    cond = cond_for(prior, 3)
    null = torch.full((3,), NULL_CLASS)
    with torch.no_grad():
        as_null = prior(codes, null, cond)
        # NULL_CLASS is the extra row, not an alias of a real class
        for c in range(CLASSES):
            assert not torch.allclose(as_null, prior(codes, torch.full((3,), c), cond))
    prior.save_pretrained(tmp_path / "p")
    loaded = load_prior(tmp_path / "p").eval()
    assert loaded.config.null_class
    with torch.no_grad():
        assert torch.allclose(loaded(codes, null, cond), as_null, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_guidance_zero_is_the_unconditional_model_and_cache_agrees(arch):
    prior = make(arch)
    labels, cond = torch.tensor([0, 2]), cond_for(prior, 2)
    unconditional = sample(prior, 2, torch.full((2,), NULL_CLASS), cond, generator=gen(5))
    for use_cache in (True, False):
        assert torch.equal(sample(prior, 2, labels, cond, generator=gen(5), guidance=0.0, use_cache=use_cache),
                           unconditional)
    guided = sample(prior, 2, labels, cond, generator=gen(5), guidance=3.0)
    assert torch.equal(guided, sample(prior, 2, labels, cond, generator=gen(5), guidance=3.0, use_cache=False))
    assert not torch.equal(guided, sample(prior, 2, labels, cond, generator=gen(5)))


@pytest.mark.parametrize("arch", ARCHS)
def test_guided_greedy_codes_are_the_argmax_of_the_guided_logits(arch):
    """Every position: u + s (c - u) from two teacher-forced passes over the sampled codes picks that code."""
    prior = make(arch)
    labels, cond = torch.tensor([1, 0, 2]), cond_for(prior, 3)
    codes = sample(prior, 3, labels, cond, top_k=1, guidance=2.5, generator=gen(0))
    with torch.no_grad():
        c = prior(codes, labels, cond).flatten(1, -2)
        u = prior(codes, torch.full((3,), NULL_CLASS), cond).flatten(1, -2)
    guided = guide(torch.cat([c, u]).flatten(0, 1), 2.5).view(c.shape)
    assert torch.allclose(guided, u + 2.5 * (c - u), atol=1e-5)
    assert torch.equal(guided.argmax(-1), codes.flatten(1))
    assert not torch.equal(c.argmax(-1), codes.flatten(1))  # guidance changed some choice: the check has teeth


def test_guidance_and_null_class_errors():
    plain = make("transformer", null_class=False)
    labels, cond = torch.tensor([0, 1]), cond_for(plain, 2)
    with pytest.raises(ValueError, match="class dropout"):
        sample(plain, 2, labels, cond, guidance=2.0)
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        plain(torch.zeros(2, 2, 3, 2, dtype=torch.long), torch.full((2,), NULL_CLASS), cond)
    with pytest.raises(ValueError, match="or -1 for no class"):
        make("wavenet")(torch.zeros(2, 12, dtype=torch.long), torch.tensor([0, -2]), cond_for(make("wavenet"), 2))
    with pytest.raises(ValueError, match="num_classes > 0"):
        WaveNetPrior(WaveNetPriorConfig(num_classes=0, null_class=True))
    unconditional = TransformerPrior(TransformerPriorConfig(grid_shape=(4,), vocab_size=V, dim=16, num_layers=1,
                                                            num_heads=2))
    with pytest.raises(ValueError, match="unconditional"):
        sample(unconditional, 2, None, None, guidance=2.0)


def test_label_dropout():
    labels = torch.arange(1000) % 10
    assert torch.equal(drop_labels(labels, 0.0), labels)
    torch.manual_seed(0)
    dropped = drop_labels(labels, 0.3)
    kept = dropped != NULL_CLASS
    assert torch.equal(dropped[kept], labels[kept])  # the rest keep their label
    assert 0.25 < (~kept).float().mean() < 0.35
    assert drop_labels(None, 0.3) is None
    with pytest.raises(ValueError, match="class_dropout"):
        PriorTrainConfig(class_dropout=1.0)


def test_class_dropout_gives_the_prior_a_null_class():
    manifest = {"levels": [{"grid_shape": [4, 4], "codebook_size": 32}], "num_classes": 3}
    assert model_config(PriorTrainConfig(class_dropout=0.1), manifest).null_class
    assert not model_config(PriorTrainConfig(), manifest).null_class
    # no labels (or labels ignored): nothing to drop, no null class
    assert not model_config(PriorTrainConfig(class_dropout=0.1, class_conditional=False), manifest).null_class
    assert not model_config(PriorTrainConfig(class_dropout=0.1), {**manifest, "num_classes": 0}).null_class
