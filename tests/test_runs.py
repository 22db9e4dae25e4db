import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from diredi_sim.models import build_detector
from diredi_sim.runs import (CheckpointError, Run, append_jsonl, atomic_write_json, load_checkpoint, load_detector_weights,
                             read_jsonl, release_memory, save_checkpoint)


def test_checkpoint_round_trip_embeds_config(tmp_path):
    torch.manual_seed(0)
    edge = build_detector("edge", "cpu")
    path = save_checkpoint(tmp_path / "edge.pt", edge, config={"seed": 7}, epoch=3)
    other = build_detector("edge", "cpu")
    payload = load_detector_weights(other, path)
    assert payload["config"] == {"seed": 7} and payload["epoch"] == 3 and payload["role"] == "edge"
    assert payload["spec"]["backbone"] == "mobilenet_v2"
    for (k, a), (_, b) in zip(edge.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "tutor.pt", build_detector("tutor", "cpu"))
    with pytest.raises(CheckpointError, match="does not fit") as info:
        load_detector_weights(build_detector("edge", "cpu"), path)
    assert "tutor.pt" in str(info.value)


def test_truncated_and_foreign_checkpoints_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "edge.pt", build_detector("edge", "cpu"))
    data = path.read_bytes()
    (tmp_path / "torn.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="torn.pt is truncated"):
        load_checkpoint(tmp_path / "torn.pt")
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a diredi-sim checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path):
    target = tmp_path / "result.json"
    atomic_write_json(target, {"v": 1})
    # a writer killed mid-write: the old file stays valid, no partial file takes its place
    code = ("import os\n"
            "from diredi_sim.runs import atomic_write_bytes\n"
            "os.fsync = lambda fd: os.kill(os.getpid(), 9)  # die after writing, before the rename\n"
            f"atomic_write_bytes({str(target)!r}, b'{{\"v\": 2')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert json.loads(target.read_text()) == {"v": 1}


def test_jsonl_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"a": 1})
    append_jsonl(path, {"a": float("nan")})
    with open(path, "a") as f:
        f.write('{"a": 3')
    with pytest.warns(UserWarning, match="torn last line 3"):
        assert read_jsonl(path) == [{"a": 1}, {"a": None}]


def test_run_folder_layout(tmp_path):
    run = Run.create(tmp_path, "x", {"seed": 1})
    run.log({"epoch": 1, "loss": torch.tensor(0.5)})
    written = json.loads((run.folder / "config.json").read_text())
    assert {k: v for k, v in written.items() if k != "environment"} == {"seed": 1}
    assert written["environment"]["versions"]["torch"] == torch.__version__ and written["environment"]["device"] == "cpu"
    assert run.metrics()[0]["loss"] == 0.5 and "time" in run.metrics()[0]
    assert Run.create(tmp_path, "x", {}).folder != run.folder


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_memory_gives_the_freed_heap_back_to_the_system():
    """Tensors freed in the middle of the heap (a survivor every 1000 keeps it from shrinking by
    itself) stay in the process's resident memory until release_memory returns their pages."""
    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    blocks = [torch.ones(512) for _ in range(100_000)]  # 2 KiB each: from the heap, below malloc's mmap threshold
    survivors = blocks[::1000]
    del blocks
    before = resident()
    assert release_memory()
    after = resident()
    assert before - after > 100 * 2**20, (before, after)
    assert len(survivors) == 100 and float(survivors[-1].sum()) == 512.0
