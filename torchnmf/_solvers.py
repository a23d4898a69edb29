"""Solvers: how one iteration updates the factors.

A solver is built from a :class:`FitProblem` and offers ``step()`` (one
iteration, returning the objective before it) for :func:`torchnmf._loop.run_fit`.
New solvers register themselves in :data:`SOLVERS` by name.
"""
from dataclasses import dataclass

import torch

from ._updates import Penalty, mu_exponent, mu_update_

__all__ = ["FitProblem", "MultiplicativeUpdates", "SOLVERS", "get_solver", "require_features"]


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


class MultiplicativeUpdates:
    """Alternating multiplicative updates of H then W (Févotte & Idier, 2011).

    Works through any statistics object, so it serves dense, masked and
    generic (autograd) targets alike, and honours fixed components.
    """

    # What this solver can do beyond a plain dense fit; see require_features.
    features = frozenset({"mask", "fixed"})

    def __init__(self, problem):
        self.problem = problem
        self.gamma = mu_exponent(problem.beta)

    def step(self):
        p = self.problem
        if p.update_H:
            negative, positive, divergence = p.stats.h_terms(p.H, p.W)
            before = float(divergence) + p.penalty()
            mu_update_(p.H, negative, positive, self.gamma, p.penalty_H, p.fixed_H)
        else:
            before = p.objective()
        if p.update_W:
            negative, positive = p.stats.w_terms(p.H, p.W)
            mu_update_(p.W, negative, positive, self.gamma, p.penalty_W, p.fixed_W)
        return before


SOLVERS = {"mu": MultiplicativeUpdates}


def get_solver(name):
    """The solver class registered as ``name``."""
    if not isinstance(name, str):
        raise TypeError(f"solver must be a string, got {type(name).__name__}")
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(
            f"solver must be one of {sorted(SOLVERS)}, got {name!r}"
        ) from None


_FEATURE_NAMES = {"mask": "masked targets (mask= or missing='mask')", "fixed": "fixed components (fixed_W=, fixed_H=)"}


def require_features(solver_cls, name, wanted):
    """Raise ``NotImplementedError`` unless ``solver_cls`` declares every feature
    in ``wanted`` in its ``features`` attribute (solvers without one support none)."""
    supported = getattr(solver_cls, "features", frozenset())
    for feature in wanted:
        if feature not in supported:
            raise NotImplementedError(
                f"solver={name!r} does not support {_FEATURE_NAMES.get(feature, feature)} "
                f"yet; use solver='mu'"
            )
