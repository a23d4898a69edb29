"""Figures of torchnmf.plot: each function draws on the Axes it is given."""
import struct

import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

from torchnmf import plot  # noqa: E402


def png_size(path):
    """(width, height) of a PNG file, after checking its signature and header chunk."""
    data = open(path, "rb").read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def axes():
    return Figure().subplots(1, 2)


def test_templates_matrix_and_kernels(axes):
    W = torch.rand(10, 3)
    assert plot.plot_templates(W, axes[0]) is axes[0]
    assert axes[0].images[0].get_array().shape == (10, 3)
    W3 = torch.rand(10, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    plot.plot_templates(W3, axes[1], log=True)
    image = axes[1].images[0].get_array()
    assert image.shape == (10, 12)
    # component 1's block holds W3[:, 1, :], in decibels below the peak
    expected = 20 * torch.log10((W3 / W3.max()).clamp_min(1e-4))
    torch.testing.assert_close(torch.as_tensor(image[:, 4:8]), expected[:, 1, :])
    assert len(axes[1].lines) == 2  # separators between the 3 components


def test_templates_reject_other_shapes(axes):
    with pytest.raises(ValueError, match=r"W must be \(C, R\) or \(C, R, T\), got shape \(2, 2, 2, 2\)"):
        plot.plot_templates(torch.rand(2, 2, 2, 2), axes[0])


def test_activations_one_normalised_curve_per_component(axes):
    H = torch.rand(20, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ax = plot.plot_activations(H, axes[0], labels=list("abcd"))
    assert ax is axes[0]
    assert len(ax.lines) == 4
    for r, line in enumerate(ax.lines):
        y = torch.as_tensor(line.get_ydata())
        torch.testing.assert_close(y, r + 0.9 * H[:, r] / H[:, r].max())
    assert [t.get_text() for t in ax.get_yticklabels()] == list("abcd")
    plot.plot_activations(torch.rand(1, 2, 15), axes[1])
    assert len(axes[1].lines) == 2 and len(axes[1].lines[0].get_ydata()) == 15


def test_reconstruction_shares_a_colour_scale(axes):
    target = torch.rand(8, 5)
    approx = 2 * torch.rand(8, 5)
    left, right = plot.plot_reconstruction(target, approx, axes)
    assert (left, right) == tuple(axes)
    # features up the vertical axis: the (N, C) matrix is drawn transposed
    assert left.images[0].get_array().shape == (5, 8)
    assert left.images[0].get_clim() == right.images[0].get_clim()
    assert right.images[0].get_clim()[1] == pytest.approx(float(approx.max()))
    with pytest.raises(ValueError, match=r"target and reconstruction must have the same shape"):
        plot.plot_reconstruction(target, approx[:4], axes)


def test_loss_is_logarithmic_when_positive(axes):
    assert plot.plot_loss([4.0, 2.0, 1.0], axes[0]) is axes[0]
    assert axes[0].get_yscale() == "log"
    plot.plot_loss([1.0, 0.0], axes[1])
    assert axes[1].get_yscale() == "linear"


def test_functions_fall_back_to_pyplot_axes():
    import matplotlib.pyplot as plt

    plt.figure()
    try:
        assert plot.plot_loss([1.0, 0.5]) is plt.gca()
        left, right = plot.plot_reconstruction(torch.rand(3, 4), torch.rand(3, 4))
        assert left.figure is right.figure
    finally:
        plt.close("all")


def test_summary_figure_is_a_png_of_sensible_size(tmp_path):
    from torchnmf.nmf import NMFD

    V = torch.rand(1, 12, 30)
    model = NMFD(V.shape, rank=2, T=3)
    model.fit(V, max_iter=5, tol=0)
    figure = plot.summary_figure(model.W, model.H, V, model(), model.loss_history,
                                 log=True, title="test")
    assert len(figure.axes) == 5
    figure.savefig(tmp_path / "summary.png", dpi=50)
    assert png_size(tmp_path / "summary.png") == (13 * 50, 7 * 50)


def test_activation_labels_must_name_every_component():
    """Before: matplotlib's "number of FixedLocator locations (3) ... labels (1)"."""
    with pytest.raises(ValueError, match="labels must name each of the 3 components, got 1"):
        plot.plot_activations(torch.rand(20, 3), Figure().subplots(), labels=["bass"])
