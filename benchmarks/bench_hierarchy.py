"""Ontology-aware retrieval on ESC-50: flat against hierarchical DQN, graded metrics.

Protocol (``../shared/data/README.md``): ESC-50 YAMNet embeddings, database =
folds 2-5 (1600 clips), queries = fold 1 (400), centred and L2-normalised,
32 bits, R = 100. The label tree has two levels: the 50 classes (ids 0-49)
under ESC-50's five major categories (ids 50-54), from ``major_category``.

Scores, all tie-aware (``ties="average"`` scorers; ties matter for the
Hamming codes of SH, ITQ and AGH): fine mAP@100 (relevant = same class, the
study's "retrieved" normalisation), coarse mAP@100 (``level=1``: same major
category) and graded nDCG@100 (gain 1 for the same class, 0.5 for the same
category, 0 otherwise). Every method is scored with the full fine labels.

Rows of the table, mean +- std over 3 seeds (each seed draws its labelled
rows and its network):

- flat DQN, 10% fine labels (stratified), the others -1;
- hierarchical DQN (``hierarchy=``), the same labels;
- hierarchical DQN, the same 10% fine labels plus coarse-only labels (the
  category node, 50-54) for another 40% of the database (stratified);
- SH, ITQ, AGH, PQ (no labels) and exact float search, for reference.

::

    python benchmarks/bench_hierarchy.py               # the table (~5 min)
    # choose ancestor_similarity without fold 1: each of folds 2-5 in turn is
    # the query fold, the other three the database; 1 seed per fold
    python benchmarks/bench_hierarchy.py --validation --jobs 2
    # the same, also choosing how back-off rows enter the epochs, fresh seeds
    python benchmarks/bench_hierarchy.py --validation --values -0.7 -0.65 -0.6 \
        --backoff once balanced --seeds 2 --first-seed 2 --jobs 2
    # the weight of the ancestor term at the default a, fresh seeds again
    python benchmarks/bench_hierarchy.py --validation --values -0.6 \
        --ancestor-weights 0 0.1 0.2 0.3 --seeds 2 --first-seed 5
    # the leaf and entropy terms against the defaults of the time (listed
    # first), fresh seeds 9-11, the rule "coarse"
    python benchmarks/bench_hierarchy.py --validation --rule coarse --settings \
        a=-0.6,w=0.1,lw=0,ew=0 a=-0.5,w=0.1,lw=0.1,ew=0.05 a=-0.4,w=0.1,lw=0.1,ew=0.05 \
        a=-0.5,w=0.1,lw=0.1,ew=0.1 a=-0.6,w=0.1,lw=0,ew=0.05 --seeds 3 --first-seed 9 --jobs 2

Back-off rows (labelled at a category) enter each epoch either once, like
unlabelled rows ("once"), or repeated until they fill about as many places as
the rows with fine labels ("balanced", the package's behaviour,
``sklearn_hash._dqn._BALANCE_BACKOFF``). The switch only changes the "+ 40%
coarse-only" setting.
"""

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from joblib import Parallel, delayed
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import train_test_split
from sklearn.neighbors import NearestNeighbors

import sklearn_hash._dqn as _dqn
from sklearn_hash import (
    AGH,
    ITQ,
    DeepQuantizationNetwork,
    ProductQuantizer,
    QuantizedNeighbors,
    SpectralHashing,
)
from sklearn_hash.benchmark import partial_labels
from sklearn_hash.datasets import load_npz, retrieval_split
from sklearn_hash.metrics import (
    make_hierarchy,
    make_map_at_r_scorer,
    make_ndcg_at_r_scorer,
    map_at_r_score,
    ndcg_at_r_score,
)

torch.set_num_threads(1)
DATA = Path(os.environ.get("SKLEARN_HASH_DATA", Path(__file__).parents[1] / ".." / "shared" / "data"))
N_CLASSES = 50


VALIDATION_FOLDS = (2, 3, 4, 5)


