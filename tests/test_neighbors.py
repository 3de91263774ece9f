"""QuantizedNeighbors: the NearestNeighbors contract over codes."""

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from sklearn_hash import AGH, ITQ, ProductQuantizer, QuantizedNeighbors, SpectralHashing
from sklearn_hash.metrics import make_map_at_r_scorer, map_at_r_score


@pytest.fixture(scope="module")
def digits():
    return load_digits(return_X_y=True)


def hamming_oracle(db_bits, query_bits, k):
    dist = (query_bits[:, None, :] != db_bits[None, :, :]).sum(axis=2)
    order = np.array([np.lexsort((np.arange(len(db_bits)), row))[:k] for row in dist])
    return np.take_along_axis(dist, order, axis=1), order


@pytest.mark.parametrize(
    "quantizer",
    [SpectralHashing(12), ITQ(20, random_state=0), AGH(70, n_anchors=120, random_state=0)],
    ids=["SH", "ITQ", "AGH-70bits"],
)
def test_kneighbors_is_exact_hamming_search(quantizer, digits):
    X, y = digits
    search = QuantizedNeighbors(quantizer, n_neighbors=15).fit(X[:1200], y[:1200])
    dist, ind = search.kneighbors(X[1200:1300])
    expected_dist, expected_ind = hamming_oracle(
        search.quantizer_.transform(X[:1200]), search.quantizer_.transform(X[1200:1300]), 15
    )
    np.testing.assert_array_equal(ind, expected_ind)
    np.testing.assert_array_equal(dist, expected_dist)
    n_bits = search.quantizer_.n_bits
    assert search.codes_.shape == (1200, (n_bits + 63) // 64)
    assert search.codes_.dtype == np.uint64


def test_kneighbors_none_leaves_each_point_out(digits):
    X, y = digits
    X = X[:300]
    search = QuantizedNeighbors(ITQ(8, random_state=0), n_neighbors=5).fit(X)
    dist, ind = search.kneighbors()
    assert not np.any(ind == np.arange(300)[:, None])
    codes = search.quantizer_.transform(X)
    full = (codes[:, None, :] != codes[None, :, :]).sum(axis=2)
    np.fill_diagonal(full, 10**6)
    order = np.array([np.lexsort((np.arange(300), row))[:5] for row in full])
    np.testing.assert_array_equal(ind, order)
    # Same as querying with X, once the point itself is removed.
    _, with_self = search.kneighbors(X, n_neighbors=6)
    for row, own in zip(range(300), with_self):
        assert list(ind[row]) == [j for j in own if j != row][:5]


def test_results_do_not_depend_on_n_jobs(digits):
    X, y = digits
    results = [
        QuantizedNeighbors(ITQ(16, random_state=0), n_neighbors=20, n_jobs=n_jobs)
        .fit(X[:1500])
        .kneighbors(X[1500:])
        for n_jobs in (1, 2, -1, None)
    ]
    for dist, ind in results[1:]:
        np.testing.assert_array_equal(ind, results[0][1])
        np.testing.assert_array_equal(dist, results[0][0])


def test_kneighbors_graph(digits):
    X, _ = digits
    search = QuantizedNeighbors(ITQ(16, random_state=0), n_neighbors=4).fit(X[:500])
    dist, ind = search.kneighbors(X[500:520])
    graph = search.kneighbors_graph(X[500:520], mode="distance")
    assert graph.format == "csr" and graph.shape == (20, 500)
    for row in range(20):
        np.testing.assert_array_equal(graph[row].indices, ind[row])
        np.testing.assert_array_equal(graph[row].data, dist[row])
    connectivity = search.kneighbors_graph(X[500:520])
    assert connectivity.nnz == 80 and np.all(connectivity.data == 1)
    assert search.kneighbors_graph().shape == (500, 500)
    with pytest.raises(ValueError, match="Unsupported mode"):
        search.kneighbors_graph(mode="weights")


def test_default_quantizer_is_itq(digits):
    X, y = digits
    search = QuantizedNeighbors().fit(X)
    assert isinstance(search.quantizer_, ITQ) and search.quantizer_.n_bits == 32
    assert search.quantizer is None


def test_score_is_map_at_n_neighbors(digits):
    X, y = digits
    search = QuantizedNeighbors(ITQ(32, random_state=0), n_neighbors=30).fit(X[:1400], y[:1400])
    ind = search.kneighbors(X[1400:], return_distance=False)
    assert search.score(X[1400:], y[1400:]) == map_at_r_score(y[1400:], y[:1400], ind)
    with pytest.raises(ValueError, match="fit QuantizedNeighbors with y"):
        QuantizedNeighbors(ITQ(8)).fit(X).score(X, y)


def test_pipeline_and_grid_search_as_written_in_the_docs(digits):
    X, y = digits
    pipe = Pipeline(
        [("scale", StandardScaler()), ("search", QuantizedNeighbors(ITQ(), n_neighbors=50))]
    )
    grid = GridSearchCV(
        pipe,
        {"search__quantizer__n_bits": [8, 16, 32, 64]},
        scoring=make_map_at_r_scorer(R=50),
        cv=StratifiedKFold(3, shuffle=True, random_state=0),
    )
    grid.fit(X, y)
    scores = grid.cv_results_["mean_test_score"]
    assert scores.shape == (4,) and np.all((scores > 0.3) & (scores <= 1))
    assert grid.best_params_["search__quantizer__n_bits"] in (32, 64)

    # The scorer of one fold equals the same computation by hand.
    train, test = next(StratifiedKFold(3, shuffle=True, random_state=0).split(X, y))
    pipe.set_params(search__quantizer__n_bits=16, search__quantizer__random_state=0)
    pipe.fit(X[train], y[train])
    scaler, search = pipe.named_steps["scale"], pipe.named_steps["search"]
    by_hand = map_at_r_score(
        y[test], y[train],
        search.kneighbors(scaler.transform(X[test]), n_neighbors=50, return_distance=False),
    )
    assert make_map_at_r_scorer(R=50)(pipe, X[test], y[test]) == pytest.approx(by_hand)
    assert pipe.score(X[test], y[test]) == pytest.approx(by_hand)  # R = n_neighbors = 50


def test_grid_over_methods_in_one_grid(digits):
    X, y = digits
    grid = GridSearchCV(
        QuantizedNeighbors(n_neighbors=20),
        {"quantizer": [SpectralHashing(), ITQ(random_state=0)], "quantizer__n_bits": [8, 16]},
        scoring=make_map_at_r_scorer(R=20),
        cv=3,
    ).fit(X, y)
    assert len(grid.cv_results_["params"]) == 4


def test_multilabel_database_labels(digits):
    X, y = digits
    Y = np.stack([y % 2, (y >= 5)], axis=1).astype(int)
    search = QuantizedNeighbors(ITQ(16, random_state=0), n_neighbors=10).fit(X[:1000], Y[:1000])
    assert 0 < search.score(X[1000:1100], Y[1000:1100]) <= 1


@pytest.mark.parametrize(
    "X_query, error, match",
    [
        (np.full((2, 64), np.nan), ValueError, "NaN"),
        (np.full((2, 64), np.inf), ValueError, "infinity"),
        (np.zeros((2, 5)), ValueError, "5 features"),
        (np.zeros((0, 64)), ValueError, "0 sample"),
        ([["a"] * 64], (ValueError, TypeError), "convert|numeric|string"),
    ],
)
def test_bad_queries(X_query, error, match, digits):
    X, y = digits
    search = QuantizedNeighbors(ITQ(8, random_state=0)).fit(X[:100])
    with pytest.raises(error, match=match):
        search.kneighbors(X_query)


def test_bad_fit_input(digits):
    X, y = digits
    with pytest.raises(ValueError, match="NaN"):
        QuantizedNeighbors(ITQ(8)).fit(np.full((10, 64), np.nan))
    with pytest.raises(ValueError, match="minimum of 2 is required"):
        QuantizedNeighbors(ITQ(8)).fit(X[:1])
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        QuantizedNeighbors(ITQ(8)).fit(X[:100], y[:99])
    with pytest.raises(ValueError, match="n_jobs == 0"):
        QuantizedNeighbors(ITQ(8), n_jobs=0).fit(X[:100])


def test_bad_n_neighbors(digits):
    X, _ = digits
    search = QuantizedNeighbors(ITQ(8, random_state=0)).fit(X[:50])
    with pytest.raises(ValueError, match="Expected n_neighbors <= n_samples_fit"):
        search.kneighbors(X[:3], n_neighbors=51)
    with pytest.raises(ValueError, match="n_neighbors = 51, n_samples_fit = 50"):
        search.kneighbors(n_neighbors=50)  # itself left out: needs 51 items
    assert search.kneighbors(X[:3], n_neighbors=50)[1].shape == (3, 50)
    with pytest.raises(ValueError, match="Expected n_neighbors > 0"):
        search.kneighbors(X[:3], n_neighbors=0)
    with pytest.raises(TypeError, match="enter integer value"):
        search.kneighbors(X[:3], n_neighbors=2.5)


def test_user_quantizer_with_binary_transform_plugs_in(digits):
    from sklearn.base import BaseEstimator, TransformerMixin

    class MedianThreshold(TransformerMixin, BaseEstimator):
        def fit(self, X, y=None):
            self.median_ = np.median(X, axis=0)
            return self

        def transform(self, X):
            return (X > self.median_).astype(np.uint8)

    X, y = digits
    search = QuantizedNeighbors(MedianThreshold(), n_neighbors=5).fit(X[:500])
    dist, ind = search.kneighbors(X[500:510])
    expected = hamming_oracle(X[:500] > search.quantizer_.median_,
                              X[500:510] > search.quantizer_.median_, 5)
    np.testing.assert_array_equal(ind, expected[1])

    class NotBinary(MedianThreshold):
        def transform(self, X):
            return X

    with pytest.raises(ValueError, match="only 0 and 1"):
        QuantizedNeighbors(NotBinary()).fit(X[:500])


def test_searches_run_blas_on_one_thread_and_restore_it():
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_info

    from sklearn_hash._threads import single_threaded_blas as _single_threaded_blas

    def blas_threads():
        return [m["num_threads"] for m in threadpool_info() if m["user_api"] == "blas"]

    before = blas_threads()
    seen = []

    class Recording(ProductQuantizer):
        def distance_tables(self, X):
            seen.append(blas_threads())
            return super().distance_tables(X)

    X, y = load_digits(return_X_y=True)
    search = QuantizedNeighbors(Recording(n_bits=16, random_state=0)).fit(X[:1000], y[:1000])
    seen.clear()  # fit asks for one row's tables (their shape), outside any search
    search.kneighbors(X[1000:1100])
    assert seen == [[1] * len(before)]
    assert blas_threads() == before
    # Concurrent searches: whatever the interleaving, the setting is restored.
    for _ in range(3):
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda i: search.kneighbors(X[1000 + 50 * i:1050 + 50 * i]), range(8)))
        assert blas_threads() == before
    with _single_threaded_blas, _single_threaded_blas:  # nested: the outer one restores
        assert blas_threads() == [1] * len(before)
    assert blas_threads() == before
