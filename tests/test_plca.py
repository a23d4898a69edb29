import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from conftest import unchanged, low_rank
from torchnmf import ConvergenceWarning
from torchnmf.metrics import kl_div
from torchnmf.nmf import NMF
from torchnmf.plca import PLCA, SIPLCA, SIPLCA2, SIPLCA3, BaseComponent


def sums_per_component(factor):
    return factor.detach().sum([d for d in range(factor.dim()) if d != 1])


# -- construction --------------------------------------------------------------
@pytest.mark.parametrize("make, vshape", [
    (lambda: PLCA((20, 7), rank=3), (20, 7)),
    (lambda: SIPLCA((4, 6, 30), rank=2, T=5), (4, 6, 30)),
    (lambda: SIPLCA2((2, 3, 10, 12), rank=4, kernel_size=(3, 2)), (2, 3, 10, 12)),
    (lambda: SIPLCA3((1, 2, 6, 7, 8), rank=2, kernel_size=2), (1, 2, 6, 7, 8)),
])
def test_factors_are_normalised_and_the_output_is_a_distribution(make, vshape):
    model = make()
    for factor in (model.W, model.H):
        assert_close(sums_per_component(factor), torch.ones(model.rank))
    assert_close(model.Z.detach().sum(), torch.tensor(1.0))
    assert_close(model.Z.detach(), torch.full((model.rank,), 1.0 / model.rank))
    output = model()
    assert output.shape == vshape
    assert_close(output.detach().sum(), torch.tensor(1.0))
    assert_close(model(norm=7.0).detach().sum(), torch.tensor(7.0))


def test_forward_is_the_nmf_map_of_h_diag_z(generator):
    W = torch.rand(5, 2, generator=generator, dtype=torch.float64)
    H = torch.rand(8, 2, generator=generator, dtype=torch.float64)
    Z = torch.tensor([0.25, 0.75], dtype=torch.float64)
    model = PLCA(W=W, H=H, Z=Z)
    Wn, Hn = W / W.sum(0), H / H.sum(0)
    assert_close(model().detach(), Hn @ torch.diag(Z) @ Wn.T)
    assert W.sum() != 2  # the caller's tensor is not normalised in place
    conv = SIPLCA(W=torch.rand(3, 2, 4, generator=generator, dtype=torch.float64),
                  H=torch.rand(2, 2, 6, generator=generator, dtype=torch.float64))
    expected = F.conv_transpose1d(conv.H * conv.Z.view(1, -1, 1), conv.W.transpose(0, 1))
    assert_close(conv().detach(), expected.detach())


def test_forward_scales_the_rank_axis_of_batched_activations(generator):
    """PLCA's forward took H with batch dimensions (rank last, as NMF's does) but
    scaled its dimension 1 by Z: an H of shape (2, 4, 4) gave a wrong distribution
    silently, (3, 5, 4) a broadcasting RuntimeError, a 1-D H an output of shape
    (1, C); a Z of the wrong length failed inside torch too."""
    model = PLCA(W=torch.rand(6, 4, generator=generator, dtype=torch.float64), H=(3, 4))
    W = model.W.detach()
    Z = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    for shape in [(2, 4, 4), (3, 5, 4), (4,)]:
        H = torch.rand(shape, generator=generator, dtype=torch.float64)
        assert_close(model(H=H, Z=Z).detach(), (H * Z) @ W.T)
    for bad in (torch.rand(3, dtype=torch.float64), Z.view(1, 4)):
        with pytest.raises(ValueError, match="Z must be a 1-D tensor with one entry per "
                                             "component \\(4\\), got shape"):
            model(Z=bad)
    with pytest.raises(TypeError, match="Z must be a tensor, got list"):
        model(Z=[0.25] * 4)


def test_rank_from_z_and_trainable_flags():
    model = PLCA(Z=torch.tensor([1.0, 3.0]), W=None)
    assert model.rank == 2 and model.W is None and model.H is None
    assert_close(model.Z.detach(), torch.tensor([0.25, 0.75]))
    fixed = PLCA((6, 4), rank=2, trainable_Z=False, trainable_W=False)
    assert not fixed.Z.requires_grad and not fixed.W.requires_grad and fixed.H.requires_grad
    assert isinstance(fixed, BaseComponent) and "Z=(2,) (fixed)" in repr(fixed)


