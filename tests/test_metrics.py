"""mAP@R against hand-computed cases and brute-force oracles, recall, the scorer."""

from itertools import permutations, product

import numpy as np
import pytest

from sklearn_hash import ITQ, QuantizedNeighbors, QuantizedNeighborsTransformer
from sklearn_hash.metrics import (
    make_map_at_r_scorer,
    map_at_r_score,
    ndcg_at_r_score,
    recall_at_k_score,
)


def test_hand_computed_single_query():
    # Ranking: hit, miss, hit, miss, hit -> (1/1 + 2/3 + 3/5) / 3
    y_db = [0, 1, 0, 1, 0]
    score = map_at_r_score([0], y_db, [[0, 1, 2, 3, 4]])
    assert score == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)


def test_zero_hit_query_scores_zero_and_enters_the_mean():
    y_db = [0, 0, 1, 1]
    # Query 0 (class 0) retrieves only class-1 items: AP = 0; query 1 is perfect.
    score = map_at_r_score([0, 1], y_db, [[2, 3], [2, 3]])
    assert score == pytest.approx(0.5)


def test_R_truncates_the_ranking():
    y_db = [1, 0, 0, 0]
    neighbors = [[1, 2, 0, 3]]
    assert map_at_r_score([0], y_db, neighbors, R=2) == pytest.approx(1.0)
    # Hits at ranks 1, 2 and 4.
    assert map_at_r_score([0], y_db, neighbors, R=4) == pytest.approx((1 + 1 + 3 / 4) / 3)
    # Three of the four items retrieved: R cannot exceed them.
    with pytest.raises(ValueError, match="R=4"):
        map_at_r_score([0], y_db, [[1, 2, 0]], R=4)


def test_multilabel_relevance_is_shared_label():
    y_db = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    y_q = np.array([[0, 1, 0]])
    # Retrieved 3 (miss), 2 (hit: shares label 1), 1 (hit), 0 (miss).
    score = map_at_r_score(y_q, y_db, [[3, 2, 1, 0]])
    assert score == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_ties_are_ranked_by_database_index():
    # Database items 0..3 share one code, so all are at distance 0 from the
    # query; the searcher ranks them 0, 1, 2, 3 and mAP@R follows that order.
    X_db = np.array([[1.0, 1.0]] * 4 + [[-1.0, -1.0]] * 4)
    y_db = np.array([1, 0, 0, 1, 0, 0, 0, 0])

    class SignOfFirstFeature(ITQ):
        def _hash(self, X):
            return X[:, :1] > 0

    search = QuantizedNeighbors(SignOfFirstFeature(n_bits=1), n_neighbors=4)
    search.fit(X_db, y_db)
    dist, ind = search.kneighbors([[2.0, 0.5]])
    np.testing.assert_array_equal(ind, [[0, 1, 2, 3]])
    np.testing.assert_array_equal(dist, [[0, 0, 0, 0]])
    # Hits at ranks 1 and 4: (1/1 + 2/4) / 2.
    assert search.score([[2.0, 0.5]], [1]) == pytest.approx(0.75)


def test_perfect_and_worst_rankings():
    rng = np.random.default_rng(0)
    y_db = rng.integers(0, 3, 60)
    y_q = np.array([0, 1, 2])
    best = np.array([np.argsort(y_db != c, kind="stable")[:10] for c in y_q])
    worst = np.array([np.argsort(y_db == c, kind="stable")[:10] for c in y_q])
    assert map_at_r_score(y_q, y_db, best) == 1.0
    assert map_at_r_score(y_q, y_db, worst) == 0.0


def test_matches_a_direct_loop():
    rng = np.random.default_rng(3)
    y_db = rng.integers(0, 4, 50)
    y_q = rng.integers(0, 4, 7)
    neighbors = np.array([rng.permutation(50)[:12] for _ in range(7)])
    expected = []
    for q in range(7):
        hits, total = 0, 0.0
        for rank, item in enumerate(neighbors[q], start=1):
            if y_db[item] == y_q[q]:
                hits += 1
                total += hits / rank
        expected.append(total / hits if hits else 0.0)
    assert map_at_r_score(y_q, y_db, neighbors) == pytest.approx(np.mean(expected))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"neighbors": [[0.5, 1.0]]}, TypeError, "integer database indices"),
        ({"neighbors": [[0, 9]]}, ValueError, r"indices in \[0, 3\]"),
        ({"neighbors": [[0, 1], [1, 2]]}, ValueError, "2 rows but y_query has 1"),
        ({"y_query": [[0, 1]]}, ValueError, "same form"),
        ({"y_database": [[0, 2], [1, 0], [0, 1], [1, 1]], "y_query": [[0, 1]]}, ValueError, "0/1"),
        ({"R": 0}, ValueError, "R"),
    ],
)
def test_bad_input(kwargs, error, match):
    arguments = {"y_query": [0], "y_database": [0, 1, 0, 1], "neighbors": [[0, 1]]}
    arguments.update(kwargs)
    R = arguments.pop("R", None)
    with pytest.raises(error, match=match):
        map_at_r_score(**arguments, R=R)


