"""Shared helpers of the benchmarks: timing, peak memory, data and tables.

Absolute times on shared machines are noisy; every section reports ratios
measured in the same run.  Per-iteration times are taken as the difference
between a long and a short run divided by the difference in iterations, so
that fixed costs (validation, set-up, a final loss) cancel out for every
implementation alike.
"""
import os
import statistics
import time
import warnings

import numpy as np
import torch

__all__ = [
    "low_rank_plus_noise", "per_iteration_ms", "PeakMemory", "peak_of_runs", "peak_in_subprocess",
    "markdown_table", "mib", "sklearn_mu",
]


def low_rank_plus_noise(n, c, rank, seed=0, noise=0.1, dtype=torch.float32):
    """A deterministic non-negative ``(n, c)`` matrix of rank ``rank`` plus uniform noise."""
    g = torch.Generator().manual_seed(seed)
    H = torch.rand(n, rank, generator=g, dtype=dtype)
    W = torch.rand(c, rank, generator=g, dtype=dtype)
    V = H @ W.T
    V.add_(torch.rand(n, c, generator=g, dtype=dtype), alpha=noise * float(V.mean()))
    return V


def per_iteration_ms(run, short=4, long=16, repeats=3):
    """Milliseconds per iteration of ``run(n_iter)``: (T(long) - T(short)) / (long - short), median."""
    samples = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(short)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(short)
            t1 = time.perf_counter()
            run(long)
            t2 = time.perf_counter()
            samples.append(((t2 - t1) - (t1 - t0)) / (long - short) * 1e3)
    return max(statistics.median(samples), 1e-6)


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    """Extra peak resident memory (MiB) while the ``with`` block runs.

    Resets the kernel's high-water mark (``/proc/self/clear_refs``) on entry and
    reads it on exit; ``extra`` is ``None`` where that is not possible.
    """

    def __enter__(self):
        self.extra = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start = _status_kib("VmRSS")
        except OSError:
            self.start = None
        return self

    def __exit__(self, *exc):
        if self.start is not None:
            self.extra = max(_status_kib("VmHWM") - self.start, 0) / 1024
        return False


def peak_of_runs(run, n_iter):
    """Extra peak MiB of ``run(n_iter)`` after a one-iteration warm-up.

    The warm-up keeps libraries' code pages and thread pools out of the figure:
    they are not the method's memory.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(1)
        with PeakMemory() as mem:
            run(n_iter)
    return mem.extra


def peak_in_subprocess(module, function, *args):
    """Extra peak memory (MiB) of ``module.function(*args)``, run in a fresh process.

    The function builds its data, enters :class:`PeakMemory` around the work and
    returns ``extra``.  A fresh process with glibc's mmap threshold pinned low
    returns every large buffer to the system when freed, so the high-water mark
    measures what the work itself keeps alive, not what earlier runs left cached.
    Returns ``None`` when the measurement is not possible.
    """
    import json
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        "import json, sys; sys.path[:0] = [%r, %r]; import %s as m; "
        "print(json.dumps(m.%s(*json.loads(sys.argv[1]))))"
        % (here, os.path.dirname(here), module, function)
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(list(args))],
        capture_output=True, text=True, env=env, check=False,
    )
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-2000:])
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(tensor_or_array):
    nbytes = tensor_or_array.nbytes if hasattr(tensor_or_array, "nbytes") else (
        tensor_or_array.numel() * tensor_or_array.element_size()
    )
    return nbytes / 2**20


def markdown_table(headers, rows):
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def describe_machine():
    return (
        f"torch {torch.__version__}, numpy {np.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs"
    )


def sklearn_mu(X, H0, W0, beta):
    """``run(n_iter)``: scikit-learn's MU solver on ``X`` (numpy or scipy sparse) from
    torchnmf's initial factors (sklearn's orientation: ``X ~ H0 @ W0.T``)."""
    from sklearn.decomposition import NMF as SkNMF

    W_init, H_init = H0.numpy().copy(), W0.T.numpy().copy()

    def run(n_iter):
        est = SkNMF(
            n_components=H0.shape[1], solver="mu", beta_loss=beta, init="custom",
            max_iter=n_iter, tol=0,
        )
        est.fit_transform(X, W=W_init.copy(), H=H_init.copy())
    return run
