"""The waitress channel subclass relies on waitress internals: only the waitress it was tested with."""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import socket
import threading

import requests
from support.live import Live
from waitress.channel import HTTPChannel

from licensed import quiet_channel

TESTED_SOURCES = {
    # sha256 of the source of each waitress method QuietChannel's behaviour depends on, as tested
    "writable": "d0cbd4ae1b3ba2a3",
    "_flush_some_if_lockable": "51e124355e631f49",
    "handle_write": "6c900f395b306f09",
}


def test_the_installed_waitress_is_one_the_channel_was_tested_with() -> None:
    assert importlib.metadata.version("waitress") in quiet_channel.TESTED_WAITRESS
    for name, digest in TESTED_SOURCES.items():
        source = inspect.getsource(getattr(HTTPChannel, name))
        assert hashlib.sha256(source.encode()).hexdigest()[:16] == digest, f"HTTPChannel.{name} changed"
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
