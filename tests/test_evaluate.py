"""The evaluation protocol on a case small enough to compute by hand.

3 users, 6 items (0..5), threshold 4 (a rating of 4 is positive, 3 is negative).

    user  train (masked)   evaluated split: positives   negatives   scores for items 0..5
    u0    {0}              {0, 2, 5}                   {1, 3}      .9 .8 .7 .6 .5 .4
    u1    {4, 5}           {3}                         {0, 2, 5}   .1 .2 .3 .4 .5 .6
    u2    {2}              {}                          {1}         .5 .9 .1 .8 .3 .7

u2 has no positive in the split, so it is not evaluated: 2 users.
Ranked after masking train items (masked items never take a slot; "-" is an empty slot):
    u0: 1 2 3 4 5 -      hits (positives) at ranks 2 and 5; negatives at ranks 1 and 3.
        Item 0 is a positive but masked (in train): never a hit, yet it counts in |truth| = 3.
    u1: 3 2 1 0 - -      hit at rank 1; negatives at ranks 2 (item 2) and 4 (item 0).
        Item 5 is a negative but masked: never a negative hit. |truth| = 1.
Discounts: 1/log2(2) = 1, 1/log2(3) = 0.6309297535714575, 1/log2(4) = 0.5,
1/log2(6) = 0.38685280723454163. Ideal DCG for u0 at K >= 3: 1 + 0.63093 + 0.5 = 2.13093.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from server.data import Interactions
from server.evaluate import (
    KS,
    METRICS,
    Truth,
    evaluate_ranked,
    evaluate_scores,
    ground_truth,
    interaction_matrix,
    top_k,
)

N_USERS, N_ITEMS, THRESHOLD = 3, 6, 4.0
SCORES = np.array(
    [
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        [0.5, 0.9, 0.1, 0.8, 0.3, 0.7],
    ],
    dtype=np.float32,
)
TRAIN = [(0, 0, 5.0), (1, 4, 5.0), (1, 5, 1.0), (2, 2, 5.0)]
SPLIT = [
    (0, 0, 5.0), (0, 2, 4.0), (0, 5, 5.0), (0, 1, 2.0), (0, 3, 1.0),
    (1, 3, 4.0), (1, 0, 1.0), (1, 2, 3.0), (1, 5, 2.0),
    (2, 1, 1.0),
]  # fmt: skip
KS_SMALL = (1, 3, 5)

D2 = 0.6309297535714575  # 1/log2(3), rank 2
D5 = 0.38685280723454163  # 1/log2(6), rank 5
IDCG_U0 = 1 + D2 + 0.5  # three ground-truth items: ranks 1..3 = 2.1309297535714578


def _interactions(rows: list[tuple[int, int, float]]) -> Interactions:
    table = np.asarray(rows, dtype=np.float64)
    return Interactions(
        table[:, 0].astype(np.int32), table[:, 1].astype(np.int32), table[:, 2].astype(np.float32)
    )


@pytest.fixture
def truth() -> Truth:
    return ground_truth(_interactions(SPLIT), THRESHOLD, N_USERS, N_ITEMS)


@pytest.fixture
def masked() -> sp.csr_matrix:
    train = _interactions(TRAIN)
    return interaction_matrix(train.users, train.items, N_USERS, N_ITEMS)


def _scores(users: np.ndarray) -> np.ndarray:
    return SCORES[users]


def test_ground_truth_users_and_signs(truth: Truth) -> None:
    np.testing.assert_array_equal(truth.users, [0, 1])
    assert truth.positives.shape == truth.negatives.shape == (N_USERS, N_ITEMS)
    assert sorted(truth.positives[0].indices) == [0, 2, 5]
    assert sorted(truth.positives[1].indices) == [3]
    assert truth.positives[2].nnz == 0
    assert sorted(truth.negatives[0].indices) == [1, 3]
    assert sorted(truth.negatives[1].indices) == [0, 2, 5]  # rating 3 < threshold 4: negative
    assert sorted(truth.negatives[2].indices) == [1]


EXPECTED_SCORES = {
    # K = 1: u0's first item (1) is a negative, u1's first item (3) a hit.
    "recall@1": (0 + 1) / 2,  # 0.5
    "precision@1": (0 + 1) / 2,  # 0.5
    "ndcg@1": (0 + 1) / 2,  # 0.5
    "neghit@1": (1 + 0) / 2,  # 0.5
    "hitrate@1": (0 + 1) / 2,  # 0.5
    "mrr@1": (0 + 1) / 2,  # 0.5
    # K = 3: u0 hits rank 2 (1 of 3), negatives at 1, 3; u1 hit rank 1, negative at 2.
    "recall@3": (1 / 3 + 1) / 2,  # 0.6667
    "precision@3": (1 / 3 + 1 / 3) / 2,  # 0.3333
    "ndcg@3": (D2 / IDCG_U0 + 1) / 2,  # (0.29608 + 1) / 2 = 0.6480409554829326
    "neghit@3": (2 / 3 + 1 / 3) / 2,  # 0.5
    "hitrate@3": (1 + 1) / 2,  # 1.0
    "mrr@3": (1 / 2 + 1) / 2,  # 0.75
    # K = 5: u0 hits ranks 2 and 5 (2 of 3), negatives 1, 3; u1 as before, plus negative item 0
    # at rank 4; its 5th slot is empty (only masked items are left), and masked item 5 never counts.
    "recall@5": (2 / 3 + 1) / 2,  # 0.8333
    "precision@5": (2 / 5 + 1 / 5) / 2,  # 0.3
    "ndcg@5": ((D2 + D5) / IDCG_U0 + 1) / 2,  # (0.47762 + 1) / 2 = 0.7388118517516089
    "neghit@5": (2 / 5 + 2 / 5) / 2,  # 0.4
    "hitrate@5": (1 + 1) / 2,  # 1.0
    "mrr@5": (1 / 2 + 1) / 2,  # 0.75
    "users": 2.0,
}


@pytest.mark.parametrize("batch", [1024, 1])
def test_evaluate_scores_by_hand(truth: Truth, masked: sp.csr_matrix, batch: int) -> None:
    asked: list[list[int]] = []

    def score_fn(users: np.ndarray) -> np.ndarray:
        asked.append(users.tolist())
        return _scores(users)

    got = evaluate_scores(score_fn, truth, masked, ks=KS_SMALL, batch=batch)
    assert set(got) == set(EXPECTED_SCORES)
    for name, value in EXPECTED_SCORES.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name
    # Only evaluated users are scored: u2 (no positives) never is.
    assert sorted(u for chunk in asked for u in chunk) == [0, 1]
    # Spot-check the literals themselves.
    assert got["ndcg@3"] == pytest.approx(0.6480409554829326)
    assert got["ndcg@5"] == pytest.approx(0.7388118517516089)


def test_evaluate_scores_default_ks_beyond_the_catalogue(
    truth: Truth, masked: sp.csr_matrix
) -> None:
    # K = 10 and 20 exceed what is left after masking: empty slots still count in K.
    got = evaluate_scores(_scores, truth, masked)
    assert {f"{m}@{k}" for m in METRICS for k in KS} | {"users"} == set(got)
    assert got["recall@5"] == pytest.approx((2 / 3 + 1) / 2)
    assert got["recall@10"] == pytest.approx((2 / 3 + 1) / 2)  # 0.8333, nothing more to find
    assert got["precision@10"] == pytest.approx((2 / 10 + 1 / 10) / 2)  # 0.15
    assert got["precision@20"] == pytest.approx((2 / 20 + 1 / 20) / 2)  # 0.075
    assert got["ndcg@10"] == pytest.approx(((D2 + D5) / IDCG_U0 + 1) / 2)  # 0.7388
    assert got["ndcg@20"] == pytest.approx(((D2 + D5) / IDCG_U0 + 1) / 2)  # 0.7388
    assert got["neghit@10"] == pytest.approx((2 / 10 + 2 / 10) / 2)  # 0.2
    assert got["neghit@20"] == pytest.approx((2 / 20 + 2 / 20) / 2)  # 0.1
    assert got["mrr@20"] == pytest.approx(0.75)
    assert got["hitrate@20"] == pytest.approx(1.0)


def test_masked_items_never_count_even_at_the_top(truth: Truth) -> None:
    # Mask every item of u0 except 4 (not in its truth): u0 can have no hit and no negative hit,
    # whatever the scores; u1 unmasked ranks 5 4 3 2 1 0: hit at rank 3, negatives 5 (1) and 2 (4).
    mask = interaction_matrix(np.zeros(5, np.int32), np.array([0, 1, 2, 3, 5]), N_USERS, N_ITEMS)
    got = evaluate_scores(_scores, truth, mask, ks=(5,))
    assert got["recall@5"] == pytest.approx((0 + 1) / 2)  # 0.5
    assert got["precision@5"] == pytest.approx((0 + 1 / 5) / 2)  # 0.1
    assert got["neghit@5"] == pytest.approx((0 + 2 / 5) / 2)  # 0.2
    assert got["mrr@5"] == pytest.approx((0 + 1 / 3) / 2)  # 0.1667
    assert got["ndcg@5"] == pytest.approx((0 + 0.5) / 2)  # u1: (1/log2 4) / ideal 1 = 0.5


EXPECTED_RANKED = {
    # u0 ranked [2, 5, -, -, -]: hits at ranks 1, 2 of 3 truth items; item 0 is u0's positive and
    # must not be read from a -1 pad. u1 ranked [3, -, ...]: hit at rank 1; item 0 is u1's
    # negative and must not be read from a pad either.
    "recall@1": (1 / 3 + 1) / 2,  # 0.6667
    "precision@1": (1 + 1) / 2,  # 1.0
    "ndcg@1": (1 + 1) / 2,  # ideal DCG@1 is 1 for both: 1.0
    "recall@3": (2 / 3 + 1) / 2,  # 0.8333
    "precision@3": (2 / 3 + 1 / 3) / 2,  # 0.5
    "ndcg@3": ((1 + D2) / IDCG_U0 + 1) / 2,  # (0.76536 + 1) / 2 = 0.8826803184943108
    "recall@5": (2 / 3 + 1) / 2,  # 0.8333
    "precision@5": (2 / 5 + 1 / 5) / 2,  # 0.3
    "ndcg@5": ((1 + D2) / IDCG_U0 + 1) / 2,  # 0.8826803184943108
    "neghit@1": 0.0,
    "neghit@3": 0.0,
    "neghit@5": 0.0,
    "hitrate@1": 1.0,
    "hitrate@3": 1.0,
    "hitrate@5": 1.0,
    "mrr@1": 1.0,
    "mrr@3": 1.0,
    "mrr@5": 1.0,
    "users": 2.0,
}


def test_evaluate_ranked_with_padding(truth: Truth) -> None:
    ranked = np.array([[2, 5, -1], [3, -1, -1]], dtype=np.int64)
    got = evaluate_ranked(ranked, np.array([0, 1]), truth, ks=KS_SMALL)
    assert set(got) == set(EXPECTED_RANKED)
    for name, value in EXPECTED_RANKED.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name
    assert got["ndcg@3"] == pytest.approx(0.8826803184943108)
    # Longer rows are cut at max K: an extra hit at rank 6 changes nothing.
    longer = np.array([[2, 5, -1, -1, -1, 0], [3, -1, -1, -1, -1, -1]])
    assert evaluate_ranked(longer, np.array([0, 1]), truth, ks=KS_SMALL) == got


def test_evaluate_ranked_all_padding_is_zero(truth: Truth) -> None:
    got = evaluate_ranked(np.full((2, 5), -1), np.array([0, 1]), truth, ks=(5,))
    assert got == {
        "recall@5": 0.0,
        "precision@5": 0.0,
        "ndcg@5": 0.0,
        "neghit@5": 0.0,
        "hitrate@5": 0.0,
        "mrr@5": 0.0,
        "users": 2.0,
    }


def test_no_users_is_an_error(truth: Truth, masked: sp.csr_matrix) -> None:
    with pytest.raises(ValueError, match="no users"):
        evaluate_ranked(np.zeros((0, 5), dtype=np.int64), np.zeros(0, np.int32), truth)
    empty = ground_truth(_interactions([(0, 1, 1.0)]), THRESHOLD, N_USERS, N_ITEMS)
    with pytest.raises(ValueError, match="no users"):
        evaluate_scores(_scores, empty, masked)


def test_top_k_orders_best_first() -> None:
    np.testing.assert_array_equal(top_k(SCORES, 3), [[0, 1, 2], [5, 4, 3], [1, 3, 5]])
    assert top_k(SCORES, 20).shape == (3, 6)
