r"""Expectation-maximisation for PLCA, on the statistics interface.

PLCA models a distribution :math:`P` (the target divided by its sum) as
:math:`Q = f(H \operatorname{diag}(Z), W)`, where :math:`f` is the NMF
forward map of the model's dimensionality and every component of ``W`` and
``H`` (the slices along dimension 1) sums to one, as does ``Z``.  With
:math:`\tilde H = H \operatorname{diag}(Z)`, the expected counts of one EM
iteration are the factors times the negative part of the Kullback-Leibler
gradient,

.. math::

    n_{\tilde H} = \tilde H \odot J_{\tilde H}^\top \frac{P}{Q}, \qquad
    n_W = W \odot J_W^\top \frac{P}{Q}, \qquad
    n_{Z, r} = \sum_{\text{all but dim 1}} (n_{\tilde H})_{:, r},

which is exactly what a beta = 1 statistics object returns as its negative
terms, so dense, convolutional (and any future) targets reuse the NMF code
paths.  The M-step with Dirichlet priors of concentration :math:`\alpha` is
:math:`X \propto \max(n_X + \alpha - 1, 0)`, normalised per component.  The
objective is :math:`D_{KL}(P \,|\, Q) - \sum_X \sum (\alpha_X - 1) \log X`,
the negative log-posterior of :math:`P` up to a constant; EM never increases
it when every :math:`\alpha \ge 1` (without priors, the log-likelihood never
decreases).
"""
import torch

from .acceptance import RoundingGuard
from .problem import FitProblem

__all__ = ["normalise_components_", "ExpectationMaximisation"]


def _other_dims(tensor):
    return [d for d in range(tensor.dim()) if d != 1]


def normalise_components_(factor):
    """Scale every component of ``factor`` (the slices along dimension 1) to sum to one."""
    if factor.dim() == 1:
        return factor.div_(factor.sum().clamp_min(torch.finfo(factor.dtype).tiny))
    total = factor.sum(_other_dims(factor), keepdim=True)
    return factor.div_(total.clamp_min(torch.finfo(factor.dtype).tiny))


def _apply_prior_(counts, alpha):
    """The Dirichlet MAP numerator ``max(counts + alpha - 1, 0)``, in place."""
    if isinstance(alpha, torch.Tensor) or alpha != 1:
        counts.add_(alpha - 1).clamp_min_(0)
    return counts


class ExpectationMaximisation:
    """One EM iteration per ``step`` on the factors ``H``, ``W``, ``Z`` (updated in place).

    ``alphas`` maps "H", "W", "Z" to a Dirichlet concentration (a number or a
    tensor broadcastable to the factor); ``update`` maps them to whether the
    factor is trained.
    """

    # without priors EM never raises the divergence in exact arithmetic: near an exact
    # fit an iteration that rounding raised by more than this many epsilons of it is
    # refused and the fit stops as converged (see torchnmf.solvers.acceptance)
    accept_rounding = 4

    def __init__(self, stats, H, W, Z, update, alphas, scale=1.0):
        self.stats = stats
        # the statistics see the distribution times ``scale`` (the target's entry count):
        # entries about one, so that the reconstruction's floor, the dtype's epsilon, is
        # small beside them (a distribution over 2e6 entries has entries about 5e-7)
        self.scale = float(scale)
        self.factors = {"H": H, "W": W, "Z": Z}
        self.update = update
        self.alphas = alphas
        self._z_shape = (1, -1) + (1,) * (H.dim() - 2)
        self.guard = None
        if all(not isinstance(alpha, torch.Tensor) and alpha == 1 for alpha in alphas.values()):
            self.guard = RoundingGuard(FitProblem(stats, H, W, 1.0), self.accept_rounding)

    @property
    def converged(self):
        """Whether an iteration was refused (the fit is at its rounding floor)."""
        return self.guard is not None and self.guard.converged

    def _weighted_H(self):
        return self.factors["H"] * self.factors["Z"].view(self._z_shape)

    def _prior(self):
        total = 0.0
        for name, factor in self.factors.items():
            alpha = self.alphas[name]
            if not self.update[name] or (not isinstance(alpha, torch.Tensor) and alpha == 1):
                continue
            logs = factor.clamp_min(torch.finfo(factor.dtype).tiny).log()
            total = total - ((alpha - 1) * logs).sum(dtype=torch.float64)
        return total

    def objective(self):
        divergence = self.stats.divergence(self._weighted_H() * self.scale, self.factors["W"])
        return float(torch.as_tensor(divergence, dtype=torch.float64) / self.scale + self._prior())

    def step(self):
        H, W, Z = self.factors["H"], self.factors["W"], self.factors["Z"]
        weighted = self._weighted_H()
        scaled = weighted * self.scale  # the point the statistics see (see __init__)
        joint = getattr(self.stats, "joint_terms", None)
        negative_W = None
        if joint is not None and self.update["W"]:
            # one reconstruction for both factors (EM updates all from one point)
            (negative, _), (negative_W, _), divergence = joint(scaled, W)
        else:
            negative, _, divergence = self.stats.h_terms(scaled, W)
        # the generalised KL divergence is of degree one: the scaled one over the scale
        divergence = torch.as_tensor(divergence, dtype=torch.float64)
        if self.guard is not None:  # (no priors) in the statistics' units, as its threshold
            divergence = self.guard.check(divergence, [H, W, Z])
            if self.guard.converged:
                return divergence / self.scale
        before = divergence / self.scale + self._prior()  # read back by the loop
        counts_W = None
        if self.update["W"]:
            if negative_W is None:
                negative_W, _ = self.stats.w_terms(scaled, W)
            counts_W = W * negative_W / self.scale  # J_W^T at the scaled point, scaled back
        counts_H = weighted.mul_(negative)
        if self.update["Z"]:
            counts_Z = counts_H.sum(_other_dims(counts_H))
            Z.copy_(normalise_components_(_apply_prior_(counts_Z, self.alphas["Z"])))
        if self.update["H"]:
            H.copy_(normalise_components_(_apply_prior_(counts_H, self.alphas["H"])))
        if counts_W is not None:
            W.copy_(normalise_components_(_apply_prior_(counts_W, self.alphas["W"])))
        return before
