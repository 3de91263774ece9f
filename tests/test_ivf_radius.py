"""Range search over the inverted file, and re-ranked range search.

What is checked: the kernels ``ivf_adc_radius`` (code rows, uint8 and
uint16) and ``ivf_fastscan_radius`` (4-bit codes in fast-scan blocks, with
or without their rows, or rows alone; every SIMD path the processor has)
against the numpy oracle of the IVF kernels (float32 sums in subspace order
over the visited lists), bit for bit: several chunks per list, ties at the
threshold, a dominant subspace, ``allowed`` / ``exclude``, the
multi-index's joined table rows and 1 or 2 threads; then
``IVFQuantizedNeighbors.radius_neighbors``: exactly the items of the probed
cells whose ``kneighbors`` distance is within the radius (the same float
distances), for 8-bit and fast-scan codes, PQ and OPQ, flat and multi-index
cells, after ``add``, ``remove``, with ``allowed``, self-queries, loaded
memory-mapped; ``refine_factor`` on both searchers (candidates widened to
``r * radius ** 2`` by the codes, kept within ``radius`` by the rows); the
graph; and bad input.
"""

import itertools

import numpy as np
import pytest
from sklearn.base import clone
from sklearn_hash._kernels._adc import ivf_adc_radius
from sklearn_hash._kernels._fastscan import (
    ivf_fastscan_radius,
    pack_cell_blocks,
    simd_path,
)

from sklearn_hash import (
    ITQ,
    OPQ,
    IVFQuantizedNeighbors,
    ProductQuantizer,
    QuantizedNeighbors,
)

# ------------------------------------------------------------------------ kernel

def chunked(offsets, codes, ids, cuts, blocks_from, rows=False):
    """Kernel chunk table: each list cut into ``cuts`` chunks; a chunk of at least
    ``blocks_from`` rows (None: none) is given as fast-scan blocks, without its code rows
    unless ``rows``."""
    chunk_offsets, codes_at, ids_at, blocks_at, sizes, keep = [0], [], [], [], [], []
    for lst in range(len(offsets) - 1):
        bounds = np.linspace(offsets[lst], offsets[lst + 1], cuts + 1).astype(np.int64)
        for lo, hi in itertools.pairwise(bounds):
            c, i = np.ascontiguousarray(codes[lo:hi]), np.ascontiguousarray(ids[lo:hi])
            in_blocks = blocks_from is not None and hi - lo >= blocks_from
            blocks = pack_cell_blocks(c, np.array([0, hi - lo], np.int64))[0] if in_blocks \
                else None
            keep += [c, i, blocks]
            codes_at.append(c.ctypes.data if hi > lo and (rows or not in_blocks) else 0)
            ids_at.append(i.ctypes.data if hi > lo else 0)
            blocks_at.append(blocks.ctypes.data if in_blocks else 0)
            sizes.append(hi - lo)
        chunk_offsets.append(len(sizes))
    return (np.array(chunk_offsets, np.int64), np.array(codes_at, np.intp),
            np.array(ids_at, np.intp), np.array(sizes, np.int64),
            np.array(blocks_at, np.intp)), keep


def oracle_ball(ivf_oracle, tables, probes, rows, n_visit, offsets, codes, ids, exclude,
                threshold, allowed=None, second=None, split=0):
    """Every visited item below threshold, by index, from the kNN oracle with k = all."""
    list_tables, query_tables, coarse = tables
    if second is not None:  # the joined rows: one table per (query, probe) for the oracle
        n_q, n_probe = probes.shape
        joined = np.empty((n_q * n_probe, *list_tables.shape[1:]), np.float32)
        for q in range(n_q):
            for p in range(n_probe):
                joined[q * n_probe + p, :split] = list_tables[rows[q, p], :split]
                joined[q * n_probe + p, split:] = list_tables[second[q, p], split:]
        list_tables = joined
        rows = np.arange(n_q * n_probe, dtype=np.int64).reshape(n_q, n_probe)
    d, i = ivf_oracle(list_tables, query_tables, coarse, probes, rows, n_visit, offsets, codes,
                      ids, exclude, len(ids), allowed)
    out = []
    for q in range(len(d)):
        keep = (i[q] >= 0) & (d[q] < threshold)
        order = np.argsort(i[q][keep])
        out.append((d[q][keep][order], i[q][keep][order]))
    return out


PATHS = [p for p in ("portable", "avx2", "avx512")
         if ("portable", "avx2", "avx512").index(p)
         <= ("portable", "avx2", "avx512").index(simd_path(True))]


