r"""Non-negative factorisation models: :class:`NMF` and its convolutional kin.

Each model is an :class:`torch.nn.Module` holding the factors ``W`` (templates)
and ``H`` (activations) as parameters, with the reconstruction as its forward
map: :math:`V \approx H W^\top` for a matrix, a transposed convolution of ``H``
with ``W`` for :class:`NMFD`, :class:`NMF2D` and :class:`NMF3D`.  ``fit``
minimises the beta-divergence (see :mod:`torchnmf.metrics`) plus an
elastic-net penalty,

.. math::

    D_\beta(V \,|\, \hat V) + \alpha \sum_{X \in \{W, H\}}
    \Big(\rho \|X\|_1 + \frac{1 - \rho}{2} \|X\|_F^2\Big),

with :math:`\rho` = ``l1_ratio``, over the trainable factors.

Half of this module is the public documentation of the models and their three
fitting entry points; the machinery behind them is in
:mod:`torchnmf.models.fitting`, :mod:`torchnmf.targets` and :mod:`torchnmf.solvers`.
"""
import torch

from . import init as _init
from ._validation import check_components, check_non_negative_number, check_open_fraction
from .models.factors import FactorModule, kernel_tuple, make_factor, shapes_from_vshape
from .models.distributed import (
    agree_on_mask,
    check_process_group,
    check_timeout,
    fit_settings,
    join,
    row_offset,
)
from .models.fitting import (
    make_checkpointing,
    check_callback,
    check_target_for_beta,
    check_fit_options,
    make_problem,
    prepare_fit_target,
    require_factors,
    run_problem,
    solve,
)
from .models.forward import conv_transpose, linear
from .models.provenance import record_matrix_reconstruction
from .solvers.checkpoint import agreed_checkpointing
from .solvers.penalty import Penalty
from .solvers.sparseness import SparseProjectedGradient
from .targets import statistics
from .targets.streamed import StreamedTarget

__all__ = ["BaseComponent", "NMF", "NMFD", "NMF2D", "NMF3D"]


