"""``tokgen export-tokens``: encode a dataset into WebDataset token shards for stage 2.

Output folder layout (``DIR``)::

    manifest.json                     written last, atomically, once every process is done
    train-00-000000.tar               shards of split "train" written by rank 00
    train-00-000000.tar.json          sidecar: sample count, labels, skipped inputs, settings
    train-00.done.json                rank 00 finished split "train"
    eval-00-000000.tar ...

Each sample in a shard holds ``__key__`` (the source key with '.' and '/' mapped to '_'),
``codes.npy`` (single level) or ``codes_0.npy``, ``codes_1.npy``, ... (one per level, top first), saved
with ``np.save`` (no pickles) in the smallest unsigned dtype that holds the codebook, and ``meta.json``
``{"label", "key", "index"}``.

Resume: a shard is written as ``name.tar.tmp`` and renamed when complete, so after a kill re-running the
same command keeps the complete shards and re-encodes only the rest. Shard ``i`` of rank ``r`` always
holds the same items: positions ``[i * shard_size, (i + 1) * shard_size)`` of the rank's index list
``range(r, N, world)``, each item loaded under its own seed (``pipelines.runs.SeededDataset``), so a
resumed export is identical to an uninterrupted one. Resuming with another shard size, number of
processes, dataset size or tokenizer is refused.

Iterable datasets (WebDataset sources) cannot be indexed: each rank iterates its own share (as built
by ``build_dataset(..., process_index, num_processes)``) in a fixed order and a resume skips the items of
complete shards by counting them. That is exact only when the reader yields the same order again
(seeded shuffles, same number of workers); otherwise items may be lost or repeated at the seam.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

FORMAT = "tokgen-tokens"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "eval")
_SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<rank>\d{2})-(?P<index>\d{6})\.tar$")


# ---- small helpers ----------------------------------------------------------------------------
def code_dtype(codebook_size: int) -> np.dtype:
    """Smallest dtype that holds codes in [0, codebook_size): uint8, uint16, else int32."""
    if codebook_size <= 256:
        return np.dtype(np.uint8)
    if codebook_size <= 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def safe_key(key: str, index: int) -> str:
    """A WebDataset ``__key__``: no dots (they separate key and extension) and no slashes."""
    key = re.sub(r"[./\\]", "_", str(key)).strip()
    return key or f"item_{index}"


def item_seed(seed: int, index: int) -> int:
    """The torch seed item ``index`` is loaded under: a hash of (seed, index)."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def shard_name(split: str, rank: int, index: int) -> str:
    return f"{split}-{rank:02d}-{index:06d}.tar"


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(value, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _fp(fingerprint: str) -> str:
    return str(fingerprint)[:12]


class _Single:
    """Stand-in for an Accelerator when running in one process."""

    process_index, num_processes, is_main_process = 0, 1, True
    device = torch.device("cpu")

    def wait_for_everyone(self) -> None:
        pass


# ---- one rank's shards of one split -----------------------------------------------------------
class _ShardWriter:
    """Writes shards ``{split}-{rank}-{i}.tar`` one at a time: ``.tmp`` first, sidecar, then rename."""

    def __init__(self, out_dir: Path, split: str, rank: int, settings: dict, level_dtypes: list[np.dtype]):
        self.out_dir, self.split, self.rank = out_dir, split, rank
        self.settings, self.level_dtypes = settings, level_dtypes
        self.current: int | None = None
        self.writer = None
        self.keys: set[str] = set()
        self.previous_key: str | None = None

    def _open(self, index: int) -> None:
        import webdataset as wds

        self.close()
        self.current = index
        self.tmp = self.out_dir / (shard_name(self.split, self.rank, index) + ".tmp")
        self.stream = open(self.tmp, "wb")
        self.writer = wds.TarWriter(self.stream, encoder=False)
        self.count, self.max_label, self.skipped, self.keys = 0, -1, [], set()
        self.first_index, self.last_index, self.started = None, None, time.time()
        self.input_shape = None

    def write(self, shard: int, indices: list[int], batch: dict, codes: list[np.ndarray]) -> None:
        if self.current != shard:
            self._open(shard)
        self.skipped.extend(batch["skipped"])
        self.input_shape = list(batch["x"].shape[1:])
        for b, index in enumerate(indices):
            key = str(batch["key"][b])
            label = int(batch["label"][b])
            wkey = safe_key(key, index)
            if wkey in self.keys or wkey == self.previous_key:  # duplicate source keys stay distinct
                wkey = f"{wkey}_{index}"
            self.keys.add(wkey)
            self.previous_key = wkey
            sample = {"__key__": wkey,
                      "meta.json": json.dumps({"label": label, "key": key, "index": int(index)}).encode()}
            if len(codes) == 1:
                sample["codes.npy"] = npy_bytes(codes[0][b])
            else:
                for level, c in enumerate(codes):
                    sample[f"codes_{level}.npy"] = npy_bytes(c[b])
            self.writer.write(sample)
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
        _write_json(self.out_dir / (name + ".json"), {
            **self.settings,
            "shard": name,
            "num_samples": self.count,
            "max_label": self.max_label,
            "first_index": self.first_index,
            "last_index": self.last_index,
            "input_shape": self.input_shape,
            "skipped": self.skipped,
            "seconds": round(time.time() - self.started, 3),
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


def _complete_shards(out_dir: Path, split: str, rank: int) -> dict[int, dict]:
    """{shard index: sidecar} of this rank's complete shards (``.tar`` and its sidecar both present)."""
    done = {}
    for path in out_dir.glob(f"{split}-{rank:02d}-*.tar"):
        m = _SHARD_RE.match(path.name)
        side = _read_json(path.with_name(path.name + ".json"))
        if m and m["split"] == split and side is not None:
            done[int(m["index"])] = side
    return done


def _clean_partial(out_dir: Path, split: str, rank: int) -> None:
    """Delete this rank's leftovers of a killed run: ``.tmp`` files and shards without a sidecar."""
    for path in out_dir.glob(f"{split}-{rank:02d}-*.tar.tmp"):
        path.unlink(missing_ok=True)
    for path in out_dir.glob(f"{split}-{rank:02d}-*.tar.json.tmp"):
        path.unlink(missing_ok=True)
    for path in out_dir.glob(f"{split}-{rank:02d}-*.tar.json"):
        if not path.with_name(path.name[: -len(".json")]).exists():
            path.unlink(missing_ok=True)
    for path in out_dir.glob(f"{split}-{rank:02d}-*.tar"):
        if not path.with_name(path.name + ".json").exists():
            path.unlink(missing_ok=True)


def _check_settings(out_dir: Path, split: str, settings: dict) -> None:
    """Refuse to resume over shards written with other settings (all ranks run the same check)."""
    for side_path in sorted(out_dir.glob(f"{split}-*.tar.json")):
        if not side_path.with_name(side_path.name[: -len(".json")]).exists():
            continue  # transient (another rank between sidecar and rename) or a leftover
        side = _read_json(side_path)
        if side is None:
            continue
        if side.get("tokenizer_fingerprint") != settings["tokenizer_fingerprint"]:
            raise ValueError(
                f"{out_dir} holds {split} shards made by tokenizer {_fp(side.get('tokenizer_fingerprint'))}, "
                f"not by this tokenizer {_fp(settings['tokenizer_fingerprint'])}: use a new --out folder"
            )
        for name in ("world_size", "shard_size", "dataset_size", "seed"):
            if side.get(name) != settings[name]:
                raise ValueError(
                    f"cannot resume the {split} export in {out_dir}: its shards were written with "
                    f"{name}={side.get(name)}, this run has {name}={settings[name]}; re-run with the same "
                    "settings or use a new --out folder"
                )


# ---- batches to encode ------------------------------------------------------------------------
def _map_batches(dataset, rank, world, shard_size, batch_size, seed, done, num_workers, collate
                 ) -> tuple[int, int, Iterator[tuple[int, list[int], dict]]]:
    """(items left, items done, iterator of (shard, indices, batch)) for a map-style dataset."""
    from pipelines.runs import SeededDataset

    mine = list(range(rank, len(dataset), world))
    plan, shards = [], []
    num_shards = math.ceil(len(mine) / shard_size)
    for s in range(num_shards):
        if s in done:
            continue
        part = mine[s * shard_size : (s + 1) * shard_size]
        for b in range(0, len(part), batch_size):
            plan.append([(i, item_seed(seed, i)) for i in part[b : b + batch_size]])
            shards.append(s)
    left = sum(len(p) for p in plan)

    def batches():
        if not plan:
            return
        loader = DataLoader(SeededDataset(dataset), batch_sampler=plan, collate_fn=collate,
                            num_workers=num_workers)
        for shard, items, batch in zip(shards, plan, loader):
            yield shard, [i for i, _ in items], batch

    return left, len(mine) - left, batches()


def _iterable_batches(dataset, rank, world, shard_size, batch_size, seed, done, num_workers, collate,
                      split_iterable) -> Iterator[tuple[int, list[int], dict]]:
    """(shard, indices, batch) for an IterableDataset; complete shards are skipped by counting."""
    generator = torch.Generator().manual_seed(item_seed(seed, -1 - rank))
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, generator=generator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(item_seed(seed, -1 - rank))
        position, pending, pending_shard = 0, [], None
        for n, sample in enumerate(loader):
            if split_iterable and n % world != rank:
                continue
            shard = position // shard_size
            index = position * world + rank
            position += 1
            if shard in done:
                continue
            if pending and (shard != pending_shard or len(pending) == batch_size):
                yield pending_shard, [i for i, _ in pending], collate([s for _, s in pending])
                pending = []
            pending.append((index, sample))
            pending_shard = shard
        if pending:
            yield pending_shard, [i for i, _ in pending], collate([s for _, s in pending])


# ---- the export -------------------------------------------------------------------------------
def export_tokens(tokenizer, dataset, out_dir, *, batch_size: int = 64, shard_size: int = 10000,
                  accelerator=None, progress: bool = True, split: str = "train", seed: int = 0,
                  num_workers: int = 0, split_iterable: bool = False, source: str | None = None) -> dict:
    """Encode ``dataset`` (or ``{"train": ds, "eval": ds}``) into token shards under ``out_dir``.

    Returns the manifest (also written to ``out_dir/manifest.json`` by the main process). With an
    ``accelerator`` every process exports ``range(rank, N, world)`` of a map-style dataset. An iterable
    dataset must already be this process's share, unless ``split_iterable`` (keep every world-th item).
    Splits already in an existing manifest of the same tokenizer are kept (export train, then eval).
    """
    from data import collate_samples

    started = time.time()
    acc = accelerator if accelerator is not None else _Single()
    rank, world = acc.process_index, acc.num_processes
    datasets = dict(dataset) if isinstance(dataset, Mapping) else {split: dataset}
    for name in datasets:
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ValueError(f"split names may only hold letters, digits and '_', got {name!r}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    out_dir = Path(out_dir)
    fingerprint = tokenizer.fingerprint()
    previous = _existing_manifest(out_dir, fingerprint)
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()

    tokenizer.eval()
    tokenizer.to(acc.device)
    sizes = list(tokenizer.codebook_sizes)
    dtypes = [code_dtype(k) for k in sizes]
    for name, ds in datasets.items():
        iterable = isinstance(ds, IterableDataset)
        settings = {"tokenizer_fingerprint": fingerprint, "world_size": world, "shard_size": shard_size,
                    "dataset_size": None if iterable else len(ds), "seed": seed}
        if not iterable and len(ds) == 0:
            raise ValueError(f"the {name} dataset is empty")
        _clean_partial(out_dir, name, rank)
        _check_settings(out_dir, name, settings)
        done = _complete_shards(out_dir, name, rank)
        marker = out_dir / f"{name}-{rank:02d}.done.json"
        marker_ok = (_read_json(marker) or {}).get("settings") == settings
        if iterable:
            if marker_ok:  # this rank finished before: nothing to read again
                batches, total, initial = iter(()), None, None
            else:
                batches = _iterable_batches(ds, rank, world, shard_size, batch_size, seed, done,
                                            num_workers, collate_samples, split_iterable)
                total, initial = None, sum(d["num_samples"] for d in done.values())
        else:
            left, initial, batches = _map_batches(ds, rank, world, shard_size, batch_size, seed, done,
                                                  num_workers, collate_samples)
            total = left + initial
        writer = _ShardWriter(out_dir, name, rank, settings, dtypes)
        _encode_split(tokenizer, batches, writer, sizes, dtypes, acc, total, initial,
                      progress and acc.is_main_process, f"export {name}")
        complete = _complete_shards(out_dir, name, rank)
        _write_json(marker, {"settings": settings, "shards": [shard_name(name, rank, s) for s in sorted(complete)],
                             "num_samples": sum(d["num_samples"] for d in complete.values())})
    acc.wait_for_everyone()
    manifest = None
    if acc.is_main_process:
        manifest = _build_manifest(tokenizer, out_dir, list(datasets), world, fingerprint, previous,
                                   time.time() - started, source)
        _write_json(out_dir / MANIFEST, manifest)
        if manifest.get("skipped"):
            warnings.warn(f"{len(manifest['skipped'])} unreadable inputs were skipped; they are listed "
                          f"under 'skipped' in {out_dir / MANIFEST}")
    acc.wait_for_everyone()
    return manifest if manifest is not None else json.loads((out_dir / MANIFEST).read_text())


@torch.no_grad()
def _encode_split(tokenizer, batches, writer: _ShardWriter, sizes, dtypes, acc, total, initial, show, desc):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial or 0, desc=desc, unit="img", disable=not show, dynamic_ncols=True)
    try:
        for shard, indices, batch in batches:
            x = batch["x"].to(acc.device, non_blocking=True)
            codes = tokenizer.encode_levels(x)
            if len(codes) != len(sizes):
                raise ValueError(f"the tokenizer gave {len(codes)} code levels but has {len(sizes)} codebooks")
            out = []
            for c, k, dt in zip(codes, sizes, dtypes):
                c = c.cpu()
                if c.numel() and (int(c.min()) < 0 or int(c.max()) >= k):
                    raise ValueError(f"codes outside [0, {k}) from the tokenizer")
                out.append(c.numpy().astype(dt))
            writer.write(shard, indices, batch, out)
            bar.update(len(indices))
            if writer.count >= writer.settings["shard_size"]:
                writer.close()  # at once, so that a kill later does not lose this shard
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()


def _existing_manifest(out_dir: Path, fingerprint: str) -> dict | None:
    path = out_dir / MANIFEST
    if not path.exists():
        return None
    manifest = _read_json(path)
    if manifest is None or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} exists but is not a tokgen token manifest: choose another --out folder")
    if manifest.get("tokenizer_fingerprint") != fingerprint:
        raise ValueError(
            f"{out_dir} holds tokens made by tokenizer {_fp(manifest.get('tokenizer_fingerprint'))}, "
            f"not by this tokenizer {_fp(fingerprint)}: export into a new --out folder (or delete that one)"
        )
    return manifest


def _build_manifest(tokenizer, out_dir: Path, exported: list[str], world: int, fingerprint: str,
                    previous: dict | None, seconds: float, source: str | None) -> dict:
    splits = {k: v for k, v in (previous or {}).get("splits", {}).items() if k not in exported}
    max_label = max([v.get("num_classes", 0) - 1 for v in splits.values()], default=-1)
    skipped = [k for v in splits.values() for k in v.get("skipped", [])]
    input_shape = (previous or {}).get("input_shape") if splits else None
    for name in exported:
        shards, counts, split_max, split_skipped = [], [], -1, []
        for rank in range(world):
            marker = _read_json(out_dir / f"{name}-{rank:02d}.done.json")
            if marker is None:
                raise RuntimeError(f"process {rank} did not finish the {name} export in {out_dir}")
            for shard in marker["shards"]:
                side = _read_json(out_dir / (shard + ".json"))
                if side is None or not (out_dir / shard).is_file():
                    raise RuntimeError(f"shard {out_dir / shard} is missing or incomplete")
                shards.append(shard)
                counts.append(side["num_samples"])
                split_max = max(split_max, side["max_label"])
                split_skipped.extend(side.get("skipped", []))
                if side.get("input_shape") is not None:
                    if input_shape is not None and list(input_shape) != list(side["input_shape"]):
                        raise ValueError(
                            f"split {name} has inputs of shape {side['input_shape']} but the other splits in "
                            f"{out_dir} have {input_shape}: export with the same --size"
                        )
                    input_shape = list(side["input_shape"])
        order = sorted(range(len(shards)), key=lambda i: shards[i])
        shards, counts = [shards[i] for i in order], [counts[i] for i in order]
        if sum(counts) == 0:
            raise ValueError(f"no samples were exported for split {name}")
        splits[name] = {"num_samples": sum(counts), "shards": shards, "shard_samples": counts,
                        "num_classes": split_max + 1, "skipped": list(dict.fromkeys(split_skipped))}
        max_label = max(max_label, split_max)
        skipped.extend(split_skipped)
    if input_shape is None:
        raise ValueError("no samples were exported")
    grids = tokenizer.code_shapes(tuple(input_shape))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer_fingerprint": fingerprint,
        "modality": getattr(tokenizer.config, "modality", "image"),
        "input_shape": list(input_shape),
        "levels": [{"grid_shape": list(g), "codebook_size": int(k), "dtype": code_dtype(k).name}
                   for g, k in zip(grids, tokenizer.codebook_sizes)],
        "num_samples": sum(s["num_samples"] for s in splits.values()),
        "num_classes": max_label + 1 if max_label >= 0 else 0,
        "splits": dict(sorted(splits.items())),
        "skipped": list(dict.fromkeys(skipped)),
        "export_seconds": round(seconds, 3),
    }
    if source is not None:
        manifest["source"] = source
    return manifest


# ---- command line -----------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="tokenizer: model folder, run folder or pipeline folder")
    p.add_argument("--data", required=True, help="built-in name (digits, photos), image folder or .tar shards")
    p.add_argument("--out", required=True, type=Path, help="token folder (shards + manifest.json)")
    p.add_argument("--split", choices=["train", "eval", "all"], default="all")
    p.add_argument("--size", type=int, help="input size (default: the tokenizer's training size, else 32)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=10000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0, help="seeds the training-split crops (deterministic)")
    p.add_argument("--num-workers", type=int, default=0, help="data-loading processes")
    p.add_argument("--cpu", action="store_true", help="encode on the CPU even when a GPU is available")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> dict:
    if args is None:
        parser = argparse.ArgumentParser(prog="tokgen export-tokens", description=__doc__.split("\n")[0])
        add_arguments(parser)
        args = parser.parse_args(argv)
    from accelerate import Accelerator

    from data import build_dataset
    from stage1_tokenizer.evaluate import load_tokenizer, training_data

    tokenizer = load_tokenizer(args.model)
    cfg = tokenizer.config
    data_options = training_data(Path(args.model), args.size, args.data)
    cpu = args.cpu or not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU") in ("1", "true", "True", "yes")
    accelerator = Accelerator(cpu=cpu)
    splits = SPLITS if args.split == "all" else (args.split,)
    if args.split == "all" and (os.path.isdir(args.data) or ".tar" in args.data) and accelerator.is_main_process:
        warnings.warn(f"{args.data} has no separate held-out part: 'train' and 'eval' will hold the same "
                      "inputs (eval with centre crops); export a held-out source with --split eval instead")
    datasets = {
        name: build_dataset(args.data, modality=cfg.modality, split=name, channels=cfg.in_channels, **data_options,
                            seed=args.seed, process_index=accelerator.process_index,
                            num_processes=accelerator.num_processes,
                            **({"sample_rate": cfg.sample_rate} if getattr(cfg, "sample_rate", 0) else {}))
        for name in splits
    }
    manifest = export_tokens(tokenizer, datasets, args.out, batch_size=args.batch_size,
                             shard_size=args.shard_size, accelerator=accelerator, progress=not args.quiet,
                             seed=args.seed, num_workers=args.num_workers, source=str(args.data))
    if accelerator.is_main_process:
        summary = {k: manifest[k] for k in ("num_samples", "num_classes", "input_shape", "export_seconds")}
        summary["splits"] = {k: v["num_samples"] for k, v in manifest["splits"].items()}
        summary["levels"] = [(lv["grid_shape"], lv["codebook_size"], lv["dtype"]) for lv in manifest["levels"]]
        print(json.dumps(summary))
        print(f"tokens written to {args.out}")
    return manifest
