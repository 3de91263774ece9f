"""Label trees: parent arrays over label ids, their validation and depths.

A *hierarchy* is a 1-D integer array ``hierarchy`` over the label ids
``0 .. n_nodes - 1``: ``hierarchy[node]`` is the parent of ``node``, ``-1``
for a top-level node. Top-level nodes have depth 1 and the virtual root
above them depth 0. A label may be any node: a leaf (a fine label) or an
inner node (an item known only at that level, "back-off").

The public helpers (:func:`make_hierarchy`, :func:`hierarchy_depth`) are
re-exported by :mod:`sklearn_hash.metrics`, beside the metrics that grade
relevance with a tree; :class:`~sklearn_hash.DeepQuantizationNetwork` uses
the same private functions for its graded targets.
"""

from collections.abc import Mapping
from numbers import Integral

import numpy as np


def _node_id(value, what):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Integral):
        raise TypeError(f"{what} must be a non-negative int label id; got {value!r} "
                        f"of type {type(value).__name__}.")
    if value < 0:
        raise ValueError(f"{what} must be a non-negative int label id; got {value}.")
    return int(value)


def _pairs_from_nested(tree, parent, pairs):
    """(child, parent) pairs of a nested dict {node: children}; children a dict,
    a list/tuple/set of ids, or None/empty for a leaf.

    Depth-first, each node before its children, with an explicit stack: a
    tree of any depth (a chain of 100,000 labels) is read without recursion.
    Each entry is ``(item, parent, is_id)``: an id to pair with its parent,
    or a subtree to open.
    """
    stack = [(tree, parent, False)]
    while stack:
        tree, parent, is_id = stack.pop()
        if isinstance(tree, Mapping) and not is_id:
            later = []
            for node, children in tree.items():
                node = _node_id(node, "a key of the nested dict")
                later.append((node, parent, True))
                if children is not None:
                    later.append((children, node, False))
            stack.extend(reversed(later))
        elif isinstance(tree, (list, tuple, set, frozenset, np.ndarray)) and not is_id:
            stack.extend(reversed([
                (node, parent, not isinstance(node, (Mapping, list, tuple, set, frozenset)))
                for node in tree]))
        else:
            pairs.append((_node_id(tree, "a leaf of the nested dict"), parent))


# The most label ids a hierarchy holds (one int64 parent each: 128 MiB).
_MAX_LABELS = 2**24


