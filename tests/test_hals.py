import warnings

import pytest
import torch
from torch.testing import assert_close

from conftest import unchanged, low_rank
from torchnmf.solvers.hals import hals_update_, masked_hals_update_, max_inner_sweeps
from torchnmf.solvers.hals import HALS
from torchnmf.solvers.problem import FitProblem
from torchnmf.solvers.registry import get_solver
from torchnmf.targets.dense import DenseMatrixStats
from torchnmf.solvers.penalty import Penalty
from torchnmf.init import initialize
from torchnmf.metrics import euclidean
from torchnmf.nmf import NMF, NMFD


def subproblem(X, A, G, penalty):
    """0.5 tr(X G X^T) - tr(X^T A) + penalty(X), the objective one HALS update minimises."""
    return float(0.5 * (X @ G * X).sum() - (X * A).sum()) + penalty.value(X)


def naive_sweep(X, A, G, penalty):
    X = X.clone()
    for k in range(X.shape[1]):
        others = X @ G[:, k] - X[:, k] * G[k, k]
        X[:, k] = ((A[:, k] - penalty.l1 - others) / (G[k, k] + penalty.l2)).clamp(min=0)
    return X


def random_subproblem(generator, m=15, r=4):
    W = torch.rand(9, r, generator=generator, dtype=torch.float64)
    V = torch.rand(m, 9, generator=generator, dtype=torch.float64)
    X = torch.rand(m, r, generator=generator, dtype=torch.float64)
    return X, V @ W, W.T @ W


@pytest.mark.parametrize("penalty", [Penalty(), Penalty(0.3, 0.5), Penalty(0.2, 1.0), Penalty(0.5, 0.0)])
def test_one_sweep_matches_naive_reference(penalty, generator):
    X, A, G = random_subproblem(generator)
    expected = naive_sweep(X, A, G, penalty)
    hals_update_(X, A, G, penalty, max_sweeps=1)
    assert_close(X, expected)


def test_sweeps_never_increase_the_subproblem_and_converge(generator):
    X, A, G = random_subproblem(generator)
    penalty = Penalty(0.1, 0.3)
    values = [subproblem(X, A, G, penalty)]
    for _ in range(300):
        hals_update_(X, A, G, penalty, max_sweeps=1)
        values.append(subproblem(X, A, G, penalty))
    diffs = torch.tensor(values).diff()
    assert (diffs <= 1e-12 * abs(values[0])).all()
    # the fixed point satisfies the KKT conditions: gradient >= 0, = 0 where X > 0
    gradient = X @ G - A + penalty.l1 + penalty.l2 * X
    assert (gradient > -1e-8).all()
    assert_close(gradient[X > 1e-10], torch.zeros_like(gradient[X > 1e-10]), atol=1e-8, rtol=0)


def test_inner_repetitions_stop_on_delta(generator):
    X, A, G = random_subproblem(generator)
    assert hals_update_(X.clone(), A, G, Penalty(), max_sweeps=50, delta=0.5) < 50
    assert hals_update_(X.clone(), A, G, Penalty(), max_sweeps=7, delta=0.0) == 7


def test_max_inner_sweeps():
    # rho = (M K R + K R^2) / (R (M R + overhead))
    assert max_inner_sweeps(100, 50, 5, alpha=0.5) == 1 + int(0.5 * (100 * 50 * 5 + 50 * 25) / (5 * 500))
    assert max_inner_sweeps(100, 50, 5, alpha=0) == 1
    assert max_inner_sweeps(100, 50, 5, 0.5, overhead=10**6) == 1


def test_floor_keeps_columns_alive(generator):
    X, A, G = random_subproblem(generator)
    A[:, 0] = -1.0  # column 0 would be all zero
    hals_update_(X, A, G, Penalty(), floor=1e-12)
    assert (X[:, 0] == 1e-12).all()


@pytest.mark.parametrize("alpha, l1_ratio", [(0, 0), (0.2, 0.5), (1.0, 1.0)])
def test_fit_objective_never_increases(alpha, l1_ratio, generator):
    V, _, _ = low_rank(30, 20, 3, generator, noise=0.2)
    model = NMF(V.shape, rank=4).double().initialize_(V, "random", generator=0)
    model.fit(V, beta=2, tol=0, max_iter=60, solver="hals", alpha=alpha, l1_ratio=l1_ratio)
    history = torch.tensor(model.loss_history, dtype=torch.float64)
    assert (history.diff() <= 1e-10 * history[0]).all()
    assert (model.W >= 0).all() and (model.H >= 0).all()


