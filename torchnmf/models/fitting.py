"""How a fit request becomes a problem for a solver, written once.

``fit``, ``transform`` and ``sparse_fit`` of every model go through the same
three steps: check the options (:func:`check_fit_options`), prepare the target
against the model (:func:`prepare_fit_target`: mask, NaN, shape, device,
dtype), then build a :class:`~torchnmf.solvers.problem.FitProblem` on the
target kind's statistics object (:func:`make_problem`) and run a solver on it
in the one loop (:func:`run_problem`).  :func:`solve` chains the last two for
the registered solvers.  Each entry point adds only what is its own (which
factors move, the start of ``transform``, the sparseness targets).
"""
import math
import os

import torch

from .. import _device as device
from .._validation import (
    check_beta_with_zeros,
    check_fraction,
    check_non_negative_number,
    check_observed_everywhere,
    check_positive_int,
    check_real,
)
from ..solvers.checkpoint import Checkpointing
from ..solvers.loop import run_fit
from ..solvers.penalty import Penalty
from ..solvers.problem import FitProblem
from ..solvers.scaling import (
    Normalisation,
    balance_,
    lighter_carrier,
    scaled_penalty,
    target_scale,
    working_dtype,
)
from ..solvers.registry import get_solver, require_features
from ..targets.prepare import prepare_target
from ..targets.residual import AccurateDivergence
from ..targets.streamed import StreamedTarget, as_streamed_source, wants_streaming
from .distributed import distributed_problem

__all__ = [
    "check_fit_options",
    "check_callback",
    "make_checkpointing",
    "require_factors",
    "prepare_fit_target",
    "make_problem",
    "run_problem",
    "solve",
]


def check_fit_options(beta, tol, max_iter, alpha=0, l1_ratio=0):
    """The checked ``(beta, tol, max_iter, alpha, l1_ratio)`` of a fit request."""
    return (
        check_real(beta, "beta"),
        check_non_negative_number(tol, "tol"),
        check_positive_int(max_iter, "max_iter"),
        check_non_negative_number(alpha, "alpha"),
        check_fraction(l1_ratio, "l1_ratio"),
    )


def make_checkpointing(checkpoint, checkpoint_every, resume, process_group=None):
    """The :class:`Checkpointing` of a fit request, or ``None`` without either path.

    Reads the file to resume from here, at the entry point, so that a missing
    or foreign file fails with the other input checks.
    """
    every = check_positive_int(checkpoint_every, "checkpoint_every")
    for name, value in (("checkpoint", checkpoint), ("resume", resume)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__}")
    if checkpoint is None and resume is None:
        return None
    return Checkpointing(checkpoint, every, resume, process_group)


def check_callback(callback):
    """A ``TypeError`` unless ``callback`` is ``None`` or callable."""
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    return callback


def require_factors(model, names, action):
    """A ``ValueError`` unless ``model`` has every factor in ``names``."""
    needed = "both factors" if len(names) == 2 else names[0]
    for name in names:
        if getattr(model, name) is None:
            raise ValueError(
                f"{action} needs {needed}, but this module has no {name}; "
                f"construct it with Vshape or give {name}"
            )


def prepare_fit_target(model, V, mask=None, missing="error", expected=None, rows=True, columns=True,
                       block_rows=None, progress=False):
    """Validate ``V`` (and its mask) against ``model``'s reconstruction.

    ``expected`` is the shape ``V`` must have (default the reconstruction's),
    or a function of the checked ``V`` giving it.  ``rows`` and ``columns``
    ask that every row and column has an observed entry (the factor along that
    axis is learnt).  Returns ``(V, mask)``: ``V`` in the factors' dtype with
    zeros at the unobserved entries, ``mask`` ``None`` when all are observed.

    A matrix to stream (a ``numpy.memmap``, a row source, a list of row
    blocks, or any matrix with ``block_rows`` given) comes back as a validated
    :class:`~torchnmf.targets.streamed.StreamedTarget` holding its mask, and
    ``mask`` ``None``; ``progress`` shows a bar over its blocks in every pass.
    """
    model._check_factors_agree()
    if wants_streaming(V, block_rows):
        target = _prepare_streamed(model, V, mask, missing, expected, rows, columns, block_rows)
        target.progress = progress and target.shape[0] > target.block_rows
        return target, None
    V, mask = prepare_target(V, mask, missing, "V")
    if callable(expected):
        expected = expected(V)
    V = model._conform_target(V, expected)
    if mask is not None:
        check_observed_everywhere(mask, rows=rows, columns=columns)
    return V, mask


