r"""Statistics for a sparse matrix target, without ever forming a dense ``(N, C)`` tensor.

:class:`SparseMatrixStats` answers the same three questions as
:class:`~torchnmf.targets.dense.DenseMatrixStats` (``h_terms``, ``w_terms``,
``divergence``) and gives the same numbers, to float rounding, as the dense
statistics of ``V.to_dense()``:

- ``beta = 2``: sparse-dense products (:math:`V W`, :math:`V^\top H`) and Gram
  matrices; the divergence is
  :math:`\tfrac12\|V\|^2 - \langle V, H W^\top\rangle + \tfrac12\langle H^\top H, W^\top W\rangle`.
- ``beta = 1``: the reconstruction only where ``V`` is stored (a sampled
  dense-dense product) and column sums of the factors.
- other ``beta > 0``: the negative part of the gradient lives on the stored
  entries; the positive part, :math:`\hat V^{\beta-1} W`, needs the whole
  reconstruction, which is formed a row block of bounded size at a time in work
  buffers allocated once per fit.

The ``W`` terms are the ``H`` terms of the transposed problem
:math:`V^\top \approx W H^\top`, so both are computed by the same kernels on
two compressed-row copies of ``V`` (``V`` and ``V^\top``), the second built on
the first use of the ``W`` terms and kept for the fit.  A statistics object
used once (an online fit's batch) may instead read ``V^\top`` through ``V``'s
own rows, its products scattering each stored entry into its column
(:func:`transposed_product`): no copy, at a higher cost per product.
The kernels are plain functions so that other statistics (masked targets)
can reuse them.
"""
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .dense import (accurate_cross, batch_shape, float64_runs, gram_divergence, matmul_into,
                    power_sum)
from .residual import amplification, pointwise_divergence


__all__ = [
    "SparseMatrixStats",
    "SPARSE_LAYOUTS",
    "to_csr",
    "transpose_csr",
    "sampled_product_",
    "sparse_dense_product",
    "transposed_product",
    "is_column_major",
    "entry_rows",
    "blocked_power_product_",
    "SPARSE_BLOCK_ELEMENTS",
]

SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc)

# Elements of the reconstruction formed per row block by the positive term (beta not
# in {1, 2}): 16 MiB of float32, in one buffer that the power overwrites in place.
# Larger than the dense statistics' blocks because the sparse path has no V-sized
# array to stay below; measured on 20000 x 5000 rank 32, beta=1.5 (h_terms + w_terms,
# 2 threads): 2^20 1.18-1.46 s, 2^21 0.91-1.24 s, 2^22 1.04-1.17 s, 2^23 0.76-1.15 s,
# 2^24 0.93-1.08 s per iteration over five noisy rounds.
SPARSE_BLOCK_ELEMENTS = 1 << 22


def is_column_major(matrix):
    """True for a matrix stored column by column (the transpose of a contiguous
    one) and not also row by row; False for anything else, ``None`` included."""
    return (matrix is not None and matrix.dim() == 2 and not matrix.is_contiguous()
            and matrix.mT.is_contiguous())


# -- kernels -------------------------------------------------------------------------
def entry_rows(crow_indices, nnz):
    """The row of each of the ``nnz`` stored entries of a compressed-row matrix (in its
    index dtype).  The repeat counts alone give these indices directly; repeating
    ``arange(N)`` gathers them from it afterwards (2M entries: 17 against 23 ms)."""
    return torch.repeat_interleave(crow_indices.diff(), output_size=nnz)


def to_csr(V):
    """A compressed-row copy (or view) of a 2-D sparse ``V`` with sorted, unique indices."""
    if V.layout == torch.sparse_csr:
        return V
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        if V.layout == torch.sparse_coo:
            return V.coalesce().to_sparse_csr()
        return V.to_sparse_csr()


