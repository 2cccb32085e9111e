# `make demo`: create .venv, install, run the default attack matrix and write a report.
# `make test`: install if needed, run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedleak-installed
DEV_STAMP := $(VENV)/.fedleak-dev-installed

.PHONY: demo test install clean

install: $(STAMP)

# torch first and pinned: it is the CPU wheel on disk; an unpinned torch pulls a multi-GB CUDA build. pip compiles
# every installed module on one core; compileall does the same on all of them (a few of torch's test files are
# Python 3.12 syntax: pip skips them silently, compileall says so and exits 1, hence the || true).
COMPILE := $(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true

$(STAMP): pyproject.toml .ci/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile torch==2.13.0
	$(BIN)/python -m pip install --quiet --no-compile -c .ci/constraints.txt -e .
	$(COMPILE)
	touch $(STAMP)

# The test tools (flwr with Ray, Ray, jsonschema, playwright) only for `make test`: the demo does without them.
$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --no-compile -c .ci/constraints.txt -e '.[dev,flower,ray]'
	$(COMPILE)
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
