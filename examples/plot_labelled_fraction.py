"""
===============================================
How many labels does the deep model need?
===============================================

DQN's mAP@100 at 32 bits as the labelled share of the database grows from
1% to 100% (the others are given as -1), against the unsupervised methods,
which use no labels and so are flat lines. The study's "vary the training
set size" experiment.
"""

import matplotlib.pyplot as plt
from _data import load
from sklearn.frozen import FrozenEstimator
from sklearn.neighbors import NearestNeighbors

from sklearn_hash import (
    ITQ,
    DeepQuantizationNetwork,
    ProductQuantizer,
    QuantizedNeighbors,
)
from sklearn_hash.benchmark import partial_labels
from sklearn_hash.metrics import map_at_r_score

X_db, y_db, X_q, y_q, title = load()
R = 100


def score(quantizer):
    search = QuantizedNeighbors(quantizer, n_neighbors=R).fit(X_db)
    return map_at_r_score(y_q, y_db, search.kneighbors(X_q, return_distance=False))


# %%
# DQN at each labelled share
# --------------------------
fractions = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0]
dqn_scores = []
for fraction in fractions:
    y_partial = partial_labels(y_db, fraction, random_state=0)
    dqn = DeepQuantizationNetwork(n_bits=32, random_state=0).fit(X_db, y_partial)
    dqn_scores.append(score(FrozenEstimator(dqn)))
    print(f"{fraction:>5.0%} labelled ({(y_partial != -1).sum()} rows): "
          f"mAP@{R} = {dqn_scores[-1]:.3f}")

# %%
# Flat lines: methods without labels
# ----------------------------------
flat = {
    "PQ": score(ProductQuantizer(n_bits=32, random_state=0)),
    "ITQ": score(ITQ(n_bits=32, random_state=0)),
}
exact = map_at_r_score(y_q, y_db, NearestNeighbors(n_neighbors=R).fit(X_db).kneighbors(
    X_q, return_distance=False))

fig, ax = plt.subplots(figsize=(6, 4))
ax.plot([100 * f for f in fractions], dqn_scores, marker="o", label="DQN")
for (name, value), color in zip(flat.items(), ["C1", "C2"]):
    ax.axhline(value, color=color, label=f"{name} (no labels)")
ax.axhline(exact, color="k", linestyle="--", label="exact float search")
ax.set_xscale("log")
ax.set_xticks([1, 5, 10, 25, 50, 100], ["1%", "5%", "10%", "25%", "50%", "100%"])
ax.set_xlabel("labelled share of the database")
ax.set_ylabel(f"mAP@{R}, 32 bits")
ax.set_title(title)
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
