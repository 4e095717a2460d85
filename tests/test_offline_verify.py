"""Keys and leases verify with the JWKS alone, in two independent JWT libraries.

PyJWT (Python) and jose (Node.js) know nothing of licensed: each gets the JSON
of ``/.well-known/jwks.json`` and the tokens, exactly as an installation would.
Also: key rotation (old tokens keep verifying, new ones use the new kid, old
keys are re-issued) and renewal (a moved ``paid_through`` yields a new key).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import jwt
import nacl.signing
import pytest
from support.clock import DAY
from support.forge import claims_of, ed25519_token, flip, header_of, split_key
from support.live import Live
from support.server_proc import run_cli

from licensed import keys, licensing

ISSUER = "http://licensed.test"
ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "tests" / "node"


# --- the two verifiers ----------------------------------------------------------------------


def pyjwt_verify(token: str, jwks: dict[str, Any]) -> dict[str, Any]:
    """Verify with PyJWT, choosing the key by ``kid`` from the JWKS JSON."""
    kid = jwt.get_unverified_header(token).get("kid")
    matches = [k for k in jwks["keys"] if k["kid"] == kid]
    if not matches:
        raise jwt.InvalidKeyError(f"kid {kid!r} not in the JWKS")
    claims: dict[str, Any] = jwt.decode(
        token,
        jwt.PyJWK(matches[0]),
        algorithms=["EdDSA"],
        issuer=ISSUER,
        options={"require": ["exp", "iat", "sub", "iss"]},
    )
    return claims


def pyjwt_accepts(token: str, jwks: dict[str, Any]) -> bool:
    try:
        pyjwt_verify(token, jwks)
    except jwt.PyJWTError:
        return False
    return True


@pytest.fixture(scope="session")
def node() -> str:
    """The node binary, with jose installed from the lock file if it is missing."""
    binary = shutil.which("node")
    if binary is None:
        pytest.fail("node is needed to verify tokens with jose (install Node.js)")
    if not (NODE_DIR / "node_modules" / "jose" / "package.json").exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("npm is needed: npm ci --prefix tests/node")
        subprocess.run(
            [npm, "ci", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund", "--loglevel=error"],
            check=True,
            timeout=300,
        )
    return binary


def jose_verify(node: str, jwks: dict[str, Any], tokens: list[str], now: int) -> list[dict[str, Any]]:
    """Run tests/node/verify.mjs: one result per token."""
    done = subprocess.run(
        [node, str(NODE_DIR / "verify.mjs")],
        input=json.dumps({"jwks": jwks, "tokens": tokens, "issuer": ISSUER, "now": now}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results: list[dict[str, Any]] = json.loads(done.stdout)
    assert len(results) == len(tokens)
    return results


# --- helpers ------------------------------------------------------------------------------


@pytest.fixture
def real_time(live: Live) -> Live:
    """Libraries check ``exp``/``iat`` against the real clock: run the server at it
    (an hour behind, so a test may move it forward)."""
    live.clock.set(int(time.time()) - 3600)
    return live


@pytest.fixture
def fast_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key ring notices a new key file at once instead of within 2 s."""
    monkeypatch.setattr(keys.KeyRing, "RELOAD_EVERY", 0.0)


def jwks_of(live: Live) -> dict[str, Any]:
    answer = live.get("/.well-known/jwks.json")
    assert answer.status_code == 200
    body: dict[str, Any] = answer.json()
    return body


def activate(live: Live, key: str, machine: str) -> dict[str, Any]:
    body: dict[str, Any] = live.post("/api/license/activate", {"key": key, "machine_id": machine}).json()
    assert body["activated"] is True, body
    return body


def tokens_for_all_plans(live: Live) -> tuple[list[str], list[str]]:
    """License keys' JWS and leases for one licence of each kind."""
    jws_list, leases = [], []
    for plan in ("pro-monthly", "team-monthly", "basic-monthly", "pro-year", "lifetime", "desktop-pro"):
        key = live.issue(plan, days=30)
        jws_list.append(split_key(key)[2])
        leases.append(activate(live, key, f"machine-{plan}")["lease"])
    return jws_list, leases


