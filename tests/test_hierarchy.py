"""Label trees: the helper, graded metrics against brute-force oracles, hierarchical DQN."""

import itertools
import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, PredefinedSplit

from sklearn_hash import ITQ, DeepQuantizationNetwork, QuantizedNeighbors
from sklearn_hash.metrics import (
    hierarchy_depth,
    make_hierarchy,
    make_map_at_r_scorer,
    make_ndcg_at_r_scorer,
    map_at_r_score,
    ndcg_at_r_score,
)

# A three-level tree:            0 animal            1 thing
#                               /        \              |
#                          2 mammal    3 bird       4 machine
#                           /    \        |          /      \
#                        5 dog  6 cat  7 crow    8 saw    9 drill
TREE3 = np.array([-1, -1, 0, 0, 1, 2, 2, 3, 4, 4])


# ---------------------------------------------------------------- oracles


def path_to_root(node, hierarchy):
    path = []
    while node != -1:
        path.append(int(node))
        node = hierarchy[node]
    return path[::-1]  # top level first


def oracle_gain(q, x, hierarchy):
    if x == -1:
        return 0.0
    pq, px = path_to_root(q, hierarchy), path_to_root(x, hierarchy)
    shared = sum(1 for a, b in zip(pq, px) if a == b)
    return shared / len(pq)


def oracle_ndcg(yq, ydb, neighbors, hierarchy, R):
    scores = []
    for q, row in zip(yq, neighbors):
        gains = [oracle_gain(q, ydb[i], hierarchy) for i in row[:R]]
        dcg = sum(g / np.log2(i + 2) for i, g in enumerate(gains))
        ideal = sorted((oracle_gain(q, x, hierarchy) for x in ydb), reverse=True)[:R]
        idcg = sum(g / np.log2(i + 2) for i, g in enumerate(ideal))
        scores.append(dcg / idcg if idcg > 0 else 0.0)
    return float(np.mean(scores))


def tied_orders(row, distances):
    """Every order of ``row`` that permutes items only within groups of equal distance."""
    groups = [list(g) for _, g in itertools.groupby(
        range(len(row)), key=lambda i: distances[i])]
    for perms in itertools.product(*(itertools.permutations(g) for g in groups)):
        yield [row[i] for p in perms for i in p]


def oracle_level_ap(q, ydb, row, hierarchy, level):
    def at(node):
        path = path_to_root(node, hierarchy) if node != -1 else []
        return path[level - 1] if len(path) >= level else None

    relevant = [at(ydb[i]) is not None and at(ydb[i]) == at(q) for i in row]
    hits, total = 0, 0.0
    for k, r in enumerate(relevant, 1):
        if r:
            hits += 1
            total += hits / k
    return total / hits if hits else 0.0


# ---------------------------------------------------------------- helper


def test_make_hierarchy_from_pairs_dict_and_nested_dict():
    expected = np.array([3, 3, 4, -1, -1])
    np.testing.assert_array_equal(make_hierarchy({0: 3, 1: 3, 2: 4}), expected)
    np.testing.assert_array_equal(make_hierarchy([(0, 3), (1, 3), (2, 4)]), expected)
    np.testing.assert_array_equal(make_hierarchy({3: [0, 1], 4: {2: None}}), expected)
    nested = {0: {2: [5, 6], 3: [7]}, 1: {4: (8, 9)}}
    np.testing.assert_array_equal(make_hierarchy(nested), TREE3)
    pairs = [(c, int(p)) for c, p in enumerate(TREE3) if p != -1]
    np.testing.assert_array_equal(make_hierarchy(pairs), TREE3)
    # unmentioned ids up to n_labels are top-level leaves
    np.testing.assert_array_equal(make_hierarchy({0: 1}, n_labels=4), [1, -1, -1, -1])
    assert make_hierarchy({0: 1}).dtype == np.int64


def test_depths():
    np.testing.assert_array_equal(hierarchy_depth(TREE3), [1, 1, 2, 2, 2, 3, 3, 3, 3, 3])
    np.testing.assert_array_equal(hierarchy_depth([-1, -1]), [1, 1])


def test_a_tree_of_any_depth_is_read_without_recursion():
    # A chain 0 <- 1 <- ... <- 99,999, as a nested dict: the reader recursed
    # (RecursionError past ~1,000 levels) and the depths took depth x n steps.
    n = 100_000
    chain = None
    for node in range(n - 1, -1, -1):
        chain = {node: chain}
    hierarchy = make_hierarchy(chain)
    np.testing.assert_array_equal(hierarchy, np.arange(-1, n - 1))
    np.testing.assert_array_equal(hierarchy_depth(hierarchy), np.arange(1, n + 1))
    # a deep list nesting: every leaf under the one top-level node
    deep = [7]
    for _ in range(5_000):
        deep = [deep]
    np.testing.assert_array_equal(make_hierarchy({0: deep}), [-1, -1, -1, -1, -1, -1, -1, 0])


def test_depths_match_walking_up_on_random_forests():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 60))
        order = rng.permutation(n)
        hierarchy = np.full(n, -1)
        for a in range(1, n):
            if rng.random() < 0.8:  # a parent among the nodes placed before
                hierarchy[order[a]] = order[rng.integers(0, a)]
        walked = []
        for node in range(n):
            steps = 0
            while node >= 0:
                node, steps = hierarchy[node], steps + 1
            walked.append(steps)
        np.testing.assert_array_equal(hierarchy_depth(hierarchy), walked)


