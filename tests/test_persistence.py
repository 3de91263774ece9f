"""Persistence and growth: pickling, saved indices, adding items, threads, big indices."""

import io
import os
import pickle
from concurrent.futures import ThreadPoolExecutor

import joblib
import numpy as np
import pytest
from sklearn.base import BaseEstimator, clone
from sklearn.frozen import FrozenEstimator
from sklearn_hash._kernels._adc import adc_kneighbors

from sklearn_hash import (
    AGH,
    ITQ,
    DeepQuantizationNetwork,
    IVFQuantizedNeighbors,
    ProductQuantizer,
    QuantizedNeighbors,
    SpectralHashing,
    _index,
)
from sklearn_hash._backends import FastScan
from sklearn_hash._dqn import _torch_available

QUANTIZERS = [
    SpectralHashing(n_bits=16),
    ITQ(n_bits=16, random_state=0),
    AGH(n_bits=16, n_anchors=50, random_state=0),
    AGH(n_bits=16, n_anchors=50, n_layers=2, random_state=0),
    ProductQuantizer(n_bits=16, subspace_bits=4, random_state=0),
]
if _torch_available():
    QUANTIZERS.append(DeepQuantizationNetwork(n_bits=16, subspace_bits=4, embedding_dim=8,
                                              max_epochs=3, random_state=0))

SEARCHERS = [
    QuantizedNeighbors(ITQ(n_bits=24, random_state=0), n_neighbors=5),
    QuantizedNeighbors(ProductQuantizer(n_bits=16, subspace_bits=4, random_state=0), n_neighbors=5),
    QuantizedNeighbors(ProductQuantizer(n_bits=16, subspace_bits=4, random_state=0),
                       n_neighbors=5, metric="sdc"),
]
# With the non-exhaustive searcher (its add is tested in test_ivf.py).
ALL_SEARCHERS = SEARCHERS + [
    IVFQuantizedNeighbors(ProductQuantizer(n_bits=16, subspace_bits=4, random_state=0),
                          n_lists=8, n_probe=2, n_neighbors=5, random_state=0),
    IVFQuantizedNeighbors(ProductQuantizer(n_bits=16, subspace_bits=4, random_state=0),
                          coarse="multi-index", n_lists=16, n_probe=2, n_neighbors=5,
                          random_state=0),
]


@pytest.fixture(scope="module")
def data(digits_split):
    return digits_split


def roundtrips(estimator):
    yield pickle.loads(pickle.dumps(estimator))
    buffer = io.BytesIO()
    joblib.dump(estimator, buffer)
    buffer.seek(0)
    yield joblib.load(buffer)


@pytest.mark.parametrize("quantizer", QUANTIZERS, ids=repr)
def test_fitted_quantizers_roundtrip(quantizer, data):
    X_db, y_db, X_q, _ = data
    fitted = clone(quantizer).fit(X_db, y_db)
    expected = fitted.transform(X_q)
    for copy_ in roundtrips(fitted):
        np.testing.assert_array_equal(copy_.transform(X_q), expected)


@pytest.mark.parametrize("searcher", ALL_SEARCHERS, ids=repr)
def test_fitted_searchers_roundtrip(searcher, data):
    X_db, y_db, X_q, y_q = data
    fitted = clone(searcher).fit(X_db, y_db)
    dist, ind = fitted.kneighbors(X_q)
    for copy_ in roundtrips(fitted):
        d2, i2 = copy_.kneighbors(X_q)
        np.testing.assert_array_equal(i2, ind)
        np.testing.assert_array_equal(d2, dist)
        assert copy_.score(X_q, y_q) == fitted.score(X_q, y_q)


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("searcher", ALL_SEARCHERS, ids=repr)
@pytest.mark.parametrize("mmap_mode", ["r", None])
def test_save_and_load_a_directory(searcher, mmap_mode, data, tmp_path):
    X_db, y_db, X_q, y_q = data
    fitted = clone(searcher).fit(X_db, y_db)
    fitted.save(tmp_path / "index")
    names = sorted(p.name.split("-")[0] for p in (tmp_path / "index").iterdir())
    assert names == ["index.json", "seg", "state"]  # no pickle
    loaded = type(fitted).load(tmp_path / "index", mmap_mode=mmap_mode)
    index = loaded._index

    def mapped(array):
        while array is not None and not isinstance(array, np.memmap):
            array = array.base if isinstance(array, np.ndarray) else None
        return array is not None

    if isinstance(index, FastScan):  # its codes are kept once, packed into blocks in memory
        chunks = []
        blocks, sizes = index._blocks_and_sizes()
        assert sum(sizes) == len(X_db) and not any(mapped(b) for b in blocks)
    else:
        chunks = ([run.codes for run in index.runs]
                  if isinstance(fitted, IVFQuantizedNeighbors) else index.codes.chunks())
    for array in chunks:
        assert mapped(array) == (mmap_mode is not None)
        if mmap_mode == "r":
            assert not array.flags.writeable
    with pytest.raises(ValueError, match="holds a"):
        (QuantizedNeighbors if isinstance(fitted, IVFQuantizedNeighbors)
         else IVFQuantizedNeighbors).load(tmp_path / "index")
    for X in (X_q, None):  # float queries, and the database querying itself
        np.testing.assert_array_equal(loaded.kneighbors(X)[1], fitted.kneighbors(X)[1])
        np.testing.assert_array_equal(loaded.kneighbors(X)[0], fitted.kneighbors(X)[0])
    assert loaded.score(X_q, y_q) == fitted.score(X_q, y_q)


