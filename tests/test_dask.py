"""DaskQuantizedNeighbors on a two-process LocalCluster: the answers of one process."""

import copy
import doctest
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")

from sklearn_hash import (
    ITQ,
    IVFQuantizedNeighbors,
    ProductQuantizer,
    QuantizedNeighbors,
)
from sklearn_hash.dask import DaskQuantizedNeighbors


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1,
                                       dashboard_address=":0")
    client = distributed.Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(6, 16)) * 3
    y = rng.integers(0, 6, size=3000)
    X = centers[y] + rng.normal(size=(3000, 16))
    yq = rng.integers(0, 6, size=40)
    Q = centers[yq] + rng.normal(size=(40, 16))
    return X, y, Q, yq


TEMPLATES = {
    "hamming": lambda: QuantizedNeighbors(ITQ(n_bits=16, random_state=0)),
    "adc": lambda: QuantizedNeighbors(ProductQuantizer(n_bits=16, random_state=0)),
    # 16 codewords: the fast-scan back-end where the processor has it
    "adc4": lambda: QuantizedNeighbors(ProductQuantizer(n_bits=16, subspace_bits=4,
                                                        random_state=0)),
    "ivf": lambda: IVFQuantizedNeighbors(ProductQuantizer(n_bits=16, random_state=0),
                                         n_lists=12, n_probe=2, random_state=0),
    # re-ranking: the shards keep rows (float32, or 8-bit residuals with their cells)
    "adc-refine": lambda: QuantizedNeighbors(ProductQuantizer(n_bits=16, random_state=0),
                                             refine_factor=3),
    "hamming-refine": lambda: QuantizedNeighbors(ITQ(n_bits=16, random_state=0),
                                                 refine_factor=2),
    "ivf4-sq8": lambda: IVFQuantizedNeighbors(
        ProductQuantizer(n_bits=16, subspace_bits=4, random_state=0), n_lists=12, n_probe=2,
        refine_factor=3, refine_storage="sq8", random_state=0),
}


def single_process(search, X, y):
    """One process, the quantizer fitted by the sharded index, all the items encoded here."""
    local = copy.deepcopy(search.searcher_)
    local.n_neighbors = search.n_neighbors
    local._start_index(y)
    local._append(X, y)
    return local


def assert_same(a, b):
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
    assert a[0].dtype == b[0].dtype


@pytest.mark.parametrize("kind", sorted(TEMPLATES))
def test_same_answers_as_one_process(client, data, kind):
    X, y, Q, yq = data
    # uneven row chunks; the sample (1,000 rows) is all the driver sees
    Xd = da.from_array(X, chunks=((700, 1100, 400, 800), (16,)))
    search = DaskQuantizedNeighbors(TEMPLATES[kind](), n_neighbors=7, max_train_samples=1000,
                                    client=client, random_state=0).fit(Xd, y)
    np.testing.assert_array_equal(search.shard_sizes_, [700, 1100, 400, 800])
    np.testing.assert_array_equal(search.shard_offsets_, [0, 700, 1800, 2200])
    assert search.n_samples_fit_ == 3000 and search.searcher_.n_samples_fit_ == 0
    local = single_process(search, X, y)
    expected = local.kneighbors(Q)
    got = search.kneighbors(Q)
    assert_same(got, expected)
    assert_same(search.to_local().kneighbors(Q), expected)
    assert search.score(Q, yq) == local.score(Q, yq)
    # More neighbours than some shard holds; per-call settings pass through.
    extra = {"n_probe": 5} if kind.startswith("ivf") else {}
    assert_same(search.kneighbors(Q, n_neighbors=450, **extra),
                local.kneighbors(Q, n_neighbors=450, **extra))
    # Queries as a dask array: dask arrays back, computed block by block.
    distances, indices = search.kneighbors(da.from_array(Q, chunks=(15, 16)))
    assert isinstance(indices, da.Array) and indices.chunks[0] == (15, 15, 10)
    assert_same((distances.compute(), indices.compute()), expected)
    if "refine" in kind or "sq8" in kind:  # per call: other factors, and none
        for refine in (None, 1, 7):
            assert_same(search.kneighbors(Q, refine_factor=refine, **extra),
                        local.kneighbors(Q, refine_factor=refine, **extra))
        distances, indices = search.kneighbors(da.from_array(Q, chunks=(15, 16)),
                                               refine_factor=7)
        assert_same((distances.compute(), indices.compute()), local.kneighbors(
            Q, refine_factor=7))
        # as many candidates as items: the re-ranking is the exact search of the rows
        assert_same(search.kneighbors(Q, n_neighbors=1000, refine_factor=3, **extra),
                    local.kneighbors(Q, n_neighbors=1000, refine_factor=3, **extra))


