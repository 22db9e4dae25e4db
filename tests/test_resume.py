"""Crash and resume. A federation run on Flower's simulation engine is killed for real (SIGKILL
to its process group and every process below it, Ray's included) at three points: in the middle
of round 2 (while the merged tutor's checkpoint is being written), during the write of the state
file that would close round 2, and after the last round (while summary.json is being written);
each time ``diredi-sim resume`` goes on from what the kill left, and the results in the end equal
those of an uninterrupted run with the same seed. Fast tests: a torn metrics line is never read as
a row, a folder that is not a federation run is refused with an error naming the file, the
interrupted round is cleared."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from diredi_sim.runs import append_jsonl, read_jsonl
from experiments.cli import main as cli_main
from experiments.offline import OFFLINE_ENV
from experiments.processes import alive, identified_descendants, send
from experiments.resume import clear_interrupted_round, read_state
from tiny_configs import SYNTHETIC_TOML

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
STAGE = "epochs = 1\nbatch_size = 8\nlr = 0.01\nwarmup_steps = 1\n"


def tiny_config(tmp: Path) -> Path:
    """2 customers, 2 rounds on tiny synthetic data; every delta accepted (every drop allowed), so
    that round 2 starts from round 1's merged tutor and deployed edges."""
    text = f"""name = "resume-test"
runs_dir = "{tmp / 'runs'}"
[data]
cache_dir = "{tmp / 'data'}"
{SYNTHETIC_TOML}clutter = 2.0
[population]
customers = ["exp1", "exp2"]
generated = 0
[simulation]
num_rounds = 2
[engine]
client_threads = 1
num_cpus = 2
server_workers = 1
[pipeline]
cache_dir = "{tmp / 'manufacturer'}"
eval_batch_size = 16
max_eval_images = 8
distill_c_modes = ["public+private"]
[pipeline.verify]
max_ap_drop = 1.0
max_precision_drop = 1.0
max_recall_drop = 1.0
max_f1_drop = 1.0
"""
    for stage in ("teacher", "distill_a", "distill_b", "direct"):
        text += f"[pipeline.{stage}]\n{STAGE}"
    for stage in ("rd", "distill_c"):
        text += f"[pipeline.{stage}]\n{STAGE}max_train_images = 8\nmax_eval_images = 4\n"
    path = tmp / "tiny.toml"
    path.write_text(text)
    return path


# A kill at an exact point of a write: every process of a run started with DIREDI_TEST_PAUSE_AT =
# "NAME|TEXT|MARKER" (and the hook's folder on PYTHONPATH) holds the thread that is about to rename
# a finished temporary file onto NAME whose content holds TEXT: the temporary file cut to half its
# size first, as a kill in mid-write leaves it, MARKER written, then the thread sleeps for good
# (not SIGSTOP: a run that stopped itself was seen to go on and finish the rename; a SIGCONT that
# the kernel sends when a stopped process's group becomes orphaned is the likely cause). The test
# then kills the whole run. Production code has no hook:
# this wraps os.replace, which every write of a run folder ends with
# (diredi_sim.runs.atomic_write_bytes).
PAUSE_HOOK = """
import os, time
_at = os.environ.get("DIREDI_TEST_PAUSE_AT")
if _at:
    _name, _text, _marker = _at.split("|")
    _replace = os.replace

    def _pausing_replace(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(dst)) == _name and _text.encode() in open(src, "rb").read():
            with open(src, "r+b") as f:
                f.truncate(os.path.getsize(src) // 2)
            with open(_marker, "w") as f:
                f.write(str(os.getpid()))
            while True:
                time.sleep(60)
        return _replace(src, dst, *args, **kwargs)

    os.replace = _pausing_replace
"""


def pausing_env(tmp: Path, name: str, text: str = "") -> tuple[dict, Path]:
    """The environment of a run that freezes on its write of ``name`` (content holding ``text``)."""
    hook = tmp / "pause-hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(PAUSE_HOOK)
    marker = tmp / f"paused-at-{name}"
    marker.unlink(missing_ok=True)
    path = os.pathsep.join(p for p in (str(hook), ENV.get("PYTHONPATH", "")) if p)
    return {**ENV, "PYTHONPATH": path, "DIREDI_TEST_PAUSE_AT": f"{name}|{text}|{marker}"}, marker


