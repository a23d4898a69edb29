r"""Many factorisations of one matrix at once: batched restarts over seeds and ranks.

NMF's answer depends on where it starts and on the rank, so a real analysis
runs many fits of the same :math:`V \approx H W^\top`.  :func:`fit_restarts`
runs them as one computation: the factors of ``K`` members are stacks
``H`` ``(K, N, R)`` and ``W`` ``(K, C, R)``, every statistic is a batched
matrix product over the stack (the target kinds of :mod:`torchnmf.targets`
take stacks as they are), and the solvers of :mod:`torchnmf.solvers` update
every member with the same mathematics as a single fit.  Each member stops on
its own tolerance and is then left out of the computation, so it ends exactly
where :meth:`torchnmf.nmf.NMF.fit` from the same start would (to rounding).

Several ranks are fitted one rank at a time, each as one batched computation
(grouped, the default), or, for the multiplicative solvers, all at once with
the smaller ranks padded with zero components (``rank_layout="padded"``),
which does more arithmetic but saves the fixed cost of every batch.

Examples::

    >>> import torch
    >>> from torchnmf.restarts import fit_restarts
    >>> V = torch.rand(30, 4) @ torch.rand(4, 20)
    >>> result = fit_restarts(V, rank=[3, 4], n_restarts=5, beta=2, max_iter=50)
    >>> len(result), result.ranks
    (10, [3, 3, 3, 3, 3, 4, 4, 4, 4, 4])
    >>> model = result.model(result.best(rank=4))
    >>> model.W.shape
    torch.Size([20, 4])
"""
import math
import numbers
from dataclasses import dataclass, field

import torch

from . import init as _init
from ._validation import (
    check_beta_with_zeros,
    check_observed_everywhere,
    check_positive_int,
    check_seed,
)
from .models.fitting import START_MISMATCH, check_fit_options
from .solvers.loop import run_batched_fit
from .solvers.penalty import Penalty
from .solvers.problem import BatchedProblem
from .solvers.registry import get_solver, require_features
from .solvers.scaling import balance_, objective_unit, scaled_penalty, target_scale, working_dtype
from .targets import statistics
from .targets.prepare import prepare_target
from .targets.residual import AccurateDivergence

__all__ = ["fit_restarts", "Restarts", "check_ranks", "prepare_matrix"]


@dataclass
class Restarts:
    """The members of :func:`fit_restarts`, in order: ``n_restarts`` per rank.

    Attributes:
        ranks (list of int): each member's rank.
        seeds (list of int or None): the seed each member started from
            (``None`` for a start given by the caller).
        W (list of Tensor): each member's ``(C, R)`` templates.
        H (list of Tensor): each member's ``(N, R)`` activations.
        histories (list of list of float): each member's objective after 0, 1,
            ..., n_iter iterations, as :attr:`torchnmf.nmf.NMF.loss_history`.
        n_iter (list of int): the iterations each member ran.
        converged (list of bool): whether it stopped on ``tol``.
        beta (float): the divergence fitted.

    Examples::

        >>> import torch
        >>> from torchnmf.restarts import fit_restarts
        >>> g = torch.Generator().manual_seed(0)
        >>> V = torch.rand(12, 3, generator=g) @ torch.rand(3, 10, generator=g)
        >>> result = fit_restarts(V, [2, 3], n_restarts=2, beta=2, max_iter=50)
        >>> result.members(3), result.losses.shape
        ([2, 3], torch.Size([4]))
        >>> W, H = result.stacked(3)
        >>> W.shape, H.shape
        (torch.Size([2, 10, 3]), torch.Size([2, 12, 3]))
    """

    ranks: list
    seeds: list
    W: list
    H: list
    histories: list
    n_iter: list
    converged: list
    beta: float = 1.0
    options: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.ranks)

    @property
    def losses(self):
        """The final objective of every member (float64 tensor)."""
        return torch.tensor([history[-1] for history in self.histories], dtype=torch.float64)

    def members(self, rank=None):
        """The indices of the members of ``rank`` (all members for ``None``)."""
        if rank is None:
            return list(range(len(self)))
        found = [i for i, r in enumerate(self.ranks) if r == rank]
        if not found:
            raise ValueError(f"rank must be one of {sorted(set(self.ranks))}, got {rank!r}")
        return found

    def best(self, rank=None):
        """The index of the member with the lowest final objective (of ``rank``)."""
        candidates = self.members(rank)
        losses = self.losses
        return min(candidates, key=lambda i: float(losses[i]))

    def stacked(self, rank):
        """``(W, H)`` of the members of ``rank`` as stacks ``(K, C, R)`` and ``(K, N, R)``."""
        chosen = self.members(rank)
        return torch.stack([self.W[i] for i in chosen]), torch.stack([self.H[i] for i in chosen])

    def model(self, member):
        """An :class:`~torchnmf.nmf.NMF` module holding a copy of one member's factors."""
        from .nmf import NMF

        if isinstance(member, bool) or not isinstance(member, numbers.Integral) or not (
            -len(self) <= member < len(self)
        ):
            raise ValueError(f"member must be an index below {len(self)}, got {member!r}")
        model = NMF(W=self.W[member], H=self.H[member])
        model.loss_history = list(self.histories[member])
        return model


