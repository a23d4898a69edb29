r"""Consensus of many factorisations: cNMF's consensus programs and the connectivity statistics.

**Consensus NMF** (Kotliar et al., eLife 8:e43803, 2019, doi:10.7554/eLife.43803),
:func:`consensus_nmf`: the components (columns of ``W``, "spectra") of many
restarts at rank ``k`` are

1. scaled to unit L2 norm,
2. filtered: a spectrum whose mean distance to its ``L`` nearest neighbours
   (``L = local_neighborhood_size * n_restarts``) exceeds
   ``density_threshold`` is an outlier and dropped,
3. clustered by k-means into ``k`` clusters,
4. summarised by the median of each cluster (then scaled to sum to one): the
   consensus ``W``;
5. the usage ``H`` is refitted with the consensus ``W`` held fixed.

Its statistics per ``k``: the **stability**, the silhouette of the k-means
clustering (Euclidean, on the normalised spectra), and the **prediction
error**, the divergence between ``V`` and the refitted :math:`H W^\top` (the
fit's own beta; for beta=2 half the squared Frobenius error cNMF reports).

**Connectivity** (Brunet et al., PNAS 101:4164, 2004, doi:10.1073/pnas.0308531101):
each restart assigns row ``i`` of ``V`` (a sample) to its largest component,
:math:`\arg\max_r H_{ir}`; the consensus matrix :math:`\bar C_{ij}` is the
share of restarts that put ``i`` and ``j`` together (:func:`consensus_matrix`).
:func:`cophenetic_correlation` is the Pearson correlation between
:math:`1 - \bar C` and the cophenetic distances of its average-linkage tree,
and :func:`dispersion` is Kim & Park's (Bioinformatics 23:1495, 2007)
:math:`\frac{1}{n^2}\sum_{ij} 4 (\bar C_{ij} - \tfrac12)^2`; both are 1 for a
perfectly stable clustering.
"""
from dataclasses import dataclass

import torch

from .cluster import kmeans, local_density, pairwise_distances, silhouette_score
from .restarts import Restarts, fit_restarts, prepare_matrix
from ._validation import (
    check_finite_tensor, check_fraction, check_non_negative_number, check_positive_int,
    check_real_tensor, check_seed,
)
from .targets import statistics
from .targets.prepare import prepare_target
from .targets.residual import data_divergence

__all__ = [
    "Consensus",
    "consensus_nmf",
    "consensus_from_restarts",
    "consensus_matrix",
    "cophenetic_correlation",
    "dispersion",
]


# -- connectivity (Brunet et al. 2004; Kim & Park 2007) ---------------------------------
def consensus_matrix(H):
    r"""The consensus (mean connectivity) matrix of several factorisations' activations.

    Args:
        H (sequence of Tensor or Tensor): each restart's ``(N, R)`` activations
            (ranks may differ), or a stack ``(K, N, R)``.

    Returns:
        Tensor: ``(N, N)`` float64, entry ``(i, j)`` the share of restarts in
        which rows ``i`` and ``j`` have the same largest component.

    Examples::

        >>> import torch
        >>> from torchnmf.consensus import consensus_matrix
        >>> H = [torch.tensor([[1., 0.], [0.9, 0.1], [0., 1.], [0.2, 0.8]]),
        ...      torch.tensor([[0., 1.], [0.1, 0.9], [1., 0.], [0.7, 0.3]]),
        ...      torch.tensor([[1., 0.], [0., 1.], [0., 1.], [1., 0.]])]
        >>> consensus_matrix(H)
        tensor([[1.0000, 0.6667, 0.0000, 0.3333],
                [0.6667, 1.0000, 0.3333, 0.0000],
                [0.0000, 0.3333, 1.0000, 0.6667],
                [0.3333, 0.0000, 0.6667, 1.0000]], dtype=torch.float64)
    """
    if isinstance(H, torch.Tensor) and H.dim() != 3:
        raise ValueError(
            f"H must be a (K, N, R) stack or a sequence of (N, R) activations, got a tensor "
            f"of shape {tuple(H.shape)}"
        )
    runs = list(H.unbind(0)) if isinstance(H, torch.Tensor) else list(H)
    if not runs:
        raise ValueError("H must hold at least one factorisation, got none")
    for k, activations in enumerate(runs):
        if not isinstance(activations, torch.Tensor):
            raise TypeError(f"H[{k}] must be a tensor, got {type(activations).__name__}")
        if activations.dim() != 2 or activations.shape[0] != runs[0].shape[0]:
            raise ValueError(
                f"H must hold (N, R) activations with the same N, or be a (K, N, R) stack; "
                f"H[{k}] has shape {tuple(activations.shape)}"
                + ("" if k == 0 else f", H[0] {tuple(runs[0].shape)}")
            )
        # before: NaN activations (a failed fit) put every row with every other
        check_finite_tensor(activations.detach(), f"H[{k}]")
    total = None
    for activations in runs:
        labels = activations.detach().argmax(-1)
        together = (labels.unsqueeze(0) == labels.unsqueeze(1)).to(torch.float64)
        total = together if total is None else total + together
    return total / len(runs)


