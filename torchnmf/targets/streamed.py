r"""Streamed targets: statistics summed over row blocks read from a source.

A matrix that does not fit in memory (a ``numpy.memmap``, a row source of
:mod:`~torchnmf.targets.sources`) is fitted exactly as an in-memory one:
every statistic an update needs is a sum over row blocks of ``V`` (the ``W``
terms, the divergence) or a row-wise function of them (the ``H`` terms), so
:class:`StreamedStats` reads the blocks one after the other, hands each to the
statistics object of its kind (dense, sparse CSR, or masked, built on the
block) and sums.  The results equal the in-memory kinds' up to the order of
floating-point additions.

While one block computes, the next is read in a background thread; on CUDA
it is copied into pinned host memory there and moved with a non-blocking copy.
``H`` stays in memory (``N x R`` is small next to ``V``), or in a memory-mapped
file when the model's ``H`` parameter is one (see ``NMF.fit``); multiplicative
updates then allocate no ``(N, R)`` array at all.

Memory: besides ``H`` and ``W``, a pass holds two ``(N, R)`` term buffers
(none for multiplicative updates, which update ``H`` block by block in the
same pass that sums the ``W`` terms), about three blocks of ``block_rows x C``
entries (the one computing, the one being read, and their conversion to the
working dtype) and the per-block work buffers of the block's kind (for
``beta`` not 2, at most 12 MiB of float32 dense work, see
:mod:`~torchnmf.targets.dense`).  Memory-mapped rows are released from the
process's resident set after they are read (``madvise``), so the peak does
not grow with ``N``.
"""
import concurrent.futures
import math

import numpy as np
import torch

from .._validation import check_choice, check_fits_dtype, check_non_negative_tensor
from .dense import DenseMatrixStats, divergence_constant, power_sum
from .masked import MaskedMatrixStats
from .prepare import MISSING, prepare_target
from .sources import ArrayRows, BlockRows, TensorRows, is_row_source, open_rows
from .sparse import SparseMatrixStats

__all__ = [
    "StreamedTarget",
    "StreamedStats",
    "MaskedStreamedStats",
    "as_streamed_source",
    "wants_streaming",
    "DEFAULT_BLOCK_BYTES",
]

# Bytes of V per block when no block_rows is given: large enough that a block's
# matrix products run at full speed, small against any machine's memory.
DEFAULT_BLOCK_BYTES = 64 << 20


def wants_streaming(V, block_rows=None):
    """Whether ``fit`` streams ``V``: a row source, a memmap, a list of blocks, or
    any matrix with ``block_rows`` given."""
    if block_rows is not None or is_row_source(V):
        return True
    return isinstance(V, (list, tuple)) and len(V) > 0 and all(
        isinstance(block, torch.Tensor) or hasattr(block, "shape") for block in V
    )


def as_streamed_source(V):
    """A row source for what ``fit`` received (see :func:`wants_streaming`)."""
    if isinstance(V, (list, tuple)):
        return BlockRows(V)
    if isinstance(V, np.ndarray):  # a memmap, or an array with block_rows
        return ArrayRows(V)
    if is_row_source(V):
        return V if hasattr(V, "blocks") else _Adapted(V)
    if isinstance(V, torch.Tensor):
        return TensorRows(V)
    return open_rows(V)


class _Adapted:
    """A user's object with ``shape``, ``dtype``, ``is_sparse`` and ``read`` but no ``blocks``."""

    def __init__(self, source):
        self.source = source
        self.shape = tuple(int(s) for s in source.shape)
        self.dtype = source.dtype
        self.is_sparse = bool(source.is_sparse)

    def blocks(self, block_rows):
        N = self.shape[0]
        for start in range(0, N, block_rows):
            stop = min(start + block_rows, N)
            yield start, stop, self.source.read(start, stop)


def _check_block_rows(block_rows):
    if block_rows is None:
        return None
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows <= 0:
        raise ValueError(f"block_rows must be a positive integer, got {block_rows!r}")
    return block_rows


