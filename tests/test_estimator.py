import warnings

import numpy as np
import pytest
import torch

sklearn = pytest.importorskip("sklearn")
scipy_sparse = pytest.importorskip("scipy.sparse")

from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from torchnmf import ConvergenceWarning  # noqa: E402
from torchnmf.estimator import TorchMiniBatchNMF, TorchNMF  # noqa: E402


@pytest.mark.slow
# the defaults, with two components (transform and fit_transform must agree)
@parametrize_with_checks([TorchNMF(n_components=2)])
def test_sklearn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


def planted(generator, n=30, c=20, rank=3):
    H = torch.rand(n, rank, generator=generator, dtype=torch.float64)
    W = torch.rand(c, rank, generator=generator, dtype=torch.float64)
    return (H @ W.T).numpy()


def test_import_torchnmf_needs_no_sklearn_or_scipy():
    import subprocess
    import sys

    code = (
        "import sys, torchnmf, torchnmf.nmf, torchnmf.metrics; "
        "bad = [m for m in ('sklearn', 'scipy') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fit_attributes_and_orientation(generator):
    X = planted(generator)
    est = TorchNMF(n_components=3, init="random", random_state=0, max_iter=2000, tol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        codes = est.fit_transform(X)
    assert codes.shape == (30, 3) and est.components_.shape == (3, 20)
    assert est.n_components_ == 3 and est.n_features_in_ == 20 and 0 < est.n_iter_ <= 2000
    assert isinstance(codes, np.ndarray) and codes.dtype == np.float64
    residual = np.linalg.norm(X - codes @ est.components_)
    assert est.reconstruction_err_ == pytest.approx(residual, rel=1e-6)
    assert residual / np.linalg.norm(X) < 1e-3
    np.testing.assert_allclose(est.inverse_transform(codes), codes @ est.components_)
    np.testing.assert_allclose(est.transform(X) @ est.components_, X, rtol=0, atol=1e-2 * X.max())
    assert list(est.get_feature_names_out()) == ["torchnmf0", "torchnmf1", "torchnmf2"]


@pytest.mark.parametrize("beta_loss,beta", [("frobenius", 2), ("kullback-leibler", 1), ("itakura-saito", 0), (1.5, 1.5)])
def test_estimator_forwards_to_nmf_fit(beta_loss, beta, generator):
    """The estimator is NMF.fit in sklearn's orientation, with sklearn's penalty scaling."""
    from torchnmf.nmf import NMF

    X = planted(generator) + 0.1
    codes0 = torch.rand(30, 2, generator=generator, dtype=torch.float64).numpy()
    comps0 = torch.rand(2, 20, generator=generator, dtype=torch.float64).numpy()
    est = TorchNMF(n_components=2, init="custom", beta_loss=beta_loss, max_iter=15, tol=0,
                   alpha_W=0.01, alpha_H=0.02, l1_ratio=0.3)
    codes = est.fit_transform(X, W=codes0, H=comps0)
    model = NMF(W=torch.from_numpy(comps0.T), H=torch.from_numpy(codes0))
    n_iter = model.fit(torch.from_numpy(X), beta=beta, max_iter=15, tol=0, l1_ratio=0.3,
                       alpha_H=0.01 * 20, alpha_W=0.02 * 30)
    assert est.n_iter_ == n_iter == 15
    np.testing.assert_array_equal(est.components_, model.W.detach().numpy().T)
    # the codes: those of the fitted components, solved to convergence from the fit's
    polished = NMF(W=model.W.detach(), trainable_W=False).transform(
        torch.from_numpy(X), beta=beta, tol=est.CODES_TOL, max_iter=est.CODES_MIN_ITER,
        alpha=0.01 * 20, l1_ratio=0.3, solver="hals" if beta == 2 else "mu", H=model.H.detach(),
    )
    np.testing.assert_array_equal(codes, polished.numpy())


def test_numpy_scipy_sparse_and_torch_inputs_agree(generator):
    X = planted(generator)
    X[X < 0.5] = 0
    kwargs = dict(n_components=3, init="random", random_state=3, max_iter=50, tol=0)
    dense = TorchNMF(**kwargs).fit_transform(X)
    # a CSR matrix with its columns in descending order and its first entry split in two
    rows, cols = np.nonzero(X)
    order = np.lexsort((-cols, rows))
    rows, cols = rows[order], cols[order]
    values = X[rows, cols]
    values = np.concatenate([values[:1] / 2, values[:1] / 2, values[1:]])
    rows, cols = np.concatenate([rows[:1], rows]), np.concatenate([cols[:1], cols])
    pointers = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=X.shape[0]))])
    messy = scipy_sparse.csr_matrix((values, cols, pointers), shape=X.shape)
    assert not messy.has_canonical_format
    for sparse in (scipy_sparse.csr_matrix(X), scipy_sparse.csc_array(X), scipy_sparse.coo_matrix(X),
                   messy):
        np.testing.assert_allclose(TorchNMF(**kwargs).fit_transform(sparse), dense, rtol=1e-10, atol=1e-12)
    est = TorchNMF(**kwargs)
    out = est.fit_transform(torch.from_numpy(X))
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), dense, rtol=1e-10, atol=1e-12)
    assert isinstance(est.transform(torch.from_numpy(X)), torch.Tensor)
    assert isinstance(est.inverse_transform(out), torch.Tensor)
    sparse_torch = torch.from_numpy(X).to_sparse()
    np.testing.assert_allclose(TorchNMF(**kwargs).fit_transform(sparse_torch).numpy(), dense, rtol=1e-10, atol=1e-12)