def test_scorer_repr_and_direct_use():
    scorer = make_map_at_r_scorer(R=5)
    assert repr(scorer) == "make_map_at_r_scorer(R=5)"
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 8))
    y = rng.integers(0, 3, 60)
    search = QuantizedNeighbors(ITQ(n_bits=4, random_state=0), n_neighbors=5).fit(X[:40], y[:40])
    assert scorer(search, X[40:], y[40:]) == pytest.approx(search.score(X[40:], y[40:]))
    with pytest.raises(ValueError, match="which QuantizedNeighbors does not hold"):
        scorer(QuantizedNeighbors(ITQ(n_bits=4)).fit(X), X, y)
    # a transformer fitted with y keeps no labels: the message said "fit ... with y"
    transformer = QuantizedNeighborsTransformer(ITQ(n_bits=4, random_state=0)).fit(X, y)
    with pytest.raises(ValueError, match="QuantizedNeighborsTransformer does not hold"):
        scorer(transformer, X, y)
    with pytest.raises(ValueError, match="score needs the labels y of the queries X"):
        search.score(X[40:], None)


# --------------------------------------------------------------------------
# Two normalisations, tie-aware scores and their brute-force oracles.


def _ap_of_ranking(rel, R, denominator):
    """AP@R of one fixed 0/1 ranking; denominator None = hits in the top R."""
    rel = list(rel)[:R]
    hits, total = 0, 0.0
    for k, r in enumerate(rel, start=1):
        if r:
            hits += 1
            total += hits / k
    d = hits if denominator is None else denominator
    return total / d if d else 0.0


def _oracle(rel, dist, R, denominator):
    """Mean AP@R over every order of the items inside each tied group."""
    groups = []
    for r, d in zip(rel, dist):
        if groups and groups[-1][0] == d:
            groups[-1][1].append(r)
        else:
            groups.append((d, [r]))
    orders = [list(permutations(g)) for _, g in groups]
    scores = [_ap_of_ranking([x for part in choice for x in part], R, denominator)
              for choice in product(*orders)]
    return np.mean(scores)


def _random_case(rng, n_cols):
    rel = rng.integers(0, 2, n_cols)
    dist = np.sort(rng.integers(0, 4, n_cols)).astype(float)
    return rel, dist


@pytest.mark.parametrize("normalize", ["retrieved", "relevant"])
def test_tie_aware_matches_brute_force_over_all_orders(normalize):
    rng = np.random.default_rng(0)
    for trial in range(40):
        n_cols = int(rng.integers(1, 8))
        R = int(rng.integers(1, n_cols + 1))
        rel, dist = _random_case(rng, n_cols)
        # Database: the retrieved items plus some relevant items not retrieved.
        n_extra = int(rng.integers(0, 3))
        y_db = np.concatenate([np.where(rel == 1, 0, 1), np.zeros(n_extra, int)])
        n_rel_db = int((y_db == 0).sum())
        denominator = None if normalize == "retrieved" else min(R, n_rel_db)
        expected = _oracle(rel, dist, R, denominator)
        got = map_at_r_score([0], y_db, [np.arange(n_cols)], R=R, distances=[dist],
                             normalize=normalize)
        assert got == pytest.approx(expected, abs=1e-12), (trial, rel, dist, R)


