"""Product Quantization (PQ), Jégou, Douze and Schmid (2011)."""

import warnings
from numbers import Integral

import numpy as np
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.cluster import kmeans_plusplus
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_array, check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import validate_data

from ._base import check_fitted, check_magnitude, validate_features
from ._kernels._nearest import encode, pack_subspace_codewords, subspace_scores
from ._kernels._openmp import effective_n_threads
from ._kmeans import kmeans, training_rows
from ._threads import quantizer_threads

# Bytes of float64 distance tables computed at a time, to bound their memory.
_TABLE_CHUNK_BYTES = 4 * 2**20
# Largest number of codewords for which K x K symmetric tables are built.
_MAX_SDC_CODEWORDS = 1024


def subspace_sizes(n_features, n_subspaces):
    """Features per subspace: ``n_features // n_subspaces``, the first ``n_features % n_subspaces`` one wider."""
    sizes = np.full(n_subspaces, n_features // n_subspaces)
    sizes[: n_features % n_subspaces] += 1
    return sizes


def _check_codebooks(estimator, n_samples, n_features=None):
    """Number of codebooks and of codewords for ``n_bits`` and ``subspace_bits``.

    Shared by the estimators that product-quantize: ``n_bits`` must be a
    multiple of ``subspace_bits``, k-means needs at least K rows, and (when
    ``n_features`` is given: the codebooks split the input) every subspace
    needs a feature.
    """
    n_bits, subspace_bits = estimator.n_bits, estimator.subspace_bits
    if n_bits % subspace_bits:
        raise ValueError(
            f"n_bits must be a multiple of subspace_bits; got n_bits={n_bits}, "
            f"subspace_bits={subspace_bits}."
        )
    n_codewords = 2**subspace_bits
    if n_samples < n_codewords:
        raise ValueError(
            f"{type(estimator).__name__} needs at least 2**subspace_bits = {n_codewords} "
            f"training rows for its k-means codebooks; got n_samples={n_samples}. "
            f"Use a smaller subspace_bits or more data."
        )
    n_subspaces = n_bits // subspace_bits
    if n_features is not None and n_subspaces > n_features:
        raise ValueError(
            f"{type(estimator).__name__} needs n_bits // subspace_bits <= n_features (one or "
            f"more features per subspace); got {n_subspaces} subspaces for "
            f"n_features={n_features}."
        )
    return n_subspaces, n_codewords


class ProductQuantizer(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Product quantization: one k-means codebook per block of dimensions.

    The features are split into ``n_subspaces = n_bits // subspace_bits``
    contiguous blocks, and each block is quantized by its own k-means
    codebook of ``K = 2 ** subspace_bits`` codewords. A vector's code is the
    index of the nearest codeword in each block, so a code takes ``n_bits``
    bits, and a vector is approximated by the concatenation of its codewords
    (:meth:`inverse_transform`).

    :class:`~sklearn_hash.QuantizedNeighbors` searches the codes with
    asymmetric distance computation (ADC): each query stays a float vector,
    :meth:`distance_tables` gives its squared distances to every codeword
    (``n_subspaces x K`` numbers), and the squared distance to a database
    item is estimated by adding one table entry per subspace. Searching N
    items then costs ``O(N * n_subspaces + K * n_features)`` per query
    instead of ``O(N * n_features)``. Symmetric distance (SDC) quantizes the
    query too and reads precomputed codeword-to-codeword distances
    (:meth:`symmetric_distance_tables`).

    **Metric.** PQ approximates squared Euclidean (L2) distances, the
    default. For cosine similarity, L2-normalise the vectors first (a
    :class:`~sklearn.preprocessing.Normalizer` step in a pipeline): for unit
    vectors ``||x - y||^2 = 2 - 2 cos(x, y)``, so the ranking is the cosine
    ranking.

    **Uneven splits.** When ``n_features`` is not a multiple of
    ``n_subspaces``, the first ``n_features % n_subspaces`` blocks get one
    more dimension than the others (faiss refuses such splits); the split is
    in ``subspace_bounds_``.

    **k-means.** Each codebook is trained by Lloyd's algorithm in the
    input's precision (float32 stays float32), with a fused kernel that
    finds each row's nearest codeword without building a distance matrix;
    a codeword left without rows takes the row farthest from its own
    codeword, as in scikit-learn's :class:`~sklearn.cluster.KMeans`, and
    training stops early when no assignment changes. Encoding uses the same
    kernel. Threads: all cores, or ``OMP_NUM_THREADS``; results do not
    depend on the number.

    **Training size.** k-means needs at least K rows. With more than
    ``max_train_samples`` rows (default ``256 * K``, as faiss), k-means runs
    on a random subsample of that size; encoding uses all rows.

    Read more in the :ref:`User Guide <product_quantization>`.

    Parameters
    ----------
    n_bits : int, default=64
        Code length in bits; a multiple of ``subspace_bits``.
    subspace_bits : int, default=8
        Bits per subspace: ``K = 2 ** subspace_bits`` codewords per codebook
        (8 gives 256 codewords and ``uint8`` codes; more gives ``uint16``).
    n_iter : int, default=25
        Lloyd iterations of each k-means.
    init : {"random", "k-means++"} or array-like of shape (n_subspaces, K, subspace_dim), \
default="random"
        How each k-means starts: ``"random"`` picks K training rows (as faiss
        does), ``"k-means++"`` spreads them out (scikit-learn's greedy
        seeding, ``O(n K d log K)``: at ``subspace_bits`` above 8 it takes
        several times the k-means itself), and an array gives the starting
        codebooks in the layout of ``cluster_centers_`` (warm start, for
        instance from a previous fit on similar data).
    max_train_samples : int, default=None
        Rows used to train the codebooks; ``None`` means ``256 * K``.
    random_state : int, RandomState instance or None, default=None
        Seeds the subsample and the k-means initialisations.
    verbose : int, default=0
        When positive, ``fit`` prints each codebook's k-means progress
        (inertia per iteration). Silent by default.

    Attributes
    ----------
    n_subspaces_ : int
        Number of codebooks, ``n_bits // subspace_bits``.
    n_codewords_ : int
        Codewords per codebook, ``2 ** subspace_bits``.
    subspace_bounds_ : ndarray of shape (n_subspaces + 1,)
        Subspace m covers features ``subspace_bounds_[m]:subspace_bounds_[m + 1]``.
    cluster_centers_ : ndarray of shape (n_subspaces, n_codewords, subspace_dim)
        The codebooks (faiss / nanopq layout). ``subspace_dim`` is the largest
        block; smaller blocks are padded with zeros.
    inertia_ : ndarray of shape (n_subspaces,)
        k-means inertia of each codebook on its training rows.
    n_features_in_ : int
        Number of features seen during ``fit``.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during ``fit``. Defined only when `X`
        has feature names that are all strings.

    See Also
    --------
    QuantizedNeighbors : ADC / SDC search over the codes.
    ITQ : Binary codes searched by Hamming distance.

    References
    ----------
    .. [1] H. Jégou, M. Douze and C. Schmid, "Product Quantization for
       Nearest Neighbor Search", IEEE TPAMI 33(1), 2011.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.preprocessing import Normalizer
    >>> from sklearn_hash import ProductQuantizer, QuantizedNeighbors
    >>> X, y = load_digits(return_X_y=True)
    >>> pq = ProductQuantizer(n_bits=32, subspace_bits=8, random_state=0).fit(X)
    >>> codes = pq.transform(X[:3])
    >>> codes.shape, codes.dtype
    ((3, 4), dtype('uint8'))
    >>> pq.inverse_transform(codes).shape
    (3, 64)
    >>> # Cosine search: normalise, then quantize and search by ADC.
    >>> search = make_pipeline(Normalizer(), QuantizedNeighbors(pq, n_neighbors=10))
    >>> round(search.fit(X[:1500], y[:1500]).score(X[1500:], y[1500:]), 1) >= 0.8
    True
    """

    _parameter_constraints: dict = {
        "n_bits": [Interval(Integral, 1, None, closed="left")],
        "subspace_bits": [Interval(Integral, 1, 16, closed="both")],
        "n_iter": [Interval(Integral, 1, None, closed="left")],
        "max_train_samples": [Interval(Integral, 1, None, closed="left"), None],
        "init": [StrOptions({"random", "k-means++"}), "array-like"],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        n_bits=64,
        *,
        subspace_bits=8,
        n_iter=25,
        init="random",
        max_train_samples=None,
        random_state=None,
        verbose=0,
    ):
        self.n_bits = n_bits
        self.subspace_bits = subspace_bits
        self.n_iter = n_iter
        self.init = init
        self.max_train_samples = max_train_samples
        self.random_state = random_state
        self.verbose = verbose

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Learn one k-means codebook per subspace.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training vectors.
        y : None
            Ignored.

        Returns
        -------
        self : ProductQuantizer
            Fitted quantizer.
        """
        X = check_magnitude(validate_data(self, X, dtype=[np.float64, np.float32], order="C",
                                          ensure_min_samples=2))
        n_samples, n_features = X.shape
        n_subspaces, n_codewords = _check_codebooks(self, n_samples, n_features)
        rng = check_random_state(self.random_state)
        X_train = training_rows(X, self.max_train_samples, n_codewords, rng)

        sizes = subspace_sizes(n_features, n_subspaces)
        init = self._check_init(n_subspaces, n_codewords, int(sizes.max()), X.dtype)
        self.subspace_bounds_ = np.concatenate([[0], np.cumsum(sizes)])
        self.n_subspaces_ = n_subspaces
        self.n_codewords_ = n_codewords
        self.cluster_centers_ = np.zeros((n_subspaces, n_codewords, sizes.max()), dtype=X.dtype)
        self.inertia_ = np.zeros(n_subspaces)
        n_threads = effective_n_threads()
        for m in range(n_subspaces):
            lo, hi = self.subspace_bounds_[m], self.subspace_bounds_[m + 1]
            seed = rng.randint(np.iinfo(np.int32).max)
            # A contiguous copy of the block: k-means reads it 2 * n_iter times.
            block = np.ascontiguousarray(X_train[:, lo:hi])
            if isinstance(init, str):
                start = self._init_centers(block, n_codewords, seed)
            else:
                start = init[m, :, : hi - lo]
            centers, self.inertia_[m] = kmeans(block, start, self.n_iter, n_threads,
                                               verbose=self.verbose,
                                               label=f"codebook {m + 1}/{n_subspaces}")
            self.cluster_centers_[m, :, : hi - lo] = centers
            n_distinct = len(np.unique(centers, axis=0))
            if n_distinct < n_codewords:
                warnings.warn(
                    f"Number of distinct codewords ({n_distinct}) in codebook {m} is smaller "
                    f"than 2**subspace_bits ({n_codewords}): the training rows have fewer "
                    f"distinct values in features {lo}:{hi}. Some codes are never used.",
                    ConvergenceWarning,
                    stacklevel=2,
                )
        return self

    def _init_centers(self, X_block, n_codewords, seed):
        """Starting codewords: K distinct training rows, or k-means++ seeding."""
        if self.init == "k-means++":
            centers, _ = kmeans_plusplus(X_block, n_codewords, random_state=seed)
            return centers
        rows = check_random_state(seed).choice(X_block.shape[0], n_codewords, replace=False)
        return X_block[np.sort(rows)]

    def _check_init(self, n_subspaces, n_codewords, subspace_dim, dtype):
        if isinstance(self.init, str):
            return self.init
        init = check_array(self.init, dtype=dtype, allow_nd=True, input_name="init")
        expected = (n_subspaces, n_codewords, subspace_dim)
        if init.shape != expected:
            raise ValueError(
                f"init must be an array of shape (n_subspaces, 2**subspace_bits, "
                f"subspace_dim) = {expected} for this data; got shape {init.shape}."
            )
        return init

    @property
    def _n_features_out(self):
        return self.n_bits // self.subspace_bits

    def _code_dtype(self):
        return np.uint8 if self.subspace_bits <= 8 else np.uint16

    def _tables(self, X):
        """ADC tables of validated rows X: float64 products, float32 tables.

        ``||b_m||^2 - 2 <b_m, c_mk> + ||c_mk||^2``, clipped at 0, for each row's
        block b_m: the products by the subspace kernel, row by row, so that a
        query's table does not depend on the other queries (a BLAS product
        rounds differently with the shape of the batch), with the codewords
        packed once per fit.
        """
        packed, sq_centers = self._packed_codewords()
        bounds = self.subspace_bounds_.astype(np.intp)
        n, M, K = X.shape[0], self.n_subspaces_, self.n_codewords_
        tables = np.empty((n, M, K), dtype=np.float32)
        chunk = max(1, _TABLE_CHUNK_BYTES // (8 * M * K))
        for start in range(0, n, chunk):
            block = np.asarray(X[start : start + chunk], dtype=np.float64)
            d2 = subspace_scores(block, packed, bounds, n_threads=quantizer_threads())
            d2 *= -2
            d2 += np.add.reduceat(block * block, bounds[:-1], axis=1)[:, :, None]
            d2 += sq_centers
            np.maximum(d2, 0.0, out=d2)
            tables[start : start + chunk] = d2
        return tables

    def _packed_codewords(self):
        """The float64 codebooks packed for the subspace kernel, and their squared norms.

        Built on first use after each fit (a cache keyed by the codebooks
        array, never pickled).
        """
        cached = self.__dict__.get("_packed")
        if cached is None or cached[0] is not self.cluster_centers_:
            centers = self.cluster_centers_.astype(np.float64)
            sq = np.zeros(centers.shape[:2])
            for m in range(self.n_subspaces_):
                width = self.subspace_bounds_[m + 1] - self.subspace_bounds_[m]
                sq[m] = (centers[m, :, :width] ** 2).sum(axis=1)
            cached = (self.cluster_centers_, pack_subspace_codewords(centers, np.float64), sq)
            self._packed = cached
        return cached[1], cached[2]

    # Caches rebuilt on first use: never pickled nor saved with an index.
    _TRANSIENT = ("_packed",)

    def __getstate__(self):
        state = dict(super().__getstate__())  # may be self.__dict__ itself: leave it alone
        for name in self._TRANSIENT:
            state.pop(name, None)
        return state

    def transform(self, X):
        """Encode X: the nearest codeword of each subspace.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Vectors to encode.

        Returns
        -------
        codes : ndarray of shape (n_samples, n_subspaces)
            Codeword indices, ``uint8`` (``uint16`` when ``subspace_bits > 8``).
        """
        check_fitted(self)
        X = check_magnitude(validate_features(self, X))
        codes = np.empty((X.shape[0], self.n_subspaces_), dtype=self._code_dtype())
        encode(X, self.subspace_bounds_.astype(np.intp), self.cluster_centers_, codes,
               n_threads=quantizer_threads())
        return codes

    def inverse_transform(self, X):
        """Reconstruct vectors from their codes (the concatenated codewords).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_subspaces)
            Codes from :meth:`transform`.

        Returns
        -------
        X_reconstructed : ndarray of shape (n_samples, n_features_in)
            The codewords of each code, concatenated.
        """
        check_fitted(self)
        codes = self._check_codes(X)
        out = np.empty((codes.shape[0], self.n_features_in_), dtype=self.cluster_centers_.dtype)
        for m in range(self.n_subspaces_):
            lo, hi = self.subspace_bounds_[m], self.subspace_bounds_[m + 1]
            out[:, lo:hi] = self.cluster_centers_[m, codes[:, m], : hi - lo]
        return out

    def _check_codes(self, codes):
        codes = check_array(codes, dtype=None, input_name="codes")
        if codes.dtype.kind not in "iu":
            raise TypeError(f"codes must hold integer codeword indices; got dtype {codes.dtype}.")
        if codes.shape[1] != self.n_subspaces_:
            raise ValueError(f"codes have {codes.shape[1]} columns but the quantizer has "
                             f"{self.n_subspaces_} subspaces.")
        if codes.size and (codes.min() < 0 or codes.max() >= self.n_codewords_):
            raise ValueError(f"codes must be codeword indices in [0, {self.n_codewords_ - 1}]; "
                             f"got values in [{codes.min()}, {codes.max()}].")
        return codes.astype(np.intp, copy=False)

    def distance_tables(self, X):
        """Squared distances of each row's blocks to every codeword (ADC tables).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Query vectors.

        Returns
        -------
        tables : ndarray of shape (n_samples, n_subspaces, n_codewords), dtype=float32
            ``tables[i, m, k]`` is the squared L2 distance between block m of
            row i and codeword k of codebook m. The ADC estimate of the
            squared distance to a code c is ``tables[i, arange(M), c].sum()``.
        """
        check_fitted(self)
        return self._tables(validate_features(self, X))

    def symmetric_distance_tables(self):
        """Squared distances between the codewords of each codebook (SDC tables).

        Returns
        -------
        tables : ndarray of shape (n_subspaces, n_codewords, n_codewords), dtype=float32
            ``tables[m, a, b]`` is the squared distance between codewords a
            and b of codebook m; the SDC estimate between codes c and c' is
            ``tables[arange(M), c, c'].sum()``.
        """
        check_fitted(self)
        if self.n_codewords_ > _MAX_SDC_CODEWORDS:
            raise ValueError(
                f"Symmetric distance tables hold n_codewords**2 entries per subspace; "
                f"they are built for at most {_MAX_SDC_CODEWORDS} codewords "
                f"(subspace_bits <= 10), got {self.n_codewords_}. Use ADC."
            )
        tables = np.empty((self.n_subspaces_, self.n_codewords_, self.n_codewords_), dtype=np.float32)
        for m in range(self.n_subspaces_):
            c = self.cluster_centers_[m].astype(np.float64)
            sq = (c**2).sum(axis=1)
            tables[m] = np.maximum(sq[:, None] + sq[None, :] - 2 * c @ c.T, 0.0)
        return tables

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = []
        return tags
