"""Sub-linear search: multi-index hashing vs brute force; the inverted multi-index vs the flat one.

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

Case ``imi``: the inverted multi-index (``IVFQuantizedNeighbors(coarse=
"multi-index")``, K x K cells) against the flat inverted file (``coarse=
"flat"``), both with 128-bit residual PQ codes (16 x 8 bits), on the same
mixture at each size of ``--imi-sizes`` (default 1,000,000 and 8,000,000,
the largest this 24 GiB machine holds with the floats kept for re-ranking):
training time of the coarse quantizer(s), then per ``n_probe`` the mean
number of codes scanned per query, q/s over 1,000 queries and recall@10
against exact search, without and with exact re-ranking of 10 x 10
candidates (``refine_factor=10``).

    python benchmarks/bench_sublinear.py [--n 4000000] [--threads 2]
        [--cases itq,small,uniform,imi] [--imi-sizes 1000000,8000000]
"""

import argparse

import numpy as np
from _common import exact_top10, recall_at_10, timed, timed_best
from bench_frontier import make_data

import sklearn_hash._ivf as ivf_module
from sklearn_hash import ITQ, IVFQuantizedNeighbors, ProductQuantizer
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
    print("| k | brute force | multi-index hashing | speed-up | identical | buckets probed / query "
          "| codes verified / query | auto picks |")
    print("|---|---|---|---|---|---|---|---|")
    for k in (1, 10, 100):
        (d1, i1), t_brute = timed_best(lambda: brute.search(queries, k, n_threads=threads))
        (d2, i2), t_mih = timed_best(lambda: mih.search(queries, k, n_threads=threads))
        same = np.array_equal(i1, i2) and np.array_equal(d1, d2)
        assert same, f"multi-index hashing differs from brute force ({name}, k={k})"
        work = mih._hash_search(queries, k, None, None, threads, count=True)[2].mean(axis=0)
        pick = "hashing" if auto._prefers_tables(queries, k, threads) else "scan"
        print(f"| {k} | {t_brute:.3f} s | {t_mih:.3f} s | {t_brute / t_mih:.1f}x | {same} | "
              f"{work[0]:,.0f} | {work[1]:,.0f} | {pick} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4_000_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default="itq,small,uniform,imi",
                        help="comma-separated subset of itq, small, uniform, imi")
    parser.add_argument("--imi-sizes", default="1000000,8000000",
                        help="database sizes of the imi case, comma-separated")
    parser.add_argument("--imi-rotate", action="store_true",
                        help="imi case: rotate the vectors (and queries) by a random orthogonal "
                             "matrix first, spreading the leading directions over both halves")
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
    if "imi" in cases:
        for n in map(int, args.imi_sizes.split(",")):
            inverted_files(n, args.threads, args.imi_rotate)


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


def inverted_files(n, threads, rotate=False):
    """The inverted multi-index against the flat inverted file on n vectors."""
    X, Q = make_data(n, 1000)
    if rotate:  # distances unchanged; variance spread over every coordinate
        rotation = np.linalg.qr(np.random.default_rng(0).standard_normal((128, 128)))[0]
        rotation = rotation.astype(np.float32)
        X, Q = X @ rotation, Q @ rotation
    truth = exact_top10(X, Q)
    small = n <= 2_000_000
    configs = [  # (coarse, n_lists, n_probe values)
        ("flat", 1024 if small else 4096, (1, 4, 16, 64)),
        ("multi-index", 256**2 if small else 1024**2, (4, 16, 64, 256, 1024)),
    ]
    print(f"\n### Inverted files on {n:,} x 128 (YAMNet mixture{', rotated' if rotate else ''}), "
          f"PQ 16 x 8 bits on the residuals, 1,000 queries, {threads} threads\n")
    print("| coarse | cells | coarse training | fit in all | n_probe | codes scanned / query "
          "| q/s | recall@10 | q/s, refine 10 | recall@10, refine 10 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for coarse, n_lists, probes in configs:
        coarse_seconds = []
        kmeans = ivf_module.kmeans

        def timed_kmeans(*a, **kw):
            out, seconds = timed(lambda: kmeans(*a, **kw))
            coarse_seconds.append(seconds)
            return out

        ivf_module.kmeans = timed_kmeans
        try:
            search = IVFQuantizedNeighbors(ProductQuantizer(128, random_state=0),
                                           coarse=coarse, n_lists=n_lists, refine_factor=10,
                                           random_state=0, n_jobs=threads)
            _, fit_seconds = timed(lambda: search.fit(X))
        finally:
            ivf_module.kmeans = kmeans
        search.set_params(refine_factor=None)
        sizes = search._index.sizes
        for n_probe in probes:
            cells, _, n_visit = search._probes(Q, n_probe, sizes, 10, threads)
            scanned = np.mean([sizes[c[:v]].sum() for c, v in zip(cells, n_visit)])
            found, t = timed_best(lambda: search.kneighbors(Q, n_probe=n_probe)[1])
            refined, t_refine = timed_best(
                lambda: search.kneighbors(Q, n_probe=n_probe, refine_factor=10)[1])
            print(f"| {coarse} | {n_lists:,} | {sum(coarse_seconds):.1f} s | {fit_seconds:.1f} s "
                  f"| {n_probe} | {scanned:,.0f} | {len(Q) / t:,.0f} "
                  f"| {recall_at_10(found, truth):.3f} | {len(Q) / t_refine:,.0f} "
                  f"| {recall_at_10(refined, truth):.3f} |", flush=True)
        del search


if __name__ == "__main__":
    main()
