"""Fixtures shared by several test files, and how `make test` spreads the tests over processes.

`make test` runs pytest-xdist (``-n 2 --dist loadfile``), slow files first: a test file's tests
run in one worker, so the session's Flower simulation (``simulated``), which only
test_simulation.py reads, is built once. (``loadgroup`` would group finer, but xdist 3.8 cannot
tag pytest 9's node ids.) Each worker gets an equal share of the cores for torch."""

import os

import pytest


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:  # two torch processes with all cores' threads each slow each other down badly
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(config, items):
    """The end-to-end tests (marked slow) first, in file order, then the rest: xdist hands out
    files in this order, so the long ones start at once and the short ones fill the gaps, instead
    of one worker finishing a long file alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture()
def flower_task_identity():
    """Flower Messages need a run identity; the simulation engine sets one, unit tests do it here."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


@pytest.fixture(scope="session")
def simulated(tmp_path_factory):
    """A real Flower simulation (Ray backend, 2 customers, 1 round) on tiny data: (config, outcome,
    processes left running after it, tmp folder). One per session (per xdist worker): only
    test_simulation.py's tests read it, so `make test`'s loadfile keeps them in one worker."""
    import time

    import torch

    from diredi_sim.config import DataConfig
    from diredi_sim.population import PopulationConfig
    from diredi_sim.federation_config import SimulationConfig
    from server.engine import EngineConfig, RunConfig
    from diredi_sim.settings import PipelineConfig
    from diredi_sim.verify import VerifyConfig
    from test_simulation import STAGE, TINY, child_processes

    tmp = tmp_path_factory.mktemp("simulation")
    pipeline = PipelineConfig(teacher=STAGE, distill_a=STAGE, distill_b=STAGE, rd=STAGE, distill_c=STAGE, direct=STAGE,
                              cache_dir=str(tmp / "manufacturer-cache"), eval_batch_size=16,
                              verify=VerifyConfig(max_ap_drop=0.05))
    config = RunConfig(name="tiny-federation", runs_dir=str(tmp / "runs"),
                              data=DataConfig(cache_dir=str(tmp / "data"), synthetic=TINY), pipeline=pipeline,
                              population=PopulationConfig(customers=("exp1", "exp2"), generated=0),
                              simulation=SimulationConfig(num_rounds=1, distill_rejected=True),
                              engine=EngineConfig(client_threads=1, num_cpus=2))
    from experiments.simulate import run_simulate

    before = child_processes()
    torch.set_num_threads(1)
    outcome = run_simulate(config)
    deadline = time.monotonic() + 30  # Ray's processes take a moment to exit after ray.shutdown()
    # multiprocessing's resource tracker (started by the first spawn-context pool) lives as long
    # as this interpreter, by design; everything else must be gone.
    while (leftover := {p: c for p, c in child_processes().items() if p not in before and "resource_tracker" not in c}) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    return config, outcome, leftover, tmp
