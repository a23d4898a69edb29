"""Online (minibatch) NMF: the surrogate, planted and real data, the estimator."""
import warnings

import numpy as np
import pytest
import torch

from torchnmf.nmf import NMF
from torchnmf.solvers.online import OnlineMU, surrogate

sklearn = pytest.importorskip("sklearn")
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from torchnmf import ConvergenceWarning  # noqa: E402
from torchnmf.estimator import TorchMiniBatchNMF  # noqa: E402


def _planted(generator, n=300, c=30, rank=5, noise=0.05):
    H = torch.rand(n, rank, generator=generator, dtype=torch.float64)
    W = torch.rand(c, rank, generator=generator, dtype=torch.float64)
    H[H < 0.5] = 0  # sparse factors: a planted solution that is well identified
    W[W < 0.5] = 0
    return H @ W.T + noise * torch.rand(n, c, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("beta", [1, 1.5, 2])
def test_the_surrogate_never_increases(generator, beta):
    V = _planted(generator, n=120, c=12)
    online = OnlineMU(torch.rand(12, 4, generator=generator, dtype=torch.float64) + 0.1, beta,
                      forget_factor=0.8)
    for start in range(0, 120, 15):
        batch = V[start:start + 15]
        online.partial_fit(batch, torch.full((15, 4), 0.5, dtype=torch.float64))
        before = surrogate(online.A, online.B, online.reference, online.reference, beta)
        after = surrogate(online.A, online.B, online.reference, online.W, beta)
        assert float(after) <= float(before) + 1e-12 * abs(float(before))
        # and the step is the surrogate's minimiser: no nearby point is lower
        for scale in (0.99, 1.01):
            nearby = surrogate(online.A, online.B, online.reference, online.W * scale, beta)
            assert float(after) <= float(nearby) + 1e-12 * abs(float(after))


@pytest.mark.parametrize("beta,passes", [(2, 250), (1, 100), (0.5, 100)])
def test_online_reaches_the_full_batch_loss_on_planted_data(generator, beta, passes):
    V = _planted(generator) + (0.01 if beta < 1 else 0)
    # the full-batch fit from the online estimator's default start (nndsvda): both
    # end in the same local minimum's basin, not in whichever an unseeded start finds
    full = NMF(V.shape, rank=5).double().initialize_(V, "nndsvda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        full.fit(V, beta=beta, tol=0, max_iter=1000)
    full_loss = full.loss_history[-1]
    # forget_factor weighs the past after a pass (5 batches): 0.5 after each batch
    model = TorchMiniBatchNMF(n_components=5, batch_size=60, beta_loss=beta, max_iter=passes,
                              tol=0, max_no_improvement=None, forget_factor=0.5 ** 5,
                              random_state=0, fresh_restarts_max_iter=50)
    model.fit(V.numpy())
    online_loss = model.reconstruction_err_ ** 2 / 2
    assert online_loss < 1.05 * full_loss, (online_loss, full_loss)


@pytest.mark.parametrize("beta", [1, 2])
def test_sparse_batches_give_the_dense_result(generator, beta):
    V = _planted(generator, n=90, c=10)
    V[V < 0.8] = 0
    dense = OnlineMU(torch.rand(10, 3, generator=generator, dtype=torch.float64) + 0.1, beta)
    sparse = OnlineMU(dense.W.clone(), beta)
    for start in range(0, 90, 30):
        start_codes = torch.full((30, 3), 0.3, dtype=torch.float64)
        H_dense, _ = dense.partial_fit(V[start:start + 30], start_codes.clone())
        H_sparse, _ = sparse.partial_fit(V[start:start + 30].to_sparse_csr(), start_codes.clone())
        torch.testing.assert_close(H_sparse, H_dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sparse.W, dense.W, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_a_beta_2_step_is_its_formula(generator, layout):
    """At beta 2 the state is column-major (its products are faster so); the steps are
    still the formulas of the module docstring, written out here on dense tensors."""
    V = _planted(generator, n=40, c=9)
    V[V < 0.6] = 0
    W = torch.rand(9, 3, generator=generator, dtype=torch.float64) + 0.1
    online = OnlineMU(W.clone(), 2, forget_factor=0.6)
    assert online.W.stride() == (1, 9)  # column-major, the caller's W copied
    A = B = None
    for start in (0, 20):
        batch = V[start:start + 20]
        H = torch.full((20, 3), 0.3, dtype=torch.float64)
        H_expected = H * (batch @ W) / (H @ (W.T @ W))  # one update of the codes
        negative, positive = batch.T @ H_expected, W @ (H_expected.T @ H_expected)
        if A is None:  # the starting templates weigh one sample
            B = positive / 20
            A = W * B
        A, B = 0.6 * A + W * negative, 0.6 * B + positive
        W = A / B
        got, _ = online.partial_fit(batch.to_sparse_csr() if layout == "sparse" else batch,
                                    H.clone(), max_iter_H=1)
        torch.testing.assert_close(got, H_expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(online.W, W, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(online.A, A, rtol=1e-12, atol=1e-14)
        assert online.W.stride() == online.A.stride() == online.B.stride() == (1, 9)


def test_the_penalty_on_W_weighs_the_rows_seen(generator):
    """The penalty per row meets the statistics weighted as they are: times
    n_t + rho n_(t-1) + ...  Before, one batch's penalty met ~1 / (1 - rho) batches'
    statistics: the estimator's components came out with 11 times scikit-learn's
    squared norm on the digits (alpha_H=0.1, batches of 256)."""
    from torchnmf.solvers.penalty import Penalty

    V = _planted(generator, n=32, c=9)
    W = torch.rand(9, 3, generator=generator, dtype=torch.float64) + 0.1
    penalty = Penalty(0.05, l1_ratio=0.4)
    online = OnlineMU(W.clone(), 2, forget_factor=0.6, penalty_W=penalty)
    A = B = None
    rows = 0.0
    for start, stop in ((0, 20), (20, 32)):  # batches of 20 and 12 rows
        batch = V[start:stop]
        H = torch.full((stop - start, 3), 0.3, dtype=torch.float64)
        H = H * (batch @ W) / (H @ (W.T @ W))
        negative, positive = batch.T @ H, W @ (H.T @ H)
        if A is None:
            B = positive / (stop - start)
            A = W * B
        A, B = 0.6 * A + W * negative, 0.6 * B + positive
        rows = 0.6 * rows + (stop - start)
        W = A / (B + rows * (penalty.l1 + penalty.l2 * W))
        online.partial_fit(batch, torch.full((stop - start, 3), 0.3, dtype=torch.float64),
                           max_iter_H=1)
        torch.testing.assert_close(online.W, W, rtol=1e-12, atol=1e-14)


def test_minibatch_on_real_data_and_partial_fit():
    from sklearn.datasets import load_digits

    X = load_digits().data  # 1797 x 64
    model = TorchMiniBatchNMF(n_components=10, batch_size=256, beta_loss=1, max_iter=20,
                              random_state=0, tol=0, max_no_improvement=None)
    codes = model.fit_transform(X)
    assert codes.shape == (1797, 10) and (codes >= 0).all()
    full = NMF(torch.Size(X.shape), rank=10).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        full.fit(torch.from_numpy(X), beta=1, tol=0, max_iter=300)
    # 20 passes of one update per batch (no fresh restarts): within 40% of 300
    # full-batch iterations (measured 36%), and no worse than scikit-learn's
    # MiniBatchNMF with the same batches, passes and forget factor (measured 38%)
    from sklearn.decomposition import MiniBatchNMF

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = MiniBatchNMF(10, batch_size=256, beta_loss=1, max_iter=20, tol=0,
                            max_no_improvement=None, random_state=0).fit(X)
    loss = model.reconstruction_err_ ** 2 / 2
    assert loss < 1.4 * full.loss_history[-1]
    assert loss < peer.reconstruction_err_ ** 2 / 2
    streamed = TorchMiniBatchNMF(n_components=10, beta_loss=1, random_state=0)
    for start in range(0, 1797, 256):
        streamed.partial_fit(X[start:start + 256])
    assert streamed.n_steps_ == 8
    transformed = streamed.transform(X[:5])
    assert transformed.shape == (5, 10)


@pytest.mark.parametrize("beta", [2, 1])
def test_online_reaches_the_full_batch_loss_on_digits(beta):
    from sklearn.datasets import load_digits

    X = load_digits().data  # 1797 x 64, a real dataset
    full = NMF(torch.Size(X.shape), rank=10).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        full.fit(torch.from_numpy(X), beta=beta, tol=0, max_iter=1000)
    # 50 passes of 3 batches, each batch's codes solved afresh: measured 0.99 of the
    # loss of 1000 full-batch iterations at beta 1
    model = TorchMiniBatchNMF(n_components=10, batch_size=600, beta_loss=beta, max_iter=50, tol=0,
                              max_no_improvement=None, forget_factor=0.1, fresh_restarts=True,
                              random_state=0).fit(X)
    assert model.reconstruction_err_ ** 2 / 2 < 1.05 * full.loss_history[-1]


@pytest.mark.parametrize("alpha_H,l1_ratio", [(1.0, 1.0), (0.05, 0.5)])
def test_penalised_minibatch_fit_reaches_scikit_learns_objective(alpha_H, l1_ratio):
    """The penalised objective (components penalised, scikit-learn's scaling) of the same
    settings: before, ours ended 52% (alpha_H=1) and 3% above scikit-learn's MiniBatchNMF."""
    from sklearn.datasets import load_digits
    from sklearn.decomposition import MiniBatchNMF

    X = load_digits().data[:300]
    kwargs = dict(n_components=5, batch_size=50, max_iter=30, tol=0, max_no_improvement=None,
                  alpha_W=0.0, alpha_H=alpha_H, l1_ratio=l1_ratio, random_state=0)

    def objective(model):
        codes = model.fit_transform(X)
        H = model.components_
        penalty = alpha_H * X.shape[0] * (l1_ratio * H.sum() + 0.5 * (1 - l1_ratio) * (H**2).sum())
        return 0.5 * ((X - codes @ H) ** 2).sum() + penalty

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert objective(TorchMiniBatchNMF(**kwargs)) <= objective(MiniBatchNMF(**kwargs))


def test_no_improvement_is_judged_over_about_a_pass():
    """The batch cost is smoothed with each batch's share of the samples, as
    scikit-learn's: with a fixed weight of 0.1 batches of 20 of 600 digits stopped
    after 68 steps, 9% above scikit-learn's MiniBatchNMF of the same settings."""
    from sklearn.datasets import load_digits
    from sklearn.decomposition import MiniBatchNMF

    X = load_digits().data[:600]
    kwargs = dict(n_components=8, batch_size=20, tol=1e-3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = TorchMiniBatchNMF(**kwargs)
        theirs = MiniBatchNMF(**kwargs)
        errors = [np.linalg.norm(X - model.fit_transform(X) @ model.components_)
                  for model in (ours, theirs)]
    assert errors[0] <= errors[1]


def test_forget_factor_weighs_a_whole_pass(generator):
    # as scikit-learn's: after each of the n / batch_size batches, the past weighs
    # forget_factor ** (batch_size / n), so forget_factor after a whole pass
    X = _planted(generator, n=120, c=8).numpy()
    model = TorchMiniBatchNMF(n_components=3, batch_size=30, forget_factor=0.6, max_iter=2, tol=0,
                              max_no_improvement=None, random_state=0).fit(X)
    assert model._online_state.forget_factor == pytest.approx(0.6 ** 0.25, rel=1e-12)
    model.partial_fit(X[:60])
    assert model._online_state.forget_factor == pytest.approx(0.6 ** 0.5, rel=1e-12)
    model.partial_fit(X[:10])  # a call with fewer samples than batch_size: one batch
    assert model._online_state.forget_factor == pytest.approx(0.6, rel=1e-12)


@pytest.mark.parametrize("beta", [2, 1])
def test_features_absent_from_the_first_batch_keep_their_templates(generator, beta):
    # the starting templates weigh as much as one sample: a feature with no entry
    # in the first batch is shrunk, not set to an exact zero (which no later batch
    # could undo)
    V = _planted(generator, n=40, c=10)
    V[:20, 7:] = 0
    W0 = torch.rand(10, 3, generator=generator, dtype=torch.float64) + 0.1
    online = OnlineMU(W0.clone(), beta, forget_factor=0.9)
    online.partial_fit(V[:20].to_sparse_csr(), torch.full((20, 3), 0.5, dtype=torch.float64))
    assert (online.W[7:] > 1e-3 * W0[7:]).all()
    assert (online.W[7:] < W0[7:]).all()
    online.partial_fit(V[20:].to_sparse_csr(), torch.full((20, 3), 0.5, dtype=torch.float64))
    assert (online.W[7:] > 0).all()


def test_minibatch_parameter_errors():
    X = np.ones((4, 3))
    with pytest.raises(ValueError, match=r"forget_factor must be a number in \[0, 1\], got 2"):
        TorchMiniBatchNMF(forget_factor=2).fit(X)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        TorchMiniBatchNMF(batch_size=0).fit(X)
    with pytest.raises(ValueError, match="max_no_improvement must be a positive integer or None"):
        TorchMiniBatchNMF(max_no_improvement=-1).fit(X)



def test_minibatch_refuses_zeros_at_beta_0():
    """Before: fit, a later partial_fit and transform took zeros at beta <= 0, the
    fit's reconstruction_err_ read inf."""
    X = np.arange(1.0, 13.0).reshape(4, 3)
    zeros = X.copy()
    zeros[0, 0] = 0
    with pytest.raises(ValueError, match="beta=0 needs a strictly positive X, but X has 1 zero"):
        TorchMiniBatchNMF(2, beta_loss="itakura-saito").fit(zeros)
    with pytest.raises(ValueError, match="beta=-0.5 needs a strictly positive X"):
        TorchMiniBatchNMF(2, beta_loss=-0.5).fit(zeros)
    model = TorchMiniBatchNMF(2, beta_loss="itakura-saito", random_state=0).partial_fit(X)
    components, steps = model.components_.copy(), model.n_steps_
    with pytest.raises(ValueError, match="beta=0 needs a strictly positive X"):
        model.partial_fit(zeros)
    with pytest.raises(ValueError, match="beta=0 needs a strictly positive X"):
        model.transform(zeros)
    np.testing.assert_array_equal(model.components_, components)
    assert model.n_steps_ == steps


def test_fresh_restarts_fit_transform_is_transform(generator):
    """With fresh restarts the final codes are solved afresh, as transform solves them;
    before, they started from the last pass and scikit-learn's check_transformer_general
    (its own MiniBatchNMF passes with these settings) found 5% apart."""
    X = _planted(generator, n=30, c=6).numpy()
    kwargs = dict(n_components=2, batch_size=10, max_iter=20, fresh_restarts=True, random_state=0)
    codes = TorchMiniBatchNMF(**kwargs).fit_transform(X)
    np.testing.assert_array_equal(codes, TorchMiniBatchNMF(**kwargs).fit(X).transform(X))

@parametrize_with_checks([TorchMiniBatchNMF(n_components=1, batch_size=10, max_iter=100,
                                            random_state=0)])
def test_sklearn_minibatch_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)



@pytest.mark.slow
# the settings scikit-learn checks its own MiniBatchNMF with
@parametrize_with_checks([TorchMiniBatchNMF(batch_size=10, max_iter=20, fresh_restarts=True)])
def test_sklearn_minibatch_checks_at_sklearns_settings(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)

def test_minibatch_start_samples_64_batches(generator, monkeypatch):
    # the online fit's start takes its singular vectors from 64 batches' worth of rows
    import torchnmf.init as init

    seen, original = [], init.initialize
    monkeypatch.setattr(init, "initialize",
                        lambda *a, **k: seen.append(k["sample_rows"]) or original(*a, **k))
    X = _planted(generator, n=300, c=10).numpy()
    TorchMiniBatchNMF(n_components=3, batch_size=2, max_iter=1, random_state=0).fit(X)
    TorchMiniBatchNMF(n_components=3, batch_size=500, max_iter=1, random_state=0).fit(X)
    assert seen == [128, 64 * 300]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("layout", ["dense", "sparse"])
@pytest.mark.parametrize("beta", [1, 2])
def test_cuda_online_matches_cpu(generator, beta, layout):
    """Online updates on CUDA (dense and CSR batches) follow the CPU's (``make gpu-check``)."""
    V = _planted(generator, n=90, c=10)
    V[V < 0.8] = 0
    W0 = torch.rand(10, 3, generator=generator, dtype=torch.float64) + 0.1
    cpu, gpu = OnlineMU(W0.clone(), beta), OnlineMU(W0.cuda(), beta)
    for start in range(0, 90, 30):
        batch = V[start:start + 30]
        codes = torch.full((30, 3), 0.3, dtype=torch.float64)
        H_cpu, _ = cpu.partial_fit(batch if layout == "dense" else batch.to_sparse_csr(),
                                   codes.clone())
        batch = batch.cuda()
        H_gpu, _ = gpu.partial_fit(batch if layout == "dense" else batch.to_sparse_csr(),
                                   codes.clone().cuda())
        torch.testing.assert_close(H_gpu.cpu(), H_cpu, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gpu.W.cpu(), cpu.W, rtol=1e-8, atol=1e-10)


def _digits32(offset=0.0):
    from sklearn.datasets import load_digits

    return load_digits().data[:600].astype(np.float32) + offset


@pytest.mark.parametrize("beta", [0, 1, 2])
@pytest.mark.parametrize("k", [-12, 12])
@pytest.mark.parametrize("penalty", [0.0, 0.1])
def test_minibatch_fits_of_scaled_data_are_scaled_fits(beta, k, penalty):
    """The digits (float32) times 4**k: components, codes, transform and partial_fit
    are the unscaled ones times 2**k, bit for bit, and the error 2**(k beta) times
    (the solver sees the data divided by its scale, a power of four; the penalty is
    transformed to match).  Without that, at 4**-12 the KL fit's floors at float32's
    epsilon sat above most reconstructed entries."""
    X = _digits32(1.0 if beta == 0 else 0.0)
    results = []
    for power in (0, k):
        scaled = X * np.float32(4.0**power)
        model = TorchMiniBatchNMF(6, batch_size=200, beta_loss=beta, max_iter=3, tol=0,
                                  max_no_improvement=None, random_state=0, init="random",
                                  alpha_W=penalty * 4.0 ** (power * (beta - 0.5)),
                                  l1_ratio=1.0)
        codes = model.fit_transform(scaled)
        streamed = TorchMiniBatchNMF(6, batch_size=200, beta_loss=beta, random_state=0,
                                     init="random")
        for start in range(0, 600, 200):
            streamed.partial_fit(scaled[start:start + 200])
        results.append((model.components_, codes, model.transform(scaled[:50]),
                        model.reconstruction_err_, streamed.components_,
                        streamed.transform(scaled[:50])))
    unscaled, scaled = results
    for index in (0, 1, 2, 4, 5):
        np.testing.assert_array_equal(scaled[index], unscaled[index] * np.float32(2.0**k))
    assert scaled[3] == pytest.approx(unscaled[3] * 2.0 ** (k * beta), rel=1e-12)


@pytest.mark.parametrize("beta", [0, 1, 2])
@pytest.mark.parametrize("scale", [1e-9, 1e9])
def test_minibatch_fits_any_scale_of_real_data(beta, scale):
    """The digits at 1e-9 and 1e9 (float32): the same error relative to the data as at
    unit scale, to 1e-4 (at 1e-9 the KL fit used to end at an infinite divergence and
    at 1e-6 the Itakura-Saito fit at a million times its error)."""
    X = _digits32(1.0 if beta == 0 else 0.0)
    errors = []
    for factor in (1.0, scale):
        model = TorchMiniBatchNMF(6, batch_size=200, beta_loss=beta, max_iter=3, tol=0,
                                  max_no_improvement=None, random_state=0)
        model.fit(X * np.float32(factor))
        errors.append(model.reconstruction_err_ / factor ** (beta / 2))
    assert np.isfinite(errors).all()
    assert errors[1] == pytest.approx(errors[0], rel=1e-4)
