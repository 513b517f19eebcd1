"""Samples of a local tar shard, read straight from the headers.

Why not ``tarfile`` (or WebDataset's reader, built on it): its stream parser costs about 100 us per member, and a
token sample is two small members (``codes.npz``, ``meta.json``): parsing the tar cost as much as decoding the
codes, and the two together a tenth of a CPU prior's training step (BENCHMARKS.md §11b). The format read here
is what ``tarfile``/``webdataset.TarWriter`` write: POSIX ustar headers, with pax extended headers (``x``: a long
path, a size) and GNU long names (``L``) in front of a member; directories, links and global headers are skipped.
The input is untrusted: a header with a bad checksum, a size past the end of the file or a cut-off member is a
``ValueError`` naming the file, and nothing larger than the file is ever allocated.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Iterator

BLOCK = 512
REGULAR = (b"0", b"\0", b"7")  # "7": contiguous file, read as a regular one (as tarfile does)


def _number(field: bytes, path: Path) -> int:
    """A header number: octal digits, or GNU base-256 when the first byte has its top bit set."""
    if field and field[0] & 0x80:
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    digits = field.replace(b"\0", b" ").strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise ValueError(f"{path} is not a tar file: bad number {field!r} in a header") from None


def _check_header(header: bytes, path: Path) -> None:
    # the checksum is the byte sum of the header with its own field read as eight spaces
    expected = _number(header[148:156], path)
    actual = sum(header[:148]) + 8 * 32 + sum(header[156:])
    if expected != actual:
        raise ValueError(f"{path} is not a tar file or is corrupt (header checksum {expected} != {actual})")


def _pax_fields(data: bytes, path: Path) -> dict[str, str]:
    """Records ``"<length> <key>=<value>\\n"`` of a pax extended header."""
    fields, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise ValueError(f"{path} has a malformed pax header") from None
        if space < 0 or length <= 0 or pos + length > len(data):
            raise ValueError(f"{path} has a malformed pax header")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        fields[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return fields


def _read(stream: BinaryIO, size: int, remaining: int, path: Path) -> bytes:
    if size > remaining:
        raise ValueError(f"{path} is truncated: a member claims {size} bytes, {remaining} are left")
    data = stream.read(size)
    if len(data) != size:
        raise ValueError(f"{path} is truncated")
    return data


def tar_members(path: str | Path) -> Iterator[tuple[str, bytes]]:
    """(name, contents) of every regular file in the tar at ``path``, in order."""
    path = Path(path)
    with open(path, "rb") as stream:
        left = os.fstat(stream.fileno()).st_size
        long_name, pax = None, {}
        while left >= BLOCK:
            header = stream.read(BLOCK)
            left -= BLOCK
            if header == bytes(BLOCK):  # end-of-archive marker
                return
            _check_header(header, path)
            kind = header[156:157]
            size = _number(header[124:136], path)
            if kind not in (b"x", b"g") and "size" in pax:  # a pax size stands for the member it precedes
                size = int(pax["size"]) if pax["size"].isdigit() else size
            padded = -(-size // BLOCK) * BLOCK
            data = _read(stream, padded, left, path)[:size]
            left -= padded
            if kind == b"x":
                pax = _pax_fields(data, path)
            elif kind == b"L":
                long_name = data.rstrip(b"\0").decode("utf-8", "replace")
            elif kind in REGULAR:
                name = long_name or pax.get("path") or _ustar_name(header)
                if not name.endswith("/"):  # a regular entry named "dir/": an old-style directory
                    yield name, data
                long_name, pax = None, {}
            else:  # directories, links, global headers: nothing to read
                long_name, pax = None, {}
        if left:
            raise ValueError(f"{path} is truncated: it ends inside a header")


def _ustar_name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
    return (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")


def tar_samples(path: str | Path) -> Iterator[dict[str, bytes | str]]:
    """WebDataset samples of a tar: consecutive members ``KEY.EXT`` grouped as ``{"__key__": KEY, EXT: bytes}``
    (the key ends at the first dot of the file name, as in WebDataset)."""
    sample: dict = {}
    for name, data in tar_members(path):
        folder, _, base = name.rpartition("/")
        stem, dot, ext = base.partition(".")
        if not dot:
            continue  # no extension: not part of a sample (WebDataset skips it too)
        key = f"{folder}/{stem}" if folder else stem
        if sample and sample["__key__"] != key:
            yield sample
            sample = {}
        if ext in sample:
            raise ValueError(f"{path} holds {key}.{ext} twice in a row")
        sample.setdefault("__key__", key)
        sample[ext] = data
    if sample:
        yield sample