@pytest.mark.parametrize("kind", sorted(TEMPLATES))
def test_filtered_search_gives_the_answers_of_one_process(client, data, kind):
    X, y, Q, _ = data
    search = DaskQuantizedNeighbors(TEMPLATES[kind](), n_neighbors=7, client=client,
                                    random_state=0).fit(
        da.from_array(X, chunks=((700, 1100, 400, 800), (16,))), y)
    local = single_process(search, X, y)
    rng = np.random.default_rng(1)
    mask = rng.random(3000) < 0.05  # few allowed: IVF probes must count them globally
    mask[:700] = False              # a shard with nothing allowed
    extra = {"n_probe": 1} if kind.startswith("ivf") else {}
    for allowed in (mask, np.flatnonzero(mask)):
        assert_same(search.kneighbors(Q, allowed=allowed, **extra),
                    local.kneighbors(Q, allowed=allowed, **extra))
        distances, indices = search.kneighbors(da.from_array(Q, chunks=(15, 16)),
                                               allowed=allowed, **extra)
        assert_same((distances.compute(), indices.compute()),
                    local.kneighbors(Q, allowed=allowed, **extra))
    n_allowed = int(mask.sum())
    assert_same(search.kneighbors(Q, n_neighbors=n_allowed, allowed=mask, **extra),
                local.kneighbors(Q, n_neighbors=n_allowed, allowed=mask, **extra))
    d = local.kneighbors(Q, n_neighbors=40)[0]
    radius = float(np.median(d[:, 30]))
    got = search.radius_neighbors(Q, radius=radius, allowed=mask, **extra)
    expected = local.radius_neighbors(Q, radius=radius, allowed=mask, **extra)
    assert sum(len(i) for i in expected[1]) > 0
    for got_part, expected_part in zip(got, expected):
        for a, b in zip(got_part, expected_part):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="allowed selects no live item"):
        search.kneighbors(Q, allowed=np.zeros(3000, dtype=bool))
    with pytest.raises(ValueError, match=f"only {n_allowed} live items are allowed"):
        search.kneighbors(Q, n_neighbors=n_allowed + 1, allowed=mask)
    with pytest.raises(ValueError, match=r"boolean mask must have shape \(3000,\)"):
        search.kneighbors(Q, allowed=mask[:-1])
    with pytest.raises(ValueError, match=r"allowed indices must be in \[0, 2999\]"):
        search.radius_neighbors(Q, radius=radius, allowed=[3000])


def test_filters_on_the_multi_index_lazily_and_in_error(client, data):
    X, y, Q, _ = data
    template = IVFQuantizedNeighbors(ProductQuantizer(n_bits=16, random_state=0),
                                     coarse="multi-index", n_lists=16, n_probe=2,
                                     random_state=0)
    search = DaskQuantizedNeighbors(template, n_neighbors=7, client=client,
                                    random_state=0).fit(da.from_array(X, chunks=(1000, 16)), y)
    local = single_process(search, X, y)
    # only the items of every third non-empty cell: the multi-sequence walk passes over the
    # cells without allowed items, in the range search too
    cell = local._index.list_of.array
    nonempty = np.flatnonzero(np.bincount(cell, minlength=local._n_cells()))
    mask = np.isin(cell, nonempty[::3])
    for extra in ({}, {"n_probe": 1}):
        got = search.radius_neighbors(Q, radius=1e3, allowed=mask, **extra)
        expected = local.radius_neighbors(Q, radius=1e3, allowed=mask, **extra)
        for got_part, expected_part in zip(got, expected):
            for a, b in zip(got_part, expected_part):
                np.testing.assert_array_equal(a, b)
        assert_same(search.kneighbors(Q, allowed=mask, **extra),
                    local.kneighbors(Q, allowed=mask, **extra))
    # a lazy search reads the mask as it was when called
    lazy = search.kneighbors(da.from_array(Q, chunks=(15, 16)), allowed=mask)
    expected = local.kneighbors(Q, allowed=mask.copy())
    mask[:] = False
    assert_same((lazy[0].compute(), lazy[1].compute()), expected)
    # the single process's checks, in its order
    with pytest.raises(ValueError, match="only 3000 live items are allowed"):
        search.kneighbors(Q, n_neighbors=3001, allowed=np.ones(3000, dtype=bool))
    with pytest.raises(ValueError, match=r"boolean mask must have shape \(3000,\)"):
        search.kneighbors(Q, n_neighbors=3001, allowed=np.ones(5, dtype=bool))


