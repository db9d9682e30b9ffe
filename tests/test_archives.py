"""archives.py on real tar and zip files written by tarfile and zipfile (and patched by hand where a writer
would not misbehave): listings equal tarfile's and zipfile's, bytes equal, damage lists what came before it,
bombs and liars are error values, nothing is ever written."""

from __future__ import annotations

import gzip
import io
import os
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmnist_onnx import archives, images
from fmnist_onnx.archives import ArchiveDamaged
from fmnist_onnx.data import DEBIAN_DIR
from fmnist_onnx.images import ImageError


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    """Eight Fashion-MNIST test images as PNG files' bytes."""
    raw = gzip.open(DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").read()
    out = []
    for a in np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:8]:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def shard(pngs: list[bytes], names=None) -> list[tuple[str, bytes]]:
    """WebDataset layout: 00000.png with its 00000.cls sidecar."""
    names = names or [f"{i:05d}.png" for i in range(len(pngs))]
    out = []
    for i, (name, data) in enumerate(zip(names, pngs, strict=False)):
        out += [(name, data), (name.rsplit(".", 1)[0] + ".cls", str(i % 10).encode())]
    return out


def write_tar(path: Path, members, fmt=tarfile.GNU_FORMAT, mode="w", extras=True) -> Path:
    """Members as regular files, plus a folder (no row), a symlink and a hard link to the first member."""
    with tarfile.open(path, mode, format=fmt) as tf:
        if extras:
            folder = tarfile.TarInfo("Bag")
            folder.type = tarfile.DIRTYPE
            tf.addfile(folder)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if extras:
            for kind, name in ((tarfile.SYMTYPE, "link"), (tarfile.LNKTYPE, "hard")):
                link = tarfile.TarInfo(name)
                link.type, link.linkname = kind, members[0][0]
                tf.addfile(link)
    return path


def tarfile_members(path: Path) -> list[tuple[str, int, bytes]]:
    """(name, data offset, bytes) of the regular members and of the links to one, as tarfile resolves them."""
    out = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            target = m
            try:
                while target.islnk() or target.issym():  # a link to a link: followed
                    target = tf._find_link_target(target)
            except KeyError:  # a link to nothing in the archive
                continue
            if target.isreg():
                out.append((m.name, target.offset_data, tf.extractfile(target).read()))
    return out


def rewrite_header(path: Path, at: int, signed: bool = False, **fields) -> None:
    """Change fields of the header at byte ``at`` (name, size as raw 12 bytes) and write a valid checksum
    (``signed``: summing signed chars, as old tars did)."""
    with open(path, "r+b") as f:
        f.seek(at)
        block = bytearray(f.read(512))
        if "size" in fields:
            block[124:136] = fields["size"]
        if "name" in fields:
            block[0:100] = fields["name"].ljust(100, b"\0")
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % sum(b - 256 if signed and b > 127 else b for b in block)
        f.seek(at)
        f.write(block)


def tree(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))


# ---------------------------------------------------------------------------------------------- tar


LONG = "Ankle boot/" + "very-long-folder-name/" * 6 + "00001.png"  # > 100 bytes: GNU 'L' or pax path


@pytest.mark.parametrize("fmt, names", [
    (tarfile.USTAR_FORMAT, ["Bag/00000.png", "p" * 90 + "/" + "q" * 90 + ".png"]),  # the ustar prefix field
    (tarfile.GNU_FORMAT, [LONG, "caf\udce9.png"]),  # a Latin-1 byte in a name: not UTF-8, kept (surrogateescape)
    (tarfile.PAX_FORMAT, [LONG, "Été/chaussure-🥾.png"]),
])
def test_tar_listing_and_bytes_equal_tarfiles(tmp_path, pngs, fmt, names):
    path = write_tar(tmp_path / "shard.tar", shard(pngs[:2], names), fmt)
    index = archives.index_tar(str(path))
    want = tarfile_members(path)
    assert index.names == [name for name, _, _ in want]
    assert list(index.offsets) == [at for _, at, _ in want]
    assert archives.read_tar(str(path), index.offsets, index.sizes) == [data for _, _, data in want]
    assert index.damage is None


def test_tar_without_end_blocks_is_whole(tmp_path, pngs):
    path = write_tar(tmp_path / "s.tar", shard(pngs[:2]), extras=False)
    index = archives.index_tar(str(path))
    with open(path, "r+b") as f:
        f.truncate(index.offsets[-1] + index.sizes[-1])  # as some writers leave it: no zero blocks, no padding
    again = archives.index_tar(str(path))
    assert again.names == index.names and again.damage is None