def test_hand_cases_for_each_definition():
    # Hits at ranks 1 and 3 of 4; the database holds 4 relevant items.
    y_db = [0, 1, 0, 1, 0, 0]
    neighbors = [[0, 1, 2, 3]]
    assert map_at_r_score([0], y_db, neighbors) == pytest.approx((1 + 2 / 3) / 2)
    assert map_at_r_score([0], y_db, neighbors, normalize="relevant") == pytest.approx(
        (1 + 2 / 3) / 4)
    # One hit at rank 1 then misses: 1.0 by hits found, 1/4 by min(R, 4).
    assert map_at_r_score([0], y_db, [[0, 1, 3]]) == 1.0
    assert map_at_r_score([0], y_db, [[0, 1, 3]], normalize="relevant") == pytest.approx(1 / 3)
    # Fewer relevant items in the database than R: divide by their number.
    y_db = [0, 1, 1, 1, 0]
    assert map_at_r_score([0], y_db, [[0, 1, 2, 4]], normalize="relevant") == pytest.approx(
        (1 + 2 / 4) / 2)


def test_hand_case_ties():
    # A hit and a miss tied at the top, then a hit: orders (h, m, h) and (m, h, h).
    y_db = [0, 1, 0]
    d = [[1.0, 1.0, 2.0]]
    ret = ((1 + 2 / 3) / 2 + (1 / 2 + 2 / 3) / 2) / 2
    assert map_at_r_score([0], y_db, [[0, 1, 2]], distances=d) == pytest.approx(ret)
    rel = ((1 + 2 / 3) / 2 + (1 / 2 + 2 / 3) / 2) / 2
    assert map_at_r_score([0], y_db, [[0, 1, 2]], distances=d,
                          normalize="relevant") == pytest.approx(rel)


def test_straddling_group_retrieved_is_exact_over_hypergeometric_draws():
    # Four items tie at the cut R=2 (one hit, three misses): the top 2 holds
    # the hit with probability 1/2; AP is 1 or 1/2 given it is at rank 1 or 2.
    y_db = [0, 1, 1, 1]
    got = map_at_r_score([0], y_db, [[1, 2, 0, 3]], R=2, distances=[[0.0] * 4])
    # P(hit at rank 1) = 1/4 (AP 1), P(rank 2) = 1/4 (AP 1/2), else 0 hits (AP 0).
    assert got == pytest.approx(0.25 * 1 + 0.25 * 0.5)
    relevant = map_at_r_score([0], y_db, [[1, 2, 0, 3]], R=2, distances=[[0.0] * 4],
                              normalize="relevant")
    assert relevant == pytest.approx(0.25 * 1 + 0.25 * 0.5)  # min(R, 1) = 1


def test_group_at_the_cut_is_assumed_to_end_at_the_last_column():
    # The same four tied items, but only the first R=2 columns are passed:
    # the metric sees a group of two (a miss and a miss) and cannot know of
    # the hit beyond; with all four columns it averages over the whole group.
    y_db = [0, 1, 1, 1]
    cut = map_at_r_score([0], y_db, [[1, 2]], distances=[[0.0, 0.0]])
    assert cut == 0.0
    full = map_at_r_score([0], y_db, [[1, 2, 0, 3]], R=2, distances=[[0.0] * 4])
    assert full > 0
    # Columns beyond a later group change nothing.
    d = [[0.0, 0.0, 0.0, 0.0, 5.0]]
    y_db = [0, 1, 1, 1, 0]
    assert map_at_r_score([0], y_db, [[1, 2, 0, 3, 4]], R=2, distances=d) == pytest.approx(full)


@pytest.mark.parametrize("normalize", ["retrieved", "relevant"])
def test_permuting_tied_items_leaves_the_tie_aware_score_unchanged(normalize):
    rng = np.random.default_rng(1)
    y_db = rng.integers(0, 3, 80)
    y_q = rng.integers(0, 3, 20)
    neighbors = np.array([rng.permutation(80)[:30] for _ in range(20)])
    distances = np.sort(rng.integers(0, 5, (20, 30)), axis=1).astype(float)
    base = map_at_r_score(y_q, y_db, neighbors, R=10, distances=distances, normalize=normalize)
    shuffled = neighbors.copy()
    for q in range(20):
        for value in np.unique(distances[q]):
            cols = np.flatnonzero(distances[q] == value)
            shuffled[q, cols] = neighbors[q, rng.permutation(cols)]
    assert not np.array_equal(shuffled, neighbors)
    assert map_at_r_score(y_q, y_db, neighbors, R=10) != pytest.approx(
        map_at_r_score(y_q, y_db, shuffled, R=10))  # the index-tie score moves
    assert map_at_r_score(y_q, y_db, shuffled, R=10, distances=distances,
                          normalize=normalize) == pytest.approx(base, abs=1e-12)


