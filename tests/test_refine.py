"""Exact re-ranking (refine_factor): candidates from the codes, order from the vectors."""

import itertools

import numpy as np
import pytest
from sklearn.base import clone

from sklearn_hash import (
    ITQ,
    IVFQuantizedNeighbors,
    ProductQuantizer,
    QuantizedNeighbors,
)

SEARCHERS = [
    QuantizedNeighbors(ITQ(n_bits=16, random_state=0), n_neighbors=5, refine_factor=3),
    QuantizedNeighbors(ProductQuantizer(n_bits=16, subspace_bits=4, random_state=0),
                       n_neighbors=5, refine_factor=3),
    IVFQuantizedNeighbors(ProductQuantizer(n_bits=16, subspace_bits=4, random_state=0),
                          n_lists=8, n_probe=2, n_neighbors=5, refine_factor=3, random_state=0),
]
IDS = ["hamming", "adc", "ivf"]


@pytest.fixture(scope="module")
def data(digits_split):
    X_db, y_db, X_q, y_q = digits_split
    return X_db.astype(np.float32), y_db, X_q.astype(np.float32), y_q


def exact_rerank(X, V, candidates, k):
    """The oracle: exact float64 L2 over each row's candidates, ties by index."""
    out_d, out_i = [], []
    for x, cand in zip(X.astype(np.float64), candidates):
        d = np.sqrt(((V[cand].astype(np.float64) - x) ** 2).sum(1))
        order = np.lexsort((cand, d))[:k]
        out_d.append(d[order])
        out_i.append(cand[order])
    return np.array(out_d), np.array(out_i)


@pytest.mark.parametrize("searcher", SEARCHERS, ids=IDS)
def test_refine_equals_exact_search_over_the_candidate_set(searcher, data):
    X_db, y_db, X_q, _ = data
    fitted = clone(searcher).fit(X_db, y_db)
    plain = clone(searcher).set_params(refine_factor=None).fit(X_db, y_db)
    candidates = plain.kneighbors(X_q, n_neighbors=15, return_distance=False)
    dist, ind = fitted.kneighbors(X_q)
    exp_d, exp_i = exact_rerank(X_q, X_db, candidates, 5)
    np.testing.assert_array_equal(ind, exp_i)
    np.testing.assert_allclose(dist, exp_d, rtol=1e-12)
    # A factor large enough to take every item gives exact search.
    d_all, i_all = fitted.kneighbors(X_q[:20], refine_factor=len(X_db), n_probe=8) \
        if isinstance(fitted, IVFQuantizedNeighbors) else \
        fitted.kneighbors(X_q[:20], refine_factor=len(X_db))
    true = np.sqrt(((X_q[:20, None].astype(np.float64) - X_db[None]) ** 2).sum(2))
    order = np.lexsort((np.broadcast_to(np.arange(len(X_db)), true.shape), true), axis=1)[:, :5]
    np.testing.assert_array_equal(i_all, order)
    assert fitted.refine_factor == 3  # the per-call value did not stick


@pytest.mark.parametrize("searcher", SEARCHERS, ids=IDS)
def test_refine_with_filters_removal_self_queries_and_persistence(searcher, data, tmp_path):
    X_db, y_db, X_q, _ = data
    fitted = clone(searcher).fit(X_db[:900], y_db[:900])
    fitted.add(X_db[900:], y_db[900:])
    allowed = np.arange(0, len(X_db), 3)
    ind = fitted.kneighbors(X_q, allowed=allowed, return_distance=False)
    assert np.isin(ind, allowed).all()
    own = fitted.kneighbors(n_neighbors=3, return_distance=False)
    assert not (own == np.arange(len(X_db))[:, None]).any()
    gone = np.unique(ind[:, 0])
    fitted.remove(gone)
    dist, ind2 = fitted.kneighbors(X_q)
    assert not np.isin(ind2, gone).any()
    loaded = type(fitted).load(fitted.save(tmp_path / "index"))
    for chunk in loaded._vectors.chunks():
        assert not chunk.flags.writeable  # memory-mapped, read-only
    np.testing.assert_array_equal(loaded.kneighbors(X_q)[1], ind2)
    mapping = fitted.compact()
    np.testing.assert_array_equal(fitted.kneighbors(X_q)[1], mapping[ind2])
    np.testing.assert_array_equal(fitted._vectors.to_array(), X_db[mapping >= 0])