class Tracked:
    """A `diredi-sim` command in its own session, with every process it ever had below it."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None):
        self.log = log
        self.process = subprocess.Popen([sys.executable, "-m", "experiments.cli", *args], cwd=ROOT, env=env or ENV,
                                        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.seen: set[tuple[int, str]] = set()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while self.process.poll() is None:
            self.seen |= identified_descendants(self.process.pid)
            time.sleep(0.2)

    def wait(self, timeout: float) -> int:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.process.args} did not end in {timeout} s:\n{self.output()[-3000:]}") from None
        self.thread.join()
        return code

    def kill(self) -> None:
        """SIGKILL the whole run: freeze it (nothing new starts), list its tree, kill the group and the tree."""
        pgid = self.process.pid
        tree: set[tuple[int, str]] = set()
        while True:
            new = identified_descendants(self.process.pid) - tree
            if not new and tree:
                break
            tree |= new
            for pid, _ in {(self.process.pid, "")} | new:
                send(pid, signal.SIGSTOP)
        self.seen |= tree
        send(pgid, signal.SIGKILL, group=True)
        for pid, _ in alive(tree):
            send(pid, signal.SIGKILL)
        self.process.wait(30)
        self.thread.join()

    def leftovers(self, timeout: float = 30) -> set[tuple[int, str]]:
        """Processes of this command still alive after ``timeout`` s; they are killed, then reported."""
        deadline = time.monotonic() + timeout
        while (left := alive(self.seen)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid, _ in left:
            send(pid, signal.SIGKILL)
        return left

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill_when_paused(self, marker: Path, timeout: float = 600) -> None:
        """Wait until a process of the run has frozen itself at its pause point, then kill the run."""
        deadline = time.monotonic() + timeout
        while not marker.exists() and self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"the run never reached its pause point {marker.name}:\n{self.output()[-3000:]}"
        self.kill()
        assert not self.leftovers(5), f"processes of the killed run still alive: {self.leftovers()}"


# ------------------------------------------------------------------------------------ results

def untimed(value):
    """A result without its wall times and memory peaks (seconds, eval_seconds, time, peak_rss_mb),
    and without downlink byte counts: every downlink carries the run's settings, whose runs_dir
    differs between the two runs compared here (uplink bytes are kept)."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items()
                if "seconds" not in k and "rss" not in k and k != "time" and k != "downlink_bytes" and not k.endswith(".down")}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def results(folder: Path) -> dict:
    summary = json.loads((folder / "summary.json").read_text())
    customers = sorted(untimed(summary["customers"]), key=lambda row: (row["round"], row["partition_id"]))
    details = {path.relative_to(folder).as_posix(): untimed(json.loads(path.read_text())) for path in folder.glob("round*/*.json")}
    return {"customers": customers, "rounds": untimed(json.loads((folder / "rounds.json").read_text())),
            "summary_rounds": untimed(summary["rounds"]), "details": details}


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def only_run(runs: Path) -> Path:
    folders = [p for p in runs.iterdir() if p.is_dir()] if runs.is_dir() else []
    assert len(folders) <= 1, folders
    return folders[0] if folders else None


