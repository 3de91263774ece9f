"""Retrieval metrics: mAP@R (two normalisations, optionally tie-aware, optionally at one
level of a label tree), ANN recall, scorers."""

from numbers import Integral, Real

import numpy as np
from scipy.stats import hypergeom
from sklearn.pipeline import Pipeline
from sklearn.utils import check_array
from sklearn.utils._param_validation import Interval, StrOptions, validate_params
from sklearn.utils.validation import check_is_fitted

from .._hierarchy import ancestor_table, check_hierarchy, check_tree_labels

_CHUNK = 1024


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


def _label_kind(y):
    """"strings", "bytes" or "numbers" (labels of two kinds never compare equal); None: mixed."""
    kinds = {"U": "strings", "S": "bytes"}
    if y.dtype.kind in kinds:
        return kinds[y.dtype.kind]
    if y.dtype.kind in "biuf":
        return "numbers"
    if y.dtype.kind == "O":  # e.g. a pandas column of strings
        found = {"strings" if isinstance(v, str) else "bytes" if isinstance(v, bytes)
                 else "numbers" if isinstance(v, Real) else None for v in y.ravel()}
        return found.pop() if len(found) == 1 else None
    return None


def _check_label_kinds(y_query, y_database):
    """Refuse labels of one kind against labels of another: they would never match."""
    query, database = _label_kind(y_query), _label_kind(y_database)
    if query is not None and database is not None and query != database:
        raise ValueError(f"y_query holds {query} but y_database holds {database}; labels of "
                         f"different kinds never match, so every item would count as "
                         f"irrelevant. Give both the same kind of labels.")


def _check_no_repeats(indices, name):
    """Refuse a row that retrieves the same database item twice (it would count twice).

    Negative entries (faiss's -1 for a missing result) may repeat.
    """
    if indices.shape[1] < 2:
        return
    ordered = np.sort(indices, axis=1)
    repeated = ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any(axis=1)
    if repeated.any():
        row = int(np.flatnonzero(repeated)[0])
        raise ValueError(f"{name} must not repeat a database index within a row (each item "
                         f"is retrieved once); row {row} does.")


def _relevance(y_query, y_database, neighbors):
    """Boolean (n_queries, n_retrieved): is each retrieved item relevant to its query?"""
    if y_query.ndim == 1:
        return y_database[neighbors] == y_query[:, None]
    # Multi-label: relevant when the two rows share at least one label.
    relevant = np.empty(neighbors.shape, dtype=bool)
    yq = y_query.astype(bool)
    ydb = y_database.astype(bool)
    for start in range(0, neighbors.shape[0], _CHUNK):
        stop = start + _CHUNK
        relevant[start:stop] = (ydb[neighbors[start:stop]] & yq[start:stop, None, :]).any(-1)
    return relevant


def _n_relevant_in_database(y_query, y_database):
    """Number of database items relevant to each query, shape (n_queries,)."""
    if y_query.ndim == 1:
        classes, counts = np.unique(y_database, return_counts=True)
        position = np.searchsorted(classes, y_query)
        position = np.minimum(position, len(classes) - 1)
        return np.where(classes[position] == y_query, counts[position], 0)
    ydb = y_database.astype(np.float64)
    yq = y_query.astype(np.float64)
    out = np.empty(y_query.shape[0], dtype=np.int64)
    for start in range(0, yq.shape[0], _CHUNK):
        out[start:start + _CHUNK] = ((yq[start:start + _CHUNK] @ ydb.T) > 0).sum(axis=1)
    return out


def average_precision_at_r(relevant):
    """AP@R of each row of a boolean (n_queries, R) relevance matrix (hits in the top R)."""
    relevant = np.asarray(relevant, dtype=bool)
    hits = np.cumsum(relevant, axis=1)
    ranks = np.arange(1, relevant.shape[1] + 1)
    precision_sum = np.sum((hits / ranks) * relevant, axis=1)
    n_hits = hits[:, -1] if relevant.shape[1] else np.zeros(relevant.shape[0])
    return np.divide(precision_sum, n_hits, out=np.zeros(relevant.shape[0]),
                     where=n_hits > 0)


