"""Tests for pipelines.pipeline.TokgenPipeline with a tiny random VQ-VAE and a tiny TransformerPrior:
shape checks, save/load with fingerprints, sampling, likelihood, completion, class labels, from_runs."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipelines.pipeline import TokgenPipeline

INPUT = (1, 16, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


def images(n=3, seed=5) -> torch.Tensor:
    return torch.rand(n, *INPUT, generator=torch.Generator().manual_seed(seed))


def gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def pipe(tiny) -> TokgenPipeline:
    return tiny.pipeline(class_names=["a", "b", "c"])


# ---- construction ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, what", [({"grid": (4, 5)}, r"\(4, 5\)"), ({"grid": (8, 8)}, r"\(8, 8\)"),
                                          ({"vocab": 64}, "64 codes")])
def test_rejects_mismatched_prior(kwargs, what, tiny):
    with pytest.raises(ValueError, match="do not belong together") as err:
        TokgenPipeline(tiny.vqvae(), [tiny.transformer(num_classes=3, **kwargs)], INPUT)
    assert err.match(what)


def test_rejects_wrong_prior_count_and_input_shape(tiny):
    with pytest.raises(ValueError, match="level"):
        TokgenPipeline(tiny.vqvae(), [tiny.transformer(num_classes=3), tiny.transformer(num_classes=3)], INPUT)
    with pytest.raises(ValueError):
        TokgenPipeline(tiny.vqvae(), [tiny.transformer(num_classes=3)], (3, 16, 16))  # the tokenizer takes 1 channel


# ---- save / load -----------------------------------------------------------------------------------
def test_save_load_roundtrip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    assert sorted(p.name for p in (tmp_path / "pipe").iterdir()) == ["pipeline.json", "prior_0", "tokenizer"]
    meta = json.loads((tmp_path / "pipe" / "pipeline.json").read_text())
    assert meta["fingerprint"] == pipe.fingerprint()
    assert meta["tokenizer_fingerprint"] == pipe.tokenizer.fingerprint()
    assert meta["input_shape"] == list(INPUT) and meta["class_names"] == ["a", "b", "c"]
    loaded = TokgenPipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.fingerprint() == pipe.fingerprint()
    assert loaded.input_shape == INPUT and loaded.class_names == ["a", "b", "c"] and loaded.num_classes == 3
    a = pipe(batch_size=4, class_labels=[0, 1, 2, 0], generator=gen(3))
    b = loaded(batch_size=4, class_labels=[0, 1, 2, 0], generator=gen(3))
    assert torch.equal(a.codes[0], b.codes[0])
    assert torch.equal(a.samples, b.samples)
    # saving again over the same folder replaces it
    loaded.save_pretrained(tmp_path / "pipe")
    assert TokgenPipeline.from_pretrained(tmp_path / "pipe").fingerprint() == pipe.fingerprint()


@pytest.mark.parametrize("part", ["prior_0", "tokenizer"])
def test_tampered_weights_are_refused(pipe, tmp_path, part):
    pipe.save_pretrained(tmp_path / "pipe")
    file = tmp_path / "pipe" / part / "model.safetensors"
    state = load_file(str(file))
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[key] = state[key].clone()
    state[key].view(-1)[0] += 0.5
    save_file(state, str(file), metadata={"model_type": "transformer_prior" if part == "prior_0" else "vqvae"})
    with pytest.raises(ValueError, match="fingerprint"):
        TokgenPipeline.from_pretrained(tmp_path / "pipe")


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pipeline.json"):
        TokgenPipeline.from_pretrained(tmp_path)
    (tmp_path / "pipeline.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a tokgen pipeline"):
        TokgenPipeline.from_pretrained(tmp_path)


# ---- generation ------------------------------------------------------------------------------------
def test_codes_only_and_decoded(pipe):
    codes_out = pipe(batch_size=4, class_labels=[0, 1, 2, 0], generator=gen(1), output_type="codes")
    assert codes_out.samples is None
    (codes,) = codes_out.codes
    assert codes.shape == (4, 4, 4) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 32
    out = pipe(batch_size=4, class_labels=[0, 1, 2, 0], generator=gen(1))
    assert torch.equal(out.codes[0], codes)  # decoding does not change what is drawn
    assert out.samples.shape == (4, *INPUT) and out.samples.dtype == torch.float32
    assert float(out.samples.min()) >= 0 and float(out.samples.max()) <= 1
    assert torch.allclose(out.samples, pipe.tokenizer.decode(codes).clamp(0, 1))
    cache_free = pipe(batch_size=4, class_labels=[0, 1, 2, 0], generator=gen(1), use_cache=False,
                      output_type="codes")
    assert torch.equal(cache_free.codes[0], codes)
    with pytest.raises(ValueError, match="output_type"):
        pipe(batch_size=1, class_labels=[0], output_type="pil")


def test_one_label_is_broadcast(pipe):
    a = pipe(batch_size=3, class_labels=2, generator=gen(2), output_type="codes")
    b = pipe(batch_size=3, class_labels=[2, 2, 2], generator=gen(2), output_type="codes")
    assert torch.equal(a.codes[0], b.codes[0])


def test_class_label_errors(pipe, tiny):
    with pytest.raises(ValueError, match="class-conditional"):
        pipe(batch_size=2)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        pipe(batch_size=2, class_labels=[0, 3])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        pipe(batch_size=2, class_labels=[-1, 0])
    with pytest.raises(ValueError, match="3 class labels for a batch of 2"):
        pipe(batch_size=2, class_labels=[0, 1, 2])
    with pytest.raises(ValueError, match="class-conditional"):
        pipe.bits_per_dim(images(2))
    unconditional = tiny.pipeline(num_classes=0)
    assert unconditional(batch_size=2, generator=gen(0)).samples.shape == (2, *INPUT)
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(batch_size=2, class_labels=[0, 1])


# ---- likelihood and completion ----------------------------------------------------------------------
def test_likelihood_is_prior_nll_in_bits_per_dim(pipe):
    x, labels = images(3), torch.tensor([0, 2, 1])
    bpd = pipe.bits_per_dim(x, class_labels=labels)
    codes = pipe.tokenizer.encode(x)
    expected = pipe.priors[0].nll(codes, labels) / math.log(2) / math.prod(INPUT)
    assert bpd.shape == (3,)
    assert torch.allclose(bpd, expected, atol=1e-6)
    # another class gives another likelihood: the labels are used
    assert not torch.allclose(pipe.bits_per_dim(x, class_labels=[1, 0, 2]), bpd)


def test_complete_keeps_known_rows(pipe):
    x = images(2)
    known = pipe.encode(x)[0]
    out = pipe.complete(x, 0.5, class_labels=[1, 2], generator=gen(4))
    assert out.samples.shape == (2, *INPUT)
    assert float(out.samples.min()) >= 0 and float(out.samples.max()) <= 1
    (codes,) = out.codes
    assert torch.equal(codes[:, :2], known[:, :2])
    again = pipe.complete(x, 0.5, class_labels=[1, 2], generator=gen(4))
    assert torch.equal(again.codes[0], codes)
    assert torch.equal(pipe.complete(x, 1.0, class_labels=[1, 2]).codes[0], known)
    with pytest.raises(ValueError, match="known_fraction"):
        pipe.complete(x, 1.5, class_labels=[1, 2])


# ---- from_runs ---------------------------------------------------------------------------------------
def write_runs(tmp_path, fingerprint: str, tiny):
    tokenizer, prior = tiny.vqvae(), tiny.transformer(num_classes=3)
    tokenizer.save_pretrained(tmp_path / "tok_run" / "model")
    prior.save_pretrained(tmp_path / "prior_run" / "model")
    info = {"tokenizer_fingerprint": fingerprint, "level": 0, "tokens": "x", "input_shape": list(INPUT),
            "arch": "transformer"}
    (tmp_path / "prior_run" / "prior.json").write_text(json.dumps(info))
    return tokenizer, prior


def test_from_runs(tmp_path, tiny):
    tokenizer, prior = tiny.vqvae(), tiny.transformer(num_classes=3)
    write_runs(tmp_path, tokenizer.fingerprint(), tiny)
    pipe = TokgenPipeline.from_runs(tmp_path / "tok_run", [tmp_path / "prior_run"], class_names=["a", "b", "c"])
    assert pipe.input_shape == INPUT
    assert pipe.fingerprint() == TokgenPipeline(tokenizer, [prior], INPUT).fingerprint()
    # the model folder itself works too (prior.json beside it)
    pipe = TokgenPipeline.from_runs(tmp_path / "tok_run", [tmp_path / "prior_run" / "model"])
    assert pipe.input_shape == INPUT


def test_from_runs_rejects_other_tokenizer(tmp_path, tiny):
    write_runs(tmp_path, "0" * 64, tiny)
    with pytest.raises(ValueError, match="another tokenizer"):
        TokgenPipeline.from_runs(tmp_path / "tok_run", [tmp_path / "prior_run"])


# ---- longer than training: a sliding window over time (transformer), the whole grid (conv priors) ------
def video_pipe(tiny, null_class: bool = False) -> TokgenPipeline:
    """Clips (1, 4, 8, 8) -> codes (2, 2, 2): a window of 2 code steps, 2 frames each."""
    tokenizer = tiny.vqvae(modality="video", factors=(2, 4, 4), codebook_size=16)
    prior = tiny.transformer(None, grid=(2, 2, 2), vocab=16, num_classes=3, null_class=null_class, relative_bias=True)
    tiny.scale_up(prior)  # larger weights than the init, so the prefix visibly moves the next window
    return TokgenPipeline(tokenizer, [prior], (1, 4, 8, 8))


def test_sample_long_slides_a_window_over_time(tiny):
    from stage2_prior.sampling import sample

    pipe = video_pipe(tiny)
    labels = torch.tensor([0, 2])
    out = pipe.sample_long(10, batch_size=2, class_labels=labels, generator=gen(3))
    (codes,) = out.codes
    assert codes.shape == (2, 5, 2, 2)  # 10 frames = 5 code steps: windows of 2 steps, 1 kept each time
    assert out.samples.shape == (2, 1, 10, 8, 8)
    assert torch.allclose(out.samples, pipe.decode([codes]))
    # the first window is an ordinary sample; each later one is drawn after the last step of the one before
    g, prior = gen(3), pipe.priors[0]
    window = sample(prior, 2, labels, generator=g)
    assert torch.equal(codes[:, :2], window)
    for step in range(2, 5):
        window = sample(prior, 2, labels, generator=g, prefix=window[:, -1:].flatten(1))
        assert torch.equal(codes[:, step], window[:, 1])
    # the kept step conditions the next: the same draws after two different kept steps give other codes
    after = [sample(prior, 2, labels, generator=gen(5), prefix=w[:, -1:].flatten(1))[:, 1] for w in (codes[:, :2],
                                                                                                 codes[:, 2:4])]
    assert not torch.equal(codes[:, 1], codes[:, 3]) and not torch.equal(*after)
    for overlap in (0.0, 1.0):
        with pytest.raises(ValueError, match="overlap"):
            pipe.sample_long(10, 2, labels, overlap=overlap)


def test_sample_long_with_guidance(tiny):
    pipe = video_pipe(tiny, null_class=True)
    plain = pipe.sample_long(8, 2, [1, 1], generator=gen(0))
    guided = pipe.sample_long(8, 2, [1, 1], generator=gen(0), guidance=4.0)
    assert guided.samples.shape == plain.samples.shape == (2, 1, 8, 8, 8)
    assert not torch.equal(guided.codes[0], plain.codes[0])


def test_sample_long_conv_prior_takes_the_whole_grid(tiny):
    from stage2_prior.wavenet import WaveNetPrior, WaveNetPriorConfig

    tokenizer = tiny.vqvae(modality="audio", factors=(8,), codebook_size=16)
    prior = WaveNetPrior(WaveNetPriorConfig(grid_shape=(8,), vocab_size=16, channels=8, skip_channels=8,
                                       head_channels=8, layers_per_cycle=2, num_cycles=1)).eval()
    pipe = TokgenPipeline(tokenizer, [prior], (1, 64))
    out = pipe.sample_long(200, batch_size=3, generator=gen(1))
    assert out.samples.shape == (3, 1, 200) and out.codes[0].shape == (3, 25)
    assert float(out.samples.abs().max()) <= 1


def test_readme_python_example_runs(tmp_path, monkeypatch, tiny):
    """The README's "In Python" block, run as written against a pipeline shaped like the digits demo's; every
    line that documents a shape in a comment (``expr  # (a, b)`` or ``name = ...  # (a, b)``) has that shape."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = readme.split("### In Python", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    tokenizer = tiny.vqvae()
    prior = tiny.transformer(None, grid=(8, 8), num_classes=10, null_class=True)
    pipe = TokgenPipeline(tokenizer, [prior], (1, 32, 32), class_names=[str(c) for c in range(10)])
    pipe.save_pretrained(tmp_path / "demo_out" / "pipeline")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    documented = re.findall(r"^(\w[^#\n]*?)\s+# [^(\n]*\(([\d, ]+)\)", code, flags=re.M)
    assert len(documented) >= 7  # the block documents the shapes it promises
    for expression, shape in documented:
        name = expression.split("=", 1)[0].strip() if re.match(r"^\w+ =", expression) else expression
        value = eval(name, namespace)
        value = value[0] if isinstance(value, list) else value
        assert tuple(value.shape) == tuple(int(n) for n in shape.replace(" ", "").strip(",").split(",")), expression
