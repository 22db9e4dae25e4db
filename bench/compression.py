"""Uplink bytes per customer, DiReDi's delta against FedAvg's edge model, and what compressing the
delta costs in private-class AP.

    python bench/compression.py [--config experiments/configs/demo.toml] [--customers 2]
                                [--methods none,fp16,int8,topk:0.1,topk-int8:0.1,topk-int8:0.05] [--set KEY=VALUE ...]

The first N customers (the demo's: exp1 and exp2) run RD B and RD A once (plain functions, no
Flower). Each delta is then encoded by every method (``diredi_sim.deltas.compress_delta``;
``topk:F`` keeps the fraction F of each tensor), decoded as the manufacturer does, and taken
through the manufacturer's step (verification, Distill C, per-class AP on the customer's test
images). Every method starts from the same delta, so rows differ by the compression alone.
Printed per customer and method: the payload's bytes (every value, index and scale), its ratio
to the float32 delta and to FedAvg's upload (the whole edge model's state dict,
``count_state_bytes``), the delta's relative L2 error after decoding, the verdict, the private-
class gain of the tutor with the delta substituted and of the customer's deployed edge model (a
rejected update leaves the customer its edge model: gain 0), each with its change against the
uncompressed delta, and forgetting. Gains and forgetting in AP@0.5 points (AP x 100).

Target (issue 7): at least 4x smaller than the float32 delta for at most 1 AP point of private-
class gain lost (tutor and deployed edge, every customer) and no verdict changed.

The manufacturer's models must be in the cache already (``diredi-sim compare`` with the same
config puts them there); the script stops otherwise, unless ``--train`` is given.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments.offline import stay_offline  # noqa: E402

stay_offline()

from diredi_sim.deltas import compress_delta, compute_norm, count_bytes, decompress_delta  # noqa: E402
from diredi_sim.population import build_population  # noqa: E402
from diredi_sim.federation import count_state_bytes, customer_work, round_in_one_process  # noqa: E402
from diredi_sim.datasets import DataSets
from diredi_sim.manufacturer import manufacturer_is_cached, prepare_manufacturer, resolve_cache_dir

TARGET_RATIO, TARGET_LOSS = 4.0, 0.01  # at least 4x smaller, at most 1 AP point lost


def points(value: float, sign: bool = True) -> str:
    return "-" if value is None or math.isnan(value) else (f"{100 * value:+.1f}" if sign else f"{100 * value:.1f}")


def parse_methods(text: str) -> list[tuple[str, float]]:
    """``none,int8,topk:0.1`` -> [("none", 1.0), ("int8", 1.0), ("topk", 0.1)]."""
    methods = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        method, _, fraction = item.partition(":")
        methods.append((method, float(fraction) if fraction else 1.0))
    return methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "experiments/configs/demo.toml"))
    parser.add_argument("--customers", type=int, default=2, help="the first N customers of the population")
    parser.add_argument("--methods", default="none,fp16,int8,topk:0.1,topk-int8:0.1,topk-int8:0.05",
                        help="compression methods, topk ones with their fraction (method:fraction), comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train", action="store_true", help="train the manufacturer's models when they are not cached")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    args = parser.parse_args()
    from diredi_sim.config import load_config, parse_overrides
    from server.engine import RunConfig

    torch.set_num_threads(args.threads)
    config = load_config(args.config, parse_overrides(args.set), cls=RunConfig)
    methods = parse_methods(args.methods)
    if ("none", 1.0) not in methods:
        methods.insert(0, ("none", 1.0))  # the reference row
    if not manufacturer_is_cached(config.pipeline, config.data, preset=config.preset, seed=config.seed) and not args.train:
        sys.exit(f"the manufacturer's models are not cached in {resolve_cache_dir(config.pipeline)}; run "
                 f"`diredi-sim compare {args.config}` first, or pass --train")
    maker = prepare_manufacturer(config.pipeline, config.data, preset=config.preset, seed=config.seed, progress=False)
    population = build_population(config.population, config.pipeline.presumed_split)
    customers = population[: args.customers]
    tutor_state, edge_state = maker.tutor.state_dict(), maker.edge.state_dict()
    fedavg_bytes = count_state_bytes(edge_state)
    datasets = DataSets(config.data)
    start = time.perf_counter()

    rows = []
    for customer in customers:
        delta = customer_work(config, customer, len(population), tutor_state, edge_state, datasets=datasets)["delta"]
        shapes = {k: tutor_state[k].shape for k in delta}
        fp32 = count_bytes(delta)
        reference = None
        for method, fraction in methods:
            payload = compress_delta(delta, method, topk_fraction=fraction)
            decoded = decompress_delta(payload, shapes)
            error = compute_norm({k: decoded[k] - delta[k] for k in delta}) / max(compute_norm(delta), 1e-12)
            step = time.perf_counter()
            result = round_in_one_process(config, customer, len(population), tutor_state, edge_state, decoded)
            by_key = {r["key"]: r for r in result["rows"]}
            accepted = result["verdict"]["accepted"]
            tutor = by_key.get("tutor_updated" if accepted else "tutor_rejected_candidate", {})
            edge = by_key.get("edge_distill_c_" + config.simulation.deploy_mode.replace("+", "_"), {}) if accepted else {}
            row = {"customer": customer.name, "method": method if method in ("none", "fp16", "int8") else f"{method} {fraction:g}",
                   "bytes": count_state_bytes(payload), "fp32": fp32, "error": error, "accepted": accepted,
                   "tutor_gain": tutor.get("gain", math.nan), "edge_gain": edge.get("gain", 0.0) if accepted else 0.0,
                   "forgetting": edge.get("forgetting", 0.0) if accepted else 0.0}
            reference = reference or row
            row["tutor_change"] = row["tutor_gain"] - reference["tutor_gain"]
            row["edge_change"] = row["edge_gain"] - reference["edge_gain"]
            row["same_verdict"] = accepted == reference["accepted"]
            rows.append(row)
            print(f"{customer.name}, {row['method']}: {count_state_bytes(payload)} bytes, {'accepted' if accepted else 'rejected'}, "
                  f"tutor gain {points(row['tutor_gain'])}, edge gain {points(row['edge_gain'])} "
                  f"({time.perf_counter() - step:.0f} s)", file=sys.stderr, flush=True)

    print(f"\n{len(customers)} customers of {Path(args.config).name}; FedAvg uploads the whole edge model: {fedavg_bytes} bytes; "
          f"{time.perf_counter() - start:.0f} s on {args.threads} threads. Gains and forgetting in AP@0.5 points; "
          "(change) against the uncompressed delta.\n")
    print("| customer | method | payload bytes | vs fp32 delta | vs FedAvg upload | delta rel. L2 error | verdict "
          "| tutor' private gain (change) | deployed edge private gain (change) | forgetting |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['customer']} | {r['method']} | {r['bytes']:,} | {r['fp32'] / r['bytes']:.3f}x smaller "
              f"| {fedavg_bytes / r['bytes']:.3f}x smaller | {r['error']:.2e} | {'accepted' if r['accepted'] else 'rejected'} "
              f"| {points(r['tutor_gain'])} ({points(r['tutor_change'])}) | {points(r['edge_gain'])} ({points(r['edge_change'])}) "
              f"| {points(r['forgetting'])} |")

    print(f"\nTarget: at least {TARGET_RATIO:g}x smaller than the fp32 delta, at most {100 * TARGET_LOSS:g} AP point of "
          "private-class gain lost (tutor' and deployed edge, every customer), no verdict changed.")
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        ratio = min(r["fp32"] / r["bytes"] for r in mine)
        loss = max(max(-r["tutor_change"], -r["edge_change"]) for r in mine)
        met = ratio >= TARGET_RATIO and loss <= TARGET_LOSS + 1e-9 and all(r["same_verdict"] for r in mine)
        print(f"- {method}: {ratio:.3f}x smaller, worst private-gain change {points(-loss)} AP points, "
              f"verdicts {'unchanged' if all(r['same_verdict'] for r in mine) else 'CHANGED'}: target {'met' if met else 'not met'}")


if __name__ == "__main__":
    main()
