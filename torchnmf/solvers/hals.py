r"""Hierarchical alternating least squares (HALS) for the Euclidean objective.

With the other factor fixed, the objective in one factor :math:`X` (``H`` with
``A = V W`` and ``G = W^T W``; ``W`` with ``A = V^T H`` and ``G = H^T H``) is

.. math::

    \tfrac12 \operatorname{tr}(X G X^\top) - \operatorname{tr}(X^\top A)
    + \lambda_1 \textstyle\sum X + \tfrac{\lambda_2}{2} \|X\|_F^2,

and its exact minimiser in column :math:`k`, the others fixed, is

.. math::

    x_k \leftarrow \max\Big(0,\;
        \frac{a_k - \lambda_1 - \sum_{j \ne k} G_{jk} x_j}{G_{kk} + \lambda_2}\Big)

(Cichocki & Phan 2009, doi:10.1587/transfun.E92.A.708).  A sweep updates every
column in turn, so the objective never increases.  Because ``A`` and ``G`` are
computed once per factor update and a sweep costs only :math:`O(MR^2)` against
:math:`O(NCR)` for ``A``, several sweeps are run on the same ``A`` and ``G``
(Gillis & Glineur 2012, doi:10.1162/NECO_a_00256): at most
:math:`1 + \lfloor \alpha \rho \rfloor`, with :math:`\rho` the cost of ``A``
and ``G`` over the cost of a sweep, and only while a sweep still changes the
factor by more than :math:`\delta` times what the first sweep changed.

Entries are kept above a tiny positive floor rather than zero: once a whole
column of one factor is zero, the matching column of the other factor has
nothing to fit and the component would be lost for good (Gillis & Glineur
2012 make the same choice).  The coordinate minimiser over
:math:`[\text{floor}, \infty)` is the clamp above, so the objective still
never increases.

With a mask :math:`M` (weighted HALS, masked targets) no ``A`` and ``G``
summarise the data; :func:`masked_hals_update_` keeps the masked residual
:math:`R = M \odot (V - X Y^\top)` instead and minimises exactly in each
column, :math:`x_k \leftarrow \max(\text{floor}, (R y_k + x_k \odot M y_k^2
- \lambda_1) / (M y_k^2 + \lambda_2))`, then updates ``R`` by the rank-one change.
"""
import numpy as np
import torch

from .. import _device as device
from .alternating import AlternatingSolver
from .extrapolation import extrapolate_linear_
from .problem import check_solver_beta

__all__ = ["hals_update_", "masked_hals_update_", "max_inner_sweeps", "HALS"]


def _torch_sweep(columns, targets, coupling, free, floor):
    """One pass over the free columns (rows of ``columns``), in place."""
    all_rows = columns.T
    scratch = columns.new_empty(columns.shape[1])
    for k in free:
        torch.addmv(targets[k], all_rows, coupling[k], alpha=-1, out=scratch)
        torch.clamp_min(scratch, floor, out=columns[k])


def _numpy_sweep(columns, targets, coupling, free, floor):
    """:func:`_torch_sweep` on shared-memory NumPy views, for CPU tensors.

    A sweep is ``R`` small matrix-vector products in sequence, so per-call
    overhead dominates it on small factors; NumPy's is about half of torch's
    (one sweep over a 640x16 factor: 146 us against 328 us).
    """
    all_columns = columns.numpy()
    all_rows = all_columns.T
    target_rows = targets.numpy()
    weights = coupling.numpy()
    scratch = np.empty(all_columns.shape[1], dtype=all_columns.dtype)
    for k in free:
        np.dot(all_rows, weights[k], out=scratch)
        np.subtract(target_rows[k], scratch, out=scratch)
        np.maximum(scratch, floor, out=all_columns[k])


def _fixed_set(fixed):
    """The fixed columns as a set of ints (a tensor's are read back: pass a
    sequence of ints to avoid that on an accelerator)."""
    if fixed is None:
        return set()
    return set(fixed.tolist() if isinstance(fixed, torch.Tensor) else fixed)


