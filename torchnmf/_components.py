"""Construction of factor parameters, shared by the NMF and PLCA families.

A factor is given as a shape (random non-negative initialisation), a tensor
(copied; must be non-negative) or ``None`` (no parameter).  These helpers turn
such specifications into tensors, infer and check the rank, and compute the
shapes that a target shape implies for each model family.
"""
import numbers

import torch

from ._validation import check_non_negative_tensor, check_positive_int

__all__ = [
    "make_factor",
    "infer_rank",
    "factor_dtype_hint",
    "check_vshape",
    "conv_factor_shapes",
    "kernel_tuple",
    "default_rank",
]


def factor_dtype_hint(*specs):
    """The dtype and device of the first tensor among ``specs``, else defaults."""
    for spec in specs:
        if isinstance(spec, torch.Tensor) and spec.is_floating_point():
            return spec.dtype, spec.device
    return torch.get_default_dtype(), torch.device("cpu")


def _check_shape(shape, name):
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions (dimension 1 is the rank), "
            f"got shape {shape}"
        )
    for size in shape:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0:
            raise ValueError(f"{name} shape must hold positive integers, got {shape}")
    return shape


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
    for size in Vshape:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0:
            raise ValueError(f"Vshape must hold positive integers, got {Vshape}")
    return Vshape


def kernel_tuple(kernel_size, dims, name="kernel_size"):
    """An int or a sequence of ``dims`` positive ints, as a tuple."""
    if isinstance(kernel_size, numbers.Integral) and not isinstance(kernel_size, bool):
        kernel_size = (int(kernel_size),) * dims
    kernel_size = tuple(kernel_size)
    if len(kernel_size) != dims:
        raise ValueError(f"{name} must be an int or {dims} ints, got {kernel_size}")
    for k in kernel_size:
        check_positive_int(k, name)
    return kernel_size


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
