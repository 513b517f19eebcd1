"""Writing token folders (layout in :mod:`data.tokens`): shards, sidecars, per-rank markers, the manifest.

A shard is written as ``name.tar.tmp``, its sidecar beside it, then renamed to ``name.tar``: after a kill,
the complete shards stay and only the rest is written again. Every rank writes its own shards; the main
process writes ``manifest.json`` last, once every rank has left its ``{split}-{rank}.done.json``.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import webdataset as wds

from harness.folders import write_json

from .codes import code_dtype
from .tokens import FLAT_VERSION, FORMAT, MANIFEST, SHARD_RE, VERSION, encode_sample, safe_key, shard_name


@dataclass
class TokenizerInfo:
    """What a token folder records about the tokenizer that made it."""

    fingerprint: str
    modality: str
    codebook_sizes: list[int]
    code_shapes: Callable[[tuple[int, ...]], list[tuple[int, ...]]]  # input (C, *S) -> grid per level
    code_depth: int = 0  # stages per position of a code stack (a residual quantizer's codes); 0 = one code


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def short(fingerprint: str | None) -> str:
    return str(fingerprint)[:12]


SHARD_MTIME = 0


class ShardWriter:
    """Writes shards ``{split}-{rank}-{i}.tar`` one at a time: ``.tmp`` first, sidecar, then rename."""

    def __init__(self, out_dir: Path, split: str, rank: int, settings: dict, codebook_sizes: list[int]):
        self.out_dir, self.split, self.rank = out_dir, split, rank
        self.settings, self.codebook_sizes = settings, codebook_sizes
        self.current: int | None = None
        self.writer = None
        self.keys: set[str] = set()
        self.previous_key: str | None = None
        self.count = 0

    def _open(self, index: int) -> None:
        self.close()
        self.current = index
        self.tmp = self.out_dir / (shard_name(self.split, self.rank, index) + ".tmp")
        self.stream = open(self.tmp, "wb")
        # a whole-second mtime: with time.time()'s float, tarfile adds a pax header to every member (the shards
        # double in size); a fixed one makes a re-export byte-identical
        self.writer = wds.TarWriter(self.stream, encoder=False, mtime=SHARD_MTIME)
        self.count, self.max_label, self.skipped, self.keys = 0, -1, [], set()
        self.first_index, self.last_index, self.started = None, None, time.time()
        self.input_shape = None

    def _unique_key(self, key: str, index: int) -> str:
        wkey = safe_key(key, index)
        if wkey in self.keys or wkey == self.previous_key:  # duplicate source keys stay distinct
            wkey = f"{wkey}_{index}"
        self.keys.add(wkey)
        self.previous_key = wkey
        return wkey

    def write(self, shard: int, indices: list[int], batch: dict, codes: list[torch.Tensor]) -> None:
        """codes: per level (B, *grid), or (B, *grid, depth) for a code stack, for the batch's items ``indices``."""
        if self.current != shard:
            self._open(shard)
        self.skipped.extend(batch["skipped"])
        self.input_shape = list(batch["x"].shape[1:])
        for b, index in enumerate(indices):
            key, label = str(batch["key"][b]), int(batch["label"][b])
            self.writer.write(encode_sample(self._unique_key(key, index), [c[b] for c in codes],
                                            self.codebook_sizes, label, key, index))
            self.count += 1
            self.max_label = max(self.max_label, label)
            self.first_index = index if self.first_index is None else self.first_index
            self.last_index = index

    def close(self) -> None:
        """Finish the open shard: flush, sidecar, rename ``.tar.tmp`` -> ``.tar``."""
        if self.writer is None:
            return
        self.writer.close()  # closes the tar stream; the file object stays ours
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.stream.close()
        name = shard_name(self.split, self.rank, self.current)
        write_json(self.out_dir / (name + ".json"), {
            **self.settings, "shard": name, "num_samples": self.count, "max_label": self.max_label,
            "first_index": self.first_index, "last_index": self.last_index, "input_shape": self.input_shape,
            "skipped": self.skipped, "seconds": round(time.time() - self.started, 3),
        })
        os.replace(self.tmp, self.out_dir / name)
        self.writer, self.current = None, None

    def abort(self) -> None:
        """Stop after an error: close the open file but leave it as ``.tmp`` (a resume deletes it)."""
        if self.writer is not None:
            try:
                self.writer.close()  # ends the tar stream (else its finalizer writes to a closed file)
            finally:
                self.stream.close()
                self.writer, self.current = None, None


