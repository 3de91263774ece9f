"""OPQ: product quantization after a learned orthogonal rotation (Ge et al., 2013).

The path of the data: ``fit`` starts from the parametric solution (PCA
directions dealt to the subspaces so that each gets a similar share of the
variance, "eigenvalue allocation"), then alternates, ``n_iter`` times, a few
warm-started k-means iterations of the codebooks on the rotated data and
the orthogonal Procrustes update of the rotation (the non-parametric OPQ);
a final product quantizer ``pq_`` is trained on the rotated data.
``transform``, ``distance_tables`` and ``inverse_transform`` rotate and then
defer to ``pq_``.
"""

import warnings
from numbers import Integral

import numpy as np
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import validate_data

from ._base import check_fitted, check_magnitude, validate_features
from ._kmeans import training_rows
from ._pq import ProductQuantizer, _check_codebooks, subspace_sizes

# Lloyd iterations of the codebooks in the first alternation and in each later one.
_FIRST_PQ_ITER = 10
_STEP_PQ_ITER = 4


def _eigenvalue_allocation(X, n_subspaces):
    """The parametric OPQ rotation: PCA directions balanced over the subspaces.

    Directions are taken in decreasing variance and each goes to the
    subspace, among those with room left, whose product of variances is
    smallest (Ge et al. 2013, section 4.2).
    """
    d = X.shape[1]
    cov = np.cov(X, rowvar=False).reshape(d, d)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = np.maximum(eigval[order], 1e-12), eigvec[:, order]
    sizes = subspace_sizes(d, n_subspaces)
    log_products = np.zeros(n_subspaces)
    buckets = [[] for _ in range(n_subspaces)]
    for j in range(d):
        open_ = [m for m in range(n_subspaces) if len(buckets[m]) < sizes[m]]
        m = min(open_, key=lambda b: (log_products[b], b))
        buckets[m].append(j)
        log_products[m] += np.log(eigval[j])
    columns = [j for bucket in buckets for j in bucket]
    return eigvec[:, columns]


