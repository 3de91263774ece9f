"""
==============================================
Speed and memory against the database size
==============================================

Queries per second and bytes per item for exact float search, Hamming search
over 64-bit ITQ codes and ADC search over 64-bit product codes (8 codebooks
of 256 codewords), measured here, on synthetic 128-dimensional data (the
size of VGGish embeddings). Exact search is a float32 matrix product with a
partial sort, which is what a careful numpy user would write.
"""

import time

import matplotlib.pyplot as plt
import numpy as np

from sklearn_hash import ITQ, ProductQuantizer, QuantizedNeighbors

rng = np.random.default_rng(0)
D, k, n_queries = 128, 10, 200
scales = (1.0 / np.arange(1, D + 1) ** 0.5).astype(np.float32)  # a decaying spectrum
sizes = [10_000, 30_000, 100_000]
Q = rng.standard_normal((n_queries, D), dtype=np.float32) * scales


def exact_search(X_db, Q):
    d2 = (X_db**2).sum(1)[None, :] - 2 * Q @ X_db.T
    return np.argpartition(d2, k, axis=1)[:, :k]


def queries_per_second(search, repeats=3):
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        search()
        best = min(best, time.perf_counter() - start)
    return n_queries / best


speed = {"exact float32": [], "Hamming (ITQ, 64 bits)": [], "ADC (PQ, 64 bits)": []}
memory = {name: [] for name in speed}
for n in sizes:
    X_db = rng.standard_normal((n, D), dtype=np.float32) * scales
    speed["exact float32"].append(queries_per_second(lambda: exact_search(X_db, Q)))
    memory["exact float32"].append(X_db.nbytes / n)
    for name, quantizer in [("Hamming (ITQ, 64 bits)", ITQ(n_bits=64, random_state=0)),
                            ("ADC (PQ, 64 bits)", ProductQuantizer(n_bits=64, random_state=0))]:
        index = QuantizedNeighbors(quantizer, n_neighbors=k).fit(X_db)
        speed[name].append(queries_per_second(lambda: index.kneighbors(Q)))
        memory[name].append(index.codes_.nbytes / n)
    print(f"N={n:>7,}: " + ", ".join(f"{name} {speed[name][-1]:,.0f} q/s" for name in speed))

# %%
# The figure
# ----------
fig, (ax_speed, ax_memory) = plt.subplots(1, 2, figsize=(9, 3.8))
for name in speed:
    ax_speed.plot(sizes, speed[name], marker="o", label=name)
    ax_memory.plot(sizes, memory[name], marker="o", label=name)
ax_speed.set(xscale="log", yscale="log", xlabel="database size N", ylabel="queries / second")
ax_memory.set(xscale="log", yscale="log", xlabel="database size N", ylabel="bytes per item")
ax_speed.legend(fontsize=8)
ax_speed.set_title("search speed (k = 10)")
ax_memory.set_title("index memory")
fig.tight_layout()
plt.show()
