import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

from conftest import low_rank
from torchnmf.metrics import beta_div, sparseness
from torchnmf.nmf import NMF, NMFD
from torchnmf.trainer import BetaMu, SparsityProj

BETAS = [0, 0.5, 1, 1.5, 2, 3]


def positive_target(generator, n=12, c=9, rank=3):
    V, _, _ = low_rank(n, c, rank, generator, noise=0.3)
    return V + 0.05


def chain(n, c, dtype=torch.float64):
    return nn.Sequential(NMF((n, 5), rank=2), NMF(W=(4, 5)), NMF(W=(c, 4))).to(dtype)


class TwoPaths(nn.Module):
    """A user's module: a sum of two factorisations sharing H."""

    def __init__(self, n, c):
        super().__init__()
        self.H = nn.Parameter(torch.rand(n, 3, dtype=torch.float64))
        self.A = nn.Parameter(torch.rand(c, 3, dtype=torch.float64))
        self.B = nn.Parameter(torch.rand(c, 3, dtype=torch.float64))

    def forward(self, _=None):
        return self.H @ self.A.T + (self.H * 2) @ self.B.T


@pytest.mark.slow
def test_seed_deep_nmf_example_runs_and_reduces_the_divergence():
    torch.manual_seed(0)
    V = torch.rand(64, 1024)
    model = nn.Sequential(NMF((1024, 10), rank=4), NMF(W=(24, 10)), NMF(W=(64, 24)))
    start = beta_div(model(None), V.t(), 1)
    trainer = BetaMu(model.parameters())
    epochs = 200
    for e in range(epochs):
        def closure():
            trainer.zero_grad()
            return V.t(), model(None)
        trainer.step(closure)
    end = beta_div(model(None), V.t(), 1)
    assert end < start / 100
    assert all((p >= 0).all() for p in model.parameters())


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("make", ["single", "chain", "nmfd", "user"])
@pytest.mark.parametrize("scale", [1, 1e-7, 1e7])
def test_grad_matches_autograd(generator, beta, make, scale):
    """The divergence returned and the gradients stored are the caller's problem's,
    also for a target far from unit scale (the step works on a normalised one)."""
    if make == "nmfd":
        V = torch.rand(2, 4, 10, generator=generator, dtype=torch.float64) + 0.05
        model = nn.Sequential(NMFD(V.shape, rank=2, T=3).double())
    else:
        V = positive_target(generator)
        model = {"single": lambda: NMF(V.shape, rank=3).double(), "chain": lambda: chain(12, 9),
                 "user": lambda: TwoPaths(12, 9)}[make]()
    V = V * scale
    params = list(model.parameters())
    start = [p.detach().clone() for p in params]
    trainer = BetaMu(params, beta=beta)

    def closure():
        trainer.zero_grad()
        return V, model(None)

    divergence = trainer.step(closure)
    assert_close(divergence, beta_div(_eval(model, params, start), V, beta))
    after = [p.detach().clone() for p in params]
    # Parameter i is updated at the point where parameters < i already moved.
    for i, p in enumerate(params):
        with torch.no_grad():
            for j, (q, a, s) in enumerate(zip(params, after, start)):
                q.copy_(a if j < i else s)
        loss = beta_div(model(None), V, beta)
        expected, = torch.autograd.grad(loss, p)
        with torch.no_grad():
            for q, a in zip(params, after):
                q.copy_(a)
        assert_close(p.grad, expected, rtol=1e-9, atol=1e-11)
        assert (p >= 0).all()


def _digits(rows=100):
    """Real data: scikit-learn's bundled handwritten digits, 8x8 images as rows (float32)."""
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().data[:rows], dtype=torch.float32)


def _real_model(make, V):
    torch.manual_seed(0)
    n, c = V.shape
    if make == "nmfd":  # the images' 64 pixels as channels, the images as time
        return nn.Sequential(NMFD((1, c, n), rank=3, T=3))
    if make == "chain":
        return nn.Sequential(NMF((n, 5), rank=3), NMF(W=(c, 5)))
    return NMF((n, c), rank=4)


def _target(make, V):
    return V.T.unsqueeze(0) if make == "nmfd" else V


def _scaled_model(make, V, scale_of):
    """``_real_model`` with each of its ``m`` parameters times ``scale_of(m)``;
    returns ``(model, params)``."""
    model = _real_model(make, V)
    params = list(model.parameters())
    with torch.no_grad():
        for p in params:
            p.mul_(scale_of(len(params)))
    return model, params


