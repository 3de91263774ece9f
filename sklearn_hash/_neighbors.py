"""QuantizedNeighbors: the NearestNeighbors interface over learned codes.

The path of the data, from ``fit`` to ``kneighbors``:

1. ``fit(X, y)`` fits a clone of the quantizer on X (y passed through),
   picks the metric from what the quantizer offers (``_resolve_metric``)
   and the back-end that stores and scans such codes (``_new_index``:
   :class:`~sklearn_hash._backends.MultiIndexHashing` or
   :class:`~sklearn_hash._backends.HammingScan` for packed bits, by
   ``algorithm``; :class:`~sklearn_hash._backends.FastScan` for 4-bit
   codeword indices where the processor has byte shuffles,
   :class:`~sklearn_hash._backends.TableScan` for the others), then
   encodes X chunk by chunk into it (``_index_items``) and keeps y as the
   database labels (and, with ``refine_factor``, the vectors).
2. ``kneighbors(X)`` (in :class:`~sklearn_hash._index.IndexMixin`, with
   ``allowed`` and removals folded into one mask) runs ``_search``: the
   queries become what the back-end reads (``_encode_queries``: packed bits,
   or distance tables a chunk of queries at a time) and the back-end's
   kernel returns exact distances and int64 indices, ties ranked by
   database index; with ``refine_factor`` the candidates are re-ranked by
   the stored vectors (``IndexMixin._refine``). ``radius_neighbors`` runs
   the back-end's range scan the same way.

The quantizer protocol (how a quantizer tells the searcher how to search it)
is described in the class docstring.
"""

from numbers import Integral, Real

import numpy as np
from sklearn import config_context
from sklearn.base import BaseEstimator, _fit_context, clone
from sklearn.utils import check_array
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import (
    check_consistent_length,
    validate_data,
)

from ._backends import HammingScan, MultiIndexHashing, TableScan, check_codeword_indices
from ._base import numpy_output
from ._codes import pack_bits
from ._index import IndexMixin
from ._itq import ITQ
from ._threads import effective_n_threads, search_threads

# Queries whose distance tables are built and searched at a time.
_QUERY_CHUNK = 2048
# Largest number of codewords for which K x K symmetric tables are cached.
_MAX_SDC_CODEWORDS = 1024


