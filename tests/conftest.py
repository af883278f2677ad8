"""Shared fixtures: a tiny seeded two-cluster signed dataset, one tiny trained artifact per session,
and the location of the public shared datasets (tests using it skip when it is absent)."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from server.config import ModelConfig

REPO = Path(__file__).resolve().parent.parent
SHARED_DATASETS = REPO.parent / "shared" / "datasets"

# The synthetic dataset: users 0..N_USERS/2-1 and items 0..N_ITEMS/2-1 form cluster 0, the rest
# cluster 1. A user rates items of their own cluster 4 or 5 (positive at THRESHOLD) and a few
# items of the other cluster 1 or 2 (negative).
THRESHOLD = 4.0
N_USERS = 48
N_ITEMS = 32
OWN_PER_SPLIT = {"train": 8, "valid": 2, "test": 2}
OTHER_PER_SPLIT = {"train": 2, "valid": 1, "test": 1}

# Small grids so one training run takes a second or two; the search still walks every axis.
TINY_MODEL = ModelConfig(
    dim=8,
    seed=0,
    l2_grid=(1.0, 16.0),
    dropout_grid=(0.5,),
    neg_input_grid=(0.25,),
    gf_mix_grid=(0.5,),
    gf_rank_grid=(8,),
    gf_ideal_grid=(0.5,),
    patience=1,
)

# The same model config as TOML, for `signedrec train --config`.
TINY_MODEL_TOML = """\
[model]
dim = 8
seed = 0
l2_grid = [1.0, 16.0]
dropout_grid = [0.5]
neg_input_grid = [0.25]
gf_mix_grid = [0.5]
gf_rank_grid = [8]
gf_ideal_grid = [0.5]
patience = 1
"""


# Third-party warnings that training triggers and that the project's `filterwarnings = error` turns
# into failures; none is ours to fix here. They are ignored only around the in-process training
# below (a pyproject filter would be the wider fix):
# - torch_geometric's import calls `torch.jit.script`, which torch 2.13 deprecates; the warning
#   is attributed to torch.jit._script, so pyproject's "DeprecationWarning:torch_geometric.*"
#   misses it.
# - server/model.py builds torch.sparse_coo_tensor without `check_invariants`, and torch 2.13 warns
#   "Sparse invariant checks are implicitly disabled".
KNOWN_TRAINING_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"`torch\.jit\.script` is deprecated", DeprecationWarning),
    (r"Sparse invariant checks are implicitly disabled", UserWarning),
)


@contextmanager
def known_training_warnings_ignored() -> Iterator[None]:
    """Ignore exactly KNOWN_TRAINING_WARNINGS (by message and category) inside the block."""
    with warnings.catch_warnings():
        for message, category in KNOWN_TRAINING_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


def user_cluster(user: int) -> int:
    """The cluster (0 or 1) of a synthetic user."""
    return int(user >= N_USERS // 2)


def item_cluster(item: int) -> int:
    """The cluster (0 or 1) of a synthetic item."""
    return int(item >= N_ITEMS // 2)


def synthetic_rows(seed: int = 0) -> dict[str, list[tuple[int, int, float]]]:
    """Rows ``(user, item, rating)`` per split; every (user, item) pair occurs at most once."""
    rng = np.random.default_rng(seed)
    half = N_ITEMS // 2
    rows: dict[str, list[tuple[int, int, float]]] = {split: [] for split in OWN_PER_SPLIT}
    for user in range(N_USERS):
        own_base = half * user_cluster(user)
        other_base = half * (1 - user_cluster(user))
        own = (own_base + rng.permutation(half)).tolist()
        other = (other_base + rng.permutation(half)).tolist()
        for split in OWN_PER_SPLIT:
            for _ in range(OWN_PER_SPLIT[split]):
                rows[split].append((user, own.pop(), float(rng.choice([4.0, 5.0]))))
            for _ in range(OTHER_PER_SPLIT[split]):
                rows[split].append((user, other.pop(), float(rng.choice([1.0, 2.0]))))
    for split in rows:
        order = rng.permutation(len(rows[split]))
        rows[split] = [rows[split][i] for i in order]
    # The dense id space must reach the last user and item in some split.
    seen_items = {item for split in rows.values() for _, item, _ in split}
    assert seen_items == set(range(N_ITEMS)), "synthetic data misses items; change the seed"
    return rows


def format_rows(rows: list[tuple[int, int, float]]) -> str:
    """The shared file format: ``user item rating`` per line."""
    out = io.StringIO()
    for user, item, rating in rows:
        out.write(f"{user} {item} {rating:.2f}\n")
    return out.getvalue()


def write_dataset(directory: Path, rows: dict[str, list[tuple[int, int, float]]]) -> Path:
    """Write train/valid/test files into ``directory`` and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, split_rows in rows.items():
        (directory / f"{split}.txt").write_text(format_rows(split_rows))
    return directory


@dataclass(frozen=True)
class TinyDataset:
    """The synthetic dataset on disk, the rows it was written from, and its known structure."""

    path: Path
    rows: dict[str, list[tuple[int, int, float]]]
    threshold: float = THRESHOLD
    n_users: int = N_USERS
    n_items: int = N_ITEMS
    # A training config with tiny grids, as a ModelConfig and as TOML for `--config`.
    model: ModelConfig = TINY_MODEL
    model_toml: str = TINY_MODEL_TOML

    @staticmethod
    def user_cluster(user: int) -> int:
        """The cluster (0 or 1) of a synthetic user."""
        return user_cluster(user)

    @staticmethod
    def item_cluster(item: int) -> int:
        """The cluster (0 or 1) of a synthetic item."""
        return item_cluster(item)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> TinyDataset:
    """The two-cluster dataset written once per session (read-only by convention)."""
    rows = synthetic_rows()
    path = write_dataset(tmp_path_factory.mktemp("tiny-data"), rows)
    return TinyDataset(path=path, rows=rows)


@pytest.fixture
def dataset_factory(tmp_path: Path) -> Callable[..., Path]:
    """Write a fresh copy of the tiny dataset to a tmp dir, optionally replacing split texts."""

    def make(name: str = "data", **texts: str) -> Path:
        directory = write_dataset(tmp_path / name, synthetic_rows())
        for split, text in texts.items():
            (directory / f"{split}.txt").write_text(text)
        return directory

    return make


@pytest.fixture(scope="session")
def tiny_artifact(tiny_dataset: TinyDataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One artifact version trained on the tiny dataset with TINY_MODEL, once per session."""
    root = tmp_path_factory.mktemp("tiny-artifacts")
    with known_training_warnings_ignored():
        from server.train import train

        return train(tiny_dataset.path, THRESHOLD, root, TINY_MODEL, out=io.StringIO())


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """``../shared/datasets`` next to the repository; tests using it skip when it is absent."""
    if not (SHARED_DATASETS / "README.md").is_file():
        pytest.skip(f"shared datasets not found at {SHARED_DATASETS}")
    return SHARED_DATASETS
