"""Atomic, checksummed training checkpoints.

``checkpoints/step_XXXXXXXX/`` holds ``accelerator.save_state`` (model, optimizers, schedulers, RNG states,
safetensors), ``trainer.json`` (step, consumed batches, counters) and ``index.json`` (a SHA-256 per file).
A checkpoint is written into a ``.tmp`` folder and renamed into place, so a run killed mid-write leaves
nothing that resume would trust; resume takes the newest checkpoint whose checksums hold.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

from harness.folders import write_json

CHECKPOINT_RE = re.compile(r"^step_(\d{8})$")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _index(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): _file_digest(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "index.json"
    }


def save_checkpoint(accelerator, run_dir: Path, step: int, trainer_state: dict, keep: int) -> Path:
    """``accelerator.save_state`` into a temporary folder, checksum it, rename it into place; keep the newest
    ``keep`` checkpoints (0 = all)."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / "trainer.json", {"step": step, **trainer_state})
        write_json(tmp / "index.json", _index(tmp))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: p.name)


def verify_checkpoint(folder: Path) -> str | None:
    """None when the checkpoint's files match its index, else what is wrong."""
    index_file = folder / "index.json"
    if not index_file.is_file():
        return "no index.json (partial write?)"
    try:
        expected = json.loads(index_file.read_text())
    except json.JSONDecodeError:
        return "index.json is corrupt"
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if _file_digest(path) != digest:
            return f"{name} does not match its checksum"
    return None


def latest_valid_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose checksums hold; broken newer ones are reported and passed over."""
    for folder in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(folder)
        if problem is None:
            return folder
        warnings.warn(f"checkpoint {folder} is unusable ({problem}); falling back to an older one")
    return None


def load_checkpoint(accelerator, folder: Path) -> dict:
    """Restore model, optimizer, scheduler and RNG states; returns trainer.json."""
    accelerator.load_state(str(folder))
    return json.loads((folder / "trainer.json").read_text())
