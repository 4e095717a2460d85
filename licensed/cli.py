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
import logging
import os
import sys
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from . import (
    __version__,
    admin,
    backup,
    importer,
    keyfile,
    keys,
    mailer,
    preflight,
    redact,
    stripe_sync,
    trial_purchase,
)
from .addresses import parse_mailbox
from .admin import EVENT_STATUSES, FIND_FIELDS
from .config import Config
from .errors import ConfigError, ImportRefused, LicensedError
from .keys import KeyRing
from .logs import setup_logging
from .plans import Catalog, load_catalog
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

    link_cmd = verb("link", "link a signed-in user (OIDC sub) to the customers with an e-mail address")
    link_cmd.add_argument("--sub", required=True, help="the identity provider's subject of the user")
    link_cmd.add_argument("--email", required=True)

    import_cmd = verb("import", "import licenses sold before licensed (JSON Lines); their keys keep working")
    import_cmd.add_argument("path", type=Path, help="one license a line: email, plan, key, expires_at…")
    import_cmd.add_argument("--dry-run", action="store_true", help="check the file and report; write nothing")

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
    if name == "link":
        return admin.link_identity(services, actor, now, sub=args.sub, email=args.email)
    if name == "replay":
        return admin.replay(services, actor, now, args.event_id)
    if name == "import":
        return importer.import_licenses(
            services, actor, now, args.path, dry_run=args.dry_run, progress=_progress_printer(sys.stderr)
        )
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
    except ImportRefused as err:
        # The offending lines are the answer: print them, then fail with one line.
        out(
            json.dumps(err.report, indent=2, ensure_ascii=False)
            if args.json
            else "\n".join(import_lines(err.report))
        )
        raise
    finally:
        services.store.close()
    if args.json:
        out(json.dumps(result, indent=2, ensure_ascii=False))
    elif args.admin_command == "import":
        for line in import_lines(result):
            out(line)
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


def import_lines(report: dict[str, Any]) -> Iterator[str]:
    """An import's readable summary: each refused line with why, then the counts."""
    for problem in report["problems"]:
        yield f"line {problem['line']}: " + printable("; ".join(problem["errors"]))
    counts = (
        f"imported {report['imported']}, skipped as already there {report['skipped']},"
        f" refused {report['refused']} (of {report['lines']} lines in {printable(report['file'])})"
    )
    if report["dry_run"]:
        yield f"dry run, nothing written: would have {counts}"
    else:
        yield counts


def _progress_printer(stream: TextIO) -> importer.Progress | None:
    """Progress on one rewritten line, only when ``stream`` is a terminal (never in a log)."""
    if not stream.isatty():
        return None

    def show(phase: str, done: int, total: int) -> None:
        if phase == "checking":
            text = f"checking {done * 100 // max(total, 1)}%"
        else:
            text = f"importing {done}/{total}"
        end = "\n" if done >= total else ""
        print(f"\r{text}\x1b[K", end=end, file=stream, flush=True)

    return show


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
    stripe_cmd.add_parser(
        "setup", help="create or update the webhook endpoint (prints its secret once), then check"
    )
    check_cmd = stripe_cmd.add_parser(
        "check",
        help="before the first sale: will a purchase become a license? (reads only; exit 0 when all pass)",
    )
    check_cmd.add_argument(
        "--e2e",
        action="store_true",
        help="then buy a subscription with Stripe's test card through the running server, refund it and"
        " clean up (test-mode keys only; needs ADMIN_TOKEN)",
    )
    check_cmd.add_argument("--plan", help="the subscription plan --e2e buys (default: the first one sold)")
    check_cmd.add_argument(
        "--email", help="the test buyer's e-mail; its key mail goes there (default: MAIL_FROM's address)"
    )
    check_cmd.add_argument(
        "--timeout",
        type=_wait_seconds,
        default=trial_purchase.WAIT_SECONDS,
        help="seconds --e2e waits for each webhook to take effect (1 to 60, default 60)",
    )

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
    services = build_services(config)
    try:
        if services.stripe is None:
            raise ConfigError("STRIPE_SECRET_KEY is not set")
        reconciler = stripe_sync.Reconciler(services, services.stripe)
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


def _wait_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from err
    if not 1 <= seconds <= trial_purchase.WAIT_SECONDS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {trial_purchase.WAIT_SECONDS:.0f}")
    return seconds


