"""QuantizedNeighborsTransformer against scikit-learn's KNeighborsTransformer, and in pipelines."""

import doctest
import itertools
import warnings

import numpy as np
import pytest
from scipy import sparse
from sklearn.base import clone
from sklearn.cluster import DBSCAN
from sklearn.datasets import make_blobs
from sklearn.exceptions import NotFittedError
from sklearn.manifold import TSNE, Isomap, SpectralEmbedding
from sklearn.metrics import adjusted_rand_score
from sklearn.model_selection import PredefinedSplit, cross_val_score
from sklearn.neighbors import KNeighborsClassifier, KNeighborsTransformer
from sklearn.pipeline import Pipeline, make_pipeline

from sklearn_hash import (
    ITQ,
    ProductQuantizer,
    QuantizedNeighborsTransformer,
    _transformer,
)


@pytest.fixture(scope="module")
def lossless():
    """64 distinct points whose PQ codes (3 subspaces x 4 codewords) are exact.

    Each 2-D block of a point is one of 4 random values, so k-means with 4
    codewords per block finds them exactly; the values are generic, so no
    two distances between distinct points are equal (no ties to order).
    """
    rng = np.random.default_rng(0)
    blocks = rng.normal(size=(3, 4, 2)) * 3
    X = np.array([np.concatenate([blocks[m, c] for m, c in enumerate(combo)])
                  for combo in itertools.product(range(4), repeat=3)])
    X = X[rng.permutation(len(X))]
    pq = ProductQuantizer(n_bits=6, subspace_bits=2, random_state=0)
    transformer = QuantizedNeighborsTransformer(pq, n_neighbors=7)
    transformer.fit(X)
    # Precondition: the quantization is lossless.
    quantizer = transformer.quantizer_
    np.testing.assert_allclose(quantizer.inverse_transform(quantizer.transform(X)), X, atol=1e-5)
    return X, transformer


def rows(graph):
    """(indices, values) of each row of a CSR graph, in stored order."""
    return [(graph.indices[a:b], graph.data[a:b])
            for a, b in zip(graph.indptr[:-1], graph.indptr[1:])]


@pytest.mark.parametrize("mode", ["distance", "connectivity"])
def test_same_graph_structure_as_kneighbors_transformer_on_lossless_codes(lossless, mode):
    X, fitted = lossless
    ours = clone(fitted).set_params(mode=mode).fit_transform(X)
    exact = KNeighborsTransformer(n_neighbors=7, mode=mode).fit_transform(X)
    assert ours.shape == exact.shape == (64, 64)
    assert ours.format == "csr" and ours.dtype == np.float64 == exact.dtype
    n_stored = 8 if mode == "distance" else 7
    np.testing.assert_array_equal(np.diff(ours.indptr), n_stored)
    for (our_ind, _), (exact_ind, _) in zip(rows(ours), rows(exact)):
        np.testing.assert_array_equal(our_ind, exact_ind)  # same neighbours, same order
    if mode == "connectivity":
        np.testing.assert_array_equal(ours.data, 1.0)
        np.testing.assert_array_equal(ours.toarray(), exact.toarray())


def test_same_distances_as_kneighbors_transformer_on_lossless_codes(lossless):
    """ADC distances are L2 (scikit-learn's units): equal to exact search when lossless."""
    X, fitted = lossless
    ours = fitted.fit_transform(X)
    exact = KNeighborsTransformer(n_neighbors=7, mode="distance").fit_transform(X)
    np.testing.assert_allclose(ours.data, exact.data, rtol=1e-5, atol=1e-5)
    X_new = X[:5] + 0.01
    np.testing.assert_allclose(fitted.transform(X_new).toarray(),
                               KNeighborsTransformer(n_neighbors=7).fit(X).transform(X_new).toarray(),
                               rtol=1e-5, atol=1e-5)


