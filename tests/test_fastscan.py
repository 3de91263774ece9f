"""The 4-bit fast-scan kernel and the FastScan back-end against numpy oracles.

What is checked: the block layout, the quantized sums of every SIMD path the
processor has (the filter alone, thresholds and ``allowed`` included), the
quantized tables (scale from the sampled bound, saturation, 16-bit bound),
the lower bound that makes the filter lossless, and the final answers, which
must equal float-table ADC (``adc_kneighbors``) exactly: distances, indices
and ties, for odd sizes, partly filled blocks, chunked databases, a dominant
subspace, ``allowed`` / ``exclude``, and 1 or 2 threads.
"""

import itertools

import numpy as np
import pytest
from sklearn_hash._kernels._adc import adc_kneighbors
from sklearn_hash._kernels._fastscan import (
    block_bytes,
    fastscan_kneighbors,
    pack_blocks,
    padded_subspaces,
    quantized_candidates,
    simd_path,
    unpack_block_rows,
)

from sklearn_hash import ProductQuantizer, QuantizedNeighbors
from sklearn_hash._backends import FastScan, TableScan, fastscan_simd_path

LEVEL = {"portable": 0, "avx2": 1, "avx512": 2}
# Every path this processor runs (the portable one always).
PATHS = [p for p in ("portable", "avx2", "avx512") if LEVEL[p] <= LEVEL[simd_path(True)]]


def random_tables(rng, n_queries, M, dominant=None):
    tables = rng.random((n_queries, M, 16), dtype=np.float32) * 4
    if dominant is not None:  # one subspace spans 10**dominant times the others
        tables[:, 0] *= np.float32(10.0**dominant)
    return tables


