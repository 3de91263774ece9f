/* Fast-scan of 4-bit product-quantization codes: in-register table lookups.
 *
 * Block layout. Codes are stored by blocks of 128 (four groups of 32);
 * subspaces are padded to an even number Mp with zero codes. Block s takes
 * Mp * 64 bytes: bytes [64 m + 16 g, 64 m + 16 g + 16) hold subspace m of
 * group g, byte i carrying the codeword index of code 128 s + 32 g + i in its
 * low nibble and that of code 128 s + 32 g + 16 + i in its high nibble (rows
 * past the end of the database are zero). One byte shuffle (vpshufb looks
 * up 16 entries per 128-bit lane) with the subspace's 16-byte table in every
 * lane then reads 64 codes (AVX-512BW; 32 with AVX2) of one subspace, and
 * every lane accumulates the whole distance of its own codes: no reduction
 * across lanes is needed (a layout with several subspaces per register must
 * add its lanes together once per block, which cost about a third of the
 * scan here).
 *
 * Tables. Each query's float table is quantized (by the caller) to entries
 * of at most 127, laid out (Mp, 16) uint8 (a padding subspace is zero). The
 * quantized distance of a code is the sum of its entries. Two subspaces'
 * shuffle results are first added in bytes (at most 254: no overflow); read
 * as 16-bit lanes, that sum holds an even code (low byte) and an odd code
 * (high byte); adding it whole and shifted right by 8 gives (even + 256 odd)
 * and (odd), from which the even sums follow modulo 2**16. Both are exact
 * as long as the true sums stay below 65536, which the caller guarantees
 * (M * max entry <= 65535).
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
#include <math.h>

#define SH_FS_BLOCK 128

/* Block layout of n codes of M 4-bit codeword indices (row-major, one byte
 * each, every value below 16) into ceil(n / 128) blocks of Mp * 64 bytes. */
static void sh_fs_pack(const uint8_t* codes, ptrdiff_t n, ptrdiff_t M, ptrdiff_t Mp,
                       uint8_t* blocks)
{
    const ptrdiff_t n_blocks = (n + SH_FS_BLOCK - 1) / SH_FS_BLOCK;
    memset(blocks, 0, (size_t)(n_blocks * Mp * 64));
    for (ptrdiff_t j = 0; j < n; ++j) {
        uint8_t* block = blocks + (j / SH_FS_BLOCK) * Mp * 64;
        const int r = (int)(j % SH_FS_BLOCK);
        const int at = 16 * (r / 32) + (r & 15), shift = (r & 16) ? 4 : 0;
        const uint8_t* code = codes + j * M;
        for (ptrdiff_t m = 0; m < M; ++m)
            block[m * 64 + at] |= (uint8_t)((code[m] & 15) << shift);
    }
}

/* Report the rows of a block (d: its 128 quantized distances in row order)
 * below threshold and allowed, in ascending order. */
static inline ptrdiff_t sh_fs_report(const uint16_t* d, int rows, const uint8_t* allowed,
                                     int threshold, ptrdiff_t row0, int32_t* pos,
                                     uint16_t* dist, ptrdiff_t count)
{
    for (int r = 0; r < rows; ++r) {
        if ((int)d[r] < threshold && (allowed == NULL || allowed[r])) {
            pos[count] = (int32_t)(row0 + r);
            dist[count] = d[r];
            ++count;
        }
    }
    return count;
}

static ptrdiff_t sh_fs_scan_portable(const uint8_t* lut, const uint8_t* blocks, ptrdiff_t n,
                                     ptrdiff_t Mp, const uint8_t* allowed, int threshold,
                                     int32_t* pos, uint16_t* dist)
{
    ptrdiff_t count = 0;
    const ptrdiff_t n_blocks = (n + SH_FS_BLOCK - 1) / SH_FS_BLOCK;
    for (ptrdiff_t b = 0; b < n_blocks; ++b) {
        const uint8_t* block = blocks + b * Mp * 64;
        const ptrdiff_t left = n - b * SH_FS_BLOCK;
        const int rows = left < SH_FS_BLOCK ? (int)left : SH_FS_BLOCK;
        uint16_t d[SH_FS_BLOCK];
        memset(d, 0, sizeof(d));
        for (ptrdiff_t m = 0; m < Mp; ++m) {
            const uint8_t* t = lut + m * 16;
            const uint8_t* c = block + m * 64;
            for (int g = 0; g < 4; ++g)
                for (int i = 0; i < 16; ++i) {
                    d[32 * g + i] += t[c[16 * g + i] & 15];
                    d[32 * g + 16 + i] += t[c[16 * g + i] >> 4];
                }
        }
        count = sh_fs_report(d, rows, allowed ? allowed + b * SH_FS_BLOCK : NULL, threshold,
                             b * SH_FS_BLOCK, pos, dist, count);
    }
    return count;
}

#if defined(__GNUC__) && defined(__x86_64__) && !defined(SKLEARN_HASH_NO_AVX512)
#define SKLEARN_HASH_FS_X86 1
#include <immintrin.h>

