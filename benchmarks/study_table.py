"""The study's table, regenerated: mAP@100 of SH, ITQ, AGH, PQ, DQN and exact search.

Rows SH, ITQ, AGH (one and two layers), PQ, DQN (10% of the database
labelled) and exact float search; columns 8/16/24/32/64 bits; ESC-50 YAMNet
and BirdNET embeddings, database = folds 2-5, queries = fold 1, seed 0.
Writes ``doc/_generated/study_tables.rst`` (included by the documentation's
study page) and prints the tables::

    python benchmarks/study_table.py [--out doc/_generated/study_tables.rst]
"""

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

from sklearn_hash import __version__
from sklearn_hash.benchmark import DEFAULT_BITS, load_retrieval_split, run

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SKLEARN_HASH_DATA", ROOT.parent / "shared" / "data"))
DATASETS = {"esc50_yamnet.npz": "ESC-50, YAMNet embeddings (1024-d)",
            "esc50_birdnet.npz": "ESC-50, BirdNET embeddings (1024-d)"}
METHODS = ["SH", "ITQ", "AGH", "AGH-2", "PQ", "DQN"]


def rst_table(results, bits):
    header = ["method"] + [f"{b} bits" for b in bits]
    rows = [[m + (" (10% labels)" if m == "DQN" else "")]
            + [f"{results[m][b]:.3f}" for b in bits] for m in METHODS]
    rows.append(["exact float search", f"{results['exact']:.3f}"] + [""] * (len(bits) - 1))
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = "  ".join("=" * w for w in widths)
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line, fmt(header), line] + [fmt(r) for r in rows] + [line])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "doc" / "_generated" / "study_tables.rst"))
    args = parser.parse_args()
    bits = list(DEFAULT_BITS)
    parts = []
    start = time.perf_counter()
    for name, title in DATASETS.items():
        X_db, y_db, X_q, y_q, _ = load_retrieval_split(DATA / name, query_fold=1)
        results = run(X_db, y_db, X_q, y_q, methods=METHODS, bits=bits, R=100,
                      labelled_fraction=0.1, random_state=0,
                      log=lambda m: print(m, flush=True))
        table = rst_table(results, bits)
        print(f"\n{title}\n{table}\n")
        parts.append(f"{title}\n{'-' * len(title)}\n\n{table}\n")
    stamp = (f"Generated on {datetime.date.today().isoformat()} by "
             f"``python benchmarks/study_table.py`` (sklearn_hash {__version__}, "
             f"{platform.machine()}, {os.cpu_count()} cores, "
             f"{time.perf_counter() - start:.0f} s), seed 0.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(".. This file is written by benchmarks/study_table.py; do not edit.\n\n"
                   + stamp + "\n\n" + "\n".join(parts))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
