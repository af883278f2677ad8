"""The idempotency window: bounded, oldest forgotten first, rebuilt exactly by replay."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.dedup import RecentIds
from tests.test_service import Server


def _reference(capacity: int, adds: list[list[str]]) -> list[str]:
    """Live ids oldest first, straight from the definition: among the last ``capacity``
    acceptances, each id at its latest acceptance."""
    accepted: list[str] = []
    live: dict[str, int] = {}
    for ids in adds:
        for event_id in ids:
            live[event_id] = len(accepted)
            accepted.append(event_id)
    cutoff = len(accepted) - capacity
    return sorted((i for i, p in live.items() if p >= cutoff), key=live.__getitem__)


@settings(max_examples=300, deadline=None)
@given(
    capacity=st.integers(1, 6),
    adds=st.lists(st.lists(st.sampled_from("abcdefgh"), max_size=4), max_size=30),
)
def test_window_matches_its_definition(capacity: int, adds: list[list[str]]) -> None:
    window = RecentIds(capacity)
    for step in range(len(adds)):
        window.add(adds[step])
        expected = _reference(capacity, adds[: step + 1])
        assert list(window) == expected
        assert len(window) == len(expected) <= capacity
        assert all((c in window) == (c in expected) for c in "abcdefgh")
    # A window rebuilt from its own iteration (a snapshot) holds the same ids in the same order.
    assert list(RecentIds(capacity, list(window))) == list(window)


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        RecentIds(0)


def _like(user: str, event_id: str, item: str) -> dict[str, str]:
    return {"event_id": event_id, "user_id": user, "item_id": item, "kind": "like"}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_server_forgets_ids_beyond_the_window_and_keeps_it_across_restarts(
    tmp_path: Path, sig: int
) -> None:
    """Window of 3: an id 3 acceptances old is still a duplicate, 4 old is applied again;
    after a restart (snapshot on SIGTERM, log replay on SIGKILL) the window is the same."""
    env = {"SIGNEDREC_LOG__DEDUP_WINDOW": "3"}
    user = f"dedup-{uuid.uuid4().hex}"
    ids = [f"{user}-{n}" for n in range(4)]
    srv = Server(tmp_path / "state", env)
    try:
        for n, event_id in enumerate(ids):
            assert srv.client.post("/v1/feedback", json=_like(user, event_id, str(n))).json() == {
                "accepted": 1,
                "duplicates": 0,
            }
    finally:
        srv.stop(sig)
    srv = Server(tmp_path / "state", env)
    try:
        post = srv.client.post
        # ids[1:] are the last 3 acceptances: repeats. ids[0] was forgotten: applied again.
        assert post("/v1/feedback", json=_like(user, ids[1], "1")).json()["duplicates"] == 1
        assert post("/v1/feedback", json=_like(user, ids[0], "0")).json()["accepted"] == 1
        history = srv.client.get(f"/v1/users/{user}/history").json()["events"]
        assert [e["event_id"] for e in history] == [ids[0], ids[3], ids[2], ids[1], ids[0]]
    finally:
        srv.stop()
