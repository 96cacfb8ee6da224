PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install test demo lint bench bench-setup clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0 -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
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

# Every benchmark prints its figures and the ratio against open_clip measured in the same process.
bench: $(BENCH_STAMP)
	@for script in bench/bench_*.py; do echo "== $$script"; $(BENCH_PY) $$script || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) build dist .pytest_cache
