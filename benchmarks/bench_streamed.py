"""Streamed fits from disk and online (minibatch) NMF (issue 13).

``run(quick)`` is the ``make bench`` section: the per-iteration time of a fit
streamed from a memory-mapped ``.npy`` against the same fit in memory, and the
time our online NMF takes to reach the loss scikit-learn's ``MiniBatchNMF``
reaches after one pass (dense, beta 2 and 1, same batches).

Opt-in sections (``python benchmarks/bench_streamed.py ...``):

- ``--online-sparse [--rows N] [--sparse-data topics|positions] [--until if-needed]``:
  the same online comparison on a sparse N x 20,000 matrix with about 10 N non-zeros
  (N = 1,000,000 by default), counts from a topic model or random positions.
- ``--disk GIB [--dir DIR]``: a dense float32 ``.npy`` of GIB gibibytes written
  once to DIR (deleted afterwards), fitted streamed in a fresh process: seconds
  per iteration against the disk's read bandwidth (a pass cannot be faster),
  and the process's peak resident memory.  When the file is smaller than the
  machine's memory, ``--evict`` (the default then) drops every block's pages from
  the page cache after it is read (``posix_fadvise``), so that each pass reads
  the disk as it would for a file larger than memory.
"""
import argparse
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

from _common import low_rank_plus_noise, markdown_table

from torchnmf.nmf import NMF

TITLE = "Streamed fits and online NMF (issue 13)"


# -- streamed against in memory ----------------------------------------------------------
def _iteration_seconds(make_model, source, beta, n_iter, **options):
    """The median time between the callbacks of consecutive iterations of one fit."""
    stamps = []
    make_model().fit(source, beta=beta, tol=0, max_iter=n_iter,
                     callback=lambda i, loss: stamps.append(time.perf_counter()), **options)
    return float(np.median(np.diff(stamps)))