/* Row order of the lanes of the even / odd sums: lane l of group g (16-bit
 * lane e = 8 g + p) holds row 32 g + 2 p (even) or 32 g + 2 p + 1 (odd), plus
 * 16 for the high nibbles. */
static inline void sh_fs_scatter(const uint16_t* even_lo, const uint16_t* odd_lo,
                                 const uint16_t* even_hi, const uint16_t* odd_hi,
                                 int lanes, uint16_t* d)
{
    for (int e = 0; e < lanes; ++e) {
        const int base = 32 * (e >> 3) + 2 * (e & 7);
        d[base] = even_lo[e];
        d[base + 1] = odd_lo[e];
        d[base + 16] = even_hi[e];
        d[base + 17] = odd_hi[e];
    }
}

/* One block's sums with the subspace loop over Mp (P > 0: P pairs, fixed). */
#define SH_FS_SCAN_AVX512(NAME, P)                                                \
__attribute__((target("avx512f,avx512bw,avx512vl,avx2")))                        \
static ptrdiff_t NAME(const uint8_t* lut, const uint8_t* blocks, ptrdiff_t n,    \
                      ptrdiff_t Mp, const uint8_t* allowed, int threshold,       \
                      int32_t* pos, uint16_t* dist)                              \
{                                                                                \
    ptrdiff_t count = 0;                                                         \
    const ptrdiff_t n_blocks = (n + SH_FS_BLOCK - 1) / SH_FS_BLOCK;              \
    const ptrdiff_t n_pairs = (P) > 0 ? (P) : Mp / 2;                            \
    const ptrdiff_t stride = 128 * n_pairs;                                      \
    const __m512i low = _mm512_set1_epi8(0x0f);                                  \
    const __m512i thr = _mm512_set1_epi16((short)(uint16_t)(threshold - 1));     \
    for (ptrdiff_t b = 0; b < n_blocks; ++b) {                                   \
        const uint8_t* block = blocks + b * stride;                              \
        __m512i all_lo = _mm512_setzero_si512(), odd_lo = _mm512_setzero_si512(); \
        __m512i all_hi = _mm512_setzero_si512(), odd_hi = _mm512_setzero_si512(); \
        for (ptrdiff_t p = 0; p < n_pairs; ++p) {                                \
            const __m512i c0 = _mm512_loadu_si512((const void*)(block + 128 * p)); \
            const __m512i c1 = _mm512_loadu_si512((const void*)(block + 128 * p + 64)); \
            const __m512i t0 = _mm512_broadcast_i32x4(                           \
                _mm_loadu_si128((const __m128i*)(lut + 32 * p)));                \
            const __m512i t1 = _mm512_broadcast_i32x4(                           \
                _mm_loadu_si128((const __m128i*)(lut + 32 * p + 16)));           \
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
        const __m512i even_lo = _mm512_sub_epi16(all_lo, _mm512_slli_epi16(odd_lo, 8)); \
        const __m512i even_hi = _mm512_sub_epi16(all_hi, _mm512_slli_epi16(odd_hi, 8)); \
        const __mmask32 any = _mm512_cmple_epu16_mask(even_lo, thr)              \
            | _mm512_cmple_epu16_mask(odd_lo, thr)                               \
            | _mm512_cmple_epu16_mask(even_hi, thr)                              \
            | _mm512_cmple_epu16_mask(odd_hi, thr);                              \
        if (any) {                                                               \
            uint16_t el[32], ol[32], eh[32], oh[32], d[SH_FS_BLOCK];             \
            _mm512_storeu_si512((void*)el, even_lo);                             \
            _mm512_storeu_si512((void*)ol, odd_lo);                              \
            _mm512_storeu_si512((void*)eh, even_hi);                             \
            _mm512_storeu_si512((void*)oh, odd_hi);                              \
            sh_fs_scatter(el, ol, eh, oh, 32, d);                                \
            const ptrdiff_t left = n - b * SH_FS_BLOCK;                          \
            const int rows = left < SH_FS_BLOCK ? (int)left : SH_FS_BLOCK;       \
            count = sh_fs_report(d, rows, allowed ? allowed + b * SH_FS_BLOCK : NULL, \
                                 threshold, b * SH_FS_BLOCK, pos, dist, count);  \
        }                                                                        \
    }                                                                            \
    return count;                                                                \
}

SH_FS_SCAN_AVX512(sh_fs_scan_avx512_any, 0)
SH_FS_SCAN_AVX512(sh_fs_scan_avx512_p4, 4)
SH_FS_SCAN_AVX512(sh_fs_scan_avx512_p8, 8)
SH_FS_SCAN_AVX512(sh_fs_scan_avx512_p16, 16)
SH_FS_SCAN_AVX512(sh_fs_scan_avx512_p32, 32)

static ptrdiff_t sh_fs_scan_avx512(const uint8_t* lut, const uint8_t* blocks, ptrdiff_t n,
                                   ptrdiff_t Mp, const uint8_t* allowed, int threshold,
                                   int32_t* pos, uint16_t* dist)
{
    switch (Mp) {
    case 8: return sh_fs_scan_avx512_p4(lut, blocks, n, Mp, allowed, threshold, pos, dist);
    case 16: return sh_fs_scan_avx512_p8(lut, blocks, n, Mp, allowed, threshold, pos, dist);
    case 32: return sh_fs_scan_avx512_p16(lut, blocks, n, Mp, allowed, threshold, pos, dist);
    case 64: return sh_fs_scan_avx512_p32(lut, blocks, n, Mp, allowed, threshold, pos, dist);
    default: return sh_fs_scan_avx512_any(lut, blocks, n, Mp, allowed, threshold, pos, dist);
    }
}

/* Two queries over the same blocks: the codes are loaded and split into
 * nibbles once for both (6 of the 18 operations per pair of subspaces). */
#define SH_FS_SCAN2_AVX512(NAME, P)                                               \
__attribute__((target("avx512f,avx512bw,avx512vl,avx2")))                        \
static void NAME(const uint8_t* lut_a, const uint8_t* lut_b, const uint8_t* blocks, \
                 ptrdiff_t n, ptrdiff_t Mp, const uint8_t* allowed,              \
                 int threshold_a, int threshold_b,                               \
                 int32_t* pos_a, uint16_t* dist_a, ptrdiff_t* count_a,           \
                 int32_t* pos_b, uint16_t* dist_b, ptrdiff_t* count_b)           \
{                                                                                \
    ptrdiff_t na = 0, nb = 0;                                                    \
    const ptrdiff_t n_blocks = (n + SH_FS_BLOCK - 1) / SH_FS_BLOCK;              \
    const ptrdiff_t n_pairs = (P) > 0 ? (P) : Mp / 2;                            \
    const ptrdiff_t stride = 128 * n_pairs;                                      \
    const __m512i low = _mm512_set1_epi8(0x0f);                                  \
    const __m512i thr_a = _mm512_set1_epi16((short)(uint16_t)(threshold_a - 1)); \
    const __m512i thr_b = _mm512_set1_epi16((short)(uint16_t)(threshold_b - 1)); \
    for (ptrdiff_t b = 0; b < n_blocks; ++b) {                                   \
        const uint8_t* block = blocks + b * stride;                              \
        __m512i al_a = _mm512_setzero_si512(), ol_a = _mm512_setzero_si512();    \
        __m512i ah_a = _mm512_setzero_si512(), oh_a = _mm512_setzero_si512();    \
        __m512i al_b = _mm512_setzero_si512(), ol_b = _mm512_setzero_si512();    \
        __m512i ah_b = _mm512_setzero_si512(), oh_b = _mm512_setzero_si512();    \
        for (ptrdiff_t p = 0; p < n_pairs; ++p) {                                \
            const __m512i c0 = _mm512_loadu_si512((const void*)(block + 128 * p)); \
            const __m512i c1 = _mm512_loadu_si512((const void*)(block + 128 * p + 64)); \
            const __m512i c0l = _mm512_and_si512(c0, low);                       \
            const __m512i c1l = _mm512_and_si512(c1, low);                       \
            const __m512i c0h = _mm512_and_si512(_mm512_srli_epi16(c0, 4), low); \
            const __m512i c1h = _mm512_and_si512(_mm512_srli_epi16(c1, 4), low); \
            {                                                                    \
                const __m512i t0 = _mm512_broadcast_i32x4(                       \
                    _mm_loadu_si128((const __m128i*)(lut_a + 32 * p)));          \
                const __m512i t1 = _mm512_broadcast_i32x4(                       \
                    _mm_loadu_si128((const __m128i*)(lut_a + 32 * p + 16)));     \
                const __m512i lo = _mm512_add_epi8(_mm512_shuffle_epi8(t0, c0l), \
                                                   _mm512_shuffle_epi8(t1, c1l)); \
                const __m512i hi = _mm512_add_epi8(_mm512_shuffle_epi8(t0, c0h), \
                                                   _mm512_shuffle_epi8(t1, c1h)); \
                al_a = _mm512_add_epi16(al_a, lo);                               \
                ol_a = _mm512_add_epi16(ol_a, _mm512_srli_epi16(lo, 8));         \
                ah_a = _mm512_add_epi16(ah_a, hi);                               \
                oh_a = _mm512_add_epi16(oh_a, _mm512_srli_epi16(hi, 8));         \
            }                                                                    \
            {                                                                    \
                const __m512i t0 = _mm512_broadcast_i32x4(                       \
                    _mm_loadu_si128((const __m128i*)(lut_b + 32 * p)));          \
                const __m512i t1 = _mm512_broadcast_i32x4(                       \
                    _mm_loadu_si128((const __m128i*)(lut_b + 32 * p + 16)));     \
                const __m512i lo = _mm512_add_epi8(_mm512_shuffle_epi8(t0, c0l), \
                                                   _mm512_shuffle_epi8(t1, c1l)); \
                const __m512i hi = _mm512_add_epi8(_mm512_shuffle_epi8(t0, c0h), \
                                                   _mm512_shuffle_epi8(t1, c1h)); \
                al_b = _mm512_add_epi16(al_b, lo);                               \
                ol_b = _mm512_add_epi16(ol_b, _mm512_srli_epi16(lo, 8));         \
                ah_b = _mm512_add_epi16(ah_b, hi);                               \
                oh_b = _mm512_add_epi16(oh_b, _mm512_srli_epi16(hi, 8));         \
            }                                                                    \
        }                                                                        \
        const ptrdiff_t left = n - b * SH_FS_BLOCK;                              \
        const int rows = left < SH_FS_BLOCK ? (int)left : SH_FS_BLOCK;           \
        const uint8_t* allow = allowed ? allowed + b * SH_FS_BLOCK : NULL;       \
        SH_FS_REPORT512(al_a, ol_a, ah_a, oh_a, thr_a, threshold_a, pos_a, dist_a, na); \
        SH_FS_REPORT512(al_b, ol_b, ah_b, oh_b, thr_b, threshold_b, pos_b, dist_b, nb); \
    }                                                                            \
    *count_a = na;                                                               \
    *count_b = nb;                                                               \
}

/* Even sums from (all, odd); rows of the block below the threshold reported. */
#define SH_FS_REPORT512(AL, OL, AH, OH, THR, THRESHOLD, POS, DIST, COUNT)         \
    {                                                                            \
        const __m512i el_ = _mm512_sub_epi16(AL, _mm512_slli_epi16(OL, 8));      \
        const __m512i eh_ = _mm512_sub_epi16(AH, _mm512_slli_epi16(OH, 8));      \
        if (_mm512_cmple_epu16_mask(el_, THR) | _mm512_cmple_epu16_mask(OL, THR) \
            | _mm512_cmple_epu16_mask(eh_, THR) | _mm512_cmple_epu16_mask(OH, THR)) { \
            uint16_t el[32], ol[32], eh[32], oh[32], d[SH_FS_BLOCK];             \
            _mm512_storeu_si512((void*)el, el_);                                 \
            _mm512_storeu_si512((void*)ol, OL);                                  \
            _mm512_storeu_si512((void*)eh, eh_);                                 \
            _mm512_storeu_si512((void*)oh, OH);                                  \
            sh_fs_scatter(el, ol, eh, oh, 32, d);                                \
            COUNT = sh_fs_report(d, rows, allow, THRESHOLD, b * SH_FS_BLOCK, POS, DIST, COUNT); \
        }                                                                        \
    }

SH_FS_SCAN2_AVX512(sh_fs_scan2_avx512_any, 0)
SH_FS_SCAN2_AVX512(sh_fs_scan2_avx512_p4, 4)
SH_FS_SCAN2_AVX512(sh_fs_scan2_avx512_p8, 8)
SH_FS_SCAN2_AVX512(sh_fs_scan2_avx512_p16, 16)
SH_FS_SCAN2_AVX512(sh_fs_scan2_avx512_p32, 32)

/* AVX2: each block in two halves of 64 codes (groups 0-1, then 2-3). */
__attribute__((target("avx2")))
static ptrdiff_t sh_fs_scan_avx2(const uint8_t* lut, const uint8_t* blocks, ptrdiff_t n,
                                 ptrdiff_t Mp, const uint8_t* allowed, int threshold,
                                 int32_t* pos, uint16_t* dist)
{
    ptrdiff_t count = 0;
    const ptrdiff_t n_blocks = (n + SH_FS_BLOCK - 1) / SH_FS_BLOCK;
    const ptrdiff_t n_pairs = Mp / 2;
    const __m256i low = _mm256_set1_epi8(0x0f);
    const __m256i zero = _mm256_setzero_si256();
    const __m256i thr = _mm256_set1_epi16((short)(uint16_t)(threshold - 1));
    for (ptrdiff_t b = 0; b < n_blocks; ++b) {
        __m256i sums[2][4];  /* per half: even_lo, odd_lo, even_hi, odd_hi */
        int any = 0;
        for (int h = 0; h < 2; ++h) {
            const uint8_t* block = blocks + b * Mp * 64 + 32 * h;
            __m256i all_lo = zero, odd_lo = zero, all_hi = zero, odd_hi = zero;
            for (ptrdiff_t p = 0; p < n_pairs; ++p) {
                const __m256i c0 = _mm256_loadu_si256((const __m256i*)(block + 128 * p));
                const __m256i c1 = _mm256_loadu_si256((const __m256i*)(block + 128 * p + 64));
                const __m256i t0 = _mm256_broadcastsi128_si256(
                    _mm_loadu_si128((const __m128i*)(lut + 32 * p)));
                const __m256i t1 = _mm256_broadcastsi128_si256(
                    _mm_loadu_si128((const __m128i*)(lut + 32 * p + 16)));
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
            sums[h][0] = _mm256_sub_epi16(all_lo, _mm256_slli_epi16(odd_lo, 8));
            sums[h][1] = odd_lo;
            sums[h][2] = _mm256_sub_epi16(all_hi, _mm256_slli_epi16(odd_hi, 8));
            sums[h][3] = odd_hi;
            for (int v = 0; v < 4; ++v) {
                /* Unsigned x <= thr as min(x, thr) == x. */
                const __m256i x = sums[h][v];
                any |= _mm256_movemask_epi8(_mm256_cmpeq_epi16(_mm256_min_epu16(x, thr), x));
            }
        }
        if (any) {
            uint16_t s[2][4][16], d[SH_FS_BLOCK];
            for (int h = 0; h < 2; ++h) {
                for (int v = 0; v < 4; ++v)
                    _mm256_storeu_si256((__m256i*)s[h][v], sums[h][v]);
                sh_fs_scatter(s[h][0], s[h][1], s[h][2], s[h][3], 16, d + 64 * h);
            }
            const ptrdiff_t left = n - b * SH_FS_BLOCK;
            const int rows = left < SH_FS_BLOCK ? (int)left : SH_FS_BLOCK;
            count = sh_fs_report(d, rows, allowed ? allowed + b * SH_FS_BLOCK : NULL,
                                 threshold, b * SH_FS_BLOCK, pos, dist, count);
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
                                   ptrdiff_t n, ptrdiff_t Mp, const uint8_t* allowed,
                                   int threshold, int32_t* pos, uint16_t* dist)
{
    if (threshold <= 0 || n <= 0)
        return 0;
#if SKLEARN_HASH_FS_X86
    if (simd >= 2)
        return sh_fs_scan_avx512(lut, blocks, n, Mp, allowed, threshold, pos, dist);
    if (simd == 1)
        return sh_fs_scan_avx2(lut, blocks, n, Mp, allowed, threshold, pos, dist);
#endif
    return sh_fs_scan_portable(lut, blocks, n, Mp, allowed, threshold, pos, dist);
}

/* sh_fs_scan for two queries a and b over the same codes; the AVX-512 path
 * reads the codes once for both. */
static inline void sh_fs_scan2(int simd, const uint8_t* lut_a, const uint8_t* lut_b,
                               const uint8_t* blocks, ptrdiff_t n, ptrdiff_t Mp,
                               const uint8_t* allowed, int threshold_a, int threshold_b,
                               int32_t* pos_a, uint16_t* dist_a, ptrdiff_t* count_a,
                               int32_t* pos_b, uint16_t* dist_b, ptrdiff_t* count_b)
{
#if SKLEARN_HASH_FS_X86
    if (simd >= 2 && threshold_a > 0 && threshold_b > 0 && n > 0) {
        switch (Mp) {
        case 8: sh_fs_scan2_avx512_p4(lut_a, lut_b, blocks, n, Mp, allowed, threshold_a,
                                      threshold_b, pos_a, dist_a, count_a, pos_b, dist_b,
                                      count_b); return;
        case 16: sh_fs_scan2_avx512_p8(lut_a, lut_b, blocks, n, Mp, allowed, threshold_a,
                                       threshold_b, pos_a, dist_a, count_a, pos_b, dist_b,
                                       count_b); return;
        case 32: sh_fs_scan2_avx512_p16(lut_a, lut_b, blocks, n, Mp, allowed, threshold_a,
                                        threshold_b, pos_a, dist_a, count_a, pos_b, dist_b,
                                        count_b); return;
        case 64: sh_fs_scan2_avx512_p32(lut_a, lut_b, blocks, n, Mp, allowed, threshold_a,
                                        threshold_b, pos_a, dist_a, count_a, pos_b, dist_b,
                                        count_b); return;
        default: sh_fs_scan2_avx512_any(lut_a, lut_b, blocks, n, Mp, allowed, threshold_a,
                                        threshold_b, pos_a, dist_a, count_a, pos_b, dist_b,
                                        count_b); return;
        }
    }
#endif
    *count_a = sh_fs_scan(simd, lut_a, blocks, n, Mp, allowed, threshold_a, pos_a, dist_a);
    *count_b = sh_fs_scan(simd, lut_b, blocks, n, Mp, allowed, threshold_b, pos_b, dist_b);
}

/* ---- one probe's table, quantized (the inverted-file search) ----
 *
 * table: (M, 16) float32. With lo_m, hi_m the row extremes, bias = sum lo_m
 * and slack = 4 M 2**-24 sum max(|lo_m|, |hi_m|) + 1e-30 (float32 sums of M
 * entries are off by less), a table none of whose sums can reach `kth`
 * (kth - bias + slack < 0) returns 1 and nothing else is written. Else the
 * entries e = t - lo_m are quantized with scale s = span / qmax, span =
 * min(widest row range, kth - bias) (the widest range when that is not
 * positive), as q = min(qmax, (int)(e / s + 0.5)) in float32 (any rounding
 * will do: the bound uses the q written); out = (s, bias, e_over, slack)
 * with e_over = sum_m max_c (s q - e) in double, so that s Q - e_over <=
 * D - bias for every code (Q its quantized sum, D its exact sum); the
 * padding subspace of lut is zero. Returns 0. Both versions write the same
 * numbers. */

/* The slack and span above, for both versions; 1 when no sum can reach kth. */
static inline int sh_fs_steps(ptrdiff_t M, float kth, double fraction, double bias,
                              double widest, double size, double* slack, double* span)
{
    *slack = 4.0 * (double)M * size * 5.9604644775390625e-08 + 1e-30;
    if ((double)kth - bias + *slack < 0)
        return 1;
    *span = widest;
    if ((double)kth - bias > 0 && fraction * ((double)kth - bias) < *span)
        *span = fraction * ((double)kth - bias);
    return 0;
}

static inline int sh_fs_quantize_tail(const float* table, ptrdiff_t M, ptrdiff_t Mp, int qmax,
                                      float kth, double fraction, const float* lo, double bias,
                                      double widest, double size, uint8_t* lut, double* out)
{
    double slack, span;
    if (sh_fs_steps(M, kth, fraction, bias, widest, size, &slack, &span))
        return 1;
    memset(lut + M * 16, 0, (size_t)((Mp - M) * 16));
    double scale = 0, e_over = 0;
    if (span > 0) {
        scale = span / qmax;
        const float inv = (float)(qmax / span);
        for (ptrdiff_t m = 0; m < M; ++m) {
            const float* t = table + m * 16;
            double worst = 0;  /* the row minimum's entry: q = 0, e = 0 */
            for (int c = 0; c < 16; ++c) {
                const float x = (t[c] - lo[m]) * inv + 0.5f;
                int q = (int)x;
                q = q < qmax ? q : qmax;
                lut[m * 16 + c] = (uint8_t)q;
                const double over = scale * q - ((double)t[c] - (double)lo[m]);
                worst = over > worst ? over : worst;
            }
            e_over += worst;
        }
    } else {
        memset(lut, 0, (size_t)(M * 16));
    }
    out[0] = scale;
    out[1] = bias;
    out[2] = e_over;
    out[3] = slack;
    return 0;
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
/* The same numbers as the portable version, 16 entries at a time. */
__attribute__((target("avx2")))
static int sh_fs_quantize_probe_avx2(const float* table, ptrdiff_t M, ptrdiff_t Mp, int qmax,
                                     float kth, double fraction, float* lo, uint8_t* lut,
                                     double* out)
{
    double bias = 0, widest = 0, size = 0;
    for (ptrdiff_t m = 0; m < M; ++m) {
        const __m256 a = _mm256_loadu_ps(table + m * 16), b = _mm256_loadu_ps(table + m * 16 + 8);
        __m256 mn = _mm256_min_ps(a, b), mx = _mm256_max_ps(a, b);
        mn = _mm256_min_ps(mn, _mm256_permute2f128_ps(mn, mn, 1));
        mx = _mm256_max_ps(mx, _mm256_permute2f128_ps(mx, mx, 1));
        mn = _mm256_min_ps(mn, _mm256_shuffle_ps(mn, mn, 0x4e));
        mx = _mm256_max_ps(mx, _mm256_shuffle_ps(mx, mx, 0x4e));
        mn = _mm256_min_ps(mn, _mm256_shuffle_ps(mn, mn, 0xb1));
        mx = _mm256_max_ps(mx, _mm256_shuffle_ps(mx, mx, 0xb1));
        const float l = _mm256_cvtss_f32(mn), h = _mm256_cvtss_f32(mx);
        lo[m] = l;
        bias += l;
        widest = (double)h - l > widest ? (double)h - l : widest;
        size += fabs((double)l) > fabs((double)h) ? fabs((double)l) : fabs((double)h);
    }
    double slack, span;
    if (sh_fs_steps(M, kth, fraction, bias, widest, size, &slack, &span))
        return 1;
    if (!(span > 0))
        return sh_fs_quantize_tail(table, M, Mp, qmax, kth, fraction, lo, bias, widest, size,
                                   lut, out);
    memset(lut + M * 16, 0, (size_t)((Mp - M) * 16));
    const double scale = span / qmax;
    const __m256 inv = _mm256_set1_ps((float)(qmax / span)), half = _mm256_set1_ps(0.5f);
    const __m256i top = _mm256_set1_epi32(qmax);
    const __m256d s = _mm256_set1_pd(scale);
    double e_over = 0;
    for (ptrdiff_t m = 0; m < M; ++m) {
        const float* t = table + m * 16;
        const __m256 l = _mm256_set1_ps(lo[m]);
        const __m256d ld = _mm256_set1_pd((double)lo[m]);
        const __m256 a = _mm256_loadu_ps(t), b = _mm256_loadu_ps(t + 8);
        const __m256i qa = _mm256_min_epi32(_mm256_cvttps_epi32(
            _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(a, l), inv), half)), top);
        const __m256i qb = _mm256_min_epi32(_mm256_cvttps_epi32(
            _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(b, l), inv), half)), top);
        const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(qa, qb), 0xd8);
        const __m256i bytes = _mm256_permute4x64_epi64(_mm256_packus_epi16(w, w), 0xd8);
        _mm_storeu_si128((__m128i*)(lut + m * 16), _mm256_castsi256_si128(bytes));
        __m256d worst = _mm256_setzero_pd();
        for (int g = 0; g < 4; ++g) {
            const __m128i qg = g < 2 ? (g ? _mm256_extracti128_si256(qa, 1)
                                          : _mm256_castsi256_si128(qa))
                                     : (g == 3 ? _mm256_extracti128_si256(qb, 1)
                                               : _mm256_castsi256_si128(qb));
            const __m256d e = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(t + 4 * g)), ld);
            worst = _mm256_max_pd(worst, _mm256_sub_pd(_mm256_mul_pd(s, _mm256_cvtepi32_pd(qg)),
                                                       e));
        }
        double w4[4];
        _mm256_storeu_pd(w4, worst);
        double wm = w4[0] > w4[1] ? w4[0] : w4[1];
        wm = w4[2] > wm ? w4[2] : wm;
        wm = w4[3] > wm ? w4[3] : wm;
        e_over += wm;
    }
    out[0] = scale;
    out[1] = bias;
    out[2] = e_over;
    out[3] = slack;
    return 0;
}
#define SH_FS_QUANTIZE_AVX2 1
#else
#define SH_FS_QUANTIZE_AVX2 0
#endif

