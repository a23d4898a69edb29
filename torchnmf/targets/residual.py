r"""The divergence from the explicit residual, accurate near an exact fit.

The closed forms of the statistics subtract large terms (for beta=2,
:math:`\tfrac12\|V\|^2 - \langle H, VW\rangle + \tfrac12\langle H, HW^\top W\rangle`),
so once the fit is nearly exact their value is rounding noise: it can be
negative, rise when the fit improves, and mislead the stopping rule.
:class:`AccurateDivergence` wraps a statistics object and, when a closed-form
value is under ``CANCELLATION`` times the dtype's epsilon times the size of its
terms (:math:`\sum V^\beta` over the observed entries), or, on a small target,
under ``NOISE`` times the root sum of squares of those terms (the rounding of a
few entries' terms can then exceed a few epsilons of the objective), replaces it
with the sum of the entry-wise divergences in float64 from the object's
``explicit_divergence(H, W)``.

Entry-wise, with :math:`a = \log(\hat v / v) = \operatorname{log1p}((\hat v - v) / v)`,

.. math::

    d_\beta(v | \hat v) = v^\beta \Big(\frac{\operatorname{expm1}(\beta a)}{\beta}
        - \frac{\operatorname{expm1}((\beta - 1) a)}{\beta - 1}\Big),

(``expm1(a) - a`` at beta=1, ``expm1(-a) + a`` at beta=0): the only cancellation
left is between two terms of size :math:`|a|` whose difference is about
:math:`a^2/2`, a relative error of about :math:`2\epsilon/|a|` in float64,
instead of :math:`\epsilon_{\text{dtype}} \sum V^\beta` for the closed form.
Zeros of ``V`` contribute :math:`\hat v^\beta / \beta`.
"""
import inspect
import math

import torch

from .. import _device as device
from ..solvers.scaling import error_unit, lighter_carrier, objective_unit, target_scale

__all__ = ["pointwise_divergence", "PointwiseReference", "AccurateDivergence", "data_divergence",
           "data_error", "root_error", "normalised_divergence",
           "CANCELLATION", "NOISE", "ENTRYWISE_AMPLIFICATION", "amplification",
           "cancellation_threshold"]

CANCELLATION = 1e4
# the closed forms' rounding noise, measured at up to about 7 epsilons times
# sqrt(sum V^(2 beta)) (a 2 x 2 float32 fit at beta=0.5): under NOISE times that
# spread the noise could exceed 64 epsilons of the objective's own value
NOISE = 0.25


# Beyond this amplification the closed form is rarely accurate: the steps that report
# it without the guard's check (BetaMu's returned value, the one-read step of a
# streamed fit) take the entry-wise divergence instead.
ENTRYWISE_AMPLIFICATION = 4


def amplification(beta):
    r"""How many times larger than at ``beta=0.5`` the closed forms' terms are, against
    :math:`\sum V^\beta` (at least 1).

    A closed form adds :math:`\sum V^\beta / (\beta(\beta - 1))`,
    :math:`-\sum V \hat V^{\beta-1} / (\beta - 1)` and
    :math:`\sum \hat V^\beta / \beta`: near ``beta`` 0 or 1 each grows like
    the reciprocal of the distance while their sum, the divergence, does not, and
    their rounding grows with them (on the digits in float32, ``beta=0.999``
    reported 81,597 for a divergence of 75,833 and rose 25 times in 200
    iterations).  The thresholds of :func:`cancellation_threshold` were measured
    where the largest of the three is :math:`4 \sum V^\beta` (``beta=0.5``);
    this is the factor by which the largest exceeds that.  Exactly 0, 1 and 2
    have forms of their own: 1.
    """
    if beta is None or beta in (0, 1, 2):
        return 1.0
    largest = max(1 / abs(beta * (beta - 1)), 1 / abs(beta - 1), 1 / abs(beta))
    return max(1.0, largest / 4)


