"""Deep Quantization Network (DQN), after Cao, Long, Wang, Zhu and Wen (2016).

The path of the data in ``fit``:

1. the labels become a 0/1 label matrix and a mask of labelled rows
   (``_encode_labels``; ``-1`` marks an unlabelled row);
2. a skorch ``NeuralNet`` trains the network of ``_dqn_torch.DQNModule``
   with the loss ``_dqn_torch.DQNLoss`` (the target of each row is its index,
   through which the loss finds the row's labels); the quantization term
   assigns each batch row to its nearest codewords in the current codebooks.
   From ``quantization_start`` of the epochs on (half, by default), after
   every epoch, the
   ``_dqn_torch.CodebookUpdate`` callback refits the product quantizer on
   the embeddings of all rows (warm started, 10 Lloyd iterations), hands
   the codebooks to the loss (the alternating optimisation of the paper;
   during the next epoch the loss moves the codewords towards the batch
   rows nearest to them, ``codebook_momentum``) and raises the loss's quantization weight linearly towards
   ``quantization_weight``, which it reaches in the last epoch;
3. a final :class:`~sklearn_hash.ProductQuantizer` is fitted on the
   embeddings of all rows (``quantizer_``): the best of 5 k-means runs per
   subspace (the warm start from the last training codebooks and 4
   k-means++ starts; random-row starts above 8 bits per codebook), by inertia.

``transform`` and ``distance_tables`` embed the rows with the network (eval
mode) and hand the embeddings to ``quantizer_``, so that
:class:`~sklearn_hash.QuantizedNeighbors` searches by ADC over the codes.
"""

from numbers import Integral, Real

import numpy as np
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.utils import check_array, check_random_state
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import (
    check_consistent_length,
    check_is_fitted,
    validate_data,
)

from ._hierarchy import ancestor_table, check_hierarchy, check_tree_labels, lca_depth
from ._pq import ProductQuantizer, _check_codebooks

# Lloyd iterations of the warm-started codebook refit after each epoch, and of
# the final fit on the trained embeddings.
_EPOCH_KMEANS_ITER = 10
_FINAL_KMEANS_ITER = 25
# How the first codebooks of training start, and the k-means runs of the
# final quantizer: the warm start from the last training codebooks and
# k-means++ starts, keeping the lowest inertia per subspace
# (``_dqn_torch.fit_codebooks``). At 8 bits on ESC-50 (one codebook of 256
# codewords, 5-6 rows per codeword) the best of 5 runs lowers weight 0's
# quantization error by 10-13% against the former single run, warm started
# from training codebooks that began at random rows (benchmarks/README.md).
_KMEANS_INIT = "k-means++"
_FINAL_KMEANS_INIT = 5
# Above this many bits per codebook the starts are random rows instead:
# scikit-learn's k-means++ seeding takes K sequential steps over all rows
# (O(n K d log K)), so on 40,000 x 64 rows a ProductQuantizer with two
# codebooks fitted in 6.1 s against 1.7 s from random rows at 9 bits, 28 s
# against 2.0 s at 10 and 46 s against 6.8 s at 12 (at 8 bits: 6.9 against
# 8.8 s, the better start converging sooner).
_KMEANS_PLUSPLUS_MAX_BITS = 8


def _torch_available():
    """Whether the deep extra (torch and skorch) can be imported."""
    try:
        _import_torch()
    except ImportError:
        return False
    return True


def _import_torch():
    try:
        import skorch  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "DeepQuantizationNetwork needs torch and skorch, which are not installed. "
            "Install the 'deep' extra: pip install 'sklearn-hash[deep]'."
        ) from exc
    from . import _dqn_torch

    return _dqn_torch


def _encode_labels(y, n_samples):
    """0/1 label matrix, labelled-row mask and classes from 1-D or 2-D ``y``."""
    y = check_array(y, ensure_2d=False, dtype=None, input_name="y")
    check_consistent_length(np.empty(n_samples), y)
    if y.ndim == 2:
        if y.dtype.kind not in "biuf" or not np.isin(y, (-1, 0, 1)).all():
            raise ValueError(
                "A 2-D y must be a multi-label indicator matrix of 0/1 values, with rows "
                "of -1 for unlabelled samples."
            )
        unlabelled = (y == -1).all(axis=1)
        if ((y == -1).any(axis=1) & ~unlabelled).any():
            raise ValueError(
                "A row of a 2-D y is either all -1 (unlabelled) or 0/1 labels; got rows "
                "that mix -1 with 0/1."
            )
        labelled = ~unlabelled
        label_matrix = np.where(labelled[:, None], y, 0).astype(np.float32)
        classes = np.arange(y.shape[1])
    else:
        if y.dtype.kind in "iuf":
            labelled = y != -1
        else:
            labelled = np.array([not (v == -1) for v in y.tolist()], dtype=bool)
        classes, index = np.unique(y[labelled], return_inverse=True)
        label_matrix = np.zeros((n_samples, len(classes)), dtype=np.float32)
        label_matrix[np.flatnonzero(labelled), index] = 1.0
    if labelled.sum() < 2:
        raise ValueError(
            f"DeepQuantizationNetwork needs at least 2 labelled rows for its pairwise "
            f"loss; got {labelled.sum()} labelled of {n_samples} (-1 marks an "
            f"unlabelled row)."
        )
    return label_matrix, labelled, classes


