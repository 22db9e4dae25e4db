"""The VOC loader on real VOC files (tests/data/voc-real) and on broken copies of them."""

from __future__ import annotations

import pickle
import shutil
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diredi_sim.data import VOC_CLASSES
from diredi_sim.data.voc import (
    DataProblem,
    DataWarning,
    DetectionDataset,
    ImageRecord,
    check_dataset,
    collate_detection,
    flip_boxes_horizontally,
    load_annotations,
    resolve_voc_folder,
)

VOC_REAL = Path(__file__).resolve().parent / "data" / "voc-real"  # see README.md there
VOC2012_100 = VOC_REAL / "voc2012-100" / "VOCdevkit" / "VOC2012"
TINY = VOC_REAL / "tiny-voc-devkit"
LABELME = VOC_REAL / "labelme-voc"
ICEVISION = VOC_REAL / "icevision-voc"


@pytest.fixture(autouse=True)
def voc_real_is_there():
    """Every test here reads the fixture: a missing one fails, it does not skip."""
    if not VOC_REAL.is_dir():
        pytest.fail(f"{VOC_REAL} is missing: it is part of the repository "
                    "(restore it with `git checkout -- tests/data/voc-real`)", pytrace=False)


def label_names(record: ImageRecord) -> list[str]:
    return [VOC_CLASSES[int(label)] for label in record.labels]


def by_id(records: list[ImageRecord]) -> dict[str, ImageRecord]:
    return {record.image_id: record for record in records}


# ---------------------------------------------------------------------------------------------
# Real folders


def test_voc2012_100_matches_readme():
    records = load_annotations(VOC_REAL / "voc2012-100")  # parent of VOCdevkit
    assert len(records) == 100
    assert sum(len(r.boxes) for r in records) == 273
    assert sum(int(r.difficult.sum()) for r in records) == 38
    counts = Counter(name for r in records for name in label_names(r))
    assert set(counts) == set(VOC_CLASSES)
    assert counts["person"] == 91 and counts["aeroplane"] == 15 and counts["cat"] == 5
    assert [r.image_id for r in records] == sorted(r.image_id for r in records)
    assert records[0].image_id == "2007_000027" and records[-1].image_id == "2007_001585"
    for r in records:
        assert r.boxes.dtype == np.float32 and r.boxes.shape == (len(r.labels), 4)
        assert r.labels.dtype == np.int64 and r.difficult.dtype == bool
        assert (r.boxes[:, 2] > r.boxes[:, 0]).all() and (r.boxes[:, 3] > r.boxes[:, 1]).all()
        assert (r.boxes >= 0).all() and (r.boxes[:, [0, 2]] <= r.width).all() and (r.boxes[:, [1, 3]] <= r.height).all()


def test_voc2012_100_image_set_keeps_list_order_and_check_is_clean():
    records = load_annotations(VOC2012_100, "val")
    listed = (VOC2012_100 / "ImageSets" / "Main" / "val.txt").read_text().split()
    assert [r.image_id for r in records] == listed
    assert records[0].image_id == "2007_001585"  # val.txt is in descending order
    assert check_dataset(VOC2012_100, "val") == []