def forgeries(token: str, signing: nacl.signing.SigningKey) -> list[str]:
    """The same token tampered with, re-signed by a stranger, or stripped of ``exp``."""
    header, claims = header_of(token), claims_of(token)
    head, body, sig = token.split(".")
    no_exp = {k: v for k, v in claims.items() if k != "exp"}
    return [
        f"{head}.{flip(body, len(body) // 2)}.{sig}",
        f"{head}.{body}.{flip(sig, 5)}",
        ed25519_token(header, claims, nacl.signing.SigningKey.generate()),
        ed25519_token(header, no_exp, signing),
        ed25519_token({**header, "kid": "someone-else"}, claims, signing),
    ]


# --- independent verification ----------------------------------------------------------------


def test_pyjwt_verifies_keys_and_leases(real_time: Live) -> None:
    live = real_time
    jws_list, leases = tokens_for_all_plans(live)
    jwks = jwks_of(live)
    for token in jws_list + leases:
        assert pyjwt_verify(token, jwks) == claims_of(token)
    for token in leases:
        assert len(pyjwt_verify(token, jwks)["mid"]) == 64
    signing = live.services.ring.current.key
    for token in jws_list[:2] + leases[:2]:
        for forged in forgeries(token, signing):
            assert not pyjwt_accepts(forged, jwks), forged


def test_jose_verifies_keys_and_leases(real_time: Live, node: str) -> None:
    live = real_time
    jws_list, leases = tokens_for_all_plans(live)
    jwks = jwks_of(live)
    results = jose_verify(node, jwks, jws_list + leases, live.services.now())
    for token, result in zip(jws_list + leases, results, strict=True):
        assert result["ok"] is True, result
        assert result["payload"] == claims_of(token)
        assert result["header"] == {"alg": "EdDSA", "typ": "JWT", "kid": live.services.ring.current.kid}

    signing = live.services.ring.current.key
    forged = [f for token in (jws_list[0], leases[0]) for f in forgeries(token, signing)]
    rejected = jose_verify(node, jwks, forged, live.services.now())
    assert [r["ok"] for r in rejected] == [False] * len(forged), rejected


def test_jose_enforces_expiry(real_time: Live, node: str) -> None:
    """The lease's ``exp`` is what lets an offline client stop: jose must honour it."""
    live = real_time
    lease = activate(live, live.issue(), "m-1")["lease"]
    exp = claims_of(lease)["exp"]
    jwks = jwks_of(live)
    before, after = jose_verify(node, jwks, [lease], exp - 60) + jose_verify(node, jwks, [lease], exp + 60)
    assert before["ok"] is True
    assert after == {**after, "ok": False, "code": "ERR_JWT_EXPIRED"}


# --- rotation and renewal ---------------------------------------------------------------------


def rotate_with_cli(live: Live) -> str:
    """``licensed keys rotate`` in its own process, on the live server's data dir."""
    env = {**os.environ, "DATA_DIR": str(live.services.config.data_dir), "PYTHONPATH": str(ROOT)}
    done = run_cli(env, "keys", "rotate")
    assert done.returncode == 0, done.stderr
    new_kid = done.stdout.split()[3].rstrip(";")
    assert (live.services.config.keys_dir / f"{new_kid}{keys.KEY_SUFFIX}").exists()
    return new_kid


def test_rotation(real_time: Live, fast_reload: None, node: str) -> None:
    live = real_time
    old_kid = live.services.ring.current.kid
    old_key = live.issue("pro-monthly", days=30)
    old_lease = activate(live, old_key, "m-1")["lease"]

    new_kid = rotate_with_cli(live)
    assert new_kid != old_kid
    assert live.get("/health").json()["signing_kid"] == new_kid

    jwks = jwks_of(live)
    assert [k["kid"] for k in jwks["keys"]] == [new_kid, old_kid]  # newest first
    # What the old key signed still verifies, with both libraries.
    for token in (split_key(old_key)[2], old_lease):
        assert header_of(token)["kid"] == old_kid
        pyjwt_verify(token, jwks)
    assert all(
        r["ok"] for r in jose_verify(node, jwks, [split_key(old_key)[2], old_lease], live.services.now())
    )

    # New licences are signed by the new key.
    new_key = live.issue("team-monthly", days=30)
    assert header_of(split_key(new_key)[2])["kid"] == new_kid
    pyjwt_verify(split_key(new_key)[2], jwks)

    # Validating the old key hands out a fresh key signed by the new kid, and a
    # lease signed by it too; the fresh key is then current (no further "key").
    answer = live.post("/api/license/validate", {"key": old_key, "machine_id": "m-1"}).json()
    assert answer["code"] == "VALID"
    fresh = answer["key"]
    assert fresh != old_key and fresh.startswith("DC-PRO-")
    fresh_jws = split_key(fresh)[2]
    assert header_of(fresh_jws)["kid"] == new_kid
    assert claims_of(fresh_jws)["sub"] == claims_of(split_key(old_key)[2])["sub"]
    assert header_of(answer["lease"])["kid"] == new_kid
    assert pyjwt_verify(fresh_jws, jwks) == claims_of(fresh_jws)
    assert jose_verify(node, jwks, [fresh_jws], live.services.now())[0]["ok"] is True
    again = live.post("/api/license/validate", {"key": fresh}).json()
    assert again["code"] == "VALID" and "key" not in again
    # The old key still validates (it is the same licence) and keeps being re-issued.
    assert live.post("/api/license/validate", {"key": old_key}).json()["key"] == fresh


