"""The explicit residual's FFT reconstruction: its values, its error bound, and when it is taken."""
import pytest
import torch
from torch.testing import assert_close

from torchnmf.metrics import beta_div
from torchnmf.models.forward import conv_transpose
from torchnmf.nmf import NMF2D
from torchnmf.targets import convolution as _convolution
from torchnmf.targets import spectral
from torchnmf.targets.convolution import ConvStats, _pad_first_axis

# (batch, channels, rank, kernel, activations' shape without N and R): odd sizes,
# kernels longer on one axis, 2-D and 3-D
SHAPES = [
    (2, 3, 4, (9, 7), (13, 11)),
    (1, 5, 3, (6, 6), (27, 25)),
    (2, 2, 3, (4, 3, 5), (6, 7, 5)),
]


def integer_factors(generator, batch, channels, rank, kernel, inner):
    """Factors of small integers: their float64 convolution is exact."""
    H = torch.randint(0, 1000, (batch, rank, *inner), generator=generator).double()
    W = torch.randint(0, 1000, (channels, rank, *kernel), generator=generator).double()
    return H, W


@pytest.mark.parametrize("shape", SHAPES)
def test_the_fft_reconstruction_is_within_its_bound_of_the_exact_one(shape, generator):
    H, W = integer_factors(generator, *shape)
    exact = conv_transpose(H, W)  # sums of products of integers under 2^53: exact
    got = spectral.fft_reconstruction(H, W)
    assert got.shape == exact.shape
    error = (got - exact).flatten(2).norm(dim=-1)
    bound = spectral.error_bound(H, W)
    assert (error > 0).any()  # rounding there is, and the bound is not vacuous ...
    assert (error <= bound).all()
    assert (bound < 1e-10 * exact.flatten(2).norm(dim=-1)).all()  # ... nor loose beyond use


def test_a_block_of_rows_is_the_full_reconstruction_s(generator):
    """With ``pad``, rows ``pad : pad + rows`` of the activations' full convolution,
    as ConvStats's blocks (activations padded along the first axis) need them."""
    batch, channels, rank, kernel, inner = SHAPES[0]
    H, W = integer_factors(generator, *SHAPES[0])
    full = spectral.fft_reconstruction(H, W)
    k = kernel[0]
    padded = _pad_first_axis(H, k)
    a, b = 5, 12  # target rows of one block and the activations reaching them
    block = spectral.fft_reconstruction(padded[:, :, a:b + k - 1], W, k - 1, b - a)
    assert_close(block, full[:, :, a:b], rtol=0, atol=1e-6)


def test_the_slope_is_the_divergence_s_derivative(generator):
    V = torch.rand(2, 3, 5, 4, generator=generator, dtype=torch.float64) + 0.1
    R = torch.rand(V.shape, generator=generator, dtype=torch.float64) + 0.1
    mask = torch.rand(V.shape, generator=generator) > 0.4
    for beta in (0, 1, 1.5, 2):
        R_ = R.clone().requires_grad_()
        beta_div(R_, V, beta).backward()  # entry by entry: the slope
        assert_close(spectral.slope_norms(V, R, beta), R_.grad.flatten(2).norm(dim=-1))
        masked = (R_.grad * mask).flatten(2).norm(dim=-1)  # only observed entries count
        assert_close(spectral.slope_norms(V, R, beta, mask.double()), masked)


def test_fft_is_taken_for_long_2d_and_3d_templates_of_float32_fits_only():
    def cheaper(S_shape, W_shape, dtype=torch.float32, memory=1 << 22):
        return spectral.fft_cheaper(torch.empty(S_shape, dtype=torch.float64),
                                    torch.empty(W_shape, dtype=torch.float64), dtype, memory)

    assert cheaper((1, 10, 55, 55), (16, 10, 10, 10))  # 16 channels, 10x10: 15-24 ms direct
    assert cheaper((1, 6, 57, 57), (4, 6, 8, 8))
    assert cheaper((1, 6, 49, 49), (4, 6, 16, 16))
    assert not cheaper((1, 6, 63, 63), (4, 6, 2, 2))  # short templates: direct is faster
    assert not cheaper((1, 4, 14, 14, 14), (2, 4, 3, 3, 3))
    assert not cheaper((1, 8, 985), (257, 8, 16))  # 1-D: the spectra of many channels
    assert not cheaper((1, 10, 55, 55), (16, 10, 10, 10), torch.float64)  # float64's own epsilon
    assert not cheaper((1, 10, 55, 55), (16, 10, 10, 10), memory=1000)


