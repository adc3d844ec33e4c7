# Two commands matter (see README): `make demo` and `make test`. Both create .venv on first use.
# The install stamp depends on setup.py, so a .venv made before a dependency change is brought up to date.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.nl_plugin-installed

.PHONY: install demo test lint bench gpu-check clean-demo

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check nl_plugin scripts tests benchmarks

bench: $(STAMP)
	$(PY) scripts/benchmark.py

# On a machine with a GPU: CUDA tests, CUDA benchmark, NLRN/N3Net training under torchrun and a test run,
# one table at the end (at most 560 s; see README, GPU). GPU_CHECK_ARGS=--smoke runs it on the CPU.
GPU_CHECK_OUT ?= gpu_check_out
gpu-check: $(STAMP)
	PYTHONUNBUFFERED=1 $(PY) scripts/gpu_check.py $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

clean-demo:
	rm -rf experiments/demo_* results/demo_* demo_out