def _prepare_streamed(model, V, mask, missing, expected, rows, columns, block_rows):
    if not model._closed_form:
        raise NotImplementedError(
            f"{type(model).__name__} does not stream targets from disk yet; streaming needs "
            f"the matrix model NMF"
        )
    target = StreamedTarget(
        as_streamed_source(V), mask, missing, block_rows, device=model.W.device,
        dtype=working_dtype(model.W.dtype), holds=model.W.dtype, rows=rows, columns=columns,
    )
    if callable(expected):
        expected = expected(target)
    expected = tuple(model._output_shape() if expected is None else expected)
    if tuple(target.shape) != expected:
        raise ValueError(
            f"V must have the shape of the reconstruction {expected}, got {tuple(target.shape)}"
        )
    return target


def check_target_for_beta(V, mask, beta):
    """``beta <= 0`` needs positive observed entries (a ``ValueError`` otherwise)."""
    if isinstance(V, StreamedTarget):  # counted when it was validated
        V.check_beta(beta)
        return
    check_beta_with_zeros(V if mask is None or V.layout != torch.strided else V[mask], beta)


def make_problem(model, V, mask, H, W, beta, reduction=None, carrier=None, **options):
    """The :class:`FitProblem` for a prepared target, on ``model``'s statistics.

    ``beta <= 0`` needs positive observed entries, which is checked here, once.
    ``reduction`` (a :class:`~torchnmf.targets.distributed.Reduction`) makes it
    a distributed problem: ``V`` and ``H`` are this process's rows.
    ``options`` are the remaining fields of :class:`FitProblem`.  The problem
    is the normalised one (see :mod:`torchnmf.solvers.scaling`): the target
    divided by its scale (from every process's ``scale_sums``), which
    ``carrier`` (``"H"`` or ``"W"``; default the first trainable of ``H``,
    ``W``) carries, and the penalties transformed to match.  Its solver works
    on copies; ``problem.normalisation`` writes them back into ``H`` and ``W``
    (:func:`run_problem` does so after every completed iteration).
    """
    check_target_for_beta(V, mask, beta)
    for name in ("fixed_H", "fixed_W"):
        if options.get(name) is not None:
            options[name] = options[name].to((H if name == "fixed_H" else W).device)
    update_H, update_W = options.get("update_H", True), options.get("update_W", True)
    dtype = working_dtype(H.dtype)  # float16 factors are fitted in float32
    if isinstance(V, torch.Tensor) and V.dtype != dtype:
        V = V.to(dtype)
    stats = model._statistics(V, beta, mask)
    total, count = stats.scale_sums()
    if reduction is not None:  # the same scale on every process
        total, count = reduction.sum_float(total), reduction.sum_float(count)
    scale = target_scale(total, count, dtype) if update_H or update_W else 1.0
    if carrier is None:
        carrier = "H" if update_H or not update_W else "W"
        if update_H and not update_W and scale != 1:  # (the same decision on every process)
            with torch.no_grad():
                carrier = lighter_carrier(H, W, scale,
                                          float if reduction is None else reduction.max_float)
    if scale != 1:
        stats = stats.scaled(1.0 / scale)
        for name in ("H", "W"):
            key = f"penalty_{name}"
            if key in options:
                options[key] = scaled_penalty(options[key], scale, beta, name == carrier, dtype)
    stats = AccurateDivergence(stats, dtype)
    normalisation = Normalisation(H, W, scale, carrier, beta, update_H, update_W, dtype)
    if update_H or update_W:
        _match_start(model, normalisation, total / max(count, 1) / scale, reduction,
                     V, mask, count, {"H": options.get("fixed_H"), "W": options.get("fixed_W")})
    penalised = any(options.get(f"penalty_{name}") for name in ("H", "W"))
    fixed = any(options.get(f"fixed_{name}") is not None for name in ("H", "W"))
    if update_H and update_W and not penalised and not fixed:
        # (a penalty is not invariant under the exchange, fixed components must stay)
        with torch.no_grad():
            balance_(normalisation.working["H"], normalisation.working["W"],
                     float if reduction is None else reduction.max_float)
    problem = FitProblem(
        stats=stats, H=normalisation.working["H"], W=normalisation.working["W"], beta=beta,
        **options,
    )
    if reduction is not None:
        problem = distributed_problem(problem, reduction)
    problem.normalisation = normalisation
    return problem


# A start whose mean reconstruction is this far from the data's is brought to the
# data's scale first: far off, the powers of the reconstruction overflow.
START_MISMATCH = 2.0**20


def _observed_reconstruction_sum(model, H, W, V, mask):
    """The sum of ``model.reconstruct(H, W)`` over the observed entries of ``V`` (a
    float; a masked streamed ``V`` is read once more for its mask)."""
    if isinstance(V, StreamedTarget) and V.may_hide:
        total = 0.0
        for start, stop, _, block_mask in V.blocks():
            rows = H[start:stop]
            total += (float(model._mean_reconstruction(rows, W)) * (stop - start) * W.shape[0]
                      if block_mask is None else model._observed_sum(rows, W, block_mask))
        return total
    if mask is None:
        return float(model._mean_reconstruction(H, W)) * math.prod(V.shape)
    return model._observed_sum(H, W, mask)