@pytest.mark.parametrize("kind", ["rows8", "rows16", "4-bit", "4-bit ties", "4-bit dominant"])
def test_kernels_equal_the_numpy_oracle(kind, ivf_oracle, random_index):
    rng = np.random.default_rng(len(kind))
    four_bit = kind.startswith("4-bit")
    M, K = (5, 16) if four_bit else (6, 300 if kind == "rows16" else 256)
    n, n_lists, n_q, n_probe = 1500, 12, 7, 4
    offsets, codes, ids = random_index(rng, n, n_lists, M, K,
                                       np.uint16 if kind == "rows16" else np.uint8)
    if kind == "4-bit ties":  # small integers: exact sums, many at the threshold
        lt = rng.integers(0, 3, (n_lists, M, K)).astype(np.float32)
        qt = rng.integers(-1, 2, (n_q, M, K)).astype(np.float32)
        coarse = rng.integers(0, 2, (n_q, n_probe)).astype(np.float32)
        thresholds = [np.nextafter(np.float32(6), np.float32(7)), np.float32(6), np.float32(0)]
    else:
        lt = rng.random((n_lists, M, K), dtype=np.float32) * 10
        qt = rng.random((n_q, M, K), dtype=np.float32) * -4
        coarse = (rng.random((n_q, n_probe)) * 30).astype(np.float32)
        thresholds = [np.float32(40), np.float32(55), np.float32(np.inf)]
        if kind == "4-bit dominant":  # one subspace spans 10**4 times the others
            lt[:, 0] *= np.float32(1e4)
            thresholds = [np.float32(3e4), np.float32(6e4)]
    probes = np.stack([rng.permutation(n_lists)[:n_probe] for _ in range(n_q)]).astype(np.int64)
    n_visit = rng.integers(0, n_probe + 1, n_q).astype(np.int64)
    n_visit[:3] = n_probe
    exclude = np.where(rng.random(n_q) < 0.5, ids[rng.integers(0, n, n_q)], -1)
    allowed = (rng.random(n) < 0.6).astype(np.uint8)
    second = (probes + 1) % n_lists
    code_bytes = 2 if kind == "rows16" else 1
    # code rows alone; then (4-bit) blocks alone, or both, or blocks for the long chunks only
    layouts = [(1, None), (3, None)] + ([(1, 1), (2, 40), (3, 1)] if four_bit else [])
    for cuts, blocks_from in layouts:
        lay, _keep = chunked(offsets, codes, ids, cuts, blocks_from, rows=cuts != 3)
        chunk_offsets, codes_at, ids_at, sizes, blocks_at = lay
        for threshold in thresholds:
            for mask in (None, allowed):
                for joined in (None, second):
                    expected = oracle_ball(ivf_oracle, (lt, qt, coarse), probes, probes,
                                           n_visit, offsets, codes, ids, exclude, threshold,
                                           mask, joined, 2)
                    args = (lt, qt, coarse, probes, probes, n_visit, chunk_offsets, codes_at,
                            ids_at)
                    runs = []
                    if blocks_from is None:
                        runs += [ivf_adc_radius(*args, sizes, code_bytes, exclude, threshold,
                                                allowed=mask, n_threads=t, second_rows=joined,
                                                split=2) for t in (1, 2)]
                    if four_bit:
                        runs += [ivf_fastscan_radius(*args, blocks_at, sizes, exclude,
                                                     threshold, allowed=mask, n_threads=t,
                                                     second_rows=joined, split=2, simd=path)
                                 for t in (1, 2) for path in PATHS]
                    for offs, dist, ind in runs:
                        assert offs[0] == 0 and offs[-1] == len(ind) == len(dist)
                        for q, (d, i) in enumerate(expected):
                            np.testing.assert_array_equal(ind[offs[q] : offs[q + 1]], i)
                            np.testing.assert_array_equal(dist[offs[q] : offs[q + 1]], d)


