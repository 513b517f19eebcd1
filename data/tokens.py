"""Token folders (written by ``tokgen export-tokens``): the data priors train and evaluate on.

Layout of a token folder::

    manifest.json                     written last, atomically, once every process is done
    train-00-000000.tar               shards of split "train" written by rank 00
    train-00-000000.tar.json          sidecar: sample count, labels, skipped inputs, settings
    train-00.done.json                rank 00 finished split "train"
    eval-00-000000.tar ...

Each sample of a shard holds ``__key__``, ``codes.npz`` (the codes layout of :mod:`data.codes`, N = 1) and
``meta.json`` ``{"label", "key", "index"}``.

Code stacks (a residual quantizer's codes, several stages per position): a level's manifest entry then adds
``"depth"`` (the stages) and ``"stage_codebook_sizes"`` (one per stage; ``"codebook_size"`` is their maximum and
``"dtype"`` the smallest that holds it), and its codes are ``(*grid, depth)``, the stages last. Such a folder is
format version 3; folders without stacks are still written as version 2, byte for byte as before, so that
older tokgen reads them. Writing is :mod:`data.token_writer`; reading is here:

* :func:`read_manifest` / :func:`check_tokenizer`: what a token folder holds, and whether it was made
  by the tokenizer a prior belongs to.
* :class:`TokenDataset`: streams a split's shards (:mod:`data.tar_reader`), split by process then by data-loader
  worker, shuffled deterministically per epoch (``set_epoch``).
* :func:`load_all`: a whole (small) split in memory, in dataset-index order.
* :func:`collate_tokens`: batches the samples of either.
"""
from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from typing import Iterator, Sequence

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from .codes import codes_to_bytes, load_codes
from .tar_reader import tar_samples

FORMAT = "tokgen-tokens"
VERSION = 3  # the newest this tokgen reads: 3 adds code stacks (levels with "depth")
FLAT_VERSION = 2  # 2: one codes.npz entry per sample (version 1 had codes.npy / codes_K.npy); written without stacks
MANIFEST = "manifest.json"
CODES_ENTRY = "codes.npz"
META_ENTRY = "meta.json"
SHARD = "__shard__"  # which shard a raw sample came from (for error messages)
SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<rank>\d{2})-(?P<index>\d{6})\.tar$")


def shard_name(split: str, rank: int, index: int) -> str:
    return f"{split}-{rank:02d}-{index:06d}.tar"


def safe_key(key: str, index: int) -> str:
    """A WebDataset ``__key__``: no dots (they separate key and extension) and no slashes."""
    key = re.sub(r"[./\\]", "_", str(key)).strip()
    return key or f"item_{index}"


def encode_sample(wkey: str, codes: list[torch.Tensor], codebook_sizes: list[int], label: int, key: str,
                  index: int) -> dict:
    """One shard sample: codes per level (*grid) or (*grid, depth), top first, in the codes layout (a batch of one)."""
    return {"__key__": wkey, CODES_ENTRY: codes_to_bytes([c[None] for c in codes], codebook_sizes),
            META_ENTRY: json.dumps({"label": int(label), "key": key, "index": int(index)}).encode()}


