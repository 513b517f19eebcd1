"""tokgen compress / decompress / evaluate-prior with tiny random pipelines."""

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.codes import load_codes
from pipelines import bitstream
from pipelines import compress as C
from pipelines.bitstream import BitstreamError
from pipelines.cli import main as cli_main
from pipelines.pipeline import TokgenPipeline
from stage1_tokenizer.codec import encode_main

SIZE = 32  # inputs (1, 32, 32) -> code grids (8, 8) of 32 codes
HEADER = 11  # bytes for a 32x32 image (12 with a class label)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("pipes")
    out = {}
    for name, seed, classes in [("uncond", 0, 0), ("cond", 1, 3), ("other", 2, 0)]:
        tiny.pipeline(seed, num_classes=classes, size=SIZE, dim=32, num_layers=2).save_pretrained(root / name)
        out[name] = root / name
    return out


def images(n: int, seed: int, size: int = SIZE) -> torch.Tensor:
    """Random images with some structure (smooth blobs + noise), quantized to uint8 like files."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    x = (x + 0.3 * torch.rand(n, 1, size, size, generator=g)).clamp(0, 1)
    return torch.round(x * 255) / 255


def write_png(x: torch.Tensor, path: Path) -> Path:
    Image.fromarray((x[0].numpy() * 255).round().astype(np.uint8), mode="L").save(path)
    return path


def ns(**kw) -> argparse.Namespace:
    """The arguments of a command, as its parser would give them (device and dtype at their defaults)."""
    return argparse.Namespace(**{"device": "auto", "dtype": "fp32", **kw})


def compress_args(pipe, inp, out, report=None, class_label=None, size=None):
    return ns(pipeline=pipe, input=inp, out=out, report=report, class_label=class_label, size=size)


def decompress_args(pipe, file, out, codes_out=None, max_input_size=C.MAX_INPUT_SIZE):
    return ns(pipeline=pipe, file=file, out=out, codes_out=codes_out, max_input_size=max_input_size)


def test_cli_round_trip_matches_encode(pipes, tmp_path):
    """compress -> decompress gives exactly `tokgen encode`'s codes; size within the bound."""
    xs = images(6, seed=0)
    for i, x in enumerate(xs):
        png = write_png(x, tmp_path / f"in{i}.png")
        enc_codes = encode_main(args=ns(model=pipes["uncond"], input=png, out=tmp_path / f"enc{i}.npz", size=None))
        report = C.compress_main(args=compress_args(pipes["uncond"], png, tmp_path / f"f{i}.tkg",
                                                    tmp_path / f"r{i}.json"))
        blob = (tmp_path / f"f{i}.tkg").read_bytes()
        assert json.loads((tmp_path / f"r{i}.json").read_text()) == report
        for key in ("nll_bits", "nll_bits_quantized", "bits", "bytes", "header_bytes", "bits_per_dim", "psnr_db"):
            assert key in report
        assert report["bytes"] == len(blob) and report["bits"] == 8 * len(blob)
        assert report["header_bytes"] == HEADER
        assert report["bits_per_dim"] == pytest.approx(8 * len(blob) / SIZE**2)
        assert math.isfinite(report["psnr_db"])
        # the bound: compressed size <= model NLL x 1.01 + 16 bytes, header included
        assert len(blob) <= report["nll_bits"] / 8 * 1.01 + 16
        codes = C.decompress_main(args=decompress_args(pipes["uncond"], tmp_path / f"f{i}.tkg",
                                                       tmp_path / f"out{i}.png", tmp_path / f"dec{i}.npz"))
        assert torch.equal(codes[0], enc_codes[0][0])
        assert torch.equal(load_codes(tmp_path / f"dec{i}.npz")[0], load_codes(tmp_path / f"enc{i}.npz")[0])
        # both files hold the same layout, in the smallest dtype for the codebook
        assert np.load(tmp_path / f"dec{i}.npz")["level_0"].dtype == np.load(tmp_path / f"enc{i}.npz")["level_0"].dtype
        assert Image.open(tmp_path / f"out{i}.png").size == (SIZE, SIZE)


