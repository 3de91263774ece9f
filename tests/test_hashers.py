"""SH, ITQ and AGH by their properties."""

import numpy as np
import pytest
from sklearn.datasets import make_blobs

from sklearn_hash import AGH, ITQ, QuantizedNeighbors, SpectralHashing

HASHERS = {
    "SH": lambda n_bits: SpectralHashing(n_bits),
    "ITQ": lambda n_bits: ITQ(n_bits, random_state=0),
    "AGH": lambda n_bits: AGH(n_bits, n_anchors=100, random_state=0),
    "AGH-2": lambda n_bits: AGH(n_bits, n_anchors=100, n_layers=2, random_state=0),
}


@pytest.fixture(scope="module")
def blobs():
    X, y = make_blobs(n_samples=600, n_features=10, centers=8, random_state=0)
    return X, y


@pytest.mark.parametrize("name", HASHERS)
def test_codes_are_binary_and_fit_transform_matches(name, blobs):
    X, _ = blobs
    hasher = HASHERS[name](8)
    codes = hasher.fit_transform(X)
    assert codes.dtype == np.uint8 and codes.shape == (600, 8)
    assert set(np.unique(codes)) <= {0, 1}
    np.testing.assert_array_equal(codes, HASHERS[name](8).fit(X).transform(X))


@pytest.mark.parametrize("name", HASHERS)
def test_deterministic_under_random_state(name, blobs):
    X, _ = blobs
    np.testing.assert_array_equal(
        HASHERS[name](8).fit(X).transform(X), HASHERS[name](8).fit(X).transform(X)
    )


@pytest.mark.parametrize("name", ["SH", "AGH", "AGH-2", "ITQ"])
def test_bits_are_balanced_on_blobs(name, blobs):
    X, _ = blobs
    codes = HASHERS[name](8).fit_transform(X)
    # No bit is (nearly) constant: every bit splits the data.
    assert codes.mean(axis=0).min() > 0.1 and codes.mean(axis=0).max() < 0.9
    # Bits of the first layer (all bits but AGH-2's second half) split the
    # data close to evenly on average; second-layer bits split each half again.
    first_layer = codes[:, :4] if name == "AGH-2" else codes
    assert abs(first_layer.mean() - 0.5) < 0.15


def test_itq_loss_falls_and_beats_random_rotation(digits_split):
    X = digits_split[0]
    itq = ITQ(n_bits=32, n_iter=50, random_state=0).fit(X)
    assert np.all(np.diff(itq.loss_curve_) <= 1e-9)
    assert itq.loss_curve_[-1] < itq.loss_curve_[0] - 0.5
    random_rotation = ITQ(n_bits=32, n_iter=0, random_state=0).fit(X)
    assert random_rotation.loss_curve_.shape == (1,)
    assert itq.loss_curve_[-1] < random_rotation.loss_curve_[0]
    np.testing.assert_allclose(itq.rotation_ @ itq.rotation_.T, np.eye(32), atol=1e-10)


def test_itq_quantization_loss_is_recomputable(digits_split):
    X = digits_split[0]
    itq = ITQ(n_bits=16, n_iter=10, random_state=0).fit(X)
    V = (X - itq.mean_) @ itq.components_.T @ itq.rotation_
    B = np.where(V >= 0, 1.0, -1.0)
    assert itq.loss_curve_[-1] == pytest.approx(np.sum((B - V) ** 2) / X.shape[0])
    np.testing.assert_array_equal(itq.transform(X), (V >= 0).astype(np.uint8))


def test_spectral_hashing_modes_follow_the_reference():
    # Two components of lengths 5 and 2: frequencies pi/5 * (1, 2, 3) along
    # the first and pi/2 along the second, so with 4 bits the modes by
    # increasing frequency are (1, 0), (2, 0), (0, 1), (3, 0).
    rng = np.random.default_rng(0)
    X = np.column_stack([rng.uniform(-2.5, 2.5, 5000), rng.uniform(-1, 1, 5000)])
    sh = SpectralHashing(n_bits=4).fit(X)
    assert sh.components_.shape == (2, 2)
    np.testing.assert_array_equal(sh.bit_components_, [0, 0, 1, 0])
    np.testing.assert_array_equal(sh.modes_, [[1, 0], [2, 0], [0, 1], [3, 0]])
    ranges = sh.box_max_ - sh.box_min_
    np.testing.assert_allclose(sh.omegas_, np.pi * np.array([1, 2, 1, 3]) / ranges[[0, 0, 1, 0]])
    # The first bit halves the longest component at its middle.
    projected = (X - sh.mean_) @ sh.components_.T
    middle = (sh.box_min_[0] + sh.box_max_[0]) / 2
    expected = np.sin(np.pi / 2 + sh.omegas_[0] * (projected[:, 0] - sh.box_min_[0])) > 0
    np.testing.assert_array_equal(sh.transform(X)[:, 0], expected)
    np.testing.assert_array_equal(expected, projected[:, 0] < middle)