def read_manifest(path: str | Path) -> dict:
    """``path/manifest.json`` with clear errors for a missing folder, unfinished export or wrong file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"token folder {path} does not exist: make it with `tokgen export-tokens MODEL --data SRC --out {path}`"
        )
    if not path.is_dir():
        raise ValueError(f"{path} is a file, not a token folder (the --out folder of `tokgen export-tokens`)")
    file = path / MANIFEST
    if not file.is_file():
        partial = any(path.glob("*.tar")) or any(path.glob("*.tar.tmp"))
        hint = ("the export did not finish: re-run the same `tokgen export-tokens` command to resume it"
                if partial else "it is not a token folder made by `tokgen export-tokens`")
        raise FileNotFoundError(f"{file} not found: {hint}")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON ({err}): re-run `tokgen export-tokens`") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{file} is not a tokgen token manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                         f"expected {FORMAT!r})")
    if manifest.get("version", 0) > VERSION:
        raise ValueError(f"{file} has format version {manifest['version']}; this tokgen reads up to {VERSION}: "
                         "upgrade tokgen")
    if manifest.get("version", 0) < FLAT_VERSION:
        raise ValueError(f"{file} was written by tokgen 0.1 in the old shard layout (version "
                         f"{manifest.get('version')}): re-export the tokens with `tokgen export-tokens`")
    for field in ("tokenizer_fingerprint", "levels", "splits", "input_shape"):
        if field not in manifest:
            raise ValueError(f"{file} lacks the field {field!r}: re-run `tokgen export-tokens`")
    return manifest


def check_tokenizer(manifest: dict, fingerprint: str) -> None:
    """Raise ``ValueError`` unless the tokens were made by the tokenizer with ``fingerprint``."""
    made_by = str(manifest.get("tokenizer_fingerprint", ""))
    if made_by != fingerprint:
        raise ValueError(
            f"these tokens were made by tokenizer {made_by[:12] or '<unknown>'}, but the prior is for tokenizer "
            f"{str(fingerprint)[:12]}: re-export the tokens with this tokenizer (tokgen export-tokens)"
        )


def level_depth(level: dict) -> int:
    """A manifest level entry's stages per position: 0 for one code per position (no ``"depth"``)."""
    return int(level.get("depth", 0))


def level_code_shape(level: dict) -> tuple[int, ...]:
    """The shape of one item's codes of a manifest level: its grid, plus the stages last for a code stack."""
    depth = level_depth(level)
    return (*level["grid_shape"], depth) if depth else tuple(level["grid_shape"])


def level_stage_sizes(level: dict) -> list[int]:
    """A manifest level's codebook size per stage (one entry without stacks)."""
    return [int(k) for k in level.get("stage_codebook_sizes", [level["codebook_size"]])]


def _split_info(manifest: dict, split: str, path: Path) -> dict:
    splits = manifest["splits"]
    if split not in splits:
        raise ValueError(f"{path} has no {split!r} split (it has {sorted(splits)}): export it with "
                         f"`tokgen export-tokens ... --split {split}`")
    return splits[split]


def _levels(manifest: dict, levels: Sequence[int] | None) -> list[int]:
    n = len(manifest["levels"])
    if levels is None:
        return list(range(n))
    chosen = [int(lv) for lv in levels]
    bad = [lv for lv in chosen if not 0 <= lv < n]
    if bad:
        raise ValueError(f"levels {bad} do not exist: these tokens have {n} level(s) (0 = top)")
    return chosen


def _decode(sample: dict, levels: list[int], where: str) -> dict:
    """Raw WebDataset sample (bytes) -> {"codes": [LongTensor (*grid) or (*grid, depth)], "label", "key", "index"}."""
    if CODES_ENTRY not in sample:
        raise ValueError(f"sample {sample.get('__key__')} in {where} lacks {CODES_ENTRY}")
    codes = load_codes(sample[CODES_ENTRY])
    try:
        meta = json.loads(sample[META_ENTRY]) if META_ENTRY in sample else {}
        return {"codes": [codes[lv][0] for lv in levels], "label": int(meta.get("label", -1)),
                "key": str(meta.get("key", sample.get("__key__"))), "index": int(meta.get("index", -1))}
    except (TypeError, AttributeError, IndexError) as err:  # valid JSON of the wrong shape, too few levels
        raise ValueError(f"sample {sample.get('__key__')} in {where} is damaged: {err}") from err


def _out_of_range(codes: torch.Tensor, stage_sizes: list[int]) -> bool:
    """Whether codes (*grid) or a stack (*grid, depth) hold a value outside [0, size) of their (stage's) codebook."""
    if int(codes.min()) < 0:
        return True
    if len(stage_sizes) == 1:
        return int(codes.max()) >= stage_sizes[0]
    return bool((codes.reshape(-1, len(stage_sizes)).amax(0) >= torch.tensor(stage_sizes)).any())


