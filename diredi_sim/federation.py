"""Many customers, one manufacturer: the population, the federation's config and the work of
each side, in plain torch (docs/design.md sections 4 and 7). ``clients/`` and ``server/`` wrap these
in Flower's ClientApp and ServerApp; nothing here imports flwr or ray.

- :class:`PopulationConfig` / :func:`build_population`: customers listed one by one (split
  presets such as ``exp1``, or class names joined by ``+``) followed by ``generated`` customers
  drawn from a seed, each adding one or more private classes outside the presumed set and
  possibly dropping presumed ones. A customer's partition id is its index in that list.
- :meth:`FederationConfig.seeds`: a customer's seeds, from (run seed, partition id, replicate)
  by :func:`diredi_sim.seeds.derive_seed`; partition 0 of replicate 0 uses the run seed's, so
  that a one-customer federation repeats :func:`diredi_sim.pipeline.run_pipeline` exactly.
- :func:`customer_work`: the customer's step (RD B, RD A, delta) on its own data;
  :func:`privatize_delta`: local differential privacy on that delta, when configured.
- The two sides' work after a delta came up, each on its own data (plain arguments in, plain
  results out, so that the server can run them in worker processes): the manufacturer's
  :func:`manufacturer_review` (verification, Distill C public, its half of each table row) and
  :func:`review_edge` (its check of an edge a customer distilled); the customer's
  :func:`customer_redistill` (Distill C public+private) and :func:`customer_evaluate` (its half
  of each row, as scalars); :func:`combine_round` joins the halves, and
  :func:`round_in_one_process` runs them all in one process (benches, tests).
- :func:`merge_accepted`: the accepted deltas merged into the shared tutor by the configured
  rule, itself verified before it replaces the tutor.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diredi_sim.compute import configure_process
from diredi_sim.config import ConfigError, DataConfig, TrainConfig, _check, check_device, config_from_dict, read_toml, to_flat
from diredi_sim.data import VOC_CLASSES
from diredi_sim.data.splits import SPLIT_PRESETS, resolve_split
from diredi_sim.datasets import DataSets, select_customer_data
from diredi_sim.deltas import COMPRESSIONS, MERGE_RULES, check_delta, compute_norm, count_state_bytes, merge_deltas, privatize
from diredi_sim.flow import Step, distill_c_training_data, redistill, review_update, run_customer
from diredi_sim.logs import customer_tag
from diredi_sim.models import build_detector
from diredi_sim.runs import to_jsonable
from diredi_sim.seeds import Seeds
from diredi_sim.settings import ClassSets, PipelineConfig, DISTILL_C_MODES, load_pipeline_config
from diredi_sim.stages import StageRecorder
from diredi_sim.table import (assemble_rows, compute_knowledge, distill_c_row, evaluate_row, measure_on_customer, measure_on_manufacturer)
from diredi_sim.train import Reporting, evaluate_detector, finetune
from diredi_sim.verify import Verdict, verify_model, verify_update

logger = logging.getLogger(__name__)

PARTITIONS = ("shared", "disjoint")
SELECTIONS = ("all", "krum", "multikrum")


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
class SimulationConfig:
    """How the federation runs (Flower's simulation engine on Ray)."""

    num_rounds: int = 1
    fraction_train: float = 1.0  # customers sampled per round
    merge: str = "mean"  # how accepted deltas update the shared tutor: sum | mean | median | trimmed_mean
    trim_fraction: float = 0.2  # trimmed_mean: share cut at each end
    clip_norm: float = 0.0  # clip each delta to this norm before merging (0: off)
    # merge = "mean" weights: equal (the default: nothing a customer says about itself weighs more),
    # or examples (its reported training images, clipped to [1, max_examples])
    merge_weights: str = "equal"
    max_examples: int = 100_000
    select: str = "all"  # which accepted deltas are merged: all | krum | multikrum (Flower's selection)
    num_malicious: int = 0  # krum / multikrum: customers assumed malicious (f)
    num_selected: int = 0  # multikrum: deltas kept (0: n - f)
    # Local differential privacy on each customer's delta before it goes up: L2 clipping of the
    # whole delta to dp_clip_norm, then Gaussian noise of std dp_noise_multiplier * dp_clip_norm.
    dp_clip_norm: float = 0.0  # 0: off
    dp_noise_multiplier: float = 0.0  # 0: clipping only
    # How the delta travels (after DP, when on): none (float32) | fp16 | int8 (per-tensor symmetric)
    # | topk / topk-int8 (per tensor the topk_fraction largest entries, fp16 / int8 values, int32 indices).
    uplink_compression: str = "none"
    topk_fraction: float = 0.1
    deploy_mode: str = "public+private"  # whose Distill C edge model a customer receives next round
    distill_rejected: bool = False  # Distill C for a rejected update too (from the unchanged tutor), to show
    # what the customer would have got; either way a rejected customer keeps its edge model
    client_cpus: float = 1.0  # Ray resources per customer actor
    client_gpus: float = 0.0
    client_threads: int = 1  # torch threads inside a customer actor
    num_cpus: int = 0  # CPUs Ray may use (0: all of this machine's)
    ray_address: str = ""  # an existing Ray cluster ("auto" or host:port); "" = a local Ray bound to 127.0.0.1
    server_workers: int = 0  # processes for the manufacturer's per-customer steps (0: min(customers, CPUs))
    round_timeout: float = 86400.0  # seconds the server waits for a round's replies
    max_uplink_bytes: int = 1 << 30  # a reply's payload above this is rejected before it is decoded (also: the tutor's neck+head size)

    def __post_init__(self):
        _check(self.num_rounds >= 1, "simulation.num_rounds", self.num_rounds, "must be >= 1")
        _check(0 < self.fraction_train <= 1, "simulation.fraction_train", self.fraction_train, "must be in (0, 1]")
        _check(self.merge in MERGE_RULES, "simulation.merge", self.merge, f"must be one of {list(MERGE_RULES)}")
        _check(0 <= self.trim_fraction < 0.5, "simulation.trim_fraction", self.trim_fraction, "must be in [0, 0.5)")
        _check(self.clip_norm >= 0, "simulation.clip_norm", self.clip_norm, "must be >= 0")
        _check(self.select in SELECTIONS, "simulation.select", self.select, f"must be one of {list(SELECTIONS)}")
        _check(self.merge_weights in ("equal", "examples"), "simulation.merge_weights", self.merge_weights,
               "must be 'equal' or 'examples'")
        _check(self.max_examples >= 1, "simulation.max_examples", self.max_examples, "must be >= 1")
        _check(self.num_malicious >= 0, "simulation.num_malicious", self.num_malicious, "must be >= 0")
        _check(self.num_selected >= 0, "simulation.num_selected", self.num_selected, "must be >= 0")
        _check(self.dp_clip_norm >= 0, "simulation.dp_clip_norm", self.dp_clip_norm, "must be >= 0")
        _check(self.dp_noise_multiplier >= 0, "simulation.dp_noise_multiplier", self.dp_noise_multiplier, "must be >= 0")
        _check(self.dp_noise_multiplier == 0 or self.dp_clip_norm > 0, "simulation.dp_noise_multiplier",
               self.dp_noise_multiplier, "needs simulation.dp_clip_norm > 0 (the noise is a multiple of the clipping norm)")
        _check(self.uplink_compression in COMPRESSIONS, "simulation.uplink_compression", self.uplink_compression,
               f"must be one of {list(COMPRESSIONS)}")
        _check(0 < self.topk_fraction <= 1, "simulation.topk_fraction", self.topk_fraction, "must be in (0, 1]")
        _check(self.deploy_mode in DISTILL_C_MODES, "simulation.deploy_mode", self.deploy_mode, f"must be one of {list(DISTILL_C_MODES)}")
        _check(self.client_cpus > 0, "simulation.client_cpus", self.client_cpus, "must be > 0")
        _check(self.client_gpus >= 0, "simulation.client_gpus", self.client_gpus, "must be >= 0")
        _check(self.client_threads >= 1, "simulation.client_threads", self.client_threads, "must be >= 1")
        _check(self.num_cpus >= 0, "simulation.num_cpus", self.num_cpus, "must be >= 0")
        _check(self.server_workers >= 0, "simulation.server_workers", self.server_workers, "must be >= 0")
        _check(self.round_timeout > 0, "simulation.round_timeout", self.round_timeout, "must be > 0")
        _check(self.max_uplink_bytes > 0, "simulation.max_uplink_bytes", self.max_uplink_bytes, "must be > 0")


METHODS = ("diredi", "fedavg", "fedprox", "direct", "local")  # the built-in methods (experiments/methods/), compare's default


@dataclass(frozen=True)
class BaselineConfig:
    """The methods DiReDi is compared with, on the same customers, splits and seeds."""

    methods: tuple[str, ...] = METHODS  # what `diredi-sim compare` runs
    rounds: int = 3  # rounds of FedAvg, FedProx and the other Flower strategies
    local: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=1, lr=0.001, warmup_steps=10, eval_every=100, max_train_images=600, max_eval_images=100))
    # ^ a FedAvg / FedProx customer's fine-tuning per round; local fine-tuning runs it for `rounds` times the epochs
    proximal_mu: float = 0.01  # FedProx
    # the Flower strategies' parameters, STRATEGY.PARAMETER=VALUE pairs separated by spaces
    # ("fedadam.eta=0.01 krum.num_malicious_nodes=1"); checked against each strategy's constructor
    strategy_args: str = ""

    def __post_init__(self):
        _check(bool(self.methods) and len(set(self.methods)) == len(self.methods), "baselines.methods", self.methods,
               "must be one or more distinct method names (registered in experiments/methods/; compare checks them)")
        _check(self.rounds >= 1, "baselines.rounds", self.rounds, "must be >= 1")
        _check(self.proximal_mu >= 0, "baselines.proximal_mu", self.proximal_mu, "must be >= 0")