def _check_consensus(consensus):
    """A consensus matrix as float64: a dense square tensor of shares in [0, 1] (before,
    a numpy array failed on ``.to``, a (3, 5) tensor or entries of 5 gave numbers)."""
    check_real_tensor(consensus, "consensus")
    if consensus.layout != torch.strided:
        raise TypeError(f"consensus must be a dense tensor, got layout {consensus.layout}; "
                        f"use consensus.to_dense()")
    if consensus.dim() != 2 or consensus.shape[0] != consensus.shape[1]:
        raise ValueError(f"consensus must be a square (N, N) matrix, got shape {tuple(consensus.shape)}")
    consensus = consensus.detach().to(torch.float64)
    if consensus.numel() and not bool(((consensus >= 0) & (consensus <= 1)).all()):  # NaN too
        low, high = torch.aminmax(consensus)
        raise ValueError(f"consensus must hold shares in [0, 1] (see consensus_matrix), got "
                         f"entries from {float(low):g} to {float(high):g}")
    return consensus


def dispersion(consensus):
    r"""Kim & Park's dispersion :math:`\frac{1}{n^2}\sum_{ij} 4 (\bar C_{ij} - 1/2)^2`, in [0, 1].

    Examples::

        >>> import torch
        >>> from torchnmf.consensus import dispersion
        >>> round(float(dispersion(torch.eye(4))), 4)
        1.0
        >>> C = torch.tensor([[1., 2 / 3, 0., 1 / 3], [2 / 3, 1., 1 / 3, 0.],
        ...                   [0., 1 / 3, 1., 2 / 3], [1 / 3, 0., 2 / 3, 1.]])
        >>> round(float(dispersion(C)), 4)
        0.5556
    """
    consensus = _check_consensus(consensus)
    return float((4 * (consensus - 0.5) ** 2).mean())


def cophenetic_correlation(consensus):
    r"""Brunet et al.'s cophenetic correlation of a consensus matrix, in [-1, 1].

    The Pearson correlation, over pairs :math:`i < j`, between the distances
    :math:`1 - \bar C_{ij}` and the heights at which average linkage first
    joins ``i`` and ``j``.  Needs SciPy (``pip install 'torchnmf[sklearn]'``).
    A matrix whose distances are all equal has no spread to correlate and
    gives 1 (a perfectly stable, trivial clustering).

    Examples::

        >>> import torch
        >>> from torchnmf.consensus import cophenetic_correlation
        >>> C = torch.tensor([[1., 2 / 3, 0., 1 / 3], [2 / 3, 1., 1 / 3, 0.],
        ...                   [0., 1 / 3, 1., 2 / 3], [1 / 3, 0., 2 / 3, 1.]])
        >>> round(float(cophenetic_correlation(C)), 4)
        0.866
    """
    import numpy as np
    from scipy.cluster.hierarchy import cophenet, linkage

    distances = 1 - _check_consensus(consensus).cpu().numpy()
    n = distances.shape[0]
    upper = distances[np.triu_indices(n, k=1)]
    if upper.size == 0 or np.ptp(upper) == 0:
        return 1.0
    tree = linkage(upper.clip(min=0), method="average")
    heights = cophenet(tree)
    return float(np.corrcoef(upper, heights)[0, 1])


