# Weft: developer entry points. `make help` lists the targets.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# Written after a successful install; the venv is rebuilt only when the agent's dependencies change.
STAMP := $(VENV)/.weft-installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv lint unit test bench clean ansible-venv demo molecule vault

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

# Each directory has its own settings: agent/pyproject.toml, bench/ruff.toml, lab/ruff.toml.
LINTED := agent bench lab

lint: venv ## ruff check and ruff format --check on agent/, bench/ and lab/
	$(VPY) -m ruff check $(LINTED)
	$(VPY) -m ruff format --check $(LINTED)

unit: venv ## The agent's unit tests (agent/tests/unit): no root, no namespaces, under a minute
	$(VPY) -m pytest agent/tests/unit -q -m "not netns and not slow" $(PYTEST_ARGS)

test: venv lint ansible-venv ## Lint, all the agent's tests (unit, netns, slow), the collection's unit tests, molecule (root)
	@if [ "$$(id -u)" != 0 ]; then \
		echo "make test: run as root (the tests build network namespaces): sudo make test" >&2; exit 1; fi
	@echo "$(VPY) -m pytest agent/tests -q $(PYTEST_ARGS)"
	@rc=0; $(VPY) -m pytest agent/tests -q $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests: that is a failure" >&2; fi; \
	exit $$rc
	$(VPY) -m pytest tests/unit -q
	molecule/run.sh

bench: venv ## Print benchmark figures; JSON goes to bench/results/ (as root for the real-agent part)
	$(VPY) bench/run.py $(BENCH_ARGS)

clean: ## Remove the venv, benchmark results and caches
	rm -rf $(VENV) .venv-previous bench/results .pytest_cache .ruff_cache agent/.pytest_cache agent/.ruff_cache
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

# --- Ansible: the collection's tools, the demo, molecule (README.md "Ansible") ---
ANSIBLE_STAMP := $(VENV)/.weft-ansible-installed
# The lab inventory's EC2 API (moto) and vault password, from lab.json (inventories/labenv.py).
LAB_ENV = eval "$$($(VPY) inventories/labenv.py exports)"

$(ANSIBLE_STAMP): requirements-ansible.txt | $(STAMP)
	$(VPY) -m pip install -r requirements-ansible.txt
	touch $@

ansible-venv: $(ANSIBLE_STAMP) ## Install the Ansible tools (requirements-ansible.txt) into .venv

vault: ansible-venv ## Make the lab mesh's secret (inventories/lab/group_vars/all/vault.yml) unless it has one
	$(VPY) inventories/labvault.py ensure

molecule: ansible-venv ## Molecule scenarios on the lab: brings it up, runs them, takes it down (root)
	molecule/run.sh

demo: ## A hybrid cloud on this machine: lab up, site.yml, a container per machine, ping matrix (root)
	@if [ "$$(id -u)" != 0 ]; then echo "make demo: run as root (the lab builds namespaces and containers)" >&2; exit 1; fi
	@# A fresh Debian needs venv support for .venv; the lab installs its own host packages (ssh, nspawn...).
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv python3-pip; }
	$(MAKE) --no-print-directory ansible-venv lab-up
	$(VPY) inventories/labenv.py check
	$(VPY) inventories/labvault.py ensure
	$(LAB_ENV) && PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ansible-playbook -i inventories/lab site.yml
	$(LAB_ENV) && PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ansible-playbook -i inventories/lab playbooks/demo.yml
