r"""Targets with missing entries: their statistics (preparation is in :mod:`.prepare`).

A boolean mask :math:`M` (True = observed) restricts the objective to the
observed entries,

.. math::

    D_\beta^M(V \,|\, \hat V) = \sum_{(i, j):\, M_{ij}} d_\beta(V_{ij} \,|\, \hat V_{ij}),

so the parts of the gradient become
:math:`\nabla^+_H = (M \odot \hat V^{\beta-1}) W` and
:math:`\nabla^-_H = (M \odot V \odot \hat V^{\beta-2}) W` (likewise for ``W``),
and the multiplicative updates keep their monotonicity (the masked objective is
a weighted beta-divergence with weights 0 and 1).  The statistics objects here
have the interface of :mod:`torchnmf.targets`, so every solver that works
through that interface fits masked targets unchanged.

Values of ``V`` at unobserved entries are never read: they are replaced by
zeros once, when the target is prepared, and may hold anything (NaN included).
"""
import functools

import torch

from .. import metrics
from .autograd import AutogradStats
from .dense import BLOCK_ELEMENTS, add_product_, cross_inner, matmul_into, power_sum
from .residual import pointwise_divergence
from .sparse import to_csr

__all__ = ["MaskedMatrixStats", "MaskedAutogradStats"]


def _observed_constant(V_observed, beta):
    """The part of the masked divergence that depends on the observed data alone."""
    V = V_observed.to(torch.float64)
    if beta == 2:
        return V.pow(2).sum() / 2
    if beta == 1:
        return (torch.xlogy(V, V) - V).sum()
    if beta == 0:
        return -(V.log().sum() + V.numel())
    return V.pow(beta).sum() / (beta * (beta - 1))


class _DenseRows:
    """Row blocks of a dense ``V``: slices, no copy."""

    def __init__(self, V, rows):
        self.V = V.contiguous()

    def __call__(self, start, stop):
        return self.V[start:stop]

    def observed_values(self, mask):
        return self.V[mask]

    def dense(self):
        return self.V


class _SparseRows:
    """Row blocks of a sparse ``V``, densified one block at a time into a buffer
    of ``rows`` rows allocated once (the whole ``(N, C)`` is never formed)."""

    def __init__(self, V, rows):
        csr = to_csr(V)
        self.crow_indices = csr.crow_indices().tolist()
        self.col_indices = csr.col_indices()
        self.values = csr.values()
        counts = csr.crow_indices().diff()
        self.row_indices = torch.repeat_interleave(
            torch.arange(csr.shape[0], device=V.device), counts
        )
        self.buffer = self.values.new_zeros(rows, csr.shape[1])
        self.coo = V if V.layout == torch.sparse_coo else V.to_sparse_coo()

    def __call__(self, start, stop):
        low, high = self.crow_indices[start], self.crow_indices[stop]
        block = self.buffer[:stop - start]
        block.zero_()
        block[self.row_indices[low:high] - start, self.col_indices[low:high]] = self.values[low:high]
        return block

    def observed_values(self, mask):
        return self.values  # zeros at the unobserved stored entries add nothing

    def dense(self):
        """``V`` itself as a sparse COO tensor: its consumer (masked HALS) adds the
        stored entries into a residual it forms anyway, never a dense copy of V."""
        return self.coo


