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

    python benchmarks/bench_ivf.py [--n 1000000] [--threads 2]
"""

import argparse

import numpy as np
from _common import exact_top10, recall_at_10, timed, timed_best

from sklearn_hash import IVFQuantizedNeighbors, ProductQuantizer, QuantizedNeighbors


def make_data(n, d, n_clusters, seed):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(0).standard_normal((n_clusters, d), dtype=np.float32)
    labels = rng.integers(0, n_clusters, n)
    return (centers[labels] + 0.7 * rng.standard_normal((n, d), dtype=np.float32)).astype(np.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import faiss

    d, n_lists, M, n_q = 128, 1024, 8, 1000
    X = make_data(args.n, d, 1000, seed=1)
    Q = make_data(n_q, d, 1000, seed=2)
    X_train = X[:100_000]
    truth = exact_top10(X, Q)
    faiss.omp_set_num_threads(args.threads)

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


if __name__ == "__main__":
    main()
