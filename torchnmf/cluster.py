r"""Clustering of factorisation results: k-means, silhouette, local density.

Small, exact tools in torch that consensus NMF (:mod:`torchnmf.consensus`)
needs for a few hundred to a few thousand vectors (the components of many
restarts); no optional dependency.

- :func:`kmeans`: Lloyd's algorithm from k-means++ starts (Arthur &
  Vassilvitskii 2007), the best of ``n_init`` runs by inertia.
- :func:`silhouette_score`: the mean silhouette :math:`(b - a) / \max(a, b)`
  over all points (Rousseeuw 1987), Euclidean distances.
- :func:`local_density`: the mean distance of each point to its ``n_neighbors``
  nearest other points (cNMF's outlier statistic, Kotliar et al. 2019).
"""
import torch

from ._validation import check_finite_tensor, check_positive_int

__all__ = ["pairwise_distances", "kmeans", "silhouette_score", "local_density"]


def pairwise_distances(X):
    """Euclidean distances between the rows of ``X`` (``(m, d)`` -> ``(m, m)``), float64.

    Examples::

        >>> import torch
        >>> from torchnmf.cluster import pairwise_distances
        >>> X = torch.tensor([[0., 0.], [3., 4.], [0., 1.]])
        >>> pairwise_distances(X)
        tensor([[0.0000, 5.0000, 1.0000],
                [5.0000, 0.0000, 4.2426],
                [1.0000, 4.2426, 0.0000]], dtype=torch.float64)
    """
    X = X.to(torch.float64)
    return torch.cdist(X, X, compute_mode="donot_use_mm_for_euclid_dist")


def _plus_plus(X, k, generator):
    """k-means++ seeding: each next centre drawn with probability ~ squared distance."""
    m = X.shape[0]
    first = int(torch.randint(m, (1,), generator=generator))
    centres = [X[first]]
    nearest = ((X - X[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(nearest.sum())
        if total <= 0:
            choice = int(torch.randint(m, (1,), generator=generator))
        else:
            choice = int(torch.multinomial(nearest / total, 1, generator=generator))
        centres.append(X[choice])
        nearest = torch.minimum(nearest, ((X - X[choice]) ** 2).sum(1))
    return torch.stack(centres)


def _lloyd(X, centres, max_iter, tol):
    labels = None
    for _ in range(max_iter):
        distances = torch.cdist(X, centres) ** 2
        labels = distances.argmin(1)
        moved = centres.clone()
        for j in range(centres.shape[0]):
            members = X[labels == j]
            if members.shape[0]:
                moved[j] = members.mean(0)
        shift = float(((moved - centres) ** 2).sum())
        centres = moved
        if shift <= tol:
            break
    distances = torch.cdist(X, centres) ** 2
    labels = distances.argmin(1)
    inertia = float(distances.gather(1, labels.unsqueeze(1)).sum())
    return labels, centres, inertia


def kmeans(X, k, n_init=10, max_iter=300, tol=1e-10, generator=None):
    """k-means clustering of the rows of ``X``: the best of ``n_init`` runs.

    Args:
        X (Tensor): ``(m, d)`` points, ``m >= k``.
        k (int): the number of clusters.
        n_init (int): runs from different k-means++ starts; the lowest inertia wins.
        max_iter (int): Lloyd iterations per run.
        tol (float): a run stops once the centres move less than this (squared).
        generator (int or torch.Generator, optional): the random source.

    Returns:
        (labels, centres, inertia): ``(m,)`` int64 cluster of each point,
        ``(k, d)`` centres, and the sum of squared distances to them.

    Examples::

        >>> import torch
        >>> from torchnmf.cluster import kmeans
        >>> X = torch.tensor([[0., 0.], [0., 1.], [5., 5.], [5., 6.]])
        >>> labels, centres, inertia = kmeans(X, 2, generator=0)
        >>> labels
        tensor([0, 0, 1, 1])
        >>> centres
        tensor([[0.0000, 0.5000],
                [5.0000, 5.5000]], dtype=torch.float64)
        >>> round(float(inertia), 3)
        1.0
    """
    k = check_positive_int(k, "k")
    n_init = check_positive_int(n_init, "n_init")
    X = X.to(torch.float64)
    if X.dim() != 2 or X.shape[0] < k:
        raise ValueError(f"X must be (m, d) with at least k={k} rows, got shape {tuple(X.shape)}")
    check_finite_tensor(X, "X")  # (k-means++ drew from NaN weights: torch's multinomial error)
    if not isinstance(generator, torch.Generator):
        generator = torch.Generator().manual_seed(0 if generator is None else int(generator))
    best = None
    for _ in range(n_init):
        run = _lloyd(X, _plus_plus(X.cpu(), k, generator).to(X.device), max_iter, tol)
        if best is None or run[2] < best[2]:
            best = run
    return best


def silhouette_score(X, labels, distances=None):
    r"""The mean silhouette of a clustering of the rows of ``X`` (Euclidean).

    For point :math:`i` in cluster :math:`A`, :math:`a_i` is its mean distance
    to the other points of :math:`A`, :math:`b_i` the smallest mean distance
    to the points of another cluster, and :math:`s_i = (b_i - a_i)/\max(a_i, b_i)`
    (0 for a point alone in its cluster).  Needs at least two clusters.

    Examples::

        >>> import torch
        >>> from torchnmf.cluster import silhouette_score
        >>> X = torch.tensor([[0., 0.], [0., 1.], [5., 5.], [5., 6.]])
        >>> round(float(silhouette_score(X, torch.tensor([0, 0, 1, 1]))), 4)
        0.8586
    """
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != X.shape[0]:
        raise ValueError(
            f"labels must hold one cluster per row of X ({X.shape[0]}), got shape "
            f"{tuple(labels.shape)}"
        )
    distances = pairwise_distances(X) if distances is None else distances
    clusters = torch.unique(labels)
    if clusters.numel() < 2:
        raise ValueError(f"labels must name at least 2 clusters, got {clusters.numel()}")
    one_hot = (labels.unsqueeze(1) == clusters.unsqueeze(0)).to(torch.float64)  # (m, q)
    sizes = one_hot.sum(0)
    sums = distances @ one_hot  # (m, q): total distance to each cluster
    own = one_hot.argmax(1)
    own_size = sizes[own]
    a = sums.gather(1, own.unsqueeze(1)).squeeze(1) / (own_size - 1).clamp_min(1)
    means = sums / sizes
    means.scatter_(1, own.unsqueeze(1), float("inf"))
    b = means.min(1).values
    s = (b - a) / torch.maximum(a, b).clamp_min(torch.finfo(torch.float64).tiny)
    s = torch.where(own_size > 1, s, torch.zeros_like(s))
    return float(s.mean())


def local_density(X, n_neighbors, distances=None):
    """The mean distance from each row of ``X`` to its ``n_neighbors`` nearest other rows.

    Examples::

        >>> import torch
        >>> from torchnmf.cluster import local_density
        >>> X = torch.tensor([[0.], [1.], [3.], [10.]])
        >>> local_density(X, 1)
        tensor([1., 1., 2., 7.], dtype=torch.float64)
    """
    n_neighbors = check_positive_int(n_neighbors, "n_neighbors")
    distances = pairwise_distances(X) if distances is None else distances
    m = distances.shape[0]
    if n_neighbors >= m:
        raise ValueError(f"n_neighbors must be below the number of points {m}, got {n_neighbors}")
    nearest = distances.topk(n_neighbors + 1, dim=1, largest=False).values[:, 1:]
    return nearest.mean(1)
