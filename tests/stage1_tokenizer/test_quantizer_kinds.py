"""Tests for the quantizer kinds in the tokenizers: QuantizerConfig's kinds and checks (JSON, presets, old
fingerprints), build_quantizer, and VQVAE / HierarchicalVQVAE with FSQ, LFQ and residual VQ: training steps, losses,
encode/decode in every modality, bf16 autocast, save/load, usage, and residual codes at any number of stages."""
from __future__ import annotations

import json

import pytest
import torch

from harness.config import config_from_dict, config_to_dict, merge, non_default_fields, preset
from stage1_tokenizer import (FiniteScalarQuantizer, HierarchicalVQVAE, HierarchicalVQVAEConfig, LookupFreeQuantizer,
                              ResidualVectorQuantizer, VectorQuantizer, VQVAE, VQVAEConfig, build_quantizer)
from stage1_tokenizer.quantizer import QuantizerConfig
from stage1_tokenizer.train import active_codes

from conftest import HostReads, launch_two_processes


pytestmark = pytest.mark.usefixtures("one_thread")

# the quantizer part of a tokenizer config, one per kind, as JSON gives it
EXAMPLES = {
    "vq": {"codebook_size": 32, "dim": 8},
    "rvq": {"kind": "rvq", "codebook_size": 16, "dim": 8, "num_stages": 3, "quantizer_dropout": 0.5,
            "code_dim": 4, "cosine": True},
    "fsq": {"kind": "fsq", "dim": 8, "levels": [8, 5, 5, 5]},
    "lfq": {"kind": "lfq", "dim": 8, "bits": 6, "entropy_weight": 0.1, "diversity_weight": 1.0},
}
CLASSES = {"vq": VectorQuantizer, "rvq": ResidualVectorQuantizer, "fsq": FiniteScalarQuantizer,
           "lfq": LookupFreeQuantizer}
SIZES = {"vq": 32, "rvq": 16, "fsq": 1000, "lfq": 64}


def model_config(kind: str, **kw) -> dict:
    return {"modality": "image", "in_channels": 1, "channels": [8, 8], "num_res_blocks": 1, "factors": [4, 4],
            "quantizer": EXAMPLES[kind], **kw}


def make_vqvae(kind: str, seed: int = 0, **kw) -> VQVAE:
    torch.manual_seed(seed)
    return VQVAE(config_from_dict(VQVAEConfig, model_config(kind, **kw)))


def make_hvqvae(kind: str, seed: int = 0, **kw) -> HierarchicalVQVAE:
    torch.manual_seed(seed)
    values = {**model_config(kind), "hidden": 8, "factors": [[2, 2], [2, 2]], **kw}
    return HierarchicalVQVAE(config_from_dict(HierarchicalVQVAEConfig, values))