def _tie_groups(distances):
    """Start and end (exclusive) column of each position's group of equal distances."""
    n_cols = distances.shape[1]
    cols = np.broadcast_to(np.arange(n_cols), distances.shape)
    new = np.ones(distances.shape, dtype=bool)
    new[:, 1:] = distances[:, 1:] != distances[:, :-1]
    start = np.maximum.accumulate(np.where(new, cols, 0), axis=1)
    last = np.ones(distances.shape, dtype=bool)
    last[:, :-1] = new[:, 1:]
    end = np.minimum.accumulate(np.where(last, cols + 1, n_cols)[:, ::-1], axis=1)[:, ::-1]
    return start, end


def _tie_aware_ap(relevant, distances, R, denominator):
    """Expected AP@R over all orders of the tied items (McSherry and Najork 2008).

    ``relevant`` and ``distances`` have all retrieved columns (>= R); the
    groups of equal distances are read from all of them. ``denominator`` is
    None for the "retrieved" normalisation (hits in the top R, a random
    variable when a group straddles the cut) or an array of per-query
    constants for "relevant".
    """
    n_rows = relevant.shape[0]
    rel = relevant.astype(np.float64)
    start, end = _tie_groups(distances)
    rows = np.arange(n_rows)[:, None]
    csum = np.concatenate([np.zeros((n_rows, 1)), np.cumsum(rel, axis=1)], axis=1)
    g = (end - start).astype(np.float64)                   # group size
    r = csum[rows, end] - csum[rows, start]                # relevant items in the group
    before = csum[rows, start]                             # relevant items before the group
    i = np.arange(relevant.shape[1])[None, :] - start      # earlier group members
    k = np.arange(1, relevant.shape[1] + 1)[None, :]       # rank
    pair = np.divide(r * (r - 1), g * (g - 1), out=np.zeros_like(r), where=g > 1)
    # E[P@k rel(k)] = (E[rel(k)] + sum_{j<k} E[rel(j) rel(k)]) / k
    term = ((r / g) * (1.0 + before) + i * pair) / k
    numerator = term[:, :R].sum(axis=1)
    if denominator is not None:
        return np.divide(numerator, denominator, out=np.zeros(n_rows), where=denominator > 0)

    # "retrieved": divide by the hits in the top R. Rows whose last group ends
    # at or before R have a fixed number of hits; a row whose group at the
    # cut extends past R draws m of its r relevant items into the c places
    # left, hypergeometrically, and its AP is averaged over m exactly.
    s_cut, e_cut = start[:, R - 1], end[:, R - 1]
    hits = csum[:, R]
    ap = np.divide(numerator, hits, out=np.zeros(n_rows), where=hits > 0)
    for q in np.flatnonzero(e_cut > R):
        s, e = int(s_cut[q]), int(e_cut[q])
        c, gq = R - s, e - s
        rq = int(csum[q, e] - csum[q, s])
        h = csum[q, s]
        a = term[q, :s].sum()
        ranks = np.arange(s + 1, R + 1, dtype=np.float64)
        s1 = np.sum(1.0 / ranks)
        s2 = np.sum(np.arange(c) / ranks)
        m = np.arange(max(0, c - (gq - rq)), min(c, rq) + 1, dtype=np.float64)
        p = hypergeom.pmf(m, gq, rq, c)
        pair_m = m * (m - 1) / (c * (c - 1)) if c > 1 else np.zeros_like(m)
        num = a + (m / c) * (1.0 + h) * s1 + pair_m * s2
        den = h + m
        ap[q] = np.sum(p * np.divide(num, den, out=np.zeros_like(num), where=den > 0))
    return ap


