"""Ranking against brute force: pools, exclusion, batch independence, the offline served scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.artifacts import load_artifact
from server.config import IndexConfig, RankingConfig, load_config
from server.data import Interactions, load_dataset
from server.evaluate import interaction_matrix
from server.events import EventRecord
from server.graph import build_graph, with_feedback
from server.index import ItemIndex
from server.ranking import Ragged, candidates, rank_pool
from server.state import LiveState
from server.train import served_scores
from tests.conftest import TinyDataset

SMALL = RankingConfig(candidate_min=6, candidate_multiplier=2, exclusion_pad=4)


# A small IVF probing one of four lists answers short rows, which take the exact fallback.
KINDS = {
    "flat": IndexConfig(kind="flat", device="cpu"),
    "ivf": IndexConfig(kind="ivf", device="cpu", ivf_nlist=4, ivf_nprobe=1),
    "hnsw": IndexConfig(kind="hnsw", device="cpu"),
}


def _setup(seed: int, n_items: int, n_queries: int, dim: int = 8, kind: str = "flat"):
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n_items, dim)).astype(np.float32)
    queries = rng.standard_normal((n_queries, dim)).astype(np.float32)
    index = ItemIndex(vectors, KINDS[kind])
    return rng, vectors, queries, index


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_items=st.integers(1, 80),
    n_queries=st.integers(1, 12),
    k=st.integers(1, 10),
    data=st.data(),
)
def test_each_row_gets_exactly_its_own_pool(
    seed: int, n_items: int, n_queries: int, k: int, data: st.DataObject
) -> None:
    _, vectors, queries, index = _setup(seed, n_items, n_queries)
    seen = np.array(data.draw(st.lists(st.integers(0, 40), min_size=n_queries,
                                       max_size=n_queries)))  # fmt: skip
    scores, ids = candidates(index, queries, seen, k, SMALL)
    base = max(SMALL.candidate_min, k * SMALL.candidate_multiplier)
    exact = queries @ vectors.T
    for row in range(n_queries):
        pool = min(base + max(int(seen[row]), SMALL.exclusion_pad), n_items)
        got = ids[row][ids[row] >= 0]
        assert len(got) == pool  # a heavy row is fetched to its own depth, no deeper
        # The pool is the top `pool` items by exact score (ties may swap which ids).
        want = np.sort(exact[row])[::-1][:pool]
        np.testing.assert_allclose(np.sort(exact[row, got])[::-1], want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(scores[row][ids[row] >= 0], exact[row, got], rtol=1e-4,
                                   atol=1e-4)  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 8), kind=st.sampled_from(sorted(KINDS)))
def test_a_users_ranking_does_not_depend_on_its_batch(seed: int, k: int, kind: str) -> None:
    """Bit for bit, whatever the index kind: with IVF a heavy row searched at the batch's
    deepest width, or exact scores from a batched matrix product, gave another answer."""
    rng, vectors, queries, index = _setup(seed, 60, 6, kind=kind)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    # Row 0 is a heavy user whose history is longer than the pad; the others are light.
    lengths = [30, 1, 2, 0, 3, 1]
    seen = [np.sort(rng.choice(60, size=n, replace=False)).astype(np.int32) for n in lengths]
    disliked = [s[: len(s) // 2] for s in seen]

    def rank(rows: slice) -> tuple[np.ndarray, np.ndarray]:
        excluded, negative = Ragged.from_lists(seen[rows]), Ragged.from_lists(disliked[rows])
        pool = candidates(index, queries[rows], np.diff(excluded.indptr), k, SMALL)
        return rank_pool(*pool, unit, excluded, negative, k, 0.3)

    batch_ids, batch_scores = rank(slice(None))
    for row in range(len(lengths)):
        ids, scores = rank(slice(row, row + 1))
        np.testing.assert_array_equal(batch_ids[row], ids[0])
        np.testing.assert_array_equal(batch_scores[row], scores[0])
        assert not set(ids[0][ids[0] >= 0].tolist()) & set(seen[row].tolist())
        assert (ids[0] >= 0).sum() == k  # always k results: enough unseen candidates remain


@pytest.mark.parametrize(("beta", "recent"), [(None, 50), (0.5, 50), (None, 1)])
def test_server_ranks_as_the_offline_served_scores(
    tiny_artifact: Path, tiny_dataset: TinyDataset, tmp_path: Path, beta: float | None,
    recent: int,
) -> None:  # fmt: skip
    """The gamma and beta chosen offline are judged on the ranking the server really gives.

    For every trained user, the live state's top-k equals the top-k of
    ``server.train.served_scores`` with train items masked, with the artifact's strengths
    (None) and with a dislike-propensity weight set by config; with a suppression window of 1
    most users have more dislikes than it, and both sides read the same one.
    """
    env = {"SIGNEDREC_RANKING__SUPPRESSION_RECENT": str(recent)}
    if beta is not None:
        env["SIGNEDREC_RANKING__PROPENSITY_BETA"] = str(beta)
    state = LiveState(tiny_artifact, tmp_path / "state", load_config(env=env))
    artifact = load_artifact(tiny_artifact)
    ranking = artifact.manifest["ranking"]
    gamma = float(ranking["suppression_gamma"])
    assert gamma > 0  # the check must cover suppression, not only the raw model
    beta = float(ranking["propensity_beta"]) if beta is None else beta
    assert state.item_side.beta == beta
    dataset = load_dataset(tiny_dataset.path, tiny_dataset.threshold)
    graph = build_graph(dataset.train, dataset.threshold, dataset.n_users, dataset.n_items)
    if recent < 50:
        assert (np.diff(graph.neg_indptr) > recent).sum() >= dataset.n_users // 2
    arrays, prior = artifact.arrays, ranking["propensity_prior"]
    score = served_scores(arrays["item_table"], arrays["item_vectors"], graph,
                          artifact.neg_weight, gamma, beta, prior,
                          arrays["item_popularity"], recent)  # fmt: skip
    users = np.arange(dataset.n_users)
    offline = score(users)
    seen = interaction_matrix(dataset.train.users, dataset.train.items, *offline.shape)
    offline[seen.toarray()] = -np.inf
    k = 6
    served = state.recommend_many([str(u) for u in users], k)
    for user, answer in zip(users, served, strict=True):
        expected = np.argsort(-offline[user], kind="stable")[:k]
        assert [int(i) for i in answer.items] == expected.tolist()
        np.testing.assert_allclose(answer.scores, offline[user, expected], rtol=1e-4, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    edges=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 9), st.sampled_from([-1.0, 1.0])),
                   max_size=60),
    recent=st.integers(0, 12),
)  # fmt: skip
def test_latest_negatives_are_each_rows_last_window(
    edges: list[tuple[int, int, float]], recent: int
) -> None:
    """The dislikes offline suppression reads are the tail of each user's row, as served."""
    users, items, strengths = (np.array(c) for c in zip(*edges, strict=True)) if edges else (
        np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))  # fmt: skip
    empty = build_graph(Interactions(np.empty(0, np.int32), np.empty(0, np.int32),
                                     np.empty(0, np.float32)), 1.0, 6, 10)  # fmt: skip
    graph = with_feedback(empty, users, items, strengths.astype(np.float32), 6)
    window = graph.latest_negatives(recent)
    for user in range(6):
        start, end = graph.neg_indptr[user], graph.neg_indptr[user + 1]
        tail = slice(max(start, end - recent), end)
        row = slice(window.indptr[user], window.indptr[user + 1])
        assert window.indices[row].tolist() == graph.neg_items[tail].tolist()
        assert window.data[row].tolist() == graph.neg_weights[tail].tolist()