def test_tar_cut_mid_member_lists_those_before(tmp_path, pngs):
    path = write_tar(tmp_path / "s.tar", shard(pngs[:3]), extras=False)
    whole = archives.index_tar(str(path))
    with open(path, "r+b") as f:
        f.truncate(whole.offsets[4] + 10)  # 10 bytes into 00002.png
    index = archives.index_tar(str(path))
    assert index.names == whole.names[:4]
    assert index.damage == (f"truncated member '00002.png' at byte {whole.offsets[4] - 512} (after member "
                            f"'00001.cls'): {whole.sizes[4]} bytes declared, the file ends at byte "
                            f"{whole.offsets[4] + 10}")


def test_tar_cut_mid_header_lists_those_before(tmp_path, pngs):
    path = write_tar(tmp_path / "s.tar", shard(pngs[:2]), extras=False)
    whole = archives.index_tar(str(path))
    at = whole.offsets[2] - 512
    with open(path, "r+b") as f:
        f.truncate(at + 100)
    index = archives.index_tar(str(path))
    assert index.names == whole.names[:2]
    assert index.damage == f"truncated header (100 of 512 bytes) at byte {at} (after member '00000.cls')"


def test_tar_bad_checksum_is_damage(tmp_path, pngs):
    path = write_tar(tmp_path / "s.tar", shard(pngs[:2]), extras=False)
    whole = archives.index_tar(str(path))
    at = whole.offsets[2] - 512
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(b"X")  # the name changes, the checksum does not
    index = archives.index_tar(str(path))
    assert index.names == whole.names[:2]
    assert index.damage == f"bad header checksum at byte {at} (after member '00000.cls')"


def test_tar_member_larger_than_the_file_is_damage(tmp_path, pngs):
    path = write_tar(tmp_path / "s.tar", shard(pngs[:2]), extras=False)
    whole = archives.index_tar(str(path))
    rewrite_header(path, whole.offsets[3] - 512, size=b"%011o\0" % 10**9)
    index = archives.index_tar(str(path))
    assert index.names == whole.names[:3]
    assert "truncated member '00001.cls'" in index.damage and "1000000000 bytes declared" in index.damage


def test_read_tar_short_member_is_an_error_value(tmp_path, pngs):
    path = write_tar(tmp_path / "s.tar", shard(pngs[:2]), extras=False)
    index = archives.index_tar(str(path))
    with open(path, "r+b") as f:
        f.truncate(index.offsets[2] + 5)  # the file shrank after it was indexed
    got = archives.read_tar(str(path), index.offsets, index.sizes)
    assert got[:2] == [pngs[0], b"0"]
    assert str(got[2]) == f"truncated member (5 of {index.sizes[2]} bytes in the file)"
    assert isinstance(got[3], ImageError)


def test_tar_signed_checksum_and_base256_size_are_read_as_tarfile_does(tmp_path, pngs):
    path = write_tar(tmp_path / "s.tar", shard(pngs[:1]), extras=False)
    base256 = b"\x80" + len(pngs[0]).to_bytes(11, "big")
    rewrite_header(path, 0, signed=True, name="caf\xe9.png".encode("latin-1"), size=base256)
    index = archives.index_tar(str(path))
    assert index.names == [n for n, _, _ in tarfile_members(path)] == ["caf\udce9.png", "00000.cls"]
    assert archives.read_tar(str(path), index.offsets, index.sizes) == [pngs[0], b"0"]


def test_tar_holding_a_tar_lists_its_own_members_only(tmp_path, pngs):
    """An inner tar's headers sit block-aligned in the outer one's data and look like members: the numpy pass
    must stop there and the loop go on, never list them."""
    inner = write_tar(tmp_path / "inner.tar", shard(pngs[:3]), extras=False).read_bytes()
    members = shard(pngs[:2]) + [("inner.tar", inner)] + shard(pngs[2:4], ["00002.png", "00003.png"])
    path = write_tar(tmp_path / "outer.tar", members, tarfile.USTAR_FORMAT, extras=False)
    index = archives.index_tar(str(path))
    assert index.names == [n for n, _, _ in tarfile_members(path)] == [n for n, _ in members]
    assert index.damage is None