def test_save_without_labels_and_refusals(data, tmp_path):
    X_db, _, X_q, _ = data
    fitted = QuantizedNeighbors(ITQ(n_bits=16, random_state=0)).fit(X_db)
    loaded = QuantizedNeighbors.load(fitted.save(tmp_path / "a"))
    assert loaded._fit_y is None
    np.testing.assert_array_equal(loaded.kneighbors(X_q)[1], fitted.kneighbors(X_q)[1])
    with pytest.raises(ValueError, match="index.json not found"):
        QuantizedNeighbors.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="mmap_mode must be"):
        QuantizedNeighbors.load(tmp_path / "a", mmap_mode="w+")
    (segment,) = (tmp_path / "a").glob("seg-*")
    np.save(segment / "codes.npy", fitted.codes_[:-1])  # one row short
    with pytest.raises(ValueError, match="the manifest expects"):
        QuantizedNeighbors.load(tmp_path / "a")
    objects = QuantizedNeighbors(ITQ(n_bits=8)).fit(X_db, np.array(["a"] * len(X_db), dtype=object))
    with pytest.raises(ValueError, match="dtype object"):
        objects.save(tmp_path / "b")



@pytest.mark.skipif(not _torch_available(), reason="DeepQuantizationNetwork needs torch")
def test_an_index_saved_before_a_parameter_existed_loads_with_its_old_value(data, tmp_path):
    """A DQN saved before leaf_weight & co. existed was trained without them: get_params says so."""
    import json

    X_db, y_db, X_q, _ = data
    dqn = DeepQuantizationNetwork(n_bits=16, subspace_bits=4, embedding_dim=8, max_epochs=3,
                                  random_state=0)
    fitted = QuantizedNeighbors(dqn, n_neighbors=5).fit(X_db, y_db)
    path = fitted.save(tmp_path / "a")
    manifest = json.loads((path / "index.json").read_text())

    def dqn_params(node):  # every saved DQN's parameters (the quantizer and quantizer_)
        if isinstance(node, dict):
            if node.get("class") == "DeepQuantizationNetwork":
                yield node["params"]
            for child in node.values():
                yield from dqn_params(child)

    saved = list(dqn_params(manifest))
    assert len(saved) == 2
    # As it loads now: the saved values, not the class's old ones.
    assert QuantizedNeighbors.load(path).quantizer_.get_params()["leaf_weight"] == 0.1
    for params in saved:
        assert set(DeepQuantizationNetwork._PARAMS_ADDED) <= set(params)
        for name in DeepQuantizationNetwork._PARAMS_ADDED:
            del params[name]
    (path / "index.json").write_text(json.dumps(manifest))
    loaded = QuantizedNeighbors.load(path)
    got = loaded.quantizer_.get_params()
    assert got["codebook_momentum"] is None
    assert got["ancestor_weight"] == got["leaf_weight"] == got["entropy_weight"] == 0.0
    assert got["quantization_weight"] == dqn.quantization_weight  # saved: kept
    np.testing.assert_array_equal(loaded.kneighbors(X_q)[1], fitted.kneighbors(X_q)[1])

def test_a_manifest_with_invalid_parameters_is_refused(data, tmp_path):
    # n_neighbors=-5 written into index.json loaded, then failed in numpy
    import json

    X_db, y_db, X_q, _ = data
    path = QuantizedNeighbors(ProductQuantizer(32, subspace_bits=4, random_state=0),
                              n_neighbors=5).fit(X_db, y_db).save(tmp_path / "a")
    manifest = json.loads((path / "index.json").read_text())
    manifest["estimator"]["value"]["params"]["n_neighbors"] = -5
    (path / "index.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="saved parameters of QuantizedNeighbors are invalid.*"
                                         "n_neighbors"):
        QuantizedNeighbors.load(path)


