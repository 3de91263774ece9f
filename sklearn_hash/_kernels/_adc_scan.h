/* Asymmetric distances from one query to a block of product-quantization codes.
 *
 * `table` holds the query's squared distances to every codeword, shape
 * (n_subspaces, n_codewords), row-major; `codes` holds `n` database codes of
 * `n_subspaces` codeword indices each, row-major. The distance of a code is
 * the sum over subspaces m of table[m, code[m]], added in order of m. Rows
 * whose distance is below `threshold` are written to `pos` / `dist` in
 * ascending row order; the count is returned.
 *
 * Common numbers of subspaces get loops the compiler unrolls fully.
 */
#ifndef SKLEARN_HASH_ADC_SCAN_H
#define SKLEARN_HASH_ADC_SCAN_H

#include <stddef.h>
#include <stdint.h>

#define SH_ADC_SCAN(NAME, CODE_T, FIXED_M)                                        \
static ptrdiff_t NAME(const float* table, const CODE_T* codes, ptrdiff_t n,      \
                      ptrdiff_t n_subspaces, ptrdiff_t n_codewords,              \
                      float threshold, int32_t* pos, float* dist)                \
{                                                                                \
    const ptrdiff_t M = (FIXED_M) > 0 ? (FIXED_M) : n_subspaces;                 \
    ptrdiff_t count = 0;                                                         \
    ptrdiff_t j = 0;                                                             \
    /* Two rows at a time: independent addition chains, same order per row. */  \
    for (; j + 1 < n; j += 2) {                                                  \
        const CODE_T* a = codes + j * M;                                         \
        const CODE_T* b = a + M;                                                 \
        float da = 0.0f, db = 0.0f;                                              \
        for (ptrdiff_t m = 0; m < M; ++m) {                                      \
            da += table[m * n_codewords + a[m]];                                 \
            db += table[m * n_codewords + b[m]];                                 \
        }                                                                        \
        if (da < threshold) { pos[count] = (int32_t)j; dist[count] = da; ++count; } \
        if (db < threshold) { pos[count] = (int32_t)(j + 1); dist[count] = db; ++count; } \
    }                                                                            \
    for (; j < n; ++j) {                                                         \
        const CODE_T* code = codes + j * M;                                      \
        float d = 0.0f;                                                          \
        for (ptrdiff_t m = 0; m < M; ++m)                                        \
            d += table[m * n_codewords + code[m]];                               \
        if (d < threshold) {                                                     \
            pos[count] = (int32_t)j;                                             \
            dist[count] = d;                                                     \
            ++count;                                                             \
        }                                                                        \
    }                                                                            \
    return count;                                                                \
}

SH_ADC_SCAN(sh_adc_scan_u8_m4, uint8_t, 4)
SH_ADC_SCAN(sh_adc_scan_u8_m8, uint8_t, 8)
SH_ADC_SCAN(sh_adc_scan_u8_m16, uint8_t, 16)
SH_ADC_SCAN(sh_adc_scan_u8_any, uint8_t, 0)
SH_ADC_SCAN(sh_adc_scan_u16_any, uint16_t, 0)

static inline ptrdiff_t sh_adc_scan_u8(const float* table, const uint8_t* codes, ptrdiff_t n,
                                       ptrdiff_t n_subspaces, ptrdiff_t n_codewords,
                                       float threshold, int32_t* pos, float* dist)
{
    switch (n_subspaces) {
    case 4: return sh_adc_scan_u8_m4(table, codes, n, 4, n_codewords, threshold, pos, dist);
    case 8: return sh_adc_scan_u8_m8(table, codes, n, 8, n_codewords, threshold, pos, dist);
    case 16: return sh_adc_scan_u8_m16(table, codes, n, 16, n_codewords, threshold, pos, dist);
    default: return sh_adc_scan_u8_any(table, codes, n, n_subspaces, n_codewords, threshold, pos, dist);
    }
}

static inline ptrdiff_t sh_adc_scan_u16(const float* table, const uint16_t* codes, ptrdiff_t n,
                                        ptrdiff_t n_subspaces, ptrdiff_t n_codewords,
                                        float threshold, int32_t* pos, float* dist)
{
    return sh_adc_scan_u16_any(table, codes, n, n_subspaces, n_codewords, threshold, pos, dist);
}

#endif /* SKLEARN_HASH_ADC_SCAN_H */