def test_refine_errors(data):
    X_db, y_db, X_q, _ = data
    with pytest.raises(ValueError, match="refine_factor"):
        QuantizedNeighbors(refine_factor=0).fit(X_db)
    plain = QuantizedNeighbors(ITQ(n_bits=16, random_state=0)).fit(X_db)
    with pytest.raises(ValueError, match="keeps none: fit it with refine_factor set"):
        plain.kneighbors(X_q, refine_factor=2)
    fitted = clone(SEARCHERS[1]).fit(X_db)
    with pytest.raises(ValueError, match="refine_factor"):
        fitted.kneighbors(X_q, refine_factor=0)
    with pytest.raises(ValueError, match="refine_factor"):
        fitted.kneighbors(X_q, refine_factor=1.5)


def test_refine_kernel_matches_numpy_over_chunks_threads_and_ties():
    from sklearn_hash._kernels._refine import refine_kneighbors

    rng = np.random.default_rng(0)
    V = rng.integers(0, 3, (200, 6)).astype(np.float32)  # small integers: many exact ties
    chunks = [np.ascontiguousarray(V[a:b]) for a, b in ((0, 70), (70, 70), (70, 200))]
    starts = np.array([0, 70, 70, 200], dtype=np.int64)
    pointers = np.array([c.ctypes.data for c in chunks], dtype=np.intp)
    Q = rng.integers(0, 3, (9, 6)).astype(np.float64)
    cand = np.stack([rng.permutation(200)[:40] for _ in range(9)]).astype(np.int64)
    cand[0, 5:] = -1  # a short row: padded
    cand[1, ::3] = -1  # gaps inside the groups of candidates the kernel scores together
    for n_threads in (1, 2):
        d, i = refine_kneighbors(Q, cand, starts, pointers, 12, n_threads=n_threads)
        for q in range(9):
            c = cand[q][cand[q] >= 0]
            dist = np.sqrt(((V[c].astype(np.float64) - Q[q]) ** 2).sum(1))
            order = np.lexsort((c, dist))[:12]
            np.testing.assert_array_equal(i[q, : order.size], c[order])
            np.testing.assert_array_equal(d[q, : order.size], dist[order])
            assert np.all(i[q, order.size :] == -1) and np.all(np.isinf(d[q, order.size :]))
    with pytest.raises(ValueError, match="candidates must be database indices"):
        refine_kneighbors(Q, cand + 300, starts, pointers, 3)
    with pytest.raises(ValueError, match="k must be in"):
        refine_kneighbors(Q, cand, starts, pointers, 41)