def _dislike_many(state: LiveState, user: str, items: list[int]) -> None:
    state.apply([EventRecord(n + 1, f"d{n}", user, str(item), "dislike", None, 0.0)
                 for n, item in enumerate(items)])  # fmt: skip


@pytest.mark.parametrize(
    ("env", "include_liked"),
    [({}, True), ({"SIGNEDREC_RANKING__EXCLUDE_SEEN": "false"}, False),
     ({"SIGNEDREC_RANKING__SUPPRESSION_RECENT": "0"}, True)],
)  # fmt: skip
def test_no_dislike_ever_comes_back_beyond_the_recent_window(
    tiny_artifact: Path, tmp_path: Path, env: dict[str, str], include_liked: bool
) -> None:
    """Suppression looks at the latest dislikes only; exclusion covers every one of them."""
    env = {"SIGNEDREC_RANKING__SUPPRESSION_RECENT": "2", **env}
    state = LiveState(tiny_artifact, tmp_path / "state", load_config(env=env))
    user = "newcomer"
    disliked = list(range(0, 24, 2))  # 12 dislikes, far more than the 2 the suppression sees
    _dislike_many(state, user, disliked)
    n_items = state.item_side.n_items
    answer = state.recommend_many([user], n_items, include_liked=include_liked)[0]
    assert not set(answer.items) & {str(i) for i in disliked}
    assert len(answer.items) == n_items - len(disliked)  # nothing else was dropped
    # A later like of a disliked item lifts its exclusion when liked items are allowed.
    state.apply([EventRecord(100, "l0", user, "0", "like", None, 0.0)])
    again = state.recommend_many([user], n_items, include_liked=include_liked)[0]
    assert ("0" in again.items) == (include_liked or "EXCLUDE_SEEN" in str(env))


