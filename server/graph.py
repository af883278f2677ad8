"""The signed bipartite user-item graph as contiguous CSR arrays (int32 ids, float32 weights).

An edge's weight is the size of its signed strength: 1 for a dataset row, the configured weight of
the event kind for feedback folded in from the event log (a skip is a weak dislike).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from server.data import Interactions

DATASET_STRENGTH = 1.0  # a dataset row's strength: +1 a like, -1 a dislike


@dataclass(frozen=True, slots=True)
class SignedGraph:
    """Latest sign per (user, item) pair, split into positive and negative CSR adjacency."""

    n_users: int
    n_items: int
    pos_indptr: np.ndarray  # int64[n_users + 1]
    pos_items: np.ndarray  # int32
    neg_indptr: np.ndarray  # int64[n_users + 1]
    neg_items: np.ndarray  # int32
    pos_weights: np.ndarray  # float32, > 0, parallel to pos_items
    neg_weights: np.ndarray  # float32, > 0 (the size of a negative strength), parallel to neg_items

    @property
    def pos_degree(self) -> np.ndarray:
        """Positive degree of each user."""
        return np.diff(self.pos_indptr)

    def item_degrees(self) -> tuple[np.ndarray, np.ndarray]:
        """Positive and negative weighted degree of each item (counts for a dataset graph)."""
        return (
            np.bincount(self.pos_items, self.pos_weights, minlength=self.n_items),
            np.bincount(self.neg_items, self.neg_weights, minlength=self.n_items),
        )

    def user_degrees(self) -> tuple[np.ndarray, np.ndarray]:
        """Positive and negative weighted degree of each user, as the live state counts them."""
        pos, neg = self.matrices()
        return np.asarray(pos.sum(axis=1)).ravel(), np.asarray(neg.sum(axis=1)).ravel()

    def matrices(self) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        """The positive and negative adjacency as float32 CSR matrices (users x items)."""
        shape = (self.n_users, self.n_items)
        pos = sp.csr_matrix((self.pos_weights, self.pos_items, self.pos_indptr), shape)
        neg = sp.csr_matrix((self.neg_weights, self.neg_items, self.neg_indptr), shape)
        return pos, neg

    def edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every edge as (user int64, item int64, signed strength float32), positives first."""
        users = np.concatenate([np.repeat(np.arange(self.n_users), np.diff(indptr))
                                for indptr in (self.pos_indptr, self.neg_indptr)])  # fmt: skip
        items = np.concatenate([self.pos_items, self.neg_items]).astype(np.int64)
        return users, items, np.concatenate([self.pos_weights, -self.neg_weights])

    def latest_negatives(self, recent: int) -> sp.csr_matrix:
        """Each user's last ``recent`` dislikes in row order, the ones the server's look-alike
        suppression reads (``ranking.suppression_recent``), as a float32 CSR matrix."""
        counts = np.diff(self.neg_indptr)
        # An entry's distance from its row's end: kept when it is among the last ``recent``.
        from_end = np.repeat(self.neg_indptr[1:], counts) - np.arange(len(self.neg_items))
        keep = from_end <= recent
        indptr = np.zeros(self.n_users + 1, dtype=np.int64)
        np.cumsum(np.minimum(counts, recent), out=indptr[1:])
        return sp.csr_matrix((self.neg_weights[keep], self.neg_items[keep], indptr),
                             (self.n_users, self.n_items))  # fmt: skip

    def signed_input(self, neg_weight: float) -> sp.csr_matrix:
        """The model's input matrix: 1 for positive edges, ``neg_weight`` for negative ones."""
        pos, neg = self.matrices()
        return (pos + neg_weight * neg).tocsr()


def _csr(
    users: np.ndarray, items: np.ndarray, weights: np.ndarray, key: np.ndarray, n_users: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.lexsort((key, users))  # each user's row ordered by ``key``
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(users, minlength=n_users), out=indptr[1:])
    return (
        indptr,
        np.ascontiguousarray(items[order], dtype=np.int32),
        np.ascontiguousarray(weights[order], dtype=np.float32),
    )


def _signed_graph(
    users: np.ndarray, items: np.ndarray, strengths: np.ndarray, n_users: int, n_items: int,
    by_time: bool = False,
) -> SignedGraph:  # fmt: skip
    """The graph of the last strength given to each (user, item) pair, in array order. Rows are
    sorted by item, or with ``by_time`` by when each pair last changed (oldest first)."""
    key = users.astype(np.int64) * n_items + items
    # Keep the last occurrence of each pair: reverse, take first of unique, map back.
    _, first_rev = np.unique(key[::-1], return_index=True)
    keep = len(key) - 1 - first_rev
    users, items, strengths = users[keep], items[keep], strengths[keep]
    order = keep if by_time else items
    positive, negative = strengths > 0, strengths < 0  # a latest strength of 0 drops the pair
    pos = _csr(users[positive], items[positive], strengths[positive], order[positive], n_users)
    neg = _csr(users[negative], items[negative], -strengths[negative], order[negative], n_users)
    return SignedGraph(n_users, n_items, pos[0], pos[1], neg[0], neg[1], pos[2], neg[2])


def build_graph(
    interactions: Interactions, threshold: float, n_users: int, n_items: int
) -> SignedGraph:
    """Build the signed graph; a repeated (user, item) keeps the sign of its last row."""
    positive = interactions.ratings >= threshold
    strengths = np.where(positive, np.float32(DATASET_STRENGTH), np.float32(-DATASET_STRENGTH))
    return _signed_graph(interactions.users.astype(np.int64), interactions.items.astype(np.int64),
                         strengths, n_users, n_items)  # fmt: skip


def with_feedback(
    graph: SignedGraph, users: np.ndarray, items: np.ndarray, strengths: np.ndarray, n_users: int
) -> SignedGraph:
    """The graph after feedback applied in order (the latest strength per pair wins), over
    ``n_users >= graph.n_users`` users: what the live state holds after the same events. Each
    row keeps the graph's edges first, in their order, then the feedback's by when it came, so
    a user's dislikes end with the most recent, as the live state's (suppression reads those)."""
    if n_users < graph.n_users:
        raise ValueError(f"n_users {n_users} is below the graph's {graph.n_users}")
    if not np.all(np.isfinite(strengths)):
        raise ValueError("feedback strengths must be finite")
    base_users, base_items, base_strengths = graph.edges()
    return _signed_graph(
        np.concatenate([base_users, np.asarray(users, np.int64)]),
        np.concatenate([base_items, np.asarray(items, np.int64)]),
        np.concatenate([base_strengths, np.asarray(strengths, np.float32)]),
        n_users,
        graph.n_items,
        by_time=True,
    )
