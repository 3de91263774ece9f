"""What every searcher shares: growing, removing, filtered search, persistence.

A searcher subclasses :class:`IndexMixin` and provides:

- ``fit``, which sets the fitted state, calls ``_fit_rerank(rows)`` (what
  8-bit re-ranking rows learn from the training rows) and
  ``_start_index(y)``, then appends the rows;
- ``_new_index()``: an empty back-end (:mod:`sklearn_hash._backends`) for
  the fitted state;
- ``_index_items(X)``: encodes rows and appends them to the back-end,
  returning each row's cell (or ``None``) for the re-ranking rows
  (:mod:`sklearn_hash._rerank`);
- ``_search(X, n_neighbors, allowed, exclude_self, params)``: the queries
  turned into what the back-end reads, searched (``X=None``: the database
  items query the others);
- ``_radius(X, threshold, allowed, params)``: the back-end's range scan,
  as CSR parts (offsets, distances, indices) a chunk of queries each;
- ``_SEARCH_PARAMS``: keywords of ``kneighbors`` that change one search
  (e.g. ``n_probe``), with their validation.

Items get the indices ``0, 1, ...`` in the order they are indexed and keep
them: ``remove`` marks items as removed (never returned again) without
renumbering; ``compact`` reclaims their memory and renumbers, returning the
old-to-new mapping.
"""

import itertools
import numbers
from contextlib import nullcontext
from numbers import Integral

import numpy as np
from scipy import sparse
from sklearn.utils import check_array
from sklearn.utils._param_validation import Interval, validate_parameter_constraints
from sklearn.utils.validation import (
    check_consistent_length,
    check_is_fitted,
    validate_data,
)

from ._base import check_fitted, check_magnitude, validate_features
from ._rerank import FloatRows, SQ8Rows
from ._storage import ChunkedRows, GrowableArray
from ._threads import effective_n_threads, single_threaded_blas
from .metrics import map_at_r_score

# Rows encoded at a time when indexing, to bound the memory beyond the codes.
ENCODE_CHUNK = 65536


def fill_balls(neigh_dist, neigh_ind, first, offsets, distances, indices, sort_results):
    """Each query's ball (CSR) into the object arrays, from query ``first``; the next query.

    A ball comes in ascending index order, or by (distance, index) with
    ``sort_results``.
    """
    q = first
    for a, b in itertools.pairwise(offsets):
        d, i = distances[a:b], indices[a:b]
        if sort_results:
            order = np.lexsort((i, d))
            d, i = d[order], i[order]
        neigh_dist[q], neigh_ind[q] = d, i
        q += 1
    return q


def _check_graph_mode(mode):
    if mode not in ("connectivity", "distance"):
        raise ValueError(
            'Unsupported mode, must be one of "connectivity", '
            f'or "distance" but got "{mode}" instead'
        )


def kneighbors_graph_of(searcher, X, n_neighbors, mode, **kwargs):
    """``searcher.kneighbors`` as a CSR graph of shape (n_queries, n_samples_fit_).

    ``mode``: "connectivity" (ones) or "distance" (float64 distances);
    ``kwargs`` go to ``kneighbors``.
    """
    _check_graph_mode(mode)
    if mode == "connectivity":
        indices = searcher.kneighbors(X, n_neighbors, return_distance=False, **kwargs)
        data = np.ones(indices.size)
    else:
        distances, indices = searcher.kneighbors(X, n_neighbors, return_distance=True,
                                                 **kwargs)
        data = distances.ravel().astype(np.float64)
    n_queries, k = indices.shape
    indptr = np.arange(0, n_queries * k + 1, k)
    return sparse.csr_matrix(
        (data, indices.ravel(), indptr), shape=(n_queries, searcher.n_samples_fit_)
    )


