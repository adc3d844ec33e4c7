# Two commands matter (see README): `make demo` and `make test`. Both create .venv on first use.
# The install stamp depends on setup.py, so a .venv made before a dependency change is brought up to date.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.nl_plugin-installed

.PHONY: install demo test lint bench clean-demo

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
	$(VENV)/bin/ruff check nl_plugin scripts tests

bench: $(STAMP)
	$(PY) scripts/benchmark.py

clean-demo:
	rm -rf experiments/demo_* results/demo_* demo_out
