"""The image sets and their two disjoint pools: the manufacturer's public images and the
customers' images (:class:`DataSets`), the manufacturer's view that refuses the customers' pool,
a copy of one pool (:func:`export_pool`), and what one customer trains on (:class:`CustomerData`)."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


from diredi_sim.config import DataConfig, TrainConfig
from diredi_sim.data.sources import resolve_data_folder
from diredi_sim.data.splits import filter_split, keep_classes, resolve_split
from diredi_sim.data.voc import ImageRecord, load_annotations, resolve_voc_folder
from diredi_sim.settings import PipelineConfig



POOLS = ("public", "customer", "all")


class PrivacyError(RuntimeError):
    """A process asked for data its side of the federation must not read."""


def pool_of(image_id: str, public_fraction: float) -> str:
    """The pool an image belongs to: ``public`` (the manufacturer's) or ``customer``, from a hash
    of its id alone, so that the split does not depend on the order or the number of images."""
    digest = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "big")
    return "public" if digest / 2**64 < public_fraction else "customer"


class DataSets:
    """Each image set's annotations read once; pools and splits are filtered in memory.

    Every image set is dealt into two disjoint pools (``data.public_fraction``): the
    manufacturer's ``public`` images (teacher, Distill A/B, its verification and its test
    images; also shipped to customers as the presumed data of reverse distillation) and the
    ``customer`` images, which only customers hold. No image id is in both."""

    def __init__(self, data: DataConfig, *, folder: Path | None = None, pools: Sequence[str] = POOLS):
        self.data = data
        self.folder = folder if folder is not None else resolve_data_folder(data)
        self.pools = tuple(pools)
        self._records: dict[tuple[str, str], list[ImageRecord]] = {}

    @classmethod
    def manufacturer(cls, data: DataConfig) -> "DataSets":
        """The manufacturer's view: its public pool only, read from ``data.manufacturer_root``
        when set (a folder that holds nothing else), else from the data source. Asking it for
        the customers' pool is a :class:`PrivacyError`."""
        folder = resolve_voc_folder(data.manufacturer_root) if data.manufacturer_root else None
        return cls(data, folder=folder, pools=("public",))

    def records(self, image_set: str, split, limit: int = 0, *, pool: str) -> list[ImageRecord]:
        if pool not in POOLS:
            raise ValueError(f"pool {pool!r}: must be one of {list(POOLS)}")
        if pool not in self.pools:
            raise PrivacyError(f"the {pool!r} pool of image set {image_set!r} was asked for where only {list(self.pools)} "
                               f"may be read (the manufacturer's process never reads a customer's images or labels)")
        if (image_set, "all") not in self._records:
            on_problem = "warn" if self.data.source == "voc" else "raise"
            every = load_annotations(self.folder, image_set, on_problem=on_problem)
            self._records[(image_set, "all")] = every
            for name in ("public", "customer"):
                self._records[(image_set, name)] = [r for r in every if pool_of(r.image_id, self.data.public_fraction) == name]
        kept = filter_split(self._records[(image_set, pool)], split)
        return kept[:limit] if limit else kept

    def train(self, split, cfg: TrainConfig, *, pool: str) -> list[ImageRecord]:
        return self.records(self.data.train_set, split, cfg.max_train_images, pool=pool)

    def val(self, split, cfg: TrainConfig, *, pool: str) -> list[ImageRecord]:
        return self.records(self.data.val_set, split, cfg.max_eval_images, pool=pool)


def export_pool(data: DataConfig, destination: str | Path, pool: str = "public") -> dict[str, int]:
    """Copy one pool of the data source (train, val and test image sets) into a new VOC folder
    ``destination``: its images, its annotation files and image-set lists holding its ids only,
    in the source's order. ``data.manufacturer_root = destination`` then gives the manufacturer
    the same records as the source's public pool, with no other file in reach. Returns the
    images per image set. Refuses a destination that already holds files."""
    destination = Path(destination)
    if destination.exists() and any(destination.iterdir()):
        raise FileExistsError(f"{destination}: not empty; export_pool writes into a new folder")
    datasets = DataSets(data)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (destination / sub).mkdir(parents=True, exist_ok=True)
    counts = {}
    for image_set in dict.fromkeys((data.train_set, data.val_set, data.test_set)):
        records = datasets.records(image_set, "all", pool=pool)
        for record in records:
            shutil.copy2(record.image_path, destination / "JPEGImages" / record.image_path.name)
            shutil.copy2(datasets.folder / "Annotations" / f"{record.image_id}.xml", destination / "Annotations")
        (destination / "ImageSets" / "Main" / f"{image_set}.txt").write_text("".join(f"{r.image_id}\n" for r in records))
        counts[image_set] = len(records)
    return counts


@dataclass(frozen=True)
class CustomerData:
    """What one customer trains on, chosen once.

    ``presumed``: the manufacturer's presumed images (public pool, presumed classes), which the
    manufacturer ships with its models: Tutor1's data. ``presumed_kept``: the same images in the
    same order, with the boxes of the classes the customer drops removed (the objects stay in the
    pixels, as background): Tutor2's presumed part. ``own``: the customer's own images (customer
    pool, its classes, its share), which never leave it. ``combined`` = presumed_kept + own: the
    customer's whole training set (Distill C public+private, direct training, local fine-tuning).
    """

    presumed: list[ImageRecord]
    presumed_kept: list[ImageRecord]
    own: list[ImageRecord]
    own_val: list[ImageRecord]
    presumed_val: list[ImageRecord]

    @property
    def combined(self) -> list[ImageRecord]:
        return self.presumed_kept + self.own


def select_customer_data(datasets: DataSets, pipeline: PipelineConfig, customer, cfg: TrainConfig,
                         share: Callable[[list[ImageRecord]], list[ImageRecord]] = lambda r: r) -> CustomerData:
    """The customer's data for a stage with settings ``cfg`` (its image caps). ``share`` picks the
    customer's part of the customer pool (all of it by default)."""
    presumed = datasets.train(pipeline.presumed_split, cfg, pool="public")
    kept = resolve_split(customer)
    return CustomerData(presumed, keep_classes(presumed, kept), share(datasets.train(customer, cfg, pool="customer")),
                        share(datasets.val(customer, cfg, pool="customer")), datasets.val(pipeline.presumed_split, cfg, pool="public"))
