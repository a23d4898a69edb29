"""Sparse NMF.fit per iteration against scikit-learn's MU on scipy CSR, and the product floor.

``run(quick)`` is the ``make bench`` section.  The scale run (1,000,000 x 20,000
with 10,000,000 non-zeros, rank 32, beta=1, 20 iterations) is opt-in:
``python benchmarks/bench_sparse.py --scale``.
"""
import argparse
import statistics
import time
import warnings

import torch

from _common import (
    PeakMemory, markdown_table, peak_in_subprocess, peak_of_runs, per_iteration_ms, sklearn_mu,
)

from torchnmf.targets.sparse import SPARSE_BLOCK_ELEMENTS, sparse_dense_product, to_csr, transpose_csr
from torchnmf.nmf import NMF

TITLE = "Sparse targets (issue 4)"
BETAS = (2, 1, 1.5)
DENSITY = 0.01


def sparse_low_rank(n, c, rank, nnz, seed=0, dtype=torch.float32):
    """A coalesced COO ``(n, c)`` matrix: about ``nnz`` random positions holding a rank-``rank``
    product plus noise, built without ever forming the dense matrix."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([
        torch.randint(0, n, (nnz,), generator=g), torch.randint(0, c, (nnz,), generator=g)
    ])
    H = torch.rand(n, rank, generator=g, dtype=dtype)
    W = torch.rand(c, rank, generator=g, dtype=dtype)
    values = torch.empty(nnz, dtype=dtype)
    for start in range(0, nnz, 1 << 20):  # bounded (chunk, rank) temporaries
        stop = min(start + (1 << 20), nnz)
        values[start:stop] = (H[indices[0, start:stop]] * W[indices[1, start:stop]]).sum(1)
    values.mul_(1 + 0.1 * torch.rand(nnz, generator=g, dtype=dtype))
    V = torch.sparse_coo_tensor(indices, values, (n, c), check_invariants=False).coalesce()
    return V


def initial_factors(V, rank, seed=1):
    g = torch.Generator().manual_seed(seed)
    n, c = V.shape
    scale = float(V._values().sum() / (n * c) / rank) ** 0.5
    H0 = torch.rand(n, rank, generator=g, dtype=V.dtype) * scale
    W0 = torch.rand(c, rank, generator=g, dtype=V.dtype) * scale
    return H0, W0


def _ours(V, H0, W0, beta):
    def run(n_iter):
        NMF(W=W0, H=H0).fit(V, beta=beta, max_iter=n_iter, tol=0)
    return run


def _to_scipy(V):
    import scipy.sparse

    indices, values = V._indices().numpy(), V._values().numpy()
    return scipy.sparse.csr_matrix((values, (indices[0], indices[1])), shape=tuple(V.shape))


def _floor(V, H0, W0, beta):
    """The products one iteration cannot avoid, with the fastest kernels we have.

    beta=2: two sparse-dense products and four Gram products; beta=1: two
    sampled products and two sparse-dense products; other beta: those, plus the
    four dense products of the blocked positive term (no powers, no floors).
    """
    by_rows = to_csr(V)
    by_columns = transpose_csr(by_rows)
    arrays = [(m.crow_indices(), m.col_indices(), m.values()) for m in (by_rows, by_columns)]
    rows = (max(1, SPARSE_BLOCK_ELEMENTS // V.shape[1]),
            max(1, SPARSE_BLOCK_ELEMENTS // V.shape[0]))
    blocks = [H0.new_empty(r, m) for r, m in zip(rows, (V.shape[1], V.shape[0]))]

    def side(k, A, B):
        if beta != 2:
            torch.sparse.sampled_addmm((by_rows, by_columns)[k], A, B.T, beta=0.0)
        sparse_dense_product(*arrays[k], B)
        if beta == 2:
            A @ (B.T @ B)
        elif beta != 1:
            for start in range(0, A.shape[0], rows[k]):
                block = blocks[k][: min(rows[k], A.shape[0] - start)]
                torch.matmul(A[start:start + rows[k]], B.T, out=block)
                block @ B

    def run(n_iter):
        for _ in range(n_iter):
            side(0, H0, W0)
            side(1, W0, H0)
    return run


def _timed_ms(fn, repeats=3):
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e3


def _kernel_choices(V, H0, W0):
    """The measurements behind the kernel choices: COO vs CSR products, gather vs sampled."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        V_csr = V.to_sparse_csr()
    rows, cols = V._indices()
    chunk = 1 << 16

    def gathered():
        out = torch.empty(rows.numel(), dtype=V.dtype)
        for start in range(0, rows.numel(), chunk):
            stop = min(start + chunk, rows.numel())
            out[start:stop] = (H0[rows[start:stop]] * W0[cols[start:stop]]).sum(1)

    rows_ = [
        ["V @ W, COO", _timed_ms(lambda: V @ W0)],
        ["V @ W, CSR", _timed_ms(lambda: V_csr @ W0)],
        ["V @ W, embedding bag over the CSR arrays", _timed_ms(
            lambda: sparse_dense_product(
                V_csr.crow_indices(), V_csr.col_indices(), V_csr.values(), W0))],
        ["(H W^T) at non-zeros, chunked gather", _timed_ms(gathered)],
        ["(H W^T) at non-zeros, sampled_addmm on CSR",
         _timed_ms(lambda: torch.sparse.sampled_addmm(V_csr, H0, W0.T, beta=0.0))],
    ]
    return markdown_table(["kernel", "ms"], rows_)


