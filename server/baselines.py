"""Reference baselines: MostPopular, LightGCN (torch-geometric) and closed-form item-item EASE.

Each ``fit_*`` takes a :class:`~server.data.Dataset`, learns from ``train`` only, picks its
hyper-parameters on ``valid`` NDCG@20 from a fixed grid (the same grid for every dataset) and
returns a model whose ``scores(users)`` gives a dense ``len(users) x n_items`` float32 array, to be
evaluated through :mod:`server.evaluate` like every other model.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np
import scipy.sparse as sp
import torch

from server.data import Dataset
from server.errors import DataError
from server.evaluate import Truth, evaluate_scores, ground_truth, interaction_matrix
from server.graph import SignedGraph, build_graph

SELECTION_METRIC = "ndcg@20"
EASE_LAMBDAS: tuple[float, ...] = (10.0, 25.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1600.0)
EASE_NEG_WEIGHTS: tuple[float, ...] = (0.25, 0.5)
# One learning rate by default: under a wall-time cap a second one would only halve the epochs.
LIGHTGCN_LRS: tuple[float, ...] = (5e-3,)


def _threads() -> int:
    from server.train import set_threads

    return set_threads()


def _train_graph(dataset: Dataset) -> SignedGraph:
    return build_graph(dataset.train, dataset.threshold, dataset.n_users, dataset.n_items)


def _masked(dataset: Dataset) -> sp.csr_matrix:
    return interaction_matrix(
        dataset.train.users, dataset.train.items, dataset.n_users, dataset.n_items
    )


def _valid_truth(dataset: Dataset) -> Truth:
    return ground_truth(dataset.valid, dataset.threshold, dataset.n_users, dataset.n_items)


# -- MostPopular ---------------------------------------------------------------------------------
@dataclass
class MostPopular:
    """Every user gets the items ranked by their number of positive train interactions."""

    counts: np.ndarray  # float32[n_items]
    params: dict[str, Any] = field(default_factory=dict)

    def scores(self, users: np.ndarray) -> np.ndarray:
        """The popularity row repeated for each user."""
        return np.broadcast_to(self.counts, (len(users), len(self.counts))).astype(np.float32)


def fit_most_popular(dataset: Dataset, out: TextIO | None = None) -> MostPopular:
    """Count positive train interactions per item (latest sign per user-item pair)."""
    out = sys.stderr if out is None else out  # the stream at call time, not import
    pos, _ = _train_graph(dataset).item_degrees()
    model = MostPopular(pos.astype(np.float32))
    valid = evaluate_scores(model.scores, _valid_truth(dataset), _masked(dataset))
    model.params = {"valid_" + SELECTION_METRIC: valid[SELECTION_METRIC]}
    print(f"mostpop: valid {SELECTION_METRIC}={valid[SELECTION_METRIC]:.4f}", file=out, flush=True)
    return model


# -- EASE on positives plus weakly-weighted negatives --------------------------------------------
@dataclass
class Ease:
    """Closed-form item-item model: scores = (X+ + w X-)[u] @ B with a zero-diagonal B."""

    x: sp.csr_matrix  # signed input, users x items, float32
    b: np.ndarray  # float32[n_items, n_items]
    params: dict[str, Any] = field(default_factory=dict)

    def scores(self, users: np.ndarray) -> np.ndarray:
        """Dense scores for a batch of users."""
        return np.asarray(self.x[users] @ self.b, dtype=np.float32)


def ease_weights(gram: np.ndarray, l2: float) -> np.ndarray:
    """EASE: B = I - P / diag(P) with P = (G + l2 I)^-1, i.e. ridge regression with diag(B) = 0."""
    system = np.array(gram, dtype=np.float64, copy=True)
    system[np.diag_indices_from(system)] += l2
    p = np.linalg.inv(system)
    b = p / (-np.diag(p))[None, :]
    b[np.diag_indices_from(b)] = 0.0
    return b.astype(np.float32)


def fit_ease(
    dataset: Dataset,
    lambdas: Sequence[float] = EASE_LAMBDAS,
    neg_weights: Sequence[float] = EASE_NEG_WEIGHTS,
    out: TextIO | None = None,
) -> Ease:
    """Grid-search (neg weight, L2) on valid NDCG@20; return the best fit on train."""
    out = sys.stderr if out is None else out  # the stream at call time, not import
    _threads()
    graph = _train_graph(dataset)
    truth, masked = _valid_truth(dataset), _masked(dataset)
    best: Ease | None = None
    best_value = -np.inf
    for w in neg_weights:
        x = graph.signed_input(w).astype(np.float32)
        gram = (x.T @ x).toarray().astype(np.float64)
        for l2 in lambdas:
            t0 = time.perf_counter()
            model = Ease(x, ease_weights(gram, l2), {"neg_weight": w, "l2": l2})
            value = evaluate_scores(model.scores, truth, masked)[SELECTION_METRIC]
            better = value > best_value
            print(
                f"ease: w={w} lambda={l2:g} valid {SELECTION_METRIC}={value:.4f} "
                f"({time.perf_counter() - t0:.1f}s){' *' if better else ''}",
                file=out,
                flush=True,
            )
            if better:
                best, best_value = model, value
    if best is None:
        raise ValueError("EASE needs a non-empty grid of lambdas and negative weights")
    best.params["valid_" + SELECTION_METRIC] = best_value
    return best


# -- LightGCN (torch_geometric.nn.models.LightGCN) on positives ----------------------------------
@dataclass
class LightGCNModel:
    """Final LightGCN embeddings (users first, then items) of the best valid checkpoint."""

    user_emb: np.ndarray  # float32[n_users, dim]
    item_emb: np.ndarray  # float32[n_items, dim]
    params: dict[str, Any] = field(default_factory=dict)

    def scores(self, users: np.ndarray) -> np.ndarray:
        """Inner products of the users' and all items' propagated embeddings."""
        return np.asarray(self.user_emb[users] @ self.item_emb.T, dtype=np.float32)


def normalised_adjacency(graph: SignedGraph) -> torch.Tensor:
    """Symmetric-normalised bipartite adjacency of the positive edges as torch sparse CSR."""
    n_users, n_items = graph.n_users, graph.n_items
    users = np.repeat(np.arange(n_users, dtype=np.int64), graph.pos_degree)
    items = graph.pos_items.astype(np.int64) + n_users
    rows = np.concatenate([users, items])
    cols = np.concatenate([items, users])
    deg = np.bincount(rows, minlength=n_users + n_items).astype(np.float32)
    inv_sqrt = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1.0)), 0.0).astype(np.float32)
    values = inv_sqrt[rows] * inv_sqrt[cols]
    n = n_users + n_items
    adj = sp.csr_matrix((values, (rows, cols)), shape=(n, n), dtype=np.float32)
    adj.sort_indices()
    return torch.sparse_csr_tensor(
        torch.from_numpy(adj.indptr.astype(np.int64)),
        torch.from_numpy(adj.indices.astype(np.int64)),
        torch.from_numpy(adj.data),
        (n, n),
        check_invariants=False,
    )


def sample_negatives(
    users: np.ndarray, pos_keys: np.ndarray, n_items: int, rng: np.random.Generator
) -> np.ndarray:
    """Uniform items per user, resampled (a few rounds) where they hit a train positive."""
    neg = rng.integers(0, n_items, size=len(users))
    for _ in range(10):
        keys = users.astype(np.int64) * n_items + neg
        pos = np.searchsorted(pos_keys, keys)
        hit = (pos < len(pos_keys)) & (pos_keys[np.minimum(pos, len(pos_keys) - 1)] == keys)
        if not hit.any():
            break
        neg[hit] = rng.integers(0, n_items, size=int(hit.sum()))
    return neg


def _train_lightgcn(
    graph: SignedGraph,
    truth: Truth,
    masked: sp.csr_matrix,
    lr: float,
    *,
    dim: int,
    layers: int,
    reg: float,
    batch_size: int,
    max_epochs: int,
    max_seconds: float,
    eval_every: int,
    patience: int,
    seed: int,
    out: TextIO,
) -> tuple[LightGCNModel, float, dict[str, Any]]:
    from torch_geometric.nn.models import LightGCN

    n_users, n_items = graph.n_users, graph.n_items
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    adj = normalised_adjacency(graph)
    model = LightGCN(n_users + n_items, dim, layers, normalize=False)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    edge_users = np.repeat(np.arange(n_users, dtype=np.int64), graph.pos_degree)
    edge_items = graph.pos_items.astype(np.int64)
    pos_keys = np.sort(edge_users * n_items + edge_items)

    def snapshot() -> LightGCNModel:
        with torch.no_grad():
            emb = model.get_embedding(adj).numpy()
        return LightGCNModel(emb[:n_users].copy(), emb[n_users:].copy())

    started = time.perf_counter()
    best_value, best_epoch, stale = -np.inf, 0, 0
    best_state = copy.deepcopy(model.state_dict())
    stop = "epoch cap"
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        t0 = time.perf_counter()
        order = rng.permutation(len(edge_users))
        u_all, i_all = edge_users[order], edge_items[order]
        j_all = sample_negatives(u_all, pos_keys, n_items, rng)
        total = 0.0
        model.train()
        for start in range(0, len(order), batch_size):
            u = torch.from_numpy(u_all[start : start + batch_size])
            i = torch.from_numpy(i_all[start : start + batch_size] + n_users)
            j = torch.from_numpy(j_all[start : start + batch_size] + n_users)
            emb = model.get_embedding(adj)
            pos_rank = (emb[u] * emb[i]).sum(-1)
            neg_rank = (emb[u] * emb[j]).sum(-1)
            loss = model.recommendation_loss(
                pos_rank, neg_rank, node_id=torch.cat([u, i, j]), lambda_reg=reg
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(u)
        line = f"lightgcn lr={lr:g} epoch {epoch}: loss {total / len(order):.4f}"
        line += f" ({time.perf_counter() - t0:.2f}s)"
        if epoch % eval_every == 0:
            model.eval()
            value = evaluate_scores(snapshot().scores, truth, masked)[SELECTION_METRIC]
            line += f" valid {SELECTION_METRIC}={value:.4f}"
            if value > best_value:
                best_value, best_epoch, stale = value, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
                line += " *"
            else:
                stale += 1
        print(line, file=out, flush=True)
        if epoch % eval_every == 0 and stale >= patience:
            stop = "early stop"
            break
        if time.perf_counter() - started > max_seconds:
            stop = "wall-time cap"
            break
    if best_epoch == 0:  # stopped before the first evaluation: evaluate what there is
        model.eval()
        best_value = evaluate_scores(snapshot().scores, truth, masked)[SELECTION_METRIC]
        best_epoch, best_state = epoch, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    info = {
        "lr": lr,
        "best_epoch": best_epoch,
        "epochs_run": epoch,
        "stopped_by": stop,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(
        f"lightgcn lr={lr:g}: {stop} after {epoch} epochs ({info['seconds']}s); best valid "
        f"{SELECTION_METRIC}={best_value:.4f} at epoch {best_epoch}",
        file=out,
        flush=True,
    )
    return snapshot(), float(best_value), info


def fit_lightgcn(
    dataset: Dataset,
    lrs: Sequence[float] = LIGHTGCN_LRS,
    *,
    dim: int = 64,
    layers: int = 3,
    reg: float = 1e-4,
    batch_size: int = 2048,
    max_epochs: int = 1000,
    max_seconds: float = 150.0,
    eval_every: int = 5,
    patience: int = 5,
    seed: int = 0,
    out: TextIO | None = None,
) -> LightGCNModel:
    """BPR-trained LightGCN; each lr runs with early stopping on valid NDCG@20 within the caps.

    ``max_seconds`` bounds the whole fit: each learning rate gets an equal share of what is left.
    """
    out = sys.stderr if out is None else out  # the stream at call time, not import
    threads = _threads()
    graph = _train_graph(dataset)
    if len(graph.pos_items) == 0:  # BPR needs a liked item per step; the loss divided by zero
        raise DataError(f"{dataset.name}/train.txt", None,
                        "no positive interaction: LightGCN learns from likes only")  # fmt: skip
    truth, masked = _valid_truth(dataset), _masked(dataset)
    print(
        f"lightgcn: {graph.n_users} users, {graph.n_items} items, {len(graph.pos_items)} positive "
        f"train edges; dim {dim}, {layers} layers, batch {batch_size}, {threads} threads, "
        f"cap {max_epochs} epochs / {max_seconds:.0f}s",
        file=out,
        flush=True,
    )
    started = time.perf_counter()
    best: LightGCNModel | None = None
    best_value = -np.inf
    runs: list[dict[str, Any]] = []
    for index, lr in enumerate(lrs):
        left = max_seconds - (time.perf_counter() - started)
        budget = max(left, 0.0) / (len(lrs) - index)
        model, value, info = _train_lightgcn(
            graph,
            truth,
            masked,
            lr,
            dim=dim,
            layers=layers,
            reg=reg,
            batch_size=batch_size,
            max_epochs=max_epochs,
            max_seconds=budget,
            eval_every=eval_every,
            patience=patience,
            seed=seed,
            out=out,
        )
        runs.append({**info, "valid_" + SELECTION_METRIC: value})
        if value > best_value:
            best, best_value = model, value
            best.params = dict(info)
    if best is None:
        raise ValueError("LightGCN needs at least one learning rate")
    best.params["valid_" + SELECTION_METRIC] = best_value
    best.params["runs"] = runs
    return best
