"""Training: one automatic hyper-parameter search on the valid split, then export an artifact.

The search is coordinate ascent over fixed grids (the same for every dataset), one axis at a time,
stopping an axis after ``patience`` trials without improvement of the valid selection metric.
Each trial prints a progress line. The chosen operator is factorised to ``dim`` and evaluated on
valid (and test when present) before export, so the manifest's metrics are the served model's.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from server.artifacts import save_artifact
from server.config import ModelConfig
from server.data import Dataset, IdMap, load_dataset
from server.evaluate import evaluate_scores, ground_truth, interaction_matrix
from server.graph import SignedGraph, build_graph
from server.model import Hyper, SignedGraphModel, factorise

log = logging.getLogger("signedrec.train")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def set_threads() -> int:
    """Use every core this process may run on for torch's intra-op pool."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, cores or 1))
    return torch.get_num_threads()


def _axes(config: ModelConfig) -> list[tuple[str, tuple[Any, ...]]]:
    return [
        ("l2", config.l2_grid),
        ("dropout", config.dropout_grid),
        ("neg_weight", config.neg_input_grid),
        ("gf_mix", config.gf_mix_grid),
        ("gf_rank", config.gf_rank_grid),
        ("gf_ideal", config.gf_ideal_grid),
    ]


def search(
    model: SignedGraphModel,
    score: Callable[[Hyper], dict[str, float]],
    config: ModelConfig,
    out: TextIO,
) -> tuple[Hyper, dict[str, float], list[dict[str, Any]]]:
    """Coordinate ascent over the config grids; returns the best point, its metrics, the trials."""
    metric = config.selection_metric
    best = Hyper(**config.start)
    # The graph-filter axes are meaningless until the autoencoder part is tuned: search it alone.
    best = replace(best, gf_mix=0.0)
    best_metrics = score(best)
    trials = [{"trial": 0, **best.as_dict(), **best_metrics}]
    print(f"trial 0 start {best.as_dict()} {metric}={best_metrics[metric]:.4f}", file=out)
    n = 0
    for axis, grid in _axes(config):
        if axis.startswith("gf_") and axis != "gf_mix" and best.gf_mix == 0:
            continue
        stale = 0
        for value in grid:
            if getattr(best, axis) == value:
                continue
            n += 1
            t0 = time.perf_counter()
            candidate = replace(best, **{axis: value})
            metrics = score(candidate)
            trials.append({"trial": n, **candidate.as_dict(), **metrics})
            better = metrics[metric] > best_metrics[metric]
            print(
                f"trial {n} {axis}={value} {metric}={metrics[metric]:.4f} "
                f"best={max(best_metrics[metric], metrics[metric]):.4f} "
                f"({time.perf_counter() - t0:.1f}s){' *' if better else ''}",
                file=out,
                flush=True,
            )
            if better:
                best, best_metrics, stale = candidate, metrics, 0
            else:
                stale += 1
                if stale >= config.patience:
                    break
    return best, best_metrics, trials


def _popularity(graph: SignedGraph) -> np.ndarray:
    pos, neg = graph.item_degrees()
    # Positive count with a small penalty for being disliked: the fallback for unknown users.
    return (pos - 0.5 * neg).astype(np.float32)


def train(
    data_dir: Path,
    threshold: float,
    out_dir: Path,
    config: ModelConfig,
    out: TextIO = sys.stderr,
) -> Path:
    """Train on ``train.txt``, select on ``valid.txt``, export one artifact version; return it."""
    started = time.perf_counter()
    threads = set_threads()
    torch.manual_seed(config.seed)
    dataset = load_dataset(Path(data_dir), threshold)
    print(
        f"data {dataset.name}: {dataset.n_users} users, {dataset.n_items} items, "
        f"{len(dataset.train)} train, {len(dataset.valid)} valid rows; {threads} threads",
        file=out,
        flush=True,
    )
    graph = build_graph(dataset.train, threshold, dataset.n_users, dataset.n_items)
    model = SignedGraphModel(graph)
    masked = interaction_matrix(
        dataset.train.users, dataset.train.items, dataset.n_users, dataset.n_items
    )
    valid_truth = ground_truth(dataset.valid, threshold, dataset.n_users, dataset.n_items)

    def score(h: Hyper) -> dict[str, float]:
        operator = model.operator(h)
        z = model.z
        return evaluate_scores(lambda u: z[u] @ operator, valid_truth, masked)

    best, _, trials = search(model, score, config, out)
    operator = model.operator(best)
    item_table, item_vectors = factorise(operator, config.dim)
    del operator
    z = model.z

    def served(u: np.ndarray) -> np.ndarray:
        return (z[u] @ item_table) @ item_vectors.T

    metrics = {"valid": evaluate_scores(served, valid_truth, masked)}
    if dataset.test is not None:
        test_truth = ground_truth(dataset.test, threshold, dataset.n_users, dataset.n_items)
        metrics["test"] = evaluate_scores(served, test_truth, masked)
    seconds = time.perf_counter() - started
    print(
        f"selected {best.as_dict()}; served rank {item_table.shape[1]}: valid ndcg@20="
        f"{metrics['valid']['ndcg@20']:.4f}"
        + (f", test ndcg@20={metrics['test']['ndcg@20']:.4f}" if "test" in metrics else ""),
        file=out,
        flush=True,
    )
    return export(dataset, graph, best, item_table, item_vectors, metrics, trials, seconds, out_dir)


def export(
    dataset: Dataset,
    graph: SignedGraph,
    hyper: Hyper,
    item_table: np.ndarray,
    item_vectors: np.ndarray,
    metrics: dict[str, dict[str, float]],
    trials: list[dict[str, Any]],
    seconds: float,
    out_dir: Path,
) -> Path:
    """Write the artifact: factors, id maps, the trained signed graph and the manifest."""
    arrays = {
        "item_table": item_table,
        "item_vectors": item_vectors,
        "item_popularity": _popularity(graph),
        "item_ids": IdMap.dense(dataset.n_items).to_array(),
        "user_ids": IdMap.dense(dataset.n_users).to_array(),
        "pos_indptr": graph.pos_indptr,
        "pos_items": graph.pos_items,
        "neg_indptr": graph.neg_indptr,
        "neg_items": graph.neg_items,
    }
    manifest = {
        "name": Path(out_dir).name,
        "dataset": {
            "name": dataset.name,
            "fingerprint": dataset.fingerprint,
            "threshold": dataset.threshold,
            "n_users": dataset.n_users,
            "n_items": dataset.n_items,
            "train_rows": len(dataset.train),
        },
        "model": {
            "kind": "signed-linear-graph",
            "dim": int(item_table.shape[1]),
            "neg_weight": hyper.neg_weight,
            "hyper": hyper.as_dict(),
        },
        "metrics": metrics,
        "search": trials,
        "train_seconds": round(seconds, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "watermark": 0,
    }
    return save_artifact(Path(out_dir), arrays, manifest)
