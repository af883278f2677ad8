"""The FAISS item index: exact flat search agrees with brute force, and its CPU thread setting."""

from __future__ import annotations

import logging
import threading

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.config import IndexConfig, load_config
from server.errors import ConfigError
from server.index import ItemIndex, faiss_clash, set_cpu_threads

CPU_FLAT = IndexConfig(kind="flat", device="cpu")


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300),
    dim=st.integers(1, 48),
    queries=st.integers(1, 40),
    k=st.integers(1, 400),
    seed=st.integers(0, 2**31 - 1),
)
def test_flat_search_is_exact(n: int, dim: int, queries: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    q = rng.standard_normal((queries, dim)).astype(np.float32)
    scores, ids = ItemIndex(vectors, CPU_FLAT).search(q, k)
    expected = q @ vectors.T
    kept = min(k, n)
    assert scores.shape == ids.shape == (queries, kept)
    # Same scores as brute force, best first; ids point at rows with those scores.
    want = -np.sort(-expected, axis=1)[:, :kept]
    np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.take_along_axis(expected, ids, 1), scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "config",
    [
        IndexConfig(kind="ivf", device="cpu", ivf_nlist=8, ivf_nprobe=1),
        IndexConfig(kind="hnsw", device="cpu", hnsw_m=4, hnsw_ef_search=8),
    ],
    ids=["ivf", "hnsw"],
)
def test_an_approximate_index_never_answers_short(config: IndexConfig) -> None:
    """IVF probing one list of eight, or a narrow HNSW, cannot reach a deep k: those rows come
    back from an exact search, full and best first, never with -1 ids (ranking would drop
    them and answer fewer items than the catalogue has)."""
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((400, 16)).astype(np.float32)
    q = rng.standard_normal((12, 16)).astype(np.float32)
    index = ItemIndex(vectors, config)
    for k in (10, 300, 400):
        scores, ids = index.search(q, k)
        assert (ids >= 0).all()
        assert all(len(set(row)) == k for row in ids.tolist())
        assert (np.diff(scores, axis=1) <= 1e-6).all()
        np.testing.assert_allclose(np.take_along_axis(q @ vectors.T, ids, 1), scores, rtol=1e-4,
                                   atol=1e-4)  # fmt: skip
    full_scores, _ = index.search(q, 400)  # every item: the exact answer
    np.testing.assert_allclose(full_scores, -np.sort(-(q @ vectors.T), axis=1), rtol=1e-4,
                               atol=1e-4)  # fmt: skip


def _in_new_thread() -> int:
    seen: list[int] = []
    other = threading.Thread(target=lambda: seen.append(faiss.omp_get_max_threads()))
    other.start()
    other.join()
    return seen[0]


def test_cpu_threads_caps_faiss_openmp_on_the_calling_thread() -> None:
    before, default = faiss.omp_get_max_threads(), _in_new_thread()
    try:
        set_cpu_threads(1)
        assert faiss.omp_get_max_threads() == 1
        # OpenMP keeps the setting per thread: another thread still sees the default, which is
        # why the server applies it on its event-loop thread rather than the loading thread.
        assert _in_new_thread() == default
    finally:
        faiss.omp_set_num_threads(before)


def test_cpu_threads_zero_keeps_faiss_default() -> None:
    before = faiss.omp_get_max_threads()
    set_cpu_threads(0)
    assert faiss.omp_get_max_threads() == before


def test_cpu_threads_from_env_and_rejected_when_negative() -> None:
    config = load_config(env={"SIGNEDREC_INDEX__CPU_THREADS": "3"})
    assert config.index.cpu_threads == 3
    with pytest.raises(ConfigError, match="cpu_threads"):
        load_config(env={"SIGNEDREC_INDEX__CPU_THREADS": "-1"})


