"""The road for beta != 2 on real data: plain MU against MU with extrapolation.

Real targets that installed packages ship, nothing downloaded:

- ``digits``: scikit-learn's ``load_digits``, 1797 x 64 pixel counts;
- ``image``: scikit-learn's sample image ``china.jpg``, grey, every second
  pixel, 214 x 320;
- ``docs``: a document-term matrix (word counts, ``CountVectorizer`` with
  English stop words, words in at least 3 documents) of real prose: the
  paragraphs of scikit-learn's dataset descriptions and the docstrings of
  some twenty standard-library modules' public names; dense and sparse.

Each solver starts from the same NNDSVDa start and runs for ``budget`` seconds
(float64, one thread, ``tol=0``); the table gives the loss after a quarter of
the budget and at its end, divided by the best loss any of them reached in
the run.  ``mu_extrapolated (old)`` is the rule before issue 15 (shrinking
entries extrapolated too), reproduced by setting
``torchnmf.solvers.extrapolation._MIN_RATIO = 0``.
"""
import glob
import os
import time
import warnings

import numpy as np
import torch

from _common import markdown_table

import torchnmf.solvers.extrapolation as extrapolation
from torchnmf.init import initialize
from torchnmf.nmf import NMF

TITLE = "beta != 2 on real data: mu against mu_extrapolated (issue 15)"
MODULES = ("argparse", "asyncio", "bisect", "collections", "decimal", "email", "fractions",
           "heapq", "http", "inspect", "json", "logging", "random", "statistics", "string",
           "textwrap", "typing", "unittest")


def document_term_matrix():
    """Word counts of real prose shipped with scikit-learn and Python (scipy CSR)."""
    import importlib

    import sklearn
    from sklearn.feature_extraction.text import CountVectorizer

    texts = []
    descr = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "descr")
    for path in sorted(glob.glob(os.path.join(descr, "*.rst"))):
        with open(path, encoding="utf-8") as f:
            texts += [p for p in f.read().split("\n\n") if len(p) > 200]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in MODULES:
            module = importlib.import_module(module_name)
            for name in sorted(dir(module)):
                doc = getattr(getattr(module, name), "__doc__", None)
                if isinstance(doc, str) and len(doc) > 200:
                    texts.append(doc)
    return CountVectorizer(min_df=3, stop_words="english").fit_transform(texts)


def datasets():
    from sklearn.datasets import load_digits, load_sample_image

    image = load_sample_image("china.jpg").astype(np.float64).mean(2)[::2, ::2]
    docs = document_term_matrix().tocoo()
    sparse = torch.sparse_coo_tensor(
        torch.tensor(np.vstack([docs.row, docs.col]), dtype=torch.long),
        torch.tensor(docs.data, dtype=torch.float64), docs.shape,
    ).coalesce()
    return {
        "digits": torch.tensor(load_digits().data),
        "image": torch.tensor(image.copy()),
        "docs (dense)": sparse.to_dense(),
        "docs (sparse)": sparse,
    }


def _trajectory(V, W0, H0, beta, solver, budget, min_ratio):
    points = []
    model = NMF(W=W0.clone(), H=H0.clone())
    saved = extrapolation._MIN_RATIO
    extrapolation._MIN_RATIO = min_ratio
    start = time.perf_counter()

    def record(n_iter, loss):
        elapsed = time.perf_counter() - start
        points.append((elapsed, loss))
        return elapsed > budget

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(V, beta=beta, tol=0, max_iter=10**6, solver=solver, callback=record)
    finally:
        extrapolation._MIN_RATIO = saved
    return points


def _loss_at(points, t):
    losses = [loss for elapsed, loss in points if elapsed <= t]
    return losses[-1] if losses else points[0][1]


CANDIDATES = [("mu", "mu", 1.0), ("mu_extrapolated", "mu_extrapolated", 1.0),
              ("mu_extrapolated (old)", "mu_extrapolated", 0.0)]


def run(quick=False):
    torch.set_num_threads(1)
    budget = 1.0 if quick else 4.0
    ranks = (8,) if quick else (8, 16, 32)
    betas = (1,) if quick else (0.5, 1, 1.5)
    rows = []
    wins = 0
    total = 0
    for name, V in datasets().items():
        dense = V.to_dense() if V.is_sparse else V
        for rank in ranks:
            W0, H0 = initialize(dense, rank, "nndsvda", generator=0)
            for beta in betas:
                runs = {label: _trajectory(V, W0, H0, beta, solver, budget, lo)
                        for label, solver, lo in CANDIDATES}
                best = min(loss for points in runs.values() for _, loss in points)
                row = [name, rank, beta]
                for label, _, _ in CANDIDATES:
                    points = runs[label]
                    row += [f"{_loss_at(points, budget / 4) / best:.4f}",
                            f"{_loss_at(points, budget) / best:.4f}", len(points)]
                ends = {label: _loss_at(runs[label], budget) for label, _, _ in CANDIDATES}
                total += 1
                wins += ends["mu_extrapolated"] <= ends["mu"]
                rows.append(row)
    headers = ["data", "rank", "beta"]
    for label, _, _ in CANDIDATES:
        headers += [f"{label} at {budget / 4:g} s", f"at {budget:g} s", "iterations"]
    return (markdown_table(headers, rows)
            + f"\n\n`mu_extrapolated` ends at or below `mu` in {wins} of {total} problems "
              f"(loss / best loss of the three; {budget:g} s each, float64, one thread).")


if __name__ == "__main__":
    import sys

    print(run(quick="--quick" in sys.argv))
