"""Baselines on seeded synthetic data with a known answer: bundles of items that always co-occur."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator

import numpy as np
import pytest

from server.data import Dataset, Interactions
from server.evaluate import evaluate_scores, ground_truth, interaction_matrix
from tests.conftest import known_training_warnings_ignored

N_BUNDLES = 10  # items 2k and 2k+1 form bundle k: every regular user likes both or neither
N_REGULAR = 40
BUNDLES_PER_USER = 3
THRESHOLD = 4.0


def _split(rows: list[tuple[int, int, float]]) -> Interactions:
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
    return Interactions(
        arr[:, 0].astype(np.int32), arr[:, 1].astype(np.int32), arr[:, 2].astype(np.float32)
    )


def bundle_dataset(seed: int = 0) -> Dataset:
    """Regular users like whole bundles and dislike one other item; probe user k (one per bundle)
    has only item 2k in train, and its partner 2k+1 held out (valid for k < 5, test otherwise)."""
    rng = np.random.default_rng(seed)
    n_items = 2 * N_BUNDLES
    train: list[tuple[int, int, float]] = []
    for user in range(N_REGULAR):
        bundles = rng.choice(N_BUNDLES, BUNDLES_PER_USER, replace=False)
        liked = {2 * int(b) + j for b in bundles for j in (0, 1)}
        for item in sorted(liked):
            train.append((user, item, float(rng.choice([4.0, 5.0]))))
        disliked = int(rng.choice(sorted(set(range(n_items)) - liked)))
        train.append((user, disliked, 1.0))
    valid: list[tuple[int, int, float]] = []
    test: list[tuple[int, int, float]] = []
    for k in range(N_BUNDLES):
        probe = N_REGULAR + k
        train.append((probe, 2 * k, 5.0))
        (valid if k < N_BUNDLES // 2 else test).append((probe, 2 * k + 1, 5.0))
    return Dataset(
        train=_split(train),
        valid=_split(valid),
        test=_split(test),
        n_users=N_REGULAR + N_BUNDLES,
        n_items=n_items,
        threshold=THRESHOLD,
        fingerprint="synthetic",
        name="bundles",
    )


def partner_ranks(model: object, dataset: Dataset) -> list[int]:
    """Rank (0 = first) of item 2k+1 for probe user k, with the probe's train item masked."""
    ranks = []
    for k in range(N_BUNDLES):
        probe = N_REGULAR + k
        scores = np.asarray(model.scores(np.asarray([probe])), dtype=np.float64)[0]  # type: ignore[attr-defined]
        scores[2 * k] = -np.inf
        ranks.append(int((scores > scores[2 * k + 1]).sum()))
    return ranks


@pytest.fixture(autouse=True)
def _known_warnings() -> Iterator[None]:
    """server.baselines reaches torch_geometric (via server.train), whose import warns."""
    with known_training_warnings_ignored():
        yield


@pytest.fixture(scope="module")
def bundles() -> Dataset:
    """The seeded bundle dataset, shared by the tests of this module."""
    return bundle_dataset()


def test_most_popular_scores_are_positive_train_counts(bundles: Dataset) -> None:
    """MostPopular scores every item by its positive train count; negatives do not count."""
    from server.baselines import fit_most_popular

    model = fit_most_popular(bundles, out=io.StringIO())
    train = bundles.train
    pos = train.ratings >= THRESHOLD
    expected = np.bincount(train.items[pos], minlength=bundles.n_items)
    scores = model.scores(np.asarray([0, 5, N_REGULAR]))
    assert scores.shape == (3, bundles.n_items)
    assert scores.dtype == np.float32
    np.testing.assert_array_equal(scores, np.broadcast_to(expected, scores.shape))
    order = np.argsort(-scores[0], kind="stable")
    assert (np.diff(expected[order]) <= 0).all()


def test_ease_ranks_the_bundle_partner_first(bundles: Dataset) -> None:
    """EASE puts the always-co-liked partner item first for every probe user."""
    from server.baselines import fit_ease

    log = io.StringIO()
    model = fit_ease(bundles, out=log)
    assert partner_ranks(model, bundles) == [0] * N_BUNDLES
    assert model.params["neg_weight"] in (0.25, 0.5)
    assert model.params["l2"] in (10.0, 25.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1600.0)
    assert model.params["valid_ndcg@20"] == pytest.approx(1.0)
    assert np.allclose(np.diag(model.b), 0.0)
    assert log.getvalue().count("ease: w=") == 16