def test_tar_name_with_bytes_after_its_nul_is_read_as_tarfile_does(tmp_path, pngs):
    path = write_tar(tmp_path / "s.tar", shard(pngs[:3]), tarfile.USTAR_FORMAT, extras=False)
    whole = archives.index_tar(str(path))
    rewrite_header(path, whole.offsets[2] - 512, name=b"00001.png\0junk")
    index = archives.index_tar(str(path))
    assert index.names == [n for n, _, _ in tarfile_members(path)]
    assert index.names[2] == "00001.png"


def tar_with_a_folder(path: Path, members, fmt: int, folder_at: int, mtime: float = 0) -> Path:
    """``members`` written by tarfile in ``fmt``, a folder entry ("Bag") before the one at ``folder_at``."""
    with tarfile.open(path, "w", format=fmt) as tf:
        for i, (name, data) in enumerate(members):
            if i == folder_at:
                folder = tarfile.TarInfo("Bag")
                folder.type = tarfile.DIRTYPE
                tf.addfile(folder)
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tf.addfile(info, io.BytesIO(data))
    return path


def test_tar_listing_is_whole_across_windows(tmp_path, pngs, monkeypatch):
    """Headers are checked a window at a time (thousands in a real shard); three here, so the chain crosses
    window ends, one of them at a folder's header that only the loop lists past."""
    monkeypatch.setattr(archives, "_WINDOW", 3)
    path = tar_with_a_folder(tmp_path / "s.tar", shard(pngs[:8]), tarfile.USTAR_FORMAT, folder_at=7)
    index = archives.index_tar(str(path))
    assert index.names == [n for n, _, _ in tarfile_members(path)]
    assert list(index.offsets) == [at for _, at, _ in tarfile_members(path)]
    assert len(index.names) == 16


def test_tar_huge_pax_record_is_damage(tmp_path, pngs):
    members = [("00000.png", pngs[0]), ("x" * (1 << 20) + ".png", pngs[1])]
    path = write_tar(tmp_path / "s.tar", members, tarfile.PAX_FORMAT, extras=False)
    index = archives.index_tar(str(path))
    assert index.names == ["00000.png"]
    assert index.damage.startswith("pax record of ") and "(limit 1048576)" in index.damage


def test_tar_member_over_the_limit_is_an_error_value(tmp_path, pngs):
    """A 300 MB member, as a hole in a sparse file: listed, never read, in the index and in the stream."""
    path = tmp_path / "big.tar"
    write_tar(path, [("big.png", b"")], tarfile.USTAR_FORMAT, extras=False)
    size = 300 << 20
    rewrite_header(path, 0, size=b"%011o\0" % size)
    with open(path, "r+b") as f:
        f.truncate(512 + size + 1024)
        f.seek(512 + size + 1024)
        f.write(bytes(1024))
    index = archives.index_tar(str(path))
    assert index.names == ["big.png"] and index.damage is None
    error = f"member too large ({size} bytes, limit {images.MAX_FILE_BYTES})"
    assert [str(e) for e in archives.read_tar(str(path), index.offsets, index.sizes)] == [error]
    assert [(n, str(e)) for n, e in archives.iter_tar_stream(str(path))] == [("big.png", error)]


@pytest.mark.parametrize("mode, suffix", [("w:gz", ".tar.gz"), ("w:bz2", ".tar.bz2"), ("w:xz", ".tar.xz")])
def test_compressed_stream_equals_plain(tmp_path, pngs, mode, suffix):
    members = shard(pngs[:3], ["Bag/00000.png", LONG, "Été.png"])
    plain = write_tar(tmp_path / "s.tar", members, tarfile.PAX_FORMAT, extras=False)
    packed = write_tar(tmp_path / ("s" + suffix), members, tarfile.PAX_FORMAT, mode, extras=False)
    index = archives.index_tar(str(plain))
    want = list(zip(index.names, archives.read_tar(str(plain), index.offsets, index.sizes), strict=True))
    assert list(archives.iter_tar_stream(str(packed))) == want == members
    assert archives.archive_kind(str(packed)) == "tgz"


def test_compressed_stream_cut_short_yields_the_good_members_then_raises(tmp_path, pngs):
    path = write_tar(tmp_path / "s.tar.gz", shard(pngs), mode="w:gz", extras=False)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    got = []
    with pytest.raises(ArchiveDamaged, match=r"(compressed data broken|truncated member) .*after member '0000"):
        for name, member in archives.iter_tar_stream(str(path)):
            got.append((name, member))
    assert 0 < len(got) < 16 and got == shard(pngs)[:len(got)]