def _stable_column_order(col, n_columns):
    """The permutation that sorts ``col`` stably (rows stay ascending in a column).

    On CPU with at most 2^16 columns, NumPy's stable sort of 16-bit keys (a radix
    sort): 10,240 entries 0.19 ms against 1.3 ms for ``torch.sort`` (one thread,
    measured), which an online fit pays once per batch.  Elsewhere 32-bit keys,
    about twice as fast as 64-bit ones (2M entries: 0.13 s against 0.24 s).
    """
    if col.device.type == "cpu" and n_columns <= 2**16:
        keys = col.numpy().astype(np.uint16)
        return torch.from_numpy(np.argsort(keys, kind="stable"))
    keys = col.to(torch.int32) if n_columns < 2**31 else col
    return torch.sort(keys, stable=True).indices


def transpose_csr(V_csr):
    r"""The compressed-row form of :math:`V^\top` (once per fit, or per batch online).

    A stable sort of the column indices puts the entries in column order with
    their rows ascending; counts of the columns give the new row pointers.
    Measured against ``to_sparse_csc`` (one thread): 50000 x 20000 with 500,000
    non-zeros 0.12 s against 0.17 s; a batch of 1024 rows with 10,240, 2.9 ms
    against 3.6 ms.
    """
    N, C = V_csr.shape
    crow, col = V_csr.crow_indices(), V_csr.col_indices()
    order = _stable_column_order(col, C)
    rows = entry_rows(crow, col.shape[0])
    ccol = crow.new_zeros(C + 1)
    ccol[1:] = torch.bincount(col, minlength=C).cumsum(0)
    # index_select: a third of the time of indexing with a tensor (2M entries, one thread)
    values = V_csr.values().index_select(0, order)
    return torch.sparse_csr_tensor(ccol, rows.index_select(0, order), values, (C, N),
                                   check_invariants=False)


