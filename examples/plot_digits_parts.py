"""
Parts of handwritten digits
===========================

NMF's classic picture: because nothing can be subtracted, the components of
images are *parts* (strokes, loops, bars) that add up, where PCA's are
whole-image patterns of positive and negative weights.  Here
:class:`torchnmf.nmf.NMF` factorises scikit-learn's bundled 8 x 8 digits
(1797 images, no download) into 16 parts, with the accelerated HALS solver
(``beta=2``) started from NNDSVDa.
"""

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA

from torchnmf.nmf import NMF

digits = load_digits()
V = torch.tensor(digits.data, dtype=torch.float64)  # (1797, 64), values 0..16
print(f"V: {tuple(V.shape)}, {int((V == 0).sum()) / V.numel():.0%} zeros")

# %%
# Fit
# ---

model = NMF(V.shape, rank=16).double().initialize_(V, "nndsvda", generator=0)
n_iter = model.fit(V, beta=2, solver="hals", tol=1e-5, max_iter=300)
relative_error = float((model().detach() - V).norm() / V.norm())
print(f"{n_iter} iterations, relative error {relative_error:.3f}")

# %%
# The parts
# ---------
# Each column of ``W`` is an 8 x 8 image; the NMF parts are localised
# strokes, the PCA components of the same rank are global patterns with
# negative weights (blue).

W = model.W.detach().numpy()  # (64, 16)
order = np.argsort(-model.H.detach().numpy().sum(0))  # most used first
pca = PCA(n_components=16, random_state=0).fit(digits.data)

fig, axes = plt.subplots(4, 9, figsize=(10, 4.8), layout="constrained")
for k in range(16):
    ax = axes[k // 4, k % 4]
    ax.imshow(W[:, order[k]].reshape(8, 8), cmap="gray_r")
    component = pca.components_[k].reshape(8, 8)
    limit = np.abs(component).max()
    axes[k // 4, 5 + k % 4].imshow(component, cmap="RdBu_r", vmin=-limit, vmax=limit)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
for ax in axes[:, 4]:
    ax.set_visible(False)
axes[0, 1].set_title("NMF parts (W)", loc="left")
axes[0, 6].set_title("PCA components", loc="left")

# %%
# A digit as a sum of parts
# -------------------------
# One digit, its reconstruction, and the four parts that carry most of it,
# each scaled by its activation.

index = 7
h = model.H.detach()[index].numpy()
top = np.argsort(-h)[:4]
fig, axes = plt.subplots(1, 6, figsize=(10, 2), layout="constrained")
axes[0].imshow(digits.images[index], cmap="gray_r")
axes[0].set_title("digit")
axes[1].imshow(model()[index].detach().numpy().reshape(8, 8), cmap="gray_r")
axes[1].set_title("= reconstruction")
for ax, r in zip(axes[2:], top):
    ax.imshow(h[r] * W[:, r].reshape(8, 8), cmap="gray_r", vmin=0, vmax=16)
    ax.set_title(f"+ part {r}")
for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