def test_reaches_near_zero_loss_on_exactly_low_rank(generator):
    V, _, _ = low_rank(40, 25, 3, generator)
    model = NMF(V.shape, rank=3).double().initialize_(V, "nndsvda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(V, beta=2, tol=0, max_iter=300, solver="hals")
    with torch.no_grad():
        loss = float(euclidean(model(), V))
    assert loss < 1e-10 * float(V.pow(2).sum())


def test_beats_mu_in_the_same_iterations(generator):
    V, _, _ = low_rank(40, 25, 4, generator, noise=0.3)
    W0, H0 = initialize(V, 4, "nndsvda")
    losses = {}
    for solver in ("mu", "hals"):
        model = NMF(W=W0, H=H0)
        model.fit(V, beta=2, tol=0, max_iter=30, solver=solver)
        losses[solver] = model.loss_history[-1]
    assert losses["hals"] < losses["mu"]


def test_penalised_fit_matches_long_mu_run(generator):
    V, _, _ = low_rank(12, 8, 2, generator, noise=0.1)
    W0, H0 = initialize(V, 2, "nndsvda")
    results = []
    for solver, iters in (("hals", 200), ("mu", 1500)):
        model = NMF(W=W0, H=H0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(V, beta=2, tol=0, max_iter=iters, solver=solver, alpha=0.5, l1_ratio=0.5)
        results.append(model.loss_history[-1])
    assert_close(results[0], results[1], rtol=1e-3, atol=0)
    assert results[0] <= results[1] * (1 + 1e-9)


def test_fixed_factor_untouched_and_reproducible(generator):
    V, _, _ = low_rank(20, 12, 2, generator, noise=0.1)
    W0, H0 = initialize(V, 2, "nndsvda")
    model = NMF(W=W0, H=H0, trainable_W=False)
    model.fit(V, beta=2, tol=0, max_iter=20, solver="hals")
    assert torch.equal(model.W.detach(), W0)
    again = NMF(W=W0, H=H0, trainable_W=False)
    again.fit(V, beta=2, tol=0, max_iter=20, solver="hals")
    assert torch.equal(model.H, again.H)


class SparseGramStats:
    """Beta=2 statistics from a sparse COO V, written only with sparse products."""

    def __init__(self, V):
        self.V = V
        self.constant = 0.5 * float(V._values().pow(2).sum())

    def h_terms(self, H, W):
        negative = self.V @ W
        gram_W = W.T @ W
        divergence = self.constant - float((H * negative).sum()) + 0.5 * float(((H.T @ H) * gram_W).sum())
        return negative, H @ gram_W, divergence

    def w_terms(self, H, W, divergence=False):
        terms = self.V.mT @ H, W @ (H.T @ H)
        return (*terms, self.divergence(H, W)) if divergence else terms

    def divergence(self, H, W):
        return self.h_terms(H, W)[2]


def test_hals_uses_only_the_statistics_interface(generator):
    V, _, _ = low_rank(20, 12, 3, generator)
    V = V * (torch.rand(V.shape, generator=generator, dtype=V.dtype) < 0.6)
    W0, H0 = initialize(V, 3, "nndsvda")
    results = []
    for stats in (DenseMatrixStats(V, 2), SparseGramStats(V.to_sparse())):
        problem = FitProblem(stats=stats, H=H0.clone(), W=W0.clone(), beta=2)
        solver = HALS(problem)
        history = [solver.step() for _ in range(15)]
        results.append((problem.H, problem.W, history))
    assert_close(results[0][0], results[1][0])
    assert_close(results[0][1], results[1][1])
    assert_close(results[0][2], results[1][2])


def test_errors(generator):
    V, _, _ = low_rank(12, 9, 2, generator)
    model = NMF(V.shape, rank=2).double()
    with unchanged(model, V), pytest.raises(ValueError, match=r"solver='hals' supports beta=2 only, got beta=1; use solver='mu'"):
        model.fit(V, beta=1, solver="hals")
    with unchanged(model, V), pytest.raises(ValueError, match=r"solver must be one of \['hals', 'mu', 'mu_extrapolated'\], got 'cd'"):
        model.fit(V, solver="cd")
    with unchanged(model, V), pytest.raises(TypeError, match="solver must be a string, got int"):
        model.fit(V, solver=1)
    with unchanged(model, V), pytest.raises(ValueError, match="supports beta=2 only, got beta=0.5"):
        get_solver("hals", 0.5)
    conv = NMFD((2, 3, 10), rank=2, T=3)
    with unchanged(conv), pytest.raises(NotImplementedError, match="solver='hals' supports the matrix model NMF only"):
        conv.fit(torch.rand(2, 3, 10), beta=2, solver="hals")


def test_fixed_components_stay_bit_identical(generator):
    V, _, _ = low_rank(20, 12, 3, generator, noise=0.1)
    W0, H0 = initialize(V, 3, "nndsvda")
    model = NMF(W=W0, H=H0)
    model.fit(V, beta=2, tol=0, max_iter=15, solver="hals", fixed_W=[1])
    assert torch.equal(model.W[:, 1].detach(), W0[:, 1])
    assert not torch.equal(model.W[:, 0].detach(), W0[:, 0])
    history = torch.tensor(model.loss_history, dtype=torch.float64)
    assert (history.diff() <= 1e-10 * history[0]).all()


# -- masked targets: weighted HALS ----------------------------------------------------
def masked_problem(generator, n=16, c=11, rank=3, hidden=0.3, noise=0.1):
    V, _, _ = low_rank(n, c, rank, generator, noise=noise)
    mask = torch.rand(n, c, generator=generator) > hidden
    mask[:, 0] = True
    mask[0, :] = True
    return V, mask


def masked_objective(V, mask, H, W):
    return 0.5 * float(((V - H @ W.T)[mask] ** 2).sum())


def naive_masked_sweep(X, Y, V, mask, penalty, floor):
    """Column by column, entry by entry, the exact minimiser from the full residual."""
    X = X.clone()
    M = mask.to(V.dtype)
    for k in range(X.shape[1]):
        for i in range(X.shape[0]):
            others = X[i] @ Y.T - X[i, k] * Y[:, k]
            numerator = (M[i] * (V[i] - others) * Y[:, k]).sum() - penalty.l1
            denominator = (M[i] * Y[:, k] ** 2).sum() + penalty.l2
            X[i, k] = max(float(numerator / denominator), floor)
    return X


@pytest.mark.parametrize("penalty", [Penalty(), Penalty(0.2, 0.5)])
def test_masked_sweep_matches_naive_reference(penalty, generator):
    V, mask = masked_problem(generator, n=7, c=6, rank=2, hidden=0.4)
    X = torch.rand(7, 3, generator=generator, dtype=V.dtype)
    Y = torch.rand(6, 3, generator=generator, dtype=V.dtype)
    expected = naive_masked_sweep(X, Y, V, mask, penalty, 1e-12)
    masked_hals_update_(X, Y, torch.where(mask, V, 0), mask.to(V.dtype), penalty, 1e-12)
    assert_close(X, expected)
    expected_t = naive_masked_sweep(Y, X, V.T, mask.T, penalty, 1e-12)
    masked_hals_update_(Y, X, torch.where(mask, V, 0).T, mask.T.to(V.dtype), penalty, 1e-12)
    assert_close(Y, expected_t)


@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_masked_hals_never_increases_the_masked_objective(alpha, generator):
    V, mask = masked_problem(generator)
    hidden = V.clone()
    hidden[~mask] = 1e3  # never read
    model = NMF(V.shape, rank=3).double()
    H0, W0 = model.H.detach().clone(), model.W.detach().clone()
    model.fit(hidden, beta=2, mask=mask, tol=0, max_iter=30, solver="hals", alpha=alpha)
    history = torch.tensor(model.loss_history, dtype=torch.float64)
    assert (history.diff() <= 1e-10 * history[0]).all()
    assert history[-1] < 0.2 * history[0]
    if alpha == 0:  # the objective counts observed entries only (hidden ones are huge)
        final = masked_objective(V, mask, model.H.detach(), model.W.detach())
        assert final <= model.loss_history[-1] * (1 + 1e-10)
        assert final > 0.5 * model.loss_history[-1]
    # the same start with MU reaches a worse masked objective in the same iterations
    mu = NMF(H=H0, W=W0)
    mu.fit(V, beta=2, mask=mask, tol=0, max_iter=30, alpha=alpha)
    assert model.loss_history[-1] < mu.loss_history[-1]


def test_masked_hals_recovers_hidden_entries(generator):
    V, mask = masked_problem(generator, n=30, c=20, rank=3, hidden=0.3, noise=0.0)
    W0, H0 = initialize(torch.where(mask, V, V[mask].mean()), 3, "nndsvda")
    model = NMF(W=W0, H=H0)
    model.fit(V, beta=2, mask=mask, tol=0, max_iter=300, solver="hals")
    predicted = model().detach()
    error = torch.linalg.vector_norm((predicted - V)[~mask]) / torch.linalg.vector_norm(V[~mask])
    assert error < 1e-3


def test_masked_hals_fixed_components_stay_bit_identical(generator):
    V, mask = masked_problem(generator)
    W0, H0 = initialize(torch.where(mask, V, 0), 3, "nndsvda")
    model = NMF(W=W0, H=H0)
    model.fit(V, beta=2, mask=mask, tol=0, max_iter=15, solver="hals", fixed_W=[1])
    assert torch.equal(model.W[:, 1].detach(), W0[:, 1])
    assert not torch.equal(model.W[:, 0].detach(), W0[:, 0])
    history = torch.tensor(model.loss_history, dtype=torch.float64)
    assert (history.diff() <= 1e-10 * history[0]).all()


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_masked_hals_sparse_equals_dense(layout, generator):
    V, mask = masked_problem(generator, n=8, c=6)
    V = V * (torch.rand(V.shape, generator=generator, dtype=V.dtype) > 0.4)  # real zeros
    sparse = V.to_sparse() if layout == "coo" else V.to_sparse_csr()
    copy = sparse.clone()
    dense_model = NMF(V.shape, rank=2).double()
    sparse_model = NMF(W=dense_model.W.detach(), H=dense_model.H.detach())
    dense_model.fit(V, beta=2, mask=mask, solver="hals", tol=0, max_iter=15, alpha=0.01)
    sparse_model.fit(sparse, beta=2, mask=mask, solver="hals", tol=0, max_iter=15, alpha=0.01)
    assert_close(sparse_model.W.detach(), dense_model.W.detach())
    assert_close(sparse_model.H.detach(), dense_model.H.detach())
    assert sparse_model.loss_history == pytest.approx(dense_model.loss_history, rel=1e-10)
    assert torch.equal(sparse.to_dense(), copy.to_dense())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numpy_and_torch_sweeps_agree(dtype):
    from torchnmf.solvers.hals import _numpy_sweep, _torch_sweep

    g = torch.Generator().manual_seed(3)
    columns = torch.rand(5, 40, generator=g, dtype=dtype)
    targets = torch.rand(40, 5, generator=g, dtype=dtype).T  # strided, as in hals_update_
    coupling = torch.rand(5, 5, generator=g, dtype=dtype) * 0.3
    coupling.diagonal().zero_()
    a, b = columns.clone(), columns.clone()
    _torch_sweep(a, targets, coupling, [0, 2, 3, 4], 1e-3)
    _numpy_sweep(b, targets, coupling, [0, 2, 3, 4], 1e-3)
    torch.testing.assert_close(a, b)
    assert torch.equal(a[1], columns[1])  # a column left out stays as it was
    assert not torch.equal(a, columns)


@pytest.mark.parametrize("delta", [0.0, 0.3, 0.9])
def test_device_sweeps_give_the_host_rule_without_read_backs(delta, generator, monkeypatch):
    """Off the CPU the inner sweeps' stopping rule stays on the device (no float per
    sweep); the factor equals the host rule's.  A stand-in refuses any read-back."""
    from torchnmf.solvers import hals

    V, _, _ = low_rank(30, 20, 4, generator, noise=0.2)
    H = torch.rand(30, 4, generator=generator, dtype=torch.float64)
    W = torch.rand(20, 4, generator=generator, dtype=torch.float64)
    numerator, gram = V @ W, W.T @ W
    host = H.clone()
    sweeps = hals_update_(host, numerator, gram, Penalty(), max_sweeps=6, delta=delta)
    assert 1 <= sweeps <= 6
    columns = H.T.contiguous()
    targets = numerator.T / gram.diagonal().unsqueeze(1)
    coupling = gram / gram.diagonal().unsqueeze(1)
    coupling.diagonal().zero_()

    def no_read_back(*args, **kwargs):
        raise AssertionError("a host read-back inside the sweeps")

    monkeypatch.setattr(torch.Tensor, "__float__", no_read_back)
    monkeypatch.setattr(torch.Tensor, "__bool__", no_read_back)
    monkeypatch.setattr(torch.Tensor, "item", no_read_back)
    hals._device_sweeps(columns, targets, coupling, list(range(4)), 0.0, 6, delta)
    monkeypatch.undo()
    assert_close(columns.T, host)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_hals_matches_cpu(generator):
    V, _, _ = low_rank(30, 20, 4, generator, noise=0.2)
    H = torch.rand(30, 4, generator=generator, dtype=torch.float64)
    W = torch.rand(20, 4, generator=generator, dtype=torch.float64)
    host = H.clone()
    hals_update_(host, V @ W, W.T @ W, Penalty(), max_sweeps=6, delta=0.3)
    device = H.cuda()
    hals_update_(device, (V @ W).cuda(), (W.T @ W).cuda(), Penalty(), max_sweeps=6, delta=0.3)
    assert_close(device.cpu(), host)