# ---------------------------------------------------------------- growth


@pytest.mark.parametrize("searcher", SEARCHERS, ids=repr)
def test_add_equals_indexing_everything_at_once(searcher, data, tmp_path):
    X_db, y_db, X_q, y_q = data
    half = len(X_db) // 2
    grown = clone(searcher).fit(X_db[:half], y_db[:half])
    before = grown.kneighbors(X_q)[1]
    grown.add(X_db[half:], y_db[half:])
    assert grown.n_samples_fit_ == len(X_db)
    # The same quantizer, indexing all rows in one go.
    whole = clone(searcher).set_params(quantizer=FrozenEstimator(grown.quantizer_))
    whole.fit(X_db, y_db)
    np.testing.assert_array_equal(grown.codes_, whole.codes_)
    np.testing.assert_array_equal(grown.kneighbors(X_q)[1], whole.kneighbors(X_q)[1])
    assert grown.score(X_q, y_q) == whole.score(X_q, y_q)
    # Old items keep their indices: every old neighbour that is still closer
    # than the new items is found at the same index.
    after = grown.kneighbors(X_q, n_neighbors=len(X_db))[1]
    old_order = after[after < half].reshape(len(X_q), half)
    np.testing.assert_array_equal(old_order[:, :5], before)
    # A loaded, memory-mapped index grows in memory.
    loaded = QuantizedNeighbors.load(clone(searcher).fit(X_db[:half], y_db[:half]).save(tmp_path))
    loaded.add(X_db[half:], y_db[half:])
    np.testing.assert_array_equal(loaded.codes_, whole.codes_)


def test_partial_fit_fits_then_adds(data):
    X_db, y_db, X_q, _ = data
    search = QuantizedNeighbors(ITQ(n_bits=16, random_state=0), n_neighbors=3)
    search.partial_fit(X_db[:800], y_db[:800]).partial_fit(X_db[800:], y_db[800:])
    reference = QuantizedNeighbors(FrozenEstimator(search.quantizer_), n_neighbors=3)
    np.testing.assert_array_equal(search.kneighbors(X_q)[1],
                                  reference.fit(X_db, y_db).kneighbors(X_q)[1])


def test_add_refusals(data):
    X_db, y_db, _, _ = data
    labelled = QuantizedNeighbors(ITQ(n_bits=8)).fit(X_db, y_db)
    with pytest.raises(ValueError, match="fitted with labels: add items with y"):
        labelled.add(X_db[:3])
    with pytest.raises(ValueError, match=r"shape of the index's labels, \(n_samples,\)"):
        labelled.add(X_db[:3], np.zeros((3, 2)))
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        labelled.add(X_db[:3], y_db[:2])
    with pytest.raises(ValueError, match="X has 3 features"):
        labelled.add(X_db[:3, :3], y_db[:3])
    unlabelled = QuantizedNeighbors(ITQ(n_bits=8)).fit(X_db)
    with pytest.raises(ValueError, match="fitted without labels: add items without y"):
        unlabelled.add(X_db[:3], y_db[:3])


def test_chunked_encoding_matches_one_pass(data, monkeypatch):
    X_db, y_db, X_q, _ = data
    pq = ProductQuantizer(n_bits=16, subspace_bits=4, random_state=0)
    whole = QuantizedNeighbors(pq).fit(X_db, y_db)
    monkeypatch.setattr(_index, "ENCODE_CHUNK", 7)
    chunked = QuantizedNeighbors(pq).fit(X_db, y_db)
    np.testing.assert_array_equal(chunked.codes_, whole.codes_)
    assert chunked.codes_.dtype == np.uint8 and chunked.codes_.flags.c_contiguous


def test_codes_are_uint16_when_the_tables_have_more_than_256_codewords(monkeypatch):
    class Growing(BaseEstimator):
        def fit(self, X, y=None):
            return self

        def transform(self, X):  # codeword index = 300 * first feature
            return (np.asarray(X)[:, :2] * 300).astype(np.int64)

        def distance_tables(self, X):
            return np.zeros((len(X), 2, 301), dtype=np.float32)

    X = np.zeros((10, 2))
    X[8:] = 1.0  # only the last chunk holds index 300
    monkeypatch.setattr(_index, "ENCODE_CHUNK", 4)
    search = QuantizedNeighbors(Growing())
    search.fit(X)
    assert search.codes_.dtype == np.uint16
    np.testing.assert_array_equal(search.codes_[:, 0], [0] * 8 + [300] * 2)
    with pytest.raises(ValueError, match=r"codeword indices must be in \[0, 300\]"):
        search.add(np.full((1, 2), 2.0))  # index 600: beyond the tables


