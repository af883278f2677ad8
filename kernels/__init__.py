"""Hot-path kernels behind one validated API, run by a CPU (numba) or CUDA backend picked once.

Functions (identical signatures in ``kernels.cpu`` and ``kernels.cuda``):

- ``apply_events(acc, table, users, rows, weights)``: ``acc[users[k]] += weights[k] *
  table[rows[k]]`` in place, repeated users summed; a change of mind is two entries (minus the old
  weight and row, plus the new), so retraction is exact.
- ``fold_csr(indptr, rows, weights, table, out)``: overwrite ``out[u]`` with the weighted sum of
  user u's CSR row of the graph (model load).
- ``suppress_topk(cand_ids, cand_scores, unit_vecs, neg_indptr, neg_ids, excl_indptr, excl_ids,
  gamma, k)``: per query, drop -1 and excluded candidates, subtract ``gamma * max(0, max cosine to
  the query's disliked items)`` and return the k best as ``(int32 ids, float32 scores)`` padded
  with -1 / -inf; ties go to the lower candidate position.

Arrays are host NumPy arrays, C-contiguous, float32 data, int32 ids and rows, int64 offsets and
FAISS ids. The checks here are O(1) (dtype, layout, shapes); index ranges and CSR offsets are
checked by the backends before they write anything. Neither backend serialises concurrent
writers to the same ``acc``: callers own that locking.
"""

from __future__ import annotations

import logging
import math
import operator
import os
import threading
from types import ModuleType

import numpy as np
import numpy.typing as npt

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "apply_events",
    "backend",
    "fold_csr",
    "get_impl",
    "select_backend",
    "suppress_topk",
    "warmup",
]

LOG = logging.getLogger("signedrec.kernels")
ENV_VAR = "SIGNEDREC_KERNELS__BACKEND"
BACKENDS = ("cpu", "cuda")

backend: str  # resolved lazily by __getattr__ below, so reading it never sees a stale value

_ND = np.ndarray
_F32 = np.dtype(np.float32)
_I32 = np.dtype(np.int32)
_I64 = np.dtype(np.int64)


class _Selection:
    """The process-wide backend choice: its name and implementing module, once made."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.impl: ModuleType | None = None


_state = _Selection()
_select_lock = threading.Lock()
# numba's workqueue threading layer aborts the process on concurrent parallel launches, and
# fold_csr is the one parallel kernel; it runs at model load, so a plain lock costs nothing.
_fold_lock = threading.Lock()


def get_impl(name: str) -> ModuleType:
    """Return the backend module "cpu" or "cuda" itself, so tests can drive both explicitly."""
    if name == "cpu":
        from kernels import cpu

        return cpu
    if name == "cuda":
        from kernels import cuda

        return cuda
    raise ValueError(f"unknown kernel backend {name!r}; expected one of {BACKENDS}")


def _simulator_active() -> bool:
    """Whether numba's CUDA simulator replaces the real CUDA target in this process."""
    from numba import config

    return bool(getattr(config, "ENABLE_CUDASIM", 0))


def _cuda_problem() -> tuple[str, bool] | None:
    """Why real CUDA is unusable here, and whether that looks like a broken GPU host; None if ok."""
    try:
        from numba import cuda
    except Exception as exc:  # a broken numba-cuda install must not stop the CPU backend
        return f"numba.cuda cannot be imported: {' '.join(str(exc).split())}", True
    try:
        available = cuda.is_available()
        devices = list(cuda.list_devices())
    except Exception as exc:  # numba raises CudaSupportError and friends; all mean "no GPU"
        return f"no CUDA device: {' '.join(str(exc).split())}", False
    if not available:
        return "no CUDA device: numba.cuda.is_available() is False", False
    if not devices:
        return "no CUDA device: the driver lists none", True
    return None


