"""The handles every route needs, built once at start-up (or by a test)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import auth
import licensing
from config import Config
from keys import KeyRing
from plans import Catalog
from store import Store


@dataclass
class Services:
    """Everything a handler needs, built once in ``main()`` (or by a test)."""

    config: Config
    store: Store
    ring: KeyRing
    catalog: Catalog
    clock: Callable[[], float] = time.time

    def now(self) -> int:
        return int(self.clock())

    @property
    def licensing(self) -> licensing.Licensing:
        return licensing.Licensing(
            self.store, self.ring, self.catalog, self.config.app_base_url, self.config.lease_ttl_hours
        )

    @functools.cached_property
    def oidc(self) -> auth.OidcVerifier | None:
        """The identity-provider token verifier: one per server, so its key cache is shared."""
        return auth.OidcVerifier.from_config(self.config)
