"""The elastic-net penalty every solver adds to the divergence."""
from dataclasses import dataclass

import torch

__all__ = ["Penalty"]


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
        """The penalty's value at ``factor``: 0.0 without a penalty, else a float64
        0-dim tensor on ``factor``'s device (no read-back to the host)."""
        if not self:
            return 0.0
        total = 0.0
        if self.l1:
            total = total + self.l1 * factor.sum(dtype=torch.float64)
        if self.l2:
            total = total + 0.5 * self.l2 * factor.pow(2).sum(dtype=torch.float64)
        return total

    def member_values(self, factor):
        """The penalty of each member of a stack ``(K, n, R)`` of factors: float64 ``(K,)``."""
        total = torch.zeros(factor.shape[0], dtype=torch.float64, device=factor.device)
        if self.l1:
            total += self.l1 * factor.sum((-2, -1), dtype=torch.float64)
        if self.l2:
            total += 0.5 * self.l2 * factor.pow(2).sum((-2, -1), dtype=torch.float64)
        return total

    def add_gradient_(self, positive, factor):
        """Add the penalty's gradient at ``factor`` to the positive part, in place."""
        if self.l1:
            positive.add_(self.l1)
        if self.l2:
            positive.add_(factor, alpha=self.l2)
        return positive
