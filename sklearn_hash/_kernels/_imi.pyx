"""The multi-sequence algorithm of the inverted multi-index.

Babenko and Lempitsky (CVPR 2012): a cell of the multi-index is a pair (i, j)
of codewords, one per half of the vector, and its coarse distance to a query
is ``d1[i] + d2[j]``, the sum of the halves' squared distances. With both
lists sorted, ``d1[a1] <= d1[a2] <= ...`` and ``d2[b1] <= ...``, the pairs
come out in increasing sum by a heap over positions (a, b): popping (a, b)
offers (a + 1, b) once (a + 1, b - 1) has been popped and (a, b + 1) once
(a - 1, b + 1) has, so the heap holds at most one pair per row and every
pair enters it exactly once. Cells holding nothing searchable are passed
over without counting.
"""

from cython.parallel cimport parallel, prange
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc

import numpy as np


cdef inline bint _before(double da, int64_t ca, double db, int64_t cb) noexcept nogil:
    return da < db or (da == db and ca < cb)


cdef void _push(double* hd, int64_t* hc, int64_t* ha, Py_ssize_t* size, double d,
                int64_t cell, int64_t a) noexcept nogil:
    """Add a pair to the min-heap ordered by (distance, cell number)."""
    cdef Py_ssize_t i = size[0], parent
    size[0] += 1
    while i > 0:
        parent = (i - 1) // 2
        if not _before(d, cell, hd[parent], hc[parent]):
            break
        hd[i] = hd[parent]; hc[i] = hc[parent]; ha[i] = ha[parent]
        i = parent
    hd[i] = d; hc[i] = cell; ha[i] = a


cdef void _pop(double* hd, int64_t* hc, int64_t* ha, Py_ssize_t* size) noexcept nogil:
    """Remove the heap's first pair."""
    cdef Py_ssize_t n = size[0] - 1, i = 0, child
    cdef double d = hd[n]
    cdef int64_t cell = hc[n], a = ha[n]
    size[0] = n
    while True:
        child = 2 * i + 1
        if child >= n:
            break
        if child + 1 < n and _before(hd[child + 1], hc[child + 1], hd[child], hc[child]):
            child += 1
        if not _before(hd[child], hc[child], d, cell):
            break
        hd[i] = hd[child]; hc[i] = hc[child]; ha[i] = ha[child]
        i = child
    hd[i] = d; hc[i] = cell; ha[i] = a


def _is_permutation(order):
    """Whether each row holds every number of ``range(n_columns)`` once (O(n), no sort)."""
    n, K = order.shape
    if order.size == 0:
        return True
    if order.min() < 0 or order.max() >= K:
        return False
    seen = np.zeros((n, K), dtype=bool)
    seen[np.arange(n)[:, None], order] = True
    return bool(seen.all())