# -- EM ---------------------------------------------------------------------------
def naive_em_step(V, H, W, Z):
    """One EM iteration with the posterior P(z | n, c) written out."""
    P = V / V.sum()
    joint = H[:, None, :] * W[None, :, :] * Z  # (N, C, R)
    posterior = joint / joint.sum(2, keepdim=True)
    counts = P[:, :, None] * posterior
    Z_new = counts.sum((0, 1))
    H_new = counts.sum(1) / Z_new
    W_new = counts.sum(0) / Z_new
    return H_new, W_new, Z_new / Z_new.sum()


def test_one_iteration_matches_naive_em(generator):
    V, _, _ = low_rank(10, 7, 3, generator, noise=0.2)
    model = PLCA(V.shape, rank=3).double()
    H, W, Z = (t.detach().clone() for t in (model.H, model.W, model.Z))
    model.fit(V, max_iter=1, tol=0)
    H_new, W_new, Z_new = naive_em_step(V, H, W, Z)
    assert_close(model.H.detach(), H_new)
    assert_close(model.W.detach(), W_new)
    assert_close(model.Z.detach(), Z_new)


@pytest.mark.parametrize("make, shape", [
    (lambda s: PLCA(s, rank=3), (15, 10)),
    (lambda s: SIPLCA(s, rank=2, T=3), (3, 5, 16)),
    (lambda s: SIPLCA2(s, rank=2, kernel_size=2), (2, 3, 6, 5)),
    (lambda s: SIPLCA3(s, rank=2, kernel_size=2), (1, 2, 4, 4, 3)),
])
def test_log_likelihood_never_decreases(generator, make, shape):
    V = torch.rand(shape, generator=generator, dtype=torch.float64)
    torch.manual_seed(0)
    model = make(shape).double()
    n_iter, norm = model.fit(V, max_iter=40, tol=0)
    assert n_iter == 40 and torch.equal(norm, V.sum())
    history = torch.tensor(model.loss_history)  # KL(P | Q) = -log-likelihood / V.sum() + const
    assert (history[1:] <= history[:-1] + 1e-13).all()
    assert history[-1] < history[0]
    for factor in (model.W, model.H):
        assert (factor >= 0).all()
        assert_close(sums_per_component(factor), torch.ones(model.rank, dtype=torch.float64))
    assert_close(model.Z.detach().sum(), torch.tensor(1.0, dtype=torch.float64))


def test_kl_matches_kl_nmf_of_the_same_rank(generator):
    V, _, _ = low_rank(40, 25, 3, generator, noise=0.3)
    torch.manual_seed(0)
    nmf = NMF(V.shape, rank=3).double()
    plca = PLCA(W=nmf.W.detach(), H=nmf.H.detach())
    nmf.fit(V, beta=1, max_iter=300, tol=0)
    _, norm = plca.fit(V, max_iter=300, tol=0)
    ours = float(kl_div(plca(norm=norm).detach(), V))
    reference = float(kl_div(nmf().detach(), V))
    assert abs(ours - reference) <= 0.03 * reference


def test_recovers_a_planted_distribution(generator):
    W = torch.rand(12, 2, generator=generator, dtype=torch.float64)
    H = torch.rand(20, 2, generator=generator, dtype=torch.float64)
    V = 1000 * (H @ W.T)
    torch.manual_seed(0)
    model = PLCA(V.shape, rank=2).double()
    _, norm = model.fit(V, max_iter=500, tol=0)
    assert_close(model(norm=norm).detach(), V, rtol=1e-3, atol=1e-3)


def test_shift_invariant_with_unit_kernel_equals_plca(generator):
    V = torch.rand(9, 6, generator=generator, dtype=torch.float64)
    flat = PLCA(V.shape, rank=2).double()
    conv = SIPLCA(W=flat.W.detach()[:, :, None], H=flat.H.detach().T[None])
    flat.fit(V, max_iter=10, tol=0)
    conv.fit(V.T[None], max_iter=10, tol=0)
    assert_close(conv.W.detach()[:, :, 0], flat.W.detach())
    assert_close(conv.H.detach()[0].T, flat.H.detach())
    assert_close(conv.Z.detach(), flat.Z.detach())


