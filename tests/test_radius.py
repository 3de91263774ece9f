"""radius_neighbors and radius_neighbors_graph: exact, against brute force on the codes."""

import numpy as np
import pytest
from sklearn.base import clone
from sklearn_hash._kernels._adc import adc_radius
from sklearn_hash._kernels._hamming import hamming_radius, simd_path

from sklearn_hash import ITQ, ProductQuantizer, QuantizedNeighbors
from sklearn_hash._codes import pack_bits

HAMMING = QuantizedNeighbors(ITQ(n_bits=24, random_state=0), n_neighbors=5)
ADC = QuantizedNeighbors(ProductQuantizer(n_bits=16, subspace_bits=4, random_state=0))
SDC = QuantizedNeighbors(ProductQuantizer(n_bits=16, subspace_bits=4, random_state=0),
                         metric="sdc")


@pytest.fixture(scope="module")
def data(digits_split):
    return digits_split


def all_distances(searcher, X):
    """The distances kneighbors would return, from every query to every item."""
    n = searcher.n_samples_fit_
    d, i = searcher.kneighbors(X, n_neighbors=n)
    out = np.empty((len(X), n), dtype=np.float64)
    np.put_along_axis(out, i, d, axis=1)
    return out


@pytest.mark.parametrize("searcher", [HAMMING, ADC, SDC], ids=["hamming", "adc", "sdc"])
def test_radius_search_equals_brute_force_with_ties_at_the_radius(searcher, data):
    X_db, y_db, X_q, _ = data
    fitted = clone(searcher).fit(X_db, y_db)
    full = all_distances(fitted, X_q[:25])
    # Radii taken from the distances themselves: items exactly at the radius count.
    for radius in (np.median(full[:, :50]), full[0, 7], 0.0):
        dist, ind = fitted.radius_neighbors(X_q[:25], radius=radius)
        assert dist.dtype == object and ind.dtype == object and len(ind) == 25
        for q in range(25):
            expected = np.flatnonzero(full[q] <= radius)
            np.testing.assert_array_equal(ind[q], expected)  # ascending index order
            np.testing.assert_array_equal(dist[q], full[q, expected])
        d_sorted, i_sorted = fitted.radius_neighbors(X_q[:25], radius=radius, sort_results=True)
        for q in range(25):
            order = np.lexsort((ind[q], dist[q]))
            np.testing.assert_array_equal(i_sorted[q], ind[q][order])
            assert np.all(np.diff(d_sorted[q]) >= 0)
    graph = fitted.radius_neighbors_graph(X_q[:25], radius=radius, mode="distance")
    assert graph.shape == (25, len(X_db)) and graph.dtype == np.float64
    assert graph.nnz == sum(len(i) for i in ind)
    conn = fitted.radius_neighbors_graph(X_q[:25], radius=radius)
    np.testing.assert_array_equal(conn.indices, graph.indices)
    assert np.all(conn.data == 1)


@pytest.mark.parametrize("searcher", [HAMMING, ADC], ids=["hamming", "adc"])
def test_radius_search_of_the_database_leaves_each_item_out(searcher, data):
    X_db, y_db, _, _ = data
    fitted = clone(searcher).fit(X_db[:300], y_db[:300])
    d, i = fitted.kneighbors(n_neighbors=5)
    radius = float(np.median(d[:, -1]))
    ind = fitted.radius_neighbors(radius=radius, return_distance=False)
    for q in range(300):
        assert q not in ind[q]
        expected = i[q][d[q] <= radius]
        assert set(expected) <= set(ind[q])
    allowed = np.arange(0, 300, 2)
    ind = fitted.radius_neighbors(radius=radius, return_distance=False, allowed=allowed)
    assert all(np.all(row % 2 == 0) for row in ind)
    fitted.remove([0])
    with pytest.raises(ValueError, match="call compact"):
        fitted.radius_neighbors(radius=radius)


def test_removed_and_filtered_items_are_not_in_the_ball(data):
    X_db, y_db, X_q, _ = data
    fitted = clone(ADC).fit(X_db, y_db)
    big = 1e6
    everything = fitted.radius_neighbors(X_q[:3], radius=big, return_distance=False)
    assert all(len(row) == len(X_db) for row in everything)
    fitted.remove([1, 2, 3])
    rows = fitted.radius_neighbors(X_q[:3], radius=big, return_distance=False,
                                   allowed=np.arange(10))
    for row in rows:
        np.testing.assert_array_equal(row, [0, 4, 5, 6, 7, 8, 9])


