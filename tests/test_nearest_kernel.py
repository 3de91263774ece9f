"""The nearest-codeword kernel (k-means assignment, PQ encoding) against numpy."""

import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn_hash._kernels._nearest import (
    accumulate,
    codeword_scores,
    encode,
    nearest_codewords,
    pack_codewords,
    pack_subspace_codewords,
    simd_level,
    smallest_per_row,
    subspace_scores,
)

from sklearn_hash import ProductQuantizer
from sklearn_hash._kernels._openmp import openmp_enabled
from sklearn_hash._kmeans import kmeans as _kmeans

SIMD = [True, "avx2", False]  # the widest path, AVX2 (where the processor has it), portable


def oracle_sq_distances(X, centers):
    """Squared distances (n, K) in float64."""
    X = X.astype(np.float64)
    centers = centers.astype(np.float64)
    return ((X[:, None, :] - centers[None, :, :]) ** 2).sum(-1)


def check_nearest(X, centers, labels, sq_distances, rtol):
    """labels pick a nearest codeword up to float rounding of the inputs' dtype."""
    d2 = oracle_sq_distances(X, centers)
    best = d2.min(1)
    scale = (X.astype(np.float64) ** 2).sum(1) + (centers.astype(np.float64) ** 2).sum(1).max()
    tol = rtol * (scale + 1.0)
    chosen = d2[np.arange(len(X)), labels]
    assert np.all(chosen <= best + tol)
    assert np.all(np.abs(sq_distances - best) <= tol)
    # Where the nearest codeword is clear, it is exactly numpy's argmin.
    gap = np.sort(d2, axis=1)[:, 1] - best if d2.shape[1] > 1 else np.full(len(X), np.inf)
    clear = gap > 2 * tol
    np.testing.assert_array_equal(labels[clear], d2.argmin(1)[clear])


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("n", [0, 1, 5, 257, 1000])
@pytest.mark.parametrize("n_features", [1, 3, 8, 16, 33])
@pytest.mark.parametrize("n_codewords", [1, 2, 15, 16, 17, 256, 300])
def test_nearest_codewords_match_numpy(dtype, rtol, n, n_features, n_codewords):
    rng = np.random.default_rng(n + 7 * n_features + 31 * n_codewords)
    X = rng.standard_normal((n, n_features)).astype(dtype)
    centers = rng.standard_normal((n_codewords, n_features)).astype(dtype)
    for simd in SIMD:
        for n_threads in (1, 2):
            labels, sq = nearest_codewords(X, centers, n_threads=n_threads, simd=simd)
            assert labels.dtype == np.int32 and sq.dtype == dtype and labels.shape == (n,)
            check_nearest(X, centers, labels, sq, rtol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("simd", SIMD)
def test_ties_go_to_the_smallest_index(dtype, simd):
    # Small integers: every score is exact, so ties are exact.
    rng = np.random.default_rng(0)
    centers = rng.integers(-3, 4, (40, 5)).astype(dtype)
    centers[[7, 19, 33]] = centers[2]  # duplicates of codeword 2
    X = np.concatenate([centers, rng.integers(-3, 4, (500, 5))]).astype(dtype)
    labels, sq = nearest_codewords(X, centers, simd=simd)
    d2 = oracle_sq_distances(X, centers)
    np.testing.assert_array_equal(labels, d2.argmin(1))  # numpy: first minimum
    np.testing.assert_array_equal(sq, d2.min(1))
    assert not np.isin(labels, [7, 19, 33]).any()


def test_threads_and_paths_agree_exactly_on_one_machine():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((3001, 16)).astype(np.float32)
    centers = rng.standard_normal((256, 16)).astype(np.float32)
    ref = nearest_codewords(X, centers, n_threads=1)
    for n_threads in (2, 3):
        out = nearest_codewords(X, centers, n_threads=n_threads)
        np.testing.assert_array_equal(out[0], ref[0])
        np.testing.assert_array_equal(out[1], ref[1])
    assert simd_level() in (0, 1, 2)


@pytest.mark.parametrize("dtype, code_dtype, n_codewords", [
    (np.float32, np.uint8, 256), (np.float64, np.uint8, 16), (np.float32, np.uint16, 300),
])
@pytest.mark.parametrize("simd", SIMD)
def test_encode_is_the_nearest_codeword_of_each_block(dtype, code_dtype, n_codewords, simd):
    rng = np.random.default_rng(2)
    bounds = np.array([0, 4, 8, 11, 14], dtype=np.intp)  # uneven blocks
    X = rng.standard_normal((999, 14)).astype(dtype)
    centers = rng.standard_normal((4, n_codewords, 4)).astype(dtype)
    codes = np.empty((999, 4), dtype=code_dtype)
    encode(X, bounds, centers, codes, n_threads=2, simd=simd)
    for m in range(4):
        lo, hi = bounds[m], bounds[m + 1]
        labels, _ = nearest_codewords(np.ascontiguousarray(X[:, lo:hi]),
                                      centers[m, :, : hi - lo], simd=simd)
        np.testing.assert_array_equal(codes[:, m], labels)
        check_nearest(X[:, lo:hi], centers[m, :, : hi - lo], codes[:, m].astype(np.intp),
                      oracle_sq_distances(X[:, lo:hi], centers[m, :, : hi - lo]).min(1),
                      1e-5 if dtype == np.float32 else 1e-12)


def test_accumulate_matches_numpy():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((1000, 7)).astype(np.float32)
    labels = rng.integers(0, 20, 1000).astype(np.int32)
    labels[labels == 13] = 12  # an empty cluster
    sums, counts = accumulate(X, labels, 20)
    expected = np.zeros((20, 7))
    np.add.at(expected, labels, X.astype(np.float64))
    np.testing.assert_allclose(sums, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=20))
    assert counts[13] == 0


