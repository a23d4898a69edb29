"""The fitting loop: read-backs of the objective from an accelerator, with a stand-in device."""
import math

import pytest
import torch

from torchnmf.nmf import NMF, NMFD
from torchnmf import _device as device
from torchnmf.solvers import loop


@pytest.fixture
def device_stand_in(monkeypatch):
    """Every tensor counts as living on an accelerator (the loop and the solvers take
    their device paths); the loop's read-backs are counted."""
    reads = []
    real_read_back = loop._read_back

    def counted(losses):
        reads.append(len(losses))
        return real_read_back(losses)

    monkeypatch.setattr(device, "on_accelerator", lambda t: isinstance(t, torch.Tensor))
    monkeypatch.setattr(loop, "_read_back", counted)
    return reads


def decreasing_steps(values):
    """A ``step`` returning the given objectives as 0-dim tensors, one per call."""
    iterator = iter(values)
    return lambda: torch.tensor(next(iterator), dtype=torch.float64)


def test_cpu_loop_never_defers(monkeypatch):
    calls = []
    monkeypatch.setattr(loop, "_read_back", lambda losses: calls.append(losses))
    n_iter, history = loop.run_fit(decreasing_steps([5.0, 4.0, 3.0]), lambda: 2.0, 0, 3)
    assert calls == [] and n_iter == 3 and history == [5.0, 4.0, 3.0, 2.0]


def test_objectives_are_read_back_every_few_iterations(device_stand_in):
    steps = decreasing_steps([100.0 - k for k in range(25)])
    n_iter, history = loop.run_fit(steps, lambda: 0.5, 0, 25)
    assert device_stand_in == [10, 10, 5]
    assert n_iter == 25 and history == [100.0 - k for k in range(25)] + [0.5]


def test_a_stop_is_decided_at_the_read_back(device_stand_in):
    # the relative decrease falls under tol at iteration 5 (2.9 -> 2.8999)
    values = [10.0, 5.0, 3.0, 2.9, 2.8999, 2.8998] + [2.8997 - 1e-5 * k for k in range(20)]
    cpu_values = iter(values)
    cpu_n_iter, cpu_history = loop.run_fit(lambda: next(cpu_values), lambda: 1.0, 0.01, 30)
    assert cpu_n_iter == 5 and cpu_history == values[:5] + [1.0]
    n_iter, history = loop.run_fit(decreasing_steps(values), lambda: 1.0, 0.01, 30)
    assert device_stand_in == [10]
    assert n_iter == 10 and history == values[:10] + [1.0]  # complete: every iteration run


def test_a_callback_reads_every_iteration(device_stand_in):
    seen = []
    n_iter, _ = loop.run_fit(
        decreasing_steps([9.0, 8.0, 7.0, 6.0]), lambda: 5.0, 0, 4,
        callback=lambda n, loss: seen.append((n, loss)) or n == 3,
    )
    assert device_stand_in == [1, 1, 1] and n_iter == 3
    assert seen == [(1, 9.0), (2, 8.0), (3, 7.0)]


def test_a_non_finite_objective_is_refused_at_the_read_back(device_stand_in):
    with pytest.raises(FloatingPointError, match="the objective was nan after 2 iterations"):
        loop.run_fit(decreasing_steps([3.0, 2.0, math.nan, 1.0]), lambda: 0.0, 0, 4)
    assert device_stand_in == [4]


@pytest.mark.parametrize("solver", ["mu", "mu_extrapolated", "hals"])
def test_fits_keep_their_history_with_deferred_read_backs(solver, device_stand_in, generator):
    V = torch.rand(12, 9, generator=generator, dtype=torch.float64) + 0.1
    torch.manual_seed(0)
    model = NMF(V.shape, rank=3).double()
    reference = NMF(V.shape, rank=3).double()
    reference.load_state_dict(model.state_dict())
    beta = 2 if solver == "hals" else 1
    model.fit(V, beta=beta, max_iter=23, tol=0, solver=solver, alpha=0.1)
    reads = list(device_stand_in)
    device_stand_in.clear()
    reference.fit(V, beta=beta, max_iter=23, tol=0, solver=solver, alpha=0.1, callback=lambda n, l: False)
    assert model.loss_history == reference.loss_history
    assert reads == [10, 10, 3] and device_stand_in == [1] * 23
    history = torch.tensor(model.loss_history)
    assert (history[1:] <= history[:-1]).all()


