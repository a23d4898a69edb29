r"""Target kinds: what the data gives a fitting step.

A *statistics object* wraps one target ``V`` and one ``beta`` and answers
three questions about the current factors:

- ``h_terms(H, W)``: the negative and positive parts of the gradient of
  :math:`D_\beta(V | \hat V)` with respect to ``H``, and the divergence at the
  current point (computed on the way, almost for free);
- ``w_terms(H, W)``: the same parts with respect to ``W`` (every kind
  also takes ``divergence=True``, which adds the divergence, and
  ``h_terms(..., divergence=False)`` skips it, for callers that update ``W``
  first);
- ``divergence(H, W)``: the divergence alone.

A divergence is a float64 0-dim tensor on the target's device, or a Python
float where a kind assembles it on the host (the dense kind on the CPU, whose
small fits would otherwise pay a torch call for every scalar operation), or
float64 ``(K,)`` for stacked factors (:mod:`torchnmf.restarts`).

Solvers never look at ``V`` themselves, so the kinds differ only by the object
:func:`statistics` chooses once per fit.  Every statistic is a sum over row
blocks of ``V`` (the ``W`` terms and the divergence) or a row-wise function of
them (the ``H`` terms); a kind that wraps another (streamed from disk, summed
across processes) relies on exactly that.

Members: :mod:`~torchnmf.targets.dense` (closed forms for a dense matrix),
:mod:`~torchnmf.targets.streamed` (row blocks read from disk or any row
source of :mod:`~torchnmf.targets.sources`, each handed to the kinds here),
:mod:`~torchnmf.targets.sparse` (COO/CSR/CSC matrices, never densified),
:mod:`~torchnmf.targets.masked` (missing entries, dense or sparse),
:mod:`~torchnmf.targets.convolution` (closed forms for the convolutional
models' forward map, dense or masked),
:mod:`~torchnmf.targets.autograd` (any model, by vector-Jacobian products),
:mod:`~torchnmf.targets.residual` (the divergence near an exact fit) and
:mod:`~torchnmf.targets.prepare` (validation of ``V`` and its mask at the
entry point); :mod:`~torchnmf.targets.sources` holds the row sources a
streamed target reads (files, memmaps, block sequences).  A new kind provides the three methods above with the same
shapes and dtypes, and two for the scale (see :mod:`torchnmf.solvers.scaling`):
``scale_sums()``, the sum and the count of the observed entries as Python
numbers (a wrapping kind sums its parts' over row blocks or processes), and
``scaled(factor)``, the same kind for ``factor * V``; optionally
``magnitude()`` (:math:`\sum V^\beta`) and ``explicit_divergence(H, W)``
(float64, entry by entry) let :mod:`.residual` replace a closed form that
cancellation has eaten.  It joins :func:`statistics`.
"""
import torch

from ..models.forward import conv_transpose
from .autograd import AutogradStats
from .convolution import ConvStats
from .dense import DenseMatrixStats
from .masked import MaskedAutogradStats, MaskedMatrixStats
from .sparse import SPARSE_LAYOUTS, SparseMatrixStats
from .streamed import StreamedTarget

__all__ = ["statistics"]


def statistics(V, beta, mask=None, reconstruct=None, name="fit"):
    r"""The statistics object for a prepared target ``V`` (see :mod:`.prepare`).

    ``reconstruct=None`` means the matrix model :math:`\hat V = H W^\top`, which
    has closed forms for dense, sparse and masked targets; so has the
    convolutional models' forward map (``reconstruct`` is
    :func:`~torchnmf.models.forward.conv_transpose`) for dense and masked ones;
    any other forward map takes the autograd route, which needs a dense ``V``.  ``name`` names the
    caller in the error for a sparse target on that route.  A
    :class:`~.streamed.StreamedTarget` (a matrix read in row blocks) gets the
    streamed kind, which wraps the others block by block.
    """
    if isinstance(V, StreamedTarget):
        if reconstruct is not None:
            raise NotImplementedError(
                f"{name} does not stream targets from disk yet; streaming needs the matrix "
                f"model NMF"
            )
        return V.statistics(beta)
    if V.layout != torch.strided and (reconstruct is not None or V.layout not in SPARSE_LAYOUTS):
        raise NotImplementedError(f"{name} does not accept sparse targets yet; pass V.to_dense()")
    if reconstruct is None:
        if mask is not None:
            return MaskedMatrixStats(V, mask, beta)
        if V.layout in SPARSE_LAYOUTS:
            return SparseMatrixStats(V, beta)
        return DenseMatrixStats(V, beta)
    if reconstruct is conv_transpose:
        return ConvStats(V, beta, mask)
    if mask is not None:
        return MaskedAutogradStats(V, mask, beta, reconstruct)
    return AutogradStats(V, beta, reconstruct)