def test_dtype_and_device_parameters(generator):
    X = planted(generator)
    est = TorchNMF(n_components=2, init="random", random_state=0, max_iter=20, tol=0)
    assert est.fit_transform(X.astype(np.float32)).dtype == np.float32
    assert est.components_.dtype == np.float32
    est = TorchNMF(n_components=2, init="random", random_state=0, max_iter=20, tol=0, dtype="float32", device="cpu")
    assert est.fit_transform(X).dtype == np.float32
    est = TorchNMF(n_components=2, init="random", random_state=0, max_iter=20, tol=0, dtype=torch.float64)
    assert est.fit_transform(torch.from_numpy(X).float()).dtype == torch.float64


def test_transform_is_independent_of_the_batch(generator):
    X = planted(generator)
    est = TorchNMF(n_components=3, init="random", random_state=0, max_iter=100, tol=1e-6).fit(X)
    full = est.transform(X)
    # each code is solved to convergence: the batch changes it only within the solver's tolerance
    np.testing.assert_allclose(est.transform(X[:7]), full[:7], rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("init", ["nndsvd", "nndsvda", "nndsvdar", None])
def test_svd_initialisations(init, generator):
    pytest.importorskip("torchnmf.init")
    X = planted(generator)
    # NNDSVD's zeros stay zero under multiplicative updates (scikit-learn's 'mu'
    # ends at the same 7.8% error here), so the plain variant is paired with HALS
    solver = "hals" if init == "nndsvd" else "mu"
    est = TorchNMF(n_components=3, init=init, random_state=0, max_iter=300, tol=1e-8,
                   solver=solver)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X)
    assert est.reconstruction_err_ / np.linalg.norm(X) < 0.05


def test_estimator_errors(generator):
    X = planted(generator)
    with pytest.raises(ValueError, match="beta_loss must be a real number or one of"):
        TorchNMF(beta_loss="hinge").fit(X)
    with pytest.raises(ValueError, match="solver must be one of"):
        TorchNMF(solver="cd").fit(X)
    with pytest.raises(ValueError, match="init must be None or one of"):
        TorchNMF(init="svd").fit(X)
    with pytest.raises(ValueError, match="n_components must be a positive integer, 'auto' or None, got 0"):
        TorchNMF(n_components=0).fit(X)
    with pytest.raises(ValueError, match="alpha_H must be a finite non-negative number or 'same'"):
        TorchNMF(alpha_H=-1).fit(X)
    with pytest.raises(ValueError, match=r"l1_ratio must lie in \[0, 1\]"):
        TorchNMF(l1_ratio=2).fit(X)
    with pytest.raises(ValueError, match="init='custom' needs both W and H"):
        TorchNMF(init="custom", n_components=2).fit(X)
    with pytest.raises(ValueError, match=r"init='custom' needs W of shape \(30, 2\)"):
        TorchNMF(init="custom", n_components=2).fit(X, W=np.ones((30, 3)), H=np.ones((2, 20)))
    with pytest.raises(ValueError, match="Negative values in data passed to TorchNMF"):
        TorchNMF().fit(-X)
    with pytest.raises(ValueError, match="Negative values in data passed to TorchNMF"):
        TorchNMF().fit(-torch.from_numpy(X))
    with pytest.raises(ValueError, match="contains NaN"):
        TorchNMF().fit(torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match="beta=0 needs a strictly positive X"):
        TorchNMF(beta_loss="itakura-saito", init="random").fit(X * (X > 0.5))
    with pytest.raises(ValueError, match="dtype must be a floating dtype"):
        TorchNMF(dtype="int32").fit(X)
    # float64 data beyond float32's range: before, "V contains infinite values" and
    # "got an all-zero V", about data that had neither
    with pytest.raises(ValueError, match=r"X's largest entry, .*e\+3\d\d, exceeds torch.float32's .*dtype='float64'"):
        TorchNMF(dtype="float32").fit(X * 1e300)
    with pytest.raises(ValueError, match=r"X's mean non-zero entry, .*e-30\d, is under torch.float32's"):
        TorchNMF(dtype="float32").fit(X * 1e-300)
    # before: torch's AssertionError (a CPU build) or RuntimeError at the first copy
    with pytest.raises(ValueError, match=r"device='nowhere' cannot be used here"):
        TorchNMF(device="nowhere").fit(X)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda:7' cannot be used here"):
            TorchNMF(device="cuda:7").fit(X)
    est = TorchNMF(n_components=2, init="random", max_iter=5).fit(torch.from_numpy(X))
    with pytest.raises(ValueError, match="X has 19 features, but TorchNMF is expecting 20 features"):
        est.transform(torch.from_numpy(X[:, :19]))
    with pytest.raises(ValueError, match="Expected a 2D tensor"):
        est.transform(torch.from_numpy(X[0]))
    with pytest.raises(ValueError, match=r"X must have shape \(n_samples, 2\)"):
        est.inverse_transform(np.ones((3, 4)))