@pytest.mark.parametrize("kind", ["hamming", "ivf4-sq8"])
def test_graphs_are_those_of_one_process(client, data, kind):
    X, y, Q, _ = data
    search = DaskQuantizedNeighbors(TEMPLATES[kind](), n_neighbors=6, client=client,
                                    random_state=0).fit(da.from_array(X, chunks=(1000, 16)), y)
    local = single_process(search, X, y)
    mask = np.random.default_rng(2).random(3000) < 0.5
    radius = float(np.median(local.kneighbors(Q, n_neighbors=20)[0][:, 15]))
    for mode in ("connectivity", "distance"):
        pairs = [(search.kneighbors_graph(da.from_array(Q, chunks=(15, 16)), mode=mode),
                  local.kneighbors_graph(Q, mode=mode)),
                 (search.kneighbors_graph(Q, 9, mode=mode, allowed=mask),
                  local.kneighbors_graph(Q, 9, mode=mode, allowed=mask)),
                 (search.radius_neighbors_graph(Q, radius, mode=mode, sort_results=True),
                  local.radius_neighbors_graph(Q, radius, mode=mode, sort_results=True))]
        for got, expected in pairs:
            assert got.shape == expected.shape == (len(Q), 3000) and got.nnz > len(Q)
            for attribute in ("indptr", "indices", "data"):
                np.testing.assert_array_equal(getattr(got, attribute),
                                              getattr(expected, attribute))
    with pytest.raises(ValueError, match="Unsupported mode"):
        search.kneighbors_graph(Q, mode="weights")


@pytest.mark.parametrize("kind", ["hamming", "adc4", "ivf", "ivf4-sq8"])
def test_removed_items_are_those_of_one_process(client, data, kind, tmp_path):
    X, y, Q, yq = data
    search = DaskQuantizedNeighbors(TEMPLATES[kind](), n_neighbors=7, client=client,
                                    random_state=0).fit(
        da.from_array(X, chunks=((700, 1100, 400, 800), (16,))), y)
    local = single_process(search, X, y)
    first_answer = search.kneighbors(Q)[1]
    rng = np.random.default_rng(3)
    gone = rng.permutation(3000)[:900]
    gone = np.concatenate([gone, np.arange(2200, 3000)])  # the last shard, whole
    gone = np.unique(gone)
    gone = gone[~np.isin(gone, first_answer[:5])][::-1]   # unsorted; some answers stay
    gone = np.concatenate([gone, first_answer[0, :3]])    # some answers go
    for part in (gone[:300], gone[300:]):                 # two calls
        assert search.remove(part) is search
        local.remove(part)
    assert search.n_removed_ == local.n_removed_ == len(gone)
    extra = {"n_probe": 1} if kind.startswith("ivf") else {}
    expected = local.kneighbors(Q, **extra)
    assert not np.isin(expected[1], gone).any()
    assert_same(search.kneighbors(Q, **extra), expected)
    mask = rng.random(3000) < 0.5
    assert_same(search.kneighbors(Q, allowed=mask, **extra),
                local.kneighbors(Q, allowed=mask, **extra))
    distances, indices = search.kneighbors(da.from_array(Q, chunks=(15, 16)), **extra)
    assert_same((distances.compute(), indices.compute()), expected)
    d = local.kneighbors(Q, n_neighbors=40)[0]
    for got_part, expected_part in zip(
            search.radius_neighbors(Q, radius=float(np.median(d[:, 30]))),
            local.radius_neighbors(Q, radius=float(np.median(d[:, 30])))):
        for a, b in zip(got_part, expected_part):
            np.testing.assert_array_equal(a, b)
    assert search.score(Q, yq) == local.score(Q, yq)
    n_live = 3000 - len(gone)
    assert_same(search.kneighbors(Q, n_neighbors=n_live), local.kneighbors(Q, n_neighbors=n_live))
    with pytest.raises(ValueError, match=f"only {n_live} live items remain"):
        search.kneighbors(Q, n_neighbors=n_live + 1)
    with pytest.raises(ValueError, match=f"item {gone[5]} was already removed"):
        search.remove([gone[5]])
    with pytest.raises(ValueError, match="indices must be distinct"):
        search.remove([1, 1])
    with pytest.raises(ValueError, match=r"indices must be in \[0, 2999\]"):
        search.remove([3000])
    assert search.n_removed_ == len(gone)  # the refused calls changed nothing
    gathered = search.to_local()
    assert gathered.n_removed_ == len(gone)
    assert_same(gathered.kneighbors(Q, **extra), expected)
    # saved and loaded with its removals; a removal after the save survives a reload
    search.save(tmp_path / "index")
    loaded = DaskQuantizedNeighbors.load(tmp_path / "index", client=client)
    assert loaded.n_removed_ == len(gone)
    assert_same(loaded.kneighbors(Q, **extra), expected)
    later = np.setdiff1d(np.arange(3000), gone)[:10]
    loaded.remove(later)
    local.remove(later)
    assert_same(loaded.kneighbors(Q, **extra), local.kneighbors(Q, **extra))
    # saved again onto its directory: only the removals are written, the codes stay
    segments = sorted(p.name for p in (tmp_path / "index").glob("shard-*/seg-*"))
    loaded.save(tmp_path / "index")
    assert sorted(p.name for p in (tmp_path / "index").glob("shard-*/seg-*")) == segments
    loaded.add(X[:100], y[:100])  # new shards, nothing removed there
    assert loaded.n_removed_ == len(gone) + 10