def _match_start(model, normalisation, mean_target, reduction, V, mask, count, fixed):
    """Scale the free components of a learnt working factor by a power of two when
    the start's mean reconstruction over the observed entries (``count`` of them, on
    every process) is far from the target's (the same decision on every process).

    The carrier is scaled when it is learnt, the other factor otherwise: a held
    factor (``update_W=False``) and fixed components (``fixed``: the indices per
    factor, or ``None``) are part of the problem, not of the start.  Hidden
    entries take no part: a masked fit of whole rows then starts as the fit of the
    observed rows alone does.
    """
    working = normalisation.working
    with torch.no_grad():
        start_sum = _observed_reconstruction_sum(
            model, working["H"].double(), working["W"].double(), V, mask)
    if reduction is not None:
        start_sum = reduction.sum_float(start_sum)
    mean_start = start_sum / max(count, 1)
    if not (mean_start > 0 and mean_target > 0 and math.isfinite(mean_start)):
        return
    ratio = mean_target / mean_start
    if 1 / START_MISMATCH <= ratio <= START_MISMATCH:
        return
    other = "W" if normalisation.carrier == "H" else "H"
    for name in (normalisation.carrier, other):
        factor = working[name]
        free = torch.ones(factor.shape[1], dtype=torch.bool, device=factor.device)
        if fixed[name] is not None:
            free[fixed[name]] = False
        if normalisation.update[name] and free.any():
            factor[:, free] *= 2.0 ** round(math.log2(ratio))
            return


def run_problem(problem, make_solver, tol, max_iter, verbose=False, callback=None, desc="fit",
                checkpointing=None, history=None):
    """Build the solver on ``problem`` and run the one loop; ``(n_iter, history)``.

    ``checkpointing`` (a :class:`~torchnmf.solvers.checkpoint.Checkpointing`)
    saves the fit every few iterations and, when it holds a saved state,
    resumes from it.  The caller's factors receive every completed iterate,
    scaled back, and the objectives are reported in the original units.
    ``history`` (a list, filled in place) keeps the objectives of an
    interrupted fit: on ``KeyboardInterrupt`` the caller's factors hold the last
    completed iterate and ``history`` ends with its objective; the interrupt is
    re-raised.
    """
    normalisation = problem.normalisation
    unit = normalisation.unit
    seen = [] if history is None else history

    def step():
        # the normalised problem's objective (the loop reports it times unit): a Python
        # number, or a 0-dim tensor the loop reads later
        before = solver.step()
        if not device.on_accelerator(before):  # read now (the loop would): the check below sees it
            before = float(before)
        reported = before * unit if unit != 1 else before
        if isinstance(reported, float) and not math.isfinite(reported):
            # the loop raises on it: the caller's factors keep the iterate whose
            # objective this is (the start, when the data overflow the objective)
            return before
        normalisation.commit()
        if not converged():
            seen.append(reported)
        return before

    def converged():  # the solver went back to where its previous iteration started
        return getattr(solver, "converged", False) is True

    def objective():
        return problem.objective()

    with torch.no_grad():
        solver = make_solver(problem)
        if problem.reduction is not None and problem.reduction.rank != 0:
            verbose = False  # one progress bar per fit, on rank 0
        options = {} if checkpointing is None else checkpointing.loop_options(problem, solver)
        if "history" in options:  # resumed: the working factors hold the saved iterate
            normalisation.commit()
            seen[:] = options["history"]
        try:
            return run_fit(
                step, objective, tol, max_iter,
                verbose=verbose, callback=callback, desc=desc, converged=converged, unit=unit,
                **options,
            )
        except KeyboardInterrupt:
            normalisation.restore()
            seen.append(objective() * unit)
            seen[:] = [float(value) for value in seen]
            raise


def solve(model, V, mask, H, W, beta, tol, max_iter, verbose, callback, solver,
          penalty_H=Penalty(), penalty_W=Penalty(), update_H=True, update_W=True,
          fixed_H=None, fixed_W=None, reduction=None, checkpointing=None, history=None):
    """Fit ``H`` and/or ``W`` in place with the registered ``solver``.

    Checks that the solver supports ``beta`` and the features asked for (a
    mask, fixed components that would otherwise move) before any work.
    Returns ``(n_iter, history)``.
    """
    solver_cls = get_solver(solver, beta)
    wanted = []
    if mask is not None:
        wanted.append("mask")
    if (fixed_H is not None and update_H) or (fixed_W is not None and update_W):
        wanted.append("fixed")
    require_features(solver_cls, solver, wanted)
    check_callback(callback)
    problem = make_problem(
        model, V, mask, H, W, beta, reduction, update_H=update_H, update_W=update_W,
        penalty_H=penalty_H, penalty_W=penalty_W, fixed_H=fixed_H, fixed_W=fixed_W,
    )
    return run_problem(problem, solver_cls, tol, max_iter, verbose, callback,
                       type(model).__name__, checkpointing, history)
