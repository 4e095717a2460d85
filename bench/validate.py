"""Validation under the traffic users have: many installations, each with its own key and machine.

Thousands of installations each validate their own key every few hours, so a
server never sees the same request twice in a row. This benchmark has N
licences (default 10,000), each already activated on its own machine, and
walks the N (key, machine) pairs in order: a pair comes back only after all
the others. Three servers run, each in its own process on 127.0.0.1:

* ``plain``: a WSGI app answering a constant JSON body under
  ``waitress.serve(threads=8)`` with waitress' defaults;
* ``tuned``: the same app under licensed's own server settings
  (``licensed.server.keep_to_cpus`` and ``create_server``: one CPU, poll,
  connection limit, the quiet channel);
* ``licensed``: ``python -m licensed serve`` on the data dir.

wrk (``apt-get install wrk``) drives each in turn with keep-alive connections,
in alternating rounds, and the medians are printed: requests/s, the ratio of
licensed to plain, and wrk's p50/p99. Then licensed alone at half its
sustained rate (each connection paced), for the latency a busy server gives,
and the server's resident memory after all of it. Then one pass in which every
validation finds its machine's hourly last-seen stamp due, as an installation
validating every few hours does: the stamps are aged two hours and the pass is
shorter than one walk of the licences, so each request writes. A last line
repeats one licence's request over and over, for comparison.

Every answer is checked: wrk counts non-2xx answers, and the server's own
``/metrics`` must count exactly as many ``VALID`` answers as wrk sent.

    python bench/validate.py [--licences 10000] [--rounds 3] [--seconds 10] [--connections 32]

``CPU_AFFINITY=all python bench/validate.py`` runs licensed and the tuned app
with their threads on every CPU instead of one, for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from licensed import keys, licensing
from licensed.config import Config
from licensed.server import create_server, init_data_dir, keep_to_cpus
from licensed.services import build_services

BODY = json.dumps({"valid": True, "code": "VALID", "activated": True}).encode()
HOST = "127.0.0.1"
PLANS = """\
[products.app]
name = "App"
key_prefix = "AP"

[plans.pro-year]
product = "app"
name = "App Pro, one year"
tier = "PRO"
max_machines = 1
features = ["sso"]
duration_days = 365
"""

WRK_SCRIPT = """\
-- Each wrk thread walks its own share of the request bodies, in order.
local counter = 0
function setup(thread)
  thread:set("index", counter)
  counter = counter + 1
end

local bodies = {}
local next_body = 0
local pause = 0
function init(args)
  local count, n = tonumber(args[2]), 0
  for line in io.lines(args[1]) do
    if n % count == index then bodies[#bodies + 1] = line end
    n = n + 1
  end
  pause = tonumber(args[3] or "0")
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  next_body = next_body % #bodies + 1
  return wrk.format(nil, "/api/license/validate", nil, bodies[next_body])
end

function delay()
  return pause
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'RESULT {"requests": %d, "seconds": %.3f, "non2xx": %d, "socket_errors": %d, '
    .. '"p50_ms": %.3f, "p99_ms": %.3f}\\n',
    summary.requests, summary.duration / 1e6, errors.status,
    errors.connect + errors.read + errors.write + errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


# --- the constant app (run as: validate.py --constant plain|tuned) ----------------------------


def constant_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(BODY)))])
    return [BODY]


def serve_constant(kind: str, port: int, threads: int) -> None:
    if kind == "plain":
        import waitress

        waitress.serve(constant_app, host=HOST, port=port, threads=threads, _quiet=True)
    else:
        # CPU_AFFINITY from the environment, as the licensed server reads it, for comparisons.
        affinity = Config.from_mapping({"CPU_AFFINITY": os.environ.get("CPU_AFFINITY", "")}).cpu_affinity
        config = Config(host=HOST, port=port, threads=threads, cpu_affinity=affinity)
        keep_to_cpus(config.cpu_affinity)
        create_server(constant_app, config).run()  # type: ignore[arg-type]


