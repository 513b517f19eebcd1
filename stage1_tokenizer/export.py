"""``tokgen export-tokens``: encode a dataset with a tokenizer into WebDataset token shards for stage 2.

The folder layout and shard format are :mod:`data.tokens`; the writing is :mod:`data.token_writer`.

Resume: a shard is written as ``name.tar.tmp`` and renamed when complete, so after a kill re-running the
same command keeps the complete shards and re-encodes only the rest. Shard ``i`` of rank ``r`` always
holds the same items: positions ``[i * shard_size, (i + 1) * shard_size)`` of the rank's index list
``range(r, N, world)``, each item loaded under its own seed (``harness.data_order.SeededDataset``), so a
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
import json
import math
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from data import build_dataset, collate_samples
from data.token_writer import (ShardWriter, TokenizerInfo, build_manifest, check_settings, clean_partial,
                               complete_shards, existing_manifest, is_done, mark_done)
from data.tokens import MANIFEST, level_code_shape
from harness.data_order import SeededDataset
from harness.devices import add_device_arguments, autocast, resolve_device, resolve_dtype
from harness.folders import write_json
from harness.output import add_output_arguments, emit
from stage1_tokenizer.base import Tokenizer
from stage1_tokenizer.registry import add_held_out_arguments, held_out_report, load_tokenizer, training_data

SPLITS = ("train", "eval")


def item_seed(seed: int, index: int) -> int:
    """The torch seed item ``index`` is loaded under: a hash of (seed, index)."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)


class _Single:
    """Stand-in for an Accelerator when running in one process."""

    process_index, num_processes, is_main_process = 0, 1, True
    device = torch.device("cpu")

    def wait_for_everyone(self) -> None:
        pass


@dataclass
class _Plan:
    """One rank's work on one split: batches of (shard, indices, batch), and the items to go and done."""

    batches: Iterator[tuple[int, list[int], dict]]
    total: int | None
    done: int


# ---- batches to encode ------------------------------------------------------------------------
def _map_plan(dataset, rank, world, shard_size, batch_size, seed, done, num_workers) -> _Plan:
    """The batches of a map-style dataset: shard s holds items [s * shard_size, ...) of range(rank, N, world)."""
    mine = list(range(rank, len(dataset), world))
    plan, shards = [], []
    for s in range(math.ceil(len(mine) / shard_size)):
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
        loader = DataLoader(SeededDataset(dataset), batch_sampler=plan, collate_fn=collate_samples,
                            num_workers=num_workers)
        for shard, items, batch in zip(shards, plan, loader):
            yield shard, [i for i, _ in items], batch

    return _Plan(batches(), len(mine), len(mine) - left)


