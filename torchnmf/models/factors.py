"""Construction of factor parameters, shared by the NMF and PLCA families.

A factor is given as a shape (random non-negative initialisation), a tensor
(copied; must be non-negative) or ``None`` (no parameter).  These helpers turn
such specifications into tensors, infer and check the rank, and compute the
shapes that a target shape implies for each model family.
"""
import numbers

import torch
import torch.nn as nn

from .._validation import check_fits_dtype, check_non_negative_tensor, check_positive_int

__all__ = [
    "make_factor",
    "infer_rank",
    "check_factors_agree",
    "factor_dtype_hint",
    "check_vshape",
    "conv_factor_shapes",
    "check_forward_factors",
    "kernel_tuple",
    "default_rank",
    "shapes_from_vshape",
    "FactorModule",
]


def factor_dtype_hint(*specs):
    """The dtype and device of the first tensor among ``specs``, else defaults."""
    for spec in specs:
        if isinstance(spec, torch.Tensor) and spec.is_floating_point():
            return spec.dtype, spec.device
    return torch.get_default_dtype(), torch.device("cpu")


def _check_sizes(shape, what):
    """Every size of ``shape`` a positive integer (a bool is not one)."""
    for size in shape:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0:
            raise ValueError(f"{what} must hold positive integers, got {shape}")
    return shape


def _check_shape(shape, name):
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions (dimension 1 is the rank), "
            f"got shape {shape}"
        )
    return _check_sizes(shape, f"{name} shape")


def make_factor(spec, name, dtype, device, generator=None):
    """Turn a factor specification into a tensor (or ``None``).

    Args:
        spec: ``None``, a shape (tuple, list or ``torch.Size``) or a tensor.
        name (str): the argument's name, for messages.
        dtype, device: used for random initialisation.
    """
    if spec is None:
        return None
    if isinstance(spec, torch.Tensor):
        if spec.is_sparse:
            raise TypeError(f"{name} must be a dense tensor, got layout {spec.layout}")
        tensor = spec.detach()
        if not tensor.is_floating_point():
            if tensor.dtype == torch.bool or tensor.is_complex():
                raise TypeError(f"{name} must hold real numbers, got dtype {tensor.dtype}")
            tensor = tensor.to(torch.get_default_dtype())
        _check_shape(tensor.shape, name)
        check_non_negative_tensor(tensor, name)
        return tensor.clone()
    if isinstance(spec, (tuple, list, torch.Size)):
        shape = _check_shape(spec, name)
        return torch.rand(shape, dtype=dtype, device=device, generator=generator)
    raise TypeError(
        f"{name} must be a shape (tuple of ints), a tensor or None, got {type(spec).__name__}"
    )


def infer_rank(rank, **factors):
    """The rank implied by the given factors (dimension 1), checked against ``rank``."""
    implied = {name: f.shape[1] for name, f in factors.items() if f is not None}
    if rank is not None:
        rank = check_positive_int(rank, "rank")
    sizes = set(implied.values())
    if rank is not None:
        sizes.add(rank)
    if len(sizes) > 1:
        parts = ", ".join(f"{name} has {size}" for name, size in implied.items())
        given = f"rank={rank}; " if rank is not None else ""
        raise ValueError(
            f"inconsistent ranks: dimension 1 of every factor must equal the rank, "
            f"but {given}{parts}"
        )
    if not sizes:
        raise ValueError("rank is required when no factor (W or H) is given")
    return sizes.pop()


def check_vshape(Vshape, ndim, cls_name):
    """Validate a target shape of ``ndim`` positive sizes."""
    if not isinstance(Vshape, (tuple, list, torch.Size)):
        raise TypeError(
            f"Vshape must be a tuple of {ndim} positive integers, got {type(Vshape).__name__}"
        )
    Vshape = tuple(Vshape)
    if len(Vshape) != ndim:
        raise ValueError(
            f"{cls_name} expects a {ndim}-dimensional Vshape, got {len(Vshape)} "
            f"dimensions: {Vshape}"
        )
    return _check_sizes(Vshape, "Vshape")


def kernel_tuple(kernel_size, dims, name="kernel_size"):
    """An int or a sequence of ``dims`` positive ints, as a tuple."""
    if isinstance(kernel_size, numbers.Integral) and not isinstance(kernel_size, bool):
        kernel_size = (int(kernel_size),) * dims
    if not isinstance(kernel_size, (tuple, list, torch.Size)):
        raise TypeError(
            f"{name} must be a positive integer or a sequence of {dims}, got {kernel_size!r}"
        )
    kernel_size = tuple(kernel_size)
    if len(kernel_size) != dims:
        raise ValueError(f"{name} must be an int or {dims} ints, got {kernel_size}")
    for k in kernel_size:
        check_positive_int(k, name)
    return kernel_size


