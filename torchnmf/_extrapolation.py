r"""Extrapolation of alternating updates, with restarts.

Alternating updates take steps that keep going the same way for many
iterations.  Extrapolation reuses that direction: before an update, the
factors are moved further along the last step.  HALS moves linearly and
clamps at its floor, :math:`X \leftarrow \max(X + \omega (X - X_{\text{prev}}),
\text{floor})`.  Multiplicative updates act on the logarithm of the factors
(zeros stay zero, positives stay positive), so for them the step is taken in
log space,

.. math::

    X \leftarrow X \odot \big(X / X_{\text{prev}}\big)^{\omega},

which keeps every factor non-negative without any projection.  The weight
:math:`\omega` follows the restart rule of Ang & Gillis (2019,
doi:10.1162/neco_a_01157): it grows by ``growth`` after every accepted
extrapolation (up to a ceiling that itself creeps up by ``ceiling_growth``)
and, when the extrapolated point has a higher objective than the point the
last update started from, the extrapolation is undone, the ceiling drops to
the weight that failed and the weight shrinks by ``decay``.  The objective at
the starting point of each update therefore never increases.
"""
from dataclasses import dataclass

import torch

__all__ = ["ExtrapolationWeight", "extrapolate_geometric_", "extrapolate_linear_"]

# Bound on the per-entry ratio X / X_prev so that an entry that was nearly zero
# cannot explode in one extrapolation (a rejected step would undo it anyway).
_MAX_RATIO = 1e4


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


def extrapolate_linear_(factor, previous, weight, floor=0.0):
    """``factor += weight * (factor - previous)``, then clamped at ``floor``, in place."""
    step = factor - previous
    return factor.add_(step, alpha=weight).clamp_min_(floor)


def extrapolate_geometric_(factor, previous, weight):
    """``factor *= (factor / previous) ** weight``, in place; zeros stay zero."""
    tiny = torch.finfo(factor.dtype).tiny
    ratio = factor / previous.clamp_min(tiny)
    ratio.clamp_(max=_MAX_RATIO).pow_(weight)
    return factor.mul_(ratio)
