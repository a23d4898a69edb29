"""Figures of a factorisation (matplotlib, imported only here).

Each function draws on the Axes it is given (a new one from ``pyplot`` when
none is) and returns them, so figures compose freely:

- :func:`plot_templates`: the templates ``W``, ``(C, R)`` or ``(C, R, T)``;
- :func:`plot_activations`: the activations ``H``, ``(N, R)`` or ``(N, R, L)``;
- :func:`plot_reconstruction`: the target beside its reconstruction;
- :func:`plot_loss`: the objective per iteration;
- :func:`plot_rank_selection`: error and stability against the rank (cNMF's
  k-selection plot), from :func:`torchnmf.selection.rank_table`.

:func:`summary_figure` puts all four on one :class:`matplotlib.figure.Figure`
without touching ``pyplot`` (safe in scripts and servers).

Everywhere, features (``C``, e.g. frequency) run up the vertical axis and
samples or time (``N`` or ``L``) along the horizontal one.

Examples::

    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import torch
    >>> from torchnmf.nmf import NMF
    >>> from torchnmf.plot import summary_figure
    >>> V = torch.rand(40, 30)
    >>> model = NMF(V.shape, rank=3)
    >>> _ = model.fit(V, max_iter=20, tol=0)
    >>> fig = summary_figure(model.W, model.H, V, model(), model.loss_history)
    >>> len(fig.axes) >= 5
    True
"""
import numpy as np

try:
    import matplotlib  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "torchnmf.plot needs matplotlib; install it with pip install 'torchnmf[plot]'"
    ) from error
from matplotlib.figure import Figure

from .io import to_numpy

__all__ = [
    "plot_templates",
    "plot_activations",
    "plot_reconstruction",
    "plot_loss",
    "summary_figure",
    "plot_rank_selection",
    "rank_selection_figure",
]


def _axes(ax):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.gca()


def _scale(image, log):
    """Magnitudes on a decibel scale (80 dB below the peak) when ``log``."""
    if not log:
        return image
    peak = max(float(np.max(image)), np.finfo(np.float64).tiny)
    return 20 * np.log10(np.maximum(image / peak, 1e-4))


def _as_feature_by_time(target):
    """A target as a ``(C, time)`` image: ``(N, C)`` is transposed, ``(1, C, L)`` squeezed."""
    array = to_numpy(target)
    if array.ndim == 2:
        return array.T
    if array.ndim == 3:
        # (N, C, L): the samples of the batch one after the other along time
        return np.concatenate(list(array), axis=1)
    raise ValueError(f"target must be 2-D (N, C) or 3-D (N, C, L), got shape {array.shape}")


def plot_templates(W, ax=None, *, log=False, cmap="magma"):
    """Draw the templates: one column per component, one block per component for NMFD.

    Args:
        W (Tensor or array): ``(C, R)`` or ``(C, R, T)``.
        ax (Axes, optional): where to draw.
        log (bool): decibel scale (for magnitude spectra).
        cmap (str): the colour map.

    Returns:
        Axes

    Examples::

        >>> import torch
        >>> from matplotlib.figure import Figure
        >>> from torchnmf.plot import plot_templates
        >>> ax = Figure().subplots()
        >>> ax = plot_templates(torch.rand(16, 3), ax)
        >>> type(ax).__name__
        'Axes'
    """
    ax = _axes(ax)
    W = to_numpy(W)
    if W.ndim == 2:
        W = W[:, :, None]
    if W.ndim != 3:
        raise ValueError(f"W must be (C, R) or (C, R, T), got shape {W.shape}")
    C, R, T = W.shape
    image = _scale(W.reshape(C, R * T), log)
    ax.imshow(image, aspect="auto", origin="lower", cmap=cmap, interpolation="nearest",
              extent=(-0.5, R - 0.5, -0.5, C - 0.5))
    for r in range(1, R):
        ax.axvline(r - 0.5, color="white", linewidth=1)
    ax.set_xticks(range(R))
    ax.set_xlabel("component" + (f" ({T} frames each)" if T > 1 else ""))
    ax.set_ylabel("feature")
    ax.set_title("templates W")
    return ax


