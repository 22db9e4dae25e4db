"""Pascal VOC detection data read from a folder the user names (VOC2007, VOC2012, or any folder in
the same layout, including our synthetic set). Nothing is ever downloaded.

Layout
------
A *year folder* holds ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg`` (``.jpeg`` and ``.png``
are looked for too, in that order) and optionally ``ImageSets/Main/<image_set>.txt``.
:func:`resolve_voc_folder` also accepts a ``VOCdevkit`` folder (holding ``VOC2007/``,
``VOC2012/`` ...) or a parent holding ``VOCdevkit/``.

Image ids are file stems (from ``ImageSets/Main/*.txt`` or the names of ``Annotations/*.xml``);
the XML ``<filename>`` is ignored, because it is sometimes wrong.

Coordinate convention (other modules rely on it)
------------------------------------------------
VOC XML boxes are 1-based, inclusive pixel coordinates. Records hold 0-based *continuous*
coordinates::

    x1 = xmin - 1,  y1 = ymin - 1,  x2 = xmax,  y2 = ymax

so a box covering pixels ``xmin..xmax`` has width ``xmax - xmin + 1 == x2 - x1`` and a box
covering the whole image is ``(0, 0, W, H)``. A horizontal flip maps ``x1' = W - x2`` and
``x2' = W - x1``. Labels are 0-based indices into ``classes`` (``VOC_CLASSES`` by default).

Edge cases and how they are decided
-----------------------------------
* ``<difficult>`` missing or empty (``<difficult/>``, as labelme writes it) counts as 0.
* ``<size>`` missing, empty or zero: the size is read from the image file header.
* A box that sticks out of the image by a little (at most ``CLIP_TOLERANCE`` of the image side,
  and never less than 2 px) is clipped to the image, with a :class:`DataWarning`, whatever
  ``on_problem`` says. A box that sticks out further, lies wholly outside, is inverted
  (``xmin > xmax`` or ``ymin > ymax``), has a missing or non-numeric coordinate, or names an
  unknown class is a *problem*: ``on_problem="raise"`` raises :class:`DataProblem`,
  ``on_problem="warn"`` warns and skips that object.
* An image whose XML is missing or malformed, whose image file is missing, or whose ``<size>`` is
  not a number is a problem for the whole image: under ``"warn"`` the image is skipped.
* An image with zero valid objects is kept: it is a valid negative (all background).
* ``<part>`` (VOC2012 person layout), ``<truncated>``, ``<pose>`` and other tags are ignored.

:func:`load_annotations` only checks that image files exist (fast); :func:`check_dataset` decodes
every image and reports every problem at once; :class:`DetectionDataset` raises
:class:`DataProblem` naming the file when an image turns out to be unreadable.
"""

from __future__ import annotations

import math
import re
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NoReturn, Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.datasets import VOCDetection
from torchvision.io import ImageReadMode, decode_image

from diredi_sim.data import VOC_CLASSES

__all__ = [
    "CLIP_TOLERANCE",
    "IMAGE_SUFFIXES",
    "DataProblem",
    "DataWarning",
    "DetectionDataset",
    "ImageRecord",
    "check_dataset",
    "collate_detection",
    "decode_rgb_image",
    "find_image_path",
    "flip_boxes_horizontally",
    "load_annotations",
    "resolve_voc_folder",
]

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
# A box may stick out of its image by this fraction of the image side (at least 2 px) and still be
# clipped with a warning; beyond that it is a problem.
CLIP_TOLERANCE = 0.05
_MIN_CLIP_PX = 2.0


class DataProblem(ValueError):
    """A problem with a dataset file. ``str(err)`` is ``"<path>: <problem>"``.

    ``DataProblem(path, problem)`` or ``DataProblem(message)`` (the second form lets the error
    cross DataLoader worker processes).
    """

    def __init__(self, path_or_message: str | Path, problem: str | None = None):
        if problem is None:
            super().__init__(str(path_or_message))
            self.path: Path | None = None
            self.problem = str(path_or_message)
        else:
            super().__init__(str(path_or_message), problem)
            self.path = Path(path_or_message)
            self.problem = problem

    def __str__(self) -> str:
        return self.problem if self.path is None else f"{self.path}: {self.problem}"


class DataWarning(UserWarning):
    """A fixed-up or skipped dataset problem (the message names the file)."""


