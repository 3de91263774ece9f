"""
=============================================================
Groups of similar sounds: DBSCAN over a quantized range graph
=============================================================

:meth:`~sklearn_hash.IVFQuantizedNeighbors.radius_neighbors_graph` gives, for
every clip, the clips within a radius: the sparse distance graph that
scikit-learn's :class:`~sklearn.cluster.DBSCAN` takes with
``metric="precomputed"``, as it takes
:meth:`~sklearn.neighbors.NearestNeighbors.radius_neighbors_graph` from
exact search. Here an inverted file of 64-bit product-quantization codes,
re-ranked by the stored vectors (``refine_factor``: the distances in the
graph are exact), builds the graph of the ESC-10 clips
(:func:`~sklearn_hash.datasets.load_esc10`, shipped with the package: 400
five-second environmental sounds of 10 classes, as YAMNet embeddings), and
DBSCAN finds the groups in it, beside DBSCAN on exact distances.
"""

import matplotlib.pyplot as plt
import numpy as np
from sklearn.cluster import DBSCAN
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors

from sklearn_hash import IVFQuantizedNeighbors, ProductQuantizer
from sklearn_hash.datasets import load_esc10

esc10 = load_esc10()
X, y = esc10.data.astype(np.float32), esc10.target
X = X - X.mean(axis=0)
X /= np.linalg.norm(X, axis=1, keepdims=True)  # unit vectors: L2 ranks as cosine does

# %%
# The radius
# ----------
# DBSCAN's ``eps``: the median distance of a clip's 5th nearest clip.
eps = float(np.median(NearestNeighbors(n_neighbors=6).fit(X).kneighbors(X)[0][:, 5]))
print(f"eps = {eps:.3f}")

# %%
# The range graph from the index
# ------------------------------
# 16 cells, each clip's 4 nearest visited; ``refine_factor=2`` takes the
# clips whose code estimate is within ``sqrt(2) * eps`` and keeps those
# whose stored vector is within ``eps``.
index = IVFQuantizedNeighbors(ProductQuantizer(n_bits=64, random_state=0), n_lists=16,
                              n_probe=4, refine_factor=2, random_state=0).fit(X)
graph = index.radius_neighbors_graph(X, radius=eps, mode="distance")
exact = NearestNeighbors(radius=eps).fit(X).radius_neighbors_graph(X, mode="distance")
same = graph.nnz == exact.nnz and abs(graph - exact).max() < 1e-6
print(f"graph: {graph.nnz} pairs within eps, {exact.nnz} by exact search "
      f"(each clip with itself included); the same graph: {same}")

# %%
# DBSCAN on both graphs
# ---------------------
labels = {
    "quantized range graph": DBSCAN(eps=eps, min_samples=5,
                                    metric="precomputed").fit_predict(graph),
    "exact distances": DBSCAN(eps=eps, min_samples=5).fit_predict(X),
}
for name, found_labels in labels.items():
    n_groups = len(set(found_labels) - {-1})
    print(f"{name}: {n_groups} groups, {np.mean(found_labels == -1):.0%} of the clips "
          f"left as noise, adjusted Rand index against the classes "
          f"{adjusted_rand_score(y, found_labels):.2f}")
agreement = adjusted_rand_score(*labels.values())
print(f"agreement of the two clusterings (adjusted Rand index): {agreement:.2f}")

# %%
# Groups against classes
# ----------------------
# Each column is a group DBSCAN found (the last: noise), each row a class;
# the shade is the share of the class's clips in the group.
fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
for ax, (name, found_labels) in zip(axes, labels.items()):
    groups = sorted(set(found_labels) - {-1}) + [-1]
    table = np.array([[np.mean(found_labels[y == c] == g) for g in groups]
                      for c in range(len(esc10.target_names))])
    ax.imshow(table, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(groups)), [str(g) if g >= 0 else "noise" for g in groups],
                  fontsize=7)
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("DBSCAN group")
axes[0].set_yticks(range(len(esc10.target_names)), esc10.target_names, fontsize=8)
fig.tight_layout()
plt.show()