def check_ranks(rank):
    """``rank`` (an int or a sequence of them) as a list of distinct positive ints.

    Examples::

        >>> from torchnmf.restarts import check_ranks
        >>> check_ranks(3)
        [3]
        >>> check_ranks(range(2, 5))
        [2, 3, 4]
    """
    if getattr(rank, "ndim", None) == 1:  # a numpy array or tensor (np.arange(2, 8))
        rank = rank.tolist()
    if isinstance(rank, (list, tuple, range)):
        ranks = [check_positive_int(r, "rank") for r in rank]
        if not ranks:
            raise ValueError("rank must be a positive integer or a non-empty sequence of them, got []")
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"rank must not repeat a value, got {list(rank)}")
        return ranks
    return [check_positive_int(rank, "rank")]


def prepare_matrix(V, mask=None, missing="error"):
    """The checked ``(V, mask)`` of a matrix target (see :func:`prepare_target`).

    Examples::

        >>> import torch
        >>> from torchnmf.restarts import prepare_matrix
        >>> V, mask = prepare_matrix(torch.tensor([[1., float("nan")], [0.5, 2.]]), missing="mask")
        >>> V
        tensor([[1.0000, 0.0000],
                [0.5000, 2.0000]])
        >>> mask
        tensor([[ True, False],
                [ True,  True]])
    """
    V, mask = prepare_target(V, mask, missing, "V")
    if V.dim() != 2:
        raise ValueError(f"V must be a matrix (2 dimensions), got shape {tuple(V.shape)}")
    if mask is not None:
        check_observed_everywhere(mask)
    return V, mask


def _starts(V, mask, rank, n_restarts, init, seed):
    """Stacked starting factors of ``n_restarts`` members, member ``k`` from seed ``seed + k``."""
    Ws, Hs = [], []
    for k in range(n_restarts):  # hidden entries of V hold zeros
        W, H = _init.initialize(V, rank, init, generator=seed + k)
        Ws.append(W)
        Hs.append(H)
    return torch.stack(Ws), torch.stack(Hs)


def _given_starts(W, H, V, ranks):
    if len(ranks) != 1:
        raise ValueError(f"W and H starts need a single rank, got rank={ranks}")
    for name, value, rows in (("W", W, V.shape[1]), ("H", H, V.shape[0])):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor of shape (K, {rows}, rank), got {type(value).__name__}")
        if value.dim() != 3 or value.shape[1] != rows or value.shape[2] != ranks[0]:
            raise ValueError(
                f"{name} must have shape (K, {rows}, {ranks[0]}), got {tuple(value.shape)}"
            )
        if not torch.isfinite(value).all() or (value < 0).any():
            raise ValueError(f"{name} must be finite and non-negative")
    if W.shape[0] != H.shape[0]:
        raise ValueError(f"W and H must hold the same number of members, got {W.shape[0]} and {H.shape[0]}")
    dtype = V.dtype
    return W.detach().to(V.device, dtype).clone(), H.detach().to(V.device, dtype).clone()