def make_hierarchy(tree, *, n_labels=None):
    """Build and check a label tree: the parent array of the label ids.

    Parameters
    ----------
    tree : dict or iterable of (int, int) pairs
        The tree, in one of three forms:

        - a dict ``{fine: coarse}`` whose values are all ints: each label
          id mapped to its parent (e.g. ``{0: 10, 1: 10, 2: 11}``);
        - an iterable of ``(fine, coarse)`` pairs, the same relation;
        - a nested dict ``{coarse: children}`` where ``children`` is again a
          nested dict, a list (or tuple, set) of ids, or None for a leaf
          (e.g. ``{10: [0, 1], 11: {2: None, 12: [3, 4]}}``); the keys of the
          outer dict are the top-level nodes.

        Label ids are non-negative ints.
    n_labels : int, default=None
        Number of label ids, ``0 .. n_labels - 1``; ids that the tree does
        not mention become top-level nodes without children. ``None`` uses
        the largest id in the tree, plus one. At most ``2**24``: ids index
        an array, so they must be dense.

    Returns
    -------
    hierarchy : ndarray of shape (n_labels,), dtype=int64
        ``hierarchy[node]`` is the parent of ``node``, ``-1`` for a
        top-level node.

    Raises
    ------
    ValueError
        If a node is given two different parents, is its own parent, the
        parent links form a cycle, or an id is not below ``n_labels``.
    TypeError
        If an id is not an int.

    See Also
    --------
    hierarchy_depth : Depth of every node of a hierarchy.
    ndcg_at_r_score : Graded retrieval quality on a label tree.

    Examples
    --------
    >>> from sklearn_hash.metrics import make_hierarchy
    >>> make_hierarchy({0: 3, 1: 3, 2: 4})           # fine -> coarse
    array([ 3,  3,  4, -1, -1])
    >>> make_hierarchy({3: [0, 1], 4: {2: None}})    # nested, coarse first
    array([ 3,  3,  4, -1, -1])
    """
    pairs = []
    if isinstance(tree, Mapping) and tree and all(
        isinstance(v, Integral) and not isinstance(v, (bool, np.bool_)) for v in tree.values()
    ):
        for child, parent in tree.items():
            pairs.append((_node_id(child, "a label id"), _node_id(parent, "a parent id")))
    elif isinstance(tree, Mapping):
        _pairs_from_nested(tree, -1, pairs)
    else:
        try:
            items = list(tree)
        except TypeError:
            raise TypeError(f"tree must be a dict or an iterable of (fine, coarse) pairs; "
                            f"got {type(tree).__name__}.") from None
        for item in items:
            try:
                child, parent = item
            except (TypeError, ValueError):
                raise ValueError(f"tree must be an iterable of (fine, coarse) pairs; got "
                                 f"the item {item!r}.") from None
            pairs.append((_node_id(child, "a label id"), _node_id(parent, "a parent id")))
    largest = max((max(c, p) for c, p in pairs), default=-1)
    if n_labels is None:
        n_labels = largest + 1
    elif not isinstance(n_labels, Integral) or n_labels < 1:
        raise ValueError(f"n_labels must be a positive int; got {n_labels!r}.")
    if largest >= n_labels:
        raise ValueError(f"The tree names label id {largest}, but n_labels={n_labels} allows "
                         f"ids 0..{n_labels - 1} only.")
    if n_labels > _MAX_LABELS:
        given = f"the id {largest}" if largest == n_labels - 1 else f"n_labels={n_labels}"
        raise ValueError(f"Label ids index an array of one parent per id, so they must be "
                         f"dense: ids up to {_MAX_LABELS - 1:,} are allowed; got {given}. "
                         f"Renumber the labels 0, 1, ... (np.unique(labels, "
                         f"return_inverse=True)).")
    hierarchy = np.full(int(n_labels), -1, dtype=np.int64)
    for child, parent in pairs:
        if child == parent:
            raise ValueError(f"Label {child} is given as its own parent.")
        if hierarchy[child] != -1 and hierarchy[child] != parent:
            raise ValueError(f"Label {child} is given two parents, {hierarchy[child]} and "
                             f"{parent}; a tree gives each label one parent.")
        hierarchy[child] = parent
    return check_hierarchy(hierarchy)


def check_hierarchy(hierarchy, name="hierarchy"):
    """Validate a parent array; return it as a read-only-safe int64 copy."""
    array = np.asarray(hierarchy)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of parent ids (-1 for a "
                         f"top-level label); got an array of shape {array.shape}.")
    if array.dtype.kind not in "iu":
        if array.dtype.kind == "f" and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
            array = array.astype(np.int64)
        else:
            raise ValueError(f"{name} must hold integer parent ids (-1 for a top-level label); "
                             f"got dtype {array.dtype}.")
    array = np.array(array, dtype=np.int64)
    n = array.shape[0]
    bad = (array < -1) | (array >= n)
    if bad.any():
        node = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}[{node}] = {array[node]} is not a label id of the tree: "
                         f"parents must lie in 0..{n - 1}, or be -1 for a top-level label.")
    _depths(array, name)  # raises on cycles
    return array


