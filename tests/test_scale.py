"""Scale equivariance: fitting c * V gives c times the fit of V, at any usable scale."""
import warnings

import pytest
import torch
from torch.testing import assert_close

from conftest import low_rank
from torchnmf.init import initialize
from torchnmf.nmf import NMF, NMFD
from torchnmf.solvers.scaling import scaled_penalty, target_scale
from torchnmf.solvers.penalty import Penalty

SCALES = {torch.float64: [1e-100, 3e-30, 1e-6, 7e5, 1e100], torch.float32: [1e-15, 3e-7, 1e6, 1e15]}
CASES = [(dtype, c) for dtype, scales in SCALES.items() for c in scales]
TOL = {torch.float64: dict(rtol=1e-7, atol=0), torch.float32: dict(rtol=1e-2, atol=0)}


def _problem(dtype, generator, n=24, c=16, rank=3):
    V, _, _ = low_rank(n, c, rank, generator, noise=0.2)
    V = (V + 0.05).to(dtype)
    W0, H0 = initialize(V, rank, "nndsvda")
    return V, W0, H0


def _fit(V, W0, H0, scale, kind, **options):
    model = NMF(W=W0.clone(), H=(H0 * scale).clone())
    target = scale * V
    if kind == "sparse":
        target = target.to_sparse()
    if kind == "masked":
        options["mask"] = torch.ones(V.shape, dtype=torch.bool)
        options["mask"][0, 0] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n_iter = model.fit(target, tol=0, max_iter=30, **options)
    return n_iter, model


@pytest.mark.parametrize("dtype,scale", CASES)
@pytest.mark.parametrize("solver,beta,kind", [
    ("mu", 2, "dense"), ("mu", 1, "dense"), ("mu", 0.5, "sparse"), ("mu", 3, "dense"),
    ("mu", 0, "dense"), ("mu", -1, "masked"), ("hals", 2, "dense"), ("hals", 2, "masked"),
    ("mu_extrapolated", 1, "sparse"), ("mu_extrapolated", 1.5, "masked"),
])
def test_fit_is_scale_equivariant(dtype, scale, solver, beta, kind, generator):
    V, W0, H0 = _problem(dtype, generator)
    _, reference = _fit(V, W0, H0, 1.0, kind, beta=beta, solver=solver)
    _, scaled = _fit(V, W0, H0, scale, kind, beta=beta, solver=solver)
    assert torch.isfinite(scaled.H).all() and torch.isfinite(scaled.W).all()
    assert_close(scaled().detach() / scale, reference().detach(), **TOL[dtype])
    history = torch.tensor(scaled.loss_history, dtype=torch.float64) / scale**beta
    assert_close(history, torch.tensor(reference.loss_history, dtype=torch.float64),
                 rtol=TOL[dtype]["rtol"] * 10, atol=0)


@pytest.mark.parametrize("k", [-60, 40])
def test_power_of_two_scales_give_identical_fits(k, generator):
    V, W0, H0 = _problem(torch.float64, generator)
    _, reference = _fit(V, W0, H0, 1.0, "dense", beta=1)
    _, scaled = _fit(V, W0, H0, 2.0**k, "dense", beta=1)
    assert torch.equal(scaled.H.detach(), reference.H.detach() * 2.0**k)
    assert torch.equal(scaled.W.detach(), reference.W.detach())


@pytest.mark.parametrize("scale", [1e-15, 1e15])
def test_penalised_and_convolutional_fits(scale, generator):
    V = torch.rand(2, 3, 20, generator=generator, dtype=torch.float64) + 0.1
    results = []
    for c in (1.0, scale):
        model = NMFD(V.shape, rank=2, T=3).double().initialize_(V, "random", generator=0)
        with torch.no_grad():
            model.H.mul_(c)
        # with X = c X', lambda_1 |X| = c^beta (lambda_1 c^(1 - beta) |X'|), and for W
        # (scale-free) lambda_1 |W| = c^beta (lambda_1 c^-beta |W|)
        model.fit(c * V, beta=1.5, tol=0, max_iter=20, l1_ratio=1.0,
                  alpha_H=0.1 * c**0.5, alpha_W=0.1 * c**1.5)
        results.append((model().detach() / c, model.loss_history[-1] / c**1.5))
    assert_close(results[1][0], results[0][0], rtol=1e-7, atol=0)
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-7)


