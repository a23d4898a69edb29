"""Checkpoints: a resumed fit ends exactly where an uninterrupted one does (one
process and two), writes are atomic, and a dead or hanging peer ends the fit
with a clear error within the timeout, leaving the last checkpoint intact."""
import numpy as np
import pytest
import torch

import _distributed_cases as cases
from _distributed_pool import CaseFailed, Pool
from torchnmf.nmf import NMF
from torchnmf.solvers import checkpoint as checkpoint_module

pytestmark = pytest.mark.filterwarnings("ignore::torchnmf._validation.ConvergenceWarning")


def digits():
    from sklearn.datasets import load_digits

    V = torch.as_tensor(load_digits().data[:200], dtype=torch.float64)
    return V[:, V.sum(0) > 0]


@pytest.mark.parametrize("solver,beta", [("mu", 1), ("mu", 0.5), ("mu_extrapolated", 1), ("hals", 2)])
def test_resumed_equals_uninterrupted(tmp_path, solver, beta):
    V = digits()
    g = torch.Generator().manual_seed(0)
    W0 = torch.rand(V.shape[1], 4, generator=g, dtype=V.dtype)
    H0 = torch.rand(V.shape[0], 4, generator=g, dtype=V.dtype)
    options = dict(beta=beta + 1e-3 if beta == 0.5 else beta, solver=solver, tol=0, alpha=0.01)
    whole = NMF(W=W0, H=H0)
    n_whole = whole.fit(V, max_iter=30, **options)
    path = tmp_path / "fit.ckpt"
    interrupted = NMF(W=W0, H=H0)
    interrupted.fit(V, max_iter=23, checkpoint=path, checkpoint_every=10, **options)
    resumed = NMF(W=W0 * 2, H=H0 * 3)  # the checkpoint's factors replace these
    n_resumed = resumed.fit(V, max_iter=30, resume=path, **options)
    assert n_resumed == n_whole == 30
    assert resumed.loss_history == whole.loss_history
    assert torch.equal(resumed.W, whole.W) and torch.equal(resumed.H, whole.H)


def test_resume_refuses_other_settings(tmp_path):
    V = digits()
    path = tmp_path / "fit.ckpt"
    NMF(V.shape, rank=3).fit(V, max_iter=5, tol=0, checkpoint=path, checkpoint_every=5)
    with pytest.raises(ValueError, match=r"was saved with beta=1.0, but this fit has beta=2.0"):
        NMF(V.shape, rank=3).fit(V, beta=2, max_iter=8, resume=path)
    with pytest.raises(ValueError, match="was saved with rank=3, but this fit has rank=4"):
        NMF(V.shape, rank=4).fit(V, max_iter=8, resume=path)
    with pytest.raises(FileNotFoundError):
        NMF(V.shape, rank=3).fit(V, resume=tmp_path / "missing")
    (tmp_path / "junk").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a readable torchnmf checkpoint"):
        NMF(V.shape, rank=3).fit(V, resume=tmp_path / "junk")
    with pytest.raises(ValueError, match="checkpoint_every must be a positive integer, got 0"):
        NMF(V.shape, rank=3).fit(V, checkpoint=path, checkpoint_every=0)
    with pytest.raises(TypeError, match="checkpoint must be a path"):
        NMF(V.shape, rank=3).fit(V, checkpoint=3)


