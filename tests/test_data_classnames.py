"""ImageNet class tables and the ObjectNet mapping reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from robustft.data.classnames import (
    imagenet_a_indices,
    imagenet_a_wnids,
    imagenet_classnames,
    imagenet_lemmas,
    imagenet_r_indices,
    imagenet_r_wnids,
    imagenet_wnid_to_index,
    imagenet_wnids,
    read_objectnet_mapping,
)
from robustft.data.testing import FAKE_OBJECTNET_MAPPED, FAKE_OBJECTNET_UNMAPPED, make_fake_objectnet
from robustft.errors import DataError


def test_imagenet_tables_are_aligned_and_sorted() -> None:
    wnids = imagenet_wnids()
    assert len(wnids) == len(set(wnids)) == 1000
    assert list(wnids) == sorted(wnids)
    assert wnids[0] == "n01440764" and imagenet_classnames()[0] == "tench"
    assert imagenet_lemmas()[0].startswith("tench")
    assert len(imagenet_classnames()) == len(imagenet_lemmas()) == 1000


@pytest.mark.parametrize(("indices", "wnids"), [(imagenet_r_indices, imagenet_r_wnids),
                                                (imagenet_a_indices, imagenet_a_wnids)])
def test_subset_indices_match_their_wnids(indices, wnids) -> None:
    idx = indices()
    assert len(idx) == 200 and list(idx) == sorted(set(idx))
    assert [imagenet_wnids()[i] for i in idx] == list(wnids())


def test_known_subset_members() -> None:
    # ImageNet-A's first class is the stingray (head 6); goldfish (1) is in ImageNet-R only.
    assert imagenet_a_indices()[0] == 6 == imagenet_wnid_to_index()["n01498041"]
    assert 1 in imagenet_r_indices() and 1 not in imagenet_a_indices()


def _head(wnid: str) -> int:
    return imagenet_wnid_to_index()[wnid]


def test_objectnet_mapping_resolves_release_files(tmp_path: Path) -> None:
    base = make_fake_objectnet(tmp_path, classes=[])
    mapping = read_objectnet_mapping(base / "mappings")
    assert set(mapping.mapped) == set(FAKE_OBJECTNET_MAPPED)
    assert set(mapping.folder_to_label) == set(FAKE_OBJECTNET_MAPPED) | set(FAKE_OBJECTNET_UNMAPPED)
    # Alarm clock -> analog clock (n02708093) and digital clock (n03196217): both count.
    assert mapping.mapped["alarm_clock"] == tuple(sorted((_head("n02708093"), _head("n03196217"))))
    assert len(mapping.mapped["chair"]) == 3
    assert mapping.mapped["banana"] == (_head("n07753592"),)


def test_objectnet_mapping_errors_name_the_file(tmp_path: Path) -> None:
    base = make_fake_objectnet(tmp_path, classes=[])
    (base / "mappings" / "pytorch_to_imagenet_2012_id.json").unlink()
    with pytest.raises(DataError, match="pytorch_to_imagenet_2012_id.json"):
        read_objectnet_mapping(base / "mappings")


def test_objectnet_mapping_unknown_imagenet_label(tmp_path: Path) -> None:
    base = make_fake_objectnet(tmp_path, classes=[])
    path = base / "mappings" / "objectnet_to_imagenet_1k.json"
    data = json.loads(path.read_text())
    data["Banana"] = "plantain"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="'plantain'"):
        read_objectnet_mapping(base / "mappings")


def test_objectnet_mapping_rejects_partial_index_file(tmp_path: Path) -> None:
    base = make_fake_objectnet(tmp_path, classes=[])
    path = base / "mappings" / "pytorch_to_imagenet_2012_id.json"
    data = json.loads(path.read_text())
    del data["5"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="1000 head indices"):
        read_objectnet_mapping(base / "mappings")
