"""Dense NMF.fit per iteration against scikit-learn's MU and the matrix-product floor."""

import torch

from _common import (
    low_rank_plus_noise, peak_of_runs, markdown_table, mib, peak_in_subprocess, per_iteration_ms,
    sklearn_mu,
)

from torchnmf.nmf import NMF

TITLE = "Dense multiplicative updates (issue 2)"
BETAS = (2, 1, 0.5)


def _ours(V, H0, W0, beta):
    def run(n_iter):
        model = NMF(W=W0, H=H0)
        model.fit(V, beta=beta, max_iter=n_iter, tol=0)
    return run


def _sklearn(V, H0, W0, beta):
    return sklearn_mu(V.numpy(), H0, W0, beta)


def _floor(V, H0, W0, beta):
    """The matrix products with V's size that one iteration cannot avoid."""
    if beta == 2:
        def one():
            V @ W0
            V.T @ H0
    else:
        def one():
            WH = H0 @ W0.T   # reconstruction before the H update
            WH @ W0
            WH = H0 @ W0.T   # and again after it, for the W update
            WH.T @ H0

    def run(n_iter):
        for _ in range(n_iter):
            one()
    return run


def _problem(quick):
    n, c, rank = (800, 400, 16) if quick else (4000, 2000, 32)
    V = low_rank_plus_noise(n, c, rank, seed=0)
    g = torch.Generator().manual_seed(1)
    scale = float(V.mean() / rank) ** 0.5
    H0 = torch.rand(n, rank, generator=g) * scale
    W0 = torch.rand(c, rank, generator=g) * scale
    return V, H0, W0


def memory_probe(method, beta, quick):
    """Extra peak MiB of 3 iterations of ``method`` (run in a fresh process)."""
    V, H0, W0 = _problem(quick)
    make = {"ours": _ours, "sklearn": _sklearn}[method]
    return peak_of_runs(make(V, H0, W0, beta), 3)


def run(quick=False):
    V, H0, W0 = _problem(quick)
    (n, c), rank = V.shape, H0.shape[1]
    try:
        import sklearn  # noqa: F401
        have_sklearn = True
    except ImportError:
        have_sklearn = False

    rows = []
    for beta in BETAS:
        ours = per_iteration_ms(_ours(V, H0, W0, beta))
        floor = per_iteration_ms(_floor(V, H0, W0, beta))
        ours_mem = peak_in_subprocess("bench_dense", "memory_probe", "ours", beta, quick)
        sk = sk_mem = None
        if have_sklearn:
            sk = per_iteration_ms(_sklearn(V, H0, W0, beta))
            sk_mem = peak_in_subprocess("bench_dense", "memory_probe", "sklearn", beta, quick)
        rows.append([
            beta, ours, floor, ours / floor,
            sk if sk is not None else "n/a",
            sk / ours if sk is not None else "n/a",
            ours_mem if ours_mem is not None else "n/a",
            sk_mem if sk_mem is not None else "n/a",
        ])
    header = (
        f"V: {n}x{c} float32, rank {rank}, low rank plus noise ({mib(V):.0f} MiB); "
        f"same initial factors for every method; ms per iteration.\n\n"
    )
    return header + markdown_table(
        ["beta", "ours ms", "floor ms", "ours/floor", "sklearn mu ms", "sklearn/ours",
         "ours extra peak MiB", "sklearn extra peak MiB"],
        rows,
    )