def test_priors_and_fixed_factors(generator):
    V = torch.rand(15, 10, generator=generator, dtype=torch.float64)
    torch.manual_seed(0)
    start = PLCA(V.shape, rank=3).double()
    plain = PLCA(W=start.W.detach(), H=start.H.detach())
    sparse = PLCA(W=start.W.detach(), H=start.H.detach())
    plain.fit(V, max_iter=100, tol=0)
    sparse.fit(V, max_iter=100, tol=0, W_alpha=torch.full((1, 3), 0.98, dtype=torch.float64))
    zeros = lambda m: int((m.W.detach() < 1e-12).sum())
    assert zeros(sparse) > zeros(plain)
    smooth = PLCA(W=start.W.detach(), H=start.H.detach())
    smooth.fit(V, max_iter=100, tol=0, H_alpha=1.05, Z_alpha=2)
    history = torch.tensor(smooth.loss_history)  # the MAP objective never increases
    assert (history[1:] <= history[:-1] + 1e-12).all()
    assert smooth.H.detach().std() < plain.H.detach().std()
    fixed = PLCA(W=start.W.detach(), H=start.H.detach(), trainable_W=False, trainable_Z=False)
    fixed.fit(V, max_iter=5, tol=0)
    assert_close(fixed.W.detach(), start.W.detach())
    assert_close(fixed.Z.detach(), start.Z.detach())


# -- errors ------------------------------------------------------------------------
def test_errors(generator):
    with pytest.raises(ValueError, match="Z must be a 1-D tensor of length rank, got shape \\(2, 2\\)"):
        PLCA((5, 4), rank=2, Z=torch.ones(2, 2))
    with pytest.raises(ValueError, match="inconsistent ranks: Z must have one entry per component"):
        PLCA((5, 4), rank=2, Z=torch.ones(3))
    with pytest.raises(ValueError, match="inconsistent ranks"):
        PLCA(W=torch.rand(4, 2), H=torch.rand(5, 3))
    with pytest.raises(ValueError, match="Z must be non-negative"):
        PLCA((5, 4), rank=2, Z=torch.tensor([1.0, -1.0]))
    with pytest.raises(TypeError, match="Z must be a tensor, a shape or None"):
        PLCA((5, 4), rank=2, Z="uniform")
    with pytest.raises(ValueError, match="PLCA expects a 2-dimensional Vshape"):
        PLCA((5, 4, 3))
    with pytest.raises(ValueError, match=r"same rank \(dimension 1 of each\)"):
        SIPLCA((1, 8, 20), rank=2, T=3)(torch.rand(1, 3, 18, generator=generator))
    with pytest.raises(ValueError, match="SIPLCA needs a 3-dimensional W"):
        SIPLCA(W=torch.rand(4, 2))
    with pytest.raises(TypeError, match="trainable_Z must be a bool"):
        PLCA((5, 4), trainable_Z=1)
    model = PLCA((5, 4), rank=2)
    V = torch.rand(5, 4, generator=generator)
    with unchanged(model, V), pytest.raises(ValueError, match="V must be non-negative"):
        model.fit(-V)
    with unchanged(model, V), pytest.raises(ValueError, match="V contains NaN"):
        model.fit(V.masked_fill(V > 0.5, float("nan")))
    with unchanged(model, V), pytest.raises(ValueError, match="V must have a positive sum"):
        model.fit(torch.zeros(5, 4))
    with unchanged(model, V), pytest.raises(ValueError, match="V must have the shape of the reconstruction"):
        model.fit(torch.rand(4, 5))
    # entries float32 holds whose sum it does not: before, a fit of V / inf with objectives 0
    with unchanged(model, V), pytest.raises(ValueError, match=r"V's sum, 6e\+38, exceeds torch.float32's"):
        model.fit(torch.full((5, 4), 3e37))
    with unchanged(siplca := SIPLCA((1, 4, 5), rank=2, T=2)), pytest.raises(ValueError, match="V's sum"):
        siplca.fit(torch.full((1, 4, 5), 3e37))
    with unchanged(model, V), pytest.raises(ValueError, match="W_alpha must be positive \\(a Dirichlet concentration\\), got 0.0"):
        model.fit(V, W_alpha=0)
    with unchanged(model, V), pytest.raises(ValueError, match="H_alpha must be broadcastable to the factor's shape"):
        model.fit(V, H_alpha=torch.ones(3))
    with unchanged(model, V), pytest.raises(ValueError, match="Z_alpha must be finite and positive everywhere"):
        model.fit(V, Z_alpha=torch.tensor([1.0, -1.0]))
    with unchanged(model, V), pytest.raises(ValueError, match="tol must be non-negative"):
        model.fit(V, tol=-1)


# -- sparse targets ------------------------------------------------------------------
def _sparse_counts(generator, n=30, c=20, density=0.25):
    keep = torch.rand(n, c, generator=generator) < density
    return torch.randint(1, 6, (n, c), generator=generator).double() * keep


