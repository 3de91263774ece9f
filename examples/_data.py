"""Data for the examples: ESC-50 YAMNet embeddings when present, else load_digits."""

import os
from pathlib import Path

from sklearn_hash.benchmark import load_retrieval_split


def load(name="esc50_yamnet.npz"):
    """Database and queries (centred, L2-normalised), and a description."""
    root = Path(__file__).resolve().parents[1]  # the checkout
    data_dir = Path(os.environ.get("SKLEARN_HASH_DATA", root.parent / "shared" / "data"))
    path = data_dir / name
    if path.is_file():
        X_db, y_db, X_q, y_q, title = load_retrieval_split(path, query_fold=1)
        print(f"Data: {path.name}, database {len(X_db)} clips (folds 2-5), "
              f"{len(X_q)} queries (fold 1)")
    else:
        X_db, y_db, X_q, y_q, title = load_retrieval_split(None)
        print(f"Note: {path} not found (set SKLEARN_HASH_DATA); using load_digits instead.")
    return X_db.astype("float32"), y_db, X_q.astype("float32"), y_q, title
