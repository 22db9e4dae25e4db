"""One overall progress display for a run (issue 18, item 2).

A :class:`Tracker` knows a run's plan: a list of :class:`Unit` (a name, a label to show and a
weight: stages x customers, rounds x customers, methods x seeds; :func:`plan_units` builds the
product of such axes). As units finish it knows done/total, the elapsed time and the ETA: the
elapsed time per finished unit of weight times the weight left (:func:`estimate_eta`).

On a terminal, one live display (rich) for the whole process: every open tracker's bar (the
current unit, done/total, elapsed, ETA) and below them the current epoch's bar
(:func:`open_epoch_bar`: steps, loss, img/s; ``diredi_sim.train.Progress`` draws through it).
Only one display exists at a time; trackers opened while another is open (the manufacturer's
stages inside a paper run, a federation's rounds inside ``compare``) add their bar to it, from
any thread. Log lines written while it is live (ours, Flower's, Ray's) appear above it.

Off a terminal (a pipe, a file, a Ray actor, CI, Jupyter) nothing is drawn and no control
character is written: one whole log line as each unit finishes,
``progress: 3/12 (paper: seed 1, Distill C) done, elapsed 4:05, ETA 12:10``. On a terminal the
same line goes to the run's log file only (``console=False``). A disabled tracker
(``enabled=False``: the ``progress=False`` paths, tests) shows and logs nothing.

Stage events: :class:`diredi_sim.stages.StageRecorder` tells every open tracker when a stage
starts and ends (:func:`notify_stage`); a tracker whose plan has a pending unit of that name
shows it while it runs and finishes it when it ends. Other stages change nothing.

Plain Python and rich; imports neither flwr nor ray.
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.text import Text

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    """One piece of planned work: ``name`` is what finishes it (a stage name), ``label`` what the
    display shows (defaults to the name), ``weight`` its expected share of the time."""

    name: str
    label: str = ""
    weight: float = 1.0

    @property
    def shown(self) -> str:
        return self.label or self.name


def plan_units(*axes: Iterable[str | Unit]) -> list[Unit]:
    """The product of ``axes`` in order (the last varies fastest): each unit is named by the
    last axis, labelled by all of them joined with ", ", weighted by the product of weights.
    ``plan_units(["seed 0", "seed 1"], [Unit("rd_b", "RD B", 2), "verify"])`` is four units."""
    levels = [[a if isinstance(a, Unit) else Unit(a) for a in axis] for axis in axes]
    units = []
    for combination in itertools.product(*levels):
        weight = 1.0
        for part in combination:
            weight *= part.weight
        units.append(Unit(combination[-1].name, ", ".join(part.shown for part in combination), weight))
    return units


def format_duration(seconds: float | None) -> str:
    """``m:ss`` (``h:mm:ss`` from an hour on); ``-:--`` when unknown."""
    if seconds is None:
        return "-:--"
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def estimate_eta(elapsed: float, done_weight: float, total_weight: float) -> float | None:
    """Seconds left: the elapsed time per finished unit of weight times the weight left; None
    before anything finished."""
    if done_weight <= 0:
        return None
    return elapsed / done_weight * max(total_weight - done_weight, 0.0)


# ------------------------------------------------------------------------------ the one display

class _StatusColumn(ProgressColumn):
    """A task's ``status`` field: a string, or a callable asked at each refresh (elapsed time moves);
    one row, cut with an ellipsis on a narrow terminal."""

    def render(self, task: Task) -> Text:
        status = task.fields.get("status", "")
        return Text(status() if callable(status) else str(status), no_wrap=True, overflow="ellipsis")


def _is_terminal(console: Console) -> bool:
    return console.is_terminal and not console.is_dumb_terminal


def build_console(stream=None) -> Console:
    """A console on ``stream`` (default: stderr as it is now), a terminal exactly when the stream
    says it is one (``isatty``): not from FORCE_COLOR, so that CI's logs get no control characters."""
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    try:
        tty = bool(isatty()) if isatty is not None else False
    except ValueError:  # a closed stream
        tty = False
    return Console(file=stream, force_terminal=tty)


