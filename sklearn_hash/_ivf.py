"""IVFQuantizedNeighbors: non-exhaustive search over an inverted file of PQ codes.

The path of the data, from ``fit`` to ``kneighbors`` (IVFADC, Jégou, Douze
and Schmid 2011, section IV):

1. ``fit(X, y)`` learns ``n_lists`` coarse centroids by k-means, assigns
   every item to its nearest one (its inverted list), fits a clone of the
   product quantizer on the residuals ``x - centroid`` and stores the
   residual codes grouped by list (``codes_``, ``ids_``, ``list_offsets_``).
   in the back-end :class:`~sklearn_hash._backends.InvertedLists`, whose
   lists grow by chunks (adding never re-sorts what is indexed).
2. ``kneighbors(X)`` (in :class:`~sklearn_hash._index.IndexMixin`, with
   ``allowed`` and removals folded into one mask) runs ``_search``: each
   query picks its ``n_probe`` nearest lists holding enough searchable
   items (``_probes``), gets one ADC table per probed list for its residual
   to that list's centroid, and the back-end's kernel scans only those
   lists.
   ``radius_neighbors`` runs ``_radius``: the same probes and tables, and
   the back-end's range kernel (``ivf_adc_radius``) keeps the items of
   those lists within the radius.

With ``coarse="multi-index"`` (the inverted multi-index, Babenko and
Lempitsky 2012) the coarse quantizer is two codebooks of K codewords, one
per half of the vector, and the cells are the K x K pairs: ``fit`` learns
each half's codebook by k-means, an item's cell pairs its halves' nearest
codewords, and ``_probes`` walks the cells in increasing distance with the
multi-sequence algorithm (``_kernels/_imi.pyx``), visiting ``n_probe``
non-empty ones.

With 4-bit residual codes (16 codewords per subspace) the back-end also
keeps each cell's codes in the fast-scan block layout and scans the probed
cells by fast-scan (``ivf_fastscan_kneighbors``: 8-bit tables as a proven
filter, float re-scoring), with the float tables' answers.
"""

from math import isqrt
from numbers import Integral, Real

import numpy as np
from sklearn import config_context
from sklearn.base import BaseEstimator, _fit_context, clone
from sklearn.utils import check_array, check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_consistent_length, validate_data

from ._backends import InvertedLists, fastscan_simd_path
from ._index import ENCODE_CHUNK, IndexMixin
from ._kernels._imi import multi_sequence
from ._kernels._nearest import (
    codeword_scores,
    nearest_codewords,
    pack_codewords,
    pack_subspace_codewords,
    smallest_per_row,
    subspace_scores,
)
from ._kmeans import kmeans, training_rows
from ._opq import OPQ
from ._pq import ProductQuantizer, subspace_sizes
from ._threads import effective_n_threads

# Bytes of query tables (float64 inner products) built at a time when searching.
_TABLE_BYTES = 1 << 25
# Largest per-cell tables kept from fit; beyond, each query chunk builds those it visits.
_MAX_CELL_TABLE_BYTES = 1 << 28


