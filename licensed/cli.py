"""The ``licensed`` command: argument parsing and output, over the library.

Every command builds the config once (environment, or ``--env-file``), then
calls into the library; nothing in the library imports this module. Exit code
0 on success; otherwise one line on standard error and 1 (2 for configuration
errors).
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import os
import sys
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from . import __version__, admin, backup, keyfile, keys, mailer, redact, stripe_sync
from .admin import EVENT_STATUSES, FIND_FIELDS
from .config import Config
from .errors import ConfigError, LicensedError
from .keys import KeyRing
from .logs import setup_logging
from .server import init_data_dir, serve
from .services import Services, build_services
from .stripe_api import StripeGateway

# --- licensed admin ------------------------------------------------------------------


def cli_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):
        return "cli:unknown"


def _add_admin_commands(admin_cmd: Any) -> None:
    """Add every verb to the ``licensed admin`` sub-command parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of readable lines")

    def verb(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = admin_cmd.add_parser(name, help=help_text, parents=[common])
        return parser

    def with_license(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = verb(name, help_text)
        parser.add_argument("license_id", help="lic_…")
        return parser

    find_cmd = verb("find", "find licenses; QUERY is guessed: e-mail, key, lic_, cus_, sub_, cs_")
    find_cmd.add_argument("query", nargs="?")
    for field in FIND_FIELDS[1:]:
        find_cmd.add_argument(f"--{field.replace('_', '-')}", dest=field)

    with_license("show", "a license with machines, Stripe events, mail and audit trail")

    issue_cmd = verb("issue", "issue a license by hand and print its key")
    issue_cmd.add_argument("--email", required=True)
    issue_cmd.add_argument("--plan", required=True)
    span = issue_cmd.add_mutually_exclusive_group()
    span.add_argument("--lifetime", action="store_true", help="never expires")
    span.add_argument("--days", type=int, help="valid for this many days")
    span.add_argument("--until", help="valid until this date/time (ISO 8601 or epoch seconds)")
    issue_cmd.add_argument("--max-machines", type=int)
    issue_cmd.add_argument("--send-email", action="store_true", help="queue the license key mail")

    extend_cmd = with_license("extend", "extend paid_through (the client gets a new key)")
    how = extend_cmd.add_mutually_exclusive_group(required=True)
    how.add_argument("--days", type=int, help="add days to the later of now and the current end")
    how.add_argument("--until", help="new paid_through (ISO 8601 or epoch seconds)")

    with_license("suspend", "suspend a license")
    with_license("reinstate", "reinstate a suspended or revoked license")
    with_license("revoke", "revoke a license")
    with_license("reset-machines", "free every machine seat")
    remove_cmd = with_license("remove-machine", "free one machine seat")
    which = remove_cmd.add_mutually_exclusive_group(required=True)
    which.add_argument("--machine-id")
    which.add_argument("--hash", dest="machine_hash")
    with_license("resend", "queue the license key mail again")

    events_cmd = verb("events", "Stripe events by status")
    events_cmd.add_argument("--status", default="failed", choices=EVENT_STATUSES)
    events_cmd.add_argument("--limit", type=int, default=100)

    replay_cmd = verb("replay", "apply a failed or ignored Stripe event again")
    replay_cmd.add_argument("event_id", help="evt_…")

    verb("stats", "licenses by plan and state, events today, mail backlog")

    audit_cmd = verb("audit", "the audit trail, newest first")
    audit_cmd.add_argument("--license", dest="license_id")
    audit_cmd.add_argument("--actor")
    audit_cmd.add_argument("--before-id", type=int)
    audit_cmd.add_argument("--limit", type=int, default=100)


def _admin_command(services: Services, args: argparse.Namespace, actor: str, now: int) -> dict[str, Any]:
    """Call the verb the parsed command line names."""
    name = args.admin_command
    if name == "find":
        criteria = {f: getattr(args, f) for f in FIND_FIELDS[1:]}
        return admin.find(services, actor, now, q=args.query, **criteria)
    if name == "issue":
        return admin.issue(
            services,
            actor,
            now,
            email=args.email,
            plan=args.plan,
            days=args.days,
            expires_at=args.until,
            lifetime=True if args.lifetime else None,
            max_machines=args.max_machines,
            send_email=args.send_email,
        )
    if name == "extend":
        return admin.extend(services, actor, now, args.license_id, days=args.days, paid_through=args.until)
    if name == "remove-machine":
        return admin.remove_machine(
            services,
            actor,
            now,
            args.license_id,
            machine_id=args.machine_id,
            machine_hash=args.machine_hash,
        )
    if name == "events":
        return admin.events(services, actor, now, status=args.status, limit=args.limit)
    if name == "stats":
        return admin.stats(services, actor, now)
    if name == "replay":
        return admin.replay(services, actor, now, args.event_id)
    if name == "audit":
        return admin.audit_trail(
            services,
            actor,
            now,
            license_id=args.license_id,
            by=args.actor,
            before_id=args.before_id,
            limit=args.limit,
        )
    simple: dict[str, Callable[[Services, str, int, str], dict[str, Any]]] = {
        "show": admin.show,
        "suspend": admin.suspend,
        "reinstate": admin.reinstate,
        "revoke": admin.revoke,
        "reset-machines": admin.reset_machines,
        "resend": admin.resend,
    }
    return simple[name](services, actor, now, args.license_id)


def _run_admin(services: Services, args: argparse.Namespace, out: Callable[[str], None]) -> None:
    """``licensed admin <verb>``: straight on the database, JSON or readable lines out."""
    try:
        result = _admin_command(services, args, cli_actor(), services.now())
    finally:
        services.store.close()
    if args.json:
        out(json.dumps(result, indent=2, ensure_ascii=False))
    elif args.admin_command == "issue":
        out(result["key"])
        if "mail_id" in result:
            print(f"licensed: key mail queued for {args.email}", file=sys.stderr)
    elif args.admin_command in _LISTS:
        field, columns = _LISTS[args.admin_command]
        for item in result[field]:
            out("  ".join(_scalar(item.get(c)) for c in columns))
        out(f"({result['count']} found)")
    else:
        for line in readable(result):
            out(line)


_LISTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "find": ("licenses", ("id", "plan", "entitlement", "email", "paid_through", "machines_used")),
    "events": ("events", ("received_at", "id", "type", "status", "license_id", "error")),
    "audit": ("entries", ("at", "actor", "action", "license_id")),
}
"""Verbs whose readable output is one line per item: (list field, columns)."""


def readable(value: Any, indent: str = "") -> Iterator[str]:
    """Readable lines: ``name: value`` for scalars, nested blocks for objects and lists."""
    if isinstance(value, dict):
        for name, item in value.items():
            if isinstance(item, dict | list) and item:
                yield f"{indent}{name}:"
                yield from readable(item, indent + "  ")
            else:
                yield f"{indent}{name}: {_scalar(item)}"
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                yield f"{indent}-"
                yield from readable(item, indent + "  ")
            else:
                yield f"{indent}- {_scalar(item)}"
    else:
        yield f"{indent}{_scalar(value)}"


def _scalar(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict | list):
        return "none" if not value else json.dumps(value)
    return printable(str(value))


def printable(text: str) -> str:
    """``text`` with control and format characters escaped: a customer name from Stripe
    must not retitle, clear or rewrite the terminal of whoever reads it."""
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")
        else ch
        for ch in text
    )


