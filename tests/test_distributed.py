"""One fit across two gloo processes on localhost equals the single-process fit
of the stacked matrix: same iterations, same history, same factors (float64)."""
import numpy as np
import pytest
import torch

import _distributed_cases as cases
from _distributed_pool import CaseFailed, Pool
from torchnmf.nmf import NMF

pytestmark = pytest.mark.filterwarnings("ignore::torchnmf._validation.ConvergenceWarning")

TOL = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def pool():
    workers = Pool(world=2)
    yield workers
    workers.close()


def assert_same_fit(results, reference):
    n_iter, history, W, H = reference
    for rank_result in results:
        assert rank_result[0] == n_iter
        np.testing.assert_allclose(rank_result[1], history, **TOL)
        np.testing.assert_allclose(rank_result[2], W, **TOL)
    np.testing.assert_allclose(np.concatenate([r[3] for r in results]), H, **TOL)
    # both processes took exactly the same decisions: bit-identical W and history
    assert results[0][1] == results[1][1]
    np.testing.assert_array_equal(results[0][2], results[1][2])


SOLVERS = [("mu", 0.5), ("mu", 1), ("mu", 2), ("mu_extrapolated", 1), ("mu_extrapolated", 0.5),
           ("hals", 2)]


@pytest.mark.parametrize("kind", ["dense", "sparse", "sparse_csr", "masked", "sparse_masked"])
@pytest.mark.parametrize("solver,beta", SOLVERS)
def test_two_processes_equal_one(pool, kind, solver, beta):
    fit = dict(beta=beta, solver=solver, max_iter=25, tol=0)
    results = pool.run(cases.fit_case, kind=kind, fit=fit)
    assert_same_fit(results, cases.reference_fit(kind, fit))


@pytest.mark.parametrize("kind", ["dense", "sparse_csr", "masked"])
@pytest.mark.parametrize("beta", [0.999, 1e-6])
def test_two_processes_equal_one_near_beta_zero_and_one(pool, kind, beta):
    """Near beta 0 and 1 each process's closed form is checked against its own
    threshold, grown with the terms (residual.amplification): the summed
    objectives are the explicit residual's on both sides."""
    fit = dict(beta=beta, solver="mu", max_iter=15, tol=0)
    results = pool.run(cases.fit_case, kind=kind, fit=fit)
    assert_same_fit(results, cases.reference_fit(kind, fit))


@pytest.mark.parametrize("beta", [0.999, 1e-6])
def test_two_processes_near_beta_zero_and_one_in_float32(pool, beta):
    """The digits in float32: the two processes' rounding differs from one's, so
    the histories agree to float32 rounding (a closed form near beta 0 or 1 would
    put each off by its own noise, 1e-3 and more)."""
    fit = dict(beta=beta, solver="mu", max_iter=15, tol=0)
    args = dict(problem_args=dict(kind="digits", dtype=torch.float32))
    results = pool.run(cases.fit_case, fit=fit, **args)
    _, history, _, _ = cases.reference_fit(fit=fit, **args)
    for result in results:
        np.testing.assert_allclose(result[1], history, rtol=1e-6)


@pytest.mark.parametrize("kind,fit", [
    ("sparse_csc", dict(beta=1, solver="mu")),
    ("sparse_csc", dict(beta=2, solver="hals")),
    # a target streamed in row blocks on each process: the wrappers compose
    ("dense", dict(beta=1, solver="mu_extrapolated", block_rows=5)),
    ("sparse_csr", dict(beta=0.5, solver="mu", block_rows=4)),
])
def test_csc_and_streamed_targets(pool, kind, fit):
    fit = dict(fit, max_iter=15, tol=0)
    results = pool.run(cases.fit_case, kind=kind, fit=fit)
    fit.pop("block_rows", None)
    assert_same_fit(results, cases.reference_fit(kind, fit))