def load(path, validation, query_fold=2):
    """(X_db, y_db, X_q, y_q, hierarchy, name): fold 1 against 2-5, or, for validation,
    ``query_fold`` against the other folds of 2-5."""
    data = load_npz(path)
    major = np.zeros(N_CLASSES, dtype=np.int64)
    major[data.target] = data.major_category
    hierarchy = make_hierarchy({c: N_CLASSES + int(major[c]) for c in range(N_CLASSES)})
    name = Path(path).name
    if validation:
        keep = data.fold != 1
        data.data, data.target, data.fold = data.data[keep], data.target[keep], data.fold[keep]
        X_db, y_db, X_q, y_q = retrieval_split(data, query_fold=query_fold)
        name += f" (validation: queries fold {query_fold}, database the other folds of 2-5)"
    else:
        X_db, y_db, X_q, y_q = retrieval_split(data, query_fold=1)
        name += " (database folds 2-5, queries fold 1)"
    return X_db.astype(np.float32), y_db, X_q.astype(np.float32), y_q, hierarchy, name


def label_settings(y_db, hierarchy, seed, coarse_fraction=0.4):
    """10% fine labels, and the same plus coarse-only labels for another share."""
    fine = partial_labels(y_db, 0.1, random_state=seed)
    unlabelled = np.flatnonzero(fine == -1)
    n_coarse = round(coarse_fraction * len(y_db))
    rows, _ = train_test_split(unlabelled, train_size=n_coarse, stratify=y_db[unlabelled],
                               random_state=seed)
    with_coarse = fine.copy()
    with_coarse[rows] = hierarchy[y_db[rows]]
    return fine, with_coarse


class Scores:
    """Fine mAP, coarse mAP and nDCG of fitted searchers, tie-aware."""

    def __init__(self, hierarchy, R):
        self.scorers = {
            "fine mAP": make_map_at_r_scorer(R, ties="average"),
            "coarse mAP": make_map_at_r_scorer(R, ties="average", hierarchy=hierarchy, level=1),
            "nDCG": make_ndcg_at_r_scorer(R, hierarchy=hierarchy, ties="average"),
        }

    def __call__(self, searcher, X_q, y_q):
        return {name: scorer(searcher, X_q, y_q) for name, scorer in self.scorers.items()}


def dqn_scores(scores, X_db, y_db, X_q, y_q, y_train, n_bits, seed, **params):
    dqn = DeepQuantizationNetwork(n_bits, random_state=seed, **params).fit(X_db, y_train)
    search = QuantizedNeighbors(FrozenEstimator(dqn), n_neighbors=100).fit(X_db, y_db)
    return scores(search, X_q, y_q)


def summarise(results):
    return {k: (np.mean([r[k] for r in results]), np.std([r[k] for r in results]))
            for k in results[0]}


