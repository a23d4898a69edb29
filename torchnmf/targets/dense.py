r"""Dense matrix targets: closed-form statistics from Gram products and row blocks.

For a matrix, ``V`` is ``(N, C)``, ``H`` is ``(N, R)``, ``W`` is ``(C, R)`` and
:math:`\hat V = H W^\top`.  Also the divergence helpers the other matrix kinds
share: the part of the divergence that depends on ``V`` alone, and the beta=2
divergence from one side's terms.
"""
import math

import torch

from .. import _device as device
from .residual import PointwiseReference, amplification, pointwise_divergence
from ..solvers.scaling import narrow_range

__all__ = [
    "DenseMatrixStats",
    "divergence_constant",
    "float64_sum",
    "gram_divergence",
    "BLOCK_ELEMENTS",
    "inner",
    "accurate_inner",
    "cross_inner",
    "accurate_cross",
    "float64_runs",
    "matmul_into",
    "add_product_",
    "batch_shape",
    "shared_product",
]

# Elements of V handled per block by the element-wise passes (4 MiB of float32):
# large enough for efficient matrix products, small enough that the work buffers
# stay far below one copy of V.
BLOCK_ELEMENTS = 1 << 20
# Entries per block of the explicit residual's float64 passes (1 MiB of float64, which
# stays in a core's cache through its seven passes): 4000x2000 at beta=1 in 107 ms
# against 194 in blocks of BLOCK_ELEMENTS (one thread, measured). A V of at most
# BLOCK_ELEMENTS entries keeps its blocks' float64 parts between calls (a power at
# beta outside {0, 1, 2} costs more than the rest).
EXPLICIT_ELEMENTS = 1 << 17
# Entries per part of divergence_constant's float64 terms.
CONSTANT_ELEMENTS = 1 << 15


def _row_blocks(n_rows, rows_per_block):
    for start in range(0, n_rows, rows_per_block):
        yield start, min(start + rows_per_block, n_rows)


def _rows(x, start, stop):
    """Rows ``start:stop`` of ``x`` along its second-to-last dimension: ``x`` itself
    when that is all of them (a small ``V`` is one block, and every slice costs a
    call per iteration)."""
    if start == 0 and stop == x.shape[-2]:
        return x
    return x[..., start:stop, :]


def host_value(value):
    """A 0-dim float64 tensor on the CPU as a Python float, anything else unchanged.

    The scalar arithmetic that assembles a divergence then runs on Python floats:
    the same IEEE double operations, without a torch call for each (a small fit
    pays them every iteration).  On an accelerator the value stays on the device,
    since reading it would synchronise; a stack's values (one per member) stay a
    tensor.
    """
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not device.on_accelerator(value):
        return value.item()
    return value


def _summable(x):
    """``x``, or a float32 copy where ``x``'s own sums would overflow (:func:`narrow_range`):
    float16 KL fits of the digits (115,008 entries) had an objective of inf."""
    return x.float() if narrow_range(x.dtype) else x


def inner(a, b, out=None):
    r""":math:`\sum a \odot b` over the last two dimensions, in float64.

    Leading (batch) dimensions broadcast, so a shared ``(n, m)`` block pairs
    with a stack ``(B, n, m)`` of reconstructions; for two matrices this is
    one dot product.  No temporary of the operands' size is formed (but for
    float16 operands, taken in float32); ``out`` is not used (see
    :func:`accurate_inner`).
    """
    a, b = _summable(a).flatten(-2), _summable(b).flatten(-2)
    if a.dim() == 1 and b.dim() == 1:
        value = torch.dot(a, b)
    elif b.dim() == 1:
        value = torch.mv(a, b)
    elif a.dim() == 1:
        value = torch.mv(b, a)
    else:
        value = torch.matmul(a.unsqueeze(-2), b.unsqueeze(-1)).squeeze(-1).squeeze(-1)
    return value.to(torch.float64)


