"""Data for the examples: ESC-50 YAMNet embeddings when present, else ESC-10 (shipped)."""

import os
from pathlib import Path

from sklearn_hash.datasets import load_esc10, load_npz, retrieval_split


def load(name="esc50_yamnet.npz"):
    """Database (folds 2-5) and queries (fold 1), centred and L2-normalised, and a title.

    The file ``name`` is looked up in ``SKLEARN_HASH_DATA`` (default: the
    ``shared/data`` folder beside the checkout); without it, the ESC-10
    embeddings shipped with the package are used.
    """
    root = Path(__file__).resolve().parents[1]  # the checkout
    data_dir = Path(os.environ.get("SKLEARN_HASH_DATA", root.parent / "shared" / "data"))
    path = data_dir / name
    if path.is_file():
        dataset, title = load_npz(path), path.name
    else:
        dataset, title = load_esc10(), "ESC-10 YAMNet (load_esc10)"
        print(f"Note: {path} not found (set SKLEARN_HASH_DATA); using ESC-10 instead.")
    X_db, y_db, X_q, y_q = retrieval_split(dataset, query_fold=1)
    print(f"Data: {title}, database {len(X_db)} clips (folds 2-5), "
          f"{len(X_q)} queries (fold 1)")
    return X_db.astype("float32"), y_db, X_q.astype("float32"), y_q, title
