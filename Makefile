PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install test demo docs lint bench bench-setup clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0 -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/clipforge demo

BENCH_VENV := bench/.venv-openclip
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed

# open_clip 3.3.0 in its own venv, beside the same CPU torch, for side-by-side benchmarks.
$(BENCH_STAMP): pyproject.toml constraints.txt
	test -x $(BENCH_PY) || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q -c constraints.txt torch==2.13.0 open-clip-torch==3.3.0 -e .
	touch $(BENCH_STAMP)

bench-setup: $(BENCH_STAMP)

# Runs every benchmark (each prints its figures and the ratio against open_clip measured in the same process)
# and writes bench/results.json and bench/results.md: about 45 minutes on a 2-core CPU, 16 of them the Flickr8k
# training recipe. BENCH_ARGS passes options to bench/run_all.py, e.g. `make bench BENCH_ARGS=--skip-recipe`.
BENCH_ARGS ?=
bench: $(STAMP) $(BENCH_STAMP)
	$(BENCH_PY) bench/run_all.py --main-python $(PY) $(BENCH_ARGS)

# The CLI reference page comes from the parsers' --help texts (tests/test_docs.py fails when it is stale).
docs: $(STAMP)
	$(PY) -m clipforge.cli.reference > docs/cli.md

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(VENV) build dist .pytest_cache