@pytest.mark.parametrize("kind", sorted(TEMPLATES))
def test_compact_renumbers_as_one_process(client, data, kind, tmp_path):
    X, y, Q, yq = data
    search = DaskQuantizedNeighbors(TEMPLATES[kind](), n_neighbors=7, client=client,
                                    random_state=0).fit(
        da.from_array(X, chunks=((700, 1100, 400, 800), (16,))), y)
    search.save(tmp_path / "index")
    local = single_process(search, X, y)
    rng = np.random.default_rng(4)
    gone = np.concatenate([rng.permutation(1800)[:600], np.arange(1800, 2200)])  # shard 2, whole
    search.remove(gone)
    local.remove(gone)
    sizes_before = search.shard_sizes_.copy()
    mapping = search.compact()
    np.testing.assert_array_equal(mapping, local.compact())
    assert search.n_removed_ == 0 and search.n_samples_fit_ == local.n_samples_fit_ == 2000
    # the emptied shard is dropped; the untouched last shard only moves down
    assert len(search.shards_) == 3
    np.testing.assert_array_equal(
        search.shard_sizes_,
        [700 - np.sum(gone < 700), 1100 - np.sum((gone >= 700) & (gone < 1800)), 800])
    assert sizes_before[3] == 800
    np.testing.assert_array_equal(search.shard_offsets_, [0, *np.cumsum(search.shard_sizes_)[:2]])
    extra = {"n_probe": 3} if kind.startswith("ivf") else {}
    expected = local.kneighbors(Q, **extra)
    assert_same(search.kneighbors(Q, **extra), expected)
    mask = rng.random(2000) < 0.5
    assert_same(search.kneighbors(Q, allowed=mask, **extra),
                local.kneighbors(Q, allowed=mask, **extra))
    d = local.kneighbors(Q, n_neighbors=30)[0]
    for a, b in zip(search.radius_neighbors(Q, radius=float(np.median(d[:, 20])), **extra),
                    local.radius_neighbors(Q, radius=float(np.median(d[:, 20])), **extra)):
        for got, want in zip(a, b):
            np.testing.assert_array_equal(got, want)
    assert search.score(Q, yq) == local.score(Q, yq)
    assert_same(search.to_local().kneighbors(Q, **extra), expected)
    assert search.compact().tolist() == list(range(2000))  # nothing left to compact
    # saved onto the directory of its earlier save: the compacted shards in full
    search.save(tmp_path / "index")
    assert sorted(p.name for p in (tmp_path / "index").glob("shard-*")) == [
        "shard-00000", "shard-00001", "shard-00002"]
    loaded = DaskQuantizedNeighbors.load(tmp_path / "index", client=client)
    assert_same(loaded.kneighbors(Q, **extra), expected)
    # removing everything leaves an empty index that can grow again
    loaded.remove(np.arange(2000))
    assert (loaded.compact() == -1).all()
    assert loaded.n_samples_fit_ == 0 and loaded.shard_sizes_.tolist() == [0]  # one kept
    with pytest.raises(ValueError, match="n_neighbors = 1, n_samples_fit = 0"):  # as one process
        loaded.kneighbors(Q, n_neighbors=1)
    assert all(len(i) == 0 for i in loaded.radius_neighbors(Q, radius=1e9, **extra)[1])
    empty = loaded.to_local()  # labels of the right dtype, none of them
    assert empty.n_samples_fit_ == 0 and empty._fit_y.dtype == y.dtype
    loaded.add(X[:300], y[:300])
    assert_same(loaded.kneighbors(Q, **extra),
                single_process(loaded, X[:300], y[:300]).kneighbors(Q, **extra))


@pytest.mark.parametrize("kind", sorted(TEMPLATES))
def test_a_compacted_copy_leaves_its_shard_unchanged(data, kind):
    # Dask may hold the shard still, or build the copy again from it: compacting the
    # copy must not write into what the two share (codes, blocks, rows, labels, counts).
    from sklearn_hash.dask._sharded import _shard_compacted, _shard_with_removed

    X, y, Q, yq = data
    shard = TEMPLATES[kind]().fit(X[:1000], y[:1000])
    shard = _shard_with_removed(shard, np.arange(0, 1000, 3))
    extra = {"n_probe": 3} if kind.startswith("ivf") else {}
    before = (shard.kneighbors(Q, **extra), shard.score(Q, yq), shard._fit_y.copy())
    for _ in range(2):
        copy_ = _shard_compacted(shard)
        assert copy_.n_samples_fit_ == 666 and copy_.n_removed_ == 0
        assert shard.n_samples_fit_ == 1000 and shard.n_removed_ == 334
        assert_same(shard.kneighbors(Q, **extra), before[0])
        assert shard.score(Q, yq) == before[1]
        np.testing.assert_array_equal(shard._fit_y, before[2])
    expected = copy.deepcopy(shard)
    expected.compact()
    assert_same(copy_.kneighbors(Q, **extra), expected.kneighbors(Q, **extra))