# ---------------------------------------------------------------- threads


@pytest.mark.parametrize("searcher", ALL_SEARCHERS, ids=repr)
def test_concurrent_searches_equal_serial_ones(searcher, data):
    X_db, y_db, X_q, _ = data
    fitted = clone(searcher).set_params(n_jobs=2).fit(X_db, y_db)
    fitted._sdc_tables = None  # built lazily: let the threads race for it
    jobs = [X_q[i::4] for i in range(4)] + [None] * 2
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda X: fitted.kneighbors(X), jobs * 2))
    for X, (dist, ind) in zip(jobs * 2, results):
        d_ref, i_ref = fitted.kneighbors(X)
        np.testing.assert_array_equal(ind, i_ref)
        np.testing.assert_array_equal(dist, d_ref)


# ---------------------------------------------------------------- beyond 2**31 items


@pytest.mark.slow
def test_indices_beyond_int32(tmp_path):
    """A 2**31 + 16 row code file (sparse on disk): the one distinct row is found."""
    n = 2**31 + 16
    path = tmp_path / "codes.u8"
    with open(path, "wb") as f:
        f.truncate(n)  # zeros, not written to disk
    codes = np.memmap(path, dtype=np.uint8, mode="r+", shape=(n, 1))
    target = 2**31 + 3
    codes[target, 0] = 1
    codes.flush()
    codes = np.memmap(path, dtype=np.uint8, mode="r", shape=(n, 1))
    tables = np.array([[[1.0, 0.0]]], dtype=np.float32)  # code 1 is at distance 0
    distances, indices = adc_kneighbors(tables, codes, 2, n_threads=2)
    assert indices.dtype == np.int64
    np.testing.assert_array_equal(indices, [[target, 0]])
    np.testing.assert_array_equal(distances, [[0.0, 1.0]])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's RssFile")
def test_release_pages_drops_only_read_only_maps(tmp_path):
    """Released pages of a read-only map read back the same; other arrays are left alone."""
    from sklearn_hash._storage import release_pages

    def rss_file():
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return int(fields["RssFile"].split()[0]) * 1024

    values = np.arange(4_000_000, dtype=np.int64)  # 32 MB
    np.save(tmp_path / "a.npy", values)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    int(mapped.sum())  # every page read
    before = rss_file()
    release_pages(np.asarray(mapped))  # a view of the map: its map is found
    assert rss_file() < before - 16_000_000
    np.testing.assert_array_equal(mapped, values)  # read back from the file
    changed = np.load(tmp_path / "a.npy", mmap_mode="c")
    changed[0] = -1  # copy-on-write: dropping the page would lose the change
    release_pages(changed)
    assert changed[0] == -1
    in_memory = values.copy()
    release_pages(in_memory)
    np.testing.assert_array_equal(in_memory, values)


def test_loaded_fast_scan_index_answers_the_same_after_releasing_its_pages(data, tmp_path,
                                                                          monkeypatch):
    from sklearn_hash import _backends
    from sklearn_hash._storage import release_pages

    released = []

    def counting(array):
        released.append(array)
        release_pages(array)

    monkeypatch.setattr(_backends, "release_pages", counting)
    X_db, y_db, X_q, _ = data
    ivf = IVFQuantizedNeighbors(ProductQuantizer(n_bits=32, subspace_bits=4, random_state=0),
                                n_lists=4, n_probe=2, random_state=0).fit(X_db, y_db)
    if not ivf._index.fast_scan:
        pytest.skip("fast-scan needs byte shuffles (AVX2 or AVX-512)")
    loaded = IVFQuantizedNeighbors.load(ivf.save(tmp_path / "index"), mmap_mode="r")
    # The segment's ids and code rows were released after packing.
    assert len(released) == 2
    assert all(np.shares_memory(a, b) for a, b in zip(
        released, (loaded._index.runs[0].ids, loaded._index.runs[0].codes)))
    d, i = ivf.kneighbors(X_q)
    d2, i2 = loaded.kneighbors(X_q)
    np.testing.assert_array_equal(i2, i)
    np.testing.assert_array_equal(d2, d)
    np.testing.assert_array_equal(loaded.codes_, ivf.codes_)