def train_steps(model, x: torch.Tensor, steps: int = 3) -> list[float]:
    """A few AdamW steps on ``x``; returns the losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(steps):
        out = model(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    return losses


# ---- the config ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", EXAMPLES)
def test_json_examples_build_their_kind(kind):
    config = config_from_dict(VQVAEConfig, model_config(kind))
    q = build_quantizer(config.quantizer)
    assert type(q) is CLASSES[kind] and q.codebook_size == SIZES[kind]
    assert config_from_dict(VQVAEConfig, config_to_dict(config)) == config  # what config.json holds loads back


def test_other_kinds_fields_are_errors():
    for values, field in [({"levels": [8, 5]}, "levels"), ({"kind": "fsq", "levels": [4], "bits": 3}, "bits"),
                          ({"kind": "lfq", "bits": 4, "num_stages": 2}, "num_stages"),
                          ({"quantizer_dropout": 0.5}, "quantizer_dropout"),
                          ({"entropy_weight": 0.5}, "entropy_weight")]:
        with pytest.raises(ValueError, match=f"QuantizerConfig.{field} applies to kind"):
            config_from_dict(QuantizerConfig, values)
    with pytest.raises(ValueError, match="kind must be one of vq, rvq, fsq, lfq"):
        QuantizerConfig(kind="pq")
    with pytest.raises(ValueError, match="each >= 2"):
        QuantizerConfig(kind="fsq", levels=(8, 1))
    with pytest.raises(ValueError, match="levels"):
        QuantizerConfig(kind="fsq")
    with pytest.raises(ValueError, match="at most"):
        QuantizerConfig(kind="fsq", levels=(16,) * 6)
    with pytest.raises(ValueError, match="num_stages"):
        QuantizerConfig(kind="rvq", num_stages=0)
    with pytest.raises(ValueError, match="quantizer_dropout"):
        QuantizerConfig(kind="rvq", num_stages=2, quantizer_dropout=1.5)
    with pytest.raises(ValueError, match="entropy_temperature"):
        QuantizerConfig(kind="lfq", bits=4, entropy_temperature=0.0)
    with pytest.raises(ValueError, match="expected a whole number"):
        config_from_dict(QuantizerConfig, {"kind": "fsq", "levels": [8, "5"]})


def test_implicit_codebook_sizes_replace_what_a_preset_gives():
    """A config file that switches the digits preset to FSQ keeps the preset's codebook_size: the levels decide."""
    base = preset("tokenizer-digits")["model"]
    values = merge(base, {"quantizer": {"kind": "fsq", "levels": [8, 8, 6]}})
    assert values["quantizer"]["codebook_size"] == 128
    config = config_from_dict(VQVAEConfig, values)
    assert config.quantizer.codebook_size == 384 and VQVAE(config).codebook_sizes == [384]
    assert QuantizerConfig(kind="lfq", bits=5, codebook_size=7).codebook_size == 32


def test_a_plain_vq_keeps_its_state_names_and_fingerprint_fields():
    """Old folders keep their fingerprints: the new fields sit at defaults that are left out of them, and a vq
    tokenizer's weights have the names they had."""
    model = make_vqvae("vq")
    assert isinstance(model.quantizer, VectorQuantizer)
    new_fields = {"kind", "num_stages", "quantizer_dropout", "levels", "bits", "entropy_weight", "diversity_weight",
                  "entropy_temperature", "entropy_group_bits"}
    assert not new_fields & set(non_default_fields(model.config)["quantizer"])
    assert sorted(k for k in model.state_dict() if k.startswith("quantizer.")) == [
        "quantizer.cluster_size", "quantizer.embed", "quantizer.embed_sum", "quantizer.initialized",
        "quantizer.restarts", "quantizer.skipped_updates"]


def test_hierarchy_codebook_sizes_follow_fsq_levels():
    model = make_hvqvae("fsq")
    assert model.codebook_sizes == [1000, 1000] and [q.codebook_size for q in model.quantizers] == [1000, 1000]
    assert make_hvqvae("fsq", codebook_sizes=[1000, 1000]).codebook_sizes == [1000, 1000]
    with pytest.raises(ValueError, match="levels/bits fix"):
        make_hvqvae("fsq", codebook_sizes=[512, 1000])
    with pytest.raises(ValueError, match="levels/bits fix"):
        make_hvqvae("lfq", codebook_sizes=[64, 32])
    rvq = make_hvqvae("rvq", codebook_sizes=[8, 16])  # residual stages take a size per level, as vq does
    assert [q.stages[0].codebook_size for q in rvq.quantizers] == [16, 8]  # quantizers are bottom first


