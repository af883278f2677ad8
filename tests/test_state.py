"""LiveState on the tiny artifact: what snapshots hold while writes are in flight, model swaps."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import load_config
from server.events import EventRecord, NewEvent
from server.state import LiveState


@pytest.fixture
def state(tiny_artifact: Path, tmp_path: Path) -> LiveState:
    return LiveState(tiny_artifact, tmp_path / "state", load_config(env={}))


def _new(event_id: str, user: str = "u", item: str = "3") -> NewEvent:
    return NewEvent(event_id=event_id, user_id=user, item_id=item, kind="like", ts=0.0)


def test_a_snapshot_never_holds_ids_whose_write_is_pending(state: LiveState) -> None:
    """A restart from it must not answer the retry of an unwritten event as a duplicate."""
    written, pending, failed = _new("written"), _new("pending"), _new("failed")
    state.reserve([written])
    state.apply([EventRecord(1, "written", "u", "3", "like", None, 0.0)])
    state.reserve([pending, failed])  # two requests waiting on their log writes
    assert state.split_duplicates([pending])[1] == 1  # a concurrent repeat is still refused
    snap = state.take_snapshot()
    assert snap.event_ids == ["written"]
    assert snap.seq == 1
    state.release([failed])  # its write failed: the id is free again
    state.apply([EventRecord(2, "pending", "u", "4", "like", None, 0.0)])
    assert state.take_snapshot().event_ids == ["written", "pending"]
    assert not state.reserved
