import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from conftest import unchanged, low_rank
from torchnmf import ConvergenceWarning
from torchnmf.targets.autograd import AutogradStats
from torchnmf.targets.dense import DenseMatrixStats
from torchnmf.metrics import beta_div
from torchnmf.nmf import NMF, NMF2D, NMF3D, NMFD, BaseComponent
from torchnmf.plca import PLCA

BETAS = [0, 0.5, 1, 1.5, 2, 3]


def positive_problem(generator, n=12, c=9, rank=3, dtype=torch.float64):
    V, _, _ = low_rank(n, c, rank, generator, dtype=dtype, noise=0.3)
    return V + 0.05


# -- construction ----------------------------------------------------------------
def test_shapes_from_vshape():
    model = NMF((20, 7), rank=3)
    assert model.W.shape == (7, 3) and model.H.shape == (20, 3)
    assert model.rank == 3 and model.out_channels == 7 and model.kernel_size == ()
    assert NMF((20, 7)).rank == 7  # rank defaults to the channel count
    d = NMFD((4, 6, 30), rank=2, T=5)
    assert d.W.shape == (6, 2, 5) and d.H.shape == (4, 2, 26) and d.kernel_size == (5,)
    d2 = NMF2D((2, 3, 10, 12), rank=4, kernel_size=(3, 2))
    assert d2.W.shape == (3, 4, 3, 2) and d2.H.shape == (2, 4, 8, 11)
    d3 = NMF3D((1, 2, 6, 7, 8), rank=2, kernel_size=2)
    assert d3.W.shape == (2, 2, 2, 2, 2) and d3.H.shape == (1, 2, 5, 6, 7)
    for m in (model, d, d2, d3):
        assert m().shape == m._output_shape()


def test_factors_from_tensors_are_copied_and_keep_dtype(generator):
    W = torch.rand(5, 2, generator=generator, dtype=torch.float64)
    model = NMF(W=W, H=(8, 2))
    assert model.W.dtype == torch.float64 and model.H.dtype == torch.float64
    assert model.rank == 2
    with torch.no_grad():
        model.W.zero_()
    assert W.abs().sum() > 0  # the caller's tensor is untouched


def test_none_factor_and_forward_with_inputs(generator):
    model = NMF(W=(6, 3))
    assert model.H is None and model.rank == 3
    H = torch.rand(4, 3, generator=generator)
    assert_close(model(H), H @ model.W.T)
    with pytest.raises(ValueError, match="H is needed"):
        model()
    assert_close(BaseComponent.reconstruct is not None, True)


def test_trainable_flags(generator):
    V = torch.rand(10, 6, generator=generator, dtype=torch.float64)
    W0 = torch.rand(6, 2, generator=generator, dtype=torch.float64)
    model = NMF(V.shape, rank=2, W=W0, trainable_W=False)
    assert not model.W.requires_grad and model.H.requires_grad
    model.fit(V, max_iter=5, tol=0)
    assert torch.equal(model.W.detach(), W0)
    assert "fixed" in repr(model)


def test_module_moves_and_casts():
    model = NMF((5, 4), rank=2).double()
    assert model.W.dtype == torch.float64
    assert "rank=2" in repr(model) and "out_channels=4" in repr(model)