# ---- one level ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fsq", "lfq", "rvq"])
def test_vqvae_trains_and_tokenizes(kind):
    model = make_vqvae(kind)
    x = torch.rand(4, 1, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = train_steps(model, x)
    assert all(map(lambda v: v == v and abs(v) < 1e3, losses)), losses
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items() if "quantizer" in k)
    model.train()
    out = model(x)
    parts = out.recon_loss + out.codebook_loss + out.commitment_loss + out.aux_loss
    assert torch.allclose(out.loss, parts) and (kind != "lfq" or float(out.aux_loss.detach()) != 0.0)
    model.eval()
    codes = model.encode(x)
    grid = (4, 4, 4) if kind != "rvq" else (4, 4, 4, 3)
    assert codes.shape == grid and 0 <= int(codes.min()) and int(codes.max()) < SIZES[kind]
    with torch.no_grad():
        out = model(x)
        recon = model.decode(codes)
    assert torch.equal(out.codes, codes) and torch.allclose(out.recon, recon, atol=1e-5)
    assert recon.shape == x.shape and torch.isfinite(recon).all()
    assert 0.0 < active_codes(model) <= 1.0


@pytest.mark.parametrize("kind", ["fsq", "lfq", "rvq"])
def test_vqvae_save_load_is_exact(kind, tmp_path):
    model = make_vqvae(kind)
    train_steps(model, torch.rand(4, 1, 16, 16), steps=2)
    model.eval().save_pretrained(tmp_path / "tok")
    loaded = VQVAE.from_pretrained(tmp_path / "tok")
    assert loaded.config == model.config and type(loaded.quantizer) is CLASSES[kind]
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.fingerprint() == model.fingerprint()
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert torch.equal(loaded.reconstruct(x), model.reconstruct(x))


@pytest.mark.parametrize("kind", ["fsq", "lfq", "rvq"])
@pytest.mark.parametrize("modality, shape, factors",
                         [("audio", (2, 1, 64), [8]), ("video", (2, 1, 4, 8, 8), [2, 4, 4])])