@pytest.mark.parametrize("kind,solver,beta,streams", [
    ("dense", "mu", 1, 1), ("dense", "mu", 2, 1), ("sparse", "mu_extrapolated", 1, 1),
    ("masked", "mu", 2, 1),
    # rank 0 streams rows with no missing entry, rank 1 holds a mask: both masked kinds
    ("masked_rank1", "mu", 2, 0), ("masked_rank1", "mu", 1, 0), ("masked_rank1", "mu", 1, 1),
])
def test_streamed_rows_on_one_process_only(pool, kind, solver, beta, streams):
    # the processes' W terms must travel in the same form whatever kind each holds:
    # a process that streams its rows sums the Gram matrix (beta=2) and the row of
    # column sums (beta=1) as the in-memory ones do, and a masked form where another
    # process has a mask
    fit = dict(beta=beta, solver=solver, max_iter=10, tol=0)
    results = pool.run(cases.fit_case, kind=kind, fit=fit, per_rank={streams: dict(block_rows=4)})
    assert_same_fit(results, cases.reference_fit(kind, fit))


@pytest.mark.parametrize("kind,streams", [("masked", 1), ("masked_rank1", 0)])
def test_masked_hals_with_a_streamed_process_is_refused_everywhere(pool, kind, streams):
    # weighted HALS needs the masked residual in memory: every process refuses it
    fit = dict(beta=2, solver="hals", max_iter=5, tol=0)
    with pytest.raises(CaseFailed, match=r"ranks \[0, 1\] failed; NotImplementedError: solver='hals' "
                                         r"with a mask or missing values"):
        pool.run(cases.fit_case, kind=kind, fit=fit, per_rank={streams: dict(block_rows=4)})


@pytest.mark.parametrize("scale", [1e-30, 1e30])
@pytest.mark.parametrize("kind,solver,beta", [("dense", "mu", 1), ("sparse", "hals", 2)])
def test_scale_is_shared_by_the_processes(pool, scale, kind, solver, beta):
    """Every process normalises by the scale of the whole matrix: the distributed fit of
    c * V equals c times the single-process fit of V."""
    fit = dict(beta=beta, solver=solver, max_iter=20, tol=0)
    results = pool.run(cases.fit_case, kind=kind, fit=fit, problem_args={"scale": scale})
    n_iter, history, W, H = cases.reference_fit(kind, fit)
    scaled = (n_iter, [h * scale**beta for h in history], W, H * scale)
    for rank_result in results:
        np.testing.assert_allclose(rank_result[1], scaled[1], rtol=1e-9, atol=0)
        np.testing.assert_allclose(rank_result[2], W, rtol=1e-9, atol=0)
    np.testing.assert_allclose(np.concatenate([r[3] for r in results]), scaled[3], rtol=1e-9, atol=0)


@pytest.mark.parametrize("solver,beta", [("mu", 1), ("mu_extrapolated", 1), ("hals", 2)])
@pytest.mark.parametrize("kind", ["dense", "masked"])
def test_penalties_and_fixed_components(pool, kind, solver, beta):
    # the H penalty is summed over the processes' rows, the W penalty counted once
    fit = dict(beta=beta, solver=solver, max_iter=20, tol=0, alpha_W=0.3, alpha_H=0.05,
               l1_ratio=0.4, fixed_W=[1], fixed_H=[2])
    results = pool.run(cases.fit_case, kind=kind, fit=fit)
    reference = cases.reference_fit(kind, fit)
    assert_same_fit(results, reference)
    _, _, W0, _ = cases.problem(kind)
    np.testing.assert_array_equal(results[0][2][:, 1], W0[:, 1].numpy())


