"""The embedded synthetic dataset: determinism, VOC layout and boxes, caching, colour carries no class."""

import dataclasses
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diredi_sim.data import VOC_CLASSES
from diredi_sim.data.synthetic import (
    SETTINGS_FILE, SyntheticConfig, find_box, default_cache_dir, ensure_synthetic, generate_synthetic,
    render_scene,
)

SMALL = SyntheticConfig(seed=3, image_size=96, num_train=24, num_val=8, num_test=8)


def read_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_objects(xml_path: Path):
    tree = ET.parse(xml_path).getroot()
    size = tree.find("size")
    width, height = int(size.findtext("width")), int(size.findtext("height"))
    objects = []
    for obj in tree.iter("object"):
        box = obj.find("bndbox")
        objects.append({
            "name": obj.findtext("name"),
            "difficult": int(obj.findtext("difficult")),
            "bbox": tuple(int(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")),
        })
    return tree, width, height, objects


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "SYN", SMALL, workers=1)


def test_same_seed_gives_identical_bytes_whatever_the_workers(small_set, tmp_path):
    again = generate_synthetic(tmp_path / "again", SMALL, workers=2)
    first, second = read_files(small_set), read_files(again)
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first)


def test_different_seed_gives_different_images(small_set, tmp_path):
    other = generate_synthetic(tmp_path / "other", dataclasses.replace(SMALL, seed=4), workers=1)
    images = sorted((small_set / "JPEGImages").iterdir())
    differ = sum(p.read_bytes() != (other / "JPEGImages" / p.name).read_bytes() for p in images)
    assert differ == len(images)


def test_voc_layout_and_boxes(small_set):
    main = small_set / "ImageSets" / "Main"
    splits = {s: (main / f"{s}.txt").read_text().split() for s in ("train", "val", "test", "trainval")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [SMALL.num_train, SMALL.num_val, SMALL.num_test]
    assert splits["trainval"] == splits["train"] + splits["val"]
    ids = splits["train"] + splits["val"] + splits["test"]
    assert len(set(ids)) == len(ids) and ids[0] == "000001"
    assert sorted(p.stem for p in (small_set / "JPEGImages").glob("*.jpg")) == sorted(ids)
    assert sorted(p.stem for p in (small_set / "Annotations").glob("*.xml")) == sorted(ids)

    names = set()
    for image_id in ids:
        with Image.open(small_set / "JPEGImages" / f"{image_id}.jpg") as im:
            assert im.mode == "RGB" and im.size == (SMALL.image_size, SMALL.image_size)
        tree, width, height, objects = read_objects(small_set / "Annotations" / f"{image_id}.xml")
        assert tree.findtext("filename") == f"{image_id}.jpg" and tree.findtext("folder") == "SYN"
        assert (width, height) == (SMALL.image_size, SMALL.image_size) and tree.find("size").findtext("depth") == "3"
        assert 1 <= len(objects) <= SMALL.max_objects
        for obj in objects:
            names.add(obj["name"])
            assert obj["name"] in VOC_CLASSES and obj["difficult"] in (0, 1)
            xmin, ymin, xmax, ymax = obj["bbox"]
            assert 1 <= xmin <= xmax <= width and 1 <= ymin <= ymax <= height
        # Per-class lists agree with the annotations.
        for name in VOC_CLASSES:
            flags = [o["difficult"] for o in objects if o["name"] == name]
            expected = -1 if not flags else (0 if all(flags) else 1)
            assert f"{image_id} {expected:2d}" in (main / f"{name}_trainval.txt").read_text().splitlines() + \
                (main / f"{name}_test.txt").read_text().splitlines()
    assert len(names) >= 10


def test_box_convention_is_one_based_inclusive():
    mask = np.zeros((20, 30), dtype=bool)
    mask[3:8, 0:10] = True  # rows 3..7, columns 0..9 (0-based)
    assert find_box(mask) == (1, 4, 10, 8)
    mask[:] = False
    mask[19, 29] = True
    assert find_box(mask) == (30, 20, 30, 20)


def test_boxes_are_tight_around_visible_pixels():
    """Each box is the box of the pixels its object owns in the rendered scene, and they fill it."""
    for index in range(30):
        img, owner, annotations = render_scene(SMALL, index)
        assert img.shape == (SMALL.image_size, SMALL.image_size, 3) and img.dtype == np.uint8
        for obj in annotations:
            visible = owner == obj["order"]
            ys, xs = np.nonzero(visible)  # the box of the owned pixels, computed here (VOC's 1-based inclusive pixels)
            assert tuple(obj["bbox"]) == (xs.min() + 1, ys.min() + 1, xs.max() + 1, ys.max() + 1)
            xmin, ymin, xmax, ymax = obj["bbox"]
            inside = visible[ymin - 1:ymax, xmin - 1:xmax]
            assert inside.sum() == visible.sum()
            # Tight: every border row and column of the box holds a pixel of the object.
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()


def test_ensure_reuses_and_regenerates(tmp_path):
    cache = tmp_path / "cache"
    config = dataclasses.replace(SMALL, num_train=6, num_val=2, num_test=2)
    root = ensure_synthetic(cache, config, workers=1)
    settings = json.loads((root / SETTINGS_FILE).read_text())
    assert settings["config"] == dataclasses.asdict(config)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    assert ensure_synthetic(cache, config, workers=1) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps

    changed = dataclasses.replace(config, max_objects=3)
    other = ensure_synthetic(cache, changed, workers=1)
    assert json.loads((other / SETTINGS_FILE).read_text())["config"]["max_objects"] == 3
    for xml_path in (other / "Annotations").glob("*.xml"):
        assert len(read_objects(xml_path)[3]) <= 3

    # Incomplete folders are regenerated: a missing image, then a missing settings file.
    victim = root / "JPEGImages" / "000002.jpg"
    original = victim.read_bytes()
    victim.unlink()
    assert ensure_synthetic(cache, config, workers=1) == root
    assert victim.read_bytes() == original
    (root / SETTINGS_FILE).unlink()
    ensure_synthetic(cache, config, workers=1)
    assert (root / SETTINGS_FILE).is_file()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_generate_refuses_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        generate_synthetic(tmp_path, SMALL, workers=1)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DIREDI_SIM_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DIREDI_SIM_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "diredi-sim")


def test_colour_does_not_identify_class(tmp_path):
    """A nearest-class-mean classifier on an object's mean RGB does little better than chance."""
    config = SyntheticConfig(seed=11, image_size=128, num_train=300, num_val=0, num_test=0)
    root = generate_synthetic(tmp_path / "colour", config, workers=2)
    features, labels = [], []
    for xml_path in sorted((root / "Annotations").glob("*.xml")):
        _, _, _, objects = read_objects(xml_path)
        with Image.open(root / "JPEGImages" / f"{xml_path.stem}.jpg") as im:
            img = np.asarray(im, dtype=np.float32)
        for obj in objects:
            if obj["difficult"]:
                continue
            xmin, ymin, xmax, ymax = obj["bbox"]
            features.append(img[ymin - 1:ymax, xmin - 1:xmax].reshape(-1, 3).mean(axis=0))
            labels.append(VOC_CLASSES.index(obj["name"]))
    features, labels = np.array(features), np.array(labels)
    assert len(labels) > 400 and len(set(labels.tolist())) == 20
    half = len(labels) // 2
    train, test = slice(0, half), slice(half, None)
    means = np.stack([features[train][labels[train] == c].mean(axis=0) for c in range(20)])
    pred = np.argmin(((features[test][:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    accuracy = float((pred == labels[test]).mean())
    assert accuracy < 3 * (1 / 20), accuracy