def multi_sequence(
    const int64_t[:, ::1] order1,   # IN (n_queries, K1) first-half codewords, nearest first
    const double[:, ::1] dist1,     # IN (n_queries, K1) their distances, ascending
    const int64_t[:, ::1] order2,   # IN (n_queries, K2)
    const double[:, ::1] dist2,     # IN (n_queries, K2)
    const int64_t[::1] sizes,       # IN (K1 * K2,) searchable items per cell
    Py_ssize_t n_probe,
    int64_t n_required,
    Py_ssize_t width,
    int n_threads=1,
):
    """The cells each query visits, in increasing coarse distance.

    Cell ``i * K2 + j`` joins first-half codeword i and second-half codeword
    j. Query q visits cells with ``sizes > 0`` in increasing ``dist1 +
    dist2`` (float64; equal sums by cell number) until it has visited
    ``n_probe`` of them and they hold at least ``n_required`` items, or every
    cell has been seen.

    Parameters
    ----------
    order1, order2 : ndarray of shape (n_queries, K1) and (n_queries, K2), dtype=int64
        Each row a permutation of the codeword numbers, by ascending distance
        (equal distances by codeword number).
    dist1, dist2 : ndarray of the same shapes, dtype=float64
        The distances in that order (ascending per row).
    sizes : ndarray of shape (K1 * K2,), dtype=int64
    n_probe : int
        Non-empty cells to visit, >= 1.
    n_required : int
        Items the visited cells must hold.
    width : int
        Columns of the output; a query needing more reports ``n_visit = -1``
        (call again with a wider output).
    n_threads : int, default=1

    Returns
    -------
    cells : ndarray of shape (n_queries, width), dtype=int64
    coarse : ndarray of shape (n_queries, width), dtype=float64
        The visited cells' coarse distances.
    n_visit : ndarray of shape (n_queries,), dtype=int64
        Cells visited by each query (its first columns), -1 where ``width``
        was too small.
    """
    cdef Py_ssize_t n_queries = order1.shape[0]
    cdef Py_ssize_t K1 = order1.shape[1]
    cdef Py_ssize_t K2 = order2.shape[1]
    if (dist1.shape[0] != n_queries or dist1.shape[1] != K1 or order2.shape[0] != n_queries
            or dist2.shape[0] != n_queries or dist2.shape[1] != K2):
        raise ValueError("order1/dist1 and order2/dist2 must have shapes (n_queries, K1) "
                         "and (n_queries, K2).")
    if sizes.shape[0] != K1 * K2:
        raise ValueError(f"sizes must hold K1 * K2 = {K1 * K2} cells; got {sizes.shape[0]}.")
    if n_probe < 1 or width < 1:
        raise ValueError(f"n_probe and width must be >= 1; got {n_probe} and {width}.")
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1; got {n_threads}.")
    if n_queries and not (_is_permutation(np.asarray(order1))
                          and _is_permutation(np.asarray(order2))):
        raise ValueError("each row of order1 and order2 must be a permutation of the "
                         "codeword numbers.")

    cells_out = np.full((n_queries, width), -1, dtype=np.int64)
    coarse_out = np.zeros((n_queries, width), dtype=np.float64)
    visit_out = np.zeros(n_queries, dtype=np.int64)
    if n_queries == 0 or K1 == 0 or K2 == 0:
        return cells_out, coarse_out, visit_out
    cdef int64_t[:, ::1] cells = cells_out
    cdef double[:, ::1] coarse = coarse_out
    cdef int64_t[::1] n_visit = visit_out

    cdef Py_ssize_t q, size, n_found, a, b
    cdef int64_t cell, items
    cdef double d
    cdef int failed = 0
    cdef bint ok  # per thread: its buffers were allocated
    cdef int* failed_flag = &failed
    cdef int64_t* popped      # per row a: how many of its pairs were popped
    cdef double* hd
    cdef int64_t* hc
    cdef int64_t* ha

    with nogil, parallel(num_threads=n_threads):
        popped = <int64_t*> malloc(K1 * sizeof(int64_t))
        hd = <double*> malloc((K1 + 1) * sizeof(double))
        hc = <int64_t*> malloc((K1 + 1) * sizeof(int64_t))
        ha = <int64_t*> malloc((K1 + 1) * sizeof(int64_t))
        # All threads must meet the loop (OpenMP); one without buffers skips its turns.
        ok = not (popped == NULL or hd == NULL or hc == NULL or ha == NULL)
        if not ok:
            failed_flag[0] = 1
        for q in prange(n_queries, schedule="dynamic"):
            if ok:
                for a in range(K1):
                    popped[a] = 0
                size = 0
                n_found = 0
                items = 0
                _push(hd, hc, ha, &size, dist1[q, 0] + dist2[q, 0],
                      order1[q, 0] * K2 + order2[q, 0], 0)
                while size > 0:
                    a = ha[0]
                    cell = hc[0]
                    d = hd[0]
                    _pop(hd, hc, ha, &size)
                    b = popped[a]
                    popped[a] = b + 1
                    if sizes[cell] > 0:
                        if n_found == width:
                            n_found = -1
                            break
                        cells[q, n_found] = cell
                        coarse[q, n_found] = d
                        n_found = n_found + 1
                        items = items + sizes[cell]
                        if n_found >= n_probe and items >= n_required:
                            break
                    # (a + 1, b) once (a + 1, b - 1) is out; (a, b + 1) once (a - 1, b + 1) is.
                    if a + 1 < K1 and (b == 0 or popped[a + 1] >= b):
                        _push(hd, hc, ha, &size, dist1[q, a + 1] + dist2[q, b],
                              order1[q, a + 1] * K2 + order2[q, b], a + 1)
                    if b + 1 < K2 and (a == 0 or popped[a - 1] > b + 1):
                        _push(hd, hc, ha, &size, dist1[q, a] + dist2[q, b + 1],
                              order1[q, a] * K2 + order2[q, b + 1], a)
                n_visit[q] = n_found
        free(popped)
        free(hd)
        free(hc)
        free(ha)

    if failed:
        raise MemoryError("could not allocate the multi-sequence buffers.")
    return cells_out, coarse_out, visit_out
