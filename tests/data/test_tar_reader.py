"""data.tar_reader reads what tarfile and webdataset write, the same samples as webdataset's reader, and refuses
damaged files with a clear error."""
import io
import tarfile

import pytest
import torch
import webdataset as wds

from data.codes import codes_to_bytes
from data.tar_reader import tar_members, tar_samples


def add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float = 1.5) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), mtime
    tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_members_of_every_tar_format_tarfile_writes(tmp_path, fmt):
    long_dir = "d" * 120  # ustar: a prefix field; GNU: an 'L' long name; pax: a path record
    names = ["a.txt", f"{long_dir}/b.bin", "empty.dat", "x" * 99 + ".y"]
    if fmt == tarfile.USTAR_FORMAT:
        names.pop()  # a 101-character name with no folder does not fit ustar
    contents = [b"hello", bytes(range(256)) * 5, b"", b"z" * 513]
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        tar.addfile(tarfile.TarInfo("folder/"))  # an old-style directory and a directory are skipped
        dir_info = tarfile.TarInfo("sub")
        dir_info.type = tarfile.DIRTYPE
        tar.addfile(dir_info)
        for name, data in zip(names, contents):
            add(tar, name, data)
    assert list(tar_members(path)) == list(zip(names, contents))


def test_members_equal_tarfile(tmp_path):
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as tar:  # the default (pax) format with float mtimes: a pax header per member
        for i in range(20):
            add(tar, f"k{i}.codes.npz", bytes([i]) * (i * 37), mtime=1.25 + i)
    with tarfile.open(path) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    assert list(tar_members(path)) == expected


def test_samples_equal_webdatasets_reader_on_a_token_shard(tmp_path):
    path = tmp_path / "shard.tar"
    with open(path, "wb") as stream:
        writer = wds.TarWriter(stream, encoder=False)
        for i in range(30):
            writer.write({"__key__": f"sample_{i}", "codes.npz": codes_to_bytes([torch.full((1, 4, 4), i)], [64]),
                          "meta.json": b'{"label": %d}' % (i % 3)})
        writer.close()
    theirs = [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
              for s in wds.WebDataset(str(path), shardshuffle=False, nodesplitter=None, workersplitter=None,
                                      empty_check=False)]
    assert list(tar_samples(path)) == theirs


def _one_member_tar(tmp_path) -> bytes:
    path = tmp_path / "one.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        add(tar, "k.codes.npz", b"q" * 1000)
    return path.read_bytes()


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:700], "truncated"),  # cut inside the member's data
    (lambda b: b[:300], "truncated"),  # cut inside the header
    (lambda b: b[:148] + b"0000001\0" + b[156:], "checksum"),
    (lambda b: b[:148] + b"9999999\0" + b[156:], "bad number"),
    (lambda b: b[:124] + b"77777777777\0" + b[136:], "not a tar file or is corrupt"),  # size edited: checksum
    (lambda b: b"\x01" * 512 + b[512:], "not a tar file"),
])
def test_damaged_tars_are_refused_with_the_file_named(tmp_path, damage, message):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(damage(_one_member_tar(tmp_path)))
    with pytest.raises(ValueError, match=message) as err:
        list(tar_members(bad))
    assert "bad.tar" in str(err.value)


def test_a_claimed_size_past_the_end_of_the_file_allocates_nothing(tmp_path):
    header = bytearray(_one_member_tar(tmp_path)[:512])
    header[124:136] = b"77777777777\0"  # 8 GiB, with a correct checksum
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    bad = tmp_path / "huge.tar"
    bad.write_bytes(bytes(header) + bytes(1024))
    with pytest.raises(ValueError, match="claims 8589934592 bytes"):
        list(tar_members(bad))


def test_flipped_bytes_in_a_token_shard_read_or_fail_with_a_value_error(tmp_path):
    """Random damage to a shard of token samples: every read either succeeds or is one ValueError."""
    from data.tokens import _decode

    clean = tmp_path / "clean.tar"
    with open(clean, "wb") as stream:
        writer = wds.TarWriter(stream, encoder=False)
        for i in range(4):
            writer.write({"__key__": f"s{i}", "codes.npz": codes_to_bytes([torch.full((1, 3, 3), i)], [16]),
                          "meta.json": b'{"label": 1, "key": "s", "index": %d}' % i})
        writer.close()
    data, g = clean.read_bytes(), torch.Generator().manual_seed(0)
    bad, failures = tmp_path / "bad.tar", 0
    for trial in range(300):
        damaged = bytearray(data)
        for pos in torch.randint(0, len(data), (int(torch.randint(1, 4, (1,), generator=g)),), generator=g):
            damaged[int(pos)] ^= 1 << int(torch.randint(0, 8, (1,), generator=g))
        bad.write_bytes(bytes(damaged))
        try:
            for raw in tar_samples(bad):
                _decode(raw, [0], str(bad))
        except ValueError:
            failures += 1
    assert failures > 50  # most damage is caught (flips in padding or names are harmless)