def _check_codes(sample: dict, shapes: list[tuple], sizes: list[list[int]], levels: list[int], where: str) -> None:
    """A decoded sample's codes have the manifest's shapes and lie in [0, codebook size) (each stage's, for a
    stack): damaged or foreign files stop here with the file named, not in the prior's embedding."""
    for c, shape, stage_sizes, lv in zip(sample["codes"], shapes, sizes, levels):
        if tuple(c.shape) != shape:
            raise ValueError(f"sample {sample['key']!r} in {where} has a level-{lv} grid of shape "
                             f"{tuple(c.shape)}, but the manifest says {shape}")
        if c.numel() and _out_of_range(c, stage_sizes):
            bound = stage_sizes[0] if len(stage_sizes) == 1 else f"codebook size) of its stage {stage_sizes}"
            raise ValueError(f"sample {sample['key']!r} in {where} has level-{lv} codes outside [0, {bound}): "
                             "the files are corrupt")


class TokenDataset(IterableDataset):
    """A split of a token folder as a stream of ``{"codes": [LongTensor (*grid) or (*grid, depth)], "label", "key"}``.

    With ``shuffle`` > 0 the shard order and a buffer of that many samples are shuffled, seeded by ``seed + epoch``
    (call ``set_epoch(e)`` before each epoch); ``shuffle=0`` reads in shard order. Shards are split by data-loader
    worker, and between processes (``process_index`` of ``num_processes``) in one of two ways:

    * ``split_by="sample"``: every process reads every shard in the same seeded order and keeps every
      ``num_processes``-th sample of it, so the processes' batches together are the batches one process would
      see: a 2-process run equals a 1-process run at the same global batch. Reading grows with the processes.
    * ``split_by="shard"``: processes read disjoint shards (when there are fewer shards than processes, they fall
      back to "sample"): reading is split, but the batches are not those of a 1-process run.

    ``levels``: which code levels to yield (0 = top), default all.
    """

    def __init__(self, path: str | Path, split: str = "train", levels: Sequence[int] | None = None, *,
                 shuffle: int = 1000, seed: int = 0, process_index: int = 0, num_processes: int = 1,
                 split_by: str = "sample"):
        super().__init__()
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.split = split
        info = _split_info(self.manifest, split, self.path)
        self.levels = _levels(self.manifest, levels)
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} is not in [0, {num_processes})")
        self.process_index, self.num_processes = process_index, num_processes
        self.shuffle, self.seed, self.epoch = int(shuffle), int(seed), 0
        shards = list(info["shards"])
        missing = [s for s in shards if not (self.path / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) listed in {self.path / MANIFEST} are missing, "
                                    f"e.g. {self.path / missing[0]}: re-run `tokgen export-tokens`")
        counts = info.get("shard_samples")
        if split_by not in ("sample", "shard"):
            raise ValueError(f"split_by must be 'sample' or 'shard', got {split_by!r}")
        self.by_sample = split_by == "sample" or len(shards) < num_processes
        if self.by_sample:
            self.shards = shards
            n = int(info["num_samples"])
            self._len = n // num_processes + (process_index < n % num_processes)
        else:
            self.shards = shards[process_index::num_processes]
            self._len = (sum(counts[process_index::num_processes]) if counts is not None
                         else math.ceil(int(info["num_samples"]) / num_processes))

    # ---- what the prior needs to know ------------------------------------------------------------
    @property
    def grid_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(self.manifest["levels"][lv]["grid_shape"]) for lv in self.levels]

    @property
    def code_shapes(self) -> list[tuple[int, ...]]:
        """One sample's codes per level: the grid, plus the stages last for a code stack."""
        return [level_code_shape(self.manifest["levels"][lv]) for lv in self.levels]

    @property
    def depths(self) -> list[int]:
        """Stages per position of each level (0: one code per position)."""
        return [level_depth(self.manifest["levels"][lv]) for lv in self.levels]

    @property
    def codebook_sizes(self) -> list[int]:
        return [int(self.manifest["levels"][lv]["codebook_size"]) for lv in self.levels]

    @property
    def stage_codebook_sizes(self) -> list[list[int]]:
        return [level_stage_sizes(self.manifest["levels"][lv]) for lv in self.levels]

    @property
    def num_classes(self) -> int:
        return int(self.manifest.get("num_classes", 0))

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # ---- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        base = (self.seed + self.epoch) * 1_000_003
        # by sample, every process draws the same order (then keeps its share); by shard, each its own
        order_seed = 0 if self.by_sample else self.process_index
        shards = list(self.shards)
        if self.shuffle > 0:  # same permutation in every worker of a process, new every epoch
            random.Random(base + order_seed).shuffle(shards)
        if not shards:
            return
        if info is not None:  # each data-loader worker reads its own shards
            shards = shards[info.id :: info.num_workers]
        # the shuffle buffer holds the samples' bytes, decoded only once drawn (and only by the process keeping
        # them): a buffer of decoded tensors fragments the heap, its resident size grew by ~100 MiB
        ds = ({**raw, SHARD: s} for s in shards for raw in tar_samples(self.path / s))
        if self.shuffle > 1:
            rng = random.Random(base + 7919 * order_seed + 104_729 * worker + 1)
            ds = wds.shuffle(self.shuffle, initial=min(100, self.shuffle), rng=rng)(ds)
        rank, world = self.process_index, self.num_processes
        shapes, sizes = self.code_shapes, self.stage_codebook_sizes
        for n, raw in enumerate(ds):
            if not self.by_sample or n % world == rank:
                where = str(self.path / raw[SHARD])
                sample = _decode(raw, self.levels, where)
                _check_codes(sample, shapes, sizes, self.levels, where)
                yield {"codes": sample["codes"], "label": sample["label"], "key": sample["key"]}


