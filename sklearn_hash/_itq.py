"""Iterative Quantization (ITQ), Gong and Lazebnik (2011)."""

from numbers import Integral

import numpy as np
from sklearn.base import _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import validate_data

from ._base import BaseBinaryHasher, fit_pca


class ITQ(BaseBinaryHasher):
    """Iterative Quantization: PCA followed by a learned rotation.

    The data are centred on the training mean and projected on their first
    ``n_bits`` principal components. Starting from a random orthogonal
    matrix, ITQ then alternates ``n_iter`` times between the binary codes
    ``B = sign(V R)`` and the rotation ``R`` that best aligns the projected
    data ``V`` with them (the orthogonal Procrustes problem, solved by an SVD
    of ``B^T V``). A bit is 1 where the rotated projection is ``>= 0``.

    Read more in the :ref:`User Guide <binary_hashing>`.

    Parameters
    ----------
    n_bits : int, default=32
        Length of the binary codes. At most ``min(n_samples, n_features)`` of
        the training data, since each bit is one principal direction.
    n_iter : int, default=50
        Alternating iterations. ``0`` keeps the random rotation.
    random_state : int, RandomState instance or None, default=None
        Seeds the random initial rotation.

    Attributes
    ----------
    mean_ : ndarray of shape (n_features,)
        Training mean subtracted before projection.
    components_ : ndarray of shape (n_bits, n_features)
        Principal directions, one per row.
    rotation_ : ndarray of shape (n_bits, n_bits)
        The learned orthogonal rotation.
    loss_curve_ : ndarray of shape (n_iter + 1,)
        Quantization loss ``||B - V R||_F^2 / n_samples`` at the initial
        rotation and after each iteration; it never increases.
    n_features_in_ : int
        Number of features seen during ``fit``.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during ``fit``. Defined only when `X`
        has feature names that are all strings.

    See Also
    --------
    SpectralHashing : Binary codes from sinusoidal eigenfunctions.
    AGH : Binary codes from an anchor graph.
    QuantizedNeighbors : Nearest-neighbour search over the codes.

    References
    ----------
    .. [1] Y. Gong and S. Lazebnik, "Iterative Quantization: A Procrustean
       Approach to Learning Binary Codes", CVPR 2011.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from sklearn_hash import ITQ
    >>> X, _ = load_digits(return_X_y=True)
    >>> itq = ITQ(n_bits=16, random_state=0).fit(X)
    >>> codes = itq.transform(X[:3])
    >>> codes.shape, codes.dtype
    ((3, 16), dtype('uint8'))
    >>> bool(itq.loss_curve_[-1] <= itq.loss_curve_[0])
    True
    """

    _parameter_constraints: dict = {
        **BaseBinaryHasher._parameter_constraints,
        "n_iter": [Interval(Integral, 0, None, closed="left")],
        "random_state": ["random_state"],
    }

    def __init__(self, n_bits=32, *, n_iter=50, random_state=None):
        self.n_bits = n_bits
        self.n_iter = n_iter
        self.random_state = random_state

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Learn the projection and rotation from X.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training vectors.
        y : None
            Ignored.

        Returns
        -------
        self : ITQ
            Fitted hasher.
        """
        X = validate_data(self, X, dtype=[np.float64, np.float32], order="C", ensure_min_samples=2)
        n_samples, n_features = X.shape
        if self.n_bits > min(n_samples, n_features):
            raise ValueError(
                f"ITQ needs n_bits <= min(n_samples, n_features) because each bit "
                f"is a principal direction; got n_bits={self.n_bits} with "
                f"n_samples={n_samples}, n_features={n_features}."
            )
        rng = check_random_state(self.random_state)
        pca = fit_pca(X, self.n_bits)
        self.mean_ = pca.mean_
        self.components_ = pca.components_
        V = (X - self.mean_) @ self.components_.T

        # Random orthogonal start: Q of the QR decomposition of a Gaussian matrix.
        R, _ = np.linalg.qr(rng.standard_normal((self.n_bits, self.n_bits)))
        losses = []
        for _ in range(self.n_iter):
            VR = V @ R
            B = np.where(VR >= 0, 1.0, -1.0)
            losses.append(np.sum((B - VR) ** 2) / n_samples)
            # Orthogonal Procrustes: R maximising trace(B^T V R) is W U^T
            # for the SVD B^T V = U S W^T (numpy returns W^T).
            U, _, Wt = np.linalg.svd(B.T @ V)
            R = Wt.T @ U.T
        VR = V @ R
        losses.append(np.sum((np.where(VR >= 0, 1.0, -1.0) - VR) ** 2) / n_samples)
        self.rotation_ = R
        self.loss_curve_ = np.asarray(losses)
        return self

    def _hash(self, X):
        return ((X - self.mean_) @ self.components_.T) @ self.rotation_ >= 0
