"""
=====================================
Compare every method across code size
=====================================

mAP@100 of every method at 8, 16, 32 and 64 bits on the same database and
queries, with exact float (cosine) search as the dashed line it approaches.
The unsupervised methods (SH, ITQ, AGH, PQ) see no labels; DQN sees the
labels of 10% of the database, like the study this package follows.
"""

# %%
# Data
# ----
# ESC-50 YAMNet clip embeddings (database folds 2-5, queries fold 1), or
# ``load_digits`` when the file is not there.
import matplotlib.pyplot as plt
from _data import load

from sklearn_hash.benchmark import run

X_db, y_db, X_q, y_q, title = load()

# %%
# One table
# ---------
# :func:`sklearn_hash.benchmark.run` fits each method on the database, indexes
# it with :class:`~sklearn_hash.QuantizedNeighbors` and scores the queries.
bits = [8, 16, 32, 64]
methods = ["SH", "ITQ", "AGH", "PQ", "DQN"]
results = run(X_db, y_db, X_q, y_q, methods=methods, bits=bits, R=100, labelled_fraction=0.1)

# %%
# The figure
# ----------
fig, ax = plt.subplots(figsize=(6, 4))
for method in methods:
    scores = [results[method][b] for b in bits]
    ax.plot(bits, scores, marker="o", label=method + (" (10% labels)" if method == "DQN" else ""))
ax.axhline(results["exact"], color="k", linestyle="--", label="exact float search")
ax.set_xscale("log", base=2)
ax.set_xticks(bits, [str(b) for b in bits])
ax.set_xlabel("code length (bits)")
ax.set_ylabel("mAP@100")
ax.set_title(title)
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
