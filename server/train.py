"""Training: one automatic hyper-parameter search on the valid split, then export an artifact.

The search is coordinate ascent over fixed grids (the same for every dataset), one axis at a time,
stopping an axis after ``patience`` trials without improvement of the valid selection metric.
Each trial prints a progress line. The chosen operator is factorised to ``dim`` and evaluated on
valid (and test when present) before export, so the manifest's metrics are the served model's.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import msgspec
import numpy as np
import scipy.sparse as sp
import torch

from server.artifacts import (
    HISTORY_ARRAYS,
    Artifact,
    empty_history,
    load_artifact,
    npy_sha256,
    save_artifact,
)
from server.config import EventWeights, Hyper, ModelConfig, RankingConfig, ServerConfig
from server.data import Dataset, IdMap, load_dataset
from server.errors import ArtifactError, DataError
from server.evaluate import (
    Truth,
    evaluate_scores,
    evaluate_variants,
    ground_truth,
    held_out,
    interaction_matrix,
)
from server.feedback import read_feedback
from server.graph import SignedGraph, build_graph, with_feedback
from server.model import SignedGraphModel, dense_bytes, factorise
from server.propensity import Propensity

log = logging.getLogger("signedrec.train")


def memory_bytes() -> int | None:
    """Memory this process may use: physical memory, or a lower cgroup limit (containers)."""
    limits: list[int] = []
    with contextlib.suppress(ValueError, OSError):
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    try:
        cgroup = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        cgroup = "max"
    if cgroup.isdigit():
        limits.append(int(cgroup))
    return min(limits) if limits else None


def check_catalogue_fits(dataset: Dataset, data_dir: Path) -> None:
    """Refuse a catalogue whose dense item-item fit cannot fit in memory, before allocating."""
    need, have = dense_bytes(dataset.n_items), memory_bytes()
    if have is not None and need > have:
        gib = 1024.0**3
        raise DataError(
            str(data_dir / "train.txt"), None,
            f"{dataset.n_items} items: the dense item-item model needs about {need / gib:.1f} "
            f"GiB of memory to train, more than the {have / gib:.1f} GiB this machine allows",
        )  # fmt: skip


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_MMAP_THRESHOLD_BYTES = 1 << 20


def pin_malloc_threshold() -> bool:
    """Make glibc mmap every block over 1 MiB, so freed n x n matrices go back to the OS.

    By default glibc raises its mmap threshold after each large free (up to 32 MiB), so the
    search's many n x n temporaries then come from heap arenas that are never returned: on
    amazon-music that alone moved peak RSS from about 560 MB to about 810 MB.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc: nothing to pin
        return False


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
        # The search starts with the graph filter off, so the start's mix is its first value.
        ("gf_mix", tuple(dict.fromkeys((config.start.gf_mix, *config.gf_mix_grid)))),
        ("gf_rank", config.gf_rank_grid),
        ("gf_ideal", config.gf_ideal_grid),
    ]


def search(
    score: Callable[[Hyper], dict[str, float]],
    config: ModelConfig,
    out: TextIO,
) -> tuple[Hyper, dict[str, float], list[dict[str, Any]]]:
    """Coordinate ascent over the config grids; returns the best point, its metrics, the trials."""
    metric = config.selection_metric
    best = config.start
    # The graph-filter axes are meaningless until the autoencoder part is tuned: search it alone.
    best = msgspec.structs.replace(best, gf_mix=0.0)
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
            candidate = msgspec.structs.replace(best, **{axis: value})
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


