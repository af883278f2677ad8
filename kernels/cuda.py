"""CUDA backend: the CPU kernels' twins, taking and returning HOST NumPy arrays.

Arrays cross PCIe on every call, but only what the call needs: ``apply_events`` ships the touched
user rows and the referenced table rows (not the whole matrices) and writes the updated rows back
into the caller's ``acc``; ``suppress_topk`` ships only the candidate and disliked item vectors;
``fold_csr`` (a load-time rebuild) ships the CSR graph and the table and copies the result into
``out``. So the API is in place on host memory exactly like the CPU backend; keeping state
resident on the device is a later optimisation that would change this contract.

Index ranges, CSR offsets and exclusion order are checked on the host before any transfer, with
the same exception types as the CPU backend. Under ``NUMBA_ENABLE_CUDASIM=1`` the same code runs
in numba's simulator, which is how the test suite checks these kernels without a GPU.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from numba import config, cuda, float32

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]

# The simulator runs each thread as a Python thread: tiny blocks keep the tests fast and still
# exercise multi-block grids and the strided candidate loops of the suppression kernel.
_SIMULATED = bool(getattr(config, "ENABLE_CUDASIM", 0))
_THREADS = 4 if _SIMULATED else 128
_WARP = 1 if _SIMULATED else 32


def _blocks(n_threads: int) -> int:
    """Blocks of _THREADS needed to cover n_threads."""
    return (n_threads + _THREADS - 1) // _THREADS


@cuda.jit(cache=True)
def _apply_kernel(acc_rows: F32, table_rows: F32, slots: I32, weights: F32) -> None:
    # One thread per (event, dim); atomics make repeated users in a batch sum correctly.
    i = cuda.grid(1)
    d = acc_rows.shape[1]
    if i < slots.shape[0] * d:
        k = i // d
        j = i - k * d
        cuda.atomic.add(acc_rows, (slots[k], j), weights[k] * table_rows[k, j])


@cuda.jit(cache=True)
def _fold_kernel(indptr: I64, rows: I32, weights: F32, table: F32, out: F32) -> None:
    # One thread per (user, dim), summing that user's edges in CSR order like the CPU kernel.
    i = cuda.grid(1)
    n_users = out.shape[0]
    d = out.shape[1]
    if i < n_users * d:
        u = i // d
        j = i - u * d
        s = float32(0.0)
        for p in range(indptr[u], indptr[u + 1]):
            s += weights[p] * table[rows[p], j]
        out[u, j] = s


@cuda.jit(device=True)
def _contains(sorted_ids: I32, lo: int, hi: int, value: int) -> bool:
    end = hi
    while lo < hi:
        mid = (lo + hi) // 2
        if sorted_ids[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo < end and sorted_ids[lo] == value


@cuda.jit(cache=True)
def _suppress_kernel(
    cand_ids: I64,
    cand_rows: I32,
    cand_scores: F32,
    vecs: F32,
    neg_indptr: I64,
    neg_rows: I32,
    excl_indptr: I64,
    excl_ids: I32,
    gamma: float,
    k: int,
    adj: F32,
    keep: npt.NDArray[np.int8],
    out_pos: I32,
    out_scores: F32,
) -> None:
    # One block per query. Phase 1: threads over candidates compute the adjusted score (or mark
    # the candidate dropped). Phase 2: each survivor counts the survivors ranked ahead of it
    # (higher score, or equal score at a lower position): that count is its output slot.
    b = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    step = cuda.blockDim.x
    n_cands = cand_ids.shape[1]
    d = vecs.shape[1]
    m0 = neg_indptr[b]
    m1 = neg_indptr[b + 1]
    e0 = excl_indptr[b]
    e1 = excl_indptr[b + 1]
    g = float32(gamma)
    for j in range(tid, k, step):
        out_pos[b, j] = -1
        out_scores[b, j] = -math.inf
    for c in range(tid, n_cands, step):
        item = cand_ids[b, c]
        ok = item >= 0
        if ok and e1 > e0:
            ok = not _contains(excl_ids, e0, e1, item)
        s = cand_scores[b, c]
        if ok and m1 > m0 and g != 0:
            row = cand_rows[b, c]
            p = float32(0.0)
            for q in range(m0, m1):
                nrow = neg_rows[q]
                dot = float32(0.0)
                for t in range(d):
                    dot += vecs[row, t] * vecs[nrow, t]
                p = max(p, dot)
            s = s - g * p
        adj[b, c] = s
        keep[b, c] = 1 if ok else 0
    cuda.syncthreads()
    for c in range(tid, n_cands, step):
        if keep[b, c] != 0:
            s = adj[b, c]
            rank = 0
            for c2 in range(n_cands):
                if keep[b, c2] != 0:
                    s2 = adj[b, c2]
                    if s2 > s or (s2 == s and c2 < c):
                        rank += 1
            if rank < k:
                out_pos[b, rank] = c
                out_scores[b, rank] = s


def _check_index(ids: npt.NDArray[np.integer], size: int, message: str) -> None:
    """Raise IndexError(message) unless every id lies in [0, size)."""
    if ids.shape[0] and (int(ids.min()) < 0 or int(ids.max()) >= size):
        raise IndexError(message)


def _offsets_ok(indptr: I64, length: int) -> bool:
    """Whether offsets start at 0, never decrease and end at length."""
    return bool(indptr[0] == 0 and indptr[-1] == length and np.all(indptr[1:] >= indptr[:-1]))


def apply_events(acc: F32, table: F32, users: I32, rows: I32, weights: F32) -> None:
    """Fold signed feedback into host user vectors in place on the GPU (acc[u] += w * table[r])."""
    _check_index(users, acc.shape[0], "apply_events: a user index is outside acc")
    _check_index(rows, table.shape[0], "apply_events: a row index is outside table")
    n = users.shape[0]
    d = acc.shape[1]
    if n == 0 or d == 0:
        return
    touched, slots = np.unique(users, return_inverse=True)
    acc_rows = cuda.to_device(acc[touched])
    _apply_kernel[_blocks(n * d), _THREADS](
        acc_rows,
        cuda.to_device(table[rows]),
        cuda.to_device(slots.astype(np.int32).reshape(-1)),
        cuda.to_device(weights),
    )
    acc[touched] = acc_rows.copy_to_host()


def fold_csr(indptr: I64, rows: I32, weights: F32, table: F32, out: F32) -> None:
    """Rebuild every host user vector from its CSR graph on the GPU, overwriting out."""
    if not _offsets_ok(indptr, rows.shape[0]):
        raise ValueError("fold_csr: indptr must start at 0, end at len(rows) and not decrease")
    _check_index(rows, table.shape[0], "fold_csr: a row index is outside table")
    n_users, d = out.shape
    if n_users == 0 or d == 0:
        return
    d_out = cuda.device_array((n_users, d), np.float32)
    _fold_kernel[_blocks(n_users * d), _THREADS](
        cuda.to_device(indptr),
        cuda.to_device(rows),
        cuda.to_device(weights),
        cuda.to_device(table),
        d_out,
    )
    d_out.copy_to_host(out)


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
    if not _offsets_ok(neg_indptr, neg_ids.shape[0]):
        raise ValueError("suppress_topk: neg_indptr must go 0..len(neg_ids), never decreasing")
    if not _offsets_ok(excl_indptr, excl_ids.shape[0]):
        raise ValueError("suppress_topk: excl_indptr must go 0..len(excl_ids), never decreasing")
    _check_index(neg_ids, n_items, "suppress_topk: a disliked id is outside unit_vecs")
    # A decrease is only allowed where a new query's slice starts.
    drops = np.flatnonzero(excl_ids[1:] < excl_ids[:-1]) + 1
    if drops.size and not np.all(np.isin(drops, excl_indptr)):
        raise ValueError("suppress_topk: each query's excl_ids slice must be sorted")
    if cand_ids.size and (int(cand_ids.min()) < -1 or int(cand_ids.max()) >= n_items):
        raise IndexError("suppress_topk: a candidate id is neither -1 nor a unit_vecs row")
    if np.isnan(cand_scores).any():
        raise ValueError("suppress_topk: candidate scores must not be NaN")


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
    """Rank FAISS candidates per query on the GPU after exclusions and dislike penalties."""
    _check_suppress(
        cand_ids, cand_scores, unit_vecs.shape[0], neg_indptr, neg_ids, excl_indptr, excl_ids
    )
    n_queries, n_cands = cand_ids.shape
    out_ids = np.full((n_queries, k), -1, np.int32)
    out_scores = np.full((n_queries, k), -np.inf, np.float32)
    if n_queries == 0 or n_cands == 0:
        return out_ids, out_scores
    # Ship only the item vectors this batch reads, and re-point the ids at that compact copy.
    needed = np.unique(np.concatenate((cand_ids[cand_ids >= 0], neg_ids.astype(np.int64))))
    vecs = unit_vecs[needed]
    cand_rows = np.searchsorted(needed, cand_ids).astype(np.int32)
    neg_rows = np.searchsorted(needed, neg_ids).astype(np.int32)
    d_pos = cuda.device_array((n_queries, k), np.int32)
    d_scores = cuda.device_array((n_queries, k), np.float32)
    threads = min(_THREADS, max(_WARP, (n_cands + _WARP - 1) // _WARP * _WARP))
    _suppress_kernel[n_queries, threads](
        cuda.to_device(cand_ids),
        cuda.to_device(cand_rows),
        cuda.to_device(cand_scores),
        cuda.to_device(vecs),
        cuda.to_device(neg_indptr),
        cuda.to_device(neg_rows),
        cuda.to_device(excl_indptr),
        cuda.to_device(excl_ids),
        float(gamma),
        int(k),
        cuda.device_array((n_queries, n_cands), np.float32),
        cuda.device_array((n_queries, n_cands), np.int8),
        d_pos,
        d_scores,
    )
    pos = d_pos.copy_to_host()
    picked = np.take_along_axis(cand_ids, np.maximum(pos, 0), axis=1)
    out_ids[:] = np.where(pos >= 0, picked, -1)
    out_scores[:] = d_scores.copy_to_host()
    return out_ids, out_scores