def test_ivf_probes_with_the_cell_sizes_of_the_whole_index(client, data):
    # Tiny shards: alone, a shard's probed cells hold fewer than k items and
    # it would top its probes up differently from one process.
    X, _, Q, _ = data
    search = DaskQuantizedNeighbors(TEMPLATES["ivf"](), n_neighbors=20, client=client,
                                    random_state=0).fit(da.from_array(X, chunks=(150, 16)))
    assert len(search.shards_) == 20
    local = single_process(search, X, None)
    for n_probe in (1, 3):
        assert_same(search.kneighbors(Q, n_probe=n_probe), local.kneighbors(Q, n_probe=n_probe))
    # re-ranked: each worker scores the candidates of its ten shards
    search = DaskQuantizedNeighbors(TEMPLATES["ivf4-sq8"](), n_neighbors=20, client=client,
                                    random_state=0).fit(da.from_array(X, chunks=(150, 16)))
    local = single_process(search, X, None)
    for n_probe in (1, 3):
        assert_same(search.kneighbors(Q, n_probe=n_probe), local.kneighbors(Q, n_probe=n_probe))


def test_numpy_input_and_add(client, data):
    X, y, Q, yq = data
    search = DaskQuantizedNeighbors(TEMPLATES["adc"](), n_neighbors=5, client=client,
                                    random_state=0).fit(X[:1000], y[:1000])
    assert len(search.shards_) >= 2  # a numpy array is cut at least once per worker
    search.add(da.from_array(X[1000:2200], chunks=(600, 16)), y[1000:2200])
    search.add(X[2200:], y[2200:])
    assert search.n_samples_fit_ == 3000
    assert search.shard_offsets_[-1] + search.shard_sizes_[-1] == 3000
    local = single_process(search, X, y)
    assert_same(search.kneighbors(Q), local.kneighbors(Q))
    assert search.score(Q, yq) == local.score(Q, yq)
    # labels: given iff given to fit
    with pytest.raises(ValueError, match="fitted with labels"):
        search.add(X[:10])


def _holders(search, client):
    who = client.who_has(search.shards_)
    return [tuple(who.get(f.key) or ()) for f in search.shards_]


def test_shards_balanced_and_searched_where_they_are(client, data):
    X, _, Q, _ = data
    search = DaskQuantizedNeighbors(TEMPLATES["hamming"](), n_neighbors=5, client=client,
                                    random_state=0).fit(da.from_array(X, chunks=(250, 16)))
    # Dask weighs a shard by its buffers (codes and quantizer), not ~50 bytes.
    from dask.sizeof import sizeof

    local = single_process(search, X, None)
    assert sizeof(local) >= local._index.codes.to_array().nbytes
    # 12 shards of 250 items: 6 on each worker, whatever the scheduler chose.
    holders = _holders(search, client)
    assert all(len(h) == 1 for h in holders)
    workers = sorted(client.nthreads())
    assert [sum(h == (w,) for h in holders) for w in workers] == [6, 6]
    # Queries far heavier than the shards: each worker still searches its own
    # shards (before, the scheduler ran every search beside the queries and
    # copied all the shards onto that worker).
    many = np.repeat(Q, 60, axis=0)
    for _ in range(3):
        assert_same(search.kneighbors(many), local.kneighbors(many))
    assert _holders(search, client) == holders
    # Added shards join the balance (items per thread).
    search.add(da.from_array(X[:1000], chunks=(500, 16)))
    holders = _holders(search, client)
    assert all(len(h) == 1 for h in holders)
    items = [sum(n for h, n in zip(holders, search.shard_sizes_) if h == (w,)) for w in workers]
    assert sorted(items) == [2000, 2000]
    # A worker's kernels run on its threads (1 here), not on every core.
    from sklearn_hash.dask._sharded import _worker_threads

    assert client.gather([client.submit(_worker_threads, workers=[w], pure=False)
                          for w in workers]) == [1, 1]


