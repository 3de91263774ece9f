"""Spectral Hashing (SH), Weiss, Torralba and Fergus (2008)."""

import numpy as np
from sklearn.base import _fit_context
from sklearn.utils.validation import validate_data

from ._base import BaseBinaryHasher, fit_pca


# The longest codes: the candidate modes take n_components * (n_bits + 1) integers.
_MAX_BITS = 2**16


class SpectralHashing(BaseBinaryHasher):
    """Spectral Hashing: thresholded eigenfunctions of a uniform box.

    The data are projected on their first ``min(n_bits, n_features)``
    principal components, and the projections are assumed uniform inside the
    training box ``[min, max]`` of each component. The eigenfunctions of the
    Laplacian on that box are sinusoids; the ``n_bits`` one-dimensional modes
    with the smallest eigenvalues ``omega^2`` (constant mode excluded, ties
    broken stably by component then mode order) become the bits::

        bit = sin(pi / 2 + omega * (x_component - box_min)) > 0

    A long component can thus give several bits at increasing frequencies,
    so ``n_bits`` may exceed ``n_features``. The box bounds are kept from
    training and reused for queries.

    Read more in the :ref:`User Guide <binary_hashing>`.

    Parameters
    ----------
    n_bits : int, default=32
        Length of the binary codes, at most 65,536 (the candidate modes take
        ``n_components * (n_bits + 1)`` integers).

    Attributes
    ----------
    mean_ : ndarray of shape (n_features,)
        Training mean subtracted before projection.
    components_ : ndarray of shape (n_components, n_features)
        Principal directions, ``n_components = min(n_bits, n_features,
        n_samples)``.
    box_min_ : ndarray of shape (n_components,)
        Lower bound of the training box along each component.
    box_max_ : ndarray of shape (n_components,)
        Upper bound of the training box along each component.
    modes_ : ndarray of shape (n_bits, n_components), dtype=int
        Mode number of each bit along each component (one non-zero per row).
    bit_components_ : ndarray of shape (n_bits,), dtype=int
        Component each bit thresholds.
    omegas_ : ndarray of shape (n_bits,)
        Angular frequency of each bit, ``mode * pi / (box_max - box_min)``.
    n_features_in_ : int
        Number of features seen during ``fit``.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during ``fit``. Defined only when `X`
        has feature names that are all strings.

    See Also
    --------
    ITQ : PCA with a learned rotation.
    AGH : Binary codes from an anchor graph.

    References
    ----------
    .. [1] Y. Weiss, A. Torralba and R. Fergus, "Spectral Hashing",
       NeurIPS 2008.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from sklearn_hash import SpectralHashing
    >>> X, _ = load_digits(return_X_y=True)
    >>> sh = SpectralHashing(n_bits=16).fit(X)
    >>> sh.transform(X[:2]).shape
    (2, 16)
    """

    def __init__(self, n_bits=32):
        self.n_bits = n_bits

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Learn the principal box and the frequency of each bit from X.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training vectors.
        y : None
            Ignored.

        Returns
        -------
        self : SpectralHashing
            Fitted hasher.
        """
        if self.n_bits > _MAX_BITS:  # n_bits=10**10 failed for memory
            raise ValueError(f"SpectralHashing makes codes of at most {_MAX_BITS:,} bits; got "
                             f"n_bits={self.n_bits}.")
        X = validate_data(self, X, dtype=[np.float64, np.float32], order="C", ensure_min_samples=2)
        n_samples, n_features = X.shape
        n_components = min(self.n_bits, n_features, n_samples)
        pca = fit_pca(X, n_components)
        self.mean_ = pca.mean_
        self.components_ = pca.components_
        projected = (X - self.mean_) @ self.components_.T

        eps = np.finfo(np.float64).eps
        self.box_min_ = projected.min(axis=0) - eps
        self.box_max_ = projected.max(axis=0) + eps
        ranges = np.maximum(self.box_max_ - self.box_min_, np.finfo(np.float64).tiny)

        # Modes 1 .. max_mode - 1 along each component: the longest component
        # alone offers n_bits of them, so there are always enough.
        max_mode = np.ceil((self.n_bits + 1) * ranges / ranges.max()).astype(int)
        components = np.concatenate([np.full(m - 1, i) for i, m in enumerate(max_mode)])
        modes = np.concatenate([np.arange(1, m) for m in max_mode])
        omegas = modes * np.pi / ranges[components]
        # Eigenvalue order (smallest omega^2 first); stable on ties.
        order = np.argsort(omegas**2, kind="stable")[: self.n_bits]

        self.bit_components_ = components[order]
        self.omegas_ = omegas[order]
        self.modes_ = np.zeros((self.n_bits, n_components), dtype=int)
        self.modes_[np.arange(self.n_bits), self.bit_components_] = modes[order]
        return self

    def _hash(self, X):
        projected = (X - self.mean_) @ self.components_.T
        shifted = projected[:, self.bit_components_] - self.box_min_[self.bit_components_]
        return np.sin(np.pi / 2 + shifted * self.omegas_) > 0
