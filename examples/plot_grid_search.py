"""
=================================================
Choose the method and code length by grid search
=================================================

One :class:`~sklearn.model_selection.GridSearchCV` over the method and
``n_bits`` together, scored by mAP@R: in each split the training fold is the
database and the test fold the queries. Every method shares the ``n_bits``
parameter, so the grid is a list of one small grid per method.
"""

import matplotlib.pyplot as plt
from _data import load
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from sklearn_hash import AGH, ITQ, ProductQuantizer, QuantizedNeighbors, SpectralHashing
from sklearn_hash.metrics import make_map_at_r_scorer

X_db, y_db, _, _, title = load()
bits = [8, 16, 32]
methods = {
    "SH": SpectralHashing(),
    "ITQ": ITQ(random_state=0),
    "AGH": AGH(random_state=0),
    "PQ": ProductQuantizer(random_state=0),
}
grid = GridSearchCV(
    QuantizedNeighbors(n_neighbors=20),
    [{"quantizer": [q], "quantizer__n_bits": bits} for q in methods.values()],
    scoring=make_map_at_r_scorer(R=20),
    cv=StratifiedKFold(3, shuffle=True, random_state=0),
)
grid.fit(X_db, y_db)
print("best:", grid.best_params_, f"mAP@20 = {grid.best_score_:.3f}")

# %%
# ``cv_results_``, one line per method
# ------------------------------------
results = grid.cv_results_
fig, ax = plt.subplots(figsize=(6, 4))
for name, quantizer in methods.items():
    rows = [i for i, p in enumerate(results["params"]) if type(p["quantizer"]) is type(quantizer)]
    n_bits = [results["params"][i]["quantizer__n_bits"] for i in rows]
    mean = results["mean_test_score"][rows]
    std = results["std_test_score"][rows]
    ax.errorbar(n_bits, mean, yerr=std, marker="o", capsize=3, label=name)
ax.set_xscale("log", base=2)
ax.set_xticks(bits, [str(b) for b in bits])
ax.set_xlabel("n_bits")
ax.set_ylabel("mAP@20 (3-fold mean +- std)")
ax.set_title(title)
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
