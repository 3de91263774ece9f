"""The main job: a retrieval comparison table, mAP@R by method and code length.

Run ``python -m sklearn_hash.benchmark`` for the embedded default dataset
(scikit-learn's ``load_digits``), or give an ``.npz`` file holding ``X`` and
``y`` (and optionally ``fold``)::

    python -m sklearn_hash.benchmark --data ../shared/data/esc50_yamnet.npz

Protocol: with a ``fold`` array, the rows of ``--query-fold`` are the queries
and all other rows the database (ESC-50: fold 1 against folds 2-5); without
one, a stratified 20% of the rows are the queries. Vectors are centred on the
database mean and L2-normalised. Every method is fitted on the database only;
the supervised one (DQN) sees the labels of a stratified
``--labelled-fraction`` of the database (10% by default, the others given as
-1). Each query retrieves its R nearest database items and is scored by
mAP@R (relevant = same class, all database labels). The table goes to
standard output, progress to standard error. DQN needs torch and skorch (the
``deep`` extra); without them its row is left out, with a note.
"""

import argparse
import sys
import time

import numpy as np
from sklearn.datasets import load_digits
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import train_test_split
from sklearn.neighbors import NearestNeighbors

from ._agh import AGH
from ._dqn import DeepQuantizationNetwork
from ._dqn import _torch_available as _has_torch
from ._itq import ITQ
from ._neighbors import QuantizedNeighbors
from ._pq import ProductQuantizer
from ._spectral import SpectralHashing
from .metrics import map_at_r_score

#: Methods of the table: name -> factory(n_bits, random_state) of a quantizer.
METHODS = {
    "SH": lambda n_bits, seed: SpectralHashing(n_bits),
    "ITQ": lambda n_bits, seed: ITQ(n_bits, random_state=seed),
    "AGH": lambda n_bits, seed: AGH(n_bits, random_state=seed),
    "AGH-2": lambda n_bits, seed: AGH(n_bits, n_layers=2, random_state=seed),
    "PQ": lambda n_bits, seed: ProductQuantizer(n_bits, random_state=seed),
    "DQN": lambda n_bits, seed: DeepQuantizationNetwork(n_bits, random_state=seed),
}
#: Methods fitted on partial labels (-1 for the unlabelled database rows).
SUPERVISED = {"DQN"}
DEFAULT_BITS = (8, 16, 24, 32, 64)


def load_retrieval_split(path=None, *, query_fold=1, random_state=0):
    """Database and queries of a dataset, centred and L2-normalised.

    Parameters
    ----------
    path : str or None
        ``.npz`` with ``X`` and ``y`` (optionally ``fold``); None for
        scikit-learn's ``load_digits``.
    query_fold : int
        Fold used as queries when the file has ``fold``.
    random_state : int
        Seed of the stratified 80/20 split used without folds.

    Returns
    -------
    X_db, y_db, X_query, y_query : ndarrays
    name : str
    """
    fold = None
    if path is None:
        X, y = load_digits(return_X_y=True)
        name = "load_digits"
    else:
        with np.load(path, allow_pickle=False) as data:
            X, y = data["X"], data["y"]
            fold = data["fold"] if "fold" in data.files else None
        name = str(path).rsplit("/", 1)[-1]
    X = np.asarray(X, dtype=np.float64)
    if fold is not None:
        is_query = fold == query_fold
        if not is_query.any() or is_query.all():
            raise ValueError(f"query_fold={query_fold} must select some but not all rows; "
                             f"folds present: {sorted(set(fold.tolist()))}.")
        X_db, y_db, X_q, y_q = X[~is_query], y[~is_query], X[is_query], y[is_query]
    else:
        X_db, X_q, y_db, y_q = train_test_split(
            X, y, test_size=0.2, stratify=y, random_state=random_state
        )
    mean = X_db.mean(axis=0)

    def normalise(A):
        A = A - mean
        return A / np.maximum(np.linalg.norm(A, axis=1, keepdims=True), 1e-12)

    return normalise(X_db), y_db, normalise(X_q), y_q, name


