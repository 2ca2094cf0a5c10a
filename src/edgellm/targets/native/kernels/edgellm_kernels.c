/* Kernels of edgellm's native target, all but the integer matmuls (edgellm_integer.c); layouts
   in edgellm_kernels.h.

   Compiled for the target: the SIMD path follows the compiler's target macros (-march), see
   edgellm_simd.h. Matmuls are threaded over output rows with OpenMP. Nothing here allocates but
   em_lora_rows (a LoRA branch over several rows: its widened factors; without memory, row by row);
   scratch lives on the stack (one weight row, one row of attention scores).
*/
#include <stdlib.h>
#include "edgellm_simd.h"

void em_set_threads(int threads) {
#ifdef _OPENMP
    if (threads > 0) omp_set_num_threads(threads);
#else
    (void)threads;
#endif
}

int em_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
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

/* ---- codebook weights: one row per output, indices in groups of 16 -------------------- */

static inline int cb_bits(const em_weight *w) { return w->kind - EM_CB2 + 2; }

/* Index i (0..15) of the group at g: the layout in edgellm_kernels.h. */
static inline int cb_index(const uint8_t *g, int bits, int i) {
    uint32_t low, high = 0;
    memcpy(&low, g, 4);
    int index = (low >> (2 * i)) & 3;
    if (bits == 4) {
        memcpy(&high, g + 4, 4);
        index |= ((high >> (2 * i)) & 3) << 2;
    } else if (bits == 3) {
        uint16_t h;
        memcpy(&h, g + 4, 2);
        index |= ((h >> i) & 1) << 2;
    }
    return index;
}

/* A group's index bits at once: the low two bits of its 16 indices, and the high bits (cb4: 2 per
   index, cb3: 1 per index, cb2: none). */
static inline void cb_group_bits(const uint8_t *g, int bits, uint32_t *low, uint32_t *high) {
    memcpy(low, g, 4);
    *high = 0;
    if (bits == 4) memcpy(high, g + 4, 4);
    else if (bits == 3) {
        uint16_t h;
        memcpy(&h, g + 4, 2);
        *high = h;
    }
}

static void cb_row(const em_weight *w, int n, float *out) {
    const int K = w->k, B = w->block, bits = cb_bits(w), entries = 1 << bits, nb = em_blocks(w);
    const uint8_t *row = (const uint8_t *)w->data + (size_t)n * K / 16 * 2 * bits;
    for (int b = 0; b < nb; b++) {
        float book[16];
        halves(w->scale + ((size_t)n * nb + b) * entries, entries, book);
        const int end = (b + 1) * B < K ? (b + 1) * B : K;
        for (int k = b * B; k < end; k++) out[k] = book[cb_index(row + k / 16 * 2 * bits, bits, k % 16)];
    }
}

/* Lookup-table dot products: the 16 indices of a group become 16 weights by permuting the
   block's codebook held in registers (decode; prefill decodes whole rows with cb_row). */
#if EM_AVX512
#define EM_CB_DOT 1
/* one vpermps per 16 weights */
static float cb_dot(const em_weight *w, int n, const float *x) {
    const int K = w->k, B = w->block, bits = cb_bits(w), entries = 1 << bits, nb = em_blocks(w);
    const uint8_t *row = (const uint8_t *)w->data + (size_t)n * K / 16 * 2 * bits;
    const __m512i two_bit = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i one_bit = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i three = _mm512_set1_epi32(3), one = _mm512_set1_epi32(1);
    __m512 acc = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        float book[16] = {0};
        halves(w->scale + ((size_t)n * nb + b) * entries, entries, book);
        const __m512 table = _mm512_loadu_ps(book);
        const int end = (b + 1) * B < K ? (b + 1) * B : K;
        for (int k = b * B; k < end; k += 16) {
            uint32_t low, high;
            cb_group_bits(row + k / 16 * 2 * bits, bits, &low, &high);
            __m512i index = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)low), two_bit), three);
            if (bits == 4)
                index = _mm512_or_si512(index, _mm512_slli_epi32(
                    _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)high), two_bit), three), 2));
            else if (bits == 3)
                index = _mm512_or_si512(index, _mm512_slli_epi32(
                    _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)high), one_bit), one), 2));
            acc = _mm512_fmadd_ps(_mm512_permutexvar_ps(index, table), _mm512_loadu_ps(x + k), acc);
        }
    }
    return _mm512_reduce_add_ps(acc);
}
#elif EM_AVX2
#define EM_CB_DOT 1
/* 8 weights per vpermps: codebooks of up to 8 entries in one register, 16 entries in two with
   the index's bit 3 choosing between them (vblendvps reads it as the sign bit). */