def accurate_inner(a, b, out=None):
    r""":func:`inner` by a product and row sums (the rows' totals in float64): the
    rounding of the products and of short cascaded sums instead of the dot
    product's accumulation along a few lanes, for one more pass.  ``out``, a
    spare buffer of the product's shape and dtype, takes the product (a fresh
    temporary of a 2048 x 1024 block made the pass 10% slower than the dot
    product; into a spare one, measured in the commit that added it).

    For sums the closed forms divide by a small :math:`\beta - 1` or
    :math:`\beta` (see :func:`~torchnmf.targets.residual.amplification`): on
    the digits in float32 at ``beta=0.99`` the dot product's rounding alone put
    the objective 0.13% off and made it rise 7 times in 200 iterations.
    """
    a, b = _summable(a), _summable(b)
    spare = out is not None and out.dtype == a.dtype
    products = torch.mul(a, b, out=out) if spare else torch.mul(a, b)
    if products.dim() < 2:
        return products.sum(dtype=torch.float64)
    # rows in the dtype, their totals in float64 (see float64_sum): a float32 sum of
    # all of a 1797 x 64 block was 1.2e-7 off, its rows' float64 total 1e-9
    return products.sum(-1).sum(-1, dtype=torch.float64)


def accurate_cross(beta, dtype):
    """Whether the closed forms' cross term (divided by ``beta - 1``) needs a sum more
    accurate than a dot product: where that division amplifies its rounding, and for
    every dtype narrower than float64.

    The dot product's rounding grows with the entries it sums: on the breast
    cancer data (569 x 30, rank 5, float32, beta=0.5) it was 2e-6 of the sum,
    which a good fit's cancellation (terms 900 times the objective) made 0.1%
    of the objective; ``"mu_extrapolated"``, comparing such values, then
    refused ten times as many moves as in float64 and ended 33% higher.
    """
    return amplification(beta) > 1 or torch.finfo(dtype).eps > torch.finfo(torch.float64).eps


def cross_inner(beta, dtype):
    """The :func:`inner` for the cross term: :func:`accurate_inner` where
    :func:`accurate_cross` asks for it."""
    return accurate_inner if accurate_cross(beta, dtype) else inner


def matmul_into(out, a, b):
    """``out[...] = a @ b``, written in place even where ``out`` is a strided view
    (a row block of a stacked factor)."""
    if out.is_contiguous():
        return torch.matmul(a, b, out=out)
    return out.copy_(torch.matmul(a, b))


def add_product_(out, a, b):
    """``out += a @ b`` in place; ``out`` a matrix or a stack of them, ``a`` and
    ``b`` broadcasting against it."""
    if out.dim() == 2:
        return out.addmm_(a, b)
    if a.dim() == 3 and b.dim() == 3:
        return out.baddbmm_(a, b)
    return out.add_(torch.matmul(a, b))


def shared_product(V, factor):
    """``V @ factor`` for a matrix ``factor`` ``(m, R)`` or for every member of a stack
    ``(K, m, R)``; a stack's members share ``V``, so their products are one
    product with ``K R`` columns (``V`` read once), returned as a ``(K, n, R)`` view."""
    if factor.dim() == 2:
        return V @ factor
    members, m, R = factor.shape
    product = torch.mm(V, factor.transpose(0, 1).reshape(m, members * R))
    return product.view(V.shape[0], members, R).transpose(0, 1)


def batch_shape(factor):
    """The leading (batch) dimensions of a matrix factor: ``()`` for one ``(n, R)``
    factor, ``(B,)`` for a stack of ``B`` of them."""
    return tuple(factor.shape[:-2])


