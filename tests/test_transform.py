"""NMF.transform (activations for new data with W fixed), fixed components and
per-factor penalties."""
import math

import pytest
import torch
from torch.testing import assert_close

from conftest import unchanged, low_rank
from torchnmf.solvers import mu, registry
from torchnmf.metrics import beta_div
from torchnmf.nmf import NMF, NMF2D, NMFD

BETAS = [0, 0.5, 1, 2, 3]


def positive_problem(generator, n=12, c=9, rank=3, dtype=torch.float64):
    V, _, _ = low_rank(n, c, rank, generator, dtype=dtype, noise=0.3)
    return V + 0.05


# -- transform ---------------------------------------------------------------------
@pytest.mark.parametrize("beta", BETAS)
def test_transform_reproduces_fit_with_fixed_w(beta, generator):
    V = positive_problem(generator)
    W = torch.rand(9, 3, generator=generator, dtype=torch.float64)
    H0 = torch.rand(12, 3, generator=generator, dtype=torch.float64)
    model = NMF(W=W, H=H0, trainable_W=False)
    model.fit(V, beta=beta, max_iter=10, tol=0, alpha=0.1, l1_ratio=0.5)
    H = model.transform(V, beta=beta, max_iter=10, tol=0, alpha=0.1, l1_ratio=0.5, H=H0)
    assert torch.equal(H, model.H.detach())
    assert torch.equal(model.W.detach(), W)


@pytest.mark.parametrize("beta", [1, 2])
def test_transform_and_fit_reach_the_same_activations(beta, generator):
    """With W fixed the H-subproblem is strictly convex (beta in [1, 2], W of full
    column rank): fit and transform from different starts meet at one H."""
    V = positive_problem(generator, n=10, c=12)
    W = torch.rand(12, 3, generator=generator, dtype=torch.float64)
    model = NMF(W=W, H=(10, 3), trainable_W=False).double()
    model.fit(V, beta=beta, max_iter=1500, tol=0)
    H = model.transform(V, beta=beta, max_iter=1500, tol=0, generator=generator)
    assert_close(H, model.H.detach(), rtol=1e-5, atol=1e-7)
    assert torch.equal(model.W.detach(), W)


def test_transform_new_rows_of_a_planted_model(generator):
    V, H_true, W_true = low_rank(25, 18, 3, generator)
    new = torch.rand(6, 3, generator=generator, dtype=torch.float64) @ W_true.T
    model = NMF(W=W_true, H=(25, 3), trainable_W=False)
    H = model.transform(new, beta=2, max_iter=3000, tol=0, generator=generator)
    assert H.shape == (6, 3) and (H >= 0).all()
    assert (H @ W_true.T - new).norm() / new.norm() < 1e-4


def test_transform_objective_never_increases_and_is_reported(generator):
    V = positive_problem(generator)
    model = NMF(V.shape, rank=3).double()
    model.fit(V, max_iter=20, tol=0)
    history = []
    H = model.transform(V[:5], beta=0.5, max_iter=30, tol=0, callback=lambda i, loss: history.append(loss))
    assert len(history) == 30
    assert all(b <= a * (1 + 1e-10) for a, b in zip(history, history[1:]))
    assert float(beta_div(H @ model.W.detach().T, V[:5], 0.5)) <= history[-1] * (1 + 1e-10)


def test_transform_with_a_mask(generator):
    V, _, W_true = low_rank(10, 12, 2, generator)
    mask = torch.rand(V.shape, generator=generator) > 0.3
    model = NMF(W=W_true, H=(10, 2), trainable_W=False)
    H = model.transform(torch.where(mask, V, float("nan")), beta=1, max_iter=2000, tol=0, missing="mask")
    assert (H @ W_true.T - V).norm() / V.norm() < 1e-3  # the hidden entries too