def oracle_blocks(codes):
    n, M = codes.shape
    Mp = padded_subspaces(M)
    blocks = np.zeros(((n + 127) // 128, Mp * 64), dtype=np.uint8)
    for j in range(n):
        b, r = divmod(j, 128)
        g, i = divmod(r, 32)
        for m in range(M):
            blocks[b, 64 * m + 16 * g + i % 16] |= codes[j, m] << (4 * (i // 16))
    return blocks


def adc_oracle(tables_q, codes):
    """float32 ADC distances added in subspace order, as the kernels do."""
    entries = tables_q[np.arange(codes.shape[1]), codes.astype(np.intp)]
    return np.add.accumulate(entries, axis=1, dtype=np.float32)[:, -1]


def fastscan(tables, codes, k, chunks=1, **kwargs):
    bounds = np.linspace(0, len(codes), chunks + 1).astype(int)
    parts = [np.ascontiguousarray(codes[a:b]) for a, b in itertools.pairwise(bounds)]
    return fastscan_kneighbors(tables, [pack_blocks(p) for p in parts], [len(p) for p in parts],
                               k, **kwargs)


@pytest.mark.parametrize("M", [1, 3, 4, 6, 8, 13, 32])
@pytest.mark.parametrize("n", [1, 31, 32, 33, 95, 128, 129, 300])
def test_block_layout(M, n):
    rng = np.random.default_rng(n * 100 + M)
    codes = rng.integers(0, 16, (n, M), dtype=np.uint8)
    blocks = pack_blocks(codes)
    assert blocks.shape == ((n + 127) // 128, block_bytes(M))
    assert block_bytes(M) == 64 * padded_subspaces(M) and padded_subspaces(M) % 2 == 0
    np.testing.assert_array_equal(blocks, oracle_blocks(codes))


@pytest.mark.parametrize("M", [1, 3, 8, 13, 64])
@pytest.mark.parametrize("n", [1, 33, 128, 300])
def test_unpacking_rows_inverts_the_layout(M, n):
    rng = np.random.default_rng(n * 100 + M)
    codes = rng.integers(0, 16, (n, M), dtype=np.uint8)
    blocks = oracle_blocks(codes)  # the layout as the numpy oracle writes it
    np.testing.assert_array_equal(unpack_block_rows(blocks, np.arange(n), M), codes)
    rows = rng.integers(0, n, 50)  # any rows, repeated, in any order
    np.testing.assert_array_equal(unpack_block_rows(blocks, rows, M), codes[rows])
    assert unpack_block_rows(blocks, np.arange(0), M).shape == (0, M)
    # past the end of the data, in the last block: its zero padding
    last = len(blocks) * 128 - 1
    if last >= n:
        np.testing.assert_array_equal(unpack_block_rows(blocks, np.array([last]), M), 0)
    with pytest.raises(ValueError, match=r"rows must be in \[0, "):
        unpack_block_rows(blocks, np.array([len(blocks) * 128]), M)
    with pytest.raises(ValueError, match=r"rows must be in \[0, "):
        unpack_block_rows(blocks, np.array([-1]), M)
    with pytest.raises(ValueError, match="do not hold codes of"):
        unpack_block_rows(blocks, np.arange(n), M + 2)


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("M", [1, 2, 5, 8, 16, 24, 32, 64, 100])
def test_quantized_sums_every_path(simd, M):
    rng = np.random.default_rng(M)
    n = 128 * 3 + 45  # a partly filled last block
    codes = rng.integers(0, 16, (n, M), dtype=np.uint8)
    Mp = padded_subspaces(M)
    lut = np.zeros((Mp, 16), dtype=np.uint8)
    lut[:M] = rng.integers(0, 128, (M, 16))
    if M >= 2:
        lut[1] = 127  # the largest entries, in two subspaces added in bytes
        lut[0, :] = 127
    expected = lut[np.arange(M), codes].sum(axis=1)
    blocks = pack_blocks(codes)
    pos, q = quantized_candidates(lut, blocks, n, 65536, simd=simd)
    np.testing.assert_array_equal(pos, np.arange(n))
    np.testing.assert_array_equal(q, expected)
    allowed = (rng.random(n) < 0.6).astype(np.uint8)
    for threshold in (0, 1, int(np.median(expected)), int(expected.max()), 65535):
        pos, q = quantized_candidates(lut, blocks, n, threshold, allowed=allowed, simd=simd)
        keep = np.flatnonzero((expected < threshold) & (allowed > 0))
        np.testing.assert_array_equal(pos, keep)
        np.testing.assert_array_equal(q, expected[keep])


@pytest.mark.parametrize("simd", PATHS)
def test_sums_never_overflow_16_bits(simd):
    # 516 subspaces of entries 127: sums up to 65532, past the signed 16-bit range.
    M = 516
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 16, (70, M), dtype=np.uint8)
    lut = np.full((M, 16), 127, dtype=np.uint8)
    lut[:, 0] = rng.integers(0, 128, M)
    expected = lut[np.arange(M), codes].sum(axis=1)
    assert expected.max() > 32767
    _, q = quantized_candidates(lut, pack_blocks(codes), 70, 65536, simd=simd)
    np.testing.assert_array_equal(q, expected)
    with pytest.raises(ValueError, match="too many subspaces"):
        quantized_candidates(np.zeros((520, 16), np.uint8), np.zeros((1, 520 * 64), np.uint8),
                             1, 65536)


def oracle_quantization(table, bound, qmax):
    """The kernel's quantization of one table, in float64 as it computes it."""
    t = table.astype(np.float64)
    lo = t.min(axis=1)
    bias = np.add.accumulate(lo)[-1]
    widest = (t.max(axis=1) - lo).max()
    span = min(widest, bound - bias) if np.isfinite(bound) and bound - bias > 0 else widest
    e = t - lo[:, None]
    q = np.minimum(qmax, np.rint(e * (qmax / span)))
    scale = span / qmax
    e_over = np.add.accumulate((scale * q - e).max(axis=1))[-1]
    return q.astype(np.uint8), scale, bias, e_over


@pytest.mark.parametrize("dominant", [None, 4])
def test_quantized_tables_and_lower_bound(dominant):
    rng = np.random.default_rng(7)
    M, n, k = 12, 3000, 7
    codes = rng.integers(0, 16, (n, M), dtype=np.uint8)
    tables = random_tables(rng, 9, M, dominant)
    _, _, stats = fastscan(tables, codes, k, return_stats=True)
    sample = (np.arange(1024) * n) // 1024
    qmax = min(127, 65535 // M)
    for q in range(len(tables)):
        d_sample = adc_oracle(tables[q], codes[sample])
        bound = np.sort(d_sample)[k - 1]
        assert stats["bound"][q] == bound
        lut, scale, bias, e_over = oracle_quantization(tables[q], bound, qmax)
        np.testing.assert_array_equal(stats["luts"][q, :M], lut)
        assert not stats["luts"][q, M:].any()
        np.testing.assert_allclose([stats["scale"][q], stats["bias"][q], stats["e_over"][q]],
                                   [scale, bias, e_over], rtol=1e-12)
        # The sample bound clips the tables: entries saturate at qmax...
        if dominant:
            assert (lut == qmax).sum() > 8 and scale < (tables[q, 0].max() - tables[q, 0].min()) / qmax
        # ... and the quantized sum never overestimates the float distance.
        Q = lut[np.arange(M), codes].sum(axis=1).astype(np.float64)
        lower = scale * Q - e_over + bias - stats["slack"][q]
        assert np.all(lower <= adc_oracle(tables[q], codes))


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("M", [1, 3, 8, 16, 32])
@pytest.mark.parametrize("n", [1, 5, 33, 1000, 4099])
def test_answers_equal_float_adc(simd, M, n):
    rng = np.random.default_rng(n + 7 * M)
    codes = rng.integers(0, 16, (n, M), dtype=np.uint8)
    tables = random_tables(rng, 11, M)
    for k in sorted({1, 4, min(n, 10), n + 3}):
        expected = adc_kneighbors(tables, codes, k)
        for chunks in (1, 3):
            got = fastscan(tables, codes, k, chunks=min(chunks, n), simd=simd)
            np.testing.assert_array_equal(got[1], expected[1])
            np.testing.assert_array_equal(got[0], expected[0])


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("dominant", [2, 4, 6])
def test_one_dominant_subspace(simd, dominant):
    """Tables whose first subspace spans up to 10**6 times the others."""
    rng = np.random.default_rng(dominant)
    M, n = 16, 6000
    codes = rng.integers(0, 16, (n, M), dtype=np.uint8)
    tables = random_tables(rng, 20, M, dominant)
    expected = adc_kneighbors(tables, codes, 10)
    d, i, stats = fastscan(tables, codes, 10, simd=simd, return_stats=True)
    np.testing.assert_array_equal(i, expected[1])
    np.testing.assert_array_equal(d, expected[0])
    # The filter still works: far fewer items re-scored than scanned.
    assert stats["rescored"].mean() < n / 10


@pytest.mark.parametrize("simd", PATHS)
def test_ties_by_index(simd):
    rng = np.random.default_rng(1)
    M, n = 6, 2000
    codes = rng.integers(0, 4, (n, M), dtype=np.uint8)  # many equal codes
    tables = np.round(random_tables(rng, 10, M)).astype(np.float32)  # many equal sums
    for k in (1, 15, 200):
        expected = adc_kneighbors(tables, codes, k)
        got = fastscan(tables, codes, k, chunks=2, simd=simd)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_array_equal(got[0], expected[0])


def test_constant_tables():
    codes = np.random.default_rng(0).integers(0, 16, (100, 4), dtype=np.uint8)
    tables = np.ones((2, 4, 16), dtype=np.float32)
    d, i = fastscan(tables, codes, 5)
    np.testing.assert_array_equal(i, [[0, 1, 2, 3, 4]] * 2)
    np.testing.assert_array_equal(d, 4.0)


@pytest.mark.parametrize("simd", PATHS)
def test_allowed_and_exclude(simd):
    rng = np.random.default_rng(5)
    M, n, k = 8, 3001, 6
    codes = rng.integers(0, 16, (n, M), dtype=np.uint8)
    tables = random_tables(rng, 12, M, dominant=3)
    allowed = (rng.random(n) < 0.05).astype(np.uint8)
    exclude = rng.integers(-1, n, len(tables)).astype(np.int64)
    exclude[:4] = adc_kneighbors(tables[:4], codes, 1)[1][:, 0]  # each query's own best
    d, i = fastscan(tables, codes, k, chunks=3, simd=simd, allowed=allowed, exclude=exclude)
    for q in range(len(tables)):
        rows = np.flatnonzero(allowed.astype(bool) & (np.arange(n) != exclude[q]))
        dist = adc_oracle(tables[q], codes[rows])
        order = np.lexsort((rows, dist))[:k]
        np.testing.assert_array_equal(i[q], rows[order])
        np.testing.assert_array_equal(d[q], dist[order])
    # Fewer allowed rows than k: padded.
    few = np.zeros(n, dtype=np.uint8)
    few[[3, 2000]] = 1
    d, i = fastscan(tables, codes, 4, simd=simd, allowed=few)
    assert np.all(i[:, 2:] == -1) and np.all(np.isinf(d[:, 2:]))
    assert set(i[0, :2]) == {3, 2000}


def test_threads_and_paths_agree():
    rng = np.random.default_rng(9)
    codes = rng.integers(0, 16, (5000, 24), dtype=np.uint8)
    tables = random_tables(rng, 40, 24, dominant=3)
    results = [fastscan(tables, codes, 10, n_threads=t, simd=s) for t in (1, 2) for s in PATHS]
    for d, i in results[1:]:
        np.testing.assert_array_equal(i, results[0][1])
        np.testing.assert_array_equal(d, results[0][0])


def test_bad_input():
    codes = np.zeros((10, 4), dtype=np.uint8)
    codes[3, 2] = 16
    with pytest.raises(ValueError, match=r"codeword indices must be in \[0, 15\].*4-bit"):
        pack_blocks(codes)
    good = np.zeros((10, 4), dtype=np.uint8)
    blocks = pack_blocks(good)
    with pytest.raises(ValueError, match="16 codewords"):
        fastscan_kneighbors(np.zeros((1, 4, 256), np.float32), [blocks], [10], 3)
    with pytest.raises(ValueError, match="block layout"):
        fastscan_kneighbors(np.zeros((1, 4, 16), np.float32), [blocks[:, :16]], [10], 3)
    with pytest.raises(ValueError, match="block layout"):  # 5 subspaces: wider blocks
        fastscan_kneighbors(np.zeros((1, 5, 16), np.float32), [blocks], [10], 3)
    with pytest.raises(ValueError, match="block layout"):  # 129 codes need two blocks
        fastscan_kneighbors(np.zeros((1, 4, 16), np.float32), [blocks], [129], 3)
    with pytest.raises(ValueError, match="chunk_sizes"):
        fastscan_kneighbors(np.zeros((1, 4, 16), np.float32), [blocks], [10, 3], 3)
    with pytest.raises(ValueError, match="chunk_sizes"):
        fastscan_kneighbors(np.zeros((1, 4, 16), np.float32), [blocks], [-1], 3)
    with pytest.raises(ValueError, match="chunk_sizes"):  # would wrap to -100 as int64
        fastscan_kneighbors(np.zeros((1, 4, 16), np.float32), [blocks[:0]],
                            np.array([2**64 - 100], dtype=np.uint64), 3)
    with pytest.raises(ValueError, match="NaN"):
        fastscan_kneighbors(np.full((1, 4, 16), np.nan, np.float32), [blocks], [10], 3)
    with pytest.raises(ValueError, match="allowed"):
        fastscan_kneighbors(np.zeros((1, 4, 16), np.float32), [blocks], [10], 3,
                            allowed=np.ones(3, np.uint8))
    with pytest.raises(ValueError, match="simd"):
        fastscan_kneighbors(np.zeros((1, 4, 16), np.float32), [blocks], [10], 3, simd="sse9")
    index = FastScan(4)
    with pytest.raises(ValueError, match=r"codeword indices must be in \[0, 15\]"):
        index.add(codes)
    index.add(good)
    with pytest.raises(ValueError, match=r"tables must have shape \(n_queries, 4, 16\)"):
        index.search(np.zeros((1, 3, 16), np.float32), 3)  # blocks of 3 and 4 look alike
    with pytest.raises(ValueError, match="4 columns"):
        index.add(np.zeros((3, 5), np.uint8))
    assert len(index) == 10


def test_back_end_growth_segments_and_compaction():
    rng = np.random.default_rng(2)
    M = 7
    codes = rng.integers(0, 16, (777, M), dtype=np.uint8)
    tables = random_tables(rng, 15, M, dominant=2)
    index = FastScan(M)
    for a, b in [(0, 5), (5, 37), (37, 38), (38, 200), (200, 300)]:  # batches that split blocks
        index.add(codes[a:b])
        assert np.array_equal(index._blocks_and_sizes()[0][-1], pack_blocks(codes[:b]))
    index.add_segment({"codes": codes[300:500]})  # as when loading
    index.add(codes[500:701])
    index.add_segment({"codes": codes[701:777]})
    assert len(index) == 777
    np.testing.assert_array_equal(index.codes.to_array(), codes)
    np.testing.assert_array_equal(index.segment_arrays(290, 710)["codes"], codes[290:710])
    reference = TableScan(M, 16)
    reference.add(codes)
    allowed = (rng.random(777) < 0.5).astype(np.uint8)
    exclude = rng.integers(-1, 777, 15).astype(np.int64)
    for kwargs in ({}, {"allowed": allowed, "exclude": exclude}):
        got = index.search(tables, 9, n_threads=2, **kwargs)
        expected = reference.search(tables, 9, **kwargs)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_array_equal(got[0], expected[0])
    keep = rng.random(777) < 0.7
    index.compact(keep)
    reference.compact(keep)
    np.testing.assert_array_equal(index.search(tables, 9)[1], reference.search(tables, 9)[1])
    index.add(codes[:3])
    assert len(index) == keep.sum() + 3


@pytest.mark.skipif(fastscan_simd_path() == "portable",
                    reason="QuantizedNeighbors keeps TableScan without AVX2")
def test_searcher_uses_fast_scan_with_the_same_answers():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3000, 32)).astype(np.float32)
    X[:, 0] *= 40  # one dominant direction
    search = QuantizedNeighbors(ProductQuantizer(n_bits=64, subspace_bits=4, random_state=0),
                                n_neighbors=10).fit(X)
    assert isinstance(search._index, FastScan)
    reference = TableScan(16, 16)
    reference.add(search.codes_)
    tables = search.quantizer_.distance_tables(X[:50])
    d, i = search.kneighbors(X[:50])
    expected = reference.search(tables, 10)
    np.testing.assert_array_equal(i, expected[1])
    np.testing.assert_allclose(d, np.sqrt(np.maximum(expected[0], 0)))
    eight_bit = QuantizedNeighbors(ProductQuantizer(n_bits=64, random_state=0)).fit(X)
    assert isinstance(eight_bit._index, TableScan)
