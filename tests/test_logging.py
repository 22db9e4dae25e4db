"""Logging: a run folder's log.txt, --log-level / --quiet, the customer's tag on every record a
customer's handler emits, whole progress lines off a terminal, worker processes logging too."""
from __future__ import annotations

import io
import logging
import multiprocessing
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from diredi_sim.logs import FILE_FORMAT, CustomerTag, configure_logging, start_worker
from diredi_sim.runs import Run
from diredi_sim.train import Progress

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = ["--set", "data.synthetic.num_train=16", "--set", "data.synthetic.num_val=8", "--set", "data.synthetic.num_test=8"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "experiments.cli", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


class Records(logging.Handler):
    """Every record that reaches the root logger, tagged as the project's own handlers tag them."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.addFilter(CustomerTag())
        self.setFormatter(logging.Formatter(FILE_FORMAT))
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeHandler(self)


def test_a_quiet_train_run_logs_its_epochs_to_log_txt_and_nothing_to_stderr(tmp_path):
    """`--quiet`: no INFO line on stderr, while the run folder's log.txt holds every epoch's
    line (the INFO records were emitted) with the loss terms under their full names; the
    per-class table still goes to stdout."""
    result = run_cli("train", ROOT / "experiments" / "configs" / "edge.toml", "--quiet", "--set", f'runs_dir="{tmp_path / "runs"}"',
                     "--set", f'data.cache_dir="{tmp_path / "cache"}"', *TINY_DATA, "--set", "train.epochs=2",
                     "--set", "train.batch_size=8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == "", result.stderr
    assert "mAP" in result.stdout and "person" in result.stdout
    (folder,) = (tmp_path / "runs").iterdir()
    lines = (folder / "log.txt").read_text().splitlines()
    for epoch in (1, 2):
        (line,) = [l for l in lines if f"edge epoch {epoch}: step 2/2, loss " in l]
        assert " INFO diredi_sim.train " in line
        assert all(f"task.{term} " in line for term in ("classification", "bbox_regression", "bbox_ctrness")), line
        assert any(f"edge epoch {epoch}: val mAP50 " in l for l in lines)
    assert "trained in" in lines[-1]


@pytest.fixture
def restore_logging():
    """configure_logging changes this process's logging: put it back as it was."""
    from diredi_sim.logs import PACKAGES

    root = logging.getLogger()
    handlers, levels = list(root.handlers), {p: logging.getLogger(p).level for p in PACKAGES}
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    for package, level in levels.items():
        logging.getLogger(package).setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_the_console_shows_the_chosen_level_and_every_subcommand_takes_the_options(capsys):
    from experiments.cli import build_parser

    logger = logging.getLogger("diredi_sim.data.synthetic")
    configure_logging("info", export=False)
    logger.info("shown at INFO")
    logger.debug("hidden at INFO")
    configure_logging("WARNING", export=False)  # --quiet
    logger.info("hidden when quiet")
    logger.warning("a warning stays")
    logging.getLogger("flwr").warning("Flower prints its own")  # not twice
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" ", 1)[1] for line in err] == ["INFO shown at INFO", "WARNING a warning stays"], err

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert len(commands) >= 13
    for name, command in commands.items():
        positional = ["x"] * sum(1 for a in command._actions if not a.option_strings and a.nargs in (None, "+"))
        required = [arg for a in command._actions if a.required and a.option_strings
                    for arg in (a.option_strings[0], a.choices[0] if a.choices else "x")]
        assert parser.parse_args([name, *positional, *required, "--quiet"]).log_level == "WARNING", name
        assert parser.parse_args([name, *positional, *required, "--log-level", "debug"]).log_level == "DEBUG", name
        assert parser.parse_args([name, *positional, *required]).log_level == "INFO", name


