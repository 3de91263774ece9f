"""QuantizedNeighbors: the NearestNeighbors interface over learned codes.

The path of the data, from ``fit`` to ``kneighbors``:

1. ``fit(X, y)`` fits a clone of the quantizer on X (y passed through), then
   encodes X chunk by chunk into the database the kernel reads
   (``_encode_database``) and keeps y as the database labels.
2. ``kneighbors(X)`` turns the queries into what the kernel needs
   (``_encode_queries``) and runs the kernel (``_search``), which returns
   exact distances and int64 indices, ties ranked by database index.

The quantizer protocol (how a quantizer tells the searcher how to search it)
is described in the class docstring.
"""

import numbers
from numbers import Integral

import numpy as np
from scipy import sparse
from sklearn.base import BaseEstimator, _fit_context, clone
from sklearn.utils import check_array
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_consistent_length, check_is_fitted, validate_data

from ._codes import pack_bits
from ._itq import ITQ
from ._kernels._hamming import hamming_kneighbors
from ._kernels._openmp import effective_n_threads
from .metrics import map_at_r_score

# Rows encoded at a time when indexing, to bound the memory beyond the codes.
_ENCODE_CHUNK = 65536


class QuantizedNeighbors(BaseEstimator):
    """Nearest-neighbour search over the codes of a quantizer.

    ``fit`` learns the quantizer on the database and stores the database as
    codes; ``kneighbors`` encodes the queries with the same quantizer and
    runs an exact, multi-threaded search over the codes. The interface is
    scikit-learn's :class:`~sklearn.neighbors.NearestNeighbors`, so the
    searcher fits in a :class:`~sklearn.pipeline.Pipeline` and its ``score``
    (mAP@R, with ``R = n_neighbors``) drives
    :class:`~sklearn.model_selection.GridSearchCV`.

    Read more in the :ref:`User Guide <searching>`.

    Parameters
    ----------
    quantizer : estimator, default=None
        Unfitted quantizer with ``fit`` and ``transform``; cloned in ``fit``.
        ``None`` means ``ITQ()``.
    n_neighbors : int, default=10
        Neighbours returned by :meth:`kneighbors`, and ``R`` of :meth:`score`.
    metric : {"auto", "hamming"}, default="auto"
        How codes are compared. ``"hamming"`` counts differing bits of binary
        codes; ``"auto"`` picks it for binary quantizers.
    n_jobs : int, default=None
        OpenMP threads of the search kernel. ``None`` uses the OpenMP default
        (all cores, or ``OMP_NUM_THREADS``); ``-1`` all cores, ``-2`` all but
        one, and so on. Results do not depend on it.

    Attributes
    ----------
    quantizer_ : estimator
        The fitted clone of ``quantizer``.
    metric_ : str
        The metric in use (``"hamming"``).
    codes_ : ndarray of shape (n_samples_fit, n_words), dtype=uint64
        The database: each code packed in ``n_words = ceil(n_bits / 64)``
        64-bit words.
    n_samples_fit_ : int
        Number of database items.
    n_features_in_ : int
        Number of features seen during :term:`fit`.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during :term:`fit`. Defined only when `X`
        has feature names that are all strings.

    See Also
    --------
    sklearn.neighbors.NearestNeighbors : Exact search on the float vectors.
    sklearn_hash.metrics.map_at_r_score : The metric behind :meth:`score`.

    Notes
    -----
    **How a quantizer plugs in.** A quantizer is searched by Hamming distance
    when its ``transform`` returns one 0/1 column per bit, shape
    ``(n_samples, n_bits)``; the searcher packs the bits itself. This is all a
    user's own binary hasher needs.

    **Exactness and ties.** Distances are exact Hamming distances (integers).
    Items at equal distance are ranked by ascending database index, so the
    result is the same for any ``n_jobs``. The kernel's cost is
    ``O(n_queries * n_samples_fit * n_words)`` word operations; memory is
    ``8 * n_words`` bytes per database item.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from sklearn_hash import ITQ, QuantizedNeighbors
    >>> X, y = load_digits(return_X_y=True)
    >>> search = QuantizedNeighbors(ITQ(n_bits=32, random_state=0), n_neighbors=5)
    >>> search.fit(X[:1500], y[:1500])
    QuantizedNeighbors(n_neighbors=5, quantizer=ITQ(random_state=0))
    >>> distances, indices = search.kneighbors(X[1500:1502])
    >>> indices.shape, distances.dtype
    ((2, 5), dtype('int32'))
    >>> round(search.score(X[1500:], y[1500:]), 2) > 0.5
    True
    """

    _parameter_constraints: dict = {
        "quantizer": [HasMethods(["fit", "transform"]), None],
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "metric": [StrOptions({"auto", "hamming"})],
        "n_jobs": [Integral, None],
    }

    def __init__(self, quantizer=None, *, n_neighbors=10, metric="auto", n_jobs=None):
        self.quantizer = quantizer
        self.n_neighbors = n_neighbors
        self.metric = metric
        self.n_jobs = n_jobs

    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y=None):
        """Fit the quantizer on X and index X as the database.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Database vectors.
        y : array-like of shape (n_samples,) or (n_samples, n_labels), default=None
            Database labels: passed to the quantizer's ``fit`` (supervised
            quantizers use them) and kept for :meth:`score`.

        Returns
        -------
        self : QuantizedNeighbors
            The fitted searcher.
        """
        effective_n_threads(self.n_jobs)  # rejects n_jobs=0 before any work
        X = validate_data(self, X, dtype=[np.float64, np.float32], ensure_min_samples=2)
        if y is not None:
            y = check_array(y, ensure_2d=False, dtype=None, input_name="y")
            check_consistent_length(X, y)
        self.quantizer_ = clone(self.quantizer) if self.quantizer is not None else ITQ()
        self.quantizer_.fit(X, y)
        self.metric_ = self._resolve_metric()
        self.codes_ = self._encode_database(X)
        self.n_samples_fit_ = X.shape[0]
        self._fit_y = y
        return self

    def _resolve_metric(self):
        return "hamming"

    def _encode_database(self, X):
        """Database codes as the kernel stores them, encoded chunk by chunk."""
        chunks = [
            pack_bits(self.quantizer_.transform(X[start : start + _ENCODE_CHUNK]))
            for start in range(0, X.shape[0], _ENCODE_CHUNK)
        ]
        return np.ascontiguousarray(np.vstack(chunks))

    def _encode_queries(self, X):
        """Queries in the form the kernel reads."""
        codes = pack_bits(self.quantizer_.transform(X))
        if codes.shape[1] != self.codes_.shape[1]:
            raise ValueError(
                f"The quantizer encoded the queries in {codes.shape[1]} words but the "
                f"database in {self.codes_.shape[1]}; its code length changed after fit."
            )
        return codes

    def _search(self, queries, n_neighbors, exclude_self):
        return hamming_kneighbors(
            queries,
            self.codes_,
            n_neighbors,
            exclude_self=exclude_self,
            n_threads=effective_n_threads(self.n_jobs),
        )

    def kneighbors(self, X=None, n_neighbors=None, return_distance=True):
        """Find the nearest database items of each query.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), default=None
            Query vectors. ``None``: every database item queries the others,
            never returning itself.
        n_neighbors : int, default=None
            Neighbours per query; ``None`` uses the constructor's value.
        return_distance : bool, default=True
            Whether to return the distances.

        Returns
        -------
        neigh_dist : ndarray of shape (n_queries, n_neighbors), dtype=int32
            Hamming distances, ascending. Only with ``return_distance=True``.
        neigh_ind : ndarray of shape (n_queries, n_neighbors), dtype=int64
            Database indices of the neighbours; equal distances in ascending
            index order.
        """
        check_is_fitted(self)
        if n_neighbors is None:
            n_neighbors = self.n_neighbors
        elif not isinstance(n_neighbors, numbers.Integral) or isinstance(n_neighbors, bool):
            raise TypeError(
                f"n_neighbors does not take {type(n_neighbors)} value, enter integer value"
            )
        elif n_neighbors <= 0:
            raise ValueError(f"Expected n_neighbors > 0. Got {n_neighbors}")
        n_neighbors = int(n_neighbors)

        query_is_train = X is None
        if query_is_train:
            queries = self.codes_
            n_queries = self.n_samples_fit_
        else:
            X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
            queries = self._encode_queries(X)
            n_queries = X.shape[0]
        # Leaving each indexed point out of its own answer needs one more item.
        n_required = n_neighbors + 1 if query_is_train else n_neighbors
        if n_required > self.n_samples_fit_:
            raise ValueError(
                f"Expected n_neighbors <= n_samples_fit, but n_neighbors = {n_required}, "
                f"n_samples_fit = {self.n_samples_fit_}, n_samples = {n_queries}"
            )
        distances, indices = self._search(queries, n_neighbors, query_is_train)
        return (distances, indices) if return_distance else indices

    def kneighbors_graph(self, X=None, n_neighbors=None, mode="connectivity"):
        """Sparse graph of the k nearest database items of each query.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), default=None
            Query vectors; ``None`` as in :meth:`kneighbors`.
        n_neighbors : int, default=None
            Neighbours per query; ``None`` uses the constructor's value.
        mode : {"connectivity", "distance"}, default="connectivity"
            Entries of ones, or the distances to the neighbours.

        Returns
        -------
        A : sparse matrix of shape (n_queries, n_samples_fit)
            CSR matrix; ``A[i, j]`` is set when database item j is one of the
            neighbours of query i.
        """
        check_is_fitted(self)
        if mode == "connectivity":
            indices = self.kneighbors(X, n_neighbors, return_distance=False)
            data = np.ones(indices.size)
        elif mode == "distance":
            distances, indices = self.kneighbors(X, n_neighbors, return_distance=True)
            data = distances.ravel().astype(np.float64)
        else:
            raise ValueError(
                'Unsupported mode, must be one of "connectivity", '
                f'or "distance" but got "{mode}" instead'
            )
        n_queries, k = indices.shape
        indptr = np.arange(0, n_queries * k + 1, k)
        return sparse.csr_matrix(
            (data, indices.ravel(), indptr), shape=(n_queries, self.n_samples_fit_)
        )

    def score(self, X, y):
        """mAP@R of the queries X against the database, with R = n_neighbors.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)
            Query vectors.
        y : array-like of shape (n_queries,) or (n_queries, n_labels)
            Query labels, in the form of the labels given to :meth:`fit`.

        Returns
        -------
        score : float
            :func:`~sklearn_hash.metrics.map_at_r_score` of the ranking.
        """
        check_is_fitted(self)
        if self._fit_y is None:
            raise ValueError(
                "score needs the labels of the database: fit QuantizedNeighbors with y."
            )
        indices = self.kneighbors(X, return_distance=False)
        return map_at_r_score(y, self._fit_y, indices)
