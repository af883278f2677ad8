"""The signed linear graph model: an item-item operator learned in closed form with torch + PyG.

A user's input row ``z_u`` holds 1 for each liked item and ``neg_weight`` for each disliked one
(explicit negatives still reveal exposure and taste; the search decides how much). Scores are
``z_u @ S`` with the item-item operator

    S = B_signed_ease + mix * scale * (P_norm + ideal * V_k V_k^T-filter)

where ``B`` is a zero-diagonal ridge autoencoder with dropout-style regularisation fitted on the
signed input, ``P_norm`` is the symmetric-normalised two-hop propagation item->user->item over the
signed bipartite graph (torch-geometric degree normalisation + sparse matmul), and the ideal
low-pass term keeps its top-k spectral components (GF-CF). ``S`` is factorised to rank ``dim`` as
``Q V^T``, so a user vector is ``u = sum_i z_ui Q_i``: a pure function of the item side and the
user's signed neighbourhood, and one feedback event is an exact O(d) in-place update.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch_geometric.utils import scatter, spmm

from server.config import Hyper
from server.graph import SignedGraph

_BLOCK = 512  # item columns per block of the two-hop propagation
_SCALE_USERS = 1024  # users sampled to match the scale of the two operator parts
_SPECTRAL_KEEP = 256  # eigenvectors kept for the ideal low-pass filter
_OVERSAMPLE = 16  # randomised SVD oversampling and power iterations
_POWER_ITERS = 4
# Dense n_items x n_items float32 matrices alive at once at the peak of a fit (the Gram matrix,
# the system, its inverse and LU workspace, the operator, a product): sizes the memory check.
ITEM_MATRICES_AT_PEAK = 6


def dense_bytes(n_items: int) -> int:
    """About how much memory fitting the model on ``n_items`` items needs at its peak."""
    return ITEM_MATRICES_AT_PEAK * n_items * n_items * 4


class SignedGraphModel:
    """Closed-form pieces of the model for one signed graph, cached across search trials."""

    def __init__(self, graph: SignedGraph, dtype: torch.dtype = torch.float32) -> None:
        self.graph = graph
        self.dtype = dtype
        self._neg_weight: float | None = None
        self._ease_cache: dict[tuple[float, float], torch.Tensor] = {}
        self._spectral: tuple[torch.Tensor, torch.Tensor] | None = None
        self._p_norm: torch.Tensor | None = None

    # -- signed input ------------------------------------------------------------------------
    def set_neg_weight(self, neg_weight: float) -> None:
        """Rebuild every neg_weight-dependent cache (the input matrix changes)."""
        if self._neg_weight == neg_weight:
            return
        self._neg_weight = neg_weight
        self.z = self.graph.signed_input(neg_weight)
        self._ease_cache.clear()
        self._spectral = None
        self._p_norm = None
        self.gram = torch.from_numpy((self.z.T @ self.z).toarray()).to(self.dtype)
        self.mean_degree = float(torch.diagonal(self.gram).mean().clamp_min(1e-9))

    def _torch_sparse(self, m: sp.csr_matrix) -> torch.Tensor:
        coo = m.tocoo()
        index = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
        return torch.sparse_coo_tensor(
            index, torch.from_numpy(coo.data.astype(np.float32)), m.shape, check_invariants=False
        ).coalesce()

    # -- closed-form signed autoencoder --------------------------------------------------------
    def ease(self, l2: float, dropout: float) -> torch.Tensor:
        """Zero-diagonal ridge autoencoder on the signed input, dropout-style diagonal penalty."""
        key = (l2, dropout)
        if key not in self._ease_cache:
            self._ease_cache.clear()  # free the previous solve before allocating the next
            inverse = self._inverse(l2, dropout)
            b = _zero_diagonal(inverse, inverse @ self.gram)
            del inverse
            self._ease_cache = {key: b}  # one cached solve bounds memory at O(n^2)
        return self._ease_cache[key]

    def _inverse(self, l2: float, dropout: float) -> torch.Tensor:
        """(G + diag(penalty))^-1 for the ridge penalty relative to the mean degree plus dropout."""
        gram = self.gram
        penalty = torch.full((gram.shape[0],), l2 * self.mean_degree, dtype=self.dtype)
        if dropout > 0:
            penalty = penalty + dropout / (1.0 - dropout) * torch.diagonal(gram)
        system = gram.clone()
        system.diagonal().add_(penalty)
        return torch.linalg.inv(system)

    def ease_to(self, l2: float, dropout: float, target: sp.csr_matrix) -> torch.Tensor:
        """Zero-diagonal ridge operator from the signed input to another ``target`` matrix.

        The same system as :meth:`ease` (whose target is the input itself); linear in the
        target, so e.g. the operator for ``X+ + t X-`` is ``ease_to(X+) + t * ease_to(X-)``.
        """
        inverse = self._inverse(l2, dropout)
        cross = torch.from_numpy((self.z.T @ target).toarray()).to(self.dtype)
        return _zero_diagonal(inverse, inverse @ cross)

    # -- signed graph filter ---------------------------------------------------------------
    def _normalised_adjacency(self) -> torch.Tensor:
        """D_u^-1/2 Z D_i^-1/2 over the signed bipartite graph, as a torch sparse matrix."""
        coo = self.z.tocoo()
        users = torch.from_numpy(coo.row.astype(np.int64))
        items = torch.from_numpy(coo.col.astype(np.int64))
        weight = torch.from_numpy(coo.data.astype(np.float32))
        # Weighted degrees: a disliked item counts with its signed-input weight.
        deg_u = scatter(weight, users, dim_size=self.graph.n_users, reduce="sum")
        deg_i = scatter(weight, items, dim_size=self.graph.n_items, reduce="sum")
        norm = weight * deg_u[users].clamp_min(1e-9).rsqrt() * deg_i[items].clamp_min(1e-9).rsqrt()
        self.item_degree = deg_i
        return torch.sparse_coo_tensor(
            torch.stack([users, items]),
            norm,
            (self.graph.n_users, self.graph.n_items),
            check_invariants=False,
        ).coalesce()

    def p_norm(self) -> torch.Tensor:
        """Two-hop normalised item-item propagation (item -> user -> item)."""
        if self._p_norm is None:
            adj = self._normalised_adjacency()
            adj_t = adj.t().coalesce().to_sparse_csr()
            n = self.graph.n_items
            p = torch.empty((n, n), dtype=self.dtype)
            # R~^T R~ one block of item columns at a time, so the dense block stays small.
            for start in range(0, n, _BLOCK):
                stop = min(start + _BLOCK, n)
                block = torch.index_select(adj, 1, torch.arange(start, stop)).to_dense()
                p[:, start:stop] = spmm(adj_t, block).to(self.dtype)
            self._p_norm = p
        return self._p_norm

    def spectral(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top eigenvectors of the normalised item-item operator (ideal low-pass filter)."""
        if self._spectral is None or self._spectral[0].shape[1] < rank:
            p = self.p_norm()  # also sets the item degrees
            keep = min(max(rank, _SPECTRAL_KEEP), self.graph.n_items)
            # R~^T R~ is symmetric PSD: its top singular vectors are its top eigenvectors, and a
            # randomised SVD gets them with a few dense matmuls, no n x n eigendecomposition.
            _, _, vecs = randomised_svd(p, keep)
            self._spectral = (vecs.contiguous(), self.item_degree.clamp_min(1e-9).sqrt())
        vecs, sqrt_deg = self._spectral
        return vecs[:, :rank], sqrt_deg

    def graph_filter(self, rank: int, ideal: float) -> torch.Tensor:
        """GF-CF operator: linear normalised propagation plus the ideal low-pass component."""
        vecs, sqrt_deg = self.spectral(rank)
        out = (vecs / sqrt_deg[:, None]) @ (vecs.t() * sqrt_deg[None, :])
        return out.mul_(ideal).add_(self.p_norm())

    # -- the full operator -------------------------------------------------------------------
    def operator(self, h: Hyper) -> np.ndarray:
        """The dense item-item operator S for hyper-parameters ``h`` (float32)."""
        self.set_neg_weight(h.neg_weight)
        b = self.ease(h.l2, h.dropout)
        if h.gf_mix <= 0:
            return b.clone().numpy()
        gf = self.graph_filter(h.gf_rank, h.gf_ideal)
        # Scale-match the two parts on the training inputs so `mix` means the same everywhere.
        sample = self.z[: min(self.z.shape[0], _SCALE_USERS)]
        z = self._torch_sparse(sample).to(self.dtype)
        scale = float(torch.linalg.norm(z @ b) / torch.linalg.norm(z @ gf).clamp_min(1e-12))
        return gf.mul_(h.gf_mix * scale).add_(b).numpy()