def test_library_batch_round_trips_and_sizes(pipes):
    pipe = TokgenPipeline.from_pretrained(pipes["uncond"])
    x = images(24, seed=1)
    blobs = C.compress_batch(pipe, x)
    assert len(blobs) == 24
    codes = pipe.encode(x)
    nll = pipe.nll_bits(codes).sum(1).numpy()
    # the float model's NLL agrees with the pipeline's own likelihood
    np.testing.assert_allclose(nll, pipe.bits_per_dim(x).double().numpy() * SIZE**2, rtol=1e-4)
    out = C.decompress_batch(pipe, blobs)
    for i, (blob, dec) in enumerate(zip(blobs, out)):
        assert torch.equal(dec.codes[0], codes[0][i])
        assert dec.input_shape == (1, SIZE, SIZE) and dec.class_label is None
        assert len(blob) <= nll[i] / 8 * 1.01 + 16
    # the same codes given as codes, and one at a time, give the same files
    assert C.compress_batch(pipe, codes) == blobs
    # a stream coded in a batch of 4 also decodes alone here (float64 logits; the CRC would catch a miss)
    four = C.compress_batch(pipe, x[:4])
    for i in range(4):
        assert torch.equal(C.decompress(pipe, four[i]).codes[0], codes[0][i])
    single = C.compress(pipe, x[5])
    assert torch.equal(C.decompress(pipe, single).codes[0], codes[0][5])


def test_class_conditional_round_trip(pipes, tmp_path):
    png = write_png(images(1, seed=3)[0], tmp_path / "in.png")
    reports = []
    for label in range(3):
        report = C.compress_main(args=compress_args(pipes["cond"], png, tmp_path / f"c{label}.tkg",
                                                    class_label=label))
        assert report["header_bytes"] == HEADER + 1 and report["class_label"] == label
        assert bitstream.peek_header((tmp_path / f"c{label}.tkg").read_bytes()).class_label == label
        codes = C.decompress_main(args=decompress_args(pipes["cond"], tmp_path / f"c{label}.tkg",
                                                       tmp_path / f"o{label}.png"))
        assert torch.equal(codes[0], encode_main(args=ns(model=pipes["cond"], input=png,
                                                         out=tmp_path / "e.npz", size=None))[0][0])
        assert report["bytes"] <= report["nll_bits"] / 8 * 1.01 + 16
        reports.append(report)
    assert len({r["nll_bits"] for r in reports}) == 3  # the label conditions the prior
    with pytest.raises(ValueError, match="class-conditional"):
        C.compress_main(args=compress_args(pipes["cond"], png, tmp_path / "x.tkg"))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        C.compress_main(args=compress_args(pipes["cond"], png, tmp_path / "x.tkg", class_label=3))
    with pytest.raises(ValueError, match="unconditional"):
        C.compress_main(args=compress_args(pipes["uncond"], png, tmp_path / "x.tkg", class_label=1))


def test_tampered_file_is_refused(pipes, tmp_path):
    png = write_png(images(1, seed=4)[0], tmp_path / "in.png")
    C.compress_main(args=compress_args(pipes["uncond"], png, tmp_path / "f.tkg"))
    blob = (tmp_path / "f.tkg").read_bytes()
    pipe = TokgenPipeline.from_pretrained(pipes["uncond"])
    variants = [blob[:-1], blob + b"\x00", blob[:5], b""]
    for pos in range(len(blob)):
        bad = bytearray(blob)
        bad[pos] ^= 0x01 if pos % 2 else 0x80
        variants.append(bytes(bad))
    for bad in variants:
        with pytest.raises(BitstreamError):
            C.decompress(pipe, bad)
    # through the CLI: a clear message, exit status 2, and no output file
    for pos in (len(blob) - 1, HEADER - 1, 3):
        bad = bytearray(blob)
        bad[pos] ^= 0x10
        (tmp_path / "bad.tkg").write_bytes(bytes(bad))
        with pytest.raises(BitstreamError, match="corrupt|another pipeline"):
            C.decompress_main(args=decompress_args(pipes["uncond"], tmp_path / "bad.tkg", tmp_path / "no.png"))
        assert not (tmp_path / "no.png").exists()
    bad = bytearray(blob)
    bad[-1] ^= 0x01
    (tmp_path / "bad.tkg").write_bytes(bytes(bad))
    with pytest.raises(BitstreamError, match="corrupt or was modified"):
        C.decompress_main(args=decompress_args(pipes["uncond"], tmp_path / "bad.tkg", tmp_path / "no.png"))
    (tmp_path / "png.tkg").write_bytes(png.read_bytes())
    with pytest.raises(BitstreamError, match="not a tokgen compressed file"):
        C.decompress_main(args=decompress_args(pipes["uncond"], tmp_path / "png.tkg", tmp_path / "no.png"))
    assert not (tmp_path / "no.png").exists()


