"""Checkpoints of a fit: save every few iterations, resume exactly.

A checkpoint holds the factors (in a distributed fit, each process its own
rows of ``H``; one file per process), the solver's state (the extrapolation
weight, the previous iterate, HALS's floors) and the history, so that a fit
resumed from it runs the same iterations as one never interrupted.  Files are
written to a temporary name in the same folder and renamed over the last
checkpoint (an atomic replace), so a crash at any moment leaves the last
complete checkpoint readable; in a distributed fit the processes rename only
after all of them have written.  Files are read with ``weights_only=True``:
nothing is unpickled but tensors and plain values.
"""
import os

import torch

__all__ = ["Checkpointing", "agreed_checkpointing", "checkpoint_path", "load_checkpoint", "save_atomic"]

FORMAT = "torchnmf-checkpoint-1"
# settings a resumed fit may change: when to stop
RESUMABLE = ("max_iter", "tol")


def checkpoint_path(path, rank=0, size=1):
    """The file of one process: ``path`` itself, or ``path.rank<r>`` in a group of several."""
    path = os.fspath(path)
    return path if size == 1 else f"{path}.rank{rank}"


def save_atomic(state, path, before_replace=None):
    """``torch.save`` to a temporary file, flushed to disk, then renamed over ``path``."""
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        with open(temporary, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def check_writable(path, name):
    """A ``ValueError`` now, not after the first ``every`` iterations, when no file
    can be written at ``path``: a directory, or in a missing or read-only one."""
    if os.path.isdir(path):
        raise ValueError(f"{name}={path!r} is a directory; give a file name inside it")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"{name}={path!r}: the directory {directory!r} does not exist; create it first")
    if not os.access(directory, os.W_OK):
        raise ValueError(f"{name}={path!r}: the directory {directory!r} is not writable")


def load_checkpoint(path):
    """The saved state at ``path`` (a ``ValueError`` for a file that is not one)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise ValueError(f"resume={path!r} is not a readable torchnmf checkpoint ({error})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"resume={path!r} is not a torchnmf checkpoint")
    return state


def agreed_checkpointing(checkpointing):
    """What every process of a group must share about ``checkpointing`` (a
    :class:`Checkpointing` or ``None``), as plain values: the iterations at which
    each saves (every save is a collective) and whether it resumes."""
    if checkpointing is None:
        return {"checkpoints": "none", "resume": False}
    every = "none" if checkpointing.path is None else f"every {checkpointing.every} iterations"
    return {"checkpoints": every, "resume": checkpointing.state is not None}


class Checkpointing:
    """Saving every ``every`` iterations to ``path`` and/or resuming from ``resume``.

    Built at the entry point (reading the file to resume from, so that a
    missing or foreign file fails with the other input checks), then
    attached (:meth:`attach`) to the fit's settings (plain values, stored in every
    checkpoint and compared on resume) and its reduction.  In a group of
    several processes each reads and writes ``path.rank<r>``.
    """

    def __init__(self, path=None, every=10, resume=None, process_group=None):
        rank, size = 0, 1
        if process_group is not None:
            import torch.distributed as dist

            rank, size = dist.get_rank(process_group), dist.get_world_size(process_group)
        self.path = None if path is None else checkpoint_path(path, rank, size)
        self.every = every
        self.resume = resume
        self.state = None
        self.reduction = None
        self.settings = {}
        if self.path is not None:
            check_writable(self.path, "checkpoint")
        if resume is not None:
            self.state = load_checkpoint(checkpoint_path(resume, rank, size))

    def attach(self, settings, reduction=None):
        """Check a resumed state against this fit's ``settings`` (and, across
        processes, that every process can resume, from the same iteration)."""
        self.settings = dict(settings)
        self.reduction = reduction
        if self.state is None:
            return self
        saved = self.state["settings"]
        refusal = None
        for name, value in self.settings.items():
            if name not in RESUMABLE and saved.get(name) != value:
                refusal = ValueError(
                    f"resume={os.fspath(self.resume)!r} was saved with {name}={saved.get(name)!r}, "
                    f"but this fit has {name}={value!r}; resume with the same settings"
                )
                break
        if reduction is None:
            if refusal is not None:
                raise refusal
            return self
        # every process learns of a refusal, instead of waiting for the refused one
        everyone = reduction.gather_objects(
            (self.state["n_iter"], None if refusal is None else str(refusal)),
            "exchange of checkpoints",
        )
        if refusal is not None:
            raise refusal
        for rank, (_, other) in enumerate(everyone):
            if other is not None:
                raise ValueError(f"resume: rank {rank} refused its checkpoint ({other}); every "
                                 f"process stops")
        done = [n_iter for n_iter, _ in everyone]
        if len(set(done)) > 1:
            raise ValueError(
                f"resume: the processes' checkpoints are from different iterations {done}; "
                f"resume from a checkpoint every process completed"
            )
        return self

    def loop_options(self, problem, solver):
        """Keyword arguments of :func:`~torchnmf.solvers.loop.run_fit` for this fit;
        restores the saved factors and solver state into ``problem`` and ``solver``."""
        options = {}
        if self.state is not None:
            for name in ("H", "W"):
                getattr(problem, name).copy_(self.state[name])
            if hasattr(solver, "load_state_dict"):
                solver.load_state_dict(self.state["solver"])
            options["history"] = list(self.state["history"])
        if self.path is not None:
            options["after_iteration"] = lambda n_iter, history: self._save(problem, solver, n_iter, history)
        return options

    def _save(self, problem, solver, n_iter, history):
        if n_iter % self.every:
            return
        state = {
            "format": FORMAT,
            "n_iter": n_iter,
            "history": list(history),
            "H": problem.H.detach().clone(),
            "W": problem.W.detach().clone(),
            "solver": solver.state_dict() if hasattr(solver, "state_dict") else {},
            "settings": self.settings,
        }
        barrier = None
        if self.reduction is not None:
            # rename only once every process has its new file on disk
            barrier = lambda: self.reduction.sum_float(0.0)  # noqa: E731
        save_atomic(state, self.path, barrier)