def cancellation_threshold(magnitude, squares, dtype):
    r"""The objective under which a closed form is rounding noise, for a target with
    :math:`\sum V^\beta` = ``magnitude`` and :math:`\sum V^{2\beta}` = ``squares``
    (``None``: unknown, taken as ``magnitude ** 2``).

    Two bounds: the cancellation of terms as large as ``magnitude`` near an exact fit
    (``CANCELLATION`` epsilons of it), and the rounding of every entry's terms, which
    adds up like a random walk to a few epsilons times their root sum of squares,
    independent of the dtype once compared with a rise of a few epsilons of the
    objective (``NOISE`` times that root).  On a large target the first decides; on a
    small one, where the rounding of a few entries is as large as the objective's own
    rounding allows, the second.
    """
    spread = magnitude if squares is None else math.sqrt(squares)
    return max(CANCELLATION * torch.finfo(dtype).eps * magnitude, NOISE * spread)


def pointwise_divergence(V, R, beta, floor=0.0):
    """Entry-wise :math:`d_\\beta(V | R)` in float64, non-negative, accurate near ``V == R``.

    ``floor`` is the least value of ``R`` taken where ``V`` is positive (the fits'
    ``eps``); where ``V`` is zero ``R`` is taken as it is, so that an exact zero of
    both adds exactly zero (not ``floor^beta / beta``, 0.27 at ``beta=0.1``).
    """
    return PointwiseReference(V, beta).divergence(R, floor)


class PointwiseReference:
    """The parts of :func:`pointwise_divergence` that depend on ``V`` alone, computed
    once for a ``V`` whose divergence is taken at many ``R`` (a small fit near an
    exact fit takes it every iteration); :meth:`divergence` gives the same values.
    """

    def __init__(self, V, beta):
        self.V = V.double()
        self.beta = beta
        if beta != 2:
            self.positive = self.V > 0
            # a V without zeros needs no separate term for them (the where would keep d)
            self.zeros = not bool(self.positive.all())
            self.safe_V = torch.where(self.positive, self.V, torch.ones_like(self.V))
            self.V_power = self.safe_V.pow(beta)

    def divergence(self, R, floor=0.0):
        """Entry-wise :math:`d_\\beta(V | R)` in float64 for ``R`` of ``V``'s shape,
        ``R`` floored at ``floor`` where ``V`` is positive (see :func:`pointwise_divergence`)."""
        beta = self.beta
        R = R.double()
        if beta == 2:  # (R - V)^2 / 2: no cancellation to avoid, and zeros of V included
            return torch.sub(R, self.V).square_().mul_(0.5)
        zeros = R.pow(beta).div_(beta) if beta > 0 and self.zeros else None
        if floor > 0:
            R = R.clamp_min(floor)
        safe_V = self.safe_V
        ratio = torch.sub(R, safe_V).div_(safe_V)  # R / V - 1, exact near R == V
        a = self._log_quotient(ratio, R)
        if beta == 1:  # expm1(a) is (R - V) / V itself
            return self._weighted(ratio.sub_(a), zeros)
        if beta == 0:
            phi = torch.neg(a).expm1_().add_(a)
        else:
            phi = torch.mul(a, beta).expm1_().div_(beta).sub_(
                a.mul_(beta - 1).expm1_().div_(beta - 1))
        return self._weighted(phi, zeros)

    def _log_quotient(self, ratio, R):
        """:math:`\\log(R / V)`: ``log1p(ratio)``, accurate near ``R == V``, and the log of the
        quotient itself for ``R < V / 2``, where ``ratio`` loses ``R``: under ``V``'s half
        epsilon it rounds to -1, and the log1p of -1, -inf, made the divergence at a
        reconstruction floored far under ``V`` infinite or NaN."""
        return torch.where(ratio > -0.5, torch.log1p(ratio), torch.log(R / self.safe_V))

    def _weighted(self, phi, zeros):
        """``V^beta phi`` at the positive entries of ``V``, ``zeros`` (``R^beta / beta``,
        or ``None``) at its zeros."""
        d = phi.mul_(self.V_power)
        if zeros is not None:
            d = torch.where(self.positive, d, zeros)
        return d.clamp_min_(0)