def test_another_pipeline_is_refused(pipes, tmp_path, capsys):
    png = write_png(images(1, seed=5)[0], tmp_path / "in.png")
    C.compress_main(args=compress_args(pipes["uncond"], png, tmp_path / "f.tkg"))
    for other in ("other", "cond"):
        with pytest.raises(BitstreamError, match="compressed with another pipeline"):
            C.decompress_main(args=decompress_args(pipes[other], tmp_path / "f.tkg", tmp_path / "no.png"))
    assert not (tmp_path / "no.png").exists()
    rc = cli_main(["decompress", str(pipes["other"]), str(tmp_path / "f.tkg"), "--out", str(tmp_path / "no.png")])
    assert rc == 2
    assert "compressed with another pipeline" in capsys.readouterr().err
    assert not (tmp_path / "no.png").exists()


def test_input_of_another_size(pipes, tmp_path, tiny):
    """A transformer prior codes its own grid only; a convolutional prior codes any size (header shape)."""
    from stage2_prior.pixelcnn import GatedPixelCNNPriorConfig, GatedPixelCNNPrior

    png = write_png(images(1, seed=6, size=48)[0], tmp_path / "big.png")
    with pytest.raises(ValueError, match="--size"):
        C.compress_main(args=compress_args(pipes["uncond"], png, tmp_path / "x.tkg"))
    report = C.compress_main(args=compress_args(pipes["uncond"], png, tmp_path / "x.tkg", size=SIZE))
    assert report["input_shape"] == [1, SIZE, SIZE]

    pipe = tiny.pipeline(0, num_classes=0, size=SIZE, dim=32, num_layers=2)
    torch.manual_seed(3)
    conv = GatedPixelCNNPrior(GatedPixelCNNPriorConfig(grid_shape=(8, 8), vocab_size=32, channels=16, num_layers=3,
                                                  head_channels=16))
    TokgenPipeline(pipe.tokenizer, [conv], (1, SIZE, SIZE)).save_pretrained(tmp_path / "conv")
    report = C.compress_main(args=compress_args(tmp_path / "conv", png, tmp_path / "big.tkg"))
    assert report["input_shape"] == [1, 48, 48] and report["code_shapes"] == [[12, 12]]
    assert bitstream.peek_header((tmp_path / "big.tkg").read_bytes()).input_shape == (48, 48)
    assert report["bytes"] <= report["nll_bits"] / 8 * 1.01 + 16
    codes = C.decompress_main(args=decompress_args(tmp_path / "conv", tmp_path / "big.tkg", tmp_path / "big_out.png"))
    assert torch.equal(codes[0], encode_main(args=ns(model=tmp_path / "conv", input=png, out=tmp_path / "e.npz",
                                                     size=None))[0][0])
    assert Image.open(tmp_path / "big_out.png").size == (48, 48)


def test_decoder_out_of_step_is_refused(pipes):
    """Other numerics on the decoding side (simulated: perturbed coding weights) -> refused, no codes."""
    pipe = TokgenPipeline.from_pretrained(pipes["uncond"])
    x = images(3, seed=9)
    blobs = [C.compress(pipe, x[i]) for i in range(3)]
    coder = C.PriorCoder(pipe)
    with torch.no_grad():
        for prior in coder.priors_for(pipe.input_shape):
            prior.head.weight.mul_(1.5)
    for blob in blobs:
        with pytest.raises(BitstreamError, match="fail their check"):
            coder.decode([blob])


def _modality_pipeline(modality: str, tiny) -> TokgenPipeline:
    """image: 2-level hierarchical VQ-VAE + transformer priors (class-conditional); audio: 2-level + WaveNet
    priors; video: 1-level 3-D VQ-VAE + transformer."""
    from stage2_prior.wavenet import WaveNetPrior, WaveNetPriorConfig

    if modality == "video":
        tok = tiny.vqvae(modality="video", in_channels=3, factors=(2, 4, 4), codebook_size=16)
        shape = (3, 4, 16, 16)
    else:
        factors, shape = (((4, 4), (2, 2)), (1, 32, 32)) if modality == "image" else (((4,), (4,)), (1, 256))
        tok = tiny.hvqvae(modality=modality, factors=factors)
    grids, classes, priors = tok.code_shapes(shape), (2 if modality == "image" else 0), []
    for level, grid in enumerate(grids):
        cond = dict(cond_grid_shape=grids[level - 1], cond_vocab_size=16) if level else {}
        if modality == "audio":
            priors.append(WaveNetPrior(WaveNetPriorConfig(grid_shape=grid, vocab_size=16, channels=8, skip_channels=8,
                                                     head_channels=8, layers_per_cycle=3, num_cycles=1, **cond)))
        else:
            priors.append(tiny.transformer(None, grid=grid, vocab=16, num_classes=classes, **cond))
    return TokgenPipeline(tok, priors, shape)