@dataclass(frozen=True)
class SDDistConfig:
    """SD-Dist (experiments/methods/sddist.py, diredi_sim/sddist.py): SQMD's messenger distillation
    on the manufacturer's public reference images, for ``baselines.rounds`` rounds."""

    q: int = 3  # the customers of lowest loss on the labelled reference set that may be peers (Q)
    k: int = 2  # peers averaged for each customer, the nearest among the top q by KL (K); k < q
    temperature: float = 3.0  # T of the KL between reference outputs
    rho: float = 0.9  # the customer's loss: (1 - rho) * task + rho * KL(peer mean || own)
    reference_images: int = 32  # the public reference set: the first this many public images of data.val_set
    # MobileNetV2 width of each customer's edge model, comma-separated, dealt out by partition id
    # ("0.5,0.75": even ids 0.5, odd 0.75); "" = the deployed edge's width for every customer
    edge_widths: str = ""

    def __post_init__(self):
        _check(self.q >= 2, "sddist.q", self.q, "must be >= 2 (a customer needs a peer other than itself among the top q)")
        _check(1 <= self.k < self.q, "sddist.k", self.k, f"must be in [1, sddist.q - 1] = [1, {self.q - 1}]")
        _check(self.temperature > 0, "sddist.temperature", self.temperature, "must be > 0")
        _check(0 <= self.rho <= 1, "sddist.rho", self.rho, "must be in [0, 1]")
        _check(self.reference_images >= 1, "sddist.reference_images", self.reference_images, "must be >= 1")
        try:
            widths = self.widths
        except ValueError:
            widths = (0.0,)
        _check(all(0 < w < float("inf") for w in widths), "sddist.edge_widths", self.edge_widths,
               "must be positive numbers separated by commas (e.g. \"0.5,0.75\"), or \"\"")

    @property
    def widths(self) -> tuple[float, ...]:
        return tuple(float(w) for w in self.edge_widths.split(",") if w.strip())


