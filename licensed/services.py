"""The handles every route needs, built once at start-up (or by a test)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import Config
from .keys import KeyRing
from .licensing import Licensing
from .oidc import OidcVerifier
from .plans import Catalog, load_catalog
from .store import Store, open_store
from .stripe_api import StripeGateway


@dataclass
class Services:
    """Everything a handler needs: handles only, each built once."""

    config: Config
    store: Store
    ring: KeyRing
    catalog: Catalog
    clock: Callable[[], float] = time.time
    licensing: Licensing = field(init=False)
    oidc: OidcVerifier | None = field(init=False)
    """The identity-provider token verifier: one per server, so its key cache is shared."""

    def __post_init__(self) -> None:
        config = self.config
        self.licensing = Licensing(
            self.store, self.ring, self.catalog, config.app_base_url, config.lease_ttl_hours
        )
        self.oidc = OidcVerifier.from_config(config)

    @functools.cached_property
    def stripe(self) -> StripeGateway | None:
        """The Stripe client, built on first use: the library takes a quarter of a second to
        import, which commands that never call Stripe (``admin``, ``mail flush``) should not pay."""
        if not self.config.stripe_secret_key:
            return None
        return StripeGateway(self.config.stripe_secret_key, self.config.stripe_api_base)

    def now(self) -> int:
        return int(self.clock())


def build_services(config: Config, clock: Callable[[], float] = time.time) -> Services:
    """Open the database (migrating it) and read the keys and plans the config names."""
    return Services(
        config=config,
        store=open_store(config.db_path, int(clock())),
        ring=KeyRing(config.keys_dir),
        catalog=load_catalog(config.plans_path),
        clock=clock,
    )
