"""Capability groups: spectral clustering on a sparse k-nearest-neighbour graph (bounded memory).

PASER's code builds a dense ``N x N`` Gaussian affinity (sigma = median pairwise distance), the random-walk
Laplacian ``I - D^-1 A``, its 10 smallest eigenvectors (``eigsh``), then NMF of the dense ``|U U^T|`` and an
argmax. Every step is ``N x N``: 50,000 samples would need 20 GB per matrix. Here:

1. :func:`knn_graph`: the exact ``k`` nearest neighbours of every point by blocked matrix products in torch
   (``block x N`` distances at a time, about 64 MB), never an ``N x N`` matrix.
2. Gaussian affinity on those edges with sigma = the median kNN distance (the paper's rule restricted to the
   edges that exist), symmetrised as ``max(W, W^T)``.
3. The random-walk Laplacian's eigenvectors for its ``C`` smallest eigenvalues, computed as ``D^-1/2 v`` from
   the ``C`` largest eigenvectors ``v`` of the symmetric ``D^-1/2 W D^-1/2`` (same eigenvalues ``1 - lambda``;
   ``eigsh`` needs a symmetric matrix, which ``I - D^-1 A`` is not, and the largest end converges much faster
   than ``which="SM"``). Sparse ``eigsh`` with a seeded start vector; below 2,000 points a dense ``eigh``.
4. k-means (scikit-learn, seeded, 10 restarts) on those ``N x C`` coordinates, instead of the paper's NMF of
   ``|U U^T|``: that factorises an ``N x N`` matrix, whereas k-means on the spectral embedding is the standard
   scalable spectral clustering (Shi and Malik's normalised cut with the random-walk Laplacian) and costs
   ``O(N C^2)`` per iteration.
"""

from __future__ import annotations

import numpy as np
import torch

DENSE_BELOW = 2000


def knn_graph(x, k: int, block_bytes: int = 64 * 2**20) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``k`` nearest neighbours (squared Euclidean, self excluded) of every row of ``x`` ``[N, d]``.

    Returns ``(indices [N, k] int64, squared distances [N, k] float32)``, nearest first (ties: lower index).
    Memory: one ``block x N`` float32 distance block, ``block = block_bytes / (4 N)`` rows."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, N-1] = [1, {n - 1}], got {k}.")
    sq = (x * x).sum(1)
    block = max(1, min(n, block_bytes // (4 * n)))
    indices = np.empty((n, k), dtype=np.int64)
    dists = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, block):
        rows = slice(start, min(start + block, n))
        d2 = (sq[rows, None] + sq[None, :] - 2 * x[rows] @ x.T).clamp_(min=0)  # [block, N]
        d2[torch.arange(d2.shape[0]), torch.arange(rows.start, rows.stop)] = float("inf")
        # stable sort on (distance, index): topk's order among equal distances is unspecified
        vals, idx = torch.topk(d2, k + 1, dim=1, largest=False, sorted=True)
        kth = vals[:, k - 1:k]
        if bool((vals[:, k:k + 1] == kth).any()):  # a tie at the boundary: resolve it by index, exactly
            for r in torch.nonzero((vals[:, k] == vals[:, k - 1])).flatten().tolist():
                order = np.lexsort((np.arange(n), d2[r].numpy()))[:k]
                idx[r, :k], vals[r, :k] = torch.from_numpy(order), d2[r, order]
        indices[rows], dists[rows] = idx[:, :k].numpy(), vals[:, :k].numpy()
    return indices, dists


def affinity(indices: np.ndarray, sq_dists: np.ndarray):
    """Sparse symmetric Gaussian affinity ``[N, N]`` (scipy CSR) on the kNN edges: ``exp(-d^2 / (2 sigma^2))``,
    sigma = median kNN distance, symmetrised as ``max(W, W^T)``."""
    from scipy import sparse

    n, k = indices.shape
    sigma = float(np.median(np.sqrt(sq_dists)))
    if sigma <= 0:  # more than half the neighbours are duplicates: any positive scale keeps them at weight 1
        sigma = float(np.sqrt(sq_dists).max()) or 1.0
    weights = np.exp(-sq_dists.astype(np.float64) / (2 * sigma * sigma))
    w = sparse.csr_matrix((weights.ravel(), (np.repeat(np.arange(n), k), indices.ravel())), shape=(n, n))
    return w.maximum(w.T).tocsr()


def spectral_embedding(w, dims: int, seed: int = 0) -> np.ndarray:
    """``[N, dims]`` eigenvectors of the random-walk Laplacian ``I - D^-1 W`` for its ``dims`` smallest
    eigenvalues (see the module docstring)."""
    from scipy import sparse

    n = w.shape[0]
    degree = np.asarray(w.sum(axis=1)).ravel()
    inv_sqrt = 1.0 / np.sqrt(np.maximum(degree, 1e-300))
    s = sparse.diags(inv_sqrt) @ w @ sparse.diags(inv_sqrt)
    if n < DENSE_BELOW:
        _, vectors = np.linalg.eigh(s.toarray())
        vectors = vectors[:, -dims:]
    else:
        from scipy.sparse.linalg import eigsh

        v0 = np.random.default_rng(seed).standard_normal(n)
        _, vectors = eigsh(s, k=dims, which="LA", v0=v0)
    return vectors * inv_sqrt[:, None]


def spectral_clusters(embeddings, n_clusters: int = 10, neighbors: int = 15, seed: int = 0) -> np.ndarray:
    """Cluster label in ``[0, C)`` of every row of ``embeddings`` ``[N, d]`` (C = min(n_clusters, N)), int64.

    Deterministic for a given ``seed``. Labels are renumbered by first appearance (sample 0 is in cluster 0)."""
    from sklearn.cluster import KMeans

    x = np.asarray(embeddings, dtype=np.float32)
    n = x.shape[0]
    c = min(n_clusters, n)
    if c == n:
        return np.arange(n, dtype=np.int64)
    if c == 1:
        return np.zeros(n, dtype=np.int64)
    indices, sq = knn_graph(x, min(neighbors, n - 1))
    coords = spectral_embedding(affinity(indices, sq), c, seed)
    labels = KMeans(n_clusters=c, n_init=10, random_state=seed).fit_predict(coords)
    _, first = np.unique(labels, return_index=True)
    rename = np.empty(labels.max() + 1, dtype=np.int64)
    rename[labels[np.sort(first)]] = np.arange(len(first))
    return rename[labels]
