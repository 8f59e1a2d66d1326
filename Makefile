# Quick start: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-deps test-fast test-e2e bench docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/breakscene run jobs/demo.yaml

# What the tests need outside Python: Debian's headless Chromium and its driver, for the
# report's browser test. Installed with apt-get when missing (root, or sudo); skipped when present.
BROWSER_PKGS := chromium chromium-driver
test-deps:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
	  echo "test-deps: chromium and chromedriver present"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "test-deps: no apt-get here: install Chromium and its chromedriver (Debian: $(BROWSER_PKGS)), then rerun" >&2; \
	  exit 1; \
	else \
	  sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "test-deps: installing $(BROWSER_PKGS) with apt-get (the report's browser test)"; \
	  $$sudo apt-get update -qq && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BROWSER_PKGS) >/dev/null; \
	fi

# Both tiers: fast unit tests, then the end-to-end tier (real Ray cluster, S3 server, browser).
test: $(STAMP) test-deps
	$(PY) -m pytest -q -m "not e2e"
	$(PY) -m pytest -q -m e2e --durations=8

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e"

test-e2e: $(STAMP) test-deps
	$(PY) -m pytest -q -m e2e --durations=8

bench: $(STAMP)
	$(PY) -m benchmarks all

# docs/cli.md and docs/job-files.md, generated from the parser and the job models
# (tests/test_docs.py fails when they differ from what this writes).
docs: $(STAMP)
	$(PY) -m commands.reference

clean:
	rm -rf out .pytest_cache