def test_kernels_reject_bad_arguments(random_index):
    rng = np.random.default_rng(0)
    offsets, codes, ids = random_index(rng, 300, 4, 3, 256)
    lay, _keep = chunked(offsets, codes, ids, 1, None)
    chunk_offsets, codes_at, ids_at, sizes, blocks_at = lay
    lt = np.zeros((4, 3, 256), np.float32)
    qt = np.zeros((2, 3, 256), np.float32)
    probes = np.array([[0, 1], [2, 3]], np.int64)
    args = (lt, qt, np.zeros((2, 2), np.float32), probes, probes, np.array([2, 2], np.int64),
            chunk_offsets, codes_at, ids_at, sizes, 1, np.full(2, -1, np.int64), 1.0)
    assert ivf_adc_radius(*args)[0][-1] == 300  # every sum is 0: all below 1
    assert ivf_adc_radius(*args[:12], 0.0)[0][-1] == 0  # none below 0
    with pytest.raises(ValueError, match="fast-scan searches 4-bit codes"):
        ivf_fastscan_radius(*args[:9], blocks_at, sizes, args[11], 1.0)
    with pytest.raises(ValueError, match="probes must be list numbers"):
        ivf_adc_radius(*args[:3], probes + 4, *args[4:])
    with pytest.raises(ValueError, match="code_bytes must be 1 or 2"):
        ivf_adc_radius(*args[:10], 4, *args[11:])
    with pytest.raises(ValueError, match="n_threads must be >= 1"):
        ivf_adc_radius(*args, n_threads=0)
    small = (lt[:, :, :16].copy(), qt[:, :, :16].copy(), *args[2:9], blocks_at, sizes,
             args[11], 1.0)
    with pytest.raises(ValueError, match="span_fraction must be in"):
        ivf_fastscan_radius(*small, span_fraction=0)


# ---------------------------------------------------------------------- searcher

def probed_cells(ivf, Q, n_probe):
    """The n_probe cells nearest each query (equal distances by cell number), numpy."""
    d2 = ((Q[:, None, :].astype(np.float64) - ivf.coarse_centers_[None]) ** 2).sum(-1)
    return np.argsort(d2, axis=1, kind="stable")[:, :n_probe]


def cell_of(ivf):
    cells = np.empty(ivf.n_samples_fit_, dtype=np.int64)
    offsets = ivf.list_offsets_
    for c in range(len(offsets) - 1):
        cells[ivf.ids_[offsets[c] : offsets[c + 1]]] = c
    return cells


def assert_ball_is_the_probed_kneighbors(ivf, Q, radius, n_probe, allowed=None):
    """radius_neighbors == the kneighbors answers of the probed cells within radius."""
    dist, ind = ivf.radius_neighbors(Q, radius=radius, n_probe=n_probe, allowed=allowed)
    for q in range(len(Q)):
        # kneighbors visits exactly the n_probe cells when asked for all their items
        probes = probed_cells(ivf, Q[q : q + 1], n_probe)[0]
        mask = np.isin(cell_of(ivf), probes)
        if allowed is not None:
            mask &= np.isin(np.arange(ivf.n_samples_fit_), allowed)
        mask &= ivf._live_mask().astype(bool)
        d, i = ivf.kneighbors(Q[q : q + 1], n_neighbors=int(mask.sum()), n_probe=n_probe,
                              allowed=allowed)
        assert set(i[0]) == set(np.flatnonzero(mask))
        keep = d[0] <= radius
        order = np.argsort(i[0][keep])
        np.testing.assert_array_equal(ind[q], i[0][keep][order])
        np.testing.assert_array_equal(dist[q], d[0][keep][order])
    return dist, ind


def ivf(quantizer, **kwargs):
    return IVFQuantizedNeighbors(quantizer, n_lists=8, n_probe=3, random_state=0, **kwargs)


SEARCHERS = {
    "pq8": ivf(ProductQuantizer(n_bits=32, random_state=0)),
    "fast-scan": ivf(ProductQuantizer(n_bits=64, subspace_bits=4, random_state=0)),
    "opq-fast-scan": ivf(OPQ(n_bits=64, subspace_bits=4, n_iter=3, random_state=0)),
}


@pytest.fixture(scope="module")
def digits(digits_split):
    X_db, y_db, X_q, _ = digits_split
    return X_db, y_db, X_q[:12]


