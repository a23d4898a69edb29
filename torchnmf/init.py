r"""Initial factors computed from the data.

:func:`initialize` returns ``(W, H)`` for a target :math:`V \approx H W^\top`
of shape ``(N, C)``:

- ``"random"``: uniform entries scaled so that the reconstruction's mean equals
  ``V``'s mean (each entry in :math:`[0, 2\sqrt{\bar V / R}]`);
- ``"nndsvd"``: non-negative double singular value decomposition (Boutsidis &
  Gallopoulos 2008, doi:10.1016/j.patcog.2007.09.010): each of the ``R``
  leading singular triplets contributes the dominant non-negative part of its
  rank-one term.  Many entries are exactly zero, which suits ``"hals"`` and
  sparse solutions; multiplicative updates can never move a zero, so prefer
  ``"nndsvda"`` for them;
- ``"nndsvda"``: NNDSVD with the zeros filled with
  :math:`\sqrt{\bar V \min(1, R \delta)}`, :math:`\delta` the fraction of
  non-zero entries of ``V``: :math:`\sqrt{\bar V}` unless ``V`` is very sparse
  (the literature fills with :math:`\bar V`, which does not scale with the
  factors: a start for :math:`cV` would not be :math:`\sqrt c` times the start
  for :math:`V`);
- ``"nndsvdar"``: NNDSVD with the zeros filled with uniform random values in
  :math:`[0, f / 100]`, :math:`f` the fill of ``"nndsvda"``.

Whatever the method, no component is left all zero: a component that NNDSVD
cannot fill (the data has lower rank than ``R``, or ``R`` exceeds ``min(N, C)``)
gets the random initialisation instead, because a zero column of ``W`` or ``H``
stays zero forever under multiplicative updates and HALS alike.

The singular vectors come from an exact SVD for small matrices (at most 512
rows or columns and :math:`N C \min(N, C) \le 2^{30}`) and from a
randomised range finder (Halko, Martinsson & Tropp 2011,
doi:10.1137/090771806) otherwise; the latter touches ``V`` only through
products ``V @ X`` and ``V.mT @ X``, so sparse COO and CSR targets are never
densified.  Everything random draws from ``generator``, so a seed reproduces
the factors exactly.
"""
import math
import numbers
import warnings

import torch

from ._validation import check_positive_int, check_target
from .targets.dense import float64_sum

__all__ = ["initialize", "initialize_random", "METHODS"]

METHODS = ("random", "nndsvd", "nndsvda", "nndsvdar")

# Below this many rows or columns, and this much work N C min(N, C), an exact SVD
# is cheap; above either the randomised range finder is used (its cost grows with
# R, not with min(N, C)).  Measured on one thread, float32, rank 10: 4000 x 400
# (work 6.4e8) exact 0.10 s, randomised 0.02 s; 50000 x 500 (1.25e10) exact 2.3 s,
# randomised 0.4 s.
_EXACT_SVD_MAX = 512
_EXACT_SVD_WORK = 1 << 30
_OVERSAMPLE = 10
_POWER_ITERATIONS = 4


def _make_generator(generator, device):
    """A ``torch.Generator`` (or ``None`` for the global one) from a seed or generator."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, numbers.Integral):
        raise TypeError(
            f"generator must be an int seed, a torch.Generator or None, got "
            f"{type(generator).__name__}"
        )
    return torch.Generator(device=device).manual_seed(int(generator))


def _rand(shape, like, generator):
    """Uniform [0, 1) numbers with ``like``'s dtype and device, drawn from ``generator``."""
    device = like.device if generator is None else generator.device
    out = torch.rand(shape, dtype=like.dtype, device=device, generator=generator)
    return out.to(like.device)


def _mean(V, reduction=None):
    """The mean of every entry of ``V`` (implicit zeros included), as a float.

    With a ``reduction``, the mean of the rows of every process together.
    """
    if V.layout == torch.strided:
        total = float64_sum(V)
    elif V.layout == torch.sparse_coo:
        total = V._values().sum(dtype=torch.float64)
    else:
        total = V.values().sum(dtype=torch.float64)
    count = math.prod(V.shape)
    if reduction is not None:
        sums = torch.stack([total.reshape(()),
                            torch.tensor(float(count), dtype=torch.float64, device=total.device)])
        reduction.sum_(sums, what="sum of V")
        total, count = sums[0], int(sums[1])
    return float(total) / max(count, 1)