@pytest.mark.parametrize("layout", ["coo", "csr", "csc"])
@pytest.mark.parametrize("priors", [{}, dict(W_alpha=1.2, H_alpha=torch.full((1, 3), 1.1,
                                                                              dtype=torch.float64))])
def test_sparse_target_gives_the_dense_fit(generator, layout, priors):
    V = _sparse_counts(generator)
    start = PLCA(V.shape, rank=3).double()
    dense = PLCA(W=start.W.detach(), H=start.H.detach())
    sparse = PLCA(W=start.W.detach(), H=start.H.detach())
    convert = {"coo": V.to_sparse, "csr": V.to_sparse_csr, "csc": V.to_sparse_csc}[layout]
    target = convert()
    n_dense, norm_dense = dense.fit(V, max_iter=25, tol=0, **priors)
    n_sparse, norm_sparse = sparse.fit(target, max_iter=25, tol=0, **priors)
    assert n_dense == n_sparse == 25
    assert_close(norm_sparse, norm_dense)
    assert_close(torch.tensor(sparse.loss_history), torch.tensor(dense.loss_history),
                 rtol=1e-10, atol=1e-12)
    for name in ("W", "H", "Z"):
        assert_close(getattr(sparse, name), getattr(dense, name), rtol=1e-9, atol=1e-12)
    assert sparse.loss_history[-1] < sparse.loss_history[0]


def test_sparse_target_is_never_densified(generator, monkeypatch):
    from conftest import DenseWatcher

    n, c, rank = 40, 30, 3
    V = _sparse_counts(generator, n, c, density=0.1).to_sparse_csr()
    model = PLCA((n, c), rank=rank).double()
    monkeypatch.setattr(torch.Tensor, "to_dense", lambda *a, **k: pytest.fail("to_dense called"))
    watcher = DenseWatcher()
    with watcher:
        model.fit(V, max_iter=3, tol=0)
    assert watcher.largest < n * c


def test_shift_invariant_models_refuse_sparse_targets():
    model = SIPLCA((3, 4, 10), rank=2, T=3)
    V = torch.rand(3, 4, 10).to_sparse()
    with pytest.raises(NotImplementedError, match="SIPLCA.fit does not accept sparse targets"):
        model.fit(V, max_iter=2)


def test_base_component_has_no_Z_unless_asked(generator):
    W = torch.rand(4, 2, generator=generator, dtype=torch.float64)
    H = torch.rand(5, 2, generator=generator, dtype=torch.float64)
    base = BaseComponent(W=W, H=H)
    assert base.Z is None and "Z" not in dict(base.named_parameters())
    with pytest.raises(ValueError, match="fit needs the latent prior Z, but this module has none"):
        base.fit(torch.rand(5, 4, dtype=torch.float64))
    assert BaseComponent(rank=2, W=W, H=H).Z is not None
    assert BaseComponent(W=W, H=H, Z=torch.tensor([0.5, 0.5])).Z is not None
    assert PLCA(W=W, H=H).Z is not None  # the models keep a uniform prior


