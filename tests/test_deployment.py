"""Flower's deployment engine: one SuperLink and two SuperNodes on 127.0.0.1 run one round of
DiReDi, then one of FedAvg, through ``flwr run`` with the same ClientApp and ServerApp, reading
the same federation config file that ``diredi-sim simulate`` takes (run_config ``config-file``,
``set``, ``method``); the test stops exactly the processes it started (each in its own process
group, with its children) and nothing else."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.offline import OFFLINE_ENV
from experiments.processes import descendants, process_table, send
from tiny_configs import SYNTHETIC_TOML

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s:\n{log.read_text()[-3000:]}")


def alive(pid: int) -> bool:
    return pid in process_table()


def stop(process: subprocess.Popen, tree: set[int]) -> None:
    """SIGTERM to the process and the descendants recorded for it, SIGKILL to what lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in [process.pid, *sorted(tree)]:
            send(pid, sig)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in tree | {process.pid}) and time.monotonic() < deadline:
            process.poll()
            time.sleep(0.2)
    process.wait(timeout=15)


TINY_CONFIG = """\
name = "deployment-test"
runs_dir = "{runs}"
[data]
cache_dir = "{cache}"
""" + SYNTHETIC_TOML + """[pipeline]
cache_dir = "{cache}"
max_eval_images = 0
eval_batch_size = 16
[population]
customers = ["exp1", "exp2"]
generated = 0
[simulation]
num_rounds = 1
[engine]
server_workers = 1
[baselines]
rounds = 1
[baselines.local]
epochs = 1
batch_size = 8
"""
STAGES = ("teacher", "distill_a", "distill_b", "rd", "distill_c", "direct")


def test_superlink_and_two_supernodes_run_one_round(tmp_path):
    home, runs, cache = tmp_path / "flwr-home", tmp_path / "runs", tmp_path / "cache"
    home.mkdir()
    http = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{http}"\ninsecure = true\n')
    text = TINY_CONFIG.format(runs=runs, cache=cache)
    for stage in STAGES:
        text += f"[pipeline.{stage}]\nepochs = 1\nbatch_size = 8\nmax_train_images = 0\nmax_eval_images = 0\n"
    config = tmp_path / "tiny.toml"  # the file `diredi-sim simulate` would take; flwr run reads it by its run_config
    config.write_text(text)
    env = {**os.environ, **OFFLINE_ENV, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(home),
           "OMP_NUM_THREADS": "1"}
    started: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        process = subprocess.Popen([str(BIN / args[0]), *args[1:]], cwd=tmp_path, env=env, stdout=log.open("w"),
                                   stderr=subprocess.STDOUT, start_new_session=True)
        started.append(process)
        return process, log

    try:
        # Flower 1.41 serves the Fleet, Control and Runtime APIs over one HTTP address.
        superlink, log = start("superlink", "flower-superlink", "--insecure", "--isolation", "subprocess",
                               "--host", "127.0.0.1", "--port", str(http), "--disable-runtime-dependency-installation")
        wait_for_port(http, superlink, log)
        for partition in (0, 1):
            start(f"supernode{partition}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{http}",
                                   "--node-config", f"partition-id={partition} num-partitions=2", "--isolation", "subprocess",
                                   "--host", "127.0.0.1", "--port", str(free_port()))

        def flwr_run(method: str) -> dict:
            run_config = f"config-file='{config}' method='{method}' set='simulation.num_rounds=1'"
            result = subprocess.run([str(BIN / "flwr"), "run", str(ROOT), "deploy", "--run-config", run_config, "--stream"],
                                    cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
            output = result.stdout + result.stderr
            assert result.returncode == 0, output[-4000:]
            pattern = "*-deployment-test/summary.json" if method == "diredi" else f"*-deployment-test-{method}/summary.json"
            deadline, summaries = time.monotonic() + 120, []
            while not summaries and time.monotonic() < deadline:
                summaries = list(runs.glob(pattern))
                time.sleep(1)
            logs = "\n".join(p.read_text()[-2000:] for p in tmp_path.glob("*.log"))
            assert summaries, f"no {pattern} under {runs}\n{output[-3000:]}\n{logs}"
            return json.loads(summaries[0].read_text())

        summary = flwr_run("diredi")
        assert sorted(row["customer"] for row in summary["customers"]) == ["exp1", "exp2"]
        assert summary["rounds"][0]["replies"] == 2 and summary["rounds"][0]["failures"] == 0
        # FedAvg through the same flwr run, ServerApp and ClientApp: one round, each customer evaluated
        summary = flwr_run("fedavg")
        assert summary["method"] == "fedavg"
        assert sorted((row["customer"], row["round"]) for row in summary["customers"]) == [("exp1", 1), ("exp2", 1)]
        assert sorted(row["round"] for row in summary["rounds"]) == [0, 0, 1, 1]
    finally:
        trees = {process.pid: descendants(process.pid) for process in started}
        for process in reversed(started):
            stop(process, trees[process.pid])
    for process in started:
        assert process.poll() is not None and not any(alive(p) for p in trees[process.pid])
