"""SD-Dist (SQMD's similarity- and quality-based messenger distillation; ``diredi_sim/sddist.py``)
on the same customers as the other methods, in one process, for ``baselines.rounds`` rounds.

A round: every customer trains its edge model for ``baselines.local``'s epochs on its whole data
(the shipped presumed images without its dropped classes' boxes, and its own), the first round on
the task loss alone (SQMD's ``train_local_model_without_ref``), later ones with the peers' mean
it received; after every round but the last it sends up its outputs on the reference set, and the
manufacturer sends back each customer's peer mean. No weights travel.

Compute: without a budget, each round trains ``baselines.local``'s epochs (as local fine-tuning,
``rounds`` times). When DiReDi ran first in the replicate (``pipeline.equal_compute``), each
customer trains on as many images as that DiReDi customer did, counting the reference batch
each step of rounds 2+ carries (a forward and backward pass of the same size as the own batch):
``s`` steps a round with ``batch * s * (1 + 2 * (rounds - 1))`` filling the budget."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from diredi_sim.config import ConfigError
from diredi_sim.data import VOC_CLASSES
from diredi_sim.data.splits import resolve_split
from diredi_sim.datasets import DataSets, select_customer_data
from diredi_sim.population import Customer, build_population, pick_share
from diredi_sim.federation_config import FederationConfig
from diredi_sim.federation import evaluate_for_customer
from diredi_sim.manufacturer import prepare_manufacturer
from diredi_sim.settings import ClassSets
from diredi_sim.sddist import (build_customer_edge, build_reference_targets, build_upload, compute_peer_losses, count_message_bytes,
                               load_reference_images, reference_grid, run_server_round)
from diredi_sim.train import Reporting, fit
from experiments.methods import Method, equal_compute_budgets, register

ROW_KEYS = ("mAP", "precision", "recall", "f1", "gain", "forgetting", "per_class", "change")


def build_reference_set(config: FederationConfig) -> list:
    """The reference set the manufacturer publishes: the first ``sddist.reference_images`` images
    of its public pool of ``data.val_set`` that hold a class it labels (``pipeline.teacher_split``),
    with those classes' boxes. Read through the manufacturer's view, which refuses the customers' pool."""
    return DataSets.manufacturer(config.data).records(config.data.val_set, config.pipeline.teacher_split,
                                                      config.sddist.reference_images, pool="public")


def edge_width(config: FederationConfig, customer: Customer, deployed_width: float) -> float:
    widths = config.sddist.widths
    return widths[customer.partition_id % len(widths)] if widths else deployed_width


def check_sddist(config: FederationConfig) -> None:
    """sddist.q cannot exceed the customers (k < q is the config's own check)."""
    customers = len(build_population(config.population, config.pipeline.presumed_split))
    if config.sddist.q > customers:
        raise ConfigError(f"sddist.q = {config.sddist.q}: must be <= the number of customers ({customers})")


def steps_per_round(budget_images: int | None, batch_size: int, rounds: int) -> int | None:
    """Optimizer steps a round so that own batches plus the reference batches of rounds 2+ fill
    ``budget_images`` (None: no budget, the configured epochs)."""
    if not budget_images:
        return None
    return max(1, math.ceil(budget_images / (batch_size * (2 * rounds - 1))))


def run_sddist(config: FederationConfig, shared: dict | None = None) -> tuple[list[dict], None]:
    check_sddist(config)
    settings, cfg = config.sddist, config.baselines.local
    budgets = equal_compute_budgets(config, shared)
    maker = prepare_manufacturer(config.pipeline, config.data, preset=config.preset, seed=config.seed, progress=False)
    population = build_population(config.population, config.pipeline.presumed_split)
    datasets = DataSets(config.data)  # the customers' side
    reference = build_reference_set(config)
    if not reference:
        raise ValueError(f"sddist: the public pool of {config.data.val_set!r} holds no image of {config.pipeline.teacher_split!r}")
    images, targets = load_reference_images(reference)
    grid = reference_grid(maker.edge.spec.image_size)
    reference_targets = build_reference_targets(maker.edge, images, targets, grid, len(VOC_CLASSES))
    labelled = ClassSets.indices(resolve_split(config.pipeline.teacher_split))

    customers = {}
    for customer in population:
        data = select_customer_data(datasets, config.pipeline, customer.classes, cfg,
                                    pick_share(config.population, customer.partition_id, len(population)))
        private_ids = {r.image_id for r in data.own + data.own_val}
        if private_ids & {r.image_id for r in reference}:
            raise RuntimeError(f"sddist: the reference set shares images with customer {customer.name}'s own")
        original = evaluate_for_customer(config, customer, maker.edge, datasets=datasets)["per_class"]
        edge = build_customer_edge(maker.edge, edge_width(config, customer, maker.edge.spec.width_mult), config.preset, len(VOC_CLASSES))
        customers[customer.partition_id] = {"customer": customer, "data": data, "original": original, "edge": edge,
                                            "peer_mean": None, "uplink": 0, "downlink": 0, "images": 0, "reference_images": 0,
                                            "peers": [], "steps": steps_per_round(budgets.get(customer.partition_id), cfg.batch_size,
                                                                                   config.baselines.rounds)}

    rounds = config.baselines.rounds
    for round_ in range(1, rounds + 1):
        for pid, state in customers.items():
            seed = config.seeds(pid)("local")
            torch.manual_seed(seed)
            losses = compute_peer_losses(state["edge"], images, state["peer_mean"], rho=settings.rho, temperature=settings.temperature,
                                         grid=grid, batch_size=cfg.batch_size, seed=seed)
            result = fit(state["edge"], losses, state["data"].combined, state["data"].own_val,
                         replace(cfg, max_steps=state["steps"] or 0),
                         class_indices=ClassSets.indices(state["customer"].classes), seed=seed,
                         report=Reporting(f"edge_sddist{pid}", progress=False))
            state["images"] += result["train_images"]
            if state["peer_mean"] is not None:  # each step's reference batch: min(batch, R) images
                state["reference_images"] += result["train_steps"] * min(cfg.batch_size, len(images))
        if round_ == rounds:
            break
        uploads = {pid: build_upload(state["edge"], images, grid, batch_size=cfg.batch_size) for pid, state in customers.items()}
        downloads, decided = run_server_round(uploads, reference_targets, labelled, q=settings.q, k=settings.k,
                                              temperature=settings.temperature)
        for pid, state in customers.items():
            state["uplink"] += count_message_bytes(uploads[pid])
            state["downlink"] += count_message_bytes(downloads[pid])
            state["peer_mean"] = downloads[pid]["peer_mean"]
            state["peers"].append({"round": round_, "quality_loss": decided["quality_loss"][pid], "peers": decided["peers"][pid]})

    rows = []
    for pid, state in customers.items():
        customer = state["customer"]
        row = evaluate_for_customer(config, customer, state["edge"], state["original"], datasets)
        rows.append({"partition_id": pid, "customer": customer.name, "uplink_bytes": state["uplink"],
                     "downlink_bytes": state["downlink"], "train_images": state["images"] + state["reference_images"],
                     "reference_images": state["reference_images"],
                     "edge_width": state["edge"].spec.width_mult, "peers": state["peers"],
                     **{key: row.get(key) for key in ROW_KEYS}})
    return rows, None


register(Method("sddist", "SD-Dist: peers' outputs on the public reference set distilled, by similarity among the best (SQMD)",
                run_sddist, check=check_sddist))
