# The two newcomer commands: `make run` (the demo on the embedded volume) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INPUT ?= 1 2 3

.PHONY: setup system run stop lint test test-fast faults chaos screenshots ui clean bench bench-quick

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

# Stop what `make run` left running: the background Prefect server, and the volume's mount.
stop:
	-$(PY) main.py server stop
	-./stop_juice.sh

lint: setup
	$(PY) -m ruff check .

# The suite in two parts, both always run: everything but the fault suite on two pytest-xdist
# workers (a module stays on one worker, so its cluster is shared by its tests; most of the
# time is spent waiting on processes), then the fault suite alone, one test at a time: its
# time bounds are measured on a machine that does nothing else.
test: lint
	@status=0; \
	$(PY) -m pytest -m "not faults" -n 2 --dist loadfile || status=1; \
	$(PY) -m pytest -m faults || status=1; \
	exit $$status

# The fast layer alone: no root, FUSE or server (a temporary folder stands for the volume).
test-fast: $(VENV)/.installed
	$(PY) -m pytest tests/unit -q

# Refresh the README's pictures of the Prefect UI (docs/images) from the browser test.
screenshots: setup
	JUICECACHE_SCREENSHOTS=docs/images $(PY) -m pytest tests/test_ui.py

# The fault-injection suite alone (it is part of `make test` too).
faults: setup
	$(PY) -m pytest -m faults

# The chaos soak (tests/test_fleet_faults.py, issue #15): 3 hosts x 4 processes under random faults
# (runs killed, a JuiceFS client killed or frozen, Redis restarted, S3 stopped, a host cut off) for
# CHAOS_SECONDS, 10 minutes by default; `make test` runs a 60 s version of it (every kind of fault still comes once). Needs root.
# Its event log and logs stay in pytest's temporary folder even when it passes (the path is printed).
CHAOS_SECONDS ?= 600
chaos: setup
	CHAOS_SECONDS=$(CHAOS_SECONDS) CHAOS_STRICT=1 $(PY) -m pytest tests/test_fleet_faults.py -k chaos -s -o tmp_path_retention_policy=all

ui: setup
	$(PY) main.py ui

# The benchmark (bench/, not part of `make test`): sets up every backend itself, on loopback,
# and tears it down; writes bench/results.md and bench/results.png. Needs root (FUSE mounts).
$(VENV)/.bench-installed: $(VENV)/.installed bench/requirements.txt
	$(PY) -m pip install -q -r bench/requirements.txt
	touch $@

bench: setup $(VENV)/.bench-installed
	$(PY) -m bench

bench-quick: setup $(VENV)/.bench-installed
	$(PY) -m bench --quick --out .juicecache/bench-quick

clean:
	-./stop_juice.sh
	rm -rf .juicecache