@dataclass(frozen=True)
class ImageRecord:
    """One annotated image. Arrays are made read-only; use ``dataclasses.replace`` to change one.

    ``boxes`` are float32 (N, 4) ``x1, y1, x2, y2`` in the 0-based continuous convention of this
    module; ``labels`` int64 (N,) indices into the class list; ``difficult`` bool (N,).
    """

    image_id: str
    image_path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray

    def __post_init__(self) -> None:
        boxes = np.array(self.boxes, dtype=np.float32).reshape(-1, 4)
        labels = np.array(self.labels, dtype=np.int64).reshape(-1)
        difficult = np.array(self.difficult, dtype=bool).reshape(-1)
        if not (len(boxes) == len(labels) == len(difficult)):
            raise ValueError(
                f"ImageRecord {self.image_id}: {len(boxes)} boxes, {len(labels)} labels and "
                f"{len(difficult)} difficult flags differ in number"
            )
        for array in (boxes, labels, difficult):
            array.setflags(write=False)
        object.__setattr__(self, "image_path", Path(self.image_path))
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "difficult", difficult)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImageRecord):
            return NotImplemented
        for field in fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if isinstance(mine, np.ndarray):
                if not np.array_equal(mine, theirs):
                    return False
            elif mine != theirs:
                return False
        return True

    def __hash__(self) -> int:
        return hash((self.image_id, str(self.image_path)))


# --------------------------------------------------------------------------------------------
# Problem handling: one sink decides whether a problem raises, warns or is collected.


class _ProblemSink:
    """Routes problems: "raise" (DataProblem), "warn" (DataWarning) or "collect" (into lines)."""

    def __init__(self, mode: str):
        if mode not in ("raise", "warn", "collect"):
            raise ValueError(f"on_problem must be 'raise' or 'warn', not {mode!r}")
        self.mode = mode
        self.lines: list[str] = []

    def report(self, path: Path, problem: str) -> None:
        """A problem: raise, or warn/collect and let the caller skip the bad item."""
        if self.mode == "raise":
            raise DataProblem(path, problem)
        self.notice(path, problem)

    def notice(self, path: Path, problem: str) -> None:
        """A fixed-up imperfection: warn (or collect), never raise."""
        if self.mode == "collect":
            self.lines.append(f"{path}: {problem}")
        else:
            warnings.warn(f"{path}: {problem}", DataWarning, stacklevel=4)


class _SkipImage(Exception):
    """Internal: the current image was reported as a problem and is to be skipped."""


# --------------------------------------------------------------------------------------------
# Folders


