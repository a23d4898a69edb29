r"""Trainers for any composition of non-negative models: :class:`BetaMu` and :class:`SparsityProj`.

Both are :class:`torch.optim.Optimizer` subclasses, so they train whatever
``model.parameters()`` yields: one :class:`~torchnmf.nmf.NMF`, an
``nn.Sequential`` of them, an :class:`~torchnmf.nmf.NMFD` inside a larger
module, a user's own module.

:class:`BetaMu` takes multiplicative steps on the beta-divergence
:math:`D_\beta(V \,|\, \hat V)` (see :mod:`torchnmf.metrics`) between the
target and the prediction that the closure returns, plus the optional
penalties

.. math::

    \lambda_1 \|X\|_1 + \frac{\lambda_2}{2} \|X\|_F^2
    + \frac{\mu}{2} \sum_{r \ne s} \langle X_{:, r}, X_{:, s} \rangle

for every parameter :math:`X`, where :math:`X_{:, r}` is component ``r`` (the
slice along dimension 1, all other dimensions flattened): the last term, with
:math:`\mu` = ``orthogonal``, is the total overlap between components, zero
exactly when no two components share a non-zero entry.  Its gradient,
:math:`\mu \sum_{s \ne r} X_{:, s}`, is non-negative, so it joins the positive
part of the update; parameters of fewer than two dimensions are not penalised
by it.

Examples::

    >>> import torch
    >>> import torch.nn as nn
    >>> from torchnmf.nmf import NMF
    >>> from torchnmf.trainer import BetaMu
    >>> V = torch.rand(30, 8)
    >>> model = nn.Sequential(NMF((30, 4), rank=2), NMF(W=(8, 4)))
    >>> trainer = BetaMu(model.parameters(), beta=1)
    >>> for _ in range(10):
    ...     def closure():
    ...         trainer.zero_grad()
    ...         return V, model(None)
    ...     divergence = trainer.step(closure)

The two trainers share this module (past 400 lines, half of it documentation)
because they share the closure protocol and the parameter-group checks.
"""
import math

import torch
from torch.optim import Optimizer

from . import _device as device
from . import metrics
from .models.provenance import matrix_factors_of
from .solvers.mu import mu_exponent, mu_update_
from .solvers.penalty import Penalty
from .solvers.scaling import objective_unit, target_scale
from .solvers.sparseness import STEP_GROWTH, project_components_
from .targets.autograd import beta_gradient_parts
from .targets.dense import DenseMatrixStats, divergence_constant
from .targets.residual import ENTRYWISE_AMPLIFICATION, amplification
from ._validation import (
    check_beta_with_zeros,
    check_non_negative_number,
    check_non_negative_tensor,
    check_open_fraction,
    check_positive_int,
    check_real,
    check_target,
)

__all__ = ["BetaMu", "SparsityProj"]


def _check_closure(closure, expects):
    if closure is None or not callable(closure):
        raise TypeError(
            f"step needs a closure returning {expects}, got {type(closure).__name__}"
        )


def _undifferentiable(trainer, returns, error):
    """The error for a closure output autograd cannot differentiate; mostly torch.optim's
    closure idiom (``loss.backward()`` inside), which frees the graph first."""
    return ValueError(
        f"{trainer} could not differentiate what the closure returns ({error}); the "
        f"closure must return {returns} without calling backward: the trainer "
        f"differentiates it itself"
    )


def _trainable(group):
    return [p for p in group["params"] if p.requires_grad]


def relative_floor(positive):
    """The floor for a positive part: the dtype's epsilon times its largest entry, a
    0-dim tensor on the device (read nowhere: no synchronisation).

    The multiplicative update divides by the positive part; a floor keeps it
    from dividing by zero.  At the dtype's epsilon (what the fit's normalised
    problem uses) the floor would sit at another place for a parameter at
    another scale; relative to the parameter's own largest entry, a parameter
    times a power of two takes the same step.  Kept within the dtype's normal
    range, so that a zero part still has a positive floor.
    """
    info = torch.finfo(positive.dtype)
    peak = positive.amax() if positive.numel() else positive.new_zeros(())
    return (peak * info.eps).clamp_(info.tiny, info.max)


def _terms_too_large(beta):
    """Whether the closed form's terms exceed 16 times their size at beta=0.5 (near
    beta 0 or 1; see :func:`~torchnmf.targets.residual.amplification`): the value a
    step returns is then the entry-wise divergence of the prediction (on the digits
    in float32 the closed form was 93% off at beta=1e-6 on a chain, 0.09% at 0.001)."""
    return amplification(beta) > ENTRYWISE_AMPLIFICATION


