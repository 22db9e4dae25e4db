"""Results as one tidy table: ``results.csv``, a row per method x seed x round x customer x class
x metric, which ``pandas.read_csv`` (or ``csv.DictReader``) reads in one call.

Columns (:data:`COLUMNS`):

- ``method``: diredi, fedavg, fedprox, direct, local (a compare run's methods; a paper run's
  ``edge_direct`` / ``edge_local`` rows are direct / local, its other rows diredi).
- ``seed``: the customers' seed of the replicate (run seed + replicate; a paper run's customer seed).
- ``round``: the federation round (a paper run's one flow is round 1); empty where the method
  has no rounds (direct training, local fine-tuning).
- ``customer``, ``partition_id``: the customer's name and index; empty for a round's merge.
- ``class``: a VOC class name for per-class metrics, empty for a metric over the customer's classes.
- ``metric``: the measure. Unprefixed names are the method's outcome for that customer, the same
  in every kind of run: mAP, precision, recall, f1 (over the customer's classes, score >= the
  threshold), gain, forgetting, uplink_bytes, ..., AP and AP_change per class (against the
  original edge), accepted (1/0: the delta's verdict), edge_deployed (1/0). ``<model>/<measure>``
  names one model of DiReDi's table (``tutor_updated/mAP``, ``edge_distill_c_public_private/AP``).
- ``value``: a number (``repr`` of the float: it reads back exactly); missing values have no row.

:func:`tidy_rows` builds every row; each writer (the federation's ledger, FedAvg's server,
``compare``, ``paper``) hands it its records and calls :func:`write_results_csv`. Plain Python.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

COLUMNS = ("method", "seed", "round", "customer", "partition_id", "class", "metric", "value")
# Per-class mappings of a result row and the metric each becomes.
PER_CLASS = {"per_class": "AP", "change": "AP_change", "num_gt": "num_gt", "presumed_per_class": "presumed_AP"}
# Labels turned into 1/0 metrics: key -> (metric, value of 1).
FLAGS = {"verdict": ("accepted", "accepted"), "edge": ("edge_deployed", "deployed")}
# Keys that say where a row belongs (they are columns, or bookkeeping), not what was measured.
IDENTIFIERS = frozenset({"method", "seed", "replicate", "round", "server-round", "customer", "partition_id", "partition-id",
                         "key", "time", "node", "event"})


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy / torch scalars
        try:
            return _number(value.item())
        except (TypeError, ValueError):
            return None
    return None


def tidy_rows(record: Mapping[str, Any], *, method: str, seed: int | None, round: int | None = None,
              customer: str | None = None, partition_id: int | None = None, prefix: str = "") -> list[dict]:
    """The tidy rows of one result ``record`` (a dict of measures) of ``customer`` in ``round``.

    Every finite number becomes a row with an empty class (``prefix + key``); a per-class
    mapping (:data:`PER_CLASS`: ``per_class`` -> AP, ``change`` -> AP_change, ``num_gt``,
    ``presumed_per_class`` -> presumed_AP, on the manufacturer's test images) a
    row per class; a verdict / edge label (:data:`FLAGS`) a 1/0 row; any other mapping its
    numbers under ``prefix + key + "/"``. Strings, lists, None and NaN make no row;
    :data:`IDENTIFIERS` are skipped (they are the columns)."""
    base = {"method": method, "seed": seed, "round": round, "customer": customer, "partition_id": partition_id}
    rows = []
    for key, value in record.items():
        if key in IDENTIFIERS:
            continue
        if key in FLAGS and isinstance(value, str):
            metric, positive = FLAGS[key]
            rows.append({**base, "class": None, "metric": prefix + metric, "value": int(value == positive)})
        elif key in PER_CLASS and isinstance(value, Mapping):
            for name, number in value.items():
                number = _number(number)
                if number is not None:
                    rows.append({**base, "class": name, "metric": prefix + PER_CLASS[key], "value": number})
        elif isinstance(value, Mapping):
            rows += tidy_rows(value, method=method, seed=seed, round=round, customer=customer, partition_id=partition_id,
                              prefix=f"{prefix}{key}/")
        else:
            number = _number(value)
            if number is not None:
                rows.append({**base, "class": None, "metric": prefix + key, "value": number})
    return rows


def format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def write_results_csv(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """``rows`` (from :func:`tidy_rows`) as CSV with :data:`COLUMNS`, written atomically."""
    from diredi_sim.runs import atomic_write_text

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([format_cell(row.get(column)) for column in COLUMNS])
    return atomic_write_text(path, buffer.getvalue())


def read_results_csv(path: str | Path) -> list[dict]:
    """The rows of a results.csv with numbers as numbers and empty cells as None (without pandas)."""
    def convert(column: str, text: str):
        if text == "":
            return None
        if column in ("seed", "round", "partition_id"):
            return int(text)
        if column == "value":
            number = float(text)
            return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number
        return text

    with open(path, newline="", encoding="utf-8") as f:
        return [{column: convert(column, row[column]) for column in COLUMNS} for row in csv.DictReader(f)]


__all__ = ["COLUMNS", "tidy_rows", "write_results_csv", "read_results_csv"]
