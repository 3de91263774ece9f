"""The recall/speed frontier: sklearn_hash's indexes beside faiss HNSW, IVF-PQ(+refine) and hnswlib.

Data (as in the issue that asked for it): a Gaussian mixture with 50
full-covariance components fitted to the real ESC-50 YAMNet embeddings
(``../shared/data/esc50_yamnet.npz``) after PCA to 128 dimensions; N items
(default 1,000,000) and 1,000 queries drawn from it. Its spectrum is skewed
(one direction carries most of the variance), as real embeddings' are.
Recall@10 is against exact float search; q/s for a batch of 1,000 queries
on ``--threads`` threads (best of up to 3 runs); memory is the index's
resident bytes per vector (the code rows it keeps, with fast-scan only those
of cells too small for blocks; the fast-scan blocks; ids and, with
re-ranking, the float32 vectors: 512 B at 128-d, or with
``refine_storage="sq8"`` a byte per feature of the residual plus its cell:
132 B).

Configurations: ours = IVFQuantizedNeighbors (1,024 cells; PQ or OPQ codes
of 64 / 128 bits) swept over n_probe and refine_factor; IVFQuantizedNeighbors
over 4-bit codes (PQ 32x4 and 64x4, OPQ 32x4; the cells scanned by
fast-scan, with the answers of the float tables; PQ 64x4 also with 8-bit
re-ranking rows), swept likewise; and
exhaustive QuantizedNeighbors over 4-bit PQ codes;
faiss = HNSW32 (efSearch 16..128), IVF1024,PQ16x8 + exact refine, IVF1024,
PQ32x4fs (fast-scan) + exact refine, IVF1024,PQ16x8 + SQ8 refine (8 bits per
feature of the vectors); hnswlib (M=16) when installed. Then
the best q/s reaching recall 0.90 / 0.95 / 0.99 for each library, and
exhaustive ADC recall of PQ vs OPQ (ours) vs faiss OPQ+PQ at 64 and 128
bits.

    python benchmarks/bench_frontier.py [--n 1000000] [--threads 2] [--skip-hnsw]
        [--parts ivf8 ivf4 flat4 faiss-hnsw faiss-ivf hnswlib opq mmap held storage nested
                 range]
        [--cache FILE.npz] [--query-seed SEED]
        [--only TEXT ...]

``--parts`` runs some of the sections (default: all); ``--only`` keeps our
configurations whose name contains one of the texts (e.g. ``--only "sq8
rows"``); ``--cache`` keeps the data and its exact neighbours in a file
(made on the first run). ``mmap`` saves the IVF1024 + PQ 64x4 index (float32
and sq8 re-ranking rows), loads it memory-mapped in a fresh process and
reports its resident memory (anonymous and file-backed) after searching.
``held`` counts with tracemalloc every array the fitted index holds in
memory (without re-ranking rows, with sq8 and with float32 rows).
``range`` runs range searches (``radius_neighbors`` of the IVF1024 + PQ 64x4
index, without and with re-ranking) beside faiss's IVF-PQ ``range_search``
(with and without ``IndexRefineFlat``), scored against the exact balls.
``storage`` re-ranks the same candidates by rows of fewer bytes (the two
built storages and others computed with numpy) to show what recall each
row size can reach. ``nested`` simulates an index not built yet (scalar
codes in the axes of groups of cells, their 4 high bits scanned; see
``nested_part``): its recall and memory with numpy, and its first stage's
time through the built fast-scan kernel.
"""

import argparse
import time
from pathlib import Path

import numpy as np
from _common import exact_top10, recall_at_10, timed, timed_best
from sklearn.cluster import KMeans

from sklearn_hash import (
    OPQ,
    IVFQuantizedNeighbors,
    ProductQuantizer,
    QuantizedNeighbors,
)
from sklearn_hash._backends import InvertedLists

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "esc50_yamnet.npz"


def make_data(n, n_queries, seed=0):
    """Samples of a 50-component Gaussian mixture fitted to YAMNet after PCA to 128-d."""
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    X = np.load(DATA)["X"].astype(np.float64)
    Z = PCA(128, random_state=0).fit_transform(X)
    gm = GaussianMixture(50, covariance_type="full", reg_covar=1e-4, random_state=0).fit(Z)
    rng = np.random.default_rng(seed)
    chol = np.linalg.cholesky(gm.covariances_)

    def draw(m):
        comp = rng.choice(50, size=m, p=gm.weights_)
        out = np.empty((m, 128), dtype=np.float32)
        for c in range(50):
            rows = np.flatnonzero(comp == c)
            noise = rng.standard_normal((rows.size, 128))
            out[rows] = gm.means_[c] + noise @ chol[c].T
        return out

    return draw(n), draw(n_queries)


def row(table, library, config, qps, recall, memory):
    table.append((library, config, qps, recall, memory))
    print(f"| {library} | {config} | {qps:,.0f} | {recall:.3f} | {memory:.0f} B |", flush=True)


MMAP_CONFIGS = ((8, 4), (10, 4), (12, 4), (9, 6), (12, 6), (16, 4))


