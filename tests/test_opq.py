"""OPQ: a learned rotation before product quantization."""

import numpy as np
import pytest

from sklearn_hash import (
    OPQ,
    IVFQuantizedNeighbors,
    ProductQuantizer,
    QuantizedNeighbors,
)


def correlated(n, d, seed):
    """Anisotropic, correlated data: a decaying spectrum in a random basis."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    return (rng.standard_normal((n, d)) * np.geomspace(5, 0.05, d)) @ basis.T


def error(q, X):
    return ((q.inverse_transform(q.transform(X)) - X) ** 2).sum(1).mean()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("subspace_bits", [4, 6])
def test_rotation_is_orthogonal_and_error_never_above_pq(seed, subspace_bits):
    X = correlated(3000, 24, seed)
    opq = OPQ(n_bits=4 * subspace_bits, subspace_bits=subspace_bits, n_iter=8,
              random_state=seed).fit(X)
    R = opq.rotation_
    np.testing.assert_allclose(R @ R.T, np.eye(24), atol=1e-10)
    pq = ProductQuantizer(n_bits=4 * subspace_bits, subspace_bits=subspace_bits,
                          random_state=seed).fit(X)
    assert error(opq, X) <= error(pq, X) * 1.0001
    # On correlated data the rotation pays: clearly lower error.
    assert error(opq, X) < 0.8 * error(pq, X)
    assert opq.error_curve_.shape == (8,)


def test_error_never_above_pq_on_isotropic_data_either():
    X = np.random.default_rng(3).standard_normal((2000, 16))
    opq = OPQ(n_bits=16, subspace_bits=4, n_iter=3, random_state=0).fit(X)
    pq = ProductQuantizer(n_bits=16, subspace_bits=4, random_state=0).fit(X)
    assert error(opq, X) <= error(pq, X) * 1.05  # no structure to exploit: about equal


def test_tables_and_codes_are_those_of_the_rotated_vectors():
    X = correlated(2000, 16, 2).astype(np.float32)
    opq = OPQ(n_bits=16, subspace_bits=4, n_iter=3, random_state=0).fit(X)
    Y = X @ opq.rotation_.astype(np.float32)
    np.testing.assert_array_equal(opq.transform(X), opq.pq_.transform(Y))
    np.testing.assert_allclose(opq.distance_tables(X[:5]), opq.pq_.distance_tables(Y[:5]),
                               rtol=1e-5, atol=1e-5)
    # Rotation preserves distances: the tables sum to the distance to the reconstruction.
    codes = opq.transform(X[:50])
    tables = opq.distance_tables(X[:5]).astype(np.float64)
    recon = opq.inverse_transform(codes)
    est = sum(tables[:, m, codes[:, m]] for m in range(4))
    true = ((X[:5, None].astype(np.float64) - recon[None]) ** 2).sum(2)
    np.testing.assert_allclose(est, true, rtol=1e-4, atol=1e-3)
    assert opq.cluster_centers_.shape == (4, 16, 4) and opq.n_codewords_ == 16


def test_opq_in_both_searchers_and_saved(tmp_path):
    X = correlated(3000, 16, 4).astype(np.float32)
    Q = correlated(40, 16, 5).astype(np.float32)
    exact = np.argsort(((Q[:, None] - X[None]) ** 2).sum(2), axis=1)[:, :10]

    def recall(ind):
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ind, exact)])

    opq = OPQ(n_bits=16, subspace_bits=4, n_iter=5, random_state=0)
    pq = ProductQuantizer(n_bits=16, subspace_bits=4, random_state=0)
    flat = QuantizedNeighbors(opq).fit(X)
    assert recall(flat.kneighbors(Q)[1]) > recall(QuantizedNeighbors(pq).fit(X).kneighbors(Q)[1])
    ivf = IVFQuantizedNeighbors(opq, n_lists=8, n_probe=8, random_state=0).fit(X)
    # Every cell probed: distances to the reconstructions (centroid + rotated-back residual).
    dist, ind = ivf.kneighbors(Q)
    rebuilt = ivf._reconstruct(np.arange(len(X))).astype(np.float64)
    true = np.sqrt(((Q[:, None].astype(np.float64) - rebuilt[None]) ** 2).sum(2))
    np.testing.assert_allclose(dist, np.take_along_axis(true, ind, axis=1), rtol=1e-3, atol=1e-3)
    for searcher in (flat, ivf):
        loaded = type(searcher).load(searcher.save(tmp_path / type(searcher).__name__))
        np.testing.assert_array_equal(loaded.kneighbors(Q)[1], searcher.kneighbors(Q)[1])
        np.testing.assert_array_equal(loaded.quantizer_.rotation_, searcher.quantizer_.rotation_)


def test_bad_settings():
    X = correlated(300, 8, 0)
    with pytest.raises(ValueError, match="multiple of subspace_bits"):
        OPQ(n_bits=10, subspace_bits=4).fit(X)
    with pytest.raises(ValueError, match="at least 2\\*\\*subspace_bits = 256"):
        OPQ(n_bits=16, subspace_bits=8).fit(X[:100])
    with pytest.raises(ValueError, match="n_features=8"):
        OPQ(n_bits=36, subspace_bits=2).fit(X)
