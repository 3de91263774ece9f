"""QuantizedNeighbors: the NearestNeighbors interface over learned codes.

The path of the data, from ``fit`` to ``kneighbors``:

1. ``fit(X, y)`` fits a clone of the quantizer on X (y passed through),
   picks the metric from what the quantizer offers (``_resolve_metric``),
   encodes X chunk by chunk into the database the kernel reads
   (``_encode_database``: packed bits, or codeword indices) and keeps y as
   the database labels.
2. ``kneighbors(X)`` runs ``_search``: the queries become what the kernel
   needs (``_encode_queries``: packed bits for the Hamming kernel, distance
   tables for the ADC kernel, a chunk of queries at a time) and the kernel
   returns exact distances and int64 indices, ties ranked by database index.

The quantizer protocol (how a quantizer tells the searcher how to search it)
is described in the class docstring.
"""

import copy
import json
import numbers
import pickle
import threading
from numbers import Integral
from pathlib import Path

import numpy as np
from scipy import sparse
from sklearn.base import BaseEstimator, _fit_context, clone
from sklearn.utils import check_array
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_consistent_length, check_is_fitted, validate_data
from threadpoolctl import ThreadpoolController

from ._codes import pack_bits
from ._itq import ITQ
from ._kernels._adc import adc_kneighbors
from ._kernels._hamming import hamming_kneighbors
from ._kernels._openmp import effective_n_threads
from ._version import __version__
from .metrics import map_at_r_score

# Rows encoded at a time when indexing, to bound the memory beyond the codes.
_ENCODE_CHUNK = 65536
# Queries whose distance tables are built and searched at a time.
_QUERY_CHUNK = 2048
# Version of the directory layout written by QuantizedNeighbors.save.
_INDEX_FORMAT = 1


