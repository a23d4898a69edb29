import math
import pytest
import torch
from torch.testing import assert_close

from conftest import low_rank
from torchnmf.init import METHODS, initialize, initialize_random
from torchnmf.metrics import euclidean
from torchnmf.nmf import NMF, NMFD


def naive_nndsvd(V, rank):
    """NNDSVD written out from Boutsidis & Gallopoulos, one component at a time."""
    U, S, Vh = torch.linalg.svd(V, full_matrices=False)
    W = torch.zeros(V.shape[1], rank, dtype=V.dtype)
    H = torch.zeros(V.shape[0], rank, dtype=V.dtype)
    H[:, 0] = S[0].sqrt() * U[:, 0].abs()
    W[:, 0] = S[0].sqrt() * Vh[0].abs()
    for j in range(1, rank):
        x, y = U[:, j], Vh[j]
        xp, xn, yp, yn = x.clamp(min=0), (-x).clamp(min=0), y.clamp(min=0), (-y).clamp(min=0)
        mp = xp.norm() * yp.norm()
        mn = xn.norm() * yn.norm()
        if mp >= mn:
            u, v, sigma = xp / xp.norm(), yp / yp.norm(), mp
        else:
            u, v, sigma = xn / xn.norm(), yn / yn.norm(), mn
        H[:, j] = (S[j] * sigma).sqrt() * u
        W[:, j] = (S[j] * sigma).sqrt() * v
    return W, H


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_dtype_non_negative_and_no_dead_component(method, dtype, generator):
    V, _, _ = low_rank(25, 18, 4, generator, dtype=dtype, noise=0.1)
    W, H = initialize(V, 6, method, generator=0)
    assert W.shape == (18, 6) and H.shape == (25, 6)
    assert W.dtype == dtype and H.dtype == dtype
    assert (W >= 0).all() and (H >= 0).all()
    assert (W.amax(0) > 0).all() and (H.amax(0) > 0).all()


