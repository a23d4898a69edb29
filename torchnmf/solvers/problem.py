"""What a solver receives: the problem, and the check of its beta.

A solver is a class built from a :class:`FitProblem` that offers ``step()``
(one iteration, returning the objective before it) for
:func:`~torchnmf.solvers.loop.run_fit`.
"""
from dataclasses import dataclass

import torch

from .. import _device as device
from .penalty import Penalty

__all__ = ["FitProblem", "BatchedProblem", "check_solver_beta"]


@dataclass
class FitProblem:
    """Everything a solver needs: the target's statistics and the factors.

    ``H`` and ``W`` are the tensors updated in place; ``update_H`` and
    ``update_W`` say which of them may change; ``fixed_H`` and ``fixed_W``
    (int64 indices along dimension 1, or ``None``) name components that must
    stay bit-identical while the others change.

    ``reduction`` is ``None`` for a fit in one process.  In a distributed fit
    (a :class:`~torchnmf.targets.distributed.Reduction`) ``H`` holds this
    process's rows, ``stats`` sums the divergence and the ``H`` penalty over
    the processes (so :meth:`penalty` counts ``W``'s alone, once), and
    :meth:`row_sum_`, :meth:`row_max` and :meth:`n_rows` give a solver the
    other sums over rows it needs.
    """

    stats: object
    H: torch.Tensor
    W: torch.Tensor
    beta: float
    update_H: bool = True
    update_W: bool = True
    penalty_H: Penalty = Penalty()
    penalty_W: Penalty = Penalty()
    fixed_H: torch.Tensor = None
    fixed_W: torch.Tensor = None
    reduction: object = None

    # one factorisation; see BatchedProblem for a stack of them
    batched = False

    def penalty(self):
        """The penalty not already in the divergence (see the class docstring):
        0.0, or a float64 0-dim tensor on the factors' device."""
        total = 0.0
        if self.update_H and self.reduction is None:
            total += self.penalty_H.value(self.H)
        if self.update_W:
            total += self.penalty_W.value(self.W)
        return total

    def objective_value(self, divergence, penalty=None):
        """:meth:`objective_before` as a float (one per member for a batched
        problem); on an accelerator a 0-dim tensor there, for decisions made
        on the device (:mod:`~torchnmf._device`)."""
        value = self.objective_before(divergence, penalty)
        return value if device.on_accelerator(value) else float(value)

    def objective(self):
        return float(self.objective_before(self.stats.divergence(self.H, self.W)))

    def objective_before(self, divergence, penalty=None):
        """The objective from the divergence at the current point, as a float64
        tensor on the factors' device (read back by the loop, not here), or a float
        where the statistics gave one (on the CPU).  ``penalty`` (from
        :meth:`penalty`) is the penalty at the point the divergence was taken,
        where the factors have moved since; by default the current one."""
        if penalty is None:
            penalty = self.penalty()
        if isinstance(divergence, float):
            return divergence + penalty
        return torch.as_tensor(divergence, dtype=torch.float64) + penalty

    # -- sums over the rows of H, which a distributed fit spreads over processes --
    def row_sum_(self, *tensors):
        """Sum each tensor over the processes holding other rows, in place."""
        if self.reduction is not None:
            self.reduction.sum_(*tensors)
        return tensors

    def row_max(self, value):
        """The largest of a float over the processes holding other rows."""
        return value if self.reduction is None else self.reduction.max_float(value)

    def n_rows(self):
        """The rows of ``H`` over all processes."""
        n = self.H.shape[0]
        return n if self.reduction is None else int(self.reduction.sum_float(n))


@dataclass
class BatchedProblem(FitProblem):
    """``K`` independent factorisations of one target, as one problem.

    ``H`` is a stack ``(K, N, R)`` and ``W`` a stack ``(K, C, R)``; member
    ``k`` is the problem ``(H[k], W[k])`` of :class:`FitProblem`.  The
    statistics objects of :mod:`torchnmf.targets` (matrix kinds) take the
    stacks as they are and return one divergence per member, so the objective
    here is a float64 ``(K,)`` tensor.  Fixed components are not supported.
    """

    batched = True

    def penalty(self):
        total = torch.zeros(self.H.shape[0], dtype=torch.float64, device=self.H.device)
        if self.update_H:
            total += self.penalty_H.member_values(self.H)
        if self.update_W:
            total += self.penalty_W.member_values(self.W)
        return total

    def objective_before(self, divergence, penalty=None):
        return divergence.to(torch.float64) + (self.penalty() if penalty is None else penalty)

    def objective_value(self, divergence, penalty=None):
        return self.objective_before(divergence, penalty)

    def objective(self):
        return self.objective_before(self.stats.divergence(self.H, self.W))

    def select(self, members):
        """The problem of the given members (int64 indices): new stacks, same target."""
        return BatchedProblem(
            stats=self.stats, H=self.H.index_select(0, members),
            W=self.W.index_select(0, members), beta=self.beta, update_H=self.update_H,
            update_W=self.update_W, penalty_H=self.penalty_H, penalty_W=self.penalty_W,
        )


def check_solver_beta(solver_cls, beta):
    """Raise ``ValueError`` unless the solver class supports ``beta``."""
    supports = getattr(solver_cls, "supports_beta", None)
    if supports is not None and not supports(beta):
        name = getattr(solver_cls, "name", solver_cls.__name__)
        raise ValueError(
            f"solver={name!r} supports {solver_cls.betas}, got beta={beta:g}; use "
            f"solver='mu' for this beta"
        )