class BetaMu(Optimizer):
    r"""Multiplicative beta-divergence updates of every parameter.

    Each :meth:`step` evaluates ``closure() -> (target, prediction)``, splits
    the gradient of :math:`D_\beta(\text{target} \,|\, \text{prediction})`
    with respect to each parameter into its positive and negative parts (two
    vector-Jacobian products, the same split that :meth:`NMF.fit
    <torchnmf.nmf.BaseComponent.fit>` uses for convolutional models) and
    updates the trainable parameters one after another (in parameter-group
    order; the closure is evaluated again before each, so every update sees the
    ones before it),

    .. math::

        X \leftarrow X \odot \left(\frac{\nabla^-_X}{\nabla^+_X + \lambda_1 + \lambda_2 X
        + \mu (\textstyle\sum_s X_{:, s} - X)}\right)^{\gamma(\beta)}

    with :math:`\gamma(\beta)` as in :mod:`torchnmf.solvers.mu`.  This is valid
    whenever the prediction is built from the parameters by operations whose
    gradients are non-negative combinations (products, sums, convolutions,
    chained models).  Parameters stay non-negative; those with
    ``requires_grad=False`` are left alone.

    When the prediction is a single :class:`~torchnmf.nmf.NMF`'s own output
    (``model()``, unmodified) and the trained parameters are its ``H`` and/or
    ``W``, the step takes :meth:`NMF.fit <torchnmf.nmf.BaseComponent.fit>`'s
    closed-form statistics instead (Gram products at beta=2, blockwise
    reconstruction otherwise) and evaluates the closure once: the same updates,
    gradients and returned divergence, at a fraction of the cost.  Any other
    prediction (a chain, a convolutional model, a user's module, ``model() * 1``)
    takes the generic route.

    The steps do not depend on the scale of the data: the step works on the
    target and prediction divided by a power of two near the target's mean entry
    (as :meth:`NMF.fit <torchnmf.nmf.BaseComponent.fit>` does, see
    :mod:`torchnmf.solvers.scaling`), with the penalties transformed to match,
    and floors each parameter's positive part relative to its own largest
    entry.  A target times :math:`2^k` and parameters scaled to match take the
    same steps, scaled exactly; the divergence and gradients returned are those
    of the caller's problem.

    After a step, each trainable parameter's ``.grad`` holds the gradient of the
    divergence alone (no penalty) at the point before the update; a parameter
    that the prediction does not use keeps its ``.grad`` and is not updated.

    Args:
        params: the parameters, or parameter groups (dicts) with their own options.
        beta (float): the divergence: 2 Euclidean, 1 Kullback-Leibler, 0 Itakura-Saito.
        l1_reg (float): :math:`\lambda_1 \ge 0`.
        l2_reg (float): :math:`\lambda_2 \ge 0`.
        orthogonal (float): :math:`\mu \ge 0`, the weight of the overlap between
            components (see the module's documentation).

    Raises:
        ValueError: for negative regularisation or a non-finite ``beta``;
            during :meth:`step`, for a closure output of the wrong shape, a
            negative target, a prediction with a negative, NaN or infinite entry
            (checked before any parameter changes; on an accelerator, at the first
            step only, since each check reads a value back), a parameter with a negative,
            NaN or infinite entry at its first step, or a prediction that cannot be
            differentiated (a closure that called ``backward`` itself).
        TypeError: for a closure output that is not ``(target, prediction)``.

    Examples::

        >>> import torch
        >>> from torchnmf.nmf import NMFD
        >>> from torchnmf.trainer import BetaMu
        >>> V = torch.rand(1, 16, 40)
        >>> model = NMFD(V.shape, rank=2, T=4)
        >>> trainer = BetaMu(model.parameters(), beta=1, l1_reg=0.01)
        >>> def closure():
        ...     trainer.zero_grad()
        ...     return V, model()
        >>> first = trainer.step(closure)
        >>> for _ in range(20):
        ...     last = trainer.step(closure)
        >>> bool(last < first)
        True
    """

    def __init__(self, params, beta=1, l1_reg=0, l2_reg=0, orthogonal=0):
        defaults = dict(beta=beta, l1_reg=l1_reg, l2_reg=l2_reg, orthogonal=orthogonal)
        self._forget_target()
        super().__init__(params, defaults)

    def _forget_target(self):
        """Drop what is cached about the last target (its check, constant and statistics)."""
        self._checked_target = None
        self._constant = None
        self._cached_stats = None
        self._scale = 1.0

    def __setstate__(self, state):
        # pickling and deepcopy keep only defaults, state and groups: the caches restart
        super().__setstate__(state)
        self._forget_target()

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["beta"] = check_real(group["beta"], "beta")
        for name in ("l1_reg", "l2_reg", "orthogonal"):
            group[name] = check_non_negative_number(group[name], name)
        for p in group["params"]:
            if p.layout != torch.strided:
                raise TypeError(f"BetaMu needs dense parameters, got one with layout {p.layout}")

    # -- closure output -----------------------------------------------------------
    def _check_output(self, output):
        if not isinstance(output, (tuple, list)) or len(output) != 2:
            raise TypeError(
                f"the closure must return (target, prediction), got {type(output).__name__}"
                + (f" of length {len(output)}" if isinstance(output, (tuple, list)) else "")
            )
        target, prediction = output
        for name, value in (("target", target), ("prediction", prediction)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"the closure must return (target, prediction) as tensors, but {name} is "
                    f"a {type(value).__name__}"
                )
            if value.layout != torch.strided:
                raise TypeError(
                    f"BetaMu needs a dense {name}, got layout {value.layout}; pass "
                    f"{name}.to_dense(), or fit a single model with a sparse target by "
                    f"NMF.fit, which never densifies it"
                )
        if prediction.grad_fn is None:
            raise ValueError(
                "the prediction the closure returns does not depend on any trainable "
                "parameter; compute it from the model inside the closure, with gradients "
                "enabled"
            )
        if target.shape != prediction.shape:
            raise ValueError(
                f"the closure's target and prediction must have the same shape, got "
                f"{tuple(target.shape)} and {tuple(prediction.shape)}"
            )
        target = target.detach()
        # every group's beta: a group added (or a beta changed) since the last check
        # may refuse the target's zeros
        betas = tuple(group["beta"] for group in self.param_groups)
        key = (target.data_ptr(), target._version, target.shape, target.stride(), target.dtype,
               betas)
        beta = betas[0]
        if key != self._checked_target or self._constant[0] != beta:
            check_target(target, "target")
            for group in self.param_groups:
                check_beta_with_zeros(target, group["beta"], "target")
            self._checked_target = key
            # The step works on the normalised problem, target / scale (see _parts_unit).
            self._scale = target_scale(float(target.sum(dtype=torch.float64)), target.numel(),
                                       prediction.dtype)
            # The divergence's part that depends on the normalised target alone, for
            # the value step returns.
            normalised = target.to(prediction.dtype)
            if self._scale != 1:
                normalised = normalised / self._scale
            self._constant = (beta, divergence_constant(normalised, beta))
        if target.dtype != prediction.dtype:
            target = target.to(prediction.dtype)
        return target, prediction

    # -- the step -------------------------------------------------------------------
    def _parts_unit(self, beta, power):
        r"""How much larger the normalised problem's gradient parts are than the
        original's: :math:`(1/s)^{\text{power}}`, ``power`` being
        :math:`\beta - 1` for a factor that scales with the prediction (every
        parameter on the generic route, ``H`` on the matrix route) and
        :math:`\beta` for one that does not (``W`` there).

        The step works on :math:`V / s` and :math:`\hat V / s`, :math:`s` a
        power of two near the target's mean entry (see
        :mod:`torchnmf.solvers.scaling`): the floors at the dtype's epsilon
        then sit at the same place relative to the data at every scale (on a
        target of 1e-9 the raw floors stalled a fit at a thousand times its
        divergence).  The parts' ratio, the update, is the original problem's;
        the penalties are multiplied by this unit to match.
        """
        if self._scale == 1:
            return 1.0
        return objective_unit(1.0 / self._scale, power)

    def _update_(self, group, p, negative, positive, unit=1.0):
        """The multiplicative update of ``p`` from its gradient parts, with the
        group's penalties (``negative`` is used as scratch space).  ``unit``
        (see :meth:`_parts_unit`) is the parts' scale against the original
        problem's; the penalties are multiplied by it.

        The positive part (penalties included) is floored relative to its
        largest entry (:func:`relative_floor`): a parameter at 2**-12 of
        another's scale (a chain's layers, the factors of a start made for
        other data) takes the same step as at the other's.
        """
        cap = torch.finfo(p.dtype).max
        weights = [min(group[name] * unit, cap) if group[name] else 0.0
                   for name in ("l1_reg", "l2_reg", "orthogonal")]
        if weights[2] and p.dim() >= 2:
            # out of place: ``positive`` may broadcast (beta=1 closed form)
            positive = positive + weights[2] * (p.sum(1, keepdim=True) - p)
        penalty = Penalty.from_weights(weights[0], weights[1])
        if penalty:
            positive = penalty.add_gradient_(positive.expand_as(p).clone(), p)
        mu_update_(p, negative, positive, mu_exponent(group["beta"]),
                   floor=relative_floor(positive))
        state = self.state[p]
        state["step"] = state.get("step", 0) + 1

    @staticmethod
    def _gradient(negative, positive, unit):
        """The original problem's gradient from the normalised problem's parts."""
        gradient = positive - negative
        return gradient if unit == 1 else gradient.div_(unit)

    @torch.no_grad()
    def step(self, closure):
        """One multiplicative update of every trainable parameter.

        Args:
            closure (callable): re-evaluates the model and returns
                ``(target, prediction)``.

        Returns:
            Tensor: the beta-divergence (of the first group's ``beta``) at the
            point before the update.
        """
        _check_closure(closure, "(target, prediction)")
        order = [(group, p) for group in self.param_groups for p in _trainable(group)]
        with torch.enable_grad():
            returned = closure()
            output = self._check_output(returned)
        # before any update: a NaN (parameters gone NaN) or a negative prediction (a
        # subtraction in the model) would silently spoil every parameter.  On an
        # accelerator the check reads a value back, a synchronisation the steps otherwise
        # avoid: there the first step's prediction only (a model that subtracts shows it)
        first = any("step" not in self.state[p] for _, p in order)
        if first or not device.on_accelerator(output[1]):
            check_non_negative_tensor(output[1].detach(), "prediction")
        for _, p in order:
            if "step" not in self.state[p]:
                # once per parameter: the update keeps signs and flushes what is under
                # the dtype's tiny to zero, so a signed start (nn.Linear's) would be
                # clamped silently
                check_non_negative_tensor(p.detach(), f"the parameter of shape {tuple(p.shape)}")
        factors = self._matrix_route(*output, order, self._constant[0],
                                     target_moves=returned[0].requires_grad)
        if factors is not None:
            return self._matrix_step(*output, *factors, order)
        gradients = []
        before = None
        for i, (group, p) in enumerate(order):
            with torch.enable_grad():
                if i > 0:
                    output = self._check_output(closure())
                target, prediction = output
                first = i == 0 and group["beta"] == self._constant[0]
                constant = self._constant[1] if first else None
                try:
                    ((negative, positive),), divergence = beta_gradient_parts(
                        prediction, target, group["beta"], [p], constant=constant,
                        scale=1.0 / self._scale,
                    )
                except torch.OutOfMemoryError:
                    raise
                except RuntimeError as error:
                    raise _undifferentiable("BetaMu", "(target, prediction)", error) from error
            if i == 0:
                if divergence is not None and not _terms_too_large(self._constant[0]):
                    unit = objective_unit(self._scale, self._constant[0])
                    before = (divergence * unit).to(prediction.dtype)
                else:
                    before = metrics._scaled_beta_div(prediction.detach(), target, self._constant[0])
            if negative is None:
                continue
            unit = self._parts_unit(group["beta"], group["beta"] - 1)
            gradients.append((p, self._gradient(negative, positive, unit)))
            self._update_(group, p, negative, positive, unit)
        if not order:  # nothing to train: the closure was still evaluated and checked
            target, prediction = output
            before = metrics._scaled_beta_div(prediction.detach(), target, self._constant[0])
        # The closure may clear gradients (zero_grad), so they are stored at the end.
        for p, gradient in gradients:
            p.grad = gradient
        return before

    # -- the closed-form route for one NMF's own reconstruction ----------------------
    @staticmethod
    def _matrix_route(target, prediction, order, beta, target_moves=False):
        """``(H, W)`` when the step can use :meth:`NMF.fit`'s closed-form statistics.

        That is when the prediction is exactly an :class:`~torchnmf.nmf.NMF`'s
        own :math:`H W^\top` (see :mod:`torchnmf.models.provenance`), every trainable
        parameter is one of those two factors and all share one ``beta``, the
        first group's (the divergence that :meth:`step` returns; a first group
        with nothing to train may have another), and
        the target stays what it is while they change: not computed with
        gradients (``target_moves``: a target made from the parameters, which
        the generic route evaluates again before each update) and sharing no
        memory with either factor.
        """
        factors = matrix_factors_of(prediction)
        if factors is None or not order or target_moves:
            return None
        H, W = factors
        storage = target.untyped_storage().data_ptr()
        if storage in (H.untyped_storage().data_ptr(), W.untyped_storage().data_ptr()):
            return None
        if any(p is not H and p is not W for _, p in order):
            return None
        if {group["beta"] for group, _ in order} != {beta}:
            return None
        return factors

    def _matrix_stats(self, target, beta):
        """The dense matrix statistics of the normalised target, built once per
        target and beta."""
        key = (self._checked_target, beta)
        cached = self._cached_stats
        if cached is None or cached[0] != key:
            stats = DenseMatrixStats(target, beta)
            if self._scale != 1:
                stats = stats.scaled(1.0 / self._scale)
            self._cached_stats = cached = (key, stats)
        return cached[1]

    def _matrix_step(self, target, prediction, H, W, order):
        """The step for one NMF: the same parts of the gradient, one parameter after
        the other in the same order, from Gram products (beta=2) or blockwise
        powers of :math:`H W^\top` instead of vector-Jacobian products; the
        closure is evaluated once.  The statistics are the normalised target's,
        with ``H / s`` standing for ``H`` (see :meth:`_parts_unit`)."""
        beta = order[0][0]["beta"]
        stats = self._matrix_stats(target, beta)
        gradients = []
        before = None
        for i, (group, p) in enumerate(order):
            H_ = H if self._scale == 1 else H / self._scale
            if p is H:
                negative, positive, divergence = stats.h_terms(H_, W, divergence=i == 0)
            elif i == 0:
                negative, positive, divergence = stats.w_terms(H_, W, divergence=True)
            else:
                negative, positive = stats.w_terms(H_, W)
            if i == 0 and _terms_too_large(beta):
                before = metrics._scaled_beta_div(prediction.detach(), target, beta)
            elif i == 0:
                # a float where the statistics assemble it on the host (dense, CPU)
                divergence = torch.as_tensor(divergence, dtype=torch.float64, device=H.device)
                unit = objective_unit(self._scale, beta)
                before = (divergence.clamp_min(0) * unit).to(prediction.dtype)
            unit = self._parts_unit(beta, beta - 1 if p is H else beta)
            gradients.append((p, self._gradient(negative, positive, unit)))
            self._update_(group, p, negative, positive, unit)
        for p, gradient in gradients:
            p.grad = gradient
        return before


