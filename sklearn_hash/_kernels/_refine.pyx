"""Re-ranking of candidates by L2 distance to stored vectors.

``refine_kneighbors`` reads float32 vectors (exact distances),
``refine_sq8_kneighbors`` 8-bit scalar-quantized ones (each feature's byte
scaled and shifted, plus the centroid of the item's cell where rows carry
one). The rows of an index are stored in chunks (the segments of a loaded
index, memory-mapped, then the rows added since); chunk c holds the
database indices ``chunk_starts[c]:chunk_starts[c + 1]`` at address
``chunk_ptrs[c]``. Each query's candidates are scored with the squared L2
distance accumulated in double precision, in feature order, so a result
never depends on the thread count or on the other queries, and the k best
are returned by (distance, index).
"""

from cython.parallel cimport parallel, prange
from libc.math cimport NAN, sqrt
from libc.stdlib cimport free, malloc


from libc.stdint cimport int32_t, int64_t, intptr_t, uint8_t
from libc.string cimport memcpy


cdef extern from *:
    void __builtin_prefetch(const void* p) noexcept nogil

import numpy as np


cdef enum:
    GROUP = 8  # candidates scored side by side


cdef inline bint _before(double da, int64_t ia, double db, int64_t ib) noexcept nogil:
    """Whether (da, ia) ranks before (db, ib)."""
    return da < db or (da == db and ia < ib)


cdef inline Py_ssize_t _insert(double* hd, int64_t* hi, Py_ssize_t size, Py_ssize_t k,
                               double d, int64_t idx) noexcept nogil:
    """Insert (d, idx) into the sorted top k of hd/hi holding size items; the new size.

    k is small (tens to hundreds): insertion beats a heap here.
    """
    cdef Py_ssize_t pos
    if size == k and not _before(d, idx, hd[k - 1], hi[k - 1]):
        return size
    pos = size if size < k else k - 1
    while pos > 0 and _before(d, idx, hd[pos - 1], hi[pos - 1]):
        hd[pos] = hd[pos - 1]
        hi[pos] = hi[pos - 1]
        pos = pos - 1
    hd[pos] = d
    hi[pos] = idx
    return size + 1 if size < k else size


cdef inline Py_ssize_t _chunk_of(const int64_t* starts, Py_ssize_t n_chunks,
                                 int64_t index) noexcept nogil:
    """The chunk holding a database index (binary search over the starts)."""
    cdef Py_ssize_t lo = 0, hi = n_chunks - 1, mid
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if starts[mid] <= index:
            lo = mid
        else:
            hi = mid - 1
    return lo


cdef enum:
    FLOAT32 = 0  # rows of n_features float32
    SQ8 = 1      # rows of n_features bytes (+ an int32 cell)


cdef struct RowFormat:
    int kind
    Py_ssize_t row_bytes
    Py_ssize_t n_features
    # SQ8 only: feature j is (scale[j] * byte + offset[j]) + centroids[cell, j].
    const double* scale
    const double* offset
    const double* centroids
    Py_ssize_t n_cells
    bint with_cells


cdef inline void _prefetch_row(const RowFormat* fmt, int64_t idx, const int64_t* st,
                               const intptr_t* ptrs, Py_ssize_t n_chunks) noexcept nogil:
    """Ask for the cache lines of candidate idx's row (-1: none)."""
    cdef Py_ssize_t ch, j
    cdef const uint8_t* row
    if idx < 0:
        return
    ch = _chunk_of(st, n_chunks, idx)
    row = (<const uint8_t*> ptrs[ch]) + (idx - st[ch]) * fmt.row_bytes
    for j in range(0, fmt.row_bytes, 64):
        __builtin_prefetch(row + j)


