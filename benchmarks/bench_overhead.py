"""Small problems, where per-call overhead dominates: scikit-learn's digits at rank 16."""
import torch

from _common import markdown_table, per_iteration_ms, sklearn_mu
from bench_dense import _floor

from torchnmf.nmf import NMF

TITLE = "Per-iteration overhead on a small problem (issue 16)"


def _digits():
    from sklearn.datasets import load_digits

    V = torch.tensor(load_digits().data, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    rank = 16
    scale = float(V.mean() / rank) ** 0.5
    return V, torch.rand(V.shape[0], rank, generator=g) * scale, torch.rand(V.shape[1], rank, generator=g) * scale


def _ours(V, H0, W0, beta, solver):
    def run(n_iter):
        NMF(W=W0, H=H0).fit(V, beta=beta, max_iter=n_iter, tol=0, solver=solver)
    return run


def run(quick=False):
    try:
        V, H0, W0 = _digits()
    except ImportError:
        return "scikit-learn is not installed; this section needs its digits."
    short, long = (20, 60) if quick else (50, 250)
    rows = []
    for beta, solver in ((2, "mu"), (2, "hals"), (1, "mu")):
        ours = per_iteration_ms(_ours(V, H0, W0, beta, solver), short=short, long=long)
        floor = per_iteration_ms(_floor(V, H0, W0, beta), short=short, long=long)
        sk = per_iteration_ms(sklearn_mu(V.numpy(), H0, W0, beta), short=short, long=long)
        rows.append([f"beta={beta}, {solver}", ours * 1e3, floor * 1e3, ours / floor,
                     sk * 1e3, sk / ours])
    header = (
        f"V: digits {V.shape[0]}x{V.shape[1]} float32, rank 16, {torch.get_num_threads()} threads; "
        f"microseconds per iteration from {long}- and {short}-iteration runs; the floor is the "
        f"matrix products with V's size that one MU iteration cannot avoid.\n\n"
    )
    return header + markdown_table(
        ["problem", "ours us", "floor us", "ours / floor", "sklearn mu us", "sklearn / ours"], rows
    )
