r"""Fitting a normalised problem: the scale of the target, and back.

The beta-divergence is homogeneous, :math:`D_\beta(sV | s\hat V) = s^\beta
D_\beta(V | \hat V)`, and every solver here is equivariant in exact arithmetic:
fitting :math:`sV` from :math:`(sH, W)` gives :math:`s` times the iterates of
fitting :math:`V` from :math:`(H, W)`.  In floating point the floors
(``eps``, ``tiny``) and the powers :math:`\hat V^{\beta-1}` break that far from
scale 1 (nothing moves under an absolute floor at 1e-20, powers overflow at
1e20).  So the entry point fits the normalised target :math:`V / s` instead,
:math:`s` a power of two near the mean observed entry (dividing by it is exact,
so fits of ``V`` and ``2**k * V`` are bit-identical), with the factor that
carries the scale divided by :math:`s`, and scales back.

The objective of the original problem is :math:`s^\beta` times the normalised
one when the penalties are transformed too: with :math:`X = sX'` the carrying
factor and :math:`Y` the other,

.. math::

    \lambda_1 \|X\|_1 + \tfrac{\lambda_2}{2}\|X\|^2
    = s^\beta\big(\lambda_1 s^{1-\beta} \|X'\|_1 + \tfrac{\lambda_2 s^{2-\beta}}{2}\|X'\|^2\big),
    \qquad
    \lambda_1 \|Y\|_1 + \tfrac{\lambda_2}{2}\|Y\|^2
    = s^\beta\big(\lambda_1 s^{-\beta} \|Y\|_1 + \tfrac{\lambda_2 s^{-\beta}}{2}\|Y\|^2\big).

The scale comes from the statistics object: ``stats.scale_sums()`` returns the
sum and the count of the observed entries (float, int), which a kind that wraps
others (row blocks streamed from disk, processes) sums over its parts, and
``stats.scaled(factor)`` returns the same kind of statistics for ``factor * V``.
"""
import math

import torch

from .penalty import Penalty

__all__ = ["target_scale", "scaled_penalty", "objective_unit", "error_unit", "narrow_range",
           "working_dtype", "balance_", "lighter_carrier", "Normalisation", "BALANCE_MISMATCH"]


def target_scale(total, count, dtype=None):
    """The power of two nearest the mean ``total / count`` (1 for an empty or zero target).

    With ``dtype``, the nearest one that is, with its reciprocal, a normal number of
    that dtype: float32 data of mean 1e-40 (subnormal) gave a scale whose reciprocal
    overflowed, and the first iteration's objective was NaN.
    """
    total = float(total)
    if count <= 0 or not total > 0 or not math.isfinite(total):
        return 1.0
    exponent = round(math.log2(total) - math.log2(count))
    if dtype is not None:
        return 2.0 ** scale_exponent(exponent, dtype)
    return 2.0 ** exponent


def scale_exponent(exponent, dtype):
    """``exponent`` clamped to where ``2**exponent`` and ``2**-exponent`` are both
    normal numbers of ``dtype``."""
    limit = -int(math.log2(torch.finfo(dtype).tiny))  # float32: 126
    return max(-limit, min(limit, exponent))


def scaled_penalty(penalty, scale, beta, carries, dtype):
    r"""The penalty of the normalised problem (see the module docstring).

    ``carries`` is the share :math:`c` of the scale the penalised factor
    carries, :math:`X = s^c X'`: ``True`` (1) for the carrying factor,
    ``False`` (0) for the other, 0.5 where both carry :math:`\sqrt{s}` (the
    online solver, whose templates outlive any one batch); the weights become
    :math:`\lambda_1 s^{c-\beta}` and :math:`\lambda_2 s^{2c-\beta}`.
    Weights are capped at the dtype's largest value: beyond it the penalty
    dominates so much that the factor is zero either way.
    """
    if not penalty:
        return penalty
    cap = torch.finfo(dtype).max
    share = float(carries)
    l1 = min(penalty.l1 * _power(scale, share - beta), cap)
    l2 = min(penalty.l2 * _power(scale, 2 * share - beta), cap)
    return Penalty.from_weights(l1, l2)


# Factors whose largest entries differ by more than this are balanced (see balance_).
BALANCE_MISMATCH = 2.0**20


def balance_(H, W, row_max=float):
    """Multiply ``H`` by a power of two ``c`` and divide ``W`` by it, in place, when
    their largest entries differ by more than :data:`BALANCE_MISMATCH`; returns ``c``.

    The reconstruction (bilinear in ``H`` and ``W``) does not change, exactly.
    A start with ``W`` at the data's scale and ``H`` at its inverse (the
    normalised problem of a start made for ``1e-100 * V``) leaves one factor's
    products under the floors ``eps`` of the updates, which then stall or blow
    up; balanced factors keep both near the normalised scale.  ``row_max``
    takes the largest of a float over the processes holding other rows of ``H``.
    """
    largest_H = row_max(float(H.max())) if H.numel() else 0.0
    largest_W = float(W.max()) if W.numel() else 0.0
    if not (largest_H > 0 and largest_W > 0 and math.isfinite(largest_H * largest_W)):
        return 1.0
    ratio = largest_W / largest_H
    if 1 / BALANCE_MISMATCH <= ratio <= BALANCE_MISMATCH:
        return 1.0
    factor = 2.0 ** round(math.log2(ratio) / 2)
    H.mul_(factor)
    W.div_(factor)
    return factor


