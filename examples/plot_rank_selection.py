"""
Choosing a rank
===============

The rank of an NMF is a modelling choice, and the data do not state it.
Three kinds of evidence help:

- how well the model predicts entries it never saw (cross-validation with
  masks);
- how stable its components are over restarts (consensus NMF's silhouette,
  and the cophenetic correlation of the connectivity matrix);
- how much the fit improves as the rank grows.

:func:`torchnmf.selection.rank_table` computes all of them from batched
restarts, one batch per rank. The matrix here has five planted programs and
Poisson counts, so the right answer is known.
"""

import matplotlib.pyplot as plt
import torch

from torchnmf.plot import plot_rank_selection
from torchnmf.selection import rank_table

generator = torch.Generator().manual_seed(0)
n_samples, n_features, planted = 300, 120, 5

# %%
# A count matrix with five programs
# ---------------------------------
# Each program loads on its own block of features plus a few random ones; each
# sample uses a mixture of programs with one dominant.

W = 0.05 * torch.rand(n_features, planted, generator=generator, dtype=torch.float64)
for k in range(planted):
    W[24 * k : 24 * (k + 1), k] += 1.0
H = torch.rand(n_samples, planted, generator=generator, dtype=torch.float64) ** 4
H[torch.arange(n_samples), torch.randint(planted, (n_samples,), generator=generator)] += 1.0
V = torch.poisson(4.0 * H @ W.T, generator=generator)

# %%
# Statistics per rank
# -------------------
# Ten restarts per rank, Kullback-Leibler divergence (the natural choice for
# counts), and three folds of held-out entries.

table = rank_table(V, range(2, 9), n_restarts=10, beta=1, max_iter=150, n_folds=3, seed=0)
print(table.format())
print(f"suggested rank: {table.suggested} ({table.rule})")

# %%
# The figure cNMF users know
# --------------------------
# The stability falls after the planted rank, and the held-out error stops
# improving there: the extra components only fit noise.

fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
plot_rank_selection(table, ax)
ax.set_title(f"Five planted programs: rank {table.suggested} suggested")
plt.show()
