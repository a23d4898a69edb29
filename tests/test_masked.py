import pytest
import torch
from torch.testing import assert_close

from conftest import unchanged, low_rank
from torchnmf.solvers import mu, registry
from torchnmf.targets.masked import MaskedAutogradStats, MaskedMatrixStats
from torchnmf.targets.prepare import prepare_target
from torchnmf.targets.dense import DenseMatrixStats
from torchnmf.metrics import beta_div
from torchnmf.nmf import NMF, NMF2D, NMFD

BETAS = [0, 0.5, 1, 1.5, 2, 3]


def masked_problem(generator, n=14, c=10, rank=3, hidden=0.3, dtype=torch.float64):
    V, _, _ = low_rank(n, c, rank, generator, dtype=dtype, noise=0.3)
    V = V + 0.05
    mask = torch.rand(n, c, generator=generator) > hidden
    mask[:, 0] = True  # every row and column keeps an observed entry
    mask[0, :] = True
    return V, mask


def naive_masked_mu_step(V, M, H, W, beta, gamma):
    """One textbook masked multiplicative update of H then W from the full reconstruction."""
    M = M.to(V.dtype)
    WH = H @ W.T
    H = H * ((M * V * WH ** (beta - 2)) @ W / ((M * WH ** (beta - 1)) @ W)) ** gamma
    WH = H @ W.T
    W = W * ((M * V * WH ** (beta - 2)).T @ H / ((M * WH ** (beta - 1)).T @ H)) ** gamma
    return H, W


def naive_masked_divergence(V, M, H, W, beta):
    return beta_div((H @ W.T)[M], V[M], beta)


# -- the reference ------------------------------------------------------------------
@pytest.mark.parametrize("beta,gamma", [(0, 0.5), (0.5, 1 / 1.5), (1, 1), (1.5, 1), (2, 1), (3, 0.5)])
def test_masked_fit_matches_naive_reference(beta, gamma, generator):
    V, mask = masked_problem(generator)
    model = NMF(V.shape, rank=3).double()
    H, W = model.H.detach().clone(), model.W.detach().clone()
    model.fit(V, beta=beta, max_iter=6, tol=0, mask=mask)
    for _ in range(6):
        H, W = naive_masked_mu_step(V, mask, H, W, beta, gamma)
    assert_close(model.H.detach(), H)
    assert_close(model.W.detach(), W)
    expected = naive_masked_divergence(V, mask, H, W, beta)
    assert model.loss_history[-1] == pytest.approx(float(expected), rel=1e-9)


@pytest.mark.parametrize("beta", BETAS)
def test_closed_form_and_autograd_masked_paths_agree(beta, generator):
    V, mask = masked_problem(generator)
    V = torch.where(mask, V, 0)
    model = NMF(V.shape, rank=3).double()
    H, W = model.H.detach(), model.W.detach()
    closed = MaskedMatrixStats(V, mask, beta, block_elements=35)  # several row blocks
    generic = MaskedAutogradStats(V, mask, beta, NMF.reconstruct)
    neg_a, pos_a, div_a = closed.h_terms(H, W)
    neg_b, pos_b, div_b = generic.h_terms(H, W)
    assert_close(neg_a, neg_b)
    assert_close(pos_a, pos_b)
    assert float(div_a) == pytest.approx(float(div_b), rel=1e-10)
    assert float(closed.divergence(H, W)) == pytest.approx(float(div_b), rel=1e-10)
    for a, b in zip(closed.w_terms(H, W), generic.w_terms(H, W)):
        assert_close(a, b)


@pytest.mark.parametrize("beta", [0.5, 1, 2])
def test_full_mask_equals_dense_statistics(beta, generator):
    V, _ = masked_problem(generator)
    mask = torch.ones(V.shape, dtype=torch.bool)
    model = NMF(V.shape, rank=3).double()
    H, W = model.H.detach(), model.W.detach()
    masked, dense = MaskedMatrixStats(V, mask, beta), DenseMatrixStats(V, beta)
    neg_a, pos_a, div_a = masked.h_terms(H, W)
    neg_b, pos_b, div_b = dense.h_terms(H, W)
    assert_close(neg_a, neg_b.clone())
    assert_close(pos_a, pos_b.expand_as(pos_a).clone())
    assert float(div_a) == pytest.approx(float(div_b), rel=1e-10)