@pytest.mark.parametrize("make", ["single", "chain", "nmfd"])
@pytest.mark.parametrize("beta", [0, 0.5, 1, 2])
@pytest.mark.parametrize("k", [-12, 12])
def test_power_of_two_targets_give_identical_steps(make, beta, k):
    """Real data in float32: with the target times 2**(m k) and each of the m
    parameters times 2**k, every step is the unscaled one's, scaled exactly.
    Without the normalisation, the prediction's floor at the dtype's epsilon (and
    the positive part's) sat at another place relative to the data."""
    V = _digits() + (1 if beta == 0 else 0)
    runs = []
    for power in (0, k):
        model, params = _scaled_model(make, V, lambda m: 2.0 ** power)
        target = _target(make, V) * 2.0 ** (power * len(params))
        trainer = BetaMu(params, beta=beta)
        values = [trainer.step(lambda: (target, model(None))) for _ in range(6)]
        runs.append((torch.stack(values), [p.detach().clone() for p in params],
                     [p.grad.clone() for p in params]))
    (values, params, grads), (values_k, params_k, grads_k) = runs
    m = len(params)
    assert torch.equal(values_k, values * 2.0 ** (k * m * beta))
    for i, (a, b) in enumerate(zip(params, params_k)):
        assert torch.equal(b, a * 2.0 ** k)
    for a, b in zip(grads, grads_k):
        # each gradient carries the objective's scale over its parameter's
        assert torch.equal(b, a * 2.0 ** (k * (m * beta - 1)))


@pytest.mark.parametrize("make", ["single", "chain"])
@pytest.mark.parametrize("beta", [0.5, 1, 2])
@pytest.mark.parametrize("scale", [1e-9, 1e9])
def test_any_target_scale_fits_like_unit_scale(make, beta, scale):
    """Real data in float32, 40 steps: a target of 1e-9 or 1e9 times the digits, from
    the start scaled to match, reaches the unscaled divergence times scale**beta
    (at 1e-9 the fit used to end at a hundred to a thousand times that)."""
    V = _digits()
    results = []
    for factor in (1.0, scale):
        model, params = _scaled_model(make, V, lambda m: factor ** (1 / m))
        target = V * factor
        trainer = BetaMu(params, beta=beta)
        for _ in range(40):
            value = trainer.step(lambda: (target, model(None)))
        results.append(float(value) / factor**beta)
    assert results[1] == pytest.approx(results[0], rel=1e-3)


def _eval(model, params, values):
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
        out = model(None)
        for p, v in zip(params, saved):
            p.copy_(v)
    return out


@pytest.mark.parametrize("beta", [0.5, 1, 2, 3])
@pytest.mark.parametrize("alpha, l1_ratio", [(0, 0), (0.3, 0.5)])
@pytest.mark.parametrize("scale", [1, 1e-4, 1e4])
def test_same_iterates_as_fit(generator, beta, alpha, l1_ratio, scale):
    """Updating H then W, BetaMu takes exactly fit's multiplicative steps, also on a
    target far from unit scale (both normalise it, and transform the penalties)."""
    V = positive_target(generator) * scale
    fitted = NMF(V.shape, rank=3).double()
    trained = NMF(W=fitted.W.detach(), H=fitted.H.detach())
    fitted.fit(V, beta=beta, max_iter=5, tol=0, alpha=alpha, l1_ratio=l1_ratio)
    trainer = BetaMu([trained.H, trained.W], beta=beta, l1_reg=alpha * l1_ratio,
                     l2_reg=alpha * (1 - l1_ratio))
    for _ in range(5):
        trainer.step(lambda: (V, trained()))
    assert_close(trained.W, fitted.W)
    assert_close(trained.H, fitted.H)


