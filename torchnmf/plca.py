r"""Probabilistic latent component analysis: :class:`PLCA` and its shift-invariant kin.

A PLCA model is a distribution over the entries of the target,

.. math::

    P(n, c) = \sum_z P(c \,|\, z)\, P(z)\, P(n \,|\, z)
            = \big(H \operatorname{diag}(Z) W^\top\big)_{n,c},

with every component of ``W`` and ``H`` (the slices along dimension 1) and
the latent prior ``Z`` summing to one, so the reconstruction sums to one.
:class:`SIPLCA`, :class:`SIPLCA2` and :class:`SIPLCA3` replace the product by
the transposed convolution of :class:`~torchnmf.nmf.NMFD`,
:class:`~torchnmf.nmf.NMF2D` and :class:`~torchnmf.nmf.NMF3D` (shift
invariance along 1, 2 or 3 axes).  ``fit`` runs EM (see
:mod:`torchnmf.solvers.em`) on :math:`V / \sum V`, optionally with Dirichlet priors.
Construction, validation and the forward maps are those of :mod:`torchnmf.nmf`.
"""
import math

import torch
import torch.nn as nn

from .models.factors import FactorModule, kernel_tuple, shapes_from_vshape
from .models.fitting import check_callback, prepare_fit_target, require_factors
from .models.forward import conv_transpose, linear
from .solvers.em import ExpectationMaximisation, normalise_components_
from .solvers.loop import run_fit
from .targets import statistics
from .targets.residual import AccurateDivergence
from ._validation import (
    check_non_negative_number,
    check_non_negative_tensor,
    check_positive_int,
    check_real,
)

__all__ = ["BaseComponent", "PLCA", "SIPLCA", "SIPLCA2", "SIPLCA3"]


def _make_Z(Z, rank, dtype, device):
    """The latent prior from its specification: None (uniform), a shape or a tensor."""
    if Z is None:
        return torch.full((rank,), 1.0 / rank, dtype=dtype, device=device)
    if isinstance(Z, torch.Tensor):
        if Z.dim() != 1:
            raise ValueError(f"Z must be a 1-D tensor of length rank, got shape {tuple(Z.shape)}")
        return Z.detach().to(dtype=dtype, device=device).clone()
    if isinstance(Z, (tuple, list, torch.Size)):
        if len(Z) != 1:
            raise ValueError(f"Z must be 1-D, got shape {tuple(Z)}")
        return torch.rand(tuple(Z), dtype=dtype, device=device)
    raise TypeError(f"Z must be a tensor, a shape or None, got {type(Z).__name__}")


def _check_norm(norm):
    """``forward``'s ``norm``: a non-negative, finite number or tensor (a target's sum)."""
    if isinstance(norm, torch.Tensor):
        if norm.dtype == torch.bool or norm.is_complex():
            raise TypeError(f"norm must hold real numbers, got dtype {norm.dtype}")
        return check_non_negative_tensor(norm, "norm")
    return check_non_negative_number(norm, "norm")


def _check_alpha(alpha, name, factor):
    """A Dirichlet concentration: a positive number or a positive tensor broadcastable to ``factor``."""
    if isinstance(alpha, torch.Tensor):
        if alpha.is_complex() or alpha.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got dtype {alpha.dtype}")
        try:
            torch.broadcast_shapes(alpha.shape, factor.shape)
        except RuntimeError:
            raise ValueError(
                f"{name} must be broadcastable to the factor's shape {tuple(factor.shape)}, "
                f"got shape {tuple(alpha.shape)}"
            ) from None
        if torch.broadcast_shapes(alpha.shape, factor.shape) != factor.shape:
            raise ValueError(
                f"{name} must broadcast to the factor's shape {tuple(factor.shape)} without "
                f"growing it, got shape {tuple(alpha.shape)}"
            )
        alpha = alpha.to(dtype=factor.dtype, device=factor.device)
        if not bool(torch.isfinite(alpha).all()) or bool((alpha <= 0).any()):
            raise ValueError(f"{name} must be finite and positive everywhere")
        return alpha
    value = check_real(alpha, name)
    if value <= 0:
        raise ValueError(f"{name} must be positive (a Dirichlet concentration), got {value}")
    return value


