"""Graded retrieval metrics on a label tree: nDCG@R and its scorer."""

from numbers import Integral

import numpy as np
from sklearn.utils._param_validation import Interval, StrOptions, validate_params

from .._hierarchy import ancestor_table, check_hierarchy, check_tree_labels, lca_depth
from ._retrieval import (
    _CHUNK,
    _check_labels,
    _check_ranking,
    _repr_hierarchy,
    _RetrievalScorer,
    _tie_groups,
)


def graded_gains(y_query, y_database, table, depth):
    """Gain of each database item for each query label row-wise.

    ``y_database`` is (n_queries, n_items) or (n_items,) node ids (-1 =
    unlabelled); the gain is depth(LCA) / depth(query label).
    """
    yq = np.asarray(y_query)
    ydb = np.asarray(y_database)
    if ydb.ndim == 1:
        ydb = np.broadcast_to(ydb, (yq.shape[0], ydb.shape[0]))
    out = np.empty(ydb.shape, dtype=np.float64)
    for start in range(0, yq.shape[0], _CHUNK):
        stop = start + _CHUNK
        q = yq[start:stop, None]
        out[start:stop] = lca_depth(table, q, ydb[start:stop]) / depth[q]
    return out


def _ideal_dcg(y_query, y_database, table, depth, R):
    """DCG of the best possible ranking of the whole database, per query."""
    n_nodes = table.shape[0]
    labelled = y_database[y_database >= 0]
    counts = np.bincount(labelled, minlength=n_nodes)
    present = np.flatnonzero(counts)
    discounts = 1.0 / np.log2(np.arange(2, R + 2))
    out = np.empty(y_query.shape[0])
    for label in np.unique(y_query):
        gains = lca_depth(table, label, present) / depth[label]
        order = np.argsort(-gains, kind="stable")
        ranked = np.repeat(gains[order], counts[present][order])[:R]
        out[y_query == label] = ranked @ discounts[:len(ranked)]
    return out


@validate_params(
    {
        "y_query": ["array-like"],
        "y_database": ["array-like"],
        "neighbors": ["array-like"],
        "hierarchy": ["array-like"],
        "R": [Interval(Integral, 1, None, closed="left"), None],
        "distances": ["array-like", None],
    },
    prefer_skip_nested_validation=True,
)
def ndcg_at_r_score(y_query, y_database, neighbors, *, hierarchy, R=None, distances=None):
    """Normalised discounted cumulative gain over the top R, with graded relevance on a label tree.

    Labels are nodes of a tree (``hierarchy``, a parent array): a leaf (a
    fine label) or an inner node (an item known only at a coarser level).
    The relevance (gain) of a database item to a query is::

        gain = depth(LCA(query label, item label)) / depth(query label)

    with top-level labels at depth 1 and the virtual root above them at
    depth 0: in a two-level tree, the same class gains 1, the same category
    only 0.5, anything else 0. A query labelled at an inner node gains 1
    from every item below it (and from items with its own label). For one
    query with ranked items ``1 .. R``::

        DCG@R = sum_{i <= R} gain_i / log2(i + 1)        (linear gains)
        nDCG@R = DCG@R / IDCG@R

    where IDCG@R is the DCG of the best ranking of the whole database (its
    items sorted by gain). The score is the mean of nDCG@R over the queries.

    Rules, stated because they change the number:

    - **Zero gain**: a query for which no database item has a positive gain
      (IDCG = 0) scores 0.
    - **Unlabelled items** (label ``-1`` in ``y_database``) gain 0; queries
      must be labelled.
    - **R and the database**: as in :func:`map_at_r_score`: ``R`` is at most
      the number of retrieved columns, unless ``neighbors`` ranks the whole
      database, when a larger ``R`` is cut to the database size.
    - **Ties, without distances**: ``neighbors`` is taken as ranked (items at
      equal distance ordered as given, by database index for
      :class:`~sklearn_hash.QuantizedNeighbors`).
    - **Ties, with distances**: the score is the expected nDCG@R over all
      orders of the items inside every group of equal distances. DCG is
      linear in the gains, so the expectation is exact and simple: every
      position of a tied group holds the group's mean gain (equivalently,
      each item of the group gets the mean of the group's discounts), also
      for a group that straddles the cut at R. Groups are read from all the
      columns of ``neighbors``; pass enough columns to hold the group at the
      cut (the scorer of :func:`make_ndcg_at_r_scorer` does).

    Read more in the :ref:`User Guide <hierarchy>`.

    Parameters
    ----------
    y_query : array-like of shape (n_queries,), dtype=int
        Label (node of the tree) of each query.
    y_database : array-like of shape (n_database,), dtype=int
        Label of each database item, ``-1`` for an unlabelled one.
    neighbors : array-like of shape (n_queries, n_retrieved), dtype=int
        Database indices retrieved for each query, best first.
    hierarchy : array-like of shape (n_labels,), dtype=int
        Parent of each label id, ``-1`` for a top-level label (see
        :func:`make_hierarchy`).
    R : int, default=None
        Number of retrieved items scored. ``None`` uses all ``n_retrieved``
        columns.
    distances : array-like of shape (n_queries, n_retrieved), default=None
        Distances of the retrieved items, ascending along each row; given,
        the score is tie-aware (see above).

    Returns
    -------
    score : float
        nDCG@R in [0, 1]; greater is better.

    See Also
    --------
    map_at_r_score : Binary relevance, optionally at one level of the tree.
    make_ndcg_at_r_scorer : The same score as a scorer for model selection.
    make_hierarchy : Build the parent array from pairs or a nested dict.

    References
    ----------
    .. [1] K. Jarvelin and J. Kekalainen, "Cumulated gain-based evaluation of
       IR techniques", ACM TOIS 20(4), 2002.

    Examples
    --------
    >>> from sklearn_hash.metrics import make_hierarchy, ndcg_at_r_score
    >>> hierarchy = make_hierarchy({0: 3, 1: 3, 2: 4})  # 0, 1 in category 3; 2 in 4
    >>> # query of class 0 retrieves a class-1 item (gain 0.5), then class 0 (gain 1):
    >>> # (0.5 / log2(2) + 1 / log2(3)) / (1 / log2(2) + 0.5 / log2(3))
    >>> round(ndcg_at_r_score([0], [1, 0, 2], [[0, 1]], hierarchy=hierarchy), 3)
    0.86
    """
    hierarchy = check_hierarchy(hierarchy)
    y_query = check_tree_labels(_check_labels(y_query, "y_query"), hierarchy, "y_query",
                                allow_unlabelled=False)
    y_database = check_tree_labels(_check_labels(y_database, "y_database"), hierarchy,
                                   "y_database", allow_unlabelled=True)
    neighbors, R, distances = _check_ranking(neighbors, y_query.shape[0],
                                             y_database.shape[0], R, distances,
                                             "ndcg_at_r_score")
    table, depth = ancestor_table(hierarchy)
    discounts = 1.0 / np.log2(np.arange(2, R + 2))
    if distances is None:
        gains = graded_gains(y_query, y_database[neighbors[:, :R]], table, depth)
    else:
        all_gains = graded_gains(y_query, y_database[neighbors], table, depth)
        start, end = _tie_groups(distances)
        rows = np.arange(all_gains.shape[0])[:, None]
        csum = np.concatenate([np.zeros((all_gains.shape[0], 1)),
                               np.cumsum(all_gains, axis=1)], axis=1)
        gains = ((csum[rows, end] - csum[rows, start]) / (end - start))[:, :R]
    dcg = gains @ discounts
    ideal = _ideal_dcg(y_query, y_database, table, depth, R)
    return float(np.mean(np.divide(dcg, ideal, out=np.zeros_like(dcg), where=ideal > 0)))


