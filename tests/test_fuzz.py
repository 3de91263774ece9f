"""Property-based tests of the Hamming and ADC kernels against numpy oracles.

Random sizes (0 and 1 queries, empty databases, k from 0 to every item),
code lengths that are not multiples of 8 or 64, heavy ties (few distinct
codes, small integer tables), self-exclusion, thread counts and both Hamming
paths. The default run (CI) draws a few hundred cases per kernel from a fixed
seed; ``pytest -m slow tests/test_fuzz.py`` draws 10,000 per kernel at random.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn_hash._kernels._adc import adc_kneighbors
from sklearn_hash._kernels._hamming import hamming_kneighbors

from sklearn_hash._codes import pack_bits

CI = settings(max_examples=300, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=10_000, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def rank(dist, k):
    """The k smallest of each row, ties by ascending index (a stable sort)."""
    order = np.argsort(dist, axis=1, kind="stable")[:, :k].astype(np.int64)
    return np.take_along_axis(dist, order, axis=1), order


@st.composite
def hamming_cases(draw):
    n_bits = draw(st.integers(1, 300))
    n_db = draw(st.integers(0, 200))
    exclude_self = draw(st.booleans()) and n_db > 0
    n_q = n_db if exclude_self else draw(st.integers(0, 6))
    n_distinct = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 2, (n_distinct, n_bits), dtype=np.uint8)
    db_bits = pool[rng.integers(0, n_distinct, n_db)]
    q_bits = db_bits if exclude_self else pool[rng.integers(0, n_distinct, n_q)]
    n_candidates = n_db - 1 if exclude_self else n_db
    k = draw(st.integers(0, max(n_candidates, 0)))
    simd = draw(st.sampled_from([True, "avx2", False]))  # each popcount path
    return q_bits, db_bits, k, exclude_self, draw(st.integers(1, 4)), simd


def check_hamming(case):
    q_bits, db_bits, k, exclude_self, n_threads, simd = case
    dist, ind = hamming_kneighbors(pack_bits(q_bits), pack_bits(db_bits), k,
                                   exclude_self=exclude_self, n_threads=n_threads, simd=simd)
    full = (q_bits[:, None, :] != db_bits[None, :, :]).sum(axis=2).astype(np.int64)
    if exclude_self:
        np.fill_diagonal(full, np.iinfo(np.int64).max)
    d_ref, i_ref = rank(full, k)
    assert dist.shape == ind.shape == (len(q_bits), k)
    np.testing.assert_array_equal(ind, i_ref)
    np.testing.assert_array_equal(dist, d_ref)


@st.composite
def adc_cases(draw):
    M = draw(st.one_of(st.integers(1, 20), st.sampled_from([24, 32, 64])))
    K = draw(st.sampled_from([2, 3, 16, 256, 257, 1024]))
    n_db = draw(st.integers(0, 200))
    n_q = draw(st.integers(0, 6))
    integer_tables = draw(st.booleans())  # small integers: exact sums, many ties
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    dtype = np.uint8 if K <= 256 else np.uint16
    n_distinct = draw(st.integers(1, 40))
    pool = rng.integers(0, K, (n_distinct, M)).astype(dtype)
    codes = pool[rng.integers(0, n_distinct, n_db)]
    if integer_tables:
        tables = rng.integers(0, 4, (n_q, M, K)).astype(np.float32)
    else:
        tables = rng.random((n_q, M, K), dtype=np.float32)
    self_offset = draw(st.integers(-1, max(n_db - n_q, -1))) if n_q <= n_db else -1
    n_candidates = n_db - (1 if self_offset >= 0 else 0)
    k = draw(st.integers(0, max(n_candidates, 0)))
    return tables, codes, k, self_offset, draw(st.integers(1, 4))


def check_adc(case):
    tables, codes, k, self_offset, n_threads = case
    dist, ind = adc_kneighbors(tables, codes, k, self_offset=self_offset, n_threads=n_threads)
    n_q, M, _ = tables.shape
    # float32 sums in subspace order, as the kernel adds them
    full = np.zeros((n_q, len(codes)), dtype=np.float32)
    for m in range(M):
        full += tables[:, m, :][:, codes[:, m].astype(np.intp)]
    if self_offset >= 0:
        full[np.arange(n_q), self_offset + np.arange(n_q)] = np.inf
    d_ref, i_ref = rank(full, k)
    assert dist.shape == ind.shape == (n_q, k)
    np.testing.assert_array_equal(ind, i_ref)
    np.testing.assert_array_equal(dist, d_ref)


@CI
@given(hamming_cases())
def test_hamming_kernel_fuzz(case):
    check_hamming(case)


@CI
@given(adc_cases())
def test_adc_kernel_fuzz(case):
    check_adc(case)


@pytest.mark.slow
@SLOW
@given(hamming_cases())
def test_hamming_kernel_fuzz_10k(case):
    check_hamming(case)


@pytest.mark.slow
@SLOW
@given(adc_cases())
def test_adc_kernel_fuzz_10k(case):
    check_adc(case)
