"""The solver registry: solvers by name, and the features each declares.

A solver joins by adding its class to :data:`SOLVERS`.  The class takes a
:class:`~torchnmf.solvers.problem.FitProblem`, offers ``step()``, and may
declare ``features`` (``"mask"``, ``"fixed"``), ``supports_beta(beta)`` with
a ``betas`` description, and ``name``.
"""
from .extrapolation import ExtrapolatedMU
from .hals import HALS
from .mu import MultiplicativeUpdates
from .problem import check_solver_beta

__all__ = ["SOLVERS", "get_solver", "check_solver_beta", "require_features"]

SOLVERS = {"mu": MultiplicativeUpdates, "hals": HALS, "mu_extrapolated": ExtrapolatedMU}


def get_solver(name, beta=None):
    """The solver class registered as ``name``; checks ``beta`` when given."""
    if not isinstance(name, str):
        raise TypeError(f"solver must be a string, got {type(name).__name__}")
    try:
        solver_cls = SOLVERS[name]
    except KeyError:
        raise ValueError(
            f"solver must be one of {sorted(SOLVERS)}, got {name!r}"
        ) from None
    if beta is not None:
        check_solver_beta(solver_cls, beta)
    return solver_cls


_FEATURE_NAMES = {"mask": "masked targets (mask= or missing='mask')", "fixed": "fixed components (fixed_W=, fixed_H=)"}


def require_features(solver_cls, name, wanted):
    """Raise ``NotImplementedError`` unless ``solver_cls`` declares every feature
    in ``wanted`` in its ``features`` attribute (solvers without one support none)."""
    supported = getattr(solver_cls, "features", frozenset())
    for feature in wanted:
        if feature not in supported:
            raise NotImplementedError(
                f"solver={name!r} does not support {_FEATURE_NAMES.get(feature, feature)} "
                f"yet; use solver='mu'"
            )
