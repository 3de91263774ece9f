"""QuantizedNeighborsTransformer: a k-neighbours graph from quantized codes.

scikit-learn's way to plug an approximate neighbour search into estimators
that accept ``metric="precomputed"`` (TSNE, Isomap, SpectralEmbedding,
DBSCAN, KNeighborsClassifier, ...) is a transformer whose output is the
sparse graph of each sample's nearest neighbours, as
:class:`~sklearn.neighbors.KNeighborsTransformer` gives (scikit-learn's
example "Approximate nearest neighbors in TSNE"). This one builds the graph
with :class:`~sklearn_hash.QuantizedNeighbors`.
"""

from numbers import Integral

import numpy as np
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from ._neighbors import QuantizedNeighbors


class QuantizedNeighborsTransformer(ClassNamePrefixFeaturesOutMixin, TransformerMixin,
                                    BaseEstimator):
    """Transform X into a (weighted) graph of k nearest neighbours found on codes.

    The transformed data is a sparse graph as returned by
    :meth:`QuantizedNeighbors.kneighbors_graph`: the drop-in replacement, with
    learned codes, of :class:`~sklearn.neighbors.KNeighborsTransformer`, for
    the estimators that take ``metric="precomputed"`` neighbour graphs
    (:class:`~sklearn.manifold.TSNE`, :class:`~sklearn.manifold.Isomap`,
    :class:`~sklearn.manifold.SpectralEmbedding`,
    :class:`~sklearn.cluster.DBSCAN`,
    :class:`~sklearn.neighbors.KNeighborsClassifier`, ...).

    Read more in the :ref:`User Guide <searching>`.

    Parameters
    ----------
    quantizer : estimator, default=None
        Unfitted quantizer with ``fit`` and ``transform``, as for
        :class:`QuantizedNeighbors`; cloned in ``fit``. ``None`` means
        ``ITQ()``.
    n_neighbors : int, default=5
        Number of neighbors for each sample in the transformed sparse graph.
        For compatibility reasons, as each sample is considered as its own
        neighbor, one extra neighbor will be computed when
        ``mode == 'distance'``. In this case, the sparse graph contains
        (n_neighbors + 1) neighbors.
    mode : {'distance', 'connectivity'}, default='distance'
        Type of returned matrix: 'connectivity' will return the connectivity
        matrix with ones and zeros, and 'distance' will return the distances
        between neighbors as the searcher computes them (see Notes).
    metric : {"auto", "hamming", "adc", "sdc"}, default="auto"
        How codes are compared, as in :class:`QuantizedNeighbors`:
        ``"hamming"`` for binary codes, ``"adc"`` or ``"sdc"`` for product
        codes; ``"auto"`` picks ``"adc"`` for quantizers with distance tables
        and ``"hamming"`` otherwise.
    n_jobs : int, default=None
        OpenMP threads of the search kernel. ``None`` uses the OpenMP default
        (all cores, or ``OMP_NUM_THREADS``); ``-1`` all cores. Results do not
        depend on it.

    Attributes
    ----------
    neighbors_ : QuantizedNeighbors
        The fitted searcher over the codes of the training data.
    quantizer_ : estimator
        The fitted clone of ``quantizer`` (``neighbors_.quantizer_``).
    metric_ : str
        The metric in use: ``"hamming"``, ``"adc"`` or ``"sdc"``.
    n_samples_fit_ : int
        Number of samples in the fitted data.
    n_features_in_ : int
        Number of features seen during ``fit``.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during ``fit``. Defined only when `X`
        has feature names that are all strings.

    See Also
    --------
    sklearn.neighbors.KNeighborsTransformer : The same graph from exact
        search on the float vectors.
    QuantizedNeighbors : The searcher behind the graph.

    Notes
    -----
    **Units of the distances.** The graph holds the searcher's distances as
    float64: for product codes (``"adc"``, ``"sdc"``) the estimated L2
    distance, in the units of scikit-learn's ``"euclidean"`` metric; for
    binary codes (``"hamming"``) the number of differing bits, where
    scikit-learn's ``"hamming"`` metric would give the fraction of differing
    coordinates (divide by ``n_bits`` to compare). Geodesic and density
    methods (Isomap, DBSCAN's ``eps``) read these values as distances.

    **The sample itself.** ``fit_transform(X)`` is ``fit(X).transform(X)``:
    the queries are the training samples, each compared with the codes of
    all of them, itself included, as with ``KNeighborsTransformer``. With
    binary codes a sample is at distance 0 from its own code, and is listed
    first unless an earlier sample has the same code (equal distances are
    ranked by index). With ADC the distance to its own code is its
    quantization error, which other codes may beat; the graph then lists
    the sample after them, or not at all.

    Rows are sorted by increasing distance, each with exactly
    ``n_neighbors`` (+ 1 with ``mode='distance'``) stored entries; zero
    distances are stored explicitly, so the estimators that read the graph
    see them as edges.

    Examples
    --------
    >>> from sklearn.datasets import load_wine
    >>> from sklearn.preprocessing import StandardScaler
    >>> from sklearn_hash import ProductQuantizer, QuantizedNeighborsTransformer
    >>> X, _ = load_wine(return_X_y=True)
    >>> X = StandardScaler().fit_transform(X)
    >>> X.shape
    (178, 13)
    >>> transformer = QuantizedNeighborsTransformer(
    ...     ProductQuantizer(n_bits=16, subspace_bits=4, random_state=0), n_neighbors=5)
    >>> X_dist_graph = transformer.fit_transform(X)
    >>> X_dist_graph.shape, X_dist_graph.format, X_dist_graph.dtype
    ((178, 178), 'csr', dtype('float64'))
    >>> int(X_dist_graph.getnnz(axis=1).min()), int(X_dist_graph.getnnz(axis=1).max())
    (6, 6)
    """

    _parameter_constraints: dict = {
        "quantizer": [HasMethods(["fit", "transform"]), None],
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "mode": [StrOptions({"distance", "connectivity"})],
        "metric": [StrOptions({"auto", "hamming", "adc", "sdc"})],
        "n_jobs": [Integral, None],
    }

    def __init__(self, quantizer=None, *, n_neighbors=5, mode="distance", metric="auto",
                 n_jobs=None):
        self.quantizer = quantizer
        self.n_neighbors = n_neighbors
        self.mode = mode
        self.metric = metric
        self.n_jobs = n_jobs

    @_fit_context(
        # The quantizer is an estimator: its own parameters are validated in its fit.
        prefer_skip_nested_validation=False
    )
    def fit(self, X, y=None):
        """Fit the quantizer on X and index X's codes.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data.
        y : array-like of shape (n_samples,), default=None
            Passed to the quantizer's ``fit`` (supervised quantizers use
            it); ignored by unsupervised ones.

        Returns
        -------
        self : QuantizedNeighborsTransformer
            The fitted k-nearest neighbors transformer.
        """
        X = validate_data(self, X, dtype=[np.float64, np.float32], order="C",
                          ensure_min_samples=2)
        self.neighbors_ = QuantizedNeighbors(
            self.quantizer, n_neighbors=self.n_neighbors, metric=self.metric, n_jobs=self.n_jobs
        ).fit(X, y)
        self.quantizer_ = self.neighbors_.quantizer_
        self.metric_ = self.neighbors_.metric_
        self.n_samples_fit_ = self.neighbors_.n_samples_fit_
        self._n_features_out = self.n_samples_fit_
        return self

    def transform(self, X):
        """Compute the (weighted) graph of Neighbors for points in X.

        Parameters
        ----------
        X : array-like of shape (n_samples_transform, n_features)
            Sample data.

        Returns
        -------
        Xt : sparse matrix of shape (n_samples_transform, n_samples_fit)
            Xt[i, j] is assigned the weight of edge that connects i to j.
            Only the neighbors have an explicit value, float64; each row
            lists its neighbours by increasing distance.
            The matrix is of CSR format.
        """
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], order="C", reset=False)
        add_one = self.mode == "distance"
        return self._graph(X, self.n_neighbors + add_one, self.mode)

    def fit_transform(self, X, y=None):
        """Fit to data, then transform it.

        Fits transformer to X and y and returns the graph of X's neighbours
        among X itself: ``fit(X, y).transform(X)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training set.
        y : array-like of shape (n_samples,), default=None
            Passed to the quantizer's ``fit``.

        Returns
        -------
        Xt : sparse matrix of shape (n_samples, n_samples)
            Xt[i, j] is assigned the weight of edge that connects i to j.
            Only the neighbors have an explicit value.
            The matrix is of CSR format.
        """
        return self.fit(X, y).transform(X)

    def kneighbors(self, X=None, n_neighbors=None, return_distance=True):
        """Find the K-neighbors of a point, on the codes.

        See :meth:`QuantizedNeighbors.kneighbors`; distances are returned as
        the searcher gives them.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), default=None
            The query points. ``None``: every training sample queries the
            others, never returning itself.
        n_neighbors : int, default=None
            Number of neighbors required for each sample; ``None`` uses the
            constructor's value.
        return_distance : bool, default=True
            Whether or not to return the distances.

        Returns
        -------
        neigh_dist : ndarray of shape (n_queries, n_neighbors)
            Distances to the neighbours, ascending; only present if
            ``return_distance=True``.
        neigh_ind : ndarray of shape (n_queries, n_neighbors)
            Indices of the nearest points in the training data.
        """
        check_is_fitted(self)
        if X is not None:
            X = validate_data(self, X, dtype=[np.float64, np.float32], order="C", reset=False)
        if n_neighbors is None:  # the current value, as set_params may have changed it
            n_neighbors = self.n_neighbors
        return self.neighbors_.kneighbors(X, n_neighbors, return_distance)

    def kneighbors_graph(self, X=None, n_neighbors=None, mode="connectivity"):
        """Compute the (weighted) graph of k-Neighbors for points in X.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), default=None
            The query points; ``None`` as in :meth:`kneighbors`.
        n_neighbors : int, default=None
            Number of neighbors for each sample; ``None`` uses the
            constructor's value.
        mode : {'connectivity', 'distance'}, default='connectivity'
            Type of returned matrix: ones, or the distances (float64).

        Returns
        -------
        A : sparse matrix of shape (n_queries, n_samples_fit)
            CSR matrix; ``A[i, j]`` is set when training sample j is one of
            the neighbours of query i.
        """
        check_is_fitted(self)
        if X is not None:
            X = validate_data(self, X, dtype=[np.float64, np.float32], order="C", reset=False)
        return self._graph(X, self.n_neighbors if n_neighbors is None else n_neighbors, mode)

    def _graph(self, X, n_neighbors, mode):
        """The searcher's graph of X (validated already: a second validation of the
        array, without the feature names, would warn), as float64."""
        graph = self.neighbors_.kneighbors_graph(X, n_neighbors, mode=mode)
        if graph.dtype != np.float64:
            graph = graph.astype(np.float64)
        return graph

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # KNeighborsTransformer's tags with metric != "precomputed": a pairwise
        # input is not expected, NaN is refused. The quantizers take dense
        # arrays only, so sparse input is not accepted (KNeighborsTransformer
        # accepts it). The graph is float64 whatever the input's dtype.
        tags.input_tags.pairwise = False
        tags.input_tags.allow_nan = False
        tags.input_tags.sparse = False
        tags.transformer_tags.preserves_dtype = ["float64"]
        return tags
