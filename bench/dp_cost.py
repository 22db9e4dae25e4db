"""The cost of local differential privacy in knowledge gain, on the DiReDi federation's own work.

    python bench/dp_cost.py [--config experiments/configs/federation.toml] [--customers 2 | --names exp2]
                            [--clip C] [--noise 0,0.001,0.01,1] [--set KEY=VALUE ...]

Each customer runs RD B and RD A once (plain functions, no Flower); its delta then goes up
without DP and under each DP setting (simulation.dp_clip_norm = C, dp_noise_multiplier = z:
the whole delta clipped to norm C, plus Gaussian noise of std z * C per value, seeded as in the
ClientApp). DP is applied to the same delta, so the settings differ by DP alone. For each, the
manufacturer's step (verification, Distill C from tutor', per-class AP on the customer's test
images) gives the verdict and, when accepted, the deployed edge model's gain on the private
classes and forgetting of the kept presumed ones (a rejected customer keeps its edge model: no
gain, no forgetting). Without --clip, C is half the median raw delta norm.

The manufacturer's models come from the cache (federation.toml's settings). The customers keep
the demo's image caps (RD 600, Distill C 400): with 200 / 150, tried first, no customer learnt
its private class at all (gain 0.000 in every row, DP or not), which measures nothing. Only the
public+private Distill C (the deployed one) runs.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments.offline import stay_offline  # noqa: E402

stay_offline()

from diredi_sim.deltas import compute_norm  # noqa: E402
from diredi_sim.population import build_population  # noqa: E402
from diredi_sim.federation import customer_work, round_in_one_process, privatize_delta  # noqa: E402
from diredi_sim.datasets import DataSets
from diredi_sim.manufacturer import prepare_manufacturer

QUICK = {"pipeline.distill_c_modes": "public+private"}  # the deployed mode only


def fmt(value: float, sign: bool = True) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else (f"{value:+.3f}" if sign else f"{value:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "experiments/configs/federation.toml"))
    parser.add_argument("--customers", type=int, default=2, help="the first N customers of the population")
    parser.add_argument("--names", default="", help="or these customers, by name, comma-separated (exp2,generated-1)")
    parser.add_argument("--clip", type=float, default=0.0, help="dp_clip_norm (0: half the median raw delta norm)")
    parser.add_argument("--noise", default="0,0.001,0.01,1", help="dp_noise_multiplier values, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (2 on 2 busy cores is many times slower)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    args = parser.parse_args()
    from diredi_sim.config import load_config, parse_overrides
    from server.engine import RunConfig

    torch.set_num_threads(args.threads)
    config = load_config(args.config, {**QUICK, **parse_overrides(args.set)}, cls=RunConfig)
    population = build_population(config.population, config.pipeline.presumed_split)
    customers = [c for c in population if c.name in args.names.split(",")] if args.names else population[: args.customers]
    maker = prepare_manufacturer(config.pipeline, config.data, preset=config.preset, seed=config.seed, progress=False)
    tutor_state, edge_state = maker.tutor.state_dict(), maker.edge.state_dict()
    datasets = DataSets(config.data)
    start = time.perf_counter()

    raw = {c.partition_id: customer_work(config, c, len(population), tutor_state, edge_state, datasets=datasets)["delta"]
           for c in customers}
    norms = {p: compute_norm(d) for p, d in raw.items()}
    clip = args.clip or 0.5 * statistics.median(norms.values())
    settings = [(0.0, 0.0)] + [(clip, float(z)) for z in args.noise.split(",")]
    values = sum(v.numel() for v in next(iter(raw.values())).values())

    rows = []
    for customer in customers:
        for c, z in settings:
            dp = replace(config, simulation=replace(config.simulation, dp_clip_norm=c, dp_noise_multiplier=z))
            delta = privatize_delta(dp, customer.partition_id, raw[customer.partition_id])
            result = round_in_one_process(dp, customer, len(population), tutor_state, edge_state, delta)
            verdict = result["verdict"]
            deployed = {r["key"]: r for r in result["rows"]}.get("edge_distill_c_public_private", {})
            rows.append({"customer": customer.name, "setting": "off" if not c else f"clip {c:.3g}, z {z:g}",
                         "before": norms[customer.partition_id], "after": compute_norm(delta),
                         "verdict": "accepted" if verdict["accepted"] else "rejected",
                         "presumed": f"{verdict['map_before']:.3f} -> {verdict['map_after']:.3f}",
                         "gain": deployed.get("gain", math.nan) if verdict["accepted"] else math.nan,
                         "forgetting": deployed.get("forgetting", math.nan) if verdict["accepted"] else math.nan})
            print(f"{rows[-1]['customer']}, {rows[-1]['setting']}: {rows[-1]['verdict']}, gain {fmt(rows[-1]['gain'])}",
                  file=sys.stderr, flush=True)

    print(f"\n{len(customers)} customers, {values} delta values each; clip C = {clip:.4g} "
          f"({'half ' if not args.clip else ''}the median raw delta norm: {statistics.median(norms.values()):.4g}); noise std z * C per value; "
          f"{time.perf_counter() - start:.0f} s on {args.threads} threads; gain and forgetting: AP@0.5 of the deployed edge model "
          f"against the original edge on the customer's test images (-: rejected, the customer keeps its edge model)\n")
    print("| customer | DP setting | delta norm before | delta norm sent | verdict | tutor presumed mAP (verification) "
          "| private-class gain | forgetting |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['customer']} | {r['setting']} | {r['before']:.4g} | {r['after']:.4g} | {r['verdict']} | {r['presumed']} "
              f"| {fmt(r['gain'])} | {fmt(r['forgetting'])} |")


if __name__ == "__main__":
    main()
