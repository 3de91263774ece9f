"""Product quantization: training, encoding and ADC / SDC search beside faiss IndexPQ.

Cases: 1,000,000 x 128 with 8 and 16 subspaces, and 100,000 x 1024 with 8
subspaces (8 bits per subspace); 1,000 queries; k = 10 and 100; 1 and 2
threads. Training uses 100,000 rows (faiss subsamples to 256 x K = 65,536
rows, and so does ProductQuantizer by default). Data: Gaussian vectors with a
decaying spectrum (a stand-in for embeddings). Recall@10 is measured against
exact float search over all 1,000 queries. Searches shorter than a second
are timed as the best of up to 3 runs, for both libraries. faiss-cpu is
required for its columns (``pip install faiss-cpu``).

    python benchmarks/bench_adc.py [--quick]
"""

import argparse

import numpy as np
from _common import exact_top10, recall_at_10, timed, timed_best
from sklearn_hash._kernels._adc import adc_kneighbors

from sklearn_hash import ProductQuantizer


def make_data(n, d, seed):
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(1.0 + np.arange(d))
    return (rng.standard_normal((n, d), dtype=np.float32) * scale).astype(np.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10x smaller databases")
    args = parser.parse_args()
    import faiss

    cases = [(1_000_000, 128, 8), (1_000_000, 128, 16), (100_000, 1024, 8)]
    if args.quick:
        cases = [(n // 10, d, M) for n, d, M in cases]
    n_queries = 1000
    print(f"# faiss {faiss.__version__}; {n_queries} queries; times in seconds")
    print("| N x D | M | k | threads | ours ADC q/s (tables + scan) | faiss ADC q/s | ADC ratio | ours SDC q/s "
          "| faiss SDC q/s | recall@10 ours / faiss (ADC) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    training = []
    for n, d, M in cases:
        X = make_data(n, d, seed=0)
        X_q = make_data(n_queries, d, seed=1)
        X_train = X[:100_000]
        faiss.omp_set_num_threads(2)
        pq, t_ours = timed(lambda: ProductQuantizer(8 * M, n_iter=25, random_state=0).fit(X_train))
        index = faiss.IndexPQ(d, M, 8)
        index.pq.cp.niter = 25
        _, t_faiss = timed(lambda: index.train(X_train))
        codes, e_ours = timed(lambda: pq.transform(X))
        _, e_faiss = timed(lambda: index.add(X))
        index.pq.compute_sdc_table()
        training.append((f"{n} x {d}", M, t_ours, t_faiss, e_ours, e_faiss))
        tables = pq.distance_tables(X_q)
        sdc = pq.symmetric_distance_tables()
        sdc_tables = np.ascontiguousarray(sdc[np.arange(M), pq.transform(X_q).astype(np.intp)])
        truth = exact_top10(X, X_q)
        for k in (10, 100):
            for threads in (1, 2):
                faiss.omp_set_num_threads(threads)
                (_, ours_ind), t_scan = timed_best(lambda: adc_kneighbors(tables, codes, k, n_threads=threads))
                _, t_sdc = timed_best(lambda: adc_kneighbors(sdc_tables, codes, k, n_threads=threads))
                index.search_type = faiss.IndexPQ.ST_PQ
                (_, f_ind), f_adc = timed_best(lambda: index.search(X_q, k))
                index.search_type = faiss.IndexPQ.ST_SDC
                _, f_sdc = timed_best(lambda: index.search(X_q, k))
                # faiss builds its tables inside search: ours are timed with the
                # scan (tables by numpy/BLAS, scan by the kernel).
                _, t_tables = timed_best(lambda: pq.distance_tables(X_q))
                t_adc = t_scan + t_tables
                rec = f"{recall_at_10(ours_ind, truth):.3f} / {recall_at_10(f_ind, truth):.3f}"
                print(f"| {n} x {d} | {M} | {k} | {threads} | {n_queries / t_adc:,.0f} "
                      f"(scan only {n_queries / t_scan:,.0f}) | "
                      f"{n_queries / f_adc:,.0f} | {f_adc / t_adc:.2f}x | "
                      f"{n_queries / t_sdc:,.0f} | {n_queries / f_sdc:,.0f} | {rec} |", flush=True)
    print()
    print("| N x D | M | train ours (s) | train faiss (s) | encode ours (s) | encode faiss (s) |")
    print("|---|---|---|---|---|---|")
    for name, M, t_o, t_f, e_o, e_f in training:
        print(f"| {name} | {M} | {t_o:.2f} | {t_f:.2f} | {e_o:.2f} | {e_f:.2f} |")


if __name__ == "__main__":
    main()
