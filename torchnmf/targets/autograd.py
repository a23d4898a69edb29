r"""The generic target kind: statistics by vector-Jacobian products.

Any model whose reconstruction combines non-negative factors with
non-negative coefficients (the convolutional models, compositions of models,
user modules) gets the parts of the beta-divergence's gradient from autograd:
two vector-Jacobian products of the reconstruction per factor.  The closed
forms of :mod:`torchnmf.targets.dense` are preferred wherever one exists.
"""
import torch

from .. import metrics
from .dense import float64_sum, power_sum
from .residual import amplification, pointwise_divergence

__all__ = ["AutogradStats", "beta_gradient_parts"]


class AutogradStats:
    r"""Statistics for any model whose reconstruction is linear in each factor.

    The parts of the gradient are vector-Jacobian products of ``reconstruct``:
    with :math:`\hat V = f(H, W)`,
    :math:`\nabla^+_X = J_X^\top \hat V^{\beta-1}` and
    :math:`\nabla^-_X = J_X^\top (V \hat V^{\beta-2})`, which is exact whenever
    ``f`` combines its arguments with non-negative coefficients (products, sums,
    convolutions, compositions of such models).
    """

    def __init__(self, V, beta, reconstruct):
        self.V = V
        self.beta = float(beta)
        self.reconstruct = reconstruct
        self.eps = torch.finfo(V.dtype).eps

    def _parts(self, H, W, wrt_H):
        with torch.enable_grad():
            H_ = H.detach().requires_grad_(wrt_H)
            W_ = W.detach().requires_grad_(not wrt_H)
            prediction = self.reconstruct(H_, W_)
            ((negative, positive),), _ = beta_gradient_parts(
                prediction, self.V, self.beta, [H_ if wrt_H else W_]
            )
        return negative, positive, prediction.detach()

    # -- scale (see torchnmf.solvers.scaling) -------------------------------------------
    def scale_sums(self):
        """``(sum, count)`` of the observed entries of ``V``: the entry point's scale."""
        return float(self.V.sum(dtype=torch.float64)), self.V.numel()

    def scaled(self, factor):
        """The same statistics for ``factor * V``."""
        return type(self)(self.V * factor, self.beta, self.reconstruct)

    # -- the explicit residual (see torchnmf.targets.residual) -----------------------
    def magnitude(self):
        """The size of the divergence's terms, :math:`\\sum V^\\beta` (float)."""
        return power_sum(self.V, self.beta)

    def magnitude_squares(self):
        """:math:`\\sum V^{2\\beta}`, for the closed forms' rounding noise (float)."""
        return power_sum(self.V, 2 * self.beta)

    def explicit_divergence(self, H, W):
        """The divergence summed entry by entry in float64 (slow, accurate)."""
        with torch.no_grad():
            prediction = self.reconstruct(H.double(), W.double())
        if self.beta != 2:
            prediction = prediction.clamp_min(self.eps)
        return pointwise_divergence(self.V, prediction, self.beta).sum()

    def _prediction_divergence(self, prediction):
        # V is the fit's normalised target (validated at the entry point): the public
        # metric's checks and normalisation would be passes that change nothing
        return metrics._beta_div(prediction, self.V, self.beta)

    def h_terms(self, H, W):
        negative, positive, prediction = self._parts(H, W, True)
        return negative, positive, self._prediction_divergence(prediction)

    def w_terms(self, H, W, divergence=False):
        """The ``W`` terms; with ``divergence=True`` also the divergence at (H, W)."""
        negative, positive, prediction = self._parts(H, W, False)
        if not divergence:
            return negative, positive
        return negative, positive, self._prediction_divergence(prediction)

    def divergence(self, H, W):
        with torch.no_grad():
            return metrics._beta_div(self.reconstruct(H, W), self.V, self.beta)


def _inner(a, b):
    if a.is_contiguous() and b.is_contiguous():
        return torch.dot(a.reshape(-1), b.reshape(-1)).double()
    return (a * b).sum().double()


def beta_gradient_parts(prediction, target, beta, inputs, retain_graph=False, constant=None,
                        scale=1.0):
    r"""The negative and positive parts of the gradient of the beta-divergence.

    With :math:`\hat V` = ``prediction`` computed from ``inputs`` by autograd,
    the gradient of :math:`D_\beta(V | \hat V)` with respect to an input
    :math:`X` is :math:`J_X^\top(\hat V^{\beta-1}) - J_X^\top(V \hat V^{\beta-2})`;
    this returns the two vector-Jacobian products separately.  Both are
    non-negative whenever ``prediction`` combines non-negative inputs with
    non-negative coefficients (products, sums, convolutions, chains of such
    models), which is what makes multiplicative updates possible.
    ``prediction`` is floored at the dtype's machine epsilon.

    Args:
        prediction (Tensor): :math:`\hat V`, attached to the autograd graph.
        target (Tensor): :math:`V`, of the same shape.
        beta (float): the divergence.
        inputs (sequence of Tensor): the tensors to differentiate against.
        retain_graph (bool): keep the graph for further differentiation.
        constant (Tensor, optional): :func:`divergence_constant` of
            ``scale * target``; when given, the divergence is computed on the
            way from the powers the parts need anyway.
        scale (float): take the parts and the divergence of ``scale * target``
            against ``scale * prediction`` (the floor then sits at ``eps /
            scale`` of the prediction): the parts are :math:`\text{scale}^{\beta-1}`
            times the unscaled ones and the divergence :math:`\text{scale}^\beta`
            times.  A power of two keeps the scaling exact.

    Returns:
        (parts, divergence): ``parts`` holds one (negative, positive) pair per
        input (``(None, None)`` for an input that does not reach
        ``prediction``); ``divergence`` is a float64 0-dim tensor, or ``None``
        without ``constant``.
    """
    inputs = list(inputs)
    eps = torch.finfo(prediction.dtype).eps
    if scale == 1:
        floored = prediction.detach().clamp_min(eps)
    else:
        floored = prediction.detach().mul(scale).clamp_min_(eps)
    # beta=1: an expanded one, not a tensor of ones of the prediction's size to fill
    positive_out = floored.new_ones(()).expand_as(floored) if beta == 1 else floored.pow(beta - 1)
    divergence = None
    if constant is not None:
        if beta == 1:
            variable = floored.sum().double() - scale * _inner(target, floored.log())
        elif beta == 0:
            variable = scale * _inner(positive_out, target) + floored.log().sum().double()
        else:
            # divided by beta - 1: near 1, rows summed, their total in float64 (the dot
            # product's rounding would show; see dense.accurate_inner)
            cross = (float64_sum(torch.mul(positive_out, target)) if amplification(beta) > 1
                     else _inner(positive_out, target))
            variable = _inner(positive_out, floored) / beta - scale * cross / (beta - 1)
        divergence = (constant + variable).clamp_min(0)
    # V * prediction^(beta - 2), written over the floored copy (large temporaries are costly).
    if beta == 1:
        negative_out = torch.div(target, floored, out=floored)
    else:
        negative_out = torch.div(positive_out, floored, out=floored).mul_(target)
    positive = torch.autograd.grad(
        prediction, inputs, positive_out, retain_graph=True, allow_unused=True
    )
    negative = torch.autograd.grad(
        prediction, inputs, negative_out, retain_graph=retain_graph, allow_unused=True
    )
    if scale != 1:  # the target's scale, applied to the (smaller) products: they are linear
        negative = [None if part is None else part * scale for part in negative]
    return list(zip(negative, positive)), divergence