@pytest.mark.parametrize(
    "tree, kwargs, error, match",
    [
        ({0: 1, 1: 2, 2: 0}, {}, ValueError, r"cycle \(0 -> 1 -> 2 -> 0\)"),
        ([(0, 1), (1, 0)], {}, ValueError, "cycle"),
        ({0: 0}, {}, ValueError, "its own parent"),
        ([(0, 1), (0, 2)], {}, ValueError, "two parents, 1 and 2"),
        ({3: [0], 4: [0]}, {}, ValueError, "two parents"),
        ({0: 5}, {"n_labels": 3}, ValueError, "names label id 5.*ids 0..2"),
        ({0: -2}, {}, ValueError, "non-negative"),
        ({"dog": 1}, {}, TypeError, "int label id"),
        ({0: 1.5}, {}, TypeError, "int label id"),
        ([(0, 1, 2)], {}, ValueError, "pairs"),
        (7, {}, TypeError, "dict or an iterable"),
    ],
)
def test_make_hierarchy_refuses_bad_trees(tree, kwargs, error, match):
    with pytest.raises(error, match=match):
        make_hierarchy(tree, **kwargs)


@pytest.mark.parametrize(
    "hierarchy, match",
    [
        ([1, 0], "cycle"),
        ([1, 2, 1], r"cycle \(1 -> 2 -> 1\)"),
        ([5, -1], r"hierarchy\[0\] = 5 is not a label id"),
        ([-3, -1], r"hierarchy\[0\] = -3"),
        ([[0, -1]], "1-D array"),
        ([], "non-empty"),
        ([0.5, -1], "integer parent ids"),
    ],
)
def test_bad_parent_arrays_are_refused(hierarchy, match):
    with pytest.raises(ValueError, match=match):
        hierarchy_depth(hierarchy)
    with pytest.raises(ValueError, match=match):
        ndcg_at_r_score([0], [0, 0], [[0, 1]], hierarchy=hierarchy)


# ---------------------------------------------------------------- nDCG


def test_ndcg_hand_case_two_levels():
    hierarchy = make_hierarchy({0: 3, 1: 3, 2: 4})
    # gains 0.5, 1, 0: (0.5 + 1/log2 3) / (1 + 0.5/log2 3)
    expected = (0.5 + 1 / np.log2(3)) / (1 + 0.5 / np.log2(3))
    assert ndcg_at_r_score([0], [1, 0, 2], [[0, 1]], hierarchy=hierarchy) == pytest.approx(
        expected)
    # the perfect ranking scores 1, a query with no related item 0
    assert ndcg_at_r_score([0], [1, 0, 2], [[1, 0, 2]], hierarchy=hierarchy) == 1.0
    assert ndcg_at_r_score([0, 3], [2, 2, 2], [[0, 1], [1, 2]],
                           hierarchy=[3, 3, 4, -1, -1]) == 0.0


def test_ndcg_matches_the_oracle_on_a_three_level_tree_with_inner_labels():
    rng = np.random.default_rng(0)
    y_database = rng.choice(np.arange(-1, 10), size=30)  # leaves, inner nodes, unlabelled
    y_query = np.array([5, 6, 7, 9, 2, 0, 4, 1])           # leaves and inner nodes
    neighbors = np.array([rng.permutation(30)[:12] for _ in y_query])
    for R in (1, 5, 12):
        assert ndcg_at_r_score(y_query, y_database, neighbors, hierarchy=TREE3, R=R) == \
            pytest.approx(oracle_ndcg(y_query, y_database, neighbors, TREE3, R))


def test_query_at_an_inner_node_gains_fully_from_items_below_it():
    # query "mammal" (2): dog (5) and cat (6) and mammal gain 1, crow (7) 1/2, saw 0
    y_database = np.array([5, 6, 2, 7, 8])
    assert ndcg_at_r_score([2], y_database, [[0, 1, 2, 3, 4]], hierarchy=TREE3) == 1.0
    # query "dog": mammal-only item gains 2/3, crow 1/3
    assert oracle_gain(5, 2, TREE3) == pytest.approx(2 / 3)
    score = ndcg_at_r_score([5], [2, 7, 5], [[0, 1, 2]], hierarchy=TREE3)
    dcg = 2 / 3 + (1 / 3) / np.log2(3) + 1 / np.log2(4)
    idcg = 1 + (2 / 3) / np.log2(3) + (1 / 3) / np.log2(4)
    assert score == pytest.approx(dcg / idcg)


def test_tie_aware_ndcg_is_the_mean_over_all_orders_of_tied_items():
    rng = np.random.default_rng(1)
    y_database = rng.choice(np.arange(-1, 10), size=12)
    y_query = np.array([5, 3, 8])
    for trial in range(5):
        neighbors = np.array([rng.permutation(12)[:7] for _ in y_query])
        distances = np.sort(rng.integers(0, 3, size=neighbors.shape), axis=1).astype(float)
        for R in (2, 4, 7):  # cuts that straddle tied groups
            expected = np.mean([
                np.mean([oracle_ndcg([q], y_database, [order], TREE3, R)
                         for order in tied_orders(list(row), list(dist))])
                for q, row, dist in zip(y_query, neighbors, distances)
            ])
            got = ndcg_at_r_score(y_query, y_database, neighbors, hierarchy=TREE3, R=R,
                                  distances=distances)
            assert got == pytest.approx(expected)


