/* Kernels only an image encoder's program calls (targets/native/encoder.py): LayerNorm, exact
   GELU, rows gathered, scattered and averaged. The encoder's matmuls, RMSNorms, rotary tables and
   attention are the language model's kernels (edgellm_kernels.c); its attention runs over keys and
   values written to a scratch cache of the call's own rows, each row seeing all of them. */
#include <math.h>
#include <string.h>
#include "edgellm_kernels.h"

#define EM_ENCODER_PARALLEL_FROM 16384

void em_layernorm(const float *x, int rows, int cols, const float *weight, const float *bias, float eps, float *y) {
#pragma omp parallel for schedule(static) if ((size_t)rows * cols >= EM_ENCODER_PARALLEL_FROM)
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * cols;
        float *yr = y + (size_t)r * cols;
        float total = 0.0f, squares = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int c = 0; c < cols; c++) total += xr[c];
        const float mean = total / (float)cols;
#pragma omp simd reduction(+ : squares)
        for (int c = 0; c < cols; c++) squares += (xr[c] - mean) * (xr[c] - mean);
        const float inv = 1.0f / sqrtf(squares / (float)cols + eps);
#pragma omp simd
        for (int c = 0; c < cols; c++) yr[c] = (xr[c] - mean) * inv * weight[c] + bias[c];
    }
}

void em_gelu(const float *x, int n, float *y) {
#pragma omp parallel for simd schedule(static) if (n >= EM_ENCODER_PARALLEL_FROM)
    for (int i = 0; i < n; i++) y[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
}

void em_gather_rows(const float *x, int cols, const int64_t *index, int count, float *y) {
#pragma omp parallel for schedule(static) if ((size_t)count * cols >= EM_ENCODER_PARALLEL_FROM)
    for (int r = 0; r < count; r++) memcpy(y + (size_t)r * cols, x + (size_t)index[r] * cols, sizeof(float) * cols);
}

void em_scatter_rows(const float *x, int cols, const int64_t *index, int count, float *y) {
#pragma omp parallel for schedule(static) if ((size_t)count * cols >= EM_ENCODER_PARALLEL_FROM)
    for (int r = 0; r < count; r++) memcpy(y + (size_t)index[r] * cols, x + (size_t)r * cols, sizeof(float) * cols);
}

void em_mean_rows(const float *x, int groups, int per_group, int cols, float *y) {
#pragma omp parallel for schedule(static) if ((size_t)groups * per_group * cols >= EM_ENCODER_PARALLEL_FROM)
    for (int g = 0; g < groups; g++) {
        float *yg = y + (size_t)g * cols;
        const float *xg = x + (size_t)g * per_group * cols;
        for (int c = 0; c < cols; c++) yg[c] = xg[c];
        for (int r = 1; r < per_group; r++)
#pragma omp simd
            for (int c = 0; c < cols; c++) yg[c] += xg[(size_t)r * cols + c];
#pragma omp simd
        for (int c = 0; c < cols; c++) yg[c] /= (float)per_group;
    }
}

void em_attention_rows(const float *q, const float *k, const float *v, int S, int heads, int head_dim, float scale,
                       em_kv_value *k_scratch, em_kv_value *v_scratch, float *out) {
    const int cache_tokens = (S + 15) / 16 * 16;
    int64_t until[S]; /* every row sees every row */
    for (int s = 0; s < S; s++) until[s] = S;
    em_cache_write_keys(k_scratch, k, S, 0, heads, head_dim, cache_tokens);
    em_cache_write_values(v_scratch, v, S, 0, heads, head_dim, cache_tokens);
    em_attention(q, S, 0, k_scratch, v_scratch, heads, heads, head_dim, cache_tokens, scale, 0.0f, 0, until, out);
}
