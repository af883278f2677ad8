"""Ranking: FAISS candidates, hard exclusion, soft suppression of what resembles dislikes, top-K."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import kernels
from server.config import RankingConfig
from server.index import ItemIndex


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

    def longest(self) -> int:
        """The longest list's length."""
        return int(np.diff(self.indptr).max()) if len(self.indptr) > 1 else 0


def rank(
    index: ItemIndex,
    unit_vectors: np.ndarray,
    queries: np.ndarray,
    excluded: Ragged,
    disliked: Ragged,
    k: int,
    gamma: float,
    config: RankingConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (ids int32, scores float32) per query row after exclusion and suppression."""
    wanted = max(config.candidate_min, k * config.candidate_multiplier) + excluded.longest()
    scores, ids = index.search(queries, min(wanted, index.size))
    # Scores are relative to each query's best candidate, so gamma means the same for every
    # user regardless of how much history (and so vector norm) they have.
    top = np.abs(scores[:, :1])
    scores = scores / np.where(top > 0, top, 1.0)
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
