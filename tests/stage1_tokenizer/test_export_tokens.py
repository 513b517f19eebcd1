"""Tests for stage1_tokenizer.export (tokgen export-tokens), data.token_writer and data.tokens (the reader)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from stage1_tokenizer import VQVAE
from data.tokens import safe_key
from stage1_tokenizer.export import export_tokens
from data.tokens import TokenDataset, check_tokenizer, collate_tokens, load_all, read_manifest

N = 50


NOISE = 0.05  # torch-RNG noise on every item, as a random training crop would add


def as_dict(path, split="train"):
    codes, labels, keys = load_all(path, split)
    return {k: (tuple(c[i].tolist() for c in codes), int(labels[i])) for i, k in enumerate(keys)}


def test_export_roundtrip(tmp_path, tiny):
    tok, ds = tiny.vqvae(codebook_size=64), tiny.images(noise=0.0)
    manifest = export_tokens(tok, ds, tmp_path / "tok", batch_size=8, shard_size=16, progress=False)
    assert manifest == read_manifest(tmp_path / "tok")
    assert manifest["format"] == "tokgen-tokens" and manifest["version"] == 2
    assert manifest["tokenizer_fingerprint"] == tok.fingerprint()
    assert manifest["modality"] == "image" and manifest["input_shape"] == [1, 16, 16]
    assert manifest["levels"] == [{"grid_shape": [4, 4], "codebook_size": 64, "dtype": "uint8"}]
    assert manifest["num_samples"] == N and manifest["num_classes"] == 5
    assert manifest["splits"]["train"]["num_samples"] == N
    assert manifest["splits"]["train"]["shards"] == [f"train-00-{i:06d}.tar" for i in range(4)]
    assert manifest["skipped"] == [] and manifest["export_seconds"] >= 0

    codes, labels, keys = load_all(tmp_path / "tok", "train")
    with torch.no_grad():
        expected = tok.encode(torch.stack([ds[i]["x"] for i in range(N)]))
    assert len(codes) == 1 and codes[0].dtype == torch.long and torch.equal(codes[0], expected)
    assert labels.tolist() == ds.labels
    assert keys == [f"dir/img.{i:03d}.png" for i in range(N)]

    with tarfile.open(tmp_path / "tok" / "train-00-000000.tar") as tar:
        names = tar.getnames()
        assert names[:2] == ["dir_img_000_png.codes.npz", "dir_img_000_png.meta.json"]
        arr = np.load(io.BytesIO(tar.extractfile(names[0]).read()), allow_pickle=False)["level_0"]
        meta = json.loads(tar.extractfile(names[1]).read())
    assert arr.dtype == np.uint8 and arr.shape == (1, 4, 4)
    assert meta == {"label": 0, "key": "dir/img.000.png", "index": 0}
    assert safe_key("a.b/c", 3) == "a_b_c"


def test_interrupted_export_resumes_exactly(tmp_path, tiny):
    tok, n = tiny.vqvae(codebook_size=64), 24
    ref = tmp_path / "ref"
    export_tokens(tok, tiny.images(n, noise=NOISE), ref, batch_size=4, shard_size=8, progress=False)

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated kill"):
        export_tokens(tok, tiny.images(n, fail_after=13, noise=NOISE), out, batch_size=4, shard_size=8, progress=False)
    assert (out / "train-00-000000.tar").is_file()
    assert (out / "train-00-000001.tar.tmp").is_file()
    assert not (out / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="resume"):
        read_manifest(out)
    first = (out / "train-00-000000.tar").stat().st_mtime_ns

    resumed = tiny.images(n, noise=NOISE)
    export_tokens(tok, resumed, out, batch_size=4, shard_size=8, progress=False)
    assert resumed.calls == n - 8  # the complete shard was not encoded again
    assert (out / "train-00-000000.tar").stat().st_mtime_ns == first
    assert not list(out.glob("*.tmp"))
    _, _, keys = load_all(out)
    assert len(keys) == len(set(keys)) == n
    assert as_dict(out) == as_dict(ref)

    with pytest.raises(ValueError, match="shard_size"):  # resuming with other settings is refused
        export_tokens(tok, tiny.images(n, noise=NOISE), out, batch_size=4, shard_size=4, progress=False)


def test_fingerprint_mismatch(tmp_path, tiny):
    tok, other = tiny.vqvae(0, codebook_size=64), tiny.vqvae(1, codebook_size=64)
    assert tok.fingerprint() != other.fingerprint()
    export_tokens(tok, tiny.images(10, noise=NOISE), tmp_path, batch_size=4, shard_size=8, progress=False)
    manifest = read_manifest(tmp_path)
    check_tokenizer(manifest, tok.fingerprint())
    with pytest.raises(ValueError, match="re-export") as err:
        check_tokenizer(manifest, other.fingerprint())
    assert tok.fingerprint()[:12] in str(err.value) and other.fingerprint()[:12] in str(err.value)
    with pytest.raises(ValueError, match="made by tokenizer"):
        export_tokens(other, tiny.images(10, noise=NOISE), tmp_path, batch_size=4, shard_size=8, progress=False)


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a tokgen token manifest"):
        read_manifest(tmp_path)


def test_damaged_shards_stop_the_stream_with_the_file_named(tmp_path, tiny):
    """A code outside the codebook (a foreign or damaged shard) and a cut-off shard: one ValueError each, from the
    streaming reader and from load_all, never an IndexError deep in a prior."""
    tok, ds = tiny.vqvae(codebook_size=64), tiny.images(noise=0.0)
    export_tokens(tok, ds, tmp_path / "tok", batch_size=8, shard_size=16, progress=False)
    manifest = read_manifest(tmp_path / "tok")
    manifest["levels"][0]["codebook_size"] = 2  # the shards now hold codes the manifest says cannot exist
    (tmp_path / "tok" / "manifest.json").write_text(json.dumps(manifest))
    for read in (lambda: list(TokenDataset(tmp_path / "tok", shuffle=0)), lambda: load_all(tmp_path / "tok")):
        with pytest.raises(ValueError, match=r"codes outside \[0, 2\).*corrupt"):
            read()
    manifest["levels"][0]["codebook_size"] = 64
    (tmp_path / "tok" / "manifest.json").write_text(json.dumps(manifest))
    shard = tmp_path / "tok" / "train-00-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(ValueError, match="train-00-000001.tar is truncated"):
        list(TokenDataset(tmp_path / "tok", shuffle=0))


def test_two_splits_and_merge(tmp_path, tiny):
    tok = tiny.vqvae(codebook_size=64)
    export_tokens(tok, {"train": tiny.images(12, noise=NOISE), "eval": tiny.images(6, noise=NOISE)}, tmp_path / "a", batch_size=4,
                  shard_size=8, progress=False)
    m = read_manifest(tmp_path / "a")
    assert {k: v["num_samples"] for k, v in m["splits"].items()} == {"eval": 6, "train": 12}
    assert m["num_samples"] == 18 and m["splits"]["eval"]["shards"] == ["eval-00-000000.tar"]

    export_tokens(tok, tiny.images(12, noise=NOISE), tmp_path / "b", batch_size=4, shard_size=8, progress=False)
    export_tokens(tok, tiny.images(7, noise=NOISE), tmp_path / "b", split="eval", batch_size=4, shard_size=8, progress=False)
    m = read_manifest(tmp_path / "b")  # exporting eval later keeps train
    assert {k: v["num_samples"] for k, v in m["splits"].items()} == {"eval": 7, "train": 12}
    assert len(load_all(tmp_path / "b", "eval")[2]) == 7
    with pytest.raises(ValueError, match="dataset_size"):  # another eval set over the old one: refused
        export_tokens(tok, tiny.images(6, noise=NOISE), tmp_path / "b", split="eval", batch_size=4, shard_size=8,
                      progress=False)
    with pytest.raises(ValueError, match="no 'test' split"):
        load_all(tmp_path / "b", "test")


def test_token_dataset_process_split(tmp_path, tiny):
    tok = tiny.vqvae(codebook_size=64)
    export_tokens(tok, tiny.images(noise=NOISE), tmp_path, batch_size=8, shard_size=8, progress=False)
    everything = set(load_all(tmp_path)[2])
    parts = []
    for rank in range(2):
        ds = TokenDataset(tmp_path, "train", shuffle=0, process_index=rank, num_processes=2)
        keys = [s["key"] for s in ds]
        assert len(keys) == len(ds) == len(set(keys))
        parts.append(set(keys))
    assert not parts[0] & parts[1] and parts[0] | parts[1] == everything

    # by shard: processes read disjoint shards (and each all of its own)
    parts = [{s["key"] for s in TokenDataset(tmp_path, "train", shuffle=0, process_index=r, num_processes=2,
                                             split_by="shard")} for r in range(2)]
    assert not parts[0] & parts[1] and parts[0] | parts[1] == everything
    with pytest.raises(ValueError, match="split_by"):
        TokenDataset(tmp_path, split_by="rows")

    # fewer shards than processes: split by sample index instead
    parts = [{s["key"] for s in TokenDataset(tmp_path, shuffle=0, process_index=r, num_processes=9)}
             for r in range(9)]
    assert sum(map(len, parts)) == N and set().union(*parts) == everything

    ds = TokenDataset(tmp_path, shuffle=16, seed=3)
    ds.set_epoch(1)
    a = [s["key"] for s in ds]
    b = [s["key"] for s in ds]
    ds.set_epoch(2)
    c = [s["key"] for s in ds]
    assert a == b and a != c and sorted(a) == sorted(c) == sorted(everything)

    batch = next(iter(DataLoader(ds, batch_size=5, collate_fn=collate_tokens, num_workers=2)))
    assert batch["codes"][0].shape == (5, 4, 4) and batch["codes"][0].dtype == torch.long
    assert batch["label"].shape == (5,) and len(batch["key"]) == 5
    assert ds.grid_shapes == [(4, 4)] and ds.codebook_sizes == [64] and ds.num_classes == 5


def _export_worker(model_dir, out_dir):
    """Runs in each debug_launcher process (module level so it can be pickled)."""
    from accelerate import Accelerator

    from conftest import TinyImages  # the tests' shared dataset (the launcher puts tests/ on the path)

    acc = Accelerator(cpu=True)
    tok = VQVAE.from_pretrained(model_dir)
    export_tokens(tok, TinyImages(noise=NOISE), out_dir, batch_size=4, shard_size=8, accelerator=acc, progress=False)


def _launch(model_dir, out_dir):
    from accelerate import debug_launcher

    debug_launcher(_export_worker, args=(model_dir, out_dir), num_processes=2)


def test_multiprocess_export(tmp_path, tiny):
    tok = tiny.vqvae(codebook_size=64)
    tok.save_pretrained(tmp_path / "model")
    tok = VQVAE.from_pretrained(tmp_path / "model")
    export_tokens(tok, tiny.images(noise=NOISE), tmp_path / "one", batch_size=4, shard_size=8, progress=False)
    # debug_launcher forks: a fork of this pytest process, whose OpenMP pool and other threads have
    # run earlier tests, can deadlock, so the launcher runs from a fresh interpreter.
    code = (f"import sys; sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]; "
            "import test_export_tokens as t; "
            f"t._launch({str(tmp_path / 'model')!r}, {str(tmp_path / 'two')!r})")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    m = read_manifest(tmp_path / "two")
    shards = m["splits"]["train"]["shards"]
    assert {s.split("-")[1] for s in shards} == {"00", "01"}
    assert m["num_samples"] == N
    _, _, keys = load_all(tmp_path / "two")
    assert len(keys) == len(set(keys)) == N
    assert as_dict(tmp_path / "two") == as_dict(tmp_path / "one")


def test_cli_image_folder(tmp_path, tiny):
    from PIL import Image

    from stage1_tokenizer.export import main

    folder = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (folder / c).mkdir(parents=True)
        for i in range(3):
            arr = (np.random.default_rng(i).random((20, 20)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(folder / c / f"{i}.png")
    tiny.vqvae(codebook_size=64).save_pretrained(tmp_path / "model")
    manifest = main([str(tmp_path / "model"), "--data", str(folder), "--out", str(tmp_path / "tok"),
                     "--split", "train", "--size", "16", "--batch-size", "4", "--shard-size", "4", "--quiet",
                     "--eval-fraction", "0"])
    assert manifest["num_samples"] == 6 and manifest["num_classes"] == 2
    codes, labels, keys = load_all(tmp_path / "tok")
    assert codes[0].shape == (6, 4, 4) and sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert keys[0] == "cat/0.png"
    # both splits of a folder: held-out files (every tile of them) apart from the training files, recorded
    manifest = main([str(tmp_path / "model"), "--data", str(folder), "--out", str(tmp_path / "both"),
                     "--size", "16", "--batch-size", "4", "--shard-size", "4", "--quiet", "--eval-fraction", "0.3"])
    train_files = set(load_all(tmp_path / "both", "train")[2])
    eval_files = {key.split("@")[0] for key in load_all(tmp_path / "both", "eval")[2]}
    assert train_files and eval_files and train_files.isdisjoint(eval_files)
    assert len(train_files | eval_files) == 6
    read = manifest["splits"]["eval"]["read_from"]
    assert read["eval_fraction"] == 0.3 and sorted(read["files"]) == sorted(eval_files)


def test_skipped_inputs_are_reported(tmp_path, tiny):
    class WithSkips(tiny.images):
        def __getitem__(self, i: int) -> dict:
            sample = super().__getitem__(i)
            return {**sample, "skipped": [f"bad/{i}.png"] if i in (3, 40) else []}

    with pytest.warns(UserWarning, match="2 unreadable inputs"):
        m = export_tokens(tiny.vqvae(codebook_size=64), WithSkips(noise=NOISE), tmp_path, batch_size=8,
                          shard_size=16, progress=False)
    assert m["skipped"] == ["bad/3.png", "bad/40.png"]


class Killed(torch.utils.data.IterableDataset):
    def __init__(self, dataset, after: int):
        self.dataset, self.after = dataset, after

    def __iter__(self):
        for n, sample in enumerate(self.dataset):
            if n == self.after:
                raise RuntimeError("simulated kill")
            yield sample


def test_iterable_source_resume(tmp_path, tiny):
    import webdataset as wds
    from PIL import Image

    from data import build_dataset

    for s in range(3):
        with wds.TarWriter(str(tmp_path / f"img-{s:06d}.tar")) as w:
            for i in range(7):
                arr = (np.random.default_rng(s * 10 + i).random((20, 20)) * 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="png")
                w.write({"__key__": f"s{s}_{i}", "png": buf.getvalue(), "cls": str(i % 3).encode()})
    source = str(tmp_path / "img-{000000..000002}.tar")
    make = lambda: build_dataset(source, split="train", size=16, channels=1, seed=5, eval_fraction=0)  # noqa: E731
    tok = tiny.vqvae(codebook_size=64)
    export_tokens(tok, make(), tmp_path / "ref", batch_size=4, shard_size=5, seed=5, progress=False)
    with pytest.raises(RuntimeError, match="simulated kill"):
        export_tokens(tok, Killed(make(), 12), tmp_path / "out", batch_size=4, shard_size=5, seed=5,
                      progress=False)
    assert (tmp_path / "out" / "train-00-000001.tar").is_file()
    export_tokens(tok, make(), tmp_path / "out", batch_size=4, shard_size=5, seed=5, progress=False)
    assert not list((tmp_path / "out").glob("*.tmp"))
    assert read_manifest(tmp_path / "out")["splits"]["train"]["num_samples"] == 21
    assert as_dict(tmp_path / "out") == as_dict(tmp_path / "ref")


def test_export_of_the_first_stages_of_a_residual_quantizer(tmp_path, tiny):
    """``num_stages`` (``--stages``) exports stacks of the first k stages: the manifest says depth k, the codes are the
    tokenizer's at k stages; the folder refuses another depth, and only residual quantizers take it, in range."""
    tok = tiny.vqvae(codebook_size=16, quantizer={"kind": "rvq", "num_stages": 3})
    ds = tiny.images(noise=0.0)
    manifest = export_tokens(tok, ds, tmp_path / "tok", batch_size=8, shard_size=64, progress=False, num_stages=2)
    assert manifest["levels"][0]["depth"] == 2 and manifest["levels"][0]["stage_codebook_sizes"] == [16, 16]
    codes, _, _ = load_all(tmp_path / "tok", "train")
    with torch.no_grad():
        expected = tok.encode_levels(torch.stack([ds[i]["x"] for i in range(N)]), num_stages=2)[0]
    assert codes[0].shape == (N, 4, 4, 2) and torch.equal(codes[0], expected)
    with pytest.raises(ValueError, match="depth 2"):  # the same tokenizer at all 3 stages into the same folder
        export_tokens(tok, {"eval": ds}, tmp_path / "tok", batch_size=8, progress=False)
    for bad in (0, 4):
        with pytest.raises(ValueError, match=r"1\.\.3"):
            export_tokens(tok, ds, tmp_path / f"bad{bad}", progress=False, num_stages=bad)
    with pytest.raises(ValueError, match="residual"):
        export_tokens(tiny.vqvae(codebook_size=16), ds, tmp_path / "vq", progress=False, num_stages=1)
