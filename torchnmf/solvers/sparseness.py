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


def _solve_norms(l1, l2, x):
    """Hoyer's projection of each row of ``x`` onto {s >= 0, sum s = l1, |s|_2 = l2}."""
    K, n = x.shape
    eps, tiny = torch.finfo(x.dtype).eps, torch.finfo(x.dtype).tiny
    free = torch.ones_like(x, dtype=torch.bool)
    done = torch.zeros(K, dtype=torch.bool, device=x.device)
    result = torch.zeros_like(x)
    s = x + ((l1 - x.sum(1)) / n).unsqueeze(1)
    # A tie-breaking direction for rows whose free entries are all equal: towards
    # the row's largest entry.
    first_max = torch.zeros_like(x).scatter_(1, x.argmax(1, keepdim=True), 1.0)
    for _ in range(n):
        n_free = free.sum(1).to(x.dtype)
        midpoint = torch.where(free, (l1 / n_free).unsqueeze(1), torch.zeros_like(x))
        direction = s - midpoint
        flat = direction.abs().amax(1) <= 16 * eps * midpoint.abs().amax(1) + tiny
        if flat.any():
            share = (first_max * free).sum(1, keepdim=True) / n_free.unsqueeze(1)
            fallback = torch.where(free, first_max - share, torch.zeros_like(x))
            direction = torch.where(flat.unsqueeze(1), fallback, direction)
        a = direction.pow(2).sum(1)
        b = 2 * (midpoint * direction).sum(1)
        c = midpoint.pow(2).sum(1) - l2.pow(2)
        root = (b * b - 4 * a * c).clamp_min(0).sqrt()
        alpha = torch.where(a > tiny, (root - b) / (2 * a).clamp_min(tiny), torch.zeros_like(a))
        s = midpoint + alpha.unsqueeze(1) * direction
        negative = s < 0
        finished = ~negative.any(1) & ~done
        result[finished] = s[finished]
        done |= finished
        if bool(done.all()):
            break
        free &= ~negative
        s = torch.where(free, s, torch.zeros_like(s))
        shift = (s.sum(1) - l1) / free.sum(1).clamp_min(1).to(x.dtype)
        s = torch.where(free, s - shift.unsqueeze(1), torch.zeros_like(s))
    return result


def sparse_projection(x, sparseness, l2=None):
    r"""The closest non-negative rows with a given sparseness and L2 norm.

    Each row of ``x`` is projected (in the Euclidean sense) onto the set of
    non-negative vectors with L2 norm ``l2`` and Hoyer sparseness
    ``sparseness``, by the alternating projections of Hoyer (2004), Section 3.2.

    Args:
        x (Tensor): ``(K, n)``, any real values, ``n >= 2``. Not modified.
        sparseness (float): the target sparseness, in (0, 1).
        l2 (float or Tensor, optional): the target L2 norm of every row (a
            scalar or ``(K,)``); by default each row keeps its own.

    Returns:
        Tensor: ``(K, n)``, non-negative, every row with exactly the requested
        sparseness and L2 norm (to rounding).
    """
    if x.dim() != 2 or x.shape[1] < 2:
        raise ValueError(
            f"x must be a 2-D tensor of rows with at least 2 entries, got shape {tuple(x.shape)}"
        )
    if l2 is None:
        l2 = x.norm(dim=1)
    else:
        l2 = torch.as_tensor(l2, dtype=x.dtype, device=x.device).expand(x.shape[0])
    l1 = l1_for_sparseness(l2, x.shape[1], sparseness)
    return _solve_norms(l1, l2, x)


def project_components_(factor, sparseness, unit_norm=False, dim=1):
    """Project each component of ``factor`` (the slices along ``dim``) in place.

    With ``unit_norm`` every component gets L2 norm 1, otherwise each keeps its own.
    """
    moved = factor.movedim(dim, 0)
    rows = moved.reshape(moved.shape[0], -1)
    projected = sparse_projection(rows, sparseness, 1.0 if unit_norm else None)
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
        for name in ("H", "W"):
            if self._constrained(name):
                project_components_(getattr(problem, name), self.sparseness[name], self.unit_norm[name])

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
            step = float(factor.norm()) / max(float(gradient.norm()), torch.finfo(factor.dtype).tiny)
        for _ in range(MAX_HALVINGS):
            trial = project_components_(
                factor - step * gradient, self.sparseness[name], self.unit_norm[name]
            )
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
