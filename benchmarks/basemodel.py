"""Base-model variants: can another item-item operator move the NegHit / NDCG corner of issue 3?

Run from the repository root (after ``python -m benchmarks.quality``, whose report supplies the
EASE, LightGCN and SIGformer reference points)::

    python -m benchmarks.basemodel --data ../shared/datasets/amazon-music:4 \
        ../shared/datasets/kuairand:1

``benchmarks.neghit`` re-ranks the selected model's scores; this one changes the model itself,
keeping the user-vector contract (a user is a weighted sum of item-table rows). Per dataset it runs
the same automatic search as ``signedrec train`` and then scores valid and test with:

- ``selected``: the chosen operator, unfactorised (the reference row);
- ``pop^g``: scores times item popularity to the power g (a popularity-bias knob);
- ``user-weighted gram d^-b``: the autoencoder fitted with each user's rows scaled by their
  degree^-b (heavy users weigh less in the Gram matrix);
- ``relaxed diagonal xi``: the autoencoder with diag(B) <= xi instead of 0 (RDLAE, Moon et al.
  2023), the graph filter mixed in as for the selected model;
- ``EASE part, one channel`` vs ``two channels``: the autoencoder alone (no graph filter), with
  a dislike as ``neg_weight`` times the like row (the selected form) or with dislikes given rows
  of their own (B is 2n x n), over ridge strengths around the selected one;
- ``fine-tuned mu``: the served rank-``dim`` factors trained further by gradient with a denoising
  softmax loss (each epoch a random ``FT_HOLDOUT`` of every user's train edges are the targets,
  the rest the input) plus ``mu`` x a sign pair loss (a held-out dislike's score against the
  user's held-out likes); the epoch with the best valid NDCG@20 is reported, the valid curve too.

Writes ``benchmarks/reports/basemodel.{md,json,png}``; progress goes to stderr.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from benchmarks.neghit import corner, meets, run_report
from benchmarks.quality import report_header
from server.config import Hyper, ModelConfig
from server.data import load_dataset
from server.evaluate import Truth, evaluate_variants, ground_truth, interaction_matrix
from server.graph import SignedGraph, build_graph
from server.model import SignedGraphModel
from server.train import fit

POPULARITY = (-0.15, 0.15)
USER_WEIGHT = (0.25, 0.5)
RELAXED = (0.1, 0.3, 0.5)
CHANNEL_L2 = (1.0, 2.0, 4.0)  # multiples of the selected ridge strength
FT_MU = (0.0, 3.0)
FT_EPOCHS = 8
FT_HOLDOUT = 0.2
FT_LR = 0.01  # Adam step, relative to the factors' standard deviation
FT_BATCH = 512
SHOWN = ("ndcg@20", "recall@20", "neghit@20")


def progress(message: str) -> None:
    """One progress line on stderr."""
    print(f"[basemodel] {message}", file=sys.stderr, flush=True)


def ridge_to(
    x: sp.csr_matrix, target: sp.csr_matrix, l2: float, dropout: float, n: int
) -> np.ndarray:
    """EASE-style ridge from input ``x`` (users x m) to ``target`` (users x n), B[j, j] = 0 for
    j < n (an item's own like row may not predict it), the model's penalty (l2 relative to the
    mean degree plus the dropout term)."""
    gram = torch.from_numpy((x.T @ x).toarray().astype(np.float32))
    cross = torch.from_numpy((x.T @ target).toarray().astype(np.float32))
    degree = torch.diagonal(gram).clone()
    penalty = l2 * float(degree.mean()) + dropout / (1.0 - dropout) * degree
    gram.diagonal().add_(penalty)
    inverse = torch.linalg.inv(gram)
    del gram
    b = inverse @ cross
    own = torch.arange(n)
    b -= inverse[:, :n] * (b[own, own] / inverse[own, own])[None, :]
    return b.numpy()


def relaxed_operators(model: SignedGraphModel, hyper: Hyper) -> dict[str, np.ndarray]:
    """The selected operator with the autoencoder's diagonal relaxed to at most xi."""
    model.set_neg_weight(hyper.neg_weight)
    gram = model.gram
    penalty = torch.full((gram.shape[0],), hyper.l2 * model.mean_degree)
    if hyper.dropout > 0:
        penalty = penalty + hyper.dropout / (1.0 - hyper.dropout) * torch.diagonal(gram)
    inverse = model._inverse(hyper.l2, hyper.dropout)
    diagonal = torch.diagonal(inverse)
    out = {}
    for xi in RELAXED:
        # B = I - P diag(lambda + mu), mu >= 0 the multiplier of diag(B) <= xi.
        b = -inverse * torch.maximum(penalty, (1.0 - xi) / diagonal)[None, :]
        b.diagonal().add_(1.0)
        model._ease_cache = {(hyper.l2, hyper.dropout): b}
        out[f"relaxed diagonal xi={xi:g}"] = model.operator(hyper)
    model._ease_cache = {}
    return out


def user_weighted_operators(graph: SignedGraph, hyper: Hyper) -> dict[str, np.ndarray]:
    """The selected operator with the autoencoder fitted on degree-weighted user rows."""
    out = {}
    for b in USER_WEIGHT:
        model = SignedGraphModel(graph)
        model.set_neg_weight(hyper.neg_weight)
        z = model.z
        weighted = sp.diags((np.asarray(abs(z).sum(axis=1)).ravel() + 1.0) ** -b) @ z
        model.gram = torch.from_numpy((weighted.T @ weighted).toarray()).to(model.dtype)
        model.mean_degree = float(torch.diagonal(model.gram).mean())
        out[f"user-weighted gram d^-{b:g}"] = model.operator(hyper)
    return out


def fine_tune(
    graph: SignedGraph,
    z: sp.csr_matrix,
    factors: tuple[np.ndarray, np.ndarray],
    mu: float,
    score: Callable[[Callable[[np.ndarray], np.ndarray], Truth], dict[str, float]],
    valid: Truth,
) -> tuple[tuple[np.ndarray, np.ndarray], list[float]]:
    """Gradient steps on (Q, V) from the closed form; the best-valid factors and the valid curve."""
    generator = torch.Generator().manual_seed(0)
    q = torch.nn.Parameter(torch.from_numpy(factors[0].copy()))
    v = torch.nn.Parameter(torch.from_numpy(factors[1].copy()))
    optimiser = torch.optim.Adam([q, v], lr=FT_LR * float(q.detach().std()))
    coo = z.tocoo()
    edge_user = torch.from_numpy(coo.row.astype(np.int64))
    edge_item = torch.from_numpy(coo.col.astype(np.int64))
    edge_weight = torch.from_numpy(coo.data.astype(np.float32))
    positive, _ = graph.matrices()
    liked = torch.from_numpy(np.asarray(positive[coo.row, coo.col]).ravel() > 0)
    users = np.flatnonzero(np.diff(positive.indptr) > 0)
    n_users, n_items = z.shape

    def valid_ndcg() -> float:
        qn, vn = q.detach().numpy(), v.detach().numpy()
        return score(lambda u: np.asarray(z[u] @ qn) @ vn.T, valid)["ndcg@20"]

    curve = [valid_ndcg()]
    best = (curve[0], (factors[0], factors[1]))
    for epoch in range(FT_EPOCHS):
        held = torch.rand(len(edge_weight), generator=generator) < FT_HOLDOUT
        order = np.random.default_rng(epoch).permutation(users)
        for start in range(0, len(order), FT_BATCH):
            batch = torch.from_numpy(order[start : start + FT_BATCH])
            row_of = torch.full((n_users,), -1, dtype=torch.long)
            row_of[batch] = torch.arange(len(batch))
            mine = row_of[edge_user] >= 0
            rows, items = row_of[edge_user[mine]], edge_item[mine]
            out_, like = held[mine], liked[mine]
            x = torch.sparse_coo_tensor(
                torch.stack([rows[~out_], items[~out_]]), edge_weight[mine][~out_],
                (len(batch), n_items), check_invariants=False,
            ).coalesce()  # fmt: skip
            logits = torch.sparse.mm(x, q) @ v.T
            logits = logits.index_put((rows[~out_], items[~out_]), torch.tensor(-1e9))
            targets = out_ & like
            if not bool(targets.any()):
                continue
            loss = -torch.log_softmax(logits, dim=1)[rows[targets], items[targets]].sum()
            dislikes = out_ & ~like
            if mu > 0 and bool(dislikes.any()):
                total = torch.zeros(len(batch)).index_add_(
                    0, rows[targets], logits[rows[targets], items[targets]]
                )
                count = torch.zeros(len(batch)).index_add_(
                    0, rows[targets], torch.ones(int(targets.sum()))
                )
                r, c = rows[dislikes], items[dislikes]
                keep = count[r] > 0
                r, c = r[keep], c[keep]
                pair = torch.nn.functional.softplus(logits[r, c] - total[r] / count[r])
                loss = loss + mu * pair.sum()  # fmt: skip
            optimiser.zero_grad()
            (loss / len(batch)).backward()
            optimiser.step()
        curve.append(valid_ndcg())
        progress(
            f"fine-tune mu={mu:g} epoch {epoch + 1}/{FT_EPOCHS}: valid ndcg@20 {curve[-1]:.4f}"
        )
        if curve[-1] > best[0]:
            best = (curve[-1], (q.detach().numpy().copy(), v.detach().numpy().copy()))
    return best[1], curve


def variants_of(data: Path, threshold: float, config: ModelConfig) -> dict[str, Any]:
    """Search, then score every base-model variant on valid and test."""
    started = time.perf_counter()
    dataset = load_dataset(data, threshold)
    if dataset.test is None:
        raise SystemExit(f"{data}: needs test.txt")
    graph = build_graph(dataset.train, threshold, dataset.n_users, dataset.n_items)
    masked = interaction_matrix(
        dataset.train.users, dataset.train.items, dataset.n_users, dataset.n_items
    )
    truths = {
        "valid": ground_truth(dataset.valid, threshold, dataset.n_users, dataset.n_items),
        "test": ground_truth(dataset.test, threshold, dataset.n_users, dataset.n_items),
    }

    def score(fn: Callable[[np.ndarray], np.ndarray], truth: Truth) -> dict[str, float]:
        return evaluate_variants(lambda u: {"": fn(u)}, truth, masked)[""]

    hyper, _, item_table, item_vectors, z = fit(graph, truths["valid"], masked, config, sys.stderr)
    progress(f"{dataset.name}: selected {hyper.as_dict()}; building the variants")
    model = SignedGraphModel(graph)
    selected = model.operator(hyper)
    relaxed = relaxed_operators(model, hyper)
    del model
    popularity = np.asarray(graph.matrices()[0].sum(axis=0)).ravel() + 1.0
    rows: list[dict[str, Any]] = []

    def add(name: str, family: str, inputs: sp.csr_matrix, op: np.ndarray,
            column: np.ndarray | None = None) -> None:  # fmt: skip
        def fn(u: np.ndarray) -> np.ndarray:
            scores = np.asarray(inputs[u] @ op)
            return scores * column[None, :] if column is not None else scores

        rows.append({"variant": name, "family": family,
                     **{split: score(fn, truth) for split, truth in truths.items()}})  # fmt: skip

    add("selected", "selected", z, selected)
    for g in POPULARITY:
        add(f"pop^{g:g}", "popularity exponent", z, selected, popularity**g)
    del selected
    for name, op in relaxed.items():
        add(name, "relaxed diagonal", z, op)
    del relaxed
    for name, op in user_weighted_operators(graph, hyper).items():
        add(name, "user-weighted gram", z, op)
    positive, negative = (m.astype(np.float32) for m in graph.matrices())
    target = (positive + hyper.neg_weight * negative).tocsr()
    two = sp.hstack([positive, negative]).tocsr()
    n = positive.shape[1]
    for scale in CHANNEL_L2:
        l2 = hyper.l2 * scale
        add(f"EASE part, one channel, l2={l2:g}", "one channel", z,
            ridge_to(z, target, l2, hyper.dropout, n))  # fmt: skip
        add(f"EASE part, two channels, l2={l2:g}", "two channels", two,
            ridge_to(two, target, l2, hyper.dropout, n))  # fmt: skip
        progress(f"{dataset.name}: channels at l2={l2:g} done")
    curves = {}
    for mu in FT_MU:
        (q, v), curve = fine_tune(graph, z, (item_table, item_vectors), mu, score, truths["valid"])
        curves[f"{mu:g}"] = curve
        add(f"fine-tuned mu={mu:g} (best valid epoch {int(np.argmax(curve))})", "fine-tuned",
            z, q @ v.T)  # fmt: skip
    progress(f"{dataset.name}: {len(rows)} variants in {time.perf_counter() - started:.0f} s")
    return {"hyper": hyper.as_dict(), "rows": rows, "fine_tune_valid_curves": curves}


def markdown(record: dict[str, Any]) -> str:
    """The report: one table per dataset, sorted by test NDCG@20."""
    lines = [
        *report_header(
            "Base-model variants against the NegHit / NDCG corner of issue 3",
            record["command"],
            record["machine"],
            record["load_start"],
            record["git"],
        ),
        "``benchmarks.neghit``"
        + (__doc__ or "").split("``benchmarks.neghit``", 1)[1].split("Writes ``")[0].rstrip(),
        "",
        "*both* marks test NDCG@20 above EASE's and at least SIGformer's with NegHit@20 at most "
        "LightGCN's (from `quality.json`). *better on valid* marks a variant whose valid NDCG@20 "
        "beats the selected operator's: the only thing an automatic search could pick it by.",
    ]
    for name, ds in record["datasets"].items():
        ref = ds["reference"]
        selected = next(r for r in ds["rows"] if r["variant"] == "selected")
        lines += ["", f"## {name} (selected {ds['hyper']})", ""]
        if ref:
            lines.append(
                "References: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(ref.items())) + "\n"
            )
        lines += [
            "| variant | valid NDCG@20 | valid NegHit@20 | test NDCG@20 | test Recall@20 "
            "| test NegHit@20 | better on valid | both |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in sorted(ds["rows"], key=lambda r: -r["test"]["ndcg@20"]):
            v, t = row["valid"], row["test"]
            better = v["ndcg@20"] > selected["valid"]["ndcg@20"]
            ok = meets(row, ref)
            both = "**yes**" if ok else "no" if ok is False else "-"
            lines.append(
                f"| {row['variant']} | {v['ndcg@20']:.4f} | {v['neghit@20']:.4f} "
                f"| {t['ndcg@20']:.4f} | {t['recall@20']:.4f} | {t['neghit@20']:.4f} "
                f"| {'yes' if better else ''} | {both} |"
            )
        curves = ", ".join(f"mu={mu}: " + " ".join(f"{x:.4f}" for x in c)
                           for mu, c in ds["fine_tune_valid_curves"].items())  # fmt: skip
        lines += ["", f"Fine-tuning, valid NDCG@20 by epoch (0 = the closed form): {curves}."]
    lines += ["", "![basemodel](basemodel.png)", ""]
    return "\n".join(lines)


def plot(record: dict[str, Any], path: Path) -> None:
    """Test NDCG@20 against NegHit@20 per variant family, with the reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = record["datasets"]
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.8), squeeze=False)
    for ax, (name, ds) in zip(axes[0], datasets.items(), strict=True):
        families = sorted({r["family"] for r in ds["rows"]})
        for family in families:
            rows = [r for r in ds["rows"] if r["family"] == family]
            ax.scatter([r["test"]["neghit@20"] for r in rows],
                       [r["test"]["ndcg@20"] for r in rows], label=family,
                       marker="*" if family == "selected" else "o",
                       s=160 if family == "selected" else 30)  # fmt: skip
        corner(ax, name, ds["reference"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Score the variants on every dataset given and write the reports."""
    return run_report("basemodel", argv, variants_of, markdown, plot)


if __name__ == "__main__":
    raise SystemExit(main())
