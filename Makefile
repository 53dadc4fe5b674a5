# The two commands a newcomer runs: `make demo` and `make test` (both need root).
PYTHON ?= python3
VENV := .venv
FABULA := $(VENV)/bin/fabula

.PHONY: setup packages venv demo test unit e2e bench destroy-demo clean

setup: packages venv

packages:
	bash scripts/install-packages.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

demo: setup
	cd examples/polls && ../../$(FABULA) create testing

destroy-demo: venv
	cd examples/polls && ../../$(FABULA) destroy testing --yes

test: setup
	$(VENV)/bin/pytest -v

unit: venv
	$(VENV)/bin/pytest -v tests/unit

e2e: setup
	$(VENV)/bin/pytest -v tests/e2e

bench: setup
	$(VENV)/bin/python bench/create.py

clean:
	rm -rf $(VENV) build src/*.egg-info
