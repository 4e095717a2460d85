# Two commands on a fresh machine: `make run` and `make test`.
# A first run installs packages for a while: each slow step says what it does first,
# and pip lists what it downloads and installs (PIP_FLAGS=-q to quieten it).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS ?= --disable-pip-version-check

.PHONY: run test lint bench clean browser screenshots

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

# The customer pages' browser tests drive Debian's Chromium and its WebDriver. Nothing to do
# when both are installed; otherwise apt-get installs them (as root, or through sudo). Where
# that is impossible the browser tests skip and say why (REQUIRE_BROWSER=1 makes them fail).
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		if ! command -v apt-get >/dev/null; then \
			echo "make: no apt-get here: install Chromium and chromedriver, or the browser tests skip"; \
		else \
			echo "make: installing Chromium and chromedriver for the browser tests (apt-get install chromium chromium-driver, about 120 MB)"; \
			SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
			{ $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
				|| echo "make: Chromium could not be installed: the browser tests skip"; \
		fi; \
	fi

test: lint browser tests/node/node_modules/.installed clients/node/node_modules/.installed
	@echo "make: the test suite (pytest)"
	$(PY) -m pytest -q

# The PNGs README shows: the success and account pages at 1280 and 375 px, taken by the
# browser test on its way through a purchase.
screenshots: $(VENV)/.test browser
	@echo "make: screenshots of the customer pages into docs/screenshots (headless Chromium)"
	LICENSED_SCREENSHOTS=docs/screenshots REQUIRE_BROWSER=1 $(PY) -m pytest -q tests/test_pages_browser.py -k buy

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
