"""Ranking: FAISS candidates, hard exclusion, soft suppression of what resembles dislikes, top-K."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import kernels
from server.config import RankingConfig
from server.index import ItemIndex
from server.propensity import Propensity


@dataclass(frozen=True, slots=True)
class Ragged:
    """Per-query id lists as one CSR pair (int64 indptr, int32 ids)."""

    indptr: np.ndarray
    ids: np.ndarray

    @classmethod
    def from_lists(cls, lists: list[np.ndarray]) -> Ragged:
        """Concatenate per-query arrays into CSR form."""
        indptr = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in lists], out=indptr[1:])
        ids = np.concatenate(lists).astype(np.int32, copy=False) if lists else np.empty(0, np.int32)
        return cls(indptr, np.ascontiguousarray(ids, dtype=np.int32))


def _base(k: int, config: RankingConfig) -> int:
    """Unseen candidates every pool keeps after exclusion."""
    return max(config.candidate_min, k * config.candidate_multiplier)


def _pool_sizes(
    seen: np.ndarray, k: int, config: RankingConfig, at_least: np.ndarray | None
) -> np.ndarray:
    """Each row's pool: ``base`` unseen candidates past its ``seen`` items (at least the pad),
    or ``at_least`` where that is deeper."""
    pool = _base(k, config) + np.maximum(seen, config.exclusion_pad)
    return pool if at_least is None else np.maximum(pool, at_least)


def candidates(
    index: ItemIndex,
    queries: np.ndarray,
    seen: np.ndarray,
    k: int,
    config: RankingConfig,
    at_least: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """FAISS candidates per row: its pool is the top ``base + max(pad, seen)`` items, or
    ``at_least`` of them where that is deeper.

    ``base`` unseen candidates always remain after exclusion. The common search covers the pad;
    only rows whose history is longer are searched again to their own depth, so one heavy user
    no longer deepens the search (and its heap work) for every request batched with it, and a
    user's pool does not depend on who shares the batch.
    """
    pool = _pool_sizes(seen, k, config, at_least)
    common = min(_base(k, config) + config.exclusion_pad, index.size)
    heavy = pool > common
    if not heavy.any():
        return index.search(queries, common)
    widths = np.minimum(np.where(heavy, pool, common), index.size)
    depth = int(widths.max())
    scores = np.full((len(queries), depth), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), depth), -1, dtype=np.int64)
    # Rows are searched in groups of one width, each row at the width it would get alone: an
    # approximate index's deeper search is no prefix of a shallower one (IVF, HNSW).
    for width in np.unique(widths).tolist():
        rows = np.flatnonzero(widths == width)
        found_scores, found_ids = index.search(np.ascontiguousarray(queries[rows]), width)
        scores[rows, : found_scores.shape[1]] = found_scores
        ids[rows, : found_ids.shape[1]] = found_ids
    ids[np.arange(depth)[None, :] >= pool[:, None]] = -1
    return scores, ids


def popular_pool(
    order: np.ndarray,
    order_scores: np.ndarray,
    seen: np.ndarray,
    k: int,
    config: RankingConfig,
    at_least: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The most popular items as every row's candidates, each row's pool as deep as
    :func:`candidates` would search it (ids beyond it -1), best first."""
    pool = np.minimum(_pool_sizes(seen, k, config, at_least), len(order))
    depth = int(pool.max()) if len(pool) else 0
    ids = np.broadcast_to(order[:depth].astype(np.int64), (len(seen), depth)).copy()
    ids[np.arange(depth)[None, :] >= pool[:, None]] = -1
    scores = np.broadcast_to(order_scores[:depth], (len(seen), depth))
    return np.ascontiguousarray(scores, dtype=np.float32), ids


def rank_pool(
    scores: np.ndarray,
    ids: np.ndarray,
    unit_vectors: np.ndarray,
    excluded: Ragged,
    disliked: Ragged,
    k: int,
    gamma: float,
    propensity: Propensity | None = None,
    user_logits: np.ndarray | None = None,
    beta: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (ids int32, scores float32) per row of candidate pools (best first, -1 past each
    row's pool) after exclusion and suppression.

    With ``beta`` > 0 each candidate also loses ``beta`` x P(this user dislikes it), from the
    rows' dislike-rate ``user_logits`` and the item rates of ``propensity``.
    """
    # Scores are relative to each query's best candidate, so gamma means the same for every
    # user regardless of how much history (and so vector norm) they have.
    top = np.abs(scores[:, :1])
    scores = scores / np.where(top > 0, top, 1.0)
    if beta and propensity is not None and user_logits is not None:
        # Only lowers scores, so the kernel's pruning on raw scores stays exact.
        chance = propensity.probability(user_logits, np.where(ids >= 0, ids, 0))
        scores = scores - np.float32(beta) * chance
    return kernels.suppress_topk(
        np.ascontiguousarray(ids, dtype=np.int64),
        np.ascontiguousarray(scores, dtype=np.float32),
        unit_vectors,
        disliked.indptr,
        disliked.ids,
        excluded.indptr,
        excluded.ids,
        float(gamma),
        int(k),
    )


Pools = Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray]]
Ranks = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def unproven(
    pool_scores: np.ndarray, depth: np.ndarray, ranked: np.ndarray, n_items: int,
    slack: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """Rows whose pool (``depth`` candidates each) cannot prove their ranked top k. Penalties
    only lower scores, so an item outside a pool scores at most the pool's last raw score
    (relative to the row's best, as :func:`rank_pool` scales it) minus the row's ``slack``, the
    least penalty any item gets; a k-th score below that, or fewer than k results, leaves the
    row open unless the pool holds the whole catalogue."""
    top = np.abs(pool_scores[:, 0])
    last = pool_scores[np.arange(len(depth)), np.maximum(depth - 1, 0)] / np.where(
        top > 0, top, 1.0
    )
    if slack is not None:
        last = last - slack
    return (depth < n_items) & (depth > 0) & ~(ranked[:, -1] >= last)


def rank_proven(pools: Pools, rank: Ranks, n_rows: int, k: int, n_items: int,
                slack: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Top-k (ids int32, scores float32) of every row, exact for its scoring: ``pools(rows,
    at_least)`` gives candidate pools and ``rank(rows, scores, ids)`` ranks them; a row its pool
    cannot prove (large k, strong penalties) is searched again twice as deep until it can.
    ``slack`` (per row, optional) is a penalty every item of the row is sure to get."""
    out_ids = np.full((n_rows, k), -1, np.int32)
    out_scores = np.full((n_rows, k), -np.inf, np.float32)
    rows = np.arange(n_rows)
    at_least: np.ndarray | None = None
    while rows.size:
        scores, ids = pools(rows, at_least)
        out_ids[rows], out_scores[rows] = rank(rows, scores, ids)
        depth = (ids >= 0).sum(axis=1)
        asked = np.maximum(depth, 1 if at_least is None else at_least)
        floor = None if slack is None else slack[rows]
        again = unproven(scores, depth, out_scores[rows], n_items, floor) & (asked < n_items)
        rows, at_least = rows[again], np.minimum(2 * asked[again], n_items)
    return out_ids, out_scores
