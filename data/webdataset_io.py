"""WebDataset (.tar shard) image reader.

Shards are split by process first (fixed assignment), then shuffled per epoch
(train), then split by DataLoader worker. One pass per ``iter()``; the training
loop re-creates iterators each epoch. Corrupt data never stops an epoch: it is
warned about and reported in the ``skipped`` list of a later sample.
"""

from __future__ import annotations

import io
import json
import os
import random
import warnings
from typing import Iterator

import braceexpand
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from .common import image_to_tensor, make_sample
from .folders import DEFAULT_EVAL_FRACTION, check_eval_fraction, check_split, path_hash

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff", "gif")


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside braces, so 'a.tar,b-{0,1}.tar' -> ['a.tar', 'b-{0,1}.tar']."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "{") - (ch == "}")
        if ch == sep and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current]


def expand_shards(source: str) -> list[str]:
    """Shard spec (path, comma/'::'-separated list, brace pattern) -> list of shard URLs."""
    shards = []
    for part in (p.strip() for chunk in source.split("::") for p in _split_top_level(chunk)):
        if part:
            shards.extend(braceexpand.braceexpand(part))
    return shards


def is_shard_source(source: str) -> bool:
    """Whether a ``--data`` value names WebDataset shards (rather than a built-in set or a folder)."""
    return ".tar" in source


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def sample_label(sample: dict) -> int:
    """Label from 'cls'/'label' (text int) or 'json' {"label": int}; -1 if absent."""
    for key in ("cls", "label"):
        if key in sample:
            return int(sample[key].decode().strip())
    if "json" in sample:
        return int(json.loads(sample["json"]).get("label", -1))
    return -1


class _SkipLog:
    """WebDataset exception handler: warn, remember the shard, keep going."""

    def __init__(self):
        self.current_shard = "?"
        self.pending: list[str] = []

    def add(self, entry: str, err: object) -> None:
        warnings.warn(f"skipping unreadable webdataset data {entry}: {err}")
        if not self.pending or self.pending[-1] != entry:  # one truncation may raise at several levels
            self.pending.append(entry)

    def __call__(self, exn: Exception) -> bool:
        # webdataset appends stream objects/urls to exn.args; the first arg is the real message
        self.add(self.current_shard, f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        return True  # continue with the next file/shard

    def drain(self) -> list[str]:
        out, self.pending = self.pending, []
        return out


class WebDatasetImages(IterableDataset):
    """Iterable dataset of image sample dicts from WebDataset tar shards.

    Sample keys: image from one of ``IMAGE_KEYS``; label via ``sample_label``;
    ``key`` = the tar ``__key__``. Skipped entries are "shard" (read errors) or
    "shard:key" (undecodable samples). The held-out split is by sample: a sample is held out when the hash of
    its key is below ``eval_fraction`` (0: both splits are every sample).
    """

    def __init__(
        self,
        source: str | list[str],
        *,
        split: str = "train",
        size: int = 32,
        channels: int = 3,
        seed: int = 0,
        process_index: int = 0,
        num_processes: int = 1,
        shuffle_buffer: int = 1000,
        eval_fraction: float = DEFAULT_EVAL_FRACTION,
    ):
        check_split(split)
        check_eval_fraction(eval_fraction)
        all_shards = expand_shards(source) if isinstance(source, str) else list(source)
        missing = [s for s in all_shards if _is_local(s) and not os.path.exists(s)]
        if not all_shards or missing:
            raise FileNotFoundError(f"webdataset shards not found: {missing or source!r}")
        # Static per-process assignment: every process must agree on it without communication.
        self.shards = all_shards[process_index::num_processes]
        if not self.shards:
            warnings.warn(f"process {process_index}/{num_processes} got no shards out of {len(all_shards)}")
        self.train, self.size, self.channels = split == "train", size, channels
        self.seed, self.shuffle_buffer, self.eval_fraction = seed, shuffle_buffer, eval_fraction

    def in_split(self, sample: dict) -> bool:
        """Whether a raw sample belongs to this split (by the hash of its key)."""
        if self.eval_fraction == 0:
            return True
        return (path_hash(str(sample.get("__key__"))) < self.eval_fraction) != self.train

    def _epoch_shards(self) -> list[str]:
        """This worker's shards for the current epoch (shuffled identically across workers when training)."""
        shards = list(self.shards)
        if self.train:
            info = get_worker_info()
            # DataLoader gives worker i the seed base+i, with base drawn from the global torch RNG;
            # base is therefore shared by all workers, new every epoch, and restored on resume.
            base = info.seed - info.id if info is not None else int(torch.randint(2**62, (1,)))
            random.Random(base + self.seed).shuffle(shards)
        return list(wds.split_by_worker(shards))

    def _open_shards(self, log: _SkipLog) -> Iterator[dict]:
        """{"url", "stream"} per shard of this worker; each stream is closed once its shard is consumed."""
        for url in self._epoch_shards():
            log.current_shard = url  # lets the handler name the shard being read
            try:
                stream = wds.gopen(url)
            except Exception as exn:
                log(exn)
                continue
            try:
                yield {"url": url, "stream": stream}
            finally:  # webdataset's own opener leaves files to the garbage collector
                stream.close()

    def _raw_samples(self, log: _SkipLog) -> Iterator[dict]:
        """Undecoded tar samples (dicts of bytes) of this worker, sample-shuffled when training."""
        samples = group_by_keys(tar_file_expander(self._open_shards(log), handler=log), handler=log)
        samples = (s for s in samples if self.in_split(s))
        if self.train and self.shuffle_buffer > 1:
            rng = random.Random(int(torch.randint(2**62, (1,))))  # per-worker seed from the global RNG
            samples = wds.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)(samples)
        return samples

    def decode(self, sample: dict) -> dict:
        """Raw tar sample -> sample dict; raises on missing/undecodable image."""
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None:
            raise ValueError(f"no image entry (have {sorted(k for k in sample if not k.startswith('__'))})")
        with Image.open(io.BytesIO(sample[image_key])) as img:
            x = image_to_tensor(img, self.size, self.channels, self.train)
        return make_sample(x, sample_label(sample), sample["__key__"])

    def __iter__(self) -> Iterator[dict]:
        log = _SkipLog()
        held = None  # one-sample lookahead so skips after the last sample still get reported
        for raw in self._raw_samples(log):
            try:
                decoded = self.decode(raw)
            except Exception as err:  # any decoder failure: report, never crash mid-epoch
                log.add(f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}", err)
                continue
            decoded["skipped"] = log.drain()
            if held is not None:
                yield held
            held = decoded
        if held is not None:
            held["skipped"] += log.drain()
            yield held
        elif log.pending:
            warnings.warn(f"no readable samples in this worker's shards; skipped: {log.pending}")