@pytest.mark.parametrize("cls", [TorchNMF, TorchMiniBatchNMF])
def test_torch_inputs_bool_and_needing_grad(cls, generator):
    """Before: a bool tensor failed inside torch.iinfo (TypeError naming torch.bool's
    iinfo), and the minibatch fit of a tensor needing grad failed in an in-place product."""
    X = torch.from_numpy(planted(generator, n=12, c=5))
    with pytest.raises(TypeError, match="X must hold real numbers, got dtype torch.bool"):
        cls(2).fit(X > 1)
    kwargs = dict(n_components=2, init="random", random_state=0, max_iter=5, tol=0)
    codes = cls(**kwargs).fit_transform(X.clone().requires_grad_())
    assert not codes.requires_grad
    torch.testing.assert_close(codes, cls(**kwargs).fit_transform(X), rtol=0, atol=0)


@pytest.mark.parametrize("cls", [TorchNMF, TorchMiniBatchNMF])
def test_custom_start_is_checked_and_never_written(cls, generator):
    """Before: the minibatch fit wrote its codes into the caller's W and took a negative
    start; TorchNMF named a negative W "H" (torchnmf's name for the codes)."""
    X = planted(generator, n=12, c=5)
    W = torch.rand(12, 2, generator=generator, dtype=torch.float64).numpy()
    H = torch.rand(2, 5, generator=generator, dtype=torch.float64).numpy()
    W_before, H_before = W.copy(), H.copy()
    est = cls(2, init="custom", beta_loss=1, max_iter=3, tol=0)
    est.fit(X, W=W, H=H)
    np.testing.assert_array_equal(W, W_before)
    np.testing.assert_array_equal(H, H_before)
    with pytest.raises(ValueError, match="W must be non-negative, but its smallest entry is -1"):
        est.fit(X, W=-np.ones_like(W), H=H)
    with pytest.raises(ValueError, match="H must be non-negative, but its smallest entry is -1"):
        est.fit(X, W=W, H=-np.ones_like(H))


@pytest.mark.parametrize("cls", [TorchNMF, TorchMiniBatchNMF])
def test_n_components_auto_as_scikit_learn(cls, generator):
    """'auto' (scikit-learn's default since 1.6) is None: every feature, or the rank of a
    custom start.  Before: "n_components must be a positive integer or None"."""
    X = planted(generator, n=12, c=5)
    kwargs = dict(init="random", random_state=0, max_iter=3, tol=0)
    auto = cls("auto", **kwargs).fit(X)
    np.testing.assert_array_equal(auto.components_, cls(None, **kwargs).fit(X).components_)
    assert auto.n_components_ == 5
    custom = cls("auto", init="custom", max_iter=3).fit(X, W=np.ones((12, 2)), H=np.ones((2, 5)))
    assert custom.components_.shape == (2, 5)