def test_an_unwritable_checkpoint_fails_before_the_fit(tmp_path):
    """Before: a missing directory raised FileNotFoundError at the first save,
    ``checkpoint_every`` iterations into the fit, with the model already changed."""
    V = digits()
    model = NMF(V.shape, rank=3)
    before = [p.detach().clone() for p in model.parameters()]
    missing = tmp_path / "no" / "such" / "fit.ckpt"
    with pytest.raises(ValueError, match=r"the directory .*no/such' does not exist; create it first"):
        model.fit(V, max_iter=20, checkpoint=missing, checkpoint_every=10)
    with pytest.raises(ValueError, match="is a directory; give a file name inside it"):
        model.fit(V, max_iter=20, checkpoint=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert model.loss_history == []


def test_a_crash_while_writing_leaves_the_last_checkpoint(tmp_path, monkeypatch):
    V = digits()
    path = tmp_path / "fit.ckpt"
    model = NMF(V.shape, rank=3)
    model.fit(V, max_iter=4, tol=0, checkpoint=path, checkpoint_every=2)
    saved = torch.load(path, weights_only=True)
    assert saved["n_iter"] == 4

    def crash(state, handle):
        handle.write(b"half a file")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(checkpoint_module.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        NMF(V.shape, rank=3).fit(V, max_iter=10, tol=0, checkpoint=path, checkpoint_every=2)
    assert torch.load(path, weights_only=True)["n_iter"] == 4
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.fixture(scope="module")
def pool():
    workers = Pool(world=2)
    yield workers
    workers.close()


@pytest.mark.parametrize("solver,beta", [("mu_extrapolated", 1), ("hals", 2)])
def test_two_processes_resume(pool, tmp_path, solver, beta):
    fit = dict(beta=beta, solver=solver, tol=0)
    path = str(tmp_path / "fit.ckpt")
    whole = pool.run(cases.checkpoint_case, path=path, fit=dict(fit, max_iter=20))
    pool.run(cases.checkpoint_case, path=path, fit=dict(fit, max_iter=12), checkpoint=path)
    assert (tmp_path / "fit.ckpt.rank0").exists() and (tmp_path / "fit.ckpt.rank1").exists()
    resumed = pool.run(cases.checkpoint_case, path=path, fit=dict(fit, max_iter=20), resume=path)
    for a, b in zip(whole, resumed):
        assert a[0] == b[0] == 20
        np.testing.assert_allclose(a[1], b[1], rtol=1e-12)
        np.testing.assert_allclose(a[2], b[2], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(a[3], b[3], rtol=1e-12, atol=1e-14)
    # and the two-process fit is the one-process fit of the stacked matrix
    reference = cases.reference_fit("dense", dict(fit, max_iter=20))
    np.testing.assert_allclose(resumed[0][2], reference[2], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("saves,rank1,message", [
    # every save is a collective: a process that saves at other iterations, or not at
    # all, must not fit with the others
    (True, dict(checkpoint=None), "rank 1 has checkpoints='none' and rank 0 has "
                                  "checkpoints='every 5 iterations'"),
    (True, dict(checkpoint_every=4), "rank 1 has checkpoints='every 4 iterations'"),
    (False, dict(resume=None), "rank 1 has resume=False and rank 0 has resume=True"),
    # rank 1's file is another fit's: every process stops, not only rank 1
    (False, dict(resume="other"), r"rank 1 refused its checkpoint \(resume=.* was "
                                  r"saved with beta=2.0, but this fit has beta=1.0"),
])
def test_two_processes_agree_on_checkpoints(pool, tmp_path, saves, rank1, message):
    path, other = str(tmp_path / "fit.ckpt"), str(tmp_path / "other.ckpt")
    fit = dict(beta=1, tol=0, max_iter=5)
    pool.run(cases.checkpoint_case, path=path, fit=fit, checkpoint=path)
    pool.run(cases.checkpoint_case, path=other, fit=dict(fit, beta=2), checkpoint=other)
    rank1 = {name: other if value == "other" else value for name, value in rank1.items()}
    options = dict(checkpoint=path) if saves else dict(resume=path)
    with pytest.raises(CaseFailed, match=r"ranks \[0, 1\] failed; ValueError: .*" + message):
        pool.run(cases.checkpoint_case, path=path, fit=dict(fit, max_iter=12), rank1=rank1,
                 **options)
    # the group is still usable
    assert pool.run(cases.checkpoint_case, path=path, fit=fit)[0][0] == 5


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_a_lost_peer_fails_within_the_timeout(tmp_path, mode):
    workers = Pool(world=2, group_timeout=60)
    try:
        path = str(tmp_path / "fit.ckpt")
        for q in workers.tasks:
            q.put((cases.fault_case, dict(mode=mode, path=path, timeout=2.0)))
        (message, waited), = workers.collect(timeout=60, ranks=[0])
    finally:
        workers.close(grace=1)
    assert "rank 0 of 2" in message and "timeout=2 s" in message, message
    assert waited < 2.0 + 5.0  # the timeout plus slack for a loaded machine
    state = torch.load(path + ".rank0", weights_only=True)
    assert state["n_iter"] == 4  # the last checkpoint every process completed