def print_table(title, rows, columns=("fine mAP", "coarse mAP", "nDCG")):
    print(f"\n{title}")
    print("| method | " + " | ".join(f"{c}@100" for c in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for label, row in rows.items():
        cells = [f"{row[c][0]:.3f} +- {row[c][1]:.3f}" if row[c][1] is not None
                 else f"{row[c][0]:.3f}" for c in columns]
        print(f"| {label} | " + " | ".join(cells) + " |")


def validation_run(path, query_fold, seed, setting, a, bits, R, backoff="balanced", w=None,
                   lw=None, ew=None):
    """One validation fit: ``setting`` is "flat", "fine" or "coarse" (+ 40% coarse-only);
    ``w``, ``lw`` and ``ew`` the ancestor_weight, leaf_weight and entropy_weight (None: the
    default)."""
    torch.set_num_threads(1)
    _dqn._BALANCE_BACKOFF = backoff == "balanced"
    X_db, y_db, X_q, y_q, hierarchy, _ = load(path, validation=True, query_fold=query_fold)
    fine, with_coarse = label_settings(y_db, hierarchy, seed)
    params = {} if setting == "flat" else {"hierarchy": hierarchy, "ancestor_similarity": a}
    if setting != "flat" and w is not None:
        params["ancestor_weight"] = w
    if setting != "flat" and lw is not None:
        params["leaf_weight"] = lw
    if setting != "flat" and ew is not None:
        params["entropy_weight"] = ew
    y_train = with_coarse if setting == "coarse" else fine
    return dqn_scores(Scores(hierarchy, R), X_db, y_db, X_q, y_q, y_train, bits, seed, **params)


def validation(args):
    """Grid of ancestor_similarity (and back-off handling, term weights) on folds 2-5; a rule picks.

    Each of folds 2-5 in turn is the query fold, the other three the
    database; ``args.seeds`` seeds per fold from ``args.first_seed``.

    Rule ``--rule ndcg`` (stated before looking): among the settings (value
    of ``a``, and back-off handling and ``ancestor_weight`` when several are
    given) whose mean fine mAP@100 is at least flat DQN's - 0.01 with both
    label settings, the one with the highest mean nDCG@100 over the two
    label settings. When several ancestor weights are given, the first 0, a
    setting with a positive weight is eligible only if, in addition, its
    fine mAP@100 is at least that of weight 0 (same ``a`` and back-off
    handling) - 0.002 in both label settings: the ancestor term must not
    trade fine mAP for coarse.

    Rule ``--rule coarse`` (stated before the run that chose
    ``leaf_weight``): the first setting of the grid is the reference (the
    defaults of the time; list them first). Eligible: the settings whose
    mean fine mAP@100 is at least flat DQN's - 0.01 in both label settings
    and whose mean nDCG@100 over the two label settings is at least the
    reference's. Choice: the eligible setting with the highest mean coarse
    mAP@100 over the two label settings; the reference stays unless that
    setting beats it by at least 0.003 (a change must clear the noise of
    paired means).
    """
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    backoffs = args.backoff
    weights = args.ancestor_weights or [None]
    leaf_weights = args.leaf_weights or [None]
    entropy_weights = args.entropy_weights or [None]
    if args.settings:  # explicit settings "a=-0.6,w=0.1,lw=0,ew=0"
        grid = []
        for text in args.settings:
            values = dict(item.split("=") for item in text.split(","))
            grid.append(tuple(float(values[k]) for k in ("a", "w", "lw", "ew")))
        weights, leaf_weights, entropy_weights = ([None, None] for _ in range(3))  # label all
    else:
        grid = [(a, w, lw, ew) for a in args.values for w in weights for lw in leaf_weights
                for ew in entropy_weights]
    runs = [(q, seed, "flat", None, backoffs[0], None, None, None) for q in VALIDATION_FOLDS
            for seed in seeds]
    runs += [(q, seed, "fine", a, backoffs[0], w, lw, ew) for q in VALIDATION_FOLDS
             for seed in seeds for a, w, lw, ew in grid]
    runs += [(q, seed, "coarse", a, b, w, lw, ew) for q in VALIDATION_FOLDS for seed in seeds
             for a, w, lw, ew in grid for b in backoffs]
    results = Parallel(n_jobs=args.jobs, verbose=5)(
        delayed(validation_run)(args.data, q, seed, setting, a, args.bits, args.R, b, w, lw, ew)
        for q, seed, setting, a, b, w, lw, ew in runs)
    by_run = dict(zip(runs, results))
    flat = [r for (_, _, setting, *_), r in by_run.items() if setting == "flat"]
    fine = {(a, w, lw, ew): [by_run[q, s, "fine", a, backoffs[0], w, lw, ew]
                             for q in VALIDATION_FOLDS for s in seeds]
            for a, w, lw, ew in grid}
    coarse = {(a, b, w, lw, ew): [by_run[q, s, "coarse", a, b, w, lw, ew]
                                  for q in VALIDATION_FOLDS for s in seeds]
              for a, w, lw, ew in grid for b in backoffs}
    name = (f"{Path(args.data).name}, validation: folds 2-5, each the query fold in turn "
            f"against the other three")

    def label(a, b=None, w=None, lw=None, ew=None):
        text = f"a={a:g}"
        if b is not None and len(backoffs) > 1:
            text += f", back-off {b}"
        if len(weights) > 1:
            text += f", ancestor_weight={w:g}"
        if len(leaf_weights) > 1:
            text += f", leaf_weight={lw:g}"
        if len(entropy_weights) > 1:
            text += f", entropy_weight={ew:g}"
        return text

    rows = {"flat DQN, 10% fine": summarise(flat)}
    for a, w, lw, ew in grid:
        rows[f"hierarchical, {label(a, None, w, lw, ew)}, 10% fine"] = summarise(
            fine[a, w, lw, ew])
        for b in backoffs:
            rows[f"hierarchical, {label(a, b, w, lw, ew)}, + 40% coarse"] = summarise(
                coarse[a, b, w, lw, ew])
    print_table(f"Validation on {name}, {args.bits} bits, mean +- std over "
                f"{len(VALIDATION_FOLDS) * args.seeds} runs (seeds {seeds.start}-"
                f"{seeds.stop - 1} for each fold)", rows)
    floor = rows["flat DQN, 10% fine"]["fine mAP"][0] - 0.01
    candidates = [(a, b, w, lw, ew) for a, w, lw, ew in grid for b in backoffs]

    def both(a, b, w, lw, ew, metric):
        return (rows[f"hierarchical, {label(a, None, w, lw, ew)}, 10% fine"][metric][0],
                rows[f"hierarchical, {label(a, b, w, lw, ew)}, + 40% coarse"][metric][0])

    flat_row = rows["flat DQN, 10% fine"]
    print("\nAgainst flat DQN (coarse mAP, nDCG, fine mAP; 10% fine | + 40% coarse-only):")
    metrics = ("coarse mAP", "nDCG", "fine mAP")
    for k in candidates:
        cells = [" ".join(f"{both(*k, m)[i] - flat_row[m][0]:+.3f}" for m in metrics)
                 for i in (0, 1)]
        print(f"- {label(*k)}: {cells[0]} | {cells[1]}")
    eligible = [k for k in candidates if min(both(*k, "fine mAP")) >= floor]
    if args.rule == "coarse":
        reference = candidates[0]
        eligible = [k for k in eligible
                    if np.mean(both(*k, "nDCG")) >= np.mean(both(*reference, "nDCG"))]
        print(f"\nReference (first setting): {label(*reference)}; eligible: "
              f"{'; '.join(label(*k) for k in eligible) or 'none'} (fine mAP floor {floor:.3f})")
        if not eligible:
            print("No setting is eligible: the reference stays.")
            return
        best = max(eligible, key=lambda k: np.mean(both(*k, "coarse mAP")))
        gain = np.mean(both(*best, "coarse mAP")) - np.mean(both(*reference, "coarse mAP"))
        if best == reference or gain < 0.003:
            print(f"Rule's choice: the reference, {label(*reference)} (best other: "
                  f"{label(*best)}, coarse mAP {gain:+.4f} over it)")
        else:
            print(f"Rule's choice: {label(*best)} (coarse mAP {gain:+.4f} over the reference)")
        return
    if len(weights) > 1 and weights[0] == 0:
        eligible = [(a, b, w, lw, ew) for a, b, w, lw, ew in eligible
                    if w == 0 or all(x >= x0 - 0.002 for x, x0 in zip(
                        both(a, b, w, lw, ew, "fine mAP"), both(a, b, 0.0, lw, ew, "fine mAP")))]
    if not eligible:
        print(f"\nNo setting keeps fine mAP@100 >= flat - 0.01 = {floor:.3f}.")
        return
    best = max(eligible, key=lambda k: sum(both(*k, "nDCG")))
    print(f"\nRule's choice: {label(*best)} (eligible: "
          f"{'; '.join(label(*k) for k in eligible)}; fine mAP floor {floor:.3f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATA / "esc50_yamnet.npz"))
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--R", type=int, default=100)
    parser.add_argument("--validation", action="store_true")
    parser.add_argument("--values", type=float, nargs="+",
                        default=[-0.8, -0.7, -0.6, -0.5])
    parser.add_argument("--backoff", nargs="+", default=["balanced"],
                        choices=["once", "balanced"],
                        help="--validation: how back-off rows enter the epochs")
    parser.add_argument("--ancestor-weights", type=float, nargs="+", default=None,
                        help="--validation: ancestor_weight values (default: the default)")
    parser.add_argument("--leaf-weights", type=float, nargs="+", default=None,
                        help="--validation: leaf_weight values (default: the default)")
    parser.add_argument("--entropy-weights", type=float, nargs="+", default=None,
                        help="--validation: entropy_weight values (default: the default)")
    parser.add_argument("--settings", nargs="+", default=None,
                        help="--validation: explicit settings 'a=-0.6,w=0.1,lw=0,ew=0' (a, "
                             "ancestor_weight, leaf_weight, entropy_weight) instead of the "
                             "grid of --values and the weights")
    parser.add_argument("--rule", choices=["ndcg", "coarse"], default="ndcg",
                        help="--validation: the selection rule (see validation's docstring)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1,
                        help="validation fits in parallel (one torch thread each)")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip SH, ITQ, AGH, PQ and exact search")
    args = parser.parse_args()
    if args.validation:
        args.seeds = args.seeds or 1
        validation(args)
        return
    args.seeds = args.seeds or 3

    X_db, y_db, X_q, y_q, hierarchy, name = load(args.data, validation=False)
    scores = Scores(hierarchy, args.R)
    defaults = DeepQuantizationNetwork()
    default = (f"a={defaults.ancestor_similarity:g}, ancestor_weight={defaults.ancestor_weight:g}, "
               f"leaf_weight={defaults.leaf_weight:g}, entropy_weight={defaults.entropy_weight:g}")
    runs = {"flat DQN, 10% fine labels": [],
            f"hierarchical DQN ({default}), 10% fine labels": [],
            f"hierarchical DQN ({default}), 10% fine + 40% coarse-only": []}
    start = time.perf_counter()
    for seed in range(args.seeds):
        fine, with_coarse = label_settings(y_db, hierarchy, seed)
        for (label, results), (y_train, params) in zip(runs.items(), [
            (fine, {}), (fine, {"hierarchy": hierarchy}), (with_coarse, {"hierarchy": hierarchy}),
        ]):
            results.append(dqn_scores(scores, X_db, y_db, X_q, y_q, y_train, args.bits, seed,
                                      **params))
            print(f"  seed {seed}, {label}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in results[-1].items()), flush=True)
    rows = {label: summarise(results) for label, results in runs.items()}
    if not args.no_reference:
        for label, make in [("SH", lambda s: SpectralHashing(args.bits)),
                            ("ITQ", lambda s: ITQ(args.bits, random_state=s)),
                            ("AGH", lambda s: AGH(args.bits, random_state=s)),
                            ("PQ (no labels)", lambda s: ProductQuantizer(args.bits, random_state=s))]:
            results = []
            for seed in range(args.seeds):
                search = QuantizedNeighbors(make(seed), n_neighbors=100).fit(X_db, y_db)
                results.append(scores(search, X_q, y_q))
            rows[label] = summarise(results)
        exact = NearestNeighbors(n_neighbors=args.R).fit(X_db)
        distances, neighbors = exact.kneighbors(X_q)
        rows["exact float search"] = {
            "fine mAP": (map_at_r_score(y_q, y_db, neighbors, distances=distances), None),
            "coarse mAP": (map_at_r_score(y_q, y_db, neighbors, distances=distances,
                                          hierarchy=hierarchy, level=1), None),
            "nDCG": (ndcg_at_r_score(y_q, y_db, neighbors, hierarchy=hierarchy,
                                     distances=distances), None),
        }
    print_table(f"{name}, {args.bits} bits, tie-aware, mean +- std over {args.seeds} seeds "
                f"({time.perf_counter() - start:.0f} s)", rows)
    flat = rows["flat DQN, 10% fine labels"]
    print("\nAgainst flat DQN (10% fine labels):")
    for label in list(runs)[1:]:
        row = rows[label]
        print(f"- {label}: coarse mAP {row['coarse mAP'][0] - flat['coarse mAP'][0]:+.4f}, "
              f"nDCG {row['nDCG'][0] - flat['nDCG'][0]:+.4f}, "
              f"fine mAP {row['fine mAP'][0] - flat['fine mAP'][0]:+.4f}")


if __name__ == "__main__":
    main()