def test_shards_move_to_a_worker_that_holds_none(data):
    # A worker that joins (or is restarted after a loss) holds no shard; balancing
    # onto it failed with a KeyError.
    X, _, Q, _ = data
    with distributed.LocalCluster(processes=False, n_workers=1, threads_per_worker=1,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client:
        search = DaskQuantizedNeighbors(TEMPLATES["hamming"](), n_neighbors=5, client=client,
                                        random_state=0).fit(da.from_array(X, chunks=(750, 16)))
        cluster.scale(2)
        client.wait_for_workers(2)
        search.remove([0])
        search.compact()  # balances the shards, as fit, add and load do
        holders = _holders(search, client)
        assert sorted(set(holders)) == [(w,) for w in sorted(client.nthreads())]
        local = single_process(search, X[1:], None)
        assert_same(search.kneighbors(Q), local.kneighbors(Q))


def test_save_load_round_trip(client, data, tmp_path):
    X, y, Q, yq = data
    search = DaskQuantizedNeighbors(TEMPLATES["ivf"](), n_neighbors=6, client=client,
                                    random_state=0).fit(da.from_array(X, chunks=(1000, 16)), y)
    expected = search.kneighbors(Q, n_probe=3)
    search.save(tmp_path / "index")
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == [
        "dask_index.json", "shard-00000", "shard-00001", "shard-00002", "template"]
    # Each shard directory is a single-process index.
    shard = IVFQuantizedNeighbors.load(tmp_path / "index" / "shard-00001")
    assert shard.n_samples_fit_ == 1000
    loaded = DaskQuantizedNeighbors.load(tmp_path / "index", client=client)
    assert loaded.n_neighbors == 6 and loaded.n_samples_fit_ == 3000
    assert_same(loaded.kneighbors(Q, n_probe=3), expected)
    assert loaded.score(Q, yq) == search.score(Q, yq)
    # grow the loaded index and save it onto its own directory
    loaded.add(X[:500], y[:500])
    loaded.save(tmp_path / "index")
    again = DaskQuantizedNeighbors.load(tmp_path / "index", client=client)
    assert again.n_samples_fit_ == 3500
    assert_same(again.kneighbors(Q), loaded.kneighbors(Q))
    with pytest.raises(ValueError, match="not an index written by"):
        DaskQuantizedNeighbors.load(tmp_path / "missing", client=client)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to write"):
        search.save(tmp_path / "other")


def test_a_save_that_fails_part_way_records_the_copies_it_wrote(client, data, tmp_path):
    X, _, Q, _ = data
    search = DaskQuantizedNeighbors(TEMPLATES["hamming"](), n_neighbors=5, client=client,
                                    random_state=0).fit(da.from_array(X, chunks=(1500, 16)))
    search.save(tmp_path / "index")
    search.remove([10, 2000])  # one in each shard
    (tmp_path / "index" / "shard-00001" / "index.json").unlink()
    (tmp_path / "index" / "shard-00001" / "notes.txt").write_text("not an index any more")
    with pytest.raises(ValueError, match="refusing to write into it"):
        search.save(tmp_path / "index")
    # Shard 0 was saved over its copy, with its removal: a lost worker would reload
    # that copy (the one with the new uuid) and re-apply nothing; shard 1 kept neither.
    on_disk = QuantizedNeighbors.load(tmp_path / "index" / "shard-00000")
    assert on_disk.n_removed_ == 1
    assert search._saved_uuids[0] == on_disk._saved["uuid"]
    assert search._pending_removals[0] == []
    np.testing.assert_array_equal(search._pending_removals[1], [[500]])
    assert_same(search.kneighbors(Q),  # the index itself is unchanged
                single_process(search, X, None).remove([10, 2000]).kneighbors(Q))


def test_re_ranking_rows_are_saved_moved_and_gathered(client, data, tmp_path):
    X, y, Q, _ = data
    search = DaskQuantizedNeighbors(TEMPLATES["ivf4-sq8"](), n_neighbors=6, client=client,
                                    random_state=0).fit(X, y)  # numpy: shards balanced
    expected = single_process(search, X, y).kneighbors(Q)
    assert_same(search.kneighbors(Q), expected)
    assert_same(search.to_local().kneighbors(Q), expected)  # the rows gathered too
    search.save(tmp_path / "index")
    shard = IVFQuantizedNeighbors.load(tmp_path / "index" / "shard-00000")
    assert shard._vectors is not None and len(shard._vectors) == shard.n_samples_fit_
    loaded = DaskQuantizedNeighbors.load(tmp_path / "index", client=client, mmap_mode="r")
    assert_same(loaded.kneighbors(Q), expected)
    loaded.add(X[:300], y[:300])  # new shards keep rows too
    grown = single_process(loaded, np.vstack([X, X[:300]]), np.concatenate([y, y[:300]]))
    assert_same(loaded.kneighbors(Q, n_probe=4), grown.kneighbors(Q, n_probe=4))


def _shards_on(search, client, worker):
    who = client.who_has(search.shards_)
    return [i for i, f in enumerate(search.shards_) if worker in (who.get(f.key) or ())]


def test_killed_worker_during_a_search(client, data, tmp_path):
    X, _, Q, _ = data
    template = TEMPLATES["hamming"]()
    # Rebuilt by Dask from its graph (the chunks of a dask array).
    from_graph = DaskQuantizedNeighbors(template, n_neighbors=5, client=client,
                                        random_state=0).fit(da.from_array(X, chunks=(500, 16)))
    # Numpy chunks scattered to the workers: nothing to rebuild a lost shard from ...
    scattered = DaskQuantizedNeighbors(template, n_neighbors=5, client=client,
                                       random_state=0).fit(X)
    # ... unless it was saved.
    saved = DaskQuantizedNeighbors(template, n_neighbors=5, client=client,
                                   random_state=0).fit(X)
    saved.save(tmp_path / "saved")
    # Items removed since: a rebuilt or reloaded shard must have them removed too.
    gone = np.arange(0, 3000, 7)
    from_graph.remove(gone)
    saved.remove(gone)
    expected = single_process(from_graph, X, None).remove(gone).kneighbors(Q)
    expected_np = single_process(scattered, X, None).remove(gone).kneighbors(Q)
    compacted = single_process(scattered, X, None)
    compacted.remove(gone)
    compacted.compact()
    # Saved, then: a remove or a compact called right after the loss (no search first).
    removing = DaskQuantizedNeighbors(template, n_neighbors=5, client=client,
                                      random_state=0).fit(X)
    removing.save(tmp_path / "removing")
    compacting = DaskQuantizedNeighbors(template, n_neighbors=5, client=client,
                                        random_state=0).fit(X)
    compacting.save(tmp_path / "compacting")
    compacting.remove(gone)
    # Saved, then saved over by another index (its own load, with other removals):
    # that copy is no longer this index's.
    shared = DaskQuantizedNeighbors(template, n_neighbors=5, client=client,
                                    random_state=0).fit(X)
    shared.save(tmp_path / "shared")
    stale = DaskQuantizedNeighbors.load(tmp_path / "shared", client=client)  # Dask reloads it
    other = DaskQuantizedNeighbors.load(tmp_path / "shared", client=client)
    other.remove(np.arange(0, 3000, 2))
    other.save(tmp_path / "shared")
    # Loaded, then saved onto its own directory: Dask's own reload of its shards (the
    # load's task) now meets a newer copy and fails; every call recovers from that copy.
    DaskQuantizedNeighbors(template, n_neighbors=5, client=client,
                           random_state=0).fit(X).save(tmp_path / "own")
    own = DaskQuantizedNeighbors.load(tmp_path / "own", client=client)
    own.save(tmp_path / "own")
    plain = single_process(scattered, X, None).kneighbors(Q)

    pids = client.run(os.getpid)
    victim = min(pids)
    lost_scattered = _shards_on(scattered, client, victim)
    assert lost_scattered and _shards_on(from_graph, client, victim)
    for search in (removing, compacting, shared, stale, own):
        assert _shards_on(search, client, victim)

    # Kill the worker while it searches (a long batch of queries).
    many = np.repeat(Q, 300, axis=0)
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=from_graph.kneighbors(many)))
    thread.start()
    deadline = time.monotonic() + 20
    while not any(client.processing().values()) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(pids[victim], signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive()
    assert_same(result["r"], tuple(np.repeat(part, 300, axis=0) for part in expected))

    assert_same(from_graph.kneighbors(Q), expected)
    assert_same(saved.kneighbors(Q), expected_np)  # reloaded from its saved copy
    with pytest.raises(RuntimeError, match=r"lost shard\(s\) .*no saved copy") as info:
        scattered.kneighbors(Q)
    for i in lost_scattered:
        assert f"{i} (items {scattered.shard_offsets_[i]}.." in str(info.value)
    removing.remove(gone)  # it failed with Dask's error before it recovered the shards
    assert_same(removing.kneighbors(Q), expected_np)
    keep = ~np.isin(np.arange(3000), gone)
    np.testing.assert_array_equal(compacting.compact(), np.where(keep, np.cumsum(keep) - 1, -1))
    assert_same(compacting.kneighbors(Q), compacted.kneighbors(Q))
    with pytest.raises(RuntimeError, match=r"reloading them .*failed: .*no longer holds the "
                                           r"copy of the shard this index saved"):
        shared.kneighbors(Q)  # it used to answer with the other index's removals
    with pytest.raises(RuntimeError, match="no longer holds the copy of the shard this index"):
        stale.kneighbors(Q)
    assert_same(own.to_local().kneighbors(Q), plain)  # to_local failed there


def test_bad_input(client, data):
    X, y, Q, _ = data
    search = DaskQuantizedNeighbors(TEMPLATES["hamming"](), n_neighbors=5, client=client,
                                    random_state=0)
    with pytest.raises(ValueError, match=r"chunked by rows only .* X.rechunk\(\{1: -1\}\)"):
        search.fit(da.from_array(X, chunks=(1000, 8)))
    search.fit(da.from_array(X[:40], chunks=(20, 16)))
    with pytest.raises(ValueError, match="X has 15 features, but DaskQuantizedNeighbors is "
                                         "expecting 16 features as input"):
        search.kneighbors(Q[:, :15])
    with pytest.raises(ValueError, match="X has 15 features"):
        search.kneighbors(da.from_array(Q[:, :15]))
    with pytest.raises(ValueError, match="X has 15 features"):
        search.add(X[:10, :15])
    with pytest.raises(ValueError, match="chunked by rows only"):
        search.kneighbors(da.from_array(Q, chunks=(20, 8)))
    with pytest.raises(ValueError, match=r"Expected n_neighbors <= n_samples_fit, but "
                                         r"n_neighbors = 41, n_samples_fit = 40"):
        search.kneighbors(Q, n_neighbors=41)
    with pytest.raises(ValueError, match="Expected n_neighbors > 0"):
        search.kneighbors(Q, n_neighbors=0)
    for queries in (Q[:, :15], da.from_array(Q[:, :15])):  # checked first, as in one process
        with pytest.raises(ValueError, match="Expected n_neighbors > 0"):
            search.kneighbors(queries, n_neighbors=0)
        with pytest.raises(TypeError, match="n_neighbors does not take"):
            search.kneighbors(queries, n_neighbors=2.0)
    with pytest.raises(ValueError, match="Expected n_neighbors > 0"):
        single_process(search, X[:40], None).kneighbors(Q[:, :15], n_neighbors=0)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        DaskQuantizedNeighbors(client=client).fit(X[:100], y[:99])
    with pytest.raises(ValueError, match="score needs the labels"):
        search.score(Q, np.zeros(len(Q)))
    with pytest.raises(TypeError, match="unexpected keyword argument 'n_probe'"):
        search.kneighbors(Q, n_probe=2)
    with pytest.raises(ValueError, match="searcher"):
        DaskQuantizedNeighbors(ITQ(), client=client).fit(X)
    # re-ranking needs the rows, kept only by a template fitted with refine_factor
    with pytest.raises(ValueError, match="keeps none: fit it with refine_factor set"):
        search.kneighbors(Q, refine_factor=2)
    with pytest.raises(ValueError, match="refine_factor"):
        search.kneighbors(da.from_array(Q, chunks=(20, 16)), refine_factor=2)
    with pytest.raises(ValueError, match="Hamming ball"):
        search.radius_neighbors(Q, radius=3, refine_factor=2)
    with pytest.raises(ValueError, match="refine_factor"):
        search.kneighbors(Q, refine_factor=0)


def test_import_is_lazy_and_names_the_extra():
    code = ("import sys, sklearn_hash\n"
            "assert 'dask' not in sys.modules and 'distributed' not in sys.modules\n"
            "sys.modules['dask'] = None\n"
            "try:\n    import sklearn_hash.dask\nexcept ImportError as e:\n"
            "    assert 'sklearn-hash[dask]' in str(e), e\nelse:\n    raise SystemExit(1)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_docstring_example():
    from sklearn_hash.dask import _sharded

    result = doctest.testmod(_sharded, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("kind", sorted(TEMPLATES))
def test_radius_search_gives_the_balls_of_one_process(client, data, kind):
    X, y, Q, _ = data
    search = DaskQuantizedNeighbors(TEMPLATES[kind](), client=client, random_state=0).fit(
        da.from_array(X, chunks=((700, 1100, 400, 800), (16,))), y)
    local = single_process(search, X, y)
    d = local.kneighbors(Q, n_neighbors=40)[0]
    extra = {"n_probe": 5} if kind.startswith("ivf") else {}
    for radius in (float(np.median(d[:, 30])), float(d[0, 3]), 0.0):
        for sort_results in (False, True):
            got = search.radius_neighbors(Q, radius=radius, sort_results=sort_results, **extra)
            expected = local.radius_neighbors(Q, radius=radius, sort_results=sort_results,
                                              **extra)
            assert sum(len(i) for i in got[1]) == sum(len(i) for i in expected[1])
            assert radius != np.median(d[:, 30]) or sum(len(i) for i in got[1]) > len(Q)
            for got_part, expected_part in zip(got, expected):
                for a, b in zip(got_part, expected_part):
                    np.testing.assert_array_equal(a, b)
                    assert a.dtype == b.dtype
    indices = search.radius_neighbors(da.from_array(Q, chunks=(15, 16)), radius=float(d[0, 3]),
                                      return_distance=False)
    for a, b in zip(indices, local.radius_neighbors(Q, radius=float(d[0, 3]),
                                                    return_distance=False)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="radius must be a finite number"):
        search.radius_neighbors(Q, radius=-1.0)