@dataclass(frozen=True)
class CEMAConfig:
    """CEMA (experiments/methods/cema.py, diredi_sim/cema.py): test-time adaptation of the deployed
    edge under shift, from the customer's uploaded images. Defaults: CEMA's conf/cema.conf."""

    corruptions: tuple[str, ...] = ("gaussian_noise", "gaussian_blur", "contrast", "jpeg")  # customer i: corruptions[i % n]
    severity: int = 3  # 1-5
    top_k: int = 10  # locations per image whose class scores define its entropy (diredi_sim/cema.py)
    ent_low: float = 0.0  # E_min = ent_low * ln C (CEMA: none)
    ent_high: float = 0.4  # E_max = ent_high * ln C
    warm_up_images: int = 0  # after this many stream images E_max follows the mean entropy (0: fixed, as CEMA's conf)
    ent_high_coeff: float = 0.6  # the dynamic E_max's factor
    d_margin: float = 0.05  # drop an image whose class profile has cosine >= 1 - d_margin with the EMA of kept ones
    batch_size: int = 32  # stream batch at the customer, new images per manufacturer step
    replay_per_step: int = 96  # replayed images added to each step's new ones (0: no replay)
    replay_start: int = 256  # replay once the buffer holds this many images
    replay_capacity: int = 10_000
    alpha: float = 3.0  # entropy
    beta: float = 3.0  # T^2 KL(tutor || edge)
    gamma: float = 1.0  # CE against the tutor's argmax
    temperature: float = 1.0
    edge_lr: float = 0.0025  # SGD, momentum 0.9, on the edge's norm-affine parameters
    tutor_lr: float = 0.00025  # the same on the tutor's
    max_stream_images: int = 0  # the customer's train images streamed (0: all)

    def __post_init__(self):
        from diredi_sim.cema import CORRUPTIONS

        _check(bool(self.corruptions) and all(c in CORRUPTIONS for c in self.corruptions), "cema.corruptions",
               self.corruptions, f"must be one or more of {sorted(CORRUPTIONS)}")
        _check(1 <= self.severity <= 5, "cema.severity", self.severity, "must be 1-5")
        _check(self.top_k >= 1, "cema.top_k", self.top_k, "must be >= 1")
        _check(0 <= self.ent_low < self.ent_high, "cema.ent_low", self.ent_low, "must be >= 0 and below cema.ent_high")
        _check(self.ent_high <= 1, "cema.ent_high", self.ent_high, "must be in (cema.ent_low, 1] (ln C is the largest entropy)")
        _check(self.warm_up_images >= 0, "cema.warm_up_images", self.warm_up_images, "must be >= 0")
        _check(self.ent_high_coeff > 0, "cema.ent_high_coeff", self.ent_high_coeff, "must be > 0")
        _check(0 <= self.d_margin <= 1, "cema.d_margin", self.d_margin, "must be in [0, 1]")
        _check(self.batch_size >= 1, "cema.batch_size", self.batch_size, "must be >= 1")
        _check(self.replay_per_step >= 0, "cema.replay_per_step", self.replay_per_step, "must be >= 0")
        _check(self.replay_start >= 0, "cema.replay_start", self.replay_start, "must be >= 0")
        _check(self.replay_capacity >= 1, "cema.replay_capacity", self.replay_capacity, "must be >= 1")
        for key in ("alpha", "beta", "gamma"):
            _check(getattr(self, key) >= 0, f"cema.{key}", getattr(self, key), "must be >= 0")
        _check(self.temperature > 0, "cema.temperature", self.temperature, "must be > 0")
        _check(self.edge_lr > 0, "cema.edge_lr", self.edge_lr, "must be > 0")
        _check(self.tutor_lr > 0, "cema.tutor_lr", self.tutor_lr, "must be > 0")
        _check(self.max_stream_images >= 0, "cema.max_stream_images", self.max_stream_images, "must be >= 0")


