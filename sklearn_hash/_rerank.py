"""Re-ranking steps: the rows an index keeps to re-order its candidates (``refine_factor``).

A searcher with ``refine_factor`` takes ``refine_factor * n_neighbors``
candidates from its codes and re-orders them by the L2 distance to rows it
keeps beside the codes, one per item, in a :class:`~._storage.ChunkedRows`
(memory-mapped after ``save``/``load``). What a row holds is the step's
business, chosen by the searcher's ``refine_storage``:

- :class:`FloatRows` (``"float32"``): the vector itself, 4 bytes per
  feature; the distances returned are exact.
- :class:`SQ8Rows` (``"sq8"``): 8 bits per feature, a uniform scalar
  quantizer per feature whose range is learned at ``fit`` (the 0.01% and
  99.99% quantiles of the training rows, beyond which values are clipped,
  rows added later included), a quarter of the memory. Where the index has cells (an IVF with a flat
  coarse quantizer) the row quantizes the residual to the item's cell
  centroid, whose int32 id follows the bytes (the residual's range is far
  narrower than the vector's, so its steps are finer); the distances
  returned are those to the decoded rows.

Each step encodes rows (``encode``), decodes them (``decode``, for the
items querying with their own vectors) and re-ranks candidates by one
kernel call (``rerank``) from the chunks' addresses.
"""

import numpy as np

from ._kernels._refine import (
    refine_distances,
    refine_kneighbors,
    refine_sq8_distances,
    refine_sq8_kneighbors,
)

# The quantiles bounding each feature's 8-bit range: clipping the rarest
# 0.01% at either end makes the steps of every other value finer (recall@10
# 0.938 -> 0.942 at n_probe 9, refine_factor 4 on bench_frontier's data;
# 0.001 gave the same, the extremes 0.938).
SQ8_QUANTILE = 1e-4
# Rows used to learn the ranges, at most (evenly spaced).
SQ8_MAX_TRAIN = 262_144


class FloatRows:
    """The vectors as float32: exact re-ranking."""

    def __init__(self, n_features):
        self.n_features = n_features

    @property
    def layout(self):
        """Row shape and dtype of the stored rows."""
        return (self.n_features,), np.dtype(np.float32)

    def encode(self, X, cells=None):
        return np.asarray(X, dtype=np.float32)

    def decode(self, rows):
        return np.asarray(rows, dtype=np.float64)

    def rerank(self, queries, candidates, rows, k, n_threads):
        # The address table and the candidates come from the index itself: not checked
        # again on every call (a one-query search would spend most of its time there).
        starts, pointers = rows.addresses()
        return refine_kneighbors(queries, candidates, starts, pointers, k, n_threads=n_threads,
                                 check_inputs=False)

    def distances(self, queries, offsets, candidates, rows, n_threads, squared=False):
        """Every candidate's distance (query q's: ``candidates[offsets[q]:offsets[q + 1]]``).

        ``squared``: the squared distances, which ``rerank`` ranks by.
        """
        starts, pointers = rows.addresses()
        return refine_distances(queries, offsets, candidates, starts, pointers,
                                n_threads=n_threads, check_inputs=False, squared=squared)


class SQ8Rows:
    """8 bits per feature, of the vector or of its residual to its cell's centroid.

    Parameters
    ----------
    offset, scale : ndarray of shape (n_features,)
        Feature j of a row decodes as ``scale[j] * byte + offset[j]``.
    centroids : ndarray of shape (n_cells, n_features), default=None
        The cells' centroids when rows quantize residuals (and carry their
        cell), ``None`` when they quantize the vectors.
    """

    def __init__(self, offset, scale, centroids=None):
        self.offset = np.ascontiguousarray(offset, dtype=np.float64)
        self.scale = np.ascontiguousarray(scale, dtype=np.float64)
        self.with_cells = centroids is not None
        self.centroids = (np.zeros((1, self.offset.shape[0])) if centroids is None
                          else np.ascontiguousarray(centroids, dtype=np.float64))

    @staticmethod
    def fit(R):
        """``(offset, scale)`` spanning each feature's central 99.98% of the rows R.

        A feature constant in R (no range to learn) gets the median step of
        the others, centred so that the constant decodes exactly (byte 128):
        rows added later that vary there are still coded, at a typical step.
        """
        R = np.asarray(R)
        if R.shape[0] > SQ8_MAX_TRAIN:
            R = R[:: -(-R.shape[0] // SQ8_MAX_TRAIN)]
        low, high = np.quantile(R, [SQ8_QUANTILE, 1 - SQ8_QUANTILE], axis=0)
        low, scale = low.astype(np.float64), ((high - low) / 255).astype(np.float64)
        flat = scale == 0
        if flat.any():
            step = np.median(scale[~flat]) if (~flat).any() else 1.0
            scale[flat] = step
            low[flat] -= 128 * step
        return low, scale

    @property
    def layout(self):
        return (self.offset.shape[0] + 4 * self.with_cells,), np.dtype(np.uint8)

    def encode(self, X, cells=None):
        """Rows of X as bytes; cells (each row's cell) are read iff rows carry one."""
        R = np.asarray(X, dtype=np.float64)
        if self.with_cells:
            if cells is None:
                raise ValueError("these rows quantize residuals: the rows' cells are needed.")
            R = R - self.centroids[cells]
        # (fit gives no feature a zero step; one set by hand keeps byte 0)
        steps = np.divide(R - self.offset, self.scale, out=np.zeros_like(R),
                          where=self.scale > 0)
        codes = np.clip(np.rint(steps), 0, 255).astype(np.uint8)
        if not self.with_cells:
            return codes
        ids = np.asarray(cells, dtype=np.int32)[:, None].view(np.uint8)
        return np.hstack([codes, ids])

    def decode(self, rows):
        """The vectors the rows stand for, float64 (what re-ranking measures to)."""
        rows = np.asarray(rows)
        n_features = self.offset.shape[0]
        out = self.scale * rows[:, :n_features] + self.offset
        if self.with_cells:
            cells = np.ascontiguousarray(rows[:, n_features:]).view(np.int32).ravel()
            if cells.size and (cells.min() < 0 or cells.max() >= len(self.centroids)):
                raise ValueError(f"a stored row names a cell outside [0, "
                                 f"{len(self.centroids)}): the rows are not those of this "
                                 f"index.")
            out += self.centroids[cells]
        return out

    def rerank(self, queries, candidates, rows, k, n_threads):
        starts, pointers = rows.addresses()
        return refine_sq8_kneighbors(queries, candidates, starts, pointers, self.scale,
                                     self.offset, self.centroids, self.with_cells, k,
                                     n_threads=n_threads, check_inputs=False)

    def distances(self, queries, offsets, candidates, rows, n_threads, squared=False):
        starts, pointers = rows.addresses()
        return refine_sq8_distances(queries, offsets, candidates, starts, pointers, self.scale,
                                    self.offset, self.centroids, self.with_cells,
                                    n_threads=n_threads, check_inputs=False, squared=squared)