def _gpu_name() -> str:
    """The first CUDA device's name, for the log line."""
    try:
        from numba import cuda

        name = cuda.list_devices()[0].name
    except Exception:  # only cosmetic: never let the log line break selection
        return "an unnamed GPU"
    return name.decode() if isinstance(name, bytes) else str(name)


def _resolve(preference: str) -> str:
    """Turn a validated preference into "cpu" or "cuda", logging why."""
    if preference == "cpu":
        LOG.info("kernel backend: cpu (requested)")
        return "cpu"
    if _simulator_active():
        if preference == "cuda":
            LOG.warning("kernel backend: cuda under the numba CUDA simulator (tests only, slow)")
            return "cuda"
        LOG.info("kernel backend: cpu, not cuda: NUMBA_ENABLE_CUDASIM=1 is set (simulator)")
        return "cpu"
    problem = _cuda_problem()
    if problem is not None:
        reason, broken = problem
        if preference == "cuda":
            raise RuntimeError(f"kernel backend 'cuda' was requested but {reason}")
        # A plain CPU host is expected (info); a GPU host whose driver misbehaves is not.
        LOG.log(
            logging.WARNING if broken else logging.INFO,
            "kernel backend: falling back to cpu: %s",
            reason,
        )
        return "cpu"
    if preference == "auto":
        # Measured on an H100 machine (benchmarks/reports/kernels-cuda.md, kernels-cpu-h100.md):
        # the user vectors live in host memory, so every CUDA call pays transfers and numba's
        # launch overhead, 764 us an event and 2.3 ms a suppression batch against 3.5 us and
        # 14 us for the CPU kernels there, which still lead 37x at 4,096 events a call. The GPU
        # serves FAISS instead.
        LOG.info(
            "kernel backend: cpu on a host with %s: the CPU kernels are faster at serving sizes "
            "(set kernels.backend=cuda to force the GPU kernels)",
            _gpu_name(),
        )
        return "cpu"
    LOG.info("kernel backend: cuda on %s (%s)", _gpu_name(), preference)
    return "cuda"


def select_backend(preference: str = "auto") -> str:
    """Choose the kernel backend once per process ("auto": the CPU, the faster at serving sizes
    even beside a GPU; "cuda" only on a working real GPU or under the simulator)."""
    # "auto" means "no explicit choice", so $SIGNEDREC_KERNELS__BACKEND (the config loader's
    # name for the same setting) refines it. Later calls return the cached choice; asking for
    # another explicit backend afterwards is an error rather than a silent no-op.
    source = "argument"
    if preference == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env:
            preference, source = env, f"${ENV_VAR}"
    if preference not in ("auto", *BACKENDS):
        raise ValueError(
            f"kernel backend {preference!r} (from {source}) is not one of 'auto', 'cpu', 'cuda'"
        )
    with _select_lock:
        if _state.name is not None:
            if preference not in ("auto", _state.name):
                raise RuntimeError(
                    f"kernel backend is already {_state.name!r} in this process; "
                    f"cannot switch to {preference!r}"
                )
            return _state.name
        name = _resolve(preference)
        _state.impl = get_impl(name)
        _state.name = name
        return name


def __getattr__(name: str) -> str:
    """Serve ``kernels.backend``, selecting with "auto" on first read."""
    if name == "backend":
        return _state.name if _state.name is not None else select_backend()
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")


def _impl() -> ModuleType:
    """The selected backend module, selecting with "auto" on first use."""
    impl = _state.impl
    if impl is None:
        select_backend()
        impl = _state.impl
    return impl  # type: ignore[return-value]