@validate_params(
    {
        "y_query": ["array-like"],
        "y_database": ["array-like"],
        "neighbors": ["array-like"],
        "R": [Interval(Integral, 1, None, closed="left"), None],
        "distances": ["array-like", None],
        "normalize": [StrOptions({"retrieved", "relevant"})],
        "hierarchy": ["array-like", None],
        "level": [Interval(Integral, 1, None, closed="left"), None],
    },
    prefer_skip_nested_validation=True,
)
def map_at_r_score(y_query, y_database, neighbors, *, R=None, distances=None,
                   normalize="retrieved", hierarchy=None, level=None):
    """Mean average precision over the top R retrieved items (mAP@R).

    For one query with ranked database items ``1 .. R``, let ``rel(k)`` be 1
    when the k-th item is relevant and ``P@k`` the precision of the first k
    items. Then::

        AP@R = (1 / D) * sum_{k <= R} P@k * rel(k)

    and mAP@R is the mean of AP@R over the queries. Two denominators ``D``
    are in use, and they give different numbers:

    - ``normalize="retrieved"`` (default): ``D`` = number of relevant items
      found in the top R. This is the convention of the deep-hashing
      literature (DQN, HashNet and their evaluation code) and the one the
      study this package follows used, so its tables are comparable with
      the study's. It is generous: a query whose only hit is at rank 1,
      followed by ``R - 1`` misses, scores 1.0; the score does not fall
      when relevant items are missing from the top R.
    - ``normalize="relevant"``: ``D = min(R, number of relevant items in the
      database)``. Missed relevant items count against the score, as in
      information-retrieval AP cut at R; with ``R`` = the number of relevant
      items of each class this is MAP@R of Musgrave et al. (2020).

    On ESC-50 YAMNet embeddings (database folds 2-5, queries fold 1, 32
    relevant items per query), exact cosine search scores 0.620 with
    ``"retrieved"`` and 0.442 with ``"relevant"`` at ``R=100``, and 0.392
    with ``"relevant"`` at ``R=32``.

    Rules, stated because they change the number:

    - **Zero hits**: a query with no relevant item in its top R scores 0
      (with either denominator; also when the database holds no item
      relevant to it).
    - **R and the database**: ``R`` is at most the number of retrieved
      columns, except when ``neighbors`` ranks the whole database
      (``n_retrieved == n_database``): a larger ``R`` is then cut to the
      database size.
    - **Ties, without distances** (``distances=None``): ``neighbors`` is
      taken as ranked. :class:`~sklearn_hash.QuantizedNeighbors` ranks items
      at equal distance by ascending database index, so its rankings are
      deterministic, but the score then depends on the order of the database
      (with short codes most distances tie).
    - **Ties, with distances**: items at exactly equal distance form a tied
      group, and the score is the expected AP@R over all orders of the items
      inside every group, which does not depend on how ``neighbors`` orders
      them. With ``"relevant"`` this is the tie-aware AP of McSherry and
      Najork (2008), in closed form. With ``"retrieved"`` the denominator is
      itself random when a group straddles the cut at R (only some of its
      items are in the top R); the expectation is then taken exactly over
      the hypergeometric number of its relevant items drawn into the top R.
    - **A group at the cut**: groups are read from all the columns of
      ``neighbors``, which may extend beyond R. The last group of a row is
      assumed to end at the last column: items at the same distance beyond
      it are unknown to the metric. So when a group straddles the cut, pass
      enough columns to hold all of it (the scorer of
      :func:`make_map_at_r_scorer` retrieves more neighbours until it has);
      with exactly R columns, the part of the group inside the top R is
      treated as the whole group.
    - **Relevance**: with 1-D labels an item is relevant when its class
      equals the query's; with 2-D 0/1 indicator rows (multi-label) when
      the two rows share at least one label.
    - **One level of a label tree** (``hierarchy`` and ``level=k``): labels
      are nodes of the tree (a leaf, or an inner node for an item known only
      at that level) and an item is relevant when its label and the query's
      have the same ancestor at depth ``k`` (top-level nodes have depth 1;
      a node at depth ``k`` is its own ancestor there). ``level=1`` is
      coarse mAP (same top-level category); on a two-level tree ``level=2``
      is the flat mAP of the fine labels. Database items labelled above
      depth ``k`` (back-off labels), or ``-1`` (unlabelled), are never
      relevant at that level; a query labelled above depth ``k`` is an
      error (it has no ancestor there).

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
        Number of retrieved items scored. ``None`` uses all ``n_retrieved``
        columns.
    distances : array-like of shape (n_queries, n_retrieved), default=None
        Distances of the retrieved items, ascending along each row, as
        returned by ``kneighbors``; given, the score is tie-aware (see
        above). Only their order and equalities matter, not their units.
    normalize : {"retrieved", "relevant"}, default="retrieved"
        Denominator of AP@R: the number of relevant items found in the top
        R (the study's definition), or ``min(R, number of relevant items in
        the database)``.
    hierarchy : array-like of shape (n_labels,), dtype=int, default=None
        Parent of each label id, ``-1`` for a top-level label (see
        :func:`make_hierarchy`); requires 1-D integer labels and ``level``.
    level : int, default=None
        With ``hierarchy``: the depth at which relevance is decided (1 = the
        top level). Required with ``hierarchy``, refused without it.

    Returns
    -------
    score : float
        mAP@R in [0, 1]; greater is better.

    See Also
    --------
    make_map_at_r_scorer : The same score as a scorer for model selection.
    ndcg_at_r_score : Graded relevance on a label tree.
    recall_at_k_score : Recall of approximate against exact neighbours.

    References
    ----------
    .. [1] F. McSherry and M. Najork, "Computing Information Retrieval
       Performance Measures Efficiently in the Presence of Tied Scores",
       ECIR 2008.
    .. [2] K. Musgrave, S. Belongie and S.-N. Lim, "A Metric Learning
       Reality Check", ECCV 2020.

    Examples
    --------
    >>> from sklearn_hash.metrics import map_at_r_score
    >>> y_database = [0, 1, 0, 1, 0]
    >>> # query of class 0 retrieves items 0 (hit), 1 (miss), 2 (hit)
    >>> map_at_r_score([0], y_database, [[0, 1, 2]])  # (1/1 + 2/3) / 2
    0.833...
    >>> # three items of class 0 in the database: divide by min(3, 3)
    >>> map_at_r_score([0], y_database, [[0, 1, 2]], normalize="relevant")
    0.555...
    >>> # items 1 and 2 tie: the mean of 0.833... and 1.0
    >>> map_at_r_score([0], y_database, [[0, 1, 2]], distances=[[0.0, 1.0, 1.0]])
    0.916...
    >>> # labels 0, 1 under category 3, label 2 under 4: coarse relevance
    >>> map_at_r_score([0], [1, 2, 0], [[0, 1, 2]], hierarchy=[3, 3, 4, -1, -1], level=1)
    0.833...
    """
    if hierarchy is not None or level is not None:
        y_query, y_database = _labels_at_level(y_query, y_database, hierarchy, level)
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
    _check_label_kinds(y_query, y_database)
    neighbors, R, distances = _check_ranking(neighbors, y_query.shape[0],
                                             y_database.shape[0], R, distances,
                                             "map_at_r_score")

    denominator = None
    if normalize == "relevant":
        denominator = np.minimum(R, _n_relevant_in_database(y_query, y_database))
    if distances is None:
        relevant = _relevance(y_query, y_database, neighbors[:, :R])
        if denominator is None:
            return float(np.mean(average_precision_at_r(relevant)))
        distances = np.broadcast_to(np.arange(R, dtype=np.float64), relevant.shape)
    else:
        relevant = _relevance(y_query, y_database, neighbors)
    return float(np.mean(_tie_aware_ap(relevant, distances, R, denominator)))