@pytest.mark.parametrize("solver,beta,rank", [("hals", 2, 3), ("mu", 2, 2), ("mu", 1, 2)])
def test_identical_refusal_at_an_exact_fit(pool, solver, beta, rank):
    # at the rounding floor an iteration that rounding raised is refused on every
    # process at once (the objective and the threshold are sums over the processes),
    # at the iteration where one process refuses it; mu decides after its H update
    # (the objective travels with the W terms) and puts both factors back
    fit = dict(beta=beta, solver=solver, max_iter=3000, tol=0)
    args = {"noise": 0.0, "R": rank}
    results = pool.run(cases.fit_case, fit=fit, problem_args=args)
    n_iter, history = results[0][0], results[0][1]
    assert n_iter < 3000 and history[-1] == history[-2]
    assert results[1][0] == n_iter and results[1][1] == history
    np.testing.assert_array_equal(results[0][2], results[1][2])
    diffs = np.diff(history)
    assert (diffs <= 4 * np.finfo(np.float64).eps * np.array(history[:-1])).all()


@pytest.mark.parametrize("solver,beta", [("mu", 1), ("mu_extrapolated", 1), ("hals", 2)])
def test_identical_stopping(pool, solver, beta):
    fit = dict(beta=beta, solver=solver, max_iter=500, tol=1e-4)
    results = pool.run(cases.fit_case, fit=fit)
    reference = cases.reference_fit("dense", fit)
    assert 1 < reference[0] < 500  # the tolerance, not max_iter, stopped it
    assert_same_fit(results, reference)


def test_fixed_factor_and_float32(pool):
    fit = dict(beta=1, max_iter=10, tol=0)
    results = pool.run(cases.fit_case, fit=fit, model=dict(trainable_W=False))
    reference = cases.reference_fit("dense", fit, model=dict(trainable_W=False))
    assert_same_fit(results, reference)
    args = dict(dtype=torch.float32)
    results = pool.run(cases.fit_case, fit=fit, problem_args=args)
    reference = cases.reference_fit("dense", fit, problem_args=args)
    for result in results:
        np.testing.assert_allclose(result[1], reference[1], rtol=1e-5)
        np.testing.assert_allclose(result[2], reference[2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "sparse", "masked"])
def test_transform(pool, kind):
    fit = dict(beta=1, max_iter=15, tol=0, alpha=0.1)
    results = pool.run(cases.transform_case, kind=kind, fit=fit)
    np.testing.assert_allclose(np.concatenate(results), cases.reference_transform(kind, fit), **TOL)


def test_real_data(pool):
    # the digits of scikit-learn, rows split over the two processes
    fit = dict(beta=1, solver="mu_extrapolated", max_iter=15, tol=0)
    args = dict(kind="digits")
    results = pool.run(cases.fit_case, fit=fit, problem_args=args)
    assert_same_fit(results, cases.reference_fit("dense", fit, problem_args=args))


@pytest.mark.parametrize("rank1,message", [
    (dict(fit=dict(beta=2)), r"same beta, but rank 1 has beta=2.0 and rank 0 has beta=1.0"),
    (dict(fit=dict(solver="hals", beta=2)), r"same solver, but rank 1 has solver='hals'"),
    (dict(fit=dict(max_iter=6)), r"same max_iter, but rank 1 has max_iter=6"),
    (dict(fit=dict(alpha=0.5)), r"same alpha_W, but rank 1 has alpha_W=0.5"),
    (dict(fit=dict(fixed_W=[0])), r"same fixed_W, but rank 1 has fixed_W=\[0\]"),
    (dict(columns=9), r"same columns, but rank 1 has columns=9 and rank 0 has columns=10"),
    (dict(negative=True), r"rank 1 refused its input \(ValueError: V must be non-negative"),
])
def test_disagreement_is_refused_on_every_rank(pool, rank1, message):
    with pytest.raises(CaseFailed, match=r"ranks \[0, 1\] failed; .*" + message):
        pool.run(cases.settings_case, **rank1)
    # the group is still usable after a refused fit
    fit = dict(beta=1, max_iter=3, tol=0)
    assert_same_fit(pool.run(cases.fit_case, fit=fit), cases.reference_fit("dense", fit))


def test_process_group_needs_torch_distributed():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(RuntimeError, match="process_group needs an initialised torch.distributed"):
        NMF((4, 3), rank=2).fit(torch.rand(4, 3), process_group=object())


