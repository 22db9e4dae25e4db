"""Write tests/data/voc-real/tiny-voc-devkit and labelme-voc: small VOC folders of this project's
own (drawn images, hand-written XML) that carry the edge cases of two public samples we may not
copy (see README.md here). Run from the repository root: python tests/data/voc-real/make_own_folders.py

tests/test_voc.py and tests/test_cli.py assert the class names, box counts, ids and the boxes
noted below; change them together.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent

# Colours of the drawn "objects": flat shapes, one colour per class.
COLOURS = {"dog": (150, 95, 40), "person": (40, 60, 170), "train": (190, 40, 40), "bus": (230, 170, 20),
           "car": (30, 140, 60)}


def draw_image(path: Path, width: int, height: int, objects: list[tuple[str, tuple[float, float, float, float]]],
               seed: int) -> None:
    """A vertical two-colour gradient with each object drawn as a filled shape inside its box."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    top, bottom = (120 + seed * 20, 170, 210), (70, 110 - seed * 10, 60 + seed * 15)
    for y in range(height):
        t = y / max(height - 1, 1)
        draw.line([(0, y), (width, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    # largest first, so that an object inside another's box (the dog in front of the person) shows
    for name, (x1, y1, x2, y2) in sorted(objects, key=lambda o: -(o[1][2] - o[1][0]) * (o[1][3] - o[1][1])):
        colour = COLOURS[name]
        box = [x1 - 1, y1 - 1, x2 - 1, y2 - 1]  # VOC coordinates are 1-based
        if name == "person":  # head and body
            head = (x2 - x1) * 0.18
            cx = (x1 + x2) / 2
            draw.ellipse([cx - head, box[1], cx + head, box[1] + 2 * head], fill=colour)
            draw.rectangle([box[0], box[1] + 2 * head, box[2], box[3]], fill=colour)
        elif name == "dog":
            draw.ellipse(box, fill=colour)
        else:  # vehicles: a body with two dark wheels
            draw.rectangle([box[0], box[1], box[2], box[3] - (y2 - y1) * 0.15], fill=colour)
            r = (y2 - y1) * 0.15
            for wx in (x1 + (x2 - x1) * 0.25, x1 + (x2 - x1) * 0.75):
                draw.ellipse([wx - r, box[3] - 2 * r, wx + r, box[3]], fill=(20, 20, 20))
        draw.rectangle(box, outline=(255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=80)


def devkit_xml(folder: str, filename: str, width: int, height: int, objects) -> str:
    """Classic VOC devkit style: tabs, width before height, every tag filled in."""
    parts = [
        "<annotation>",
        f"\t<folder>{folder}</folder>",
        f"\t<filename>{filename}</filename>",
        "\t<source>",
        "\t\t<database>diredi-sim test fixture</database>",
        "\t\t<annotation>drawn for diredi-sim</annotation>",
        "\t\t<image>generated</image>",
        "\t</source>",
        "\t<size>",
        f"\t\t<width>{width}</width>",
        f"\t\t<height>{height}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        "\t<segmented>0</segmented>",
    ]
    for name, pose, truncated, (x1, y1, x2, y2) in objects:
        parts += [
            "\t<object>",
            f"\t\t<name>{name}</name>",
            f"\t\t<pose>{pose}</pose>",
            f"\t\t<truncated>{truncated}</truncated>",
            "\t\t<difficult>0</difficult>",
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{x1}</xmin>",
            f"\t\t\t<ymin>{y1}</ymin>",
            f"\t\t\t<xmax>{x2}</xmax>",
            f"\t\t\t<ymax>{y2}</ymax>",
            "\t\t</bndbox>",
            "\t</object>",
        ]
    return "\n".join(parts + ["</annotation>", ""])


def labelme_xml(filename: str, width: int, height: int, objects) -> str:
    """The shape labelme's VOC export writes: two-space indent, height before width, empty tags
    (<folder/>, <pose/>, <truncated/>, <difficult/>) and float coordinates."""
    parts = [
        "<annotation>",
        "  <folder/>",
        f"  <filename>{filename}</filename>",
        "  <database/>",
        "  <annotation/>",
        "  <image/>",
        "  <size>",
        f"    <height>{height}</height>",
        f"    <width>{width}</width>",
        "    <depth>3</depth>",
        "  </size>",
        "  <segmented/>",
    ]
    for name, (x1, y1, x2, y2) in objects:
        parts += [
            "  <object>",
            f"    <name>{name}</name>",
            "    <pose/>",
            "    <truncated/>",
            "    <difficult/>",
            "    <bndbox>",
            f"      <xmin>{x1!r}</xmin>",
            f"      <ymin>{y1!r}</ymin>",
            f"      <xmax>{x2!r}</xmax>",
            f"      <ymax>{y2!r}</ymax>",
            "    </bndbox>",
            "  </object>",
        ]
    return "\n".join(parts + ["</annotation>", ""])


def write_tiny_devkit(root: Path) -> None:
    """VOCdevkit with two years. VOC2007/000001: a dog and a person (tests/test_voc.py asserts the
    boxes, 353x500). VOC2012/000001: one train, and an XML whose <filename> says 000002.jpg: the
    loader must go by the image id (the file stem), not by <filename>."""
    voc2007 = [("dog", "Left", 1, (48, 240, 195, 371)), ("person", "Left", 1, (8, 12, 352, 498))]
    voc2012 = [("train", "Unspecified", 0, (41, 88, 282, 201))]
    for year, objects, (width, height), filename in [("VOC2007", voc2007, (353, 500), "000001.jpg"),
                                                      ("VOC2012", voc2012, (320, 240), "000002.jpg")]:
        folder = root / year
        (folder / "Annotations").mkdir(parents=True)
        (folder / "Annotations" / "000001.xml").write_text(devkit_xml(year, filename, width, height, objects))
        draw_image(folder / "JPEGImages" / "000001.jpg", width, height, [(n, b) for n, _, _, b in objects],
                   seed=0 if year == "VOC2007" else 1)
        (folder / "ImageSets" / "Main").mkdir(parents=True)
        for image_set in ("test", "trainval"):
            (folder / "ImageSets" / "Main" / f"{image_set}.txt").write_text("000001\n")


def write_labelme(root: Path) -> None:
    """Three images, nine boxes (person x2, person x4, bus, bus, car), labelme-style XML with an
    empty <difficult/> and float coordinates, no ImageSets. tests/test_voc.py asserts the third
    person box of 2011_000006."""
    images = {
        "2011_000003": ((500, 338), [("person", (187.5, 101.36900369003689, 309.0, 330.25)),
                                     ("person", (362.0, 80.0, 500.0, 336.0))]),  # touches the right edge
        "2011_000006": ((500, 375), [("person", (88.0, 104.5, 236.0, 333.0)),
                                     ("person", (175.25, 112.0, 295.0, 280.0)),
                                     ("person", (254.38461538461536, 115.38461538461539, 369.38461538461536, 292.38461538461536)),
                                     ("person", (398.0, 78.0, 450.5, 121.0))]),
        "2011_000025": ((500, 375), [("bus", (86.0, 22.384615384615387, 432.0, 370.38461538461536)),
                                     ("bus", (1.0, 97.0, 104.0, 285.0)),  # touches the left edge
                                     ("car", (405.0, 170.0, 500.0, 262.0))]),
    }
    (root / "Annotations").mkdir(parents=True)
    for seed, (image_id, ((width, height), objects)) in enumerate(images.items()):
        (root / "Annotations" / f"{image_id}.xml").write_text(labelme_xml(f"{image_id}.jpg", width, height, objects))
        draw_image(root / "JPEGImages" / f"{image_id}.jpg", width, height, objects, seed=seed)


def main() -> None:
    for name, write in [("tiny-voc-devkit", write_tiny_devkit), ("labelme-voc", write_labelme)]:
        target = HERE / name
        if target.exists():
            shutil.rmtree(target)
        write(target)
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