class OPQ(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Optimized product quantization: PQ after a learned orthogonal rotation.

    Product quantization cuts the vector into ``n_subspaces`` blocks and
    quantizes each on its own; it works best when the blocks are
    independent and carry similar variance. OPQ learns an orthogonal
    rotation ``rotation_`` that makes them so, jointly with the codebooks
    (Ge, He, Ke and Sun, 2013, non-parametric OPQ: alternate k-means of the
    codebooks on the rotated data and the orthogonal Procrustes update of
    the rotation, starting from the parametric eigenvalue-allocation
    solution). Distances are unchanged by the rotation, so OPQ is searched
    exactly as :class:`ProductQuantizer` is: ``transform`` gives codeword
    indices, ``distance_tables`` the ADC tables, ``inverse_transform`` the
    reconstructions (rotated back), in :class:`QuantizedNeighbors` and
    :class:`IVFQuantizedNeighbors`, with 8- or 4-bit codes.

    Read more in the :ref:`User Guide <product_quantization>`.

    Parameters
    ----------
    n_bits : int, default=64
        Code length; ``n_bits / subspace_bits`` subspaces.
    subspace_bits : int, default=8
        Bits per subspace: ``2**subspace_bits`` codewords per codebook.
    n_iter : int, default=20
        Alternations of codebook and rotation updates.
    n_pq_iter : int, default=25
        Lloyd iterations of the final codebooks.
    max_train_samples : int, default=None
        Rows used to learn the rotation and the codebooks (a random
        subsample); ``None`` means ``256 * 2**subspace_bits``.
    random_state : int, RandomState instance or None, default=None
        Seeds the subsample and the k-means initialisations.
    verbose : int, default=0
        When positive, ``fit`` prints the quantization error after each
        alternation.

    Attributes
    ----------
    rotation_ : ndarray of shape (n_features, n_features)
        The orthogonal rotation; codes are those of ``X @ rotation_``.
    pq_ : ProductQuantizer
        The product quantizer of the rotated vectors.
    error_curve_ : ndarray of shape (n_iter,)
        Mean squared quantization error of the training rows after each
        alternation.
    cluster_centers_ : ndarray of shape (n_subspaces, n_codewords, max_subspace_dim)
        The codebooks, in the rotated space (those of ``pq_``).
    subspace_bounds_ : ndarray of shape (n_subspaces + 1,)
        Feature ranges of the subspaces, in the rotated space.
    n_subspaces_ : int
        Number of codebooks.
    n_codewords_ : int
        Codewords per codebook.
    n_features_in_ : int
        Number of features seen during ``fit``.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during ``fit``. Defined only when `X`
        has feature names that are all strings.

    See Also
    --------
    ProductQuantizer : The same codes without the rotation.
    QuantizedNeighbors : Searches the codes.

    Notes
    -----
    ``fit`` also trains a plain product quantizer on the training rows and
    keeps the identity as ``rotation_`` if that quantizer's error is lower
    (it rarely is): the training error of OPQ is never above PQ's.

    References
    ----------
    .. [1] T. Ge, K. He, Q. Ke and J. Sun, "Optimized Product Quantization
       for Approximate Nearest Neighbor Search", CVPR 2013.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_hash import OPQ, ProductQuantizer
    >>> rng = np.random.RandomState(0)
    >>> X = rng.standard_normal((2000, 16)) * np.linspace(3, 0.1, 16)
    >>> opq = OPQ(n_bits=16, subspace_bits=4, random_state=0).fit(X)
    >>> codes = opq.transform(X[:3])
    >>> codes.shape, codes.dtype
    ((3, 4), dtype('uint8'))
    >>> np.allclose(opq.rotation_ @ opq.rotation_.T, np.eye(16))
    True
    >>> pq = ProductQuantizer(n_bits=16, subspace_bits=4, random_state=0).fit(X)
    >>> def error(q):
    ...     return ((q.inverse_transform(q.transform(X)) - X) ** 2).sum(1).mean()
    >>> bool(error(opq) < error(pq))
    True
    """

    _parameter_constraints: dict = {
        "n_bits": [Interval(Integral, 1, None, closed="left")],
        "subspace_bits": [Interval(Integral, 1, 16, closed="both")],
        "n_iter": [Interval(Integral, 0, None, closed="left")],
        "n_pq_iter": [Interval(Integral, 1, None, closed="left")],
        "max_train_samples": [Interval(Integral, 1, None, closed="left"), None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        n_bits=64,
        *,
        subspace_bits=8,
        n_iter=20,
        n_pq_iter=25,
        max_train_samples=None,
        random_state=None,
        verbose=0,
    ):
        self.n_bits = n_bits
        self.subspace_bits = subspace_bits
        self.n_iter = n_iter
        self.n_pq_iter = n_pq_iter
        self.max_train_samples = max_train_samples
        self.random_state = random_state
        self.verbose = verbose

    def _pq(self, n_iter, init, seed):
        return ProductQuantizer(self.n_bits, subspace_bits=self.subspace_bits, n_iter=n_iter,
                                init=init, max_train_samples=None, random_state=seed)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Learn the rotation and the codebooks.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training vectors.
        y : None
            Ignored.

        Returns
        -------
        self : OPQ
            Fitted quantizer.
        """
        X = check_magnitude(validate_data(self, X, dtype=[np.float64, np.float32], order="C",
                                          ensure_min_samples=2))
        n_samples, n_features = X.shape
        n_subspaces, n_codewords = _check_codebooks(self, n_samples, n_features)
        rng = check_random_state(self.random_state)
        X_train = np.ascontiguousarray(
            training_rows(X, self.max_train_samples, n_codewords, rng), dtype=np.float64)
        rotation = _eigenvalue_allocation(X_train, n_subspaces)
        seeds = rng.randint(np.iinfo(np.int32).max, size=self.n_iter + 2)

        def error(pq, Y):
            return float(((pq.inverse_transform(pq.transform(Y)) - Y) ** 2).sum(1).mean())

        init, errors = "random", []
        with warnings.catch_warnings():
            # Duplicate codewords in the short warm-up fits are not worth a warning.
            warnings.simplefilter("ignore", ConvergenceWarning)
            for it in range(self.n_iter):
                Y = X_train @ rotation
                pq = self._pq(_FIRST_PQ_ITER if it == 0 else _STEP_PQ_ITER, init,
                              seeds[it]).fit(Y)
                Y_hat = pq.inverse_transform(pq.transform(Y))
                errors.append(float(((Y_hat - Y) ** 2).sum(1).mean()))
                # Orthogonal Procrustes: the rotation taking X closest to the reconstructions.
                U, _, Vt = np.linalg.svd(X_train.T @ Y_hat)
                rotation = U @ Vt
                init = pq.cluster_centers_
                if self.verbose:
                    print(f"OPQ: iteration {it}, quantization error {errors[-1]:.6g}.")
        final_init = init if isinstance(init, np.ndarray) else "random"
        self.pq_ = self._pq(self.n_pq_iter, final_init, seeds[-2]).fit(X_train @ rotation)
        plain = self._pq(self.n_pq_iter, "random", seeds[-1]).fit(X_train)
        if error(plain, X_train) < error(self.pq_, X_train @ rotation):
            rotation, self.pq_ = np.eye(n_features), plain
        self.rotation_ = rotation
        self.error_curve_ = np.asarray(errors)
        return self

    def _rotate(self, X):
        return np.ascontiguousarray(X @ self.rotation_.astype(X.dtype, copy=False))

    @property
    def cluster_centers_(self):
        return self.pq_.cluster_centers_

    @property
    def subspace_bounds_(self):
        return self.pq_.subspace_bounds_

    @property
    def n_subspaces_(self):
        return self.pq_.n_subspaces_

    @property
    def n_codewords_(self):
        return self.pq_.n_codewords_

    @property
    def _n_features_out(self):
        return self.n_bits // self.subspace_bits

    def transform(self, X):
        """Encode X: the codeword indices of the rotated vectors.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Vectors to encode.

        Returns
        -------
        codes : ndarray of shape (n_samples, n_subspaces)
            uint8 codeword indices (uint16 above 256 codewords).
        """
        check_fitted(self)
        X = validate_features(self, X)
        return self.pq_.transform(self._rotate(X))

    def inverse_transform(self, X):
        """Reconstruct vectors from codes, rotated back to the input space.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_subspaces)
            Codeword indices.

        Returns
        -------
        X_rec : ndarray of shape (n_samples, n_features)
        """
        check_fitted(self)
        rotated = self.pq_.inverse_transform(X)
        return rotated @ self.rotation_.T.astype(rotated.dtype, copy=False)

    def distance_tables(self, X):
        """Squared distances of each row of X to every codeword, per subspace (ADC tables).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Query vectors.

        Returns
        -------
        tables : ndarray of shape (n_samples, n_subspaces, n_codewords), dtype=float32
        """
        check_fitted(self)
        X = validate_features(self, X)
        return self.pq_.distance_tables(self._rotate(X))

    def symmetric_distance_tables(self):
        """Squared distances between the codewords of each subspace (SDC tables).

        Returns
        -------
        tables : ndarray of shape (n_subspaces, n_codewords, n_codewords), dtype=float32
        """
        check_fitted(self)
        return self.pq_.symmetric_distance_tables()

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = []
        return tags
