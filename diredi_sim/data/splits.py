"""Class splits: which VOC classes are labelled in a party's data (docs/design.md section 3).

A split is a set of class names. :func:`filter_split` keeps the images that contain at least one
box of a split class and drops the boxes of the other classes; those objects stay in the pixels,
unlabelled, so the model learns them as background (that is how a customer who drops a class makes
a model forget it). Labels stay indices into ``VOC_CLASSES``: every model predicts all 20 classes.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Sequence

from diredi_sim.data import VOC_CLASSES
from diredi_sim.data.voc import ImageRecord

__all__ = ["SPLIT_PRESETS", "describe_split", "filter_split", "keep_classes", "resolve_split"]

_TEACHER = ("aeroplane", "bird", "bus", "car", "cow", "horse", "motorbike", "person", "sheep", "tvmonitor")
_PRESUMED = ("aeroplane", "bus", "horse", "motorbike", "person")


def _order_like_voc(names: Sequence[str]) -> tuple[str, ...]:
    wanted = set(names)
    return tuple(name for name in VOC_CLASSES if name in wanted)


# The paper's splits, each in VOC_CLASSES order.
SPLIT_PRESETS: dict[str, tuple[str, ...]] = {
    "all": tuple(VOC_CLASSES),
    "teacher": _order_like_voc(_TEACHER),
    "presumed": _order_like_voc(_PRESUMED),  # Distill A/B, RD B
    "exp1": _order_like_voc(_PRESUMED + ("cat",)),  # Exp 1 customer: presumed + cat (private)
    "exp2": _order_like_voc(tuple(c for c in _PRESUMED if c != "horse") + ("dog",)),  # presumed - horse + dog
}


def resolve_split(name_or_classes: str | Sequence[str]) -> tuple[str, ...]:
    """A preset name (``SPLIT_PRESETS``) or an explicit list of VOC class names -> class names.

    Explicit lists keep their order, without duplicates. An unknown preset or class name raises
    ``ValueError`` naming it and listing the valid choices; an empty list is an error too.
    """
    if isinstance(name_or_classes, str):
        if name_or_classes in SPLIT_PRESETS:
            return SPLIT_PRESETS[name_or_classes]
        hint = " (it is a class name: pass it in a list)" if name_or_classes in VOC_CLASSES else ""
        raise ValueError(
            f"unknown split preset {name_or_classes!r}{hint}; presets: {', '.join(SPLIT_PRESETS)}"
        )
    names = list(name_or_classes)
    unknown = [name for name in names if name not in VOC_CLASSES]
    if unknown:
        raise ValueError(
            f"unknown class name(s) {', '.join(map(repr, unknown))} in split; "
            f"valid classes: {', '.join(VOC_CLASSES)}"
        )
    if not names:
        raise ValueError("a split needs at least one class name")
    return tuple(dict.fromkeys(names))


def filter_split(records: list[ImageRecord], classes: Sequence[str]) -> list[ImageRecord]:
    """Keep the images holding at least one box of ``classes``, with only those classes' boxes.

    Boxes of other classes are dropped (the objects stay in the pixels, as background). A
    difficult box counts: an image whose only split box is difficult is kept. Labels stay indices
    into ``VOC_CLASSES`` (records must have been loaded with the default classes); the order of
    records is kept. ``classes`` is anything :func:`resolve_split` accepts (a preset name or a
    list of class names).
    """
    wanted = {VOC_CLASSES.index(name) for name in resolve_split(classes)}
    kept: list[ImageRecord] = []
    for record in records:
        mask = [int(label) in wanted for label in record.labels]
        if not any(mask):
            continue
        if all(mask):
            kept.append(record)
            continue
        kept.append(
            dataclasses.replace(
                record,
                boxes=record.boxes[mask],
                labels=record.labels[mask],
                difficult=record.difficult[mask],
            )
        )
    return kept


def keep_classes(records: list[ImageRecord], classes: Sequence[str]) -> list[ImageRecord]:
    """Every image kept, in order, with only the boxes of ``classes`` (the others stay in the
    pixels, unlabelled: background). Unlike :func:`filter_split`, an image left without boxes is
    kept, so that two such lists hold the same images in the same order."""
    wanted = {VOC_CLASSES.index(name) for name in resolve_split(classes)}
    kept: list[ImageRecord] = []
    for record in records:
        mask = [int(label) in wanted for label in record.labels]
        kept.append(record if all(mask) else dataclasses.replace(
            record, boxes=record.boxes[mask], labels=record.labels[mask], difficult=record.difficult[mask]))
    return kept


def describe_split(records: Sequence[ImageRecord]) -> dict[str, int]:
    """Boxes per class name (classes with boxes only, in VOC_CLASSES order)."""
    counts = Counter(int(label) for record in records for label in record.labels)
    return {VOC_CLASSES[index]: counts[index] for index in sorted(counts)}
