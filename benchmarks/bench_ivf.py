"""Non-exhaustive search: IVFQuantizedNeighbors beside faiss IndexIVFPQ, and exhaustive ADC.

Data: 1,000,000 x 128 float32 from a mixture of 1,000 Gaussian clusters
(a stand-in for embeddings, which cluster by sound class); 1,000 queries
from the same mixture. Both libraries: 1,024 inverted lists trained on
100,000 rows, residuals product-quantized to 64 bits (8 x 8 bits), 25
k-means iterations (faiss trains on those 100,000 rows; ours subsamples
100,000 of the database). For n_probe in 1, 4, 16, 64 the script prints
queries per second (2 threads) and recall@10 against exact float search;
the last row is exhaustive ADC (``QuantizedNeighbors``) over plain PQ codes
of the same length. faiss-cpu is required for its columns (``pip install faiss-cpu``).

``--parts`` picks what runs (default ``8bit``); two parts are on 4-bit codes
(32 x 4 bits, 16 codewords):

- ``4bit``: on the same data, IVFQuantizedNeighbors scanning its cells by fast-scan
  (the default for 4-bit codes) beside the same index with the float
  tables (``set_fast_scan(False)``: the same answers, checked) and faiss
  ``IndexIVFPQFastScan`` (IVF1024,PQ32x4fs), per n_probe;
- ``cells``: the kernels alone on cells of one size (8 to 1,024 codes, 16 probes per
  query, random tables): microseconds per probe of the float-table scan
  and of fast-scan, which sets ``InvertedLists.FAST_SCAN_MIN_ROWS``, the
  smallest cell worth packing.

    python benchmarks/bench_ivf.py [--n 1000000] [--threads 2] [--parts 8bit 4bit cells]
"""

import argparse

import numpy as np
from _common import exact_top10, recall_at_10, timed, timed_best

from sklearn_hash import IVFQuantizedNeighbors, ProductQuantizer, QuantizedNeighbors
from sklearn_hash._backends import fastscan_simd_path


def make_data(n, d, n_clusters, seed):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(0).standard_normal((n_clusters, d), dtype=np.float32)
    labels = rng.integers(0, n_clusters, n)
    return (centers[labels] + 0.7 * rng.standard_normal((n, d), dtype=np.float32)).astype(np.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", nargs="+", choices=["8bit", "4bit", "cells"],
                        default=["8bit"])
    args = parser.parse_args()
    if args.parts == ["cells"]:
        return cell_sizes(args)
    import faiss

    X = make_data(args.n, 128, 1000, seed=1)
    Q = make_data(1000, 128, 1000, seed=2)
    X_train = X[:100_000]
    truth = exact_top10(X, Q)
    faiss.omp_set_num_threads(args.threads)
    if "8bit" in args.parts:
        eight_bit(args, X, Q, X_train, truth, faiss)
    if "4bit" in args.parts:
        fast_scan(args, X, Q, X_train, truth, faiss)
    if "cells" in args.parts:
        cell_sizes(args)


def eight_bit(args, X, Q, X_train, truth, faiss):
    d, n_lists, M, n_q = 128, 1024, 8, len(Q)

    ours = IVFQuantizedNeighbors(ProductQuantizer(8 * M, random_state=0), n_lists=n_lists,
                                 max_train_samples=100_000, random_state=0, n_jobs=args.threads)
    _, t_fit = timed(lambda: ours.fit(X))
    index = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, n_lists, M, 8)
    index.cp.niter = 25
    index.pq.cp.niter = 25
    _, f_train = timed(lambda: index.train(X_train))
    _, f_add = timed(lambda: index.add(X))
    print(f"# faiss {faiss.__version__}; {args.n} x {d}, {n_lists} lists, {8 * M}-bit residual "
          f"codes, {n_q} queries, {args.threads} threads")
    print(f"# training on 100,000 rows and adding all: ours {t_fit:.2f} s, faiss "
          f"{f_train + f_add:.2f} s ({f_train:.2f} + {f_add:.2f})")
    print("| n_probe | ours q/s | faiss q/s | ratio | recall@10 ours | recall@10 faiss |")
    print("|---|---|---|---|---|---|")
    for n_probe in (1, 4, 16, 64):
        ours.set_params(n_probe=n_probe)
        index.nprobe = n_probe
        ind, t_ours = timed_best(lambda: ours.kneighbors(Q, return_distance=False))
        (_, f_ind), t_faiss = timed_best(lambda: index.search(Q, 10))
        print(f"| {n_probe} | {n_q / t_ours:,.0f} | {n_q / t_faiss:,.0f} | {t_faiss / t_ours:.2f}x | "
              f"{recall_at_10(ind, truth):.3f} | {recall_at_10(f_ind, truth):.3f} |", flush=True)
    flat = QuantizedNeighbors(ProductQuantizer(8 * M, random_state=0), n_jobs=args.threads).fit(X)
    ind, t_flat = timed_best(lambda: flat.kneighbors(Q, return_distance=False))
    print(f"| all (QuantizedNeighbors, exhaustive PQ) | {n_q / t_flat:,.0f} | | | "
          f"{recall_at_10(ind, truth):.3f} | |")