def _encode_tree_labels(y, n_samples, hierarchy, ancestor_similarity):
    """Graded pairwise targets of the labels of a tree.

    Returns the labelled-row mask, the classes (tree nodes seen in y), the
    index of each row's label into the classes (0 for unlabelled rows) and
    the (n_classes, n_classes) table of targets. Between two leaves: +1 for
    the same leaf, -1 for leaves with no common ancestor, and for leaves that
    share an ancestor at depth d ``-1 + (1 + ancestor_similarity) * min(1, d
    / (height - 1))``, where ``height`` is the depth of the deepest node of
    the tree. A label at an inner node stands for a leaf below it, unknown:
    its targets are the means of the leaf targets over the leaves below it,
    each equally likely (for two labels, over all pairs of leaves below
    them). For labels that are not ancestors of one another this is the
    leaf target at their common ancestor; a back-off row and a row of a
    class below it get ``(1 + (n - 1) * ancestor_similarity) / n`` in a
    two-level tree whose category has ``n`` classes.
    """
    hierarchy = check_hierarchy(hierarchy)
    y = np.asarray(y)
    if y.ndim == 2:
        raise ValueError(
            f"hierarchy needs 1-D labels (one node of the tree per row, -1 for unlabelled); "
            f"got a 2-D y of shape {y.shape} (multi-label). Use hierarchy=None for "
            f"multi-label y."
        )
    y = check_array(y, ensure_2d=False, dtype=None, input_name="y")
    check_consistent_length(np.empty(n_samples), y)
    y = check_tree_labels(y, hierarchy, "y", allow_unlabelled=True)
    labelled = y != -1
    if labelled.sum() < 2:
        raise ValueError(
            f"DeepQuantizationNetwork needs at least 2 labelled rows for its pairwise "
            f"loss; got {labelled.sum()} labelled of {n_samples} (-1 marks an "
            f"unlabelled row)."
        )
    classes, index = np.unique(y[labelled], return_inverse=True)
    row_nodes = np.zeros(n_samples, dtype=np.int64)
    row_nodes[labelled] = index
    table, _ = ancestor_table(hierarchy)
    height = table.shape[1]
    leaves = np.flatnonzero(~np.isin(np.arange(len(hierarchy)), hierarchy))
    # below[l, c]: leaf l is class c or lies under it; only the leaves under a class count
    below = (table[leaves][:, :, None] == classes[None, None, :]).any(axis=1)
    leaves, below = leaves[below.any(axis=1)], below[below.any(axis=1)]
    shared = lca_depth(table, leaves[:, None], leaves[None, :]).astype(np.float64)
    scale = np.minimum(1.0, shared / (height - 1)) if height > 1 else np.zeros_like(shared)
    leaf_targets = -1.0 + (1.0 + ancestor_similarity) * scale
    np.fill_diagonal(leaf_targets, 1.0)
    prior = below / below.sum(axis=0, keepdims=True)  # each class: its leaves, equally likely
    targets = prior.T @ leaf_targets @ prior
    return labelled, classes, row_nodes, targets.astype(np.float32)


def _row_ancestors(hierarchy, classes, row_nodes, labelled):
    """Each labelled row's ancestor at every depth above the leaves, as class indices.

    Returns an (n_samples, H - 1) int64 array, ``H`` the depth of the tree:
    column ``d - 1`` holds the index (into the ancestors at depth ``d`` that
    labelled rows have, in increasing node order) of the row's ancestor at
    depth ``d``, or -1 where the row has none (unlabelled, or labelled at a
    node shallower than ``d``). A row labelled at a node of depth ``d``
    counts that node as its own ancestor at depth ``d``. No columns for a
    flat tree.
    """
    table, _ = ancestor_table(hierarchy)
    out = np.full((len(row_nodes), table.shape[1] - 1), -1, dtype=np.int64)
    rows = np.flatnonzero(labelled)
    for column in range(table.shape[1] - 1):
        nodes = table[classes[row_nodes[rows]], column]
        has = nodes >= 0
        _, index = np.unique(nodes[has], return_inverse=True)
        out[rows[has], column] = index
    return out


def _row_leaves(classes, row_nodes, leaf_labelled):
    """Each leaf-labelled row's leaf as an index into the leaves that rows have, else -1."""
    out = np.full(len(row_nodes), -1, dtype=np.int64)
    rows = np.flatnonzero(leaf_labelled)
    _, out[rows] = np.unique(classes[row_nodes[rows]], return_inverse=True)
    return out


# Scale of the cosines in the ancestor term's softmax (an inverse temperature):
# cosines in [-1, 1] become logits in [-10, 10]. Screened on the validation
# folds of ESC-50 against 5 and 20 (benchmarks/README.md).
_ANCESTOR_SCALE = 10.0


# Whether the rows labelled at an inner node of a label tree (back-off) are
# repeated in each epoch until they fill about as many places as the rows
# labelled at a leaf (True), or appear once like unlabelled rows (False).
# Chosen by ``benchmarks/bench_hierarchy.py --validation``; a switch so that
# the benchmark can compare the two.
_BALANCE_BACKOFF = True


