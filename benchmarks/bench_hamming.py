"""Hamming k-NN search speed: sklearn_hash's kernel beside faiss IndexBinaryFlat and numpy.

1,000,000 random 64-bit codes, 1,000 queries, k = 10 and 100, 1 and 2 threads.
Prints queries per second of each and the ratio to faiss, measured in this run;
the kernel's own path (AVX-512 VPOPCNTDQ where the processor has it) and the
AVX2 and portable C paths that other processors run.
faiss-cpu is optional (``pip install faiss-cpu``); without it its column is
left out. The numpy baseline runs on a subset of the queries.

    python benchmarks/bench_hamming.py [--n 1000000] [--bits 64] [--queries 1000]
"""

import argparse
import platform
import time

import numpy as np
from sklearn_hash._kernels._hamming import hamming_kneighbors, simd_path

from sklearn_hash._codes import pack_bits


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def numpy_search(queries, database, k):
    """XOR + popcount + stable sort on (distance, index): the obvious numpy code."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for i, q in enumerate(queries):
        dist = np.bitwise_count(database ^ q).sum(axis=1)
        kth = np.partition(dist, k - 1)[k - 1]
        candidates = np.flatnonzero(dist <= kth)  # ascending index
        out[i] = candidates[np.argsort(dist[candidates], kind="stable")[:k]]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    try:
        import faiss
    except ImportError:
        faiss = None

    rng = np.random.default_rng(0)
    db_bits = rng.integers(0, 2, (args.n, args.bits), dtype=np.uint8)
    q_bits = rng.integers(0, 2, (args.queries, args.bits), dtype=np.uint8)
    db, queries = pack_bits(db_bits), pack_bits(q_bits)
    print(f"# {args.n} codes of {args.bits} bits, {args.queries} queries; "
          f"{platform.processor() or platform.machine()}, faiss "
          f"{faiss.__version__ if faiss else 'absent'}; sklearn_hash path: {simd_path()}")
    if faiss is not None:
        index = faiss.IndexBinaryFlat(args.bits)
        index.add(np.packbits(db_bits, axis=1))
        faiss_queries = np.packbits(q_bits, axis=1)

    print("| k | threads | sklearn_hash q/s | AVX2 path q/s | portable path q/s | faiss q/s "
          "| numpy q/s | ratio to faiss |")
    print("|---|---|---|---|---|---|---|---|")
    n_numpy = min(20, args.queries)
    for k in (10, 100):
        expected = hamming_kneighbors(queries, db, k, n_threads=1)[1]
        for threads in (1, 2):
            ours = best_of(lambda: hamming_kneighbors(queries, db, k, n_threads=threads), args.repeat)
            cells = [f"{args.queries / ours:,.0f}"]
            for path in ("avx2", "portable"):
                if simd_path(path) != path:
                    cells.append("-")  # this processor lacks it
                    continue
                t = best_of(lambda: hamming_kneighbors(queries, db, k, n_threads=threads, simd=path), 1)
                cells.append(f"{args.queries / t:,.0f}")
            if faiss is not None:
                faiss.omp_set_num_threads(threads)
                f_time = best_of(lambda: index.search(faiss_queries, k), args.repeat)
                f_dist = index.search(faiss_queries, k)[0]
                ours_dist = hamming_kneighbors(queries, db, k, n_threads=threads)[0]
                assert np.array_equal(np.sort(f_dist, axis=1), ours_dist), "distances differ"
                cells.append(f"{args.queries / f_time:,.0f}")
            else:
                cells.append("-")
            if threads == 1:
                np_time = best_of(lambda: numpy_search(queries[:n_numpy], db, k), 1)
                assert np.array_equal(numpy_search(queries[:n_numpy], db, k), expected[:n_numpy])
                cells.append(f"{n_numpy / np_time:,.0f}")
            else:
                cells.append("-")
            ratio = f"{f_time / ours:.2f}x" if faiss is not None else "-"
            print(f"| {k} | {threads} | " + " | ".join(cells) + f" | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
