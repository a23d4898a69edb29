import warnings

import pytest
import torch
from torch.testing import assert_close

from conftest import low_rank
from torchnmf.init import initialize
from torchnmf.nmf import NMF
from torchnmf.restarts import Restarts, fit_restarts
from torchnmf.solvers.penalty import Penalty
from torchnmf.solvers.problem import BatchedProblem
from torchnmf.targets import statistics

EXACT = dict(rtol=1e-10, atol=1e-10)


def planted(generator, n=24, c=18, rank=3, noise=0.05):
    V, _, _ = low_rank(n, c, rank, generator, noise=noise)
    return V


def starts(V, rank, count, seed=0):
    pairs = [initialize(V, rank, "random", generator=seed + k) for k in range(count)]
    return torch.stack([w for w, _ in pairs]), torch.stack([h for _, h in pairs])


def sequential(V, W0, H0, **fit):
    """Each member as its own NMF.fit from the same start."""
    models, n_iters = [], []
    for W, H in zip(W0, H0):
        model = NMF(W=W, H=H)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            n_iters.append(model.fit(V, **fit))
        models.append(model)
    return models, n_iters


def assert_members_equal(result, models, n_iters):
    assert result.n_iter == n_iters
    for k, model in enumerate(models):
        assert_close(result.W[k], model.W.detach(), **EXACT)
        assert_close(result.H[k], model.H.detach(), **EXACT)
        assert_close(torch.tensor(result.histories[k]), torch.tensor(model.loss_history), **EXACT)


def batched(V, W0, H0, **fit):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit_restarts(V, W0.shape[2], W=W0, H=H0, **fit)


CASES = [
    ("mu", 2), ("mu", 1), ("mu", 1.5), ("mu", 0.5), ("mu", 3),
    ("mu_extrapolated", 1), ("mu_extrapolated", 2),
    ("hals", 2),
]


@pytest.mark.parametrize("layout", ["dense", "sparse"])
@pytest.mark.parametrize("solver,beta", CASES)
def test_batched_equals_sequential(solver, beta, layout, generator):
    V = planted(generator)
    V[V < 0.3] = 0  # real zeros, so that the sparse target is sparse
    W0, H0 = starts(V, 3, 4)
    target = V.to_sparse() if layout == "sparse" else V
    fit = dict(beta=beta, tol=1e-5, max_iter=80, solver=solver)
    result = batched(target, W0, H0, **fit)
    models, n_iters = sequential(target, W0, H0, **fit)
    assert_members_equal(result, models, n_iters)
    # the starts are the caller's and stay untouched
    assert_close(W0, starts(V, 3, 4)[0], rtol=0, atol=0)


def test_itakura_saito_dense(generator):
    V = planted(generator) + 0.1
    W0, H0 = starts(V, 3, 3)
    fit = dict(beta=0, tol=1e-5, max_iter=60, solver="mu")
    result = batched(V, W0, H0, **fit)
    assert_members_equal(result, *sequential(V, W0, H0, **fit))


@pytest.mark.parametrize("layout", ["dense", "sparse"])
@pytest.mark.parametrize("solver,beta", [("mu", 1), ("mu", 2), ("mu_extrapolated", 1.5), ("hals", 2)])
def test_batched_equals_sequential_masked(solver, beta, layout, generator):
    V = planted(generator)
    V[V < 0.3] = 0
    mask = torch.rand(V.shape, generator=generator) > 0.25
    W0, H0 = starts(V, 3, 3)
    target = V.to_sparse() if layout == "sparse" else V
    fit = dict(beta=beta, tol=1e-5, max_iter=60, solver=solver, mask=mask)
    result = batched(target, W0, H0, **fit)
    assert_members_equal(result, *sequential(target, W0, H0, **fit))


@pytest.mark.parametrize("solver,beta", [("mu", 1), ("hals", 2)])
def test_penalty_and_members_stop_on_their_own(solver, beta, generator):
    V = planted(generator, n=30, c=20)
    W0, H0 = starts(V, 4, 6)
    fit = dict(beta=beta, tol=1e-3, max_iter=200, solver=solver, alpha=0.01, l1_ratio=0.5)
    result = batched(V, W0, H0, **fit)
    models, n_iters = sequential(V, W0, H0, **fit)
    assert_members_equal(result, models, n_iters)
    assert len(set(result.n_iter)) > 1, result.n_iter  # they did stop at different iterations
    assert all(result.converged)


