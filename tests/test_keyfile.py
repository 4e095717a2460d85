"""``licensed keys export`` / ``import``: the signing keys that a restored database needs.

In-process tests use libsodium's smallest Argon2id limits to stay fast; the
command-line tests run ``python -m licensed`` with the real ones.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nacl.pwhash
import nacl.signing
import pytest
from support.plans import TEST_PLANS
from support.server_proc import run_cli

from licensed import keyfile, keys, licensing
from licensed.config import Config
from licensed.errors import ConfigError, KeyConflict, KeyFileError, WrongPassphrase
from licensed.keys import KeyRing, SigningKey
from licensed.server import init_data_dir, missing_signers
from licensed.services import build_services

ROOT = Path(__file__).resolve().parent.parent
PASSPHRASE = "a long enough passphrase"
FAST = {"opslimit": nacl.pwhash.argon2id.OPSLIMIT_MIN, "memlimit": nacl.pwhash.argon2id.MEMLIMIT_MIN}


def config_for(data: Path, passphrase: str | None = PASSPHRASE) -> Config:
    return Config(data_dir=data, keys_passphrase=passphrase)


@pytest.fixture
def source(tmp_path: Path) -> Config:
    """A data dir with two signing keys: a retired one and the one that signs."""
    config = config_for(tmp_path / "source")
    init_data_dir(config, int(time.time()))
    keys.create_key(config.keys_dir, time.time() + 1)
    return config


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def seeds(keys_dir: Path) -> dict[str, bytes]:
    return {k.kid: bytes(k.key) for k in KeyRing(keys_dir).keys}


def key_files(keys_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in keys_dir.glob("*")} if keys_dir.exists() else {}


def test_round_trip_brings_back_every_key(source: Config, tmp_path: Path, umask_022: None) -> None:
    target = tmp_path / "keys.licensed-keys"
    kids = keyfile.export_keys(source, target, time.time(), **FAST)
    assert kids == [k.kid for k in KeyRing(source.keys_dir).keys] and len(kids) == 2
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert b"seed" not in target.read_bytes()  # the seeds are inside the box only

    restored = config_for(tmp_path / "restored")
    result = keyfile.import_keys(restored, target)
    assert result.imported == kids and result.present == []
    assert seeds(restored.keys_dir) == seeds(source.keys_dir)
    ring = KeyRing(restored.keys_dir)
    assert ring.current.kid == KeyRing(source.keys_dir).current.kid, "the newest key signs again"
    assert [k.created_at for k in ring.keys] == [k.created_at for k in KeyRing(source.keys_dir).keys]
    for path in restored.keys_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(restored.keys_dir.stat().st_mode) == 0o700

    again = keyfile.import_keys(restored, target)
    assert again.imported == [] and again.present == kids


def test_a_restored_ring_verifies_what_the_old_one_signed(source: Config, tmp_path: Path) -> None:
    (source.data_dir / "plans.toml").write_text(TEST_PLANS, encoding="utf-8")
    services = build_services(source)
    try:
        plan = services.catalog.plans["pro-monthly"]
        lic = licensing.issue_license(
            services.store, services.ring, plan, email="a@example.com", now=services.now(), actor="t", days=30
        )
        key = licensing.license_key(lic, services.catalog, services.ring, "http://licensed.test")
    finally:
        services.store.close()
    target = tmp_path / "keys.licensed-keys"
    keyfile.export_keys(source, target, time.time(), **FAST)
    restored = config_for(tmp_path / "restored")
    keyfile.import_keys(restored, target)
    parsed = keys.parse_license_key(key, services.catalog, KeyRing(restored.keys_dir))
    assert parsed.claims["sub"] == lic.id


@pytest.mark.parametrize("umask", [0o022, 0o000, 0o277])
def test_export_is_0600_whatever_the_umask(source: Config, tmp_path: Path, umask: int) -> None:
    target = tmp_path / "keys.licensed-keys"
    old = os.umask(umask)
    try:
        keyfile.export_keys(source, target, time.time(), **FAST)
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        # Overwriting a file that others could read leaves a private one.
        target.chmod(0o644)
        keyfile.export_keys(source, target, time.time(), force=True, **FAST)
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_export_refuses_to_overwrite_without_force(source: Config, tmp_path: Path) -> None:
    target = tmp_path / "keys.licensed-keys"
    target.write_text("precious")
    with pytest.raises(Exception, match="--force"):
        keyfile.export_keys(source, target, time.time(), **FAST)
    assert target.read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_wrong_passphrase_imports_nothing(source: Config, tmp_path: Path) -> None:
    target = tmp_path / "keys.licensed-keys"
    keyfile.export_keys(source, target, time.time(), **FAST)
    restored = config_for(tmp_path / "restored", "not the passphrase at all")
    with pytest.raises(WrongPassphrase, match="passphrase"):
        keyfile.import_keys(restored, target)
    assert key_files(restored.keys_dir) == {}


@pytest.mark.parametrize(
    ("field", "value"),
    [("opslimit", nacl.pwhash.argon2id.OPSLIMIT_MIN + 1), ("salt", "A" * 22 + "==")],
)
def test_an_altered_header_does_not_open(source: Config, tmp_path: Path, field: str, value: object) -> None:
    """Limits and salt are not signed, but they derive the key: changing them breaks the box."""
    target = tmp_path / "keys.licensed-keys"
    keyfile.export_keys(source, target, time.time(), **FAST)
    envelope = json.loads(target.read_text())
    envelope[field] = value
    target.write_text(json.dumps(envelope))
    with pytest.raises(WrongPassphrase):
        keyfile.import_keys(config_for(tmp_path / "restored"), target)


def test_a_flipped_bit_in_the_box_does_not_open(source: Config, tmp_path: Path) -> None:
    target = tmp_path / "keys.licensed-keys"
    keyfile.export_keys(source, target, time.time(), **FAST)
    envelope = json.loads(target.read_text())
    box = bytearray(keyfile._unb64(envelope["box"], "box"))
    box[-1] ^= 1
    envelope["box"] = keyfile._b64(bytes(box))
    target.write_text(json.dumps(envelope))
    restored = config_for(tmp_path / "restored")
    with pytest.raises(WrongPassphrase):
        keyfile.import_keys(restored, target)
    assert key_files(restored.keys_dir) == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not JSON"),
        ('{"format": "something else"}', "not a licensed key file"),
        ('{"format": "licensed-keys", "version": 2, "kdf": "argon2id13"}', "newer licensed"),
        (
            '{"format": "licensed-keys", "version": 1, "kdf": "argon2id13", "opslimit": 3,'
            ' "memlimit": 99999999999, "salt": "", "box": ""}',
            "memlimit",
        ),
    ],
)
def test_malformed_files_are_refused_before_any_work(tmp_path: Path, text: str, message: str) -> None:
    target = tmp_path / "keys.licensed-keys"
    target.write_text(text)
    with pytest.raises(KeyFileError, match=message):
        keyfile.import_keys(config_for(tmp_path / "restored"), target)


def test_a_file_whose_kid_names_another_key_is_refused(source: Config, tmp_path: Path) -> None:
    """A kid is derived from its public key: an entry pairing a kid here with another key
    is forged or corrupt, and nothing of the file is imported."""
    here = config_for(tmp_path / "here")
    init_data_dir(here, int(time.time()))
    (mine,) = KeyRing(here.keys_dir).keys
    before = key_files(here.keys_dir)
    other = nacl.signing.SigningKey.generate()
    genuine = KeyRing(source.keys_dir).keys
    forged = SigningKey(kid=mine.kid, created_at=mine.created_at, key=other)
    data, _ = keyfile.seal([*genuine, forged], PASSPHRASE.encode(), time.time(), **FAST)
    target = tmp_path / "forged.licensed-keys"
    target.write_bytes(data)
    with pytest.raises(KeyFileError, match="corrupt or forged"):
        keyfile.import_keys(here, target)
    assert key_files(here.keys_dir) == before


def test_a_different_key_under_that_kid_here_is_never_replaced(source: Config, tmp_path: Path) -> None:
    target = tmp_path / "keys.licensed-keys"
    keyfile.export_keys(source, target, time.time(), **FAST)
    first, second = KeyRing(source.keys_dir).keys
    # Here, the file named after the first key holds some other valid key.
    here = config_for(tmp_path / "here")
    init_data_dir(here, int(time.time()))
    (own,) = here.keys_dir.glob(f"*{keys.KEY_SUFFIX}")
    own.rename(keys.key_path(here.keys_dir, first.kid))
    before = key_files(here.keys_dir)
    with pytest.raises(KeyConflict, match="nothing was imported"):
        keyfile.import_keys(here, target)
    assert key_files(here.keys_dir) == before
    assert not keys.key_path(here.keys_dir, second.kid).exists()


def test_export_without_a_passphrase_is_a_clear_error(source: Config, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="LICENSED_KEYS_PASSPHRASE is not set"):
        keyfile.export_keys(config_for(source.data_dir, None), tmp_path / "k", time.time(), **FAST)
    assert not (tmp_path / "k").exists()


def test_a_short_passphrase_is_refused() -> None:
    with pytest.raises(ConfigError, match="LICENSED_KEYS_PASSPHRASE: must be at least 12"):
        Config.from_mapping({"LICENSED_KEYS_PASSPHRASE": "too short"})


# --- the command line ------------------------------------------------------------------


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT), "HOME": "/tmp"}
    return run_cli({**clean, **env}, *args)


def one_line_failure(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_cli_export_and_import(source: Config, tmp_path: Path) -> None:
    target = tmp_path / "keys.licensed-keys"
    env = {"DATA_DIR": str(source.data_dir), "LICENSED_KEYS_PASSPHRASE": PASSPHRASE}

    missing = cli({"DATA_DIR": str(source.data_dir)}, "keys", "export", str(target))
    assert missing.returncode == 2
    assert "LICENSED_KEYS_PASSPHRASE is not set" in one_line_failure(missing)
    assert not target.exists()

    done = cli(env, "keys", "export", str(target))
    assert done.returncode == 0, done.stderr
    kids = [k.kid for k in KeyRing(source.keys_dir).keys]
    assert all(kid in done.stdout for kid in kids)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600

    fresh = tmp_path / "fresh"
    wrong = cli(
        {"DATA_DIR": str(fresh), "LICENSED_KEYS_PASSPHRASE": "another passphrase!"},
        "keys",
        "import",
        str(target),
    )
    assert wrong.returncode == 1
    assert "passphrase" in one_line_failure(wrong)
    assert not (fresh / "keys").exists()

    imported = cli({**env, "DATA_DIR": str(fresh)}, "keys", "import", str(target))
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.splitlines()[0] == f"imported {', '.join(kids)}"
    assert seeds(fresh / "keys") == seeds(source.keys_dir)


def test_cli_rotate_reminds_to_export(source: Config) -> None:
    done = cli({"DATA_DIR": str(source.data_dir)}, "keys", "rotate")
    assert done.returncode == 0, done.stderr
    assert "licensed keys export" in done.stdout.splitlines()[1]


def test_the_passphrase_may_sit_in_the_env_file(source: Config, tmp_path: Path) -> None:
    env_file = tmp_path / "licensed.env"
    env_file.write_text(f"DATA_DIR={source.data_dir}\nLICENSED_KEYS_PASSPHRASE={PASSPHRASE}\n")
    target = tmp_path / "keys.licensed-keys"
    done = cli({}, "--env-file", str(env_file), "keys", "export", str(target))
    assert done.returncode == 0, done.stderr
    assert target.exists()


# --- a restored database without its keys ---------------------------------------------------


def test_no_new_key_for_a_database_that_holds_licenses(source: Config, tmp_path: Path) -> None:
    (source.data_dir / "plans.toml").write_text(TEST_PLANS, encoding="utf-8")
    services = build_services(source)
    try:
        plan = services.catalog.plans["pro-monthly"]
        licensing.issue_license(
            services.store, services.ring, plan, email="a@example.com", now=services.now(), actor="t", days=30
        )
        signer = services.ring.current.kid
    finally:
        services.store.close()
    saved = tmp_path / "saved-keys"
    source.keys_dir.rename(saved)
    with pytest.raises(ConfigError, match=f"signed by {signer}.*keys import"):
        init_data_dir(source, int(time.time()))
    assert not source.keys_dir.exists() or not any(source.keys_dir.iterdir())
    # Once the license has expired, a new key harms no one.
    init_data_dir(source, int(time.time()) + 60 * 86400)
    assert len(KeyRing(source.keys_dir).keys) == 1


def test_keys_missing_from_the_ring_are_named(source: Config, tmp_path: Path) -> None:
    """An import of an export older than the last rotation: the server starts, and says which
    signer of live keys it lacks."""
    (source.data_dir / "plans.toml").write_text(TEST_PLANS, encoding="utf-8")
    older = tmp_path / "older.licensed-keys"
    retired, newest = KeyRing(source.keys_dir).keys
    data, _ = keyfile.seal([retired], PASSPHRASE.encode(), time.time(), **FAST)
    older.write_bytes(data)
    services = build_services(source)
    try:
        plan = services.catalog.plans["pro-monthly"]
        licensing.issue_license(
            services.store, services.ring, plan, email="a@example.com", now=services.now(), actor="t", days=30
        )
        assert missing_signers(services) == []
    finally:
        services.store.close()
    restored = config_for(tmp_path / "restored")
    restored.data_dir.mkdir(mode=0o700)
    (restored.data_dir / "plans.toml").write_text(TEST_PLANS, encoding="utf-8")
    (source.data_dir / "licensed.sqlite3").rename(restored.db_path)
    keyfile.import_keys(restored, older)
    services = build_services(restored)
    try:
        assert missing_signers(services) == [newest.kid]
    finally:
        services.store.close()
