r"""Choosing the rank: held-out error by cross-validation, and the stability statistics per rank.

Two cross-validations, both on batched restarts (:mod:`torchnmf.restarts`):

- **Held-out entries** (Wold 1978), :func:`cross_validate`: the entries of
  ``V`` are split at random into ``n_folds`` folds; each fold in turn is
  hidden with a mask, the restarts fit the observed rest, and the best member
  of each rank (lowest training objective) is scored on the hidden entries.
- **Bi-cross-validation** (Owen & Perry, Ann. Appl. Stat. 3:564, 2009,
  doi:10.1214/08-AOAS227), :func:`bi_cross_validate`: rows and columns are
  split into groups; for each block :math:`A = V_{IJ}` held out, with
  :math:`V = \begin{pmatrix} A & B \\ C & D \end{pmatrix}`, the restarts fit
  :math:`D \approx H_D W_D^\top`, then :math:`B \approx H_I W_D^\top` gives
  the held-out rows' activations and :math:`C \approx H_D W_J^\top` the
  held-out columns' templates (non-negative fits with the other factor fixed),
  and :math:`A` is predicted by :math:`H_I W_J^\top`.

The held-out error is the beta-divergence per held-out entry, averaged over
the folds.  **Rule**: the suggested rank is the smallest rank whose mean
held-out error is within one standard error (over the folds) of the smallest
mean (the one-standard-error rule; Hastie, Tibshirani & Friedman,
*Elements of Statistical Learning*, 7.10).

:func:`rank_table` gathers, per rank, the best training objective, the
held-out error, cNMF's stability and prediction error
(:mod:`torchnmf.consensus`) and Brunet's cophenetic correlation and Kim &
Park's dispersion; :func:`torchnmf.plot.plot_rank_selection` draws it.
"""
import math
import warnings
from dataclasses import dataclass, field

import torch

from ._validation import ConvergenceWarning, check_positive_int, check_seed
from .restarts import check_ranks, fit_restarts, prepare_matrix
from .targets import statistics
from .targets.prepare import prepare_target
from .targets.residual import data_divergence

__all__ = [
    "CrossValidation",
    "cross_validate",
    "bi_cross_validate",
    "suggest_rank",
    "rank_table",
    "RankTable",
]

RULE = (
    "the smallest rank whose mean held-out error is within one standard error (over "
    "the folds) of the lowest mean"
)


@dataclass
class CrossValidation:
    """Held-out error per rank and fold, and the rank it suggests.

    Attributes:
        ranks (list of int): the ranks tried.
        errors (Tensor): ``(n_folds, len(ranks))`` held-out divergence per entry.
        method (str): ``"entries"`` (Wold) or ``"bi"`` (Owen & Perry).
        rule (str): how :attr:`suggested` was chosen.

    Examples::

        >>> import torch
        >>> from torchnmf.selection import CrossValidation
        >>> cv = CrossValidation([1, 2, 3], torch.tensor([[3.0, 1.00, 0.95], [3.2, 1.02, 1.03]]), "entries")
        >>> cv.mean
        tensor([3.1000, 1.0100, 0.9900])
        >>> cv.suggested
        2
    """

    ranks: list
    errors: torch.Tensor
    method: str
    rule: str = RULE

    @property
    def mean(self):
        return self.errors.mean(0)

    @property
    def standard_error(self):
        folds = self.errors.shape[0]
        if folds < 2:
            return torch.zeros(len(self.ranks), dtype=torch.float64)
        return self.errors.std(0) / math.sqrt(folds)

    @property
    def suggested(self):
        return suggest_rank(self.ranks, self.errors)


def suggest_rank(ranks, errors):
    """The one-standard-error rule over ``errors`` ``(n_folds, len(ranks))``.

    Examples::

        >>> import torch
        >>> from torchnmf.selection import suggest_rank
        >>> errors = torch.tensor([[3.0, 1.00, 0.95],   # fold 1: ranks 1, 2, 3
        ...                        [3.2, 1.02, 1.03]])  # fold 2
        >>> suggest_rank([1, 2, 3], errors)
        2
    """
    ranks = list(ranks)
    errors = torch.as_tensor(errors, dtype=torch.float64)
    if errors.dim() == 1:  # one fold
        errors = errors.unsqueeze(0)
    if not ranks or errors.dim() != 2 or errors.shape[1] != len(ranks) or not errors.shape[0]:
        raise ValueError(
            f"errors must be (n_folds, len(ranks)) = (n_folds, {len(ranks)}) with at least one "
            f"rank and fold, got shape {tuple(errors.shape)}"
        )
    if not bool(torch.isfinite(errors).all()):
        raise ValueError("errors must be finite; a NaN or infinite error has no rank to suggest")
    mean = errors.mean(0)
    se = errors.std(0) / math.sqrt(errors.shape[0]) if errors.shape[0] > 1 else torch.zeros_like(mean)
    best = int(mean.argmin())
    limit = float(mean[best] + se[best])
    for i, rank in sorted(enumerate(ranks), key=lambda pair: pair[1]):
        if float(mean[i]) <= limit:
            return rank
    return ranks[best]


