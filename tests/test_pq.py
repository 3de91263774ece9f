"""ProductQuantizer and the ADC / SDC search."""

import pickle

import numpy as np
import pytest
from sklearn.datasets import load_digits, make_blobs
from sklearn_hash._kernels._adc import adc_kneighbors

from sklearn_hash import ITQ, ProductQuantizer, QuantizedNeighbors


@pytest.fixture(scope="module")
def data():
    X, y = make_blobs(n_samples=3000, n_features=24, centers=20, random_state=0)
    return X, y


def adc_oracle(tables, codes, k, self_offset=-1):
    """tables[q, m, codes[:, m]].sum(1) in float64, ties by ascending index."""
    n_q, M, _ = tables.shape
    dist = np.stack([tables[q][np.arange(M), codes.astype(np.intp)].sum(1, dtype=np.float64)
                     for q in range(n_q)]).reshape(n_q, len(codes))
    if self_offset >= 0:
        for q in range(n_q):
            dist[q, self_offset + q] = np.inf
    order = np.array([np.lexsort((np.arange(len(codes)), row))[:k] for row in dist],
                     dtype=np.int64).reshape(n_q, k)
    return np.take_along_axis(dist, order, axis=1), order


# 4, 8, 16, 24 and 32 subspaces of 256 uint8 codewords have their own scan loops.
@pytest.mark.parametrize("n_subspaces", [1, 3, 4, 8, 16, 17, 24, 32, 64])
@pytest.mark.parametrize("K", [16, 256])
@pytest.mark.parametrize("code_dtype", [np.uint8, np.uint16])
def test_adc_kernel_matches_oracle_with_ties(n_subspaces, K, code_dtype):
    rng = np.random.default_rng(n_subspaces)
    codes = rng.integers(0, K, (700, n_subspaces)).astype(code_dtype)
    # Small integer entries: sums are exact in float32 and ties are frequent.
    tables = rng.integers(0, 4, (9, n_subspaces, K)).astype(np.float32)
    for k in (1, 7, 100, 700):
        expected = adc_oracle(tables, codes, k)
        for n_threads in (1, 2):
            dist, ind = adc_kneighbors(tables, codes, k, n_threads=n_threads)
            assert dist.dtype == np.float32 and ind.dtype == np.int64
            np.testing.assert_array_equal(ind, expected[1])
            np.testing.assert_array_equal(dist, expected[0])


def test_adc_kernel_real_valued_tables_and_self_exclusion():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (5000, 8), dtype=np.uint8)
    tables = rng.random((20, 8, 256), dtype=np.float32)
    dist, ind = adc_kneighbors(tables, codes, 50, n_threads=2)
    expected = adc_oracle(tables, codes, 50)
    np.testing.assert_allclose(dist, expected[0], rtol=1e-6)
    np.testing.assert_array_equal(ind, expected[1])
    dist, ind = adc_kneighbors(tables, codes, 10, self_offset=100)
    assert not np.any(ind == (100 + np.arange(20))[:, None])
    np.testing.assert_array_equal(ind, adc_oracle(tables, codes, 10, self_offset=100)[1])


def test_adc_kernel_rejects_bad_arguments():
    codes = np.zeros((5, 2), dtype=np.uint8)
    tables = np.zeros((1, 2, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="k must be >= 0"):
        adc_kneighbors(tables, codes, -1)
    # More neighbours than rows: the last columns are padding.
    dist, ind = adc_kneighbors(tables, codes, 7, allowed=np.array([1, 0, 1, 1, 0], np.uint8),
                               exclude=np.array([2], np.int64))
    np.testing.assert_array_equal(ind, [[0, 3, -1, -1, -1, -1, -1]])
    assert np.isinf(dist[0, 2:]).all()
    with pytest.raises(ValueError, match="subspaces"):
        adc_kneighbors(np.zeros((1, 3, 4), dtype=np.float32), codes, 1)
    with pytest.raises(ValueError, match="codeword indices up to 9"):
        adc_kneighbors(tables, codes + 9, 1)


def test_codes_shape_dtype_and_inverse(data):
    X, _ = data
    pq = ProductQuantizer(n_bits=32, subspace_bits=8, random_state=0).fit(X)
    codes = pq.transform(X)
    assert codes.shape == (3000, 4) and codes.dtype == np.uint8
    assert pq.cluster_centers_.shape == (4, 256, 6)
    X_hat = pq.inverse_transform(codes)
    assert X_hat.shape == X.shape
    # Each block of X_hat is the nearest codeword of that block.
    for m in range(4):
        block = X[:, 6 * m : 6 * m + 6]
        d2 = ((block[:, None, :] - pq.cluster_centers_[m][None]) ** 2).sum(-1)
        np.testing.assert_array_equal(codes[:, m], d2.argmin(axis=1))
    wide = ProductQuantizer(n_bits=20, subspace_bits=10, random_state=0).fit(X)
    assert wide.transform(X).dtype == np.uint16


def test_points_built_from_centroids_reencode_exactly(data):
    X, _ = data
    pq = ProductQuantizer(n_bits=24, subspace_bits=6, random_state=0).fit(X)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 64, (500, 4))
    rebuilt = pq.inverse_transform(codes)
    np.testing.assert_array_equal(pq.transform(rebuilt), codes)
    np.testing.assert_array_equal(pq.inverse_transform(pq.transform(rebuilt)), rebuilt)


