"""table.py's one digest of paths (--resume and report share it): the two ways it reads a name that is not UTF-8.
(The formats, the escaping and the row checks, through the journal: test_journal.py.)"""

from __future__ import annotations

import hashlib
import os

from fmnist_onnx.table import path_digest


def blake(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=8).digest()


def test_a_utf8_name_has_one_digest_either_way():
    assert path_digest("Bag/é 1.png") == path_digest("Bag/é 1.png", as_named=True) == blake("Bag/é 1.png".encode())


def test_as_named_hashes_the_bytes_on_disk_of_a_name_that_is_not_utf8():
    name = os.fsdecode(b"latin1-\xe9.png")
    assert path_digest(name, as_named=True) == blake(b"latin1-\xe9.png")  # the report's sampling order
    assert path_digest(name) == blake(name.encode("utf-8", "surrogatepass")) != blake(b"latin1-\xe9.png")


def test_by_default_two_texts_never_share_a_digest_where_as_named_would():
    crafted = "\udcc3\udca9.png"  # what a row's "\\xc3\\xa9.png" reads back as: never a name os.fsdecode makes
    assert path_digest(crafted, as_named=True) == path_digest("é.png", as_named=True)
    assert path_digest(crafted) != path_digest("é.png")  # --resume: a crafted row is never taken for é.png


def test_a_lone_surrogate_outside_fsdecodes_range_is_hashed_by_its_code_point():
    assert path_digest("\ud800.png", as_named=True) == path_digest("\ud800.png") == blake(b"\xed\xa0\x80.png")
