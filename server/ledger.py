"""The run folder of a DiReDi federation run, as a ledger: every customer's round, every round's
merge, the checkpoints of the shared tutor and of each customer's deployed edge, and
``state.json`` (written last in each round: what a resumed run needs). The strategy decides;
the ledger writes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from diredi_sim.federation_config import FederationConfig
from diredi_sim.federation import load_model
from diredi_sim.runs import (Run, atomic_write_bytes, atomic_write_json, atomic_write_text, load_checkpoint, save_checkpoint,
                             to_jsonable)
from diredi_sim.table import distill_c_row
from diredi_sim.tidy import tidy_rows, write_results_csv

# Columns of the per-customer summary (summary.md), in order.
SUMMARY_COLUMNS = ("round", "partition_id", "customer", "private", "dropped", "verdict", "edge", "gain", "forgetting",
                   "dropped_forgetting", "mAP_before", "mAP_after", "uplink_bytes", "seconds")
STATE_FORMAT = "diredi-sim-federation-state/1"


class Ledger:
    """A federation run's folder: :meth:`customer`, :meth:`failure` and :meth:`round` record a
    round as it ends, :meth:`save_state` closes it; :meth:`restore` reads a saved state back."""

    def __init__(self, run: Run, config: FederationConfig):
        self.run, self.config = run, config
        self.summary_rows: list[dict] = []
        self.round_reports: list[dict] = []
        self.tutor_round: int | None = None  # the round whose checkpoint holds the shared tutor (None: original)
        self.edge_rounds: dict[int, int] = {}  # partition id -> the round whose checkpoint holds its deployed edge
        self.nodes: dict[int, int] = {}  # node id -> the partition it is bound to

    def restore(self, state: dict) -> tuple[dict[int, dict], dict | None]:
        """The state after round ``state["last_round"]``: each customer's deployed edge, and the
        shared tutor's state (None: the manufacturer's original tutor)."""
        self.summary_rows = list(state["summary_rows"])
        self.round_reports = list(state["round_reports"])
        self.edge_rounds = {int(p): int(r) for p, r in state["edges"].items()}
        self.tutor_round = state["tutor_round"]
        self.nodes = {int(n): int(p) for n, p in state.get("nodes", {}).items()}
        edges = {p: load_checkpoint(self.run.checkpoint_path(f"edge_customer{p}_round{r}"))["state_dict"]
                 for p, r in self.edge_rounds.items()}
        tutor = None if self.tutor_round is None else \
            load_checkpoint(self.run.checkpoint_path(f"tutor_round{self.tutor_round}"))["state_dict"]
        return edges, tutor

    def failure(self, failure: dict) -> None:
        self.run.log({"event": "customer_failed", **failure})

    def round(self, report: dict, merged_state: dict | None) -> None:
        """A round's merge report; the shared tutor's checkpoint when the merge changed it."""
        server_round = report["round"]
        self.round_reports.append(report)
        self.run.log({"event": "round", **to_jsonable(report)})
        self.run.write_json("rounds.json", to_jsonable(self.round_reports))
        if merged_state is not None:
            tutor = load_model("tutor", self.config.preset, merged_state)
            save_checkpoint(self.run.checkpoint_path(f"tutor_round{server_round}"), tutor, config=self.config, round=server_round)
            self.tutor_round = server_round

    def save_state(self, server_round: int) -> None:
        """state.json, last of the round's files: the round is complete, and a resumed run starts after it."""
        self.run.write_json("state.json", {
            "format": STATE_FORMAT, "last_round": server_round, "num_rounds": self.config.simulation.num_rounds,
            "tutor_round": self.tutor_round, "edges": {str(p): r for p, r in sorted(self.edge_rounds.items())},
            "summary_rows": to_jsonable(self.summary_rows), "round_reports": to_jsonable(self.round_reports),
            "nodes": {str(n): p for n, p in sorted(self.nodes.items())}})

    @staticmethod
    def _train_images(job: dict, result: dict) -> dict[str, int]:
        """The images each stage of this customer's round trained on: RD B and RD A (its train
        reply), Distill C public (the manufacturer's review), Distill C public+private (its
        distill_c reply), by stage name."""
        metrics, counts = job["metrics"], {}
        if "rd-b-images" in metrics:
            counts.update(rd_b=int(metrics["rd-b-images"]), rd_a=int(metrics.get("num-examples", 0)))
        for key, images in result.get("train_images", {}).items():
            counts[key.replace("edge_", "", 1)] = int(images)
        for name, value in job.get("distill_c_metrics", {}).items():
            if name.endswith("/train-images"):
                counts[name.split("/")[0].replace("edge_", "", 1)] = int(value)
        return counts

    def customer(self, server_round: int, job: dict, result: dict) -> None:
        """One customer's round: its summary row, its round file, its deployed edge's checkpoint."""
        customer = job["customer"]
        classes = customer.class_sets(self.config.pipeline)
        rows = {row["key"]: row for row in result["rows"]}
        verdict = result["verdict"]
        before = rows.get("edge_original", {})
        # what the customer runs from now on: the new edge model, or its old one when the delta
        # was rejected or the edge failed the manufacturer's check
        edge_deployed = self.config.simulation.deploy_mode in result["edges"]
        deployed = rows.get(distill_c_row(self.config.simulation.deploy_mode, self.config.pipeline.distill_c_losses[0]), {}) \
            if edge_deployed else before
        summary = {
            "round": server_round, "partition_id": customer.partition_id, "customer": customer.name,
            "classes": list(customer.classes), "private": list(classes.private), "dropped": list(classes.dropped),
            "verdict": "accepted" if verdict["accepted"] else "rejected", "reasons": verdict["reasons"],
            "edge": "deployed" if edge_deployed else "kept",
            "edge_reasons": [r for check in verdict.get("edge_checks", {}).values() for r in check["reasons"]],
            "gain": deployed.get("gain", math.nan), "forgetting": deployed.get("forgetting", math.nan),
            "dropped_forgetting": deployed.get("dropped_forgetting", math.nan),
            "mAP_before": before.get("mAP", math.nan), "mAP_after": deployed.get("mAP", math.nan),
            # the method's traffic: the delta and, with Distill C public+private at the customer, its
            # edge model up; the tutor and edge down (twice with Distill C). The evaluate exchange is
            # the simulator's measurement: in "bytes" only.
            "uplink_bytes": sum(job.get("bytes", {}).get(k, 0) for k in ("train.up", "distill_c.up")),
            "downlink_bytes": sum(job.get("bytes", {}).get(k, 0) for k in ("train.down", "distill_c.down")),
            "delta_bytes": int(job["metrics"].get("uplink-bytes", job["metrics"].get("delta-bytes-fp32", 0))),
            "seconds": round(float(job["metrics"].get("seconds", 0.0)) + result["seconds"], 3),
            "customer_seconds": job["metrics"].get("seconds"), "manufacturer_seconds": result["seconds"],
            "bytes": job.get("bytes", {}),  # per message type and direction: train.down, train.up, distill_c.*, evaluate.*
            "train_images": self._train_images(job, result),
        }
        self.summary_rows.append(summary)
        self.run.log({"event": "customer", **to_jsonable(summary), "customer_metrics": job["metrics"]})
        atomic_write_json(self.run.folder / f"round{server_round}" / f"customer{customer.partition_id}.json",
                          to_jsonable({**summary, "verdict_detail": verdict, "rows": result["rows"], "stages": result["stages"],
                                       "customer_metrics": job["metrics"]}))
        if edge_deployed:
            # edge_customer<p>_round<r>: kept for a resumed run; edge_customer<p>: the latest, a copy
            edge = load_model("edge", self.config.preset, result["edges"][self.config.simulation.deploy_mode])
            path = save_checkpoint(self.run.checkpoint_path(f"edge_customer{customer.partition_id}_round{server_round}"), edge,
                                   config=self.config, round=server_round, customer=customer.name)
            atomic_write_bytes(self.run.checkpoint_path(f"edge_customer{customer.partition_id}"), path.read_bytes())
            self.edge_rounds[customer.partition_id] = server_round



