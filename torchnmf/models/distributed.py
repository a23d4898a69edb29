"""How a fit request with a ``process_group`` joins the other processes.

Before any iteration the processes of the group (each with its own rows of
``V``) exchange their settings once and either all go on or all fail:
a setting that differs between processes, or a local input that was refused,
raises the same clear error on every process (naming the setting and the
rank).  Then ``W`` is made identical everywhere from rank 0 (as
DistributedDataParallel does with parameters), every column is checked to
have an observed entry on some process, and the statistics of the local rows
are wrapped so that the solvers see the stacked matrix
(:mod:`torchnmf.targets.distributed`).
"""
import math
import numbers

import torch

from ..targets.distributed import DEFAULT_TIMEOUT, DistributedStats, Reduction
from ..targets.streamed import StreamedTarget, masked_hals_error

__all__ = [
    "check_process_group",
    "check_timeout",
    "fit_settings",
    "join",
    "agree_on_mask",
    "distributed_problem",
    "row_offset",
]


def check_process_group(process_group):
    """``process_group`` as given, after checking that it can be used (or ``None``)."""
    if process_group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "process_group needs an initialised torch.distributed; call "
            "torch.distributed.init_process_group first (torchrun sets up its environment)"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed process group (e.g. "
            f"torch.distributed.group.WORLD), got {type(process_group).__name__}"
        )
    return process_group


def check_timeout(timeout):
    """A positive finite number of seconds (``None`` gives the default)."""
    if timeout is None:
        return DEFAULT_TIMEOUT
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds, got {type(timeout).__name__}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a positive finite number of seconds, got {timeout}")
    return float(timeout)


def join(process_group, timeout, settings, failure=None, rows=0):
    """Exchange settings with the other processes; the :class:`Reduction` to fit with.

    ``settings`` is a dict of what must agree (every process compares its
    values with rank 0's); ``failure`` the exception this process's own
    checks raised, if any, which is re-raised here after the exchange so that
    the other processes fail too instead of waiting for it.  ``rows`` is this
    process's row count; the reduction remembers every process's.

    Raises:
        ValueError: a setting differs between processes, or another process
            refused its input.
    """
    reduction = Reduction(process_group, timeout)
    payload = {
        "settings": None if failure is not None else settings,
        "failure": None if failure is None else f"{type(failure).__name__}: {failure}",
        "rows": rows,
    }
    everyone = reduction.gather_objects(payload)
    if failure is not None:
        raise failure
    for rank, other in enumerate(everyone):
        if other["failure"] is not None:
            raise ValueError(
                f"process_group: rank {rank} refused its input ({other['failure']}); "
                f"every process stops"
            )
    reference = everyone[0]["settings"]
    for rank, other in enumerate(everyone[1:], start=1):
        for name, value in reference.items():
            if other["settings"].get(name) != value:
                raise ValueError(
                    f"process_group: every process must pass the same {name}, but rank "
                    f"{rank} has {name}={other['settings'].get(name)!r} and rank 0 has "
                    f"{name}={value!r}"
                )
    reduction.rows = [other["rows"] for other in everyone]
    return reduction


def fit_settings(model, **options):
    """What every process of a distributed fit must agree on, as plain values."""
    settings = {
        "model": type(model).__name__,
        "columns": int(model.W.shape[0]),
        "rank": int(model.rank),
        "dtype": str(model.W.dtype),
    }
    for name, value in options.items():
        settings[name] = value.tolist() if isinstance(value, torch.Tensor) else value
    return settings


def agree_on_mask(reduction, V, mask, columns=True, solver=None):
    """The local mask, all True where another process has one and this one has none.

    Every process must use the same target kind (weighted HALS differs from
    plain HALS, and a masked kind's ``W`` terms have another form); a block
    that happens to have no missing entry gets an all-observed mask (a
    streamed ``V`` holds its mask: it becomes a masked target and ``None`` is
    returned).  With ``columns``, every column must be observed on some
    process.  ``solver="hals"`` with a mask and a streamed ``V`` on some
    process is refused on every process.
    """
    streamed = isinstance(V, StreamedTarget)
    masked = V.masked if streamed else mask is not None
    flags = torch.tensor([float(masked), float(streamed)], dtype=torch.float64, device=V.device)
    reduction.sum_(flags, what="agreement on masks")
    if flags[0].item() == 0:
        return None
    if solver == "hals" and flags[1].item() > 0:
        raise masked_hals_error()
    if streamed:
        V.masked = True  # (V is the fit's own target, built from the caller's matrix)
        # one row: per column, whether some entry is observed
        seen = V.observed_columns
        seen = torch.ones(1, V.shape[1], dtype=torch.bool, device=V.device) if seen is None else seen.reshape(1, -1)
    else:
        if mask is None:
            mask = torch.ones(V.shape, dtype=torch.bool, device=V.device)
        seen = mask
    if columns:
        check_columns_observed(reduction, seen)
    return mask


def row_offset(reduction):
    """The index of this process's first row in the stacked matrix."""
    return sum(reduction.rows[: reduction.rank])


def check_columns_observed(reduction, mask):
    """Every column needs an observed entry on some process (a ``ValueError`` otherwise)."""
    seen = mask.sum(0, dtype=torch.float64)  # masks are dense booleans
    reduction.sum_(seen, what="count of observed entries per column")
    empty = torch.nonzero(seen == 0).reshape(-1)
    if empty.numel():
        listed = ", ".join(str(int(i)) for i in empty[:5])
        raise ValueError(
            f"mask leaves column {listed} of V with no observed entry on any process; its "
            f"factor cannot be estimated: drop the column or observe at least one entry in it"
        )


def distributed_problem(problem, reduction):
    """``problem`` with its statistics summed over the processes of ``reduction``.

    The penalty on this process's rows of ``H`` rides with the divergence
    (one all-reduce); ``FitProblem.penalty`` then counts ``W``'s alone.
    """
    row_penalty = None
    if problem.update_H and problem.penalty_H:
        penalty_H = problem.penalty_H
        row_penalty = penalty_H.value
    problem.stats = DistributedStats(problem.stats, reduction, row_penalty)
    problem.reduction = reduction
    return problem
