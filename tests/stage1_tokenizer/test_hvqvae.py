"""Hierarchical VQ-VAE: shapes for 2 and 3 levels in every modality, top-down conditioning, save/load."""
from __future__ import annotations

import copy

import pytest
import torch

from stage1_tokenizer import QuantizerConfig
from stage1_tokenizer.hvqvae import HierarchicalVQVAE, HierarchicalVQVAEConfig


pytestmark = pytest.mark.usefixtures("one_thread")


def make(modality="image", channels=3, factors=((4, 4), (2, 2)), sizes=(), level_dropout=0.0, patch=None,
         norm="group"):
    torch.manual_seed(0)
    cfg = HierarchicalVQVAEConfig(modality=modality, in_channels=channels, channels=(8, 8), hidden=8, num_res_blocks=1,
                                  factors=factors, quantizer=QuantizerConfig(codebook_size=16, dim=8),
                                  codebook_sizes=sizes, level_dropout=level_dropout, patch=patch, norm=norm)
    return HierarchicalVQVAE(cfg).eval()


@pytest.mark.parametrize("modality,channels,factors,shape,grids", [
    ("image", 3, ((4, 4), (2, 2)), (3, 64, 64), [(8, 8), (16, 16)]),
    ("image", 3, ((2, 2), (2, 2), (2, 2)), (3, 32, 48), [(4, 6), (8, 12), (16, 24)]),
    ("audio", 1, ((8,), (4,), (4,)), (1, 1024), [(8,), (32,), (128,)]),  # Jukebox-style hops 8/32/128
    ("video", 3, ((2, 4, 4), (2, 2, 2)), (3, 8, 32, 32), [(2, 4, 4), (4, 8, 8)]),
])
def test_encode_decode_shapes_top_first(modality, channels, factors, shape, grids):
    model = make(modality, channels, factors)
    x = torch.rand(2, *shape) * (2 if modality == "audio" else 1) - (1 if modality == "audio" else 0)
    with torch.no_grad():
        codes = model.encode_levels(x)
        assert [tuple(c.shape[1:]) for c in codes] == grids == model.code_shapes(shape)
        assert all(c.dtype == torch.long for c in codes)
        assert model.decode_levels(codes).shape == x.shape
        # the training forward quantizes exactly what encode does
        assert all(torch.equal(a, b) for a, b in zip(model(x).codes, codes))


def test_patch_folds_the_bottom_levels_first_downsampling():
    """``patch`` changes how the bottom encoder starts, not the code grids."""
    plain, patched = make("image", 3, ((4, 4), (2, 2))), make("image", 3, ((4, 4), (2, 2)), patch=(2, 2))
    assert patched.encoders[0].net[0].in_channels == 12 and plain.encoders[0].net[0].in_channels == 3
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        codes = patched.encode_levels(x)
        assert [c.shape for c in codes] == [c.shape for c in plain.encode_levels(x)]
        assert patched.decode_levels(codes).shape == x.shape
    with pytest.raises(ValueError, match="patch"):
        make("image", 3, ((4, 4), (2, 2)), patch=(3, 3))


def test_per_level_codebook_sizes():
    model = make(sizes=(32, 8))
    assert model.codebook_sizes == [32, 8]
    codes = model.encode_levels(torch.rand(1, 3, 16, 16))
    assert int(codes[0].max()) < 32 and int(codes[1].max()) < 8


def test_lower_level_sees_the_level_above_and_decoder_uses_all_levels():
    model = make()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        top, bottom = model.encode_levels(x)
        other_top = (top + 1) % 16
        # decoding with another top level changes the output: the decoder uses it
        assert not torch.allclose(model.decode_levels([top, bottom]), model.decode_levels([other_top, bottom]))
        # the bottom quantizer's input depends on the decoded top level
        feats = model._features(x)
        up = model.up[0](model.quantizers[1].lookup(top))
        up_other = model.up[0](model.quantizers[1].lookup(other_top))
        z = model.pre_quant[0](torch.cat([feats[0], up], 1))
        z_other = model.pre_quant[0](torch.cat([feats[0], up_other], 1))
        assert not torch.allclose(z, z_other)


def test_fully_convolutional_on_bigger_inputs():
    model = make()
    with torch.no_grad():
        codes = model.encode_levels(torch.rand(1, 3, 96, 64))
    assert [tuple(c.shape[1:]) for c in codes] == [(12, 8), (24, 16)]


def test_training_forward_and_losses():
    model = make().train()
    out = model(torch.rand(2, 3, 16, 16))
    assert len(out.perplexity) == 2 and len(out.codes) == 2
    assert torch.allclose(out.loss, out.recon_loss + out.codebook_loss + out.commitment_loss)
    out.loss.backward()
    assert model.encoders[0].net[0].weight.grad is not None and model.decoder.net[-1].weight.grad is not None


