"""Security regressions: one named test for each way in that must stay shut.

Forged keys (algorithm confusion, ``alg: none``, a foreign Ed25519 key, a
``kid`` that is not ours, another product's key), forged or replayed Stripe
webhooks, admin tokens, SQL metacharacters in every string a client controls,
a signing key readable by others, and secrets in logs or public answers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import requests
from support import stripe_events as se
from support.clock import DAY, T0
from support.live import Live
from support.server_proc import ServerProcess, make_data_dir

from licensed import jws, keys
from licensed.app import App
from licensed.config import Config
from licensed.errors import InvalidToken

ADMIN_TOKEN = "adm_0123456789abcdefghijklmnopqrstuv"
INTERNAL_KEY = "int_0123456789abcdefghijklmnopqrstuv"


@pytest.fixture
def config(data_dir: Path) -> Config:
    return Config(
        data_dir=data_dir,
        app_base_url="http://licensed.test",
        stripe_webhook_secrets=(se.SECRET,),
        admin_token=ADMIN_TOKEN,
        internal_api_key=INTERNAL_KEY,
        rate_limit_per_minute=0,  # hundreds of requests from one address; the limiter has its own tests
    )


# --- forging tokens ---------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: dict[str, Any]) -> str:
    return b64(json.dumps(value, separators=(",", ":")).encode())


def split_key(key: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(prefix-tier-, header, claims)`` of a real key."""
    prefix, tier, token = key.split("-", 2)
    head, body, _ = token.split(".")
    return f"{prefix}-{tier}-", json.loads(jws.b64url_decode(head)), json.loads(jws.b64url_decode(body))


