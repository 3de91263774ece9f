"""Mean average precision over the top R retrieved items, and its scorer."""

from numbers import Integral

import numpy as np
from sklearn.pipeline import Pipeline
from sklearn.utils import check_array
from sklearn.utils._param_validation import Interval, validate_params
from sklearn.utils.validation import check_is_fitted


def _check_labels(y, name):
    y = check_array(y, ensure_2d=False, dtype=None, ensure_min_samples=0,
                    ensure_all_finite=True, input_name=name)
    if y.ndim not in (1, 2):
        raise ValueError(f"{name} must be 1-D class labels or a 2-D 0/1 indicator "
                         f"matrix; got an array with {y.ndim} dimensions.")
    if y.ndim == 2 and y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"{name} is 2-D, so it must be a 0/1 indicator matrix "
                         f"(one column per label); it holds other values.")
    return y


def _relevance(y_query, y_database, neighbors):
    """Boolean (n_queries, R): is each retrieved item relevant to its query?"""
    if y_query.ndim == 1:
        return y_database[neighbors] == y_query[:, None]
    # Multi-label: relevant when the two rows share at least one label.
    relevant = np.empty(neighbors.shape, dtype=bool)
    yq = y_query.astype(bool)
    ydb = y_database.astype(bool)
    for start in range(0, neighbors.shape[0], 1024):
        stop = start + 1024
        relevant[start:stop] = (ydb[neighbors[start:stop]] & yq[start:stop, None, :]).any(-1)
    return relevant


def average_precision_at_r(relevant):
    """AP@R of each row of a boolean (n_queries, R) relevance matrix."""
    relevant = np.asarray(relevant, dtype=bool)
    hits = np.cumsum(relevant, axis=1)
    ranks = np.arange(1, relevant.shape[1] + 1)
    precision_sum = np.sum((hits / ranks) * relevant, axis=1)
    n_hits = hits[:, -1] if relevant.shape[1] else np.zeros(relevant.shape[0])
    return np.divide(precision_sum, n_hits, out=np.zeros(relevant.shape[0]),
                     where=n_hits > 0)


@validate_params(
    {
        "y_query": ["array-like"],
        "y_database": ["array-like"],
        "neighbors": ["array-like"],
        "R": [Interval(Integral, 1, None, closed="left"), None],
    },
    prefer_skip_nested_validation=True,
)
def map_at_r_score(y_query, y_database, neighbors, *, R=None):
    """Mean average precision over the top R retrieved items (mAP@R).

    For one query with ranked database items ``1 .. R``, let ``rel(k)`` be 1
    when the k-th item is relevant and ``P@k`` the precision of the first k
    items. Then::

        AP@R = (1 / #relevant items in the top R) * sum_{k <= R} P@k * rel(k)

    and mAP@R is the mean of AP@R over the queries.

    Rules, stated because they change the number:

    - **Zero hits**: a query with no relevant item in its top R scores 0.
    - **Ties**: ``neighbors`` is taken as ranked; the metric sees no
      distances. :class:`~sklearn_hash.QuantizedNeighbors` ranks items at
      equal distance by ascending database index, so its rankings (and so
      this score) are deterministic.
    - **Relevance**: with 1-D labels an item is relevant when its class
      equals the query's; with 2-D 0/1 indicator rows (multi-label) when
      the two rows share at least one label.

    Read more in the :ref:`User Guide <map_at_r>`.

    Parameters
    ----------
    y_query : array-like of shape (n_queries,) or (n_queries, n_labels)
        Labels of the queries.
    y_database : array-like of shape (n_database,) or (n_database, n_labels)
        Labels of the database items, in the same form as ``y_query``.
    neighbors : array-like of shape (n_queries, n_retrieved), dtype=int
        Database indices retrieved for each query, best first, as returned by
        ``kneighbors(..., return_distance=False)``.
    R : int, default=None
        Number of retrieved items scored, at most ``n_retrieved``. ``None``
        uses all ``n_retrieved`` columns.

    Returns
    -------
    score : float
        mAP@R in [0, 1]; greater is better.

    See Also
    --------
    make_map_at_r_scorer : The same score as a scorer for model selection.

    Examples
    --------
    >>> from sklearn_hash.metrics import map_at_r_score
    >>> y_database = [0, 1, 0, 1]
    >>> # query of class 0 retrieves items 0 (hit), 1 (miss), 2 (hit)
    >>> map_at_r_score([0], y_database, [[0, 1, 2]])  # (1/1 + 2/3) / 2
    0.833...
    """
    y_query = _check_labels(y_query, "y_query")
    y_database = _check_labels(y_database, "y_database")
    if y_query.ndim != y_database.ndim or (
        y_query.ndim == 2 and y_query.shape[1] != y_database.shape[1]
    ):
        raise ValueError(
            f"y_query and y_database must have the same form (both 1-D classes or "
            f"both indicator matrices with the same columns); got shapes "
            f"{y_query.shape} and {y_database.shape}."
        )
    neighbors = check_array(neighbors, dtype=None, ensure_min_samples=0,
                            ensure_min_features=0, input_name="neighbors")
    if neighbors.dtype.kind not in "iu":
        raise TypeError(f"neighbors must hold integer database indices; got dtype "
                        f"{neighbors.dtype}.")
    if neighbors.shape[0] != y_query.shape[0]:
        raise ValueError(f"neighbors has {neighbors.shape[0]} rows but y_query has "
                         f"{y_query.shape[0]} queries; they must match.")
    if neighbors.shape[0] == 0:
        raise ValueError("map_at_r_score needs at least one query; got 0.")
    if neighbors.size and (neighbors.min() < 0 or neighbors.max() >= y_database.shape[0]):
        raise ValueError(f"neighbors must be indices in [0, {y_database.shape[0] - 1}] "
                         f"of y_database; got values in [{neighbors.min()}, "
                         f"{neighbors.max()}].")
    if R is None:
        R = neighbors.shape[1]
    if R > neighbors.shape[1] or R < 1:
        raise ValueError(f"R={R} must be between 1 and the {neighbors.shape[1]} "
                         f"retrieved items per query in neighbors.")
    relevant = _relevance(y_query, y_database, neighbors[:, :R])
    return float(np.mean(average_precision_at_r(relevant)))