@pytest.fixture
def reads_in_steps(monkeypatch):
    """Counts the host reads of a tensor (float, bool, int, item, tolist, numpy) made
    inside a solver's ``step``: each would synchronise with an accelerator."""
    from torchnmf.solvers.alternating import AlternatingSolver
    from torchnmf.solvers.mu import MultiplicativeUpdates

    state = {"inside": False, "reads": []}
    for name in ("__float__", "__bool__", "__int__", "__index__", "item", "tolist", "numpy"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            if state["inside"]:
                state["reads"].append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for cls in (AlternatingSolver, MultiplicativeUpdates):
        real_step = cls.step

        def step(self, _real=real_step):
            state["inside"] = True
            try:
                return _real(self)
            finally:
                state["inside"] = False

        monkeypatch.setattr(cls, "step", step)
    return state["reads"]


@pytest.mark.parametrize("solver,beta", [("mu", 1), ("mu_extrapolated", 1), ("mu_extrapolated", 2),
                                         ("hals", 2)])
@pytest.mark.parametrize("penalty,fixed", [(0.0, None), (0.1, None), (0.0, [1])])
def test_no_read_back_inside_an_iteration(solver, beta, penalty, fixed, device_stand_in,
                                          reads_in_steps, generator):
    """On an accelerator an iteration queues its kernels without reading anything back:
    the extrapolation's accept/reject, HALS's inner sweeps and the objective all stay on
    the device, and the loop reads the objectives once every ten iterations."""
    V = torch.rand(30, 20, generator=generator, dtype=torch.float64) + 0.1
    torch.manual_seed(0)
    model = NMF(V.shape, rank=4).double()
    model.fit(V, beta=beta, max_iter=25, tol=1e-12, solver=solver, alpha=penalty, l1_ratio=0.5,
              fixed_W=fixed)
    assert reads_in_steps == []
    assert device_stand_in == [10, 10, 5]
    history = torch.tensor(model.loss_history)
    assert (history[1:] <= history[:-1]).all()


def test_a_refused_extrapolation_on_the_device_skips_its_h_update(device_stand_in, generator):
    """The device path's refusal: the factors go back to where the last update ended,
    that point's W update runs, and the objective returned is the kept point's."""
    from torchnmf.solvers.extrapolation import ExtrapolatedMU
    from torchnmf.solvers.problem import FitProblem
    from torchnmf.targets.dense import DenseMatrixStats

    V = torch.rand(12, 9, generator=generator, dtype=torch.float64) + 0.1
    H = torch.rand(12, 3, generator=generator, dtype=torch.float64)
    W = torch.rand(9, 3, generator=generator, dtype=torch.float64)
    problem = FitProblem(DenseMatrixStats(V, 1), H, W, 1)
    solver = ExtrapolatedMU(problem)
    solver.step()
    kept_H, kept_W = H.clone(), W.clone()
    solver.reference = torch.tensor(0.0, dtype=torch.float64)  # any extrapolation is refused
    weight = float(solver.weight.weight)
    before = solver.step()
    assert torch.equal(H, kept_H)
    expected_W = kept_W.clone()
    negative, positive = problem.stats.w_terms(kept_H, kept_W)
    from torchnmf.solvers.mu import mu_update_

    mu_update_(expected_W, negative, positive, 1)
    torch.testing.assert_close(W, expected_W)
    torch.testing.assert_close(before, problem.stats.divergence(kept_H, kept_W).double())
    assert float(solver.weight.weight) == pytest.approx(weight / solver.weight.decay)


def test_convolutional_fit_reads_back_every_ten_iterations(device_stand_in, generator):
    V = torch.rand(1, 4, 20, generator=generator, dtype=torch.float64) + 0.1
    model = NMFD(V.shape, rank=2, T=3).double()
    n_iter = model.fit(V, beta=1, max_iter=30, tol=0)
    assert n_iter == 30 and device_stand_in == [10, 10, 10] and len(model.loss_history) == 31


def test_multiplicative_updates_flush_entries_that_would_turn_subnormal():
    from torchnmf.solvers.mu import mu_update_

    tiny = torch.finfo(torch.float32).tiny
    factor = torch.tensor([[1.0, 1e-15], [1e-20, 2.0], [1e-30, 3e-30]])
    negative = torch.ones(3, 2)
    positive = torch.ones(3, 2)
    mu_update_(factor.clone(), negative.clone(), positive, 1)
    out = mu_update_(factor.clone(), negative.clone(), positive, 1)
    assert out.tolist() == [[1.0, pytest.approx(1e-15)], [0.0, 2.0], [0.0, 0.0]]
    kept = mu_update_(factor.clone(), negative.clone(), positive, 1, fixed=torch.tensor([1]))
    assert kept[:, 1].tolist() == factor[:, 1].tolist() and kept[2, 0] == 0
    assert not ((kept > 0) & (kept < tiny ** 0.5))[:, 0].any()


def test_digits_fit_keeps_no_subnormal_entries():
    """A real dataset where KL updates drive many entries to zero (scikit-learn's digits)."""
    datasets = pytest.importorskip("sklearn.datasets")
    V = torch.tensor(datasets.load_digits().data, dtype=torch.float32)
    torch.manual_seed(0)
    model = NMF(V.shape, rank=16)
    model.fit(V, beta=1, max_iter=150, tol=0)
    history = torch.tensor(model.loss_history)
    assert (history[1:] <= history[:-1] * (1 + 1e-6)).all()
    tiny = torch.finfo(torch.float32).tiny
    for factor in (model.H.detach(), model.W.detach()):
        assert not ((factor > 0) & (factor < tiny)).any()
        assert (factor == 0).any()  # the flushed entries


@pytest.mark.parametrize("solver,beta", [("mu_extrapolated", 1), ("hals", 2)])
def test_a_host_decision_on_the_device_keeps_the_cpu_iterates(solver, beta, monkeypatch,
                                                              generator):
    """With ``refuse_on_device = False`` the device path reads each accept/reject back
    (one read per iteration) and follows the CPU's iterates exactly."""
    from torchnmf.solvers.alternating import AlternatingSolver

    V = torch.rand(30, 20, generator=generator, dtype=torch.float64) + 0.1
    torch.manual_seed(0)
    cpu = NMF(V.shape, rank=4).double()
    stand_in = NMF(V.shape, rank=4).double()
    stand_in.load_state_dict(cpu.state_dict())
    cpu.fit(V, beta=beta, max_iter=40, tol=0, solver=solver)
    monkeypatch.setattr(device, "on_accelerator", lambda t: isinstance(t, torch.Tensor))
    monkeypatch.setattr(AlternatingSolver, "refuse_on_device", False)
    stand_in.fit(V, beta=beta, max_iter=40, tol=0, solver=solver)
    assert stand_in.loss_history == pytest.approx(cpu.loss_history, rel=1e-12)
    torch.testing.assert_close(stand_in.W, cpu.W)


@pytest.mark.parametrize("solver,beta", [("mu", 1), ("mu_extrapolated", 1), ("hals", 2)])
def test_batched_fits_read_back_every_ten_iterations(solver, beta, device_stand_in,
                                                     reads_in_steps, generator):
    """Restarts on an accelerator: no read inside an iteration (each member's
    extrapolation and HALS's sweeps decided on the device), the members' objectives
    read back together every ten iterations; plain MU, which decides nothing, keeps
    the CPU's iterates."""
    from torchnmf.restarts import fit_restarts

    V = torch.rand(30, 20, generator=generator, dtype=torch.float64) + 0.1
    result = fit_restarts(V, 3, n_restarts=3, beta=beta, max_iter=25, tol=0, solver=solver)
    assert reads_in_steps == []
    assert device_stand_in == [10, 10, 5]
    assert result.n_iter == [25, 25, 25]
    for history in result.histories:
        assert len(history) == 26
        history = torch.tensor(history)
        assert (history[1:] <= history[:-1] * (1 + 1e-12)).all()
    if solver == "mu":
        with pytest.MonkeyPatch.context() as cpu:
            cpu.setattr(device, "on_accelerator", lambda t: False)
            reference = fit_restarts(V, 3, n_restarts=3, beta=beta, max_iter=25, tol=0,
                                     solver=solver)
        for history, cpu_history in zip(result.histories, reference.histories):
            assert history == pytest.approx(cpu_history, rel=1e-12)


def test_batched_members_stop_at_the_read_back(device_stand_in, generator):
    """A member that meets ``tol`` runs on to the next read-back, as one fit does,
    with its history complete; the CPU stops it at once."""
    from torchnmf.restarts import fit_restarts

    V = torch.rand(30, 20, generator=generator, dtype=torch.float64) + 0.1
    kwargs = dict(n_restarts=3, beta=1, max_iter=60, tol=1e-3, solver="mu")
    result = fit_restarts(V, 3, **kwargs)
    with pytest.MonkeyPatch.context() as cpu:
        cpu.setattr(device, "on_accelerator", lambda t: False)
        reference = fit_restarts(V, 3, **kwargs)
    assert all(n < 60 for n in reference.n_iter)
    for n, cpu_n, history, cpu_history in zip(result.n_iter, reference.n_iter,
                                             result.histories, reference.histories):
        assert n == 10 * math.ceil(cpu_n / 10) and len(history) == n + 1
        assert history[:cpu_n] == pytest.approx(cpu_history[:cpu_n], rel=1e-12)