def lighter_carrier(H, W, scale, row_max=float):
    """``"H"`` or ``"W"``: the factor to divide by ``scale`` when only ``H`` is
    updated (a transform), whichever leaves the two factors' largest entries
    nearer each other.

    A fit balances its factors (:func:`balance_`); a transform cannot, ``W``
    being given.  When that ``W`` carries the data's scale (the activations of a
    fit, used as templates for the transposed data, as bi-cross-validation
    does), dividing ``H`` by the scale left ``H`` at ``1/c`` and ``W`` at ``c``
    (data at 2**-30: a Euclidean transform's positive parts at 2**-30, under
    float32's epsilon).  Either choice gives the same iterates in exact
    arithmetic (the multiplicative and HALS updates of ``H`` are unchanged when
    a power of two moves between the factors).  ``row_max`` takes the largest of
    a float over the processes holding other rows of ``H``.
    """
    largest_H = row_max(float(H.max())) if H.numel() else 0.0
    largest_W = float(W.max()) if W.numel() else 0.0
    if not (largest_H > 0 and largest_W > 0 and math.isfinite(largest_H * largest_W)):
        return "H"
    octaves = math.log2(largest_H) - math.log2(largest_W)
    shift = math.log2(scale)
    return "W" if abs(octaves + shift) < abs(octaves - shift) else "H"


def objective_unit(scale, beta):
    """:math:`s^\beta`: the objective of the original problem per unit of the
    normalised one's (``inf`` where that overflows a float)."""
    return _power(scale, beta) if scale != 1 else 1.0


def error_unit(scale, beta):
    """:math:`s^{\beta/2}`: the unit of the root of the objective (an estimator's
    ``reconstruction_err_``), which stays a float where :math:`s^\beta` does not
    (the digits at 1e-300, beta=2: an error of 1e-297 from a divergence of 1e-594)."""
    return _power(scale, beta / 2) if scale != 1 else 1.0


def narrow_range(dtype):
    """Whether sums of ``dtype`` overflow where a fit's objective does not: float16, whose
    largest number is 65504 (its reductions and dot products end in it)."""
    return dtype.is_floating_point and torch.finfo(dtype).max < 1e38


def working_dtype(dtype):
    """The dtype a fit of factors of ``dtype`` works in: float32 for float16, whose range
    (largest number 65504) cannot hold the powers of the reconstruction and their sums
    that the updates take (an Itakura-Saito fit of the digits in float16 became NaN at
    iteration 19: ``V / WH**2`` overflowed where ``WH`` fell under 0.004); the dtype
    itself otherwise (bfloat16 has float32's range)."""
    return torch.float32 if narrow_range(dtype) else dtype


def _power(scale, exponent):
    # scale is a power of two: work on the exponent so nothing overflows on the way
    try:
        return 2.0 ** (math.log2(scale) * exponent)
    except OverflowError:
        return math.inf


class Normalisation:
    """The link between the caller's factors and the working ones of a normalised fit.

    ``H`` and ``W`` are the caller's tensors; ``working`` holds the normalised
    copies the solver updates in place (the carrying factor divided by
    ``scale``).  :meth:`commit` writes the working factors, scaled back, into
    the caller's tensors; the fit calls it after every completed iteration, so
    the caller's tensors always hold a complete iterate.
    """

    def __init__(self, H, W, scale, carrier, beta, update_H=True, update_W=True, dtype=None):
        self.targets = {"H": H, "W": W}
        self.scale = scale
        self.carrier = carrier
        self.unit = objective_unit(scale, beta)
        self.update = {"H": update_H, "W": update_W}
        # (dtype: that of the working copies, float32 for a float16 fit; see working_dtype)
        self.working = {
            name: (tensor.to(dtype) / scale if name == carrier and scale != 1
                   else tensor.to(dtype, copy=True))
            for name, tensor in self.targets.items()
        }

    def commit(self):
        for name, target in self.targets.items():
            if not self.update[name]:
                continue
            source = self.working[name]
            if name == self.carrier and self.scale != 1:
                torch.mul(source, self.scale, out=target)
            else:
                target.copy_(source)

    def restore(self):
        """Reset the working factors to the last committed iterate."""
        for name, target in self.targets.items():
            if name == self.carrier and self.scale != 1:
                torch.div(target, self.scale, out=self.working[name])
            else:
                self.working[name].copy_(target)