def rss():
    """(anonymous, file-backed) resident bytes of this process."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return tuple(int(fields[f].split()[0]) * 1024 for f in ("RssAnon", "RssFile"))


def child_mmap(folder, threads):
    """In a fresh process: load the saved index memory-mapped, search, report resident memory."""
    d = np.load(folder / "queries.npz")
    Q, truth, n = d["Q"], d["truth"], int(d["n"])
    before = rss()
    ivf = IVFQuantizedNeighbors.load(folder / "index", mmap_mode="r")
    ivf.set_params(n_jobs=threads)
    loaded = rss()
    for n_probe, refine in MMAP_CONFIGS:
        ivf.kneighbors(Q, n_probe=n_probe, refine_factor=refine)  # pages read once
        (_, ind), t = timed_best(lambda p=n_probe, r=refine: ivf.kneighbors(
            Q, n_probe=p, refine_factor=r))
        after = rss()
        anon, file = ((a - b) / n for a, b in zip(after, before))
        print(f"| n_probe {n_probe}, refine {refine} | {len(Q) / t:,.0f} | "
              f"{recall_at_10(ind, truth):.3f} | {anon:.0f} B | {file:.0f} B |", flush=True)
    print(f"\n(after load alone: {(loaded[0] - before[0]) / n:.0f} B anonymous, "
          f"{(loaded[1] - before[1]) / n:.0f} B file-backed per vector)")


def fast_scan_ivf(threads, storage=None):
    """IVF1024 + PQ 64x4 (fast-scan), keeping ``storage`` re-ranking rows (None: none)."""
    rerank = {} if storage is None else {"refine_factor": 4, "refine_storage": storage}
    return IVFQuantizedNeighbors(ProductQuantizer(256, subspace_bits=4, random_state=0),
                                 n_lists=1024, random_state=0, n_jobs=threads, **rerank)


def mmap_part(X, Q, truth, threads, storage):
    """Resident memory of the fast-scan index with memory-mapped rows and vectors (after load)."""
    import subprocess
    import sys
    import tempfile

    print(f"\n## IVF1024 + PQ 64x4 fast-scan, refine_storage={storage!r}, saved and loaded "
          f"memory-mapped (fresh process)\n")
    print("Resident bytes per vector grown since before `load`: anonymous (the fast-scan blocks "
          "and what the search allocates) and file-backed (pages of the memory-mapped code rows, "
          "ids and re-ranking rows read so far: page cache, which the system can evict).\n")
    print("| search | q/s | recall@10 | anonymous | file-backed |")
    print("|---|---|---|---|---|")
    ivf = fast_scan_ivf(threads, storage).fit(X)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        ivf.save(folder / "index")
        ivf = None
        np.savez(folder / "queries.npz", Q=Q, truth=truth, n=len(X))
        subprocess.run([sys.executable, __file__, "--child-mmap", str(folder),
                        "--threads", str(threads)], check=True)


def held_part(X, Q, threads):
    """Everything a fitted fast-scan index holds in memory, counted by tracemalloc."""
    import gc
    import tracemalloc

    print("\n## IVF1024 + PQ 64x4 fast-scan in memory: bytes held per vector (tracemalloc)\n")
    print("Every array the fitted index holds after `fit` and one search (codes, blocks, ids, "
          "each item's cell, the cells' tables, re-ranking rows, spare capacity), and the peak "
          "during `fit` (X itself not counted).\n")
    print("| re-ranking rows | held | peak during fit |")
    print("|---|---|---|")
    for storage in (None, "sq8", "float32"):
        gc.collect()
        tracemalloc.start()
        ivf = fast_scan_ivf(threads, storage).fit(X)
        ivf.kneighbors(Q[:10], n_probe=10)
        gc.collect()
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"| {storage or 'none'} | {held / len(X):.1f} B | {peak / len(X):.1f} B |",
              flush=True)
        ivf = None


def allocate_bits(variances, total, cap=8, weight=None):
    """Greedy bit allocation: each bit to the component whose error it cuts most (by 4).

    With ``weight`` (one per component), the error it cuts is weighted so.
    """
    bits = np.zeros(len(variances), dtype=int)
    error = np.array(variances, dtype=np.float64)
    weight = np.ones_like(error) if weight is None else np.asarray(weight, dtype=np.float64)
    for _ in range(total):
        i = int(np.argmax(np.where(bits < cap, weight * error, -1)))
        bits[i] += 1
        error[i] /= 4
    return bits


def lloyd_max(values, n_levels, n_iter=30):
    """Levels of a 1-D k-means (Lloyd-Max quantizer) of values, from its quantiles."""
    levels = np.quantile(values, (np.arange(n_levels) + 0.5) / n_levels)
    for _ in range(n_iter):
        cell = np.searchsorted((levels[1:] + levels[:-1]) / 2, values)
        counts = np.bincount(cell, minlength=n_levels)
        sums = np.bincount(cell, values, minlength=n_levels)
        levels = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), levels))
    return levels


def transform_coded(Z, train, total_bits, groups=None):
    """Z coded in the principal axes of Z[train], bits allocated by variance, Lloyd-Max levels.

    Transform coding: the best a code of independent scalars can do on a
    Gaussian-like source at ``total_bits`` per row (uniform per-feature
    bytes waste bits on the low-variance components). With ``groups`` (a
    group per row), each group has its own mean, axes, bits and levels,
    learnt from its rows in ``train``.
    """
    if groups is not None:
        decoded = np.empty_like(Z)
        in_train = np.zeros(len(Z), dtype=bool)
        in_train[train] = True
        for g in np.unique(groups):
            rows = np.flatnonzero(groups == g)
            decoded[rows] = transform_coded(Z[rows], np.flatnonzero(in_train[rows]), total_bits)
        return decoded
    sample = Z[train].astype(np.float64)
    mean = sample.mean(axis=0)
    variances, axes = np.linalg.eigh(np.cov(sample, rowvar=False))
    variances, axes = variances[::-1], axes[:, ::-1]
    bits = allocate_bits(variances, total_bits)
    Y, Y_train = (Z - mean) @ axes.astype(np.float32), (sample - mean) @ axes
    decoded = np.zeros_like(Y)
    for i in np.flatnonzero(bits):
        levels = lloyd_max(Y_train[:, i], 2 ** bits[i]).astype(np.float32)
        decoded[:, i] = levels[np.searchsorted((levels[1:] + levels[:-1]) / 2, Y[:, i])]
    return decoded @ axes.T.astype(np.float32) + mean.astype(np.float32)


def gaussian_rate(variances, mse):
    """Bits per row a Gaussian with these component variances needs for this MSE (water-filling)."""
    variances = np.asarray(variances, dtype=np.float64)
    low, high = 0.0, variances.max()
    for _ in range(100):  # the water level theta with sum(min(v, theta)) = mse
        theta = (low + high) / 2
        low, high = (theta, high) if np.minimum(variances, theta).sum() < mse else (low, theta)
    return float(np.sum(np.maximum(0, 0.5 * np.log2(variances / theta))))


def fast_scan_cells(X, threads):
    """IVF1024 + PQ 64x4 (fast-scan) on X, its cells' centroids, each item's cell and residual."""
    ivf = fast_scan_ivf(threads).fit(X)
    C = ivf.coarse_centers_.astype(np.float32)
    cells = np.concatenate([ivf._residuals(X[i : i + 65536], threads)[1]
                            for i in range(0, len(X), 65536)])
    return ivf, C, cells, X - C[cells]


def storage_part(X, Q, truth, threads):
    """Recall when the same candidates are re-ranked by rows of fewer bytes (numpy).

    The candidates are those of IVF1024 + PQ 64x4 at a few (n_probe,
    refine_factor); each is re-ranked by its distance to the row's decoded
    vector. Only ``float32`` and ``sq8`` (residual) are built as
    ``refine_storage``; the others are what a smaller row would give, to
    show where recall 0.95 needs how many bytes. The MSE column is the mean
    squared distance of the decoded rows to the vectors; the rate table after
    it is what a Gaussian model of the residuals needs for the sq8 rows' MSE
    (the water-filling bound of rate-distortion theory): with one covariance
    for all residuals, or one per group of cells or per cell, since a code
    may depend on the cell (as the "per group" rows' axes do).
    """
    print("\n## Re-ranking rows: recall@10 of the same candidates by bytes per row\n")
    ivf, C, cells, R = fast_scan_cells(X, threads)  # R: the residuals to the cells' centroids
    settings = ((9, 4), (12, 4), (9, 8), (16, 8))
    candidates = {s: ivf.kneighbors(Q, n_neighbors=10 * s[1], n_probe=s[0],
                                    return_distance=False) for s in settings}
    first = np.concatenate([ivf.quantizer_.inverse_transform(ivf.quantizer_.transform(
        R[i : i + 65536])) for i in range(0, len(X), 65536)]).astype(np.float32)
    rng = np.random.default_rng(0)
    train = rng.choice(len(X), 200_000, replace=False)
    # groups of neighbouring cells (k-means of their centroids), for codes with their own
    # axes, each learnt from its rows among half the items (200,000 rows leave 1,600 per
    # group of 128 cells, too few for 128-d axes and 256 levels)
    half = rng.choice(len(X), len(X) // 2, replace=False)
    groups32, groups128 = (KMeans(g, n_init=1, random_state=0).fit_predict(C) for g in (32, 128))

    def scalar(Z, bits, q=1e-4):
        low, high = np.quantile(Z[::10], [q, 1 - q], axis=0)
        levels = 2**bits - 1
        codes = np.clip(np.rint((Z - low) / (high - low) * levels), 0, levels)
        return (low + codes / levels * (high - low)).astype(np.float32)

    def product(Z, n_bits):
        pq = ProductQuantizer(n_bits, random_state=0).fit(Z[train])
        return np.concatenate([pq.inverse_transform(pq.transform(Z[i : i + 65536]))
                               for i in range(0, len(Z), 65536)]).astype(np.float32)

    rows = [
        ("float32 vector (refine_storage='float32')", 512, lambda: X),
        ("8-bit per feature of the residual + cell (refine_storage='sq8')", 132,
         lambda: C[cells] + scalar(R, 8)),
        ("7-bit per feature of the residual + cell", 116, lambda: C[cells] + scalar(R, 7)),
        ("8-bit per feature of the vector", 128, lambda: scalar(X, 8)),
        ("4-bit per feature of the residual + cell", 68, lambda: C[cells] + scalar(R, 4)),
        ("PQ 64x8 of the residual + cell", 68, lambda: C[cells] + product(R, 512)),
        ("PQ 32x8 of the residual + cell", 36, lambda: C[cells] + product(R, 256)),
        ("transform-coded residual, 512 bits, + cell", 68,
         lambda: C[cells] + transform_coded(R, train, 512)),
        ("transform-coded residual, 512 bits, axes per group of cells (32 groups), + cell", 68,
         lambda: C[cells] + transform_coded(R, half, 512, groups32[cells])),
        ("transform-coded residual, 512 bits, axes per group of cells (128 groups), + cell",
         68, lambda: C[cells] + transform_coded(R, half, 512, groups128[cells])),
        ("PQ 64x8 of the 4-bit codes' error (IVFPQR), + cell, codes read again", 68,
         lambda: C[cells] + first + product(R - first, 512)),
        ("transform-coded 4-bit codes' error, 448 bits, + cell, codes read again", 60,
         lambda: C[cells] + first + transform_coded(R - first, train, 448)),
        (("transform-coded 4-bit codes' error, 448 bits, axes per group of cells (32 groups), "
          "+ cell, codes read again"), 60,
         lambda: C[cells] + first + transform_coded(R - first, half, 448, groups32[cells])),
        ("transform-coded 4-bit codes' error, 512 bits, + cell, codes read again", 68,
         lambda: C[cells] + first + transform_coded(R - first, train, 512)),
        (("transform-coded 4-bit codes' error, 512 bits, axes per group of cells (128 groups), "
          "+ cell, codes read again"), 68,
         lambda: C[cells] + first + transform_coded(R - first, half, 512, groups128[cells])),
        ("8-bit per feature of the 4-bit codes' error, + cell, codes read again", 132,
         lambda: C[cells] + first + scalar(R - first, 8)),
    ]
    print("| re-ranked by | bytes per row | MSE | "
          + " | ".join(f"n_probe {p}, refine {r}" for p, r in settings) + " |")
    print("|---|---|---|" + "---|" * len(settings))
    mse = {}
    for name, size, decode in rows:
        V = decode()
        mse[name] = float(np.mean(((V - X) ** 2).sum(axis=1), dtype=np.float64))
        recalls = []
        for cand in candidates.values():
            dist = ((V[cand] - Q[:, None]) ** 2).sum(-1)
            order = np.argsort(dist, axis=1, kind="stable")[:, :10]
            recalls.append(recall_at_10(np.take_along_axis(cand, order, 1), truth))
        print(f"| {name} | {size} B | {mse[name]:.4f} | "
              + " | ".join(f"{r:.3f}" for r in recalls) + " |", flush=True)
    sq8 = mse[rows[1][0]]

    def rate(groups):  # bits per row, a Gaussian per group, weighted by the groups' sizes
        total = 0.0
        for g in np.unique(groups):
            mine = np.flatnonzero(groups == g)
            sample = R[mine[:: max(1, len(mine) // 20_000)]].astype(np.float64)
            variances = np.linalg.eigvalsh(np.cov(sample, rowvar=False))
            total += gaussian_rate(np.clip(variances, 1e-12, None), sq8) * len(mine)
        return total / len(R)

    print(f"\nBits per row for the sq8 rows' MSE ({sq8:.4f}) under a Gaussian model of the "
          "residuals (rate-distortion, reverse water-filling), before the id and the fast-scan "
          "code; the code may depend on the cell, so its own covariance counts:\n")
    print("| a Gaussian with the covariance of | bits | bytes |")
    print("|---|---|---|")
    for name, groups in (("all residuals", np.zeros(len(X), dtype=int)),
                         ("each of 32 groups of cells", groups32[cells]),
                         ("each of 128 groups of cells", groups128[cells]),
                         ("each cell (its rows: about 1,000)", cells)):
        bits = rate(groups)
        print(f"| {name} | {bits:.0f} | {bits / 8:.0f} B |", flush=True)


def nested_part(X, Q, truth, threads, n_groups=128):
    """A design not built yet: scalar codes in per-group axes, their 4 high bits scanned.

    The cells' centroids are clustered into ``n_groups`` groups (128; the
    option ``--nested-groups``); each group learns,
    from its rows among half the items, the mean and principal axes of its
    residuals (to their cells' centroids) and an allocation of the row's
    bits to the components. A component of b bits is quantized uniformly
    (2**b levels over its 0.01%-99.99% range), so its 4 high bits are a
    16-level quantizer of their own (nested codes). The first stage scans
    the 4 high bits of the 48 or 64 components with the most bits (what a
    fast-scan block would hold, 24 or 32 B) in the probed cells, by their
    float tables (the answers fast-scan gives, bit for bit); the second
    re-ranks ``refine_factor x 10`` candidates by the whole code (the low
    bits and the other components: the re-ranking row). numpy throughout:
    recall and memory, no speed.

    The payload per vector counts, as the frontier table does for every
    index (HNSW's included): the fast-scan blocks (each cell padded to whole
    128-row blocks), the row (whole bytes), the int64 id and the groups'
    means, axes and ranges. It assumes rows kept in cell order (a row
    carrying its cell, as the sq8 rows do, adds 4 B) and no code rows beside
    the blocks (the built index keeps them in memory; loaded memory-mapped
    it never reads them); the coarse centroids (0.5 B) and the search's
    buffers are not counted.

    The bits go to the component whose error cut, weighted by
    ``min(variance, 0.3)``, is largest: the error that misorders neighbours
    is the one along their differences, whose squared size is about twice
    a component's variance for small components and levels off near 0.56
    for large ones, so large components count alike. (Scratch runs on these
    queries: the neighbour differences measured so; levels 0.1, 0.3 and 1.0
    gave recall within 0.002 of each other at 512 bits; allocating by MSE
    instead starves the large components and lost about 0.01 of recall.)
    """
    print(f"\n## Not built: nested scalar codes in the axes of {n_groups} groups of cells "
          f"(numpy, recall and memory)\n")
    ivf, C, cells, R = fast_scan_cells(X, threads)
    rng = np.random.default_rng(0)
    group_of_cell = KMeans(n_groups, n_init=1, random_state=0).fit_predict(C)
    groups = group_of_cell[cells]
    in_half = np.zeros(len(X), dtype=bool)
    in_half[rng.choice(len(X), len(X) // 2, replace=False)] = True
    settings = ((9, 4), (12, 4), (10, 6), (16, 8))
    order = np.argsort(cells, kind="stable")
    starts = np.searchsorted(cells[order], np.arange(len(C) + 1))
    nearest_cells = np.argsort(((Q[:, None, :] - C[None]) ** 2).sum(-1), axis=1)[:, :16]

    def code(total, n_scanned):
        high = np.empty_like(R)  # decoded from the 4 high bits of the scanned components
        full = np.empty_like(R)  # decoded from the whole code
        row_bytes = 0.0  # summed over the items
        # for the scan: each row's 4 high bits, each group's mean, scanned axes and levels
        codes = np.zeros((len(X), n_scanned), dtype=np.uint8)
        means = np.zeros((n_groups, 128), dtype=np.float32)
        scan_axes = np.zeros((n_groups, 128, n_scanned), dtype=np.float32)
        scan_levels = np.zeros((n_groups, n_scanned, 16), dtype=np.float32)
        for g in range(n_groups):
            rows = np.flatnonzero(groups == g)
            sample = R[rows[in_half[rows]]].astype(np.float64)
            mean = sample.mean(axis=0)
            variances, axes = np.linalg.eigh(np.cov(sample, rowvar=False))
            variances, axes = np.clip(variances[::-1], 0, None), axes[:, ::-1]
            bits = allocate_bits(variances, total, cap=16, weight=np.minimum(variances, 0.3))
            scanned = np.argsort(-bits, kind="stable")[:n_scanned]
            bits[scanned] = np.maximum(bits[scanned], 4)
            row_bytes += -(-(bits.sum() - 4 * n_scanned) // 8) * len(rows)  # whole bytes
            means[g], scan_axes[g] = mean, axes[:, scanned]
            Y, Y_sample = (R[rows] - mean) @ axes, (sample - mean) @ axes
            d_high, d_full = np.zeros_like(Y), np.zeros_like(Y)
            for i in np.flatnonzero(bits):
                low, top = np.quantile(Y_sample[:, i], [1e-4, 1 - 1e-4])
                n = 2 ** bits[i]
                c = np.clip(np.floor((Y[:, i] - low) / (top - low) * n), 0, n - 1)
                d_full[:, i] = low + (c + 0.5) / n * (top - low)
                if i in scanned:
                    j = int(np.flatnonzero(scanned == i)[0])
                    codes[rows, j] = c // 2 ** (bits[i] - 4)
                    scan_levels[g, j] = low + (np.arange(16) + 0.5) / 16 * (top - low)
                    d_high[:, i] = scan_levels[g, j][codes[rows, j]]
            high[rows] = d_high @ axes.T + mean
            full[rows] = d_full @ axes.T + mean
        model = (codes, means, scan_axes, scan_levels)
        return high + C[cells], full + C[cells], row_bytes / len(X), model

    def scan(model, n_probe, k):
        """The first stage with the built fast-scan kernel: a table per (query, probe)."""
        codes, means, scan_axes, scan_levels = model
        lists = InvertedLists(len(C), codes.shape[1], 16, fast_scan=True)
        lists.add(codes, cells)
        shift = C + means[group_of_cell]  # a cell's centroid + its group's mean

        def search():
            start = time.perf_counter()
            # the cells to visit, by the built index's own coarse step
            probes, _, n_visit = ivf._probes(Q, n_probe, lists.sizes, k, threads)
            query, cell = np.repeat(np.arange(len(Q)), probes.shape[1]), probes.ravel()
            diff = Q[query] - shift[cell]
            projected = np.empty((len(cell), codes.shape[1]), dtype=np.float32)
            group = group_of_cell[cell]
            for g in np.unique(group):
                mine = np.flatnonzero(group == g)
                projected[mine] = diff[mine] @ scan_axes[g]
            tables = np.square(projected[:, :, None] - scan_levels[group])
            # the components left out of the scan decode to the group's mean
            constant = (diff * diff).sum(axis=1) - (projected * projected).sum(axis=1)
            built = time.perf_counter()
            _, found = lists.search(
                tables, np.zeros((len(Q), codes.shape[1], 16), dtype=np.float32),
                constant.reshape(probes.shape).astype(np.float32), probes,
                np.arange(probes.size, dtype=np.int64).reshape(probes.shape), n_visit, k,
                n_threads=threads)
            return found, built - start, time.perf_counter() - built

        runs = [search() for _ in range(3)]
        return runs[0][0], min(r[1] for r in runs), min(r[2] for r in runs)

    print("| code: bits per row | blocks | row | payload per vector | MSE | "
          + " | ".join(f"n_probe {p}, refine {r}" for p, r in settings) + " |")
    print("|---|---|---|---|---|" + "---|" * len(settings))
    for total, n_scanned in ((448, 64), (512, 64), (512, 48), (640, 64)):
        high, full, row_bytes, model = code(total, n_scanned)
        reference = (total, n_scanned) == (512, 64)  # the one compared below
        found = {s: np.empty((len(Q), 10), dtype=np.int64) for s in settings}
        exact = {s: np.empty((len(Q), 10), dtype=np.int64) for s in settings}
        rerank_by = ((full, found), (X, exact)) if reference else ((full, found),)
        if reference:
            first_stage = {s: [None] * len(Q) for s in settings}
            kept, kept_full = model, full
        for q in range(len(Q)):
            for n_probe, refine in settings:
                ids = np.concatenate([order[starts[c] : starts[c + 1]]
                                      for c in nearest_cells[q, :n_probe]])
                k = min(10 * refine, len(ids) - 1)
                first = ((high[ids] - Q[q]) ** 2).sum(axis=1)
                candidates = ids[np.argpartition(first, k)[:k]]
                if reference:
                    first_stage[n_probe, refine][q] = candidates
                for decoded, out in rerank_by:
                    d = ((decoded[candidates] - Q[q]) ** 2).sum(axis=1)
                    out[(n_probe, refine)][q] = candidates[np.argsort(d, kind="stable")[:10]]
        if reference:
            exact_recalls = [recall_at_10(exact[s], truth) for s in settings]
        # fast-scan blocks (each cell padded to whole blocks of 128 rows), the row, the id
        # (int64) and each group's mean, axes and ranges (128 x 131 float32)
        blocks = n_scanned / 2 * (-(-np.diff(starts) // 128) * 128).sum() / len(X)
        index_bytes = blocks + row_bytes + 8 + n_groups * 128 * 131 * 4 / len(X)
        mse = float(np.mean(((full - X) ** 2).sum(axis=1), dtype=np.float64))
        print(f"| {total} allocated, {4 * n_scanned + 8 * row_bytes:.0f} stored: {n_scanned} x 4 "
              f"scanned + the row | {blocks:.1f} B | {row_bytes:.1f} B | {index_bytes:.1f} B | "
              f"{mse:.4f} | "
              + " | ".join(f"{recall_at_10(found[s], truth):.4f}" for s in settings) + " |",
              flush=True)
    print("| its candidates (512 bits, 64 scanned) re-ranked by float32 rows | | | | | "
          + " | ".join(f"{r:.4f}" for r in exact_recalls) + " |")
    # the built index's candidates (PQ 64 x 4 of the residual), the same cells
    built = {by: [] for by in ("float32 rows", "the nested rows (512 bits, 64 scanned)")}
    for n_probe, refine in settings:
        candidates = ivf.kneighbors(Q, n_neighbors=10 * refine, n_probe=n_probe,
                                    return_distance=False)
        for by, decoded in zip(built, (X, kept_full)):
            d = ((decoded[candidates] - Q[:, None]) ** 2).sum(-1)
            top = np.take_along_axis(candidates, np.argsort(d, axis=1, kind="stable")[:, :10],
                                     1)
            built[by].append(recall_at_10(top, truth))
    for by, recalls in built.items():
        print(f"| the built index's candidates (PQ 64 x 4 codes) re-ranked by {by} | | | | | "
              + " | ".join(f"{r:.4f}" for r in recalls) + " |")
    print("\nThe first stage (512 bits, 64 scanned) through the built fast-scan kernel, a table "
          "per (query, probe) built with numpy; beside it the built index's own first stage "
          f"(best of 3, 1,000 queries, {threads} threads):\n")
    print("| n_probe, candidates | coarse step + tables (numpy) | scan (kernel) | built index, "
          "no refine | queries whose candidates differ from the numpy scan's above |")
    print("|---|---|---|---|---|")
    for n_probe, refine in ((9, 4), (12, 4)):
        k = 10 * refine
        found, t_tables, t_scan = scan(kept, n_probe, k)
        _, t_built = timed_best(lambda k=k, p=n_probe: ivf.kneighbors(Q, n_neighbors=k,
                                                                      n_probe=p))
        differ = sum(not np.array_equal(np.sort(found[q]), np.sort(first_stage[n_probe, refine][q]))
                     for q in range(len(Q)))
        print(f"| {n_probe}, {k} | {t_tables * 1e3:.1f} ms | {t_scan * 1e3:.1f} ms | "
              f"{t_built * 1e3:.1f} ms | {differ} of {len(Q)} |", flush=True)


def exact_balls(X, Q, radius):
    """Each query's items within radius, exactly (float32 products, float64 near the edge)."""
    norms = np.einsum("ij,ij->i", X, X)
    balls = []
    for start in range(0, len(Q), 100):
        q = Q[start : start + 100]
        d2 = norms[None] - 2 * (q @ X.T) + np.einsum("ij,ij->i", q, q)[:, None]
        for row, qi in zip(d2, q):
            near = np.flatnonzero(row <= (radius * 1.01) ** 2 + 1e-3)
            exact = ((X[near].astype(np.float64) - qi) ** 2).sum(axis=1)
            balls.append(near[exact <= radius**2])
    return balls


def range_part(X, Q, truth, threads, faiss):
    """Range search: ours (IVF, fast-scan codes, re-ranked or not) and faiss's IVF-PQ.

    The radius is the median over the queries of the exact 10th neighbour's
    distance, so half the queries have at least 10 items in the ball. A
    library is scored by the fraction of the exact balls' items it returns
    (recall) and of its items that are in them (precision).
    """
    d10 = np.sqrt(((X[truth[:, -1]].astype(np.float64) - Q) ** 2).sum(axis=1))
    radius = float(np.median(d10))
    balls = exact_balls(X, Q, radius)
    sizes = np.array([len(b) for b in balls])
    print(f"\n## Range search, radius {radius:.3f} (the median 10th-neighbour distance; exact "
          f"balls of {sizes.mean():.1f} items on average, median {np.median(sizes):.0f}, "
          f"{(sizes == 0).sum()} empty)\n")
    print("| library | configuration | q/s | recall of the balls | precision |")
    print("|---|---|---|---|---|")

    def report(library, config, t, found):
        hits = sum(np.intersect1d(f, b, assume_unique=True).size for f, b in zip(found, balls))
        returned = sum(len(f) for f in found)
        print(f"| {library} | {config} | {len(Q) / t:,.0f} | {hits / sizes.sum():.3f} | "
              f"{hits / max(returned, 1):.3f} |", flush=True)

    ivf = fast_scan_ivf(threads, "float32").fit(X)
    ivf.set_params(refine_factor=None)  # the rows are kept; refine per call below
    for n_probe in (8, 16, 32):
        for refine in (None, 1, 2, 4):
            found, t = timed_best(lambda p=n_probe, r=refine: ivf.radius_neighbors(
                Q, radius=radius, n_probe=p, refine_factor=r, return_distance=False))
            report("sklearn_hash", f"IVF1024 PQ 64x4 fast-scan, n_probe {n_probe}, refine "
                   f"{refine or '-'}", t, found)
    ivf = None
    base = faiss.index_factory(128, "IVF1024,PQ32x8")  # the same 256 bits per code
    base.train(X[:100_000])
    refined = faiss.IndexRefineFlat(base)
    refined.add(X)
    for n_probe in (8, 16, 32):
        faiss.extract_index_ivf(base).nprobe = n_probe
        for index, name in ((base, ""), (refined, " + refine")):
            for k_factor in ((1, 2, 4) if index is refined else (None,)):
                if k_factor is not None:
                    refined.k_factor = k_factor
                try:
                    (lims, _, ids), t = timed_best(lambda i=index: i.range_search(Q, radius**2))
                except RuntimeError as exc:  # range search not built for this index
                    print(f"| faiss | IVF1024,PQ32x8{name}: {str(exc).splitlines()[0][:80]} "
                          f"| | | |")
                    break
                found = [np.sort(ids[lims[q] : lims[q + 1]]) for q in range(len(Q))]
                report("faiss", f"IVF1024,PQ32x8{name}, nprobe {n_probe}"
                       + (f", k_factor {k_factor}" if k_factor else ""), t, found)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-hnsw", action="store_true")
    parts = ["ivf8", "ivf4", "flat4", "faiss-hnsw", "faiss-ivf", "hnswlib", "opq", "mmap",
             "held", "storage", "nested", "range"]
    parser.add_argument("--parts", nargs="+", choices=parts, default=parts)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--nested-groups", type=int, default=128, metavar="N",
                        help="groups of cells whose axes the nested codes use (part nested)")
    parser.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                        help="run only our configurations whose name contains one of these")
    parser.add_argument("--query-seed", type=int, default=None, metavar="SEED",
                        help="search 1,000 other queries, drawn from the mixture with this seed "
                             "(held out from the choices made on the default ones)")
    parser.add_argument("--child-mmap", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_mmap is not None:
        return child_mmap(args.child_mmap, args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    if args.cache is not None and args.cache.exists():
        cached = np.load(args.cache)
        X, Q, truth, t_exact = cached["X"], cached["Q"], cached["truth"], float("nan")
        if len(X) != args.n:
            raise SystemExit(f"{args.cache} holds {len(X):,} items, not --n {args.n:,}.")
    else:
        X, Q = make_data(args.n, 1000)
        truth, t_exact = timed(lambda: exact_top10(X, Q))
        if args.cache is not None:
            np.savez(args.cache, X=X, Q=Q, truth=truth)
    if args.query_seed is not None:
        Q = make_data(1, 1000, seed=args.query_seed)[1]
        truth = exact_top10(X, Q)
        print(f"# queries drawn with seed {args.query_seed}")
    variances = np.sort(X.var(axis=0))[::-1]
    print(f"# {args.n:,} x 128 (variance: largest {variances[0]:.1f}, median "
          f"{np.median(variances):.2f}), 1,000 queries, {args.threads} threads\n")
    table = []
    print("| library | configuration | q/s | recall@10 | memory per vector |")
    print("|---|---|---|---|---|")

    # ---- ours
    eight_bit = [("PQ 64 bits", ProductQuantizer(64, random_state=0)),
                 ("PQ 128 bits", ProductQuantizer(128, random_state=0)),
                 ("OPQ 128 bits", OPQ(128, random_state=0, n_iter=5))]
    four_bit = [("PQ 32x4 fast-scan", ProductQuantizer(128, subspace_bits=4, random_state=0)),
                ("PQ 64x4 fast-scan", ProductQuantizer(256, subspace_bits=4, random_state=0)),
                ("PQ 64x4 fast-scan, sq8 rows",
                 (ProductQuantizer(256, subspace_bits=4, random_state=0), "sq8")),
                ("OPQ 32x4 fast-scan", OPQ(128, subspace_bits=4, random_state=0, n_iter=5))]
    sweeps = {"ivf8": (eight_bit, (4, 8, 16, 32), (None, 4, 16)),
              "ivf4": (four_bit, (4, 6, 8, 9, 10, 12, 16, 32), (None, 2, 3, 4, 5, 6, 8, 16))}
    for part in ("ivf8", "ivf4"):
        if part not in args.parts:
            continue
        configs, probes, refines = sweeps[part]
        for name, quantizer in configs:
            if args.only and not any(text in name for text in args.only):
                continue
            quantizer, storage = quantizer if isinstance(quantizer, tuple) else (quantizer,
                                                                                 "float32")
            ivf = IVFQuantizedNeighbors(quantizer, n_lists=1024, refine_factor=4,
                                        refine_storage=storage, random_state=0,
                                        n_jobs=args.threads)
            _, t_fit = timed(lambda: ivf.fit(X))
            ivf.set_params(refine_factor=None)  # the vectors are kept; refine per call below
            # what the index holds per item: code rows (a byte per codeword index; with
            # fast-scan only those of cells left out of the blocks), int64 ids and the
            # fast-scan blocks of 4-bit codes (half a byte per index, cells padded)
            code_bytes = sum((run.loose if run._codes is None else run._codes).nbytes
                             + run.ids.nbytes + (0 if run.blocks is None else run.blocks.nbytes)
                             for run in ivf._index.runs) / len(X)
            # the re-ranking rows: float32 vectors (512 B) or sq8 ones (128 B + the cell)
            row_bytes = ivf._vectors.dtype.itemsize * ivf._vectors.row_shape[0]
            for n_probe in probes:
                for refine in refines:
                    (_, ind), t = timed_best(lambda p=n_probe, r=refine: ivf.kneighbors(
                        Q, n_probe=p, refine_factor=r))
                    row(table, "sklearn_hash" + (" 4-bit" if part == "ivf4" else "")
                        + (", sq8 rows" if storage == "sq8" else ""),
                        f"IVF1024 {name}, n_probe {n_probe}, refine "
                        f"{refine or '-'} (fit {t_fit:.0f} s)", len(Q) / t,
                        recall_at_10(ind, truth),
                        code_bytes + (row_bytes if refine else 0))
            ivf = None
    try:
        if "flat4" not in args.parts:
            raise ValueError("not asked for")
        flat4 = QuantizedNeighbors(ProductQuantizer(128, subspace_bits=4, random_state=0),
                                   refine_factor=4, n_jobs=args.threads)
        _, t_fit = timed(lambda: flat4.fit(X))
        flat4.set_params(refine_factor=None)
        for refine in (None, 4, 16):
            (_, ind), t = timed_best(lambda r=refine: flat4.kneighbors(Q, refine_factor=r))
            row(table, "sklearn_hash", f"exhaustive PQ32x4 ({type(flat4._index).__name__}), "
                f"refine {refine or '-'}", len(Q) / t, recall_at_10(ind, truth),
                16 + (512 if refine else 0))
        flat4 = None
    except ValueError as exc:  # 4-bit codes need the fast-scan back-end
        print(f"(4-bit exhaustive search skipped: {exc})")

    # ---- faiss
    if not args.skip_hnsw and "faiss-hnsw" in args.parts:
        hnsw = faiss.IndexHNSWFlat(128, 32)
        _, t_build = timed(lambda: hnsw.add(X))
        for ef in (16, 20, 24, 28, 32, 48, 64, 128):
            hnsw.hnsw.efSearch = ef
            (_, ind), t = timed_best(lambda: hnsw.search(Q, 10))
            row(table, "faiss", f"HNSW32 efSearch {ef} (build {t_build:.0f} s)", len(Q) / t,
                recall_at_10(ind, truth), 512 + 32 * 2 * 4 + 8)
        hnsw = None
    for spec, code_bytes in (("IVF1024,PQ16x8", 16), ("IVF1024,PQ32x4fs", 16)):
        if "faiss-ivf" not in args.parts:
            break
        base = faiss.index_factory(128, spec)
        base.train(X[:100_000])
        refined = faiss.IndexRefineFlat(base)  # keeps the float vectors beside the codes
        refined.add(X)
        for n_probe in (4, 6, 8, 10, 12, 16, 32):
            faiss.extract_index_ivf(base).nprobe = n_probe
            for k_factor in (1, 2, 4, 8, 12, 16, 24):
                refined.k_factor = k_factor
                (_, ind), t = timed_best(lambda: refined.search(Q, 10))
                row(table, "faiss", f"{spec} + refine, nprobe {n_probe}, k_factor {k_factor}",
                    len(Q) / t, recall_at_10(ind, truth), code_bytes + 8 + 512)
        base = refined = None
    if "faiss-ivf" in args.parts:
        # faiss's compressed re-ranking: 8 bits per feature of the vectors (IndexRefine with
        # a scalar quantizer), beside our 8-bit rows of the residuals.
        base = faiss.index_factory(128, "IVF1024,PQ16x8")
        refined = faiss.IndexRefine(base, faiss.IndexScalarQuantizer(
            128, faiss.ScalarQuantizer.QT_8bit))
        refined.train(X[:100_000])
        refined.add(X)
        for n_probe in (8, 12, 16, 32):
            faiss.extract_index_ivf(base).nprobe = n_probe
            for k_factor in (4, 8, 16, 32):
                refined.k_factor = k_factor
                (_, ind), t = timed_best(lambda: refined.search(Q, 10))
                row(table, "faiss, SQ8 refine", f"IVF1024,PQ16x8 + SQ8 refine, nprobe "
                    f"{n_probe}, k_factor {k_factor}", len(Q) / t, recall_at_10(ind, truth),
                    16 + 8 + 128)
        base = refined = None

    # ---- hnswlib
    try:
        import hnswlib
    except ImportError:
        hnswlib = None
        print("(hnswlib not installed: skipped)")
    if hnswlib is not None and "hnswlib" in args.parts:
        for M in (16,):  # M=32 answers like faiss HNSW32 and takes twice as long to build
            index = hnswlib.Index(space="l2", dim=128)
            index.init_index(max_elements=len(X), M=M, ef_construction=100, random_seed=0)
            index.set_num_threads(args.threads)
            _, t_build = timed(lambda: index.add_items(X))
            for ef in (16, 20, 24, 28, 32, 48, 64, 128):
                index.set_ef(ef)
                (ind, _), t = timed_best(lambda: index.knn_query(Q, k=10))
                row(table, "hnswlib", f"M {M}, ef {ef} (build {t_build:.0f} s)", len(Q) / t,
                    recall_at_10(ind, truth), 512 + M * 2 * 4 + 8)
            index = None

    if "mmap" in args.parts:
        for storage in ("float32", "sq8"):
            mmap_part(X, Q, truth, args.threads, storage)
    if "held" in args.parts:
        held_part(X, Q, args.threads)
    if "storage" in args.parts:
        storage_part(X, Q, truth, args.threads)
    if "nested" in args.parts:
        nested_part(X, Q, truth, args.threads, args.nested_groups)
    if "range" in args.parts:
        range_part(X, Q, truth, args.threads, faiss)

    print("\n## Best q/s reaching each recall@10\n")
    print("| library | recall >= 0.90 | recall >= 0.95 | recall >= 0.99 |")
    print("|---|---|---|---|")
    for library in dict.fromkeys(r[0] for r in table):
        cells = []
        for target in (0.90, 0.95, 0.99):
            ok = [r for r in table if r[0] == library and r[3] >= target]
            best = max(ok, key=lambda r: r[2]) if ok else None
            cells.append(f"{best[2]:,.0f} q/s, {best[4]:.0f} B ({best[1]})" if best else "-")
        print(f"| {library} | " + " | ".join(cells) + " |")

    if "opq" not in args.parts:
        return
    print("\n## Exhaustive ADC, recall@10: PQ vs OPQ (ours) vs faiss OPQ + PQ\n")
    print("| bits | PQ (ours) | OPQ (ours) | faiss OPQ + PQ |")
    print("|---|---|---|---|")
    sub = X[: min(len(X), 200_000)]
    sub_truth = exact_top10(sub, Q)
    for bits in (64, 128):
        M = bits // 8
        ours = [recall_at_10(QuantizedNeighbors(q, n_jobs=args.threads).fit(sub).kneighbors(
                    Q, return_distance=False), sub_truth)
                for q in (ProductQuantizer(bits, random_state=0), OPQ(bits, random_state=0))]
        ref = faiss.index_factory(128, f"OPQ{M},PQ{M}")
        ref.train(sub)
        ref.add(sub)
        theirs = recall_at_10(ref.search(Q, 10)[1], sub_truth)
        print(f"| {bits} | {ours[0]:.3f} | {ours[1]:.3f} | {theirs:.3f} |")
    print(f"\n(exact ground truth: {t_exact:.0f} s; run at {time.strftime('%Y-%m-%d %H:%M')})")


if __name__ == "__main__":
    main()
