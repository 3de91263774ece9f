"""Sub-linear exact search over binary codes: multi-index hashing vs brute force.

Codes: 64-bit ITQ codes of N vectors (default 4,000,000) drawn from the
Gaussian mixture fitted to ESC-50 YAMNet of ``bench_frontier.py`` (realistic:
50 large clusters), N codes in many small clusters of 200 (near-duplicates),
and N uniform random 64-bit codes (the hard case for hashing); 1,000
queries of each kind (ITQ codes of fresh draws; random
codes). For k = 1, 10, 100: seconds per 1,000 queries of
``QuantizedNeighbors(algorithm="brute")`` and ``algorithm="multi-index"``
(tables built beforehand, their build time printed), the speed-up, and the
answers (indices and distances) asserted identical. ``algorithm="auto"``'s
choice is printed too.

    python benchmarks/bench_sublinear.py [--n 4000000] [--threads 2] [--cases itq,small,uniform]
"""

import argparse

import numpy as np
from _common import timed, timed_best
from bench_frontier import make_data

from sklearn_hash import ITQ
from sklearn_hash._backends import HammingScan, MultiIndexHashing, mih_substrings
from sklearn_hash._codes import pack_bits


def compare(name, codes, queries, threads):
    n = len(codes)
    brute = HammingScan(64)
    brute.add(codes)
    mih = MultiIndexHashing(64)
    mih.add(codes)
    _, t_build = timed(mih._build)
    auto = MultiIndexHashing(64, auto=True)
    auto.add(codes)
    bounds = mih_substrings(64, n)
    print(f"\n### {name}: {n:,} codes, substrings {np.diff(bounds).tolist()} bits, "
          f"tables built in {t_build:.1f} s\n")
    print("| k | brute force | multi-index hashing | speed-up | identical | auto picks |")
    print("|---|---|---|---|---|---|")
    for k in (1, 10, 100):
        (d1, i1), t_brute = timed_best(lambda: brute.search(queries, k, n_threads=threads))
        (d2, i2), t_mih = timed_best(lambda: mih.search(queries, k, n_threads=threads))
        same = np.array_equal(i1, i2) and np.array_equal(d1, d2)
        assert same, f"multi-index hashing differs from brute force ({name}, k={k})"
        pick = "hashing" if auto._prefers_tables(queries, k, threads) else "scan"
        print(f"| {k} | {t_brute:.3f} s | {t_mih:.3f} s | {t_brute / t_mih:.1f}x | {same} | "
              f"{pick} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4_000_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default="itq,small,uniform",
                        help="comma-separated subset of itq, small, uniform")
    args = parser.parse_args()
    cases = set(args.cases.split(","))
    rng = np.random.default_rng(0)
    print(f"# Exact k-NN over 64-bit codes, 1,000 queries, {args.threads} threads")
    if "itq" in cases:
        X, Q = make_data(args.n, 1000)
        itq = ITQ(n_bits=64, random_state=0).fit(X[:200_000])
        codes = np.concatenate([pack_bits(itq.transform(X[s : s + 500_000]))
                                for s in range(0, len(X), 500_000)])
        X = None
        compare("ITQ codes of the YAMNet mixture", codes, pack_bits(itq.transform(Q)),
                args.threads)
    # Codes in many small clusters (near-duplicates: the same clip re-encoded, remixes).
    if "small" in cases:
        small_clusters(args, rng)
    if "uniform" in cases:
        uniform_codes(args, rng)


def small_clusters(args, rng):
    centers = rng.integers(0, 2, (args.n // 200, 64)).astype(np.uint8)
    flips = lambda m: (rng.random((m, 64)) < 0.08).astype(np.uint8)  # noqa: E731
    near = pack_bits(centers[rng.integers(0, len(centers), args.n)] ^ flips(args.n))
    near_q = pack_bits(centers[rng.integers(0, len(centers), 1000)] ^ flips(1000))
    compare("codes in small clusters (200 per cluster, 8% of bits flipped)", near, near_q,
            args.threads)


def uniform_codes(args, rng):
    uniform = rng.integers(0, 2**63, size=(args.n, 1), dtype=np.int64).astype(np.uint64)
    uniform ^= rng.integers(0, 2, size=(args.n, 1), dtype=np.int64).astype(np.uint64) << np.uint64(63)
    queries = rng.integers(0, 2**63, size=(1000, 1), dtype=np.int64).astype(np.uint64)
    compare("uniform random codes", uniform, queries, args.threads)


if __name__ == "__main__":
    main()