def test_ease_matches_the_direct_ridge_solution() -> None:
    """Each column of EASE's B is the ridge regression of that item on all the others."""
    from server.baselines import ease_weights

    rng = np.random.default_rng(1)
    x = (rng.random((30, 6)) < 0.4).astype(np.float64)
    gram = x.T @ x
    b = ease_weights(gram, 2.0)
    for j in range(6):
        others = [i for i in range(6) if i != j]
        xo = x[:, others]
        coef = np.linalg.solve(xo.T @ xo + 2.0 * np.eye(5), xo.T @ x[:, j])
        np.testing.assert_allclose(b[others, j], coef, rtol=1e-4, atol=1e-5)
        assert b[j, j] == 0.0


def test_lightgcn_ranks_the_bundle_partner_near_the_top(bundles: Dataset) -> None:
    """LightGCN (PyG) trained with BPR puts the partner item in the top 3 for most probes."""
    from server.baselines import fit_lightgcn

    log = io.StringIO()
    model = fit_lightgcn(
        bundles,
        lrs=(1e-2,),
        dim=16,
        max_epochs=300,
        max_seconds=15.0,
        eval_every=10,
        patience=5,
        out=log,
    )
    ranks = partner_ranks(model, bundles)
    assert sum(r < 3 for r in ranks) >= N_BUNDLES - 1, ranks
    assert model.user_emb.shape == (bundles.n_users, 16)
    assert model.item_emb.shape == (bundles.n_items, 16)
    assert "epoch 1:" in log.getvalue()
    # Evaluated through the one protocol implementation, it beats popularity on test.
    assert bundles.test is not None
    truth = ground_truth(bundles.test, THRESHOLD, bundles.n_users, bundles.n_items)
    masked = interaction_matrix(
        bundles.train.users, bundles.train.items, bundles.n_users, bundles.n_items
    )
    from server.baselines import fit_most_popular

    ours = evaluate_scores(model.scores, truth, masked)["ndcg@5"]
    popular = evaluate_scores(fit_most_popular(bundles, out=io.StringIO()).scores, truth, masked)[
        "ndcg@5"
    ]
    assert ours > popular


def test_lightgcn_respects_the_wall_time_cap(bundles: Dataset) -> None:
    """A zero-second cap stops after one epoch and still returns an evaluated model."""
    from server.baselines import fit_lightgcn

    model = fit_lightgcn(bundles, dim=8, max_seconds=0.0, out=io.StringIO())
    assert model.params["stopped_by"] == "wall-time cap"
    assert model.params["epochs_run"] == 1
    assert model.scores(np.arange(3)).shape == (3, bundles.n_items)


def test_lightgcn_refuses_a_train_split_without_likes(bundles: Dataset) -> None:
    from server.baselines import fit_lightgcn
    from server.errors import DataError

    train = bundles.train
    disliked = Interactions(train.users, train.items, np.ones_like(train.ratings))
    only_dislikes = dataclasses.replace(bundles, train=disliked)
    with pytest.raises(DataError, match=r"bundles/train\.txt: no positive interaction"):
        fit_lightgcn(only_dislikes, dim=8, max_seconds=5.0, out=io.StringIO())


def test_negative_sampling_avoids_train_positives() -> None:
    """Sampled negatives are uniform over items but never the user's own train positives."""
    from server.baselines import sample_negatives

    rng = np.random.default_rng(0)
    n_items = 50
    users = np.repeat(np.arange(20), 40)
    pos = {(u, i) for u in range(20) for i in range(0, 25, 2)}
    keys = np.sort(np.asarray([u * n_items + i for u, i in pos], dtype=np.int64))
    neg = sample_negatives(users, keys, n_items, rng)
    assert not any((int(u), int(j)) in pos for u, j in zip(users, neg, strict=True))
    assert len(np.unique(neg)) > 30
