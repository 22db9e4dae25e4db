"""Flower's cost and Ray's parallelism, measured side by side on the same work.

    python bench/simulation.py [--config experiments/configs/federation.toml] [--customers 2] [--rounds 1] [--set KEY=VALUE ...]

1. overhead: the same customers' work (load the manufacturer's models from the cache; per
   round RD B, RD A, delta; verification, Distill C, evaluation; the merge) done in one process by plain
   function calls, then through Flower's simulation engine with one customer actor and one
   manufacturer process, each with every core's torch threads. Prints both wall times and
   their ratio (target: at most 1.10).
2. parallelism: the simulation with one actor per core (torch threads = 1 each, manufacturer's
   steps in as many processes) against (a) one actor holding every core, and (b) the same
   simulation given one core (one actor, one manufacturer process, 1 torch thread each: the
   same threads per actor). Prints both speed-ups (target: at least 1.8x on 2 cores with 2
   customers).
The manufacturer's models are trained into the cache first if missing (not timed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments.offline import stay_offline  # noqa: E402

stay_offline()

from diredi_sim.population import build_population  # noqa: E402
from diredi_sim.federation import customer_work, load_model, round_in_one_process, merge_accepted  # noqa: E402
from diredi_sim.datasets import DataSets
from diredi_sim.manufacturer import prepare_manufacturer


def run_plain(config) -> float:
    """The manufacturer's models from the cache, then per round: every customer's step, the
    manufacturer's step for each, the merge (the shared tutor and the deployed edges carried to
    the next round, as the strategy does), in this process."""
    start = time.perf_counter()
    maker = prepare_manufacturer(config.pipeline, config.data, preset=config.preset, seed=config.seed, progress=False)
    population = build_population(config.population, config.pipeline.presumed_split)
    tutor_state, original_edge = maker.tutor.state_dict(), maker.edge.state_dict()
    deployed: dict[int, dict] = {}
    datasets = DataSets(config.data)
    for server_round in range(1, config.simulation.num_rounds + 1):
        round_start = time.perf_counter()
        replies = [customer_work(config, c, len(population), tutor_state, deployed.get(c.partition_id, original_edge),
                                 datasets=datasets) for c in population]
        customers_done = time.perf_counter()
        accepted, weights = [], []
        for customer, reply in zip(population, replies):
            step_start = time.perf_counter()
            result = round_in_one_process(config, customer, len(population), tutor_state,
                                          deployed.get(customer.partition_id, original_edge), reply["delta"])
            print(f"plain: round {server_round}, customer {customer.name}: customer's step {reply['metrics']['seconds']:.1f} s, "
                  f"manufacturer's step {time.perf_counter() - step_start:.1f} s", flush=True)
            if result["verdict"]["accepted"]:
                accepted.append(reply["delta"])
                weights.append(reply["metrics"]["num-examples"])
            if config.simulation.deploy_mode in result["edges"]:
                deployed[customer.partition_id] = result["edges"][config.simulation.deploy_mode]
        tutor = load_model("tutor", config.preset, tutor_state)
        merged, _ = merge_accepted(config, tutor, accepted, weights, datasets)
        tutor_state = merged if merged is not None else tutor_state
        print(f"plain: round {server_round}: customers {customers_done - round_start:.1f} s, manufacturer and merge "
              f"{time.perf_counter() - customers_done:.1f} s", flush=True)
    return time.perf_counter() - start


def run_flower(config) -> float:
    from experiments.simulate import run_simulate

    start = time.perf_counter()
    run_simulate(config)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "experiments/configs/federation.toml"))
    parser.add_argument("--customers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the federation (default 1); with more, row 1 alone")
    parser.add_argument("--runs-dir", default="/tmp/diredi-bench-runs")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    parser.add_argument("--only", choices=("plain", "serial", "parallel", "single"),
                        help="run one of the three alone (to profile it, e.g. under py-spy); prints its time")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    from diredi_sim.config import load_config, parse_overrides
    from server.engine import RunConfig

    base = load_config(args.config, parse_overrides(args.set), cls=RunConfig)
    listed = base.population.customers[: args.customers]
    base = replace(base, runs_dir=args.runs_dir, simulation=replace(base.simulation, num_rounds=args.rounds),
                   population=replace(base.population, customers=listed, generated=max(0, args.customers - len(listed))))
    serial = replace(base, engine=replace(base.engine, client_cpus=float(cores), client_threads=cores, server_workers=1))
    parallel = replace(base, engine=replace(base.engine, client_cpus=1.0, client_threads=1, server_workers=0))
    single = replace(base, threads=1, engine=replace(base.engine, num_cpus=1, client_cpus=1.0, client_threads=1, server_workers=1))
    prepare_manufacturer(base.pipeline, base.data, preset=base.preset, seed=base.seed)  # warm the cache, untimed

    torch.set_num_threads(cores)
    if args.only:
        run = {"plain": lambda: run_plain(serial), "serial": lambda: run_flower(serial), "parallel": lambda: run_flower(parallel),
               "single": lambda: run_flower(single)}
        print(f"{args.only}: {run[args.only]():.1f} s")
        return
    plain = run_plain(serial)
    flower_serial = run_flower(serial)
    if args.rounds > 1:
        print(f"\nmachine: {cores} cores; {args.customers} customers, {args.rounds} rounds; config {args.config}")
        print(f"1. plain pipeline calls, one process:           {plain:7.1f} s")
        print(f"   Flower simulation, 1 actor x {cores} threads:      {flower_serial:7.1f} s   ratio {flower_serial / plain:.3f} "
              "(target <= 1.10)")
        return
    flower_parallel = run_flower(parallel)
    flower_single = run_flower(single)
    print(f"\nmachine: {cores} cores; {args.customers} customers; config {args.config}")
    print(f"1. plain pipeline calls, one process:           {plain:7.1f} s")
    print(f"   Flower simulation, 1 actor x {cores} threads:      {flower_serial:7.1f} s   ratio {flower_serial / plain:.3f} (target <= 1.10)")
    print(f"2. Flower simulation, {cores} actors x 1 thread:     {flower_parallel:7.1f} s   speed-up (a) {flower_serial / flower_parallel:.2f}x "
          f"over 1 actor x {cores} threads")
    print(f"   Flower simulation on 1 core, 1 actor x 1 thread: {flower_single:7.1f} s   speed-up (b) {flower_single / flower_parallel:.2f}x "
          f"over 1 actor x 1 thread (target >= 1.8x)")


if __name__ == "__main__":
    main()
