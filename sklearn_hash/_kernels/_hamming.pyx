"""Exact k-nearest-neighbour search in Hamming space over packed binary codes.

Codes are packed into rows of 64-bit words (``n_words = ceil(n_bits / 64)``,
unused high bits zero). The distance between two codes is the popcount of
their XOR. The search is exact and deterministic: equal distances are ranked
by ascending database index, so results never depend on the thread count.

Selection exploits that distances are small integers: each query keeps an
unsorted buffer of candidates in database order and a threshold; a candidate
enters only if its distance is below the threshold; when the buffer is full a
counting pass over the distances finds the k-th smallest distance, keeps the k
best (earliest index first among equal distances) and lowers the threshold.
A final counting sort orders the k survivors by (distance, index).

Work is split over queries (OpenMP ``prange``); the database is scanned in
blocks that stay in cache while a block of queries is compared with them.
"""

from cython.parallel cimport parallel, prange
from libc.stdint cimport INT32_MAX, int32_t, int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

import numpy as np

from ._simd import max_simd_level

cdef extern from "_popcount.h":
    int sh_detect_simd(int max_level) noexcept nogil
    Py_ssize_t sh_block_candidates(
        int simd, const uint64_t* query, const uint64_t* block, Py_ssize_t n,
        Py_ssize_t n_words, int threshold, int32_t* pos, int32_t* dist,
    ) noexcept nogil


cdef enum:
    # Bytes of database codes scanned per block (fits in L2 with room to spare).
    DB_BLOCK_BYTES = 65536
    # Queries sharing one pass over a database block.
    MAX_QUERY_BLOCK = 32
    # Upper bound on one thread's candidate buffers, in bytes.
    BUFFER_BYTES = 8388608


cdef struct TopK:
    int32_t* dist      # candidate distances, in database order
    int64_t* idx       # candidate database indices, ascending
    Py_ssize_t size    # candidates held
    int threshold      # a new candidate enters only if its distance is below


cdef void _compact(
    TopK* t,               # IN/OUT
    Py_ssize_t k,
    Py_ssize_t* hist,      # scratch (max_distance + 2,)
    int max_distance,
) noexcept nogil:
    """Keep the k best candidates (in database order) and lower the threshold."""
    cdef Py_ssize_t i, cum = 0, need, taken = 0, kept = 0
    cdef int d, kth = 0
    memset(hist, 0, (max_distance + 2) * sizeof(Py_ssize_t))
    for i in range(t.size):
        hist[t.dist[i]] += 1
    while cum + hist[kth] < k:
        cum = cum + hist[kth]
        kth = kth + 1
    need = k - cum  # how many candidates at distance kth survive
    for i in range(t.size):
        d = t.dist[i]
        if d < kth or (d == kth and taken < need):
            if d == kth:
                taken = taken + 1
            t.dist[kept] = d
            t.idx[kept] = t.idx[i]
            kept = kept + 1
    t.size = kept
    # Later candidates at distance kth come after all kept ones by index.
    t.threshold = kth


cdef void _write_sorted(
    TopK* t,               # IN
    Py_ssize_t k,
    Py_ssize_t* hist,      # scratch (max_distance + 2,)
    int max_distance,
    int32_t* out_dist,     # OUT (k,)
    int64_t* out_idx,      # OUT (k,)
) noexcept nogil:
    """Counting sort of the k best candidates by distance (stable in index)."""
    cdef Py_ssize_t i, pos, total = 0, count
    cdef int d
    if t.size > k:
        _compact(t, k, hist, max_distance)
    memset(hist, 0, (max_distance + 2) * sizeof(Py_ssize_t))
    for i in range(t.size):
        hist[t.dist[i]] += 1
    for d in range(max_distance + 1):
        count = hist[d]
        hist[d] = total
        total = total + count
    for i in range(t.size):
        d = t.dist[i]
        pos = hist[d]
        hist[d] = pos + 1
        out_dist[pos] = d
        out_idx[pos] = t.idx[i]


_PATHS = ("portable", "avx2", "avx512")


def simd_path(simd=True):
    """The popcount path a search runs for ``simd`` on this processor.

    Returns ``"avx512"`` (AVX-512 VPOPCNTDQ), ``"avx2"`` or ``"portable"``.
    """
    return _PATHS[sh_detect_simd(max_simd_level(simd))]


