"""Long fits never produce NaN or Inf: every beta, dtype, solver and scale.

The issue asks for 10,000 iterations; these 6x5 fits are per-call overhead
(some 40 small torch calls per iteration).  The 90 fits took 315 s on one quiet
thread (10,000 iterations, all passed); the per-call savings of
``docs/benchmarks.md`` ("the long-fit sweep") cut that by a quarter (about
235 s), still over the two minutes allowed, so ``make test`` runs
``TORCHNMF_SWEEP_ITERATIONS`` (default 1,000; about 25 s) and the full sweep is
``TORCHNMF_SWEEP_ITERATIONS=10000 pytest -m slow tests/test_sweep.py``.
"""
import os
import warnings

import pytest
import torch

from torchnmf.nmf import NMF

ITERATIONS = int(os.environ.get("TORCHNMF_SWEEP_ITERATIONS", "1000"))
CASES = [
    (beta, dtype, solver, scale)
    for beta in (-1, 0, 0.5, 1, 1.5, 2, 3)
    for dtype in (torch.float32, torch.float64)
    for solver in ("mu", "mu_extrapolated") + (("hals",) if beta == 2 else ())
    for scale in (1e-6, 1.0, 1e6)
]


@pytest.mark.slow
@pytest.mark.parametrize("beta,dtype,solver,scale", CASES)
def test_long_fit_stays_finite(beta, dtype, solver, scale):
    g = torch.Generator().manual_seed(0)
    H = torch.rand(6, 2, generator=g, dtype=torch.float64)
    W = torch.rand(5, 2, generator=g, dtype=torch.float64)
    V = (scale * (H @ W.T + 0.01 * torch.rand(6, 5, generator=g, dtype=torch.float64))).to(dtype)
    model = NMF(V.shape, rank=2).to(dtype).initialize_(V, "random", generator=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(V, beta=beta, tol=0, max_iter=ITERATIONS, solver=solver)
    assert len(model.loss_history) == ITERATIONS + 1
    history = torch.tensor(model.loss_history, dtype=torch.float64)
    assert torch.isfinite(history).all() and (history >= 0).all()
    for factor in (model.H, model.W):
        assert torch.isfinite(factor).all() and (factor >= 0).all()
