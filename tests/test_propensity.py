"""Dislike propensity: smoothed rates, their known values, and the rule that picks beta."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from server.config import ModelConfig
from server.propensity import Propensity

counts = st.lists(st.integers(0, 50), min_size=1, max_size=20)


def test_known_values() -> None:
    # Items: 3 likes / 1 dislike and an unrated one; global dislike rate 1/4.
    p = Propensity.from_counts(np.array([3, 0]), np.array([1, 0]), prior=4.0)
    assert p.rate == 0.25
    # Item 0: (1 + 4 * 0.25) / (4 + 4) = 0.25, the global rate: logit 0 relative to it.
    np.testing.assert_allclose(p.item_logit, [0.0, 0.0], atol=1e-6)
    # A user with no feedback sits at the global rate, so P(dislike) of an average item = 0.25.
    logit = p.user_logit(np.array([0.0]), np.array([0.0]))
    np.testing.assert_allclose(p.probability(logit, np.array([[0, 1]])), [[0.25, 0.25]], rtol=1e-5)
    # A user who disliked 8 of 8: (8 + 1) / (8 + 4) = 0.75.
    logit = p.user_logit(np.array([0.0]), np.array([8.0]))
    np.testing.assert_allclose(p.probability(logit, np.array([[1]])), [[0.75]], rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(pos=counts, neg=counts, extra=st.integers(1, 20), prior=st.floats(0.5, 64.0))
def test_more_dislikes_never_lower_the_chance(
    pos: list[int], neg: list[int], extra: int, prior: float
) -> None:
    n = min(len(pos), len(neg))
    p = Propensity.from_counts(np.array(pos[:n]), np.array(neg[:n]), prior)
    user_pos, user_neg = np.array(pos[:n], float), np.array(neg[:n], float)
    items = np.zeros((n, 1), np.int64)
    base = p.probability(p.user_logit(user_pos, user_neg), items)
    more = p.probability(p.user_logit(user_pos, user_neg + extra), items)
    assert np.all((base > 0) & (base < 1))
    assert np.all(more >= base - 1e-6)
    assert np.all(np.isfinite(p.item_logit))


@settings(max_examples=60, deadline=None)
@given(pos=counts, neg=counts, prior=st.floats(0.5, 64.0))
def test_least_probability_bounds_every_items_from_below(
    pos: list[int], neg: list[int], prior: float
) -> None:
    """Ranking proves a pool with it: no item's float32 P(dislike) may fall below it."""
    n = min(len(pos), len(neg))
    p = Propensity.from_counts(np.array(pos[:n]), np.array(neg[:n]), prior)
    logits = p.user_logit(np.array(pos[:n], float), np.array(neg[::-1][:n], float))
    every = p.probability(logits, np.broadcast_to(np.arange(n), (n, n)))
    least = p.least_probability(logits)
    assert np.all(least >= 0)
    assert np.all(least <= every.min(axis=1))
    assert np.all(every.min(axis=1) - least < 1e-4)  # and it is not a loose bound


def test_training_picks_the_largest_beta_within_tolerance(tiny_artifact: Path) -> None:
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    ranking = manifest["ranking"]
    config = ModelConfig()
    table = ranking["propensity_valid"]
    assert {row["beta"] for row in table} == set(config.propensity_grid) | {0.0}
    unweighted = next(r for r in table if r["beta"] == 0.0)["ndcg@20"]
    floor = (1 - config.propensity_tolerance) * unweighted
    assert ranking["propensity_beta"] == max(r["beta"] for r in table if r["ndcg@20"] >= floor)
    assert ranking["propensity_prior"] == config.propensity_prior
