"""Which Distill C schedule gives an edge model the manufacturer's check accepts, per customer.

    python bench/distill_c_check.py [--config experiments/configs/federation.toml] [--customers 4]
        [--only exp2,generated-0] [--variant "epochs=2 max_train_images=400"] [--variant "epochs=3 max_train_images=0"] [--set KEY=VALUE ...]

Per customer of the config's population, in one process, the federation's own calls: the
customer's RD and delta (``customer_work``), the manufacturer's substitution and verification
(``manufacturer_review``, its Distill C ``public`` left out), then for each ``--variant`` of
``pipeline.distill_c`` (space-separated KEY=VALUE pairs of that table): Distill C
``public+private`` at the customer from tutor' (``customer_redistill``, the first of
``pipeline.distill_c_losses``), the manufacturer's check of that edge against the deployed one
on its held-out presumed images (``review_edge``) and the edge's rows on the customer's test
images (``customer_evaluate``). Distill C runs whatever the delta's verdict (from tutor' when
accepted, else from the unchanged tutor, as ``simulation.distill_rejected`` would).

Prints one line per customer and variant: the delta's verdict, the edge check's verdict and
reasons, the presumed-class AP change on the manufacturer's held-out images (mean over the
presumed classes it keeps and the worst one), the private-class AP and mAP on the customer's test images
against the deployed edge's, the Distill C images and seconds. The manufacturer comes from the
cache (trained first if missing, not timed).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments.offline import stay_offline  # noqa: E402

stay_offline()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "experiments/configs/federation.toml"))
    parser.add_argument("--customers", type=int, default=4, help="the first N customers of the population (default 4)")
    parser.add_argument("--only", default="", help="comma-separated customer names among those N (default: all of them)")
    parser.add_argument("--variant", action="append", default=[], metavar='"KEY=VALUE ..."',
                        help="pipeline.distill_c settings to try (repeatable; default: the config's own)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    args = parser.parse_args(argv)

    from diredi_sim.compute import configure_process
    from diredi_sim.config import load_config, parse_overrides
    from diredi_sim.datasets import DataSets
    from diredi_sim.federation import customer_evaluate, customer_redistill, customer_work, manufacturer_review, review_edge, rows_from_metrics
    from diredi_sim.manufacturer import prepare_manufacturer
    from diredi_sim.population import build_population
    from diredi_sim.table import distill_c_row
    from server.engine import RunConfig

    base_overrides = parse_overrides(args.set)
    variants = args.variant or [""]
    configs = {v: load_config(args.config, {**base_overrides, **parse_overrides([f"pipeline.distill_c.{pair}" for pair in shlex.split(v)],
                                                                                 source="--variant")}, cls=RunConfig)
               for v in variants}
    base = configs[variants[0]]
    configure_process(device=base.device, threads=base.threads)
    maker = prepare_manufacturer(base.pipeline, base.data, preset=base.preset, seed=base.seed, progress=False)
    population = build_population(base.population, base.pipeline.presumed_split)[: args.customers]
    only = [name for name in args.only.split(",") if name]
    unknown = [name for name in only if name not in [c.name for c in population]]
    if unknown:
        parser.error(f"--only {','.join(unknown)}: not among the customers {[c.name for c in population]}")
    tutor_state, edge_state = maker.tutor.state_dict(), maker.edge.state_dict()
    datasets = DataSets(base.data)
    # the manufacturer's review without its Distill C public: this bench is about the customer's public+private edge
    review_config = replace(base, pipeline=replace(base.pipeline, distill_c_modes=("public+private",)))
    print(f"config {args.config}; {len(population)} customers; threads {base.threads}; variants: "
          + "; ".join(v or "(the config's)" for v in variants), flush=True)
    for customer in population:
        if only and customer.name not in only:
            continue
        start = time.perf_counter()
        reply = customer_work(base, customer, len(population), tutor_state, edge_state, datasets=datasets)
        review = manufacturer_review(review_config, customer, tutor_state, edge_state, reply["delta"], threads=base.threads)
        delta_verdict = "accepted" if review["verdict"]["accepted"] else "rejected"
        print(f"{customer.name}: RD and review {time.perf_counter() - start:.0f} s; delta {delta_verdict}", flush=True)
        dropped = customer.class_sets(base.pipeline).dropped
        before = rows_from_metrics(customer_evaluate(base, customer, {"edge_original": edge_state}, datasets=datasets))["edge_original"]
        for variant in variants:
            config = configs[variant]
            start = time.perf_counter()
            made = customer_redistill(config, customer, len(population), review["tutor_prime"], edge_state, datasets=datasets)
            seconds = time.perf_counter() - start
            key = distill_c_row("public+private", config.pipeline.distill_c_losses[0])
            check = review_edge(config, customer, edge_state, made["edges"][key], threads=config.threads)
            verdict = check["verdict"]
            changes = {name: verdict["ap_after"][name] - ap for name, ap in verdict["ap_before"].items()
                       if name not in dropped and _number(ap) and _number(verdict["ap_after"].get(name))}
            worst = min(changes, key=changes.get) if changes else None
            after = rows_from_metrics(customer_evaluate(config, customer, {key: made["edges"][key]}, datasets=datasets))[key]
            print(f"  {customer.name} | {variant or '(the config)'} | edge {'accepted' if verdict['accepted'] else 'REFUSED'}"
                  f" | presumed AP change mean {sum(changes.values()) / max(len(changes), 1):+.3f}, worst "
                  f"{worst} {changes.get(worst, float('nan')):+.3f} | private AP {before.get('private_ap') or 0:.3f} -> "
                  f"{after.get('private_ap') or 0:.3f} | mAP {before['mAP']:.3f} -> {after['mAP']:.3f}"
                  f" | {made['metrics'][f'{key}/train-images']} images, {seconds:.0f} s"
                  + (f" | {'; '.join(verdict['reasons'])}" if verdict["reasons"] else ""), flush=True)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and value == value


if __name__ == "__main__":
    main()