def check_forward_factors(H, W, ndim, cls_name):
    """Errors, naming the argument, for factors given to ``forward`` that the forward
    map cannot combine: not tensors, the wrong number of dimensions (``ndim``, when the
    model fixes it), different ranks (dimension 1 of both; the last of a matrix
    model's ``H``, which may carry batch dimensions before it), dtypes or devices."""
    for name, factor in (("H", H), ("W", W)):
        if not isinstance(factor, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(factor).__name__}")
        if ndim is not None and factor.dim() != ndim:
            raise ValueError(
                f"{cls_name} needs a {ndim}-dimensional {name}, got shape {tuple(factor.shape)}"
            )
    # (a model that fixes ndim has checked it above: only a matrix model's factors get here short)
    for name, factor, least in (("W", W, 2), ("H", H, 1)):
        if factor.dim() < least:
            raise ValueError(
                f"{name} needs a rank dimension: at least {least} dimension(s), got shape "
                f"{tuple(factor.shape)}"
            )
    h_rank = H.shape[1] if ndim is not None else H.shape[-1]
    if h_rank != W.shape[1]:
        where = "dimension 1 of each" if ndim else "dimension 1 of W, the last of H"
        raise ValueError(
            f"H and W must have the same rank ({where}), "
            f"got H of shape {tuple(H.shape)} and W of shape {tuple(W.shape)}"
        )
    if H.dtype != W.dtype:
        raise TypeError(f"H and W must have the same dtype, got {H.dtype} and {W.dtype}")
    if H.device != W.device:
        raise ValueError(f"H and W must be on the same device, got {H.device} and {W.device}")


def check_factors_agree(factors, remedy):
    """A ``TypeError`` (dtype) or ``ValueError`` (device) unless the tensors in the
    ``{name: tensor or None}`` mapping ``factors`` share one dtype and one device;
    ``remedy`` ends the message (what the caller can do about it)."""
    given = [(name, factor) for name, factor in factors.items() if factor is not None]
    for name, factor in given[1:]:
        first, reference = given[0]
        if factor.dtype != reference.dtype:
            raise TypeError(
                f"{first} and {name} must have the same dtype, got {reference.dtype} and "
                f"{factor.dtype}; {remedy}"
            )
        if factor.device != reference.device:
            raise ValueError(
                f"{first} and {name} must be on the same device, got {reference.device} and "
                f"{factor.device}; {remedy}"
            )


def conv_factor_shapes(Vshape, rank, kernel):
    """Shapes of W and H for a convolutional model of target shape ``Vshape``.

    ``Vshape`` is ``(N, C, *spatial)`` and ``kernel`` the window along each
    spatial axis; W is ``(C, R, *kernel)`` and H ``(N, R, *(spatial - kernel + 1))``.
    """
    N, C, *spatial = Vshape
    out = []
    for axis, (size, k) in enumerate(zip(spatial, kernel)):
        if k > size:
            raise ValueError(
                f"the window ({k}) is longer than axis {axis + 2} of Vshape ({size}); "
                f"it must be at most {size}"
            )
        out.append(size - k + 1)
    return (C, rank, *kernel), (N, rank, *out)


def default_rank(rank, Vshape, factor_specs):
    """The rank for a model built from ``Vshape``: ``rank`` if given, else the
    rank of a given factor (dimension 1), else the channel count ``Vshape[1]``."""
    if rank is not None:
        return check_positive_int(rank, "rank")
    for name in ("W", "H"):
        spec = factor_specs.get(name)
        shape = spec.shape if isinstance(spec, torch.Tensor) else spec
        if isinstance(shape, (tuple, list, torch.Size)) and len(shape) >= 2:
            return shape[1]
    return Vshape[1]


def shapes_from_vshape(Vshape, rank, kernel, factor_specs, cls_name):
    """Fill in the default shapes of W and H for a model built from ``Vshape``.

    ``Vshape`` must have ``len(kernel) + 2`` dimensions; ``factor_specs`` (the
    keyword arguments holding ``W`` and ``H``) gets the implied shapes where no
    factor was given.  Returns the rank (see :func:`default_rank`).
    """
    Vshape = check_vshape(Vshape, len(kernel) + 2, cls_name)
    rank = default_rank(rank, Vshape, factor_specs)
    W_shape, H_shape = conv_factor_shapes(Vshape, rank, kernel)
    factor_specs.setdefault("W", W_shape)
    factor_specs.setdefault("H", H_shape)
    return rank