# -- properties ----------------------------------------------------------------------
@pytest.mark.parametrize("beta", BETAS)
def test_masked_objective_never_increases(beta, generator):
    V, mask = masked_problem(generator)
    model = NMF(V.shape, rank=3).double()
    model.fit(V, beta=beta, max_iter=40, tol=0, mask=mask, alpha=0.05, l1_ratio=0.5)
    history = torch.tensor(model.loss_history, dtype=torch.float64)
    assert ((history[1:] - history[:-1]) <= 1e-10 * history[:-1].abs()).all()
    assert history[-1] < history[0]
    assert (model.W >= 0).all() and (model.H >= 0).all()


def test_hidden_values_are_never_read(generator):
    V, mask = masked_problem(generator)
    garbage = V.clone()
    garbage[~mask] = torch.rand(int((~mask).sum()), generator=generator, dtype=V.dtype) * 1e6
    a = NMF(V.shape, rank=3).double()
    b = NMF(V.shape, W=a.W.detach(), H=a.H.detach())
    a.fit(V, beta=1, max_iter=5, tol=0, mask=mask)
    b.fit(garbage, beta=1, max_iter=5, tol=0, mask=mask)
    assert torch.equal(a.W.detach(), b.W.detach())


def test_nan_as_missing_equals_mask(generator):
    V, mask = masked_problem(generator)
    with_nan = V.clone()
    with_nan[~mask] = float("nan")
    copy = with_nan.clone()
    a = NMF(V.shape, rank=3).double()
    W0, H0 = a.W.detach().clone(), a.H.detach().clone()
    b = NMF(V.shape, W=W0, H=H0)
    a.fit(V, beta=1.5, max_iter=5, tol=0, mask=mask)
    b.fit(with_nan, beta=1.5, max_iter=5, tol=0, missing="mask")
    assert torch.equal(a.W.detach(), b.W.detach()) and torch.equal(a.H.detach(), b.H.detach())
    assert torch.equal(with_nan.isnan(), copy.isnan())  # the caller's tensor is untouched
    # NaN behind a mask is fine without opting in, and mask and NaN combine
    c = NMF(V.shape, W=W0, H=H0)
    c.fit(with_nan, beta=1.5, max_iter=5, tol=0, mask=mask)
    assert torch.equal(a.W.detach(), c.W.detach())


def test_planted_low_rank_hidden_entries_are_predicted(generator):
    V, _, _ = low_rank(40, 30, 3, generator)
    hidden = torch.rand(V.shape, generator=generator) < 0.3
    torch.manual_seed(0)
    model = NMF(V.shape, rank=3).double()
    model.fit(V, beta=2, max_iter=1000, tol=0, mask=~hidden)
    prediction = model().detach()
    error = (prediction - V)[hidden].norm() / V[hidden].norm()
    assert error < 0.02, error
    # the plain fit, which treats the hidden entries as zeros, is far off
    plain = NMF(V.shape, rank=3).double()
    plain.fit(torch.where(hidden, 0, V), beta=2, max_iter=200, tol=0)
    assert (plain().detach() - V)[hidden].norm() / V[hidden].norm() > 0.3


@pytest.mark.parametrize("beta", [1])
def test_planted_hidden_entries_kl(beta, generator):
    V, _, _ = low_rank(30, 24, 2, generator)
    hidden = torch.rand(V.shape, generator=generator) < 0.3
    torch.manual_seed(1)
    model = NMF(V.shape, rank=2).double()
    model.fit(V, beta=beta, max_iter=800, tol=0, mask=~hidden)
    error = (model().detach() - V)[hidden].norm() / V[hidden].norm()
    assert error < 0.03, error


