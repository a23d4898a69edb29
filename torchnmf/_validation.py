"""Argument checks shared by every public entry point.

Each helper raises ``ValueError`` for a bad value and ``TypeError`` for a wrong
type, naming the argument, the rule and what was given, so that messages read
the same everywhere.  Checks run once at the entry point; inner loops trust
their inputs.
"""
import math
import numbers

import torch

__all__ = [
    "ConvergenceWarning",
    "check_positive_int",
    "check_seed",
    "check_non_negative_number",
    "check_real",
    "check_fraction",
    "check_open_fraction",
    "check_real_tensor",
    "check_target",
    "check_non_negative_tensor",
    "check_finite_tensor",
    "check_fits_dtype",
    "check_beta_with_zeros",
    "check_choice",
    "check_mask",
    "check_observed_everywhere",
    "check_components",
    "canonical_sparse",
]


class ConvergenceWarning(UserWarning):
    """Raised as a warning when ``max_iter`` ends a fit before ``tol`` was reached."""


def _describe(value):
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return repr(value)


def check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {_describe(value)}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


def check_seed(value, name="seed"):
    """An integer seed as a Python int: torch's ``manual_seed`` refuses numpy integers
    ("an integer is required"), and ``None`` failed in ``seed + k``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {_describe(value)}")
    return int(value)


def check_real(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_describe(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_non_negative_number(value, name):
    value = check_real(value, name)
    if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value}")
    return value


def check_fraction(value, name):
    """A number in the closed interval [0, 1]."""
    value = check_real(value, name)
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def check_open_fraction(value, name):
    """A number in the open interval (0, 1)."""
    value = check_real(value, name)
    if not 0 < value < 1:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value}")
    return value


def _values(tensor):
    return tensor._values() if tensor.layout == torch.sparse_coo else (
        tensor.values() if tensor.layout in (torch.sparse_csr, torch.sparse_csc) else tensor
    )


def _extremes(tensor, name, rule):
    """The smallest and largest stored entry as Python numbers (``None`` when there is
    none), after a ``ValueError`` for NaN; one reduction pass, no temporary of the
    tensor's size (NaN propagates through min and max)."""
    values = _values(tensor)
    if values.numel() == 0:
        return None
    if values.is_complex():
        raise TypeError(f"{name} must be real, got dtype {values.dtype}")
    # one read-back for both (on an accelerator each read waits for the device)
    smallest, largest = torch.stack(torch.aminmax(values)).tolist()
    if math.isnan(smallest) or math.isnan(largest):
        raise ValueError(f"{name} contains NaN; {rule}")
    return smallest, largest


def check_non_negative_tensor(tensor, name):
    """Raise unless every entry is finite and non-negative.

    An uncoalesced sparse COO tensor means the sums of its duplicate entries:
    a negative stored value is refused only when its sum is negative too.
    """
    rule = ("non-negative factorisation needs finite, non-negative values (fill or drop the "
            "missing entries first)")
    extremes = _extremes(tensor, name, rule)
    if extremes is None:
        return tensor
    smallest, largest = extremes
    if smallest < 0 and tensor.layout == torch.sparse_coo and not tensor.is_coalesced():
        smallest, largest = _extremes(tensor.coalesce(), name, rule)
    if smallest < 0:
        raise ValueError(f"{name} must be non-negative, but its smallest entry is {smallest:g}")
    if math.isinf(largest):
        raise ValueError(f"{name} contains infinite values; every entry must be finite")
    return tensor


def check_finite_tensor(tensor, name):
    """Raise unless every entry of ``tensor`` is finite (negative entries are allowed)."""
    extremes = _extremes(tensor, name, "every entry must be finite")
    if extremes is not None and (math.isinf(extremes[0]) or math.isinf(extremes[1])):
        raise ValueError(f"{name} contains infinite values; every entry must be finite")
    return tensor


