"""DaskQuantizedNeighbors: one index in shards on the workers of a Dask cluster.

The path of the data:

1. ``fit(X, y)`` fits a clone of the template searcher on the driver, on a
   random sample of at most ``max_train_samples`` rows: its quantizer (and
   IVF's coarse centroids) is then the quantizer of every shard. The fitted
   template is emptied (``_start_index``) and sent to the workers once.
2. Each row chunk of X becomes a shard on a worker: a shallow copy of the
   template with its own, empty back-end, which encodes the chunk
   (``_append``). The driver keeps only the futures of the shards, their
   global offsets and sizes (and, for IVF, the number of items of each cell
   over all shards).
   New shards are then spread so that every worker holds about as many
   items per thread as the others (``_balance``: shards move as codes, with
   their re-ranking rows if the template keeps some; X is never moved).
3. ``kneighbors(X)`` sends the queries to every worker once and runs one
   task per worker, pinned to it, which searches the shards that worker
   holds (``_search``: the single-process code path, kernels included, on
   as many threads as the worker has) and merges their top k by (distance,
   global index); the driver merges the workers' answers the same way.
   Each item's distance is computed exactly as one process would compute
   it, and both rank ties by index, so the merged answer is the
   single-process answer. IVF shards probe the cells chosen with the
   global cell sizes (a shard that ranked cells by its own, smaller, sizes
   would top its probes up differently from one process).
4. With ``refine_factor`` r (re-ranking) the shards also keep their items'
   rows. Each worker's task takes its own top ``r * k`` by the codes and
   scores them by their rows (``_search_refined_shards``: the squared
   distances one process ranks by); the driver merges the workers' lists
   into the top ``r * k`` of the codes (the candidates of one process, each
   found in the list of the worker that holds it) and keeps the k best by
   their rows, ties by index (``_best_refined``): one round trip. Range
   search re-ranks within each shard: each keeps its own matches whose rows
   lie within the radius.
5. ``allowed=`` (a filter) becomes one global uint8 mask; each shard
   searches with its slice, and IVF shards probe with the allowed items of
   each cell counted over all the shards (``_allowed_cell_counts``, a round
   of its own).
6. ``remove`` replaces each shard holding removed items by a copy with them
   marked (``_shard_with_removed``: its own live mask and IVF live counts,
   the codes shared); the driver keeps the removed global indices and, per
   shard, the removals made since its saved copy, which a reload re-applies.
   ``compact`` replaces those shards by compacted copies (``_shard_compacted``),
   drops the emptied ones and recomputes the offsets.

Shards report their real size to Dask (``dask.sizeof``): without it a
searcher weighed ~50 bytes, the 256 KB of queries looked heavier than a
worker's shards, and the scheduler ran every search task next to the
queries, copying all the shards onto one worker.
"""

import copy
import json
import math
import os
import re
import shutil
import sys
import time
import uuid
from concurrent.futures import CancelledError
from itertools import pairwise
from numbers import Integral, Real
from pathlib import Path

import dask
import dask.array as da
import numpy as np
from dask.sizeof import sizeof
from distributed import KilledWorker, default_client, get_worker, wait
from sklearn.base import BaseEstimator, _fit_context, clone
from sklearn.utils import check_array, check_random_state
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_consistent_length, check_is_fitted

from .._backends import InvertedLists, _merge
from .._index import (
    allowed_mask,
    fill_balls,
    kneighbors_graph_of,
    radius_neighbors_graph_of,
    removal_indices,
)
from .._ivf import IVFQuantizedNeighbors
from .._neighbors import QuantizedNeighbors
from .._storage import GrowableArray, read_json_manifest, read_manifest
from .._threads import effective_n_threads, single_threaded_blas
from .._version import __version__
from ..metrics import map_at_r_score

_SEARCHERS = {"QuantizedNeighbors": QuantizedNeighbors,
              "IVFQuantizedNeighbors": IVFQuantizedNeighbors}
# Manifest of a saved sharded index, and the version of its layout.
_MANIFEST = "dask_index.json"
_FORMAT = 1
# Rows per shard when a numpy array is cut into chunks.
_NUMPY_CHUNK_ROWS = 1_000_000
# A search that meets a lost worker is tried again this many times in all.
_ATTEMPTS = 4
_RETRY_PAUSE = 0.5
_REBUILD_TIMEOUT = 120
# What a lost worker looks like to the driver (connections closed, tasks killed).
_TRANSIENT = (OSError, KilledWorker, CancelledError)


# ---------------------------------------------------------------- on the workers
def _build_shard(template, X, y):
    """A shard: the fitted template (shared, read only) with its own back-end holding X."""
    shard = copy.copy(template)  # shares the fitted quantizer; _start_index replaces the storage
    if y is not None:
        y = check_array(y, ensure_2d=False, dtype=None, input_name="y")
    shard._start_index(y)
    X, y = shard._check_new_items(X, y)
    shard._append(X, y)
    return shard


def _load_shard(class_name, path, mmap_mode, uuid=None):
    """The shard saved in ``path``; with ``uuid``, only if that save is still the one there."""
    shard = _SEARCHERS[class_name].load(path, mmap_mode=mmap_mode)
    if uuid is not None and shard._saved["uuid"] != uuid:
        raise ValueError(
            f"{path} no longer holds the copy of the shard this index saved (or loaded) "
            f"there: another save has written over it since (another index saved to the "
            f"same directory?), and it may hold other items or other removals."
        )
    return shard


def _save_shard(shard, path):
    """Save the shard into ``path``; returns the uuid of that save."""
    shard.save(path)
    return shard._saved["uuid"]


def _nbytes(obj, seen):
    """Bytes of the numpy buffers reachable from obj (each buffer counted once, capacity included)."""
    if isinstance(obj, np.ndarray):
        while isinstance(obj.base, np.ndarray):
            obj = obj.base
        if id(obj) in seen or not obj.flags.owndata:
            return 0  # counted already, or memory-mapped / borrowed
        seen.add(id(obj))
        return obj.nbytes
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o, seen) for o in obj.values())
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("sklearn_hash."):
        return _nbytes(vars(obj), seen)
    return 0


@sizeof.register(QuantizedNeighbors)
@sizeof.register(IVFQuantizedNeighbors)
def _sizeof_searcher(searcher):
    """Bytes of a searcher for Dask's scheduler and memory manager (its numpy buffers)."""
    return sys.getsizeof(searcher) + _nbytes(vars(searcher), set())


def _check_row_chunked(X):
    """Raise a clear ValueError unless the dask array X is 2-D and chunked by rows only."""
    if X.ndim != 2:
        raise ValueError(f"Expected a 2D dask array, got a {X.ndim}D one instead.")
    if len(X.chunks[1]) != 1:
        raise ValueError(
            f"X must be chunked by rows only (each chunk holding all {X.shape[1]} "
            f"columns), but its columns are split into {len(X.chunks[1])} chunks "
            f"{X.chunks[1]}. Rechunk it: X.rechunk({{1: -1}})."
        )


def _shard_info(shard):
    """Items, live items per IVF cell, bytes held by the storage, and the removed items.

    The storage: codes, ids, labels, the live mask and re-ranking rows
    (those memory-mapped from a saved index not counted). The removed items
    by their indices in the shard.
    """
    index = shard._index
    cells = index.live_sizes.copy() if isinstance(index, InvertedLists) else None
    seen = set()
    nbytes = sum(_nbytes(part, seen)
                 for part in (index, shard._labels, shard._live, shard._vectors))
    removed = (np.empty(0, dtype=np.int64) if shard._live is None
               else np.flatnonzero(shard._live.array == 0))
    return shard.n_samples_fit_, cells, nbytes, removed


def _shard_with_removed(shard, local, again=False):
    """A copy of the shard with the items ``local`` removed; the shard itself is unchanged.

    The copy shares the codes, labels and rows; it has its own live mask
    (and, for IVF, its own live counts per cell), and knows the shard's saved
    copy (a save onto it writes only the removals). ``again``: items the
    shard has already removed are passed over (a reloaded copy may hold
    some of the removals re-applied to it, when a save stopped part way).
    """
    if again and shard._live is not None:
        local = local[shard._live.array[local] == 1]
    new = copy.copy(shard)
    new._saved = shard._saved  # copy.copy goes through __getstate__, which drops it
    if shard._live is not None:
        new._live = GrowableArray((), np.uint8, shard._live.array.copy())
    if isinstance(shard._index, InvertedLists):
        new._index = copy.copy(shard._index)
        new._index.live_sizes = shard._index.live_sizes.copy()
    return new.remove(local)


