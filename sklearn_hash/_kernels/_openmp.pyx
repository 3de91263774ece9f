"""Thread-count helpers shared by the search kernels."""

import os

from ._openmp_helpers cimport SKLEARN_HASH_OPENMP_ENABLED, omp_get_max_threads


def openmp_enabled():
    """Whether the kernels were compiled with OpenMP support."""
    return bool(SKLEARN_HASH_OPENMP_ENABLED)


# The most OpenMP threads a kernel is given, whatever n_jobs asks for.
MAX_THREADS = 1024

# joblib.cpu_count() reads the cgroup files on every call (about 0.15 ms):
# the CPUs a process may use are read once.
_cpu_count = None


def _cpus():
    global _cpu_count
    if _cpu_count is None:
        from joblib import cpu_count

        _cpu_count = int(cpu_count())
    return _cpu_count


def effective_n_threads(n_jobs=None):
    """Number of OpenMP threads a kernel uses for ``n_jobs``.

    ``None`` means ``OMP_NUM_THREADS`` when it is set, else the number of
    CPUs this process may use: the cores it is allowed to run on, capped by
    a container's CPU quota (cgroups), as ``joblib.cpu_count()`` counts
    them. A positive integer means that many threads, at most
    ``MAX_THREADS`` (1,024: OpenMP cannot start 100,000 threads, and the
    process crashed trying), and a negative integer counts back from that
    number of CPUs as in joblib (-1 is all of them, -2 all but one). ``0``
    is not allowed. Without OpenMP the answer is always 1.
    """
    if n_jobs == 0:
        raise ValueError("n_jobs == 0 has no meaning; use None, a positive "
                         "number of threads or a negative count from the "
                         "number of cores (-1 for all).")
    if not SKLEARN_HASH_OPENMP_ENABLED:
        return 1
    if n_jobs is None:
        if os.environ.get("OMP_NUM_THREADS", "").strip():
            return max(1, omp_get_max_threads())
        return max(1, min(omp_get_max_threads(), _cpus()))
    if n_jobs < 0:
        return max(1, _cpus() + 1 + n_jobs)
    return min(n_jobs, MAX_THREADS)