class _Display:
    """The process's one live display: started by its first user, stopped by its last."""

    def __init__(self):
        self.lock = threading.RLock()
        self.progress: Progress | None = None
        self.users = 0
        self._rerouted: list[tuple[logging.StreamHandler, object]] = []

    def acquire(self, console: Console) -> Progress | None:
        """The live display (started on ``console`` if none is live), or None off a terminal."""
        with self.lock:
            if self.progress is None:
                if not _is_terminal(console):
                    return None
                stdout_tty = getattr(sys.stdout, "isatty", lambda: False)()
                # stdout goes above the display only when it is a terminal too: a command's results
                # piped to a file must not be moved to stderr
                self.progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), _StatusColumn(),
                                         console=console, refresh_per_second=4, redirect_stdout=stdout_tty, redirect_stderr=True)
                self.progress.start()
                self._reroute_handlers()
            self.users += 1
            return self.progress

    def release(self) -> None:
        with self.lock:
            if self.progress is None:
                return
            self.users -= 1
            if self.users <= 0:
                self._restore_handlers()
                self.progress.stop()
                self.progress, self.users = None, 0

    def _reroute_handlers(self) -> None:
        """Handlers that write to the real stderr/stdout (Flower's holds the stream it found at
        import) write through the display's proxies while it is live, above the bars."""
        originals = {id(sys.__stderr__): sys.stderr, id(sys.__stdout__): sys.stdout}
        loggers = [logging.getLogger()] + [l for l in logging.Logger.manager.loggerDict.values() if isinstance(l, logging.Logger)]
        for each in loggers:
            for handler in each.handlers:
                if type(handler) is not logging.FileHandler and isinstance(handler, logging.StreamHandler):
                    stream = handler.__dict__.get("stream")  # ours follows sys.stderr by itself (a property)
                    if stream is not None and id(stream) in originals and originals[id(stream)] is not stream:
                        self._rerouted.append((handler, stream))
                        handler.stream = originals[id(stream)]

    def _restore_handlers(self) -> None:
        for handler, stream in self._rerouted:
            handler.stream = stream
        self._rerouted = []


_DISPLAY = _Display()
_OPEN: list[Tracker] = []  # open trackers, outermost first (any thread: a ServerApp runs in its own)
_OPEN_LOCK = threading.Lock()


def notify_stage(name: str, finished: bool) -> None:
    """A stage started (``finished`` False) or ended: every open tracker with a pending unit of
    that name shows it, or finishes it."""
    for tracker in _open_trackers():
        if finished:
            tracker.finish(name)
        else:
            tracker.start(name)


def skip_stage(name: str) -> None:
    """A planned stage will not run (its model came from a cache): every open tracker drops its
    pending unit of that name."""
    for tracker in _open_trackers():
        tracker.drop(name)


def _open_trackers() -> list[Tracker]:
    with _OPEN_LOCK:
        return list(_OPEN)


# ------------------------------------------------------------------------------ trackers

