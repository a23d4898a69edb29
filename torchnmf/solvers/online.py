r"""Online (minibatch) NMF for every beta: ``W`` learnt from batches of rows.

Each batch :math:`V_t` (rows of the data) gets its activations :math:`H_t`
by multiplicative updates with ``W`` fixed.  Then ``W`` takes one
majorisation-minimisation step on the forgetting-weighted sum of the batches
seen so far (Mairal et al. 2010, doi:10.5555/1756006.1756008; Lefèvre, Bach &
Févotte 2011, doi:10.1109/ASPAA.2011.6082314).  With :math:`\tilde W` the
templates when batch :math:`t` arrives and :math:`\nabla^\pm_t` the two parts
of the gradient of :math:`D_\beta(V_t | H_t W^\top)` at :math:`\tilde W`, the
accumulated statistics are

.. math::

    A_t = \rho A_{t-1} + \tilde W \odot \nabla^-_t, \qquad
    B_t = \rho B_{t-1} + \nabla^+_t,

with :math:`\rho` the forgetting factor, :math:`B_0 = \nabla^+_1 / n_1` and
:math:`A_0 = W_0 \odot B_0` (:math:`n_1` the rows of the first batch: the
starting templates weigh as much as one sample; scikit-learn's ``MiniBatchNMF``
also starts from its templates.  Without this, a feature with no entry in the
first batch would get an exact zero, which no multiplicative step can undo.
Heavier starts slow the first pass down: measured on the dense benchmark,
50000 x 500, the weight of a whole batch took 1.7 passes to reach
scikit-learn's one-pass loss, one sample 1.0), and

.. math::

    W \leftarrow \tilde W \odot \Big(\frac{A_t}{\tilde W \odot (B_t + \lambda)}\Big)^{\gamma(\beta)},

(:math:`\lambda` the elastic-net gradient on ``W`` of ``penalty_W`` per row,
times :math:`n_t + \rho n_{t-1} + \rho^2 n_{t-2} + \dots`, the rows of the
batches weighted as their statistics are: each batch's objective carries the
penalty of its rows, as scikit-learn's ``MiniBatchNMF`` accumulates it).  For
:math:`1 \le \beta \le 2` (:math:`\gamma = 1`) this is the exact minimiser of
the surrogate

.. math::

    S_t(W) = \sum_{ij} \Big[ \frac{(B_t)_{ij} \tilde W_{ij}}{\beta}
        \Big(\frac{W_{ij}}{\tilde W_{ij}}\Big)^{\beta}
        - \frac{(A_t)_{ij}}{\beta - 1} \Big(\frac{W_{ij}}{\tilde W_{ij}}\Big)^{\beta - 1} \Big]

(the auxiliary function of Févotte & Idier 2011 with the accumulated terms;
:math:`\log` for :math:`\beta = 1`), so :math:`S_t` never increases;
:func:`surrogate` evaluates it.  With :math:`\rho = 0` and one batch holding
every row, a step is an iteration of the full-batch multiplicative updates.
All tensors follow the device and dtype of ``W``; batches may be dense or
sparse.
"""
import torch

from ..targets.dense import DenseMatrixStats
from ..targets.residual import AccurateDivergence
from ..targets.sparse import SparseMatrixStats, is_column_major
from .mu import _flush_subnormal_, mu_exponent, mu_update_
from .penalty import Penalty

__all__ = ["solve_activations", "OnlineMU", "surrogate"]


def _batch_statistics(V, beta, with_constant):
    """The statistics of a dense or sparse batch; without the constant part of the
    divergence (a pass over the batch) when no divergence is wanted.  A sparse
    batch's ``W`` terms scatter from its rows: they are taken once per batch,
    which a transposed copy would cost more than it saves."""
    constant = None if with_constant else 0.0
    if V.layout == torch.strided:
        stats = DenseMatrixStats(V, beta, constant=constant)
    else:
        stats = SparseMatrixStats(V, beta, constant=constant, transposed_copy=False)
    # a divergence that cancellation ate near an exact fit is the explicit residual
    return AccurateDivergence(stats, V.dtype) if with_constant else stats


