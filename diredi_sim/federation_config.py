"""The federation's config (``diredi-sim simulate CONFIG``, ``flwr run .``, ``compare``): one
typed tree, read by :func:`diredi_sim.config.load_config` (``cls=FederationConfig``) and carried in
Flower's run_config and ConfigRecords by :func:`diredi_sim.config.to_flat` / ``from_flat``.
Sections: ``data``, ``pipeline`` (the paper's steps, :mod:`diredi_sim.settings`), ``population``
(:mod:`diredi_sim.population`), ``simulation`` (rounds, merge, privacy and compression of the
uplink, and the Ray resources of the simulation), ``baselines``, ``cema``, ``sddist``.
:meth:`FederationConfig.seeds`: a customer's seeds, from (run seed, partition id, replicate) by
:func:`diredi_sim.seeds.derive_seed`; partition 0 of replicate 0 uses the run seed's, so that a
one-customer federation repeats :func:`diredi_sim.pipeline.run_pipeline` exactly."""

from __future__ import annotations

from dataclasses import dataclass, field

from diredi_sim.config import DataConfig, TrainConfig, _check, check_device
from diredi_sim.deltas import COMPRESSIONS, MERGE_RULES
from diredi_sim.population import PopulationConfig
from diredi_sim.seeds import Seeds
from diredi_sim.settings import DISTILL_C_MODES, PipelineConfig

SELECTIONS = ("all", "krum", "multikrum")


@dataclass(frozen=True)
class SimulationConfig:
    """The federation's protocol: rounds, sampling, the merge, privacy and the uplink's form, what a
    customer deploys. Where it runs (Ray's resources, threads, worker processes, timeouts) is the
    engine's: ``server.engine``, a config file's ``[engine]`` section."""

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
