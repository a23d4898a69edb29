import pytest
import torch

from conftest import unchanged, TOLERANCES, DenseWatcher
from torchnmf import metrics
from torchnmf.targets.sparse import (
    SparseMatrixStats,
    blocked_power_product_,
    sampled_product_,
    to_csr,
)
from torchnmf.targets.dense import DenseMatrixStats
from torchnmf.nmf import NMF, NMFD

BETAS = (0.5, 1, 1.5, 2, 3)
LAYOUTS = {
    "coo": lambda V: V.to_sparse(),
    "csr": lambda V: V.to_sparse_csr(),
    "csc": lambda V: V.to_sparse_csc(),
}


def sparse_problem(generator, n=24, c=15, rank=3, density=0.3, dtype=torch.float64):
    """A sparse non-negative (n, c) target (about ``density`` stored) and initial factors."""
    mask = torch.rand(n, c, generator=generator) < density
    V = (torch.rand(n, c, generator=generator, dtype=dtype) + 0.1) * mask
    H0 = torch.rand(n, rank, generator=generator, dtype=dtype) + 0.1
    W0 = torch.rand(c, rank, generator=generator, dtype=dtype) + 0.1
    return V, H0, W0


def fitted(V, H0, W0, **options):
    model = NMF(W=W0, H=H0)
    model.fit(V, tol=0, **options)
    return model


def assert_same_fit(sparse, dense, dtype=torch.float64):
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(sparse.H, dense.H, **tol)
    torch.testing.assert_close(sparse.W, dense.W, **tol)
    torch.testing.assert_close(
        torch.tensor(sparse.loss_history, dtype=torch.float64),
        torch.tensor(dense.loss_history, dtype=torch.float64),
        **tol,
    )


# -- equivalence with the dense path ------------------------------------------------
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("layout", ["coo", "csr"])
@pytest.mark.parametrize("alpha,l1_ratio", [(0, 0), (0.1, 0.5), (0.05, 1.0)])
def test_sparse_fit_equals_dense_fit(beta, layout, alpha, l1_ratio, generator):
    V, H0, W0 = sparse_problem(generator)
    options = dict(beta=beta, max_iter=15, alpha=alpha, l1_ratio=l1_ratio)
    dense = fitted(V, H0, W0, **options)
    sparse = fitted(LAYOUTS[layout](V), H0, W0, **options)
    assert_same_fit(sparse, dense)


@pytest.mark.parametrize("beta", [1, 1.5])
def test_csc_and_float32_follow_the_dense_fit(beta, generator):
    V, H0, W0 = sparse_problem(generator)
    dense = fitted(V, H0, W0, beta=beta, max_iter=10)
    assert_same_fit(fitted(LAYOUTS["csc"](V), H0, W0, beta=beta, max_iter=10), dense)
    V, H0, W0 = V.float(), H0.float(), W0.float()
    dense = fitted(V, H0, W0, beta=beta, max_iter=10)
    sparse = fitted(V.to_sparse(), H0, W0, beta=beta, max_iter=10)
    assert sparse.W.dtype == torch.float32
    assert_same_fit(sparse, dense, torch.float32)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("block_elements", [7, 40, 10**6])
def test_statistics_equal_dense_statistics(beta, block_elements, generator):
    """Every term, with blocks that do and do not divide the rows (and one block of all)."""
    V, H, W = sparse_problem(generator, n=13, c=9)
    sparse = SparseMatrixStats(V.to_sparse(), beta, block_elements=block_elements)
    dense = DenseMatrixStats(V, beta)
    tol = TOLERANCES[torch.float64]
    for got, want in zip(sparse.h_terms(H, W), dense.h_terms(H, W)):
        want = torch.as_tensor(want, dtype=got.dtype)  # the dense divergence is a float on the CPU
        torch.testing.assert_close(got.expand_as(want), want, **tol)
    for got, want in zip(sparse.w_terms(H, W), dense.w_terms(H, W)):
        torch.testing.assert_close(got.expand_as(want), want, **tol)
    naive = metrics.beta_div(H @ W.T, V, beta).to(torch.float64)
    torch.testing.assert_close(sparse.divergence(H, W).to(torch.float64), naive, **tol)
    from_w = sparse.w_terms(H, W, divergence=True)[2]
    torch.testing.assert_close(from_w.to(torch.float64), naive, **tol)
    assert sparse.h_terms(H, W, divergence=False)[2] is None


