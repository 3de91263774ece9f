"""
==============================================================
t-SNE of ESC-10 sounds through a quantized neighbours graph
==============================================================

:class:`~sklearn_hash.QuantizedNeighborsTransformer` turns the codes of a
quantizer into the sparse k-nearest-neighbours graph that scikit-learn's
estimators accept with ``metric="precomputed"``, as
:class:`~sklearn.neighbors.KNeighborsTransformer` does with exact search
(scikit-learn's example "Approximate nearest neighbors in TSNE"). Here the
graph comes from 64-bit product-quantization codes of the ESC-10 clips
(:func:`~sklearn_hash.datasets.load_esc10`, shipped with the package: 400
five-second environmental sounds of 10 classes, as YAMNet embeddings), and
:class:`~sklearn.manifold.TSNE` embeds it in two dimensions, beside the
same pipeline on the exact graph.
"""

import time

import matplotlib.pyplot as plt
import numpy as np
from sklearn.manifold import TSNE
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier, KNeighborsTransformer
from sklearn.pipeline import Pipeline

from sklearn_hash import ProductQuantizer, QuantizedNeighborsTransformer
from sklearn_hash.datasets import load_esc10

esc10 = load_esc10()
X, y = esc10.data, esc10.target
print(f"ESC-10: {X.shape[0]} clips x {X.shape[1]} YAMNet dimensions, "
      f"{len(esc10.target_names)} classes")

# %%
# Two pipelines: quantized and exact neighbours
# ---------------------------------------------
# t-SNE needs about ``3 * perplexity`` neighbours per sample; the transformer
# stores ``n_neighbors + 1`` per row (each sample is its own first neighbour).
perplexity = 10
n_neighbors = int(3 * perplexity + 1)
tsne = dict(metric="precomputed", init="random", perplexity=perplexity, max_iter=500,
            random_state=0)
pipelines = {
    "PQ codes, 64 bits": Pipeline([
        ("graph", QuantizedNeighborsTransformer(
            ProductQuantizer(n_bits=64, random_state=0), n_neighbors=n_neighbors)),
        ("tsne", TSNE(**tsne)),
    ]),
    "exact float search": Pipeline([
        ("graph", KNeighborsTransformer(n_neighbors=n_neighbors)),
        ("tsne", TSNE(**tsne)),
    ]),
}
embeddings = {}
for name, pipeline in pipelines.items():
    start = time.perf_counter()
    embeddings[name] = pipeline.fit_transform(X)
    # How well the classes stay apart in 2-D: 5-NN accuracy of the embedding.
    separation = cross_val_score(KNeighborsClassifier(5), embeddings[name], y, cv=5).mean()
    print(f"{name:>18}: {time.perf_counter() - start:.1f} s, "
          f"5-NN accuracy of the classes in 2-D {separation:.2f}")

# %%
# The embeddings, coloured by class
# ---------------------------------
fig, axes = plt.subplots(1, 2, figsize=(11, 5))
colours = plt.get_cmap("tab10")
for ax, (name, embedding) in zip(axes, embeddings.items()):
    for label, class_name in enumerate(esc10.target_names):
        points = embedding[y == label]
        ax.scatter(points[:, 0], points[:, 1], s=12, color=colours(label),
                   label=class_name.replace("_", " "))
    ax.set_title(f"t-SNE of ESC-10, {name}")
    ax.set_xticks([])
    ax.set_yticks([])
axes[1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
fig.tight_layout()
plt.show()

# %%
# The quantized graph keeps the neighbourhoods that t-SNE reads: the same
# classes form the same islands (crackling fire and rain, both broadband
# noise, lie close together in both). The graph is only as good as the
# codes: with binary hashes of few bits, many clips tie at equal Hamming
# distance and the islands blur.
print("classes:", ", ".join(np.asarray(esc10.target_names).tolist()))
