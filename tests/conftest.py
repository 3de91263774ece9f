import os
from pathlib import Path

import numpy as np
import pytest

# Real embeddings live beside the checkout (../shared/data); SKLEARN_HASH_DATA overrides.
DATA_DIR = Path(
    os.environ.get("SKLEARN_HASH_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)


@pytest.fixture(scope="session")
def esc50_yamnet():
    """ESC-50 YAMNet split: database folds 2-5, queries fold 1, centred and L2-normalised."""
    path = DATA_DIR / "esc50_yamnet.npz"
    if not path.exists():
        pytest.skip(f"real data not found at {path}")
    from sklearn_hash.benchmark import load_retrieval_split

    return load_retrieval_split(path, query_fold=1)[:4]


@pytest.fixture(scope="session")
def digits_split():
    from sklearn_hash.benchmark import load_retrieval_split

    return load_retrieval_split(None)[:4]


@pytest.fixture(scope="session")
def random_hyperplanes_map():
    """mAP@R of sign random projections (LSH), as a function of the split."""
    return _random_hyperplanes_map


def _random_hyperplanes_map(X_db, y_db, X_q, y_q, n_bits, R, seeds=range(5)):
    """mAP@R of sign random projections (the LSH baseline), averaged over seeds."""
    from sklearn_hash._codes import pack_bits
    from sklearn_hash._kernels._hamming import hamming_kneighbors
    from sklearn_hash.metrics import map_at_r_score

    scores = []
    for seed in seeds:
        P = np.random.default_rng(seed).standard_normal((X_db.shape[1], n_bits))
        _, ind = hamming_kneighbors(pack_bits(X_q @ P >= 0), pack_bits(X_db @ P >= 0), R)
        scores.append(map_at_r_score(y_q, y_db, ind))
    return float(np.mean(scores))