def radius_neighbors_graph_of(searcher, X, radius, mode, sort_results, **kwargs):
    """``searcher.radius_neighbors`` as a CSR graph of shape (n_queries, n_samples_fit_)."""
    _check_graph_mode(mode)
    if mode == "connectivity":
        indices = searcher.radius_neighbors(X, radius, return_distance=False, **kwargs)
        data = None
    else:
        distances, indices = searcher.radius_neighbors(X, radius, return_distance=True,
                                                       sort_results=sort_results, **kwargs)
        data = (np.concatenate(list(distances)).astype(np.float64) if len(distances)
                else np.empty(0))
    counts = np.array([len(i) for i in indices], dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    flat = np.concatenate(list(indices)) if len(indices) else np.empty(0, np.int64)
    if data is None:
        data = np.ones(flat.size)
    return sparse.csr_matrix((data, flat, indptr),
                             shape=(len(indices), searcher.n_samples_fit_))


def removal_indices(indices, n):
    """The indices given to ``remove``, checked (1-D, integers, in [0, n), distinct): int64."""
    indices = np.asarray(indices)
    if indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu"):
        raise TypeError(f"indices must be a 1-D array of integer database indices; got "
                        f"{indices.ndim}-D {indices.dtype}.")
    if indices.size and (indices.min() < 0 or indices.max() >= n):  # before any cast
        bad = indices[(indices < 0) | (indices >= n)][0]
        raise ValueError(f"indices must be in [0, {n - 1}] (the index holds {n} items); "
                         f"got {bad}.")
    indices = indices.astype(np.int64)
    if np.unique(indices).size != indices.size:
        raise ValueError("indices must be distinct; got a repeated index.")
    return indices


def allowed_mask(allowed, n):
    """``allowed`` (a boolean mask of n items, or item indices) as a uint8 mask of n items.

    Raises a ValueError or TypeError saying what is allowed when it is neither.
    """
    allowed = np.asarray(allowed)
    if allowed.size == 0 and allowed.ndim == 1:  # [] is no index, whatever its dtype
        allowed = allowed.astype(np.int64)
    if allowed.dtype == bool:
        if allowed.shape != (n,):
            raise ValueError(f"allowed as a boolean mask must have shape ({n},) "
                             f"(n_samples_fit_); got shape {allowed.shape}.")
        return np.ascontiguousarray(allowed).view(np.uint8)
    if allowed.dtype.kind in "iu" and allowed.ndim == 1:
        if allowed.size and (allowed.min() < 0 or allowed.max() >= n):
            raise ValueError(f"allowed indices must be in [0, {n - 1}]; got values in "
                             f"[{allowed.min()}, {allowed.max()}].")
        if (allowed.size == n and allowed.max() <= 1
                and np.unique(allowed).size < n):
            raise ValueError(
                f"allowed holds {n} integers, all 0 or 1 and some repeated: a mask of "
                f"integers, which would be read as the indices 0 and 1. Pass a boolean "
                f"mask (allowed.astype(bool)) or the indices (np.flatnonzero(allowed)).")
        mask = np.zeros(n, dtype=np.uint8)
        mask[allowed] = 1
        return mask
    raise TypeError(f"allowed must be a boolean mask of shape ({n},) or a 1-D array "
                    f"of integer database indices; got {allowed.ndim}-D "
                    f"{allowed.dtype}.")


class IndexMixin:
    """Growth, removal, filtered kNN search, scoring and persistence of a fitted index."""

    # Attributes that hold storage or caches: never part of the saved state.
    _TRANSIENT = ("_index", "_labels", "_vectors", "_live", "_n_removed", "_saved",
                  "_fit_y_cache", "_rerank_cache")
    # Per-call search settings accepted by kneighbors: name -> constraints.
    _SEARCH_PARAMS: dict = {"refine_factor": [Interval(Integral, 1, None, closed="left")]}

    # ------------------------------------------------------------------ storage
    def _start_index(self, y):
        """Empty storage for a fitted searcher, labels kept iff y is given."""
        self._index = self._new_index()
        self._labels = None if y is None else ChunkedRows(y.shape[1:], y.dtype)
        # The rows candidates are re-ranked by (refine_factor): see _rerank.py. What the
        # index keeps is fitted state: set_params afterwards does not change it.
        self.refine_storage_ = None if self.refine_factor is None else self.refine_storage
        self._rerank_cache = None
        self._vectors = (None if self.refine_storage_ is None
                         else ChunkedRows(*self._rerank_step().layout))
        self._live = None  # uint8 per item once something is removed
        self._n_removed = 0
        self._saved = None
        self._fit_y_cache = None
        self.n_samples_fit_ = 0

    def _append(self, X, y):
        """Encode and append rows (and labels), a chunk at a time."""
        n_new = X.shape[0]
        verbose = getattr(self, "verbose", 0)
        for start in range(0, n_new, ENCODE_CHUNK):
            chunk = X[start : start + ENCODE_CHUNK]
            cells = self._index_items(chunk)
            if self._vectors is not None:
                self._vectors.append(self._rerank_step().encode(chunk, cells))
            if verbose:
                print(f"[{type(self).__name__}] indexed {min(start + ENCODE_CHUNK, n_new):,}"
                      f"/{n_new:,} rows.")
        if y is not None:
            self._append_labels(y)
        if self._live is not None:
            self._live.append(np.ones(n_new, dtype=np.uint8))
        self.n_samples_fit_ += n_new
        self._fit_y_cache = None

    def _append_labels(self, y):
        labels = self._labels
        dtype = self._labels_dtype(y)
        if dtype != labels.dtype:  # one copy with the wider dtype
            self._labels = ChunkedRows(labels.row_shape, dtype, [labels.to_array().astype(dtype)])
        self._labels.append(y)

    def _labels_dtype(self, y):
        """The dtype the index's labels need to hold y too (ValueError when none can).

        Longer strings and integers beyond the labels' integer range widen
        the labels (one copy); numpy strings and numbers are refused
        together, as are integers no integer dtype holds and floats added to
        integer labels. Object labels (e.g. strings from pandas) and
        float labels follow numpy's promotion.
        """
        held = self._labels.dtype
        if held.kind == "O" or y.dtype.kind == "O":
            return np.dtype(object)
        if held.kind in "US" or y.dtype.kind in "US":
            if held.kind not in "US" or y.dtype.kind not in "US":
                raise ValueError(f"y of dtype {y.dtype} cannot join the index's labels of "
                                 f"dtype {held}: strings and numbers never match.")
            return np.result_type(held, y.dtype)
        if np.can_cast(y.dtype, held, casting="safe") or not y.size:
            return held
        if held.kind in "iub" and y.dtype.kind in "iub":  # integers: by their values
            if held.kind != "b":
                info = np.iinfo(held)
                if info.min <= y.min() and y.max() <= info.max:
                    return held
            wider = np.result_type(held, y.dtype)
            if wider.kind not in "iu":
                raise ValueError(f"y of dtype {y.dtype} cannot join the index's labels of "
                                 f"dtype {held}: no integer dtype holds both.")
            return wider
        if held.kind == "f" and y.dtype.kind in "iubf":
            return np.result_type(held, y.dtype)
        raise ValueError(f"y of dtype {y.dtype} cannot join the index's labels of dtype "
                         f"{held}.")

    @property
    def _fit_y(self):
        """The database labels as one array (``None`` without labels)."""
        if getattr(self, "_labels", None) is None:
            return None
        if self._fit_y_cache is None:
            self._fit_y_cache = self._labels.to_array()
        return self._fit_y_cache

    def _check_new_items(self, X, y):
        """Validate items to add: the fitted features, and labels iff fitted with labels."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], order="C", reset=False)
        if (y is None) != (self._labels is None):
            state = "with" if self._labels is not None else "without"
            raise ValueError(
                f"The index was fitted {state} labels: add items {state} y too."
            )
        if y is not None:
            y = check_array(y, ensure_2d=False, dtype=None, input_name="y")
            check_consistent_length(X, y)
            if y.shape[1:] != self._labels.row_shape:
                expected = ("(n_samples,)" if not self._labels.row_shape
                            else f"(n_samples, {self._labels.row_shape[0]})")
                raise ValueError(
                    f"y must have the shape of the index's labels, {expected}; got "
                    f"shape {y.shape}."
                )
            self._labels_dtype(y)  # refused here, before anything is appended
        # Refused here too rather than by the encoding of a later chunk, once earlier
        # chunks are in: an add refused for its input changes nothing (IVF also checks
        # the residuals). A failure while appending is undone (_append_or_nothing).
        check_magnitude(X)
        return X, y

    def add(self, X, y=None):
        """Append items to the index, encoded by the fitted quantizer.

        Nothing is refitted: new items get the indices ``n_samples_fit_,
        n_samples_fit_ + 1, ...`` and existing items keep theirs, so results
        stored elsewhere stay valid. Adding k items costs O(k) amortised:
        codes and labels grow in chunks whose capacity doubles, and nothing
        already indexed is copied. Refit when the new items differ much from
        those the quantizer was trained on.

        An ``add`` is all or nothing: bad input is refused before anything
        is appended, and an ``add`` that fails part way (out of memory,
        ``KeyboardInterrupt``) is undone, leaving the index as it was.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Vectors to index.
        y : array-like of shape (n_samples,) or (n_samples, n_labels), default=None
            Their labels; required when the index was fitted with labels,
            refused when it was not.

        Returns
        -------
        self : object
            The grown index.
        """
        X, y = self._check_new_items(X, y)
        self._append_or_nothing(X, y)
        return self

    def _append_or_nothing(self, X, y):
        """``_append``, undone if it fails part way (out of memory, KeyboardInterrupt, ...).

        The searcher's attributes, its labels, re-ranking rows, removal mask
        and back-end are restored as they were: an index whose ``add`` was
        interrupted answers as before it, and the next ``add`` numbers its
        items from where this one started.
        """
        attributes = dict(self.__dict__)
        undo = [part.checkpoint() for part in (self._index, self._labels, self._vectors,
                                                self._live) if part is not None]
        try:
            self._append(X, y)
        except BaseException:
            for restore in undo:
                restore()
            self.__dict__.clear()
            self.__dict__.update(attributes)
            raise

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
        if not hasattr(self, "_index"):
            unfitted = dict(self.__dict__)
            try:
                return self.fit(X, y)
            except BaseException:  # all or nothing, as add: the next call fits again
                self.__dict__.clear()
                self.__dict__.update(unfitted)
                raise
        return self.add(X, y)

    # ----------------------------------------------------------------- removal
    @property
    def n_removed_(self):
        """Number of items removed and not yet reclaimed by :meth:`compact`."""
        check_is_fitted(self)
        return self._n_removed

    def remove(self, indices):
        """Remove items: no search returns them again; the others keep their indices.

        Removed items keep their storage (and their index numbers stay
        taken) until :meth:`compact`; :meth:`save` writes the removals and
        :meth:`load` restores them.

        Parameters
        ----------
        indices : array-like of int
            Database indices of live items, each at most once.

        Returns
        -------
        self : object
            The index.
        """
        check_is_fitted(self)
        indices = removal_indices(indices, self.n_samples_fit_)
        n = self.n_samples_fit_
        live = self._live_mask()
        if indices.size and not live[indices].all():
            gone = indices[live[indices] == 0][0]
            raise ValueError(f"item {gone} was already removed.")
        if self._live is None:
            self._live = GrowableArray((), np.uint8, np.ones(n, dtype=np.uint8))
        self._live.array[indices] = 0
        self._n_removed += indices.size
        self._index.on_remove(indices)
        return self

    def _compact_mapping(self):
        """``(keep, mapping)``: the live items (bool) and the index :meth:`compact` gives each
        (int64, -1 for removed items), without compacting."""
        keep = self._live_mask().astype(bool)
        return keep, np.where(keep, np.cumsum(keep) - 1, -1).astype(np.int64)

    def _live_mask(self):
        if self._live is None:
            return np.ones(self.n_samples_fit_, dtype=np.uint8)
        return self._live.array

    def compact(self):
        """Reclaim the memory of removed items, renumbering the others.

        Live items keep their order; their indices close the gaps left by
        the removed ones.

        Returns
        -------
        mapping : ndarray of shape (n_samples_fit before the call,), dtype=int64
            The new index of each old index, -1 for removed items.
        """
        check_is_fitted(self)
        keep, mapping = self._compact_mapping()
        if self._n_removed:
            self._index.compact(keep)
            if self._labels is not None:
                labels = self._fit_y[keep]
                self._labels = ChunkedRows(labels.shape[1:], labels.dtype)
                self._labels.append(labels)
            if self._vectors is not None:
                rows = self._vectors.to_array()[keep]
                self._vectors = ChunkedRows(rows.shape[1:], rows.dtype)
                self._vectors.append(rows)
            self.n_samples_fit_ = int(keep.sum())
            self._live = None
            self._n_removed = 0
            self._saved = None  # the saved segments hold the old numbering
            self._fit_y_cache = None
        return mapping

    # ------------------------------------------------------------------ search
    def _check_allowed(self, allowed):
        """The uint8 mask of searchable items: live, and allowed by the caller."""
        if allowed is None:
            return None if self._live is None else self._live.array
        mask = allowed_mask(allowed, self.n_samples_fit_)
        if self._live is not None:
            mask = mask & self._live.array
        return np.ascontiguousarray(mask, dtype=np.uint8)

    def _check_search_params(self, params, method="kneighbors"):
        unknown = set(params) - set(self._SEARCH_PARAMS)
        if unknown:
            allowed = sorted(self._SEARCH_PARAMS) or "none"
            raise TypeError(f"{type(self).__name__}.{method} got an unexpected keyword "
                            f"argument {sorted(unknown)[0]!r}; its per-call search settings: "
                            f"{allowed}.")
        params = {k: v for k, v in params.items() if v is not None}
        if params:  # per-call values only; none given, nothing to check
            validate_parameter_constraints(
                {k: self._SEARCH_PARAMS[k] for k in params}, params, caller_name=method)
        own = {name: getattr(self, name) for name in self._SEARCH_PARAMS if name not in params}
        # The estimator's own values, checked by fit, may have been set since (set_params).
        unchecked = {k: v for k, v in own.items()
                     if v is not None and not (type(v) is int and v >= 1)}
        if unchecked:
            validate_parameter_constraints(
                {k: self._parameter_constraints[k] for k in unchecked}, unchecked,
                caller_name=type(self).__name__)
        return {**own, **params}

    def _check_self_queries(self, method):
        """X=None queries every indexed item: refused while removed ones await compact()."""
        if self._n_removed:
            raise ValueError(
                f"{method}() without X queries every indexed item, but {self._n_removed} "
                f"items are removed; call compact() first, or pass the query vectors."
            )

    def kneighbors(self, X=None, n_neighbors=None, return_distance=True, *, allowed=None,
                   **search_params):
        """Find the nearest database items of each query.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), default=None
            Query vectors. ``None``: every database item queries the others,
            never returning itself (not available after :meth:`remove`
            until :meth:`compact`).
        n_neighbors : int, default=None
            Neighbours per query; ``None`` uses the constructor's value.
        return_distance : bool, default=True
            Whether to return the distances.
        allowed : array-like of bool of shape (n_samples_fit,) or of int, default=None
            Restricts the search to these database items (a boolean mask, or
            their indices; ``n_samples_fit_`` integers that are all 0 or 1,
            some repeated, are refused as a mask of integers). The
            restriction is applied by the kernel while it scans, so the
            result is the search over the allowed items alone, ties by index.
            ``None``: every live item.
        **search_params
            Per-call search settings, which leave the estimator unchanged
            (:class:`IVFQuantizedNeighbors`: ``n_probe``); ``None`` means
            the estimator's value.

        Returns
        -------
        neigh_dist : ndarray of shape (n_queries, n_neighbors)
            Distances, ascending: Hamming distances as counts of differing
            bits (int32; scikit-learn's ``"hamming"`` would be that count
            divided by the number of bits), or estimated L2 distances
            (float64, the square root of the estimated squared distance) for
            product codes. Only with ``return_distance=True``.
        neigh_ind : ndarray of shape (n_queries, n_neighbors), dtype=int64
            Database indices of the neighbours; equal distances in ascending
            index order.
        """
        check_fitted(self)
        params = self._check_search_params(search_params)
        if n_neighbors is None:
            n_neighbors = self.n_neighbors
        elif type(n_neighbors) is not int and (not isinstance(n_neighbors, numbers.Integral)
                                               or isinstance(n_neighbors, bool)):
            raise TypeError(
                f"n_neighbors does not take {type(n_neighbors)} value, enter integer value"
            )
        elif n_neighbors <= 0:
            raise ValueError(f"Expected n_neighbors > 0. Got {n_neighbors}")
        n_neighbors = int(n_neighbors)

        query_is_train = X is None
        if query_is_train:
            self._check_self_queries("kneighbors")
            n_queries = self.n_samples_fit_
        else:
            X = validate_features(self, X)
            n_queries = X.shape[0]
        mask = self._check_allowed(allowed)
        n_candidates = (self.n_samples_fit_ - self._n_removed if allowed is None
                        else int(np.count_nonzero(mask)))
        if allowed is not None and n_candidates == 0:
            raise ValueError("allowed selects no live item; at least one is needed.")
        # Leaving each indexed point out of its own answer needs one more item.
        n_required = n_neighbors + 1 if query_is_train else n_neighbors
        if n_required > n_candidates:
            if allowed is not None or self._n_removed:
                raise ValueError(
                    f"Expected n_neighbors <= the number of searchable items, but "
                    f"n_neighbors = {n_neighbors} and only {n_candidates} live items "
                    f"{'are allowed' if allowed is not None else 'remain'}."
                )
            raise ValueError(
                f"Expected n_neighbors <= n_samples_fit, but n_neighbors = {n_required}, "
                f"n_samples_fit = {self.n_samples_fit_}, n_samples = {n_queries}"
            )
        refine = params.pop("refine_factor", None)
        # A handful of queries makes BLAS products too small for its threads:
        # skip setting the limit (tens of microseconds) for them.
        with single_threaded_blas if n_queries > 16 else nullcontext():
            if refine is None:
                distances, indices = self._search(X, n_neighbors, mask, params)
            else:
                self._check_kept_rows(refine)
                n_candidates = min(n_neighbors * refine, n_candidates - int(query_is_train))
                candidates = self._search(X, n_candidates, mask, params)[1]
                distances, indices = self._refine(X, candidates, n_neighbors)
        return (distances, indices) if return_distance else indices

    # ---------------------------------------------------------------- re-ranking
    def _check_kept_rows(self, refine):
        if self._vectors is None:
            raise ValueError(
                f"refine_factor={refine} re-ranks by the stored vectors, but this "
                f"index keeps none: fit it with refine_factor set (the vectors are "
                f"kept from then on)."
            )

    def _fit_rerank(self, R):
        """Learn what the re-ranking rows need from training rows R (fit calls it).

        R: the vectors, or their residuals to their cells' centroids where
        ``_rerank_centroids()`` is not None.
        """
        if self.refine_factor is not None and self.refine_storage == "sq8":
            self.refine_offset_, self.refine_scale_ = SQ8Rows.fit(R)
        else:
            for name in ("refine_offset_", "refine_scale_"):
                self.__dict__.pop(name, None)

    def _rerank_centroids(self):
        """The cells' centroids SQ8 rows quantize residuals to (None: the vectors)."""
        return None

    def _kept_rows(self):
        """How the fitted index keeps re-ranking rows: None (none), "float32" or "sq8"."""
        if hasattr(self, "refine_storage_"):
            return self.refine_storage_
        # An index saved before refine_storage_ existed: rows iff refine_factor, 8-bit iff
        # their ranges were learned.
        if self.refine_factor is None:
            return None
        return "sq8" if hasattr(self, "refine_scale_") else "float32"

    def _rerank_step(self):
        """The re-ranking step of the fitted index (built once per fit/load)."""
        step = getattr(self, "_rerank_cache", None)
        if step is None:
            if self._kept_rows() == "sq8":
                step = SQ8Rows(self.refine_offset_, self.refine_scale_, self._rerank_centroids())
            else:
                step = FloatRows(self.n_features_in_)
            self._rerank_cache = step
        return step

    def _refine(self, X, candidates, n_neighbors):
        """Re-rank candidates by L2 distance to the stored rows, ties by index.

        ``X=None``: the items query with their stored rows, decoded (with
        ``"sq8"`` rows, decoded vectors against decoded vectors), a chunk of
        items at a time.
        """
        step = self._rerank_step()
        n_threads = effective_n_threads(getattr(self, "n_jobs", None))
        candidates = np.ascontiguousarray(candidates)
        if X is not None:
            return step.rerank(np.ascontiguousarray(X, dtype=np.float64), candidates,
                               self._vectors, n_neighbors, n_threads)
        parts = []
        for start in range(0, len(candidates), ENCODE_CHUNK):
            stop = min(start + ENCODE_CHUNK, len(candidates))
            queries = step.decode(self._vectors.slice(start, stop))
            parts.append(step.rerank(np.ascontiguousarray(queries, dtype=np.float64),
                                     candidates[start:stop], self._vectors, n_neighbors,
                                     n_threads))
        return tuple(np.concatenate(p) for p in zip(*parts))

    def kneighbors_graph(self, X=None, n_neighbors=None, mode="connectivity", *, allowed=None,
                         **search_params):
        """Sparse graph of the k nearest database items of each query.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), default=None
            Query vectors; ``None`` as in :meth:`kneighbors`.
        n_neighbors : int, default=None
            Neighbours per query; ``None`` uses the constructor's value.
        mode : {"connectivity", "distance"}, default="connectivity"
            Entries of ones, or the distances to the neighbours (float64;
            Hamming distances as counts of bits).
        allowed : array-like, default=None
            Restricts the search as in :meth:`kneighbors`.
        **search_params
            Per-call search settings, as in :meth:`kneighbors`.

        Returns
        -------
        A : sparse matrix of shape (n_queries, n_samples_fit)
            CSR matrix; ``A[i, j]`` is set when database item j is one of the
            neighbours of query i.
        """
        check_is_fitted(self)
        return kneighbors_graph_of(self, X, n_neighbors, mode, allowed=allowed, **search_params)

    # ------------------------------------------------------------ radius search
    def _hamming(self):
        """Whether the codes' distances are Hamming counts of bits (else L2 estimates)."""
        return False

    def _threshold(self, radius):
        """The kernels' threshold for an L2 radius: they keep float32 squared sums t < it.

        A sum t is returned as sqrt(t) in float64 and kept iff sqrt(t) <= radius.
        """
        t = np.float32(min(radius * radius, float(np.finfo(np.float32).max)))
        with np.errstate(over="ignore"):  # past float32's largest: every finite sum is in
            while t > 0 and np.sqrt(np.float64(t)) > radius:
                t = np.nextafter(t, np.float32(-np.inf))
            while (np.isfinite(t)
                   and np.sqrt(np.float64(np.nextafter(t, np.float32(np.inf)))) <= radius):
                t = np.nextafter(t, np.float32(np.inf))
            return float(np.nextafter(t, np.float32(np.inf)))

    def radius_neighbors(self, X=None, radius=None, return_distance=True, sort_results=False,
                         *, allowed=None, **search_params):
        """Every database item within ``radius`` of each query.

        Items at distance exactly ``radius`` are included. Without
        re-ranking, the distances are those :meth:`kneighbors` returns
        without it (Hamming distances in bits, or L2 estimates of product
        codes), and the search is exact for them over what it scans: every
        item (:class:`QuantizedNeighbors`), or the items of the ``n_probe``
        cells nearest the query (:class:`IVFQuantizedNeighbors`).

        With ``refine_factor`` r (the estimator's, or this call's), the
        codes select the items whose estimated squared distance is at most
        ``r * radius ** 2`` (faiss's ``IndexRefine.range_search`` widens
        the base search so), and the stored rows then keep those within
        ``radius``: the distances returned are those of the rows (exact
        with float32 rows). An item whose estimate lies beyond the widened
        range is missed even when its exact distance is within ``radius``.
        Binary codes (Hamming) have no L2 estimate to widen: their radius
        search is the Hamming ball of the codes, in bits, whatever the
        estimator's ``refine_factor`` (a ``refine_factor`` passed to this
        call is refused).

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), default=None
            Query vectors. ``None``: every database item queries the others,
            never returning itself (not after :meth:`remove` until
            :meth:`compact`).
        radius : float, default=None
            Range, in the units of the distances; ``None`` uses the
            constructor's value.
        return_distance : bool, default=True
            Whether to return the distances.
        sort_results : bool, default=False
            Sort each query's items by distance (ties by index); otherwise
            they come in ascending index order. Needs ``return_distance``.
        allowed : array-like, default=None
            Restricts the search as in :meth:`kneighbors`.
        **search_params
            Per-call search settings, as in :meth:`kneighbors`.

        Returns
        -------
        neigh_dist : ndarray of shape (n_queries,), dtype=object
            One array of distances per query (int32 bits for Hamming,
            float64 L2 otherwise). Only with ``return_distance=True``.
        neigh_ind : ndarray of shape (n_queries,), dtype=object
            One int64 array of database indices per query.
        """
        check_fitted(self)
        params = self._check_search_params(search_params, "radius_neighbors")
        if sort_results and not return_distance:
            raise ValueError("return_distance must be True if sort_results is True.")
        radius = self.radius if radius is None else radius
        if (not isinstance(radius, numbers.Real) or isinstance(radius, bool)
                or not np.isfinite(radius) or radius < 0):
            raise ValueError(f"radius must be a finite number >= 0; got {radius!r}.")
        refine = self._radius_refine(params, search_params)
        if X is None:
            self._check_self_queries("radius_neighbors")
        else:
            X = validate_features(self, X)
        mask = self._check_allowed(allowed)
        reach = float(radius) if refine is None else float(radius) * float(np.sqrt(refine))
        n_queries = self.n_samples_fit_ if X is None else X.shape[0]
        # As in kneighbors: a handful of queries skips setting the BLAS limit.
        with single_threaded_blas if n_queries > 16 else nullcontext():
            parts = self._radius(X, self._threshold(reach), mask, params)
        neigh_dist = np.empty(n_queries, dtype=object)
        neigh_ind = np.empty(n_queries, dtype=object)
        q = 0
        for offsets, distances, indices in parts:
            if not self._hamming():
                distances = np.sqrt(np.maximum(distances, 0, dtype=np.float64))
            if refine is not None:
                offsets, distances, indices = self._refine_ball(
                    X, q, offsets, indices, float(radius))
            q = fill_balls(neigh_dist, neigh_ind, q, offsets, distances, indices,
                           sort_results)
        return (neigh_dist, neigh_ind) if return_distance else neigh_ind

    def _radius_refine(self, params, search_params):
        """The ``refine_factor`` of a range search (popped from the checked ``params``), or None.

        Binary codes have no L2 estimate to widen: the estimator's own
        ``refine_factor`` is for kneighbors, and one passed to the call
        (``search_params``) is refused.
        """
        refine = params.pop("refine_factor", None)
        if refine is not None and self._hamming():
            if search_params.get("refine_factor") is not None:
                raise ValueError(
                    f"radius_neighbors with refine_factor={refine} needs L2 estimates from "
                    f"the codes, but these binary codes are compared by Hamming distance; "
                    f"their radius search is the Hamming ball of the codes, without "
                    f"refine_factor.")
            refine = None  # the estimator's: for kneighbors; the ball is one of bits
        if refine is not None:
            self._check_kept_rows(refine)
        return refine

    def _refine_ball(self, X, first, offsets, indices, radius):
        """The candidates of queries ``first, first + 1, ...`` kept within radius by the rows.

        ``offsets`` and ``indices``: each query's candidates (CSR, indices
        ascending). Returns the same CSR form with the rows' distances
        (float64, as :meth:`kneighbors` re-ranks), indices ascending.
        """
        step = self._rerank_step()
        n_threads = effective_n_threads(getattr(self, "n_jobs", None))
        n = len(offsets) - 1
        if X is None:
            queries = step.decode(self._vectors.slice(first, first + n))
        else:
            queries = X[first : first + n]
        distances = step.distances(np.ascontiguousarray(queries, dtype=np.float64), offsets,
                                   indices, self._vectors, n_threads)
        keep = distances <= radius
        query_of = np.repeat(np.arange(n), np.diff(offsets))
        kept = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(query_of[keep], minlength=n), out=kept[1:])
        return kept, distances[keep], indices[keep]

    def radius_neighbors_graph(self, X=None, radius=None, mode="connectivity",
                               sort_results=False, *, allowed=None, **search_params):
        """Sparse graph of the database items within ``radius`` of each query.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), default=None
            Query vectors; ``None`` as in :meth:`radius_neighbors`.
        radius : float, default=None
            Range; ``None`` uses the constructor's value.
        mode : {"connectivity", "distance"}, default="connectivity"
            Entries of ones, or the distances (float64; Hamming in bits).
        sort_results : bool, default=False
            Sort each row's entries by distance (``mode="distance"`` only).
        allowed : array-like, default=None
            Restricts the search as in :meth:`kneighbors`.
        **search_params
            Per-call search settings, as in :meth:`kneighbors`.

        Returns
        -------
        A : sparse matrix of shape (n_queries, n_samples_fit)
            CSR matrix.
        """
        check_is_fitted(self)
        return radius_neighbors_graph_of(self, X, radius, mode, sort_results, allowed=allowed,
                                         **search_params)

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
        if self._labels is None:
            raise ValueError(
                f"score needs the labels of the database: fit {type(self).__name__} with y."
            )
        if y is None:
            raise ValueError("score needs the labels y of the queries X; got None.")
        indices = self.kneighbors(X, return_distance=False)
        return map_at_r_score(y, self._fit_y, indices)

    # -------------------------------------------------------------- persistence
    def save(self, path):
        """Save the index to a directory: JSON and ``.npy`` files, no pickle.

        ``index.json`` holds the parameters, the fitted state of the searcher
        and its quantizer (their arrays as ``.npy`` files) and the list of
        segments; each segment holds the codes (and labels) of the items
        added between two saves. The save is atomic: the files are written
        under new names and ``index.json`` is replaced last, in one rename,
        so an interrupted save leaves the previous index loadable. Saving
        onto the directory the index was loaded from (or last saved to)
        writes only what was added since, and works while that directory
        is memory-mapped. Removed items are saved as removed (their codes
        stay until :meth:`compact`).

        Parameters
        ----------
        path : str or os.PathLike
            Directory; created if missing. An existing directory must be an
            index written by ``save`` (or empty).

        Returns
        -------
        path : pathlib.Path
            The directory.
        """
        from ._persistence import save_index

        check_is_fitted(self)
        return save_index(self, path)

    @classmethod
    def load(cls, path, *, mmap_mode="r"):
        """Load an index written by :meth:`save`; nothing is unpickled.

        Parameters
        ----------
        path : str or os.PathLike
            Directory written by :meth:`save`.
        mmap_mode : {"r", "c", None}, default="r"
            ``"r"`` memory-maps the codes read-only (searching reads them
            from the files, sharing the page cache between processes);
            ``"c"`` copy-on-write; ``None`` reads them into memory.
            :meth:`add` works in every mode and keeps new items in memory.

        Returns
        -------
        searcher : object
            The fitted searcher, of the class ``load`` is called on.
        """
        from ._persistence import load_index

        if mmap_mode not in ("r", "c", None):
            raise ValueError(f"mmap_mode must be 'r', 'c' or None; got {mmap_mode!r}.")
        return load_index(cls, path, mmap_mode)

    def __getstate__(self):
        state = dict(super().__getstate__())  # object.__getstate__ gives __dict__ itself
        state.pop("_fit_y_cache", None)
        state.pop("_saved", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._fit_y_cache = None
        self._saved = None
