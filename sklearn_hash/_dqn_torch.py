"""The torch side of DeepQuantizationNetwork: network, loss and codebook callback.

Imported only from inside ``DeepQuantizationNetwork`` methods, so that
``import sklearn_hash`` works without torch. The classes live at module level
so that a fitted estimator pickles.
"""

import warnings
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from skorch.callbacks import Callback
from torch import nn

from ._kmeans import training_rows


class DQNModule(nn.Module):
    """MLP from the input features to a unit-norm ``tanh`` bottleneck.

    ``forward`` returns ``normalize(tanh(W_L relu(... relu(W_1 x))))``: the
    ``tanh`` bottleneck of the reference model, scaled to unit length so that
    squared L2 distances between embeddings are ``2 - 2 cos``, the similarity
    the pairwise loss trains. With no hidden layer it is a linear map.

    Weights start orthogonal (gain sqrt(2) before a ReLU, 1 before the
    ``tanh``) and biases at zero: audio embeddings are often L2-normalised,
    so their coordinates are small and random biases would swamp them,
    starting every row at nearly the same embedding.
    """

    def __init__(self, n_features, hidden_layer_sizes, embedding_dim):
        super().__init__()
        layers = []
        width = n_features
        for size in hidden_layer_sizes:
            layers += [_linear(width, size, gain=np.sqrt(2.0)), nn.ReLU()]
            width = size
        layers += [_linear(width, embedding_dim, gain=1.0), nn.Tanh()]
        self.layers = nn.Sequential(*layers)

    def forward(self, X):
        return F.normalize(self.layers(X), dim=1)


def _linear(n_in, n_out, gain):
    layer = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(layer.weight, gain=gain)
    nn.init.zeros_(layer.bias)
    return layer


