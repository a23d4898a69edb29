r"""Dense matrix targets: closed-form statistics from Gram products and row blocks.

For a matrix, ``V`` is ``(N, C)``, ``H`` is ``(N, R)``, ``W`` is ``(C, R)`` and
:math:`\hat V = H W^\top`.  Also the divergence helpers the other matrix kinds
share: the part of the divergence that depends on ``V`` alone, and the beta=2
divergence from one side's terms.
"""
import torch

from .. import metrics

__all__ = [
    "DenseMatrixStats",
    "divergence_constant",
    "gram_divergence",
    "BLOCK_ELEMENTS",
]

# Elements of V handled per block by the element-wise passes (4 MiB of float32):
# large enough for efficient matrix products, small enough that the work buffers
# stay far below one copy of V.
BLOCK_ELEMENTS = 1 << 20


def _row_blocks(n_rows, rows_per_block):
    for start in range(0, n_rows, rows_per_block):
        yield start, min(start + rows_per_block, n_rows)


class DenseMatrixStats:
    """Closed-form statistics for a dense ``(N, C)`` matrix.

    beta=2 uses Gram products only (no reconstruction is ever formed); beta=1
    needs the ratio ``V / WH`` and column sums; other betas need two powers of
    the reconstruction.  For beta != 2 the reconstruction is formed one row
    block at a time in work buffers allocated once.
    """

    def __init__(self, V, beta, block_elements=None, constant=None):
        self.V = V.contiguous()
        self.beta = float(beta)
        self.eps = torch.finfo(V.dtype).eps
        N, C = self.V.shape
        block_elements = block_elements or BLOCK_ELEMENTS
        self.rows = max(1, min(N, block_elements // max(C, 1)))
        self._work = None
        # a wrapping kind (streamed rows) sums the constant once and passes 0 per block
        self.constant = self._divergence_constant() if constant is None else constant

    def rebind(self, V):
        """Point these statistics at another matrix of ``V``'s shape and dtype, keeping
        the work buffers (a wrapping kind reuses one object for its row blocks)."""
        self.V = V.contiguous()
        return self

    # -- set-up ---------------------------------------------------------------
    def _buffers(self, R):
        """Work buffers, allocated on first use and reused for the whole fit."""
        if self._work is None or self._work[2].shape[1] != R:
            N, C = self.V.shape
            new = self.V.new_empty
            self._work = (
                new(self.rows, C),
                new(2, self.rows, C),
                new(N, R),
                new(N, R),
                new(C, R),
                new(C, R),
            )
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
        _, _, negative, positive, _, _ = self._buffers(H.shape[1])
        torch.matmul(self.V, W, out=negative)
        gram_W = W.T @ W
        torch.matmul(H, gram_W, out=positive)
        value = gram_divergence(self.constant, H, negative, positive) if divergence else None
        return negative, positive, value

    def _gram_w(self, H, W, divergence=False):
        _, _, _, _, negative, positive = self._buffers(H.shape[1])
        torch.matmul(self.V.T, H, out=negative)
        torch.matmul(W, H.T @ H, out=positive)
        if not divergence:
            return negative, positive
        return negative, positive, gram_divergence(self.constant, W, negative, positive)

    # -- other beta: blockwise powers of the reconstruction -------------------------
    def _block_powers(self, V_block, H_block, W, work, pair, divergence=True):
        """Fill ``pair`` with (V * WH^(beta-2), WH^(beta-1)) for one row block.

        Returns the block's contribution to the divergence (minus the constant),
        or 0 with ``divergence=False`` (the W pass), which skips its passes.
        """
        beta = self.beta
        b = V_block.shape[0]
        WH = work[:b]
        torch.matmul(H_block, W.T, out=WH)
        WH.clamp_min_(self.eps)
        numer, denom = pair[0, :b], pair[1, :b]
        part = 0
        if beta == 1:
            if divergence:
                torch.log(WH, out=denom)
                part = -torch.dot(V_block.reshape(-1), denom.reshape(-1))
            torch.div(V_block, WH, out=numer)
            return part
        if beta == 0 and divergence:
            torch.log(WH, out=denom)
            part = denom.sum(dtype=torch.float64)
        torch.pow(WH, beta - 1, out=denom)
        torch.div(denom, WH, out=numer)
        numer.mul_(V_block)
        if not divergence:
            return part
        cross = torch.dot(denom.reshape(-1), V_block.reshape(-1))
        if beta == 0:
            return part + cross
        # the sum of WH^beta is added by the caller from the positive term
        return -cross / (beta - 1)

    def _power_sum_divergence(self, total, positive, factor, H, W):
        """The divergence: ``total`` (the blocks' parts), the constant, and the sum of
        WH^beta taken from ``positive``, the positive term of ``factor`` (H or W)."""
        if self.beta == 1:
            total += H.sum(0, dtype=torch.float64) @ W.sum(0, dtype=torch.float64)
        elif self.beta != 0:
            # sum(WH^beta) = sum(WH^(beta-1) * (H W^T)) = sum((WH^(beta-1) W) * H):
            # an (N, R) or (C, R) pass over the positive term instead of an (N, C) one
            total += (positive * factor).sum(dtype=torch.float64) / self.beta
        return self.constant + total

    def _blocked_h(self, H, W, divergence=True):
        work, pair, negative, positive, _, _ = self._buffers(H.shape[1])
        total = 0  # the blocks' parts are float64 tensors, and 0 without divergence
        for start, stop in _row_blocks(H.shape[0], self.rows):
            b = stop - start
            total += self._block_powers(
                self.V[start:stop], H[start:stop], W, work, pair, divergence
            )
            torch.matmul(pair[0, :b], W, out=negative[start:stop])
            if self.beta != 1:
                torch.matmul(pair[1, :b], W, out=positive[start:stop])
        if self.beta == 1:
            positive = W.sum(0, keepdim=True)
        if not divergence:
            return negative, positive, None
        return negative, positive, self._power_sum_divergence(total, positive, H, H, W)

    def _blocked_w(self, H, W, divergence=False):
        work, pair, _, _, negative, positive = self._buffers(H.shape[1])
        negative.zero_()
        positive.zero_()
        total = 0  # as in _blocked_h: no tensor work in the W pass of a fit
        for start, stop in _row_blocks(H.shape[0], self.rows):
            b = stop - start
            H_block = H[start:stop]
            total += self._block_powers(self.V[start:stop], H_block, W, work, pair, divergence)
            negative.addmm_(pair[0, :b].T, H_block)
            if self.beta != 1:
                positive.addmm_(pair[1, :b].T, H_block)
        if self.beta == 1:
            positive = H.sum(0, keepdim=True)
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
    inner = torch.sub(negative, positive, alpha=0.5).mul_(factor)
    return constant - inner.sum(0).double().sum()


def divergence_constant(V, beta):
    """The part of :math:`D_\\beta(V | \\hat V)` that depends on ``V`` alone (float64)."""
    if beta == 2:
        return V.pow(2).sum(dtype=torch.float64) / 2
    if beta == 1:
        return (torch.xlogy(V, V) - V).sum(dtype=torch.float64)
    if beta == 0:
        return -(V.log().sum(dtype=torch.float64) + V.numel())
    return V.pow(beta).sum(dtype=torch.float64) / (beta * (beta - 1))
