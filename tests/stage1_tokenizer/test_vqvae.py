"""Tests for stage1_tokenizer.vqvae (VQVAE) and the save/load folder format of pipelines.hub."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from stage1_tokenizer.modules import down_schedule
from stage1_tokenizer.quantizer import QuantizerConfig
from stage1_tokenizer.vqvae import VQVAE, VQVAEConfig, VQVAEOutput


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed: int = 0, **kw) -> VQVAE:
    torch.manual_seed(seed)
    q = kw.pop("quantizer", {})
    cfg = VQVAEConfig(**{"in_channels": 3, "channels": (8, 8), "num_res_blocks": 1, "factors": (4, 4), **kw},
                      quantizer=QuantizerConfig(**{"codebook_size": 32, "dim": 8, **q}))
    return VQVAE(cfg)


CASES = {
    "image-4": (dict(modality="image", factors=(4, 4)), (2, 3, 32, 32), (2, 8, 8)),
    "image-8": (dict(modality="image", factors=(8, 8)), (2, 3, 32, 32), (2, 4, 4)),
    "audio": (dict(modality="audio", in_channels=1, factors=(8,)), (2, 1, 256), (2, 32)),
    "video": (dict(modality="video", factors=(2, 4, 4)), (2, 3, 4, 16, 16), (2, 2, 4, 4)),
    "video-patch": (dict(modality="video", factors=(2, 4, 4), patch=(1, 2, 2)), (2, 3, 4, 16, 16), (2, 2, 4, 4)),
    "image-patch": (dict(modality="image", factors=(4, 4), patch=(4, 4)), (2, 3, 32, 32), (2, 8, 8)),
    "audio-patch": (dict(modality="audio", in_channels=1, factors=(8,), patch=(2,)), (2, 1, 256), (2, 32)),
}


# ---- shapes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_encode_decode_shapes(case):
    kw, x_shape, code_shape = CASES[case]
    model = make_model(**kw).eval()
    x = torch.rand(x_shape)
    if kw["modality"] == "audio":
        x = x * 2 - 1
    codes = model.encode(x)
    assert codes.shape == code_shape and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < 32
    assert model.code_shapes(x_shape[1:]) == [code_shape[1:]]
    recon = model.decode(codes)
    assert recon.shape == x_shape and torch.isfinite(recon).all()
    # the training forward in eval mode tokenizes exactly as encode and decodes exactly as decode
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out.codes, codes)
    assert torch.allclose(out.recon, recon, atol=1e-5)
    assert torch.equal(model.decode_levels(model.encode_levels(x)), recon)


def test_space_to_depth_is_lossless_and_local():
    """Each patch's values become the channels of one position, in a fixed order; depth_to_space undoes it."""
    from stage1_tokenizer.modules import depth_to_space, space_to_depth

    x = torch.arange(2 * 3 * 4 * 6 * 8, dtype=torch.float32).view(2, 3, 4, 6, 8)
    y = space_to_depth(x, (2, 3, 2))
    assert y.shape == (2, 3 * 12, 2, 2, 4)
    assert torch.equal(depth_to_space(y, (2, 3, 2)), x)
    # position (t, h, w) of the folded grid holds exactly the patch x[:, :, 2t:2t+2, 3h:3h+3, 2w:2w+2]
    patch = x[1, :, 2:4, 3:6, 4:6]
    assert torch.equal(y[1, :, 1, 1, 2], patch.flatten())


def test_patch_keeps_the_code_grid_and_skips_full_resolution_convs():
    full = make_model(modality="video", factors=(2, 4, 4))
    patched = make_model(modality="video", factors=(2, 4, 4), patch=(1, 2, 2))
    # the first conv takes the 4 pixels of a patch as channels and runs at half the resolution
    assert patched.encoder.net[0].in_channels == 3 * 4 and full.encoder.net[0].in_channels == 3
    assert patched.decoder.net[-1].out_channels == 3 * 4
    assert patched.code_shapes((3, 4, 16, 16)) == full.code_shapes((3, 4, 16, 16)) == [(2, 4, 4)]
    with pytest.raises(ValueError, match="patch"):
        VQVAEConfig(modality="video", factors=(2, 4, 4), patch=(1, 3, 2))
    with pytest.raises(ValueError, match="patch"):
        VQVAEConfig(modality="video", factors=(2, 4, 4), patch=(2, 2))


