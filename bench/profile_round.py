"""Where one customer's DiReDi round spends its time, stage by stage and function by function.

    python bench/profile_round.py [--config experiments/configs/demo.toml] [--customer 0] [--set KEY=VALUE ...]
    py-spy record --format raw -o /tmp/round.txt -- python bench/profile_round.py   # then --summarize /tmp/round.txt

Runs customer ``--customer``'s round in this process with the federation's own calls, each
timed: the customer's step (RD B, RD A, the delta: ``customer_work``), the manufacturer's review
(verification, ``manufacturer_review``), the customer's Distill C (``customer_redistill``), the
manufacturer's check of that edge (``review_edge``) and the customer's evaluation of every model
(``customer_evaluate``). The manufacturer's models come from the cache (trained first if missing,
not timed). ``--summarize FILE`` reads a py-spy raw (collapsed stacks) file and prints the
functions with the most samples, inclusive, among this project's and torch's frames.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def summarize(path: str, top: int = 25) -> None:
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        frames = {f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")" if " (" in f else f
                  for f in stack.split(";")}
        for frame in frames:
            if any(k in frame for k in ("diredi_sim", ".py)")):
                inclusive[frame] += int(count)
    print(f"{total} samples; the frames with the most, inclusive:")
    for frame, count in inclusive.most_common(top):
        print(f"  {100 * count / total:5.1f}%  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "experiments" / "configs" / "demo.toml"))
    parser.add_argument("--customer", type=int, default=0)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--summarize", help="a py-spy raw file to summarise instead of running")
    parser.add_argument("--no-memo", action="store_true", help="predict every evaluation again (the code before the memo)")
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return

    from diredi_sim.compute import configure_process
    from diredi_sim.population import build_population
    from diredi_sim.federation import (customer_evaluate, customer_redistill, customer_work, manufacturer_review,
                                       review_edge)
    from diredi_sim.manufacturer import prepare_manufacturer
    from diredi_sim.config import load_config, parse_overrides
    from server.engine import RunConfig

    if args.no_memo:
        import diredi_sim.train

        diredi_sim.train._PREDICTIONS_KEPT = 0
    config = load_config(args.config, parse_overrides(args.set), cls=RunConfig)
    configure_process(device=config.device, threads=config.threads)
    population = build_population(config.population, config.pipeline.presumed_split)
    customer = population[args.customer]
    made = prepare_manufacturer(config.pipeline, config.data, preset=config.preset, seed=config.seed, progress=False)
    tutor, edge = made.tutor.state_dict(), made.edge.state_dict()
    times: dict[str, float] = {}

    def timed(name, call, *a, **k):
        start = time.perf_counter()
        out = call(*a, **k)
        times[name] = time.perf_counter() - start
        print(f"{name}: {times[name]:.1f} s", flush=True)
        return out

    work = timed("customer: RD B + RD A + delta", customer_work, config, customer, len(population), tutor, edge)
    review = timed("manufacturer: substitution + verification", manufacturer_review, config, customer, tutor, edge, work["delta"])
    models = {"tutor_original": tutor, "tutor_updated": review["tutor_prime"], "edge_original": edge, **review["edges"]}
    if review["verdict"]["accepted"] and "public+private" in config.pipeline.distill_c_modes:
        distilled = timed("customer: Distill C public+private", customer_redistill, config, customer, len(population),
                          review["tutor_prime"], edge)
        for key, state in distilled["edges"].items():
            timed("manufacturer: edge check", review_edge, config, customer, edge, state)
            models[key] = state
    timed(f"customer: evaluation of {len(models)} models", customer_evaluate, config, customer, models)
    total = sum(times.values())
    print(f"\ncustomer {customer.partition_id} ({customer.name}), verdict {'accepted' if review['verdict']['accepted'] else 'rejected'}; "
          f"{total:.1f} s in all:")
    for name, seconds in times.items():
        print(f"  {100 * seconds / total:5.1f}%  {seconds:6.1f} s  {name}")


if __name__ == "__main__":
    main()
