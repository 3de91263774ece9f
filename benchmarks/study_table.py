"""The study's table, regenerated: mAP@100 of SH, ITQ, AGH, PQ, DQN and exact search.

Rows SH, ITQ, AGH (one and two layers), PQ, DQN (10% of the database
labelled) and exact float search; columns 8/16/24/32/64 bits; ESC-50 YAMNet
and BirdNET embeddings, database = folds 2-5, queries = fold 1, seed 0.
Each fitted searcher is scored three ways (see
:func:`sklearn_hash.metrics.map_at_r_score`):

- ``retrieved, ties by index``: the study's definition (AP divided by the
  relevant items found in the top 100), ranking ties by database index: the
  table as the package printed it before tie-aware scoring;
- ``retrieved, tie-aware``: the study's definition, averaged over all orders
  of items at equal distance (does not depend on the order of the files);
- ``relevant, tie-aware``: AP divided by min(100, relevant items in the
  database) = 32, so that missed relevant items count.

Writes ``doc/_generated/study_tables.rst`` (included by the documentation's
study page) and prints the tables in Markdown::

    python benchmarks/study_table.py [--out doc/_generated/study_tables.rst]
"""

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

from sklearn.frozen import FrozenEstimator
from sklearn.neighbors import NearestNeighbors

from sklearn_hash import QuantizedNeighbors, __version__
from sklearn_hash.benchmark import (
    DEFAULT_BITS,
    SUPERVISED,
    load_retrieval_split,
    partial_labels,
)
from sklearn_hash.benchmark import METHODS as FACTORIES
from sklearn_hash.metrics import make_map_at_r_scorer, map_at_r_score

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SKLEARN_HASH_DATA", ROOT.parent / "shared" / "data"))
DATASETS = {"esc50_yamnet.npz": "ESC-50, YAMNet embeddings (1024-d)",
            "esc50_birdnet.npz": "ESC-50, BirdNET embeddings (1024-d)"}
METHODS = ["SH", "ITQ", "AGH", "AGH-2", "PQ", "DQN"]
R = 100
SCORES = {
    "retrieved, ties by index": {"normalize": "retrieved", "ties": "index"},
    "retrieved, tie-aware": {"normalize": "retrieved", "ties": "average"},
    "relevant, tie-aware": {"normalize": "relevant", "ties": "average"},
}


def measure(X_db, y_db, X_q, y_q, bits, seed=0, log=print):
    """{definition: {method: {n_bits: score}, "exact": score}}."""
    scorers = {name: make_map_at_r_scorer(R=R, **kw) for name, kw in SCORES.items()}
    results = {name: {} for name in SCORES}
    y_partial = partial_labels(y_db, 0.1, random_state=seed)
    for method in METHODS:
        for name in SCORES:
            results[name][method] = {}
        for n_bits in bits:
            start = time.perf_counter()
            quantizer = FACTORIES[method](n_bits, seed)
            if method in SUPERVISED:
                quantizer = FrozenEstimator(quantizer.fit(X_db, y_partial))
            search = QuantizedNeighbors(quantizer, n_neighbors=R).fit(X_db, y_db)
            for name, scorer in scorers.items():
                results[name][method][n_bits] = scorer(search, X_q, y_q)
            log(f"{method:>6} {n_bits:>3} bits: " + ", ".join(
                f"{name} {results[name][method][n_bits]:.3f}" for name in SCORES)
                + f" ({time.perf_counter() - start:.1f} s)")
    distances, neighbors = NearestNeighbors(n_neighbors=R).fit(X_db).kneighbors(X_q)
    for name, kw in SCORES.items():
        results[name]["exact"] = map_at_r_score(
            y_q, y_db, neighbors, normalize=kw["normalize"],
            distances=None if kw["ties"] == "index" else distances)
    return results


def rows(results, bits):
    out = [[m + (" (10% labels)" if m == "DQN" else "")]
           + [f"{results[m][b]:.3f}" for b in bits] for m in METHODS]
    out.append(["exact float search", f"{results['exact']:.3f}"] + [""] * (len(bits) - 1))
    return out


def rst_table(results, bits):
    header = ["method"] + [f"{b} bits" for b in bits]
    body = rows(results, bits)
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    line = "  ".join("=" * w for w in widths)
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line, fmt(header), line] + [fmt(r) for r in body] + [line])


def markdown_table(results, bits, title):
    lines = [f"| {title} | " + " | ".join(f"{b} bits" for b in bits) + " |",
             "|---" * (len(bits) + 1) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows(results, bits)]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "doc" / "_generated" / "study_tables.rst"))
    args = parser.parse_args()
    bits = list(DEFAULT_BITS)
    parts = []
    start = time.perf_counter()
    for file, title in DATASETS.items():
        X_db, y_db, X_q, y_q, _ = load_retrieval_split(DATA / file, query_fold=1)
        results = measure(X_db, y_db, X_q, y_q, bits, log=lambda m: print(m, flush=True))
        parts.append(f"{title}\n{'-' * len(title)}\n")
        for name in SCORES:
            print(f"\n{markdown_table(results[name], bits, f'{title}, mAP@{R} ({name})')}")
            parts.append(f"mAP@{R}, {name}:\n\n{rst_table(results[name], bits)}\n")
        print()
    stamp = (f"Generated on {datetime.date.today().isoformat()} by "
             f"``python benchmarks/study_table.py`` (sklearn_hash {__version__}, "
             f"{platform.machine()}, {os.cpu_count()} cores, "
             f"{time.perf_counter() - start:.0f} s), seed 0. \"retrieved\": AP divided by "
             f"the relevant items found in the top {R} (the study's definition); "
             f"\"relevant\": divided by min({R}, relevant items in the database) = 32; "
             f"\"tie-aware\": the expected AP over all orders of items at equal distance.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(".. This file is written by benchmarks/study_table.py; do not edit.\n\n"
                   + stamp + "\n\n" + "\n".join(parts))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
