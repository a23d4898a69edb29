r"""A target kind summed across processes: each process holds a block of rows.

With the rows of ``V`` (and of ``H``) split over the processes of a
``torch.distributed`` group and ``W`` the same on every process, every
statistic a fit needs is either row-wise (the ``H`` terms: local, no
communication) or a sum over row blocks (the ``W`` terms, the divergence, the
``H`` penalty).  :class:`DistributedStats` wraps *any* local statistics object
(dense, sparse, masked, streamed from disk: anything with ``h_terms``,
``w_terms`` and ``divergence``) and sums exactly those sums, in one all-reduce
per call: the ``W`` terms and the divergence travel together (packed in float64
when the factors are float32).  Multiplicative updates carry the divergence
of the ``H`` step into the ``W`` terms' all-reduce
(:meth:`DistributedStats.h_terms_unsummed`), so one of their iterations
needs one collective: each is a synchronisation point whose latency (about
1 ms with gloo on localhost, whatever the size up to a few hundred KiB,
measured) does not shrink with the processes' share of the work.  A
local kind whose ``gram_form`` is true (beta=2 without a mask: the positive
term is ``W (H^T H)``) lets the ``(R, R)`` Gram matrix travel instead of a
second ``(C, R)`` term.  :class:`Reduction` holds the group and the timeout, and offers the
few other sums and maxima a solver may need (HALS's Gram matrix and the size
of a sweep's change).

Every collective waits at most ``timeout`` seconds, so a dead or hanging peer
ends the fit with :class:`DistributedTimeoutError` instead of a hang; the
summed values are identical on every process, so every decision taken from
them (stopping, accepting an extrapolation) is the same everywhere.
"""
import datetime

import torch

__all__ = ["Reduction", "DistributedStats", "DistributedTimeoutError", "DEFAULT_TIMEOUT"]

# seconds a collective may wait for the other processes before the fit fails
DEFAULT_TIMEOUT = 300.0


class DistributedTimeoutError(RuntimeError):
    """A process of the group did not take part in a collective within the timeout."""


def _dist():
    import torch.distributed as dist

    return dist