def _streamed_ratio(quick, rounds=3):
    n, c, rank = (4000, 500, 16) if quick else (20000, 2000, 32)
    V = low_rank_plus_noise(n, c, rank)
    g = torch.Generator().manual_seed(1)
    W0, H0 = torch.rand(c, rank, generator=g), torch.rand(n, rank, generator=g)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        path = pathlib.Path(directory) / "V.npy"
        np.save(path, V.numpy())
        mapped = np.load(path, mmap_mode="r")
        for beta in (2, 1):
            times = {"memory": [], "memmap": [], "blocks": []}
            for _ in range(rounds):  # interleaved, the fastest round of each
                for name, source, options in (("memory", V, {}), ("memmap", mapped, {}),
                                              ("blocks", V, dict(block_rows=n // 4))):
                    times[name].append(_iteration_seconds(lambda: NMF(W=W0, H=H0), source, beta,
                                                          6, **options))
            memory, streamed, blocks = (min(times[k]) * 1e3 for k in ("memory", "memmap", "blocks"))
            rows.append([beta, memory, streamed, streamed / memory, blocks, blocks / memory])
    return (
        f"V: {n}x{c} float32 ({V.numel() * 4 / 2**20:.0f} MiB), rank {rank}, solver 'mu'; "
        f"ms per iteration (median gap between iteration callbacks of a 6-iteration fit, "
        f"fastest of {rounds} interleaved rounds). 'memmap': `fit(np.load(path, "
        f"mmap_mode='r'))` with the default blocks (64 MiB), the file in the page cache; "
        f"'tensor blocks': the in-memory tensor with `block_rows={n // 4}` (the streaming "
        f"machinery without any copy).\n\n"
        + markdown_table(
            ["beta", "in memory ms", "memmap ms", "memmap / memory", "tensor blocks ms",
             "blocks / memory"],
            rows,
        )
    )


# -- online against scikit-learn's MiniBatchNMF -------------------------------------------------
# Both run with the same number of threads (torch's, and a threadpoolctl limit on
# NumPy's BLAS) and are timed in CPU time of the process (other jobs on a shared
# machine slow both alike instead of whichever runs when they do).  Each time
# excludes the full-data loss evaluations: scikit-learn's final one and ours (the
# fit's reconstruction_err_), each timed on its own and subtracted, and ours at
# every batch boundary (taken outside the timed region).
class _Reached(Exception):
    pass


_clock = time.process_time


def _sklearn_one_pass(X, rank, beta, batch_size):
    from sklearn.decomposition import MiniBatchNMF
    from sklearn.decomposition._nmf import _beta_divergence

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimator = MiniBatchNMF(rank, batch_size=batch_size, beta_loss=beta, max_iter=1, tol=0,
                                 max_no_improvement=None, random_state=0)
        started = _clock()
        codes = estimator.fit_transform(X)
        elapsed = _clock() - started
        started = _clock()  # fit_transform ends with this evaluation
        loss = float(_beta_divergence(X, codes, estimator.components_, beta))
        final_loss_seconds = _clock() - started
    return elapsed - final_loss_seconds, loss


def _as_tensor(X):
    if isinstance(X, np.ndarray):
        return torch.from_numpy(X)
    X = X.tocsr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on CSR support and invariant checks
        return torch.sparse_csr_tensor(torch.from_numpy(X.indptr).long(),
                                       torch.from_numpy(X.indices).long(), torch.from_numpy(X.data),
                                       X.shape, check_invariants=False)


def _ours_one_pass(X, rank, beta, batch_size):
    """Seconds of our one-pass ``fit_transform`` (less its final loss evaluation, as
    scikit-learn's) and the full-data loss of the codes it returns: those of the pass,
    refined by one update against the final components, as every fit of ours ends."""
    from sklearn.decomposition._nmf import _beta_divergence
    from torchnmf.estimator import TorchMiniBatchNMF

    estimator = TorchMiniBatchNMF(rank, batch_size=batch_size, beta_loss=beta, max_iter=1,
                                  tol=0, max_no_improvement=None, random_state=0)
    divergence, final = estimator._divergence, []

    def timed_divergence(*args):
        entered = _clock()
        value = divergence(*args)
        final.append(_clock() - entered)
        return value

    estimator._divergence = timed_divergence
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        started = _clock()
        codes = estimator.fit_transform(X)
        elapsed = _clock() - started - sum(final)
    return elapsed, float(_beta_divergence(X, codes, estimator.components_, beta))


def _ours_until(X, rank, beta, batch_size, target, max_passes=8):
    """Seconds of our fit until the full-data loss first reaches ``target`` at a batch
    boundary (the checks outside the timing), the loss then and the batches taken."""
    from torchnmf.estimator import TorchMiniBatchNMF
    from torchnmf.targets import statistics

    stats = statistics(_as_tensor(X), beta)  # built once, outside the timing
    estimator = TorchMiniBatchNMF(rank, batch_size=batch_size, beta_loss=beta, max_iter=max_passes,
                                  tol=0, max_no_improvement=None, random_state=0)
    checking, found = [0.0], {}

    def on_batch(W, codes, steps):
        entered = _clock()
        loss = float(stats.divergence(codes, W))
        found.update(loss=loss, steps=steps, at=entered - checking[0])
        checking[0] += _clock() - entered
        if loss <= target:
            raise _Reached

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        started = _clock()
        try:
            estimator._fit(X, None, None, on_batch=on_batch)
            reached = False
        except _Reached:
            reached = True
    return found["at"] - started, found["loss"], found["steps"], reached


def _online_rows(X, rank, batch_size, betas=(2, 1), threads=None, until="always"):
    """One row per beta: scikit-learn's one pass, our one-pass fit, and our fit until the
    first batch boundary where the loss of our codes reaches scikit-learn's (``until``
    "if needed": only when the one-pass fit does not; its full-data loss at every batch
    boundary takes minutes at 1,000,000 rows)."""
    from threadpoolctl import threadpool_limits

    threads = threads or torch.get_num_threads()
    previous = torch.get_num_threads()
    rows = []
    n_batches = math.ceil(X.shape[0] / batch_size)
    try:
        torch.set_num_threads(threads)
        with threadpool_limits(limits=threads):
            for beta in betas:
                sk_time, sk_loss = _sklearn_one_pass(X, rank, beta, batch_size)
                pass_time, pass_loss = _ours_one_pass(X, rank, beta, batch_size)
                if until == "always" or pass_loss > sk_loss:
                    time_ours, loss_ours, steps, reached = _ours_until(X, rank, beta, batch_size,
                                                                       sk_loss)
                    passes = (f"{steps / n_batches:.2f}" if reached
                              else f"not within {steps / n_batches:.0f}")
                else:
                    time_ours, loss_ours, reached, passes = math.nan, math.nan, False, "not run"
                best = min([t for t, ok in ((pass_time, pass_loss <= sk_loss),
                                            (time_ours, reached)) if ok], default=math.nan)
                rows.append([beta, sk_time, sk_loss, pass_time, pass_loss, time_ours, loss_ours,
                             passes, best / sk_time])
    finally:
        torch.set_num_threads(previous)
    return f"{threads} thread(s) for both, CPU seconds.\n\n" + markdown_table(
        ["beta", "sklearn 1 pass s", "sklearn loss", "ours 1 pass s", "its loss",
         "ours until s", "its loss", "our passes", "ours / sklearn time"],
        rows,
    )


def _online_dense(quick):
    n, c, rank, batch = (5000, 200, 8, 512) if quick else (50000, 500, 10, 1024)
    X = low_rank_plus_noise(n, c, rank).numpy()
    return (
        f"X: dense {n}x{c} float32, {rank} components, batch_size {batch}, forget_factor 0.7, "
        f"init nndsvda for both. 'sklearn 1 pass s': its one-pass fit (initialisation "
        f"included), less its final loss evaluation; 'ours 1 pass s': our one-pass fit "
        f"likewise (its codes, refined by one update against the final components as our "
        f"fit ends, and their full-data loss); 'ours until s': our fit until the first batch "
        f"boundary where the full-data loss of our codes (unrefined; samples not yet "
        f"visited keep their starting codes) is at most scikit-learn's one-pass loss (the "
        f"checks outside the timing); the ratio takes the faster of ours that reaches "
        f"scikit-learn's loss.\n\n"
        + _online_rows(X, rank, batch)
    )


def sparse_topics(n, c, rank, tokens_per_row, seed=0):
    """A sparse ``(n, c)`` count matrix drawn like a corpus from a topic model (scipy CSR,
    float32): each row mixes the ``rank`` topics with Dirichlet(0.2) weights, each topic
    is a Dirichlet(0.05) distribution over the columns, and each row draws
    ``tokens_per_row`` columns; repeated columns add up.  Unlike random positions, the
    pattern itself has low rank, as in a document-term matrix."""
    import scipy.sparse

    rng = np.random.default_rng(seed)
    mixtures = torch.from_numpy(rng.gamma(0.2, size=(n, rank))).cumsum(1)
    mixtures /= mixtures[:, -1:].clone()
    topics = torch.from_numpy(rng.gamma(0.05, size=(rank, c)) + 1e-12).cumsum(1)
    topics /= topics[:, -1:].clone()
    rows = np.repeat(np.arange(n), tokens_per_row)
    columns = np.empty(n * tokens_per_row, dtype=np.int64)
    for start in range(0, n, 1 << 17):  # bounded temporaries
        stop = min(start + (1 << 17), n)
        draws = torch.from_numpy(rng.random((stop - start, tokens_per_row)))
        topic = torch.searchsorted(mixtures[start:stop], draws).clamp_max_(rank - 1).reshape(-1)
        chosen = torch.empty(topic.numel(), dtype=torch.int64)
        for k in range(rank):
            where = (topic == k).nonzero().squeeze(1)
            chosen[where] = torch.searchsorted(topics[k], torch.from_numpy(rng.random(where.numel())))
        columns[start * tokens_per_row:stop * tokens_per_row] = chosen.clamp_max_(c - 1).numpy()
    X = scipy.sparse.csr_matrix((np.ones(rows.size, dtype=np.float32), (rows, columns)), shape=(n, c))
    X.sum_duplicates()
    return X


def run_online_sparse(n=1_000_000, c=20_000, nnz=10_000_000, rank=10, batch=1024, generator="topics",
                      until="always"):
    """The opt-in sparse online comparison: ``generator`` "topics" (:func:`sparse_topics`,
    about ``nnz / n`` draws per row) or "positions" (``bench_sparse.sparse_low_rank``:
    random positions holding a low-rank product; a rank-``rank`` model explains almost
    nothing of it beyond the zeros)."""
    import scipy.sparse

    if generator == "topics":
        X = sparse_topics(n, c, rank, nnz // n)
        about = "counts drawn from a topic model (sparse_topics)"
    else:
        from bench_sparse import sparse_low_rank

        V = sparse_low_rank(n, c, rank, nnz).coalesce()
        indices = V.indices().numpy()
        X = scipy.sparse.csr_matrix((V.values().numpy(), (indices[0], indices[1])), shape=(n, c))
        about = "random positions holding a low-rank product (sparse_low_rank)"
    return (
        f"X: sparse {n}x{c} float32 with {X.nnz} non-zeros, {about}, {rank} components, "
        f"batch_size {batch}.\n\n" + _online_rows(X, rank, batch, until=until)
    )


# -- larger than memory -------------------------------------------------------------------------
def _write_big(path, gib, columns, seed=0):
    rows = int(gib * 2**30) // (4 * columns)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, columns))
    generator = np.random.default_rng(seed)
    chunk = max(1, (256 << 20) // (4 * columns))
    basis = generator.random((16, columns), dtype=np.float32)
    fd = os.open(path, os.O_RDONLY)
    try:
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            codes = generator.random((stop - start, 16), dtype=np.float32)
            array[start:stop] = codes @ basis
            array.flush()  # written: its pages may leave the cache (no page-cache flood)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    del array
    return rows


def _read_bandwidth(path, chunk=64 << 20):
    """MiB/s of one sequential read of ``path``, evicting behind (a cold read)."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buffer = bytearray(chunk)
        view = memoryview(buffer)
        started = time.perf_counter()
        offset = 0
        while offset < size:
            got = os.preadv(fd, [view], offset)
            if got <= 0:
                break
            os.posix_fadvise(fd, offset, got, os.POSIX_FADV_DONTNEED)
            offset += got
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
    return size / 2**20 / elapsed


_CHILD = r"""
import json, os, sys, time
import numpy as np, torch
sys.path[:0] = [{here!r}, {root!r}]
from torchnmf.nmf import NMF
from torchnmf.targets.sources import ArrayRows

class Evicting(ArrayRows):
    def __init__(self, array, path):
        super().__init__(array)
        self.fd = os.open(path, os.O_RDONLY)
        self.offset = array.offset
        self.row_bytes = array.shape[1] * array.dtype.itemsize
    def _evict(self, start, stop):
        os.posix_fadvise(self.fd, self.offset + start * self.row_bytes,
                         (stop - start) * self.row_bytes, os.POSIX_FADV_DONTNEED)
    def blocks(self, block_rows):
        # a block's pages leave the mapping two blocks later; evict them after that
        seen = []
        for start, stop, block in super().blocks(block_rows):
            yield start, stop, block
            seen.append((start, stop))
            if len(seen) > 3:
                self._evict(*seen.pop(0))
        for start, stop in seen:
            self._evict(start, stop)

path, evict, rank, n_iter, beta = {path!r}, {evict!r}, {rank!r}, {n_iter!r}, {beta!r}
array = np.load(path, mmap_mode="r")
source = Evicting(array, path) if evict else array
N, C = array.shape
model = NMF((N, C), rank=rank)
with torch.no_grad():
    model.H.mul_(0.5); model.W.mul_(0.5)
stamps = [time.perf_counter()]
model.fit(source, beta=beta, tol=0, max_iter=n_iter, callback=lambda i, loss: stamps.append(time.perf_counter()))
total = time.perf_counter() - stamps[0]
peak = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
per_iteration = [b - a for a, b in zip(stamps[1:], stamps[2:])]
print(json.dumps(dict(total=total, per_iteration=per_iteration, peak_mib=peak / 1024)))
"""


def run_disk(gib, directory, columns=2000, rank=16, n_iter=3, evict=None, keep=False, betas=(2, 1)):
    """The opt-in larger-than-memory run (see the module docstring)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"torchnmf-bench-{gib:g}GiB.npy"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    evict = gib * 2**30 < memory if evict is None else evict
    lines = []
    try:
        started = time.perf_counter()
        rows = _write_big(path, gib, columns) if not path.exists() else np.load(path, mmap_mode="r").shape[0]
        written = time.perf_counter() - started
        bandwidth = _read_bandwidth(path)
        here = str(pathlib.Path(__file__).resolve().parent)
        results = []
        for beta in betas:
            child = _CHILD.format(here=here, root=str(pathlib.Path(here).parent), path=str(path),
                                  evict=evict, rank=rank, n_iter=n_iter, beta=beta)
            out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                                 check=True)
            result = __import__("json").loads(out.stdout.strip().splitlines()[-1])
            per_iteration = result["per_iteration"]
            seconds = sum(per_iteration) / len(per_iteration)
            floor = os.path.getsize(path) / 2**20 / bandwidth
            results.append([beta, seconds, floor, seconds / floor, result["peak_mib"],
                            result["total"]])
        lines.append(
            f"V: {rows}x{columns} float32 = {os.path.getsize(path) / 2**30:.1f} GiB in {path.parent} "
            f"(written in {written:.0f} s), machine memory {memory / 2**30:.1f} GiB, rank {rank}, "
            f"solver 'mu', {n_iter} iterations, default blocks (64 MiB); "
            f"{'every block evicted from the page cache after it is read' if evict else 'no eviction'}. "
            f"Disk read bandwidth (one cold sequential read, evicting behind): {bandwidth:.0f} MiB/s; "
            f"'floor' is one read of the file at that rate (one pass per iteration with "
            f"multiplicative updates). Peak RSS is the whole process's (Python and torch included).\n"
        )
        lines.append(markdown_table(
            ["beta", "s / iteration", "floor s", "ratio to floor", "peak RSS MiB", "fit s (with set-up)"],
            results,
        ))
    finally:
        if not keep and path.exists():
            path.unlink()
    return "\n".join(lines)


def run(quick=False):
    parts = ["### Streamed from a memory-mapped file against in memory\n", _streamed_ratio(quick)]
    try:
        import sklearn  # noqa: F401

        parts += ["\n### Online against scikit-learn's MiniBatchNMF (dense)\n", _online_dense(quick)]
    except ImportError:
        parts.append("\n(scikit-learn not installed: online comparison skipped)")
    return "\n".join(parts)


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--online-sparse", action="store_true")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of --online-sparse "
                        "(10 non-zeros per row)")
    parser.add_argument("--sparse-data", choices=("topics", "positions"), default="topics")
    parser.add_argument("--until", choices=("always", "if-needed"), default="always",
                        help="our fit until scikit-learn's loss at a batch boundary: always, or "
                        "only when our one-pass fit does not reach it")
    parser.add_argument("--disk", type=float, metavar="GIB")
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--evict", choices=("auto", "yes", "no"), default="auto")
    parser.add_argument("--betas", default="2,1", help="comma-separated betas of --disk")
    args = parser.parse_args()
    if args.online_sparse:
        print(run_online_sparse(n=args.rows, nnz=10 * args.rows, generator=args.sparse_data,
                                until=args.until.replace("-", " ")))
    elif args.disk:
        evict = None if args.evict == "auto" else args.evict == "yes"
        print(run_disk(args.disk, args.dir, evict=evict,
                       betas=tuple(float(b) for b in args.betas.split(","))))
    else:
        print(run(quick=args.quick))
