/* Kernels of edgellm's native target; layouts in edgellm_kernels.h.

   One source, compiled for the target: the SIMD path follows the compiler's target macros
   (-march): AVX-512, AVX2 + FMA, NEON, or portable C. Matmuls are threaded over output rows with
   OpenMP. A decode step (S = 1) dots each integer row with the activations directly, unpacking
   in registers; a prefill call (S > 1) unpacks each weight row once into a float row and dots it
   with all S activation rows, so the unpacking is paid once per call, not once per token.
   Nothing here allocates: scratch lives on the stack (one weight row, one row of scores).
*/
#include "edgellm_kernels.h"

#include <math.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#define EM_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define EM_AVX2 1
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#define EM_NEON 1
#endif

void em_set_threads(int threads) {
#ifdef _OPENMP
    if (threads > 0) omp_set_num_threads(threads);
#else
    (void)threads;
#endif
}

static inline int em_blocks(const em_weight *w) { return (w->k + w->block - 1) / w->block; }

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

/* Four activation rows against one weight row: the weight row is loaded once per four dots. */
static inline void fdot4(const float *w, const float *x, int ldx, int n, float out[4]) {
    int i = 0;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#if EM_AVX512
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 16 <= n; i += 16) {
        __m512 wv = _mm512_loadu_ps(w + i);
        a0 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + ldx + i), a1);
        a2 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + 2 * ldx + i), a2);
        a3 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + 3 * ldx + i), a3);
    }
    s0 = _mm512_reduce_add_ps(a0); s1 = _mm512_reduce_add_ps(a1);
    s2 = _mm512_reduce_add_ps(a2); s3 = _mm512_reduce_add_ps(a3);
#elif EM_AVX2 || EM_NEON
    s0 = fdot(w, x, n); s1 = fdot(w, x + ldx, n); s2 = fdot(w, x + 2 * ldx, n); s3 = fdot(w, x + 3 * ldx, n);
    i = n;
#endif
    for (; i < n; i++) {
        s0 += w[i] * x[i]; s1 += w[i] * x[ldx + i]; s2 += w[i] * x[2 * ldx + i]; s3 += w[i] * x[3 * ldx + i];
    }
    out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
}

/* ---- one weight row: dot with activations (decode) or unpack to floats (prefill) ------- */

/* sum over blocks of scale * (q . x) + minimum * sum(x over the block); xsum holds the sums. */
static float q4_dot(const em_weight *w, int n, const float *x, const float *xsum) {
    const int nb = em_blocks(w), K = w->k, B = w->block;
    const uint8_t *q = (const uint8_t *)w->data + (size_t)n * (K / 2);
    const float *d = w->scale + (size_t)n * nb, *m = w->minimum + (size_t)n * nb;
    float total = 0.0f;
#if EM_AVX512
    const __m512i low = _mm512_set1_epi32(15);
    __m512 acc = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const int k1 = (b + 1) * B < K ? (b + 1) * B : K;
        __m512 bacc = _mm512_setzero_ps();
        for (int k = b * B; k < k1; k += 32) {
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + k / 2)));
            bacc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, low)), _mm512_loadu_ps(x + k), bacc);
            bacc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), _mm512_loadu_ps(x + k + 16), bacc);
        }
        acc = _mm512_fmadd_ps(bacc, _mm512_set1_ps(d[b]), acc);
        total += m[b] * xsum[b];
    }
    total += _mm512_reduce_add_ps(acc);
#elif EM_AVX2
    const __m256i low = _mm256_set1_epi32(15);
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const int k1 = (b + 1) * B < K ? (b + 1) * B : K;
        __m256 bacc = _mm256_setzero_ps();
        for (int k = b * B; k < k1; k += 32) {
            __m128i raw = _mm_loadu_si128((const __m128i *)(q + k / 2));
            __m256i v0 = _mm256_cvtepu8_epi32(raw), v1 = _mm256_cvtepu8_epi32(_mm_srli_si128(raw, 8));
            bacc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v0, low)), _mm256_loadu_ps(x + k), bacc);
            bacc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v1, low)), _mm256_loadu_ps(x + k + 8), bacc);
            bacc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)), _mm256_loadu_ps(x + k + 16), bacc);
            bacc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4)), _mm256_loadu_ps(x + k + 24), bacc);
        }
        acc = _mm256_fmadd_ps(bacc, _mm256_set1_ps(d[b]), acc);
        total += m[b] * xsum[b];
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_hadd_ps(h, h);
    total += _mm_cvtss_f32(_mm_hadd_ps(h, h));