def _density(V, reduction=None):
    """The fraction of non-zero entries of ``V`` (of every process's rows together)."""
    if V.layout == torch.strided:
        stored = V
    else:
        stored = V._values() if V.layout == torch.sparse_coo else V.values()
    counts = torch.tensor([float(stored.count_nonzero()), float(math.prod(V.shape))],
                          dtype=torch.float64, device=V.device)
    if reduction is not None:
        reduction.sum_(counts, what="non-zero count of V")
    return float(counts[0]) / max(float(counts[1]), 1.0)


def _rows_rand(shape, like, generator, reduction):
    """:func:`_rand` of the activations of all rows; this process's rows of it.

    Every process draws the same numbers (small beside ``V``) and keeps its own
    block, so that the result is the single-process one from the same seed.
    """
    if reduction is None:
        return _rand(shape, like, generator)
    offset = sum(reduction.rows[: reduction.rank])
    everything = _rand((sum(reduction.rows), *shape[1:]), like, generator)
    return everything[offset:offset + shape[0]].clone()


def _tall_orthonormal(Y, reduction, column_major=False):
    """An orthonormal basis of the columns of a tall ``Y`` (its rows possibly spread
    over processes): Cholesky QR, twice for accuracy (Fukaya et al. 2014,
    doi:10.1109/ScalA.2014.11), a third time after a shifted factorisation; the
    same subspace as a Householder QR.  The basis is ``Y`` times the inverse of
    the small triangular factor, row-major as the embedding bags that read it
    want: 1,000,000 x 20 on one thread, 0.48 s against 1.43 s for Householder
    QR and its contiguous copy (measured).  With ``column_major`` the basis is
    column-major, for readers that take its columns (a scatter of ``V^T Q``):
    the products with the triangular factor and the second Gram matrix are
    then faster (200,000 x 10, one thread: 10 against 19 ms, measured)."""
    passes, shifted = 2, False
    while passes:
        gram = Y.mT @ Y
        if reduction is not None:
            reduction.sum_(gram, what="Gram matrix of the range finder")
        factor, info = torch.linalg.cholesky_ex(gram)
        if info.item() != 0:  # numerically rank-deficient: shift (shifted Cholesky QR)
            shift = torch.finfo(Y.dtype).eps * gram.diagonal().sum() * gram.shape[0]
            factor = torch.linalg.cholesky(gram + shift * torch.eye(gram.shape[0], dtype=gram.dtype,
                                                                    device=gram.device))
            passes, shifted = passes + (not shifted), True
        identity = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
        inverse = torch.linalg.solve_triangular(factor, identity, upper=False)
        Y = (inverse @ Y.mT).mT if column_major else Y @ inverse.mT
        passes -= 1
    return Y


def _products(V, transposed=True):
    """``(product, transposed)``: functions giving ``V @ X`` and ``V.mT @ X``.

    A dense ``V.mT @ X`` is taken as ``(X.mT @ V).mT``, which reads ``V`` in its own
    layout (float32 50000 x 500 against width 20, one thread: 0.04 s against
    0.11 s, measured).  A sparse ``V`` is put in compressed rows, with a
    compressed-row copy of ``V.mT``, once: each product is then an embedding bag
    (50000 x 20000 with 500,000 non-zeros, width 20: 0.015 s against 0.09 s for
    the COO product and 0.2 s for ``csr.mT @ X``, measured).
    """
    if V.layout == torch.strided:
        # contiguous: collectives need it
        return (lambda X: V @ X), (lambda X: (X.mT @ V).mT.contiguous())
    from .targets.sparse import sparse_dense_product, to_csr, transpose_csr

    by_rows = to_csr(V)
    by_columns = transpose_csr(by_rows) if transposed else None

    def product_with(csr):
        parts = csr.crow_indices(), csr.col_indices(), csr.values()
        # contiguous: a QR's Q is column-major, and an embedding bag gathering rows of
        # such a table is several times slower (0.17 s against 0.025 s, measured)
        return lambda X: sparse_dense_product(*parts, X.contiguous())

    return product_with(by_rows), (product_with(by_columns) if transposed else None)


