/* Nearest codeword of each row: the assignment step of k-means and the
 * encoding step of product quantization, fused so that no n x K distance
 * matrix is ever written.
 *
 * Row i of `X` (d values at X + i * ldx) is scored against every codeword c
 * as  score(c) = x . c - ||c||^2 / 2,  which ranks codewords as -||x - c||^2
 * does. `CT` holds the codewords transposed, d x Kp row-major, and `bias`
 * holds -||c||^2 / 2; Kp is K rounded up to a multiple of 64, the padding
 * columns have CT = 0 and bias = -inf so they never win. The best codeword
 * (ties: the smallest index) goes to labels[i] and its score to scores[i].
 *
 * Blocks of 4 rows share each load of a vector of codewords, and every
 * vector lane keeps its own running best, so the inner loop is fused
 * multiply-adds and the argmax costs one compare and two blends per vector.
 * The vectors use GCC / clang vector extensions in three widths, picked at
 * run time: 64 bytes (AVX-512F), 32 bytes (AVX2 + FMA) and 16 bytes
 * (any processor). The wider paths contract x * c + acc into one FMA, so
 * near-ties (within float rounding) may resolve differently across paths;
 * other compilers get a plain C loop.
 */
#ifndef SKLEARN_HASH_NEAREST_H
#define SKLEARN_HASH_NEAREST_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define SH_NEAREST_ROWS 4

#if defined(__GNUC__)
#define SH_NEAREST_VECTORS 1

typedef float sh_f32x16 __attribute__((vector_size(64)));
typedef int32_t sh_i32x16 __attribute__((vector_size(64)));
typedef float sh_f32x8 __attribute__((vector_size(32)));
typedef int32_t sh_i32x8 __attribute__((vector_size(32)));
typedef float sh_f32x4 __attribute__((vector_size(16)));
typedef int32_t sh_i32x4 __attribute__((vector_size(16)));
typedef double sh_f64x8 __attribute__((vector_size(64)));
typedef int64_t sh_i64x8 __attribute__((vector_size(64)));
typedef double sh_f64x4 __attribute__((vector_size(32)));
typedef int64_t sh_i64x4 __attribute__((vector_size(32)));
typedef double sh_f64x2 __attribute__((vector_size(16)));
typedef int64_t sh_i64x2 __attribute__((vector_size(16)));

/* T: scalar type; VT / VI: vectors of L values of T / of same-size integers;
 * C: vectors of codewords per step. A step keeps ROWS x C accumulators in
 * registers: each codeword vector loaded serves ROWS rows and each
 * broadcast row value serves C vectors (for 128 features and 1024
 * codewords, 23 -> 78 GFMA/s on one AVX-512 core against C = 1). */
#define SH_NEAREST_VECTOR(NAME, T, VT, VI, L, C, ATTR)                            \
ATTR static void NAME(const T* X, ptrdiff_t ldx, ptrdiff_t n, ptrdiff_t d,        \
                      const T* CT, const T* bias, ptrdiff_t Kp,                  \
                      int32_t* labels, T* scores, T* out)                        \
{                                                                                \
    VI lane;                                                                     \
    for (int l = 0; l < (L); ++l) lane[l] = l;                                   \
    for (ptrdiff_t i = 0; i < n; i += SH_NEAREST_ROWS) {                         \
        const ptrdiff_t rows = n - i < SH_NEAREST_ROWS ? n - i : SH_NEAREST_ROWS; \
        const T* x[SH_NEAREST_ROWS];                                             \
        VT best[SH_NEAREST_ROWS];                                                \
        VI arg[SH_NEAREST_ROWS];                                                 \
        for (int p = 0; p < SH_NEAREST_ROWS; ++p) {                              \
            /* Missing rows of the last block repeat its last row. */            \
            x[p] = X + (i + (p < rows ? p : rows - 1)) * ldx;                    \
            best[p] = (VT){0} - INFINITY;                                        \
            arg[p] = (VI){0};                                                    \
        }                                                                        \
        VI index = lane;                                                         \
        for (ptrdiff_t c = 0; c < Kp; c += (C) * (L)) {                          \
            VT acc[SH_NEAREST_ROWS][C];                                          \
            for (int b = 0; b < (C); ++b) {                                      \
                VT v;                                                            \
                memcpy(&v, bias + c + b * (L), sizeof(VT));                      \
                for (int p = 0; p < SH_NEAREST_ROWS; ++p) acc[p][b] = v;         \
            }                                                                    \
            for (ptrdiff_t j = 0; j < d; ++j) {                                  \
                VT w[C];                                                         \
                for (int b = 0; b < (C); ++b)                                    \
                    memcpy(&w[b], CT + j * Kp + c + b * (L), sizeof(VT));        \
                for (int p = 0; p < SH_NEAREST_ROWS; ++p) {                      \
                    const T xv = x[p][j];                                        \
                    for (int b = 0; b < (C); ++b) acc[p][b] += xv * w[b];        \
                }                                                                \
            }                                                                    \
            if (out) { /* every score, row i + p at out + (i + p) * Kp */        \
                for (ptrdiff_t p = 0; p < rows; ++p)                             \
                    for (int b = 0; b < (C); ++b)                                \
                        memcpy(out + (i + p) * Kp + c + b * (L), &acc[p][b], sizeof(VT)); \
                continue;                                                        \
            }                                                                    \
            for (int b = 0; b < (C); ++b, index += (L)) {                        \
                for (int p = 0; p < SH_NEAREST_ROWS; ++p) {                      \
                    const VI better = acc[p][b] > best[p];                       \
                    best[p] = (VT)(((VI)acc[p][b] & better) | ((VI)best[p] & ~better)); \
                    arg[p] = (index & better) | (arg[p] & ~better);              \
                }                                                                \
            }                                                                    \
        }                                                                        \
        if (out) continue;                                                       \
        for (ptrdiff_t p = 0; p < rows; ++p) {                                   \
            T s = best[p][0];                                                    \
            int32_t k = (int32_t)arg[p][0];                                      \
            for (int l = 1; l < (L); ++l) {                                      \
                if (best[p][l] > s || (best[p][l] == s && arg[p][l] < k)) {      \
                    s = best[p][l];                                              \
                    k = (int32_t)arg[p][l];                                      \
                }                                                                \
            }                                                                    \
            labels[i + p] = k;                                                   \
            scores[i + p] = s;                                                   \
        }                                                                        \
    }                                                                            \
}

