r"""Divergences and sparseness measures.

Every divergence takes ``(input, target)`` like :mod:`torch.nn.functional`'s
losses: ``input`` is the reconstruction :math:`\hat V`, ``target`` the data
:math:`V`.  The beta-divergence, summed over all entries, is

.. math::

    D_\beta(V \,|\, \hat V) = \sum \begin{cases}
        \frac{V^\beta + (\beta - 1)\hat V^\beta - \beta V \hat V^{\beta - 1}}
             {\beta(\beta - 1)} & \beta \notin \{0, 1\} \\
        V \log\frac{V}{\hat V} - V + \hat V & \beta = 1 \ \text{(Kullback-Leibler)} \\
        \frac{V}{\hat V} - \log\frac{V}{\hat V} - 1 & \beta = 0 \ \text{(Itakura-Saito)}
    \end{cases}

``beta=2`` gives half the squared Euclidean distance.  Entries where the
divergence has an exact limit use it (:math:`0 \log 0 = 0`); where it would be
infinite (a zero in the reconstruction under a positive target for
``beta <= 1``), the zero is floored to the dtype's machine epsilon times the
target's scale, so the result is finite and non-negative for valid inputs.

The value does not depend on the scale of the data: for ``beta != 2`` both
tensors are divided by :math:`s`, the power of two nearest the target's mean
entry, and the result multiplied by :math:`s^\beta` (the divergence is
homogeneous), as the fits do (see :mod:`torchnmf.solvers.scaling`); so
``beta_div(c * x, c * y)`` is ``c**beta * beta_div(x, y)``, exactly for a
power of two.  A floor at the dtype's epsilon itself would sit above every
entry of data at 1e-9 (the digits scaled so gave a hundred times their
divergence).  Everything stays on the tensors' device.

Invalid input raises ``ValueError``, naming the tensor: different shapes (no
broadcasting: a ``(5, 1)`` against a ``(1, 5)`` would silently compare 25
pairs), and a negative, NaN or infinite entry in either (the divergence is
defined on non-negative data; a silent NaN would travel into whatever sums
it).  The entry check reads two numbers per tensor back from its device; the
fits never pay it, they use the unchecked functions of this module on
targets validated once.
"""
import math

import torch

from ._validation import check_finite_tensor, check_non_negative_tensor, check_real

__all__ = ["beta_div", "kl_div", "euclidean", "is_div", "sparseness"]