@pytest.mark.parametrize("modality", ["image", "audio", "video"])
def test_every_modality_round_trips(modality, tiny):
    """Hierarchical pipelines code top level first, the lower one conditioned on the decoded upper codes."""
    pipe = _modality_pipeline(modality, tiny)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(8, *pipe.input_shape, generator=g)
    x = x * 2 - 1 if modality == "audio" else x
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1]) if pipe.num_classes else None
    codes = pipe.encode(x)
    blobs = C.compress_batch(pipe, x, labels)
    nll = pipe.nll_bits(codes, labels).sum(1).numpy()
    for i, dec in enumerate(C.decompress_batch(pipe, blobs)):
        assert all(torch.equal(a, b[i]) for a, b in zip(dec.codes, codes))
        assert dec.class_label == (None if labels is None else int(labels[i]))
        assert len(blobs[i]) <= nll[i] / 8 * 1.01 + 16
    single = C.compress(pipe, x[0], None if labels is None else int(labels[0]))
    assert all(torch.equal(a, b[0]) for a, b in zip(C.decompress(pipe, single).codes, codes))
    if len(codes) > 1:  # the lower level's probabilities depend on the upper codes
        shifted = [(codes[0] + 1) % 16, *codes[1:]]
        assert not np.allclose(pipe.nll_bits(shifted, labels)[:, 1].numpy(), pipe.nll_bits(codes, labels)[:, 1].numpy())


def test_audio_cli_round_trip(tmp_path, tiny):
    import soundfile as sf

    pipe = _modality_pipeline("audio", tiny)
    pipe.save_pretrained(tmp_path / "pipe")
    rng = np.random.default_rng(0)
    for i, n in enumerate((256, 512)):  # the WaveNet prior codes clips of any length
        sf.write(tmp_path / f"a{i}.wav", (rng.random(n) * 1.6 - 0.8).astype(np.float32), 16000)
        report = C.compress_main(args=compress_args(tmp_path / "pipe", tmp_path / f"a{i}.wav", tmp_path / f"a{i}.tkg"))
        assert report["input_shape"] == [1, n] and report["bytes"] <= report["nll_bits"] / 8 * 1.01 + 16
        codes = C.decompress_main(args=decompress_args(tmp_path / "pipe", tmp_path / f"a{i}.tkg",
                                                       tmp_path / f"o{i}.wav", tmp_path / f"c{i}.npz"))
        enc = encode_main(args=ns(model=tmp_path / "pipe", input=tmp_path / f"a{i}.wav", out=tmp_path / f"e{i}.npz",
                                  size=None))
        assert all(torch.equal(a, b[0]) for a, b in zip(codes, enc))
        assert [a.tolist() for a in load_codes(tmp_path / f"c{i}.npz")] == [b.tolist() for b in enc]
        assert sf.info(str(tmp_path / f"o{i}.wav")).frames == n