def test_distinct_distances_give_the_ranked_ndcg():
    rng = np.random.default_rng(2)
    y_database = rng.choice(10, size=20)
    neighbors = np.array([rng.permutation(20)[:8] for _ in range(4)])
    distances = np.tile(np.arange(8.0), (4, 1))
    y_query = np.array([5, 7, 1, 2])
    assert ndcg_at_r_score(y_query, y_database, neighbors, hierarchy=TREE3,
                           distances=distances) == pytest.approx(
        ndcg_at_r_score(y_query, y_database, neighbors, hierarchy=TREE3))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"y_query": [[1, 0]], "y_database": [[1, 0], [0, 1]]}, "2-D multi-label"),
        ({"y_query": [12]}, "label 12, which is not a node"),
        ({"y_query": [-1]}, r"must be in 0..9\."),
        ({"y_database": [5, 11]}, r"0..9 or -1 \(unlabelled\)"),
        ({"y_query": ["dog"]}, "integer label ids"),
        ({"neighbors": [[0, 2]]}, "indices in"),
        ({"y_database": [5, 6, 7], "R": 3}, "R=3 must be"),
        ({"distances": [[1.0, 0.0]]}, "ascending"),
    ],
)
def test_ndcg_bad_input(kwargs, match):
    args = {"y_query": [5], "y_database": [5, 6], "neighbors": [[0, 1]], "hierarchy": TREE3}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ndcg_at_r_score(args.pop("y_query"), args.pop("y_database"), args.pop("neighbors"),
                        **args)


# ---------------------------------------------------------------- mAP at a level


@pytest.mark.parametrize("level", [1, 2, 3])
def test_map_at_a_level_matches_the_oracle(level):
    rng = np.random.default_rng(3)
    y_database = rng.choice(np.arange(-1, 10), size=25)
    depth = hierarchy_depth(TREE3)
    y_query = rng.choice(np.flatnonzero(depth >= level), size=6)
    neighbors = np.array([rng.permutation(25)[:10] for _ in y_query])
    expected = np.mean([oracle_level_ap(q, y_database, row, TREE3, level)
                        for q, row in zip(y_query, neighbors)])
    assert map_at_r_score(y_query, y_database, neighbors, hierarchy=TREE3,
                          level=level) == pytest.approx(expected)


def test_map_at_the_leaf_level_of_two_levels_is_flat_map_and_ties_carry_over():
    rng = np.random.default_rng(4)
    hierarchy = make_hierarchy({c: 6 + c // 3 for c in range(6)})
    y_database = rng.choice(6, size=40)
    y_query = rng.choice(6, size=5)
    neighbors = np.array([rng.permutation(40)[:15] for _ in y_query])
    distances = np.sort(rng.integers(0, 4, size=neighbors.shape), axis=1).astype(float)
    for normalize in ("retrieved", "relevant"):
        for d in (None, distances):
            flat = map_at_r_score(y_query, y_database, neighbors, distances=d,
                                  normalize=normalize, R=10)
            assert map_at_r_score(y_query, y_database, neighbors, distances=d, R=10,
                                  normalize=normalize, hierarchy=hierarchy,
                                  level=2) == pytest.approx(flat)
            coarse = map_at_r_score(y_query // 3, y_database // 3, neighbors, distances=d,
                                    normalize=normalize, R=10)
            assert map_at_r_score(y_query, y_database, neighbors, distances=d, R=10,
                                  normalize=normalize, hierarchy=hierarchy,
                                  level=1) == pytest.approx(coarse)


def test_back_off_items_are_not_relevant_below_their_level():
    # database: mammal-only (2), dog (5); query dog at level 3: only item 1 counts
    assert map_at_r_score([5], [2, 5], [[0, 1]], hierarchy=TREE3, level=3) == 0.5
    assert map_at_r_score([5], [2, 5], [[0, 1]], hierarchy=TREE3, level=2) == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"level": 1}, "pass hierarchy too"),
        ({"hierarchy": TREE3}, "pass level=k"),
        ({"hierarchy": TREE3, "level": 4}, "deeper than the hierarchy"),
        ({"hierarchy": TREE3, "level": 3, "y_query": [2]}, "no ancestor at level=3"),
        ({"hierarchy": TREE3, "level": 1, "y_query": [[1, 0]], "y_database": [[1, 0], [0, 1]]},
         "2-D multi-label"),
        ({"hierarchy": [1, 0, -1, -1, -1, -1], "level": 1}, "cycle"),
        ({"hierarchy": TREE3, "level": 1, "y_database": [5, 10]}, "not a node"),
    ],
)
def test_map_with_hierarchy_bad_input(kwargs, match):
    args = {"y_query": [5], "y_database": [5, 6], "neighbors": [[0, 1]]}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        map_at_r_score(args.pop("y_query"), args.pop("y_database"), args.pop("neighbors"),
                       **args)


