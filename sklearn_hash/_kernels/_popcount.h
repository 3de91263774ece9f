/* Hamming distances from one query to a block of codes, with a cut-off.
 *
 * The block holds `n` codes of `n_words` 64-bit words, interleaved by
 * groups of 8 rows: word w of row 8 * g + r is at block[(g * n_words + w) * 8 + r]
 * (rows past n are padding). For each row whose distance to `query` is below
 * `threshold`, the row's offset and distance are written to `pos` and `dist`,
 * in ascending row order; the count is returned.
 *
 * Two versions give identical answers: AVX-512 VPOPCNTDQ (8 codes per
 * instruction), chosen at run time when the processor has it, and portable C.
 */
#ifndef SKLEARN_HASH_POPCOUNT_H
#define SKLEARN_HASH_POPCOUNT_H

#include <stddef.h>
#include <stdint.h>

#if defined(_MSC_VER)
#include <intrin.h>
static inline int sh_popcount64(uint64_t x) { return (int)__popcnt64(x); }
static inline int sh_lowest_bit(unsigned int x) { unsigned long i; _BitScanForward(&i, x); return (int)i; }
#else
static inline int sh_popcount64(uint64_t x) { return __builtin_popcountll(x); }
static inline int sh_lowest_bit(unsigned int x) { return __builtin_ctz(x); }
#endif

static ptrdiff_t sh_block_candidates_scalar(
    const uint64_t* query, const uint64_t* block, ptrdiff_t n, ptrdiff_t n_words,
    int threshold, int32_t* pos, int32_t* dist)
{
    ptrdiff_t count = 0;
    for (ptrdiff_t g = 0; g * 8 < n; ++g) {
        const uint64_t* group = block + g * n_words * 8;
        const ptrdiff_t rows = (n - g * 8) < 8 ? (n - g * 8) : 8;
        for (ptrdiff_t r = 0; r < rows; ++r) {
            int d = 0;
            for (ptrdiff_t w = 0; w < n_words; ++w)
                d += sh_popcount64(query[w] ^ group[w * 8 + r]);
            if (d < threshold) {
                pos[count] = (int32_t)(g * 8 + r);
                dist[count] = d;
                ++count;
            }
        }
    }
    return count;
}

/* The portable version for 1, 2 or 4 words (64, 128, 256 bits): the word
 * loop unrolled, and the 8 distances of a group computed before one mask of
 * those under the threshold (0.68 -> 0.45 ns per 64-bit code, measured). */
#define SH_BLOCK_CANDIDATES_FIXED(NAME, NW)                                       \
static ptrdiff_t NAME(const uint64_t* query, const uint64_t* block, ptrdiff_t n,  \
                      int threshold, int32_t* pos, int32_t* dist)                \
{                                                                                \
    ptrdiff_t count = 0;                                                         \
    uint64_t q[NW];                                                              \
    for (int w = 0; w < (NW); ++w) q[w] = query[w];                              \
    for (ptrdiff_t g = 0; g * 8 < n; ++g) {                                      \
        const uint64_t* group = block + g * (NW) * 8;                            \
        int d[8];                                                                \
        for (int r = 0; r < 8; ++r) {                                            \
            int s = 0;                                                           \
            for (int w = 0; w < (NW); ++w)                                       \
                s += sh_popcount64(q[w] ^ group[w * 8 + r]);                     \
            d[r] = s;                                                            \
        }                                                                        \
        unsigned int mask = 0;                                                   \
        for (int r = 0; r < 8; ++r)                                              \
            mask |= (unsigned int)(d[r] < threshold) << r;                       \
        if (n - g * 8 < 8)                                                       \
            mask &= (1u << (n - g * 8)) - 1u; /* rows past n are padding */      \
        while (mask) {                                                           \
            const int r = sh_lowest_bit(mask);                                   \
            mask &= mask - 1;                                                    \
            pos[count] = (int32_t)(g * 8 + r);                                   \
            dist[count] = d[r];                                                  \
            ++count;                                                             \
        }                                                                        \
    }                                                                            \
    return count;                                                                \
}

SH_BLOCK_CANDIDATES_FIXED(sh_block_candidates_scalar_1, 1)
SH_BLOCK_CANDIDATES_FIXED(sh_block_candidates_scalar_2, 2)
SH_BLOCK_CANDIDATES_FIXED(sh_block_candidates_scalar_4, 4)

#if defined(__GNUC__) && defined(__x86_64__) && !defined(SKLEARN_HASH_NO_AVX512)
#define SKLEARN_HASH_HAVE_AVX512 1
#include <immintrin.h>

__attribute__((target("avx512f,avx512vpopcntdq")))
static ptrdiff_t sh_block_candidates_avx512(
    const uint64_t* query, const uint64_t* block, ptrdiff_t n, ptrdiff_t n_words,
    int threshold, int32_t* pos, int32_t* dist)
{
    ptrdiff_t count = 0;
    const ptrdiff_t n_groups = (n + 7) / 8;
    const __m512i thr = _mm512_set1_epi64(threshold);
    for (ptrdiff_t g = 0; g < n_groups; ++g) {
        const uint64_t* group = block + g * n_words * 8;
        __m512i acc = _mm512_setzero_si512();
        for (ptrdiff_t w = 0; w < n_words; ++w) {
            __m512i x = _mm512_xor_si512(
                _mm512_loadu_si512((const void*)(group + w * 8)),
                _mm512_set1_epi64((long long)query[w]));
            acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(x));
        }
        unsigned int mask = (unsigned int)_mm512_cmplt_epu64_mask(acc, thr);
        if (mask) {
            uint64_t lanes[8];
            _mm512_storeu_si512((void*)lanes, acc);
            while (mask) {
                int r = __builtin_ctz(mask);
                mask &= mask - 1;
                ptrdiff_t j = g * 8 + r;
                if (j < n) {
                    pos[count] = (int32_t)j;
                    dist[count] = (int32_t)lanes[r];
                    ++count;
                }
            }
        }
    }
    return count;
}

static int sh_have_avx512_popcount(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
}
#else
#define SKLEARN_HASH_HAVE_AVX512 0
static int sh_have_avx512_popcount(void) { return 0; }
#endif

/* Which version sh_block_candidates runs: 1 for AVX-512, 0 for portable C. */
static int sh_simd_level = -1;

static inline int sh_detect_simd(int allow_simd)
{
    if (sh_simd_level < 0)
        sh_simd_level = sh_have_avx512_popcount();
    return allow_simd ? sh_simd_level : 0;
}

static inline ptrdiff_t sh_block_candidates(
    int simd, const uint64_t* query, const uint64_t* block, ptrdiff_t n,
    ptrdiff_t n_words, int threshold, int32_t* pos, int32_t* dist)
{
#if SKLEARN_HASH_HAVE_AVX512
    if (simd)
        return sh_block_candidates_avx512(query, block, n, n_words, threshold, pos, dist);
#endif
    switch (n_words) {
    case 1: return sh_block_candidates_scalar_1(query, block, n, threshold, pos, dist);
    case 2: return sh_block_candidates_scalar_2(query, block, n, threshold, pos, dist);
    case 4: return sh_block_candidates_scalar_4(query, block, n, threshold, pos, dist);
    default: return sh_block_candidates_scalar(query, block, n, n_words, threshold, pos, dist);
    }
}

#endif /* SKLEARN_HASH_POPCOUNT_H */
