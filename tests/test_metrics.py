import math

import pytest
import torch
from torch.testing import assert_close

from torchnmf import metrics


def naive_beta_div(x, y, beta):
    """Entry-by-entry beta-divergence D(y | x) in plain Python, exact limits; zeros
    floored at epsilon times the power of two nearest the target's mean entry."""
    total = 0.0
    values = y.flatten().tolist()
    mean = sum(values) / len(values)
    eps = torch.finfo(torch.float64).eps * (2.0 ** round(math.log2(mean)) if mean > 0 else 1.0)
    for xi, yi in zip(x.flatten().tolist(), y.flatten().tolist()):
        if beta == 2:
            total += (yi - xi) ** 2 / 2
        elif beta == 1:
            xi = max(xi, eps)
            total += (yi * math.log(yi / xi) if yi > 0 else 0.0) - yi + xi
        elif beta == 0:
            xi, yi = max(xi, eps), max(yi, eps)
            total += yi / xi - math.log(yi / xi) - 1
        else:
            if beta < 1:
                xi = max(xi, eps)
            if beta < 0:
                yi = max(yi, eps)
            total += (yi ** beta + (beta - 1) * xi ** beta - beta * yi * xi ** (beta - 1)) / (
                beta * (beta - 1)
            )
    return total


@pytest.mark.parametrize("beta", [-0.5, 0, 0.5, 1, 1.5, 2, 3])
@pytest.mark.parametrize("zeros", [None, "input", "target", "both"])
def test_beta_div_matches_naive_reference(beta, zeros, generator):
    x = torch.rand(6, 5, generator=generator, dtype=torch.float64) + 0.1
    y = torch.rand(6, 5, generator=generator, dtype=torch.float64) + 0.1
    if zeros in ("input", "both"):
        x[0, :2] = 0
    if zeros in ("target", "both"):
        y[1, 1:3] = 0
        y[0, 0] = 0
    value = metrics.beta_div(x, y, beta)
    assert value.dim() == 0
    assert torch.isfinite(value) and value >= 0
    assert_close(value.item(), naive_beta_div(x, y, beta), rtol=1e-10, atol=1e-10)


def decimal_beta_div(x, y, beta, digits=60):
    """The textbook beta-divergence summed in 60-digit decimal arithmetic: near beta
    0 or 1 its terms cancel to a few parts in 1e20, far under what is left."""
    from decimal import Decimal, localcontext

    with localcontext() as context:
        context.prec = digits
        b = Decimal(beta)
        total = Decimal(0)
        for xi, yi in zip(x.flatten().tolist(), y.flatten().tolist()):
            xd, yd = Decimal(xi), Decimal(yi)
            power = lambda base, exponent: (exponent * base.ln()).exp()
            total += (power(yd, b) + (b - 1) * power(xd, b) - b * yd * power(xd, b - 1)) / (b * (b - 1))
        return float(total)


@pytest.mark.parametrize("beta", [1 + 2**-52, 1 - 1e-9, 1 + 1e-6, 2**-60, -1e-9, 1e-6, 0.999, 0.01])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_beta_near_zero_and_one_keeps_its_accuracy(beta, dtype, generator):
    """The textbook form divides terms of size V^beta by beta (beta - 1): before, at
    beta = 1 + 2**-52 float64 gave 38.75 for a divergence of 17.63, and float32
    at 1e-5 was 1% off.  Now each dtype is as accurate as at beta = 0.5."""
    x = torch.rand(6, 5, generator=generator, dtype=torch.float64) + 0.1
    y = torch.rand(6, 5, generator=generator, dtype=torch.float64) + 0.1
    reference = decimal_beta_div(x, y, beta)
    value = metrics.beta_div(x.to(dtype), y.to(dtype), beta).item()
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert value == pytest.approx(reference, rel=tolerance)


def test_named_divergences_are_beta_div(generator):
    x = torch.rand(4, 3, generator=generator)
    y = torch.rand(4, 3, generator=generator)
    assert_close(metrics.kl_div(x, y), metrics.beta_div(x, y, 1))
    assert_close(metrics.euclidean(x, y), metrics.beta_div(x, y, 2))
    assert_close(metrics.is_div(x, y), metrics.beta_div(x, y, 0))
    assert_close(metrics.euclidean(x, y), ((x - y) ** 2).sum() / 2)


@pytest.mark.parametrize("beta", [0, 0.5, 1, 2])
def test_divergence_of_identical_arguments_is_zero(beta, generator):
    x = torch.rand(5, 4, generator=generator, dtype=torch.float64) + 0.5
    assert metrics.beta_div(x, x.clone(), beta).item() == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("beta", [0, 1, 2])
def test_all_zero_arguments_give_finite_non_negative(beta):
    z = torch.zeros(3, 3)
    value = metrics.beta_div(z, z, beta)
    assert torch.isfinite(value) and value >= 0


