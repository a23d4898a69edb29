"""Cases that the two-process pool runs, and the problems they share with the
single-process references (imported by the tests, run in the workers)."""
import numpy as np
import torch


def split(n, world):
    """Uneven row blocks: the first process gets fewer rows than the others."""
    edges = [0] + [n * (r + 1) // world + (1 if r + 1 < world else 0) for r in range(world)]
    edges[-1] = n
    return edges


def problem(kind="dense", N=24, C=10, R=3, seed=0, dtype=torch.float64, scale=1.0, noise=0.1):
    """``(V, mask, W0, H0)``: a planted non-negative problem of the given target kind
    (``V`` and ``H0`` times ``scale``; ``noise=0``: exactly of rank ``R``)."""
    if scale != 1.0:
        V, mask, W0, H0 = problem(kind, N, C, R, seed, dtype, noise=noise)
        return V * scale, mask, W0, H0 * scale
    g = torch.Generator().manual_seed(seed)
    if kind == "digits":  # a real dataset: scikit-learn's handwritten digits
        from sklearn.datasets import load_digits

        V = torch.as_tensor(load_digits().data[:300], dtype=dtype)
        V = V[:, V.sum(0) > 0]  # drop the never-inked pixels
        N, C = V.shape
        W0 = torch.rand(C, R, generator=g, dtype=dtype) + 0.1
        H0 = torch.rand(N, R, generator=g, dtype=dtype) + 0.1
        return V, None, W0, H0
    V = torch.rand(N, R, generator=g, dtype=dtype) @ torch.rand(R, C, generator=g, dtype=dtype)
    V += noise * torch.rand(N, C, generator=g, dtype=dtype)
    mask = None
    if kind in ("sparse", "sparse_csr", "sparse_csc", "sparse_masked"):
        V = V * (torch.rand(N, C, generator=g, dtype=dtype) < 0.6)
    if kind in ("masked", "sparse_masked", "masked_rank1"):
        mask = torch.rand(N, C, generator=g) > 0.2
        mask[:, 0] = True  # every column observed on both processes' rows
    if kind == "masked_rank1":  # every entry of rank 0's rows observed
        mask[: split(N, 2)[1]] = True
    W0 = torch.rand(C, R, generator=g, dtype=dtype) + 0.1
    H0 = torch.rand(N, R, generator=g, dtype=dtype) + 0.1
    return V, mask, W0, H0


def as_kind(V, kind):
    if kind in ("sparse", "sparse_masked"):
        return V.to_sparse_coo()
    if kind == "sparse_csr":
        return V.to_sparse_csr()
    if kind == "sparse_csc":
        return V.to_sparse_csc()
    return V


def local_rows(V, start, stop):
    return V[start:stop]


def fit_case(rank, world, kind="dense", fit=None, model=None, problem_args=None,
             perturb_W=True, timeout=30, per_rank=None):
    """A distributed fit of this rank's rows; ``(n_iter, history, W, H rows)``
    (``per_rank``: ``{rank: options}`` that a rank adds, such as streaming its rows)."""
    import torch.distributed as dist

    from torchnmf.nmf import NMF

    V, mask, W0, H0 = problem(**{"kind": kind, **(problem_args or {})})
    edges = split(V.shape[0], world)
    start, stop = edges[rank], edges[rank + 1]
    if perturb_W and rank > 0:
        W0 = W0 * 7.0  # rank 0's W must win
    net = NMF(W=W0, H=H0[start:stop], **(model or {}))
    fit = dict(fit or {})
    fit.update((per_rank or {}).get(rank, {}))
    if mask is not None:
        fit["mask"] = mask[start:stop]
    n_iter = net.fit(as_kind(V[start:stop], kind), process_group=dist.group.WORLD,
                     timeout=timeout, **fit)
    return n_iter, list(net.loss_history), net.W.detach().numpy().copy(), net.H.detach().numpy().copy()


def reference_fit(kind="dense", fit=None, model=None, problem_args=None):
    """The single-process fit of the stacked matrix."""
    from torchnmf.nmf import NMF

    V, mask, W0, H0 = problem(**{"kind": kind, **(problem_args or {})})
    net = NMF(W=W0, H=H0, **(model or {}))
    fit = dict(fit or {})
    if mask is not None:
        fit["mask"] = mask
    n_iter = net.fit(as_kind(V, kind), **fit)
    return n_iter, list(net.loss_history), net.W.detach().numpy(), net.H.detach().numpy()


def settings_case(rank, world, **per_rank):
    """A fit where some settings differ on rank 1 (``per_rank`` holds rank 1's)."""
    import torch.distributed as dist

    from torchnmf.nmf import NMF

    V, _, W0, H0 = problem()
    edges = split(V.shape[0], world)
    start, stop = edges[rank], edges[rank + 1]
    options = {"beta": 1, "max_iter": 5}
    V_local = V[start:stop]
    if rank == 1:
        options.update(per_rank.get("fit", {}))
        if "columns" in per_rank:
            V_local = V_local[:, : per_rank["columns"]]
            W0 = W0[: per_rank["columns"]]
        if per_rank.get("negative"):
            V_local = V_local.clone()
            V_local[0, 0] = -1
    net = NMF(W=W0, H=H0[start:stop])
    before = net.W.detach().clone()
    try:
        net.fit(V_local, process_group=dist.group.WORLD, timeout=30, **options)
    finally:
        assert torch.equal(net.W.detach(), before), "a refused fit changed W"
    return None


def transform_case(rank, world, kind="dense", fit=None, seed=3):
    """A distributed transform with the default start; this rank's activations."""
    import torch.distributed as dist

    from torchnmf.nmf import NMF

    V, mask, W0, _ = problem(kind)
    edges = split(V.shape[0], world)
    start, stop = edges[rank], edges[rank + 1]
    fit = dict(fit or {})
    if mask is not None:
        fit["mask"] = mask[start:stop]
    net = NMF(W=W0 if rank == 0 else W0 + 1)
    H = net.transform(as_kind(V[start:stop], kind), process_group=dist.group.WORLD, timeout=30,
                      generator=torch.Generator().manual_seed(seed), **fit)
    return H.numpy()


def reference_transform(kind="dense", fit=None, seed=3):
    from torchnmf.nmf import NMF

    V, mask, W0, _ = problem(kind)
    fit = dict(fit or {})
    if mask is not None:
        fit["mask"] = mask
    net = NMF(W=W0)
    return net.transform(as_kind(V, kind), generator=torch.Generator().manual_seed(seed), **fit).numpy()


def init_case(rank, world, method="nndsvda", kind="dense", N=24, C=10, R=3, seed=5):
    """This rank's ``(W, H rows)`` of a distributed initialisation."""
    import torch.distributed as dist

    from torchnmf.init import initialize

    V, _, _, _ = problem(kind, N=N, C=C, R=R)
    edges = split(N, world)
    W, H = initialize(as_kind(V[edges[rank]:edges[rank + 1]], kind), R + 1, method,
                      generator=seed, process_group=dist.group.WORLD, timeout=30)
    return W.numpy(), H.numpy()


def reference_init(method="nndsvda", kind="dense", N=24, C=10, R=3, seed=5):
    from torchnmf.init import initialize

    V, _, _, _ = problem(kind, N=N, C=C, R=R)
    W, H = initialize(as_kind(V, kind), R + 1, method, generator=seed)
    return W.numpy(), H.numpy()


def checkpoint_case(rank, world, path, fit, resume=None, checkpoint=None, rank1=None):
    """A distributed fit that saves and/or resumes; ``(n_iter, history, W, H rows)``
    (``rank1``: what rank 1 passes instead, of ``checkpoint``, ``resume`` and
    ``checkpoint_every``)."""
    import torch.distributed as dist

    from torchnmf.nmf import NMF

    V, _, W0, H0 = problem()
    edges = split(V.shape[0], world)
    start, stop = edges[rank], edges[rank + 1]
    options = dict(checkpoint=checkpoint, checkpoint_every=5, resume=resume)
    if rank == 1:
        options.update(rank1 or {})
    net = NMF(W=W0 if resume is None else W0 * 5, H=H0[start:stop])
    n_iter = net.fit(V[start:stop], process_group=dist.group.WORLD, timeout=30, **options, **fit)
    return n_iter, list(net.loss_history), net.W.detach().numpy().copy(), net.H.detach().numpy().copy()


def fault_case(rank, world, mode, path, timeout=2.0):
    """Rank 1 dies (or hangs) at iteration 6; rank 0 reports how it ended."""
    import os
    import time

    import torch.distributed as dist

    from torchnmf.nmf import NMF
    from torchnmf.targets.distributed import DistributedTimeoutError

    V, _, W0, H0 = problem(N=60, C=20)
    edges = split(V.shape[0], world)
    start, stop = edges[rank], edges[rank + 1]
    last = [time.monotonic()]

    def callback(n_iter, loss):
        if rank == 1 and n_iter == 6:
            if mode == "die":
                os._exit(3)
            time.sleep(120)
        last[0] = time.monotonic()

    net = NMF(W=W0, H=H0[start:stop])
    try:
        net.fit(V[start:stop], beta=1, max_iter=1000, tol=0, process_group=dist.group.WORLD,
                timeout=timeout, callback=callback, checkpoint=path, checkpoint_every=2)
    except DistributedTimeoutError as error:
        return str(error), time.monotonic() - last[0]
    return "finished", 0.0


def nmfd_problem():
    g = torch.Generator().manual_seed(4)
    V = torch.rand(6, 5, 12, generator=g, dtype=torch.float64)
    W0 = torch.rand(5, 2, 3, generator=g, dtype=torch.float64)
    H0 = torch.rand(6, 2, 10, generator=g, dtype=torch.float64)
    return V, W0, H0


def nmfd_case(rank, world, fit):
    """A distributed NMFD fit (autograd statistics) of this rank's rows."""
    import torch.distributed as dist

    from torchnmf.nmf import NMFD

    V, W0, H0 = nmfd_problem()
    edges = split(V.shape[0], world)
    start, stop = edges[rank], edges[rank + 1]
    net = NMFD(W=W0, H=H0[start:stop])
    n_iter = net.fit(V[start:stop], process_group=dist.group.WORLD, timeout=30, **fit)
    return n_iter, list(net.loss_history), net.W.detach().numpy().copy(), net.H.detach().numpy().copy()


def reference_nmfd(fit):
    from torchnmf.nmf import NMFD

    V, W0, H0 = nmfd_problem()
    net = NMFD(W=W0, H=H0)
    n_iter = net.fit(V, **fit)
    return n_iter, list(net.loss_history), net.W.detach().numpy(), net.H.detach().numpy()


def sparse_fit_case(rank, world, kind="dense", fit=None):
    """A distributed ``sparse_fit`` of this rank's rows; ``(n_iter, history, W, H rows)``."""
    import torch.distributed as dist

    from torchnmf.nmf import NMF

    V, mask, W0, H0 = problem(kind)
    edges = split(V.shape[0], world)
    start, stop = edges[rank], edges[rank + 1]
    net = NMF(W=W0 if rank == 0 else W0 * 3, H=H0[start:stop])
    fit = dict(fit or {})
    if mask is not None:
        fit["mask"] = mask[start:stop]
    n_iter = net.sparse_fit(as_kind(V[start:stop], kind), process_group=dist.group.WORLD,
                            timeout=30, **fit)
    return n_iter, list(net.loss_history), net.W.detach().numpy().copy(), net.H.detach().numpy().copy()


def reference_sparse_fit(kind="dense", fit=None):
    from torchnmf.nmf import NMF

    V, mask, W0, H0 = problem(kind)
    net = NMF(W=W0, H=H0)
    fit = dict(fit or {})
    if mask is not None:
        fit["mask"] = mask
    n_iter = net.sparse_fit(as_kind(V, kind), **fit)
    return n_iter, list(net.loss_history), net.W.detach().numpy(), net.H.detach().numpy()


def conv_init_case(rank, world, seed=2):
    """This rank's ``(W, H rows)`` of NMFD's distributed random initialisation."""
    import torch.distributed as dist

    from torchnmf.nmf import NMFD

    V, _, _ = nmfd_problem()
    edges = split(V.shape[0], world)
    start, stop = edges[rank], edges[rank + 1]
    net = NMFD(V[start:stop].shape, rank=2, T=3)
    net.initialize_(V[start:stop], "random", generator=seed, process_group=dist.group.WORLD,
                    timeout=30)
    return net.W.detach().numpy().copy(), net.H.detach().numpy().copy()


def reference_conv_init(seed=2):
    from torchnmf.nmf import NMFD

    V, _, _ = nmfd_problem()
    net = NMFD(V.shape, rank=2, T=3).initialize_(V, "random", generator=seed)
    return net.W.detach().numpy(), net.H.detach().numpy()


def sparse_settings_case(rank, world, **rank1):
    """A distributed ``sparse_fit`` whose options differ on rank 1; nothing may change."""
    import torch.distributed as dist

    from torchnmf.nmf import NMF

    V, _, W0, H0 = problem()
    edges = split(V.shape[0], world)
    start, stop = edges[rank], edges[rank + 1]
    options = dict(beta=2, max_iter=5, sH=0.5)
    if rank == 1:
        options.update(rank1)
    net = NMF(W=W0, H=H0[start:stop])
    before = net.H.detach().clone()
    try:
        net.sparse_fit(V[start:stop], process_group=dist.group.WORLD, timeout=30, **options)
    finally:
        assert torch.equal(net.H.detach(), before), "a refused fit changed H"


def collectives_case(rank, world, kind, dtype, columns=10):
    """All-reduces per iteration of a ``mu`` fit (from fits of 5 and 15 iterations)."""
    import torch.distributed as dist

    import torchnmf.targets.distributed as distributed
    from torchnmf.nmf import NMF

    V, mask, W0, H0 = problem(kind=kind, dtype=dtype, C=columns)
    edges = split(V.shape[0], world)
    start, stop = edges[rank], edges[rank + 1]
    calls = []
    original = distributed.Reduction._all_reduce

    def counted(self, flat, op, what):
        calls.append(what)
        return original(self, flat, op, what)

    distributed.Reduction._all_reduce = counted
    try:
        counts = []
        for max_iter in (5, 15):
            fit = dict(beta=1, max_iter=max_iter, tol=0)
            if mask is not None:
                fit["mask"] = mask[start:stop]
            del calls[:]
            NMF(W=W0, H=H0[start:stop]).fit(as_kind(V[start:stop], kind),
                                             process_group=dist.group.WORLD, **fit)
            counts.append(len(calls))
    finally:
        distributed.Reduction._all_reduce = original
    return (counts[1] - counts[0]) / 10