cdef Py_ssize_t _rerank_query(
    const RowFormat* fmt,
    const double* query,        # IN (n_features,)
    const int64_t* cand,        # IN (n_cand,)
    Py_ssize_t n_cand,
    const int64_t* st,          # IN (n_chunks + 1,)
    const intptr_t* ptrs,       # IN (n_chunks,)
    Py_ssize_t n_chunks,
    Py_ssize_t k,
    double* hd,                 # OUT (k,) distances, ascending
    int64_t* hi,                # OUT (k,) indices
    const uint8_t** rows,       # scratch (GROUP,)
    const double** cents,       # scratch (GROUP,)
    int64_t* ids,               # scratch (GROUP,)
    double* acc,                # scratch (GROUP,)
    int64_t* slot,              # scratch (GROUP,)
    int* bad_cell,              # OUT set to 1 on a cell outside the centroids
    double* all_out,            # OUT (n_cand,) every candidate's distance, or NULL
    bint squared,               # IN all_out gets squared distances (the sums ranked)
) noexcept nogil:
    """One query's candidates scored and the k best kept; the number kept.

    GROUP candidates at a time: their rows fetched together and their sums
    accumulated side by side, each in feature order (double precision).
    With ``all_out``, every candidate's distance is written there instead,
    in candidate order (k unused; a -1 candidate gets NaN), or its squared
    distance with ``squared``: the sum the k best are ranked by.
    """
    cdef Py_ssize_t size = 0, c = 0, nb, b, j, ch
    cdef Py_ssize_t n_features = fmt.n_features
    cdef int64_t idx
    cdef int32_t cell
    cdef double diff
    # Rows are asked for GROUP candidates ahead of their use, so that a group's
    # misses overlap the previous group's sums.
    for c in range(min(GROUP, n_cand)):
        _prefetch_row(fmt, cand[c], st, ptrs, n_chunks)
    c = 0
    while c < n_cand:
        nb = 0
        while c < n_cand and nb < GROUP:
            idx = cand[c]
            if c + GROUP < n_cand:
                _prefetch_row(fmt, cand[c + GROUP], st, ptrs, n_chunks)
            c = c + 1
            if idx < 0:
                if all_out != NULL:
                    all_out[c - 1] = NAN
                continue
            ch = _chunk_of(st, n_chunks, idx)
            rows[nb] = (<const uint8_t*> ptrs[ch]) + (idx - st[ch]) * fmt.row_bytes
            if fmt.kind == SQ8:
                cell = 0
                if fmt.with_cells:
                    memcpy(&cell, rows[nb] + n_features, 4)
                    if cell < 0 or cell >= fmt.n_cells:
                        bad_cell[0] = 1
                        cell = 0
                cents[nb] = fmt.centroids + cell * n_features
            ids[nb] = idx
            slot[nb] = c - 1
            nb = nb + 1
        for b in range(nb):
            acc[b] = 0.0
        if fmt.kind == FLOAT32:
            for j in range(n_features):
                for b in range(nb):
                    diff = <double> (<const float*> rows[b])[j] - query[j]
                    acc[b] = acc[b] + diff * diff
        else:
            for j in range(n_features):
                for b in range(nb):
                    diff = (fmt.scale[j] * rows[b][j] + fmt.offset[j]) + cents[b][j] - query[j]
                    acc[b] = acc[b] + diff * diff
        if all_out != NULL:
            for b in range(nb):
                all_out[slot[b]] = acc[b] if squared else sqrt(acc[b])
            continue
        for b in range(nb):
            size = _insert(hd, hi, size, k, acc[b], ids[b])
    for c in range(size):
        hd[c] = sqrt(hd[c])
    return size


cdef RowFormat _float32_rows(Py_ssize_t n_features):
    """The format of float32 rows of n_features."""
    cdef RowFormat fmt
    fmt.kind = FLOAT32
    fmt.n_features = n_features
    fmt.row_bytes = 4 * n_features
    fmt.scale = fmt.offset = fmt.centroids = NULL
    fmt.n_cells = 0
    fmt.with_cells = False
    return fmt


cdef RowFormat _sq8_rows(Py_ssize_t n_features, const double[::1] scale,
                         const double[::1] offset, const double[:, ::1] centroids,
                         bint with_cells) except *:
    """The format of 8-bit rows, after checking the arrays that decode them."""
    if scale.shape[0] != n_features or offset.shape[0] != n_features:
        raise ValueError("scale and offset need one value per feature.")
    if centroids.shape[0] < 1 or centroids.shape[1] != n_features:
        raise ValueError("centroids must be (n_cells >= 1, n_features).")
    cdef RowFormat fmt
    fmt.kind = SQ8
    fmt.n_features = n_features
    fmt.row_bytes = n_features + (4 if with_cells else 0)
    fmt.scale = &scale[0] if n_features else NULL
    fmt.offset = &offset[0] if n_features else NULL
    fmt.centroids = &centroids[0, 0] if n_features else NULL
    fmt.n_cells = centroids.shape[0]
    fmt.with_cells = with_cells
    return fmt


