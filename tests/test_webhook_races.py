"""The webhook under races the HTTP tests cannot time: a retry while the first write is still in
flight, a request cancelled mid-write, refused requests and the idempotency window. The real app
(litestar, log, index) runs in the test's own event loop behind httpx's ASGI transport, with
disk faults injected through the log's fsync hook."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest

from server import events
from server.api import create_app
from server.config import load_config
from server.events import read_records
from server.service import Service

LIKE = {"user_id": "alice", "item_id": "3", "kind": "like"}


@asynccontextmanager
async def running(
    artifact: Path, state_dir: Path, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, Service]]:
    """The app started in this loop (no lifespan), and a client talking to it."""
    app = create_app(artifact, state_dir, load_config(env=env or {}))
    service: Service = app.state["service"]
    # A served process freezes the collector after loading; this one is the test session.
    with mock.patch("server.service.tune_gc", return_value=None):
        await service.start()
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client, service
    finally:
        service.stopping = True
        if service.snapshotting is not None:
            await asyncio.wait([service.snapshotting])
        await service.live().close()


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


def logged(state_dir: Path) -> list[tuple[int, str]]:
    """(seq, event id) of every record in the log, read from disk."""
    return [(r.seq, r.event_id) for batch in read_records(state_dir / "events")[1] for r in batch]


def slow_fsync(fail_first: int) -> Callable[[int], None]:
    """An fsync that takes 0.3 s and fails with EIO on its first ``fail_first`` calls."""
    calls = [0]

    def fsync(fd: int) -> None:
        calls[0] += 1
        time.sleep(0.3)
        if calls[0] <= fail_first:
            raise OSError(errno.EIO, "injected")
        events.os.fsync(fd)

    return fsync


@pytest.mark.parametrize("first_fails", [False, True])
def test_a_retry_during_the_first_write_waits_for_its_outcome(
    tiny_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first_fails: bool
) -> None:
    """The client times out and retries while its first write waits on fsync: the retry is a
    duplicate only if that write lands; if it fails, the retry writes the event itself, so an
    acknowledged event is always in the log, exactly once."""
    body = {"event_id": "ev-1", **LIKE}

    async def scenario() -> None:
        async with running(tiny_artifact, tmp_path / "state") as (client, service):
            monkeypatch.setattr(events, "_fsync", slow_fsync(fail_first=int(first_fails)))
            first = asyncio.ensure_future(client.post("/v1/feedback", json=body))
            await asyncio.sleep(0.1)  # the first write is waiting on its fsync
            retry = await client.post("/v1/feedback", json=body)
            answer = await first
            if first_fails:
                assert answer.status_code == 503
                assert retry.json() == {"accepted": 1, "duplicates": 0}
            else:
                assert answer.json() == {"accepted": 1, "duplicates": 0}
                assert retry.json() == {"accepted": 0, "duplicates": 1}
            history = (await client.get("/v1/users/alice/history")).json()["events"]
            assert [e["event_id"] for e in history] == ["ev-1"]
            assert not service.live().reserved

    run(scenario())
    assert logged(tmp_path / "state") == [(1, "ev-1")]


def test_a_request_cancelled_mid_write_still_applies_what_the_log_committed(
    tiny_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request cancelled while its batch waits on fsync (a client gone, the shutdown's grace
    period over): the log commits the event, so the live state applies it, its id stays taken,
    and a restart from the shutdown snapshot shows the same history as a full replay."""
    dislike = {"event_id": "ev-A", "user_id": "alice", "item_id": "5", "kind": "dislike"}
    like = {"event_id": "ev-B", "user_id": "bob", "item_id": "6", "kind": "like"}

    async def scenario() -> None:
        async with running(tiny_artifact, tmp_path / "state") as (client, service):
            monkeypatch.setattr(events, "_fsync", slow_fsync(fail_first=0))
            cancelled = asyncio.ensure_future(client.post("/v1/feedback", json=dislike))
            other = asyncio.ensure_future(client.post("/v1/feedback", json=like))
            await asyncio.sleep(0.1)
            cancelled.cancel()
            assert (await other).status_code == 200
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            monkeypatch.undo()
            state = service.live()
            assert state.applied_seq == state.log.last_seq == 2  # type: ignore[union-attr]
            assert "ev-A" in state.event_ids
            retry = await client.post("/v1/feedback", json=dislike)
            assert retry.json() == {"accepted": 0, "duplicates": 1}
            recs = (await client.get("/v1/recommendations/alice?k=50")).json()["items"]
            assert "5" not in [r["item_id"] for r in recs]

    run(scenario())
    assert logged(tmp_path / "state") == [(1, "ev-A"), (2, "ev-B")]

    async def restarted() -> None:
        async with running(tiny_artifact, tmp_path / "state") as (client, _):
            history = (await client.get("/v1/users/alice/history")).json()["events"]
            assert [(e["event_id"], e["kind"]) for e in history] == [("ev-A", "dislike")]

    run(restarted())