def test_every_candidates_distance_equals_the_re_ranking_kernels():
    # refine_distances / refine_sq8_distances (range search with refine_factor) score
    # every candidate of a ragged list per query: the numbers the top-k kernels rank by
    from sklearn_hash._kernels._refine import (
        refine_distances,
        refine_kneighbors,
        refine_sq8_distances,
        refine_sq8_kneighbors,
    )

    rng = np.random.default_rng(3)
    n, d = 300, 7
    V = rng.standard_normal((n, d)).astype(np.float32)
    codes = rng.integers(0, 256, (n, d)).astype(np.uint8)
    cells = rng.integers(0, 4, n).astype(np.int32)
    scale, offset = rng.random(d) + 0.1, rng.standard_normal(d)
    C = rng.standard_normal((4, d))
    sq8 = np.hstack([codes, cells[:, None].view(np.uint8)])
    starts = np.array([0, 100, 100, n], dtype=np.int64)
    Q = rng.standard_normal((6, d))
    counts = np.array([0, 1, 9, 0, 40, 17])  # empty queries, odd group sizes
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    cand = np.concatenate([np.sort(rng.permutation(n)[:c]) for c in counts]).astype(np.int64)
    for rows, score, top_k, extra in (
            (V, refine_distances, refine_kneighbors, ()),
            (sq8, refine_sq8_distances, refine_sq8_kneighbors, (scale, offset, C, True))):
        chunks = [np.ascontiguousarray(rows[a:b]) for a, b in itertools.pairwise(starts)]
        pointers = np.array([c.ctypes.data for c in chunks], dtype=np.intp)
        decoded = V if rows is V else scale * codes + offset + C[cells]
        for n_threads in (1, 2):
            got = score(Q, offsets, cand, starts, pointers, *extra, n_threads=n_threads)
            assert got.shape == cand.shape and got.dtype == np.float64
            for q in range(len(Q)):
                mine = cand[offsets[q] : offsets[q + 1]]
                exact = np.sqrt(((decoded[mine].astype(np.float64) - Q[q]) ** 2).sum(1))
                np.testing.assert_allclose(got[offsets[q] : offsets[q + 1]], exact, rtol=1e-13)
                if len(mine):  # bit for bit what the top-k kernel returns for them
                    dist, ind = top_k(Q[q : q + 1], mine[None], starts, pointers, *extra,
                                      len(mine))
                    np.testing.assert_array_equal(got[offsets[q] : offsets[q + 1]][
                        np.searchsorted(mine, ind[0])], dist[0])
            # squared: the sums the top-k kernel ranks by (ties by index), before its roots
            sq = score(Q, offsets, cand, starts, pointers, *extra, n_threads=n_threads,
                       squared=True)
            np.testing.assert_array_equal(np.sqrt(sq), got)
            for q in range(len(Q)):
                mine, d2 = cand[offsets[q] : offsets[q + 1]], sq[offsets[q] : offsets[q + 1]]
                if len(mine):
                    ind = top_k(Q[q : q + 1], mine[None], starts, pointers, *extra,
                                len(mine))[1][0]
                    np.testing.assert_array_equal(mine[np.lexsort((mine, d2))], ind)
        with pytest.raises(ValueError, match="offsets must rise from 0"):
            score(Q, offsets[:-1], cand, starts, pointers, *extra)
        with pytest.raises(ValueError, match="candidates must be database indices"):
            score(Q, offsets, np.where(cand == cand[3], -1, cand), starts, pointers, *extra)

# --------------------------------------------------------------- 8-bit rows (sq8)
def sq8_oracle_rows(fitted, X):
    """The decoded vectors, from the public attributes alone (numpy)."""
    X = X.astype(np.float64)
    offset, scale = fitted.refine_offset_, fitted.refine_scale_
    base = 0.0
    if isinstance(fitted, IVFQuantizedNeighbors) and fitted.coarse == "flat":
        C = fitted.coarse_centers_.astype(X.dtype)
        cells = np.argmin(((X[:, None] - C[None]) ** 2).sum(2), axis=1)
        base = fitted.coarse_centers_[cells].astype(np.float64)
    steps = np.divide(X - base - offset, scale, out=np.zeros_like(X), where=scale > 0)
    return scale * np.clip(np.rint(steps), 0, 255) + offset + base, X - base


SQ8_SEARCHERS = [clone(s).set_params(refine_storage="sq8") for s in SEARCHERS] + [
    IVFQuantizedNeighbors(ProductQuantizer(n_bits=16, random_state=0), n_lists=16,
                          coarse="multi-index", n_probe=4, n_neighbors=5, refine_factor=3,
                          refine_storage="sq8", random_state=0)]
SQ8_IDS = IDS + ["ivf-multi-index"]


@pytest.mark.parametrize("searcher", SQ8_SEARCHERS, ids=SQ8_IDS)
def test_sq8_refine_equals_search_over_the_decoded_candidates(searcher, data):
    X_db, y_db, X_q, _ = data
    fitted = clone(searcher).fit(X_db, y_db)
    plain = clone(searcher).set_params(refine_factor=None).fit(X_db, y_db)
    candidates = plain.kneighbors(X_q, n_neighbors=15, return_distance=False)
    decoded, quantized = sq8_oracle_rows(fitted, X_db)
    dist, ind = fitted.kneighbors(X_q)
    exp_d, exp_i = exact_rerank(X_q, decoded, candidates, 5)
    np.testing.assert_array_equal(ind, exp_i)
    np.testing.assert_allclose(dist, exp_d, rtol=1e-12)
    # Each decoded feature within the range is within half a step of the vector.
    inside = (quantized >= fitted.refine_offset_) & (quantized <= fitted.refine_offset_
                                                     + 255 * fitted.refine_scale_)
    assert inside.mean() > 0.99
    err = np.abs(decoded - X_db)
    assert np.all(err[inside] <= np.broadcast_to(fitted.refine_scale_, X_db.shape)[inside]
                  * (0.5 + 1e-9) + 1e-9)
    # Memory: one byte per feature, plus the int32 cell where residuals are quantized.
    carries_cells = isinstance(fitted, IVFQuantizedNeighbors) and fitted.coarse == "flat"
    assert fitted._vectors.dtype == np.uint8
    assert fitted._vectors.row_shape == (X_db.shape[1] + 4 * carries_cells,)


