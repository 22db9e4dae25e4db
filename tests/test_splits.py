"""Class splits (docs/design.md section 3) on the real voc2012-100 sample."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from diredi_sim.data import VOC_CLASSES
from diredi_sim.data.splits import SPLIT_PRESETS, describe_split, filter_split, resolve_split
from diredi_sim.data.voc import load_annotations

VOC_REAL = Path(__file__).resolve().parent / "data" / "voc-real"  # see README.md there
VOC2012_100 = VOC_REAL / "voc2012-100" / "VOCdevkit" / "VOC2012"

PRESUMED = {"aeroplane", "bus", "horse", "motorbike", "person"}


@pytest.fixture
def voc2012_100_is_there():
    """The real VOC sample ships with the repository: a missing one fails, it does not skip."""
    if not VOC2012_100.is_dir():
        pytest.fail(f"{VOC_REAL} is missing: it is part of the repository "
                    "(restore it with `git checkout -- tests/data/voc-real`)", pytrace=False)


def test_presets_are_the_papers_splits():
    assert SPLIT_PRESETS["all"] == VOC_CLASSES
    assert set(SPLIT_PRESETS["teacher"]) == {
        "aeroplane", "bird", "bus", "car", "cow", "horse", "motorbike", "person", "sheep", "tvmonitor"}
    assert set(SPLIT_PRESETS["presumed"]) == PRESUMED
    assert set(SPLIT_PRESETS["exp1"]) == PRESUMED | {"cat"}
    assert set(SPLIT_PRESETS["exp2"]) == (PRESUMED - {"horse"}) | {"dog"}
    assert set(SPLIT_PRESETS["presumed"]) <= set(SPLIT_PRESETS["teacher"])
    for name, classes in SPLIT_PRESETS.items():
        assert list(classes) == [c for c in VOC_CLASSES if c in classes], name  # VOC order
        assert resolve_split(name) == classes


def test_resolve_explicit_lists():
    assert resolve_split(["person", "cat", "person"]) == ("person", "cat")
    assert resolve_split(("dog",)) == ("dog",)


def test_unknown_names_give_clear_errors():
    with pytest.raises(ValueError, match=r"'exp3'.*presets: all, teacher, presumed, exp1, exp2"):
        resolve_split("exp3")
    with pytest.raises(ValueError, match=r"'dragon'.*valid classes: aeroplane"):
        resolve_split(["person", "dragon"])
    with pytest.raises(ValueError, match="in a list"):
        resolve_split("person")
    with pytest.raises(ValueError, match="at least one"):
        resolve_split([])


@pytest.mark.usefixtures("voc2012_100_is_there")
@pytest.mark.parametrize("split", ["presumed", "exp1", "exp2", "teacher"])
def test_filter_split_on_voc2012_100(split: str):
    records = load_annotations(VOC2012_100)
    classes = set(SPLIT_PRESETS[split])
    kept = filter_split(records, split)

    # expected from the XML files directly
    expected: dict[str, list[str]] = {}
    for path in sorted((VOC2012_100 / "Annotations").glob("*.xml")):
        names = [o.findtext("name") for o in ET.parse(path).getroot().iter("object")]
        if any(name in classes for name in names):
            expected[path.stem] = [name for name in names if name in classes]
    assert [r.image_id for r in kept] == list(expected)
    for record in kept:
        assert [VOC_CLASSES[int(i)] for i in record.labels] == expected[record.image_id]
        assert len(record.boxes) == len(record.labels) == len(record.difficult)
    assert sum(describe_split(kept).values()) == sum(len(v) for v in expected.values())
    assert set(describe_split(kept)) == classes & set(describe_split(records))


@pytest.mark.usefixtures("voc2012_100_is_there")
def test_filter_split_keeps_boxes_and_flags_of_mixed_images():
    records = {r.image_id: r for r in load_annotations(VOC2012_100)}
    kept = {r.image_id: r for r in filter_split(list(records.values()), "presumed")}
    mixed = [i for i in kept if len(kept[i].labels) < len(records[i].labels)]
    assert mixed, "voc2012-100 has images mixing presumed and other classes"
    for image_id in mixed:
        original, filtered = records[image_id], kept[image_id]
        mask = np.isin(original.labels, [VOC_CLASSES.index(c) for c in PRESUMED])
        np.testing.assert_array_equal(filtered.boxes, original.boxes[mask])
        np.testing.assert_array_equal(filtered.difficult, original.difficult[mask])
        assert filtered.image_path == original.image_path and filtered.width == original.width
    # describe_split of the whole sample matches the README's counts
    counts = describe_split(list(records.values()))
    assert sum(counts.values()) == 273 and len(counts) == 20
    assert list(counts) == list(VOC_CLASSES)
