r"""Hoyer's sparseness constraints: the projection and the projected-gradient solver.

Hoyer (JMLR 5, 2004, "Non-negative matrix factorization with sparseness
constraints") measures the sparseness of a vector :math:`x` of :math:`n`
entries as

.. math::

    \sigma(x) = \frac{\sqrt n - \|x\|_1 / \|x\|_2}{\sqrt n - 1},

so that, for a given L2 norm, a target sparseness fixes the L1 norm:
:math:`\|x\|_1 = \|x\|_2 (\sqrt n - \sigma (\sqrt n - 1))`.
:func:`sparse_projection` finds the closest non-negative vector with both
norms prescribed (the paper's Section 3.2 algorithm, batched over rows), and
:class:`SparseProjectedGradient` fits NMF with such a constraint on each
component of ``W`` and/or ``H``: a gradient step, a projection and a
step-size search for each constrained factor, a multiplicative update for an
unconstrained one.
"""
import math

import torch

from .mu import mu_exponent, mu_update_

__all__ = ["l1_for_sparseness", "sparse_projection", "project_components_", "SparseProjectedGradient"]

# A rejected step halves the step size; after this many halvings the factor is
# left as it was for this iteration.
MAX_HALVINGS = 10
# An accepted step lets the next one be this much longer (Hoyer's choice).
STEP_GROWTH = 1.2


def l1_for_sparseness(l2, n, sparseness):
    """The L1 norm that a vector of ``n`` entries and L2 norm ``l2`` has at ``sparseness``."""
    root_n = math.sqrt(n)
    return l2 * (root_n - sparseness * (root_n - 1))


class _Rows:
    """Sums and maxima along the rows of ``(K, n)`` tensors: local, or over the
    processes of a ``reduction`` when each holds a block of every row's entries
    (the components of a distributed fit's ``H``, rows of ``H`` in rank order)."""

    def __init__(self, reduction=None):
        self.reduction = reduction

    def sum(self, *tensors):
        """Each tensor summed along dimension 1, as ``(K,)``; one all-reduce for all."""
        sums = [t.sum(1) for t in tensors]
        if self.reduction is None:
            return sums
        stacked = torch.stack(sums)
        self.reduction.sum_(stacked, what="sums of the components' entries")
        return list(stacked.unbind(0))

    def amax(self, x):
        """The largest entry of each row (``-inf`` for a block without entries)."""
        local = x.amax(1) if x.shape[1] else x.new_full((x.shape[0],), float("-inf"))
        return local if self.reduction is None else self.reduction.max_(local, "maximum")

    def count(self, x):
        n = x.shape[1]
        return n if self.reduction is None else int(self.reduction.sum_float(n))

    def first_max(self, x):
        """One at each row's first largest entry (in rank order), zero elsewhere."""
        out = torch.zeros_like(x)
        if x.shape[1] == 0:
            index = torch.zeros((x.shape[0], 1), dtype=torch.long, device=x.device)
        else:
            index = x.argmax(1, keepdim=True)
        if self.reduction is None:
            return out.scatter_(1, index, 1.0)
        largest = self.amax(x)
        mine = self.reduction.rank
        local = x.amax(1) if x.shape[1] else torch.full_like(largest, float("-inf"))
        # the lowest rank holding the row's largest entry, as a maximum of -rank
        holder = torch.where(local == largest, -float(mine), -float(self.reduction.size))
        holder = self.reduction.max_(holder.to(torch.float64), "owner of the largest entry")
        chosen = (holder == -float(mine)).to(x.dtype).unsqueeze(1)
        return out.scatter_(1, index, chosen) if x.shape[1] else out