class _SingleThreadedBlas:
    """Context manager: BLAS on one thread while a search runs.

    Searching mixes small matrix products (distance tables, coarse
    distances) with the kernels' own OpenMP threads. OpenBLAS worker threads
    keep spinning for a while after each product, and on few cores they
    compete with the kernel: 300 queries to IVFQuantizedNeighbors took 8 ms
    instead of 2 ms on 2 cores. The thread that sets the limit is the one
    that restores it (searches nest, and run concurrently from several
    threads: the others then search without the limit).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._local = threading.local()
        self._owner = None
        self._limit = None
        self._controller = None

    def __enter__(self):
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        if depth == 0:
            with self._lock:
                if self._owner is None:
                    if self._controller is None:
                        self._controller = ThreadpoolController()
                    self._limit = self._controller.limit(limits=1, user_api="blas")
                    self._owner = threading.get_ident()
        return self

    def __exit__(self, *exc_info):
        self._local.depth -= 1
        if self._local.depth == 0:
            with self._lock:
                if self._owner == threading.get_ident():
                    self._limit.restore_original_limits()
                    self._limit = None
                    self._owner = None


_single_threaded_blas = _SingleThreadedBlas()


class _KNeighborsSearchMixin:
    """kneighbors, kneighbors_graph, score, partial_fit, save and load over a fitted index.

    The searcher provides ``_search(X, n_neighbors)`` (``X=None``: the
    database items query the others), ``fit``, ``add``, ``n_samples_fit_``,
    ``_fit_y``, and in ``_SAVED_ARRAYS`` the fitted arrays that ``save``
    writes as ``.npy`` files and ``load`` memory-maps.
    """

    _SAVED_ARRAYS: dict = {"codes": "codes_"}

    def _check_new_items(self, X, y):
        """Validate items to add: the fitted features, and labels iff fitted with labels."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], order="C", reset=False)
        if (y is None) != (self._fit_y is None):
            state = "with" if self._fit_y is not None else "without"
            raise ValueError(
                f"The index was fitted {state} labels: add items {state} y too."
            )
        if y is not None:
            y = check_array(y, ensure_2d=False, dtype=None, input_name="y")
            check_consistent_length(X, y)
            if y.shape[1:] != self._fit_y.shape[1:]:
                expected = ("(n_samples,)" if self._fit_y.ndim == 1
                            else f"(n_samples, {self._fit_y.shape[1]})")
                raise ValueError(
                    f"y must have the shape of the index's labels, {expected}; got "
                    f"shape {y.shape}."
                )
        return X, y

    def partial_fit(self, X, y=None):
        """Fit on the first call, then :meth:`add` the items of later calls.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Vectors to index (and, on the first call, to fit the quantizer).
        y : array-like of shape (n_samples,) or (n_samples, n_labels), default=None
            Their labels.

        Returns
        -------
        self : object
            The fitted or grown index.
        """
        if not hasattr(self, "codes_"):
            return self.fit(X, y)
        return self.add(X, y)

    def save(self, path):
        """Save the index to a directory, the arrays as ``.npy`` files.

        The directory gets ``codes.npy`` (the database codes; for
        :class:`IVFQuantizedNeighbors` also ``ids.npy`` and
        ``list_offsets.npy``), ``labels.npy`` (when fitted with labels),
        ``searcher.pkl`` (this searcher with its fitted quantizer, without
        those arrays) and ``index.json`` (format and sizes). :meth:`load`
        memory-maps the arrays, so an index larger than memory can be
        searched.

        Parameters
        ----------
        path : str or os.PathLike
            Directory; created if missing, files in it overwritten.

        Returns
        -------
        path : pathlib.Path
            The directory.
        """
        check_is_fitted(self)
        if self._fit_y is not None and self._fit_y.dtype.kind == "O":
            raise ValueError(
                "Labels of dtype object cannot be stored as .npy without pickle; use "
                "numeric or string labels (e.g. y.astype(str))."
            )
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": _INDEX_FORMAT,
            "sklearn_hash_version": __version__,
            "searcher": type(self).__name__,
            "n_samples": int(self.n_samples_fit_),
            "labels": self._fit_y is not None,
        }
        shell = copy.copy(self)
        for stem, attr in self._SAVED_ARRAYS.items():
            array = getattr(self, attr)
            np.save(path / f"{stem}.npy", array, allow_pickle=False)
            meta[f"{stem}_shape"] = list(array.shape)
            meta[f"{stem}_dtype"] = array.dtype.str
            setattr(shell, attr, None)
        if self._fit_y is not None:
            np.save(path / "labels.npy", self._fit_y, allow_pickle=False)
        elif (path / "labels.npy").exists():
            (path / "labels.npy").unlink()
        shell._fit_y = None
        shell._drop_caches()
        with open(path / "searcher.pkl", "wb") as f:
            pickle.dump(shell, f, protocol=pickle.HIGHEST_PROTOCOL)
        (path / "index.json").write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path, *, mmap_mode="r"):
        """Load an index written by :meth:`save`.

        ``searcher.pkl`` is unpickled: load only directories you trust.

        Parameters
        ----------
        path : str or os.PathLike
            Directory written by :meth:`save`.
        mmap_mode : {"r", "c", None}, default="r"
            ``"r"`` memory-maps the arrays read-only (searching reads them from
            the files, sharing the page cache between processes); ``"c"``
            copy-on-write; ``None`` reads them into memory. :meth:`add` works
            in every mode and keeps the grown arrays in memory.

        Returns
        -------
        searcher : object
            The fitted searcher, of the class ``load`` is called on.
        """
        if mmap_mode not in ("r", "c", None):
            raise ValueError(f"mmap_mode must be 'r', 'c' or None; got {mmap_mode!r}.")
        path = Path(path)
        meta_path = path / "index.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{path} holds no index.json: not a saved index.")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != _INDEX_FORMAT:
            raise ValueError(
                f"{path} holds index format {meta.get('format')!r}; this version of "
                f"sklearn_hash reads format {_INDEX_FORMAT}."
            )
        with open(path / "searcher.pkl", "rb") as f:
            searcher = pickle.load(f)
        if not isinstance(searcher, cls):
            raise ValueError(f"{path}/searcher.pkl holds a {type(searcher).__name__}, "
                             f"not a {cls.__name__}.")
        for stem, attr in cls._SAVED_ARRAYS.items():
            array = np.load(path / f"{stem}.npy", mmap_mode=mmap_mode, allow_pickle=False)
            if (list(array.shape) != meta[f"{stem}_shape"]
                    or array.dtype.str != meta[f"{stem}_dtype"]):
                raise ValueError(
                    f"{path}/{stem}.npy has shape {array.shape} and dtype {array.dtype}; "
                    f"index.json expects {tuple(meta[stem + '_shape'])} and "
                    f"{meta[stem + '_dtype']}."
                )
            setattr(searcher, attr, array)
        searcher._fit_y = (np.load(path / "labels.npy", allow_pickle=False)
                           if meta["labels"] else None)
        if searcher._fit_y is not None and len(searcher._fit_y) != meta["n_samples"]:
            raise ValueError(f"{path}/labels.npy does not have one label per item.")
        return searcher

    def _drop_caches(self):
        """Forget what is rebuilt on demand (nothing by default)."""

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
        neigh_dist : ndarray of shape (n_queries, n_neighbors)
            Distances, ascending: Hamming distances (int32), or estimated
            squared L2 distances (float32) for ADC and SDC. Only with
            ``return_distance=True``.
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
            n_queries = self.n_samples_fit_
        else:
            X = validate_data(self, X, dtype=[np.float64, np.float32], order="C", reset=False)
            n_queries = X.shape[0]
        # Leaving each indexed point out of its own answer needs one more item.
        n_required = n_neighbors + 1 if query_is_train else n_neighbors
        if n_required > self.n_samples_fit_:
            raise ValueError(
                f"Expected n_neighbors <= n_samples_fit, but n_neighbors = {n_required}, "
                f"n_samples_fit = {self.n_samples_fit_}, n_samples = {n_queries}"
            )
        with _single_threaded_blas:
            distances, indices = self._search(X, n_neighbors)
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
                f"score needs the labels of the database: fit {type(self).__name__} with y."
            )
        indices = self.kneighbors(X, return_distance=False)
        return map_at_r_score(y, self._fit_y, indices)


