"""What a solver receives: the problem, and the check of its beta.

A solver is a class built from a :class:`FitProblem` that offers ``step()``
(one iteration, returning the objective before it) for
:func:`~torchnmf.solvers.loop.run_fit`.
"""
from dataclasses import dataclass

import torch

from .penalty import Penalty

__all__ = ["FitProblem", "check_solver_beta"]


@dataclass
class FitProblem:
    """Everything a solver needs: the target's statistics and the factors.

    ``H`` and ``W`` are the tensors updated in place; ``update_H`` and
    ``update_W`` say which of them may change; ``fixed_H`` and ``fixed_W``
    (int64 indices along dimension 1, or ``None``) name components that must
    stay bit-identical while the others change.
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

    def penalty(self):
        total = 0.0
        if self.update_H:
            total += self.penalty_H.value(self.H)
        if self.update_W:
            total += self.penalty_W.value(self.W)
        return total

    def objective(self):
        return float(self.stats.divergence(self.H, self.W)) + self.penalty()


def check_solver_beta(solver_cls, beta):
    """Raise ``ValueError`` unless the solver class supports ``beta``."""
    supports = getattr(solver_cls, "supports_beta", None)
    if supports is not None and not supports(beta):
        name = getattr(solver_cls, "name", solver_cls.__name__)
        raise ValueError(
            f"solver={name!r} supports {solver_cls.betas}, got beta={beta:g}; use "
            f"solver='mu' for this beta"
        )