@pytest.mark.parametrize("searcher", SQ8_SEARCHERS[2:], ids=SQ8_IDS[2:])
def test_sq8_refine_with_growth_removal_self_queries_and_persistence(searcher, data, tmp_path):
    X_db, y_db, X_q, _ = data
    fitted = clone(searcher).fit(X_db[:900], y_db[:900])
    fitted.add(X_db[900:], y_db[900:])  # rows added later: encoded with the fitted ranges
    one_go = clone(searcher).fit(X_db[:900], y_db[:900])
    decoded = sq8_oracle_rows(fitted, X_db)[0]
    # The items query with their decoded vectors.
    own_d, own = fitted.kneighbors(n_neighbors=3)
    assert not (own == np.arange(len(X_db))[:, None]).any()
    np.testing.assert_allclose(own_d[:, 0], np.sqrt(((decoded[own[:, 0]] - decoded) ** 2).sum(1)),
                               rtol=1e-12)
    gone = np.unique(fitted.kneighbors(X_q, return_distance=False)[:, 0])
    fitted.remove(gone)
    dist, ind = fitted.kneighbors(X_q)
    assert not np.isin(ind, gone).any()
    loaded = type(fitted).load(fitted.save(tmp_path / "index"))
    assert loaded.refine_storage == "sq8"
    np.testing.assert_array_equal(loaded.refine_scale_, one_go.refine_scale_)
    for chunk in loaded._vectors.chunks():
        assert not chunk.flags.writeable and chunk.dtype == np.uint8
    d2, i2 = loaded.kneighbors(X_q)
    np.testing.assert_array_equal(i2, ind)
    np.testing.assert_array_equal(d2, dist)
    mapping = fitted.compact()
    np.testing.assert_array_equal(fitted.kneighbors(X_q)[1], mapping[ind])


def test_sq8_keeps_recall_close_to_float32(data):
    """On digits, re-ranking by 8-bit rows finds nearly what float32 rows find."""
    X_db, _, X_q, _ = data
    true = np.argsort(((X_q[:, None] - X_db[None]) ** 2).sum(2), axis=1, kind="stable")[:, :5]
    recall = {}
    for storage in ("float32", "sq8"):
        s = clone(SEARCHERS[2]).set_params(refine_storage=storage, refine_factor=8).fit(X_db)
        ind = s.kneighbors(X_q, return_distance=False)
        recall[storage] = np.mean([len(np.intersect1d(a, b)) / 5 for a, b in zip(ind, true)])
    assert recall["float32"] > 0.8
    assert recall["sq8"] >= recall["float32"] - 0.03


def test_sq8_rows_encode_and_decode():
    from sklearn_hash._rerank import SQ8Rows

    rng = np.random.default_rng(0)
    R = rng.normal(size=(5000, 3)) * [1.0, 10.0, 0.0]  # the last feature constant
    offset, scale = SQ8Rows.fit(R)
    # The constant feature: the others' median step, the constant at byte 128.
    assert scale[2] == np.median(scale[:2]) and offset[2] == -128 * scale[2]
    np.testing.assert_allclose(offset[:2], np.quantile(R[:, :2], 1e-4, axis=0))
    np.testing.assert_allclose(offset[:2] + 255 * scale[:2], np.quantile(R[:, :2], 1 - 1e-4, axis=0))
    step = SQ8Rows(offset, scale)
    rows = step.encode(R)
    assert rows.dtype == np.uint8 and rows.shape == (5000, 3)
    back = step.decode(rows)
    # Values beyond the range are clipped to its ends; the others within half a step.
    clipped = np.clip(R, offset, offset + 255 * scale)
    assert np.all(np.abs(back - clipped) <= scale / 2 + 1e-12)
    assert np.all(back[:, 2] == 0)
    # Rows added later that vary on the constant feature are still coded there.
    later = np.zeros((50, 3))
    later[:, 2] = np.linspace(-100, 100, 50) * scale[2]
    np.testing.assert_allclose(step.decode(step.encode(later))[:, 2], later[:, 2],
                               atol=scale[2] / 2 + 1e-12)
    # With cells: the residual to the cell's centroid, then the cell id as int32.
    C = np.array([[0.0, 0.0, 0.0], [100.0, -50.0, 0.0]])
    cells = np.arange(5000) % 2
    with_cells = SQ8Rows(offset, scale, C)
    rows = with_cells.encode(R + C[cells], cells)
    assert rows.shape == (5000, 7)
    np.testing.assert_array_equal(rows[:, 3:].copy().view(np.int32).ravel(), cells)
    np.testing.assert_allclose(with_cells.decode(rows), back + C[cells], rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="cells are needed"):
        with_cells.encode(R)