def _heldout_error(V, H, W, beta, heldout):
    """The divergence per entry over the ``heldout`` entries (a boolean mask), taken
    as the fits take theirs (:func:`~torchnmf.targets.residual.data_divergence`)."""
    V_h, mask_h = prepare_target(V, heldout)
    total = data_divergence(statistics(V_h, beta, mask_h), H.to(V_h.dtype), W.to(V_h.dtype),
                            beta, V_h.dtype)
    return total / max(int(heldout.sum()), 1)


def _quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return function(*args, **kwargs)


def _entry_folds(observed, n_folds, generator):
    """A random fold (0 .. n_folds - 1) for every observed entry, every fold the same
    size (+-1), except -1 for a random observed entry of every row and column: those
    train in every fold, so that no fold hides a whole row or column (before, a fold
    of 5 x 1000 data hid all five entries of some column, and the fits refused the
    "mask" the caller never gave)."""
    N, C = observed.shape
    observed = observed.cpu()
    scores = torch.rand(N, C, generator=generator, dtype=torch.float64).masked_fill_(~observed, -1)
    kept = torch.zeros(N, C, dtype=torch.bool)
    kept[torch.arange(N), scores.argmax(1)] = True
    kept[scores.argmax(0), torch.arange(C)] = True
    free = (observed & ~kept).flatten().nonzero().squeeze(1)
    order = torch.randperm(free.numel(), generator=generator)
    folds = torch.full((N * C,), -1, dtype=torch.int64)
    folds[free[order]] = torch.arange(free.numel()) % n_folds
    return folds.view(N, C)


def cross_validate(V, ranks, n_folds=5, n_restarts=4, beta=2, tol=1e-4, max_iter=300, *,
                   solver="mu", seed=0, mask=None, missing="error"):
    """Wold-style cross-validation of the rank by held-out entries.

    Args:
        V (Tensor): the ``(N, C)`` target, dense or sparse.
        ranks (sequence of int): the ranks to try.
        n_folds (int): the folds; each hides ``1 / n_folds`` of the entries, never a
            whole row or column (a random entry of each trains in every fold).
        n_restarts (int): restarts per rank and fold; the best by training
            objective is scored.
        beta, tol, max_iter, solver: as in :func:`~torchnmf.restarts.fit_restarts`.
        seed (int): the folds and the restarts' starts.
        mask (Tensor, optional): entries that are missing anyway (never
            trained on, never scored).
        missing (str): ``"error"`` (default) or ``"mask"``: NaN entries of ``V``
            are missing ones too, as in :func:`~torchnmf.restarts.fit_restarts`.

    Returns:
        CrossValidation

    Examples::

        >>> import torch
        >>> from torchnmf.selection import cross_validate
        >>> g = torch.Generator().manual_seed(0)
        >>> V = torch.rand(20, 2, generator=g) @ torch.rand(2, 15, generator=g)
        >>> cv = cross_validate(V, [1, 2, 3], n_folds=3, n_restarts=2, max_iter=100)
        >>> cv.errors.shape, cv.method
        (torch.Size([3, 3]), 'entries')
        >>> cv.suggested
        2
    """
    ranks = check_ranks(ranks)
    n_folds = check_positive_int(n_folds, "n_folds")
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    V, mask = prepare_matrix(V, mask, missing)
    if n_folds > V.shape[0] * V.shape[1]:
        raise ValueError(
            f"n_folds must be at most the number of entries of V ({V.shape[0] * V.shape[1]}): "
            f"every fold holds out at least one, got {n_folds}"
        )
    seed = check_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    observed = torch.ones(V.shape, dtype=torch.bool, device=V.device) if mask is None else mask
    folds = _entry_folds(observed, n_folds, generator).to(V.device)
    free = int((folds >= 0).sum())
    if n_folds > free:
        raise ValueError(
            f"n_folds must be at most the number of entries of V that can be held out ({free}: "
            f"every row and column keeps an observed entry in every fold), got {n_folds}"
        )
    errors = torch.zeros(n_folds, len(ranks), dtype=torch.float64)
    for fold in range(n_folds):
        heldout = (folds == fold) & observed
        train = observed & ~heldout
        result = _quiet(fit_restarts, V, ranks, n_restarts, beta, tol, max_iter, solver=solver,
                        mask=train, seed=seed + 1000 * fold)
        for j, rank in enumerate(ranks):
            best = result.best(rank)
            errors[fold, j] = _heldout_error(V, result.H[best], result.W[best], beta, heldout)
    return CrossValidation(ranks, errors, "entries")