def _labels_at_level(y_query, y_database, hierarchy, level):
    """Each label replaced by its ancestor at depth ``level``.

    Database labels with no ancestor there (above the level, or -1) become
    -2, which matches no query; a query without one is an error.
    """
    if hierarchy is None:
        raise ValueError("level is the depth of a label tree: pass hierarchy too, or "
                         "leave level=None.")
    if level is None:
        raise ValueError("With a hierarchy, map_at_r_score scores one level of the tree: "
                         "pass level=k (1 = the top level).")
    hierarchy = check_hierarchy(hierarchy)
    yq = check_tree_labels(_check_labels(y_query, "y_query"), hierarchy, "y_query",
                           allow_unlabelled=False)
    ydb = check_tree_labels(_check_labels(y_database, "y_database"), hierarchy,
                            "y_database", allow_unlabelled=True)
    table, depth = ancestor_table(hierarchy)
    if level > table.shape[1]:
        raise ValueError(f"level={level} is deeper than the hierarchy, whose deepest "
                         f"label is at depth {table.shape[1]}.")
    above = depth[yq] < level
    if above.any():
        q = int(np.flatnonzero(above)[0])
        raise ValueError(f"Query {q} is labelled {yq[q]}, at depth {depth[yq[q]]}: it has "
                         f"no ancestor at level={level}. Score such queries at a level "
                         f"<= their depth.")
    db_at = np.where(ydb >= 0, table[np.maximum(ydb, 0), level - 1], -2)
    return table[yq, level - 1], np.where(db_at >= 0, db_at, -2)


