"""What the container sources share (classify/sources/members.py): which members are images, sidecars or
skipped, WebDataset keys, and a sidecar's class."""

from __future__ import annotations

import pytest

from fmnist_onnx.classify.sources import members


def test_split_tells_images_sidecars_and_the_rest_by_the_base_names_suffix():
    names = ["a/00001.png", "a/00001.cls", "b/00002.JPG", ".png", "x/.png", "dir.png/readme", "notes.txt"]
    assert members.split(names) == ([0, 2], [1], [3, 4, 5, 6])


@pytest.mark.parametrize(("name", "key"), [("00012.png", "00012"), ("a/00012.seg.png", "a/00012"),
                                           ("a.b/00012.png", "a.b/00012"), ("noext", "noext")])
def test_sample_key_is_the_name_up_to_the_first_dot_of_its_base_name(name, key):
    assert members.sample_key(name) == key


@pytest.mark.parametrize(("data", "cls"), [(b"3", 3), (b" 7\n", 7), (b"Bag\n", 8), (b"T-shirt/top", 0),
                                           (b"10", -1), (b"-1", -1), (b"\xff", -1), (b"9" * 100, -1)])
def test_a_sidecar_holds_a_class_index_or_name(data, cls):
    assert members.class_of_sidecar(data) == cls


def test_a_sample_takes_its_sidecars_class_over_its_folder():
    batch = members.batch("tar", "s.tar", ["Bag/1.png", "Bag/1.cls", "Coat/2.png"], [0, 1, 2], [5, 1, 5],
                          lambda picks: [b"3" for _ in picks])
    assert batch.files == ["s.tar::Bag/1.png", "s.tar::Coat/2.png"] and batch.skipped == []
    assert batch.members.truth == [3, 4] and batch.members.keys == [0, 2] and batch.members.sizes == [5, 5]


def test_a_repeated_name_is_named_by_its_ordinal_across_batches():
    repeats = members.Repeats()
    first = ["a.png", "b.png"]
    assert repeats.name(first) is first  # nothing repeated: the names as they are, no copy
    assert repeats.name(["c.png", "a.png", "a.png"]) == ["c.png", "a.png::2", "a.png::3"]
    assert repeats.one("b.png") == "b.png::2" and repeats.one("d.png") == "d.png"


def test_each_repeated_image_takes_the_sidecar_of_its_own_sample():
    names = ["x.png", "x.cls", "y.png", "y.cls", "x.png", "x.cls", "x.png"]
    batch = members.batch("tar", "s.tar", names, list(range(7)), [1] * 7,
                          lambda picks: [str(i).encode() for i in picks])  # a sidecar's class: its position
    assert batch.files == ["s.tar::x.png", "s.tar::y.png", "s.tar::x.png::2", "s.tar::x.png::3"]
    assert batch.members.keys == [0, 2, 4, 6] and batch.members.truth == [1, 3, 5, -1]  # the third: no sidecar