/* Every score of ONE row (out mode), feature by feature: out = bias, then
 * out += x[j] * CT[j] over the contiguous row j of CT. Each lane adds the
 * same products in the same order as the block kernel (same scores, bit for
 * bit), but CT is read as one forward stream instead of column blocks down
 * its rows, 4 KB apart at 1024 codewords: for a single query (an inverted
 * file's centroids) that stride, not the arithmetic, bounds the time. */
#define SH_SCORES_ROW(NAME, T, VT, L, ATTR)                                       \
ATTR static void NAME(const T* x, ptrdiff_t d, const T* CT, const T* bias,       \
                      ptrdiff_t Kp, T* out)                                      \
{                                                                                \
    memcpy(out, bias, (size_t)Kp * sizeof(T));                                   \
    for (ptrdiff_t j = 0; j < d; ++j) {                                          \
        const T xv = x[j];                                                       \
        const T* w = CT + j * Kp;                                                \
        for (ptrdiff_t c = 0; c < Kp; c += (L)) {                                \
            VT acc, wv;                                                          \
            memcpy(&acc, out + c, sizeof(VT));                                   \
            memcpy(&wv, w + c, sizeof(VT));                                      \
            acc += xv * wv;                                                      \
            memcpy(out + c, &acc, sizeof(VT));                                   \
        }                                                                        \
    }                                                                            \
}

SH_NEAREST_VECTOR(sh_nearest_f32_v4, float, sh_f32x4, sh_i32x4, 4, 2, )
SH_NEAREST_VECTOR(sh_nearest_f64_v2, double, sh_f64x2, sh_i64x2, 2, 2, )
SH_SCORES_ROW(sh_scores_row_f32_v4, float, sh_f32x4, 4, )
SH_SCORES_ROW(sh_scores_row_f64_v2, double, sh_f64x2, 2, )

#if defined(__x86_64__) || defined(__i386__)
#define SH_NEAREST_X86 1
SH_NEAREST_VECTOR(sh_nearest_f32_avx2, float, sh_f32x8, sh_i32x8, 8, 2,
                  __attribute__((target("avx2,fma"))))
SH_NEAREST_VECTOR(sh_nearest_f64_avx2, double, sh_f64x4, sh_i64x4, 4, 2,
                  __attribute__((target("avx2,fma"))))
SH_NEAREST_VECTOR(sh_nearest_f32_avx512, float, sh_f32x16, sh_i32x16, 16, 4,
                  __attribute__((target("avx512f,fma"))))
SH_NEAREST_VECTOR(sh_nearest_f64_avx512, double, sh_f64x8, sh_i64x8, 8, 4,
                  __attribute__((target("avx512f,fma"))))