@validate_params(
    {"neighbors": ["array-like"], "true_neighbors": ["array-like"]},
    prefer_skip_nested_validation=True,
)
def recall_at_k_score(neighbors, true_neighbors):
    """Recall of approximate nearest neighbours: the share of the true ones found.

    For each query, the number of its ``k`` true nearest neighbours (the
    columns of ``true_neighbors``, from an exact search) that appear among
    the columns of ``neighbors`` (from the approximate search), divided by
    ``k``; averaged over the queries. With ``k`` columns in both this is
    faiss's ``k-recall@k``; with more columns in ``neighbors`` (say 100
    against 10) it is recall 10@100. The order within a row does not matter.
    Ties in the exact search are not resolved: ``true_neighbors`` is the set
    that counts.

    Parameters
    ----------
    neighbors : array-like of shape (n_queries, n_retrieved), dtype=int
        Database indices returned by the approximate search; a negative
        entry (faiss's -1 where a search found fewer than ``n_retrieved``
        items) is a missing result and matches nothing.
    true_neighbors : array-like of shape (n_queries, k), dtype=int
        Database indices of each query's true ``k`` nearest neighbours,
        all at least 0.

    Returns
    -------
    score : float
        Recall in [0, 1]; greater is better.

    See Also
    --------
    map_at_r_score : Retrieval quality against class labels.

    Examples
    --------
    >>> from sklearn_hash.metrics import recall_at_k_score
    >>> recall_at_k_score([[3, 1, 7], [0, 2, 4]], [[1, 3], [5, 4]])
    0.75
    """
    neighbors = check_array(neighbors, dtype=None, ensure_min_features=0,
                            input_name="neighbors")
    true_neighbors = check_array(true_neighbors, dtype=None, input_name="true_neighbors")
    for name, array in (("neighbors", neighbors), ("true_neighbors", true_neighbors)):
        if array.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integer database indices; got dtype "
                            f"{array.dtype}.")
    if neighbors.shape[0] != true_neighbors.shape[0]:
        raise ValueError(f"neighbors has {neighbors.shape[0]} rows but true_neighbors "
                         f"has {true_neighbors.shape[0]}; they must match.")
    if true_neighbors.size and true_neighbors.min() < 0:
        raise ValueError(f"true_neighbors must hold database indices >= 0 (each query's k "
                         f"true neighbours); got {true_neighbors.min()}.")
    _check_no_repeats(neighbors, "neighbors")
    _check_no_repeats(true_neighbors, "true_neighbors")
    # A missing result (negative) is never one of the true neighbours, all >= 0.
    found = [np.isin(t, n).sum() for n, t in zip(neighbors, true_neighbors)]
    return float(np.mean(found) / true_neighbors.shape[1])


