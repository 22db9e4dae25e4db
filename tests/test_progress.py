"""The overall progress display (diredi_sim.progress): a rich live display on a terminal with the
run's bar above the epoch's, whole log lines and no control characters off a terminal, and the
ETA arithmetic on a fake clock."""
import io
import logging
import re

import pytest
import torch
from rich.console import Console
from torch import nn

from diredi_sim import progress
from diredi_sim.progress import Tracker, Unit, estimate_eta, format_duration, plan_units
from diredi_sim.stages import StageRecorder
from diredi_sim.train import train_one_epoch


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def plan():
    """2 seeds x (RD B, weight 2; verification, weight 1)."""
    return plan_units(["seed 0", "seed 1"], [Unit("rd_b", "RD B", 2), Unit("verify", "verification")])


def train_tiny_epoch(desc: str) -> list[int]:
    """A real epoch of a tiny regression through train_one_epoch, its bar on (progress=True);
    returns the live display's users seen at each step."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 1)
    batches = [([torch.randn(3) for _ in range(2)], [{"y": torch.randn(1)} for _ in range(2)]) for _ in range(4)]

    users = []

    def losses(images, targets):
        users.append(progress._DISPLAY.users)
        predicted = layer(torch.stack(images))
        return {"task.mse": ((predicted - torch.stack([t["y"] for t in targets])) ** 2).mean()}

    train_one_epoch(layer, losses, torch.optim.SGD(layer.parameters(), lr=0.1), batches, epoch=1, desc=desc, progress=True)
    return users


def test_plan_units_is_the_product_of_its_axes_with_weights_multiplied():
    units = plan()
    assert [u.name for u in units] == ["rd_b", "verify", "rd_b", "verify"]
    assert [u.shown for u in units] == ["seed 0, RD B", "seed 0, verification", "seed 1, RD B", "seed 1, verification"]
    assert [u.weight for u in units] == [2, 1, 2, 1]
    assert plan_units([Unit("round 1", weight=3)], [Unit("customer", weight=2)])[0].weight == 6


def test_eta_from_the_elapsed_time_per_finished_weight():
    assert estimate_eta(10.0, 2, 4) == pytest.approx(10.0)  # 2 of 4 equal units in 10 s: 10 s left
    assert estimate_eta(30.0, 3, 4) == pytest.approx(10.0)
    assert estimate_eta(5.0, 0, 4) is None  # nothing finished: unknown
    clock = FakeClock()
    with Tracker("paper", plan(), enabled=False, clock=clock) as tracker:
        clock.now += 20.0
        tracker.finish("rd_b")  # weight 2 of 6 in 20 s: 10 s per weight, 4 left
        assert (tracker.done, tracker.total, tracker.eta()) == (1, 4, pytest.approx(40.0))
        clock.now += 10.0
        tracker.finish("verify")  # weight 3 of 6 in 30 s: 30 s left
        assert tracker.eta() == pytest.approx(30.0)
        assert tracker.drop("rd_b")  # the second seed's RD B turns out not to run: weight 3 of 4
        assert (tracker.total, tracker.eta()) == (3, pytest.approx(10.0))
        assert not tracker.finish("rd_b")  # no pending unit of that name any more
    assert format_duration(None) == "-:--" and format_duration(65) == "1:05" and format_duration(3725) == "1:02:05"


def test_on_a_terminal_one_live_display_shows_the_run_bar_with_eta_and_the_epoch_bar_below(caplog):
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=200)
    caplog.set_level(logging.INFO, logger="diredi_sim")
    clock = FakeClock()
    with Tracker("paper exp1", plan(), console=console, clock=clock) as tracker:
        recorder = StageRecorder()
        with recorder.measure("rd_b"):  # the stage events drive the tracker
            assert train_tiny_epoch("tutor1_rd_b") == [2] * 4  # the epoch bar joined the run's display, no second one
            assert progress._DISPLAY.users == 1  # and left it at the epoch's end
            clock.now += 30.0
        with Tracker("manufacturer", ["distill_a"], console=Console(file=io.StringIO(), force_terminal=True)) as inner:
            inner.finish("distill_a")  # a nested tracker draws on the same display, not on its own console
        with recorder.measure("verify"):
            clock.now += 15.0
        assert (tracker.done, tracker.eta()) == (2, pytest.approx(45.0))
    assert progress._DISPLAY.progress is None  # the display stopped with its last user
    drawn = screen.getvalue()
    assert "paper exp1: seed 0, RD B" in drawn  # the current unit on the run's bar
    assert "tutor1_rd_b epoch 1" in drawn and "\u2501" in drawn  # the epoch's bar, drawn by rich
    assert "tutor1_rd_b epoch 1: step 4/4, loss" in drawn  # the epoch's last state stays printed
    assert "manufacturer" in drawn
    assert re.search(r"2/4 elapsed 0:45 ETA 0:45", drawn)  # done/total, elapsed and ETA on the bar
    lines = [r for r in caplog.records if r.name == "diredi_sim.progress"]
    assert [r.getMessage() for r in lines][0] == "progress: 1/4 (paper exp1: seed 0, RD B) done, elapsed 0:30, ETA 1:00"
    assert all(getattr(r, "console", True) is False for r in lines)  # on a terminal: for the log file only


def test_off_a_terminal_one_plain_line_per_finished_unit_and_no_control_characters(caplog):
    pipe = io.StringIO()  # not a tty
    caplog.set_level(logging.INFO, logger="diredi_sim")
    clock = FakeClock()
    with Tracker("paper exp1", plan(), console=Console(file=pipe), clock=clock) as tracker:
        assert progress._DISPLAY.progress is None  # nothing live off a terminal
        for name in ("rd_b", "verify", "rd_b", "verify"):
            tracker.start(name)
            if name == "rd_b":
                train_tiny_epoch("tutor1_rd_b")
            clock.now += 10.0
            tracker.finish(name)
    assert pipe.getvalue() == ""
    logged = caplog.text
    assert "\r" not in logged and "\x1b" not in logged
    lines = [r.getMessage() for r in caplog.records if r.name == "diredi_sim.progress"]
    assert lines == ["progress: 1/4 (paper exp1: seed 0, RD B) done, elapsed 0:10, ETA 0:20",
                     "progress: 2/4 (paper exp1: seed 0, verification) done, elapsed 0:20, ETA 0:20",
                     "progress: 3/4 (paper exp1: seed 1, RD B) done, elapsed 0:30, ETA 0:06",
                     "progress: 4/4 (paper exp1: seed 1, verification) done, elapsed 0:40, ETA 0:00"]
    assert all(getattr(r, "console", True) for r in caplog.records if r.name == "diredi_sim.progress")  # to the console too
    epoch = [r.getMessage() for r in caplog.records if r.name == "diredi_sim.train"]
    assert epoch and epoch[-1].startswith("tutor1_rd_b epoch 1: step 4/4, loss") and "task.mse" in epoch[-1]


def test_a_disabled_tracker_shows_and_logs_nothing(caplog):
    caplog.set_level(logging.INFO, logger="diredi_sim")
    screen = io.StringIO()
    with Tracker("paper", plan(), enabled=False, console=Console(file=screen, force_terminal=True)) as tracker:
        tracker.finish("rd_b")
        with StageRecorder().measure("verify"):  # stage events do not reach a disabled tracker
            pass
        assert tracker.done == 1 and progress._DISPLAY.progress is None
    assert screen.getvalue() == "" and not [r for r in caplog.records if r.name == "diredi_sim.progress"]
