"""Exact k-nearest-neighbour search over 4-bit product codes by fast-scan.

Codes with 16 codewords per subspace are kept in a block layout (see
``_fastscan.h``: blocks of 128 codes, nibbles transposed, one subspace of
64 codes per 64 bytes) that in-register byte shuffles read 32 or 64 codes at
a time. A search has two stages:

1. **Filter (approximate arithmetic).** Each query's float table is
   quantized to 8-bit integers: entry ``e = t - min_c t[m, c]`` becomes
   ``q = min(qmax, rint(e / s))``, with one scale ``s`` for all subspaces so
   that the integer sums still rank like the float sums. The scale is *not*
   set by the widest table (faiss's rule, which drowns every other subspace
   when one direction dominates the spectrum), but by the distances that can
   matter: a strided sample of the database gives ``U``, the k-th smallest
   float distance among sampled items, an upper bound on the k-th distance of
   the answer; entries beyond ``U - sum_m min_c t[m, c]`` can only belong to
   items outside the answer, so they saturate at ``qmax`` and the 255 levels
   cover the useful range (``s = min(U - bias, widest range) / qmax``).
   The quantized distances are added in 16-bit lanes; ``qmax = min(255,
   65535 // M)``, so they never overflow.
2. **Exact re-scoring.** Rounding moves each entry by at most a known amount,
   so ``s * Q - E <= D - bias``, with ``E = sum_m max_c (s q[m, c] - e[m,
   c])``: the quantized sum ``Q`` gives a lower bound of the float distance
   ``D``. An item is re-scored with the float table (the exact ADC distance,
   float32, added in subspace order as ``adc_kneighbors`` does) only if its
   lower bound does not exceed the current k-th best float distance (or the
   sample bound ``U`` before k items are found), plus a margin for float32
   rounding; its codeword indices are read from the block just scanned, so
   the blocks are the only copy of the codes a search needs. Every item
   that can enter the top k is re-scored, so the result **is** the exact
   ADC top k, ties by index: the same distances and
   indices as ``adc_kneighbors`` on the same codes and tables. Only the
   work depends on the quantization: items whose lower bound is close to
   the k-th distance are re-scored (a few tens per query on 1M codes).

``ivf_fastscan_kneighbors`` applies the same filter to the probed cells of
an inverted file (``IVFQuantizedNeighbors``), cell by cell, with the
query's current k-th distance as the bound of each probe's table.

Work is split over blocks of queries (OpenMP ``prange``), each block sharing
the database scan, cut into cache-sized parts; on the AVX-512 path two
queries at a time share the reading of the codes. The results do not depend on
the thread count, on the SIMD path, nor on how the codes are split in
chunks.
"""

from cython.parallel cimport parallel, prange
from libc.math cimport INFINITY, fabs, isfinite, rint
from libc.stdint cimport int32_t, int64_t, intptr_t, uint8_t, uint16_t
from libc.stdlib cimport free, malloc

import numpy as np

from ._adc import check_ivf_arguments, _gather_matches
from ._ivf_tables cimport probe_table
from ._matches cimport Match, hold_matches, keep_match

from ._simd import max_simd_level

cdef extern from *:
    void __builtin_prefetch(const void* p) noexcept nogil


cdef extern from "_fastscan.h":
    void sh_fs_pack(const uint8_t* codes, Py_ssize_t n, Py_ssize_t M, Py_ssize_t Mp,
                    uint8_t* blocks) noexcept nogil
    int sh_fs_detect_simd(int max_level) noexcept nogil
    Py_ssize_t sh_fs_scan(int simd, const uint8_t* lut, const uint8_t* blocks, Py_ssize_t n,
                          Py_ssize_t Mp, const uint8_t* allowed, int threshold,
                          int32_t* pos, uint16_t* dist) noexcept nogil
    void sh_fs_scan2(int simd, const uint8_t* lut_a, const uint8_t* lut_b,
                     const uint8_t* blocks, Py_ssize_t n, Py_ssize_t Mp,
                     const uint8_t* allowed, int threshold_a, int threshold_b,
                     int32_t* pos_a, uint16_t* dist_a, Py_ssize_t* count_a,
                     int32_t* pos_b, uint16_t* dist_b, Py_ssize_t* count_b) noexcept nogil
    float sh_fs_adc(const float* table, const uint8_t* code, Py_ssize_t M) noexcept nogil
    float sh_fs_adc_block(const float* table, const uint8_t* blocks, Py_ssize_t Mp,
                          Py_ssize_t M, Py_ssize_t e) noexcept nogil
    void sh_fs_unpack_rows(const uint8_t* blocks, Py_ssize_t Mp, Py_ssize_t M,
                           const int64_t* rows, Py_ssize_t n, uint8_t* codes) noexcept nogil
    void sh_fs_adc_rows(const float* table, const uint8_t* codes, Py_ssize_t n, Py_ssize_t M,
                        float* out) noexcept nogil
    void sh_fs_offer(float* dist, int64_t* idx, Py_ssize_t* size, Py_ssize_t k,
                     float d, int64_t j) noexcept nogil
    void sh_fs_heap_sort(float* dist, int64_t* idx, Py_ssize_t size) noexcept nogil
    int sh_fs_threshold(double d, const double* par) noexcept nogil
    Py_ssize_t sh_fs_rescore_found(
        const float* table, const uint8_t* blocks, Py_ssize_t Mp, const int64_t* ids,
        Py_ssize_t M,
        const int32_t* pos, const uint16_t* qd, Py_ssize_t n_found, Py_ssize_t r0,
        Py_ssize_t done, int64_t own, const uint8_t* allow, const double* par, int* thr,
        float* hd, int64_t* hi, Py_ssize_t* size, Py_ssize_t k) noexcept nogil
    int sh_fs_quantize_probe(int simd, const float* table, Py_ssize_t M, Py_ssize_t Mp, int qmax,
                             float kth, double fraction, float* lo, uint8_t* lut,
                             double* out) noexcept nogil


cdef enum:
    BLOCK = 128
    # Bytes of block layout scanned per part (shared by a block of queries).
    DB_BLOCK_BYTES = 65536
    # Queries sharing one pass over a part of the database.
    MAX_QUERY_BLOCK = 16
    # Database rows whose float distances bound the k-th distance before the scan.
    N_SAMPLE = 1024

_PATHS = ("portable", "avx2", "avx512")


cdef int sh_detect(simd) except -1:
    return sh_fs_detect_simd(max_simd_level(simd))


def simd_path(simd=True):
    """The shuffle path a fast-scan runs for ``simd`` on this processor.

    Returns ``"avx512"`` (AVX-512BW), ``"avx2"`` or ``"portable"``.
    """
    return _PATHS[sh_fs_detect_simd(max_simd_level(simd))]


BLOCK_ROWS = BLOCK


def padded_subspaces(Py_ssize_t n_subspaces):
    """Subspaces of the block layout: ``n_subspaces`` rounded up to an even number."""
    return n_subspaces + (n_subspaces & 1)


def block_bytes(Py_ssize_t n_subspaces):
    """Bytes of one block of 128 codes."""
    return padded_subspaces(n_subspaces) * 64


