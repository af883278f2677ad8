"""NegHit trade-off: how far dislike avoidance goes before NDCG@20 falls below the other bars.

Run from the repository root (after ``python -m benchmarks.quality``, whose report supplies the
EASE, LightGCN and SIGformer reference points)::

    python -m benchmarks.neghit --data ../shared/datasets/amazon-music:4 \
        ../shared/datasets/kuairand:1

Per dataset it runs the same automatic search as ``signedrec train`` (``server.train.fit``) and
then scores valid and test with two families of dislike avoidance on the selected operator:

- target ``t``: the autoencoder learns ``X+ + t X-`` instead of its input ``X+ + w X-``
  (``t < 0`` makes a dislike count against look-alikes); the operator is linear in its target,
  so ``S_t = S + (t - w) B_neg`` with ``B_neg = SignedGraphModel.ease_to(X-)``;
- propensity ``a``: ``score * (1 - p)^a`` with ``p`` a user's chance of disliking an item, from
  smoothed user and item dislike rates added in logit space;
- learned re-rank ``lambda``: over each user's top ``CANDIDATES`` of the model, two logistic
  regressions fitted on the valid split (features: the model's score and rank, the autoencoder's
  like- and dislike-target scores, user and item dislike-rate logits, the largest cosine to the
  user's train dislikes and likes, popularity and activity) give P(like) and P(dislike); items
  rank by ``P(like) - lambda P(dislike)``. Its valid figures are cross-fitted: each valid user
  is scored by regressions fitted on the other ``FOLDS - 1`` folds of valid users, so they are
  out of sample like the test figures (which use the regressions fitted on every valid user).
- learned *set*: the same two probabilities, but ``lambda`` only decides which ``K`` items make
  the list (per user, scaled by that user's expected ideal DCG) and P(like) orders them: NegHit@K
  does not depend on the order, while NDCG rewards likes on top, and a hit is worth less NDCG to a
  user with more positives to find. The expected count is ``SET_ALPHA`` x the user's train likes.
- served learned (re-rank and set): the same, from what the server holds only: candidates and
  scores from the factorised model, without the features that need the dense operators.

A diagnostic asks whether dislikes are personal at all: the sign AUC of user and item dislike
rates against a logistic matrix factorisation fitted on the train exposures.

Scores use the unfactorised operator (an upper bound of the served rank-``dim`` model, which is
also listed, with the look-alike suppression it serves at a few strengths). Writes
``benchmarks/reports/neghit.{md,json,png}``; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from benchmarks.host import command_line
from benchmarks.quality import REPORTS, git_state, load_avg, machine, parse_pair, report_header
from server.config import ModelConfig
from server.data import load_dataset
from server.evaluate import KS, Truth, evaluate_variants, ground_truth, interaction_matrix, top_k
from server.graph import build_graph
from server.model import SignedGraphModel
from server.train import (
    dislike_penalty,
    fit,
    graph_propensity,
    normalise_rows,
    pin_malloc_threshold,
    set_threads,
    unit_rows,
    user_propensity_logits,
)

TARGETS = (0.0, -0.5, -1.0, -2.0)  # dislike weights in the target, besides the model's own
PROPENSITY = (0.0, 1.0, 2.0, 3.0)
SUPPRESSION = (0.2, 0.5, 1.0)  # served dislike look-alike suppression strengths to list
CANDIDATES = 100  # per user, re-ranked by the learned variants
LEARNED = (0.0, 0.5, 0.6, 0.7, 1.0, 2.0)  # lambda: weight of P(dislike) against P(like)
LEARNED_SET = (0.25, 0.5, 0.6, 0.75, 1.0, 1.5)  # lambda of the set-only variant (P(like) order)
FOLDS = 5  # valid users are split this many ways to cross-fit the re-ranker
FOLD_SEED = 0
SET_ALPHA = 0.5  # a user's expected positives in the evaluated split per train like
# Diagnostic: is a dislike personal beyond "this user dislikes often, this item is often
# disliked"? A logistic matrix factorisation with biases on the train exposures says.
SIGN_MF_DIM = 32
SIGN_MF_L2 = 3.0
SIGN_MF_EPOCHS = 300
SIGN_MF_LR = 0.05


# P(like), P(dislike) for each user's candidates, shaped like the candidates.
Predict = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def progress(message: str) -> None:
    """One progress line on stderr."""
    print(f"[neghit] {message}", file=sys.stderr, flush=True)


class Reranker:
    """P(like) and P(dislike) for a user's candidates from two logistic regressions (valid)."""

    def __init__(self, features: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
        self.features = features
        self.models: dict[str, torch.nn.Linear] = {}
        self.mean = self.std = torch.zeros(0)

    def fit(self, users: np.ndarray, cands: np.ndarray, truth: Truth) -> None:
        """Fit both regressions on the candidates of ``users`` against their labels in ``truth``."""
        x = torch.from_numpy(self.features(users, cands).reshape(cands.size, -1))
        self.mean, self.std = x.mean(0), x.std(0) + 1e-6
        x = (x - self.mean) / self.std
        for name, y in zip(("like", "dislike"), candidate_labels(truth, users, cands), strict=True):
            self.models[name] = fit_logistic(x, torch.from_numpy(y.reshape(-1).astype(np.float32)))

    def sign_auc(self, users: np.ndarray, cands: np.ndarray, truth: Truth) -> float:
        """How well P(dislike) / (P(like) + P(dislike)) tells the split's dislikes from likes."""
        liked, disliked = candidate_labels(truth, users, cands)
        like, dislike = self.predict(users, cands)
        exposed = liked | disliked
        share = dislike / np.maximum(like + dislike, 1e-12)
        return auc(share[exposed], disliked[exposed])

    def predict(self, users: np.ndarray, cands: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """P(like) and P(dislike) per candidate, shaped like ``cands``."""
        x = torch.from_numpy(self.features(users, cands).reshape(cands.size, -1))
        x = (x - self.mean) / self.std
        with torch.no_grad():
            out = [torch.sigmoid(self.models[n](x)).numpy().reshape(cands.shape)
                   for n in ("like", "dislike")]  # fmt: skip
        return out[0], out[1]


def candidate_labels(
    truth: Truth, users: np.ndarray, cands: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks, shaped like ``cands``: which candidates the split has as likes, dislikes."""
    rows = np.arange(len(users))[:, None]
    return (
        np.asarray(truth.positives[users][rows, cands].todense(), dtype=bool),
        np.asarray(truth.negatives[users][rows, cands].todense(), dtype=bool),
    )


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-4) -> torch.nn.Linear:
    """A ridge-penalised logistic regression of y on x, fitted by L-BFGS."""
    linear = torch.nn.Linear(x.shape[1], 1)
    optimiser = torch.optim.LBFGS(linear.parameters(), max_iter=300)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        logits = linear(x).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        loss = loss + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)  # type: ignore[no-untyped-call]
    return linear


def fit_sign_mf(
    positive: sp.csr_matrix, negative: sp.csr_matrix, dim: int = SIGN_MF_DIM
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Logit of P(like | exposed): biases plus a dim-d dot product, fitted on train exposures."""
    torch.manual_seed(0)
    exposed = (positive + negative).tocoo()
    liked = np.asarray(positive[exposed.row, exposed.col]).ravel() != 0
    rows = torch.from_numpy(exposed.row.astype(np.int64))
    cols = torch.from_numpy(exposed.col.astype(np.int64))
    target = torch.from_numpy(liked.astype(np.float32))
    n_users, n_items = positive.shape
    users = torch.nn.Parameter(0.01 * torch.randn(n_users, dim))
    items = torch.nn.Parameter(0.01 * torch.randn(n_items, dim))
    user_bias = torch.nn.Parameter(torch.zeros(n_users))
    item_bias = torch.nn.Parameter(torch.zeros(n_items))
    offset = torch.nn.Parameter(torch.zeros(()))
    params = [users, items, user_bias, item_bias, offset]
    optimiser = torch.optim.Adam(params, lr=SIGN_MF_LR)

    def logit(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return offset + user_bias[r] + item_bias[c] + (users[r] * items[c]).sum(-1)

    for _ in range(SIGN_MF_EPOCHS):
        optimiser.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit(rows, cols), target)
        penalty = sum(p.pow(2).sum() for p in params[:4])
        (loss + SIGN_MF_L2 * penalty / len(rows)).backward()
        optimiser.step()

    def score(u: np.ndarray, i: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return logit(torch.from_numpy(u.astype(np.int64)),
                         torch.from_numpy(i.astype(np.int64))).numpy()  # fmt: skip

    return score


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (ties broken by order)."""
    order = np.argsort(scores, kind="stable")
    ranked = labels[order].astype(np.float64)
    n_pos = ranked.sum()
    n_neg = len(ranked) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float(np.cumsum(1.0 - ranked)[ranked == 1].sum() / (n_pos * n_neg))


def frontier(data: Path, threshold: float, config: ModelConfig) -> dict[str, Any]:
    """Search, then evaluate every (target, propensity) variant on valid and test."""
    started = time.perf_counter()
    dataset = load_dataset(data, threshold)
    graph = build_graph(dataset.train, threshold, dataset.n_users, dataset.n_items)
    masked = interaction_matrix(
        dataset.train.users, dataset.train.items, dataset.n_users, dataset.n_items
    )
    valid = ground_truth(dataset.valid, threshold, dataset.n_users, dataset.n_items)
    if dataset.test is None:
        raise SystemExit(f"{data}: needs test.txt")
    test = ground_truth(dataset.test, threshold, dataset.n_users, dataset.n_items)
    hyper, _, item_table, item_vectors, z = fit(graph, valid, masked, config, sys.stderr)
    progress(f"{dataset.name}: selected {hyper.as_dict()}; scoring the variants")
    model = SignedGraphModel(graph)
    operator = model.operator(hyper)
    positive, negative = graph.matrices()
    b_neg = model.ease_to(hyper.l2, hyper.dropout, negative).numpy()
    b_pos = model.ease_to(hyper.l2, hyper.dropout, positive).numpy()
    del model
    # The served propensity's smoothed rates; item logits here are absolute (not relative to the
    # global rate), so the re-ranker's product feature means what it did.
    propensity = graph_propensity(graph, config.propensity_prior)
    user_logit = user_propensity_logits(graph, propensity)
    mean_logit = float(np.log(propensity.rate / (1.0 - propensity.rate)))
    item_logit = propensity.item_logit + np.float32(mean_logit)
    unit = unit_rows(item_vectors)
    own = hyper.neg_weight
    targets = tuple(dict.fromkeys((own, *TARGETS)))  # the selected model's own target first
    served_meta = {"target": own, "propensity": 0.0, "served": True}
    names: dict[str, dict[str, Any]] = {"served": served_meta}
    names |= {f"served, suppression {g:g}": {**served_meta, "gamma": g} for g in SUPPRESSION}
    names |= {f"t={t:g} a={a:g}": {"target": t, "propensity": a, "served": False}
              for t in targets for a in PROPENSITY}  # fmt: skip
    for family, served in (("learned", False), ("served learned", True)):
        # "served": its base and features are what the server holds (factorised scores).
        meta = {"target": own, "propensity": 0.0, "served": served}
        names |= {f"{family} lambda={lam:g}": {**meta, "learned": lam} for lam in LEARNED}
        names |= {f"{family} set lambda={lam:g}": {**meta, "learned_set": lam}
                  for lam in LEARNED_SET}  # fmt: skip
    likes = np.diff(graph.pos_indptr).astype(np.float64)
    dcg = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, max(KS) + 2)))])
    ideal = dcg[np.clip(np.rint(SET_ALPHA * likes), 1, max(KS)).astype(np.int64)]
    ideal /= ideal[likes > 0].mean()  # so lambda weighs the average user the same
    activity = np.log1p(np.asarray((positive + negative).sum(axis=1)).ravel())
    popularity = np.log1p(np.asarray((positive + negative).sum(axis=0)).ravel())

    def unfactorised(users: np.ndarray) -> np.ndarray:
        return np.asarray(z[users] @ operator)

    def factorised(users: np.ndarray) -> np.ndarray:
        return np.asarray((z[users] @ item_table) @ item_vectors.T)

    def top_unseen(score: Callable[[np.ndarray], np.ndarray]) -> Callable[..., np.ndarray]:
        """A base's top CANDIDATES unseen items per user."""

        def candidates(users: np.ndarray) -> np.ndarray:
            base = score(users)
            m = masked[users].tocoo()
            base[m.row, m.col] = -np.inf
            return top_k(base, CANDIDATES)

        return candidates

    def columns(
        score: Callable[[np.ndarray], np.ndarray], offline: bool
    ) -> Callable[..., np.ndarray]:
        """Re-ranker features over a base's candidates; ``offline`` adds what only the dense
        operators give (the like- and dislike-target scores, the cosine to train likes)."""

        def features(users: np.ndarray, cands: np.ndarray) -> np.ndarray:
            rows = np.arange(len(users))[:, None]
            base = score(users)
            top = np.abs(base[rows, cands[:, :1]])
            top[top == 0] = 1.0
            relative = base[rows, cands] / top
            shape = relative.shape
            out = [
                relative,
                np.log(np.maximum(relative, 1e-3)),
                np.broadcast_to(1.0 / np.log2(np.arange(2, cands.shape[1] + 2)), shape),
                item_logit[cands],
                np.broadcast_to(user_logit[users][:, None], shape),
                item_logit[cands] * user_logit[users][:, None],
                dislike_penalty(unit, negative[users])[rows, cands],
                popularity[cands],
                np.broadcast_to(activity[users][:, None], shape),
            ]
            if offline:
                out += [
                    np.asarray(z[users] @ b_pos)[rows, cands] / top,
                    np.asarray(z[users] @ b_neg)[rows, cands] / top,
                    dislike_penalty(unit, positive[users])[rows, cands],
                ]
            return np.stack(out, axis=-1).astype(np.float32)

        return features

    fitted = np.unique(dataset.valid.users).astype(np.int64)
    # Cross-fitting: the fold models score valid users they were not fitted on.
    fold_of = np.full(dataset.n_users, -1, dtype=np.int64)
    fold_of[fitted] = np.random.default_rng(FOLD_SEED).integers(0, FOLDS, len(fitted))
    # Each family: its diagnostics' key prefix, candidates and features.
    families = {
        "learned": ("", top_unseen(unfactorised), columns(unfactorised, offline=True)),
        "served learned": ("served_", top_unseen(factorised), columns(factorised, offline=False)),
    }
    rerankers: dict[str, tuple[Callable[..., np.ndarray], Reranker, Predict]] = {}
    diagnostics: dict[str, float] = {}
    for family, (key, candidates, features) in families.items():
        fitted_cands = candidates(fitted)
        reranker = Reranker(features)
        reranker.fit(fitted, fitted_cands, valid)
        folds = []
        for fold in range(FOLDS):
            held = fold_of[fitted] == fold
            model = Reranker(features)
            model.fit(fitted[~held], fitted_cands[~held], valid)
            folds.append(model)
            progress(f"{dataset.name}: {family} re-ranker fold {fold + 1}/{FOLDS} fitted")

        def out_of_fold(users: np.ndarray, cands: np.ndarray, folds: list[Reranker] = folds
                        ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
            """P(like), P(dislike) of valid users from the fold models that did not see them."""
            like = np.zeros(cands.shape, np.float32)
            dislike = np.zeros(cands.shape, np.float32)
            for fold, model in enumerate(folds):
                rows = np.flatnonzero(fold_of[users] == fold)
                if rows.size:
                    like[rows], dislike[rows] = model.predict(users[rows], cands[rows])
            return like, dislike

        rerankers[family] = (candidates, reranker, out_of_fold)
        oof_like, oof_dislike = out_of_fold(fitted, fitted_cands)
        liked, disliked = candidate_labels(valid, fitted, fitted_cands)
        exposed = liked | disliked
        share = oof_dislike / np.maximum(oof_like + oof_dislike, 1e-12)
        diagnostics[f"{key}sign_auc_valid"] = reranker.sign_auc(fitted, fitted_cands, valid)
        diagnostics[f"{key}sign_auc_valid_cross_fitted"] = auc(share[exposed], disliked[exposed])

    def variants(users: np.ndarray, split: str) -> dict[str, np.ndarray]:
        base = np.asarray(z[users] @ operator)
        neg = np.asarray(z[users] @ b_neg)
        logits = user_logit[users][:, None] + item_logit[None, :] - mean_logit
        keep = 1.0 / (1.0 + np.exp(logits))  # 1 - p(dislike)
        served = normalise_rows((z[users] @ item_table) @ item_vectors.T)
        penalty = dislike_penalty(unit, negative[users])
        out = {"served": served}
        out |= {f"served, suppression {g:g}": served - g * penalty for g in SUPPRESSION}
        for t in targets:
            scores = normalise_rows(base + (t - own) * neg)
            for a in PROPENSITY:
                out[f"t={t:g} a={a:g}"] = scores * keep**a if a else scores
        rows = np.arange(len(users))[:, None]
        for family, (candidates, reranker, out_of_fold) in rerankers.items():
            cands = candidates(users)
            predict = out_of_fold if split == "valid" else reranker.predict
            like, dislike = predict(users, cands)
            for lam in LEARNED:
                learned = np.full(base.shape, -np.inf, np.float32)
                learned[rows, cands] = like - lam * dislike
                out[f"{family} lambda={lam:g}"] = learned
            for lam in LEARNED_SET:
                chosen = top_k(like - (lam * ideal[users])[:, None] * dislike, max(KS))
                ordered = np.full(base.shape, -np.inf, np.float32)
                ordered[rows, cands] = like - 2.0  # probabilities: the chosen K stay on top
                ordered[rows, cands[rows, chosen]] = like[rows, chosen] + 2.0
                out[f"{family} set lambda={lam:g}"] = ordered
        return out

    results = {
        split: evaluate_variants(lambda users, s=split: variants(users, s), truth, masked)
        for split, truth in (("valid", valid), ("test", test))
    }
    rows = [
        {"variant": name, **names[name], "valid": results["valid"][name],
         "test": results["test"][name]}
        for name in results["test"]
    ]  # fmt: skip
    # The re-ranker's sign AUC on test exposures among candidates (out of sample).
    users = np.unique(dataset.test.users).astype(np.int64)
    for family, (candidates, reranker, _) in rerankers.items():
        key = families[family][0]
        diagnostics[f"{key}sign_auc_test"] = reranker.sign_auc(users, candidates(users), test)
    cands = rerankers["learned"][0](users)
    liked, disliked = candidate_labels(test, users, cands)
    exposed = liked | disliked
    diagnostics["sign_auc_test_item_logit_only"] = auc(
        item_logit[cands][exposed], disliked[exposed]
    )
    owners = np.broadcast_to(users[:, None], cands.shape)
    diagnostics["sign_auc_test_user_item_logits"] = auc(
        (item_logit[cands] + user_logit[owners])[exposed], disliked[exposed]
    )
    for dim in (0, SIGN_MF_DIM):
        like_logit = fit_sign_mf(positive, negative, dim)(owners[exposed], cands[exposed])
        diagnostics[f"sign_auc_test_mf{dim}"] = auc(-like_logit, disliked[exposed])
    progress(f"{dataset.name}: {len(rows)} variants in {time.perf_counter() - started:.0f} s; "
             f"re-ranker {diagnostics}")  # fmt: skip
    return {"hyper": hyper.as_dict(), "rows": rows, "reranker": diagnostics}


def references(quality: Path) -> dict[str, dict[str, float]]:
    """EASE NDCG@20, LightGCN NegHit@20 and SIGformer NDCG@20 per dataset, from quality.json."""
    if not quality.is_file():
        return {}
    record = json.loads(quality.read_text())
    out: dict[str, dict[str, float]] = {}
    for name, ds in record.get("datasets", {}).items():
        models = ds.get("models", {})
        ref: dict[str, float] = {}
        if "ease" in models:
            ref["ease_ndcg"] = models["ease"]["metrics"]["ndcg@20"]
        if "lightgcn" in models:
            ref["lightgcn_neghit"] = models["lightgcn"]["metrics"]["neghit@20"]
        sigformer = [r["ndcg@20"] for r in ds.get("reference", []) if "SIGformer" in r["model"]]
        if sigformer:
            # Beat every reference row (the datasets README), so the higher run is the bar.
            ref["sigformer_ndcg"] = max(sigformer)
        out[name] = ref
    return out


def meets(row: dict[str, Any], ref: dict[str, float]) -> bool | None:
    """Whether a variant's test figures clear every NDCG bar and NegHit at most LightGCN's."""
    if "ease_ndcg" not in ref or "lightgcn_neghit" not in ref:
        return None
    test = row["test"]
    return (
        test["ndcg@20"] > ref["ease_ndcg"]
        and test["ndcg@20"] >= ref.get("sigformer_ndcg", 0.0)
        and test["neghit@20"] <= ref["lightgcn_neghit"]
    )


def markdown(record: dict[str, Any]) -> str:
    """The report: one table per dataset, best NDCG first."""
    lines = [
        *report_header(
            "NegHit trade-off: dislike avoidance against NDCG",
            record["command"],
            record["machine"],
            record["load_start"],
            record["git"],
        ),
        "Scores come from the unfactorised operator of the model `signedrec train` selects; "
        "`served` is the factorised model as shipped (with `suppression g`: minus g times the "
        "largest cosine to the user's train dislikes, as served). `t` is the autoencoder's "
        "weight on dislikes in its target (the selected model uses its input weight), `a` "
        "the exponent of the dislike-propensity factor (0: none); `learned lambda` re-ranks "
        f"the top {CANDIDATES} by P(like) - lambda P(dislike) from two logistic regressions "
        f"fitted on valid (its valid figures cross-fitted over {FOLDS} folds of valid users, "
        "so out of sample); `learned set lambda` uses the "
        "same probabilities to pick each user's 20 (lambda scaled by the user's expected ideal "
        f"DCG, from {SET_ALPHA:g} x its train likes) and orders them by P(like). `served "
        "learned` is the same re-ranker built only from what the server holds: candidates and "
        "scores from the factorised model, and no feature from the dense operators (no like- "
        "or dislike-target score, no cosine to train likes). *both* marks "
        "test NDCG@20 above EASE's and at least SIGformer's, and NegHit@20 at most "
        "LightGCN's: the bars of issue 3 that pull against each other.",
    ]
    for name, ds in record["datasets"].items():
        ref = ds["reference"]
        lines += [
            "",
            f"## {name} (selected {ds['hyper']})",
            "",
            "References from `benchmarks/reports/quality.json`: "
            + (", ".join(f"{k} {v:.4f}" for k, v in ref.items()) or "none (run quality first)"),
            "",
            "| variant | valid NDCG@20 | valid NegHit@20 | test Recall@20 | test NDCG@20 | "
            "test NegHit@20 | both |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in sorted(ds["rows"], key=lambda r: -r["test"]["ndcg@20"]):
            v, t, ok = row["valid"], row["test"], meets(row, ref)
            lines.append(
                f"| {row['variant']} | {v['ndcg@20']:.4f} | {v['neghit@20']:.4f} | "
                f"{t['recall@20']:.4f} | {t['ndcg@20']:.4f} | {t['neghit@20']:.4f} | "
                f"{'—' if ok is None else ('**yes**' if ok else 'no')} |"
            )
        if "reranker" in ds:
            d = ds["reranker"]
            lines += [
                "",
                "Learned re-ranker, AUC of P(dislike) / (P(like) + P(dislike)) for telling a "
                f"candidate's dislike from a like: valid (in-sample) {d['sign_auc_valid']:.3f}, "
                f"valid cross-fitted {d.get('sign_auc_valid_cross_fitted', float('nan')):.3f}, "
                f"test {d['sign_auc_test']:.3f}; the item's dislike rate alone, test "
                f"{d['sign_auc_test_item_logit_only']:.3f}.",
            ]
            if "served_sign_auc_test" in d:
                lines[-1] += (
                    " The served-features re-ranker: valid cross-fitted "
                    f"{d['served_sign_auc_valid_cross_fitted']:.3f}, test "
                    f"{d['served_sign_auc_test']:.3f}."
                )
        if "sign_auc_test_mf0" in ds.get("reranker", {}):
            d = ds["reranker"]
            gain = d[f"sign_auc_test_mf{SIGN_MF_DIM}"] - d["sign_auc_test_mf0"]
            lines += [
                "",
                "Is a dislike personal? Test sign AUC over the same candidates: user and item "
                f"dislike rates added {d['sign_auc_test_user_item_logits']:.3f}; a logistic "
                "model fitted on train exposures with user and item biases only "
                f"{d['sign_auc_test_mf0']:.3f}, and with a {SIGN_MF_DIM}-d user x item term "
                f"as well {d[f'sign_auc_test_mf{SIGN_MF_DIM}']:.3f} ({gain:+.3f} from the "
                "personal term).",
            ]
        hits = [r["variant"] for r in ds["rows"] if meets(r, ref)]
        lines += ["", f"Variants meeting both: {', '.join(hits) if hits else 'none'}."]
    return "\n".join(lines) + "\n"


def corner(ax: Any, name: str, ref: dict[str, float]) -> None:
    """The bars as lines on a test NegHit@20 x NDCG@20 plot, with its labels and legend."""
    if "ease_ndcg" in ref:
        ax.axhline(ref["ease_ndcg"], ls="--", color="grey", label="EASE NDCG@20")
    if "sigformer_ndcg" in ref:
        ax.axhline(ref["sigformer_ndcg"], ls=":", color="grey", label="SIGformer NDCG@20")
    if "lightgcn_neghit" in ref:
        ax.axvline(ref["lightgcn_neghit"], ls="--", color="red", label="LightGCN NegHit@20")
    ax.set_xlabel("test NegHit@20 (lower is better)")
    ax.set_ylabel("test NDCG@20")
    ax.set_title(f"{name}: the bars' corner is top-left of both dashed lines")
    ax.legend(fontsize=7)


def plot(record: dict[str, Any], path: Path) -> None:
    """Test NDCG@20 against NegHit@20 per variant, with the reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = record["datasets"]
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.8), squeeze=False)
    for ax, (name, ds) in zip(axes[0], datasets.items(), strict=True):
        styles = (("learned", False, "purple", "darkorange", "dense operators"),
                  ("served learned", True, "teal", "deeppink", "served factors"))  # fmt: skip
        for _, served, line, set_line, base in styles:
            family = [r for r in ds["rows"] if r["served"] == served]
            learned = sorted((r for r in family if "learned" in r), key=lambda r: r["learned"])
            ax.plot([r["test"]["neghit@20"] for r in learned],
                    [r["test"]["ndcg@20"] for r in learned], marker="s", color=line,
                    label=f"learned re-rank, {base} (lambda varies)")  # fmt: skip
            chosen = sorted((r for r in family if "learned_set" in r),
                            key=lambda r: r["learned_set"])  # fmt: skip
            ax.plot([r["test"]["neghit@20"] for r in chosen],
                    [r["test"]["ndcg@20"] for r in chosen], marker="D", color=set_line,
                    linestyle="--" if served else "-",
                    label=f"learned set, {base}, ordered by P(like)")  # fmt: skip
        for a in PROPENSITY:
            rows = sorted((r for r in ds["rows"]
                           if not r["served"] and "learned" not in r and "learned_set" not in r
                           and r["propensity"] == a),
                          key=lambda r: r["target"])  # fmt: skip
            ax.plot([r["test"]["neghit@20"] for r in rows], [r["test"]["ndcg@20"] for r in rows],
                    marker="o", label=f"propensity a={a:g} (t varies)")  # fmt: skip
        served = [r for r in ds["rows"]
                  if r["served"] and "learned" not in r and "learned_set" not in r]  # fmt: skip
        ax.scatter([r["test"]["neghit@20"] for r in served],
                   [r["test"]["ndcg@20"] for r in served], marker="*", s=160, color="black",
                   label="served (rank-dim factors)", zorder=5)  # fmt: skip
        for r in served:
            ax.annotate(f"g={r.get('gamma', 0):g}", (r["test"]["neghit@20"], r["test"]["ndcg@20"]),
                        fontsize=7, xytext=(4, 4), textcoords="offset points")  # fmt: skip
        corner(ax, name, ds["reference"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_report(
    name: str,
    argv: list[str] | None,
    per_dataset: Callable[[Path, float, ModelConfig], dict[str, Any]],
    markdown: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], Path], None],
) -> int:
    """Parse ``--data``/``--out``, run ``per_dataset`` on each dataset, write NAME.{json,md,png}."""
    module = sys.modules[per_dataset.__module__]
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=module.__doc__)
    p.add_argument("--data", nargs="+", type=parse_pair, required=True, help="DIR:THRESHOLD")
    p.add_argument("--out", type=Path, default=REPORTS, help="report directory")
    args = p.parse_args(argv)
    pin_malloc_threshold()
    set_threads()
    torch.manual_seed(0)
    record: dict[str, Any] = {
        "command": command_line(f"benchmarks.{name}", sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "load_start": load_avg(),
        "git": git_state(),
        "datasets": {},
    }
    # The output directory's quality report, else the committed one.
    own = args.out / "quality.json"
    refs = references(own if own.is_file() else REPORTS / "quality.json")
    for data, threshold in args.data:
        dataset = data.resolve().name
        print(f"[{name}] {dataset}: searching hyper-parameters as signedrec train does",
              file=sys.stderr, flush=True)  # fmt: skip
        result = per_dataset(data, threshold, ModelConfig())
        result["reference"] = refs.get(dataset, {})
        record["datasets"][dataset] = result
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(markdown(record))
    plot(record, args.out / f"{name}.png")
    print(f"[{name}] wrote {args.out / name}.md", file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the frontier on every dataset given and write the reports."""
    return run_report("neghit", argv, frontier, markdown, plot)


if __name__ == "__main__":
    raise SystemExit(main())
