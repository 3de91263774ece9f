"""Lloyd's k-means on the package's nearest-codeword kernel, shared by PQ, IVF and AGH.

Its result does not depend on the number of threads: every row is assigned
on its own by the kernel, and the centers are means accumulated in row
order.
"""

import numpy as np

from ._kernels._nearest import accumulate, nearest_codewords


def training_rows(X, max_train_samples, n_clusters, rng):
    """The rows k-means trains on: all, or a random subsample in row order.

    ``max_train_samples=None`` means ``256 * n_clusters`` (faiss's default);
    never fewer than ``n_clusters`` rows.
    """
    max_train = 256 * n_clusters if max_train_samples is None else max_train_samples
    max_train = max(max_train, n_clusters)
    if X.shape[0] <= max_train:
        return X
    return X[np.sort(rng.choice(X.shape[0], max_train, replace=False))]


def kmeans(X, init, n_iter, n_threads, verbose=0, label="k-means"):
    """Lloyd's k-means in X's precision.

    Each iteration assigns every row to its nearest center (a fused kernel,
    no distance matrix) and moves each center to the mean of its rows; a
    center left without rows takes the row farthest from its own center, as
    scikit-learn's KMeans does. Stops after ``n_iter`` iterations or when no
    assignment changes, then assigns once more for the inertia.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features), float32 or float64, C-contiguous
    init : ndarray of shape (n_clusters, n_features)
        Starting centers.
    n_iter : int
    n_threads : int
        OpenMP threads of the assignment step; the result does not depend on it.
    verbose : int, default=0
        When positive, print the inertia of each iteration (before the
        centers move), as scikit-learn's ``KMeans(verbose=1)`` does.
    label : str, default="k-means"
        What the printed lines start with.

    Returns
    -------
    centers : ndarray of shape (n_clusters, n_features), dtype of X
    inertia : float
        Sum of squared distances of the rows to their nearest center.
    """
    centers = np.array(init, dtype=X.dtype, order="C")
    n_clusters = centers.shape[0]
    sq_norms = np.einsum("ij,ij->i", X, X)  # the rows' norms, once for every assignment
    previous = None
    for it in range(n_iter):
        labels, sq_distances = nearest_codewords(X, centers, n_threads=n_threads,
                                                 sq_norms=sq_norms)
        if verbose:
            print(f"{label}: iteration {it}, inertia {sq_distances.sum(dtype=np.float64):.6g}.")
        if previous is not None and np.array_equal(labels, previous):
            if verbose:
                print(f"{label}: converged at iteration {it}: no assignment changed.")
            break  # the centers are the means of these labels: sq_distances are final
        sums, counts = accumulate(X, labels, n_clusters)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            # The farthest rows (ties: the first) become the empty centers.
            far = np.argsort(-sq_distances, kind="stable")[: empty.size]
            for cluster, row in zip(empty, far):
                sums[labels[row]] -= X[row]
                counts[labels[row]] -= 1
                sums[cluster] = X[row]
                counts[cluster] = 1
        keep = counts > 0  # a center whose rows all moved away stays put
        centers[keep] = sums[keep] / counts[keep, None]
        previous = labels
    else:  # the centers moved after the last assignment
        _, sq_distances = nearest_codewords(X, centers, n_threads=n_threads, sq_norms=sq_norms)
    return centers, float(sq_distances.sum(dtype=np.float64))