def test_reconstruction_error_falls_with_n_bits(data):
    X, _ = data
    errors = []
    for n_bits in (8, 16, 32, 64):
        pq = ProductQuantizer(n_bits=n_bits, subspace_bits=8, random_state=0).fit(X)
        errors.append(np.mean((X - pq.inverse_transform(pq.transform(X))) ** 2))
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_uneven_split_is_recorded_and_used():
    X, _ = make_blobs(n_samples=600, n_features=10, centers=5, random_state=0)
    pq = ProductQuantizer(n_bits=12, subspace_bits=4, random_state=0).fit(X)  # 3 subspaces
    np.testing.assert_array_equal(pq.subspace_bounds_, [0, 4, 7, 10])
    assert pq.cluster_centers_.shape == (3, 16, 4)
    assert np.all(pq.cluster_centers_[1:, :, 3] == 0)  # padding
    X_hat = pq.inverse_transform(pq.transform(X))
    assert np.mean((X - X_hat) ** 2) < np.var(X, axis=0).sum() / 10 * 0.5


def test_distance_tables_give_the_adc_distance(data):
    X, _ = data
    pq = ProductQuantizer(n_bits=32, subspace_bits=8, random_state=0).fit(X[:2000])
    tables = pq.distance_tables(X[2000:2010])
    assert tables.shape == (10, 4, 256) and tables.dtype == np.float32
    codes = pq.transform(X[:2000])
    adc = np.stack([t[np.arange(4), codes].sum(1) for t in tables])
    exact = ((X[2000:2010, None, :] - pq.inverse_transform(codes)[None]) ** 2).sum(-1)
    np.testing.assert_allclose(adc, exact, rtol=1e-4, atol=1e-3)
    sdc = pq.symmetric_distance_tables()
    assert sdc.shape == (4, 256, 256)
    np.testing.assert_allclose(sdc, np.transpose(sdc, (0, 2, 1)), atol=1e-4)


@pytest.mark.parametrize("n_bits, subspace_bits", [(30, 10), (24, 4), (40, 8)])
def test_distance_tables_match_a_float64_oracle_and_do_not_depend_on_the_batch(
        data, n_bits, subspace_bits):
    X, _ = data
    pq = ProductQuantizer(n_bits, subspace_bits=subspace_bits, n_iter=5,
                          random_state=0).fit(X[:2000])
    Q = X[2000:2300].astype(np.float32)  # 24 features in 3, 6 or 5 subspaces (uneven widths)
    tables = pq.distance_tables(Q)
    b = pq.subspace_bounds_
    oracle = np.stack([
        ((Q[:, None, b[m]:b[m + 1]].astype(np.float64)
          - pq.cluster_centers_[m][None, :, : b[m + 1] - b[m]]) ** 2).sum(-1)
        for m in range(pq.n_subspaces_)], axis=1)
    np.testing.assert_allclose(tables, oracle, rtol=1e-5, atol=1e-4)
    # A query's table is the same alone, in any batch, and after pickling.
    for i in (0, 137, 299):
        np.testing.assert_array_equal(pq.distance_tables(Q[i : i + 1]), tables[i : i + 1])
    np.testing.assert_array_equal(pq.distance_tables(Q[::-1])[::-1], tables)
    restored = pickle.loads(pickle.dumps(pq))
    assert "_packed" not in restored.__dict__  # the packed codebooks are rebuilt, not saved
    np.testing.assert_array_equal(restored.distance_tables(Q), tables)


