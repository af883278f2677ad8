"""The shared datasets' evaluation protocol, vectorised; the one implementation everyone uses.

Users evaluated: those with a positive in the evaluated split. Candidates: all items, minus every
item the user has in the masked interactions (train, or train + valid online). Ground truth: the
user's positives in the split. Metrics averaged over users for each K.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from server.data import Interactions

KS: tuple[int, ...] = (5, 10, 20)
METRICS: tuple[str, ...] = ("recall", "precision", "ndcg", "neghit", "hitrate", "mrr")


@dataclass(frozen=True, slots=True)
class Truth:
    """Who is evaluated and what counts as a hit (positives) or a negative hit, as CSR matrices."""

    users: np.ndarray  # int32, users with at least one positive in the split
    positives: sp.csr_matrix  # n_users x n_items, bool
    negatives: sp.csr_matrix  # n_users x n_items, bool


def interaction_matrix(
    users: np.ndarray, items: np.ndarray, n_users: int, n_items: int
) -> sp.csr_matrix:
    """A boolean user x item CSR matrix of the given pairs (duplicates collapse)."""
    data = np.ones(len(users), dtype=bool)
    m = sp.csr_matrix((data, (users, items)), shape=(n_users, n_items), dtype=bool)
    m.sum_duplicates()
    return m


def held_out(split: Interactions, seen: sp.csr_matrix) -> tuple[Interactions, int]:
    """The rows of a split whose pair is not in ``seen`` (a train graph that took in logged
    feedback may hold some), and how many are: those are input now, not held out."""
    inside = np.asarray(seen[split.users, split.items]).ravel().astype(bool)
    keep = ~inside
    return Interactions(split.users[keep], split.items[keep], split.ratings[keep]), int(
        inside.sum()
    )


def ground_truth(split: Interactions, threshold: float, n_users: int, n_items: int) -> Truth:
    """The protocol's evaluated users and their positive/negative items in one split."""
    pos = split.positive(threshold)
    positives = interaction_matrix(split.users[pos], split.items[pos], n_users, n_items)
    negatives = interaction_matrix(split.users[~pos], split.items[~pos], n_users, n_items)
    users = np.flatnonzero(np.diff(positives.indptr) > 0).astype(np.int32)
    return Truth(users=users, positives=positives, negatives=negatives)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores per row, best first."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def rank_metrics(
    ranked: np.ndarray, users: np.ndarray, truth: Truth, ks: Sequence[int] = KS
) -> dict[str, float]:
    """Metric sums for ranked lists (rows: users, -1 pads) against the truth; caller averages."""
    kmax = max(ks)
    if ranked.shape[1] < kmax:
        pad = np.full((ranked.shape[0], kmax - ranked.shape[1]), -1, dtype=ranked.dtype)
        ranked = np.hstack([ranked, pad])
    ranked = ranked[:, :kmax]
    valid = ranked >= 0
    safe = np.where(valid, ranked, 0)
    pos_rows = truth.positives[users]
    neg_rows = truth.negatives[users]
    rows = np.arange(len(users))[:, None]
    hits = np.asarray(pos_rows[rows, safe].todense(), dtype=bool) & valid
    neg_hits = np.asarray(neg_rows[rows, safe].todense(), dtype=bool) & valid
    n_pos = np.diff(pos_rows.indptr).astype(np.float64)
    discount = 1.0 / np.log2(np.arange(2, kmax + 2))
    cum_discount = np.concatenate([[0.0], np.cumsum(discount)])
    sums: dict[str, float] = {}
    for k in ks:
        h = hits[:, :k]
        n_hits = h.sum(axis=1)
        dcg = (h * discount[:k]).sum(axis=1)
        idcg = cum_discount[np.minimum(n_pos, k).astype(np.int64)]
        first = np.where(h.any(axis=1), h.argmax(axis=1) + 1, 0)
        sums[f"recall@{k}"] = float((n_hits / np.maximum(n_pos, 1)).sum())
        sums[f"precision@{k}"] = float((n_hits / k).sum())
        sums[f"ndcg@{k}"] = float((dcg / np.maximum(idcg, 1e-12)).sum())
        sums[f"neghit@{k}"] = float((neg_hits[:, :k].sum(axis=1) / k).sum())
        sums[f"hitrate@{k}"] = float((n_hits > 0).sum())
        sums[f"mrr@{k}"] = float(np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0).sum())
    return sums


def evaluate_ranked(
    ranked: np.ndarray, users: np.ndarray, truth: Truth, ks: Sequence[int] = KS
) -> dict[str, float]:
    """Protocol metrics for precomputed ranked lists, one row per user in ``users``."""
    if len(users) == 0:
        raise ValueError("no users to evaluate")
    sums = rank_metrics(ranked, users, truth, ks)
    out = {name: value / len(users) for name, value in sums.items()}
    out["users"] = float(len(users))
    return out


def evaluate_variants(
    score_fn: Callable[[np.ndarray], dict[str, np.ndarray]],
    truth: Truth,
    masked: sp.csr_matrix,
    ks: Sequence[int] = KS,
    batch: int = 256,
) -> dict[str, dict[str, float]]:
    """Protocol metrics for several scorings of the same users in one pass (one mask per chunk)."""
    users = truth.users
    if len(users) == 0:
        raise ValueError("no users with a positive in the evaluated split")
    totals: dict[str, dict[str, float]] = {}
    for start in range(0, len(users), batch):
        chunk = users[start : start + batch]
        m = masked[chunk].tocoo()
        for variant, raw in score_fn(chunk).items():
            scores = np.array(raw, dtype=np.float32, copy=True)
            scores[m.row, m.col] = -np.inf
            ranked = top_k(scores, max(ks))
            # Masked items that still reach the top K (tiny catalogues) are never hits.
            finite = np.isfinite(np.take_along_axis(scores, ranked, axis=1))
            ranked = np.where(finite, ranked, -1)
            sums = totals.setdefault(variant, {})
            for name, value in rank_metrics(ranked, chunk, truth, ks).items():
                sums[name] = sums.get(name, 0.0) + value
    out: dict[str, dict[str, float]] = {}
    for variant, sums in totals.items():
        out[variant] = {name: value / len(users) for name, value in sums.items()}
        out[variant]["users"] = float(len(users))
    return out


def evaluate_scores(
    score_fn: Callable[[np.ndarray], np.ndarray],
    truth: Truth,
    masked: sp.csr_matrix,
    ks: Sequence[int] = KS,
    batch: int = 256,
) -> dict[str, float]:
    """Protocol metrics for a model given as ``users -> dense scores``, masking ``masked`` items."""
    return evaluate_variants(lambda u: {"": score_fn(u)}, truth, masked, ks, batch)[""]