def max_inner_sweeps(rows, other_rows, rank, alpha, overhead=0, slowdown=1):
    """Gillis & Glineur's bound ``1 + floor(alpha * rho)`` on the sweeps per update.

    ``rows`` is the updated factor's row count ``M``; ``other_rows`` the other
    factor's, ``K``.  ``rho`` compares the cost of the products that build
    ``A`` and ``G`` (``M K R + K R^2`` multiply-adds, matrix-matrix) with one
    sweep: ``R`` matrix-vector products of ``M R`` multiply-adds, each
    ``slowdown`` times dearer per multiply-add than a matrix-matrix product
    (they are bound by memory, not arithmetic), plus ``overhead``
    multiply-adds' worth of fixed cost per column (what dominates a sweep
    over small factors).
    """
    statistics = rows * other_rows * rank + other_rows * rank**2
    sweep = rank * (rows * rank * slowdown + overhead)
    return 1 + int(alpha * statistics / sweep)


def _batched_sweep(columns, targets, coupling, free, floor):
    """:func:`_torch_sweep` for a stack of problems (``columns`` ``(K, R, M)``),
    ``floor`` one value per member, ``(K, 1)``."""
    for k in free:
        scratch = torch.matmul(coupling[:, k].unsqueeze(1), columns).squeeze(1)
        torch.sub(targets[:, k], scratch, out=scratch)
        torch.maximum(scratch, floor, out=columns[:, k])


def _batched_sweeps(columns, targets, coupling, free, floor, max_sweeps, delta):
    """Sweeps over a stack of problems, each member stopping on its own change
    rule as :func:`hals_update_` does for one; the stopped members are left out
    of the later sweeps.  Returns the most sweeps any member ran."""
    members = torch.arange(columns.shape[0], device=columns.device)
    first_change = None
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        active = columns[members]
        previous = active.clone() if max_sweeps > 1 else None
        _batched_sweep(active, targets[members], coupling[members], free, floor[members])
        columns[members] = active
        if previous is None:
            break
        change = torch.linalg.vector_norm(previous.sub_(active), dim=(1, 2))
        if first_change is None:
            first_change = change
        going = change > delta * first_change
        members, first_change = members[going], first_change[going]
        if members.numel() == 0:
            break
    return sweeps


def hals_update_(factor, numerator, gram, penalty, max_sweeps=1, delta=0.0, floor=0.0,
                 fixed=None, change_norm=None):
    """HALS sweeps over the columns of ``factor`` (``(M, R)``), in place.

    Args:
        factor (Tensor): ``(M, R)``, updated in place; or a stack ``(K, M, R)``
            of independent problems (then ``numerator`` is ``(K, M, R)``,
            ``gram`` ``(K, R, R)``, ``floor`` one value per member, and each
            member stops sweeping on its own).
        numerator (Tensor): ``A`` above, ``(M, R)``; not modified.
        gram (Tensor): ``G`` above, ``(R, R)``.
        penalty (Penalty): the elastic-net penalty on ``factor``.
        max_sweeps (int): the most sweeps over the columns.
        delta (float): stop once a sweep changes ``factor`` (Frobenius norm)
            by at most ``delta`` times the first sweep's change.
        floor (float or Tensor): the smallest value an entry may take.  A small
            positive floor keeps a column from becoming exactly zero, from where
            HALS (like multiplicative updates) could never bring it back.
        fixed (Tensor or sequence of int, optional): indices of columns left
            exactly as they are.
        change_norm (callable, optional): the Frobenius norm of a sweep's
            change (a tensor) as a float; by default this tensor's own.  A
            distributed fit passes the norm over every process's rows, so that
            every process runs the same number of sweeps.

    Returns:
        int: the sweeps run.
    """
    eps = torch.finfo(factor.dtype).eps
    # Work on the transpose so that each column is a contiguous row, and divide
    # row k of the problem by G_kk + l2 once, so that a column update is one
    # matrix-vector product and one clamp:
    #   x_k = max(0, (a_k - l1) / d_k - sum_{j != k} (G_kj / d_k) x_j).
    denominators = (gram.diagonal(dim1=-2, dim2=-1) + penalty.l2).clamp_min(eps).unsqueeze(-1)
    columns = factor.mT.contiguous()
    targets = numerator.mT - penalty.l1 if penalty.l1 else numerator.mT.clone()
    targets.div_(denominators)
    coupling = gram / denominators
    coupling.diagonal(dim1=-2, dim2=-1).zero_()
    skip = _fixed_set(fixed)
    free = [k for k in range(columns.shape[-2]) if k not in skip]
    if factor.dim() == 3:
        floor = torch.as_tensor(floor, dtype=factor.dtype, device=factor.device)
        floor = floor.reshape(-1).expand(factor.shape[0]).reshape(-1, 1)
        if device.on_accelerator(columns) and max_sweeps > 1:
            _device_sweeps(columns, targets, coupling, free, floor, max_sweeps, delta,
                           sweep=_batched_sweep)
            sweeps = max_sweeps
        else:
            sweeps = _batched_sweeps(columns, targets, coupling, free, floor, max_sweeps, delta)
        factor.copy_(columns.mT)
        return sweeps
    on_accelerator = device.on_accelerator(columns)
    on_numpy = not on_accelerator and columns.dtype in (torch.float32, torch.float64)
    sweep = _numpy_sweep if on_numpy else _torch_sweep
    if on_accelerator and max_sweeps > 1 and change_norm is None:
        # (a distributed fit's change norm is a collective, which synchronises anyway)
        _device_sweeps(columns, targets, coupling, free, floor, max_sweeps, delta)
        factor.copy_(columns.T)
        return max_sweeps
    first_change = None
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        previous = columns.clone() if max_sweeps > 1 else None
        sweep(columns, targets, coupling, free, floor)
        if previous is None:
            break
        difference = previous.sub_(columns)
        if change_norm is None:
            change = float(torch.linalg.vector_norm(difference))
        else:
            change = change_norm(difference)
        if first_change is None:
            first_change = change
        if change <= delta * first_change:
            break
    factor.copy_(columns.T)
    return sweeps


