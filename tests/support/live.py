"""A real waitress server on 127.0.0.1 running the app, with handles on its insides."""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Any

import requests
from waitress import wasyncore

from licensed import licensing
from licensed.app import App
from licensed.server import create_server
from licensed.services import Services
from licensed.store import License
from support.clock import FrozenClock


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


def start_server(services: Services, port: int = 0, app_class: type[App] = App) -> RunningServer:
    config = replace(services.config, host="127.0.0.1", port=port, threads=8)
    server = create_server(app_class(services), config)
    halt = threading.Event()

    def loop() -> None:
        try:
            while not halt.is_set():
                server.asyncore.loop(timeout=0.02, map=server._map, count=1, use_poll=True)
        finally:
            wasyncore.close_all(server._map)
            server.task_dispatcher.shutdown()

    thread = threading.Thread(target=loop, name="waitress", daemon=True)
    thread.start()
    return RunningServer(server, thread, halt, f"http://127.0.0.1:{server.effective_port}")


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
