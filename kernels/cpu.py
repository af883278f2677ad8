"""CPU backend: numba nopython kernels for event folding, CSR rebuilds and suppressed top-k.

Every function here trusts dtypes, contiguity and shapes (``kernels/__init__.py`` checks them),
but still checks index ranges and CSR offsets before touching memory, because an out-of-range
id would otherwise corrupt the process silently. Those checks are O(n) integer compares, run
before any write, so a rejected call leaves its output untouched.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from numba import njit, prange

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]

# Only the penalty dot products may be re-associated (vectorised reductions); scores, top-k
# comparisons and the accumulation in apply_events/fold_csr keep strict IEEE semantics.
_DOT_MATH = {"reassoc", "contract"}


@njit(cache=True, nogil=True)
def apply_events(acc: F32, table: F32, users: I32, rows: I32, weights: F32) -> None:
    """Add weights[k] * table[rows[k]] to acc[users[k]] in place for every event k (feedback)."""
    n_users, d = acc.shape
    n_rows = table.shape[0]
    for k in range(users.shape[0]):
        if users[k] < 0 or users[k] >= n_users:
            raise IndexError("apply_events: a user index is outside acc")
        if rows[k] < 0 or rows[k] >= n_rows:
            raise IndexError("apply_events: a row index is outside table")
    # In order, one event at a time: repeated users are summed exactly like np.add.at, and a
    # 4096-event batch takes tens of microseconds, far below any threading overhead.
    for k in range(users.shape[0]):
        u = users[k]
        r = rows[k]
        w = weights[k]
        for j in range(d):
            acc[u, j] += w * table[r, j]


@njit(cache=True, nogil=True)
def _check_csr(indptr: I64, rows: I32, n_users: int, n_rows: int) -> None:
    """Reject CSR offsets that are not 0..nnz non-decreasing, or rows outside the table."""
    if indptr[0] != 0 or indptr[n_users] != rows.shape[0]:
        raise ValueError("fold_csr: indptr must start at 0 and end at len(rows)")
    for u in range(n_users):
        if indptr[u + 1] < indptr[u]:
            raise ValueError("fold_csr: indptr must be non-decreasing")
    for p in range(rows.shape[0]):
        if rows[p] < 0 or rows[p] >= n_rows:
            raise IndexError("fold_csr: a row index is outside table")


@njit(cache=True, nogil=True, parallel=True)
def fold_csr(indptr: I64, rows: I32, weights: F32, table: F32, out: F32) -> None:
    """Rebuild every user vector from its CSR graph: out[u] = sum_p weights[p] * table[rows[p]]."""
    n_users, d = out.shape
    _check_csr(indptr, rows, n_users, table.shape[0])
    for u in prange(n_users):
        for j in range(d):
            out[u, j] = 0.0
        for p in range(indptr[u], indptr[u + 1]):
            r = rows[p]
            w = weights[p]
            for j in range(d):
                out[u, j] += w * table[r, j]


@njit(cache=True, nogil=True)
def _check_offsets(indptr: I64, n_queries: int, length: int) -> bool:
    """Whether per-query offsets start at 0, never decrease and end at the data length."""
    ok = indptr[0] == 0 and indptr[n_queries] == length
    for b in range(n_queries):
        ok = ok and indptr[b + 1] >= indptr[b]
    return ok


@njit(cache=True, nogil=True)
def _check_suppress(
    cand_ids: I64,
    cand_scores: F32,
    n_items: int,
    neg_indptr: I64,
    neg_ids: I32,
    excl_indptr: I64,
    excl_ids: I32,
) -> None:
    """Reject malformed offsets, unsorted exclusions, NaN scores and ids outside unit_vecs."""
    n_queries, n_cands = cand_ids.shape
    if not _check_offsets(neg_indptr, n_queries, neg_ids.shape[0]):
        raise ValueError("suppress_topk: neg_indptr must go 0..len(neg_ids), never decreasing")
    if not _check_offsets(excl_indptr, n_queries, excl_ids.shape[0]):
        raise ValueError("suppress_topk: excl_indptr must go 0..len(excl_ids), never decreasing")
    for j in range(neg_ids.shape[0]):
        if neg_ids[j] < 0 or neg_ids[j] >= n_items:
            raise IndexError("suppress_topk: a disliked id is outside unit_vecs")
    for b in range(n_queries):
        for e in range(excl_indptr[b] + 1, excl_indptr[b + 1]):
            if excl_ids[e] < excl_ids[e - 1]:
                raise ValueError("suppress_topk: each query's excl_ids slice must be sorted")
        for c in range(n_cands):
            if cand_ids[b, c] < -1 or cand_ids[b, c] >= n_items:
                raise IndexError("suppress_topk: a candidate id is neither -1 nor a unit_vecs row")
            if np.isnan(cand_scores[b, c]):
                raise ValueError("suppress_topk: candidate scores must not be NaN")


@njit(cache=True, nogil=True)
def _contains(sorted_ids: I32, lo: int, hi: int, value: int) -> bool:
    """Binary search for value in the non-empty sorted slice sorted_ids[lo:hi]."""
    # Branch-free halving: candidate ids are random, so a branchy search mispredicts often.
    n = hi - lo
    while n > 1:
        half = n >> 1
        lo += half * (sorted_ids[lo + half] <= value)
        n -= half
    return sorted_ids[lo] == value


@njit(cache=True, nogil=True)
def _adjusted(score: np.float32, gamma: np.float32, penalty: np.float32) -> np.float32:
    """score - gamma * penalty in strict float32: one definition for the early exit and result."""
    return score - gamma * penalty


@njit(cache=True, nogil=True, fastmath=_DOT_MATH)
def _penalties4(
    vecs: F32,
    i0: int,
    i1: int,
    i2: int,
    i3: int,
    neg_ids: I32,
    m0: int,
    m1: int,
    s0: np.float32,
    s1: np.float32,
    s2: np.float32,
    s3: np.float32,
    gamma: np.float32,
    floor: np.float32,
) -> tuple[float, float, float, float]:
    """Max(0, cosine) of four candidates against neg_ids[m0:m1]; a lower bound if all four lose."""
    d = vecs.shape[1]
    zero = np.float32(0.0)
    p0 = p1 = p2 = p3 = zero
    # A 4-candidate x 4-dislike register block: each loaded row feeds four dot products, which
    # keeps sixteen vector accumulators busy (about 3x one-dot-at-a-time; 15% over 4x2 at
    # d=256). Short dislike groups repeat the last id: a repeated dot cannot change a max.
    last = m1 - 1
    for j in range(m0, m1, 4):
        n0 = neg_ids[j]
        n1 = neg_ids[min(j + 1, last)]
        n2 = neg_ids[min(j + 2, last)]
        n3 = neg_ids[min(j + 3, last)]
        s00 = s01 = s02 = s03 = zero
        s10 = s11 = s12 = s13 = zero
        s20 = s21 = s22 = s23 = zero
        s30 = s31 = s32 = s33 = zero
        for t in range(d):
            y0 = vecs[n0, t]
            y1 = vecs[n1, t]
            y2 = vecs[n2, t]
            y3 = vecs[n3, t]
            x0 = vecs[i0, t]
            x1 = vecs[i1, t]
            x2 = vecs[i2, t]
            x3 = vecs[i3, t]
            s00 += x0 * y0
            s01 += x0 * y1
            s02 += x0 * y2
            s03 += x0 * y3
            s10 += x1 * y0
            s11 += x1 * y1
            s12 += x1 * y2
            s13 += x1 * y3
            s20 += x2 * y0
            s21 += x2 * y1
            s22 += x2 * y2
            s23 += x2 * y3
            s30 += x3 * y0
            s31 += x3 * y1
            s32 += x3 * y2
            s33 += x3 * y3
        p0 = max(p0, s00, s01, s02, s03)
        p1 = max(p1, s10, s11, s12, s13)
        p2 = max(p2, s20, s21, s22, s23)
        p3 = max(p3, s30, s31, s32, s33)
        # Penalties only grow, and gamma >= 0 whenever floor > -inf, so once every adjusted
        # score is at or below the current k-th best none of the four can enter the top k:
        # the partial maxima already prove it and the remaining dislikes are skipped.
        if (
            _adjusted(s0, gamma, p0) <= floor
            and _adjusted(s1, gamma, p1) <= floor
            and _adjusted(s2, gamma, p2) <= floor
            and _adjusted(s3, gamma, p3) <= floor
        ):
            break
    return p0, p1, p2, p3


@njit(cache=True, nogil=True)
def _insert(out_ids: I32, out_scores: F32, b: int, filled: int, k: int, item: int, s: float) -> int:
    """Insert (item, s) into query b's descending top-k; equal scores keep the earlier first."""
    if filled == k and not s > out_scores[b, k - 1]:
        return filled
    pos = filled if filled < k else k - 1
    while pos > 0 and out_scores[b, pos - 1] < s:
        out_scores[b, pos] = out_scores[b, pos - 1]
        out_ids[b, pos] = out_ids[b, pos - 1]
        pos -= 1
    out_scores[b, pos] = s
    out_ids[b, pos] = item
    return filled + 1 if filled < k else k


