import os
from pathlib import Path

import numpy as np
import pytest

# Real embeddings live beside the checkout (../shared/data); SKLEARN_HASH_DATA overrides.
DATA_DIR = Path(
    os.environ.get("SKLEARN_HASH_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)


def _in_ci():
    """Whether the CI environment variable is set (to anything but empty, 0, false or no)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_shared_data(name, data_dir=None):
    """Path of a file of the real data, or skip the test; FAIL it when CI is set.

    A CI run without ../shared/data must not stay green by skipping the tests
    on real data: with CI set, a missing file fails the test that needs it.
    """
    path = Path(DATA_DIR if data_dir is None else data_dir) / name
    if not path.is_file():
        message = f"real data not found at {path} (set SKLEARN_HASH_DATA to its folder)"
        if _in_ci():
            pytest.fail(f"{message}; CI is set, so the tests that need it fail instead of "
                        f"skipping", pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def shared_data():
    """``shared_data(name)``: path of a file of ../shared/data (skips, or fails in CI)."""
    return require_shared_data


@pytest.fixture(scope="session")
def esc50_yamnet():
    """ESC-50 YAMNet split: database folds 2-5, queries fold 1, centred and L2-normalised."""
    from sklearn_hash.datasets import load_retrieval_split

    return load_retrieval_split(require_shared_data("esc50_yamnet.npz"), query_fold=1)[:4]


@pytest.fixture(scope="session")
def esc10():
    """The ESC-10 Bunch shipped with the package (always available)."""
    from sklearn_hash.datasets import load_esc10

    return load_esc10()


@pytest.fixture(scope="session")
def digits_split():
    from sklearn_hash.datasets import load_retrieval_split

    return load_retrieval_split(None)[:4]


@pytest.fixture(scope="session")
def random_hyperplanes_map():
    """mAP@R of sign random projections (LSH), as a function of the split."""
    return _random_hyperplanes_map


def _random_hyperplanes_map(X_db, y_db, X_q, y_q, n_bits, R, seeds=range(5)):
    """mAP@R of sign random projections (the LSH baseline), averaged over seeds."""
    from sklearn_hash._kernels._hamming import hamming_kneighbors

    from sklearn_hash._codes import pack_bits
    from sklearn_hash.metrics import map_at_r_score

    scores = []
    for seed in seeds:
        P = np.random.default_rng(seed).standard_normal((X_db.shape[1], n_bits))
        _, ind = hamming_kneighbors(pack_bits(X_q @ P >= 0), pack_bits(X_db @ P >= 0), R)
        scores.append(map_at_r_score(y_q, y_db, ind))
    return float(np.mean(scores))


# ---------------------------------------------------------------- inverted-file kernel oracles
# (test_ivf.py, test_ivf_fastscan.py)

def _ivf_oracle(list_tables, query_tables, coarse, probes, table_rows, n_visit, offsets, codes,
               ids, exclude, k, allowed=None):
    """float32 sums in subspace order over the visited lists; ranked by (distance, index)."""
    n_q, M, _ = query_tables.shape
    out_d = np.full((n_q, k), np.inf, np.float32)
    out_i = np.full((n_q, k), -1, np.int64)
    for q in range(n_q):
        dist, idx = [np.empty(0, np.float32)], [np.empty(0, np.int64)]
        for p in range(n_visit[q]):
            lst = probes[q, p]
            table = list_tables[table_rows[q, p]] + query_tables[q]
            table[0] += coarse[q, p]
            rows = np.arange(offsets[lst], offsets[lst + 1])
            d = table[0, codes[rows, 0].astype(np.intp)]
            for m in range(1, M):
                d = d + table[m, codes[rows, m].astype(np.intp)]
            dist.append(d)
            idx.append(ids[rows])
        dist, idx = np.concatenate(dist), np.concatenate(idx)
        keep = idx != exclude[q]
        if allowed is not None:
            keep &= allowed[idx].astype(bool)
        dist, idx = dist[keep], idx[keep]
        order = np.lexsort((idx, dist))[:k]
        out_d[q, : order.size], out_i[q, : order.size] = dist[order], idx[order]
    return out_d, out_i


def _random_index(rng, n, n_lists, M, K, code_dtype=np.uint8):
    lists = rng.integers(0, n_lists, n)
    order = np.argsort(lists, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(lists, minlength=n_lists))]).astype(np.int64)
    codes = rng.integers(0, K, (n, M)).astype(code_dtype)
    return offsets, codes, order.astype(np.int64)


@pytest.fixture(scope="session")
def ivf_oracle():
    """float32 sums over the visited lists, ranked by (distance, index): the IVF kernels' oracle."""
    return _ivf_oracle


@pytest.fixture(scope="session")
def random_index():
    """Random inverted lists as one grouped array: (offsets, codes, ids ascending per list)."""
    return _random_index
