"""Nearest codeword of each row, for k-means and product-quantization encoding.

``nearest_codewords`` is the assignment step of Lloyd's k-means;
``encode`` assigns every block of columns of every row (the PQ code);
``accumulate`` is the update step's sums. Scores are computed in the input's
precision (float32 or float64) by the fused kernel of ``_nearest.h``; rows
are split over OpenMP threads, and no result depends on the thread count.
"""

from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t
from libc.stdlib cimport free, malloc

import numpy as np

from ._simd import max_simd_level

cdef extern from "_nearest.h":
    int sh_nearest_level() noexcept nogil
    void sh_nearest_f32(
        int level, const float* X, Py_ssize_t ldx, Py_ssize_t n, Py_ssize_t d,
        const float* CT, const float* bias, Py_ssize_t Kp, int32_t* labels, float* scores,
        float* out,
    ) noexcept nogil
    void sh_nearest_f64(
        int level, const double* X, Py_ssize_t ldx, Py_ssize_t n, Py_ssize_t d,
        const double* CT, const double* bias, Py_ssize_t Kp, int32_t* labels, double* scores,
        double* out,
    ) noexcept nogil

ctypedef fused code_t:
    uint8_t
    uint16_t

cdef enum:
    # Rows per task: enough to amortise a call, few enough to balance threads.
    ROW_BLOCK = 256
    # Codewords are padded to a multiple of the widest step (4 vectors of 16 floats).
    PAD = 64
    # Multiply-adds under which subspace_scores runs on one thread: a parallel region
    # would cost more than the products (on busy cores it waits for its threads).
    # 4-bit codes: 1,000 queries x 16 codewords x 128 features = 2M.
    SMALL_PRODUCT = 1 << 24

cdef int _level = -1


def simd_level():
    """Widest vector path of this processor: 2 AVX-512F, 1 AVX2 + FMA, 0 other."""
    global _level
    if _level < 0:
        _level = sh_nearest_level()
    return _level


