"""
Filling in missing pixels with a mask
=====================================

A third of the pixels of a photograph are hidden.  Fitting NMF with a
``mask`` uses only the observed pixels; the low-rank reconstruction then
predicts the hidden ones.  The image is scikit-learn's bundled ``china.jpg``
in grey levels at half resolution (no download), treated as a 214 x 320
non-negative matrix (rows as samples, columns as features).
"""

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_sample_image

from torchnmf.nmf import NMF

image = load_sample_image("china.jpg").mean(axis=2)[::2, ::2] / 255.0  # (214, 320) in [0, 1]
V = torch.tensor(image, dtype=torch.float32)
generator = torch.Generator().manual_seed(0)
observed = torch.rand(V.shape, generator=generator) > 1 / 3  # True where the pixel is known
print(f"V: {tuple(V.shape)}, {float(observed.float().mean()):.0%} of the pixels observed")

# %%
# Fit on the observed pixels only
# -------------------------------
# The values under ``mask=False`` are never read, so zeros, noise or NaN
# there make no difference.  ``beta=2``, rank 20, 200 iterations of the
# extrapolated multiplicative updates (every solver takes a mask).

damaged = V.masked_fill(~observed, 0.0)
model = NMF(V.shape, rank=20).initialize_(damaged, "nndsvda", generator=0)
n_iter = model.fit(damaged, beta=2, mask=observed, solver="mu_extrapolated", tol=0, max_iter=200)
filled = model().detach().clamp(0, 1)


def rmse(a, b, where):
    return float(((a - b)[where] ** 2).mean().sqrt())


print(f"{n_iter} iterations")
print(f"error on the observed pixels: {rmse(filled, V, observed):.4f}")
print(f"error on the hidden pixels:   {rmse(filled, V, ~observed):.4f}")

# %%
# Compare with the simplest guess, the mean of the known pixels of each row:

row_means = (damaged.sum(1, keepdim=True) / observed.sum(1, keepdim=True)).expand_as(V)
print(f"row means on the hidden pixels: {rmse(row_means, V, ~observed):.4f}")

# %%
# The picture
# -----------

shown = damaged.clone()
fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), layout="constrained")
axes[0].imshow(V, cmap="gray", vmin=0, vmax=1)
axes[0].set_title("original")
axes[1].imshow(np.ma.masked_array(shown.numpy(), ~observed.numpy()), cmap="gray", vmin=0, vmax=1)
axes[1].set_facecolor("tab:red")
axes[1].set_title("observed (hidden pixels in red)")
axes[2].imshow(torch.where(observed, V, filled), cmap="gray", vmin=0, vmax=1)
axes[2].set_title("hidden pixels filled by NMF")
for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])

# %%
# The objective counts observed entries only; it decreases at every iteration.

fig, ax = plt.subplots(figsize=(5, 3), layout="constrained")
ax.semilogy(model.loss_history)
ax.set_xlabel("iteration")
ax.set_ylabel("masked objective")