#elif EM_NEON
    float32x4_t acc = vdupq_n_f32(0.0f);
    const uint8x16_t low = vdupq_n_u8(15);
    for (int b = 0; b < nb; b++) {
        const int k1 = (b + 1) * B < K ? (b + 1) * B : K;
        float32x4_t bacc = vdupq_n_f32(0.0f);
        for (int k = b * B; k < k1; k += 32) {
            uint8x16_t raw = vld1q_u8(q + k / 2);
            uint8x16_t halves[2] = {vandq_u8(raw, low), vshrq_n_u8(raw, 4)};
            for (int h = 0; h < 2; h++) {
                uint16x8_t lo16 = vmovl_u8(vget_low_u8(halves[h])), hi16 = vmovl_u8(vget_high_u8(halves[h]));
                const float *xs = x + k + 16 * h;
                bacc = vfmaq_f32(bacc, vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo16))), vld1q_f32(xs));
                bacc = vfmaq_f32(bacc, vcvtq_f32_u32(vmovl_u16(vget_high_u16(lo16))), vld1q_f32(xs + 4));
                bacc = vfmaq_f32(bacc, vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi16))), vld1q_f32(xs + 8));
                bacc = vfmaq_f32(bacc, vcvtq_f32_u32(vmovl_u16(vget_high_u16(hi16))), vld1q_f32(xs + 12));
            }
        }
        acc = vfmaq_n_f32(acc, bacc, d[b]);
        total += m[b] * xsum[b];
    }
    total += vaddvq_f32(acc);
#else
    for (int b = 0; b < nb; b++) {
        const int k1 = (b + 1) * B < K ? (b + 1) * B : K;
        float s = 0.0f;
        for (int k = b * B; k < k1; k += 32)
            for (int j = 0; j < 16; j++) {
                uint8_t byte = q[k / 2 + j];
                s += (float)(byte & 15) * x[k + j] + (float)(byte >> 4) * x[k + 16 + j];
            }
        total += d[b] * s + m[b] * xsum[b];
    }
#endif
    return total;
}

static float q8_dot(const em_weight *w, int n, const float *x, const float *xsum) {
    const int nb = em_blocks(w), K = w->k, B = w->block;
    const int8_t *q = (const int8_t *)w->data + (size_t)n * K;
    const float *d = w->scale + (size_t)n * nb, *m = w->minimum + (size_t)n * nb;
    float total = 0.0f;
    for (int b = 0; b < nb; b++) {
        const int k0 = b * B, k1 = (b + 1) * B < K ? (b + 1) * B : K;
        int k = k0;
        float s = 0.0f;
#if EM_AVX512
        __m512 bacc = _mm512_setzero_ps();
        for (; k + 16 <= k1; k += 16)
            bacc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + k)))),
                                   _mm512_loadu_ps(x + k), bacc);
        s = _mm512_reduce_add_ps(bacc);
#elif EM_AVX2
        __m256 bacc = _mm256_setzero_ps();
        for (; k + 8 <= k1; k += 8)
            bacc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + k)))),
                                   _mm256_loadu_ps(x + k), bacc);
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(bacc), _mm256_extractf128_ps(bacc, 1));
        h = _mm_hadd_ps(h, h);
        s = _mm_cvtss_f32(_mm_hadd_ps(h, h));
#endif
        for (; k < k1; k++) s += (float)q[k] * x[k];
        total += d[b] * s + m[b] * xsum[b];
    }
    return total;
}

static float bf16_dot(const em_weight *w, int n, const float *x) {
    const int K = w->k;
    const uint16_t *r = (const uint16_t *)w->data + (size_t)n * K;
    int k = 0;
    float s = 0.0f;
#if EM_AVX512
    __m512 acc = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) {
        __m512i v = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(r + k))), 16);
        acc = _mm512_fmadd_ps(_mm512_castsi512_ps(v), _mm512_loadu_ps(x + k), acc);
    }
    s = _mm512_reduce_add_ps(acc);
#endif
    for (; k < K; k++) {
        uint32_t bits = (uint32_t)r[k] << 16;
        float f;
        memcpy(&f, &bits, 4);
        s += f * x[k];
    }
    return s;
}

/* Weight row n as floats (prefill and embedding lookups). */
static void unpack_row(const em_weight *w, int n, float *out) {
    const int K = w->k;
    if (w->kind == EM_F32) {
        memcpy(out, (const float *)w->data + (size_t)n * K, sizeof(float) * K);
    } else if (w->kind == EM_BF16) {
        const uint16_t *r = (const uint16_t *)w->data + (size_t)n * K;
        for (int k = 0; k < K; k++) {
            uint32_t bits = (uint32_t)r[k] << 16;
            memcpy(out + k, &bits, 4);
        }
    } else {
        const int nb = em_blocks(w), B = w->block;
        const float *d = w->scale + (size_t)n * nb, *m = w->minimum + (size_t)n * nb;
        if (w->kind == EM_Q4) {
            const uint8_t *q = (const uint8_t *)w->data + (size_t)n * (K / 2);
            for (int k = 0; k < K; k += 32)
                for (int j = 0; j < 16; j++) {
                    const int b0 = (k + j) / B, b1 = (k + 16 + j) / B;
                    out[k + j] = d[b0] * (float)(q[k / 2 + j] & 15) + m[b0];
                    out[k + 16 + j] = d[b1] * (float)(q[k / 2 + j] >> 4) + m[b1];
                }
        } else {
            const int8_t *q = (const int8_t *)w->data + (size_t)n * K;
            for (int k = 0; k < K; k++) out[k] = d[k / B] * (float)q[k] + m[k / B];
        }
    }
}

static void block_sums(const float *x, int K, int B, float *xsum) {
    for (int b = 0, k = 0; k < K; b++) {
        const int k1 = k + B < K ? k + B : K;
        float s = 0.0f;
        for (; k < k1; k++) s += x[k];
        xsum[b] = s;
    }
}

void em_matmul(const float *x, int S, const em_weight *w, float *y) {
    const int N = w->n, K = w->k;
    if (S == 1) {
        const int integer = w->kind == EM_Q4 || w->kind == EM_Q8;
        float xsum[integer ? em_blocks(w) : 1];
        if (integer) block_sums(x, K, w->block, xsum);
#pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++) {
            switch (w->kind) {
            case EM_Q4: y[n] = q4_dot(w, n, x, xsum); break;
            case EM_Q8: y[n] = q8_dot(w, n, x, xsum); break;
            case EM_BF16: y[n] = bf16_dot(w, n, x); break;
            default: y[n] = fdot((const float *)w->data + (size_t)n * K, x, K);
            }
        }
        return;
    }
#pragma omp parallel
    {
        float row[K];
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            const float *wr = row;
            if (w->kind == EM_F32) wr = (const float *)w->data + (size_t)n * K;
            else unpack_row(w, n, row);
            int s = 0;
            for (; s + 4 <= S; s += 4) {
                float out[4];
                fdot4(wr, x + (size_t)s * K, K, K, out);
                for (int i = 0; i < 4; i++) y[(size_t)(s + i) * N + n] = out[i];
            }
            for (; s < S; s++) y[(size_t)s * N + n] = fdot(wr, x + (size_t)s * K, K);
        }
    }
}

void em_embed(const int64_t *ids, int S, const em_weight *w, float *out) {
    for (int s = 0; s < S; s++) unpack_row(w, (int)ids[s], out + (size_t)s * w->k);
}

/* ---- the rest of a layer ------------------------------------------------------------- */

void em_rmsnorm(const float *x, int rows, int cols, const float *weight, float eps, float *y) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * cols;
        float *yr = y + (size_t)r * cols;
        const float inv = 1.0f / sqrtf(fdot(xr, xr, cols) / (float)cols + eps);
        for (int c = 0; c < cols; c++) yr[c] = xr[c] * inv * weight[c];
    }
}