class BaseComponent(FactorModule):
    r"""Base class of the PLCA models: normalised factors, a latent prior and EM.

    Args:
        rank (int, optional): the number of latent components; inferred from
            dimension 1 of ``W``/``H`` or the length of ``Z`` when given.
        W (tuple, Tensor or None): :math:`P(c, \ldots | z)`, like the NMF
            templates; normalised so that each component sums to one.
        H (tuple, Tensor or None): :math:`P(n, \ldots | z)`; normalised likewise.
        Z (Tensor, tuple or None): :math:`P(z)`, a 1-D tensor of length ``rank``
            (normalised), a shape for a random one, or ``None``: uniform when
            ``rank`` is given, and no ``Z`` at all (``self.Z is None``, the
            reconstruction is that of ``H`` and ``W`` alone, ``fit`` refuses)
            when neither ``rank`` nor ``Z`` is.
        trainable_W, trainable_H, trainable_Z (bool): which factors ``fit`` updates.

    Attributes:
        loss_history (list of float): after ``fit``, the objective (KL
            divergence of the normalised target, plus the prior term) after 0,
            1, ..., n_iter iterations.

    Examples::

        >>> from torchnmf.plca import BaseComponent
        >>> component = BaseComponent(rank=2, W=(4, 2), H=(5, 2))
        >>> component.W.shape, component.H.shape
        (torch.Size([4, 2]), torch.Size([5, 2]))
        >>> component.W.sum(0).round(decimals=4).tolist(), component.Z.tolist()
        ([1.0, 1.0], [0.5, 0.5])
    """

    def __init__(self, rank=None, W=None, H=None, Z=None, trainable_W=True, trainable_H=True,
                 trainable_Z=True):
        if not isinstance(trainable_Z, bool):
            raise TypeError(f"trainable_Z must be a bool, got {type(trainable_Z).__name__}")
        if rank is None and W is None and H is None and isinstance(Z, torch.Tensor) and Z.dim() == 1:
            rank = Z.shape[0]
        # the documented rule of the base class: no Z unless rank or Z is given; the
        # models built on it always have one (uniform by default)
        without_Z = rank is None and Z is None and not self._always_Z
        super().__init__(rank, W, H, trainable_W, trainable_H)
        if without_Z:
            self.register_parameter("Z", None)
            with torch.no_grad():
                for factor in (self.W, self.H):
                    if factor is not None:
                        normalise_components_(factor)
            self.loss_history = []
            return
        reference = self.W if self.W is not None else self.H
        dtype = reference.dtype if reference is not None else (
            Z.dtype if isinstance(Z, torch.Tensor) and Z.is_floating_point() else torch.get_default_dtype()
        )
        device = reference.device if reference is not None else torch.device("cpu")
        Z = _make_Z(Z, self.rank, dtype, device)
        if Z.shape[0] != self.rank:
            raise ValueError(
                f"inconsistent ranks: Z must have one entry per component, but rank is "
                f"{self.rank} and Z has {Z.shape[0]}"
            )
        check_non_negative_tensor(Z, "Z")
        self.Z = nn.Parameter(Z, requires_grad=trainable_Z)
        with torch.no_grad():
            for factor in (self.W, self.H, self.Z):
                if factor is not None:
                    normalise_components_(factor)
        self.loss_history = []

    _factor_map = None  # the NMF forward map of the model's dimensionality
    _always_Z = False  # True for the models: a uniform Z even when only W or H is given

    @classmethod
    def reconstruct(cls, H, W, Z):
        """The distribution: the NMF forward map of ``H diag(Z)`` and ``W`` (``H`` and
        ``W`` alone when ``Z`` is ``None``)."""
        if Z is None:
            return cls._factor_map(H, W)
        # Z scales H's rank axis: the last for the matrix model (H may carry batch
        # dimensions before it, as for NMF), dimension 1 for the shift-invariant ones
        shape = [1] * H.dim()
        shape[-1 if cls._factor_ndim is None else 1] = -1
        return cls._factor_map(H * Z.view(shape), W)

    def forward(self, H=None, W=None, Z=None, norm=None):
        r"""The reconstruction from the given factors, falling back to the module's own.

        Args:
            H, W, Z (Tensor, optional): the factors; default the module's own.
            norm (float or Tensor, optional): multiply the distribution by this
                (e.g. ``V.sum()`` to compare with the target).

        Returns:
            Tensor: a distribution summing to one (times ``norm``).
        """
        H, W = self._own_factors(H, W)
        if Z is None:
            Z = self.Z
        elif not isinstance(Z, torch.Tensor):
            raise TypeError(f"Z must be a tensor, got {type(Z).__name__}")
        elif Z.shape != (W.shape[1],):
            raise ValueError(
                f"Z must be a 1-D tensor with one entry per component ({W.shape[1]}), got "
                f"shape {tuple(Z.shape)}"
            )
        output = self.reconstruct(H, W, Z)
        return output if norm is None else output * _check_norm(norm)

    # True for the matrix model, whose statistics have closed forms (dense and sparse)
    _closed_form = False

    def _statistics(self, P):
        """The beta = 1 statistics of the normalised target (see :mod:`torchnmf.targets`)."""
        reconstruct = None if self._closed_form else type(self)._factor_map
        return statistics(P, 1, None, reconstruct, name=f"{type(self).__name__}.fit")

    def fit(self, V, tol=1e-4, max_iter=200, verbose=False, W_alpha=1, H_alpha=1, Z_alpha=1,
            *, callback=None):
        r"""Fit the trainable factors to ``V / V.sum()`` by expectation-maximisation.

        Args:
            V (Tensor): non-negative counts or intensities, of the
                reconstruction's shape, with a positive sum. Never modified.
                :class:`PLCA` also takes a sparse COO, CSR or CSC matrix and
                never densifies it (the shift-invariant models need a dense ``V``).
            tol (float): stop once the relative decrease of the objective falls
                under ``tol``; 0 runs all ``max_iter`` iterations.
            max_iter (int): the most iterations.
            verbose (bool): show a progress bar with the current objective.
            W_alpha, H_alpha, Z_alpha (float or Tensor): Dirichlet
                concentrations of the priors on each factor (1: no prior;
                above 1 smooths, below 1 sparsifies); a tensor must broadcast
                to the factor's shape.  They add ``alpha - 1`` to expected
                counts that sum to one (the normalised target).
            callback (callable, keyword-only): ``callback(n_iter, loss)``;
                returning ``True`` stops the fit.

        Returns:
            (int, Tensor): the iterations run and ``V.sum()``, the factor that
            turns the distribution back into the target's scale
            (``model(norm=V.sum())``).

        Raises:
            ValueError: a negative, NaN or all-zero ``V``, a ``V`` of the wrong
                shape, a non-positive ``alpha``, or bad options.
        """
        tol = check_non_negative_number(tol, "tol")
        max_iter = check_positive_int(max_iter, "max_iter")
        check_callback(callback)
        require_factors(self, ("W", "H"), "fit")
        if self.Z is None:
            raise ValueError(
                "fit needs the latent prior Z, but this module has none (neither rank nor Z "
                "was given); construct it with rank or Z"
            )
        V, _ = prepare_fit_target(self, V)
        total = V.sum()
        if not total > 0:
            raise ValueError("V must have a positive sum; PLCA fits V / V.sum(), got an all-zero V")
        if not torch.isfinite(total):
            # before: V / inf, a fit of zeros with an objective of 0, and an infinite norm
            raise ValueError(
                f"V's sum, {float(V.sum(dtype=torch.float64)):g}, exceeds {V.dtype}'s largest "
                f"value {torch.finfo(V.dtype).max:g}, and fit returns it as the norm; fit in "
                f"float64 (model.double() and V.double()) or scale V down"
            )
        alphas = {
            "W": _check_alpha(W_alpha, "W_alpha", self.W),
            "H": _check_alpha(H_alpha, "H_alpha", self.H),
            "Z": _check_alpha(Z_alpha, "Z_alpha", self.Z),
        }
        update = {name: getattr(self, name).requires_grad for name in ("W", "H", "Z")}
        # the objective accurate near an exact fit, as the beta-divergence fits' (issue 15):
        # the closed form reported 7e-8 for a true 4e-11 on a float32 PLCA fit of exact data
        # the statistics of the distribution times its entry count (mean entry one), so that
        # the reconstruction's floor, the dtype's epsilon, stays small beside its entries:
        # of V / V.sum() itself, a float32 fit of 2000 x 1000 floored entries of about 5e-7
        # and drove some of the reconstruction to zero (an infinite divergence)
        count = math.prod(V.shape)
        stats = AccurateDivergence(self._statistics(V / (total / count)), self.H.dtype)
        em = ExpectationMaximisation(
            stats, self.H.detach(), self.W.detach(), self.Z.detach(), update, alphas, scale=count,
        )
        seen = []  # the objectives before the completed iterations, kept if the fit fails

        def step():
            before = em.step()
            if not em.converged:
                seen.append(before)
            return before

        try:
            with torch.no_grad():
                n_iter, history = run_fit(
                    step, em.objective, tol, max_iter, verbose=verbose, callback=callback,
                    desc=type(self).__name__, converged=lambda: em.converged,
                )
        except BaseException as error:
            # (a callback that raised, an interrupt): the factors hold the last completed
            # iterate, as NMF.fit's, and so does the history; an interrupt's ends with
            # that iterate's objective
            if isinstance(error, KeyboardInterrupt):
                with torch.no_grad():
                    seen.append(em.objective())
            if seen:
                self.loss_history = [float(value) for value in seen]
            raise
        self.loss_history = history
        return n_iter, total