def test_retired_key_leaves_the_jwks_once_nothing_it_signed_lives(live: Live, fast_reload: None) -> None:
    services = live.services
    old_kid = services.ring.current.kid
    lic = live.issue_license("pro-monthly", days=30)
    old_key = live.key_of(lic)
    old_exp = claims_of(split_key(old_key)[2])["exp"]

    new = keys.create_key(services.config.keys_dir, now=services.now())
    listed = [k["kid"] for k in jwks_of(live)["keys"]]
    assert listed == [new.kid, old_kid]

    # The licence gets its fresh key, but the old key (same licence, signed by
    # the old kid) stays valid offline until its own exp: the old kid stays listed.
    assert live.post("/api/license/validate", {"key": old_key}).json()["key"]
    assert services.store.get_license(lic.id).key_kid == new.kid  # type: ignore[union-attr]
    live.clock.set(services.now() + 168 * 3600 + 1)  # every lease it signed has expired
    assert old_kid in [k["kid"] for k in jwks_of(live)["keys"]]

    live.clock.set(old_exp - 1)
    assert old_kid in [k["kid"] for k in jwks_of(live)["keys"]]
    live.clock.set(old_exp)
    assert [k["kid"] for k in jwks_of(live)["keys"]] == [new.kid]


def test_retired_key_stays_for_unvalidated_licences(live: Live, fast_reload: None) -> None:
    services = live.services
    old_kid = services.ring.current.kid
    lifetime = live.issue_license("lifetime")
    new = keys.create_key(services.config.keys_dir, now=services.now())
    live.clock.advance(50 * 365 * DAY)
    # Nobody validated the lifetime key: its signer must stay listed.
    assert [k["kid"] for k in jwks_of(live)["keys"]] == [new.kid, old_kid]
    assert services.store.get_license(lifetime.id).key_kid == old_kid  # type: ignore[union-attr]


def test_renewal_hands_out_a_new_key(real_time: Live, node: str) -> None:
    live = real_time
    services = live.services
    lic = live.issue_license("pro-monthly", days=30)
    old_key = live.key_of(lic)

    # What a renewal does: paid_through moves, the key is re-stamped.
    renewed = services.store.get_license(lic.id)
    assert renewed is not None
    renewed = dataclasses.replace(renewed, paid_through=(renewed.paid_through or 0) + 30 * DAY)
    live.clock.advance(3600)
    licensing.restamp_key(renewed, services.ring, services.now())
    with services.store.atomic():
        services.store.save_license(renewed, services.now())

    answer = live.post("/api/license/validate", {"key": old_key}).json()
    assert answer["code"] == "VALID"
    new_key = answer["key"]
    assert new_key != old_key
    old_claims, new_claims = claims_of(split_key(old_key)[2]), claims_of(split_key(new_key)[2])
    assert new_claims["exp"] == old_claims["exp"] + 30 * DAY
    assert new_claims["iat"] == services.now()
    assert answer["license"]["paid_through"] == licensing.iso(renewed.paid_through)
    jwks = jwks_of(live)
    assert pyjwt_verify(split_key(new_key)[2], jwks) == new_claims
    assert jose_verify(node, jwks, [split_key(new_key)[2]], services.now())[0]["ok"] is True
    assert "key" not in live.post("/api/license/validate", {"key": new_key}).json()
