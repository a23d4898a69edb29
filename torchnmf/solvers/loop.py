"""The one fitting loop: stopping rule, loss history, progress bar, callback.

Every solver supplies a ``step()`` that performs one iteration and returns the
objective at the point *before* that iteration (most solvers get it almost for
free while computing their statistics), and an ``objective()`` that evaluates
the current point.  The loop owns everything else.

On an accelerator the objective a step returns is a 0-dim tensor on the
device, and reading it is a host-device synchronisation that stalls the queue
of kernels.  The loop therefore keeps those values on the device and reads
them back together every :data:`READ_BACK_EVERY` iterations (one transfer),
then applies the stopping rule, the progress bar and the finiteness check to
each in order.  The history stays complete (one entry per iteration run), but
a stop is decided at a read-back: a fit whose objective meets ``tol`` at
iteration ``k`` still runs to the next multiple of ``READ_BACK_EVERY`` (at
most ``READ_BACK_EVERY - 1`` iterations more, which only lower the
objective), and ``n_iter`` counts every iteration run.  With a ``callback``
the objective is read back after every iteration, so that the callback sees
each one as it happens and can stop the fit there (likewise with an
``after_iteration`` checkpoint).  On the CPU (or with a
step that returns a Python number) every iteration is read at once, exactly
as without this rule.

Inside an iteration nothing is read back on an accelerator
(:mod:`torchnmf._device`): the objective a step returns stays a tensor, the
extrapolating solvers accept or refuse a move with ``torch.where`` on a 0-dim
flag (see :class:`~torchnmf.solvers.alternating.AlternatingSolver` for what a
refusal then does), HALS runs its inner sweeps with the stopping flag on the
device, and the acceptance rule near an exact fit is left to the CPU.
``tests/test_loop.py`` runs these paths with a stand-in device and counts the
host reads inside every step (none) and the loop's read-backs (one per
:data:`READ_BACK_EVERY` iterations), for single and batched fits (restarts,
whose finished members leave the batch at a read-back).
"""
import math
import os
import sys
import warnings

import torch

from .._validation import ConvergenceWarning
from .. import _device as device

__all__ = ["run_fit", "run_batched_fit", "relative_decrease", "READ_BACK_EVERY"]

# Iterations between two read-backs of the objective from an accelerator
# (the original torchnmf also looked at its loss every 10 iterations).
READ_BACK_EVERY = 10


def _on_accelerator(loss):
    """Whether ``loss`` lives on a device whose read-back synchronises."""
    return device.on_accelerator(loss)


def _read_back(losses):
    """Python floats of a list of 0-dim tensors, in one transfer."""
    return torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in losses]).tolist()


def relative_decrease(previous, current):
    """``(previous - current) / previous``, 0 when both are zero."""
    if previous == 0:
        return 0.0
    return (previous - current) / abs(previous)