def _device_sweeps(columns, targets, coupling, free, floor, max_sweeps, delta,
                   sweep=_torch_sweep):
    """The sweeps of :func:`hals_update_` with the stopping rule kept on the device.

    Reading each sweep's change back to the host would synchronise once per
    sweep; instead every one of the ``max_sweeps`` sweeps runs, and those after
    the sweep that meets the rule are undone by a device-side flag, which
    leaves exactly the factor of the host's rule.  With ``sweep=_batched_sweep``
    the columns are a stack ``(K, R, M)`` and every member has its own flag
    (the host's rule leaves stopped members out instead).
    """
    stacked = columns.dim() == 3
    first_change = None
    running = None
    for _ in range(max_sweeps):
        previous = columns.clone()
        sweep(columns, targets, coupling, free, floor)
        change = torch.linalg.vector_norm(previous - columns, dim=(-2, -1))
        if first_change is None:
            first_change = change
            running = change > delta * first_change
            continue
        # keep this sweep only while no earlier one met the rule
        keep = running.view(-1, 1, 1) if stacked else running
        columns.copy_(torch.where(keep, columns, previous))
        running = running & (change > delta * first_change)


def _masked_residual(V, factor, other):
    """``V - X Y^T`` for a dense ``V`` or a sparse COO one (its stored entries are
    added into the dense residual, which the masked sweep needs anyway); a stack
    of factors gives a stack of residuals."""
    if V.layout == torch.strided:
        if factor.dim() == 2:
            return torch.addmm(V, factor, other.T, alpha=-1)
        return torch.sub(V, torch.matmul(factor, other.mT))
    residual = torch.matmul(factor, other.mT).neg_()
    rows, columns = V._indices()
    if residual.dim() == 2:
        residual.index_put_((rows, columns), V._values(), accumulate=True)
    else:  # coalesced: no repeated index, so a plain add at the stored entries
        residual[:, rows, columns] += V._values()
    return residual


