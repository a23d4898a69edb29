r"""Closed-form statistics for the convolutional models (NMFD, NMF2D, NMF3D, SI-PLCA).

The reconstruction is the full transposed convolution of the activations
``H (N, R, *in)`` with the templates ``W (C, R, *kernel)`` (see
:mod:`torchnmf.models.forward`).  For a tensor :math:`X` of the
reconstruction's shape, the adjoints of that linear map are two correlations,

.. math::

    (J_H^\top X)_{n,r,\mathbf m} = \sum_c \sum_{\mathbf t} W_{c,r,\mathbf t} X_{n,c,\mathbf m+\mathbf t},
    \qquad
    (J_W^\top X)_{c,r,\mathbf t} = \sum_n \sum_{\mathbf m} H_{n,r,\mathbf m} X_{n,c,\mathbf m+\mathbf t},

and the parts of the beta-divergence's gradient are
:math:`\nabla^-_X = J_X^\top(V \hat V^{\beta-2})` and
:math:`\nabla^+_X = J_X^\top \hat V^{\beta-1}`.  Both parts are computed in
one call of a kernel (the two right-hand sides stacked).  At beta=1 the
positive parts need no reconstruction: :math:`J_H^\top 1` is the sum of
each template and :math:`J_W^\top 1` the sum of each activation row.  At
beta=2 the positive parts come from the factors' auto-correlations (the
Gram products of the matrix case) when that is cheaper than a
reconstruction, and the divergence follows from the terms alone.

Two kernels compute the correlations, chosen per shape by measurement:
*windows* (the zero-padded activations unfolded into an ``(R K, L)`` matrix
per batch entry, ``K`` taps and ``L`` output positions, so that the forward
map and :math:`J_W^\top` are matrix products and :math:`J_H^\top` is a
matrix product followed by a shifted sum over the taps) for 1-D kernels while
that matrix stays under :data:`~torchnmf.models.forward.UNFOLD_LIMIT` elements,
and torch's convolutions (oneDNN on CPU, cuDNN on GPU) otherwise, the
reconstruction then being a padded convolution with the flipped templates.  Nothing here reads a
value back to the host.
"""
import math

import torch
import torch.nn.functional as F

from ..models.forward import UNFOLD_LIMIT, padded_windows
from .dense import divergence_constant
from .residual import pointwise_divergence