class IVFQuantizedNeighbors(IndexMixin, BaseEstimator):
    """Non-exhaustive search: an inverted file of residual product-quantization codes.

    ``fit`` partitions the database into ``n_lists`` cells by k-means (the
    coarse quantizer) and product-quantizes each item's residual to its
    cell's centroid. A query visits only the ``n_probe`` cells whose
    centroids are nearest, and ranks their items by asymmetric distance
    (ADC) to its own residual. The squared distance to centroid c plus
    residual codeword p splits as ``||x - c||^2 + (||p||^2 + 2 <c, p>)
    - 2 <x, p>``: the middle term is tabulated per cell at ``fit``, the last
    once per query, so each probed cell costs ``n_subspaces * K`` additions
    to build its table and ``n_subspaces`` lookups per item. Per query that
    is about ``n_lists * n_features + K * n_features + n_probe *
    (n_subspaces * K + n_samples_fit / n_lists * n_subspaces)`` operations
    instead of ``n_samples_fit * n_subspaces`` for
    :class:`QuantizedNeighbors`. This is IVFADC (Jégou et al., 2011),
    faiss's ``IndexIVFPQ`` with precomputed tables; the per-cell tables
    take ``n_lists * n_subspaces * K`` floats (2 MiB for the defaults) and
    are kept up to 256 MiB; beyond, each chunk of queries builds the tables
    of the cells it visits. Raising ``n_probe``
    trades speed for recall; with ``n_probe = n_lists`` every item is ranked.

    With ``coarse="multi-index"`` the cells are the ``K * K`` pairs of two
    codebooks of ``K = sqrt(n_lists)`` codewords, each quantizing one half
    of the vector (the inverted multi-index [2]_): many more cells for the
    same training and probing cost (``2 K`` centroids to train and compare
    a query with, instead of ``K * K``), so the probed cells are smaller and
    more precise. A query visits its ``n_probe`` nearest *non-empty* cells,
    in increasing coarse distance, found by the multi-sequence algorithm.
    The halves meet at a border of the residual quantizer's subspaces, so
    each cell's table term joins one of ``2 K`` precomputed half terms (with
    :class:`OPQ`, whose rotation mixes the halves, the tables of the visited
    cells are built per query chunk instead, which is slower).

    The interface is that of :class:`QuantizedNeighbors`: ``kneighbors``,
    ``kneighbors_graph``, ``radius_neighbors`` (over the probed cells),
    ``radius_neighbors_graph``, ``score`` (mAP@R with ``R = n_neighbors``), ``add``
    / ``partial_fit`` to grow the index without refitting, and ``save`` /
    ``load`` to a directory whose arrays are memory-mapped.

    Read more in the :ref:`User Guide <ivf>`.

    Parameters
    ----------
    quantizer : ProductQuantizer or OPQ, default=None
        Unfitted quantizer of the residuals; cloned in ``fit``. ``None``
        means ``ProductQuantizer()`` (64 bits). With :class:`OPQ` the
        rotation is learned on the residuals; the cells' and queries' table
        terms are computed in the rotated space.
    n_lists : int, default=256
        Number of cells. A common choice for ``coarse="flat"`` is about
        ``sqrt(n_samples_fit)`` to ``4 * sqrt(n_samples_fit)``; for
        ``"multi-index"`` it must be a perfect square ``K * K``, commonly
        ``K = 2**10`` to ``2**14`` for tens to hundreds of millions of items.
    coarse : {"flat", "multi-index"}, default="flat"
        The coarse quantizer: ``"flat"``, one k-means codebook of ``n_lists``
        centroids (IVFADC); ``"multi-index"``, two codebooks of
        ``sqrt(n_lists)`` codewords over the two halves of the vector, whose
        pairs are the cells (the inverted multi-index).
    n_probe : int, default=8
        Cells visited per query (``kneighbors(..., n_probe=...)`` changes it
        for one call); with ``coarse="multi-index"``, non-empty cells. When they hold fewer than ``n_neighbors`` searchable
        items (live, and allowed by ``allowed=``), the next nearest cells are
        visited too, so ``kneighbors`` always returns ``n_neighbors`` items.
    n_neighbors : int, default=10
        Neighbours returned by :meth:`kneighbors`, and ``R`` of :meth:`score`.
    radius : float, default=1.0
        Range of :meth:`radius_neighbors` (L2), which returns the items of
        the ``n_probe`` nearest cells within it.
    n_iter : int, default=25
        Lloyd iterations of the coarse k-means (of each half's, for the
        multi-index).
    max_train_samples : int, default=None
        Rows the coarse k-means trains on (a random subsample); ``None`` means
        ``256`` per centroid (``256 * n_lists``, or ``256 * sqrt(n_lists)``
        for the multi-index), as faiss. The residual quantizer learns from the
        residuals of as many rows as its own ``max_train_samples`` takes (the
        coarse subsample's rows when they are as many, else its own draw).
    refine_factor : int, default=None
        Re-ranking, as in :class:`QuantizedNeighbors`: with an int r the
        index keeps the vectors (as ``refine_storage`` says; memory-mapped
        after :meth:`load`) and re-orders the ``r * n_neighbors`` best
        candidates of the probed cells by their L2 distance to them (exact
        with float32 rows). Per call: ``kneighbors(..., refine_factor=...)``.
        :meth:`radius_neighbors` takes from the probed cells the items whose
        estimated squared distance is at most ``r * radius ** 2`` and keeps
        those within ``radius`` of their rows.
    refine_storage : {"float32", "sq8"}, default="float32"
        How the re-ranking vectors are kept (with ``refine_factor``).
        ``"float32"``: as they are (4 bytes per feature), distances exact.
        ``"sq8"``: a byte per feature, a quarter of the memory; with
        ``coarse="flat"``, of each vector's residual to its cell centroid,
        followed by the cell's int32 id (``n_features + 4`` bytes); with
        the multi-index, of the vector itself (``n_features`` bytes). Each
        feature's 255 steps span the 0.01%-99.99% quantiles of the coarse
        quantizer's training rows (residuals, or vectors with the
        multi-index): ``refine_offset_``, ``refine_scale_``; values beyond
        are clipped, rows added later included. The distances returned
        are those to the decoded vectors; the items querying themselves
        (``X=None``) use their decoded vectors too. On
        ``benchmarks/bench_frontier.py``'s 1M x 128 it costs about 0.01 of
        recall@10 against float32 at the same ``n_probe`` and
        ``refine_factor``.
    random_state : int, RandomState instance or None, default=None
        Seeds the subsample and the coarse k-means initialisation.
    verbose : int, default=0
        When positive, ``fit`` prints the coarse k-means progress, and
        ``fit`` and ``add`` print how many rows are indexed, a chunk of
        65,536 at a time (the residual quantizer has its own ``verbose``).
    n_jobs : int, default=None
        OpenMP threads of the kernels. ``None`` uses the OpenMP default (all
        cores, or ``OMP_NUM_THREADS``); ``-1`` all cores, ``-2`` all but one.
        Results do not depend on it.

    Attributes
    ----------
    coarse_centers_ : ndarray of shape (n_lists, n_features)
        The cell centroids (``coarse="flat"`` only).
    coarse_codebooks_ : ndarray of shape (2, sqrt(n_lists), n_half)
        The multi-index's codebooks (``coarse="multi-index"`` only): row 0
        quantizes features ``:coarse_split_``, row 1 the rest (zero-padded to
        the wider half). Cell ``i * sqrt(n_lists) + j`` joins codeword i of
        the first half and j of the second.
    coarse_split_ : int
        The first feature of the second half (``coarse="multi-index"``
        only): a border of the residual quantizer's subspaces.
    quantizer_ : ProductQuantizer
        The fitted clone of ``quantizer``, trained on residuals.
    codes_ : ndarray of shape (n_samples_fit, n_subspaces)
        Residual codes, grouped by cell: cell l holds the rows
        ``list_offsets_[l]:list_offsets_[l + 1]``. Built on access from the
        cells' lists, which the index keeps separately so that they grow
        without a global re-sort.
    ids_ : ndarray of shape (n_samples_fit,), dtype=int64
        Database index of each row of ``codes_`` (ascending within a cell).
    list_offsets_ : ndarray of shape (n_lists + 1,), dtype=int64
        Where each cell starts in ``codes_``.
    refine_storage_ : {"float32", "sq8"} or None
        How the index keeps the rows it re-ranks by: ``refine_storage`` if
        it was fitted with ``refine_factor``, else ``None`` (no rows, and
        ``kneighbors(..., refine_factor=r)`` is refused). Parameters set
        after ``fit`` do not change it.
    refine_offset_, refine_scale_ : ndarray of shape (n_features,)
        With ``refine_storage="sq8"`` (and ``refine_factor``): feature j of a
        stored row decodes as ``refine_scale_[j] * byte + refine_offset_[j]``
        (plus the cell's centroid with ``coarse="flat"``).
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
    QuantizedNeighbors : Exhaustive search over the codes.
    ProductQuantizer : The quantizer of the residuals.

    Notes
    -----
    With 4-bit residual codes (``ProductQuantizer(n_bits, subspace_bits=4)``
    or ``OPQ(..., subspace_bits=4)``: 16 codewords per subspace) each
    probed cell is searched by fast-scan where the processor has byte
    shuffles (AVX2 or AVX-512BW): the cell's codes are also kept in the
    fast-scan block layout (half a byte per codeword index, rebuilt on
    :meth:`load`, never saved), the probe's table is quantized to 8 bits
    with the query's current k-th distance as its bound, and the codes that
    pass the filter are re-scored with the float table. The answers are
    those of the float tables, bit for bit (the filter is a proven lower
    bound); only the speed differs. Cells of fewer than 96 codes (in one
    ``add`` batch, or one run of merged batches) are scored with float
    lookups, which is faster for them.

    Distances estimate the squared distance from the query to each item's
    reconstruction (centroid plus decoded residual), as float32 sums of
    table entries in subspace order; items at equal distance are ranked by
    ascending database index. With ``X=None`` (database items as queries)
    only the codes are at hand, so each item queries with its
    reconstruction (centroid plus decoded residual) and never finds itself.

    References
    ----------
    .. [1] H. Jégou, M. Douze and C. Schmid, "Product Quantization for
       Nearest Neighbor Search", IEEE TPAMI 33(1), 2011.
    .. [2] A. Babenko and V. Lempitsky, "The Inverted Multi-Index", CVPR
       2012.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from sklearn_hash import IVFQuantizedNeighbors, ProductQuantizer
    >>> X, y = load_digits(return_X_y=True)
    >>> search = IVFQuantizedNeighbors(ProductQuantizer(n_bits=32, random_state=0),
    ...                                n_lists=16, n_probe=4, random_state=0)
    >>> search.fit(X[:1500], y[:1500]).list_offsets_.shape
    (17,)
    >>> distances, indices = search.kneighbors(X[1500:1502], n_neighbors=5)
    >>> indices.shape, distances.dtype
    ((2, 5), dtype('float64'))
    >>> round(search.score(X[1500:], y[1500:]), 1) >= 0.8
    True
    >>> ball_distances, ball = search.radius_neighbors(X[1500:1502], radius=distances[0, -1])
    >>> len(ball[0]) >= 5, bool(ball_distances[0].max() <= distances[0, -1])
    (True, True)
    >>> multi = IVFQuantizedNeighbors(ProductQuantizer(n_bits=32, random_state=0),
    ...                               coarse="multi-index", n_lists=64, n_probe=8,
    ...                               random_state=0).fit(X[:1500], y[:1500])
    >>> multi.coarse_codebooks_.shape
    (2, 8, 32)
    >>> round(multi.score(X[1500:], y[1500:]), 1) >= 0.8
    True
    """

    _TRANSIENT = (*IndexMixin._TRANSIENT, "_list_tables", "_packed_cache")
    _SEARCH_PARAMS = {**IndexMixin._SEARCH_PARAMS,
                      "n_probe": [Interval(Integral, 1, None, closed="left")]}

    _parameter_constraints: dict = {
        "quantizer": [ProductQuantizer, OPQ, None],
        "n_lists": [Interval(Integral, 1, None, closed="left")],
        "coarse": [StrOptions({"flat", "multi-index"})],
        "n_probe": [Interval(Integral, 1, None, closed="left")],
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "radius": [Interval(Real, 0, None, closed="left")],
        "n_iter": [Interval(Integral, 1, None, closed="left")],
        "max_train_samples": [Interval(Integral, 1, None, closed="left"), None],
        "refine_factor": [Interval(Integral, 1, None, closed="left"), None],
        "refine_storage": [StrOptions({"float32", "sq8"})],
        "random_state": ["random_state"],
        "n_jobs": [Integral, None],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        quantizer=None,
        *,
        n_lists=256,
        coarse="flat",
        n_probe=8,
        n_neighbors=10,
        radius=1.0,
        n_iter=25,
        max_train_samples=None,
        refine_factor=None,
        refine_storage="float32",
        random_state=None,
        n_jobs=None,
        verbose=0,
    ):
        self.quantizer = quantizer
        self.n_lists = n_lists
        self.coarse = coarse
        self.n_probe = n_probe
        self.n_neighbors = n_neighbors
        self.radius = radius
        self.n_iter = n_iter
        self.max_train_samples = max_train_samples
        self.random_state = random_state
        self.refine_factor = refine_factor
        self.refine_storage = refine_storage
        self.n_jobs = n_jobs
        self.verbose = verbose

    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y=None):
        """Learn the cells and the residual quantizer, and index X.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Database vectors.
        y : array-like of shape (n_samples,) or (n_samples, n_labels), default=None
            Database labels, kept for :meth:`score`.

        Returns
        -------
        self : IVFQuantizedNeighbors
            The fitted searcher.
        """
        n_threads = effective_n_threads(self.n_jobs)
        X = validate_data(self, X, dtype=[np.float64, np.float32], order="C", ensure_min_samples=2)
        if y is not None:
            y = check_array(y, ensure_2d=False, dtype=None, input_name="y")
            check_consistent_length(X, y)
        n_samples, n_features = X.shape
        quantizer = self.quantizer if self.quantizer is not None else ProductQuantizer()
        rng = check_random_state(self.random_state)
        for stale in ("coarse_centers_", "coarse_codebooks_", "coarse_split_"):
            self.__dict__.pop(stale, None)  # a refit may change the kind of coarse quantizer
        if self.coarse == "flat":
            n_centroids = self.n_lists
            if n_centroids > n_samples:
                raise ValueError(
                    f"n_lists={self.n_lists} cells need at least as many rows; got "
                    f"n_samples={n_samples}. Use fewer lists."
                )
            X_train = training_rows(X, self.max_train_samples, n_centroids, rng)
            start = X_train[np.sort(rng.choice(X_train.shape[0], n_centroids, replace=False))]
            self.coarse_centers_, _ = kmeans(X_train, start, self.n_iter, n_threads,
                                             verbose=self.verbose, label="coarse k-means")
        else:
            n_centroids = isqrt(self.n_lists)
            if n_centroids * n_centroids != self.n_lists:
                raise ValueError(
                    f"coarse='multi-index' needs n_lists to be a perfect square K * K (K "
                    f"codewords for each half of the vector); got n_lists={self.n_lists}. "
                    f"Use e.g. n_lists={max(n_centroids, 1) ** 2} or "
                    f"{(n_centroids + 1) ** 2}."
                )
            if n_features < 2:
                raise ValueError("coarse='multi-index' splits the vector in two halves: it "
                                 f"needs at least 2 features; got n_features={n_features}.")
            if n_centroids > n_samples:
                raise ValueError(
                    f"coarse='multi-index' with n_lists={self.n_lists} learns "
                    f"{n_centroids} codewords per half and needs at least as many rows; got "
                    f"n_samples={n_samples}. Use fewer lists."
                )
            X_train = training_rows(X, self.max_train_samples, n_centroids, rng)
            self.coarse_split_ = _halves_split(quantizer, n_features)
            halves = (slice(0, self.coarse_split_), slice(self.coarse_split_, n_features))
            width = max(self.coarse_split_, n_features - self.coarse_split_)
            self.coarse_codebooks_ = np.zeros((2, n_centroids, width), dtype=X.dtype)
            for h, half in enumerate(halves):
                X_half = np.ascontiguousarray(X_train[:, half])
                start = X_half[np.sort(rng.choice(X_half.shape[0], n_centroids, replace=False))]
                centers, _ = kmeans(X_half, start, self.n_iter, n_threads, verbose=self.verbose,
                                    label=f"coarse k-means, half {h + 1}")
                self.coarse_codebooks_[h, :, : centers.shape[1]] = centers

        with config_context(transform_output="default"):
            residuals = self._residuals(X_train, n_threads)[0]
            # The residual quantizer takes the rows it would take from X (its own
            # max_train_samples): the coarse subsample when that holds as many,
            # else its own draw (few cells and large codebooks).
            wanted = min(n_samples, getattr(quantizer, "max_train_samples", None)
                         or 256 * 2 ** getattr(quantizer, "subspace_bits", 8))
            own = (residuals if X_train.shape[0] >= wanted else
                   self._residuals(training_rows(X, wanted, 1, rng), n_threads)[0])
            self.quantizer_ = clone(quantizer).fit(own)
            self._fit_rerank(X_train if self._multi_index() else residuals)
            self._after_load()
            self._start_index(y)
            self._append(X, y)
        return self

    def _new_index(self):
        n_codewords = self.quantizer_.n_codewords_
        # 4-bit codes: each probed cell filtered by fast-scan, the same answers
        # (where the processor has byte shuffles; the portable C filter is
        # slower than float lookups).
        fast_scan = n_codewords == 16 and fastscan_simd_path() != "portable"
        return InvertedLists(self._n_cells(), self.quantizer_.n_subspaces_, n_codewords,
                             fast_scan=fast_scan)

    # ------------------------------------------------------------ coarse quantizer

    def _multi_index(self):
        """Whether the fitted coarse quantizer is the multi-index (whatever ``coarse`` says
        since: parameters set after ``fit`` do not change the fitted index)."""
        return "coarse_codebooks_" in self.__dict__

    def _n_cells(self):
        """The fitted number of cells (``n_lists`` at ``fit``)."""
        if self._multi_index():
            return self.coarse_codebooks_.shape[1] ** 2
        return self.coarse_centers_.shape[0]

    def _halves(self):
        """The multi-index's two codebooks (unpadded) and the features they cover."""
        split, n_features = self.coarse_split_, self.n_features_in_
        return ((self.coarse_codebooks_[0, :, :split], slice(0, split)),
                (self.coarse_codebooks_[1, :, : n_features - split], slice(split, n_features)))

    def _centroids(self, cells):
        """The centroids of the given cells: (len(cells), n_features)."""
        if not self._multi_index():
            return self.coarse_centers_[cells]
        (first, _), (second, _) = self._halves()
        n_codewords = first.shape[0]
        return np.hstack([first[cells // n_codewords], second[cells % n_codewords]])

    def _split_subspace(self):
        """The residual subspace where the multi-index's second half starts, or None.

        When the residual quantizer's subspaces split at the halves' border
        (and no rotation mixes them), a cell's table term is the first
        half's term for the subspaces before it plus the second half's after
        it: 2 K tables serve the K * K cells.
        """
        pq = self.quantizer_
        if not self._multi_index() or hasattr(pq, "rotation_"):
            return None
        at = np.flatnonzero(pq.subspace_bounds_ == self.coarse_split_)
        return int(at[0]) if at.size else None

    def _after_load(self):
        """Rebuild the per-cell tables (a cache, not saved)."""
        self._packed_cache = {}
        pq = self.quantizer_
        n_threads = effective_n_threads(self.n_jobs)
        split = self._split_subspace()
        if split is not None:  # the multi-index: one table per codeword of each half
            (first, _), (second, cover) = self._halves()
            n_codewords = first.shape[0]
            padded = np.zeros((2 * n_codewords, self.n_features_in_), dtype=first.dtype)
            padded[:n_codewords, : self.coarse_split_] = first
            padded[n_codewords:, cover] = second
            tables = self._table_terms(padded, n_threads)
            tables[:n_codewords, split:] = 0
            tables[n_codewords:, :split] = 0
            self._list_tables = tables
            return
        n_cells = self._n_cells()
        table_bytes = 4 * n_cells * pq.n_subspaces_ * pq.n_codewords_
        self._list_tables = (
            self._cell_tables(np.arange(n_cells), n_threads)
            if table_bytes <= _MAX_CELL_TABLE_BYTES else None
        )

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_packed_cache", None)  # rebuilt on the first search
        return state

    def _check_new_items(self, X, y):
        """Also refuse items whose residual to a centroid would overflow X's dtype.

        The codes are of the residuals ``x - c``, which the quantizer refuses
        when their squares overflow: checked here, before anything is
        appended, so that a refused ``add`` changes nothing. A bound first
        (the largest row norm plus the largest centroid norm); the residuals
        themselves only when the bound is too large.
        """
        X, y = super()._check_new_items(X, y)
        cache = self.__dict__.setdefault("_packed_cache", {})
        centroid = cache.get("largest centroid norm")
        if centroid is None:  # once per fit or load (adds of a few items are frequent)
            if self._multi_index():
                halves = [codebook for codebook, _ in self._halves()]
                centroid = np.sqrt(sum(np.einsum("ij,ij->i", h, h, dtype=np.float64).max()
                                       for h in halves))
            else:
                c = self.coarse_centers_
                centroid = np.sqrt(np.einsum("ij,ij->i", c, c, dtype=np.float64).max())
            cache["largest centroid norm"] = centroid
        row = np.sqrt(np.einsum("ij,ij->i", X, X, dtype=np.float64).max()) if len(X) else 0
        if (row + centroid) ** 2 < 0.5 * np.finfo(X.dtype).max:
            return X, y
        n_threads = effective_n_threads(self.n_jobs)
        for start in range(0, len(X), ENCODE_CHUNK):
            with np.errstate(over="ignore"):
                residuals = self._residuals(X[start : start + ENCODE_CHUNK], n_threads)[0]
                if hasattr(self.quantizer_, "rotation_"):  # OPQ encodes them rotated
                    residuals = residuals @ self.quantizer_.rotation_.astype(X.dtype, copy=False)
                squares = np.einsum("ij,ij->i", residuals, residuals)
            bad = np.flatnonzero(~np.isfinite(squares))
            if bad.size:
                raise ValueError(
                    f"X holds values too large for {X.dtype} distances: the residual of row "
                    f"{start + int(bad[0])} to its cell's centroid overflows (its largest "
                    f"magnitude is {np.abs(residuals[bad[0]]).max():.3g}). Scale the data "
                    f"down.")
        return X, y

    def _append(self, X, y):
        first = self.n_samples_fit_
        with config_context(transform_output="default"):
            super()._append(X, y)
        self._index.merge_since(first)  # the chunks of one batch: one run

    def _index_items(self, X):
        """Residual codes of the rows of X, appended to their cells' lists; the cells."""
        residuals, lists = self._residuals(X, effective_n_threads(self.n_jobs))
        self._index.add(self.quantizer_.transform(residuals), lists)
        return lists

    def _rerank_centroids(self):
        return None if self._multi_index() else self.coarse_centers_

    @property
    def codes_(self):
        return self._index.grouped()[0]

    @property
    def ids_(self):
        return self._index.grouped()[1]

    @property
    def list_offsets_(self):
        return np.concatenate([[0], np.cumsum(self._index.sizes)]).astype(np.int64)

    def _cell_tables(self, cells, n_threads=1):
        """The cells' terms of a probe's table, ``||p||^2 + 2 <centroid, p>``: (n_cells, M, K) float32."""
        return self._table_terms(self._centroids(cells), n_threads)

    def _table_terms(self, centroids, n_threads):
        codewords = self.quantizer_.cluster_centers_.astype(np.float64)
        return ((codewords**2).sum(axis=2)[None]
                + 2 * self._inner_products(centroids.astype(np.float64), n_threads)
                ).astype(np.float32)

    def _packed(self, name, dtype):
        """Codewords packed for ``codeword_scores`` in dtype (a cache: built once per fit/load).

        ``name``: ``"coarse"`` (the flat file's centroids, with their halved
        squared norms), ``("half", h)`` (a multi-index codebook, likewise) or
        ``"subspaces"`` (the residual quantizer's codebooks, for
        ``subspace_scores``). Packing costs about what scoring one query
        does, so a searcher answering one query at a time would pay it on
        every call.
        """
        cache = self.__dict__.setdefault("_packed_cache", {})
        key = (name, np.dtype(dtype).str)
        if key not in cache:
            if name == "subspaces":
                cache[key] = pack_subspace_codewords(self.quantizer_.cluster_centers_, dtype)
                return cache[key]
            centers = self.coarse_centers_ if name == "coarse" else self._halves()[name[1]][0]
            centers = np.asarray(centers, dtype=dtype)
            norms = -0.5 * np.einsum("ij,ij->i", centers, centers)
            cache[key] = (pack_codewords(centers, dtype), norms)
        return cache[key]

    def _inner_products(self, X, n_threads):
        """``<x_m, p_mk>`` for each row x, subspace m and codeword k: shape (n, M, K).

        In X's precision, by the codeword kernel rather than BLAS: each row is
        computed on its own, so a query gets the same answer whichever
        queries it is searched with (BLAS rounds differently with the shape
        of the product).
        """
        pq = self.quantizer_
        if hasattr(pq, "rotation_"):  # OPQ: codewords live in the rotated space
            X = np.ascontiguousarray(X @ pq.rotation_.astype(X.dtype, copy=False))
        return subspace_scores(X, self._packed("subspaces", X.dtype), pq.subspace_bounds_,
                               n_threads=n_threads)

    def _residuals(self, X, n_threads):
        """Each row minus its nearest coarse centroid, and that centroid's cell."""
        if not self._multi_index():
            lists, _ = nearest_codewords(X, self.coarse_centers_.astype(X.dtype, copy=False),
                                         n_threads=n_threads)
            return X - self.coarse_centers_[lists], lists
        (first, lo), (second, hi) = self._halves()
        i, _ = nearest_codewords(np.ascontiguousarray(X[:, lo]),
                                 first.astype(X.dtype, copy=False), n_threads=n_threads)
        j, _ = nearest_codewords(np.ascontiguousarray(X[:, hi]),
                                 second.astype(X.dtype, copy=False), n_threads=n_threads)
        lists = i.astype(np.int64) * first.shape[0] + j
        return X - np.hstack([first[i], second[j]]), lists

    def _squared_distances(self, X, name, n_threads):
        """``||x - c||^2`` for every row and center of ``_packed(name)``, in X's precision."""
        packed, half_norms = self._packed(name, X.dtype)
        # ||x - c||^2 = ||x||^2 - 2 (x.c - ||c||^2 / 2).
        d2 = codeword_scores(X, packed, half_norms, n_threads=n_threads)
        d2 *= -2
        d2 += np.einsum("ij,ij->i", X, X)[:, None]
        return d2

    def _probes(self, X, n_probe, sizes, n_required, n_threads):
        """The cells each query visits, nearest first, holding at least n_required items.

        ``sizes`` counts the searchable items of each cell. Returns
        ``probes`` of shape (n_queries, width), their squared distances to
        the query (float32, same shape) and ``n_visit`` of shape
        (n_queries,): query q visits ``probes[q, :n_visit[q]]``.
        """
        if self._multi_index():
            return self._multi_sequence(X, n_probe, sizes, n_required, n_threads)
        d2 = self._squared_distances(X, "coarse", n_threads)
        n_lists = d2.shape[1]
        n_probe = min(n_probe, n_lists)
        # Nearest first; equal distances by cell number.
        probes, coarse = smallest_per_row(d2, n_probe, n_threads=n_threads, return_values=True)
        n_visit = np.full(len(X), n_probe, dtype=np.int64)

        short = np.flatnonzero(sizes[probes].sum(axis=1) < n_required)
        if short.size:
            # Too few items in the probed cells: visit the next nearest too.
            full, near = smallest_per_row(d2[short], n_lists, n_threads=n_threads,
                                          return_values=True)
            needed = (np.cumsum(sizes[full], axis=1) < n_required).sum(axis=1) + 1
            width = max(n_probe, int(needed.max()))
            pad = ((0, 0), (0, width - n_probe))
            probes, coarse = np.pad(probes, pad), np.pad(coarse, pad)
            probes[short, :width] = full[:, :width]
            coarse[short, :width] = near[:, :width]
            n_visit[short] = needed
        coarse = coarse.astype(np.float32, copy=False)
        np.maximum(coarse, 0, out=coarse)
        return probes, coarse, n_visit

    def _multi_sequence(self, X, n_probe, sizes, n_required, n_threads):
        """``_probes`` of the multi-index: non-empty cells in increasing coarse distance.

        Each half of the query is ranked against its codebook; the
        multi-sequence algorithm then walks the K x K cells in increasing
        sum of the two distances (ties by cell number), passing over cells
        without searchable items, until ``n_probe`` cells holding at least
        ``n_required`` items are found.
        """
        ranked = []
        for h, (_, half) in enumerate(self._halves()):
            d2 = self._squared_distances(np.ascontiguousarray(X[:, half]), ("half", h),
                                         n_threads)
            d2 = np.maximum(d2, 0, dtype=np.float64)
            order = np.argsort(d2, axis=1, kind="stable")  # equal distances by number
            ranked += [order.astype(np.int64), np.take_along_axis(d2, order, axis=1)]
        n_cells = self._n_cells()
        width = min(max(n_probe, 1), n_cells)
        probes, coarse, n_visit = multi_sequence(*ranked, sizes, n_probe, n_required, width,
                                                 n_threads=n_threads)
        while (n_visit < 0).any():  # some queries need more cells than the output holds
            redo = np.flatnonzero(n_visit < 0)
            width = min(4 * width, n_cells)
            more = multi_sequence(*(r[redo] for r in ranked), sizes, n_probe, n_required,
                                  width, n_threads=n_threads)
            pad = ((0, 0), (0, width - probes.shape[1]))
            probes, coarse = np.pad(probes, pad, constant_values=-1), np.pad(coarse, pad)
            probes[redo], coarse[redo], n_visit[redo] = more
        probes[probes < 0] = 0  # columns past n_visit are never read
        return probes, coarse.astype(np.float32), n_visit

    def _reconstruct(self, indices):
        """Items as the index holds them: centroid + decoded residual."""
        codes, lists = self._index.rows(indices)
        return self._centroids(lists) + self.quantizer_.inverse_transform(codes)

    def _searchable_sizes(self, allowed):
        """Searchable items per cell for the search's mask."""
        index = self._index
        if allowed is None:
            return index.sizes
        if self._live is not None and self._live.is_view(allowed):  # removals, no filter
            return index.live_sizes
        return np.bincount(index.list_of.array[allowed.view(bool)],
                           minlength=self._n_cells()).astype(np.int64)

    def _search(self, X, n_neighbors, allowed, params):
        """Run the back-end for the queries X (None: the database, leaving each item out)."""
        n_threads = effective_n_threads(self.n_jobs)
        n_queries = self.n_samples_fit_ if X is None else X.shape[0]
        n_required = n_neighbors + 1 if X is None else n_neighbors
        sizes = self._searchable_sizes(allowed)
        distances = np.empty((n_queries, n_neighbors), dtype=np.float64)
        indices = np.empty((n_queries, n_neighbors), dtype=np.int64)
        for begin, end, queries, own in self._query_chunks(X):
            probes, coarse, n_visit = self._probes(queries, params["n_probe"], sizes,
                                                   n_required, n_threads)
            cell_tables, query_tables, rows, second, split = self._tables(queries, probes,
                                                                          coarse, n_threads)
            d, indices[begin:end] = self._index.search(
                cell_tables, query_tables, coarse, probes, rows, n_visit, n_neighbors,
                allowed=allowed, exclude=own, n_threads=n_threads,
                second_rows=second, split=split,
            )
            # Ranked by the squared estimate; returned in L2 units.
            distances[begin:end] = np.sqrt(np.maximum(d, 0, dtype=np.float64))
        return distances, indices

    def _query_chunks(self, X):
        """Queries a chunk at a time: (begin, end, the queries, the item each leaves out)."""
        n_queries = self.n_samples_fit_ if X is None else X.shape[0]
        # Per query: its tables (float64 while built) and its distances to the centroids.
        n_centroids = (2 * self.coarse_codebooks_.shape[1] if self._multi_index()
                       else self._n_cells())
        per_query = 8 * max(self.quantizer_.n_codewords_ * self.quantizer_.n_subspaces_,
                            n_centroids)
        chunk = max(1, _TABLE_BYTES // per_query)
        for begin in range(0, n_queries, chunk):
            end = min(begin + chunk, n_queries)
            if X is None:
                own = np.arange(begin, end, dtype=np.int64)
                yield begin, end, self._reconstruct(own), own
            else:
                yield begin, end, X[begin:end], np.full(end - begin, -1, dtype=np.int64)

    def _tables(self, queries, probes, coarse, n_threads):
        """What the kernels read for the probes: (list tables, query tables, their rows, the
        multi-index's second rows, split), after checking that the queries' distances
        (``coarse``, and the tables) fit in float32."""
        split = self._split_subspace()
        query_tables = self._inner_products(queries, n_threads)
        query_tables *= -2
        query_tables = query_tables.astype(np.float32, copy=False)
        if not (np.isfinite(coarse).all() and np.isfinite(query_tables).all()):
            raise ValueError(
                f"the distances of the queries to the index overflow float32: the "
                f"queries' values (largest magnitude {np.abs(queries).max():.3g}) or the "
                f"indexed ones are too large. Scale the data down.")
        second = None
        if split is not None:  # multi-index: the halves' tables, joined by the kernel
            n_codewords = self.coarse_codebooks_.shape[1]
            cell_tables, rows = self._list_tables, probes // n_codewords
            second = probes % n_codewords + n_codewords
        elif self._list_tables is not None:
            cell_tables, rows = self._list_tables, probes
        else:  # too many cells to keep all their tables: build those visited
            cells, rows = np.unique(probes, return_inverse=True)
            cell_tables = self._cell_tables(cells, n_threads)
            rows = np.ascontiguousarray(rows.reshape(probes.shape), dtype=np.int64)
        return cell_tables, query_tables, rows, second, split or 0

    def _radius(self, X, threshold, allowed, params):
        """The items of each query's ``n_probe`` nearest cells whose estimate is in range."""
        n_threads = effective_n_threads(self.n_jobs)
        sizes = self._searchable_sizes(allowed)
        parts = []
        for _, _, queries, own in self._query_chunks(X):
            probes, coarse, n_visit = self._probes(queries, params["n_probe"], sizes, 0,
                                                   n_threads)
            cell_tables, query_tables, rows, second, split = self._tables(queries, probes,
                                                                          coarse, n_threads)
            parts.append(self._index.radius(
                cell_tables, query_tables, coarse, probes, rows, n_visit, threshold,
                allowed=allowed, exclude=own, n_threads=n_threads, second_rows=second,
                split=split))
        return parts


def _halves_split(quantizer, n_features):
    """Where the multi-index's second half starts: a border of the residual subspaces.

    The residual quantizer cuts ``n_features`` into ``n_bits //
    subspace_bits`` blocks, the first ``n_features % n_subspaces`` one
    feature wider; the halves meet at the border after half the blocks, so
    that every subspace lies in one half (``n_features // 2`` when there is
    one block).
    """
    n_subspaces = quantizer.n_bits // quantizer.subspace_bits
    if n_subspaces < 2 or n_subspaces > n_features:
        return n_features // 2
    return int(subspace_sizes(n_features, n_subspaces)[: n_subspaces // 2].sum())