class AccurateDivergence:
    """A statistics object whose divergences are accurate near an exact fit.

    Delegates everything to ``stats``; replaces a divergence it returns by
    ``stats.explicit_divergence(H, W)`` when cancellation has eaten it (see the
    module docstring), and clamps it at zero otherwise.  Between the two bounds
    (under the rounding-noise bound of a small target, above the cancellation
    bound), a kind with ``pointwise_divergence(H, W)`` gives the entry-wise
    divergence on its own reconstruction instead, in the same pass as its terms
    (``divergence="pointwise"``) once the fit is there: its rounding is that of
    the reconstruction weighted by the divergence's slope, small once the fit is
    good, and it needs no float64 reconstruction.  Under the cancellation bound a
    kind with ``explicit_in_pass`` gives the explicit residual from the pass that
    computes its terms (``divergence="explicit"``), whose float64 reconstruction
    then serves both.  On an accelerator the
    values that ``h_terms`` and ``w_terms`` return are only clamped (checking
    them would read them back every iteration); ``divergence``, the objective
    the fit ends with, is always checked.
    """

    def __init__(self, stats, dtype):
        self.stats = stats
        magnitude = getattr(stats, "magnitude", None)
        self.magnitude = magnitude() if magnitude is not None else None
        squares = getattr(stats, "magnitude_squares", None)
        self.squares = squares() if squares is not None and magnitude is not None else None
        self.threshold = self.guard_threshold = None
        if self.magnitude is not None and hasattr(stats, "explicit_divergence"):
            # the closed form's rounding grows with its terms (see amplification); the
            # guard's region does not: there the iterates, not the terms, are at the floor
            self.threshold = amplification(getattr(stats, "beta", None)) * cancellation_threshold(
                self.magnitude, self.squares, dtype)
            # where the iterates themselves are at the rounding floor (a nearly exact
            # fit): the region of RoundingGuard, which refuses what rounding raised
            self.guard_threshold = CANCELLATION * torch.finfo(dtype).eps * self.magnitude
        # between the two thresholds, where the closed form's trouble is the rounding of
        # its large terms rather than a residual at the rounding floor, a kind that has
        # it gives the entry-wise divergence on its own reconstruction (no float64 one)
        self.pointwise = self.threshold is not None and hasattr(stats, "pointwise_divergence")
        # once a value was replaced, the next h_terms skips the closed form's divergence
        # (its passes over the data) where the kind can, and reports the accurate one the
        # same way: "explicit", "pointwise", or None (the closed form); the factors'
        # dimensions of that fit (a stack of members has one more)
        self.accurate = None
        self._accurate_dims = None
        self.skips_divergence = (
            self.threshold is not None
            and "divergence" in inspect.signature(stats.h_terms).parameters
        )
        # a kind whose terms' pass gives the explicit residual too (divergence="explicit"),
        # from the float64 reconstruction that also gives, rounded, its ratio
        self.explicit_in_pass = self.skips_divergence and getattr(stats, "explicit_in_pass", False)

    def __getattr__(self, name):
        found = getattr(self.stats, name)
        if name == "joint_terms":  # only where the kind has it (solvers look for it)
            return lambda H, W: self._joint_terms(found, H, W)
        return found

    def _checked(self, value, H, W, final=False):
        if value is None:
            return value
        if isinstance(value, torch.Tensor) and value.dim() == 1:
            return self._checked_members(value, H, W, final)
        on_device = device.on_accelerator(value)
        if not on_device:
            # on the CPU a float: the loop reads it anyway, and a tensor would cost a torch
            # call for each step of arithmetic on its way there (the clamp, the penalty)
            value = float(value)
        # on an accelerator the check would read the value back every iteration
        # (a synchronisation the loop avoids): there only the final objective is checked
        if self.threshold is not None and (final or not on_device) and float(value) < self.threshold:
            if self.pointwise and float(value) >= self.guard_threshold:
                value = self._settled(self.stats.pointwise_divergence(H, W), H, W, final)
            else:
                value = self._settled(None, H, W, final)
            return value
        if not final:
            self.accurate = None
        return value.clamp_min(0) if on_device else max(value, 0.0)

    def _settled(self, pointwise, H, W, final=False, explicit=None):
        """The accurate value at (H, W): ``pointwise`` (an entry-wise value on the
        kind's own reconstruction, or None) unless it falls where only the float64
        residual is accurate (``explicit``, when the terms' pass gave it); and how the
        next h_terms finds it (unless ``final``)."""
        value = pointwise
        if value is None or float(value) < self.guard_threshold:
            value = self.stats.explicit_divergence(H, W) if explicit is None else explicit
        if not final:
            found = float(value)
            self.accurate = (None if found >= self.threshold
                             else "pointwise" if self.pointwise and found >= self.guard_threshold
                             else "explicit")
            self._accurate_dims = H.dim()
        return value

    def _checked_members(self, values, H, W, final=False):
        """One divergence per member of stacks ``H`` ``(K, N, R)``, ``W`` ``(K, C, R)``;
        on an accelerator, as for one fit, only the final objectives are checked."""
        values = values.clamp_min(0)
        if self.threshold is None or (device.on_accelerator(values) and not final):
            return values
        for k in (values < self.threshold).nonzero().flatten().tolist():
            values[k] = self.stats.explicit_divergence(H[k], W[k])
        return values

    def h_terms(self, H, W, divergence=True):
        if not divergence:
            return self.stats.h_terms(H, W, divergence=False)
        if self.accurate and self.skips_divergence and H.dim() == self._accurate_dims:
            if self.accurate == "pointwise":
                negative, positive, value = self.stats.h_terms(H, W, divergence="pointwise")
                return negative, positive, self._settled(value, H, W)
            if self.explicit_in_pass:
                negative, positive, value = self.stats.h_terms(H, W, divergence="explicit")
                return negative, positive, self._settled(None, H, W, explicit=value)
            negative, positive, _ = self.stats.h_terms(H, W, divergence=False)
            return negative, positive, self._settled(None, H, W)
        terms = self.stats.h_terms(H, W)
        return (*terms[:2], self._checked(terms[2], H, W))

    def _joint_terms(self, joint, H, W):
        """The kind's ``joint_terms`` with the divergence checked as ``h_terms``'s."""
        if self.accurate and H.dim() == self._accurate_dims and (
                "divergence" in inspect.signature(joint).parameters):
            if self.accurate == "pointwise":
                h, w, value = joint(H, W, divergence="pointwise")
                return h, w, self._settled(value, H, W)
            if self.explicit_in_pass:
                h, w, value = joint(H, W, divergence="explicit")
                return h, w, self._settled(None, H, W, explicit=value)
            h, w, _ = joint(H, W, divergence=False)
            return h, w, self._settled(None, H, W)
        h, w, value = joint(H, W)
        return h, w, self._checked(value, H, W)

    def w_terms(self, H, W, *args, **kwargs):
        terms = self.stats.w_terms(H, W, *args, **kwargs)
        if len(terms) == 3:
            return (*terms[:2], self._checked(terms[2], H, W))
        return terms

    def divergence(self, H, W):
        return self._checked(self.stats.divergence(H, W), H, W, final=True)


