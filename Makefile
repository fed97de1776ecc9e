# Weft: developer entry points. `make help` lists the targets.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# Written after a successful install; the venv is rebuilt only when the agent's dependencies change.
STAMP := $(VENV)/.weft-installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv lint test bench clean

help: ## List the targets
	@echo "Usage: make TARGET [PYTHON=python3] [PYTEST_ARGS='...'] [BENCH_ARGS='...']"
	@echo
	@grep -E '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{ printf "  %-8s %s\n", $$1, $$2 }'

venv: $(STAMP) ## Create .venv and install the agent (editable) with its test tools

$(STAMP): agent/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install -e './agent[test]'
	touch $@

lint: venv ## ruff check and ruff format --check on agent/
	$(VPY) -m ruff check agent
	$(VPY) -m ruff format --check agent

test: venv lint ## Lint, then run the agent's tests (as root: they build network namespaces)
	@if [ "$$(id -u)" != 0 ]; then \
		echo "make test: run as root (the tests build network namespaces): sudo make test" >&2; exit 1; fi
	@echo "$(VPY) -m pytest agent/tests -q $(PYTEST_ARGS)"
	@rc=0; $(VPY) -m pytest agent/tests -q $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests: that is a failure" >&2; fi; \
	exit $$rc

bench: venv ## Print benchmark figures; JSON goes to bench/results/ (as root for the real-agent part)
	$(VPY) bench/run.py $(BENCH_ARGS)

clean: ## Remove the venv, benchmark results and caches
	rm -rf $(VENV) bench/results .pytest_cache .ruff_cache agent/.pytest_cache agent/.ruff_cache
	find agent bench -type d -name __pycache__ -prune -exec rm -rf {} +

# --- lab: the virtual hybrid cloud (lab/README.md) ---
.PHONY: lab-up lab-down
LAB_STAMP := $(VENV)/.weft-lab-installed

$(LAB_STAMP): lab/requirements.txt | $(STAMP)
	$(VPY) -m pip install -r lab/requirements.txt
	touch $@

lab-up: $(LAB_STAMP) ## Build and start the lab: 5 nspawn machines, routers, NAT, moto EC2 (root)
	$(VPY) lab/weftlab.py up

lab-down: ## Stop the lab and remove all it built but the cached root (root)
	$(if $(wildcard $(VPY)),$(VPY),$(PYTHON)) lab/weftlab.py down