class QuantizedNeighbors(_KNeighborsSearchMixin, BaseEstimator):
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
    metric : {"auto", "hamming", "adc", "sdc"}, default="auto"
        How codes are compared. ``"hamming"`` counts differing bits of binary
        codes. ``"adc"`` (asymmetric distance) compares each float query with
        the database codes through its distance tables; ``"sdc"`` (symmetric
        distance) quantizes the query too. ``"auto"`` picks ``"adc"`` for
        quantizers with distance tables and ``"hamming"`` otherwise.
    n_jobs : int, default=None
        OpenMP threads of the search kernel. ``None`` uses the OpenMP default
        (all cores, or ``OMP_NUM_THREADS``); ``-1`` all cores, ``-2`` all but
        one, and so on. Results do not depend on it.

    Attributes
    ----------
    quantizer_ : estimator
        The fitted clone of ``quantizer``.
    metric_ : str
        The metric in use: ``"hamming"``, ``"adc"`` or ``"sdc"``.
    codes_ : ndarray of shape (n_samples_fit, n_words) or (n_samples_fit, n_subspaces)
        The database as the kernel reads it: for Hamming, each code packed in
        ``n_words = ceil(n_bits / 64)`` uint64 words; for ADC and SDC, the
        codeword indices (uint8, or uint16 above 256 codewords).
    n_samples_fit_ : int
        Number of database items.
    n_features_in_ : int
        Number of features seen during ``fit``.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during ``fit``. Defined only when `X`
        has feature names that are all strings.

    See Also
    --------
    sklearn.neighbors.NearestNeighbors : Exact search on the float vectors.
    sklearn_hash.metrics.map_at_r_score : The metric behind :meth:`score`.

    Notes
    -----
    **How a quantizer plugs in.** Two kinds of quantizer, told apart by
    their methods:

    - *Binary* (searched by Hamming distance): ``transform`` returns one 0/1
      column per bit, shape ``(n_samples, n_bits)``; the searcher packs the
      bits itself. This is all a user's own binary hasher needs.
    - *Codebook* (searched by ADC or SDC): ``transform`` returns integer
      codeword indices of shape ``(n_samples, n_subspaces)``, and the
      quantizer has ``distance_tables(X)``, returning float32 tables of shape
      ``(n_samples, n_subspaces, n_codewords)`` of squared distances from each
      row to every codeword; for SDC also ``symmetric_distance_tables()``,
      shape ``(n_subspaces, n_codewords, n_codewords)``. The estimated
      distance to a code is the sum of one table entry per subspace.
      :class:`~sklearn_hash.ProductQuantizer` is such a quantizer.

    With ``X=None`` (database items as queries) only the codes are at hand,
    so codebook quantizers are searched symmetrically (SDC) there.

    **Exactness and ties.** The search is exhaustive and exact for the
    distance it computes: Hamming distances are integers (int32); ADC/SDC
    distances are float32 sums of table entries, added in subspace order.
    Items at equal distance are ranked by ascending database index, so the
    result is the same for any ``n_jobs``. Cost per query: Hamming
    ``O(n_samples_fit * n_words)`` word operations; ADC
    ``O(n_samples_fit * n_subspaces + n_codewords * n_features)``.

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
        "metric": [StrOptions({"auto", "hamming", "adc", "sdc"})],
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
        X = validate_data(self, X, dtype=[np.float64, np.float32], order="C", ensure_min_samples=2)
        if y is not None:
            y = check_array(y, ensure_2d=False, dtype=None, input_name="y")
            check_consistent_length(X, y)
        self.quantizer_ = clone(self.quantizer) if self.quantizer is not None else ITQ()
        self.quantizer_.fit(X, y)
        self.metric_ = self._resolve_metric()
        self._sdc_tables = None
        self.codes_ = self._encode_database(X)
        self.n_samples_fit_ = X.shape[0]
        self._fit_y = y
        return self

    def add(self, X, y=None):
        """Append items to the index, encoded by the fitted quantizer.

        The quantizer is not refitted: new items get the indices
        ``n_samples_fit_, n_samples_fit_ + 1, ...`` and existing items keep
        theirs, so results stored elsewhere stay valid. Refit when the new
        items differ much from those the quantizer was trained on.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Vectors to index.
        y : array-like of shape (n_samples,) or (n_samples, n_labels), default=None
            Their labels; required when the index was fitted with labels,
            refused when it was not.

        Returns
        -------
        self : QuantizedNeighbors
            The grown index.
        """
        X, y = self._check_new_items(X, y)
        codes = self._encode_database(X)
        self.codes_ = np.ascontiguousarray(np.concatenate([self.codes_, codes]))
        if y is not None:
            self._fit_y = np.concatenate([self._fit_y, y])
        self.n_samples_fit_ = self.codes_.shape[0]
        return self

    def _drop_caches(self):
        self._sdc_tables = None

    def _resolve_metric(self):
        has_tables = hasattr(self.quantizer_, "distance_tables")
        if self.metric == "auto":
            return "adc" if has_tables else "hamming"
        if self.metric == "hamming" and has_tables:
            raise ValueError(
                f"metric='hamming' compares binary codes, but "
                f"{type(self.quantizer_).__name__} gives codeword indices with distance "
                f"tables; use metric='adc' or 'sdc' (or 'auto')."
            )
        if self.metric in ("adc", "sdc") and not has_tables:
            raise ValueError(
                f"metric={self.metric!r} needs a quantizer with distance_tables (such as "
                f"ProductQuantizer); {type(self.quantizer_).__name__} gives binary codes: "
                f"use metric='hamming' (or 'auto')."
            )
        return self.metric

    def _encode_database(self, X):
        """Database codes as the kernel stores them, encoded chunk by chunk.

        The output is allocated once, after the first chunk gives its width,
        and filled in place: the memory beyond X and the codes is one chunk's
        worth of the quantizer's working arrays.
        """
        codes = None
        for start in range(0, X.shape[0], _ENCODE_CHUNK):
            chunk = self.quantizer_.transform(X[start : start + _ENCODE_CHUNK])
            if self.metric_ == "hamming":
                chunk = pack_bits(chunk)
            else:
                chunk = self._check_codeword_indices(chunk)
            if codes is None:
                codes = np.empty((X.shape[0], chunk.shape[1]), dtype=chunk.dtype)
            elif chunk.shape[1] != codes.shape[1]:
                raise ValueError(
                    f"The quantizer encoded rows with {chunk.shape[1]} columns after "
                    f"{codes.shape[1]}; codes must have a fixed width."
                )
            elif chunk.dtype.itemsize > codes.dtype.itemsize:  # uint16 indices appeared
                codes = codes.astype(chunk.dtype)
            codes[start : start + chunk.shape[0]] = chunk
        return codes

    @staticmethod
    def _check_codeword_indices(codes):
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.dtype.kind not in "iu":
            raise ValueError(
                "a quantizer searched by distance tables must transform to a 2-D array "
                f"of integer codeword indices; got {codes.ndim}-D {codes.dtype}."
            )
        if codes.size and codes.min() < 0:
            raise ValueError("codeword indices must be non-negative.")
        dtype = np.uint8 if not codes.size or codes.max() < 256 else np.uint16
        return np.ascontiguousarray(codes, dtype=dtype)

    def _symmetric_tables(self):
        if getattr(self, "_sdc_tables", None) is None:
            self._sdc_tables = np.ascontiguousarray(
                self.quantizer_.symmetric_distance_tables(), dtype=np.float32
            )
        return self._sdc_tables

    def _tables_from_codes(self, codes):
        """SDC tables of quantized queries: row m of codeword codes[:, m]."""
        sdc = self._symmetric_tables()
        return np.ascontiguousarray(sdc[np.arange(sdc.shape[0]), codes.astype(np.intp)])

    def _encode_queries(self, X):
        """Queries in the form the kernel reads."""
        if self.metric_ == "hamming":
            queries = pack_bits(self.quantizer_.transform(X))
        elif self.metric_ == "adc":
            queries = np.ascontiguousarray(self.quantizer_.distance_tables(X), dtype=np.float32)
        else:
            queries = self._tables_from_codes(self._check_codeword_indices(self.quantizer_.transform(X)))
        if queries.shape[1] != self.codes_.shape[1]:
            raise ValueError(
                f"The quantizer encoded the queries with {queries.shape[1]} words or "
                f"subspaces but the database with {self.codes_.shape[1]}."
            )
        if self.metric_ != "hamming" and not np.isfinite(queries).all():
            raise ValueError("the quantizer's distance tables hold NaN or infinity.")
        return queries

    def _search(self, X, n_neighbors):
        """Run the kernel for the queries X (None: the database, leaving each item out)."""
        n_threads = effective_n_threads(self.n_jobs)
        if self.metric_ == "hamming":
            queries = self.codes_ if X is None else self._encode_queries(X)
            return hamming_kneighbors(queries, self.codes_, n_neighbors,
                                      exclude_self=X is None, n_threads=n_threads)
        # Distance tables take n_subspaces * n_codewords floats per query:
        # they are built and searched a chunk of queries at a time.
        n_queries = self.n_samples_fit_ if X is None else X.shape[0]
        distances = np.empty((n_queries, n_neighbors), dtype=np.float32)
        indices = np.empty((n_queries, n_neighbors), dtype=np.int64)
        for start in range(0, n_queries, _QUERY_CHUNK):
            stop = min(start + _QUERY_CHUNK, n_queries)
            if X is None:
                tables = self._tables_from_codes(self.codes_[start:stop])
            else:
                tables = self._encode_queries(X[start:stop])
            distances[start:stop], indices[start:stop] = adc_kneighbors(
                tables, self.codes_, n_neighbors,
                self_offset=start if X is None else -1, n_threads=n_threads,
            )
        return distances, indices