@pytest.mark.parametrize("scale", [1e-6, 1e-20, 1e20])
@pytest.mark.parametrize("beta", [2, 3])
def test_float32_defaults_fit_at_any_scale(scale, beta, generator):
    """The issue's report: values around 1e-6 with the defaults at beta=2 stopped after
    3 iterations with a rising loss and a zero reconstruction."""
    V, _, _ = low_rank(40, 30, 4, generator, dtype=torch.float32, noise=0.05)
    errors = []
    for c in (1.0, scale):
        torch.manual_seed(0)
        model = NMF(V.shape, rank=4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(c * V, beta=beta, max_iter=300)
        history = torch.tensor(model.loss_history, dtype=torch.float64)
        assert torch.isfinite(history).all()
        target = (c * V).double()
        errors.append(float((model().detach().double() - target).norm() / target.norm()))
    assert errors[1] < 0.05
    assert errors[1] == pytest.approx(errors[0], rel=0.2)


def test_target_scale():
    assert target_scale(3.0, 2) == 2.0
    assert target_scale(0.0, 10) == 1.0
    assert target_scale(5.0, 0) == 1.0
    assert target_scale(2.0**-300 * 100, 100) == 2.0**-300


def test_scaled_penalty_matches_objective():
    # lambda1 |X| + lambda2/2 |X|^2 with X = s X' equals s^beta times the transformed one
    penalty, s, beta = Penalty(0.3, 0.4), 2.0**10, 1.5
    X = torch.rand(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for carries in (True, False):
        scaled = scaled_penalty(penalty, s, beta, carries, torch.float64)
        original = float(penalty.value(X * s if carries else X))
        assert original == pytest.approx(s**beta * float(scaled.value(X)), rel=1e-12)


@pytest.mark.parametrize("scale", [2.0**-70, 1e-20, 1e20])
def test_sparse_fit_is_scale_equivariant(scale, generator):
    V, _, _ = low_rank(20, 12, 3, generator, noise=0.1)
    results = []
    for c in (1.0, scale):
        model = NMF(V.shape, rank=3).double().initialize_(V, "nndsvda")
        with torch.no_grad():
            model.H.mul_(c)
        model.sparse_fit(c * V, beta=2, max_iter=20, sW=0.5)
        results.append(model().detach() / c)
    assert_close(results[1], results[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("scale", [1e-100, 1e100])
def test_transform_is_scale_equivariant(scale, generator):
    V, _, _ = low_rank(20, 12, 3, generator, noise=0.1)
    model = NMF(V.shape, rank=3).double().initialize_(V, "nndsvda")
    H0 = torch.rand(5, 3, generator=generator, dtype=torch.float64)
    codes = model.transform(V[:5], beta=1, tol=0, max_iter=30, H=H0)
    scaled = model.transform(scale * V[:5], beta=1, tol=0, max_iter=30, H=scale * H0)
    assert_close(scaled / scale, codes, rtol=1e-7, atol=0)


@pytest.mark.parametrize("solver,beta", [("mu", 2), ("hals", 2), ("mu", 1), ("mu", 0.5)])
@pytest.mark.parametrize("k", [-30, 30])
def test_transform_with_templates_that_carry_the_scale(solver, beta, k):
    """Real data (the digits, float32) times 2**k, transformed with templates times
    2**k: the same activations as unscaled, to float32 rounding.  The transform
    divided the activations by the data's scale whatever the templates carried,
    so at 2**-30 they sat at 2**30 against templates at 2**-30 and the Euclidean
    positive parts fell under float32's epsilon (bi-cross-validation transforms
    with a fit's activations as templates)."""
    from sklearn.datasets import load_digits

    V = torch.tensor(load_digits().data[:200], dtype=torch.float32)
    model = NMF(V.shape, rank=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(V, beta=beta, max_iter=20)
    W = model.W.detach()
    H0 = torch.rand(200, 5, generator=torch.Generator().manual_seed(0))
    codes = []
    for power in (0, k):
        templates = NMF(W=W * 2.0**power, trainable_W=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            codes.append(templates.transform(V * 2.0**power, beta=beta, tol=0, max_iter=30,
                                             solver=solver, H=H0))
    assert_close(codes[1], codes[0], rtol=1e-5, atol=1e-6 * float(codes[0].max()))


@pytest.mark.parametrize("dtype,scale", [(torch.float64, 1e-100), (torch.float64, 1e100),
                                         (torch.float32, 1e-15), (torch.float32, 1e15)])
@pytest.mark.parametrize("solver,beta", [("mu", 2), ("hals", 2), ("mu", 1)])
def test_a_start_made_for_the_scaled_data(dtype, scale, solver, beta, generator):
    # initialize(c V) puts both factors at sqrt(c): the normalised problem then holds one
    # factor at sqrt(c) and the other at 1 / sqrt(c), and one side's products fell under
    # the floors (HALS at 1e-100: relative error 1.8e19); the fit balances them first
    V, _, _ = low_rank(24, 16, 3, generator)
    V = V.to(dtype)
    errors = []
    for c in (1.0, scale):
        W0, H0 = initialize(c * V, 3, "random", generator=0)
        model = NMF(W=W0, H=H0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(c * V, beta=beta, solver=solver, tol=0, max_iter=100)
        reconstruction = (model.H.detach().double() @ model.W.detach().double().T) / c
        errors.append(float((reconstruction - V.double()).norm() / V.double().norm()))
        assert (torch.tensor(model.loss_history) >= 0).all()
    assert errors[1] == pytest.approx(errors[0], rel=1e-2, abs=1e-6)


@pytest.mark.parametrize("dtype,scale", [(torch.float64, 1e-100), (torch.float64, 2.0**300),
                                         (torch.float32, 1e-15), (torch.float32, 1e15)])
@pytest.mark.parametrize("solver,beta", [("mu", 2), ("hals", 2), ("mu_extrapolated", 1)])
def test_restarts_are_scale_equivariant(dtype, scale, solver, beta, generator):
    # fit_restarts fits the normalised problem as NMF.fit does: c V gives c times the
    # members' reconstructions of V, and histories c^beta times theirs, never negative
    from torchnmf.restarts import fit_restarts

    V, _, _ = low_rank(24, 16, 3, generator, noise=0.1)
    V = V.to(dtype)
    results = []
    for c in (1.0, scale):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results.append(fit_restarts(c * V, 3, n_restarts=2, beta=beta, solver=solver,
                                        max_iter=60, tol=0, seed=0))
    reference, scaled = results
    for k in range(2):
        rebuilt = scaled.H[k].double() @ scaled.W[k].double().T / scale
        assert_close(rebuilt, reference.H[k].double() @ reference.W[k].double().T, **TOL[dtype])
        history = torch.tensor(scaled.histories[k], dtype=torch.float64)
        assert (history >= 0).all() and torch.isfinite(history).all()
        assert_close(history / scale**beta, torch.tensor(reference.histories[k], dtype=torch.float64),
                     rtol=TOL[dtype]["rtol"] * 10, atol=0)


@pytest.mark.parametrize("beta", [0.5, 1, 2])
def test_float32_data_of_subnormal_mean(beta, generator):
    """Data of mean 2**-133 (under float32's smallest normal number): the scale's
    reciprocal overflowed and the first objective was NaN.  The scale stops at
    2**-126, and the fit is the unit-scale fit scaled, to float32 rounding."""
    from torchnmf.restarts import fit_restarts

    V = torch.rand(30, 12, generator=generator)
    W0, H0 = torch.rand(12, 2, generator=generator), torch.rand(30, 2, generator=generator)
    unit = NMF(W=W0, H=H0)
    unit.fit(V, beta=beta, max_iter=30, tol=0)
    tiny = NMF(W=W0, H=H0 * 2.0**-133)
    tiny.fit(V * 2.0**-133, beta=beta, max_iter=30, tol=0)
    assert_close(torch.tensor(tiny.loss_history, dtype=torch.float64) * 2.0 ** (133 * beta),
                 torch.tensor(unit.loss_history, dtype=torch.float64), rtol=1e-4, atol=0)
    losses = fit_restarts(V * 2.0**-133, 2, n_restarts=2, beta=beta, max_iter=10).losses
    assert bool(torch.isfinite(losses).all()) and bool((losses > 0).all())
    assert target_scale(2.0**-133, 1, torch.float32) == 2.0**-126
    assert target_scale(2.0**-133, 1, torch.float64) == 2.0**-133


@pytest.mark.parametrize("beta,k", [(2, -997), (3, -400)])
def test_tol_where_the_objective_underflows(beta, k, generator):
    """A fit of 2**k V whose objective, 2**(k beta) times V's, underflows the dtype: it
    stops where the fit of V stops, with its factors scaled (it stopped after two
    iterations: the relative decrease of a history of zeros is zero)."""
    V, W0, H0 = _problem(torch.float64, generator)
    fits = []
    for scale in (1.0, 2.0**k):
        model = NMF(W=W0.clone(), H=(H0 * scale).clone())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            n_iter = model.fit(scale * V, beta=beta, tol=1e-2, max_iter=200)
        fits.append((n_iter, model))
    (n_reference, reference), (n_scaled, scaled) = fits
    assert 2 < n_reference < 200
    assert n_scaled == n_reference
    assert torch.equal(scaled.H.detach(), reference.H.detach() * 2.0**k)
    assert torch.equal(scaled.W.detach(), reference.W.detach())


def _naive_mu_H(V, W, H, n_iter):
    """Euclidean multiplicative updates of ``H`` alone (``W`` fixed)."""
    for _ in range(n_iter):
        H = H * (V @ W) / (H @ W.T @ W)
    return H


@pytest.mark.parametrize("k", [-40, 40])
def test_fixed_templates_with_a_start_far_from_the_data(k, generator):
    # with W held (trainable_W=False or a transform) the scale may ride on W; a start
    # 2**40 off the data then multiplied that working W by a power of two that was never
    # undone, so H fitted other templates (off by 2**23 at 2**-40)
    V = 2.0**k * torch.rand(6, 4, generator=generator, dtype=torch.float64)
    W0 = torch.rand(4, 2, generator=generator, dtype=torch.float64)
    H0 = torch.rand(6, 2, generator=generator, dtype=torch.float64)
    expected = _naive_mu_H(V, W0, H0, 3)
    model = NMF(W=W0.clone(), H=H0.clone(), trainable_W=False)
    model.fit(V, beta=2, tol=0, max_iter=3)
    assert_close(model.H.detach(), expected, rtol=1e-10, atol=0)
    codes = NMF(W=W0.clone()).transform(V, beta=2, tol=0, max_iter=3, H=H0.clone())
    assert_close(codes, expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("solver", ["mu", "hals", "mu_extrapolated"])
@pytest.mark.parametrize("k", [-40, 40])
def test_fixed_components_stay_with_a_start_far_from_the_data(solver, k, generator):
    # bringing a start 2**40 off the data to its scale multiplied every column of
    # the carrying factor, the fixed ones too
    V = 2.0**k * torch.rand(6, 4, generator=generator, dtype=torch.float64)
    W0 = torch.rand(4, 3, generator=generator, dtype=torch.float64)
    H0 = torch.rand(6, 3, generator=generator, dtype=torch.float64)
    for fixed in (dict(fixed_H=[1]), dict(fixed_H=[0, 2], fixed_W=[1])):
        model = NMF(W=W0.clone(), H=H0.clone())
        model.fit(V, beta=2, tol=0, max_iter=3, solver=solver, **fixed)
        for name, start in (("H", H0), ("W", W0)):
            kept = fixed.get(f"fixed_{name}", [])
            assert torch.equal(getattr(model, name).detach()[:, kept], start[:, kept])
        assert (model.H.detach() @ model.W.detach().T).mean() / V.mean() > 1e-3