def _fresh_dislikes(
    dataset: Dataset, graph: SignedGraph, config: ModelConfig
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded sample of (user, item) negatives in valid that the user has no train edge on."""
    valid = dataset.valid
    negative = ~valid.positive(dataset.threshold)
    users, items = valid.users[negative], valid.items[negative]
    if users.size == 0:  # a valid split without dislikes (sparse indexing by [] is no array)
        return users.astype(np.int64), items.astype(np.int64)
    pos, neg = graph.matrices()
    seen = np.asarray((pos + neg)[users, items]).ravel() != 0
    users, items = users[~seen], items[~seen]
    _, first = np.unique(users, return_index=True)  # one fresh dislike per user
    rng = np.random.default_rng(config.seed)
    pick = rng.permutation(first)[: config.suppression_sample]
    return users[pick].astype(np.int64), items[pick].astype(np.int64)


def _popularity(graph: SignedGraph) -> np.ndarray:
    pos, neg = graph.item_degrees()
    # Positive count with a small penalty for being disliked: the fallback for unknown users.
    return (pos - 0.5 * neg).astype(np.float32)


def dislike_penalty(unit: np.ndarray, negatives: sp.csr_matrix) -> np.ndarray:
    """Per user row, each item's largest cosine to the user's disliked items (0 if none)."""
    out = np.zeros((negatives.shape[0], unit.shape[0]), dtype=np.float32)
    counts = np.diff(negatives.indptr)
    rows = np.flatnonzero(counts)
    if len(rows):
        cosine = unit[negatives.indices] @ unit.T
        starts = negatives.indptr[rows]
        out[rows] = np.maximum.reduceat(cosine, starts, axis=0)
    return np.maximum(out, 0.0)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero): cosines by dot products."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def graph_propensity(graph: SignedGraph, prior: float) -> Propensity:
    """The dislike propensity of a trained graph: item rates from its like/dislike degrees."""
    item_pos, item_neg = graph.item_degrees()
    return Propensity.from_counts(item_pos, item_neg, prior)


def user_propensity_logits(graph: SignedGraph, propensity: Propensity) -> np.ndarray:
    """Every trained user's dislike-rate logit from their like/dislike degrees."""
    return propensity.user_logit(*graph.user_degrees())


def popular_when_zero(scores: np.ndarray, popularity: np.ndarray) -> np.ndarray:
    """All-zero rows (a user with no edges, or only dislikes under neg_weight 0) replaced by
    item popularity, as the server ranks them: zeros would order the items by id."""
    zero = ~scores.any(axis=1)
    if zero.any():
        scores = scores.copy()
        scores[zero] = popularity
    return scores


def served_scores(
    item_table: np.ndarray, item_vectors: np.ndarray, graph: SignedGraph, neg_weight: float,
    gamma: float, beta: float, prior: float, popularity: np.ndarray,
    recent: int = RankingConfig().suppression_recent,
) -> Callable[[np.ndarray], np.ndarray]:  # fmt: skip
    """Score rows as the server ranks them: suppression and dislike propensity included.

    Normalised model scores (``popularity`` for a user whose scores are all zero), minus gamma
    x the largest cosine to the user's dislikes, minus beta x P(the user dislikes the item) with
    rates smoothed by ``prior`` pseudo-ratings. The user's dislikes are the last ``recent`` of
    its row, as the server's ``ranking.suppression_recent`` reads them; with ``gamma`` and
    ``beta`` 0 this is the model's ranking. Every user here is a trained user: the server
    ranks a user known only from live feedback, with no like yet, from popularity instead.
    """
    z = graph.signed_input(neg_weight)
    negatives = graph.latest_negatives(recent)
    unit = unit_rows(item_vectors)
    if beta:
        propensity = graph_propensity(graph, prior)
        user_logit = user_propensity_logits(graph, propensity)
        every_item = np.arange(item_vectors.shape[0])

    def score(users: np.ndarray) -> np.ndarray:
        raw = (z[users] @ item_table) @ item_vectors.T
        scores = normalise_rows(popular_when_zero(raw, popularity))
        if gamma:
            scores -= gamma * dislike_penalty(unit, negatives[users])
        if beta:
            items = np.broadcast_to(every_item, scores.shape)
            scores -= beta * propensity.probability(user_logit[users], items)
        return scores

    return score


def artifact_served_scores(
    artifact: Artifact, graph: SignedGraph, recent: int = RankingConfig().suppression_recent
) -> Callable[[np.ndarray], np.ndarray]:
    """:func:`served_scores` with the ranking settings an artifact's training chose."""
    ranking = artifact.manifest["ranking"]
    beta = float(ranking.get("propensity_beta", 0.0))  # older artifacts: none
    prior = float(ranking.get("propensity_prior", ModelConfig().propensity_prior))
    arrays = artifact.arrays
    return served_scores(arrays["item_table"], arrays["item_vectors"], graph, artifact.neg_weight,
                         float(ranking["suppression_gamma"]), beta, prior,
                         arrays["item_popularity"], recent)  # fmt: skip


def normalise_rows(scores: np.ndarray) -> np.ndarray:
    """Each row divided by |its best score|, as serving ranks (all-zero rows stay as they are)."""
    top = np.abs(scores.max(axis=1, keepdims=True))
    return scores / np.where(top > 0, top, 1.0)


def sink_rate(
    gamma: float,
    table: np.ndarray,
    vectors: np.ndarray,
    unit: np.ndarray,
    z: sp.csr_matrix,
    negatives: sp.csr_matrix,
    fresh: tuple[np.ndarray, np.ndarray],
    neg_weight: float,
    lookalikes: int,
) -> float:
    """Share of a fresh dislike's nearest items that drop in rank once it is folded in."""
    users, items = fresh
    before_vec = z[users] @ table
    after_vec = before_vec + neg_weight * table[items]
    penalty = dislike_penalty(unit, negatives[users])
    fresh_cos = np.maximum(unit[items] @ unit.T, 0.0)
    before = normalise_rows(before_vec @ vectors.T) - gamma * penalty
    after = normalise_rows(after_vec @ vectors.T) - gamma * np.maximum(penalty, fresh_cos)
    seen = z[users].toarray() != 0
    seen[np.arange(len(users)), items] = True
    before[seen], after[seen] = -np.inf, -np.inf
    near = np.argsort(-fresh_cos, axis=1)[:, 1 : lookalikes + 1]
    rows = np.arange(len(users))[:, None]
    rank_before = (before[:, None, :] > before[rows, near][:, :, None]).sum(axis=2)
    rank_after = (after[:, None, :] > after[rows, near][:, :, None]).sum(axis=2)
    valid = np.isfinite(before[rows, near])
    return float(((rank_after > rank_before) & valid).sum() / max(valid.sum(), 1))


def select_suppression(
    served: Callable[[np.ndarray], np.ndarray],
    sink: Callable[[float], float],
    unit: np.ndarray,
    negatives: sp.csr_matrix,
    truth: Truth,
    masked: sp.csr_matrix,
    config: ModelConfig,
    out: TextIO,
) -> tuple[float, list[dict[str, float]]]:
    """Dislike suppression strength from one rule, the same for every dataset.

    Serving ranks by ``score / best_score - gamma * max_cos(item, disliked)``. Two measurements on
    the valid split pick gamma: the largest gamma whose NDCG@20 stays within the tolerance of no
    suppression, and the smallest gamma under which look-alikes of a fresh dislike sink (the
    product promise); the larger of the two wins.
    """
    gammas = sorted(set(config.suppression_grid) | {0.0})

    def variants(u: np.ndarray) -> dict[str, np.ndarray]:
        scores = normalise_rows(served(u))
        penalty = dislike_penalty(unit, negatives[u])
        return {str(g): scores - g * penalty for g in gammas}

    metrics = evaluate_variants(variants, truth, masked)
    table: list[dict[str, float]] = []
    for gamma in gammas:
        rate = sink(gamma)
        row = metrics[str(gamma)]
        table.append({"gamma": gamma, "sink_rate": rate, **row})
        print(
            f"suppression gamma={gamma:g} ndcg@20={row['ndcg@20']:.4f} "
            f"neghit@20={row['neghit@20']:.4f} look-alikes sinking={rate:.2f}",
            file=out,
            flush=True,
        )
    floor = (1.0 - config.suppression_tolerance) * table[0]["ndcg@20"]
    by_quality = max(row["gamma"] for row in table if row["ndcg@20"] >= floor)
    sinking = [row["gamma"] for row in table if row["sink_rate"] >= config.suppression_sink_rate]
    by_sinking = min(sinking) if sinking else max(row["gamma"] for row in table)
    return max(by_quality, by_sinking), table


def select_propensity(
    suppressed: Callable[[np.ndarray], np.ndarray],
    graph: SignedGraph,
    truth: Truth,
    masked: sp.csr_matrix,
    config: ModelConfig,
    out: TextIO,
) -> tuple[float, list[dict[str, float]]]:
    """Dislike-propensity weight from one rule, the same for every dataset.

    On top of the served (suppressed) scores, the largest beta of the grid whose valid NDCG@20
    stays within the tolerance of beta 0 wins: fewer likely dislikes at almost no cost.
    """
    betas = sorted(set(config.propensity_grid) | {0.0})
    propensity = graph_propensity(graph, config.propensity_prior)
    user_logit = user_propensity_logits(graph, propensity)

    def variants(u: np.ndarray) -> dict[str, np.ndarray]:
        scores = suppressed(u)
        items = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        chance = propensity.probability(user_logit[u], items)
        return {str(b): scores - b * chance for b in betas}

    metrics = evaluate_variants(variants, truth, masked)
    table = [{"beta": b, **metrics[str(b)]} for b in betas]
    for row in table:
        print(f"propensity beta={row['beta']:g} ndcg@20={row['ndcg@20']:.4f} "
              f"neghit@20={row['neghit@20']:.4f}", file=out, flush=True)  # fmt: skip
    floor = (1.0 - config.propensity_tolerance) * table[0]["ndcg@20"]
    return max(row["beta"] for row in table if row["ndcg@20"] >= floor), table


def fit(
    graph: SignedGraph,
    valid_truth: Truth,
    masked: sp.csr_matrix,
    config: ModelConfig,
    out: TextIO,
    fixed: Hyper | None = None,
) -> tuple[Hyper, list[dict[str, Any]], np.ndarray, np.ndarray, sp.csr_matrix]:
    """Search (or take) hyper-parameters, then factorise: (hyper, trials, Q, V, signed input)."""
    model = SignedGraphModel(graph)

    def score(h: Hyper) -> dict[str, float]:
        operator = model.operator(h)
        z = model.z
        return evaluate_scores(lambda u: z[u] @ operator, valid_truth, masked)

    if fixed is None:
        best, _, trials = search(score, config, out)
    else:
        best, trials = fixed, []
        print(f"fixed hyper-parameters {best.as_dict()} (no search)", file=out, flush=True)
    item_table, item_vectors = factorise(model.operator(best), config.dim)
    return best, trials, item_table, item_vectors, model.z


@dataclass(frozen=True, slots=True)
class RankingChoice:
    """The serving strengths training selects on valid: look-alike suppression and propensity."""

    gamma: float
    beta: float
    prior: float

    @classmethod
    def of(cls, manifest: dict[str, Any], config: ModelConfig) -> RankingChoice:
        """An artifact's choice (older artifacts: no propensity, the configured prior)."""
        ranking = manifest.get("ranking", {})
        return cls(float(ranking.get("suppression_gamma", 0.0)),
                   float(ranking.get("propensity_beta", 0.0)),
                   float(ranking.get("propensity_prior", config.propensity_prior)))  # fmt: skip


def concat_history(first: dict[str, np.ndarray], then: dict[str, np.ndarray]
                   ) -> dict[str, np.ndarray]:  # fmt: skip
    """Logged-event arrays of ``first`` followed by ``then`` (its id offsets moved along)."""
    out = {name: np.concatenate([first[name], then[name]]) for name in HISTORY_ARRAYS
           if name != "log_id_offsets"}  # fmt: skip
    offsets = first["log_id_offsets"]
    out["log_id_offsets"] = np.concatenate([offsets, then["log_id_offsets"][1:] + offsets[-1]])
    return out


def latest_per_user(history: dict[str, np.ndarray], cap: int) -> dict[str, np.ndarray]:
    """Only each user's ``cap`` most recent logged events (a history is never read deeper)."""
    users, n = history["log_users"], len(history["log_users"])
    order = np.lexsort((-history["log_seqs"], users))  # by user, newest first
    grouped = users[order]
    rank = np.arange(n) - np.searchsorted(grouped, grouped, side="left")
    keep = np.sort(order[rank < cap])  # back to seq order
    if len(keep) == n:
        return history
    out = {name: history[name][keep] for name in HISTORY_ARRAYS
           if name not in ("log_id_offsets", "log_id_bytes")}  # fmt: skip
    offsets = history["log_id_offsets"]
    lengths = (offsets[1:] - offsets[:-1])[keep]
    out["log_id_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    starts = offsets[keep] - out["log_id_offsets"][:-1]
    out["log_id_bytes"] = history["log_id_bytes"][
        np.repeat(starts, lengths) + np.arange(int(out["log_id_offsets"][-1]))
    ]
    return out


def _train_graph(
    dataset: Dataset, data_dir: Path, threshold: float, events: Path | None,
    weights: EventWeights | None, since: Path | None, out: TextIO, history_cap: int,
) -> tuple[SignedGraph, IdMap, dict[str, Any] | None, dict[str, np.ndarray]]:  # fmt: skip
    """The train graph and users: the dataset's, or ``since``'s, plus a log's feedback; with the
    manifest's record of that log (None without ``events``) and the logged events the graph
    holds (``since``'s, then the log's), which users' histories show once trained."""
    graph = build_graph(dataset.train, threshold, dataset.n_users, dataset.n_items)
    users = IdMap.dense(dataset.n_users)
    history = empty_history()
    after, after_id = 0, None
    if since is not None:
        if events is None:
            raise ArtifactError("training --since a version needs --events: the log after it")
        base = load_artifact(since)
        if base.manifest["dataset"].get("fingerprint") != dataset.fingerprint:
            raise ArtifactError(f"{base.path} was trained on other data than {data_dir} (dataset "
                                "fingerprints differ)")  # fmt: skip
        if base.threshold != threshold:
            raise ArtifactError(f"{base.path} was trained with threshold {base.threshold}, not "
                                f"{threshold}")  # fmt: skip
        graph, users = base.trained_graph(), IdMap(base.arrays["user_ids"])
        history = {name: base.arrays[name] for name in HISTORY_ARRAYS}
        after, after_id = base.watermark, base.manifest.get("log", {}).get("last_event_id")
        print(f"starting from {base.path}: its graph holds the log up to seq {after}", file=out,
              flush=True)  # fmt: skip
    if events is None:
        return graph, users, None, history
    items = IdMap.dense(dataset.n_items)
    feedback = read_feedback(events, users, items, weights or EventWeights(), threshold, out,
                             after, after_id, npy_sha256(items.to_array()))  # fmt: skip
    graph = with_feedback(graph, feedback.users, feedback.items, feedback.strengths,
                          feedback.n_users)  # fmt: skip
    report = feedback.report
    print(
        f"log {report.directory}: {len(feedback.strengths)} events, seq {after + 1}.."
        f"{report.last_seq} ({len(feedback.new_users)} new users)"
        + (f"; left out a partial record at its end: {report.unread_tail}"
           if report.unread_tail else ""),
        file=out, flush=True,
    )  # fmt: skip
    log_info = {
        "directory": report.directory,
        "events": len(feedback.strengths),
        "first_seq": after + 1,
        "last_seq": feedback.watermark,
        "last_event_id": feedback.last_event_id,
        "new_users": len(feedback.new_users),
        "since": None if since is None else Path(since).name,
        "users": graph.n_users,
        "weights": msgspec.to_builtins(feedback.weights),
    }
    return graph, users, log_info, latest_per_user(concat_history(history, feedback.history),
                                                   history_cap)  # fmt: skip


def train(
    data_dir: Path,
    threshold: float,
    out_dir: Path,
    config: ModelConfig,
    out: TextIO | None = None,
    fixed: Hyper | None = None,
    events: Path | None = None,
    weights: EventWeights | None = None,
    since: Path | None = None,
    fixed_ranking: RankingChoice | None = None,
    history_cap: int = ServerConfig().history_max_limit,
    suppression_recent: int = RankingConfig().suppression_recent,
) -> Path:
    """Train on ``train.txt``, select on ``valid.txt``, export one artifact version; return it.

    With ``fixed`` hyper-parameters the search is skipped (a refit, e.g. on more data), and
    with ``fixed_ranking`` the serving strengths are taken as they are, not selected. With
    ``events`` (a server's state dir or its log) the train graph also holds every event of that
    log, weighted by ``weights`` as the server folds them, and the artifact's watermark is the
    last seq read: a server on that state replays only what came after it. With ``since`` (a
    version trained on the same data and log) training starts from that version's graph and
    reads only the events after its watermark, so the log's older segments may be gone. The
    version keeps each user's ``history_cap`` most recent logged events for their history,
    and suppression is judged on each user's last ``suppression_recent`` dislikes, as served.
    """
    out = sys.stderr if out is None else out  # the stream at call time, not import
    started = time.perf_counter()
    pin_malloc_threshold()
    threads = set_threads()
    torch.manual_seed(config.seed)
    dataset = load_dataset(Path(data_dir), threshold)
    check_catalogue_fits(dataset, Path(data_dir))
    print(
        f"data {dataset.name}: {dataset.n_users} users, {dataset.n_items} items, "
        f"{len(dataset.train)} train, {len(dataset.valid)} valid rows; {threads} threads",
        file=out,
        flush=True,
    )
    graph, users, log_info, history = _train_graph(dataset, Path(data_dir), threshold, events,
                                                   weights, since, out, history_cap)  # fmt: skip
    # Masked: every pair in the train graph (dataset rows and logged feedback alike).
    masked = interaction_matrix(*graph.edges()[:2], graph.n_users, dataset.n_items)
    valid, test = dataset.valid, dataset.test
    if log_info is not None:
        # Logged feedback may hold valid or test pairs (a stream of them, say): those are train
        # input now, so they leave the held-out truth rather than score as unreachable targets.
        valid, in_valid = held_out(valid, masked)
        test, in_test = (None, 0) if test is None else held_out(test, masked)
        if in_valid or in_test:
            print(f"{in_valid} valid and {in_test} test rows are in the train graph now (logged "
                  "feedback): left out of selection and metrics", file=out, flush=True)  # fmt: skip
        if len(valid) == 0 and (fixed is None or fixed_ranking is None):
            raise DataError(str(Path(data_dir) / "valid.txt"), None,
                            "every valid row is in the logged feedback, so nothing is left to "
                            "select on: refit with --hyper-from a served version")  # fmt: skip
    valid_truth = ground_truth(valid, threshold, graph.n_users, dataset.n_items)
    if len(valid_truth.users) == 0 and (fixed is None or fixed_ranking is None):
        raise DataError(str(Path(data_dir) / "valid.txt"), None,
                        f"no user has a positive (rating >= {threshold:g}) to select on; is "
                        f"--threshold {threshold:g} right?")  # fmt: skip
    # The search's n x n caches live only inside fit(), freed before the served factors are used.
    best, trials, item_table, item_vectors, z = fit(graph, valid_truth, masked, config, out, fixed)

    def served(u: np.ndarray) -> np.ndarray:
        return (z[u] @ item_table) @ item_vectors.T

    popularity = _popularity(graph)

    def served_routed(u: np.ndarray) -> np.ndarray:
        return popular_when_zero(served(u), popularity)

    unit = unit_rows(item_vectors)
    # The dislikes serving's suppression reads, so gamma is chosen on the ranking it serves.
    negatives = graph.latest_negatives(suppression_recent)
    fresh = _fresh_dislikes(dataset, graph, config)

    def sink(gamma: float) -> float:
        if len(fresh[0]) == 0:
            return 1.0
        return sink_rate(gamma, item_table, item_vectors, unit, z, negatives, fresh,
                         best.neg_weight, config.suppression_lookalikes)  # fmt: skip

    prior = config.propensity_prior
    suppression: list[dict[str, float]] = []
    propensity: list[dict[str, float]] = []
    if fixed_ranking is None:
        gamma, suppression = select_suppression(
            served_routed, sink, unit, negatives, valid_truth, masked, config, out
        )
        suppressed = served_scores(item_table, item_vectors, graph, best.neg_weight, gamma, 0.0,
                                   prior, popularity, suppression_recent)  # fmt: skip
        beta, propensity = select_propensity(suppressed, graph, valid_truth, masked, config, out)
    else:
        gamma, beta, prior = fixed_ranking.gamma, fixed_ranking.beta, fixed_ranking.prior
        print(f"serving strengths kept: suppression gamma {gamma:g}, propensity beta {beta:g}",
              file=out, flush=True)  # fmt: skip
    metrics: dict[str, dict[str, float]] = {}
    truths = {"valid": valid_truth}
    if test is not None:
        truths["test"] = ground_truth(test, threshold, graph.n_users, dataset.n_items)
    for split, truth in truths.items():
        if len(truth.users):  # a split wholly inside the logged feedback has no one to score
            metrics[split] = evaluate_scores(served, truth, masked)
    seconds = time.perf_counter() - started
    print(
        f"selected {best.as_dict()}; served rank {item_table.shape[1]}"
        + "".join(f", {split} ndcg@20={m['ndcg@20']:.4f}" for split, m in metrics.items()),
        file=out,
        flush=True,
    )
    ranking = {
        "suppression_gamma": gamma,
        "suppression_valid": suppression,
        "propensity_beta": beta,
        "propensity_prior": prior,
        "propensity_valid": propensity,
    }
    return export(dataset, graph, users, log_info, best, item_table, item_vectors, metrics,
                  trials, ranking, seconds, out_dir, history)  # fmt: skip


def export(
    dataset: Dataset,
    graph: SignedGraph,
    users: IdMap,
    log_info: dict[str, Any] | None,
    hyper: Hyper,
    item_table: np.ndarray,
    item_vectors: np.ndarray,
    metrics: dict[str, dict[str, float]],
    trials: list[dict[str, Any]],
    ranking: dict[str, Any],
    seconds: float,
    out_dir: Path,
    history: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write the artifact: factors, id maps, the trained signed graph (with the logged events in
    it) and the manifest."""
    arrays = {
        **(history or {}),
        "item_table": item_table,
        "item_vectors": item_vectors,
        "item_popularity": _popularity(graph),
        "item_ids": IdMap.dense(dataset.n_items).to_array(),
        # Packed on save; as fixed-width unicode, one 512-character id cost 2 KB a user.
        "user_ids": users.objects(),
        "pos_indptr": graph.pos_indptr,
        "pos_items": graph.pos_items,
        "neg_indptr": graph.neg_indptr,
        "neg_items": graph.neg_items,
        "pos_weights": graph.pos_weights,
        "neg_weights": graph.neg_weights,
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
        "ranking": ranking,
        "train_seconds": round(seconds, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "watermark": 0 if log_info is None else log_info["last_seq"],
    }
    if log_info is not None:
        manifest["log"] = log_info
    return save_artifact(Path(out_dir), arrays, manifest)
