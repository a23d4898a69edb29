# Every target creates .venv at the repository root when it is missing.
# torch is pinned here (a CPU build); the package itself asks only for a range.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench gpu-check venv docs clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m torchnmf demo

# The suite, every docstring example of the package and the examples of the
# documentation's pages as doctests (testpaths in pyproject.toml).
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# Optional peers for the benchmarks (nmf-torch); a failed install only drops that column.
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]' || echo "optional benchmark peers not installed; their columns are skipped"
	# the original torchnmf, in its own folder so that it never shadows ours (benchmarks/_original.py)
	$(PY) -m pip install -q --no-deps --target $(VENV)/peers/torchnmf-0.3.5 torchnmf==0.3.5 || echo "torchnmf 0.3.5 not installed; bench_deconv leaves its columns empty"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) benchmarks/run.py

# The documentation site: docs/_build/html, warnings are errors, the gallery
# (examples/plot_*.py) runs during the build.
DOCS_STAMP := $(VENV)/.docs-installed

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	rm -rf docs/api/generated
	OMP_NUM_THREADS=2 $(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

# The CUDA tests and a short GPU benchmark table (under five minutes); says so and
# succeeds where there is no CUDA device.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache docs/_build docs/api/generated docs/api/backreferences docs/gallery
