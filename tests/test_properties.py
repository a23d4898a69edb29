"""Property-based tests (hypothesis, derandomised and bounded): any shape, rank, beta,
dtype, target kind, solver and model."""
import warnings

import pytest
import torch
from torch.testing import assert_close

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from torchnmf.nmf import NMF, NMFD  # noqa: E402

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None)
BETAS = st.one_of(st.sampled_from([-1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0]),
                  st.floats(-1, 3, allow_nan=False).map(lambda b: round(b, 2)))
DTYPES = st.sampled_from([torch.float32, torch.float64])
# rounding of the objective's own value (not of V's), with room for a few operations
ROUNDING = {torch.float32: 64 * torch.finfo(torch.float32).eps,
            torch.float64: 64 * torch.finfo(torch.float64).eps}


@st.composite
def problems(draw):
    n = draw(st.integers(2, 9))
    c = draw(st.integers(2, 9))
    rank = draw(st.integers(1, 3))
    beta = draw(BETAS)
    dtype = draw(DTYPES)
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    V = torch.rand(n, c, generator=g, dtype=torch.float64) + 0.05
    if beta > 0 and draw(st.booleans()):
        V[torch.rand(n, c, generator=g) < 0.3] = 0
        V[:, 0] += 0.1  # every row keeps an entry
        V[0] += 0.1
    H0 = torch.rand(n, rank, generator=g, dtype=torch.float64) + 0.1
    W0 = torch.rand(c, rank, generator=g, dtype=torch.float64) + 0.1
    return V.to(dtype), W0.to(dtype), H0.to(dtype), beta


def _solvers(beta):
    return ["mu", "mu_extrapolated"] + (["hals"] if beta == 2 else [])


def _fit(V, W0, H0, beta, solver, **options):
    model = NMF(W=W0, H=H0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(V, beta=beta, tol=0, max_iter=15, solver=solver, **options)
    return model


@SETTINGS
@given(problems(), st.data())
def test_factors_and_objective(problem, data):
    V, W0, H0, beta = problem
    solver = data.draw(st.sampled_from(_solvers(beta)))
    copies = [t.clone() for t in (V, W0, H0)]
    model = _fit(V, W0, H0, beta, solver)
    for factor in (model.H, model.W):
        assert torch.isfinite(factor).all() and (factor >= 0).all()
    history = torch.tensor(model.loss_history, dtype=torch.float64)
    assert (history >= 0).all() and torch.isfinite(history).all()
    assert (history.diff() <= ROUNDING[V.dtype] * history[:-1]).all()
    for before, after in zip(copies, (V, W0, H0)):
        assert torch.equal(before, after)


@SETTINGS
@given(st.integers(2, 9), st.integers(2, 9), st.integers(1, 3), DTYPES,
       st.sampled_from(["dense", "sparse", "masked"]), st.integers(0, 2**16), st.data())
def test_objective_never_rises_at_an_exact_fit(n, c, rank, dtype, kind, seed, data):
    # V = H W^T exactly, fitted at its rank: the fit reaches the rounding floor of its
    # iterates, where only the rounding of the objective's value may show as a rise
    solver = data.draw(st.sampled_from(["hals", "mu", "mu_extrapolated"]))
    g = torch.Generator().manual_seed(seed)
    H = torch.rand(n, rank, generator=g, dtype=torch.float64) + 0.1
    W = torch.rand(c, rank, generator=g, dtype=torch.float64) + 0.1
    V = (H @ W.T).to(dtype)
    W0 = (W * (torch.rand(c, rank, generator=g, dtype=torch.float64) + 0.5)).to(dtype)
    H0 = (H * (torch.rand(n, rank, generator=g, dtype=torch.float64) + 0.5)).to(dtype)
    options = {"mask": torch.ones(V.shape, dtype=torch.bool)} if kind == "masked" else {}
    model = NMF(W=W0, H=H0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(V.to_sparse() if kind == "sparse" else V, beta=2, tol=0, max_iter=150,
                  solver=solver, **options)
    history = torch.tensor(model.loss_history, dtype=torch.float64)
    assert (history >= 0).all() and torch.isfinite(history).all()
    assert (history.diff() <= ROUNDING[dtype] * history[:-1]).all()


@SETTINGS
@given(problems(), st.data())
def test_dense_sparse_and_fully_observed_mask_agree(problem, data):
    V, W0, H0, beta = problem
    solver = data.draw(st.sampled_from(_solvers(beta)))
    dense = _fit(V, W0, H0, beta, solver)
    others = [_fit(V, W0, H0, beta, solver, mask=torch.ones(V.shape, dtype=torch.bool))]
    if beta > 0:
        others.append(_fit(V.to_sparse(), W0, H0, beta, solver))
    tolerance = dict(rtol=1e-3, atol=1e-5) if V.dtype == torch.float32 else dict(rtol=1e-7, atol=1e-10)
    for other in others:
        assert_close(other().detach(), dense().detach(), **tolerance)


@SETTINGS
@given(st.integers(1, 2), st.integers(2, 3), st.integers(1, 3), BETAS, DTYPES,
       st.sampled_from(["mu", "mu_extrapolated"]), st.integers(0, 2**16))
def test_convolutional_model(batch, channels, T, beta, dtype, solver, seed):
    g = torch.Generator().manual_seed(seed)
    V = (torch.rand(batch, channels, 8, generator=g, dtype=torch.float64) + 0.05).to(dtype)
    copy = V.clone()
    model = NMFD(V.shape, rank=2, T=T).to(dtype)
    with torch.no_grad():
        model.H.copy_(torch.rand(model.H.shape, generator=g, dtype=torch.float64) + 0.1)
        model.W.copy_(torch.rand(model.W.shape, generator=g, dtype=torch.float64) + 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(V, beta=beta, tol=0, max_iter=10, solver=solver)
    assert torch.equal(V, copy)
    for factor in (model.H, model.W):
        assert torch.isfinite(factor).all() and (factor >= 0).all()
    history = torch.tensor(model.loss_history, dtype=torch.float64)
    assert (history >= 0).all()
    assert (history.diff() <= ROUNDING[dtype] * history[:-1]).all()
