"""The template of alternating solvers that extrapolate between iterations,
and the restart rule of the extrapolation weight (see
:mod:`torchnmf.solvers.extrapolation` for the moves themselves)."""
from dataclasses import dataclass

__all__ = ["ExtrapolationWeight", "AlternatingSolver"]


@dataclass
class ExtrapolationWeight:
    """The weight :math:`\\omega` and its restart rule."""

    weight: float = 1.0
    ceiling: float = 1.0
    growth: float = 1.1
    ceiling_growth: float = 1.05
    decay: float = 1.5
    max_weight: float = 1.0

    def accept(self):
        self.weight = min(self.ceiling, self.growth * self.weight)
        self.ceiling = min(self.max_weight, self.ceiling_growth * self.ceiling)

    def reject(self):
        self.ceiling = self.weight
        self.weight = self.weight / self.decay


class AlternatingSolver:
    """Template: update ``H`` from the H terms at the current point, then ``W``.

    Subclasses define ``_update_H(terms)`` (``terms`` from ``stats.h_terms``)
    and ``_update_W()``.  With ``_extrapolate_(factor, previous, weight)``
    defined, every iteration first moves the trainable factors along their
    last step and keeps the move only if the objective there is no higher than
    where the previous iteration started (Ang & Gillis 2019; see
    :mod:`torchnmf.solvers.extrapolation`).  Both updates are monotone from any
    starting point, so the objective at the start of each iteration, which
    ``step`` returns, never increases.
    """

    _extrapolate_ = None

    def __init__(self, problem):
        self.problem = problem
        self.weight = ExtrapolationWeight()
        self.previous = None
        self.reference = None

    # -- the state a checkpoint keeps (see torchnmf.solvers.checkpoint) --------
    def state_dict(self):
        return {
            "weight": dict(vars(self.weight)),
            "previous": None if self.previous is None else [t.clone() for t in self.previous],
            "reference": self.reference,
        }

    def load_state_dict(self, state):
        self.weight = ExtrapolationWeight(**state["weight"])
        self.previous = state["previous"]
        self.reference = state["reference"]

    def _start(self):
        """The H terms (``None`` when H is fixed) and the objective here."""
        p = self.problem
        if p.update_H:
            negative, positive, divergence = p.stats.h_terms(p.H, p.W)
            return (negative, positive), float(p.objective_before(divergence))
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
