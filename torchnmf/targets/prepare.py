"""Targets at the entry point: validation of ``V`` and its mask, once per call.

:func:`prepare_target` turns what a user passed (a dense or sparse tensor, an
optional boolean mask, NaN as missing on request) into the form every target
kind expects: a checked ``V`` holding zeros at the unobserved entries, and a
mask that is ``None`` when every entry is observed.  The caller's tensors are
never modified.
"""
import torch

from .._validation import (
    canonical_sparse,
    check_choice,
    check_mask,
    check_non_negative_tensor,
    check_real_tensor,
    check_target,
)
from .sparse import SPARSE_LAYOUTS

__all__ = ["MISSING", "prepare_target"]

# Accepted values of ``missing``: "error" rejects NaN, "mask" treats it as unobserved.
MISSING = ("error", "mask")


def prepare_target(V, mask=None, missing="error", name="V"):
    """Validate ``V`` with an optional mask and return ``(V, mask)``.

    Without a mask and with ``missing="error"`` this is :func:`check_target`
    and the mask stays ``None``.  Otherwise NaN entries join the unobserved
    ones when ``missing="mask"``, the observed entries must be finite and
    non-negative, and the returned ``V`` is a new tensor holding zeros at the
    unobserved entries (the caller's tensor is never modified).  A mask with
    no unobserved entry left is returned as ``None`` (the plain dense path).
    """
    missing = check_choice(missing, "missing", MISSING)
    if mask is None and missing == "error":
        if (isinstance(V, torch.Tensor) and V.layout == torch.strided and V.is_floating_point()
                and torch.isnan(V.sum())):  # one reduction, no V-sized temporary
            nan = torch.isnan(V)
            if nan.any():
                raise ValueError(
                    f"{name} contains NaN ({int(nan.sum())} entries); pass missing='mask' to "
                    f"treat NaN as missing values, or a mask that hides them"
                )
        return check_target(V, name), None
    check_real_tensor(V, name)
    if V.layout != torch.strided:
        return _prepare_sparse(V, mask, missing, name)
    if not V.is_floating_point():
        V = V.to(torch.get_default_dtype())
    observed = torch.ones_like(V, dtype=torch.bool) if mask is None else check_mask(
        mask, V.shape, V.device
    )
    nan = torch.isnan(V)
    if missing == "mask":
        observed = observed & ~nan
    elif (nan & observed).any():
        _refuse_observed_nan(name, nan & observed)
    check_non_negative_tensor(V[observed], name)
    if bool(observed.all()):
        return V, None
    return torch.where(observed, V, torch.zeros((), dtype=V.dtype, device=V.device)), observed


def _refuse_observed_nan(name, observed_nan):
    raise ValueError(
        f"{name} contains NaN at {int(observed_nan.sum())} observed entries; pass "
        f"missing='mask' to treat NaN as missing values, or hide them with the mask"
    )


def _prepare_sparse(V, mask, missing, name):
    """:func:`prepare_target` for a sparse ``V``: a coalesced COO tensor holding
    zeros at its unobserved stored entries, and the dense mask (or ``None``)."""
    if V.layout not in SPARSE_LAYOUTS or V.dense_dim() != 0:
        return check_target(V, name), None  # its errors name the problem
    if not V.is_floating_point():
        V = V.to(torch.get_default_dtype())
    V = canonical_sparse(V, name)
    observed = torch.ones(V.shape, dtype=torch.bool, device=V.device) if mask is None else (
        check_mask(mask, V.shape, V.device)
    )
    indices, values = V.indices(), V.values()
    nan = torch.isnan(values)
    at_stored = observed[indices[0], indices[1]]
    if missing == "mask":
        if nan.any():
            observed = observed.clone()  # never the caller's mask
            observed[indices[0, nan], indices[1, nan]] = False
            at_stored = at_stored & ~nan
    elif (nan & at_stored).any():
        _refuse_observed_nan(name, nan & at_stored)
    check_non_negative_tensor(values[at_stored], name)
    if bool(observed.all()):
        return V, None
    values = torch.where(at_stored, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return torch.sparse_coo_tensor(
        indices, values, V.shape, is_coalesced=True, check_invariants=False
    ), observed
