"""4-bit fast-scan: QuantizedNeighbors (FastScan back-end) beside faiss IndexPQFastScan.

Exhaustive search of 1,000,000 x 128 vectors coded with M = 32 subspaces of
4 bits (128-bit codes; ``--M`` to change), 1,000 queries, k = 10, 2
threads, on two kinds of Gaussian data:

- **isotropic**: unit variance in every direction;
- **skewed**: one direction with variance 222, the others log-spaced from 2
  down to 0.005 (median 0.1), unrotated, as after a PCA: the spectrum of
  real embeddings, where one principal direction dominates.

Each library trains its own 4-bit codebooks on the same 65,536 rows and
codes the database. Recall@10 of each is measured against **float-table ADC
with its own codes** (``adc_kneighbors`` for ours; ``IndexPQ`` holding the
very codes and codebooks of the ``IndexPQFastScan``, built from it, for
faiss), so it counts only what the fast-scan loses, not the quantization.
Ours is timed end to end (``kneighbors``: tables, scan, re-scoring, square
roots), faiss's ``search`` likewise (it builds its tables inside); searches
are timed as the best of up to 3 runs. "re-scored / query" is how many items
per query the filter let through to exact re-scoring with the float tables.
The last rows scale our 8-bit tables by the widest table range alone
(faiss's rule) instead of the sampled bound, on the first 200 queries: the
answers stay exact, but the filter lets through what that scale cannot
tell apart; this is the measurement behind the choice of scale.
"memory per vector": what our fitted index holds after ``fit`` and one
search (tracemalloc: the blocks, their spare capacity, the codebooks),
beside the size of faiss's code buffer (its blocks).
faiss-cpu is required (``pip install faiss-cpu``).

    python benchmarks/bench_fastscan.py [--n 1000000] [--M 32] [--threads 2]
"""

import argparse
import gc
import tracemalloc

import numpy as np
from _common import timed, timed_best
from sklearn.base import clone
from sklearn_hash._kernels._adc import adc_kneighbors
from sklearn_hash._kernels._fastscan import fastscan_kneighbors

from sklearn_hash import ProductQuantizer, QuantizedNeighbors
from sklearn_hash._backends import FastScan, fastscan_simd_path


def make_data(kind, n, d, seed):
    rng = np.random.default_rng(seed)
    if kind == "isotropic":
        std = np.ones(d)
    else:
        std = np.sqrt(np.concatenate([[222.0], np.geomspace(2.0, 0.005, d - 1)]))
    return (rng.standard_normal((n, d), dtype=np.float32) * std.astype(np.float32))


def held_bytes(build):
    """Bytes allocated by ``build()`` and still held once it returns (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    kept = build()  # noqa: F841 (held until measured)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return held


def searched(searcher, queries):
    searcher.kneighbors(queries)
    return searcher


def recall_at_10(found, truth):
    return float(np.mean([len(set(f[:10]) & set(t[:10])) / 10 for f, t in zip(found, truth)]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="database size")
    parser.add_argument("--M", type=int, default=32, help="4-bit subspaces")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args()
    import faiss

    d, M, k, threads = 128, args.M, 10, args.threads
    faiss.omp_set_num_threads(threads)
    print(f"# faiss {faiss.__version__}; {args.n:,} x {d}, M = {M} x 4 bits, "
          f"{args.queries} queries, k = {k}, {threads} threads; "
          f"our shuffle path: {fastscan_simd_path()}")
    rows, widest = [], []
    for kind in ("isotropic", "skewed"):
        X = make_data(kind, args.n, d, seed=0)
        X_q = make_data(kind, args.queries, d, seed=1)
        X_train = X[:65536]

        search = QuantizedNeighbors(
            ProductQuantizer(n_bits=4 * M, subspace_bits=4, max_train_samples=65536,
                             random_state=0),
            n_neighbors=k, n_jobs=threads)
        _, t_fit = timed(lambda: search.fit(X))
        assert isinstance(search._index, FastScan)
        (_, ours), t_ours = timed_best(lambda: search.kneighbors(X_q))
        held = held_bytes(lambda: searched(clone(search).fit(X), X_q[:10])) / args.n
        tables = search.quantizer_.distance_tables(X_q)
        codes = search.codes_
        _, ours_ref = adc_kneighbors(tables, codes, k, n_threads=threads)
        _, _, stats = fastscan_kneighbors(tables, *search._index._blocks_and_sizes(), k,
                                          n_threads=threads, return_stats=True)

        flat = faiss.IndexPQ(d, M, 4)
        flat.pq.cp.niter = 25
        flat.train(X_train)
        flat.add(X)
        fast = faiss.IndexPQFastScan(flat)  # same codebooks and codes
        (_, theirs), t_faiss = timed_best(lambda: fast.search(X_q, k))
        faiss_codes = fast.codes.size() / args.n
        _, theirs_ref = flat.search(X_q, k)

        few = tables[:200]
        (_, wide_ind, wide), t_wide = timed_best(lambda: fastscan_kneighbors(
            few, *search._index._blocks_and_sizes(), k, n_threads=threads,
            return_stats=True, clip_tables=False))
        rows.append((kind, args.queries / t_ours, args.queries / t_faiss,
                     recall_at_10(ours, ours_ref), recall_at_10(theirs, theirs_ref),
                     float(stats["rescored"].mean()), held, faiss_codes))
        widest.append((kind, len(few) / t_wide, recall_at_10(wide_ind, ours_ref),
                       float(wide["rescored"].mean())))
        print(f"{kind}: ours {args.queries / t_ours:,.0f} q/s, faiss {args.queries / t_faiss:,.0f} "
              f"q/s (fit {t_fit:.1f} s)", flush=True)

    print()
    print("| data | ours q/s | faiss IndexPQFastScan q/s | speed-up | recall@10 vs float ADC: "
          "ours / faiss | re-scored / query (ours) | memory per vector: ours / faiss |")
    print("|---|---|---|---|---|---|---|")
    for kind, q_ours, q_faiss, r_ours, r_faiss, rescored, held, faiss_codes in rows:
        print(f"| {kind} | {q_ours:,.0f} | {q_faiss:,.0f} | {q_ours / q_faiss:.2f}x | "
              f"{r_ours:.3f} / {r_faiss:.3f} | {rescored:.0f} | {held:.1f} B / "
              f"{faiss_codes:.1f} B |")
    for kind, q_wide, r_wide, rescored in widest:
        print(f"| {kind}, ours with faiss's table scale (widest range) | {q_wide:,.0f} | | | "
              f"{r_wide:.3f} / | {rescored:.0f} | |")


if __name__ == "__main__":
    main()
