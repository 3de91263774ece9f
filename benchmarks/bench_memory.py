"""Peak memory of indexing a large database, against the size of the input.

Indexes 1,000,000 x 128 float32 rows with a fitted ProductQuantizer (64 bits,
8 codebooks) and a fitted ITQ (64 bits) and reports, from tracemalloc (numpy
reports its allocations to it), the peak memory allocated during
``QuantizedNeighbors.fit`` beyond the input, next to the input and the codes::

    python benchmarks/bench_memory.py [--n 1000000]

The quantizers are fitted beforehand on a subsample and frozen, so the
figure is the encoding's own memory: chunks of 65,536 rows are encoded into
a preallocated code array.
"""

import argparse
import time
import tracemalloc

import numpy as np
from sklearn.frozen import FrozenEstimator

from sklearn_hash import ITQ, ProductQuantizer, QuantizedNeighbors


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    scales = (1.0 / np.arange(1, args.dim + 1) ** 0.5).astype(np.float32)
    X = rng.standard_normal((args.n, args.dim), dtype=np.float32) * scales
    mb = 1024**2
    print(f"input: {args.n:,} x {args.dim} float32 = {X.nbytes / mb:,.0f} MiB")
    for name, quantizer in [("PQ, 64 bits (8 x 256)", ProductQuantizer(64, random_state=0)),
                            ("ITQ, 64 bits", ITQ(64, random_state=0))]:
        quantizer.fit(X[:100_000])
        tracemalloc.start()
        start = time.perf_counter()
        index = QuantizedNeighbors(FrozenEstimator(quantizer)).fit(X)
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"{name}: peak allocated during fit {peak / mb:,.0f} MiB "
              f"({peak / X.nbytes:.2f} x the input), codes {index.codes_.nbytes / mb:,.1f} MiB, "
              f"{seconds:.1f} s")


if __name__ == "__main__":
    main()
