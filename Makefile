# Quick start: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-e2e bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/breakscene run jobs/demo.yaml

# Both tiers: fast unit tests, then the end-to-end tier (real Ray cluster, S3 server, browser).
test: $(STAMP)
	$(PY) -m pytest -q -m "not e2e"
	$(PY) -m pytest -q -m e2e --durations=8

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e"

test-e2e: $(STAMP)
	$(PY) -m pytest -q -m e2e --durations=8

bench: $(STAMP)
	$(PY) -m benchmarks all

clean:
	rm -rf out .pytest_cache