@pytest.mark.parametrize("method", ["nndsvd", "nndsvda", "nndsvdar"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_starts_are_the_float32_starts_cast(method, dtype, generator):
    """torch has no SVD in half precision: before, NotImplementedError ("linalg_svd_cpu"
    not implemented for 'Half'), also from the estimator with dtype='float16'."""
    V, _, _ = low_rank(25, 18, 4, generator, dtype=torch.float32, noise=0.1)
    V = V.to(dtype)
    W, H = initialize(V, 3, method, generator=0)
    W32, H32 = initialize(V.float(), 3, method, generator=0)
    assert W.dtype == H.dtype == dtype
    torch.testing.assert_close(W, W32.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(H, H32.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_no_dead_component_when_rank_exceeds_the_data(method, generator):
    # V has rank 2; components 2.. have zero singular values (and 7 > min(N, C) = 6)
    V, _, _ = low_rank(10, 6, 2, generator)
    W, H = initialize(V, 7, method, generator=1)
    assert (W.amax(0) > 0).all() and (H.amax(0) > 0).all()


def test_second_component_is_filled(generator):
    # the bug seen elsewhere: a loop starting at component 2 leaves component 1 zero
    V, _, _ = low_rank(20, 15, 3, generator)
    W, H = initialize(V, 3, "nndsvd")
    assert W[:, 1].abs().sum() > 0 and H[:, 1].abs().sum() > 0


def test_nndsvd_matches_naive_reference(generator):
    V, _, _ = low_rank(20, 15, 3, generator, noise=0.05)
    W, H = initialize(V, 3, "nndsvd")
    W_ref, H_ref = naive_nndsvd(V, 3)
    assert_close(W, W_ref)
    assert_close(H, H_ref)


@pytest.mark.parametrize("density", [1.0, 0.5, 0.1])
def test_nndsvda_and_nndsvdar_fill_only_the_zeros(density, generator):
    V, _, _ = low_rank(20, 15, 3, generator, noise=0.05)
    V = V * (torch.rand(V.shape, generator=generator, dtype=V.dtype) < density)
    W, H = initialize(V, 3, "nndsvd")
    Wa, Ha = initialize(V, 3, "nndsvda")
    assert_close(Wa[W > 0], W[W > 0])
    # the factors' scale (not V's); below one non-zero entry in rank, times the
    # square root of rank times the density
    fill = (float(V.mean()) * min(1.0, 3 * float((V != 0).double().mean()))) ** 0.5
    assert 0 < fill < (float(V.mean()) ** 0.5 if density < 0.3 else math.inf)
    assert_close(Wa[W == 0], torch.full_like(Wa[W == 0], fill))
    assert_close(Ha[H == 0], torch.full_like(Ha[H == 0], fill))
    Wr, Hr = initialize(V, 3, "nndsvdar", generator=0)
    assert_close(Hr[H > 0], H[H > 0])
    assert (Hr[H == 0] <= fill / 100).all()


@pytest.mark.parametrize("method", ["nndsvd", "nndsvda", "nndsvdar", "random"])
@pytest.mark.parametrize("scale", [1e-12, 2.0**-40, 1e12])
def test_starts_scale_with_the_square_root(method, scale, generator):
    # a start for c V is sqrt(c) times the start for V (the nndsvda fill with the
    # mean of V broke this: fits from it at 1e-12 ended 3x worse than at 1)
    V, _, _ = low_rank(20, 15, 3, generator, noise=0.05)
    W, H = initialize(V, 3, method, generator=0)
    Wc, Hc = initialize(scale * V, 3, method, generator=0)
    assert_close(Wc / scale**0.5, W, rtol=1e-9, atol=1e-12)
    assert_close(Hc / scale**0.5, H, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("limit", ["_EXACT_SVD_MAX", "_EXACT_SVD_WORK"])
def test_randomised_svd_agrees_with_exact(generator, monkeypatch, limit):
    import torchnmf.init as init_module

    V, _, _ = low_rank(40, 30, 3, generator, noise=0.01)
    W, H = initialize(V, 3, "nndsvd")
    # either limit sends the SVD to the range finder (the exact one is never called)
    monkeypatch.setattr(init_module, limit, 0)
    monkeypatch.setattr(init_module, "_exact_svd", lambda *args: pytest.fail("exact SVD taken"))
    W2, H2 = initialize(V, 3, "nndsvd", generator=0)
    assert_close(W2 @ H2.T, W @ H.T, rtol=1e-6, atol=1e-8)


def test_nndsvd_starts_below_random_on_exactly_low_rank(generator):
    V, _, _ = low_rank(30, 20, 4, generator)
    W, H = initialize(V, 4, "nndsvd")
    Wr, Hr = initialize(V, 4, "random", generator=0)
    assert euclidean(H @ W.T, V) < 0.5 * euclidean(Hr @ Wr.T, V)


def test_random_is_scaled_to_the_data(generator):
    V = 50 * torch.rand(200, 100, generator=generator, dtype=torch.float64)
    W, H = initialize(V, 5, "random", generator=0)
    assert_close(float((H @ W.T).mean()), float(V.mean()), rtol=0.1, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_seeds_reproduce(method, generator):
    V, _, _ = low_rank(300, 600, 3, generator, noise=0.1)  # big enough for the randomised SVD
    W1, H1 = initialize(V, 5, method, generator=7)
    W2, H2 = initialize(V, 5, method, generator=torch.Generator().manual_seed(7))
    assert_close(W1, W2, rtol=0, atol=0)
    assert_close(H1, H2, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_target_matches_dense(layout, generator):
    # 12 columns <= rank + oversampling: the range finder spans all of V, so exact
    V, _, _ = low_rank(30, 12, 3, generator)
    V = V * (torch.rand(V.shape, generator=generator, dtype=V.dtype) < 0.5)
    sparse = V.to_sparse() if layout == "coo" else V.to_sparse_csr()
    W, H = initialize(V, 3, "nndsvd")
    Ws, Hs = initialize(sparse, 3, "nndsvd", generator=0)
    assert_close(Ws @ Hs.T, W @ H.T, rtol=1e-6, atol=1e-8)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_sparse_fill_counts_a_stored_zero_as_zero(generator):
    # 3 in 10 entries non-zero, rank 2: the fill depends on the density; 12 columns
    # <= rank + oversampling: the range finder is exact
    V, _, _ = low_rank(60, 12, 2, generator)
    V = V * (torch.rand(V.shape, generator=generator, dtype=V.dtype) < 0.3)
    sparse = V.to_sparse()
    where = (V == 0).nonzero()[:1].T
    with_zero = torch.sparse_coo_tensor(torch.cat([sparse.indices(), where], 1),
                                        torch.cat([sparse.values(), V.new_zeros(1)]), V.shape,
                                        check_invariants=True)
    Wa, Ha = initialize(V, 2, "nndsvda", generator=0)
    for target in (sparse, with_zero, with_zero.coalesce().to_sparse_csr()):
        Ws, Hs = initialize(target, 2, "nndsvda", generator=0)
        assert_close(Ws @ Hs.T, Wa @ Ha.T, rtol=1e-6, atol=1e-8)


def test_caller_tensor_unchanged(generator):
    V, _, _ = low_rank(12, 9, 2, generator)
    copy = V.clone()
    initialize(V, 2, "nndsvda", generator=0)
    assert torch.equal(V, copy)


def test_errors(generator):
    V, _, _ = low_rank(12, 9, 2, generator)
    with pytest.raises(ValueError, match="method must be one of"):
        initialize(V, 2, "svd")
    with pytest.raises(TypeError, match="method must be a string, got int"):
        initialize(V, 2, 3)
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        initialize(V, 0)
    with pytest.raises(TypeError, match="generator must be an int seed"):
        initialize(V, 2, generator=1.5)
    with pytest.raises(ValueError, match="V must be a matrix"):
        initialize(V.unsqueeze(0), 2)
    with pytest.raises(ValueError, match="at least one positive entry"):
        initialize(torch.zeros(4, 3), 2)
    with pytest.raises(ValueError, match="V must be non-negative"):
        initialize(-V, 2)
    with pytest.raises(TypeError, match="V must be a torch.Tensor"):
        initialize(V.numpy(), 2)


# -- the model method -----------------------------------------------------------------
def test_model_initialize_matches_function_and_chains(generator):
    V, _, _ = low_rank(20, 12, 3, generator)
    model = NMF(V.shape, rank=3).double()
    assert model.initialize_(V, "nndsvd") is model
    W, H = initialize(V, 3, "nndsvd")
    assert_close(model.W.detach(), W)
    assert_close(model.H.detach(), H)
    assert model.W.requires_grad


def test_model_initialize_keeps_fixed_factor(generator):
    V, _, _ = low_rank(20, 12, 3, generator)
    W0 = torch.rand(12, 3, generator=generator, dtype=torch.float64)
    model = NMF(W=W0, H=(20, 3), trainable_W=False)
    model.initialize_(V, "nndsvda", generator=0)
    assert_close(model.W.detach(), W0)
    _, H = initialize(V, 3, "nndsvda", generator=0)
    assert_close(model.H.detach(), H)


def test_initialise_then_hals_beats_random_start(generator):
    V, _, _ = low_rank(30, 20, 4, generator, noise=0.05)
    model = NMF(W=(20, 4), H=(30, 4)).double().initialize_(V, "nndsvd")
    with torch.no_grad():
        start = euclidean(model(), V)
    model.fit(V, beta=2, max_iter=30, tol=0, solver="hals")
    assert model.loss_history[-1] < float(start)


def test_conv_model_random_and_errors(generator):
    V = torch.rand(2, 3, 20, generator=generator, dtype=torch.float64)
    model = NMFD(V.shape, rank=2, T=4).double()
    model.initialize_(V, "random", generator=0)
    with torch.no_grad():
        assert_close(float(model().mean()), float(V.mean()), rtol=0.5, atol=0)
    with pytest.raises(NotImplementedError, match="supports method='random' only"):
        model.initialize_(V, "nndsvd")
    with pytest.raises(ValueError, match="method must be one of"):
        model.initialize_(V, "svd")
    with pytest.raises(ValueError, match="V must have the shape"):
        model.initialize_(V[:, :, :-1])


def test_initialize_random_shapes(generator):
    V = torch.rand(2, 3, 10, 8, generator=generator)
    W, H = initialize_random(V, (3, 4, 2, 2), (2, 4, 9, 7), generator=0)
    assert W.shape == (3, 4, 2, 2) and H.shape == (2, 4, 9, 7)
    assert (W >= 0).all() and (H >= 0).all()


@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("deficient", [False, True])
def test_range_finder_basis_is_orthonormal_and_spans_the_columns(dtype, deficient, column_major,
                                                                 generator):
    """Cholesky QR of the range finder: an orthonormal basis of span(Y), row-major or
    column-major as asked; a numerically rank-deficient Y (shifted factorisation)
    still gives a projector onto it."""
    from torchnmf.init import _tall_orthonormal

    Y = torch.randn(400, 6, generator=generator, dtype=dtype)
    if deficient:
        Y[:, 4] = 2 * Y[:, 1]
    Q = _tall_orthonormal(Y, None, column_major=column_major)
    tol = {"rtol": 0, "atol": 1e-4 if dtype == torch.float32 else 1e-10}
    assert Q.mT.is_contiguous() if column_major else Q.is_contiguous()
    if not deficient:  # the same basis either way (a deficient Y's is rounding's choice)
        assert_close(Q, _tall_orthonormal(Y, None), **tol)
    assert_close(Q @ (Q.mT @ Y), Y, **tol)
    gram = Q.mT @ Q
    assert_close(gram @ gram, gram, **tol)
    if not deficient:
        assert_close(gram, torch.eye(6, dtype=dtype), **tol)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", ["dense", "coo", "csr"])
@pytest.mark.parametrize("method", ["nndsvd", "nndsvda"])
def test_sampled_rows_give_the_full_start_on_exactly_low_rank(layout, method, generator):
    # every 4th of 200 rows spans the row space of a rank-3 V: the same SVD, the same start
    V, _, _ = low_rank(200, 12, 3, generator)
    target = {"dense": V, "coo": V.to_sparse(), "csr": V.to_sparse_csr()}[layout]
    W, H = initialize(V, 3, method, generator=0)
    Ws, Hs = initialize(target, 3, method, generator=0, sample_rows=50)
    assert_close(Ws @ Hs.T, W @ H.T, rtol=1e-6, atol=1e-8)
    assert_close(Ws, W, rtol=1e-6, atol=1e-8)


def test_sampled_rows_project_on_the_sample_and_keep_every_row(generator):
    # the sample misses part of V's row space: the start is NNDSVD of V projected on
    # the span of V times the sample's right singular vectors (one power iteration)
    V, _, _ = low_rank(90, 15, 6, generator, noise=0.1)
    W, H = initialize(V, 4, "nndsvda", generator=0, sample_rows=9)
    assert W.shape == (15, 4) and H.shape == (90, 4)
    assert (W >= 0).all() and (H >= 0).all() and (W.amax(0) > 0).all() and (H.amax(0) > 0).all()
    _, _, right = torch.linalg.svd(V[::10], full_matrices=False)
    Q = torch.linalg.qr(V @ right[:4].T).Q
    projected = Q @ (Q.T @ V)
    U, S, Vh = torch.linalg.svd(projected, full_matrices=False)
    W1, H1 = initialize(V, 4, "nndsvd", generator=0, sample_rows=9)
    assert_close(W1[:, 0] * H1[:, 0].norm(), S[0] * Vh[0].abs(), rtol=1e-6, atol=1e-8)
    assert_close(H1[:, 0] * W1[:, 0].norm(), S[0] * U[:, 0].abs(), rtol=1e-6, atol=1e-8)


def test_sample_rows_errors(generator):
    V = torch.rand(20, 5, generator=generator)
    with pytest.raises(ValueError, match="sample_rows must be a positive integer, got 0"):
        initialize(V, 2, sample_rows=0)
    with pytest.raises(TypeError, match="sample_rows must be a positive integer, got 2.5"):
        initialize(V, 2, sample_rows=2.5)
    W, H = initialize(V, 2, generator=0, sample_rows=15)  # at least N / 2: every row
    W_all, H_all = initialize(V, 2, generator=0)
    assert_close(W, W_all, rtol=0, atol=0)
    assert_close(H, H_all, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["nndsvd", "nndsvda", "nndsvdar"])
@pytest.mark.parametrize("which", ["digits", "transposed", "thresholded"])
def test_sparse_start_equals_the_dense_start(method, which):
    """A sparse matrix with a side of at most 512 gets the exact SVD (from that side's
    Gram matrix, never densified), and singular-vector entries at rounding level
    count as zeros: before, the digits as CSR started 1.5e-3 off the dense start
    (a randomised range finder), "nndsvda" filled other entries (2.2 apart), and a
    scikit-learn-style estimator fit of the two ended 0.2% apart."""
    from sklearn.datasets import load_digits

    V = torch.tensor(load_digits().data[:400])
    V = {"digits": V + 0.1, "transposed": (V + 0.1).T.contiguous(), "thresholded": V * (V > 5)}[which]
    W, H = initialize(V, 8, method, generator=0)
    for sparse in (V.to_sparse_csr(), V.to_sparse()):
        W_sparse, H_sparse = initialize(sparse, 8, method, generator=0)
        assert_close(W_sparse, W, rtol=0, atol=1e-10)
        assert_close(H_sparse, H, rtol=0, atol=1e-10)