def test_sq8_kernel_matches_numpy_over_chunks_threads_cells_and_ties():
    from sklearn_hash._kernels._refine import refine_sq8_kneighbors

    rng = np.random.default_rng(1)
    n, d = 300, 5
    codes = rng.integers(0, 4, (n, d)).astype(np.uint8)  # few values: many exact ties
    cells = rng.integers(0, 3, n).astype(np.int32)
    scale = np.array([0.5, 1.0, 0.0, 2.0, 0.25])
    offset = np.array([-1.0, 0.0, 3.0, 0.5, 0.0])
    C = rng.integers(-2, 3, (3, d)).astype(np.float64)
    Q = rng.integers(-2, 3, (11, d)).astype(np.float64)
    cand = np.stack([rng.permutation(n)[:50] for _ in range(11)]).astype(np.int64)
    cand[0, 7:] = -1
    cand[1, ::4] = -1
    for with_cells in (False, True):
        rows = np.hstack([codes, cells[:, None].view(np.uint8)]) if with_cells else codes
        chunks = [np.ascontiguousarray(rows[a:b]) for a, b in ((0, 120), (120, 120), (120, n))]
        starts = np.array([0, 120, 120, n], dtype=np.int64)
        pointers = np.array([c.ctypes.data for c in chunks], dtype=np.intp)
        V = scale * codes + offset + (C[cells] if with_cells else C[0])  # one row: no cells
        for n_threads in (1, 2):
            dist, ind = refine_sq8_kneighbors(Q, cand, starts, pointers, scale, offset,
                                              C if with_cells else C[:1], with_cells, 9,
                                              n_threads=n_threads)
            for q in range(11):
                c = cand[q][cand[q] >= 0]
                exp = np.sqrt(((V[c] - Q[q]) ** 2).sum(1))
                order = np.lexsort((c, exp))[:9]
                np.testing.assert_array_equal(ind[q, : order.size], c[order])
                np.testing.assert_allclose(dist[q, : order.size], exp[order], rtol=1e-13)
                assert np.all(ind[q, order.size :] == -1)
    bad = np.hstack([codes, np.full((n, 1), 7, np.int32).view(np.uint8)])
    ptr = np.array([bad.ctypes.data], dtype=np.intp)
    with pytest.raises(ValueError, match="names a cell outside"):
        refine_sq8_kneighbors(Q, cand, np.array([0, n], dtype=np.int64), ptr, scale, offset,
                              C, True, 3)
    with pytest.raises(ValueError, match="one value per feature"):
        refine_sq8_kneighbors(Q, cand, starts, pointers, scale[:4], offset, C, True, 3)
    with pytest.raises(ValueError, match="k must be in"):
        refine_sq8_kneighbors(Q, cand, starts, pointers, scale, offset, C, True, 51)


def test_refine_storage_is_validated(data):
    X_db = data[0]
    with pytest.raises(ValueError, match="refine_storage"):
        QuantizedNeighbors(refine_factor=2, refine_storage="sq4").fit(X_db)
    # Without refine_factor nothing is kept and no range is learned.
    plain = clone(SQ8_SEARCHERS[2]).set_params(refine_factor=None).fit(X_db)
    assert plain._vectors is None and not hasattr(plain, "refine_scale_")


