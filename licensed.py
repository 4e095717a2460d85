"""licensed: the WSGI application and the ``licensed`` command line.

The app is a routing table of :class:`Route` rows. A request is matched
(404, or 405 with ``Allow``), its body read under a size cap (413), its media
type checked (415), its JSON parsed and checked against the route's schema
(400), then handed to the route's handler. Every :class:`errors.LicensedError`
becomes the spec's error body in :func:`error_response`; anything else is
logged and answered with a generic 500.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import itertools
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson

import admin
import backup
import cors
import keys
import licensing
import mailer
import metrics
import openapi
import ratelimit
import redact
import stripe_sync
import subscriptions
from config import Config
from errors import ConfigError, LicensedError
from keys import KeyRing
from plans import EXAMPLE_PLANS, load_catalog
from services import Services
from store import open_store
from web import Request, Response, Route, Router

__version__ = "0.1.0"

log = logging.getLogger("licensed")
access_log = logging.getLogger("licensed.access")

WAITRESS_BODY_LIMIT = 16 * 1024 * 1024
"""Waitress' own cap; the app's ``MAX_BODY_BYTES`` (smaller) answers 413 in JSON first."""

StartResponse = Callable[..., Any]

# --- responses -----------------------------------------------------------------------


def error_response(err: LicensedError) -> Response:
    """The one place an error becomes ``{"error": {"code", "message"}}``."""
    return Response(
        {"error": {"code": err.code, "message": err.message}},
        status=err.status,
        headers=err.headers(),
    )


JSON_TYPE = "application/json; charset=utf-8"

_REASONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_STATUS_LINES = {status: f"{status} {reason}" for status, reason in _REASONS.items()}


# --- the application ----------------------------------------------------------------

LICENSE_BODY = openapi.obj(
    {
        "key": openapi.string(1, 8192),
        "machine_id": openapi.string(1, 256, pattern=licensing.MACHINE_ID_PATTERN),
        "product": openapi.string(1, 64),
    },
    required=["key"],
)
LICENSE_VIEW: openapi.Schema = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "product": {"type": "string"},
        "plan": {"type": "string"},
        "tier": {"type": "string"},
        "status": {"type": "string"},
        "features": {"type": "array", "items": {"type": "string"}},
        "max_machines": {"type": "integer"},
        "machines_used": {"type": "integer"},
        "paid_through": {"type": ["string", "null"]},
        "expires_at": {"type": ["string", "null"]},
        "lifetime": {"type": "boolean"},
        "cancel_at_period_end": {"type": "boolean"},
    },
}
LICENSE_ANSWER: openapi.Schema = {
    "type": "object",
    "required": ["valid", "code"],
    "properties": {
        "valid": {"type": "boolean"},
        "code": {"type": "string", "enum": list(licensing.ALL_CODES)},
        "activated": {"type": "boolean"},
        "deactivated": {"type": "boolean"},
        "license": LICENSE_VIEW,
        "key": {"type": "string"},
        "lease": {"type": "string"},
    },
}


class App:
    """The WSGI callable."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.config = services.config
        self.licensing = services.licensing
        self.limiter = ratelimit.RateLimiter(self.config.rate_limit_per_minute, services.clock)
        self.cors = cors.Cors(self.config.website_url)
        self.metrics = metrics.REGISTRY
        self.access_log = AccessLog(access_log)
        self.router = Router(self.routes())
        self._openapi = openapi.document(self.router.routes, self.config.app_base_url, __version__)

    def routes(self) -> list[Route]:
        """The routing table: the core routes here, then each route module's rows."""
        return [
            *self.core_routes(),
            *stripe_sync.routes(self.services),
            *subscriptions.routes(self.services),
            *metrics.routes(self.services),
            *admin.routes(self.services),
        ]

    def core_routes(self) -> list[Route]:
        return [
            Route("GET", "/health", self.health, "Liveness and database writability", tag="ops"),
            Route(
                "GET",
                "/api/public/config",
                self.public_config,
                "Public settings for a shop page",
                tag="public",
            ),
            Route("GET", "/api/public/plans", self.public_plans, "Plans on sale", tag="public"),
            Route(
                "POST",
                "/api/license/validate",
                self.validate,
                "Validate a key; activate with a machine id",
                body=LICENSE_BODY,
                response=LICENSE_ANSWER,
            ),
            Route(
                "POST",
                "/api/license/activate",
                self.activate,
                "Activate a machine",
                body={**LICENSE_BODY, "required": ["key", "machine_id"]},
                response=LICENSE_ANSWER,
            ),
            Route(
                "POST",
                "/api/license/deactivate",
                self.deactivate,
                "Free a machine's seat",
                body={**LICENSE_BODY, "required": ["key", "machine_id"]},
                response=LICENSE_ANSWER,
            ),
            Route(
                "GET",
                "/.well-known/jwks.json",
                self.jwks,
                "Public keys that verify keys and leases",
                tag="public",
            ),
            Route("GET", "/openapi.json", self.openapi, "This document", tag="public"),
        ]

    # --- WSGI --------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        started = time.perf_counter()
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "") or "/"
        request_id = _request_id(environ)
        redact.start_request()
        client = environ.get("REMOTE_ADDR") or ""
        forwarded = environ.get("HTTP_X_FORWARDED_FOR")
        if forwarded:
            client = ratelimit.client_address(client, forwarded, self.config.trusted_proxies)
        origin = environ.get("HTTP_ORIGIN")
        route: Route | None = None
        try:
            if self.limiter.enabled and ratelimit.is_limited(path):
                self.limiter.check(client)
            if self.cors.is_preflight(method, path):
                response = self.cors.preflight(path, origin, self.router.methods(path))
            else:
                route, params = self.router.match(method, path)
                request = Request(environ, params, self.config.max_body_bytes)
                if route.guard is not None:
                    route.guard(request)
                if route.body is not None:
                    request.parsed = request.json()
                    redact.remember_body(request.parsed)
                    route.check_body(request.parsed)
                response = route.handler(request)
        except LicensedError as err:
            response = error_response(err)
        except Exception:
            log.error(
                "unhandled error",
                extra={"request_id": request_id, "trace": traceback.format_exc(limit=20)},
            )
            response = error_response(LicensedError())
        status = response.status
        content_type = JSON_TYPE if response.raw is None else response.content_type
        if response.stream is None:
            payload = response.encode()
            headers = [
                ("Content-Type", content_type),
                ("Content-Length", str(len(payload))),
                ("X-Request-Id", request_id),
            ]
        else:
            payload = b""
            headers = [("Content-Type", content_type), ("X-Request-Id", request_id)]
        if response.headers:
            headers += response.headers
        headers += self.cors.headers(path, origin)
        if not response.headers or not any(name == "Cache-Control" for name, _ in response.headers):
            headers.append(("Cache-Control", "no-store"))
        if status == 204:
            headers = [h for h in headers if h[0] not in ("Content-Type", "Content-Length")]
        start_response(_STATUS_LINES.get(status) or f"{status} Unknown", headers)
        elapsed = time.perf_counter() - started
        self.metrics.observe_request(method, route.path if route else None, status, elapsed, response.body)
        self.access_log(request_id, method, path, status, round(elapsed * 1000, 2), client)
        if response.stream is not None:
            return response.stream
        return [payload]

    # --- handlers ---------------------------------------------------------------------

    def health(self, request: Request) -> Response:
        now = self.services.now()
        store = self.services.store
        store.check_writable(now)
        warnings = [w for w in (admin.unmapped_purchases_warning(store),) if w]
        return Response(
            {
                "status": "ok",
                "warnings": warnings,
                "version": __version__,
                "schema_version": self.services.store.schema_version(),
                "time": licensing.iso(now),
                "signing_kid": self.services.ring.current.kid,
                "last_reconcile_at": licensing.iso(
                    _int_or_none(store.get_setting(stripe_sync.LAST_SUCCESS_KEY))
                ),
            }
        )

    def public_config(self, request: Request) -> Response:
        return Response(
            {
                "publishable_key": self.config.stripe_publishable_key,
                "website_url": self.config.website_url,
                "issuer": self.config.app_base_url,
                "jwks_url": f"{self.config.app_base_url}/.well-known/jwks.json",
                "products": [
                    {"id": p.id, "name": p.name, "key_prefix": p.key_prefix}
                    for p in self.services.catalog.products.values()
                ],
            }
        )

    def public_plans(self, request: Request) -> Response:
        plans = [p.public_view() for p in self.services.catalog.plans.values() if p.public]
        return Response({"plans": plans})

    def validate(self, request: Request) -> Response:
        req = licensing.LicenseRequest.from_body(request.parsed, machine_required=False)
        return Response(self.licensing.check(req, self.services.now()))

    def activate(self, request: Request) -> Response:
        req = licensing.LicenseRequest.from_body(request.parsed, machine_required=True)
        return Response(self.licensing.check(req, self.services.now()))

    def deactivate(self, request: Request) -> Response:
        req = licensing.LicenseRequest.from_body(request.parsed, machine_required=True)
        return Response(self.licensing.deactivate(req, self.services.now()))

    def jwks(self, request: Request) -> Response:
        now = self.services.now()
        ttl = self.config.lease_ttl_hours * 3600
        in_use: set[str] | None = None

        def still_needed(key: keys.SigningKey, retired_at: float) -> bool:
            nonlocal in_use
            if retired_at + ttl > now:
                return True
            if in_use is None:
                in_use = self.services.store.kids_in_use(now)
            return key.kid in in_use

        return Response(
            self.services.ring.jwks(still_needed),
            headers=[("Cache-Control", "public, max-age=300")],
        )

    def openapi(self, request: Request) -> Response:
        return Response(self._openapi, headers=[("Cache-Control", "public, max-age=300")])


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_request_numbers = itertools.count(1)
_PROCESS_TAG = os.urandom(4).hex()