@pytest.mark.parametrize("make", [PLCA, SIPLCA])
def test_float32_fits_distributions_with_entries_under_its_epsilon(make):
    """Half the entries of V / V.sum() lie under float32's epsilon, the floor of the
    reconstruction: the statistics see the distribution times its entry count, so the
    float32 fit follows the float64 one.  Before, the floor held those entries up,
    some of the reconstruction went to zero (an infinite divergence) and the history
    reported 1.9e-4 for PLCA's 8.3e-5."""
    g = torch.Generator().manual_seed(0)
    options = {} if make is PLCA else {"T": 3}
    truth = make(Vshape=(60, 40) if make is PLCA else (1, 40, 62), rank=3, **options).double()
    with torch.no_grad():
        for factor in (truth.W, truth.H):
            factor.copy_(torch.rand(factor.shape, generator=g, dtype=torch.float64))
        truth.W[::2] *= 1e-5  # every other column (channel) far under the others
        V = truth(norm=1.0)
    P = V / V.sum()
    assert (P < torch.finfo(torch.float32).eps).double().mean() >= 0.5
    fits = {}
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        model = make(Vshape=V.shape, rank=3, **options).to(dtype)
        model.fit(V.to(dtype), tol=0, max_iter=100)
        with torch.no_grad():
            Q = model().double()
        true = float(kl_div(Q, P))
        assert model.loss_history[-1] == pytest.approx(true, rel=1e-4)
        fits[dtype] = true
    assert fits[torch.float32] == pytest.approx(fits[torch.float64], rel=1e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_em_refuses_what_rounding_raised_at_an_exact_fit(seed):
    """EM never raises the divergence in exact arithmetic; at the float32 floor of an
    exact fit the iterates' rounding did, beyond 4 epsilons, 243 and 333 times in 1500
    iterations for these starts (9 of 12 seeds rose).  The rise is refused and the fit
    stops as converged, as MU's and HALS's (torchnmf.solvers.acceptance)."""
    generator = torch.Generator().manual_seed(seed)
    truth = PLCA((50, 30), rank=3)
    with torch.no_grad():
        for factor in (truth.W, truth.H):
            factor.copy_(torch.rand(factor.shape, generator=generator))
        V = truth(norm=1.0).clone()
    torch.manual_seed(seed)
    model = PLCA((50, 30), rank=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # a converged fit does not warn
        n_iter, _ = model.fit(V, tol=1e-12, max_iter=1500)
    history = model.loss_history
    eps = torch.finfo(torch.float32).eps
    assert n_iter < 1500 and len(history) == n_iter + 1
    assert history[-1] == history[-2]  # the refused iteration did not move
    assert all(b <= a * (1 + 4 * eps) for a, b in zip(history, history[1:]))
    assert history[-1] < 1e-6 * history[0]  # at the floor: a relative residual near 1e-7
    with torch.no_grad():  # the factors are where the last history entry was taken
        P = (V / V.sum()).double()
        assert float(kl_div(model().double(), P)) == pytest.approx(history[-1], rel=1e-2)


def test_em_with_priors_is_not_guarded(generator):
    """With Dirichlet priors EM's objective may rise, so nothing is refused."""
    V = torch.rand(20, 10, generator=generator)
    model = PLCA(V.shape, rank=3)
    model.fit(V, tol=0, max_iter=20, W_alpha=0.5)
    assert len(model.loss_history) == 21


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("make, vshape", [(PLCA, (50, 30)), (SIPLCA, (1, 30, 50))])
def test_the_history_is_accurate_near_an_exact_fit(make, vshape, dtype, generator):
    """On exact data each history entry is within 1% of the divergence of the factors
    the previous iteration left (in float64), and never rises by more than 64
    epsilons of its value: the closed form reported 7e-8 for a true 4e-11 on the
    float32 PLCA fit and rose 1452 times (up to 8e7 epsilons; SI-PLCA 679 times,
    measured by hand) before EM's divergence went through the explicit residual."""
    options = {} if make is PLCA else {"T": 4}
    truth = make(Vshape=vshape, rank=3, **options).to(dtype)
    with torch.no_grad():
        for factor in (truth.W, truth.H):
            factor.copy_(torch.rand(factor.shape, generator=generator, dtype=dtype))
        V = truth(norm=1.0).clone()
    model = make(Vshape=vshape, rank=3, **options).to(dtype)
    P = (V / V.sum()).double()
    after = []

    def callback(n_iter, loss):
        with torch.no_grad():
            R = make.reconstruct(model.H.double(), model.W.double(), model.Z.double())
            after.append(float(kl_div(R, P)))

    model.fit(V, tol=0, max_iter=1500, callback=callback)
    history = model.loss_history
    eps = torch.finfo(dtype).eps
    assert after[-1] < 1e-2 * history[0]  # towards the exact fit (SI-PLCA's EM is slow)
    for k in range(1, len(history)):
        assert history[k] == pytest.approx(after[k - 1], rel=1e-2)
        assert history[k] <= history[k - 1] * (1 + 64 * eps)


@pytest.mark.parametrize("norm, error, message", [
    (-1.0, ValueError, "norm must be non-negative, got -1.0"),
    (float("nan"), ValueError, "norm must be finite, got nan"),
    (torch.tensor(-2.0), ValueError, "norm must be non-negative, but its smallest entry is -2"),
    (torch.tensor(float("inf")), ValueError, "norm contains infinite values"),
    ("10", TypeError, "norm must be a real number"),
])
def test_forward_refuses_a_norm_no_target_sum_can_be(norm, error, message):
    """``norm`` is a target's sum: a negative or non-finite one raised nothing before
    and gave a negative or NaN reconstruction."""
    model = PLCA((4, 3), rank=2)
    with pytest.raises(error, match=message):
        model(norm=norm)
    assert_close(model(norm=torch.tensor(5.0)).sum(), torch.tensor(5.0))