def test_timeout_is_checked():
    with pytest.raises(ValueError, match="timeout must be a positive finite number of seconds, got 0"):
        NMF((4, 3), rank=2).fit(torch.rand(4, 3), timeout=0)


@pytest.mark.parametrize("method", ["random", "nndsvd", "nndsvda", "nndsvdar"])
@pytest.mark.parametrize("kind,size", [
    ("dense", dict(N=24, C=10)),          # exact SVD: all-reduced Gram matrix
    ("sparse", dict(N=24, C=10)),         # randomised range finder, Cholesky QR
    ("dense", dict(N=600, C=520, R=5)),   # randomised range finder on a dense V
])
def test_initialisation_equals_one_process(pool, method, kind, size):
    results = pool.run(cases.init_case, method=method, kind=kind, **size)
    W, H = cases.reference_init(method, kind, **size)
    for result in results:
        np.testing.assert_allclose(result[0], W, **TOL)
    np.testing.assert_allclose(np.concatenate([r[1] for r in results]), H, **TOL)


@pytest.mark.parametrize("beta", [1, 2])
def test_convolutional_model(pool, beta):
    # NMFD's autograd statistics are sums over rows too, so the same wrapper serves them
    fit = dict(beta=beta, max_iter=10, tol=0, alpha=0.1)
    results = pool.run(cases.nmfd_case, fit=fit)
    assert_same_fit(results, cases.reference_nmfd(fit))


@pytest.mark.parametrize("kind,fit", [
    ("dense", dict(beta=2, sW=0.5)),            # W projected: identical on every process
    ("dense", dict(beta=2, sH=0.6)),            # H's components run over both processes' rows
    ("masked", dict(beta=1, sW=0.4, sH=0.5)),
    ("sparse", dict(beta=2, sH=0.7)),
])
def test_sparse_fit(pool, kind, fit):
    fit = dict(fit, max_iter=15)
    results = pool.run(cases.sparse_fit_case, kind=kind, fit=fit)
    reference = cases.reference_sparse_fit(kind, fit)
    assert_same_fit(results, reference)
    assert np.all(np.diff(reference[1]) <= 1e-12 * abs(reference[1][0]))  # never increases
    if "sH" in fit:  # the projection was of the whole components: unit norm over all rows
        H = np.concatenate([r[3] for r in results])
        np.testing.assert_allclose(np.linalg.norm(H, axis=0), 1.0, rtol=1e-10)


def test_convolutional_initialisation(pool):
    results = pool.run(cases.conv_init_case)
    W, H = cases.reference_conv_init()
    for result in results:
        np.testing.assert_allclose(result[0], W, **TOL)
    np.testing.assert_allclose(np.concatenate([r[1] for r in results]), H, **TOL)


@pytest.mark.parametrize("rank1,message", [
    (dict(sH=0.7), r"same sH, but rank 1 has sH=0.7 and rank 0 has sH=0.5"),
    (dict(sH=1.5), r"rank 1 refused its input \(ValueError: sH must lie strictly between 0 and 1, got 1.5"),
])
def test_sparse_fit_disagreement_is_refused(pool, rank1, message):
    with pytest.raises(CaseFailed, match=r"ranks \[0, 1\] failed; .*" + message):
        pool.run(cases.sparse_settings_case, **rank1)


@pytest.mark.parametrize("kind,dtype,columns,collectives", [
    ("dense", torch.float32, 10, 1), ("dense", torch.float64, 10, 1),
    ("sparse", torch.float64, 10, 1), ("masked", torch.float32, 10, 1),
    # float32 W terms of more than CARRY_LIMIT values would double their bytes in float64
    ("dense", torch.float32, 50_000, 2), ("dense", torch.float64, 50_000, 1),
])
def test_one_collective_per_mu_iteration(pool, kind, dtype, columns, collectives):
    # each all-reduce is a synchronisation point: multiplicative updates carry the
    # objective of the H step with the W terms, in one all-reduce
    counts = pool.run(cases.collectives_case, kind=kind, dtype=dtype, columns=columns)
    assert counts[0] == counts[1] == collectives