def check_4bit_codes(codes):
    """Raise a clear error unless every codeword index is below 16."""
    codes = np.asarray(codes)
    if codes.size:
        largest = int(codes.max())
        if largest >= 16 or int(codes.min()) < 0:
            raise ValueError(
                f"codeword indices must be in [0, 15]: fast-scan stores 4-bit codes (16 "
                f"codewords per subspace, subspace_bits=4); got values in "
                f"[{int(codes.min())}, {largest}]. Codes with more codewords are searched "
                f"by adc_kneighbors (TableScan)."
            )


def pack_blocks(const uint8_t[:, ::1] codes):  # IN (n, n_subspaces), each value < 16
    """Block layout of 4-bit codes: ``(ceil(n / 128), block_bytes(n_subspaces))`` uint8.

    Block s holds codes ``128 s .. 128 s + 127`` as four groups of 32; its
    bytes ``64 m + 16 g .. 64 m + 16 g + 15`` hold subspace m of group g,
    byte i carrying code ``128 s + 32 g + i`` in its low nibble and code
    ``128 s + 32 g + 16 + i`` in its high nibble. Missing rows and the
    padding subspace (odd ``n_subspaces``) are zero.
    """
    check_4bit_codes(codes)
    cdef Py_ssize_t n = codes.shape[0]
    cdef Py_ssize_t M = codes.shape[1]
    cdef Py_ssize_t Mp = padded_subspaces(M)
    blocks = np.zeros(((n + BLOCK - 1) // BLOCK, Mp * 64), dtype=np.uint8)
    cdef uint8_t[:, ::1] out = blocks
    if n and M:
        with nogil:
            sh_fs_pack(&codes[0, 0], n, M, Mp, &out[0, 0])
    return blocks


def unpack_block_rows(
    const uint8_t[:, ::1] blocks,  # IN (n_blocks, block_bytes(n_subspaces))
    const int64_t[::1] rows,       # IN (n,) row numbers in the layout, 128 per block
    Py_ssize_t n_subspaces,
):
    """Codes of some rows of a block layout: the inverse of :func:`pack_blocks`.

    Row ``r`` is code ``r % 128`` of block ``r // 128``, so that
    ``unpack_block_rows(pack_blocks(codes), np.arange(n), M)`` is ``codes``.

    Returns
    -------
    codes : ndarray of shape (n, n_subspaces), dtype=uint8
        One codeword index (< 16) per byte.
    """
    cdef Py_ssize_t M = n_subspaces
    cdef Py_ssize_t Mp = padded_subspaces(M) if M > 0 else 0
    if M < 1 or blocks.shape[1] != Mp * 64:
        raise ValueError(f"blocks of {blocks.shape[1]} bytes do not hold codes of "
                         f"{n_subspaces} subspaces ({Mp * 64} bytes per block).")
    cdef Py_ssize_t n = rows.shape[0]
    if n and (np.min(rows) < 0 or np.max(rows) >= blocks.shape[0] * BLOCK):
        raise ValueError(f"rows must be in [0, {blocks.shape[0] * BLOCK - 1}] (128 per "
                         f"block); got values in [{np.min(rows)}, {np.max(rows)}].")
    codes = np.empty((n, M), dtype=np.uint8)
    cdef uint8_t[:, ::1] out = codes
    if n:
        with nogil:
            sh_fs_unpack_rows(&blocks[0, 0], Mp, M, &rows[0], n, &out[0, 0])
    return codes


def quantized_candidates(
    const uint8_t[:, ::1] lut,       # IN (Mp, 16) quantized table, entries <= 127
    const uint8_t[:, ::1] blocks,    # IN (n_blocks, Mp * 64) block layout
    Py_ssize_t n,
    int threshold,
    const uint8_t[::1] allowed=None,  # IN (n,) or None
    simd=True,
):
    """Rows of one scan whose quantized distance is below threshold (the filter alone).

    Exposes the SIMD scan for tests: returns the rows (int32, ascending) among
    the first ``n`` codes of ``blocks`` whose sum of ``lut`` entries is below
    ``threshold`` (0 to 65536) and that are allowed, with those sums (uint16).
    """
    cdef Py_ssize_t Mp = lut.shape[0]
    if lut.shape[1] != 16 or Mp % 2 or blocks.shape[1] != Mp * 64:
        raise ValueError("lut must have shape (Mp, 16), Mp even, and blocks Mp * 64 bytes "
                         "per block.")
    if n < 0 or n > blocks.shape[0] * BLOCK:
        raise ValueError(f"n must be in [0, {blocks.shape[0] * BLOCK}].")
    if np.asarray(lut).size and int(np.asarray(lut).max()) > 127:
        raise ValueError("lut entries must be at most 127.")
    if Mp * 127 > 65535:
        raise ValueError("too many subspaces for 16-bit sums of 127-level entries.")
    if not 0 <= threshold <= 65536:
        raise ValueError("threshold must be in [0, 65536].")
    if allowed is not None and allowed.shape[0] != n:
        raise ValueError("allowed must have one entry per row.")
    pos = np.empty(n, dtype=np.int32)
    dist = np.empty(n, dtype=np.uint16)
    cdef int32_t[::1] pos_v = pos
    cdef uint16_t[::1] dist_v = dist
    cdef int use_simd = sh_detect(simd)
    cdef Py_ssize_t found = 0
    if n:
        found = sh_fs_scan(use_simd, &lut[0, 0], &blocks[0, 0], n, Mp,
                           &allowed[0] if allowed is not None else NULL,
                           threshold, &pos_v[0], &dist_v[0])
    return pos[:found], dist[:found]


cdef void _quantize(
    const float* table,   # IN (M, 16)
    Py_ssize_t M,
    Py_ssize_t Mp,
    int qmax,
    float bound,          # the sample's k-th distance (inf: none)
    bint clip,            # False: scale by the widest table alone (faiss's rule)
    uint8_t* lut,         # OUT (Mp * 16,)
    double* out,          # OUT scale, bias, e_over, slack
) noexcept nogil:
    cdef Py_ssize_t m, c
    cdef double lo, hi, widest = 0, bias = 0, size = 0, span, inv, scale, e, worst, x
    cdef double e_over = 0
    for m in range(M):
        lo = table[m * 16]
        hi = table[m * 16]
        for c in range(1, 16):
            lo = min(lo, <double> table[m * 16 + c])
            hi = max(hi, <double> table[m * 16 + c])
        bias = bias + lo
        size = size + max(fabs(lo), fabs(hi))
        widest = max(widest, hi - lo)
    span = widest
    if clip and isfinite(bound) and bound - bias > 0:
        span = min(widest, bound - bias)
    for c in range(Mp * 16):
        lut[c] = 0
    scale = 0
    if span > 0:
        inv = qmax / span
        scale = span / qmax
        for m in range(M):
            lo = table[m * 16]
            for c in range(1, 16):
                lo = min(lo, <double> table[m * 16 + c])
            worst = -INFINITY
            for c in range(16):
                e = table[m * 16 + c] - lo
                x = min(<double> qmax, rint(e * inv))
                lut[m * 16 + c] = <uint8_t> x
                worst = max(worst, scale * x - e)
            e_over = e_over + worst
    out[0] = scale
    out[1] = bias
    out[2] = e_over
    # float32 sums of M terms are off by at most (M - 1) 2**-24 sum |t|.
    out[3] = 4.0 * M * size * 5.9604644775390625e-08 + 1e-30


cdef void _take(
    Py_ssize_t n_found,
    const int32_t* pos,       # IN (n_found,) rows of the part
    const uint16_t* qd,       # IN (n_found,) their quantized distances
    int thr,
    int64_t first,            # database index of the part's first row
    int64_t own,              # excluded index (-1: none)
    const float* table,       # IN (M, 16)
    const uint8_t* blocks,    # IN the part's blocks (its first row starts a block)
    Py_ssize_t Mp,
    Py_ssize_t M,
    const double* p,          # IN scale, bias, e_over, slack
    float* hd,                # IN/OUT (k,) heap
    int64_t* hi,              # IN/OUT (k,)
    Py_ssize_t* size,         # IN/OUT
    Py_ssize_t k,
    int64_t* rescored,        # IN/OUT
) noexcept nogil:
    """Re-score the scan's candidates with the float table and offer them to the heap.

    Each candidate's codeword indices are read from the blocks just scanned.
    """
    cdef Py_ssize_t c
    cdef int64_t j
    for c in range(n_found):
        if qd[c] >= thr:
            continue  # the bound fell since the scan began
        j = first + pos[c]
        if j == own:
            continue
        rescored[0] += 1
        sh_fs_offer(hd, hi, size, k, sh_fs_adc_block(table, blocks, Mp, M, pos[c]), j)
        if size[0] == k:
            thr = min(thr, sh_fs_threshold(hd[0], p))


def fastscan_kneighbors(
    const float[:, :, ::1] tables,  # IN (n_queries, n_subspaces, 16)
    list block_chunks,               # IN block layouts (pack_blocks), one per chunk of rows
    chunk_sizes,                     # IN rows in each chunk
    Py_ssize_t k,
    int n_threads=1,
    simd=True,
    const int64_t[::1] exclude=None,  # IN (n_queries,) or None
    const uint8_t[::1] allowed=None,  # IN (n_database,) or None
    bint return_stats=False,
    bint clip_tables=True,
):
    """Exact k nearest 4-bit codes of each query by ADC, with a fast-scan filter.

    The database is the concatenation of the chunks (row indices run on
    from one chunk to the next); ``block_chunks[i]`` is
    ``pack_blocks(codes_i)`` for the ``chunk_sizes[i]`` codes of chunk i,
    and holds the only copy the search needs: the filter scans the blocks,
    and the re-scoring reads its candidates' codeword indices from them.
    The answer equals ``adc_kneighbors`` on the concatenated codes: float32
    ADC distances, ranked by distance then index (see the module docstring
    for why the quantized filter loses nothing).

    Parameters
    ----------
    tables : ndarray of shape (n_queries, n_subspaces, 16), dtype=float32
        Per-query ADC tables, C-contiguous, finite.
    block_chunks : list of ndarray of shape (ceil(n_i / 128), block_bytes), dtype=uint8
        The codes of each chunk in the block layout, C-contiguous, of
        ``n_subspaces`` subspaces (the blocks' width cannot tell an odd
        count from the next even one: the caller keeps them consistent).
    chunk_sizes : sequence of int
        ``n_i``, the codes in each chunk (its last block may be part full).
    k : int
        Neighbours, ``k >= 0``.
    n_threads : int, default=1
    simd : bool or {"avx512", "avx2", "portable"}, default=True
        Shuffle path: ``True`` the widest the processor has (AVX-512BW, else
        AVX2, else portable C); a name caps it; ``False`` means portable.
        All give the same results.
    exclude : ndarray of shape (n_queries,), dtype=int64, default=None
        A database row never returned for each query (-1: none).
    allowed : ndarray of shape (n_database,), dtype=uint8, default=None
        Only rows whose entry is non-zero are candidates (tested in the scan).
    return_stats : bool, default=False
        Also return a dict: ``luts`` (n_queries, Mp, 16) uint8 quantized
        tables, ``scale``, ``bias``, ``e_over``, ``slack`` (float64 per query)
        and ``bound`` (float32: the sample's k-th distance, inf if none),
        and ``rescored`` (int64: items re-scored with the float table).
    clip_tables : bool, default=True
        Scale the quantized tables by the sampled bound (entries beyond it
        saturate). False scales them by the widest table range alone, as
        faiss does: the answers stay exact, but far more items pass the
        filter when one subspace dominates (for measurements).

    Returns
    -------
    distances : ndarray of shape (n_queries, k), dtype=float32
    indices : ndarray of shape (n_queries, k), dtype=int64
        Ascending distance, then ascending index; padded with ``inf`` and
        -1 where fewer than k candidates exist.
    """
    cdef Py_ssize_t n_queries = tables.shape[0]
    cdef Py_ssize_t M = tables.shape[1]
    cdef Py_ssize_t Mp = padded_subspaces(M)
    cdef Py_ssize_t bb = Mp * 64
    cdef Py_ssize_t n_chunks = len(block_chunks)

    if tables.shape[2] != 16:
        raise ValueError(f"fast-scan searches 4-bit codes: tables must have 16 codewords per "
                         f"subspace; got {tables.shape[2]}.")
    if M < 1:
        raise ValueError("tables must have at least one subspace.")
    sizes = np.asarray(chunk_sizes)
    if sizes.shape != (n_chunks,) or (n_chunks and (sizes.dtype.kind not in "iu"
                                                    or sizes.min() < 0
                                                    or sizes.max() > np.iinfo(np.int64).max)):
        raise ValueError(f"chunk_sizes must hold one non-negative int per chunk ({n_chunks}); "
                         f"got {chunk_sizes!r}.")
    sizes = sizes.astype(np.int64)
    if k < 0:
        raise ValueError(f"k must be >= 0; got k={k}.")
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1; got {n_threads}.")
    blocks_at = np.zeros(n_chunks, dtype=np.intp)
    for i in range(n_chunks):
        blocks = block_chunks[i]
        n_blocks = (sizes[i] + BLOCK - 1) // BLOCK
        if (not isinstance(blocks, np.ndarray) or blocks.dtype != np.uint8
                or blocks.shape != (n_blocks, bb) or not blocks.flags.c_contiguous):
            raise ValueError(f"block_chunks[{i}] must hold {sizes[i]} codes of {M} subspaces in "
                             f"the block layout: a C-contiguous uint8 array of shape "
                             f"{(n_blocks, bb)}.")
        if sizes[i]:
            blocks_at[i] = blocks.ctypes.data
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    cdef Py_ssize_t n_database = int(starts[n_chunks])
    if exclude is not None and exclude.shape[0] != n_queries:
        raise ValueError(f"exclude must have one entry per query ({n_queries}); "
                         f"got {exclude.shape[0]}.")
    if allowed is not None and allowed.shape[0] != n_database:
        raise ValueError(f"allowed must have one entry per database row ({n_database}); "
                         f"got {allowed.shape[0]}.")
    if n_queries and not np.isfinite(np.asarray(tables)).all():
        raise ValueError("tables hold NaN or infinity.")

    distances = np.full((n_queries, k), np.inf, dtype=np.float32)
    indices = np.full((n_queries, k), -1, dtype=np.int64)
    luts = np.zeros((n_queries, Mp, 16), dtype=np.uint8)
    params = np.zeros((n_queries, 4), dtype=np.float64)
    bounds = np.full(n_queries, np.inf, dtype=np.float32)
    rescored = np.zeros(n_queries, dtype=np.int64)
    stats = {"luts": luts, "scale": params[:, 0], "bias": params[:, 1],
             "e_over": params[:, 2], "slack": params[:, 3], "bound": bounds,
             "rescored": rescored}
    if n_queries == 0 or k == 0 or n_database == 0:
        return (distances, indices, stats) if return_stats else (distances, indices)

    # The sample: rows i * n // S, their codes unpacked once.
    cdef Py_ssize_t n_sample = min(n_database, N_SAMPLE)
    sample_rows = (np.arange(n_sample, dtype=np.int64) * n_database) // n_sample
    which = np.searchsorted(starts, sample_rows, side="right") - 1
    sample_codes = np.empty((n_sample, M), dtype=np.uint8)
    for i in np.unique(which):
        at = which == i
        sample_codes[at] = unpack_block_rows(block_chunks[i], sample_rows[at] - starts[i], M)

    cdef float[:, ::1] out_dist = distances
    cdef int64_t[:, ::1] out_idx = indices
    cdef uint8_t[:, :, ::1] lut_v = luts
    cdef double[:, ::1] par = params
    cdef float[::1] bound_v = bounds
    cdef int64_t[::1] resc = rescored
    cdef const int64_t[::1] srow = sample_rows
    cdef const uint8_t[:, ::1] scodes = sample_codes
    cdef const intptr_t[::1] b_at = blocks_at
    cdef const int64_t[::1] c_start = starts
    cdef const int64_t* excl = &exclude[0] if exclude is not None else NULL
    cdef const uint8_t* allow = &allowed[0] if allowed is not None else NULL
    cdef const float* tab = &tables[0, 0, 0]
    cdef int qmax = <int> min(127, 65535 // M)
    cdef int use_simd = sh_detect(simd)
    cdef Py_ssize_t query_block = max(
        1, min(MAX_QUERY_BLOCK, (n_queries + n_threads - 1) // n_threads))
    cdef Py_ssize_t n_query_blocks = (n_queries + query_block - 1) // query_block
    cdef Py_ssize_t db_block = max(1, DB_BLOCK_BYTES // bb) * BLOCK

    cdef Py_ssize_t q, s, b, q0, q1, ch, j0, j1, c, n_found, nrow, size
    cdef int64_t j, own, start
    cdef int thr
    cdef float d
    cdef double* p
    cdef const uint8_t* chunk_blocks
    cdef const float* tq
    cdef int failed = 0
    cdef bint ok  # per thread: its buffers were allocated
    cdef int* failed_flag = &failed
    cdef float* sd
    cdef float* sample_d
    cdef int64_t* si
    cdef Py_ssize_t* heap_sizes
    cdef int32_t* found_pos
    cdef uint16_t* found_q
    cdef int32_t* found_pos2
    cdef uint16_t* found_q2
    cdef Py_ssize_t n_found2
    cdef int thr2

    with nogil, parallel(num_threads=n_threads):
        # Per query: the sample's k-th distance, then the quantized table.
        sd = <float*> malloc(k * sizeof(float))
        si = <int64_t*> malloc(k * sizeof(int64_t))
        sample_d = <float*> malloc(n_sample * sizeof(float))
        # All threads must meet the loop (OpenMP); one without buffers skips its turns.
        ok = not (sd == NULL or si == NULL or sample_d == NULL)
        if not ok:
            failed_flag[0] = 1
        for q in prange(n_queries, schedule="static"):
            if ok:
                own = excl[q] if excl != NULL else -1
                size = 0
                tq = tab + q * M * 16
                sh_fs_adc_rows(tq, &scodes[0, 0], n_sample, M, sample_d)
                for s in range(n_sample):
                    j = srow[s]
                    if j == own or (allow != NULL and not allow[j]):
                        continue
                    sh_fs_offer(sd, si, &size, k, sample_d[s], j)
                bound_v[q] = sd[0] if size == k else INFINITY
                _quantize(tq, M, Mp, qmax, bound_v[q], clip_tables, &lut_v[q, 0, 0],
                          &par[q, 0])
        free(sd)
        free(si)
        free(sample_d)
    if failed:  # some tables were not quantized: no scan on them
        raise MemoryError("could not allocate the fast-scan search buffers.")

    with nogil, parallel(num_threads=n_threads):
        heap_sizes = <Py_ssize_t*> malloc(query_block * sizeof(Py_ssize_t))
        found_pos = <int32_t*> malloc(db_block * sizeof(int32_t))
        found_q = <uint16_t*> malloc(db_block * sizeof(uint16_t))
        found_pos2 = <int32_t*> malloc(db_block * sizeof(int32_t))
        found_q2 = <uint16_t*> malloc(db_block * sizeof(uint16_t))
        # All threads must meet the loop (OpenMP); one without buffers skips its turns.
        ok = not (heap_sizes == NULL or found_pos == NULL or found_q == NULL
                    or found_pos2 == NULL or found_q2 == NULL)
        if not ok:
            failed_flag[0] = 1
        for b in prange(n_query_blocks, schedule="static"):
            if ok:
                q0 = b * query_block
                q1 = min(q0 + query_block, n_queries)
                for q in range(q1 - q0):
                    heap_sizes[q] = 0
                for ch in range(n_chunks):
                    nrow = c_start[ch + 1] - c_start[ch]
                    start = c_start[ch]
                    chunk_blocks = <const uint8_t*> b_at[ch]
                    j0 = 0
                    while j0 < nrow:
                        j1 = min(j0 + db_block, nrow)
                        # Two queries at a time share the reading of the codes.
                        q = q0
                        while q < q1:
                            d = out_dist[q, 0] if heap_sizes[q - q0] == k else bound_v[q]
                            thr = sh_fs_threshold(d, &par[q, 0])
                            if q + 1 < q1:
                                d = (out_dist[q + 1, 0] if heap_sizes[q + 1 - q0] == k
                                     else bound_v[q + 1])
                                thr2 = sh_fs_threshold(d, &par[q + 1, 0])
                                sh_fs_scan2(
                                    use_simd, &lut_v[q, 0, 0], &lut_v[q + 1, 0, 0],
                                    chunk_blocks + (j0 // BLOCK) * bb, j1 - j0, Mp,
                                    allow + start + j0 if allow != NULL else NULL,
                                    thr, thr2, found_pos, found_q, &n_found,
                                    found_pos2, found_q2, &n_found2)
                            else:
                                n_found = sh_fs_scan(
                                    use_simd, &lut_v[q, 0, 0], chunk_blocks + (j0 // BLOCK) * bb,
                                    j1 - j0, Mp, allow + start + j0 if allow != NULL else NULL,
                                    thr, found_pos, found_q)
                                n_found2 = 0
                            for c in range(2 if q + 1 < q1 else 1):
                                _take(n_found if c == 0 else n_found2,
                                      found_pos if c == 0 else found_pos2,
                                      found_q if c == 0 else found_q2,
                                      thr if c == 0 else thr2, start + j0,
                                      (excl[q + c] if excl != NULL else -1),
                                      tab + (q + c) * M * 16,
                                      chunk_blocks + (j0 // BLOCK) * bb, Mp, M,
                                      &par[q + c, 0], &out_dist[q + c, 0], &out_idx[q + c, 0],
                                      &heap_sizes[q + c - q0], k, &resc[q + c])
                            q = q + 2
                        j0 = j1
                for q in range(q0, q1):
                    sh_fs_heap_sort(&out_dist[q, 0], &out_idx[q, 0], heap_sizes[q - q0])
        free(heap_sizes)
        free(found_pos)
        free(found_q)
        free(found_pos2)
        free(found_q2)

    if failed:
        raise MemoryError("could not allocate the fast-scan search buffers.")
    return (distances, indices, stats) if return_stats else (distances, indices)



# ------------------------------------------------------------------ inverted lists

cdef enum:
    # Rows of a cell's blocks scanned between two updates of the threshold
    # (the re-scoring sorts a part's candidates: longer parts sort more).
    PART_ROWS = 2048


def pack_cell_blocks(
    const uint8_t[:, ::1] codes,   # IN (n, n_subspaces) grouped by cell, each value < 16
    const int64_t[::1] starts,     # IN (n_cells + 1,) cell t holds rows starts[t]:starts[t + 1]
    Py_ssize_t min_rows=1,
):
    """Block layouts of codes grouped by cell, each cell from a block boundary.

    The rows of cell t are packed as ``pack_blocks(codes[starts[t] :
    starts[t + 1]])`` would pack them, into ``ceil(n_t / 128)`` consecutive
    blocks of their own (a cell's last block is zero-padded; no block mixes
    two cells), when the cell holds at least ``min_rows`` rows; smaller
    cells are left out (their codes are scored with float lookups).

    Returns
    -------
    blocks : ndarray of shape (n_blocks, block_bytes(n_subspaces)), dtype=uint8
    block_at : ndarray of shape (n_cells,), dtype=int64
        The first block of each cell, -1 for cells left out.
    """
    cdef Py_ssize_t n = codes.shape[0]
    cdef Py_ssize_t M = codes.shape[1]
    cdef Py_ssize_t Mp = padded_subspaces(M)
    cdef Py_ssize_t n_cells = starts.shape[0] - 1
    if n_cells < 0:
        raise ValueError("starts must hold n_cells + 1 entries.")
    bounds = np.asarray(starts)
    if bounds[0] != 0 or bounds[n_cells] != n or np.any(np.diff(bounds) < 0):
        raise ValueError(f"starts must rise from 0 to the {n} rows of codes.")
    if min_rows < 1:
        raise ValueError(f"min_rows must be >= 1; got {min_rows}.")
    check_4bit_codes(codes)
    sizes = np.diff(bounds)
    n_blocks = np.where(sizes >= min_rows, (sizes + BLOCK - 1) // BLOCK, 0)
    first = np.cumsum(n_blocks) - n_blocks
    block_at = np.where(n_blocks > 0, first, -1).astype(np.int64)
    blocks = np.zeros((int(n_blocks.sum()), Mp * 64), dtype=np.uint8)
    cdef uint8_t[:, ::1] out = blocks
    cdef const int64_t[::1] at = block_at
    cdef Py_ssize_t t
    if blocks.shape[0] and M:
        with nogil:
            for t in range(n_cells):
                if at[t] >= 0:
                    sh_fs_pack(&codes[starts[t], 0], starts[t + 1] - starts[t], M, Mp,
                               &out[at[t], 0])
    return blocks, block_at


cdef inline void _prefetch_floats(const float* start, Py_ssize_t n) noexcept nogil:
    """Ask for the cache lines of n floats ahead of their use."""
    cdef Py_ssize_t e
    for e in range(0, n, 16):
        __builtin_prefetch(start + e)


cdef inline void _offer_rows(
    const float* table,      # IN (M, 16)
    const uint8_t* codes,    # IN the chunk's codes, (rows, M)
    const int64_t* ids,      # IN the chunk's database indices
    Py_ssize_t r0,
    Py_ssize_t r1,
    Py_ssize_t M,
    int64_t own,
    const uint8_t* allow,    # IN by database index, or NULL
    float* hd,               # IN/OUT (k,) heap
    int64_t* hi,             # IN/OUT (k,)
    Py_ssize_t* size,        # IN/OUT
    Py_ssize_t k,
) noexcept nogil:
    """Rows r0:r1 of a chunk scored with the float table and offered to the heap."""
    cdef Py_ssize_t r
    cdef int64_t j
    for r in range(r0, r1):
        j = ids[r]
        if j == own or (allow != NULL and not allow[j]):
            continue
        sh_fs_offer(hd, hi, size, k, sh_fs_adc(table, codes + r * M, M), j)


cdef inline void _offer_block_row(
    const float* table,      # IN (M, 16)
    const uint8_t* blocks,   # IN the chunk's block layout (Mp subspaces)
    Py_ssize_t Mp,
    Py_ssize_t M,
    const int64_t* ids,      # IN the chunk's database indices
    Py_ssize_t r,
    int64_t own,
    const uint8_t* allow,    # IN by database index, or NULL
    float* hd,               # IN/OUT (k,) heap
    int64_t* hi,             # IN/OUT (k,)
    Py_ssize_t* size,        # IN/OUT
    Py_ssize_t k,
) noexcept nogil:
    """Row r of a chunk, read from its blocks, scored with the float table and offered."""
    cdef int64_t j = ids[r]
    if j == own or (allow != NULL and not allow[j]):
        return
    sh_fs_offer(hd, hi, size, k, sh_fs_adc_block(table, blocks, Mp, M, r), j)


def _check_ivf_arguments(list_tables, query_tables, coarse, probes, table_rows, n_visit,
                         chunk_offsets, chunk_codes, chunk_ids, chunk_blocks, chunk_sizes,
                         exclude, k, allowed, n_threads, second_rows, split, check_chunks):
    K = list_tables.shape[2]
    if K != 16 or query_tables.shape[2] != 16:
        raise ValueError(f"fast-scan searches 4-bit codes: tables must have 16 codewords per "
                         f"subspace; got {K}. Codes with more codewords are searched by "
                         f"ivf_adc_kneighbors.")
    if list_tables.shape[1] < 1:
        raise ValueError("tables must have at least one subspace.")
    check_ivf_arguments(list_tables, query_tables, coarse, probes, table_rows, n_visit,
                        chunk_offsets, chunk_codes, chunk_ids, chunk_sizes, exclude, k,
                        n_threads, second_rows, split, chunk_blocks=chunk_blocks,
                        check_chunks=check_chunks)


def ivf_fastscan_kneighbors(
    const float[:, :, ::1] list_tables,   # IN (n_tables, n_subspaces, 16)
    const float[:, :, ::1] query_tables,  # IN (n_queries, n_subspaces, 16)
    const float[:, ::1] coarse,           # IN (n_queries, n_probe)
    const int64_t[:, ::1] probes,         # IN (n_queries, n_probe)
    const int64_t[:, ::1] table_rows,     # IN (n_queries, n_probe)
    const int64_t[::1] n_visit,           # IN (n_queries,)
    const int64_t[::1] chunk_offsets,     # IN (n_lists + 1,)
    const intptr_t[::1] chunk_codes,      # IN (n_chunks,) addresses of uint8 code rows
    const intptr_t[::1] chunk_ids,        # IN (n_chunks,) addresses of int64 ids
    const intptr_t[::1] chunk_blocks,     # IN (n_chunks,) addresses of block layouts, or 0
    const int64_t[::1] chunk_sizes,       # IN (n_chunks,)
    const int64_t[::1] exclude,           # IN (n_queries,)
    Py_ssize_t k,
    const uint8_t[::1] allowed=None,      # IN (n_ids,) or None
    int n_threads=1,
    const int64_t[:, ::1] second_rows=None,  # IN (n_queries, n_probe) or None
    Py_ssize_t split=0,
    simd=True,
    bint return_stats=False,
    double span_fraction=0.3,
    bint check_chunks=True,
):
    """``ivf_adc_kneighbors`` over 4-bit codes, with a fast-scan filter per probed cell.

    The arguments and the answers are those of ``ivf_adc_kneighbors``
    (``code_bytes=1``, 16 codewords): for probe p of query q the float32
    table ``t = list_tables[table_rows[q, p]] (+ list_tables[second_rows[q,
    p]] from subspace ``split``) + query_tables[q]``, ``coarse[q, p]`` added
    to row 0, and a code's distance is its entries added in subspace order;
    ranked by (distance, database index). Only the work differs.

    ``chunk_blocks[c]`` is the address of chunk c's codes in the block
    layout (``pack_cell_blocks``: the chunk's rows from the start of a block
    of their own), or 0 for a chunk scored with float lookups alone (a
    small one). For each probe, once the query's heap holds k items:

    - a cell with blocks whose table's smallest possible sum (the sum of
      its row minima, less the float32 rounding bound) exceeds the current
      k-th distance is passed over: none of its codes can enter;
    - otherwise its table is quantized to 8 bits (``sh_fs_quantize_probe``:
      one scale for all subspaces, set by the current k-th distance as in
      ``fastscan_kneighbors``, so entries beyond it saturate and a
      dominant subspace drowns none of the others; ``span_fraction``) and
      the blocks are scanned by ``sh_fs_scan``, 2048 rows at a time; rows
      whose quantized lower bound does not exceed the current k-th
      distance (plus the float32 rounding margin) are re-scored with the
      float table (``sh_fs_rescore_found``: by increasing quantized
      distance, so that the nearest lower the bound first; 8 rows at a
      time, their codes read from the blocks just scanned: the code rows
      are not read there). The threshold falls after every re-scored row; the table is
      quantized again, between two parts, once the k-th distance has
      fallen below half the range its steps were set for.

    Until the heap holds k items, a chunk's rows are scored with the float
    table (there is no k-th distance to scale the filter by; their codes
    read from the blocks too); the scan starts at the block of the first
    row not scored. Code rows are read only for cells kept without blocks.
    Every row that can enter the top k is scored exactly, so the result
    equals the float-table scan's, whatever the SIMD path and the thread
    count.

    Parameters
    ----------
    list_tables, query_tables, coarse, probes, table_rows, n_visit : ndarray
        As in ``ivf_adc_kneighbors``; 16 codewords per subspace.
    chunk_offsets, chunk_codes, chunk_ids, chunk_sizes : ndarray
        As in ``ivf_adc_kneighbors`` (uint8 codes, each below 16: checked
        when they entered the index).
        A chunk with blocks may have no code rows (address 0).
    chunk_blocks : ndarray of shape (n_chunks,), dtype=intp
        Address of each chunk's first block, or 0.
    exclude : ndarray of shape (n_queries,), dtype=int64
    k : int
    allowed : ndarray of shape (n_ids,), dtype=uint8, default=None
        Tested, by database index, on the rows the filter passes.
    n_threads : int, default=1
    second_rows : ndarray of shape (n_queries, n_probe), dtype=int64, default=None
    split : int, default=0
    simd : bool or {"avx512", "avx2", "portable"}, default=True
        Shuffle path, as in ``fastscan_kneighbors``.
    return_stats : bool, default=False
        Also return a dict of int64 counts per query: ``rescored`` (rows
        scored with the float table, heap filling included), ``scanned``
        (rows of blocks read by the filter) and ``skipped`` (probes passed
        over whole).
    span_fraction : float, default=0.3
        The 8-bit steps cover this fraction of the gap between the table's
        smallest sum and the current k-th distance (entries beyond
        saturate: the filter stays a lower bound). Finer steps than the
        whole gap let fewer rows through to the float re-scoring (0.3
        measured best on the frontier benchmark's skewed data, between 0.2
        and 1); the answers do not depend on it.
    check_chunks : bool, default=True
        As in ``ivf_adc_kneighbors``.

    Returns
    -------
    distances : ndarray of shape (n_queries, k), dtype=float32
    indices : ndarray of shape (n_queries, k), dtype=int64
    """
    _check_ivf_arguments(list_tables, query_tables, coarse, probes, table_rows, n_visit,
                         chunk_offsets, chunk_codes, chunk_ids, chunk_blocks, chunk_sizes,
                         exclude, k, allowed, n_threads, second_rows, split, check_chunks)
    if not (0 < span_fraction <= 1):
        raise ValueError(f"span_fraction must be in (0, 1]; got {span_fraction}.")
    cdef Py_ssize_t n_queries = query_tables.shape[0]
    cdef Py_ssize_t M = list_tables.shape[1]
    cdef Py_ssize_t Mp = padded_subspaces(M)
    cdef Py_ssize_t bb = Mp * 64
    cdef Py_ssize_t n_probe = probes.shape[1]
    if second_rows is None:
        split = M
    distances = np.full((n_queries, k), np.inf, dtype=np.float32)
    indices = np.full((n_queries, k), -1, dtype=np.int64)
    counts = np.zeros((3, n_queries), dtype=np.int64)
    stats = {"rescored": counts[0], "scanned": counts[1], "skipped": counts[2]}
    if n_queries == 0 or k == 0:
        return (distances, indices, stats) if return_stats else (distances, indices)

    cdef float[:, ::1] out_dist = distances
    cdef int64_t[:, ::1] out_idx = indices
    cdef int64_t[:, ::1] cnt = counts
    cdef Py_ssize_t table_size = M * 16
    cdef Py_ssize_t split_size = split * 16
    cdef const uint8_t* allow = &allowed[0] if allowed is not None and allowed.shape[0] else NULL
    cdef const int64_t* second = (
        &second_rows[0, 0] if second_rows is not None and n_probe else NULL)
    cdef int qmax = <int> min(127, 65535 // M)
    cdef int use_simd = sh_detect(simd)

    cdef Py_ssize_t q, p, lst, ch, n_rows, r, r1, c, n_found, size, done
    cdef int64_t j, own
    cdef int thr
    cdef bint quantized
    cdef int failed = 0
    cdef bint ok  # per thread: its buffers were allocated
    cdef int* failed_flag = &failed
    cdef int32_t* found_pos
    cdef uint16_t* found_q
    cdef float* table
    cdef uint8_t* lut
    cdef double* par
    cdef float* row_lo
    cdef const float* lt
    cdef const float* lt2
    cdef const float* qt
    cdef const int64_t* ids
    cdef const uint8_t* codes
    cdef const uint8_t* blocks
    cdef float* hd
    cdef int64_t* hi
    cdef float base

    with nogil, parallel(num_threads=n_threads):
        found_pos = <int32_t*> malloc(PART_ROWS * sizeof(int32_t))
        found_q = <uint16_t*> malloc(PART_ROWS * sizeof(uint16_t))
        table = <float*> malloc(table_size * sizeof(float))
        lut = <uint8_t*> malloc(Mp * 16 * sizeof(uint8_t))
        par = <double*> malloc(4 * sizeof(double))
        row_lo = <float*> malloc(M * sizeof(float))
        # All threads must meet the loop (OpenMP); one without buffers skips its turns.
        ok = not (found_pos == NULL or found_q == NULL or table == NULL or lut == NULL
                    or par == NULL or row_lo == NULL)
        if not ok:
            failed_flag[0] = 1
        for q in prange(n_queries, schedule="dynamic"):
            if ok:
                hd = &out_dist[q, 0]
                hi = &out_idx[q, 0]
                size = 0
                own = exclude[q]
                qt = &query_tables[q, 0, 0]
                for p in range(n_visit[q]):
                    lst = probes[q, p]
                    if chunk_offsets[lst] == chunk_offsets[lst + 1]:
                        continue
                    lt = &list_tables[table_rows[q, p], 0, 0]
                    lt2 = &list_tables[second[q * n_probe + p], 0, 0] if second != NULL else lt
                    if p + 1 < n_visit[q]:  # the next probe's table, fetched during this one
                        _prefetch_floats(&list_tables[table_rows[q, p + 1], 0, 0], table_size)
                    base = coarse[q, p]
                    # The float table, as ivf_adc_kneighbors builds it.
                    probe_table(table, lt, lt2, qt, split_size, table_size, 16, base)
                    quantized = False
                    if size == k:
                        for ch in range(chunk_offsets[lst], chunk_offsets[lst + 1]):
                            if chunk_blocks[ch] != 0:
                                break
                        else:
                            ch = -1
                        if ch >= 0:  # the cell has blocks: quantize its table
                            quantized = True
                            if sh_fs_quantize_probe(use_simd, table, M, Mp, qmax, hd[0],
                                                    span_fraction,
                                                    row_lo, lut, par):
                                cnt[2, q] += 1  # no code of the cell can enter
                                continue
                    for ch in range(chunk_offsets[lst], chunk_offsets[lst + 1]):
                        n_rows = chunk_sizes[ch]
                        codes = <const uint8_t*> chunk_codes[ch]
                        ids = <const int64_t*> chunk_ids[ch]
                        blocks = <const uint8_t*> chunk_blocks[ch]
                        if blocks == NULL:
                            cnt[0, q] += n_rows
                            _offer_rows(table, codes, ids, 0, n_rows, M, own, allow, hd, hi,
                                        &size, k)
                            continue
                        # Rows by float lookups (from the blocks) until the heap is full.
                        r = 0
                        while r < n_rows and size < k:
                            cnt[0, q] += 1
                            _offer_block_row(table, blocks, Mp, M, ids, r, own, allow, hd,
                                             hi, &size, k)
                            r = r + 1
                        done = r  # rows before it are scored already
                        if done == n_rows:
                            continue
                        r = r - r % BLOCK
                        if not quantized:
                            quantized = True
                            if sh_fs_quantize_probe(use_simd, table, M, Mp, qmax, hd[0],
                                                    span_fraction,
                                                    row_lo, lut, par):
                                par[0] = 1.0  # out of reach: every threshold is 0
                                par[1] = INFINITY
                                par[2] = par[3] = 0
                        while r < n_rows:
                            if (par[0] > 0 and isfinite(par[1])
                                    and span_fraction * (hd[0] - par[1]) < 0.5 * par[0] * qmax):
                                # The k-th distance fell below half the range the table
                                # was quantized for: finer steps filter more.
                                if sh_fs_quantize_probe(use_simd, table, M, Mp, qmax, hd[0],
                                                        span_fraction, row_lo, lut, par):
                                    break  # no code of the cell can enter any more
                            r1 = min(r + PART_ROWS, n_rows)
                            thr = sh_fs_threshold(hd[0], par)
                            if thr <= 0:
                                break  # the k-th distance only falls: nothing more enters
                            cnt[1, q] += r1 - r
                            n_found = sh_fs_scan(use_simd, lut, blocks + (r // BLOCK) * bb,
                                                 r1 - r, Mp, NULL, thr, found_pos, found_q)
                            # Rows still below the (falling) bound, re-scored exactly.
                            cnt[0, q] += sh_fs_rescore_found(
                                table, blocks, Mp, ids, M, found_pos, found_q, n_found, r, done,
                                own, allow, par, &thr, hd, hi, &size, k)
                            r = r1
                sh_fs_heap_sort(hd, hi, size)
        free(found_pos)
        free(found_q)
        free(table)
        free(lut)
        free(par)
        free(row_lo)

    if failed:
        raise MemoryError("could not allocate the fast-scan search buffers.")
    return (distances, indices, stats) if return_stats else (distances, indices)


def ivf_fastscan_radius(
    const float[:, :, ::1] list_tables,   # IN (n_tables, n_subspaces, 16)
    const float[:, :, ::1] query_tables,  # IN (n_queries, n_subspaces, 16)
    const float[:, ::1] coarse,           # IN (n_queries, n_probe)
    const int64_t[:, ::1] probes,         # IN (n_queries, n_probe)
    const int64_t[:, ::1] table_rows,     # IN (n_queries, n_probe)
    const int64_t[::1] n_visit,           # IN (n_queries,)
    const int64_t[::1] chunk_offsets,     # IN (n_lists + 1,)
    const intptr_t[::1] chunk_codes,      # IN (n_chunks,) addresses of uint8 code rows, or 0
    const intptr_t[::1] chunk_ids,        # IN (n_chunks,) addresses of int64 ids
    const intptr_t[::1] chunk_blocks,     # IN (n_chunks,) addresses of block layouts, or 0
    const int64_t[::1] chunk_sizes,       # IN (n_chunks,)
    const int64_t[::1] exclude,           # IN (n_queries,)
    float threshold,
    const uint8_t[::1] allowed=None,      # IN (n_ids,) or None
    int n_threads=1,
    const int64_t[:, ::1] second_rows=None,  # IN (n_queries, n_probe) or None
    Py_ssize_t split=0,
    simd=True,
    double span_fraction=0.3,
    bint check_chunks=True,
):
    """``ivf_adc_radius`` over 4-bit codes, with the fast-scan filter: the same answers.

    The arguments are those of ``ivf_fastscan_kneighbors`` with
    ``threshold`` for ``k``, the answers those of ``ivf_adc_radius``
    (``code_bytes=1``): every code of each query's probed lists whose
    float32 table sum is strictly below ``threshold``, allowed and not
    ``exclude[q]``, as CSR ``(offsets, distances, indices)``, each query's
    in ascending database index.

    A cell with blocks has its probe's table quantized to 8 bits for the
    threshold (``sh_fs_quantize_probe``, as for a k-th distance; a cell
    none of whose sums can reach it is passed over), its blocks scanned by
    ``sh_fs_scan``, and the rows whose quantized lower bound can reach the
    threshold re-scored with the float table from the blocks; a chunk
    without blocks is scored with the float table from its code rows.
    """
    _check_ivf_arguments(list_tables, query_tables, coarse, probes, table_rows, n_visit,
                         chunk_offsets, chunk_codes, chunk_ids, chunk_blocks, chunk_sizes,
                         exclude, 0, allowed, n_threads, second_rows, split, check_chunks)
    if not (0 < span_fraction <= 1):
        raise ValueError(f"span_fraction must be in (0, 1]; got {span_fraction}.")
    cdef Py_ssize_t n_queries = query_tables.shape[0]
    cdef Py_ssize_t M = list_tables.shape[1]
    cdef Py_ssize_t Mp = padded_subspaces(M)
    cdef Py_ssize_t bb = Mp * 64
    cdef Py_ssize_t n_probe = probes.shape[1]
    if second_rows is None:
        split = M
    held = np.zeros(n_queries, dtype=np.intp)  # each query's matches (malloc'd)
    counts = np.zeros(n_queries, dtype=np.int64)
    if n_queries == 0:
        return _gather_matches(held, counts, False)

    cdef intptr_t[::1] out_at = held
    cdef int64_t[::1] out_count = counts
    cdef Py_ssize_t table_size = M * 16
    cdef Py_ssize_t split_size = split * 16
    cdef const uint8_t* allow = &allowed[0] if allowed is not None and allowed.shape[0] else NULL
    cdef const int64_t* second = (
        &second_rows[0, 0] if second_rows is not None and n_probe else NULL)
    cdef int qmax = <int> min(127, 65535 // M)
    cdef int use_simd = sh_detect(simd)

    cdef Py_ssize_t q, p, lst, ch, n_rows, r, r1, c, n_found, size, capacity
    cdef int64_t j, own
    cdef int thr
    cdef float d
    cdef int failed = 0
    cdef bint ok
    cdef int* failed_flag = &failed
    cdef int32_t* found_pos
    cdef uint16_t* found_q
    cdef float* dist
    cdef float* table
    cdef uint8_t* lut
    cdef double* par
    cdef float* row_lo
    cdef Match* found
    cdef const float* lt
    cdef const float* lt2
    cdef const float* qt
    cdef const int64_t* ids
    cdef const uint8_t* codes
    cdef const uint8_t* blocks

    with nogil, parallel(num_threads=n_threads):
        found_pos = <int32_t*> malloc(PART_ROWS * sizeof(int32_t))
        found_q = <uint16_t*> malloc(PART_ROWS * sizeof(uint16_t))
        dist = <float*> malloc(PART_ROWS * sizeof(float))
        table = <float*> malloc(table_size * sizeof(float))
        lut = <uint8_t*> malloc(Mp * 16 * sizeof(uint8_t))
        par = <double*> malloc(4 * sizeof(double))
        row_lo = <float*> malloc(M * sizeof(float))
        capacity = 256
        found = <Match*> malloc(capacity * sizeof(Match))
        # All threads must meet the loop (OpenMP); one without buffers skips its turns.
        ok = not (found_pos == NULL or found_q == NULL or dist == NULL or table == NULL
                  or lut == NULL or par == NULL or row_lo == NULL or found == NULL)
        if not ok:
            failed_flag[0] = 1
        for q in prange(n_queries, schedule="dynamic"):
            if ok and not failed_flag[0]:
                size = 0
                own = exclude[q]
                qt = &query_tables[q, 0, 0]
                for p in range(n_visit[q]):
                    lst = probes[q, p]
                    if chunk_offsets[lst] == chunk_offsets[lst + 1]:
                        continue
                    lt = &list_tables[table_rows[q, p], 0, 0]
                    lt2 = &list_tables[second[q * n_probe + p], 0, 0] if second != NULL else lt
                    # The float table, as ivf_adc_kneighbors builds it.
                    probe_table(table, lt, lt2, qt, split_size, table_size, 16, coarse[q, p])
                    # Quantized for the threshold when the cell has blocks (1: no sum of
                    # the cell can reach it).
                    thr = 0
                    for ch in range(chunk_offsets[lst], chunk_offsets[lst + 1]):
                        if chunk_blocks[ch] != 0:
                            if not sh_fs_quantize_probe(use_simd, table, M, Mp, qmax,
                                                        threshold, span_fraction, row_lo,
                                                        lut, par):
                                thr = sh_fs_threshold(threshold, par)
                            break
                    for ch in range(chunk_offsets[lst], chunk_offsets[lst + 1]):
                        n_rows = chunk_sizes[ch]
                        codes = <const uint8_t*> chunk_codes[ch]
                        ids = <const int64_t*> chunk_ids[ch]
                        blocks = <const uint8_t*> chunk_blocks[ch]
                        r = 0
                        while r < n_rows and not failed_flag[0]:
                            r1 = min(r + PART_ROWS, n_rows)
                            if blocks != NULL:
                                if thr <= 0:
                                    break
                                n_found = sh_fs_scan(use_simd, lut, blocks + (r // BLOCK) * bb,
                                                     r1 - r, Mp, NULL, thr, found_pos, found_q)
                                for c in range(n_found):
                                    dist[c] = sh_fs_adc_block(table, blocks, Mp, M,
                                                              r + found_pos[c])
                            else:
                                sh_fs_adc_rows(table, codes + r * M, r1 - r, M, dist)
                                n_found = r1 - r
                                for c in range(n_found):
                                    found_pos[c] = <int32_t> c
                            for c in range(n_found):
                                d = dist[c]
                                j = ids[r + found_pos[c]]
                                if (not d < threshold or j == own
                                        or (allow != NULL and not allow[j])):
                                    continue
                                if not keep_match(&found, &size, &capacity, j, d):
                                    failed_flag[0] = 1
                                    break
                            r = r1
                if not hold_matches(found, size, &out_at[q], &out_count[q]):
                    failed_flag[0] = 1
        free(found_pos)
        free(found_q)
        free(dist)
        free(table)
        free(lut)
        free(par)
        free(row_lo)
        free(found)

    return _gather_matches(held, counts, failed)
