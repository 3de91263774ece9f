"""The inverted multi-index: IVFQuantizedNeighbors(coarse="multi-index") and its traversal."""

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import make_blobs
from sklearn_hash._ivf import _halves_split
from sklearn_hash._kernels._imi import multi_sequence

from sklearn_hash import OPQ, IVFQuantizedNeighbors, ProductQuantizer


def traversal_oracle(d1, d2, sizes, n_probe, n_required):
    """Every cell ranked by (d1[i] + d2[j], cell number); non-empty ones until both counts hold."""
    K1, K2 = len(d1), len(d2)
    total = (d1[:, None] + d2[None, :]).ravel()
    order = np.lexsort((np.arange(K1 * K2), total))
    order = order[sizes[order] > 0]
    held = np.cumsum(sizes[order])
    for t in range(len(order)):
        if t + 1 >= n_probe and held[t] >= n_required:
            return order[: t + 1], total[order[: t + 1]]
    return order, total[order]


def ranked(d):
    order = np.argsort(d, axis=1, kind="stable")
    return order.astype(np.int64), np.take_along_axis(d, order, axis=1)


@pytest.mark.parametrize("seed", range(6))
def test_multi_sequence_visits_cells_as_a_sort_of_all_cells_would(seed):
    rng = np.random.default_rng(seed)
    for trial in range(40):
        K1, K2, n_q = *rng.integers(1, 10, 2), 4
        if seed % 2:  # small integers: many equal sums
            d1, d2 = (rng.integers(0, 4, (n_q, K)).astype(float) for K in (K1, K2))
        else:
            d1, d2 = rng.random((n_q, K1)), rng.random((n_q, K2))
        sizes = rng.integers(0, 3, K1 * K2) * (rng.random(K1 * K2) < 0.6)  # many empty cells
        n_probe, n_required = int(rng.integers(1, 8)), int(rng.integers(0, 10))
        for width in (K1 * K2, 3):
            cells, coarse, n_visit = multi_sequence(*ranked(d1), *ranked(d2), sizes, n_probe,
                                                    n_required, width, n_threads=2)
            for q in range(n_q):
                expected, distances = traversal_oracle(d1[q], d2[q], sizes, n_probe, n_required)
                if len(expected) > width:  # the output is too narrow: said so
                    assert n_visit[q] == -1
                    continue
                assert n_visit[q] == len(expected)
                np.testing.assert_array_equal(cells[q, : n_visit[q]], expected)
                np.testing.assert_array_equal(coarse[q, : n_visit[q]], distances)


def test_multi_sequence_rejects_bad_arguments():
    order, dist = ranked(np.random.default_rng(0).random((2, 4)))
    sizes = np.ones(16, dtype=np.int64)
    multi_sequence(order, dist, order, dist, sizes, 2, 0, 4)
    with pytest.raises(ValueError, match="sizes must hold K1 \\* K2 = 16 cells"):
        multi_sequence(order, dist, order, dist, sizes[:5], 2, 0, 4)
    with pytest.raises(ValueError, match="permutation of the codeword numbers"):
        multi_sequence(order * 0, dist, order, dist, sizes, 2, 0, 4)
    with pytest.raises(ValueError, match="n_probe and width must be >= 1"):
        multi_sequence(order, dist, order, dist, sizes, 0, 0, 4)
    with pytest.raises(ValueError, match="must have shapes"):
        multi_sequence(order, dist[:1], order, dist, sizes, 2, 0, 4)


def test_halves_meet_at_a_border_of_the_residual_subspaces():
    assert _halves_split(ProductQuantizer(n_bits=32), 16) == 8  # 4 blocks of 4
    assert _halves_split(ProductQuantizer(n_bits=24), 16) == 6  # blocks of 6, 5, 5
    assert _halves_split(ProductQuantizer(n_bits=40), 11) == 5  # blocks of 3, 2, 2, 2, 2
    assert _halves_split(ProductQuantizer(n_bits=8), 16) == 8  # one block: the middle
    assert _halves_split(OPQ(n_bits=32), 16) == 8


@pytest.fixture(scope="module")
def blobs():
    X, y = make_blobs(n_samples=3000, n_features=16, centers=30, cluster_std=3.0, random_state=0)
    Q, yq = make_blobs(n_samples=60, n_features=16, centers=30, cluster_std=3.0, random_state=1)
    return X, y, Q + 0.1, yq