def masked_hals_update_(factor, other, V, weight, penalty, floor=0.0, fixed=None, column_sum_=None):
    r"""One weighted HALS sweep over the columns of ``factor`` (``(M, R)``), in place.

    Minimises :math:`\tfrac12 \| M \odot (V - X Y^\top) \|^2` plus the
    elastic-net penalty exactly in one column of :math:`X` at a time, the
    others fixed, so the masked objective never increases.

    Args:
        factor (Tensor): :math:`X`, ``(M, R)``, updated in place; or a stack
            ``(K, M, R)`` of members sharing ``V`` and ``weight`` (then
            ``other`` is ``(K, K', R)`` and ``floor`` may hold one value per
            member).
        other (Tensor): :math:`Y`, ``(K, R)``.
        V (Tensor): ``(M, K)``, zeros at the unobserved entries; dense or sparse COO.
        weight (Tensor): ``(M, K)``, the mask in ``V``'s dtype (1 = observed).
        penalty (Penalty): the elastic-net penalty on ``factor``.
        floor (float or Tensor): the smallest value an entry may take.
        fixed (Tensor or sequence of int, optional): indices of columns left
            exactly as they are.
        column_sum_ (callable, optional): sums a tensor over the processes
            holding the other columns of ``V`` (the other rows of ``Y``), in
            place; a distributed fit passes it for the ``W`` update.
    """
    eps = torch.finfo(factor.dtype).eps
    residual = _masked_residual(V, factor, other).mul_(weight)
    if factor.dim() == 3:
        floor = torch.as_tensor(floor, dtype=factor.dtype, device=factor.device)
        floor = floor.reshape(-1).expand(factor.shape[0]).reshape(-1, 1)
    skip = _fixed_set(fixed)
    for k in range(factor.shape[-1]):
        if k in skip:
            continue
        column, y = factor[..., k], other[..., k]
        curvature = torch.matmul(y * y, weight.T)
        projection = torch.matmul(residual, y.unsqueeze(-1)).squeeze(-1)
        if column_sum_ is not None:
            column_sum_(projection, curvature)
        updated = torch.addcmul(projection, column, curvature)
        if penalty.l1:
            updated.sub_(penalty.l1)
        updated.div_(curvature.add_(penalty.l2).clamp_min_(eps))
        if isinstance(floor, torch.Tensor):
            torch.maximum(updated, floor, out=updated)
        else:
            updated.clamp_min_(floor)
        change = updated - column
        residual.sub_((change.unsqueeze(-1) * y.unsqueeze(-2)).mul_(weight))
        column.copy_(updated)