def _iterable_batches(dataset, rank, world, shard_size, batch_size, seed, done, num_workers,
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
                yield pending_shard, [i for i, _ in pending], collate_samples([s for _, s in pending])
                pending = []
            pending.append((index, sample))
            pending_shard = shard
        if pending:
            yield pending_shard, [i for i, _ in pending], collate_samples([s for _, s in pending])


def _plan(ds, out_dir, name, rank, world, settings, batch_size, num_workers, split_iterable) -> _Plan:
    """Clean a killed run's leftovers, check the settings of what is on disk, and plan what is left."""
    clean_partial(out_dir, name, rank)
    check_settings(out_dir, name, settings)
    done = complete_shards(out_dir, name, rank)
    shard_size, seed = settings["shard_size"], settings["seed"]
    if not isinstance(ds, IterableDataset):
        return _map_plan(ds, rank, world, shard_size, batch_size, seed, done, num_workers)
    if is_done(out_dir, name, rank, settings):  # this rank finished before: nothing to read again
        return _Plan(iter(()), None, 0)
    batches = _iterable_batches(ds, rank, world, shard_size, batch_size, seed, done, num_workers, split_iterable)
    return _Plan(batches, None, sum(d["num_samples"] for d in done.values()))


# ---- the export -------------------------------------------------------------------------------
def export_tokens(tokenizer: Tokenizer, dataset, out_dir, *, batch_size: int = 64, shard_size: int = 10000,
                  accelerator=None, progress: bool = True, split: str = "train", seed: int = 0,
                  num_workers: int = 0, split_iterable: bool = False, source: str | None = None,
                  dtype: torch.dtype = torch.float32, split_sources: dict | None = None,
                  num_stages: int | None = None) -> dict:
    """Encode ``dataset`` (or ``{"train": ds, "eval": ds}``) into token shards under ``out_dir``.

    Returns the manifest (also written to ``out_dir/manifest.json`` by the main process). With an
    ``accelerator`` every process exports ``range(rank, N, world)`` of a map-style dataset. An iterable
    dataset must already be this process's share, unless ``split_iterable`` (keep every world-th item).
    Splits already in an existing manifest of the same tokenizer are kept (export train, then eval).
    ``split_sources``: per split, what it was read from (source, held-out fraction, files), for the manifest.
    ``num_stages``: a residual quantizer's first k stages only (code stacks of depth k: a prior over a lower bitrate).
    """
    started = time.time()
    acc = accelerator if accelerator is not None else _Single()
    rank, world = acc.process_index, acc.num_processes
    datasets = _check_request(dataset, split, batch_size, shard_size)
    out_dir = Path(out_dir)
    depth = export_depth(tokenizer, num_stages)
    info = TokenizerInfo(tokenizer.fingerprint(), tokenizer.modality, list(tokenizer.codebook_sizes),
                         tokenizer.code_shapes, depth)
    previous = existing_manifest(out_dir, info.fingerprint, depth)
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    tokenizer.eval()
    tokenizer.to(acc.device)
    for name, ds in datasets.items():
        iterable = isinstance(ds, IterableDataset)
        settings = {"tokenizer_fingerprint": info.fingerprint, "world_size": world, "shard_size": shard_size,
                    "dataset_size": None if iterable else len(ds), "seed": seed, "depth": depth}
        if not iterable and len(ds) == 0:
            raise ValueError(f"the {name} dataset is empty")
        plan = _plan(ds, out_dir, name, rank, world, settings, batch_size, num_workers, split_iterable)
        writer = ShardWriter(out_dir, name, rank, settings, info.codebook_sizes)
        _encode_split(tokenizer, plan, writer, acc, progress and acc.is_main_process, f"export {name}", dtype,
                      num_stages)
        mark_done(out_dir, name, rank, settings)
    acc.wait_for_everyone()
    manifest = None
    if acc.is_main_process:
        manifest = build_manifest(out_dir, list(datasets), world, info, previous, time.time() - started, source,
                                  split_sources)
        names = class_names(datasets) or (previous or {}).get("class_names")
        if names:
            manifest["class_names"] = names
        write_json(out_dir / MANIFEST, manifest)
        if manifest.get("skipped"):
            warnings.warn(f"{len(manifest['skipped'])} unreadable inputs were skipped; they are listed "
                          f"under 'skipped' in {out_dir / MANIFEST}")
    acc.wait_for_everyone()
    return manifest if manifest is not None else json.loads((out_dir / MANIFEST).read_text())


def export_depth(tokenizer: Tokenizer, num_stages: int | None) -> int:
    """Stages per position of the exported codes: the tokenizer's (0: no stacks), or the first ``num_stages``."""
    if num_stages is None:
        return tokenizer.code_depth
    if not tokenizer.code_depth:
        raise ValueError("num_stages (--stages) applies to residual quantizers (kind 'rvq'); this tokenizer's codes "
                         "have one code per position")
    if not 1 <= num_stages <= tokenizer.code_depth:
        raise ValueError(f"num_stages (--stages) must be in 1..{tokenizer.code_depth} (the tokenizer's stages), "
                         f"got {num_stages}")
    return int(num_stages)


def class_names(datasets: Mapping) -> list[str] | None:
    """The label names of a folder's datasets (its subfolders, ``dataset.classes``), None when they have none."""
    for ds in datasets.values():
        names = getattr(ds, "classes", None)
        if isinstance(names, (list, tuple)) and names:
            return [str(n) for n in names]
    return None


def _check_request(dataset, split: str, batch_size: int, shard_size: int) -> dict:
    datasets = dict(dataset) if isinstance(dataset, Mapping) else {split: dataset}
    for name in datasets:
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ValueError(f"split names may only hold letters, digits and '_', got {name!r}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    return datasets


@torch.no_grad()
def _encode_split(tokenizer: Tokenizer, plan: _Plan, writer: ShardWriter, acc, show: bool, desc: str,
                  dtype: torch.dtype, num_stages: int | None) -> None:
    stages = {} if num_stages is None else {"num_stages": num_stages}
    bar = tqdm(total=plan.total, initial=plan.done, desc=desc, unit="item", disable=not show, dynamic_ncols=True)
    try:
        for shard, indices, batch in plan.batches:
            with autocast(acc.device, dtype):
                codes = [c.cpu() for c in tokenizer.encode_levels(batch["x"].to(acc.device, non_blocking=True),
                                                                  **stages)]
            for c, k in zip(codes, tokenizer.codebook_sizes):
                if c.numel() and (int(c.min()) < 0 or int(c.max()) >= k):
                    raise ValueError(f"codes outside [0, {k}) from the tokenizer")
            writer.write(shard, indices, batch, codes)
            bar.update(len(indices))
            if writer.count >= writer.settings["shard_size"]:
                writer.close()  # at once, so that a kill later does not lose this shard
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()


# ---- command line -----------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="tokenizer: model folder, run folder or pipeline folder")
    p.add_argument("--data", required=True, help="built-in name (digits, photos), image folder or .tar shards")
    p.add_argument("--out", required=True, type=Path, help="token folder (shards + manifest.json)")
    p.add_argument("--split", choices=["train", "eval", "all"], default="all",
                   help="which split to export (default: all = train and the held-out eval)")
    p.add_argument("--size", type=int, help="input size (default: the tokenizer's training size, else 32)")
    p.add_argument("--batch-size", type=int, default=64, help="items encoded per forward pass (default: 64)")
    p.add_argument("--shard-size", type=int, default=10000, help="samples per shard (default: 10000)")
    p.add_argument("--seed", type=int, default=0, help="seeds the training-split crops (deterministic)")
    p.add_argument("--num-workers", type=int, default=0, help="data-loading processes")
    p.add_argument("--stages", type=int, help="residual quantizers (kind rvq): export the first K stages of each "
                   "position (code stacks of depth K: a prior at a lower bitrate, which the pipeline samples and "
                   "decodes as such)")
    add_device_arguments(p)
    add_held_out_arguments(p)
    add_output_arguments(p)


def export_accelerator(device: str) -> Accelerator:
    """One process per device under `accelerate launch` (or one here): ``--device cpu`` keeps it on the CPU, ``auto``
    takes the device Accelerate gives this process, and a named device must be that one."""
    accelerator = Accelerator(cpu=device == "cpu")
    if device not in ("auto", "cpu") and resolve_device(device).type != accelerator.device.type:
        raise ValueError(f"--device {device}, but Accelerate gives this process {accelerator.device}: under "
                         "`accelerate launch` use --device auto")
    return accelerator


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> dict:
    if args is None:
        parser = argparse.ArgumentParser(prog="tokgen export-tokens", description=__doc__.split("\n")[0])
        add_arguments(parser)
        args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.model)
    accelerator = export_accelerator(args.device)
    splits = SPLITS if args.split == "all" else (args.split,)
    run_data = training_data(Path(args.model), args.size)
    datasets, held_out = {}, {}
    for name in splits:
        source, options = run_data.held_out(args.data, name, args.eval_fraction, args.eval_data)
        datasets[name] = build_dataset(source, modality=tokenizer.modality, split=name,
                                       channels=tokenizer.config.in_channels, sample_rate=tokenizer.sample_rate,
                                       seed=args.seed, process_index=accelerator.process_index,
                                       num_processes=accelerator.num_processes, **options)
        held_out[name] = held_out_report(source, options, datasets[name])
    manifest = export_tokens(tokenizer, datasets, args.out, batch_size=args.batch_size,
                             shard_size=args.shard_size, accelerator=accelerator, progress=not args.quiet,
                             seed=args.seed, num_workers=args.num_workers, source=str(args.data),
                             dtype=resolve_dtype(args.dtype), split_sources=held_out, num_stages=args.stages)
    if accelerator.is_main_process:
        splits = ", ".join(f"{k} {v['num_samples']}" for k, v in manifest["splits"].items())
        emit(args, f"tokens of {splits} inputs {manifest['input_shape']} -> "
                   f"{[list(level_code_shape(lv)) for lv in manifest['levels']]} codes written to {args.out}", manifest)
    return manifest
