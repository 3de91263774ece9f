"""The Hamming kernel against a numpy oracle (XOR + popcount + stable lexsort)."""

import numpy as np
import pytest
from sklearn_hash._kernels._hamming import hamming_kneighbors, simd_path

from sklearn_hash._codes import n_words, pack_bits


def oracle(query_bits, db_bits, k, exclude_self=False):
    """Distances and indices of the k nearest codes, ties by ascending index."""
    packed_q, packed_db = np.packbits(query_bits, axis=1), np.packbits(db_bits, axis=1)
    xor = packed_q[:, None, :] ^ packed_db[None, :, :]
    dist = np.unpackbits(xor, axis=2).sum(axis=2).astype(np.int64)
    if exclude_self:
        own = np.arange(min(dist.shape))
        dist[own, own] = np.iinfo(np.int64).max
    index = np.arange(db_bits.shape[0])
    order = np.array([np.lexsort((index, row))[:k] for row in dist], dtype=np.int64)
    order = order.reshape(dist.shape[0], k)
    return np.take_along_axis(dist, order, axis=1), order


def random_codes(rng, n, n_bits, n_distinct=None):
    """Random 0/1 codes; few distinct ones when n_distinct is set (many ties)."""
    if n_distinct is None:
        return rng.integers(0, 2, (n, n_bits), dtype=np.uint8)
    pool = rng.integers(0, 2, (n_distinct, n_bits), dtype=np.uint8)
    return pool[rng.integers(0, n_distinct, n)]


# 1984 bits = 31 words (the AVX2 byte counters' limit), 2100 = 33 words (one flush).
@pytest.mark.parametrize("n_bits", [1, 7, 8, 31, 63, 64, 65, 100, 128, 129, 200, 256, 300, 1984, 2100])
@pytest.mark.parametrize("simd", [True, "avx2", False])
def test_kernel_matches_oracle(n_bits, simd):
    rng = np.random.default_rng(n_bits)
    for n_distinct in (None, 3, 20):
        db = random_codes(rng, 157, n_bits, n_distinct)
        queries = random_codes(rng, 13, n_bits, n_distinct)
        for k in (1, 2, 10, 64, 156, 157):
            expected = oracle(queries, db, k)
            for n_threads in (1, 2):
                dist, ind = hamming_kneighbors(
                    pack_bits(queries), pack_bits(db), k, n_threads=n_threads, simd=simd
                )
                assert dist.dtype == np.int32 and ind.dtype == np.int64
                np.testing.assert_array_equal(ind, expected[1])
                np.testing.assert_array_equal(dist, expected[0])


@pytest.mark.parametrize("simd", [True, "avx2", False])
def test_every_k_with_many_ties(simd):
    rng = np.random.default_rng(0)
    db = random_codes(rng, 40, 12, n_distinct=4)
    queries = random_codes(rng, 5, 12, n_distinct=4)
    for k in range(0, 41):
        expected = oracle(queries, db, k)
        dist, ind = hamming_kneighbors(pack_bits(queries), pack_bits(db), k, simd=simd)
        np.testing.assert_array_equal(ind, expected[1])
        np.testing.assert_array_equal(dist, expected[0])


@pytest.mark.parametrize("simd", [True, "avx2", False])
def test_exclude_self(simd):
    rng = np.random.default_rng(1)
    db = random_codes(rng, 50, 70, n_distinct=5)  # duplicates: self ties with others
    for k in (1, 5, 49):
        expected = oracle(db, db, k, exclude_self=True)
        dist, ind = hamming_kneighbors(
            pack_bits(db), pack_bits(db), k, exclude_self=True, n_threads=2, simd=simd
        )
        assert not np.any(ind == np.arange(50)[:, None])
        np.testing.assert_array_equal(ind, expected[1])
        np.testing.assert_array_equal(dist, expected[0])


def test_large_database_crosses_blocks_and_buffer_compactions():
    # Several database blocks (8192 rows at one word) and many compactions.
    rng = np.random.default_rng(2)
    db = random_codes(rng, 20000, 64, n_distinct=3000)
    queries = random_codes(rng, 40, 64)
    expected = oracle(queries, db, 30)
    for simd in (True, "avx2", False):
        dist, ind = hamming_kneighbors(pack_bits(queries), pack_bits(db), 30, n_threads=2, simd=simd)
        np.testing.assert_array_equal(ind, expected[1])
        np.testing.assert_array_equal(dist, expected[0])