def test_fit_transform_includes_each_sample_first_with_explicit_zeros():
    # Duplicated rows: Hamming distance 0 to several items, all stored explicitly.
    X, _ = make_blobs(n_samples=120, centers=4, n_features=20, random_state=0)
    X = np.vstack([X, X[:10]])  # rows 120..129 repeat rows 0..9
    transformer = QuantizedNeighborsTransformer(ITQ(n_bits=16, random_state=0), n_neighbors=4)
    graph = transformer.fit_transform(X)
    assert graph.format == "csr" and graph.dtype == np.float64 and graph.shape == (130, 130)
    np.testing.assert_array_equal(np.diff(graph.indptr), 5)  # n_neighbors + 1 per row
    assert graph.nnz == 130 * 5
    assert (graph.data == 0).sum() >= 130  # zeros are stored, not dropped
    codes = transformer.quantizer_.transform(X).astype(int)
    hamming = (codes[:, None, :] != codes[None, :, :]).sum(axis=2)
    for i, (ind, dist) in enumerate(rows(graph)):
        assert np.all(np.diff(dist) >= 0)  # sorted by distance
        # Brute force on the codes, ties by index: the same neighbours and bit counts.
        order = np.lexsort((np.arange(130), hamming[i]))[:5]
        np.testing.assert_array_equal(ind, order)
        np.testing.assert_array_equal(dist, hamming[i, order])
        # The sample itself is at 0: listed among the first entries, after
        # only the earlier samples sharing its code (ties by index).
        assert dist[0] == 0
        earlier_twins = int((hamming[i, :i] == 0).sum())
        if earlier_twins < 5:
            assert ind[earlier_twins] == i and dist[earlier_twins] == 0
    # Row 120 repeats row 0: row 0 is stored at distance 0 in row 120.
    ind, dist = rows(graph)[120]
    assert 0 in ind and dist[list(ind).index(0)] == 0


def test_transform_of_new_points_and_connectivity_mode():
    X, _ = make_blobs(n_samples=100, centers=3, n_features=6, random_state=1)
    transformer = QuantizedNeighborsTransformer(
        ProductQuantizer(n_bits=6, subspace_bits=3, random_state=0), n_neighbors=3
    ).fit(X[:80])
    graph = transformer.transform(X[80:])
    assert graph.shape == (20, 80) and graph.format == "csr"
    np.testing.assert_array_equal(np.diff(graph.indptr), 4)
    dist, ind = transformer.kneighbors(X[80:], n_neighbors=4)
    for (row_ind, row_dist), d, i in zip(rows(graph), dist, ind):
        np.testing.assert_array_equal(row_ind, i)
        np.testing.assert_array_equal(row_dist, np.asarray(d, dtype=np.float64))
    connectivity = transformer.set_params(mode="connectivity").transform(X[80:])
    np.testing.assert_array_equal(np.diff(connectivity.indptr), 3)
    np.testing.assert_array_equal(connectivity.data, 1.0)
    assert transformer.get_feature_names_out().tolist()[:2] == [
        "quantizedneighborstransformer0", "quantizedneighborstransformer1"]
    assert len(transformer.get_feature_names_out()) == 80


# ------------------------------------------------------------ pipelines on ESC-10

@pytest.fixture(scope="module")
def esc10_X(esc10):
    return esc10.data.astype(np.float64), esc10.target, esc10.fold


@pytest.mark.parametrize("n_bits", [64, 128])
def test_kneighbors_classifier_matches_exact_knn_on_esc10(esc10_X, n_bits):
    X, y, fold = esc10_X
    cv = PredefinedSplit(fold)  # each of the 5 folds in turn against the other 4
    exact = cross_val_score(KNeighborsClassifier(n_neighbors=5), X, y, cv=cv).mean()
    pipe = make_pipeline(
        QuantizedNeighborsTransformer(ProductQuantizer(n_bits=n_bits, random_state=0),
                                      n_neighbors=5),
        KNeighborsClassifier(n_neighbors=5, metric="precomputed"),
    )
    quantized = cross_val_score(pipe, X, y, cv=cv).mean()
    # Measured: exact 0.915; PQ 64 bits 0.9225, 128 bits 0.915 (400 clips).
    assert exact > 0.85
    assert abs(quantized - exact) <= 0.02


def _class_separation(embedding, y):
    """5-NN accuracy of the classes in an embedding (chance: 0.1 on ESC-10)."""
    return cross_val_score(KNeighborsClassifier(n_neighbors=5), embedding, y, cv=5).mean()


