# The two newcomer commands: `make run` (the demo on the embedded volume) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INPUT ?= 1 2 3

.PHONY: setup system run lint test faults ui clean

setup: system $(VENV)/.installed

system:
	@scripts/install-system-deps.sh

# juicecache itself goes in editable, so the examples import it and `.venv/bin/juicecache`
# exists (PYTHONWARNINGS silences setuptools' generic note about editable installs).
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	PYTHONWARNINGS=ignore::UserWarning $(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# Mount the embedded volume (the demo still runs, on a local folder, if mounting fails).
run: setup
	-./start_juice.sh
	$(PY) main.py -input $(INPUT)

lint: setup
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest

# The fault-injection suite alone (it is part of `make test` too).
faults: setup
	$(PY) -m pytest -m faults

ui: setup
	$(PY) main.py ui

clean:
	-./stop_juice.sh
	rm -rf .juicecache
