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

.PHONY: demo test env lock clean-env

env: $(STAMP)

# uv installs the registry's matching torch/torchvision pair; plain pip would pick up the
# machine's CPU-only torch wheel, against which the registry's torchvision fails to import.
# requirements.lock.txt pins every package, dev tools included, with its hashes (`make lock`
# rewrites it); the project itself has no hash, so it goes in after, editable and without deps,
# and `uv pip check` fails when setup.cfg asks for something the lock lacks.
$(STAMP): setup.cfg pyproject.toml requirements.lock.txt | $(UV)
	VIRTUAL_ENV=$(VENV) $(UV) pip install --quiet --python $(PY) --require-hashes -r requirements.lock.txt
	VIRTUAL_ENV=$(VENV) $(UV) pip install --quiet --python $(PY) --no-deps -e .
	VIRTUAL_ENV=$(VENV) $(UV) pip check --quiet --python $(PY)
	$(PY) -c "import torch, torchvision; from torchvision.ops import nms; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $(STAMP)

$(UV):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv

demo: $(STAMP)
	$(VENV)/bin/diredi-sim demo

# Two pytest-xdist workers, a test file's tests in one, the slow files first (tests/conftest.py);
# TEST_WORKERS=0 runs them all in this process. The 15 slowest tests are listed at the end.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)

# Re-resolve setup.cfg's dependencies (with the dev extra) for Python 3.11+ on every platform,
# keeping the versions already in the lock unless setup.cfg rules them out.
lock: | $(UV)
	$(UV) pip compile setup.cfg --extra dev --universal --python-version 3.11 --generate-hashes \
		--custom-compile-command 'make lock' --quiet -o requirements.lock.txt

clean-env:
	rm -rf $(VENV)
