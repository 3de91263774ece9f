"""Thread policy of the searches: OpenMP threads for the kernels, BLAS on one thread.

``effective_n_threads(n_jobs)`` turns a scikit-learn style ``n_jobs`` into
the number of OpenMP threads a kernel runs (cgroup-aware, see its
docstring). Inside ``search_threads(n)``, held by a searcher while it
encodes its queries, ``quantizer_threads()`` is ``n``: the quantizer's
kernels (PQ codes and tables) run on the searcher's ``n_jobs``, not on every
core; elsewhere it is ``effective_n_threads()``. ``single_threaded_blas`` is
held while a search runs: searching
mixes small matrix products (distance tables, coarse distances) with the
kernels' own OpenMP threads, and OpenBLAS worker threads that keep spinning
after each product compete with the kernel on few cores (300 queries to
IVFQuantizedNeighbors took 8 ms instead of 2 ms on 2 cores).
"""

import sys
import threading
from contextlib import contextmanager

from threadpoolctl import ThreadpoolController

from ._kernels._openmp import effective_n_threads

__all__ = ["effective_n_threads", "quantizer_threads", "search_threads", "single_threaded_blas"]

_search = threading.local()  # per thread: the threads of the search it runs, if any


@contextmanager
def search_threads(n_threads):
    """Within the block, ``quantizer_threads()`` of this thread is ``n_threads``."""
    previous = getattr(_search, "n_threads", None)
    _search.n_threads = n_threads
    try:
        yield
    finally:
        _search.n_threads = previous


def quantizer_threads():
    """OpenMP threads of a quantizer's kernels: the enclosing search's, else every core's."""
    n_threads = getattr(_search, "n_threads", None)
    return effective_n_threads() if n_threads is None else n_threads


class _SingleThreadedBlas:
    """Context manager: BLAS on one thread while a search runs.

    The thread that sets the limit is the one that restores it (searches
    nest, and run concurrently from several threads: the others then search
    without the limit).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._local = threading.local()
        self._owner = None
        self._limit = None
        self._controller = None
        self._n_modules = 0

    def __enter__(self):
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        if depth == 0:
            with self._lock:
                if self._owner is None:
                    # A module imported since may have loaded another BLAS.
                    if self._controller is None or self._n_modules != len(sys.modules):
                        self._controller = ThreadpoolController()
                        self._n_modules = len(sys.modules)
                    self._limit = self._controller.limit(limits=1, user_api="blas")
                    self._owner = threading.get_ident()
        return self

    def __exit__(self, *exc_info):
        self._local.depth -= 1
        if self._local.depth == 0:
            with self._lock:
                if self._owner == threading.get_ident():
                    self._limit.restore_original_limits()
                    self._limit = None
                    self._owner = None


single_threaded_blas = _SingleThreadedBlas()
