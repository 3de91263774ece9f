"""Exact k-nearest-neighbour search in Hamming space by multi-index hashing.

Norouzi, Punjani and Fleet (CVPR 2012, TPAMI 2014): the codes are cut into
m substrings and each substring indexes the database in a hash table. By
the pigeonhole principle, a code within distance ``m * (s + 1) - 1`` of the
query has at least one substring within distance ``s`` of the query's. So
the search probes, for s = 0, 1, 2, ..., every table bucket whose key is at
distance exactly s from the query's substring, checks each new candidate's
full distance, and stops once it holds k codes of which the worst is within
``m * (s + 1) - 1``: every code at that distance or less has then been seen,
ties included, and the answer is the exact one, ties by database index.

Tables are dense: substring i of b_i bits has ``2**b_i + 1`` offsets into an
array of database indices sorted by substring value (ascending index within
a bucket), and beside it the codes in the same order, so that verifying a
bucket's candidates reads contiguous memory rather than one random code per
candidate. A bucket at substring distance s holds codes at distance s or
more, in ascending index: once the query's k-th best is below s, or equals s
with a smaller index than the bucket's next item, the rest of the bucket
cannot enter and is skipped (codes with many exact duplicates end their
search after a few items). A candidate is verified first (a popcount), and only one that
would enter the query's current k best is checked against the marks of the
items already taken: an item found again through another substring is then
either among the k best (marked: skipped) or was pushed out of them (worse
than the current k-th: rejected by the distance test alone).
"""

from cython.parallel cimport parallel, prange
from libc.stdint cimport int32_t, int64_t, intptr_t, uint8_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc

import numpy as np

cdef extern from "_popcount.h":
    int sh_popcount64(uint64_t x) noexcept nogil


cdef struct Touched:
    int64_t* ids      # database indices marked seen by the current query
    Py_ssize_t size
    Py_ssize_t cap


cdef inline bint _worse(int da, int64_t ia, int db, int64_t ib) noexcept nogil:
    return da > db or (da == db and ia > ib)


cdef void _sift_down(int* dist, int64_t* idx, Py_ssize_t size, Py_ssize_t i) noexcept nogil:
    cdef Py_ssize_t child, worst
    cdef int d
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


cdef void _offer(int* dist, int64_t* idx, Py_ssize_t* size, Py_ssize_t k, int d,
                 int64_t j) noexcept nogil:
    """Keep the k best (distance, index) pairs in a max-heap, worst on top."""
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
    elif _worse(dist[0], idx[0], d, j):
        dist[0] = d
        idx[0] = j
        _sift_down(dist, idx, k, 0)


cdef inline uint64_t _substring(const uint64_t* code, Py_ssize_t lo, Py_ssize_t bits) noexcept nogil:
    """Bits lo .. lo + bits - 1 of a packed code (bits <= 32)."""
    cdef Py_ssize_t w = lo >> 6
    cdef Py_ssize_t off = lo & 63
    cdef uint64_t value = code[w] >> off
    if off + bits > 64:
        value = value | (code[w + 1] << (64 - off))
    return value & ((<uint64_t> 1 << bits) - 1)


def substrings(const uint64_t[:, ::1] codes, const int64_t[::1] bounds):
    """The substring values of every code: shape (n_codes, m), dtype=int64."""
    cdef Py_ssize_t n = codes.shape[0], m = bounds.shape[0] - 1, i, s
    out = np.empty((n, m), dtype=np.int64)
    cdef int64_t[:, ::1] o = out
    with nogil:
        for i in range(n):
            for s in range(m):
                o[i, s] = <int64_t> _substring(&codes[i, 0], bounds[s], bounds[s + 1] - bounds[s])
    return out