@dataclass(frozen=True)
class FederationConfig:
    """One experiment of the Flower simulation (``diredi-sim simulate CONFIG``, ``flwr run .``)."""

    name: str = "federation"
    seed: int = 0
    preset: str = "cpu"
    runs_dir: str = "runs"
    threads: int = 0  # torch threads of the server process; 0 = torch's default
    device: str = "auto"  # cpu | cuda | cuda:N | auto (the GPU each process sees, else the CPU); see diredi_sim/compute.py
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)  # pipeline.customer is unused: see population
    population: PopulationConfig = field(default_factory=PopulationConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    cema: CEMAConfig = field(default_factory=CEMAConfig)
    sddist: SDDistConfig = field(default_factory=SDDistConfig)
    replicate: int = 0  # the customers' seeds of replicate k differ; the manufacturer's models stay (compare --seeds)
    tensorboard: bool = False  # also write the run's metrics rows as TensorBoard scalars to <run>/tensorboard/ (needs tensorboard)

    def seeds(self, partition_id: int) -> Seeds:
        """Customer ``partition_id``'s seeds in this replicate (:func:`diredi_sim.seeds.derive_seed`)."""
        return Seeds(self.seed, partition_id, self.replicate)

    def __post_init__(self):
        _check(self.preset in ("cpu", "paper"), "preset", self.preset, "must be 'cpu' or 'paper'")
        _check(self.threads >= 0, "threads", self.threads, "must be >= 0")
        check_device(self.device)
        _check(self.simulation.deploy_mode in self.pipeline.distill_c_modes, "simulation.deploy_mode",
               self.simulation.deploy_mode, f"must be one of pipeline.distill_c_modes {list(self.pipeline.distill_c_modes)}")


def federation_config_from_dict(data: dict, source: str = "") -> FederationConfig:
    """A typed FederationConfig from a nested dict (a TOML document); errors name the key."""
    data = dict(data)
    pipeline_table = data.pop("pipeline", {})
    try:
        pipeline = load_pipeline_config(pipeline_table)
        config = config_from_dict(FederationConfig, data)
        return replace(config, pipeline=pipeline)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}" if source else str(exc)) from None


def load_federation_config(path: str | Path, overrides: dict[str, Any] | None = None,
                           overrides_source: str = "--set") -> FederationConfig:
    """Read a federation TOML file; ``overrides`` are flat dotted keys (``simulation.num-rounds``).
    The file is checked alone first, so an error names the file or ``overrides_source``."""
    flat = to_flat_dict(read_toml(path))
    config = federation_from_flat(flat, source=str(path))
    if not overrides:
        return config
    return federation_from_flat({**flat, **{k.replace("_", "-"): v for k, v in overrides.items()}}, source=overrides_source)


