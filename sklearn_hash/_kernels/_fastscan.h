/* Fast-scan of 4-bit product-quantization codes: in-register table lookups.
 *
 * Block layout. Codes are stored by blocks of 32; subspaces are padded to a
 * multiple of 4 (M4) with zero codes. Block b takes M4 * 16 bytes; bytes
 * [16 m, 16 m + 16) hold subspace m: byte i carries the codeword index of
 * code 32 b + i in its low nibble and that of code 32 b + 16 + i in its high
 * nibble (rows past the end of the database are zero). One 16-byte table per
 * subspace then serves 16 codes per byte shuffle (vpshufb looks up 16
 * entries per 128-bit lane): AVX2 handles 2 subspaces per instruction,
 * AVX-512BW 4.
 *
 * Tables. Each query's float table is quantized to 8 bits (by the caller),
 * laid out (M4, 16) uint8 like the codes (padding subspaces are zero). The
 * quantized distance of a code is the sum of its M4 entries, accumulated in
 * 16-bit lanes: each shuffle result, read as 16-bit lanes, holds the entries
 * of an even code (low byte) and an odd code (high byte); adding it whole
 * and adding it shifted right by 8 gives (even + 256 odd) and (odd), from
 * which the even sums follow modulo 2**16. Both are exact as long as the
 * true sums stay below 65536, which the caller guarantees (M * max entry <=
 * 65535). Entries are at most 127, so the SIMD paths first add two
 * subspaces' shuffle results in bytes (no overflow), then widen.
 *
 * The scan returns the rows whose quantized distance is below a threshold
 * and whose `allowed` byte is non-zero (when `allowed` is given), in
 * ascending row order. The three versions (AVX-512BW, AVX2, portable C)
 * compute the same integers, so they return the same rows.
 */
#ifndef SKLEARN_HASH_FASTSCAN_H
#define SKLEARN_HASH_FASTSCAN_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define SH_FS_BLOCK 32

#if defined(_MSC_VER)
#include <intrin.h>
static inline int sh_fs_lowest_bit(uint32_t x) { unsigned long i; _BitScanForward(&i, x); return (int)i; }
#else
static inline int sh_fs_lowest_bit(uint32_t x) { return __builtin_ctz(x); }
#endif

/* Block layout of n codes of M 4-bit codeword indices (row-major, one byte
 * each, every value below 16) into ceil(n / 32) blocks of M4 * 16 bytes. */
static void sh_fs_pack(const uint8_t* codes, ptrdiff_t n, ptrdiff_t M, ptrdiff_t M4,
                       uint8_t* blocks)
{
    const ptrdiff_t n_blocks = (n + SH_FS_BLOCK - 1) / SH_FS_BLOCK;
    memset(blocks, 0, (size_t)(n_blocks * M4 * 16));
    for (ptrdiff_t j = 0; j < n; ++j) {
        uint8_t* block = blocks + (j / SH_FS_BLOCK) * M4 * 16;
        const int r = (int)(j % SH_FS_BLOCK);
        const int byte = r & 15, shift = r < 16 ? 0 : 4;
        const uint8_t* code = codes + j * M;
        for (ptrdiff_t m = 0; m < M; ++m)
            block[m * 16 + byte] |= (uint8_t)((code[m] & 15) << shift);
    }
}

/* Mask of the allowed rows among the `rows` (<= 32) of a block. */
static inline uint32_t sh_fs_allowed_scalar(const uint8_t* allowed, int rows)
{
    uint32_t mask = 0;
    for (int r = 0; r < rows; ++r)
        mask |= (uint32_t)(allowed[r] != 0) << r;
    return mask;
}

/* Report the rows of a block set in mask, with their distances. */
static inline ptrdiff_t sh_fs_report(uint32_t mask, const uint16_t* d, ptrdiff_t row0,
                                     int32_t* pos, uint16_t* dist, ptrdiff_t count)
{
    while (mask) {
        const int r = sh_fs_lowest_bit(mask);
        mask &= mask - 1;
        pos[count] = (int32_t)(row0 + r);
        dist[count] = d[r];
        ++count;
    }
    return count;
}