def data_divergence(stats, H, W, beta, dtype):
    r"""The divergence of given factors, in the data's units, as a fit reports its own
    (a float).

    For scores of factors that no fit reported (held-out errors, a consensus's
    usage): on the target divided by the power of two
    :math:`s` nearest its mean observed entry, with whichever factor leaves the
    two balanced divided by :math:`s` too
    (:func:`~torchnmf.solvers.scaling.lighter_carrier`), accurate near an exact
    fit (:class:`AccurateDivergence`), times :math:`s^\beta`.  The closed forms
    in the data's units floor the reconstruction at the dtype's epsilon: the
    digits at 1e-9 scored every rank of a cross-validation alike, and negative
    where the constant cancelled.
    """
    value, scale = normalised_divergence(stats, H, W, dtype)
    return value * objective_unit(scale, beta)


def data_error(stats, H, W, beta, dtype):
    r""":math:`\sqrt{2 D}` for the divergence :math:`D` of :func:`data_divergence`
    (an estimator's ``reconstruction_err_``), scaled back as a root: the divergence
    itself may not be a float where its root is."""
    value, scale = normalised_divergence(stats, H, W, dtype)
    return root_error(value, scale, beta)


def root_error(value, scale, beta):
    r""":math:`\sqrt{2 D}` in the data's units for a divergence ``value`` of the target
    divided by ``scale``."""
    if not value > 0:
        return value if math.isnan(value) else 0.0
    return math.sqrt(2 * value) * error_unit(scale, beta)


def normalised_divergence(stats, H, W, dtype):
    r"""The divergence of :func:`data_divergence` before it is scaled back, and the
    scale :math:`s` (its unit is :math:`s^\beta`)."""
    scale = target_scale(*stats.scale_sums(), dtype)
    if scale != 1:
        stats = stats.scaled(1.0 / scale)
        if lighter_carrier(H, W, scale) == "W":
            W = W / scale
        else:
            H = H / scale
    return float(AccurateDivergence(stats, dtype).divergence(H, W)), scale