def test_objective_never_increases(generator):
    V, _, _ = sparse_problem(generator, n=30, c=20)
    for beta in BETAS:
        torch.manual_seed(0)
        model = NMF(V.shape, rank=4).double()
        model.fit(V.to_sparse_csr(), beta=beta, max_iter=40, tol=0)
        history = torch.tensor(model.loss_history)
        assert (history[1:] <= history[:-1] * (1 + 1e-12)).all(), beta
        assert (model.H >= 0).all() and (model.W >= 0).all()


def test_recovers_planted_sparse_structure(generator):
    """Block-diagonal counts: a rank-3 KL fit of the sparse matrix finds the blocks."""
    n, c, rank = 30, 18, 3
    H = torch.zeros(n, rank, dtype=torch.float64)
    W = torch.zeros(c, rank, dtype=torch.float64)
    for k in range(rank):
        H[k * 10:(k + 1) * 10, k] = 1 + torch.rand(10, generator=generator, dtype=torch.float64)
        W[k * 6:(k + 1) * 6, k] = 1 + torch.rand(6, generator=generator, dtype=torch.float64)
    V = (H @ W.T).to_sparse()
    torch.manual_seed(3)
    model = NMF(V.shape, rank=rank).double()
    model.fit(V, beta=1, max_iter=500, tol=0)
    assert model.loss_history[-1] < 1e-3 * model.loss_history[0]
    torch.testing.assert_close(model().detach(), H @ W.T, rtol=0, atol=0.05)


# -- kernels against naive references -------------------------------------------------
def test_sampled_product_matches_dense_product(generator):
    V, H, W = sparse_problem(generator, n=11, c=7)
    csr = to_csr(V.to_sparse())
    out = torch.sparse_csr_tensor(
        csr.crow_indices(), csr.col_indices(), csr.values().clone(), csr.shape,
        check_invariants=False,
    )
    values = sampled_product_(out, csr, H, W)
    rows, cols = V.nonzero(as_tuple=True)
    torch.testing.assert_close(values, (H @ W.T)[rows, cols], **TOLERANCES[torch.float64])


@pytest.mark.parametrize("rows", [1, 4, 11])
def test_blocked_power_product_matches_dense(rows, generator):
    _, H, W = sparse_problem(generator, n=11, c=7)
    H[0, :] = 0  # a zero row of the reconstruction is floored at eps
    eps = torch.finfo(H.dtype).eps
    out = torch.empty_like(H)
    work = H.new_empty(2 * rows * 7)
    total = blocked_power_product_(out, H, W, 0.5, eps, rows, work)
    recon = (H @ W.T).clamp_min(eps)
    torch.testing.assert_close(out, recon.pow(0.5) @ W, **TOLERANCES[torch.float64])
    torch.testing.assert_close(total, recon.pow(1.5).sum(), **TOLERANCES[torch.float64])


# -- indices, caller's tensor ------------------------------------------------------------
def test_uncoalesced_coo_is_summed_and_left_alone(generator):
    _, H0, W0 = sparse_problem(generator, n=5, c=4, rank=2)
    indices = torch.tensor([[3, 0, 3, 1, 0, 4], [2, 1, 2, 3, 1, 0]])  # unsorted, duplicates
    values = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5, 0.25], dtype=torch.float64)
    V = torch.sparse_coo_tensor(indices, values, (5, 4), check_invariants=False)
    assert not V.is_coalesced()
    before = (V._indices().clone(), V._values().clone())
    dense = V.to_dense()
    assert dense[3, 2] == 1.5 and dense[0, 1] == 3.5
    for beta in (1, 1.5, 2):
        assert_same_fit(
            fitted(V, H0, W0, beta=beta, max_iter=8), fitted(dense, H0, W0, beta=beta, max_iter=8)
        )
    assert not V.is_coalesced()
    assert torch.equal(V._indices(), before[0]) and torch.equal(V._values(), before[1])


def test_uncoalesced_coo_is_judged_by_its_sums(generator):
    """A negative stored value whose duplicates sum to a non-negative entry is data,
    not an error (before: refused for its raw value); a negative sum is refused."""
    _, H0, W0 = sparse_problem(generator, n=5, c=4, rank=2)
    indices = torch.tensor([[3, 0, 3, 1], [2, 1, 2, 3]])
    V = torch.sparse_coo_tensor(indices, torch.tensor([1.0, 2.0, -0.5, 3.0], dtype=torch.float64),
                                (5, 4), check_invariants=False)
    assert_same_fit(fitted(V, H0, W0, beta=1, max_iter=5), fitted(V.to_dense(), H0, W0, beta=1, max_iter=5))
    negative = torch.sparse_coo_tensor(indices, torch.tensor([1.0, 2.0, -1.5, 3.0], dtype=torch.float64),
                                       (5, 4), check_invariants=False)
    with pytest.raises(ValueError, match="V must be non-negative, but its smallest entry is -0.5"):
        NMF(W=W0, H=H0).fit(negative)