def _mib(nbytes):
    return nbytes / 2**20


def _problem(quick):
    n, c, rank = (4000, 1000, 16) if quick else (20000, 5000, 32)
    V = sparse_low_rank(n, c, rank, int(n * c * DENSITY), seed=0)
    H0, W0 = initial_factors(V, rank)
    return V, H0, W0


def memory_probe(method, beta, quick):
    """Extra peak MiB of 2 iterations of ``method`` (run in a fresh process)."""
    V, H0, W0 = _problem(quick)
    run = _ours(V, H0, W0, beta) if method == "ours" else sklearn_mu(_to_scipy(V), H0, W0, beta)
    return peak_of_runs(run, 2)


def run(quick=False):
    V, H0, W0 = _problem(quick)
    (n, c), rank = V.shape, H0.shape[1]
    dense_mib = _mib(n * c * V.element_size())
    try:
        import sklearn  # noqa: F401
        X = _to_scipy(V)
        have_sklearn = True
    except ImportError:
        have_sklearn = False

    rows = []
    na = "n/a"
    for beta in BETAS:
        # beta=1.5 forms the whole reconstruction twice per iteration: fewer iterations
        # per sample, so the three methods are timed in turn over rounds and each gets
        # the median of its rounds (load changes then hit all of them alike)
        counts, rounds = ((4, 16, 3), 1) if beta in (1, 2) else ((1, 4, 1), 3)
        methods = {"ours": _ours(V, H0, W0, beta), "floor": _floor(V, H0, W0, beta)}
        if have_sklearn:
            methods["sklearn"] = sklearn_mu(X, H0, W0, beta)
        samples = {name: [] for name in methods}
        for _ in range(rounds):
            for name, method in methods.items():
                samples[name].append(per_iteration_ms(method, *counts))
        ms = {name: statistics.median(values) for name, values in samples.items()}
        ours, floor, sk = ms["ours"], ms["floor"], ms.get("sklearn")
        ours_mem = peak_in_subprocess("bench_sparse", "memory_probe", "ours", beta, quick)
        sk_mem = None
        if have_sklearn:
            sk_mem = peak_in_subprocess("bench_sparse", "memory_probe", "sklearn", beta, quick)
        rows.append([
            beta, ours, floor, ours / floor,
            sk if sk is not None else na,
            sk / ours if sk is not None else na,
            ours_mem if ours_mem is not None else na,
            sk_mem if sk_mem is not None else na,
        ])
    header = (
        f"V: {n}x{c} float32, {V._nnz()} non-zeros ({DENSITY:.0%}), rank {rank}; the dense "
        f"matrix would take {dense_mib:.0f} MiB. Same initial factors for both; scikit-learn "
        f"gets the same matrix as scipy CSR. ms per iteration; extra peak resident memory "
        f"of 2 iterations after a warm-up one, in a fresh process (set-up included). Floor: "
        f"the products one iteration cannot avoid, with our fastest kernels (beta=2: "
        f"sparse-dense and Gram products; beta=1: sampled and sparse-dense products; "
        f"beta=1.5: those plus the four dense block products of the positive term).\n\n"
    )
    table = markdown_table(
        ["beta", "ours ms", "floor ms", "ours/floor", "sklearn mu ms", "sklearn/ours",
         "ours extra peak MiB", "sklearn extra peak MiB"],
        rows,
    )
    return header + table + "\n\nKernel choices (same matrix):\n\n" + _kernel_choices(V, H0, W0)


def run_scale(n=1_000_000, c=20_000, nnz=10_000_000, rank=32, beta=1, n_iter=20):
    """The recorded scale run: wall time, per-iteration time and peak memory of one fit."""
    t0 = time.perf_counter()
    V = sparse_low_rank(n, c, rank, nnz, seed=0)
    H0, W0 = initial_factors(V, rank)
    built = time.perf_counter() - t0
    with PeakMemory() as mem:
        model = NMF(W=W0, H=H0)
        t0 = time.perf_counter()
        model.fit(V, beta=beta, max_iter=n_iter, tol=0)
        total = time.perf_counter() - t0
    stored = V._nnz() * (V.element_size() + 2 * 8)
    rows = [[
        f"{n}x{c}", V._nnz(), rank, beta, n_iter, total, total / n_iter * 1e3,
        mem.extra if mem.extra is not None else "n/a", _mib(stored),
        _mib(n * c * V.element_size()),
    ]]
    return (
        f"Data built in {built:.0f} s (not counted). Fit time includes validation and the "
        f"one-off CSR and transposed copies.\n\n"
        + markdown_table(
            ["shape", "nnz", "rank", "beta", "iterations", "fit s", "ms/iter",
             "extra peak MiB", "V as COO MiB", "dense V would be MiB"],
            rows,
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", action="store_true", help="the 1,000,000 x 20,000 scale run")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(run_scale() if args.scale else run(quick=args.quick))