# --- set-up --------------------------------------------------------------------------------------


def make_licences(data_dir: Path, count: int) -> list[bytes]:
    """``count`` licences in one transaction, each activated on its own machine; their bodies."""
    data_dir.mkdir(mode=0o700)
    (data_dir / "plans.toml").write_text(PLANS, encoding="utf-8")
    config = Config(data_dir=data_dir)
    now = int(time.time())
    init_data_dir(config, now)
    services = build_services(config)
    plan = services.catalog.plans["pro-year"]
    bodies = []
    with services.store.atomic():
        for n in range(count):
            customer = services.store.upsert_customer(now, email=f"user{n}@example.com")
            lic = licensing.new_license(
                plan=plan, customer_id=customer, ring=services.ring, now=now, source="bench"
            )
            services.store.insert_license(lic)
            machine = f"host-{n:05d}.example.net"
            services.store.add_machine(lic.id, keys.machine_hash(machine), now)
            body = {"key": services.licensing.key(lic), "machine_id": machine}
            bodies.append(json.dumps(body, separators=(",", ":")).encode())
    services.store.close()
    return bodies


def age_stamps(database: Path, hours: int) -> int:
    """Move every machine's last-seen stamp ``hours`` back; returns the newest stamp left."""
    with sqlite3.connect(database, timeout=30) as conn:
        conn.execute("UPDATE machines SET last_seen_at = last_seen_at - ?", (hours * 3600,))
        newest = conn.execute("SELECT MAX(last_seen_at) FROM machines").fetchone()[0]
    conn.close()
    return int(newest)


def stamps_since(database: Path, newest_before: int) -> int:
    """How many machines were stamped after the stamps were aged."""
    with sqlite3.connect(database, timeout=30) as conn:
        count = conn.execute("SELECT COUNT(*) FROM machines WHERE last_seen_at > ?", (newest_before,))
        stamped = int(count.fetchone()[0])
    conn.close()
    return stamped


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def start(command: list[str], port: int, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"{command} exited with {proc.returncode}") from None
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"{command} did not listen on {port}")


def wrk(port: int, bodies: Path, seconds: float, connections: int, pause_ms: int = 0) -> dict[str, Any]:
    script = bodies.with_suffix(".lua")
    threads = 2
    run = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{round(seconds)}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            f"http://{HOST}:{port}",
            "--",
            str(bodies),
            str(threads),
            str(pause_ms),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    result["rate"] = result["requests"] / result["seconds"]
    if result["non2xx"] or result["socket_errors"]:
        raise SystemExit(f"wrk saw errors: {result}")
    return result