def _request_id(environ: dict[str, Any]) -> str:
    """The caller's ``X-Request-Id`` when well-formed, else this process's tag and a counter."""
    given = environ.get("HTTP_X_REQUEST_ID")
    if given and _REQUEST_ID.fullmatch(given):
        return str(given)
    return f"{_PROCESS_TAG}-{next(_request_numbers):x}"


# --- logging --------------------------------------------------------------------------


_MILLISECONDS = tuple(f".{n:03d}+00:00" for n in range(1000))
_ENTRY_HEAD = frozenset({"ts", "level", "logger", "msg"})
"""What :meth:`JsonFormatter.entry` puts before a record's own fields."""


class JsonFormatter(logging.Formatter):
    """One JSON object per line; fields passed with ``extra=`` are included.

    Every line goes through :class:`redact.Redactor` last: keys, tokens,
    secrets and the request's machine id are masked wherever they appear.
    """

    _STANDARD = frozenset(vars(logging.makeLogRecord({})))

    def __init__(self, secrets: Sequence[str] = ()) -> None:
        super().__init__()
        self.redactor = redact.Redactor(secrets)
        self._second = (-1, "")
        self._stamp = (-1, "")

    def timestamp(self, created: float) -> str:
        """ISO 8601 with milliseconds, computed once per millisecond (the part up to
        the second once per second)."""
        milliseconds = int(created * 1000)
        stamp = self._stamp
        if stamp[0] == milliseconds:
            return stamp[1]
        seconds = milliseconds // 1000
        second = self._second
        if second[0] != seconds:
            second = (seconds, dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"))
            self._second = second
        text = second[1] + _MILLISECONDS[milliseconds - seconds * 1000]
        self._stamp = (milliseconds, text)
        return text

    def format(self, record: logging.LogRecord) -> str:
        standard = self._STANDARD
        fields = {
            name: value
            for name, value in vars(record).items()
            if name not in standard and not name.startswith("_")
        }
        if record.exc_info:
            fields["trace"] = self.formatException(record.exc_info)
        entry = self.entry(record.created, record.levelname, record.name, record.getMessage(), fields)
        return self.encode(self.redactor.clean(entry)).decode()

    def entry(
        self, created: float, level: str, logger: str, msg: str, fields: dict[str, Any]
    ) -> dict[str, Any]:
        """One line's object, before redaction: what :meth:`format` makes of a record."""
        return {"ts": self.timestamp(created), "level": level.lower(), "logger": logger, "msg": msg, **fields}

    @staticmethod
    def encode(entry: Any) -> bytes:
        """The entry as one line of UTF-8 JSON (no newline)."""
        try:
            return orjson.dumps(entry, default=str)
        except orjson.JSONEncodeError:
            # orjson refuses keys that are not strings (in a nested field) and text
            # UTF-8 cannot carry (a lone surrogate): the line still goes out, with
            # such keys written as strings and such characters escaped.
            return json.dumps(entry, default=str).encode()


class OncePerInterval(logging.Filter):
    """Lets one record through per ``interval`` seconds (waitress' queue warnings)."""

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.interval = interval
        self._last = -interval
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            if self.suppressed:
                record.suppressed = self.suppressed
            self.suppressed = 0
            return True
        self.suppressed += 1
        return False


class LineHandler(logging.Handler):
    """Writes each formatted record as one line to stderr, without a lock on the request path.

    Formatting (and redaction) runs on the logging thread, where the request's
    context is. Then, by default, the line goes out at once in one ``write(2)``
    (lines up to PIPE_BUF are atomic on a pipe, so no lock is needed).

    With :meth:`buffer` (what ``serve`` uses), lines below WARNING are queued
    and written together every ``interval`` seconds by one thread, as nginx's
    ``access_log … flush=`` does: a system call on every request would hand the
    GIL to another thread each time, and under load those hand-offs cost more
    than the request itself. WARNING and above are still written at once, after
    whatever is queued, so lines keep their order. A clean stop writes
    everything; a SIGKILL can lose at most the last ``interval`` of info lines.
    """

    def __init__(self, stream: Any = None) -> None:
        super().__init__()
        self.stream = stream if stream is not None else sys.stderr
        try:
            self.fd: int | None = self.stream.fileno()
        except (AttributeError, OSError, ValueError):
            self.fd = None
        self._queued: collections.deque[bytes] = collections.deque()
        """Encoded lines, without their newlines."""
        self._write_lock = threading.Lock()
        self._flusher: threading.Thread | None = None
        self._stopping = threading.Event()

    def buffer(self, interval: float = 0.1) -> LineHandler:
        """Queue info lines and write them every ``interval`` seconds from a thread."""
        if self._flusher is None and self.fd is not None:
            self._flusher = threading.Thread(
                target=self._flush_every, args=(interval,), name="log-flusher", daemon=True
            )
            self._flusher.start()
        return self

    def handle(self, record: logging.LogRecord) -> bool:
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._put(self.format(record).encode("utf-8", "replace"), record.levelno)
        except Exception:
            self.handleError(record)

    def emit_line(self, line: bytes) -> None:
        """An info line formatted and encoded elsewhere (by this handler's formatter):
        see :class:`AccessLog`."""
        # Not ``contextlib.suppress``: on this per-request path, entering a context
        # manager costs more than queueing the line.
        try:  # noqa: SIM105
            self._put(line, logging.INFO)
        except OSError:
            pass

    def _put(self, line: bytes, level: int) -> None:
        """Queue the line when batching and below WARNING; else write it now, after the queue."""
        if self._flusher is not None and level < logging.WARNING:
            self._queued.append(line)
            return
        with self._write_lock:
            self._write(self._drain() + line + b"\n")

    def _drain(self) -> bytes:
        """Everything queued so far, one line each (deque pops are safe against concurrent appends)."""
        lines = []
        while True:
            try:
                lines.append(self._queued.popleft())
            except IndexError:
                break
        if not lines:
            return b""
        lines.append(b"")
        return b"\n".join(lines)

    def _write(self, data: bytes) -> None:
        if not data:
            return
        if self.fd is None:
            self.stream.write(data.decode("utf-8", "replace"))
            return
        while data:
            written = os.write(self.fd, data)
            data = data[written:]

    def flush(self) -> None:
        # stderr gone (a closed pipe): there is nothing better to do with the lines.
        with self._write_lock, contextlib.suppress(OSError):
            self._write(self._drain())

    def _flush_every(self, interval: float) -> None:
        while not self._stopping.wait(interval):
            self.flush()

    def close(self) -> None:
        self._stopping.set()
        if self._flusher is not None and self._flusher is not threading.current_thread():
            self._flusher.join(timeout=5)
        self.flush()
        super().close()


class AccessLog:
    """The line each request leaves: a log record like any other, only cheaper to write.

    Through :mod:`logging` an access line costs a LogRecord, the logger's
    dispatch and a walk of the record's attributes, a sizeable share of a
    validation. Once :meth:`bind` has found that the server's
    :class:`LineHandler` is the only place lines go (``serve`` binds at
    start-up, after setting logging up), the line is built by that handler's
    own formatter and queued on it directly. Unbound (a test capturing
    records, filters, more handlers), each request makes an ordinary record.
    """

    def __init__(self, logger: logging.Logger, msg: str = "request") -> None:
        self.logger = logger
        self.msg = msg
        self.handler: LineHandler | None = None
        self.formatter = JsonFormatter()
        """The bound handler's formatter."""

    def bind(self) -> bool:
        """Write straight to the root's LineHandler from now on, if it alone gets these lines."""
        self.handler = handler = self._sole_handler()
        if handler is not None:
            assert isinstance(handler.formatter, JsonFormatter)  # _sole_handler checked it
            self.formatter = handler.formatter
        return handler is not None

    def __call__(self, request_id: str, method: str, path: str, status: int, ms: float, remote: str) -> None:
        handler = self.handler
        if handler is not None and not self.logger.isEnabledFor(logging.INFO):
            return
        formatter = self.formatter
        # What JsonFormatter.format makes of the record below, built in one step.
        entry = {
            "ts": formatter.timestamp(time.time()),
            "level": "info",
            "logger": self.logger.name,
            "msg": self.msg,
            "request_id": request_id,
            "method": method,
            "path": path,
            "status": status,
            "ms": ms,
            "remote": remote,
        }
        if handler is None:
            self.logger.info(self.msg, extra={k: v for k, v in entry.items() if k not in _ENTRY_HEAD})
            return
        # The four strings are the only text (the caller's): when they hold nothing
        # to mask, the line skips the redaction walk.
        if not formatter.redactor.is_plain(f"{request_id}\n{method}\n{path}\n{remote}"):
            entry = formatter.redactor.clean(entry)
        handler.emit_line(formatter.encode(entry))

    def _sole_handler(self) -> LineHandler | None:
        """The root's LineHandler, if a record would reach it and nothing else."""
        root = logging.root
        node: logging.Logger | None = self.logger
        while node is not None and node is not root:
            if node.handlers or node.filters or node.disabled or not node.propagate:
                return None
            node = node.parent
        handlers = root.handlers
        if len(handlers) != 1 or root.filters:
            return None
        handler = handlers[0]
        if type(handler) is not LineHandler or handler.filters or handler.level > logging.INFO:
            return None
        return handler if isinstance(handler.formatter, JsonFormatter) else None


def setup_logging(level: str, secrets: Sequence[str] = (), buffered: bool = False) -> None:
    """JSON lines on stderr, masked by :class:`JsonFormatter`, written by :class:`LineHandler`.

    ``buffered`` (the server) writes info lines in batches; see :meth:`LineHandler.buffer`.
    """
    handler = LineHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(secrets))
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, LineHandler):
            old.close()  # its queued lines go out before the new handler's
    root.handlers[:] = [handler]
    root.setLevel(level)
    if buffered:
        handler.buffer()
    # JsonFormatter writes none of these: skip collecting them for every record
    # (the logging HOWTO's own advice for speed).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.getLogger("waitress.queue").addFilter(OncePerInterval(60.0))


