"""Multi-index hashing: exact k-NN over binary codes, the same answers as brute force."""

import numpy as np
import pytest
from sklearn_hash._kernels._mih import mih_kneighbors, substrings

from sklearn_hash import ITQ, ProductQuantizer, QuantizedNeighbors
from sklearn_hash._backends import HammingScan, MultiIndexHashing, mih_substrings
from sklearn_hash._codes import pack_bits


def brute(bits, queries, k, allowed=None, exclude=None):
    """Numpy oracle: (distance, index) order, padded like the kernels."""
    d = (queries[:, None, :] != bits[None, :, :]).sum(2)
    out_d = np.full((len(queries), k), 2**31 - 1)
    out_i = np.full((len(queries), k), -1)
    for q in range(len(queries)):
        ok = np.ones(len(bits), bool) if allowed is None else allowed.astype(bool).copy()
        if exclude is not None and exclude[q] >= 0:
            ok[exclude[q]] = False
        cols = np.flatnonzero(ok)
        order = cols[np.lexsort((cols, d[q, cols]))][:k]
        out_d[q, : order.size], out_i[q, : order.size] = d[q, order], order
    return out_d, out_i


CASES = {
    "random": lambda rng, n, b: rng.integers(0, 2, (n, b)),
    "all equal": lambda rng, n, b: np.tile(rng.integers(0, 2, b), (n, 1)),
    "heavy ties": lambda rng, n, b: rng.integers(0, 2, (6, b))[rng.integers(0, 6, n)],
    "clustered": lambda rng, n, b: (rng.integers(0, 2, (20, b))[rng.integers(0, 20, n)]
                                    ^ (rng.random((n, b)) < 0.05)),
    "all distinct": lambda rng, n, b: np.unpackbits(
        np.arange(n, dtype=">u2").view(np.uint8).reshape(n, 2), axis=1)[:, -b:]
        if b <= 16 else rng.integers(0, 2, (n, b)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n_bits", [12, 64, 70, 130])
def test_equals_brute_force_for_every_k(case, n_bits):
    rng = np.random.default_rng(n_bits)
    bits = CASES[case](rng, 600, n_bits).astype(np.uint8)
    queries = np.concatenate([bits[:5], rng.integers(0, 2, (5, n_bits))]).astype(np.uint8)
    index = MultiIndexHashing(n_bits)
    index.add(pack_bits(bits[:400]))
    index.search(pack_bits(queries[:1]), 1)  # builds tables over the first 400
    index.add(pack_bits(bits[400:]))  # scanned beside the tables, merged exactly
    for k in (1, 10, 599, 700):  # 700: more than the database
        d, i = index.search(pack_bits(queries), k, n_threads=2)
        exp_d, exp_i = brute(bits, queries, k)
        np.testing.assert_array_equal(i, exp_i)
        np.testing.assert_array_equal(d, exp_d)


@pytest.mark.parametrize("m", [1, 2, 5])
def test_filters_exclusion_and_given_substrings(m):
    rng = np.random.default_rng(m)
    bits = rng.integers(0, 2, (500, 40)).astype(np.uint8)
    bits[250:] = bits[:250] ^ (rng.random((250, 40)) < 0.1)
    index = MultiIndexHashing(40, n_substrings=m)
    index.add(pack_bits(bits))
    allowed = (rng.random(500) < 0.3).astype(np.uint8)
    exclude = np.arange(20, dtype=np.int64)
    d, i = index.search(pack_bits(bits[:20]), 8, allowed=allowed, exclude=exclude)
    exp_d, exp_i = brute(bits, bits[:20], 8, allowed, exclude)
    np.testing.assert_array_equal(i, exp_i)
    np.testing.assert_array_equal(d, exp_d)
    assert len(index._tables[1]) == max(m, 2) + 1  # no substring above 24 bits


def test_substring_bounds_and_values():
    np.testing.assert_array_equal(mih_substrings(64, 4_000_000), [0, 22, 43, 64])
    assert np.diff(mih_substrings(64, 100)).max() <= 24 and mih_substrings(8, 10**9)[-1] == 8
    bits = np.random.default_rng(0).integers(0, 2, (50, 130)).astype(np.uint8)
    bounds = np.array([0, 30, 70, 100, 130], dtype=np.int64)  # straddling word boundaries
    values = substrings(pack_bits(bits), bounds)
    for s in range(4):
        part = bits[:, bounds[s]:bounds[s + 1]]
        np.testing.assert_array_equal(values[:, s], (part << np.arange(part.shape[1])).sum(1))


def test_searcher_with_multi_index_equals_brute_with_adds_and_removals(digits_split):
    X_db, y_db, X_q, _ = digits_split
    kwargs = dict(quantizer=ITQ(n_bits=32, random_state=0), n_neighbors=7)
    mih = QuantizedNeighbors(algorithm="multi-index", **kwargs).fit(X_db[:700], y_db[:700])
    scan = QuantizedNeighbors(algorithm="brute", **kwargs).fit(X_db[:700], y_db[:700])
    assert isinstance(mih._index, MultiIndexHashing) and isinstance(scan._index, HammingScan)
    for index in (mih, scan):
        index.add(X_db[700:], y_db[700:])
        index.remove(np.arange(0, 300, 3))
    for k in (1, 7, 40):
        np.testing.assert_array_equal(mih.kneighbors(X_q, k)[1], scan.kneighbors(X_q, k)[1])
        np.testing.assert_array_equal(mih.kneighbors(X_q, k)[0], scan.kneighbors(X_q, k)[0])
    mih.compact(), scan.compact()
    np.testing.assert_array_equal(mih.kneighbors()[1], scan.kneighbors()[1])


def test_auto_rule_prefers_hashing_for_near_neighbours_and_scans_otherwise(monkeypatch):
    rng = np.random.default_rng(0)
    near = MultiIndexHashing(64, auto=True)
    centers = rng.integers(0, 2, (5000, 64))  # many small clusters: few candidates
    near.add(pack_bits(centers[rng.integers(0, 5000, 70_000)] ^ (rng.random((70_000, 64)) < 0.02)))
    queries = pack_bits(centers[:8])
    assert near._prefers_tables(queries, 10, 1)
    far = MultiIndexHashing(64, auto=True)
    far.add(pack_bits(rng.integers(0, 2, (70_000, 64))))
    assert not far._prefers_tables(pack_bits(rng.integers(0, 2, (8, 64))), 10, 1)
    crowded = MultiIndexHashing(64, auto=True)  # a few big clusters: hot buckets
    crowded.add(pack_bits(centers[rng.integers(0, 5, 70_000)] ^ (rng.random((70_000, 64)) < 0.02)))
    assert not crowded._prefers_tables(pack_bits(centers[:8]), 10, 1)
    # Codes with many exact duplicates (short codes of clustered data): the
    # search stops a bucket once its k best are duplicates with smaller indices.
    dupes = MultiIndexHashing(64, auto=True)
    dupes.add(pack_bits(centers[rng.integers(0, 50, 70_000)]))
    assert dupes._prefers_tables(pack_bits(centers[:8]), 10, 1)


def test_work_counts_buckets_and_verified_codes_and_stops_at_duplicates():
    mih = MultiIndexHashing(64, n_substrings=4)
    mih.add(pack_bits(np.ones((1000, 64), dtype=np.uint8)))
    d, i, work = mih._hash_search(pack_bits(np.ones((2, 64), dtype=np.uint8)), 10, None, None,
                                  1, count=True)
    np.testing.assert_array_equal(i, np.tile(np.arange(10), (2, 1)))
    np.testing.assert_array_equal(d, 0)
    # Radius 0 only: one bucket per substring table, each read up to index 9.
    np.testing.assert_array_equal(work, [[4, 40], [4, 40]])
    far = pack_bits(np.zeros((1, 64), dtype=np.uint8))  # every code at distance 64
    d, _, work = mih._hash_search(far, 10, None, None, 1, count=True)
    np.testing.assert_array_equal(d, 64)
    # Every bucket of every table probed (radius 0 to 16); the full bucket read
    # in each table: its codes are at 64 > 16, so no cut applies.
    np.testing.assert_array_equal(work, [[4 * 2**16, 4 * 1000]])


def test_bad_input():
    X = np.random.default_rng(0).standard_normal((300, 8))
    with pytest.raises(ValueError, match="algorithm='multi-index' indexes binary codes"):
        QuantizedNeighbors(ProductQuantizer(8, subspace_bits=4), algorithm="multi-index").fit(X)
    with pytest.raises(ValueError, match="algorithm"):
        QuantizedNeighbors(algorithm="kd_tree").fit(X)
    db = pack_bits(np.ones((4, 10)))
    ptr = np.array([1], dtype=np.intp)
    with pytest.raises(ValueError, match="1 to 32 bits"):
        mih_kneighbors(db, db, np.array([0, 40], np.int64), ptr, ptr, ptr, 1)
    with pytest.raises(ValueError, match="one table each"):
        mih_kneighbors(db, db, np.array([0, 5, 10], np.int64), ptr, ptr, ptr, 1)
    with pytest.raises(ValueError, match="needs its table"):
        mih_kneighbors(db, db, np.array([0, 10], np.int64), ptr, ptr, ptr * 0, 1)