def test_faiss_from_two_distributions_is_named_with_the_fix() -> None:
    assert faiss_clash({"faiss": ["faiss-cpu"]}) == ""
    assert faiss_clash({"numpy": ["numpy"]}) == ""
    message = faiss_clash({"faiss": ["faiss-gpu", "faiss-cpu"], "numpy": ["numpy"]})
    assert "faiss-cpu, faiss-gpu" in message
    assert "pip uninstall -y faiss-cpu faiss-gpu && pip install faiss-gpu" in message
    assert faiss_clash() == ""  # this environment has one faiss (the CI and dev installs)


class _Shallow:
    """Stands in for a faiss-gpu index: refuses k above its selection limit, as the GPU does."""

    def __init__(self, inner: object, max_k: int) -> None:
        self.inner, self.max_k, self.calls = inner, max_k, 0

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k > self.max_k:
            raise RuntimeError(f"k {k} above the GPU selection limit {self.max_k}")
        self.calls += 1
        return self.inner.search(queries, k)  # type: ignore[attr-defined]


def test_searches_deeper_than_the_gpu_limit_use_the_cpu_copy() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((64, 8)).astype(np.float32)
    queries = rng.standard_normal((3, 8)).astype(np.float32)
    index = ItemIndex(vectors, IndexConfig(kind="flat", device="cpu"))
    exact = index.search(queries, 40)
    limit = 16
    shallow = _Shallow(index._index, limit)
    index._index, index._max_k = shallow, limit  # what a GPU index with a limit of 16 holds
    for k in (limit, 40):
        scores, ids = index.search(queries, k)
        np.testing.assert_array_equal(ids, exact[1][:, :k])
        np.testing.assert_allclose(scores, exact[0][:, :k], rtol=1e-6)
    assert shallow.calls == 1  # k = 16 on the "GPU", k = 40 on the CPU copy


@pytest.fixture
def gpu_without_hnsw(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host whose faiss sees a GPU but, like faiss >= 1.8, throws when asked to move an index
    kind it has no GPU version of (HNSW). The real GPU path is checked on a GPU machine."""

    def to_gpu(resources: object, device: int, index: faiss.Index) -> faiss.Index:
        if isinstance(index, faiss.IndexHNSW):
            raise RuntimeError("index type not supported on GPU")
        return index

    monkeypatch.setattr("server.index.gpu_count", lambda: (1, "1 GPU"))
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)  # absent in faiss-cpu


@pytest.mark.usefixtures("gpu_without_hnsw")
def test_an_index_kind_faiss_cannot_put_on_the_gpu_stays_on_the_cpu_under_auto() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((64, 8)).astype(np.float32)
    queries = rng.standard_normal((3, 8)).astype(np.float32)
    index = ItemIndex(vectors, IndexConfig(kind="hnsw", device="auto"))
    assert index.device == "cpu"
    exact = ItemIndex(vectors, IndexConfig(kind="flat", device="cpu")).search(queries, 64)
    np.testing.assert_array_equal(np.sort(index.search(queries, 64)[1]), np.sort(exact[1]))
    assert ItemIndex(vectors, IndexConfig(kind="flat", device="auto")).device == "gpu"
    with pytest.raises(ConfigError, match=r"index\.device=gpu but faiss cannot put a hnsw index"):
        ItemIndex(vectors, IndexConfig(kind="hnsw", device="gpu"))


def test_an_ivf_too_big_for_the_catalogue_says_it_is_exact(caplog: pytest.LogCaptureFixture
                                                           ) -> None:  # fmt: skip
    """It logged "ivf" while searching a flat index, so ivf_nlist and ivf_nprobe seemed to act."""
    vectors = np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32)
    caplog.set_level(logging.INFO, logger="signedrec.index")
    small = ItemIndex(vectors, IndexConfig(kind="ivf", device="cpu", ivf_nlist=64))
    assert small.kind == "flat"
    assert "index.kind=ivf needs at least 512 items" in caplog.text
    assert "faiss flat index" in caplog.text
    assert ItemIndex(vectors, IndexConfig(kind="ivf", device="cpu", ivf_nlist=4)).kind == "ivf"