@pytest.mark.slow
def test_a_run_killed_at_three_points_and_resumed_each_time_equals_an_uninterrupted_run(tmp_path):
    config = tiny_config(tmp_path)
    start = time.monotonic()

    # 1. uninterrupted (it also trains the tiny manufacturer, cached for the other two)
    full = Tracked(["simulate", str(config), "--set", f'runs_dir="{tmp_path / "full"}"'], tmp_path / "full.log")
    assert full.wait(600) == 0, full.output()[-3000:]
    assert not full.leftovers(), f"processes left running after the uninterrupted run: {full.leftovers()}"
    expected_folder = only_run(tmp_path / "full")
    expected = results(expected_folder)
    assert [row["verdict"] for row in expected["customers"]] == ["accepted"] * 4
    print(f"uninterrupted run: {time.monotonic() - start:.0f} s")

    # 2. the same run, killed in the middle of round 2: while the merged tutor's checkpoint is written
    env, marker = pausing_env(tmp_path, "tutor_round2.pt")
    killed = Tracked(["simulate", str(config), "--set", f'runs_dir="{tmp_path / "killed"}"'], tmp_path / "killed.log", env)
    killed.kill_when_paused(marker)
    folder = only_run(tmp_path / "killed")
    checkpoints = folder / "checkpoints"
    assert read_state(folder)["last_round"] == 1, "killed too late: round 2 had completed"
    assert not (checkpoints / "tutor_round2.pt").exists() and list(checkpoints.glob(".tutor_round2.pt.*.tmp"))
    assert not (folder / "summary.json").exists()
    rows = read_jsonl(folder / "metrics.jsonl")
    assert any(r.get("event") == "round_started" and r["round"] == 2 for r in rows)
    with open(folder / "metrics.jsonl", "a") as f:  # and a torn last line, as a kill in mid-append leaves
        f.write('{"time": 1.0, "event": "customer", "round": 2, "partition_id": 0, "gain": 0.')
    print(f"killed in round 2: {time.monotonic() - start:.0f} s")

    # 3. resumed, and killed while it writes the state file that closes round 2: everything else of
    # round 2 is on disk, the state still says round 1, so the next resume runs round 2 again
    env, marker = pausing_env(tmp_path, "state.json", '"last_round": 2')
    resumed = Tracked(["resume", str(folder)], tmp_path / "resume1.log", env)
    resumed.kill_when_paused(marker)
    assert "resuming" in resumed.output() and "after round 1 of 2" in resumed.output()
    assert "2 of 2 customers with a deployed edge model found" in resumed.output()  # new node ids: asked who they are
    assert read_state(folder)["last_round"] == 1 and list(folder.glob(".state.json.*.tmp"))
    assert (checkpoints / "tutor_round2.pt").is_file() and sorted(p.name for p in (folder / "round2").iterdir()) == \
        ["customer0.json", "customer1.json"]
    print(f"killed during the state write: {time.monotonic() - start:.0f} s")

    # 4. resumed, and killed after the last round: state.json says 2 of 2, summary.json is being written
    env, marker = pausing_env(tmp_path, "summary.json")
    resumed = Tracked(["resume", str(folder)], tmp_path / "resume2.log", env)
    resumed.kill_when_paused(marker)
    assert read_state(folder)["last_round"] == 2 and not (folder / "summary.json").exists()
    print(f"killed after the last round: {time.monotonic() - start:.0f} s")

    # 5. the last resume writes the summary; the results are the uninterrupted run's
    resumed = Tracked(["resume", str(folder)], tmp_path / "resume3.log")
    assert resumed.wait(600) == 0, resumed.output()[-3000:]
    assert not resumed.leftovers(), f"processes left running after resume: {resumed.leftovers()}"
    assert "all 2 rounds were complete; summary written" in resumed.output()
    got = results(folder)
    assert got["customers"] == expected["customers"]
    assert got["rounds"] == expected["rounds"] and got["summary_rounds"] == expected["summary_rounds"]
    assert got["details"] == expected["details"]
    for name in ("tutor_round1", "tutor_round2", "edge_customer0", "edge_customer1", "edge_customer0_round2"):
        mine, theirs = weights(checkpoints / f"{name}.pt"), weights(expected_folder / "checkpoints" / f"{name}.pt")
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name
    assert not list(folder.rglob("*.tmp")), "a torn temporary file was left in the run folder"
    rows = read_jsonl(folder / "metrics.jsonl")  # every line whole again, each round's rows once
    assert (folder / "metrics.jsonl").read_text().endswith("}\n")
    assert [r["round"] for r in rows if r.get("event") == "round"] == [1, 2]
    assert sorted(r["round"] for r in rows if r.get("event") == "customer") == [1, 1, 2, 2]
    assert read_state(folder)["last_round"] == 2

    again = subprocess.run([sys.executable, "-m", "experiments.cli", "resume", str(folder)], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already finished" in again.stdout, again.stdout + again.stderr
    print(f"total: {time.monotonic() - start:.0f} s")


# ---------------------------------------------------------------------------------- fast tests

def test_a_torn_last_metrics_line_is_never_read_as_a_row(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"round": 1, "gain": 0.25})
    append_jsonl(path, {"round": 2, "gain": 0.5})
    with open(path, "ab") as f:  # cut inside a character, too
        f.write('{"round": 3, "name": "caf\u00e9'.encode()[:-1])
    with pytest.warns(UserWarning, match="torn last line 3"):
        assert read_jsonl(path) == [{"round": 1, "gain": 0.25}, {"round": 2, "gain": 0.5}]
    with open(path, "a") as f:  # a bad line before the last is not a crash's doing: an error
        f.write('\n{"round": 4}\n')
    with pytest.raises(ValueError, match="line 3 is not valid JSON"):
        read_jsonl(path)