# -- consensus NMF (Kotliar et al. 2019) ---------------------------------------------------
@dataclass
class Consensus:
    """The consensus factorisation at one rank, and its statistics.

    Attributes:
        W (Tensor): ``(C, k)`` consensus templates, each column summing to one.
        H (Tensor): ``(N, k)`` usage refitted with ``W`` fixed.
        stability (float): silhouette of the clustering of the kept spectra.
        prediction_error (float): the divergence between ``V`` (observed
            entries) and ``H @ W.T``.
        spectra (Tensor): ``(m, C)`` every restart's components, unit L2 norm.
        density (Tensor): ``(m,)`` their local density.
        kept (Tensor): ``(m,)`` bool, the spectra under the density threshold.
        labels (Tensor): ``(m,)`` the cluster of each spectrum (-1 when dropped).

    Examples::

        >>> import torch
        >>> from torchnmf.restarts import fit_restarts
        >>> from torchnmf.consensus import consensus_from_restarts
        >>> g = torch.Generator().manual_seed(0)
        >>> V = torch.rand(12, 3, generator=g) @ torch.rand(3, 10, generator=g)
        >>> c = consensus_from_restarts(V, fit_restarts(V, 3, n_restarts=4, beta=2, max_iter=50), 3)
        >>> c.spectra.shape, c.density.shape, c.labels.shape
        (torch.Size([12, 10]), torch.Size([12]), torch.Size([12]))
        >>> -1 <= c.stability <= 1
        True
    """

    W: torch.Tensor
    H: torch.Tensor
    stability: float
    prediction_error: float
    spectra: torch.Tensor
    density: torch.Tensor
    kept: torch.Tensor
    labels: torch.Tensor

    def model(self):
        """An :class:`~torchnmf.nmf.NMF` with the consensus factors, ``W`` fixed."""
        from .nmf import NMF

        return NMF(W=self.W, H=self.H, trainable_W=False)


def _unit_spectra(restarts, rank):
    W, _ = restarts.stacked(rank)  # (K, C, k)
    spectra = W.mT.reshape(-1, W.shape[1]).to(torch.float64)  # (K k, C)
    norms = spectra.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return spectra / norms


def consensus_from_restarts(
    V,
    restarts,
    rank,
    *,
    density_threshold=0.5,
    local_neighborhood_size=0.3,
    n_init=10,
    seed=0,
    mask=None,
    refit_tol=1e-4,
    refit_max_iter=500,
):
    """Consensus NMF at ``rank`` from the members of a :class:`~torchnmf.restarts.Restarts`.

    Args:
        V (Tensor): the target the restarts fitted (dense or sparse).
        restarts (Restarts): the result of :func:`~torchnmf.restarts.fit_restarts`.
        rank (int): one of its ranks.
        density_threshold (float): spectra with a larger local density are
            dropped as outliers (cNMF's ``density_threshold``; its authors
            filter at about 0.1 once ``k`` is chosen, and keep all spectra
            (2.0) to choose it).
        local_neighborhood_size (float): the neighbours of the density, as a
            share of the restarts.
        n_init (int): k-means runs.
        seed (int): the random source of k-means and of the usage refit's start.
        mask (Tensor, optional): the observed entries of ``V``, as in the fits.
        refit_tol, refit_max_iter: the stopping rule of the usage refit.

    Returns:
        Consensus

    Examples::

        >>> import torch
        >>> from torchnmf.restarts import fit_restarts
        >>> from torchnmf.consensus import consensus_from_restarts
        >>> g = torch.Generator().manual_seed(0)
        >>> V = torch.rand(12, 3, generator=g) @ torch.rand(3, 10, generator=g)
        >>> result = fit_restarts(V, 3, n_restarts=4, beta=2, max_iter=50)
        >>> c = consensus_from_restarts(V, result, 3)
        >>> c.W.shape, c.H.shape
        (torch.Size([10, 3]), torch.Size([12, 3]))
        >>> c.W.sum(0).round(decimals=4).tolist()
        [1.0, 1.0, 1.0]
    """
    if not isinstance(restarts, Restarts):
        raise TypeError(f"restarts must be a Restarts result, got {type(restarts).__name__}")
    members = restarts.members(rank)
    density_threshold = check_non_negative_number(density_threshold, "density_threshold")
    local_neighborhood_size = check_fraction(local_neighborhood_size, "local_neighborhood_size")
    n_init = check_positive_int(n_init, "n_init")
    seed = check_seed(seed)
    spectra = _unit_spectra(restarts, rank)
    distances = pairwise_distances(spectra)
    neighbours = max(1, int(round(local_neighborhood_size * len(members))))
    neighbours = min(neighbours, spectra.shape[0] - 1)
    if neighbours >= 1:
        density = local_density(spectra, neighbours, distances)
    else:  # a single spectrum: nothing to compare it with
        density = torch.zeros(spectra.shape[0], dtype=torch.float64, device=spectra.device)
    kept = density <= density_threshold
    if int(kept.sum()) < rank:
        alone = (
            f"; with {len(members)} restart the neighbours of each spectrum are the other "
            f"components of the same fit, so give several restarts (cNMF's authors use hundreds)"
        ) if len(members) < 2 else ""
        raise ValueError(
            f"density_threshold={density_threshold:g} keeps {int(kept.sum())} spectra, fewer than "
            f"rank={rank}; raise density_threshold{alone}"
        )
    kept_spectra = spectra[kept]
    labels_kept, _, _ = kmeans(kept_spectra, rank, n_init=n_init, generator=seed)
    labels = torch.full((spectra.shape[0],), -1, dtype=torch.int64, device=spectra.device)
    labels[kept] = labels_kept
    if rank > 1 and torch.unique(labels_kept).numel() > 1:
        stability = silhouette_score(
            kept_spectra, labels_kept, distances[kept][:, kept]
        )
    else:
        stability = float("nan")
    medians = torch.stack([
        kept_spectra[labels_kept == j].median(0).values
        if bool((labels_kept == j).any()) else kept_spectra.mean(0)
        for j in range(rank)
    ])
    medians = medians / medians.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    W = medians.T.to(restarts.W[members[0]].dtype).contiguous()
    H, error = _refit_usage(V, W, restarts.beta, mask, refit_tol, refit_max_iter, seed)
    return Consensus(W, H, stability, error, spectra, density, kept, labels)


