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
"""
import torch

from .. import _device as device

__all__ = ["RoundingGuard", "explicit_threshold"]


def explicit_threshold(problem):
    """The objective under which the problem's statistics report the explicit
    residual (the same on every process of a distributed fit), or ``None``
    (a batched problem: its statistics report closed forms only)."""
    if problem.batched:
        return None
    stats = getattr(problem.stats, "local", problem.stats)
    threshold = getattr(stats, "threshold", None)
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
        converged (bool): ``True`` once an iteration was refused.
    """

    def __init__(self, problem, multiple):
        self.tolerance = multiple * torch.finfo(problem.H.dtype).eps
        self.threshold = explicit_threshold(problem)
        self.reference = None  # the objective at the kept start (under the threshold)
        self.start = None
        self.converged = False

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

    def state_dict(self):
        return {"reference": self.reference,
                "start": None if self.start is None else [t.clone() for t in self.start]}

    def load_state_dict(self, state):
        self.reference = state.get("reference")
        self.start = state.get("start")