def _counting_generic_route(monkeypatch):
    """Count the generic route's vector-Jacobian splits inside the trainer."""
    import torchnmf.trainer as trainer_module

    calls = []
    original = trainer_module.beta_gradient_parts

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "beta_gradient_parts", counted)
    return calls


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("penalties", [{}, dict(l1_reg=0.1, l2_reg=0.2, orthogonal=0.05)])
@pytest.mark.parametrize("order", ["W, H", "H, W", "H only"])
@pytest.mark.parametrize("scale", [1, 1e-5])
def test_single_nmf_takes_the_closed_form_route(monkeypatch, generator, beta, penalties, order,
                                                scale):
    """On one NMF's own output, BetaMu uses fit's statistics: no vector-Jacobian
    products, and the same parameters, gradients and divergences as the generic route
    (which the same prediction times one takes), at any scale of the target (where
    the two routes normalise differently: by H on the matrix route)."""
    V = positive_target(generator) * scale
    start = NMF(V.shape, rank=3).double()
    calls = _counting_generic_route(monkeypatch)
    results = []
    for route in ("closed form", "generic"):
        model = NMF(W=start.W.detach(), H=start.H.detach())
        params = {"W, H": [model.W, model.H], "H, W": [model.H, model.W],
                  "H only": [model.H]}[order]
        trainer = BetaMu(params, beta=beta, **penalties)
        divergences = []
        for _ in range(4):
            def closure():
                trainer.zero_grad()
                out = model()
                return V, (out if route == "closed form" else out * 1)
            divergences.append(trainer.step(closure))
        results.append((torch.stack(divergences), [p.detach().clone() for p in params],
                        [p.grad for p in params]))
        if route == "closed form":
            assert calls == []
    assert len(calls) == 4 * len(params)
    (div_a, params_a, grads_a), (div_b, params_b, grads_b) = results
    assert_close(div_a, div_b, rtol=1e-12, atol=1e-12)
    for a, b in zip(params_a + grads_a, params_b + grads_b):
        assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert all((p >= 0).all() for p in params_a)


def test_closed_form_route_only_for_the_unmodified_reconstruction(monkeypatch, generator):
    V = positive_target(generator)
    model = NMF(V.shape, rank=3).double()
    calls = _counting_generic_route(monkeypatch)
    trainer = BetaMu(model.parameters(), beta=2)

    def edited():
        out = model()
        return V, out.add_(0.0)  # modified after the forward: no longer the recorded tensor

    trainer.step(edited)
    assert len(calls) == 2
    # a chain's last layer is an NMF, but its H is another layer's output, not a parameter
    net = chain(12, 9)
    BetaMu(net.parameters(), beta=2).step(lambda: (V, net(None)))
    assert len(calls) == 2 + 4


