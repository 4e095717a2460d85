"""Shared fixtures: a frozen clock, a data dir with test plans, and a live server.

``live`` runs the real WSGI app under a real waitress server on a free port of
127.0.0.1, with the clock frozen so tests can step across paid-through and
grace boundaries.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import requests
from waitress import wasyncore

import licensed
import licensing
from config import Config
from services import Services
from store import License

T0 = 1_800_000_000  # 2027-01-15T08:00:00Z: a fixed "now" for tests
DAY = 86400

TEST_PLANS = """\
[products.dashcaddy]
name = "DashCaddy"
key_prefix = "DC"

[products.desktop]
name = "Desktop App"
key_prefix = "DT"

[plans.pro-monthly]
product = "dashcaddy"
name = "DashCaddy Pro, monthly"
tier = "PRO"
stripe_price = "price_pro_monthly"
max_machines = 1
features = ["sso", "recipes"]
grace_days = 7

[plans.team-monthly]
product = "dashcaddy"
name = "DashCaddy Team, monthly"
tier = "TEAM"
stripe_price = "price_team_monthly"
max_machines = 3
features = ["sso", "recipes", "swarm"]
grace_days = 7

[plans.basic-monthly]
product = "dashcaddy"
name = "DashCaddy Basic, monthly"
tier = "BASE"
stripe_price = "price_basic_monthly"
max_machines = 1
features = []
grace_days = 3

[plans.pro-year]
product = "dashcaddy"
name = "DashCaddy Pro, one year"
tier = "PRO"
stripe_price = "price_pro_year"
features = ["sso"]
duration_days = 365

[plans.lifetime]
product = "dashcaddy"
name = "DashCaddy Lifetime"
tier = "LIFE"
max_machines = 2
features = ["sso", "recipes", "swarm"]
lifetime = true
public = false

[plans.desktop-pro]
product = "desktop"
name = "Desktop Pro"
tier = "PRO"
stripe_price = "price_desktop_pro"
features = ["export"]
duration_days = 30
"""


class FrozenClock:
    """A clock tests move by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = float(now)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def set(self, now: float) -> None:
        self.now = float(now)


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
    licensed.init_data_dir(config, int(clock()))
    built = licensed.build_services(config, clock)
    yield built
    built.store.close()


def issue_license(
    services: Services, plan: str = "pro-monthly", *, days: int | None = 30, **kwargs: Any
) -> License:
    """Issue a licence straight through the licensing layer (no server needed)."""
    chosen = services.catalog.plans[plan]
    if chosen.lifetime or chosen.duration_days:
        days = kwargs.pop("days_override", None)
    return licensing.issue_license(
        services.store,
        services.ring,
        chosen,
        email=kwargs.pop("email", "buyer@example.com"),
        now=services.now(),
        actor="test",
        days=days,
        **kwargs,
    )


@dataclass
class Live:
    """A running server and handles on its insides."""

    url: str
    services: Services
    clock: FrozenClock
    http: requests.Session

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.http.get(self.url + path, timeout=10, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
        return self.http.post(self.url + path, json=body, timeout=10, **kwargs)

    def issue(self, plan: str = "pro-monthly", *, days: int | None = 30, **kwargs: Any) -> str:
        """Issue a licence straight through the licensing layer; returns its key."""
        lic = self.issue_license(plan, days=days, **kwargs)
        return self.key_of(lic)

    def issue_license(self, plan: str = "pro-monthly", *, days: int | None = 30, **kwargs: Any) -> License:
        return issue_license(self.services, plan, days=days, **kwargs)

    def key_of(self, lic: License | str) -> str:
        services = self.services
        row = services.store.get_license(lic if isinstance(lic, str) else lic.id)
        assert row is not None
        return licensing.license_key(row, services.catalog, services.ring, services.config.app_base_url)

    def license(self, license_id: str) -> License:
        row = self.services.store.get_license(license_id)
        assert row is not None
        return row


@dataclass
class RunningServer:
    """A waitress server looping in a thread until ``stop()``.

    Every socket is closed from the loop's own thread: closing them from
    another would race its ``select()`` (EBADF).
    """

    server: Any
    thread: threading.Thread
    halt: threading.Event
    url: str

    def stop(self) -> None:
        self.halt.set()
        self.thread.join(timeout=10)


def start_server(
    services: Services, port: int = 0, app_class: type[licensed.App] = licensed.App
) -> RunningServer:
    config = replace(services.config, host="127.0.0.1", port=port, threads=8)
    server = licensed.create_server(app_class(services), config)
    halt = threading.Event()

    def loop() -> None:
        try:
            while not halt.is_set():
                server.asyncore.loop(timeout=0.02, map=server._map, count=1)
        finally:
            wasyncore.close_all(server._map)
            server.task_dispatcher.shutdown()

    thread = threading.Thread(target=loop, name="waitress", daemon=True)
    thread.start()
    return RunningServer(server, thread, halt, f"http://127.0.0.1:{server.effective_port}")


@pytest.fixture
def live(services: Services, clock: FrozenClock) -> Iterator[Live]:
    running = start_server(services)
    with requests.Session() as http:
        yield Live(url=running.url, services=services, clock=clock, http=http)
    running.stop()


# --- a server that tests can stop and start again (clients going offline) ---------------


@dataclass
class Restartable(Live):
    """``live`` whose server stops and starts again on the same port and the same data."""

    running: RunningServer | None = None

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.running is not None:
            self.running.stop()
        self.running = None

    def start(self) -> None:
        if self.running is None:
            self.running = start_server(self.services, self.port)


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
    licensed.init_data_dir(config, int(clock()))
    built = licensed.build_services(config, clock)
    running = start_server(built)
    with requests.Session() as http:
        yield Live(url=running.url, services=built, clock=clock, http=http)
    running.stop()
    built.store.close()
