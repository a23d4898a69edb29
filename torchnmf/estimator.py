r"""A scikit-learn estimator over :class:`torchnmf.nmf.NMF`.

Importing this module needs scikit-learn (``pip install torchnmf[sklearn]``);
``import torchnmf`` alone never imports it.

scikit-learn writes the data as ``X (n_samples, n_features) ≈ W H`` with the
codes ``W`` first; torchnmf writes ``V (N, C) ≈ H W^T``.  So the estimator's
codes (the output of :meth:`TorchNMF.transform`) are torchnmf's ``H`` and its
``components_`` are torchnmf's ``W`` transposed.  Names follow scikit-learn in
this module only.

Two classes: :class:`TorchNMF` (full-batch fits) and :class:`TorchMiniBatchNMF`
(online fits with scikit-learn's ``MiniBatchNMF`` interface); their length is
scikit-learn's parameter documentation and the conversions between the two
libraries' conventions.
"""
import contextlib
import math
import numbers

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.validation import (
    check_array, check_is_fitted, check_non_negative, check_random_state,
)

from . import init as _init
from ._device import usable_device
from ._validation import (
    check_beta_with_zeros, check_fits_dtype, check_non_negative_tensor, check_real_tensor,
)
from .io import to_numpy
from .nmf import NMF
from .solvers.registry import SOLVERS
from .targets.residual import data_error, root_error

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - older scikit-learn
    def _validate_data(estimator, X, **kwargs):
        return estimator._validate_data(X, **kwargs)

__all__ = ["TorchNMF", "TorchMiniBatchNMF"]

BETA_LOSSES = {"frobenius": 2.0, "kullback-leibler": 1.0, "itakura-saito": 0.0}
INITS = ("random", "nndsvd", "nndsvda", "nndsvdar", "custom")



def _torch_dtype(spec):
    """A torch floating dtype from a torch dtype, a numpy dtype or a name."""
    if isinstance(spec, torch.dtype):
        dtype = spec
    elif isinstance(spec, str) and spec == "bfloat16":  # a name numpy does not know
        dtype = torch.bfloat16
    else:
        try:
            name = np.dtype(spec).name
        except TypeError:
            raise TypeError(f"dtype must be a floating dtype or None, got {spec!r}") from None
        dtype = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                 "bfloat16": torch.bfloat16}.get(name)
    if dtype is None or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype (e.g. 'float32') or None, got {spec!r}")
    return dtype


