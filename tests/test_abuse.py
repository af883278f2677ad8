"""Slow and greedy clients against the real server: they cost their own connection, not others'."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_service import FRONTS, Server, front_env

SLOW_UPLOAD = (b"POST /v1/feedback HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
               b"Content-Length: 200\r\n\r\n[")  # fmt: skip


def _like(user: str) -> dict[str, str]:
    return {"event_id": uuid.uuid4().hex, "user_id": user, "item_id": "3", "kind": "like"}


def _read_all(sock: socket.socket, timeout_s: float) -> bytes:
    """Everything the server sends until it closes the connection (or the timeout)."""
    sock.settimeout(timeout_s)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except TimeoutError:
        pass
    return b"".join(chunks)


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


@pytest.mark.parametrize("front", FRONTS)
def test_slow_uploads_do_not_hold_the_in_flight_bound(
    tmp_path: Path, front: str, sockets: list[socket.socket]
) -> None:
    """Counted in flight before their bodies arrived, a few trickling uploads made every other
    client's write a 503 and every read the popularity fallback, for as long as they lasted."""
    srv = Server(tmp_path / "state", {**front_env(front), "SIGNEDREC_LIMITS__MAX_INFLIGHT": "2"})
    try:
        for _ in range(4):
            sockets.append(socket.create_connection(("127.0.0.1", srv.port)))
            sockets[-1].sendall(SLOW_UPLOAD)
        time.sleep(0.5)
        answer = srv.client.post("/v1/feedback", json=_like("alice"))
        assert answer.status_code == 200, answer.text
        assert answer.json()["accepted"] == 1
        assert srv.client.get("/v1/recommendations/3").json()["fallback"] is False
    finally:
        srv.stop()


def test_uvicorn_bounds_a_requests_read_time_and_a_connections_pipeline(
    tmp_path: Path, sockets: list[socket.socket]
) -> None:
    """uvicorn has neither bound: headers or a body trickled a byte at a time held a
    connection (a file descriptor) for ever, and a client pipelining without reading its
    answers grew the server's memory without bound."""
    env = {**front_env("uvicorn"), "SIGNEDREC_SERVER__REQUEST_READ_TIMEOUT_S": "2",
           "SIGNEDREC_SERVER__MAX_PIPELINED": "8"}  # fmt: skip
    srv = Server(tmp_path / "state", env)
    try:
        address = ("127.0.0.1", srv.port)
        headers, upload = socket.create_connection(address), socket.create_connection(address)
        silent = socket.create_connection(address)  # never sends a byte
        sockets.extend([headers, upload, silent])
        headers.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        upload.sendall(SLOW_UPLOAD)
        started = time.monotonic()
        answer = _read_all(headers, 10.0)
        assert time.monotonic() - started < 6.0
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ")
        assert json.loads(body)["error"]["code"] == "request_timeout"
        assert _read_all(silent, 10.0).startswith(b"HTTP/1.1 408 ")  # it stayed open for ever
        # The upload is cut off too; its app call saw a disconnect, so nothing was applied.
        assert b"200 OK" not in _read_all(upload, 10.0)
        # Pipelining a few is served in order; flooding closes the connection, nothing else.
        polite = socket.create_connection(address)
        sockets.append(polite)
        last = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        polite.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" * 5 + last)
        assert _read_all(polite, 10.0).count(b"HTTP/1.1 200 OK") == 6
        greedy = socket.create_connection(address)
        sockets.append(greedy)
        greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        flood = b"GET /v1/recommendations/3?k=200 HTTP/1.1\r\nHost: t\r\n\r\n" * 20_000
        greedy.settimeout(10.0)
        try:
            greedy.sendall(flood)
            _read_all(greedy, 10.0)
        except OSError:  # reset or broken pipe: the server closed it mid-send
            pass
        deadline = time.monotonic() + 10.0
        while "pipelined requests waiting (server.max_pipelined)" not in srv.log_text():
            assert time.monotonic() < deadline, srv.log_text()[-2000:]
            time.sleep(0.1)
        assert srv.client.post("/v1/feedback", json=_like("bob")).status_code == 200
    finally:
        srv.stop()


@pytest.mark.parametrize("front", FRONTS)
def test_a_stalled_client_does_not_spoil_a_graceful_stop(
    tmp_path: Path, front: str, sockets: list[socket.socket]
) -> None:
    """granian raised a TimeoutError when a connection outlived the grace period: exit 3 and
    tracebacks, although the app had shut down cleanly. Both fronts exit 0 with a snapshot."""
    env = {**front_env(front), "SIGNEDREC_SERVER__GRACEFUL_SHUTDOWN_S": "1"}
    srv = Server(tmp_path / "state", env)
    assert srv.client.post("/v1/feedback", json=_like("carol")).status_code == 200
    for payload in (b"GET /healthz HTTP/1.1\r\nHo", SLOW_UPLOAD):
        sockets.append(socket.create_connection(("127.0.0.1", srv.port)))
        sockets[-1].sendall(payload)
    time.sleep(0.3)
    assert srv.stop() == 0, srv.log_text()[-3000:]
    assert (tmp_path / "state" / "snapshot.msgpack").is_file()
