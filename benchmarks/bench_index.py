"""Living with an index: growth in batches, per-query cost independent of N, persistence.

Data: 128-d float32 from a mixture of 1,000 Gaussian clusters (as in
bench_ivf.py), generated batch by batch so that the database is never held
whole as floats. Beside faiss (``IndexIVFPQ``; faiss-cpu needed), in the
same run:

1. Growth: an index fitted on the first batch, then ``add`` of 20 batches of
   100,000 items (2,000,000 in all) for ``QuantizedNeighbors`` (64-bit PQ,
   exhaustive) and ``IVFQuantizedNeighbors`` (1,024 cells, 64-bit residual
   codes), faiss IVFPQ's ``add`` alongside: seconds per ``add``, first,
   median and last batch. Linear-time growth shows as a flat column.
2. Per-query cost: single-query IVF latency (n_probe=1, one thread, the
   median of 2,000 one-query calls) at 400,000 and 4,000,000 items with the
   same 1,024 cells; a search touches only the cells it probes.
3. Persistence: ``save`` of the grown index, ``load`` (memory-mapped), one
   more batch added and saved onto the same directory (only the new
   segment is written).
4. Single-query latency of the exhaustive search (``QuantizedNeighbors``,
   64-bit PQ, one thread) at 100,000 items, beside faiss ``IndexPQ``.

    python benchmarks/bench_index.py [--batches 20] [--batch 100000] [--large 4000000]
                                     [--parts growth latency]
"""

import argparse
import tempfile
import time

import numpy as np
from _common import timed

from sklearn_hash import IVFQuantizedNeighbors, ProductQuantizer, QuantizedNeighbors

D, N_LISTS, M = 128, 1024, 8


def batch(n, seed):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(0).standard_normal((1000, D), dtype=np.float32)
    labels = rng.integers(0, 1000, n)
    return (centers[labels] + 0.7 * rng.standard_normal((n, D), dtype=np.float32)).astype(
        np.float32)


def summary(times):
    return f"{times[0]:.3f} / {np.median(times):.3f} / {times[-1]:.3f}"


def latency(search_one, queries):
    """Median seconds of one single-query call."""
    times = []
    for q in queries:
        start = time.perf_counter()
        search_one(q[None])
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=400_000)
    parser.add_argument("--large", type=int, default=4_000_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--flat-items", type=int, default=100_000)
    parser.add_argument("--parts", nargs="+", choices=["growth", "latency"],
                        default=["growth", "latency"])
    args = parser.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    first = batch(args.batch, seed=100)
    Q = batch(2000, seed=2)

    if "growth" in args.parts:
        print(f"## Growth: {args.batches} batches of {args.batch:,} items, {args.threads} threads")
        print("seconds per add: first / median / last batch\n")
        print("| index | fit (first batch) | add | items |")
        print("|---|---|---|---|")
        flat = QuantizedNeighbors(ProductQuantizer(64, random_state=0), n_jobs=args.threads)
        ivf = IVFQuantizedNeighbors(ProductQuantizer(64, random_state=0), n_lists=N_LISTS, n_probe=1,
                                    random_state=0, n_jobs=args.threads)
        coarse = faiss.IndexFlatL2(D)
        ref = faiss.IndexIVFPQ(coarse, D, N_LISTS, M, 8)
        fits = {}
        _, fits["flat"] = timed(lambda: flat.fit(first))
        _, fits["ivf"] = timed(lambda: ivf.fit(first))
        _, fits["faiss"] = timed(lambda: (ref.train(first), ref.add(first)))
        adds = {"flat": [], "ivf": [], "faiss": []}
        for b in range(1, args.batches):
            X = batch(args.batch, seed=100 + b)
            adds["flat"].append(timed(lambda: flat.add(X))[1])
            adds["ivf"].append(timed(lambda: ivf.add(X))[1])
            adds["faiss"].append(timed(lambda: ref.add(X))[1])
        for name, label in [("flat", "QuantizedNeighbors, PQ 64 bits"),
                            ("ivf", "IVFQuantizedNeighbors, 1,024 cells, 64 bits"),
                            ("faiss", "faiss IndexIVFPQ, 1,024 cells, 8 x 8 bits")]:
            print(f"| {label} | {fits[name]:.2f} | {summary(adds[name])} | "
                  f"{args.batch * args.batches:,} |")

        print("\n## Persistence of the grown IVF index")
        with tempfile.TemporaryDirectory() as tmp:
            _, t_save = timed(lambda: ivf.save(tmp))
            loaded, t_load = timed(lambda: IVFQuantizedNeighbors.load(tmp))
            X = batch(args.batch, seed=999)
            _, t_add = timed(lambda: loaded.add(X))
            _, t_resave = timed(lambda: loaded.save(tmp))
            same = np.array_equal(loaded.kneighbors(Q[:100], n_probe=4)[1],
                                  IVFQuantizedNeighbors.load(tmp).kneighbors(Q[:100], n_probe=4)[1])
        print(f"save {t_save:.2f} s, load (memory-mapped) {t_load:.2f} s, add {args.batch:,} "
              f"{t_add:.2f} s, save onto the same directory {t_resave:.2f} s (new segment only); "
              f"answers after reload identical: {same}")
        flat = ivf = loaded = ref = None  # free the memory before the latency runs

    if "latency" in args.parts:
        print(f"\n## Single-query latency, n_probe=1, 1 thread, median of {len(Q):,} calls")
        print("\n| items | IVFQuantizedNeighbors | faiss IndexIVFPQ |")
        print("|---|---|---|")
        rows = {}
        faiss.omp_set_num_threads(1)
        for n in (args.small, args.large):
            ivf = IVFQuantizedNeighbors(ProductQuantizer(64, random_state=0), n_lists=N_LISTS,
                                        n_probe=1, random_state=0, n_jobs=1).fit(first)
            ref = faiss.IndexIVFPQ(faiss.IndexFlatL2(D), D, N_LISTS, M, 8)
            ref.train(first)
            ref.nprobe = 1
            ref.add(first)
            for b in range(1, n // args.batch):
                X = batch(args.batch, seed=100 + b)
                ivf.add(X)
                ref.add(X)
            ours = latency(lambda q: ivf.kneighbors(q, n_neighbors=10), Q)
            theirs = latency(lambda q: ref.search(q, 10), Q)
            rows[n] = ours
            print(f"| {ivf.n_samples_fit_:,} | {ours * 1e6:.0f} us | {theirs * 1e6:.0f} us |")
            ivf = ref = None
        ratio = rows[args.large] / rows[args.small]
        print(f"\nlatency at {args.large:,} / at {args.small:,}: {ratio:.2f}x "
              f"({'within' if ratio <= 2 else 'NOT within'} 2x)")


        print(f"\n## Single-query latency, exhaustive, 1 thread, median of {len(Q):,} calls")
        print("\n| items | QuantizedNeighbors, PQ 64 bits | faiss IndexPQ, 8 x 8 bits |")
        print("|---|---|---|")
        X = batch(args.flat_items, seed=100)
        flat = QuantizedNeighbors(ProductQuantizer(64, random_state=0), n_jobs=1).fit(X)
        ref = faiss.IndexPQ(D, M, 8)
        ref.train(X)
        ref.add(X)
        ours = latency(lambda q: flat.kneighbors(q, n_neighbors=10), Q)
        theirs = latency(lambda q: ref.search(q, 10), Q)
        print(f"| {args.flat_items:,} | {ours * 1e6:.0f} us | {theirs * 1e6:.0f} us |")

if __name__ == "__main__":
    main()
