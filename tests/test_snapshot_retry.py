"""Periodic snapshots that fail to write: their events stay counted, the next try backs off."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from server import snapshot
from server.config import load_config
from server.events import NewEvent
from server.service import Service
from server.state import SnapshotCapture

RETRY_S, RETRY_MAX_S = 10.0, 25.0


async def _post(service: Service, n: int) -> None:
    """Log and apply one like as the feedback handler does, then let a snapshot start."""
    state = service.live()
    event = NewEvent(event_id=f"e{n}", user_id="u", item_id=str(n % 5), kind="like", ts=0.0)
    state.reserve([event])
    state.apply(await state.log.append([event]))  # type: ignore[union-attr]
    service.maybe_snapshot(state)


def _count(service: Service, result: str) -> float | None:
    """signedrec_snapshots_total for one outcome, as /metrics would show it."""
    sample = "signedrec_snapshots_total"
    return service.metrics.registry.get_sample_value(sample, {"result": result})


async def _settle(service: Service) -> None:
    if service.snapshotting is not None:
        await service.snapshotting


@pytest.mark.parametrize(
    ("stage", "failure"),
    [
        ("write", OSError("No space left on device")),
        ("write", RuntimeError("a bug")),
        ("copy", RuntimeError("a bug")),  # in the paced copy, before anything is written
    ],
)
def test_back_off_doubles_to_its_cap_and_a_success_resets_it(
    tiny_artifact: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stage: str,
    failure: Exception,
) -> None:
    config = load_config(env={
        "SIGNEDREC_LOG__SNAPSHOT_EVERY_EVENTS": "2",
        "SIGNEDREC_LOG__SNAPSHOT_RETRY_SECONDS": str(RETRY_S),
        "SIGNEDREC_LOG__SNAPSHOT_RETRY_MAX_SECONDS": str(RETRY_MAX_S),
    })  # fmt: skip
    real_write = snapshot.write
    broken = True

    def write(*args: object, **kwargs: object) -> Path:
        if broken:
            raise failure
        return real_write(*args, **kwargs)  # type: ignore[arg-type]

    real_step = SnapshotCapture.step

    def step(self: SnapshotCapture, budget: int | None = None) -> bool:
        if broken:
            raise failure
        return real_step(self, budget)

    if stage == "write":
        monkeypatch.setattr(snapshot, "write", write)
    else:
        monkeypatch.setattr(SnapshotCapture, "step", step)
    # A served process freezes the collector after loading; this one is the test session.
    monkeypatch.setattr("server.service.tune_gc", lambda _config: None)

    async def scenario() -> None:
        nonlocal broken
        service = Service(tiny_artifact, tmp_path / "state", config)
        await service.start()
        state = service.live()
        await _post(service, 0)
        await _post(service, 1)  # the second event starts the first snapshot, which fails
        await _settle(service)
        assert state.since_snapshot == 2  # not written: both still to replay
        waits = []
        for n in range(2, 5):
            waits.append(service.snapshot_retry_at - time.monotonic())
            first = service.snapshotting
            await _post(service, n)  # inside the back-off: no new try
            assert service.snapshotting is first
            service.snapshot_retry_at = 0.0  # as if the back-off had run out
            await _post(service, 100 + n)
            assert service.snapshotting is not first
            await _settle(service)
        assert [round(w) for w in waits] == [RETRY_S, 2 * RETRY_S, RETRY_MAX_S]
        assert service.snapshot_failures == 4
        assert state.since_snapshot == 8  # every event since the start is still unsnapshotted
        assert _count(service, "failed") == 4
        # A disk failing for days: 2.0 ** 1024 overflowed and the back-off stopped counting.
        service.snapshot_failures = 5000
        service.snapshot_retry_at = 0.0
        await _post(service, 200)
        await _settle(service)
        assert service.snapshot_failures == 5001
        assert round(service.snapshot_retry_at - time.monotonic()) == RETRY_MAX_S
        broken = False
        service.snapshot_retry_at = 0.0
        await _post(service, 9)
        await _settle(service)
        assert service.snapshot_failures == 0
        assert service.snapshot_retry_at == 0.0
        assert state.since_snapshot == 0
        assert _count(service, "written") == 1
        await state.close()

    asyncio.run(scenario())