class TorchNMF(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    r"""Non-negative matrix factorisation with scikit-learn's interface.

    Finds non-negative ``W`` (n_samples, n_components) and ``H``
    (n_components, n_features) with ``X ≈ W H`` by minimising

    .. math::

        D_\beta(X \,|\, W H)
        &+ \alpha_W\, n_\text{features} \Big(\rho \|W\|_1 + \tfrac{1-\rho}{2}\|W\|_F^2\Big) \\
        &+ \alpha_H\, n_\text{samples} \Big(\rho \|H\|_1 + \tfrac{1-\rho}{2}\|H\|_F^2\Big),

    with :math:`\rho` = ``l1_ratio``. The penalties scale with the other
    dimension so that their weight against the data term does not depend on
    the shape of ``X``. The fit runs on PyTorch (any ``device``) through
    :meth:`torchnmf.nmf.NMF.fit`.

    Parameters
    ----------
    n_components : int, 'auto' or None, default=None
        Number of components; None or 'auto' (scikit-learn's name for it) keep
        all features (with ``init='custom'``, the number of components of the
        given factors).
    init : {'random', 'nndsvd', 'nndsvda', 'nndsvdar', 'custom'} or None, default=None
        Starting point. 'random': uniform values scaled to the data's mean.
        The SVD-based starts need :mod:`torchnmf.init`. None: 'nndsvda' when it
        is available and ``n_components <= min(n_samples, n_features)``, else
        'random'. 'custom': ``W`` and ``H`` given to :meth:`fit`.
    solver : str, default='mu'
        A solver registered in torchnmf ('mu': multiplicative updates).
    beta_loss : float or {'frobenius', 'kullback-leibler', 'itakura-saito'}, default='frobenius'
        The beta-divergence: 2, 1 and 0 respectively. With ``beta_loss <= 0``,
        ``X`` must be strictly positive.
    tol : float, default=1e-4
        Stop when the relative decrease of the objective falls under ``tol``.
    max_iter : int, default=200
        Most iterations of the fit, and the iterations :meth:`transform` runs.
    random_state : int, RandomState instance or None, default=None
        Seeds the random start (also that of :meth:`transform`'s solver).
    alpha_W : float, default=0.0
        Penalty strength on ``W`` (the codes).
    alpha_H : float or 'same', default='same'
        Penalty strength on ``H`` (the components); 'same' uses ``alpha_W``.
    l1_ratio : float, default=0.0
        Share of L1 in both penalties, in [0, 1].
    verbose : int, default=0
        Show a progress bar during the fit when positive.
    device : str, torch.device or None, default=None
        Where to compute; None: the device of a torch input, else the CPU.
    dtype : str, numpy or torch dtype, or None, default=None
        Precision of the computation; None keeps float32 and float64 input as
        it is and uses float64 otherwise.  numpy has no bfloat16: numpy
        outputs (and ``components_``) of a bfloat16 fit are float32.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        The factor ``H``.
    n_components_ : int
        Number of components.
    reconstruction_err_ : float
        :math:`\sqrt{2 D_\beta(X | WH)}` at the end of the fit (the Frobenius
        norm of the residual for ``beta_loss='frobenius'``).
    n_iter_ : int
        Iterations run by the fit.
    n_features_in_ : int
        Number of features seen during the fit.
    feature_names_in_ : ndarray of shape ``(n_features_in_,)``
        Feature names, when ``X`` had string column names.

    Notes
    -----
    Inputs may be numpy arrays, scipy sparse matrices or torch tensors; the
    outputs of :meth:`transform`, :meth:`fit_transform` and
    :meth:`inverse_transform` are torch tensors for torch input and numpy
    arrays otherwise. :meth:`transform` solves the codes to convergence
    from the same start for every sample.

    Examples
    --------
    >>> import numpy as np
    >>> from torchnmf.estimator import TorchNMF
    >>> X = np.random.default_rng(0).random((20, 8))
    >>> model = TorchNMF(n_components=3, init="random", random_state=0, max_iter=50)
    >>> codes = model.fit_transform(X)
    >>> codes.shape, model.components_.shape
    ((20, 3), (3, 8))
    """

    def __init__(
        self,
        n_components=None,
        *,
        init=None,
        solver="mu",
        beta_loss="frobenius",
        tol=1e-4,
        max_iter=200,
        random_state=None,
        alpha_W=0.0,
        alpha_H="same",
        l1_ratio=0.0,
        verbose=0,
        device=None,
        dtype=None,
    ):
        self.n_components = n_components
        self.init = init
        self.solver = solver
        self.beta_loss = beta_loss
        self.tol = tol
        self.max_iter = max_iter
        self.random_state = random_state
        self.alpha_W = alpha_W
        self.alpha_H = alpha_H
        self.l1_ratio = l1_ratio
        self.verbose = verbose
        self.device = device
        self.dtype = dtype

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        tags.input_tags.sparse = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    # -- parameters ------------------------------------------------------------------
    def _beta(self):
        loss = self.beta_loss
        if isinstance(loss, str):
            if loss not in BETA_LOSSES:
                raise ValueError(
                    f"beta_loss must be a real number or one of {sorted(BETA_LOSSES)}, got {loss!r}"
                )
            return BETA_LOSSES[loss]
        if isinstance(loss, bool) or not isinstance(loss, numbers.Real) or not math.isfinite(loss):
            raise ValueError(
                f"beta_loss must be a real number or one of {sorted(BETA_LOSSES)}, got {loss!r}"
            )
        return float(loss)

    @staticmethod
    def _is_strength(value):
        """A finite non-negative number (before, NaN and inf passed: the minibatch fit
        took them silently, TorchNMF refused them as NMF.fit's alpha_W)."""
        return (not isinstance(value, bool) and isinstance(value, numbers.Real)
                and math.isfinite(value) and value >= 0)

    def _alphas(self):
        for name in ("alpha_W", "l1_ratio"):
            value = getattr(self, name)
            if not self._is_strength(value):
                raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
        if not self.l1_ratio <= 1:
            raise ValueError(f"l1_ratio must lie in [0, 1], got {self.l1_ratio!r}")
        alpha_H = self.alpha_W if (isinstance(self.alpha_H, str) and self.alpha_H == "same") else self.alpha_H
        if not self._is_strength(alpha_H):
            raise ValueError(
                f"alpha_H must be a finite non-negative number or 'same', got {self.alpha_H!r}")
        return float(self.alpha_W), float(alpha_H)

    def _check_params(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {self.solver!r}")
        if self.init is not None and self.init not in INITS:
            raise ValueError(f"init must be None or one of {list(INITS)}, got {self.init!r}")
        if self._fixed_rank() and (
            isinstance(self.n_components, bool)
            or not isinstance(self.n_components, numbers.Integral)
            or self.n_components <= 0
        ):
            raise ValueError(
                f"n_components must be a positive integer, 'auto' or None, got {self.n_components!r}"
            )
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, numbers.Integral) or self.max_iter <= 0:
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}")
        if isinstance(self.tol, bool) or not isinstance(self.tol, numbers.Real) or not self.tol >= 0:
            raise ValueError(f"tol must be a non-negative number, got {self.tol!r}")
        return self._beta(), self._alphas()

    def _fixed_rank(self):
        """Whether ``n_components`` names a number (not None or 'auto')."""
        return self.n_components is not None and not (
            isinstance(self.n_components, str) and self.n_components == "auto")

    def _rank(self, n_features, H_custom):
        """``n_components``, else the rows of a custom ``H``, else every feature (before,
        'auto', scikit-learn's default since 1.6, was refused)."""
        if self._fixed_rank():
            return int(self.n_components)
        if self.init == "custom" and H_custom is not None:
            return np.shape(H_custom)[0]
        return n_features

    # -- data ----------------------------------------------------------------------------
    def _device(self, X):
        if self.device is not None:
            return usable_device(self.device)
        if isinstance(X, torch.Tensor):
            return X.device
        return torch.device("cpu")

    def _compute_dtype(self, dtype):
        if self.dtype is not None:
            return _torch_dtype(self.dtype)
        return dtype if dtype in (torch.float32, torch.float64) else torch.float64

    def _to_torch(self, X, reset):
        """Validate ``X`` and return it as a torch tensor (sparse COO for sparse input)."""
        if isinstance(X, torch.Tensor):
            check_real_tensor(X, "X")  # before: a bool X failed inside torch.iinfo
            if X.layout not in (torch.strided, torch.sparse_coo, torch.sparse_csr):
                raise TypeError(f"X must be a dense, COO or CSR tensor, got layout {X.layout}")
            if X.dim() != 2:
                raise ValueError(
                    f"Expected a 2D tensor, got {X.dim()}D with shape {tuple(X.shape)}; "
                    f"reshape a single sample with X.reshape(1, -1)"
                )
            if X.shape[0] == 0 or X.shape[1] == 0:
                raise ValueError(f"X has shape {tuple(X.shape)}; at least one sample and feature are needed")
            if reset:
                self.n_features_in_ = X.shape[1]
                if hasattr(self, "feature_names_in_"):
                    del self.feature_names_in_
            elif X.shape[1] != self.n_features_in_:
                raise ValueError(
                    f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                    f"{self.n_features_in_} features as input."
                )
            V = X.to_sparse_coo() if X.layout == torch.sparse_csr else X
            dtype = self._compute_dtype(V.dtype)
            check_fits_dtype(V, dtype, "X", "with dtype='float64'")
            # detached: the online solver's in-place products refuse a tensor needing grad
            V = V.detach().to(device=self._device(X), dtype=dtype)
            values = V._values() if V.is_sparse else V
            if torch.isnan(values).any() or torch.isinf(values).any():
                raise ValueError("Input X contains NaN or infinity.")
            if (values < 0).any():
                raise ValueError(f"Negative values in data passed to {type(self).__name__} (input X)")
        else:
            X = _validate_data(
                self, X, reset=reset, accept_sparse=("csr", "csc", "coo"),
                dtype=[np.float64, np.float32],
            )
            check_non_negative(X, f"{type(self).__name__} (input X)")
            dtype = self._compute_dtype(torch.float32 if X.dtype == np.float32 else torch.float64)
            device = self._device(X)
            if hasattr(X, "tocoo"):  # scipy sparse
                # a canonical CSR matrix lists its entries in coalesced order: no sort needed
                # (2M non-zeros: the coalesce took 0.16 s, measured)
                ordered = X.format == "csr" and X.has_canonical_format
                coo = X.tocoo()
                indices = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
                values = torch.from_numpy(np.ascontiguousarray(coo.data))
                V = torch.sparse_coo_tensor(indices, values, coo.shape, check_invariants=False,
                                            is_coalesced=ordered or None)
            else:
                V = torch.from_numpy(np.array(X, copy=not X.flags.writeable))
            check_fits_dtype(V, dtype, "X", "with dtype='float64'")
            V = V.to(device=device, dtype=dtype)
        if V.is_sparse:
            V = V.coalesce()  # NMF.fit takes it as it is, never densified
        # the online solver divides by X: zeros at beta <= 0 made reconstruction_err_ inf
        check_beta_with_zeros(V, self._beta(), "X")
        return V

    def _output(self, tensor, like):
        if isinstance(like, torch.Tensor):
            return tensor
        return to_numpy(tensor)

    # -- initialisation ------------------------------------------------------------------
    def _generator(self):
        seed = check_random_state(self.random_state).randint(np.iinfo(np.int32).max)
        return torch.Generator().manual_seed(int(seed))

    def _start(self, V, rank, init, W_custom, H_custom, generator):
        """Starting (W, H) in torchnmf's orientation: W (C, R), H (N, R)."""
        N, C = V.shape
        if init is None:
            init = "nndsvda" if rank <= min(N, C) else "random"
        if init == "custom":
            if W_custom is None or H_custom is None:
                raise ValueError("init='custom' needs both W and H given to fit")
            H = torch.as_tensor(np.asarray(W_custom) if not isinstance(W_custom, torch.Tensor) else W_custom)
            W = torch.as_tensor(np.asarray(H_custom) if not isinstance(H_custom, torch.Tensor) else H_custom).T
            if tuple(H.shape) != (N, rank) or tuple(W.shape) != (C, rank):
                raise ValueError(
                    f"init='custom' needs W of shape {(N, rank)} and H of shape {(rank, C)}, "
                    f"got {tuple(H.shape)} and {tuple(W.T.shape)}"
                )
            # sklearn's names; the online fit wrote into its start, so copies of the caller's
            check_non_negative_tensor(check_real_tensor(H, "W"), "W")
            check_non_negative_tensor(check_real_tensor(W, "H"), "H")
            return W.to(V.device, V.dtype, copy=True), H.to(V.device, V.dtype, copy=True)
        if init == "random":
            mean = float(V.sum()) / (N * C)
            scale = 2 * math.sqrt(max(mean, 0.0) / rank) or 1e-3
            W = torch.rand(C, rank, generator=generator, dtype=V.dtype) * scale
            H = torch.rand(N, rank, generator=generator, dtype=V.dtype) * scale
            return W.to(V.device), H.to(V.device)
        W, H = _init.initialize(V, rank, method=init, generator=generator,
                                sample_rows=self._start_rows(V.shape[0]))
        return W.to(V.device, V.dtype), H.to(V.device, V.dtype)

    def _start_rows(self, n_samples):
        """The rows NNDSVD's singular vectors come from (None: all)."""
        return None

    # -- fitting -------------------------------------------------------------------------
    def _fit(self, X, W_custom, H_custom):
        beta, (alpha_W, alpha_H) = self._check_params()
        V = self._to_torch(X, reset=True)
        N, C = V.shape
        rank = self._rank(C, H_custom)
        generator = self._generator()
        W, H = self._start(V, rank, self.init, W_custom, H_custom, generator)
        model = NMF(W=W, H=H)
        self.n_iter_ = model.fit(
            V, beta=beta, tol=self.tol, max_iter=self.max_iter, verbose=bool(self.verbose),
            l1_ratio=self.l1_ratio, solver=self.solver,
            alpha_W=alpha_H * N, alpha_H=alpha_W * C,
        )
        W = model.W.detach()
        self._templates = NMF(W=W, trainable_W=False)
        self._mean_code = model.H.detach().mean(0)
        self.components_ = to_numpy(W.T)
        self.n_components_ = rank
        # the codes of the fitted components, solved to convergence like transform's
        codes = self._codes(V, model.H.detach())
        with torch.no_grad():  # blockwise, never the dense reconstruction of a sparse V
            self.reconstruction_err_ = data_error(model._statistics(V, beta), codes, W, beta,
                                                  V.dtype)
        return codes

    # The problem for the codes with the components fixed is convex: solved to
    # convergence (HALS, an exact coordinate descent, for beta=2), so that
    # transform(X) after fit(X) agrees with fit_transform(X).
    CODES_TOL = 1e-10
    CODES_MIN_ITER = 1000

    def _codes(self, V, start):
        beta, (alpha_W, _) = self._check_params()
        import warnings

        from ._validation import ConvergenceWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return self._templates.transform(
                V, beta=beta, tol=self.CODES_TOL, max_iter=max(self.max_iter, self.CODES_MIN_ITER),
                alpha=alpha_W * V.shape[1], l1_ratio=self.l1_ratio,
                solver="hals" if beta == 2 else self.solver, H=start,
            )

    def fit(self, X, y=None, W=None, H=None):
        """Learn the components of ``X``.

        Parameters
        ----------
        X : array-like, sparse matrix or torch.Tensor of shape (n_samples, n_features)
            Non-negative data.
        y : Ignored
        W : array-like of shape (n_samples, n_components), optional
            Starting codes for ``init='custom'``.
        H : array-like of shape (n_components, n_features), optional
            Starting components for ``init='custom'``.

        Returns
        -------
        self : TorchNMF
        """
        with self._unchanged_on_failure():
            self._fit(X, W, H)
        return self

    def fit_transform(self, X, y=None, W=None, H=None):
        """Learn the components of ``X`` and return its codes (the fitted ``W``).

        Returns
        -------
        W : ndarray or torch.Tensor of shape (n_samples, n_components)
        """
        with self._unchanged_on_failure():
            return self._output(self._fit(X, W, H), X)

    @contextlib.contextmanager
    def _unchanged_on_failure(self):
        """A call that fails leaves the estimator as it was (before, a fit of bad data
        left a fitted model expecting the bad data's features, with its old components)."""
        state = dict(self.__dict__)
        try:
            yield
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(state)
            raise

    def transform(self, X):
        """The codes of ``X`` with the learned components held fixed.

        Every sample starts from the mean code of the training data; the
        convex problem for the codes (the same objective, with the ``alpha_W``
        penalty) is solved to convergence: HALS for ``beta_loss='frobenius'``,
        the estimator's solver otherwise, until the relative decrease falls
        under 1e-10 (at most ``max(max_iter, 1000)`` iterations).
        :meth:`fit_transform` returns the codes solved the same way for the
        fitted components, so the two agree.

        Returns
        -------
        W : ndarray or torch.Tensor of shape (n_samples, n_components)
        """
        check_is_fitted(self)
        self._check_params()
        W = self._templates.W
        V = self._to_torch(X, reset=False).to(W.device, W.dtype)
        start = self._mean_code.expand(V.shape[0], -1).clone()
        return self._output(self._codes(V, start), X)

    def inverse_transform(self, X):
        """Data from codes: ``X @ components_``.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_components)

        Returns
        -------
        ndarray or torch.Tensor of shape (n_samples, n_features)
        """
        check_is_fitted(self)
        W = self._templates.W.detach()
        if not isinstance(X, torch.Tensor):  # sparse codes too, as scikit-learn's NMF
            X = check_array(X, accept_sparse=("csr", "csc"), dtype=[np.float64, np.float32])
        # before: a tensor of the wrong width failed in torch's product, sparse codes read "got ()"
        if X.ndim != 2 or X.shape[1] != self.n_components_:
            raise ValueError(
                f"X must have shape (n_samples, {self.n_components_}), got {tuple(X.shape)}"
            )
        if isinstance(X, torch.Tensor):
            return X.to(W.device, W.dtype) @ W.T
        return X @ self.components_

    @property
    def _n_features_out(self):
        return self.components_.shape[0]