# ---- a rank's shards on disk ----------------------------------------------------------------------
def complete_shards(out_dir: Path, split: str, rank: int) -> dict[int, dict]:
    """{shard index: sidecar} of this rank's complete shards (``.tar`` and its sidecar both present)."""
    done = {}
    for path in out_dir.glob(f"{split}-{rank:02d}-*.tar"):
        m = SHARD_RE.match(path.name)
        side = read_json(path.with_name(path.name + ".json"))
        if m and m["split"] == split and side is not None:
            done[int(m["index"])] = side
    return done


def clean_partial(out_dir: Path, split: str, rank: int) -> None:
    """Delete this rank's leftovers of a killed run: ``.tmp`` files and shards without a sidecar."""
    for pattern in (f"{split}-{rank:02d}-*.tar.tmp", f"{split}-{rank:02d}-*.tar.json.tmp"):
        for path in out_dir.glob(pattern):
            path.unlink(missing_ok=True)
    for path in out_dir.glob(f"{split}-{rank:02d}-*.tar.json"):
        if not path.with_name(path.name[: -len(".json")]).exists():
            path.unlink(missing_ok=True)
    for path in out_dir.glob(f"{split}-{rank:02d}-*.tar"):
        if not path.with_name(path.name + ".json").exists():
            path.unlink(missing_ok=True)


def check_settings(out_dir: Path, split: str, settings: dict) -> None:
    """Refuse to resume over shards written with other settings (all ranks run the same check)."""
    for side_path in sorted(out_dir.glob(f"{split}-*.tar.json")):
        if not side_path.with_name(side_path.name[: -len(".json")]).exists():
            continue  # transient (another rank between sidecar and rename) or a leftover
        side = read_json(side_path)
        if side is None:
            continue
        if side.get("tokenizer_fingerprint") != settings["tokenizer_fingerprint"]:
            raise ValueError(
                f"{out_dir} holds {split} shards made by tokenizer {short(side.get('tokenizer_fingerprint'))}, "
                f"not by this tokenizer {short(settings['tokenizer_fingerprint'])}: use a new --out folder"
            )
        defaults = {"depth": 0}  # shards written before code stacks had no depth
        for name in ("world_size", "shard_size", "dataset_size", "seed", "depth"):
            written, asked = side.get(name, defaults.get(name)), settings.get(name, defaults.get(name))
            if written != asked:
                raise ValueError(
                    f"cannot resume the {split} export in {out_dir}: its shards were written with "
                    f"{name}={written}, this run has {name}={asked}; re-run with the same settings or use a new "
                    "--out folder"
                )


def mark_done(out_dir: Path, split: str, rank: int, settings: dict) -> None:
    """Record that this rank finished the split: its complete shards and their sample count."""
    complete = complete_shards(out_dir, split, rank)
    write_json(out_dir / f"{split}-{rank:02d}.done.json",
               {"settings": settings, "shards": [shard_name(split, rank, s) for s in sorted(complete)],
                "num_samples": sum(d["num_samples"] for d in complete.values())})


def is_done(out_dir: Path, split: str, rank: int, settings: dict) -> bool:
    return (read_json(out_dir / f"{split}-{rank:02d}.done.json") or {}).get("settings") == settings


# ---- the manifest -----------------------------------------------------------------------------------
def existing_manifest(out_dir: Path, fingerprint: str, depth: int = 0) -> dict | None:
    """The folder's manifest when it exists (its other splits are kept); refused when another tokenizer made it, or
    the same one at another code-stack ``depth`` (stages kept per position)."""
    path = out_dir / MANIFEST
    if not path.exists():
        return None
    manifest = read_json(path)
    if manifest is None or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} exists but is not a tokgen token manifest: choose another --out folder")
    if manifest.get("tokenizer_fingerprint") != fingerprint:
        raise ValueError(
            f"{out_dir} holds tokens made by tokenizer {short(manifest.get('tokenizer_fingerprint'))}, "
            f"not by this tokenizer {short(fingerprint)}: export into a new --out folder (or delete that one)"
        )
    held = {int(level.get("depth", 0)) for level in manifest.get("levels", [])}
    if held and held != {int(depth)}:
        raise ValueError(f"{out_dir} holds code stacks of depth {sorted(held)[0]}, this export keeps {depth} stages a "
                         "position: export into a new --out folder (or delete that one)")
    return manifest


