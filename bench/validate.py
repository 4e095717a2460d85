"""How fast is ``POST /api/license/validate`` next to a bare waitress app?

One run starts two servers with the same waitress settings and thread count,
each in its own process:

* ``bare``: a WSGI app answering a constant JSON body, the ceiling that
  waitress itself allows on this machine;
* ``licensed``: the real ``licensed serve`` on a fresh data dir, with one
  issued licence whose key (and a machine id) every request validates.

Each is driven in turn by a separate client process holding keep-alive
connections (raw sockets, so the client costs little) for a fixed number of
requests, in alternating rounds. Printed: requests/s of each, the ratio,
and p50/p99 latency, per round and as medians.

    python bench/validate.py [--requests 10000] [--rounds 3] [--connections 16] [--threads 8]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BARE_BODY = json.dumps({"valid": True, "code": "VALID"}).encode()


# --- the bare server (run as: validate.py --bare) ------------------------------------------


def bare_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    stream = environ["wsgi.input"]
    stream.read(int(environ.get("CONTENT_LENGTH") or 0))
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(BARE_BODY)))])
    return [BARE_BODY]


def serve_bare(threads: int) -> None:
    """The bare app under the very server settings ``licensed serve`` uses."""
    from config import Config

    import licensed

    server = licensed.create_server(bare_app, Config(port=0, threads=threads))  # type: ignore[arg-type]
    print(json.dumps({"url": f"http://127.0.0.1:{server.effective_port}"}), flush=True)
    server.run()


# --- the client (run as: validate.py --drive URL) ---------------------------------------


def drive(url: str, path: str, body: bytes, connections: int, requests: int) -> dict[str, Any]:
    """Send ``requests`` POSTs over ``connections`` keep-alive sockets; return timings."""
    host, port = url.removeprefix("http://").split(":")
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    ).encode() + body
    per_connection = [requests // connections + (i < requests % connections) for i in range(connections)]
    latencies: list[list[float]] = [[] for _ in range(connections)]
    statuses: list[set[int]] = [set() for _ in range(connections)]
    start = threading.Barrier(connections + 1)

    def run(index: int) -> None:
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = b""
        start.wait()
        for _ in range(per_connection[index]):
            began = time.perf_counter()
            sock.sendall(request)
            while b"\r\n\r\n" not in buffer:
                buffer += _recv(sock)
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            statuses[index].add(int(head.split(b" ", 2)[1]))
            length = _content_length(head)
            while len(buffer) < length:
                buffer += _recv(sock)
            buffer = buffer[length:]
            latencies[index].append(time.perf_counter() - began)
        sock.close()

    workers = [threading.Thread(target=run, args=(i,)) for i in range(connections)]
    for worker in workers:
        worker.start()
    start.wait()
    began = time.perf_counter()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - began
    every = sorted(x for chunk in latencies for x in chunk)
    return {
        "requests": len(every),
        "seconds": elapsed,
        "rps": len(every) / elapsed,
        "p50_ms": statistics.median(every) * 1000,
        "p99_ms": every[min(len(every) - 1, int(len(every) * 0.99))] * 1000,
        "statuses": sorted({s for chunk in statuses for s in chunk}),
    }


def _recv(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise ConnectionError("server closed the connection")
    return data


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise ValueError("no Content-Length")


def run_client(url: str, body: bytes, connections: int, requests: int) -> dict[str, Any]:
    """The client in its own process, so it does not share the servers' GIL."""
    done = subprocess.run(
        [
            sys.executable,
            __file__,
            "--drive",
            url,
            "--connections",
            str(connections),
            "--requests",
            str(requests),
        ],
        input=body,
        capture_output=True,
        check=True,
        timeout=600,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# --- the orchestration --------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_url(log: Path, process: subprocess.Popen[bytes], timeout: float = 30) -> str:
    """The URL ``licensed serve`` logs once it listens (one JSON object per line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()}")
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("msg") == "listening":
                return str(entry["url"])
        time.sleep(0.05)
    raise TimeoutError("the server did not start")


def issue_key(data_dir: Path) -> str:
    import licensing
    from config import Config

    import licensed

    config = Config(data_dir=data_dir)
    licensed.init_data_dir(config, int(time.time()))
    services = licensed.build_services(config)
    try:
        plan = services.catalog.plans["dashcaddy-pro-year"]
        lic = licensing.issue_license(
            services.store, services.ring, plan, email="bench@example.com", now=services.now(), actor="bench"
        )
        return licensing.license_key(lic, services.catalog, services.ring, config.app_base_url)
    finally:
        services.store.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=10000, help="requests per server (fixed)")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive client connections")
    parser.add_argument("--threads", type=int, default=8, help="waitress threads of both servers")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--no-machine", action="store_true", help="validate without a machine_id")
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--drive", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.bare:
        serve_bare(args.threads)
        return
    if args.drive:
        body = sys.stdin.buffer.read()
        print(json.dumps(drive(args.drive, "/api/license/validate", body, args.connections, args.requests)))
        return

    with tempfile.TemporaryDirectory(prefix="licensed-bench-") as tmp:
        data_dir = Path(tmp) / "data"
        key = issue_key(data_dir)
        request: dict[str, str] = {"key": key}
        if not args.no_machine:
            request["machine_id"] = "bench-machine"
        body = json.dumps(request).encode()

        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "DATA_DIR": str(data_dir),
            "PORT": "0",
            "THREADS": str(args.threads),
            "RATE_LIMIT_PER_MINUTE": "0",
        }
        bare_cmd = [sys.executable, __file__, "--bare", "--threads", str(args.threads)]
        app_cmd = [sys.executable, "-m", "licensed", "serve"]
        processes: list[subprocess.Popen[bytes]] = []
        try:
            urls: dict[str, str] = {}
            for name, command in (("bare", bare_cmd), ("licensed", app_cmd)):
                log = Path(tmp) / f"{name}.log"
                with log.open("wb") as log_file:
                    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=log_file)
                processes.append(process)
                if name == "bare":
                    assert process.stdout is not None
                    urls[name] = json.loads(process.stdout.readline())["url"]
                else:
                    urls[name] = wait_for_url(log, process)
                run_client(urls[name], body, args.connections, max(200, args.requests // 20))  # warm-up
            # Rounds alternate between the servers, so a burst of load from
            # elsewhere on the machine does not land on one of them only.
            pids = {name: process.pid for name, process in zip(urls, processes, strict=True)}
            rounds: list[dict[str, dict[str, Any]]] = []
            for _ in range(args.rounds):
                results: dict[str, dict[str, Any]] = {}
                for name, url in urls.items():
                    cpu_before = cpu_seconds(pids[name])
                    results[name] = run_client(url, body, args.connections, args.requests)
                    results[name]["cpu_us"] = (cpu_seconds(pids[name]) - cpu_before) / args.requests * 1e6
                rounds.append(results)
        finally:
            for process in processes:
                process.terminate()
                process.wait(timeout=10)

    print(
        f"{args.requests} requests per server and round, {args.rounds} rounds, "
        f"{args.connections} keep-alive connections, {args.threads} waitress threads, "
        f"{os.cpu_count()} CPUs, validate {'without' if args.no_machine else 'with'} machine_id"
    )
    for number, results in enumerate(rounds, start=1):
        for name, result in results.items():
            assert result["statuses"] == [200], result
            print(
                f"round {number} {name:>8}: {result['rps']:7.0f} req/s   p50 {result['p50_ms']:6.2f} ms   "
                f"p99 {result['p99_ms']:6.2f} ms   server CPU {result['cpu_us']:5.0f} us/request"
            )
    for name in ("bare", "licensed"):
        print(
            f"median  {name:>8}: {statistics.median(r[name]['rps'] for r in rounds):7.0f} req/s   "
            f"p50 {statistics.median(r[name]['p50_ms'] for r in rounds):6.2f} ms   "
            f"p99 {statistics.median(r[name]['p99_ms'] for r in rounds):6.2f} ms   "
            f"server CPU {statistics.median(r[name]['cpu_us'] for r in rounds):5.0f} us/request"
        )
    ratios = [r["licensed"]["rps"] / r["bare"]["rps"] for r in rounds]
    cpu_ratios = [r["bare"]["cpu_us"] / r["licensed"]["cpu_us"] for r in rounds]
    print(
        f"ratio licensed/bare in req/s: {', '.join(f'{x:.2f}' for x in ratios)};"
        f" median {statistics.median(ratios):.2f} (goal >= 0.75)"
    )
    # On a machine busy with other work, req/s follow the CPU share each server
    # happens to get; the CPU each request costs the server is the steadier figure.
    print(
        f"ratio by server CPU per request (bare/licensed): {', '.join(f'{x:.2f}' for x in cpu_ratios)};"
        f" median {statistics.median(cpu_ratios):.2f}"
    )


if __name__ == "__main__":
    main()
