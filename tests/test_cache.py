"""The ranking memo (bounded, invalidated by the user's own events and by model swaps only) and
model swaps built off the event loop."""

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


def test_cache_keeps_a_bounded_number_of_variants_per_user() -> None:
    cache: RankingCache[str] = RankingCache(2, variants=2)
    for k in (10, 20, 30):
        cache.put(1, (k, False), f"k{k}")
    assert cache.get(1, (10, False)) is None  # the oldest variant went first
    assert cache.get(1, (20, False)) == "k20"
    cache.put(1, (20, False), "again")  # replacing a kept variant drops nothing
    assert cache.get(1, (30, False)) == "k30"
    assert cache.get(1, (20, False)) == "again"
    with pytest.raises(ValueError, match="variants"):
        RankingCache(2, variants=0)


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
    assert again == first  # unpacked from the memo: the same ids, and float32 scores exactly
    assert state.cache.hits == 2
    top = first[0].items[0]
    # Another user's event leaves user 0's memo alone; user 0's own dislike replaces it.
    state.apply([_record(1, "1", top, "like")])
    assert state.recommend_many(["0"], 5)[0] == first[0]
    assert state.cache.hits == 3
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


def _reference_vectors(state: LiveState, side: ItemSide) -> np.ndarray:
    """Each user's fold under ``side`` from the definition: trained edges, or the online graph."""
    arrays = state.item_side.artifact.arrays
    pos_ptr, pos = arrays["pos_indptr"], arrays["pos_items"]
    neg_ptr, neg = arrays["neg_indptr"], arrays["neg_items"]
    out = np.zeros((len(state.users), side.dim), np.float64)
    for u in range(len(state.users)):
        if u in state.feedback:
            graph = state.feedback[u].strength
        else:
            graph = dict.fromkeys(pos[pos_ptr[u] : pos_ptr[u + 1]].tolist(), 1.0)
            graph.update(dict.fromkeys(neg[neg_ptr[u] : neg_ptr[u + 1]].tolist(), -1.0))
        for item, strength in graph.items():
            out[u] += LiveState.fold_weight(strength, side.neg_weight) * side.table[item]
    return out


def test_swap_built_off_the_loop_includes_events_applied_meanwhile(
    state: LiveState, tiny_artifact: Path
) -> None:
    """Events applied between begin_swap and finish_swap (the worker thread's window), by known
    users, first-time users and enough new users to grow the vector array, all land exactly."""
    items = state.item_side.items.external(np.arange(6))
    state.apply([_record(1, "0", items[0], "dislike"), _record(2, "new-a", items[1], "like")])
    side = ItemSide(load_artifact(tiny_artifact), state.config)
    rng = np.random.default_rng(0)
    side.table = rng.standard_normal(side.table.shape).astype(np.float32)  # a different model
    side.neg_weight = 0.3
    plan = state.begin_swap(side)
    rows_at_start = state.vectors.shape[0]
    during = [_record(3, "0", items[2], "like"), _record(4, "1", items[3], "skip")]
    during += [_record(10 + n, f"new-{n}", items[n % 6], "like") for n in range(rows_at_start)]
    state.apply(during)
    assert state.vectors.shape[0] > rows_at_start  # the array grew while the plan was built
    assert state.item_side is not side  # the old model serves until the finish
    state.finish_swap(plan, state.build_swap(plan))
    assert state.item_side is side
    n = len(state.users)
    np.testing.assert_allclose(state.vectors[:n], _reference_vectors(state, side), atol=1e-4)
    # A finished or aborted plan cannot be finished (again).
    with pytest.raises(RuntimeError, match="not the one in progress"):
        state.finish_swap(plan, state.vectors)
    other = state.begin_swap(side)
    state.abort_swap()
    with pytest.raises(RuntimeError, match="not the one in progress"):
        state.finish_swap(other, state.vectors)