@njit(cache=True, nogil=True)
def _flush(
    cand_ids: I64,
    cand_scores: F32,
    unit_vecs: F32,
    neg_ids: I32,
    m0: int,
    m1: int,
    gamma: np.float32,
    can_prune: bool,
    pending: I64,
    n_pending: int,
    out_ids: I32,
    out_scores: F32,
    b: int,
    filled: int,
    k: int,
) -> int:
    """Penalise up to four pending candidate positions of query b and insert them in order."""
    last = pending[n_pending - 1]
    c0 = pending[0]
    # Short blocks repeat the last candidate; its duplicate results are simply not used.
    c1 = pending[1] if n_pending > 1 else last
    c2 = pending[2] if n_pending > 2 else last
    c3 = pending[3] if n_pending > 3 else last
    i0 = cand_ids[b, c0]
    i1 = cand_ids[b, c1]
    i2 = cand_ids[b, c2]
    i3 = cand_ids[b, c3]
    # A candidate whose adjusted score cannot beat this one is never inserted (-inf: no bound).
    floor = out_scores[b, k - 1] if can_prune and filled == k else np.float32(-np.inf)
    s0 = cand_scores[b, c0]
    s1 = cand_scores[b, c1]
    s2 = cand_scores[b, c2]
    s3 = cand_scores[b, c3]
    pens = _penalties4(unit_vecs, i0, i1, i2, i3, neg_ids, m0, m1, s0, s1, s2, s3, gamma, floor)
    for q in range(n_pending):
        c = pending[q]
        s = _adjusted(cand_scores[b, c], gamma, np.float32(pens[q]))
        filled = _insert(out_ids, out_scores, b, filled, k, cand_ids[b, c], s)
    return filled


