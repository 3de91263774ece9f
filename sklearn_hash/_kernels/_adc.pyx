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
from libc.math cimport INFINITY
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t
from libc.stdlib cimport free, malloc

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
):
    """k nearest database codes of each query by table lookups.

    Parameters
    ----------
    tables : ndarray of shape (n_queries, n_subspaces, n_codewords), dtype=float32
        Per-query distance tables, C-contiguous, finite.
    codes : ndarray of shape (n_database, n_subspaces), dtype=uint8 or uint16
        Database codeword indices, each below ``n_codewords``.
    k : int
        Number of neighbours, ``0 <= k <= n_database`` (one less when
        queries are database rows).
    self_offset : int, default=-1
        When ``>= 0``, query ``i`` is database row ``self_offset + i`` and is
        never its own neighbour.
    n_threads : int, default=1
        OpenMP threads.

    Returns
    -------
    distances : ndarray of shape (n_queries, k), dtype=float32
    indices : ndarray of shape (n_queries, k), dtype=int64
        Ranked by ascending distance, then ascending database index.
    """
    cdef Py_ssize_t n_queries = tables.shape[0]
    cdef Py_ssize_t n_subspaces = tables.shape[1]
    cdef Py_ssize_t n_codewords = tables.shape[2]
    cdef Py_ssize_t n_database = codes.shape[0]
    cdef bint exclude_self = self_offset >= 0
    cdef Py_ssize_t n_candidates = n_database
    if exclude_self and 0 <= self_offset < n_database:
        n_candidates = n_database - 1

    if codes.shape[1] != n_subspaces:
        raise ValueError(
            f"tables have {n_subspaces} subspaces but codes have {codes.shape[1]}; "
            f"they must come from the same quantizer."
        )
    if k < 0 or k > n_candidates:
        raise ValueError(f"k must be in [0, {n_candidates}]; got k={k}.")
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1; got {n_threads}.")
    # One pass over the codes keeps every table lookup in bounds.
    largest = int(np.asarray(codes).max()) if n_database and n_subspaces else -1
    if largest >= n_codewords:
        raise ValueError(
            f"codes hold codeword indices up to {largest} but the "
            f"tables have {n_codewords} codewords per subspace."
        )

    distances = np.zeros((n_queries, k), dtype=np.float32)
    indices = np.zeros((n_queries, k), dtype=np.int64)
    if n_queries == 0 or k == 0:
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

    cdef Py_ssize_t b, q, q0, q1, jb, j0, j1, c, n_found, own
    cdef int64_t j
    cdef float d, threshold
    cdef int failed = 0
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
        if sizes == NULL or found_pos == NULL or found_dist == NULL:
            failed_flag[0] = 1
        else:
            for b in prange(n_query_blocks, schedule="static"):
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
                            if j == own:
                                continue
                            # Later rows lose ties, so only a smaller distance enters.
                            if sizes[q - q0] == k and not d < hd[0]:
                                continue
                            _heap_push(hd, hi, &sizes[q - q0], k, d, j)
                for q in range(q0, q1):
                    _heap_sort(&out_dist[q, 0], &out_idx[q, 0], sizes[q - q0])
        free(sizes)
        free(found_pos)
        free(found_dist)

    if failed:
        raise MemoryError("could not allocate the ADC search buffers.")
    return distances, indices
