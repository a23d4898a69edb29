r"""The explicit residual's float64 reconstruction by FFTs, with its rounding bounded.

Below the closed forms' rounding (see :mod:`torchnmf.targets.residual`) the
objective is the entry-wise divergence on a float64 reconstruction, taken every
iteration.  On CPU torch has no oneDNN kernels in float64, and a 2-D or 3-D
convolution of many taps there costs 5 to 15 times the float32 one (NMF2D
16x64x64, rank 10, 10x10: 15 to 24 ms against 1.7; long fits took it in 174 of 200
iterations).  The same reconstruction through float64 FFTs costs a fraction of
that once the templates are long, but its rounding is relative to the largest
entries rather than to each entry, so it is used only where it provably cannot
matter:

For each batch entry ``n`` and channel ``c`` the FFT's error is bounded in the
2-norm by

.. math::

    \|\delta_{n,c}\|_2 \le 4 \log_2(M)\, \epsilon_{64} \sum_r \|H_{n,r}\|_2 \|W_{c,r}\|_1

(``M`` points per transform; measured errors are 0.03 to 0.3 of that bound with
the constant 1), and the divergence moves with the reconstruction by its slope
:math:`s = \hat v^{\beta-2}(\hat v - v)`, so the error of the objective is at most
:math:`\sum_{n,c} \|\delta_{n,c}\|_2 \|s_{n,c}\|_2`.  The FFT's value stands when
that is under :data:`SHARE` epsilons of the fit's dtype times the objective
(rises a tenth of that are far under the 4 epsilons the rounding guard refuses);
otherwise, as near an exact fit, the direct float64 convolution is taken.  Only
float32 (and lower) fits qualify: a float64 fit's residual needs float64's own
epsilon, which the bound never reaches.
"""
import math

import torch

__all__ = ["SHARE", "fft_cheaper", "fft_reconstruction", "error_bound", "slope_norms"]

# the objective's share that the FFT's rounding may take, in epsilons of the fit's dtype
SHARE = 0.1
# the bound's constant (measured errors stay under a third of the bound at 1)
_BOUND_CONSTANT = 4.0
# CPU cost per unit of transform (points x log2 points, per transform) against one
# multiply-add of the direct float64 convolution, measured on one thread: NMF2D
# 16x64x64, rank 10, 10x10 (FFTs 8.7 ms, direct 15-24), 4x64x64 rank 6 at 5x5
# (1.0 against 1.3), 8x8 (1.3 against 3.9), 16x16 (0.8 against 13), NMF3D 16^3
# rank 4 at 3^3 (0.43 against 0.24) and 2x2 (0.74 against 0.19)
_TRANSFORM_COST = 2.0


def _fast_size(n):
    """The smallest 5-smooth integer (2^a 3^b 5^c) at least ``n``: sizes the FFTs are quick at."""
    best = None
    power5 = 1
    while power5 < 2 * n:
        power35 = power5
        while power35 < 2 * n:
            size = power35
            while size < n:
                size *= 2
            best = size if best is None else min(best, size)
            power35 *= 3
        power5 *= 5
    return best


def _sizes(S, W):
    """The full convolution's extent per axis and the transforms' sizes."""
    full = [s + k - 1 for s, k in zip(S.shape[2:], W.shape[2:])]
    return full, [_fast_size(n) for n in full]


def fft_cheaper(S, W, fit_dtype, memory_elements):
    """Whether :func:`fft_reconstruction` of activations ``S (N', R, *in)`` and templates
    ``W (C, R, *kernel)`` is likely cheaper than torch's float64 convolution, for a fit
    in ``fit_dtype``: 2-D and 3-D kernels on CPU, float32 or lower, spectra within
    ``memory_elements`` complex entries, and fewer operations by the measured costs."""
    if W.dim() < 4 or S.device.type != "cpu" or torch.finfo(fit_dtype).bits > 32:
        return False
    N, R = S.shape[:2]
    C = W.shape[0]
    full, sizes = _sizes(S, W)
    points = math.prod(sizes)
    half = points // sizes[-1] * (sizes[-1] // 2 + 1)  # a real transform's spectrum
    if (N * R + C * R + N * C) * half > memory_elements:
        return False
    transforms = _TRANSFORM_COST * (N * R + C * R + N * C) * points * math.log2(points)
    direct = N * C * R * math.prod(W.shape[2:]) * math.prod(full)
    return transforms < direct


def fft_reconstruction(S, W, pad=0, rows=None):
    """The full convolution of float64 ``S (N', R, *in)`` with ``W (C, R, *kernel)``
    (what ``torch.nn.functional.conv_transpose`` gives) through real FFTs; with ``pad``,
    only rows ``pad : pad + rows`` of its first spatial axis (a block's, see
    :class:`~torchnmf.targets.convolution.ConvStats`)."""
    d = W.dim() - 2
    dims = tuple(range(-d, 0))
    full, sizes = _sizes(S, W)
    S_spectrum = torch.fft.rfftn(S, s=sizes, dim=dims)
    W_spectrum = torch.fft.rfftn(W, s=sizes, dim=dims)
    # sum_r S_r W_{c,r} per frequency, a component at a time: einsum's batched products
    # of (C, R) by (R, N') matrices ran at a third of this speed (NMF2D 16x64x64, rank 10)
    spectrum = S_spectrum[:, :1] * W_spectrum[:, 0]
    for r in range(1, W.shape[1]):
        spectrum.addcmul_(S_spectrum[:, r:r + 1], W_spectrum[:, r])
    out = torch.fft.irfftn(spectrum, s=sizes, dim=dims)
    for axis, n in enumerate(full):
        if n != sizes[axis]:
            out = out.narrow(2 + axis, 0, n)
    if pad:
        out = out.narrow(2, pad, rows)
    return out


def error_bound(S, W):
    """The bound on ``||delta_{n,c}||_2`` above, ``(N', C)`` float64, for float64 ``S`` and ``W``."""
    _, sizes = _sizes(S, W)
    points = math.prod(sizes)
    scale = _BOUND_CONSTANT * math.log2(max(points, 2)) * torch.finfo(torch.float64).eps
    return (S.flatten(2).norm(dim=-1) @ W.flatten(2).abs().sum(-1).T) * scale


def slope_norms(V, prediction, beta, weight=None):
    """``||s_{n,c}||_2`` of the divergence's slope :math:`\\hat v^{\\beta-2}(\\hat v - v)` over
    the observed entries, ``(N', C)`` float64, for a floored float64 ``prediction``."""
    slope = prediction - V
    if beta != 2:
        slope = slope.mul_(prediction.pow(beta - 2))
    if weight is not None:
        slope = slope.mul_(weight)
    return slope.flatten(2).norm(dim=-1)