# --- the command line ---------------------------------------------------------------


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
    export_cmd = keys_cmd.add_parser(
        "export", help="write every signing key to one file encrypted with LICENSED_KEYS_PASSPHRASE"
    )
    export_cmd.add_argument("path", type=Path, help="the file to write (mode 0600)")
    export_cmd.add_argument("--force", action="store_true", help="overwrite an existing file")
    import_cmd = keys_cmd.add_parser(
        "import", help="add the signing keys of an exported file (LICENSED_KEYS_PASSPHRASE opens it)"
    )
    import_cmd.add_argument("path", type=Path, help="a file written by `licensed keys export`")

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
    _add_admin_commands(admin_cmd)

    backup_cmd = commands.add_parser("backup", help="copy the database safely while the server runs")
    backup_cmd.add_argument("path", type=Path, help="where to write the copy")
    backup_cmd.add_argument("--force", action="store_true", help="overwrite an existing file")

    mail_cmd = commands.add_parser("mail", help="the outbox").add_subparsers(
        dest="mail_command", required=True
    )
    mail_cmd.add_parser("flush", help="send the mail that is due now and print a summary")
    return parser


EXPORT_REMINDER = (
    "export the keys again and keep the file off this server (a restored database needs every key): "
    "licensed keys export PATH"
)


def _cmd_keys(config: Config, args: argparse.Namespace, out: Callable[[str], None]) -> None:
    if args.keys_command == "rotate":
        key = keys.create_key(config.keys_dir)
        out(f"new signing key {key.kid}; it signs from now on")
        out(EXPORT_REMINDER)
        return
    if args.keys_command == "export":
        kids = keyfile.export_keys(config, args.path, time.time(), force=args.force)
        noun = "key" if len(kids) == 1 else "keys"
        out(f"exported {len(kids)} signing {noun} ({', '.join(kids)}) to {args.path.absolute()}")
        out("keep it off this server, and its passphrase apart from it")
        return
    if args.keys_command == "import":
        result = keyfile.import_keys(config, args.path)
        if result.imported:
            out(f"imported {', '.join(result.imported)}")
        if result.present:
            out(f"already here: {', '.join(result.present)}")
        if not result.imported:
            out("nothing to import")
        return
    ring = KeyRing(config.keys_dir)
    current = ring.current.kid
    for key in ring.keys:
        state = "signing" if key.kid == current else "retired"
        created = dt.datetime.fromtimestamp(key.created_at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        out(f"{key.kid}  {created}  {state}")


def _cmd_admin(config: Config, args: argparse.Namespace, out: Callable[[str], None]) -> None:
    _run_admin(build_services(config), args, out)


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


def _stripe_gateway(config: Config) -> StripeGateway:
    if not config.stripe_secret_key:
        raise ConfigError("STRIPE_SECRET_KEY is not set")
    return StripeGateway(config.stripe_secret_key, config.stripe_api_base)


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
        setup_logging(config.log_level, redact.config_secrets(config))
        if args.command == "serve":
            serve(config)
        elif args.command == "init":
            done = init_data_dir(config, int(time.time()))
            for line in done or ["nothing to do"]:
                out(line)
            if any(line.startswith("created signing key") for line in done):
                out(EXPORT_REMINDER)
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