def _solve_norms(l1, l2, x, rows=None):
    """Hoyer's projection of each row of ``x`` onto {s >= 0, sum s = l1, |s|_2 = l2}.

    ``rows`` (a :class:`_Rows`) sums along the rows; with a reduction each
    process holds a block of every row's entries and every decision is taken
    on the sums over all of them, so it is the same on every process.
    """
    rows = rows or _Rows()
    K = x.shape[0]
    n = rows.count(x)
    eps, tiny = torch.finfo(x.dtype).eps, torch.finfo(x.dtype).tiny
    free = torch.ones_like(x, dtype=torch.bool)
    done = torch.zeros(K, dtype=torch.bool, device=x.device)
    result = torch.zeros_like(x)
    (total,) = rows.sum(x)
    s = x + ((l1 - total) / n).unsqueeze(1)
    # A tie-breaking direction for rows whose free entries are all equal: towards
    # the row's largest entry.
    first_max = rows.first_max(x)
    (n_free,) = rows.sum(free.to(x.dtype))
    for _ in range(n):
        # every free entry of a row holds the same midpoint: its largest magnitude
        midpoint_size = torch.where(n_free > 0, (l1 / n_free).abs(), torch.zeros_like(n_free))
        midpoint = torch.where(free, (l1 / n_free).unsqueeze(1), torch.zeros_like(x))
        direction = s - midpoint
        flat = rows.amax(direction.abs()) <= 16 * eps * midpoint_size + tiny
        if flat.any():
            (share,) = rows.sum(first_max * free)
            share = (share / n_free).unsqueeze(1)
            fallback = torch.where(free, first_max - share, torch.zeros_like(x))
            direction = torch.where(flat.unsqueeze(1), fallback, direction)
        a, b, c = rows.sum(direction.pow(2), midpoint * direction, midpoint.pow(2))
        b, c = 2 * b, c - l2.pow(2)
        root = (b * b - 4 * a * c).clamp_min(0).sqrt()
        alpha = torch.where(a > tiny, (root - b) / (2 * a).clamp_min(tiny), torch.zeros_like(a))
        s = midpoint + alpha.unsqueeze(1) * direction
        negative = s < 0
        free &= ~negative
        kept = torch.where(free, s, torch.zeros_like(s))
        n_negative, total, n_free = rows.sum(negative.to(x.dtype), kept, free.to(x.dtype))
        finished = (n_negative == 0) & ~done
        result[finished] = s[finished]
        done |= finished
        if bool(done.all()):
            break
        shift = (total - l1) / n_free.clamp_min(1)
        s = torch.where(free, kept - shift.unsqueeze(1), torch.zeros_like(s))
    return result


def sparse_projection(x, sparseness, l2=None, *, reduction=None):
    r"""The closest non-negative rows with a given sparseness and L2 norm.

    Each row of ``x`` is projected (in the Euclidean sense) onto the set of
    non-negative vectors with L2 norm ``l2`` and Hoyer sparseness
    ``sparseness``, by the alternating projections of Hoyer (2004), Section 3.2.

    Args:
        x (Tensor): ``(K, n)``, any real values, ``n >= 2``. Not modified.
        sparseness (float): the target sparseness, in (0, 1).
        l2 (float or Tensor, optional): the target L2 norm of every row (a
            scalar or ``(K,)``); by default each row keeps its own.
        reduction (keyword-only): a
            :class:`~torchnmf.targets.distributed.Reduction` when each process
            holds a block of every row's entries (in rank order); the result
            is this process's block of the projection of the whole rows.

    Returns:
        Tensor: ``(K, n)``, non-negative, every row with exactly the requested
        sparseness and L2 norm (to rounding).
    """
    rows = _Rows(reduction)
    if x.dim() != 2 or (reduction is None and x.shape[1] < 2):
        raise ValueError(
            f"x must be a 2-D tensor of rows with at least 2 entries, got shape {tuple(x.shape)}"
        )
    if l2 is None:
        (squares,) = rows.sum(x.pow(2))
        l2 = squares.sqrt()
    else:
        l2 = torch.as_tensor(l2, dtype=x.dtype, device=x.device).expand(x.shape[0])
    l1 = l1_for_sparseness(l2, rows.count(x), sparseness)
    return _solve_norms(l1, l2, x, rows)