def long_problem(generator, channels=4, rank=3, kernel=(8, 8), inner=(25, 23), noise=0.05):
    H = torch.rand(1, rank, *inner, generator=generator).pow_(4)
    W = torch.rand(channels, rank, *kernel, generator=generator)
    V = NMF2D.reconstruct(H, W)
    V += noise * float(V.mean()) * torch.rand(V.shape, generator=generator)
    return V, H, W


def counting(monkeypatch):
    """Count the calls of :func:`spectral.fft_reconstruction` from now on."""
    calls = []
    original = spectral.fft_reconstruction
    monkeypatch.setattr(spectral, "fft_reconstruction",
                        lambda *args: calls.append(1) or original(*args))
    return calls


def direct(V, beta, **options):
    """Statistics that take the float64 convolution (as after a refusal)."""
    stats = ConvStats(V, beta, **options)
    stats._fft_refused = True
    return stats


@pytest.mark.parametrize("beta", [0, 1, 1.5, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_the_explicit_residual_by_ffts_equals_the_convolution_s(beta, masked, generator, monkeypatch):
    """Where the FFTs are taken (counted) the value is the convolution's to the share
    of an epsilon they are allowed, also block by block."""
    V, H, W = long_problem(generator)
    H, W = H * 1.1 + 0.01, W * 0.9 + 0.01  # near the truth, not at it
    mask = torch.rand(V.shape, generator=generator) > 0.3 if masked else None
    calls = counting(monkeypatch)
    for limit in (None, 2000):
        stats = ConvStats(V, beta, mask=mask, block_elements=limit)
        got = float(stats.explicit_divergence(H, W))
        assert (len(calls) == 1 if limit is None else len(calls) > 1) and not stats._fft_refused
        calls.clear()
        want = float(direct(V, beta, mask=mask, block_elements=limit).explicit_divergence(H, W))
        assert not calls
        assert got == pytest.approx(want, rel=spectral.SHARE * torch.finfo(torch.float32).eps)


def test_near_an_exact_fit_the_convolution_is_kept(generator, monkeypatch):
    """At an exact fit the FFTs' rounding could reach the objective: the value is the
    convolution's, bit for bit, and the FFTs are not tried again in that fit."""
    V, H, W = long_problem(generator, noise=0)
    calls = counting(monkeypatch)
    stats = ConvStats(V, 1)
    got = stats.explicit_divergence(H, W)
    assert calls and stats._fft_refused
    assert torch.equal(got, direct(V, 1).explicit_divergence(H, W))
    calls.clear()
    stats.explicit_divergence(H, W)
    assert not calls


def test_a_float64_fit_never_takes_the_ffts(generator, monkeypatch):
    V, H, W = long_problem(generator)
    monkeypatch.setattr(spectral, "fft_reconstruction", lambda *args: pytest.fail("FFTs taken"))
    ConvStats(V.double(), 1).explicit_divergence(H.double(), W.double())


def test_a_photograph_s_long_fit_follows_the_convolution_s(monkeypatch):
    """scikit-learn's china.jpg (3 colour channels, 26x40 after pooling) with 8x8
    templates at rank 12 crosses into the explicit residual at iteration 158: the
    history with the FFTs is the one without, and never rises."""
    datasets = pytest.importorskip("sklearn.datasets")
    pytest.importorskip("PIL")
    image = torch.tensor(datasets.load_sample_image("china.jpg"), dtype=torch.float32)
    V = torch.nn.functional.avg_pool2d(image.permute(2, 0, 1)[None], 16) / 255 + 0.01
    taken = counting(monkeypatch)
    histories = []
    for allowed in (True, False):
        if not allowed:
            monkeypatch.setattr(spectral, "fft_cheaper", lambda *args: False)
        torch.manual_seed(0)
        model = NMF2D(V.shape, rank=12, kernel_size=(8, 8))
        model.fit(V, beta=1, max_iter=200, tol=0)
        histories.append(torch.tensor(model.loss_history, dtype=torch.float64))
    with_ffts, without = histories
    assert taken  # the fit reached the explicit residual and took the FFTs there
    assert (with_ffts[1:] <= with_ffts[:-1]).all()
    assert_close(with_ffts, without, rtol=1e-6, atol=0)