def _match_starts(H, W, mean_target, penalised):
    """Scale each member's ``H`` by a power of two where its mean reconstruction is
    far from the (normalised) target's, and balance its factors (without a
    penalty), as :meth:`torchnmf.nmf.NMF.fit` does for one."""
    entries = H.shape[1] * W.shape[1]
    mean_start = (H.double().sum(1) * W.double().sum(1)).sum(1) / max(entries, 1)
    for k, start in enumerate(mean_start.tolist()):
        if not (start > 0 and mean_target > 0 and math.isfinite(start)):
            continue
        ratio = mean_target / start
        if not 1 / START_MISMATCH <= ratio <= START_MISMATCH:
            H[k].mul_(2.0 ** round(math.log2(ratio)))
        if not penalised:
            balance_(H[k], W[k])


def _padded(groups):
    """One group of every member, each padded with zero components to the largest
    rank: exact for multiplicative updates (a zero component stays zero, its
    products add exact zeros), so every member still follows its own fit."""
    largest = max(r for r, _, _, _ in groups)

    def pad(stack):
        return torch.nn.functional.pad(stack, (0, largest - stack.shape[2]))

    ranks = [r for r, W, _, _ in groups for _ in range(W.shape[0])]
    return (
        ranks,
        torch.cat([pad(W) for _, W, _, _ in groups]),
        torch.cat([pad(H) for _, _, H, _ in groups]),
        [seed for _, _, _, seeds in groups for seed in seeds],
    )


RANK_LAYOUTS = ("grouped", "padded")