class PLCA(BaseComponent):
    r"""Probabilistic latent component analysis, :math:`P = H \operatorname{diag}(Z) W^\top`.

    Args:
        Vshape (tuple, optional): ``(N, C)``; when given, the factors' shapes
            follow and ``rank`` defaults to ``C``.
        rank (int, optional): the number of latent components.
        **kwargs: ``W``, ``H``, ``Z`` and the ``trainable_*`` flags of :class:`BaseComponent`.

    Shape:
        - W: :math:`(C, R)`, H: :math:`(N, R)`, Z: :math:`(R,)`
        - Output: :math:`(N, C)`

    Examples::

        >>> import torch
        >>> from torchnmf.plca import PLCA
        >>> V = torch.rand(20, 12)
        >>> model = PLCA(V.shape, rank=3)
        >>> n_iter, norm = model.fit(V, max_iter=50, tol=0)
        >>> model(norm=norm).shape
        torch.Size([20, 12])
    """

    _factor_map = staticmethod(linear)
    _closed_form = True

    _always_Z = True

    def __init__(self, Vshape=None, rank=None, **kwargs):
        if Vshape is not None:
            rank = shapes_from_vshape(Vshape, rank, (), kwargs, "PLCA")
        super().__init__(rank, **kwargs)

    def _output_shape(self):
        return (self.H.shape[0], self.W.shape[0])