static float cb_dot(const em_weight *w, int n, const float *x) {
    const int K = w->k, B = w->block, bits = cb_bits(w), entries = 1 << bits, nb = em_blocks(w);
    const uint8_t *row = (const uint8_t *)w->data + (size_t)n * K / 16 * 2 * bits;
    const __m256i two_bit = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14), one_bit = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i three = _mm256_set1_epi32(3), one = _mm256_set1_epi32(1);
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        float book[16] = {0};
        halves(w->scale + ((size_t)n * nb + b) * entries, entries, book);
        const __m256 low_book = _mm256_loadu_ps(book), high_book = _mm256_loadu_ps(book + 8);
        const int end = (b + 1) * B < K ? (b + 1) * B : K;
        for (int k = b * B; k < end; k += 16) {
            uint32_t low, high;
            cb_group_bits(row + k / 16 * 2 * bits, bits, &low, &high);
            for (int half = 0; half < 2; half++) { /* weights 8 half .. 8 half + 7 */
                __m256i index = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)(low >> (16 * half))), two_bit), three);
                if (bits == 4)
                    index = _mm256_or_si256(index, _mm256_slli_epi32(_mm256_and_si256(
                        _mm256_srlv_epi32(_mm256_set1_epi32((int)(high >> (16 * half))), two_bit), three), 2));
                else if (bits == 3)
                    index = _mm256_or_si256(index, _mm256_slli_epi32(_mm256_and_si256(
                        _mm256_srlv_epi32(_mm256_set1_epi32((int)(high >> (8 * half))), one_bit), one), 2));
                __m256 weights = _mm256_permutevar8x32_ps(low_book, index);
                if (bits == 4)
                    weights = _mm256_blendv_ps(weights, _mm256_permutevar8x32_ps(high_book, index),
                                               _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
                acc = _mm256_fmadd_ps(weights, _mm256_loadu_ps(x + k + 8 * half), acc);
            }
        }
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    return ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
}
#elif EM_NEON && defined(__aarch64__)
#define EM_CB_DOT 1
/* 4 weights per table lookup: the block's codebook is 64 bytes in four registers, and weight
   i's 4 bytes are at 4 index .. 4 index + 3 (tbl, bytes in little-endian order). */
static float cb_dot(const em_weight *w, int n, const float *x) {
    const int K = w->k, B = w->block, bits = cb_bits(w), entries = 1 << bits, nb = em_blocks(w);
    const uint8_t *row = (const uint8_t *)w->data + (size_t)n * K / 16 * 2 * bits;
    const int32_t two_bit[4] = {0, -2, -4, -6}, one_bit[4] = {0, -1, -2, -3}; /* right shifts */
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (int b = 0; b < nb; b++) {
        float book[16] = {0};
        halves(w->scale + ((size_t)n * nb + b) * entries, entries, book);
        const uint8x16x4_t table = {{vld1q_u8((const uint8_t *)book), vld1q_u8((const uint8_t *)book + 16),
                                     vld1q_u8((const uint8_t *)book + 32), vld1q_u8((const uint8_t *)book + 48)}};
        const int end = (b + 1) * B < K ? (b + 1) * B : K;
        for (int k = b * B; k < end; k += 16) {
            uint32_t low, high;
            cb_group_bits(row + k / 16 * 2 * bits, bits, &low, &high);
            for (int q = 0; q < 4; q++) { /* weights 4q .. 4q + 3 */
                uint32x4_t index = vandq_u32(vshlq_u32(vdupq_n_u32(low >> (8 * q)), vld1q_s32(two_bit)), vdupq_n_u32(3));
                if (bits == 4)
                    index = vorrq_u32(index, vshlq_n_u32(vandq_u32(vshlq_u32(vdupq_n_u32(high >> (8 * q)), vld1q_s32(two_bit)),
                                                                   vdupq_n_u32(3)), 2));
                else if (bits == 3)
                    index = vorrq_u32(index, vshlq_n_u32(vandq_u32(vshlq_u32(vdupq_n_u32(high >> (4 * q)), vld1q_s32(one_bit)),
                                                                   vdupq_n_u32(1)), 2));
                const uint32x4_t bytes = vaddq_u32(vmulq_n_u32(index, 4 * 0x01010101u), vdupq_n_u32(0x03020100u));
                const float32x4_t weights = vreinterpretq_f32_u8(vqtbl4q_u8(table, vreinterpretq_u8_u32(bytes)));
                acc = vfmaq_f32(acc, weights, vld1q_f32(x + k + 4 * q));
            }
        }
    }
    return vaddvq_f32(acc);
}
#endif