def test_distance_tables_follow_a_refit(data):
    X, _ = data
    pq = ProductQuantizer(16, random_state=0).fit(X[:1000])
    first = pq.distance_tables(X[2000:2005])
    pq.fit(X[1000:2000] * 2.0)  # other codebooks: the packed ones must not be reused
    fresh = ProductQuantizer(16, random_state=0).fit(X[1000:2000] * 2.0)
    np.testing.assert_array_equal(pq.distance_tables(X[2000:2005]),
                                  fresh.distance_tables(X[2000:2005]))
    assert not np.array_equal(first, fresh.distance_tables(X[2000:2005]))


def test_adc_error_is_smaller_than_sdc_error(data):
    X, _ = data
    search = dict(n_neighbors=20)
    adc = QuantizedNeighbors(ProductQuantizer(32, random_state=0), metric="adc", **search)
    sdc = QuantizedNeighbors(ProductQuantizer(32, random_state=0), metric="sdc", **search)
    adc.fit(X[:2500])
    sdc.fit(X[:2500])
    d_adc, i_adc = adc.kneighbors(X[2500:])
    d_sdc, i_sdc = sdc.kneighbors(X[2500:])
    true_adc = ((X[2500:, None, :] - X[:2500][i_adc]) ** 2).sum(-1)
    true_sdc = ((X[2500:, None, :] - X[:2500][i_sdc]) ** 2).sum(-1)
    assert np.mean(np.abs(d_adc - true_adc)) < np.mean(np.abs(d_sdc - true_sdc))


def test_searcher_matches_the_oracle_and_metric_errors(data):
    X, _ = data
    search = QuantizedNeighbors(ProductQuantizer(32, random_state=0), n_neighbors=15).fit(X[:2500])
    assert search.metric_ == "adc" and search.codes_.dtype == np.uint8
    dist, ind = search.kneighbors(X[2500:2540])
    expected = adc_oracle(search.quantizer_.distance_tables(X[2500:2540]), search.codes_, 15)
    np.testing.assert_array_equal(ind, expected[1])
    # Ranked by the squared estimate, returned in L2 units (float64).
    assert dist.dtype == np.float64
    np.testing.assert_allclose(dist, np.sqrt(expected[0]), rtol=1e-6)
    # X=None: each item queries with its reconstruction (ADC), never itself.
    _, own = search.kneighbors(n_neighbors=5)
    assert not np.any(own == np.arange(2500)[:, None])
    tables = search.quantizer_.distance_tables(search.quantizer_.inverse_transform(search.codes_[:30]))
    np.testing.assert_array_equal(own[:30], adc_oracle(tables, search.codes_, 5, self_offset=0)[1])
    with pytest.raises(ValueError, match="metric='hamming' compares binary codes"):
        QuantizedNeighbors(ProductQuantizer(32), metric="hamming").fit(X)
    with pytest.raises(ValueError, match="needs a quantizer with distance_tables"):
        QuantizedNeighbors(ITQ(8), metric="adc").fit(X)


@pytest.mark.parametrize(
    "pq, match",
    [
        (ProductQuantizer(n_bits=30, subspace_bits=8), "multiple of subspace_bits"),
        (ProductQuantizer(n_bits=8 * 30, subspace_bits=8), "n_features=24"),
        (ProductQuantizer(n_bits=24, subspace_bits=12), "at least 2\\*\\*subspace_bits = 4096"),
    ],
)
def test_infeasible_settings(pq, match, data):
    X, _ = data
    with pytest.raises(ValueError, match=match):
        pq.fit(X)


def test_subsample_when_many_rows(data):
    X, _ = data
    pq = ProductQuantizer(n_bits=16, subspace_bits=4, max_train_samples=100, random_state=0).fit(X)
    assert pq.inertia_.shape == (4,)
    full = ProductQuantizer(n_bits=16, subspace_bits=4, random_state=0).fit(X)
    error = lambda q: np.mean((X - q.inverse_transform(q.transform(X))) ** 2)  # noqa: E731
    assert error(full) <= error(pq) * 1.05


def test_float32_and_float64_inputs(data):
    X, _ = data
    for dtype in (np.float32, np.float64):
        pq = ProductQuantizer(16, random_state=0).fit(X.astype(dtype))
        assert pq.cluster_centers_.dtype == dtype
        assert pq.distance_tables(X[:3].astype(dtype)).dtype == np.float32


