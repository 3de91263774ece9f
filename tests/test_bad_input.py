"""Bad and unusual input, for every public estimator and function.

Each case either works, and then gives exactly the result of the same data in
canonical form (a C-contiguous float64 ndarray), or raises ValueError /
TypeError with a message that says what was wrong. No case may crash the
process or reach a kernel with bad data.
"""

import re

import numpy as np
import pytest
from sklearn.base import clone
from sklearn_hash._kernels._adc import adc_kneighbors
from sklearn_hash._kernels._hamming import hamming_kneighbors

from sklearn_hash import (
    AGH,
    ITQ,
    DeepQuantizationNetwork,
    IVFQuantizedNeighbors,
    OPQ,
    ProductQuantizer,
    QuantizedNeighbors,
    SpectralHashing,
)
from sklearn_hash._dqn import _torch_available
from sklearn_hash.metrics import map_at_r_score

HAS_TORCH = _torch_available()  # the deep model is tested where its extra is installed

N, D = 80, 8
rng = np.random.default_rng(0)
X = rng.normal(size=(N, D)) + np.repeat(rng.normal(scale=3, size=(4, D)), N // 4, axis=0)
Y = np.repeat(np.arange(4), N // 4)

ESTIMATORS = {
    "SH": SpectralHashing(n_bits=8),
    "ITQ": ITQ(n_bits=6, random_state=0),
    "AGH": AGH(n_bits=6, n_anchors=10, random_state=0),
    "AGH-2": AGH(n_bits=6, n_anchors=10, n_layers=2, random_state=0),
    "PQ": ProductQuantizer(n_bits=8, subspace_bits=2, random_state=0),
    "QN-ITQ": QuantizedNeighbors(ITQ(n_bits=6, random_state=0), n_neighbors=5),
    "QN-PQ": QuantizedNeighbors(ProductQuantizer(n_bits=8, subspace_bits=2, random_state=0),
                                n_neighbors=5),
    "QN-IVF": IVFQuantizedNeighbors(ProductQuantizer(n_bits=8, subspace_bits=2, random_state=0),
                                    n_lists=4, n_probe=2, n_neighbors=5, random_state=0),
    "QN-IMI": IVFQuantizedNeighbors(ProductQuantizer(n_bits=8, subspace_bits=2, random_state=0),
                                    coarse="multi-index", n_lists=4, n_probe=2, n_neighbors=5,
                                    random_state=0),
}
if HAS_TORCH:
    ESTIMATORS["DQN"] = DeepQuantizationNetwork(
        n_bits=8, subspace_bits=2, embedding_dim=4, max_epochs=2, random_state=0)
    ESTIMATORS["QN-DQN"] = QuantizedNeighbors(clone(ESTIMATORS["DQN"]), n_neighbors=5)


def output(estimator, A):
    """What the estimator computes for queries A: codes, or neighbours and distances."""
    if hasattr(estimator, "kneighbors"):
        dist, ind = estimator.kneighbors(A)
        return np.concatenate([dist.astype(np.float64), ind.astype(np.float64)], axis=1)
    return estimator.transform(A)


def readonly_memmap(A, tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, A)
    return np.load(path, mmap_mode="r")


# Variants of the same data that must give the same result as the canonical
# float64 array ``canonical(X)``.
VARIANTS = {
    "list": (lambda A, tmp: A.tolist(), lambda A: A),
    "float16": (lambda A, tmp: A.astype(np.float16), lambda A: A.astype(np.float16).astype(float)),
    "int": (lambda A, tmp: np.round(A).astype(np.int32), lambda A: np.round(A)),
    "bool": (lambda A, tmp: A > 0, lambda A: (A > 0).astype(float)),
    "big-endian": (lambda A, tmp: A.astype(">f8"), lambda A: A),
    "non-contiguous": (lambda A, tmp: np.repeat(A, 2, axis=1)[:, ::2], lambda A: A),
    "fortran": (lambda A, tmp: np.asfortranarray(A), lambda A: A),
    "read-only memmap": (readonly_memmap, lambda A: A),
    "pandas": (lambda A, tmp: pytest.importorskip("pandas").DataFrame(A), lambda A: A),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ESTIMATORS)
def test_equivalent_inputs_give_the_canonical_result(name, variant, tmp_path):
    make, canonical = VARIANTS[variant]
    est = clone(ESTIMATORS[name])
    reference = clone(ESTIMATORS[name])
    try:
        expected = output(reference.fit(canonical(X), Y), canonical(X[:10]))
    except ValueError:
        # Degenerate canonical data (bool: 0/1 columns) may be refused; the
        # variant must then be refused the same way.
        with pytest.raises(ValueError):
            est.fit(make(X, tmp_path), Y)
        return
    got = output(est.fit(make(X, tmp_path), Y), make(X[:10], tmp_path))
    np.testing.assert_array_equal(got, expected)


def non_finite(value):
    A = X.copy()
    A[3, 2] = value
    return A


BAD_X = {
    "nan": (non_finite(np.nan), "Input X contains NaN"),
    "+inf": (non_finite(np.inf), "Input X contains infinity"),
    "-inf": (non_finite(-np.inf), "Input X contains infinity"),
    "empty": (np.empty((0, D)), "0 sample"),
    "1-D": (X[:, 0].copy(), "Expected 2D array"),
    "3-D": (X.reshape(N, 2, D // 2), "dim 3"),
    "strings": (np.full((N, D), "a"), "could not convert|dtype='numeric'|Unable to convert"),
    "complex": (X + 1j, "Complex data not supported"),
}


@pytest.mark.parametrize("case", BAD_X)
@pytest.mark.parametrize("name", ESTIMATORS)
def test_bad_x_in_fit(name, case):
    A, message = BAD_X[case]
    with pytest.raises((ValueError, TypeError), match=message):
        clone(ESTIMATORS[name]).fit(A, Y[: len(A)] if len(A) else Y[:0])


@pytest.mark.parametrize("case", [*BAD_X, "wrong n_features"])
@pytest.mark.parametrize("name", ESTIMATORS)
def test_bad_x_after_fit(name, case):
    est = clone(ESTIMATORS[name]).fit(X, Y)
    A, message = (X[:, :5], "X has 5 features, but .* is expecting 8 features") \
        if case == "wrong n_features" else BAD_X[case]
    method = est.kneighbors if hasattr(est, "kneighbors") else est.transform
    with pytest.raises((ValueError, TypeError), match=message):
        method(A)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_one_sample_is_refused_in_fit(name):
    with pytest.raises(ValueError, match="minimum of 2 is required"):
        clone(ESTIMATORS[name]).fit(X[:1], Y[:1])


@pytest.mark.parametrize("name", ESTIMATORS)
def test_one_sample_is_fine_after_fit(name):
    est = clone(ESTIMATORS[name]).fit(X, Y)
    one, batch = output(est, X[3:4]), output(est, X[:10])[3:4]
    if name == "QN-DQN":
        # The network's embedding comes from torch, whose matrix products round
        # differently with the batch size: the neighbours are the same, their
        # distances agree to float32 rounding.
        k = one.shape[1] // 2
        np.testing.assert_array_equal(one[:, k:], batch[:, k:])
        np.testing.assert_allclose(one[:, :k], batch[:, :k], rtol=1e-6)
    else:  # every query's tables are computed on their own: the same bits
        np.testing.assert_array_equal(one, batch)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_one_feature(name):
    """Works where one feature allows the code length, else names the limit."""
    est = clone(ESTIMATORS[name])
    try:
        est.fit(X[:, :1], Y)
    except ValueError as exc:
        assert any(word in str(exc) for word in ("n_bits", "subspace", "n_features")), exc
        return
    out = output(est, X[:10, :1])
    assert out.shape[0] == 10 and np.isfinite(out).all()


@pytest.mark.parametrize("name", [n for n in ESTIMATORS if not n.startswith("QN")])
@pytest.mark.parametrize("n_bits", [0, -3, 2.5, "8", None])
def test_bad_n_bits(name, n_bits):
    with pytest.raises((ValueError, TypeError), match="n_bits"):
        clone(ESTIMATORS[name]).set_params(n_bits=n_bits).fit(X, Y)


@pytest.mark.parametrize("name", ["ITQ", "AGH", "AGH-2", "PQ", "DQN"])
def test_n_bits_beyond_what_the_data_allows(name):
    if name not in ESTIMATORS:
        pytest.skip("needs torch")
    est = clone(ESTIMATORS[name]).set_params(n_bits={"PQ": 20, "DQN": 20}.get(name, 4096))
    with pytest.raises(ValueError, match="n_bits|embedding_dim|subspaces"):
        est.fit(X, Y)


@pytest.mark.parametrize("name", [n for n in ESTIMATORS if n.startswith("QN")])
@pytest.mark.parametrize(
    "n_neighbors, error, message",
    [
        (0, ValueError, "Expected n_neighbors > 0"),
        (-1, ValueError, "Expected n_neighbors > 0"),
        (N + 1, ValueError, "Expected n_neighbors <= n_samples_fit"),
        (2.0, TypeError, "n_neighbors does not take"),
        (True, TypeError, "n_neighbors does not take"),
    ],
)
def test_bad_n_neighbors(name, n_neighbors, error, message):
    est = clone(ESTIMATORS[name]).fit(X, Y)
    with pytest.raises(error, match=message):
        est.kneighbors(X[:3], n_neighbors=n_neighbors)


@pytest.mark.parametrize("name", [n for n in ESTIMATORS if n.startswith("QN")])
def test_n_neighbors_equal_to_the_database(name):
    est = clone(ESTIMATORS[name]).fit(X, Y)
    ind = est.kneighbors(X[:3], n_neighbors=N, return_distance=False)
    np.testing.assert_array_equal(np.sort(ind, axis=1), np.tile(np.arange(N), (3, 1)))
    with pytest.raises(ValueError, match="n_neighbors <= n_samples_fit"):
        est.kneighbors(None, n_neighbors=N)  # leaving itself out, only N - 1 remain


@pytest.mark.parametrize("name", [n for n in ESTIMATORS if n.startswith("QN")])
def test_labels_of_the_wrong_length(name):
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        clone(ESTIMATORS[name]).fit(X, Y[:-1])
    est = clone(ESTIMATORS[name]).fit(X, Y)
    with pytest.raises(ValueError, match="neighbors has 10 rows but y_query has 9 queries"):
        est.score(X[:10], Y[:9])


def test_score_without_database_labels():
    est = QuantizedNeighbors(ITQ(n_bits=4)).fit(X)
    with pytest.raises(ValueError, match="fit QuantizedNeighbors with y"):
        est.score(X[:5], Y[:5])


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_all_unlabelled_y_for_the_deep_model():
    with pytest.raises(ValueError, match="at least 2 labelled rows .* got 0 labelled"):
        clone(ESTIMATORS["DQN"]).fit(X, np.full(N, -1))


def test_unfitted_use_is_refused():
    from sklearn.exceptions import NotFittedError

    for name, est in ESTIMATORS.items():
        est = clone(est)
        method = est.kneighbors if name.startswith("QN") else est.transform
        with pytest.raises(NotFittedError):
            method(X)


# ---------------------------------------------------------------- map_at_r_score

NEIGHBORS = np.tile(np.arange(5), (4, 1))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(y_query=Y[:3]), ValueError, "inconsistent|same length|3"),
        (dict(y_database=Y[:3]), ValueError, "index|out of range|y_database"),
        (dict(neighbors=NEIGHBORS + 100), ValueError, r"indices in \[0, 79\].*\[100, 104\]"),
        (dict(neighbors=NEIGHBORS - 1), ValueError, r"indices in \[0, 79\].*\[-1, 3\]"),
        (dict(neighbors=NEIGHBORS.astype(float) + 0.5), (ValueError, TypeError), "integer"),
        (dict(neighbors=NEIGHBORS[:, :, None]), ValueError, "dim 3"),
        (dict(R=0), ValueError, "'R' parameter"),
        (dict(R=6), ValueError, "R"),
        (dict(y_query=np.full((4, 2, 2), 1)), ValueError, "dim 3"),
    ],
)
def test_map_at_r_bad_input(kwargs, error, message):
    args = dict(y_query=Y[:4], y_database=Y, neighbors=NEIGHBORS)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        map_at_r_score(args["y_query"], args["y_database"], args["neighbors"],
                       R=args.get("R"))


@pytest.mark.parametrize("variant", ["list", "pandas", "int32 neighbours", "strings"])
def test_map_at_r_equivalent_inputs(variant):
    expected = map_at_r_score(Y[:4], Y, NEIGHBORS)
    if variant == "list":
        got = map_at_r_score(Y[:4].tolist(), Y.tolist(), NEIGHBORS.tolist())
    elif variant == "pandas":
        pd = pytest.importorskip("pandas")
        got = map_at_r_score(pd.Series(Y[:4]), pd.Series(Y), pd.DataFrame(NEIGHBORS))
    elif variant == "int32 neighbours":
        got = map_at_r_score(Y[:4], Y, NEIGHBORS.astype(np.int32))
    else:
        names = np.array(["dog", "cat", "rain", "bird"])
        got = map_at_r_score(names[Y[:4]], names[Y], NEIGHBORS)
    assert got == expected


# ---------------------------------------------------------------- kernels called directly


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: hamming_kneighbors(np.zeros((2, 1), np.uint64), np.zeros((5, 2), np.uint64), 1),
         ValueError, "words"),
        (lambda: hamming_kneighbors(np.zeros((2, 1), np.uint64), np.zeros((5, 1), np.uint64), 1,
                                    allowed=np.ones(4, np.uint8)),
         ValueError, "allowed must have one entry per database row"),
        (lambda: hamming_kneighbors(np.zeros((2, 1), np.uint64), np.zeros((5, 1), np.uint64), 1,
                                    exclude=np.zeros(3, np.int64)),
         ValueError, "exclude must have one entry per query"),
        (lambda: hamming_kneighbors(np.zeros((2, 1), np.uint64), np.zeros((5, 1), np.uint64), -1),
         ValueError, "k"),
        (lambda: hamming_kneighbors(np.zeros((2, 1), np.int64), np.zeros((5, 1), np.uint64), 1),
         ValueError, "dtype|Buffer"),
        (lambda: hamming_kneighbors(np.zeros((2, 2), np.uint64)[:, ::2],
                                    np.zeros((5, 1), np.uint64), 1),
         ValueError, "contiguous"),
        (lambda: adc_kneighbors(np.zeros((1, 2, 4), np.float32), np.zeros((5, 3), np.uint8), 1),
         ValueError, "subspaces"),
        (lambda: adc_kneighbors(np.zeros((1, 2, 4), np.float32),
                                np.full((5, 2), 4, np.uint8), 1),
         ValueError, "codeword"),
        (lambda: adc_kneighbors(np.zeros((1, 2, 4), np.float64), np.zeros((5, 2), np.uint8), 1),
         ValueError, "dtype|Buffer"),
        (lambda: adc_kneighbors(np.zeros((1, 2, 4), np.float32), np.zeros((5, 2), np.uint8), -1),
         ValueError, "k must be"),
        (lambda: adc_kneighbors(np.zeros((1, 2, 4), np.float32), np.zeros((5, 2), np.uint8), 1,
                                allowed=np.ones(6, np.uint8)),
         ValueError, "allowed must have one entry per database row"),
        (lambda: adc_kneighbors(np.zeros((1, 2, 4), np.float32), np.zeros((5, 2), np.uint8), 1,
                                n_threads=0),
         ValueError, "n_threads"),
    ],
)
def test_kernels_refuse_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("make", [
    lambda X: X.astype(np.float32),                      # the fast path
    lambda X: X,                                         # float64, the fast path
    lambda X: np.asfortranarray(X),                      # not C-contiguous
    lambda X: X.tolist(),                                # a list
    lambda X: np.round(X * 10).astype(np.int64),         # integers
    lambda X: X[:, :D - 1],                              # a feature short
    lambda X: X[:0],                                     # no row
    lambda X: np.where(np.arange(D) == 3, np.nan, X),    # NaN
    lambda X: np.where(np.arange(D) == 3, np.inf, X).astype(np.float32),
    lambda X: X[0],                                      # 1-D
])
def test_validate_features_returns_or_raises_what_validate_data_does(make):
    from sklearn.utils.validation import validate_data
    from sklearn_hash._base import validate_features

    pq = ProductQuantizer(8, subspace_bits=4, random_state=0).fit(X)
    A = make(X[:5])
    try:
        expected = validate_data(pq, A, dtype=[np.float64, np.float32], order="C", reset=False)
    except ValueError as exc:
        with pytest.raises(ValueError, match=re.escape(str(exc)[:40])):
            validate_features(pq, A)
        return
    got = validate_features(pq, A)
    assert got.dtype == expected.dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("make", [
    lambda: ProductQuantizer(32, subspace_bits=4, random_state=0),
    lambda: OPQ(32, subspace_bits=4, random_state=0),
    lambda: IVFQuantizedNeighbors(ProductQuantizer(32, subspace_bits=4, random_state=0),
                                  n_lists=8, random_state=0),
    lambda: IVFQuantizedNeighbors(ProductQuantizer(32, subspace_bits=4, random_state=0),
                                  n_lists=4, coarse="multi-index", random_state=0),
], ids=["pq", "opq", "ivf", "multi-index"])
def test_values_whose_squares_overflow_are_refused(make):
    # finite float32 values of magnitude 1e20 passed validation: PQ's k-means put every
    # row on one codeword, and the inverted file returned NaN distances with arbitrary ids
    X = np.random.RandomState(0).randn(300, 16).astype(np.float32)
    huge = X * np.float32(1e20)
    with pytest.raises(ValueError, match="too large for float32 distances"):
        make().fit(huge)
    fitted = make().fit(X)
    if hasattr(fitted, "kneighbors"):
        with pytest.raises(ValueError, match="too large for float32 distances"):
            fitted.add(huge[:3])
        with pytest.raises(ValueError, match="queries to the index overflow float32"):
            fitted.kneighbors(huge[:3])
        assert np.isfinite(fitted.kneighbors(X[:3] * np.float32(1e15))[0]).all()
    else:
        with pytest.raises(ValueError, match="too large for float32 distances"):
            fitted.transform(huge[:3])
        big = X * np.float32(1e15)  # large, but its squares fit: codes as on X
        np.testing.assert_array_equal(make().fit(big).transform(big), make().fit(X).transform(X))