def test_radius_kernels_match_numpy_on_every_path():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, (301, 130))
    packed = pack_bits(bits)
    full = (bits[:7, None] != bits[None]).sum(2)
    allowed = (rng.random(301) < 0.7).astype(np.uint8)
    exclude = np.array([0, -1, 5, 3, -1, 300, 2], dtype=np.int64)
    paths = {simd_path(s) for s in (False, "avx2", True)}
    for path in paths:
        for n_threads in (1, 2):
            offsets, dist, ind = hamming_radius(packed[:7], packed, 60, n_threads=n_threads,
                                                simd=path, exclude=exclude, allowed=allowed)
            for q in range(7):
                keep = (full[q] <= 60) & allowed.astype(bool) & (np.arange(301) != exclude[q])
                np.testing.assert_array_equal(ind[offsets[q]:offsets[q + 1]], np.flatnonzero(keep))
                np.testing.assert_array_equal(dist[offsets[q]:offsets[q + 1]], full[q, keep])
    tables = rng.integers(0, 4, (5, 3, 16)).astype(np.float32)  # exact sums, many ties
    codes = rng.integers(0, 16, (500, 3)).astype(np.uint8)
    sums = tables[:, 0, codes[:, 0]] + tables[:, 1, codes[:, 1]] + tables[:, 2, codes[:, 2]]
    offsets, dist, ind = adc_radius(tables, codes, np.nextafter(np.float32(4), np.float32(5)),
                                    n_threads=2)
    for q in range(5):
        np.testing.assert_array_equal(ind[offsets[q]:offsets[q + 1]], np.flatnonzero(sums[q] <= 4))


def test_bad_radius_arguments(data):
    X_db, y_db, X_q, _ = data
    fitted = clone(HAMMING).fit(X_db, y_db)
    with pytest.raises(ValueError, match="radius must be a finite number >= 0"):
        fitted.radius_neighbors(X_q, radius=-1)
    with pytest.raises(ValueError, match="radius must be a finite number >= 0"):
        fitted.radius_neighbors(X_q, radius=np.inf)
    with pytest.raises(ValueError, match="return_distance must be True"):
        fitted.radius_neighbors(X_q, return_distance=False, sort_results=True)
    with pytest.raises(ValueError, match="Unsupported mode"):
        fitted.radius_neighbors_graph(X_q, mode="weights")
    with pytest.raises(ValueError, match="radius"):
        QuantizedNeighbors(radius=-2.0).fit(X_db)
    with pytest.raises(ValueError, match="radius must be >= 0"):
        hamming_radius(pack_bits(np.ones((1, 8))), pack_bits(np.ones((2, 8))), -1)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("searcher", [HAMMING, ADC], ids=["hamming", "adc"])
def test_radius_beyond_every_distance_returns_every_item(searcher, data):
    # radius=1e300 overflowed converting to a C long in the Hamming kernel, and warned of
    # an overflow for L2 distances
    X_db, _, X_q, _ = data
    fitted = clone(searcher).fit(X_db)
    for radius in (1e300, 1e30):
        distances, indices = fitted.radius_neighbors(X_q[:3], radius=radius, sort_results=True)
        for d, i in zip(distances, indices):
            assert len(i) == len(X_db)
            np.testing.assert_array_equal(np.sort(i), np.arange(len(X_db)))


@pytest.mark.parametrize("searcher", [HAMMING, ADC, SDC, QuantizedNeighbors(
    ProductQuantizer(n_bits=16, random_state=0))], ids=["hamming", "adc4", "sdc", "adc8"])
def test_radius_search_of_an_emptied_index_returns_empty_balls(searcher, data):
    # every item removed and compacted away: the chunked back-ends had no chunk to
    # concatenate the answers of
    X_db, _, X_q, _ = data
    fitted = clone(searcher).fit(X_db[:300])
    fitted.remove(np.arange(300))
    fitted.compact()
    assert fitted.n_samples_fit_ == 0
    distances, indices = fitted.radius_neighbors(X_q[:3], radius=1e30)
    assert [len(i) for i in indices] == [0, 0, 0] and [len(d) for d in distances] == [0, 0, 0]
    assert fitted.radius_neighbors_graph(X_q[:3], radius=1e30).nnz == 0


def test_fast_scan_range_search_equals_the_float_scan(data, tmp_path):
    # 4-bit codes: the exhaustive range search filters the blocks by fast-scan
    # (ivf_fastscan_radius over the chunks as one list); the answers are TableScan's
    from sklearn_hash._backends import FastScan, TableScan

    X_db, _, X_q, _ = data
    fitted = QuantizedNeighbors(ProductQuantizer(n_bits=64, subspace_bits=4,
                                                 random_state=0)).fit(X_db[:700])
    if not isinstance(fitted._index, FastScan):
        pytest.skip("no byte shuffles: 4-bit codes are searched by TableScan")
    fitted.save(tmp_path / "index")
    fitted = QuantizedNeighbors.load(tmp_path / "index")  # a sealed chunk of blocks
    fitted.add(X_db[700:1000])                             # and a tail
    assert fitted._index._blocks_and_sizes()[1] == [700, 300]
    floats = TableScan(16, 16)
    floats.add(fitted.codes_)
    tables = fitted._encode_queries(X_q[:40])
    rng = np.random.default_rng(0)
    allowed = (rng.random(1000) < 0.7).astype(np.uint8)
    exclude = rng.integers(-1, 1000, 40).astype(np.int64)
    full = floats.search(tables, 1000)[0]
    for threshold in (float(np.median(full[:, 20])), float(full[0, 3]), 0.0, np.inf):
        for kwargs in ({}, {"allowed": allowed, "exclude": exclude}):
            for n_threads in (1, 2):
                got = fitted._index.radius(tables, threshold, n_threads=n_threads, **kwargs)
                expected = floats.radius(tables, threshold, **kwargs)
                for a, b in zip(got, expected):
                    np.testing.assert_array_equal(a, b)