def test_reconstruction_error_close_to_faiss():
    faiss = pytest.importorskip("faiss")
    X, _ = load_digits(return_X_y=True)
    X = np.ascontiguousarray(X, dtype=np.float32)
    for M in (4, 8):
        ours = ProductQuantizer(n_bits=8 * M, n_iter=25, random_state=0).fit(X)
        mse = np.mean((X - ours.inverse_transform(ours.transform(X))) ** 2)
        ref = faiss.ProductQuantizer(64, M, 8)
        ref.train(X)
        ref_mse = np.mean((X - ref.decode(ref.compute_codes(X))) ** 2)
        assert mse <= 1.05 * ref_mse, (M, mse, ref_mse)


def test_pq_on_real_data_beats_itq(esc50_yamnet):
    X_db, y_db, X_q, y_q = esc50_yamnet
    for n_bits in (8, 16, 32, 64):
        pq = QuantizedNeighbors(ProductQuantizer(n_bits, random_state=0), n_neighbors=100)
        itq = QuantizedNeighbors(ITQ(n_bits, random_state=0), n_neighbors=100)
        pq_score = pq.fit(X_db, y_db).score(X_q, y_q)
        itq_score = itq.fit(X_db, y_db).score(X_q, y_q)
        print(f"{n_bits} bits: PQ {pq_score:.3f}  ITQ {itq_score:.3f}")
        # Measured: PQ 0.572 / 0.593 / 0.613 / 0.618, ITQ 0.276 / 0.402 / 0.497 / 0.544.
        assert pq_score >= itq_score


def test_init_array_warm_starts_each_codebook():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 6))
    init = rng.normal(size=(2, 4, 3))
    pq = ProductQuantizer(n_bits=4, subspace_bits=2, n_iter=1, init=init).fit(X)
    for m in range(2):  # one Lloyd step from the given codebook: the numpy oracle
        block = X[:, 3 * m : 3 * m + 3]
        nearest = ((block[:, None, :] - init[m][None]) ** 2).sum(axis=2).argmin(axis=1)
        expected = np.stack([block[nearest == k].mean(axis=0) for k in range(4)])
        np.testing.assert_allclose(pq.cluster_centers_[m], expected, rtol=1e-10)


def test_init_array_of_the_wrong_shape_is_refused():
    X = np.random.default_rng(0).normal(size=(50, 6))
    with pytest.raises(ValueError, match=r"init must be an array of shape .*\(2, 4, 3\)"):
        ProductQuantizer(n_bits=4, subspace_bits=2, init=np.zeros((2, 4, 2))).fit(X)


def test_saved_index_leaves_the_packed_codebooks_out(data, tmp_path):
    X, _ = data
    search = QuantizedNeighbors(ProductQuantizer(16, random_state=0)).fit(X[:500])
    before = search.kneighbors(X[500:510])
    assert "_packed" in search.quantizer_.__dict__  # built by the search
    search.save(tmp_path / "index")
    saved = list((tmp_path / "index").rglob("*"))
    assert not any("_packed" in f.name for f in saved)
    assert not any("_packed" in f.read_text() for f in saved if f.suffix == ".json")
    loaded = QuantizedNeighbors.load(tmp_path / "index")
    np.testing.assert_array_equal(loaded.kneighbors(X[500:510])[1], before[1])


def test_a_search_runs_the_quantizers_kernels_on_its_own_threads(data, monkeypatch):
    import sklearn_hash._pq as pq_module

    X, _ = data
    calls = []

    def recording(*args, n_threads=1, **kwargs):
        calls.append(n_threads)
        return subspace_scores(*args, n_threads=n_threads, **kwargs)

    subspace_scores = pq_module.subspace_scores
    monkeypatch.setattr(pq_module, "subspace_scores", recording)
    # "Every core" is 7 here, wherever the test runs.
    monkeypatch.setattr("sklearn_hash._threads.effective_n_threads", lambda n_jobs=None: 7)
    search = QuantizedNeighbors(ProductQuantizer(24, random_state=0), n_jobs=1).fit(X[:1000])
    calls.clear()
    expected = search.quantizer_.distance_tables(X[2000:2100])
    search.kneighbors(X[2000:2100])
    search.radius_neighbors(X[2000:2100], radius=1.0)
    search.quantizer_.distance_tables(X[2000:2100])
    assert calls == [7, 1, 1, 7]  # outside a search every core; inside, the search's n_jobs
    np.testing.assert_array_equal(search.quantizer_.distance_tables(X[2000:2100]), expected)