def test_down_schedule():
    assert down_schedule((4, 16, 16)) == [(2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2)]
    assert down_schedule((1, 2)) == [(1, 2)]


@pytest.mark.parametrize("factors", [(3, 4), (4, 6), (0, 4)])
def test_non_power_of_two_factors(factors):
    with pytest.raises(ValueError, match="powers of two"):
        make_model(factors=factors)


def test_factor_count_must_match_modality():
    with pytest.raises(ValueError, match="factors"):
        make_model(modality="video", factors=(4, 4))
    with pytest.raises(ValueError, match="modality"):
        make_model(modality="text")


# ---- bad input ------------------------------------------------------------------------------------
def test_bad_inputs_have_helpful_errors():
    model = make_model().eval()
    with pytest.raises(ValueError, match=r"3.*got \(B, \(1, 32, 32\)\)|takes \(B, 3"):
        model.encode(torch.rand(2, 1, 32, 32))  # wrong channel count
    with pytest.raises(ValueError, match="shape"):
        model.encode(torch.rand(3, 32, 32))  # missing batch dim
    with pytest.raises(ValueError, match="shape"):
        model.encode(torch.rand(1, 2, 3, 32, 32))  # a video into an image tokenizer
    with pytest.raises(ValueError, match="divisible"):
        model.encode(torch.rand(2, 3, 30, 32))
    for bad in (torch.rand(2, 1, 32, 32), torch.rand(3, 32, 32), torch.rand(2, 3, 32, 18)):
        with pytest.raises(ValueError):
            model(bad)
    with pytest.raises(ValueError, match="codes"):
        model.decode(torch.zeros(2, 8, dtype=torch.long))  # 1-D grid for an image tokenizer
    with pytest.raises(ValueError, match="another tokenizer"):
        model.decode(torch.full((1, 8, 8), 32))
    with pytest.raises(ValueError, match="divisible"):
        model.code_shapes((3, 33, 32))


# ---- forward / loss / gradients ----------------------------------------------------------------------
@pytest.mark.parametrize("ema", [True, False])
def test_forward_loss_and_gradients(ema):
    model = make_model(quantizer={"ema": ema, "commitment_weight": 0.3}).train()
    x = torch.rand(4, 3, 16, 16)
    out = model(x)
    assert isinstance(out, VQVAEOutput)
    assert out.recon.shape == x.shape and out.codes.shape == (4, 4, 4)
    assert torch.allclose(out.recon_loss, F.mse_loss(out.recon, x))
    assert torch.equal(out.loss, out.recon_loss + out.codebook_loss + out.commitment_loss)
    assert float(out.commitment_loss.detach()) > 0 and (float(out.codebook_loss.detach()) > 0) == (not ema)
    out.loss.backward()
    for part in (model.encoder, model.decoder):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
    # the first encoder conv learns through the straight-through estimator
    assert float(model.encoder.net[0].weight.grad.abs().sum()) > 0
    if not ema:
        assert float(model.quantizer.embed.grad.abs().sum()) > 0


def test_l1_recon_loss():
    model = make_model(recon_loss="l1").train()
    x = torch.rand(2, 3, 16, 16)
    out = model(x)
    assert torch.allclose(out.recon_loss, (out.recon - x).abs().mean())


# ---- save / load -------------------------------------------------------------------------------------
def _trained(seed=0, **kw) -> VQVAE:
    """A model whose buffers moved away from their initial values (EMA, restarts)."""
    model = make_model(seed, **kw).train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(4, *((3, 16, 16) if "modality" not in kw else (1, 64))))
    return model.eval()