def test_an_apply_failure_after_the_write_is_logged_though_the_client_is_gone(
    tiny_artifact: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A fault applying events the log committed (a bug) was swallowed without a word when the
    request had been cancelled: the event on disk, not served, and nothing in the server log."""
    like = {"event_id": "ev-A", "user_id": "alice", "item_id": "5", "kind": "like"}

    def broken(*_: Any) -> None:
        raise RuntimeError("injected apply fault")

    async def scenario() -> None:
        async with running(tiny_artifact, tmp_path / "state") as (client, _):
            monkeypatch.setattr(events, "_fsync", slow_fsync(fail_first=0))
            monkeypatch.setattr("server.state.LiveState._apply", broken)
            cancelled = asyncio.ensure_future(client.post("/v1/feedback", json=like))
            await asyncio.sleep(0.1)
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            await asyncio.sleep(0.5)  # the shielded write finishes
            monkeypatch.undo()

    with caplog.at_level(logging.ERROR, logger="signedrec.api"):
        run(scenario())
    assert logged(tmp_path / "state") == [(1, "ev-A")]
    failures = [r for r in caplog.records if "in the log but not applied" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].getMessage().startswith("events seq 1..1")
    assert failures[0].exc_info is not None
    assert "injected" in str(failures[0].exc_info[1])


def test_refused_requests_take_no_place_in_the_idempotency_window(
    tiny_artifact: Path, tmp_path: Path
) -> None:
    """Events refused with a 422 were never accepted: they must not push an accepted id out of
    the window (its retry would be applied twice), and the error names the event's place in
    the request, counting the duplicates before it."""
    env = {"SIGNEDREC_LOG__DEDUP_WINDOW": "3"}

    async def scenario() -> None:
        async with running(tiny_artifact, tmp_path / "state", env) as (client, _):
            accepted = {"event_id": "e1", **LIKE}
            assert (await client.post("/v1/feedback", json=accepted)).status_code == 200
            for n in range(3):
                bad = {"event_id": f"bad{n}", **LIKE, "ts": -1}
                answer = await client.post("/v1/feedback", json=[accepted, bad])
                assert answer.status_code == 422
                error = answer.json()["error"]
                assert (error["code"], error["detail"]["index"]) == ("invalid_event", 1)
                assert error["detail"]["field"] == "ts"
            retry = await client.post("/v1/feedback", json=accepted)
            assert retry.json() == {"accepted": 0, "duplicates": 1}

    run(scenario())
    assert logged(tmp_path / "state") == [(1, "e1")]


@pytest.mark.parametrize("route", ["/v1/feedback", "/v1/admin/model/reload"])
def test_a_body_that_is_not_utf8_is_malformed_json(
    tiny_artifact: Path, tmp_path: Path, route: str
) -> None:
    async def scenario() -> None:
        async with running(tiny_artifact, tmp_path / "state") as (client, _):
            body = b'{"event_id":"lat\xe9","user_id":"u1","item_id":"3","kind":"like"}'
            if route.endswith("reload"):
                body = b'{"version":"\xff"}'
            answer = await client.post(route, content=body)
            assert answer.status_code == 400
            assert answer.json()["error"]["code"] == "malformed_json"

    run(scenario())


@pytest.mark.parametrize("route", ["/v1/feedback", "/v1/admin/model/reload"])
def test_a_body_cut_off_by_a_disconnect_is_a_client_error(
    tiny_artifact: Path, tmp_path: Path, route: str
) -> None:
    """The client went away (or broke the chunked framing) mid-body: granian passes that on as
    a disconnect, which litestar raises as a 500; it is the request's fault, a 400, and nothing
    of the partial body is applied."""
    app = create_app(tiny_artifact, tmp_path / "state", load_config(env={}))
    service: Service = app.state["service"]
    sent: list[dict[str, Any]] = []

    async def scenario() -> None:
        with mock.patch("server.service.tune_gc", return_value=None):
            await service.start()
        chunks = iter([{"type": "http.request", "body": b'[{"event_id": "e1", "user_',
                        "more_body": True}, {"type": "http.disconnect"}])  # fmt: skip

        async def receive() -> dict[str, Any]:
            return next(chunks, {"type": "http.disconnect"})

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": route, "raw_path": route.encode(),
                 "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
                 "server": ("test", 80),
                 "headers": [(b"content-type", b"application/json")]}  # fmt: skip
        await app(scope, receive, send)  # type: ignore[arg-type]
        service.stopping = True
        await service.live().close()

    run(scenario())
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert start["status"] == 400, body
    assert json.loads(body)["error"]["code"] == "incomplete_body"
    assert logged(tmp_path / "state") == []
