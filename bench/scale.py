"""Memory of the whole process tree against the number of virtual customers.

    python bench/scale.py [--customers 10 100 1000] [--sampled 10] [--rounds 2] [--config experiments/configs/demo.toml]
                          [--set KEY=VALUE ...]

For each population size N: ``diredi-sim simulate`` (cpu preset) with N generated customers,
``--sampled`` of them per round (fraction_train = sampled / N), ``--rounds`` rounds, each customer's
work cut to a few images (what is measured is what N costs, not training). The command runs as a
child process; every 0.25 s the proportional set size (PSS, shared pages split between the
processes that share them, so Ray's shared memory is counted once) of it and all its descendants
(the Ray head, raylet, actors, the manufacturer's worker processes) is summed from
/proc/<pid>/smaps_rollup. Prints the peak and the wall time per N. Target: peak at most 4 GB and
flat in N. The manufacturer's models come from the cache (run ``make demo`` first).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.offline import OFFLINE_ENV  # noqa: E402
from experiments.processes import command_line, descendants, pss_bytes  # noqa: E402

SMALL_WORK = ["pipeline.rd.epochs=1", "pipeline.rd.max_train_images=16", "pipeline.rd.max_eval_images=8",
              "pipeline.distill_c.epochs=1", "pipeline.distill_c.max_train_images=16", "pipeline.distill_c.max_eval_images=8",
              "pipeline.max_eval_images=24", "simulation.distill_rejected=false"]


def short_name(pid: int) -> str:
    """A process's role from its command line: the script or Ray component it runs."""
    words = command_line(pid).split()
    for word in words:
        if word.endswith(("raylet", "gcs_server")) or word.endswith(".py") or word.startswith("ray::"):
            return Path(word).name
    if "multiprocessing" in " ".join(words):
        return "multiprocessing worker (manufacturer's step)"
    return " ".join(Path(w).name if w.startswith("/") else w for w in words[:4])


def measure(command: list[str], env: dict) -> tuple[int, int, float, dict[str, int]]:
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    peak, peak_processes, breakdown = 0, 0, {}
    while process.poll() is None:
        tree = {process.pid} | descendants(process.pid)
        sizes = {p: pss_bytes(p) for p in tree}
        total = sum(sizes.values())
        if total > peak:
            peak, peak_processes, breakdown = total, len(tree), {}
            for pid, size in sizes.items():
                name = "diredi-sim simulate (driver, ServerApp)" if pid == process.pid else short_name(pid)
                breakdown[name] = breakdown.get(name, 0) + size
        time.sleep(0.25)
    stderr = process.stderr.read()
    if process.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({process.returncode}):\n{stderr[-3000:]}")
    return peak, peak_processes, time.perf_counter() - start, breakdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "experiments/configs/demo.toml"))
    parser.add_argument("--customers", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--sampled", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs-dir", default="/tmp/diredi-bench-runs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="another config override (repeatable), e.g. engine.server_workers=1")
    args = parser.parse_args()
    env = {**os.environ, **OFFLINE_ENV}
    rows = []
    for n in args.customers:
        overrides = [f"name=scale-{n}", f"runs_dir={args.runs_dir!r}".replace("'", '"'), "population.customers=[]",
                     f"population.generated={n}", f"simulation.num_rounds={args.rounds}",
                     f"simulation.fraction_train={min(1.0, args.sampled / n)}", *SMALL_WORK, *args.set]
        command = [sys.executable, "-m", "experiments.cli", "simulate", args.config]
        for item in overrides:
            command += ["--set", item]
        peak, processes, seconds, breakdown = measure(command, env)
        rows.append((n, peak, processes, seconds))
        print(f"{n:5d} customers: peak PSS {peak / 2**30:.2f} GiB over {processes} processes, {seconds:.0f} s", flush=True)
        for name, size in sorted(breakdown.items(), key=lambda item: -item[1]):
            print(f"        {size / 2**20:7.0f} MiB  {name}", flush=True)
    print(f"\nmachine: {os.cpu_count()} cores; {args.sampled} customers sampled per round, {args.rounds} rounds, "
          f"config {Path(args.config).name}")
    print("| customers | peak PSS of the process tree (GiB) | processes at peak | wall (s) |")
    print("|---|---|---|---|")
    for n, peak, processes, seconds in rows:
        print(f"| {n} | {peak / 2**30:.2f} | {processes} | {seconds:.0f} |")
    low, high = min(r[1] for r in rows), max(r[1] for r in rows)
    print(f"\nlargest / smallest peak: {high / low:.2f} (flat: close to 1); largest peak {high / 2**30:.2f} GiB (target <= 4 GB)")


if __name__ == "__main__":
    main()
