"""waitress as ``licensed serve`` sets it up: no busy main loop, and every byte still goes out."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from waitress import wasyncore
from waitress.server import BaseWSGIServer

import channel
import licensed
from config import Config

BODY = b"x" * 1024


def small_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))])
    return [BODY]


CHUNK = b"y" * 65536
CHUNKS = 64  # 4 MiB


def large_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(CHUNK) * CHUNKS))])
    return (CHUNK for _ in range(CHUNKS))


class Served:
    def __init__(self, app: Callable[..., Any], threads: int) -> None:
        self.server = licensed.create_server(app, Config(host="127.0.0.1", port=0, threads=threads))  # type: ignore[arg-type]
        self.port = int(self.server.effective_port)
        self.turns = 0
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        try:
            while not self.halt.is_set():
                self.server.asyncore.loop(timeout=0.05, map=self.server._map, count=1)
                self.turns += 1
        finally:
            wasyncore.close_all(self.server._map)
            self.server.task_dispatcher.shutdown()

    def stop(self) -> None:
        self.halt.set()
        self.thread.join(timeout=10)


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[..., Any], int], Served]]:
    started: list[Served] = []

    def start(app: Callable[..., Any], threads: int) -> Served:
        started.append(Served(app, threads))
        return started[-1]

    yield start
    for served in started:
        served.stop()


def read_response(sock: socket.socket, buffer: bytes) -> tuple[bytes, bytes]:
    """One response off a keep-alive socket: (its body, what follows it)."""
    while b"\r\n\r\n" not in buffer:
        buffer += recv(sock)
    head, _, buffer = buffer.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(buffer) < length:
        buffer += recv(sock)
    return buffer[:length], buffer[length:]


def recv(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    assert data, "the server closed the connection"
    return data


def test_channels_are_quiet(serve: Callable[[Callable[..., Any], int], Served]) -> None:
    served = serve(small_app, 1)
    for dispatcher in served.server._map.values():
        if isinstance(dispatcher, BaseWSGIServer):
            assert dispatcher.channel_class is channel.QuietChannel


def test_more_connections_than_threads_do_not_spin_the_main_loop(
    serve: Callable[[Callable[..., Any], int], Served],
) -> None:
    """One worker thread, eight keep-alive clients: each request costs the main loop a turn
    or two. While a worker sent a response, the stock channel spun the loop until the
    interpreter's switch interval ran out: 261 turns per request when this test was written."""
    served = serve(small_app, 1)
    clients, each = 8, 50
    request = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{served.port}\r\n\r\n".encode()
    failures: list[BaseException] = []
    start = threading.Barrier(clients + 1)

    def client() -> None:
        try:
            with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
                buffer = b""
                start.wait(timeout=10)
                for _ in range(each):
                    sock.sendall(request)
                    body, buffer = read_response(sock, buffer)
                    assert body == BODY
        except BaseException as err:  # reported below
            failures.append(err)

    workers = [threading.Thread(target=client) for _ in range(clients)]
    for worker in workers:
        worker.start()
    start.wait(timeout=10)
    turns_before = served.turns
    for worker in workers:
        worker.join(timeout=60)
    turns = served.turns - turns_before
    assert not failures, failures
    assert turns / (clients * each) < 10, f"{turns} turns of the main loop for {clients * each} requests"


def test_a_large_answer_to_a_slow_reader_arrives_whole(
    serve: Callable[[Callable[..., Any], int], Served],
) -> None:
    served = serve(large_app, 1)
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{served.port}\r\n\r\n".encode())
        deadline = time.monotonic() + 60
        received = b""
        while b"\r\n\r\n" not in received:
            received += recv(sock)
        _head, _, body = received.partition(b"\r\n\r\n")
        total = len(CHUNK) * CHUNKS
        while len(body) < total and time.monotonic() < deadline:
            body += sock.recv(16384)
            if len(body) < total // 2:
                time.sleep(0.001)  # a slow reader for the first half: the server's buffer fills
        assert len(body) == total and set(body) == {CHUNK[0]}
        # The connection stays usable: a second request is answered in full too.
        sock.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{served.port}\r\n\r\n".encode())
        second, _ = read_response(sock, b"")
        assert len(second) == total
