"""Exact k-nearest-neighbour search over product-quantization codes by lookup tables.

Each query comes as a table of shape (n_subspaces, n_codewords): for ADC its
squared distances to every codeword (the query stays a float vector), for SDC
the distances between its own codewords and every codeword. The distance to
a database code is the float32 sum of the table entries its codeword indices
pick, added in subspace order, i.e. ``tables[q, m, codes[:, m]].sum(1)``.

Each query keeps a max-heap of its k best (distance, index) pairs; equal
distances are ranked by ascending database index, so results never depend on
the thread count. Work is split over queries (OpenMP ``prange``) and the
database is scanned in cache-sized blocks shared by a block of queries.
"""

from cython.parallel cimport parallel, prange
from libc.math cimport INFINITY, nextafterf
from libc.stdint cimport int32_t, int64_t, intptr_t, uint8_t, uint16_t
from libc.stdlib cimport free, malloc

from ._ivf_tables cimport probe_table
from ._matches cimport Match, hold_matches, keep_match

import numpy as np

cdef extern from "_adc_scan.h":
    Py_ssize_t sh_adc_scan_u8(
        const float* table, const uint8_t* codes, Py_ssize_t n, Py_ssize_t n_subspaces,
        Py_ssize_t n_codewords, float threshold, int32_t* pos, float* dist,
    ) noexcept nogil
    Py_ssize_t sh_adc_scan_u16(
        const float* table, const uint16_t* codes, Py_ssize_t n, Py_ssize_t n_subspaces,
        Py_ssize_t n_codewords, float threshold, int32_t* pos, float* dist,
    ) noexcept nogil

ctypedef fused code_t:
    uint8_t
    uint16_t

cdef enum:
    # Bytes of database codes scanned per block.
    DB_BLOCK_BYTES = 65536
    # An inverted list shorter than n_codewords / this is scored on the fly
    # from its two tables, without building their sum (IVF kernel).
    ON_THE_FLY_RATIO = 8
    # Queries sharing one pass over a database block.
    MAX_QUERY_BLOCK = 16


cdef inline bint _worse(float da, int64_t ia, float db, int64_t ib) noexcept nogil:
    """Whether (da, ia) ranks after (db, ib): larger distance, then larger index."""
    return da > db or (da == db and ia > ib)


cdef void _sift_down(
    float* dist,       # IN/OUT (size,)
    int64_t* idx,      # IN/OUT (size,)
    Py_ssize_t size,
    Py_ssize_t i,
) noexcept nogil:
    cdef Py_ssize_t child, worst
    cdef float d
    cdef int64_t j
    while True:
        worst = i
        child = 2 * i + 1
        if child < size and _worse(dist[child], idx[child], dist[worst], idx[worst]):
            worst = child
        child = child + 1
        if child < size and _worse(dist[child], idx[child], dist[worst], idx[worst]):
            worst = child
        if worst == i:
            return
        d = dist[i]; dist[i] = dist[worst]; dist[worst] = d
        j = idx[i]; idx[i] = idx[worst]; idx[worst] = j
        i = worst


cdef void _heap_push(
    float* dist,       # IN/OUT (k,) max-heap, worst on top
    int64_t* idx,      # IN/OUT (k,)
    Py_ssize_t* size,  # IN/OUT
    Py_ssize_t k,
    float d,
    int64_t j,
) noexcept nogil:
    cdef Py_ssize_t i, parent
    if size[0] < k:
        i = size[0]
        size[0] = i + 1
        while i > 0:
            parent = (i - 1) // 2
            if not _worse(d, j, dist[parent], idx[parent]):
                break
            dist[i] = dist[parent]
            idx[i] = idx[parent]
            i = parent
        dist[i] = d
        idx[i] = j
    else:
        dist[0] = d
        idx[0] = j
        _sift_down(dist, idx, k, 0)


cdef inline void _offer(
    float* dist,       # IN/OUT (k,) max-heap, worst on top
    int64_t* idx,      # IN/OUT (k,)
    Py_ssize_t* size,  # IN/OUT
    Py_ssize_t k,
    float d,
    int64_t j,
) noexcept nogil:
    """Push (d, j) if the heap has room or (d, j) ranks before the worst kept."""
    if size[0] == k and not _worse(dist[0], idx[0], d, j):
        return
    _heap_push(dist, idx, size, k, d, j)


cdef void _heap_sort(float* dist, int64_t* idx, Py_ssize_t size) noexcept nogil:
    """Sort a max-heap in place into ascending (distance, index) order."""
    cdef Py_ssize_t end
    cdef float d
    cdef int64_t j
    for end in range(size - 1, 0, -1):
        d = dist[0]; dist[0] = dist[end]; dist[end] = d
        j = idx[0]; idx[0] = idx[end]; idx[end] = j
        _sift_down(dist, idx, end, 0)


cdef inline Py_ssize_t _scan(
    const float* table, const code_t* codes, Py_ssize_t n, Py_ssize_t n_subspaces,
    Py_ssize_t n_codewords, float threshold, int32_t* pos, float* dist,
) noexcept nogil:
    if code_t is uint8_t:
        return sh_adc_scan_u8(table, codes, n, n_subspaces, n_codewords, threshold, pos, dist)
    else:
        return sh_adc_scan_u16(table, codes, n, n_subspaces, n_codewords, threshold, pos, dist)