def hamming_kneighbors(
    const uint64_t[:, ::1] queries,   # IN (n_queries, n_words)
    const uint64_t[:, ::1] database,  # IN (n_database, n_words)
    Py_ssize_t k,
    bint exclude_self=False,
    int n_threads=1,
    simd=True,
    const int64_t[::1] exclude=None,  # IN (n_queries,) or None
    const uint8_t[::1] allowed=None,  # IN (n_database,) or None
):
    """k nearest database codes of each query code, by Hamming distance.

    Parameters
    ----------
    queries : ndarray of shape (n_queries, n_words), dtype=uint64
        Packed query codes, C-contiguous.
    database : ndarray of shape (n_database, n_words), dtype=uint64
        Packed database codes, C-contiguous.
    k : int
        Number of neighbours, ``k >= 0``.
    exclude_self : bool, default=False
        Query ``i`` is database row ``i`` and never its own neighbour.
    n_threads : int, default=1
        OpenMP threads.
    simd : bool or {"avx512", "avx2", "portable"}, default=True
        ``True`` runs the widest popcount path the processor has (AVX-512
        VPOPCNTDQ, else AVX2, else portable C); a name caps the path at that
        one, and ``False`` means ``"portable"``. All give the same results.

    exclude : ndarray of shape (n_queries,), dtype=int64, default=None
        A database row never returned for each query (-1 or any value
        outside ``[0, n_database)``: none). Combines with ``exclude_self``.
    allowed : ndarray of shape (n_database,), dtype=uint8, default=None
        When given, only rows whose entry is non-zero are candidates; the
        test is made while scanning, so the result is the exact search over
        the allowed rows.

    Returns
    -------
    distances : ndarray of shape (n_queries, k), dtype=int32
    indices : ndarray of shape (n_queries, k), dtype=int64
        Ranked by ascending distance, then ascending database index. A query
        with fewer than k candidates gets its last columns padded with
        distance ``2**31 - 1`` and index -1.
    """
    cdef Py_ssize_t n_queries = queries.shape[0]
    cdef Py_ssize_t n_database = database.shape[0]
    cdef Py_ssize_t n_words = database.shape[1]

    if queries.shape[1] != n_words:
        raise ValueError(
            f"queries have {queries.shape[1]} words per code but the database "
            f"has {n_words}; both must be packed from the same number of bits."
        )
    if n_words < 1:
        raise ValueError("codes must have at least one 64-bit word.")
    if k < 0:
        raise ValueError(f"k must be >= 0; got k={k}.")
    if exclude_self and n_queries > n_database:
        raise ValueError(
            f"exclude_self=True means query i is database row i, but there are "
            f"{n_queries} queries for {n_database} rows."
        )
    if exclude is not None and exclude.shape[0] != n_queries:
        raise ValueError(f"exclude must have one entry per query ({n_queries}); "
                         f"got {exclude.shape[0]}.")
    if allowed is not None and allowed.shape[0] != n_database:
        raise ValueError(f"allowed must have one entry per database row ({n_database}); "
                         f"got {allowed.shape[0]}.")
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1; got {n_threads}.")

    distances = np.full((n_queries, k), INT32_MAX, dtype=np.int32)
    indices = np.full((n_queries, k), -1, dtype=np.int64)
    if n_queries == 0 or k == 0 or n_database == 0:
        return distances, indices

    cdef int32_t[:, ::1] out_dist = distances
    cdef int64_t[:, ::1] out_idx = indices
    cdef int max_distance = <int>(64 * n_words)
    cdef Py_ssize_t capacity = max(k, min(2 * k + 32, n_database))
    cdef const int64_t* excl = &exclude[0] if exclude is not None and n_queries else NULL
    cdef const uint8_t* allow = &allowed[0] if allowed is not None else NULL
    cdef Py_ssize_t query_block = min(
        MAX_QUERY_BLOCK, (n_queries + n_threads - 1) // n_threads
    )
    query_block = max(1, min(query_block, BUFFER_BYTES // (capacity * 12)))
    cdef Py_ssize_t db_block = max(8, (DB_BLOCK_BYTES // (8 * n_words)) // 8 * 8)
    cdef Py_ssize_t n_query_blocks = (n_queries + query_block - 1) // query_block
    cdef Py_ssize_t n_db_blocks = (n_database + db_block - 1) // db_block
    cdef const uint64_t* db = &database[0, 0]
    cdef const uint64_t* qs = &queries[0, 0]

    cdef int use_simd = sh_detect_simd(max_simd_level(simd))
    cdef Py_ssize_t b, q, q0, q1, j, jb, j0, j1, w, c, n_found
    cdef int d
    cdef int failed = 0
    cdef bint ok  # per thread: its buffers were allocated
    cdef int* failed_flag = &failed  # written through a pointer: shared by threads
    cdef TopK* states
    cdef TopK* t
    cdef int32_t* dist_buf
    cdef int64_t* idx_buf
    cdef Py_ssize_t* hist
    cdef uint64_t* block
    cdef int32_t* found_pos
    cdef int32_t* found_dist

    with nogil, parallel(num_threads=n_threads):
        # Thread-local buffers.
        states = <TopK*> malloc(query_block * sizeof(TopK))
        dist_buf = <int32_t*> malloc(query_block * capacity * sizeof(int32_t))
        idx_buf = <int64_t*> malloc(query_block * capacity * sizeof(int64_t))
        hist = <Py_ssize_t*> malloc((max_distance + 2) * sizeof(Py_ssize_t))
        block = <uint64_t*> malloc(db_block * n_words * sizeof(uint64_t))
        found_pos = <int32_t*> malloc(db_block * sizeof(int32_t))
        found_dist = <int32_t*> malloc(db_block * sizeof(int32_t))
        # All threads must meet the loop (OpenMP); one without buffers skips its turns.
        ok = not (states == NULL or dist_buf == NULL or idx_buf == NULL
                    or hist == NULL or block == NULL or found_pos == NULL
                    or found_dist == NULL)
        if not ok:
            failed_flag[0] = 1
        for b in prange(n_query_blocks, schedule="static"):
            if ok:
                q0 = b * query_block
                q1 = min(q0 + query_block, n_queries)
                for q in range(q1 - q0):
                    states[q].dist = dist_buf + q * capacity
                    states[q].idx = idx_buf + q * capacity
                    states[q].size = 0
                    states[q].threshold = max_distance + 1
                for jb in range(n_db_blocks):
                    j0 = jb * db_block
                    j1 = min(j0 + db_block, n_database)
                    # Interleave the block by groups of 8 rows for the popcount helper.
                    for j in range(j1 - j0):
                        for w in range(n_words):
                            block[((j // 8) * n_words + w) * 8 + j % 8] = db[(j0 + j) * n_words + w]
                    for q in range(q0, q1):
                        t = &states[q - q0]
                        n_found = sh_block_candidates(
                            use_simd, qs + q * n_words, block, j1 - j0, n_words,
                            t.threshold, found_pos, found_dist)
                        # Candidates were cut at the threshold the block began
                        # with; pushes may lower it, so it is checked again.
                        for c in range(n_found):
                            d = found_dist[c]
                            j = j0 + found_pos[c]
                            if d >= t.threshold or (exclude_self and j == q):
                                continue
                            if (excl != NULL and j == excl[q]) or (allow != NULL and not allow[j]):
                                continue
                            if t.size == capacity:
                                _compact(t, k, hist, max_distance)
                                if d >= t.threshold:
                                    continue
                            t.dist[t.size] = d
                            t.idx[t.size] = j
                            t.size = t.size + 1
                for q in range(q0, q1):
                    _write_sorted(&states[q - q0], k, hist, max_distance,
                                  &out_dist[q, 0], &out_idx[q, 0])
        free(states)
        free(dist_buf)
        free(idx_buf)
        free(hist)
        free(block)
        free(found_pos)
        free(found_dist)

    if failed:
        raise MemoryError("could not allocate the Hamming search buffers.")
    return distances, indices


def hamming_radius(
    const uint64_t[:, ::1] queries,   # IN (n_queries, n_words)
    const uint64_t[:, ::1] database,  # IN (n_database, n_words)
    int radius,
    int n_threads=1,
    simd=True,
    const int64_t[::1] exclude=None,  # IN (n_queries,) or None
    const uint8_t[::1] allowed=None,  # IN (n_database,) or None
):
    """Every database code within Hamming distance ``radius`` of each query.

    Two passes over the database: the first counts each query's matches,
    the second writes them, so the output is allocated once and exactly.

    Parameters
    ----------
    queries, database : ndarray of dtype uint64, C-contiguous
        Packed codes of the same number of words.
    radius : int
        Largest distance returned (inclusive), ``>= 0``.
    n_threads : int, default=1
    simd : bool or str, default=True
        Popcount path, as in :func:`hamming_kneighbors`.
    exclude : ndarray of shape (n_queries,), dtype=int64, default=None
        A database row never returned for each query (-1: none).
    allowed : ndarray of shape (n_database,), dtype=uint8, default=None
        Only rows whose entry is non-zero are returned.

    Returns
    -------
    offsets : ndarray of shape (n_queries + 1,), dtype=int64
        Query q's matches are ``indices[offsets[q]:offsets[q + 1]]``.
    distances : ndarray of shape (offsets[-1],), dtype=int32
    indices : ndarray of shape (offsets[-1],), dtype=int64
        In ascending database order within each query.
    """
    cdef Py_ssize_t n_queries = queries.shape[0]
    cdef Py_ssize_t n_database = database.shape[0]
    cdef Py_ssize_t n_words = database.shape[1]
    if queries.shape[1] != n_words:
        raise ValueError(
            f"queries have {queries.shape[1]} words per code but the database "
            f"has {n_words}; both must be packed from the same number of bits."
        )
    if n_words < 1:
        raise ValueError("codes must have at least one 64-bit word.")
    if radius < 0:
        raise ValueError(f"radius must be >= 0; got {radius}.")
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
        return counts, np.empty(0, np.int32), np.empty(0, np.int64)
    cdef int threshold = min(radius, <int>(64 * n_words)) + 1
    cdef Py_ssize_t db_block = max(8, (DB_BLOCK_BYTES // (8 * n_words)) // 8 * 8)
    cdef Py_ssize_t n_db_blocks = (n_database + db_block - 1) // db_block
    cdef const uint64_t* db = &database[0, 0]
    cdef const uint64_t* qs = &queries[0, 0]
    cdef const int64_t* excl = &exclude[0] if exclude is not None else NULL
    cdef const uint8_t* allow = &allowed[0] if allowed is not None else NULL
    cdef int use_simd = sh_detect_simd(max_simd_level(simd))
    cdef int64_t[::1] cnt = counts
    cdef int64_t[::1] offs
    cdef int32_t[::1] out_dist
    cdef int64_t[::1] out_idx
    cdef Py_ssize_t q, j, jb, j0, j1, w, c, n_found, at, p
    cdef int failed = 0
    cdef bint ok  # per thread: its buffers were allocated
    cdef int* failed_flag = &failed
    cdef int32_t* found_pos
    cdef int32_t* found_dist
    # The database interleaved once by groups of 8 rows, as the popcount helper reads it.
    cdef Py_ssize_t n_groups = (n_database + 7) // 8
    interleaved = np.zeros(n_groups * n_words * 8, dtype=np.uint64)
    cdef uint64_t[::1] inter = interleaved
    with nogil:
        for j in range(n_database):
            for w in range(n_words):
                inter[((j // 8) * n_words + w) * 8 + j % 8] = db[j * n_words + w]
    cdef const uint64_t* blocks = &inter[0]
    distances = np.empty(0, np.int32)
    indices = np.empty(0, np.int64)
    for p in range(2):
        if p == 1:
            counts = np.cumsum(counts)
            offsets = counts[:-1].copy()  # write positions, advanced while filling
            offs = offsets
            total = int(counts[-1])
            distances = np.empty(total, np.int32)
            indices = np.empty(total, np.int64)
            out_dist = distances
            out_idx = indices
        with nogil, parallel(num_threads=n_threads):
            found_pos = <int32_t*> malloc(db_block * sizeof(int32_t))
            found_dist = <int32_t*> malloc(db_block * sizeof(int32_t))
            # All threads must meet the loop (OpenMP); one without buffers skips its turns.
            ok = not (found_pos == NULL or found_dist == NULL)
            if not ok:
                failed_flag[0] = 1
            for q in prange(n_queries, schedule="static"):
                if ok:
                    for jb in range(n_db_blocks):
                        j0 = jb * db_block
                        j1 = min(j0 + db_block, n_database)
                        n_found = sh_block_candidates(use_simd, qs + q * n_words,
                                                      blocks + j0 * n_words, j1 - j0,
                                                      n_words, threshold, found_pos, found_dist)
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
            raise MemoryError("could not allocate the Hamming search buffers.")
    return counts, distances, indices