def _with_noisy_level(model, level):
    """A copy of ``model`` whose level-``level`` quantizer outputs noise instead of its codes' vectors."""
    noisy = copy.deepcopy(model)
    quantize = noisy.quantizers[level].forward

    def forward(z):
        out = quantize(z)
        out.z_q = torch.randn_like(out.z_q)
        return out

    noisy.quantizers[level].forward = forward
    return noisy


@pytest.mark.parametrize("factors", [((4, 4), (2, 2)), ((2, 2), (2, 2), (2, 2))])
def test_level_dropout_blanks_the_lower_levels_in_training_only(factors):
    x = torch.rand(4, 3, 16, 16)
    model = make(factors=factors, level_dropout=1.0).train()
    noisy = _with_noisy_level(model, 0)
    torch.manual_seed(1)
    recon = model(x).recon
    torch.manual_seed(1)
    # every sample had its bottom level blanked: what the bottom quantizer gives cannot reach the output
    assert torch.allclose(noisy(x).recon, recon)
    # in eval mode (encode/decode, and the forward of evaluation) nothing is blanked
    model.eval(), noisy.eval()
    with torch.no_grad():
        assert torch.allclose(model(x).recon, model.decode_levels(model.encode_levels(x)), atol=1e-6)
        assert not torch.allclose(noisy(x).recon, model(x).recon)
    # the trainer's annealed rate overrides the config's: at 0 nothing is blanked
    model.train(), noisy.train()
    torch.manual_seed(1)
    full = model(x, level_dropout=0.0).recon
    torch.manual_seed(1)
    assert not torch.allclose(noisy(x, level_dropout=0.0).recon, full)
    with pytest.raises(ValueError, match="level_dropout"):
        HierarchicalVQVAEConfig(level_dropout=1.5)


def test_level_dropout_schedule():
    from stage1_tokenizer.train import TokenizerTrainConfig, level_dropout_at

    model = {"factors": [[4, 4], [2, 2]], "level_dropout": 0.5}
    constant = TokenizerTrainConfig(arch="hvqvae", model=model)
    annealed = TokenizerTrainConfig(arch="hvqvae", model=model, level_dropout_steps=100)
    assert level_dropout_at(constant, 0) == level_dropout_at(constant, 10_000) == 0.5
    assert [level_dropout_at(annealed, s) for s in (0, 50, 100, 500)] == [0.5, 0.25, 0.0, 0.0]
    with pytest.raises(ValueError, match="hvqvae"):
        TokenizerTrainConfig(arch="vqvae", level_dropout_steps=100)


def test_level_dropout_blanks_only_a_fraction_of_the_batch():
    x = torch.rand(64, 3, 8, 8)
    model = make(level_dropout=0.25).train()
    noisy = _with_noisy_level(model, 0)
    torch.manual_seed(2)
    recon = model(x).recon
    torch.manual_seed(2)
    same = (noisy(x).recon - recon).flatten(1).abs().amax(1) < 1e-6
    assert 4 <= int(same.sum()) <= 32  # about 16 of 64 blanked


def test_save_load_equality(tmp_path):
    model = make(sizes=(32, 8))
    model.save_pretrained(tmp_path / "m")
    loaded = HierarchicalVQVAE.from_pretrained(tmp_path / "m")
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.encode_levels(x), loaded.encode_levels(x)))
    assert model.fingerprint() == loaded.fingerprint()


def test_norm_none_drops_every_groupnorm_and_keeps_the_weights_names(tmp_path):
    """``norm="none"``: no GroupNorm anywhere, the same conv weights under the same names (identities hold the
    norms' places), and the model saves, loads and trains like one with norms."""
    grouped, plain = make(norm="group"), make(norm="none")
    assert any(isinstance(m, torch.nn.GroupNorm) for m in grouped.modules())
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in plain.modules())
    norm_names = {n for n, m in grouped.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    kept = {k for k in grouped.state_dict() if k.rsplit(".", 1)[0] not in norm_names}
    assert set(plain.state_dict()) == kept
    plain.save_pretrained(tmp_path / "m")
    loaded = HierarchicalVQVAE.from_pretrained(tmp_path / "m")
    assert loaded.config.norm == "none"
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(plain.encode_levels(x), loaded.encode_levels(x)))
    plain.train()(x).loss.backward()
    assert all(p.grad is not None for n, p in plain.named_parameters() if "quantizers" not in n)


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="norm must be one of group, none"):
        HierarchicalVQVAEConfig(norm="batch")
    with pytest.raises(ValueError, match="at least 2 levels"):
        HierarchicalVQVAEConfig(factors=((4, 4),))
    with pytest.raises(ValueError, match="one size per level"):
        HierarchicalVQVAEConfig(codebook_sizes=(16,))
    model = make()
    with pytest.raises(ValueError, match="divisible"):
        model.encode_levels(torch.rand(1, 3, 20, 20))
    with pytest.raises(ValueError, match="2 code grids"):
        model.decode_levels([torch.zeros(1, 2, 2, dtype=torch.long)])
    with pytest.raises(ValueError, match="do not fit"):
        model.decode_levels([torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 8, 8, dtype=torch.long)])