static ptrdiff_t sh_fs_scan_portable(const uint8_t* lut, const uint8_t* blocks, ptrdiff_t n,
                                     ptrdiff_t M4, const uint8_t* allowed, int threshold,
                                     int32_t* pos, uint16_t* dist)
{
    ptrdiff_t count = 0;
    const ptrdiff_t n_blocks = (n + SH_FS_BLOCK - 1) / SH_FS_BLOCK;
    for (ptrdiff_t b = 0; b < n_blocks; ++b) {
        const uint8_t* block = blocks + b * M4 * 16;
        const ptrdiff_t left = n - b * SH_FS_BLOCK;
        const int rows = left < SH_FS_BLOCK ? (int)left : SH_FS_BLOCK;
        uint32_t d[SH_FS_BLOCK];
        for (int r = 0; r < SH_FS_BLOCK; ++r) d[r] = 0;
        for (ptrdiff_t m = 0; m < M4; ++m) {
            const uint8_t* t = lut + m * 16;
            const uint8_t* c = block + m * 16;
            for (int i = 0; i < 16; ++i) {
                d[i] += t[c[i] & 15];
                d[i + 16] += t[c[i] >> 4];
            }
        }
        uint32_t mask = 0;
        for (int r = 0; r < rows; ++r)
            mask |= (uint32_t)(d[r] < (uint32_t)threshold) << r;
        if (mask && allowed != NULL)
            mask &= sh_fs_allowed_scalar(allowed + b * SH_FS_BLOCK, rows);
        if (mask) {
            uint16_t d16[SH_FS_BLOCK];
            for (int r = 0; r < SH_FS_BLOCK; ++r) d16[r] = (uint16_t)d[r];
            count = sh_fs_report(mask, d16, b * SH_FS_BLOCK, pos, dist, count);
        }
    }
    return count;
}

#if defined(__GNUC__) && defined(__x86_64__) && !defined(SKLEARN_HASH_NO_AVX512)
#define SKLEARN_HASH_FS_X86 1
#include <immintrin.h>

/* 16 distances (codes 0-15 of the lanes' half) from the reduced sums:
 * all = even + 256 odd and odd, 8 lanes each. */