def adc_kneighbors(
    const float[:, :, ::1] tables,  # IN (n_queries, n_subspaces, n_codewords)
    const code_t[:, ::1] codes,      # IN (n_database, n_subspaces)
    Py_ssize_t k,
    Py_ssize_t self_offset=-1,
    int n_threads=1,
    const int64_t[::1] exclude=None,  # IN (n_queries,) or None
    const uint8_t[::1] allowed=None,  # IN (n_database,) or None
    bint check_codes=True,
):
    """k nearest database codes of each query by table lookups.

    Parameters
    ----------
    tables : ndarray of shape (n_queries, n_subspaces, n_codewords), dtype=float32
        Per-query distance tables, C-contiguous, finite.
    codes : ndarray of shape (n_database, n_subspaces), dtype=uint8 or uint16
        Database codeword indices, each below ``n_codewords``.
    k : int
        Number of neighbours, ``k >= 0``.
    self_offset : int, default=-1
        When ``>= 0``, query ``i`` is database row ``self_offset + i`` and is
        never its own neighbour.
    n_threads : int, default=1
        OpenMP threads.
    exclude : ndarray of shape (n_queries,), dtype=int64, default=None
        A database row never returned for each query (-1: none).
    allowed : ndarray of shape (n_database,), dtype=uint8, default=None
        When given, only rows whose entry is non-zero are candidates, tested
        while scanning: the result is the exact search over those rows.
    check_codes : bool, default=True
        Check that every codeword index is below ``n_codewords`` (one pass
        over the codes). An index whose codes were checked when they entered
        it passes False, so a search reads only the codes it scans.

    Returns
    -------
    distances : ndarray of shape (n_queries, k), dtype=float32
    indices : ndarray of shape (n_queries, k), dtype=int64
        Ranked by ascending distance, then ascending database index. A query
        with fewer than k candidates gets its last columns padded with
        distance ``inf`` and index -1.
    """
    cdef Py_ssize_t n_queries = tables.shape[0]
    cdef Py_ssize_t n_subspaces = tables.shape[1]
    cdef Py_ssize_t n_codewords = tables.shape[2]
    cdef Py_ssize_t n_database = codes.shape[0]
    cdef bint exclude_self = self_offset >= 0

    if codes.shape[1] != n_subspaces:
        raise ValueError(
            f"tables have {n_subspaces} subspaces but codes have {codes.shape[1]}; "
            f"they must come from the same quantizer."
        )
    if k < 0:
        raise ValueError(f"k must be >= 0; got k={k}.")
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1; got {n_threads}.")
    if exclude is not None and exclude.shape[0] != n_queries:
        raise ValueError(f"exclude must have one entry per query ({n_queries}); "
                         f"got {exclude.shape[0]}.")
    if allowed is not None and allowed.shape[0] != n_database:
        raise ValueError(f"allowed must have one entry per database row ({n_database}); "
                         f"got {allowed.shape[0]}.")
    if check_codes:
        # One pass over the codes keeps every table lookup in bounds.
        largest = int(np.asarray(codes).max()) if n_database and n_subspaces else -1
        if largest >= n_codewords:
            raise ValueError(
                f"codes hold codeword indices up to {largest} but the "
                f"tables have {n_codewords} codewords per subspace."
            )

    distances = np.full((n_queries, k), np.inf, dtype=np.float32)
    indices = np.full((n_queries, k), -1, dtype=np.int64)
    if n_queries == 0 or k == 0 or n_database == 0:
        return distances, indices

    cdef float[:, ::1] out_dist = distances
    cdef int64_t[:, ::1] out_idx = indices
    cdef Py_ssize_t query_block = max(
        1, min(MAX_QUERY_BLOCK, (n_queries + n_threads - 1) // n_threads)
    )
    cdef Py_ssize_t row_bytes = max(1, n_subspaces * sizeof(code_t))
    cdef Py_ssize_t db_block = max(64, DB_BLOCK_BYTES // row_bytes)
    cdef Py_ssize_t n_query_blocks = (n_queries + query_block - 1) // query_block
    cdef Py_ssize_t n_db_blocks = (n_database + db_block - 1) // db_block
    cdef Py_ssize_t table_size = n_subspaces * n_codewords
    cdef const float* tab = &tables[0, 0, 0]
    cdef const code_t* cds = &codes[0, 0] if n_database else NULL
    cdef const int64_t* excl = &exclude[0] if exclude is not None and n_queries else NULL
    cdef const uint8_t* allow = &allowed[0] if allowed is not None else NULL

    cdef Py_ssize_t b, q, q0, q1, jb, j0, j1, c, n_found, own
    cdef int64_t j
    cdef float d, threshold
    cdef int failed = 0
    cdef bint ok  # per thread: its buffers were allocated
    cdef int* failed_flag = &failed
    cdef Py_ssize_t* sizes
    cdef int32_t* found_pos
    cdef float* found_dist
    cdef float* hd
    cdef int64_t* hi

    with nogil, parallel(num_threads=n_threads):
        sizes = <Py_ssize_t*> malloc(query_block * sizeof(Py_ssize_t))
        found_pos = <int32_t*> malloc(db_block * sizeof(int32_t))
        found_dist = <float*> malloc(db_block * sizeof(float))
        # All threads must meet the loop (OpenMP); one without buffers skips its turns.
        ok = not (sizes == NULL or found_pos == NULL or found_dist == NULL)
        if not ok:
            failed_flag[0] = 1
        for b in prange(n_query_blocks, schedule="static"):
            if ok:
                q0 = b * query_block
                q1 = min(q0 + query_block, n_queries)
                for q in range(q1 - q0):
                    sizes[q] = 0
                for jb in range(n_db_blocks):
                    j0 = jb * db_block
                    j1 = min(j0 + db_block, n_database)
                    for q in range(q0, q1):
                        # The heap of query q lives in its output row.
                        hd = &out_dist[q, 0]
                        hi = &out_idx[q, 0]
                        threshold = hd[0] if sizes[q - q0] == k else INFINITY
                        own = self_offset + q if exclude_self else -1
                        n_found = _scan(tab + q * table_size, cds + j0 * n_subspaces,
                                        j1 - j0, n_subspaces, n_codewords, threshold,
                                        found_pos, found_dist)
                        for c in range(n_found):
                            d = found_dist[c]
                            j = j0 + found_pos[c]
                            if j == own or (excl != NULL and j == excl[q]):
                                continue
                            if allow != NULL and not allow[j]:
                                continue
                            _offer(hd, hi, &sizes[q - q0], k, d, j)
                for q in range(q0, q1):
                    _heap_sort(&out_dist[q, 0], &out_idx[q, 0], sizes[q - q0])
        free(sizes)
        free(found_pos)
        free(found_dist)

    if failed:
        raise MemoryError("could not allocate the ADC search buffers.")
    return distances, indices


cdef inline float _on_the_fly(
    const float* lt,     # IN (n_subspaces, n_codewords) list terms, subspaces < split
    const float* lt2,    # IN (n_subspaces, n_codewords) list terms, subspaces >= split
    const float* qt,     # IN (n_subspaces, n_codewords) query terms
    const code_t* code,  # IN (n_subspaces,)
    Py_ssize_t n_subspaces,
    Py_ssize_t split,
    Py_ssize_t n_codewords,
    float base,
) noexcept nogil:
    """A code's distance as the table scan computes it, without building the table.

    Each entry ``list term + query term`` is rounded to float32 as the table
    holds it (row 0 then plus ``base``) and the entries are added in
    subspace order: the same float32 operations, so the same sum.
    """
    cdef Py_ssize_t m, e
    cdef const float* src = lt if split > 0 else lt2
    e = code[0]
    cdef float d = (src[e] + qt[e]) + base
    for m in range(1, n_subspaces):
        src = lt if m < split else lt2
        e = m * n_codewords + code[m]
        d = d + (src[e] + qt[e])
    return d


def check_chunk_table(chunk_offsets, chunk_codes, chunk_ids, chunk_sizes, chunk_blocks=None):
    """Raise a clear ValueError unless an IVF kernel's chunk table is consistent.

    O(n_chunks): a back-end that keeps its table between searches checks it
    once when it builds it and passes ``check_chunks=False`` to the kernels.
    """
    n_chunks = chunk_sizes.shape[0]
    n_lists = chunk_offsets.shape[0] - 1
    offsets = np.asarray(chunk_offsets)
    tables = [chunk_codes, chunk_ids] + ([] if chunk_blocks is None else [chunk_blocks])
    if (n_lists < 1 or offsets[0] != 0 or offsets[-1] != n_chunks
            or np.any(np.diff(offsets) < 0) or any(t.shape[0] != n_chunks for t in tables)):
        names = "chunk_codes, chunk_ids" + ("" if chunk_blocks is None else ", chunk_blocks")
        raise ValueError(f"chunk_offsets must rise from 0 to n_chunks, and {names} and "
                         f"chunk_sizes hold one entry per chunk.")
    sizes = np.asarray(chunk_sizes)
    # The fast-scan kernel reads a chunk's code rows only when it has no blocks.
    no_codes = np.asarray(chunk_codes) == 0
    if chunk_blocks is not None:
        no_codes &= np.asarray(chunk_blocks) == 0
    if n_chunks and (sizes.min() < 0 or np.any(
            (sizes > 0) & (no_codes | (np.asarray(chunk_ids) == 0)))):
        raise ValueError("chunk sizes must be >= 0 and non-empty chunks need addresses "
                         "(of their ids, and of their code rows or blocks).")


cdef bint _visits_outside(const int64_t[:, ::1] rows, const int64_t[::1] n_visit,
                          int64_t upper) noexcept:
    """Whether a visited entry ``rows[q, :n_visit[q]]`` lies outside [0, upper)."""
    cdef Py_ssize_t q, p
    for q in range(rows.shape[0]):
        for p in range(n_visit[q]):
            if rows[q, p] < 0 or rows[q, p] >= upper:
                return True
    return False


def check_ivf_arguments(list_tables, query_tables, coarse, probes, table_rows, n_visit,
                        chunk_offsets, chunk_codes, chunk_ids, chunk_sizes, exclude, k,
                        n_threads, second_rows, split, chunk_blocks=None, check_chunks=True):
    """Raise a clear ValueError unless the arguments of an IVF kernel agree.

    Shared by ``ivf_adc_kneighbors`` and the fast-scan kernel
    (``_fastscan.ivf_fastscan_kneighbors``, which also passes its
    ``chunk_blocks``): shapes, the chunk table (``check_chunk_table``,
    unless ``check_chunks=False``: checked by the caller when it was
    built), the visited lists and table rows of every probe, ``split``,
    ``k`` and ``n_threads``.
    """
    n_tables, n_subspaces, n_codewords = list_tables.shape[:3]
    n_queries = query_tables.shape[0]
    n_probe = probes.shape[1]
    n_lists = chunk_offsets.shape[0] - 1
    if query_tables.shape[1] != n_subspaces or query_tables.shape[2] != n_codewords:
        raise ValueError("list_tables and query_tables must have the same subspaces "
                         "and codewords.")
    if (probes.shape[0] != n_queries or coarse.shape[0] != n_queries
            or coarse.shape[1] != n_probe or table_rows.shape[0] != n_queries
            or table_rows.shape[1] != n_probe or n_visit.shape[0] != n_queries
            or exclude.shape[0] != n_queries):
        raise ValueError("probes, table_rows and coarse must have shape (n_queries, n_probe) "
                         "and n_visit, exclude shape (n_queries,).")
    if check_chunks:
        check_chunk_table(chunk_offsets, chunk_codes, chunk_ids, chunk_sizes, chunk_blocks)
    elif n_lists < 1:
        raise ValueError("chunk_offsets must rise from 0 to n_chunks.")
    cdef const int64_t[::1] visit = n_visit
    cdef Py_ssize_t q
    for q in range(n_queries):
        if visit[q] < 0 or visit[q] > n_probe:
            raise ValueError(f"n_visit must be in [0, {n_probe}].")
    if _visits_outside(probes, visit, n_lists):
        raise ValueError(f"probes must be list numbers in [0, {n_lists - 1}].")
    for name, rows in (("table_rows", table_rows), ("second_rows", second_rows)):
        if rows is None:
            continue
        if rows.shape[0] != n_queries or rows.shape[1] != n_probe:
            raise ValueError(f"{name} must have shape (n_queries, n_probe).")
        if _visits_outside(rows, visit, n_tables):
            raise ValueError(f"{name} must be rows of list_tables, in [0, {n_tables - 1}].")
    if second_rows is not None and not 0 <= split <= n_subspaces:
        raise ValueError(f"split must be in [0, {n_subspaces}]; got {split}.")
    if k < 0:
        raise ValueError(f"k must be >= 0; got k={k}.")
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1; got {n_threads}.")


def ivf_adc_kneighbors(
    const float[:, :, ::1] list_tables,   # IN (n_tables, n_subspaces, n_codewords)
    const float[:, :, ::1] query_tables,  # IN (n_queries, n_subspaces, n_codewords)
    const float[:, ::1] coarse,           # IN (n_queries, n_probe)
    const int64_t[:, ::1] probes,         # IN (n_queries, n_probe)
    const int64_t[:, ::1] table_rows,     # IN (n_queries, n_probe)
    const int64_t[::1] n_visit,           # IN (n_queries,)
    const int64_t[::1] chunk_offsets,     # IN (n_lists + 1,)
    const intptr_t[::1] chunk_codes,      # IN (n_chunks,) addresses of code arrays
    const intptr_t[::1] chunk_ids,        # IN (n_chunks,) addresses of int64 id arrays
    const int64_t[::1] chunk_sizes,       # IN (n_chunks,)
    int code_bytes,
    const int64_t[::1] exclude,           # IN (n_queries,)
    Py_ssize_t k,
    const uint8_t[::1] allowed=None,      # IN (n_ids,) or None
    int n_threads=1,
    const int64_t[:, ::1] second_rows=None,  # IN (n_queries, n_probe) or None
    Py_ssize_t split=0,
    bint check_chunks=True,
):
    """k nearest database codes of each query over its probed inverted lists.

    Inverted list l is stored as the chunks ``chunk_offsets[l]:chunk_offsets[l
    + 1]``; chunk c holds ``chunk_sizes[c]`` codes (C-contiguous, ``n_subspaces``
    codeword indices of ``code_bytes`` bytes each, at address
    ``chunk_codes[c]``) and their database indices (int64, at
    ``chunk_ids[c]``). Lists grow by chunks, so adding items never moves the
    others; the caller keeps the arrays alive during the call and checked
    every codeword index when the codes entered the index.

    Query q visits its first ``n_visit[q]`` lists ``probes[q, :n_visit[q]]``.
    For probe p of query q the table is built in float32 as ``t =
    list_tables[table_rows[q, p]] + query_tables[q]`` with ``coarse[q, p]``
    then added to row 0, and the distance of a code is ``t[0, c[0]] + t[1,
    c[1]] + ...`` added in subspace order (IVFADC's decomposition of the
    squared distance to centroid + residual codeword). A list shorter than
    ``n_codewords / 8`` is scored without building ``t``: each code adds the
    entries it picks from both terms, rounded as ``t`` would hold them, so
    the distances are the same. Ranking is by
    (distance, database index), so ties go to the smaller index whatever the
    order of the lists and chunks.

    With ``second_rows`` (the inverted multi-index, whose cell centroids
    join two half-vectors), subspaces ``split`` and beyond take their list
    term from ``list_tables[second_rows[q, p]]`` instead.

    Parameters
    ----------
    list_tables : ndarray of shape (n_tables, n_subspaces, n_codewords), dtype=float32
    query_tables : ndarray of shape (n_queries, n_subspaces, n_codewords), dtype=float32
    coarse : ndarray of shape (n_queries, n_probe), dtype=float32
    probes : ndarray of shape (n_queries, n_probe), dtype=int64
        List numbers, each in ``[0, n_lists)``, distinct within a row.
    table_rows : ndarray of shape (n_queries, n_probe), dtype=int64
        Row of ``list_tables`` for each probe, in ``[0, n_tables)``.
    n_visit : ndarray of shape (n_queries,), dtype=int64
        Lists visited per query, in ``[0, n_probe]``.
    chunk_offsets : ndarray of shape (n_lists + 1,), dtype=int64
    chunk_codes, chunk_ids : ndarray of shape (n_chunks,), dtype=intp
    chunk_sizes : ndarray of shape (n_chunks,), dtype=int64
    code_bytes : {1, 2}
        Bytes per codeword index (uint8 or uint16 codes).
    exclude : ndarray of shape (n_queries,), dtype=int64
        A database index never returned for the query (-1: none).
    k : int
        Neighbours per query.
    allowed : ndarray of shape (n_ids,), dtype=uint8, default=None
        When given, only items whose database index ``i`` has ``allowed[i]``
        non-zero are candidates, tested while scanning; every index in the
        lists must be below ``n_ids``.
    n_threads : int, default=1
    second_rows : ndarray of shape (n_queries, n_probe), dtype=int64, default=None
        Row of ``list_tables`` for subspaces ``split:`` of each probe.
    split : int, default=0
        First subspace read from ``second_rows``; in ``[0, n_subspaces]``,
        used only with ``second_rows``.
    check_chunks : bool, default=True
        Check the chunk table (``check_chunk_table``, O(n_chunks)); a
        back-end that checked it when it built it passes False.

    Returns
    -------
    distances : ndarray of shape (n_queries, k), dtype=float32
    indices : ndarray of shape (n_queries, k), dtype=int64
        A query whose visited lists hold fewer than k candidates gets its
        last columns padded with distance ``inf`` and index -1.
    """
    check_ivf_arguments(list_tables, query_tables, coarse, probes, table_rows, n_visit,
                        chunk_offsets, chunk_codes, chunk_ids, chunk_sizes, exclude, k,
                        n_threads, second_rows, split, check_chunks=check_chunks)
    if code_bytes != 1 and code_bytes != 2:
        raise ValueError(f"code_bytes must be 1 or 2; got {code_bytes}.")
    cdef Py_ssize_t n_subspaces = list_tables.shape[1]
    cdef Py_ssize_t n_codewords = list_tables.shape[2]
    cdef Py_ssize_t n_queries = query_tables.shape[0]
    cdef Py_ssize_t n_probe = probes.shape[1]
    if second_rows is None:
        split = n_subspaces

    distances = np.full((n_queries, k), np.inf, dtype=np.float32)
    indices = np.full((n_queries, k), -1, dtype=np.int64)
    if n_queries == 0 or k == 0 or n_subspaces == 0:
        return distances, indices

    cdef float[:, ::1] out_dist = distances
    cdef int64_t[:, ::1] out_idx = indices
    cdef Py_ssize_t row_bytes = max(1, n_subspaces * code_bytes)
    cdef Py_ssize_t db_block = max(64, DB_BLOCK_BYTES // row_bytes)
    cdef Py_ssize_t table_size = n_subspaces * n_codewords
    cdef Py_ssize_t split_size = split * n_codewords
    cdef const uint8_t* allow = &allowed[0] if allowed is not None and allowed.shape[0] else NULL

    cdef Py_ssize_t q, p, lst, ch, n_rows, j0, j1, c, n_found, size, list_size
    cdef int64_t j
    cdef float d, threshold, base
    cdef int failed = 0
    cdef bint ok  # per thread: its buffers were allocated
    cdef int* failed_flag = &failed
    cdef int32_t* found_pos
    cdef float* found_dist
    cdef float* table
    cdef const float* lt
    cdef const float* lt2
    cdef const float* qt
    cdef const int64_t* ids
    cdef intptr_t codes_at
    cdef float* hd
    cdef int64_t* hi
    cdef const int64_t* second = (
        &second_rows[0, 0] if second_rows is not None and n_probe else NULL)

    with nogil, parallel(num_threads=n_threads):
        found_pos = <int32_t*> malloc(db_block * sizeof(int32_t))
        found_dist = <float*> malloc(db_block * sizeof(float))
        table = <float*> malloc(table_size * sizeof(float))
        # All threads must meet the loop (OpenMP); one without buffers skips its turns.
        ok = not (found_pos == NULL or found_dist == NULL or table == NULL)
        if not ok:
            failed_flag[0] = 1
        for q in prange(n_queries, schedule="dynamic"):
            if ok:
                hd = &out_dist[q, 0]
                hi = &out_idx[q, 0]
                size = 0
                qt = &query_tables[q, 0, 0]
                for p in range(n_visit[q]):
                    lst = probes[q, p]
                    if chunk_offsets[lst] == chunk_offsets[lst + 1]:
                        continue
                    lt = &list_tables[table_rows[q, p], 0, 0]
                    lt2 = &list_tables[second[q * n_probe + p], 0, 0] if second != NULL else lt
                    base = coarse[q, p]
                    list_size = 0
                    for ch in range(chunk_offsets[lst], chunk_offsets[lst + 1]):
                        list_size = list_size + chunk_sizes[ch]
                    if list_size * ON_THE_FLY_RATIO < n_codewords:
                        for ch in range(chunk_offsets[lst], chunk_offsets[lst + 1]):
                            ids = <const int64_t*> chunk_ids[ch]
                            for c in range(chunk_sizes[ch]):
                                j = ids[c]
                                if j == exclude[q] or (allow != NULL and not allow[j]):
                                    continue
                                if code_bytes == 1:
                                    d = _on_the_fly(lt, lt2, qt, <const uint8_t*> chunk_codes[ch]
                                                    + c * n_subspaces, n_subspaces, split,
                                                    n_codewords, base)
                                else:
                                    d = _on_the_fly(lt, lt2, qt, <const uint16_t*> chunk_codes[ch]
                                                    + c * n_subspaces, n_subspaces, split,
                                                    n_codewords, base)
                                _offer(hd, hi, &size, k, d, j)
                        continue
                    probe_table(table, lt, lt2, qt, split_size, table_size, n_codewords, base)
                    for ch in range(chunk_offsets[lst], chunk_offsets[lst + 1]):
                        n_rows = chunk_sizes[ch]
                        codes_at = chunk_codes[ch]
                        ids = <const int64_t*> chunk_ids[ch]
                        j0 = 0
                        while j0 < n_rows:
                            j1 = min(j0 + db_block, n_rows)
                            # Lists are not in index order: a row at the heap's
                            # worst distance may still enter on a smaller index.
                            threshold = nextafterf(hd[0], INFINITY) if size == k else INFINITY
                            if code_bytes == 1:
                                n_found = _scan(table, <const uint8_t*> codes_at + j0 * n_subspaces,
                                                j1 - j0, n_subspaces, n_codewords, threshold,
                                                found_pos, found_dist)
                            else:
                                n_found = _scan(table, <const uint16_t*> codes_at + j0 * n_subspaces,
                                                j1 - j0, n_subspaces, n_codewords, threshold,
                                                found_pos, found_dist)
                            for c in range(n_found):
                                d = found_dist[c]
                                j = ids[j0 + found_pos[c]]
                                if j == exclude[q] or (allow != NULL and not allow[j]):
                                    continue
                                _offer(hd, hi, &size, k, d, j)
                            j0 = j1
                _heap_sort(hd, hi, size)
        free(found_pos)
        free(found_dist)
        free(table)

    if failed:
        raise MemoryError("could not allocate the ADC search buffers.")
    return distances, indices

def _gather_matches(intptr_t[::1] held, int64_t[::1] counts, bint failed):
    """The CSR arrays of the matches each query's buffer holds (see ``_matches.pxd``).

    Private to the range kernels: it frees the addresses it is given.

    ``held[q]``: the address of query q's ``counts[q]`` matches (0: none).
    Every buffer is freed, whatever happens; ``failed`` (a kernel ran out
    of memory) raises MemoryError once they are.

    Returns
    -------
    offsets : ndarray of shape (n_queries + 1,), dtype=int64
    distances : ndarray of shape (offsets[-1],), dtype=float32
    indices : ndarray of shape (offsets[-1],), dtype=int64
    """
    cdef Py_ssize_t n_queries = held.shape[0], q, c, at
    cdef const Match* kept
    cdef float[::1] dist_out
    cdef int64_t[::1] idx_out
    offsets = np.zeros(n_queries + 1, dtype=np.int64)
    try:
        if failed:
            raise MemoryError("could not allocate the range search buffers.")
        np.cumsum(counts, out=offsets[1:])
        distances = np.empty(int(offsets[-1]), dtype=np.float32)
        indices = np.empty(int(offsets[-1]), dtype=np.int64)
        dist_out, idx_out = distances, indices
        for q in range(n_queries):
            kept = <const Match*> held[q]
            at = offsets[q]
            for c in range(counts[q] if kept != NULL else 0):
                idx_out[at + c] = kept[c].index
                dist_out[at + c] = kept[c].distance
    finally:
        for q in range(n_queries):
            free(<Match*> held[q])
            held[q] = 0
    return offsets, distances, indices


def ivf_adc_radius(
    const float[:, :, ::1] list_tables,   # IN (n_tables, n_subspaces, n_codewords)
    const float[:, :, ::1] query_tables,  # IN (n_queries, n_subspaces, n_codewords)
    const float[:, ::1] coarse,           # IN (n_queries, n_probe)
    const int64_t[:, ::1] probes,         # IN (n_queries, n_probe)
    const int64_t[:, ::1] table_rows,     # IN (n_queries, n_probe)
    const int64_t[::1] n_visit,           # IN (n_queries,)
    const int64_t[::1] chunk_offsets,     # IN (n_lists + 1,)
    const intptr_t[::1] chunk_codes,      # IN (n_chunks,) addresses of code rows
    const intptr_t[::1] chunk_ids,        # IN (n_chunks,) addresses of int64 id arrays
    const int64_t[::1] chunk_sizes,       # IN (n_chunks,)
    int code_bytes,
    const int64_t[::1] exclude,           # IN (n_queries,)
    float threshold,
    const uint8_t[::1] allowed=None,      # IN (n_ids,) or None
    int n_threads=1,
    const int64_t[:, ::1] second_rows=None,  # IN (n_queries, n_probe) or None
    Py_ssize_t split=0,
    bint check_chunks=True,
):
    """Every code of each query's probed lists whose distance is below ``threshold``.

    The range search of ``ivf_adc_kneighbors``, with the same arguments but
    ``threshold`` for ``k``: query q's table for probe p is built as there
    (``list_tables[table_rows[q, p]] + query_tables[q]``, ``coarse[q, p]``
    added to row 0, in float32) and a code's distance is the float32 sum of
    the entries it picks, in subspace order: the distances that kernel
    returns. A code is kept when that sum is strictly below ``threshold``
    (pass the next float above a radius to include it), it is allowed and
    it is not ``exclude[q]``. (4-bit codes in fast-scan blocks:
    ``_fastscan.ivf_fastscan_radius``, the same answers.)

    Returns
    -------
    offsets : ndarray of shape (n_queries + 1,), dtype=int64
    distances : ndarray of shape (offsets[-1],), dtype=float32
    indices : ndarray of shape (offsets[-1],), dtype=int64
        Query q's matches are ``offsets[q]:offsets[q + 1]``, in ascending
        database index (each index appears once: an item is in one list and
        a query visits a list once).
    """
    check_ivf_arguments(list_tables, query_tables, coarse, probes, table_rows, n_visit,
                        chunk_offsets, chunk_codes, chunk_ids, chunk_sizes, exclude, 0,
                        n_threads, second_rows, split, check_chunks=check_chunks)
    if code_bytes != 1 and code_bytes != 2:
        raise ValueError(f"code_bytes must be 1 or 2; got {code_bytes}.")
    cdef Py_ssize_t n_subspaces = list_tables.shape[1]
    cdef Py_ssize_t n_codewords = list_tables.shape[2]
    cdef Py_ssize_t n_queries = query_tables.shape[0]
    cdef Py_ssize_t n_probe = probes.shape[1]
    if second_rows is None:
        split = n_subspaces
    held = np.zeros(n_queries, dtype=np.intp)  # each query's matches (malloc'd)
    counts = np.zeros(n_queries, dtype=np.int64)
    if n_queries == 0 or n_subspaces == 0:
        return _gather_matches(held, counts, False)

    cdef Py_ssize_t row_bytes = n_subspaces * code_bytes
    cdef Py_ssize_t db_block = max(64, DB_BLOCK_BYTES // row_bytes)
    cdef Py_ssize_t table_size = n_subspaces * n_codewords
    cdef Py_ssize_t split_size = split * n_codewords
    cdef const uint8_t* allow = &allowed[0] if allowed is not None and allowed.shape[0] else NULL
    cdef const int64_t* second = (
        &second_rows[0, 0] if second_rows is not None and n_probe else NULL)
    cdef intptr_t[::1] out_at = held
    cdef int64_t[::1] out_count = counts

    cdef Py_ssize_t q, p, lst, ch, n_rows, j0, j1, c, n_found, size, capacity
    cdef int64_t j
    cdef int failed = 0
    cdef bint ok
    cdef int* failed_flag = &failed
    cdef int32_t* found_pos
    cdef float* found_dist
    cdef float* table
    cdef Match* found
    cdef const float* lt
    cdef const float* lt2
    cdef const float* qt
    cdef const int64_t* ids

    with nogil, parallel(num_threads=n_threads):
        found_pos = <int32_t*> malloc(db_block * sizeof(int32_t))
        found_dist = <float*> malloc(db_block * sizeof(float))
        table = <float*> malloc(table_size * sizeof(float))
        capacity = 256
        found = <Match*> malloc(capacity * sizeof(Match))
        # All threads must meet the loop (OpenMP); one without buffers skips its turns.
        ok = not (found_pos == NULL or found_dist == NULL or table == NULL or found == NULL)
        if not ok:
            failed_flag[0] = 1
        for q in prange(n_queries, schedule="dynamic"):
            if ok and not failed_flag[0]:
                size = 0
                qt = &query_tables[q, 0, 0]
                for p in range(n_visit[q]):
                    lst = probes[q, p]
                    if chunk_offsets[lst] == chunk_offsets[lst + 1]:
                        continue
                    lt = &list_tables[table_rows[q, p], 0, 0]
                    lt2 = &list_tables[second[q * n_probe + p], 0, 0] if second != NULL else lt
                    probe_table(table, lt, lt2, qt, split_size, table_size, n_codewords,
                                coarse[q, p])
                    for ch in range(chunk_offsets[lst], chunk_offsets[lst + 1]):
                        n_rows = chunk_sizes[ch]
                        ids = <const int64_t*> chunk_ids[ch]
                        j0 = 0
                        while j0 < n_rows and not failed_flag[0]:
                            j1 = min(j0 + db_block, n_rows)
                            if code_bytes == 1:
                                n_found = _scan(table, <const uint8_t*> chunk_codes[ch]
                                                + j0 * n_subspaces, j1 - j0, n_subspaces,
                                                n_codewords, threshold, found_pos, found_dist)
                            else:
                                n_found = _scan(table, <const uint16_t*> chunk_codes[ch]
                                                + j0 * n_subspaces, j1 - j0, n_subspaces,
                                                n_codewords, threshold, found_pos, found_dist)
                            for c in range(n_found):
                                j = ids[j0 + found_pos[c]]
                                if j == exclude[q] or (allow != NULL and not allow[j]):
                                    continue
                                if not keep_match(&found, &size, &capacity, j, found_dist[c]):
                                    failed_flag[0] = 1
                                    break
                            j0 = j1
                if not hold_matches(found, size, &out_at[q], &out_count[q]):
                    failed_flag[0] = 1
        free(found_pos)
        free(found_dist)
        free(table)
        free(found)

    return _gather_matches(held, counts, failed)


def adc_radius(
    const float[:, :, ::1] tables,  # IN (n_queries, n_subspaces, n_codewords)
    const code_t[:, ::1] codes,      # IN (n_database, n_subspaces)
    float threshold,
    int n_threads=1,
    const int64_t[::1] exclude=None,  # IN (n_queries,) or None
    const uint8_t[::1] allowed=None,  # IN (n_database,) or None
):
    """Every database code whose table distance is below ``threshold``.

    Distances are the float32 sums of the k-nearest-neighbour kernel; a code
    is returned when its sum is strictly below ``threshold`` (pass the next
    float above a radius to include it). Two passes: the first counts each
    query's matches, the second writes them. The caller has checked the
    codeword indices against the tables when they entered its index.

    Returns
    -------
    offsets : ndarray of shape (n_queries + 1,), dtype=int64
    distances : ndarray of shape (offsets[-1],), dtype=float32
    indices : ndarray of shape (offsets[-1],), dtype=int64
        In ascending database order within each query.
    """
    cdef Py_ssize_t n_queries = tables.shape[0]
    cdef Py_ssize_t n_subspaces = tables.shape[1]
    cdef Py_ssize_t n_codewords = tables.shape[2]
    cdef Py_ssize_t n_database = codes.shape[0]
    if codes.shape[1] != n_subspaces:
        raise ValueError(
            f"tables have {n_subspaces} subspaces but codes have {codes.shape[1]}; "
            f"they must come from the same quantizer."
        )
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1; got {n_threads}.")
    if exclude is not None and exclude.shape[0] != n_queries:
        raise ValueError(f"exclude must have one entry per query ({n_queries}); "
                         f"got {exclude.shape[0]}.")
    if allowed is not None and allowed.shape[0] != n_database:
        raise ValueError(f"allowed must have one entry per database row ({n_database}); "
                         f"got {allowed.shape[0]}.")
    counts = np.zeros(n_queries + 1, dtype=np.int64)
    if n_queries == 0 or n_database == 0:
        return counts, np.empty(0, np.float32), np.empty(0, np.int64)
    cdef Py_ssize_t row_bytes = max(1, n_subspaces * sizeof(code_t))
    cdef Py_ssize_t db_block = max(64, DB_BLOCK_BYTES // row_bytes)
    cdef Py_ssize_t n_db_blocks = (n_database + db_block - 1) // db_block
    cdef Py_ssize_t table_size = n_subspaces * n_codewords
    cdef const float* tab = &tables[0, 0, 0]
    cdef const code_t* cds = &codes[0, 0]
    cdef const int64_t* excl = &exclude[0] if exclude is not None else NULL
    cdef const uint8_t* allow = &allowed[0] if allowed is not None else NULL
    cdef int64_t[::1] cnt = counts
    cdef int64_t[::1] offs
    cdef float[::1] out_dist
    cdef int64_t[::1] out_idx
    cdef Py_ssize_t q, j, jb, j0, j1, c, n_found, at, p
    cdef int failed = 0
    cdef bint ok  # per thread: its buffers were allocated
    cdef int* failed_flag = &failed
    cdef int32_t* found_pos
    cdef float* found_dist
    distances = np.empty(0, np.float32)
    indices = np.empty(0, np.int64)
    for p in range(2):
        if p == 1:
            counts = np.cumsum(counts)
            offsets = counts[:-1].copy()  # write positions, advanced while filling
            offs = offsets
            total = int(counts[-1])
            distances = np.empty(total, np.float32)
            indices = np.empty(total, np.int64)
            out_dist = distances
            out_idx = indices
        with nogil, parallel(num_threads=n_threads):
            found_pos = <int32_t*> malloc(db_block * sizeof(int32_t))
            found_dist = <float*> malloc(db_block * sizeof(float))
            # All threads must meet the loop (OpenMP); one without buffers skips its turns.
            ok = not (found_pos == NULL or found_dist == NULL)
            if not ok:
                failed_flag[0] = 1
            for q in prange(n_queries, schedule="static"):
                if ok:
                    for jb in range(n_db_blocks):
                        j0 = jb * db_block
                        j1 = min(j0 + db_block, n_database)
                        n_found = _scan(tab + q * table_size, cds + j0 * n_subspaces, j1 - j0,
                                        n_subspaces, n_codewords, threshold, found_pos,
                                        found_dist)
                        for c in range(n_found):
                            j = j0 + found_pos[c]
                            if (excl != NULL and j == excl[q]) or (allow != NULL and not allow[j]):
                                continue
                            if p == 0:
                                cnt[q + 1] += 1
                            else:
                                at = offs[q]
                                out_dist[at] = found_dist[c]
                                out_idx[at] = j
                                offs[q] = at + 1
            free(found_pos)
            free(found_dist)
        if failed:
            raise MemoryError("could not allocate the ADC search buffers.")
    return counts, distances, indices