def _column_sum(X, reduction):
    """``X.mT @ ...`` products summed over the processes' rows (in place), then returned."""
    if reduction is not None:
        reduction.sum_(X, what="product with V")
    return X


def _exact_svd(V, k, reduction):
    """The exact leading triplets; over processes from the all-reduced Gram matrix
    ``V^T V`` (``C x C``): its eigenvectors are the right singular vectors."""
    if reduction is None:
        U, S, Vh = torch.linalg.svd(V, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k].mT
    gram = _column_sum(V.mT @ V, reduction)
    values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
    S = values.clamp_min(0).sqrt()
    U = (V @ vectors) / S.clamp_min(torch.finfo(V.dtype).tiny)
    return U, S, vectors


def _sparse_exact_svd(V, k, reduction=None):
    """The exact leading triplets of a sparse ``V`` with a side of at most
    ``_EXACT_SVD_MAX``, from the eigenvectors of that side's float64 Gram matrix (a
    sparse product; ``V`` is never densified).

    The randomised range finder is an approximation: on the digits (1797 x 64) as
    a CSR matrix its NNDSVD start was 1.5e-3 off the dense one's, and the fill of
    ``"nndsvda"``, which goes where NNDSVD leaves exact zeros, landed elsewhere
    (0.2% apart after 200 iterations).  Squaring the matrix costs the small
    singular values relative accuracy (about ``eps * (S[0] / S[i])**2``), not the
    leading ones NNDSVD uses.  Over processes (each with its rows of ``V``) the
    columns' Gram matrix is all-reduced, as :func:`_exact_svd` does for dense rows.
    """
    coo = (V if V.layout == torch.sparse_coo else V.to_sparse_coo()).coalesce()
    coo = coo.to(torch.float64)
    transposed = coo.t().coalesce()
    # the Gram matrix of the smaller side: its eigenvectors are that side's vectors
    columns = reduction is not None or V.shape[1] <= V.shape[0]
    first, second = (transposed, coo) if columns else (coo, transposed)
    gram = torch.sparse.mm(first, second).to_dense()
    if reduction is not None:
        gram = _column_sum(gram, reduction)
    values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
    S = values.clamp_min(0).sqrt()
    # the other side's vectors: V X / S (or V^T U / S)
    other = torch.sparse.mm(second if columns else first.t().coalesce(), vectors)
    other = other / S.clamp_min(torch.finfo(torch.float64).tiny)
    U, right = (other, vectors) if columns else (vectors, other)
    return U.to(V.dtype), S.to(V.dtype), right.to(V.dtype)


