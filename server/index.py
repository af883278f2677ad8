"""FAISS inner-product indexes over item vectors, on the GPU when one is usable, else the CPU."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from importlib.metadata import packages_distributions

import faiss
import numpy as np

from server.config import IndexConfig
from server.errors import ConfigError

log = logging.getLogger("signedrec.index")


def faiss_clash(providers: Mapping[str, list[str]] | None = None) -> str:
    """Why the installed faiss may be a mix of builds ('' when it is not).

    faiss-cpu and faiss-gpu both install the ``faiss`` module, so with both (faiss-cpu is a
    default dependency, faiss-gpu comes with the ``gpu`` extra) each overwrites the other's
    files, and the module left may have no GPU classes. Only one may stay.
    """
    found = sorted(set((providers or packages_distributions()).get("faiss", [])))
    if len(found) < 2:
        return ""
    return (
        f"the faiss module comes from several distributions ({', '.join(found)}) that overwrite "
        f"each other's files; keep one: pip uninstall -y {' '.join(found)} && "
        "pip install faiss-gpu"
    )


def gpu_count() -> tuple[int, str]:
    """How many GPUs faiss can use, with the reason when none."""
    if not hasattr(faiss, "StandardGpuResources"):
        clash = faiss_clash()
        return 0, clash or "this faiss build has no GPU support (faiss-cpu)"
    try:
        count = int(faiss.get_num_gpus())
    except RuntimeError as exc:  # driver problems surface as RuntimeError
        return 0, f"faiss GPU probe failed: {exc}"
    return (count, "") if count > 0 else (0, "no GPU visible to faiss")


def set_cpu_threads(threads: int) -> None:
    """Cap FAISS's OpenMP pool for CPU searches made from the calling thread (0: its default).

    OpenMP keeps this setting per thread, so it must run on the thread that searches (the
    server's event loop), not the one that builds the index.
    """
    if threads > 0 and faiss.omp_get_max_threads() != threads:
        faiss.omp_set_num_threads(threads)
        log.info("faiss CPU searches use %d OpenMP thread(s)", threads)


# IVF's k-means wants this many training vectors per list; fewer items get an exact index.
IVF_ITEMS_PER_LIST = 8


class ItemIndex:
    """One FAISS index over a fixed item matrix; ids are the dense item indices."""

    def __init__(self, vectors: np.ndarray, config: IndexConfig, name: str = "items") -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.size, self.dim = vectors.shape
        cpu_index = self._build_cpu(vectors, config)
        # The kind really built: IVF too big for the catalogue to train is exact search.
        self.kind = "flat" if isinstance(cpu_index, faiss.IndexFlat) else config.kind
        if self.kind != config.kind:
            log.warning("index.kind=%s needs at least %d items (%d per index.ivf_nlist list), "
                        "%s has %d: an exact flat index instead", config.kind,
                        IVF_ITEMS_PER_LIST * config.ivf_nlist, IVF_ITEMS_PER_LIST, name,
                        self.size)  # fmt: skip
        # IVF probes a few lists and HNSW walks a graph: a deep search can come back short (-1
        # ids). Those rows are searched again exactly on these vectors (kept by reference).
        self._exact = vectors if isinstance(cpu_index, faiss.IndexIVF | faiss.IndexHNSW) else None
        self.device = "cpu"
        self._gpu_resources = None
        self._cpu_index = cpu_index
        self._max_k = self.size  # searches deeper than this go to the CPU copy
        index = cpu_index
        if config.device != "cpu":
            count, reason = gpu_count()
            if count > 0:
                try:
                    resources = faiss.StandardGpuResources()
                    index = faiss.index_cpu_to_gpu(resources, 0, cpu_index)
                except RuntimeError as exc:  # faiss has no GPU version of some kinds (HNSW)
                    reason = f"faiss cannot put a {self.kind} index on the GPU ({exc})"
                else:
                    self._gpu_resources = resources
                    self.device = "gpu"
                    self._max_k = config.gpu_max_k
            if self.device == "cpu":
                if config.device == "gpu":
                    raise ConfigError(f"index.device=gpu but {reason}")
                log.info("faiss index %s on CPU: %s", name, reason)
        log.info(
            "faiss %s index %s: %d x %d on %s", self.kind, name, self.size, self.dim, self.device
        )
        self._index = index

    @staticmethod
    def _build_cpu(vectors: np.ndarray, config: IndexConfig) -> faiss.Index:
        n, d = vectors.shape
        if config.kind == "ivf" and n >= config.ivf_nlist * IVF_ITEMS_PER_LIST:
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, config.ivf_nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
            index.nprobe = config.ivf_nprobe
        elif config.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = config.hnsw_ef_search
        else:
            # Exact search; also the fallback for IVF on catalogues too small to train it.
            index = faiss.IndexFlatIP(d)
        index.add(vectors)
        return index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores float32, ids int64) per query row; -1 ids where fewer exist."""
        k = max(1, min(k, self.size))
        index = self._index if k <= self._max_k else self._cpu_index
        scores, ids = index.search(queries, k)
        if self._exact is not None:
            short = np.flatnonzero(ids[:, -1] < 0)  # k <= size: an exact search fills every row
            if short.size:
                scores[short], ids[short] = exact_top_k(self._exact, queries[short], k)
        return scores, ids


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products of each query over every vector, best first (like FAISS's)."""
    # One matrix-vector product per row: a batched matrix product rounds a row's scores
    # differently from the same row alone, and a user's answer must not depend on its batch.
    scores = np.empty((len(queries), len(vectors)), dtype=np.float32)
    for row, query in enumerate(queries):
        scores[row] = vectors @ query
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    return (np.take_along_axis(top_scores, order, axis=1).astype(np.float32),
            np.take_along_axis(top, order, axis=1).astype(np.int64))  # fmt: skip