def test_unsorted_csr_is_sorted_on_a_copy(generator):
    _, H0, W0 = sparse_problem(generator, n=3, c=4, rank=2)
    crow = torch.tensor([0, 2, 3, 5])
    col = torch.tensor([3, 0, 1, 2, 2])  # row 0 unsorted, row 2 has a duplicate
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    V = torch.sparse_csr_tensor(crow, col, values, (3, 4), check_invariants=False)
    dense = torch.tensor([[2.0, 0, 0, 1], [0, 3, 0, 0], [0, 0, 9, 0]], dtype=torch.float64)
    assert_same_fit(fitted(V, H0, W0, beta=1, max_iter=8), fitted(dense, H0, W0, beta=1, max_iter=8))
    assert torch.equal(V.col_indices(), col) and torch.equal(V.values(), values)


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_fit_never_modifies_v(layout, generator):
    V, _, _ = sparse_problem(generator)
    V = LAYOUTS[layout](V)
    copy = V.clone()
    for beta in (2, 1, 0.5):
        NMF(V.shape, rank=2).double().fit(V, beta=beta, max_iter=3, tol=0)
    torch.testing.assert_close(V.to_dense(), copy.to_dense(), rtol=0, atol=0)


def test_integer_sparse_counts_are_accepted(generator):
    counts = (torch.rand(8, 6, generator=generator) * 4).floor().to(torch.int64)
    model = NMF(counts.shape, rank=2)
    W0, H0 = model.W.detach().clone(), model.H.detach().clone()
    model.fit(counts.to_sparse(), beta=1, max_iter=5, tol=0)
    dense = fitted(counts.to(torch.get_default_dtype()), H0, W0, beta=1, max_iter=5)
    assert_same_fit(model, dense, torch.get_default_dtype())


# -- errors ---------------------------------------------------------------------------
def test_sparse_errors(generator):
    V, _, _ = sparse_problem(generator, n=6, c=5)
    model = NMF((6, 5), rank=2).double()
    with unchanged(model, V), pytest.raises(ValueError, match="V must be non-negative, but its smallest entry is -"):
        model.fit((-V).to_sparse())
    bad = V.clone()
    bad[0, 0] = float("nan")
    with unchanged(model, V), pytest.raises(ValueError, match="V contains NaN"):
        model.fit(bad.to_sparse_csr())
    bad[0, 0] = float("inf")
    with unchanged(model, V), pytest.raises(ValueError, match="V contains infinite values"):
        model.fit(bad.to_sparse())
    with unchanged(model, V), pytest.raises(
        ValueError, match=r"V must have the shape of the reconstruction \(6, 5\), got \(5, 6\)"
    ):
        model.fit(V.T.to_sparse())
    with unchanged(model, V), pytest.raises(ValueError, match=r"beta=0 cannot be used with a sparse V.*use beta > 0"):
        model.fit(V.to_sparse(), beta=0)
    with unchanged(model, V), pytest.raises(ValueError, match="beta=-1 cannot be used with a sparse V"):
        model.fit(V.to_sparse_csr(), beta=-1)
    with unchanged(model, V), pytest.raises(TypeError, match="V must be a dense tensor or a sparse COO, CSR or CSC"):
        model.fit(V.to_sparse_bsr((2, 1)))
    hybrid = V.unsqueeze(-1).to_sparse(2)
    with unchanged(model, V), pytest.raises(ValueError, match="a sparse V must store single numbers, got 1 dense"):
        model.fit(hybrid)
    outside = torch.sparse_coo_tensor(
        torch.tensor([[0, 6], [1, 1]]), torch.ones(2, dtype=torch.float64), (6, 5),
        check_invariants=False,
    )
    with unchanged(model, V), pytest.raises(ValueError, match=r"V has stored indices outside its shape \(6, 5\)"):
        model.fit(outside)
    with unchanged(model, V), pytest.raises(NotImplementedError, match="NMFD.fit does not accept sparse targets"):
        NMFD((6, 5, 4), rank=2, T=2).fit(torch.rand(6, 5, 4).to_sparse())