def load_all(path: str | Path, split: str = "train", levels: Sequence[int] | None = None
             ) -> tuple[list[torch.Tensor], torch.Tensor, list[str]]:
    """A whole split in memory: ([LongTensor (N, *grid) per level; (N, *grid, depth) for a code stack], labels (N,),
    keys), in index order.

    Checks every grid against the manifest's shapes and codebook sizes and the count against its
    ``num_samples``.
    """
    path = Path(path)
    manifest = read_manifest(path)
    info = _split_info(manifest, split, path)
    chosen = _levels(manifest, levels)
    shapes = [level_code_shape(manifest["levels"][lv]) for lv in chosen]
    sizes = [level_stage_sizes(manifest["levels"][lv]) for lv in chosen]
    samples = []
    for shard in info["shards"]:
        file = path / shard
        if not file.is_file():
            raise FileNotFoundError(f"shard {file} listed in {path / MANIFEST} is missing: re-run `tokgen export-tokens`")
        for raw in tar_samples(file):
            s = _decode(raw, chosen, str(file))
            _check_codes(s, shapes, sizes, chosen, str(file))
            samples.append(s)
    if len(samples) != int(info["num_samples"]):
        raise ValueError(f"{path} ({split}) holds {len(samples)} samples but its manifest says "
                         f"{info['num_samples']}: re-run `tokgen export-tokens`")
    samples.sort(key=lambda s: s["index"])
    if samples:
        codes = [torch.stack([s["codes"][i] for s in samples]) for i in range(len(chosen))]
    else:
        codes = [torch.empty((0, *shape), dtype=torch.long) for shape in shapes]
    labels = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    return codes, labels, [s["key"] for s in samples]


def collate_tokens(samples: list[dict]) -> dict:
    """Batch TokenDataset samples: {"codes": [LongTensor (B, *grid) or (B, *grid, depth)], "label": LongTensor (B,),
    "key": [...]}."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    num_levels = len(samples[0]["codes"])
    return {
        "codes": [torch.stack([s["codes"][lv] for s in samples]) for lv in range(num_levels)],
        "label": torch.tensor([int(s["label"]) for s in samples], dtype=torch.long),
        "key": [s["key"] for s in samples],
    }
