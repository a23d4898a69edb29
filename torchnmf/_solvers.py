"""Solvers: how one iteration updates the factors.

A solver is built from a :class:`FitProblem` and offers ``step()`` (one
iteration, returning the objective before it) for :func:`torchnmf._loop.run_fit`.
New solvers register themselves in :data:`SOLVERS` by name.
"""
from dataclasses import dataclass

import torch

from ._extrapolation import ExtrapolationWeight, extrapolate_geometric_, extrapolate_linear_
from ._hals import hals_update_, masked_hals_update_, max_inner_sweeps
from ._updates import Penalty, mu_exponent, mu_update_

__all__ = [
    "FitProblem",
    "MultiplicativeUpdates",
    "HALS",
    "ExtrapolatedMU",
    "SOLVERS",
    "get_solver",
    "check_solver_beta",
    "require_features",
]


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


class _AlternatingSolver:
    """Template: update ``H`` from the H terms at the current point, then ``W``.

    Subclasses define ``_update_H(terms)`` (``terms`` from ``stats.h_terms``)
    and ``_update_W()``.  With ``_extrapolate_(factor, previous, weight)``
    defined, every iteration first moves the trainable factors along their
    last step and keeps the move only if the objective there is no higher than
    where the previous iteration started (Ang & Gillis 2019; see
    :mod:`torchnmf._extrapolation`).  Both updates are monotone from any
    starting point, so the objective at the start of each iteration, which
    ``step`` returns, never increases.
    """

    _extrapolate_ = None

    def __init__(self, problem):
        self.problem = problem
        self.weight = ExtrapolationWeight()
        self.previous = None
        self.reference = None

    def _start(self):
        """The H terms (``None`` when H is fixed) and the objective here."""
        p = self.problem
        if p.update_H:
            negative, positive, divergence = p.stats.h_terms(p.H, p.W)
            return (negative, positive), float(divergence) + p.penalty()
        return None, p.objective()

    def _trainable(self):
        """``(factor, fixed components)`` for each factor that may change."""
        p = self.problem
        return [
            (f, fixed)
            for f, fixed, on in ((p.H, p.fixed_H, p.update_H), (p.W, p.fixed_W, p.update_W))
            if on
        ]

    def _extrapolated_start(self):
        trainable = self._trainable()
        factors = [f for f, _ in trainable]
        saved = [f.clone() for f in factors]
        if self.previous is None:
            terms, before = self._start()
        else:
            for (factor, fixed), previous, kept in zip(trainable, self.previous, saved):
                self._extrapolate_(factor, previous, self.weight.weight)
                if fixed is not None:  # fixed components stay bit-identical
                    factor.index_copy_(1, fixed, kept.index_select(1, fixed))
            terms, before = self._start()
            if before > self.reference:
                for factor, kept in zip(factors, saved):
                    factor.copy_(kept)
                self.weight.reject()
                terms, before = self._start()
            else:
                self.weight.accept()
        self.previous = saved
        self.reference = before
        return terms, before

    def step(self):
        if self._extrapolate_ is None:
            terms, before = self._start()
        else:
            terms, before = self._extrapolated_start()
        if terms is not None:
            self._update_H(terms)
        if self.problem.update_W:
            self._update_W()
        return before


