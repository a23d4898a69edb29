r"""The acceptance rule near an exact fit: an iteration that rounding raised is refused.

Multiplicative updates and HALS never increase the objective in exact
arithmetic.  Near an exact fit (relative residual about the dtype's epsilon)
the rounding of the iterates, not the update, moves the objective, and it can
move it up by a large fraction of its (tiny) value.  There the objective is
the explicit residual of :class:`~torchnmf.targets.residual.AccurateDivergence`
(under its threshold), accurate far below the dtype's rounding, so such a rise
is real.  :class:`RoundingGuard` keeps the factors where the last iteration
started while the objective is under that threshold; when the next start is
higher by more than ``multiple`` epsilons of its value, the factors go back to
that copy and the fit stops as converged (the dtype can no longer resolve a
decrease).  Above the threshold the closed forms' own rounding (of the size of
``V``'s, not of the objective's) exceeds any such rise and nothing is refused,
so iterates there are exactly those of the plain solver.

On a batched problem (:mod:`torchnmf.restarts`) every member follows the same
rule on its own objective: a member whose iteration rounding raised goes back
to where that iteration started and stops as converged (``refused`` names
them after each check, and :meth:`RoundingGuard.restore_refused_` puts them
back again after the step that updated every member), while the others go on.
"""
import torch

from .. import _device as device

__all__ = ["RoundingGuard", "explicit_threshold"]


def explicit_threshold(problem):
    """The objective under which the iterates are at the rounding floor of a nearly
    exact fit, ``CANCELLATION`` epsilons of :math:`\\sum V^\\beta` (the same on every
    process of a distributed fit, the same for every member of a batched problem),
    or ``None``.  The statistics report the explicit residual there (and, on small
    targets, above it too: see :func:`~torchnmf.targets.residual.cancellation_threshold`)."""
    stats = getattr(problem.stats, "local", problem.stats)
    threshold = getattr(stats, "guard_threshold", None)
    if threshold is not None and problem.reduction is not None:
        threshold = problem.reduction.sum_float(threshold)
    return threshold


class RoundingGuard:
    """The rule of the module docstring for one fit.

    Args:
        problem (FitProblem): the problem whose trainable factors are guarded.
        multiple (float): the rise allowed, in epsilons of the dtype times the
            objective's value.

    Attributes:
        converged (bool): ``True`` once an iteration was refused (one fit).
        refused (list of bool or None): per member of a batched problem, whether
            the last check refused its iteration.
    """

    def __init__(self, problem, multiple):
        self.tolerance = multiple * torch.finfo(problem.H.dtype).eps
        self.threshold = explicit_threshold(problem)
        self.batched = problem.batched
        self.reference = None  # the objective at the kept start (under the threshold)
        self.start = None
        self.converged = False
        self.refused = None

    def snapshot(self, factors):
        """Copies of ``factors`` where an iteration starts, for :meth:`check`'s
        ``start`` when the objective there is known only after the iteration has
        begun to move them (``None`` where nothing is ever checked)."""
        if self.threshold is None or device.on_accelerator(factors[0]):
            return None
        return [f.clone() for f in factors]

    def check(self, before, factors, start=None):
        """The objective where this iteration starts: ``before``, or, when ``before``
        rose beyond rounding from the kept start, that start's objective (the
        ``factors`` are put back there, in place, and ``converged`` turns true).

        ``before`` is a float or a 0-dim tensor; on an accelerator the values
        are closed forms (see :class:`~torchnmf.targets.residual.AccurateDivergence`)
        and nothing is checked.  ``start`` (from :meth:`snapshot`) is the
        iteration's starting point when ``factors`` have moved since: kept in
        place of a copy of ``factors``.
        """
        if self.threshold is None:
            return before
        if device.on_accelerator(before):
            return before
        if self.batched:
            return self._check_members(before, factors)
        value = float(before)
        if not value < self.threshold:
            self.reference = self.start = None
            return before
        if self.reference is not None and value > self.reference * (1 + self.tolerance):
            for factor, start in zip(factors, self.start):
                factor.copy_(start)
            self.converged = True
            return self.reference
        self.reference = value
        self.start = [f.clone() for f in factors] if start is None else start
        return before

    def _check_members(self, before, factors):
        """:meth:`check` for stacks: ``before`` is ``(K,)``, each factor ``(K, n, R)``."""
        under = before < self.threshold
        refused = torch.zeros_like(under)
        if self.reference is not None:
            refused = under & (before > self.reference * (1 + self.tolerance))
        self.refused = refused.tolist()
        if not (under.any() or self.reference is not None):
            return before
        if any(self.refused):
            before = torch.where(refused, self.reference, before)
            self.restore_refused_(factors)
        # members under the threshold keep this start, refused ones their old one,
        # the others none (an infinite reference refuses nothing)
        kept = under & ~refused
        reference = before.masked_fill(~under, float("inf"))
        if self.start is None:
            self.start = [f.clone() for f in factors]
        else:
            for factor, start in zip(factors, self.start):
                start[kept] = factor[kept]
        self.reference = reference
        return before

    def restore_refused_(self, factors):
        """Put the members refused by the last check back where their iteration
        started, in place (a batched step updates every member after the check)."""
        if self.refused is None or not any(self.refused):
            return
        refused = torch.tensor(self.refused, device=factors[0].device)
        for factor, start in zip(factors, self.start):
            factor[refused] = start[refused]

    def select(self, members):
        """Keep the state of the given members (int64 indices) of a batched problem."""
        if self.reference is not None:
            self.reference = self.reference[members]
            self.start = [start.index_select(0, members) for start in self.start]
        if self.refused is not None:
            self.refused = [self.refused[i] for i in members.tolist()]

    def state_dict(self):
        return {"reference": self.reference,
                "start": None if self.start is None else [t.clone() for t in self.start]}

    def load_state_dict(self, state):
        self.reference = state.get("reference")
        self.start = state.get("start")