# -- errors ------------------------------------------------------------------
def test_construction_errors():
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        NMF((4, 5), rank=0)
    with pytest.raises(TypeError, match="rank must be a positive integer"):
        NMF((4, 5), rank=2.5)
    with pytest.raises(ValueError, match="inconsistent ranks"):
        BaseComponent(W=(4, 3), H=(5, 2))
    with pytest.raises(ValueError, match="inconsistent ranks"):
        BaseComponent(rank=4, W=(4, 3))
    with pytest.raises(ValueError, match="rank is required"):
        BaseComponent()
    with pytest.raises(ValueError, match="W must be non-negative"):
        NMF(W=-torch.ones(3, 2))
    with pytest.raises(ValueError, match="H contains NaN"):
        NMF(H=torch.full((3, 2), float("nan")))
    with pytest.raises(ValueError, match="NMF expects a 2-dimensional Vshape, got 3"):
        NMF((2, 3, 4))
    with pytest.raises(ValueError, match="NMFD expects a 3-dimensional Vshape, got 2"):
        NMFD((2, 3), T=1)
    with pytest.raises(ValueError, match="NMF2D expects a 4-dimensional Vshape"):
        NMF2D((2, 3, 4))
    with pytest.raises(ValueError, match="NMF3D expects a 5-dimensional Vshape"):
        NMF3D((2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"Vshape must hold positive integers, got \(3, 0\)"):
        NMF((3, 0), rank=2)
    with pytest.raises(ValueError, match=r"Vshape must hold positive integers, got \(3, True\)"):
        NMF((3, True), rank=2)
    with pytest.raises(ValueError, match=r"W shape must hold positive integers, got \(3, 2.0\)"):
        NMF(W=(3, 2.0), H=(4, 2))
    with pytest.raises(ValueError, match="longer than axis 2"):
        NMFD((2, 3, 4), T=5)
    with pytest.raises(TypeError, match="W must be a shape"):
        NMF(W="big")
    with pytest.raises(TypeError, match="trainable_W must be a bool"):
        NMF((3, 3), trainable_W=1)
    with pytest.raises(TypeError, match="T must be a positive integer or a sequence of 1, got 2.5"):
        NMFD((2, 3, 8), T=2.5)
    with pytest.raises(TypeError, match="kernel_size must be a positive integer or a sequence of 3"):
        NMF3D((1, 2, 8, 8, 8), kernel_size=None)


def test_factors_of_different_dtypes_are_refused_before_any_work(generator):
    """W and H of different dtypes fail at construction, and at fit when a factor was
    changed later (before: torch's "Expected out tensor to have dtype double" from
    inside the first product), naming both factors; nothing is modified."""
    W, H = torch.rand(6, 2, generator=generator), torch.rand(9, 2, generator=generator)
    with pytest.raises(TypeError, match=r"W and H must have the same dtype, got torch.float32 and torch.float64"):
        NMF(W=W, H=H.double())
    model = NMF(W=W, H=H)
    model.H.data = model.H.data.double()
    before = [p.detach().clone() for p in model.parameters()]
    V = torch.rand(9, 6, generator=generator)
    for call in (lambda: model.fit(V), lambda: model.fit(V, block_rows=4),
                 lambda: model.sparse_fit(V, sW=0.5), lambda: model.fit(V, solver="hals", beta=2)):
        with pytest.raises(TypeError, match=r"W and H must have the same dtype.*model.to\(torch.float64\)"):
            call()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    plca = PLCA((9, 6), rank=2)
    plca.Z.data = plca.Z.data.double()
    with pytest.raises(TypeError, match="W and Z must have the same dtype"):
        plca.fit(V)


def test_forward_errors_name_the_factor(generator):
    """Factors given to forward that the map cannot combine fail at the entry, with
    the shapes, not inside torch's kernels."""
    model = NMFD((1, 8, 20), rank=2, T=3)
    with pytest.raises(ValueError, match=r"same rank \(dimension 1 of each\), got H of shape \(1, 3, 18\)"):
        model(torch.rand(1, 3, 18, generator=generator))
    with pytest.raises(ValueError, match=r"NMF2D needs a 4-dimensional H, got shape \(2, 14, 14\)"):
        NMF2D((1, 4, 16, 16), rank=2, kernel_size=3)(torch.rand(2, 14, 14, generator=generator))
    with pytest.raises(ValueError, match="NMFD needs a 3-dimensional W"):
        model(W=torch.rand(8, 2, generator=generator))
    matrix = NMF((5, 4), rank=2)
    with pytest.raises(ValueError, match=r"dimension 1 of W, the last of H\), got H of shape \(5, 3\)"):
        matrix(torch.rand(5, 3, generator=generator))
    with pytest.raises(TypeError, match="H must be a tensor, got list"):
        matrix([[1.0, 2.0]])
    with pytest.raises(TypeError, match="same dtype, got torch.float64 and torch.float32"):
        matrix(torch.rand(5, 2, generator=generator, dtype=torch.float64))
    # what the map accepts still works: batch dimensions before a matrix model's rank
    H = torch.rand(7, 5, 2, generator=generator)
    assert_close(matrix(H), H @ matrix.W.detach().T)
    assert model(W=model.W.detach() * 2).shape == (1, 8, 20)


def test_fit_errors(generator):
    model = NMF((6, 5), rank=2)
    V = torch.rand(6, 5, generator=generator)
    with unchanged(model, V), pytest.raises(ValueError, match="V must be non-negative"):
        model.fit(-V)
    bad = V.clone()
    bad[0, 0] = float("nan")
    with unchanged(model, V), pytest.raises(ValueError, match="V contains NaN"):
        model.fit(bad)
    bad[0, 0] = float("inf")
    with unchanged(model, V), pytest.raises(ValueError, match="V contains infinite values"):
        model.fit(bad)
    with unchanged(model, V), pytest.raises(ValueError, match=r"V must have the shape of the reconstruction \(6, 5\), got \(5, 6\)"):
        model.fit(V.T)
    with unchanged(model, V), pytest.raises(TypeError, match="V must be a torch.Tensor"):
        model.fit(V.numpy())
    zeros = V.clone()
    zeros[1, 1] = 0
    with unchanged(model, V), pytest.raises(ValueError, match=r"beta=0 needs a strictly positive V.*V \+ 1e-6"):
        model.fit(zeros, beta=0)
    with unchanged(model, V), pytest.raises(ValueError, match="beta=-1 needs a strictly positive V"):
        model.fit(zeros, beta=-1)
    with unchanged(model, V), pytest.raises(ValueError, match="alpha must be non-negative, got -1.0"):
        model.fit(V, alpha=-1)
    with unchanged(model, V), pytest.raises(ValueError, match=r"l1_ratio must lie in \[0, 1\], got 1.5"):
        model.fit(V, l1_ratio=1.5)
    with unchanged(model, V), pytest.raises(ValueError, match="max_iter must be a positive integer, got 0"):
        model.fit(V, max_iter=0)
    with unchanged(model, V), pytest.raises(ValueError, match="tol must be non-negative"):
        model.fit(V, tol=-1)
    with unchanged(model, V), pytest.raises(ValueError, match="solver must be one of"):
        model.fit(V, solver="magic")
    with unchanged(model, V), pytest.raises(ValueError, match="fit needs both factors"):
        NMF(W=(5, 2)).fit(V)


def test_fit_never_modifies_v(generator):
    V = torch.rand(8, 6, generator=generator)
    copy = V.clone()
    for beta in (2, 1, 0.5):
        NMF(V.shape, rank=2).fit(V, beta=beta, max_iter=3, tol=0)
    assert torch.equal(V, copy)


# -- numbers -----------------------------------------------------------------------
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("alpha,l1_ratio", [(0, 0), (0.1, 0.0), (0.1, 1.0), (0.05, 0.5)])
def test_objective_never_increases(beta, alpha, l1_ratio, generator):
    V = positive_problem(generator)
    torch.manual_seed(1)
    model = NMF(V.shape, rank=3).double()
    model.fit(V, beta=beta, max_iter=60, tol=0, alpha=alpha, l1_ratio=l1_ratio)
    history = torch.tensor(model.loss_history, dtype=torch.float64)
    assert len(history) == 61
    increases = history[1:] - history[:-1]
    assert (increases <= 1e-10 * history[:-1].abs()).all(), increases.max()
    assert history[-1] < history[0]
    assert (model.W >= 0).all() and (model.H >= 0).all()


@pytest.mark.parametrize("beta", BETAS)
def test_history_matches_metric(beta, generator):
    V = positive_problem(generator)
    model = NMF(V.shape, rank=3).double()
    model.fit(V, beta=beta, max_iter=7, tol=0, alpha=0.1, l1_ratio=0.3)
    penalty = 0.1 * (0.3 * (model.W.sum() + model.H.sum()) + 0.35 * (model.W.pow(2).sum() + model.H.pow(2).sum()))
    expected = beta_div(model(), V, beta) + penalty
    assert model.loss_history[-1] == pytest.approx(expected.item(), rel=1e-9)


def naive_mu_step(V, H, W, beta, gamma):
    """One textbook multiplicative update of H then W, built from the full reconstruction."""
    WH = H @ W.T
    H = H * ((V * WH ** (beta - 2)) @ W / (WH ** (beta - 1) @ W)) ** gamma
    WH = H @ W.T
    W = W * ((V * WH ** (beta - 2)).T @ H / ((WH ** (beta - 1)).T @ H)) ** gamma
    return H, W


@pytest.mark.parametrize("beta,gamma", [(0, 0.5), (0.5, 1 / 1.5), (1, 1), (1.5, 1), (2, 1), (3, 0.5)])
def test_iterates_match_naive_reference(beta, gamma, generator):
    V = positive_problem(generator)
    model = NMF(V.shape, rank=3).double()
    H, W = model.H.detach().clone(), model.W.detach().clone()
    model.fit(V, beta=beta, max_iter=5, tol=0)
    for _ in range(5):
        H, W = naive_mu_step(V, H, W, beta, gamma)
    assert_close(model.H.detach(), H)
    assert_close(model.W.detach(), W)


@pytest.mark.parametrize("beta", BETAS)
def test_closed_form_and_autograd_paths_agree(beta, generator):
    V = positive_problem(generator)
    model = NMF(V.shape, rank=3).double()
    H, W = model.H.detach(), model.W.detach()
    dense = DenseMatrixStats(V, beta, block_elements=40)  # several row blocks
    generic = AutogradStats(V, beta, NMF.reconstruct)
    for (neg_a, pos_a, div_a), (neg_b, pos_b, div_b) in [
        (dense.h_terms(H, W), generic.h_terms(H, W)),
    ]:
        assert_close(neg_a.clone(), neg_b)
        assert_close(pos_a.expand_as(pos_b).clone(), pos_b)
        assert float(div_a) == pytest.approx(float(div_b), rel=1e-10)
    neg_a, pos_a = dense.w_terms(H, W)
    neg_b, pos_b = generic.w_terms(H, W)
    assert_close(neg_a, neg_b)
    assert_close(pos_a.expand_as(pos_b), pos_b)


@pytest.mark.parametrize("beta", BETAS)
def test_divergence_from_either_side(beta, generator):
    """w_terms(divergence=True) gives h_terms' divergence; h_terms(divergence=False) skips it."""
    V = positive_problem(generator)
    model = NMF(V.shape, rank=3).double()
    H, W = model.H.detach(), model.W.detach()
    dense = DenseMatrixStats(V, beta, block_elements=40)
    neg_h, pos_h, div_h = dense.h_terms(H, W)
    neg_h, pos_h = neg_h.clone(), pos_h.clone()
    neg_w, pos_w = (t.clone() for t in dense.w_terms(H, W))
    *terms_w, div_w = dense.w_terms(H, W, divergence=True)
    assert float(div_w) == pytest.approx(float(div_h), rel=1e-10)
    assert float(div_h) == pytest.approx(float(beta_div(H @ W.T, V, beta)), rel=1e-10)
    for got, want in zip(terms_w, (neg_w, pos_w)):
        assert_close(got, want)
    *terms_h, nothing = dense.h_terms(H, W, divergence=False)
    assert nothing is None
    for got, want in zip(terms_h, (neg_h, pos_h)):
        assert_close(got, want)


@pytest.mark.parametrize("beta", [0.5, 1, 2])
def test_nmfd_with_t1_equals_nmf(beta, generator):
    V = positive_problem(generator)
    nmf = NMF(V.shape, rank=3).double()
    nmfd = NMFD(
        V.shape + (1,), T=1, W=nmf.W.detach()[:, :, None], H=nmf.H.detach()[:, :, None]
    )
    nmf.fit(V, beta=beta, max_iter=10, tol=0)
    nmfd.fit(V[:, :, None], beta=beta, max_iter=10, tol=0)
    assert_close(nmfd.W.detach()[:, :, 0], nmf.W.detach())
    assert_close(nmfd.H.detach()[:, :, 0], nmf.H.detach())
    assert nmfd.loss_history == pytest.approx(nmf.loss_history, rel=1e-9)


def test_convolution_reconstruct_matches_definition(generator):
    W = torch.rand(3, 2, 4, generator=generator, dtype=torch.float64)
    H = torch.rand(2, 2, 7, generator=generator, dtype=torch.float64)
    out = NMFD.reconstruct(H, W)
    expected = torch.zeros(2, 3, 10, dtype=torch.float64)
    for t in range(4):
        expected[:, :, t:t + 7] += torch.einsum("cr,nrl->ncl", W[:, :, t], H)
    assert_close(out, expected)


@pytest.mark.parametrize("cls,shape,kw", [
    (NMFD, (2, 5, 20), dict(T=3)),
    (NMF2D, (2, 4, 9, 8), dict(kernel_size=(2, 3))),
    (NMF3D, (1, 3, 5, 6, 4), dict(kernel_size=2)),
])
@pytest.mark.parametrize("beta", [0.5, 1, 2])
def test_convolutional_fit_decreases(cls, shape, kw, beta, generator):
    V = torch.rand(shape, generator=generator, dtype=torch.float64) + 0.1
    model = cls(shape, rank=2, **kw).double()
    model.fit(V, beta=beta, max_iter=15, tol=0)
    history = torch.tensor(model.loss_history)
    assert (history[1:] <= history[:-1] * (1 + 1e-10)).all()
    assert history[-1] < history[0]


def test_recovers_planted_factors(generator):
    rank = 3
    H_true = torch.rand(40, rank, generator=generator, dtype=torch.float64)
    W_true = torch.rand(30, rank, generator=generator, dtype=torch.float64)
    # make the factors separable so that the factorisation is unique up to scale/permutation
    H_true[:rank] = torch.eye(rank, dtype=torch.float64)
    W_true[:rank] = torch.eye(rank, dtype=torch.float64)
    V = H_true @ W_true.T
    torch.manual_seed(0)
    model = NMF(V.shape, rank=rank).double()
    model.fit(V, beta=2, max_iter=3000, tol=0)
    assert beta_div(model(), V, 2) / (V ** 2).sum() < 1e-6
    W = model.W.detach() / model.W.detach().norm(dim=0)
    W_ref = W_true / W_true.norm(dim=0)
    similarity = W.T @ W_ref  # cosine similarities between found and planted templates
    assert (similarity.max(dim=0).values > 0.99).all()


def test_float64_in_float64_out(generator):
    V = torch.rand(10, 8, generator=generator, dtype=torch.float64)
    model = NMF(W=torch.rand(8, 3, dtype=torch.float64), H=(10, 3))
    model.fit(V, max_iter=3, tol=0)
    assert model.W.dtype == torch.float64 and model().dtype == torch.float64


def test_integer_counts_are_accepted(generator):
    V = torch.randint(0, 5, (10, 8), generator=generator)
    model = NMF(V.shape, rank=2)
    model.fit(V, beta=1, max_iter=5, tol=0)
    assert model.loss_history[-1] < model.loss_history[0]


def test_early_stop_callback_and_warning(generator):
    V = positive_problem(generator)
    model = NMF(V.shape, rank=3).double()
    n_iter = model.fit(V, beta=1, tol=1e-3, max_iter=1000)
    assert n_iter < 1000 and len(model.loss_history) == n_iter + 1
    h = model.loss_history
    assert (h[-3] - h[-2]) / h[-3] < 1e-3

    seen = []
    model = NMF(V.shape, rank=3).double()
    n_iter = model.fit(V, tol=0, max_iter=50, callback=lambda i, loss: seen.append(i) or i == 4)
    assert n_iter == 4 and seen == [1, 2, 3, 4]

    with pytest.warns(ConvergenceWarning, match="max_iter=2"):
        NMF(V.shape, rank=3).double().fit(V, max_iter=2, tol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NMF(V.shape, rank=3).double().fit(V, max_iter=2, tol=0)


def test_verbose_shows_progress_bar(generator, capsys):
    V = positive_problem(generator)
    NMF(V.shape, rank=2).double().fit(V, max_iter=3, tol=0, verbose=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "loss=" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("beta", [0.5, 1, 2])
def test_cuda_matches_cpu(beta, generator):
    V = positive_problem(generator)
    model = NMF(V.shape, rank=3).double()
    gpu = NMF(V.shape, rank=3, W=model.W.detach(), H=model.H.detach()).cuda()
    model.fit(V, beta=beta, max_iter=10, tol=0)
    gpu.fit(V.cuda(), beta=beta, max_iter=10, tol=0)
    assert_close(gpu.W.detach().cpu(), model.W.detach())


@pytest.mark.parametrize("kernel,h_shape", [((4,), (2, 3, 7)), ((2, 3), (2, 3, 5, 4)), ((2, 1, 3), (1, 2, 3, 4, 2))])
def test_unfolded_and_transposed_convolution_agree(kernel, h_shape, generator, monkeypatch):
    from torchnmf.models import forward

    W = torch.rand(5, h_shape[1], *kernel, generator=generator, dtype=torch.float64)
    H = torch.rand(*h_shape, generator=generator, dtype=torch.float64)
    fast = forward.conv_transpose(H, W)
    monkeypatch.setattr(forward, "UNFOLD_LIMIT", 0)
    reference = forward.conv_transpose(H, W)
    assert_close(fast, reference)
    direct = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[len(kernel)]
    assert_close(reference, direct(H, W.transpose(0, 1)))


@pytest.mark.parametrize("solver", ["mu", "mu_extrapolated", "hals"])
def test_a_fit_whose_objective_overflows_leaves_the_model_alone(solver, generator):
    """Float64 data at 1e300: half the squared error overflows at the start.  The fit
    raises FloatingPointError before changing the model (before: the factors of the
    first update and a loss_history of [inf] stayed behind)."""
    V = torch.rand(30, 12, generator=generator, dtype=torch.float64) * 1e300
    model = NMF(W=torch.rand(12, 2, generator=generator, dtype=torch.float64),
                H=torch.rand(30, 2, generator=generator, dtype=torch.float64))
    model.loss_history = [1.0, 0.5]  # a previous fit's
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="the objective was inf at the start"):
        model.fit(V, beta=2, solver=solver, max_iter=5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert model.loss_history == [1.0, 0.5]


@pytest.mark.parametrize("make,shape", [
    (lambda: NMF(W=(3, 1), H=(2, 1)), (2, 3)),
    (lambda: NMFD(W=(2, 1, 2), H=(1, 1, 2)), (1, 2, 3)),
    (lambda: NMF2D(W=(1, 1, 2, 2), H=(1, 1, 2, 2)), (1, 1, 3, 3)),
])
def test_an_overflowing_penalised_objective_leaves_the_model_alone(make, shape, generator):
    """As above with a penalty, whose objective comes back as a 0-dim CPU tensor:
    before, the guard saw only Python floats, so the factors of the first update
    and a loss_history of [tensor(inf)] stayed behind."""
    V = torch.rand(shape, generator=generator, dtype=torch.float64) * 1e300
    model = make().double()
    model.loss_history = [1.0, 0.5]
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="the objective was inf at the start"):
        model.fit(V, beta=2, alpha=1e200, max_iter=5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert model.loss_history == [1.0, 0.5]


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_data_beyond_a_narrow_models_range_is_refused(layout, generator):
    """float32 data up to 1e5 for a float16 model: the conversion made infinities and
    the fit failed with Python's "cannot convert float infinity to integer"."""
    V = torch.rand(30, 12, generator=generator) * 1e5
    model = NMF(V.shape, rank=2).half()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"V's largest entry, 9\d+(\.\d+)?, exceeds torch.float16's largest value 65504"):
        model.fit(V if layout == "dense" else V.to_sparse(), max_iter=5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # data at 1e-9 became zeros in float16, "fitted" with an objective of 0
    with pytest.raises(ValueError, match=r"V's mean non-zero entry, 4.+e-10, is under torch.float16's"):
        model.fit(V * 1e-14 if layout == "dense" else (V * 1e-14).to_sparse(), max_iter=5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert model.fit(V / 1e3, max_iter=5, tol=0) == 5  # within range: fitted in float16


def _digits(rows=200):
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().data[:rows], dtype=torch.float32) + 0.1


@pytest.mark.parametrize("kind,beta", [
    (kind, beta) for kind in ("dense", "sparse", "masked", "NMFD") for beta in (0, 1, 2)
    if not (kind == "sparse" and beta == 0)  # (beta <= 0 needs the zeros a sparse V omits)
])
def test_float16_models_are_fitted_in_float32(kind, beta):
    """A float16 fit is the float32 fit of the same float16 numbers, rounded: float16's
    range cannot hold the updates' powers and sums (on the digits the KL objective
    was inf at iteration 1, Itakura-Saito NaN at iteration 19)."""
    V16 = _digits().half()
    options = dict(beta=beta, max_iter=15, tol=0)
    if kind == "masked":
        options["mask"] = torch.rand(V16.shape, generator=torch.Generator().manual_seed(0)) > 0.2
    if kind == "NMFD":
        V16 = V16.T.unsqueeze(0).contiguous()
        model16 = NMFD(V16.shape, rank=3, T=4).half()
    else:
        model16 = NMF(V16.shape, rank=4).half()
    model32 = copy.deepcopy(model16).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model16.fit(V16.to_sparse() if kind == "sparse" else V16, **options)
        model32.fit(V16.float().to_sparse() if kind == "sparse" else V16.float(), **options)
    assert model16.W.dtype == torch.float16
    assert model16.loss_history == model32.loss_history
    assert torch.equal(model16.W.detach(), model32.W.detach().half())
    assert torch.equal(model16.H.detach(), model32.H.detach().half())


def test_bfloat16_fits_of_sparse_targets():
    """bfloat16 keeps float32's range and is fitted in itself; torch's sampled product
    takes no bfloat16, and sparse fits at beta != 2 raised inside it."""
    V = _digits().bfloat16()
    fits = []
    for target in (V, V.to_sparse()):
        model = NMF(V.shape, rank=4).bfloat16()
        torch.manual_seed(0)
        model.initialize_(V, "nndsvda")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(target, beta=1, max_iter=15, tol=0)
        fits.append(model.loss_history)
    assert fits[1] == pytest.approx(fits[0], rel=1e-2)
    assert fits[1][-1] < fits[1][0] / 2


def test_float16_restarts_are_fitted_in_float32():
    from torchnmf.restarts import fit_restarts

    V16 = _digits().half()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        half = fit_restarts(V16, [3], n_restarts=2, beta=1, max_iter=10)
        single = fit_restarts(V16.float(), [3], n_restarts=2, beta=1, max_iter=10)
    assert half.histories == single.histories
    assert all(w.dtype == torch.float16 and torch.equal(w, w32.half())
               for w, w32 in zip(half.W, single.W))


def test_float16_sums():
    """Sums the statistics take of float16 tensors are taken in float32 (a trainer's
    step on a float16 model of the digits read an infinite mean)."""
    from torchnmf.targets.dense import accurate_inner, float64_sum, inner

    ones = torch.ones(400, 300, dtype=torch.float16)
    assert float(float64_sum(ones)) == 120000
    assert float(inner(ones, ones)) == 120000
    assert float(accurate_inner(ones, ones)) == 120000
