# Two commands: `make demo` and `make test`. Both create the environment when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.installed

# No outbound traffic: Flower's telemetry, update check and runtime installs, Ray's usage stats.
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test env clean-env

env: $(STAMP)

# uv installs the registry's matching torch/torchvision pair; plain pip would pick up the
# machine's CPU-only torch wheel, against which the registry's torchvision fails to import.
$(STAMP): setup.cfg pyproject.toml requirements.lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv
	VIRTUAL_ENV=$(VENV) $(UV) pip install --quiet --python $(PY) -r requirements.lock.txt -e '.[dev]'
	$(PY) -c "import torch, torchvision; from torchvision.ops import nms; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/diredi-sim demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-env:
	rm -rf $(VENV)