def mih_kneighbors(
    const uint64_t[:, ::1] queries,    # IN (n_queries, n_words)
    const uint64_t[:, ::1] database,   # IN (n_database, n_words)
    const int64_t[::1] bounds,         # IN (m + 1,) substring bit bounds
    const intptr_t[::1] table_offsets, # IN (m,) addresses of int64 (2**b_i + 1,)
    const intptr_t[::1] table_ids,     # IN (m,) addresses of int64 (n_database,)
    const intptr_t[::1] table_codes,   # IN (m,) addresses of uint64 (n_database, n_words)
    Py_ssize_t k,
    int n_threads=1,
    const int64_t[::1] exclude=None,   # IN (n_queries,) or None
    const uint8_t[::1] allowed=None,   # IN (n_database,) or None
    int64_t[:, ::1] work=None,         # OUT (n_queries, 2) or None
):
    """k nearest database codes of each query by multi-index hashing (exact).

    Returns the same as :func:`~sklearn_hash._kernels._hamming.hamming_kneighbors`:
    int32 distances and int64 indices ranked by (distance, index), padded
    with ``2**31 - 1`` and -1 when fewer than k codes are candidates. The
    tables must index exactly the rows of ``database``; table i's codes are
    ``database[ids_i]``, in the order of its ids. With ``work``, row q
    receives the buckets probed and the codes verified for query q (what
    ``algorithm="auto"`` weighs against a scan).
    """
    cdef Py_ssize_t n_queries = queries.shape[0]
    cdef Py_ssize_t n_database = database.shape[0]
    cdef Py_ssize_t n_words = database.shape[1]
    cdef Py_ssize_t m = bounds.shape[0] - 1
    b = np.diff(np.asarray(bounds))
    if queries.shape[1] != n_words:
        raise ValueError("queries and database must be packed from the same number of bits.")
    if (m < 1 or table_offsets.shape[0] != m or table_ids.shape[0] != m
            or table_codes.shape[0] != m):
        raise ValueError("bounds must delimit m >= 1 substrings, with one table each.")
    if np.any(b < 1) or np.any(b > 32) or bounds[0] != 0 or bounds[m] > 64 * n_words:
        raise ValueError("substrings must have 1 to 32 bits within the codes.")
    if (np.any(np.asarray(table_offsets) == 0) or np.any(np.asarray(table_ids) == 0)
            or np.any(np.asarray(table_codes) == 0)):
        raise ValueError("every substring needs its table.")
    if k < 0:
        raise ValueError(f"k must be >= 0; got k={k}.")
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1; got {n_threads}.")
    if exclude is not None and exclude.shape[0] != n_queries:
        raise ValueError("exclude must have one entry per query.")
    if allowed is not None and allowed.shape[0] != n_database:
        raise ValueError("allowed must have one entry per database row.")
    if work is not None and (work.shape[0] != n_queries or work.shape[1] != 2):
        raise ValueError("work must have shape (n_queries, 2).")
    distances = np.full((n_queries, k), 2**31 - 1, dtype=np.int32)
    indices = np.full((n_queries, k), -1, dtype=np.int64)
    if n_queries == 0 or k == 0 or n_database == 0:
        return distances, indices
    cdef int32_t[:, ::1] out_d = distances
    cdef int64_t[:, ::1] out_i = indices
    cdef int max_bits = int(b.max())
    cdef const int64_t* excl = &exclude[0] if exclude is not None else NULL
    cdef const uint8_t* allow = &allowed[0] if allowed is not None else NULL
    cdef Py_ssize_t words_seen = (n_database + 63) // 64

    cdef Py_ssize_t q, s, i, c, w, size, bits, lo
    cdef int64_t j, start, stop, e, n_probed, n_verified
    cdef bint counting = work is not None
    cdef uint64_t key, mask, low, r, limit
    cdef int d, bound
    cdef int failed = 0
    cdef bint ok  # per thread: its buffers were allocated
    cdef int* failed_flag = &failed
    cdef uint64_t* seen
    cdef Touched* touched
    cdef int64_t* grown
    cdef int* hd
    cdef int64_t* hi
    cdef const int64_t* offs
    cdef const int64_t* ids
    cdef const uint64_t* tcodes
    cdef const uint64_t* qc

    with nogil, parallel(num_threads=n_threads):
        seen = <uint64_t*> calloc(words_seen, sizeof(uint64_t))
        touched = <Touched*> malloc(sizeof(Touched))
        if touched != NULL:
            touched.cap = 1024
            touched.size = 0
            touched.ids = <int64_t*> malloc(touched.cap * sizeof(int64_t))
        hd = <int*> malloc(k * sizeof(int))
        hi = <int64_t*> malloc(k * sizeof(int64_t))
        # All threads must meet the loop (OpenMP); one without buffers skips its turns.
        ok = not (seen == NULL or touched == NULL or touched.ids == NULL or hd == NULL
                    or hi == NULL)
        if not ok:
            failed_flag[0] = 1
        for q in prange(n_queries, schedule="dynamic"):
            if ok:
                qc = &queries[q, 0]
                size = 0
                touched.size = 0
                n_probed = 0
                n_verified = 0
                e = excl[q] if excl != NULL else -1
                for s in range(max_bits + 1):
                    for i in range(m):
                        lo = bounds[i]
                        bits = bounds[i + 1] - lo
                        if s > bits:
                            continue
                        key = _substring(qc, lo, bits)
                        offs = <const int64_t*> table_offsets[i]
                        ids = <const int64_t*> table_ids[i]
                        tcodes = <const uint64_t*> table_codes[i]
                        limit = (<uint64_t> 1) << bits
                        # Every mask of `bits` bits with s ones (Gosper's hack).
                        mask = ((<uint64_t> 1) << s) - 1
                        while mask < limit:
                            start = offs[key ^ mask]
                            stop = offs[(key ^ mask) + 1]
                            if size == k and hd[0] < s:
                                start = stop  # its codes are all at distance >= s
                            n_probed = n_probed + 1
                            for c in range(start, stop):
                                if size == k and hd[0] == s and ids[c] > hi[0]:
                                    break  # the rest: distance >= s, larger indices
                                n_verified = n_verified + 1
                                d = 0
                                for w in range(n_words):
                                    d = d + sh_popcount64(qc[w] ^ tcodes[c * n_words + w])
                                if size == k and d > hd[0]:
                                    continue
                                j = ids[c]
                                if size == k and d == hd[0] and j > hi[0]:
                                    continue
                                if seen[j >> 6] & ((<uint64_t> 1) << (j & 63)):
                                    continue
                                if j == e or (allow != NULL and not allow[j]):
                                    continue
                                seen[j >> 6] |= (<uint64_t> 1) << (j & 63)
                                if touched.size == touched.cap:
                                    grown = <int64_t*> realloc(
                                        touched.ids, 2 * touched.cap * sizeof(int64_t))
                                    if grown == NULL:
                                        failed_flag[0] = 1
                                        break
                                    touched.ids = grown
                                    touched.cap = 2 * touched.cap
                                touched.ids[touched.size] = j
                                touched.size = touched.size + 1
                                _offer(hd, hi, &size, k, d, j)
                            if mask == 0:
                                break
                            low = mask & (~mask + 1)
                            r = mask + low
                            mask = (((r ^ mask) >> 2) // low) | r
                    # Every code within m * (s + 1) - 1 has been seen.
                    bound = <int> (m * (s + 1) - 1)
                    if size == k and hd[0] <= bound:
                        break
                # Heap sort into ascending (distance, index), then clear the marks.
                c = size
                while c > 1:
                    c = c - 1
                    d = hd[0]; hd[0] = hd[c]; hd[c] = d
                    j = hi[0]; hi[0] = hi[c]; hi[c] = j
                    _sift_down(hd, hi, c, 0)
                for c in range(size):
                    out_d[q, c] = hd[c]
                    out_i[q, c] = hi[c]
                for c in range(touched.size):
                    seen[touched.ids[c] >> 6] = 0
                if counting:
                    work[q, 0] = n_probed
                    work[q, 1] = n_verified
        free(seen)
        if touched != NULL:
            free(touched.ids)
        free(touched)
        free(hd)
        free(hi)
    if failed:
        raise MemoryError("could not allocate the multi-index hashing buffers.")
    return distances, indices
