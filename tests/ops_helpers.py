"""A live server with its own settings, for tests of rate limits, CORS, metrics and logs."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import requests
from conftest import FrozenClock, Live, stop_server

import licensed
from services import Services


@contextmanager
def live_with(
    services: Services, clock: FrozenClock, app_class: type[licensed.App] = licensed.App, **settings: Any
) -> Iterator[Live]:
    """The real app (or a subclass) under waitress, with ``settings`` overriding the test config."""
    changed = replace(services, config=replace(services.config, **settings))
    server = licensed.create_server(app_class(changed), replace(changed.config, host="127.0.0.1", port=0))
    thread = threading.Thread(target=server.run, name="waitress", daemon=True)
    thread.start()
    try:
        with requests.Session() as http:
            yield Live(f"http://127.0.0.1:{server.effective_port}", changed, clock, http)
    finally:
        stop_server(server, thread)