class QuantizedNeighbors(IndexMixin, BaseEstimator):
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
    radius : float, default=1.0
        Range of :meth:`radius_neighbors`, in the units of the distances:
        bits for Hamming distances, L2 for product codes.
    algorithm : {"auto", "brute", "multi-index"}, default="auto"
        How binary codes are searched: ``"brute"`` scans every code;
        ``"multi-index"`` uses multi-index hashing (Norouzi et al. 2012),
        exact as well (the same neighbours, distances and ties), and much
        faster where the k-th neighbour is near (clustered codes, large
        databases); ``"auto"`` picks per search by a measured cost rule
        (the k-th distance of a few queries gives the buckets hashing would
        probe). Product codes are always scanned; ``"multi-index"`` is
        refused for them.
    n_substrings : int, default=None
        Substrings of multi-index hashing; ``None``: ``n_bits /
        log2(n_samples_fit)`` as the paper suggests (no substring longer
        than 24 bits).
    refine_factor : int, default=None
        Re-ranking. ``None``: results come from the codes alone. An int r:
        the index also keeps the vectors (as ``refine_storage`` says;
        memory-mapped after :meth:`load`), a search takes ``r *
        n_neighbors`` candidates from the codes and re-orders them by L2
        distance to the stored vectors; with float32 rows the distances
        returned are then exact L2 distances (float64), ties by index.
        ``kneighbors(..., refine_factor=...)`` changes r for one call (the
        vectors must have been kept from ``fit`` on). :meth:`radius_neighbors`
        takes from the codes the items whose estimated squared distance is at
        most ``r * radius ** 2`` and keeps those within ``radius`` of their
        rows (binary codes: the Hamming ball of the codes, without rows).
    refine_storage : {"float32", "sq8"}, default="float32"
        How the re-ranking vectors are kept (with ``refine_factor``).
        ``"float32"``: as they are, distances exact. ``"sq8"``: a byte per
        feature (a quarter of the memory), each feature's 255 steps
        spanning its 0.01%-99.99% quantiles in the data given to ``fit``
        (``refine_offset_``, ``refine_scale_``; values beyond are clipped,
        rows added later included); the distances returned are those to
        the decoded vectors, and the items querying themselves (``X=None``)
        use their decoded vectors. :class:`IVFQuantizedNeighbors` quantizes
        the residuals to the cells' centroids instead, which is more
        accurate.
    n_jobs : int, default=None
        OpenMP threads of the search kernel, and of the quantizer's kernels
        while they encode the queries (PQ and OPQ codes and distance tables).
        ``None`` uses the OpenMP default (all cores, or ``OMP_NUM_THREADS``);
        ``-1`` all cores, ``-2`` all but one, and so on. Results do not
        depend on it.

    Attributes
    ----------
    quantizer_ : estimator
        The fitted clone of ``quantizer``.
    metric_ : str
        The metric in use: ``"hamming"``, ``"adc"`` or ``"sdc"``.
    codes_ : ndarray of shape (n_samples_fit, n_words) or (n_samples_fit, n_subspaces)
        The database as the kernel reads it: for Hamming, each code packed in
        ``n_words = ceil(n_bits / 64)`` uint64 words; for ADC and SDC, the
        codeword indices (uint8, or uint16 above 256 codewords). Removed
        items keep their rows until :meth:`compact`. (A view when the codes
        sit in one chunk; an index grown by :meth:`add` after :meth:`load`
        holds several and this builds their concatenation.)
    refine_storage_ : {"float32", "sq8"} or None
        How the index keeps the rows it re-ranks by: ``refine_storage`` if
        it was fitted with ``refine_factor``, else ``None`` (no rows, and
        ``kneighbors(..., refine_factor=r)`` is refused). Parameters set
        after ``fit`` do not change it.
    refine_offset_, refine_scale_ : ndarray of shape (n_features,)
        With ``refine_storage="sq8"`` (and ``refine_factor``): feature j of a
        stored row decodes as ``refine_scale_[j] * byte + refine_offset_[j]``.
    n_samples_fit_ : int
        Number of database items (removed ones included until
        :meth:`compact`).
    n_removed_ : int
        Number of removed items not yet reclaimed by :meth:`compact`.
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

    With ``X=None`` (database items as queries) only the codes are at hand:
    with ADC each item queries with its reconstruction (the tables of the
    decoded code, built a chunk of items at a time), which ranks as SDC
    does; the metric stays ADC.

    **Exactness and ties.** The search is exhaustive and exact for the
    distance it computes: Hamming distances are integers (int32); ADC/SDC
    rank by float32 sums of table entries (estimated squared L2 distances),
    added in subspace order, and return their square roots (float64), in
    scikit-learn's units.
    Items at equal distance are ranked by ascending database index, so the
    result is the same for any ``n_jobs``. ``allowed=`` restricts a search
    to a subset, :meth:`remove` takes items out for good, :meth:`save`
    writes JSON and ``.npy`` files (never a pickle) atomically. Cost per query: Hamming
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
        "radius": [Interval(Real, 0, None, closed="left")],
        "algorithm": [StrOptions({"auto", "brute", "multi-index"})],
        "n_substrings": [Interval(Integral, 1, None, closed="left"), None],
        "refine_factor": [Interval(Integral, 1, None, closed="left"), None],
        "refine_storage": [StrOptions({"float32", "sq8"})],
        "n_jobs": [Integral, None],
    }

    _TRANSIENT = (*IndexMixin._TRANSIENT, "_sdc_tables")

    def __init__(self, quantizer=None, *, n_neighbors=10, radius=1.0, metric="auto",
                 algorithm="auto", n_substrings=None, refine_factor=None, refine_storage="float32",
                 n_jobs=None):
        self.quantizer = quantizer
        self.n_neighbors = n_neighbors
        self.radius = radius
        self.metric = metric
        self.algorithm = algorithm
        self.n_substrings = n_substrings
        self.refine_factor = refine_factor
        self.refine_storage = refine_storage
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
        with config_context(transform_output="default"):
            self.quantizer_ = clone(self.quantizer) if self.quantizer is not None else ITQ()
            self.quantizer_.fit(X, y)
            self.metric_ = self._resolve_metric()
            self.code_shape_ = self._code_shape(X[:1])
            self._sdc_tables = None
            self._fit_rerank(X)
            self._start_index(y)
            self._append(X, y)
        return self

    def _append(self, X, y):
        with config_context(transform_output="default"):
            super()._append(X, y)

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
        if self.metric == "sdc" and not hasattr(self.quantizer_, "symmetric_distance_tables"):
            raise ValueError(
                f"metric='sdc' needs a quantizer with symmetric_distance_tables; "
                f"{type(self.quantizer_).__name__} has none: use metric='adc'."
            )
        return self.metric

    def _code_shape(self, X_one):
        """(n_bits,) for binary codes, (n_subspaces, n_codewords) for codebook codes."""
        if self.metric_ == "hamming":
            bits = np.asarray(self.quantizer_.transform(X_one))
            if bits.ndim != 2 or bits.shape[1] < 1:
                raise ValueError("a binary quantizer's transform must return a 2-D array "
                                 "with one 0/1 column per bit.")
            return (int(bits.shape[1]),)
        tables = np.asarray(self.quantizer_.distance_tables(X_one))
        if tables.ndim != 3 or tables.shape[0] != 1:
            raise ValueError("distance_tables(X) must return an array of shape (n_samples, "
                             f"n_subspaces, n_codewords); got shape {tables.shape}.")
        if self.metric_ == "sdc":
            n_codewords = tables.shape[2]
            if n_codewords > _MAX_SDC_CODEWORDS:
                raise ValueError(
                    f"metric='sdc' keeps n_subspaces x K x K tables in memory, allowed up to "
                    f"K = {_MAX_SDC_CODEWORDS} codewords; this quantizer has K = "
                    f"{n_codewords}. Use metric='adc', which builds one K-entry table per "
                    f"subspace and query."
                )
        return (int(tables.shape[1]), int(tables.shape[2]))

    def _new_index(self):
        if self.metric_ == "hamming":
            if self.algorithm == "brute":
                return HammingScan(self.code_shape_[0])
            return MultiIndexHashing(self.code_shape_[0], self.n_substrings,
                                     auto=self.algorithm == "auto")
        if self.algorithm == "multi-index":
            raise ValueError(
                "algorithm='multi-index' indexes binary codes (Hamming distance); "
                f"{type(self.quantizer_).__name__} gives product codes: use algorithm='auto' "
                "or 'brute', or IVFQuantizedNeighbors for non-exhaustive search."
            )
        from ._backends import FastScan, fastscan_simd_path

        # 4-bit codes searched by ADC: fast-scan gives the same answers, faster
        # where the processor has byte shuffles (its portable C path is slower
        # than TableScan's float lookups, so TableScan stays there).
        if (self.metric_ == "adc" and self.code_shape_[1] == FastScan.n_codewords
                and fastscan_simd_path() != "portable"):
            return FastScan(self.code_shape_[0])
        return TableScan(*self.code_shape_)

    def _after_load(self):
        self._sdc_tables = None

    def _index_items(self, X):
        codes = self.quantizer_.transform(X)
        if self.metric_ == "hamming":
            codes = np.asarray(codes)
            if codes.ndim != 2 or codes.shape[1] != self.code_shape_[0]:
                raise ValueError(
                    f"The quantizer encoded rows with {codes.shape[1:]} columns after "
                    f"{self.code_shape_[0]}; codes must have a fixed width."
                )
            codes = pack_bits(codes)
        self._index.add(codes)

    @property
    def codes_(self):
        return self._index.codes.to_array()

    def _symmetric_tables(self):
        if getattr(self, "_sdc_tables", None) is None:
            self._sdc_tables = np.ascontiguousarray(
                self.quantizer_.symmetric_distance_tables(), dtype=np.float32
            )
        return self._sdc_tables

    def _tables_of_codes(self, codes):
        """Tables of database items querying with their own codes (X=None).

        SDC: rows of the symmetric tables. ADC: the tables of the decoded
        codes (the same distances, computed a chunk at a time so that no
        K x K table is needed), or the symmetric tables where the quantizer
        cannot decode.
        """
        if self.metric_ == "adc" and hasattr(self.quantizer_, "inverse_transform"):
            return self._check_tables(
                self.quantizer_.distance_tables(self.quantizer_.inverse_transform(codes)))
        if not hasattr(self.quantizer_, "symmetric_distance_tables"):
            raise ValueError(
                f"kneighbors() without X needs the database items' own distance tables, but "
                f"{type(self.quantizer_).__name__} has neither inverse_transform nor "
                f"symmetric_distance_tables; pass the query vectors X."
            )
        if self.code_shape_[1] > _MAX_SDC_CODEWORDS:
            raise ValueError(
                f"kneighbors() without X would need n_subspaces x K x K symmetric tables with "
                f"K = {self.code_shape_[1]} codewords (more than {_MAX_SDC_CODEWORDS}), and "
                f"{type(self.quantizer_).__name__} cannot decode its codes; pass the query "
                f"vectors X."
            )
        sdc = self._symmetric_tables()
        return np.ascontiguousarray(sdc[np.arange(sdc.shape[0]), codes.astype(np.intp)])

    def _check_tables(self, tables):
        tables = np.ascontiguousarray(tables, dtype=np.float32)
        if tables.ndim != 3 or tables.shape[1:] != tuple(self.code_shape_):
            raise ValueError(
                f"The quantizer's distance tables have shape {tables.shape[1:]} per query; "
                f"the index expects {tuple(self.code_shape_)} (n_subspaces, n_codewords)."
            )
        if not np.isfinite(tables).all():
            raise ValueError("the quantizer's distance tables hold NaN or infinity: the "
                             "queries' or the indexed values are too large for float32 "
                             "distances. Scale the data down.")
        return tables

    def _encode_queries(self, X):
        """Queries in the form the back-end reads."""
        if self.metric_ == "hamming":
            bits = np.asarray(self.quantizer_.transform(X))
            if bits.ndim != 2 or bits.shape[1] != self.code_shape_[0]:
                raise ValueError(
                    f"The quantizer encoded the queries with {bits.shape[1:]} bits but the "
                    f"database with {self.code_shape_[0]}."
                )
            return pack_bits(bits)
        if self.metric_ == "adc":
            return self._check_tables(self.quantizer_.distance_tables(X))
        codes = check_codeword_indices(self.quantizer_.transform(X), self.code_shape_[0],
                                       self.code_shape_[1], np.intp)
        return self._tables_of_codes(codes)

    def _search(self, X, n_neighbors, allowed, params):
        """Run the back-end for the queries X (None: the database, leaving each item out)."""
        n_threads = effective_n_threads(self.n_jobs)
        with numpy_output(), search_threads(n_threads):
            if self.metric_ == "hamming":
                if X is None:
                    queries = self._index.codes.to_array()
                    exclude = np.arange(len(queries), dtype=np.int64)
                else:
                    queries, exclude = self._encode_queries(X), None
                return self._index.search(queries, n_neighbors, allowed=allowed,
                                          exclude=exclude, n_threads=n_threads)
            # Distance tables take n_subspaces * n_codewords floats per query:
            # they are built and searched a chunk of queries at a time.
            n_queries = self.n_samples_fit_ if X is None else X.shape[0]
            distances = np.empty((n_queries, n_neighbors), dtype=np.float64)
            indices = np.empty((n_queries, n_neighbors), dtype=np.int64)
            for start in range(0, n_queries, _QUERY_CHUNK):
                stop = min(start + _QUERY_CHUNK, n_queries)
                if X is None:
                    tables = self._tables_of_codes(self._index.codes.slice(start, stop))
                    exclude = np.arange(start, stop, dtype=np.int64)
                else:
                    tables, exclude = self._encode_queries(X[start:stop]), None
                d, indices[start:stop] = self._index.search(
                    tables, n_neighbors, allowed=allowed, exclude=exclude, n_threads=n_threads)
                # Ranked by the squared estimate; returned in L2 units.
                distances[start:stop] = np.sqrt(np.maximum(d, 0, dtype=np.float64))
            return distances, indices

    # ------------------------------------------------------------ radius search
    def _hamming(self):
        return self.metric_ == "hamming"

    def _threshold(self, radius):
        if self.metric_ == "hamming":
            # counts of bits: d <= radius; past the code length every item is in range
            return int(min(np.floor(radius), self.code_shape_[0]))
        return super()._threshold(radius)

    def _radius(self, X, threshold, allowed, params):
        """The back-end's range scan of every item (``X=None``: the items, each left out)."""
        n_threads = effective_n_threads(self.n_jobs)
        parts = []
        with numpy_output(), search_threads(n_threads):
            n_queries = self.n_samples_fit_ if X is None else X.shape[0]
            step = n_queries if self.metric_ == "hamming" else _QUERY_CHUNK
            for start in range(0, max(n_queries, 1), step):
                stop = min(start + step, n_queries)
                if X is None:
                    codes = self._index.codes.slice(start, stop)
                    queries = (codes if self.metric_ == "hamming"
                               else self._tables_of_codes(codes))
                    exclude = np.arange(start, stop, dtype=np.int64)
                else:
                    queries, exclude = self._encode_queries(X[start:stop]), None
                parts.append(self._index.radius(queries, threshold, allowed=allowed,
                                                exclude=exclude, n_threads=n_threads))
        return parts
