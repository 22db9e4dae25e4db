"""The customers of a federation: listed one by one (split presets such as ``exp1``, or class
names joined by ``+``) followed by ``generated`` customers drawn from a seed, each adding one or
more private classes outside the presumed set and possibly dropping presumed ones. A customer's
partition id is its index in that list (:func:`build_population`); :func:`pick_share` is its
share of a split's images."""

from __future__ import annotations

import random
from dataclasses import dataclass

from diredi_sim.config import ConfigError, _check
from diredi_sim.data import VOC_CLASSES
from diredi_sim.data.splits import SPLIT_PRESETS, resolve_split
from diredi_sim.settings import ClassSets, PipelineConfig

PARTITIONS = ("shared", "disjoint")


@dataclass(frozen=True)
class PopulationConfig:
    """The customers: ``customers`` listed one by one, then ``generated`` more from ``seed``."""

    customers: tuple[str, ...] = ("exp1", "exp2")  # split presets, or class names joined by '+' ("aeroplane+bus+cat")
    generated: int = 2  # customers drawn from `seed` after the listed ones
    seed: int = 0
    max_private: int = 2  # a generated customer adds 1..max_private private classes
    drop_probability: float = 0.25  # each presumed class is dropped with this probability (at least one is kept)
    partition: str = "shared"  # shared: each customer holds every image of its split; disjoint: images dealt out by partition id

    def __post_init__(self):
        _check(self.generated >= 0, "population.generated", self.generated, "must be >= 0")
        _check(len(self.customers) + self.generated >= 1, "population.customers", self.customers,
               "the population is empty: list customers or set population.generated >= 1")
        _check(self.max_private >= 1, "population.max_private", self.max_private, "must be >= 1")
        _check(0 <= self.drop_probability <= 1, "population.drop_probability", self.drop_probability, "must be in [0, 1]")
        _check(self.partition in PARTITIONS, "population.partition", self.partition, f"must be one of {list(PARTITIONS)}")
        for spec in self.customers:
            try:
                parse_customer(spec)
            except ValueError as exc:
                raise ConfigError(f"population.customers: {spec!r}: {exc}") from None


@dataclass(frozen=True)
class Customer:
    partition_id: int
    name: str  # the preset or the '+'-joined class names it was listed as; "generated-<i>" otherwise
    classes: tuple[str, ...]  # the customer's target classes, VOC order

    def class_sets(self, pipeline: PipelineConfig) -> ClassSets:
        return ClassSets.of(self.classes, pipeline.presumed_split, pipeline.teacher_split)


def parse_customer(spec: str) -> tuple[str, ...]:
    """``exp1`` (a split preset) or ``aeroplane+bus+cat`` (class names) -> class names in VOC order."""
    names = resolve_split(spec) if spec in SPLIT_PRESETS else resolve_split([s.strip() for s in spec.split("+") if s.strip()])
    return tuple(n for n in VOC_CLASSES if n in names)


def build_population(population: PopulationConfig, presumed_split="presumed") -> list[Customer]:
    """The listed customers, then the generated ones (deterministic from ``population.seed``)."""
    customers = [Customer(i, spec, parse_customer(spec)) for i, spec in enumerate(population.customers)]
    presumed = resolve_split(presumed_split)
    outside = [c for c in VOC_CLASSES if c not in presumed]
    rng = random.Random(population.seed)
    for j in range(population.generated):
        private = rng.sample(outside, rng.randint(1, min(population.max_private, len(outside))))
        kept = [c for c in presumed if rng.random() >= population.drop_probability] or [rng.choice(presumed)]
        names = set(private) | set(kept)
        customers.append(Customer(len(customers), f"generated-{j}", tuple(n for n in VOC_CLASSES if n in names)))
    return customers


def pick_share(population: PopulationConfig, partition_id: int, num_customers: int):
    """The customer's share of a split's images: all (``shared``) or every n-th (``disjoint``)."""
    if population.partition == "shared":
        return lambda records: records
    return lambda records: [r for i, r in enumerate(records) if i % num_customers == partition_id]
