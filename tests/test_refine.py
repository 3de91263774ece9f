"""Exact re-ranking (refine_factor): candidates from the codes, order from the vectors."""

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