def _packed_codebooks(centers, dtype):
    """Codebooks (M, K, d) as the kernel reads them.

    Returns ``CT`` of shape (M, d, Kp), each codebook transposed with K padded
    to Kp (a multiple of 64) by zero columns, and ``bias`` of shape (M, Kp),
    ``-||c||^2 / 2`` with ``-inf`` in the padding.
    """
    centers = np.asarray(centers, dtype=dtype)
    M, K, d = centers.shape
    Kp = -(-K // PAD) * PAD
    CT = np.zeros((M, d, Kp), dtype=dtype)
    CT[:, :, :K] = centers.transpose(0, 2, 1)
    bias = np.full((M, Kp), -np.inf, dtype=dtype)
    bias[:, :K] = -0.5 * np.einsum("mkd,mkd->mk", centers, centers)
    return CT, bias


cdef inline void _nearest(
    int level, const floating* X, Py_ssize_t ldx, Py_ssize_t n, Py_ssize_t d,
    const floating* CT, const floating* bias, Py_ssize_t Kp,
    int32_t* labels, floating* scores, floating* out,
) noexcept nogil:
    if floating is float:
        sh_nearest_f32(level, X, ldx, n, d, CT, bias, Kp, labels, scores, out)
    else:
        sh_nearest_f64(level, X, ldx, n, d, CT, bias, Kp, labels, scores, out)


def _check_centers(centers, n_features, dtype, n_threads):
    """Codewords as an (n_codewords, n_features) array of dtype; also checks n_threads."""
    centers = np.asarray(centers, dtype=dtype)
    if (centers.ndim != 2 or centers.shape[1] != n_features or centers.shape[0] < 1
            or n_features < 1):
        raise ValueError(f"centers must have shape (n_codewords >= 1, n_features = "
                         f"{n_features} >= 1); got {centers.shape}.")
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1; got {n_threads}.")
    return centers


def _check_level(simd):
    return min(simd_level(), max_simd_level(simd))


def nearest_codewords(
    const floating[:, ::1] X,   # IN (n_samples, n_features)
    centers,                     # IN (n_codewords, n_features)
    int n_threads=1,
    simd=True,
    sq_norms=None,               # IN (n_samples,)
):
    """Nearest codeword of every row (the assignment step of k-means).

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features), dtype=float32 or float64
        C-contiguous, finite.
    centers : array-like of shape (n_codewords, n_features)
        Codewords, converted to X's dtype.
    n_threads : int, default=1
        OpenMP threads.
    simd : bool or {"avx512", "avx2", "portable"}, default=True
        ``True`` runs the widest vector path of the processor (AVX-512,
        else AVX2 + FMA, else portable 16-byte vectors); a name caps the
        path at that one, and ``False`` means ``"portable"``.
    sq_norms : ndarray of shape (n_samples,), default=None
        ``||x||^2`` of each row, when the caller has them (k-means assigns
        the same rows many times); ``None`` computes them.

    Returns
    -------
    labels : ndarray of shape (n_samples,), dtype=int32
        Index of the nearest codeword (ties: the smallest index).
    sq_distances : ndarray of shape (n_samples,), dtype of X
        Squared distance to it, ``||x||^2 - 2 max_c (x . c - ||c||^2 / 2)``,
        clipped at 0.
    """
    cdef Py_ssize_t n = X.shape[0]
    cdef Py_ssize_t d = X.shape[1]
    dtype = np.float32 if floating is float else np.float64
    centers = _check_centers(centers, d, dtype, n_threads)
    CT_all, bias_all = _packed_codebooks(centers[None], dtype)
    cdef const floating[:, ::1] CT = CT_all[0]
    cdef const floating[::1] bias = bias_all[0]
    cdef Py_ssize_t Kp = CT.shape[1]
    cdef int level = _check_level(simd)

    labels = np.empty(n, dtype=np.int32)
    scores = np.empty(n, dtype=dtype)
    if n == 0:
        return labels, scores
    cdef int32_t[::1] lab = labels
    cdef floating[::1] sc = scores
    cdef Py_ssize_t n_blocks = (n + ROW_BLOCK - 1) // ROW_BLOCK
    cdef Py_ssize_t b, start, stop
    with nogil:
        for b in prange(n_blocks, schedule="static", num_threads=n_threads):
            start = b * ROW_BLOCK
            stop = min(start + ROW_BLOCK, n)
            _nearest(level, &X[start, 0], d, stop - start, d,
                     &CT[0, 0], &bias[0], Kp, &lab[start], &sc[start], NULL)
    if sq_norms is None:
        X_arr = np.asarray(X)
        sq_norms = np.einsum("ij,ij->i", X_arr, X_arr)
    sq_distances = sq_norms - 2 * scores
    np.maximum(sq_distances, 0, out=sq_distances)
    return labels, sq_distances


def pack_codewords(centers, dtype):
    """Codewords of shape (n_codewords, n_features) as :func:`codeword_scores` reads them.

    Packing transposes and pads the codewords (about as long as scoring one
    query against them): a searcher that scores queries against the same
    codewords again and again packs them once and passes the result.

    Returns
    -------
    packed : tuple
        ``(CT, n_codewords)``, CT of shape (n_features, Kp) in ``dtype``.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64; got {dtype}.")
    centers = np.asarray(centers, dtype=dtype)
    if centers.ndim != 2 or centers.shape[0] < 1 or centers.shape[1] < 1:
        raise ValueError(f"centers must have shape (n_codewords >= 1, n_features >= 1); "
                         f"got {centers.shape}.")
    CT, _ = _packed_codebooks(centers[None], dtype)
    return CT[0], centers.shape[0]


def codeword_scores(
    const floating[:, ::1] X,   # IN (n_samples, n_features)
    centers,                     # IN (n_codewords, n_features), or pack_codewords(...)
    bias=None,                   # IN (n_codewords,)
    int n_threads=1,
    simd=True,
):
    """Every score ``x . c + bias[c]`` of every row against every codeword.

    The products of :func:`nearest_codewords` without the argmax: each row is
    computed on its own in a fixed order, so a row's scores do not depend on
    the other rows (unlike a BLAS product, whose rounding changes with the
    shape of the matrices).

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features), dtype=float32 or float64
        C-contiguous, finite.
    centers : array-like of shape (n_codewords, n_features), or tuple
        Codewords, converted to X's dtype; or ``pack_codewords(centers,
        X.dtype)``, the same codewords packed once for many calls.
    bias : array-like of shape (n_codewords,), default=None
        Added to each codeword's score; ``None`` means zeros.
    n_threads : int, default=1
        OpenMP threads.
    simd : bool or {"avx512", "avx2", "portable"}, default=True
        As in :func:`nearest_codewords`.

    Returns
    -------
    scores : ndarray of shape (n_samples, n_codewords), dtype of X
    """
    cdef Py_ssize_t n = X.shape[0]
    cdef Py_ssize_t d = X.shape[1]
    dtype = np.float32 if floating is float else np.float64
    if isinstance(centers, tuple):
        CT_arr, K = centers
        if (not isinstance(CT_arr, np.ndarray) or CT_arr.dtype != dtype or CT_arr.ndim != 2
                or CT_arr.shape[0] != d or not CT_arr.flags.c_contiguous
                or not 1 <= K <= CT_arr.shape[1] or CT_arr.shape[1] % PAD):
            raise ValueError(f"packed centers must come from pack_codewords(centers, "
                             f"{np.dtype(dtype).name}) with {d} features.")
        if n_threads < 1:
            raise ValueError(f"n_threads must be >= 1; got {n_threads}.")
    else:
        centers = _check_centers(centers, d, dtype, n_threads)
        K = centers.shape[0]
        CT_arr = _packed_codebooks(centers[None], dtype)[0][0]
    bias = np.zeros(K, dtype=dtype) if bias is None else np.asarray(bias, dtype=dtype)
    if bias.shape != (K,):
        raise ValueError(f"bias must have shape ({K},); got {bias.shape}.")
    cdef const floating[:, ::1] CT = CT_arr
    cdef Py_ssize_t Kp = CT.shape[1]
    padded_bias = np.zeros(Kp, dtype=dtype)
    padded_bias[:K] = bias
    cdef const floating[::1] b = padded_bias
    cdef int level = _check_level(simd)

    out = np.empty((n, Kp), dtype=dtype)
    if n == 0:
        return out[:, :K]
    cdef floating[:, ::1] o = out
    cdef Py_ssize_t n_blocks = (n + ROW_BLOCK - 1) // ROW_BLOCK
    cdef Py_ssize_t blk, start, stop
    with nogil:
        for blk in prange(n_blocks, schedule="static", num_threads=n_threads):
            start = blk * ROW_BLOCK
            stop = min(start + ROW_BLOCK, n)
            _nearest(level, &X[start, 0], d, stop - start, d,
                     &CT[0, 0], &b[0], Kp, NULL, NULL, &o[start, 0])
    return out[:, :K]


def encode(
    const floating[:, ::1] X,      # IN (n_samples, n_features)
    const Py_ssize_t[::1] bounds,  # IN (n_subspaces + 1,)
    centers,                        # IN (n_subspaces, K, subspace_dim)
    code_t[:, ::1] codes,          # OUT (n_samples, n_subspaces)
    int n_threads=1,
    simd=True,
):
    """Product-quantization codes: the nearest codeword of every block.

    Block m of row i is ``X[i, bounds[m]:bounds[m + 1]]``, compared with the
    first ``bounds[m + 1] - bounds[m]`` coordinates of ``centers[m]``;
    ``codes[i, m]`` receives the index of the nearest codeword (ties: the
    smallest index).

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features), dtype=float32 or float64
        C-contiguous, finite.
    bounds : ndarray of shape (n_subspaces + 1,), dtype=intp
        Increasing, from 0 to at most n_features.
    centers : array-like of shape (n_subspaces, n_codewords, subspace_dim)
        Codebooks, converted to X's dtype.
    codes : ndarray of shape (n_samples, n_subspaces), dtype=uint8 or uint16
        Written in place; its dtype must hold ``n_codewords - 1``.
    n_threads : int, default=1
        OpenMP threads.
    simd : bool or {"avx512", "avx2", "portable"}, default=True
        As in :func:`nearest_codewords`.
    """
    cdef Py_ssize_t n = X.shape[0]
    cdef Py_ssize_t n_features = X.shape[1]
    cdef Py_ssize_t M = bounds.shape[0] - 1
    dtype = np.float32 if floating is float else np.float64
    centers = np.asarray(centers, dtype=dtype)
    if M < 1 or centers.ndim != 3 or centers.shape[0] != M:
        raise ValueError(f"centers must have shape (n_subspaces={M}, n_codewords, "
                         f"subspace_dim); got {centers.shape}.")
    widths = np.diff(np.asarray(bounds))
    if bounds[0] != 0 or bounds[M] > n_features or np.any(widths < 1) \
            or widths.max() > centers.shape[2]:
        raise ValueError(f"bounds must increase from 0 to at most n_features = {n_features}, "
                         f"with blocks of at most subspace_dim = {centers.shape[2]} columns.")
    if codes.shape[0] != n or codes.shape[1] != M:
        raise ValueError(f"codes must have shape ({n}, {M}); got "
                         f"({codes.shape[0]}, {codes.shape[1]}).")
    if centers.shape[1] - 1 > np.iinfo(np.asarray(codes).dtype).max:
        raise ValueError(f"codes of dtype {np.asarray(codes).dtype} cannot hold "
                         f"{centers.shape[1]} codeword indices.")
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1; got {n_threads}.")
    # Coordinates past a block's width are not part of its codewords.
    centers = np.where(np.arange(centers.shape[2]) < widths[:, None, None], centers, 0)
    CT_all, bias_all = _packed_codebooks(centers, dtype)
    cdef const floating[:, :, ::1] CT = CT_all
    cdef const floating[:, ::1] bias = bias_all
    cdef Py_ssize_t d_max = CT.shape[1]
    cdef Py_ssize_t Kp = CT.shape[2]
    cdef int level = _check_level(simd)
    if n == 0:
        return

    cdef Py_ssize_t n_blocks = (n + ROW_BLOCK - 1) // ROW_BLOCK
    cdef Py_ssize_t b, m, i, start, stop
    cdef int failed = 0
    cdef bint ok  # per thread: its buffers were allocated
    cdef int* failed_flag = &failed
    cdef int32_t* lab
    cdef floating* sc
    with nogil, parallel(num_threads=n_threads):
        lab = <int32_t*> malloc(ROW_BLOCK * sizeof(int32_t))
        sc = <floating*> malloc(ROW_BLOCK * sizeof(floating))
        # All threads must meet the loop (OpenMP); one without buffers skips its turns.
        ok = not (lab == NULL or sc == NULL)
        if not ok:
            failed_flag[0] = 1
        for b in prange(n_blocks, schedule="static"):
            if ok:
                start = b * ROW_BLOCK
                stop = min(start + ROW_BLOCK, n)
                for m in range(M):
                    _nearest(level, &X[start, bounds[m]], n_features, stop - start,
                             bounds[m + 1] - bounds[m], &CT[m, 0, 0], &bias[m, 0], Kp, lab, sc,
                             NULL)
                    for i in range(stop - start):
                        codes[start + i, m] = <code_t> lab[i]
        free(lab)
        free(sc)
    if failed:
        raise MemoryError("could not allocate the encoding buffers.")


def accumulate(
    const floating[:, ::1] X,        # IN (n_samples, n_features)
    const int32_t[::1] labels,       # IN (n_samples,)
    Py_ssize_t n_clusters,
):
    """Per-cluster sums of the rows of X and cluster sizes (the k-means update).

    Returns
    -------
    sums : ndarray of shape (n_clusters, n_features), dtype=float64
        Added in row order, so the result never depends on threads.
    counts : ndarray of shape (n_clusters,), dtype=int64
    """
    cdef Py_ssize_t n = X.shape[0]
    cdef Py_ssize_t d = X.shape[1]
    if labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} entries for {n} rows.")
    if n and (np.min(labels) < 0 or np.max(labels) >= n_clusters):
        raise ValueError(f"labels must be in [0, {n_clusters - 1}].")
    sums = np.zeros((n_clusters, d), dtype=np.float64)
    counts = np.zeros(n_clusters, dtype=np.int64)
    cdef double[:, ::1] s = sums
    cdef int64_t[::1] c = counts
    cdef Py_ssize_t i, j, k
    with nogil:
        for i in range(n):
            k = labels[i]
            c[k] += 1
            for j in range(d):
                s[k, j] += X[i, j]
    return sums, counts


cdef inline bint _later(double da, int64_t ia, double db, int64_t ib) noexcept nogil:
    """Whether (da, ia) ranks after (db, ib): larger value, or equal and larger column."""
    return da > db or (da == db and ia > ib)


cdef void _sift_down(double* v, int64_t* c, Py_ssize_t size, Py_ssize_t i) noexcept nogil:
    """Restore the max-heap (latest-ranked on top) below position i."""
    cdef Py_ssize_t worst, child
    cdef double tv
    cdef int64_t tc
    while True:
        worst = i
        child = 2 * i + 1
        if child < size and _later(v[child], c[child], v[worst], c[worst]):
            worst = child
        child = child + 1
        if child < size and _later(v[child], c[child], v[worst], c[worst]):
            worst = child
        if worst == i:
            return
        tv = v[i]; v[i] = v[worst]; v[worst] = tv
        tc = c[i]; c[i] = c[worst]; c[worst] = tc
        i = worst


def smallest_per_row(
    const floating[:, :] values,  # IN (n_rows, n_columns)
    Py_ssize_t n,
    int n_threads=1,
    bint return_values=False,
):
    """The columns of the n smallest values of each row, ascending.

    Ranked by (value, column): equal values by column number, so the answer
    is that of a stable argsort cut to n columns, without sorting the row
    (a heap of n, O(n_columns log n) per row).

    Parameters
    ----------
    values : ndarray of shape (n_rows, n_columns), dtype=float32 or float64
        Strided rows are fine. NaN is not checked for (the callers' values
        are finite): where present, the selection is unspecified.
    n : int
        Columns kept per row, ``0 <= n <= n_columns``.
    n_threads : int, default=1
        OpenMP threads over the rows.
    return_values : bool, default=False
        Also return the selected values (saves the caller a gather).

    Returns
    -------
    columns : ndarray of shape (n_rows, n), dtype=int64
    selected : ndarray of shape (n_rows, n), dtype of values
        ``values[r, columns[r]]``; only with ``return_values=True``.
    """
    cdef Py_ssize_t n_rows = values.shape[0]
    cdef Py_ssize_t width = values.shape[1]
    if n < 0 or n > width:
        raise ValueError(f"n must be in [0, {width}]; got n={n}.")
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1; got {n_threads}.")
    out = np.empty((n_rows, n), dtype=np.int64)
    selected = np.empty((n_rows, n if return_values else 0),
                        dtype=np.float32 if floating is float else np.float64)
    if n_rows == 0 or n == 0:
        return (out, selected) if return_values else out
    cdef int64_t[:, ::1] o = out
    cdef floating[:, ::1] sel = selected
    cdef Py_ssize_t r, j, size, end
    cdef double x, tv
    cdef int64_t tc
    cdef double* heap_v
    cdef int64_t* heap_c
    cdef int failed = 0
    cdef bint ok  # per thread: its buffers were allocated
    cdef int* failed_flag = &failed
    with nogil, parallel(num_threads=n_threads):
        heap_v = <double*> malloc(n * sizeof(double))
        # All threads must meet the loop (OpenMP); one without buffers skips its turns.
        ok = heap_v != NULL
        if not ok:
            failed_flag[0] = 1
        for r in prange(n_rows, schedule="static"):
            if ok:
                heap_c = &o[r, 0]
                size = 0
                for j in range(width):
                    x = values[r, j]
                    if size < n:  # sift up
                        end = size
                        size = size + 1
                        while end > 0 and _later(x, j, heap_v[(end - 1) // 2],
                                                 heap_c[(end - 1) // 2]):
                            heap_v[end] = heap_v[(end - 1) // 2]
                            heap_c[end] = heap_c[(end - 1) // 2]
                            end = (end - 1) // 2
                        heap_v[end] = x
                        heap_c[end] = j
                    elif _later(heap_v[0], heap_c[0], x, j):
                        heap_v[0] = x
                        heap_c[0] = j
                        _sift_down(heap_v, heap_c, n, 0)
                # Heap sort into ascending order.
                for end in range(n - 1, 0, -1):
                    tv = heap_v[0]; heap_v[0] = heap_v[end]; heap_v[end] = tv
                    tc = heap_c[0]; heap_c[0] = heap_c[end]; heap_c[end] = tc
                    _sift_down(heap_v, heap_c, end, 0)
                if return_values:  # the heap held them in double: exact for either dtype
                    for j in range(n):
                        sel[r, j] = <floating> heap_v[j]
        free(heap_v)
    if failed:
        raise MemoryError("could not allocate the selection heap.")
    return (out, selected) if return_values else out


def pack_subspace_codewords(centers, dtype):
    """Codebooks of shape (n_subspaces, n_codewords, width) packed for :func:`subspace_scores`.

    ``width`` is the widest subspace's; a narrower subspace's codewords are
    read over its own features only (what lies beyond is never used).

    Returns
    -------
    packed : tuple
        ``(CT, n_codewords)``, CT of shape (n_subspaces, width, Kp) in ``dtype``.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64; got {dtype}.")
    centers = np.asarray(centers, dtype=dtype)
    if centers.ndim != 3 or min(centers.shape) < 1:
        raise ValueError(f"centers must have shape (n_subspaces >= 1, n_codewords >= 1, "
                         f"width >= 1); got {centers.shape}.")
    CT, _ = _packed_codebooks(centers, dtype)
    return CT, centers.shape[1]