def check_fits_dtype(V, dtype, name="V", wider="a wider model (e.g. model.float())"):
    """A ``ValueError`` when converting ``V`` to the factors' narrower ``dtype`` (float32
    data for a float16 or bfloat16 model) would overflow, or put its typical entry
    (the mean non-zero one) under the smallest normal number: infinities failed the
    fit with Python's "cannot convert float infinity to integer" several calls later,
    and data at 1e-9 became zeros that a float16 model "fitted" with an objective of
    0.  A few entries under it only lose precision, as any narrow model's data do."""
    if not dtype.is_floating_point or torch.finfo(dtype).max >= _largest_value(V.dtype):
        return
    values = V.values() if V.layout in (torch.sparse_csr, torch.sparse_csc) else (
        V._values() if V.layout == torch.sparse_coo else V)
    if not values.numel():
        return
    info = torch.finfo(dtype)
    # (V is validated: non-negative) reductions only, no temporary of V's size, one read
    largest, total, count = torch.stack([
        values.max().double(), values.sum(dtype=torch.float64),
        torch.count_nonzero(values).double(),
    ]).tolist()
    typical = total / count if count else 0.0
    if largest > info.max:
        raise ValueError(
            f"{name}'s largest entry, {largest:g}, exceeds {dtype}'s largest value "
            f"{info.max:g}; fit {wider} or scale {name} down"
        )
    if 0 < typical < info.tiny:
        raise ValueError(
            f"{name}'s mean non-zero entry, {typical:g}, is under {dtype}'s smallest normal "
            f"number {info.tiny:g} (a typical entry would lose its precision or become 0); "
            f"fit {wider} or scale {name} up"
        )


def _largest_value(dtype):
    return torch.finfo(dtype).max if dtype.is_floating_point else torch.iinfo(dtype).max


def check_real_tensor(V, name):
    """Raise unless ``V`` is a torch tensor of real (not boolean, not complex) numbers."""
    if not isinstance(V, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor, got {type(V).__name__}; "
            f"convert arrays with torch.as_tensor"
        )
    if V.dtype == torch.bool or V.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {V.dtype}")
    return V


def check_target(V, name="V"):
    """Validate a target tensor and return a floating-point view of it.

    Integer tensors (counts) are converted to the default floating dtype; the
    caller's tensor is never modified.  A sparse target (COO, CSR or CSC) comes
    back as a coalesced COO tensor (see :func:`canonical_sparse`).
    """
    check_real_tensor(V, name)
    if V.layout != torch.strided:
        _check_sparse_layout(V, name)
    if not V.is_floating_point():
        V = V.to(torch.get_default_dtype())
    check_non_negative_tensor(V, name)
    if V.layout != torch.strided:
        V = canonical_sparse(V, name)
    return V


_SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc)


def _check_sparse_layout(V, name):
    if V.layout not in _SPARSE_LAYOUTS:
        raise TypeError(
            f"{name} must be a dense tensor or a sparse COO, CSR or CSC tensor, got layout "
            f"{V.layout}; convert it with {name}.to_sparse_csr()"
        )
    if V.dense_dim() != 0:
        raise ValueError(
            f"a sparse {name} must store single numbers, got {V.dense_dim()} dense "
            f"dimension(s) (shape {tuple(V.shape)}); use a sparse tensor of the full shape"
        )


def canonical_sparse(V, name="V"):
    """A coalesced COO tensor equal to the sparse ``V`` (sorted, unique indices).

    Duplicate entries are summed, as ``to_dense`` would.  ``V`` itself is never
    modified: a new tensor is returned unless ``V`` is already canonical.
    """
    coo = V if V.layout == torch.sparse_coo else V.to_sparse_coo()
    indices = coo._indices()
    shape = torch.tensor(V.shape[: V.sparse_dim()], device=indices.device).unsqueeze(1)
    if indices.numel() and bool(((indices < 0) | (indices >= shape)).any()):
        raise ValueError(
            f"{name} has stored indices outside its shape {tuple(V.shape)}; rebuild it with "
            f"valid indices (torch.sparse.check_sparse_tensor_invariants finds them)"
        )
    if V.layout == torch.sparse_coo:
        return V if V.is_coalesced() else V.coalesce()
    # CSR/CSC invariants are not checked by torch at construction: re-sort
    # unless the flattened indices are strictly increasing.
    if indices.shape[1] > 1:
        flat = indices[0] * V.shape[1] + indices[1]
        if not bool((flat[1:] > flat[:-1]).all()):
            return torch.sparse_coo_tensor(
                indices, coo._values(), V.shape, check_invariants=False
            ).coalesce()
    return torch.sparse_coo_tensor(
        indices, coo._values(), V.shape, is_coalesced=True, check_invariants=False
    )