class DQNLoss(nn.Module):
    """Pairwise cosine loss plus a weighted quantization loss.

    The network's target ``y`` is the row index into the training set; the
    loss looks up what it needs for those rows:

    - pairwise: over the labelled rows of the batch, the mean over pairs
      ``i != j`` of ``(s_ij - cos(z_i, z_j))**2``, with ``s_ij = +1`` when the
      rows share a label and ``-1`` otherwise (``label_matrix`` holds one 0/1
      row per training row; unlabelled rows are left out through ``labelled``);
      with a label tree, ``s_ij = pair_targets[row_nodes[i], row_nodes[j]]``
      instead, the graded targets of the rows' labels (``label_matrix`` is
      then unused);
    - quantization: the mean over the batch of ``||z_i - C h_i||^2``, where
      ``C h_i`` is the nearest codeword of each block of ``z_i`` in the
      current product codebooks (``codebooks``, set by
      :class:`CodebookUpdate`; the term is off until then), times
      ``quantization_weight`` (which :class:`CodebookUpdate` ramps). The codes
      ``h_i`` are recomputed from the current embeddings at every batch, with
      the codebooks held fixed, so the gradient draws each embedding towards
      its nearest codewords: the network step of the alternating
      optimisation of Cao et al. (2016).

    With a label tree, three optional terms use the centroids of
    :class:`AncestorCentroids` (one set per column of ``row_ancestors``):
    ``ancestor_weight`` times the mean over the depths above the leaves (the
    first ``n_depths`` columns) of the softmax cross-entropy of each labelled
    row's ancestor, logits ``ancestor_scale * cos(z_i, m_a)``;
    ``leaf_weight`` times the same cross-entropy of the leaf-labelled rows'
    leaves (then the last column of ``row_ancestors``); and
    ``entropy_weight`` times the mean over the depths of the entropy of the
    unlabelled rows' softmax over the ancestors.
    """

    def __init__(self, label_matrix, labelled, quantization_weight, pair_targets=None,
                 row_nodes=None, row_ancestors=None, ancestor_weight=0.0, ancestor_scale=10.0,
                 codebook_momentum=None, leaf_weight=0.0, entropy_weight=0.0):
        super().__init__()
        self.codebook_momentum = codebook_momentum
        self.register_buffer("row_ancestors", torch.as_tensor(
            np.zeros((len(labelled), 0)) if row_ancestors is None else row_ancestors,
            dtype=torch.long))
        self.ancestor_weight = ancestor_weight
        self.ancestor_scale = ancestor_scale
        # with a leaf term, the last column of row_ancestors holds the rows' leaves
        self.leaf_weight = leaf_weight
        self.n_depths = self.row_ancestors.shape[1] - (1 if leaf_weight > 0 else 0)
        self.entropy_weight = entropy_weight
        self.ancestor_centroids = []
        self.register_buffer("label_matrix", torch.as_tensor(label_matrix, dtype=torch.float32))
        self.register_buffer("labelled", torch.as_tensor(labelled, dtype=torch.bool))
        self.graded = pair_targets is not None
        if self.graded:
            self.register_buffer("pair_targets",
                                 torch.as_tensor(pair_targets, dtype=torch.float32))
            self.register_buffer("row_nodes", torch.as_tensor(row_nodes, dtype=torch.long))
        self.register_buffer("codebooks", torch.empty(0))
        self.bounds = []
        self.quantization_weight = quantization_weight
        self.reset_running_losses()

    def reset_running_losses(self):
        self.running = {"pairwise": 0.0, "ancestor": 0.0, "leaf": 0.0, "entropy": 0.0,
                        "quantization": 0.0, "batches": 0}

    def set_ancestor_centroids(self, centroids, device):
        """Hold each depth's ancestor centroids (unit rows) fixed for the next steps."""
        self.ancestor_centroids = [torch.as_tensor(np.asarray(c, dtype=np.float32), device=device)
                                   for c in centroids]

    def _node_cross_entropy(self, z, index, column):
        """Softmax cross-entropy of the rows' nodes in one column, None without two nodes."""
        centroids = self.ancestor_centroids[column]
        target = self.row_ancestors[index, column]
        has = target >= 0
        if has.any() and centroids.shape[0] > 1:
            logits = self.ancestor_scale * z[has] @ centroids.T
            return F.cross_entropy(logits, target[has])
        return None

    def ancestor_loss(self, z, index):
        """Mean over the depths of the softmax cross-entropy of the rows' ancestors."""
        terms = [self._node_cross_entropy(z, index, column) for column in range(self.n_depths)]
        terms = [t for t in terms if t is not None]
        return torch.stack(terms).mean() if terms else None

    def entropy_loss(self, z, index):
        """Mean over the depths of the entropy of the unlabelled rows' ancestor posteriors.

        The posterior of an unlabelled row over the ancestors of a depth is
        the softmax of its logits against their centroids, as in the
        ancestor term; lowering its entropy asks the row to lie near one
        ancestor's centroid (entropy minimisation, Grandvalet and Bengio
        2005). None when the batch has no unlabelled row.
        """
        unlabelled = ~self.labelled[index]
        if not unlabelled.any():
            return None
        terms = []
        for centroids in self.ancestor_centroids[: self.n_depths]:
            if centroids.shape[0] > 1:
                log_p = F.log_softmax(self.ancestor_scale * z[unlabelled] @ centroids.T, dim=1)
                terms.append(-(log_p.exp() * log_p).sum(dim=1).mean())
        return torch.stack(terms).mean() if terms else None

    def leaf_loss(self, z, index):
        """The softmax cross-entropy of the leaf-labelled rows' leaves (the last column)."""
        return self._node_cross_entropy(z, index, self.row_ancestors.shape[1] - 1)

    def set_codebooks(self, centers, bounds, device):
        """Hold ``centers`` (n_subspaces, K, max block) fixed for the next steps."""
        self.codebooks = torch.as_tensor(np.asarray(centers, dtype=np.float32), device=device)
        self.bounds = [int(b) for b in bounds]

    def follow(self, z):
        """Move each codeword towards the mean of the batch rows nearest to it (no gradient).

        ``c <- momentum * c + (1 - momentum) * mean``, for the codewords that
        some row of the batch is nearest to; the others stay.
        """
        momentum = self.codebook_momentum
        with torch.no_grad():
            for m in range(len(self.bounds) - 1):
                lo, hi = self.bounds[m], self.bounds[m + 1]
                block, centers = z[:, lo:hi], self.codebooks[m, :, : hi - lo]
                sq = (centers**2).sum(dim=1)[None, :] - 2.0 * block @ centers.T
                nearest = sq.argmin(dim=1)
                counts = torch.bincount(nearest, minlength=centers.shape[0]).to(z.dtype)
                sums = torch.zeros_like(centers).index_add_(0, nearest, block)
                used = counts > 0
                means = sums[used] / counts[used][:, None]
                self.codebooks[m, used, : hi - lo] = (momentum * centers[used]
                                                      + (1.0 - momentum) * means)

    def reconstruct(self, z):
        """Each row's nearest codeword in every block (no gradient)."""
        with torch.no_grad():
            out = torch.empty_like(z)
            for m in range(len(self.bounds) - 1):
                lo, hi = self.bounds[m], self.bounds[m + 1]
                block, centers = z[:, lo:hi], self.codebooks[m, :, : hi - lo]
                sq = (centers**2).sum(dim=1)[None, :] - 2.0 * block @ centers.T
                out[:, lo:hi] = centers[sq.argmin(dim=1)]
        return out

    def forward(self, z, index):
        keep = self.labelled[index]
        zl = z[keep]
        pairwise = z.sum() * 0.0  # keeps the graph when the batch has < 2 labelled rows
        if zl.shape[0] >= 2:
            if self.graded:
                nodes = self.row_nodes[index[keep]]
                similar = self.pair_targets[nodes[:, None], nodes[None, :]].to(z.dtype)
            else:
                labels = self.label_matrix[index[keep]]
                similar = (labels @ labels.T > 0).to(z.dtype) * 2.0 - 1.0
            off_diagonal = ~torch.eye(zl.shape[0], dtype=torch.bool, device=z.device)
            pairwise = ((similar - zl @ zl.T)[off_diagonal] ** 2).mean()
        loss = pairwise
        if self.ancestor_weight > 0 and self.ancestor_centroids:
            ancestor = self.ancestor_loss(z, index)
            if ancestor is not None:
                loss = loss + self.ancestor_weight * ancestor
                self.running["ancestor"] += float(ancestor.detach())
        if self.entropy_weight > 0 and self.ancestor_centroids:
            entropy = self.entropy_loss(z, index)
            if entropy is not None:
                loss = loss + self.entropy_weight * entropy
                self.running["entropy"] += float(entropy.detach())
        if self.leaf_weight > 0 and self.ancestor_centroids:
            leaf = self.leaf_loss(z, index)
            if leaf is not None:
                loss = loss + self.leaf_weight * leaf
                self.running["leaf"] += float(leaf.detach())
        if self.codebooks.numel():
            if self.codebook_momentum is not None and self.training:
                self.follow(z.detach())
            quantization = ((z - self.reconstruct(z)) ** 2).sum(dim=1).mean()
            loss = loss + self.quantization_weight * quantization
            self.running["quantization"] += float(quantization.detach())
        self.running["pairwise"] += float(pairwise.detach())
        self.running["batches"] += 1
        return loss


