"""Fixtures shared by several test files."""

import pytest


@pytest.fixture()
def flower_task_identity():
    """Flower Messages need a run identity; the simulation engine sets one, unit tests do it here."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