class _RetrievalScorer:
    """A metric of a fitted searcher: the fitted database against the queries X.

    Subclasses set ``_name`` and define ``_score(y, y_database, neighbors,
    R, distances)`` and ``_extra_repr()``.
    """

    def __init__(self, R, ties):
        self.R = R
        self.ties = ties

    def __call__(self, estimator, X, y):
        searcher, Xt = estimator, X
        if isinstance(estimator, Pipeline):
            searcher = estimator.steps[-1][1]
            if len(estimator.steps) > 1:
                Xt = estimator[:-1].transform(X)
        if not hasattr(searcher, "kneighbors"):
            raise TypeError(
                f"{self._name} scores a QuantizedNeighbors or a Pipeline "
                f"ending in one; got {type(searcher).__name__}."
            )
        check_is_fitted(searcher)
        y_database = getattr(searcher, "_fit_y", None)
        if y_database is None:
            raise ValueError(
                f"{self._name} needs the labels of the database, which "
                f"{type(searcher).__name__} does not hold: fit a QuantizedNeighbors or "
                f"IVFQuantizedNeighbors with y."
            )
        # Removed items (awaiting compact) are not part of the database: the
        # labels and indices are those of the live items, as after compact.
        renumber = None
        if getattr(searcher, "n_removed_", 0):
            live, renumber = searcher._compact_mapping()
            y_database = y_database[live]
        n_database = len(y_database)
        R = min(self.R, n_database)
        if self.ties == "index":
            neighbors = searcher.kneighbors(Xt, n_neighbors=R, return_distance=False)
            distances = None
        else:
            # Retrieve more neighbours until every row's group of ties at the cut
            # has ended (or the whole database is ranked).
            n = R
            while True:
                distances, neighbors = searcher.kneighbors(Xt, n_neighbors=n)
                if n == n_database or (distances[:, n - 1] > distances[:, R - 1]).all():
                    break
                n = min(2 * n, n_database)
        if renumber is not None:
            neighbors = renumber[neighbors]
        return self._score(y, y_database, neighbors, R, distances)

    def __repr__(self):
        args = [f"R={self.R}"] + self._extra_repr()
        if self.ties != "index":
            args.append(f"ties={self.ties!r}")
        return f"{self._name}({', '.join(args)})"


def _repr_hierarchy(hierarchy):
    return f"hierarchy=<{len(hierarchy)} labels>"


class _MapAtRScorer(_RetrievalScorer):
    """mAP@R of a fitted searcher (optionally at one level of a label tree)."""

    _name = "make_map_at_r_scorer"

    def __init__(self, R, normalize, ties, hierarchy=None, level=None):
        super().__init__(R, ties)
        self.normalize = normalize
        self.hierarchy = hierarchy
        self.level = level

    def _score(self, y, y_database, neighbors, R, distances):
        return map_at_r_score(y, y_database, neighbors, R=R, distances=distances,
                              normalize=self.normalize, hierarchy=self.hierarchy,
                              level=self.level)

    def _extra_repr(self):
        args = []
        if self.normalize != "retrieved":
            args.append(f"normalize={self.normalize!r}")
        if self.hierarchy is not None:
            args += [_repr_hierarchy(self.hierarchy), f"level={self.level}"]
        return args