# -- never dense ---------------------------------------------------------------------------
@pytest.mark.parametrize("beta", BETAS)
def test_no_dense_matrix_is_ever_built(beta, generator, monkeypatch):
    n, c, rank, block = 40, 30, 3, 64
    V, H0, W0 = sparse_problem(generator, n=n, c=c, rank=rank, density=0.1)
    V = V.to_sparse()
    watcher = DenseWatcher()
    with watcher:  # the watcher sees a dense matrix when one is made
        V.to_dense()
    assert watcher.largest == n * c

    monkeypatch.setattr(torch.Tensor, "to_dense", lambda *a, **k: pytest.fail("to_dense called"))
    monkeypatch.setattr("torchnmf.targets.dense.BLOCK_ELEMENTS", block)
    monkeypatch.setattr("torchnmf.targets.sparse.SPARSE_BLOCK_ELEMENTS", block)
    model = NMF(W=W0, H=H0)
    watcher = DenseWatcher()
    with watcher:
        model.fit(V, beta=beta, max_iter=3, tol=0, alpha=0.1, l1_ratio=0.5)
    # nothing larger than a factor, the stored indices or one reconstruction block
    bound = max(n * rank, c * rank, 2 * V._nnz(), max(block, n, c))
    assert watcher.largest <= bound < n * c

    stats = SparseMatrixStats(V, beta, block_elements=block)
    stats.h_terms(H0, W0)
    stats.w_terms(H0, W0)
    if beta not in (1, 2):
        assert stats._work.numel() <= max(block, n, c)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("beta", [1, 1.5, 2])