def fit_restarts(
    V,
    rank,
    n_restarts=10,
    beta=1,
    tol=1e-4,
    max_iter=200,
    *,
    solver="mu",
    alpha=0,
    l1_ratio=0,
    mask=None,
    missing="error",
    init="random",
    seed=0,
    W=None,
    H=None,
    rank_layout="grouped",
    verbose=False,
):
    r"""Fit ``n_restarts`` factorisations of ``V`` per rank as batched computations.

    Every member minimises the objective of :meth:`torchnmf.nmf.NMF.fit`
    (beta-divergence plus elastic net) with the same solver and stopping
    rule, from its own start, and ends where that single fit would.

    Args:
        V (Tensor): the non-negative ``(N, C)`` target, dense or sparse (COO,
            CSR, CSC). Never modified.
        rank (int or sequence of int): the rank, or several ranks (each gets
            ``n_restarts`` members; they are fitted one rank at a time).
        n_restarts (int): members per rank.
        beta, tol, max_iter, alpha, l1_ratio, solver, mask, missing: as in
            :meth:`torchnmf.nmf.NMF.fit`.
        init (str): the start of each member (:func:`torchnmf.init.initialize`;
            ``"random"`` or ``"nndsvdar"`` give different starts per seed).
        seed (int): member ``k`` of each rank starts from ``seed + k``.
        W (Tensor, optional): ``(K, C, R)`` starting templates of ``K``
            members (a single rank); with ``H``, replaces ``n_restarts`` and
            ``init``. Never modified.
        H (Tensor, optional): ``(K, N, R)`` starting activations.
        rank_layout (str): with several ranks, ``"grouped"`` fits one batch
            per rank; ``"padded"`` fits all members as one batch, each padded
            with zero components to the largest rank (multiplicative solvers
            only; exact, since a zero component stays zero).  Padding does
            the work of the largest rank for every member but saves the fixed
            cost of each batch: it wins on small problems
            (``benchmarks/bench_restarts.py``).
        verbose (bool): a progress bar per rank.

    Returns:
        Restarts: every member's factors, histories, iterations, the best one
        (:meth:`Restarts.best`) and an :class:`~torchnmf.nmf.NMF` of any member
        (:meth:`Restarts.model`).

    Raises:
        ValueError: for a bad ``V``, mask, rank, option or start, or a solver
            that does not support ``beta``.
        NotImplementedError: for a solver that does not support masks.

    Examples::

        >>> import torch
        >>> from torchnmf.restarts import fit_restarts
        >>> g = torch.Generator().manual_seed(0)
        >>> V = torch.rand(12, 3, generator=g) @ torch.rand(3, 10, generator=g)
        >>> result = fit_restarts(V, [2, 3], n_restarts=4, beta=2, max_iter=50)
        >>> len(result), result.ranks
        (8, [2, 2, 2, 2, 3, 3, 3, 3])
        >>> result.W[0].shape, result.H[0].shape
        (torch.Size([10, 2]), torch.Size([12, 2]))
        >>> result.model(result.best(rank=3)).W.shape
        torch.Size([10, 3])
    """
    beta, tol, max_iter, alpha, l1_ratio = check_fit_options(beta, tol, max_iter, alpha, l1_ratio)
    ranks = check_ranks(rank)
    seed = check_seed(seed)
    solver_cls = get_solver(solver, beta)
    if rank_layout not in RANK_LAYOUTS:
        raise ValueError(f"rank_layout must be one of {list(RANK_LAYOUTS)}, got {rank_layout!r}")
    if rank_layout == "padded" and solver not in ("mu", "mu_extrapolated"):
        raise ValueError(
            f"rank_layout='padded' needs a multiplicative solver (a padded component must stay "
            f"zero), got solver={solver!r}; use rank_layout='grouped'"
        )
    if (W is None) != (H is None):
        raise ValueError("W and H must be given together (the starts of the same members)")
    if W is None:
        n_restarts = check_positive_int(n_restarts, "n_restarts")
    V, mask = prepare_matrix(V, mask, missing)
    check_beta_with_zeros(V if mask is None or V.layout != torch.strided else V[mask], beta)
    require_features(solver_cls, solver, ["mask"] if mask is not None else [])
    given = V.dtype
    V = V.to(working_dtype(given))  # float16 members are fitted in float32, as NMF.fit's
    stats = statistics(V, beta, mask, name="fit_restarts")
    penalty = Penalty(alpha, l1_ratio)
    # the normalised problem of NMF.fit (torchnmf.solvers.scaling), H carrying the scale
    total, count = stats.scale_sums()
    scale = target_scale(total, count, V.dtype)
    penalty_H = penalty_W = penalty
    if scale != 1:
        stats = stats.scaled(1.0 / scale)
        penalty_H = scaled_penalty(penalty, scale, beta, True, V.dtype)
        penalty_W = scaled_penalty(penalty, scale, beta, False, V.dtype)
    stats = AccurateDivergence(stats, V.dtype)
    unit = objective_unit(scale, beta)
    result = Restarts([], [], [], [], [], [], [], beta, dict(
        solver=solver, tol=tol, max_iter=max_iter, alpha=alpha, l1_ratio=l1_ratio
    ))
    if W is not None:
        groups = [(ranks[0], *_given_starts(W, H, V, ranks), [None] * W.shape[0])]
    else:
        groups = [(r, *_starts(V, mask, r, n_restarts, init, seed), [seed + k for k in range(n_restarts)])
                  for r in ranks]
    if rank_layout == "padded" and len(groups) > 1:
        groups = [_padded(groups)]
    for r, W_stack, H_stack, seeds in groups:
        with torch.no_grad():
            H_stack.div_(scale)
            _match_starts(H_stack, W_stack, total / max(count, 1) / scale, bool(penalty))
        problem = BatchedProblem(
            stats=stats, H=H_stack, W=W_stack, beta=beta, penalty_H=penalty_H, penalty_W=penalty_W,
        )
        with torch.no_grad():
            n_iter, histories, converged = run_batched_fit(
                solver_cls(problem), tol, max_iter, verbose, desc=f"rank {r}"
            )
            H_stack.mul_(scale)
        if unit != 1:
            histories = [[value * unit for value in history] for history in histories]
        member_ranks = r if isinstance(r, list) else [r] * len(seeds)
        result.ranks += member_ranks
        result.seeds += seeds
        # a padded member keeps its own components only
        result.W += [w[:, :k] for w, k in zip(W_stack.to(given).unbind(0), member_ranks)]
        result.H += [h[:, :k] for h, k in zip(H_stack.to(given).unbind(0), member_ranks)]
        result.histories += histories
        result.n_iter += n_iter
        result.converged += converged
    return result