def plot_activations(H, ax=None, *, labels=None):
    """Draw the activations, one normalised curve per component, stacked.

    Args:
        H (Tensor or array): ``(N, R)`` or ``(N, R, L)`` (the batch is laid end to end).
        ax (Axes, optional): where to draw.
        labels (list of str, optional): a name per component.

    Returns:
        Axes

    Examples::

        >>> import torch
        >>> from matplotlib.figure import Figure
        >>> from torchnmf.plot import plot_activations
        >>> ax = Figure().subplots()
        >>> ax = plot_activations(torch.rand(50, 3), ax, labels=["bass", "snare", "hi-hat"])
        >>> len(ax.lines) >= 3
        True
    """
    ax = _axes(ax)
    H = to_numpy(H)
    if H.ndim == 2:
        curves = H.T
    elif H.ndim == 3:
        curves = np.concatenate(list(H), axis=1)
    else:
        raise ValueError(f"H must be (N, R) or (N, R, L), got shape {H.shape}")
    R = curves.shape[0]
    labels = [f"{r}" for r in range(R)] if labels is None else list(labels)
    if len(labels) != R:
        raise ValueError(f"labels must name each of the {R} components, got {len(labels)}")
    for r in range(R):
        peak = curves[r].max()
        curve = curves[r] / peak if peak > 0 else curves[r]
        ax.plot(r + 0.9 * curve, linewidth=1)
    ax.set_yticks(range(R))
    ax.set_yticklabels(labels)
    ax.set_ylim(-0.2, R)
    ax.set_xlim(0, max(1, curves.shape[1] - 1))
    ax.set_xlabel("sample / frame")
    ax.set_ylabel("component")
    ax.set_title("activations H")
    return ax


def plot_reconstruction(target, reconstruction, axes=None, *, log=False, cmap="magma"):
    """Draw the target beside its reconstruction on a shared colour scale.

    Args:
        target, reconstruction (Tensor or array): ``(N, C)`` or ``(N, C, L)``.
        axes (pair of Axes, optional): where to draw (default: two new ones side by side).
        log (bool): decibel scale.

    Returns:
        (Axes, Axes)

    Examples::

        >>> import torch
        >>> from matplotlib.figure import Figure
        >>> from torchnmf.plot import plot_reconstruction
        >>> V = torch.rand(20, 16)
        >>> left, right = plot_reconstruction(V, 0.9 * V, Figure().subplots(1, 2))
        >>> left.figure is right.figure
        True
    """
    if axes is None:
        import matplotlib.pyplot as plt

        _, axes = plt.subplots(1, 2, sharey=True)
    ax_target, ax_approx = axes
    target = _scale(_as_feature_by_time(target), log)
    approx = _scale(_as_feature_by_time(reconstruction), log)
    if target.shape != approx.shape:
        raise ValueError(
            f"target and reconstruction must have the same shape, got {target.shape} "
            f"and {approx.shape}"
        )
    low, high = min(target.min(), approx.min()), max(target.max(), approx.max())
    for ax, image, title in ((ax_target, target, "target"), (ax_approx, approx, "reconstruction")):
        ax.imshow(image, aspect="auto", origin="lower", cmap=cmap, vmin=low, vmax=high,
                  interpolation="nearest")
        ax.set_title(title + (" (dB)" if log else ""))
        ax.set_xlabel("sample / frame")
    ax_target.set_ylabel("feature")
    return ax_target, ax_approx


def plot_loss(history, ax=None):
    """Draw the objective per iteration (logarithmic when it stays positive).

    Returns:
        Axes

    Examples::

        >>> from matplotlib.figure import Figure
        >>> from torchnmf.plot import plot_loss
        >>> ax = plot_loss([10.0, 4.0, 2.5, 2.1, 2.0], Figure().subplots())
        >>> ax.get_yscale()
        'log'
    """
    ax = _axes(ax)
    history = np.asarray(history, dtype=np.float64)
    ax.plot(np.arange(history.size), history, marker="." if history.size < 30 else None)
    if history.size and np.all(history > 0):
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("objective")
    ax.set_title("loss")
    ax.grid(True, alpha=0.3)
    return ax