cdef bint _rising_bounds(b_arr, Py_ssize_t M, Py_ssize_t d, Py_ssize_t width):
    """Whether b_arr rises from 0 to d in M steps of 1 to width."""
    if b_arr.ndim != 1 or b_arr.shape[0] != M + 1:
        return False
    cdef const Py_ssize_t[:] b = b_arr
    cdef Py_ssize_t m
    if b[0] != 0 or b[M] != d:
        return False
    for m in range(M):
        if not 1 <= b[m + 1] - b[m] <= width:
            return False
    return True


def subspace_scores(
    const floating[:, ::1] X,   # IN (n_samples, n_features)
    packed,                      # IN pack_subspace_codewords(centers, X.dtype)
    bounds,                      # IN (n_subspaces + 1,) feature bounds of the subspaces
    int n_threads=1,
    simd=True,
):
    """``x[b_m:b_{m+1}] . c_mk`` for every row, subspace m and codeword k: (n, M, K).

    One call for every subspace of a product quantizer (a query's lookup
    table): the numbers of :func:`codeword_scores` on each subspace's
    columns with its codewords, bit for bit (the same kernel, reading the
    columns in place).

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features), dtype=float32 or float64
    packed : tuple
        ``pack_subspace_codewords(centers, X.dtype)``.
    bounds : array-like of shape (n_subspaces + 1,)
        Rising from 0 to n_features; subspace m is ``bounds[m]:bounds[m + 1]``,
        at most ``width`` features.
    n_threads : int, default=1
        At most; fewer than 2**24 multiply-adds (rows x codewords x
        features) run on one thread.
    simd : bool or {"avx512", "avx2", "portable"}, default=True

    Returns
    -------
    scores : ndarray of shape (n_samples, n_subspaces, n_codewords), dtype of X
    """
    cdef Py_ssize_t n = X.shape[0]
    cdef Py_ssize_t d = X.shape[1]
    dtype = np.float32 if floating is float else np.float64
    CT_arr, K = packed
    if (not isinstance(CT_arr, np.ndarray) or CT_arr.dtype != dtype or CT_arr.ndim != 3
            or not CT_arr.flags.c_contiguous or not 1 <= K <= CT_arr.shape[2]
            or CT_arr.shape[2] % PAD):
        raise ValueError(f"packed must come from pack_subspace_codewords(centers, "
                         f"{np.dtype(dtype).name}).")
    cdef Py_ssize_t M = CT_arr.shape[0]
    cdef Py_ssize_t width = CT_arr.shape[1]
    cdef Py_ssize_t Kp = CT_arr.shape[2]
    cdef Py_ssize_t n_codewords = K
    b_arr = np.asarray(bounds, dtype=np.intp)
    if not _rising_bounds(b_arr, M, d, width):
        raise ValueError(f"bounds must rise from 0 to {d} in {M} steps of 1 to {width} "
                         f"features.")
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1; got {n_threads}.")
    if n * n_codewords * d < SMALL_PRODUCT:
        n_threads = 1
    cdef const floating[:, :, ::1] CT = CT_arr
    cdef const Py_ssize_t[::1] bnd = b_arr
    zeros = np.zeros(Kp, dtype=dtype)
    cdef const floating[::1] z = zeros
    cdef int level = _check_level(simd)
    out = np.empty((n, M, n_codewords), dtype=dtype)
    if n == 0:
        return out
    cdef floating[:, :, ::1] o = out
    cdef Py_ssize_t n_blocks = (n + ROW_BLOCK - 1) // ROW_BLOCK
    cdef Py_ssize_t blk, start, stop, m, r, c
    cdef floating* tmp
    cdef int failed = 0
    cdef bint ok  # per thread: its buffers were allocated
    cdef int* failed_flag = &failed
    with nogil, parallel(num_threads=n_threads):
        tmp = <floating*> malloc(ROW_BLOCK * Kp * sizeof(floating))
        # All threads must meet the loop (OpenMP); one without buffers skips its turns.
        ok = tmp != NULL
        if not ok:
            failed_flag[0] = 1
        for blk in prange(n_blocks, schedule="static"):
            if ok:
                start = blk * ROW_BLOCK
                stop = min(start + ROW_BLOCK, n)
                for m in range(M):
                    _nearest(level, &X[start, bnd[m]], d, stop - start, bnd[m + 1] - bnd[m],
                             &CT[m, 0, 0], &z[0], Kp, NULL, NULL, tmp)
                    for r in range(stop - start):
                        for c in range(n_codewords):
                            o[start + r, m, c] = tmp[r * Kp + c]
        free(tmp)
    if failed:
        raise MemoryError("could not allocate the scores buffer.")
    return out
