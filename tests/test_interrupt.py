"""An interrupted fit keeps the last completed iterate and its loss_history, then re-raises."""
import pytest
import torch

import torchnmf.solvers.mu as mu_module
from conftest import low_rank
from torchnmf.init import initialize
from torchnmf.nmf import NMF


def _start(generator, scale=1.0):
    V, _, _ = low_rank(20, 12, 3, generator, noise=0.2)
    V = scale * (V + 0.05)
    W0, H0 = initialize(V, 3, "nndsvda")
    return V, W0, H0


def _reference(V, W0, H0, n_iter, **options):
    model = NMF(W=W0, H=H0)
    model.fit(V, tol=0, max_iter=n_iter, **options)
    return model


@pytest.mark.parametrize("solver,beta", [("mu", 1), ("hals", 2), ("mu_extrapolated", 1.5)])
@pytest.mark.parametrize("scale", [1.0, 1e-30])
def test_interrupt_from_the_callback(solver, beta, scale, generator):
    V, W0, H0 = _start(generator, scale)

    def stop(n_iter, loss):
        if n_iter == 5:
            raise KeyboardInterrupt

    model = NMF(W=W0, H=H0)
    with pytest.raises(KeyboardInterrupt):
        model.fit(V, beta=beta, tol=0, max_iter=50, solver=solver, callback=stop)
    reference = _reference(V, W0, H0, 5, beta=beta, solver=solver)
    assert torch.equal(model.H.detach(), reference.H.detach())
    assert torch.equal(model.W.detach(), reference.W.detach())
    assert model.loss_history == pytest.approx(reference.loss_history, rel=1e-12)


def test_interrupt_in_the_middle_of_an_iteration(generator, monkeypatch):
    """Interrupted after H but before W of the 4th iteration: the module holds the
    3rd iterate, never the half-updated one."""
    V, W0, H0 = _start(generator)
    calls = []
    update = mu_module.mu_update_

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:  # the W update of iteration 4
            raise KeyboardInterrupt
        return update(*args, **kwargs)

    monkeypatch.setattr(mu_module, "mu_update_", interrupted)
    model = NMF(W=W0, H=H0)
    with pytest.raises(KeyboardInterrupt):
        model.fit(V, beta=1, tol=0, max_iter=50)
    monkeypatch.setattr(mu_module, "mu_update_", update)
    reference = _reference(V, W0, H0, 3, beta=1)
    assert torch.equal(model.H.detach(), reference.H.detach())
    assert torch.equal(model.W.detach(), reference.W.detach())
    assert model.loss_history == pytest.approx(reference.loss_history, rel=1e-12)
    assert len(model.loss_history) == 4


@pytest.mark.parametrize("raised", [KeyboardInterrupt, RuntimeError])
def test_plca_keeps_the_history_of_an_interrupted_fit(raised, generator):
    """PLCA.fit, stopped by its callback, kept the last iterate but the previous fit's
    loss_history (NMF.fit keeps both)."""
    from torchnmf.plca import PLCA

    V = torch.rand(20, 12, generator=generator, dtype=torch.float64) + 0.1
    start = PLCA(V.shape, rank=3).double()
    model, reference = PLCA(V.shape, rank=3).double(), PLCA(V.shape, rank=3).double()
    model.load_state_dict(start.state_dict())
    reference.load_state_dict(start.state_dict())
    model.loss_history = [1.0]  # a previous fit's

    def stop(n_iter, loss):
        if n_iter == 5:
            raise raised

    with pytest.raises(raised):
        model.fit(V, tol=0, max_iter=50, callback=stop)
    reference.fit(V, tol=0, max_iter=5)
    assert torch.equal(model.W.detach(), reference.W.detach())
    expected = reference.loss_history if raised is KeyboardInterrupt else reference.loss_history[:5]
    assert model.loss_history == pytest.approx(expected, rel=1e-12)