@pytest.mark.parametrize("make", [lambda: ITQ(8, random_state=0), lambda: SpectralHashing(8),
                                  lambda: AGH(8, n_anchors=20, random_state=0)],
                         ids=["itq", "sh", "agh"])
def test_binary_hashers_refuse_values_whose_squares_overflow(make):
    # ITQ and SH failed in the eigensolver ("Eigenvalues did not converge")
    X = np.random.RandomState(0).randn(300, 16).astype(np.float32)
    with pytest.raises(ValueError, match="too large for float32 distances"):
        make().fit(X * np.float32(1e20))
    # each row's squares fit, their sum over the rows does not: ITQ's bits agreed with
    # the unscaled data's for 58% only, silently
    with pytest.raises(ValueError, match="too large for float32 sums"):
        make().fit(X * np.float32(1e18))
    codes = make().fit(X).transform(X)
    np.testing.assert_array_equal(make().fit(X * np.float32(1e17)).transform(
        X * np.float32(1e17)), codes)


def test_agh_on_identical_rows_says_what_is_wrong():
    # it suggested "n_bits <= 0", which is not a setting
    with pytest.raises(ValueError, match="rows are too alike"):
        AGH(8, n_anchors=20).fit(np.ones((300, 16)))


def test_spectral_hashing_refuses_absurd_code_lengths():
    # n_bits=10**10 failed for memory (58.9 GiB) in the mode enumeration
    X = np.random.RandomState(0).randn(300, 16)
    with pytest.raises(ValueError, match="at most 65,536 bits; got n_bits=10000000000"):
        SpectralHashing(n_bits=10**10).fit(X)
    assert SpectralHashing(n_bits=2**16).fit(X).transform(X[:2]).shape == (2, 2**16)