cdef _rerank(RowFormat fmt, const double[:, ::1] queries, const int64_t[:, ::1] candidates,
             const int64_t[::1] chunk_starts, const intptr_t[::1] chunk_ptrs, Py_ssize_t k,
             int n_threads, const int64_t[::1] offsets=None, bint squared=False):
    """Both kernels' search over checked inputs: (distances, indices).

    With ``offsets``: every distance of the candidates ``candidates[0,
    offsets[q]:offsets[q + 1]]`` of each query q instead, flat (float64;
    squared with ``squared``).
    """
    cdef Py_ssize_t n_queries = queries.shape[0]
    cdef Py_ssize_t n_cand = candidates.shape[1]
    cdef Py_ssize_t n_chunks = chunk_ptrs.shape[0]
    cdef bint every = offsets is not None
    if every:
        distances = np.empty(n_cand, dtype=np.float64)
        indices = np.empty((0, 0), dtype=np.int64)
        k = 0
    else:
        distances = np.full((n_queries, k), np.inf)
        indices = np.full((n_queries, k), -1, dtype=np.int64)
    if n_queries == 0 or (k == 0 and not every) or (every and n_cand == 0):
        return distances, indices
    cdef double[:, ::1] out_d = distances if not every else np.empty((1, 1))
    cdef int64_t[:, ::1] out_i = indices if not every else np.empty((1, 1), dtype=np.int64)
    cdef double[::1] out_all = distances if every else np.empty(1)
    cdef Py_ssize_t q
    cdef const uint8_t** rows
    cdef const double** cents
    cdef int64_t* ids
    cdef int64_t* slot
    cdef double* acc
    cdef int failed = 0
    cdef bint ok  # per thread: its buffers were allocated
    cdef int bad_cell = 0
    cdef int* failed_flag = &failed
    cdef int* bad_flag = &bad_cell

    with nogil, parallel(num_threads=n_threads):
        # Per-thread buffers (arrays declared outside would be shared).
        rows = <const uint8_t**> malloc(GROUP * sizeof(uint8_t*))
        cents = <const double**> malloc(GROUP * sizeof(double*))
        ids = <int64_t*> malloc(GROUP * sizeof(int64_t))
        acc = <double*> malloc(GROUP * sizeof(double))
        slot = <int64_t*> malloc(GROUP * sizeof(int64_t))
        # All threads must meet the loop (OpenMP); one without buffers skips its turns.
        ok = not (rows == NULL or cents == NULL or ids == NULL or acc == NULL or slot == NULL)
        if not ok:
            failed_flag[0] = 1
        if every:  # any number of candidates per query: threads take queries as they go
            for q in prange(n_queries, schedule="dynamic"):
                if ok and offsets[q + 1] > offsets[q]:
                    _rerank_query(&fmt, &queries[q, 0], &candidates[0, offsets[q]],
                                  offsets[q + 1] - offsets[q], &chunk_starts[0],
                                  &chunk_ptrs[0], n_chunks, 0, NULL, NULL, rows, cents, ids,
                                  acc, slot, bad_flag, &out_all[offsets[q]], squared)
        else:
            for q in prange(n_queries, schedule="static"):
                if ok:
                    _rerank_query(&fmt, &queries[q, 0], &candidates[q, 0], n_cand,
                                  &chunk_starts[0], &chunk_ptrs[0], n_chunks, k,
                                  &out_d[q, 0], &out_i[q, 0], rows, cents, ids, acc, slot,
                                  bad_flag, NULL, False)
        free(rows)
        free(cents)
        free(ids)
        free(acc)
        free(slot)
    if failed:
        raise MemoryError("could not allocate the re-ranking buffers.")
    if bad_cell:
        raise ValueError(f"a stored row names a cell outside [0, {fmt.n_cells}): the rows are "
                         f"not those of this index.")
    return distances, indices