class _MapAtRScorer:
    """mAP@R of a fitted searcher: the fitted database against the queries X."""

    def __init__(self, R):
        self.R = R

    def __call__(self, estimator, X, y):
        searcher, Xt = estimator, X
        if isinstance(estimator, Pipeline):
            searcher = estimator.steps[-1][1]
            if len(estimator.steps) > 1:
                Xt = estimator[:-1].transform(X)
        if not hasattr(searcher, "kneighbors"):
            raise TypeError(
                f"make_map_at_r_scorer scores a QuantizedNeighbors or a Pipeline "
                f"ending in one; got {type(searcher).__name__}."
            )
        check_is_fitted(searcher)
        y_database = getattr(searcher, "_fit_y", None)
        if y_database is None:
            raise ValueError(
                "mAP@R needs the labels of the database: fit the searcher with y."
            )
        neighbors = searcher.kneighbors(Xt, n_neighbors=self.R, return_distance=False)
        return map_at_r_score(y, y_database, neighbors, R=self.R)

    def __repr__(self):
        return f"make_map_at_r_scorer(R={self.R})"


@validate_params(
    {"R": [Interval(Integral, 1, None, closed="left")]},
    prefer_skip_nested_validation=True,
)
def make_map_at_r_scorer(R=100):
    """Scorer of mAP@R for :class:`~sklearn.model_selection.GridSearchCV` and friends.

    The scorer is called as ``scorer(estimator, X, y)`` with a fitted
    :class:`~sklearn_hash.QuantizedNeighbors`, or a
    :class:`~sklearn.pipeline.Pipeline` ending in one. The items the searcher
    was fitted on (the training fold) are the database, with the labels given
    to ``fit``; the rows of ``X`` (the validation fold) are the queries, run
    through the pipeline's earlier steps first. Each query retrieves its ``R``
    nearest database items and the result is :func:`map_at_r_score`.
    Greater is better.

    Parameters
    ----------
    R : int, default=100
        Number of retrieved items scored; at most the size of the database.

    Returns
    -------
    scorer : callable
        ``scorer(estimator, X, y) -> float``.

    See Also
    --------
    map_at_r_score : The metric itself.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from sklearn.model_selection import cross_val_score
    >>> from sklearn_hash import ITQ, QuantizedNeighbors
    >>> from sklearn_hash.metrics import make_map_at_r_scorer
    >>> X, y = load_digits(return_X_y=True)
    >>> search = QuantizedNeighbors(ITQ(n_bits=32, random_state=0), n_neighbors=50)
    >>> scores = cross_val_score(search, X, y, cv=3, scoring=make_map_at_r_scorer(R=50))
    >>> bool(scores.mean() > 0.5)
    True
    """
    return _MapAtRScorer(R)
