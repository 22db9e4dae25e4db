"""Logging for every process of a run: the command line's, the manufacturer's worker processes and
the customers' Ray actors. Each module logs to ``logging.getLogger(__name__)``; this module
decides where those records go.

- :func:`configure_logging` (the command line, ``--log-level`` / ``--quiet``): one handler on
  the root logger writing to stderr at that level. Flower's own records (logger ``flwr``) are left
  to Flower's console handler, so they are not printed twice. The level is exported in
  ``DIREDI_SIM_LOG_LEVEL``, which the Ray actors the process starts inherit.
- :func:`attach_log_file`: a run folder's ``log.txt`` (``diredi_sim.runs.Run``), fed by every
  logger, Flower's included, at INFO (or DEBUG with ``--log-level DEBUG``) whatever the console
  shows.
- :func:`customer_tag`: while a customer's message is handled, every record carries
  ``customer <partition-id> (<name>)`` (the ``customer`` attribute, and the message's prefix in
  this module's formats); :class:`CustomerTag` is the filter that adds it.
- :func:`start_worker`: the initializer of the manufacturer's worker processes (a spawned
  process starts with no logging set up): the parent's level and log file.

This module imports neither flwr nor ray.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LEVEL_ENV = "DIREDI_SIM_LOG_LEVEL"
# The packages whose loggers this project owns; their level is set here, the root logger's is not.
PACKAGES = ("diredi_sim", "experiments", "server", "clients")
CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(customer_prefix)s%(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(customer_prefix)s%(message)s"
DATE_FORMAT = "%H:%M:%S"

_customer: contextvars.ContextVar[str] = contextvars.ContextVar("diredi_sim_customer", default="")
_state = {"level": None, "file_level": logging.INFO}  # the log files: INFO, DEBUG when the console is at DEBUG


class CustomerTag(logging.Filter):
    """Adds ``record.customer`` ("customer 0 (exp1)", or "" outside a customer's work) and
    ``record.customer_prefix`` ("customer 0 (exp1): " or "") to every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "customer", ""):
            record.customer = _customer.get()
        record.customer_prefix = f"{record.customer}: " if record.customer else ""
        return True


class _ConsoleOnly(logging.Filter):
    """Keeps Flower's records off our console handler (Flower prints them itself) and records
    marked ``console=False`` (shown on the terminal another way: a progress bar, a result on stdout)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "flwr" or record.name.startswith("flwr.")) and getattr(record, "console", True)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest and Ray replace it)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ sets it; the property follows sys.stderr instead
        pass


def format_customer(partition_id: int, name: str) -> str:
    return f"customer {partition_id} ({name})"


@contextmanager
def customer_tag(partition_id: int, name: str) -> Iterator[str]:
    """Every record emitted in this block (in this thread or task) is tagged with the customer."""
    token = _customer.set(format_customer(partition_id, name))
    try:
        yield _customer.get()
    finally:
        _customer.reset(token)


def parse_level(level: str | int | None) -> int:
    """A level name of :data:`LEVELS` (any case) or number; ValueError for anything else."""
    if level is None:
        return logging.INFO
    if isinstance(level, int):
        return level
    name = str(level).strip().upper()
    if name not in LEVELS:
        raise ValueError(f"log level {level!r}: must be one of {', '.join(LEVELS)}")
    return getattr(logging, name)


def _our_handler() -> logging.Handler | None:
    return next((h for h in logging.getLogger().handlers if getattr(h, "_diredi_sim_console", False)), None)


def configure_logging(level: str | int | None = "INFO", *, export: bool = True) -> int:
    """Records of this project's loggers at ``level`` and above to stderr; the run folders'
    log files get INFO and above (DEBUG at ``DEBUG``) whatever the console shows. Calling it
    again replaces the settings. ``export``: pass the level on to child processes
    (``DIREDI_SIM_LOG_LEVEL``; Ray's actors inherit it), and at WARNING or above also quiet
    Flower's console (``FLWR_LOG_LEVEL``, Flower's own setting, unless the user set it).
    Returns the level."""
    number = parse_level(level)
    root = logging.getLogger()
    handler = _our_handler()
    if handler is None:
        handler = _StderrHandler()
        handler._diredi_sim_console = True
        handler.setFormatter(logging.Formatter(CONSOLE_FORMAT, DATE_FORMAT))
        handler.addFilter(CustomerTag())
        handler.addFilter(_ConsoleOnly())
        root.addHandler(handler)
    handler.setLevel(number)
    file_level = min(number, logging.INFO)
    for package in PACKAGES:
        logging.getLogger(package).setLevel(file_level)
    _state.update(level=number, file_level=file_level)
    for log_file in _file_handlers():
        log_file.setLevel(file_level)
    if export:
        os.environ[LEVEL_ENV] = logging.getLevelName(number)
        if number > logging.INFO:
            os.environ.setdefault("FLWR_LOG_LEVEL", logging.getLevelName(number))
    return number


def ensure_logging() -> None:
    """In a process nobody set logging up in (a Ray actor: no handler on the root logger), the
    setup of the process that started it (``DIREDI_SIM_LOG_LEVEL``, INFO when unset), as
    ``logging.basicConfig`` would; anywhere else, nothing."""
    if _our_handler() is None and not logging.getLogger().handlers:
        configure_logging(os.environ.get(LEVEL_ENV, "INFO"), export=False)


def current_level() -> int:
    """The console level set by :func:`configure_logging` (INFO when it was never called)."""
    return _state["level"] if _state["level"] is not None else logging.INFO


def _file_handlers() -> list[logging.FileHandler]:
    return [h for h in logging.getLogger().handlers if getattr(h, "_diredi_sim_file", False)]


def attach_log_file(path: str | Path) -> logging.FileHandler:
    """Append every record (any logger, Flower's included) at the file level to ``path``."""
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler._diredi_sim_file = True
    handler.setLevel(_state["file_level"])
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    handler.addFilter(CustomerTag())
    logging.getLogger().addHandler(handler)
    return handler


def detach_log_file(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()


def start_worker(level: str | int, log_file: str | None, *modules: str) -> None:
    """A spawned worker process's initializer: logging at the parent's ``level`` to stderr and,
    when given, to the run's ``log_file`` too; then ``modules`` imported (their start-up cost
    paid before the first task)."""
    import importlib

    configure_logging(level, export=False)
    if log_file:
        attach_log_file(log_file)
    for module in modules:
        importlib.import_module(module)


__all__ = ["LEVELS", "CustomerTag", "attach_log_file", "configure_logging", "current_level", "customer_tag",
           "detach_log_file", "ensure_logging", "format_customer", "parse_level", "start_worker"]