__attribute__((target("avx2")))
static inline __m256i sh_fs_interleave(__m128i all, __m128i odd)
{
    const __m128i even = _mm_sub_epi16(all, _mm_slli_epi16(odd, 8));
    return _mm256_set_m128i(_mm_unpackhi_epi16(even, odd), _mm_unpacklo_epi16(even, odd));
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx2")))
static inline __m128i sh_fs_reduce512(__m512i v)
{
    const __m256i h = _mm256_add_epi16(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
    return _mm_add_epi16(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* G groups of 4 subspaces (G = 0: any number, read from M4); fixed G lets
 * the compiler unroll the group loop and keep the tables in registers. */
#define SH_FS_SCAN_AVX512(NAME, G)                                                \
__attribute__((target("avx512f,avx512bw,avx512vl,avx2")))                        \
static ptrdiff_t NAME(const uint8_t* lut, const uint8_t* blocks, ptrdiff_t n,    \
                      ptrdiff_t M4, const uint8_t* allowed, int threshold,       \
                      int32_t* pos, uint16_t* dist)                              \
{                                                                                \
    ptrdiff_t count = 0;                                                         \
    const ptrdiff_t n_blocks = (n + SH_FS_BLOCK - 1) / SH_FS_BLOCK;              \
    const ptrdiff_t n_groups = (G) > 0 ? (G) : M4 / 4;                           \
    const ptrdiff_t stride = (G) > 0 ? 64 * (G) : M4 * 16;                       \
    const __m512i low = _mm512_set1_epi8(0x0f);                                  \
    const __m256i thr = _mm256_set1_epi16((short)(uint16_t)(threshold - 1));     \
    for (ptrdiff_t b = 0; b < n_blocks; ++b) {                                   \
        const uint8_t* block = blocks + b * stride;                              \
        __m512i all_lo = _mm512_setzero_si512(), odd_lo = _mm512_setzero_si512(); \
        __m512i all_hi = _mm512_setzero_si512(), odd_hi = _mm512_setzero_si512(); \
        ptrdiff_t g = 0;                                                         \
        /* Two groups' entries (each <= 127) add in bytes without overflow. */  \
        for (; g + 1 < n_groups; g += 2) {                                       \
            const __m512i c0 = _mm512_loadu_si512((const void*)(block + 64 * g)); \
            const __m512i c1 = _mm512_loadu_si512((const void*)(block + 64 * g + 64)); \
            const __m512i t0 = _mm512_loadu_si512((const void*)(lut + 64 * g));  \
            const __m512i t1 = _mm512_loadu_si512((const void*)(lut + 64 * g + 64)); \
            const __m512i lo = _mm512_add_epi8(                                  \
                _mm512_shuffle_epi8(t0, _mm512_and_si512(c0, low)),              \
                _mm512_shuffle_epi8(t1, _mm512_and_si512(c1, low)));             \
            const __m512i hi = _mm512_add_epi8(                                  \
                _mm512_shuffle_epi8(t0, _mm512_and_si512(_mm512_srli_epi16(c0, 4), low)), \
                _mm512_shuffle_epi8(t1, _mm512_and_si512(_mm512_srli_epi16(c1, 4), low))); \
            all_lo = _mm512_add_epi16(all_lo, lo);                               \
            odd_lo = _mm512_add_epi16(odd_lo, _mm512_srli_epi16(lo, 8));         \
            all_hi = _mm512_add_epi16(all_hi, hi);                               \
            odd_hi = _mm512_add_epi16(odd_hi, _mm512_srli_epi16(hi, 8));         \
        }                                                                        \
        for (; g < n_groups; ++g) {                                              \
            const __m512i c = _mm512_loadu_si512((const void*)(block + 64 * g)); \
            const __m512i t = _mm512_loadu_si512((const void*)(lut + 64 * g));   \
            const __m512i lo = _mm512_shuffle_epi8(t, _mm512_and_si512(c, low)); \
            const __m512i hi = _mm512_shuffle_epi8(                              \
                t, _mm512_and_si512(_mm512_srli_epi16(c, 4), low));              \
            all_lo = _mm512_add_epi16(all_lo, lo);                               \
            odd_lo = _mm512_add_epi16(odd_lo, _mm512_srli_epi16(lo, 8));         \
            all_hi = _mm512_add_epi16(all_hi, hi);                               \
            odd_hi = _mm512_add_epi16(odd_hi, _mm512_srli_epi16(hi, 8));         \
        }                                                                        \
        const __m256i d0 = sh_fs_interleave(sh_fs_reduce512(all_lo), sh_fs_reduce512(odd_lo)); \
        const __m256i d1 = sh_fs_interleave(sh_fs_reduce512(all_hi), sh_fs_reduce512(odd_hi)); \
        const ptrdiff_t left = n - b * SH_FS_BLOCK;                              \
        const int rows = left < SH_FS_BLOCK ? (int)left : SH_FS_BLOCK;           \
        const uint32_t valid = rows == SH_FS_BLOCK ? 0xffffffffu : ((1u << rows) - 1u); \
        uint32_t mask = ((uint32_t)_mm256_cmple_epu16_mask(d0, thr)              \
                         | ((uint32_t)_mm256_cmple_epu16_mask(d1, thr) << 16)) & valid; \
        if (mask && allowed != NULL) {                                           \
            const __m256i a = _mm256_maskz_loadu_epi8(valid, allowed + b * SH_FS_BLOCK); \
            mask &= (uint32_t)_mm256_test_epi8_mask(a, a);                       \
        }                                                                        \
        if (mask) {                                                              \
            uint16_t d[SH_FS_BLOCK];                                             \
            _mm256_storeu_si256((__m256i*)d, d0);                                \
            _mm256_storeu_si256((__m256i*)(d + 16), d1);                         \
            count = sh_fs_report(mask, d, b * SH_FS_BLOCK, pos, dist, count);    \
        }                                                                        \
    }                                                                            \
    return count;                                                                \
}

SH_FS_SCAN_AVX512(sh_fs_scan_avx512_any, 0)
SH_FS_SCAN_AVX512(sh_fs_scan_avx512_g2, 2)
SH_FS_SCAN_AVX512(sh_fs_scan_avx512_g4, 4)
SH_FS_SCAN_AVX512(sh_fs_scan_avx512_g8, 8)
SH_FS_SCAN_AVX512(sh_fs_scan_avx512_g16, 16)

static ptrdiff_t sh_fs_scan_avx512(const uint8_t* lut, const uint8_t* blocks, ptrdiff_t n,
                                   ptrdiff_t M4, const uint8_t* allowed, int threshold,
                                   int32_t* pos, uint16_t* dist)
{
    switch (M4) {
    case 8: return sh_fs_scan_avx512_g2(lut, blocks, n, M4, allowed, threshold, pos, dist);
    case 16: return sh_fs_scan_avx512_g4(lut, blocks, n, M4, allowed, threshold, pos, dist);
    case 32: return sh_fs_scan_avx512_g8(lut, blocks, n, M4, allowed, threshold, pos, dist);
    case 64: return sh_fs_scan_avx512_g16(lut, blocks, n, M4, allowed, threshold, pos, dist);
    default: return sh_fs_scan_avx512_any(lut, blocks, n, M4, allowed, threshold, pos, dist);
    }
}

__attribute__((target("avx2")))
static inline __m128i sh_fs_reduce256(__m256i v)
{
    return _mm_add_epi16(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
}

__attribute__((target("avx2")))
static ptrdiff_t sh_fs_scan_avx2(const uint8_t* lut, const uint8_t* blocks, ptrdiff_t n,
                                 ptrdiff_t M4, const uint8_t* allowed, int threshold,
                                 int32_t* pos, uint16_t* dist)
{
    ptrdiff_t count = 0;
    const ptrdiff_t n_blocks = (n + SH_FS_BLOCK - 1) / SH_FS_BLOCK;
    const ptrdiff_t n_pairs = M4 / 2;
    const __m256i low = _mm256_set1_epi8(0x0f);
    const __m256i zero = _mm256_setzero_si256();
    const __m256i thr = _mm256_set1_epi16((short)(uint16_t)(threshold - 1));
    for (ptrdiff_t b = 0; b < n_blocks; ++b) {
        const uint8_t* block = blocks + b * M4 * 16;
        __m256i all_lo = zero, odd_lo = zero, all_hi = zero, odd_hi = zero;
        for (ptrdiff_t p = 0; p < n_pairs; p += 2) {  /* n_pairs is even */
            const __m256i c0 = _mm256_loadu_si256((const __m256i*)(block + 32 * p));
            const __m256i c1 = _mm256_loadu_si256((const __m256i*)(block + 32 * p + 32));
            const __m256i t0 = _mm256_loadu_si256((const __m256i*)(lut + 32 * p));
            const __m256i t1 = _mm256_loadu_si256((const __m256i*)(lut + 32 * p + 32));
            /* Two pairs' entries (each <= 127) add in bytes without overflow. */
            const __m256i lo = _mm256_add_epi8(
                _mm256_shuffle_epi8(t0, _mm256_and_si256(c0, low)),
                _mm256_shuffle_epi8(t1, _mm256_and_si256(c1, low)));
            const __m256i hi = _mm256_add_epi8(
                _mm256_shuffle_epi8(t0, _mm256_and_si256(_mm256_srli_epi16(c0, 4), low)),
                _mm256_shuffle_epi8(t1, _mm256_and_si256(_mm256_srli_epi16(c1, 4), low)));
            all_lo = _mm256_add_epi16(all_lo, lo);
            odd_lo = _mm256_add_epi16(odd_lo, _mm256_srli_epi16(lo, 8));
            all_hi = _mm256_add_epi16(all_hi, hi);
            odd_hi = _mm256_add_epi16(odd_hi, _mm256_srli_epi16(hi, 8));
        }
        const __m256i d0 = sh_fs_interleave(sh_fs_reduce256(all_lo), sh_fs_reduce256(odd_lo));
        const __m256i d1 = sh_fs_interleave(sh_fs_reduce256(all_hi), sh_fs_reduce256(odd_hi));
        /* Unsigned d <= thr as min(d, thr) == d; packed to one byte per row. */
        const __m256i le0 = _mm256_cmpeq_epi16(_mm256_min_epu16(d0, thr), d0);
        const __m256i le1 = _mm256_cmpeq_epi16(_mm256_min_epu16(d1, thr), d1);
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi16(le0, le1), 0xd8);
        const ptrdiff_t left = n - b * SH_FS_BLOCK;
        const int rows = left < SH_FS_BLOCK ? (int)left : SH_FS_BLOCK;
        uint32_t mask = (uint32_t)_mm256_movemask_epi8(packed);
        if (rows < SH_FS_BLOCK)
            mask &= (1u << rows) - 1u;
        if (mask && allowed != NULL) {
            if (rows == SH_FS_BLOCK) {
                const __m256i a = _mm256_loadu_si256((const __m256i*)(allowed + b * SH_FS_BLOCK));
                mask &= ~(uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(a, zero));
            } else {
                mask &= sh_fs_allowed_scalar(allowed + b * SH_FS_BLOCK, rows);
            }
        }
        if (mask) {
            uint16_t d[SH_FS_BLOCK];
            _mm256_storeu_si256((__m256i*)d, d0);
            _mm256_storeu_si256((__m256i*)(d + 16), d1);
            count = sh_fs_report(mask, d, b * SH_FS_BLOCK, pos, dist, count);
        }
    }
    return count;
}

/* The widest version this processor runs: 2 AVX-512BW, 1 AVX2, 0 C. */
static int sh_fs_cpu_level(void)
{
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
            && __builtin_cpu_supports("avx512vl"))
        return 2;
    if (__builtin_cpu_supports("avx2"))
        return 1;
    return 0;
}
#else
#define SKLEARN_HASH_FS_X86 0
static int sh_fs_cpu_level(void) { return 0; }
#endif

static int sh_fs_level = -1;

/* The version sh_fs_scan runs: the widest the processor has, at most
 * max_level (2 AVX-512BW, 1 AVX2, 0 portable C). */
static inline int sh_fs_detect_simd(int max_level)
{
    if (sh_fs_level < 0)
        sh_fs_level = sh_fs_cpu_level();
    return sh_fs_level < max_level ? sh_fs_level : max_level;
}

/* Rows among the n codes of `blocks` whose quantized distance is below
 * threshold (0 <= threshold <= 65536) and that are allowed (allowed[r] != 0;
 * NULL: every row), in ascending order; returns their count. */
static inline ptrdiff_t sh_fs_scan(int simd, const uint8_t* lut, const uint8_t* blocks,
                                   ptrdiff_t n, ptrdiff_t M4, const uint8_t* allowed,
                                   int threshold, int32_t* pos, uint16_t* dist)
{
    if (threshold <= 0 || n <= 0)
        return 0;
#if SKLEARN_HASH_FS_X86
    if (simd >= 2)
        return sh_fs_scan_avx512(lut, blocks, n, M4, allowed, threshold, pos, dist);
    if (simd == 1)
        return sh_fs_scan_avx2(lut, blocks, n, M4, allowed, threshold, pos, dist);
#endif
    return sh_fs_scan_portable(lut, blocks, n, M4, allowed, threshold, pos, dist);
}

/* The float32 ADC distance of one code: table[m, code[m]] added in order of m. */
static inline float sh_fs_adc(const float* table, const uint8_t* code, ptrdiff_t M)
{
    float d = table[code[0]];
    for (ptrdiff_t m = 1; m < M; ++m)
        d += table[m * 16 + code[m]];
    return d;
}

/* ---- a max-heap of (distance, index), worst on top; ties by larger index ---- */

static inline int sh_fs_worse(float da, int64_t ia, float db, int64_t ib)
{
    return da > db || (da == db && ia > ib);
}

static void sh_fs_sift_down(float* dist, int64_t* idx, ptrdiff_t size, ptrdiff_t i)
{
    for (;;) {
        ptrdiff_t worst = i, child = 2 * i + 1;
        if (child < size && sh_fs_worse(dist[child], idx[child], dist[worst], idx[worst]))
            worst = child;
        ++child;
        if (child < size && sh_fs_worse(dist[child], idx[child], dist[worst], idx[worst]))
            worst = child;
        if (worst == i)
            return;
        const float d = dist[i]; dist[i] = dist[worst]; dist[worst] = d;
        const int64_t j = idx[i]; idx[i] = idx[worst]; idx[worst] = j;
        i = worst;
    }
}

/* Push (d, j) if the heap (capacity k, `*size` held) has room or it ranks
 * before the worst kept. */
static inline void sh_fs_offer(float* dist, int64_t* idx, ptrdiff_t* size, ptrdiff_t k,
                               float d, int64_t j)
{
    if (*size == k) {
        if (!sh_fs_worse(dist[0], idx[0], d, j))
            return;
        dist[0] = d;
        idx[0] = j;
        sh_fs_sift_down(dist, idx, k, 0);
        return;
    }
    ptrdiff_t i = (*size)++;
    while (i > 0) {
        const ptrdiff_t parent = (i - 1) / 2;
        if (!sh_fs_worse(d, j, dist[parent], idx[parent]))
            break;
        dist[i] = dist[parent];
        idx[i] = idx[parent];
        i = parent;
    }
    dist[i] = d;
    idx[i] = j;
}

/* Sort a max-heap in place into ascending (distance, index) order. */
static void sh_fs_heap_sort(float* dist, int64_t* idx, ptrdiff_t size)
{
    for (ptrdiff_t end = size - 1; end > 0; --end) {
        const float d = dist[0]; dist[0] = dist[end]; dist[end] = d;
        const int64_t j = idx[0]; idx[0] = idx[end]; idx[end] = j;
        sh_fs_sift_down(dist, idx, end, 0);
    }
}

#endif /* SKLEARN_HASH_FASTSCAN_H */