def _depths(hierarchy, name="hierarchy"):
    """Depth of every node (top level 1); ValueError on a cycle."""
    n = hierarchy.shape[0]
    # Pointer jumping: jump[i] is the ancestor 2**r steps above i after r rounds
    # (-1 past the top), edges[i] the steps counted so far; O(n log depth).
    jump = hierarchy.copy()
    edges = (jump >= 0).astype(np.int64)
    for _ in range(max(1, n).bit_length() + 1):
        up = np.flatnonzero(jump >= 0)
        if not up.size:
            return edges + 1
        above = jump[up]
        edges[up] += edges[above]
        jump[up] = jump[above]
    # A node is still below an ancestor after more than n steps: its ancestors repeat.
    node = int(np.flatnonzero(jump >= 0)[0])
    cycle, seen = [], set()
    while node not in seen:
        seen.add(node)
        node = int(hierarchy[node])
    start = node
    while True:
        cycle.append(node)
        node = int(hierarchy[node])
        if node == start:
            break
    path = " -> ".join(str(c) for c in cycle + [start])
    raise ValueError(f"{name} has a cycle ({path}); parent links must lead every label "
                     f"to a top-level label (-1).")


def hierarchy_depth(hierarchy):
    """Depth of every node of a label tree: 1 at the top level (the virtual root is 0).

    Parameters
    ----------
    hierarchy : array-like of shape (n_labels,), dtype=int
        Parent of each label id, ``-1`` for a top-level label (see
        :func:`make_hierarchy`).

    Returns
    -------
    depth : ndarray of shape (n_labels,), dtype=int64
        Number of nodes on the path from the label up to its top-level
        ancestor, both included.

    Raises
    ------
    ValueError
        If ``hierarchy`` is not a valid parent array (cycle, parent out of range).

    Examples
    --------
    >>> from sklearn_hash.metrics import hierarchy_depth
    >>> hierarchy_depth([3, 3, 4, -1, -1])
    array([2, 2, 2, 1, 1])
    """
    return _depths(check_hierarchy(hierarchy))


def ancestor_table(hierarchy):
    """(n_nodes, height) table: column d-1 holds each node's ancestor at depth d
    (the node itself at its own depth), -1 below a node's depth."""
    depth = _depths(hierarchy)
    height = int(depth.max())
    table = np.full((hierarchy.shape[0], height), -1, dtype=np.int64)
    current = np.arange(hierarchy.shape[0])
    level = depth.copy()
    while (level > 0).any():
        alive = level > 0
        table[np.flatnonzero(alive), level[alive] - 1] = current[alive]
        current = np.where(alive, hierarchy[np.maximum(current, 0)], -1)
        level = level - 1
    return table, depth


def lca_depth(table, a, b):
    """Depth of the lowest common ancestor of nodes ``a`` and ``b`` (broadcast);
    ``-1`` entries (unlabelled) share nothing (depth 0)."""
    a = np.asarray(a)
    b = np.asarray(b)
    ta = table[np.maximum(a, 0)]
    tb = table[np.maximum(b, 0)]
    same = (ta == tb) & (ta >= 0)
    # Paths from the root agree on a prefix: its length is the LCA's depth.
    out = np.cumprod(same, axis=-1).sum(axis=-1)
    return np.where((a < 0) | (b < 0), 0, out)


def check_tree_labels(y, hierarchy, name, allow_unlabelled):
    """1-D integer labels that are nodes of the tree (or -1 where allowed)."""
    y = np.asarray(y)
    if y.ndim == 2:
        raise ValueError(f"A hierarchy needs 1-D labels (one node of the tree per row); "
                         f"{name} is a 2-D multi-label indicator matrix of shape {y.shape}.")
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D labels; got an array with {y.ndim} dimensions.")
    if y.size and y.dtype.kind not in "iu":
        if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise ValueError(f"With a hierarchy, {name} must hold integer label ids (nodes "
                             f"of the tree); got dtype {y.dtype}.")
    y = y.astype(np.int64)
    n = hierarchy.shape[0]
    low = -1 if allow_unlabelled else 0
    bad = (y < low) | (y >= n)
    if bad.any():
        value = int(y[np.flatnonzero(bad)[0]])
        allowed = f"0..{n - 1}" + (" or -1 (unlabelled)" if allow_unlabelled else "")
        raise ValueError(f"{name} holds the label {value}, which is not a node of the "
                         f"hierarchy: labels must be in {allowed}.")
    return y
