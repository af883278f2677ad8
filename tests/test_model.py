"""The model contract on a tiny trained artifact, the synthetic clusters, the train/evaluate CLI.

Contract (DESIGN §3): a user's vector is a function of the item side and the user's signed
neighbourhood, ``u = z_u @ item_table`` where ``z_u`` holds 1 per liked item and the manifest's
``neg_weight`` per disliked one. So folding the user's events in one at a time from zero, in any
order, gives the batch vector, and scores are ``u @ item_vectors.T``.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from server.artifacts import Artifact, list_versions, load_artifact
from server.config import Hyper, ModelConfig, load_config
from server.data import load_dataset
from server.evaluate import KS
from server.events import NewEvent
from server.graph import SignedGraph, build_graph
from server.state import LiveState
from server.train import search

if TYPE_CHECKING:
    from conftest import TinyDataset

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def artifact(tiny_artifact: Path) -> Artifact:
    return load_artifact(tiny_artifact)


@pytest.fixture(scope="module")
def graph(tiny_dataset: TinyDataset) -> SignedGraph:
    threshold = tiny_dataset.threshold
    dataset = load_dataset(tiny_dataset.path, threshold)
    return build_graph(dataset.train, threshold, dataset.n_users, dataset.n_items)


def _batch_vectors(artifact: Artifact, graph: SignedGraph, users: np.ndarray) -> np.ndarray:
    z = graph.signed_input(artifact.neg_weight)
    return np.asarray(z[users] @ artifact.arrays["item_table"])


def test_artifact_shapes_and_manifest(
    artifact: Artifact, graph: SignedGraph, tiny_dataset: TinyDataset
) -> None:
    dim = tiny_dataset.model.dim
    table, vectors = artifact.arrays["item_table"], artifact.arrays["item_vectors"]
    assert (graph.n_users, graph.n_items) == (tiny_dataset.n_users, tiny_dataset.n_items)
    assert table.shape == vectors.shape == (graph.n_items, dim)
    assert table.dtype == vectors.dtype == np.float32
    assert np.isfinite(table).all()
    assert np.isfinite(vectors).all()
    assert artifact.manifest["model"]["dim"] == dim
    assert artifact.manifest["dataset"]["n_users"] == graph.n_users
    assert artifact.manifest["dataset"]["n_items"] == graph.n_items
    assert artifact.threshold == tiny_dataset.threshold
    # The tiny grids give a positive neg_weight, so negatives really take part in the contract.
    assert artifact.neg_weight > 0
    for split in ("valid", "test"):
        assert set(artifact.manifest["metrics"][split]) >= {f"ndcg@{k}" for k in KS}
    # The stored signed graph is the training graph.
    for name in ("pos_indptr", "pos_items", "neg_indptr", "neg_items"):
        np.testing.assert_array_equal(artifact.arrays[name], getattr(graph, name))


def _online(artifact: Path, state_dir: Path) -> LiveState:
    """The server's live state on the artifact: vectors folded at load, the real event log."""
    state = LiveState(artifact, state_dir, load_config(env={}))
    state.open_log()
    return state


def _post(state: LiveState, user: str, item: int, kind: str) -> None:
    """One feedback event through the log and the online update (the webhook's path)."""
    event = NewEvent(event_id=uuid.uuid4().hex, user_id=user, item_id=str(item), kind=kind,
                     ts=1.0)  # type: ignore[arg-type]  # fmt: skip
    state.apply(state.log.append_sync([event]))  # type: ignore[union-attr]


def _vector(state: LiveState, user: str) -> np.ndarray:
    return state.vectors[state.users.get(user)].copy()


def test_fold_in_events_one_by_one_equals_batch_vector(
    artifact: Artifact,
    graph: SignedGraph,
    tiny_dataset: TinyDataset,
    tiny_artifact: Path,
    tmp_path: Path,
) -> None:
    """A new user posting a trained user's train events one at a time, in random order, gets
    that user's vector from the model (z_u @ item_table), as the server folds it at load."""
    table, vectors = artifact.arrays["item_table"], artifact.arrays["item_vectors"]
    threshold = tiny_dataset.threshold
    rng = np.random.default_rng(7)
    users = rng.choice(graph.n_users, size=12, replace=False)
    batch = _batch_vectors(artifact, graph, users)
    batch_scores = batch @ vectors.T
    events: dict[int, list[tuple[int, float]]] = {}
    for user, item, rating in tiny_dataset.rows["train"]:
        events.setdefault(user, []).append((item, rating))
    state = _online(tiny_artifact, tmp_path / "state")
    for row, user in enumerate(users.tolist()):
        own = events[user]
        assert any(r < threshold for _, r in own), "every synthetic user has a negative"
        copy = f"copy-of-{user}"
        for index in rng.permutation(len(own)):
            item, rating = own[index]
            _post(state, copy, item, "like" if rating >= threshold else "dislike")
        u = _vector(state, copy)
        scale = float(np.abs(table).max()) * len(own)
        np.testing.assert_allclose(u, batch[row], rtol=1e-5, atol=1e-6 * scale)
        np.testing.assert_allclose(_vector(state, str(user)), batch[row], rtol=1e-5,
                                   atol=1e-6 * scale)  # fmt: skip
        scores = u @ vectors.T
        score_scale = float(np.abs(batch_scores[row]).max())
        np.testing.assert_allclose(scores, batch_scores[row], rtol=1e-5, atol=1e-5 * score_scale)