def validate(live: Live, key: str, **extra: Any) -> dict[str, Any]:
    answer = live.post("/api/license/validate", {"key": key, **extra})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def refused_everywhere(live: Live, key: str) -> None:
    """A forged key is INVALID_KEY on every licence route and raises InvalidToken in the parser."""
    services = live.services
    with pytest.raises(InvalidToken):
        keys.parse_license_key(key, services.catalog, services.ring)
    for path in ("/api/license/validate", "/api/license/activate", "/api/license/deactivate"):
        answer = live.post(path, {"key": key, "machine_id": "forger-machine"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["valid"], body["code"]) == (False, "INVALID_KEY"), body
        assert "lease" not in body and "license" not in body
    assert services.store.count_machines(split_key(key)[2].get("sub", "")) == 0


def test_genuine_key_is_accepted_as_the_baseline(live: Live) -> None:
    key = live.issue()
    assert validate(live, key)["code"] == "VALID"


@pytest.mark.parametrize("secret", ["raw public key", "jwk x", "jwk json"])
def test_algorithm_confusion_hs256_signed_with_the_public_key(live: Live, secret: str) -> None:
    key = live.issue()
    prefix, header, claims = split_key(key)
    verify_key = live.services.ring.current.verify_key
    material = {
        "raw public key": bytes(verify_key),
        "jwk x": jws.b64url_encode(bytes(verify_key)).encode(),
        "jwk json": json.dumps(live.services.ring.current.jwk()).encode(),
    }[secret]
    signing_input = f"{segment(dict(header, alg='HS256'))}.{segment(claims)}"
    mac = hmac.new(material, signing_input.encode(), hashlib.sha256).digest()
    refused_everywhere(live, f"{prefix}{signing_input}.{b64(mac)}")


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
@pytest.mark.parametrize("signature", ["", "AAAA"])
def test_alg_none(live: Live, alg: str, signature: str) -> None:
    prefix, header, claims = split_key(live.issue())
    refused_everywhere(live, f"{prefix}{segment(dict(header, alg=alg))}.{segment(claims)}.{signature}")


def test_key_signed_by_a_foreign_ed25519_key(live: Live) -> None:
    prefix, header, claims = split_key(live.issue())
    foreign = nacl.signing.SigningKey.generate()
    # Our kid in the header, a stranger's signature.
    refused_everywhere(live, prefix + jws.sign(claims, foreign, header["kid"]))
    # The stranger's own kid: not in our ring.
    refused_everywhere(live, prefix + jws.sign(claims, foreign, keys.kid_for(foreign.verify_key)))


@pytest.mark.parametrize(
    "kid", ["not-ours", "", "../keys/other", "A" * 300, "kid\u0000", "' OR '1'='1"], ids=repr
)
def test_kid_that_is_not_ours(live: Live, kid: str) -> None:
    prefix, _, claims = split_key(live.issue())
    # Signed with our real key, so only the kid is wrong: the lookup must not fall back.
    token = jws.sign(claims, live.services.ring.current.key, kid)
    refused_everywhere(live, prefix + token)


def test_key_of_product_a_presented_as_product_b(live: Live) -> None:
    key = live.issue("pro-monthly")
    assert key.startswith("DC-PRO-")
    # Asked for the other product: refused without touching its seats.
    body = validate(live, key, product="desktop", machine_id="m-1")
    assert (body["valid"], body["code"]) == (False, "PRODUCT_MISMATCH")
    assert "license" not in body and "lease" not in body
    # The same signed token behind the other product's prefix: its claims say dashcaddy.
    refused_everywhere(live, "DT-PRO-" + key[len("DC-PRO-") :])


# --- webhooks ----------------------------------------------------------------------------------


def post_event(live: Live, evt: dict[str, Any], *, at: int | None = None, secret: str = se.SECRET) -> Any:
    body, headers = se.signed(evt, int(live.clock()) if at is None else at, secret)
    return live.http.post(live.url + "/api/stripe/webhook", data=body, headers=headers, timeout=10)


def database_state(live: Live) -> dict[str, Any]:
    store = live.services.store
    return {
        table: [tuple(r) for r in store.all(f"SELECT * FROM {table} ORDER BY 1")]
        for table in ("licenses", "customers", "stripe_events", "audit_log", "payments", "machines", "outbox")
    }


def subscription_event(created: int = T0, **kw: Any) -> dict[str, Any]:
    sub = se.subscription(
        sub_id=se.uid("sub"),
        customer=se.uid("cus"),
        price="price_pro_monthly",
        period_end=T0 + 30 * DAY,
        **kw,
    )
    return se.event("customer.subscription.created", sub, created)


def test_replayed_webhook_has_no_second_effect(live: Live) -> None:
    evt = subscription_event()
    assert post_event(live, evt).status_code == 200
    after_first = database_state(live)
    assert len(after_first["licenses"]) == 1
    # The same event again, re-signed later as Stripe's retries are, and once more as sent.
    live.clock.advance(120)
    for _ in range(3):
        answer = post_event(live, evt)
        assert answer.status_code == 200 and answer.json() == {"received": True}
    assert database_state(live) == after_first


def test_stale_webhook_is_refused(live: Live) -> None:
    before = database_state(live)
    answer = post_event(live, subscription_event(), at=int(live.clock()) - 301)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "INVALID_SIGNATURE"
    assert database_state(live) == before


def test_webhook_signed_with_the_wrong_secret_is_refused(live: Live) -> None:
    before = database_state(live)
    for secret in ("whsec_wrong", se.SECRET + "x", se.SECRET[:-1], ""):
        answer = post_event(live, subscription_event(), secret=secret)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "INVALID_SIGNATURE"
    assert database_state(live) == before


# --- admin routes ------------------------------------------------------------------------------


ADMIN_PATH = "/api/admin/licenses?email=nobody@example.com"


def near_misses(token: str) -> list[str]:
    flipped = token[:-1] + ("a" if token[-1] != "a" else "b")
    # (A second space after "Bearer" is no miss: RFC 6750 allows one or more.)
    return [token[:-1], token + "x", flipped, token.upper(), token[1:], token + "\u0000"]


def test_admin_routes_refuse_missing_wrong_and_near_miss_tokens(live: Live) -> None:
    app = App(live.services)
    assert any(route.path.startswith("/api/admin/") for route in app.router.routes)
    tries: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": ADMIN_TOKEN},
    ]
    tries += [
        {"Authorization": f"Bearer {miss}"} for miss in near_misses(ADMIN_TOKEN) if "\u0000" not in miss
    ]
    tries += [{"Authorization": f"Basic {ADMIN_TOKEN}"}, {"Authorization": f"Bearer {INTERNAL_KEY}"}]
    for headers in tries:
        answer = live.get(ADMIN_PATH, headers=headers)
        assert answer.status_code in (401, 403), (headers, answer.status_code, answer.text)
        assert set(answer.json()) == {"error"}
    answer = live.get(ADMIN_PATH, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert answer.status_code == 200, answer.text


# --- SQL metacharacters ------------------------------------------------------------------------

NASTY = [
    "' OR '1'='1",
    '"; DROP TABLE licenses; --',
    "x'); DELETE FROM machines; --",
    "%_\\%' ESCAPE '\\",
    "lic_' UNION SELECT * FROM customers --",
    "\u0000'\u0000",
    "Robert'); DROP TABLE stripe_events;--",
]


def schema_and_counts(db: Path) -> tuple[list[tuple[Any, ...]], dict[str, int]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        schema = [tuple(r) for r in conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name")]
        tables = [r[1] for r in schema if r[0] == "table"]
        counts = {t: conn.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in tables}
        return schema, counts
    finally:
        conn.close()


def string_fields(schema: dict[str, Any]) -> list[str]:
    return [name for name, sub in (schema.get("properties") or {}).items() if sub.get("type") == "string"]


def test_sql_metacharacters_in_every_string_field_leave_the_database_intact(live: Live) -> None:
    key = live.issue("pro-monthly")  # one seat, taken below: no metacharacter id can take another
    assert validate(live, key, machine_id="m-real")["activated"] is True
    db = live.services.config.db_path
    schema_before, counts_before = schema_and_counts(db)
    app = App(live.services)
    bearer = {"admin": ADMIN_TOKEN, "internal": INTERNAL_KEY}
    posted = 0
    for route in app.router.routes:
        if route.method != "POST" or route.body is None:
            continue
        headers = {"Authorization": f"Bearer {bearer[route.auth]}"} if route.auth in bearer else {}
        valid = {"key": key, "machine_id": "m-real", "plan": "pro-monthly", "email": "a@example.com"}
        for field in string_fields(route.body):
            for nasty in NASTY:
                body = {name: valid.get(name, "x") for name in route.body.get("required", [])}
                body[field] = nasty
                path = route.path.replace("{id}", "x")
                answer = live.post(path, body, headers=headers)
                posted += 1
                assert answer.status_code < 500 or answer.json()["error"]["code"] in (
                    "STRIPE_NOT_CONFIGURED",
                    "OIDC_NOT_CONFIGURED",
                ), (route.path, field, nasty, answer.text)
    assert posted >= 3 * len(NASTY)

    # In a key's own claims: signed with our key, so only the database lookup can stop them.
    prefix, header, claims = split_key(key)
    for nasty in NASTY:
        for claim in ("sub", "tier", "prod"):
            forged = dict(claims, **{claim: nasty})
            token = jws.sign(forged, live.services.ring.current.key, header["kid"])
            body = validate(live, prefix + token, machine_id="m-forged")
            assert body["valid"] is False and body["code"] in ("NOT_FOUND", "INVALID_KEY"), body

    # In a signed Stripe event's ids: recorded verbatim, as data.
    for n, nasty in enumerate(NASTY):
        evt = subscription_event()
        evt["id"] = f"evt_{n}{nasty}"
        evt["data"]["object"]["id"] = f"sub_{n}{nasty}"
        evt["data"]["object"]["customer"] = f"cus_{n}{nasty}"
        assert post_event(live, evt).status_code == 200
        store = live.services.store
        assert store.one("SELECT id FROM stripe_events WHERE id = ?", (evt["id"],)) is not None
        assert store.find_license("stripe_subscription_id", f"sub_{n}{nasty}") is not None

    schema_after, counts_after = schema_and_counts(db)
    assert schema_after == schema_before
    counts_before.update(
        licenses=counts_before["licenses"] + len(NASTY),
        customers=counts_before["customers"] + len(NASTY),
        stripe_events=counts_before["stripe_events"] + len(NASTY),
        audit_log=counts_before["audit_log"] + len(NASTY),
        settings=counts_after["settings"],
    )
    assert counts_after == counts_before
    assert live.services.store.count_machines(split_key(key)[2]["sub"]) == 1
    assert [r[0] for r in live.services.store.all("PRAGMA integrity_check")] == ["ok"]


# --- start-up and logs (a real licensed serve) -----------------------------------------------


@pytest.mark.parametrize("mode", [0o640, 0o604], ids=["group", "others"])
def test_signing_key_readable_by_others_is_refused_at_start_up(tmp_path: Path, mode: int) -> None:
    server = ServerProcess(make_data_dir(tmp_path / "data"))
    done = server.cli("init")
    assert done.returncode == 0, done.stderr
    (key_file,) = (server.data_dir / "keys").glob(f"*{keys.KEY_SUFFIX}")
    key_file.chmod(mode)
    with pytest.raises(AssertionError, match="exited with"):
        server.start(timeout=30)
    assert server.proc is not None and server.proc.returncode not in (0, None)
    assert "readable by others" in server.stderr()
    key_file.chmod(0o600)
    server.start(timeout=30)  # the same key, private again: it starts
    server.stop()


def test_keys_secrets_and_machine_ids_stay_out_of_logs_and_public_answers(tmp_path: Path) -> None:
    secret = "whsec_log_canary_9f8e7d6c5b4a"
    server = ServerProcess(
        make_data_dir(tmp_path / "data"),
        {
            "STRIPE_WEBHOOK_SECRET": secret,
            "LOG_LEVEL": "DEBUG",
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "INTERNAL_API_KEY": INTERNAL_KEY,
        },
    )
    server.start()
    machine = "machine-canary-7a6b5c4d"
    public: list[str] = []
    try:
        key = server.issue("team-monthly", email="canary-buyer@example.com")
        token = key.split("-", 2)[2]
        with requests.Session() as http:

            def post(path: str, body: Any, **kw: Any) -> None:
                answer = http.post(server.url + path, json=body, timeout=10, **kw)
                public.append(answer.text)

            for path in ("/api/license/validate", "/api/license/activate", "/api/license/deactivate"):
                post(path, {"key": key, "machine_id": machine})
                post(path, {"key": key[:-3] + "AAA", "machine_id": machine})  # forged
                post(path, {"key": key, "machine_id": machine + "\u0007"})  # refused: not printable
                post(path, {"key": key, "machine_id": machine, "product": "desktop"})
            post("/api/license/validate", {"key": key, "machine_id": machine})
            post("/api/billing/portal", {"key": key})
            now = int(time.time())
            evt = subscription_event(now)
            for at, sign_with in ((now, secret), (now - 400, secret), (now, "whsec_other")):
                body, headers = se.signed(evt, at, sign_with)
                answer = http.post(server.url + "/api/stripe/webhook", data=body, headers=headers, timeout=10)
                public.append(answer.text)
            for path in ("/health", "/api/public/config", "/api/public/plans", "/openapi.json", "/nope"):
                public.append(http.get(server.url + path, timeout=10).text)
            public.append(http.get(server.url + "/health", headers={"Authorization": f"Bearer {key}"}).text)
    finally:
        server.stop()
    log = server.stderr()
    access = [json.loads(line) for line in log.splitlines() if '"licensed.access"' in line]
    assert any(entry["path"] == "/api/license/validate" for entry in access)  # the access log was captured
    for name, value in (
        ("license key", token),
        ("key signature", token.rsplit(".", 1)[1]),
        ("webhook secret", secret),
        ("machine id", machine),
        ("admin token", ADMIN_TOKEN),
        ("internal key", INTERNAL_KEY),
    ):
        assert value not in log, f"{name} found in the server log"
        for text in public:
            assert value not in text, f"{name} in a public answer: {text[:300]}"
    for text in public:
        assert "canary-buyer@example.com" not in text
        assert "Traceback" not in text
    assert hashlib.sha256(machine.encode()).hexdigest() not in "".join(public)


def test_public_answers_carry_no_personal_data(live: Live) -> None:
    key = live.issue(email="private-person@example.com")
    body = validate(live, key, machine_id="private-machine-id")
    text = json.dumps(body)
    assert "private-person@example.com" not in text
    assert "private-machine-id" not in text
    assert hashlib.sha256(b"private-machine-id").hexdigest() not in text
    for path in ("/api/public/config", "/health", "/openapi.json"):
        text = live.get(path).text
        assert ADMIN_TOKEN not in text and INTERNAL_KEY not in text and se.SECRET not in text