def resolve_voc_folder(root: str | Path, year: str | None = None) -> Path:
    """Find the VOC year folder (holding ``Annotations/`` and ``JPEGImages/``) under ``root``.

    ``root`` may be a year folder itself, a VOCdevkit folder holding year folders (``year``
    such as ``"2007"`` or ``"VOC2007"`` picks one; without it there must be only one), or a
    parent holding ``VOCdevkit/``. Raises :class:`DataProblem` naming the path otherwise.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataProblem(root, "dataset folder does not exist")
    if not root.is_dir():
        raise DataProblem(root, "dataset path is not a folder")
    if _looks_like_year_folder(root):
        _require_year_folder(root)
        if year is not None and re.fullmatch(r"VOC\d{4}", root.name) and not _matches_year(root.name, year):
            raise DataProblem(root, f"year {year!r} was asked for, but this is the {root.name} folder")
        return root
    if (root / "VOCdevkit").is_dir():
        return resolve_voc_folder(root / "VOCdevkit", year)
    candidates = sorted(p for p in root.iterdir() if p.is_dir() and _looks_like_year_folder(p))
    if not candidates:
        raise DataProblem(
            root,
            "not a VOC folder: expected Annotations/ and JPEGImages/, year folders such as "
            "VOC2007/, or VOCdevkit/",
        )
    names = ", ".join(p.name for p in candidates)
    if year is not None:
        chosen = [p for p in candidates if _matches_year(p.name, year)]
        if not chosen:
            raise DataProblem(root, f"no year folder for {year!r}; choices: {names}")
        folder = chosen[0]
    elif len(candidates) == 1:
        folder = candidates[0]
    else:
        raise DataProblem(root, f"holds several year folders; pick one with year= ({names})")
    _require_year_folder(folder)
    return folder


def _looks_like_year_folder(path: Path) -> bool:
    return (path / "Annotations").is_dir() or (path / "JPEGImages").is_dir()


def _require_year_folder(path: Path) -> None:
    for sub in ("Annotations", "JPEGImages"):
        if not (path / sub).is_dir():
            raise DataProblem(path / sub, "folder is missing (a VOC folder needs Annotations/ and JPEGImages/)")


def _matches_year(name: str, year: str) -> bool:
    return name.removeprefix("VOC") == str(year).removeprefix("VOC")


def find_image_path(folder: Path, image_id: str) -> Path | None:
    """``JPEGImages/<image_id>`` with the first suffix of ``IMAGE_SUFFIXES`` that exists, or None."""
    for suffix in IMAGE_SUFFIXES:
        path = folder / "JPEGImages" / f"{image_id}{suffix}"
        if path.is_file():
            return path
    return None


def _list_image_ids(folder: Path, image_set: str | None) -> tuple[list[str], Path]:
    """Image ids from ``ImageSets/Main/<image_set>.txt`` (in file order), or all XML stems sorted;
    with the file or folder they came from."""
    if image_set is None:
        annotations = folder / "Annotations"
        return sorted(path.stem for path in annotations.glob("*.xml")), annotations
    name = image_set.removesuffix(".txt")
    list_path = folder / "ImageSets" / "Main" / f"{name}.txt"
    if not list_path.is_file():
        available = sorted(p.stem for p in (folder / "ImageSets" / "Main").glob("*.txt"))
        choices = ", ".join(available) if available else "none (use image_set=None to take all annotations)"
        raise DataProblem(list_path, f"image set list {name!r} does not exist; available lists: {choices}")
    ids: list[str] = []
    for line in list_path.read_text(encoding="utf-8-sig").splitlines():
        tokens = line.split()
        if tokens:  # class lists (aeroplane_train.txt) have "id  1" lines: the id is the first token
            ids.append(tokens[0])
    return ids, list_path


# --------------------------------------------------------------------------------------------
# Annotations


def load_annotations(
    folder: str | Path,
    image_set: str | None = None,
    *,
    classes: Sequence[str] = VOC_CLASSES,
    on_problem: str = "raise",
) -> list[ImageRecord]:
    """Read the annotations of a VOC folder into :class:`ImageRecord` s.

    ``folder`` is anything :func:`resolve_voc_folder` accepts (a year folder, a VOCdevkit with one
    year, or a parent of VOCdevkit). ``image_set`` names ``ImageSets/Main/<image_set>.txt``
    (records follow its order); None takes all ``Annotations/*.xml`` sorted by id.
    ``on_problem``: ``"raise"`` raises :class:`DataProblem` at the first problem; ``"warn"``
    warns (naming the file and problem), skips the bad object or image and goes on. Images with
    zero valid objects are kept (valid negatives). Image files are only checked for existence
    (and their header read when the XML has no size); use :func:`check_dataset` to decode them.
    """
    if on_problem not in ("raise", "warn"):
        raise ValueError(f"on_problem must be 'raise' or 'warn', not {on_problem!r}")
    sink = _ProblemSink(on_problem)
    root = resolve_voc_folder(folder)
    image_ids, source = _list_image_ids(root, image_set)
    return _load_records(root, image_ids, source, tuple(classes), sink)


def _load_records(
    root: Path, image_ids: Sequence[str], source: Path, classes: tuple[str, ...], sink: _ProblemSink
) -> list[ImageRecord]:
    class_index = {name: index for index, name in enumerate(classes)}
    records: list[ImageRecord] = []
    seen: set[str] = set()
    for image_id in image_ids:
        if image_id in seen:
            sink.report(source, f"image id {image_id} is listed more than once (kept once)")
            continue
        seen.add(image_id)
        try:
            records.append(_load_record(root, image_id, class_index, sink))
        except _SkipImage:
            continue
    return records


def _load_record(root: Path, image_id: str, class_index: dict[str, int], sink: _ProblemSink) -> ImageRecord:
    xml_path = root / "Annotations" / f"{image_id}.xml"
    annotation = _read_annotation(xml_path, image_id, sink)
    image_path = find_image_path(root, image_id)
    if image_path is None:
        expected = root / "JPEGImages" / f"{image_id}.jpg"
        sink.report(expected, f"image file is missing (also looked for {', '.join(IMAGE_SUFFIXES[1:3])})")
        if sink.mode != "collect":  # "warn": skip now; "collect" goes on to report the objects too
            raise _SkipImage
    width, height = _read_size(annotation, xml_path, image_path, sink)

    boxes: list[list[float]] = []
    labels: list[int] = []
    difficult: list[bool] = []
    for number, obj in enumerate(_as_list(annotation.get("object", [])), start=1):
        parsed = _parse_object(obj, number, xml_path, class_index, width, height, sink)
        if parsed is not None:
            boxes.append(parsed[0])
            labels.append(parsed[1])
            difficult.append(parsed[2])
    if image_path is None:
        raise _SkipImage
    return ImageRecord(
        image_id=image_id,
        image_path=image_path,
        width=width,
        height=height,
        boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.array(labels, dtype=np.int64),
        difficult=np.array(difficult, dtype=bool),
    )


def _report_image(sink: _ProblemSink, path: Path, problem: str) -> NoReturn:
    sink.report(path, problem)
    raise _SkipImage


def _read_annotation(xml_path: Path, image_id: str, sink: _ProblemSink) -> dict[str, Any]:
    if not xml_path.is_file():
        _report_image(sink, xml_path, f"annotation file is missing for image id {image_id}")
    try:
        tree_root = ET.parse(xml_path).getroot()
    except ET.ParseError as err:
        _report_image(sink, xml_path, f"malformed XML ({err})")
    except OSError as err:
        _report_image(sink, xml_path, f"cannot read annotation file ({err})")
    if tree_root.tag != "annotation":
        _report_image(sink, xml_path, f"not a VOC annotation (root element <{tree_root.tag}>, expected <annotation>)")
    parsed = VOCDetection.parse_voc_xml(tree_root).get("annotation", {})
    return parsed if isinstance(parsed, dict) else {}


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _read_size(
    annotation: dict[str, Any], xml_path: Path, image_path: Path | None, sink: _ProblemSink
) -> tuple[int, int]:
    """Width and height from ``<size>``; from the image header when the XML has none or zeros."""
    size = annotation.get("size")
    size = size if isinstance(size, dict) else {}
    values: list[int] = []
    for key in ("width", "height"):
        text = size.get(key, "")
        if isinstance(text, list) or isinstance(text, dict):
            _report_image(sink, xml_path, f"<size><{key}> appears more than once or is not a number")
        text = str(text).strip()
        if text == "":
            values.append(0)
            continue
        try:
            number = float(text)
        except ValueError:
            number = float("nan")
        if not math.isfinite(number) or number < 0 or number != int(number):
            _report_image(sink, xml_path, f"<size><{key}> is not a whole non-negative number: {text!r}")
        values.append(int(number))
    width, height = values
    if width > 0 and height > 0:
        return width, height
    if image_path is None:  # only when collecting problems: the size stays unknown (0, 0)
        return 0, 0
    try:
        return _read_image_size(image_path)
    except DataProblem as err:
        _report_image(sink, image_path, f"{err.problem} (needed because {xml_path.name} gives no <size>)")
    raise AssertionError("unreachable")


def _read_image_size(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return int(image.width), int(image.height)
    except (OSError, UnidentifiedImageError) as err:
        raise DataProblem(path, f"cannot read image header ({err})") from None


def _parse_object(
    obj: Any,
    number: int,
    xml_path: Path,
    class_index: dict[str, int],
    width: int,
    height: int,
    sink: _ProblemSink,
) -> tuple[list[float], int, bool] | None:
    """One ``<object>`` as (box, label, difficult), or None when reported as a problem and skipped."""
    where = f"object {number}"
    if not isinstance(obj, dict):
        sink.report(xml_path, f"{where} has no <name>/<bndbox> elements")
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        sink.report(xml_path, f"{where} has no single <name>")
        return None
    name = name.strip()
    where = f"object {number} ({name})"
    if name not in class_index:
        known = ", ".join(class_index)
        sink.report(xml_path, f"{where}: unknown class {name!r} (known classes: {known})")
        return None

    difficult = _parse_flag(obj.get("difficult"))
    if difficult is None:
        sink.report(xml_path, f"{where}: <difficult> is not 0 or 1: {obj.get('difficult')!r}")
        return None

    box = _parse_box(obj.get("bndbox"), where, xml_path, sink)
    if box is None:
        return None
    if width > 0 and height > 0:  # else the size is unknown (image missing, problems being collected)
        box = _clip_box(box, where, xml_path, width, height, sink)
    return None if box is None else (box, class_index[name], difficult)


def _parse_box(bndbox: Any, where: str, xml_path: Path, sink: _ProblemSink) -> list[float] | None:
    """``<bndbox>`` as ``[x1, y1, x2, y2]`` in continuous coordinates (VOC's 1-based pixel
    corners: ``xmin - 1``), or None when reported as a problem."""
    if not isinstance(bndbox, dict):
        problem = "has more than one <bndbox>" if isinstance(bndbox, list) else "has no <bndbox>"
        sink.report(xml_path, f"{where} {problem}")
        return None
    coords: list[float] = []
    for key in ("xmin", "ymin", "xmax", "ymax"):
        text = bndbox.get(key)
        try:
            value = float(str(text).strip()) if isinstance(text, str) else float("nan")
        except ValueError:
            value = float("nan")
        if not math.isfinite(value):
            sink.report(xml_path, f"{where}: box coordinate <{key}> is missing or not a number: {text!r}")
            return None
        coords.append(value)
    xmin, ymin, xmax, ymax = coords
    if xmin > xmax or ymin > ymax:
        sink.report(xml_path, f"{where}: inverted box (xmin={xmin:g}, ymin={ymin:g}, xmax={xmax:g}, ymax={ymax:g})")
        return None
    return [xmin - 1.0, ymin - 1.0, xmax, ymax]


def _clip_box(box: list[float], where: str, xml_path: Path, width: int, height: int, sink: _ProblemSink) -> list[float] | None:
    """A box that sticks out of its image by at most the clipping tolerance, clipped (and noticed);
    one outside it or further out, reported (None)."""
    overflow_x = max(0.0 - box[0], box[2] - width, 0.0)
    overflow_y = max(0.0 - box[1], box[3] - height, 0.0)
    if overflow_x <= 0 and overflow_y <= 0:
        return box
    clipped = [min(max(box[0], 0.0), width), min(max(box[1], 0.0), height),
               min(max(box[2], 0.0), width), min(max(box[3], 0.0), height)]
    xml_text = f"(xmin={box[0] + 1:g}, ymin={box[1] + 1:g}, xmax={box[2]:g}, ymax={box[3]:g})"
    tolerance_x = max(_MIN_CLIP_PX, CLIP_TOLERANCE * width)
    tolerance_y = max(_MIN_CLIP_PX, CLIP_TOLERANCE * height)
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        sink.report(xml_path, f"{where}: box {xml_text} lies outside the {width}x{height} image")
        return None
    if overflow_x > tolerance_x or overflow_y > tolerance_y:
        sink.report(xml_path, f"{where}: box {xml_text} sticks out of the {width}x{height} image by "
                              f"{max(overflow_x, overflow_y):g} px (more than the clipping tolerance)")
        return None
    sink.notice(xml_path, f"{where}: box {xml_text} sticks out of the {width}x{height} image; clipped")
    return clipped


def _parse_flag(value: Any) -> bool | None:
    """``<difficult>``: missing or empty -> False; 0/1 (or true/false) -> bool; else None."""
    if value is None:
        return False
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    if text in ("", "0", "false", "no"):
        return False
    if text in ("1", "true", "yes"):
        return True
    try:
        return float(text) != 0.0
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------
# Whole-dataset check


def check_dataset(
    root: str | Path, image_set: str | None = None, classes: Sequence[str] = VOC_CLASSES
) -> list[str]:
    """Every problem of a dataset in one pass: one line ``"<file>: <problem>"`` each; [] when clean.

    Reads every annotation like :func:`load_annotations` (including boxes it would clip), then
    decodes every image to check it is readable and that its size matches the XML ``<size>``.
    Problems that stop the check early (missing folder, missing image set list) are returned as
    a single line rather than raised.
    """
    sink = _ProblemSink("collect")
    try:
        folder = resolve_voc_folder(root)
        image_ids, source = _list_image_ids(folder, image_set)
    except DataProblem as err:
        return [str(err)]
    records = _load_records(folder, image_ids, source, tuple(classes), sink)
    for record in records:
        try:
            image = decode_rgb_image(record.image_path)
        except DataProblem as err:
            sink.report(record.image_path, err.problem)
            continue
        height, width = int(image.shape[-2]), int(image.shape[-1])
        if (width, height) != (record.width, record.height):
            xml_path = folder / "Annotations" / f"{record.image_id}.xml"
            sink.report(
                record.image_path,
                f"image is {width}x{height} but {xml_path.name} <size> says {record.width}x{record.height}",
            )
    return sink.lines


# --------------------------------------------------------------------------------------------
# Torch dataset


def decode_rgb_image(path: Path) -> Tensor:
    """uint8 (3, H, W) RGB; grayscale, palette and RGBA images are converted. DataProblem if unreadable."""
    try:
        data = torch.from_numpy(np.frombuffer(Path(path).read_bytes(), dtype=np.uint8).copy())
    except OSError as err:
        raise DataProblem(path, f"cannot read image file ({err.strerror or err})") from None
    if data.numel() == 0:
        raise DataProblem(path, "image file is empty")
    try:
        image = decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as first_error:
        image = _decode_with_pillow(path, first_error)
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = (image.to(torch.float32) / float(torch.iinfo(image.dtype).max) * 255.0).round().to(torch.uint8)
    return image


def _decode_with_pillow(path: Path, first_error: Exception) -> Tensor:
    """Fallback for formats torchvision cannot decode (e.g. CMYK/odd JPEGs); strict about truncation."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as pil_image:
            array = np.asarray(pil_image.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        message = str(first_error).strip().splitlines()[-1] if str(first_error).strip() else str(err)
        if "csrc" in message:  # "decode_jpeg, /path/to/decode_jpeg.cpp:167, Image is truncated"
            message = message.rsplit(", ", 1)[-1]
        raise DataProblem(path, f"corrupt or unreadable image ({message})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class DetectionDataset(torch.utils.data.Dataset):
    """``records`` -> ``(image, target)``.

    ``image``: float32 (3, H, W) in [0, 1]. ``target``: ``{"boxes": float32 (N, 4),
    "labels": int64 (N,), "difficult": bool (N,), "image_id": str}`` in this module's convention.
    ``include_difficult=False`` (training) removes difficult boxes. With ``hflip_prob > 0`` the
    image and boxes are flipped together (``x1' = W - x2, x2' = W - x1``). The flip decision is a
    deterministic function of ``(seed, epoch, index, reads of index since set_epoch)``: call
    :meth:`set_epoch` each epoch to make it independent of DataLoader workers.
    An unreadable image, or one whose size differs from its record, raises :class:`DataProblem`.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        *,
        include_difficult: bool = True,
        hflip_prob: float = 0.0,
        seed: int = 0,
    ):
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], not {hflip_prob}")
        self.records = list(records)
        self.include_difficult = include_difficult
        self.hflip_prob = float(hflip_prob)
        self.seed = int(seed)
        self.epoch = 0
        self._reads: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Make flips of this epoch a function of (seed, epoch, index) only."""
        self.epoch = int(epoch)
        self._reads.clear()

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        record = self.records[index]
        image = decode_rgb_image(record.image_path)
        height, width = int(image.shape[-2]), int(image.shape[-1])
        if (width, height) != (record.width, record.height):
            raise DataProblem(
                record.image_path,
                f"image is {width}x{height} but its annotation says {record.width}x{record.height} "
                "(run check_dataset to list every such problem)",
            )
        boxes = torch.tensor(record.boxes, dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor(record.labels, dtype=torch.int64)
        difficult = torch.tensor(record.difficult, dtype=torch.bool)
        if not self.include_difficult:
            keep = ~difficult
            boxes, labels, difficult = boxes[keep], labels[keep], difficult[keep]
        if self.hflip_prob > 0.0 and self._should_flip(index):
            image = image.flip(-1)
            boxes = flip_boxes_horizontally(boxes, width)
        target = {"boxes": boxes, "labels": labels, "difficult": difficult, "image_id": record.image_id}
        return image.to(torch.float32).div_(255.0), target

    def _should_flip(self, index: int) -> bool:
        read = self._reads.get(index, 0)
        self._reads[index] = read + 1
        draw = np.random.default_rng([self.seed, self.epoch, int(index), read]).random()
        return bool(draw < self.hflip_prob)


def flip_boxes_horizontally(boxes: Tensor, width: int) -> Tensor:
    """Boxes of an image ``width`` wide after a horizontal flip: ``x1' = W - x2, x2' = W - x1``."""
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return flipped


def collate_detection(batch: Sequence[tuple[Tensor, dict[str, Any]]]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """DataLoader ``collate_fn``: images and targets as two lists (images differ in size)."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets
