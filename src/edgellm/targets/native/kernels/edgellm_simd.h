/* Shared by the kernel sources: the SIMD path chosen from the compiler's target macros, float
   dot products and float16 conversion. */
#ifndef EDGELLM_SIMD_H
#define EDGELLM_SIMD_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "edgellm_kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(__x86_64__) && defined(__GLIBC__) && defined(_OPENMP)
/* glibc's libmvec (which -lm links) has vector expf and tanhf (16 lanes with AVX-512, 8 with
   AVX2); glibc declares them only under -ffast-math. Declared here, `omp simd` loops call them:
   softmax and the MLP activations then no longer cost a libm call per value. */
#pragma omp declare simd notinbranch
float expf(float);
#if __GLIBC_PREREQ(2, 35)
#pragma omp declare simd notinbranch
float tanhf(float);
#endif
#endif
#if defined(__AVX512F__)
#define EM_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define EM_AVX2 1
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#define EM_NEON 1
#endif


static inline int em_blocks(const em_weight *w) { return (w->k + w->block - 1) / w->block; }

/* float16 bits -> float, n of them (a row's block scales or minimums) */
static inline void halves(const uint16_t *h, int n, float *out) {
    int i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    for (; i < n; i++) out[i] = _cvtsh_ss(h[i]);
#elif defined(__aarch64__)
    for (; i < n; i++) {
        __fp16 v;
        memcpy(&v, h + i, 2);
        out[i] = (float)v;
    }
#else
    for (; i < n; i++) {
        const uint32_t sign = (uint32_t)(h[i] & 0x8000) << 16, exponent = (h[i] >> 10) & 31, mantissa = h[i] & 1023;
        float f;
        if (exponent == 0) f = ldexpf((float)mantissa, -24); /* zero and subnormals */
        else if (exponent == 31) f = mantissa ? NAN : INFINITY;
        else f = ldexpf((float)(mantissa | 1024), (int)exponent - 25);
        uint32_t bits;
        memcpy(&bits, &f, 4);
        bits |= sign;
        memcpy(out + i, &bits, 4);
    }
#endif
}

/* float -> float16 bits, rounded to nearest even (as numpy's astype(float16)) */
static inline uint16_t half_bits(float f) {
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#elif defined(__aarch64__)
    const __fp16 h = (__fp16)f;
    uint16_t bits;
    memcpy(&bits, &h, 2);
    return bits;
#else
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000, mantissa = x & 0x7fffff;
    const int biased = (int)((x >> 23) & 0xff), e = biased - 127 + 15;
    if (biased == 0xff) return (uint16_t)(sign | 0x7c00 | (mantissa ? 0x200 : 0)); /* inf, nan */
    if (e >= 31) return (uint16_t)(sign | 0x7c00);                                 /* overflow */
    uint32_t bits, rest, tie;
    if (e <= 0) { /* a subnormal float16, or zero */
        if (e < -10) return (uint16_t)sign;
        const uint32_t m = mantissa | 0x800000;
        const int shift = 14 - e;
        bits = m >> shift;
        rest = m & ((1u << shift) - 1);
        tie = 1u << (shift - 1);
    } else {
        bits = ((uint32_t)e << 10) | (mantissa >> 13);
        rest = mantissa & 0x1fff;
        tie = 0x1000;
    }
    if (rest > tie || (rest == tie && (bits & 1))) bits++; /* a carry moves into the exponent, as it should */
    return (uint16_t)(sign | bits);
#endif
}

/* The KV cache's values (em_kv_value, edgellm_kernels.h): from a float, to a float, 16 at a time.
   A float16 cache saturates at +-65504, the largest float16: a key or value past it would
   become infinite and make the attention's output NaN (NaN itself stays NaN). */
static inline em_kv_value em_kv_store(float x) {
#ifdef EM_KV_FLOAT16
    return half_bits(x > 65504.0f ? 65504.0f : x < -65504.0f ? -65504.0f : x);
#else
    return x;
#endif
}

static inline float em_kv_load(em_kv_value v) {
#ifdef EM_KV_FLOAT16
    float f;
    halves(&v, 1, &f);
    return f;
#else
    return v;
#endif
}

#if EM_AVX512
static inline __m512 em_kv_load16(const em_kv_value *p) {
#ifdef EM_KV_FLOAT16
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#else
    return _mm512_loadu_ps(p);
#endif
}
#endif

/* ---- float dot products ---------------------------------------------------------------- */

static inline float fdot(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0.0f;
#if EM_AVX512
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    s = _mm512_reduce_add_ps(acc);
#elif EM_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_hadd_ps(h, h);
    s = _mm_cvtss_f32(_mm_hadd_ps(h, h));
#elif EM_NEON
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (; i + 4 <= n; i += 4) acc = vfmaq_f32(acc, vld1q_f32(a + i), vld1q_f32(b + i));
    s = vaddvq_f32(acc);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* edgellm_kernels.c: heads [h_first, h_end) of a decode attention's output, from its chunks'
   partial results (em_team_attention's scratch). */
void em_merge_chunks(const float *parts, const em_merge *a, int h_first, int h_end, float *out);

/* One row of a fused matmul's prepared input (em_fusion): out[K] from row s of x (and f->up). */
static inline int em_fusion_rows(const em_fusion *f) { return f->rows > 1 ? f->rows : 1; }

static inline void em_prepare_row(const em_fusion *f, const float *x, int s, int K, float *out) {
    const float *xr = x + (size_t)s * (f->x_stride ? f->x_stride : K);
    switch (f->prologue) {
    case EM_RMSNORM: {
        const float inv = 1.0f / sqrtf(fdot(xr, xr, K) / (float)K + f->eps); /* as em_rmsnorm */
        for (int c = 0; c < K; c++) out[c] = xr[c] * inv * f->norm[c];
        return;
    }
    case EM_SILU_GATE: {
        const float *up = f->up + (size_t)s * (f->up_stride ? f->up_stride : K);
#pragma omp simd
        for (int c = 0; c < K; c++) out[c] = xr[c] * (1.0f / (1.0f + expf(-xr[c]))) * up[c]; /* as em_silu_mul */
        return;
    }
    case EM_GELU_GATE: {
        const float *up = f->up + (size_t)s * (f->up_stride ? f->up_stride : K), k0 = 0.7978845608028654f; /* sqrt(2 / pi) */
#pragma omp simd
        for (int c = 0; c < K; c++)
            out[c] = 0.5f * xr[c] * (1.0f + tanhf(k0 * (xr[c] + 0.044715f * xr[c] * xr[c] * xr[c]))) * up[c];
        return;
    }
    case EM_ATTENTION: { /* x holds the decode attention's chunks; row s is the token at start + s,
                            or at positions[s] (rows of several sessions) */
        em_merge merge = f->merge;
        merge.start = merge.positions ? merge.positions[s] : merge.start + s;
        em_merge_chunks(xr, &merge, 0, merge.heads, out);
        return;
    }
    default:
        memcpy(out, xr, sizeof(float) * K);
    }
}

/* The LoRA branch (em_lora) of a matmul: t[s][c] = scale * A[c] . x'_s for the rows (every thread of
   a team computes t itself: columns x K, small next to N x K), then outputs first..first+count-1
   of a row add sum_c t[c] B[c][n]. */
static inline int em_lora_on(const em_fusion *f) { return f->lora && f->lora->columns > 0; }

/* int8 factors widened to floats 16 (or 8) at a time: plain C loops over them compiled to scalar
   code here (10x slower) */
static inline float em_int8_dot(const int8_t *a, const float *x, int K) {
    float v = 0.0f;
    int k = 0;
#if EM_AVX512
    __m512 acc = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16)
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(a + k)))),
                              _mm512_loadu_ps(x + k), acc);
    v = _mm512_reduce_add_ps(acc);
#elif EM_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(a + k)))),
                              _mm256_loadu_ps(x + k), acc);
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    v = _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
#endif
    for (; k < K; k++) v += (float)a[k] * x[k];
    return v;
}

#if EM_AVX512
/* em_int8_dot of four components at once: four independent sums (one component's chain of
   multiply-adds waits on itself: its latency, not the multipliers, set the pace) and each x
   vector loaded once. Each sum runs in em_int8_dot's order, so the values are the same. */
static inline void em_int8_dot4(const int8_t *a, const float *x, int K, float *out) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        const __m512 xv = _mm512_loadu_ps(x + k);
        for (int i = 0; i < 4; i++)
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(a + (size_t)i * K + k)))),
                                     xv, acc[i]);
    }
    for (int i = 0; i < 4; i++) {
        out[i] = _mm512_reduce_add_ps(acc[i]);
        for (int j = k; j < K; j++) out[i] += (float)a[(size_t)i * K + j] * x[j];
    }
}
#endif

static inline void em_lora_down(const em_lora *l, const float *xp, int rows, int K, float *t) {
    const int C = l->columns;
    for (int s = 0; s < rows; s++) {
        const float *x = xp + (size_t)s * K;
        int c = 0;
#if EM_AVX512
        for (; l->int8 && c + 4 <= C; c += 4) {
            float v[4];
            em_int8_dot4((const int8_t *)l->a + (size_t)c * K, x, K, v);
            for (int i = 0; i < 4; i++) t[(size_t)s * C + c + i] = l->scale * (v[i] * l->a_scale[c + i] * l->b_scale[c + i]);
        }
#endif
        for (; c < C; c++) {
            const float v = l->int8 ? em_int8_dot((const int8_t *)l->a + (size_t)c * K, x, K) * l->a_scale[c] * l->b_scale[c]
                                    : fdot((const float *)l->a + (size_t)c * K, x, K);
            t[(size_t)s * C + c] = l->scale * v;
        }
    }
}

static inline void em_lora_add(const em_lora *l, const float *t, int N, int first, int count, float *y) {
    (void)N;
    const int C = l->panel_offset ? l->panel_columns : l->columns, end = first + count; /* first: a multiple of 16 */
    const float *const t_all = t;
    for (int j = first; j < end; j += 16) {
        const size_t panel = (size_t)(j / 16) * C * 16;
        const int m = end - j < 16 ? end - j : 16;
        t = t_all + (l->panel_offset ? l->panel_offset[j / 16] : 0); /* this panel's components */
        int done = 0;
#if EM_AVX512
        if (l->int8 && m == 16) { /* summed over the components in a register, added to y once */
            __m512 acc = _mm512_setzero_ps();
            const int8_t *b = (const int8_t *)l->b + panel;
            for (int c = 0; c < C; c++, b += 16)
                acc = _mm512_fmadd_ps(_mm512_set1_ps(t[c]),
                                      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)b))), acc);
            _mm512_storeu_ps(y + j, _mm512_add_ps(_mm512_loadu_ps(y + j), acc));
            done = 1;
        }
#elif EM_AVX2
        if (l->int8 && m == 16) {
            __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
            const int8_t *b = (const int8_t *)l->b + panel;
            for (int c = 0; c < C; c++, b += 16) {
                const __m256 tc = _mm256_set1_ps(t[c]);
                lo = _mm256_fmadd_ps(tc, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)b))), lo);
                hi = _mm256_fmadd_ps(tc, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + 8)))), hi);
            }
            _mm256_storeu_ps(y + j, _mm256_add_ps(_mm256_loadu_ps(y + j), lo));
            _mm256_storeu_ps(y + j + 8, _mm256_add_ps(_mm256_loadu_ps(y + j + 8), hi));
            done = 1;
        }
#endif
        if (done) continue;
        float lanes[16] = {0}; /* float factors, a partial last panel, or no vector unit */
        for (int c = 0; c < C; c++) {
            if (l->int8) {
                const int8_t *b = (const int8_t *)l->b + panel + (size_t)c * 16;
                for (int i = 0; i < m; i++) lanes[i] += t[c] * (float)b[i];
            } else {
                const float *b = (const float *)l->b + panel + (size_t)c * 16;
                for (int i = 0; i < m; i++) lanes[i] += t[c] * b[i];
            }
        }
        for (int i = 0; i < m; i++) y[j + i] += lanes[i];
    }
}

/* The LoRA branch's second half for `rows` rows of panel p: y_s += sum_c t_s[c] B[c] (as
   em_lora_add, and in its order per row, so the same values), the panel's int8 B widened once for
   all rows and four rows' sums kept at a time, where em_lora_add widens it again for every row
   (prefill: em_lora_rows, and the int8 matmuls' panels). */
static inline void em_lora_panel_rows(const em_lora *l, const float *t, int rows, int p, int n, float *y) {
    const int first = p * 16, count = n - first < 16 ? n - first : 16, C = l->columns;
    int s = 0;
#if EM_AVX512
    const int PC = l->panel_offset ? l->panel_columns : C, offset = l->panel_offset ? l->panel_offset[p] : 0;
    if (count == 16 && PC <= 64) {
        __m512 b[64];
        for (int c = 0; c < PC; c++) {
            const size_t at = ((size_t)p * PC + c) * 16;
            b[c] = l->int8 ? _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)l->b + at))))
                           : _mm512_loadu_ps((const float *)l->b + at);
        }
        for (; s + 4 <= rows; s += 4) {
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int c = 0; c < PC; c++)
                for (int i = 0; i < 4; i++) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(t[(size_t)(s + i) * C + offset + c]), b[c], acc[i]);
            for (int i = 0; i < 4; i++) {
                float *row = y + (size_t)(s + i) * n + first;
                _mm512_storeu_ps(row, _mm512_add_ps(_mm512_loadu_ps(row), acc[i]));
            }
        }
    }
#endif
    for (; s < rows; s++) em_lora_add(l, t + (size_t)s * C, n, first, count, y + (size_t)s * n);
}

/* edgellm_integer.c: t [rows][columns] of a branch with a_quads, from rows quantized per block of B
   inputs (xq [rows][K], their scales dx and sums xn [rows][blocks]); K and B multiples of 4. */
void em_lora_down_quads(const em_lora *l, int rows, const int8_t *xq, const float *dx, const int32_t *xn, int K, int B,
                        float *t);
/* edgellm_kernels.c: the LoRA branch of S rows (prefill), added to y [S, N] */
void em_lora_rows(const em_lora *l, const float *x, int S, int K, int N, float *y);
/* Its first half: t [S][columns] = scale A x' (malloc'ed: the caller frees it; NULL without memory). */
float *em_lora_rows_down(const em_lora *l, const float *x, int S, int K);

#if EM_AVX512
/* r[j] = row j of a 16 x 16 tile; afterwards r[i] = its column i. */
static inline void em_transpose16(__m512 r[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; i++) { /* pairs of rows interleaved */
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* four rows' values of one column side by side, per 128-bit lane */
        u[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) { /* then the lanes of 8 rows, then of 16 */
        t[i] = _mm512_shuffle_f32x4(u[i], u[4 + i], 0x88);
        t[4 + i] = _mm512_shuffle_f32x4(u[i], u[4 + i], 0xDD);
        t[8 + i] = _mm512_shuffle_f32x4(u[8 + i], u[12 + i], 0x88);
        t[12 + i] = _mm512_shuffle_f32x4(u[8 + i], u[12 + i], 0xDD);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
        r[4 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0x88);
        r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
        r[12 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0xDD);
    }
}
#endif

/* edgellm_amx.c: a matmul of S rows on AMX tiles, bfloat16 weights or integer weights with float
   activations; 0 when it cannot (no AMX, the kernel refuses the tile state, another weight kind,
   too few rows), and the caller runs it otherwise. */
int em_matmul_tiles(const float *x, int S, const em_weight *w, float *y);

/* edgellm_integer.c */
/* S > 1 rows (one row goes through em_team_matmul). */
void em_matmul_integer(const float *x, int S, const em_weight *w, float *y);
/* Several rows with float activations against float32, bfloat16 or integer weights (edgellm_integer.c) */
void em_matmul_rows(const float *x, int S, const em_weight *w, float *y);
/* S rows against integer weights with int8 activations, with the LoRA branch's second half (t:
   em_lora_rows_down's, or NULL) and the residual (or NULL) added to each panel of outputs while
   it is in cache; 0 (nothing done) for other weights. */
int em_matmul_integer_finished(const float *x, int S, const em_weight *w, float *y, const em_lora *lora, const float *t,
                               const float *residual);
/* em_team_matmul on integer weights: the residual is added panel by panel. */
void em_team_matmul_integer(const float *x, const em_weight *w, float *y, const em_fusion *f);
void em_integer_row(const em_weight *w, int n, float *out);
/* Blocks first_block .. end_block - 1 of panel p's stored values (0 .. 2^bits - 1, exact in
   bfloat16) in AMX tiles' pair layout: pair row k / 2, lane j holds row 16p + j's columns k (low
   half) and k + 1 as bfloat16, k counted from the first block's first column; zeros from the last
   column to `width` (AVX-512 only). And block b's 16 scales d and minimums m (weight = d * value + m). */
void em_panel_pairs(const em_weight *w, int p, int first_block, int end_block, int width, uint32_t *pairs);
void em_panel_block(const em_weight *w, int p, int b, float *d, float *m);

#endif