/* Row n of a float or codebook weight (prefill and embedding lookups). */
static void float_row(const em_weight *w, int n, float *out) {
    const int K = w->k;
    if ((w->kind >= EM_CB2 && w->kind <= EM_CB4)) {
        cb_row(w, n, out);
        return;
    }
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

/* Rows from which a float32 or bfloat16 matmul widens its weights into panels (em_matmul_rows):
   without AVX-512 the widening is scalar loops, worth it only for more rows. */
#if EM_AVX512
#define EM_PANEL_ROWS_FROM 8
#else
#define EM_PANEL_ROWS_FROM 32
#endif

void em_matmul(const float *x, int S, const em_weight *w, float *y) {
    const int N = w->n, K = w->k;
    if (S == 1) {
        const em_fusion plain = {EM_INPUT, NULL, 0.0f, NULL, NULL, NULL, {0, 0, 0, 0, 0}};
#pragma omp parallel
        em_team_matmul(x, w, y, &plain);
        return;
    }
    if (em_integer_kind(w->kind)) {
        em_matmul_integer(x, S, w, y);
        return;
    }
    if (S >= EM_PANEL_ROWS_FROM && (w->kind == EM_F32 || w->kind == EM_BF16)) { /* a weight panel against 8 rows at a time */
        if (!em_matmul_tiles(x, S, w, y)) em_matmul_rows(x, S, w, y);
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

void em_team_matmul(const float *x, const em_weight *w, float *y, const em_fusion *f) {
    if (em_integer_kind(w->kind)) {
        em_team_matmul_integer(x, w, y, f);
        return;
    }
    const int N = w->n, K = w->k, rows = em_fusion_rows(f);
    const size_t ys = f->y_stride ? (size_t)f->y_stride : (size_t)N, rs = f->residual_stride ? (size_t)f->residual_stride : (size_t)N;
    float xp[(size_t)rows * K]; /* each thread prepares the input for itself: no barrier before the rows */
    for (int s = 0; s < rows; s++) em_prepare_row(f, x, s, K, xp + (size_t)s * K);
    const int C = em_lora_on(f) ? f->lora->columns : 0;
    float t[(size_t)rows * C + 1];
    if (C) em_lora_down(f->lora, xp, rows, K, t);
#if !EM_CB_DOT
    float row[K]; /* a codebook row, decoded */
#endif
#pragma omp for schedule(static)
    for (int n = 0; n < N; n++) {
#if !EM_CB_DOT
        if ((w->kind >= EM_CB2 && w->kind <= EM_CB4)) cb_row(w, n, row);
#endif
        for (int s = 0; s < rows; s++) { /* the weight row stays in cache for every row */
            const float *xs = xp + (size_t)s * K;
            float v;
            if (w->kind == EM_F32) v = fdot((const float *)w->data + (size_t)n * K, xs, K);
            else if (w->kind == EM_BF16) v = bf16_dot(w, n, xs);
            else {
#if EM_CB_DOT
                v = cb_dot(w, n, xs);
#else
                v = fdot(row, xs, K);
#endif
            }
            y[s * ys + n] = f->residual ? v + f->residual[s * rs + n] : v;
        }
    }
    if (C) { /* the branch over runs of outputs (float weights are not the fast path: one more barrier) */
#pragma omp for schedule(static)
        for (int first = 0; first < N; first += 64)
            for (int s = 0; s < rows; s++)
                em_lora_add(f->lora, t + (size_t)s * C, N, first, N - first < 64 ? N - first : 64, y + s * ys);
    }
}

void em_embed(const int64_t *ids, int S, const em_weight *w, float *out) {
    for (int s = 0; s < S; s++) {
        if (ids[s] < 0) continue; /* an embedding row the caller gives (em_embedding_rows) */
        if (em_integer_kind(w->kind)) em_integer_row(w, (int)ids[s], out + (size_t)s * w->k);
        else float_row(w, (int)ids[s], out + (size_t)s * w->k);
    }
}

void em_embedding_rows(const int64_t *ids, const float *embeddings, int S, int hidden, float *out) {
    if (!embeddings) return;
    for (int s = 0; s < S; s++)
        if (ids[s] < 0) memcpy(out + (size_t)s * hidden, embeddings + (size_t)s * hidden, sizeof(float) * (size_t)hidden);
}

/* ---- the rest of a layer ------------------------------------------------------------- */

void em_matmul_fused(const float *x, int S, const em_weight *w, float *y, const em_fusion *f) {
    if (S == 1) {
#pragma omp parallel
        em_team_matmul(x, w, y, f);
        return;
    }
    /* Several rows: the steps one after another, the prepared input shared through the scratch. */
    if (f->prologue != EM_INPUT) {
#pragma omp parallel for schedule(static)
        for (int s = 0; s < S; s++) em_prepare_row(f, x, s, w->k, f->scratch + (size_t)s * w->k);
        x = f->scratch;
    }
    if (em_integer_kind(w->kind) && w->int8_activations) { /* branch and residual inside the panels */
        /* (a branch with a_quads computes t from the rows the matmul quantizes) */
        float *t = em_lora_on(f) && !f->lora->a_quads ? em_lora_rows_down(f->lora, x, S, w->k) : NULL;
        if (!em_lora_on(f) || f->lora->a_quads || t) {
            em_matmul_integer_finished(x, S, w, y, f->lora, t, f->residual);
            free(t);
            return;
        }
    }
    em_matmul(x, S, w, y);
    if (em_lora_on(f)) em_lora_rows(f->lora, x, S, w->k, w->n, y);
    if (f->residual) em_add(y, f->residual, S * w->n, y);
}

/* The LoRA branch of S rows (a prefill call), its first half: the factors widened to floats once
   for all rows, then t = scale A x' for every row, four rows per pass over a component. */
float *em_lora_rows_down(const em_lora *l, const float *x, int S, int K) {
    const int C = l->columns;
    float *a = malloc(sizeof(float) * (size_t)C * K), *t = malloc(sizeof(float) * (size_t)S * C);
    if (!a || !t) {
        free(a);
        free(t);
        return NULL;
    }
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int c = 0; c < C; c++) {
            const float scale = l->int8 ? l->scale * l->a_scale[c] * l->b_scale[c] : l->scale;
            for (int k = 0; k < K; k++)
                a[(size_t)c * K + k] = scale * (l->int8 ? (float)((const int8_t *)l->a)[(size_t)c * K + k]
                                                        : ((const float *)l->a)[(size_t)c * K + k]);
        }
#pragma omp for schedule(static)
        for (int c = 0; c < C; c++) {
            const float *ac = a + (size_t)c * K;
            int s = 0;
            for (; s + 4 <= S; s += 4) {
                float out[4];
                fdot4(ac, x + (size_t)s * K, K, K, out);
                for (int i = 0; i < 4; i++) t[(size_t)(s + i) * C + c] = out[i];
            }
            for (; s < S; s++) t[(size_t)s * C + c] = fdot(ac, x + (size_t)s * K, K);
        }
    }
    free(a);
    return t;
}

/* The whole branch of S rows, added to y: t, then each panel of 16 outputs of B, widened once,
   against every row's t (one row at a time, as in decode, would widen the factors S times). An
   int8-activation integer matmul instead adds t . B inside its own panels (em_matmul_fused). */
void em_lora_rows(const em_lora *l, const float *x, int S, int K, int N, float *y) {
    const int C = l->columns, panels = (N + 15) / 16;
    float *t = em_lora_rows_down(l, x, S, K);
    if (!t) { /* no memory for the shortcut: one row at a time */
        for (int s = 0; s < S; s++) {
            float row[C];
            em_lora_down(l, x + (size_t)s * K, 1, K, row);
            em_lora_add(l, row, N, 0, N, y + (size_t)s * N);
        }
        return;
    }
#pragma omp parallel for schedule(static)
    for (int p = 0; p < panels; p++) em_lora_panel_rows(l, t, S, p, N, y);
    free(t);
}

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

/* One head at position p: the halves of the first rotary_dim columns rotated, the rest copied. */
static inline void rope_head(const float *x, int p, int head_dim, int rotary_dim, const float *cos_table,
                             const float *sin_table, float *y) {
    const int half = rotary_dim / 2;
    const float *c = cos_table + (size_t)p * half, *sn = sin_table + (size_t)p * half;
    for (int i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        y[i] = a * c[i] - b * sn[i];
        y[i + half] = b * c[i] + a * sn[i];
    }
    for (int i = rotary_dim; i < head_dim; i++) y[i] = x[i];
}

void em_rope(const float *x, int S, int start, int heads, int head_dim, int rotary_dim,
             const float *cos_table, const float *sin_table, float *y) {
#pragma omp parallel for schedule(static) if (S * heads * head_dim >= EM_PARALLEL_FROM)
    for (int s = 0; s < S; s++)
        for (int h = 0; h < heads; h++)
            rope_head(x + ((size_t)s * heads + h) * head_dim, start + s, head_dim, rotary_dim, cos_table, sin_table,
                      y + ((size_t)s * heads + h) * head_dim);
}

void em_rope_rows(const int64_t *rope, int S, const float *table, int half, int first, int second, float *out) {
    for (int s = 0; s < S; s++)
        for (int d = 0; d < half; d++) {
            const int which = d < first ? 0 : d < first + second ? 1 : 2;
            out[(size_t)s * half + d] = table[(size_t)rope[3 * s + which] * half + d];
        }
}

/* Both caches keep each KV head's positions together (kernels/edgellm_kernels.h): one head's
   context is one contiguous run of memory, which the prefetcher and the TLB both handle. */
static inline void store_value(em_kv_value *cache, int h, int p, const float *row, int head_dim, int cache_tokens) {
    em_kv_value *dst = cache + ((size_t)h * cache_tokens + p) * head_dim;
    for (int d = 0; d < head_dim; d++) dst[d] = em_kv_store(row[d]);
}

static inline void store_key(em_kv_value *cache, int h, int p, const float *row, int head_dim, int cache_tokens) {
    em_kv_value *block = cache + (size_t)h * cache_tokens * head_dim + (size_t)(p / 16) * 16 * head_dim + p % 16;
    for (int d = 0; d < head_dim; d++) block[16 * d] = em_kv_store(row[d]);
}

void em_cache_write_values(em_kv_value *cache, const float *rows, int S, int start, int kv_heads, int head_dim,
                           int cache_tokens) {
    for (int s = 0; s < S; s++)
        for (int h = 0; h < kv_heads; h++)
            store_value(cache, h, start + s, rows + ((size_t)s * kv_heads + h) * head_dim, head_dim, cache_tokens);
}

void em_cache_write_keys(em_kv_value *cache, const float *rows, int S, int start, int kv_heads, int head_dim,
                         int cache_tokens) {
    for (int s = 0; s < S; s++)
        for (int h = 0; h < kv_heads; h++)
            store_key(cache, h, start + s, rows + ((size_t)s * kv_heads + h) * head_dim, head_dim, cache_tokens);
}

/* Query vectors one attention item handles: the heads sharing a KV head, for one token (decode)
   or a tile of tokens (prefill), so each key and value read serves all of them. */
#define EM_MAX_QUERIES 24

#if EM_AVX512
/* Scores of R (a constant, so the sums stay in registers) query vectors against one block of 16
   keys (block[16 * d + i] = dimension d of position i): a vector of 16 positions per dimension,
   no horizontal sums. */
static inline __attribute__((always_inline)) void scores_block(const float *const *q, int head_dim,
                                                                const em_kv_value *block, float *out, int stride,
                                                                const int R) {
    __m512 acc[8];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int d = 0; d < head_dim; d++) {
        const __m512 kv = em_kv_load16(block + 16 * d);
        for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(kv, _mm512_set1_ps(q[r][d]), acc[r]);
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(out + (size_t)r * stride, acc[r]);
}
#endif

/* Scores of R query vectors against the 16 keys of one block, out[r * stride + i]. */
static void scores16(const float *const *q, int R, int head_dim, const em_kv_value *block, float *out, int stride) {
#if EM_AVX512
    for (int r0 = 0; r0 < R; r0 += 8, q += 8, out += (size_t)8 * stride)
        switch (R - r0 < 8 ? R - r0 : 8) {
        case 1: scores_block(q, head_dim, block, out, stride, 1); break;
        case 2: scores_block(q, head_dim, block, out, stride, 2); break;
        case 3: scores_block(q, head_dim, block, out, stride, 3); break;
        case 4: scores_block(q, head_dim, block, out, stride, 4); break;
        case 5: scores_block(q, head_dim, block, out, stride, 5); break;
        case 6: scores_block(q, head_dim, block, out, stride, 6); break;
        case 7: scores_block(q, head_dim, block, out, stride, 7); break;
        default: scores_block(q, head_dim, block, out, stride, 8); break;
        }
#else
    for (int r = 0; r < R; r++) {
        float acc[16] = {0};
        for (int d = 0; d < head_dim; d++)
            for (int i = 0; i < 16; i++) acc[i] += em_kv_load(block[16 * d + i]) * q[r][d];
        memcpy(out + (size_t)r * stride, acc, sizeof acc);
    }
#endif
}

#if EM_AVX512
/* o[r] = sum over j of a[r][j] * v[j] for QR queries (weights `stride` apart, outputs head_dim
   apart) at once: each value row is loaded once for all of them. head_dim floats are NV
   registers per query (NV, QR constants); a last partial vector goes through a mask (float values
   only: a head of 72, SigLIP-So400m's; 80, Qwen2-VL's, is whole vectors). */
static inline __attribute__((always_inline)) void weighted_values(const float *a, int stride, int n,
                                                                  const em_kv_value *v, float *o, const int NV,
                                                                  const int QR, int head_dim) {
    const __mmask16 last = head_dim % 16 ? (__mmask16)((1u << (head_dim % 16)) - 1) : (__mmask16)0xFFFF;
    __m512 acc[24], row[16]; /* fixed sizes (QR x NV <= 24), so that they live in registers */
#pragma GCC unroll 8
    for (int r = 0; r < QR; r++)
#pragma GCC unroll 16
        for (int i = 0; i < NV; i++) acc[r * NV + i] = _mm512_setzero_ps();
    for (int j = 0; j < n; j++) {
        const em_kv_value *vj = v + (size_t)j * head_dim;
#pragma GCC unroll 16
        for (int i = 0; i < NV - 1; i++) row[i] = em_kv_load16(vj + 16 * i);
#ifdef EM_KV_FLOAT16
        row[NV - 1] = em_kv_load16(vj + 16 * (NV - 1));
#else
        row[NV - 1] = _mm512_maskz_loadu_ps(last, vj + 16 * (NV - 1));
#endif
#pragma GCC unroll 8
        for (int r = 0; r < QR; r++) {
            const __m512 w = _mm512_set1_ps(a[(size_t)r * stride + j]);
#pragma GCC unroll 16
            for (int i = 0; i < NV; i++) acc[r * NV + i] = _mm512_fmadd_ps(w, row[i], acc[r * NV + i]);
        }
    }
    for (int r = 0; r < QR; r++) {
        float *out = o + (size_t)r * head_dim;
        for (int i = 0; i < NV - 1; i++) _mm512_storeu_ps(out + 16 * i, acc[r * NV + i]);
        _mm512_mask_storeu_ps(out + 16 * (NV - 1), last, acc[r * NV + NV - 1]);
    }
}

/* weighted_values for R queries, as many at a time as the registers hold, for any head size up
   to 256 (whole vectors of 16, or with a float cache a last partial one); 0 if it is not one. */
#define EM_WEIGHTED(NV, QR)                                                                                   \
    case NV: {                                                                                                \
        int r = 0;                                                                                            \
        for (; r + QR <= R; r += QR) weighted_values(a + (size_t)r * stride, stride, n, v, o + (size_t)r * head_dim, NV, QR, head_dim); \
        for (; r < R; r++) weighted_values(a + (size_t)r * stride, stride, n, v, o + (size_t)r * head_dim, NV, 1, head_dim); \
        return 1;                                                                                             \
    }
static int weighted_values_rows(const float *a, int stride, int R, int n, const em_kv_value *v, float *o, int head_dim) {
#ifdef EM_KV_FLOAT16
    if (head_dim % 16) return 0;
#endif
    switch ((head_dim + 15) / 16) {
        EM_WEIGHTED(1, 8)
        EM_WEIGHTED(2, 8)
        EM_WEIGHTED(3, 6)
        EM_WEIGHTED(4, 4)
        EM_WEIGHTED(5, 4)
        EM_WEIGHTED(6, 3)
        EM_WEIGHTED(7, 2)
        EM_WEIGHTED(8, 2)
        EM_WEIGHTED(9, 1)
        EM_WEIGHTED(10, 1)
        EM_WEIGHTED(11, 1)
        EM_WEIGHTED(12, 1)
        EM_WEIGHTED(13, 1)
        EM_WEIGHTED(14, 1)
        EM_WEIGHTED(15, 1)
        EM_WEIGHTED(16, 1)
    }
    return 0;
}
#undef EM_WEIGHTED
#endif

/* R query vectors q[r] attending to their own cache positions [lo[r], hi[r]) of one KV head
   (hi > lo; kt, v: that head's keys and values): m[r] = the largest score, l[r] = sum of
   exp(score - m[r]), o[r] = sum of exp(score - m[r]) v. Scores are computed once, for whole
   blocks of 16 keys, over the union of the ranges. */
static void attend(const float *const *q, int R, const int *lo, const int *hi, int head_dim, const em_kv_value *kt,
                   const em_kv_value *v, float scale, float softcap, float *m, float *l, float *o) {
    int j0 = lo[0], j1 = hi[0];
    for (int r = 1; r < R; r++) {
        j0 = lo[r] < j0 ? lo[r] : j0;
        j1 = hi[r] > j1 ? hi[r] : j1;
    }
    j0 &= ~15;
    j1 = (j1 + 15) & ~15;
    const int n = j1 - j0;
    float scores[R * n];
    for (int j = j0; j < j1; j += 16) scores16(q, R, head_dim, kt + (size_t)j * head_dim, scores + (j - j0), n);
    for (int r = 0; r < R; r++) {
        float *sr = scores + (size_t)r * n + (lo[r] - j0), top = -INFINITY, total = 0.0f;
        const int count = hi[r] - lo[r];
        if (softcap > 0.0f) {
#pragma omp simd
            for (int j = 0; j < count; j++) sr[j] = softcap * tanhf(sr[j] * scale / softcap);
        } else {
#pragma omp simd
            for (int j = 0; j < count; j++) sr[j] *= scale;
        }
#pragma omp simd reduction(max : top)
        for (int j = 0; j < count; j++) top = sr[j] > top ? sr[j] : top;
#pragma omp simd reduction(+ : total)
        for (int j = 0; j < count; j++) total += (sr[j] = expf(sr[j] - top));
        m[r] = top;
        l[r] = total;
    }
#if EM_AVX512
    /* the values over the union of the ranges for every query at once, each query's weights zero
       outside its own range (adding exact zeros: each query's sum is what its own range gives) */
    int u0 = lo[0], u1 = hi[0];
    for (int r = 1; r < R; r++) {
        u0 = lo[r] < u0 ? lo[r] : u0;
        u1 = hi[r] > u1 ? hi[r] : u1;
    }
    for (int r = 0; r < R; r++) {
        float *sr = scores + (size_t)r * n;
        for (int j = u0; j < lo[r]; j++) sr[j - j0] = 0.0f;
        for (int j = hi[r]; j < u1; j++) sr[j - j0] = 0.0f;
    }
    if (weighted_values_rows(scores + (u0 - j0), n, R, u1 - u0, v + (size_t)u0 * head_dim, o, head_dim)) return;
#endif
    for (int r = 0; r < R; r++) {
        const float *sr = scores + (size_t)r * n + (lo[r] - j0);
        float *or_ = o + (size_t)r * head_dim;
        const em_kv_value *vs = v + (size_t)lo[r] * head_dim;
        memset(or_, 0, sizeof(float) * head_dim);
        for (int j = 0; j < hi[r] - lo[r]; j++)
            for (int i = 0; i < head_dim; i++) or_[i] += sr[j] * em_kv_load(vs[(size_t)j * head_dim + i]);
    }
}

/* A decode step splits its context into chunks across threads: at least 64 positions each (so
   a few KV heads still make work for every thread), at most EM_DECODE_CHUNKS (edgellm_kernels.h). */
#define EM_DECODE_CHUNK 64
/* Prefill tiles keep their scores on the stack: at most this many floats unless one token's
   heads alone need more. */
#define EM_SCORES_ON_STACK 65536

static inline int first_position(int p, int window) { return window > 0 && p - window + 1 > 0 ? p - window + 1 : 0; }

/* Positions per chunk of a decode step at position p: whole key blocks. */
static inline int decode_chunk(int p, int window) {
    const int length = p - first_position(p, window) + 1, chunk = (length + EM_DECODE_CHUNKS - 1) / EM_DECODE_CHUNKS;
    return chunk > EM_DECODE_CHUNK ? (chunk + 15) & ~15 : EM_DECODE_CHUNK;
}

void em_merge_chunks(const float *parts, const em_merge *a, int h_first, int h_end, float *out) {
    const int group = a->heads / a->kv_heads, head_dim = a->head_dim, chunk = decode_chunk(a->start, a->window);
    const int chunks = (a->start - first_position(a->start, a->window) + chunk) / chunk;
    const size_t record = (size_t)head_dim + 2;
    for (int h = h_first; h < h_end; h++) {
        const int set = h % group / EM_MAX_QUERIES, h0 = h - h % group + set * EM_MAX_QUERIES, r = h - h0;
        const int R = group - set * EM_MAX_QUERIES < EM_MAX_QUERIES ? group - set * EM_MAX_QUERIES : EM_MAX_QUERIES;
        const float *first = parts + (size_t)h0 * chunks * record;
        float top = -INFINITY, total = 0.0f;
        for (int c = 0; c < chunks; c++) {
            const float mc = first[(size_t)c * R * record + (size_t)R * head_dim + r];
            top = mc > top ? mc : top;
        }
        float *o = out + (size_t)h * head_dim;
        memset(o, 0, sizeof(float) * head_dim);
        for (int c = 0; c < chunks; c++) {
            const float *part = first + (size_t)c * R * record;
            const float w = expf(part[(size_t)R * head_dim + r] - top);
            total += part[(size_t)R * head_dim + R + r] * w;
            for (int i = 0; i < head_dim; i++) o[i] += w * part[(size_t)r * head_dim + i];
        }
        for (int i = 0; i < head_dim; i++) o[i] /= total;
    }
}

/* The new token's key or value row of KV head h, as the cache will hold it (rotated if cos_table,
   rounded to the cache's type). */
static inline void new_row(const float *x, int h, int p, int head_dim, int rotary_dim, const float *cos_table,
                           const float *sin_table, float *out) {
    if (cos_table) rope_head(x + (size_t)h * head_dim, p, head_dim, rotary_dim, cos_table, sin_table, out);
    else memcpy(out, x + (size_t)h * head_dim, sizeof(float) * head_dim);
    for (int d = 0; d < head_dim; d++) out[d] = em_kv_load(em_kv_store(out[d]));
}

void em_team_attention(const float *q, const float *k, const float *v, const float *cos_table, const float *sin_table,
                       int rotary_dim, int start, em_kv_value *k_cache, em_kv_value *v_cache, int heads,
                       int kv_heads, int head_dim, int cache_tokens, float scale, float softcap, int window,
                       float *scratch, float *out) {
    /* Items of (query set, chunk of positions): a query set is up to EM_MAX_QUERIES heads of one
       KV head. An item's partial result (o [R][head_dim], then m [R], l [R]) goes to the scratch,
       at the place of its first head's chunk; the heads then merge their chunks by their maxima
       (the softmax of the union of the chunks). The item whose chunk ends at the new position
       takes that position's key and value from k and v, not from the cache: the cache is written
       after every item is done, so the step needs no barrier between a cache write and the items. */
    const int group = heads / kv_heads, sets = (group + EM_MAX_QUERIES - 1) / EM_MAX_QUERIES;
    const int first = first_position(start, window), chunk = decode_chunk(start, window);
    const int chunks = (start - first + chunk) / chunk;
    const size_t record = (size_t)head_dim + 2;
#pragma omp for collapse(3) schedule(static)
    for (int kh = 0; kh < kv_heads; kh++)
        for (int set = 0; set < sets; set++)
            for (int c = 0; c < chunks; c++) {
                const int h0 = kh * group + set * EM_MAX_QUERIES;
                const int R = group - set * EM_MAX_QUERIES < EM_MAX_QUERIES ? group - set * EM_MAX_QUERIES : EM_MAX_QUERIES;
                float *part = scratch + ((size_t)h0 * chunks + (size_t)c * R) * record;
                float *o = part, *m = part + (size_t)R * head_dim, *l = m + R;
                float rotated[(size_t)R * head_dim];
                const float *qs[EM_MAX_QUERIES];
                for (int r = 0; r < R; r++) {
                    qs[r] = q + (size_t)(h0 + r) * head_dim;
                    if (cos_table) {
                        rope_head(qs[r], start, head_dim, rotary_dim, cos_table, sin_table, rotated + (size_t)r * head_dim);
                        qs[r] = rotated + (size_t)r * head_dim;
                    }
                }
                const int lo = first + c * chunk, hi = lo + chunk < start + 1 ? lo + chunk : start + 1;
                const int cached = hi < start ? hi : start; /* [lo, cached) from the cache */
                if (cached > lo) {
                    int los[EM_MAX_QUERIES], his[EM_MAX_QUERIES];
                    for (int r = 0; r < R; r++) los[r] = lo, his[r] = cached;
                    attend(qs, R, los, his, head_dim, k_cache + (size_t)kh * cache_tokens * head_dim,
                           v_cache + (size_t)kh * cache_tokens * head_dim, scale, softcap, m, l, o);
                } else {
                    for (int r = 0; r < R; r++) m[r] = -INFINITY, l[r] = 0.0f;
                    memset(o, 0, sizeof(float) * (size_t)R * head_dim);
                }
                if (hi == start + 1) { /* the new position, folded in as the online softmax does */
                    float key[head_dim], value[head_dim];
                    new_row(k, kh, start, head_dim, rotary_dim, cos_table, sin_table, key);
                    new_row(v, kh, start, head_dim, 0, NULL, NULL, value);
                    for (int r = 0; r < R; r++) {
                        float score = fdot(qs[r], key, head_dim);
                        score = softcap > 0.0f ? softcap * tanhf(score * scale / softcap) : score * scale;
                        const float top = score > m[r] ? score : m[r], kept = expf(m[r] - top), w = expf(score - top);
                        float *or_ = o + (size_t)r * head_dim;
                        for (int d = 0; d < head_dim; d++) or_[d] = or_[d] * kept + w * value[d];
                        l[r] = l[r] * kept + w;
                        m[r] = top;
                    }
                }
            }
    /* after the items' barrier: no thread reads the cache now until the next step */
#pragma omp for schedule(static) nowait
    for (int kh = 0; kh < kv_heads; kh++) {
        float key[head_dim];
        new_row(k, kh, start, head_dim, rotary_dim, cos_table, sin_table, key); /* rounding twice rounds once */
        store_key(k_cache, kh, start, key, head_dim, cache_tokens);
        store_value(v_cache, kh, start, v + (size_t)kh * head_dim, head_dim, cache_tokens);
    }
    if (!out) return; /* the next matmul merges the chunks (em_fusion's EM_ATTENTION prologue) */
    const em_merge merge = {start, window, heads, kv_heads, head_dim};
#pragma omp for schedule(static)
    for (int h = 0; h < heads; h++) em_merge_chunks(scratch, &merge, h, h + 1, out);
}

void em_attention(const float *q, int S, int start, const em_kv_value *k_cache, const em_kv_value *v_cache,
                  int heads, int kv_heads, int head_dim, int cache_tokens, float scale, float softcap,
                  int window, const int64_t *until, float *out) {
    /* Prefill: items of (a tile of tokens, KV head), each token's heads of the group together. */
    const int group = heads / kv_heads;
    int rows = group <= EM_MAX_QUERIES ? (EM_MAX_QUERIES / group < 8 ? EM_MAX_QUERIES / group : 8) : 1;
    while (rows > 1 && (size_t)rows * group * (start + S) > EM_SCORES_ON_STACK) rows--;
    const int tiles = (S + rows - 1) / rows, per = group <= EM_MAX_QUERIES ? group : 1;
    const int splits = group <= EM_MAX_QUERIES ? 1 : group; /* one head at a time past the limit */
#pragma omp parallel for collapse(3) schedule(dynamic, 1) if (S * kv_heads > 1)
    for (int tile = 0; tile < tiles; tile++)
        for (int kh = 0; kh < kv_heads; kh++)
            for (int h0 = 0; h0 < splits; h0++) {
                const float *qs[EM_MAX_QUERIES];
                int lo[EM_MAX_QUERIES], hi[EM_MAX_QUERIES], R = 0;
                for (int s = tile * rows; s < S && s < (tile + 1) * rows; s++)
                    for (int g = 0; g < per; g++, R++) {
                        qs[R] = q + ((size_t)s * heads + (size_t)kh * group + h0 + g) * head_dim;
                        lo[R] = first_position(start + s, window);
                        hi[R] = until ? (int)until[s] : start + s + 1;
                    }
                float m[EM_MAX_QUERIES], l[EM_MAX_QUERIES], o[EM_MAX_QUERIES * head_dim];
                attend(qs, R, lo, hi, head_dim, k_cache + (size_t)kh * cache_tokens * head_dim,
                       v_cache + (size_t)kh * cache_tokens * head_dim, scale, softcap, m, l, o);
                for (int r = 0; r < R; r++) {
                    float *dst = out + (qs[r] - q); /* the query's own slot in out */
                    for (int i = 0; i < head_dim; i++) dst[i] = o[(size_t)r * head_dim + i] / l[r];
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
#pragma omp parallel for simd schedule(static) if (n >= EM_PARALLEL_FROM)
    for (int i = 0; i < n; i++) y[i] = 1.0f / (1.0f + expf(-x[i]));
}

void em_tanh(const float *x, int n, float *y) {
#pragma omp parallel for simd schedule(static) if (n >= EM_PARALLEL_FROM)
    for (int i = 0; i < n; i++) y[i] = tanhf(x[i]);
}

void em_copy(const float *x, int n, float *y) { if (x != y) memmove(y, x, sizeof(float) * (size_t)n); }

void em_gelu_tanh(const float *x, int n, float *y) {
    const float c = 0.7978845608028654f; /* sqrt(2 / pi) */
#pragma omp parallel for simd schedule(static) if (n >= EM_PARALLEL_FROM)
    for (int i = 0; i < n; i++) y[i] = 0.5f * x[i] * (1.0f + tanhf(c * (x[i] + 0.044715f * x[i] * x[i] * x[i])));
}

/* The gated MLP's activation and product in one pass: y = act(gate) * up. */
void em_silu_mul(const float *gate, const float *up, int n, float *y) {
#pragma omp parallel for simd schedule(static) if (n >= EM_PARALLEL_FROM)
    for (int i = 0; i < n; i++) y[i] = gate[i] * (1.0f / (1.0f + expf(-gate[i]))) * up[i];
}

void em_gelu_tanh_mul(const float *gate, const float *up, int n, float *y) {
    const float c = 0.7978845608028654f; /* sqrt(2 / pi) */
#pragma omp parallel for simd schedule(static) if (n >= EM_PARALLEL_FROM)
    for (int i = 0; i < n; i++) {
        const float x = gate[i];
        y[i] = 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x))) * up[i];
    }
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
