"""The Python API (experiments.api) and the tutorial notebook that uses it, executed as a user
would run it: a Jupyter kernel of this interpreter, tiny settings, a real Ray simulation."""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import pytest

from diredi_sim.config import ConfigError
from experiments import api
from experiments.offline import OFFLINE_ENV

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "examples" / "tutorial.ipynb"


def test_overrides_apply_to_a_config_file_and_to_a_loaded_config():
    config = api.load_federation(api.CONFIG_DIR / "demo.toml", {"simulation.num_rounds": 2, "population.generated": 0})
    assert config.simulation.num_rounds == 2 and config.population.generated == 0
    assert api.load_federation(config, {"simulation.num-rounds": 3}).simulation.num_rounds == 3
    assert api.load_federation(config) == config
    with pytest.raises(ConfigError, match="simulation"):
        api.load_federation(config, {"simulation.no_such_key": 1})


def test_paper_settings_from_the_experiment_name_or_a_loaded_config():
    config, pipeline = api.load_paper_job("exp1", overrides={"seed": 4})
    assert config.seed == 4
    again, tuned = api.load_paper_job("exp1", config, {"pipeline.rd.epochs": 1, "preset": "cpu"}, pipeline=pipeline)
    assert again.seed == 4 and tuned.rd.epochs == 1 and tuned.distill_c == pipeline.distill_c
    with pytest.raises(ConfigError, match="no config for experiment"):
        api.load_paper_job("exp9")


def test_load_names_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished run folder"):
        api.load(tmp_path)


def test_load_reads_the_table_each_command_printed(tmp_path):
    """simulate's summary.json customers, paper's table.json rows (mean and std per measure), and
    rows() without pandas from results.csv."""
    import json

    from diredi_sim.tidy import write_results_csv

    simulate, paper = tmp_path / "simulate", tmp_path / "paper"
    simulate.mkdir(), paper.mkdir()
    customers = [{"customer": "exp1", "round": 1, "gain": 0.1}]
    (simulate / "summary.json").write_text(json.dumps({"customers": customers, "rounds": []}))
    (paper / "table.json").write_text(json.dumps({"rows": {"teacher": {"mAP": {"mean": 0.5, "std": None}},
                                                           "tutor": {"mAP": {"mean": 0.4, "std": 0.01}}}}))
    write_results_csv(paper / "results.csv", [{"method": "paper", "seed": 0, "customer": "exp1", "class": "cat",
                                               "metric": "AP", "value": 0.25}])
    assert api.load(simulate).kind == "simulate" and api.load(simulate).summary == customers
    result = api.load(paper)
    assert result.kind == "paper"
    assert result.summary == [{"row": "teacher", "mAP": 0.5, "mAP_std": None}, {"row": "tutor", "mAP": 0.4, "mAP_std": 0.01}]
    assert result.rows() == [{"method": "paper", "seed": 0, "round": None, "customer": "exp1", "partition_id": None,
                              "class": "cat", "metric": "AP", "value": 0.25}]


def test_to_dataframe_names_pandas_when_it_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now raises ImportError
    with pytest.raises(ImportError, match="pip install pandas"):
        api.RunResult(tmp_path, "compare").to_dataframe()


@pytest.mark.slow
def test_the_tutorial_notebook_runs_and_its_run_folder_loads(tmp_path, monkeypatch):
    """The notebook end to end in a fresh kernel (about a minute on 2 cores), its runs and caches
    in tmp_path (its parameters cell, overridden as papermill would); then api.load reads the
    comparison it wrote, and the rows agree with results.csv."""
    nbclient = pytest.importorskip("nbclient", reason="the dev extra (nbclient, nbformat, ipykernel) is not installed")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    for key, value in {**OFFLINE_ENV, "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    notebook = nbformat.read(TUTORIAL, as_version=4)
    assert all(not cell.get("outputs") and cell.get("execution_count") is None
               for cell in notebook.cells if cell.cell_type == "code"), "commit the notebook with its outputs cleared"
    where = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    notebook.cells.insert(where + 1, nbformat.v4.new_code_cell(
        f"RUNS_DIR = {str(tmp_path / 'runs')!r}\nDATA_CACHE = {str(tmp_path / 'data')!r}\n"
        f"MODEL_CACHE = {str(tmp_path / 'manufacturer-cache')!r}"))
    started = time.perf_counter()
    nbclient.NotebookClient(notebook, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    print(f"tutorial notebook: {time.perf_counter() - started:.0f} s")

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the plot cell shows no figure"
    assert any("text/html" in o.get("data", {}) for o in outputs), "no DataFrame shown"

    (folder,) = (tmp_path / "runs").glob("*-tutorial-compare")
    result = api.load(folder)
    assert result.kind == "compare"
    assert " INFO " in (folder / "log.txt").read_text(), "the API sets logging up as the CLI does"
    assert {(e["method"], e["customer"]) for e in result.summary} >= {(m, c) for m in ("diredi", "direct")
                                                                      for c in ("exp1", "exp2", "all")}
    with open(result.results_csv, newline="", encoding="utf-8") as f:
        lines = list(csv.DictReader(f))
    rows = result.rows()
    assert len(rows) == len(lines) > 0
    assert {(r["method"], r["customer"], r["class"], r["metric"]) for r in rows} == \
        {(r["method"], r["customer"], r["class"] or None, r["metric"]) for r in lines}
    assert any(r["metric"] == "AP" and r["class"] for r in rows)
    frame = result.to_dataframe()
    assert len(frame) == len(rows) and list(frame.columns) == list(lines[0])