class DenseMatrixStats:
    """Closed-form statistics for a dense ``(N, C)`` matrix.

    beta=2 uses Gram products only (no reconstruction is ever formed); beta=1
    needs the ratio ``V / WH`` and column sums; other betas need two powers of
    the reconstruction.  For beta != 2 the reconstruction is formed one row
    block at a time in work buffers allocated once.

    The factors may also be stacks, ``H`` of shape ``(B, N, R)`` and ``W`` of
    shape ``(B, C, R)``: ``B`` independent factorisations of the same ``V``
    (see :mod:`torchnmf.restarts`); every term gets the leading ``B`` and the
    divergence is one value per member, ``(B,)``.  Blocks then hold the same
    rows of every member, in work buffers of the single fit's size; products
    with ``V`` are one product for all members (:func:`shared_product`).
    """

    def __init__(self, V, beta, block_elements=None, constant=None):
        self.V = V.contiguous()
        self.block_elements = block_elements
        self.beta = float(beta)
        self.eps = torch.finfo(V.dtype).eps
        N, C = self.V.shape
        self.block_elements = block_elements or BLOCK_ELEMENTS
        self.rows = max(1, min(N, self.block_elements // max(C, 1)))
        self._work = None
        self._work_key = None
        self._reference = None  # (V, its PointwiseReference) for explicit_divergence on one block
        self._views = {}  # block shape -> (work buffer, its views); see _block_views
        self._cross_inner = cross_inner(self.beta, self.V.dtype)
        # a wrapping kind (streamed rows) sums the constant once and passes 0 per block
        self.constant = self._divergence_constant() if constant is None else constant
        self.constant = host_value(self.constant)

    def rebind(self, V):
        """Point these statistics at another matrix of ``V``'s shape and dtype, keeping
        the work buffers (a wrapping kind reuses one object for its row blocks)."""
        self.V = V.contiguous()
        return self

    # -- scale (see torchnmf.solvers.scaling) -------------------------------------------
    def scale_sums(self):
        """``(sum, count)`` of the observed entries of ``V``: the entry point's scale."""
        return float(float64_sum(self.V)), self.V.numel()

    def scaled(self, factor):
        """The same statistics for ``factor * V``."""
        return type(self)(self.V * factor, self.beta, self.block_elements)

    # -- the explicit residual (see torchnmf.targets.residual) -----------------------
    def magnitude(self):
        """The size of the divergence's terms, :math:`\\sum V^\\beta` (float)."""
        return power_sum(self.V, self.beta)

    def magnitude_squares(self):
        """:math:`\\sum V^{2\\beta}`, for the closed forms' rounding noise (float)."""
        return power_sum(self.V, 2 * self.beta)

    def explicit_divergence(self, H, W):
        """The divergence summed entry by entry in float64 (slow, accurate)."""
        W64 = W.double()
        blocks = list(_row_blocks(H.shape[0], max(1, EXPLICIT_ELEMENTS // max(self.V.shape[1], 1))))
        references = None
        if self.V.numel() <= BLOCK_ELEMENTS:  # V's parts are kept
            if self._reference is None or self._reference[0] is not self.V:
                self._reference = (self.V, [PointwiseReference(self.V[start:stop], self.beta)
                                            for start, stop in blocks])
            references = self._reference[1]
        total = torch.zeros((), dtype=torch.float64, device=H.device)
        for k, (start, stop) in enumerate(blocks):
            R = (H[start:stop].double() @ W64.T)
            if references is None:
                total += pointwise_divergence(self.V[start:stop], R, self.beta, self.eps).sum()
            else:
                total += references[k].divergence(R, self.eps).sum()
        return host_value(total) if len(blocks) == 1 else total

    # -- set-up ---------------------------------------------------------------
    def _buffers(self, H):
        """Work buffers for factors like ``H``, allocated on first use and reused
        for the whole fit (and again when the batch changes)."""
        batch, R = batch_shape(H), H.shape[-1]
        if self._work_key != (batch, R, self.V.shape[0]):
            N, C = self.V.shape
            members = math.prod(batch)
            # the same elements per block as one fit's, shared by the members: larger
            # blocks fall out of the cache (measured: a 2000x1000 stack of 20 at beta=1,
            # 4x larger blocks made the element-wise passes twice as slow per element)
            self.rows = max(1, min(N, self.block_elements // max(members * C, 1)))
            new = self.V.new_empty
            block = members * self.rows * C
            self._work = (
                new(block),
                new(2, block),
                new(*batch, N, R),
                new(*batch, N, R),
                new(*batch, C, R),
                new(*batch, C, R),
            )
            self._work_key = (batch, R, N)
        return self._work

    def _divergence_constant(self):
        """The part of the divergence that depends on V alone, summed blockwise."""
        beta, V = self.beta, self.V
        total = torch.zeros((), dtype=torch.float64, device=V.device)
        # small blocks: the float64 temporaries stay a few hundred KiB
        rows = max(1, (1 << 15) // max(V.shape[1], 1))
        for start, stop in _row_blocks(V.shape[0], rows):
            total += divergence_constant(V[start:stop], beta)
        return total

    # -- beta = 2: Gram products --------------------------------------------------
    def _gram_h(self, H, W, divergence=True):
        _, _, negative, positive, _, _ = self._buffers(H)
        if W.dim() == 2:
            torch.matmul(self.V, W, out=negative)
        else:
            negative = shared_product(self.V, W)
        gram_W = W.mT @ W
        torch.matmul(H, gram_W, out=positive)
        value = gram_divergence(self.constant, H, negative, positive) if divergence else None
        return negative, positive, value

    def _gram_w(self, H, W, divergence=False):
        _, _, _, _, negative, positive = self._buffers(H)
        if H.dim() == 2:
            torch.matmul(self.V.T, H, out=negative)
        else:
            negative = shared_product(self.V.T, H)
        torch.matmul(W, H.mT @ H, out=positive)
        if not divergence:
            return negative, positive
        return negative, positive, gram_divergence(self.constant, W, negative, positive)

    # -- other beta: blockwise powers of the reconstruction -------------------------
    def _block_views(self, H, b, work, pair):
        """The reconstruction block and the (numerator, denominator) pair for ``b``
        rows of every member, as contiguous views of the flat work buffers (made
        once per block size and set of buffers: small fits pay for every call)."""
        shape = (*batch_shape(H), b, self.V.shape[1])
        views = self._views.get(shape)
        if views is None or views[0] is not work:
            size = math.prod(shape)
            views = (work, (work[:size].view(shape), pair[0, :size].view(shape),
                            pair[1, :size].view(shape)))
            self._views[shape] = views
        return views[1]

    def _block_powers(self, V_block, H_block, W, views, divergence=True):
        """Fill the pair of ``views`` with (V * WH^(beta-2), WH^(beta-1)) for one row block.

        Returns the block's contribution to the divergence (minus the constant),
        or 0 with ``divergence=False`` (the W pass), which skips its passes.
        """
        beta = self.beta
        WH, numer, denom = views
        torch.matmul(H_block, W.mT, out=WH)
        WH.clamp_min_(self.eps)
        part = 0
        if beta == 1:
            if divergence:
                torch.log(WH, out=denom)
                # (denom is spare at beta=1: the positive term is W's column sums)
                part = -host_value(self._cross_inner(denom, V_block, out=denom))
            torch.div(V_block, WH, out=numer)
            return part
        if beta == 0 and divergence:
            torch.log(WH, out=denom)
            part = host_value(denom.sum((-2, -1), dtype=torch.float64))
        torch.pow(WH, beta - 1, out=denom)
        torch.div(denom, WH, out=numer)
        numer.mul_(V_block)
        if not divergence:
            return part
        # (the reconstruction's buffer is spare once the pair is filled)
        cross = host_value(self._cross_inner(denom, V_block, out=WH))
        if beta == 0:
            return part + cross
        # the sum of WH^beta is added by the caller from the positive term
        return -cross / (beta - 1)

    def _power_sum_divergence(self, total, positive, factor, H, W):
        """The divergence: ``total`` (the blocks' parts), the constant, and the sum of
        WH^beta taken from ``positive``, the positive term of ``factor`` (H or W)."""
        if self.beta == 1:
            total = total + host_value(torch.linalg.vecdot(
                H.sum(-2, dtype=torch.float64), W.sum(-2, dtype=torch.float64)
            ))
        elif self.beta != 0:
            # sum(WH^beta) = sum(WH^(beta-1) * (H W^T)) = sum((WH^(beta-1) W) * H):
            # an (N, R) or (C, R) pass over the positive term instead of an (N, C) one
            total = total + host_value((positive * factor).sum((-2, -1), dtype=torch.float64)) / self.beta
        return self.constant + total

    def _blocked_h(self, H, W, divergence=True):
        work, pair, negative, positive, _, _ = self._buffers(H)
        total = 0  # the blocks' parts: floats on the CPU, else float64 tensors; 0 without divergence
        for start, stop in _row_blocks(H.shape[-2], self.rows):
            views = self._block_views(H, stop - start, work, pair)
            part = self._block_powers(
                _rows(self.V, start, stop), _rows(H, start, stop), W, views, divergence
            )
            total = part if start == 0 else total + part
            matmul_into(_rows(negative, start, stop), views[1], W)
            if self.beta != 1:
                matmul_into(_rows(positive, start, stop), views[2], W)
        if self.beta == 1:
            positive = W.sum(-2, keepdim=True)
        if not divergence:
            return negative, positive, None
        return negative, positive, self._power_sum_divergence(total, positive, H, H, W)

    def _blocked_w(self, H, W, divergence=False):
        work, pair, _, _, negative, positive = self._buffers(H)
        total = 0  # as in _blocked_h: no tensor work in the W pass of a fit
        for start, stop in _row_blocks(H.shape[-2], self.rows):
            views = self._block_views(H, stop - start, work, pair)
            H_block = _rows(H, start, stop)
            part = self._block_powers(_rows(self.V, start, stop), H_block, W, views, divergence)
            total = part if start == 0 else total + part
            # the first block's products are written, the others' added
            store = matmul_into if start == 0 else add_product_
            store(negative, views[1].mT, H_block)
            if self.beta != 1:
                store(positive, views[2].mT, H_block)
        if self.beta == 1:
            positive = H.sum(-2, keepdim=True)
        if not divergence:
            return negative, positive
        return negative, positive, self._power_sum_divergence(total, positive, W, H, W)

    # -- interface ----------------------------------------------------------------
    @property
    def gram_form(self):
        """True when the positive ``W`` term is ``W @ (H.T @ H)`` (beta=2), so that a
        kind summing over row blocks may sum the ``(R, R)`` Gram matrix instead."""
        return self.beta == 2

    def h_terms(self, H, W, divergence=True):
        """The ``H`` terms and the divergence at (H, W) (``None`` with ``divergence=False``)."""
        if self.beta == 2:
            return self._gram_h(H, W, divergence)
        return self._blocked_h(H, W, divergence)

    def w_terms(self, H, W, divergence=False):
        """The ``W`` terms; with ``divergence=True`` also the divergence at (H, W)."""
        if self.beta == 2:
            return self._gram_w(H, W, divergence)
        return self._blocked_w(H, W, divergence)

    def divergence(self, H, W):
        return self.h_terms(H, W)[2]


def gram_divergence(constant, factor, negative, positive):
    r"""The beta=2 divergence from one side's terms, with no product of ``V``'s size.

    With :math:`X` = ``factor`` (``H`` or ``W``), ``negative`` = :math:`V Y` and
    ``positive`` = :math:`X Y^\top Y` (:math:`Y` the other factor),
    :math:`D = \tfrac12\|V\|^2 - \langle X, V Y\rangle + \tfrac12\langle X, X Y^\top Y\rangle`.
    One pass over an ``(n, R)`` array; column sums in the working dtype, their
    total in float64 (relative error about 1e-9 in float32, measured).
    """
    products = torch.sub(negative, positive, alpha=0.5).mul_(factor)
    return constant - host_value(products.sum(-2).double().sum(-1))


def float64_sum(x):
    """The sum of every entry of ``x`` as a float64 tensor: sums along the last
    dimension in ``x``'s dtype, their total in float64.

    ``x.sum(dtype=torch.float64)`` converts every element on the way and is
    over ten times slower on CPU (float32, 50000 x 500, one thread: 0.14 s
    against 0.011 s, measured); torch's float reductions sum in a cascade, so a
    row sum keeps nearly the dtype's precision.  The rows are those of ``x``'s
    memory (for a channels-last tensor, runs over its columns and channels).
    """
    if x.dim() == 0:
        return x.double()
    if not x.is_contiguous() and x.dim() > 1:  # channels last: rows of columns x channels
        x = _memory_order(x).flatten(-2)
    rows = x.sum(-1, dtype=torch.float32) if narrow_range(x.dtype) else x.sum(-1)
    return rows.sum(dtype=torch.float64)


RUN = 1024  # entries summed in the dtype by float64_runs before their float64 total


def float64_runs(x):
    """The sums of ``x`` over its last dimension in float64 (one per leading index):
    runs of :data:`RUN` entries summed in ``x``'s dtype, their totals in float64.

    Within 2e-10 of the sum of 2M float32 entries' magnitudes (a dot product:
    3e-6) at 0.13 ms where ``x.sum(-1, dtype=torch.float64)``, which converts
    every entry, took 0.73 (one thread, measured): a sparse fit's stored entries
    form one long row.  Sums the closed forms divide by a small ``beta - 1`` need
    every entry in float64 (see :func:`~.residual.amplification`).
    """
    n = x.shape[-1]
    full = n - n % RUN
    total = x[..., :full].unflatten(-1, (-1, RUN)).sum(-1).sum(-1, dtype=torch.float64)
    if full < n:
        total = total + x[..., full:].sum(-1, dtype=torch.float64)
    return total


def power_sum(x, exponent):
    r""":math:`\sum x^{\text{exponent}}` over every entry of ``x``, in float64 (a float).

    Taken in parts of ``CONSTANT_ELEMENTS`` (float64 temporaries of 256 KiB), with
    a dot product for even exponents: a float64 copy of the whole of ``x`` cost a
    third of a one-pass minibatch fit of 50000 x 500 (at ``beta=1``, ``sum V`` and
    ``sum V^2``: 0.25 s each against 0.02, one thread, measured).
    """
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    half = exponent / 2
    for part in x.reshape(-1).split(CONSTANT_ELEMENTS):
        part = part.double()  # (float64 x itself: nothing below writes into it)
        if exponent == 1:
            total += part.sum()
        elif half in (1, 2):  # x^2 and x^4 as dot products of x and x^2
            if half == 2:
                part = part.square()
            total += torch.dot(part, part)
        else:
            total += part.pow(exponent).sum()
    return float(total)


def _memory_order(x):
    """``x`` permuted so that its axes run from the largest stride to the smallest
    (a contiguous view for a dense tensor of any layout), or ``x`` itself."""
    order = sorted(range(x.dim()), key=lambda axis: -x.stride(axis))
    view = x.permute(order)
    return view if view.is_contiguous() else x


def divergence_constant(V, beta):
    """The part of :math:`D_\\beta(V | \\hat V)` that depends on ``V`` alone (float64).

    ``V`` is non-negative (``V log V`` is taken as ``V log max(V, tiny)``: 0 at 0).
    Its terms are taken in float64 at beta != 2 (once per fit): in float32 their
    logs' and powers' rounding did not average out (20 epsilons of the root sum of
    squares of V on NMF2D 4x64x64, against 2 for a random walk; measured).
    """
    if beta == 2:
        return float64_sum(V * V) / 2
    tiny = torch.finfo(V.dtype).tiny
    total = torch.zeros((), dtype=torch.float64, device=V.device)
    for part in V.reshape(-1).split(CONSTANT_ELEMENTS):  # float64 temporaries of 256 KiB
        part = part.double()
        if beta == 1:
            # the log, then V log V - V, in one buffer (torch.xlogy is several times slower)
            total += torch.log(part.clamp_min(tiny)).mul_(part).sub_(part).sum()
        elif beta == 0:
            total -= part.log().sum() + part.numel()
        else:
            total += part.pow(beta).sum() / (beta * (beta - 1))
    return total
