import math

import pytest
import torch
from torch.testing import assert_close

from conftest import unchanged, low_rank
from torchnmf.solvers.sparseness import l1_for_sparseness, sparse_projection
from torchnmf.metrics import beta_div, sparseness
from torchnmf.nmf import NMF, NMFD


def naive_projection(x, l1, l2):
    """Hoyer (2004), Section 3.2, one vector at a time, as the paper writes it."""
    n = len(x)
    s = [xi + (l1 - sum(x)) / n for xi in x]
    zero = set()
    while True:
        free = n - len(zero)
        m = [0.0 if i in zero else l1 / free for i in range(n)]
        d = [si - mi for si, mi in zip(s, m)]
        a = sum(di * di for di in d)
        b = 2 * sum(mi * di for mi, di in zip(m, d))
        c = sum(mi * mi for mi in m) - l2 * l2
        alpha = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
        s = [mi + alpha * di for mi, di in zip(m, d)]
        if all(si >= 0 for si in s):
            return s
        zero |= {i for i, si in enumerate(s) if si < 0}
        s = [0.0 if i in zero else si for i, si in enumerate(s)]
        shift = (sum(s) - l1) / (n - len(zero))
        s = [0.0 if i in zero else si - shift for i, si in enumerate(s)]


@pytest.mark.parametrize("target", [0.1, 0.5, 0.9])
def test_projection_matches_naive_algorithm(generator, target):
    x = torch.randn(6, 15, generator=generator, dtype=torch.float64)
    out = sparse_projection(x, target)
    for row, projected in zip(x, out):
        l2 = float(row.norm())
        expected = naive_projection(row.tolist(), l1_for_sparseness(l2, 15, target), l2)
        assert_close(projected, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("target", [0.05, 0.3, 0.7, 0.99])
def test_projection_properties(generator, dtype, target):
    x = torch.rand(8, 20, generator=generator, dtype=dtype) - 0.3
    before = x.clone()
    out = sparse_projection(x, target)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.equal(x, before)  # the input is not modified
    assert (out >= 0).all()
    assert_close(out.norm(dim=1), x.norm(dim=1), rtol=tol, atol=tol)
    for row in out:
        assert abs(float(sparseness(row)) - target) < tol
    unit = sparse_projection(x, target, l2=1.0)
    assert_close(unit.norm(dim=1), torch.ones(8, dtype=dtype), rtol=tol, atol=tol)


def test_projection_of_a_feasible_point_is_itself():
    x = torch.tensor([[3.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    assert_close(sparse_projection(x, float(sparseness(x[0]))), x)


def test_projection_of_a_flat_vector_breaks_the_tie():
    out = sparse_projection(torch.ones(2, 5, dtype=torch.float64), 0.5, 1.0)
    assert (out >= 0).all()
    assert_close(out.norm(dim=1), torch.ones(2, dtype=torch.float64))
    assert abs(float(sparseness(out[0])) - 0.5) < 1e-10


def test_projection_rejects_rows_of_one_entry():
    with pytest.raises(ValueError, match="at least 2 entries"):
        sparse_projection(torch.ones(3, 1), 0.5)


# -- sparse_fit ------------------------------------------------------------------
@pytest.mark.parametrize("beta", [2, 1])
@pytest.mark.parametrize("sW, sH", [(0.6, None), (None, 0.5), (0.6, 0.5)])
def test_sparse_fit_reaches_targets_and_never_increases(generator, beta, sW, sH):
    V, _, _ = low_rank(30, 20, 4, generator, noise=0.1)
    model = NMF(V.shape, rank=4).double()
    n_iter = model.sparse_fit(V, beta=beta, max_iter=30, sW=sW, sH=sH)
    assert n_iter == 30 and len(model.loss_history) == 31
    history = torch.tensor(model.loss_history)
    assert (history[1:] <= history[:-1] * (1 + 1e-12)).all()
    assert history[-1] < history[0]
    assert (model.W >= 0).all() and (model.H >= 0).all()
    for name, target in (("W", sW), ("H", sH)):
        if target is not None:
            factor = getattr(model, name).detach()
            for r in range(4):
                assert abs(float(sparseness(factor[:, r])) - target) < 1e-8
    if sH is not None:
        assert_close(model.H.detach().norm(dim=0), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("beta", [2, 1])
@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_sparse_fit_with_missing_values(generator, beta, layout):
    """Hidden entries are never read: garbage there (NaN with missing="mask", or huge
    values under an explicit mask) gives the fit of the zero-filled target; the
    history is the naive masked divergence and never increases."""
    V, _, _ = low_rank(30, 20, 4, generator, noise=0.1)
    observed = torch.rand(V.shape, generator=generator) > 0.3
    start = NMF(V.shape, rank=4).double()
    clean = V * observed
    garbage = V.masked_fill(~observed, 1e3)
    with_nan = V.masked_fill(~observed, float("nan"))
    models = []
    for target, options in ((clean, dict(mask=observed)), (garbage, dict(mask=observed)),
                            (with_nan, dict(missing="mask"))):
        if layout == "sparse" and not torch.isnan(target).any():
            target = target.to_sparse_csr()
        model = NMF(W=start.W.detach(), H=start.H.detach())
        model.sparse_fit(target, beta=beta, max_iter=12, sW=0.5, sH=0.4, **options)
        models.append(model)
    for other in models[1:]:
        assert_close(other.W, models[0].W)
        assert_close(other.H, models[0].H)
    model = models[0]
    history = torch.tensor(model.loss_history)
    assert (history[1:] <= history[:-1] * (1 + 1e-12)).all() and history[-1] < history[0]
    reconstruction = model().detach()
    naive = beta_div(reconstruction[observed], V[observed], beta)
    assert float(naive) == pytest.approx(model.loss_history[-1], rel=1e-9)
    for r in range(4):
        assert abs(float(sparseness(model.W.detach()[:, r])) - 0.5) < 1e-8


def test_sparse_fit_recovers_planted_sparse_templates(generator):
    # Each template has 3 of 24 entries on, in disjoint places; MU alone finds
    # templates of sparseness about 0.65, the constraint sharpens them to the truth.
    W = torch.zeros(24, 4, dtype=torch.float64)
    for r in range(4):
        W[6 * r: 6 * r + 3, r] = 1 + torch.rand(3, generator=generator, dtype=torch.float64)
    H = torch.rand(60, 4, generator=generator, dtype=torch.float64)
    V = H @ W.T + 0.05 * torch.rand(60, 24, generator=generator, dtype=torch.float64)
    target = float(sparseness(W[:, 0]))
    torch.manual_seed(0)
    model = NMF(V.shape, rank=4).double()
    model.fit(V, beta=2, max_iter=100, tol=0)  # warm start, as sparse NMF is usually run
    model.sparse_fit(V, max_iter=40, sW=target)
    assert float((model().detach() - V).norm() / V.norm()) < 0.06
    learnt = model.W.detach() / model.W.detach().norm(dim=0)
    cosine = (W / W.norm(dim=0)).T @ learnt
    assert (cosine.max(1).values > 0.99).all()


def test_sparse_fit_fixed_factor_and_convolutional_model(generator):
    V = torch.rand(3, 5, 20, generator=generator, dtype=torch.float64)
    model = NMFD(V.shape, rank=2, T=3).double()
    model.sparse_fit(V, sW=0.4, max_iter=20)
    for r in range(2):
        assert abs(float(sparseness(model.W[:, r].detach())) - 0.4) < 1e-8
    assert model.loss_history[-1] < model.loss_history[0]
    W0 = torch.rand(6, 2, generator=generator, dtype=torch.float64)
    fixed = NMF((10, 6), rank=2, W=W0, trainable_W=False).double()
    fixed.sparse_fit(torch.rand(10, 6, generator=generator, dtype=torch.float64), sH=0.3, max_iter=5)
    assert torch.equal(fixed.W.detach(), W0)


def test_sparse_fit_errors(generator):
    V = torch.rand(10, 6, generator=generator)
    model = NMF(V.shape, rank=2)
    for bad in (0, 1, 1.5, -0.2):
        with unchanged(model, V), pytest.raises(ValueError, match=f"sW must lie strictly between 0 and 1, got {float(bad)}"):
            model.sparse_fit(V, sW=bad)
    with unchanged(model, V), pytest.raises(ValueError, match="sH must lie strictly between 0 and 1"):
        model.sparse_fit(V, sH=2)
    with unchanged(model, V), pytest.raises(TypeError, match="sH must be a real number"):
        model.sparse_fit(V, sH="high")
    with unchanged(model, V), pytest.raises(ValueError, match="V must be non-negative"):
        model.sparse_fit(-V, sW=0.5)
    with unchanged(model, V), pytest.raises(ValueError, match="V contains NaN"):
        model.sparse_fit(V.masked_fill(V > 0.5, float("nan")), sW=0.5)
    fixed = NMF(V.shape, rank=2, W=torch.rand(6, 2), trainable_W=False)
    with unchanged(model, V), pytest.raises(ValueError, match="sW constrains W, but W is fixed"):
        fixed.sparse_fit(V, sW=0.5)
    single = NMF((10, 1), rank=1)
    with unchanged(model, V), pytest.raises(ValueError, match="sW needs components of at least 2 entries"):
        single.sparse_fit(torch.rand(10, 1), sW=0.5)
