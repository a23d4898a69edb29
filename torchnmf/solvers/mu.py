r"""Multiplicative updates: their mathematics and the ``"mu"`` solver.

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
import torch

from .. import _device as device
from ..targets.residual import ENTRYWISE_AMPLIFICATION, amplification
from .acceptance import RoundingGuard
from .penalty import Penalty

__all__ = ["mu_exponent", "mu_update_", "MultiplicativeUpdates"]


def mu_exponent(beta):
    """The exponent gamma(beta) that makes multiplicative updates monotone."""
    if beta < 1:
        return 1.0 / (2.0 - beta)
    if beta > 2:
        return 1.0 / (beta - 1.0)
    return 1.0


def mu_update_(factor, negative, positive, gamma, penalty=Penalty(), fixed=None, floor=None):
    """One multiplicative update of ``factor`` in place.

    ``negative`` and ``positive`` are the two parts of the gradient (``positive``
    may broadcast against ``factor``); ``positive`` is floored at ``floor`` (a
    float or a 0-dim tensor; default the dtype's machine epsilon, the floor of
    a normalised problem).  ``negative`` is used as scratch space.  ``fixed`` (int64
    indices along dimension 1, the rank) names components whose ratio is set
    to exactly one, so that they stay bit-identical.  Entries that fall under
    the smallest normal number become zero (see :func:`_flush_subnormal_`).
    """
    if floor is None:
        floor = torch.finfo(factor.dtype).eps
    if penalty:
        positive = penalty.add_gradient_(positive.expand_as(factor).clone(), factor)
    ratio = negative.div_(positive.clamp_min(floor))
    if gamma != 1:
        ratio.pow_(gamma)
    if fixed is not None:
        ratio.index_fill_(1, fixed, 1)
    factor.mul_(ratio)
    _flush_subnormal_(factor, fixed)
    return factor


def _flush_subnormal_(factor, fixed=None):
    """Set entries under the square root of the dtype's smallest normal number
    to zero, in place.

    Multiplicative updates drive unused entries towards zero geometrically;
    once they (or products of two of them) are subnormal, every product that
    reads them runs several times slower on CPUs (digits at rank 16, beta=1:
    25 ms per iteration instead of 2.6 ms with the CPU's flush-to-zero mode,
    measured).  Below the square root, a product of two entries could be
    subnormal; above it, none is.  Such entries (under 1e-19 in float32) weigh
    nothing next to the reconstruction's floor, the dtype's epsilon.  Fixed
    components keep their entries bit for bit.
    """
    tiny = torch.finfo(factor.dtype).tiny ** 0.5
    if fixed is None:
        return torch.nn.functional.threshold_(factor, tiny, 0.0)
    small = factor < tiny
    small.index_fill_(1, fixed, False)
    return factor.masked_fill_(small, 0)


class MultiplicativeUpdates:
    """Alternating multiplicative updates of H then W (Févotte & Idier, 2011).

    Works through any statistics object, so it serves dense, masked and
    generic (autograd) targets alike, and honours fixed components.  On a
    :class:`~torchnmf.solvers.problem.BatchedProblem` the same update runs on
    every member at once (the objective is then one value per member).
    """

    # What this solver can do beyond a plain dense fit; see require_features.
    features = frozenset({"mask", "fixed"})
    # near an exact fit an iteration that rounding raised by more than this many
    # epsilons of the objective is refused, and the fit stops as converged
    # (RoundingGuard; not for a target read once per iteration, which updates H
    # while it computes the objective)
    accept_rounding = 4
    # a target read once per iteration reports the closed form and cannot go back
    # (H changes during the read); once that divergence is within this factor of the
    # explicit residual's threshold, the fit goes on with the two-read step, whose
    # objective is accurate and guarded
    one_pass_margin = 16

    def __init__(self, problem):
        self.problem = problem
        self.gamma = mu_exponent(problem.beta)
        self.guard = RoundingGuard(problem, self.accept_rounding)
        # near beta 0 and 1 the closed form the one-read step reports is rarely
        # accurate (at beta=1e-6 its first value was 2% off): two reads from the start
        self.one_pass = amplification(problem.beta) <= ENTRYWISE_AMPLIFICATION

    @property
    def converged(self):
        return self.guard.converged

    # -- the state a checkpoint keeps (see torchnmf.solvers.checkpoint) --------
    def state_dict(self):
        return {"guard": self.guard.state_dict(), "one_pass": self.one_pass}

    def load_state_dict(self, state):
        if state.get("guard") is not None:
            self.guard.load_state_dict(state["guard"])
        self.one_pass = state.get("one_pass", True)

    def _trainable(self):
        p = self.problem
        return [f for f, on in ((p.H, p.update_H), (p.W, p.update_W)) if on]

    def _update_rows_(self, rows, negative, positive):
        p = self.problem
        mu_update_(rows, negative, positive, self.gamma, p.penalty_H, p.fixed_H)

    def _one_pass_step(self, one_pass):
        """The same iteration through a target that updates ``H`` row block by row
        block while it sums the ``W`` terms (a streamed target: one read of ``V``)."""
        p = self.problem
        penalty = p.penalty()  # at the point before the update, as in step
        divergence, negative, positive = one_pass(p.H, p.W, self._update_rows_, p.update_W)
        if p.update_W:
            mu_update_(p.W, negative, positive, self.gamma, p.penalty_W, p.fixed_W)
        if device.on_accelerator(divergence):
            # a tensor: on an accelerator the loop reads it back (no float() here)
            return torch.as_tensor(divergence, dtype=torch.float64).clamp_min(0) + penalty
        divergence = max(float(divergence), 0.0)
        threshold = self.guard.threshold
        # the closed form's own rounding grows with its terms near beta 0 and 1
        if threshold is not None and divergence < (
                self.one_pass_margin * amplification(p.beta) * threshold):
            self.one_pass = False
        return divergence + penalty

    def _carried_step(self):
        """The same iteration through a distributed target, in one all-reduce: this
        process's objective at the start travels with the ``W`` terms, so the
        rounding guard decides after the ``H`` update (a refused iteration puts
        both factors back, as before it would have left them)."""
        p = self.problem
        negative, positive, local = p.stats.h_terms_unsummed(p.H, p.W)
        trainable = self._trainable()
        start = self.guard.snapshot(trainable)
        mu_update_(p.H, negative, positive, self.gamma, p.penalty_H, p.fixed_H)
        negative, positive, divergence = p.stats.w_terms(p.H, p.W, carry=local)
        before = self.guard.check(p.objective_before(divergence), trainable, start=start)
        if self.guard.converged:
            return before
        mu_update_(p.W, negative, positive, self.gamma, p.penalty_W, p.fixed_W)
        return before

    def step(self):
        p = self.problem
        one_pass = getattr(p.stats, "h_update_then_w_terms", None)
        if one_pass is not None and p.update_H and self.one_pass:
            return self._one_pass_step(one_pass)
        carries = getattr(p.stats, "carries_objective", None)
        if p.update_H and p.update_W and carries is not None and carries(p.W):
            return self._carried_step()
        if p.update_H:
            negative, positive, divergence = p.stats.h_terms(p.H, p.W)
            before = self.guard.check(p.objective_before(divergence), self._trainable())
            if self.guard.converged:
                return before
            mu_update_(p.H, negative, positive, self.gamma, p.penalty_H, p.fixed_H)
        else:  # no float(): on a GPU the loop reads the objective back
            before = self.guard.check(p.objective_before(p.stats.divergence(p.H, p.W)),
                                      self._trainable())
            if self.guard.converged:
                return before
        if p.update_W:
            negative, positive = p.stats.w_terms(p.H, p.W)
            mu_update_(p.W, negative, positive, self.gamma, p.penalty_W, p.fixed_W)
        if p.batched:  # members whose iteration was refused stay where it started
            self.guard.restore_refused_(self._trainable())
        return before

    @property
    def refused(self):
        """Per member of a batched problem: whether the last step refused its iteration."""
        return self.guard.refused

    def select_(self, members):
        """Keep only the given members of a batched problem."""
        self.problem = self.problem.select(members)
        self.guard.select(members)