def to_flat_dict(data: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict (TOML) as flat dotted kebab-case keys."""
    flat = {}
    for key, value in data.items():
        name = prefix + key.replace("_", "-")
        if isinstance(value, dict):
            flat.update(to_flat_dict(value, name + "."))
        else:
            flat[name] = value
    return flat


def federation_to_flat(config: FederationConfig) -> dict[str, Any]:
    """The config as Flower run_config / ConfigRecord values: flat keys, scalars only (lists
    become comma-separated strings; a customer's '+'-joined class names stay as they are)."""
    flat = to_flat(config)
    return {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in flat.items()}


def federation_from_flat(flat: dict[str, Any], source: str = "") -> FederationConfig:
    """Inverse of :func:`federation_to_flat`; also accepts real lists (a TOML file's)."""
    list_keys = {k for k, v in to_flat(FederationConfig()).items() if isinstance(v, list)}  # comma-separated when flat
    nested: dict = {}
    for key, value in flat.items():
        name = key.replace("_", "-")
        if isinstance(value, str) and (name in list_keys or (name in _SPLIT_KEYS and "," in value)):
            value = [v.strip() for v in value.split(",") if v.strip()]
        parts = key.replace("-", "_").split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source + ': ' if source else ''}{key}: {'.'.join(parts[:-1])} is not a section")
        node[parts[-1]] = value
    return federation_config_from_dict(nested, source)


# Keys that hold a split: a preset name, or class names (a list, comma-separated in the flat form).
_SPLIT_KEYS = {"pipeline.customer", "pipeline.teacher-split", "pipeline.presumed-split"}


# --------------------------------------------------------------------------------- population


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


def effective_pipeline(config: FederationConfig, customer: Customer) -> PipelineConfig:
    """The pipeline settings for one customer: its split, and verification that does not hold
    against it the presumed classes it drops on purpose (it declares its classes, not its data)."""
    classes = customer.class_sets(config.pipeline)
    critical = config.pipeline.verify.critical_classes or classes.presumed
    verify = replace(config.pipeline.verify, critical_classes=tuple(c for c in critical if c not in classes.dropped))
    return replace(config.pipeline, customer=customer.classes, verify=verify)


# ------------------------------------------------------------------------------------- work


def load_model(role: str, preset: str, state: dict[str, Tensor]) -> nn.Module:
    model = build_detector(role, preset, num_classes=len(VOC_CLASSES))
    model.load_state_dict(state)
    return model


def customer_step(config: FederationConfig, customer: Customer, num_customers: int, datasets: DataSets, **settings) -> Step:
    """The :class:`diredi_sim.flow.Step` of one customer's calls in the federation: its settings
    (verification sparing the classes it drops), its classes, seeds and share of the images;
    ``datasets`` is the side's view (the manufacturer's refuses the customers' pool). No progress
    bars (many customers at once)."""
    return Step(effective_pipeline(config, customer), datasets, customer.classes, config.seeds(customer.partition_id),
                share=pick_share(config.population, customer.partition_id, num_customers), progress=False, **settings)


def customer_work(config: FederationConfig, customer: Customer, num_customers: int, tutor_state: dict[str, Tensor],
                  edge_state: dict[str, Tensor], *, datasets: DataSets | None = None, progress: bool = False) -> dict:
    """The customer's step on its own data: RD B, RD A, the delta. Returns the delta (float32,
    neck + head, by name) and scalar metrics only: nothing per image leaves this function."""
    with customer_tag(customer.partition_id, customer.name):  # wherever it runs, its log lines name the customer
        start = time.perf_counter()
        say = logger.info if progress else logger.debug
        datasets = datasets or DataSets(config.data)
        pipeline = effective_pipeline(config, customer)
        tutor, edge = load_model("tutor", config.preset, tutor_state), load_model("edge", config.preset, edge_state)
        recorder = StageRecorder()
        say(f"RD B (presumed data) and RD A ({', '.join(customer.classes)}), {pipeline.rd.epochs} epoch(s) each")
        update = run_customer(tutor, edge, customer_step(config, customer, num_customers, datasets, recorder=recorder, say=say))
        metrics = {
            "partition-id": customer.partition_id,
            "num-examples": update.train_images["rd_a"],
            "rd-b-images": update.train_images["rd_b"],
            "delta-norm": update.delta_info["norm"],
            "delta-bytes-fp32": update.delta_info["bytes_fp32"],
            "delta-bytes-fp16": update.delta_info["bytes_fp16"],
            "seconds": round(time.perf_counter() - start, 3),
        }
        for stage in recorder.stages:
            metrics[f"{stage['stage'].replace('_', '-')}-seconds"] = stage["seconds"]
        say(f"done in {metrics['seconds']:.0f} s (RD B {metrics.get('rd-b-seconds', 0):.0f} s, RD A {metrics.get('rd-a-seconds', 0):.0f} s)")
        return {"delta": {k: v.detach().float().contiguous() for k, v in update.delta.items()}, "metrics": metrics}


def privatize_delta(config: FederationConfig, partition_id: int, delta: dict[str, Tensor],
                    server_round: int = 1) -> dict[str, Tensor]:
    """The customer's delta as it goes up under simulation.dp_clip_norm / dp_noise_multiplier
    (unchanged when dp_clip_norm is 0): clipped, plus noise seeded by the customer and round."""
    sim = config.simulation
    return privatize(delta, sim.dp_clip_norm, sim.dp_noise_multiplier, seed=config.seeds(partition_id)("dp", server_round))


# The manufacturer's side works on DataSets.manufacturer(config.data): its public pool only (a
# PrivacyError otherwise). The customer's side works on DataSets(config.data): the presumed
# images the manufacturer ships, and its own.

def _as_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def manufacturer_review(config: FederationConfig, customer: Customer, tutor_state: dict[str, Tensor],
                        edge_state: dict[str, Tensor], delta: dict[str, Tensor], threads: int = 0) -> dict:
    """The manufacturer's step for one customer's delta, on its own data only: substitution and
    verification (:func:`review_update`), Distill C ``public`` from tutor' (when configured, and
    the update accepted or ``simulation.distill_rejected``), and the manufacturer's half of each
    table row (presumed-class mAP on its test images). Plain arguments in, plain results out
    (state dicts, JSON-able values), so that it can run in a worker process."""
    configure_process(device=config.device, threads=threads)
    start = time.perf_counter()
    datasets = DataSets.manufacturer(config.data)
    pipeline = effective_pipeline(config, customer)
    classes = customer.class_sets(config.pipeline)
    tutor, edge = load_model("tutor", config.preset, tutor_state), load_model("edge", config.preset, edge_state)
    step = customer_step(config, customer, 1, datasets)  # the manufacturer never takes a share of the customers' pool
    recorder = step.recorder
    verdict, tutor_prime, candidate = review_update(tutor, delta, pipeline, datasets, recorder=recorder)
    models = {"tutor_original": tutor, "tutor_updated": tutor_prime, "edge_original": edge}
    if candidate is not None:
        models["tutor_rejected_candidate"] = candidate
    counts = {}
    if "public" in pipeline.distill_c_modes and (verdict.accepted or config.simulation.distill_rejected):
        presumed = resolve_split(pipeline.presumed_split)
        train, val = datasets.train(presumed, pipeline.distill_c, pool="public"), datasets.val(presumed, pipeline.distill_c, pool="public")
        for loss in pipeline.distill_c_losses:
            key = distill_c_row("public", loss)
            models[key], counts[key] = redistill(tutor_prime, edge, train, val, step, mode="public", loss=loss)
    with recorder.measure("evaluate_manufacturer"):
        halves = {key: measure_on_manufacturer(key, model, classes, datasets, pipeline) for key, model in models.items()}
    return {
        "partition_id": customer.partition_id,
        "verdict": verdict_to_dict(verdict),
        "tutor_prime": _as_state(tutor_prime),
        "candidate": _as_state(candidate) if candidate is not None else None,
        "edges": {key: _as_state(model) for key, model in models.items() if key.startswith("edge_distill_c")},
        "manufacturer_rows": to_jsonable(halves),
        "train_images": counts,
        "stages": recorder.stages,
        "seconds": round(time.perf_counter() - start, 3),
    }


def customer_redistill(config: FederationConfig, customer: Customer, num_customers: int, tutor_state: dict[str, Tensor],
                       edge_state: dict[str, Tensor], *, datasets: DataSets | None = None) -> dict:
    """Distill C ``public+private`` at the customer, on its whole data (the shipped presumed
    images without its dropped classes' boxes, and its own): tutor' (``tutor_state``, sent down
    by the manufacturer) -> a new edge model from ``edge_state``, per configured loss. Returns
    the new edge models by row key and scalar metrics; nothing per image leaves."""
    start = time.perf_counter()
    datasets = datasets or DataSets(config.data)
    pipeline = effective_pipeline(config, customer)
    tutor, edge = load_model("tutor", config.preset, tutor_state), load_model("edge", config.preset, edge_state)
    step = customer_step(config, customer, num_customers, datasets)
    train, val = distill_c_training_data(select_customer_data(datasets, pipeline, customer.classes, pipeline.distill_c, step.share),
                                         "public+private")
    edges, metrics = {}, {"partition-id": customer.partition_id}
    for loss in pipeline.distill_c_losses:
        key = distill_c_row("public+private", loss)
        student, images = redistill(tutor, edge, train, val, step, mode="public+private", loss=loss)
        edges[key] = _as_state(student)
        metrics[f"{key}/train-images"] = images
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    return {"edges": edges, "metrics": metrics}


def review_edge(config: FederationConfig, customer: Customer, current_state: dict[str, Tensor],
                candidate_state: dict[str, Tensor], threads: int = 0) -> dict:
    """The manufacturer's check of an edge model a customer distilled, before it is deployed
    (nothing deploys unchecked): :func:`verify_model` against the edge the customer runs now, on
    the manufacturer's held-out presumed images, with the customer's verification settings.
    Also the manufacturer's half of the edge's table row."""
    configure_process(device=config.device, threads=threads)
    datasets = DataSets.manufacturer(config.data)
    pipeline = effective_pipeline(config, customer)
    presumed = ClassSets.indices(resolve_split(pipeline.presumed_split))
    records = datasets.records(config.data.val_set, pipeline.presumed_split, pipeline.max_eval_images, pool="public")

    def evaluate_presumed(model: nn.Module) -> dict:
        return evaluate_detector(model, records, presumed, batch_size=pipeline.eval_batch_size, score_threshold=pipeline.score_threshold)

    verdict, candidate = verify_model(load_model("edge", config.preset, current_state), candidate_state, evaluate_presumed,
                                      pipeline.verify)
    half = measure_on_manufacturer("edge", candidate, customer.class_sets(config.pipeline), datasets, pipeline) \
        if candidate is not None else {}
    return {"verdict": verdict_to_dict(verdict), "manufacturer_row": to_jsonable(half)}


def customer_evaluate(config: FederationConfig, customer: Customer, models: dict[str, dict[str, Tensor]],
                      *, datasets: DataSets | None = None) -> dict[str, float]:
    """The customer's half of each table row, on its own test images: the models it was sent
    (row key -> state; the role from the key) evaluated, as flat scalars
    (:func:`rows_to_metrics`): what goes up in the evaluate reply."""
    datasets = datasets or DataSets(config.data)
    classes = customer.class_sets(config.pipeline)
    test = datasets.records(config.data.test_set, classes.union, config.pipeline.max_eval_images, pool="customer")
    rows = {}
    for key, state in models.items():
        role = "tutor" if key.startswith("tutor") else "edge"
        rows[key] = measure_on_customer(load_model(role, config.preset, state), test, classes, config.pipeline)
        rows[key]["test_images"] = len(test)
    return rows_to_metrics(rows)


_ROW_SCALARS = ("mAP", "mAP_voc07", "coco_AP", "precision", "recall", "f1", "tp", "fp", "fn", "private_ap", "dropped_ap",
                "test_images")


def rows_to_metrics(rows: dict[str, dict]) -> dict[str, float]:
    """Rows as flat scalars (``<row>/<measure>``, ``<row>/ap/<class>``, ``<row>/num_gt/<class>``),
    a MetricRecord's content. None (no such class) is left out."""
    flat = {}
    for key, row in rows.items():
        for measure in _ROW_SCALARS:
            if row.get(measure) is not None:
                flat[f"{key}/{measure}"] = row[measure]
        for name, ap in row["per_class"].items():
            flat[f"{key}/ap/{name}"] = float(ap)
        for name, count in row["num_gt"].items():
            flat[f"{key}/num_gt/{name}"] = int(count)
    return flat


def rows_from_metrics(metrics: dict[str, Any]) -> dict[str, dict]:
    """Inverse of :func:`rows_to_metrics`; ValueError names a key it cannot place."""
    rows: dict[str, dict] = {}
    for name, value in metrics.items():
        parts = name.split("/")
        if len(parts) == 2 and parts[1] in _ROW_SCALARS:
            rows.setdefault(parts[0], {"per_class": {}, "num_gt": {}})[parts[1]] = value
        elif len(parts) == 3 and parts[1] in ("ap", "num_gt") and parts[2] in VOC_CLASSES:
            rows.setdefault(parts[0], {"per_class": {}, "num_gt": {}})["per_class" if parts[1] == "ap" else "num_gt"][parts[2]] = value
        elif name not in ("partition-id", "server-round", "seconds", "num-examples"):
            raise ValueError(f"evaluate reply: unexpected metric {name!r}")
    for row in rows.values():
        for measure in ("private_ap", "dropped_ap"):
            row.setdefault(measure, None)
    return rows


def combine_round(config: FederationConfig, customer: Customer, review: dict, customer_rows: dict[str, dict],
                  customer_edges: dict[str, dict]) -> dict:
    """One customer's round from both sides' halves: ``review`` (:func:`manufacturer_review`),
    ``customer_rows`` (:func:`rows_from_metrics` of its evaluate reply) and ``customer_edges``
    (row key -> :func:`review_edge`'s result for each edge the customer distilled). Returns the
    verdict, the table rows, the edge models that may be deployed per data mode (the tutor's
    update accepted, and a customer's edge also passing its check) and the stages."""
    classes = customer.class_sets(config.pipeline)
    halves = {**review["manufacturer_rows"], **{k: v["manufacturer_row"] for k, v in customer_edges.items()}}
    measured = {key: {**row, **halves.get(key, {})} for key, row in customer_rows.items()}
    rows = assemble_rows(measured, classes)
    deployable = {}
    if review["verdict"]["accepted"]:
        loss = config.pipeline.distill_c_losses[0]
        public_key, private_key = distill_c_row("public", loss), distill_c_row("public+private", loss)
        if public_key in review["edges"]:
            deployable["public"] = review["edges"][public_key]
        if private_key in customer_edges and customer_edges[private_key]["verdict"]["accepted"]:
            deployable["public+private"] = customer_edges[private_key]["state"]
    verdict = dict(review["verdict"])
    verdict["edge_checks"] = {k: v["verdict"] for k, v in customer_edges.items()}
    train_images = {**review.get("train_images", {}), **{k: v["train_images"] for k, v in customer_edges.items() if "train_images" in v}}
    return {"partition_id": customer.partition_id, "verdict": verdict, "rows": to_jsonable(rows), "edges": deployable,
            "stages": review["stages"], "seconds": review["seconds"], "train_images": train_images}


def round_in_one_process(config: FederationConfig, customer: Customer, num_customers: int, tutor_state: dict[str, Tensor],
                         edge_state: dict[str, Tensor], delta: dict[str, Tensor]) -> dict:
    """Everything after the customer's delta, both sides in this process, in the federation's
    order: the manufacturer's review, the customer's Distill C and its check, the customer's
    evaluation, combined (:func:`combine_round`). For benches and tests; the Flower strategy
    runs the same calls on each side of the boundary."""
    review = manufacturer_review(config, customer, tutor_state, edge_state, delta)
    models = evaluation_models(tutor_state, edge_state, review)
    customer_edges = {}
    if "public+private" in config.pipeline.distill_c_modes and (review["verdict"]["accepted"] or config.simulation.distill_rejected):
        made = customer_redistill(config, customer, num_customers, review["tutor_prime"], edge_state)
        for key, state in made["edges"].items():
            customer_edges[key] = {**review_edge(config, customer, edge_state, state), "state": state,
                                   "train_images": made["metrics"][f"{key}/train-images"]}
            models[key] = state
    rows = rows_from_metrics(customer_evaluate(config, customer, models))
    return combine_round(config, customer, review, rows, customer_edges)


def evaluation_models(tutor_state: dict[str, Tensor], edge_state: dict[str, Tensor], review: dict) -> dict[str, dict]:
    """The models of a customer's evaluate message (row key -> state), as far as the
    manufacturer made them: the round's tutor, tutor', the rejected candidate, the edge the
    customer ran, and Distill C public's edges. The customer adds its own Distill C edges."""
    models = {"tutor_original": tutor_state, "tutor_updated": review["tutor_prime"], "edge_original": edge_state}
    if review["candidate"] is not None:
        models["tutor_rejected_candidate"] = review["candidate"]
    models.update(review["edges"])
    return models


def baseline_customer_work(config: FederationConfig, customer: Customer, num_customers: int, edge_state: dict[str, Tensor],
                           *, proximal_mu: float = 0.0, datasets: DataSets | None = None) -> dict:
    """A FedAvg / FedProx customer's step: fine-tune the edge model on
    the customer's whole data (the shipped presumed images without its dropped classes' boxes,
    and its own images), with FedProx's proximal term when
    ``proximal_mu`` > 0. Returns the whole edge model (what FedAvg sends up) and scalar metrics."""
    start = time.perf_counter()
    datasets = datasets or DataSets(config.data)
    cfg = config.baselines.local
    pick = pick_share(config.population, customer.partition_id, num_customers)
    edge = load_model("edge", config.preset, edge_state)
    data = select_customer_data(datasets, config.pipeline, customer.classes, cfg, pick)
    train = data.combined
    seed = config.seeds(customer.partition_id)("fedavg")
    torch.manual_seed(seed)
    finetune(edge, train, data.own_val, cfg, class_indices=ClassSets.indices(customer.classes),
             proximal_mu=proximal_mu, seed=seed, report=Reporting(f"edge_customer{customer.partition_id}", progress=False))
    state = {k: v.detach().clone() for k, v in edge.state_dict().items()}
    return {"arrays": state, "metrics": {"partition-id": customer.partition_id, "num-examples": len(train),
                                         "seconds": round(time.perf_counter() - start, 3)}}


def evaluate_for_customer(config: FederationConfig, customer: Customer, edge: nn.Module,
                          reference: dict[str, float] | None = None, datasets: DataSets | None = None) -> dict:
    """One edge model on the customer's test images: mAP / P / R / F1 over its classes, per-class
    AP of its classes and the presumed ones, and gain / forgetting against ``reference``
    (per-class AP of the original edge) when given."""
    datasets = datasets or DataSets(config.data)
    classes = customer.class_sets(config.pipeline)
    pipeline = config.pipeline
    test = datasets.records(config.data.test_set, classes.union, pipeline.max_eval_images, pool="customer")
    row = evaluate_row(edge, test, classes.customer, classes.union, batch_size=pipeline.eval_batch_size,
                       score_threshold=pipeline.score_threshold)
    if reference is not None:
        row.update(compute_knowledge(row["per_class"], reference, classes))
    return to_jsonable(row)


def verdict_to_dict(verdict: Verdict) -> dict:
    return to_jsonable(asdict(verdict))


def merge_accepted(config: FederationConfig, tutor: nn.Module, deltas: Sequence[dict[str, Tensor]],
                   weights: Sequence[float], datasets: DataSets | None = None) -> tuple[dict[str, Tensor] | None, dict]:
    """Merge the accepted deltas by the configured rule and verify the shared tutor they make
    against every critical class (no customer's dropped classes spared: the shared tutor serves
    them all). Returns (the new tutor state or None when it stays, a report)."""
    sim = config.simulation
    if not deltas:
        return None, {"merged": 0, "accepted": False, "reasons": ["no accepted delta this round"]}
    merged = merge_deltas(list(deltas), sim.merge, weights=list(weights) if sim.merge == "mean" else None,
                          max_norm=sim.clip_norm or None, trim_fraction=sim.trim_fraction)
    datasets = datasets or DataSets.manufacturer(config.data)
    pipeline = config.pipeline
    presumed = ClassSets.indices(resolve_split(pipeline.presumed_split))
    records = datasets.records(config.data.val_set, pipeline.presumed_split, pipeline.max_eval_images, pool="public")

    def evaluate_presumed(model: nn.Module) -> dict:
        return evaluate_detector(model, records, presumed, batch_size=pipeline.eval_batch_size,
                                 score_threshold=pipeline.score_threshold)

    verdict, state = verify_update(tutor, merged, evaluate_presumed, pipeline.verify, weight=pipeline.delta_weight)
    report = {"merged": len(deltas), "rule": sim.merge, "norm": compute_norm(merged), **verdict_to_dict(verdict)}
    return (state if verdict.accepted else None), report


def merge_round(config: FederationConfig, tutor_state: dict[str, Tensor], deltas: Sequence[dict[str, Tensor]],
                weights: Sequence[float], threads: int = 0) -> tuple[dict[str, Tensor] | None, dict]:
    """:func:`merge_accepted` on plain arguments (the shared tutor's state), for a worker process."""
    configure_process(device=config.device, threads=threads)
    return merge_accepted(config, load_model("tutor", config.preset, tutor_state), deltas, weights)


def reply_problems(delta: dict[str, Tensor], tutor_state: dict[str, Tensor]) -> list[str]:
    """Why a customer's delta cannot even be verified (keys, shapes, dtypes, values); [] if it can."""
    return check_delta(delta, tutor_state)


__all__ = [
    "PopulationConfig", "SimulationConfig", "FederationConfig", "Customer", "build_population", "parse_customer",
    "pick_share", "effective_pipeline", "customer_work", "privatize_delta", "manufacturer_review", "merge_accepted",
    "customer_redistill", "review_edge", "customer_evaluate", "rows_to_metrics", "rows_from_metrics", "combine_round",
    "round_in_one_process", "evaluation_models",
    "load_federation_config", "federation_config_from_dict", "federation_to_flat", "federation_from_flat",
    "reply_problems", "verdict_to_dict", "BaselineConfig", "METHODS", "baseline_customer_work", "evaluate_for_customer",
    "count_state_bytes", "load_model", "to_flat_dict",
]