def _split_entry(out_dir: Path, name: str, world: int, input_shape) -> tuple[dict, list | None]:
    """The manifest entry of one exported split from every rank's marker and sidecars, and the input shape."""
    shards, counts, split_max, skipped = [], [], -1, []
    for rank in range(world):
        marker = read_json(out_dir / f"{name}-{rank:02d}.done.json")
        if marker is None:
            raise RuntimeError(f"process {rank} did not finish the {name} export in {out_dir}")
        for shard in marker["shards"]:
            side = read_json(out_dir / (shard + ".json"))
            if side is None or not (out_dir / shard).is_file():
                raise RuntimeError(f"shard {out_dir / shard} is missing or incomplete")
            shards.append(shard)
            counts.append(side["num_samples"])
            split_max = max(split_max, side["max_label"])
            skipped.extend(side.get("skipped", []))
            if side.get("input_shape") is not None:
                if input_shape is not None and list(input_shape) != list(side["input_shape"]):
                    raise ValueError(f"split {name} has inputs of shape {side['input_shape']} but the other "
                                     f"splits in {out_dir} have {input_shape}: export with the same --size")
                input_shape = list(side["input_shape"])
    order = sorted(range(len(shards)), key=lambda i: shards[i])
    if sum(counts) == 0:
        raise ValueError(f"no samples were exported for split {name}")
    entry = {"num_samples": sum(counts), "shards": [shards[i] for i in order],
             "shard_samples": [counts[i] for i in order], "num_classes": split_max + 1,
             "skipped": list(dict.fromkeys(skipped))}
    return entry, input_shape


def level_entry(grid: tuple[int, ...], codebook_size: int, depth: int = 0) -> dict:
    """A level's manifest entry: grid, codebook size and the smallest dtype that holds it; a code stack adds its
    ``depth`` and one codebook size per stage (a residual quantizer's stages share one size)."""
    entry = {"grid_shape": list(grid), "codebook_size": int(codebook_size), "dtype": code_dtype(codebook_size).name}
    if depth:
        entry.update(depth=int(depth), stage_codebook_sizes=[int(codebook_size)] * int(depth))
    return entry


def build_manifest(out_dir: Path, exported: list[str], world: int, tokenizer: TokenizerInfo,
                   previous: dict | None, seconds: float, source: str | None, split_sources: dict | None = None) -> dict:
    """The manifest of the folder: the splits just exported plus those of ``previous`` it kept; ``split_sources``
    (per split: what it was read from, its held-out fraction and files) goes into each split's entry."""
    splits = {k: v for k, v in (previous or {}).get("splits", {}).items() if k not in exported}
    input_shape = (previous or {}).get("input_shape") if splits else None
    for name in exported:
        splits[name], input_shape = _split_entry(out_dir, name, world, input_shape)
        if split_sources and name in split_sources:
            splits[name]["read_from"] = split_sources[name]
    if input_shape is None:
        raise ValueError("no samples were exported")
    max_label = max(v.get("num_classes", 0) - 1 for v in splits.values())
    grids = tokenizer.code_shapes(tuple(input_shape))
    manifest = {
        "format": FORMAT,
        "version": VERSION if tokenizer.code_depth else FLAT_VERSION,  # readers older than stacks keep reading
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "modality": tokenizer.modality,
        "input_shape": list(input_shape),
        "levels": [level_entry(g, k, tokenizer.code_depth) for g, k in zip(grids, tokenizer.codebook_sizes)],
        "num_samples": sum(s["num_samples"] for s in splits.values()),
        "num_classes": max_label + 1 if max_label >= 0 else 0,
        "splits": dict(sorted(splits.items())),
        "skipped": list(dict.fromkeys(k for v in splits.values() for k in v.get("skipped", []))),
        "export_seconds": round(seconds, 3),
    }
    if source is not None:
        manifest["source"] = source
    return manifest
