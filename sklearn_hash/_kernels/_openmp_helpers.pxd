# OpenMP through one small shim: when the extension is compiled without
# OpenMP the functions fall back to their single-threaded meaning, so every
# kernel builds and runs (on one thread) with or without OpenMP.

cdef extern from *:
    """
    #ifdef _OPENMP
        #include <omp.h>
        #define SKLEARN_HASH_OPENMP_ENABLED 1
    #else
        #define SKLEARN_HASH_OPENMP_ENABLED 0
        #define omp_get_max_threads() 1
        #define omp_get_thread_num() 0
    #endif
    """
    bint SKLEARN_HASH_OPENMP_ENABLED
    int omp_get_max_threads() noexcept nogil
    int omp_get_thread_num() noexcept nogil