def test_save_and_load_roundtrip(tmp_path):
    model = _trained()
    assert int(model.quantizer.restarts) > 0  # buffers that are not parameters must survive too
    model.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "tok" / "config.json").read_text())["model_type"] == "vqvae"
    loaded = VQVAE.from_pretrained(tmp_path / "tok")
    assert not loaded.training
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    x = torch.rand(3, 3, 16, 16)
    codes = model.encode(x)
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))
    assert loaded.fingerprint() == model.fingerprint()
    # saving again over the folder replaces it atomically (no leftovers)
    loaded.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_patched_video_save_load_roundtrip(tmp_path):
    model = make_model(modality="video", in_channels=1, factors=(2, 4, 4), patch=(1, 2, 2)).eval()
    model.save_pretrained(tmp_path / "v")
    loaded = VQVAE.from_pretrained(tmp_path / "v")
    assert loaded.config == model.config and loaded.config.patch == (1, 2, 2)
    x = torch.rand(2, 1, 4, 16, 16)
    codes = model.encode(x)
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))
    assert loaded.fingerprint() == model.fingerprint()


def test_audio_roundtrip(tmp_path):
    model = _trained(modality="audio", in_channels=1, factors=(8,), sample_rate=8000)
    model.save_pretrained(tmp_path / "a")
    loaded = VQVAE.from_pretrained(tmp_path / "a")
    assert loaded.config.factors == (8,) and loaded.config.sample_rate == 8000
    assert loaded.fingerprint() == model.fingerprint()


def test_fingerprint_names_config_and_weights():
    a, b = make_model(0), make_model(0)
    assert a.fingerprint() == b.fingerprint()
    assert make_model(1).fingerprint() != a.fingerprint()
    with torch.no_grad():
        b.quantizer.restarts += 1  # a 0-dim buffer counts too
    assert b.fingerprint() != a.fingerprint()
    c = make_model(0, quantizer={"commitment_weight": 0.5})  # same weights, other config
    assert c.fingerprint() != a.fingerprint()


def test_fingerprint_survives_a_new_config_field_at_its_default():
    """A later version that adds a config field (at a default that keeps the old behaviour) must not
    rename the models saved before it: token manifests and pipelines refer to them by fingerprint."""
    import dataclasses

    @dataclasses.dataclass
    class Later(VQVAEConfig):
        new_option: int | None = None

    model = make_model(0)
    before = model.fingerprint()
    model.config = Later(**{f.name: getattr(model.config, f.name) for f in dataclasses.fields(VQVAEConfig)})
    assert model.fingerprint() == before
    model.config = dataclasses.replace(model.config, new_option=3)  # using the new option is another model
    assert model.fingerprint() != before


def test_from_pretrained_errors(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "ok")
    config = json.loads((tmp_path / "ok" / "config.json").read_text())

    with pytest.raises(FileNotFoundError, match="not a saved tokgen model"):
        VQVAE.from_pretrained(tmp_path / "nowhere")

    other = tmp_path / "other"
    model.save_pretrained(other)
    (other / "config.json").write_text(json.dumps({**config, "model_type": "prior"}))
    with pytest.raises(ValueError, match="'prior' model, not a 'vqvae'"):
        VQVAE.from_pretrained(other)

    missing = tmp_path / "missing"
    model.save_pretrained(missing)
    (missing / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        VQVAE.from_pretrained(missing)

    bad = tmp_path / "bad"
    model.save_pretrained(bad)
    (bad / "config.json").write_text('{"model_type": "vqvae", ')
    with pytest.raises(ValueError, match="not valid JSON"):
        VQVAE.from_pretrained(bad)

    unknown = tmp_path / "unknown"
    model.save_pretrained(unknown)
    (unknown / "config.json").write_text(json.dumps({**config, "depth": 3}))
    with pytest.raises(ValueError, match="unknown VQVAEConfig fields"):
        VQVAE.from_pretrained(unknown)

    mismatch = tmp_path / "mismatch"  # weights of another architecture under this config
    make_model(channels=(8, 16)).save_pretrained(mismatch)
    (mismatch / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError):
        VQVAE.from_pretrained(mismatch)
