"""
=================================================
mAP@R against the number of retrieved items R
=================================================

How the ranking quality falls as more items are retrieved, for 32-bit codes
of ITQ, PQ and DQN (10% of the labels) and for exact search: the study's
second figure. One search per method with the largest R gives every smaller
R, since the top R are a prefix of the top R_max.
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
R_values = [5, 10, 20, 50, 100, 200]
R_max = max(R_values)

# %%
# Search once per method
# ----------------------
dqn = DeepQuantizationNetwork(n_bits=32, random_state=0).fit(
    X_db, partial_labels(y_db, 0.1, random_state=0))
quantizers = {
    "ITQ": ITQ(n_bits=32, random_state=0),
    "PQ": ProductQuantizer(n_bits=32, random_state=0),
    "DQN (10% labels)": FrozenEstimator(dqn),
}
rankings = {
    name: QuantizedNeighbors(q, n_neighbors=R_max).fit(X_db).kneighbors(X_q, return_distance=False)
    for name, q in quantizers.items()
}
rankings["exact"] = NearestNeighbors(n_neighbors=R_max).fit(X_db).kneighbors(
    X_q, return_distance=False)

# %%
# mAP@R for each R
# ----------------
fig, ax = plt.subplots(figsize=(6, 4))
for name, neighbors in rankings.items():
    scores = [map_at_r_score(y_q, y_db, neighbors, R=R) for R in R_values]
    style = dict(color="k", linestyle="--") if name == "exact" else dict(marker="o")
    ax.plot(R_values, scores, label=name, **style)
    print(f"{name:>18}: " + "  ".join(f"R={R}: {s:.3f}" for R, s in zip(R_values, scores)))
ax.set_xscale("log")
ax.set_xticks(R_values, [str(R) for R in R_values])
ax.set_xlabel("R (items retrieved)")
ax.set_ylabel("mAP@R")
ax.set_title(f"32-bit codes, {title}")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