def format_summary(rows: list[dict]) -> str:
    """The per-customer table (markdown): one line per customer and round."""

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:+.3f}" if abs(value) < 1 else f"{value:.1f}"
        if isinstance(value, list):
            return ", ".join(value) or "-"
        return str(value)

    header = "| " + " | ".join(SUMMARY_COLUMNS) + " |"
    lines = [header, "|" + "---|" * len(SUMMARY_COLUMNS)]
    for row in sorted(rows, key=lambda r: (r.get("round", 0), r.get("partition_id", 0))):
        values = []
        for column in SUMMARY_COLUMNS:
            value = row.get(column, "")
            if column in ("mAP_before", "mAP_after") and isinstance(value, float) and not math.isnan(value):
                value = f"{value:.3f}"
            elif column == "uplink_bytes":
                value = f"{value / 2**20:.2f} MiB"
            values.append(cell(value))
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


# A customer's round as results.csv has it: these measures of the edge model it runs after the
# round, and these of its summary row.
OUTCOME_MEASURES = ("mAP", "precision", "recall", "f1", "per_class", "change")
ROUND_MEASURES = ("verdict", "edge", "gain", "forgetting", "dropped_forgetting", "mAP_before", "mAP_after", "uplink_bytes",
                  "downlink_bytes", "delta_bytes", "seconds", "customer_seconds", "manufacturer_seconds", "bytes", "train_images")