static inline int sh_fs_quantize_probe(int simd, const float* table, ptrdiff_t M, ptrdiff_t Mp,
                                       int qmax, float kth, double fraction, float* lo,
                                       uint8_t* lut, double* out)
{
#if SH_FS_QUANTIZE_AVX2
    if (simd >= 1)
        return sh_fs_quantize_probe_avx2(table, M, Mp, qmax, kth, fraction, lo, lut, out);
#endif
    double bias = 0, widest = 0, size = 0;
    for (ptrdiff_t m = 0; m < M; ++m) {
        const float* t = table + m * 16;
        float l = t[0], h = t[0];
        for (int c = 1; c < 16; ++c) {
            l = t[c] < l ? t[c] : l;
            h = t[c] > h ? t[c] : h;
        }
        lo[m] = l;
        bias += l;
        widest = (double)h - l > widest ? (double)h - l : widest;
        size += fabs((double)l) > fabs((double)h) ? fabs((double)l) : fabs((double)h);
    }
    return sh_fs_quantize_tail(table, M, Mp, qmax, kth, fraction, lo, bias, widest, size, lut,
                               out);
}

/* The float32 ADC distances of n codes (8 at a time: independent addition
 * chains, each in subspace order). */
static inline void sh_fs_adc_rows(const float* table, const uint8_t* codes, ptrdiff_t n,
                                  ptrdiff_t M, float* out)
{
    ptrdiff_t j = 0;
    for (; j + 8 <= n; j += 8) {
        float d[8];
        for (int r = 0; r < 8; ++r) d[r] = table[codes[(j + r) * M]];
        for (ptrdiff_t m = 1; m < M; ++m)
            for (int r = 0; r < 8; ++r) d[r] += table[m * 16 + codes[(j + r) * M + m]];
        for (int r = 0; r < 8; ++r) out[j + r] = d[r];
    }
    for (; j < n; ++j) {
        float d = table[codes[j * M]];
        for (ptrdiff_t m = 1; m < M; ++m) d += table[m * 16 + codes[j * M + m]];
        out[j] = d;
    }
}