class CodebookUpdate(Callback):
    """The codebook step of the alternating optimisation, and the weight's schedule.

    After each epoch from ``start_epoch`` on, every row of ``X`` is embedded
    (eval mode) and a clone of ``quantizer`` (a ProductQuantizer) is fitted
    on the embeddings, warm started from the previous codebooks: Lloyd
    iterations alternate the codes (nearest codewords) and the codebooks
    (least-squares means) with the network fixed. The loss then holds these
    codebooks fixed for the network steps of the next epoch.

    The loss's quantization weight rises linearly with the codebook updates:
    after the ``k``-th update it is ``weight * k / (max_epochs -
    start_epoch)``, so that it reaches ``weight`` in the last epoch (all at
    once when ``start_epoch >= max_epochs - 1``). Mean loss terms of the
    epoch and the weight it used go to the history (and to skorch's printed
    table).
    """

    def __init__(self, X, quantizer, weight, start_epoch=1, max_epochs=1):
        self.X = X
        self.quantizer = quantizer
        self.weight = weight
        self.start_epoch = start_epoch
        self.max_epochs = max_epochs

    def initialize(self):
        self.quantizer_ = None
        return self

    def on_epoch_end(self, net, **kwargs):
        criterion = net.criterion_
        batches = max(criterion.running["batches"], 1)
        net.history.record("pairwise_loss", criterion.running["pairwise"] / batches)
        if criterion.ancestor_weight > 0 and criterion.n_depths and criterion.ancestor_centroids:
            net.history.record("ancestor_loss", criterion.running["ancestor"] / batches)
        if criterion.entropy_weight > 0 and criterion.n_depths and criterion.ancestor_centroids:
            net.history.record("entropy_loss", criterion.running["entropy"] / batches)
        if criterion.leaf_weight > 0 and criterion.ancestor_centroids:
            net.history.record("leaf_loss", criterion.running["leaf"] / batches)
        if criterion.codebooks.numel():
            net.history.record("quantization_loss", criterion.running["quantization"] / batches)
            net.history.record("quantization_weight", criterion.quantization_weight)
        criterion.reset_running_losses()
        if len(net.history) < self.start_epoch:
            return
        Z = embed(net, self.X)
        self.quantizer_ = fit_codebooks(self.quantizer, Z, previous=self.quantizer_)
        criterion.set_codebooks(self.quantizer_.cluster_centers_,
                                self.quantizer_.subspace_bounds_, net.device)
        updates = len(net.history) - self.start_epoch + 1
        criterion.quantization_weight = self.weight * min(
            1.0, updates / max(self.max_epochs - self.start_epoch, 1))

    def on_train_end(self, net, **kwargs):
        # The training rows are not needed after fit, and would otherwise be
        # pickled with the estimator; the final codebooks live in quantizer_.
        self.X = None
        net.criterion_.codebooks = torch.empty(0, device=net.device)