def test_sparseness_extremes():
    one_hot = torch.zeros(10)
    one_hot[3] = 2.5
    assert metrics.sparseness(one_hot).item() == pytest.approx(1.0)
    assert metrics.sparseness(torch.full((7,), 0.3)).item() == pytest.approx(0.0, abs=1e-6)
    assert metrics.sparseness(torch.zeros(4)).item() == 0.0
    assert metrics.sparseness(torch.tensor([1.0, 0, 0, 1])).dim() == 0


def test_sparseness_matches_formula(generator):
    x = torch.rand(20, generator=generator, dtype=torch.float64)
    n = x.numel()
    expected = (math.sqrt(n) - x.abs().sum() / x.norm()) / (math.sqrt(n) - 1)
    assert_close(metrics.sparseness(x), expected)


def test_errors():
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        metrics.beta_div([1.0], torch.ones(1))
    with pytest.raises(ValueError, match=r"input and target must have the same shape, got \(2, 3\) and \(4, 5\)"):
        metrics.beta_div(torch.ones(2, 3), torch.ones(4, 5))
    with pytest.raises(ValueError, match=r"the same shape, got \(5, 1\) and \(1, 5\)"):
        metrics.kl_div(torch.ones(5, 1), torch.ones(1, 5))
    with pytest.raises(TypeError, match="beta must be a real number"):
        metrics.beta_div(torch.ones(2), torch.ones(2), beta="two")
    with pytest.raises(ValueError, match="x must have at least one entry"):
        metrics.sparseness(torch.ones(0))


@pytest.mark.parametrize("beta", [2, 1.5, 1, 0.5, 0, -1])
@pytest.mark.parametrize("which", ["input", "target"])
@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_invalid_entries_are_refused_naming_the_tensor(beta, which, bad):
    values = {"input": torch.ones(3, 2), "target": torch.ones(3, 2)}
    values[which][1, 1] = bad
    rule = "contains NaN" if math.isnan(bad) else "must be non-negative, but its smallest entry is -1"
    with pytest.raises(ValueError, match=f"^{which} {rule}"):
        metrics.beta_div(values["input"], values["target"], beta)


@pytest.mark.parametrize("which", ["input", "target"])
def test_infinite_entries_are_refused(which):
    values = {"input": torch.ones(3, 2), "target": torch.ones(3, 2)}
    values[which][0, 1] = math.inf
    with pytest.raises(ValueError, match=f"^{which} contains infinite values"):
        metrics.kl_div(values["input"], values["target"])


def test_sparseness_refuses_nan_and_infinity():
    with pytest.raises(ValueError, match="x contains NaN"):
        metrics.sparseness(torch.tensor([1.0, math.nan]))
    with pytest.raises(ValueError, match="x contains infinite values"):
        metrics.sparseness(torch.tensor([1.0, -math.inf]))


def _digits_and_reconstruction():
    """Real data (scikit-learn's digits, float32) and a rank-1 reconstruction of it
    with three zero columns, where the floor decides the value for beta <= 1."""
    from sklearn.datasets import load_digits

    V = torch.tensor(load_digits().data[:300], dtype=torch.float32)
    R = V.mean(1, keepdim=True) * V.mean(0, keepdim=True) / V.mean()
    R[:, 20:23] = 0
    return V, R


@pytest.mark.parametrize("beta", [-0.5, 0, 0.5, 1, 1.5, 2, 3])
@pytest.mark.parametrize("k", [-40, 40])
def test_beta_div_is_homogeneous(beta, k):
    """Scaling both tensors by 2**k scales the divergence by 2**(k beta), bit for bit:
    the floors move with the data (at the dtype's epsilon they did not)."""
    V, R = _digits_and_reconstruction()
    if beta <= 0:
        V = V + 1
    value = metrics.beta_div(R, V, beta)
    scaled = metrics.beta_div(R * 2.0**k, V * 2.0**k, beta)
    assert torch.isfinite(value) and value > 0
    assert torch.equal(scaled, value * 2.0 ** (k * beta))


@pytest.mark.parametrize("beta", [0.5, 1, 1.5, 3])
@pytest.mark.parametrize("scale", [1e-9, 1e9])
def test_beta_div_at_any_scale(beta, scale):
    """The digits at 1e-9 and 1e9 (float32): the divergence of a positive
    reconstruction is scale**beta times the unscaled one, to float32 rounding
    (at 1e-9 every reconstructed entry used to sit under the floor)."""
    V, R = _digits_and_reconstruction()
    R = R + 0.5
    value = float(metrics.beta_div(R, V, beta))
    scaled = float(metrics.beta_div(R * scale, V * scale, beta))
    assert scaled / scale**beta == pytest.approx(value, rel=1e-4)