# An online fit learns its templates from the batches; its start needs them only
# roughly, and NNDSVD's singular vectors from a sample of rows cost a fraction of
# those of all rows.  64 batches of 1024 (every third of 200,000 sparse rows) were
# enough to keep our one-pass fit under scikit-learn's one-pass loss (issue 13).
_START_BATCHES = 64


class TorchMiniBatchNMF(TorchNMF):
    r"""Minibatch (online) NMF with scikit-learn's ``MiniBatchNMF`` interface, for every beta.

    Learns the components from batches of ``batch_size`` samples: each batch's
    codes are solved by multiplicative updates with the components fixed, then
    the components take one majorisation-minimisation step on the statistics
    of the batches seen so far, the older ones down-weighted by
    ``forget_factor`` (Mairal et al. 2010; Lefèvre, Bach & Févotte 2011; see
    :mod:`torchnmf.solvers.online`).  Runs on PyTorch, on any ``device``, with
    dense or sparse ``X``; :meth:`partial_fit` takes one batch at a time.  The
    solver sees the data divided by the power of four nearest its mean entry
    (that of the first batch for :meth:`partial_fit`), so a fit of ``4**k * X``
    is the fit of ``X`` scaled, bit for bit, and data at 1e-9 fit as well as at 1.

    Parameters
    ----------
    n_components, init, beta_loss, tol, random_state, alpha_W, alpha_H, l1_ratio, verbose, device, dtype
        As in :class:`TorchNMF`; ``tol`` stops the fit once the relative change
        of the components between two steps falls under it (0 disables).  The
        NNDSVD starts take their singular vectors from 64 batches' worth of
        evenly spaced samples (all of them when there are fewer than 128
        batches; see ``sample_rows`` of :func:`torchnmf.init.initialize`).
    batch_size : int, default=1024
        Samples per batch.
    max_iter : int, default=200
        The most passes over the data.
    max_no_improvement : int or None, default=10
        Stop after this many batches without improvement of the batch cost
        smoothed over about a pass (each batch weighs its share of the samples,
        as in scikit-learn); None disables.
    forget_factor : float, default=0.7
        The weight of the past statistics after a whole pass over the data, in
        [0, 1], as in scikit-learn: after each batch of ``batch_size`` of the
        ``n_samples``, the past is weighted by
        ``forget_factor ** (batch_size / n_samples)``.
    fresh_restarts : bool, default=False
        Solve each batch's codes from a fresh start, by up to
        ``fresh_restarts_max_iter`` updates, at every step; else each step
        takes one update of the codes the samples had after the previous pass
        (at first, those of the initialisation): cheaper steps, more passes.
    fresh_restarts_max_iter : int, default=30
        The most multiplicative updates of a batch's codes with fresh restarts
        (and in :meth:`partial_fit`); they stop early once an update changes the
        codes by at most ``tol`` of their norm.
    transform_max_iter : int or None, default=None
        The most updates of the codes in :meth:`transform`; None: ``max_iter``.

    Attributes
    ----------
    components_, n_components_, reconstruction_err_, n_features_in_, feature_names_in_
        As in :class:`TorchNMF`.
    n_iter_ : int
        Passes over the data (started) of the fit.
    n_steps_ : int
        Batches processed (minibatch steps).

    Examples
    --------
    >>> import numpy as np
    >>> from torchnmf.estimator import TorchMiniBatchNMF
    >>> X = np.random.default_rng(0).random((60, 8))
    >>> model = TorchMiniBatchNMF(n_components=3, batch_size=20, random_state=0, max_iter=5)
    >>> model.fit_transform(X).shape
    (60, 3)
    """

    solver = "mu"

    def __init__(
        self,
        n_components=None,
        *,
        init=None,
        batch_size=1024,
        beta_loss="frobenius",
        tol=1e-4,
        max_no_improvement=10,
        max_iter=200,
        alpha_W=0.0,
        alpha_H="same",
        l1_ratio=0.0,
        forget_factor=0.7,
        fresh_restarts=False,
        fresh_restarts_max_iter=30,
        transform_max_iter=None,
        random_state=None,
        verbose=0,
        device=None,
        dtype=None,
    ):
        self.n_components = n_components
        self.init = init
        self.batch_size = batch_size
        self.beta_loss = beta_loss
        self.tol = tol
        self.max_no_improvement = max_no_improvement
        self.max_iter = max_iter
        self.alpha_W = alpha_W
        self.alpha_H = alpha_H
        self.l1_ratio = l1_ratio
        self.forget_factor = forget_factor
        self.fresh_restarts = fresh_restarts
        self.fresh_restarts_max_iter = fresh_restarts_max_iter
        self.transform_max_iter = transform_max_iter
        self.random_state = random_state
        self.verbose = verbose
        self.device = device
        self.dtype = dtype

    def _check_minibatch_params(self):
        checked = self._check_params()
        for name in ("batch_size", "fresh_restarts_max_iter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_no_improvement", "transform_max_iter"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                                      or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        rho = self.forget_factor
        if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not 0 <= rho <= 1:
            raise ValueError(f"forget_factor must be a number in [0, 1], got {rho!r}")
        return checked

    # -- pieces ------------------------------------------------------------------------
    def _start_rows(self, n_samples):
        """The starting templates from the singular vectors of ``_START_BATCHES``
        batches' worth of evenly spaced samples (see :func:`torchnmf.init.initialize`'s
        ``sample_rows``); the codes of every sample from one product with them."""
        return _START_BATCHES * min(self.batch_size, n_samples)

    @staticmethod
    def _rows(V, start, stop):
        """Rows start:stop of a dense tensor, or of a sparse one (as CSR)."""
        if V.layout == torch.strided:
            return V[start:stop]
        crow = V.crow_indices()
        low, high = int(crow[start]), int(crow[stop])
        return torch.sparse_csr_tensor(
            crow[start:stop + 1] - low, V.col_indices()[low:high], V.values()[low:high],
            (stop - start, V.shape[1]), check_invariants=False,
        )

    @staticmethod
    def _flat_codes(V, rank):
        """The codes every batch starts from without a previous pass: constant
        ``sqrt(mean(V) / rank)`` (the reconstruction then has ``V``'s mean)."""
        total = V.values().sum() if V.layout != torch.strided else V.sum()
        mean = float(total) / (V.shape[0] * V.shape[1])
        value = math.sqrt(max(mean, 0.0) / rank) or 1e-3
        return torch.full((V.shape[0], rank), value, dtype=V.dtype, device=V.device)

    def _online(self, W, beta, alpha_W, alpha_H, n_samples, n_features, n_total=None):
        """The solver; ``n_samples`` rows per batch out of ``n_total`` (default: one batch).

        ``forget_factor`` is the weight of the past after a whole pass over the
        data, as in scikit-learn: after each batch the past is weighted by
        ``forget_factor ** (n_samples / n_total)``.  ``W`` and the batches it
        sees are the normalised ones (see :meth:`_normalise`); the penalties
        are transformed to match."""
        from .solvers.online import OnlineMU
        from .solvers.penalty import Penalty
        from .solvers.scaling import scaled_penalty

        n_total = n_samples if n_total is None else n_total
        scale = self._data_scale
        # both factors carry the square root of the scale (see _normalise); the penalty
        # on the templates is per sample, weighted by the solver as the samples seen
        return OnlineMU(
            W, beta, self.forget_factor ** (n_samples / n_total),
            penalty_W=scaled_penalty(Penalty(alpha_H, self.l1_ratio), scale, beta,
                                     0.5, W.dtype),
            penalty_H=scaled_penalty(Penalty(alpha_W * n_features, self.l1_ratio), scale, beta,
                                     0.5, W.dtype),
            max_iter_H=self.fresh_restarts_max_iter, tol_H=self.tol,
        )

    # -- the scale of the data (see torchnmf.solvers.scaling) ----------------------------
    def _normalise(self, V, set_scale=False):
        """``V`` divided by the scale of the data: with ``set_scale``, the power of four
        nearest its mean entry (kept for later batches and :meth:`transform`).

        The online solver's floors at the dtype's epsilon sit at the same place
        relative to the data at every scale only on normalised data (the digits at
        1e-9: a KL fit ended at infinity, at 1e-6 Itakura-Saito at a million times
        its divergence).  Its templates outlive any one batch, so both factors
        carry the square root of the scale, a power of two: dividing and
        multiplying back are exact, and a fit of ``4**k * X`` is the fit of ``X``
        scaled."""
        if set_scale:
            from .solvers.scaling import scale_exponent
            from .targets.dense import float64_sum

            total = float64_sum(V.values() if V.layout != torch.strided else V)
            mean = float(total) / max(V.shape[0] * V.shape[1], 1)
            # a power of four whose root and reciprocal are normal numbers of the dtype
            self._data_scale = (4.0 ** (scale_exponent(2 * round(math.log(mean, 4)), V.dtype) // 2)
                                if mean > 0 and math.isfinite(mean) else 1.0)
        scale = self._data_scale
        if scale == 1:
            return V
        if V.layout == torch.strided:
            return V / scale
        return torch.sparse_csr_tensor(V.crow_indices(), V.col_indices(), V.values() / scale,
                                       V.shape, check_invariants=False)

    def _root(self):
        """The share of the scale each factor carries: ``sqrt(scale)``, a power of two."""
        return math.sqrt(self._data_scale)

    def _prepared(self, X, reset, with_checked=False):
        """``X`` validated, a sparse one in compressed rows (the batches are its row
        ranges); with ``with_checked`` also the validated tensor itself (a sparse one
        as a coalesced COO, which :func:`torchnmf.init.initialize` accepts as it is:
        its own validation of the compressed rows re-sorted 2M entries, 0.02-0.05 s)."""
        checked = V = self._to_torch(X, reset=reset)
        if V.layout != torch.strided:
            from .targets.sparse import to_csr

            V = to_csr(V)
        return (V, checked) if with_checked else V

    def _finish(self, online, V, codes, beta, rank):
        """The attributes from the solver and the normalised ``V`` and ``codes``."""
        self._online_state = online
        W = online.W * self._root() if self._data_scale != 1 else online.W
        self._templates = NMF(W=W, trainable_W=False)
        self.components_ = to_numpy(W.T)
        self.n_components_ = rank
        self.reconstruction_err_ = root_error(self._divergence(V, codes, online.W, beta),
                                              self._data_scale, beta)

    @staticmethod
    def _divergence(V, codes, W, beta):
        """The divergence of the normalised ``V`` (see :meth:`_normalise`), which needs
        no further scaling: ``data_divergence`` would copy ``V`` once more to divide
        it by 2 or 1/2 (a tenth of a one-pass fit of 50000 x 500, measured)."""
        from .targets import statistics
        from .targets.residual import AccurateDivergence

        # near an exact fit the closed form is rounding noise: the explicit residual then
        return float(AccurateDivergence(statistics(V, beta), V.dtype).divergence(codes, W))

    # -- fitting -----------------------------------------------------------------------
    def _fit(self, X, W_custom, H_custom, on_batch=None):
        """The fit; ``on_batch(W, codes, steps)``, if given, is called after every
        batch with the templates, the codes of every sample so far (both in the
        data's units) and the batches done (the benchmarks read the full-data loss
        there, outside their timing)."""
        beta, (alpha_W, alpha_H) = self._check_minibatch_params()
        V, checked = self._prepared(X, reset=True, with_checked=True)
        N, C = V.shape
        rank = self._rank(C, H_custom)
        generator = self._generator()
        W, codes = self._start(checked, rank, self.init, W_custom, H_custom, generator)
        V = self._normalise(V, set_scale=True)
        root = self._root()
        if root != 1:
            W, codes = W / root, codes / root
        online = self._online(W.contiguous(), beta, alpha_W, alpha_H, min(self.batch_size, N), C, N)
        codes = codes.contiguous()
        inner = self.fresh_restarts_max_iter if self.fresh_restarts else 1
        batch = min(self.batch_size, N)
        smoothed, best, stale, steps, epochs = None, math.inf, 0, 0, 0
        stop = False
        for epochs in range(1, self.max_iter + 1):
            for start in range(0, N, batch):
                end = min(start + batch, N)
                V_batch = self._rows(V, start, end)
                start_codes = (self._flat_codes(V_batch, rank) if self.fresh_restarts
                               else codes[start:end].clone())
                watch = self.max_no_improvement is not None  # the batch cost is for it alone
                H_batch, cost = online.partial_fit(V_batch, start_codes, inner, cost=watch)
                codes[start:end] = H_batch
                steps += 1
                if on_batch is not None:
                    on_batch(online.W * root, codes * root, steps)
                if watch:
                    cost /= end - start
                    # averaged over about a pass, as scikit-learn's (a fixed 0.1, ten
                    # batches, stopped batches of 50 digits after 61 steps, 12% above)
                    weight = min(1.0, (end - start) / (N + 1))
                    smoothed = cost if smoothed is None else (1 - weight) * smoothed + weight * cost
                if self.tol > 0 and steps > 1:  # W's relative change in the step
                    previous = online.reference
                    change = float((online.W - previous).norm() / previous.norm().clamp_min(1e-300))
                    stop = change < self.tol
                if watch and smoothed < best:
                    best, stale = smoothed, 0
                elif watch:
                    stale += 1
                    if stale >= self.max_no_improvement:
                        stop = True
                if stop:
                    break
            if stop:
                break
        self.n_iter_, self.n_steps_ = epochs, steps
        # the codes of the last pass, refined against the final components; with fresh
        # restarts solved afresh, as transform solves them (scikit-learn's checks want
        # fit_transform(X) == fit(X).transform(X): from the last pass they differed by 5%)
        codes = self._solve_codes(V, online, rank, None if self.fresh_restarts else codes)
        self._finish(online, V, codes, beta, rank)
        return codes * root if root != 1 else codes

    def _solve_codes(self, V, online, rank, codes=None):
        from .solvers.online import solve_activations

        max_iter = self.transform_max_iter or self.max_iter
        codes = self._flat_codes(V, rank) if codes is None else codes
        return solve_activations(V, online.W, codes, online.beta, online.penalty_H, max_iter,
                                 self.tol, with_constant=False)[0]

    def partial_fit(self, X, y=None, W=None, H=None):
        """One minibatch step on the samples ``X`` (the first call also initialises).

        Parameters
        ----------
        X : array-like, sparse matrix or torch.Tensor of shape (n_samples, n_features)
        y : Ignored
        W, H : array-like, optional
            For ``init='custom'`` on the first call: starting codes and components.

        Returns
        -------
        self : TorchMiniBatchNMF
        """
        with self._unchanged_on_failure():
            return self._partial_fit(X, W, H)

    def _partial_fit(self, X, W, H):
        first = not hasattr(self, "_online_state")
        beta, (alpha_W, alpha_H) = self._check_minibatch_params()
        V = self._prepared(X, reset=first)
        rank = self._rank(V.shape[1], H)
        if first:
            W_start, _ = self._start(V, rank, self.init if self.init != "nndsvda" or
                                     rank <= min(V.shape) else "random", W, H, self._generator())
            V = self._normalise(V, set_scale=True)
            online = self._online((W_start / self._root()).contiguous(), beta, alpha_W, alpha_H,
                                  V.shape[0], V.shape[1])
            self.n_steps_ = 0
        else:
            online = self._online_state
            V = self._normalise(V.to(online.W.device, online.W.dtype))
        # as scikit-learn: the past weighs forget_factor ** (min(batch_size, n) / n)
        n = V.shape[0]
        online.forget_factor = self.forget_factor ** (min(self.batch_size, n) / n)
        codes, _ = online.partial_fit(V, self._flat_codes(V, online.W.shape[1]))
        self.n_steps_ += 1
        self.n_iter_ = 1
        self._finish(online, V, codes, beta, online.W.shape[1])
        return self

    def transform(self, X):
        """The codes of ``X`` with the learned components held fixed.

        Every sample starts from the same constant code and takes at most
        ``transform_max_iter`` (else ``max_iter``) multiplicative updates.

        Returns
        -------
        W : ndarray or torch.Tensor of shape (n_samples, n_components)
        """
        check_is_fitted(self)
        self._check_minibatch_params()
        online = self._online_state
        V = self._normalise(self._prepared(X, reset=False).to(online.W.device, online.W.dtype))
        codes = self._solve_codes(V, online, online.W.shape[1])
        return self._output(codes * self._root() if self._data_scale != 1 else codes, X)