class Tracker:
    """The progress of one run's plan (module docstring). Use as a context manager, or call
    :meth:`close`. ``plan``: units, names, or a count (units ``1``..``n``). ``console``: where to
    draw (default: stderr; a terminal only if it is one). ``clock``: seconds (tests pass a fake)."""

    def __init__(self, title: str, plan: Sequence[Unit | str] | int, *, enabled: bool = True, console: Console | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if isinstance(plan, int):
            plan = [Unit(str(i + 1)) for i in range(plan)]
        self.title = title
        self.units = [u if isinstance(u, Unit) else Unit(u) for u in plan]
        self.finished = [False] * len(self.units)
        self.enabled = enabled
        self.clock = clock
        self.started = clock()
        self.current = ""  # what runs now (shown on the bar)
        self.closed = False
        self._lock = threading.Lock()
        self._display: Progress | None = None
        self._task: TaskID | None = None
        if not enabled:
            return
        with _OPEN_LOCK:
            _OPEN.append(self)
        self._display = _DISPLAY.acquire(console or build_console())
        if self._display is not None:
            self._task = self._display.add_task(self._bar_title(), total=self.total_weight, status=self.status)

    # the numbers
    @property
    def total(self) -> int:
        return len(self.units)

    @property
    def done(self) -> int:
        return sum(self.finished)

    @property
    def total_weight(self) -> float:
        return sum(u.weight for u in self.units)

    @property
    def done_weight(self) -> float:
        return sum(u.weight for u, f in zip(self.units, self.finished) if f)

    def elapsed(self) -> float:
        return self.clock() - self.started

    def eta(self) -> float | None:
        return estimate_eta(self.elapsed(), self.done_weight, self.total_weight)

    def status(self) -> str:
        """done/total, elapsed and ETA (the bar's right-hand side)."""
        return f"{self.done}/{self.total} elapsed {format_duration(self.elapsed())} ETA {format_duration(self.eta())}"

    def describe_finished(self, label: str) -> str:
        """The line logged when a unit finishes."""
        return (f"progress: {self.done}/{self.total} ({self.title}: {label}) done, elapsed {format_duration(self.elapsed())}, "
                f"ETA {format_duration(self.eta())}")

    def _bar_title(self) -> str:
        return f"{self.title}: {self.current}" if self.current else self.title

    def _pending(self, name: str | None) -> int | None:
        return next((i for i, (u, f) in enumerate(zip(self.units, self.finished)) if not f and (name is None or u.name == name)), None)

    # the events
    def start(self, name: str | None = None, *, label: str | None = None) -> None:
        """Show what runs now: ``label``, else the pending unit named ``name`` (nothing happens
        when there is none), else the next pending unit."""
        with self._lock:
            if label is None:
                index = self._pending(name)
                if index is None:
                    return
                label = self.units[index].shown
            self.current = label
        self._refresh()

    def finish(self, name: str | None = None, *, label: str | None = None) -> bool:
        """Finish the first pending unit named ``name`` (or the next one when None); ``label``
        replaces its label in the line. Returns False when there was none to finish."""
        with self._lock:
            index = self._pending(name)
            if index is None or self.closed:
                return False
            self.finished[index] = True
            label = label or self.units[index].shown
            line = self.describe_finished(label)
            if self.current == self.units[index].shown:
                self.current = ""
        if self.enabled:
            logger.info(line, extra={"console": self._display is None})
        self._refresh()
        return True

    def drop(self, name: str) -> bool:
        """Take the first pending unit named ``name`` out of the plan (work that turned out not to
        be needed: a model found in the cache). Returns False when there was none."""
        with self._lock:
            index = self._pending(name)
            if index is None:
                return False
            del self.units[index], self.finished[index]
        if self._display is not None and self._task is not None:
            self._display.update(self._task, total=self.total_weight)
        self._refresh()
        return True

    def _refresh(self) -> None:
        if self._display is not None and self._task is not None:
            self._display.update(self._task, description=self._bar_title(), completed=self.done_weight, refresh=True)

    def close(self) -> None:
        """Take the bar off the display; the display stops with its last user, the outermost
        tracker's bar left on the terminal in its final state."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        if not self.enabled:
            return
        with _OPEN_LOCK:
            if self in _OPEN:
                _OPEN.remove(self)
        if self._display is not None:
            if _DISPLAY.users > 1:
                self._display.remove_task(self._task)
            else:
                self._refresh()
            _DISPLAY.release()
            self._display = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------ epoch bars

class EpochBar:
    """One epoch's bar on the live display (steps, and a status line the caller writes)."""

    def __init__(self, display: Progress, desc: str, total: int):
        self.display, self.task = display, display.add_task(desc, total=total, status="")

    def update(self, step: int, status: str) -> None:
        self.display.update(self.task, completed=step, status=status)

    def close(self, line: str | None = None) -> None:
        """Take the bar off; ``line`` (the epoch's last state) stays printed above the display."""
        self.display.remove_task(self.task)
        if line:
            self.display.console.print(Text(line), highlight=False, soft_wrap=True)
        _DISPLAY.release()


def open_epoch_bar(desc: str, total: int, stream=None) -> EpochBar | None:
    """An epoch bar on the live display (started on ``stream``, default stderr, when none is live
    and that is a terminal); None off a terminal."""
    display = _DISPLAY.acquire(build_console(stream))
    return EpochBar(display, desc, total) if display is not None else None


__all__ = ["EpochBar", "Tracker", "Unit", "build_console", "estimate_eta", "format_duration", "notify_stage", "open_epoch_bar",
           "plan_units", "skip_stage"]