# --- building and serving ---------------------------------------------------------------


def init_data_dir(config: Config, now: int) -> list[str]:
    """Create what a first start needs; never overwrites anything. Returns what it did."""
    done = []
    if not config.data_dir.exists():
        config.data_dir.mkdir(mode=0o700, parents=True)
        done.append(f"created {config.data_dir}")
    if not any(config.keys_dir.glob(f"*{keys.KEY_SUFFIX}")):
        key = keys.create_key(config.keys_dir)
        done.append(f"created signing key {key.kid}")
    if not config.plans_path.exists():
        config.plans_path.parent.mkdir(parents=True, exist_ok=True)
        config.plans_path.write_text(EXAMPLE_PLANS, encoding="utf-8")
        done.append(f"wrote example plans to {config.plans_path}")
    done += mailer.write_default_templates(config.data_dir)
    store = open_store(config.db_path, now)
    store.close()
    return done


def build_services(config: Config, clock: Callable[[], float] = time.time) -> Services:
    now = int(clock())
    return Services(
        config=config,
        store=open_store(config.db_path, now),
        ring=KeyRing(config.keys_dir),
        catalog=load_catalog(config.plans_path),
        clock=clock,
    )


def create_server(app: App, config: Config) -> Any:
    import waitress.server

    import channel

    sockets: dict[Any, Any] = {}
    server = waitress.server.create_server(
        app,
        map=sockets,
        host=config.host,
        port=config.port,
        threads=config.threads,
        ident="licensed",
        max_request_body_size=WAITRESS_BODY_LIMIT,
        channel_timeout=30,
        connection_limit=1000,
        # The app weighs X-Forwarded-For against TRUSTED_PROXIES itself; waitress 3
        # would otherwise strip the header before the app sees it.
        clear_untrusted_proxy_headers=False,
    )
    channel.install(sockets)
    return server