class Reduction:
    """Sums and maxima over the processes of ``group``, each waiting at most ``timeout`` s.

    ``group`` is a ``torch.distributed`` process group (``None`` for the
    default group).  With NCCL, tensors elsewhere than on the current CUDA
    device (Python floats, counts) travel through it.  ``bytes_reduced`` counts the payload of every all-reduce,
    for the benchmark's communication figures.
    """

    def __init__(self, group=None, timeout=DEFAULT_TIMEOUT):
        dist = _dist()
        self.group = group
        self.timeout = float(timeout)
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.bytes_reduced = 0
        self.calls = 0
        # NCCL reduces CUDA tensors only: small CPU values travel through this device
        self.device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())

    # -- waiting with a deadline ------------------------------------------------
    def wait(self, work, what):
        """Wait for the asynchronous ``work`` (a collective), raising on the deadline."""
        try:
            finished = work.wait(datetime.timedelta(seconds=self.timeout))
        except RuntimeError as error:  # gloo reports a lost peer or its own timeout this way
            raise DistributedTimeoutError(
                f"{what} failed on rank {self.rank} of {self.size}: another process died or "
                f"did not answer within timeout={self.timeout:g} s ({error})"
            ) from error
        if finished is False:
            raise DistributedTimeoutError(
                f"{what} did not finish on rank {self.rank} of {self.size} within "
                f"timeout={self.timeout:g} s; another process died or hangs"
            )

    def _all_reduce(self, flat, op, what):
        dist = _dist()
        self.calls += 1
        self.bytes_reduced += flat.numel() * flat.element_size()
        moved = flat if flat.device == self.device else flat.to(self.device)
        work = dist.all_reduce(moved, op=op, group=self.group, async_op=True)
        self.wait(work, what)
        if moved is not flat:
            flat.copy_(moved)
        return flat

    # -- the operations ---------------------------------------------------------
    def sum_(self, *tensors, what="all-reduce"):
        """Sum each tensor over the processes, in place; one all-reduce per dtype.

        Tensors of one dtype are packed into one flat buffer (the fused
        all-reduce of DistributedDataParallel's buckets).  Returns the tensors.
        """
        dist = _dist()
        by_dtype = {}
        for tensor in tensors:
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        for group in by_dtype.values():
            if len(group) == 1 and group[0].is_contiguous():
                self._all_reduce(group[0], dist.ReduceOp.SUM, what)
                continue
            flat = torch.cat([t.reshape(-1).to(self.device) for t in group])
            self._all_reduce(flat, dist.ReduceOp.SUM, what)
            offset = 0
            for tensor in group:
                n = tensor.numel()
                tensor.copy_(flat[offset:offset + n].view_as(tensor))
                offset += n
        return tensors

    def sum_fused_(self, *tensors, what="all-reduce"):
        """Sum the tensors over the processes, in place, in ONE all-reduce whatever
        their dtypes: packed in the widest dtype among them (a float32 ``(C, R)``
        term then travels, and is summed, in float64 beside a float64 objective).
        Returns the tensors."""
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) == 1:
            return self.sum_(*tensors, what=what)
        wide = max(dtypes, key=lambda d: torch.finfo(d).bits)
        flat = torch.cat([t.reshape(-1).to(self.device, wide) for t in tensors])
        dist = _dist()
        self._all_reduce(flat, dist.ReduceOp.SUM, what)
        offset = 0
        for tensor in tensors:
            n = tensor.numel()
            tensor.copy_(flat[offset:offset + n].view(tensor.shape))
            offset += n
        return tensors

    def sum_float(self, value):
        """A Python float summed over the processes (in float64)."""
        total = torch.tensor(float(value), dtype=torch.float64)
        return float(self.sum_(total, what="sum of a scalar")[0])

    def max_float(self, value):
        """The largest of a Python float over the processes."""
        dist = _dist()
        total = torch.tensor(float(value), dtype=torch.float64)
        return float(self._all_reduce(total, dist.ReduceOp.MAX, "maximum of a scalar"))

    def max_(self, tensor, what="maximum"):
        """The elementwise largest of ``tensor`` over the processes, in place."""
        dist = _dist()
        return self._all_reduce(tensor, dist.ReduceOp.MAX, what)

    def broadcast_(self, tensor, what="broadcast"):
        """Overwrite ``tensor`` with the group's rank 0's, in place."""
        dist = _dist()
        source = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        moved = tensor if tensor.device == self.device else tensor.to(self.device)
        work = dist.broadcast(moved, src=source, group=self.group, async_op=True)
        self.wait(work, what)
        if moved is not tensor:
            tensor.copy_(moved)
        return tensor

    def gather_objects(self, value, what="exchange of settings"):
        """Every process's ``value`` (picklable), in rank order.

        ``all_gather_object`` has no asynchronous form, so its deadline is
        the group's own timeout (set at ``init_process_group``).
        """
        dist = _dist()
        # all_gather_object has no deadline of its own: meet every process first
        self.sum_float(0.0)
        values = [None] * self.size
        try:
            dist.all_gather_object(values, value, group=self.group)
        except RuntimeError as error:
            raise DistributedTimeoutError(
                f"{what} failed on rank {self.rank} of {self.size}: another process died or "
                f"did not answer ({error})"
            ) from error
        return values


def _device_of(tensors):
    return next(iter(tensors)).device