def test_tsne_pipeline_on_esc10(esc10_X):
    X, y, _ = esc10_X
    pipe = make_pipeline(
        QuantizedNeighborsTransformer(ProductQuantizer(n_bits=64, random_state=0),
                                      n_neighbors=30),
        TSNE(metric="precomputed", init="random", perplexity=9, max_iter=250, random_state=0),
    )
    embedding = pipe.fit_transform(X)
    assert embedding.shape == (400, 2) and np.isfinite(embedding).all()
    assert _class_separation(embedding, y) > 0.8  # measured 0.88


@pytest.mark.parametrize(
    "embedder",
    [Isomap(n_neighbors=10, n_components=5, metric="precomputed"),
     SpectralEmbedding(n_components=5, affinity="precomputed_nearest_neighbors",
                       n_neighbors=10, random_state=0)],
    ids=["Isomap", "SpectralEmbedding"],
)
def test_manifold_pipelines_on_esc10_agree_with_exact_graphs(esc10_X, embedder):
    X, y, _ = esc10_X
    ours = make_pipeline(
        QuantizedNeighborsTransformer(ProductQuantizer(n_bits=64, random_state=0),
                                      n_neighbors=10),
        clone(embedder),
    ).fit_transform(X)
    exact = make_pipeline(KNeighborsTransformer(n_neighbors=10), clone(embedder)).fit_transform(X)
    assert ours.shape == (400, 5) and np.isfinite(ours).all()
    # Measured: Isomap 0.89 (exact graph 0.888), SpectralEmbedding 0.84 (0.835).
    assert _class_separation(ours, y) > 0.75
    assert _class_separation(ours, y) > _class_separation(exact, y) - 0.05


def test_dbscan_pipeline_finds_the_blobs():
    X, labels = make_blobs(n_samples=300, centers=3, n_features=8, cluster_std=0.5,
                           random_state=0)
    transformer = QuantizedNeighborsTransformer(
        ProductQuantizer(n_bits=16, subspace_bits=4, random_state=0), n_neighbors=10)
    graph = transformer.fit_transform(X)
    # eps in the graph's own units: above within-blob neighbour distances.
    eps = 2 * np.quantile(graph.data[graph.data > 0], 0.9)
    clusters = make_pipeline(clone(transformer),
                             DBSCAN(eps=eps, min_samples=5, metric="precomputed")).fit_predict(X)
    assert adjusted_rand_score(labels, clusters) > 0.95
    assert (clusters == -1).mean() < 0.05


def test_pipeline_with_memory_caches_the_graph(tmp_path, monkeypatch, esc10_X):
    X, y, fold = esc10_X
    train, test = fold != 1, fold == 1
    calls = []
    fit = QuantizedNeighborsTransformer.fit

    def counting_fit(self, X, y=None):
        calls.append(X.shape)
        return fit(self, X, y)

    monkeypatch.setattr(QuantizedNeighborsTransformer, "fit", counting_fit)
    steps = [("graph", QuantizedNeighborsTransformer(ProductQuantizer(n_bits=64, random_state=0),
                                                     n_neighbors=10)),
             ("knn", KNeighborsClassifier(n_neighbors=5, metric="precomputed"))]
    cached = Pipeline(clone(Pipeline(steps)).steps, memory=str(tmp_path))
    cached.fit(X[train], y[train])
    first = cached.predict(X[test])
    assert len(calls) == 1
    cached.set_params(knn__n_neighbors=3).fit(X[train], y[train])  # graph from the cache
    assert len(calls) == 1
    assert any(tmp_path.iterdir())
    uncached = Pipeline(clone(Pipeline(steps)).steps).fit(X[train], y[train])
    np.testing.assert_array_equal(first, uncached.predict(X[test]))
    assert (first == y[test]).mean() > 0.85


# ------------------------------------------------------------ bad input