def test_a_change_of_mind_retracts_the_old_term(
    artifact: Artifact, graph: SignedGraph, tiny_artifact: Path, tmp_path: Path
) -> None:
    """Like, dislike, like again of one unseen item: each step is the batch vector of the user's
    graph with that item's latest sign (the old term retracted, the new one added)."""
    table = artifact.arrays["item_table"]
    (base,) = _batch_vectors(artifact, graph, np.array([0]))
    seen = np.concatenate([graph.pos_items[: graph.pos_indptr[1]],
                           graph.neg_items[: graph.neg_indptr[1]]])  # fmt: skip
    item = int(np.setdiff1d(np.arange(graph.n_items), seen)[0])
    state = _online(tiny_artifact, tmp_path / "state")
    tol = 1e-6 * float(np.abs(table).max()) * (len(seen) + 1)
    for kind, weight in (("like", 1.0), ("dislike", artifact.neg_weight), ("like", 1.0)):
        _post(state, "0", item, kind)
        expected = base + np.float32(weight) * table[item]
        np.testing.assert_allclose(_vector(state, "0"), expected, rtol=1e-5, atol=tol)


def test_model_ranks_own_cluster_above_the_other(
    artifact: Artifact, graph: SignedGraph, tiny_dataset: TinyDataset
) -> None:
    users = np.arange(graph.n_users)
    scores = _batch_vectors(artifact, graph, users) @ artifact.arrays["item_vectors"].T
    pos, neg = graph.matrices()
    seen = (pos + neg).toarray() > 0
    item_side = np.array([tiny_dataset.item_cluster(i) for i in range(graph.n_items)])
    aucs = []
    for user in users.tolist():
        own = item_side == tiny_dataset.user_cluster(user)
        unseen = ~seen[user]
        candidates = np.flatnonzero(unseen)
        top5 = candidates[np.argsort(-scores[user, candidates], kind="stable")[:5]]
        assert own[top5].all(), f"user {user}: top-5 unseen items {top5} leave the own cluster"
        mine, theirs = scores[user, own & unseen], scores[user, ~own & unseen]
        aucs.append(float((mine[:, None] > theirs[None, :]).mean()))
    assert min(aucs) > 0.9
    assert float(np.mean(aucs)) > 0.97


def test_cli_train_then_evaluate_json(tiny_dataset: TinyDataset, tmp_path: Path) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(tiny_dataset.model_toml)
    root = tmp_path / "artifacts"
    train = subprocess.run(
        [sys.executable, "-m", "server.cli", "train", "--data", str(tiny_dataset.path),
         "--threshold", str(tiny_dataset.threshold), "--out", str(root), "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr
    (version,) = list_versions(root)
    assert train.stdout.strip().splitlines()[-1] == str(root / version)
    assert "trial 0" in train.stderr
    evaluate = subprocess.run(
        [sys.executable, "-m", "server.cli", "evaluate", "--artifact", str(root),
         "--data", str(tiny_dataset.path), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert evaluate.returncode == 0, evaluate.stderr
    lines = [line for line in evaluate.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, evaluate.stdout
    result = json.loads(lines[0])
    assert isinstance(result, dict)
    metrics = ("recall", "ndcg", "precision", "neghit")
    expected = {"users"} | {f"{m}@{k}" for m in metrics for k in KS}
    assert expected <= set(result)
    # Every synthetic user has test positives; the metrics are the manifest's test metrics.
    assert result["users"] == tiny_dataset.n_users
    manifest = json.loads((root / version / "manifest.json").read_text())
    for key in expected - {"users"}:
        assert 0.0 <= result[key] <= 1.0
        assert result[key] == pytest.approx(manifest["metrics"]["test"][key], abs=1e-6)
    assert result["recall@20"] > 0.5
    # --served ranks as the server does (the suppression and propensity training chose): on
    # valid that is the propensity search's row for the chosen beta, recorded in the manifest.
    served = subprocess.run(
        [sys.executable, "-m", "server.cli", "evaluate", "--artifact", str(root),
         "--data", str(tiny_dataset.path), "--split", "valid", "--served", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert served.returncode == 0, served.stderr
    ranking = manifest["ranking"]
    (chosen,) = [r for r in ranking["propensity_valid"] if r["beta"] == ranking["propensity_beta"]]
    served_result = json.loads(served.stdout)
    for key in expected:
        assert served_result[key] == pytest.approx(chosen[key], abs=1e-6), key


@pytest.mark.parametrize("neg_weight", [0.5, -0.25])
def test_ease_is_ease_to_its_own_input_split_by_sign(graph: SignedGraph, neg_weight: float) -> None:
    from server.model import SignedGraphModel

    model = SignedGraphModel(graph, dtype=torch.float64)
    model.set_neg_weight(neg_weight)
    positive, negative = graph.matrices()
    # The autoencoder's target is its input X+ + w X-, and ease_to is linear in its target.
    split = model.ease_to(2.0, 0.25, positive) + neg_weight * model.ease_to(2.0, 0.25, negative)
    np.testing.assert_allclose(split.numpy(), model.ease(2.0, 0.25).numpy(), atol=1e-9)
    assert np.abs(np.diagonal(model.ease_to(2.0, 0.25, negative).numpy())).max() < 1e-9


def test_the_searchs_start_mix_is_tried_even_with_an_empty_mix_grid() -> None:
    """The search tunes the autoencoder with the graph filter off first; `model.start.gf_mix`
    was then never tried, so an empty gf_mix_grid (to pin it) gave a model without the filter."""
    config = ModelConfig(start=Hyper(gf_mix=2.0), l2_grid=(), dropout_grid=(), neg_input_grid=(),
                         gf_mix_grid=(), gf_rank_grid=(), gf_ideal_grid=())  # fmt: skip

    def score(hyper: Hyper) -> dict[str, float]:
        return {config.selection_metric: hyper.gf_mix}  # the filter helps here

    best, _, trials = search(score, config, io.StringIO())
    assert [t["gf_mix"] for t in trials] == [0.0, 2.0]
    assert best.gf_mix == 2.0