def test_hand_computed_case():
    db = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
    dist, ind = hamming_kneighbors(pack_bits([[0, 0, 0, 0]]), pack_bits(db), 5)
    np.testing.assert_array_equal(ind, [[0, 4, 2, 3, 1]])
    np.testing.assert_array_equal(dist, [[0, 0, 1, 1, 4]])


def test_empty_queries_and_zero_k():
    db = pack_bits(np.ones((3, 10)))
    dist, ind = hamming_kneighbors(np.zeros((0, 1), dtype=np.uint64), db, 2)
    assert dist.shape == ind.shape == (0, 2)
    dist, ind = hamming_kneighbors(db, db, 0)
    assert dist.shape == (3, 0)


def test_kernel_rejects_bad_arguments():
    db = pack_bits(np.ones((3, 10)))
    with pytest.raises(ValueError, match="k must be >= 0"):
        hamming_kneighbors(db, db, -1)
    with pytest.raises(ValueError, match="exclude_self=True means query i is database row i"):
        hamming_kneighbors(pack_bits(np.ones((4, 10))), db, 1, exclude_self=True)
    with pytest.raises(ValueError, match="words per code"):
        hamming_kneighbors(pack_bits(np.ones((1, 70))), db, 1)
    with pytest.raises(ValueError, match="n_threads"):
        hamming_kneighbors(db, db, 1, n_threads=0)


def test_kernel_pads_when_fewer_candidates_than_k_and_honours_allowed_and_exclude():
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2, size=(40, 70))
    db, queries = pack_bits(bits[:30]), pack_bits(bits[30:])
    allowed = (rng.random(30) < 0.3).astype(np.uint8)
    exclude = rng.integers(-1, 30, size=10)
    dist, ind = hamming_kneighbors(queries, db, 35, n_threads=2, exclude=exclude, allowed=allowed)
    full = (bits[30:, None, :] != bits[None, :30, :]).sum(axis=2)
    for q in range(10):
        ok = np.flatnonzero(allowed.astype(bool) & (np.arange(30) != exclude[q]))
        order = ok[np.lexsort((ok, full[q, ok]))]
        np.testing.assert_array_equal(ind[q, : ok.size], order)
        np.testing.assert_array_equal(dist[q, : ok.size], full[q, order])
        assert np.all(ind[q, ok.size :] == -1) and np.all(dist[q, ok.size :] == 2**31 - 1)


def test_pack_bits_layout():
    bits = np.zeros((1, 70), dtype=np.uint8)
    bits[0, [0, 63, 64, 69]] = 1
    packed = pack_bits(bits)
    assert packed.shape == (1, n_words(70)) == (1, 2)
    assert packed[0, 0] == (1 | (1 << 63)) and packed[0, 1] == (1 | (1 << 5))
    for bad in ([[0, 2]], [[0.5, 1.0]], [[np.nan, 1.0]], [[-1, 0]]):
        with pytest.raises(ValueError, match="only 0 and 1"):
            pack_bits(bad)
    np.testing.assert_array_equal(pack_bits([[1.0, 0.0, 1.0]]), [[5]])  # floats 0/1 are bits


def test_simd_paths_are_named_and_checked():
    assert simd_path(False) == "portable"
    assert simd_path("avx2") in {"avx2", "portable"}
    assert simd_path(True) in {"avx512", "avx2", "portable"}
    with pytest.raises(ValueError, match="simd must be True, False"):
        hamming_kneighbors(np.zeros((1, 1), np.uint64), np.zeros((2, 1), np.uint64), 1, simd="sse")


@pytest.mark.parametrize("simd", [True, "avx2", False])
def test_distances_near_the_maximum_on_long_codes(simd):
    # Every byte of every word differs in all 8 bits: the AVX2 path's byte
    # counters would wrap after 32 words if not flushed in time.
    rng = np.random.default_rng(0)
    n_bits = 64 * 40
    db = np.zeros((50, n_bits), dtype=np.uint8)
    db[np.arange(50), rng.integers(0, n_bits, 50)] = 1  # one bit set per row
    queries = np.ones((3, n_bits), dtype=np.uint8)
    dist, ind = hamming_kneighbors(pack_bits(queries), pack_bits(db), 50, simd=simd)
    expected = oracle(queries, db, 50)
    np.testing.assert_array_equal(dist, expected[0])
    np.testing.assert_array_equal(ind, expected[1])
    assert dist.min() == n_bits - 1