/* The float32 ADC distance of one code: table[m, code[m]] added in order of m. */
static inline float sh_fs_adc(const float* table, const uint8_t* code, ptrdiff_t M)
{
    float d = table[code[0]];
    for (ptrdiff_t m = 1; m < M; ++m)
        d += table[m * 16 + code[m]];
    return d;
}

/* Where row e of a block layout (Mp subspaces) keeps its code of subspace 0;
 * that of subspace m is 64 m bytes further, in the nibble *shift says. */
static inline const uint8_t* sh_fs_block_row(const uint8_t* blocks, ptrdiff_t Mp, ptrdiff_t e,
                                             int* shift)
{
    const int in_block = (int)(e % SH_FS_BLOCK);
    *shift = (in_block % 32) < 16 ? 0 : 4;
    return blocks + (e / SH_FS_BLOCK) * Mp * 64 + 16 * (in_block / 32) + (in_block % 16);
}

/* The codes of rows rows[0..n) of a block layout (M of its Mp subspaces), one
 * byte per codeword index, into codes (n, M): what sh_fs_pack packed. */
static void sh_fs_unpack_rows(const uint8_t* blocks, ptrdiff_t Mp, ptrdiff_t M,
                              const int64_t* rows, ptrdiff_t n, uint8_t* codes)
{
    for (ptrdiff_t j = 0; j < n; ++j) {
        int shift;
        const uint8_t* at = sh_fs_block_row(blocks, Mp, rows[j], &shift);
        for (ptrdiff_t m = 0; m < M; ++m)
            codes[j * M + m] = (uint8_t)((at[64 * m] >> shift) & 15);
    }
}

