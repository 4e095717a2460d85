"""Shared fixtures: a frozen clock, a data dir with test plans, and a live server.

``live`` runs the real WSGI app under a real waitress server on a free port of
127.0.0.1, with the clock frozen so tests can step across paid-through and
grace boundaries.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from support import browser as chromium
from support.clock import FrozenClock
from support.live import Live, Restartable, start_server
from support.plans import TEST_PLANS

from licensed.config import Config
from licensed.server import init_data_dir
from licensed.services import Services, build_services


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data dir holding the test plans and one signing key."""
    path = tmp_path / "data"
    path.mkdir(mode=0o700)
    (path / "plans.toml").write_text(TEST_PLANS, encoding="utf-8")
    return path


@pytest.fixture
def config(data_dir: Path) -> Config:
    return Config(data_dir=data_dir, app_base_url="http://licensed.test")


@pytest.fixture
def services(config: Config, clock: FrozenClock) -> Iterator[Services]:
    init_data_dir(config, int(clock()))
    built = build_services(config, clock)
    yield built
    built.store.close()


@pytest.fixture
def live(services: Services, clock: FrozenClock) -> Iterator[Live]:
    running = start_server(services)
    with requests.Session() as http:
        yield Live(url=running.url, services=services, clock=clock, http=http)
    running.stop()


@pytest.fixture
def restartable(services: Services, clock: FrozenClock) -> Iterator[Restartable]:
    running = start_server(services)
    with requests.Session() as http:
        handle = Restartable(url=running.url, services=services, clock=clock, http=http, running=running)
        yield handle
        handle.stop()


@pytest.fixture(scope="module")
def module_live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """One server for a whole module, for tests that neither move the clock nor
    depend on what other tests stored (bad input, forgeries): each issues its own
    licences. Saves a data dir, a migration and a server per test."""
    data = tmp_path_factory.mktemp("module") / "data"
    data.mkdir(mode=0o700)
    (data / "plans.toml").write_text(TEST_PLANS, encoding="utf-8")
    clock = FrozenClock()
    # Hundreds of requests from one address: the rate limiter has tests of its own.
    config = Config(data_dir=data, app_base_url="http://licensed.test", rate_limit_per_minute=0)
    init_data_dir(config, int(clock()))
    built = build_services(config, clock)
    running = start_server(built)
    with requests.Session() as http:
        yield Live(url=running.url, services=built, clock=clock, http=http)
    running.stop()
    built.store.close()


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the whole test session (Selenium). Skipped, with the reason,
    where it cannot run; with ``REQUIRE_BROWSER=1`` (CI) that fails instead."""
    required = os.environ.get("REQUIRE_BROWSER", "") not in ("", "0")
    why = chromium.why_no_browser()
    if why is not None:
        if required:
            pytest.fail(f"REQUIRE_BROWSER is set, but {why}")
        pytest.skip(why)
    profile = tmp_path_factory.mktemp("chromium") / "profile"
    try:
        driver = chromium.start_browser(profile)
    except Exception as err:
        if required:
            raise
        pytest.skip(f"chromium could not start: {str(err).splitlines()[0]}")
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