class FactorModule(nn.Module):
    """The machinery every factor model shares: ``W`` and ``H`` parameters.

    Builds the factors from their specifications (see :func:`make_factor`),
    infers the rank, registers the parameters with their ``requires_grad``
    flags, and checks fitting targets against the reconstruction's shape.
    Subclasses define ``reconstruct``; ``_factor_ndim`` (when set) is the
    number of dimensions every given factor must have.
    """

    _factor_ndim = None

    def __init__(self, rank=None, W=None, H=None, trainable_W=True, trainable_H=True):
        super().__init__()
        for name, flag in (("trainable_W", trainable_W), ("trainable_H", trainable_H)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        dtype, device = factor_dtype_hint(W, H)
        W = make_factor(W, "W", dtype, device)
        H = make_factor(H, "H", dtype, device)
        check_factors_agree({"W": W, "H": H}, "convert one of them (e.g. H.to(W))")
        ndim = self._factor_ndim
        for name, factor in (("W", W), ("H", H)):
            if ndim is not None and factor is not None and factor.dim() != ndim:
                raise ValueError(
                    f"{type(self).__name__} needs a {ndim}-dimensional {name}, got "
                    f"shape {tuple(factor.shape)}"
                )
        self.rank = infer_rank(rank, W=W, H=H)
        self.W = None if W is None else nn.Parameter(W, requires_grad=trainable_W)
        self.H = None if H is None else nn.Parameter(H, requires_grad=trainable_H)

    @property
    def out_channels(self):
        return None if self.W is None else self.W.shape[0]

    @property
    def kernel_size(self):
        return None if self.W is None else tuple(self.W.shape[2:])

    def extra_repr(self):
        parts = [f"rank={self.rank}"]
        if self.W is not None:
            parts.append(f"out_channels={self.out_channels}")
            if self.W.dim() > 2:
                parts.append(f"kernel_size={self.kernel_size}")
        for name in ("W", "H", "Z"):
            factor = getattr(self, name, None)
            if isinstance(factor, torch.Tensor):
                fixed = "" if factor.requires_grad else " (fixed)"
                parts.append(f"{name}={tuple(factor.shape)}{fixed}")
        return ", ".join(parts)

    def _own_factors(self, H, W):
        """``H`` and ``W``, falling back to the module's own; an error if one is missing
        or if a given one cannot meet the other (see :func:`check_forward_factors`)."""
        given = H is not None or W is not None
        H = self.H if H is None else H
        W = self.W if W is None else W
        if H is None or W is None:
            missing = "H" if H is None else "W"
            raise ValueError(
                f"{missing} is needed: the module has no {missing} parameter, so pass it "
                f"to forward"
            )
        if given:  # the module's own pair was checked when it was made
            check_forward_factors(H, W, self._factor_ndim, type(self).__name__)
        return H, W

    def _output_shape(self):
        """The shape of the reconstruction from the module's own factors."""
        H, W = self.H, self.W
        spatial = [h + k - 1 for h, k in zip(H.shape[2:], W.shape[2:])]
        return (H.shape[0], W.shape[0], *spatial)

    def _check_factors_agree(self):
        """The factors (changed since construction, perhaps) share a dtype and device."""
        check_factors_agree(
            {name: getattr(self, name, None) for name in ("W", "H", "Z")},
            "convert the whole model (e.g. model.to(torch.float64))",
        )

    def _conform_target(self, V, expected=None):
        """Check a validated target's shape (default: the reconstruction's) and
        device against the factors; returns it in the factors' dtype."""
        expected = tuple(self._output_shape() if expected is None else expected)
        if tuple(V.shape) != expected:
            raise ValueError(
                f"V must have the shape of the reconstruction {expected}, got "
                f"{tuple(V.shape)}"
            )
        if V.device != self.W.device:
            raise ValueError(
                f"V is on {V.device} but the model is on {self.W.device}; move one of "
                f"them (e.g. V.to(model.W.device))"
            )
        if V.dtype != self.W.dtype:
            check_fits_dtype(V, self.W.dtype)
            V = V.to(self.W.dtype)
        return V