@pytest.mark.parametrize("cls,shape,kw", [(NMFD, (3, 4, 16), dict(T=3)), (NMF2D, (2, 3, 7, 6), dict(kernel_size=2))])
@pytest.mark.parametrize("beta", [0.5, 1, 2])
def test_convolutional_masked_fit(cls, shape, kw, beta, generator):
    V = torch.rand(shape, generator=generator, dtype=torch.float64) + 0.1
    mask = torch.rand(shape, generator=generator) > 0.3
    model = cls(shape, rank=2, **kw).double()
    garbage = torch.where(mask, V, torch.full_like(V, float("nan")))
    model.fit(garbage, beta=beta, max_iter=15, tol=0, missing="mask")
    history = torch.tensor(model.loss_history)
    assert (history[1:] <= history[:-1] * (1 + 1e-10)).all() and history[-1] < history[0]
    expected = beta_div(model().detach()[mask], V[mask], beta)
    assert model.loss_history[-1] == pytest.approx(float(expected), rel=1e-9)


def test_nmfd_t1_masked_equals_nmf_masked(generator):
    V, mask = masked_problem(generator)
    nmf = NMF(V.shape, rank=3).double()
    nmfd = NMFD(V.shape + (1,), T=1, W=nmf.W.detach()[:, :, None], H=nmf.H.detach()[:, :, None])
    nmf.fit(V, beta=1, max_iter=8, tol=0, mask=mask)
    nmfd.fit(V[:, :, None], beta=1, max_iter=8, tol=0, mask=mask[:, :, None])
    assert_close(nmfd.W.detach()[:, :, 0], nmf.W.detach())
    assert nmfd.loss_history == pytest.approx(nmf.loss_history, rel=1e-9)


def test_float32_masked_fit_stays_float32(generator):
    V, mask = masked_problem(generator, dtype=torch.float32)
    model = NMF(V.shape, rank=3)
    model.fit(V, beta=1, max_iter=10, tol=0, mask=mask)
    assert model.W.dtype == torch.float32
    assert model.loss_history[-1] < model.loss_history[0]


# -- bad input -----------------------------------------------------------------------
def test_mask_errors(generator):
    V, mask = masked_problem(generator, n=6, c=5)
    model = NMF(V.shape, rank=2).double()
    with unchanged(model, V, mask), pytest.raises(ValueError, match=r"mask must have the shape of V \(6, 5\), got \(5, 6\)"):
        model.fit(V, mask=mask.T)
    with unchanged(model, V, mask), pytest.raises(TypeError, match=r"mask must be a boolean tensor \(True = observed\), got dtype torch.float32"):
        model.fit(V, mask=mask.float())
    with unchanged(model, V, mask), pytest.raises(TypeError, match="mask must be a boolean torch.Tensor"):
        model.fit(V, mask=mask.numpy())
    empty_row = mask.clone()
    empty_row[3] = False
    with unchanged(model, V, mask), pytest.raises(ValueError, match="mask leaves row 3 of V with no observed entry"):
        model.fit(V, mask=empty_row)
    empty_col = mask.clone()
    empty_col[:, 2] = False
    empty_col[:, 4] = False
    with unchanged(model, V, mask), pytest.raises(ValueError, match="mask leaves column 2, 4 of V with no observed entry"):
        model.fit(V, mask=empty_col)
    nan_row = V.clone()
    nan_row[1] = float("nan")
    with unchanged(model, V, mask), pytest.raises(ValueError, match="mask leaves row 1 of V"):
        model.fit(nan_row, missing="mask")
    with unchanged(model, V, mask), pytest.raises(ValueError, match=r"V contains NaN \(6 entries\); pass missing='mask'"):
        model.fit(_nan_diag(V))
    with unchanged(model, V, mask), pytest.raises(ValueError, match="V contains NaN at 1 observed entries; pass missing='mask'"):
        bad = V.clone()
        bad[0, 0] = float("nan")
        model.fit(bad, mask=mask)
    with unchanged(model, V, mask), pytest.raises(ValueError, match="missing must be one of"):
        model.fit(V, missing="drop")
    negative = V.clone()
    negative[~mask] = -5  # hidden: fine
    model.fit(negative, mask=mask, max_iter=2, tol=0)
    negative[0, 0] = -1
    with unchanged(model, V, mask), pytest.raises(ValueError, match="V must be non-negative"):
        model.fit(negative, mask=mask)
    zeros = V.clone()
    zeros[~mask] = 0  # hidden zeros do not matter for beta <= 0
    model.fit(zeros, beta=0, mask=mask, max_iter=2, tol=0)
    zeros[0, 0] = 0
    with unchanged(model, V, mask), pytest.raises(ValueError, match="beta=0 needs a strictly positive V"):
        model.fit(zeros, beta=0, mask=mask)
    with unchanged(model, V, mask), pytest.raises(ValueError, match="beta=0 cannot be used with a sparse V"):
        model.fit(V.to_sparse(), beta=0, mask=mask)
    with unchanged(model, V, mask), pytest.raises(ValueError, match=r"mask must have the shape of V \(6, 5\), got \(5, 6\)"):
        model.fit(V.to_sparse(), mask=mask.T)
    with unchanged(model, V, mask), pytest.raises(ValueError, match="mask leaves row 3 of V with no observed entry"):
        model.fit(V.to_sparse_csr(), mask=empty_row)
    sparse_nan = V.clone()
    sparse_nan[0, 0] = float("nan")
    with unchanged(model, V, mask), pytest.raises(ValueError, match="V contains NaN at 1 observed entries; pass missing='mask'"):
        model.fit(sparse_nan.to_sparse(), mask=mask)
    negative[0, 0] = -1
    with unchanged(model, V, mask), pytest.raises(ValueError, match="V must be non-negative"):
        model.fit(negative.to_sparse(), mask=mask)


