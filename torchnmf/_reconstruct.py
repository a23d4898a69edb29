r"""The forward maps shared by the NMF and PLCA families.

A matrix model reconstructs :math:`\hat V = H W^\top` (``F.linear``); the
convolutional models reconstruct the full transposed convolution of the
activations ``H (N, R, *)`` with the templates ``W (C, R, *kernel)``,

.. math::

    \hat V_{n,c,\mathbf l} = \sum_r \sum_{\mathbf t} W_{c,r,\mathbf t} H_{n,r,\mathbf l - \mathbf t},

so that every output entry is a non-negative combination of products of one
entry of each factor.
"""
import torch.nn.functional as F

__all__ = ["linear", "conv_transpose"]

_CONV_TRANSPOSE = {3: F.conv_transpose1d, 4: F.conv_transpose2d, 5: F.conv_transpose3d}


def linear(H, W):
    """:math:`H W^\\top` for ``H (N, R)`` and ``W (C, R)``."""
    return F.linear(H, W)


def conv_transpose(H, W):
    """The full transposed convolution of ``H (N, R, *)`` with ``W (C, R, *kernel)``."""
    return _CONV_TRANSPOSE[W.dim()](H, W.transpose(0, 1))
