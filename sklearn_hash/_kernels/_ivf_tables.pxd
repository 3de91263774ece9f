# What the IVF kernels (_adc.pyx, _fastscan.pyx) share: one probe's float table.


cdef inline void probe_table(
    float* table,            # OUT (n_subspaces, n_codewords)
    const float* lt,         # IN the list term, read for the subspaces before the split
    const float* lt2,        # IN the list term read from the split on (the multi-index)
    const float* qt,         # IN the query term
    Py_ssize_t split_size,   # entries before the split: split * n_codewords
    Py_ssize_t table_size,   # n_subspaces * n_codewords
    Py_ssize_t n_codewords,
    float base,              # the coarse distance, added to row 0
) noexcept nogil:
    """``table = list term + query term``, then ``base`` added to row 0, in float32."""
    cdef Py_ssize_t e
    for e in range(split_size):
        table[e] = lt[e] + qt[e]
    for e in range(split_size, table_size):
        table[e] = lt2[e] + qt[e]
    for e in range(n_codewords):
        table[e] = table[e] + base