def sampled_product_(out, pattern, A, B):
    r"""Fill ``out``'s stored values with :math:`(A B^\top)_{ij}` at ``pattern``'s non-zeros.

    ``out`` is a CSR tensor with ``pattern``'s structure (a clone, reused every
    iteration); no ``(n, m)`` or ``(nnz, R)`` temporary is formed.  Returns the
    values (1-D, one per stored entry).
    """
    if A.dtype in _SAMPLED_KERNEL_DTYPES:
        torch.sparse.sampled_addmm(pattern, A, B.T, beta=0.0, alpha=1.0, out=out)
        return out.values()
    # torch's kernel takes float32 and float64 only (bfloat16 and float16 raised inside
    # it): the rows of A and B met at each entry, in chunks, summed in float32
    values = out.values()
    rows = entry_rows(pattern.crow_indices(), values.shape[0])
    columns = pattern.col_indices()
    step = max(1, _SAMPLED_CHUNK // max(A.shape[-1], 1))
    for start in range(0, values.shape[0], step):
        part = slice(start, start + step)
        products = A.index_select(0, rows[part]).float().mul_(B.index_select(0, columns[part]))
        values[part] = products.sum(-1)
    return values


_SAMPLED_KERNEL_DTYPES = (torch.float32, torch.float64)
_SAMPLED_CHUNK = 1 << 20  # entries times R of one chunk of sampled_product_'s own loop


def sparse_dense_product(crow_indices, col_indices, values, dense):
    """``sparse @ dense`` for the CSR matrix given by its three arrays.

    Each output row is a weighted sum of rows of ``dense``, which is exactly an
    embedding bag; on CPU that kernel is about twice as fast as the CSR
    product (see ``benchmarks/bench_sparse.py``).  A column-major ``dense`` (an
    online fit's ``W`` at beta 2) is gathered through its strides when the
    product is small, else copied to rows first: on CPU a strided gather costs
    about 0.015 us more per stored entry at ``R = 10``, the copy about 0.0013 us
    per element of ``dense`` (one thread, 20000 x 10: 10,217 entries 0.19 ms
    strided against 0.28 ms with the copy; 2M entries 53 ms against 5.6 ms).
    Other devices, where this was not measured, always copy.
    """
    if is_column_major(dense) and (dense.device.type != "cpu"  # measured on CPU only
                                   or values.shape[0] * 8 > dense.numel()):
        dense = dense.contiguous()
    return F.embedding_bag(
        col_indices, dense, crow_indices, mode="sum", per_sample_weights=values,
        include_last_offset=True,
    )


_TRANSPOSED_CHUNK = 1 << 20  # entries times R of one chunk of transposed_product


def transposed_product(col_indices, rows, values, dense, n_columns, column_major=False):
    r""":math:`V^\top` ``@ dense`` for the sparse ``V`` whose stored entries lie at
    ``(rows, col_indices)`` and hold ``values``, without a transposed copy of ``V``.

    Each entry adds its weighted row of ``dense`` (``(n, R)``) to row
    ``col_indices[k]`` of the ``(n_columns, R)`` result, in one scatter over the
    flattened result (the one-dimensional ``scatter_add_`` is a single loop; a
    matrix ``index_add_`` runs one tensor operation per entry, measured 4x
    slower, and the one-dimensional ``index_add_`` 0.33 ms against 0.13 to 0.19
    for 102,400 additions into 200,000 entries).  For a 1024-row batch of
    10,240 entries and ``R = 10`` (one thread): 0.7 ms against 1.1 to 2.2 ms
    for a transposed copy and an embedding bag over it.

    With ``column_major``, the result is column-major (the transpose of a
    contiguous ``(R, n_columns)`` tensor): each component's column is one
    scatter along the rows of that tensor, whose index is the entries' columns
    for every component alike (a broadcast view, no ``(nnz, R)`` index array).
    Measured for the batch above: 0.19 ms against 0.36 ms for the row-major
    result (whose flat index alone takes 0.09 ms).
    """
    R = dense.shape[1]
    # in chunks of entries, whose temporaries (R values and indices per entry) stay
    # in cache: 2,000,000 entries at R = 10 in one piece took 0.34 s, in chunks 0.13
    chunk = max(1, _TRANSPOSED_CHUNK // R)
    if column_major:
        out = dense.new_zeros(R, n_columns)
        components = dense.mT.contiguous()  # (R, n): a gather per component reads one row
        for start in range(0, col_indices.shape[0], chunk):
            stop = start + chunk
            contributions = components.index_select(1, rows[start:stop]).mul_(values[start:stop])
            targets = col_indices[start:stop].long().unsqueeze(0).expand(R, -1)
            out.scatter_add_(1, targets, contributions)
        return out.mT
    out = dense.new_zeros(n_columns * R)
    offsets = torch.arange(R, device=dense.device)
    for start in range(0, col_indices.shape[0], chunk):
        stop = start + chunk
        contributions = F.embedding(rows[start:stop], dense).mul_(values[start:stop].unsqueeze(1))
        targets = (col_indices[start:stop] * R).unsqueeze(1) + offsets
        out.scatter_add_(0, targets.view(-1), contributions.view(-1))
    return out.view(n_columns, R)


def blocked_power_product_(out, A, B, exponent, eps, rows, work, want_power_sum=True):
    r"""``out = (A B^\top)^{exponent} B`` in row blocks, the reconstruction floored at ``eps``.

    ``work`` is a flat buffer of at least ``max(rows, K) * B.shape[-2]`` elements
    (``K`` members of a stack, 1 otherwise): the power overwrites the
    reconstruction in place, so the largest temporary is ``rows`` rows of the
    reconstruction (one row of each member where ``rows < K``).  ``A`` and ``B`` may be stacks
    ``(K, n, R)`` and ``(K, m, R)`` (then a block holds ``rows / K`` rows of
    each).  Returns :math:`\sum (A B^\top)^{exponent + 1}` over every entry
    (float64, one per member of a stack), or ``None`` when ``want_power_sum``
    is false.
    """
    n, m = A.shape[-2], B.shape[-2]
    batch = batch_shape(A)
    rows = max(1, rows // math.prod(batch))
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        shape = (*batch, stop - start, m)
        recon = work[:math.prod(shape)].view(shape)
        torch.matmul(A[..., start:stop, :], B.mT, out=recon)
        recon.clamp_min_(eps)
        torch.pow(recon, exponent, out=recon)
        matmul_into(out[..., start:stop, :], recon, B)
    if not want_power_sum:
        return None
    # sum(P * (A B^T)) = sum((P B) * A): an (n, R) pass instead of an (n, m) one
    # (it differs from flooring inside the sum only where A B^T < eps)
    return (out * A).sum((-2, -1), dtype=torch.float64)


# -- one orientation of V -----------------------------------------------------------------
class _Orientation:
    """``V`` (or ``V.T``) in compressed rows, with the buffers its terms need.

    The other factor may be a stack ``(K, m, R)`` of ``K`` members'
    factors: a product with values shared by all members is then one product
    with ``K R`` columns, and one with values of each member's own (a sampled
    reconstruction) is one embedding bag over ``K n`` bags.
    """

    def __init__(self, csr, block_elements):
        self.csr = csr
        self.crow_indices = csr.crow_indices()
        self.col_indices = csr.col_indices()
        self.values = csr.values()
        n, m = csr.shape
        self.shape = (n, m)  # of the matrix this orientation reads
        self.rows = max(1, min(n, block_elements // max(m, 1)))
        self._key = None
        self._stacked = None
        self.positive = None

    def product(self, values, dense, layout_of=None):
        """The product with ``dense`` of the matrix of this pattern holding ``values``
        (``(nnz,)``, or ``(K, nnz)`` with a stack ``dense`` of ``K`` members).
        ``layout_of``: the factor the result goes with, whose layout a kind may
        give the result (these rows: row-major always)."""
        if dense.dim() == 2:
            return sparse_dense_product(self.crow_indices, self.col_indices, values, dense)
        members, m, R = dense.shape
        n = self.csr.shape[0]
        if values.dim() == 1:
            table = dense.transpose(0, 1).reshape(m, members * R)
            product = sparse_dense_product(self.crow_indices, self.col_indices, values, table)
            return product.view(n, members, R).transpose(0, 1)
        indices, offsets = self._stacked_pattern(members)
        product = F.embedding_bag(
            indices, dense.reshape(members * m, R), offsets, mode="sum",
            per_sample_weights=values.reshape(-1), include_last_offset=True,
        )
        return product.view(members, n, R)

    def gram_product(self, A, gram):
        """``A @ gram`` (the beta=2 positive term), into the kept output buffer."""
        return torch.matmul(A, gram, out=self.positive_buffer(A))

    def positive_buffer(self, like):
        """The ``(n, R)`` (or ``(K, n, R)``) output of the positive term for factors
        like ``like``, kept for the fit."""
        shape = (*batch_shape(like), self.shape[0], like.shape[-1])
        if self.positive is None or tuple(self.positive.shape) != shape:
            self.positive = like.new_empty(shape)
        return self.positive

    def _stacked_pattern(self, members):
        """Indices and offsets of ``members`` copies of the pattern, copy ``k``
        reading rows ``k m`` to ``(k + 1) m - 1`` of a stacked table."""
        if self._stacked is None or self._stacked[0] != members:
            n, m = self.csr.shape
            nnz = self.values.shape[0]
            shift = torch.arange(members, device=self.values.device).unsqueeze(1)
            indices = (self.col_indices.unsqueeze(0) + shift * m).reshape(-1)
            offsets = torch.cat([
                (self.crow_indices[:-1].unsqueeze(0) + shift * nnz).reshape(-1),
                self.crow_indices.new_full((1,), members * nnz),
            ])
            self._stacked = (members, indices, offsets)
        return self._stacked[1], self._stacked[2]

    def buffers(self, like):
        """Per-fit buffers for factors like ``like``: the sampled reconstruction's
        values (``(nnz,)`` or ``(K, nnz)``), a spare of the same shape and the
        ``(n, R)`` (or ``(K, n, R)``) output of the positive term."""
        key = (batch_shape(like), like.shape[-1])
        if self._key != key:
            batch, R = key
            members = math.prod(batch)
            nnz = self.values.shape[0]
            values = self.values.new_empty(members, nnz)
            # one CSR per member, sharing the indices, each writing its own row of values
            self.sampled = [
                torch.sparse_csr_tensor(
                    self.crow_indices, self.col_indices, values[k], self.csr.shape,
                    check_invariants=False,
                )
                for k in range(members)
            ]
            self.sampled_values = values.view(*batch, nnz)
            self.spare = torch.empty_like(self.sampled_values)
            self._key = key
        return self.sampled_values, self.spare, self.positive_buffer(like)

    def sample(self, A, B):
        r""":math:`(A B^\top)` at the stored entries, into the sampled values buffer
        (each member of a stack with its own factors)."""
        if A.dim() == 2:
            values = sampled_product_(self.sampled[0], self.csr, A, B)
            if values.data_ptr() != self.sampled_values.data_ptr():
                self.sampled_values.copy_(values)
            return self.sampled_values
        for k, out in enumerate(self.sampled):
            values = sampled_product_(out, self.csr, A[k], B[k])
            if values.data_ptr() != self.sampled_values[k].data_ptr():
                self.sampled_values[k].copy_(values)
        return self.sampled_values


class _ScatteredColumns(_Orientation):
    """``V^\top`` read through ``V``'s compressed rows (no transposed copy).

    Its stored entries are ``V``'s, in ``V``'s order: the values, the sampled
    reconstruction and every vector of length nnz are shared with the row
    orientation's order; a product scatters into the columns
    (:func:`transposed_product`).
    """

    def __init__(self, csr, block_elements):
        super().__init__(csr, block_elements)
        N, C = csr.shape
        self.shape = (C, N)
        self.rows = max(1, min(C, block_elements // max(N, 1)))
        self.entry_rows = entry_rows(self.crow_indices, self.col_indices.shape[0])

    def product(self, values, dense, layout_of=None):
        """As :meth:`_Orientation.product`; column-major when ``layout_of`` is (a
        column-major ``W``, whose step then reads both in one layout)."""
        C = self.shape[0]
        if dense.dim() == 2:
            return transposed_product(self.col_indices, self.entry_rows, values, dense, C,
                                      column_major=is_column_major(layout_of))
        members, m, R = dense.shape
        if values.dim() == 1:  # one product with K R columns
            table = dense.transpose(0, 1).reshape(m, members * R)
            product = transposed_product(self.col_indices, self.entry_rows, values, table, C)
            return product.view(C, members, R).transpose(0, 1)
        return torch.stack([
            transposed_product(self.col_indices, self.entry_rows, values[k], dense[k], C)
            for k in range(members)
        ])

    def sample(self, A, B):
        r""":math:`(A B^\top)` at the entries of ``V^\top``: :math:`B A^\top` at ``V``'s."""
        return super().sample(B, A)

    def gram_product(self, A, gram):
        """``A @ gram`` for ``A`` with ``V``'s columns as rows, column-major: as
        ``(gram^T A^T)^T``, several times faster for such a tall ``A`` (20000 x 10
        times 10 x 10, one thread: 0.13 ms against 0.6 to 1.0 ms, measured; the
        row-major result costs a transposed copy as long).  Its one reader per
        batch, the online step's accumulation, reads it through strides."""
        if A.dim() != 2:
            return super().gram_product(A, gram)
        return torch.mm(gram.mT, A.mT).mT


def _divergence_constant(values, beta):
    """The part of the divergence that depends on V alone (implicit zeros add nothing)."""
    if beta == 2:
        return values.pow(2).sum(dtype=torch.float64) / 2
    if beta == 1:
        return (torch.xlogy(values, values) - values).sum(dtype=torch.float64)
    return values.pow(beta).sum(dtype=torch.float64) / (beta * (beta - 1))


class SparseMatrixStats:
    """Closed-form statistics for a sparse ``(N, C)`` matrix (COO, CSR or CSC).

    Gives the same numbers as :class:`~torchnmf.targets.dense.DenseMatrixStats` on
    the dense equivalent.  The memory used beyond ``V``, its transposed copy and
    the factors is a few vectors of length nnz, ``(N, R)`` and ``(C, R)``
    buffers and, for ``beta`` not in {1, 2}, one work buffer of
    ``block_elements`` elements (at least one row of the reconstruction).
    ``beta`` must be positive (the implicit zeros make ``beta <= 0`` infinite);
    the entry point checks it.  Stacked factors (``H`` of shape ``(K, N, R)``,
    ``W`` of shape ``(K, C, R)``) give every term a leading ``K`` and one
    divergence per member.

    ``transposed_copy`` (default) keeps a compressed-row copy of ``V^\top`` for the
    ``W`` terms, made on their first use; without it they scatter from ``V``'s
    rows (:func:`transposed_product`), which suits statistics used once, such as
    an online fit's batch: 1,000,000 x 20,000 with 10M entries in batches of
    1024 rows, the copies took 4.6 s of an 11.4 s pass.
    """

    def __init__(self, V, beta, block_elements=None, constant=None, transposed_copy=True):
        self.V = V
        self.block_elements = block_elements
        self.transposed_copy = transposed_copy
        self.beta = float(beta)
        self._accurate_cross = accurate_cross(self.beta, V.dtype)
        self._amplified = amplification(self.beta) > 1
        self.eps = torch.finfo(V.dtype).eps
        csr = to_csr(V)
        self.shape = tuple(csr.shape)
        self.by_rows = _Orientation(csr, block_elements or SPARSE_BLOCK_ELEMENTS)
        self._by_columns = None
        self.constant = (
            _divergence_constant(self.by_rows.values, self.beta) if constant is None else constant
        )
        self._work = None

    def _cross_sum(self, sampled, values, out=None):
        """:math:`\\sum` ``sampled * values`` over the stored entries, in float64 (per
        member of a stack): elementwise where :func:`~.dense.accurate_cross` asks for it
        (a float32 KL fit's objective was 0.35% off by the dot product's rounding), the
        products into ``out`` when it is given (a spare buffer)."""
        if not self._accurate_cross:
            return torch.matmul(sampled, values).to(torch.float64)
        products = torch.mul(sampled, values, **({} if out is None else {"out": out}))
        # near beta 0 and 1 the division amplifies even runs' rounding: every entry in
        # float64 there (a KL-like fit at 0.99 was 1e-5 off with runs of float32 sums)
        return products.sum(-1, dtype=torch.float64) if self._amplified else float64_runs(products)

    @property
    def by_columns(self):
        """The orientation of ``V^\top``, made on first use: a compressed-row copy, or
        without ``transposed_copy`` a view through ``V``'s rows."""
        if self._by_columns is None:
            csr, block_elements = self.by_rows.csr, self.block_elements or SPARSE_BLOCK_ELEMENTS
            self._by_columns = (
                _Orientation(transpose_csr(csr), block_elements) if self.transposed_copy
                else _ScatteredColumns(csr, block_elements)
            )
        return self._by_columns

    # -- scale (see torchnmf.solvers.scaling) -------------------------------------------
    def scale_sums(self):
        """``(sum, count)`` of the observed entries of ``V``: the entry point's scale."""
        return float(self.by_rows.values.sum(dtype=torch.float64)), self.shape[0] * self.shape[1]

    def scaled(self, factor):
        """The same statistics for ``factor * V``."""
        return type(self)(self.V * factor, self.beta, self.block_elements,
                          transposed_copy=self.transposed_copy)

    # -- the explicit residual (see torchnmf.targets.residual) -----------------------
    def magnitude(self):
        """The size of the divergence's terms, :math:`\\sum V^\\beta` (float)."""
        return power_sum(self.by_rows.values, self.beta)

    def magnitude_squares(self):
        """:math:`\\sum V^{2\\beta}`, for the closed forms' rounding noise (float)."""
        return power_sum(self.by_rows.values, 2 * self.beta)

    def explicit_divergence(self, H, W):
        """The divergence summed entry by entry in float64 (slow, accurate).

        One block of rows at a time: the reconstruction's block and ``V``'s, made
        dense, so that every entry, stored or zero, adds its own non-negative term
        (the zeros' terms summed over every entry less the stored entries' left
        ``eps * sum R^beta`` of cancellation, far above a nearly exact fit's value).
        """
        beta, side = self.beta, self.by_rows
        W64 = W.double()
        rows = entry_rows(side.crow_indices, side.col_indices.shape[0])
        values = side.values.double()
        total = torch.zeros((), dtype=torch.float64, device=H.device)
        for start in range(0, self.shape[0], side.rows):
            stop = min(start + side.rows, self.shape[0])
            R = H[start:stop].double() @ W64.T
            first, last = int(side.crow_indices[start]), int(side.crow_indices[stop])
            block = torch.zeros_like(R).index_put_(
                (rows[first:last] - start, side.col_indices[first:last]), values[first:last],
                accumulate=True,
            )
            total += pointwise_divergence(block, R, beta, self.eps).sum()
        return total

    def _work_buffer(self, least=0):
        """The flat work buffer of the power products, of at least ``least`` elements
        (a stack of members takes a row of each at the least)."""
        if self._work is None or self._work.numel() < least:
            N, C = self.shape
            block = self.block_elements or SPARSE_BLOCK_ELEMENTS
            columns_rows = max(1, min(C, block // max(N, 1)))
            size = max(self.by_rows.rows * C, columns_rows * N, least)
            self._work = self.by_rows.values.new_empty(size)
        return self._work

    # -- the terms for the rows factor A of one orientation, other factor B ------------
    def _row_terms(self, side, A, B, want_divergence):
        r"""Negative and positive gradient parts w.r.t. ``A`` of :math:`D(V_{side} | A B^\top)`.

        Returns ``(negative, positive, divergence)``; ``divergence`` is ``None``
        unless asked for.
        """
        beta, values = self.beta, side.values
        divergence = None
        if beta == 2:  # no sampled reconstruction: of the buffers, the positive term's at most
            negative = side.product(values, B, layout_of=A)
            positive = side.gram_product(A, B.mT @ B)
            if want_divergence:
                divergence = gram_divergence(self.constant, A, negative, positive)
            return negative, positive, divergence

        _, spare, positive = side.buffers(A)
        recon = side.sample(A, B)
        recon.clamp_min_(self.eps)
        if beta == 1:
            if want_divergence:
                torch.log(recon, out=spare)
                total = torch.linalg.vecdot(
                    A.sum(-2, dtype=torch.float64), B.sum(-2, dtype=torch.float64)
                )
                # (the log's buffer is spare once summed: the products go into it)
                divergence = self.constant + total - self._cross_sum(spare, values, out=spare)
            torch.div(values, recon, out=recon)
            return side.product(recon, B, layout_of=A), B.sum(-2, keepdim=True), divergence

        torch.pow(recon, beta - 1, out=spare)
        cross = None
        if want_divergence:  # divided by beta - 1 below: see dense.accurate_cross
            cross = self._cross_sum(spare, values)
        torch.div(spare, recon, out=recon)
        recon.mul_(values)
        negative = side.product(recon, B, layout_of=A)
        power = blocked_power_product_(
            positive, A, B, beta - 1, self.eps, side.rows,
            self._work_buffer(math.prod(batch_shape(A)) * B.shape[-2]), want_divergence
        )
        if want_divergence:
            divergence = self.constant + power / beta - cross / (beta - 1)
        return negative, positive, divergence

    # -- interface ----------------------------------------------------------------------
    @property
    def gram_form(self):
        """True when the positive ``W`` term is ``W @ (H.T @ H)`` (beta=2), so that a
        kind summing over row blocks may sum the ``(R, R)`` Gram matrix instead."""
        return self.beta == 2

    def h_terms(self, H, W, divergence=True):
        """The ``H`` terms and the divergence at (H, W) (``None`` with ``divergence=False``)."""
        return self._row_terms(self.by_rows, H, W, want_divergence=divergence)

    def w_terms(self, H, W, divergence=False):
        """The ``W`` terms; with ``divergence=True`` also the divergence at (H, W)."""
        terms = self._row_terms(self.by_columns, W, H, want_divergence=divergence)
        return terms if divergence else terms[:2]

    def divergence(self, H, W):
        return self.h_terms(H, W)[2]