def test_not_an_archive_is_archive_damaged(tmp_path, pngs):
    fake = tmp_path / "photo.tar"
    fake.write_bytes(pngs[0] * 10)
    empty = tmp_path / "empty.tar.gz"
    empty.write_bytes(b"")
    with pytest.raises(ArchiveDamaged, match="^not a tar archive$"):
        archives.index_tar(str(fake))
    with pytest.raises(ArchiveDamaged, match="^not a tar archive"):
        list(archives.iter_tar_stream(str(empty)))
    with pytest.raises(ArchiveDamaged, match="^not a zip archive: "):
        archives.index_zip(str(fake))
    with pytest.raises(ArchiveDamaged, match="^not a regular file$"):
        archives.index_tar(str(tmp_path))


def test_archive_kind_by_suffix():
    kinds = {name: archives.archive_kind(name) for name in
             ["a.tar", "B.TAR", "a.tar.gz", "a.TGZ", "a.tar.bz2", "a.tar.xz", "a.zip", "a.Zip", "a.gz", "a.png"]}
    assert kinds == {"a.tar": "tar", "B.TAR": "tar", "a.tar.gz": "tgz", "a.TGZ": "tgz", "a.tar.bz2": "tgz",
                     "a.tar.xz": "tgz", "a.zip": "zip", "a.Zip": "zip", "a.gz": None, "a.png": None}


