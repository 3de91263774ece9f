"""Thread-count helpers shared by the search kernels."""

import os

from ._openmp_helpers cimport SKLEARN_HASH_OPENMP_ENABLED, omp_get_max_threads


def openmp_enabled():
    """Whether the kernels were compiled with OpenMP support."""
    return bool(SKLEARN_HASH_OPENMP_ENABLED)


def effective_n_threads(n_jobs=None):
    """Number of OpenMP threads a kernel uses for ``n_jobs``.

    ``None`` means the OpenMP default (all cores, or ``OMP_NUM_THREADS``),
    a positive integer that many threads, and a negative integer counts
    back from the number of cores as in joblib (-1 is all cores, -2 all but
    one). ``0`` is not allowed. Without OpenMP the answer is always 1.
    """
    if n_jobs == 0:
        raise ValueError("n_jobs == 0 has no meaning; use None, a positive "
                         "number of threads or a negative count from the "
                         "number of cores (-1 for all).")
    if not SKLEARN_HASH_OPENMP_ENABLED:
        return 1
    max_threads = omp_get_max_threads()
    if n_jobs is None:
        return max_threads
    if n_jobs < 0:
        return max(1, (os.cpu_count() or 1) + 1 + n_jobs)
    return n_jobs