def _every_row(V, step):
    """Rows ``0, step, 2 step, ...`` of a dense or compressed-row ``V``."""
    if V.layout == torch.strided:
        return V[::step]
    crow = V.crow_indices()
    starts, counts = crow[:-1:step], crow.diff()[::step]
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    positions = torch.repeat_interleave(starts - offsets[:-1], counts,
                                        output_size=int(offsets[-1]))
    positions += torch.arange(positions.numel(), device=positions.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(offsets, V.col_indices()[positions], V.values()[positions],
                                       (counts.numel(), V.shape[1]), check_invariants=False)


def _sampled_svd(V, k, generator, step):
    """The leading triplets of ``V`` from the right singular vectors ``Vs`` of every
    ``step``-th row and one power iteration over all of ``V``: ``Q``, an orthonormal
    basis of ``V Vs``, and the SVD of ``Q (V^T Q)^T``, whose small factor comes from
    the SVD of the ``(C, k)`` matrix ``V^T Q``.  Exact when the sample spans ``V``'s
    row space (``V`` of rank ``k``); else ``V`` projected on the span of ``V Vs``."""
    from .targets.sparse import entry_rows, to_csr, transposed_product

    if V.layout == torch.strided:
        product, _ = _products(V, transposed=False)
        transposed = lambda X: (X.mT @ V).mT  # noqa: E731
    else:
        V = to_csr(V)
        product, _ = _products(V, transposed=False)
        rows = entry_rows(V.crow_indices(), V.col_indices().shape[0])
        transposed = lambda X: transposed_product(V.col_indices(), rows, V.values(), X,  # noqa: E731
                                                  V.shape[1], column_major=True)
    _, _, right = _svd(_every_row(V, step), k, generator)
    # column-major Q: the scatter of V^T Q reads its columns, and V^T Q comes back
    # as the rows of the (k, C) matrix whose SVD is wanted
    Q = _tall_orthonormal(product(right), None, column_major=True)
    # V^T Q = right S U_small^T: the SVD of the tall (C, k) matrix (see _svd)
    right, S, U_small_T = torch.linalg.svd(transposed(Q), full_matrices=False)
    return (U_small_T @ Q.mT).mT, S, right


def _svd(V, k, generator, reduction=None):
    """The ``k`` leading singular triplets ``(U, S, Vh_T)`` with ``V ~ U diag(S) Vh_T.T``.

    With a ``reduction``, ``V`` and ``U`` are this process's rows; only
    ``(C, width)`` products and ``(width, width)`` Gram matrices are summed.
    """
    N, C = V.shape
    dense = V.layout == torch.strided
    if reduction is not None:
        N = sum(reduction.rows)
        dense = reduction.dense
    if dense and min(N, C) <= _EXACT_SVD_MAX and N * C * min(N, C) <= _EXACT_SVD_WORK:
        return _exact_svd(V, k, reduction)
    if not dense and (C <= _EXACT_SVD_MAX or (reduction is None and N <= _EXACT_SVD_MAX)):
        return _sparse_exact_svd(V, k, reduction)
    # randomised range finder with power iterations, QR after every product
    width = min(k + _OVERSAMPLE, N, C)
    product, transposed = _products(V)
    probe = torch.randn(C, width, dtype=V.dtype, generator=generator,
                        device=V.device if generator is None else generator.device)
    Q = _tall_orthonormal(product(probe.to(V.device)), reduction)
    for _ in range(_POWER_ITERATIONS):
        Q = torch.linalg.qr(_column_sum(transposed(Q), reduction)).Q
        Q = _tall_orthonormal(product(Q), reduction)
    # V^T Q (C, width) = right S U_small^T, so V ~ Q Q^T V = (Q U_small) S right^T: the
    # SVD of this tall matrix, not of the wide Q^T V, which took 4-5 times as long (float32,
    # one thread: 20 x 20000 11 ms against 2.4 ms; 10 x 20000 4.6 against 0.8 ms, measured)
    right, S, U_small_T = torch.linalg.svd(_column_sum(transposed(Q), reduction),
                                           full_matrices=False)
    return (Q @ U_small_T.mT)[:, :k], S[:k], right[:, :k]


def _nndsvd(V, rank, generator, reduction=None, step=1):
    """Basic NNDSVD factors; ``dead`` marks the components it could not fill.  With
    ``step > 1``, the singular vectors come from every ``step``-th row."""
    N, C = V.shape
    if reduction is not None:
        N = sum(reduction.rows)
    k = min(rank, -(-N // step), C)  # the sample's rows bound the rank too
    if step > 1:
        U, S, Vt = _sampled_svd(V, k, generator, step)
    else:
        U, S, Vt = _svd(V, k, generator, reduction)
    # Entries of the unit singular vectors at rounding level are zeros: an all-zero
    # column of V gives exact zeros from one SVD and 1e-17 from another, and the
    # fill of "nndsvda" goes where the start is exactly zero.
    eps = torch.finfo(V.dtype).eps
    U = U.masked_fill(U.abs() <= 4 * eps * math.sqrt(N), 0)
    Vt = Vt.masked_fill(Vt.abs() <= 4 * eps * math.sqrt(C), 0)
    N = U.shape[0]
    H = U.new_zeros(N, rank)
    W = U.new_zeros(C, rank)
    # The leading singular vectors of a non-negative matrix have one sign.
    H[:, 0] = S[0].sqrt() * U[:, 0].abs()
    W[:, 0] = S[0].sqrt() * Vt[:, 0].abs()
    # Each later pair keeps the positive or the negative parts of its singular
    # vectors, whichever carries more mass, normalised: the chosen part of x is
    # max(0, sign x), written at once as max(0, x sign scale / norm) (two passes over
    # each (N, k) factor instead of five, for the online start's 200,000 rows).
    x, y = U[:, 1:k], Vt[:, 1:k]
    if reduction is None:
        xp_norm, xn_norm = x.clamp_min(0).norm(dim=0), x.clamp_max(0).norm(dim=0)
    else:  # the norms of the columns of U over every process's rows
        squares = torch.stack([x.clamp_min(0).pow(2).sum(0), x.clamp_max(0).pow(2).sum(0)])
        reduction.sum_(squares, what="norms of the singular vectors")
        xp_norm, xn_norm = squares.sqrt()
    yp_norm, yn_norm = y.clamp_min(0).norm(dim=0), y.clamp_max(0).norm(dim=0)
    positive_mass = xp_norm * yp_norm
    negative_mass = xn_norm * yn_norm
    use_positive = positive_mass >= negative_mass
    tiny = torch.finfo(V.dtype).tiny
    sign = torch.where(use_positive, 1.0, -1.0).to(V.dtype)
    scale = (S[1:k] * torch.where(use_positive, positive_mass, negative_mass)).sqrt() * sign
    x_norm = torch.where(use_positive, xp_norm, xn_norm).clamp_min(tiny)
    y_norm = torch.where(use_positive, yp_norm, yn_norm).clamp_min(tiny)
    torch.mul(x, scale / x_norm, out=H[:, 1:k]).clamp_min_(0)
    torch.mul(y, scale / y_norm, out=W[:, 1:k]).clamp_min_(0)
    # A component is dead when either factor's column is zero or its singular
    # value is numerically zero (V has lower rank than requested).
    n_rows = N if reduction is None else sum(reduction.rows)
    threshold = S[0] * max(n_rows, C) * torch.finfo(V.dtype).eps
    singular = torch.zeros(rank, dtype=torch.bool, device=V.device)
    singular[:k] = S <= threshold
    singular[k:] = True
    # a column of the non-negative H is zero when its sum is: the sum over rows of a
    # row-major H is a fast reduction, its maximum is not (200,000 x 10: 0.4 against
    # 6.5 ms, measured)
    mass_H = H.sum(0) if N else H.new_zeros(rank)
    if reduction is not None:
        reduction.sum_(mass_H, what="column sums of H")
    dead = singular | (mass_H <= 0) | (W.amax(0) <= 0)
    return W, H, dead


def _scaled_rand(W_shape, H_shape, mean, like, generator, reduction=None):
    # uniform on [0, 2s]: each of the `terms` products averages s^2
    terms = W_shape[1] * math.prod(W_shape[2:])
    scale = 2 * (mean / terms) ** 0.5
    W = _rand(W_shape, like, generator) * scale
    H = _rows_rand(H_shape, like, generator, reduction) * scale
    return W, H


def _random(V, rank, mean, generator, reduction=None):
    return _scaled_rand((V.shape[1], rank), (V.shape[0], rank), mean, V, generator, reduction)


def initialize_random(V, W_shape, H_shape, *, generator=None, process_group=None, timeout=None):
    r"""Uniform random factors of any model whose reconstruction has ``V``'s mean.

    Each output entry of the models sums ``R * prod(kernel_size)`` products of
    one ``W`` and one ``H`` entry; drawing both uniformly on :math:`[0, 2s]`
    with :math:`s = \sqrt{\bar V / (R \prod k)}` makes their mean equal to
    the mean of ``V``.

    Args:
        V (Tensor): the non-negative target, any shape, dense or sparse.
        W_shape (tuple): ``(C, R, *kernel_size)``.
        H_shape (tuple): ``(N, R, *)``.
        generator (int, torch.Generator or None, keyword-only): as in :func:`initialize`.
        process_group, timeout (keyword-only): as in :func:`initialize`: each
            process passes its rows of ``V`` (dimension 0) and ``H_shape`` for
            them, and gets ``W`` and its rows of ``H``, equal to the
            single-process result on the stacked target from the same seed.

    Returns:
        (W, H) with ``V``'s floating dtype and device.

    Examples::

        >>> import torch
        >>> from torchnmf.init import initialize_random
        >>> V = torch.full((6, 5), 2.0)
        >>> W, H = initialize_random(V, (5, 3), (6, 3), generator=0)
        >>> W.shape, H.shape
        (torch.Size([5, 3]), torch.Size([6, 3]))
        >>> bool((W >= 0).all() and (H >= 0).all())
        True
        >>> W, H = initialize_random(torch.rand(2, 4, 20), (4, 3, 5), (2, 3, 16), generator=0)
        >>> W.shape, H.shape
        (torch.Size([4, 3, 5]), torch.Size([2, 3, 16]))
    """
    from .models.distributed import check_process_group, check_timeout, join

    process_group = check_process_group(process_group)
    timeout = check_timeout(timeout)
    try:
        V = check_target(V, "V")
        generator = _make_generator(generator, V.device)
        W_shape, H_shape = tuple(W_shape), tuple(H_shape)
        if process_group is not None and H_shape[0] != V.shape[0]:
            raise ValueError(
                f"H_shape must have V's {V.shape[0]} rows in dimension 0 (this process's "
                f"rows), got {H_shape}"
            )
    except (ValueError, TypeError) as error:
        if process_group is None:
            raise
        join(process_group, timeout, None, failure=error)
    reduction = None
    if process_group is not None:
        settings = {"W_shape": list(W_shape), "H_shape[1:]": list(H_shape[1:]),
                    "dtype": str(V.dtype), "method": "random"}
        reduction = join(process_group, timeout, settings, rows=H_shape[0])
    mean = _positive_mean(V, reduction)
    with torch.no_grad():
        return _scaled_rand(W_shape, H_shape, mean, V, generator, reduction)


def _positive_mean(V, reduction=None):
    mean = _mean(V, reduction)
    if not mean > 0:
        raise ValueError(
            "V must have at least one positive entry to initialise factors from it, "
            "got an all-zero V"
        )
    return mean


def _check_method(method):
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {type(method).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    return method


def initialize(V, rank, method="nndsvda", *, generator=None, sample_rows=None, process_group=None,
               timeout=None):
    r"""Initial non-negative factors ``(W, H)`` for :math:`V \approx H W^\top`.

    Args:
        V (Tensor): the non-negative ``(N, C)`` target, dense or sparse (COO or
            CSR). Never modified.
        rank (int): the number of components ``R``.
        method (str): ``"random"``, ``"nndsvd"``, ``"nndsvda"`` (default) or
            ``"nndsvdar"``; see :mod:`torchnmf.init`.
        generator (int, torch.Generator or None, keyword-only): the source of
            randomness (the random method, the fill of ``"nndsvdar"``, the
            randomised SVD of large matrices): a seed, a generator, or
            ``None`` for torch's global generator.
        sample_rows (int, keyword-only): NNDSVD's right singular vectors from
            about this many evenly spaced rows of ``V`` (every
            ``N // sample_rows``-th), then its left ones from one product with
            all of ``V``: a start at a fraction of the cost for tall ``V``,
            exact when the sample spans ``V``'s row space, else the SVD of ``V``
            projected on the sample's leading right singular vectors.  ``None``
            (default) or at least ``N / 2``: every row.  Single process only.
        process_group (keyword-only): a ``torch.distributed`` group; each
            process passes its rows of ``V`` and gets ``W`` and its rows of
            ``H``, equal to the single-process result on the stacked matrix
            from the same seed (every process must pass the same seed).  The
            SVD comes from all-reduced ``(C, C)`` Gram matrices where the
            single process uses an exact SVD, else from the randomised range
            finder with Cholesky QR of all-reduced ``(width, width)`` Gram
            matrices.
        timeout (float, keyword-only): seconds to wait for the other processes.

    Returns:
        (W, H): ``W`` of shape ``(C, R)`` and ``H`` of shape ``(N, R)``, with
        ``V``'s dtype (floating; integer counts become the default dtype) and
        device. Every entry is non-negative and no column is all zero.

    Raises:
        TypeError: ``V`` is not a tensor, ``method`` not a string, or
            ``generator`` of the wrong type.
        ValueError: ``V`` is not a non-negative matrix, has no positive entry,
            or ``rank`` / ``method`` / ``sample_rows`` is not valid.
        NotImplementedError: ``sample_rows`` with a ``process_group``.

    Examples::

        >>> import torch
        >>> from torchnmf.init import initialize
        >>> V = torch.rand(30, 20)
        >>> W, H = initialize(V, 4, generator=0)
        >>> W.shape, H.shape
        (torch.Size([20, 4]), torch.Size([30, 4]))
        >>> bool((W >= 0).all() and (H >= 0).all())
        True
    """
    from .models.distributed import check_process_group, check_timeout, join

    process_group = check_process_group(process_group)
    timeout = check_timeout(timeout)
    try:
        V = check_target(V, "V")
        if V.dim() != 2:
            raise ValueError(
                f"V must be a matrix (2 dimensions) to initialise from, got shape {tuple(V.shape)}"
            )
        rank = check_positive_int(rank, "rank")
        method = _check_method(method)
        if sample_rows is not None:
            sample_rows = check_positive_int(sample_rows, "sample_rows")
            if process_group is not None:
                raise NotImplementedError(
                    "sample_rows is for a single process; got it with a process_group"
                )
        generator = _make_generator(generator, V.device)
    except (ValueError, TypeError) as error:
        if process_group is None:
            raise
        join(process_group, timeout, None, failure=error)
    if method != "random" and V.dtype in (torch.float16, torch.bfloat16):
        # torch has no SVD in half precision (on any device; before, its NotImplementedError
        # ended the estimator's dtype='float16' fits): a float32 start, cast back
        W, H = initialize(V.float(), rank, method, generator=generator, sample_rows=sample_rows,
                          process_group=process_group, timeout=timeout)
        return W.to(V.dtype), H.to(V.dtype)
    reduction = None
    if process_group is not None:
        settings = {"columns": V.shape[1], "rank": rank, "method": method, "dtype": str(V.dtype)}
        reduction = join(process_group, timeout, settings, rows=V.shape[0])
        dense = torch.tensor([float(V.layout != torch.strided)], dtype=torch.float64, device=V.device)
        reduction.sum_(dense, what="agreement on layouts")
        reduction.dense = dense.item() == 0  # the exact SVD serves dense targets only
    mean = _positive_mean(V, reduction)
    with torch.no_grad():
        if method == "random":
            return _random(V, rank, mean, generator, reduction)
        step = 1 if sample_rows is None else max(1, V.shape[0] // sample_rows)
        W, H, dead = _nndsvd(V, rank, generator, reduction, step)
        # the fill has the factors' scale, sqrt(mean), so that a start for c V is
        # sqrt(c) times the start for V; the mean itself (Boutsidis & Gallopoulos,
        # and scikit-learn), equal to it for data of mean 1, is too small by sqrt(c)
        # at c = 1e-6 and too large at 1e6 (issue 15: a float32 fit at 1e-6 from
        # such a start ended at relative error 0.14, 0.02 at scale 1).  The fill
        # adds R fill^2 to every entry of the reconstruction: R mean with that
        # fill, which data with fewer than 1 in R entries non-zero cannot carry, so
        # there it is R mean (R density), the density being free of the scale.
        # On counts with 5e-4 of their entries non-zero (R = 10), sqrt(mean) put a
        # background at 10x the mean that the zeros' cost at beta 1 (the
        # reconstruction itself) took an online fit 4.6 passes to remove; with
        # this fill 1.4 (issue 13).  Dense data, and the digits at half their
        # entries non-zero, keep sqrt(mean): on the digits, sqrt(mean density)
        # ended an online beta 1 fit 6% higher.
        fill = math.sqrt(mean * min(1.0, rank * _density(V, reduction)))
        if method == "nndsvda":
            # fill + 0 where an entry is zero, entry + 0 elsewhere: the masked
            # assignment's values exactly, in a third of its time (200,000 x 10,
            # half zero: 11 against 3-5 ms, measured)
            W.add_((W == 0).to(W.dtype), alpha=fill)
            H.add_((H == 0).to(H.dtype), alpha=fill)
        elif method == "nndsvdar":
            fill = fill / 100
            W = torch.where(W == 0, _rand(W.shape, W, generator) * fill, W)
            H = torch.where(H == 0, _rows_rand(H.shape, H, generator, reduction) * fill, H)
        if dead.any():
            W_random, H_random = _random(V, rank, mean, generator, reduction)
            W[:, dead] = W_random[:, dead]
            H[:, dead] = H_random[:, dead]
    return W, H