MERGE_MEASURES = ("replies", "failures", "accepted_customers", "shared_tutor_updated")


def _round_file_order(path: Path) -> tuple[int, int]:
    return int(path.parent.name.removeprefix("round")), int(path.stem.removeprefix("customer"))


def federation_results(folder: str | Path, config: FederationConfig, method: str = "diredi") -> list[dict]:
    """The tidy rows (:func:`diredi_sim.tidy.tidy_rows`) of a federation run folder, from its
    round files (``round<r>/customer<p>.json``) and ``rounds.json``: per customer and round the
    outcome (the edge model it runs after the round: Distill C's when deployed, its previous
    one when not; unprefixed metrics) and every model of the round's table (``<row key>/...``);
    per round the merge (no customer)."""
    folder = Path(folder)
    seed = config.seed + config.replicate
    deployed_key = distill_c_row(config.simulation.deploy_mode, config.pipeline.distill_c_losses[0])
    rows = []
    for path in sorted(folder.glob("round*/customer*.json"), key=_round_file_order):
        detail = json.loads(path.read_text(encoding="utf-8"))
        where = dict(method=method, seed=seed, round=detail["round"], customer=detail["customer"], partition_id=detail["partition_id"])
        models = {row["key"]: row for row in detail.get("rows", [])}
        deployed = models.get(deployed_key if detail.get("edge") == "deployed" else "edge_original", {})
        outcome = {**{k: deployed[k] for k in OUTCOME_MEASURES if k in deployed}, **{k: detail[k] for k in ROUND_MEASURES if k in detail}}
        rows += tidy_rows(outcome, **where)
        for key, model in models.items():
            rows += tidy_rows(model, **where, prefix=f"{key}/")
    reports = json.loads((folder / "rounds.json").read_text(encoding="utf-8")) if (folder / "rounds.json").is_file() else []
    for report in reports:
        rows += tidy_rows({k: report[k] for k in MERGE_MEASURES if k in report}, method=method, seed=seed, round=report["round"],
                          prefix="merge/")
    return rows


def write_summary(run: Run, rows: list[dict], rounds: list[dict], config: FederationConfig) -> None:
    """summary.json, summary.md and results.csv (:func:`federation_results`) of a finished run."""
    run.write_json("summary.json", to_jsonable({"customers": rows, "rounds": rounds}))
    write_results_csv(run.folder / "results.csv", federation_results(run.folder, config))
    text = ("gain: mean AP change on the customer's private classes; forgetting: mean AP lost on its kept presumed classes; "
            "dropped_forgetting: AP lost on the presumed classes it dropped (intended). The edge model the customer runs "
            "after the round (Distill C when accepted; its previous one when rejected) against the original edge, on the "
            "customer's test images.\n\n" + format_summary(rows) + "\n")
    atomic_write_text(run.folder / "summary.md", text)


__all__ = ["Ledger", "SUMMARY_COLUMNS", "STATE_FORMAT", "federation_results", "format_summary", "write_summary"]
