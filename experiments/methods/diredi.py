"""DiReDi: the federation on Flower's simulation engine (``diredi-sim simulate``); per customer,
the row of the edge model it runs after the last round (Distill C's when deployed, its previous
one when not), its traffic over every round and its training images (RD B + RD A + its Distill
C), which the equal-compute baselines then get."""

from __future__ import annotations

import json
from pathlib import Path

from diredi_sim.federation_config import FederationConfig
from diredi_sim.table import distill_c_row
from experiments.methods import Method, register


def run_diredi(config: FederationConfig, shared: dict | None = None) -> tuple[list[dict], Path]:
    """The DiReDi federation; per customer the deployed edge model's row of the last round.
    ``shared["budgets"]``: each customer's training images, for the equal-compute baselines."""
    from experiments.simulate import run_simulate

    outcome = run_simulate(config)
    rounds = config.simulation.num_rounds
    mode_key = distill_c_row(config.simulation.deploy_mode, config.pipeline.distill_c_losses[0])
    rows = []
    for summary in outcome.summary:
        if summary["round"] != rounds:
            continue
        detail = json.loads((outcome.folder / f"round{rounds}" / f"customer{summary['partition_id']}.json").read_text())
        by_key = {r["key"]: r for r in detail["rows"]}
        deployed = by_key[mode_key] if summary["edge"] == "deployed" else by_key["edge_original"]
        images = uplink = downlink = 0  # over every round: training images (RD B + RD A + its Distill C), traffic
        for r in range(1, rounds + 1):
            record = json.loads((outcome.folder / f"round{r}" / f"customer{summary['partition_id']}.json").read_text())
            uplink, downlink = uplink + record["uplink_bytes"], downlink + record["downlink_bytes"]
            counts = record.get("train_images", {})
            images += counts.get("rd_b", 0) + counts.get("rd_a", 0) + counts.get(mode_key.replace("edge_", "", 1), 0)
        rows.append({"round": rounds, "partition_id": summary["partition_id"], "customer": summary["customer"],
                     "verdict": summary["verdict"],
                     **{k: deployed.get(k) for k in ("mAP", "precision", "recall", "f1", "gain", "forgetting", "per_class", "change")},
                     "uplink_bytes": uplink, "downlink_bytes": downlink,
                     "train_images": images})
    if shared is not None:
        shared["budgets"] = {row["partition_id"]: row["train_images"] for row in rows}
    return rows, outcome.folder


register(Method("diredi", "DiReDi: reverse distillation at the customers, verified deltas, Distill C", run_diredi))
