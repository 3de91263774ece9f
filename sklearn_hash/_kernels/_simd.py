"""The ``simd`` argument of the kernels: which vector path may run."""


def max_simd_level(simd):
    """Highest vector path allowed by ``simd``: 2 AVX-512, 1 AVX2, 0 portable C.

    ``True`` allows the widest the processor has; a name caps the path at
    that one; ``False`` means ``"portable"``. The kernel runs the lower of
    this and what the processor supports.
    """
    if simd is True or simd == "avx512":
        return 2
    if simd == "avx2":
        return 1
    if simd is False or simd == "portable":
        return 0
    raise ValueError(f"simd must be True, False, 'avx512', 'avx2' or 'portable'; got {simd!r}.")
