import warnings

import pytest
import torch

from conftest import low_rank
from torchnmf import ConvergenceWarning
from torchnmf.selection import (
    RULE,
    bi_cross_validate,
    cross_validate,
    rank_table,
    suggest_rank,
)


def planted(generator, n=60, c=40, rank=3, noise=0.2):
    """Planted rank with multiplicative noise (additive positive noise would add a
    constant, one more non-negative component)."""
    V, _, _ = low_rank(n, c, rank, generator)
    return V * (1 + noise * (2 * torch.rand(V.shape, generator=generator, dtype=V.dtype) - 1))


def test_one_standard_error_rule_against_a_hand_computed_case():
    ranks = [2, 3, 4, 5]
    errors = torch.tensor([[5.0, 1.10, 1.00, 1.02], [5.2, 1.14, 1.04, 1.06], [4.8, 1.12, 1.02, 1.0]])
    # lowest mean at rank 4 (1.02), its standard error 0.02 / sqrt(3); rank 3's mean 1.12 is above
    assert suggest_rank(ranks, errors) == 4
    close = errors.clone()
    close[:, 1] = torch.tensor([1.03, 1.02, 1.04])  # rank 3 within one standard error
    assert suggest_rank(ranks, close) == 3
    assert suggest_rank(ranks, errors[:1]) == 4  # one fold: plain minimum


def test_cross_validation_picks_the_planted_rank(generator):
    V = planted(generator)
    cv = cross_validate(V, range(1, 6), n_folds=3, n_restarts=3, beta=2, max_iter=250, seed=0)
    assert cv.errors.shape == (3, 5)
    assert cv.suggested == 3, cv.mean
    assert cv.rule == RULE
    # the held-out error falls steeply up to the planted rank
    assert float(cv.mean[1]) > 1.2 * float(cv.mean[2])


def test_cross_validation_kl_on_counts_picks_the_planted_rank(generator):
    rates = 20 * low_rank(80, 50, 4, generator)[0]
    V = torch.poisson(rates, generator=generator)
    cv = cross_validate(V.to_sparse(), [2, 3, 4, 5, 6], n_folds=3, n_restarts=3, beta=1,
                        max_iter=300, solver="mu_extrapolated")
    assert cv.suggested == 4, cv.mean


def test_bi_cross_validation_picks_the_planted_rank(generator):
    V = planted(generator, n=80, c=60)
    cv = bi_cross_validate(V, range(1, 6), n_restarts=3, beta=2, max_iter=250)
    assert cv.errors.shape == (4, 5) and cv.method == "bi"
    assert cv.suggested == 3, cv.mean


def test_rank_table_and_its_figure(generator, tmp_path):
    pytest.importorskip("scipy")
    V = planted(generator, n=50, c=30)
    table = rank_table(V, [2, 3, 4], n_restarts=3, beta=2, max_iter=150, n_folds=3)
    assert [row["rank"] for row in table.rows] == [2, 3, 4]
    assert table.suggested == 3
    assert all(-1 <= row["stability"] <= 1 for row in table.rows)
    assert all(0 < row["cophenetic"] <= 1 and 0 < row["dispersion"] <= 1 for row in table.rows)
    text = table.format()
    assert text.splitlines()[0].split()[:3] == ["rank", "loss", "held-out"]
    assert len(text.splitlines()) == 4
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from torchnmf.plot import rank_selection_figure

    fig = rank_selection_figure(table)
    path = tmp_path / "k.png"
    fig.savefig(path)
    assert path.stat().st_size > 1000
    assert "suggested k = 3" in fig.axes[0].get_title()


def test_errors(generator):
    V = planted(generator, n=20, c=10)
    with pytest.raises(ValueError, match="n_folds must be at least 2, got 1"):
        cross_validate(V, [2], n_folds=1)
    with pytest.raises(ValueError, match="row_folds must be at least 2, got 1"):
        bi_cross_validate(V, [2], row_folds=1)
    with pytest.raises(ValueError, match=r"method must be one of \['entries', 'bi'\], got 'x'"):
        rank_table(V, [2], method="x")
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        cross_validate(V, [0, 2])
    # folds that would hold nothing out, and ranks above the held-in block D
    with pytest.raises(ValueError, match=r"n_folds must be at most the number of entries of V \(200\)"):
        cross_validate(V, [2], n_folds=201)
    with pytest.raises(ValueError, match=r"row_folds must be at most the number of rows of V \(20\), got 21"):
        bi_cross_validate(V, [2], row_folds=21)
    with pytest.raises(ValueError, match=r"column_folds must be at most the number of columns of V \(10\)"):
        bi_cross_validate(V, [2], column_folds=11)
    with pytest.raises(ValueError, match=r"smallest held-in block D \(5 for V of shape \(20, 10\)"):
        bi_cross_validate(V, [2, 6])



