"""Where a config's images come from: the embedded synthetic set or a real VOCdevkit."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from diredi_sim.data import VOC_CLASSES
from diredi_sim.data.splits import filter_split, resolve_split
from diredi_sim.data.synthetic import default_cache_dir, ensure_synthetic
from diredi_sim.data.voc import ImageRecord, load_annotations, resolve_voc_folder


def resolve_data_folder(data_cfg) -> Path:
    """The VOC year folder for a DataConfig; generates the synthetic set on first use."""
    if data_cfg.source == "synthetic":
        cache = Path(data_cfg.cache_dir) if data_cfg.cache_dir else default_cache_dir()
        return ensure_synthetic(cache, data_cfg.synthetic)
    return resolve_voc_folder(data_cfg.voc_root, data_cfg.year or None)


def load_split_records(data_cfg, image_set: str, split: str | Sequence[str] = "all", *, limit: int = 0) -> list[ImageRecord]:
    """Images of ``image_set`` that hold a class of ``split``, with only that split's boxes.

    Real VOC is read with on_problem="warn": a bad object or image is skipped with a warning
    naming the file, and the run goes on.
    """
    folder = resolve_data_folder(data_cfg)
    records = load_annotations(folder, image_set, on_problem="warn" if data_cfg.source == "voc" else "raise")
    records = filter_split(records, resolve_split(split))
    return records[:limit] if limit else records


def split_class_indices(split: str | Sequence[str]) -> list[int]:
    return [VOC_CLASSES.index(name) for name in resolve_split(split)]
