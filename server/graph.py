"""The signed bipartite user-item graph as contiguous CSR arrays (int32 ids, float32 weights)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from server.data import Interactions


@dataclass(frozen=True, slots=True)
class SignedGraph:
    """Latest sign per (user, item) pair, split into positive and negative CSR adjacency."""

    n_users: int
    n_items: int
    pos_indptr: np.ndarray  # int64[n_users + 1]
    pos_items: np.ndarray  # int32
    neg_indptr: np.ndarray  # int64[n_users + 1]
    neg_items: np.ndarray  # int32

    @property
    def pos_degree(self) -> np.ndarray:
        """Positive degree of each user."""
        return np.diff(self.pos_indptr)

    def item_degrees(self) -> tuple[np.ndarray, np.ndarray]:
        """Positive and negative degree of each item."""
        return (
            np.bincount(self.pos_items, minlength=self.n_items),
            np.bincount(self.neg_items, minlength=self.n_items),
        )

    def matrices(self) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        """The positive and negative adjacency as float32 CSR matrices (users x items)."""
        shape = (self.n_users, self.n_items)
        pos = sp.csr_matrix(
            (np.ones(len(self.pos_items), np.float32), self.pos_items, self.pos_indptr), shape
        )
        neg = sp.csr_matrix(
            (np.ones(len(self.neg_items), np.float32), self.neg_items, self.neg_indptr), shape
        )
        return pos, neg

    def signed_input(self, neg_weight: float) -> sp.csr_matrix:
        """The model's input matrix: 1 for positive edges, ``neg_weight`` for negative ones."""
        pos, neg = self.matrices()
        return (pos + neg_weight * neg).tocsr()


def _csr(users: np.ndarray, items: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((items, users))
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(users, minlength=n_users), out=indptr[1:])
    return indptr, np.ascontiguousarray(items[order], dtype=np.int32)


def build_graph(
    interactions: Interactions, threshold: float, n_users: int, n_items: int
) -> SignedGraph:
    """Build the signed graph; a repeated (user, item) keeps the sign of its last row."""
    users = interactions.users.astype(np.int64)
    items = interactions.items.astype(np.int64)
    key = users * n_items + items
    # Keep the last occurrence of each pair: reverse, take first of unique, map back.
    _, first_rev = np.unique(key[::-1], return_index=True)
    keep = len(key) - 1 - first_rev
    users, items = users[keep], items[keep]
    positive = interactions.ratings[keep] >= threshold
    pos_indptr, pos_items = _csr(users[positive], items[positive], n_users)
    neg_indptr, neg_items = _csr(users[~positive], items[~positive], n_users)
    return SignedGraph(n_users, n_items, pos_indptr, pos_items, neg_indptr, neg_items)