def _shard_compacted(shard):
    """A compacted copy of the shard (its removed items dropped); the shard is unchanged.

    The copies are plain shallow ones (no ``__getstate__``): ``compact``
    rebinds the storage of the copy and never writes into what it shares.
    """
    new = object.__new__(type(shard))
    new.__dict__.update(shard.__dict__)
    new._index = object.__new__(type(shard._index))
    new._index.__dict__.update(shard._index.__dict__)
    new.compact()
    return new


def _shard_contents(shard):
    """All of a shard's codes as one saved segment (with its re-ranking rows), and its labels."""
    labels = None if shard._labels is None else shard._labels.to_array()
    arrays = shard._index.segment_arrays(0, shard.n_samples_fit_)
    if shard._vectors is not None:
        arrays["vectors"] = shard._vectors.to_array()
    return arrays, labels


def _shard_labels(shard, local):
    return shard._labels.to_array()[local]


def _search_view(shard, cell_sizes, n_threads):
    """A view of a shard searching on n_threads (unless its n_jobs says otherwise).

    An IVF view probes with ``cell_sizes``, the searchable items of each
    cell in the whole index (all of them, or those the search allows).
    """
    view = object.__new__(type(shard))
    view.__dict__.update(shard.__dict__)
    if view.n_jobs is None:
        view.n_jobs = n_threads
    if cell_sizes is not None:  # not the shard's own counts
        view._searchable_sizes = lambda allowed: cell_sizes
    return view


def _shard_mask(allowed, offset, shard):
    """The shard's searchable items: its live ones (None: all) within its slice of the
    global uint8 mask ``allowed`` (None: every item)."""
    live = None if shard._live is None else shard._live.array
    if allowed is None:
        return live
    mine = allowed[offset : offset + shard.n_samples_fit_]
    return np.ascontiguousarray(mine if live is None else mine & live)


def _allowed_cell_counts(shards, offsets, allowed):
    """Items of each IVF cell that the global mask ``allowed`` lets through, over some shards."""
    counts = 0
    for shard, offset in zip(shards, offsets):
        counts = counts + shard._searchable_sizes(_shard_mask(allowed, offset, shard))
    return counts


def _worker_threads():
    """Threads of the Dask worker running this task (None outside a worker)."""
    try:
        return get_worker().state.nthreads
    except ValueError:
        return None


def _search_shards(shards, offsets, X, k, params, cell_sizes, distance_dtype, n_threads=None,
                   allowed=None):
    """Top k of the queries X over some shards, with global indices, ties by index.

    Kernels run on ``n_threads`` threads (``None``: as many as the worker
    has; one task per worker then searches all the shards it holds), unless
    the template's ``n_jobs`` says otherwise. A worker started without a
    nanny has no ``OMP_NUM_THREADS=1`` and would otherwise run a kernel on
    every core in each of its threads. ``allowed``: the global uint8 mask
    of the items the search may return (None: all).
    """
    X = check_array(X, dtype=[np.float64, np.float32], order="C", ensure_min_samples=0)
    if X.shape[0] == 0:
        return np.empty((0, k), dtype=distance_dtype), np.empty((0, k), dtype=np.int64)
    if n_threads is None:
        n_threads = _worker_threads()
    parts = []
    with single_threaded_blas:
        for shard, offset in zip(shards, offsets):
            mask = _shard_mask(allowed, offset, shard)
            shard = _search_view(shard, cell_sizes, n_threads)
            distances, indices = shard._search(X, k, mask, params)
            parts.append((distances, np.where(indices >= 0, indices + offset, -1)))
    return _merge(parts, k)


