# make demo: a local spot cluster on this machine, end to end, then its report.
# make test: the full test suite. Both create .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_HOME := $(CURDIR)/.demo

.PHONY: venv demo test test-slow clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch's CPU build first: resolved later as a bare dependency it would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	rm -rf $(DEMO_HOME)
	SPOTRAIN_HOME=$(DEMO_HOME) $(VENV)/bin/spotrain launch examples/local.yaml --duration 150
	SPOTRAIN_HOME=$(DEMO_HOME) $(PY) examples/check_demo.py

test: venv
	$(PY) -m pytest -q -m "not slow"

test-slow: venv
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) $(DEMO_HOME) build dist *.egg-info
