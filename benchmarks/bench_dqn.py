"""DeepQuantizationNetwork on the study's protocol: mAP@100 by code length and labelled share.

Protocol (``../shared/data/README.md``): ESC-50 embeddings, database = folds
2-5 (1600 clips), queries = fold 1 (400), centred and L2-normalised, R = 100,
relevant = same class. DQN sees the labels of a stratified share of the
database (the rest are -1); each seed draws its own labelled rows and its own
network. PQ (unsupervised, on the raw embeddings) and exact cosine search are
measured in the same run. Prints mean +- standard deviation over the seeds,
and DQN's mean training time::

    python benchmarks/bench_dqn.py                       # YAMNet and BirdNET, 10% and 50%
    python benchmarks/bench_dqn.py --data ../shared/data/esc50_yamnet.npz --fractions 0.1
    python benchmarks/bench_dqn.py --hidden 512          # also a (512,) hidden layer

Two studies of the quantization weight (lambda), 10% labels, 8 and 32 bits,
each printing mAP@100 and the quantization error (mean over the database of
the squared distance of the bottleneck to its PQ reconstruction)::

    # choose lambda: never looks at fold 1 (database folds 3-5, queries fold 2)
    python benchmarks/bench_dqn.py --validation --weights 0 0.1 0.3 1 3
    # the ablation reported: weight 0 / the default / a larger one, on the protocol
    python benchmarks/bench_dqn.py --ablation
"""

import argparse
import os
import time
from pathlib import Path

import numpy as np
from sklearn.frozen import FrozenEstimator
from sklearn.neighbors import NearestNeighbors

from sklearn_hash import DeepQuantizationNetwork, ProductQuantizer, QuantizedNeighbors
from sklearn_hash.benchmark import load_retrieval_split, partial_labels
from sklearn_hash.metrics import map_at_r_score

DATA = Path(os.environ.get("SKLEARN_HASH_DATA", Path(__file__).parents[1] / ".." / "shared" / "data"))


def score(quantizer, X_db, y_db, X_q, y_q, R):
    _, idx = QuantizedNeighbors(quantizer, n_neighbors=R).fit(X_db).kneighbors(X_q)
    return map_at_r_score(y_q, y_db, idx)


def quantization_error(dqn, X):
    """Mean squared distance of the bottleneck of X to its PQ reconstruction."""
    Z = dqn.embed(X).astype(np.float64)
    recon = dqn.quantizer_.inverse_transform(dqn.quantizer_.transform(Z.astype(np.float32)))
    return float(np.mean(((Z - recon) ** 2).sum(axis=1)))


def validation_split(path):
    """Folds 2-5 only: database folds 3-5, queries fold 2, centred and L2-normalised."""
    data = np.load(path)
    X, y, fold = data["X"].astype(np.float64), data["y"], data["fold"]
    db, q = np.isin(fold, (3, 4, 5)), fold == 2
    mean = X[db].mean(axis=0)
    Xn = X - mean
    Xn /= np.linalg.norm(Xn, axis=1, keepdims=True)
    return (Xn[db].astype(np.float32), y[db], Xn[q].astype(np.float32), y[q],
            Path(path).name + " (validation: database folds 3-5, queries fold 2)")