def run_fit(step, objective, tol, max_iter, verbose=False, callback=None, desc="fit",
            history=None, after_iteration=None, converged=None, unit=1.0):
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
        converged: optional callable, asked after every ``step()``; ``True``
            when that step found that the previous iteration raised the
            objective beyond rounding and put the factors back where that
            iteration started (see
            :class:`~torchnmf.solvers.acceptance.RoundingGuard`).  Then
            the step's objective is not recorded, the previous iteration
            counts as one that did not move (its objective is repeated at the
            end of the history), and the fit stops without a warning.
        unit (float): the data's unit of the objectives ``step`` and
            ``objective`` return (those of a normalised problem, see
            :mod:`~torchnmf.solvers.scaling`): the history, the progress bar and
            ``callback`` get them times ``unit``, while ``tol`` is applied to them
            as returned, where no product underflowed (the digits at 1e-300, beta=2:
            a history of zeros in the data's units, and a fit that stopped after
            two iterations).

    ``step()`` may return a Python number or a 0-dim tensor; tensors on an
    accelerator are read back every :data:`READ_BACK_EVERY` iterations (see
    the module's docstring).

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
    pending = []  # objectives still on the device, oldest first
    every = 1 if callback is not None or after_iteration is not None else READ_BACK_EVERY
    # the last objective as returned (the stopping rule's); a resumed history's in its units
    previous = history[-1] / unit if history and unit else None

    def record(loss, iteration):
        """Append ``loss`` in the data's units; that value."""
        reported = loss * unit if unit != 1 else loss
        _refuse_non_finite(reported, iteration)
        history.append(reported)
        return reported

    def take(loss, iteration):
        """Record one objective and apply the stopping rule to it; True to stop."""
        nonlocal previous
        reported = record(loss, iteration)
        last, previous = previous, loss
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{reported:.6g}", refresh=False)
        if callback is not None and callback(iteration, reported):
            return True
        if tol > 0 and last is not None and relative_decrease(last, loss) < tol:
            return True
        if after_iteration is not None:
            after_iteration(iteration, history)
        return False

    def flush():
        """Read back the pending objectives; True when one of them stops the fit."""
        values = _read_back(pending)
        first = n_iter - len(pending) + 1
        pending.clear()
        stop = False
        for offset, loss in enumerate(values):
            if stop:  # run past the stop: keep the history complete
                record(loss, first + offset)
                if bar is not None:
                    bar.update(1)
            else:
                stop = take(loss, first + offset)
        return stop

    try:
        for n_iter in range(len(history) + 1, max_iter + 1):
            loss = step()
            if converged is not None and converged():
                n_iter -= 1
                stopped = True
                break
            if _on_accelerator(loss):
                pending.append(loss)
                if len(pending) >= every and flush():
                    stopped = True
                    break
            elif take(float(loss), n_iter):
                stopped = True
                break
        if pending and flush():
            stopped = True
        history.append(float(objective()) * unit)
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


def _refuse_non_finite(loss, n_iter, member=None):
    """Raise on a non-finite ``loss``, the objective before iteration ``n_iter`` (that of
    the start for the first: "at iteration 1" read as if an iteration had run)."""
    if not math.isfinite(loss):
        which = "" if member is None else f" of member {member}"
        when = ("at the start" if n_iter == 1
                else f"after {n_iter - 1} iteration{'s' if n_iter > 2 else ''}")
        raise FloatingPointError(
            f"the objective{which} was {loss} {when}; "
            f"check the data's scale or use a smaller beta"
        )


def run_batched_fit(solver, tol, max_iter, verbose=False, desc="restarts"):
    """:func:`run_fit` for a solver on a :class:`~.problem.BatchedProblem`.

    Every member follows :func:`run_fit`'s rule on its own objective: it stops
    once its relative decrease falls under ``tol`` (or at ``max_iter``), and
    its history ends with the objective at its final point.  A finished
    member's factors are written back into the stacks the problem started
    with, and the member is left out of every later iteration (the solver's
    ``select_`` keeps the others), so finished members cost nothing.  A member
    whose iteration the solver refused (its ``refused``, one bool per running
    member; see :class:`~torchnmf.solvers.acceptance.RoundingGuard`) stops as
    :func:`run_fit` stops on ``converged``: that step's objective is not
    recorded and the previous iteration counts as one that did not move.

    On an accelerator the members' objectives stay on the device and are read
    back together every :data:`READ_BACK_EVERY` iterations, as :func:`run_fit`
    reads one fit's: a member that meets ``tol`` in between runs on to the
    read-back (its history stays complete and its ``n_iter`` counts every
    iteration run), and finished members leave the batch there.

    Returns:
        (n_iter, histories, converged): per member, the iterations run, the
        objective after 0, 1, ..., n_iter iterations, and whether it stopped on
        ``tol`` (or a zero objective) rather than at ``max_iter``.  The
        problem's ``H`` and ``W`` stacks hold every member's final factors.
    """
    H_out, W_out = solver.problem.H, solver.problem.W
    count = H_out.shape[0]
    histories = [[] for _ in range(count)]
    n_iter = [0] * count
    converged = [False] * count
    members = list(range(count))  # the members still running, in the solver's order
    previous = None
    bar = None
    if verbose:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_iter, desc=desc, unit="it", leave=True)
    pending = []  # the members' objectives still on the device, oldest first
    try:
        for iteration in range(1, max_iter + 1):
            losses = solver.step()
            last = iteration == max_iter
            if _on_accelerator(losses):
                pending.append(losses)
                if len(pending) < READ_BACK_EVERY and not last:
                    continue
                block = _read_back(pending)
                pending.clear()
                refused = [False] * len(members)  # the device refuses nothing (acceptance.py)
            else:
                block = [losses.tolist()]
                # members whose previous iteration rounding raised (RoundingGuard) are
                # back where it started: that iteration did not move, and they stop as
                # converged
                refused = getattr(solver, "refused", None) or [False] * len(members)
            done = list(refused)
            first = iteration - len(block) + 1
            for offset, row in enumerate(block):
                for i, (member, loss) in enumerate(zip(members, row)):
                    if refused[i]:
                        continue
                    _refuse_non_finite(loss, first + offset, member)
                    histories[member].append(loss)  # also past a stop: complete histories
                    if not done[i] and previous is not None and tol > 0:
                        done[i] = relative_decrease(previous[i], loss) < tol
                previous = row
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(running=len(members), best=f"{min(row):.6g}", refresh=False)
            if not (last or any(done)):
                continue
            finishing = [i for i, d in enumerate(done) if d or last]
            index = torch.tensor(finishing, device=H_out.device)
            finished = solver.problem.select(index)
            finals = finished.objective().tolist()
            targets = torch.tensor([members[i] for i in finishing], device=H_out.device)
            H_out.index_copy_(0, targets, finished.H)
            W_out.index_copy_(0, targets, finished.W)
            for i, final in zip(finishing, finals):
                histories[members[i]].append(final)
                n_iter[members[i]] = iteration - 1 if refused[i] else iteration
                converged[members[i]] = bool(done[i])
            kept = [i for i, d in enumerate(done) if not (d or last)]
            if not kept:
                break
            solver.select_(torch.tensor(kept, device=H_out.device))
            members = [members[i] for i in kept]
            previous = [previous[i] for i in kept]
    finally:
        if bar is not None:
            bar.close()
    unfinished = sum(not c for c in converged)
    if tol > 0 and unfinished:
        warnings.warn(
            f"{unfinished} of {count} members stopped after max_iter={max_iter} iterations "
            f"before the relative decrease of the objective fell under tol={tol:g}; raise "
            f"max_iter or tol",
            ConvergenceWarning,
            stacklevel=_caller_level(),
        )
    return n_iter, histories, converged


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _caller_level():
    """The ``stacklevel`` of the first frame outside torchnmf (the user's call)."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE + os.sep):
        frame = frame.f_back
        level += 1
    return level