@pytest.mark.parametrize("cls", [TorchNMF, TorchMiniBatchNMF])
@pytest.mark.parametrize("name", ["alpha_W", "alpha_H"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_penalty_strengths_must_be_finite(cls, name, value):
    """Before: the minibatch fit took NaN and inf penalties silently, and TorchNMF
    refused alpha_H=nan as "alpha_W must be finite" (NMF.fit's name for it)."""
    with pytest.raises(ValueError, match=f"{name} must be a finite non-negative number"):
        cls(2, **{name: value}).fit(np.ones((4, 3)))


@pytest.mark.parametrize("cls", [TorchNMF, TorchMiniBatchNMF])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", torch.bfloat16])
def test_half_precision_fits_of_numpy_data(cls, dtype, generator):
    """Before: float16 ended in "linalg_svd_cpu" not implemented for 'Half' (the default
    NNDSVDa start), a bfloat16 fit in "Got unsupported ScalarType BFloat16" when its
    numpy outputs were made, and the name 'bfloat16' was refused."""
    X = planted(generator, n=12, c=5)
    est = cls(2, dtype=dtype, max_iter=5, random_state=0)
    codes = est.fit_transform(X)
    expected = np.float16 if dtype == "float16" else np.float32
    assert codes.dtype == est.components_.dtype == est.transform(X).dtype == expected
    torch_dtype = torch.float16 if dtype == "float16" else torch.bfloat16
    reference = cls(2, dtype=torch_dtype, max_iter=5, random_state=0).fit_transform(torch.from_numpy(X))
    np.testing.assert_array_equal(codes, reference.float().numpy().astype(expected))


@pytest.mark.parametrize("cls", [TorchNMF, TorchMiniBatchNMF])
@pytest.mark.parametrize("call", ["fit", "fit_transform", "partial_fit"])
def test_a_failed_fit_leaves_the_model_as_it_was(cls, call, generator):
    """Before: fitting bad data (negative, 3 features) to a model fitted on 5 named
    features left it expecting 3 unnamed ones, with its old components; a first
    partial_fit of bad data left an unfitted model with n_features_in_."""
    pandas = pytest.importorskip("pandas")
    if call == "partial_fit" and cls is TorchNMF:
        pytest.skip("TorchNMF has no partial_fit")
    X = pandas.DataFrame(planted(generator, n=12, c=5), columns=list("abcde"))
    est = cls(2, init="random", random_state=0, max_iter=3)
    if call != "partial_fit":
        est.fit(X)
    state = {name: value for name, value in vars(est).items()}
    with pytest.raises(ValueError, match="Negative values"):
        getattr(est, call)(-np.ones((4, 3)))
    assert vars(est).keys() == state.keys()
    assert all(vars(est)[name] is value for name, value in state.items())
    if call != "partial_fit":
        assert est.transform(X).shape == (12, 2)


def test_inverse_transform_takes_sparse_codes_and_checks_tensors(generator):
    """Before: sparse codes failed with "got ()", a tensor of the wrong width inside torch."""
    X = planted(generator, n=12, c=5)
    est = TorchNMF(2, init="random", random_state=0, max_iter=5).fit(X)
    codes = est.transform(X)
    expected = codes @ est.components_
    for sparse in (scipy_sparse.csr_matrix(codes), scipy_sparse.csc_array(codes)):
        np.testing.assert_allclose(est.inverse_transform(sparse), expected, rtol=1e-12)
    with pytest.raises(ValueError, match=r"X must have shape \(n_samples, 2\), got \(12, 3\)"):
        est.inverse_transform(torch.ones(12, 3, dtype=torch.float64))

CORPUS = {
    "astronomy": [
        "the telescope observed a distant galaxy full of stars",
        "astronomers pointed the telescope at a bright star in the galaxy",
        "a comet passed the planet while the telescope tracked the stars",
        "the galaxy holds billions of stars and every star may host a planet",
        "the space telescope found a planet orbiting a distant star",
    ],
    "cooking": [
        "simmer the tomato sauce with garlic and olive oil in the pan",
        "bake the bread in a hot oven and brush it with garlic butter",
        "fry the onions and garlic in butter in a hot pan",
        "bake the cake in the oven with butter sugar and flour",
        "season the sauce in the pan with garlic salt and pepper",
    ],
    "football": [
        "the striker scored a goal in the final minute of the match",
        "the team won the match after the goalkeeper saved a penalty",
        "the striker passed the ball and the team scored another goal",
        "the coach praised the team after the match ended with a late goal",
        "the referee gave a penalty and the striker scored the goal",
    ],
}


def test_pipeline_after_tfidf_separates_topics():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline

    documents = [doc for docs in CORPUS.values() for doc in docs]
    labels = np.repeat(np.arange(3), 5)
    pipeline = make_pipeline(
        TfidfVectorizer(stop_words="english"),
        TorchNMF(n_components=3, init="random", random_state=0, max_iter=1000, tol=1e-6),
    )
    codes = pipeline.fit_transform(documents)
    assert codes.shape == (15, 3) and (codes >= 0).all()
    topic = codes.argmax(axis=1)
    # every true topic maps to a single, distinct component
    assignment = [np.bincount(topic[labels == k], minlength=3).argmax() for k in range(3)]
    assert sorted(assignment) == [0, 1, 2]
    assert (topic == np.array(assignment)[labels]).mean() >= 14 / 15
    new = pipeline.transform(["the team scored a late goal", "bake bread with garlic butter"])
    assert new.argmax(axis=1).tolist() == [assignment[2], assignment[1]]
    vocabulary = pipeline[0].get_feature_names_out()
    components = pipeline[1].components_
    top = {vocabulary[components[assignment[0]].argmax()]}
    assert top <= {"galaxy", "telescope", "stars", "star", "orbit", "planet", "planets", "moon", "moons"}


@pytest.mark.parametrize("beta_loss", ["kullback-leibler", "itakura-saito"])
@pytest.mark.parametrize("scale", [1e-9, 1e9])
def test_reconstruction_error_at_any_scale(beta_loss, scale):
    """The digits (float32) at 1e-9 and 1e9: reconstruction_err_ relative to the data
    is unit scale's (it was taken with floors at float32's epsilon: at 1e-9 the KL
    error read 35 times the fit's)."""
    from sklearn.datasets import load_digits

    X = load_digits().data[:400].astype(np.float32) + (1 if beta_loss == "itakura-saito" else 0)
    beta = {"kullback-leibler": 1, "itakura-saito": 0}[beta_loss]
    errors = []
    for factor in (1.0, scale):
        model = TorchNMF(6, beta_loss=beta_loss, max_iter=30, random_state=0).fit(
            X * np.float32(factor))
        errors.append(model.reconstruction_err_ / factor ** (beta / 2))
    assert errors[1] == pytest.approx(errors[0], rel=1e-3)


@pytest.mark.parametrize("estimator", [TorchNMF, TorchMiniBatchNMF])
@pytest.mark.parametrize("k", [-996, 996])
def test_reconstruction_error_whose_square_is_no_float(estimator, k):
    """The digits (float64) times 2**-996 and 2**996 at beta=2: the error is 2**k times
    unit scale's although the divergence, 2**(2k) times, is no float (at 2**-996 the
    error read 0, and TorchNMF's fit stopped after two iterations on a history of
    zeros)."""
    from sklearn.datasets import load_digits

    X = load_digits().data[:300] + 0.1
    options = dict(n_components=5, init="nndsvda", max_iter=30, random_state=0)
    if estimator is TorchMiniBatchNMF:
        options["batch_size"] = 100
    reference = estimator(**options).fit(X)
    if estimator is TorchNMF and k > 0:
        # the objective in the data's units overflows: the loop says so
        with pytest.raises(FloatingPointError, match="was inf at the start"):
            estimator(**options).fit(X * 2.0**k)
        return
    scaled = estimator(**options).fit(X * 2.0**k)
    assert scaled.n_iter_ == reference.n_iter_
    assert scaled.reconstruction_err_ == pytest.approx(reference.reconstruction_err_ * 2.0**k,
                                                       rel=1e-12)


@pytest.mark.parametrize("estimator", [TorchNMF, TorchMiniBatchNMF])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_estimators(estimator, dtype):
    """dtype='float16' failed in NNDSVD (torch's SVD takes no half precision),
    'bfloat16' was refused as no floating dtype (NumPy has none) and its components
    could not become an array; both fit the digits as float32 does, to their precision."""
    from sklearn.datasets import load_digits

    X = load_digits().data[:300] + 0.1
    options = dict(n_components=5, beta_loss="kullback-leibler", max_iter=20, random_state=0)
    if estimator is TorchMiniBatchNMF:
        options["batch_size"] = 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        half = estimator(dtype=dtype, **options).fit(X)
        single = estimator(dtype="float32", **options).fit(X)
    assert half.components_.dtype == (np.float32 if dtype == "bfloat16" else np.float16)
    assert half.reconstruction_err_ == pytest.approx(single.reconstruction_err_, rel=0.02)
