"""What the folder readers of every modality share: recursive file listing, labels from subfolders, and a
map-style dataset whose unreadable items are warned about, skipped in favour of the next index and reported
in the sample's ``skipped`` list."""
from __future__ import annotations

import hashlib
import os
import warnings
from typing import Callable

from torch.utils.data import Dataset

SPLITS = ("train", "eval")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def list_media_files(root: str, extensions: tuple[str, ...]) -> list[str]:
    """Sorted relative POSIX paths of files under root whose suffix (any case) is in ``extensions``.

    Hidden files and folders (.git, macOS "._x" forks) are skipped: they are clutter, never data.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(extensions):
                found.append(os.path.normpath(os.path.join(rel_dir, name)).replace(os.sep, "/"))
    return sorted(found)


def folder_labels(files: list[str]) -> tuple[list[str], list[int]]:
    """ImageFolder convention: classes = sorted immediate subfolders; files at the root get -1."""
    classes = sorted({f.split("/")[0] for f in files if "/" in f})
    index = {name: i for i, name in enumerate(classes)}
    return classes, [index[f.split("/")[0]] if "/" in f else -1 for f in files]


class SkippingDataset(Dataset):
    """Map-style base: ``__getitem__`` tries ``load_item(i)`` for index, index + 1, ... (wrapping).

    Subclasses set ``self.kind`` (for messages) and implement ``__len__``, ``load_item(i) -> sample
    dict`` (raises on unreadable data) and ``item_path(i)``. ``self.unindexed`` lists files found
    unreadable while indexing (construction); they are reported in the ``skipped`` list of the
    sample at index 0, i.e. once per pass over the dataset.
    """

    kind = "file"
    unindexed: list[str] = []

    def item_path(self, i: int) -> str:
        raise NotImplementedError

    def load_item(self, i: int) -> dict:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if not 0 <= index < n:  # keeps plain `for sample in dataset` finite
            raise IndexError(index)
        skipped = list(self.unindexed) if index == 0 else []
        for offset in range(n):
            i = (index + offset) % n
            try:
                sample = self.load_item(i)
            except Exception as err:  # decoders raise many types (RuntimeError, ValueError, OSError...)
                path = self.item_path(i)
                warnings.warn(f"skipping unreadable {self.kind} {path}: {err}")
                skipped.append(path)
                continue
            sample["skipped"] = skipped + sample["skipped"]
            return sample
        raise RuntimeError(f"all {n} {self.kind} items are unreadable")


# ---- the held-out split of a user's folder --------------------------------------------------------
DEFAULT_EVAL_FRACTION = 0.1  # of a folder's files (or a shard set's samples) held out for evaluation


def path_hash(name: str) -> float:
    """A stable number in [0, 1) for a relative path or sample key: which side of the split it falls on."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64


def check_eval_fraction(eval_fraction: float) -> None:
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must lie in [0, 1) (0 = no held-out part), got {eval_fraction}")


def split_indices(files: list[str], split: str, eval_fraction: float,
                  readable: Callable[[str], bool] | None = None) -> list[int]:
    """Indices of ``files`` (relative paths) in ``split``: a file is held out when ``path_hash`` of its path is
    below ``eval_fraction``, so the split is stable when files are added, and train and eval never share a file.

    At least one file is held out and one kept for training; when ``readable`` is given and no held-out file is
    readable, the next files in hash order join the held-out ones until one is. ``eval_fraction`` 0: no split,
    both splits are every file.
    """
    check_split(split)
    check_eval_fraction(eval_fraction)
    if eval_fraction == 0:
        return list(range(len(files)))
    if len(files) < 2:
        raise ValueError(f"{len(files)} file cannot be split into training and held-out files: give more files, "
                         "eval_fraction 0 (evaluate on the training files) or a held-out source (--eval-data)")
    order = sorted(range(len(files)), key=lambda i: path_hash(files[i]))
    held = max(1, sum(path_hash(files[i]) < eval_fraction for i in order))
    if readable is not None:
        while held < len(files) - 1 and not any(readable(files[i]) for i in order[:held]):
            held += 1
    held_out = set(order[: min(held, len(files) - 1)])
    if split == "eval":
        return sorted(held_out)
    return [i for i in range(len(files)) if i not in held_out]
