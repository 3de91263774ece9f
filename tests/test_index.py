"""The index as a user lives with it: filters, removal, growth, safe persistence."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
from sklearn import config_context
from sklearn.base import clone
from sklearn.frozen import FrozenEstimator
from sklearn_hash._kernels._openmp import effective_n_threads

from sklearn_hash import (
    AGH,
    ITQ,
    DeepQuantizationNetwork,
    IVFQuantizedNeighbors,
    ProductQuantizer,
    QuantizedNeighbors,
    SpectralHashing,
    _index,
    _storage,
)
from sklearn_hash._codes import pack_bits
from sklearn_hash._dqn import _torch_available

HAMMING = QuantizedNeighbors(ITQ(n_bits=24, random_state=0), n_neighbors=5)
ADC = QuantizedNeighbors(ProductQuantizer(n_bits=16, subspace_bits=4, random_state=0),
                         n_neighbors=5)
SDC = QuantizedNeighbors(ProductQuantizer(n_bits=16, subspace_bits=4, random_state=0),
                         n_neighbors=5, metric="sdc")
IVF = IVFQuantizedNeighbors(ProductQuantizer(n_bits=16, subspace_bits=4, random_state=0),
                            n_lists=8, n_probe=2, n_neighbors=5, random_state=0)
SEARCHERS = [HAMMING, ADC, SDC, IVF]

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


@pytest.fixture(scope="module")
def data(digits_split):
    return digits_split


def exact_distances(searcher, X):
    """Every query's distance to every database item, as the searcher's kernel computes it."""
    if searcher.metric_ == "hamming":
        q = searcher.quantizer_.transform(X).astype(bool)
        db = np.unpackbits(searcher.codes_.view(np.uint8), axis=1, bitorder="little")
        db = db[:, : q.shape[1]].astype(bool)
        return (q[:, None, :] != db[None]).sum(axis=2).astype(np.float64)
    if searcher.metric_ == "adc":
        tables = searcher.quantizer_.distance_tables(X).astype(np.float32)
    else:
        sdc = searcher.quantizer_.symmetric_distance_tables().astype(np.float32)
        codes = searcher.quantizer_.transform(X).astype(np.intp)
        tables = sdc[np.arange(sdc.shape[0]), codes]
    codes = searcher.codes_.astype(np.intp)
    d = tables[:, 0, codes[:, 0]]
    for m in range(1, codes.shape[1]):
        d = d + tables[:, m, codes[:, m]]
    return np.sqrt(d.astype(np.float64))


def oracle(distances, allowed, k):
    """Top k of each row over the allowed columns, ties by index."""
    cols = np.flatnonzero(allowed)
    order = np.lexsort((np.broadcast_to(cols, (len(distances), cols.size)),
                        distances[:, cols]), axis=1)[:, :k]
    return np.take_along_axis(distances[:, cols], order, axis=1), cols[order]


def ivf_distances(searcher, X):
    rebuilt = searcher._reconstruct(np.arange(searcher.n_samples_fit_)).astype(np.float64)
    return ((X[:, None, :] - rebuilt[None]) ** 2).sum(-1)


# ---------------------------------------------------------------- filtered search


@pytest.mark.parametrize("searcher", [HAMMING, ADC, SDC], ids=["hamming", "adc", "sdc"])
def test_filtered_search_equals_exact_search_over_the_allowed_items(searcher, data):
    X_db, y_db, X_q, _ = data
    fitted = clone(searcher).fit(X_db, y_db)
    rng = np.random.default_rng(0)
    full = exact_distances(fitted, X_q[:40])
    for share in (0.02, 0.3, 1.0):
        mask = rng.random(len(X_db)) < share
        for allowed in (mask, np.flatnonzero(mask)):
            dist, ind = fitted.kneighbors(X_q[:40], n_neighbors=7, allowed=allowed)
            exp_d, exp_i = oracle(full, mask, 7)
            np.testing.assert_array_equal(ind, exp_i)
            np.testing.assert_allclose(dist, exp_d, rtol=1e-6)
    graph = fitted.kneighbors_graph(X_q[:5], 3, mode="distance", allowed=np.arange(10, 30))
    assert graph.shape == (5, len(X_db)) and set(graph.indices) <= set(range(10, 30))


def test_ivf_filtered_search_probing_every_cell_equals_the_oracle(data):
    X_db, y_db, X_q, _ = data
    fitted = clone(IVF).set_params(n_probe=8).fit(X_db, y_db)
    full = ivf_distances(fitted, X_q[:30].astype(np.float64))
    mask = np.random.default_rng(1).random(len(X_db)) < 0.1
    dist, ind = fitted.kneighbors(X_q[:30], n_neighbors=6, allowed=mask)
    assert mask[ind].all()
    # Ranked as the distances to the reconstructions, up to float32 rounding.
    exp_d, exp_i = oracle(full, mask, 6)
    np.testing.assert_allclose(dist**2, exp_d, rtol=2e-4, atol=1e-3)
    clear = np.all(np.diff(np.sort(full[:, mask], axis=1)[:, :7], axis=1) > 1e-2, axis=1)
    np.testing.assert_array_equal(ind[clear], exp_i[clear])


def test_ivf_tops_up_cells_when_the_probed_ones_hold_too_few_allowed_items(data):
    X_db, y_db, X_q, _ = data
    fitted = clone(IVF).set_params(n_probe=1).fit(X_db, y_db)
    allowed = np.zeros(len(X_db), dtype=bool)
    allowed[:9] = True  # a handful of items, in few cells
    ind = fitted.kneighbors(X_q, n_neighbors=9, allowed=allowed, return_distance=False)
    np.testing.assert_array_equal(np.sort(ind, axis=1), np.tile(np.arange(9), (len(X_q), 1)))


def test_n_probe_per_call_leaves_the_estimator_unchanged(data):
    X_db, y_db, X_q, _ = data
    fitted = clone(IVF).fit(X_db, y_db)
    wide = fitted.kneighbors(X_q, n_probe=8)
    assert fitted.n_probe == 2
    np.testing.assert_array_equal(wide[1], fitted.set_params(n_probe=8).kneighbors(X_q)[1])
    assert fitted.kneighbors_graph(X_q, n_probe=1).shape == (len(X_q), len(X_db))
    with pytest.raises(ValueError, match="n_probe"):
        fitted.kneighbors(X_q, n_probe=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'n_probe'"):
        clone(ADC).fit(X_db).kneighbors(X_q, n_probe=3)


@pytest.mark.parametrize("searcher", SEARCHERS, ids=["hamming", "adc", "sdc", "ivf"])
def test_bad_filters_and_removals_are_refused_and_change_nothing(searcher, data):
    X_db, y_db, X_q, _ = data
    fitted = clone(searcher).fit(X_db, y_db)
    n = len(X_db)
    before = fitted.kneighbors(X_q)
    cases = [
        (dict(allowed=np.ones(n - 1, dtype=bool)), ValueError, r"shape \(%d,\)" % n),
        (dict(allowed=np.ones(n, dtype=np.float64)), TypeError, "boolean mask"),
        (dict(allowed=np.array([-1, 3])), ValueError, "must be in"),
        (dict(allowed=np.array([n])), ValueError, "must be in"),
        (dict(allowed=np.zeros(n, dtype=bool)), ValueError, "selects no live item"),
        (dict(allowed=np.arange(3)), ValueError, "only 3 live items are allowed"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            fitted.kneighbors(X_q, **kwargs)
    for indices, error, match in [
        ([n], ValueError, "must be in"), ([-1], ValueError, "must be in"),
        ([3, 3], ValueError, "distinct"), ([[1, 2]], TypeError, "1-D"),
        ([0.5], TypeError, "integer"),
    ]:
        with pytest.raises(error, match=match):
            fitted.remove(indices)
    fitted.remove([4])
    with pytest.raises(ValueError, match="item 4 was already removed"):
        fitted.remove([5, 4])
    assert fitted.n_removed_ == 1  # the refused call removed nothing, not even 5
    with pytest.raises(ValueError, match="call compact"):
        fitted.kneighbors()
    fitted.compact()
    assert fitted.n_samples_fit_ == n - 1
    fitted = clone(searcher).fit(X_db, y_db)
    np.testing.assert_array_equal(fitted.kneighbors(X_q)[1], before[1])


# ---------------------------------------------------------------- removal


@pytest.mark.parametrize("searcher", SEARCHERS, ids=["hamming", "adc", "sdc", "ivf"])
def test_removed_items_are_never_returned_and_removal_survives_save_load(searcher, data,
                                                                        tmp_path):
    X_db, y_db, X_q, y_q = data
    fitted = clone(searcher).fit(X_db, y_db)
    first = fitted.kneighbors(X_q, n_neighbors=10, return_distance=False)
    gone = np.unique(first[:, :3])
    fitted.remove(gone)
    assert fitted.n_removed_ == gone.size
    dist, ind = fitted.kneighbors(X_q, n_neighbors=10)
    assert not np.isin(ind, gone).any()
    live = np.ones(len(X_db), dtype=bool)
    live[gone] = False
    if not isinstance(fitted, IVFQuantizedNeighbors):
        # Removal is the same as allowing every other item.
        np.testing.assert_array_equal(ind, clone(searcher).fit(X_db, y_db).kneighbors(
            X_q, n_neighbors=10, allowed=live)[1])
    graph = fitted.kneighbors_graph(X_q, 10)
    assert not np.isin(graph.indices, gone).any()
    fitted.score(X_q, y_q)
    loaded = type(fitted).load(fitted.save(tmp_path / "index"))
    assert loaded.n_removed_ == gone.size
    np.testing.assert_array_equal(loaded.kneighbors(X_q, n_neighbors=10)[1], ind)
    # compact renumbers the live items in order and says how.
    mapping = fitted.compact()
    assert (mapping[gone] == -1).all() and fitted.n_samples_fit_ == live.sum()
    np.testing.assert_array_equal(mapping[live], np.arange(live.sum()))
    dist2, ind2 = fitted.kneighbors(X_q, n_neighbors=10)
    np.testing.assert_array_equal(ind2, mapping[ind])
    np.testing.assert_array_equal(dist2, dist)
    np.testing.assert_array_equal(fitted._fit_y, y_db[live])
    # After compact the database may query itself again, and save starts afresh.
    assert fitted.kneighbors(n_neighbors=2)[1].shape == (live.sum(), 2)
    again = type(fitted).load(fitted.save(tmp_path / "index"))
    np.testing.assert_array_equal(again.kneighbors(X_q, n_neighbors=10)[1], ind2)


# ---------------------------------------------------------------- growth


def test_add_grows_in_chunks_without_copying_what_is_indexed(data):
    X_db, y_db, X_q, _ = data
    searcher = clone(HAMMING).fit(X_db[:100], y_db[:100])
    buffer = searcher._index.codes._tail._buffer
    capacity = buffer.shape[0]
    searcher.add(X_db[100:101], y_db[100:101])  # within capacity: same buffer
    assert searcher._index.codes._tail._buffer is buffer or capacity <= 100
    copies = 0
    for start in range(101, len(X_db), 50):
        old = searcher._index.codes._tail._buffer
        searcher.add(X_db[start : start + 50], y_db[start : start + 50])
        copies += searcher._index.codes._tail._buffer is not old
    assert copies <= int(np.log2(len(X_db) / 100)) + 2  # doublings only
    whole = clone(HAMMING).set_params(quantizer=FrozenEstimator(searcher.quantizer_))
    whole.fit(X_db, y_db)
    np.testing.assert_array_equal(searcher.kneighbors(X_q)[1], whole.kneighbors(X_q)[1])


def test_ivf_add_appends_to_cells_and_keeps_indices(data, tmp_path):
    X_db, y_db, X_q, _ = data
    fitted = clone(IVF).fit(X_db[:700], y_db[:700])
    loaded = IVFQuantizedNeighbors.load(fitted.save(tmp_path / "index"))
    sealed = [run.codes for run in loaded._index.runs]
    assert sealed and not any(codes.flags.writeable for codes in sealed)  # read-only maps
    for start in range(700, len(X_db), 25):
        loaded.add(X_db[start : start + 25], y_db[start : start + 25])
    # The loaded (memory-mapped) run stays as it is: new items go to new runs,
    # merged among themselves into O(log n) runs.
    runs = loaded._index.runs
    assert [run.codes for run in runs[: len(sealed)]] == sealed
    assert 1 < len(runs) - len(sealed) <= np.log2((len(X_db) - 700) / 25) + 1
    assert [len(run) for run in runs[len(sealed):]] == sorted(
        (len(run) for run in runs[len(sealed):]), reverse=True)
    whole = clone(IVF)
    whole.fit(X_db[:700], y_db[:700])
    whole._start_index(y_db)
    whole._append(X_db, y_db)
    fitted.add(X_db[700:], y_db[700:])
    for grown in (fitted, loaded):
        np.testing.assert_array_equal(grown.kneighbors(X_q)[1], whole.kneighbors(X_q)[1])
        np.testing.assert_array_equal(grown.codes_, whole.codes_)
        np.testing.assert_array_equal(grown.ids_, whole.ids_)


def test_ivf_batch_indexed_in_chunks_becomes_one_run(data, monkeypatch):
    # fit and add encode a batch ENCODE_CHUNK rows at a time, each chunk a
    # run; the batch's runs are merged once it is in, so each cell is one
    # chunk for the kernel, as after load.
    import sklearn_hash._index as index_module

    monkeypatch.setattr(index_module, "ENCODE_CHUNK", 64)
    X_db, y_db, X_q, _ = data
    fitted = clone(IVF).fit(X_db[:700], y_db[:700])  # 11 chunks
    assert [len(run) for run in fitted._index.runs] == [700]
    fitted.add(X_db[700:710], y_db[700:710])  # one chunk: a run of its own
    assert [len(run) for run in fitted._index.runs] == [700, 10]
    fitted.add(X_db[710:], y_db[710:])  # several chunks, merged with the run before
    rest = len(X_db) - 700
    # then the usual rule: the older run merges in when no larger
    assert [len(run) for run in fitted._index.runs] == ([700, rest] if rest < 700
                                                       else [len(X_db)])
    monkeypatch.setattr(index_module, "ENCODE_CHUNK", 65536)
    whole = clone(IVF).fit(X_db[:700], y_db[:700])  # the same quantizers, all in one chunk
    whole._start_index(y_db)
    whole._append(X_db, y_db)
    assert len(whole._index.runs) == 1
    np.testing.assert_array_equal(fitted.kneighbors(X_q)[1], whole.kneighbors(X_q)[1])
    np.testing.assert_array_equal(fitted.codes_, whole.codes_)
    np.testing.assert_array_equal(fitted.ids_, whole.ids_)


# ---------------------------------------------------------------- persistence


@pytest.mark.parametrize("quantizer", QUANTIZERS, ids=repr)
def test_every_estimator_kind_saves_and_loads_with_identical_answers(quantizer, data, tmp_path):
    X_db, y_db, X_q, y_q = data
    y_fit = y_db.copy()
    y_fit[::3] = -1  # the deep model learns from some labels only
    searcher = QuantizedNeighbors(clone(quantizer), n_neighbors=5)
    searcher.fit(X_db, y_fit if isinstance(quantizer, DeepQuantizationNetwork) else y_db)
    loaded = QuantizedNeighbors.load(searcher.save(tmp_path / "index"))
    np.testing.assert_array_equal(loaded.quantizer_.transform(X_q),
                                  searcher.quantizer_.transform(X_q))
    for X in (X_q, None):
        d1, i1 = searcher.kneighbors(X)
        d2, i2 = loaded.kneighbors(X)
        np.testing.assert_array_equal(i2, i1)
        np.testing.assert_array_equal(d2, d1)
    assert loaded.get_params()["quantizer"].get_params() == quantizer.get_params()


def test_loading_never_unpickles(data, tmp_path):
    X_db, y_db, X_q, _ = data
    for i, searcher in enumerate(SEARCHERS):
        clone(searcher).fit(X_db, y_db).save(tmp_path / str(i))
    script = f"""