@pytest.mark.parametrize("cls,shape,kw", [(NMFD, (3, 4, 16), dict(T=3)), (NMF2D, (2, 3, 7, 6), dict(kernel_size=2))])
@pytest.mark.filterwarnings("ignore::torchnmf.ConvergenceWarning")
def test_convolutional_transform_matches_fit(cls, shape, kw, generator):
    V = torch.rand(shape, generator=generator, dtype=torch.float64) + 0.1
    model = cls(shape, rank=2, **kw).double()
    model.fit(V, max_iter=5, tol=0)
    fixed = cls(W=model.W.detach(), H=model.H.detach(), trainable_W=False)
    H0 = model.H.detach().clone()
    fixed.fit(V, beta=1, max_iter=5, tol=0)
    H = model.transform(V, beta=1, max_iter=5, tol=0, H=H0)
    assert torch.equal(H, fixed.H.detach())
    # more samples and a longer signal than the model was built for
    longer = torch.rand((5,) + shape[1:-1] + (shape[-1] + 4,), generator=generator, dtype=torch.float64)
    assert model.transform(longer, max_iter=3).shape[0] == 5


@pytest.mark.parametrize("model,shape", [
    (NMF((5, 4), rank=2), (0, 4)),
    (NMFD((2, 3, 9), rank=2, T=3), (0, 3, 9)),
    (NMF2D((1, 2, 4, 4), rank=2, kernel_size=2), (0, 2, 4, 4)),
])
def test_transform_of_no_samples_is_empty(model, shape):
    """NMF's transform of zero rows gave zero rows, NMFD's failed inside torch."""
    H = model.transform(torch.rand(shape), max_iter=3)
    assert tuple(H.shape) == model._activation_shape(torch.rand(shape))


@pytest.mark.parametrize("model,shape", [
    (NMF(W=torch.zeros(4, 2)), (5, 4)),
    (NMFD(W=torch.zeros(3, 2, 2)), (2, 3, 6)),
    (NMF2D(W=torch.zeros(2, 2, 2, 2)), (1, 2, 4, 3)),
])
@pytest.mark.parametrize("masked", [False, True])
def test_transform_with_all_zero_templates_and_a_penalty(model, shape, masked, generator):
    """Templates a strong penalty drove to zero explain nothing: the penalised
    activations are zero.  Before, the default start was divided by the smallest
    float (about 1e37) and the penalty's objective overflowed (FloatingPointError)."""
    mask = torch.arange(math.prod(shape)).view(shape) % 3 != 0 if masked else None
    for scale in (1, 1e-30):  # the start at the data's scale is still far from float32's limits
        V = scale * (torch.rand(shape, generator=generator) + 0.1)
        H = model.transform(V, beta=1, max_iter=3, tol=0, alpha=0.5 * scale, mask=mask,
                            generator=generator)
        assert torch.equal(H, torch.zeros_like(H))


@pytest.mark.filterwarnings("ignore::torchnmf.ConvergenceWarning")
def test_transform_errors(generator):
    V = positive_problem(generator)
    model = NMF(V.shape, rank=3).double()
    with unchanged(model, V), pytest.raises(ValueError, match=r"V must be 2-dimensional with 9 channels in dimension 1 to match W of shape \(9, 3\), got \(12, 8\)"):
        model.transform(V[:, :8])
    with unchanged(model, V), pytest.raises(ValueError, match="transform needs W, but this module has no W"):
        NMF(H=(4, 2)).transform(V)
    with unchanged(model, V), pytest.raises(ValueError, match=r"H must have shape \(12, 3\) for this V, got \(12, 2\)"):
        model.transform(V, H=torch.rand(12, 2, dtype=torch.float64))
    with unchanged(model, V), pytest.raises(ValueError, match="V contains NaN"):
        model.transform(torch.full_like(V, float("nan")))
    with unchanged(model, V), pytest.raises(TypeError, match="V must be a torch.Tensor"):
        model.transform(V.numpy())
    with unchanged(model, V), pytest.raises(ValueError, match=r"axes of at least \(3,\)"):
        NMFD((2, 3, 10), rank=2, T=3).transform(torch.rand(2, 3, 2))
    empty_row = torch.ones(V.shape, dtype=torch.bool)
    empty_row[4] = False
    with unchanged(model, V), pytest.raises(ValueError, match="mask leaves row 4 of V"):
        model.transform(V, mask=empty_row)
    empty_col = torch.ones(V.shape, dtype=torch.bool)
    empty_col[:, 4] = False
    model.transform(V, mask=empty_col, max_iter=2)  # W is fixed: a hidden column is fine


