# Two commands on a fresh machine: `make run` and `make test`.
# A first run installs packages for a while: each slow step says what it does first,
# and pip lists what it downloads and installs (PIP_FLAGS=-q to quieten it).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS ?= --disable-pip-version-check

.PHONY: run test lint bench clean

$(VENV)/.runtime: pyproject.toml
	@echo "make: creating the virtualenv $(VENV) with $$(command -v python3)"
	python3 -m venv $(VENV)
	@echo "make: installing licensed and its dependencies into $(VENV) (pip)"
	$(PY) -m pip install $(PIP_FLAGS) -e .
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.runtime
	@echo "make: installing the test tools (pytest, ruff, mypy, localstripe, ...) into $(VENV) (pip)"
	$(PY) -m pip install $(PIP_FLAGS) -e '.[test]'
	touch $@

tests/node/node_modules/.installed: tests/node/package.json tests/node/package-lock.json
	@echo "make: installing the Node packages of the key-verification test (npm ci)"
	npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
	touch $@

clients/node/node_modules/.installed: clients/node/package.json clients/node/package-lock.json
	@echo "make: installing the Node client kit's packages (npm ci)"
	npm ci --prefix clients/node --no-audit --no-fund --loglevel=error
	touch $@

run: $(VENV)/.runtime
	@echo "make: starting licensed on http://127.0.0.1:$${PORT:-3010} with DATA_DIR=$${DATA_DIR:-./data} (Ctrl-C stops it)"
	DATA_DIR=$${DATA_DIR:-./data} $(VENV)/bin/licensed serve

lint: $(VENV)/.test
	@echo "make: lint (ruff check, ruff format --check, mypy)"
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint tests/node/node_modules/.installed clients/node/node_modules/.installed
	@echo "make: the test suite (pytest)"
	$(PY) -m pytest -q

bench: $(VENV)/.test
	$(PY) bench/validate.py
	$(PY) bench/latency.py
	$(PY) bench/webhooks.py
	$(PY) bench/reconcile.py
	$(PY) bench/startup.py
	$(PY) bench/import.py
	$(PY) bench/replication.py
	$(PY) bench/replication.py --load 4

clean:
	rm -rf $(VENV) tests/node/node_modules clients/node/node_modules
