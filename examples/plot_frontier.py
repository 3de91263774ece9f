"""
=====================================================================
The recall/speed frontier: code length, OPQ and exact re-ranking
=====================================================================

Real embeddings have skewed spectra: after PCA, one direction of YAMNet's
embeddings carries most of the variance. This example draws 50,000 vectors
of 128 dimensions with such a spectrum (a random rotation of a decaying
spectrum, in clusters), and plots, for
:class:`~sklearn_hash.IVFQuantizedNeighbors` with 256 cells, recall@10
against queries per second as ``n_probe`` grows, for

- 128-bit PQ codes alone,
- 128-bit OPQ codes (a learned rotation before PQ), and
- the same OPQ codes re-ranked exactly (``refine_factor=8``: 80 candidates
  from the codes, re-ordered by L2 distance to the stored vectors), and
- 256-bit codes of 4-bit PQ (64 subspaces of 16 codewords) re-ranked
  (``refine_factor=4``): with 16 codewords the cells are scanned by
  fast-scan (8-bit tables in SIMD registers as a lossless filter), so twice
  the bits cost about what 128 bits of 8-bit codes do, and
- the same, re-ranked by rows of a byte per feature
  (``refine_storage="sq8"``: each vector's residual to its cell centroid,
  132 bytes instead of 512), whose distances are approximate.

Re-ranking is what lifts recall towards 1: the codes only need to put the
true neighbours among the candidates. ``n_probe`` and ``refine_factor`` are
given per call, without refitting. The full comparison beside faiss and
hnswlib on a million vectors is ``benchmarks/bench_frontier.py``.
"""

import time

import matplotlib.pyplot as plt
import numpy as np

from sklearn_hash import OPQ, IVFQuantizedNeighbors, ProductQuantizer

rng = np.random.default_rng(0)
n, D, n_queries = 50_000, 128, 300
basis = np.linalg.qr(rng.standard_normal((D, D)))[0]
spectrum = np.geomspace(15.0, 0.3, D)  # a skewed spectrum, as real embeddings have
centers = 0.5 * rng.standard_normal((200, D)) * spectrum


def draw(m):
    rows = centers[rng.integers(0, 200, m)] + rng.standard_normal((m, D)) * spectrum
    return (rows @ basis.T).astype(np.float32)


X_db, Q = draw(n), draw(n_queries)

# The true 10 nearest neighbours, by exact float search.
d2 = (X_db**2).sum(1)[None, :] - 2 * Q @ X_db.T
truth = np.argpartition(d2, 10, axis=1)[:, :10]


def recall_at_10(indices):
    return np.mean([len(set(found) & set(true)) / 10 for found, true in zip(indices, truth)])


def sweep(search, **params):
    points = []
    for n_probe in (1, 2, 4, 8, 16, 32):
        best = np.inf
        for _ in range(3):
            start = time.perf_counter()
            indices = search.kneighbors(Q, n_probe=n_probe, return_distance=False, **params)
            best = min(best, time.perf_counter() - start)
        points.append((n_queries / best, recall_at_10(indices)))
    return points


common = dict(n_lists=256, n_neighbors=10, random_state=0)
pq = IVFQuantizedNeighbors(ProductQuantizer(n_bits=128, random_state=0), **common).fit(X_db)
opq = IVFQuantizedNeighbors(OPQ(n_bits=128, n_iter=3, random_state=0), refine_factor=8,
                            **common).fit(X_db)
pq4 = IVFQuantizedNeighbors(ProductQuantizer(n_bits=256, subspace_bits=4, random_state=0),
                            refine_factor=4, **common).fit(X_db)
pq4_sq8 = IVFQuantizedNeighbors(ProductQuantizer(n_bits=256, subspace_bits=4, random_state=0),
                                refine_factor=4, refine_storage="sq8", **common).fit(X_db)
curves = {
    "PQ, 128 bits": sweep(pq),
    "OPQ, 128 bits": sweep(opq.set_params(refine_factor=None)),
    "OPQ, 128 bits, re-ranked (refine_factor=8)": sweep(opq, refine_factor=8),
    "PQ 64x4 bits, fast-scan, re-ranked (refine_factor=4)": sweep(pq4),
    "the same, re-ranked by 8-bit rows (refine_storage='sq8')": sweep(pq4_sq8),
}

# %%
# Recall against speed
# --------------------
# Each point is one ``n_probe`` (1 to 32 of 256 cells); up and right is
# better.

fig, ax = plt.subplots(figsize=(6.5, 4.2))
for label, points in curves.items():
    qps, recall = zip(*points)
    ax.plot(recall, qps, "o-", label=label)
ax.set_xlabel("recall@10 against exact search")
ax.set_ylabel("queries per second")
ax.set_yscale("log")
ax.set_title(f"{n:,} x {D}, skewed spectrum, 256 cells")
ax.legend()
fig.tight_layout()
plt.show()

for label, points in curves.items():
    print(f"{label}: " + ", ".join(f"{r:.2f} at {q:,.0f} q/s" for q, r in points))