def _check_inputs(n_queries, candidates, chunk_starts, chunk_ptrs, k, n_threads, full):
    """The checks both kernels make before touching memory.

    ``full=False`` (a caller whose chunk table and candidates come from its
    own index) keeps the checks that cost O(1): shapes, k and n_threads.
    """
    starts = np.asarray(chunk_starts)
    n_chunks = np.asarray(chunk_ptrs).shape[0]
    n_cand = candidates.shape[1]
    if candidates.shape[0] != n_queries:
        raise ValueError("candidates must have one row per query.")
    if k < 0 or k > n_cand:
        raise ValueError(f"k must be in [0, {n_cand}]; got k={k}.")
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1; got {n_threads}.")
    if starts.shape[0] != n_chunks + 1:
        raise ValueError("chunk_starts must rise from 0, with one more entry than chunk_ptrs.")
    if not full:
        return
    if starts[0] != 0 or np.any(np.diff(starts) < 0):
        raise ValueError("chunk_starts must rise from 0, with one more entry than chunk_ptrs.")
    if n_chunks and np.any((np.diff(starts) > 0) & (np.asarray(chunk_ptrs) == 0)):
        raise ValueError("every non-empty chunk needs an address.")
    cand = np.asarray(candidates)
    n_rows = int(starts[n_chunks])
    if cand.size and (cand.max() >= n_rows or cand.min() < -1):
        raise ValueError(f"candidates must be database indices in [0, {n_rows - 1}] or -1.")


def refine_kneighbors(
    const double[:, ::1] queries,        # IN (n_queries, n_features)
    const int64_t[:, ::1] candidates,    # IN (n_queries, n_candidates)
    const int64_t[::1] chunk_starts,     # IN (n_chunks + 1,)
    const intptr_t[::1] chunk_ptrs,      # IN (n_chunks,) addresses of float32 rows
    Py_ssize_t k,
    int n_threads=1,
    bint check_inputs=True,
):
    """The k candidates of each query nearest by exact L2 distance.

    Parameters
    ----------
    queries : ndarray of shape (n_queries, n_features), dtype=float64
    candidates : ndarray of shape (n_queries, n_candidates), dtype=int64
        Database indices, each in ``[0, chunk_starts[-1])``, or -1 (ignored).
    chunk_starts : ndarray of shape (n_chunks + 1,), dtype=int64
        Rising from 0 to the number of stored vectors.
    chunk_ptrs : ndarray of shape (n_chunks,), dtype=intp
        Address of each chunk's C-contiguous float32 rows of n_features.
    k : int
        Neighbours kept, ``0 <= k <= n_candidates``.
    n_threads : int, default=1
    check_inputs : bool, default=True
        ``False`` skips the checks that read the chunk table and the
        candidates (for a caller that built both from its own index).

    Returns
    -------
    distances : ndarray of shape (n_queries, k), dtype=float64
        L2 distances (square roots), ascending; ``inf`` where a query has
        fewer than k candidates.
    indices : ndarray of shape (n_queries, k), dtype=int64
        Ties by ascending index; -1 where a query has fewer candidates.
    """
    _check_inputs(queries.shape[0], candidates, chunk_starts, chunk_ptrs, k, n_threads,
                  check_inputs)
    cdef RowFormat fmt = _float32_rows(queries.shape[1])
    return _rerank(fmt, queries, candidates, chunk_starts, chunk_ptrs, k, n_threads)


def refine_sq8_kneighbors(
    const double[:, ::1] queries,        # IN (n_queries, n_features)
    const int64_t[:, ::1] candidates,    # IN (n_queries, n_candidates)
    const int64_t[::1] chunk_starts,     # IN (n_chunks + 1,)
    const intptr_t[::1] chunk_ptrs,      # IN (n_chunks,) addresses of uint8 rows
    const double[::1] scale,             # IN (n_features,)
    const double[::1] offset,            # IN (n_features,)
    const double[:, ::1] centroids,      # IN (n_cells, n_features)
    bint with_cells,
    Py_ssize_t k,
    int n_threads=1,
    bint check_inputs=True,
):
    """The k candidates of each query nearest to their 8-bit scalar-quantized vectors.

    Item i's stored row holds n_features bytes ``code`` and, with
    ``with_cells``, then the int32 ``cell`` of the item (native byte order,
    4 bytes, unaligned); its vector is read as ``(scale * code + offset) +
    centroids[cell]`` (``centroids[0]`` without cells), each feature in
    double precision.

    Parameters
    ----------
    queries : ndarray of shape (n_queries, n_features), dtype=float64
    candidates : ndarray of shape (n_queries, n_candidates), dtype=int64
        Database indices, each in ``[0, chunk_starts[-1])``, or -1 (ignored).
    chunk_starts : ndarray of shape (n_chunks + 1,), dtype=int64
        Rising from 0 to the number of stored rows.
    chunk_ptrs : ndarray of shape (n_chunks,), dtype=intp
        Address of each chunk's C-contiguous uint8 rows of ``n_features``
        bytes (``n_features + 4`` with cells).
    scale, offset : ndarray of shape (n_features,), dtype=float64
    centroids : ndarray of shape (n_cells, n_features), dtype=float64
        At least one row; without cells only the first is read.
    with_cells : bool
    k : int
        Neighbours kept, ``0 <= k <= n_candidates``.
    n_threads : int, default=1
    check_inputs : bool, default=True
        ``False`` skips the checks that read the chunk table and the
        candidates (for a caller that built both from its own index).

    Returns
    -------
    distances : ndarray of shape (n_queries, k), dtype=float64
        L2 distances to the decoded vectors, ascending; ``inf`` where a
        query has fewer than k candidates.
    indices : ndarray of shape (n_queries, k), dtype=int64
        Ties by ascending index; -1 where a query has fewer candidates.

    Raises
    ------
    ValueError
        A stored cell outside ``[0, n_cells)``.
    """
    cdef Py_ssize_t n_features = queries.shape[1]
    _check_inputs(queries.shape[0], candidates, chunk_starts, chunk_ptrs, k, n_threads,
                  check_inputs)
    cdef RowFormat fmt = _sq8_rows(n_features, scale, offset, centroids, with_cells)
    return _rerank(fmt, queries, candidates, chunk_starts, chunk_ptrs, k, n_threads)