def check_beta_with_zeros(V, beta, name="V"):
    """Multiplicative updates with beta <= 0 divide by the data: zeros break them."""
    if beta > 0:
        return
    if V.layout != torch.strided:
        raise ValueError(
            f"beta={beta:g} cannot be used with a sparse {name}: its implicit zeros make "
            f"the beta-divergence infinite; use beta > 0 or a dense {name} with no zeros"
        )
    if (V == 0).any():
        raise ValueError(
            f"beta={beta:g} needs a strictly positive {name}, but {name} has "
            f"{int((V == 0).sum())} zero entries; add a small constant to {name} "
            f"(e.g. V + 1e-6) or use beta > 0"
        )


def check_choice(value, name, choices):
    """One of a few strings."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {list(choices)}, got {_describe(value)}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_mask(mask, shape, device, name="mask"):
    """A dense boolean tensor of ``shape`` on ``device`` (True = observed)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"{name} must be a boolean torch.Tensor (True = observed), got "
            f"{type(mask).__name__}; convert arrays with torch.as_tensor(..., dtype=torch.bool)"
        )
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{name} must be a boolean tensor (True = observed), got dtype {mask.dtype}; "
            f"convert it with {name} != 0 or {name}.bool()"
        )
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have the shape of V {tuple(shape)}, got {tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but V is on {device}; move one of them")
    if mask.layout != torch.strided:
        if mask.layout not in _SPARSE_LAYOUTS:
            raise TypeError(
                f"{name} must be a dense or sparse (COO, CSR, CSC) boolean tensor, got "
                f"layout {mask.layout}"
            )
        # stored True entries are observed, the rest hidden; a boolean (N, C) is cheap
        mask = mask.to_dense()
    return mask


def check_observed_everywhere(mask, rows=True, columns=True, name="mask"):
    """Every row (dimension 0) and column (dimension 1) needs an observed entry.

    A row with no observed entry leaves its activations undetermined, a column
    its template; multiplicative updates would silently drive them to zero.
    """
    for axis, wanted, label, remedy in (
        (0, rows, "row", "drop the row"),
        (1, columns, "column", "drop the column"),
    ):
        if not wanted:
            continue
        others = [d for d in range(mask.dim()) if d != axis]
        seen = mask.any(dim=others[0], keepdim=True) if others else mask
        for d in others[1:]:
            seen = seen.any(dim=d, keepdim=True)
        empty = torch.nonzero(~seen.reshape(-1)).reshape(-1)
        if empty.numel():
            listed = ", ".join(str(int(i)) for i in empty[:5])
            more = "" if empty.numel() <= 5 else f" (and {empty.numel() - 5} more)"
            raise ValueError(
                f"{name} leaves {label} {listed}{more} of V with no observed entry; its "
                f"factor cannot be estimated: {remedy} or observe at least one entry in it"
            )
    return mask


def check_components(indices, rank, name):
    """Component indices (a sequence of ints, or a boolean sequence of length
    ``rank``) as a sorted, de-duplicated int64 tensor; ``None`` stays ``None``."""
    if indices is None:
        return None
    if isinstance(indices, torch.Tensor):
        values = indices.detach().cpu()
        if values.dtype == torch.bool:
            if values.shape != (rank,):
                raise ValueError(
                    f"{name} as a boolean mask must have length rank={rank}, got shape "
                    f"{tuple(values.shape)}"
                )
            return torch.nonzero(values).reshape(-1)
        if values.is_floating_point() or values.is_complex() or values.dim() > 1:
            raise TypeError(f"{name} must hold component indices (ints), got {_describe(indices)}")
        values = [int(v) for v in values.reshape(-1)]
    else:
        try:
            values = list(indices)
        except TypeError:
            raise TypeError(
                f"{name} must be a sequence of component indices, got {_describe(indices)}"
            ) from None
        if values and all(isinstance(v, bool) for v in values):
            if len(values) != rank:
                raise ValueError(
                    f"{name} as a boolean mask must have length rank={rank}, got {len(values)}"
                )
            return torch.tensor([i for i, v in enumerate(values) if v], dtype=torch.int64)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name} must hold component indices (ints), got {v!r}")
    for v in values:
        if not 0 <= v < rank:
            raise ValueError(f"{name} holds component {v}, but indices must lie in [0, {rank})")
    return torch.tensor(sorted(set(int(v) for v in values)), dtype=torch.int64)
