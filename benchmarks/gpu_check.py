"""``make gpu-check``: the CUDA tests, then one short GPU benchmark table.

Meant to run in one go wherever a CUDA device is at hand, in under five
minutes: the tests whose names mention CUDA (they skip themselves elsewhere),
then ms per iteration of ``fit`` on the device for dense, sparse, NMFD
(single and batched), NMF2D and SI-PLCA problems, beside the same fit on the
CPU (fewer iterations) for the ratio, and the overlap of a streamed fit's
copies with its compute (:func:`streamed_overlap`).  Without CUDA it says so and exits 0.
Paste the table into ``docs/benchmarks.md``.
"""
import pathlib
import subprocess
import sys
import time
import warnings

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from _common import low_rank_plus_noise, markdown_table  # noqa: E402
from bench_deconv import conv_problem  # noqa: E402

from torchnmf.nmf import NMF, NMF2D, NMFD  # noqa: E402
from torchnmf.plca import SIPLCA  # noqa: E402


def _per_iteration_ms(run, device, short, long):
    """(T(long) - T(short)) / (long - short), synchronising the device around each run."""
    def timed(n_iter):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run(n_iter)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timed(short)  # warm-up: kernels, caches, allocator
        return max((timed(long) - timed(short)) / (long - short) * 1e3, 1e-6)


def _fit(cls, V, W0, H0, device, **options):
    V = V.to(device)

    def run(n_iter):
        model = cls(W=W0.to(device), H=H0.to(device))
        model.fit(V, max_iter=n_iter, tol=0, **options)
    return run


def _plca(V, W0, H0, device):
    V = V.to(device)
    rank = W0.shape[1]

    def run(n_iter):
        model = SIPLCA(W=W0.to(device), H=H0.to(device), Z=torch.full((rank,), 1.0 / rank))
        model.to(device).fit(V, max_iter=n_iter, tol=0)
    return run


def _problems():
    g = torch.Generator().manual_seed(0)
    V = low_rank_plus_noise(8000, 4000, 32, seed=0)
    W0 = torch.rand(4000, 32, generator=g) * 0.3
    H0 = torch.rand(8000, 32, generator=g) * 0.3
    sparse = low_rank_plus_noise(20000, 5000, 32, seed=1)
    sparse = sparse * (torch.rand(sparse.shape, generator=g) < 0.01)
    Ws = torch.rand(5000, 32, generator=g) * 0.3
    Hs = torch.rand(20000, 32, generator=g) * 0.3
    yield "dense NMF 8000x4000 rank 32, beta=2, mu", _fit, (NMF, V, W0, H0), dict(beta=2)
    yield "dense NMF 8000x4000 rank 32, beta=2, hals", _fit, (NMF, V, W0, H0), dict(beta=2, solver="hals")
    yield "dense NMF 8000x4000 rank 32, beta=1, mu", _fit, (NMF, V, W0, H0), dict(beta=1)
    yield ("sparse CSR NMF 20000x5000 (1%) rank 32, beta=1, mu", _fit,
           (NMF, sparse.to_sparse_csr(), Ws, Hs), dict(beta=1))
    for shape, T in (((1, 513, 2000), 8), ((8, 257, 1000), 16)):
        Vc, Wc, Hc = conv_problem(shape, 8, (T,))
        label = f"NMFD {'x'.join(map(str, shape))} rank 8, T={T}, beta=1"
        yield label, _fit, (NMFD, Vc, Wc, Hc), dict(beta=1)
    Vc, Wc, Hc = conv_problem((1, 4, 256, 256), 6, (8, 8))
    yield "NMF2D 4x256x256 rank 6, kernel 8x8, beta=1", _fit, (NMF2D, Vc, Wc, Hc), dict(beta=1)
    Vc, Wc, Hc = conv_problem((1, 257, 1000), 8, (16,))
    Wc = Wc / Wc.sum((0, 2), keepdim=True)
    Hc = Hc / Hc.sum((0, 2), keepdim=True)
    yield "SIPLCA 257x1000 rank 8, T=16 (EM)", _plca, (Vc, Wc, Hc), {}


