"""One fit over processes (issue 12): one process with two threads, two gloo
processes with one thread each, and one process with one thread.

Every configuration runs in fresh processes (the thread count is fixed at
start-up).  Each reports milliseconds per iteration (``per_iteration_ms``:
the difference of a 16- and a 4-iteration fit, so the exchange of settings,
the broadcast of ``W`` and the final objective cancel) and, for two
processes, the bytes all-reduced per iteration (counted by
``torchnmf.targets.distributed.Reduction``, same difference).

``run(quick)`` is the ``make bench`` section: dense 4000 x 2000, rank 20,
beta=1 and beta=2 (float32).  The sparse 1,000,000 x 20,000 problem with
10,000,000 non-zeros at beta=1 is opt-in:
``python benchmarks/bench_distributed.py --scale``.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TITLE = "One fit across processes (issue 12)"
RANK = 20


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem(kind, quick):
    sys.path.insert(0, HERE)
    if kind == "dense":
        from _common import low_rank_plus_noise

        n, c = (1000, 500) if quick else (4000, 2000)
        return low_rank_plus_noise(n, c, RANK)
    from bench_sparse import sparse_low_rank

    n, c, nnz = (100_000, 2_000, 1_000_000) if quick else (1_000_000, 20_000, 10_000_000)
    return sparse_low_rank(n, c, RANK, nnz).to_sparse_csr()


def _rows(V, start, stop):
    if V.layout == __import__("torch").sparse_csr:
        import torch

        import warnings

        crow = V.crow_indices()
        lo, hi = int(crow[start]), int(crow[stop])
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow[start:stop + 1] - lo, V.col_indices()[lo:hi],
                                       V.values()[lo:hi], size=(stop - start, V.shape[1]))
    return V[start:stop]


def worker(args):
    """One process of a configuration; prints a JSON line (rank 0)."""
    import torch

    torch.set_num_threads(args.threads)
    from _common import per_iteration_ms

    import torchnmf.targets.distributed as distributed
    from torchnmf.nmf import NMF

    V = _problem(args.kind, args.quick)
    N, C = V.shape
    g = torch.Generator().manual_seed(1)
    W0 = torch.rand(C, RANK, generator=g)
    H0 = torch.rand(N, RANK, generator=g)
    group, rank, world = None, 0, 1
    if args.world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method="env://")
        group, rank, world = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    start, stop = N * rank // world, N * (rank + 1) // world
    V_local, H_local = _rows(V, start, stop), H0[start:stop]
    del V
    reductions = []
    original = distributed.Reduction.__init__

    def counting(self, *a, **k):
        original(self, *a, **k)
        reductions.append(self)

    distributed.Reduction.__init__ = counting

    def run(n_iter):
        NMF(W=W0, H=H_local).fit(V_local, beta=args.beta, max_iter=n_iter, tol=0,
                                 process_group=group)

    ms = per_iteration_ms(run, repeats=args.repeats)
    # CPU time of this process per iteration: what the machine's other jobs
    # (a shared machine) inflate least
    t0 = time.process_time()
    run(4)
    t1 = time.process_time()
    run(16)
    cpu_ms = ((time.process_time() - t1) - (t1 - t0)) / 12 * 1e3
    sent = allreduce_ms = None
    if reductions:
        run(4)
        short = reductions[-1].bytes_reduced
        run(16)
        sent = (reductions[-1].bytes_reduced - short) / 12
        # the all-reduce alone, with the W terms' payload (median of 50)
        payload = torch.zeros(int(sent) // 4)
        samples = []
        for _ in range(50):
            started = time.perf_counter()
            torch.distributed.all_reduce(payload)
            samples.append(time.perf_counter() - started)
        allreduce_ms = sorted(samples)[len(samples) // 2] * 1e3
    if rank == 0:
        print(json.dumps({"ms": ms, "cpu_ms": cpu_ms, "bytes": sent, "allreduce_ms": allreduce_ms}),
              flush=True)


def _launch(kind, beta, threads, world, quick, repeats):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world))
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--kind", kind,
               "--beta", str(beta), "--threads", str(threads), "--world", str(world),
               "--repeats", str(repeats)] + (["--quick"] if quick else [])
    processes = [subprocess.Popen(command, env=dict(env, RANK=str(r)), stdout=subprocess.PIPE,
                                  text=True) for r in range(world)]
    outputs = [p.communicate()[0] for p in processes]
    if any(p.returncode for p in processes):
        raise RuntimeError(f"a benchmark process failed: {command}")
    return json.loads(outputs[0].strip().splitlines()[-1])


def section(kind, betas, quick, repeats=3):
    from _common import markdown_table

    rows = []
    for beta in betas:
        one = _launch(kind, beta, 1, 1, quick, repeats)
        threads = _launch(kind, beta, 2, 1, quick, repeats)
        two = _launch(kind, beta, 1, 2, quick, repeats)
        rows.append([
            f"{beta:g}", one["ms"], threads["ms"], two["ms"],
            one["ms"] / two["ms"], two["ms"] / threads["ms"],
            one["cpu_ms"], two["cpu_ms"], one["cpu_ms"] / two["cpu_ms"],
            f"{two['bytes'] / 1024:.1f}", two["allreduce_ms"],
        ])
    headers = ["beta", "1x1 wall ms/it", "1x2 wall", "2x1 wall",
               "1x1 / 2x1 wall (target >= 1.6)", "2x1 / 1x2 wall (target <= 1.2)",
               "1x1 CPU ms/it", "2x1 CPU ms/it per process", "CPU split (ideal 2)",
               "KiB all-reduced per it", "one all-reduce of that payload (ms)"]
    return markdown_table(headers, rows) + (
        "\n\n1x1: one process, one thread; 1x2: one process, two threads; 2x1: two "
        "gloo processes, one thread each.  Wall times on a shared machine measure "
        "contention as much as scaling; the CPU time per process shows how the work splits.")


def run(quick=False):
    n, c = (1000, 500) if quick else (4000, 2000)
    return (f"Dense {n}x{c} float32, rank {RANK}, multiplicative updates, gloo on localhost.\n\n"
            + section("dense", (1, 2), quick))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="dense")
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--scale", action="store_true",
                        help="the sparse 1,000,000 x 20,000 problem (10M non-zeros) at beta=1")
    args = parser.parse_args()
    sys.path.insert(0, HERE)
    sys.path.insert(0, os.path.dirname(HERE))
    if args.worker:
        worker(args)
    elif args.scale:
        print(section("sparse", (1,), args.quick, repeats=1))
    else:
        print(run(args.quick))


if __name__ == "__main__":
    main()
