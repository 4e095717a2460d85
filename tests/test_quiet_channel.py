"""The waitress channel subclass relies on waitress internals: only the waitress it was tested with."""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import socket
import threading

import pytest
import requests
from support.live import Live
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask, Task

from licensed import quiet_channel

TESTED_SOURCES = {
    # sha256 of the source of each waitress method QuietChannel's behaviour depends on, as tested
    "writable": "d0cbd4ae1b3ba2a3",
    "_flush_some_if_lockable": "51e124355e631f49",
    "handle_write": "6c900f395b306f09",
}
TESTED_TASK_SOURCES = {
    # what JsonErrorTask replaces and the task methods it calls
    (ErrorTask, "execute"): "4abe3262db04d291",
    (Task, "set_close_on_finish"): "90433a0ffcaf34a7",
}


def test_the_installed_waitress_is_one_the_channel_was_tested_with() -> None:
    assert importlib.metadata.version("waitress") in quiet_channel.TESTED_WAITRESS
    for name, digest in TESTED_SOURCES.items():
        source = inspect.getsource(getattr(HTTPChannel, name))
        assert hashlib.sha256(source.encode()).hexdigest()[:16] == digest, f"HTTPChannel.{name} changed"
    for (cls, name), digest in TESTED_TASK_SOURCES.items():
        source = inspect.getsource(getattr(cls, name))
        assert hashlib.sha256(source.encode()).hexdigest()[:16] == digest, f"{cls.__name__}.{name} changed"
    for attribute in ("will_close", "close_when_flushed", "outbuf_lock"):
        assert attribute in inspect.getsource(HTTPChannel), attribute


def test_the_server_opens_quiet_channels_and_answers_through_them(live: Live) -> None:
    key = live.issue()
    with requests.Session() as http:  # keep-alive: many answers on one channel
        for _ in range(20):
            answer = http.post(live.url + "/api/license/validate", json={"key": key}, timeout=10)
            assert answer.json()["code"] == "VALID"
    with socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in reply


def test_a_channel_whose_buffer_a_worker_holds_is_not_writable() -> None:
    channel = quiet_channel.QuietChannel.__new__(quiet_channel.QuietChannel)
    # The parts of the channel writable() reads, as waitress sets them up.
    channel.will_close = False
    channel.close_when_flushed = False
    channel.total_outbufs_len = 10
    channel.outbuf_lock = threading.Condition()
    assert channel.writable()
    held, done = threading.Event(), threading.Event()

    def worker() -> None:  # a worker thread sending the buffer
        with channel.outbuf_lock:
            held.set()
            done.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert held.wait(10)
        assert not channel.writable()
        channel.close_when_flushed = True  # closing: the main loop must look
        assert channel.writable()
    finally:
        done.set()
        thread.join(10)


def raw_exchange(live: Live, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


@pytest.mark.parametrize(
    ("head", "status", "code"),
    [
        (b"Content-Length:", 400, "BAD_REQUEST"),
        (b"Content-Length: 1e3", 400, "BAD_REQUEST"),
        (b"Transfer-Encoding: gzip, chunked", 501, "NOT_IMPLEMENTED"),
    ],
    ids=["empty-length", "bad-length", "unknown-coding"],
)
def test_requests_waitress_refuses_are_answered_in_the_json_error_body(
    live: Live, head: bytes, status: int, code: str
) -> None:
    """A request waitress cannot parse never reaches the app; its answer still has the
    spec's error body, never waitress' plain text."""
    request = b"POST /api/license/validate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + head + b"\r\n\r\n"
    reply = raw_exchange(live, request)
    head_part, _, body = reply.partition(b"\r\n\r\n")
    assert head_part.startswith(f"HTTP/1.1 {status} ".encode()), reply[:200]
    assert b"content-type: application/json; charset=utf-8" in head_part.lower()
    error = json.loads(body)["error"]
    assert error["code"] == code and error["message"]