def _refit_usage(V, W, beta, mask, tol, max_iter, seed):
    """Usage with the consensus templates fixed, and the divergence it leaves."""
    import warnings

    from ._validation import ConvergenceWarning
    from .nmf import NMF

    model = NMF(W=W, trainable_W=False)
    generator = torch.Generator(device=W.device).manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        H = model.transform(V, beta=beta, tol=tol, max_iter=max_iter, mask=mask,
                            generator=generator)
    V_checked, mask_checked = prepare_target(V, mask)
    error = data_divergence(statistics(V_checked, beta, mask_checked), H, W.to(H.dtype), beta,
                            H.dtype)
    return H, error


def consensus_nmf(
    V,
    rank,
    n_restarts=50,
    beta=2,
    tol=1e-4,
    max_iter=400,
    *,
    solver="mu",
    mask=None,
    seed=0,
    density_threshold=0.5,
    local_neighborhood_size=0.3,
    n_init=10,
    verbose=False,
):
    """Consensus NMF (Kotliar et al. 2019): batched restarts at ``rank``, then their consensus.

    ``V`` is ``(N, C)`` with samples (cells) in rows; the consensus templates
    are columns of ``W`` (programs over the ``C`` features).  See
    :func:`consensus_from_restarts` for the remaining arguments.

    Returns:
        (Consensus, Restarts): the consensus and the restarts it came from.

    Examples::

        >>> import torch
        >>> from torchnmf.consensus import consensus_nmf
        >>> V = torch.rand(40, 3) @ torch.rand(3, 25)
        >>> result, runs = consensus_nmf(V, 3, n_restarts=6, max_iter=100)
        >>> result.W.shape, result.H.shape
        (torch.Size([25, 3]), torch.Size([40, 3]))
    """
    rank = check_positive_int(rank, "rank")
    restarts = fit_restarts(
        V, rank, n_restarts, beta, tol, max_iter, solver=solver, mask=mask, seed=seed,
        verbose=verbose,
    )
    V, mask = prepare_matrix(V, mask)
    result = consensus_from_restarts(
        V, restarts, rank, density_threshold=density_threshold,
        local_neighborhood_size=local_neighborhood_size, n_init=n_init, seed=seed, mask=mask,
    )
    return result, restarts
