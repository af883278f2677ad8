"""Dislike propensity: how likely a user is to dislike an item, from who they are and what it is.

Among the items a good model ranks high, whether one turns out disliked is explained mostly by
how often this user dislikes and how often this item is disliked (benchmarks/neghit.py: a
user x item term adds nothing). Both rates are smoothed towards the global rate by ``prior``
pseudo-ratings and added in logit space; the ranking subtracts ``beta`` times the probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_EPS = 1e-6
# Far above float32 rounding of a probability and of a score minus a penalty (~1e-7).
_LEAST_MARGIN = 1e-5


def _logit(neg: np.ndarray, pos: np.ndarray, rate: float, prior: float) -> np.ndarray:
    smoothed = (neg + prior * rate) / (neg + pos + prior)
    smoothed = np.clip(smoothed, _EPS, 1.0 - _EPS)
    return np.log(smoothed / (1.0 - smoothed))


@dataclass(frozen=True, slots=True)
class Propensity:
    """Item dislike logits relative to the global rate, and what smooths a user's rate."""

    item_logit: np.ndarray  # float32 per item: logit(item rate) - logit(global rate)
    rate: float  # global share of dislikes among signed feedback
    prior: float  # pseudo-ratings at the global rate added to every user and item

    @classmethod
    def from_counts(cls, item_pos: np.ndarray, item_neg: np.ndarray, prior: float) -> Propensity:
        """From per-item (strength-weighted) like and dislike counts of the trained graph."""
        total = float(item_pos.sum() + item_neg.sum())
        rate = float(np.clip(item_neg.sum() / total if total > 0 else 0.5, _EPS, 1.0 - _EPS))
        mean = np.log(rate / (1.0 - rate))
        logits = _logit(item_neg.astype(np.float64), item_pos.astype(np.float64), rate, prior)
        return cls((logits - mean).astype(np.float32), rate, float(prior))

    def user_logit(self, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
        """Smoothed dislike-rate logits of users with these like and dislike counts."""
        return _logit(np.asarray(neg, np.float64), np.asarray(pos, np.float64), self.rate,
                      self.prior).astype(np.float32)  # fmt: skip

    def least_probability(self, user_logit: np.ndarray) -> np.ndarray:
        """Each user's smallest P(dislike) over the catalogue, rounded down a little so the
        float32 probabilities of :meth:`probability` never fall below it."""
        z = user_logit.astype(np.float64) + float(self.item_logit.min())
        return np.maximum(1.0 / (1.0 + np.exp(-z)) * (1.0 - _LEAST_MARGIN) - _LEAST_MARGIN, 0.0)

    def probability(self, user_logit: np.ndarray, items: np.ndarray) -> np.ndarray:
        """P(dislike) for each row's items (``items`` shaped (users, n); ids must be valid)."""
        z = user_logit[:, None] + self.item_logit[items]
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