def benchmark():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    rows = []
    for label, make, args, options in _problems():
        gpu_ms = _per_iteration_ms(make(*args, cuda, **options), cuda, 10, 60)
        cpu_ms = _per_iteration_ms(make(*args, cpu, **options), cpu, 2, 6)
        rows.append([label, cpu_ms, gpu_ms, cpu_ms / gpu_ms])
        print(f"  {label}: {gpu_ms:.3g} ms", file=sys.stderr, flush=True)
    name = torch.cuda.get_device_name(0)
    return (
        f"{name}, torch {torch.__version__}, float32; ms per iteration of fit (GPU: 60 - 10 "
        f"iterations, CPU ({torch.get_num_threads()} threads): 6 - 2), device synchronised "
        f"around each run.\n\n"
        + markdown_table(["problem", "CPU ms", "GPU ms", "CPU / GPU"], rows)
    )


def streamed_overlap():
    """The streamed fit on the GPU (issue 13): rows of a memmap read in a background
    thread, pinned and copied without blocking, against the same fit with ``V`` in GPU
    memory and against the reads and copies alone; ms per iteration (plain MU at
    beta=1 reads ``V`` once per iteration).  Perfect overlap puts the streamed fit at
    the larger of the two, none at their sum."""
    import tempfile

    import numpy as np

    cuda = torch.device("cuda")
    n, c, rank, rows = 20000, 4000, 32, 2500
    V = low_rank_plus_noise(n, c, rank, seed=2)
    g = torch.Generator().manual_seed(0)
    W0, H0 = torch.rand(c, rank, generator=g) * 0.3, torch.rand(n, rank, generator=g) * 0.3
    with tempfile.TemporaryDirectory() as directory:
        path = pathlib.Path(directory) / "V.npy"
        np.save(path, V.numpy())
        mapped = np.load(path, mmap_mode="r")

        def fit(source, **options):
            def run(n_iter):
                NMF(W=W0.to(cuda), H=H0.to(cuda)).fit(source, beta=1, max_iter=n_iter, tol=0,
                                                      **options)
            return run

        def copies(n_iter):
            for _ in range(n_iter):
                for start in range(0, n, rows):
                    block = torch.from_numpy(np.ascontiguousarray(mapped[start:start + rows]))
                    block.pin_memory().to(cuda, non_blocking=True)

        memory = _per_iteration_ms(fit(V.to(cuda)), cuda, 3, 13)
        streamed = _per_iteration_ms(fit(mapped, block_rows=rows), cuda, 2, 6)
        copied = _per_iteration_ms(copies, cuda, 2, 6)
    both, larger = memory + copied, max(memory, copied)
    return (
        f"V: {n}x{c} float32 rank {rank} ({V.numel() * 4 / 2**20:.0f} MiB) in a memmap, "
        f"blocks of {rows} rows, beta=1 MU; ms per iteration.\n\n"
        + markdown_table(
            ["in GPU memory", "reads + copies alone", "streamed", "streamed / sum",
             "overlap (1: perfect, 0: none)"],
            [[memory, copied, streamed, streamed / both,
              (both - streamed) / max(both - larger, 1e-9)]],
        )
    )


def main():
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; nothing to check (the CUDA tests skip themselves)")
        return 0
    started = time.perf_counter()
    try:
        tests = subprocess.call(
            [sys.executable, "-m", "pytest", "-q", "-k", "cuda or nccl", str(HERE.parent / "tests")],
            timeout=240,
        )
    except subprocess.TimeoutExpired:
        print("gpu-check: the CUDA tests ran past 240 s; the benchmark follows")
        tests = 1
    print(f"\n## GPU check\n\n{benchmark()}\n")
    print(f"### Streamed fit: copies and compute (issue 13)\n\n{streamed_overlap()}\n")
    print(f"(gpu-check: {time.perf_counter() - started:.0f} s; CUDA tests "
          f"{'passed' if tests == 0 else 'FAILED'})")
    return tests


if __name__ == "__main__":
    sys.exit(main())
