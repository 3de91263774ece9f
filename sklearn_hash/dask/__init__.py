"""Sharded search on a Dask cluster: the index split across workers, one answer.

:class:`DaskQuantizedNeighbors` fits the quantizer of a
:class:`~sklearn_hash.QuantizedNeighbors` or
:class:`~sklearn_hash.IVFQuantizedNeighbors` once, encodes each row chunk of
a dask array on a worker and keeps it there as a shard; searches go to every
shard and are merged exactly, so the answers are those of one process
holding all the codes.

Needs the ``dask`` extra: ``pip install "sklearn-hash[dask]"``.
"""

try:
    import dask.array  # noqa: F401
    import distributed  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised without dask only
    raise ImportError(
        "sklearn_hash.dask needs dask and dask.distributed, which are not installed "
        f"({exc}). Install the extra: pip install \"sklearn-hash[dask]\"."
    ) from exc

from ._sharded import DaskQuantizedNeighbors

__all__ = ["DaskQuantizedNeighbors"]