def _nan_diag(V):
    bad = V.clone()
    bad[torch.arange(5), torch.arange(5)] = float("nan")
    bad[5, 0] = float("nan")
    return bad


def test_fixed_rows_or_columns_may_be_unobserved(generator):
    V, mask = masked_problem(generator, n=6, c=5)
    mask[:, 3] = False
    model = NMF(V.shape, rank=2, trainable_W=False).double()
    model.fit(V, mask=mask, max_iter=3, tol=0)  # W is fixed: its empty column is harmless


def test_solver_without_mask_support_is_refused(generator, monkeypatch):
    class Plain(mu.MultiplicativeUpdates):
        features = frozenset()

    monkeypatch.setitem(registry.SOLVERS, "plain", Plain)
    V, mask = masked_problem(generator, n=6, c=5)
    model = NMF(V.shape, rank=2).double()
    with pytest.raises(NotImplementedError, match="solver='plain' does not support masked targets"):
        model.fit(V, mask=mask, solver="plain")
    model.fit(V, solver="plain", max_iter=2, tol=0)


def test_prepare_target_returns_none_for_a_full_mask(generator):
    V, _ = masked_problem(generator, n=6, c=5)
    full = torch.ones(V.shape, dtype=torch.bool)
    out, mask = prepare_target(V, full)
    assert mask is None and torch.equal(out, V)
    out, mask = prepare_target(V, None, "mask")
    assert mask is None


# -- sparse targets with a mask --------------------------------------------------------
def _sparse_masked_problem(generator):
    V, mask = masked_problem(generator)
    V = V * (torch.rand(V.shape, generator=generator, dtype=V.dtype) < 0.6)  # real zeros
    return V, mask


@pytest.mark.parametrize("layout", ["coo", "csr", "csc"])
@pytest.mark.parametrize("beta", [0.5, 1, 2])
def test_masked_sparse_equals_masked_dense(beta, layout, generator):
    V, mask = _sparse_masked_problem(generator)
    sparse = {"coo": V.to_sparse, "csr": V.to_sparse_csr, "csc": V.to_sparse_csc}[layout]()
    sparse_before, mask_before = sparse.clone(), mask.clone()
    dense_model = NMF(V.shape, rank=3).double()
    sparse_model = NMF(H=dense_model.H.detach().clone(), W=dense_model.W.detach().clone())
    dense_model.fit(V, beta=beta, max_iter=15, tol=0, mask=mask)
    sparse_model.fit(sparse, beta=beta, max_iter=15, tol=0, mask=mask)
    assert_close(sparse_model.H, dense_model.H, rtol=1e-10, atol=1e-12)
    assert_close(sparse_model.W, dense_model.W, rtol=1e-10, atol=1e-12)
    assert_close(torch.tensor(sparse_model.loss_history), torch.tensor(dense_model.loss_history),
                 rtol=1e-10, atol=1e-10)
    assert dense_model.loss_history[-1] < dense_model.loss_history[0]
    assert torch.equal(sparse.to_dense(), sparse_before.to_dense())  # the caller's tensors
    assert torch.equal(mask, mask_before)