@njit(cache=True, nogil=True)
def suppress_topk(
    cand_ids: I64,
    cand_scores: F32,
    unit_vecs: F32,
    neg_indptr: I64,
    neg_ids: I32,
    excl_indptr: I64,
    excl_ids: I32,
    gamma: float,
    k: int,
) -> tuple[I32, F32]:
    """Rank FAISS candidates per query after exclusions and dislike penalties; return the top k."""
    n_queries, n_cands = cand_ids.shape
    _check_suppress(
        cand_ids, cand_scores, unit_vecs.shape[0], neg_indptr, neg_ids, excl_indptr, excl_ids
    )
    out_ids = np.full((n_queries, k), -1, np.int32)
    out_scores = np.full((n_queries, k), -np.inf, np.float32)
    g = np.float32(gamma)
    # With gamma >= 0 the adjusted score never exceeds the raw one, so once k results are held a
    # candidate whose raw score cannot beat the k-th adjusted score is skipped without its dot
    # products, and a block of candidates stops scanning dislikes as soon as all of them have
    # fallen to or below it (see _penalties4). Results are exactly those of the full
    # computation; only work is saved (most on sorted FAISS rows).
    can_prune = gamma >= 0.0
    pending = np.empty(4, np.int64)
    for b in range(n_queries):
        m0 = neg_indptr[b]
        m1 = neg_indptr[b + 1]
        e0 = excl_indptr[b]
        e1 = excl_indptr[b + 1]
        penalise = m1 > m0 and gamma != 0.0
        filled = 0
        n_pending = 0
        # Without penalties the raw score is final; with gamma >= 0 it bounds the final one.
        bounded = can_prune or not penalise
        for c in range(n_cands):
            item = cand_ids[b, c]
            if item < 0:
                continue
            s = cand_scores[b, c]
            if bounded and filled == k and not s > out_scores[b, k - 1]:
                continue  # cannot enter the top k: no need to even look it up in exclusions
            if e1 > e0 and _contains(excl_ids, e0, e1, item):
                continue
            if not penalise:
                filled = _insert(out_ids, out_scores, b, filled, k, item, s)
                continue
            pending[n_pending] = c
            n_pending += 1
            if n_pending == 4:
                filled = _flush(
                    cand_ids, cand_scores, unit_vecs, neg_ids, m0, m1, g, can_prune, pending, 4,
                    out_ids, out_scores, b, filled, k,
                )  # fmt: skip
                n_pending = 0
        if n_pending > 0:
            filled = _flush(
                cand_ids, cand_scores, unit_vecs, neg_ids, m0, m1, g, can_prune, pending, n_pending,
                out_ids, out_scores, b, filled, k,
            )  # fmt: skip
    return out_ids, out_scores
