"""4-bit fast-scan inside IVFQuantizedNeighbors: the same answers as the float tables.

What is checked: the cell-aligned block layout (``pack_cell_blocks``), the
kernel ``ivf_fastscan_kneighbors`` against ``ivf_adc_kneighbors`` (itself
checked against a numpy oracle in ``test_ivf.py``) and against that oracle
directly, bit for bit (float32 distances, indices, ties by index), on random
and skewed tables (one dominant subspace), odd sizes, cells under a block
and under the packing threshold, several chunks per cell (packed or not),
heavy ties, ``allowed`` / ``exclude``, the multi-index's joined table rows,
every SIMD path the processor has, and 1 or 2 threads; then the searcher:
fast-scan chosen for 4-bit codes (PQ and OPQ, flat and multi-index), its
answers equal to the float path's through filters, self-queries, removals,
``add``, ``save`` / ``load`` (blocks rebuilt, never saved), pickling and
``compact``; and bad input.
"""

import itertools
import pickle

import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn_hash._kernels._adc import ivf_adc_kneighbors
from sklearn_hash._kernels._fastscan import (
    ivf_fastscan_kneighbors,
    pack_blocks,
    pack_cell_blocks,
    simd_path,
)

from sklearn_hash import OPQ, IVFQuantizedNeighbors, ProductQuantizer
from sklearn_hash._backends import InvertedLists, fastscan_simd_path

LEVEL = {"portable": 0, "avx2": 1, "avx512": 2}
PATHS = [p for p in ("portable", "avx2", "avx512") if LEVEL[p] <= LEVEL[simd_path(True)]]


def layout(offsets, codes, ids, min_rows=1, cuts=1):
    """Kernel arguments for lists stored grouped: each list cut into ``cuts`` chunks.

    Each chunk is packed (cell-aligned) when it holds at least ``min_rows``
    rows, else scored with float lookups.
    """
    chunk_offsets, codes_at, ids_at, blocks_at, sizes, keep = [0], [], [], [], [], []
    for lst in range(len(offsets) - 1):
        a, b = offsets[lst], offsets[lst + 1]
        bounds = np.linspace(a, b, cuts + 1).astype(np.int64)
        for lo, hi in itertools.pairwise(bounds):
            c, i = np.ascontiguousarray(codes[lo:hi]), np.ascontiguousarray(ids[lo:hi])
            blocks, at = pack_cell_blocks(c, np.array([0, hi - lo], np.int64), min_rows)
            keep += [c, i, blocks]
            codes_at.append(c.ctypes.data if hi > lo else 0)
            ids_at.append(i.ctypes.data if hi > lo else 0)
            blocks_at.append(blocks.ctypes.data if at[0] >= 0 and hi > lo else 0)
            sizes.append(hi - lo)
        chunk_offsets.append(len(sizes))
    return (np.array(chunk_offsets, np.int64), np.array(codes_at, np.intp),
            np.array(ids_at, np.intp), np.array(blocks_at, np.intp),
            np.array(sizes, np.int64)), keep


def both(tables, probes, rows, n_visit, lay, exclude, k, **kwargs):
    """(float-table answer, fast-scan answer) on the same layout."""
    offsets, codes_at, ids_at, blocks_at, sizes = lay
    fast = {"simd": kwargs.pop("simd", True)}
    if "span_fraction" in kwargs:
        fast["span_fraction"] = kwargs.pop("span_fraction")
    expected = ivf_adc_kneighbors(*tables, probes, rows, n_visit, offsets, codes_at, ids_at,
                                  sizes, 1, exclude, k, **kwargs)
    got = ivf_fastscan_kneighbors(*tables, probes, rows, n_visit, offsets, codes_at, ids_at,
                                  blocks_at, sizes, exclude, k, **fast, **kwargs)
    return expected, got


def assert_same(expected, got):
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[0], expected[0])


# ------------------------------------------------------------------ block layout

