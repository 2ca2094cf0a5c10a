/* Kernels of edgellm's native target, all but the integer matmuls (edgellm_integer.c); layouts
   in edgellm_kernels.h.

   Compiled for the target: the SIMD path follows the compiler's target macros (-march), see
   edgellm_simd.h. Matmuls are threaded over output rows with OpenMP. Nothing here allocates:
   scratch lives on the stack (one weight row, one row of attention scores).
*/
#include "edgellm_simd.h"

void em_set_threads(int threads) { em_set_threads_(threads); }

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

/* ---- float weights (FP32, BF16): one output row per weight row ---------------------- */

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

/* Row n of a float weight (prefill and embedding lookups). */
static void float_row(const em_weight *w, int n, float *out) {
    const int K = w->k;
    if (w->kind == EM_F32) {
        memcpy(out, (const float *)w->data + (size_t)n * K, sizeof(float) * K);
        return;
    }
    const uint16_t *r = (const uint16_t *)w->data + (size_t)n * K;
    for (int k = 0; k < K; k++) {
        uint32_t bits = (uint32_t)r[k] << 16;
        memcpy(out + k, &bits, 4);
    }
}

void em_matmul(const float *x, int S, const em_weight *w, float *y) {
    const int N = w->n, K = w->k;
    if (w->kind == EM_Q4 || w->kind == EM_Q8) {
        em_matmul_integer(x, S, w, y);
        return;
    }
    if (S == 1) {
#pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++)
            y[n] = w->kind == EM_BF16 ? bf16_dot(w, n, x) : fdot((const float *)w->data + (size_t)n * K, x, K);
        return;
    }
#pragma omp parallel
    {
        float row[K];
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            const float *wr = row;
            if (w->kind == EM_F32) wr = (const float *)w->data + (size_t)n * K;
            else float_row(w, n, row);
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
    for (int s = 0; s < S; s++) {
        if (w->kind == EM_Q4 || w->kind == EM_Q8) em_integer_row(w, (int)ids[s], out + (size_t)s * w->k);
        else float_row(w, (int)ids[s], out + (size_t)s * w->k);
    }
}

/* ---- the rest of a layer ------------------------------------------------------------- */

/* Elementwise work of a prefill call is worth a second thread; a decode step's is not. */
#define EM_PARALLEL_FROM 16384

void em_rmsnorm(const float *x, int rows, int cols, const float *weight, float eps, float *y) {
#pragma omp parallel for schedule(static) if (rows * cols >= EM_PARALLEL_FROM)
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
#pragma omp parallel for schedule(static) if (S * heads * head_dim >= EM_PARALLEL_FROM)
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

void em_add(const float *a, const float *b, int n, float *y) {
#pragma omp parallel for schedule(static) if (n >= EM_PARALLEL_FROM)
    for (int i = 0; i < n; i++) y[i] = a[i] + b[i];
}

void em_mul(const float *a, const float *b, int n, float *y) {
#pragma omp parallel for schedule(static) if (n >= EM_PARALLEL_FROM)
    for (int i = 0; i < n; i++) y[i] = a[i] * b[i];
}

void em_scale(const float *x, int n, float c, float *y) {
#pragma omp parallel for schedule(static) if (n >= EM_PARALLEL_FROM)
    for (int i = 0; i < n; i++) y[i] = x[i] * c;
}

void em_sigmoid(const float *x, int n, float *y) {
#pragma omp parallel for schedule(static) if (n >= EM_PARALLEL_FROM)
    for (int i = 0; i < n; i++) y[i] = 1.0f / (1.0f + expf(-x[i]));
}

void em_tanh(const float *x, int n, float *y) {
#pragma omp parallel for schedule(static) if (n >= EM_PARALLEL_FROM)
    for (int i = 0; i < n; i++) y[i] = tanhf(x[i]);
}

void em_copy(const float *x, int n, float *y) { if (x != y) memmove(y, x, sizeof(float) * (size_t)n); }

void em_gelu_tanh(const float *x, int n, float *y) {
    const float c = 0.7978845608028654f; /* sqrt(2 / pi) */
#pragma omp parallel for schedule(static) if (n >= EM_PARALLEL_FROM)
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
