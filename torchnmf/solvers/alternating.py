"""The template of alternating solvers that extrapolate between iterations,
and the restart rule of the extrapolation weight (see
:mod:`torchnmf.solvers.extrapolation` for the moves themselves)."""
from dataclasses import dataclass

import torch

from .. import _device as device
from .acceptance import RoundingGuard

__all__ = ["ExtrapolationWeight", "AlternatingSolver"]


def _minimum(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.minimum(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))
    return min(a, b)


def _choose(where, new, old):
    return new if where is None else torch.where(where, new, old)


@dataclass
class ExtrapolationWeight:
    """The weight :math:`\\omega` and its restart rule.

    ``weight`` and ``ceiling`` are numbers for one fit, or float64 ``(K,)``
    tensors for the members of a batched one; then ``accept`` and ``reject``
    take a boolean ``where`` naming the members they apply to.
    """

    weight: float = 1.0
    ceiling: float = 1.0
    growth: float = 1.1
    ceiling_growth: float = 1.05
    decay: float = 1.5
    max_weight: float = 1.0

    def accept(self, where=None):
        weight = _minimum(self.ceiling, self.growth * self.weight)
        ceiling = _minimum(self.max_weight, self.ceiling_growth * self.ceiling)
        self.weight = _choose(where, weight, self.weight)
        self.ceiling = _choose(where, ceiling, self.ceiling)

    def reject(self, where=None):
        ceiling, weight = self.weight, self.weight / self.decay
        self.ceiling = _choose(where, ceiling, self.ceiling)
        self.weight = _choose(where, weight, self.weight)

    def on_device(self, device):
        """Hold ``weight`` and ``ceiling`` as float64 0-dim tensors on ``device``,
        so that ``accept`` and ``reject`` can follow a decision made there."""
        if not isinstance(self.weight, torch.Tensor):
            self.weight = torch.tensor(self.weight, dtype=torch.float64, device=device)
            self.ceiling = torch.tensor(self.ceiling, dtype=torch.float64, device=device)

    def select(self, members):
        """The members' weights of a batched fit (int64 indices)."""
        self.weight = self.weight[members]
        self.ceiling = self.ceiling[members]