def _check(a: object, name: str, dtype: np.dtype, ndim: int) -> None:
    """Raise unless a is a C-contiguous ndarray of dtype with ndim dimensions."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    # `is` is the cheap common case; == still accepts an equal dtype object from e.g. unpickling.
    if a.dtype is not dtype and a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (see numpy.ascontiguousarray)")


def _check_writeable(a: np.ndarray, name: str) -> None:
    """Raise unless a may be written in place."""
    if not a.flags.writeable:
        raise ValueError(f"{name} is read-only but is written in place")


def apply_events(
    acc: npt.NDArray[np.float32],
    table: npt.NDArray[np.float32],
    users: npt.NDArray[np.int32],
    rows: npt.NDArray[np.int32],
    weights: npt.NDArray[np.float32],
) -> None:
    """Add weights[k] * table[rows[k]] to acc[users[k]] in place for every event k (feedback)."""
    # One flat expression is the fast path (about 0.6 us, a third of the whole call for one
    # event); only when it fails do the per-argument checks run to name the culprit.
    if not (
        type(acc) is _ND and acc.dtype is _F32 and acc.ndim == 2
        and type(table) is _ND and table.dtype is _F32 and table.ndim == 2
        and type(users) is _ND and users.dtype is _I32 and users.ndim == 1
        and type(rows) is _ND and rows.dtype is _I32 and rows.ndim == 1
        and type(weights) is _ND and weights.dtype is _F32 and weights.ndim == 1
        and (acc_flags := acc.flags).c_contiguous and acc_flags.writeable
        and table.flags.c_contiguous and users.flags.c_contiguous
        and rows.flags.c_contiguous and weights.flags.c_contiguous
    ):  # fmt: skip
        _check(acc, "acc", _F32, 2)
        _check(table, "table", _F32, 2)
        _check(users, "users", _I32, 1)
        _check(rows, "rows", _I32, 1)
        _check(weights, "weights", _F32, 1)
        _check_writeable(acc, "acc")
    if table.shape[1] != acc.shape[1]:
        raise ValueError(f"table has dim {table.shape[1]} but acc has dim {acc.shape[1]}")
    n = users.shape[0]
    if rows.shape[0] != n or weights.shape[0] != n:
        raise ValueError(
            f"users, rows and weights differ in length ({n}, {rows.shape[0]}, {weights.shape[0]})"
        )
    (_state.impl or _impl()).apply_events(acc, table, users, rows, weights)


def fold_csr(
    indptr: npt.NDArray[np.int64] | npt.NDArray[np.int32],
    rows: npt.NDArray[np.int32],
    weights: npt.NDArray[np.float32],
    table: npt.NDArray[np.float32],
    out: npt.NDArray[np.float32],
) -> None:
    """Overwrite out[u] with sum_p weights[p] * table[rows[p]] over user u's CSR slice (at load)."""
    if isinstance(indptr, np.ndarray) and indptr.dtype == _I32:
        # One compiled specialisation; this runs at model load, so the copy is free.
        indptr = indptr.astype(np.int64)
    _check(indptr, "indptr", _I64, 1)
    _check(rows, "rows", _I32, 1)
    _check(weights, "weights", _F32, 1)
    _check(table, "table", _F32, 2)
    _check(out, "out", _F32, 2)
    _check_writeable(out, "out")
    if indptr.shape[0] != out.shape[0] + 1:
        raise ValueError(f"indptr has {indptr.shape[0]} entries; out has {out.shape[0]} rows (+1)")
    if weights.shape[0] != rows.shape[0]:
        raise ValueError(f"rows and weights differ in length ({rows.shape[0]}, {weights.shape[0]})")
    if table.shape[1] != out.shape[1]:
        raise ValueError(f"table has dim {table.shape[1]} but out has dim {out.shape[1]}")
    impl = _impl()
    with _fold_lock:
        impl.fold_csr(indptr, rows, weights, table, out)