/* sh_fs_adc of row e read from a block layout: the same float32 sum. */
static inline float sh_fs_adc_block(const float* table, const uint8_t* blocks, ptrdiff_t Mp,
                                    ptrdiff_t M, ptrdiff_t e)
{
    int shift;
    const uint8_t* at = sh_fs_block_row(blocks, Mp, e, &shift);
    float d = table[(at[0] >> shift) & 15];
    for (ptrdiff_t m = 1; m < M; ++m)
        d += table[m * 16 + ((at[64 * m] >> shift) & 15)];
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

#define SH_FS_MAX_FOUND 2048  /* rows of a part (PART_ROWS in _fastscan.pyx) */
#define SH_FS_BUCKETS 64

/* Exclusive bound on the quantized distance of rows that may be at most d
 * (par = scale, bias, e_over, slack; 65536: no bound). */
static inline int sh_fs_threshold(double d, const double* par)
{
    if (par[0] <= 0 || !isfinite(d))
        return 65536;
    const double x = (d - par[1] + par[2] + par[3]) / par[0];
    if (x < 0)
        return 0;
    if (x >= 65535)
        return 65536;
    return (int)x + 1;  /* x >= 0: the cast is the floor */
}

/* Re-score, with the float table, the rows a scan of one part found and offer
 * them to the heap: row r0 + pos[c] for each c whose quantized distance is
 * still below the threshold (*thr, lowered as the heap's k-th distance falls)
 * and which is not before `done` (scored already). A row's codes are read
 * from the block layout `blocks` (of the chunk, Mp subspaces), which the scan
 * has just brought into cache, not from code rows (which then need not be
 * resident). Rows are taken 8 at a time: their ids are prefetched and their
 * distances computed as independent chains (each added in subspace order, as
 * sh_fs_adc: the same float32 numbers), then offered in row order. A row whose distance ranks
 * after the heap's worst is dropped without reading its id unless a mask or
 * an excluded index needs it. The heap ends as row-by-row offers leave it.
 * Returns the number of rows scored. */
static ptrdiff_t sh_fs_rescore_found(
    const float* table, const uint8_t* blocks, ptrdiff_t Mp, const int64_t* ids, ptrdiff_t M,
    const int32_t* pos, const uint16_t* qd, ptrdiff_t n_found, ptrdiff_t r0, ptrdiff_t done,
    int64_t own, const uint8_t* allow, const double* par, int* thr,
    float* hd, int64_t* hi, ptrdiff_t* size, ptrdiff_t k)
{
    ptrdiff_t scored = 0, c = 0;
    ptrdiff_t rows[8];
    const uint8_t* at[8];  /* each row's byte of subspace 0 in its block */
    int shift[8];          /* 0: the low nibble holds the row's code, 4: the high one */
    float d[8];
    const int check_id = own >= 0 || allow != NULL;
    /* Visit the rows by increasing quantized distance (64 buckets of the
     * range below the threshold, row order within one): the nearest ones
     * lower the k-th distance first, so fewer of the others pass. */
    int32_t order[SH_FS_MAX_FOUND];
    uint16_t start[SH_FS_BUCKETS + 1];
    const int top = *thr;
    if (n_found > SH_FS_MAX_FOUND)
        n_found = 0;  /* never: a part holds at most SH_FS_MAX_FOUND rows */
    {
        uint16_t count[SH_FS_BUCKETS] = {0};
        const double per = (double)SH_FS_BUCKETS / (top > 0 ? top : 1);
        for (ptrdiff_t i = 0; i < n_found; ++i) {
            int g = qd[i] < top ? (int)(qd[i] * per) : SH_FS_BUCKETS - 1;
            ++count[g < SH_FS_BUCKETS ? g : SH_FS_BUCKETS - 1];
        }
        start[0] = 0;
        for (int g = 0; g < SH_FS_BUCKETS; ++g)
            start[g + 1] = start[g] + count[g];
        uint16_t fill[SH_FS_BUCKETS];
        memcpy(fill, start, sizeof(fill));
        for (ptrdiff_t i = 0; i < n_found; ++i) {
            int g = qd[i] < top ? (int)(qd[i] * per) : SH_FS_BUCKETS - 1;
            order[fill[g < SH_FS_BUCKETS ? g : SH_FS_BUCKETS - 1]++] = (int32_t)i;
        }
    }
    while (c < n_found) {
        int nb = 0;
        for (; c < n_found && nb < 8; ++c) {
            const ptrdiff_t i = order[c];
            const ptrdiff_t e = r0 + pos[i];
            if (qd[i] >= *thr || e < done)
                continue;
            at[nb] = sh_fs_block_row(blocks, Mp, e, &shift[nb]);
            rows[nb++] = e;
            __builtin_prefetch(ids + e);
        }
        if (nb == 0)
            break;
        for (int b = 0; b < nb; ++b)
            d[b] = table[(at[b][0] >> shift[b]) & 15];
        for (ptrdiff_t m = 1; m < M; ++m)
            for (int b = 0; b < nb; ++b)
                d[b] += table[m * 16 + ((at[b][64 * m] >> shift[b]) & 15)];
        scored += nb;
        for (int b = 0; b < nb; ++b) {
            if (!check_id && *size == k && d[b] > hd[0])
                continue;  /* ranks after the worst kept, whatever its index */
            const int64_t j = ids[rows[b]];
            if (j == own || (allow != NULL && !allow[j]))
                continue;
            sh_fs_offer(hd, hi, size, k, d[b], j);
            if (*size == k) {
                const int t = sh_fs_threshold(hd[0], par);
                *thr = t < *thr ? t : *thr;
            }
        }
    }
    return scored;
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
