"""BetaMu (one NMF, the seed's three-layer chain) and PLCA's EM per iteration, beside NMF.fit."""
import statistics

import torch
import torch.nn as nn

from _common import low_rank_plus_noise, markdown_table, per_iteration_ms

from torchnmf.nmf import NMF
from torchnmf.plca import PLCA
from torchnmf.trainer import BetaMu

TITLE = "Trainers and PLCA (issue 3)"
BETAS = (1, 2)


def _fit(V, H0, W0, beta):
    def run(n_iter):
        NMF(W=W0, H=H0).fit(V, beta=beta, max_iter=n_iter, tol=0)
    return run


def _train(V, make_model, beta):
    def run(n_iter):
        model = make_model()
        trainer = BetaMu(model.parameters(), beta=beta)

        def closure():
            trainer.zero_grad()
            return V, model(None)

        for _ in range(n_iter):
            trainer.step(closure)
    return run


def _plca(V, H0, W0):
    def run(n_iter):
        PLCA(W=W0, H=H0).fit(V, max_iter=n_iter, tol=0)
    return run


def run(quick=False):
    # The seed's shapes (V: 1024 x 64, chain ranks 4, 10, 24), scaled up for timing.
    n, c = (1024, 64) if quick else (2048, 1024)
    ranks = (4, 10, 24)
    V = low_rank_plus_noise(n, c, ranks[-1], seed=0)
    g = torch.Generator().manual_seed(1)
    rank = ranks[-1]
    H0 = torch.rand(n, rank, generator=g)
    W0 = torch.rand(c, rank, generator=g)
    scale = float(V.mean() / (H0 @ W0.T).mean())
    W0 *= scale

    def single():
        return NMF(W=W0, H=H0)

    def chain():
        torch.manual_seed(0)
        model = nn.Sequential(
            NMF((n, ranks[1]), rank=ranks[0]), NMF(W=(ranks[2], ranks[1])), NMF(W=(c, ranks[2]))
        )
        return model

    # The machine may be shared: the methods are timed in turn, several rounds,
    # and each gets the median of its rounds, so that load changes hit all alike.
    runs = {}
    for beta in BETAS:
        runs[("fit", beta)] = _fit(V, H0, W0, beta)
        runs[("single", beta)] = _train(V, single, beta)
        runs[("chain", beta)] = _train(V, chain, beta)
    runs[("plca", 1)] = _plca(V, H0, W0)
    samples = {key: [] for key in runs}
    for _ in range(2 if quick else 3):
        for key, method in runs.items():
            samples[key].append(per_iteration_ms(method, repeats=1))
    ms = {key: statistics.median(values) for key, values in samples.items()}
    rows = []
    for beta in BETAS:
        fit, one, three = ms[("fit", beta)], ms[("single", beta)], ms[("chain", beta)]
        rows.append([f"beta={beta:g}", fit, one, one / fit, three, three / fit])
    fit_kl = ms[("fit", 1)]
    plca = ms[("plca", 1)]
    rows.append(["PLCA EM", fit_kl, plca, plca / fit_kl, "", ""])
    header = (
        f"V: {n}x{c} float32, low rank plus noise; NMF rank {rank}; chain ranks {ranks} "
        f"(the seed's deep NMF); ms per iteration (per step for BetaMu, per EM "
        f"iteration for PLCA, compared with KL NMF.fit).\n\n"
    )
    return header + markdown_table(
        ["method", "NMF.fit ms", "BetaMu on NMF ms / PLCA ms", "ratio to fit",
         "BetaMu on chain ms", "chain / fit"],
        rows,
    )