def valid_answers(port: int) -> int:
    import urllib.request

    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    for line in text.splitlines():
        if line.startswith('licensed_license_answers_total{action="validate",code="VALID"}'):
            return int(line.rsplit(" ", 1)[1])
    return 0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--licences", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--constant", choices=("plain", "tuned"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.constant:
        serve_constant(args.constant, args.port, args.threads)
        return
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.monotonic()
        bodies = make_licences(work / "data", args.licences)
        took = time.monotonic() - started
        print(f"{len(bodies)} licences, each activated on its own machine ({took:.1f} s)")
        all_bodies, one_body = work / "bodies.txt", work / "one.txt"
        all_bodies.write_bytes(b"\n".join(bodies) + b"\n")
        one_body.write_bytes((bodies[0] + b"\n") * 2)  # one line for each wrk thread
        for path in (all_bodies, one_body):
            path.with_suffix(".lua").write_text(WRK_SCRIPT)

        ports = {name: free_port() for name in ("plain", "tuned", "licensed")}
        env = {**os.environ, "DATA_DIR": str(work / "data"), "PORT": str(ports["licensed"]), "HOST": HOST}
        env.update(RATE_LIMIT_PER_MINUTE="0", THREADS=str(args.threads))  # logs at the default INFO
        me = [sys.executable, __file__, "--threads", str(args.threads)]
        procs = {
            "plain": start([*me, "--constant", "plain", "--port", str(ports["plain"])], ports["plain"]),
            "tuned": start([*me, "--constant", "tuned", "--port", str(ports["tuned"])], ports["tuned"]),
            "licensed": start([sys.executable, "-m", "licensed", "serve"], ports["licensed"], env),
        }
        try:
            sent = 0
            rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in procs}
            for number in range(1, args.rounds + 1):
                for name in ("plain", "tuned", "licensed"):
                    result = wrk(ports[name], all_bodies, args.seconds, args.connections)
                    rounds[name].append(result)
                    if name == "licensed":
                        sent += result["requests"]
                ratio = rounds["licensed"][-1]["rate"] / rounds["plain"][-1]["rate"]
                print(
                    f"round {number}: "
                    + ", ".join(f"{n} {r[-1]['rate']:.0f}/s" for n, r in rounds.items())
                    + f"; licensed/plain {ratio:.2f}"
                )
            print()
            print("| server | req/s (median) | p50 ms | p99 ms |")
            print("|---|---|---|---|")
            for name, results in rounds.items():
                print(
                    f"| {name} | {statistics.median(r['rate'] for r in results):.0f} "
                    f"| {statistics.median(r['p50_ms'] for r in results):.2f} "
                    f"| {statistics.median(r['p99_ms'] for r in results):.2f} |"
                )
            pairs = zip(rounds["licensed"], rounds["plain"], strict=True)
            ratios = [lic["rate"] / plain["rate"] for lic, plain in pairs]
            tuned = [t["rate"] / p["rate"] for t, p in zip(rounds["tuned"], rounds["plain"], strict=True)]
            each = ", ".join(f"{r:.2f}" for r in ratios)
            print(f"\nlicensed / plain: {statistics.median(ratios):.2f} (rounds: {each})")
            print(f"tuned / plain: {statistics.median(tuned):.2f}")

            sustained = statistics.median(r["rate"] for r in rounds["licensed"])
            target = sustained / 2
            pause = max(0, round(args.connections * 1000 / target))
            paced = wrk(ports["licensed"], all_bodies, args.seconds, args.connections, pause)
            sent += paced["requests"]
            print(
                f"at half the sustained rate ({paced['rate']:.0f}/s, target {target:.0f}/s): "
                f"p50 {paced['p50_ms']:.2f} ms, p99 {paced['p99_ms']:.2f} ms"
            )
            print(f"licensed RSS after the run: {rss_mib(procs['licensed'].pid):.1f} MiB")

            database = work / "data" / "licensed.sqlite3"
            aged_before = age_stamps(database, hours=2)
            due_seconds = max(1, int(0.8 * args.licences / sustained))
            due = wrk(ports["licensed"], all_bodies, min(args.seconds, due_seconds), args.connections)
            sent += due["requests"]
            plain_rate = statistics.median(r["rate"] for r in rounds["plain"])
            print(
                f"every validation writing its last-seen stamp: {due['rate']:.0f}/s "
                f"({due['rate'] / plain_rate:.2f} of plain), p50 {due['p50_ms']:.2f} ms, "
                f"p99 {due['p99_ms']:.2f} ms; stamps written {stamps_since(database, aged_before)} "
                f"for {due['requests']} validations"
            )

            single = wrk(ports["licensed"], one_body, args.seconds, args.connections)
            sent += single["requests"]
            print(f"one licence over and over (for comparison): {single['rate']:.0f}/s")
            counted = valid_answers(ports["licensed"])
            # wrk stops with requests in flight: the server may have answered a few more.
            in_flight = args.connections * (args.rounds + 3)
            print(f"VALID answers counted by the server: {counted} ({sent} completed in wrk)")
            if not sent <= counted <= sent + in_flight:
                raise SystemExit("the server did not answer VALID to every request")
        finally:
            for proc in procs.values():
                proc.terminate()
            for proc in procs.values():
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    main()
