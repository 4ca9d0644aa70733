# The two newcomer commands: `make run` (the demo on the embedded volume) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INPUT ?= 1 2 3

.PHONY: setup system run test ui clean

setup: system $(VENV)/.installed

system:
	@scripts/install-system-deps.sh

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# Mount the embedded volume (the demo still runs, on a local folder, if mounting fails).
run: setup
	-./start_juice.sh
	$(PY) main.py -input $(INPUT)

test: setup
	$(PY) -m pytest

ui: setup
	$(PY) main.py ui

clean:
	-./stop_juice.sh
	rm -rf .juicecache