@pytest.mark.parametrize("normalize", ["retrieved", "relevant"])
def test_distinct_distances_give_the_ranked_score(normalize):
    rng = np.random.default_rng(2)
    y_db = rng.integers(0, 4, 50)
    y_q = rng.integers(0, 4, 7)
    neighbors = np.array([rng.permutation(50)[:12] for _ in range(7)])
    distances = np.cumsum(rng.random((7, 12)), axis=1)
    assert map_at_r_score(y_q, y_db, neighbors, distances=distances,
                          normalize=normalize) == pytest.approx(
        map_at_r_score(y_q, y_db, neighbors, normalize=normalize))


def test_zero_hits_and_no_relevant_items_score_zero():
    y_db = [1, 1, 2, 2]
    for normalize in ("retrieved", "relevant"):
        # class 0 has no item in the database; class 1 has two, none retrieved
        assert map_at_r_score([0], y_db, [[0, 2]], normalize=normalize) == 0.0
        assert map_at_r_score([1], y_db, [[2, 3]], normalize=normalize) == 0.0
        assert map_at_r_score([0], y_db, [[0, 2]], distances=[[0.0, 0.0]],
                              normalize=normalize) == 0.0


def test_R_larger_than_the_database_is_cut_when_all_of_it_is_ranked():
    y_db = [0, 1, 0]
    whole = [[0, 1, 2]]
    assert map_at_r_score([0], y_db, whole, R=10) == map_at_r_score([0], y_db, whole)
    assert map_at_r_score([0], y_db, whole, R=10, normalize="relevant") == pytest.approx(
        (1 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="R=10"):
        map_at_r_score([0], y_db, [[0, 1]], R=10)


@pytest.mark.parametrize("distances", [None, [[0.0, 0.0, 1.0, 1.0]]])
def test_multilabel_relevant_normalisation(distances):
    y_db = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [0, 1, 1]])
    y_q = np.array([[0, 1, 0]])
    # Relevant in the database: items 1, 2, 4 (three); retrieved 3, 2, 1, 0.
    got = map_at_r_score(y_q, y_db, [[3, 2, 1, 0]], distances=distances,
                         normalize="relevant")
    if distances is None:
        assert got == pytest.approx((1 / 2 + 2 / 3) / 3)
    else:
        # (miss, hit) tied, then (hit, miss) tied: the mean of four orders.
        orders = [(1 / 2 + 2 / 3), (1 / 2 + 2 / 4), (1 + 2 / 3), (1 + 2 / 4)]
        assert got == pytest.approx(np.mean(orders) / 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"distances": [[0.0, 1.0, 2.0]]}, "shape of neighbors"),
        ({"distances": [[1.0, 0.0]]}, "ascending along each row"),
        ({"normalize": "hits"}, "normalize"),
    ],
)
def test_bad_tie_and_normalize_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        map_at_r_score([0], [0, 1, 0, 1], [[0, 1]], **kwargs)


def test_recall_at_k():
    assert recall_at_k_score([[3, 1, 7], [0, 2, 4]], [[1, 3], [5, 4]]) == 0.75
    assert recall_at_k_score([[1, 2]], [[2, 1]]) == 1.0
    with pytest.raises(ValueError, match="must match"):
        recall_at_k_score([[1, 2]], [[2, 1], [0, 1]])
    with pytest.raises(TypeError, match="integer"):
        recall_at_k_score([[1.5, 2]], [[2, 1]])


def test_scorer_ties_and_normalize_against_the_metric():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 8))
    y = rng.integers(0, 3, 300)
    search = QuantizedNeighbors(ITQ(n_bits=4, random_state=0), n_neighbors=5).fit(X[:200], y[:200])
    scorer = make_map_at_r_scorer(R=20, normalize="relevant", ties="average")
    assert repr(scorer) == "make_map_at_r_scorer(R=20, normalize='relevant', ties='average')"
    # 4-bit codes: groups of ties straddle the cut; the oracle ranks everything.
    dist, ind = search.kneighbors(X[200:], n_neighbors=200)
    expected = map_at_r_score(y[200:], y[:200], ind, R=20, distances=dist, normalize="relevant")
    assert scorer(search, X[200:], y[200:]) == pytest.approx(expected)
    index = make_map_at_r_scorer(R=20, normalize="relevant")
    assert index(search, X[200:], y[200:]) == pytest.approx(
        map_at_r_score(y[200:], y[:200], ind, R=20, normalize="relevant"))
    # R beyond the database: cut to its size.
    big = make_map_at_r_scorer(R=1000, ties="average")
    assert big(search, X[200:], y[200:]) == pytest.approx(
        map_at_r_score(y[200:], y[:200], ind, distances=dist))