class DistributedStats:
    """The statistics of the stacked matrix from each process's local statistics.

    Args:
        local: the statistics object of this process's rows of ``V`` (any kind).
        reduction (Reduction): the group the rows are spread over.
        row_objective (callable, optional): ``row_objective(H) -> float``, a
            per-process addend of the objective (the penalty on this process's
            rows of ``H``), summed together with the divergence, so that the
            returned divergences are the summed divergence plus the summed addend.

    ``h_terms`` returns this process's rows of the ``H`` terms (no
    communication besides the divergence); ``w_terms`` returns the ``W``
    terms of the whole matrix, identical on every process.
    """

    def __init__(self, local, reduction, row_objective=None):
        self.local = local
        self.reduction = reduction
        self.row_objective = row_objective
        # masked targets offer their observed entries to weighted HALS
        if hasattr(local, "observed_target"):
            self.observed_target = local.observed_target

    def _local_divergence(self, value, H):
        value = torch.as_tensor(value, dtype=torch.float64).reshape(1).clone()
        if self.row_objective is not None:
            value += self.row_objective(H)
        return value

    def h_terms(self, H, W, divergence=True):
        negative, positive, value = self.local.h_terms(H, W)
        if not divergence:
            return negative, positive, None
        value = self._local_divergence(value, H)
        self.reduction.sum_(value, what="sum of the divergence")
        return negative, positive, value[0]

    # float32 W terms travel in float64 beside the objective: at most this many
    # (C, R) values, so that at most about 1 MiB more crosses (on gloo one all-reduce
    # costs the same up to a few hundred KiB; over a network, more bytes cost more
    # than the latency saved); float64 ones always travel with it
    CARRY_LIMIT = 2 ** 17

    def carries_objective(self, W):
        """Whether :meth:`h_terms_unsummed` with ``w_terms(carry=...)`` should
        replace two all-reduces by one for factors like ``W``."""
        return W.dtype == torch.float64 or W.numel() <= self.CARRY_LIMIT

    def h_terms_unsummed(self, H, W):
        """:meth:`h_terms` with this process's addend of the objective (its
        divergence and ``H`` penalty) not yet summed: pass it to
        ``w_terms(carry=...)``, which sums it in the ``W`` terms' all-reduce, so
        that an iteration of multiplicative updates needs one collective."""
        negative, positive, value = self.local.h_terms(H, W)
        return negative, positive, self._local_divergence(value, H)

    def w_terms(self, H, W, divergence=False, carry=None):
        """The ``W`` terms of the stacked matrix (and with ``divergence`` its
        objective); with ``carry`` (from :meth:`h_terms_unsummed`) also that
        objective summed, in the same all-reduce: ``(negative, positive, value)``."""
        if divergence and carry is not None:
            raise ValueError("w_terms takes either divergence=True or carry, not both")
        if divergence:
            negative, positive, value = self.local.w_terms(H, W, divergence=True)
        else:
            negative, positive = self.local.w_terms(H, W)
        # the local terms may be the local kind's reused buffers or broadcast
        # views (beta=1's column sums): sum fresh copies
        negative = negative.clone()
        gram_form = getattr(self.local, "gram_form", False)
        # beta=2 without a mask: positive = W (H^T H), so the (R, R) Gram
        # matrix travels instead of a second (C, R) term
        summed = H.T @ H if gram_form else positive.clone()
        parts = [negative, summed]
        if divergence:
            value = self._local_divergence(value, H)
        elif carry is not None:
            value = carry
        if divergence or carry is not None:
            parts.append(value)
        # one all-reduce, the terms in float64 beside the objective, while that is cheap
        fused = divergence is False or self.carries_objective(W)
        (self.reduction.sum_fused_ if fused else self.reduction.sum_)(*parts, what="sum of the W terms")
        positive = W @ summed if gram_form else summed
        if not divergence and carry is None:
            return negative, positive
        return negative, positive, value[0]

    def w_numerator_and_gram(self, H, W, divergence=False):
        """``(V^T H, H^T H)`` of the stacked matrix in one all-reduce (HALS's ``W``
        update); with ``divergence`` also the objective at ``(H, W)`` (which the
        local kind gives from its ``W`` terms), in the same all-reduce where
        :meth:`carries_objective`."""
        if divergence:
            negative, _, value = self.local.w_terms(H, W, divergence=True)
        else:
            negative, _ = self.local.w_terms(H, W)
        negative, gram = negative.clone(), H.T @ H
        if not divergence:
            self.reduction.sum_(negative, gram, what="sum of the W terms")
            return negative, gram
        value = self._local_divergence(value, H)
        sum_ = self.reduction.sum_fused_ if self.carries_objective(W) else self.reduction.sum_
        sum_(negative, gram, value, what="sum of the W terms")
        return negative, gram, value[0]

    def divergence(self, H, W):
        value = self._local_divergence(self.local.divergence(H, W), H)
        self.reduction.sum_(value, what="sum of the divergence")
        return value[0]