def _cmd_stripe(config: Config, args: argparse.Namespace, out: Callable[[str], None]) -> int:
    # The stripe library logs every request at INFO: noise between the lines an operator reads.
    logging.getLogger("stripe").setLevel(logging.WARNING)
    if args.stripe_command == "check":
        return _cmd_stripe_check(config, args, out)
    url = stripe_sync.webhook_url(config.app_base_url)
    gateway = _stripe_gateway(config)
    endpoint_id, secret, created = stripe_sync.setup_webhook_endpoint(gateway, config.app_base_url)
    if created:
        out(f"created webhook endpoint {endpoint_id} for {url}")
        out(f"STRIPE_WEBHOOK_SECRET={secret}")
        out("(shown once: put it into the settings, restart the server, then run `licensed stripe check`)")
    else:
        out(f"updated webhook endpoint {endpoint_id} for {url}; its signing secret is unchanged")
    out("")
    server = preflight.ServerClient(config.app_base_url, config.admin_token)
    failed = preflight.failures(_print_checks(config, load_catalog(config.plans_path), gateway, server, out))
    if failed:
        out(f"{failed} {_checks(failed)} failed: fix {_them(failed)}, then run `licensed stripe check`")
    # The endpoint is set up: that succeeded, whatever remains to do (a new secret
    # is never checkable before it is in the settings).
    return 0


def _checks(count: int) -> str:
    return "check" if count == 1 else "checks"


def _them(count: int) -> str:
    return "it" if count == 1 else "them"


def _print_checks(
    config: Config,
    catalog: Catalog,
    gateway: StripeGateway | None,
    server: preflight.ServerClient,
    out: Callable[[str], None],
) -> list[preflight.Check]:
    """Run every read-only check, printing one line each as it completes."""
    found = []
    for check in preflight.run(config, catalog, gateway, server):
        found.append(check)
        out(f"{check.status.value:<4}  {check.subject}: {printable(check.message)}")
    return found


def _cmd_stripe_check(config: Config, args: argparse.Namespace, out: Callable[[str], None]) -> int:
    catalog = load_catalog(config.plans_path)
    gateway = (
        StripeGateway(config.stripe_secret_key, config.stripe_api_base) if config.stripe_secret_key else None
    )
    server = preflight.ServerClient(config.app_base_url, config.admin_token)
    plan = None
    if args.e2e:
        # Refused before anything is read or bought.
        if preflight.key_mode(config.stripe_secret_key) != "test":
            raise ConfigError(
                "--e2e buys with Stripe's test card and runs only with test-mode keys: STRIPE_SECRET_KEY is"
                " not a test-mode key (run it before switching to live keys)"
            )
        if not config.admin_token:
            raise ConfigError(
                "--e2e needs ADMIN_TOKEN: it finds the test license through the server's admin API"
            )
        plan = trial_purchase.choose_plan(catalog, args.plan)
    found = _print_checks(config, catalog, gateway, server, out)
    failed = preflight.failures(found)
    if failed:
        what = (
            "; no test purchase until every check passes"
            if args.e2e
            else ": a purchase may not become a license"
        )
        print(f"licensed: {failed} {_checks(failed)} failed{what}", file=sys.stderr)
        return 1
    warned = sum(1 for check in found if check.status is preflight.Status.WARN)
    out(
        f"all checks passed ({warned} {'warning' if warned == 1 else 'warnings'})"
        if warned
        else "all checks passed"
    )
    if plan is None or gateway is None:
        return 0
    email = args.email or (parse_mailbox(config.mail_from).addr_spec if config.mail_from else None)
    email = email or "licensed-e2e@example.com"
    out("")
    out(f"test purchase of {plan.id} ({plan.stripe_price}) by {email}, through {config.app_base_url}:")
    purchase = trial_purchase.TrialPurchase(
        gateway,
        server,
        plan,
        email,
        timeout=args.timeout,
    )
    started = time.monotonic()

    def show(step: trial_purchase.Step) -> None:
        status = "ok" if step.ok else "FAIL"
        out(f"{status:<4}  {step.name}: {printable(step.detail)} ({step.seconds:.2f} s)")

    try:
        passed = purchase.run(show)
    except KeyboardInterrupt:
        print("licensed: interrupted (what it had created at Stripe is cleaned up above)", file=sys.stderr)
        return 130
    if passed:
        took = time.monotonic() - started
        out(f"a test purchase became a license, and its refund revoked it ({took:.1f} s)")
        return 0
    print("licensed: the test purchase did not go through (see FAIL above)", file=sys.stderr)
    return 1


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
            return _cmd_stripe(config, args, out)
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