class HALS(_AlternatingSolver):
    """Accelerated HALS for beta=2 (Cichocki & Phan 2009; Gillis & Glineur 2012).

    Each factor update computes ``A`` (``V @ W`` or ``V.T @ H``, from the
    statistics object, so dense and sparse targets share this code) and the
    small Gram matrix once, then runs up to ``1 + alpha * rho`` HALS sweeps on
    them while a sweep still changes the factor by more than ``delta`` times
    the first sweep did (see :mod:`torchnmf._hals`); on top, the factors are
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

    @staticmethod
    def supports_beta(beta):
        return beta == 2

    def __init__(self, problem):
        check_solver_beta(type(self), problem.beta)
        if problem.H.dim() != 2 or problem.W.dim() != 2:
            raise NotImplementedError(
                f"solver='hals' supports the matrix model NMF only, got factors of shapes "
                f"{tuple(problem.W.shape)} and {tuple(problem.H.shape)}; use solver='mu' "
                f"for the convolutional models"
            )
        super().__init__(problem)
        N, R = problem.H.shape
        C = problem.W.shape[0]
        self.sweeps_H = max_inner_sweeps(N, C, R, self.alpha, self.overhead, self.slowdown)
        self.sweeps_W = max_inner_sweeps(C, N, R, self.alpha, self.overhead, self.slowdown)
        # a floor relative to each factor's starting scale (see _hals)
        eps = torch.finfo(problem.H.dtype).eps
        self.floor = {
            id(f): eps * max(float(f.max()), 1.0) for f in (problem.H, problem.W)
        }
        if self.extrapolation:
            self._extrapolate_ = self._extrapolate_linear_
        observed_target = getattr(problem.stats, "observed_target", None)
        if observed_target is not None:  # a masked target, chosen once per fit
            self.observed_V, self.observed_weight = observed_target()
            self._update_H = self._masked_update_H
            self._update_W = self._masked_update_W

    def _masked_update_H(self, terms):
        p = self.problem
        masked_hals_update_(p.H, p.W, self.observed_V, self.observed_weight, p.penalty_H,
                            self.floor[id(p.H)], p.fixed_H)

    def _masked_update_W(self):
        p = self.problem
        masked_hals_update_(p.W, p.H, self.observed_V.T, self.observed_weight.T, p.penalty_W,
                            self.floor[id(p.W)], p.fixed_W)

    def _extrapolate_linear_(self, factor, previous, weight):
        extrapolate_linear_(factor, previous, weight, self.floor[id(factor)])

    def _update_H(self, terms):
        p = self.problem
        hals_update_(p.H, terms[0], p.W.T @ p.W, p.penalty_H, self.sweeps_H, self.delta,
                     self.floor[id(p.H)], p.fixed_H)

    def _update_W(self):
        p = self.problem
        negative, _ = p.stats.w_terms(p.H, p.W)
        hals_update_(p.W, negative, p.H.T @ p.H, p.penalty_W, self.sweeps_W, self.delta,
                     self.floor[id(p.W)], p.fixed_W)


class ExtrapolatedMU(_AlternatingSolver):
    """Multiplicative updates with log-space extrapolation and restarts.

    Every iteration first moves the factors further along their last step in
    log space (see :mod:`torchnmf._extrapolation`), keeps the move only if the
    objective there is no higher than where the previous iteration started,
    and then runs one multiplicative update of ``H`` and ``W``.  Any beta;
    chosen for beta=1 by measurement (``docs/solvers.md``).
    """

    name = "mu_extrapolated"
    features = frozenset({"mask", "fixed"})

    def __init__(self, problem):
        super().__init__(problem)
        self.gamma = mu_exponent(problem.beta)
        self._extrapolate_ = extrapolate_geometric_

    def _update_H(self, terms):
        p = self.problem
        mu_update_(p.H, *terms, self.gamma, p.penalty_H, p.fixed_H)

    def _update_W(self):
        p = self.problem
        negative, positive = p.stats.w_terms(p.H, p.W)
        mu_update_(p.W, negative, positive, self.gamma, p.penalty_W, p.fixed_W)


SOLVERS = {"mu": MultiplicativeUpdates, "hals": HALS, "mu_extrapolated": ExtrapolatedMU}


def check_solver_beta(solver_cls, beta):
    """Raise ``ValueError`` unless the solver class supports ``beta``."""
    supports = getattr(solver_cls, "supports_beta", None)
    if supports is not None and not supports(beta):
        name = getattr(solver_cls, "name", solver_cls.__name__)
        raise ValueError(
            f"solver={name!r} supports {solver_cls.betas}, got beta={beta:g}; use "
            f"solver='mu' for this beta"
        )


def get_solver(name, beta=None):
    """The solver class registered as ``name``; checks ``beta`` when given."""
    if not isinstance(name, str):
        raise TypeError(f"solver must be a string, got {type(name).__name__}")
    try:
        solver_cls = SOLVERS[name]
    except KeyError:
        raise ValueError(
            f"solver must be one of {sorted(SOLVERS)}, got {name!r}"
        ) from None
    if beta is not None:
        check_solver_beta(solver_cls, beta)
    return solver_cls


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
