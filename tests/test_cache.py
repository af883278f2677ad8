"""The ranking memo: bounded, invalidated by the user's own events and by model swaps only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.artifacts import load_artifact
from server.cache import RankingCache
from server.config import load_config
from server.events import EventRecord
from server.state import ItemSide, LiveState


@settings(max_examples=80, deadline=None)
@given(
    capacity=st.integers(0, 5),
    ops=st.lists(
        st.tuples(st.sampled_from("pi"), st.integers(0, 8), st.integers(1, 3)), max_size=60
    ),
)
def test_cache_matches_a_plain_model(capacity: int, ops: list[tuple[str, int, int]]) -> None:
    cache: RankingCache[str] = RankingCache(capacity)
    model: dict[int, dict[tuple[int, bool], str]] = {}  # insertion-ordered like the cache
    for op, user, k in ops:
        if op == "p":
            value = f"{user}:{k}"
            cache.put(user, (k, False), value)
            if capacity > 0:
                if user not in model and len(model) >= capacity:
                    del model[next(iter(model))]  # the user cached longest ago goes first
                model.setdefault(user, {})[(k, False)] = value
        else:
            cache.invalidate([user])
            model.pop(user, None)
        assert len(cache) == len(model) <= capacity
        for u in range(9):
            for kk in range(1, 4):
                assert cache.get(u, (kk, False)) == model.get(u, {}).get((kk, False))


def test_cache_counts_hits_and_misses() -> None:
    cache: RankingCache[str] = RankingCache(2)
    assert cache.get(1, (20, False)) is None
    cache.put(1, (20, False), "a")
    assert cache.get(1, (20, False)) == "a"
    assert cache.get(1, (10, False)) is None  # another k is another ranking
    assert (cache.hits, cache.misses) == (1, 2)
    cache.clear()
    assert len(cache) == 0
    assert cache.get(1, (20, False)) is None


@pytest.fixture
def state(tiny_artifact: Path, tmp_path: Path) -> LiveState:
    return LiveState(tiny_artifact, tmp_path / "state", load_config(env={}))


def _record(seq: int, user: str, item: str, kind: str) -> EventRecord:
    return EventRecord(seq, f"e{seq}", user, item, kind, None, 0.0)


def test_state_serves_memo_until_the_users_own_event(state: LiveState) -> None:
    first = state.recommend_many(["0", "1"], 5)
    again = state.recommend_many(["0", "1"], 5)
    assert again[0] is first[0]
    assert again[1] is first[1]
    assert state.cache.hits == 2
    top = first[0].items[0]
    # Another user's event leaves user 0's memo alone; user 0's own dislike replaces it.
    state.apply([_record(1, "1", top, "like")])
    assert state.recommend_many(["0"], 5)[0] is first[0]
    state.apply([_record(2, "0", top, "dislike")])
    after = state.recommend_many(["0"], 5)[0]
    assert top not in after.items
    # Memo or not, the answer equals a fresh ranking with the memo turned off.
    state.cache = RankingCache(0)
    fresh = state.recommend_many(["0"], 5)[0]
    assert fresh.items == after.items
    np.testing.assert_allclose(fresh.scores, after.scores)


def test_state_swap_drops_every_memo(state: LiveState, tiny_artifact: Path) -> None:
    state.recommend_many(["0", "1", "2"], 5)
    assert len(state.cache) == 3
    versions = sorted(p for p in Path(tiny_artifact).parent.iterdir() if p.is_dir())
    state.swap(ItemSide(load_artifact(versions[-1]), state.config))
    assert len(state.cache) == 0
