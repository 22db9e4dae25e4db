"""A real Ray cluster: a head started with `ray start --head` on 127.0.0.1 (its own ports), a tiny
federation run against its address, every process the test started stopped by its id."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from diredi_sim.config import DataConfig
from diredi_sim.population import PopulationConfig
from diredi_sim.federation_config import FederationConfig
from server.engine import EngineConfig, RunConfig
from diredi_sim.settings import PipelineConfig
from experiments.processes import descendants, send
from experiments.simulate import build_backend_config, run_simulate
from test_simulation import STAGE, TINY

RAY = Path(sys.executable).parent / "ray"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie); it may end while this reads."""
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


def test_ray_address_comes_from_the_setting_then_from_RAY_ADDRESS(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = build_backend_config(FederationConfig())["init_args"]
    assert local["_node_ip_address"] == "127.0.0.1" and local["address"] == "local"  # never a cluster found lying around
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6390")
    assert build_backend_config(FederationConfig())["init_args"] == {"address": "127.0.0.1:6390"}
    setting = RunConfig(engine=EngineConfig(ray_address="127.0.0.1:7000"))
    assert build_backend_config(setting)["init_args"] == {"address": "127.0.0.1:7000"}


@pytest.mark.slow
def test_a_federation_runs_on_a_ray_head_started_apart(tmp_path):
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))  # short: Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    ports = [str(free_port()) for _ in range(4)]
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
         f"--ray-client-server-port={ports[2]}", f"--min-worker-port={int(ports[3])}", f"--max-worker-port={int(ports[3]) + 40}",
         f"--temp-dir={temp}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the head's GCS answers on its port
            assert head.poll() is None, head.stdout.read()[-3000:]
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        else:
            pytest.fail("the Ray head did not open its port in 120 s")
        started = {head.pid, *descendants(head.pid)}
        pipeline = PipelineConfig(teacher=STAGE, distill_a=STAGE, distill_b=STAGE, rd=STAGE, distill_c=STAGE, direct=STAGE,
                                  cache_dir=str(tmp_path / "models"), eval_batch_size=16)
        config = RunConfig(name="ray-head", runs_dir=str(tmp_path / "runs"),
                                  data=DataConfig(cache_dir=str(tmp_path / "data"), synthetic=TINY), pipeline=pipeline,
                                  population=PopulationConfig(customers=("exp1", "exp2"), generated=0),
                                  engine=EngineConfig(client_threads=1, ray_address=f"127.0.0.1:{port}"))
        torch.set_num_threads(1)
        outcome = run_simulate(config)
        assert sorted(row["customer"] for row in outcome.summary) == ["exp1", "exp2"]
        assert (outcome.folder / "summary.json").is_file() and (outcome.folder / "results.csv").is_file()
        # the customers ran in the head's worker processes: their lines are in the head's session logs
        logs = "".join(f.read_text(errors="replace") for f in (temp / "session_latest" / "logs").glob("worker-*"))
        assert "customer 0 (exp1)" in logs and "customer 1 (exp2)" in logs
    finally:
        started |= set(descendants(head.pid)) if head.poll() is None else set()
        send(head.pid, signal.SIGTERM, group=True)  # `ray start --block` and everything it started share its session
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            send(head.pid, signal.SIGKILL, group=True)
            head.wait(timeout=30)
        deadline = time.monotonic() + 30
        while (alive := [p for p in started if running(p)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in alive:
            send(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
    assert not alive, f"processes of the Ray head still running: {alive}"
