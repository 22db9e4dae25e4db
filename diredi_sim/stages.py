"""Time and peak memory per stage of a flow (:class:`StageRecorder`); each stage's start and end also
reach the open progress trackers (:func:`diredi_sim.progress.notify_stage`)."""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from typing import Any

from diredi_sim.progress import notify_stage
from diredi_sim.runs import Run


def read_peak_rss_mb() -> float:
    """The process's peak resident set size so far, in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class StageRecorder:
    """Wall time and peak memory of each stage, in order; each also goes to the run's metrics."""

    def __init__(self, run: Run | None = None):
        self.run = run
        self.stages: list[dict] = []

    @contextmanager
    def measure(self, name: str, **info: Any):
        entry: dict[str, Any] = {"stage": name, **info}
        peak_before = read_peak_rss_mb()
        start = time.perf_counter()
        notify_stage(name, finished=False)
        try:
            yield entry
        finally:
            peak_after = read_peak_rss_mb()
            entry["seconds"] = round(time.perf_counter() - start, 3)
            entry["peak_rss_mb"] = round(peak_after, 1)
            entry["peak_rss_growth_mb"] = round(peak_after - peak_before, 1)
            self.stages.append(entry)
            if self.run is not None:
                self.run.log({"pipeline_stage": name, **{k: v for k, v in entry.items() if k != "stage"}})
        notify_stage(name, finished=True)  # after the finally: a stage that failed does not count as done
