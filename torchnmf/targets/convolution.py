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

Three kernels compute the correlations: *windows* (the zero-padded
activations unfolded into an ``(R K, L)`` matrix per batch entry, ``K`` taps
and ``L`` output positions, so that the forward map and :math:`J_W^\top` are
matrix products and :math:`J_H^\top` is a matrix product followed by a
shifted sum over the taps); torch's convolutions (oneDNN or unfold + GEMM on
CPU, cuDNN on GPU) with the templates or the activations as the kernel; and
the *adjoint* kernels of the reconstruction's convolution (its backward
passes, ``convolution_backward``, what autograd calls).  The
reconstruction is then a matrix product of the windows, or torch's
transposed convolution in 2-D and 3-D and a padded convolution with the
flipped templates in 1-D (see :func:`_convolution_forward`); long 2-D
kernels over several channels reconstruct and correlate with the templates in
channels-last memory, where torch's kernels for them are faster (see
:data:`CHANNELS_LAST_SIDE`).  Which route is fastest depends on the shape and
on the machine: a fixed rule measured on CPU, and on an
accelerator (or when asked) a probe that times the candidate routes once per
process and shape on the real tensors and keeps the fastest (see
:data:`PROBE_ROUTES`).  Memory stays bounded: the temporaries are formed a block of
:data:`BLOCK_ELEMENTS` at a time (see :class:`ConvStats`).  Nothing here reads a
value back to the host.
"""
import math
import os
import time

import torch
import torch.nn.functional as F

from ..models.forward import padded_windows
from .dense import divergence_constant, float64_sum, power_sum
from . import spectral
from .residual import PointwiseReference

__all__ = [
    "ConvStats", "windows", "correlate_h", "correlate_w", "forward_from_windows", "BLOCK_ELEMENTS",
]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {2: F.conv_transpose2d, 3: F.conv_transpose3d}
ROUTES = ("windows", "conv", "adjoint", "hybrid")
# the kernel each correlation takes on each route: "hybrid" reconstructs and
# correlates with the activations through the windows, with the templates by oneDNN;
# "adjoint" reconstructs by a convolution and correlates by its backward kernels
_H_ROUTE = {"windows": "windows", "conv": "conv", "adjoint": "adjoint", "hybrid": "conv"}
_W_ROUTE = {"windows": "windows", "conv": "conv", "adjoint": "adjoint", "hybrid": "windows"}

# Whether ConvStats times the candidate routes the first time a process meets a
# shape: True or False, or None (the default) for accelerators only; the environment
# sets it with TORCHNMF_CONV_PROBE=1 or 0.  Without the probe, or for a target of
# several blocks, the fixed rule of ``ConvStats._fixed_route``, which was the fastest
# route on every benchmark row of two CPU machines (docs/benchmarks.md, issue 16),
# while the probe, timing milliseconds on a loaded machine, picked a route 20% slower
# for one of them.  The routes' sums agree to rounding, not bit for bit: leave the
# probe off for fits that must repeat exactly across machines and processes.
PROBE_ROUTES = {"1": True, "0": False}.get(os.environ.get("TORCHNMF_CONV_PROBE", ""))
PROBE_ROUNDS = 3
# The probe keeps the fixed rule's route unless another is faster by this fraction:
# on a loaded machine routes within a few percent swap places from one probe to the
# next (measured: NMF2D 3x3 took "conv" at 1.75 ms over the hybrid's 1.60 in one run).
PROBE_MARGIN = 0.15
# the probe's choices in this process, by shape, dtype, device, threads and statistics kind
_PROBED = {}

# The hybrid route (see ConvStats._route): kernels no longer than this on every
# axis whose windows hold at most this many elements per batch entry (2.5 MiB of
# float32); measured: NMF2D 5x5 and NMF2D 128x128 at 3x3 are faster on oneDNN.
HYBRID_SIDE = 3
HYBRID_WINDOWS = 640_000

# 2-D kernels with a side of at least this many taps, over two channels or more,
# reconstruct and correlate with the templates in channels-last memory (float32 on
# CPU), where oneDNN's kernels are faster than the transposed convolution, which slows
# down sharply from 10 taps (measured, one thread: the three products of a fit over
# 1-16 channels, ranks 4 and 10, 64^2 and 128^2 images, from 10 taps: 0.16 to 1.0 of
# the time at 3 and 16 channels, most under 0.6 (4.9 ms against 0.9 for one
# reconstruction at 16 channels, 10x10); 0.5 to 1.05 at 6 and 8 taps, where whole fits
# gained nothing at 4 channels; 0.9 to 2.2 for one channel.  Whole fits
# of NMF2D 4x64x64, rank 6, per iteration: 8x8 1.07 of the contiguous layout's time,
# 10x10 0.67, 12x12 0.67, 16x16 0.57, 24x24 0.51; 3x128x128 at 10x10 0.57-0.80).
CHANNELS_LAST_SIDE = 10

# Reconstructions in float64 on CPU (the explicit residual's, see
# ConvStats.explicit_divergence) of at least this many channels take the padded
# convolution rather than the transposed
# one, which torch runs without oneDNN in that dtype and which slows down with the
# channels (measured, one thread, ms: NMF2D 16x64x64, rank 10, 10x10 27-40 against
# 12-14, 32 channels 79 against 16, 12 channels at 8x8 7.1 against 3.9, NMF3D 16
# channels at 3^3 5.5 against 1.0 and at 5^3 6.8 against 6.2; at 2 to 8 channels the
# transposed one was as fast or up to 6 times faster: 3 channels 128^2 at 10x10 33
# against 88, 4 channels at 16x16 7.8 against 45).
PADDED_CHANNELS = 12

# Elements of the temporaries one block of the element-wise pass may hold (64 MiB of
# float32): every problem of the benchmarks fits in one block, so blocking costs
# them nothing; larger targets are handled in blocks of this size.
BLOCK_ELEMENTS = 1 << 24

_LN2 = math.log(2.0)


def windows(H, kernel, out=None):
    """The zero-padded activations as ``(N, R K, L)`` windows, tap-major per component.

    Entry ``(n, (r, u), l)`` is ``H[n, r, l + u - (k - 1)]`` (zero outside),
    ``u`` the flipped tap; :func:`forward_from_windows` multiplies it with the
    flipped templates.  ``out``, when given, is a contiguous tensor of that shape to fill.
    """
    view = padded_windows(H, kernel)  # (N, R, *out, *kernel)
    d = len(kernel)
    order = [0, 1] + list(range(2 + d, 2 + 2 * d)) + list(range(2, 2 + d))
    N, R = H.shape[:2]
    view = view.permute(order)
    if out is None:
        return view.reshape(N, R * math.prod(kernel), math.prod(view.shape[2 + d:]))
    out.view(view.shape).copy_(view)
    return out


def _flipped_matrix(W):
    """``W (C, R, *kernel)`` with its taps reversed, as a ``(C, R K)`` matrix."""
    return W.flip(dims=tuple(range(2, W.dim()))).reshape(W.shape[0], -1)


def forward_from_windows(W, H_windows, out_shape, flipped=None, out=None):
    """The reconstruction ``(N, C, *out)`` from :func:`windows` of ``H``;
    ``flipped``, when given, is ``W``'s flipped matrix (see :func:`_flipped_matrix`);
    ``out``, when given, a contiguous tensor of ``(N, C, L)`` elements to write to."""
    if flipped is None:
        flipped = _flipped_matrix(W)
    N = H_windows.shape[0]
    shape = (N, W.shape[0], H_windows.shape[2])
    out = H_windows.new_empty(shape) if out is None else out.view(shape)
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


def _taps_sum(Y, R, kernel, out_shape, pad=0):
    """:func:`_shifted_sum` of ``Y`` as if padded by ``pad`` zeros on both sides of its
    first spatial axis; for 1-D kernels a sum of shifted slices, without the padded copy."""
    if not pad:
        return _shifted_sum(Y, R, kernel, out_shape)
    if len(kernel) > 1:
        N = Y.shape[0]
        Y = F.pad(Y.view(N, Y.shape[1], *out_shape), [0, 0] * (len(kernel) - 1) + [pad, pad])
        return _shifted_sum(Y.view(N, Y.shape[1], math.prod(Y.shape[2:])), R, kernel,
                            (out_shape[0] + 2 * pad, *out_shape[1:]))
    N, (k,), (L,) = Y.shape[0], kernel, out_shape
    taps = Y.view(N, R, k, L)
    out = Y.new_zeros((N, R, L + 2 * pad - k + 1))
    for t in range(k):
        out[:, :, pad - t:pad - t + L] += taps[:, :, t]
    return out


def _first_axis_padding(pad, d):
    """``padding`` of a convolution: ``pad`` on the first spatial axis only."""
    return [pad] + [0] * (d - 1)


def _forward_padding(kernel, pad):
    """The reconstruction's padding: ``k - 1`` per axis, none on the first for a
    block (whose activations ``S`` already hold the ``pad = k - 1`` rows before it)."""
    return [0 if pad and i == 0 else k - 1 for i, k in enumerate(kernel)]


def _adjoint(X, S, flipped, pad, which):
    """``convolution_backward`` of ``conv(S, flipped, padding)`` (the reconstruction)
    at the output gradient ``X``: its input gradient (:math:`J_H^\top X`) for
    ``which == 0``, its weight gradient (:math:`J_W^\top X`, flipped) for 1, both
    from one call for ``which == 2``."""
    kernel = flipped.shape[2:]
    d = len(kernel)
    mask = [which != 1, which != 0, False]
    grads = torch.ops.aten.convolution_backward(
        X, S, flipped, None, [1] * d, _forward_padding(kernel, pad), [1] * d, False, [0] * d, 1, mask
    )
    return grads[:2] if which == 2 else grads[which]


def correlate_h(X, W, route="windows", pad=0, H=None, out=None):
    r""":math:`J_H^\top X`, ``(N', R, *in)``, for ``X (N', C, *out)`` and ``W (C, R, *kernel)``.

    With ``pad``, ``X`` stands for itself with ``pad`` zeros before and after its
    first spatial axis (a block's rows, see :class:`ConvStats`).  The
    ``"adjoint"`` route reads ``H`` (``(N', R, *in)``) for its shape only; zeros by default.
    ``out``: the windows route's ``(N', R K, L)`` product, to write to (contiguous).
    """
    kernel = tuple(W.shape[2:])
    if route == "adjoint":
        if H is None:
            inner = [o - k + 1 + (2 * pad if i == 0 else 0)
                     for i, (o, k) in enumerate(zip(X.shape[2:], kernel))]
            H = X.new_zeros((X.shape[0], W.shape[1], *inner))
        return _adjoint(X, H, W.flip(dims=tuple(range(2, W.dim()))), pad, 0)
    if route == "conv":
        padding = _first_axis_padding(pad, len(kernel)) if pad else 0
        W_T = W.transpose(0, 1)
        if _channels_last(X, W):
            X, W_T = (T.contiguous(memory_format=torch.channels_last) for T in (X, W_T))
        return _CONV[len(kernel)](X, W_T, padding=padding)
    C, R = W.shape[:2]
    N = X.shape[0]
    columns = X.reshape(N, C, math.prod(X.shape[2:]))  # (sizes, not -1: N may be 0)
    W_T = W.reshape(C, -1).T
    shape = (N, W_T.shape[0], columns.shape[2])
    Y = X.new_empty(shape) if out is None else out.view(shape)
    for n in range(N):
        torch.mm(W_T, columns[n], out=Y[n])
    return _taps_sum(Y, R, kernel, tuple(X.shape[2:]), pad)


def correlate_w(X, H, H_windows=None, kernel=None, route="windows", pad=0):
    r""":math:`J_W^\top X`, ``(C', R, *kernel)``, for ``X (N, C', *out)`` and ``H (N, R, *in)``.

    ``pad`` as in :func:`correlate_h`; ``H_windows`` are then those of the
    unpadded rows of ``X``.
    """
    if route == "adjoint":
        C, R = X.shape[1], H.shape[1]
        placeholder = H.new_zeros(()).expand(C, R, *kernel)  # read for its shape only
        flipped = _adjoint(X, H, placeholder, pad, 1)
        return flipped.flip(dims=tuple(range(2, 2 + len(kernel))))
    if route == "conv":
        d = H.dim() - 2
        padding = _first_axis_padding(pad, d) if pad else 0
        return _CONV[d](X.transpose(0, 1), H.transpose(0, 1), padding=padding)
    N, C = X.shape[:2]
    R = H.shape[1]
    columns = X.reshape(N, C, math.prod(X.shape[2:]))
    flat = torch.mm(columns[0], H_windows[0].T)
    for n in range(1, N):
        flat.addmm_(columns[n], H_windows[n].T)
    return flat.view(C, R, *kernel).flip(dims=tuple(range(2, 2 + len(kernel))))


def _windowed(route):
    """Whether a route reconstructs from the windows (and so builds them)."""
    return route in ("windows", "hybrid")


def _sum_prediction(H, W):
    """The sum of the reconstruction's entries, ``sum_r (sum H_r)(sum W_r)``, in float64."""
    other = lambda X: [0] + list(range(2, X.dim()))  # noqa: E731
    return H.sum(other(H), dtype=torch.float64) @ W.sum(other(W), dtype=torch.float64)


def _inner(a, b):
    r""":math:`\sum a \odot b` in float64 from rows summed in cascade (a float32 dot
    product accumulates along a few lanes: on NMF2D 4x64x64 its rounding took the
    closed-form divergence 100 to 1000 epsilons of the objective off, measured)."""
    return float64_sum(torch.mul(a, b))


def _channels_last(X, W):
    """Whether the convolutions with the templates ``W`` take ``X`` in channels-last
    memory (see :data:`CHANNELS_LAST_SIDE`)."""
    return (W.dim() == 4 and max(W.shape[2:]) >= CHANNELS_LAST_SIDE and W.shape[0] > 1
            and X.dtype == torch.float32 and X.device.type == "cpu")


def _convolution_forward(S, W, pad=0):
    """The reconstruction of activations ``S`` by torch's convolutions; ``pad``: ``S``
    is a block of rows already padded by ``pad`` along its first axis, and only the
    block's own rows are returned.

    In 2-D and 3-D the transposed convolution, 1.5 to 3.4 times faster than the padded
    convolution with the flipped templates at kernels of 5 and more (float32, CPU, one
    thread: NMF2D 4x64x64 at 8x8 0.48 ms against 1.50, NMF3D 16^3 at 5^3 0.62 against
    2.10; float64 1.5 to 5 times, where the padded one takes torch's unfold path); in
    1-D the padded convolution (the transposed one is 17 to 25 times slower there).
    For long 2-D kernels in float32 on CPU (:data:`CHANNELS_LAST_SIDE`) the padded
    convolution in channels-last memory, faster than either (16x16: 1.39 ms against
    2.87 for the transposed one); its result is in that layout.  In float64 on CPU
    (the explicit residual's reconstruction), with :data:`PADDED_CHANNELS` channels
    or more, the padded convolution."""
    kernel = W.shape[2:]
    channels_last = _channels_last(S, W)
    padded = channels_last or len(kernel) == 1 or (
        S.dtype == torch.float64 and W.shape[0] >= PADDED_CHANNELS and S.device.type == "cpu")
    if not padded:
        cropped = [pad] + [0] * (len(kernel) - 1)  # the transposed convolution's crop
        return _CONV_TRANSPOSE[len(kernel)](S, W.transpose(0, 1), padding=cropped)
    flipped = W.flip(dims=tuple(range(2, W.dim())))
    if channels_last:
        S, flipped = (T.contiguous(memory_format=torch.channels_last) for T in (S, flipped))
    return _CONV[len(kernel)](S, flipped, padding=_forward_padding(kernel, pad))


def _pad_first_axis(H, k):
    """``H`` with ``k - 1`` zeros before and after its first spatial axis."""
    padding = [0, 0] * (H.dim() - 3) + [k - 1, k - 1]
    return F.pad(H, padding)


class ConvStats:
    """Closed-form statistics of a dense (optionally masked) target for the convolutional models.

    The interface of :mod:`torchnmf.targets`: ``h_terms``, ``w_terms`` and
    ``divergence``, for ``H (N, R, *in)`` and ``W (C, R, *kernel)`` with a
    target ``V (N, C, *out)``.  With a ``mask`` (boolean, ``V``'s shape, True =
    observed; ``V`` holding zeros elsewhere) the divergence and both parts
    count the observed entries only.

    The element-wise pass and the kernels' temporaries (the reconstruction, the
    two right-hand sides, the windows) are formed a block at a time, so that
    they hold about ``block_elements`` elements whatever the size of ``V``:
    blocks of batch entries, or, when one entry is larger than that, blocks of
    the first spatial axis (time for NMFD), each with the ``k - 1`` activations
    before it that reach into it; the activations' terms of neighbouring
    blocks overlap by ``k - 1`` and are added.  A problem that fits in one
    block takes the unblocked path.

    Args:
        V (Tensor): the target.
        beta (float): the divergence.
        mask (Tensor, optional): the observed entries.
        route (str, optional): one of :data:`ROUTES`; by default the fixed
            rule on CPU and, on an accelerator, the fastest route timed once
            per process and shape (see :data:`PROBE_ROUTES`).
        block_elements (int, optional): the temporaries' size per block
            (default :data:`BLOCK_ELEMENTS`).
    """

    # h_terms, w_terms and joint_terms take divergence="explicit" (the explicit residual
    # from the reconstruction their terms use; see AccurateDivergence)
    explicit_in_pass = True

    def __init__(self, V, beta, mask=None, route=None, block_elements=None):
        if route is not None and route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES} or None, got {route!r}")
        self.V = V.contiguous()
        self.beta = float(beta)
        self.eps = torch.finfo(V.dtype).eps
        self.route = route
        self.mask = mask
        self.block_elements = block_elements
        self._chosen = None  # (shapes, route, blocks) of the last choice
        self._flipped = None  # (W, its version, its flipped matrix): H's and W's passes share it
        self._windows = None  # (H, its version, the buffer holding its windows): see _windows_of
        self._workspace = {}  # (name, shape): a temporary kept for the next iteration
        self._references = {}  # a block's rows: its PointwiseReference (pointwise_divergence)
        self._fft_refused = False  # the FFTs' rounding was too large for the explicit residual
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
        return type(self)(self.V * factor, self.beta, self.mask, self.route, self.block_elements)

    def magnitude(self):
        """The size of the divergence's terms, :math:`\\sum V^\\beta` (float)."""
        return power_sum(self._observed(self.V), self.beta)

    def magnitude_squares(self):
        """:math:`\\sum V^{2\\beta}`, for the closed forms' rounding noise (float)."""
        return power_sum(self._observed(self.V), 2 * self.beta)

    def explicit_divergence(self, H, W):
        """The divergence summed entry by entry in float64 (slow, accurate), block by block.

        The float64 reconstruction is torch's convolution, or, for long 2-D and 3-D
        templates of a float32 fit on CPU, FFTs wherever their rounding provably
        stays under :data:`~torchnmf.targets.spectral.SHARE` epsilons of the value
        (see :mod:`torchnmf.targets.spectral`; near an exact fit it does not, and the
        convolution is taken from then on).  ``h_terms`` and ``w_terms`` give the
        same value with ``divergence="explicit"``, from the same reconstruction as
        their terms."""
        self._plan(H, W)  # the blocks, chosen on the factors themselves (not their float64 copies)
        fit_dtype = H.dtype
        H, W = H.double(), W.double()
        total = torch.zeros((), dtype=torch.float64, device=H.device)
        for S, n0, n1, a, b, pad in self._blocks(H, W, "conv"):
            V, weight = self._target_block(n0, n1, a, b)
            total += self._explicit_block(S, W, pad, V, weight, (n0, n1, a, b), fit_dtype)[0]
        return total

    def _explicit_block(self, S, W, pad, V, weight, rows, fit_dtype):
        """``(divergence, reconstruction)`` of a block in float64 (``S`` and ``W``
        float64; the reconstruction floored as the divergence takes it)."""
        if not self._fft_refused and spectral.fft_cheaper(S, W, fit_dtype, BLOCK_ELEMENTS // 4):
            found = self._spectral_divergence(S, W, pad, V, weight, rows)
            if found is not None:
                return found
        prediction = _convolution_forward(S, W, pad)
        if self.beta != 2:
            prediction = prediction.clamp_min(self.eps)
        return self._pointwise(V, weight, prediction, rows), prediction

    def _spectral_divergence(self, S, W, pad, V, weight, rows):
        """A block's ``(divergence, reconstruction)`` from the FFTs, or None (and no
        FFTs for the rest of the fit) where their rounding could reach
        :data:`~torchnmf.targets.spectral.SHARE` epsilons of it."""
        prediction = spectral.fft_reconstruction(S, W, pad, rows[3] - rows[2])
        if self.beta != 2:
            prediction = prediction.clamp_min_(self.eps)
        value = self._pointwise(V, weight, prediction, rows)
        reach = spectral.error_bound(S, W).mul_(spectral.slope_norms(V, prediction, self.beta, weight))
        if float(reach.sum()) > spectral.SHARE * self.eps * float(value):
            self._fft_refused = True  # the fit only gets closer: keep the convolution
            return None
        return value, prediction

    def pointwise_divergence(self, H, W):
        r"""The divergence summed entry by entry in float64 on the reconstruction in
        ``V``'s dtype: one reconstruction, no float64 convolution.

        Its rounding is that of the reconstruction's entries, weighted by the
        divergence's slope :math:`\hat v^{\beta-2}(\hat v - v)`, which is small
        near a good fit, where the closed forms' rounding, of the size of
        :math:`v^\beta`, is not; near an exact fit the reconstruction's own rounding
        is as large as the residual and only :meth:`explicit_divergence` is accurate
        (see :class:`~torchnmf.targets.residual.AccurateDivergence`).  ``h_terms`` and
        ``w_terms`` give the same value with ``divergence="pointwise"``.
        """
        return self._terms(H, W, False, False, "pointwise")[2]

    # -- set-up ---------------------------------------------------------------
    def _route(self, H, W):
        """The route for these shapes (see :meth:`_plan`)."""
        return self._plan(H, W)[0]

    def _plan(self, H, W):
        """``(route, blocks)`` for these shapes, chosen once and kept."""
        key = (H.shape, W.shape)
        if self._chosen is not None and self._chosen[0] == key:
            return self._chosen[1:]
        route = self.route or self._choose_route(H, W)
        self._chosen = (key, route, self._block_shape(H, W, route))
        return self._chosen[1:]

    def _choose_route(self, H, W):
        """The fastest candidate route as timed on these tensors (:meth:`_probe`), once
        per process and shape, where :data:`PROBE_ROUTES` asks for it; the fixed rule
        otherwise and for several blocks."""
        fixed = self._fixed_route(H, W)
        probe = PROBE_ROUTES if PROBE_ROUTES is not None else self.V.device.type != "cpu"
        if not probe or self._block_shape(H, W, fixed) is not None:
            return fixed
        key = (tuple(self.V.shape), tuple(H.shape), tuple(W.shape), self.V.dtype, str(self.V.device),
               torch.get_num_threads(), self.beta, self.weight is None)
        if key not in _PROBED:
            _PROBED[key] = self._probe(H, W, self._candidates(H, W))
        return _PROBED[key]

    def _candidates(self, H, W):
        """The routes worth timing: the convolutions' always; the windows' for 1-D
        kernels and, with the hybrid, for small 2-D/3-D kernels over small windows
        (measured: larger ones are 2-30x slower than oneDNN); each in one block."""
        kernel = W.shape[2:]
        routes = ["conv", "adjoint"]
        if len(kernel) == 1:
            routes.append("windows")
        elif max(kernel) <= HYBRID_SIDE and self._windows_size(H, W) <= HYBRID_WINDOWS:
            routes += ["windows", "hybrid"]
        return [route for route in routes if self._block_shape(H, W, route) is None]

    def _probe(self, H, W, candidates):
        """The candidate whose statistics at one point (``joint_terms``: one
        reconstruction, both correlations and the element-wise pass, or the
        auto-correlations at beta=2) took the least time, fastest of
        :data:`PROBE_ROUNDS` rounds in turn, on these tensors (left unchanged);
        the fixed rule's route unless that one is :data:`PROBE_MARGIN` faster."""
        if len(candidates) == 1:
            return candidates[0]
        device = H.device
        best = {}
        key = (H.shape, W.shape)
        synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
        failed = set()
        with torch.no_grad():
            for _ in range(PROBE_ROUNDS):
                for route in candidates:
                    if route in failed:
                        continue
                    self._chosen = (key, route, None)
                    synchronize(device)
                    started = time.perf_counter()
                    try:
                        self.joint_terms(H, W)
                    except RuntimeError:  # a kernel this device or dtype lacks: not a candidate
                        failed.add(route)
                        continue
                    synchronize(device)
                    elapsed = time.perf_counter() - started
                    best[route] = min(best.get(route, elapsed), elapsed)
        self._chosen = None
        self._workspace.clear()  # the temporaries of the routes not taken
        fixed = self._fixed_route(H, W)
        if not best:
            return fixed
        fastest = min(best, key=best.__getitem__)
        if fixed in best and best[fastest] > (1 - PROBE_MARGIN) * best[fixed]:
            return fixed
        return fastest

    def _windows_size(self, H, W):
        """Elements of the windows per batch entry."""
        return H.shape[1] * math.prod(W.shape[2:]) * math.prod(self.V.shape[2:])

    def _fixed_route(self, H, W):
        """Windows for 1-D kernels; for 2-D and 3-D, torch's convolutions, or the
        hybrid for small kernels over small windows.

        Measured on CPU on an earlier machine (docs/benchmarks.md): for NMFD the
        window products beat conv1d 1.3-8x; for NMF2D/NMF3D oneDNN's
        convolutions beat the windows route 2-7x (its sum over the taps grows with
        the kernel's volume).  But oneDNN's padded convolution (the reconstruction)
        with more than four input channels, and its correlation with the
        activations as the kernel (:math:`J_W^\top`), are slow for small kernels
        (NMF2D 4x64x64, rank 6, kernel 3x3: 100 and 135 us against 82 and 33 us
        for the windows' products, windows built); the hybrid takes those two from
        the windows and :math:`J_H^\top` from oneDNN.  Rechecked after the
        reconstruction moved to the transposed convolution (statistics of one
        iteration, fastest of 5): the hybrid still leads at NMF2D 2x2 and 3x3
        (0.64 and 0.85 ms against 0.85 and 0.96) and ties at NMF3D 2x2x2; at
        NMF3D 3x3x3 "conv" was 12% faster (0.99 against 1.12 ms), within what
        this machine's noise moves.
        """
        kernel = W.shape[2:]
        if len(kernel) == 1:
            return "windows"
        if max(kernel) <= HYBRID_SIDE and self._windows_size(H, W) <= HYBRID_WINDOWS:
            return "hybrid"
        return "conv"

    def _block_shape(self, H, W, route):
        """``None`` (one block), ``("batch", entries)`` or ``("rows", rows)`` per block.

        A block's temporaries per output position: the reconstruction and the
        two right-hand sides (``3 C``), and for the windows their matrix and
        the product of the templates with the right-hand sides (``3 R K``).
        """
        limit = self.block_elements or BLOCK_ELEMENTS
        C, R = W.shape[:2]
        kernel = W.shape[2:]
        out = self.V.shape[2:]
        per_position = 3 * C + (3 * R * math.prod(kernel) if _windowed(route) else 0)
        per_row = per_position * math.prod(out[1:])
        N, rows = self.V.shape[0], out[0]
        if N * rows * per_row <= limit:
            return None
        if rows * per_row <= limit:
            return "batch", limit // (rows * per_row)
        # the windows route's correlation pads a block of ``b`` rows to ``b + 2 (k - 1)``;
        # blocks of equal size (the last one not a sliver)
        most = max(1, limit // per_row - 2 * (kernel[0] - 1))
        count = -(-rows // most)
        return "rows", -(-rows // count)

    def _blocks(self, H, W, route):
        """``(S, n0, n1, a, b, pad)`` per block: the activations ``S`` that reach the
        target's entries ``[n0:n1]`` and rows ``[a:b]`` of the first spatial axis;
        the block's reconstruction is rows ``[pad:pad + b - a]`` of ``S``'s full one."""
        shape = self._plan(H, W)[1]
        N, rows = self.V.shape[0], self.V.shape[2]
        if shape is None:
            yield H, 0, N, 0, rows, 0
        elif shape[0] == "batch":
            for n0 in range(0, N, shape[1]):
                yield H[n0:n0 + shape[1]], n0, min(n0 + shape[1], N), 0, rows, 0
        else:
            k = W.shape[2]
            padded = _pad_first_axis(H, k)
            for n in range(N):
                for a in range(0, rows, shape[1]):
                    b = min(a + shape[1], rows)
                    yield padded[n:n + 1, :, a:b + k - 1], n, n + 1, a, b, k - 1

    @staticmethod
    def _block_windows(S, kernel, pad, out_shape, out=None):
        """The windows of ``S`` at a block's own rows (rows ``pad:`` of its full output),
        written to ``out`` when given (see :func:`windows`)."""
        S_windows = windows(S, kernel, out)
        if not pad:
            return S_windows
        if len(kernel) == 1:  # a strided view: the products read it in place
            return S_windows.narrow(2, pad, out_shape[0])
        full = [s + k - 1 for s, k in zip(S.shape[2:], kernel)]
        rows = S_windows.view(*S_windows.shape[:2], *full).narrow(2, pad, out_shape[0])
        return rows.reshape(*S_windows.shape[:2], -1)

    def _buffer(self, name, shape, like, channels_last=False):
        """An uninitialised temporary, the same tensor at every call with this name and
        shape: the element-wise pass and the products write into memory they have
        written before (fresh 4 MB tensors cost a matrix product 1.3 to 2 times its
        time on CPU, measured, one thread).  Nothing kept here leaves the object.
        ``channels_last``: a ``(N, P, C, h, w)`` buffer whose ``(N P, C, h, w)`` view
        is in channels-last memory (the right-hand sides of :data:`CHANNELS_LAST_SIDE`)."""
        key = (name, tuple(shape), channels_last)
        kept = self._workspace.get(key)
        if kept is None or kept.dtype != like.dtype or kept.device != like.device:
            if len(self._workspace) > 8:  # shapes come and go (blocks): keep a few
                self._workspace.clear()
            if channels_last:
                N, P, C, *spatial = shape
                kept = like.new_empty((N, P, *spatial, C)).permute(0, 1, 4, 2, 3)
            else:
                kept = like.new_empty(shape)
            self._workspace[key] = kept
        return kept

    def _windows_of(self, S, kernel, pad, out_shape, out):
        """:meth:`_block_windows` of ``S`` in ``out``, unless ``out`` holds them already:
        an MU iteration's W pass and the next iteration's H pass see the same activations,
        unmodified (whole targets only; a block's ``S`` is a new view every pass)."""
        kept = self._windows
        if kept is not None and kept[0] is S and kept[1] == S._version and kept[2] is out:
            return out
        S_windows = self._block_windows(S, kernel, pad, out_shape, out)
        self._windows = (S, S._version, out) if S_windows is out else None
        return S_windows

    def _templates_matrix(self, W):
        """:func:`_flipped_matrix` of ``W``, kept while ``W`` is the same tensor,
        unmodified (an iteration's ``H`` and ``W`` passes see the same templates)."""
        kept = self._flipped
        if kept is None or kept[0] is not W or kept[1] != W._version:
            self._flipped = kept = (W, W._version, _flipped_matrix(W))
        return kept[2]

    def _block_forward(self, S, W, route, S_windows, pad, out_shape, out=None):
        """The reconstruction at a block's rows (into ``out`` on the windows' routes)."""
        if _windowed(route):
            return forward_from_windows(W, S_windows, out_shape, self._templates_matrix(W), out)
        return _convolution_forward(S, W, pad)

    def _target_block(self, n0, n1, a, b):
        if n0 == 0 and a == 0 and n1 == self.V.shape[0] and b == self.V.shape[2]:
            return self.V, self.weight  # one block: no views to make
        V = self.V[n0:n1, :, a:b]
        return V, None if self.weight is None else self.weight[n0:n1, :, a:b]

    def _gram_cheaper(self, H, W):
        """beta=2, no mask, and the auto-correlation route costs less than a
        reconstruction (the windows route, or torch's convolutions in one block)."""
        if self.beta != 2 or self.weight is not None:
            return False
        route, shape = self._plan(H, W)
        if route == "hybrid" or (not _windowed(route) and shape is not None):
            return False
        RK = W[0].numel()
        return RK < 2 * W.shape[0]

    def _forward(self, H, W, route, H_windows):
        """The full reconstruction of ``H``."""
        if not _windowed(route):
            return _convolution_forward(H, W, 0)
        out_shape = [s + k - 1 for s, k in zip(H.shape[2:], W.shape[2:])]
        return forward_from_windows(W, H_windows, out_shape)

    def _both(self):
        """Whether the positive parts need the reconstruction (not at beta=1 unmasked)."""
        return self.beta != 1 or self.weight is not None

    def _powers(self, prediction, pair, divergence, V, weight, rows=None):
        """Fill ``pair`` with (V * WH^(beta-2), M * WH^(beta-1)); return the divergence's
        variable part over these entries, or None; with ``divergence="pointwise"``
        the entry-wise divergence over them (block ``rows``, see :meth:`_pointwise`).

        ``pair`` is ``(2, *V.shape)``, or ``(1, ...)`` at beta=1 without a mask,
        where only the first part is needed; the sum of the reconstruction is then
        left to the caller (:func:`_sum_prediction`).
        """
        beta = self.beta
        if divergence == "pointwise":
            # as explicit_divergence: floored at eps except at beta=2, before the log below
            floored = prediction if beta == 2 else prediction.clamp_min_(self.eps)
            value = self._pointwise(V, weight, floored, rows)
            self._powers(prediction, pair, False, V, weight)
            return value
        floored = prediction.clamp_min_(self.eps)
        numer, denom = pair[0], pair[1] if pair.shape[0] > 1 else None
        variable = None
        if beta == 1:
            if weight is not None:
                denom.copy_(weight)
                if divergence:
                    variable = _inner(weight, floored)
            torch.div(V, floored, out=numer)
            if divergence:  # the reconstruction is not needed any more: its log in place
                # (base 2: about 10% cheaper than the natural log on CPU, measured in place on
                # 257k and 1M float32 entries, one thread)
                logs = float64_sum(floored.log2_().mul_(V)).mul_(-_LN2)  # minus the log's sum
                variable = logs if variable is None else variable.add_(logs)
            return variable
        torch.pow(floored, beta - 1, out=denom)
        if weight is not None:
            denom.mul_(weight)
        torch.div(denom, floored, out=numer)
        numer.mul_(V)
        if divergence:  # the entries' terms in the reconstruction's buffer, then summed
            if beta == 0:  # sum M log WH + V WH^-1
                terms = floored.log_()
                if weight is not None:
                    terms.mul_(weight)
                variable = float64_sum(terms.addcmul_(denom, V))
            else:  # sum WH^(beta-1) (WH - beta / (beta - 1) V) / beta
                variable = float64_sum(floored.add_(V, alpha=-beta / (beta - 1)).mul_(denom)) / beta
        return variable

    def _pointwise(self, V, weight, prediction, rows):
        """The entry-wise divergence of a block (float64 sum), with ``V``'s own parts
        kept for the next call at the same ``rows``."""
        reference = self._references.get(rows)
        observed = None if weight is None else weight.bool()
        if reference is None:
            if len(self._references) > 8:  # many blocks: keep a few
                self._references.clear()
            reference = PointwiseReference(V if observed is None else V[observed], self.beta)
            self._references[rows] = reference
        if observed is not None:
            prediction = prediction[observed]
        return reference.divergence(prediction).sum()

    def _total(self, variable):
        return (self.constant + variable).clamp_min(0)

    # -- the element-wise pass shared by both factors, block by block -------------------
    def _terms(self, H, W, want_h, want_w, divergence):
        """``(h, w, divergence)`` from the ratio and the powers of the reconstruction.

        ``h`` and ``w`` are (negative, positive) pairs (``None`` when not
        wanted); at beta=1 without a mask the positive parts are the sums of
        the other factor, broadcastable.
        """
        route, shape = self._plan(H, W)
        kernel = tuple(W.shape[2:])
        parts = 2 if self._both() else 1
        C, R = W.shape[:2]
        K = math.prod(kernel)
        h_sum = self._h_sums(H, parts) if want_h and shape is not None else None
        w_sum = variable = None
        # "explicit": the float64 reconstruction of explicit_divergence gives the value,
        # and, rounded, the ratio's (the float32 one would be a second reconstruction)
        explicit = divergence == "explicit"
        W_exact = W.double() if explicit else None
        for S, n0, n1, a, b, pad in self._blocks(H, W, route):
            V, weight = self._target_block(n0, n1, a, b)
            count, positions = n1 - n0, math.prod(V.shape[2:])
            S_windows = prediction = None
            if _windowed(route) and (want_w or not explicit):  # J_W^T reads the windows
                size = (count, R * K, math.prod(s + k - 1 for s, k in zip(S.shape[2:], kernel)))
                S_windows = self._windows_of(S, kernel, pad, V.shape[2:], self._buffer("windows", size, S))
                prediction = self._buffer("prediction", (count, C, positions), S)
            if explicit:
                value, exact = self._explicit_block(S.double(), W_exact, pad, V, weight,
                                                    (n0, n1, a, b), S.dtype)
                prediction = (exact.to(S.dtype) if prediction is None
                              else prediction.view(exact.shape).copy_(exact))
            else:
                prediction = self._block_forward(S, W, route, S_windows, pad, V.shape[2:], prediction)
            pair = self._buffer("pair", (count, parts, *V.shape[1:]), S,
                                _H_ROUTE[route] == "conv" and _channels_last(S, W))
            found = self._powers(prediction, pair.transpose(0, 1), False if explicit else divergence,
                                 V, weight, (n0, n1, a, b))
            if not explicit:
                value = found
            if divergence:
                variable = value if variable is None else variable + value
            if want_h and want_w and route == "adjoint" and parts == 1:
                # one backward call for both correlations, as autograd makes (EM)
                flipped = self._templates_matrix(W).view(W.shape)
                terms_h, terms_w = _adjoint(pair.view(count, *V.shape[1:]), S, flipped, pad, 2)
                h_sum = self._add_h(h_sum, terms_h.unsqueeze(0), n0, n1, a)
                terms_w = terms_w.flip(dims=tuple(range(2, 2 + len(kernel))))
                w_sum = terms_w if w_sum is None else w_sum.add_(terms_w)
                continue
            if want_h:
                inputs = None  # the "adjoint" route reads the activations' shape from it
                if _H_ROUTE[route] == "adjoint":
                    inputs = S if parts == 1 else S.repeat_interleave(parts, 0)
                taps = None
                if _H_ROUTE[route] == "windows":
                    taps = self._buffer("taps", (count * parts, R * K, positions), S)
                terms = correlate_h(pair.view(-1, *V.shape[1:]), W, _H_ROUTE[route], pad, inputs, taps)
                terms = terms.view(n1 - n0, parts, *terms.shape[1:]).transpose(0, 1)
                h_sum = self._add_h(h_sum, terms, n0, n1, a)
            if want_w:  # (a copy for a channels-last pair of two parts)
                terms = correlate_w(pair.reshape(n1 - n0, parts * C, *V.shape[2:]), S, S_windows,
                                    kernel, _W_ROUTE[route], pad)
                w_sum = terms if w_sum is None else w_sum.add_(terms)
        pointwise = divergence in ("pointwise", "explicit")  # entry by entry: the whole value
        if divergence and not (pointwise or self.weight is not None or self.beta != 1):
            variable = _sum_prediction(H, W) + variable
        h = w = None
        if want_h:
            h_sum = self._h_unpadded(h_sum, H, W)
            ones = W.sum(dim=[0] + list(range(2, W.dim()))).view(1, -1, *[1] * len(kernel))
            h = (h_sum[0], h_sum[1] if parts == 2 else ones)
        if want_w:
            ones = H.sum(dim=[0] + list(range(2, H.dim()))).view(1, -1, *[1] * len(kernel))
            w = (w_sum[:C], w_sum[C:] if parts == 2 else ones)
        if not divergence:
            return h, w, None
        return h, w, variable if pointwise else self._total(variable)

    # -- the activations' terms, block by block ----------------------------------------
    def _h_sums(self, H, parts):
        """Zeros for ``parts`` sums of the ``H`` terms over blocks, in the coordinates
        of ``H`` padded along its first axis when the blocks are rows."""
        pad = self._plan_pad()
        return H.new_zeros((parts, H.shape[0], H.shape[1], H.shape[2] + 2 * pad, *H.shape[3:]))

    def _plan_pad(self):
        shape, kernel = self._chosen[2], self._chosen[0][1][2:]
        return kernel[0] - 1 if shape is not None and shape[0] == "rows" else 0

    @staticmethod
    def _add_h(h_sum, terms, n0, n1, a):
        """Add a block's ``(parts, n, R, *S)`` terms at its entries and rows (``None``: one block)."""
        if h_sum is None:
            return terms
        h_sum[:, n0:n1, :, a:a + terms.shape[3]] += terms
        return h_sum

    def _h_unpadded(self, h_sum, H, W):
        pad = self._plan_pad()
        return h_sum.narrow(3, pad, H.shape[2]) if pad else h_sum

    # -- beta=2 from the auto-correlations -------------------------------------------
    def _gram_terms(self, H, W, want_h, want_w):
        r"""``(h, w)`` (negative, positive) pairs at beta=2 without the reconstruction.

        The positive parts are :math:`J_H^\top J_H H` and :math:`J_W^\top J_W W`:
        the templates' auto-correlation applied to the activations' windows, and
        the windows' own auto-correlation (summed over blocks) applied to the
        templates.  The convolutions' routes (one block only) reconstruct instead.
        """
        route = self._route(H, W)
        kernel = tuple(W.shape[2:])
        C, R = W.shape[:2]
        h = w = None
        if not _windowed(route):
            prediction = self._forward(H, W, route, None)
            if want_h:
                h = (correlate_h(self.V, W, route, H=H), correlate_h(prediction, W, route, H=H))
            if want_w:
                w = (correlate_w(self.V, H, None, kernel, route),
                     correlate_w(prediction, H, None, kernel, route))
            return h, w
        templates = W.reshape(C, -1).T @ _flipped_matrix(W) if want_h else None  # (R K, R K)
        h_sum = self._h_sums(H, 2) if want_h and self._plan(H, W)[1] is not None else None
        w_negative = gram = None
        for S, n0, n1, a, b, pad in self._blocks(H, W, route):
            V, _ = self._target_block(n0, n1, a, b)
            S_windows = self._block_windows(S, kernel, pad, V.shape[2:])
            if want_h:
                negative = correlate_h(V, W, route, pad)
                Y = torch.matmul(templates, S_windows)
                positive = _taps_sum(Y, R, kernel, tuple(V.shape[2:]), pad)
                h_sum = self._add_h(h_sum, torch.stack([negative, positive]), n0, n1, a)
            if want_w:
                negative = correlate_w(V, S, S_windows, kernel, route)
                block_gram = torch.einsum("nkl,njl->kj", S_windows, S_windows)  # (R K, R K)
                w_negative = negative if w_negative is None else w_negative.add_(negative)
                gram = block_gram if gram is None else gram.add_(block_gram)
        if want_h:
            h_sum = self._h_unpadded(h_sum, H, W)
            h = (h_sum[0], h_sum[1])
        if want_w:
            flat = _flipped_matrix(W) @ gram
            w = (w_negative, flat.view(W.shape).flip(dims=tuple(range(2, W.dim()))))
        return h, w

    # -- H ------------------------------------------------------------------------
    def h_terms(self, H, W, divergence=True):
        """The ``H`` terms and the divergence at (H, W) (``None`` with ``divergence=False``;
        entry by entry with ``"pointwise"``, see :meth:`pointwise_divergence`, or
        ``"explicit"``, see :meth:`explicit_divergence`: then the terms come from the
        float64 reconstruction rounded to the factors' dtype)."""
        if self._gram_cheaper(H, W):
            (negative, positive), _ = self._gram_terms(H, W, True, False)
            value = None
            if divergence == "pointwise":
                value = self.pointwise_divergence(H, W)
            elif divergence == "explicit":
                value = self.explicit_divergence(H, W)
            elif divergence:
                value = self._total(-_inner(H, negative) + _inner(H, positive) / 2)
            return negative, positive, value
        h, _, value = self._terms(H, W, True, False, divergence)
        return (*h, value)

    # -- W ------------------------------------------------------------------------
    def w_terms(self, H, W, divergence=False):
        """The ``W`` terms; with ``divergence=True`` (or ``"pointwise"``) also the
        divergence at (H, W)."""
        if self._gram_cheaper(H, W):
            _, (negative, positive) = self._gram_terms(H, W, False, True)
            if not divergence:
                return negative, positive
            if divergence == "pointwise":
                return negative, positive, self.pointwise_divergence(H, W)
            if divergence == "explicit":
                return negative, positive, self.explicit_divergence(H, W)
            return negative, positive, self._total(-_inner(W, negative) + _inner(W, positive) / 2)
        _, w, value = self._terms(H, W, False, True, divergence)
        return w if not divergence else (*w, value)

    # -- both at one point ------------------------------------------------------------
    def joint_terms(self, H, W, divergence=True):
        """``(h_terms, w_terms, divergence)`` at one point from one reconstruction
        (``divergence`` as for :meth:`h_terms`).

        For solvers that update every factor from the same point (PLCA's EM),
        where separate ``h_terms`` and ``w_terms`` would reconstruct twice.
        """
        if self._gram_cheaper(H, W):
            negative, positive, value = self.h_terms(H, W, divergence)
            return (negative, positive), self.w_terms(H, W), value
        return self._terms(H, W, True, True, divergence)

    # -- divergence ---------------------------------------------------------------
    def divergence(self, H, W):
        return self._terms(H, W, False, False, True)[2]