def fast_scan(args, X, Q, X_train, truth, faiss):
    """4-bit codes: fast-scan cells vs float-table cells (ours) vs IndexIVFPQFastScan."""
    d, n_lists, M, n_q = 128, 1024, 32, len(Q)
    ours = IVFQuantizedNeighbors(ProductQuantizer(4 * M, subspace_bits=4, random_state=0),
                                 n_lists=n_lists, max_train_samples=100_000, random_state=0,
                                 n_jobs=args.threads)
    _, t_fit = timed(lambda: ours.fit(X))
    index = faiss.index_factory(d, f"IVF{n_lists},PQ{M}x4fs")
    index.cp.niter = 25
    _, f_train = timed(lambda: index.train(X_train))
    _, f_add = timed(lambda: index.add(X))
    print(f"\n# 4-bit codes: {M} x 4 bits, {n_lists} lists; ours fast-scan: "
          f"{ours._index.fast_scan} (path {fastscan_simd_path()}); fit ours {t_fit:.1f} s, "
          f"faiss {f_train + f_add:.1f} s")
    print("| n_probe | ours fast-scan q/s | ours float tables q/s | faiss IVFPQFastScan q/s "
          "| fast-scan / float | fast-scan / faiss | recall@10 ours | recall@10 faiss |")
    print("|---|---|---|---|---|---|---|---|")
    for n_probe in (1, 4, 16, 64):
        ours.set_params(n_probe=n_probe)
        index.nprobe = n_probe
        ours._index.set_fast_scan(True)
        (dist, ind), t_fast = timed_best(lambda: ours.kneighbors(Q))
        ours._index.set_fast_scan(False)
        (dist2, ind2), t_float = timed_best(lambda: ours.kneighbors(Q))
        assert np.array_equal(ind, ind2) and np.array_equal(dist, dist2), "answers differ"
        ours._index.set_fast_scan(True)
        (_, f_ind), t_faiss = timed_best(lambda: index.search(Q, 10))
        print(f"| {n_probe} | {n_q / t_fast:,.0f} | {n_q / t_float:,.0f} | {n_q / t_faiss:,.0f} "
              f"| {t_float / t_fast:.2f}x | {t_faiss / t_fast:.2f}x | "
              f"{recall_at_10(ind, truth):.3f} | {recall_at_10(f_ind, truth):.3f} |", flush=True)


def cell_sizes(args, M=32, n_probe=16, n_queries=2000, k=10):
    """Kernels alone: microseconds per probed cell, float tables vs fast-scan, by cell size."""
    from sklearn_hash._kernels._adc import ivf_adc_kneighbors
    from sklearn_hash._kernels._fastscan import (
        ivf_fastscan_kneighbors,
        pack_cell_blocks,
    )

    rng = np.random.default_rng(0)
    print(f"\n# kernels alone: {M} x 4-bit codes, {n_probe} probes per query, k={k}, "
          f"{n_queries} queries, {args.threads} threads; microseconds per probe")
    print("| codes per cell | float tables | fast-scan | float / fast-scan |")
    print("|---|---|---|---|")
    for size in (8, 16, 32, 64, 128, 256, 1024):
        n_lists = max(64, 200_000 // size)
        n = n_lists * size
        codes = rng.integers(0, 16, (n, M), dtype=np.uint8)
        ids = np.arange(n, dtype=np.int64)
        starts = np.arange(0, n + 1, size, dtype=np.int64)
        blocks, at = pack_cell_blocks(codes, starts)
        offsets = np.arange(n_lists + 1, dtype=np.int64)
        codes_at = (codes.ctypes.data + starts[:-1] * M).astype(np.intp)
        ids_at = (ids.ctypes.data + starts[:-1] * 8).astype(np.intp)
        blocks_at = (blocks.ctypes.data + at * blocks.shape[1]).astype(np.intp)
        sizes = np.full(n_lists, size, dtype=np.int64)
        # Tables like a query's: the cells' terms spread more than the query's.
        list_tables = rng.random((n_lists, M, 16), dtype=np.float32) * 4
        query_tables = -rng.random((n_queries, M, 16), dtype=np.float32)
        probes = np.stack([rng.choice(n_lists, n_probe, replace=False)
                           for _ in range(n_queries)]).astype(np.int64)
        coarse = np.sort(rng.random((n_queries, n_probe), dtype=np.float32) * 8, axis=1)
        visit = np.full(n_queries, n_probe, dtype=np.int64)
        exclude = np.full(n_queries, -1, dtype=np.int64)
        common = (list_tables, query_tables, coarse, probes, probes, visit, offsets, codes_at,
                  ids_at)
        r_float, t_float = timed_best(lambda c=common, s=sizes, e=exclude: ivf_adc_kneighbors(
            *c, s, 1, e, k, n_threads=args.threads))
        r_fast, t_fast = timed_best(
            lambda c=common, b=blocks_at, s=sizes, e=exclude: ivf_fastscan_kneighbors(
                *c, b, s, e, k, n_threads=args.threads))
        assert np.array_equal(r_float[1], r_fast[1]), "answers differ"
        per = 1e6 * args.threads / (n_queries * n_probe)
        print(f"| {size} | {t_float * per:.2f} | {t_fast * per:.2f} | {t_float / t_fast:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