class AncestorCentroids(Callback):
    """The centroids of the ancestor term, recomputed from the network after each epoch.

    ``X`` holds the training rows that have an ancestor at some depth and
    ``row_ancestors`` their ancestors (one column per depth, -1 for none, as
    in :class:`DQNLoss`; with a leaf term, a last column of leaves). Before training and after each epoch the rows are
    embedded (eval mode) and each ancestor's centroid is the normalised mean
    of the embeddings of its rows; the loss holds the centroids fixed during
    the epoch, as it does the codebooks.
    """

    def __init__(self, X, row_ancestors):
        self.X = X
        self.row_ancestors = row_ancestors

    def update(self, net):
        Z = embed(net, self.X).astype(np.float64)
        centroids = []
        for column in self.row_ancestors.T:
            has = column >= 0
            sums = np.zeros((int(column.max()) + 1 if has.any() else 0, Z.shape[1]))
            np.add.at(sums, column[has], Z[has])
            norms = np.linalg.norm(sums, axis=1, keepdims=True)
            centroids.append(sums / np.maximum(norms, 1e-12))
        net.criterion_.set_ancestor_centroids(centroids, net.device)

    def on_train_begin(self, net, **kwargs):
        self.update(net)

    def on_epoch_end(self, net, **kwargs):
        self.update(net)

    def on_train_end(self, net, **kwargs):
        # Not needed after fit; the training rows would otherwise be pickled.
        self.X = None
        net.criterion_.ancestor_centroids = []


def fit_codebooks(quantizer, Z, previous=None, n_init=1, restart_init="k-means++"):
    """A clone of ``quantizer`` fitted on Z, warm started from ``previous``'s codebooks.

    Without ``previous`` the k-means starts as ``quantizer``'s ``init`` says.
    With ``n_init > 1`` it runs ``n_init`` k-means: the warm start from
    ``previous`` (when given) and ``restart_init`` starts (``"k-means++"``
    or ``"random"`` rows) with seeds drawn from ``quantizer``'s
    ``random_state``, and keeps, subspace by subspace (the
    codebooks are independent k-means problems), the codebook of lowest
    inertia, as scikit-learn's ``KMeans(n_init=...)`` keeps its best run.
    Every run trains on the same rows: those the quantizer's ``random_state``
    draws when Z exceeds its ``max_train_samples`` (all of Z otherwise), so
    that the inertias compare. The returned quantizer is then fitted on
    those rows warm started from the chosen codebooks (its ``init``), which
    reproduces them, and its ``inertia_`` is at most each run's, subspace by
    subspace.

    The quantization loss draws embeddings onto codewords, so a codeword can
    end with no row and the codebook with duplicate codewords, of which the
    quantizer warns. That is expected here (the codeword is just unused) and
    silenced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Number of distinct codewords",
                                category=ConvergenceWarning)
        if previous is not None:
            runs = [clone(quantizer).set_params(init=previous.cluster_centers_).fit(Z)]
        else:
            runs = [clone(quantizer).fit(Z)]
        if n_init <= 1:
            return runs[0]
        # The rows run 0 trained on (the same draw of the same random_state): the
        # restarts' own random_state would otherwise subsample other rows.
        Z = training_rows(Z, quantizer.max_train_samples, 2**quantizer.subspace_bits,
                          check_random_state(quantizer.random_state))
        rng = check_random_state(quantizer.random_state)
        for _ in range(n_init - 1):
            seed = int(rng.randint(np.iinfo(np.int32).max))
            runs.append(clone(quantizer).set_params(init=restart_init, random_state=seed).fit(Z))
        inertia = np.array([run.inertia_ for run in runs])  # (n_runs, n_subspaces)
        best = inertia.argmin(axis=0)
        centers = np.stack([runs[r].cluster_centers_[m] for m, r in enumerate(best)])
        return clone(quantizer).set_params(init=centers).fit(Z)


@contextmanager
def one_thread():
    """Run torch on one thread inside the block, then restore its thread count.

    Torch splits a CPU matrix product over its threads and rounds
    differently with their number: on ESC-50 YAMNet (1600 x 1024 rows) the
    embeddings of a network trained on 1 and on 2 threads differed by up to
    6e-7, enough to move a code now and then. On one thread the model is the
    same on every machine; training takes 10-30% longer on 2 cores. Torch's
    setting is OpenMP's, so the package's own kernels called inside the block
    (the codebooks' k-means refits during training) run on one thread too;
    their results never depend on it.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def embed(net, X):
    """The network's unit-norm embeddings of X, as a float32 numpy array (one thread)."""
    with one_thread():
        return net.forward(np.asarray(X, dtype=np.float32), training=False).numpy()