class BaseComponent(FactorModule):
    r"""Base class of the NMF models: factor parameters and fitting.

    Args:
        rank (int, optional): the number of components. Inferred from dimension 1
            of ``W`` or ``H`` when either is given; all given ranks must agree.
        W (tuple, Tensor or None): the templates: a shape (random non-negative
            initialisation), a non-negative tensor (copied) or ``None`` (no parameter).
        H (tuple, Tensor or None): the activations, likewise.
        trainable_W (bool): whether ``fit`` and the trainers update ``W``.
        trainable_H (bool): whether ``fit`` and the trainers update ``H``.

    Attributes:
        W (Parameter or None): the templates, ``(C, R, *kernel_size)``.
        H (Parameter or None): the activations, ``(N, R, *)``.
        rank (int): the number of components ``R``.
        out_channels (int): ``C``, when ``W`` exists.
        kernel_size (tuple): ``W.shape[2:]``, when ``W`` exists.
        loss_history (list of float): after ``fit``, the objective after 0, 1, ...,
            n_iter iterations.

    Examples::

        >>> from torchnmf.nmf import BaseComponent
        >>> component = BaseComponent(W=(4, 2), H=(5, 2))
        >>> component.rank, component.out_channels, component.kernel_size
        (2, 4, ())
        >>> component.W.shape, component.H.shape
        (torch.Size([4, 2]), torch.Size([5, 2]))
    """

    def __init__(self, rank=None, W=None, H=None, trainable_W=True, trainable_H=True):
        super().__init__(rank, W, H, trainable_W, trainable_H)
        self.loss_history = []

    @staticmethod
    def reconstruct(H, W):
        """The model's forward map from activations and templates."""
        raise NotImplementedError

    def forward(self, H=None, W=None):
        r"""Reconstruct from the given factors, falling back to the module's own.

        Args:
            H (Tensor, optional): activations; default ``self.H``.
            W (Tensor, optional): templates; default ``self.W``.
        """
        H, W = self._own_factors(H, W)
        return self.reconstruct(H, W)

    # -- fitting (the shared steps are in torchnmf.models.fitting) -----------
    # True for a matrix model, whose statistics have closed forms for every
    # target kind; the others take the autograd route of their forward map.
    _closed_form = False

    def _mean_reconstruction(self, H, W):
        """The mean entry of ``reconstruct(H, W)``."""
        return self.reconstruct(H, W).mean()

    def _observed_sum(self, H, W, mask):
        """The sum of ``reconstruct(H, W)`` over the entries where ``mask`` is True (float)."""
        return float(self.reconstruct(H, W)[mask].sum())

    def _statistics(self, V, beta, mask=None):
        """The statistics object of the target kind of ``V`` (see :mod:`torchnmf.targets`)."""
        reconstruct = None if self._closed_form else self.reconstruct
        return statistics(V, beta, mask, reconstruct, name=f"{type(self).__name__}.fit")

    def _initial_factors(self, V, method, generator, process_group=None, timeout=None):
        """``(W, H)`` for :meth:`initialize_`; the convolutional models offer random only."""
        if method != "random":
            if method not in _init.METHODS:
                raise ValueError(f"method must be one of {list(_init.METHODS)}, got {method!r}")
            raise NotImplementedError(
                f"{type(self).__name__}.initialize_ supports method='random' only; "
                f"method={method!r} needs a matrix model (NMF)"
            )
        return _init.initialize_random(V, self.W.shape, self.H.shape, generator=generator,
                                       process_group=process_group, timeout=timeout)

    def initialize_(self, V, method="nndsvda", *, generator=None, process_group=None, timeout=None):
        r"""Re-initialise the trainable factors from the data ``V``, in place.

        For :class:`NMF`, any method of :func:`torchnmf.init.initialize`
        (NNDSVD and its variants, or random scaled to ``V``); the
        convolutional models support ``method="random"`` (see
        :func:`torchnmf.init.initialize_random`).  Fixed factors
        (``trainable_W=False`` or ``trainable_H=False``) are left as they are.

        Args:
            V (Tensor): the target ``fit`` would get; never modified.
            method (str): ``"random"``, ``"nndsvd"``, ``"nndsvda"`` or ``"nndsvdar"``.
            generator (int, torch.Generator or None, keyword-only): seed or generator.
            process_group, timeout (keyword-only): initialise across
                processes, each with its rows of ``V`` and of ``H`` (dimension
                0: the samples of the batch for the convolutional models), as
                the single process would on the stacked target (see
                :func:`torchnmf.init.initialize` and
                :func:`torchnmf.init.initialize_random`).

        Returns:
            the module itself, so that ``NMF(V.shape, rank=8).initialize_(V)`` chains.

        Raises:
            NotImplementedError: an SVD-based method on a convolutional model.
        """
        require_factors(self, ("W", "H"), "initialize_")
        try:
            V, _ = prepare_fit_target(self, V)
        except (ValueError, TypeError) as error:
            if process_group is None:
                raise
            # the other processes fail too instead of waiting for this one
            join(check_process_group(process_group), check_timeout(timeout), None, failure=error)
        W, H = self._initial_factors(V, method, generator, process_group, timeout)
        with torch.no_grad():
            for parameter, value in ((self.W, W), (self.H, H)):
                if parameter.requires_grad:
                    parameter.copy_(value)
        return self

    def fit(
        self,
        V,
        beta=1,
        tol=1e-4,
        max_iter=200,
        verbose=False,
        alpha=0,
        l1_ratio=0,
        *,
        solver="mu",
        callback=None,
        mask=None,
        missing="error",
        fixed_W=None,
        fixed_H=None,
        alpha_W=None,
        alpha_H=None,
        process_group=None,
        timeout=None,
        checkpoint=None,
        checkpoint_every=10,
        resume=None,
        block_rows=None,
    ):
        r"""Fit the trainable factors to ``V`` by minimising the beta-divergence.

        Multiplicative updates alternate between ``H`` and ``W`` with the
        exponent that makes every update non-increasing (Févotte & Idier 2011,
        doi:10.1162/NECO_a_00168).

        Args:
            V (Tensor): the non-negative target, of the reconstruction's shape.
                Never modified.  For :class:`NMF` it may be a sparse COO, CSR
                or CSC tensor: the fit then gives the dense fit's result without
                forming the dense matrix (duplicate indices are summed).
            beta (float): the divergence: 2 Euclidean, 1 Kullback-Leibler,
                0 Itakura-Saito, any real in between or beyond.
            tol (float): stop once the relative decrease of the objective falls
                under ``tol``; 0 runs all ``max_iter`` iterations.
            max_iter (int): the most iterations.
            verbose (bool): show a progress bar with the current objective.
            alpha (float): strength of the elastic-net penalty.
            l1_ratio (float): the share of L1 in the penalty, in [0, 1].
            solver (str, keyword-only): ``"mu"`` (multiplicative updates, any
                beta), ``"hals"`` (accelerated HALS, beta=2, :class:`NMF` only)
                or ``"mu_extrapolated"`` (multiplicative updates with
                extrapolation, any beta; the recommended road for beta != 2). See
                ``docs/solvers.md``.
            callback (callable, keyword-only): ``callback(n_iter, loss)`` after
                every iteration; returning ``True`` stops the fit.
            mask (Tensor, keyword-only): a boolean tensor of ``V``'s shape, True
                where ``V`` is observed. The objective then sums over observed
                entries only; values of ``V`` elsewhere are ignored (NaN
                allowed). Every row and column needs an observed entry.
            missing (str, keyword-only): ``"error"`` (default) rejects NaN in
                ``V`` at observed entries; ``"mask"`` treats NaN entries as
                missing, as if they were False in ``mask``.
            fixed_W (sequence of int, keyword-only): components (columns along
                dimension 1 of ``W``) that stay exactly as they are while the
                others learn; a boolean sequence of length ``rank`` also works.
            fixed_H (sequence of int, keyword-only): likewise for ``H``.
            alpha_W (float, keyword-only): the penalty strength for ``W``,
                overriding ``alpha``.
            alpha_H (float, keyword-only): the penalty strength for ``H``,
                overriding ``alpha``.
            process_group (keyword-only): a ``torch.distributed`` process group
                (e.g. ``torch.distributed.group.WORLD``) for one fit spread
                over its processes: each passes its own block of rows of ``V``
                (and of the mask) and keeps its rows of ``H``; ``W`` is taken
                from rank 0 and stays the same everywhere.  The result is the
                fit of the stacked matrix (same iterations, same
                :attr:`loss_history`, on every process).  Every process must
                pass the same settings, and a ``callback`` that stops the fit
                must decide the same on every process (the others would wait
                for it until ``timeout``).  See ``docs/scaling.md``.
            timeout (float, keyword-only): with ``process_group``, the seconds
                a process waits for the others at any exchange before it fails
                (default 300).
            checkpoint (str or path, keyword-only): save the factors, the
                solver's state and the history there every
                ``checkpoint_every`` iterations (atomically: a crash leaves the
                last checkpoint whole).  With ``process_group`` each process
                writes ``<checkpoint>.rank<r>`` with its rows of ``H``.
            checkpoint_every (int, keyword-only): iterations between checkpoints.
            resume (str or path, keyword-only): continue the fit saved there
                (same settings); the result equals the uninterrupted fit's, and
                ``max_iter`` counts the iterations already run.
            block_rows (int, keyword-only): stream ``V`` in blocks of this many
                rows (:class:`NMF` only).  ``V`` may also be a matrix that is
                not in memory: a ``numpy.memmap`` (``np.load(path,
                mmap_mode="r")``), a row source of :func:`torchnmf.io.open_rows`
                (``.npy``, sparse ``.npz`` shards, ``.mtx``, ``.h5ad``) or a list
                of row blocks; it is then read block by block every iteration
                (default blocks of about 64 MiB), with the same result as in
                memory, and ``mask`` may be such a matrix too.  See
                :mod:`torchnmf.targets.streamed` for the memory it takes.
                ``H`` stays in memory; for the largest cases it may be a
                parameter over a memory-mapped file (``model.H =
                nn.Parameter(torch.from_numpy(np.lib.format.open_memmap(path,
                "w+", dtype, (N, R))))``), which the fit updates in place.

        Returns:
            int: the number of iterations run. The objective after each is in
            :attr:`loss_history`.

        Raises:
            ValueError: for a negative, infinite or (unless masked) NaN ``V``, a
                ``V`` or ``mask`` of the wrong shape, a row or column with no
                observed entry, ``beta <= 0`` with zeros in ``V``, bad options,
                or a solver that does not support ``beta``.
            TypeError: for a ``mask`` that is not a boolean tensor.
            NotImplementedError: for a solver that does not support the masked
                target or the fixed components asked for, or ``solver="hals"``
                on a convolutional model.

        Examples::

            >>> import torch
            >>> from torchnmf.nmf import NMF
            >>> V = torch.rand(20, 3) @ torch.rand(3, 15)
            >>> observed = torch.rand(V.shape) > 0.2
            >>> model = NMF(V.shape, rank=3)
            >>> n_iter = model.fit(V, beta=2, mask=observed, fixed_W=[0])
        """
        process_group = check_process_group(process_group)
        timeout = check_timeout(timeout)
        distributed = process_group is not None
        try:
            beta, tol, max_iter, alpha, l1_ratio = check_fit_options(beta, tol, max_iter, alpha, l1_ratio)
            alpha_W = alpha if alpha_W is None else check_non_negative_number(alpha_W, "alpha_W")
            alpha_H = alpha if alpha_H is None else check_non_negative_number(alpha_H, "alpha_H")
            require_factors(self, ("W", "H"), "fit")
            fixed_W = check_components(fixed_W, self.rank, "fixed_W")
            fixed_H = check_components(fixed_H, self.rank, "fixed_H")
            update_H, update_W = self.H.requires_grad, self.W.requires_grad
            V, mask = prepare_fit_target(
                self, V, mask, missing, rows=update_H, columns=update_W and not distributed,
                block_rows=block_rows, progress=verbose,
            )
            if distributed:
                check_target_for_beta(V, mask, beta)
            checkpointing = make_checkpointing(checkpoint, checkpoint_every, resume, process_group)
        except (ValueError, TypeError, NotImplementedError, OSError) as error:
            if not distributed:
                raise
            join(process_group, timeout, None, failure=error)
        settings = fit_settings(
            self, solver=solver, beta=beta, tol=tol, max_iter=max_iter, alpha_W=alpha_W,
            alpha_H=alpha_H, l1_ratio=l1_ratio, fixed_W=fixed_W, fixed_H=fixed_H,
            update_H=update_H, update_W=update_W,
        )
        reduction = None
        if distributed:
            # every process saves at the same iterations (each save is a collective)
            agreed = {**settings, **agreed_checkpointing(checkpointing)}
            reduction = join(process_group, timeout, agreed, rows=self.H.shape[0])
            mask = agree_on_mask(reduction, V, mask, columns=update_W, solver=solver)
            with torch.no_grad():
                reduction.broadcast_(self.W.detach(), what="broadcast of W from rank 0")
        if checkpointing is not None:
            checkpointing.attach({**settings, "rows": int(self.H.shape[0])}, reduction)
        history = []
        try:
            n_iter, history = solve(
                self, V, mask, self.H.detach(), self.W.detach(), beta, tol, max_iter, verbose,
                callback, solver, Penalty(alpha_H, l1_ratio), Penalty(alpha_W, l1_ratio),
                update_H=update_H, update_W=update_W, fixed_H=fixed_H, fixed_W=fixed_W,
                reduction=reduction, checkpointing=checkpointing, history=history,
            )
        finally:
            if history:  # the loop ran: keep its objectives, even when interrupted
                self.loss_history = history
        return n_iter

    def _activation_shape(self, V):
        """The shape of ``H`` that explains a target ``V`` with this model's ``W``."""
        W = self.W
        if V.dim() != W.dim() or V.shape[1] != W.shape[0] or any(
            size < k for size, k in zip(V.shape[2:], W.shape[2:])
        ):
            kernel = "" if W.dim() == 2 else f" and axes of at least {tuple(W.shape[2:])}"
            raise ValueError(
                f"V must be {W.dim()}-dimensional with {W.shape[0]} channels in dimension 1"
                f"{kernel} to match W of shape {tuple(W.shape)}, got {tuple(V.shape)}"
            )
        spatial = [size - k + 1 for size, k in zip(V.shape[2:], W.shape[2:])]
        return (V.shape[0], self.rank, *spatial)

    def transform(
        self,
        V,
        beta=1,
        tol=1e-4,
        max_iter=200,
        verbose=False,
        alpha=0,
        l1_ratio=0,
        *,
        solver="mu",
        callback=None,
        mask=None,
        missing="error",
        H=None,
        generator=None,
        process_group=None,
        timeout=None,
        block_rows=None,
    ):
        r"""Activations for new data ``V`` with the templates ``W`` held fixed.

        Solves the same problem as :meth:`fit` (same divergence, penalty,
        solvers, masks and stopping rule) over ``H`` alone. The module is not
        changed.

        Args:
            V (Tensor): the new target; for :class:`NMF` ``(N', C)``, for the
                convolutional models ``(N', C, *spatial)``.
            beta, tol, max_iter, verbose, alpha, l1_ratio: as in :meth:`fit`
                (``alpha`` penalises ``H``).
            solver, callback, mask, missing: as in :meth:`fit`.
            H (Tensor, keyword-only): the starting activations; by default
                uniform random values scaled so that the reconstruction's mean
                matches the (observed) mean of ``V``.
            generator (torch.Generator, keyword-only): the random source for the
                default start.
            process_group, timeout (keyword-only): as in :meth:`fit`: each
                process passes its rows of ``V`` and gets its rows of the
                activations; the default start is the rows of the
                single-process one from the same generator state.
            block_rows (int, keyword-only): stream ``V`` in row blocks, as in
                :meth:`fit` (which lists the matrices that are streamed anyway).

        Returns:
            Tensor: the activations for ``V`` (a new tensor, not a parameter).

        Examples::

            >>> import torch
            >>> from torchnmf.nmf import NMF
            >>> model = NMF((20, 15), rank=3)
            >>> n_iter = model.fit(torch.rand(20, 15), max_iter=20)
            >>> model.transform(torch.rand(7, 15), max_iter=20).shape
            torch.Size([7, 3])
        """
        process_group = check_process_group(process_group)
        timeout = check_timeout(timeout)
        distributed = process_group is not None
        try:
            beta, tol, max_iter, alpha, l1_ratio = check_fit_options(beta, tol, max_iter, alpha, l1_ratio)
            require_factors(self, ("W",), "transform")
            W = self.W.detach()
            V, mask = prepare_fit_target(
                self, V, mask, missing, rows=True, columns=False,
                expected=lambda V: self._output_shape_for(self._activation_shape(V)),
                block_rows=block_rows, progress=verbose,
            )
            shape = self._activation_shape(V)
            if H is not None:
                H = make_factor(H, "H", W.dtype, W.device).to(W.dtype)
                if tuple(H.shape) != tuple(shape):
                    raise ValueError(f"H must have shape {tuple(shape)} for this V, got {tuple(H.shape)}")
            if distributed:
                check_target_for_beta(V, mask, beta)
        except (ValueError, TypeError, NotImplementedError) as error:
            if not distributed:
                raise
            join(process_group, timeout, None, failure=error)
        reduction = None
        if distributed:
            settings = fit_settings(
                self, solver=solver, beta=beta, tol=tol, max_iter=max_iter, alpha=alpha,
                l1_ratio=l1_ratio, start="given" if H is not None else "default",
            )
            reduction = join(process_group, timeout, settings, rows=shape[0])
            mask = agree_on_mask(reduction, V, mask, columns=False, solver=solver)
            W = reduction.broadcast_(W.clone(), what="broadcast of W from rank 0")
        if H is None:
            H = self._default_activations(V, mask, W, shape, generator, reduction)
        solve(
            self, V, mask, H, W, beta, tol, max_iter, verbose, callback, solver,
            Penalty(alpha, l1_ratio), Penalty(), update_H=True, update_W=False,
            reduction=reduction,
        )
        return H

    @torch.no_grad()
    def _default_activations(self, V, mask, W, shape, generator, reduction=None):
        """Uniform random activations scaled so that the reconstruction's mean
        matches the (observed) mean of ``V``."""
        if reduction is not None:
            return self._distributed_activations(V, mask, W, shape, generator, reduction)
        H = torch.rand(shape, dtype=W.dtype, device=W.device, generator=generator)
        if mask is None:
            return H.mul_(_start_scale(_mean(V), self._mean_reconstruction(H, W)))
        predicted = self.reconstruct(H, W)
        # a prepared sparse V stores zeros at its hidden entries
        observed = V.values() if V.layout == torch.sparse_coo else V[mask]
        mean = observed.sum() / mask.sum()
        return H.mul_(_start_scale(mean, predicted[mask].mean()))

    def _distributed_activations(self, V, mask, W, shape, generator, reduction):
        """This process's rows of the single-process default start: every process
        draws the activations of all rows (small beside ``V``) and keeps its own;
        the scale comes from sums over all processes."""
        offset = row_offset(reduction)
        everything = torch.rand((sum(reduction.rows), *shape[1:]), dtype=W.dtype,
                                device=W.device, generator=generator)
        H = everything[offset:offset + shape[0]].clone()
        if mask is None:
            sums = torch.stack([
                _sum(V).double(),
                torch.tensor(float(V.shape.numel()), dtype=torch.float64, device=W.device),
                self._mean_reconstruction(H, W).double() * V.shape.numel(),
            ])
        else:
            observed = V.values() if V.layout == torch.sparse_coo else V[mask]
            sums = torch.stack([
                observed.sum(dtype=torch.float64),
                mask.sum(dtype=torch.float64),
                self.reconstruct(H, W)[mask].sum(dtype=torch.float64),
            ])
        reduction.sum_(sums, what="sum of V for the default start")
        mean, predicted = sums[0] / sums[1], sums[2] / sums[1]
        return H.mul_(_start_scale(mean, predicted, W.dtype))

    def _output_shape_for(self, H_shape):
        spatial = [h + k - 1 for h, k in zip(H_shape[2:], self.W.shape[2:])]
        return (H_shape[0], self.W.shape[0], *spatial)

    def sparse_fit(self, V, beta=2, max_iter=200, verbose=False, sW=None, sH=None, *,
                   callback=None, mask=None, missing="error", process_group=None, timeout=None):
        r"""Fit with Hoyer's sparseness constraints on the components of ``W`` and/or ``H``.

        For a constrained factor, each iteration takes a gradient step of the
        beta-divergence and projects every component (the slices along
        dimension 1) onto the non-negative vectors of the target sparseness
        (see :func:`torchnmf.metrics.sparseness`): ``W``'s components keep
        their L2 norm, ``H``'s get unit L2 norm.  The step size is halved until
        the divergence does not grow and lengthened by 1.2 after each accepted
        step (Hoyer, JMLR 5, 2004).  An unconstrained trainable factor gets the
        multiplicative update of :meth:`fit`.  The constrained factors are
        projected once before the first iteration.

        Args:
            V (Tensor): the non-negative target, of the reconstruction's shape.
            beta (float): the divergence (Hoyer's paper uses 2).
            max_iter (int): the iterations to run.
            verbose (bool): show a progress bar with the current objective.
            sW (float, optional): target sparseness of each component of ``W``,
                in (0, 1); ``None`` leaves ``W`` to multiplicative updates.
            sH (float, optional): likewise for ``H``.
            callback (callable, keyword-only): ``callback(n_iter, loss)``;
                returning ``True`` stops the fit.
            mask (Tensor, keyword-only): True where ``V`` is observed, as in
                :meth:`fit`: the divergence and its gradients count observed
                entries only.
            missing (str, keyword-only): ``"mask"`` treats NaN in ``V`` as
                missing, as in :meth:`fit`.
            process_group, timeout (keyword-only): one fit spread over the
                processes of a ``torch.distributed`` group, as in :meth:`fit`:
                each passes its rows of ``V`` and keeps its rows of ``H``;
                ``W`` comes from rank 0.  The result is the fit of the
                stacked target.

        Returns:
            int: the iterations run; the objective after each is in
            :attr:`loss_history` and never increases.

        Raises:
            ValueError: ``sW``/``sH`` outside (0, 1), a constraint on a fixed
                factor or on components of a single entry, or a bad ``V``.
        """
        process_group = check_process_group(process_group)
        timeout = check_timeout(timeout)
        distributed = process_group is not None
        targets = {}
        try:
            beta, _, max_iter, _, _ = check_fit_options(beta, 0, max_iter)
            check_callback(callback)
            require_factors(self, ("W", "H"), "sparse_fit")
            V, mask = prepare_fit_target(self, V, mask, missing, columns=not distributed)
            for name, value in (("W", sW), ("H", sH)):
                if value is None:
                    continue
                targets[name] = check_open_fraction(value, f"s{name}")
                factor = getattr(self, name)
                if not factor.requires_grad:
                    raise ValueError(
                        f"s{name} constrains {name}, but {name} is fixed (trainable_{name}=False); "
                        f"drop s{name} or make {name} trainable"
                    )
                if factor.numel() // self.rank < 2 and not (distributed and name == "H"):
                    raise ValueError(
                        f"s{name} needs components of at least 2 entries, but each component of "
                        f"{name} has {factor.numel() // self.rank}"
                    )
            if distributed:
                check_target_for_beta(V, mask, beta)
        except (ValueError, TypeError, NotImplementedError) as error:
            if not distributed:
                raise
            join(process_group, timeout, None, failure=error)
        update_H, update_W = self.H.requires_grad, self.W.requires_grad
        reduction = None
        if distributed:
            settings = fit_settings(
                self, fit="sparse_fit", beta=beta, max_iter=max_iter, sW=targets.get("W"),
                sH=targets.get("H"), update_H=update_H, update_W=update_W,
            )
            reduction = join(process_group, timeout, settings, rows=self.H.shape[0])
            mask = agree_on_mask(reduction, V, mask, columns=update_W)
            if "H" in targets:
                entries = reduction.sum_float(self.H.numel() // self.rank)
                if entries < 2:
                    raise ValueError(
                        f"sH needs components of at least 2 entries, but each component of "
                        f"H has {int(entries)} over all processes"
                    )
            with torch.no_grad():
                reduction.broadcast_(self.W.detach(), what="broadcast of W from rank 0")
        problem = make_problem(
            self, V, mask, self.H.detach(), self.W.detach(), beta, reduction,
            # H projected to unit norm cannot carry the scale
            carrier="W" if "H" in targets and update_W else None,
            update_H=update_H, update_W=update_W,
        )
        history = []
        try:
            n_iter, history = run_problem(
                problem,
                lambda problem: SparseProjectedGradient(problem, targets.get("H"), targets.get("W")),
                0, max_iter, verbose, callback, f"{type(self).__name__} (sparse)", history=history,
            )
        finally:
            if history:
                self.loss_history = history
        return n_iter


class NMF(BaseComponent):
    r"""Non-negative matrix factorisation :math:`V \approx H W^\top`.

    Args:
        Vshape (tuple, optional): ``(N, C)``, the target's shape; when given, the
            shapes of ``W`` and ``H`` follow and ``rank`` defaults to ``C``.
        rank (int, optional): the number of components ``R``.
        **kwargs: ``W``, ``H``, ``trainable_W``, ``trainable_H`` as in
            :class:`BaseComponent`.

    Shape:
        - W: :math:`(C, R)`
        - H: :math:`(N, R)`
        - Output: :math:`(N, C)`

    Examples::

        >>> import torch
        >>> from torchnmf.nmf import NMF
        >>> V = torch.rand(20, 30)
        >>> model = NMF(V.shape, rank=5)
        >>> model.W.shape, model.H.shape
        (torch.Size([30, 5]), torch.Size([20, 5]))
        >>> n_iter = model.fit(V, beta=2, max_iter=50, tol=0)
        >>> model().shape
        torch.Size([20, 30])
    """

    def __init__(self, Vshape=None, rank=None, **kwargs):
        if Vshape is not None:
            rank = shapes_from_vshape(Vshape, rank, (), kwargs, "NMF")
        super().__init__(rank, **kwargs)

    _closed_form = True

    @staticmethod
    def reconstruct(H, W):
        return linear(H, W)

    def forward(self, H=None, W=None):
        output = super().forward(H, W)
        if H is None and W is None and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # lets BetaMu recognise its prediction and use Gram products (see
            # torchnmf.models.provenance); under torch.compile the record (keyed by the
            # output's id) would recompile the forward at every call, and BetaMu takes
            # the generic route, with the same updates
            record_matrix_reconstruction(output, self.H, self.W)
        return output

    def _output_shape(self):
        return (self.H.shape[0], self.W.shape[0])

    def _mean_reconstruction(self, H, W):
        # closed form: no (N, C) reconstruction, which a sparse V must never cause
        return (H.sum(0) @ W.sum(0)) / (H.shape[0] * W.shape[0])

    def _observed_sum(self, H, W, mask):
        # sum over observed (n, c) of H[n] . W[c], in row blocks of about 2**22 entries:
        # no (N, C) reconstruction, nor a floating copy of the whole mask
        rows = max(1, (1 << 22) // max(mask.shape[1], 1))
        return sum(
            float(torch.linalg.vecdot(H[start:start + rows], mask[start:start + rows].to(H.dtype) @ W).sum())
            for start in range(0, mask.shape[0], rows)
        )

    def _initial_factors(self, V, method, generator, process_group=None, timeout=None):
        return _init.initialize(V, self.rank, method, generator=generator,
                                process_group=process_group, timeout=timeout)


class _ConvNMF(BaseComponent):
    """Shared construction of the convolutional models."""

    def __init__(self, Vshape, rank, kernel, kwargs):
        if Vshape is not None:
            rank = shapes_from_vshape(Vshape, rank, kernel, kwargs, type(self).__name__)
        super().__init__(rank, **kwargs)

    # the forward map itself (not a wrapper), so that fit finds the closed-form
    # statistics of torchnmf.targets.convolution; a subclass that overrides it
    # takes the autograd route
    reconstruct = staticmethod(conv_transpose)


class NMFD(_ConvNMF):
    r"""Non-negative matrix factor deconvolution along the last axis.

    .. math::

        V_{n,c,l} \approx \sum_r \sum_t W_{c,r,t} H_{n,r,l-t}

    Args:
        Vshape (tuple, optional): ``(N, C, L)``.
        rank (int, optional): the number of components ``R``.
        T (int): the length of each template.
        **kwargs: as in :class:`BaseComponent`.

    Shape:
        - W: :math:`(C, R, T)`
        - H: :math:`(N, R, L - T + 1)`
        - Output: :math:`(N, C, L)`

    Examples::

        >>> import torch
        >>> from torchnmf.nmf import NMFD
        >>> V = torch.rand(1, 64, 100)      # one spectrogram: 64 bins x 100 frames
        >>> model = NMFD(V.shape, rank=3, T=8)
        >>> model.W.shape, model.H.shape
        (torch.Size([64, 3, 8]), torch.Size([1, 3, 93]))
        >>> n_iter = model.fit(V, beta=1, max_iter=20, tol=0)
        >>> model().shape
        torch.Size([1, 64, 100])
    """

    _factor_ndim = 3

    def __init__(self, Vshape=None, rank=None, T=1, **kwargs):
        super().__init__(Vshape, rank, kernel_tuple(T, 1, "T"), kwargs)


class NMF2D(_ConvNMF):
    r"""Two-dimensional NMF deconvolution (shift-invariant along two axes).

    Args:
        Vshape (tuple, optional): ``(N, C, L, M)``.
        rank (int, optional): the number of components ``R``.
        kernel_size (int or tuple): ``(k1, k2)``, the template size.

    Shape:
        - W: :math:`(C, R, k_1, k_2)`
        - H: :math:`(N, R, L - k_1 + 1, M - k_2 + 1)`
        - Output: :math:`(N, C, L, M)`

    Examples::

        >>> import torch
        >>> from torchnmf.nmf import NMF2D
        >>> V = torch.rand(2, 3, 32, 32)    # two 3-channel images
        >>> model = NMF2D(V.shape, rank=4, kernel_size=5)
        >>> model.W.shape, model.H.shape
        (torch.Size([3, 4, 5, 5]), torch.Size([2, 4, 28, 28]))
        >>> n_iter = model.fit(V, beta=2, max_iter=10, tol=0)
    """

    _factor_ndim = 4

    def __init__(self, Vshape=None, rank=None, kernel_size=1, **kwargs):
        super().__init__(Vshape, rank, kernel_tuple(kernel_size, 2), kwargs)


class NMF3D(_ConvNMF):
    r"""Three-dimensional NMF deconvolution (shift-invariant along three axes).

    Args:
        Vshape (tuple, optional): ``(N, C, L, M, O)``.
        rank (int, optional): the number of components ``R``.
        kernel_size (int or tuple): ``(k1, k2, k3)``, the template size.

    Shape:
        - W: :math:`(C, R, k_1, k_2, k_3)`
        - H: :math:`(N, R, L - k_1 + 1, M - k_2 + 1, O - k_3 + 1)`
        - Output: :math:`(N, C, L, M, O)`

    Examples::

        >>> import torch
        >>> from torchnmf.nmf import NMF3D
        >>> model = NMF3D((1, 2, 10, 10, 10), rank=3, kernel_size=(3, 3, 3))
        >>> model.H.shape, model().shape
        (torch.Size([1, 3, 8, 8, 8]), torch.Size([1, 2, 10, 10, 10]))
    """

    _factor_ndim = 5

    def __init__(self, Vshape=None, rank=None, kernel_size=1, **kwargs):
        super().__init__(Vshape, rank, kernel_tuple(kernel_size, 3), kwargs)


def _start_scale(mean, predicted, dtype=None):
    """The factor that brings a default start's mean reconstruction ``predicted`` to
    the data's ``mean`` (0-dim tensors), in ``dtype`` (default ``predicted``'s),
    floored at its eps; 0 where the reconstruction is zero (all-zero templates, as a
    fit under a strong penalty leaves them): every activation explains nothing there,
    zero ones at the least penalty, while dividing by the smallest number made starts
    of 1e37 whose penalty overflowed."""
    dtype = predicted.dtype if dtype is None else dtype
    info = torch.finfo(dtype)
    scale = (mean / predicted.clamp_min(info.tiny)).to(dtype).clamp_min(info.eps)
    return torch.where(predicted > 0, scale, 0.0)


def _sum(V):
    """The sum of every entry of a dense or sparse ``V`` (observed entries of a streamed one)."""
    if isinstance(V, StreamedTarget):
        return torch.tensor(V.mean * V.observed, dtype=V.dtype, device=V.device)
    if V.layout == torch.sparse_coo:
        return V._values().sum()
    if V.layout != torch.strided:
        return V.values().sum()
    return V.sum()


def _mean(V):
    """The mean entry of a dense or (coalesced COO) sparse ``V``, or the mean
    observed entry of a streamed one (found when it was validated)."""
    if isinstance(V, StreamedTarget):
        return torch.tensor(V.mean, dtype=V.dtype, device=V.device)
    if V.layout == torch.sparse_coo:
        return V._values().sum() / V.shape.numel()
    return V.mean()