SH_SCORES_ROW(sh_scores_row_f32_avx2, float, sh_f32x8, 8, __attribute__((target("avx2,fma"))))
SH_SCORES_ROW(sh_scores_row_f64_avx2, double, sh_f64x4, 4, __attribute__((target("avx2,fma"))))
SH_SCORES_ROW(sh_scores_row_f32_avx512, float, sh_f32x16, 16,
              __attribute__((target("avx512f,fma"))))
SH_SCORES_ROW(sh_scores_row_f64_avx512, double, sh_f64x8, 8,
              __attribute__((target("avx512f,fma"))))
#else
#define SH_NEAREST_X86 0
#endif

#else /* not GCC / clang: plain C */
#define SH_NEAREST_VECTORS 0
#define SH_NEAREST_X86 0

#define SH_NEAREST_PLAIN(NAME, T)                                                 \
static void NAME(const T* X, ptrdiff_t ldx, ptrdiff_t n, ptrdiff_t d,             \
                 const T* CT, const T* bias, ptrdiff_t Kp,                       \
                 int32_t* labels, T* scores, T* out)                             \
{                                                                                \
    for (ptrdiff_t i = 0; i < n; ++i) {                                          \
        const T* x = X + i * ldx;                                                \
        T s = -INFINITY;                                                         \
        int32_t k = 0;                                                           \
        for (ptrdiff_t c = 0; c < Kp; ++c) {                                     \
            T acc = bias[c];                                                     \
            for (ptrdiff_t j = 0; j < d; ++j) acc += x[j] * CT[j * Kp + c];      \
            if (out) out[i * Kp + c] = acc;                                      \
            if (acc > s) { s = acc; k = (int32_t)c; }                            \
        }                                                                        \
        if (!out) { labels[i] = k; scores[i] = s; }                              \
    }                                                                            \
}
SH_NEAREST_PLAIN(sh_nearest_f32_v4, float)
SH_NEAREST_PLAIN(sh_nearest_f64_v2, double)
#define sh_scores_row_f32_v4(x, d, CT, bias, Kp, out) \
    sh_nearest_f32_v4(x, 0, 1, d, CT, bias, Kp, NULL, NULL, out)
#define sh_scores_row_f64_v2(x, d, CT, bias, Kp, out) \
    sh_nearest_f64_v2(x, 0, 1, d, CT, bias, Kp, NULL, NULL, out)
#endif

/* The widest path this processor runs: 2 AVX-512F, 1 AVX2 + FMA, 0 other. */
static int sh_nearest_level(void)
{
#if SH_NEAREST_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f"))
        return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return 1;
#endif
    return 0;
}

#if SH_NEAREST_X86
#define SH_IF_X86(code) code
#else
#define SH_IF_X86(code)
#endif

/* sh_nearest_f32 / sh_nearest_f64: the widest path `level` allows (S: f32 or
 * f64; P: the portable kernel's suffix). With out == NULL: the best codeword
 * of each row into labels / scores. Otherwise: every score into out (n x Kp,
 * row-major), one row by the row kernel (same numbers); labels and scores
 * are not touched. */
#define SH_NEAREST_DISPATCH(T, S, P)                                              \
static inline void sh_nearest_##S(int level, const T* X, ptrdiff_t ldx, ptrdiff_t n, \
                                  ptrdiff_t d, const T* CT, const T* bias,       \
                                  ptrdiff_t Kp, int32_t* labels, T* scores, T* out) \
{                                                                                \
    if (out && n == 1) {                                                         \
        SH_IF_X86(if (level >= 2) { sh_scores_row_##S##_avx512(X, d, CT, bias, Kp, out); return; }) \
        SH_IF_X86(if (level == 1) { sh_scores_row_##S##_avx2(X, d, CT, bias, Kp, out); return; }) \
        sh_scores_row_##S##_##P(X, d, CT, bias, Kp, out);                        \
        return;                                                                  \
    }                                                                            \
    SH_IF_X86(if (level >= 2) { sh_nearest_##S##_avx512(X, ldx, n, d, CT, bias, Kp, labels, scores, out); return; }) \
    SH_IF_X86(if (level == 1) { sh_nearest_##S##_avx2(X, ldx, n, d, CT, bias, Kp, labels, scores, out); return; }) \
    (void)level;                                                                 \
    sh_nearest_##S##_##P(X, ldx, n, d, CT, bias, Kp, labels, scores, out);       \
}

SH_NEAREST_DISPATCH(float, f32, v4)
SH_NEAREST_DISPATCH(double, f64, v2)

#endif /* SKLEARN_HASH_NEAREST_H */
