"""The privacy boundary: the manufacturer's process never opens a customer's image or label
file. Here: its view of the data refuses the customers' pool, and a copy of the public pool
(``data.manufacturer_root``) gives it the same records with no other file in reach. The whole
run on that copy, with every open() of the ServerApp's process watched, is in
test_simulation.py (it shares that module's simulation)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

from diredi_sim.config import DataConfig
from diredi_sim.datasets import DataSets, PrivacyError, export_pool
from diredi_sim.data.synthetic import SyntheticConfig

TINY = SyntheticConfig(seed=3, num_train=24, num_val=8, num_test=16, min_objects=3, max_objects=5, min_object_size=24, clutter=2.0)
_WATCH: dict = {"active": False, "paths": set(), "opened": []}


def _audit(event: str, args: tuple) -> None:
    if _WATCH["active"] and event == "open" and isinstance(args[0], (str, Path)):
        path = str(Path(args[0]).resolve()) if not str(args[0]).startswith("/proc") else ""
        if path in _WATCH["paths"]:
            _WATCH["opened"].append(path)


sys.addaudithook(_audit)  # hooks cannot be removed: it records only while _WATCH["active"]


def customer_files(data: DataConfig) -> set[str]:
    """Every image and annotation file of the customers' pool."""
    datasets = DataSets(data)
    files = set()
    for image_set in (data.train_set, data.val_set, data.test_set):
        for record in datasets.records(image_set, "all", pool="customer"):
            files.add(str(record.image_path.resolve()))
            files.add(str((datasets.folder / "Annotations" / f"{record.image_id}.xml").resolve()))
    return files


def test_the_manufacturers_view_refuses_the_customers_pool(tmp_path):
    data = DataConfig(cache_dir=str(tmp_path / "data"), synthetic=TINY)
    public = tmp_path / "public"
    counts = export_pool(data, public)
    full = DataSets(data)
    assert counts == {s: len(full.records(s, "all", pool="public")) for s in ("train", "val", "test")}
    maker = DataSets.manufacturer(replace(data, manufacturer_root=str(public)))
    assert maker.folder == public
    for image_set in ("train", "val", "test"):  # the copy gives the same records, in the same order
        assert [r.image_id for r in maker.records(image_set, "all", pool="public")] == \
               [r.image_id for r in full.records(image_set, "all", pool="public")]
    with pytest.raises(PrivacyError, match="'customer' pool of image set 'test'"):
        maker.records("test", "all", pool="customer")
    with pytest.raises(PrivacyError):
        DataSets.manufacturer(data).records("train", "all", pool="all")
    with pytest.raises(FileExistsError, match="not empty"):
        export_pool(data, public)