# -- fixed components ----------------------------------------------------------------
@pytest.mark.parametrize("beta", BETAS)
def test_fixed_components_are_bit_identical(beta, generator):
    V = positive_problem(generator)
    model = NMF(V.shape, rank=4).double()
    W0, H0 = model.W.detach().clone(), model.H.detach().clone()
    model.fit(V, beta=beta, max_iter=20, tol=0, fixed_W=[0, 2], fixed_H=[3], alpha=0.1, l1_ratio=0.5)
    W, H = model.W.detach(), model.H.detach()
    assert torch.equal(W[:, [0, 2]], W0[:, [0, 2]])
    assert torch.equal(H[:, 3], H0[:, 3])
    assert not torch.equal(W[:, 1], W0[:, 1]) and not torch.equal(H[:, 0], H0[:, 0])
    history = torch.tensor(model.loss_history)
    assert (history[1:] <= history[:-1] * (1 + 1e-10)).all()


def test_fixed_components_with_a_mask_and_convolution(generator):
    V = torch.rand(3, 4, 12, generator=generator, dtype=torch.float64) + 0.1
    mask = torch.rand(V.shape, generator=generator) > 0.2
    model = NMFD(V.shape, rank=3, T=4).double()
    W0 = model.W.detach().clone()
    model.fit(V, max_iter=10, tol=0, mask=mask, fixed_W=torch.tensor([False, True, False]))
    assert torch.equal(model.W.detach()[:, 1], W0[:, 1])
    assert not torch.equal(model.W.detach()[:, 0], W0[:, 0])


def test_partly_known_dictionary_is_completed(generator):
    """Two of three templates known: the fit learns the third one."""
    V, H_true, W_true = low_rank(40, 20, 3, generator)
    W_true[:3] = torch.eye(3, dtype=torch.float64)  # separable, so the answer is unique
    H_true[:3] = torch.eye(3, dtype=torch.float64)
    V = H_true @ W_true.T
    W_start = torch.rand(20, 3, generator=generator, dtype=torch.float64)
    W_start[:, :2] = W_true[:, :2]
    model = NMF(W=W_start, H=(40, 3))
    model.fit(V, beta=2, max_iter=3000, tol=0, fixed_W=[0, 1])
    learned = model.W.detach()[:, 2]
    cosine = learned @ W_true[:, 2] / (learned.norm() * W_true[:, 2].norm())
    assert cosine > 0.999
    assert torch.equal(model.W.detach()[:, :2], W_true[:, :2])


def test_fixed_components_errors(generator):
    V = positive_problem(generator)
    model = NMF(V.shape, rank=3).double()
    with unchanged(model, V), pytest.raises(ValueError, match=r"fixed_W holds component 3, but indices must lie in \[0, 3\)"):
        model.fit(V, fixed_W=[3])
    with unchanged(model, V), pytest.raises(ValueError, match=r"fixed_H holds component -1"):
        model.fit(V, fixed_H=[-1])
    with unchanged(model, V), pytest.raises(TypeError, match="fixed_W must hold component indices"):
        model.fit(V, fixed_W=[0.5])
    with unchanged(model, V), pytest.raises(TypeError, match="fixed_W must be a sequence of component indices"):
        model.fit(V, fixed_W=1)
    with unchanged(model, V), pytest.raises(ValueError, match="fixed_H as a boolean mask must have length rank=3, got 2"):
        model.fit(V, fixed_H=[True, False])

    class Plain(mu.MultiplicativeUpdates):
        features = frozenset()

    registry.SOLVERS["plain-test"] = Plain
    try:
        with pytest.raises(NotImplementedError, match="does not support fixed components"):
            model.fit(V, fixed_W=[0], solver="plain-test")
    finally:
        del registry.SOLVERS["plain-test"]


# -- per-factor penalties ------------------------------------------------------------
def test_per_factor_penalties(generator):
    V = positive_problem(generator)
    a = NMF(V.shape, rank=3).double()
    b = NMF(V.shape, W=a.W.detach(), H=a.H.detach())
    a.fit(V, beta=2, max_iter=50, tol=0, alpha_W=0.0, alpha_H=2.0, l1_ratio=1.0)
    b.fit(V, beta=2, max_iter=50, tol=0, alpha=0.0)
    assert a.H.detach().sum() < b.H.detach().sum()
    W, H = a.W.detach(), a.H.detach()
    expected = beta_div(H @ W.T, V, 2) + 2.0 * H.sum()
    assert a.loss_history[-1] == pytest.approx(float(expected), rel=1e-9)
    with pytest.raises(ValueError, match="alpha_W must be non-negative"):
        a.fit(V, alpha_W=-1)