@pytest.mark.parametrize("shape", [(4, 60), (60, 4)])
def test_entry_folds_never_hide_a_whole_row_or_column(shape, generator):
    """Before: on 4 x 60 data a fold held out all four entries of some column and the
    fits refused "the mask" (which the caller never gave)."""
    from torchnmf.selection import _entry_folds

    observed = torch.rand(shape, generator=generator) > 0.2
    folds = _entry_folds(observed, 3, generator)
    for fold in range(3):
        train = observed & (folds != fold)
        assert bool((train.sum(0) >= 1).all() and (train.sum(1) >= 1).all())
    sizes = torch.bincount(folds[(folds >= 0) & observed], minlength=3)
    assert int(sizes.max() - sizes.min()) <= 1
    V = planted(generator, n=shape[0], c=shape[1], rank=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        cv = cross_validate(V, [1, 2], n_folds=2, n_restarts=1, max_iter=10)
    assert bool(torch.isfinite(cv.errors).all() and (cv.errors > 0).all())


@pytest.mark.parametrize("validate", [cross_validate, bi_cross_validate])
def test_numpy_seeds_and_ranks_as_scikit_learn_users_pass_them(validate, generator):
    """Before: a numpy integer seed failed in torch's manual_seed ("an integer is
    required"), seed=None in fit_restarts' seed + k, and np.arange ranks read as one
    rank ("rank must be a positive integer, got array([1, 2])")."""
    np = pytest.importorskip("numpy")
    V = planted(generator, n=12, c=8)
    kwargs = dict(n_restarts=1, max_iter=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        expected = validate(V, [1, 2], seed=3, **kwargs).errors
        got = validate(V, np.arange(1, 3), seed=np.int64(3), **kwargs).errors
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(TypeError, match="seed must be an integer, got None"):
        validate(V, [1], seed=None, **kwargs)


@pytest.mark.parametrize("method", ["entries", "bi"])
@pytest.mark.parametrize("beta", [1, 2])
@pytest.mark.parametrize("scale", [2.0**-30, 1e-9, 1e9])
def test_cross_validation_errors_at_any_scale(method, beta, scale):
    """Real data (the digits, float32) scaled: the held-out errors are unit scale's
    times scale**beta, to float32's rounding for a power of two and to 1e-3
    otherwise (at 1e-9 every rank scored alike: the held-out divergence floored
    each reconstructed entry at float32's epsilon; bi-cross-validation went
    negative, and at 2**-30 it was 6 to 9% off at beta=2: its transform of the
    transposed block, whose fixed factor carries the data's scale, divided the
    activations by it too)."""
    from sklearn.datasets import load_digits

    V = torch.tensor(load_digits().data[:120], dtype=torch.float32)
    run = cross_validate if method == "entries" else bi_cross_validate
    options = dict(n_restarts=2, beta=beta, max_iter=30, seed=0)
    if method == "entries":
        options["n_folds"] = 3
    unit = run(V, [2, 3], **options).errors
    scaled = run(V * scale, [2, 3], **options).errors / scale**beta
    assert (unit > 0).all()
    rel = 1e-6 if scale == 2.0**-30 else 1e-3
    torch.testing.assert_close(scaled, unit, rtol=rel, atol=0)


@pytest.mark.parametrize("scale", [2.0**-30, 1e-9])
def test_rank_table_at_any_scale(scale):
    """The rank table of the digits (float32) scaled: losses, held-out and prediction
    errors are unit scale's times scale (beta=1), stabilities unchanged (the
    prediction error was negative at 1e-9)."""
    from sklearn.datasets import load_digits

    V = torch.tensor(load_digits().data[:120], dtype=torch.float32)
    options = dict(n_restarts=3, beta=1, max_iter=30, seed=0, cv_restarts=2)
    unit = rank_table(V, [2, 3], **options).rows
    scaled = rank_table(V * scale, [2, 3], **options).rows
    rel = 1e-6 if scale == 2.0**-30 else 1e-3
    for a, b in zip(unit, scaled):
        assert a["prediction_error"] > 0
        for key in ("loss", "heldout", "prediction_error"):
            assert b[key] / scale == pytest.approx(a[key], rel=rel)
        assert b["stability"] == pytest.approx(a["stability"], abs=1e-3)


def test_suggest_rank_checks_its_errors():
    """Before: an IndexError from a 0-dim tensor for errors of the wrong shape, for no
    ranks, and for NaN errors."""
    with pytest.raises(ValueError, match=r"errors must be \(n_folds, len\(ranks\)\) = \(n_folds, 3\)"):
        suggest_rank([1, 2, 3], torch.rand(4, 2))
    with pytest.raises(ValueError, match=r"= \(n_folds, 0\)"):
        suggest_rank([], torch.rand(0))
    with pytest.raises(ValueError, match="errors must be finite"):
        suggest_rank([1, 2], torch.tensor([[float("nan"), 1.0]]))
    assert suggest_rank([1, 2, 3], [3.0, 1.0, 0.95]) == 3  # one fold: no standard error


def test_cross_validation_takes_nan_as_missing(generator):
    """Its NaN error says "pass missing='mask'", which cross_validate did not take: with
    it, NaN entries are the mask's hidden ones."""
    V, _, _ = low_rank(30, 20, 2, generator, noise=0.05)
    hidden = torch.rand(V.shape, generator=generator) < 0.05
    with_nan = V.masked_fill(hidden, float("nan"))
    with pytest.raises(ValueError, match="missing='mask'"):
        cross_validate(with_nan, [1, 2], n_folds=3, n_restarts=1, max_iter=20)
    options = dict(n_folds=3, n_restarts=1, max_iter=20)
    by_nan = cross_validate(with_nan, [1, 2], missing="mask", **options)
    by_mask = cross_validate(V, [1, 2], mask=~hidden, **options)
    assert torch.equal(by_nan.errors, by_mask.errors)