def test_mixed_ranks_match_single_fits_from_the_same_seeds(generator):
    V = planted(generator)
    result = fit_restarts(V, [2, 3, 4], n_restarts=3, beta=1, tol=1e-4, max_iter=100, seed=7)
    assert result.ranks == [2] * 3 + [3] * 3 + [4] * 3
    assert result.seeds == [7, 8, 9] * 3
    for k, (rank, seed) in enumerate(zip(result.ranks, result.seeds)):
        W, H = initialize(V, rank, "random", generator=seed)
        model = NMF(W=W, H=H)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            n_iter = model.fit(V, beta=1, tol=1e-4, max_iter=100)
        assert n_iter == result.n_iter[k]
        assert_close(result.W[k], model.W.detach(), **EXACT)


def test_best_model_and_stacks(generator):
    V = planted(generator)
    result = fit_restarts(V, [2, 3], n_restarts=4, beta=2, max_iter=40, tol=0)
    assert isinstance(result, Restarts) and len(result) == 8
    best = result.best(rank=3)
    assert result.ranks[best] == 3
    assert float(result.losses[best]) == min(float(result.losses[i]) for i in result.members(3))
    model = result.model(best)
    assert isinstance(model, NMF) and model.rank == 3
    assert_close(model().detach(), result.H[best] @ result.W[best].T)
    # the model is a copy: fitting it further leaves the result alone
    before = result.W[best].clone()
    model.fit(V, beta=2, max_iter=5, tol=0)
    assert_close(result.W[best], before, rtol=0, atol=0)
    W, H = result.stacked(2)
    assert W.shape == (4, V.shape[1], 2) and H.shape == (4, V.shape[0], 2)
    # every history is non-increasing (multiplicative updates are monotone)
    for history in result.histories:
        assert all(b <= a * (1 + 1e-12) for a, b in zip(history, history[1:]))


def test_finished_members_are_left_out(generator, monkeypatch):
    """After a member stops, the statistics only ever see the others."""
    V = planted(generator)
    W0, H0 = starts(V, 3, 5)
    seen = []
    from torchnmf.targets.dense import DenseMatrixStats

    original = DenseMatrixStats.h_terms

    def spy(self, H, W, divergence=True):
        seen.append(H.shape[0])
        return original(self, H, W, divergence)

    monkeypatch.setattr(DenseMatrixStats, "h_terms", spy)
    result = batched(V, W0, H0, beta=2, tol=1e-3, max_iter=300)
    assert len(set(result.n_iter)) > 1
    assert seen[0] == 5 and min(seen) < 5
    # the work done is the sum of the members' iterations, not 5 x the longest
    assert sum(seen) <= sum(result.n_iter) + 5 * len(set(result.n_iter))


def test_stats_give_one_divergence_per_member(generator):
    V = planted(generator)
    W0, H0 = starts(V, 3, 4)
    for beta in (2, 1, 0.5):
        stats = statistics(V, beta)
        stacked = stats.divergence(H0, W0)
        assert stacked.shape == (4,)
        for k in range(4):
            assert_close(stacked[k], torch.as_tensor(statistics(V, beta).divergence(H0[k], W0[k]),
                                                    dtype=torch.float64), **EXACT)
    problem = BatchedProblem(statistics(V, 2), H0, W0, 2.0, penalty_H=Penalty(0.1, 0.5))
    assert_close(problem.penalty()[1], torch.tensor(Penalty(0.1, 0.5).value(H0[1]), dtype=torch.float64))


def test_real_data_digits_batched_equals_sequential():
    datasets = pytest.importorskip("sklearn.datasets")
    V = torch.tensor(datasets.load_digits().data[:80], dtype=torch.float64)
    W0, H0 = starts(V, 5, 3)
    fit = dict(beta=1, tol=1e-4, max_iter=40, solver="mu_extrapolated")
    result = batched(V, W0, H0, **fit)
    assert_members_equal(result, *sequential(V, W0, H0, **fit))


def test_float32_runs_and_keeps_dtype(generator):
    V = planted(generator).float()
    result = fit_restarts(V, 3, n_restarts=2, beta=1, max_iter=20, tol=0)
    assert result.W[0].dtype == torch.float32