def test_evaluate_prior_writes_metrics(pipes, tmp_path):
    from pipelines.evaluate import main as evaluate_main

    data = tmp_path / "data"
    data.mkdir()
    for i, x in enumerate(images(7, seed=7)):
        write_png(x, data / f"{i}.png")
    out = tmp_path / "eval"
    metrics = evaluate_main(["--data", str(data), "--out", str(out), "--batch-size", "3", "--device", "cpu",
                             "--compress", "4", "--eval-fraction", "0", str(pipes["uncond"])])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for key in ("bits_per_token", "bits_per_token_per_level", "bits_per_dim", "bits_per_sample", "num_samples",
                "levels"):
        assert key in saved
    assert saved["num_samples"] == 7
    assert saved["bits_per_sample"] == pytest.approx(saved["bits_per_token"] * 64)
    assert saved["bits_per_dim"] == pytest.approx(saved["bits_per_sample"] / SIZE**2)
    assert saved["levels"][0]["bits_per_token"] == pytest.approx(saved["bits_per_token_per_level"][0])
    assert 3 < saved["bits_per_token"] < 7  # a random prior: about log2(32) = 5
    comp = saved["compression"]
    assert comp["num_samples"] == 4 and comp["round_trips_exact"] and comp["within_bound"]
    # class-conditional pipeline on unlabelled data: a clear error
    with pytest.raises(ValueError, match="unlabelled"):
        evaluate_main(["--data", str(data), "--out", str(out), "--device", "cpu", str(pipes["cond"])])
    # --data-options reach --data's reader (an option the folder reader lacks is refused by name), not --eval-data's
    base = ["--out", str(out), "--device", "cpu", "--data-options", '{"no_such_option": 1}', str(pipes["uncond"])]
    with pytest.raises(TypeError, match="no_such_option"):
        evaluate_main(["--data", str(data), "--eval-fraction", "0", *base])
    assert evaluate_main(["--data", "digits", "--eval-data", str(data), *base])["num_samples"] == 7


@pytest.mark.slow
def test_many_round_trips_slow(pipes):
    """200 held-out-like images, coded one at a time as the CLI does."""
    pipe = TokgenPipeline.from_pretrained(pipes["cond"])
    x = images(200, seed=8)
    codes = pipe.encode(x)
    labels = torch.arange(200) % 3
    nll = pipe.nll_bits(codes, labels).sum(1).numpy()
    for i in range(200):
        blob = C.compress(pipe, x[i], class_label=int(labels[i]))
        assert torch.equal(C.decompress(pipe, blob).codes[0], codes[0][i])
        assert len(blob) <= nll[i] / 8 * 1.01 + 16


def test_class_conditional_pipeline_compresses_without_a_class(tmp_path, tiny):
    """Priors trained with class dropout model p(codes) too: `tokgen compress` needs no --class then, the file
    says it was coded without one, and `decompress` needs no flag. --class takes a name or an index."""
    pipe = tiny.pipeline(3, num_classes=3, size=SIZE, class_names=["cat", "dog", "owl"], null_class=True)
    pipe.save_pretrained(tmp_path / "pipe")
    png = write_png(images(1, seed=9)[0], tmp_path / "in.png")
    report = C.compress_main(args=compress_args(tmp_path / "pipe", png, tmp_path / "none.tkg"))
    assert report["class_label"] is None and report["coded_without_class"]
    header = bitstream.peek_header((tmp_path / "none.tkg").read_bytes())
    assert header.class_label == bitstream.NULL_LABEL and report["header_bytes"] == HEADER  # no label byte
    codes = C.decompress_main(args=decompress_args(tmp_path / "pipe", tmp_path / "none.tkg", tmp_path / "o.png"))
    assert torch.equal(codes[0], encode_main(args=ns(model=tmp_path / "pipe", input=png, out=tmp_path / "e.npz",
                                                     size=None))[0][0])
    by_name = C.compress_main(args=compress_args(tmp_path / "pipe", png, tmp_path / "dog.tkg", class_label="dog"))
    by_index = C.compress_main(args=compress_args(tmp_path / "pipe", png, tmp_path / "1.tkg", class_label="1"))
    assert by_name["class_label"] == by_index["class_label"] == 1 and by_name["nll_bits"] == by_index["nll_bits"]
    assert (tmp_path / "dog.tkg").read_bytes() == (tmp_path / "1.tkg").read_bytes()
    assert by_name["nll_bits"] != report["nll_bits"]  # the class is what the prior is conditioned on
    for bad, message in (("emu", "unknown class 'emu': one of cat, dog, owl"), ("7", r"not in \[0, 3\)")):
        with pytest.raises(ValueError, match=message):
            C.compress_main(args=compress_args(tmp_path / "pipe", png, tmp_path / "x.tkg", class_label=bad))
    # a file coded without a class cannot be read by a pipeline whose priors have no "no class" label
    blob = bitstream.pack(TokgenPipeline.from_pretrained(tmp_path / "pipe").fingerprint(), (SIZE, SIZE), b"\0" * 8,
                          bitstream.NULL_LABEL)
    assert bitstream.read(blob).header.class_label == bitstream.NULL_LABEL