def partial_labels(y, labelled_fraction, random_state=0):
    """y with all but a random ``labelled_fraction`` of the rows set to -1.

    The labelled rows are a stratified sample (every class in proportion)
    when there are at least as many of them as classes, a plain random
    sample otherwise.
    """
    y = np.asarray(y)
    if labelled_fraction >= 1:
        return y.copy()
    n_labelled = max(2, int(round(labelled_fraction * len(y))))
    stratify = y if n_labelled >= len(np.unique(y)) else None
    rows, _ = train_test_split(np.arange(len(y)), train_size=n_labelled, stratify=stratify,
                               random_state=random_state)
    y_partial = np.full(len(y), -1, dtype=y.dtype)
    y_partial[rows] = y[rows]
    return y_partial


def run(X_db, y_db, X_q, y_q, *, methods=None, bits=DEFAULT_BITS, R=100,
        labelled_fraction=0.1, random_state=0, log=None):
    """mAP@R of each method at each code length, plus exact float search.

    Supervised methods are fitted on :func:`partial_labels` of ``y_db``; the
    database is then indexed with the fitted model and scored with all of
    ``y_db``.

    Returns
    -------
    results : dict
        ``{method: {n_bits: score or None}}`` (None where the setting is
        infeasible) and ``{"exact": score}``; ``"seconds"`` holds fit and
        search time per cell.
    """
    methods = list(METHODS) if methods is None else list(methods)
    log = log or (lambda message: None)
    if "DQN" in methods and not _has_torch():
        log("DQN: not run (needs torch and skorch: pip install 'sklearn-hash[deep]')")
        methods.remove("DQN")
    y_partial = partial_labels(y_db, labelled_fraction, random_state)
    results, seconds = {}, {}
    for method in methods:
        results[method], seconds[method] = {}, {}
        for n_bits in bits:
            start = time.perf_counter()
            quantizer = METHODS[method](n_bits, random_state)
            try:
                if method in SUPERVISED:
                    quantizer = FrozenEstimator(quantizer.fit(X_db, y_partial))
                search = QuantizedNeighbors(quantizer, n_neighbors=R)
                score = search.fit(X_db, y_db).score(X_q, y_q)
            except ValueError as exc:  # an infeasible setting for this data
                log(f"{method} at {n_bits} bits: not run ({exc})")
                score = None
            results[method][n_bits] = score
            seconds[method][n_bits] = time.perf_counter() - start
            if score is not None:
                log(f"{method:>6} {n_bits:>3} bits: mAP@{R} = {score:.3f} "
                    f"({seconds[method][n_bits]:.2f} s)")
    neighbors = NearestNeighbors(n_neighbors=R).fit(X_db).kneighbors(X_q, return_distance=False)
    results["exact"] = map_at_r_score(y_q, y_db, neighbors)
    results["seconds"] = seconds
    return results


def format_table(results, bits, R, title):
    """Markdown table: one row per method, one column per code length."""
    header = "| method | " + " | ".join(f"{b} bits" for b in bits) + " |"
    lines = [f"mAP@{R} on {title}", "", header, "|---" * (len(bits) + 1) + "|"]
    for method, row in results.items():
        if method in ("exact", "seconds"):
            continue
        cells = ["n/a" if row[b] is None else f"{row[b]:.3f}" for b in bits]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append(f"| exact float (cosine) | {results['exact']:.3f} |" + " |" * (len(bits) - 1))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m sklearn_hash.benchmark",
        description="Retrieval comparison table: mAP@R by method and code length.",
    )
    parser.add_argument("--data", default=None,
                        help=".npz with X, y (and optional fold); default: load_digits")
    parser.add_argument("--bits", type=int, nargs="+", default=list(DEFAULT_BITS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--R", type=int, default=100, help="items retrieved and scored")
    parser.add_argument("--labelled-fraction", type=float, default=0.1,
                        help="share of the database whose labels DQN sees (default 0.1)")
    parser.add_argument("--query-fold", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    X_db, y_db, X_q, y_q, name = load_retrieval_split(
        args.data, query_fold=args.query_fold, random_state=args.seed
    )
    log(f"{name}: database {X_db.shape[0]} x {X_db.shape[1]}, {X_q.shape[0]} queries, "
        f"{len(np.unique(y_db))} classes")
    results = run(X_db, y_db, X_q, y_q, methods=args.methods, bits=args.bits, R=args.R,
                  labelled_fraction=args.labelled_fraction, random_state=args.seed, log=log)
    title = (f"{name} (database {X_db.shape[0]}, queries {X_q.shape[0]}, "
             f"seed {args.seed}; DQN with {args.labelled_fraction:.0%} of the labels)")
    print(format_table(results, args.bits, args.R, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
