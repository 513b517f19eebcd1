"""What the folder readers of every modality share: recursive file listing, labels from subfolders, and a
map-style dataset whose unreadable items are warned about, skipped in favour of the next index and reported
in the sample's ``skipped`` list."""
from __future__ import annotations

import os
import warnings

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