def _refine_shards(shards, offsets, X, candidates, n_threads=None):
    """Squared distances to their rows of the candidates some shards hold (NaN elsewhere).

    ``candidates``: global indices (-1: none), the merged candidates of
    every shard; each is scored by the shard holding it, with its
    searcher's re-ranking step: the sums one process ranks them by.
    """
    X = check_array(X, dtype=[np.float64, np.float32], order="C", ensure_min_samples=0)
    if n_threads is None:
        n_threads = _worker_threads()
    queries = np.ascontiguousarray(X, dtype=np.float64)
    out = np.full(candidates.shape, np.nan)
    # Each candidate's shard among these (their ranges do not overlap), found once.
    order = np.argsort(offsets, kind="stable")
    starts = np.asarray(offsets, dtype=np.int64)[order]
    sizes = np.array([shards[s].n_samples_fit_ for s in order], dtype=np.int64)
    flat = candidates.ravel()
    at = np.flatnonzero(flat >= 0)
    which = np.searchsorted(starts, flat[at], side="right") - 1
    inside = which >= 0
    inside[inside] = flat[at[inside]] - starts[which[inside]] < sizes[which[inside]]
    at, which = at[inside], which[inside]
    by_shard = np.argsort(which, kind="stable")  # within a shard: by query, as the CSR wants
    at, which = at[by_shard], which[by_shard]
    bounds = np.searchsorted(which, np.arange(len(order) + 1))
    with single_threaded_blas:
        for s, shard_number in enumerate(order):
            mine = at[bounds[s] : bounds[s + 1]]
            if not mine.size:
                continue
            shard = shards[shard_number]
            query_starts = np.zeros(len(queries) + 1, dtype=np.int64)
            np.cumsum(np.bincount(mine // candidates.shape[1], minlength=len(queries)),
                      out=query_starts[1:])
            n_jobs = n_threads if shard.n_jobs is None else shard.n_jobs
            out.flat[mine] = shard._rerank_step().distances(
                queries, query_starts, flat[mine] - starts[s], shard._vectors,
                effective_n_threads(n_jobs), squared=True)
    return out


def _search_refined_shards(shards, offsets, X, n_candidates, params, cell_sizes,
                           distance_dtype, n_threads=None, allowed=None):
    """:func:`_search_shards`'s top ``n_candidates``, each with its squared distance to its
    row (NaN for the -1 of a short list).

    The worker scores its own candidates at once, in the same task: the
    global candidates (the merged top ``n_candidates`` of the codes) are
    among the workers' own, so the driver ranks them by these distances
    without a second round trip.
    """
    distances, indices = _search_shards(shards, offsets, X, n_candidates, params, cell_sizes,
                                        distance_dtype, n_threads, allowed)
    return distances, indices, _refine_shards(shards, offsets, X, indices, n_threads)


def _best_of_merged(merged, k):
    """The best k of merged ``(distances, indices, squared)`` candidates (see _best_refined)."""
    return _best_refined([merged[2]], merged[1], k)


def _best_refined(parts, candidates, k):
    """The k candidates of least squared distance (from the shards' parts), ties by index.

    Returns their distances (the square roots, float64) and indices, as the
    single-process re-ranking does; ``inf`` and -1 where fewer exist.
    """
    squared = np.full(candidates.shape, np.inf)
    for part in parts:
        squared = np.where(np.isnan(part), squared, part)
    missing = candidates < 0
    order = np.lexsort((candidates, squared, missing), axis=1)[:, :k]
    distances = np.sqrt(np.take_along_axis(squared, order, axis=1))
    indices = np.take_along_axis(candidates, order, axis=1)
    taken = np.take_along_axis(missing, order, axis=1)
    distances[taken], indices[taken] = np.inf, -1
    if distances.shape[1] < k:  # fewer candidates than k (a tiny index)
        pad = k - distances.shape[1]
        distances = np.pad(distances, ((0, 0), (0, pad)), constant_values=np.inf)
        indices = np.pad(indices, ((0, 0), (0, pad)), constant_values=-1)
    return distances, indices


def _join_balls(query_of, distances, indices, n_queries, dtype):
    """Matches (query, distance, index) from several shards as CSR, by query then index.

    ``dtype``: the distances' when none match (int32 bits, float32 squared
    estimates, or float64 distances to the rows with re-ranking).
    """
    if not query_of:
        return np.zeros(n_queries + 1, np.int64), np.empty(0, dtype), np.empty(0, np.int64)
    query_of, distances, indices = (np.concatenate(a) for a in (query_of, distances, indices))
    order = np.lexsort((indices, query_of))
    offsets = np.zeros(n_queries + 1, dtype=np.int64)
    np.cumsum(np.bincount(query_of, minlength=n_queries), out=offsets[1:])
    return offsets, distances[order], indices[order]


def _radius_shards(shards, offsets, X, threshold, params, cell_sizes, threshold_in_bits,
                   radius=None, allowed=None, n_threads=None):
    """Every item of some shards within the threshold of each query: CSR, global indices.

    Each shard runs its searcher's range scan (``_radius``); its matches
    keep the kernels' units (squared L2 estimates, or bits). With ``radius``
    (re-ranking), each shard keeps those of its matches whose rows lie
    within it (``_refine_ball``), with the rows' L2 distances.
    """
    X = check_array(X, dtype=[np.float64, np.float32], order="C", ensure_min_samples=0)
    if n_threads is None:
        n_threads = _worker_threads()
    query_of, distances, indices = [], [], []
    with single_threaded_blas:
        for shard, offset in zip(shards, offsets):
            mask = _shard_mask(allowed, offset, shard)
            shard = _search_view(shard, cell_sizes, n_threads)
            first = 0
            for part_offsets, d, i in (shard._radius(X, threshold, mask, params)
                                       if X.shape[0] else ()):
                n = len(part_offsets) - 1
                if radius is not None:
                    part_offsets, d, i = shard._refine_ball(X, first, part_offsets, i, radius)
                query_of.append(np.repeat(np.arange(first, first + n), np.diff(part_offsets)))
                distances.append(d)
                indices.append(i + offset)
                first += n
    return _join_balls(query_of, distances, indices, X.shape[0],
                       np.int32 if threshold_in_bits else np.float64 if radius is not None
                       else np.float32)


def _moved(shard):
    """The shard itself: run on another worker, it copies the shard there."""
    return shard


def _merge_parts(parts, k):
    return _merge(list(parts), k)


# ------------------------------------------------------------------- the driver
class DaskQuantizedNeighbors(BaseEstimator):
    """Nearest-neighbour search over codes sharded across the workers of a Dask cluster.

    ``fit`` learns the quantizer once, on the driver, from a random sample
    of the rows; then every row chunk of X is encoded on a worker and stays
    there, in that worker's memory, as a shard: a searcher of the template's
    class sharing the fitted quantizer. The driver holds only the futures of
    the shards, with each shard's global offset and size, never the
    database or its codes. ``kneighbors`` searches every shard and merges
    their answers exactly: the result is the one a single-process searcher
    holding the same quantizer and all the codes returns (see
    :meth:`to_local`), distances and indices, ties by global index.
    ``radius_neighbors`` joins the shards' balls by global index. Both take
    ``allowed=`` filters; ``remove`` takes items out of every later
    search and ``compact`` renumbers the rest across the shards. A
    template with ``refine_factor`` re-ranks as one process does: its
    shards keep their items' rows (``refine_storage``) and score the
    candidates they hold.

    Read more in the :ref:`User Guide <dask>`.

    Parameters
    ----------
    searcher : QuantizedNeighbors or IVFQuantizedNeighbors, default=None
        Unfitted searcher, the template of every shard: its quantizer, metric
        and (IVF) cells are fitted once in ``fit``, on a clone. ``None`` means
        ``QuantizedNeighbors()`` (binary ITQ codes, Hamming distance).
    n_neighbors : int, default=10
        Neighbours returned by :meth:`kneighbors`, and ``R`` of :meth:`score`.
    max_train_samples : int, default=100_000
        Rows, drawn at random without replacement, that the quantizer is
        fitted on; only these rows are brought to the driver.
    client : distributed.Client, default=None
        The cluster's client. ``None`` uses the default client (the last
        ``distributed.Client`` created).
    random_state : int, RandomState instance or None, default=None
        Draws the training sample. The template's own ``random_state`` (and
        its quantizer's) seed its fit.

    Attributes
    ----------
    searcher_ : QuantizedNeighbors or IVFQuantizedNeighbors
        The fitted clone of ``searcher``, holding no items: the quantizer
        shared by the shards.
    shards_ : list of distributed.Future
        One future per shard, each a fitted searcher in a worker's memory.
    shard_offsets_ : ndarray of shape (n_shards,), dtype=int64
        Global index of the first item of each shard.
    shard_sizes_ : ndarray of shape (n_shards,), dtype=int64
        Items per shard.
    n_samples_fit_ : int
        Number of items indexed, removed ones included.
    n_features_in_ : int
        Number of features seen during ``fit``.

    See Also
    --------
    sklearn_hash.QuantizedNeighbors : The same search in one process.
    sklearn_hash.IVFQuantizedNeighbors : Non-exhaustive search in one process.

    Notes
    -----
    **Exactness.** A shard searches with the code of the single-process
    searcher and returns its top k with global indices (offset plus local
    index); taking the k best of the union by (distance, index) is exact
    because every item's distance is computed as one process would compute
    it. An IVF shard probes the cells chosen with the number of items of
    each cell in the whole index, as one process would. One difference
    remains possible: estimated distances are returned as square roots of
    the estimated squared distances clamped at zero, so two items whose
    IVF estimates are both (by rounding) below zero tie at 0.0 and are
    ranked by index, where one process ranks them by their negative
    estimates. With ``refine_factor`` r the candidates are the merged top
    ``r * k`` of the codes, those of one process; each is scored by the
    shard that holds it with the single-process re-ranking kernel, and the
    driver keeps the k best by squared distance then index: the
    single-process re-ranking. Each worker scores all of its own top
    ``r * k`` in the same task as its search, though only some of them are
    among the merged candidates: up to one list of candidates scored per
    worker instead of one in all, for one round trip instead of two.

    **Placement and threads.** After ``fit``, ``add`` and ``load`` the
    shards are moved (as codes) so that every worker holds about as many
    items per thread as the others; a search of a numpy array of queries
    sends them once to each worker and runs one task per worker, pinned to
    it, whose kernels use all the worker's threads (the template's
    ``n_jobs`` when set). A search of a dask array runs one task per block
    of queries and worker, the worker's threads shared among the blocks;
    Dask may run such a task on another worker (work stealing), which then
    receives a copy of the shards it needs: answers are unchanged, memory
    is not.

    **Worker loss.** A shard lost with its worker is rebuilt by Dask from
    the graph it came from, when it still can (a chunk of a dask array is
    recomputed and encoded again); a shard of an index that was saved or
    loaded is reloaded from its saved directory, if that still holds the
    copy this index saved (not one written over by another save). Otherwise
    the search raises a ``RuntimeError`` naming the lost shards: it never
    returns an answer from the surviving shards alone. ``remove``,
    ``compact`` and ``save`` recover lost shards the same way first.

    **Storage.** :meth:`save` writes one directory per shard, in the
    single-process format, written by the worker that holds the shard,
    plus ``dask_index.json``; the path must be shared by the workers and
    the driver (a network file system on a real cluster).

    Examples
    --------
    >>> from distributed import Client, LocalCluster
    >>> from sklearn.datasets import load_digits
    >>> from sklearn_hash import ITQ, QuantizedNeighbors
    >>> from sklearn_hash.dask import DaskQuantizedNeighbors
    >>> import dask.array as da
    >>> cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
    ...                        dashboard_address=":0")
    >>> client = Client(cluster)
    >>> X, y = load_digits(return_X_y=True)
    >>> database = da.from_array(X[:1500], chunks=(500, -1))  # three shards
    >>> search = DaskQuantizedNeighbors(
    ...     QuantizedNeighbors(ITQ(n_bits=32, random_state=0)), n_neighbors=5,
    ...     client=client, random_state=0).fit(database, y[:1500])
    >>> search.shard_sizes_
    array([500, 500, 500])
    >>> distances, indices = search.kneighbors(X[1500:1502])
    >>> local = search.to_local()  # one process, the same codes
    >>> bool((local.kneighbors(X[1500:1502])[1] == indices).all())
    True
    >>> round(search.score(X[1500:], y[1500:]), 2) > 0.5
    True
    >>> client.close(); cluster.close()
    """

    _parameter_constraints: dict = {
        "searcher": [QuantizedNeighbors, IVFQuantizedNeighbors, None],
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "max_train_samples": [Interval(Integral, 2, None, closed="left")],
        "client": "no_validation",
        "random_state": ["random_state"],
    }

    def __init__(self, searcher=None, *, n_neighbors=10, max_train_samples=100_000,
                 client=None, random_state=None):
        self.searcher = searcher
        self.n_neighbors = n_neighbors
        self.max_train_samples = max_train_samples
        self.client = client
        self.random_state = random_state

    # ---------------------------------------------------------------- helpers
    def _get_client(self):
        if self.client is not None:
            return self.client
        try:
            return default_client()
        except ValueError:
            raise ValueError(
                f"{type(self).__name__} needs a dask.distributed Client: pass client=..., or "
                f"create one first (distributed.Client(...) becomes the default)."
            ) from None

    def _row_blocks(self, X, client, *, fitting):
        """X as (blocks, rows per block): delayed chunks of a dask array, or futures of numpy chunks."""
        if isinstance(X, da.Array):
            _check_row_chunked(X)
            if any(math.isnan(c) for c in X.chunks[0]):
                raise ValueError("X has chunks of unknown size; call X.compute_chunk_sizes() "
                                 "first.")
            if X.dtype.kind not in "biuf":
                raise ValueError(f"X must hold numbers; got a dask array of dtype {X.dtype}.")
            if X.dtype not in (np.float32, np.float64):
                X = X.astype(np.float64)
            self._check_n_features(X.shape[1], fitting)
            sizes = [int(c) for c in X.chunks[0]]
            return X, list(X.to_delayed().ravel()), sizes
        X = check_array(X, dtype=[np.float64, np.float32], order="C",
                        ensure_min_samples=2 if fitting else 1)
        self._check_n_features(X.shape[1], fitting)
        n_workers = max(1, len(client.nthreads()))
        n_chunks = max(n_workers, -(-X.shape[0] // _NUMPY_CHUNK_ROWS))
        bounds = np.linspace(0, X.shape[0], min(n_chunks, X.shape[0]) + 1).astype(int)
        pieces = [X[a:b] for a, b in pairwise(bounds)]
        return X, client.scatter(pieces, hash=False), [len(p) for p in pieces]

    def _check_n_features(self, n_features, fitting):
        if fitting:
            return
        if n_features != self.n_features_in_:
            raise ValueError(
                f"X has {n_features} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input."
            )

    @staticmethod
    def _label_blocks(y, sizes):
        """y cut like the rows of X (delayed or numpy pieces), or Nones."""
        if y is None:
            return [None] * len(sizes)
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        if isinstance(y, da.Array):
            if y.shape[0] != bounds[-1]:
                raise ValueError(f"Found input variables with inconsistent numbers of "
                                 f"samples: [{bounds[-1]}, {y.shape[0]}]")
            y = y.rechunk((tuple(sizes), *[(s,) for s in y.shape[1:]]))
            return list(y.to_delayed().ravel())
        y = check_array(y, ensure_2d=False, dtype=None, input_name="y")
        check_consistent_length(np.empty((bounds[-1], 0)), y)
        return [y[a:b] for a, b in pairwise(bounds)]

    def _build(self, client, blocks, sizes, y_blocks):
        """Encode each block into a shard on a worker; returns the new futures and their info."""
        template = dask.delayed(self.searcher_, pure=True)
        todo = [(b, n, yb) for b, n, yb in zip(blocks, sizes, y_blocks) if n > 0]
        built = [dask.delayed(_build_shard, pure=False)(template, b, yb) for b, _, yb in todo]
        shards = client.compute(built)
        infos = client.gather(client.map(_shard_info, shards, pure=False))
        for (_, n, _), info in zip(todo, infos):
            if info[0] != n:  # pragma: no cover - a chunk that lied about its size
                raise ValueError(f"a chunk declared {n} rows but held {info[0]}.")
        return shards, infos

    def _register(self, shards, infos):
        sizes = np.array([info[0] for info in infos], dtype=np.int64)
        offsets = self.n_samples_fit_ + np.concatenate([[0], np.cumsum(sizes)])[:len(sizes)]
        self.shards_ = [*self.shards_, *shards]
        self.shard_sizes_ = np.concatenate([self.shard_sizes_, sizes]).astype(np.int64)
        self.shard_offsets_ = np.concatenate([self.shard_offsets_, offsets]).astype(np.int64)
        self._shard_bytes = [*self._shard_bytes, *(info[2] for info in infos)]
        self._saved_dirs = [*self._saved_dirs, *([None] * len(shards))]
        self._saved_uuids = [*self._saved_uuids, *([None] * len(shards))]
        self._pending_removals = [*self._pending_removals, *([] for _ in shards)]
        self._shard_cells = [*self._shard_cells, *(info[1] for info in infos)]
        for info in infos:
            if info[1] is not None:
                self._cell_sizes = self._cell_sizes + info[1]
        self._removed = np.concatenate(
            [self._removed, *(info[3] + o for info, o in zip(infos, offsets))]).astype(np.int64)
        self.n_samples_fit_ = int(self.n_samples_fit_ + sizes.sum())

    def _reset_shards(self):
        self.shards_ = []
        self.shard_sizes_ = np.empty(0, dtype=np.int64)
        self.shard_offsets_ = np.empty(0, dtype=np.int64)
        self._shard_bytes = []
        self._saved_dirs = []        # per shard: the directory of its saved copy (None: none)
        self._saved_uuids = []       # per shard: the uuid of that copy's save
        self._pending_removals = []  # per shard: removals made since its saved copy
        self._shard_cells = []       # per shard: live items per IVF cell (None: not IVF)
        self._removed = np.empty(0, dtype=np.int64)  # global indices, ascending
        self.n_samples_fit_ = 0
        self._cell_sizes = (np.zeros(self.searcher_._n_cells(), dtype=np.int64)
                            if isinstance(self.searcher_, IVFQuantizedNeighbors) else None)

    # ---------------------------------------------------------------- fitting
    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y=None):
        """Fit the quantizer on a sample of X on the driver, then encode X into shards on the workers.

        Parameters
        ----------
        X : dask array or array-like of shape (n_samples, n_features)
            Database vectors. A dask array must be chunked by rows only;
            each row chunk becomes one shard. A numpy array is cut into
            chunks (at least one per worker, at most 1,000,000 rows each)
            sent to the workers.
        y : dask array or array-like of shape (n_samples,) or (n_samples, n_labels), default=None
            Database labels: passed to the quantizer's ``fit`` (for the
            sample) and kept with the shards for :meth:`score`.

        Returns
        -------
        self : DaskQuantizedNeighbors
            The fitted searcher.
        """
        client = self._get_client()
        self._client = client
        X, blocks, sizes = self._row_blocks(X, client, fitting=True)
        n_samples = sum(sizes)
        if n_samples < 2:
            raise ValueError(f"Found array with {n_samples} sample(s) (shape={X.shape}) while "
                             f"a minimum of 2 is required by {type(self).__name__}.")
        y_blocks = self._label_blocks(y, sizes)

        rng = check_random_state(self.random_state)
        n_train = min(self.max_train_samples, n_samples)
        rows = np.sort(rng.choice(n_samples, n_train, replace=False))
        if isinstance(X, da.Array):
            X_train = X[rows].compute()
        else:
            X_train = X[rows]
        y_train = None
        if y is not None:
            y_train = y[rows].compute() if isinstance(y, da.Array) else np.asarray(y)[rows]
        template = clone(self.searcher) if self.searcher is not None else QuantizedNeighbors()
        template.fit(X_train, y_train)
        template._start_index(None)  # the fitted quantizer, without the sample's items
        self.searcher_ = template
        self.n_features_in_ = int(X.shape[1])
        self._has_labels = y is not None
        self._reset_shards()
        self._register(*self._build(client, blocks, sizes, y_blocks))
        self._balance(client)
        return self

    def add(self, X, y=None):
        """Encode more items into new shards with the fitted quantizer; nothing is refitted.

        New items get the indices ``n_samples_fit_, n_samples_fit_ + 1, ...``;
        existing shards are left as they are.

        Parameters
        ----------
        X : dask array or array-like of shape (n_samples, n_features)
            Vectors to index, chunked by rows as in :meth:`fit`.
        y : dask array or array-like of shape (n_samples,) or (n_samples, n_labels), default=None
            Their labels; required when the index was fitted with labels,
            refused when it was not.

        Returns
        -------
        self : DaskQuantizedNeighbors
            The grown index.
        """
        check_is_fitted(self)
        if (y is None) == self._has_labels:
            state = "with" if self._has_labels else "without"
            raise ValueError(f"The index was fitted {state} labels: add items {state} y too.")
        client = self._get_client()
        self._client = client
        X, blocks, sizes = self._row_blocks(X, client, fitting=False)
        self._register(*self._build(client, blocks, sizes, self._label_blocks(y, sizes)))
        self._balance(client)
        return self

    @property
    def n_removed_(self):
        """Number of items removed."""
        check_is_fitted(self)
        return len(self._removed)

    def remove(self, indices):
        """Remove items: no search returns them again; the others keep their indices.

        As the single-process ``remove``: the removed items keep their codes
        (and their index numbers stay taken). Each shard holding some of
        them is replaced by a copy with those items marked removed (sharing
        the codes; built by the worker that holds the shard), so a shard
        lost later is rebuilt or reloaded with its removals. All or nothing:
        the shards are replaced only once every copy is built. :meth:`save`
        writes the removals; :meth:`load` restores them.

        Parameters
        ----------
        indices : array-like of int
            Global indices of live items, each at most once.

        Returns
        -------
        self : DaskQuantizedNeighbors
            The index.
        """
        check_is_fitted(self)
        indices = removal_indices(indices, self.n_samples_fit_)
        gone = indices[np.isin(indices, self._removed)]
        if gone.size:
            raise ValueError(f"item {gone[0]} was already removed.")
        client = self._get_client()
        shard_of = np.searchsorted(self.shard_offsets_, indices, side="right") - 1
        locals_ = {int(i): np.sort(indices[shard_of == i] - self.shard_offsets_[i])
                   for i in np.unique(shard_of)}

        def run():  # the copies, built from the shards as they are (or as recovered)
            copies = {i: client.submit(_shard_with_removed, self.shards_[i], local, pure=False)
                      for i, local in locals_.items()}
            infos = client.gather([client.submit(_shard_info, f, pure=False)
                                   for f in copies.values()])
            return copies, infos

        copies, infos = self._retrying(client, run, "remove()")
        for (i, future), info in zip(copies.items(), infos):
            self.shards_[i] = future
            self._shard_bytes[i] = info[2]
            self._pending_removals[i] = [*self._pending_removals[i], locals_[i]]
            if info[1] is not None:
                self._cell_sizes = self._cell_sizes + info[1] - self._shard_cells[i]
                self._shard_cells[i] = info[1]
        self._removed = np.union1d(self._removed, indices)
        return self

    def compact(self):
        """Reclaim the memory of removed items, renumbering the others across the shards.

        As the single-process ``compact``: live items keep their order and
        their indices close the gaps left by the removed ones, over the
        whole index. Each shard holding removed items is replaced by a
        compacted copy, built by the worker that holds it; a shard left
        empty is dropped (but the last: an index left empty keeps one empty
        shard). All or nothing, as :meth:`remove`. The compacted
        shards no longer match their saved copies: :meth:`save` writes them
        again in full, and until then a compacted shard lost with its worker
        is rebuilt by Dask from its graph or not at all.

        Returns
        -------
        mapping : ndarray of shape (n_samples_fit before the call,), dtype=int64
            The new index of each old index, -1 for removed items.
        """
        check_is_fitted(self)
        keep = np.ones(self.n_samples_fit_, dtype=bool)
        keep[self._removed] = False
        mapping = np.where(keep, np.cumsum(keep) - 1, -1).astype(np.int64)
        if not len(self._removed):
            return mapping
        client = self._get_client()
        shard_of = np.searchsorted(self.shard_offsets_, self._removed, side="right") - 1
        touched = [int(i) for i in np.unique(shard_of)]

        def run():
            copies = [client.submit(_shard_compacted, self.shards_[i], pure=False)
                      for i in touched]
            return copies, client.gather([client.submit(_shard_info, f, pure=False)
                                          for f in copies])

        copies, infos = self._retrying(client, run, "compact()")
        for i, future, info in zip(touched, copies, infos):
            self.shards_[i] = future
            self.shard_sizes_[i] = info[0]
            self._shard_bytes[i] = info[2]
            self._saved_dirs[i] = self._saved_uuids[i] = None  # the old numbering
            self._pending_removals[i] = []
            self._shard_cells[i] = info[1]
        # An index left empty keeps its first shard, empty: it still knows the labels'
        # dtype and shape (to_local, score) and searches as an empty index of one process.
        kept = [i for i in range(len(self.shards_)) if self.shard_sizes_[i] > 0] or [0]
        self.shards_ = [self.shards_[i] for i in kept]
        self.shard_sizes_ = self.shard_sizes_[kept]
        self.shard_offsets_ = np.concatenate(
            [[0], np.cumsum(self.shard_sizes_)])[:len(kept)].astype(np.int64)
        for name in ("_shard_bytes", "_saved_dirs", "_saved_uuids", "_pending_removals",
                     "_shard_cells"):
            setattr(self, name, [getattr(self, name)[i] for i in kept])
        self._removed = np.empty(0, dtype=np.int64)
        self.n_samples_fit_ = int(self.shard_sizes_.sum())
        self._balance(client)
        return mapping

    # ---------------------------------------------------------------- search
    def _check_n_neighbors(self, n_neighbors, n_queries, bounded=True):
        """n_neighbors as an int; ``bounded``: at most n_samples_fit_ (without a filter,
        whose own check says how many items it allows)."""
        if n_neighbors is None:
            n_neighbors = self.n_neighbors
        elif not isinstance(n_neighbors, Integral) or isinstance(n_neighbors, bool):
            raise TypeError(
                f"n_neighbors does not take {type(n_neighbors)} value, enter integer value"
            )
        elif n_neighbors <= 0:
            raise ValueError(f"Expected n_neighbors > 0. Got {n_neighbors}")
        if bounded and n_neighbors > self.n_samples_fit_:
            raise ValueError(
                f"Expected n_neighbors <= n_samples_fit, but n_neighbors = {n_neighbors}, "
                f"n_samples_fit = {self.n_samples_fit_}, n_samples = {n_queries}"
            )
        return int(n_neighbors)

    def _distance_dtype(self):
        hamming = getattr(self.searcher_, "metric_", None) == "hamming"
        return np.dtype(np.int32 if hamming else np.float64)

    def _placement(self, client):
        """Shard numbers by the worker that searches them: {worker address or None: [i, ...]}.

        A shard held by several workers (Dask may copy one) is searched by
        the holder with the fewest items per thread so far; a shard in no
        worker's memory (being rebuilt) goes to the group ``None``.
        """
        who = client.who_has(self.shards_)
        threads = client.nthreads()
        load = dict.fromkeys(threads, 0)
        groups = {}
        for i in np.argsort(-self.shard_sizes_, kind="stable"):
            holders = [w for w in who.get(self.shards_[i].key) or () if w in load]
            worker = (min(holders, key=lambda w: (load[w] / threads[w], w)) if holders
                      else None)
            if worker is not None:
                load[worker] += int(self.shard_sizes_[i])
            groups.setdefault(worker, []).append(int(i))
        return {worker: sorted(group) for worker, group in groups.items()}

    def _balance(self, client):
        """Move shards so that each worker holds about as many items per thread as the others.

        A search takes as long as its busiest worker: with 16 shards placed
        9/7 by the scheduler, two workers could not be faster than 16/9 of
        one. A shard moves by a task on the receiving worker that returns
        it (its codes travel, not the floats it was encoded from); Dask
        keeps the lineage, so a moved shard is rebuilt as before if lost.
        """
        threads = client.nthreads()
        groups = self._placement(client)
        if len(threads) < 2 or None in groups:
            return  # nowhere to move to, or a shard is not in memory yet
        owner = {i: worker for worker, group in groups.items() for i in group}
        sizes = self.shard_sizes_
        load = {w: sum(int(sizes[i]) for i in groups.get(w, ())) for w in threads}
        for _ in range(len(self.shards_)):
            per_thread = {w: load[w] / threads[w] for w in threads}
            src = max(per_thread, key=lambda w: (per_thread[w], w))
            dst = min(per_thread, key=lambda w: (per_thread[w], w))
            gap = per_thread[src] - per_thread[dst]
            weight = 1 / threads[src] + 1 / threads[dst]
            # the move of n items leaves a gap of |gap - n * weight|; take the smallest
            best = min((i for i, w in owner.items() if w == src and sizes[i] * weight < 2 * gap),
                       key=lambda i: (abs(gap - sizes[i] * weight), i), default=None)
            if best is None:
                break
            owner[best] = dst
            load[src] -= int(sizes[best])
            load[dst] += int(sizes[best])
        moved = {i: client.submit(_moved, self.shards_[i], workers=[worker],
                                  allow_other_workers=True, pure=False)
                 for i, worker in owner.items() if i not in groups.get(worker, ())}
        if not moved:
            return
        wait(list(moved.values()))
        for i, future in moved.items():
            if future.status == "finished":  # else the shard stays where it was
                self.shards_[i] = future

    @staticmethod
    def _pinned(worker):
        """Task placement on the worker holding the shards (elsewhere only if it is gone)."""
        if worker is None:
            return {}
        return {"workers": [worker], "allow_other_workers": True}

    def _lost_shards(self):
        # "lost" or "pending": Dask is recomputing the shard from its graph (the
        # retry waits for it); "cancelled": it could not (its inputs are gone).
        return [i for i, future in enumerate(self.shards_)
                if future.status in ("error", "cancelled")]

    def _describe(self, shards):
        return ", ".join(f"{i} (items {self.shard_offsets_[i]}.."
                         f"{self.shard_offsets_[i] + self.shard_sizes_[i] - 1})" for i in shards)

    def _recover(self, client, exc, reraise, reloaded, what="The search"):
        """After a failed call: reload lost shards from their saved copies, or raise.

        Shards that are lost (or failed to be rebuilt) without a saved copy,
        or whose reload already failed: a RuntimeError naming them. No lost
        shard: ``exc`` again when ``reraise`` (an error of the call itself),
        else nothing (a worker was lost; the caller retries). A saved copy
        is reloaded only if it is still the one this index wrote
        (``_load_shard`` checks its uuid): another save there may have
        written other items or other removals.
        """
        lost = self._lost_shards()
        if not lost:
            if reraise:
                raise exc
            return
        unsaved = [i for i in lost if self._saved_dirs[i] is None]
        if unsaved:
            raise RuntimeError(
                f"{what} lost shard(s) {self._describe(unsaved)} with their worker, and "
                f"they have no saved copy to reload (nor a graph Dask could recompute them "
                f"from); no answer is returned rather than one from the other shards. "
                f"Fit again, or save() the index so that lost shards can be reloaded."
            ) from exc
        failed = [i for i in lost if i in reloaded]
        if failed:
            raise RuntimeError(
                f"{what} lost shard(s) {self._describe(failed)}, and reloading them from "
                f"their saved copies ({', '.join(self._saved_dirs[i] for i in failed)}) "
                f"failed: {exc}. No answer is returned rather than one from the other shards."
            ) from exc
        name = type(self.searcher_).__name__
        for i in lost:
            shard = client.submit(_load_shard, name, self._saved_dirs[i], None,
                                  self._saved_uuids[i], pure=False)
            for local in self._pending_removals[i]:  # made since the copy was saved
                shard = client.submit(_shard_with_removed, shard, local, True, pure=False)
            self.shards_[i] = shard
            reloaded.add(i)

    def kneighbors(self, X, n_neighbors=None, return_distance=True, *, allowed=None,
                   **search_params):
        """Find the nearest database items of each query, over all the shards.

        Parameters
        ----------
        X : dask array or array-like of shape (n_queries, n_features)
            Query vectors. A numpy array (or array-like) is searched now; a
            dask array (chunked by rows) gives dask arrays, computed block of
            queries by block of queries when they are computed.
        n_neighbors : int, default=None
            Neighbours per query; ``None`` uses the constructor's value.
        return_distance : bool, default=True
            Whether to return the distances.
        allowed : array-like of bool of shape (n_samples_fit,) or of int, default=None
            Restricts the search to these items (a boolean mask over the
            global indices, or the indices), as the single-process
            ``kneighbors`` does: each shard's kernels test its part of the
            mask while they scan; IVF shards probe with the cells' allowed
            counts over the whole index (one more round trip to count them).
            ``None``: every item.
        **search_params
            Per-call search settings of the template searcher
            (:class:`~sklearn_hash.IVFQuantizedNeighbors`: ``n_probe``);
            ``None`` means the template's value.

        Returns
        -------
        neigh_dist : ndarray or dask array of shape (n_queries, n_neighbors)
            Distances, ascending, as the single-process searcher returns them
            (Hamming: int32 bit counts; product codes: float64 estimated L2
            distances; with ``refine_factor``, float64 L2 distances to the
            rows). Only with ``return_distance=True``.
        neigh_ind : ndarray or dask array of shape (n_queries, n_neighbors), dtype=int64
            Global indices of the neighbours; equal distances in ascending
            index order.
        """
        check_is_fitted(self)
        client = self._get_client()
        params = self.searcher_._check_search_params(search_params)
        refine = params.pop("refine_factor", None)
        if refine is not None:
            self.searcher_._check_kept_rows(refine)
        # its type and sign before X, as one process checks them
        n_neighbors = self._check_n_neighbors(n_neighbors, None, bounded=False)
        dtype = self._distance_dtype()
        if isinstance(X, da.Array):
            return self._kneighbors_dask(client, X, n_neighbors, return_distance, params, dtype,
                                         refine, allowed)
        X = check_array(X, dtype=[np.float64, np.float32], order="C")
        self._check_n_features(X.shape[1], fitting=False)
        k = self._check_n_neighbors(n_neighbors, X.shape[0],
                                    bounded=allowed is None and not len(self._removed))
        mask, n_allowed, cell_sizes = self._allowed(client, allowed, k)
        if refine is None:
            parts = self._on_workers(client, _search_shards, X, k, params, cell_sizes, dtype,
                                     None, mask)
            distances, indices = _merge(parts, k)
        else:  # the candidates of one process, each scored by its shard's rows: the best k
            n_candidates = min(k * refine, n_allowed)
            parts = self._on_workers(client, _search_refined_shards, X, n_candidates, params,
                                     cell_sizes, dtype, None, mask)
            distances, indices = _best_of_merged(_merge(parts, n_candidates), k)
        return (distances, indices) if return_distance else indices

    def _allowed(self, client, allowed, k=None):
        """The search's restriction: (global uint8 mask or None, items allowed, IVF cell sizes).

        With ``k`` (kneighbors), refuses in the single-process wording a mask
        that allows no item or fewer than the k asked for. The cell sizes
        (IVF) count the allowed items of each cell over all the shards. The
        mask is a copy: a lazy search reads it when computed.
        """
        if allowed is None:  # the live items: each shard masks its removed ones
            n_live = self.n_samples_fit_ - len(self._removed)
            if k is not None and k > n_live:
                raise ValueError(
                    f"Expected n_neighbors <= the number of searchable items, but "
                    f"n_neighbors = {k} and only {n_live} live items remain.")
            return None, n_live, self._cell_sizes
        mask = np.array(allowed_mask(allowed, self.n_samples_fit_), dtype=np.uint8, copy=True)
        mask[self._removed] = 0
        n_allowed = int(np.count_nonzero(mask))
        if k is not None and n_allowed == 0:
            raise ValueError("allowed selects no live item; at least one is needed.")
        if k is not None and k > n_allowed:
            raise ValueError(
                f"Expected n_neighbors <= the number of searchable items, but n_neighbors = "
                f"{k} and only {n_allowed} live items are allowed.")
        cell_sizes = None
        if self._cell_sizes is not None:
            cell_sizes = sum(self._on_workers(client, _allowed_cell_counts, mask))
        return mask, n_allowed, cell_sizes

    def _on_workers(self, client, task, X, *args):
        """``task(shards, offsets, X, *args)`` on each worker over the shards it holds.

        The queries are sent once to each worker that searches; a lost
        worker or shard is recovered as :meth:`_retrying` says.
        """
        def run():
            groups = self._placement(client)
            workers = [w for w in groups if w is not None]
            queries = client.scatter(X, workers=workers or None, broadcast=True, hash=False)
            futures = [
                client.submit(task, [self.shards_[i] for i in group],
                              self.shard_offsets_[group], queries, *args, pure=False,
                              **self._pinned(worker))
                for worker, group in groups.items()
            ]
            return client.gather(futures)

        return self._retrying(client, run, "The search")

    def _retrying(self, client, run, what):
        """``run()``, run again after a lost worker or shard, up to ``_ATTEMPTS`` times in all.

        Between the attempts, lost shards are rebuilt by Dask or reloaded
        from their saved copies (:meth:`_recover`). ``run`` must change
        nothing before it returns: an attempt that fails is simply dropped.
        The result of a whole ``run``, or an error: never an answer from the
        surviving shards alone. ``what`` names the call in the errors.
        """
        reloaded = set()
        for attempt in range(_ATTEMPTS):
            try:
                return run()
            except Exception as exc:  # a lost worker or shard, or an error of the call
                transient = isinstance(exc, _TRANSIENT)
                self._recover(client, exc, not transient or attempt == _ATTEMPTS - 1, reloaded,
                              what)
                if attempt == _ATTEMPTS - 1:
                    raise RuntimeError(
                        f"{what} failed {_ATTEMPTS} times as workers were lost; the last "
                        f"error: {exc!r}."
                    ) from exc
                time.sleep(_RETRY_PAUSE)  # let the scheduler see the loss
                try:  # then let it rebuild what it can
                    wait(self.shards_, timeout=_REBUILD_TIMEOUT)
                except TimeoutError:
                    pass
        raise AssertionError("unreachable")  # every attempt returns or raises

    def radius_neighbors(self, X, radius=None, return_distance=True, sort_results=False,
                         *, allowed=None, **search_params):
        """Every database item within ``radius`` of each query, over all the shards.

        The answers of the single-process searcher (see :meth:`to_local`):
        each shard runs its range scan, and the balls are joined by global
        index. With ``refine_factor`` (the template's, or this call's) each
        shard keeps the matches of its widened scan whose rows lie within
        ``radius``, as one process does (see
        :meth:`~sklearn_hash.QuantizedNeighbors.radius_neighbors`).

        Parameters
        ----------
        X : array-like or dask array of shape (n_queries, n_features)
            Query vectors (a dask array is computed first: the balls come
            back as object arrays).
        radius : float, default=None
            Range, in the units of the distances (bits for Hamming, L2 for
            product codes); ``None`` uses the template's ``radius``.
        return_distance : bool, default=True
            Whether to return the distances.
        sort_results : bool, default=False
            Sort each query's items by distance (ties by index); otherwise
            they come in ascending index order. Needs ``return_distance``.
        allowed : array-like, default=None
            Restricts the search as in :meth:`kneighbors`.
        **search_params
            Per-call search settings of the template searcher, as in
            :meth:`kneighbors`.

        Returns
        -------
        neigh_dist : ndarray of shape (n_queries,), dtype=object
            One array of distances per query (int32 bits for Hamming,
            float64 L2 otherwise). Only with ``return_distance=True``.
        neigh_ind : ndarray of shape (n_queries,), dtype=object
            One int64 array of global indices per query.
        """
        check_is_fitted(self)
        client = self._get_client()
        template = self.searcher_
        params = template._check_search_params(search_params, "radius_neighbors")
        hamming = template._hamming()
        refine = template._radius_refine(params, search_params)
        if sort_results and not return_distance:
            raise ValueError("return_distance must be True if sort_results is True.")
        radius = template.radius if radius is None else radius
        if (not isinstance(radius, Real) or isinstance(radius, bool)
                or not np.isfinite(radius) or radius < 0):
            raise ValueError(f"radius must be a finite number >= 0; got {radius!r}.")
        if isinstance(X, da.Array):
            X = X.compute()
        X = check_array(X, dtype=[np.float64, np.float32], order="C")
        self._check_n_features(X.shape[1], fitting=False)
        # With re-ranking, the codes' range widens to sqrt(refine) * radius (as in one
        # process) and each shard keeps the items whose rows lie within radius.
        reach = float(radius) if refine is None else float(radius) * float(np.sqrt(refine))
        # The multi-index's walk passes over cells with no allowed item: the counts matter.
        mask, _, cell_sizes = self._allowed(client, allowed)
        parts = self._on_workers(client, _radius_shards, X, template._threshold(reach),
                                 params, cell_sizes, hamming,
                                 None if refine is None else float(radius), mask)
        offsets, distances, indices = _join_balls(
            [np.repeat(np.arange(len(X)), np.diff(o)) for o, _, _ in parts],
            [d for _, d, _ in parts], [i for _, _, i in parts], len(X),
            np.int32 if hamming else np.float32 if refine is None else np.float64)
        if not hamming and refine is None:  # the rows' distances are L2 already
            distances = np.sqrt(np.maximum(distances, 0, dtype=np.float64))
        neigh_dist = np.empty(len(X), dtype=object)
        neigh_ind = np.empty(len(X), dtype=object)
        fill_balls(neigh_dist, neigh_ind, 0, offsets, distances, indices, sort_results)
        return (neigh_dist, neigh_ind) if return_distance else neigh_ind

    def _kneighbors_dask(self, client, X, n_neighbors, return_distance, params, dtype, refine,
                         allowed):
        _check_row_chunked(X)
        self._check_n_features(X.shape[1], fitting=False)
        k = self._check_n_neighbors(n_neighbors, X.shape[0],
                                    bounded=allowed is None and not len(self._removed))
        mask, n_allowed, cell_sizes = self._allowed(client, allowed, k)
        n_candidates = k if refine is None else min(k * refine, n_allowed)
        if mask is not None:
            mask = dask.delayed(mask)  # one node of the graph, shared by its tasks
        groups = self._placement(client)
        # Blocks of queries run side by side in a worker's threads: their
        # kernels share the threads rather than each taking all of them.
        threads = client.nthreads()
        n_blocks = len(X.chunks[0])
        task = _search_shards if refine is None else _search_refined_shards
        distances, indices = [], []
        for block, n_rows in zip(X.to_delayed().ravel(), X.chunks[0]):
            parts = []
            for worker, group in groups.items():
                n_threads = None if worker is None else max(1, threads[worker] // n_blocks)
                with dask.annotate(**self._pinned(worker)):
                    parts.append(dask.delayed(task, pure=True)(
                        [self.shards_[i] for i in group], self.shard_offsets_[group], block,
                        n_candidates, params, cell_sizes, dtype, n_threads, mask))
            merged = dask.delayed(_merge_parts, pure=True)(parts, n_candidates)
            if refine is not None:
                merged = dask.delayed(_best_of_merged, pure=True)(merged, k)
            distances.append(da.from_delayed(merged[0], shape=(n_rows, k),
                                             dtype=dtype if refine is None else np.float64))
            indices.append(da.from_delayed(merged[1], shape=(n_rows, k), dtype=np.int64))
        indices = da.concatenate(indices)
        if not return_distance:
            return indices
        return da.concatenate(distances), indices

    def kneighbors_graph(self, X, n_neighbors=None, mode="connectivity", *, allowed=None,
                         **search_params):
        """Sparse graph of the k nearest items of each query, over all the shards.

        Parameters
        ----------
        X : array-like or dask array of shape (n_queries, n_features)
            Query vectors (a dask array is computed first).
        n_neighbors : int, default=None
            Neighbours per query; ``None`` uses the constructor's value.
        mode : {"connectivity", "distance"}, default="connectivity"
            Entries of ones, or the distances (float64; Hamming in bits).
        allowed : array-like, default=None
            Restricts the search as in :meth:`kneighbors`.
        **search_params
            Per-call search settings, as in :meth:`kneighbors`.

        Returns
        -------
        A : sparse matrix of shape (n_queries, n_samples_fit)
            CSR matrix, that of the single-process searcher.
        """
        check_is_fitted(self)
        if isinstance(X, da.Array):
            X = X.compute()
        return kneighbors_graph_of(self, X, n_neighbors, mode, allowed=allowed,
                                   **search_params)

    def radius_neighbors_graph(self, X, radius=None, mode="connectivity", sort_results=False,
                               *, allowed=None, **search_params):
        """Sparse graph of the items within ``radius`` of each query, over all the shards.

        Parameters
        ----------
        X : array-like or dask array of shape (n_queries, n_features)
            Query vectors (a dask array is computed first).
        radius : float, default=None
            Range; ``None`` uses the template's ``radius``.
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
            CSR matrix, that of the single-process searcher.
        """
        check_is_fitted(self)
        return radius_neighbors_graph_of(self, X, radius, mode, sort_results, allowed=allowed,
                                         **search_params)

    def score(self, X, y):
        """mAP@R of the queries X against the database, with R = n_neighbors.

        The same number as the single-process searcher's ``score``: the
        labels of the retrieved items are fetched from their shards.

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
        if not self._has_labels:
            raise ValueError(
                f"score needs the labels of the database: fit {type(self).__name__} with y."
            )
        if isinstance(X, da.Array):
            X = X.compute()
        if isinstance(y, da.Array):
            y = y.compute()
        indices = self.kneighbors(X, return_distance=False)
        wanted, positions = np.unique(indices, return_inverse=True)
        client = self._get_client()

        def run():
            pieces = []
            for i, future in enumerate(self.shards_):
                lo, hi = self.shard_offsets_[i], self.shard_offsets_[i] + self.shard_sizes_[i]
                local = wanted[(wanted >= lo) & (wanted < hi)] - lo
                if local.size:
                    pieces.append(client.submit(_shard_labels, future, local, pure=False))
            return client.gather(pieces)

        labels = np.concatenate(self._retrying(client, run, "score()"))
        return map_at_r_score(y, labels, positions.reshape(indices.shape))

    # ------------------------------------------------------------- gathering
    def to_local(self):
        """Gather the shards into one single-process searcher (for small indexes and tests).

        Returns
        -------
        searcher : QuantizedNeighbors or IVFQuantizedNeighbors
            A searcher with the fitted quantizer of :attr:`searcher_` and all
            the codes (and labels), items numbered as here, and this index's
            ``n_neighbors``: it answers ``kneighbors`` as this index does.
        """
        check_is_fitted(self)
        client = self._get_client()
        contents = self._retrying(client, lambda: client.gather(
            [client.submit(_shard_contents, f, pure=False) for f in self.shards_]),
            "to_local()")
        local = copy.deepcopy(self.searcher_)
        local.n_neighbors = self.n_neighbors
        labels = None
        if self._has_labels:
            labels = np.concatenate([lab for _, lab in contents])
        local._start_index(labels)
        for (arrays, _), offset in zip(contents, self.shard_offsets_):
            arrays = dict(arrays)
            vectors = arrays.pop("vectors", None)
            if "ids" in arrays:  # inverted lists: local ids become global ones
                arrays["ids"] = arrays["ids"] + offset
            local._index.add_segment(arrays)
            if vectors is not None:
                local._vectors.append(vectors)
        if labels is not None:
            local._append_labels(labels)
        local.n_samples_fit_ = self.n_samples_fit_
        local._after_load()
        if len(self._removed):
            local.remove(self._removed)
        return local

    def _nbytes_per_worker(self):
        """Bytes of codes, ids, labels and re-ranking rows that each worker holds (shards as
        placed now; rows memory-mapped from a saved index not counted)."""
        client = self._get_client()
        who = client.who_has(self.shards_)
        held = {}
        for future, nbytes in zip(self.shards_, self._shard_bytes):
            for worker in who.get(future.key) or ():
                held[worker] = held.get(worker, 0) + nbytes
        return held

    # ------------------------------------------------------------ persistence
    def save(self, path):
        """Save the index: one directory per shard, written by its worker, and a manifest.

        Each shard is saved by the worker holding it, with the single-process
        ``save`` (JSON and ``.npy`` files, no pickle) into ``shard-NNNNN``;
        the fitted template goes to ``template`` and ``dask_index.json``
        (offsets, sizes and directories of the shards) is written last, by an
        atomic rename. Saving onto the directory of an earlier save writes
        the shards again incrementally (a shard saved there before only
        rewrites its small state; a compacted one is written in full) and
        deletes the directories of shards it no longer has. A lost shard is
        reloaded from here.

        Parameters
        ----------
        path : str or os.PathLike
            Directory, visible to the driver and every worker; created if
            missing. An existing directory must hold a saved
            DaskQuantizedNeighbors (or be empty).

        Returns
        -------
        path : pathlib.Path
            The directory.
        """
        check_is_fitted(self)
        client = self._get_client()
        path = Path(path).resolve()
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path} exists and is not a directory; cannot save an index "
                             f"there.")
        if path.is_dir() and any(path.iterdir()) and not (path / _MANIFEST).is_file():
            raise ValueError(f"{path} is a non-empty directory without {_MANIFEST}: not an "
                             f"index written by DaskQuantizedNeighbors.save; refusing to write "
                             f"into it. Choose a new or empty directory.")
        path.mkdir(parents=True, exist_ok=True)
        names = [f"shard-{i:05d}" for i in range(len(self.shards_))]
        dirs = [str(path / name) for name in names]

        def run():
            saves = [client.submit(_save_shard, f, d, pure=False)
                     for f, d in zip(self.shards_, dirs)]
            try:
                return client.gather(saves)
            finally:  # even if another shard's save failed:
                try:  # the others run on: wait for them (they may write their copies)
                    wait(saves, timeout=_REBUILD_TIMEOUT)
                except TimeoutError:
                    pass
                for i, future in enumerate(saves):
                    # a shard saved over its own copy: that copy now holds all its
                    # removals, under a new uuid; a lost worker reloads it as it is
                    if future.status == "finished" and self._saved_dirs[i] == dirs[i]:
                        self._saved_uuids[i] = future.result()
                        self._pending_removals[i] = []

        uuids = self._retrying(client, run, "save()")
        self.searcher_.save(path / "template")
        manifest = {
            "format": _FORMAT,
            "kind": "sklearn_hash.dask.DaskQuantizedNeighbors",
            "sklearn_hash_version": __version__,
            "uuid": uuid.uuid4().hex,
            "searcher_class": type(self.searcher_).__name__,
            "params": {
                "n_neighbors": int(self.n_neighbors),
                "max_train_samples": int(self.max_train_samples),
                "random_state": (int(self.random_state)
                                 if isinstance(self.random_state, Integral) else None),
            },
            "n_samples": int(self.n_samples_fit_),
            "n_features": int(self.n_features_in_),
            "labels": bool(self._has_labels),
            "template": "template",
            "shards": [{"dir": name, "offset": int(o), "size": int(n)}
                       for name, o, n in zip(names, self.shard_offsets_, self.shard_sizes_)],
        }
        tmp = path / f"{_MANIFEST}.tmp-{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, path / _MANIFEST)
        for old in path.glob("shard-*"):  # of an earlier save with more shards (compact)
            if re.fullmatch(r"shard-\d{5,}", old.name) and old.name not in names:
                shutil.rmtree(old)
        self._saved_dirs = dirs
        self._saved_uuids = uuids
        self._pending_removals = [[] for _ in names]  # the saved copies hold them
        return path

    @classmethod
    def load(cls, path, client=None, *, mmap_mode=None):
        """Load an index written by :meth:`save`: each worker loads shards into its memory.

        Parameters
        ----------
        path : str or os.PathLike
            Directory written by :meth:`save`, visible to every worker.
        client : distributed.Client, default=None
            The cluster's client; ``None`` uses the default client.
        mmap_mode : {"r", "c", None}, default=None
            How workers read the codes (see ``QuantizedNeighbors.load``):
            ``None`` reads them into the workers' memory, ``"r"`` maps the
            files.

        Returns
        -------
        searcher : DaskQuantizedNeighbors
            The fitted index; its shards are spread over the workers in turn.
        """
        path = Path(path).resolve()
        file = path / _MANIFEST
        if not file.is_file():
            raise ValueError(f"{file} not found: {path} is not an index written by "
                             f"DaskQuantizedNeighbors.save.")
        manifest = read_json_manifest(file, "a DaskQuantizedNeighbors")
        if manifest["format"] > _FORMAT:
            raise ValueError(f"{file} has format {manifest['format']}, written by a newer "
                             f"sklearn_hash; this version reads format {_FORMAT} at most.")
        name = manifest.get("searcher_class")
        if name not in _SEARCHERS:
            raise ValueError(f"{file} names a searcher class {name!r}, not one of "
                             f"{sorted(_SEARCHERS)}.")
        template = _SEARCHERS[name].load(path / manifest["template"], mmap_mode=None)
        params = manifest["params"]
        search = cls(clone(template), n_neighbors=params["n_neighbors"],
                     max_train_samples=params["max_train_samples"], client=client,
                     random_state=params["random_state"])
        client = search._get_client()
        search._client = client
        search.searcher_ = template
        search.n_features_in_ = manifest["n_features"]
        search._has_labels = bool(manifest["labels"])
        search._reset_shards()
        workers = sorted(client.nthreads())
        shards, dirs, uuids = [], [], []
        for i, entry in enumerate(manifest["shards"]):
            shard_dir = str(path / entry["dir"])
            # Dask reloads a lost shard by this task again: only if that save is still there.
            uuids.append(read_manifest(shard_dir).get("uuid"))
            where = ({"workers": [workers[i % len(workers)]], "allow_other_workers": True}
                     if workers else {})
            shards.append(client.submit(_load_shard, name, shard_dir, mmap_mode, uuids[-1],
                                        pure=False, **where))
            dirs.append(shard_dir)
        infos = client.gather(client.map(_shard_info, shards, pure=False))
        for entry, info in zip(manifest["shards"], infos):
            if info[0] != entry["size"]:
                raise ValueError(f"{path / entry['dir']} holds {info[0]} items; {file} "
                                 f"declares {entry['size']}. The index directory is damaged.")
        search._register(shards, infos)
        offsets = [entry["offset"] for entry in manifest["shards"]]
        if list(search.shard_offsets_) != offsets or search.n_samples_fit_ != \
                manifest["n_samples"]:
            raise ValueError(f"{file}: the shards' offsets and sizes do not add up to its "
                             f"{manifest['n_samples']} items; the index directory is damaged.")
        search._saved_dirs = dirs
        search._saved_uuids = uuids
        search._balance(client)
        return search