def test_bad_parameters_and_input():
    X, _ = make_blobs(n_samples=30, n_features=4, random_state=0)
    with pytest.raises(ValueError, match=r"The 'mode' parameter of QuantizedNeighborsTransformer "
                                         r"must be a str among .*Got 'distances' instead"):
        QuantizedNeighborsTransformer(mode="distances").fit(X)
    with pytest.raises(ValueError, match="'n_neighbors' parameter .* must be an int in the range"):
        QuantizedNeighborsTransformer(n_neighbors=0).fit(X)
    with pytest.raises(ValueError, match="'metric' parameter"):
        QuantizedNeighborsTransformer(metric="euclidean").fit(X)
    with pytest.raises(ValueError, match="'quantizer' parameter"):
        QuantizedNeighborsTransformer(quantizer="pq").fit(X)
    with pytest.raises(ValueError, match="metric='hamming' compares binary codes"):
        QuantizedNeighborsTransformer(ProductQuantizer(n_bits=4, subspace_bits=2),
                                      metric="hamming").fit(X)
    with pytest.raises(NotFittedError):
        QuantizedNeighborsTransformer().transform(X)
    transformer = QuantizedNeighborsTransformer(ITQ(n_bits=2, random_state=0), n_neighbors=3).fit(X)
    with pytest.raises(ValueError, match="X has 3 features, but QuantizedNeighborsTransformer "
                                         "is expecting 4 features"):
        transformer.transform(X[:, :3])
    X_nan = X.copy()
    X_nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="Input X contains NaN"):
        transformer.transform(X_nan)
    with pytest.raises(TypeError, match="[Ss]parse"):
        QuantizedNeighborsTransformer().fit(sparse.csr_matrix(X))
    with pytest.raises(ValueError, match='Unsupported mode, must be one of "connectivity", '
                                         'or "distance" but got "ones" instead'):
        transformer.kneighbors_graph(X, mode="ones")
    # n_neighbors + 1 neighbours per row (mode='distance') need that many samples.
    with pytest.raises(ValueError, match="Expected n_neighbors <= n_samples_fit, but "
                                         "n_neighbors = 4, n_samples_fit = 3"):
        QuantizedNeighborsTransformer(ITQ(n_bits=2, random_state=0), n_neighbors=3).fit_transform(X[:3])


def test_docstring_examples():
    result = doctest.testmod(_transformer, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("mode", ["connectivity", "distance"])
def test_dataframe_keeps_its_feature_names_through_transform(mode):
    # transform validated the DataFrame, then passed the bare array to
    # kneighbors_graph, whose second validation warned "X does not have valid
    # feature names" on every transform of the frame it was fitted on
    pd = pytest.importorskip("pandas")
    X, _ = make_blobs(120, n_features=4, random_state=0)
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(4)])
    est = QuantizedNeighborsTransformer(ProductQuantizer(4, subspace_bits=2, random_state=0),
                                        n_neighbors=3, mode=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph = est.fit_transform(frame)
        again = est.transform(frame)
        direct = est.kneighbors_graph(frame, n_neighbors=3 + (mode == "distance"), mode=mode)
    assert list(est.feature_names_in_) == list(frame.columns)
    assert (graph != direct).nnz == 0 and (again != direct).nnz == 0
    # an array without the names still warns, as scikit-learn's estimators do
    with pytest.warns(UserWarning, match="does not have valid feature names"):
        est.transform(X)


def test_n_neighbors_set_after_fit_is_the_one_every_method_uses():
    # kneighbors and kneighbors_graph kept the value of fit, transform took the new one
    X, _ = make_blobs(200, n_features=4, random_state=0)
    est = QuantizedNeighborsTransformer(ProductQuantizer(4, subspace_bits=2, random_state=0),
                                        n_neighbors=5).fit(X)
    est.set_params(n_neighbors=3)
    assert est.kneighbors(X[:2])[1].shape == (2, 3)
    assert list(est.kneighbors_graph(X[:2]).getnnz(axis=1)) == [3, 3]
    reference = KNeighborsTransformer(n_neighbors=5).fit(X).set_params(n_neighbors=3)
    assert reference.kneighbors(X[:2])[1].shape == (2, 3)  # scikit-learn's behaviour
    assert list(reference.transform(X[:2]).getnnz(axis=1)) == [4, 4]  # mode="distance": + 1
    assert list(est.transform(X[:2]).getnnz(axis=1)) == [4, 4]
