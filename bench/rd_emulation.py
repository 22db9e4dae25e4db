"""How far reverse distillation moves Tutor1 towards the edge, and what the delta keeps, per RD setting.

    python bench/rd_emulation.py [--experiment exp1] [--set pipeline.rd.epochs=10 --set pipeline.alpha=1000 ...]

Runs one customer's RD B and RD A (``run_customer``, the paper flow's own call) with the
experiment's config and the ``--set`` overrides, substitutes tutor' = tutor + delta, and prints,
on the manufacturer's test images of the presumed classes and on the customer's test images:
the tutor's, the edge's, Tutor1's, Tutor2's and tutor''s presumed mAP, the mAP over the customer's
classes, and the private-class AP; then where Tutor1 sits between the edge (0) and the tutor (1) on
both scales, and the share of Tutor2's private AP that tutor' keeps. The manufacturer comes from
the cache (trained first if missing, not timed). Figures go to stdout, one line per row.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="exp1")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seed", type=int, default=0, help="the customer's seed (Seeds(seed))")
    args = parser.parse_args(argv)

    import torch

    from diredi_sim.compute import configure_process
    from diredi_sim.config import parse_overrides
    from diredi_sim.datasets import DataSets
    from diredi_sim.deltas import apply_delta
    from diredi_sim.flow import Step, run_customer
    from diredi_sim.manufacturer import prepare_manufacturer
    from diredi_sim.runs import Run
    from diredi_sim.seeds import Seeds
    from diredi_sim.settings import ClassSets
    from diredi_sim.table import measure_on_customer, measure_on_manufacturer
    from experiments.paper import find_paper_config, load_paper_config

    config, pipeline = load_paper_config(find_paper_config(args.experiment), parse_overrides(args.set))
    configure_process(threads=config.threads)
    classes = ClassSets.of(pipeline.customer, pipeline.presumed_split, pipeline.teacher_split)
    datasets = DataSets(config.data)
    maker = prepare_manufacturer(pipeline, config.data, preset=config.preset, seed=config.seed, datasets=datasets,
                                 progress=False)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder, Run(folder) as run:  # for the per-epoch loss rows
        update = run_customer(maker.tutor, maker.edge, Step(pipeline, datasets, pipeline.customer, Seeds(args.seed), run=run,
                                                            progress=False))
        rows = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    rd_seconds = time.perf_counter() - start
    updated = copy.deepcopy(maker.tutor)
    updated.load_state_dict(apply_delta(maker.tutor.state_dict(), update.delta, pipeline.delta_weight))

    customer_test = datasets.records(datasets.data.test_set, classes.union, pipeline.max_eval_images, pool="customer")
    models = {"tutor": maker.tutor, "edge": maker.edge, "tutor1": update.tutor1, "tutor2": update.tutor2, "tutor'": updated}
    figures = {}
    print(f"# {args.experiment} seed {args.seed}; overrides {' '.join(args.set) or '-'}; RD B + RD A {rd_seconds:.0f} s; "
          f"delta norm {update.delta_info['norm']:.3f}")
    for name, model in models.items():
        model.eval()
        with torch.no_grad():  # the paper table's own measures: the kept presumed classes on the maker's test images
            presumed = measure_on_manufacturer(name, model, classes, datasets, pipeline)["presumed_map"]
            customer_row = measure_on_customer(model, customer_test, classes, pipeline)
        figures[name] = (presumed, customer_row["mAP"], customer_row["private_ap"] or 0.0)
        print(f"{name:8} presumed mAP (kept classes, maker test) {figures[name][0]:.3f}  customer mAP {figures[name][1]:.3f}  "
              f"private AP {figures[name][2]:.3f}  P {customer_row['precision']:.3f}  R {customer_row['recall']:.3f}")
    for row in rows:  # alpha * L_RD and beta * L_task, each the mean over the epoch's steps
        if "loss_sum.distill" in row:
            print(f"{row['stage']:12} epoch {row['epoch']:3}  alpha*L_RD {row['loss_sum.distill']:.4f}  "
                  f"beta*L_task {row.get('loss_sum.task', 0.0):.4f}")
    for scale, index in (("presumed", 0), ("customer", 1)):
        edge, tutor, tutor1 = figures["edge"][index], figures["tutor"][index], figures["tutor1"][index]
        print(f"tutor1 on the {scale} scale: {(tutor1 - edge) / (tutor - edge):.2f} of the way from the edge (0) to the tutor (1)")
    updated, tutor2 = figures["tutor'"], figures["tutor2"]
    kept = (f"keeps {updated[2] / tutor2[2]:.0%} of tutor2's private AP" if tutor2[2]
            else "keeps no share: tutor2 learned none of the private class")
    print(f"tutor' {kept}; presumed mAP tutor {figures['tutor'][0]:.3f} -> tutor' {updated[0]:.3f}")


if __name__ == "__main__":
    main()
