"""Serving: the data dir on first start, waitress on a real port, and a clean stop.

waitress runs its main loop on ``poll()``: ``select()`` cannot watch a file
descriptor above 1023, and a client holding a thousand half-sent requests
would crash the server. The connection limit sits well below the process' file
limit (raised to its hard limit at start-up), so accepting never fails for
want of descriptors; idle connections are closed after ``channel_timeout``.

The process keeps to one CPU (``CPU_AFFINITY=one``, :func:`keep_to_cpus`).
Python runs one thread at a time, and a request hands the interpreter lock to
another thread at every system call it makes (SQLite, the signature, the
socket, the log line). With the threads spread over several CPUs, each hand-over
wakes a thread on another CPU, and the server spent more time switching than
answering; on one CPU the thread that released the lock takes it back before
the woken one runs. BENCHMARKS.md measures both.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import time
from typing import Any

from . import accounts, keys, mailer
from .app import App
from .config import Config
from .errors import ConfigError
from .plans import EXAMPLE_PLANS
from .services import Services, build_services
from .store import open_store

log = logging.getLogger("licensed")

WAITRESS_BODY_LIMIT = 16 * 1024 * 1024
"""Waitress' own cap; the routes' limits (smaller) answer 413 in JSON first."""
CONNECTION_LIMIT = 4000
CHANNEL_TIMEOUT = 30
FILES_PER_SERVER = 200
"""Descriptors kept free of connections: the database (per thread), logs, SMTP, Stripe."""


def init_data_dir(config: Config, now: int) -> list[str]:
    """Create what a first start needs; never overwrites anything. Returns what it did."""
    done = []
    if not config.data_dir.exists():
        config.data_dir.mkdir(mode=0o700, parents=True)
        done.append(f"created {config.data_dir}")
    elif config.data_dir.stat().st_mode & 0o077:
        # Signing keys and the database live here: nobody else may even list it.
        config.data_dir.chmod(0o700)
        done.append(f"made {config.data_dir} private (0700)")
    if not any(config.keys_dir.glob(f"*{keys.KEY_SUFFIX}")):
        _refuse_new_key_over_sold_keys(config, now)
        key = keys.create_key(config.keys_dir)
        done.append(f"created signing key {key.kid}")
    if not config.plans_path.exists():
        config.plans_path.parent.mkdir(parents=True, exist_ok=True)
        config.plans_path.write_text(EXAMPLE_PLANS, encoding="utf-8")
        done.append(f"wrote example plans to {config.plans_path}")
    done += accounts.ensure_secret(config.data_dir)
    done += mailer.write_default_templates(config.data_dir)
    store = open_store(config.db_path, now)
    store.close()
    return done


def _refuse_new_key_over_sold_keys(config: Config, now: int) -> None:
    """A database restored without its signing keys must not get a fresh key instead:
    every key sold would then answer ``INVALID_KEY`` and new ones would be signed by a
    key the old clients do not know. Stop and say which keys to import."""
    if not config.db_path.exists():
        return
    store = open_store(config.db_path, now)
    try:
        needed = store.kids_in_use(now)
    finally:
        store.close()
    if needed:
        raise ConfigError(
            f"{config.keys_dir} holds no signing key, but the database holds licenses signed by "
            f"{', '.join(sorted(needed))}: import them with `licensed keys import PATH` (refusing to "
            "create a new key, which would leave every key sold invalid)"
        )


def missing_signers(services: Services) -> list[str]:
    """Kids that signed unexpired license keys but are not in the key ring."""
    have = {key.kid for key in services.ring.keys}
    return sorted(services.store.kids_in_use(services.now()) - have)


def cpus_to_keep(setting: str, allowed: set[int]) -> set[int] | None:
    """The CPUs ``CPU_AFFINITY`` keeps the server to, among those it may use (None: all).

    ``one`` is the last of them, the same on every start; a number is that CPU,
    which must be one the process may use.
    """
    if setting == "all" or not allowed:
        return None
    if setting == "one":
        return {max(allowed)}
    if int(setting) not in allowed:
        may = ", ".join(str(cpu) for cpu in sorted(allowed))
        raise ConfigError(f"CPU_AFFINITY: CPU {setting} is not one this process may use ({may})")
    return {int(setting)}


def keep_to_cpus(setting: str) -> None:
    """Apply ``CPU_AFFINITY`` to this thread and so to every thread started after it.

    Where the system refuses (a seccomp filter without ``sched_setaffinity``),
    the server runs on as before and says so.
    """
    if not hasattr(os, "sched_setaffinity"):
        return
    allowed = os.sched_getaffinity(0)
    chosen = cpus_to_keep(setting, allowed)
    if chosen is None or chosen == allowed:
        return
    try:
        os.sched_setaffinity(0, chosen)
    except OSError as err:
        log.warning("cannot keep to one CPU; threads run on all", extra={"error": str(err)})


def running_on() -> list[int] | None:
    """The CPUs this process may run on, where the system says."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def connection_limit() -> int:
    """As many connections as the file limit allows (raised to its hard limit), at most
    :data:`CONNECTION_LIMIT`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = CONNECTION_LIMIT + FILES_PER_SERVER
        target = wanted if hard == resource.RLIM_INFINITY else min(hard, max(soft, wanted))
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return max(16, min(CONNECTION_LIMIT, soft - FILES_PER_SERVER))


def create_server(app: App, config: Config) -> Any:
    import waitress.server

    from . import quiet_channel

    sockets: dict[Any, Any] = {}
    server = waitress.server.create_server(
        app,
        map=sockets,
        host=config.host,
        port=config.port,
        threads=config.threads,
        ident="licensed",
        asyncore_use_poll=True,
        connection_limit=connection_limit(),
        channel_timeout=CHANNEL_TIMEOUT,
        max_request_body_size=WAITRESS_BODY_LIMIT,
        # The app weighs X-Forwarded-For against TRUSTED_PROXIES itself; waitress 3
        # would otherwise strip the header before the app sees it.
        clear_untrusted_proxy_headers=False,
    )
    quiet_channel.install(sockets)
    return server


def _stop_on_signal(signum: int, frame: Any) -> None:
    """SIGTERM (systemd's stop) ends the server like Ctrl-C: the loop unwinds, threads stop."""
    raise KeyboardInterrupt


def serve(config: Config) -> None:
    keep_to_cpus(config.cpu_affinity)
    for line in init_data_dir(config, int(time.time())):
        log.info(line)
    services = build_services(config)
    missing = missing_signers(services)
    if missing:
        log.warning(
            "signing keys missing: license keys they signed answer INVALID_KEY until "
            "`licensed keys import` brings them back",
            extra={"kids": missing},
        )
    server = create_server(App(services), config)
    log.info(
        "listening",
        extra={
            "url": f"http://{config.host}:{server.effective_port}",
            "port": int(server.effective_port),
            "cpus": running_on(),
        },
    )
    sender = mailer.MailSender(services).start() if config.smtp_url else None
    signal.signal(signal.SIGTERM, _stop_on_signal)
    try:
        server.run()  # returns on SIGTERM or Ctrl-C: waitress stops on KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    finally:
        log.info("stopping")
        server.close()
        if sender is not None:
            sender.stop()
        services.store.close()