__all__ = ["ConvStats", "windows", "correlate_h", "correlate_w", "forward_from_windows"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def windows(H, kernel):
    """The zero-padded activations as ``(N, R K, L)`` windows, tap-major per component.

    Entry ``(n, (r, u), l)`` is ``H[n, r, l + u - (k - 1)]`` (zero outside),
    ``u`` the flipped tap; :func:`forward_from_windows` multiplies it with the
    flipped templates.
    """
    out = padded_windows(H, kernel)  # (N, R, *out, *kernel)
    d = len(kernel)
    order = [0, 1] + list(range(2 + d, 2 + 2 * d)) + list(range(2, 2 + d))
    N, R = H.shape[:2]
    return out.permute(order).reshape(N, R * math.prod(kernel), -1)


def _flipped_matrix(W):
    """``W (C, R, *kernel)`` with its taps reversed, as a ``(C, R K)`` matrix."""
    return W.flip(dims=tuple(range(2, W.dim()))).reshape(W.shape[0], -1)


def forward_from_windows(W, H_windows, out_shape):
    """The reconstruction ``(N, C, *out)`` from :func:`windows` of ``H``."""
    flipped = _flipped_matrix(W)
    N = H_windows.shape[0]
    out = H_windows.new_empty((N, W.shape[0], H_windows.shape[2]))
    for n in range(N):  # one product per batch entry: matmul's batching would copy
        torch.mm(flipped, H_windows[n], out=out[n])
    return out.view(N, W.shape[0], *out_shape)


def _shifted_sum(Y, R, kernel, out_shape):
    """``sum_t Y[n, r, t, m + t]`` for ``Y (N, R K, L)`` contiguous: the taps' shifted sum."""
    N = Y.shape[0]
    d = len(kernel)
    inner = [o - k + 1 for o, k in zip(out_shape, kernel)]
    out_strides = [math.prod(out_shape[i + 1:]) for i in range(d)]
    L = math.prod(out_shape)
    K = math.prod(kernel)
    tap_strides = [math.prod(kernel[i + 1:]) * L + out_strides[i] for i in range(d)]
    view = Y.as_strided(
        (N, R, *kernel, *inner), (R * K * L, K * L, *tap_strides, *out_strides), Y.storage_offset()
    )
    return view.sum(dim=tuple(range(2, 2 + d)))


def correlate_h(X, W, route="windows"):
    r""":math:`J_H^\top X`, ``(N', R, *in)``, for ``X (N', C, *out)`` and ``W (C, R, *kernel)``."""
    kernel = tuple(W.shape[2:])
    if route == "conv":
        return _CONV[len(kernel)](X, W.transpose(0, 1))
    C, R = W.shape[:2]
    N = X.shape[0]
    columns = X.reshape(N, C, -1)
    W_T = W.reshape(C, -1).T
    Y = X.new_empty((N, W_T.shape[0], columns.shape[2]))
    for n in range(N):
        torch.mm(W_T, columns[n], out=Y[n])
    return _shifted_sum(Y, R, kernel, tuple(X.shape[2:]))


def correlate_w(X, H, H_windows=None, kernel=None, route="windows"):
    r""":math:`J_W^\top X`, ``(C', R, *kernel)``, for ``X (N, C', *out)`` and ``H (N, R, *in)``."""
    if route == "conv":
        d = H.dim() - 2
        return _CONV[d](X.transpose(0, 1), H.transpose(0, 1))
    N, C = X.shape[:2]
    R = H.shape[1]
    columns = X.reshape(N, C, -1)
    flat = torch.mm(columns[0], H_windows[0].T)
    for n in range(1, N):
        flat.addmm_(columns[n], H_windows[n].T)
    return flat.view(C, R, *kernel).flip(dims=tuple(range(2, 2 + len(kernel))))


def _sum_prediction(H, W):
    """The sum of the reconstruction's entries, ``sum_r (sum H_r)(sum W_r)``, in float64."""
    other = lambda X: [0] + list(range(2, X.dim()))  # noqa: E731
    return H.sum(other(H), dtype=torch.float64) @ W.sum(other(W), dtype=torch.float64)


def _inner(a, b):
    return torch.dot(a.reshape(-1), b.reshape(-1)).double()


class ConvStats:
    """Closed-form statistics of a dense (optionally masked) target for the convolutional models.

    The interface of :mod:`torchnmf.targets`: ``h_terms``, ``w_terms`` and
    ``divergence``, for ``H (N, R, *in)`` and ``W (C, R, *kernel)`` with a
    target ``V (N, C, *out)``.  With a ``mask`` (boolean, ``V``'s shape, True =
    observed; ``V`` holding zeros elsewhere) the divergence and both parts
    count the observed entries only.

    Args:
        V (Tensor): the target.
        beta (float): the divergence.
        mask (Tensor, optional): the observed entries.
        route (str, optional): ``"windows"`` or ``"conv"``; by default chosen
            per shape (windows while they stay under ``UNFOLD_LIMIT`` elements).
    """

    def __init__(self, V, beta, mask=None, route=None):
        self.V = V.contiguous()
        self.beta = float(beta)
        self.eps = torch.finfo(V.dtype).eps
        self.route = route
        self.mask = mask
        self._chosen = None  # (shapes, route) of the last choice
        self.weight = None
        if mask is None:
            self.constant = divergence_constant(self.V, self.beta)
        else:
            self.weight = mask.to(V.dtype)
            self.constant = divergence_constant(self.V[mask], self.beta)

    # -- scale and the explicit residual (see torchnmf.solvers.scaling, .residual) -----
    def _observed(self, tensor):
        return tensor if self.mask is None else tensor[self.mask]

    def scale_sums(self):
        """``(sum, count)`` of the observed entries of ``V``: the entry point's scale."""
        observed = self._observed(self.V)
        return float(observed.sum(dtype=torch.float64)), observed.numel()

    def scaled(self, factor):
        """The same statistics for ``factor * V``."""
        return type(self)(self.V * factor, self.beta, self.mask, self.route)

    def magnitude(self):
        """The size of the divergence's terms, :math:`\\sum V^\\beta` (float)."""
        return float(self._observed(self.V).double().pow(self.beta).sum())

    def explicit_divergence(self, H, W):
        """The divergence summed entry by entry in float64 (slow, accurate)."""
        prediction = self._forward(H.double(), W.double(), "conv", None)
        if self.beta != 2:
            prediction = prediction.clamp_min(self.eps)
        return pointwise_divergence(self._observed(self.V), self._observed(prediction), self.beta).sum()

    # -- set-up ---------------------------------------------------------------
    def _route(self, H, W):
        """Windows for 1-D kernels (while they fit), torch's convolutions for 2-D and 3-D.

        Measured on CPU (benchmarks/bench_conv.py, docs/benchmarks.md): for NMFD
        the window products beat conv1d 1.3-8x; for NMF2D/NMF3D oneDNN's
        convolutions beat the windows 2-30x (the windows grow with the kernel's area).
        """
        if self.route is not None:
            return self.route
        key = (H.shape, W.shape)
        if self._chosen is not None and self._chosen[0] == key:
            return self._chosen[1]
        route = self._choose_route(H, W)
        self._chosen = (key, route)
        return route

    def _choose_route(self, H, W):
        kernel = W.shape[2:]
        size = H.shape[0] * H.shape[1] * math.prod(kernel) * math.prod(self.V.shape[2:])
        return "windows" if len(kernel) == 1 and size <= UNFOLD_LIMIT else "conv"

    def _gram_cheaper(self, H, W):
        """beta=2, no mask, and the auto-correlation route costs less than a reconstruction."""
        if self.beta != 2 or self.weight is not None:
            return False
        RK = W[0].numel()
        return RK < 2 * W.shape[0]

    def _forward(self, H, W, route, H_windows):
        if route == "conv":
            # a padded convolution with the flipped templates: several times faster
            # than conv_transpose*d on CPU (measured) and the same sums
            kernel = W.shape[2:]
            flipped = W.flip(dims=tuple(range(2, W.dim())))
            return _CONV[len(kernel)](H, flipped, padding=[k - 1 for k in kernel])
        return forward_from_windows(W, H_windows, self.V.shape[2:])

    def _powers(self, prediction, pair, divergence, H, W):
        """Fill ``pair`` with (V * WH^(beta-2), M * WH^(beta-1)); return the divergence or None.

        ``pair`` is ``(2, *V.shape)`` or ``None`` at beta=1 without a mask, where
        only the first part is needed (returned alone in a ``(1, ...)`` tensor).
        """
        beta, V, weight = self.beta, self.V, self.weight
        floored = prediction.clamp_min_(self.eps)
        numer, denom = pair[0], pair[1] if pair.shape[0] > 1 else None
        variable = None
        if beta == 1:
            if divergence:
                log = torch.log(floored)
                total = _sum_prediction(H, W) if weight is None else _inner(weight, floored)
                variable = total - _inner(V, log)
            if weight is not None:
                denom.copy_(weight)
            torch.div(V, floored, out=numer)
            return variable
        torch.pow(floored, beta - 1, out=denom)
        if weight is not None:
            denom.mul_(weight)
        torch.div(denom, floored, out=numer)
        numer.mul_(V)
        if divergence:
            if beta == 0:
                log = torch.log(floored)
                logs = log.sum(dtype=torch.float64) if weight is None else _inner(weight, log)
                variable = _inner(denom, V) + logs
            else:
                variable = _inner(denom, floored) / beta - _inner(denom, V) / (beta - 1)
        return variable

    def _total(self, variable):
        return (self.constant + variable).clamp_min(0)

    # -- the element-wise pass shared by both factors ------------------------------
    def _pair(self, H, W, route, H_windows, divergence):
        """``(pair, divergence)``: ``pair (N, 2, C, *out)`` holds V * WH^(beta-2) and
        M * WH^(beta-1) per batch entry (``(N, 1, ...)``, the first alone, at beta=1
        without a mask, where the positive parts need no reconstruction)."""
        prediction = self._forward(H, W, route, H_windows)
        both = self.beta != 1 or self.weight is not None
        pair = prediction.new_empty((self.V.shape[0], 2 if both else 1, *self.V.shape[1:]))
        variable = self._powers(prediction, pair.transpose(0, 1), divergence, H, W)
        return pair, self._total(variable) if divergence else None

    def _h_from_pair(self, pair, W, route):
        N, parts = pair.shape[:2]
        terms = correlate_h(pair.view(N * parts, *self.V.shape[1:]), W, route)
        terms = terms.view(N, parts, *terms.shape[1:])
        if parts == 2:
            return terms[:, 0], terms[:, 1]
        ones = W.sum(dim=[0] + list(range(2, W.dim())))
        return terms[:, 0], ones.view(1, -1, *[1] * (W.dim() - 2))

    def _w_from_pair(self, pair, H, H_windows, kernel, route):
        N, parts, C = pair.shape[:3]
        terms = correlate_w(pair.view(N, parts * C, *self.V.shape[2:]), H, H_windows, kernel, route)
        if parts == 2:
            return terms[:C], terms[C:]
        ones = H.sum(dim=[0] + list(range(2, H.dim())))
        return terms, ones.view(1, -1, *[1] * len(kernel))

    # -- H ------------------------------------------------------------------------
    def h_terms(self, H, W, divergence=True):
        """The ``H`` terms and the divergence at (H, W) (``None`` with ``divergence=False``)."""
        route = self._route(H, W)
        H_windows = windows(H, W.shape[2:]) if route == "windows" else None
        if self._gram_cheaper(H, W):
            negative = correlate_h(self.V, W, route)
            positive = self._gram_h(H, W, H_windows, route)
            value = None
            if divergence:
                value = self._total(-_inner(H, negative) + _inner(H, positive) / 2)
            return negative, positive, value
        pair, value = self._pair(H, W, route, H_windows, divergence)
        return (*self._h_from_pair(pair, W, route), value)

    def _gram_h(self, H, W, H_windows, route):
        r""":math:`J_H^\top \hat V` without :math:`\hat V`: the templates' auto-correlation."""
        if route == "conv":
            return correlate_h(self._forward(H, W, route, None), W, route)
        C, R = W.shape[:2]
        gram = W.reshape(C, -1).T @ _flipped_matrix(W)  # (R K, R K)
        Y = torch.matmul(gram, H_windows)
        return _shifted_sum(Y, R, tuple(W.shape[2:]), tuple(self.V.shape[2:]))

    # -- W ------------------------------------------------------------------------
    def w_terms(self, H, W, divergence=False):
        """The ``W`` terms; with ``divergence=True`` also the divergence at (H, W)."""
        route = self._route(H, W)
        kernel = tuple(W.shape[2:])
        H_windows = windows(H, kernel) if route == "windows" else None
        if self._gram_cheaper(H, W):
            negative = correlate_w(self.V, H, H_windows, kernel, route)
            positive = self._gram_w(H, W, H_windows, route)
            if not divergence:
                return negative, positive
            return negative, positive, self._total(-_inner(W, negative) + _inner(W, positive) / 2)
        pair, value = self._pair(H, W, route, H_windows, divergence)
        terms = self._w_from_pair(pair, H, H_windows, kernel, route)
        return terms if not divergence else (*terms, value)

    # -- both at one point ------------------------------------------------------------
    def joint_terms(self, H, W):
        """``(h_terms, w_terms, divergence)`` at one point from one reconstruction.

        For solvers that update every factor from the same point (PLCA's EM),
        where separate ``h_terms`` and ``w_terms`` would reconstruct twice.
        """
        route = self._route(H, W)
        kernel = tuple(W.shape[2:])
        if self._gram_cheaper(H, W):
            negative, positive, value = self.h_terms(H, W)
            return (negative, positive), self.w_terms(H, W), value
        H_windows = windows(H, kernel) if route == "windows" else None
        pair, value = self._pair(H, W, route, H_windows, True)
        return (self._h_from_pair(pair, W, route),
                self._w_from_pair(pair, H, H_windows, kernel, route), value)

    def _gram_w(self, H, W, H_windows, route):
        r""":math:`J_W^\top \hat V` without :math:`\hat V`: the activations' auto-correlation."""
        kernel = tuple(W.shape[2:])
        if route == "conv":
            return correlate_w(self._forward(H, W, route, None), H, None, kernel, route)
        gram = torch.einsum("nkl,njl->kj", H_windows, H_windows)  # (R K, R K)
        flat = _flipped_matrix(W) @ gram
        return flat.view(W.shape).flip(dims=tuple(range(2, W.dim())))

    # -- divergence ---------------------------------------------------------------
    def divergence(self, H, W):
        route = self._route(H, W)
        H_windows = windows(H, W.shape[2:]) if route == "windows" else None
        prediction = self._forward(H, W, route, H_windows)
        both = self.beta != 1 or self.weight is not None
        pair = prediction.new_empty((2 if both else 1, *self.V.shape))
        return self._total(self._powers(prediction, pair, True, H, W))