def test_every_modality(kind, modality, shape, factors):
    model = make_vqvae(kind, modality=modality, factors=factors).eval()
    x = torch.rand(shape) * (2 if modality == "audio" else 1) - (1 if modality == "audio" else 0)
    codes = model.encode(x)
    grid = tuple(s // f for s, f in zip(shape[2:], factors))
    assert codes.shape == (2, *grid) + ((3,) if kind == "rvq" else ())
    assert model.decode(codes).shape == shape
    train_steps(model, x, steps=1)


@pytest.mark.parametrize("kind", ["fsq", "lfq", "rvq"])
def test_bf16_autocast_training_forward(kind):
    """The convolutions run in bf16, the quantizer in fp32: the training forward and encode agree on the codes."""
    model = make_vqvae(kind).eval()
    x = torch.rand(4, 1, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        reference = model.encode(x)
        recon = model.decode(reference)
    assert torch.equal(out.codes, reference) and int(reference.max()) < SIZES[kind]
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32
    assert torch.isfinite(recon.float()).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.train()(x).loss
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# ---- residual codes in a tokenizer -------------------------------------------------------------------------------
def test_residual_vqvae_encodes_and_decodes_at_any_depth():
    model = make_vqvae("rvq")
    x = torch.rand(4, 1, 16, 16)
    train_steps(model, x, steps=2)
    model.eval()
    assert model.code_depth == 3 and model.code_shapes((1, 16, 16)) == [(4, 4)]
    full = model.encode(x)
    for k in (1, 2, 3):
        codes = model.encode(x, num_stages=k)
        assert codes.shape == (4, 4, 4, k) and torch.equal(codes, full[..., :k])
        recon = model.decode(codes)
        assert recon.shape == x.shape and torch.isfinite(recon).all()
        assert torch.equal(model.decode_levels(model.encode_levels(x, num_stages=k)), recon)
    assert not torch.allclose(model.decode(full[..., :1]), model.decode(full))  # the later stages add detail
    with pytest.raises(ValueError, match="1..3 stages"):
        model.decode(full[..., 0])  # residual codes need their depth axis
    with pytest.raises(ValueError, match="num_stages applies to residual"):
        make_vqvae("fsq").encode(x, num_stages=1)


@pytest.mark.parametrize("kind", ["fsq", "lfq"])
def test_implicit_codes_export_and_model_like_vq_codes(kind, tmp_path, tiny):
    """FSQ and LFQ codes are one integer per position: export, the token reader and a prior take them as they are."""
    from data.tokens import load_all
    from stage1_tokenizer.export import export_tokens

    tok = make_vqvae(kind).eval()
    ds = tiny.images(12)
    manifest = export_tokens(tok, ds, tmp_path / "tokens", batch_size=4, shard_size=8, progress=False)
    dtype = "uint16" if SIZES[kind] > 256 else "uint8"
    assert manifest["levels"] == [{"grid_shape": [4, 4], "codebook_size": SIZES[kind], "dtype": dtype}]
    codes, _, _ = load_all(tmp_path / "tokens", "train")
    with torch.no_grad():
        assert torch.equal(codes[0], tok.encode(torch.stack([ds[i]["x"] for i in range(12)])))
    prior = tiny.transformer(grid=(4, 4), vocab=SIZES[kind])
    with torch.no_grad():
        nll = prior.nll(codes[0][:2])
    assert nll.shape == (2,) and torch.isfinite(nll).all()


# ---- two levels --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fsq", "lfq", "rvq"])
def test_hierarchy_trains_and_tokenizes_at_every_level(kind, tmp_path):
    model = make_hvqvae(kind, level_dropout=0.5)
    x = torch.rand(4, 1, 16, 16)
    losses = train_steps(model, x)
    assert all(v == v for v in losses), losses
    out = model.train()(x)
    assert torch.allclose(out.loss, out.recon_loss + out.codebook_loss + out.commitment_loss + out.aux_loss)
    assert all(isinstance(q, CLASSES[kind]) for q in model.quantizers)
    model.eval()
    codes = model.encode_levels(x)
    depth = (3,) if kind == "rvq" else ()
    assert [tuple(c.shape) for c in codes] == [(4, 4, 4) + depth, (4, 8, 8) + depth]  # top first
    assert all(0 <= int(c.min()) and int(c.max()) < SIZES[kind] for c in codes)
    with torch.no_grad():
        out = model(x)
        recon = model.decode_levels(codes)
    assert all(torch.equal(a, b) for a, b in zip(out.codes, codes))
    assert torch.allclose(out.recon, recon, atol=1e-5) and recon.shape == x.shape
    if kind == "rvq":
        shallow = model.encode_levels(x, num_stages=1)
        assert [c.shape[-1] for c in shallow] == [1, 1] and model.decode_levels(shallow).shape == x.shape
    model.save_pretrained(tmp_path / "h")
    loaded = HierarchicalVQVAE.from_pretrained(tmp_path / "h")
    assert loaded.fingerprint() == model.fingerprint()
    assert all(torch.equal(a, b) for a, b in zip(loaded.encode_levels(x), codes))


# ---- train-tokenizer ---------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("fresh_accelerate")
@pytest.mark.parametrize("kind", ["fsq", "lfq", "rvq"])
def test_train_tokenizer_resumes_exactly(kind, tmp_path, fresh_accelerate):
    """The trainer's usage log and rank check work for every kind, and a resumed run (rvq: its dropout draws too)
    ends with the weights and buffers of an uninterrupted one."""
    from safetensors.torch import load_file

    from stage1_tokenizer import train

    config = {"model": model_config(kind), "data": "digits", "size": 16, "batch_size": 8, "image_every": 0,
              "log_every": 2, "checkpoint_every": 2, "max_steps": 4}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    whole = train.main(["--out", str(tmp_path / "whole"), "--quiet", "--config", str(path)])
    fresh_accelerate()
    train.main(["--out", str(tmp_path / "part"), "--quiet", "--config", str(path), "--max-steps", "2"])
    fresh_accelerate()
    resumed = train.main(["--out", str(tmp_path / "part"), "--quiet", "--resume", "--max-steps", "4"])
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), atol=1e-6, rtol=0), key
    if kind == "rvq":
        assert int(a["quantizer.dropout_draws"]) == 4  # one draw per training batch, resumed in step
    else:
        assert a["quantizer.usage.counts"].sum() > 0


