# The matches of a range search, gathered per query by the IVF range kernels
# (``_adc.ivf_adc_radius``, ``_fastscan.ivf_fastscan_radius``): each thread
# appends a query's (index, distance) pairs to a buffer that grows, then keeps
# a copy sorted by index (``hold_matches``); ``_adc._gather_matches`` joins the
# copies into the CSR arrays the kernels return, and frees them.

from libc.stdint cimport int64_t, intptr_t
from libc.stdlib cimport malloc, qsort, realloc
from libc.string cimport memcpy


cdef struct Match:
    int64_t index
    float distance


cdef inline int _by_index(const void* a, const void* b) noexcept nogil:
    cdef int64_t ia = (<const Match*> a).index
    cdef int64_t ib = (<const Match*> b).index
    return (ia > ib) - (ia < ib)


cdef inline bint keep_match(Match** found, Py_ssize_t* size, Py_ssize_t* capacity, int64_t j,
                            float d) noexcept nogil:
    """Append (j, d) to a growing buffer; False when it cannot grow."""
    cdef Match* grown
    if size[0] == capacity[0]:
        grown = <Match*> realloc(found[0], 2 * capacity[0] * sizeof(Match))
        if grown == NULL:
            return False
        found[0] = grown
        capacity[0] = 2 * capacity[0]
    found[0][size[0]].index = j
    found[0][size[0]].distance = d
    size[0] = size[0] + 1
    return True


cdef inline bint hold_matches(Match* found, Py_ssize_t size, intptr_t* held,
                              int64_t* count) noexcept nogil:
    """Sort a query's matches by index and keep a copy at ``held[0]``; False without memory."""
    cdef Match* kept
    if size == 0:
        return True
    qsort(found, size, sizeof(Match), _by_index)
    kept = <Match*> malloc(size * sizeof(Match))
    if kept == NULL:
        return False
    memcpy(kept, found, size * sizeof(Match))
    held[0] = <intptr_t> kept
    count[0] = size
    return True