class _NDCGAtRScorer(_RetrievalScorer):
    _name = "make_ndcg_at_r_scorer"

    def __init__(self, R, ties, hierarchy):
        super().__init__(R, ties)
        self.hierarchy = hierarchy

    def _score(self, y, y_database, neighbors, R, distances):
        return ndcg_at_r_score(y, y_database, neighbors, hierarchy=self.hierarchy, R=R,
                               distances=distances)

    def _extra_repr(self):
        return [_repr_hierarchy(self.hierarchy)]


@validate_params(
    {
        "R": [Interval(Integral, 1, None, closed="left")],
        "hierarchy": ["array-like"],
        "ties": [StrOptions({"index", "average"})],
    },
    prefer_skip_nested_validation=True,
)
def make_ndcg_at_r_scorer(R=100, *, hierarchy, ties="index"):
    """Scorer of graded nDCG@R on a label tree, for :class:`~sklearn.model_selection.GridSearchCV`.

    Called as ``scorer(estimator, X, y)`` with a fitted searcher (or a
    :class:`~sklearn.pipeline.Pipeline` ending in one), as the scorer of
    :func:`make_map_at_r_scorer`: the items the searcher was fitted on are
    the database, with the labels given to ``fit`` (nodes of the tree, -1
    for unlabelled), the rows of ``X`` the queries with labels ``y``; the
    result is :func:`ndcg_at_r_score` over the ``R`` nearest items.

    Parameters
    ----------
    R : int, default=100
        Number of retrieved items scored (cut to the database size).
    hierarchy : array-like of shape (n_labels,), dtype=int
        Parent of each label id, ``-1`` for a top-level label.
    ties : {"index", "average"}, default="index"
        ``"index"`` scores the searcher's ranking as it is; ``"average"``
        passes its distances (the expectation over orders of tied items),
        retrieving more than ``R`` neighbours where a group of ties
        straddles the cut.

    Returns
    -------
    scorer : callable
        ``scorer(estimator, X, y) -> float``.

    See Also
    --------
    ndcg_at_r_score : The metric itself.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.datasets import load_digits
    >>> from sklearn.model_selection import cross_val_score
    >>> from sklearn_hash import ITQ, QuantizedNeighbors
    >>> from sklearn_hash.metrics import make_hierarchy, make_ndcg_at_r_scorer
    >>> X, y = load_digits(return_X_y=True)
    >>> # digits 0-9 under two made-up groups: 10 = {0..4}, 11 = {5..9}
    >>> hierarchy = make_hierarchy({d: 10 + d // 5 for d in range(10)})
    >>> scorer = make_ndcg_at_r_scorer(R=50, hierarchy=hierarchy, ties="average")
    >>> search = QuantizedNeighbors(ITQ(n_bits=32, random_state=0), n_neighbors=50)
    >>> bool(cross_val_score(search, X, y, cv=3, scoring=scorer).mean() > 0.5)
    True
    """
    return _NDCGAtRScorer(R, ties, check_hierarchy(hierarchy))