class AlternatingSolver:
    """Template: update ``H`` from the H terms at the current point, then ``W``.

    Subclasses define ``_update_H(terms)`` (``terms`` from ``stats.h_terms``)
    and ``_update_W(divergence=False)`` (with ``divergence=True`` it returns
    the divergence at the point it starts from, which its pass over the
    statistics gives almost for free).  With ``_extrapolate_(factor, previous, weight)``
    defined, every iteration first moves the trainable factors along their
    last step and keeps the move only if the objective there is no higher than
    where the previous iteration's ``W`` update started (Ang & Gillis 2019; see
    :mod:`torchnmf.solvers.extrapolation`).  Both updates are monotone from any
    starting point, so the objective at the start of each iteration, which
    ``step`` returns, never increases.

    On a :class:`~torchnmf.solvers.problem.BatchedProblem` every member keeps
    its own weight and its own accept/reject decision; the weight reaches
    ``_extrapolate_`` as a ``(K, 1, 1)`` tensor.

    On an accelerator (:mod:`~torchnmf._device`) the accept/reject
    decision stays on the device: the factors go back with ``torch.where``,
    and a refused iteration skips its ``H`` update instead of computing the
    ``H`` terms again at the kept point (which would need the decision on the
    host); its ``W`` update then runs from the kept point and also gives the
    objective there (``_update_W(divergence=True)``), which the iteration
    returns.  Every update is still monotone, so the objective never
    increases, but after the first refusal the iterates differ from the
    CPU's, which recomputes the terms (one host read per iteration).  Per
    iteration that converges more slowly (measured on the CPU with a
    stand-in device, 200x150 rank 8, six seeds: final loss after 200
    iterations 1.01 to 1.47 times the CPU's for ``"mu_extrapolated"`` at
    beta=1, 0.95 to 1.78 for ``"hals"``); ``refuse_on_device = False`` reads
    the decision back instead and keeps the CPU's iterates.  A batched problem
    on an accelerator decides every member there the same way (the CPU's
    batched path reads whether any member refused, and recomputes the terms).

    Updates that are monotone only in exact arithmetic set
    ``accept_rounding`` (a multiple of the dtype's epsilon): near an exact fit
    an iteration that rounding raised by more than that is refused and the
    fit stops as converged (:class:`~.acceptance.RoundingGuard`; ``converged``
    says so).
    """

    _extrapolate_ = None
    accept_rounding = None
    # on an accelerator, decide a refusal there (no read-back; a refused iteration
    # skips its H update) rather than on the host (one read per iteration, the
    # CPU's iterates); see the class docstring and docs/benchmarks.md ("GPU")
    refuse_on_device = True

    def __init__(self, problem):
        self.problem = problem
        self.weight = ExtrapolationWeight()
        if problem.batched:
            ones = torch.ones(problem.H.shape[0], dtype=torch.float64, device=problem.H.device)
            self.weight = ExtrapolationWeight(weight=ones, ceiling=ones.clone())
        self.previous = None
        self.reference = None
        self.guard = None
        if self.accept_rounding is not None:
            self.guard = RoundingGuard(problem, self.accept_rounding)

    @property
    def converged(self):
        return self.guard is not None and self.guard.converged

    # -- the state a checkpoint keeps (see torchnmf.solvers.checkpoint) --------
    def state_dict(self):
        return {
            "weight": dict(vars(self.weight)),
            "previous": None if self.previous is None else [t.clone() for t in self.previous],
            "reference": self.reference,
            "guard": None if self.guard is None else self.guard.state_dict(),
        }

    def load_state_dict(self, state):
        self.weight = ExtrapolationWeight(**state["weight"])
        self.previous = state["previous"]
        self.reference = state["reference"]
        if self.guard is not None and state.get("guard") is not None:
            self.guard.load_state_dict(state["guard"])

    def _start(self):
        """The H terms (``None`` when H is fixed) and the objective here."""
        p = self.problem
        if p.update_H:
            negative, positive, divergence = p.stats.h_terms(p.H, p.W)
            return (negative, positive), p.objective_value(divergence)
        return None, p.objective()

    def _trainable(self):
        """``(factor, fixed components)`` for each factor that may change."""
        p = self.problem
        return [
            (f, fixed)
            for f, fixed, on in ((p.H, p.fixed_H, p.update_H), (p.W, p.fixed_W, p.update_W))
            if on
        ]

    def _weight_for(self, factor):
        weight = self.weight.weight
        if isinstance(weight, torch.Tensor):
            weight = weight.to(factor.dtype)
            return weight if weight.dim() == 0 else weight.view(-1, 1, 1)
        return weight

    def _extrapolated_start(self):
        """The H terms and the objective where this iteration starts, and the
        device's refusal (a 0-dim bool tensor; ``None`` where decided on the host)."""
        trainable = self._trainable()
        factors = [f for f, _ in trainable]
        saved = [f.clone() for f in factors]
        refused = None
        if self.previous is None:
            terms, before = self._start()
        else:
            for (factor, fixed), previous, kept in zip(trainable, self.previous, saved):
                self._extrapolate_(factor, previous, self._weight_for(factor))
                if fixed is not None:  # fixed components stay bit-identical
                    factor.index_copy_(1, fixed, kept.index_select(1, fixed))
            terms, before = self._start()
            rejected = before > self.reference
            on_device = device.on_accelerator(rejected)
            if on_device and not self.problem.batched and not self.refuse_on_device:
                rejected = bool(rejected)  # one read per iteration, the CPU's iterates
            if on_device and self.problem.batched:
                # each member by its own decision, made on the device (see step)
                refused = rejected
                for factor, kept in zip(factors, saved):
                    factor.copy_(torch.where(refused.view(-1, 1, 1), kept, factor))
                self.weight.reject(refused)
                self.weight.accept(~refused)
            elif not isinstance(rejected, torch.Tensor):
                if rejected:
                    for factor, kept in zip(factors, saved):
                        factor.copy_(kept)
                    self.weight.reject()
                    terms, before = self._start()
                else:
                    self.weight.accept()
            elif not self.problem.batched:  # on an accelerator: decided there
                refused = rejected
                for factor, kept in zip(factors, saved):
                    factor.copy_(torch.where(refused, kept, factor))
                self.weight.on_device(refused.device)
                self.weight.reject(refused)
                self.weight.accept(~refused)
            elif bool(rejected.any()):
                # each member by its own decision; the terms of all are recomputed
                # (an accepted member's are the same again)
                for factor, kept in zip(factors, saved):
                    factor[rejected] = kept[rejected]
                self.weight.reject(rejected)
                self.weight.accept(~rejected)
                terms, before = self._start()
            else:
                self.weight.accept()
        self.previous = saved
        return terms, before, refused

    def select_(self, members):
        """Keep only the given members (int64 indices) of a batched problem."""
        self.problem = self.problem.select(members)
        self.weight.select(members)
        if self.previous is not None:
            self.previous = [f.index_select(0, members) for f in self.previous]
        if self.reference is not None:
            self.reference = self.reference[members]
        if self.guard is not None:
            self.guard.select(members)

    @property
    def refused(self):
        """Per member of a batched problem: whether the last step refused its
        iteration (``None`` where nothing was checked)."""
        return None if self.guard is None else self.guard.refused

    def step(self):
        refused = None
        if self._extrapolate_ is None:
            terms, before = self._start()
        else:
            terms, before, refused = self._extrapolated_start()
        if self.guard is not None:
            before = self.guard.check(before, [f for f, _ in self._trainable()])
            if self.guard.converged:
                return before
        if refused is not None:
            return self._refusable_updates(terms, before, refused)
        if terms is not None:
            self._update_H(terms)
        if self._extrapolate_ is None:
            if self.problem.update_W:
                self._update_W()
        else:
            self.reference = self._updated_objective(before)
        if self.guard is not None and self.problem.batched:
            # members whose iteration was refused stay where it started
            self.guard.restore_refused_([f for f, _ in self._trainable()])
        return before

    def _updated_objective(self, before):
        """Run the ``W`` update (where ``W`` may change) after the ``H`` update,
        and return the objective at the point the ``W`` update started from: the
        reference the next extrapolation must not exceed.

        That point's objective comes with the ``W`` pass (``divergence=True``).
        It is at most ``before`` (the ``H`` update is monotone) and at least
        the objective after the ``W`` update.  Against ``before`` itself, an
        extrapolation that undid most of the last update's progress would pass,
        and the next update would redo it, every iteration: fits cycled between
        a point and its extrapolation, with ``loss_history`` reporting the
        extrapolated points (30 times the iterate's objective at beta=1).
        """
        p = self.problem
        if p.update_W:
            penalty = p.penalty()  # at the point the W update starts from
            value = p.objective_value(self._update_W(divergence=True), penalty)
            # never above ``before``, whatever the rounding of either value
            return _minimum(value, before)
        if p.update_H:  # W is fixed: the objective after the H update
            return p.objective_value(p.stats.divergence(p.H, p.W))
        return before

    def _refusable_updates(self, terms, before, refused):
        """The updates after a decision made on the device (see the class
        docstring): when ``refused``, the factors are already back at the kept
        point, the ``H`` update (from the refused point's terms) is undone, and
        the objective returned is the kept point's, from the ``W`` pass."""
        p = self.problem
        if terms is not None:
            start = p.H.clone()
            self._update_H(terms)
            p.H.copy_(torch.where(refused.view(-1, 1, 1) if p.batched else refused, start, p.H))
        if p.update_W:
            penalty = p.penalty()  # at the point the W pass starts from
            kept = p.objective_before(self._update_W(divergence=True), penalty)
        else:  # H is back at the kept point when refused, and W never moves
            kept = p.objective_before(p.stats.divergence(p.H, p.W))
        # ``kept`` is the objective where the W pass started: the kept point's
        # when refused, else the point after the H update (see _updated_objective)
        before = torch.where(refused, kept, before)
        self.reference = torch.minimum(kept, before)  # as in _updated_objective
        return before
