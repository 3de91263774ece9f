"""The main job: a retrieval comparison table, mAP@R by method and code length.

Run ``python -m sklearn_hash.benchmark`` for the dataset shipped with the
package, ESC-10 (:func:`sklearn_hash.datasets.load_esc10`: 400 clips of
environmental sounds, 10 classes, YAMNet embeddings), or give an ``.npz``
file holding ``X`` and ``y`` (and optionally ``fold``)::

    python -m sklearn_hash.benchmark --data ../shared/data/esc50_yamnet.npz

Protocol: with a ``fold`` array, the rows of ``--query-fold`` are the queries
and all other rows the database (fold 1 against folds 2-5: for ESC-10, 80
queries against 320 clips; for ESC-50, 400 against 1600); without one, a
stratified 20% of the rows are the queries. Vectors are centred on the
database mean and L2-normalised. Every method is fitted on the database only;
the supervised one (DQN) sees the labels of a stratified
``--labelled-fraction`` of the database (10% by default, the others given as
-1). Each query retrieves its R nearest database items and is scored by
mAP@R (relevant = same class, all database labels). The table goes to
standard output, progress to standard error. DQN needs torch and skorch (the
``deep`` extra); without them its row is left out, with a note.

Choice of R: on ESC-10 each query has exactly 32 relevant clips in the
database (8 per class in each of the 4 database folds), so the default is
R = 32, the number of relevant items (R-precision's cut-off, as in the MAP@R
of Musgrave et al., "A Metric Learning Reality Check", ECCV 2020): the list
is just long enough to hold every relevant clip, a perfect ranking scores 1,
and a larger R would mostly score the order of irrelevant clips. (R = 100
would ask for 100 of 320 clips, almost a third of the database.) With
``--data``, R stays 100 by default, the project's ESC-50 protocol (32
relevant items among 1600) that the README's study tables use.

Bad input (a missing or unreadable file, an ``.npz`` without ``X`` or ``y``,
rows with NaN, ``--bits`` below 1, ``--labelled-fraction`` outside (0, 1],
``--R`` outside 1..database size, a ``--query-fold`` absent from the file) is
reported as one line on standard error, with exit status 2.
"""

import argparse
import sys
import time

import numpy as np
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
from .datasets import (
    load_esc10,
    load_npz,
    load_retrieval_split,  # noqa: F401  (kept importable from here)
    retrieval_split,
)
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
#: R of mAP@R: ESC-10's 32 relevant items per query; 100 for other files.
DEFAULT_R_ESC10 = 32
DEFAULT_R_FILE = 100


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


class _OneLineErrorParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line: ``prog: error: message``, status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"must be in (0, 1] (the share of the database whose labels DQN sees), got {text}"
        )
    return value


def _build_parser():
    parser = _OneLineErrorParser(
        prog="python -m sklearn_hash.benchmark",
        description="Retrieval comparison table: mAP@R by method and code length.",
    )
    parser.add_argument("--data", default=None,
                        help=".npz with X, y (and optional fold); default: ESC-10 "
                             "(sklearn_hash.datasets.load_esc10)")
    parser.add_argument("--bits", type=_positive_int, nargs="+", default=list(DEFAULT_BITS),
                        help="code lengths, positive integers (default: 8 16 24 32 64)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--R", type=int, default=None,
                        help=f"items retrieved and scored, 1..database size (default: "
                             f"{DEFAULT_R_ESC10} for ESC-10, the relevant items per query; "
                             f"{DEFAULT_R_FILE} with --data)")
    parser.add_argument("--labelled-fraction", type=_fraction, default=0.1,
                        help="share of the database whose labels DQN sees, in (0, 1] "
                             "(default 0.1)")
    parser.add_argument("--query-fold", type=int, default=None,
                        help="fold of the queries, one of the file's folds (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _load(parser, args):
    """The dataset's Bunch and name, or a one-line error for the user."""
    if args.data is None:
        return load_esc10(), "ESC-10 YAMNet (load_esc10)"
    try:
        dataset = load_npz(args.data)
    except (OSError, ValueError) as exc:
        parser.error(f"argument --data: {exc}")
    X = dataset.data
    bad_rows = np.flatnonzero(~np.isfinite(X).all(axis=1))
    if bad_rows.size:
        shown = ", ".join(str(i) for i in bad_rows[:5]) + (", ..." if bad_rows.size > 5 else "")
        parser.error(f"argument --data: {args.data}: {bad_rows.size} rows of X hold NaN or "
                     f"infinity (rows {shown}); every value must be finite")
    return dataset, str(args.data).rsplit("/", 1)[-1]


def main(argv=None):
    parser = _build_parser()
    args = parser.parse_args(argv)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    dataset, name = _load(parser, args)
    if args.query_fold is not None and dataset.fold is None:
        parser.error(f"argument --query-fold: {name} has no fold array; leave --query-fold "
                     f"out (a stratified 20% of the rows are then the queries)")
    query_fold = 1 if args.query_fold is None else args.query_fold
    if dataset.fold is not None and query_fold not in set(dataset.fold.tolist()):
        folds = " ".join(str(f) for f in sorted(set(dataset.fold.tolist())))
        parser.error(f"argument --query-fold: fold {query_fold} is not in {name}; "
                     f"its folds are {folds}")
    try:
        X_db, y_db, X_q, y_q = retrieval_split(dataset, query_fold=query_fold,
                                               random_state=args.seed)
    except ValueError as exc:  # one fold only, or too few rows per class to stratify
        parser.error(f"argument --data: {name}: cannot split queries from the database: {exc}")
    R = args.R
    if R is None:
        R = DEFAULT_R_ESC10 if args.data is None else DEFAULT_R_FILE
        R = min(R, X_db.shape[0]) if args.data is not None else R
    if not 1 <= R <= X_db.shape[0]:
        parser.error(f"argument --R: must be between 1 and the database size "
                     f"({X_db.shape[0]}), got {R}")
    log(f"{name}: database {X_db.shape[0]} x {X_db.shape[1]}, {X_q.shape[0]} queries, "
        f"{len(np.unique(y_db))} classes, R = {R}")
    results = run(X_db, y_db, X_q, y_q, methods=args.methods, bits=args.bits, R=R,
                  labelled_fraction=args.labelled_fraction, random_state=args.seed, log=log)
    dqn = any(method in SUPERVISED for method in results if method not in ("exact", "seconds"))
    title = (f"{name} (database {X_db.shape[0]}, queries {X_q.shape[0]}, seed {args.seed}"
             + (f"; DQN with {args.labelled_fraction:.0%} of the labels" if dqn else "") + ")")
    print(format_table(results, args.bits, R, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