class HALS(AlternatingSolver):
    """Accelerated HALS for beta=2 (Cichocki & Phan 2009; Gillis & Glineur 2012).

    Each factor update computes ``A`` (``V @ W`` or ``V.T @ H``, from the
    statistics object, so dense and sparse targets share this code) and the
    small Gram matrix once, then runs up to ``1 + alpha * rho`` HALS sweeps on
    them while a sweep still changes the factor by more than ``delta`` times
    the first sweep did (see the functions above); on top, the factors are
    extrapolated along their last step with restarts.  With a mask (dense
    ``V``), weighted HALS sweeps on the masked residual replace them.
    """

    name = "hals"
    betas = "beta=2 only"
    # masked targets (dense V): weighted HALS on the masked residual, one sweep
    # per factor update, from the statistics object's ``observed_target()``
    features = frozenset({"mask", "fixed"})
    alpha = 0.5
    # tuned on the convergence benchmark's beta=2 problems, quiet machine, NumPy
    # sweeps (docs/solvers.md): time to target (a) 9.2 -> 5.4 s, (c) 0.26 -> 0.15 s
    delta = 0.3
    overhead = 60000
    slowdown = 1
    extrapolation = True
    # an iteration may raise the objective by rounding alone (see the module's
    # docstring): one that raises it by more than this many epsilons of its
    # value is not accepted, and the fit stops as converged
    accept_rounding = 4

    @staticmethod
    def supports_beta(beta):
        return beta == 2

    def __init__(self, problem):
        check_solver_beta(type(self), problem.beta)
        matrix_dim = 3 if problem.batched else 2
        if problem.H.dim() != matrix_dim or problem.W.dim() != matrix_dim:
            raise NotImplementedError(
                f"solver='hals' supports the matrix model NMF only, got factors of shapes "
                f"{tuple(problem.W.shape)} and {tuple(problem.H.shape)}; use solver='mu' "
                f"for the convolutional models"
            )
        super().__init__(problem)
        R = problem.H.shape[-1]
        N = problem.H.shape[-2] if problem.batched else problem.n_rows()
        C = problem.W.shape[-2]
        self.sweeps_H = max_inner_sweeps(N, C, R, self.alpha, self.overhead, self.slowdown)
        self.sweeps_W = max_inner_sweeps(C, N, R, self.alpha, self.overhead, self.slowdown)
        # a floor relative to each factor's starting scale (see _hals); one per member
        # of a batched problem, as a (K, 1, 1) tensor
        eps = torch.finfo(problem.H.dtype).eps
        if problem.batched:
            self.floor = {
                name: f.amax((-2, -1), keepdim=True).clamp_min(1.0).mul_(eps)
                for name, f in (("H", problem.H), ("W", problem.W))
            }
        else:
            self.floor = {
                name: eps * max(scale, 1.0)
                for name, scale in (("H", problem.row_max(float(problem.H.max()))),
                                    ("W", float(problem.W.max())))
            }
        self._change_norm_H = None
        if problem.reduction is not None:  # sweeps over H stop on the change of all its rows
            reduction = problem.reduction
            self._change_norm_H = lambda change: reduction.sum_float(
                change.pow(2).sum(dtype=torch.float64)) ** 0.5
        # the fixed columns as ints, read once here rather than in every update
        self.fixed = {name: None if f is None else tuple(f.tolist())
                      for name, f in (("H", problem.fixed_H), ("W", problem.fixed_W))}
        if self.extrapolation:
            self._extrapolate_ = self._extrapolate_linear_
        observed_target = getattr(problem.stats, "observed_target", None)
        if observed_target is not None:  # a masked target, chosen once per fit
            self.observed_V, self.observed_weight = observed_target()
            self._update_H = self._masked_update_H
            self._update_W = self._masked_update_W

    def state_dict(self):
        state = super().state_dict()
        state["floors"] = [self.floor["H"], self.floor["W"]]
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.floor = {"H": state["floors"][0], "W": state["floors"][1]}

    def select_(self, members):
        super().select_(members)
        self.floor = {name: floor[members] for name, floor in self.floor.items()}

    def _floor_of(self, factor):
        return self.floor["H" if factor is self.problem.H else "W"]

    def _masked_update_H(self, terms):
        p = self.problem
        masked_hals_update_(p.H, p.W, self.observed_V, self.observed_weight, p.penalty_H,
                            self.floor["H"], self.fixed["H"])

    def _masked_update_W(self, divergence=False):
        p = self.problem
        value = p.stats.divergence(p.H, p.W) if divergence else None
        masked_hals_update_(p.W, p.H, self.observed_V.T, self.observed_weight.T, p.penalty_W,
                            self.floor["W"], self.fixed["W"],
                            p.row_sum_ if p.reduction is not None else None)
        return value

    def _extrapolate_linear_(self, factor, previous, weight):
        extrapolate_linear_(factor, previous, weight, self._floor_of(factor))

    def _update_H(self, terms):
        p = self.problem
        hals_update_(p.H, terms[0], p.W.mT @ p.W, p.penalty_H, self.sweeps_H, self.delta,
                     self.floor["H"], self.fixed["H"], self._change_norm_H)

    def _update_W(self, divergence=False):
        p = self.problem
        value = None
        fused = getattr(p.stats, "w_numerator_and_gram", None)  # across processes: one all-reduce
        if fused is not None:
            if divergence:
                negative, gram, value = fused(p.H, p.W, divergence=True)
            else:
                negative, gram = fused(p.H, p.W)
        else:
            if divergence:
                negative, _, value = p.stats.w_terms(p.H, p.W, divergence=True)
            else:
                negative, _ = p.stats.w_terms(p.H, p.W)
            gram = p.H.mT @ p.H
        hals_update_(p.W, negative, gram, p.penalty_W, self.sweeps_W, self.delta,
                     self.floor["W"], self.fixed["W"])
        return value
