r"""The forward maps shared by the NMF and PLCA families.

A matrix model reconstructs :math:`\hat V = H W^\top` (``F.linear``); the
convolutional models reconstruct the full transposed convolution of the
activations ``H (N, R, *)`` with the templates ``W (C, R, *kernel)``,

.. math::

    \hat V_{n,c,\mathbf l} = \sum_r \sum_{\mathbf t} W_{c,r,\mathbf t} H_{n,r,\mathbf l - \mathbf t},

so that every output entry is a non-negative combination of products of one
entry of each factor.
"""
import math

import torch
import torch.nn.functional as F

__all__ = ["linear", "conv_transpose", "padded_windows", "UNFOLD_LIMIT"]

_CONV_TRANSPOSE = {3: F.conv_transpose1d, 4: F.conv_transpose2d, 5: F.conv_transpose3d}

# Largest window tensor (elements) built by the unfolded route; beyond it the
# transposed convolution is used, which needs no such copy.
UNFOLD_LIMIT = 1 << 24


def linear(H, W):
    """:math:`H W^\\top` for ``H (N, R)`` and ``W (C, R)``."""
    return F.linear(H, W)


def conv_transpose(H, W):
    """The full transposed convolution of ``H (N, R, *)`` with ``W (C, R, *kernel)``.

    Computed as one matrix product over sliding windows of the zero-padded
    activations while the window tensor stays under :data:`UNFOLD_LIMIT`
    elements: on CPU this is several times faster than ``conv_transpose*d``
    with the small channel counts of NMF, forward and backward alike.
    """
    kernel = W.shape[2:]
    out = [size + k - 1 for size, k in zip(H.shape[2:], kernel)]
    if H.shape[0] * H.shape[1] * math.prod(out) * math.prod(kernel) <= UNFOLD_LIMIT:
        return _unfolded_conv_transpose(H, W)
    return _CONV_TRANSPOSE[W.dim()](H, W.transpose(0, 1))


def padded_windows(H, kernel):
    """``H`` zero-padded by ``k - 1`` on both sides of each axis and unfolded into
    sliding windows: a view ``(N, R, *out, *kernel)``, ``out = spatial + k - 1``."""
    padding = []
    for k in reversed(kernel):
        padding += [k - 1, k - 1]
    windows = F.pad(H, padding)
    for axis, k in enumerate(kernel):
        windows = windows.unfold(2 + axis, k, 1)
    return windows


def _unfolded_conv_transpose(H, W):
    kernel = W.shape[2:]
    windows = padded_windows(H, kernel)
    spatial, taps = "lmo"[: len(kernel)], "tuv"[: len(kernel)]
    equation = f"cr{taps},nr{spatial}{taps}->nc{spatial}"
    flipped = W.flip(dims=tuple(range(2, W.dim())))
    return torch.einsum(equation, flipped, windows)
