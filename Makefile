# Two entry points for a fresh user: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: setup test test-slow demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Everything is installed through constraints.txt so torch stays the CPU build 2.13.0.
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/symerge bench text --preset demo

bench: $(STAMP)
	$(PY) benchmarks/merge_speed.py
	$(PY) benchmarks/adapt_cost.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