@pytest.mark.parametrize("score", [
    lambda nb: map_at_r_score([0], [0, 1, 1, 1], nb, normalize="relevant"),
    lambda nb: map_at_r_score([0], [0, 1, 1, 1], nb),
    lambda nb: ndcg_at_r_score([0], [0, 1, 1, 1], nb, hierarchy=[2, 2, -1]),
    lambda nb: recall_at_k_score(nb, [[0, 1]]),
    lambda nb: recall_at_k_score([[0, 1]], nb),
])
def test_repeated_neighbours_are_refused(score):
    # [[0, 0]] counted item 0 twice: map_at_r_score(normalize="relevant") gave 2.0
    with pytest.raises(ValueError, match="must not repeat a database index within a row"):
        score([[0, 0]])
    assert 0 <= score([[0, 1]]) <= 1


def test_recall_at_k_reads_minus_one_as_a_missing_result():
    # faiss pads missing results with -1; the repeat check refused them
    assert recall_at_k_score([[0, -1, -1]], [[0, 1, 2]]) == pytest.approx(1 / 3)


@pytest.mark.parametrize("true_neighbors", [[[-1, -1]], [[0, -1]], [[3, -7]]])
def test_recall_at_k_refuses_negative_true_neighbours(true_neighbors):
    # [[-1, -1]] against [[-1, -1]] scored 1.0, with nothing found
    with pytest.raises(ValueError, match="true_neighbors must hold database indices >= 0"):
        recall_at_k_score([[-1, -1]], true_neighbors)


def test_labels_of_different_kinds_are_refused():
    # strings never equal numbers: the score was 0.0 without a word
    with pytest.raises(ValueError, match="y_query holds strings but y_database holds numbers"):
        map_at_r_score(["0", "1"], [0, 1, 0, 1], [[0, 2], [1, 3]])
    with pytest.raises(ValueError, match="y_query holds numbers but y_database holds strings"):
        map_at_r_score([0, 1], ["0", "1", "0", "1"], [[0, 2], [1, 3]])
    assert map_at_r_score(["0", "1"], ["0", "1", "0", "1"], [[0, 2], [1, 3]]) == 1.0
    assert map_at_r_score([0, 1], [0.0, 1.0, 0.0, 1.0], [[0, 2], [1, 3]]) == 1.0
    # object arrays (a pandas column of strings) and bytes against str, by their elements
    strings = np.array(["cat", "dog"], dtype=object)
    with pytest.raises(ValueError, match="y_query holds strings but y_database holds numbers"):
        map_at_r_score(strings, [0, 1, 0], [[0, 2], [1, 0]])
    with pytest.raises(ValueError, match="y_query holds strings but y_database holds bytes"):
        map_at_r_score(["a", "b"], np.array([b"a", b"b"]), [[0, 1], [1, 0]])
    assert map_at_r_score(strings, ["cat", "dog", "cat"], [[0, 2], [1, 0]]) == 1.0
    mixed = np.array([0, "dog"], dtype=object)  # mixed: not judged
    assert map_at_r_score(mixed, np.array([0, "dog", 0], dtype=object), [[0, 2], [1, 0]]) == 1.0


@pytest.mark.parametrize("R, ties, normalize", [(60, "index", "relevant"),
                                                (150, "average", "retrieved"),
                                                (250, "index", "retrieved")])
def test_scorer_after_remove_scores_the_live_items_as_compact_does(R, ties, normalize):
    # removed items counted as relevant (normalize="relevant") and in the cut of R
    # (R=250 with 200 live items asked for 250 neighbours and failed)
    rng = np.random.RandomState(0)
    X, y = rng.randn(300, 16), rng.randint(0, 4, 300)
    searcher = QuantizedNeighbors(ITQ(4, random_state=0)).fit(X, y)  # 4 bits: many ties
    searcher.remove(np.arange(0, 300, 6))
    searcher.remove(np.arange(1, 300, 6))
    scorer = make_map_at_r_scorer(R=R, ties=ties, normalize=normalize)
    removed = scorer(searcher, X[:20], y[:20])
    searcher.compact()  # the same live items, renumbered in order
    assert removed == pytest.approx(scorer(searcher, X[:20], y[:20]), abs=1e-12)
