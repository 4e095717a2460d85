"""A live server with its own settings, for tests of rate limits, CORS, metrics and logs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import requests

from licensed.app import App
from licensed.services import Services
from support.clock import FrozenClock
from support.live import Live, start_server


@contextmanager
def live_with(
    services: Services, clock: FrozenClock, app_class: type[App] = App, **settings: Any
) -> Iterator[Live]:
    """The real app (or a subclass) under waitress, with ``settings`` overriding the test config."""
    changed = replace(services, config=replace(services.config, **settings))
    running = start_server(changed, app_class=app_class)
    try:
        with requests.Session() as http:
            yield Live(running.url, changed, clock, http)
    finally:
        running.stop()