def imi(**params):
    defaults = dict(quantizer=ProductQuantizer(32, random_state=0), coarse="multi-index",
                    n_lists=64, n_probe=4, random_state=0)
    return IVFQuantizedNeighbors(**{**defaults, **params})


@pytest.fixture(scope="module")
def fitted(blobs):
    X, y, _, _ = blobs
    return imi().fit(X, y)


def test_cells_are_pairs_of_half_codewords(blobs, fitted):
    X, _, _, _ = blobs
    assert fitted.coarse_codebooks_.shape == (2, 8, 8) and fitted.coarse_split_ == 8
    assert not hasattr(fitted, "coarse_centers_")
    assert fitted.list_offsets_.shape == (65,) and fitted.list_offsets_[-1] == len(X)
    # Each item sits in the cell of its two nearest half codewords.
    halves = fitted.coarse_codebooks_
    i = ((X[:, None, :8] - halves[0][None]) ** 2).sum(-1).argmin(1)
    j = ((X[:, None, 8:] - halves[1][None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(fitted._index.list_of.array, i * 8 + j)
    centroids = fitted._centroids(np.arange(64))
    np.testing.assert_array_equal(centroids[i * 8 + j], np.hstack([halves[0][i], halves[1][j]]))


def test_probes_follow_the_distance_to_the_joined_centroids(blobs, fitted):
    _, _, Q, _ = blobs
    sizes = fitted._index.sizes
    assert (sizes == 0).sum() > 10  # the blobs leave many cells empty
    true = ((Q[:, None, :] - fitted._centroids(np.arange(64))[None]) ** 2).sum(-1)
    for n_probe, n_required in ((1, 1), (3, 10), (5, 400)):
        probes, coarse, n_visit = fitted._probes(Q, n_probe, sizes, n_required, 1)
        for q in range(len(Q)):
            order = np.argsort(true[q], kind="stable")
            order = order[sizes[order] > 0]
            need = max(n_probe, np.searchsorted(np.cumsum(sizes[order]), n_required) + 1)
            assert n_visit[q] == need
            np.testing.assert_array_equal(probes[q, :need], order[:need])
            np.testing.assert_allclose(coarse[q, :need], true[q, order[:need]], rtol=1e-5)


def test_every_cell_probed_ranks_by_distance_to_the_reconstructions(blobs, fitted):
    X, _, Q, _ = blobs
    search = clone(fitted).set_params(n_probe=64).fit(X)
    rebuilt = search._reconstruct(np.arange(len(X)))
    true = ((Q[:, None, :] - rebuilt[None]) ** 2).sum(-1)
    dist, ind = search.kneighbors(Q, n_neighbors=25)
    np.testing.assert_allclose(dist**2, np.take_along_axis(true, ind, axis=1), rtol=1e-4,
                               atol=1e-3)
    best = np.sort(true, axis=1)
    clear = np.all(np.diff(best[:, :26], axis=1) > 1e-2, axis=1)
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(ind[clear], np.argsort(true[clear], axis=1)[:, :25])


def test_half_tables_give_the_answers_of_tables_per_cell(blobs, fitted, monkeypatch):
    # 2 K tables joined by the kernel, or one table per cell built from the
    # joined centroid: the same float32 tables, the same answers, bit for bit.
    _, _, Q, _ = blobs
    assert fitted._split_subspace() == 2 and fitted._list_tables.shape == (16, 4, 256)
    expected = fitted.kneighbors(Q, n_neighbors=15)
    monkeypatch.setattr(IVFQuantizedNeighbors, "_split_subspace", lambda self: None)
    per_cell = clone(fitted).fit(blobs[0], blobs[1])
    assert per_cell._list_tables.shape == (64, 4, 256)
    for got, want in zip(per_cell.kneighbors(Q, n_neighbors=15), expected):
        np.testing.assert_array_equal(got, want)


def test_recall_grows_with_n_probe_and_threads_do_not_matter(blobs):
    X, y, Q, _ = blobs
    exact = np.argsort(((Q[:, None, :] - X[None]) ** 2).sum(-1), axis=1)[:, :10]
    recalls = []
    for n_probe in (1, 4, 40):
        search = imi(quantizer=ProductQuantizer(64, random_state=0), n_probe=n_probe,
                     n_jobs=1).fit(X, y)
        ind = search.kneighbors(Q, return_distance=False)
        recalls.append(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ind, exact)]))
        np.testing.assert_array_equal(search.set_params(n_jobs=2).kneighbors(Q)[1], ind)
    assert recalls[0] < recalls[1] <= recalls[2]
    assert recalls[2] > 0.5