def summary_figure(W, H, target, reconstruction, history, *, log=False, labels=None,
                   title=None, figsize=(13, 7)):
    """One figure with templates, activations, target beside reconstruction, and loss.

    Built on :class:`matplotlib.figure.Figure` directly, so no GUI backend is
    needed; save it with ``fig.savefig(path)``.

    Returns:
        Figure

    Examples::

        >>> import torch
        >>> from torchnmf.nmf import NMF
        >>> from torchnmf.plot import summary_figure
        >>> V = torch.rand(20, 16)
        >>> model = NMF(V.shape, rank=2)
        >>> _ = model.fit(V, max_iter=10, tol=0)
        >>> fig = summary_figure(model.W, model.H, V, model(), model.loss_history, title="rank 2")
        >>> type(fig).__name__
        'Figure'
    """
    fig = Figure(figsize=figsize, layout="constrained")
    grid = fig.add_gridspec(2, 3)
    plot_templates(W, fig.add_subplot(grid[0, 0]), log=log)
    plot_activations(H, fig.add_subplot(grid[0, 1:]), labels=labels)
    ax_target = fig.add_subplot(grid[1, 0])
    ax_approx = fig.add_subplot(grid[1, 1], sharey=ax_target)
    plot_reconstruction(target, reconstruction, (ax_target, ax_approx), log=log)
    plot_loss(history, fig.add_subplot(grid[1, 2]))
    if title:
        fig.suptitle(title)
    return fig


def plot_rank_selection(table, ax=None):
    """Draw stability and error against the rank, as cNMF's k-selection plot does.

    The left axis shows the stability (silhouette of the consensus
    clustering, and the cophenetic correlation); the right axis the held-out
    error (with one standard error over the folds) and the prediction error
    of the consensus.  The suggested rank is marked.

    Args:
        table (RankTable): from :func:`torchnmf.selection.rank_table`.
        ax (Axes, optional): where to draw; the error goes on its twin.

    Returns:
        (Axes, Axes): the stability axes and the error axes.

    Examples::

        >>> import torch
        >>> from matplotlib.figure import Figure
        >>> from torchnmf.selection import rank_table
        >>> from torchnmf.plot import plot_rank_selection
        >>> g = torch.Generator().manual_seed(0)
        >>> V = torch.rand(20, 2, generator=g) @ torch.rand(2, 15, generator=g)
        >>> table = rank_table(V, [1, 2], n_restarts=3, max_iter=100, cv_restarts=2)
        >>> stability_ax, error_ax = plot_rank_selection(table, Figure().subplots())
        >>> stability_ax.figure is error_ax.figure
        True
    """
    ax = _axes(ax)
    rows = table.rows
    ranks = np.array([row["rank"] for row in rows])
    stability = np.array([row["stability"] for row in rows], dtype=np.float64)
    cophenetic = np.array([row["cophenetic"] for row in rows], dtype=np.float64)
    heldout = np.array([row["heldout"] for row in rows], dtype=np.float64)
    heldout_se = np.array([row.get("heldout_se", 0.0) for row in rows], dtype=np.float64)
    prediction = np.array([row["prediction_error"] for row in rows], dtype=np.float64)
    ax.plot(ranks, stability, marker="o", color="tab:blue", label="stability (silhouette)")
    ax.plot(ranks, cophenetic, marker="s", color="tab:cyan", linestyle="--",
            label="cophenetic correlation")
    ax.set_xlabel("rank k")
    ax.set_ylabel("stability", color="tab:blue")
    ax.set_xticks(ranks)
    errors = ax.twinx()
    errors.errorbar(ranks, heldout, yerr=heldout_se, marker="o", color="tab:red", capsize=3,
                    label="held-out error")
    if np.isfinite(prediction).any():
        scale = np.nanmax(heldout) / max(np.nanmax(prediction), np.finfo(np.float64).tiny)
        errors.plot(ranks, prediction * scale, marker="^", color="tab:orange", linestyle=":",
                    label="prediction error (scaled)")
    errors.set_ylabel("error", color="tab:red")
    ax.axvline(table.suggested, color="0.4", linestyle="-.", linewidth=1)
    ax.set_title(f"rank selection: suggested k = {table.suggested}")
    handles = ax.get_legend_handles_labels()
    more = errors.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize="small", loc="best")
    ax.grid(True, alpha=0.3)
    return ax, errors


def rank_selection_figure(table, figsize=(7, 4.5)):
    """:func:`plot_rank_selection` on its own :class:`~matplotlib.figure.Figure` (no pyplot).

    Examples::

        >>> import torch
        >>> from torchnmf.selection import rank_table
        >>> from torchnmf.plot import rank_selection_figure
        >>> g = torch.Generator().manual_seed(0)
        >>> V = torch.rand(20, 2, generator=g) @ torch.rand(2, 15, generator=g)
        >>> table = rank_table(V, [1, 2], n_restarts=3, max_iter=100, cv_restarts=2)
        >>> fig = rank_selection_figure(table)
        >>> type(fig).__name__, len(fig.axes)
        ('Figure', 2)
    """
    fig = Figure(figsize=figsize, layout="constrained")
    plot_rank_selection(table, fig.add_subplot())
    return fig