@pytest.mark.parametrize("searcher, changed", [
    (IVFQuantizedNeighbors(ProductQuantizer(n_bits=8, random_state=0), n_lists=4,
                           refine_factor=2), {"n_probe": 0}),  # ran as "enough cells for k"
    (IVFQuantizedNeighbors(ProductQuantizer(n_bits=8, random_state=0), n_lists=4,
                           refine_factor=2), {"n_probe": 2.5}),  # numpy's own TypeError
    (IVFQuantizedNeighbors(ProductQuantizer(n_bits=8, random_state=0), n_lists=4,
                           refine_factor=2), {"refine_factor": 0}),
    (QuantizedNeighbors(ProductQuantizer(n_bits=8, random_state=0), refine_factor=2),
     {"refine_factor": -1}),
])
def test_search_settings_set_after_fit_are_checked_by_the_search(searcher, changed):
    X = np.random.default_rng(0).standard_normal((600, 8))
    search = clone(searcher).fit(X).set_params(**changed)
    name = next(iter(changed))
    with pytest.raises(ValueError, match=f"The '{name}' parameter of {type(searcher).__name__} "
                                         f"must be an int in the range"):
        search.kneighbors(X[:2])
    search.set_params(**{name: np.int64(2)})  # a numpy integer is an integer
    assert search.kneighbors(X[:2], n_neighbors=3)[1].shape == (2, 3)
