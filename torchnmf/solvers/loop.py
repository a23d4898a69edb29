"""The one fitting loop: stopping rule, loss history, progress bar, callback.

Every solver supplies a ``step()`` that performs one iteration and returns the
objective at the point *before* that iteration (most solvers get it almost for
free while computing their statistics), and an ``objective()`` that evaluates
the current point.  The loop owns everything else.
"""
import math
import os
import sys
import warnings

from .._validation import ConvergenceWarning

__all__ = ["run_fit", "relative_decrease"]


def relative_decrease(previous, current):
    """``(previous - current) / previous``, 0 when both are zero."""
    if previous == 0:
        return 0.0
    return (previous - current) / abs(previous)


def run_fit(step, objective, tol, max_iter, verbose=False, callback=None, desc="fit",
            history=None, after_iteration=None):
    """Iterate ``step`` until the relative decrease of the objective is under ``tol``.

    Args:
        step: callable performing one iteration; returns the objective before it.
        objective: callable returning the objective at the current point.
        tol (float): stop once ``(previous - current) / previous < tol``; 0 never stops early.
        max_iter (int): the most iterations.
        verbose (bool): show a tqdm progress bar with the current objective.
        callback: optional ``callback(n_iter, loss)``, called after every
            iteration with the objective known at that time; returning ``True``
            stops the fit.
        history (list of float, optional): the objectives before the
            iterations already run (a resumed fit); the loop continues with
            iteration ``len(history) + 1`` and counts them in ``max_iter``.
        after_iteration: optional ``after_iteration(n_iter, history)``, called
            after every iteration that does not end the fit (a checkpoint).

    Returns:
        (n_iter, history): the iterations run and the objective after
        0, 1, ..., n_iter iterations (``history[0]`` is the starting point).
    """
    history = [] if history is None else list(history)
    bar = None
    if verbose:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_iter, initial=len(history), desc=desc, unit="it", leave=True)
    n_iter = len(history)
    stopped = False
    try:
        for n_iter in range(len(history) + 1, max_iter + 1):
            loss = float(step())
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"the objective became {loss} at iteration {n_iter}; "
                    f"check the data's scale or use a smaller beta"
                )
            history.append(loss)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.6g}", refresh=False)
            if callback is not None and callback(n_iter, loss):
                stopped = True
                break
            if tol > 0 and len(history) >= 2 and relative_decrease(history[-2], history[-1]) < tol:
                stopped = True
                break
            if after_iteration is not None:
                after_iteration(n_iter, history)
        history.append(float(objective()))
        if bar is not None:
            bar.set_postfix(loss=f"{history[-1]:.6g}")
    finally:
        if bar is not None:
            bar.close()
    if not stopped and tol > 0 and max_iter > 0:
        warnings.warn(
            f"the fit stopped after max_iter={max_iter} iterations before the relative "
            f"decrease of the objective fell under tol={tol:g}; raise max_iter or tol",
            ConvergenceWarning,
            stacklevel=_caller_level(),
        )
    return n_iter, history


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _caller_level():
    """The ``stacklevel`` of the first frame outside torchnmf (the user's call)."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE + os.sep):
        frame = frame.f_back
        level += 1
    return level