@pytest.mark.parametrize("beta", [0.5, 1, 2])
def test_masked_sparse_statistics_in_row_blocks(beta, generator):
    V, mask = _sparse_masked_problem(generator)
    V = torch.where(mask, V, 0)
    H = torch.rand(V.shape[0], 3, generator=generator, dtype=V.dtype)
    W = torch.rand(V.shape[1], 3, generator=generator, dtype=V.dtype)
    dense = MaskedMatrixStats(V, mask, beta)
    blocked = MaskedMatrixStats(V.to_sparse_csr(), mask, beta, block_elements=35)
    assert blocked.rows == 3 and blocked.source.buffer.shape == (3, V.shape[1])
    for got, expected in zip(blocked.h_terms(H, W), dense.h_terms(H, W)):
        assert_close(got, expected)
    for got, expected in zip(blocked.w_terms(H, W), dense.w_terms(H, W)):
        assert_close(got, expected)
    assert_close(blocked.divergence(H, W), naive_masked_divergence(V, mask, H, W, beta))


def test_sparse_nan_and_sparse_mask(generator):
    V, mask = _sparse_masked_problem(generator)
    with_nan = V.clone()
    with_nan[~mask] = float("nan")
    sparse_nan = with_nan.to_sparse()
    before = sparse_nan.clone()
    start = NMF(V.shape, rank=3).double()
    reference = NMF(H=start.H.detach().clone(), W=start.W.detach().clone())
    reference.fit(V, beta=1, max_iter=8, tol=0, mask=mask)
    for V_in, kw in ((sparse_nan, dict(missing="mask")), (V.to_sparse_csr(), dict(mask=mask.to_sparse()))):
        model = NMF(H=start.H.detach().clone(), W=start.W.detach().clone())
        model.fit(V_in, beta=1, max_iter=8, tol=0, **kw)
        assert_close(model.W, reference.W)
        assert_close(model.H, reference.H)
    assert torch.equal(sparse_nan.values().isnan(), before.values().isnan())


@pytest.mark.parametrize("solver,beta,block_rows", [
    ("mu", 0.5, None), ("mu", 0.5, 2), ("mu", 3, None), ("mu", 3, 2), ("hals", 2, None),
])
def test_hidden_rows_of_a_held_factor_do_not_steer_the_fit(solver, beta, block_rows, generator):
    # rows hidden by the mask (their H held) equal a fit of the observed rows alone;
    # the start's mean reconstruction, against the data's to bring a far-off start to
    # its scale, counted the hidden rows (here 1e9), so the two fits started apart
    V = torch.rand(6, 5, generator=generator, dtype=torch.float64) + 0.1
    W0 = torch.rand(5, 2, generator=generator, dtype=torch.float64)
    H0 = torch.rand(6, 2, generator=generator, dtype=torch.float64)
    H0[0] = 1e9
    observed = torch.ones(V.shape, dtype=torch.bool)
    observed[0] = False
    options = dict(beta=beta, solver=solver, tol=0, max_iter=5)
    masked = NMF(W=W0, H=H0, trainable_H=False)
    masked.fit(V, mask=observed, block_rows=block_rows, **options)
    alone = NMF(W=W0, H=H0[1:], trainable_H=False)
    alone.fit(V[1:], **options)
    assert_close(masked.W.detach(), alone.W.detach(), rtol=1e-9, atol=0)
    assert_close(torch.tensor(masked.loss_history), torch.tensor(alone.loss_history), rtol=1e-9, atol=0)