def _check_pair(input, target):
    for name, value in (("input", input), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if input.is_sparse or target.is_sparse:
        target = target.to_dense() if target.is_sparse else target
        input = input.to_dense() if input.is_sparse else input
    if input.shape != target.shape:
        raise ValueError(
            f"input and target must have the same shape, got {tuple(input.shape)} and "
            f"{tuple(target.shape)}"
        )
    dtype = torch.promote_types(input.dtype, target.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    return input.to(dtype), target.to(dtype)


def _check_entries(input, target):
    """A ``ValueError`` naming the tensor with a negative, NaN or infinite entry."""
    for name, value in (("input", input), ("target", target)):
        check_non_negative_tensor(value, name)


def beta_div(input, target, beta=2):
    r"""The beta-divergence :math:`D_\beta(\text{target} \,|\, \text{input})`.

    Args:
        input (Tensor): the reconstruction, non-negative.
        target (Tensor): the data, non-negative, of the same shape.
        beta (float): 2 is the squared Euclidean distance (halved), 1 the
            generalised Kullback-Leibler divergence, 0 Itakura-Saito.

    Returns:
        Tensor: a single-element (0-dim) tensor, finite and non-negative.

    Raises:
        ValueError: for tensors of different shapes, or with a negative, NaN or
            infinite entry.

    Examples::

        >>> import torch
        >>> from torchnmf.metrics import beta_div
        >>> beta_div(torch.tensor([1., 2.]), torch.tensor([1., 4.]))
        tensor(2.)
    """
    beta = check_real(beta, "beta")
    input, target = _check_pair(input, target)
    _check_entries(input, target)
    return _scaled_beta_div(input, target, beta)


def _scaled_beta_div(input, target, beta):
    """:func:`_beta_div` of the tensors divided by the power of two nearest the
    target's mean entry, times that scale to the power beta (on the device).
    Half the squared distance needs no floor: it is taken as it is."""
    if beta == 2 or target.numel() == 0:
        return _beta_div(input, target, beta)
    info = torch.finfo(target.dtype)
    mean = target.sum(dtype=torch.float64) / target.numel()
    # within the dtype's normal range; a zero, negative or NaN mean keeps scale 1
    octaves = torch.log2(mean).round_().clamp_(math.log2(info.tiny), math.log2(info.max))
    octaves = torch.where(mean > 0, octaves, torch.zeros_like(octaves)).nan_to_num_(0.0)
    scale = torch.exp2(octaves).to(target.dtype)
    value = _beta_div(input / scale, target / scale, beta)
    return (value.double() * torch.exp2(octaves * beta)).to(value.dtype)


def _beta_div(input, target, beta):
    if beta == 2:
        return ((input - target).pow(2).sum() / 2).clamp_min(0)
    eps = torch.finfo(input.dtype).eps
    if beta == 1:
        input = input.clamp_min(eps)
        terms = torch.xlogy(target, target) - target * input.log() - target + input
        return terms.sum().clamp_min(0)
    if beta == 0:
        input = input.clamp_min(eps)
        target = target.clamp_min(eps)
        ratio = target / input
        return (ratio - ratio.log() - 1).sum().clamp_min(0)
    if beta < 1:
        input = input.clamp_min(eps)
    if beta < 0:
        target = target.clamp_min(eps)
    if _amplified(beta):
        return _stable_terms(input, target, beta).sum().clamp_min(0)
    terms = (
        target.pow(beta)
        + (beta - 1) * input.pow(beta)
        - beta * target * input.pow(beta - 1)
    )
    return (terms.sum() / (beta * (beta - 1))).clamp_min(0)


def _amplified(beta):
    """Whether the textbook form's terms exceed their size at beta=0.5 (beta near 0
    or 1: see :func:`torchnmf.targets.residual.amplification`); elsewhere it stays,
    at two thirds of the entry-wise form's time (beta=1.5, 2048 x 1024: 57 ms
    against 87)."""
    from .targets.residual import amplification

    return amplification(beta) > 1


def _stable_terms(input, target, beta):
    r"""Entry-wise :math:`d_\beta` near ``beta`` 0 and 1 without dividing
    large terms by :math:`\beta(\beta - 1)`.

    The textbook form sums terms of size :math:`V^\beta / |\beta(\beta - 1)|`
    whose difference is the divergence: near ``beta`` 0 or 1 their rounding is
    amplified without bound (float32 at ``beta=1+1e-7`` gave 56.0 for a
    divergence of 72.9; float64 at ``1 + 2**-52`` gave 38.75 for 17.63).  With
    :math:`a = \log(\hat v / v)` (by ``log1p`` near :math:`v`),
    :math:`d = v^\beta (\operatorname{expm1}(\beta a) / \beta -
    \operatorname{expm1}((\beta - 1) a) / (\beta - 1))` has no such
    amplification (the form of :mod:`torchnmf.targets.residual`); zeros of the
    target give :math:`\hat v^\beta / \beta`.  Out of place, for autograd.
    """
    positive = target > 0
    one = torch.ones((), dtype=target.dtype, device=target.device)
    safe_target = torch.where(positive, target, one)
    # zeros of the target take the other branch; a 1 here keeps its gradient finite
    safe_input = torch.where(positive, input, one)
    # log1p of the relative difference near the target (a to its own precision); the
    # log of the quotient far under it, where the difference would round away the input
    u = (safe_input - safe_target) / safe_target
    a = torch.where(u > -0.5, torch.log1p(u), torch.log(safe_input / safe_target))
    phi = torch.expm1(beta * a) / beta - torch.expm1((beta - 1) * a) / (beta - 1)
    return torch.where(positive, safe_target.pow(beta) * phi, input.pow(beta) / beta)


def kl_div(input, target):
    r"""Generalised Kullback-Leibler divergence, :func:`beta_div` with ``beta=1``.

    Args:
        input (Tensor): the reconstruction, non-negative.
        target (Tensor): the data, non-negative, of the same shape (a ValueError otherwise).

    Returns:
        Tensor: a single-element (0-dim) tensor, finite and non-negative
        (invalid input raises as in :func:`beta_div`).

    Examples::

        >>> import torch
        >>> from torchnmf.metrics import kl_div
        >>> print(f"{float(kl_div(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0]))):.4f}")
        0.2164
    """
    return beta_div(input, target, beta=1)


def euclidean(input, target):
    r"""Half the squared Euclidean distance, :func:`beta_div` with ``beta=2``.

    Args:
        input (Tensor): the reconstruction, non-negative.
        target (Tensor): the data, non-negative, of the same shape (a ValueError otherwise).

    Returns:
        Tensor: a single-element (0-dim) tensor, finite and non-negative
        (invalid input raises as in :func:`beta_div`).

    Examples::

        >>> import torch
        >>> from torchnmf.metrics import euclidean
        >>> print(f"{float(euclidean(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0]))):.4f}")
        0.5000
    """
    return beta_div(input, target, beta=2)


def is_div(input, target):
    r"""Itakura-Saito divergence, :func:`beta_div` with ``beta=0``.

    Args:
        input (Tensor): the reconstruction, non-negative.
        target (Tensor): the data, non-negative, of the same shape (a ValueError otherwise).

    Returns:
        Tensor: a single-element (0-dim) tensor, finite and non-negative
        (invalid input raises as in :func:`beta_div`).

    Examples::

        >>> import torch
        >>> from torchnmf.metrics import is_div
        >>> print(f"{float(is_div(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0]))):.4f}")
        0.0945
    """
    return beta_div(input, target, beta=0)


def sparseness(x):
    r"""Hoyer's sparseness of all entries of ``x``.

    .. math::

        \operatorname{sparseness}(x) = \frac{\sqrt{n} - \|x\|_1 / \|x\|_2}{\sqrt{n} - 1}

    It is 1 when a single entry is non-zero and 0 when all entries are equal
    (an all-zero tensor counts as all equal).

    Returns:
        Tensor: a single-element (0-dim) tensor in [0, 1].

    Examples::

        >>> import torch
        >>> from torchnmf.metrics import sparseness
        >>> float(sparseness(torch.tensor([0.0, 0.0, 3.0, 0.0])))
        1.0
        >>> float(sparseness(torch.ones(4)))
        0.0
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.is_sparse:
        x = x.to_dense()
    x = x if x.is_floating_point() else x.to(torch.get_default_dtype())
    n = x.numel()
    if n == 0:
        raise ValueError("x must have at least one entry, got an empty tensor")
    check_finite_tensor(x, "x")
    l2 = x.norm()
    if n == 1:
        return (l2 > 0).to(x.dtype)
    if l2 == 0:
        return x.new_zeros(())
    root_n = math.sqrt(n)
    value = (root_n - x.abs().sum() / l2) / (root_n - 1)
    return value.clamp(0, 1)