def weight_study(X_db, y_db, X_q, y_q, name, weights, bits, seeds, R, hidden):
    """mAP@R and quantization error of DQN (10% labels) for each weight."""
    results = {}
    for weight in weights:
        for b in bits:
            maps, errors = [], []
            for s in range(seeds):
                y_partial = partial_labels(y_db, 0.1, random_state=s)
                dqn = DeepQuantizationNetwork(
                    b, hidden_layer_sizes=hidden, quantization_weight=weight, random_state=s
                ).fit(X_db, y_partial)
                maps.append(score(FrozenEstimator(dqn), X_db, y_db, X_q, y_q, R))
                errors.append(quantization_error(dqn, X_db))
            results[weight, b] = (maps, errors)
            print(f"  weight {weight:g}, {b} bits: mAP@{R} {np.mean(maps):.3f}, "
                  f"quantization error {np.mean(errors):.4f}", flush=True)
    print(f"\nDQN, 10% labels, on {name}: mean +- std over {seeds} seeds")
    print("| quantization_weight | " + " | ".join(
        f"mAP@{R} {b} bits | quant. error {b} bits" for b in bits) + " |")
    print("|---" * (2 * len(bits) + 1) + "|")
    for weight in weights:
        cells = []
        for b in bits:
            maps, errors = results[weight, b]
            cells += [f"{np.mean(maps):.3f} +- {np.std(maps):.3f}",
                      f"{np.mean(errors):.4f} +- {np.std(errors):.4f}"]
        print(f"| {weight:g} | " + " | ".join(cells) + " |")
    print()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", default=[str(DATA / "esc50_yamnet.npz"),
                                                      str(DATA / "esc50_birdnet.npz")])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--hidden", type=int, nargs="*", default=[],
                        help="also train DQN with this hidden layer (one row per width)")
    parser.add_argument("--R", type=int, default=100)
    parser.add_argument("--validation", action="store_true",
                        help="weight study on folds 2-5 only (queries fold 2)")
    parser.add_argument("--ablation", action="store_true",
                        help="weight study (0 / default / larger) on the protocol")
    parser.add_argument("--weights", type=float, nargs="+", default=None)
    args = parser.parse_args()

    if args.validation or args.ablation:
        default = DeepQuantizationNetwork().quantization_weight
        weights = args.weights or [0.0, default, 10 * default]
        bits = args.bits if args.bits != [8, 16, 32, 64] else [8, 32]
        for path in args.data[:1] if args.data == parser.get_default("data") else args.data:
            if args.validation:
                split = validation_split(path)
            else:
                X_db, y_db, X_q, y_q, name = load_retrieval_split(path, query_fold=1)
                split = (X_db.astype(np.float32), y_db, X_q.astype(np.float32), y_q, name)
            hidden = (args.hidden[0],) if args.hidden else ()
            weight_study(*split, weights, bits, args.seeds, args.R, hidden)
        return

    for path in args.data:
        X_db, y_db, X_q, y_q, name = load_retrieval_split(path, query_fold=1)
        X_db, X_q = X_db.astype(np.float32), X_q.astype(np.float32)
        exact = NearestNeighbors(n_neighbors=args.R).fit(X_db).kneighbors(X_q, return_distance=False)
        rows = {"PQ (no labels)": {}}
        train_seconds = []
        for b in args.bits:
            rows["PQ (no labels)"][b] = [
                score(ProductQuantizer(b, random_state=s), X_db, y_db, X_q, y_q, args.R)
                for s in range(args.seeds)
            ]
        for fraction in args.fractions:
            for hidden in [()] + [(h,) for h in args.hidden]:
                label = f"DQN, {fraction:.0%} labels" + (f", hidden {hidden}" if hidden else "")
                rows[label] = {}
                for b in args.bits:
                    rows[label][b] = []
                    for s in range(args.seeds):
                        y_partial = partial_labels(y_db, fraction, random_state=s)
                        start = time.perf_counter()
                        dqn = DeepQuantizationNetwork(
                            b, hidden_layer_sizes=hidden, random_state=s
                        ).fit(X_db, y_partial)
                        train_seconds.append(time.perf_counter() - start)
                        rows[label][b].append(
                            score(FrozenEstimator(dqn), X_db, y_db, X_q, y_q, args.R)
                        )
                    print(f"  {label}, {b} bits: {np.mean(rows[label][b]):.3f}", flush=True)

        print(f"\nmAP@{args.R} on {name} (database {len(X_db)}, queries {len(X_q)}), "
              f"mean +- std over {args.seeds} seeds")
        print("| method | " + " | ".join(f"{b} bits" for b in args.bits) + " |")
        print("|---" * (len(args.bits) + 1) + "|")
        for label, row in rows.items():
            cells = [f"{np.mean(row[b]):.3f} +- {np.std(row[b]):.3f}" for b in args.bits]
            print(f"| {label} | " + " | ".join(cells) + " |")
        print(f"| exact cosine search | {map_at_r_score(y_q, y_db, exact):.3f} |"
              + " |" * (len(args.bits) - 1))
        if train_seconds:
            print(f"DQN training ({X_db.shape[0]} x {X_db.shape[1]}, 50 epochs): "
                  f"{np.mean(train_seconds):.1f} s mean, {np.max(train_seconds):.1f} s max\n")


if __name__ == "__main__":
    main()