@pytest.mark.usefixtures("flower_task_identity")
@pytest.mark.parametrize("method", ["diredi", "fedavg"])
def test_records_emitted_while_a_client_handles_a_message_name_the_customer(method, monkeypatch):
    """The real ClientApp's evaluate handler (DiReDi's, or FedAvg's that the same app dispatches
    to), its evaluation replaced by a stand-in that logs: the record carries "customer 1 (exp2)";
    a record after the handler carries no tag."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from clients import baseline_app, client_app
    from diredi_sim.config import to_flat
    from diredi_sim.population import PopulationConfig
    from diredi_sim.federation_config import FederationConfig

    module = baseline_app if method == "fedavg" else client_app
    worker = logging.getLogger("diredi_sim.federation")

    def evaluate_and_log(config, customer, models):
        worker.warning("evaluating %d model(s)", len(models))
        return {"edge/test_images": 3}

    monkeypatch.setattr(module, "customer_evaluate", evaluate_and_log)
    config = FederationConfig(population=PopulationConfig(customers=("exp1", "exp2"), generated=0))
    records = {"arrays" if method == "fedavg" else "edge": ArrayRecord()}
    content = RecordDict({**records, "config": ConfigRecord({**to_flat(config), "server-round": 1, "method": method})})
    message = Message(content=content, dst_node_id=5, message_type="evaluate")
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(), run_config={})
    with Records() as handler:
        reply = client_app.app(message, context)
        worker.warning("after the handler")
    assert not reply.has_error(), reply.error
    inside, after = [r for r in handler.records if r.name == "diredi_sim.federation"]
    assert inside.customer == "customer 1 (exp2)" and "customer 1 (exp2): evaluating 1 model(s)" in handler.format(inside)
    assert after.customer == "" and "customer" not in handler.format(after)


def test_customer_work_tags_its_lines_wherever_it_runs(caplog):
    """customer_work (called outside any handler here) tags its own records; its first line is
    emitted before any training starts, so the stand-in data stops it right after."""
    from diredi_sim.population import Customer
    from diredi_sim.federation_config import FederationConfig
    from diredi_sim.federation import customer_work
    from diredi_sim.models import build_detector

    class Stop(Exception):
        pass

    class NoData:
        def __getattr__(self, name):
            raise Stop(name)

    customer = Customer(partition_id=2, name="generated-0", classes=("aeroplane", "bus", "chair"))
    caplog.set_level(logging.INFO, logger="diredi_sim")
    with Records() as handler, pytest.raises(Stop):
        customer_work(FederationConfig(), customer, 3, build_detector("tutor", "cpu").state_dict(),
                      build_detector("edge", "cpu").state_dict(), datasets=NoData(), progress=True)
    said = [r for r in handler.records if r.name == "diredi_sim.federation"]
    assert said and all(r.customer == "customer 2 (generated-0)" for r in said)
    assert "RD B (presumed data) and RD A (aeroplane, bus, chair)" in said[0].getMessage()


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_off_a_terminal_logs_whole_lines_and_on_a_terminal_draws_a_bar(caplog):
    terms = {"task.classification": 0.5, "task.bbox_regression": 0.25, "distill.fgd_fg": 1.0}
    pipe, terminal = io.StringIO(), Terminal()
    caplog.set_level(logging.INFO, logger="diredi_sim")
    with Records() as handler:
        bar = Progress(3, "edge epoch 1", stream=pipe, log_every=2)
        for step in (1, 2, 3):
            bar.update(step, 4, terms)
        drawn = Progress(2, "tutor epoch 1", stream=terminal)
        for step in (1, 2):
            drawn.update(step, 4, terms)
    assert pipe.getvalue() == ""  # off a terminal nothing is drawn: the lines go through logging
    lines = [r.getMessage() for r in handler.records if r.name == "diredi_sim.train"]
    assert [l.split(",")[0] for l in lines] == ["edge epoch 1: step 2/3", "edge epoch 1: step 3/3", "tutor epoch 1: step 2/2"]
    assert "loss 1.7500 (task.classification 0.5000, task.bbox_regression 0.2500, distill.fgd_fg 1.0000)" in lines[1]
    drawn_text = terminal.getvalue()
    assert "\x1b[" in drawn_text and "\u2501" in drawn_text  # a rich bar (escape codes, bar glyphs) on the terminal
    assert "tutor epoch 1: step 2/2, loss 1.7500" in drawn_text  # the epoch's last state stays printed above the display
    assert getattr(handler.records[-1], "console", True) is False  # the bar's last state: for the log file, not the console


def test_worker_processes_log_at_the_parents_level_into_the_run_log(tmp_path):
    """The manufacturer's pool initializer: a spawned worker's records go to the run's log.txt."""
    log = tmp_path / "log.txt"
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=start_worker,
                               initargs=("INFO", str(log), "diredi_sim.logs"))
    worker = logging.getLogger("diredi_sim.federation")  # pickled by name: the worker logs to its own
    with pool:
        pool.submit(worker.info, "a line from a worker").result(timeout=120)
        pool.submit(worker.debug, "below the level").result(timeout=60)
        pid = pool.submit(os.getpid).result(timeout=60)
    assert pid != os.getpid()
    text = log.read_text()
    assert f"INFO diredi_sim.federation [{pid}] a line from a worker" in text and "below the level" not in text


def test_a_run_writes_log_txt_until_closed_and_a_reopened_run_appends(tmp_path):
    logger = logging.getLogger("diredi_sim.test")
    run = Run.create(tmp_path, "x", {"seed": 1})
    logger.warning("first")
    run.close()
    logger.warning("not in the file")
    with Run(run.folder).open_log():  # a resumed run
        logger.warning("second")
    logger.warning("not either")
    lines = run.log_path.read_text().splitlines()
    assert [l.rsplit("] ", 1)[1] for l in lines] == ["first", "second"]
