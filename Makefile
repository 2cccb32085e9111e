# `make demo`: create .venv, install, run the default attack matrix and write a report.
# `make test`: install if needed, run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedleak-installed
DEV_STAMP := $(VENV)/.fedleak-dev-installed

.PHONY: demo test install clean

install: $(STAMP)

# torch first and pinned: it is the CPU wheel on disk; an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml .ci/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c .ci/constraints.txt -e .
	touch $(STAMP)

# The test tools (flwr with Ray, Ray, jsonschema, playwright) only for `make test`: the demo does without them.
$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c .ci/constraints.txt -e '.[dev,flower,ray]'
	touch $(DEV_STAMP)

demo: $(STAMP)
	$(BIN)/fedleak run configs/quick.toml --out runs/quick --jobs 2
	@echo "report: runs/quick/report.html (also report.md, results.json, results.csv)"

# Two pytest-xdist workers, one torch thread each, for the 2 cores; tests/conftest.py schedules whole modules, so each
# module's shared fixtures run once, and keeps the modules that start servers on one worker.
test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q -n 2

clean:
	rm -rf runs .pytest_cache