def test_spectral_hashing_allows_more_bits_than_features():
    X, _ = make_blobs(n_samples=200, n_features=3, random_state=0)
    codes = SpectralHashing(n_bits=10).fit_transform(X)
    assert codes.shape == (200, 10)


def test_agh_eigenfunctions_are_orthogonal_on_training_data(blobs):
    X, _ = blobs
    agh = AGH(n_bits=6, n_anchors=60, random_state=0).fit(X)
    sq, nearest = agh._nearest_anchors(X)
    Y = agh._anchor_weights(sq, nearest) @ agh.projection_
    # Y^T Y / n = I: the eigenvectors of the anchor graph, scaled to norm sqrt(n).
    np.testing.assert_allclose(Y.T @ Y / X.shape[0], np.eye(6), atol=1e-6)
    assert np.all((agh.eigenvalues_ > 0) & (agh.eigenvalues_ < 1))
    assert np.all(np.diff(agh.eigenvalues_) <= 0)


def test_two_layer_agh_codes_extend_the_one_layer_codes(blobs):
    X, _ = blobs
    one = AGH(n_bits=4, n_anchors=60, random_state=0).fit(X)
    two = AGH(n_bits=8, n_anchors=60, n_layers=2, random_state=0).fit(X)
    np.testing.assert_array_equal(two.transform(X)[:, :4], one.transform(X))
    assert two.thresholds_.shape == (2, 4)


def test_two_layer_thresholds_match_a_dense_oracle(blobs):
    # The closed form of Liu et al. (2011), computed with dense matrices:
    # b+ = (2 s3 + n2 (s3 - s1) / s2) / n, b- = (n1 (s3 - s1) / s2 - 2 s3) / n.
    X, _ = blobs
    agh = AGH(n_bits=8, n_anchors=60, n_layers=2, random_state=0).fit(X)
    sq, nearest = agh._nearest_anchors(X)
    Z = agh._anchor_weights(sq, nearest).toarray()
    Y = Z @ agh.projection_
    lam = Z.sum(axis=0)
    n = X.shape[0]
    for k in range(4):
        pos = Y[:, k] > 0
        n1, n2 = pos.sum(), n - pos.sum()
        right = (np.abs(Y[:, k]) @ Z) / lam
        left = Z[pos].sum(axis=0)
        s1, s2, s3 = left @ right, n1 - left @ (left / lam), Y[pos, k].sum()
        assert agh.thresholds_[0, k] == pytest.approx((2 * s3 + n2 * (s3 - s1) / s2) / n)
        assert agh.thresholds_[1, k] == pytest.approx((n1 * (s3 - s1) / s2 - 2 * s3) / n)
    second = np.where(Y > 0, Y - agh.thresholds_[0], -Y + agh.thresholds_[1]) > 0
    np.testing.assert_array_equal(agh.transform(X)[:, 4:], second)


@pytest.mark.parametrize(
    "hasher, match",
    [
        (ITQ(n_bits=11), "n_bits <= min"),
        (AGH(n_bits=4, n_anchors=700), "n_anchors <= n_samples"),
        (AGH(n_bits=5, n_anchors=20, n_layers=2), "must be even"),
        (AGH(n_bits=30, n_anchors=20), "non-trivial eigenvectors"),
        (AGH(n_bits=4, n_anchors=20, n_nearest_anchors=21), "n_nearest_anchors must be"),
    ],
)
def test_infeasible_settings_raise(hasher, match, blobs):
    X, _ = blobs
    with pytest.raises(ValueError, match=match):
        hasher.fit(X)


@pytest.mark.parametrize(
    "name, n_bits",
    # SH's high-frequency modes make it lose to random hyperplanes at long
    # codes (as in the ITQ paper's comparisons); it is compared at 16 bits.
    [("SH", 16), ("ITQ", 32), ("AGH", 32), ("AGH-2", 32)],
)
def test_beats_random_hyperplanes_on_digits(name, n_bits, digits_split, random_hyperplanes_map):
    X_db, y_db, X_q, y_q = digits_split
    search = QuantizedNeighbors(HASHERS[name](n_bits), n_neighbors=100).fit(X_db, y_db)
    baseline = random_hyperplanes_map(X_db, y_db, X_q, y_q, n_bits, R=100)
    assert search.score(X_q, y_q) > baseline + 0.05