# ---------------------------------------------------------------- scorers


@pytest.fixture(scope="module")
def tree_data():
    """Synthetic rows whose classes (0-5) sit in categories 6, 7, 8 (two classes each).

    The categories are barely visible in X (classes of one category are no
    closer than others): only the labels' tree can tell them.
    """
    rng = np.random.default_rng(0)
    hierarchy = make_hierarchy({c: 6 + c // 2 for c in range(6)})
    category_centres = rng.normal(size=(3, 16))
    class_centres = category_centres[np.arange(6) // 2] + rng.normal(size=(6, 16)) * 2.5
    y = np.repeat(np.arange(6), 60)
    X = class_centres[y] + rng.normal(size=(len(y), 16))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    fold = np.tile([0, 1, 1, 1], len(y) // 4)
    return X.astype(np.float32), y, fold, hierarchy


def test_scorers_equal_the_metrics_and_fit_in_a_grid_search(tree_data):
    X, y, fold, hierarchy = tree_data
    db, q = fold == 1, fold == 0
    search = QuantizedNeighbors(ITQ(n_bits=8, random_state=0), n_neighbors=20).fit(X[db], y[db])
    _distances, neighbors = search.kneighbors(X[q], n_neighbors=20)
    ndcg = make_ndcg_at_r_scorer(R=20, hierarchy=hierarchy)
    assert ndcg(search, X[q], y[q]) == ndcg_at_r_score(y[q], y[db], neighbors,
                                                       hierarchy=hierarchy)
    coarse = make_map_at_r_scorer(R=20, hierarchy=hierarchy, level=1)
    assert coarse(search, X[q], y[q]) == map_at_r_score(y[q], y[db], neighbors,
                                                        hierarchy=hierarchy, level=1)
    # tie-aware: widened until the group at the cut is complete
    tied = make_ndcg_at_r_scorer(R=20, hierarchy=hierarchy, ties="average")
    d, n = search.kneighbors(X[q], n_neighbors=int(db.sum()))
    assert tied(search, X[q], y[q]) == pytest.approx(
        ndcg_at_r_score(y[q], y[db], n, hierarchy=hierarchy, R=20, distances=d))
    assert repr(ndcg) == "make_ndcg_at_r_scorer(R=20, hierarchy=<9 labels>)"
    assert repr(coarse) == "make_map_at_r_scorer(R=20, hierarchy=<9 labels>, level=1)"
    assert "ties='average'" in repr(tied)
    grid = GridSearchCV(QuantizedNeighbors(ITQ(random_state=0), n_neighbors=20),
                        {"quantizer__n_bits": [4, 16]}, cv=PredefinedSplit(1 - fold),
                        scoring={"ndcg": ndcg, "coarse": coarse}, refit="ndcg").fit(X, y)
    assert np.all(np.isfinite(grid.cv_results_["mean_test_coarse"]))
    assert 0 < grid.best_score_ <= 1


def test_scorer_factories_refuse_half_a_tree():
    with pytest.raises(ValueError, match="hierarchy and level go together"):
        make_map_at_r_scorer(hierarchy=TREE3)
    with pytest.raises(ValueError, match="cycle"):
        make_ndcg_at_r_scorer(hierarchy=[1, 0])


# ---------------------------------------------------------------- DQN

torch = pytest.importorskip("torch")
pytest.importorskip("skorch")

from sklearn_hash._dqn import _encode_tree_labels


def small_dqn(**params):
    defaults = {"n_bits": 8, "subspace_bits": 4, "embedding_dim": 8, "max_epochs": 5, "random_state": 0}
    return DeepQuantizationNetwork(**{**defaults, **params})


def test_tree_targets():
    hierarchy = make_hierarchy({0: 3, 1: 3, 2: 4})
    y = np.array([0, 1, 2, 3, -1, 0, 3])
    labelled, classes, nodes, targets = _encode_tree_labels(y, 7, hierarchy, -0.4)
    np.testing.assert_array_equal(labelled, [1, 1, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(classes, [0, 1, 2, 3])
    np.testing.assert_array_equal(nodes[labelled], [0, 1, 2, 3, 0, 3])
    # A back-off row (label 3) stands for leaf 0 or 1, equally likely: its
    # targets are means over them, (1 - 0.4) / 2 = 0.3 with a row of leaf 0 or 1
    # or with another back-off row of category 3.
    expected = np.array([
        [1.0, -0.4, -1.0, 0.3],    # 0: same leaf, sibling, unrelated, its category
        [-0.4, 1.0, -1.0, 0.3],
        [-1.0, -1.0, 1.0, -1.0],
        [0.3, 0.3, -1.0, 0.3],     # two back-off rows of one category: not +1
    ])
    np.testing.assert_allclose(targets, expected, rtol=1e-6)
    # three levels: classes sharing only the top level get halfway
    _, classes, _, targets = _encode_tree_labels(np.array([5, 6, 7, 8]), 4, TREE3, 0.2)
    np.testing.assert_allclose(targets[0], [1.0, 0.2, -1 + 1.2 / 2, -1.0], rtol=1e-6)
    # an inner label of the three-level tree: the mean over the pairs of leaves below
    # (node 0 holds leaves 5, 6 under 2 and 7 under 3; node 2 holds 5 and 6)
    _, classes, _, targets = _encode_tree_labels(np.array([0, 2, 5, 8]), 4, TREE3, 0.2)
    leaf = {(5, 5): 1.0, (5, 6): 0.2, (6, 6): 1.0, (5, 7): -0.4, (6, 7): -0.4, (7, 7): 1.0}
    under = {0: [5, 6, 7], 2: [5, 6], 5: [5]}
    for i, u in enumerate([0, 2, 5]):
        for j, v in enumerate([0, 2, 5]):
            mean = np.mean([leaf[min(a, b), max(a, b)] for a in under[u] for b in under[v]])
            assert targets[i, j] == pytest.approx(mean, rel=1e-6), (u, v)
    np.testing.assert_allclose(targets[:3, 3], -1.0)  # node 8 lies under the other top node


def _oracle_batch(seed):
    """A batch for the loss oracles: the generator, six unit rows and their tree labels.

    Two leaves under one category, one under another; one row unlabelled and
    one labelled at a category (back-off).
    """
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(6, 4))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    y = np.array([0, 1, -1, 3, 2, 0])
    labelled, _, nodes, targets = _encode_tree_labels(y, 6, make_hierarchy({0: 3, 1: 3, 2: 4}),
                                                      0.1)
    return rng, z, labelled, nodes, targets


def test_graded_loss_matches_a_numpy_oracle():
    from sklearn_hash._dqn_torch import DQNLoss

    _, z, labelled, nodes, targets = _oracle_batch(0)
    loss = DQNLoss(np.zeros((6, 1)), labelled, 0.5, pair_targets=targets, row_nodes=nodes)
    value = float(loss(torch.tensor(z, dtype=torch.float32), torch.arange(6)))
    keep = np.flatnonzero(labelled)
    s = targets[nodes[keep]][:, nodes[keep]]
    cos = z[keep] @ z[keep].T
    off = ~np.eye(len(keep), dtype=bool)
    assert value == pytest.approx(((s - cos)[off] ** 2).mean(), rel=1e-5)


def test_a_flat_tree_trains_the_flat_model(tree_data):
    X, y, _, _ = tree_data
    flat = small_dqn().fit(X, y)
    # the graded targets of a one-level tree are the flat ones; the leaf term
    # (on by default) is the one addition a tree of one level makes
    tree = small_dqn(hierarchy=np.full(6, -1), leaf_weight=0.0).fit(X, y)
    np.testing.assert_allclose(tree.embed(X), flat.embed(X), atol=1e-5)
    with_leaf = small_dqn(hierarchy=np.full(6, -1), leaf_weight=0.5).fit(X, y)
    assert "leaf_loss" in with_leaf.history_[-1]
    assert not np.allclose(with_leaf.embed(X), flat.embed(X), atol=1e-3)


def category_cosines(Z, y):
    cos = Z @ Z.T
    same_class = y[:, None] == y[None, :]
    same_cat = (y[:, None] // 2 == y[None, :] // 2) & ~same_class
    other = y[:, None] // 2 != y[None, :] // 2
    return cos[same_class].mean(), cos[same_cat].mean(), cos[other].mean()


def test_hierarchical_dqn_recovers_the_tree(tree_data):
    X, y, fold, hierarchy = tree_data
    params = {"n_bits": 16, "embedding_dim": 16, "max_epochs": 15}
    y_partial = np.where(np.arange(len(y)) % 4 == 1, y, -1)
    hier = small_dqn(hierarchy=hierarchy, ancestor_similarity=0.0, **params).fit(X, y_partial)
    flat = small_dqn(**params).fit(X, y_partial)
    same, sibling, other = category_cosines(hier.embed(X), y)
    _, flat_sibling, flat_other = category_cosines(flat.embed(X), y)
    _, x_sibling, x_other = category_cosines(X, y)
    assert x_sibling < x_other  # not in the features
    assert same > sibling + 0.5
    assert sibling > other + 0.08  # in the embedding: siblings closer than the others
    assert flat_sibling < flat_other  # not in the flat model's
    db, q = fold == 1, fold == 0
    scorer = make_ndcg_at_r_scorer(R=30, hierarchy=hierarchy)
    scores = [scorer(QuantizedNeighbors(dqn, n_neighbors=30).fit(X[db], y[db]), X[q], y[q])
              for dqn in (clone(hier).fit(X[db], y_partial[db]),
                          clone(flat).fit(X[db], y_partial[db]))]
    assert scores[0] >= scores[1]


def test_back_off_rows_take_part(tree_data):
    X, y, _, hierarchy = tree_data
    # only coarse labels (category nodes 6, 7, 8): the categories are still learnt
    y_coarse = hierarchy[y]
    dqn = small_dqn(hierarchy=hierarchy, ancestor_similarity=0.5, n_bits=16,
                    embedding_dim=16, max_epochs=40, lr=3e-3).fit(X, y_coarse)
    assert dqn.n_labelled_ == len(y)
    np.testing.assert_array_equal(dqn.classes_, [6, 7, 8])
    _, sibling, other = category_cosines(dqn.embed(X), y)
    assert sibling > other + 0.3, (sibling, other)
    # a back-off row is a labelled row, not an unlabelled one
    mixed = np.where(np.arange(len(y)) % 2 == 0, y, y_coarse)
    assert small_dqn(hierarchy=hierarchy, max_epochs=1).fit(X, mixed).n_labelled_ == len(y)


def test_back_off_rows_do_not_dilute_the_fine_pairs(tree_data):
    # The rows labelled at a leaf are repeated up to about half of an epoch
    # (as the labelled rows of the flat model), whatever the back-off rows;
    # these are repeated until they fill about as many places as the leaf
    # rows, so adding coarse labels adds places and keeps the fine ones.
    X, y, _, hierarchy = tree_data
    n = 100
    fine = np.full(n, -1)
    fine[:10] = y[:10]
    with_coarse = fine.copy()
    with_coarse[10:50] = hierarchy[y[10:50]]
    rows = {}
    for name, labels in [("fine", fine), ("coarse", with_coarse)]:
        dqn = small_dqn(hierarchy=hierarchy, max_epochs=1).fit(X[:n], labels)
        rows[name] = sum(batch["train_batch_size"] for batch in dqn.net_.history[0]["batches"])
    # leaf rows: ceil(90 / 10) = 9 in all; back-off rows: ceil(9 * 10 / 40) = 3 in all
    assert rows == {"fine": 100 + 8 * 10, "coarse": 100 + 8 * 10 + 2 * 40}


@pytest.mark.parametrize(
    "params, y, error, match",
    [
        ({"hierarchy": [1, 0, -1]}, np.arange(40) % 3, ValueError, "cycle"),
        ({"hierarchy": [2, 2, -1]}, np.arange(40) % 4, ValueError,
         "label 3, which is not a node"),
        ({"hierarchy": [2, 2, -1]}, (np.arange(80).reshape(40, 2) % 2), ValueError,
         "hierarchy needs 1-D labels"),
        ({"hierarchy": [2, 2, -1]}, np.array(["a", "b"] * 20), ValueError,
         "integer label ids"),
        ({"hierarchy": [2, 2, -1], "ancestor_similarity": 1.5}, np.arange(40) % 3, ValueError,
         "ancestor_similarity"),
        ({"hierarchy": "tree"}, np.arange(40) % 3, ValueError, "hierarchy"),
        ({"hierarchy": [2, 2, -1], "ancestor_weight": -0.1}, np.arange(40) % 3, ValueError,
         "ancestor_weight"),
        ({"hierarchy": [2, 2, -1], "leaf_weight": -0.1}, np.arange(40) % 3, ValueError,
         "leaf_weight"),
        ({"hierarchy": [2, 2, -1], "entropy_weight": -1.0}, np.arange(40) % 3, ValueError,
         "entropy_weight"),
    ],
)
def test_dqn_bad_tree_input(params, y, error, match):
    X = np.random.default_rng(0).normal(size=(40, 5))
    with pytest.raises(error, match=match):
        small_dqn(n_bits=4, subspace_bits=2, embedding_dim=4, max_epochs=1, **params).fit(X, y)


def test_hierarchy_survives_clone_pickle_and_saved_indices(tree_data, tmp_path):
    X, y, _, hierarchy = tree_data
    dqn = small_dqn(hierarchy=hierarchy, ancestor_similarity=-0.5, max_epochs=3)
    cloned = clone(dqn)
    np.testing.assert_array_equal(cloned.hierarchy, hierarchy)
    assert cloned.ancestor_similarity == -0.5
    assert "hierarchy=array" in repr(dqn)
    search = QuantizedNeighbors(dqn, n_neighbors=5).fit(X, y)
    expected = search.kneighbors(X[:10])
    again = pickle.loads(pickle.dumps(search))
    np.testing.assert_array_equal(again.quantizer_.hierarchy, hierarchy)
    np.testing.assert_array_equal(again.kneighbors(X[:10])[1], expected[1])
    search.save(tmp_path / "index")
    loaded = QuantizedNeighbors.load(tmp_path / "index")
    for model in (loaded.quantizer, loaded.quantizer_):
        np.testing.assert_array_equal(model.hierarchy, hierarchy)
        assert model.ancestor_similarity == -0.5
    np.testing.assert_array_equal(loaded.kneighbors(X[:10])[1], expected[1])
    np.testing.assert_allclose(loaded.kneighbors(X[:10])[0], expected[0], rtol=1e-6)
    # the loaded parameters refit to the same model
    refit = clone(loaded.quantizer).fit(X, y)
    np.testing.assert_array_equal(refit.transform(X), search.quantizer_.transform(X))


def test_row_ancestors_of_a_three_level_tree():
    from sklearn_hash._dqn import _row_ancestors

    # labels: leaves 5 (dog), 7 (crow), 8 (saw); inner 2 (mammal), 0 (animal); unlabelled
    y = np.array([5, 7, 8, 2, 0, -1, 6])
    labelled, classes, nodes, _ = _encode_tree_labels(y, len(y), TREE3, 0.0)
    out = _row_ancestors(TREE3, classes, nodes, labelled)
    # depth 1: animal (0) -> 0, thing (1) -> 1; depth 2: mammal (2) -> 0, bird (3) -> 1,
    # machine (4) -> 2; the row labelled "animal" has no ancestor at depth 2
    np.testing.assert_array_equal(out, [[0, 0], [0, 1], [1, 2], [0, 0], [0, -1], [-1, -1],
                                        [0, 0]])
    # a flat tree has no level above the leaves
    flat = np.full(3, -1)
    labelled, classes, nodes, _ = _encode_tree_labels(np.array([0, 1, 2]), 3, flat, 0.0)
    assert _row_ancestors(flat, classes, nodes, labelled).shape == (3, 0)


def test_ancestor_loss_matches_a_numpy_oracle():
    from sklearn_hash._dqn_torch import DQNLoss

    rng, z, labelled, nodes, targets = _oracle_batch(1)
    ancestors = np.array([[0], [0], [-1], [0], [1], [0]])
    centroids = rng.normal(size=(2, 4))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    loss = DQNLoss(np.zeros((6, 1)), labelled, 0.0, pair_targets=targets, row_nodes=nodes,
                   row_ancestors=ancestors, ancestor_weight=0.3, ancestor_scale=7.0)
    z_t = torch.tensor(z, dtype=torch.float32)
    pairwise = float(loss(z_t, torch.arange(6)))  # no centroids yet: the pairwise term alone
    loss.set_ancestor_centroids([centroids], "cpu")
    value = float(loss(z_t, torch.arange(6)))
    keep = np.flatnonzero(ancestors[:, 0] >= 0)
    logits = 7.0 * z[keep] @ centroids.T
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    cross_entropy = -log_p[np.arange(len(keep)), ancestors[keep, 0]].mean()
    assert value == pytest.approx(pairwise + 0.3 * cross_entropy, rel=1e-5)
    # rows of the batch only: the term follows the index
    sub = float(loss(z_t[[4, 5]], torch.tensor([4, 5])))
    log_p_sub = log_p[[3, 4], [1, 0]]
    assert sub == pytest.approx(0.3 * -log_p_sub.mean() + (targets[nodes[4], nodes[5]]
                                                            - z[4] @ z[5]) ** 2, rel=1e-5)


def test_ancestor_term_separates_the_categories(tree_data):
    X, y, _, hierarchy = tree_data
    # a few fine labels: the pairwise term sees few pairs of sibling classes
    y_partial = np.where(np.arange(len(y)) % 20 == 1, y, -1)
    params = {"n_bits": 16, "embedding_dim": 16, "max_epochs": 15, "hierarchy": hierarchy,
              "leaf_weight": 0.0, "entropy_weight": 0.0}
    without = small_dqn(ancestor_weight=0.0, **params).fit(X, y_partial)
    with_term = small_dqn(ancestor_weight=2.0, **params).fit(X, y_partial)
    assert "ancestor_loss" not in without.history_[-1]
    losses = [epoch["ancestor_loss"] for epoch in with_term.history_]
    assert losses[-1] < 0.5 * losses[0]

    def category_cross_entropy(Z, rows):
        # the term's loss, scale 10, with the categories' centroids over the labelled rows
        labelled, category = y_partial >= 0, y // 2
        centroids = np.stack([Z[labelled & (category == c)].mean(axis=0) for c in range(3)])
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
        logits = 10.0 * Z[rows] @ centroids.T
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return -log_p[np.arange(rows.sum()), category[rows]].mean()

    for rows, factor in [(y_partial >= 0, 0.6), (np.ones(len(y), dtype=bool), 0.85)]:
        # lower on the labelled rows, and on all rows: the categories generalise
        assert (category_cross_entropy(with_term.embed(X), rows)
                < factor * category_cross_entropy(without.embed(X), rows))
    # the centroids and rows are not kept after fit
    assert with_term.net_.criterion_.ancestor_centroids == []
    assert dict(with_term.net_.callbacks_)["ancestors"].X is None


def test_ancestor_weight_is_unused_without_a_hierarchy(tree_data):
    X, y, _, _ = tree_data
    a = small_dqn(ancestor_weight=0.0, leaf_weight=0.0, entropy_weight=0.0).fit(X, y)
    b = small_dqn(ancestor_weight=3.0, leaf_weight=2.0, entropy_weight=1.0).fit(X, y)
    np.testing.assert_array_equal(a.embed(X), b.embed(X))
    np.testing.assert_array_equal(a.transform(X), b.transform(X))
    for key in ("ancestor_loss", "leaf_loss", "entropy_loss"):
        assert key not in b.history_[-1]


def test_leaf_and_entropy_losses_match_a_numpy_oracle():
    from sklearn_hash._dqn import _row_ancestors, _row_leaves
    from sklearn_hash._dqn_torch import DQNLoss

    rng = np.random.default_rng(2)
    z = rng.normal(size=(7, 4))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    hierarchy = make_hierarchy({0: 3, 1: 3, 2: 4})
    y = np.array([0, 1, -1, 3, 2, 0, -1])  # row 3 is a back-off row (category 3)
    labelled, classes, nodes, targets = _encode_tree_labels(y, 7, hierarchy, 0.1)
    leaf_labelled = labelled & np.isin(y, [0, 1, 2])
    leaves = _row_leaves(classes, nodes, leaf_labelled)
    np.testing.assert_array_equal(leaves, [0, 1, -1, -1, 2, 0, -1])
    ancestors = np.column_stack([_row_ancestors(hierarchy, classes, nodes, labelled), leaves])
    categories = rng.normal(size=(2, 4))
    leaf_centroids = rng.normal(size=(3, 4))
    categories /= np.linalg.norm(categories, axis=1, keepdims=True)
    leaf_centroids /= np.linalg.norm(leaf_centroids, axis=1, keepdims=True)

    def log_softmax(logits):
        return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))

    z_t, index = torch.tensor(z, dtype=torch.float32), torch.arange(7)
    base = DQNLoss(np.zeros((7, 1)), labelled, 0.0, pair_targets=targets, row_nodes=nodes,
                   row_ancestors=ancestors, ancestor_weight=0.0, ancestor_scale=5.0,
                   leaf_weight=0.0)
    pairwise = float(base(z_t, index))
    loss = DQNLoss(np.zeros((7, 1)), labelled, 0.0, pair_targets=targets, row_nodes=nodes,
                   row_ancestors=ancestors, ancestor_weight=0.0, ancestor_scale=5.0,
                   leaf_weight=0.7, entropy_weight=0.4)
    assert loss.n_depths == 1
    loss.set_ancestor_centroids([categories, leaf_centroids], "cpu")
    value = float(loss(z_t, index))
    rows = np.flatnonzero(leaves >= 0)
    leaf_ce = -log_softmax(5.0 * z[rows] @ leaf_centroids.T)[np.arange(len(rows)),
                                                              leaves[rows]].mean()
    log_p = log_softmax(5.0 * z[[2, 6]] @ categories.T)  # the unlabelled rows
    entropy = -(np.exp(log_p) * log_p).sum(axis=1).mean()
    assert value == pytest.approx(pairwise + 0.7 * leaf_ce + 0.4 * entropy, rel=1e-5)
    # a batch without unlabelled rows has no entropy term
    sub = torch.tensor([0, 1])
    only_leaf = float(loss(z_t[[0, 1]], sub))
    ce01 = -log_softmax(5.0 * z[[0, 1]] @ leaf_centroids.T)[[0, 1], [0, 1]].mean()
    assert only_leaf == pytest.approx(float(base(z_t[[0, 1]], sub)) + 0.7 * ce01, rel=1e-5)


def test_leaf_and_entropy_terms_do_what_they_measure(tree_data):
    X, y, _, hierarchy = tree_data
    y_partial = np.where(np.arange(len(y)) % 20 == 1, y, -1)
    params = {"n_bits": 16, "embedding_dim": 16, "max_epochs": 15, "hierarchy": hierarchy}
    without = small_dqn(leaf_weight=0.0, entropy_weight=0.0, **params).fit(X, y_partial)
    leaf = small_dqn(leaf_weight=1.0, entropy_weight=0.0, **params).fit(X, y_partial)
    entropy = small_dqn(leaf_weight=0.0, entropy_weight=1.0, **params).fit(X, y_partial)
    assert "leaf_loss" not in without.history_[-1] and "entropy_loss" not in without.history_[-1]
    assert "entropy_loss" not in leaf.history_[-1] and "leaf_loss" not in entropy.history_[-1]
    labelled, unlabelled = y_partial >= 0, y_partial < 0

    def cross_entropy(Z, groups, rows, entropy_of=None):
        # the terms' losses, scale 10, centroids over the labelled rows
        ids = np.unique(groups[labelled])
        centroids = np.stack([Z[labelled & (groups == g)].mean(axis=0) for g in ids])
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
        logits = 10.0 * Z[rows] @ centroids.T
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        if entropy_of:
            return -(np.exp(log_p) * log_p).sum(axis=1).mean()
        return -log_p[np.arange(rows.sum()), np.searchsorted(ids, groups[rows])].mean()

    # the leaf term: the labelled rows nearer their own class's centroid, and unseen rows too
    for rows, factor in [(labelled, 0.8), (unlabelled, 0.9)]:
        assert (cross_entropy(leaf.embed(X), y, rows)
                < factor * cross_entropy(without.embed(X), y, rows))
    # the entropy term: the unlabelled rows commit to one category
    assert (cross_entropy(entropy.embed(X), y // 2, unlabelled, entropy_of=True)
            < 0.8 * cross_entropy(without.embed(X), y // 2, unlabelled, entropy_of=True))
    for model, key in [(leaf, "leaf_loss"), (entropy, "entropy_loss")]:
        losses = [epoch[key] for epoch in model.history_]
        assert losses[-1] < 0.5 * losses[0]
    assert leaf.net_.criterion_.ancestor_centroids == []


@pytest.mark.parametrize("tree, n_labels, given", [([(0, 10**9)], None, "the id 1000000000"),
                                                   ([(0, 1)], 10**12, "n_labels=1000000000000")])
def test_make_hierarchy_refuses_sparse_label_ids(tree, n_labels, given):
    # the parent array was sized by the largest id: 10**9 was killed for memory
    with pytest.raises(ValueError, match=f"must be dense.*got {given}"):
        make_hierarchy(tree, n_labels=n_labels)
    assert make_hierarchy([(0, 2**20)]).shape == (2**20 + 1,)
