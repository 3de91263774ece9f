"""mAP@R against hand-computed cases, and its scorer."""

import numpy as np
import pytest

from sklearn_hash import ITQ, QuantizedNeighbors
from sklearn_hash.metrics import make_map_at_r_scorer, map_at_r_score


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
    with pytest.raises(ValueError, match="R=5"):
        map_at_r_score([0], y_db, neighbors, R=5)


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
        (dict(neighbors=[[0.5, 1.0]]), TypeError, "integer database indices"),
        (dict(neighbors=[[0, 9]]), ValueError, r"indices in \[0, 3\]"),
        (dict(neighbors=[[0, 1], [1, 2]]), ValueError, "2 rows but y_query has 1"),
        (dict(y_query=[[0, 1]]), ValueError, "same form"),
        (dict(y_database=[[0, 2], [1, 0], [0, 1], [1, 1]], y_query=[[0, 1]]), ValueError, "0/1"),
        (dict(R=0), ValueError, "R"),
    ],
)
def test_bad_input(kwargs, error, match):
    arguments = dict(y_query=[0], y_database=[0, 1, 0, 1], neighbors=[[0, 1]])
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
    with pytest.raises(ValueError, match="fit the searcher with y"):
        scorer(QuantizedNeighbors(ITQ(n_bits=4)).fit(X), X, y)