import sys, pickle, numpy as np
def hook(event, args):
    if event == "pickle.find_class":
        raise RuntimeError(f"unpickling {{args}}")
sys.addaudithook(hook)
from sklearn_hash import QuantizedNeighbors, IVFQuantizedNeighbors
X = np.load({str(tmp_path / "q.npy")!r})
for i, cls in enumerate([QuantizedNeighbors] * 3 + [IVFQuantizedNeighbors]):
    cls.load({str(tmp_path)!r} + "/" + str(i)).kneighbors(X)
try:
    pickle.loads(pickle.dumps(np.float64))
except RuntimeError:
    print("hook works")
"""
    np.save(tmp_path / "q.npy", X_q)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hook works"


@pytest.mark.parametrize("searcher", [HAMMING, IVF], ids=["hamming", "ivf"])
def test_an_interrupted_save_leaves_the_previous_index_loadable(searcher, data, tmp_path,
                                                                 monkeypatch):
    X_db, y_db, X_q, _ = data
    old = clone(searcher).fit(X_db[:600], y_db[:600])
    old.save(tmp_path / "index")
    expected = old.kneighbors(X_q)
    new = clone(searcher).fit(X_db, y_db)
    calls = []

    def failing(path, array):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real(path, array)

    real = _storage.write_array
    monkeypatch.setattr(_storage, "write_array", failing)
    with pytest.raises(OSError, match="disk full"):
        new.save(tmp_path / "index")
    monkeypatch.undo()
    loaded = type(old).load(tmp_path / "index")
    np.testing.assert_array_equal(loaded.kneighbors(X_q)[1], expected[1])
    # The next save succeeds and clears the half-written files.
    new.save(tmp_path / "index")
    np.testing.assert_array_equal(type(new).load(tmp_path / "index").kneighbors(X_q)[1],
                                  new.kneighbors(X_q)[1])
    assert len(list((tmp_path / "index").glob("seg-*"))) == 1


@pytest.mark.parametrize("searcher", SEARCHERS, ids=["hamming", "adc", "sdc", "ivf"])
def test_saving_onto_the_loaded_memory_mapped_directory(searcher, data, tmp_path):
    X_db, y_db, X_q, _ = data
    path = tmp_path / "index"
    clone(searcher).fit(X_db[:800], y_db[:800]).save(path)
    loaded = type(searcher).load(path)
    loaded.save(path)  # nothing new: the segment is kept
    assert len(list(path.glob("seg-*"))) == 1
    loaded.add(X_db[800:], y_db[800:])
    loaded.save(path)  # only the new items are written, as a second segment
    assert len(list(path.glob("seg-*"))) == 2
    np.testing.assert_array_equal(type(searcher).load(path).kneighbors(X_q)[1],
                                  loaded.kneighbors(X_q)[1])
    grown = type(searcher).load(path)
    grown.add(X_db[:10], y_db[:10])
    grown.save(path)
    assert type(searcher).load(path).n_samples_fit_ == len(X_db) + 10


def test_damaged_foreign_and_newer_directories_are_refused(data, tmp_path):
    X_db, y_db, _, _ = data
    path = tmp_path / "index"
    clone(ADC).fit(X_db, y_db).save(path)
    manifest = json.loads((path / "index.json").read_text())
    (segment,) = path.glob("seg-*")

    def expect(match, cls=QuantizedNeighbors):
        with pytest.raises(ValueError, match=match):
            cls.load(path)

    expect("use QuantizedNeighbors.load", IVFQuantizedNeighbors)
    newer = dict(manifest, format=99)
    (path / "index.json").write_text(json.dumps(newer))
    expect("format 99, written by a newer sklearn_hash")
    (path / "index.json").write_text("{not json")
    expect("not valid JSON")
    (path / "index.json").write_text(json.dumps(dict(manifest, n_samples=5)))
    expect("declares 5 items")
    foreign = json.loads(json.dumps(manifest))
    foreign["estimator"]["value"]["params"]["quantizer"]["value"]["class"] = "os.system"
    (path / "index.json").write_text(json.dumps(foreign))
    expect("not one of sklearn_hash's")
    (path / "index.json").write_text(json.dumps(manifest))
    labels = np.load(segment / "labels.npy")
    np.save(segment / "labels.npy", labels[:-1])
    expect("labels.npy has shape")
    np.save(segment / "labels.npy", labels)
    codes_bytes = (segment / "codes.npy").read_bytes()
    (segment / "codes.npy").write_bytes(codes_bytes[: len(codes_bytes) // 2])
    expect("truncated or damaged")
    (segment / "codes.npy").unlink()
    expect("codes.npy is missing")
    (segment / "codes.npy").write_bytes(codes_bytes)
    QuantizedNeighbors.load(path)  # whole again
    # An old pickle-based directory, and a non-index directory.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "searcher.pkl").write_bytes(pickle.dumps(0))
    with pytest.raises(ValueError, match="never loads"):
        QuantizedNeighbors.load(tmp_path / "old")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to write"):
        clone(ADC).fit(X_db).save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_codes_are_checked_where_they_enter_the_index(data, tmp_path):
    X_db, y_db, _, _ = data
    path = tmp_path / "index"
    clone(ADC).fit(X_db, y_db).save(path)
    (segment,) = path.glob("seg-*")
    codes = np.load(segment / "codes.npy")
    codes[3, 1] = 16  # beyond the 16 codewords of 4-bit subspaces
    np.save(segment / "codes.npy", codes)
    with pytest.raises(ValueError, match=r"codeword indices must be in \[0, 15\]"):
        QuantizedNeighbors.load(path)
    path2 = tmp_path / "hamming"
    clone(HAMMING).fit(X_db, y_db).save(path2)
    (segment,) = path2.glob("seg-*")
    packed = np.load(segment / "codes.npy")
    packed[0, 0] |= np.uint64(1) << np.uint64(40)  # a bit beyond the 24 of the codes
    np.save(segment / "codes.npy", packed)
    with pytest.raises(ValueError, match="bits set beyond bit 24"):
        QuantizedNeighbors.load(path2)


# ---------------------------------------------------------------- smaller defects


def test_fit_and_search_under_pandas_output(data):
    X_db, y_db, X_q, _ = data
    for searcher in SEARCHERS:
        plain = clone(searcher).fit(X_db, y_db).add(X_q[:5], np.zeros(5, dtype=y_db.dtype))
        with config_context(transform_output="pandas"):
            fitted = clone(searcher).fit(X_db, y_db)
            fitted.add(X_q[:5], np.zeros(5, dtype=y_db.dtype))
            got = fitted.kneighbors(X_q)
            assert got[1].shape == (len(X_q), 5)
            # The same answers as under the default output.
            np.testing.assert_array_equal(got[1], plain.kneighbors(X_q)[1])
            np.testing.assert_array_equal(got[0], plain.kneighbors(X_q)[0])


def test_database_queries_itself_by_adc_for_wide_codebooks(data):
    """kneighbors() without X stays ADC (from the reconstructions): no K x K tables."""
    X_db, _, _, _ = data
    pq = ProductQuantizer(n_bits=22, subspace_bits=11, random_state=0, n_iter=2)
    rng = np.random.default_rng(0)  # 2**11 codewords need 2048 distinct rows
    X = np.repeat(X_db, 2, axis=0) + rng.normal(scale=0.01, size=(2 * len(X_db), X_db.shape[1]))
    fitted = QuantizedNeighbors(pq, n_neighbors=3).fit(X[:2048])
    dist, ind = fitted.kneighbors()
    assert fitted.metric_ == "adc" and ind.shape == (2048, 3)
    recon = fitted.quantizer_.inverse_transform(fitted.codes_[:5])
    np.testing.assert_array_equal(
        ind[:5], [[j for j in row if j != i][:3]
                  for i, row in enumerate(fitted.kneighbors(recon, n_neighbors=4)[1])])
    with pytest.raises(ValueError, match="allowed up to K = 1024 codewords"):
        QuantizedNeighbors(pq, metric="sdc").fit(X[:2048])


def test_default_thread_count_follows_the_cpus_this_process_may_use(monkeypatch):
    import joblib

    from sklearn_hash._kernels import _openmp

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(joblib, "cpu_count", lambda *a, **k: 1)
    monkeypatch.setattr(_openmp, "_cpu_count", None)  # read again, through the patch
    assert effective_n_threads(None) == 1
    assert effective_n_threads(-1) == 1
    assert effective_n_threads(3) == 3


def test_absurd_thread_counts_are_capped_not_fatal():
    """n_jobs=100,000 crashed the process in the kernels (OpenMP cannot start that many)."""
    from sklearn_hash._kernels._openmp import MAX_THREADS, openmp_enabled

    expected = MAX_THREADS if openmp_enabled() else 1
    assert effective_n_threads(100_000) == expected
    assert effective_n_threads(2**40) == expected  # no overflow converting to a C int
    X = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    pq = ProductQuantizer(32, subspace_bits=4, random_state=0)
    one = QuantizedNeighbors(pq, n_jobs=1).fit(X).kneighbors(X[:3])
    many = QuantizedNeighbors(pq, n_jobs=100_000).fit(X).kneighbors(X[:3])
    np.testing.assert_array_equal(one[1], many[1])
    np.testing.assert_array_equal(one[0], many[0])


def test_packed_codes_round_trip_through_the_hamming_back_end():
    from sklearn_hash._backends import HammingScan

    scan = HammingScan(70)
    bits = np.random.default_rng(0).integers(0, 2, (20, 70))
    scan.add(pack_bits(bits))
    scan.add(pack_bits(bits[:3]))
    dist, ind = scan.search(pack_bits(bits[:2]), 2)
    np.testing.assert_array_equal(ind, [[0, 20], [1, 21]])
    np.testing.assert_array_equal(dist, [[0, 0], [0, 0]])


def test_verbose_reports_k_means_and_indexing_progress_and_is_silent_by_default(data, capsys):
    X_db, y_db, _, _ = data
    clone(IVF).fit(X_db, y_db)
    assert capsys.readouterr().out == ""
    pq = ProductQuantizer(n_bits=16, subspace_bits=4, n_iter=3, random_state=0, verbose=1)
    IVFQuantizedNeighbors(pq, n_lists=8, n_iter=2, random_state=0, verbose=1).fit(X_db, y_db)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("coarse k-means: iteration 0, inertia")
    assert sum(line.startswith("codebook 4/4: iteration") for line in out) >= 1
    assert out[-1] == f"[IVFQuantizedNeighbors] indexed {len(X_db):,}/{len(X_db):,} rows."
    # Inertia never rises from one iteration to the next.
    inertia = [float(line.rsplit(" ", 1)[1].rstrip(".")) for line in out
               if line.startswith("codebook 1/4: iteration")]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(inertia, inertia[1:]))


def test_allowed_is_checked_and_an_integer_mask_is_refused():
    X = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    searcher = QuantizedNeighbors(ProductQuantizer(32, subspace_bits=4, random_state=0),
                                  n_neighbors=2).fit(X)
    mask = np.zeros(50, dtype=bool)
    mask[[7, 9, 30]] = True
    expected = searcher.kneighbors(X[:4], allowed=mask)[1]
    assert set(expected.ravel()) <= {7, 9, 30}
    np.testing.assert_array_equal(searcher.kneighbors(X[:4], allowed=[7, 9, 30])[1], expected)
    # a 0/1 mask of integers was read as the indices 0 and 1, silently
    for as_int in (mask.astype(np.uint8), mask.astype(np.int64)):
        with pytest.raises(ValueError, match="all 0 or 1 and some repeated: a mask of integers"):
            searcher.kneighbors(X[:4], allowed=as_int)
    with pytest.raises(ValueError, match=r"boolean mask must have shape \(50,\)"):
        searcher.kneighbors(X[:4], allowed=mask[:49])
    with pytest.raises(ValueError, match=r"allowed indices must be in \[0, 49\]"):
        searcher.kneighbors(X[:4], allowed=[3, 50])
    with pytest.raises(TypeError, match="allowed must be a boolean mask"):
        searcher.kneighbors(X[:4], allowed=mask.astype(float))
    # indices 0 and 1 (and 50 indices that are not all 0/1) stay indices
    assert set(searcher.kneighbors(X[:4], allowed=[0, 1])[1].ravel()) == {0, 1}
    from sklearn.frozen import FrozenEstimator

    pq = FrozenEstimator(ProductQuantizer(32, subspace_bits=4, random_state=0).fit(X))
    two = QuantizedNeighbors(pq, n_neighbors=1).fit(X[:2])
    for as_int in ([1, 1], [0, 0]):  # "both" and "none" as masks of integers
        with pytest.raises(ValueError, match="all 0 or 1 and some repeated"):
            two.kneighbors(X[:1], allowed=as_int)
    np.testing.assert_array_equal(two.kneighbors(X[:1], allowed=[1, 0])[1],
                                  two.kneighbors(X[:1])[1])
    np.testing.assert_array_equal(searcher.kneighbors(X[:4], allowed=np.arange(50)[::-1])[1],
                                  searcher.kneighbors(X[:4])[1])


def test_remove_and_allowed_messages_at_the_edges():
    X = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    searcher = QuantizedNeighbors(ProductQuantizer(32, subspace_bits=4, random_state=0),
                                  n_neighbors=2).fit(X)
    # a uint64 index past int64's range was reported as -9223372036854775808
    with pytest.raises(ValueError, match="got 9223372036854775808"):
        searcher.remove(np.array([2**63], dtype=np.uint64))
    # [] (float64 to numpy) was refused as a float mask: it is no index at all
    with pytest.raises(ValueError, match="allowed selects no live item"):
        searcher.kneighbors(X[:1], allowed=[])


@pytest.mark.parametrize("searcher", SEARCHERS, ids=["hamming", "adc", "sdc", "ivf"])
@pytest.mark.parametrize("bad", ["float labels", "huge row in a later chunk"])
def test_a_refused_add_changes_nothing(searcher, bad, data, monkeypatch):
    # the codes of the chunks encoded before the refusal stayed in the index: the next
    # item added got one id and was found under another
    monkeypatch.setattr(_index, "ENCODE_CHUNK", 40)
    X_db, y_db, X_q, _ = data
    search = clone(searcher).fit(X_db[:300], y_db[:300])
    before = search.kneighbors(X_q[:20])
    X_new, y_new = X_db[300:400].copy(), y_db[300:400].copy()
    if bad == "float labels":
        y_new = y_new + 0.5
        match = "cannot join the index's labels"
    else:
        X_new[90] = 1e200
        match = "values too large"
    with pytest.raises(ValueError, match=match):
        search.add(X_new, y_new)
    assert search.n_samples_fit_ == 300 and len(search._index) == 300
    after = search.kneighbors(X_q[:20])
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    search.add(X_db[300:301], y_db[300:301])  # the next item gets the next id
    assert search.n_samples_fit_ == 301 and len(search._index) == 301
    found = search.kneighbors(X_db[300:301], n_neighbors=1, allowed=np.array([300]))[1]
    assert found[0, 0] == 300


@pytest.mark.parametrize("held, new, widened", [
    (np.int8, [100, -128], np.int8),           # the values fit: kept as they are
    (np.int8, [300], np.int64),                # int8 wrapped 300 to 44
    (np.int32, [5_000_000_000], np.int64),     # int32 wrapped it to 705032704
    (np.uint8, [255], np.uint8),
    (np.float32, [0.1], np.float64),           # float32 would round it
])
def test_added_labels_widen_the_index_labels_instead_of_wrapping(held, new, widened, data):
    X_db, y_db, _, _ = data
    search = clone(ADC).fit(X_db[:100], y_db[:100].astype(held))
    search.add(X_db[100 : 100 + len(new)], np.array(new))
    assert search._fit_y.dtype == widened
    np.testing.assert_array_equal(search._fit_y[100:], np.array(new, dtype=widened))
    np.testing.assert_array_equal(search._fit_y[:100], y_db[:100].astype(held))


@pytest.mark.parametrize("held, new", [(np.int64, [0.5]), (np.uint64, [-1]), (str, [1]),
                                       (np.int64, ["a"])])
def test_labels_of_another_kind_are_refused_by_add(held, new, data):
    X_db, y_db, _, _ = data
    search = clone(ADC).fit(X_db[:100], y_db[:100].astype(held))
    with pytest.raises(ValueError, match="cannot join the index's labels"):
        search.add(X_db[100:101], np.array(new))
    assert search.n_samples_fit_ == 100 and len(search._fit_y) == 100


def test_string_labels_of_pandas_join_numpy_ones(data):
    # pandas gives object arrays of strings: refused as "numbers" beside numpy's <U labels
    pd = pytest.importorskip("pandas")
    X_db, _, _, _ = data
    for first, then in ((np.array(["cat", "dog"] * 50), pd.Series(["cat", "bird"])),
                        (pd.Series(["cat", "dog"] * 50), np.array(["cat", "bird"]))):
        search = clone(ADC).fit(X_db[:100], first)
        search.add(X_db[100:102], then)
        assert list(search._fit_y[-3:]) == ["dog", "cat", "bird"]


INTERRUPTED = {
    "hamming": QuantizedNeighbors(ITQ(n_bits=24, random_state=0), refine_factor=2),
    "multi-index hashing": QuantizedNeighbors(ITQ(n_bits=32, random_state=0),
                                              algorithm="multi-index"),
    "tables": QuantizedNeighbors(ProductQuantizer(n_bits=32, random_state=0),
                                 refine_factor=2, refine_storage="sq8"),
    "fast-scan": QuantizedNeighbors(ProductQuantizer(n_bits=64, subspace_bits=4,
                                                     random_state=0)),
    "ivf": IVFQuantizedNeighbors(ProductQuantizer(n_bits=32, random_state=0), n_lists=8,
                                 refine_factor=2, random_state=0),
    "ivf fast-scan": IVFQuantizedNeighbors(ProductQuantizer(n_bits=64, subspace_bits=4,
                                                            random_state=0),
                                           n_lists=3, random_state=0),
    "ivf multi-index": IVFQuantizedNeighbors(ProductQuantizer(n_bits=32, random_state=0),
                                             coarse="multi-index", n_lists=16, n_probe=4,
                                             refine_factor=2, random_state=0),
}


def interrupt_at(monkeypatch, search, where):
    """Make ``add`` fail (KeyboardInterrupt) part way, at ``where``."""
    calls = {"n": 0}

    def failing(original, after):
        def run(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > after:
                raise KeyboardInterrupt
            return original(*args, **kwargs)
        return run

    if where == "encoding the third chunk":  # two chunks of codes (and rows) are in
        monkeypatch.setattr(search, "_index_items", failing(search._index_items, 2))
    elif where == "the rows of the third chunk":  # its codes are in, its rows not
        if search._vectors is None:
            pytest.skip("no re-ranking rows")
        step = search._rerank_step()
        monkeypatch.setattr(step, "encode", failing(step.encode, 2))
    elif where == "the labels":  # every chunk's codes and rows are in
        monkeypatch.setattr(search, "_append_labels", failing(search._append_labels, 0))
    else:  # the removal mask, the last thing appended
        monkeypatch.setattr(search._live, "append", failing(search._live.append, 0))


@pytest.mark.parametrize("name", INTERRUPTED)
@pytest.mark.parametrize("where", ["encoding the third chunk", "the rows of the third chunk",
                                   "the labels", "the removal mask"])
def test_an_interrupted_add_changes_nothing(name, where, data, monkeypatch):
    # an add that failed part way (KeyboardInterrupt, out of memory) left the codes of
    # its first chunks in the index, without their labels or ids: the next add numbered
    # its items after them, and labels and answers no longer matched
    monkeypatch.setattr(_index, "ENCODE_CHUNK", 64)
    X_db, y_db, X_q, _ = data
    y_db = y_db.astype(np.int8)
    fresh = clone(INTERRUPTED[name]).fit(X_db[:400], y_db[:400])
    fresh.add(X_db[400:500], y_db[400:500])  # a second run, a tail that is partly filled
    fresh.remove([3, 450])
    search = clone(INTERRUPTED[name]).fit(X_db[:400], y_db[:400])
    search.add(X_db[400:500], y_db[400:500])
    search.remove([3, 450])
    before = search.kneighbors(X_q[:30], n_neighbors=8)
    codes_before = search.codes_.copy()
    y_new = y_db[500:800].astype(np.int64)
    y_new[-1] = 300  # widens the labels to int64 on the way
    with monkeypatch.context() as patch:
        interrupt_at(patch, search, where)
        with pytest.raises(KeyboardInterrupt):
            search.add(X_db[500:800], y_new)
    assert search.n_samples_fit_ == 500 and len(search._index) == 500
    assert search._fit_y.dtype == np.int8 and len(search._fit_y) == 500
    assert search.n_removed_ == 2
    np.testing.assert_array_equal(search.codes_, codes_before)
    if hasattr(search._index, "_blocks_and_sizes"):  # the last block was re-packed in place
        for got, expected in zip(search._index._blocks_and_sizes()[0],
                                 fresh._index._blocks_and_sizes()[0]):
            np.testing.assert_array_equal(got, expected)
    after = search.kneighbors(X_q[:30], n_neighbors=8)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    # the next add numbers its items from 500, as in an index the failed add never touched
    for index in (search, fresh):
        index.add(X_db[500:800], y_new)
    got, expected = (i.kneighbors(X_q[:30], n_neighbors=8) for i in (search, fresh))
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(search._fit_y, fresh._fit_y)
    np.testing.assert_array_equal(search.codes_, fresh.codes_)
    if search._vectors is not None:
        np.testing.assert_array_equal(search._vectors.to_array(), fresh._vectors.to_array())


@pytest.mark.parametrize("name", ["tables", "ivf fast-scan"])
def test_an_interrupted_first_partial_fit_leaves_the_searcher_unfitted(name, data,
                                                                        monkeypatch):
    # the first partial_fit fits: interrupted while indexing, it left a half-built index
    # that the next partial_fit took for a fitted one and added to, numbering its items
    # after the leftover codes
    monkeypatch.setattr(_index, "ENCODE_CHUNK", 64)
    X_db, _, X_q, _ = data
    search = clone(INTERRUPTED[name])
    calls = {"n": 0}
    original = type(search)._index_items

    def failing(self, X):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, X)

    with monkeypatch.context() as patch:
        patch.setattr(type(search), "_index_items", failing)
        with pytest.raises(KeyboardInterrupt):
            search.partial_fit(X_db[:400])
    assert not hasattr(search, "_index") and not hasattr(search, "n_samples_fit_")
    search.partial_fit(X_db[:400])  # fits again, from nothing
    expected = clone(INTERRUPTED[name]).fit(X_db[:400])
    assert search.n_samples_fit_ == 400 and len(search._index) == 400
    got, want = (s.kneighbors(X_q[:20], n_neighbors=5) for s in (search, expected))
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
