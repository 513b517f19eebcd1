"""Tests for the image readers in ``data`` (folder, digits, photos, webdataset)."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from data import PHOTOS_EVAL, PHOTOS_TRAIN, build_image_dataset, collate_samples, load_photo


def _check_sample(s, channels=3, size=32):
    assert set(s) == {"x", "label", "key", "skipped"}
    assert s["x"].shape == (channels, size, size) and s["x"].dtype == torch.float32
    assert 0.0 <= s["x"].min() and s["x"].max() <= 1.0
    assert isinstance(s["label"], int) and isinstance(s["key"], str) and isinstance(s["skipped"], list)


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- folder


@pytest.fixture
def image_tree(tmp_path):
    """root/{cats,dogs}/... with mixed sizes and modes, plus a corrupt and an empty file."""
    (tmp_path / "cats" / "deep").mkdir(parents=True)
    (tmp_path / "dogs").mkdir()
    Image.fromarray(_rgb(40, 60)).save(tmp_path / "cats" / "a_rgb.jpg")
    Image.fromarray(_rgb(50, 37, 1)[..., 0]).save(tmp_path / "cats" / "deep" / "b_gray.PNG")
    rgba = np.zeros((33, 45, 4), np.uint8)  # fully transparent -> white after compositing
    Image.fromarray(rgba).save(tmp_path / "dogs" / "c_rgba.png")
    Image.fromarray(np.full((64, 48), 32768, np.uint16)).save(tmp_path / "dogs" / "d_16bit.png")
    Image.fromarray(_rgb(32, 32, 2)).convert("P").save(tmp_path / "dogs" / "e_palette.gif")
    (tmp_path / "dogs" / "f_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (tmp_path / "dogs" / "g_empty.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_folder_modes_labels_and_skips(image_tree):
    # train items are one per file (decoded when read); held-out ones are tiles (test_folder_held_out_tiles)
    ds = build_image_dataset(str(image_tree), split="train", size=32, eval_fraction=0)
    assert ds.classes == ["cats", "dogs"]
    assert len(ds) == 7
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = {s["key"]: s for s in (ds[i] for i in range(len(ds)))}
    for s in samples.values():
        _check_sample(s)
    assert samples["cats/deep/b_gray.PNG"]["label"] == 0
    assert samples["dogs/c_rgba.png"]["label"] == 1
    assert torch.allclose(samples["dogs/c_rgba.png"]["x"], torch.ones(3, 32, 32))
    gray = samples["dogs/d_16bit.png"]["x"]
    assert abs(gray.mean().item() - 0.5) < 0.01  # 16-bit mid-gray, not clipped to 1.0
    # bad files (indices 5, 6) are replaced by the next readable one, wrapping to index 0
    bad = [str(image_tree / "dogs" / n) for n in ("f_corrupt.png", "g_empty.jpg")]
    messages = " ".join(str(w.message) for w in caught)
    assert all(f"skipping unreadable image {p}" in messages for p in bad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = collate_samples([ds[i] for i in range(len(ds))])
    assert batch["key"][5] == batch["key"][6] == "cats/a_rgb.jpg"
    assert batch["x"].shape == (7, 3, 32, 32) and batch["label"].dtype == torch.long
    assert batch["skipped"] == bad + bad[1:] and batch["label"].tolist()[:3] == [0, 0, 1]


def test_folder_held_out_split_is_disjoint_stable_and_tiled(image_tree, tmp_path_factory):
    """Files are held out by a hash of their path: the two splits never share a file, keep their files when others
    are added, hold out at least one readable file, and the held-out part is every tile of its pictures."""
    import warnings

    from data.folders import path_hash

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train = build_image_dataset(str(image_tree), split="train", size=16, eval_fraction=0.3)
        held = build_image_dataset(str(image_tree), split="eval", size=16, eval_fraction=0.3)
    assert set(train.files).isdisjoint(held.files) and len(train.files) + len(held.files) == 7
    assert held.files == sorted(f for f in held.files) and train.classes == held.classes == ["cats", "dogs"]
    assert all(path_hash(f) < 0.3 for f in held.files) or len(held.files) == 1
    # the tiles of each held-out picture cover it: a 40x60 picture at size 16 gives 2 x 3 tiles
    sizes = {"cats/a_rgb.jpg": (40, 60), "cats/deep/b_gray.PNG": (50, 37), "dogs/c_rgba.png": (33, 45),
             "dogs/d_16bit.png": (64, 48), "dogs/e_palette.gif": (32, 32)}
    expected = sum((sizes[f][0] // 16) * (sizes[f][1] // 16) for f in held.files if f in sizes)
    assert len(held) == expected > 0 and all(held[i]["x"].shape == (3, 16, 16) for i in range(len(held)))
    assert len({held[i]["key"] for i in range(len(held))}) == len(held)  # "file@y_x": one key per tile
    # a fraction too small for this folder still holds out one readable file, and train keeps the rest
    tiny = build_image_dataset(str(image_tree), split="eval", size=16, eval_fraction=1e-9)
    assert len(tiny.files) >= 1 and len(tiny) > 0
    # one file cannot be split
    single = tmp_path_factory.mktemp("single")
    Image.fromarray(_rgb(20, 20)).save(single / "only.png")
    with pytest.raises(ValueError, match="cannot be split"):
        build_image_dataset(str(single), split="eval", eval_fraction=0.1)


def test_folder_train_crops_and_gray(image_tree):
    ds = build_image_dataset(str(image_tree), split="train", size=16, channels=1, eval_fraction=0)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = ds[0]["x"]
        torch.manual_seed(0)
        again = ds[0]["x"]
    _check_sample(ds[1], channels=1, size=16)
    assert torch.equal(first, again)  # crops come from the global torch RNG


def test_folder_flat_has_no_labels(tmp_path):
    Image.fromarray(_rgb(20, 30)).save(tmp_path / "x.png")
    ds = build_image_dataset(str(tmp_path), size=8, eval_fraction=0)
    assert ds.classes == [] and ds[0]["label"] == -1 and ds[0]["key"] == "x.png"


def test_folder_all_corrupt_raises(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"nope")
    ds = build_image_dataset(str(tmp_path), eval_fraction=0)
    with pytest.warns(UserWarning, match="bad.png"), pytest.raises(RuntimeError):
        ds[0]


def test_empty_folder_and_unknown_source(tmp_path):
    with pytest.raises(ValueError, match="no images found"):
        build_image_dataset(str(tmp_path))
    with pytest.raises(ValueError, match="built-in name.*directory.*tar"):
        build_image_dataset("no/such/thing")


# ---------------------------------------------------------------- built-ins


@pytest.mark.parametrize("channels", [1, 3])
def test_digits(channels):
    train = build_image_dataset("digits", split="train", channels=channels)
    held = build_image_dataset("digits", split="eval", channels=channels)
    assert len(held) == 300 and len(train) == 1797 - 300
    _check_sample(held[5], channels=channels)
    train_keys = {train[i]["key"] for i in range(len(train))}
    eval_keys = [held[i]["key"] for i in range(len(held))]
    assert train_keys.isdisjoint(eval_keys) and eval_keys[:2] == ["digits/0", "digits/6"]
    assert {held[i]["label"] for i in range(len(held))} == set(range(10))
    assert torch.equal(held[3]["x"], build_image_dataset("digits", split="eval", channels=channels)[3]["x"])


def test_photos_offline_and_splits():
    assert set(PHOTOS_EVAL).isdisjoint(PHOTOS_TRAIN)
    train = build_image_dataset("photos", split="train", size=48, crops_per_epoch=10)
    assert len(train) == 10
    samples = [train[i] for i in range(10)]
    for s in samples:
        _check_sample(s, size=48)
        assert s["key"].split("/")[1] in PHOTOS_TRAIN and s["label"] == -1
    held = build_image_dataset("photos", split="eval", size=64)
    again = build_image_dataset("photos", split="eval", size=64)
    assert len(held) > 10 and all(torch.equal(held[i]["x"], again[i]["x"]) for i in (0, 7, len(held) - 1))
    assert {held[i]["key"].split("/")[1] for i in range(len(held))} == set(PHOTOS_EVAL)
    whole = load_photo(PHOTOS_EVAL[0])
    assert whole.shape[0] == 3 and min(whole.shape[1:]) > 64
    assert torch.equal(held[0]["x"], whole[:, :64, :64])


# ---------------------------------------------------------------- webdataset


@pytest.fixture
def shards(tmp_path):
    """3 shards x 4 samples (png + cls); returns (brace pattern, {key: label})."""
    import webdataset as wds

    expected = {}
    with wds.ShardWriter(str(tmp_path / "train-%06d.tar"), maxcount=4, verbose=0) as sink:
        for i in range(12):
            key = f"s{i:03d}"
            expected[key] = i % 5
            img = Image.fromarray(_rgb(24 + i, 40, i))
            sink.write({"__key__": key, "png": img, "cls": i % 5})
    return str(tmp_path / "train-{000000..000002}.tar"), expected


def test_webdataset_reads_all_once(shards):
    pattern, expected = shards
    ds = build_image_dataset(pattern, split="eval", size=16, eval_fraction=0)
    samples = list(ds)
    assert {s["key"]: s["label"] for s in samples} == expected and len(samples) == 12
    _check_sample(samples[0], size=16)
    train = build_image_dataset(pattern.replace("{000000..000002}", "{000000,000001}"), size=16, shuffle_buffer=5, eval_fraction=0)
    assert sorted(s["key"] for s in train) == sorted(expected)[:8]


def test_webdataset_split_by_process_and_worker(shards):
    pattern, expected = shards
    parts = [
        [s["key"] for s in build_image_dataset(pattern, process_index=r, num_processes=2, size=16, eval_fraction=0)] for r in range(2)
    ]
    assert set(parts[0]).isdisjoint(parts[1]) and sorted(parts[0] + parts[1]) == sorted(expected)
    ds = build_image_dataset(pattern, size=16, eval_fraction=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_samples)
    keys = [k for batch in loader for k in batch["key"]]
    assert sorted(keys) == sorted(expected)


def test_webdataset_truncated_shard(shards, tmp_path):
    pattern, expected = shards
    bad = tmp_path / "train-000001.tar"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    ds = build_image_dataset(pattern, split="eval", size=16, eval_fraction=0)
    with pytest.warns(UserWarning, match="train-000001.tar"):
        samples = list(ds)
    keys = {s["key"] for s in samples}
    assert {f"s{i:03d}" for i in (0, 1, 2, 3, 8, 9, 10, 11)} <= keys < set(expected)
    skipped = [p for s in samples for p in s["skipped"]]
    assert skipped and all("train-000001.tar" in p for p in skipped)


def test_webdataset_corrupt_sample_and_comma_list(tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "a.tar")) as sink:
        sink.write({"__key__": "good", "png": Image.fromarray(_rgb(16, 16)), "json": {"label": 3}})
        sink.write({"__key__": "broken", "png": b"not a png", "cls": 1})
    with wds.TarWriter(str(tmp_path / "b.tar")) as sink:
        sink.write({"__key__": "other", "jpg": Image.fromarray(_rgb(20, 16))})
    source = f"{tmp_path / 'a.tar'},{tmp_path / 'b.tar'}"
    with pytest.warns(UserWarning, match="broken"):
        samples = list(build_image_dataset(source, split="eval", size=16, eval_fraction=0))
    assert [(s["key"], s["label"]) for s in samples] == [("good", 3), ("other", -1)]
    assert samples[1]["skipped"] == [f"{tmp_path / 'a.tar'}:broken"] and samples[0]["skipped"] == []