def test_cuda_sparse_matches_cpu_dense(beta, generator):
    V, H0, W0 = sparse_problem(generator)
    dense = fitted(V, H0, W0, beta=beta, max_iter=10)
    gpu = fitted(V.to_sparse_csr().cuda(), H0.cuda(), W0.cuda(), beta=beta, max_iter=10)
    torch.testing.assert_close(gpu.W.detach().cpu(), dense.W.detach(), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(gpu.H.detach().cpu(), dense.H.detach(), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_transform_of_sparse_data_equals_dense(layout, generator):
    V, H0, W0 = sparse_problem(generator)
    model = NMF(W=W0, H=H0)
    starts = [torch.Generator().manual_seed(5) for _ in range(2)]
    sparse = model.transform(LAYOUTS[layout](V), beta=1, max_iter=10, tol=0, generator=starts[0])
    dense = model.transform(V, beta=1, max_iter=10, tol=0, generator=starts[1])
    torch.testing.assert_close(sparse, dense, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("columns", [31, 2**16 + 5])  # the two sorts of transpose_csr
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.3])
def test_transpose_csr_matches_the_dense_transpose(density, index_dtype, columns, generator):
    from torchnmf.targets.sparse import transpose_csr

    dense = torch.rand(23, columns, generator=generator, dtype=torch.float64)
    dense[dense > density] = 0
    dense[4] = 0  # an empty row, which becomes an empty column
    csr = dense.to_sparse_csr()
    csr = torch.sparse_csr_tensor(csr.crow_indices().to(index_dtype),
                                  csr.col_indices().to(index_dtype), csr.values(), csr.shape)
    transposed = transpose_csr(csr)
    expected = dense.T.contiguous().to_sparse_csr()
    assert transposed.shape == (columns, 23)
    assert torch.equal(transposed.crow_indices().long(), expected.crow_indices().long())
    assert torch.equal(transposed.col_indices().long(), expected.col_indices().long())
    assert torch.equal(transposed.values(), expected.values())


@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("chunk", [None, 8])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("density", [0.0, 0.3])
def test_transposed_product_matches_the_dense_product(density, index_dtype, chunk, column_major,
                                                      generator, monkeypatch):
    import torchnmf.targets.sparse as sparse
    from torchnmf.targets.sparse import transposed_product

    if chunk is not None:  # chunks of 2 entries (8 values at R = 4): several of them
        monkeypatch.setattr(sparse, "_TRANSPOSED_CHUNK", chunk)

    dense = torch.rand(17, 11, generator=generator, dtype=torch.float64)
    dense[dense > density] = 0
    dense[3] = 0  # an empty row
    dense[:, 5] = 0  # and an empty column
    csr = dense.to_sparse_csr()
    col = csr.col_indices().to(index_dtype)
    rows = torch.repeat_interleave(torch.arange(17, dtype=index_dtype), csr.crow_indices().diff())
    factor = torch.rand(17, 4, generator=generator, dtype=torch.float64)
    got = transposed_product(col, rows, csr.values(), factor, 11, column_major=column_major)
    torch.testing.assert_close(got, dense.T @ factor, **TOLERANCES[torch.float64])
    assert got.stride() == ((1, 11) if column_major else (4, 1))


@pytest.mark.parametrize("rows", [2, 17])
def test_sparse_dense_product_of_a_column_major_factor(rows, generator):
    """A column-major factor gives the row-major one's product, gathered through its
    strides (2 rows: 5 stored entries, under an eighth of its 48 elements) or copied
    to rows first (17 rows: about 50)."""
    from torchnmf.targets.sparse import is_column_major, sparse_dense_product

    dense = torch.rand(rows, 12, generator=generator, dtype=torch.float64)
    dense[dense < 0.75] = 0
    if rows == 2:
        dense.zero_()
        dense[0, [1, 4, 11]] = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
        dense[1, [4, 7]] = 3.0
    csr = dense.to_sparse_csr()
    assert (csr.values().numel() * 8 > 48) == (rows == 17)
    factor = torch.rand(12, 4, generator=generator, dtype=torch.float64)
    column_major = factor.mT.contiguous().mT
    assert is_column_major(column_major) and not is_column_major(factor)
    got = sparse_dense_product(csr.crow_indices(), csr.col_indices(), csr.values(), column_major)
    torch.testing.assert_close(got, dense @ factor, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("members", [None, 3])
def test_w_terms_without_a_transposed_copy_equal_dense_statistics(beta, members, generator, monkeypatch):
    """The W terms read through V's rows (an online batch's statistics) equal the dense
    ones, for one fit and for a stack, and never build the transposed copy."""
    import torchnmf.targets.sparse as sparse_module

    V, H, W = sparse_problem(generator, n=13, c=9)
    if members is not None:
        H = torch.rand(members, 13, 3, generator=generator, dtype=torch.float64) + 0.1
        W = torch.rand(members, 9, 3, generator=generator, dtype=torch.float64) + 0.1

    def no_copy(csr):
        raise AssertionError("a transposed copy was built")

    monkeypatch.setattr(sparse_module, "transpose_csr", no_copy)
    sparse = SparseMatrixStats(V.to_sparse_csr(), beta, block_elements=40, transposed_copy=False)
    dense = DenseMatrixStats(V, beta)
    tol = TOLERANCES[torch.float64]
    for _ in range(2):  # the buffers are reused
        for got, want in [*zip(sparse.w_terms(H, W, divergence=True), dense.w_terms(H, W, divergence=True)),
                          *zip(sparse.h_terms(H, W), dense.h_terms(H, W))]:
            # a divergence may be a Python float on the CPU
            got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
            torch.testing.assert_close(got.expand_as(want), want, **tol)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_entry_rows_name_each_stored_entrys_row(index_dtype, generator):
    from torchnmf.targets.sparse import entry_rows

    dense = torch.rand(9, 7, generator=generator)
    dense[dense < 0.6] = 0
    dense[[0, 4, 8]] = 0  # empty rows, first and last among them
    dense[2, 3] = 1.0
    csr = dense.to_sparse_csr()
    crow = csr.crow_indices().to(index_dtype)
    rows = entry_rows(crow, csr.values().shape[0])
    assert rows.dtype == index_dtype
    assert torch.equal(rows.long(), dense.nonzero()[:, 0])  # nonzero lists row by row


@pytest.mark.parametrize("beta", [1.5, 2, 3])
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_explicit_divergence_is_accurate_at_an_exact_fit(beta, layout, generator):
    # entries up to 1e5 among ones, fitted exactly: the divergence near there was taken as the zeros' terms summed over every entry
    # minus those of the stored ones, whose cancellation left eps * sum R^beta (at
    # beta=3 the fit's objective came in steps of 64, and rounding noise stopped it)
    W = torch.rand(5, 2, generator=generator, dtype=torch.float64) + 0.1
    H = torch.rand(6, 2, generator=generator, dtype=torch.float64) + 0.1
    H[0, 0] = 1e5
    V = H @ W.T
    V[2, 3] = 0.0
    perturbed = H * (1 + 1e-6 * torch.rand(6, 2, generator=generator, dtype=torch.float64))
    dense = DenseMatrixStats(V, beta).explicit_divergence(perturbed, W)
    sparse = SparseMatrixStats(LAYOUTS[layout](V), beta).explicit_divergence(perturbed, W)
    assert float(dense) > 0
    assert float(sparse) == pytest.approx(float(dense), rel=1e-9)