class SparsityProj(Optimizer):
    r"""Hoyer's projected gradient step towards a target sparseness.

    Each :meth:`step` differentiates ``closure() -> loss``, moves every
    trainable parameter against its gradient and projects each of its
    components (the slices along ``dim``, all other dimensions flattened) onto
    the non-negative vectors with the component's L2 norm and Hoyer sparseness
    ``sparsity`` (see :func:`torchnmf.metrics.sparseness`).  The step is
    accepted when the loss does not grow; otherwise it is halved and retried,
    up to ``max_iter`` times (the parameters stay as they were when every try
    fails).  After an accepted step the next step size grows by 1.2 (Hoyer,
    JMLR 5, 2004).  As in the paper's initialisation, a parameter's first step
    starts by projecting it, so that the search begins from a feasible point.  Step sizes start at :math:`\|X\| / \|\nabla X\|` per
    parameter (at its first step with a non-zero gradient) and live in the
    optimizer's state.

    The closure returns the loss without calling ``backward``: the trainer
    differentiates it itself (and stores the gradients in ``.grad``), then
    calls it again under ``torch.no_grad()`` to test each trial step.

    Args:
        params: the parameters, or parameter groups.
        sparsity (float): the target sparseness, in (0, 1).
        dim (int): the dimension that indexes the components (1, the rank,
            for the factors of every torchnmf model).
        max_iter (int): the most step-size halvings per step.

    Raises:
        ValueError: ``sparsity`` outside (0, 1), a bad ``dim`` or ``max_iter``,
            or a parameter whose components have fewer than 2 entries; during
            :meth:`step`, a loss that cannot be differentiated (a closure that
            called ``backward`` itself).

    Examples::

        >>> import torch
        >>> from torchnmf.metrics import euclidean, sparseness
        >>> from torchnmf.nmf import NMF
        >>> from torchnmf.trainer import SparsityProj
        >>> V = torch.rand(30, 20)
        >>> model = NMF(V.shape, rank=3)
        >>> trainer = SparsityProj([model.W], sparsity=0.6)
        >>> for _ in range(5):
        ...     loss = trainer.step(lambda: euclidean(model(), V))
        >>> round(float(sparseness(model.W[:, 0])), 2)
        0.6
    """

    def __init__(self, params, sparsity, dim=1, max_iter=10):
        defaults = dict(sparsity=sparsity, dim=dim, max_iter=max_iter)
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["sparsity"] = check_open_fraction(group["sparsity"], "sparsity")
        group["max_iter"] = check_positive_int(group["max_iter"], "max_iter")
        dim = group["dim"]
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be an int, got {type(dim).__name__}")
        for p in group["params"]:
            if not -p.dim() <= dim < p.dim():
                raise ValueError(
                    f"dim must index a dimension of every parameter, got dim={dim} for a "
                    f"parameter of shape {tuple(p.shape)}"
                )
            if p.numel() // max(p.shape[dim], 1) < 2:
                raise ValueError(
                    f"SparsityProj needs components of at least 2 entries, but a parameter of "
                    f"shape {tuple(p.shape)} has {p.numel() // max(p.shape[dim], 1)} along "
                    f"dim={dim}"
                )

    @staticmethod
    def _loss(output):
        if not isinstance(output, torch.Tensor) or output.numel() != 1:
            raise TypeError(
                f"the closure must return the loss as a single-element tensor, got "
                f"{type(output).__name__}"
                + (f" of shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else "")
            )
        return output

    @torch.no_grad()
    def step(self, closure):
        """One projected gradient step with step-size search per parameter group.

        Args:
            closure (callable): re-evaluates the model and returns the loss.

        Returns:
            Tensor: the loss before the step.
        """
        _check_closure(closure, "the loss")
        with torch.enable_grad():
            loss = self._loss(closure())
        if loss.grad_fn is None:
            raise ValueError(
                "the loss the closure returns does not depend on any trainable parameter; "
                "compute it from the model inside the closure, with gradients enabled "
                "(and without calling backward)"
            )
        groups = [(group, _trainable(group)) for group in self.param_groups]
        params = [p for _, ps in groups for p in ps]
        try:
            with torch.enable_grad():
                grads = torch.autograd.grad(loss, params, allow_unused=True)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as error:
            raise _undifferentiable("SparsityProj", "the loss", error) from error
        gradient = dict(zip(map(id, params), grads))
        for p, g in zip(params, grads):
            if g is not None:
                p.grad = g
        before = loss.detach()
        best = float(before)
        for group, ps in groups:
            ps = [p for p in ps if gradient[id(p)] is not None]
            if ps:
                best = self._search_(group, ps, gradient, closure, best)
        return before

    def _search_(self, group, params, gradient, closure, best):
        """The step-size search of one group; returns the loss after it."""
        fresh = [p for p in params if "step_size" not in self.state[p]]
        for p in fresh:
            # Hoyer's initialisation: a parameter meets the constraint before its first step.
            project_components_(p, group["sparsity"], dim=group["dim"])
            slope = float(gradient[id(p)].norm())
            size = float(p.norm()) / slope if slope > 0 else math.inf
            if math.isfinite(size):
                self.state[p]["step_size"] = size
            # else a zero gradient (a start at a stationary point): there is no step to
            # take, and a step size of inf would refuse every later step; the size is
            # set at the first step with a gradient
        if fresh:
            best = float(self._loss(closure()))
        params = [p for p in params if "step_size" in self.state[p]]
        if not params:
            return best
        start = [p.detach().clone() for p in params]
        for _ in range(group["max_iter"]):
            for p, p0 in zip(params, start):
                trial = p0 - self.state[p]["step_size"] * gradient[id(p)]
                p.copy_(project_components_(trial, group["sparsity"], dim=group["dim"]))
            value = float(self._loss(closure()))
            if value <= best:
                for p in params:
                    self.state[p]["step_size"] *= STEP_GROWTH
                return value
            for p in params:
                self.state[p]["step_size"] /= 2
        for p, p0 in zip(params, start):
            p.copy_(p0)
        return best