def test_errors(generator):
    V = planted(generator)
    W0, H0 = starts(V, 3, 2)
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        fit_restarts(V, 0)
    with pytest.raises(ValueError, match="rank must not repeat a value"):
        fit_restarts(V, [2, 2])
    with pytest.raises(ValueError, match="n_restarts must be a positive integer"):
        fit_restarts(V, 2, n_restarts=0)
    with pytest.raises(ValueError, match="W and H must be given together"):
        fit_restarts(V, 3, W=W0)
    with pytest.raises(ValueError, match=r"H must have shape \(K, 24, 3\)"):
        fit_restarts(V, 3, W=W0, H=H0[:, :5])
    with pytest.raises(ValueError, match="solver='hals' supports beta=2 only"):
        fit_restarts(V, 3, beta=1, solver="hals")
    with pytest.raises(ValueError, match="V must be a matrix"):
        fit_restarts(V.reshape(2, 12, 18), 3)
    with pytest.raises(ValueError, match="member must be an index below 2"):
        fit_restarts(V, 3, n_restarts=2, max_iter=2, tol=0).model(5)
    with pytest.raises(ValueError, match=r"rank must be one of \[3\], got 4"):
        fit_restarts(V, 3, n_restarts=2, max_iter=2, tol=0).best(rank=4)
    negative = V.clone()
    negative[0, 0] = -1
    with pytest.raises(ValueError, match="non-negative"):
        fit_restarts(negative, 3)


def test_docstring_examples_run():
    import doctest

    import torchnmf.consensus
    import torchnmf.restarts

    for module in (torchnmf.restarts, torchnmf.consensus):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            failures, tried = doctest.testmod(module)
        assert tried > 0 and failures == 0, module.__name__


@pytest.mark.parametrize("solver", ["mu", "mu_extrapolated"])
def test_padded_ranks_equal_grouped_ranks(solver, generator):
    V = planted(generator)
    fit = dict(n_restarts=3, beta=1, tol=1e-4, max_iter=60, solver=solver, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grouped = fit_restarts(V, [2, 4], **fit)
        padded = fit_restarts(V, [2, 4], rank_layout="padded", **fit)
    assert padded.ranks == grouped.ranks and padded.seeds == grouped.seeds
    assert padded.n_iter == grouped.n_iter
    for k in range(len(grouped)):
        assert padded.W[k].shape == grouped.W[k].shape
        assert_close(padded.W[k], grouped.W[k], **EXACT)
        assert_close(padded.H[k], grouped.H[k], **EXACT)
    with pytest.raises(ValueError, match="rank_layout='padded' needs a multiplicative solver"):
        fit_restarts(V, [2, 3], beta=2, solver="hals", rank_layout="padded")
    with pytest.raises(ValueError, match=r"rank_layout must be one of \['grouped', 'padded'\], got 'x'"):
        fit_restarts(V, [2, 3], rank_layout="x")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_members_refused_at_the_rounding_floor_stop_as_converged(dtype, generator):
    # near an exact fit a member whose iteration rounding raised goes back to where that
    # iteration started and stops as converged, as one fit does (RoundingGuard); the
    # iteration counts differ from the single fits' (the floor is rounding), the rule not
    V, _, _ = low_rank(30, 20, 3, generator, dtype=dtype)
    W0, H0 = starts(V, 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConvergenceWarning: every member converged
        result = fit_restarts(V, 3, W=W0, H=H0, beta=2, tol=1e-30, max_iter=3000, solver="hals")
    _, n_iters = sequential(V, W0, H0, beta=2, tol=1e-30, max_iter=3000, solver="hals")
    assert all(n < 3000 for n in n_iters + result.n_iter) and all(result.converged)
    for k, history in enumerate(result.histories):
        assert len(history) == result.n_iter[k] + 1
        assert history[-1] == history[-2]  # the refused iteration did not move
        residual = result.H[k].double() @ result.W[k].double().T - V.double()
        assert history[-1] == pytest.approx(float(0.5 * residual.pow(2).sum()), rel=0.01)


@pytest.mark.parametrize("shape", [(1, 4), (4, 1)])
def test_sparse_members_of_a_single_row_or_column(shape, generator):
    # beta not in {1, 2} on a sparse target: the reconstruction's work buffer held one
    # row block, of fewer rows than members, and the batched power product failed
    # inside torch ("shape '[3, 1, 4]' is invalid for input of size 4")
    V = torch.rand(shape, generator=generator, dtype=torch.float64) + 0.1
    W0, H0 = starts(V, 2, 3)
    fit = dict(beta=1.5, tol=0, max_iter=5)
    result = batched(V.to_sparse(), W0, H0, **fit)
    models, n_iters = sequential(V, W0, H0, **fit)
    assert_members_equal(result, models, n_iters)