@pytest.mark.parametrize("target", ["parameter", "detached", "clone"])
def test_a_target_made_of_the_factors_takes_the_generic_route(target):
    """A target that is (a view of) a factor, or computed from one, changes with
    each update; the generic route evaluates the closure again before each, the
    closed form used its one evaluation for both factors: the same model stepped
    to a different point from the second step on."""
    g = torch.Generator().manual_seed(0)
    W, H = (torch.rand(8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    make = {"parameter": lambda m: m.W, "detached": lambda m: m.W.detach(),
            "clone": lambda m: m.W.clone()}[target]
    values = []
    for route in ("closed form", "generic"):
        model = NMF(W=W, H=H)
        trainer = BetaMu(model.parameters(), beta=1)
        values.append([trainer.step(lambda: (make(model), model() if route == "closed form"
                                             else model() * 1)) for _ in range(3)])
        values.append(model.W.detach())
    assert_close(values[0], values[2])
    assert_close(values[1], values[3])


@pytest.mark.parametrize("route", ["closed form", "generic"])
def test_returned_divergence_is_the_first_groups_beta_when_it_trains_nothing(generator, route):
    """The step returns the divergence of the first group's beta; with that group
    frozen and one NMF trained in a group of another beta, the closed form returned
    the trained group's (KL, where the generic route gave the Euclidean)."""
    V = positive_target(generator)
    model = NMF(V.shape, rank=3).double()
    frozen = nn.Parameter(torch.rand(3, dtype=torch.float64), requires_grad=False)
    trainer = BetaMu([{"params": [frozen], "beta": 2}, {"params": [model.H, model.W], "beta": 1}])
    before = model().detach()
    value = trainer.step(lambda: (V, model() if route == "closed form" else model() * 1))
    assert_close(value, beta_div(before, V, 2))


def test_provenance_records_follow_versions():
    from torchnmf.models.provenance import _RECORDS, matrix_factors_of

    model = NMF((5, 4), rank=2)
    out = model()
    assert matrix_factors_of(out) == (model.H, model.W)
    assert matrix_factors_of(out * 1) is None
    with torch.no_grad():
        assert matrix_factors_of(model()) is None  # not recorded without gradients
        model.H.mul_(2)
    assert matrix_factors_of(out) is None
    key = id(out)
    del out
    assert key not in _RECORDS


@pytest.mark.slow  # importing dynamo takes seconds; the compilation itself a fraction of one
def test_compiled_nmf_compiles_once_and_trains_like_eager(generator):
    """Under torch.compile the forward recorded its output by id, so every call
    recompiled it (until dynamo's recompile limit, with a warning) and
    fullgraph=True failed; the compiled model's steps (generic route) are eager's."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    V = positive_target(generator)
    model = NMF(V.shape, rank=3).double()
    twin = NMF(W=model.W.detach(), H=model.H.detach())
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    trainer, eager = BetaMu(model.parameters(), beta=1), BetaMu(twin.parameters(), beta=1)
    for _ in range(4):
        assert_close(trainer.step(lambda: (V, compiled())), eager.step(lambda: (V, twin())))
    assert counter.frame_count == 1
    assert_close(model.W, twin.W)
    assert_close(model.H, twin.H)
    torch._dynamo.reset()


def test_fixed_and_unused_parameters_are_left_alone(generator):
    V = positive_target(generator)
    W0 = torch.rand(9, 3, generator=generator, dtype=torch.float64)
    model = NMF(V.shape, rank=3, W=W0, trainable_W=False).double()
    unused = nn.Parameter(torch.rand(4, dtype=torch.float64))
    trainer = BetaMu(list(model.parameters()) + [unused])
    before = unused.detach().clone()
    trainer.step(lambda: (V, model()))
    assert torch.equal(model.W.detach(), W0) and model.W.grad is None
    assert torch.equal(unused.detach(), before) and unused.grad is None
    assert model.H.grad is not None


def test_divergence_decreases_on_compositions(generator):
    V = positive_target(generator, n=20, c=15)
    for model in (chain(20, 15), TwoPaths(20, 15)):
        trainer = BetaMu(model.parameters(), beta=1)
        values = [float(trainer.step(lambda: (V, model(None)))) for _ in range(60)]
        assert all(b <= a * (1 + 1e-9) for a, b in zip(values, values[1:]))
        assert values[-1] < values[0] / 2


def overlap(H):
    unit = H / H.norm(dim=0)
    gram = unit.T @ unit
    return float(gram.sum() - gram.diagonal().sum())


def test_orthogonal_penalty_reduces_overlap(generator):
    V = positive_target(generator, n=30, c=12, rank=3)
    torch.manual_seed(1)
    plain = NMF(V.shape, rank=3).double()
    ortho = NMF(W=plain.W.detach(), H=plain.H.detach())
    results = {}
    for name, model, weight in (("plain", plain, 0.0), ("ortho", ortho, 1.0)):
        trainer = BetaMu([model.H, model.W], beta=2, orthogonal=weight)
        values = []
        for _ in range(200):
            trainer.step(lambda: (V, model()))
            H = model.H.detach()
            penalty = weight / 2 * float(H.sum(1).pow(2).sum() - H.pow(2).sum())
            W = model.W.detach()
            penalty += weight / 2 * float(W.sum(1).pow(2).sum() - W.pow(2).sum())
            values.append(float(beta_div(model().detach(), V, 2)) + penalty)
        results[name] = (overlap(model.H.detach()) + overlap(model.W.detach()), values)
    assert results["ortho"][0] < 0.6 * results["plain"][0]
    values = results["ortho"][1]  # divergence + penalty: non-increasing here
    assert all(b <= a * (1 + 1e-9) for a, b in zip(values, values[1:]))


def test_state_dict_round_trip(generator):
    V = positive_target(generator)
    model = NMF(V.shape, rank=3).double()
    trainer = BetaMu(model.parameters(), beta=1.5, l1_reg=0.1, orthogonal=0.2)
    for _ in range(3):
        trainer.step(lambda: (V, model()))
    state = trainer.state_dict()
    clone = NMF(W=model.W.detach(), H=model.H.detach())
    restored = BetaMu(clone.parameters())
    restored.load_state_dict(state)
    assert restored.param_groups[0]["beta"] == 1.5 and restored.param_groups[0]["orthogonal"] == 0.2
    assert restored.state[clone.W]["step"] == 3
    trainer.step(lambda: (V, model()))
    restored.step(lambda: (V, clone()))
    assert_close(clone.W, model.W)
    assert_close(clone.H, model.H)


@pytest.mark.parametrize("route", ["closed form", "generic"])
def test_copied_and_pickled_trainers_keep_stepping(generator, route):
    import copy
    import pickle

    V = positive_target(generator)
    model = NMF(V.shape, rank=3).double()
    trainer = BetaMu(model.parameters(), beta=2)

    def closure():
        out = model()
        return V, out if route == "closed form" else out * 1

    first = trainer.step(closure)
    for clone in (copy.deepcopy(trainer), pickle.loads(pickle.dumps(trainer))):
        assert clone.state_dict()["state"] == trainer.state_dict()["state"]
        assert clone._cached_stats is None
    # a deep copy owns copies of the parameters: step a copy of the model with it
    twin = copy.deepcopy((model, trainer))
    twin_model, twin_trainer = twin
    after = twin_trainer.step(lambda: (V, twin_model() if route == "closed form"
                                       else twin_model() * 1))
    assert after < first
    assert_close(after, trainer.step(closure))


def test_betamu_errors(generator):
    V = positive_target(generator)
    model = NMF(V.shape, rank=3).double()
    for name in ("l1_reg", "l2_reg", "orthogonal"):
        with pytest.raises(ValueError, match=f"{name} must be non-negative, got -1.0"):
            BetaMu(model.parameters(), **{name: -1})
    with pytest.raises(TypeError, match="beta must be a real number"):
        BetaMu(model.parameters(), beta="kl")
    trainer = BetaMu(model.parameters())
    with pytest.raises(TypeError, match="step needs a closure returning \\(target, prediction\\)"):
        trainer.step(None)
    with pytest.raises(TypeError, match="must return \\(target, prediction\\), got Tensor"):
        trainer.step(lambda: model())
    with pytest.raises(TypeError, match="got tuple of length 3"):
        trainer.step(lambda: (V, model(), V))
    with pytest.raises(TypeError, match="target is a ndarray"):
        trainer.step(lambda: (V.numpy(), model()))
    with pytest.raises(ValueError, match="same shape, got \\(9, 12\\) and \\(12, 9\\)"):
        trainer.step(lambda: (V.T, model()))
    with pytest.raises(ValueError, match="does not depend on any trainable parameter"):
        trainer.step(lambda: (V, model().detach()))
    with pytest.raises(ValueError, match="target must be non-negative"):
        trainer.step(lambda: (-V, model()))
    with pytest.raises(ValueError, match="target contains NaN"):
        trainer.step(lambda: (V.masked_fill(V > 0.5, float("nan")), model()))
    with pytest.raises(TypeError, match="BetaMu needs a dense target, got layout torch.sparse_coo"):
        trainer.step(lambda: (V.to_sparse(), model()))
    chained = chain(12, 9)
    start = [p.detach().clone() for p in chained.parameters()]

    def backward_inside():  # torch.optim's closure idiom: ended in autograd's RuntimeError
        prediction = chained(None)
        beta_div(prediction, V, 1).backward()
        return V, prediction

    with pytest.raises(ValueError, match="must return \\(target, prediction\\) without calling"):
        BetaMu(chained.parameters()).step(backward_inside)
    assert all(torch.equal(p.detach(), p0) for p, p0 in zip(chained.parameters(), start))
    zeros = V.clone()
    zeros[0, 0] = 0
    with pytest.raises(ValueError, match="beta=0 needs a strictly positive target"):
        BetaMu(model.parameters(), beta=0).step(lambda: (zeros, model()))


@pytest.mark.parametrize("route", ["closed form", "generic"])
def test_betamu_refuses_a_negative_or_nan_prediction_before_any_update(generator, route):
    """A prediction with a subtraction (``model() - 1``) sent W to 1e14 and H to 1e-18
    in one step, a NaN one (a parameter gone NaN) made every parameter NaN; both
    returned a number.  Now a ValueError, with the parameters as they were."""
    V = positive_target(generator)
    model = NMF(V.shape, rank=3).double()
    trainer = BetaMu(model.parameters(), beta=1)
    start = [p.detach().clone() for p in model.parameters()]
    edits = {"negative": lambda out: out - 1, "nan": lambda out: out * float("nan"),
             "infinite": lambda out: out * float("inf")}
    messages = {"negative": "prediction must be non-negative, but its smallest entry is",
                "nan": "prediction contains NaN", "infinite": "prediction contains infinite"}
    def prediction():
        return model() if route == "closed form" else model() * 1

    for kind, edit in edits.items():
        with pytest.raises(ValueError, match=messages[kind]):
            trainer.step(lambda: (V, edit(prediction())))
        for p, p0 in zip(model.parameters(), start):
            assert torch.equal(p.detach(), p0)
    zeros = model().detach().clone()  # exact zeros in the prediction are fine
    with torch.no_grad():
        model.H[0] = 0
    trainer.step(lambda: (zeros, prediction()))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_betamu_refuses_a_signed_parameter_before_any_update(generator):
    """A signed parameter (nn.Linear's start) under a non-negative prediction had its
    negative entries set to zero by the first update, silently."""
    V = positive_target(generator)
    model = NMF(V.shape, rank=3).double()
    signed = nn.Parameter(torch.randn(12, 9, generator=generator, dtype=torch.float64))
    trainer = BetaMu([model.H, model.W, signed], beta=1)
    start = [p.detach().clone() for p in (model.H, model.W, signed)]
    with pytest.raises(ValueError, match="the parameter of shape \\(12, 9\\) must be "
                                         "non-negative, but its smallest entry is -"):
        trainer.step(lambda: (V, model() + nn.functional.softplus(signed)))
    for p, p0 in zip((model.H, model.W, signed), start):
        assert torch.equal(p.detach(), p0)


def test_group_added_after_a_step_checks_the_target_for_its_beta(generator):
    """The target's check was cached on the first group's beta alone: a group of
    beta=0 added (or a second group's beta set to 0) after a step took a target with
    zeros silently."""
    V = positive_target(generator)
    V[0, 0] = 0
    model = NMF(V.shape, rank=3).double()
    trainer = BetaMu([model.W], beta=1)
    trainer.step(lambda: (V, model()))
    trainer.add_param_group({"params": [model.H], "beta": 0})
    H = model.H.detach().clone()
    with pytest.raises(ValueError, match="beta=0 needs a strictly positive target"):
        trainer.step(lambda: (V, model()))
    assert torch.equal(model.H.detach(), H)
    trainer.param_groups[1]["beta"] = 1
    trainer.step(lambda: (V, model()))
    trainer.param_groups[1]["beta"] = -0.5
    with pytest.raises(ValueError, match="beta=-0.5 needs a strictly positive target"):
        trainer.step(lambda: (V, model()))


# -- SparsityProj ------------------------------------------------------------------
def test_sparsity_proj_reaches_target_and_never_increases(generator):
    V, _, _ = low_rank(30, 20, 3, generator, noise=0.1)
    model = NMF(V.shape, rank=3).double()
    mu = BetaMu([model.H], beta=2)
    proj = SparsityProj([model.W], sparsity=0.6)
    values = []
    for _ in range(40):
        mu.step(lambda: (V, model()))
        values.append(float(proj.step(lambda: beta_div(model(), V, 2))))
    for r in range(3):
        assert abs(float(sparseness(model.W[:, r].detach())) - 0.6) < 1e-8
    assert (model.W >= 0).all()
    assert values[-1] < values[0]
    # The projection step alone never increases the loss.
    before = float(beta_div(model().detach(), V, 2))
    proj.step(lambda: beta_div(model(), V, 2))
    assert float(beta_div(model(), V, 2)) <= before
    assert model.W.grad is not None and "step_size" in proj.state[model.W]


def test_sparsity_proj_along_another_dim(generator):
    p = nn.Parameter(torch.rand(4, 10, generator=generator, dtype=torch.float64))
    target = torch.rand(4, 10, generator=generator, dtype=torch.float64)
    proj = SparsityProj([p], sparsity=0.5, dim=0)
    proj.step(lambda: (p - target).pow(2).sum())
    for row in p.detach():
        assert abs(float(sparseness(row)) - 0.5) < 1e-8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparsity_proj_started_at_a_stationary_point_still_learns(generator, dtype):
    """A zero gradient at the first step gave the parameter a step size of
    |X| / tiny (inf in float64, 1e38 in float32): every later step was refused
    (float64) or refused for many steps, and the loss stayed where it was."""
    from torchnmf.solvers.sparseness import project_components_

    p = nn.Parameter(torch.rand(4, 10, generator=generator, dtype=dtype) * 10)
    with torch.no_grad():
        project_components_(p, 0.5, dim=0)
    fitted = p.detach().clone()
    proj = SparsityProj([p], sparsity=0.5, dim=0)
    assert float(proj.step(lambda: (p - fitted).pow(2).sum())) == 0
    target = torch.rand(4, 10, generator=generator, dtype=dtype)
    first = float(proj.step(lambda: (p - target).pow(2).sum()))
    second = float(proj.step(lambda: (p - target).pow(2).sum()))
    assert second < 0.1 * first
    assert 0 < proj.state[p]["step_size"] < 10
    for row in p.detach():
        assert abs(float(sparseness(row)) - 0.5) < 1e-5


def test_sparsity_proj_errors(generator):
    model = NMF((10, 6), rank=2)
    for bad in (0, 1, 1.2):
        with pytest.raises(ValueError, match="sparsity must lie strictly between 0 and 1"):
            SparsityProj(model.parameters(), sparsity=bad)
    with pytest.raises(ValueError, match="max_iter must be a positive integer, got 0"):
        SparsityProj(model.parameters(), sparsity=0.5, max_iter=0)
    with pytest.raises(ValueError, match="dim must index a dimension"):
        SparsityProj(model.parameters(), sparsity=0.5, dim=2)
    with pytest.raises(ValueError, match="components of at least 2 entries"):
        SparsityProj([nn.Parameter(torch.rand(1, 3))], sparsity=0.5)
    proj = SparsityProj(model.parameters(), sparsity=0.5)
    with pytest.raises(TypeError, match="single-element tensor, got tuple"):
        proj.step(lambda: (model(), model()))
    with pytest.raises(ValueError, match="does not depend on any trainable parameter"):
        proj.step(lambda: model().sum().detach())

    def backward_inside():  # torch.optim's closure idiom: ended in autograd's RuntimeError
        loss = model().sum()
        loss.backward()
        return loss

    W = model.W.detach().clone()
    with pytest.raises(ValueError, match="must return the loss without calling"):
        proj.step(backward_inside)
    assert torch.equal(model.W.detach(), W)


@pytest.mark.parametrize("beta", [1e-6, 0.001, 0.999])
@pytest.mark.parametrize("chained", [False, True])
def test_returned_divergence_at_beta_near_zero_and_one(beta, chained):
    """Near beta 0 or 1 the closed form's terms dwarf their sum: on the digits in
    float32 the value a step returned was 93% off at beta=1e-6 (a chain) and 0.009%
    at 0.001 (one NMF).  It is now the prediction's divergence to 1e-5."""
    from sklearn.datasets import load_digits

    from torchnmf.targets.residual import pointwise_divergence

    V = torch.tensor(load_digits().data[:300], dtype=torch.float32) + 0.1
    g = torch.Generator().manual_seed(0)
    if chained:
        model = nn.Sequential(NMF(W=torch.rand(16, 6, generator=g)), NMF(W=torch.rand(64, 16, generator=g)))
        model[0].H = nn.Parameter(torch.rand(300, 6, generator=g))
    else:
        model = NMF(W=torch.rand(64, 6, generator=g), H=torch.rand(300, 6, generator=g))
    trainer = BetaMu(model.parameters(), beta=beta)
    for _ in range(8):
        with torch.no_grad():
            prediction = model(None).double().clamp_min(torch.finfo(torch.float32).eps)
        true = float(pointwise_divergence(V.double(), prediction, beta).sum())
        assert float(trainer.step(lambda: (V, model(None)))) == pytest.approx(true, rel=1e-5)


@pytest.mark.parametrize("accelerator", [False, True])
def test_prediction_checks_on_an_accelerator_only_at_the_first_step(monkeypatch, accelerator):
    """Each check of the prediction reads a value back; on an accelerator (here a
    stand-in) that is a synchronisation the steps avoid, so only the first is checked."""
    import torchnmf.trainer as trainer_module

    checked = []
    original = trainer_module.check_non_negative_tensor

    def counted(tensor, name, *args, **kwargs):
        checked.append(name)
        return original(tensor, name, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "check_non_negative_tensor", counted)
    monkeypatch.setattr(trainer_module.device, "on_accelerator", lambda tensor: accelerator)
    V = torch.rand(20, 6, dtype=torch.float64) + 0.1
    model = NMF(V.shape, rank=2).double()
    optimizer = BetaMu(model.parameters(), beta=1)
    for _ in range(3):
        optimizer.step(lambda: (V, model()))
    assert checked.count("prediction") == (1 if accelerator else 3)
