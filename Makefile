# The two commands a newcomer runs: `make demo` and `make test` (both need root).
PYTHON ?= python3
VENV := .venv
FABULA := $(VENV)/bin/fabula
# sslyze checks the load balancer's TLS in the tests; it pins cryptography<47 (fabula pins 50),
# so it lives in a virtualenv of its own
SSLYZE_VENV := .venv-sslyze
SSLYZE_VERSION := 6.3.1

.PHONY: setup packages venv demo test unit e2e bench destroy-demo clean

setup: packages venv $(SSLYZE_VENV)/.installed

packages:
	bash scripts/install-packages.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

$(SSLYZE_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(SSLYZE_VENV)
	$(SSLYZE_VENV)/bin/pip install -q sslyze==$(SSLYZE_VERSION)
	touch $@

demo: setup
	cd examples/polls && ../../$(FABULA) create testing

destroy-demo: venv
	cd examples/polls && ../../$(FABULA) destroy testing --yes

test: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy src/fabula
	FABULA_SSLYZE=$(CURDIR)/$(SSLYZE_VENV)/bin/sslyze $(VENV)/bin/pytest -v --durations=30

unit: venv
	$(VENV)/bin/pytest -v tests/unit

e2e: setup
	FABULA_SSLYZE=$(CURDIR)/$(SSLYZE_VENV)/bin/sslyze $(VENV)/bin/pytest -v tests/e2e

bench: setup
	$(VENV)/bin/python bench/create.py

clean:
	rm -rf $(VENV) $(SSLYZE_VENV) build src/*.egg-info