@validate_params(
    {
        "R": [Interval(Integral, 1, None, closed="left")],
        "normalize": [StrOptions({"retrieved", "relevant"})],
        "ties": [StrOptions({"index", "average"})],
        "hierarchy": ["array-like", None],
        "level": [Interval(Integral, 1, None, closed="left"), None],
    },
    prefer_skip_nested_validation=True,
)
def make_map_at_r_scorer(R=100, *, normalize="retrieved", ties="index", hierarchy=None,
                         level=None):
    """Scorer of mAP@R for :class:`~sklearn.model_selection.GridSearchCV` and friends.

    The scorer is called as ``scorer(estimator, X, y)`` with a fitted
    :class:`~sklearn_hash.QuantizedNeighbors` (or any searcher with
    ``kneighbors(X, n_neighbors, return_distance=True)``), or a
    :class:`~sklearn.pipeline.Pipeline` ending in one. The items the searcher
    was fitted on (the training fold) are the database, with the labels given
    to ``fit``; the rows of ``X`` (the validation fold) are the queries, run
    through the pipeline's earlier steps first. Each query retrieves its ``R``
    nearest database items and the result is :func:`map_at_r_score`.
    Greater is better. An ``R`` larger than the database is cut to its size.
    Items removed from the searcher (awaiting ``compact()``) are not part of
    the database.

    Parameters
    ----------
    R : int, default=100
        Number of retrieved items scored.
    normalize : {"retrieved", "relevant"}, default="retrieved"
        Denominator of AP@R, see :func:`map_at_r_score`: ``"retrieved"`` is
        the study's definition, ``"relevant"`` also charges the relevant
        items missing from the top R.
    ties : {"index", "average"}, default="index"
        ``"index"`` scores the searcher's ranking as it is (items at equal
        distance ordered by database index). ``"average"`` passes the
        searcher's distances, so the score is the expectation over all
        orders of tied items; the scorer then retrieves more than ``R``
        neighbours where needed (doubling, up to the whole database) so
        that every group of ties at the cut is complete.
    hierarchy : array-like of shape (n_labels,), dtype=int, default=None
        Label tree (parent array, see :func:`make_hierarchy`); with
        ``level``, mAP@R at one level of the tree, see :func:`map_at_r_score`.
    level : int, default=None
        Depth at which relevance is decided; required with ``hierarchy``.

    Returns
    -------
    scorer : callable
        ``scorer(estimator, X, y) -> float``.

    See Also
    --------
    map_at_r_score : The metric itself.
    make_ndcg_at_r_scorer : Graded relevance on a label tree.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from sklearn.model_selection import cross_val_score
    >>> from sklearn_hash import ITQ, QuantizedNeighbors
    >>> from sklearn_hash.metrics import make_map_at_r_scorer
    >>> X, y = load_digits(return_X_y=True)
    >>> search = QuantizedNeighbors(ITQ(n_bits=32, random_state=0), n_neighbors=50)
    >>> scorer = make_map_at_r_scorer(R=50, normalize="relevant", ties="average")
    >>> scores = cross_val_score(search, X, y, cv=3, scoring=scorer)
    >>> bool(scores.mean() > 0.4)
    True
    """
    if (hierarchy is None) != (level is None):
        raise ValueError("make_map_at_r_scorer: hierarchy and level go together (mAP@R at "
                         "one level of a label tree); pass both or neither.")
    if hierarchy is not None:
        hierarchy = check_hierarchy(hierarchy)
    return _MapAtRScorer(R, normalize, ties, hierarchy, level)


def _check_ranking(neighbors, n_queries, n_database, R, distances, name):
    """Validate a ranking (``neighbors``, optional ``distances``) and resolve R.

    Shared by the retrieval metrics: integer indices into the database, one
    row per query, R between 1 and the retrieved items (the whole database
    when every item is ranked), distances of the same shape ascending along
    each row.
    """
    neighbors = check_array(neighbors, dtype=None, ensure_min_samples=0,
                            ensure_min_features=0, input_name="neighbors")
    if neighbors.dtype.kind not in "iu":
        raise TypeError(f"neighbors must hold integer database indices; got dtype "
                        f"{neighbors.dtype}.")
    if neighbors.shape[0] != n_queries:
        raise ValueError(f"neighbors has {neighbors.shape[0]} rows but y_query has "
                         f"{n_queries} queries; they must match.")
    if neighbors.shape[0] == 0:
        raise ValueError(f"{name} needs at least one query; got 0.")
    if neighbors.size and (neighbors.min() < 0 or neighbors.max() >= n_database):
        raise ValueError(f"neighbors must be indices in [0, {n_database - 1}] "
                         f"of y_database; got values in [{neighbors.min()}, "
                         f"{neighbors.max()}].")
    _check_no_repeats(neighbors, "neighbors")
    n_retrieved = neighbors.shape[1]
    if R is None:
        R = n_retrieved
    if R > n_retrieved and n_retrieved == n_database:
        R = n_retrieved  # the whole database is ranked: AP@R is the full AP
    if R > n_retrieved or R < 1:
        raise ValueError(f"R={R} must be between 1 and the {n_retrieved} "
                         f"retrieved items per query in neighbors.")
    if distances is not None:
        distances = check_array(distances, dtype=np.float64, ensure_min_samples=0,
                                ensure_min_features=0, input_name="distances")
        if distances.shape != neighbors.shape:
            raise ValueError(f"distances must have the shape of neighbors, "
                             f"{neighbors.shape}; got {distances.shape}.")
        if (np.diff(distances, axis=1) < 0).any():
            row = int(np.flatnonzero((np.diff(distances, axis=1) < 0).any(axis=1))[0])
            raise ValueError(f"distances must be ascending along each row (the best "
                             f"neighbour first); row {row} is not.")
    return neighbors, R, distances