class _ShiftInvariantPLCA(BaseComponent):
    """Shared construction of the shift-invariant models."""

    _factor_map = staticmethod(conv_transpose)

    _always_Z = True

    def __init__(self, Vshape, rank, kernel, kwargs):
        if Vshape is not None:
            rank = shapes_from_vshape(Vshape, rank, kernel, kwargs, type(self).__name__)
        super().__init__(rank, **kwargs)


class SIPLCA(_ShiftInvariantPLCA):
    r"""Shift-invariant PLCA along the last axis (the probabilistic :class:`~torchnmf.nmf.NMFD`).

    Args:
        Vshape (tuple, optional): ``(N, C, L)``.
        rank (int, optional): the number of latent components.
        T (int): the length of each template.

    Shape:
        - W: :math:`(C, R, T)`, H: :math:`(N, R, L - T + 1)`, Z: :math:`(R,)`
        - Output: :math:`(N, C, L)`

    Examples::

        >>> import torch
        >>> from torchnmf.plca import SIPLCA
        >>> V = torch.rand(1, 32, 50)
        >>> model = SIPLCA(V.shape, rank=2, T=5)
        >>> n_iter, norm = model.fit(V, max_iter=10, tol=0)
        >>> model(norm=norm).shape
        torch.Size([1, 32, 50])
    """

    _factor_ndim = 3

    def __init__(self, Vshape=None, rank=None, T=1, **kwargs):
        super().__init__(Vshape, rank, kernel_tuple(T, 1, "T"), kwargs)


class SIPLCA2(_ShiftInvariantPLCA):
    r"""Shift-invariant PLCA along two axes.

    Shape:
        - W: :math:`(C, R, k_1, k_2)`, H: :math:`(N, R, L - k_1 + 1, M - k_2 + 1)`
        - Output: :math:`(N, C, L, M)`

    Examples::

        >>> from torchnmf.plca import SIPLCA2
        >>> model = SIPLCA2((1, 3, 16, 16), rank=2, kernel_size=4)
        >>> model.W.shape, model().shape
        (torch.Size([3, 2, 4, 4]), torch.Size([1, 3, 16, 16]))
    """

    _factor_ndim = 4

    def __init__(self, Vshape=None, rank=None, kernel_size=1, **kwargs):
        super().__init__(Vshape, rank, kernel_tuple(kernel_size, 2), kwargs)


class SIPLCA3(_ShiftInvariantPLCA):
    r"""Shift-invariant PLCA along three axes.

    Shape:
        - W: :math:`(C, R, k_1, k_2, k_3)`, H: :math:`(N, R, L - k_1 + 1, \ldots)`
        - Output: :math:`(N, C, L, M, O)`

    Examples::

        >>> from torchnmf.plca import SIPLCA3
        >>> model = SIPLCA3((1, 2, 8, 8, 8), rank=2, kernel_size=3)
        >>> model.W.shape, model.H.shape
        (torch.Size([2, 2, 3, 3, 3]), torch.Size([1, 2, 6, 6, 6]))
        >>> model().shape
        torch.Size([1, 2, 8, 8, 8])
    """

    _factor_ndim = 5

    def __init__(self, Vshape=None, rank=None, kernel_size=1, **kwargs):
        super().__init__(Vshape, rank, kernel_tuple(kernel_size, 3), kwargs)
