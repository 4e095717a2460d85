"""The signing and verification memos change no answer, only the work done."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import jws
import keys
import licensing
from errors import InvalidToken
from memo import BoundedCache
from services import Services


def issue(services: Services, email: str) -> licensing.License:
    return licensing.issue_license(
        services.store,
        services.ring,
        services.catalog.plans["pro-year"],
        email=email,
        now=services.now(),
        actor="test",
    )


def test_a_remembered_key_needs_its_signer_in_the_ring(services: Services, tmp_path: Path) -> None:
    lic = issue(services, "a@example.com")
    key = licensing.license_key(lic, services.catalog, services.ring, services.config.app_base_url)
    assert keys.parse_license_key(key, services.catalog, services.ring).claims["sub"] == lic.id
    assert keys.parse_license_key(key, services.catalog, services.ring).claims["sub"] == lic.id  # remembered
    keys.create_key(tmp_path / "other")
    stranger = keys.KeyRing(tmp_path / "other")
    with pytest.raises(InvalidToken):
        keys.parse_license_key(key, services.catalog, stranger)


def test_remembered_signatures_equal_fresh_ones(services: Services) -> None:
    claims = {"sub": "lic_x", "mid": "m", "exp": 2_000_000_000, "iat": 1}
    first = keys.sign_claims(services.ring, claims)
    again = keys.sign_claims(services.ring, dict(claims))
    current = services.ring.current
    assert first == again == jws.sign(claims, current.key, current.kid)
    assert keys.sign_claims(services.ring, {**claims, "exp": 2_000_000_001}) != first


def test_the_memo_is_bounded() -> None:
    memo = BoundedCache(size=3)
    for number in range(10):
        memo.put(number, number)
        assert len(memo._data) <= 3
    assert memo.get(9) == 9


def test_a_remembered_validation_needs_its_signer_in_the_ring(services: Services) -> None:
    """A validation answered from memory is re-checked once the ring has changed: a key
    whose signer was taken out of the ring stops validating, remembered or not."""
    lic = issue(services, "b@example.com")
    layer = licensing.Licensing(services.store, services.ring, services.catalog, "http://test", 24)
    request = licensing.LicenseRequest(layer.key(lic), "machine-1")
    for _ in range(2):  # the second answer comes from memory
        assert layer.check(request, services.now())["code"] == licensing.VALID
    keys_dir = services.config.keys_dir
    keys.create_key(keys_dir, now=time.time() + 1)
    (keys_dir / f"{lic.key_kid}{keys.KEY_SUFFIX}").unlink()
    services.ring._checked = 0.0  # the ring looks at its folder now, not in up to 2 s
    assert services.ring.current.kid != lic.key_kid
    assert layer.check(request, services.now())["code"] == licensing.INVALID_KEY
