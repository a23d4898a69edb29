"""
Topics of the Python language reference
=======================================

Every Python installation ships the text of its language reference for
``help()`` (the module ``pydoc_data.topics``): about 80 sections on
statements, expressions, the data model, numbers, exceptions.  Split into
paragraphs, that is a real text collection of about a thousand documents,
available offline.  A bag-of-words matrix of it is mostly zeros, so it goes to
:class:`torchnmf.nmf.NMF` as a sparse tensor, fitted with the
Kullback-Leibler divergence (``beta=1``, the natural choice for counts)
without forming the dense matrix.  Each component is a topic: a set of words
that occur together.
"""

import matplotlib.pyplot as plt
import numpy as np
import torch
from pydoc_data.topics import topics
from sklearn.feature_extraction.text import CountVectorizer

from torchnmf.nmf import NMF

paragraphs = [
    paragraph
    for text in topics.values()
    for paragraph in text.split("\n\n")
    if len(paragraph.split()) >= 20
]
vectorizer = CountVectorizer(stop_words="english", min_df=5, max_df=0.3, token_pattern=r"\b[a-zA-Z_]{3,}\b")
counts = vectorizer.fit_transform(paragraphs)  # scipy CSR, documents x terms
vocabulary = vectorizer.get_feature_names_out()
print(f"{counts.shape[0]} paragraphs x {counts.shape[1]} terms, {counts.nnz / np.prod(counts.shape):.1%} non-zero")

# %%
# A sparse target
# ---------------
# The counts go in as a torch sparse tensor: only the non-zero entries are
# stored, and the fit evaluates the reconstruction only there.

coo = counts.tocoo()
V = torch.sparse_coo_tensor(
    np.vstack([coo.row, coo.col]),
    coo.data.astype(np.float64),
    size=coo.shape,
    check_invariants=True,
)
model = NMF(V.shape, rank=10).double().initialize_(V, "nndsvda", generator=0)
n_iter = model.fit(V, beta=1, solver="mu_extrapolated", tol=1e-5, max_iter=400)
print(f"{n_iter} iterations, KL divergence {model.loss_history[0]:.5g} -> {model.loss_history[-1]:.5g}")

# %%
# The topics
# ----------
# The heaviest words of each column of ``W``.  Without being told anything
# about Python, the factorisation separates classes and attributes, exceptions,
# numbers, strings, imports, iteration, ...

W = model.W.detach().numpy()  # (terms, topics)
fig, axes = plt.subplots(2, 5, figsize=(12, 6), layout="constrained")
for topic, ax in enumerate(axes.flat):
    top = np.argsort(-W[:, topic])[:8][::-1]
    ax.barh(vocabulary[top], W[top, topic] / W[:, topic].sum(), color=f"C{topic}")
    ax.set_title(f"topic {topic}")
    ax.tick_params(axis="y", labelsize=9)
    ax.set_xticks([])
fig.suptitle("The eight heaviest words of each topic (share of the topic's weight)")

# %%
# Which topics each section of the reference is made of
# ------------------------------------------------------
# Summing the activations of a section's paragraphs gives its mix of topics.

H = model.H.detach().numpy()
sections = [name for name, text in topics.items() for p in text.split("\n\n") if len(p.split()) >= 20]
chosen = ["class", "exceptions", "numbers", "import", "for", "strings", "specialattrs", "lambda"]
mix = np.array([H[[s == name for s in sections]].sum(0) for name in chosen])
mix /= mix.sum(1, keepdims=True)
fig, ax = plt.subplots(figsize=(8, 3.5), layout="constrained")
ax.imshow(mix, cmap="Blues", aspect="auto")
ax.set_yticks(range(len(chosen)), chosen)
ax.set_xticks(range(model.rank))
ax.set_xlabel("topic")
ax.set_title("share of each topic in a few sections of the language reference")