class MaskedMatrixStats:
    """Closed-form statistics for a dense or sparse ``(N, C)`` matrix with a mask.

    No Gram shortcut exists once entries are missing (every row sees a
    different subset of ``W``), so for every beta the reconstruction is formed
    one row block at a time and only observed entries contribute.  A sparse
    ``V`` is densified one row block at a time (see :class:`_SparseRows`);
    the rest of the arithmetic is shared.  Stacked factors (``H`` of shape
    ``(B, N, R)``, ``W`` of shape ``(B, C, R)``) give every term a leading
    ``B`` and one divergence per member, as for
    :class:`~torchnmf.targets.dense.DenseMatrixStats`.

    Args:
        V (Tensor): ``(N, C)``, dense or sparse (COO, CSR, CSC), zeros at the
            unobserved entries (see :func:`prepare_target`).  A sparse ``V``
            needs ``beta > 0`` (its implicit observed zeros).
        mask (Tensor): ``(N, C)`` dense boolean, True = observed.
        beta (float): the divergence.
        block_elements (int, optional): elements of ``V`` per row block.
        constant (Tensor, optional): the part of the divergence that depends on
            ``V`` alone, when the caller has it (a wrapping kind passes 0).
    """

    def __init__(self, V, mask, beta, block_elements=None, constant=None):
        self.mask = mask.contiguous()
        self.V = V
        self.block_elements = block_elements
        self.beta = float(beta)
        # every sum of a block's closed form cancels against the others: in float32
        # a dot product's rounding put a KL fit's objective 0.7% off (see cross_inner)
        self._inner = cross_inner(self.beta, V.dtype)
        self.eps = torch.finfo(V.dtype).eps
        self.dtype = V.dtype
        N, C = V.shape
        block_elements = block_elements or BLOCK_ELEMENTS
        self.rows = max(1, min(N, block_elements // max(C, 1)))
        source = _DenseRows if V.layout == torch.strided else _SparseRows
        self.source = source(V, self.rows)
        self.constant = _observed_constant(
            self.source.observed_values(self.mask), self.beta
        ) if constant is None else constant

    # -- scale (see torchnmf.solvers.scaling) -------------------------------------------
    def scale_sums(self):
        """``(sum, count)`` of the observed entries of ``V``: the entry point's scale."""
        return float(self.source.observed_values(self.mask).sum(dtype=torch.float64)), int(self.mask.sum())

    def scaled(self, factor):
        """The same statistics for ``factor * V``."""
        return type(self)(self.V * factor, self.mask, self.beta, self.block_elements)

    # -- the explicit residual (see torchnmf.targets.residual) -----------------------
    def magnitude(self):
        """The size of the divergence's terms, :math:`\\sum V^\\beta` (float)."""
        return power_sum(self.source.observed_values(self.mask), self.beta)

    def magnitude_squares(self):
        """:math:`\\sum V^{2\\beta}`, for the closed forms' rounding noise (float)."""
        return power_sum(self.source.observed_values(self.mask), 2 * self.beta)

    def explicit_divergence(self, H, W):
        """The divergence summed entry by entry in float64 (slow, accurate)."""
        total = torch.zeros((), dtype=torch.float64, device=H.device)
        W64 = W.double()
        for start, stop in self._blocks(H.shape[0]):
            R = (H[start:stop].double() @ W64.T)
            V = self.source(start, stop)
            mask = self.mask[start:stop]
            total += pointwise_divergence(V[mask], R[mask], self.beta, self.eps).sum()
        return total

    def observed_target(self):
        """``(V, weight)``: the target (zeros where hidden; dense, or sparse COO for a
        sparse target) and the mask in ``V``'s dtype, for solvers that work on the
        masked residual (masked HALS)."""
        V = self.source.dense()
        return V, self.mask.to(self.dtype)

    def _block(self, start, stop, H, W, with_divergence=True):
        """``(M V WH^(beta-2), M WH^(beta-1), divergence minus constant)`` for rows
        start:stop; the last is ``None`` unless ``with_divergence``."""
        beta = self.beta
        V, weight = self.source(start, stop), self.mask[start:stop].to(self.dtype)
        product = H[..., start:stop, :] @ W.mT
        # the power sum below takes the product unfloored: an exact zero of the
        # reconstruction adds exactly zero there, as in the dense closed form
        keeps_product = with_divergence and beta not in (0, 1, 2)
        WH = product.clamp_min(self.eps) if keeps_product else product.clamp_min_(self.eps)
        part = None
        if beta == 2:
            positive_out = WH * weight
            if with_divergence:
                part = self._inner(positive_out, WH) / 2 - self._inner(V, WH)
            return V, positive_out, part
        if beta == 1:
            if with_divergence:
                part = self._inner(weight, WH) - self._inner(V, WH.log())
            return V / WH, weight, part
        if beta == 0:
            positive_out = weight / WH
            negative_out = positive_out / WH
            negative_out.mul_(V)
            if with_divergence:
                part = self._inner(weight, WH.log_()) + self._inner(V, positive_out)
            return negative_out, positive_out, part
        power = WH.pow(beta - 1)
        negative_out = power / WH
        negative_out.mul_(V)
        positive_out = power.mul_(weight)
        if with_divergence:
            part = (self._inner(positive_out, product) / beta
                    - self._inner(negative_out, WH) / (beta - 1))
        return negative_out, positive_out, part

    def _blocks(self, n_rows):
        for start in range(0, n_rows, self.rows):
            yield start, min(start + self.rows, n_rows)

    def h_terms(self, H, W):
        negative = H.new_empty(H.shape)
        positive = H.new_empty(H.shape)
        total = torch.zeros((), dtype=torch.float64, device=H.device)
        for start, stop in self._blocks(H.shape[-2]):
            negative_out, positive_out, part = self._block(start, stop, H, W)
            matmul_into(negative[..., start:stop, :], negative_out, W)
            matmul_into(positive[..., start:stop, :], positive_out, W)
            total = total + part
        return negative, positive, self.constant + total

    def w_terms(self, H, W, divergence=False):
        """The ``W`` terms; with ``divergence=True`` also the divergence at (H, W)."""
        negative = W.new_zeros(W.shape)
        positive = W.new_zeros(W.shape)
        total = torch.zeros((), dtype=torch.float64, device=H.device)
        for start, stop in self._blocks(H.shape[-2]):
            negative_out, positive_out, part = self._block(start, stop, H, W, divergence)
            H_block = H[..., start:stop, :]
            add_product_(negative, negative_out.mT, H_block)
            add_product_(positive, positive_out.mT, H_block)
            if divergence:
                total = total + part
        if not divergence:
            return negative, positive
        return negative, positive, self.constant + total

    def divergence(self, H, W):
        total = torch.zeros((), dtype=torch.float64, device=H.device)
        for start, stop in self._blocks(H.shape[-2]):
            total = total + self._block(start, stop, H, W)[2]
        return self.constant + total


def _masked_reconstruct(reconstruct, weight, H, W):
    return reconstruct(H, W) * weight


class MaskedAutogradStats(AutogradStats):
    """Statistics for any model linear in each factor, with a mask.

    The reconstruction is multiplied by the mask, so the vector-Jacobian
    products of :class:`AutogradStats` only see observed entries; the
    divergence sums over the observed entries alone.

    Args:
        V (Tensor): zeros at the unobserved entries (see :func:`prepare_target`).
        mask (Tensor): boolean, V's shape, True = observed.
        beta (float): the divergence.
        reconstruct (callable): ``reconstruct(H, W)``, the model's forward map.
    """

    def __init__(self, V, mask, beta, reconstruct):
        weight = mask.to(V.dtype)
        super().__init__(V, beta, functools.partial(_masked_reconstruct, reconstruct, weight))
        self.mask = mask
        self.V_observed = V[mask]
        self.unmasked_reconstruct = reconstruct

    def scale_sums(self):
        return float(self.V_observed.sum(dtype=torch.float64)), self.V_observed.numel()

    def scaled(self, factor):
        return type(self)(self.V * factor, self.mask, self.beta, self.unmasked_reconstruct)

    def magnitude(self):
        return power_sum(self.V_observed, self.beta)

    def magnitude_squares(self):
        """:math:`\\sum V^{2\\beta}`, for the closed forms' rounding noise (float)."""
        return power_sum(self.V_observed, 2 * self.beta)

    def explicit_divergence(self, H, W):
        with torch.no_grad():
            prediction = self.unmasked_reconstruct(H.double(), W.double())[self.mask]
        if self.beta != 2:
            prediction = prediction.clamp_min(self.eps)
        return pointwise_divergence(self.V_observed, prediction, self.beta).sum()

    def _prediction_divergence(self, prediction):
        return metrics._beta_div(prediction[self.mask], self.V_observed, self.beta)

    def h_terms(self, H, W):
        negative, positive, prediction = self._parts(H, W, True)
        return negative, positive, self._prediction_divergence(prediction)

    def divergence(self, H, W):
        with torch.no_grad():
            return self._prediction_divergence(self.reconstruct(H, W))
