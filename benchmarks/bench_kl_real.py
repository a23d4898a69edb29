"""The road for beta != 2 on real data: plain MU against MU with extrapolation.

Real targets that installed packages ship, nothing downloaded:

- ``digits``: scikit-learn's ``load_digits``, 1797 x 64 pixel counts;
- ``image``: scikit-learn's sample image ``china.jpg``, grey, every second
  pixel, 214 x 320;
- ``docs``: a document-term matrix (word counts, ``CountVectorizer`` with
  English stop words, words in at least 3 documents) of real prose: the
  paragraphs of scikit-learn's dataset descriptions and the docstrings of
  some twenty standard-library modules' public names, as a sparse target
  (a dense one gives the same iterates).

Each solver starts from the same NNDSVDa start and runs a fixed number of
iterations (float64, one thread, ``tol=0``); the table gives the objective of
the factors after the short and the long count (evaluated from the factors
by a callback, not read from ``loss_history``) divided by the best of all
candidates.  Iterations rather than seconds: the candidates cost about the
same per iteration (the ratio is reported), and counts do not depend on the
load of a shared machine.  Two earlier rules run beside today's:

- ``start reference``: the extrapolation compared with the objective where
  the previous iteration *started* (before the fifth session), rather than
  with the objective where its ``W`` update started;
- ``old``: that rule with shrinking entries extrapolated too (before issue
  15), reproduced by setting ``torchnmf.solvers.extrapolation._MIN_RATIO = 0``.
"""
import glob
import os
import sys
import time
import warnings

import numpy as np
import torch

from _common import markdown_table

import torchnmf.solvers.extrapolation as extrapolation
from torchnmf.init import initialize
from torchnmf.metrics import beta_div
from torchnmf.nmf import NMF
from torchnmf.solvers.registry import SOLVERS

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
        # dense gives the same iterates (tested); the sparse target is the one a
        # document-term matrix is stored as
        "docs (sparse)": sparse,
    }


class StartReference(extrapolation.ExtrapolatedMU):
    """The rule before the fifth session: the next extrapolation may reach the
    objective where this iteration started (its ``loss_history`` holds the
    extrapolated points' objectives, hence the callback below)."""

    name = "mu_extrapolated_start_reference"

    def _updated_objective(self, before):
        if self.problem.update_W:
            self._update_W()
        return before


def _run(V, dense, W0, H0, beta, solver, counts, min_ratio):
    """The objective of the factors after each count of iterations, and the
    seconds per iteration."""
    model = NMF(W=W0.clone(), H=H0.clone())
    found = {}

    def callback(n_iter, loss):
        if n_iter in counts:
            with torch.no_grad():
                found[n_iter] = float(beta_div(model(), dense, beta))

    saved = extrapolation._MIN_RATIO
    extrapolation._MIN_RATIO = min_ratio
    SOLVERS[StartReference.name] = StartReference
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            model.fit(V, beta=beta, tol=0, max_iter=max(counts), solver=solver,
                      callback=callback)
            seconds = time.perf_counter() - start
    finally:
        extrapolation._MIN_RATIO = saved
        del SOLVERS[StartReference.name]
    return [found[n] for n in counts], seconds / max(counts)


CANDIDATES = [("mu", "mu", 1.0), ("mu_extrapolated", "mu_extrapolated", 1.0),
              ("start reference", StartReference.name, 1.0),
              ("old", StartReference.name, 0.0)]


def run(quick=False):
    torch.set_num_threads(1)
    short, long = (50, 200) if quick else (100, 500)
    ranks = (8,) if quick else (8, 16, 32)
    betas = (1,) if quick else (0.5, 1, 1.5)
    rows = []
    wins = stalls = total = 0
    cost = []
    for name, V in datasets().items():
        dense = V.to_dense() if V.is_sparse else V
        for rank in ranks:
            W0, H0 = initialize(dense, rank, "nndsvda", generator=0)
            for beta in betas:
                runs = {label: _run(V, dense, W0, H0, beta, solver, (short, long), lo)
                        for label, solver, lo in CANDIDATES}
                best = min(min(ends) for ends, _ in runs.values())
                row = [name, rank, beta]
                for label, _, _ in CANDIDATES:
                    ends, _ = runs[label]
                    row += [f"{ends[0] / best:.4f}", f"{ends[1] / best:.4f}"]
                final = {label: runs[label][0][1] for label, _, _ in CANDIDATES}
                cost.append(runs["mu_extrapolated"][1] / runs["mu"][1])
                total += 1
                wins += final["mu_extrapolated"] <= final["mu"]
                stalls += final["old"] > final["mu"]
                rows.append(row)
                print(" | ".join(map(str, row)), file=sys.stderr, flush=True)
    headers = ["data", "rank", "beta"]
    for label, _, _ in CANDIDATES:
        headers += [f"{label} at {short} it", f"at {long} it"]
    cost.sort()
    return (markdown_table(headers, rows)
            + f"\n\nObjective / best objective of the four after {short} and {long} iterations "
              f"(float64, one thread, same NNDSVDa start), from the factors. `mu_extrapolated` ends "
              f"at or below `mu` in {wins} of {total} problems; the old rule ended above `mu` in {stalls}. "
              f"Seconds per iteration, `mu_extrapolated` / `mu`: median "
              f"{cost[len(cost) // 2]:.2f} (range {cost[0]:.2f} to {cost[-1]:.2f}).")


if __name__ == "__main__":
    import sys

    print(run(quick="--quick" in sys.argv))
