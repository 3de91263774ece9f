"""What every binary hasher shares: validation, the 0/1 ``transform`` and tags."""

from abc import abstractmethod
from contextlib import nullcontext
from numbers import Integral

import numpy as np
from sklearn import config_context, get_config
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
)
from sklearn.decomposition import PCA
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted, validate_data


class BaseBinaryHasher(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Base class for hashers whose codes are ``n_bits`` binary digits.

    A subclass implements ``fit`` and ``_hash(X)``, which maps a validated
    float array to an ``(n_samples, n_bits)`` boolean array. ``transform``
    returns those bits as ``uint8`` 0/1 values, one column per bit, and
    :class:`~sklearn_hash.QuantizedNeighbors` searches them by Hamming
    distance.
    """

    _parameter_constraints: dict = {
        "n_bits": [Interval(Integral, 1, None, closed="left")],
    }

    def transform(self, X):
        """Encode X as binary codes.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Vectors to encode.

        Returns
        -------
        codes : ndarray of shape (n_samples, n_bits), dtype=uint8
            One 0/1 column per bit.
        """
        check_fitted(self)
        X = validate_features(self, X)
        return self._hash(X).astype(np.uint8)

    @abstractmethod
    def _hash(self, X):
        """Boolean array of shape (n_samples, n_bits) for validated X."""

    @property
    def _n_features_out(self):
        return self.n_bits

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = []
        return tags


def numpy_output():
    """``config_context(transform_output="default")``: inner transforms return arrays.

    A null context when that is the setting already: entering a scikit-learn
    config context costs ~5 us, a one-query search pays it on every call.
    """
    if get_config()["transform_output"] == "default":
        return nullcontext()
    return config_context(transform_output="default")


def check_fitted(estimator):
    """``check_is_fitted(estimator)``, answered at once when ``n_features_in_`` is set.

    Every estimator here sets ``n_features_in_`` in ``fit`` (and none
    defines ``__sklearn_is_fitted__``), so its presence means fitted;
    ``check_is_fitted`` itself scans the attributes, ~10 us a call, more
    than encoding one query.
    """
    if "n_features_in_" not in estimator.__dict__:
        check_is_fitted(estimator)


def check_magnitude(X, total=False):
    """Refuse rows whose squared norm overflows X's dtype: their distances would too.

    Finite values can still be too large: float32 rows of magnitude 1e20
    passed validation, and k-means then put every row on one codeword.
    With ``total``, the sum of all rows' squares must not overflow either
    (PCA's covariance and k-means++'s potential add them up).
    """
    with np.errstate(over="ignore"):
        squares = np.einsum("ij,ij->i", X, X)
        summed = squares.sum()  # inf when a row's is
    if not np.isfinite(summed):
        overflows = ~np.isfinite(squares)
        if overflows.any():
            row = int(np.flatnonzero(overflows)[0])
            raise ValueError(f"X holds values too large for {X.dtype} distances: the squared "
                             f"norm of row {row} overflows (its largest magnitude is "
                             f"{np.abs(X[row]).max():.3g}). Scale the data down.")
        if total:
            raise ValueError(f"X holds values too large for {X.dtype} sums: the squares of "
                             f"all rows add up past {np.finfo(X.dtype).max:.3g} (the largest "
                             f"magnitude is {np.abs(X).max():.3g}). Scale the data down.")
    return X


def validate_features(estimator, X):
    """``validate_data`` of a fitted estimator's input, with a fast path for plain arrays.

    Returns what ``validate_data(estimator, X, dtype=[np.float64, np.float32],
    order="C", reset=False)`` returns, and raises what it raises. A
    C-contiguous 2-D float32/float64 ndarray of the fitted width, with at
    least one row and all finite, is returned unchanged after checking that
    directly: ``validate_data`` costs ~50-100 us a call, more than a query's
    search.
    """
    if (type(X) is np.ndarray and X.ndim == 2 and X.dtype in (np.float32, np.float64)
            and X.flags.c_contiguous and X.shape[0] >= 1
            and X.shape[1] == getattr(estimator, "n_features_in_", None)
            and not hasattr(estimator, "feature_names_in_")
            and np.isfinite(X).all()):
        return X
    return validate_data(estimator, X, dtype=[np.float64, np.float32], order="C", reset=False)


def fit_pca(X, n_components):
    """PCA fitted on X with a solver suited to its shape (exact, not randomised)."""
    check_magnitude(X, total=True)  # an overflowing covariance: wrong bits, or no convergence
    n_samples, n_features = X.shape
    solver = "covariance_eigh" if n_samples >= n_features else "full"
    return PCA(n_components=n_components, svd_solver=solver).fit(X)