def solve_activations(V, W, H, beta, penalty=Penalty(), max_iter=100, tol=1e-4,
                      with_constant=True):
    """Multiplicative updates of ``H`` (in place) for ``V ≈ H W^T`` with ``W`` fixed.

    Stops after ``max_iter`` updates, or once an update changes ``H`` by at most
    ``tol`` times its norm (no divergence is computed on the way).  Returns
    ``(H, statistics)``: the batch's statistics object, for the ``W`` step
    (``with_constant=False``: its divergences lack the part that depends on
    ``V`` alone).
    """
    stats = _batch_statistics(V, beta, with_constant)
    gamma = mu_exponent(beta)
    for _ in range(max_iter):
        previous = H.clone() if tol > 0 else None
        negative, positive, _ = stats.h_terms(H, W, divergence=False)
        mu_update_(H, negative, positive, gamma, penalty)
        if previous is not None and float(previous.sub_(H).norm()) <= tol * float(H.norm()):
            break
    return H, stats


def surrogate(A, B, W_reference, W, beta):
    """:math:`S_t(W)` of the module docstring (float64), for ``1 <= beta <= 2``."""
    ratio = (W / W_reference.clamp_min(torch.finfo(W.dtype).tiny)).double()
    A, B, W_reference = A.double(), B.double(), W_reference.double()
    first = (B * W_reference * ratio.pow(beta)).sum() / beta
    if beta == 1:
        return first - (A * ratio.log()).sum()
    return first - (A * ratio.pow(beta - 1)).sum() / (beta - 1)