# ---- DDP ---------------------------------------------------------------------------------------------------------
def _ddp_worker():
    """Runs in each of 2 forked processes (gloo) under accelerate.debug_launcher: each kind's VQ-VAE under DDP, as
    train-tokenizer prepares it, trains on different data per rank and ends with the same weights and buffers."""
    import torch

    from accelerate import Accelerator

    from conftest import reset_accelerate
    from stage1_tokenizer.quantizer import check_codebooks_in_sync

    reset_accelerate()
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    rank = acc.process_index
    for kind in ("fsq", "lfq", "rvq"):
        model = make_vqvae(kind)  # quantizer dropout and factorised stages for rvq: stages are skipped
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model, opt = acc.prepare(model, opt)
        model.train()
        g = torch.Generator().manual_seed(rank)
        for _ in range(4):
            loss = model(torch.rand(4, 1, 16, 16, generator=g) * (0.5 + rank)).loss
            opt.zero_grad()
            acc.backward(loss)
            opt.step()
        assert check_codebooks_in_sync(acc, model) == "codebooks in sync across 2 ranks", kind
        state = acc.unwrap_model(model).state_dict()
        for name, tensor in state.items():
            gathered = acc.gather(tensor.detach().double().reshape(1, -1))
            assert torch.equal(gathered[0], gathered[1]), (kind, name)
    acc.wait_for_everyone()


def test_every_kind_trains_under_ddp_with_identical_state():
    launch_two_processes(__file__, "_ddp_worker")


# ---- nothing read back to the host in training ---------------------------------------------------------
@pytest.mark.parametrize("kind", list(EXAMPLES))
def test_a_training_step_never_reads_the_device(kind):
    """The forward and backward of a training step of every kind (EMA updates, dead-code restarts, usage counts,
    the finiteness check, rvq's stage dropout) stay on the device: a host read empties a GPU's queue mid-step."""
    model = make_hvqvae(kind).train()
    x = torch.rand(4, 1, 16, 16)
    model(x).loss.backward()  # k-means init (not in these configs) may read the device until it has run
    quantizers = [m for m in model.modules() if isinstance(m, VectorQuantizer)]
    restarts = sum(int(q.restarts) for q in quantizers)
    with HostReads() as host:
        model(x).loss.backward()
    assert host.reads == []
    if kind == "vq":  # the premise: this step restarted dead codes (32 codes, 16 and 64 features a level)
        assert sum(int(q.restarts) for q in quantizers) > restarts


def test_a_non_finite_batch_is_skipped_without_reading_the_device():
    model = make_hvqvae("vq").train()
    x = torch.rand(4, 1, 16, 16)
    model(x)
    x[0, 0, 3, 3] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items() if "quantizer" in k and "skipped" not in k}
    with HostReads() as host:
        model(x)
    assert host.reads == []
    assert [int(q.skipped_updates) for q in model.quantizers] == [1, 1]
    for name, value in before.items():
        assert torch.equal(model.state_dict()[name], value), name


@pytest.mark.parametrize("kind", list(EXAMPLES))
def test_a_training_forward_compiles_to_one_graph(kind):
    """torch.compile (the trainer's dynamo_backend) sees the whole training forward as one graph, quantizer
    state updates included: no graph breaks, so CUDA graphs (dynamo_mode reduce-overhead) can replay all of it.
    (rvq's stage dropout draws its stage count on the host, outside the graph: that is its one break.)"""
    torch._dynamo.reset()
    quantizer = {**EXAMPLES[kind], "quantizer_dropout": 0.0} if kind == "rvq" else EXAMPLES[kind]
    explanation = torch._dynamo.explain(make_hvqvae(kind, quantizer=quantizer).train())(torch.rand(4, 1, 16, 16))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1
