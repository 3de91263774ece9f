"""Anchor Graph Hashing (AGH), Liu, Wang, Kumar and Chang (2011)."""

from numbers import Integral

import numpy as np
from scipy import sparse
from sklearn.base import _fit_context
from sklearn.cluster import kmeans_plusplus
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval
from sklearn.utils.extmath import row_norms
from sklearn.utils.validation import validate_data

from ._base import BaseBinaryHasher, check_magnitude
from ._kernels._openmp import effective_n_threads
from ._kmeans import kmeans, training_rows

# Lloyd iterations for the k-means anchors (the reference uses 5: anchors
# need only cover the data, not converge).
_KMEANS_ITER = 5
# Eigenvalues kept: strictly inside (0, 1), away from the trivial value 1.
_EIG_LOW, _EIG_HIGH = 1e-8, 1.0 - 1e-3
# Rows per chunk when computing distances to the anchors.
_CHUNK = 8192


class AGH(BaseBinaryHasher):
    """Anchor Graph Hashing: spectral hashing on a low-rank anchor graph.

    ``n_anchors`` anchors are found by k-means (k-means++ seeding, then
    a few Lloyd iterations of the package's k-means, whose result does not
    depend on the number of threads; at most ``256 * n_anchors`` rows,
    a random subsample beyond). Each point is linked to its
    ``n_nearest_anchors`` nearest anchors with weights
    ``exp(-d^2 / sigma^2)``, normalised to sum to one per row, where
    ``sigma`` is the mean distance of the training points to their
    ``n_nearest_anchors``-th nearest anchor. This truncated matrix ``Z``
    defines the graph ``A = Z diag(Z^T 1)^-1 Z^T``, whose leading non-trivial
    eigenvectors are found from the ``n_anchors x n_anchors`` matrix
    ``diag(Z^T 1)^-1/2 Z^T Z diag(Z^T 1)^-1/2`` (eigenvalues strictly inside
    (0, 1)) and extended to new points as eigenfunctions ``y(x) = z(x) W``.

    With ``n_layers=1`` each eigenfunction gives one bit, ``y > 0``. With
    ``n_layers=2`` each of the ``n_bits / 2`` eigenfunctions gives two: the
    first-layer bit ``y > 0``, then a second-layer bit that splits each side
    again at the thresholds ``b+`` and ``b-`` that minimise the graph cut in
    closed form. The first-layer bits come first in the code, then the
    second-layer bits.

    Anchors that are nobody's nearest anchor carry no weight; they are left
    out of the eigenproblem (their projection rows are zero).

    Read more in the :ref:`User Guide <binary_hashing>`.

    Parameters
    ----------
    n_bits : int, default=32
        Length of the binary codes; even when ``n_layers=2``.
    n_anchors : int, default=300
        Number of anchors (k-means centres); at most ``n_samples``. The graph
        has at most ``n_anchors - 1`` usable eigenvectors.
    n_nearest_anchors : int, default=2
        Anchors each point is linked to (``s`` in the paper).
    n_layers : {1, 2}, default=1
        Bits per eigenfunction.
    random_state : int, RandomState instance or None, default=None
        Seeds the k-means that places the anchors.

    Attributes
    ----------
    anchors_ : ndarray of shape (n_anchors, n_features)
        The anchors.
    sigma_ : float
        Kernel bandwidth.
    projection_ : ndarray of shape (n_anchors, n_eigenfunctions)
        Maps anchor weights ``z(x)`` to eigenfunction values;
        ``n_eigenfunctions = n_bits // n_layers``.
    eigenvalues_ : ndarray of shape (n_eigenfunctions,)
        Eigenvalues of the eigenfunctions used, in decreasing order.
    thresholds_ : ndarray of shape (2, n_eigenfunctions)
        Second-layer thresholds ``b+`` (row 0) and ``b-`` (row 1); only when
        ``n_layers=2``.
    n_features_in_ : int
        Number of features seen during ``fit``.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during ``fit``. Defined only when `X`
        has feature names that are all strings.

    See Also
    --------
    SpectralHashing : Eigenfunctions under a uniform-box assumption.
    ITQ : PCA with a learned rotation.

    References
    ----------
    .. [1] W. Liu, J. Wang, S. Kumar and S.-F. Chang, "Hashing with Graphs",
       ICML 2011.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from sklearn_hash import AGH
    >>> X, _ = load_digits(return_X_y=True)
    >>> agh = AGH(n_bits=16, n_anchors=100, random_state=0).fit(X)
    >>> agh.transform(X[:2]).shape
    (2, 16)
    >>> AGH(n_bits=16, n_anchors=100, n_layers=2, random_state=0).fit(X).thresholds_.shape
    (2, 8)
    """

    _parameter_constraints: dict = {
        **BaseBinaryHasher._parameter_constraints,
        "n_anchors": [Interval(Integral, 2, None, closed="left")],
        "n_nearest_anchors": [Interval(Integral, 1, None, closed="left")],
        "n_layers": [Interval(Integral, 1, 2, closed="both")],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        n_bits=32,
        *,
        n_anchors=300,
        n_nearest_anchors=2,
        n_layers=1,
        random_state=None,
    ):
        self.n_bits = n_bits
        self.n_anchors = n_anchors
        self.n_nearest_anchors = n_nearest_anchors
        self.n_layers = n_layers
        self.random_state = random_state

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Place the anchors and learn the eigenfunctions from X.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training vectors.
        y : None
            Ignored.

        Returns
        -------
        self : AGH
            Fitted hasher.
        """
        X = check_magnitude(validate_data(self, X, dtype=[np.float64, np.float32], order="C",
                                          ensure_min_samples=2), total=True)
        n_samples = X.shape[0]
        if self.n_anchors > n_samples:
            raise ValueError(
                f"AGH needs n_anchors <= n_samples; got n_anchors={self.n_anchors} "
                f"with n_samples={n_samples}."
            )
        if self.n_nearest_anchors > self.n_anchors:
            raise ValueError(
                f"n_nearest_anchors must be <= n_anchors; got "
                f"n_nearest_anchors={self.n_nearest_anchors}, n_anchors={self.n_anchors}."
            )
        if self.n_layers == 2 and self.n_bits % 2:
            raise ValueError(
                f"Two-layer AGH gives two bits per eigenfunction, so n_bits must be "
                f"even; got n_bits={self.n_bits}."
            )
        n_eig = self.n_bits // self.n_layers
        rng = check_random_state(self.random_state)

        # The package's k-means (as PQ's): its result does not depend on the
        # number of threads, unlike scikit-learn's KMeans, whose reductions do.
        X_train = training_rows(X, None, self.n_anchors, rng)
        seed = rng.randint(np.iinfo(np.int32).max)
        init, _ = kmeans_plusplus(X_train, self.n_anchors, random_state=seed)
        anchors, _ = kmeans(X_train, init, _KMEANS_ITER, effective_n_threads())
        self.anchors_ = anchors.astype(np.float64)
        sq_dist, nearest = self._nearest_anchors(X)
        # Bandwidth: mean distance to the s-th nearest anchor.
        self.sigma_ = float(np.mean(np.sqrt(sq_dist[:, -1])))
        if self.sigma_ == 0.0:
            self.sigma_ = 1.0  # every point sits on its anchors: any width works
        Z = self._anchor_weights(sq_dist, nearest)

        # Reduced eigenproblem on the anchors that some point links to.
        lam = np.asarray(Z.sum(axis=0)).ravel()
        used = np.flatnonzero(lam > 0)
        inv_sqrt = 1.0 / np.sqrt(lam[used])
        Zu = Z[:, used]
        M = (Zu.T @ Zu).toarray() * inv_sqrt[:, None] * inv_sqrt[None, :]
        eigval, eigvec = np.linalg.eigh((M + M.T) / 2)
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = eigval[order], eigvec[:, order]
        keep = (eigval > _EIG_LOW) & (eigval < _EIG_HIGH)
        if keep.sum() < n_eig:
            raise ValueError(
                f"AGH found {int(keep.sum())} non-trivial eigenvectors (eigenvalues "
                f"strictly inside (0, 1)) on its {used.size} linked anchors, but "
                f"n_bits={self.n_bits} with n_layers={self.n_layers} needs {n_eig}. "
                + (f"Use n_bits <= {int(keep.sum()) * self.n_layers}, more anchors or "
                   f"a larger n_nearest_anchors." if keep.sum() else
                   "The rows are too alike (or too many are equal) for anchors to tell "
                   "them apart: check X.")
            )
        eigval, eigvec = eigval[keep][:n_eig], eigvec[:, keep][:, :n_eig]
        # Deterministic signs: the largest entry of each eigenvector is positive.
        signs = np.sign(eigvec[np.argmax(np.abs(eigvec), axis=0), np.arange(n_eig)])
        eigvec = eigvec * signs
        self.eigenvalues_ = eigval
        self.projection_ = np.zeros((self.n_anchors, n_eig))
        self.projection_[used] = (
            np.sqrt(n_samples) * inv_sqrt[:, None] * eigvec / np.sqrt(eigval)[None, :]
        )
        if self.n_layers == 2:
            self.thresholds_ = self._second_layer_thresholds(Z, lam, Z @ self.projection_)
        return self

    def _nearest_anchors(self, X):
        """Squared distances to, and indices of, the s nearest anchors (sorted)."""
        s = self.n_nearest_anchors
        anchor_sq = row_norms(self.anchors_, squared=True)
        sq_dist = np.empty((X.shape[0], s))
        nearest = np.empty((X.shape[0], s), dtype=np.intp)
        for start in range(0, X.shape[0], _CHUNK):
            chunk = np.asarray(X[start : start + _CHUNK], dtype=np.float64)
            d2 = row_norms(chunk, squared=True)[:, None] - 2 * chunk @ self.anchors_.T
            d2 += anchor_sq[None, :]
            if s < d2.shape[1]:
                idx = np.argpartition(d2, s - 1, axis=1)[:, :s]
            else:
                idx = np.broadcast_to(np.arange(s), (d2.shape[0], s))
            part = np.take_along_axis(d2, idx, axis=1)
            order = np.argsort(part, axis=1, kind="stable")
            nearest[start : start + _CHUNK] = np.take_along_axis(idx, order, axis=1)
            sq_dist[start : start + _CHUNK] = np.maximum(
                np.take_along_axis(part, order, axis=1), 0.0
            )
        return sq_dist, nearest

    def _anchor_weights(self, sq_dist, nearest):
        """Sparse row-normalised Gaussian weights Z of shape (n_samples, n_anchors)."""
        n_samples, s = nearest.shape
        # Subtracting each row's smallest distance cancels in the normalisation
        # and keeps the exponentials from underflowing to an all-zero row.
        weights = np.exp(-(sq_dist - sq_dist[:, :1]) / self.sigma_**2)
        weights /= weights.sum(axis=1, keepdims=True)
        indptr = np.arange(0, n_samples * s + 1, s)
        return sparse.csr_matrix(
            (weights.ravel(), nearest.ravel(), indptr), shape=(n_samples, self.n_anchors)
        )

    @staticmethod
    def _second_layer_thresholds(Z, lam, Y):
        """Thresholds (b+, b-) minimising the cut of each eigenfunction's halves."""
        n_samples = Y.shape[0]
        thresholds = np.zeros((2, Y.shape[1]))
        inv_lam = np.divide(1.0, lam, out=np.zeros_like(lam), where=lam > 0)
        for k in range(Y.shape[1]):
            y = Y[:, k]
            pos = y > 0
            n1 = int(pos.sum())
            n2 = n_samples - n1
            right = np.asarray(Z.T @ np.abs(y)).ravel() * inv_lam
            left = np.asarray(Z[pos].sum(axis=0)).ravel()
            s1 = left @ right
            s2 = n1 - left @ (left * inv_lam)
            s3 = y[pos].sum()
            if n1 == 0 or n2 == 0 or abs(s2) < 1e-12 * max(n1, 1):
                # The halves share no anchor (zero cut for any threshold):
                # split each half at its mean instead.
                thresholds[0, k] = y[pos].mean() if n1 else 0.0
                thresholds[1, k] = y[~pos].mean() if n2 else 0.0
                continue
            thresholds[0, k] = (2 * s3 + n2 * (s3 - s1) / s2) / n_samples
            thresholds[1, k] = (n1 * (s3 - s1) / s2 - 2 * s3) / n_samples
        return thresholds

    def _hash(self, X):
        sq_dist, nearest = self._nearest_anchors(X)
        Y = self._anchor_weights(sq_dist, nearest) @ self.projection_
        first = Y > 0
        if self.n_layers == 1:
            return first
        second = np.where(first, Y - self.thresholds_[0], -Y + self.thresholds_[1]) > 0
        return np.hstack([first, second])