def test_box_conversion_matches_xml():
    xml = ET.parse(VOC2012_100 / "Annotations" / "2007_000027.xml").getroot()
    bndbox = xml.find("object/bndbox")
    xmin, ymin, xmax, ymax = (float(bndbox.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
    assert (xmin, ymin, xmax, ymax) == (174, 101, 349, 351)
    record = by_id(load_annotations(VOC2012_100))["2007_000027"]
    assert (record.width, record.height) == (486, 500)
    assert label_names(record) == ["person"]
    np.testing.assert_array_equal(record.boxes[0], [xmin - 1, ymin - 1, xmax, ymax])


def test_tiny_devkit_needs_a_year_and_loads_by_image_id():
    with pytest.raises(DataProblem, match="VOC2007, VOC2012"):
        resolve_voc_folder(TINY)
    assert resolve_voc_folder(TINY, "2007") == TINY / "VOC2007"
    assert resolve_voc_folder(TINY, "VOC2012") == TINY / "VOC2012"
    with pytest.raises(DataProblem, match="2010"):
        resolve_voc_folder(TINY, "2010")

    (voc2007,) = load_annotations(resolve_voc_folder(TINY, "2007"), "trainval")
    assert voc2007.image_id == "000001"
    assert label_names(voc2007) == ["dog", "person"]
    np.testing.assert_array_equal(voc2007.boxes, [[47, 239, 195, 371], [7, 11, 352, 498]])
    assert (voc2007.width, voc2007.height) == (353, 500)

    (voc2012,) = load_annotations(resolve_voc_folder(TINY, "2012"), "test")
    xml_filename = ET.parse(TINY / "VOC2012" / "Annotations" / "000001.xml").getroot().findtext("filename")
    assert xml_filename == "000002.jpg"  # the XML disagrees with the file name ...
    assert voc2012.image_id == "000001"  # ... but the id is the file stem
    assert voc2012.image_path == TINY / "VOC2012" / "JPEGImages" / "000001.jpg"
    assert label_names(voc2012) == ["train"]
    assert check_dataset(TINY / "VOC2012") == []


def test_labelme_empty_difficult_reads_as_zero_and_float_coordinates():
    assert "<difficult/>" in (LABELME / "Annotations" / "2011_000006.xml").read_text()
    records = by_id(load_annotations(LABELME))  # no ImageSets
    assert sorted(records) == ["2011_000003", "2011_000006", "2011_000025"]
    assert sum(len(r.boxes) for r in records.values()) == 9
    assert not any(r.difficult.any() for r in records.values())
    assert label_names(records["2011_000006"]) == ["person"] * 4
    assert label_names(records["2011_000025"]) == ["bus", "bus", "car"]
    np.testing.assert_allclose(
        records["2011_000006"].boxes[2],
        [254.38461538461536 - 1, 115.38461538461539 - 1, 369.38461538461536, 292.38461538461536],
        rtol=1e-6,
    )
    assert check_dataset(LABELME) == []


def test_icevision_loads_without_image_sets():
    assert not (ICEVISION / "ImageSets").exists()
    records = by_id(load_annotations(ICEVISION))
    assert sorted(records) == ["2007_000063", "2011_003353"]
    assert label_names(records["2007_000063"]) == ["dog", "chair"]
    assert label_names(records["2011_003353"]) == ["person"]
    # chair: xmin=75 ymin=1 xmax=428 ymax=375 on a 500x375 image: touches the edges, no clipping
    np.testing.assert_array_equal(records["2007_000063"].boxes[1], [74, 0, 428, 375])
    np.testing.assert_allclose(records["2011_003353"].boxes[0], [129, 44.70000076293945, 375, 470])
    assert check_dataset(ICEVISION) == []


def test_records_are_immutable_and_compare_by_value():
    first = load_annotations(ICEVISION)
    second = load_annotations(ICEVISION)
    assert first == second and len({*first, *second}) == 2
    with pytest.raises(ValueError):
        first[0].boxes[0, 0] = 5.0


# ---------------------------------------------------------------------------------------------
# Broken copies


@pytest.fixture
def voc_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "VOCtest"
    shutil.copytree(ICEVISION, folder)
    return folder


def edit_xml(folder: Path, image_id: str, old: str, new: str) -> Path:
    path = folder / "Annotations" / f"{image_id}.xml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return path


def test_missing_root(tmp_path: Path):
    missing = tmp_path / "no_such_voc"
    for call in (lambda: resolve_voc_folder(missing), lambda: load_annotations(missing)):
        with pytest.raises(DataProblem, match="no_such_voc") as info:
            call()
        assert "does not exist" in str(info.value)
    (line,) = check_dataset(missing)
    assert "no_such_voc" in line


def test_not_a_voc_folder(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataProblem, match="not a VOC folder"):
        resolve_voc_folder(tmp_path / "empty")


def test_missing_image(voc_copy: Path):
    (voc_copy / "JPEGImages" / "2007_000063.jpg").unlink()
    with pytest.raises(DataProblem, match=r"2007_000063\.jpg.*missing"):
        load_annotations(voc_copy)
    with pytest.warns(DataWarning, match=r"2007_000063\.jpg"):
        records = load_annotations(voc_copy, on_problem="warn")
    assert [r.image_id for r in records] == ["2011_003353"]


def test_corrupt_image(voc_copy: Path):
    path = voc_copy / "JPEGImages" / "2007_000063.jpg"
    path.write_bytes(path.read_bytes()[:5000])  # truncated
    records = by_id(load_annotations(voc_copy))  # existence only: loads
    (line,) = check_dataset(voc_copy)
    assert "2007_000063.jpg" in line
    dataset = DetectionDataset([records["2007_000063"]])
    with pytest.raises(DataProblem, match=r"2007_000063\.jpg"):
        dataset[0]
    path.write_bytes(b"")
    with pytest.raises(DataProblem, match=r"2007_000063\.jpg.*empty"):
        dataset[0]


def test_malformed_xml(voc_copy: Path):
    path = voc_copy / "Annotations" / "2007_000063.xml"
    path.write_text(path.read_text()[:300])
    with pytest.raises(DataProblem, match=r"2007_000063\.xml.*malformed XML"):
        load_annotations(voc_copy)
    with pytest.warns(DataWarning, match=r"2007_000063\.xml"):
        records = load_annotations(voc_copy, on_problem="warn")
    assert [r.image_id for r in records] == ["2011_003353"]


def test_unknown_class(voc_copy: Path):
    edit_xml(voc_copy, "2007_000063", "<name>dog</name>", "<name>dragon</name>")
    with pytest.raises(DataProblem, match=r"2007_000063\.xml.*unknown class 'dragon'"):
        load_annotations(voc_copy)
    with pytest.warns(DataWarning, match=r"2007_000063\.xml.*dragon"):
        records = by_id(load_annotations(voc_copy, on_problem="warn"))
    assert label_names(records["2007_000063"]) == ["chair"]  # the bad object only is skipped
    # a class list without "dog" makes the original file's dog unknown too
    with pytest.raises(DataProblem, match="unknown class 'dog'"):
        load_annotations(ICEVISION, classes=("chair", "person"))


def test_box_slightly_outside_is_clipped_with_a_warning(voc_copy: Path):
    edit_xml(voc_copy, "2007_000063", "<xmax>379</xmax>", "<xmax>503</xmax>")  # image is 500 wide
    for on_problem in ("raise", "warn"):
        with pytest.warns(DataWarning, match=r"2007_000063\.xml.*clipped"):
            records = by_id(load_annotations(voc_copy, on_problem=on_problem))
        np.testing.assert_array_equal(records["2007_000063"].boxes[0], [122, 114, 500, 275])
    assert any("clipped" in line and "2007_000063.xml" in line for line in check_dataset(voc_copy))


def test_box_far_outside_is_a_problem(voc_copy: Path):
    edit_xml(voc_copy, "2007_000063", "<xmax>379</xmax>", "<xmax>900</xmax>")
    with pytest.raises(DataProblem, match=r"2007_000063\.xml.*sticks out"):
        load_annotations(voc_copy)
    edit_xml(voc_copy, "2007_000063", "<xmin>123</xmin>", "<xmin>600</xmin>")
    with pytest.raises(DataProblem, match=r"2007_000063\.xml.*outside"):
        load_annotations(voc_copy)


def test_inverted_box(voc_copy: Path):
    edit_xml(voc_copy, "2007_000063", "<xmin>123</xmin>", "<xmin>400</xmin>")  # xmax is 379
    with pytest.raises(DataProblem, match=r"2007_000063\.xml.*inverted box"):
        load_annotations(voc_copy)
    with pytest.warns(DataWarning, match=r"2007_000063\.xml.*inverted"):
        records = by_id(load_annotations(voc_copy, on_problem="warn"))
    assert label_names(records["2007_000063"]) == ["chair"]


def test_one_pixel_box_is_valid(voc_copy: Path):
    edit_xml(voc_copy, "2007_000063", "<xmin>123</xmin>", "<xmin>379</xmin>")  # xmin == xmax
    records = by_id(load_annotations(voc_copy))
    np.testing.assert_array_equal(records["2007_000063"].boxes[0], [378, 114, 379, 275])


def test_non_numeric_coordinate(voc_copy: Path):
    edit_xml(voc_copy, "2007_000063", "<ymin>115</ymin>", "<ymin>abc</ymin>")
    with pytest.raises(DataProblem, match=r"2007_000063\.xml.*ymin.*not a number"):
        load_annotations(voc_copy)


def test_missing_size_is_read_from_the_image(voc_copy: Path):
    path = voc_copy / "Annotations" / "2007_000063.xml"
    text = path.read_text()
    start, end = text.index("<size>"), text.index("</size>") + len("</size>")
    path.write_text(text[:start] + text[end:])
    record = by_id(load_annotations(voc_copy))["2007_000063"]
    assert (record.width, record.height) == (500, 375)
    assert check_dataset(voc_copy) == []


def test_all_objects_bad_keeps_a_negative_image(voc_copy: Path):
    edit_xml(voc_copy, "2011_003353", "<name>person</name>", "<name>alien</name>")
    with pytest.warns(DataWarning):
        records = by_id(load_annotations(voc_copy, on_problem="warn"))
    negative = records["2011_003353"]
    assert negative.boxes.shape == (0, 4) and negative.labels.shape == (0,)
    image, target = DetectionDataset([negative])[0]
    assert image.shape == (3, 500, 375) and target["boxes"].shape == (0, 4)


def test_missing_image_set_list_and_missing_xml(voc_copy: Path):
    with pytest.raises(DataProblem, match=r"train\.txt.*does not exist"):
        load_annotations(voc_copy, "train")
    (line,) = check_dataset(voc_copy, "train")
    assert "train.txt" in line
    lists = voc_copy / "ImageSets" / "Main"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("2011_003353\n2099_000001\n")
    with pytest.raises(DataProblem, match=r"2099_000001\.xml.*missing"):
        load_annotations(voc_copy, "train")
    with pytest.warns(DataWarning, match=r"2099_000001\.xml"):
        records = load_annotations(voc_copy, "train", on_problem="warn")
    assert [r.image_id for r in records] == ["2011_003353"]
    with pytest.raises(DataProblem, match="available lists: train"):
        load_annotations(voc_copy, "val")


def test_check_dataset_reports_every_problem_in_one_pass(voc_copy: Path):
    shutil.copytree(VOC2012_100, voc_copy, dirs_exist_ok=True)  # 102 images
    jpeg = voc_copy / "JPEGImages"
    (jpeg / "2007_000063.jpg").write_bytes((jpeg / "2007_000063.jpg").read_bytes()[:3000])
    (jpeg / "2007_000027.jpg").unlink()
    edit_xml(voc_copy, "2011_003353", "<name>person</name>", "<name>alien</name>")
    edit_xml(voc_copy, "2007_000032", "<xmin>104</xmin>", "<xmin>400</xmin>")  # inverted
    edit_xml(voc_copy, "2007_000033", "<width>500</width>", "<width>400</width>")  # size mismatch
    broken = voc_copy / "Annotations" / "2007_000039.xml"
    broken.write_text("<annotation><size>")
    lines = check_dataset(voc_copy)
    expected = {
        "2007_000063.jpg": "corrupt",
        "2007_000027.jpg": "missing",
        "2011_003353.xml": "alien",
        "2007_000032.xml": "inverted",
        "2007_000033.jpg": "400x",
        "2007_000039.xml": "malformed",
    }
    for name, word in expected.items():
        assert any(name in line and word in line for line in lines), (name, lines)
    # nothing else is reported: the size mismatch also makes 2007_000033's boxes stick out
    stems = {name.split(".")[0] for name in expected}
    assert all(any(stem in line for stem in stems) for line in lines), lines
    assert any("2007_000033.xml" in line and "sticks out" in line for line in lines)


def test_data_problem_survives_pickling_and_one_argument_form():
    err = pickle.loads(pickle.dumps(DataProblem("/x/a.xml", "bad")))
    assert str(err) == "/x/a.xml: bad" and err.path == Path("/x/a.xml")
    assert str(DataProblem("/x/a.xml: bad")) == "/x/a.xml: bad"
    assert isinstance(err, ValueError)


# ---------------------------------------------------------------------------------------------
# DetectionDataset


def test_dataset_shapes_and_dtypes():
    records = load_annotations(ICEVISION)
    dataset = DetectionDataset(records)
    assert len(dataset) == 2
    image, target = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (3, 375, 500)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and float(image.max()) > 0.5
    assert target["image_id"] == "2007_000063"
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (2, 4)
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [
        VOC_CLASSES.index("dog"), VOC_CLASSES.index("chair")]
    assert target["difficult"].dtype == torch.bool and target["difficult"].tolist() == [False, False]
    torch.testing.assert_close(target["boxes"], torch.from_numpy(records[0].boxes.copy()))

    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    assert [tuple(i.shape) for i in images] == [(3, 375, 500), (3, 500, 375)]
    assert [t["image_id"] for t in targets] == ["2007_000063", "2011_003353"]


def test_hflip_on_a_real_image():
    records = load_annotations(ICEVISION)
    plain_image, plain = DetectionDataset(records)[0]
    flipped_image, flipped = DetectionDataset(records, hflip_prob=1.0)[0]
    width = plain_image.shape[-1]
    torch.testing.assert_close(flipped_image, plain_image.flip(-1))
    torch.testing.assert_close(flipped_image.flip(-1), plain_image)  # flipping twice = original
    # dog 122..379 -> 500-379 .. 500-122
    torch.testing.assert_close(flipped["boxes"][0], torch.tensor([121.0, 114.0, 378.0, 275.0]))
    torch.testing.assert_close(flipped["boxes"][:, [1, 3]], plain["boxes"][:, [1, 3]])
    torch.testing.assert_close(flip_boxes_horizontally(flipped["boxes"], width), plain["boxes"])
    assert flipped["labels"].tolist() == plain["labels"].tolist()
    # the flipped box still covers the same pixels: the crop under it is the mirrored crop
    x1, y1, x2, y2 = (int(v) for v in plain["boxes"][0])
    fx1, _, fx2, _ = (int(v) for v in flipped["boxes"][0])
    torch.testing.assert_close(flipped_image[:, y1:y2, fx1:fx2], plain_image[:, y1:y2, x1:x2].flip(-1))


def test_hflip_decisions_are_seeded_and_mixed():
    records = load_annotations(ICEVISION) * 20
    def decisions(seed: int, epoch: int = 0) -> list[bool]:
        dataset = DetectionDataset(records, hflip_prob=0.5, seed=seed)
        dataset.set_epoch(epoch)
        return [dataset._should_flip(i) for i in range(len(records))]
    assert decisions(1) == decisions(1)
    assert decisions(1) != decisions(2) and decisions(1) != decisions(1, epoch=1)
    assert 5 < sum(decisions(1)) < 35


def test_include_difficult_false_removes_difficult_boxes():
    records = [r for r in load_annotations(VOC2012_100) if r.difficult.any() and not r.difficult.all()]
    assert records
    record = records[0]
    _, with_difficult = DetectionDataset([record])[0]
    _, without = DetectionDataset([record], include_difficult=False)[0]
    assert len(with_difficult["boxes"]) == len(record.boxes)
    assert len(without["boxes"]) == int((~record.difficult).sum())
    assert not without["difficult"].any()
    torch.testing.assert_close(without["boxes"], torch.from_numpy(record.boxes[~record.difficult].copy()))


def test_grayscale_png_becomes_three_channels(tmp_path: Path):
    folder = tmp_path / "gray"
    shutil.copytree(ICEVISION, folder)
    jpeg = folder / "JPEGImages" / "2011_003353.jpg"
    Image.open(jpeg).convert("L").save(jpeg.with_suffix(".png"))
    jpeg.unlink()
    record = by_id(load_annotations(folder))["2011_003353"]
    assert record.image_path.suffix == ".png"
    image, _ = DetectionDataset([record])[0]
    assert image.shape == (3, 500, 375)
    torch.testing.assert_close(image[0], image[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_dataset(folder) == []