def _stop_on_signal(signum: int, frame: Any) -> None:
    """SIGTERM (systemd's stop) ends the server like Ctrl-C: the loop unwinds, threads stop."""
    raise KeyboardInterrupt


def serve(config: Config) -> None:
    for line in init_data_dir(config, int(time.time())):
        log.info(line)
    services = build_services(config)
    app = App(services)
    app.access_log.bind()
    server = create_server(app, config)
    log.info(
        "listening",
        extra={"url": f"http://{config.host}:{server.effective_port}", "port": int(server.effective_port)},
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


# --- the command line -------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="licensed", description="Self-hosted license server.")
    parser.add_argument("--env-file", type=Path, help="read settings from this file")
    parser.add_argument("--version", action="version", version=f"licensed {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the HTTP server")
    commands.add_parser("init", help="create the data dir, a signing key and example plans")

    keys_cmd = commands.add_parser("keys", help="signing keys").add_subparsers(
        dest="keys_command", required=True
    )
    keys_cmd.add_parser("list", help="list signing keys")
    keys_cmd.add_parser("rotate", help="add a new signing key; it signs from now on")

    reconcile = commands.add_parser("reconcile", help="repair licences from Stripe (for cron)")
    reconcile.add_argument("--full", action="store_true", help="walk every subscription, not just events")
    reconcile.add_argument("--since", type=_timestamp, help="list events from this time (epoch or ISO 8601)")
    reconcile.add_argument(
        "--overlap",
        type=int,
        default=stripe_sync.RECONCILE_OVERLAP,
        help="seconds re-listed before the cursor, for events Stripe lists late (default 600)",
    )
    stripe_cmd = commands.add_parser("stripe", help="Stripe set-up").add_subparsers(
        dest="stripe_command", required=True
    )
    stripe_cmd.add_parser("setup", help="create or update the webhook endpoint; prints its secret once")

    admin_parser = commands.add_parser("admin", help="support verbs, straight on the database")
    admin_cmd = admin_parser.add_subparsers(dest="admin_command", required=True)
    admin.add_commands(admin_cmd)

    backup_cmd = commands.add_parser("backup", help="copy the database safely while the server runs")
    backup_cmd.add_argument("path", type=Path, help="where to write the copy")
    backup_cmd.add_argument("--force", action="store_true", help="overwrite an existing file")

    mail_cmd = commands.add_parser("mail", help="the outbox").add_subparsers(
        dest="mail_command", required=True
    )
    mail_cmd.add_parser("flush", help="send the mail that is due now and print a summary")
    return parser


def _cmd_keys(config: Config, args: argparse.Namespace, out: Callable[[str], None]) -> None:
    if args.keys_command == "rotate":
        key = keys.create_key(config.keys_dir)
        out(f"new signing key {key.kid}; it signs from now on")
        return
    ring = KeyRing(config.keys_dir)
    current = ring.current.kid
    for key in ring.keys:
        state = "signing" if key.kid == current else "retired"
        created = dt.datetime.fromtimestamp(key.created_at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        out(f"{key.kid}  {created}  {state}")


def _cmd_admin(config: Config, args: argparse.Namespace, out: Callable[[str], None]) -> None:
    admin.run_cli(build_services(config), args, out)


def _timestamp(value: str) -> int:
    if value.isdigit():
        return int(value)
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{value!r} is neither epoch seconds nor ISO 8601") from err
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return int(parsed.timestamp())


def _stripe_gateway(config: Config) -> stripe_sync.StripeGateway:
    if not config.stripe_secret_key:
        raise ConfigError("STRIPE_SECRET_KEY is not set")
    return stripe_sync.StripeGateway(config.stripe_secret_key, config.stripe_api_base)


def _cmd_reconcile(config: Config, args: argparse.Namespace, out: Callable[[str], None]) -> int:
    gateway = _stripe_gateway(config)
    services = build_services(config)
    try:
        reconciler = stripe_sync.Reconciler(services, gateway)
        now = services.now()
        report = (
            reconciler.full(now)
            if args.full
            else reconciler.events(now, since=args.since, overlap=max(0, args.overlap))
        )
        out(report.line())
        for failure in report.failures[:20]:
            out(f"failed: {failure}")
        return 1 if report.failed else 0
    finally:
        services.store.close()


def _cmd_stripe(config: Config, args: argparse.Namespace, out: Callable[[str], None]) -> None:
    endpoint_id, secret, created = stripe_sync.setup_webhook_endpoint(
        _stripe_gateway(config), config.app_base_url
    )
    if created:
        out(f"created webhook endpoint {endpoint_id} for {config.app_base_url}/api/stripe/webhook")
        out(f"STRIPE_WEBHOOK_SECRET={secret}")
    else:
        out(f"updated webhook endpoint {endpoint_id}; its signing secret is unchanged")


def _cmd_mail(config: Config, out: Callable[[str], None]) -> int:
    services = build_services(config)
    try:
        summary = mailer.send_due(services, services.now(), connect_when_idle=True)
    finally:
        services.store.close()
    out(summary.line())
    if summary.error:
        print(f"licensed: {summary.error}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = print
    try:
        config = Config.from_sources(os.environ, args.env_file)
        setup_logging(config.log_level, redact.config_secrets(config), buffered=args.command == "serve")
        if args.command == "serve":
            serve(config)
        elif args.command == "init":
            for line in init_data_dir(config, int(time.time())) or ["nothing to do"]:
                out(line)
        elif args.command == "keys":
            _cmd_keys(config, args, out)
        elif args.command == "reconcile":
            return _cmd_reconcile(config, args, out)
        elif args.command == "stripe":
            _cmd_stripe(config, args, out)
        elif args.command == "admin":
            _cmd_admin(config, args, out)
        elif args.command == "mail":
            return _cmd_mail(config, out)
        elif args.command == "backup":
            out(backup.run(config, args.path, force=args.force))
        return 0
    except LicensedError as err:
        print(f"licensed: {err.message}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    except OSError as err:
        # A data dir that cannot be created or written, a port already taken...
        print(f"licensed: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
