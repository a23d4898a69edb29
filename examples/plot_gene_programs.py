"""
Gene programs in a single-cell count matrix
===========================================

Single-cell RNA sequencing measures, for each cell, how many molecules of
each gene were caught: a sparse count matrix, cells x genes.  Its structure is
often described by *gene programs*: sets of genes used together, some marking
a cell type, some an activity that cells of any type share (division, stress).
NMF of the counts recovers them as components, with ``W`` the programs
(genes) and ``H`` their usage by each cell.

The matrix here is synthetic, so the planted programs are known: four
cell-type programs, one activity program used by a third of the cells, Poisson
counts at realistic depths (most entries zero).
"""

import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from torchnmf.nmf import NMF

rng = np.random.default_rng(0)
n_cells, n_genes, n_types = 800, 300, 4

# %%
# Planting programs
# -----------------
# Each cell-type program loads on its own block of 50 genes plus a few shared
# ones; the activity program on 30 genes of its own.  A cell uses its type's
# program, perhaps the activity program, and a little of everything
# (background); its library size (total counts) varies ten-fold around 150.

programs = np.full((n_genes, n_types + 1), 0.02)
for k in range(n_types):
    programs[50 * k : 50 * (k + 1), k] += rng.gamma(2.0, 1.0, 50)
programs[200:230, n_types] += rng.gamma(2.0, 1.0, 30)
programs[rng.choice(n_genes, 40, replace=False), :n_types] += rng.gamma(1.0, 0.5, (40, n_types))
programs /= programs.sum(0)

cell_type = rng.integers(0, n_types, n_cells)
usage = np.zeros((n_cells, n_types + 1))
usage[np.arange(n_cells), cell_type] = 1.0
active = rng.random(n_cells) < 1 / 3
usage[active, n_types] = rng.uniform(0.3, 0.8, active.sum())
library = rng.lognormal(np.log(150), 0.6, n_cells)
rates = library[:, None] * (usage / usage.sum(1, keepdims=True)) @ programs.T
counts = rng.poisson(rates)
print(f"{n_cells} cells x {n_genes} genes, {(counts == 0).mean():.0%} zeros, "
      f"median {np.median(counts.sum(1)):.0f} counts per cell")

# %%
# The fit
# -------
# Counts call for the Kullback-Leibler divergence (``beta=1``, Poisson
# likelihood); the matrix goes in as a sparse tensor.

V = torch.tensor(counts, dtype=torch.float64).to_sparse()
model = NMF(V.shape, rank=n_types + 1).double().initialize_(V, "nndsvda", generator=0)
n_iter = model.fit(V, beta=1, solver="mu_extrapolated", tol=1e-6, max_iter=500)
print(f"{n_iter} iterations")

# %%
# Matching found programs to planted ones
# ---------------------------------------
# NMF's components come in no particular order and scale.  Normalise each
# program to sum to one and pair found with planted programs by their cosine
# similarity.

W = model.W.detach().numpy()
W = W / W.sum(0)
unit = lambda x: x / np.linalg.norm(x, axis=0)  # noqa: E731
similarity = unit(programs).T @ unit(W)
planted_index, found_index = linear_sum_assignment(-similarity)
W = W[:, found_index]
H = model.H.detach().numpy()[:, found_index]
for k in range(n_types + 1):
    name = f"cell type {k}" if k < n_types else "activity"
    print(f"{name:>11s}: cosine similarity {similarity[k, found_index[k]]:.3f}")

# %%
# Programs and their usage
# ------------------------
# Left, the planted programs beside the found ones (genes down, programs
# across); right, each cell's usage of the found programs, cells sorted by
# type, the activity program's usage in the last column.

names = [f"type {k}" for k in range(n_types)] + ["activity"]
order = np.lexsort((~active, cell_type))
fig, axes = plt.subplots(1, 3, figsize=(11, 5), layout="constrained", width_ratios=(1, 1, 1.4))
axes[0].imshow(programs, aspect="auto", cmap="viridis", interpolation="nearest")
axes[0].set_title("planted programs")
axes[1].imshow(W, aspect="auto", cmap="viridis", interpolation="nearest")
axes[1].set_title("found programs (W)")
for ax in axes[:2]:
    ax.set_xticks(range(n_types + 1), names, rotation=45, ha="right")
axes[0].set_ylabel("gene")
axes[1].set_yticks([])
usage_shown = H[order] / H[order].sum(1, keepdims=True)
image = axes[2].imshow(usage_shown, aspect="auto", cmap="magma", interpolation="nearest")
axes[2].set_xticks(range(n_types + 1), names, rotation=45, ha="right")
axes[2].set_ylabel("cell (sorted by type)")
axes[2].set_title("usage per cell (H, rows summing to 1)")
fig.colorbar(image, ax=axes[2], shrink=0.6)

# %%
# The activity program is found in the right cells: its usage separates the
# cells where it was planted from the others, whatever their type.

fig, ax = plt.subplots(figsize=(6, 3), layout="constrained")
share = H[:, n_types] / H.sum(1)
bins = np.linspace(0, share.max(), 40)
ax.hist(share[~active], bins, alpha=0.7, label="activity not planted")
ax.hist(share[active], bins, alpha=0.7, label="activity planted")
ax.set_xlabel("share of the activity program in the cell's usage")
ax.set_ylabel("cells")
ax.legend()