def _groups(size, parts, generator):
    order = torch.randperm(size, generator=generator)
    return [order[i::parts].sort().values for i in range(parts)]


def _submatrix(V, rows, columns):
    if V.layout == torch.strided:
        return V.index_select(0, rows).index_select(1, columns)
    return V.index_select(0, rows).index_select(1, columns).coalesce()


def _complement(index, size):
    keep = torch.ones(size, dtype=torch.bool)
    keep[index] = False
    return torch.arange(size)[keep]


def bi_cross_validate(V, ranks, row_folds=2, column_folds=2, n_restarts=4, beta=2, tol=1e-4,
                      max_iter=300, *, solver="mu", seed=0):
    """Owen & Perry's bi-cross-validation of the rank, every block held out in turn.

    Args:
        V (Tensor): the ``(N, C)`` target, dense or sparse.
        ranks (sequence of int): the ranks to try, each at most the smaller side of
            the held-in block ``D`` (the rows and columns outside one fold's groups).
        row_folds, column_folds (int): the groups of rows and of columns; each
            of their ``row_folds * column_folds`` blocks is one fold.
        n_restarts, beta, tol, max_iter, solver, seed: as in :func:`cross_validate`.

    Returns:
        CrossValidation

    Examples::

        >>> import torch
        >>> from torchnmf.selection import bi_cross_validate
        >>> g = torch.Generator().manual_seed(0)
        >>> V = torch.rand(20, 2, generator=g) @ torch.rand(2, 15, generator=g)
        >>> cv = bi_cross_validate(V, [1, 2, 3], row_folds=2, column_folds=2, n_restarts=2, max_iter=100)
        >>> cv.errors.shape, cv.method
        (torch.Size([4, 3]), 'bi')
    """
    from .nmf import NMF

    ranks = check_ranks(ranks)
    for value, name in ((row_folds, "row_folds"), (column_folds, "column_folds")):
        if check_positive_int(value, name) < 2:
            raise ValueError(f"{name} must be at least 2, got {value}")
    V, _ = prepare_matrix(V)
    N, C = V.shape
    for folds, size, name, axis in ((row_folds, N, "row_folds", "rows"),
                                    (column_folds, C, "column_folds", "columns")):
        if folds > size:
            raise ValueError(f"{name} must be at most the number of {axis} of V ({size}), got {folds}")
    # the smallest D: all rows but a largest group's, all columns but a largest group's
    smallest = min(N - -(-N // row_folds), C - -(-C // column_folds))
    if max(ranks) > smallest:
        raise ValueError(
            f"ranks must be at most the smaller side of the smallest held-in block D "
            f"({smallest} for V of shape {tuple(V.shape)} with {row_folds} x {column_folds} "
            f"folds), got {max(ranks)}"
        )
    seed = check_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    row_groups, column_groups = _groups(N, row_folds, generator), _groups(C, column_folds, generator)
    errors = torch.zeros(row_folds * column_folds, len(ranks), dtype=torch.float64)
    device = V.device
    fold = 0
    for rows in row_groups:
        other_rows = _complement(rows, N)
        for columns in column_groups:
            other_columns = _complement(columns, C)
            r, c, orow, ocol = (t.to(device) for t in (rows, columns, other_rows, other_columns))
            A = _submatrix(V, r, c)
            B = _submatrix(V, r, ocol)
            C_block = _submatrix(V, orow, c)
            D = _submatrix(V, orow, ocol)
            result = _quiet(fit_restarts, D, ranks, n_restarts, beta, tol, max_iter,
                            solver=solver, seed=seed + 1000 * fold)
            for j, rank in enumerate(ranks):
                best = result.best(rank)
                W_D, H_D = result.W[best], result.H[best]
                H_I = _quiet(NMF(W=W_D, trainable_W=False).transform, B, beta=beta, tol=tol,
                             max_iter=max_iter, generator=torch.Generator(device=device).manual_seed(seed))
                B_T = C_block.T if C_block.layout == torch.strided else C_block.t().coalesce()
                W_J = _quiet(NMF(W=H_D, trainable_W=False).transform, B_T, beta=beta, tol=tol,
                             max_iter=max_iter, generator=torch.Generator(device=device).manual_seed(seed))
                everything = torch.ones(A.shape, dtype=torch.bool, device=device)
                errors[fold, j] = _heldout_error(A, H_I, W_J, beta, everything)
            fold += 1
    return CrossValidation(ranks, errors, "bi")


@dataclass
class RankTable:
    """Statistics per rank (see :func:`rank_table`); ``rows`` holds one dict per rank.

    Examples::

        >>> import torch
        >>> from torchnmf.selection import rank_table
        >>> g = torch.Generator().manual_seed(0)
        >>> V = torch.rand(20, 2, generator=g) @ torch.rand(2, 15, generator=g)
        >>> table = rank_table(V, [1, 2], n_restarts=4, max_iter=100, cv_restarts=2)
        >>> len(table.rows), table.cross_validation.method
        (2, 'entries')
        >>> print(table.format().splitlines()[0])
        rank          loss    held-out  stability   pred. error  cophenetic  dispersion
    """

    rows: list
    suggested: int
    rule: str
    cross_validation: CrossValidation = None
    restarts: object = None
    extra: dict = field(default_factory=dict)

    def format(self):
        """The table as text, one line per rank."""
        header = f"{'rank':>4}  {'loss':>12}  {'held-out':>10}  {'stability':>9}  " \
                 f"{'pred. error':>12}  {'cophenetic':>10}  {'dispersion':>10}"
        lines = [header]
        for row in self.rows:
            lines.append(
                f"{row['rank']:>4}  {row['loss']:>12.6g}  {row['heldout']:>10.6g}  "
                f"{row['stability']:>9.4f}  {row['prediction_error']:>12.6g}  "
                f"{row['cophenetic']:>10.4f}  {row['dispersion']:>10.4f}"
            )
        return "\n".join(lines)


def rank_table(V, ranks, n_restarts=20, beta=2, tol=1e-4, max_iter=300, *, solver="mu",
               seed=0, n_folds=3, cv_restarts=None, method="entries", density_threshold=2.0,
               verbose=False):
    """Every statistic per rank that helps choose it, from one batched run per rank.

    For each rank: ``loss`` (the best restart's final objective), ``heldout``
    (the cross-validated error, ``method`` ``"entries"`` or ``"bi"``),
    ``stability`` and ``prediction_error`` (consensus NMF, keeping every
    spectrum with the default ``density_threshold=2.0``, as cNMF does to
    choose ``k``), ``cophenetic`` and ``dispersion`` (of the consensus matrix
    of the restarts).  The suggested rank follows the held-out error (see
    :data:`RULE`).

    Returns:
        RankTable

    Examples::

        >>> import torch
        >>> from torchnmf.selection import rank_table
        >>> g = torch.Generator().manual_seed(0)
        >>> V = torch.rand(20, 2, generator=g) @ torch.rand(2, 15, generator=g)
        >>> table = rank_table(V, [1, 2, 3], n_restarts=4, max_iter=100, cv_restarts=2)
        >>> [row["rank"] for row in table.rows], table.suggested
        ([1, 2, 3], 2)
        >>> sorted(table.rows[0])
        ['cophenetic', 'dispersion', 'heldout', 'heldout_se', 'loss', 'prediction_error', 'rank', 'stability']
    """
    from .consensus import consensus_from_restarts, consensus_matrix, cophenetic_correlation, dispersion

    ranks = check_ranks(ranks)
    n_restarts = check_positive_int(n_restarts, "n_restarts")
    if method not in ("entries", "bi"):
        raise ValueError(f"method must be one of ['entries', 'bi'], got {method!r}")
    V, _ = prepare_matrix(V)
    restarts = _quiet(fit_restarts, V, ranks, n_restarts, beta, tol, max_iter, solver=solver,
                      seed=seed, verbose=verbose)
    cv_restarts = cv_restarts or max(1, min(n_restarts, 4))
    if method == "entries":
        cv = cross_validate(V, ranks, n_folds, cv_restarts, beta, tol, max_iter, solver=solver, seed=seed)
    else:
        cv = bi_cross_validate(V, ranks, n_restarts=cv_restarts, beta=beta, tol=tol,
                               max_iter=max_iter, solver=solver, seed=seed)
    rows = []
    for j, rank in enumerate(ranks):
        members = restarts.members(rank)
        row = dict(rank=rank, loss=float(restarts.losses[members].min()),
                   heldout=float(cv.mean[j]), heldout_se=float(cv.standard_error[j]))
        if n_restarts > 1:
            consensus = consensus_from_restarts(V, restarts, rank, density_threshold=density_threshold,
                                                seed=seed)
            row.update(stability=consensus.stability, prediction_error=consensus.prediction_error)
        else:
            row.update(stability=float("nan"), prediction_error=float("nan"))
        connectivity = consensus_matrix([restarts.H[i] for i in members])
        row.update(cophenetic=_cophenetic_or_nan(cophenetic_correlation, connectivity),
                   dispersion=dispersion(connectivity))
        rows.append(row)
    return RankTable(rows, cv.suggested, RULE, cv, restarts)


def _cophenetic_or_nan(function, connectivity):
    try:
        return function(connectivity)
    except ImportError:
        return float("nan")