def _epoch_rows(labelled, backoff=None):
    """Rows of one epoch: every row once, ``labelled`` rows repeated up to about half.

    With few labels a shuffled batch would hold only a few labelled rows,
    and the pairwise term would see few pairs. Repeating the labelled rows
    ``r = ceil(n_other / n_labelled)`` times in all balances the two. With a
    label tree, ``labelled`` marks the rows labelled at a leaf, and
    ``backoff`` the rows labelled at an inner node: these are repeated
    ``ceil(r * n_labelled / n_backoff)`` times in all, so that they fill
    about as many places as the leaf rows (at least once each), without
    taking places from them. The epoch stays shorter than about ``3 n``
    rows whatever the mix of labels.
    """
    rows = np.arange(len(labelled), dtype=np.int64)
    labelled_rows = rows[labelled]
    if len(labelled_rows) == 0:
        return rows
    repeats = int(np.ceil((len(rows) - len(labelled_rows)) / len(labelled_rows)))
    parts = [rows] + [labelled_rows] * max(repeats - 1, 0)
    if backoff is not None and backoff.any():
        backoff_rows = rows[backoff]
        backoff_repeats = int(np.ceil(max(repeats, 1) * len(labelled_rows) / len(backoff_rows)))
        parts += [backoff_rows] * (backoff_repeats - 1)
    return np.concatenate(parts)


