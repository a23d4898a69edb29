r"""The mathematics of multiplicative updates and of elastic-net penalties.

For the beta-divergence the gradient with respect to a factor splits into a
positive and a negative part, :math:`\nabla = \nabla^+ - \nabla^-`, and the
multiplicative update is

.. math::

    X \leftarrow X \odot \left(\frac{\nabla^-}{\nabla^+ + \lambda_1 + \lambda_2 X}\right)^{\gamma(\beta)},
    \qquad
    \gamma(\beta) = \begin{cases} 1 / (2 - \beta) & \beta < 1 \\
                                  1 & 1 \le \beta \le 2 \\
                                  1 / (\beta - 1) & \beta > 2 \end{cases}

the exponent that makes each update non-increasing (Févotte & Idier, 2011,
doi:10.1162/NECO_a_00168).
"""
from dataclasses import dataclass

import torch

__all__ = ["mu_exponent", "Penalty", "mu_update_"]


def mu_exponent(beta):
    """The exponent gamma(beta) that makes multiplicative updates monotone."""
    if beta < 1:
        return 1.0 / (2.0 - beta)
    if beta > 2:
        return 1.0 / (beta - 1.0)
    return 1.0


@dataclass(frozen=True)
class Penalty:
    r"""Elastic-net penalty :math:`\alpha(\rho\|X\|_1 + \tfrac{1-\rho}{2}\|X\|_F^2)`.

    ``alpha`` is the strength and ``l1_ratio`` (:math:`\rho`) the share of L1.
    """

    alpha: float = 0.0
    l1_ratio: float = 0.0

    @classmethod
    def from_weights(cls, l1=0.0, l2=0.0):
        r"""The penalty :math:`\lambda_1 \|X\|_1 + \tfrac{\lambda_2}{2} \|X\|_F^2` by its two weights."""
        total = l1 + l2
        return cls(total, l1 / total if total else 0.0)

    @property
    def l1(self):
        return self.alpha * self.l1_ratio

    @property
    def l2(self):
        return self.alpha * (1.0 - self.l1_ratio)

    def __bool__(self):
        return self.alpha > 0

    def value(self, factor):
        """The penalty's value at ``factor`` (a Python float)."""
        if not self:
            return 0.0
        total = 0.0
        if self.l1:
            total += self.l1 * float(factor.sum(dtype=torch.float64))
        if self.l2:
            total += 0.5 * self.l2 * float(factor.pow(2).sum(dtype=torch.float64))
        return total

    def add_gradient_(self, positive, factor):
        """Add the penalty's gradient at ``factor`` to the positive part, in place."""
        if self.l1:
            positive.add_(self.l1)
        if self.l2:
            positive.add_(factor, alpha=self.l2)
        return positive


def mu_update_(factor, negative, positive, gamma, penalty=Penalty(), fixed=None):
    """One multiplicative update of ``factor`` in place.

    ``negative`` and ``positive`` are the two parts of the gradient (``positive``
    may broadcast against ``factor``); ``positive`` is floored at the dtype's
    machine epsilon.  ``negative`` is used as scratch space.  ``fixed`` (int64
    indices along dimension 1, the rank) names components whose ratio is set
    to exactly one, so that they stay bit-identical.
    """
    eps = torch.finfo(factor.dtype).eps
    if penalty:
        positive = penalty.add_gradient_(positive.expand_as(factor).clone(), factor)
    ratio = negative.div_(positive.clamp_min(eps))
    if gamma != 1:
        ratio.pow_(gamma)
    if fixed is not None:
        ratio.index_fill_(1, fixed, 1)
    factor.mul_(ratio)
    return factor