def _zero_diagonal(inverse: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Project a ridge solution onto zero diagonal via the EASE Lagrangian, in place."""
    return b.addcmul_(inverse, (torch.diagonal(b) / torch.diagonal(inverse)).unsqueeze(0), value=-1)


def randomised_svd(
    a: torch.Tensor, rank: int, iters: int = _POWER_ITERS, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` (U, sigma, V) of a dense matrix by subspace iteration (Halko et al. 2011).

    Written out because torch.svd_lowrank was measured ~80x slower than its own matmuls here.
    """
    n = a.shape[1]
    width = min(rank + _OVERSAMPLE, n)
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(a @ torch.randn(n, width, generator=generator, dtype=a.dtype))
    for _ in range(iters):
        basis, _ = torch.linalg.qr(a.t() @ basis)
        basis, _ = torch.linalg.qr(a @ basis)
    u_small, sigma, vh = torch.linalg.svd(basis.t() @ a, full_matrices=False)
    return (basis @ u_small)[:, :rank], sigma[:rank], vh[:rank].t()


def factorise(operator: np.ndarray, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rank-``dim`` factors (Q, V) with Q V^T ~= S; Q folds users in, V is the FAISS item side."""
    s = torch.from_numpy(np.asarray(operator, dtype=np.float32))
    dim = min(dim, s.shape[0])
    if dim >= s.shape[0] // 2:
        u, sigma, vh = torch.linalg.svd(s, full_matrices=False)
        v_mat = vh.t()
    else:
        u, sigma, v_mat = randomised_svd(s, dim, seed=seed)
    root = sigma[:dim].sqrt()
    q = (u[:, :dim] * root[None, :]).numpy()
    v = (v_mat[:, :dim] * root[None, :]).numpy()
    return np.ascontiguousarray(q), np.ascontiguousarray(v)