class OnlineMU:
    """Online multiplicative updates: :meth:`partial_fit` one batch of rows at a time.

    Args:
        W (Tensor): ``(C, R)`` starting templates; its device and dtype are
            those of every computation.  The attribute ``W`` holds the current
            templates; the tensor passed in is not kept up to date (a step
            without a penalty at ``1 <= beta <= 2`` writes the new templates to
            a second buffer and keeps the previous ones as ``reference``, and at
            ``beta = 2`` a row-major ``W`` is first copied to column-major
            storage, where its products are faster).
        beta (float): the divergence.
        forget_factor (float): :math:`\\rho` in [0, 1]: the weight of the past
            statistics after each batch (0 forgets them; 1 keeps all).  The
            minibatch estimator passes ``forget_factor ** (batch_size / n)``, so
            that its ``forget_factor`` is the weight after a whole pass.
        penalty_W (Penalty): the elastic-net penalty on ``W`` per row of a batch;
            a step applies it times the forgetting-weighted rows seen
            (``penalty_rows``), as the statistics weigh them.
        penalty_H (Penalty): the elastic-net penalty on each batch's ``H``.
        max_iter_H (int), tol_H (float): the multiplicative updates of each
            batch's activations.

    Attributes:
        A, B (Tensor): the accumulated statistics (``None`` before the first batch).
        reference (Tensor): ``W`` before the last step (``None`` before the first).
        n_batches (int): the batches seen.
        penalty_rows (float): the rows seen, each weighted as its batch's statistics.
    """

    def __init__(self, W, beta, forget_factor=0.7, penalty_W=Penalty(), penalty_H=Penalty(),
                 max_iter_H=100, tol_H=1e-4):
        self.beta = float(beta)
        if self.beta == 2 and W.dim() == 2 and not is_column_major(W):
            # column-major at beta 2: the step's Gram matrix W^T W, its positive term
            # (H^T H W^T)^T and a sparse batch's scattered V^T H are all faster so, and
            # A, B and W then share one layout (20000 x 10, one thread: the Gram 0.15
            # against 0.35 ms, W = A / B 0.07 against 0.40 ms with B column-major and
            # A row-major, the scatter 0.19 against 0.36 ms), for 0.15 ms more in the
            # embedding bag of V W, which copies W to rows
            W = W.mT.contiguous().mT
        self.W = W
        self.gamma = mu_exponent(self.beta)
        self.forget_factor = float(forget_factor)
        self.penalty_W, self.penalty_H = penalty_W, penalty_H
        self.max_iter_H, self.tol_H = max_iter_H, tol_H
        self.A = self.B = self.reference = None
        self.n_batches = 0
        self.penalty_rows = 0.0

    def activations(self, V, H):
        """Solve ``H`` (in place, a start of shape ``(n, R)``) for the batch ``V``."""
        return solve_activations(V, self.W, H, self.beta, self.penalty_H, self.max_iter_H,
                                 self.tol_H)[0]

    @torch.no_grad()
    def partial_fit(self, V, H, max_iter_H=None, cost=True):
        """One batch: solve its activations ``H`` (in place), then one ``W`` step.

        Args:
            V (Tensor): ``(n, C)``, dense or sparse, on ``W``'s device.
            H (Tensor): ``(n, R)``, the starting activations.
            max_iter_H (int, optional): updates of ``H`` for this batch (default
                ``max_iter_H`` of the constructor); 1 suits activations that are
                warm-started from the previous pass over the data.
            cost (bool): compute the batch's divergence (two passes over the
                batch at beta != 2); without it the second value returned is ``None``.

        Returns:
            (H, divergence): the batch's activations and :math:`D_\\beta(V | H W^T)`
            before the ``W`` step (non-negative, accurate near an exact fit:
            :class:`~torchnmf.targets.residual.AccurateDivergence`).
        """
        max_iter_H = self.max_iter_H if max_iter_H is None else max_iter_H
        H, stats = solve_activations(V, self.W, H, self.beta, self.penalty_H, max_iter_H,
                                     self.tol_H, with_constant=cost)
        negative, positive, *divergence = stats.w_terms(H, self.W, divergence=cost)
        if self.A is None:  # the starting templates weigh as much as one sample
            # A and B in W's layout (empty_like keeps its strides)
            self.B = torch.div(positive.expand_as(self.W), V.shape[0], out=torch.empty_like(self.W))
            self.A = torch.mul(self.W, self.B, out=torch.empty_like(self.W))
        # the batch's terms are its own (a fresh statistics object): updated in place
        self.A.mul_(self.forget_factor).addcmul_(negative, self.W)
        self.B.mul_(self.forget_factor).add_(positive)
        # before, the penalty of one batch met the statistics of ~1 / (1 - rho) batches:
        # 20 times too weak on the digits with batches of 256
        self.penalty_rows = self.forget_factor * self.penalty_rows + V.shape[0]
        penalty_W = self.penalty_W and Penalty(self.penalty_W.alpha * self.penalty_rows,
                                               self.penalty_W.l1_ratio)
        if self.gamma == 1 and not penalty_W:
            # the step below with gamma = 1 and no penalty: W = A / B, without the
            # division by W and multiplication by it (two passes over W per batch),
            # written into a second buffer: the templates the step started from stay
            # where they are as the reference, without a copy
            new = torch.empty_like(self.W) if self.reference is None else self.reference
            torch.div(self.A, self.B.clamp_min(torch.finfo(self.W.dtype).eps), out=new)
            _flush_subnormal_(new)
            self.reference, self.W = self.W, new
        else:
            if self.reference is None:  # the templates the step starts from, kept
                self.reference = self.W.clone()
            else:
                self.reference.copy_(self.W)
            # W <- W (A / (W (B + penalty)))^gamma: a multiplicative step whose parts
            # are the accumulated A / W and B
            mu_update_(self.W, self.A / self.W.clamp_min(torch.finfo(self.W.dtype).tiny),
                       self.B, self.gamma, penalty_W)
        self.n_batches += 1
        return H, float(divergence[0]) if cost else None