@pytest.mark.parametrize("storage", ["float32", "sq8"])
def test_refine_after_pickling_a_searched_index(storage, data):
    """The rows' address table is rebuilt in the copy, never carried over."""
    import pickle

    X_db, _, X_q, _ = data
    fitted = clone(SEARCHERS[2]).set_params(refine_storage=storage).fit(X_db)
    expected = fitted.kneighbors(X_q)  # the address table is cached now
    copy = pickle.loads(pickle.dumps(fitted))
    del fitted  # its memory may be reused
    rubbish = [np.full(X_db.shape, 1e6, dtype=np.float32) for _ in range(4)]
    got = copy.kneighbors(X_q)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[0], expected[0])
    copy.add(X_q[:7])  # an append invalidates the table
    same = clone(SEARCHERS[2]).set_params(refine_storage=storage).fit(X_db)
    same.add(X_q[:7])
    np.testing.assert_array_equal(copy.kneighbors(X_q)[1], same.kneighbors(X_q)[1])
    assert np.isin(np.arange(len(X_db), len(X_db) + 7), copy.kneighbors(X_q[:7])[1]).all()
    del rubbish


@pytest.mark.parametrize("storage", ["float32", "sq8"])
def test_rows_kept_are_fitted_state_not_the_parameters(storage, data, tmp_path):
    """set_params after fit (refine_factor=None to search the codes alone, another
    storage) changes neither the rows kept nor what save/load and pickle rebuild."""
    import pickle

    X_db, _, X_q, _ = data
    fitted = clone(SEARCHERS[2]).set_params(refine_storage=storage).fit(X_db)
    expected = fitted.kneighbors(X_q, refine_factor=3)
    other = "float32" if storage == "sq8" else "sq8"
    fitted.set_params(refine_factor=None, refine_storage=other)
    assert fitted.refine_storage_ == storage
    codes_only = fitted.kneighbors(X_q)
    for copy in (type(fitted).load(fitted.save(tmp_path / "index")),
                 pickle.loads(pickle.dumps(fitted))):
        assert copy.refine_storage_ == storage
        np.testing.assert_array_equal(copy.kneighbors(X_q, refine_factor=3)[1], expected[1])
        np.testing.assert_array_equal(copy.kneighbors(X_q)[1], codes_only[1])
    plain = clone(SEARCHERS[2]).set_params(refine_factor=None).fit(X_db)
    assert plain.refine_storage_ is None


def test_damaged_rows_are_refused(data, tmp_path):
    """A Fortran-ordered array in a segment, and a row naming a cell outside the index."""
    X_db, _, X_q, _ = data
    fitted = clone(SQ8_SEARCHERS[2]).fit(X_db)
    path = fitted.save(tmp_path / "index")
    (vectors,) = path.glob("seg-*/vectors.npy")
    rows = np.load(vectors)
    np.save(vectors, np.asfortranarray(rows))
    with pytest.raises(ValueError, match="Fortran-ordered"):
        type(fitted).load(path)
    bad = rows.copy()
    bad[3, -4:] = np.array([fitted.n_lists], dtype=np.int32).view(np.uint8)
    np.save(vectors, bad)
    loaded = type(fitted).load(path)
    with pytest.raises(ValueError, match="names a cell outside"):
        loaded.kneighbors(n_neighbors=2)  # the items decode their own rows
    with pytest.raises(ValueError, match="names a cell outside"):
        loaded.kneighbors(X_q, n_probe=loaded.n_lists, refine_factor=len(X_db) // 5)


@pytest.mark.parametrize("storage", ["float32", "sq8"])
def test_indexes_saved_before_refine_storage_existed_load(storage, data, tmp_path):
    """Without a saved refine_storage_, the rows kept follow from the fitted state."""
    X_db, _, X_q, _ = data
    fitted = clone(SEARCHERS[2]).set_params(refine_storage=storage).fit(X_db)
    expected = fitted.kneighbors(X_q)
    del fitted.refine_storage_  # as an index written before the attribute existed
    loaded = type(fitted).load(fitted.save(tmp_path / "index"))
    assert loaded.refine_storage_ == storage
    np.testing.assert_array_equal(loaded.kneighbors(X_q)[1], expected[1])