class DeepQuantizationNetwork(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Deep quantization network: a supervised embedding with product-quantized codes.

    A multi-layer perceptron maps each row to a unit-norm ``tanh`` bottleneck
    of ``embedding_dim`` dimensions, and the bottleneck is product-quantized
    into ``n_bits // subspace_bits`` codebooks of ``2 ** subspace_bits``
    codewords. The network is trained with

    ``loss = pairwise + quantization_weight * quantization``

    - *pairwise*: over the labelled pairs of a mini-batch, the mean of
      ``(s_ij - cos(z_i, z_j)) ** 2``, where ``s_ij = +1`` when rows i and j
      share a label and ``-1`` otherwise;
    - *quantization*: the mean squared distance ``||z_i - C h_i||^2`` between
      a row's embedding and its nearest codewords ``C h_i`` in the current
      codebooks.

    Network and codebooks are optimised jointly, alternately, as in the
    paper: during an epoch each batch row is assigned its nearest codewords
    ``h_i`` in the codebooks ``C`` and the network takes gradient steps on
    the whole loss, the codewords following the batch rows assigned to them
    (an online k-means step per batch, ``codebook_momentum``); after the
    epoch the codebooks and codes are refitted on the embeddings of all
    training rows (10 Lloyd iterations, warm started from the codewords). The first ``quantization_start`` share of the epochs
    (half, by default) trains the pairwise term alone; then the codebooks
    and the quantization term start, the term's weight rising linearly
    after each codebook update, from
    ``quantization_weight / n`` to ``quantization_weight`` in the last
    epoch (``n`` the number of epochs left at the start). The first
    codebooks start from k-means++. After training, a
    :class:`ProductQuantizer` is fitted on the embeddings (``quantizer_``):
    of 5 k-means runs, the warm start from the last codebooks and 4
    k-means++ starts, each subspace keeps the codebook of lowest inertia (as
    ``KMeans(n_init=...)``), so that the codes of a model trained without
    the term are as good as post-hoc k-means makes them. Above
    ``subspace_bits=8`` both k-means++ starts are random rows instead:
    seeding ``K = 2**subspace_bits`` codewords by k-means++ costs
    ``O(n K d log K)``, several times the k-means itself.

    The term controls the error of the codes: on ESC-50 YAMNet (10%
    labels, query fold 1, 3 seeds) the defaults lower the quantization
    error from 0.159 to 0.104 at 8 bits (-35%) and from 0.149 to 0.095 at
    32 bits (-36%) against ``quantization_weight=0``, for mAP@100 0.664
    against 0.663 (8 bits) and 0.683 against 0.679 (32 bits), paired
    differences +0.001 +- 0.002 and +0.005 +- 0.002 (standard errors over
    the seeds; ``benchmarks/README.md``). A larger weight lowers the error
    further at a price in ranking (weight 3: -63% / -64%, mAP@100 -0.025 /
    -0.015). The embeddings are unit vectors centred near the origin (mean
    squared distance to their mean 0.997, measured with earlier defaults),
    so the error relative to their spread falls by as much: the term does
    not just shrink the embedding.

    **Label trees.** With ``hierarchy`` (a parent array over the label ids,
    see :func:`sklearn_hash.metrics.make_hierarchy`) the labels are nodes of
    a tree and the pairwise targets are graded: ``s_ij = +1`` for two rows
    with the same leaf label, ``-1`` for labels with no common ancestor, and
    for labels that share an ancestor at depth ``d`` (top level 1) but are
    not the same leaf, ``-1 + (1 + ancestor_similarity) * min(1, d / (H -
    1))`` with ``H`` the depth of the tree: in a two-level tree, two classes
    of the same category get ``ancestor_similarity``. A row may be labelled
    at an inner node (known only coarsely, "back-off"): it stands for one
    of the leaves below that node, each equally likely, and its targets are
    the means of the leaf targets over them. Against a row of another
    branch that is the usual target; against a row of a class below it, or
    another back-off row of the same node, it lies between: in a two-level
    tree with ``n`` classes in the category, ``(1 + (n - 1) *
    ancestor_similarity) / n``. Each epoch repeats the rows labelled at a
    leaf up to about half of the epoch, and the back-off rows until they
    fill about as many places as the leaf rows (each at least once), so
    that coarse labels add pairs without diluting the fine ones.

    With a tree, a third term, ``ancestor_weight * ancestor``, asks each
    labelled row to be nearer the centroid of its own ancestor than those
    of the other ancestors of that depth: for every depth ``d`` above the
    leaves, the softmax cross-entropy of the row's ancestor at depth ``d``
    (a back-off row's own node at its depth) with logits ``10 * cos(z_i,
    m_a)``, ``m_a`` the normalised mean embedding of the labelled rows
    under ancestor ``a``, averaged over the depths. The centroids are
    recomputed from the network before training and after every epoch and
    held fixed during an epoch, as the codebooks are. Unlike the graded
    pairwise targets, which set how far apart two classes of one category
    lie, the term only asks for the order (own category first) and uses a
    back-off row's label exactly, without the uncertainty about its leaf.
    Two more terms use the same softmax: ``leaf_weight`` times its
    cross-entropy at the leaves (each row labelled at a leaf nearer the
    centroid of its own leaf than those of the other leaves), and
    ``entropy_weight`` times the entropy of each *unlabelled* row's softmax
    over the ancestors of a depth, averaged over the depths (entropy
    minimisation: an unlabelled row is asked to lie near one category,
    whichever it is). The leaf term keeps the fine classes apart, so that
    the categories can be drawn closer (``ancestor_similarity`` -0.4
    rather than -0.6) without costing fine mAP; the entropy term carries
    the categories to the 90% of the database that has no label.

    **Semi-supervised.** ``y = -1`` marks an unlabelled row (for a 2-D y, a
    row of -1): it takes part in the quantization term and in the codebooks,
    not in the pairwise term. The study this package follows labels about
    10% of the database.

    **Search.** :class:`QuantizedNeighbors` searches the codes by asymmetric
    distance (ADC): the database is stored as codes, a query goes through the
    network and its embedding is compared with the codebooks. The distance
    that ranks is the squared L2 distance between the query's embedding and
    the item's reconstruction. The reference model ranks by inner product
    instead; here the embeddings are unit vectors, for which
    ``||z - z'||^2 = 2 - 2 cos(z, z')`` ranks like the cosine the loss
    trains, and the L2 form also charges an item for the part of its
    embedding its code loses, which the inner product does not.

    torch and skorch are needed (``pip install 'sklearn-hash[deep]'``); the
    network is a skorch :class:`~skorch.net.NeuralNet`, built in ``fit``.

    Read more in the :ref:`User Guide <deep_quantization>`.

    Parameters
    ----------
    n_bits : int, default=32
        Code length in bits; a multiple of ``subspace_bits``.
    subspace_bits : int, default=8
        Bits per codebook: ``2 ** subspace_bits`` codewords each.
    hidden_layer_sizes : tuple of int, default=()
        Widths of the hidden ReLU layers (may be empty).
    embedding_dim : int, default=128
        Dimension of the ``tanh`` bottleneck; at least the number of codebooks.
    quantization_weight : float, default=0.75
        Weight of the quantization term (lambda in the study), reached in
        the last epoch (the weight ramps up over the second half of the
        epochs, see above). The default was chosen on ESC-50 YAMNet
        embeddings with 10% of the labels without the reported query fold:
        each of folds 2-5 in turn was the query fold and the other three the
        database, 2 fresh seeds (``benchmarks/bench_dqn.py --validation
        --weights 0 0.5 0.75 1 --first-seed 16``), after the final quantizer
        became the best of 5 k-means runs (which lowered weight 0's error,
        the baseline, by about 12% at 8 bits). Rule: among the weights that
        lower the quantization error by at least 30% at 8 and 32 bits, the
        best mean mAP@100 difference to weight 0. Weight 0.5 lowered the
        error by only 26% / 26% (8 / 32 bits); 0.75 by 35% / 34%, for
        mAP@100 differences of +0.007 / +0.008; 1 by 40% / 41%, +0.004 /
        +0.007. On the reported fold (3 seeds): -35% / -36% of error,
        mAP@100 +0.001 / +0.005 (see above). The previous defaults (weight
        0.5, one k-means run for the final quantizer) gave -34% / -31% and
        -0.012 / -0.001 against their own weight 0, whose codes were then
        worse in error but better in ranking: the same weight-0 networks
        score 0.675 / 0.685 with that k-means and 0.663 / 0.679 with the
        best of 5 runs, for errors 0.177 / 0.156 and 0.159 / 0.149.
    quantization_start : float, default=0.5
        Share of the epochs trained on the pairwise term alone before the
        codebooks and the quantization term start, in [0, 1): the term
        starts after ``int(quantization_start * max_epochs)`` epochs (at
        least one). On the validation folds (fresh seeds, see
        ``quantization_weight``) starting at 0.25 lowered the error further
        at the same weight but cost more mAP@100; at weight 0.3, for about
        the default's error, it cost about as much at 8 bits and more at 32.
    codebook_momentum : float or None, default=0.5
        ``None``: the codebooks stay fixed during an epoch (between two
        refits). A float in [0, 1): they also follow the embeddings during
        the epoch: before each network step, every codeword that rows of the
        batch are nearest to moves to ``momentum * codeword + (1 - momentum)
        * their mean`` (an online k-means step, as the exponential moving
        averages of VQ-VAE); the moved codewords also warm-start the refit
        after the epoch. At ``quantization_weight=0`` the network is the
        same, but the codes may differ a little (the warm starts). Chosen
        with ``quantization_weight`` (see there): on the validation folds,
        at weight 0.4, momentum 0.5 cost 0.005 / 0.002 of mAP@100 (8 / 32
        bits) where fixed codebooks cost 0.016 / 0.003, for a little less
        error reduction (32% / 29% against 35% / 33%).
    max_epochs : int, default=50
        Passes over the training rows.
    batch_size : int, default=256
        Rows per mini-batch.
    lr : float, default=1e-3
        Learning rate of the Adam optimizer.
    weight_decay : float, default=0.0
        L2 penalty of the Adam optimizer.
    device : str, default="cpu"
        torch device of the network, such as ``"cpu"`` or ``"cuda"``.
        Training and embedding run torch's CPU work on one thread (restored
        afterwards): torch's matrix products round differently with the
        number of threads, and on 1024-d inputs a model trained on two
        threads gave other codes than on one. The model is then the same on
        every machine, at 10-30% more training time on 2 cores (the
        codebooks' k-means refits during training run on one thread too).
    hierarchy : array-like of shape (n_labels,), dtype=int, default=None
        Label tree: ``hierarchy[label]`` is the parent of ``label``, ``-1``
        for a top-level label (build it with
        :func:`sklearn_hash.metrics.make_hierarchy`). The labels in ``y``
        are then integer nodes of the tree (leaves or inner nodes), ``-1``
        for unlabelled rows, and the pairwise targets are graded (see
        above). ``None``: flat labels.
    ancestor_similarity : float, default=-0.4
        With ``hierarchy``: the target cosine of two rows whose labels differ
        only at the last level of the tree (two classes of one category),
        in [-1, 1]; pairs sharing a shallower ancestor get proportionally
        less, down to -1, and back-off rows means of these (see above).
        Unused without ``hierarchy``. Chosen with ``leaf_weight`` and
        ``entropy_weight`` on ESC-50 YAMNet (32 bits, 10% fine labels, with
        and without coarse-only labels for 40% more) without the reported
        query fold: each of folds 2-5 in turn was the query fold and the
        other three the database, seeds 9-11 (``benchmarks/bench_hierarchy.py
        --validation --rule coarse --settings ...``, see
        ``benchmarks/README.md``). Rule, stated before the run: among the
        settings whose fine mAP@100 stayed within 0.01 of the flat model's
        in both label settings and whose mean nDCG@100 was at least the
        previous defaults' (a = -0.6, no leaf or entropy term), the best
        mean coarse mAP@100, the previous defaults kept unless beaten by
        0.003. Against flat DQN there, 10% fine labels / with coarse-only
        rows: coarse mAP@100 +0.082 / +0.126, nDCG@100 +0.153 / +0.201, fine
        mAP@100 -0.001 / +0.009 (previous defaults: +0.069 / +0.121, +0.128
        / +0.188, -0.008 / -0.004). Without the leaf term, values nearer 0
        raise coarse mAP but cost fine mAP (an earlier validation, seeds
        2-3, without the leaf and entropy terms, chose -0.6; at -0.5 fine
        mAP fell by 0.024 there).
    ancestor_weight : float, default=0.1
        With ``hierarchy``: weight of the ancestor term (see above), ``>= 0``;
        0 leaves the graded pairwise term alone. Unused without
        ``hierarchy`` or with a tree of one level. The default was chosen on
        ESC-50 YAMNet as ``ancestor_similarity`` was, on two fresh seeds
        (``benchmarks/bench_hierarchy.py --validation --values -0.6
        --ancestor-weights 0 0.1 0.2 0.3 --seeds 2 --first-seed 5``). Rule:
        the rule of ``ancestor_similarity``, and a positive weight only if
        its fine mAP@100 stays within 0.002 of weight 0's in both label
        settings: 0.1 (0.2 and 0.3 raised coarse mAP a little more but cost
        fine mAP with the coarse-only rows). Against weight 0 there: coarse
        mAP@100 +0.002 / +0.010 and nDCG@100 +0.008 / +0.008 (10% fine
        labels / with 40% coarse-only rows), fine mAP@100 +0.003 / -0.001.
        That run had a = -0.6 and no leaf or entropy term; the weight was
        kept, not revalidated, when those came.
    leaf_weight : float, default=0.1
        With ``hierarchy``: weight of the leaf term, ``>= 0``: the ancestor
        term's softmax cross-entropy at the leaves, each row labelled at a
        leaf asked to be nearer the centroid of its own leaf (the normalised
        mean embedding of the rows labelled there) than those of the other
        leaves. 0: no leaf term. Unused without ``hierarchy``; with a tree
        of one level it is the only difference from the flat model. Chosen
        with ``ancestor_similarity`` (see there, the same run and rule).
        Screened before it without the entropy term (seeds 7-8 of folds
        2-5, a scratch script), against flat DQN, 10% fine labels / with
        coarse-only rows: at a = -0.5, 0.05 gave coarse mAP@100 +0.074 /
        +0.121 and fine mAP@100 -0.005 / +0.013, 0.1 +0.069 / +0.119 and
        -0.001 / +0.019; at a = -0.4, 0.1 gave +0.075 / +0.124 and -0.009 /
        +0.015, 0.2 +0.071 / +0.121 and +0.001 / +0.021.
    entropy_weight : float, default=0.05
        With ``hierarchy``: weight of the entropy term, ``>= 0``: the mean
        over the depths above the leaves of the entropy of each unlabelled
        row's softmax over the ancestors' centroids (the ancestor term's
        logits), which asks an unlabelled row to lie near one ancestor
        (entropy minimisation, Grandvalet and Bengio, 2005). 0: no entropy
        term. Unused without ``hierarchy`` or with a tree of one level.
        Chosen with ``ancestor_similarity`` (see there). In that run the
        entropy term alone (a = -0.6, no leaf term) raised coarse mAP@100
        to +0.079 / +0.125 over the flat model but cost fine mAP@100
        (-0.013 / -0.008: not eligible); with the leaf term, 0.1 did no
        better than 0.05 (coarse +0.077 / +0.123, fine -0.003 / +0.010 at
        a = -0.5).
    random_state : int, RandomState instance or None, default=None
        Seeds the network's initialisation, the mini-batch order and the
        codebooks. Refits with the same seed on CPU give the same model.
    verbose : int, default=0
        ``1`` prints skorch's table of epochs (losses and durations).

    Attributes
    ----------
    net_ : skorch.NeuralNet
        The trained network.
    quantizer_ : ProductQuantizer
        The product quantizer of the embeddings: per subspace, the lowest
        inertia of 5 k-means runs (its ``init`` holds those codebooks).
    n_subspaces_ : int
        Number of codebooks, ``n_bits // subspace_bits``.
    classes_ : ndarray
        The labels seen in ``y`` (for a 2-D y, the column indices).
    n_labelled_ : int
        Number of labelled training rows.
    history_ : list of dict
        One entry per epoch: ``train_loss``, ``pairwise_loss``,
        ``ancestor_loss`` (with ``hierarchy`` and a positive
        ``ancestor_weight``), ``quantization_loss`` and
        ``quantization_weight`` (the weight the epoch used; both once the
        term has started, halfway) and ``dur`` (seconds).
    n_features_in_ : int
        Number of features seen during ``fit``.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during ``fit``. Defined only when `X`
        has feature names that are all strings.

    See Also
    --------
    ProductQuantizer : The unsupervised quantizer of the raw features.
    QuantizedNeighbors : ADC search over the codes.

    References
    ----------
    .. [1] Y. Cao, M. Long, J. Wang, H. Zhu and Q. Wen, "Deep Quantization
       Network for Efficient Image Retrieval", AAAI 2016.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.datasets import load_digits
    >>> from sklearn.frozen import FrozenEstimator
    >>> from sklearn_hash import DeepQuantizationNetwork, QuantizedNeighbors
    >>> X, y = load_digits(return_X_y=True)
    >>> X_db, y_db, X_q, y_q = X[:1500] / 16, y[:1500], X[1500:] / 16, y[1500:]
    >>> y_partial = np.where(np.arange(1500) % 10 == 0, y_db, -1)  # 10% labelled
    >>> dqn = DeepQuantizationNetwork(n_bits=16, hidden_layer_sizes=(64,),
    ...                               embedding_dim=16, max_epochs=20,
    ...                               random_state=0).fit(X_db, y_partial)
    >>> dqn.transform(X_q[:2]).shape
    (2, 2)
    >>> # Index the database with the trained network; score on the full labels.
    >>> search = QuantizedNeighbors(FrozenEstimator(dqn), n_neighbors=50).fit(X_db, y_db)
    >>> round(search.score(X_q, y_q), 1) >= 0.8
    True
    """

    # Parameters added after indexes could be saved, with the value under which a
    # model saved before each existed was trained: loading such an index sets them
    # (``_persistence.decode``), so that get_params says how the model was trained.
    _PARAMS_ADDED = {"codebook_momentum": None, "ancestor_weight": 0.0, "leaf_weight": 0.0,
                     "entropy_weight": 0.0}

    _parameter_constraints: dict = {
        "n_bits": [Interval(Integral, 1, None, closed="left")],
        "subspace_bits": [Interval(Integral, 1, 16, closed="both")],
        "hidden_layer_sizes": ["array-like"],
        "embedding_dim": [Interval(Integral, 1, None, closed="left")],
        "quantization_weight": [Interval(Real, 0, None, closed="left")],
        "quantization_start": [Interval(Real, 0, 1, closed="left")],
        "codebook_momentum": [Interval(Real, 0, 1, closed="left"), None],
        "max_epochs": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 2, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "device": [str],
        "hierarchy": ["array-like", None],
        "ancestor_similarity": [Interval(Real, -1, 1, closed="both")],
        "ancestor_weight": [Interval(Real, 0, None, closed="left")],
        "leaf_weight": [Interval(Real, 0, None, closed="left")],
        "entropy_weight": [Interval(Real, 0, None, closed="left")],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        n_bits=32,
        *,
        subspace_bits=8,
        hidden_layer_sizes=(),
        embedding_dim=128,
        quantization_weight=0.75,
        quantization_start=0.5,
        codebook_momentum=0.5,
        max_epochs=50,
        batch_size=256,
        lr=1e-3,
        weight_decay=0.0,
        device="cpu",
        hierarchy=None,
        ancestor_similarity=-0.4,
        ancestor_weight=0.1,
        leaf_weight=0.1,
        entropy_weight=0.05,
        random_state=None,
        verbose=0,
    ):
        self.n_bits = n_bits
        self.subspace_bits = subspace_bits
        self.hidden_layer_sizes = hidden_layer_sizes
        self.embedding_dim = embedding_dim
        self.quantization_weight = quantization_weight
        self.quantization_start = quantization_start
        self.codebook_momentum = codebook_momentum
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.device = device
        self.hierarchy = hierarchy
        self.ancestor_similarity = ancestor_similarity
        self.ancestor_weight = ancestor_weight
        self.leaf_weight = leaf_weight
        self.entropy_weight = entropy_weight
        self.random_state = random_state
        self.verbose = verbose

    def _check_params(self, n_samples):
        sizes = np.asarray(self.hidden_layer_sizes)
        if sizes.ndim != 1 or (sizes.size and (sizes.dtype.kind not in "iu" or sizes.min() < 1)):
            raise ValueError(
                f"hidden_layer_sizes must be a sequence of positive ints; got "
                f"{self.hidden_layer_sizes!r}."
            )
        n_subspaces, _ = _check_codebooks(self, n_samples)
        if n_subspaces > self.embedding_dim:
            raise ValueError(
                f"embedding_dim must be at least the number of codebooks, n_bits // "
                f"subspace_bits = {n_subspaces}; got embedding_dim={self.embedding_dim}."
            )
        return tuple(int(s) for s in sizes)

    def _kmeans_init(self):
        """How the codebooks' k-means start (see _KMEANS_PLUSPLUS_MAX_BITS)."""
        return _KMEANS_INIT if self.subspace_bits <= _KMEANS_PLUSPLUS_MAX_BITS else "random"

    def _quantizer(self, rng, n_iter):
        return ProductQuantizer(
            n_bits=self.n_bits,
            subspace_bits=self.subspace_bits,
            n_iter=n_iter,
            init=self._kmeans_init(),
            random_state=rng.randint(np.iinfo(np.int32).max),
        )

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Train the network and the codebooks.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training rows (the database, typically).
        y : array-like of shape (n_samples,) or (n_samples, n_labels)
            Class labels, ``-1`` for an unlabelled row; or a 0/1 multi-label
            indicator matrix, rows of ``-1`` for unlabelled rows. Two rows are
            similar when they share a label. With ``hierarchy``: 1-D integer
            nodes of the tree (a leaf, or an inner node for a row known only
            coarsely), ``-1`` for an unlabelled row.

        Returns
        -------
        self : DeepQuantizationNetwork
            Fitted estimator.
        """
        if y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y is None."
            )
        dqn_torch = _import_torch()
        import torch
        from skorch import NeuralNet

        X = validate_data(self, X, dtype=[np.float32, np.float64], order="C", ensure_min_samples=2)
        try:
            device = torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"device={self.device!r} is not a torch device: {exc}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device={self.device!r} asks for a GPU, but torch finds no CUDA device here; "
                f"use device='cpu'."
            )
        n_samples, n_features = X.shape
        hidden = self._check_params(n_samples)
        graded = {}
        callbacks = []
        X32 = np.ascontiguousarray(X, dtype=np.float32)
        if self.hierarchy is None:
            label_matrix, labelled, self.classes_ = _encode_labels(y, n_samples)
        else:
            labelled, self.classes_, row_nodes, targets = _encode_tree_labels(
                y, n_samples, self.hierarchy, self.ancestor_similarity)
            is_leaf = ~np.isin(self.classes_, check_hierarchy(self.hierarchy))
            leaf_labelled = labelled & is_leaf[row_nodes]
            label_matrix = np.zeros((n_samples, 1), dtype=np.float32)
            graded = {"criterion__pair_targets": targets, "criterion__row_nodes": row_nodes}
            row_ancestors = _row_ancestors(check_hierarchy(self.hierarchy), self.classes_,
                                           row_nodes, labelled)
            n_depths = row_ancestors.shape[1]
            if self.leaf_weight > 0:
                row_ancestors = np.column_stack(
                    [row_ancestors, _row_leaves(self.classes_, row_nodes, leaf_labelled)])
            if ((self.ancestor_weight > 0 or self.entropy_weight > 0) and n_depths
                    or self.leaf_weight > 0):
                graded.update(criterion__row_ancestors=row_ancestors,
                              criterion__ancestor_weight=self.ancestor_weight,
                              criterion__ancestor_scale=_ANCESTOR_SCALE,
                              criterion__leaf_weight=self.leaf_weight,
                              criterion__entropy_weight=self.entropy_weight)
                with_ancestor = np.flatnonzero((row_ancestors >= 0).any(axis=1))
                callbacks.append(("ancestors", dqn_torch.AncestorCentroids(
                    X32[with_ancestor], row_ancestors[with_ancestor])))
        self.n_labelled_ = int(labelled.sum())
        self.n_subspaces_ = self.n_bits // self.subspace_bits

        rng = check_random_state(self.random_state)
        torch_seed = int(rng.randint(np.iinfo(np.int32).max))
        if self.hierarchy is None:
            epoch_rows = _epoch_rows(labelled)
        else:
            epoch_rows = _epoch_rows(leaf_labelled, (labelled & ~leaf_labelled)
                                     if _BALANCE_BACKOFF else None)
        codebooks = dqn_torch.CodebookUpdate(
            X32, self._quantizer(rng, _EPOCH_KMEANS_ITER), self.quantization_weight,
            start_epoch=max(1, int(self.quantization_start * self.max_epochs)),
            max_epochs=self.max_epochs,
        )
        net = NeuralNet(
            module=dqn_torch.DQNModule,
            module__n_features=n_features,
            module__hidden_layer_sizes=hidden,
            module__embedding_dim=self.embedding_dim,
            criterion=dqn_torch.DQNLoss,
            criterion__label_matrix=label_matrix,
            criterion__labelled=labelled,
            criterion__quantization_weight=0.0,  # set by the callback, epoch by epoch
            criterion__codebook_momentum=self.codebook_momentum,
            **graded,
            optimizer=torch.optim.Adam,
            optimizer__weight_decay=self.weight_decay,
            lr=self.lr,
            max_epochs=self.max_epochs,
            batch_size=min(self.batch_size, n_samples),
            iterator_train__shuffle=True,
            train_split=None,
            callbacks=[("codebooks", codebooks)] + callbacks,
            device=self.device,
            verbose=self.verbose,
        )
        # One torch thread: the trained model must not depend on the machine's cores.
        with dqn_torch.one_thread(), torch.random.fork_rng(
                devices=[] if device.type == "cpu" else None):
            torch.manual_seed(torch_seed)
            net.fit(X32[epoch_rows], epoch_rows)
        self.net_ = net

        Z = dqn_torch.embed(net, X32)
        self.quantizer_ = dqn_torch.fit_codebooks(
            self._quantizer(rng, _FINAL_KMEANS_ITER), Z, previous=codebooks.quantizer_,
            n_init=_FINAL_KMEANS_INIT, restart_init=self._kmeans_init(),
        )
        self.history_ = [
            {key: epoch[key] for key in ("train_loss", "pairwise_loss", "ancestor_loss",
                                         "leaf_loss", "entropy_loss", "quantization_loss",
                                         "quantization_weight", "dur")
             if key in epoch}
            for epoch in net.history
        ]
        return self

    def embed(self, X):
        """The network's bottleneck embeddings of X (unit length).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to embed.

        Returns
        -------
        Z : ndarray of shape (n_samples, embedding_dim), dtype=float32
            Unit-norm ``tanh`` bottleneck of each row (the network in eval
            mode, so each row's embedding does not depend on the others).
        """
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float32, np.float64], order="C", reset=False)
        return _import_torch().embed(self.net_, X)

    def transform(self, X):
        """Encode X: the product-quantization codes of its embeddings.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to encode.

        Returns
        -------
        codes : ndarray of shape (n_samples, n_subspaces)
            Codeword indices, ``uint8`` (``uint16`` when ``subspace_bits > 8``).
        """
        Z = self.embed(X)
        return self.quantizer_.transform(Z)

    def distance_tables(self, X):
        """ADC tables of the embeddings of X, for :class:`QuantizedNeighbors`.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Query rows.

        Returns
        -------
        tables : ndarray of shape (n_samples, n_subspaces, 2**subspace_bits), dtype=float32
            Squared distances from each block of a row's embedding to every
            codeword of that block's codebook.
        """
        Z = self.embed(X)
        return self.quantizer_.distance_tables(Z)

    def symmetric_distance_tables(self):
        """Squared distances between the codewords of each codebook (SDC tables).

        Returns
        -------
        tables : ndarray of shape (n_subspaces, K, K), dtype=float32
            See :meth:`ProductQuantizer.symmetric_distance_tables`.
        """
        check_is_fitted(self)
        return self.quantizer_.symmetric_distance_tables()

    def _get_persistent_state(self):
        """Fitted state as plain values and arrays, for saving an index without pickle.

        The network is kept as its module's constructor arguments and its
        weights (a state dict of numpy arrays); see ``sklearn_hash._persistence``.
        """
        params = self.get_params(deep=False)
        state = {k: v for k, v in vars(self).items()
                 if k not in params and k != "net_" and not k.startswith("__")}
        if not hasattr(self, "net_"):  # unfitted
            return state
        state["module_args_"] = {k[len("module__"):]: v for k, v in self.net_.get_params().items()
                                 if k.startswith("module__")}
        state["module_weights_"] = {name: tensor.detach().cpu().numpy()
                                    for name, tensor in self.net_.module_.state_dict().items()}
        return state

    def _set_persistent_state(self, state):
        """Rebuild the network from :meth:`_get_persistent_state`'s values (CPU)."""
        if "module_args_" not in state:  # unfitted
            vars(self).update(state)
            return
        dqn_torch = _import_torch()
        import torch
        from skorch import NeuralNet

        state = dict(state)
        module_args = state.pop("module_args_")
        weights = state.pop("module_weights_")
        net = NeuralNet(module=dqn_torch.DQNModule, criterion=torch.nn.MSELoss, device="cpu",
                        **{f"module__{k}": v for k, v in module_args.items()})
        net.initialize()
        net.module_.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()},
                                    strict=True)
        net.module_.eval()
        vars(self).update(state)
        self.net_ = net

    @property
    def _n_features_out(self):
        return self.n_bits // self.subspace_bits

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.transformer_tags.preserves_dtype = []
        return tags
