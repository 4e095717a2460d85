# Two commands on a fresh machine: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS ?= -q --disable-pip-version-check

.PHONY: run test lint bench clean

$(VENV)/.runtime: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -e .
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.runtime
	$(PY) -m pip install $(PIP_FLAGS) -e '.[test]'
	touch $@

tests/node/node_modules/.installed: tests/node/package.json tests/node/package-lock.json
	npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
	touch $@

clients/node/node_modules/.installed: clients/node/package.json clients/node/package-lock.json
	npm ci --prefix clients/node --no-audit --no-fund --loglevel=error
	touch $@

run: $(VENV)/.runtime
	DATA_DIR=$${DATA_DIR:-./data} $(VENV)/bin/licensed serve

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint tests/node/node_modules/.installed clients/node/node_modules/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.test
	$(PY) bench/validate.py
	$(PY) bench/latency.py
	$(PY) bench/webhooks.py
	$(PY) bench/reconcile.py
	$(PY) bench/startup.py
	$(PY) bench/replication.py
	$(PY) bench/replication.py --load 4

clean:
	rm -rf $(VENV) tests/node/node_modules clients/node/node_modules
