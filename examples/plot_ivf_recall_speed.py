"""
=======================================================
Non-exhaustive search: recall against speed by n_probe
=======================================================

:class:`~sklearn_hash.IVFQuantizedNeighbors` splits the database into cells
and visits only the ``n_probe`` cells nearest to each query. This example
sweeps ``n_probe`` on 200,000 synthetic 64-dimensional vectors drawn from
500 overlapping clusters (embeddings cluster by class, less cleanly) and plots recall@10
against exact float search beside queries per second, with exhaustive ADC
search over plain PQ codes of the same length for reference. ``n_probe``
is changed with ``set_params``, without refitting.
"""

import time

import matplotlib.pyplot as plt
import numpy as np

from sklearn_hash import IVFQuantizedNeighbors, ProductQuantizer, QuantizedNeighbors

rng = np.random.default_rng(0)
n, D, n_queries = 200_000, 64, 300
centers = 0.5 * rng.standard_normal((500, D), dtype=np.float32)  # overlapping clusters
X_db = centers[rng.integers(0, 500, n)] + 1.0 * rng.standard_normal((n, D), dtype=np.float32)
Q = centers[rng.integers(0, 500, n_queries)] + 1.0 * rng.standard_normal((n_queries, D),
                                                                          dtype=np.float32)

# The true 10 nearest neighbours, by exact float search.
d2 = (X_db**2).sum(1)[None, :] - 2 * Q @ X_db.T
truth = np.argpartition(d2, 10, axis=1)[:, :10]


def recall_at_10(indices):
    return np.mean([len(set(found) & set(true)) / 10 for found, true in zip(indices, truth)])


def timed(search):
    best = np.inf
    for _ in range(5):
        start = time.perf_counter()
        indices = search.kneighbors(Q, return_distance=False)
        best = min(best, time.perf_counter() - start)
    return n_queries / best, recall_at_10(indices)


ivf = IVFQuantizedNeighbors(ProductQuantizer(n_bits=64, random_state=0), n_lists=512,
                            random_state=0).fit(X_db)
probes = [1, 2, 4, 8, 16, 32, 64]
points = []
for n_probe in probes:
    qps, recall = timed(ivf.set_params(n_probe=n_probe))
    points.append((qps, recall))
    print(f"n_probe={n_probe:>3}: {qps:>8,.0f} q/s, recall@10 = {recall:.3f}")
flat = QuantizedNeighbors(ProductQuantizer(n_bits=64, random_state=0)).fit(X_db)
flat_qps, flat_recall = timed(flat)
print(f"exhaustive PQ: {flat_qps:,.0f} q/s, recall@10 = {flat_recall:.3f}")

# %%
# The figure
# ----------
# Each point is one ``n_probe``. Quantizing residuals to the cell centroids
# makes the codes more accurate than plain PQ codes of the same 64 bits, so
# a few probes already pass exhaustive PQ's recall, at many times its speed.
fig, ax = plt.subplots(figsize=(6, 4))
qps, recall = zip(*points)
ax.plot(recall, qps, marker="o", label="IVFQuantizedNeighbors (512 cells)")
for n_probe, x, y in zip(probes, recall, qps):
    ax.annotate(f"{n_probe}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
ax.plot([flat_recall], [flat_qps], marker="s", linestyle="", label="exhaustive PQ (ADC)")
ax.set(yscale="log", xlabel="recall@10 against exact search", ylabel="queries / second",
       title="n_probe trades speed for recall (64-bit codes)")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
