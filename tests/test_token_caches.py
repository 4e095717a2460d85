"""The memory of verified keys changes no answer, only the work done."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from support.live import issue_license

from licensed import keys, licensing
from licensed.errors import InvalidToken
from licensed.services import Services


def issue(services: Services, email: str) -> licensing.License:
    return issue_license(services, "pro-year", email=email)


def test_a_remembered_key_needs_its_signer_in_the_ring(services: Services, tmp_path: Path) -> None:
    lic = issue(services, "a@example.com")
    key = licensing.license_key(lic, services.catalog, services.ring, services.config.app_base_url)
    assert keys.parse_license_key(key, services.catalog, services.ring).claims["sub"] == lic.id
    assert keys.parse_license_key(key, services.catalog, services.ring).claims["sub"] == lic.id  # remembered
    keys.create_key(tmp_path / "other")
    stranger = keys.KeyRing(tmp_path / "other")
    with pytest.raises(InvalidToken):
        keys.parse_license_key(key, services.catalog, stranger)


def test_a_remembered_validation_needs_its_signer_in_the_ring(services: Services) -> None:
    """A key verified before is checked against the ring again: once its signer is taken
    out of the ring it stops validating, remembered or not."""
    lic = issue(services, "b@example.com")
    layer = licensing.Licensing(services.store, services.ring, services.catalog, "http://test", 24)
    request = licensing.LicenseRequest(layer.key(lic), "machine-1")
    for _ in range(2):  # the second time the key's signature is remembered
        assert layer.check(request, services.now())["code"] == licensing.VALID
    keys_dir = services.config.keys_dir
    keys.create_key(keys_dir, now=time.time() + 1)
    (keys_dir / f"{lic.key_kid}{keys.KEY_SUFFIX}").unlink()
    services.ring._checked = 0.0  # the ring looks at its folder now, not in up to 2 s
    assert services.ring.current.kid != lic.key_kid
    assert layer.check(request, services.now())["code"] == licensing.INVALID_KEY