def suppress_topk(
    cand_ids: npt.NDArray[np.int64],
    cand_scores: npt.NDArray[np.float32],
    unit_vecs: npt.NDArray[np.float32],
    neg_indptr: npt.NDArray[np.int64],
    neg_ids: npt.NDArray[np.int32],
    excl_indptr: npt.NDArray[np.int64],
    excl_ids: npt.NDArray[np.int32],
    gamma: float,
    k: int,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """Per query, drop -1/excluded candidates, penalise closeness to dislikes, return the top k."""
    if not (
        type(cand_ids) is _ND and cand_ids.dtype is _I64 and cand_ids.ndim == 2
        and type(cand_scores) is _ND and cand_scores.dtype is _F32 and cand_scores.ndim == 2
        and type(unit_vecs) is _ND and unit_vecs.dtype is _F32 and unit_vecs.ndim == 2
        and type(neg_indptr) is _ND and neg_indptr.dtype is _I64 and neg_indptr.ndim == 1
        and type(neg_ids) is _ND and neg_ids.dtype is _I32 and neg_ids.ndim == 1
        and type(excl_indptr) is _ND and excl_indptr.dtype is _I64 and excl_indptr.ndim == 1
        and type(excl_ids) is _ND and excl_ids.dtype is _I32 and excl_ids.ndim == 1
        and cand_ids.flags.c_contiguous and cand_scores.flags.c_contiguous
        and unit_vecs.flags.c_contiguous and neg_indptr.flags.c_contiguous
        and neg_ids.flags.c_contiguous and excl_indptr.flags.c_contiguous
        and excl_ids.flags.c_contiguous
    ):  # fmt: skip
        _check(cand_ids, "cand_ids", _I64, 2)
        _check(cand_scores, "cand_scores", _F32, 2)
        _check(unit_vecs, "unit_vecs", _F32, 2)
        _check(neg_indptr, "neg_indptr", _I64, 1)
        _check(neg_ids, "neg_ids", _I32, 1)
        _check(excl_indptr, "excl_indptr", _I64, 1)
        _check(excl_ids, "excl_ids", _I32, 1)
    if cand_scores.shape != cand_ids.shape:
        raise ValueError(f"cand_scores {cand_scores.shape} and cand_ids {cand_ids.shape} differ")
    n_queries = cand_ids.shape[0]
    if neg_indptr.shape[0] != n_queries + 1 or excl_indptr.shape[0] != n_queries + 1:
        raise ValueError(f"neg_indptr and excl_indptr need {n_queries + 1} entries (queries + 1)")
    gamma = float(gamma)
    if not math.isfinite(gamma):
        raise ValueError(f"gamma must be finite, got {gamma}")
    k = operator.index(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return (_state.impl or _impl()).suppress_topk(
        cand_ids, cand_scores, unit_vecs, neg_indptr, neg_ids, excl_indptr, excl_ids, gamma, k
    )


def _read_only(a: np.ndarray) -> np.ndarray:
    """A read-only view of a."""
    view = a.view()
    view.flags.writeable = False
    return view


def warmup(d: int = 64) -> None:
    """Compile every kernel of the selected backend now so no request pays for JIT compilation."""
    # numba specialises on each array's read-only flag too, and inputs often arrive read-only
    # (np.frombuffer over a request body, memory-mapped model files): warm both variants.
    for frozen in (False, True):
        fix = _read_only if frozen else np.asarray
        table = fix(np.ones((3, d), np.float32))
        users = fix(np.array([0, 1, 1], np.int32))
        rows = fix(np.array([2, 0, 1], np.int32))
        weights = fix(np.array([1.0, -1.0, 0.5], np.float32))
        acc = np.zeros((2, d), np.float32)
        apply_events(acc, table, users, rows, weights)
        fold_csr(fix(np.array([0, 1, 3], np.int64)), rows, weights, table, acc)
        suppress_topk(
            fix(np.array([[0, 2, -1]], np.int64)),
            fix(np.array([[1.0, 0.5, 0.0]], np.float32)),
            table,
            fix(np.array([0, 1], np.int64)),
            fix(np.array([1], np.int32)),
            fix(np.array([0, 1], np.int64)),
            fix(np.array([2], np.int32)),
            0.5,
            2,
        )