@pytest.mark.parametrize("name", SEARCHERS)
def test_radius_search_is_the_probed_cells_within_radius(name, digits):
    X_db, y_db, Q = digits
    fitted = clone(SEARCHERS[name]).fit(X_db, y_db)
    if "fast-scan" in name:  # the codes of the large cells are in blocks only
        assert fitted._index.fast_scan
    d, _ = fitted.kneighbors(Q, n_neighbors=30)
    for radius in (0.0, float(np.median(d[:, 10])), float(d[0, 7])):
        for n_probe in (1, 3):
            dist, ind = assert_ball_is_the_probed_kneighbors(fitted, Q, radius, n_probe)
            assert dist.dtype == object and all(x.dtype == np.float64 for x in dist)
    assert sum(len(i) for i in ind) > 3 * len(Q)  # the last radius holds some items
    # sorted results: by distance, ties by index
    sd, si = fitted.radius_neighbors(Q, radius=float(d[0, 7]), sort_results=True)
    for q in range(len(Q)):
        order = np.lexsort((ind[q], dist[q]))
        np.testing.assert_array_equal(si[q], ind[q][order])
        np.testing.assert_array_equal(sd[q], dist[q][order])
    # the constructor's radius and n_probe
    fitted.set_params(radius=float(d[0, 7]), n_probe=1)
    np.testing.assert_array_equal(
        np.concatenate(fitted.radius_neighbors(Q, return_distance=False)),
        np.concatenate(fitted.radius_neighbors(Q, radius=float(d[0, 7]), n_probe=1,
                                               return_distance=False)))


def test_radius_search_through_growth_removal_filters_and_persistence(digits, tmp_path):
    X_db, y_db, Q = digits
    fitted = clone(SEARCHERS["fast-scan"]).fit(X_db[:600], y_db[:600])
    for start in (600, 900, 1100):  # several runs per cell
        fitted.add(X_db[start : start + 300], y_db[start : start + 300])
    radius = float(np.median(fitted.kneighbors(Q, n_neighbors=20)[0][:, 15]))
    assert_ball_is_the_probed_kneighbors(fitted, Q, radius, 3)
    fitted.remove(np.arange(0, fitted.n_samples_fit_, 3))
    allowed = np.arange(0, fitted.n_samples_fit_, 2)
    assert_ball_is_the_probed_kneighbors(fitted, Q, radius, 3, allowed=allowed)
    expected = fitted.radius_neighbors(Q, radius=radius)
    fitted.save(tmp_path / "index")
    for mmap_mode in ("r", None):
        loaded = IVFQuantizedNeighbors.load(tmp_path / "index", mmap_mode=mmap_mode)
        got = loaded.radius_neighbors(Q, radius=radius)
        for a, b in zip(expected, got):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)


def test_radius_search_of_the_multi_index_and_of_the_database(digits):
    X_db, y_db, Q = digits
    multi = IVFQuantizedNeighbors(ProductQuantizer(n_bits=64, subspace_bits=4, random_state=0),
                                  coarse="multi-index", n_lists=16, n_probe=4,
                                  random_state=0).fit(X_db, y_db)
    d, i = multi.kneighbors(Q, n_neighbors=400)  # the answers of more than 4 cells...
    radius = float(np.median(d[:, 5]))
    # ...so compare with kneighbors over the 4 cells the multi-sequence visits: those
    # holding the items a search asking for few neighbours returns first
    dist, ind = multi.radius_neighbors(Q, radius=radius)
    for q in range(len(Q)):
        few_d, few_i = multi.kneighbors(Q[q : q + 1], n_neighbors=1)
        assert few_d[0, 0] > radius or few_i[0, 0] in ind[q]
        np.testing.assert_array_less(dist[q], np.nextafter(radius, np.inf))
        # each returned item has the distance kneighbors gives it
        mine = dict(zip(i[q], d[q]))
        np.testing.assert_array_equal(dist[q], [mine[j] for j in ind[q]])
    # every item queries the others, never itself
    small = clone(SEARCHERS["pq8"]).fit(X_db[:300])
    kd = small.kneighbors(n_neighbors=5)[0]
    ind = small.radius_neighbors(radius=float(np.median(kd[:, -1])), return_distance=False)
    for q in range(300):
        assert q not in ind[q]
    queries = small._reconstruct(np.arange(300))
    for q in range(0, 300, 37):
        row = small.radius_neighbors(queries[q : q + 1], radius=float(np.median(kd[:, -1])),
                                     return_distance=False)[0]
        np.testing.assert_array_equal(ind[q], row[row != q])


def test_radius_graph(digits):
    X_db, y_db, Q = digits
    fitted = clone(SEARCHERS["pq8"]).fit(X_db, y_db)
    radius = float(np.median(fitted.kneighbors(Q, n_neighbors=10)[0][:, -1]))
    dist, ind = fitted.radius_neighbors(Q, radius=radius)
    graph = fitted.radius_neighbors_graph(Q, radius=radius, mode="distance")
    assert graph.shape == (len(Q), len(X_db)) and graph.nnz == sum(len(i) for i in ind)
    for q in range(len(Q)):
        row = graph.getrow(q)
        np.testing.assert_array_equal(row.indices, ind[q])
        np.testing.assert_array_equal(row.data, dist[q])
    conn = fitted.radius_neighbors_graph(Q, radius=radius, n_probe=1)
    assert np.all(conn.data == 1)
    assert conn.nnz == sum(len(i) for i in fitted.radius_neighbors(
        Q, radius=radius, n_probe=1, return_distance=False))