void em_rope(const float *x, int S, int start, int heads, int head_dim, int rotary_dim,
             const float *cos_table, const float *sin_table, float *y) {
    const int half = rotary_dim / 2;
    for (int s = 0; s < S; s++) {
        const float *c = cos_table + (size_t)(start + s) * half, *sn = sin_table + (size_t)(start + s) * half;
        for (int h = 0; h < heads; h++) {
            const float *xh = x + ((size_t)s * heads + h) * head_dim;
            float *yh = y + ((size_t)s * heads + h) * head_dim;
            for (int i = 0; i < half; i++) {
                const float a = xh[i], b = xh[i + half];
                yh[i] = a * c[i] - b * sn[i];
                yh[i + half] = b * c[i] + a * sn[i];
            }
            for (int i = rotary_dim; i < head_dim; i++) yh[i] = xh[i];
        }
    }
}

void em_cache_write(float *cache, const float *rows, int S, int start, int kv_width) {
    memcpy(cache + (size_t)start * kv_width, rows, sizeof(float) * (size_t)S * kv_width);
}

void em_attention(const float *q, int S, int start, const float *k_cache, const float *v_cache,
                  int heads, int kv_heads, int head_dim, float scale, float softcap, int window,
                  float *out) {
    const int group = heads / kv_heads, kv_width = kv_heads * head_dim;
#pragma omp parallel for collapse(2) schedule(static)
    for (int s = 0; s < S; s++) {
        for (int h = 0; h < heads; h++) {
            const int p = start + s;
            const int first = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
            const float *qh = q + ((size_t)s * heads + h) * head_dim;
            const float *kh = k_cache + (size_t)(h / group) * head_dim, *vh = v_cache + (size_t)(h / group) * head_dim;
            float *o = out + ((size_t)s * heads + h) * head_dim;
            float scores[p - first + 1];
            float top = -INFINITY;
            for (int j = first; j <= p; j++) {
                float a = fdot(qh, kh + (size_t)j * kv_width, head_dim) * scale;
                if (softcap > 0.0f) a = softcap * tanhf(a / softcap);
                scores[j - first] = a;
                if (a > top) top = a;
            }
            float total = 0.0f;
            for (int j = 0; j <= p - first; j++) total += (scores[j] = expf(scores[j] - top));
            const float inv = 1.0f / total;
            for (int i = 0; i < head_dim; i++) o[i] = 0.0f;
            for (int j = first; j <= p; j++) {
                const float a = scores[j - first] * inv;
                const float *vj = vh + (size_t)j * kv_width;
                for (int i = 0; i < head_dim; i++) o[i] += a * vj[i];
            }
        }
    }
}

/* ---- elementwise ---------------------------------------------------------------------- */

void em_add(const float *a, const float *b, int n, float *y) { for (int i = 0; i < n; i++) y[i] = a[i] + b[i]; }
void em_mul(const float *a, const float *b, int n, float *y) { for (int i = 0; i < n; i++) y[i] = a[i] * b[i]; }
void em_scale(const float *x, int n, float c, float *y) { for (int i = 0; i < n; i++) y[i] = x[i] * c; }
void em_sigmoid(const float *x, int n, float *y) { for (int i = 0; i < n; i++) y[i] = 1.0f / (1.0f + expf(-x[i])); }
void em_tanh(const float *x, int n, float *y) { for (int i = 0; i < n; i++) y[i] = tanhf(x[i]); }
void em_copy(const float *x, int n, float *y) { if (x != y) memmove(y, x, sizeof(float) * (size_t)n); }

void em_gelu_tanh(const float *x, int n, float *y) {
    const float c = 0.7978845608028654f; /* sqrt(2 / pi) */
    for (int i = 0; i < n; i++) y[i] = 0.5f * x[i] * (1.0f + tanhf(c * (x[i] + 0.044715f * x[i] * x[i] * x[i])));
}

void em_add_row(const float *x, int rows, int cols, const float *row, float *y) {
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) y[(size_t)r * cols + c] = x[(size_t)r * cols + c] + row[c];
}

void em_columns(const float *x, int rows, int cols, int first, int width, float *y) {
    for (int r = 0; r < rows; r++) memcpy(y + (size_t)r * width, x + (size_t)r * cols + first, sizeof(float) * width);
}

void em_gather_columns(const float *x, int rows, int cols, const int64_t *index, int n, float *y) {
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < n; j++) y[(size_t)r * n + j] = x[(size_t)r * cols + index[j]];
}