@pytest.mark.parametrize("n", [1, 3, 4, 5, 8])
def test_suppression_sees_every_dislike_of_the_latest_window(
    tiny_artifact: Path, tmp_path: Path, n: int
) -> None:
    """The latest ``suppression_recent`` dislikes, newest first: all of them when there are
    fewer (a negative slice start once kept only the last window - n of 3 or 4 dislikes)."""
    env = {"SIGNEDREC_RANKING__SUPPRESSION_RECENT": "5"}
    state = LiveState(tiny_artifact, tmp_path / "state", load_config(env=env))
    items = list(range(n))
    _dislike_many(state, "newcomer", items)
    recent = state._seen_and_negative(state.users.get("newcomer"))[2]
    assert recent.tolist() == items[::-1][:5]
    trained = next(u for u in range(state.n_trained_users) if len(state._trained_edges(u)[1]) > 1)
    dislikes = state._trained_edges(trained)[1]
    window = {"SIGNEDREC_RANKING__SUPPRESSION_RECENT": str(len(dislikes) + 1)}
    fresh = LiveState(tiny_artifact, tmp_path / "fresh", load_config(env=window))
    assert sorted(fresh._seen_and_negative(trained)[2].tolist()) == sorted(dislikes.tolist())


@pytest.mark.parametrize("beta", [None, 0.5])
def test_a_newcomer_without_a_like_is_ranked_from_popularity_with_suppression(
    tiny_artifact: Path, tmp_path: Path, beta: float | None
) -> None:
    """Dislikes alone fold into a vector near the disliked items (neg_weight > 0), which would
    rank their look-alikes first; a user known only from live feedback with no like gets
    normalised popularity minus the same look-alike and propensity penalties, brute-forced
    here. A like makes the ranking personal."""
    env = {} if beta is None else {"SIGNEDREC_RANKING__PROPENSITY_BETA": str(beta)}
    state = LiveState(tiny_artifact, tmp_path / "state", load_config(env=env))
    side = state.item_side
    assert side.neg_weight > 0
    assert side.gamma > 0
    user, disliked = "only-dislikes", [3, 11]
    _dislike_many(state, user, disliked)
    assert state.vectors[state.users.get(user)].any()  # the fold is not zero: the model is skipped
    n_items = side.n_items
    answer = state.recommend_many([user], n_items)[0]
    popularity = load_artifact(tiny_artifact).arrays["item_popularity"].astype(np.float64)
    unit = side.unit.astype(np.float64)
    cosine = np.maximum((unit @ unit[disliked].T).max(axis=1), 0.0)
    expected = popularity / abs(popularity.max()) - side.gamma * cosine
    if side.beta:
        logit = side.propensity.user_logit(np.zeros(1), np.full(1, 2.0))
        expected -= side.beta * side.propensity.probability(logit, np.arange(n_items)[None])[0]
    expected[disliked] = -np.inf
    order = np.argsort(-expected, kind="stable")[: n_items - len(disliked)]
    assert answer.fallback
    assert [int(i) for i in answer.items] == order.tolist()
    np.testing.assert_allclose(answer.scores, expected[order], rtol=1e-4, atol=1e-5)
    # A trained user whose likes all turned into dislikes keeps the model's ranking: the search
    # chose neg_weight on such histories (on kuairand they are served far better than by
    # popularity); only a user known from live feedback alone starts from popularity.
    liked = state._trained_edges(0)[0]
    state.apply([EventRecord(20 + n, f"undo-{n}", "0", str(item), "dislike", None, 0.0)
                 for n, item in enumerate(liked.tolist())])  # fmt: skip
    assert state._seen_and_negative(0)[3][0] == 0
    assert not state.recommend_many(["0"], 8)[0].fallback
    state.apply([EventRecord(10, "like-1", user, "5", "like", None, 0.0)])
    personal = state.recommend_many([user], 8)[0]
    assert not personal.fallback
    assert not {"3", "5", "11"} & set(personal.items)


@pytest.mark.parametrize("include_liked", [False, True])
def test_the_overload_popularity_list_keeps_the_users_exclusions(
    tiny_artifact: Path, tmp_path: Path, include_liked: bool
) -> None:
    state = LiveState(tiny_artifact, tmp_path / "state", load_config(env={}))
    popular = state.popular(8).items
    user = "shed"
    _dislike_many(state, user, [int(popular[0])])
    state.apply([EventRecord(50, "l1", user, popular[1], "like", None, 0.0)])
    answer = state.popular(8, user, include_liked)
    assert answer.fallback
    assert popular[0] not in answer.items  # disliked: never
    assert (popular[1] in answer.items) == include_liked  # liked: only when asked for
    assert len(answer.items) == 8
    rest = [i for i in state.popular(10).items if i != popular[0]]
    assert answer.items == (rest if include_liked else rest[1:])[:8]  # popularity order kept
    order = state.item_side.popular_scores
    assert answer.scores == sorted(answer.scores, reverse=True)
    assert set(answer.scores) <= set(order.tolist())
    assert state.popular(8, "somebody unknown").items == popular
