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
    args = parser.parse_args()

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
