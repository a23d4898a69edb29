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
import os

import torch

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
from ..solvers.registry import get_solver, require_features
from ..targets.prepare import prepare_target
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
        dtype=model.W.dtype, rows=rows, columns=columns,
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


def make_problem(model, V, mask, H, W, beta, reduction=None, **options):
    """The :class:`FitProblem` for a prepared target, on ``model``'s statistics.

    ``beta <= 0`` needs positive observed entries, which is checked here, once.
    ``reduction`` (a :class:`~torchnmf.targets.distributed.Reduction`) makes it
    a distributed problem: ``V`` and ``H`` are this process's rows.
    ``options`` are the remaining fields of :class:`FitProblem`.
    """
    check_target_for_beta(V, mask, beta)
    for name in ("fixed_H", "fixed_W"):
        if options.get(name) is not None:
            options[name] = options[name].to((H if name == "fixed_H" else W).device)
    problem = FitProblem(stats=model._statistics(V, beta, mask), H=H, W=W, beta=beta, **options)
    if reduction is not None:
        problem = distributed_problem(problem, reduction)
    return problem


def run_problem(problem, make_solver, tol, max_iter, verbose=False, callback=None, desc="fit",
                checkpointing=None):
    """Build the solver on ``problem`` and run the one loop; ``(n_iter, history)``.

    ``checkpointing`` (a :class:`~torchnmf.solvers.checkpoint.Checkpointing`)
    saves the fit every few iterations and, when it holds a saved state,
    resumes from it.
    """
    with torch.no_grad():
        solver = make_solver(problem)
        if problem.reduction is not None and problem.reduction.rank != 0:
            verbose = False  # one progress bar per fit, on rank 0
        return run_fit(
            solver.step, problem.objective, tol, max_iter,
            verbose=verbose, callback=callback, desc=desc,
            **({} if checkpointing is None else checkpointing.loop_options(problem, solver)),
        )


def solve(model, V, mask, H, W, beta, tol, max_iter, verbose, callback, solver,
          penalty_H=Penalty(), penalty_W=Penalty(), update_H=True, update_W=True,
          fixed_H=None, fixed_W=None, reduction=None, checkpointing=None):
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
                       type(model).__name__, checkpointing)