def project_components_(factor, sparseness, unit_norm=False, dim=1, reduction=None):
    """Project each component of ``factor`` (the slices along ``dim``) in place.

    With ``unit_norm`` every component gets L2 norm 1, otherwise each keeps its own.
    With a ``reduction`` the components are spread over the processes (this
    process holds a block of dimension 0, as a distributed fit's ``H``).
    """
    moved = factor.movedim(dim, 0)
    rows = moved.reshape(moved.shape[0], -1)
    projected = sparse_projection(rows, sparseness, 1.0 if unit_norm else None,
                                  reduction=reduction)
    moved.copy_(projected.reshape(moved.shape))
    return factor


class SparseProjectedGradient:
    """Hoyer's NMF with sparseness constraints, one iteration per ``step``.

    For each trainable factor in turn (``H`` then ``W``): with a target
    sparseness, a gradient step of the divergence followed by the projection of
    every component (``W``'s components keep their L2 norm, ``H``'s get unit
    norm, as in the paper), accepted only when the divergence does not grow,
    else retried with half the step; without one, a multiplicative update.
    Step sizes start at ``|X| / |grad|`` and grow by 1.2 after each accepted
    step.  Every accepted step and every multiplicative update is
    non-increasing, so the objective never grows.

    The factors are projected once when the solver is built.
    """

    def __init__(self, problem, sparseness_H=None, sparseness_W=None):
        self.problem = problem
        self.gamma = mu_exponent(problem.beta)
        self.sparseness = {"H": sparseness_H, "W": sparseness_W}
        self.unit_norm = {"H": True, "W": False}
        self.step_size = {"H": None, "W": None}
        # H's components run over the rows, which a distributed fit spreads over processes
        self.reduction = {"H": problem.reduction, "W": None}
        for name in ("H", "W"):
            if self._constrained(name):
                self._project_(name, getattr(problem, name))

    def _project_(self, name, factor):
        return project_components_(factor, self.sparseness[name], self.unit_norm[name],
                                   reduction=self.reduction[name])

    def _norm(self, name, tensor):
        if self.reduction[name] is None:
            return float(tensor.norm())
        return self.reduction[name].sum_float(float(tensor.double().pow(2).sum())) ** 0.5

    def _constrained(self, name):
        return self.sparseness[name] is not None and getattr(self.problem, f"update_{name}")

    def _divergence(self, H, W):
        return float(self.problem.stats.divergence(H, W))

    def _projected_step_(self, name, negative, positive, current):
        """One searched gradient step of factor ``name``; returns the divergence after it."""
        p = self.problem
        factor = getattr(p, name)
        gradient = positive - negative  # a fresh tensor: the statistics reuse their buffers
        step = self.step_size[name]
        if step is None:
            step = self._norm(name, factor) / max(self._norm(name, gradient),
                                                  torch.finfo(factor.dtype).tiny)
        for _ in range(MAX_HALVINGS):
            trial = self._project_(name, factor - step * gradient)
            value = self._divergence(trial, p.W) if name == "H" else self._divergence(p.H, trial)
            if value <= current:
                factor.copy_(trial)
                self.step_size[name] = step * STEP_GROWTH
                return value
            step /= 2
        self.step_size[name] = step
        return current

    def step(self):
        p = self.problem
        before = current = None
        if p.update_H:
            negative, positive, divergence = p.stats.h_terms(p.H, p.W)
            before = current = float(divergence)
            if self._constrained("H"):
                current = self._projected_step_("H", negative, positive, current)
            else:
                mu_update_(p.H, negative, positive, self.gamma)
                current = None
        else:
            before = current = self._divergence(p.H, p.W)
        if p.update_W:
            if self._constrained("W"):
                if current is None:
                    current = self._divergence(p.H, p.W)
                negative, positive = p.stats.w_terms(p.H, p.W)
                self._projected_step_("W", negative, positive, current)
            else:
                negative, positive = p.stats.w_terms(p.H, p.W)
                mu_update_(p.W, negative, positive, self.gamma)
        return before