def test_resume_refuses_a_folder_that_is_not_a_federation_run(tmp_path, capsys):
    assert cli_main(["resume", str(tmp_path)]) == 2
    assert f"{tmp_path / 'config.json'} does not exist" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"name": "federation", "simula')  # torn
    assert cli_main(["resume", str(tmp_path)]) == 2
    assert f"{tmp_path / 'config.json'} is not valid JSON" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"name": "edge", "train": {"epochs": 3}}')  # a training run's
    assert cli_main(["resume", str(tmp_path)]) == 2
    assert "is not the config of a federation run" in capsys.readouterr().err
    assert cli_main(["resume", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # a paper run's config.json: its seeds must be those its manufacturer seed gives, its keys the config's
    (tmp_path / "config.json").write_text('{"experiment": "exp1", "seed": 3, "seeds": [5, 2], "pipeline": {}}')
    assert cli_main(["resume", str(tmp_path)]) == 2
    assert "seeds [5, 2]: must be distinct customer seeds, each >= the manufacturer's seed 3" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"experiment": "exp1", "seeds": [0], "pipeline": {"alhpa": 1}}')
    assert cli_main(["resume", str(tmp_path)]) == 2
    assert f"{tmp_path / 'config.json'}:" in (err := capsys.readouterr().err) and "alhpa" in err


def test_clearing_the_interrupted_round_keeps_exactly_the_completed_rounds(tmp_path):
    """Round 1 complete (tutor changed, customer 0's edge deployed), round 2 interrupted after
    customer 1's edge was saved and customer 0's latest edge overwritten."""
    state = {"format": "diredi-sim-federation-state/1", "last_round": 1, "tutor_round": 1, "edges": {"0": 1},
             "summary_rows": [{"round": 1, "partition_id": 0}], "round_reports": [{"round": 1, "replies": 2}]}
    (tmp_path / "state.json").write_text(json.dumps(state))
    for r in (1, 2):
        append_jsonl(tmp_path / "metrics.jsonl", {"event": "round_started", "round": r})
        append_jsonl(tmp_path / "metrics.jsonl", {"event": "customer", "round": r, "partition_id": 0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"event": "customer", "round": 2, "parti')
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for name, content in {"tutor_round1": b"tutor 1", "tutor_round2": b"tutor 2", "edge_customer0_round1": b"edge 0 @1",
                          "edge_customer0_round2": b"edge 0 @2", "edge_customer0": b"edge 0 @2",
                          "edge_customer1_round2": b"edge 1 @2", "edge_customer1": b"edge 1 @2"}.items():
        (checkpoints / f"{name}.pt").write_bytes(content)
    (checkpoints / ".tutor_round2.pt.abc123.tmp").write_bytes(b"half")
    for r in (1, 2):
        (tmp_path / f"round{r}").mkdir()
        (tmp_path / f"round{r}" / "customer0.json").write_text("{}")
    (tmp_path / "rounds.json").write_text(json.dumps([{"round": 1}, {"round": 2}]))

    clear_interrupted_round(tmp_path, read_state(tmp_path))
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"event": "round_started", "round": 1},
                                                      {"event": "customer", "round": 1, "partition_id": 0}]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["edge_customer0.pt", "edge_customer0_round1.pt", "tutor_round1.pt"]
    assert (checkpoints / "edge_customer0.pt").read_bytes() == b"edge 0 @1"
    assert sorted(p.name for p in tmp_path.glob("round*")) == ["round1", "rounds.json"]
    assert json.loads((tmp_path / "rounds.json").read_text()) == [{"round": 1, "replies": 2}]
    (checkpoints / "edge_customer0_round1.pt").unlink()  # a state naming a checkpoint that is gone: an error naming it
    with pytest.raises(ValueError, match="edge_customer0_round1.pt does not exist"):
        clear_interrupted_round(tmp_path, read_state(tmp_path))


@pytest.mark.usefixtures("flower_task_identity")
def test_a_restored_strategy_numbers_rounds_on_and_sends_each_customer_its_own_edge(tmp_path):
    """After round 1 (customer 1's edge deployed), a new process: node ids are new, so the strategy
    asks the nodes who they are before the downlink, and customer 1 gets its own edge at once."""
    from diredi_sim.config import DataConfig
    from diredi_sim.population import PopulationConfig
    from diredi_sim.federation_config import SimulationConfig
    from server.engine import EngineConfig, RunConfig
    from diredi_sim.federation import load_model
    from diredi_sim.models import build_detector
    from diredi_sim.settings import PipelineConfig
    from diredi_sim.runs import Run, save_checkpoint
    from flwr.app import ArrayRecord, ConfigRecord
    from server.ledger import STATE_FORMAT
    from test_strategy import TINY, FakeGrid, reply_to, stub_strategy

    config = RunConfig(runs_dir=str(tmp_path / "runs"), data=DataConfig(cache_dir=str(tmp_path / "data"), synthetic=TINY),
                       pipeline=PipelineConfig(eval_batch_size=8),
                       population=PopulationConfig(customers=("exp1", "exp2"), generated=0),
                       simulation=SimulationConfig(num_rounds=3), engine=EngineConfig(server_workers=1))
    torch.manual_seed(0)
    tutor, edge = build_detector("tutor", "cpu"), build_detector("edge", "cpu")
    run = Run.create(config.runs_dir, "restore-test", config)
    mine = {k: torch.full_like(v, 7.0) if v.is_floating_point() else v for k, v in edge.state_dict().items()}
    save_checkpoint(run.checkpoint_path("edge_customer1_round1"), load_model("edge", "cpu", mine), config=config, round=1)
    state = {"format": STATE_FORMAT, "last_round": 1, "tutor_round": None, "edges": {"1": 1},
             "summary_rows": [{"round": 1, "partition_id": 1}], "round_reports": [{"round": 1, "replies": 1}],
             "nodes": {"41": 1, "40": 0}}  # the killed run's nodes, gone: their partitions go to the new nodes
    strategy = stub_strategy(config, run, edge.state_dict())
    assert strategy.restore(state) is None  # the tutor was never changed: the manufacturer's own
    key = "head.classification_head.cls_logits.weight"
    partition_of = {51: 0, 52: 1}
    delta = {k: torch.full_like(v, 0.01) for k, v in tutor.state_dict().items() if k.startswith(("backbone.fpn", "head"))}

    grid = FakeGrid(list(partition_of), partition_of)
    messages = list(strategy.configure_train(1, ArrayRecord(tutor.state_dict()), ConfigRecord({}), grid))  # Flower's round 1
    assert sorted(grid.sent) == [("query.partition", 51), ("query.partition", 52)]
    assert {m.content["config"]["server-round"] for m in messages} == {2}
    sent_edge = {m.metadata.dst_node_id: float(m.content["edge"].to_torch_state_dict()[key].flatten()[0]) for m in messages}
    assert sent_edge[52] == 7.0 and sent_edge[51] != 7.0  # customer 1's own edge; customer 0 has none deployed
    _, metrics = strategy.aggregate_train(1, [reply_to(m, partition_of[m.metadata.dst_node_id], delta, 10) for m in messages])
    assert metrics["replies"] == 2 and metrics["accepted"] == 2
    messages = list(strategy.configure_train(2, ArrayRecord(tutor.state_dict()), ConfigRecord({}), grid))
    assert [kind for kind, _ in grid.sent].count("query.partition") == 2  # every node known now: no more questions
    assert sorted(grid.sent[2:]) == [("evaluate", 51), ("evaluate", 52), ("train.distill_c", 51), ("train.distill_c", 52)]
    assert sorted(p.name for p in (run.folder / "round2").iterdir()) == ["customer0.json", "customer1.json"]
    saved = read_state(run.folder)
    assert saved["last_round"] == 2 and saved["edges"] == {"0": 2, "1": 2} and saved["tutor_round"] == 2
    assert [r["round"] for r in saved["round_reports"]] == [1, 2] and len(saved["summary_rows"]) == 3
    assert [r["round"] for r in json.loads((run.folder / "rounds.json").read_text())] == [1, 2]
