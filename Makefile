# make demo: a local spot cluster on this machine, end to end, then its report.
# make demo-geo (root): the same on the emulated multi-region cloud, then `down`, checked.
# make demo-geo-swarm (root): SWARM there, every stage's peers spanning both regions, then `down`, checked.
# make test: lint, then the full test suite. Both create .venv when it is missing.
# make fuzz: the property tests with fresh random examples, ROUNDS times (5).
# make lint: ruff, and mypy over the installed package's layout (see TYPECHECK_TREE).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_HOME := $(CURDIR)/.demo
GEO_HOME := $(CURDIR)/.demo-geo
GEO_SWARM_HOME := $(CURDIR)/.demo-geo-swarm
# mypy cannot follow the editable install's import hook, so it reads the package through links laid
# out as pyproject's package-dir installs it (agents/ as spotrain/agents, ...).
TYPECHECK_TREE := build/typecheck
# the folders pyproject's package-dir maps into spotrain (agents/ as spotrain/agents, ...), read from it
MAPPED_DIRS = $(shell $(PY) -c 'import sys; tomllib = __import__("tomllib" if sys.version_info >= (3, 11) else "tomli"); d = tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]["package-dir"]; print(" ".join(v for k, v in d.items() if k != "spotrain"))')

.PHONY: venv demo demo-geo demo-geo-swarm lint test test-slow fuzz clean

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

demo-geo: venv
	@test "$$(id -u)" = 0 || { echo "make demo-geo: needs root (network namespaces, tc, iptables, cgroups)"; exit 2; }
	-test -d $(GEO_HOME) && SPOTRAIN_HOME=$(GEO_HOME) $(VENV)/bin/spotrain down >/dev/null 2>&1
	rm -rf $(GEO_HOME)
	SPOTRAIN_HOME=$(GEO_HOME) $(VENV)/bin/spotrain launch examples/local-geo.yaml --duration 240
	SPOTRAIN_HOME=$(GEO_HOME) $(PY) examples/check_geo_demo.py

demo-geo-swarm: venv
	@test "$$(id -u)" = 0 || { echo "make demo-geo-swarm: needs root (network namespaces, tc, iptables, cgroups)"; exit 2; }
	-test -d $(GEO_SWARM_HOME) && SPOTRAIN_HOME=$(GEO_SWARM_HOME) $(VENV)/bin/spotrain down >/dev/null 2>&1
	rm -rf $(GEO_SWARM_HOME)
	SPOTRAIN_HOME=$(GEO_SWARM_HOME) $(VENV)/bin/spotrain launch examples/local-geo-swarm.yaml --duration 300
	SPOTRAIN_HOME=$(GEO_SWARM_HOME) $(PY) examples/check_geo_swarm_demo.py

lint: venv
	$(PY) -m ruff check .
	rm -rf $(TYPECHECK_TREE) && mkdir -p $(TYPECHECK_TREE)/spotrain
	ln -s $(CURDIR)/spotrain/* $(TYPECHECK_TREE)/spotrain/
	for dir in $(MAPPED_DIRS); do ln -s $(CURDIR)/$$dir $(TYPECHECK_TREE)/spotrain/$$dir; done
	cd $(TYPECHECK_TREE) && $(abspath $(PY)) -m mypy --config-file $(CURDIR)/pyproject.toml \
		--cache-dir $(CURDIR)/.mypy_cache -p spotrain

test: lint
	$(PY) -m pytest -q -m "not slow"

test-slow: venv
	$(PY) -m pytest -q -m slow

# the property tests with fresh random draws (make test repeats the same ones every run), ROUNDS times
ROUNDS ?= 5
fuzz: venv
	for round in $$(seq $(ROUNDS)); do SPOTRAIN_FUZZ=explore $(PY) -m pytest -q -m hypothesis -p no:cacheprovider || exit 1; done

clean:
	rm -rf $(VENV) $(DEMO_HOME) $(GEO_HOME) $(GEO_SWARM_HOME) build dist *.egg-info