@pytest.mark.parametrize("M", [1, 3, 8, 32])
def test_cells_are_packed_from_block_boundaries(M):
    rng = np.random.default_rng(M)
    sizes = np.array([0, 1, 31, 32, 127, 128, 129, 300, 5])
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    codes = rng.integers(0, 16, (starts[-1], M), dtype=np.uint8)
    for min_rows in (1, 32, 200):
        blocks, at = pack_cell_blocks(codes, starts, min_rows)
        packed = sizes >= min_rows
        np.testing.assert_array_equal(at >= 0, packed)
        assert blocks.shape[0] == ((sizes + 127) // 128 * packed).sum()
        for t in np.flatnonzero(packed):
            cell = pack_blocks(np.ascontiguousarray(codes[starts[t] : starts[t + 1]]))
            np.testing.assert_array_equal(blocks[at[t] : at[t] + len(cell)], cell)


def test_packing_rejects_bad_input():
    codes = np.zeros((10, 4), np.uint8)
    with pytest.raises(ValueError, match="codeword indices must be in \\[0, 15\\]"):
        pack_cell_blocks(codes + 16, np.array([0, 10], np.int64))
    with pytest.raises(ValueError, match="starts must rise from 0"):
        pack_cell_blocks(codes, np.array([0, 11], np.int64))
    with pytest.raises(ValueError, match="starts must rise from 0"):
        pack_cell_blocks(codes, np.array([0, 6, 4, 10], np.int64))
    with pytest.raises(ValueError, match="min_rows must be >= 1"):
        pack_cell_blocks(codes, np.array([0, 10], np.int64), 0)


# ------------------------------------------------------------------------ kernel

def problem(random_index, rng, M, n, n_lists, n_q=9, n_probe=5, kind="random"):
    offsets, codes, ids = random_index(rng, n, n_lists, M, 16)
    n_probe = min(n_probe, n_lists)
    if kind == "ties":  # small integers: exact sums, many equal distances
        lt = rng.integers(0, 3, (n_lists, M, 16)).astype(np.float32)
        qt = rng.integers(-1, 2, (n_q, M, 16)).astype(np.float32)
        coarse = rng.integers(0, 2, (n_q, n_probe)).astype(np.float32)
    else:
        lt = rng.random((n_lists, M, 16), dtype=np.float32) * 10
        qt = rng.random((n_q, M, 16), dtype=np.float32) * -4
        coarse = (rng.random((n_q, n_probe)) * 30).astype(np.float32)
        if kind == "dominant":  # one subspace spans 10**4 times the others
            lt[:, 0] *= np.float32(1e4)
    probes = np.stack([rng.permutation(n_lists)[:n_probe] for _ in range(n_q)]).astype(np.int64)
    n_visit = rng.integers(0, n_probe + 1, n_q).astype(np.int64)
    n_visit[:2] = n_probe
    return (lt, qt, coarse), probes, n_visit, offsets, codes, ids


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("kind", ["random", "dominant", "ties"])
@pytest.mark.parametrize("M", [1, 5, 8, 16, 32, 33])
def test_kernel_equals_float_tables(simd, kind, M, random_index):
    rng = np.random.default_rng(M * 7 + len(kind))
    # 14 lists of about 150 codes (partly filled last blocks); 60 lists of
    # about 35 (under a block, around the packing threshold).
    for n, n_lists in ((2111, 14), (2111, 60)):
        tables, probes, n_visit, offsets, codes, ids = problem(random_index, rng, M, n, n_lists, kind=kind)
        n_q = len(probes)
        exclude = np.where(rng.random(n_q) < 0.5, ids[rng.integers(0, n, n_q)], -1)
        allowed = (rng.random(n) < 0.3).astype(np.uint8)
        for min_rows, cuts in ((1, 1), (32, 2), (100, 3)):
            lay, _keep = layout(offsets, codes, ids, min_rows, cuts)
            for k in (1, 10, 160, n + 5):
                for mask in (None, allowed):
                    for n_threads in (1, 2):
                        assert_same(*both(tables, probes, probes, n_visit, lay, exclude, k,
                                          allowed=mask, n_threads=n_threads, simd=simd))


def test_kernel_equals_the_numpy_oracle_and_filters_most_rows(ivf_oracle, random_index):
    rng = np.random.default_rng(1)
    tables, probes, n_visit, offsets, codes, ids = problem(random_index, rng, 16, 20000, 10, n_q=20)
    exclude = np.full(20, -1, np.int64)
    lay, _keep = layout(offsets, codes, ids)
    rows = probes[:, ::-1].copy()  # tables in another order than the lists
    got = ivf_fastscan_kneighbors(*tables, probes, rows, n_visit, *lay, exclude, 10,
                                  return_stats=True)
    expected = ivf_oracle(*tables, probes, rows, n_visit, offsets, codes, ids, exclude, 10)
    assert_same(expected, got)
    stats = got[2]
    held = np.array([sum(offsets[p + 1] - offsets[p] for p in probes[q, : n_visit[q]])
                     for q in range(20)])
    # Every row is read by the filter or scored, and few are scored.
    assert np.all(stats["scanned"] + stats["rescored"] >= held - 128 * n_visit)
    assert stats["rescored"].sum() < 0.1 * held.sum()


@pytest.mark.parametrize("span_fraction", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("kind", ["random", "dominant", "ties"])
def test_kernel_answers_do_not_depend_on_the_table_steps(span_fraction, kind, random_index):
    # Cells of about 7,500 rows: several parts of 2,048, the table quantized
    # again between them as the k-th distance falls; whatever the steps
    # (span_fraction), the answers are the float tables'.
    rng = np.random.default_rng(5)
    tables, probes, n_visit, offsets, codes, ids = problem(random_index, rng, 16, 30000, 4,
                                                           n_q=6, n_probe=3, kind=kind)
    exclude = np.where(np.arange(6) % 2 == 0, ids[rng.integers(0, 30000, 6)], -1)
    allowed = (rng.random(30000) < 0.5).astype(np.uint8)
    lay, _keep = layout(offsets, codes, ids)
    for k in (1, 10, 100):
        for mask in (None, allowed):
            assert_same(*both(tables, probes, probes, n_visit, lay, exclude, k, allowed=mask,
                              n_threads=2, span_fraction=span_fraction))


@pytest.mark.parametrize("split", [0, 3, 8])
def test_kernel_joins_two_table_rows_at_split(split, random_index):
    rng = np.random.default_rng(split)
    M, n_lists, n_q, n_probe = 8, 9, 6, 4
    offsets, codes, ids = random_index(rng, 3000, n_lists, M, 16)
    list_tables = rng.random((6, M, 16), dtype=np.float32) * 5
    query_tables = rng.random((n_q, M, 16), dtype=np.float32) * -2
    coarse = rng.random((n_q, n_probe), dtype=np.float32)
    probes = np.stack([rng.permutation(n_lists)[:n_probe] for _ in range(n_q)]).astype(np.int64)
    first, second = probes // 3, 3 + probes % 3
    n_visit = np.array([4, 1, 2, 4, 0, 3], dtype=np.int64)
    exclude = np.full(n_q, -1, dtype=np.int64)
    lay, _keep = layout(offsets, codes, ids, 32, 2)
    for k in (1, 15, 400):
        for n_threads in (1, 2):
            assert_same(*both((list_tables, query_tables, coarse), probes, first, n_visit, lay,
                              exclude, k, n_threads=n_threads, second_rows=second, split=split))


def test_kernel_passes_over_cells_out_of_reach(random_index):
    # A far cell's table cannot reach the k-th distance of the near one.
    rng = np.random.default_rng(2)
    offsets, codes, ids = random_index(rng, 4000, 2, 8, 16)
    lt = rng.random((2, 8, 16), dtype=np.float32)
    qt = np.zeros((1, 8, 16), np.float32)
    coarse = np.array([[0.0, 1e6]], np.float32)
    probes = np.array([[0, 1]], np.int64)
    lay, _keep = layout(offsets, codes, ids)
    args = (lt, qt, coarse, probes, probes, np.array([2]), *lay, np.array([-1]), 10)
    d, i, stats = ivf_fastscan_kneighbors(*args, return_stats=True)
    assert stats["skipped"][0] == 1
    assert_same(ivf_adc_kneighbors(*args[:9], lay[4], 1, *args[11:]), (d, i))


def test_kernel_rejects_bad_arguments(random_index):
    rng = np.random.default_rng(0)
    offsets, codes, ids = random_index(rng, 100, 4, 2, 16)
    lt = rng.random((4, 2, 16), dtype=np.float32)
    qt = rng.random((2, 2, 16), dtype=np.float32)
    coarse = rng.random((2, 2), dtype=np.float32)
    probes = np.array([[0, 1], [2, 3]], dtype=np.int64)
    visit = np.array([2, 2], dtype=np.int64)
    none = np.array([-1, -1], dtype=np.int64)
    lay, _keep = layout(offsets, codes, ids)
    ivf_fastscan_kneighbors(lt, qt, coarse, probes, probes, visit, *lay, none, 3)
    for fraction in (0, -0.5, 1.5, np.nan):
        with pytest.raises(ValueError, match=r"span_fraction must be in \(0, 1\]"):
            ivf_fastscan_kneighbors(lt, qt, coarse, probes, probes, visit, *lay, none, 3,
                                    span_fraction=fraction)
    with pytest.raises(ValueError, match="16 codewords per subspace"):
        wide = np.zeros((4, 2, 32), np.float32)
        ivf_fastscan_kneighbors(wide, wide[:2], coarse, probes, probes, visit, *lay, none, 3)
    with pytest.raises(ValueError, match="probes must be list numbers"):
        ivf_fastscan_kneighbors(lt, qt, coarse, probes + 3, probes, visit, *lay, none, 3)
    with pytest.raises(ValueError, match="n_visit must be in"):
        ivf_fastscan_kneighbors(lt, qt, coarse, probes, probes, visit + 1, *lay, none, 3)
    with pytest.raises(ValueError, match="one entry per chunk"):
        ivf_fastscan_kneighbors(lt, qt, coarse, probes, probes, visit, *lay[:3], lay[3][:1],
                                lay[4], none, 3)
    # A chunk needs its code rows or its blocks (the kernel reads rows only without blocks).
    with pytest.raises(ValueError, match="need addresses"):
        ivf_fastscan_kneighbors(lt, qt, coarse, probes, probes, visit, lay[0],
                                np.zeros_like(lay[1]), lay[2], np.zeros_like(lay[3]), lay[4],
                                none, 3)
    with pytest.raises(ValueError, match="need addresses"):
        ivf_fastscan_kneighbors(lt, qt, coarse, probes, probes, visit, lay[0], lay[1],
                                np.zeros_like(lay[2]), *lay[3:], none, 3)
    assert (lay[3] != 0).all()  # every chunk packed (min_rows=1): no row is read
    assert_same(ivf_fastscan_kneighbors(lt, qt, coarse, probes, probes, visit, lay[0],
                                        np.zeros_like(lay[1]), *lay[2:], none, 3),
                ivf_fastscan_kneighbors(lt, qt, coarse, probes, probes, visit, *lay, none, 3))
    with pytest.raises(ValueError, match="table_rows must be rows"):
        ivf_fastscan_kneighbors(lt, qt, coarse, probes, probes + 2, visit, *lay, none, 3)
    with pytest.raises(ValueError, match="split must be in"):
        ivf_fastscan_kneighbors(lt, qt, coarse, probes, probes, visit, *lay, none, 3,
                                second_rows=probes, split=3)
    with pytest.raises(ValueError, match="k must be >= 0"):
        ivf_fastscan_kneighbors(lt, qt, coarse, probes, probes, visit, *lay, none, -1)
    with pytest.raises(ValueError, match="n_threads must be >= 1"):
        ivf_fastscan_kneighbors(lt, qt, coarse, probes, probes, visit, *lay, none, 3,
                                n_threads=0)
    with pytest.raises(ValueError, match="same subspaces"):
        ivf_fastscan_kneighbors(lt, qt[:, :1].copy(), coarse, probes, probes, visit, *lay,
                                none, 3)


# ---------------------------------------------------------------------- searcher

@pytest.fixture(scope="module")
def skewed():
    """Clustered data with one dominant direction (variance ~400x the others')."""
    X, _ = make_blobs(n_samples=6000, n_features=16, centers=40, cluster_std=2.0,
                      random_state=0)
    X[:, 0] *= 20
    Q = X[::97] + 0.3
    return X.astype(np.float32), Q.astype(np.float32)


def float_answers(search, *args, **kwargs):
    """The searcher's answers with its back-end switched to the float tables."""
    index = search._index
    index.set_fast_scan(False)
    try:
        return search.kneighbors(*args, **kwargs)
    finally:
        index.set_fast_scan(True)


def assert_searches_agree(search, X, **kwargs):
    fast = search.kneighbors(X, **kwargs)
    slow = float_answers(search, X, **kwargs)
    np.testing.assert_array_equal(fast[1], slow[1])
    np.testing.assert_array_equal(fast[0], slow[0])
    return fast


needs_shuffles = pytest.mark.skipif(fastscan_simd_path() == "portable",
                                    reason="fast-scan is chosen with byte shuffles only")


@needs_shuffles
@pytest.mark.parametrize("coarse, n_lists", [("flat", 24), ("multi-index", 36)])
@pytest.mark.parametrize("make", [lambda: ProductQuantizer(64, subspace_bits=4, random_state=0),
                                  lambda: OPQ(48, subspace_bits=4, n_iter=3, random_state=0)],
                         ids=["PQ", "OPQ"])
def test_searcher_uses_fast_scan_with_the_float_answers(skewed, coarse, n_lists, make):
    X, Q = skewed
    search = IVFQuantizedNeighbors(make(), n_lists=n_lists, coarse=coarse, n_probe=6,
                                   random_state=0, n_jobs=1).fit(X)
    assert search._index.fast_scan
    # Most cells are packed (the rest are scored with float lookups).
    packed = sum(np.diff(run.starts)[run.block_at >= 0].sum() for run in search._index.runs)
    assert packed > 0.8 * len(X)
    for n_probe in (1, 6, 30):
        for k in (1, 10, 100):
            for n_jobs in (1, 2):
                search.set_params(n_jobs=n_jobs)
                assert_searches_agree(search, Q, n_neighbors=k, n_probe=n_probe)
    for simd in PATHS:
        search._index.set_fast_scan(True, simd=simd)
        assert_searches_agree(search, Q, n_neighbors=10)
    search._index.set_fast_scan(True, simd=True)
    # Filters, the database as queries, removals.
    allowed = np.random.default_rng(0).random(len(X)) < 0.2
    assert_searches_agree(search, Q, allowed=allowed, n_probe=3)
    fast, slow = search.kneighbors(None, n_neighbors=5), float_answers(search, None, n_neighbors=5)
    np.testing.assert_array_equal(fast[1], slow[1])
    assert not np.any(fast[1] == np.arange(len(X))[:, None])
    search.remove(np.arange(0, len(X), 3))
    _, ind = assert_searches_agree(search, Q, n_neighbors=20)
    assert not np.any(ind % 3 == 0)


@needs_shuffles
def test_8bit_codes_keep_the_float_tables(skewed):
    X, _ = skewed
    search = IVFQuantizedNeighbors(ProductQuantizer(32, random_state=0), n_lists=8,
                                   random_state=0).fit(X)
    assert not search._index.fast_scan
    with pytest.raises(ValueError, match="fast-scan searches 4-bit codes"):
        search._index.set_fast_scan(True)
    with pytest.raises(ValueError, match="fast-scan searches 4-bit codes"):
        InvertedLists(8, 4, 256, fast_scan=True)
    with pytest.raises(ValueError, match="simd must be True, False"):
        InvertedLists(8, 4, 16, fast_scan=True, simd="sse9")
    with pytest.raises(ValueError, match="simd must be True, False"):
        InvertedLists(8, 4, 16).set_fast_scan(True, simd="neon")


@needs_shuffles
def test_growth_persistence_pickling_and_compaction(skewed, tmp_path):
    X, Q = skewed
    search = IVFQuantizedNeighbors(ProductQuantizer(32, subspace_bits=4, random_state=0),
                                   n_lists=16, n_probe=4, random_state=0, refine_factor=2,
                                   n_jobs=2).fit(X[:4000])
    search.add(X[4000:4003])  # a small run: its cells are scored with float lookups
    assert any(run.blocks is not None and (run.block_at < 0).all() for run in search._index.runs)
    expected = assert_searches_agree(search, Q, n_neighbors=10)
    search.save(tmp_path / "index")
    loaded = IVFQuantizedNeighbors.load(tmp_path / "index")
    assert loaded._index.fast_scan
    assert all(run.blocks is not None for run in loaded._index.runs)  # rebuilt on load
    assert not any("block" in f.name for f in (tmp_path / "index").rglob("*"))
    got = assert_searches_agree(loaded, Q, n_neighbors=10)
    np.testing.assert_array_equal(got[1], expected[1])
    # Add after load: only the new run is packed; the loaded runs keep their blocks.
    before = [run.blocks for run in loaded._index.runs]
    loaded.add(X[4003:])
    assert all(any(b is run.blocks for run in loaded._index.runs) for b in before)
    assert_searches_agree(loaded, Q, n_neighbors=10)
    assert_searches_agree(loaded, Q, n_neighbors=10, refine_factor=2)
    # Pickling drops the blocks; unpickling packs them again (never the search).
    clone = pickle.loads(pickle.dumps(loaded))
    assert all(run.blocks is not None for run in clone._index.runs)
    np.testing.assert_array_equal(clone.kneighbors(Q)[1], loaded.kneighbors(Q)[1])
    loaded.remove(np.arange(100))
    loaded.compact()
    assert loaded._index.fast_scan and loaded._index.runs[0].blocks is not None
    assert_searches_agree(loaded, Q, n_neighbors=10)


@needs_shuffles
def test_cells_with_blocks_are_searched_without_their_code_rows(skewed, tmp_path):
    """The code rows of cells kept in blocks are never read by a search (so a
    memory-mapped index needs only its blocks resident): overwriting them leaves
    every answer unchanged, while a cell without blocks still reads its rows."""
    X, Q = skewed
    search = IVFQuantizedNeighbors(ProductQuantizer(32, subspace_bits=4, random_state=0),
                                   n_lists=8, n_probe=3, n_neighbors=12,
                                   random_state=0).fit(X)
    expected = search.kneighbors(Q)
    search.save(tmp_path / "index")
    loaded = IVFQuantizedNeighbors.load(tmp_path / "index")  # sealed runs keep their rows
    runs = loaded._index.runs
    assert all(run.sealed and (run.block_at >= 0).all() for run in runs)  # all in blocks
    for run in runs:
        run._codes = 15 - run.codes  # every codeword index changed (a copy: the map is read-only)
    loaded._index._changed()
    got = loaded.kneighbors(Q)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[0], expected[0])
    # The check can fail: the float-table path reads the (now wrong) rows.
    assert not np.array_equal(float_answers(loaded, Q)[1], expected[1])


@needs_shuffles
@pytest.mark.parametrize("min_rows", [1, 96, 10**9])
def test_an_index_in_memory_keeps_code_rows_only_for_cells_without_blocks(min_rows,
                                                                          monkeypatch):
    """Fitted or grown in memory, a run keeps the rows of the cells left out of the
    blocks alone; the others are decoded from the blocks when asked (saving, merging,
    reconstructing), equal to the codes the quantizer gave."""
    monkeypatch.setattr(InvertedLists, "FAST_SCAN_MIN_ROWS", min_rows)
    X, _ = make_blobs(3000, n_features=16, centers=20, random_state=1)
    search = IVFQuantizedNeighbors(ProductQuantizer(32, subspace_bits=4, random_state=0),
                                   n_lists=16, n_probe=4, random_state=0).fit(X[:2000])
    for batch in np.array_split(X[2000:], 7):  # runs of several sizes, some merged
        search.add(batch)
    index = search._index
    assert len(index.runs) > 1
    for run in index.runs:
        left_out = np.repeat(run.block_at < 0, np.diff(run.starts))
        assert run._codes is None and run.loose.shape == (left_out.sum(), 8)
    residuals, cells = search._residuals(X, 1)
    truth = search.quantizer_.transform(residuals)
    codes, lists = index.rows(np.arange(len(X)))
    np.testing.assert_array_equal(codes, truth)
    np.testing.assert_array_equal(lists, cells)
    np.testing.assert_array_equal(search.codes_[np.argsort(search.ids_)], truth)
    assert_searches_agree(search, X[:50], n_neighbors=7)  # the float path: rows back
    index.set_fast_scan(False)
    assert all(run._codes is not None and run.blocks is None for run in index.runs)
    index.set_fast_scan(True)  # packed at once, rows dropped again
    assert all(run._codes is None and run.blocks is not None for run in index.runs)


@needs_shuffles
def test_threads_searching_an_unpickled_index_share_it_unchanged():
    """The search never packs nor drops anything: threads searching a freshly unpickled
    index at once read the same arrays (the first searches packed the runs, and one
    thread's packing freed rows whose addresses another's layout held)."""
    import threading

    X, _ = make_blobs(6000, n_features=16, centers=40, random_state=0)
    X = X.astype(np.float32)
    search = IVFQuantizedNeighbors(ProductQuantizer(32, subspace_bits=4, random_state=0),
                                   n_lists=64, n_probe=8, random_state=0,
                                   n_jobs=1).fit(X[:3000])
    for batch in np.array_split(X[3000:], 9):
        search.add(batch)
    Q = X[:200]
    expected = search.kneighbors(Q, 10)
    blob = pickle.dumps(search)
    clone = pickle.loads(blob)
    arrays = [(run._codes, run.loose, run.blocks) for run in clone._index.runs]
    assert all(blocks is not None for _, _, blocks in arrays)
    clone.kneighbors(Q[:3], 10)
    assert all(a[0] is b._codes and a[1] is b.loose and a[2] is b.blocks
               for a, b in zip(arrays, clone._index.runs))  # the search changed nothing
    for _ in range(20):
        clone = pickle.loads(blob)
        out = [None] * 4

        def run(j, clone=clone, out=out):
            out[j] = clone.kneighbors(Q, 10)

        threads = [threading.Thread(target=run, args=(j,)) for j in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for got in out:
            np.testing.assert_array_equal(got[1], expected[1])
            np.testing.assert_array_equal(got[0], expected[0])
