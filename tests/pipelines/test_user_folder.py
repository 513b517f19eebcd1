"""A new user's folder, as issue 15 tried it: seven photos in two subfolders plus a broken and an empty file, taken
through the whole chain with the default presets (only the step counts cut): train a tokenizer, evaluate it and
export tokens on a held-out split disjoint from training, train a prior, assemble, compress without a class and
decompress the exact codes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import build_image_dataset

from conftest import tokgen

pytestmark = pytest.mark.usefixtures("quiet_cli")

SIZES = [(64, 64), (80, 96), (72, 64), (96, 128), (64, 90), (100, 70), (64, 64)]


def photo_folder(root: Path) -> Path:
    """root/{beach,forest}/: 7 smooth colour pictures of mixed sizes, a broken PNG and an empty JPEG."""
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        folder = root / ("beach" if i % 2 else "forest")
        folder.mkdir(parents=True, exist_ok=True)
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        picture = np.stack([np.sin(6 * yy + c + rng.uniform(0, 3)) * np.cos(4 * xx + c) for c in range(3)], -1)
        Image.fromarray(((picture * 0.5 + 0.5) * 255).astype(np.uint8)).save(folder / f"photo{i}.png")
    (root / "beach" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    (root / "forest" / "empty.jpg").write_bytes(b"")
    return root


def test_a_folder_of_seven_photos_goes_through_the_chain_with_default_flags(tmp_path, capsys):
    photos = photo_folder(tmp_path / "photos")
    run, tokens, top, bottom, pipe = (tmp_path / n for n in ("run", "tokens", "top", "bottom", "pipe"))

    # default preset (tokenizer-image: two levels, batch 16 > 6 training photos), only fewer steps
    assert tokgen("train-tokenizer", "--data", photos, "--out", run, "--max-steps", 3, "--quiet") == 0
    config = json.loads((run / "config.json").read_text())
    assert config["eval_fraction"] == 0.1 and config["batch_size"] == 16
    skipped = (run / "skipped.txt").read_text()
    assert "broken.png" in skipped or "empty.jpg" in skipped  # whichever fell on the training side

    train_files = set(build_image_dataset(str(photos), split="train", size=64).files)
    held_files = set(build_image_dataset(str(photos), split="eval", size=64).files)
    assert train_files and held_files and not train_files & held_files

    capsys.readouterr()
    assert tokgen("evaluate-tokenizer", run / "model", "--data", photos, "--out", tmp_path / "ev", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["held_out"]["files"]) == held_files and report["held_out"]["eval_fraction"] == 0.1

    assert tokgen("export-tokens", run / "model", "--data", photos, "--out", tokens, "--quiet") == 0
    splits = json.loads((tokens / "manifest.json").read_text())["splits"]
    assert set(splits["eval"]["read_from"]["files"]) == held_files
    assert set(splits["train"]["read_from"]["files"]) == train_files

    levels = json.loads((tokens / "manifest.json").read_text())["levels"]
    assert [level["grid_shape"] for level in levels] == [[8, 8], [16, 16]]  # top (8x) first, as for VQ-VAE-2
    assert tokgen("train-prior", "--tokens", tokens, "--out", top, "--max-steps", 2, "--quiet") == 0
    assert tokgen("train-prior", "--tokens", tokens, "--level", 1, "--out", bottom, "--max-steps", 2, "--quiet") == 0
    assert tokgen("make-pipeline", "--tokenizer", run, "--priors", top, bottom, "--out", pipe, "--quiet") == 0
    assert json.loads((pipe / "pipeline.json").read_text())["class_names"] == ["beach", "forest"]

    photo = photos / "forest" / "photo0.png"  # 64x64: the priors' grid
    packed, restored = tmp_path / "photo.tkg", tmp_path / "restored.png"
    assert tokgen("compress", pipe, photo, "--out", packed, "--quiet") == 0  # no --class: the null class
    assert tokgen("encode", pipe, photo, "--out", tmp_path / "codes.npz", "--quiet") == 0
    assert tokgen("decompress", pipe, packed, "--out", restored, "--codes-out", tmp_path / "back.npz",
                  "--quiet") == 0
    with np.load(tmp_path / "codes.npz") as encoded, np.load(tmp_path / "back.npz") as decoded:
        assert all(np.array_equal(encoded[k], decoded[k]) for k in ("level_0", "level_1"))
    assert Image.open(restored).size == (64, 64)
    assert tokgen("compress", pipe, photo, "--out", tmp_path / "named.tkg", "--class", "forest", "--quiet") == 0
    assert tokgen("compress", pipe, photo, "--out", tmp_path / "bad.tkg", "--class", "desert", "--quiet") == 2