def test_grows_removes_filters_and_persists_like_the_flat_inverted_file(blobs, tmp_path):
    X, y, Q, yq = blobs
    half = len(X) // 2
    grown = imi().fit(X[:half], y[:half])
    loaded = IVFQuantizedNeighbors.load(grown.save(tmp_path / "index"))
    for search in (grown, loaded):
        for start in range(half, len(X), 500):
            search.add(X[start : start + 500], y[start : start + 500])
    whole = clone(grown).fit(X[:half], y[:half])
    whole._start_index(y)
    whole._append(X, y)
    for search in (grown, loaded):
        for attr in ("codes_", "ids_", "list_offsets_"):
            np.testing.assert_array_equal(getattr(search, attr), getattr(whole, attr))
        for got, want in zip(search.kneighbors(Q), whole.kneighbors(Q)):
            np.testing.assert_array_equal(got, want)
    again = IVFQuantizedNeighbors.load(loaded.save(tmp_path / "index"))
    np.testing.assert_array_equal(again.kneighbors(Q)[1], whole.kneighbors(Q)[1])
    assert again.score(Q, yq) == whole.score(Q, yq)

    # Removed items are never returned: the same as a filter that leaves them out.
    gone = np.arange(0, len(X), 3)
    keep = np.ones(len(X), dtype=bool)
    keep[gone] = False
    filtered = whole.kneighbors(Q, n_neighbors=20, allowed=keep)
    again.remove(gone)
    for got, want in zip(again.kneighbors(Q, n_neighbors=20), filtered):
        np.testing.assert_array_equal(got, want)
    assert not np.isin(filtered[1], gone).any()
    mapping = again.compact()
    compacted = again.kneighbors(Q, n_neighbors=20)
    np.testing.assert_array_equal(compacted[1], mapping[filtered[1]])
    np.testing.assert_array_equal(compacted[0], filtered[0])
    # The database as queries never finds itself.
    _, own = again.kneighbors(n_neighbors=3)
    assert not np.any(own == np.arange(again.n_samples_fit_)[:, None])


def test_refine_with_every_candidate_is_exact_search(blobs):
    X, y, Q, _ = blobs
    search = imi(n_probe=64, refine_factor=300).fit(X, y)
    dist, ind = search.kneighbors(Q, n_neighbors=10)
    true = np.sqrt(((Q[:, None, :] - X[None]) ** 2).sum(-1))
    np.testing.assert_array_equal(ind, np.argsort(true, axis=1, kind="stable")[:, :10])
    np.testing.assert_allclose(dist, np.sort(true, axis=1)[:, :10], rtol=1e-6)


def test_a_rotating_quantizer_uses_a_table_per_cell(blobs):
    X, y, Q, _ = blobs
    search = imi(quantizer=OPQ(32, n_iter=3, random_state=0), n_probe=64).fit(X, y)
    assert search._split_subspace() is None and search._list_tables.shape == (64, 4, 256)
    rebuilt = search._reconstruct(np.arange(len(X)))
    true = ((Q[:, None, :] - rebuilt[None]) ** 2).sum(-1)
    dist, ind = search.kneighbors(Q, n_neighbors=10)
    np.testing.assert_allclose(dist**2, np.take_along_axis(true, ind, axis=1), rtol=1e-4,
                               atol=1e-3)
    assert np.mean(ind == np.argsort(true, axis=1)[:, :10]) > 0.9


def test_bad_settings_are_refused(blobs):
    X, y, _, _ = blobs
    with pytest.raises(ValueError, match="n_lists to be a perfect square K \\* K.*got "
                                         "n_lists=50. Use e.g. n_lists=49 or 64"):
        imi(n_lists=50).fit(X)
    with pytest.raises(ValueError, match="at least 2 features; got n_features=1"):
        imi(n_lists=4, quantizer=ProductQuantizer(8, subspace_bits=4)).fit(X[:, :1])
    with pytest.raises(ValueError, match="learns 60 codewords per half and needs at least "
                                         "as many rows; got n_samples=50"):
        imi(n_lists=3600).fit(X[:50])
    with pytest.raises(ValueError, match="coarse"):
        IVFQuantizedNeighbors(coarse="multi").fit(X)