def test_hostile_names_are_listed_and_nothing_is_written(tmp_path, pngs, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # a folder of its own: nothing else writes there meanwhile
    members = [("../../escape.png", pngs[0]), ("/etc/cron.d/x.png", pngs[1]), ("a/../../b.png", pngs[2])]
    tar = write_tar(tmp_path / "s.tar", members, tarfile.PAX_FORMAT, extras=False)
    tgz = write_tar(tmp_path / "s.tgz", members, tarfile.PAX_FORMAT, "w:gz", extras=False)
    with zipfile.ZipFile(tmp_path / "s.zip", "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
    before, cwd = tree(tmp_path), sorted(os.listdir("."))
    index = archives.index_tar(str(tar))
    zindex = archives.index_zip(str(tmp_path / "s.zip"))
    names = [name for name, _ in members]
    assert index.names == zindex.names == names
    assert archives.read_tar(str(tar), index.offsets, index.sizes) == [d for _, d in members]
    assert archives.read_zip(str(tmp_path / "s.zip"), zindex.offsets) == [d for _, d in members]
    assert list(archives.iter_tar_stream(str(tgz))) == members
    assert tree(tmp_path) == before and sorted(os.listdir(".")) == cwd == []


# ---------------------------------------------------------------------------------------------- zip


def test_zip_listing_and_bytes_equal_zipfiles(tmp_path, pngs):
    path = tmp_path / "s.zip"
    members = shard(pngs[:3], ["Bag/00000.png", LONG, "Été.png"])
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("Bag/", b"")
        for i, (name, data) in enumerate(members):
            zf.writestr(name, data, zipfile.ZIP_DEFLATED if i % 2 else zipfile.ZIP_STORED)
    index = archives.index_zip(str(path))
    assert index.names == [name for name, _ in members] and index.damage is None
    assert list(index.sizes) == [len(data) for _, data in members]
    assert archives.read_zip(str(path), index.offsets) == [data for _, data in members]


def raw_zip(path: Path, entries) -> Path:
    """A zip written by hand, for what zipfile would not write: entries of (name, method, flags, crc,
    compressed bytes, declared size)."""
    local, central = bytearray(), bytearray()
    for name, method, flags, crc, body, size in entries:
        name = name.encode()
        central += struct.pack("<4s4B4HL2L5H2L", b"PK\1\2", 20, 3, 20, 0, flags, method, 0, 0x21, crc,
                               len(body), size, len(name), 0, 0, 0, 0, 0o100644 << 16, len(local)) + name
        local += struct.pack("<4s2B4HL2L2H", b"PK\3\4", 20, 0, flags, method, 0, 0x21, crc, len(body), size,
                             len(name), 0) + name + body
    end = struct.pack("<4s4H2LH", b"PK\5\6", 0, 0, len(entries), len(entries), len(central), len(local), 0)
    path.write_bytes(bytes(local + central + end))
    return path


def deflated_zeros(mib: int) -> bytes:
    """Raw deflate of ``mib`` MiB of zeros without compressing them all: after a full flush the compressor
    starts afresh, so one MiB's output repeats."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    return piece * mib + b"\x03\x00"  # \x03\x00: an empty final block


def test_zip_bomb_and_liars_are_error_values(tmp_path, pngs):
    bomb = deflated_zeros(300)  # ~300 KB that inflate to 300 MiB
    png_crc, packed = zlib.crc32(pngs[0]), zlib.compress(pngs[0], 9, wbits=-15)
    path = raw_zip(tmp_path / "hostile.zip", [
        ("bomb.png", 8, 0, 0, bomb, 300 << 20),                # honest about its size (not its CRC): too large
        ("liar-bomb.png", 8, 0, 0, bomb, 1000),                # says 1000 bytes, inflates to 300 MiB
        ("cunning.png", 8, 0, zlib.crc32(bytes(1000)), bomb, 1000),  # and its CRC fits those 1000
        ("short.png", 8, 0, png_crc, packed, len(pngs[0]) + 5),  # says more than it holds
        ("secret.png", 0, 1, png_crc, pngs[0], len(pngs[0])),  # encrypted flag
        ("odd.png", 99, 0, png_crc, pngs[0], len(pngs[0])),    # a compression method zipfile lacks
        ("good.png", 8, 0, png_crc, packed, len(pngs[0])),
    ])
    index = archives.index_zip(str(path))
    got = archives.read_zip(str(path), index.offsets)
    assert [str(g) for g in got[:2] + got[3:6]] == [
        f"member too large ({300 << 20} bytes, limit {images.MAX_FILE_BYTES})",
        "cannot read member: Bad CRC-32 for file 'liar-bomb.png'",
        f"member size mismatch ({len(pngs[0])} bytes, {len(pngs[0]) + 5} declared)",
        "encrypted member",
        "unsupported compression method 99",
    ]
    assert got[2] == bytes(1000) and got[6] == pngs[0]  # never more than it declares


def test_read_zip_sees_a_replaced_archive(tmp_path, pngs):
    path = tmp_path / "s.zip"
    for data in (pngs[0], pngs[1] * 2):
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("a.png", data)
        assert archives.read_zip(str(path), archives.index_zip(str(path)).offsets) == [data]


def test_zip_utf8_name_without_the_flag_is_read_as_utf8(tmp_path, pngs):
    name = "Été/botte.png"
    path = raw_zip(tmp_path / "s.zip", [("x" * len(name.encode()), 0, 0, zlib.crc32(pngs[0]), pngs[0],
                                         len(pngs[0]))])
    data = path.read_bytes().replace(b"x" * len(name.encode()), name.encode())  # raw UTF-8, flag bit 11 unset
    path.write_bytes(data)
    assert archives.index_zip(str(path)).names == [name]


# ---------------------------------------------------------------------------------------------- other writers

WRITERS = ["tarfile_pax", "tarfile_gnu", "webdataset", "gnutar_gnu", "gnutar_posix", "bsdtar"]
LONGER = "Coat/" + "c" * 110 + ".png"  # a base name over 100 bytes: no ustar prefix can hold it


def archive(writer: str, root: Path, out: Path) -> Path:
    """The folder ``root`` as ``writer`` archives it: tarfile.add (its default format, pax, or GNU), WebDataset's
    TarWriter (regular files only, by key), GNU tar in either format, bsdtar."""
    if writer.startswith("tarfile_"):
        with tarfile.open(out, "w", **({"format": tarfile.GNU_FORMAT} if writer == "tarfile_gnu" else {})) as tf:
            tf.add(root, root.name)
    elif writer == "webdataset":
        from webdataset import TarWriter

        with TarWriter(str(out)) as sink:
            for p in sorted(root.rglob("*.png")):
                if p.is_file() and not p.is_symlink():
                    sink.write({"__key__": f"{root.name}/{p.relative_to(root).with_suffix('')}", "png": p.read_bytes()})
    elif writer.startswith("gnutar_"):
        subprocess.run(["tar", f"--format={writer[7:]}", "-cf", out, "-C", root.parent, root.name], check=True)
    else:
        subprocess.run(["bsdtar", "-cf", out, "-C", root.parent, root.name], check=True)
    return out


@pytest.fixture
def folder(tmp_path, pngs) -> Path:
    """Real PNGs under names of every length (one over 100 bytes that a ustar prefix splits, one it cannot),
    a hard link and a symlink to one of them, a symlink out of the folder and a FIFO."""
    root = tmp_path / "pngs"
    for i, name in enumerate(["Bag/00000.png", LONG, LONGER, "Été/00003.png", "Shirt/00004.png"]):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(pngs[i])
    os.link(root / "Bag/00000.png", root / "Bag/00005-hard.png")
    os.symlink("00000.png", root / "Bag/00006-soft.png")
    os.symlink("/nonexistent/elsewhere.png", root / "Bag/00007-out.png")
    os.mkfifo(root / "Bag/pipe")
    return root


@pytest.mark.parametrize("writer", WRITERS)
def test_tar_of_each_writer_is_listed_as_tarfile_lists_it(tmp_path, folder, writer):
    path = archive(writer, folder, tmp_path / "s.tar")
    index = archives.index_tar(str(path))
    want = tarfile_members(path)
    assert index.names == [name for name, _, _ in want] and index.damage is None
    assert list(index.offsets) == [at for _, at, _ in want]
    assert archives.read_tar(str(path), index.offsets, index.sizes) == [data for _, _, data in want]
    assert {(Path(n).name, k) for n, k in index.skipped} == (
        set() if writer == "webdataset" else {("00007-out.png", "symlink"), ("pipe", "FIFO")})
    images = {str(p.relative_to(folder.parent)) for p in folder.rglob("*.png") if p.resolve().is_file()}
    assert set(index.names) == images if writer != "webdataset" else set(index.names) < images


def test_tar_links_in_a_compressed_stream_are_errors(tmp_path, folder):
    path = tmp_path / "s.tar.gz"
    subprocess.run(["tar", "-czf", path, "--sort=name", "-C", folder.parent, folder.name], check=True)
    got = {name: data for name, data in archives.iter_tar_stream(str(path))}
    links = {n: d for n, d in got.items() if isinstance(d, ImageError)}
    assert set(links) == {"pngs/Bag/00005-hard.png", "pngs/Bag/00006-soft.png"}  # their target came before
    assert all("streamed past" in str(e) for e in links.values())
    assert got["pngs/Bag/00007-out.png"] == archives.Skipped("symlink") and got["pngs/Bag/pipe"] == ("FIFO",)
    assert got["pngs/Bag/00000.png"] == (folder / "Bag/00000.png").read_bytes()


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_tar_sparse_member_is_an_error_value_and_the_rest_is_read(tmp_path, pngs, fmt):
    root = tmp_path / "pngs"
    root.mkdir()
    (root / "a.png").write_bytes(pngs[0])
    with open(root / "hole.png", "wb") as f:  # a file with a hole: GNU tar -S writes it sparse
        f.seek(1 << 20)
        f.write(b"end")
    (root / "z.png").write_bytes(pngs[1])
    path = tmp_path / "s.tar"
    subprocess.run(["tar", f"--format={fmt}", "-S", "--sort=name", "-cf", path, "-C", tmp_path, "pngs"], check=True)
    index = archives.index_tar(str(path))
    assert index.names == [n for n, _, _ in tarfile_members(path)] == ["pngs/a.png", "pngs/hole.png", "pngs/z.png"]
    got = archives.read_tar(str(path), index.offsets, index.sizes)
    assert got[0] == pngs[0] and got[2] == pngs[1] and "sparse member" in str(got[1])
    streamed = dict(archives.iter_tar_stream(str(path)))
    assert streamed["pngs/z.png"] == pngs[1] and "sparse member" in str(streamed["pngs/hole.png"])


def test_tar_pax_size_overrides_the_header_and_global_records_name_nothing(tmp_path, pngs):
    """A member whose ustar size field says 0 and whose pax record says its size (as tarfile writes one over
    8 GiB); a global record with a path and a comment (git archive writes one) renames nothing."""
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "abc", "path": "x.png"}) as tf:
        for i, data in enumerate(pngs[:3]):
            info = tarfile.TarInfo(f"{i:05d}.png")
            info.size, info.pax_headers = len(data), {"size": str(len(data))}
            tf.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tf:  # tarfile applies the global path: every member is x.png to it
        at = tf.getmembers()[1].offset_data - 512
    rewrite_header(path, at, size=b"%011o\0" % 0)
    index = archives.index_tar(str(path))
    assert index.names == ["00000.png", "00001.png", "00002.png"] and index.damage is None
    assert archives.read_tar(str(path), index.offsets, index.sizes) == pngs[:3]
    assert [d for _, d in archives.iter_tar_stream(str(path))] == pngs[:3]


def test_tar_zst_is_streamed_as_the_plain_tar(tmp_path, folder):
    plain, packed = tmp_path / "s.tar", tmp_path / "s.tar.zst"
    for path, flags in ((plain, ["-cf"]), (packed, ["--zstd", "-cf"])):
        subprocess.run(["tar", "--sort=name", *flags, path, "-C", folder.parent, folder.name], check=True)
    index = archives.index_tar(str(plain))
    regular = [(n, d) for n, d in zip(index.names, archives.read_tar(str(plain), index.offsets, index.sizes),
                                      strict=True) if "hard" not in n and "soft" not in n]
    streamed = [(n, d) for n, d in archives.iter_tar_stream(str(packed)) if isinstance(d, bytes)]
    assert streamed == regular and archives.archive_kind(str(packed)) == "tgz"
    packed.write_bytes(packed.read_bytes()[:-40])  # cut short: the good members, then where it broke
    with pytest.raises(ArchiveDamaged, match="compressed data broken|truncated"):
        list(archives.iter_tar_stream(str(packed)))


def test_compressed_member_over_the_limit_stops_the_stream_at_its_header(tmp_path):
    """A .tar.gz member declaring 4 GiB is not inflated to be skipped: its error, then the stream stops."""
    big = tarfile.TarInfo("big.png")
    big.size = 4 << 30
    path = tmp_path / "s.tar.gz"
    path.write_bytes(gzip.compress(big.tobuf(tarfile.USTAR_FORMAT) + bytes(1 << 20)))
    got = []
    with pytest.raises(ArchiveDamaged, match=r"^member 'big.png' of 4294967296 bytes \(limit \d+\) not inflated at "
                                             r"byte 0 \(before any member\): the members after it are not read$"):
        for name, member in archives.iter_tar_stream(str(path)):
            got.append((name, str(member)))
    assert got == [("big.png", f"member too large ({big.size} bytes, limit {images.MAX_FILE_BYTES})")]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_tar_listing_is_whole_across_spans(tmp_path, pngs, monkeypatch, fmt):
    """Headers are searched a span at a time, doubled while the chain runs on; spans of 2 and 4 blocks here, so
    members longer than a span, pax records and a folder all fall on span ends."""
    monkeypatch.setattr(archives, "_SPANS", (2, 4))
    big = os.urandom(9 * archives.BLOCK)
    members = [(name, big if i % 4 == 1 else data) for i, (name, data) in enumerate(shard(pngs[:6]))]
    # a fractional mtime: a pax record before each member in the pax format
    path = tar_with_a_folder(tmp_path / "s.tar", members, fmt, folder_at=5, mtime=1.5)
    index = archives.index_tar(str(path))
    assert index.names == [n for n, _, _ in tarfile_members(path)]
    assert list(index.offsets) == [at for _, at, _ in tarfile_members(path)]
    assert list(index.sizes) == [len(data) for _, _, data in tarfile_members(path)]


def test_tar_of_huge_members_is_listed_without_reading_them(tmp_path):
    """A tar of four 512 MiB members (holes on disk): the listing maps the spans it searches, not the members'
    bytes; the whole file mapped would put 2 GiB in the process's resident set."""
    path, member = tmp_path / "huge.tar", 512 << 20
    with open(path, "wb") as f:
        for i in range(4):
            info = tarfile.TarInfo(f"Bag/{i}.png")
            info.size = member
            f.write(info.tobuf(tarfile.USTAR_FORMAT))
            f.seek(member, os.SEEK_CUR)
        f.write(bytes(2 * archives.BLOCK))
    code = ("import resource, sys; from fmnist_onnx import archives; index = archives.index_tar(sys.argv[1]); "
            "print(index.names, list(index.sizes), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)")
    before = subprocess.run([sys.executable, "-c", "import resource; from fmnist_onnx import archives; "
                             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"],
                            capture_output=True, text=True, check=True)
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.startswith(str([f"Bag/{i}.png" for i in range(4)]) + " " + str([member] * 4))
    assert int(out.stdout.split()[-1]) - int(before.stdout) < 64, out.stdout