# ---------------------------------------------------------------- re-ranked balls

@pytest.mark.parametrize("make", [
    lambda: QuantizedNeighbors(ProductQuantizer(n_bits=32, random_state=0), refine_factor=2),
    lambda: ivf(ProductQuantizer(n_bits=64, subspace_bits=4, random_state=0), refine_factor=2),
    lambda: ivf(ProductQuantizer(n_bits=32, random_state=0), refine_factor=2,
                refine_storage="sq8"),
], ids=["flat", "ivf-fast-scan", "ivf-sq8"])
def test_refined_ball_is_the_widened_estimates_within_radius_by_the_rows(make, digits):
    X_db, y_db, Q = digits
    fitted = make().fit(X_db, y_db)
    estimates = clone(fitted).set_params(refine_factor=None).fit(X_db, y_db)
    rows = fitted._rerank_step().decode(fitted._vectors.to_array())  # what the rows hold
    exact = np.sqrt(((Q[:, None, :].astype(np.float64) - rows[None]) ** 2).sum(-1))
    radius = float(np.median(np.sort(exact, axis=1)[:, 8]))
    for refine in (1, 2, 6):
        wide = estimates.radius_neighbors(Q, radius=radius * np.sqrt(refine))[1]
        dist, ind = fitted.radius_neighbors(Q, radius=radius, refine_factor=refine)
        for q in range(len(Q)):
            expected = np.array([j for j in wide[q] if exact[q, j] <= radius], dtype=np.int64)
            np.testing.assert_array_equal(ind[q], expected)  # ascending index
            np.testing.assert_allclose(dist[q], exact[q, expected], rtol=1e-12)
            assert np.all(dist[q] <= radius)
        if refine == 6:  # wide enough here for every item within radius of the rows
            assert sum(len(i) for i in ind) == (exact <= radius).sum() or isinstance(
                fitted, IVFQuantizedNeighbors)
    # the estimator's refine_factor is the default; per call it changes for one search
    default = fitted.radius_neighbors(Q, radius=radius, return_distance=False)
    once = fitted.radius_neighbors(Q, radius=radius, refine_factor=2, return_distance=False)
    for a, b in zip(default, once):
        np.testing.assert_array_equal(a, b)
    # the database's items query with their rows
    ind = fitted.radius_neighbors(radius=radius, return_distance=False)
    for q in range(0, len(X_db), 211):
        assert q not in ind[q]
        row = fitted.radius_neighbors(rows[q : q + 1], radius=radius, return_distance=False)[0]
        np.testing.assert_array_equal(ind[q], row[row != q])


def test_bad_radius_search_arguments(digits):
    X_db, y_db, Q = digits
    fitted = clone(SEARCHERS["pq8"]).fit(X_db, y_db)
    with pytest.raises(ValueError, match="radius must be a finite number >= 0"):
        fitted.radius_neighbors(Q, radius=-1.0)
    with pytest.raises(ValueError, match="keeps none"):
        fitted.radius_neighbors(Q, radius=1.0, refine_factor=2)
    with pytest.raises(TypeError, match="radius_neighbors got an unexpected keyword"):
        fitted.radius_neighbors(Q, radius=1.0, n_probes=2)
    with pytest.raises(ValueError, match="n_probe"):
        fitted.radius_neighbors(Q, radius=1.0, n_probe=0)
    with pytest.raises(ValueError, match="radius"):
        clone(SEARCHERS["pq8"]).set_params(radius=-1.0).fit(X_db)
    # binary codes: the ball is one of bits; a refine_factor for it is refused
    hamming = QuantizedNeighbors(ITQ(n_bits=16, random_state=0), refine_factor=2).fit(X_db)
    plain = QuantizedNeighbors(ITQ(n_bits=16, random_state=0)).fit(X_db)
    for a, b in zip(hamming.radius_neighbors(Q, radius=3), plain.radius_neighbors(Q, radius=3)):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="Hamming distance"):
        hamming.radius_neighbors(Q, radius=3, refine_factor=2)