def _check_pairs(queries, offsets, candidates):
    """The CSR candidates of ``refine_distances`` as the kernel reads them: (offsets, (1, n))."""
    offsets = np.asarray(offsets)
    candidates = np.asarray(candidates)
    if (offsets.ndim != 1 or offsets.shape[0] != queries.shape[0] + 1 or candidates.ndim != 1
            or offsets[0] != 0 or offsets[-1] != candidates.shape[0]
            or np.any(np.diff(offsets) < 0)):
        raise ValueError("offsets must rise from 0 to len(candidates), one more entry than "
                         "queries, and candidates be 1-D.")
    return (np.ascontiguousarray(offsets, dtype=np.int64),
            np.ascontiguousarray(candidates, dtype=np.int64)[None])


def refine_distances(queries, offsets, candidates, chunk_starts, chunk_ptrs, int n_threads=1,
                     bint check_inputs=True, bint squared=False):
    """Every candidate's exact L2 distance (float32 rows), as ``refine_kneighbors`` scores it.

    Query q's candidates are ``candidates[offsets[q]:offsets[q + 1]]``
    (database indices, each once per query, no -1); their distances come
    back flat in the same order (float64, the same numbers
    ``refine_kneighbors`` returns for them). With ``squared``, their squared
    distances: the sums ``refine_kneighbors`` ranks by (with ties by
    index), before its square roots.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float64)
    offsets, flat = _check_pairs(queries, offsets, candidates)
    _check_inputs(1, flat, chunk_starts, chunk_ptrs, 0, n_threads, check_inputs)
    if check_inputs and flat.size and flat.min() < 0:
        raise ValueError("candidates must be database indices, not -1.")
    cdef RowFormat fmt = _float32_rows(queries.shape[1])
    return _rerank(fmt, queries, flat, chunk_starts, chunk_ptrs, 0, n_threads, offsets,
                   squared)[0]


def refine_sq8_distances(queries, offsets, candidates, chunk_starts, chunk_ptrs,
                         const double[::1] scale, const double[::1] offset,
                         const double[:, ::1] centroids, bint with_cells, int n_threads=1,
                         bint check_inputs=True, bint squared=False):
    """``refine_distances`` for 8-bit rows (decoded as ``refine_sq8_kneighbors`` reads them)."""
    queries = np.ascontiguousarray(queries, dtype=np.float64)
    cdef Py_ssize_t n_features = queries.shape[1]
    offsets, flat = _check_pairs(queries, offsets, candidates)
    _check_inputs(1, flat, chunk_starts, chunk_ptrs, 0, n_threads, check_inputs)
    if check_inputs and flat.size and flat.min() < 0:
        raise ValueError("candidates must be database indices, not -1.")
    cdef RowFormat fmt = _sq8_rows(n_features, scale, offset, centroids, with_cells)
    return _rerank(fmt, queries, flat, chunk_starts, chunk_ptrs, 0, n_threads, offsets,
                   squared)[0]