def _mask_source(mask, shape):
    """A row source of the mask (True = observed), checked against ``V``'s shape."""
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
        raise TypeError(
            f"mask must be a boolean tensor (True = observed), got dtype {mask.dtype}; "
            f"convert it with mask != 0 or mask.bool()"
        )
    if hasattr(mask, "dtype") and not isinstance(mask, torch.Tensor) and str(mask.dtype) != "bool":
        raise TypeError(f"mask must hold booleans (True = observed), got dtype {mask.dtype}")
    source = as_streamed_source(mask) if not isinstance(mask, torch.Tensor) else _BoolRows(mask)
    if tuple(source.shape) != tuple(shape):
        raise ValueError(f"mask must have the shape of V {tuple(shape)}, got {tuple(source.shape)}")
    return source


class _BoolRows:
    """A boolean tensor mask served in row blocks, kept boolean."""

    is_sparse = False

    def __init__(self, mask):
        self.mask = mask.to_dense() if mask.layout != torch.strided else mask
        self.shape = tuple(mask.shape)
        self.dtype = torch.bool

    def read(self, start, stop):
        return self.mask[start:stop]


def _as_bool(block):
    block = block.to_dense() if block.layout != torch.strided else block
    return block if block.dtype == torch.bool else block != 0


class StreamedTarget:
    """A matrix read in row blocks, validated once, ready for :class:`StreamedStats`.

    Args:
        source: a row source (see :mod:`~torchnmf.targets.sources`).
        mask: ``None``, or a boolean matrix of ``V``'s shape (a tensor, an
            array, a memmap or a row source of it), True = observed.
        missing (str): ``"error"`` or ``"mask"`` (NaN as missing), as in ``fit``.
        block_rows (int, optional): rows per block; default about 64 MiB of
            ``V`` per block.
        device, dtype: where and in what the statistics are computed.
        holds (torch.dtype, optional): the dtype whose range every value must
            fit, when not ``dtype`` (a float16 model fitted in float32).
        rows, columns (bool): require an observed entry in every row / column.
        prefetch (bool): read the next block in a background thread.
        progress (bool): show a progress bar over the blocks of every pass
            (below the fit's bar over iterations) when a pass has several blocks.

    Attributes:
        shape (torch.Size): ``(N, C)``.
        masked (bool): whether some entries are unobserved.
        mean (float): the mean observed entry.
    """

    def __init__(self, source, mask=None, missing="error", block_rows=None, *, device=None,
                 dtype=None, holds=None, rows=True, columns=True, prefetch=True,
                 progress=False):
        self.source = source
        self.shape = torch.Size(source.shape)
        if len(self.shape) != 2 or 0 in self.shape:
            raise ValueError(f"V must be a non-empty matrix to stream, got shape {tuple(self.shape)}")
        self.missing = check_choice(missing, "missing", MISSING)
        self.mask_source = None if mask is None else _mask_source(mask, self.shape)
        block_rows = _check_block_rows(block_rows)
        if block_rows is None:
            block_rows = self._default_block_rows()
        self.block_rows = block_rows
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.dtype = dtype or (source.dtype if source.dtype.is_floating_point
                               else torch.get_default_dtype())
        self.holds = holds or self.dtype
        self.prefetch = prefetch
        self._pool = None  # the reading thread (see _raw_blocks), started at the first pass
        self.progress = progress and self.shape[0] > self.block_rows
        self.is_sparse = bool(source.is_sparse)
        self.may_hide = self.mask_source is not None or self.missing == "mask"
        self._check_conversion = False  # (only during the validation pass)
        self._validate(rows, columns)

    def dim(self):
        return 2

    def _default_block_rows(self):
        item = torch.empty((), dtype=self.source.dtype).element_size()
        return max(1, min(self.shape[0], DEFAULT_BLOCK_BYTES // max(1, self.shape[1] * item)))

    # -- reading -------------------------------------------------------------------------
    def _read(self):
        """(start, stop, V block, mask block) on the CPU, in file order."""
        pin = self.device.type == "cuda"
        for start, stop, block in self.source.blocks(self.block_rows):
            mask = None
            if self.mask_source is not None:
                mask = _as_bool(self.mask_source.read(start, stop))
            if pin and block.layout == torch.strided:
                block = block.pin_memory()
            yield start, stop, block, mask

    def _to_device(self, item):
        start, stop, block, mask = item
        if block.device != self.device:  # from pinned memory, then converted on the device
            block = block.to(self.device, non_blocking=block.layout == torch.strided)
        # the validation pass: what the dtype cannot hold
        if self._check_conversion and block.dtype != self.holds:
            try:
                check_fits_dtype(block, self.holds)
            except ValueError as error:
                raise ValueError(f"{error} (rows {start}:{stop})") from None
        if block.dtype != self.holds:  # (the model's numbers, as an in-memory V is made)
            block = block.to(self.holds)
        if block.dtype != self.dtype:
            block = block.to(self.dtype)
        if mask is not None and mask.device != self.device:
            mask = mask.to(self.device)
        return start, stop, block, mask

    def raw_blocks(self):
        """``(start, stop, V block, mask block)`` on the working device; the next
        block is read in a background thread while the caller works on this one."""
        if not self.progress:
            yield from self._raw_blocks()
            return
        from tqdm.auto import tqdm

        with tqdm(total=self.shape[0], desc="rows", unit="row", unit_scale=True, leave=False,
                  position=1) as bar:
            for item in self._raw_blocks():
                yield item
                bar.update(item[1] - item[0])

    def _raw_blocks(self):
        reader = self._read()
        if not self.prefetch:
            for item in reader:
                yield self._to_device(item)
            return
        # one reading thread for the target's life: a pool per pass started a thread every
        # pass (two to four an iteration), which on small targets cost more than the reads
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="torchnmf-rows")
        pending = self._pool.submit(next, reader, None)
        try:
            while True:
                item = pending.result()
                if item is None:
                    break
                pending = self._pool.submit(next, reader, None)
                yield self._to_device(item)
        finally:  # a pass left early: its read in flight ends before another pass reads
            concurrent.futures.wait([pending])

    def blocks(self):
        """``(start, stop, V block, mask block or None)`` prepared as the in-memory
        kinds expect (zeros at hidden entries; a sparse block as CSR or COO)."""
        for start, stop, block, mask in self.raw_blocks():
            if self.may_hide:
                block, mask = prepare_target(block, mask, self.missing, "V")
            yield start, stop, block, mask

    # -- validation, once ------------------------------------------------------------------
    def _validate(self, rows, columns):
        """One pass: values, shape, coverage of rows and columns, mean and zeros; and,
        for a working dtype narrower than the source's, each block's conversion."""
        self._check_conversion = True
        try:
            self._validate_blocks(rows, columns)
        finally:
            self._check_conversion = False

    def _validate_blocks(self, rows, columns):
        total, observed, zeros, hidden = 0.0, 0, 0, False
        seen_columns = None
        rows_done = 0
        for start, stop, block, mask in self.raw_blocks():
            if tuple(block.shape) != (stop - start, self.shape[1]):
                raise ValueError(
                    f"the source returned a block of shape {tuple(block.shape)} for rows "
                    f"{start}:{stop} of a {tuple(self.shape)} matrix"
                )
            rows_done = stop
            if self.may_hide:
                try:
                    block, mask = prepare_target(block, mask, self.missing, "V")
                except ValueError as error:
                    raise ValueError(f"{error} (rows {start}:{stop})") from None
            else:
                _check_block(block, start, stop)
            values = _observed_values(block, mask)
            total += float(values.sum(dtype=torch.float64))
            zeros += int((values == 0).sum()) + (
                0 if block.layout == torch.strided else _implicit_zeros(block, mask)
            )
            if mask is None:
                observed += block.shape[0] * block.shape[1]
                continue
            hidden = True
            observed += int(mask.sum())
            if rows:
                empty = torch.nonzero(~mask.any(1)).reshape(-1)
                if empty.numel():
                    raise ValueError(
                        f"mask leaves row {int(empty[0]) + start} of V with no observed entry; "
                        f"its factor cannot be estimated: drop the row or observe at least one "
                        f"entry in it"
                    )
            seen = mask.any(0)
            seen_columns = seen if seen_columns is None else seen_columns | seen
        if rows_done != self.shape[0]:
            raise ValueError(f"the source returned {rows_done} rows, its shape says {self.shape[0]}")
        if hidden and columns and seen_columns is not None and not bool(seen_columns.all()):
            empty = int(torch.nonzero(~seen_columns).reshape(-1)[0])
            raise ValueError(
                f"mask leaves column {empty} of V with no observed entry; its factor cannot be "
                f"estimated: drop the column or observe at least one entry in it"
            )
        self.masked = hidden
        # per column, whether some entry is observed (None: every entry is)
        self.observed_columns = seen_columns if hidden else None
        self.may_hide = hidden  # no hidden entry anywhere: the plain kinds, no per-pass checks
        self.observed = observed
        self.total = total
        self.zeros = zeros
        self.mean = total / max(observed, 1)

    def check_beta(self, beta):
        """``beta <= 0`` needs strictly positive observed entries (as in-memory fits)."""
        if beta > 0:
            return
        if self.is_sparse:
            raise ValueError(
                f"beta={beta:g} cannot be used with a sparse V: its implicit zeros make the "
                f"beta-divergence infinite; use beta > 0 or a dense V with no zeros"
            )
        if self.zeros:
            raise ValueError(
                f"beta={beta:g} needs a strictly positive V, but V has {self.zeros} zero "
                f"entries; add a small constant to V (e.g. V + 1e-6) or use beta > 0"
            )

    def statistics(self, beta):
        """The statistics object of this target for ``beta``."""
        cls = MaskedStreamedStats if self.masked else StreamedStats
        return cls(self, beta)


def _check_block(block, start, stop):
    try:
        check_non_negative_tensor(block, "V")
    except ValueError as error:
        raise ValueError(f"{error} (rows {start}:{stop})") from None


def _observed_values(block, mask):
    if block.layout == torch.strided:
        return block if mask is None else block[mask]
    return block._values() if block.layout == torch.sparse_coo else block.values()


def _implicit_zeros(block, mask):
    """Unstored (zero) entries that are observed, for the beta <= 0 check."""
    stored = block._nnz() if block.layout == torch.sparse_coo else block.values().numel()
    total = block.shape[0] * block.shape[1] if mask is None else int(mask.sum())
    return max(total - stored, 0)


class StreamedStats:
    """Statistics of a :class:`StreamedTarget`: each pass reads every block once.

    The interface of :mod:`torchnmf.targets` (``h_terms``, ``w_terms``,
    ``divergence``), plus :meth:`h_update_then_w_terms`, which lets a solver
    whose ``H`` update is row-wise (multiplicative updates) update ``H`` and
    sum the ``W`` terms in one pass instead of two.  Each block is handed to
    the in-memory kind for it (dense, sparse or masked), whose divergence
    constant is summed once here.
    """

    def __init__(self, target, beta, factor=1.0, constant=None, magnitude=None, squares=None):
        self.target = target
        self.beta = float(beta)
        self.factor = float(factor)
        self._h_buffers = None
        self._dense = {}
        self._magnitude = magnitude
        self._squares = squares
        self.constant = self._constant() if constant is None else constant

    def _blocks(self):
        """``(start, stop, block, mask)`` of the target, each block times :attr:`factor`."""
        for start, stop, block, mask in self.target.blocks():
            yield start, stop, block if self.factor == 1 else block * self.factor, mask

    # -- scale (see torchnmf.solvers.scaling) -------------------------------------------
    def scale_sums(self):
        """``(sum, count)`` of the observed entries, from the target's validation pass
        (no read of the blocks)."""
        return self.target.total * self.factor, self.target.observed

    def scaled(self, factor):
        """The same statistics for ``factor * V``: every block is multiplied as it is
        read; the divergence constant follows in closed form (no read)."""
        factor = float(factor)
        total, count = self.scale_sums()
        if self.beta == 2:
            constant = self.constant * factor**2
        elif self.beta == 1:  # sum(fV log fV - fV) = f (sum(V log V - V)) + f log(f) sum(V)
            constant = self.constant * factor + factor * math.log(factor) * total
        elif self.beta == 0:  # -(sum log fV + n) = -(sum log V + n) - n log f
            constant = self.constant - count * math.log(factor)
        else:
            constant = self.constant * factor**self.beta
        magnitude = squares = None
        if self._magnitude is not None:  # sum (f V)^beta = f^beta sum V^beta
            try:
                magnitude = self._magnitude * factor**self.beta
                if self._squares is not None:
                    squares = self._squares * factor**(2 * self.beta)
            except OverflowError:
                magnitude = squares = math.inf
        return type(self)(self.target, self.beta, self.factor * factor, constant=constant,
                          magnitude=magnitude, squares=squares)

    # -- the explicit residual (see torchnmf.targets.residual) -----------------------
    def magnitude(self):
        """The size of the divergence's terms, :math:`\\sum V^\\beta` over the observed
        entries (float; summed in the read that sums the divergence constant)."""
        if self._magnitude is None:
            self._magnitude = sum(
                self._local(block, mask).magnitude() for _, _, block, mask in self._blocks()
            )
        return self._magnitude

    def magnitude_squares(self):
        """:math:`\\sum V^{2\\beta}` over the observed entries, for the closed forms'
        rounding noise (float; summed in the same read as :meth:`magnitude`)."""
        if self._squares is None:
            self._squares = sum(
                self._local(block, mask).magnitude_squares() for _, _, block, mask in self._blocks()
            )
        return self._squares

    def explicit_divergence(self, H, W):
        """The divergence summed entry by entry in float64, block by block (one read)."""
        total = self._zero(H)
        for start, stop, block, mask in self._blocks():
            total += self._local(block, mask).explicit_divergence(H[start:stop], W)
        return total

    def _constant(self):
        """The divergence constant; the magnitude on the way (the same read)."""
        total = torch.zeros((), dtype=torch.float64, device=self.target.device)
        magnitude = squares = 0.0
        for _, _, block, mask in self._blocks():
            values = _observed_values(block, mask)
            total += divergence_constant(values, self.beta)
            magnitude += power_sum(values, self.beta)
            squares += power_sum(values, 2 * self.beta)
        self._magnitude, self._squares = magnitude, squares
        return total

    def _local(self, block, mask):
        zero = 0.0
        if mask is not None:
            return MaskedMatrixStats(block, mask, self.beta, constant=zero)
        if block.layout == torch.strided:
            # one dense object per block shape, its work buffers reused across blocks
            key = tuple(block.shape)
            local = self._dense.get(key)
            if local is None:
                local = self._dense[key] = DenseMatrixStats(block, self.beta, constant=zero)
            return local.rebind(block)
        return SparseMatrixStats(block, self.beta, constant=zero)

    def _buffers(self, H):
        if self._h_buffers is None or self._h_buffers[0].shape != H.shape:
            self._h_buffers = (H.new_empty(H.shape), H.new_empty(H.shape))
        return self._h_buffers

    def _zero(self, like):
        return torch.zeros((), dtype=torch.float64, device=like.device)

    # -- the forms of the W terms, as the in-memory kinds give them ----------------------
    # A distributed fit sums each process's W terms in one all-reduce, so a process
    # that streams its rows must hand over the same shapes as one that holds them.
    @property
    def gram_form(self):
        """True when the positive ``W`` term is ``W @ (H.T @ H)`` (beta=2): the sum
        over blocks of each block's."""
        return self.beta == 2

    def _positive_shape(self, W):
        """beta=1's positive ``W`` term is the column sums of ``H``, one row ``(1, R)``
        (as the dense and sparse kinds give it); ``(C, R)`` otherwise."""
        return (1, W.shape[-1]) if self.beta == 1 else W.shape

    # -- interface --------------------------------------------------------------------------
    def h_terms(self, H, W, divergence=True):
        """The ``H`` terms ``(N, R)`` and the divergence (``None`` with ``divergence=False``)."""
        negative, positive = self._buffers(H)
        total = self._zero(H)
        for start, stop, block, mask in self._blocks():
            local_negative, local_positive, part = self._local(block, mask).h_terms(H[start:stop], W)
            negative[start:stop].copy_(local_negative)
            positive[start:stop].copy_(local_positive.expand(stop - start, -1))
            total += part
        return negative, positive, (self.constant + total) if divergence else None

    def w_terms(self, H, W, divergence=False):
        """The ``W`` terms, summed over blocks, in the in-memory kinds' shapes (see
        :meth:`_positive_shape`); with ``divergence=True`` also the divergence at (H, W)."""
        negative, positive = W.new_zeros(W.shape), W.new_zeros(self._positive_shape(W))
        total = self._zero(W)
        for start, stop, block, mask in self._blocks():
            local = self._local(block, mask)
            local_negative, local_positive = local.w_terms(H[start:stop], W)[:2]
            negative.add_(local_negative)
            positive.add_(local_positive)
            if divergence:
                total += local.divergence(H[start:stop], W)
        if not divergence:
            return negative, positive
        return negative, positive, self.constant + total

    def divergence(self, H, W):
        total = self._zero(H)
        for start, stop, block, mask in self._blocks():
            total += self._local(block, mask).divergence(H[start:stop], W)
        return self.constant + total

    def h_update_then_w_terms(self, H, W, update_rows, want_w=True):
        """One pass: per block, the ``H`` terms, ``update_rows(H_block, negative,
        positive)`` (in place, row-wise), then the block's ``W`` terms at the new rows.

        Returns ``(divergence before the update, W negative, W positive)`` (the
        last two ``None`` without ``want_w``); identical to :meth:`h_terms`, the
        update of all rows, then :meth:`w_terms`, because ``W`` is unchanged
        during the pass and the update of a row reads only that row.
        """
        total = self._zero(H)
        negative = W.new_zeros(W.shape) if want_w else None
        positive = W.new_zeros(self._positive_shape(W)) if want_w else None
        for start, stop, block, mask in self._blocks():
            local = self._local(block, mask)
            rows = H[start:stop]
            local_negative, local_positive, part = local.h_terms(rows, W)
            total += part
            update_rows(rows, local_negative, local_positive)
            if want_w:
                w_negative, w_positive = local.w_terms(rows, W)[:2]
                negative.add_(w_negative)
                positive.add_(w_positive)
        return self.constant + total, negative, positive


def masked_hals_error():
    """The refusal of weighted HALS on a streamed target (see :class:`MaskedStreamedStats`)."""
    return NotImplementedError(
        "solver='hals' with a mask or missing values needs the whole masked residual in "
        "memory, which a streamed V does not give; use solver='mu' or "
        "solver='mu_extrapolated' for a streamed masked fit"
    )


class MaskedStreamedStats(StreamedStats):
    """:class:`StreamedStats` of a target with unobserved entries.

    Masked HALS sweeps over the whole masked residual, column after column,
    which a stream of row blocks cannot give: it is refused at solver set-up.
    """

    # as the in-memory masked kind: both W terms (C, R), no Gram form
    gram_form = False

    def _positive_shape(self, W):
        return W.shape

    def observed_target(self):
        raise masked_hals_error()