def test_kernel_arguments_are_checked():
    X = np.zeros((5, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="centers must have shape"):
        nearest_codewords(X, np.zeros((3, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="centers must have shape"):
        nearest_codewords(X, np.zeros((0, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="n_threads"):
        nearest_codewords(X, np.zeros((3, 4), dtype=np.float32), n_threads=0)
    with pytest.raises(ValueError, match="simd must be"):
        nearest_codewords(X, np.zeros((3, 4), dtype=np.float32), simd="sse")
    with pytest.raises(ValueError, match="labels must be in"):
        accumulate(X, np.array([0, 1, 2, 3, 9], dtype=np.int32), 4)
    with pytest.raises(ValueError, match="labels has 2 entries"):
        accumulate(X, np.array([0, 1], dtype=np.int32), 4)
    bounds = np.array([0, 2, 4], dtype=np.intp)
    with pytest.raises(ValueError, match="cannot hold 300"):
        encode(X, bounds, np.zeros((2, 300, 2), dtype=np.float32), np.empty((5, 2), np.uint8))
    with pytest.raises(ValueError, match="codes must have shape"):
        encode(X, bounds, np.zeros((2, 16, 2), dtype=np.float32), np.empty((4, 2), np.uint8))
    with pytest.raises(ValueError, match="bounds must increase"):
        encode(X, np.array([0, 3, 4], dtype=np.intp), np.zeros((2, 16, 2), np.float32),
               np.empty((5, 2), np.uint8))
    with pytest.raises(ValueError, match="centers must have shape"):
        encode(X, bounds, np.zeros((3, 16, 2), dtype=np.float32), np.empty((5, 2), np.uint8))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kmeans_follows_scikit_learn_lloyd_from_the_same_start(dtype):
    X, _ = make_blobs(n_samples=2000, n_features=6, centers=30, cluster_std=2.0, random_state=0)
    X = X.astype(dtype)
    init = X[np.random.default_rng(0).choice(2000, 24, replace=False)]
    for n_iter in (1, 5, 30):
        centers, inertia = _kmeans(X, init, n_iter, n_threads=2)
        km = KMeans(24, init=init, n_init=1, max_iter=n_iter, tol=0, algorithm="lloyd").fit(X)
        np.testing.assert_allclose(centers, km.cluster_centers_, rtol=1e-4, atol=1e-4)
        assert inertia == pytest.approx(km.inertia_, rel=1e-4)


def test_kmeans_refills_an_empty_cluster_with_the_farthest_row():
    X, _ = make_blobs(n_samples=600, n_features=3, centers=6, random_state=1)
    init = X[:8].copy()
    init[5] = init[2]  # an exact duplicate never wins a row (ties: smallest index)
    labels0, sq0 = nearest_codewords(X, init)
    assert not np.any(labels0 == 5)
    centers, _ = _kmeans(X, init, 1, n_threads=1)
    np.testing.assert_array_equal(centers[5], X[np.argmax(sq0)])
    labels, _ = nearest_codewords(X, centers)
    assert len(np.unique(labels)) == 8


def test_product_quantizer_training_does_not_depend_on_threads(monkeypatch):
    X, _ = make_blobs(n_samples=3000, n_features=16, centers=40, random_state=0)
    import sklearn_hash._pq as pq_module

    fitted = []
    for n_threads in (1, 2):
        monkeypatch.setattr(pq_module, "effective_n_threads", lambda n_jobs=None, t=n_threads: t)
        pq = ProductQuantizer(32, random_state=0).fit(X)
        fitted.append((pq.cluster_centers_, pq.transform(X)))
    np.testing.assert_array_equal(fitted[0][0], fitted[1][0])
    np.testing.assert_array_equal(fitted[0][1], fitted[1][1])


def test_fewer_distinct_rows_than_codewords_warns_and_still_encodes():
    from sklearn.exceptions import ConvergenceWarning

    rng = np.random.default_rng(4)
    X = np.repeat(rng.standard_normal((10, 4)), 30, axis=0)  # 10 distinct rows, K = 16
    with pytest.warns(ConvergenceWarning, match="Number of distinct codewords"):
        pq = ProductQuantizer(4, subspace_bits=4, random_state=0).fit(X)
    np.testing.assert_allclose(pq.inverse_transform(pq.transform(X)), X, atol=1e-12)


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("n_codewords", [1, 17, 64, 300])
@pytest.mark.parametrize("simd", SIMD)
def test_codeword_scores_match_numpy_and_do_not_depend_on_the_batch(dtype, rtol, n_codewords,
                                                                    simd):
    rng = np.random.default_rng(n_codewords)
    X = rng.standard_normal((261, 9)).astype(dtype)
    centers = rng.standard_normal((n_codewords, 9)).astype(dtype)
    bias = rng.standard_normal(n_codewords).astype(dtype)
    scores = codeword_scores(X, centers, bias, n_threads=2, simd=simd)
    assert scores.shape == (261, n_codewords) and scores.dtype == dtype
    expected = X.astype(np.float64) @ centers.T.astype(np.float64) + bias
    np.testing.assert_allclose(scores, expected, rtol=rtol, atol=rtol * 10)
    np.testing.assert_allclose(codeword_scores(X, centers, simd=simd), expected - bias,
                               rtol=rtol, atol=rtol * 10)
    # Each row on its own: the same bits alone, in any batch, with any threads
    # (a single row goes through the one-row kernel, a batch through blocks of 4).
    for rows in (slice(0, 1), slice(3, 4), slice(260, 261), slice(5, 12), slice(250, 261)):
        np.testing.assert_array_equal(
            codeword_scores(np.ascontiguousarray(X[rows]), centers, bias, simd=simd), scores[rows])
    with pytest.raises(ValueError, match="bias must have shape"):
        codeword_scores(X, centers, bias[:-1] if n_codewords > 1 else np.zeros(2))
    # Packed once (a searcher's cache): the same bits.
    packed = pack_codewords(centers, dtype)
    np.testing.assert_array_equal(codeword_scores(X, packed, bias, n_threads=2, simd=simd),
                                  scores)


def test_packed_codewords_are_checked():
    X = np.zeros((3, 4))
    centers = np.ones((5, 4))
    with pytest.raises(ValueError, match=r"pack_codewords\(centers, float64\) with 4 features"):
        codeword_scores(X, pack_codewords(centers, np.float32))
    with pytest.raises(ValueError, match="with 4 features"):
        codeword_scores(X, pack_codewords(np.ones((5, 3)), np.float64))
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        pack_codewords(centers, np.int64)
    with pytest.raises(ValueError, match="centers must have shape"):
        pack_codewords(np.ones(4), np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_smallest_per_row_is_a_stable_argsort_cut_to_n(dtype):
    rng = np.random.default_rng(0)
    # Small integers: many equal values, ranked by column.
    values = rng.integers(0, 20, (57, 300)).astype(dtype)
    values[3] = 7  # a row of one value: the first n columns
    values[4] = -np.inf
    values[5, ::3] = np.inf
    strided = values[:, ::2]  # rows that are not contiguous
    for v in (values, strided):
        expected = np.argsort(v, axis=1, kind="stable")
        for n in (0, 1, 2, 10, 64, v.shape[1]):
            for n_threads in (1, 2):
                got = smallest_per_row(v, n, n_threads=n_threads)
                assert got.dtype == np.int64 and got.shape == (len(v), n)
                np.testing.assert_array_equal(got, expected[:, :n])
                columns, selected = smallest_per_row(v, n, n_threads=n_threads,
                                                     return_values=True)
                np.testing.assert_array_equal(columns, expected[:, :n])
                assert selected.dtype == dtype and selected.shape == (len(v), n)
                np.testing.assert_array_equal(selected,
                                              np.take_along_axis(v, expected[:, :n], 1))
    assert smallest_per_row(values[:0], 3).shape == (0, 3)
    empty = smallest_per_row(values[:0], 3, return_values=True)
    assert empty[0].shape == empty[1].shape == (0, 3) and empty[1].dtype == dtype
    # The values are copied exactly: float32 ones that no double rounds away.
    tiny = np.array([[1 + 2.0**-23, 1.0, np.float32(0.1)]], dtype=np.float32)
    np.testing.assert_array_equal(smallest_per_row(tiny, 3, return_values=True)[1],
                                  np.sort(tiny, axis=1))
    with pytest.raises(ValueError, match=r"n must be in \[0, 300\]; got n=301"):
        smallest_per_row(values, 301)
    with pytest.raises(ValueError, match="n must be in"):
        smallest_per_row(values, -1)
    with pytest.raises(ValueError, match="n_threads must be >= 1"):
        smallest_per_row(values, 3, n_threads=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_codewords", [16, 256, 70])
def test_subspace_scores_are_codeword_scores_per_subspace_bit_for_bit(dtype, n_codewords):
    rng = np.random.default_rng(n_codewords)
    bounds = np.array([0, 3, 6, 8, 10, 11])  # unequal subspaces, as 11 features in 5 give
    M, width = len(bounds) - 1, 3
    centers = np.zeros((M, n_codewords, width), dtype=dtype)  # padded beyond each subspace
    for m in range(M):
        w = bounds[m + 1] - bounds[m]
        centers[m, :, :w] = rng.standard_normal((n_codewords, w))
    X = rng.standard_normal((600, 11)).astype(dtype)  # more rows than one task's block
    packed = pack_subspace_codewords(centers, dtype)
    for n_threads in (1, 2):
        got = subspace_scores(X, packed, bounds, n_threads=n_threads)
        assert got.shape == (600, M, n_codewords) and got.dtype == dtype
        for m in range(M):
            lo, hi = bounds[m], bounds[m + 1]
            expected = codeword_scores(np.ascontiguousarray(X[:, lo:hi]),
                                       centers[m, :, : hi - lo])
            np.testing.assert_array_equal(got[:, m], expected)
    assert subspace_scores(X[:0], packed, bounds).shape == (0, M, n_codewords)
    with pytest.raises(ValueError, match="bounds must rise from 0 to 11"):
        subspace_scores(X, packed, [0, 4, 6, 8, 10, 11])  # a subspace wider than 3
    with pytest.raises(ValueError, match="bounds must rise"):
        subspace_scores(X, packed, bounds[:-1])
    other = np.float64 if dtype == np.float32 else np.float32
    with pytest.raises(ValueError, match="pack_subspace_codewords"):
        subspace_scores(X, pack_subspace_codewords(centers, other), bounds)
    with pytest.raises(ValueError, match="centers must have shape"):
        pack_subspace_codewords(centers[0], dtype)


_HEAP_LIMIT_CHILD = """
import resource, sys
import numpy as np
from sklearn_hash._kernels._nearest import smallest_per_row

n, heaps = 5_000_000, float(sys.argv[1])  # a thread's heap: 40 MB, mapped on its own by malloc
values = np.tile(np.arange(n, 0, -1, dtype=np.float32), (2, 1))
smallest_per_row(values[:, :100], 10, n_threads=2)  # start the worker thread first
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
# Address space for the output and `heaps` threads' heaps.
resource.setrlimit(resource.RLIMIT_AS, (vm + 2 * n * 8 + int(heaps * n * 8),
                                        resource.RLIM_INFINITY))
try:
    got = smallest_per_row(values, n, n_threads=2)
except MemoryError as exc:
    print("MemoryError:", exc)
else:
    print("right" if np.array_equal(got[:, :3], [[n - 1, n - 2, n - 3]] * 2) else "wrong")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not openmp_enabled(),
                    reason="needs Linux's RLIMIT_AS and an OpenMP build")
@pytest.mark.parametrize("heaps, expected", [(0.5, "MemoryError"), (2.5, "right")])
def test_threads_without_their_buffers_give_memory_error_not_a_crash(heaps, expected):
    # No room for a thread's heap: every thread still meets the parallel loop
    # (OpenMP requires it) and the call raises MemoryError; with room for
    # both, the right answer. (With room for one heap, one thread or both may
    # get it, as the second may start after the first freed its heap.)
    done = subprocess.run([sys.executable, "-c", _HEAP_LIMIT_CHILD, str(heaps)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr
    # The kernel's own error, not numpy's (the limit leaves room for the output array).
    expected = {"MemoryError": "MemoryError: could not allocate the selection heap."}.get(
        expected, expected)
    assert done.stdout.strip() == expected, done.stdout
