/* Integer-weight matmuls (q4, q5, q6, q8) on the panel layout of edgellm_kernels.h.

   Two arithmetics, chosen per weight at compile time (em_weight.int8_activations):
   - float activations (exact: the dequantized weight times the float activations, as the IR
     says). Decode unpacks 16 rows x 8 columns per 64-byte load in registers; prefill unpacks a
     panel once into floats and runs it against 8 activation rows at a time.
   - int8 activations: each activation row is quantized per weight block (scale = max|x| / 127),
     and a block's dot products run as integer dot-product instructions (AVX-512 VNNI vpdpbusd:
     64 multiply-adds per instruction), then
         y += scale_w * scale_x * (q . xq) + minimum_w * scale_x * sum(xq)
     which is exactly the dequantized weight times the quantized activations. Symmetric blocks
     (stored shifted up by 2^(bits-1)) take the shift off in integers, (q - shift) . xq, rather
     than as a float minimum: the two float terms would nearly cancel, and their rounding
     would then differ between instruction sets (measured: 4e-3 of the largest logit, Q6_K).
   Threads split the panels (16 output rows each).
*/
#include "edgellm_simd.h"

#define PANEL 16
/* Decode streams the weights once: software prefetch this many bytes ahead of the loads keeps
   more of the stream in flight than the hardware prefetcher alone (measured on Zen 4, SmolLM2
   int4: one thread 219 -> 305 tok/s at 8 kB; 4 kB and 16 kB did less). */
#ifndef EM_PREFETCH
#define EM_PREFETCH 8192
#endif

/* q4, q5, q6: 8 columns per group of 16 rows (nibbles, then the high-bit masks); q8: 4 columns. */
static inline int nibbles(const em_weight *w) { return w->kind != EM_Q8; }
static inline int high_bits(const em_weight *w) { return w->kind == EM_Q5 ? 1 : w->kind == EM_Q6 ? 2 : 0; }
static inline int group_bytes(const em_weight *w) { return 64 + 16 * high_bits(w); }
static inline int group_columns(const em_weight *w) { return nibbles(w) ? 8 : 4; }
static inline size_t panel_bytes(const em_weight *w) { return (size_t)w->k / group_columns(w) * group_bytes(w); }
static inline size_t block_bytes(const em_weight *w) { return (size_t)w->block / group_columns(w) * group_bytes(w); }
static inline int block_len(const em_weight *w, int b) {
    const int rest = w->k - b * w->block;
    return rest < w->block ? rest : w->block;
}
static inline int panels(const em_weight *w) { return (w->n + PANEL - 1) / PANEL; }

static inline const uint8_t *block_data(const em_weight *w, int p, int b) {
    return (const uint8_t *)w->data + (size_t)p * panel_bytes(w) + (size_t)b * block_bytes(w);
}

/* A group's high-bit mask e (0: bit 4, 1: bit 5) of its low (half 0) or high (half 1) nibbles. */
static inline uint64_t high_mask(const uint8_t *group, int e, int half) {
    uint64_t m;
    memcpy(&m, group + 64 + 16 * e + 8 * half, 8);
    return m;
}

static inline size_t scale_index(const em_weight *w, int p, int b) { return ((size_t)p * em_blocks(w) + b) * PANEL; }
static inline size_t unit_index(const em_weight *w, int p, int b) {
    return ((size_t)p * (em_blocks(w) / w->unit_blocks) + b / w->unit_blocks) * PANEL;
}

/* 16 float16 units times 16 int8 factors (a factored scale or minimum). */
static inline void factored(const uint16_t *unit, const int8_t *factor, float *out) {
    float u[PANEL];
    halves(unit, PANEL, u);
    for (int j = 0; j < PANEL; j++) out[j] = u[j] * (float)factor[j];
}

/* A (panel, block)'s 16 scales. */
static inline void block_scales(const em_weight *w, int p, int b, float *d) {
    if (w->scale_unit) factored(w->scale_unit + unit_index(w, p, b), (const int8_t *)w->scale + scale_index(w, p, b), d);
    else halves(w->scale + scale_index(w, p, b), PANEL, d);
}

/* A (panel, block)'s 16 minimums: stored, or for symmetric blocks (no minimum array: the
   weights file leaves it out) minus the storage shift times the scale. */
static inline void block_minimums(const em_weight *w, int p, int b, const float *d, float *m) {
    if (!w->minimum)
        for (int j = 0; j < PANEL; j++) m[j] = -w->shift * d[j];
    else if (w->minimum_unit)
        factored(w->minimum_unit + unit_index(w, p, b), (const int8_t *)w->minimum + scale_index(w, p, b), m);
    else if (w->minimum_f32) memcpy(m, (const float *)w->minimum + scale_index(w, p, b), sizeof(float) * PANEL);
    else halves((const uint16_t *)w->minimum + scale_index(w, p, b), PANEL, m);
}

#if EM_AVX512
static inline __m512 factored16(const uint16_t *unit, const int8_t *factor) {
    const __m512 u = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)unit));
    return _mm512_mul_ps(u, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)factor))));
}

static inline __m512 scales16(const em_weight *w, int p, int b) {
    if (w->scale_unit) return factored16(w->scale_unit + unit_index(w, p, b), (const int8_t *)w->scale + scale_index(w, p, b));
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w->scale + scale_index(w, p, b))));
}

static inline __m512 minimums16(const em_weight *w, int p, int b, __m512 d) {
    if (!w->minimum) return _mm512_mul_ps(d, _mm512_set1_ps(-w->shift));
    if (w->minimum_unit)
        return factored16(w->minimum_unit + unit_index(w, p, b), (const int8_t *)w->minimum + scale_index(w, p, b));
    if (w->minimum_f32) return _mm512_loadu_ps((const float *)w->minimum + scale_index(w, p, b));
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w->minimum + scale_index(w, p, b))));
}
#endif

/* Stored (unsigned) value of row j of a panel block, at column c of the block. */
static inline int stored_value(const em_weight *w, const uint8_t *blk, int j, int c) {
    if (!nibbles(w)) return blk[(c / 4) * 64 + 4 * j + c % 4];
    const uint8_t *group = blk + (size_t)(c / 8) * group_bytes(w);
    const int i = 4 * j + c % 4, half = c % 8 >= 4;
    int v = half ? group[i] >> 4 : group[i] & 15;
    for (int e = 0; e < high_bits(w); e++) v |= (int)((high_mask(group, e, half) >> i) & 1) << (4 + e);
    return v;
}

void em_integer_row(const em_weight *w, int n, float *out) {
    const int p = n / PANEL, j = n % PANEL;
    for (int b = 0; b < em_blocks(w); b++) {
        float ds[PANEL], ms[PANEL];
        block_scales(w, p, b, ds);
        block_minimums(w, p, b, ds, ms);
        const float d = ds[j], m = ms[j];
        const uint8_t *blk = block_data(w, p, b);
        for (int c = 0; c < block_len(w, b); c++) out[b * w->block + c] = d * (float)stored_value(w, blk, j, c) + m;
    }
}

static void store_panel(const float *values, int p, int n, float *y) {
    const int count = n - p * PANEL < PANEL ? n - p * PANEL : PANEL;
    memcpy(y + (size_t)p * PANEL, values, sizeof(float) * count);
}

/* ---- float activations ----------------------------------------------------------------- */

#if EM_AVX512
/* A whole group's values, lane j = row j, in column order: q4, q5, q6 v[0..3] the low nibbles
   (columns 0-3), v[4..7] the high nibbles (columns 4-7); q8 v[0..3]. Bit 4j + i of a high-bit
   mask is row j's bit for column i of that half: pext gathers it for the 16 rows at once. */
static inline __attribute__((always_inline)) void group_values16(const em_weight *w, const uint8_t *group, __m512i v[8]) {
    const __m512i word = _mm512_loadu_si512((const void *)group);
    if (!nibbles(w)) {
        for (int i = 0; i < 4; i++) v[i] = _mm512_and_si512(_mm512_srli_epi32(word, 8 * i), _mm512_set1_epi32(255));
        return;
    }
    for (int i = 0; i < 4; i++) {
        v[i] = _mm512_and_si512(_mm512_srli_epi32(word, 8 * i), _mm512_set1_epi32(15));
        v[4 + i] = _mm512_and_si512(_mm512_srli_epi32(word, 8 * i + 4), _mm512_set1_epi32(15));
    }
    for (int e = 0; e < high_bits(w); e++)
        for (int half = 0; half < 2; half++) {
            const uint64_t mask = high_mask(group, e, half);
            for (int i = 0; i < 4; i++) {
#if defined(__BMI2__)
                const __mmask16 rows = (__mmask16)_pext_u64(mask, 0x1111111111111111ull << i);
#else
                __mmask16 rows = 0;
                for (int j = 0; j < PANEL; j++) rows |= (__mmask16)(((mask >> (4 * j + i)) & 1) << j);
#endif
                v[4 * half + i] = _mm512_mask_or_epi32(v[4 * half + i], rows, v[4 * half + i], _mm512_set1_epi32(16 << e));
            }
        }
}
#endif

/* The panel dequantized: wf[k * 16 + j] = row j's weight at column k. A 64-byte group read as
   16 little-endian words holds row j in word j (edgellm_kernels.h), so each column is one shift
   and mask across the 16 words (AVX-512: group_values16; elsewhere loops over the rows that the
   compiler vectorizes). */
static void panel_floats(const em_weight *w, int p, float *wf) {
    const int columns = group_columns(w), G = group_bytes(w);
    for (int b = 0; b < em_blocks(w); b++) {
        float d[PANEL], m[PANEL];
        block_scales(w, p, b, d);
        block_minimums(w, p, b, d, m);
        const uint8_t *blk = block_data(w, p, b);
        float *dst = wf + (size_t)b * w->block * PANEL;
        const int len = block_len(w, b), whole = len / columns;
#if EM_AVX512
        const __m512 dv = _mm512_loadu_ps(d), mv = _mm512_loadu_ps(m);
        for (int g = 0; g < whole; g++) {
            __m512i v[8];
            group_values16(w, blk + (size_t)G * g, v);
            for (int c = 0; c < columns; c++)
                _mm512_storeu_ps(dst + (size_t)(g * columns + c) * PANEL, _mm512_fmadd_ps(_mm512_cvtepi32_ps(v[c]), dv, mv));
        }
#else
        for (int g = 0; g < whole; g++) {
            uint32_t word[PANEL];
            memcpy(word, blk + (size_t)G * g, 64);
            float *out = dst + (size_t)g * columns * PANEL;
            if (high_bits(w)) { /* q5, q6: nibbles, and bit 4j + i of the group's masks */
                uint64_t mask[2][2] = {{0, 0}, {0, 0}};
                for (int e = 0; e < high_bits(w); e++)
                    for (int half = 0; half < 2; half++) mask[e][half] = high_mask(blk + (size_t)G * g, e, half);
                for (int i = 0; i < 4; i++)
                    for (int j = 0; j < PANEL; j++) {
                        const int bit = 4 * j + i;
                        const uint32_t lo = ((word[j] >> (8 * i)) & 15) | (uint32_t)((mask[0][0] >> bit) & 1) << 4 |
                                            (uint32_t)((mask[1][0] >> bit) & 1) << 5;
                        const uint32_t hi = ((word[j] >> (8 * i + 4)) & 15) | (uint32_t)((mask[0][1] >> bit) & 1) << 4 |
                                            (uint32_t)((mask[1][1] >> bit) & 1) << 5;
                        out[i * PANEL + j] = d[j] * (float)lo + m[j];
                        out[(4 + i) * PANEL + j] = d[j] * (float)hi + m[j];
                    }
                continue;
            }
            for (int i = 0; i < 4; i++) {
                const int shift = 8 * i;
                if (nibbles(w)) {
                    for (int j = 0; j < PANEL; j++) out[i * PANEL + j] = d[j] * (float)((word[j] >> shift) & 15) + m[j];
                    for (int j = 0; j < PANEL; j++) out[(4 + i) * PANEL + j] = d[j] * (float)((word[j] >> (shift + 4)) & 15) + m[j];
                } else {
                    for (int j = 0; j < PANEL; j++) out[i * PANEL + j] = d[j] * (float)((word[j] >> shift) & 255) + m[j];
                }
            }
        }
#endif
        for (int c = whole * columns; c < len; c++)
            for (int j = 0; j < PANEL; j++) dst[c * PANEL + j] = d[j] * (float)stored_value(w, blk, j, c) + m[j];
    }
}

/* R rows (a compile-time constant after inlining, at most EM_PANEL_ROWS) of x times the
   dequantized panel: R x 16 accumulators in registers, one weight load per column for R
   multiply-adds. Every row count takes this path: a prompt of 100 rows leaves 4 after the blocks
   of 8, and a scalar loop over those took as long as the other 96 (the accumulators went through
   memory, one dependent add per column). */
#if EM_AVX512
#define EM_PANEL_ROWS 8
static inline __attribute__((always_inline)) void rows_times_panel(const float *wf, int K, const float *x, int R, int p,
                                                                   int N, float *y) {
    __m512 acc[EM_PANEL_ROWS];
    for (int t = 0; t < R; t++) acc[t] = _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
        const __m512 wk = _mm512_loadu_ps(wf + (size_t)k * PANEL);
        for (int t = 0; t < R; t++) acc[t] = _mm512_fmadd_ps(wk, _mm512_set1_ps(x[(size_t)t * K + k]), acc[t]);
    }
    for (int t = 0; t < R; t++) {
        float out[PANEL];
        _mm512_storeu_ps(out, acc[t]);
        store_panel(out, p, N, y + (size_t)t * N);
    }
}
#elif EM_AVX2
#define EM_PANEL_ROWS 4
static inline __attribute__((always_inline)) void rows_times_panel(const float *wf, int K, const float *x, int R, int p,
                                                                   int N, float *y) {
    __m256 acc[EM_PANEL_ROWS][2]; /* R rows x 16 outputs: 2R accumulators */
    for (int t = 0; t < R; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    for (int k = 0; k < K; k++) {
        const __m256 w0 = _mm256_loadu_ps(wf + (size_t)k * PANEL), w1 = _mm256_loadu_ps(wf + (size_t)k * PANEL + 8);
        for (int t = 0; t < R; t++) {
            const __m256 xk = _mm256_set1_ps(x[(size_t)t * K + k]);
            acc[t][0] = _mm256_fmadd_ps(w0, xk, acc[t][0]);
            acc[t][1] = _mm256_fmadd_ps(w1, xk, acc[t][1]);
        }
    }
    for (int t = 0; t < R; t++) {
        float out[PANEL];
        _mm256_storeu_ps(out, acc[t][0]);
        _mm256_storeu_ps(out + 8, acc[t][1]);
        store_panel(out, p, N, y + (size_t)t * N);
    }
}
#elif EM_NEON
#define EM_PANEL_ROWS 4
static inline __attribute__((always_inline)) void rows_times_panel(const float *wf, int K, const float *x, int R, int p,
                                                                   int N, float *y) {
    float32x4_t acc[EM_PANEL_ROWS][4]; /* R rows x 16 outputs: 4R accumulators */
    for (int t = 0; t < R; t++)
        for (int q = 0; q < 4; q++) acc[t][q] = vdupq_n_f32(0.0f);
    for (int k = 0; k < K; k++) {
        float32x4_t wk[4];
        for (int q = 0; q < 4; q++) wk[q] = vld1q_f32(wf + (size_t)k * PANEL + 4 * q);
        for (int t = 0; t < R; t++) {
            const float xk = x[(size_t)t * K + k];
            for (int q = 0; q < 4; q++) acc[t][q] = vfmaq_n_f32(acc[t][q], wk[q], xk);
        }
    }
    for (int t = 0; t < R; t++) {
        float out[PANEL];
        for (int q = 0; q < 4; q++) vst1q_f32(out + 4 * q, acc[t][q]);
        store_panel(out, p, N, y + (size_t)t * N);
    }
}
#else
#define EM_PANEL_ROWS 1
static inline void rows_times_panel(const float *wf, int K, const float *x, int R, int p, int N, float *y) {
    (void)R; /* one row: the compiler vectorizes the 16 outputs */
    float acc[PANEL] = {0};
    for (int k = 0; k < K; k++)
        for (int j = 0; j < PANEL; j++) acc[j] += wf[(size_t)k * PANEL + j] * x[k];
    store_panel(acc, p, N, y);
}
#endif

#if EM_AVX512
#if defined(__AVX512BW__) && defined(__BMI2__)
/* A nibble kind's group as 4 rows of the tiles' pair layout, out[c / 2] = columns (c, c + 1) for
   c = 0, 2, 4, 6: dword j = (bfloat16 of row j's column c, of column c + 1). Each stored value
   goes to its own 16-bit lane (a byte shuffle for the byte of a pair's two columns, a mask or a
   shift for its nibble), the high bits are or-ed in from masks pext gathers in lane order (lane
   2j + h: bit 4j + i + h of the half's mask), and a table lookup of 32 (64 for q6) words turns the
   small integer into its bfloat16. Half the instructions of unpacking to floats first. */
static inline __attribute__((always_inline)) void group_pairs16(const em_weight *w, const uint8_t *group, __m512i out[4]) {
    /* bfloat16 of 0 .. 63: the exponent and the leading bits of each small integer */
    static const uint16_t bf16_of[64] __attribute__((aligned(64))) = {
        0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0, 0x4100, 0x4110, 0x4120, 0x4130, 0x4140,
        0x4150, 0x4160, 0x4170, 0x4180, 0x4188, 0x4190, 0x4198, 0x41A0, 0x41A8, 0x41B0, 0x41B8, 0x41C0, 0x41C8,
        0x41D0, 0x41D8, 0x41E0, 0x41E8, 0x41F0, 0x41F8, 0x4200, 0x4204, 0x4208, 0x420C, 0x4210, 0x4214, 0x4218,
        0x421C, 0x4220, 0x4224, 0x4228, 0x422C, 0x4230, 0x4234, 0x4238, 0x423C, 0x4240, 0x4244, 0x4248, 0x424C,
        0x4250, 0x4254, 0x4258, 0x425C, 0x4260, 0x4264, 0x4268, 0x426C, 0x4270, 0x4274, 0x4278, 0x427C};
    const __m512i word = _mm512_loadu_si512((const void *)group);
    /* bytes (0, 1) or (2, 3) of each dword, each zero-extended to 16 bits */
    const __m512i first = _mm512_shuffle_epi8(word, _mm512_set4_epi32((int)0x800D800C, (int)0x80098008, (int)0x80058004, (int)0x80018000));
    const __m512i second = _mm512_shuffle_epi8(word, _mm512_set4_epi32((int)0x800F800E, (int)0x800B800A, (int)0x80078006, (int)0x80038002));
    const __m512i nibble = _mm512_set1_epi16(15);
    out[0] = _mm512_and_si512(first, nibble);   /* columns 0, 1: low nibbles */
    out[1] = _mm512_and_si512(second, nibble);  /* columns 2, 3 */
    out[2] = _mm512_srli_epi16(first, 4);       /* columns 4, 5: high nibbles */
    out[3] = _mm512_srli_epi16(second, 4);      /* columns 6, 7 */
    for (int e = 0; e < high_bits(w); e++)
        for (int half = 0; half < 2; half++) {
            const uint64_t mask = high_mask(group, e, half);
            for (int h = 0; h < 2; h++) { /* pair h of the half: columns 2h, 2h + 1 */
                const __mmask32 lanes = (__mmask32)_pext_u64(mask, 0x3333333333333333ull << (2 * h));
                out[2 * half + h] = _mm512_mask_add_epi16(out[2 * half + h], lanes, out[2 * half + h], _mm512_set1_epi16((short)(16 << e)));
            }
        }
    const __m512i low = _mm512_load_si512((const void *)bf16_of), top = _mm512_load_si512((const void *)(bf16_of + 32));
    for (int c = 0; c < 4; c++)
        out[c] = high_bits(w) == 2 ? _mm512_permutex2var_epi16(low, out[c], top) : _mm512_permutexvar_epi16(out[c], low);
}
#endif

void em_panel_pairs(const em_weight *w, int p, int first_block, int end_block, int width, uint32_t *pairs) {
    const int columns = group_columns(w), G = group_bytes(w), origin = first_block * w->block;
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    int filled = 0; /* columns written, from origin */
    for (int b = first_block; b < end_block; b++) {
        const uint8_t *blk = block_data(w, p, b);
        const int len = block_len(w, b), whole = len / columns, first = b * w->block - origin;
        for (int g = 0; g < whole; g++) {
#if defined(__AVX512BW__) && defined(__BMI2__)
            if (nibbles(w)) {
                __m512i pair[4];
                group_pairs16(w, blk + (size_t)G * g, pair);
                for (int c = 0; c < 4; c++)
                    _mm512_storeu_si512((void *)(pairs + (size_t)(first + g * columns) / 2 * PANEL + (size_t)c * PANEL), pair[c]);
                continue;
            }
#endif
            __m512i v[8];
            group_values16(w, blk + (size_t)G * g, v);
            for (int c = 0; c < columns; c += 2) { /* a small integer's float bits: its bfloat16, then zeros */
                const __m512i lo = _mm512_castps_si512(_mm512_cvtepi32_ps(v[c])), hi = _mm512_castps_si512(_mm512_cvtepi32_ps(v[c + 1]));
                _mm512_storeu_si512((void *)(pairs + (size_t)(first + g * columns + c) / 2 * PANEL),
                                    _mm512_or_si512(_mm512_srli_epi32(lo, 16), _mm512_and_si512(hi, high)));
            }
        }
        for (int c = whole * columns; c < len; c += 2) /* a block's last, partial group */
            for (int j = 0; j < PANEL; j++) {
                const float lo = (float)stored_value(w, blk, j, c), hi = c + 1 < len ? (float)stored_value(w, blk, j, c + 1) : 0.0f;
                uint32_t a, h;
                memcpy(&a, &lo, 4);
                memcpy(&h, &hi, 4);
                pairs[(size_t)(first + c) / 2 * PANEL + j] = a >> 16 | (h & 0xFFFF0000u);
            }
        filled = first + len;
    }
    memset(pairs + (size_t)(filled + 1) / 2 * PANEL, 0, sizeof(uint32_t) * PANEL * (size_t)(width / 2 - (filled + 1) / 2));
}
#endif

void em_panel_block(const em_weight *w, int p, int b, float *d, float *m) {
#if EM_AVX512 /* (the same products as block_scales' and block_minimums', 16 at a time) */
    const __m512 dv = scales16(w, p, b);
    _mm512_storeu_ps(d, dv);
    _mm512_storeu_ps(m, minimums16(w, p, b, dv));
#else
    block_scales(w, p, b, d);
    block_minimums(w, p, b, d, m);
#endif
}

/* y rows s of panel p = x rows s (S of them, length K) times the dequantized panel. */
static void panel_times_rows(const float *wf, int K, const float *x, int S, int p, int N, float *y) {
    int s = 0;
    for (; s + EM_PANEL_ROWS <= S; s += EM_PANEL_ROWS)
        rows_times_panel(wf, K, x + (size_t)s * K, EM_PANEL_ROWS, p, N, y + (size_t)s * N);
    switch (S - s) { /* the rest, with the row count a constant in each case */
#if EM_PANEL_ROWS > 1
    case 1: rows_times_panel(wf, K, x + (size_t)s * K, 1, p, N, y + (size_t)s * N); break;
    case 2: rows_times_panel(wf, K, x + (size_t)s * K, 2, p, N, y + (size_t)s * N); break;
    case 3: rows_times_panel(wf, K, x + (size_t)s * K, 3, p, N, y + (size_t)s * N); break;
#endif
#if EM_PANEL_ROWS > 4
    case 4: rows_times_panel(wf, K, x + (size_t)s * K, 4, p, N, y + (size_t)s * N); break;
    case 5: rows_times_panel(wf, K, x + (size_t)s * K, 5, p, N, y + (size_t)s * N); break;
    case 6: rows_times_panel(wf, K, x + (size_t)s * K, 6, p, N, y + (size_t)s * N); break;
    case 7: rows_times_panel(wf, K, x + (size_t)s * K, 7, p, N, y + (size_t)s * N); break;
#endif
    default: break;
    }
}

#if EM_AVX512
/* Decode rows, float activations, take at most this many rows per pass over a panel: each row
   keeps 4 block accumulators and its 8 activations of a group in registers (6 x 5 of 32). */
#define EM_DECODE_ROWS 5

/* One block of a nibble kind (H high-bit masks per group: 0 q4, 1 q5, 2 q6) against R rows of
   float activations (xb, rows K apart), into panel_decode_f32's block accumulators bacc[t][r].
   Byte i of a group is lane i % 16 of load i / 16, so mask bits 16r.. are that load's lanes. The
   group is unpacked once for all R rows; each row's multiply-adds run in the one-row order. */
static inline __attribute__((always_inline)) void nibbles_f32(const uint8_t *blk, int len, const float *xb, size_t K,
                                                              int R, int H, __m512 bacc[][4]) {
    const __m512i low = _mm512_set1_epi32(15);
    const size_t G = 64 + 16 * (size_t)H;
    for (int g = 0; g < len / 8; g++) {
        const uint8_t *group = blk + G * g;
        _mm_prefetch((const char *)group + EM_PREFETCH, _MM_HINT_T0);
        uint64_t mask[2][2] = {{0, 0}, {0, 0}};
        for (int e = 0; e < H; e++) mask[e][0] = high_mask(group, e, 0), mask[e][1] = high_mask(group, e, 1);
        __m512 xlo[EM_DECODE_ROWS], xhi[EM_DECODE_ROWS];
        for (int t = 0; t < R; t++) {
            xlo[t] = _mm512_broadcast_f32x4(_mm_loadu_ps(xb + t * K + 8 * g));
            xhi[t] = _mm512_broadcast_f32x4(_mm_loadu_ps(xb + t * K + 8 * g + 4));
        }
        for (int r = 0; r < 4; r++) {
            const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(group + 16 * r)));
            __m512i l = _mm512_and_si512(v, low), h = _mm512_srli_epi32(v, 4);
            for (int e = 0; e < H; e++) {
                const __m512i bit = _mm512_set1_epi32(16 << e);
                l = _mm512_mask_add_epi32(l, (__mmask16)(mask[e][0] >> (16 * r)), l, bit);
                h = _mm512_mask_add_epi32(h, (__mmask16)(mask[e][1] >> (16 * r)), h, bit);
            }
            const __m512 lo = _mm512_cvtepi32_ps(l), hi = _mm512_cvtepi32_ps(h);
            for (int t = 0; t < R; t++) {
                bacc[t][r] = _mm512_fmadd_ps(lo, xlo[t], bacc[t][r]);
                bacc[t][r] = _mm512_fmadd_ps(hi, xhi[t], bacc[t][r]);
            }
        }
    }
}

/* Decode, float activations: R rows (a constant after inlining, at most EM_DECODE_ROWS; x rows K
   apart, xsum rows of em_blocks, y rows ys apart) against panel p, 16 rows x 8 columns (q4, q5,
   q6) or x 4 (q8) per group, in registers. Accumulator r holds rows 4r..4r+3, lane 4i + c for row
   4r + i and column c mod 4. Every row gets the one-row call's result, bit for bit: the verify
   function's rows must give what decode steps give. */
static inline __attribute__((always_inline)) void panel_decode_f32(const em_weight *w, int p, const float *x,
                                                                   const float *xsum, int R, size_t ys, float *y) {
    const int nb = em_blocks(w), B = w->block;
    const size_t K = (size_t)w->k;
    __m512 acc[EM_DECODE_ROWS][4], macc[EM_DECODE_ROWS];
    __m512i spread[4]; /* lane l of accumulator r belongs to row 4r + l / 4 */
    for (int r = 0; r < 4; r++)
        spread[r] = _mm512_setr_epi32(4 * r, 4 * r, 4 * r, 4 * r, 4 * r + 1, 4 * r + 1, 4 * r + 1, 4 * r + 1, 4 * r + 2,
                                      4 * r + 2, 4 * r + 2, 4 * r + 2, 4 * r + 3, 4 * r + 3, 4 * r + 3, 4 * r + 3);
    for (int t = 0; t < R; t++) {
        macc[t] = _mm512_setzero_ps();
        for (int r = 0; r < 4; r++) acc[t][r] = _mm512_setzero_ps();
    }
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = block_data(w, p, b);
        const float *xb = x + (size_t)b * B;
        const int len = block_len(w, b);
        __m512 bacc[EM_DECODE_ROWS][4];
        for (int t = 0; t < R; t++)
            for (int r = 0; r < 4; r++) bacc[t][r] = _mm512_setzero_ps();
        if (nibbles(w)) {
            switch (high_bits(w)) { /* a constant per case: q4 pays nothing for the masks */
            case 0: nibbles_f32(blk, len, xb, K, R, 0, bacc); break;
            case 1: nibbles_f32(blk, len, xb, K, R, 1, bacc); break;
            default: nibbles_f32(blk, len, xb, K, R, 2, bacc);
            }
        } else {
            for (int g = 0; g < len / 4; g++) {
                _mm_prefetch((const char *)blk + 64 * g + EM_PREFETCH, _MM_HINT_T0);
                __m512 v[4];
                for (int r = 0; r < 4; r++)
                    v[r] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blk + 64 * g + 16 * r))));
                for (int t = 0; t < R; t++) {
                    const __m512 xq = _mm512_broadcast_f32x4(_mm_loadu_ps(xb + t * K + 4 * g));
                    for (int r = 0; r < 4; r++) bacc[t][r] = _mm512_fmadd_ps(v[r], xq, bacc[t][r]);
                }
            }
        }
        const __m512 d = scales16(w, p, b);
        const __m512 m = minimums16(w, p, b, d);
        for (int t = 0; t < R; t++) {
            for (int r = 0; r < 4; r++) acc[t][r] = _mm512_fmadd_ps(bacc[t][r], _mm512_permutexvar_ps(spread[r], d), acc[t][r]);
            macc[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(xsum[(size_t)t * nb + b]), macc[t]);
        }
    }
    for (int t = 0; t < R; t++) {
        float lanes[64], out[PANEL];
        for (int r = 0; r < 4; r++) _mm512_storeu_ps(lanes + 16 * r, acc[t][r]);
        _mm512_storeu_ps(out, macc[t]);
        for (int j = 0; j < PANEL; j++) out[j] += lanes[4 * j] + lanes[4 * j + 1] + lanes[4 * j + 2] + lanes[4 * j + 3];
        store_panel(out, p, w->n, y + (size_t)t * ys);
    }
}
#endif

#if EM_AVX2
/* Four floats in both halves (any alignment). */
static inline __m256 broadcast4(const float *p) {
    const __m128 v = _mm_loadu_ps(p);
    return _mm256_set_m128(v, v);
}

/* 8 mask bits -> 8 lanes of `value` or 0 (lane i: bit i). */
static inline __m256i bits_to_lanes(uint32_t bits, int value) {
    const __m256i select = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)bits), select), select);
    return _mm256_and_si256(set, _mm256_set1_epi32(value));
}

/* One block of a nibble kind (H high-bit masks per group) against R rows of float activations
   (rows K apart), AVX2: each 8 bytes unpacked once for all rows, each row's multiply-adds in the
   one-row order (past one row its accumulators spill: a load and a store per pair of
   multiply-adds still cost less than unpacking again). */
static inline __attribute__((always_inline)) void nibbles_f32_avx2(const uint8_t *blk, int len, const float *xb, size_t K,
                                                                   int R, int H, __m256 acc[][8]) {
    const __m256i low = _mm256_set1_epi32(15);
    const size_t G = 64 + 16 * (size_t)H;
    for (int g = 0; g < len / 8; g++) {
        const uint8_t *group = blk + G * g;
        __builtin_prefetch(group + EM_PREFETCH);
        uint64_t mask[2][2] = {{0, 0}, {0, 0}};
        for (int e = 0; e < H; e++) mask[e][0] = high_mask(group, e, 0), mask[e][1] = high_mask(group, e, 1);
        for (int h = 0; h < 8; h++) {
            const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(group + 8 * h)));
            __m256i lo = _mm256_and_si256(v, low), hi = _mm256_srli_epi32(v, 4);
            for (int e = 0; e < H; e++) {
                lo = _mm256_add_epi32(lo, bits_to_lanes((uint32_t)(mask[e][0] >> (8 * h)) & 255, 16 << e));
                hi = _mm256_add_epi32(hi, bits_to_lanes((uint32_t)(mask[e][1] >> (8 * h)) & 255, 16 << e));
            }
            const __m256 lof = _mm256_cvtepi32_ps(lo), hif = _mm256_cvtepi32_ps(hi);
            for (int t = 0; t < R; t++) {
                acc[t][h] = _mm256_fmadd_ps(lof, broadcast4(xb + t * K + 8 * g), acc[t][h]);
                acc[t][h] = _mm256_fmadd_ps(hif, broadcast4(xb + t * K + 8 * g + 4), acc[t][h]);
            }
        }
    }
}

/* Decode, float activations, AVX2: R rows (a constant after inlining, at most EM_DECODE_ROWS; laid
   out as for panel_decode_f32) against panel p. Each 8 bytes of a 64-byte group are two rows x 4
   columns (q8) or two rows x 8 columns as nibbles (q4): accumulator h holds rows 2h and 2h + 1,
   lane 4 * (row - 2h) + column mod 4. */
#define EM_DECODE_ROWS 4
static inline __attribute__((always_inline)) void panel_decode_f32_avx2(const em_weight *w, int p, const float *x,
                                                                        const float *xsum, int R, size_t ys, float *y) {
    const int nb = em_blocks(w), B = w->block;
    const size_t K = (size_t)w->k;
    float total[EM_DECODE_ROWS][8 * 8] = {{0}}, minimum_total[EM_DECODE_ROWS][PANEL] = {{0}};
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = block_data(w, p, b);
        const float *xb = x + (size_t)b * B;
        const int len = block_len(w, b);
        __m256 acc[EM_DECODE_ROWS][8];
        for (int t = 0; t < R; t++)
            for (int h = 0; h < 8; h++) acc[t][h] = _mm256_setzero_ps();
        if (nibbles(w)) {
            switch (high_bits(w)) {
            case 0: nibbles_f32_avx2(blk, len, xb, K, R, 0, acc); break;
            case 1: nibbles_f32_avx2(blk, len, xb, K, R, 1, acc); break;
            default: nibbles_f32_avx2(blk, len, xb, K, R, 2, acc);
            }
        } else {
            for (int g = 0; g < len / 4; g++) {
                __builtin_prefetch(blk + 64 * g + EM_PREFETCH);
                for (int h = 0; h < 8; h++) {
                    const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 64 * g + 8 * h))));
                    for (int t = 0; t < R; t++) acc[t][h] = _mm256_fmadd_ps(v, broadcast4(xb + t * K + 4 * g), acc[t][h]);
                }
            }
        }
        float d[PANEL], m[PANEL];
        block_scales(w, p, b, d);
        block_minimums(w, p, b, d, m);
        for (int t = 0; t < R; t++) {
            for (int h = 0; h < 8; h++) {
                const __m256 dh = _mm256_setr_m128(_mm_set1_ps(d[2 * h]), _mm_set1_ps(d[2 * h + 1]));
                _mm256_storeu_ps(total[t] + 8 * h, _mm256_fmadd_ps(acc[t][h], dh, _mm256_loadu_ps(total[t] + 8 * h)));
            }
            for (int j = 0; j < PANEL; j++) minimum_total[t][j] += m[j] * xsum[(size_t)t * nb + b];
        }
    }
    for (int t = 0; t < R; t++) {
        float out[PANEL];
        for (int j = 0; j < PANEL; j++) {
            const float *u = total[t] + 4 * j; /* row j: lanes 4 (j mod 2) .. of accumulator j / 2 */
            out[j] = minimum_total[t][j] + (u[0] + u[1] + u[2] + u[3]);
        }
        store_panel(out, p, w->n, y + (size_t)t * ys);
    }
}
#endif

#if EM_NEON
/* Bits 16r.. of a group's high-bit masks of one half (0: low nibbles, 1: high), as 16 bytes
   holding the bits' values (16, 32) to add to the load's nibbles. */
static inline uint8x16_t neon_high_bits(const uint8_t *group, int H, int half, int r) {
    static const uint8_t select_bits[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    const uint8x16_t select = vld1q_u8(select_bits);
    uint8x16_t out = vdupq_n_u8(0);
    for (int e = 0; e < H; e++) {
        const uint64_t m = high_mask(group, e, half) >> (16 * r);
        const uint8x16_t b = vcombine_u8(vdup_n_u8((uint8_t)m), vdup_n_u8((uint8_t)(m >> 8)));
        out = vorrq_u8(out, vandq_u8(vtstq_u8(b, select), vdupq_n_u8((uint8_t)(16 << e))));
    }
    return out;
}

/* Decode, float activations, NEON: each 16 bytes of a 64-byte group are four rows x 4 columns
   (q8) or four rows x 8 columns as nibbles (q4); accumulator j holds row j's 4 columns. */
static void panel_decode_f32_neon(const em_weight *w, int p, const float *x, const float *xsum, float *y) {
    const int nb = em_blocks(w), B = w->block;
    float32x4_t total[PANEL];
    float minimum_total[PANEL] = {0};
    for (int j = 0; j < PANEL; j++) total[j] = vdupq_n_f32(0.0f);
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = block_data(w, p, b);
        const float *xb = x + (size_t)b * B;
        const int len = block_len(w, b);
        float32x4_t acc[PANEL];
        for (int j = 0; j < PANEL; j++) acc[j] = vdupq_n_f32(0.0f);
        const int step = group_columns(w), H = high_bits(w);
        const size_t G = group_bytes(w);
        for (int g = 0; g < len / step; g++) {
            const uint8_t *group = blk + G * g;
            __builtin_prefetch(group + EM_PREFETCH);
            const float32x4_t xlo = vld1q_f32(xb + step * g), xhi = nibbles(w) ? vld1q_f32(xb + 8 * g + 4) : xlo;
            for (int r = 0; r < 4; r++) {
                const uint8x16_t v = vld1q_u8(group + 16 * r);
                uint8x16_t lo = nibbles(w) ? vandq_u8(v, vdupq_n_u8(15)) : v;
                if (H) lo = vorrq_u8(lo, neon_high_bits(group, H, 0, r));
                const uint16x8_t lo01 = vmovl_u8(vget_low_u8(lo)), lo23 = vmovl_u8(vget_high_u8(lo));
                const uint16x4_t rows_lo[4] = {vget_low_u16(lo01), vget_high_u16(lo01), vget_low_u16(lo23), vget_high_u16(lo23)};
                for (int i = 0; i < 4; i++)
                    acc[4 * r + i] = vfmaq_f32(acc[4 * r + i], vcvtq_f32_u32(vmovl_u16(rows_lo[i])), xlo);
                if (nibbles(w)) {
                    uint8x16_t hi = vshrq_n_u8(v, 4);
                    if (H) hi = vorrq_u8(hi, neon_high_bits(group, H, 1, r));
                    const uint16x8_t hi01 = vmovl_u8(vget_low_u8(hi)), hi23 = vmovl_u8(vget_high_u8(hi));
                    const uint16x4_t rows_hi[4] = {vget_low_u16(hi01), vget_high_u16(hi01), vget_low_u16(hi23), vget_high_u16(hi23)};
                    for (int i = 0; i < 4; i++)
                        acc[4 * r + i] = vfmaq_f32(acc[4 * r + i], vcvtq_f32_u32(vmovl_u16(rows_hi[i])), xhi);
                }
            }
        }
        float d[PANEL], m[PANEL];
        block_scales(w, p, b, d);
        block_minimums(w, p, b, d, m);
        for (int j = 0; j < PANEL; j++) {
            total[j] = vfmaq_n_f32(total[j], acc[j], d[j]);
            minimum_total[j] += m[j] * xsum[b];
        }
    }
    float out[PANEL];
    for (int j = 0; j < PANEL; j++) out[j] = minimum_total[j] + vaddvq_f32(total[j]);
    store_panel(out, p, w->n, y);
}
#endif

/* One activation row against panel p, float activations (xsum: the row's sum per block). */
static void panel_float_row(const em_weight *w, int p, const float *x, const float *xsum, float *y) {
#if EM_AVX512
    panel_decode_f32(w, p, x, xsum, 1, 0, y);
#elif EM_AVX2
    panel_decode_f32_avx2(w, p, x, xsum, 1, 0, y);
#elif EM_NEON
    panel_decode_f32_neon(w, p, x, xsum, y);
#else
    (void)xsum;
    float wf[(size_t)w->k * PANEL];
    panel_floats(w, p, wf);
    panel_times_rows(wf, w->k, x, 1, p, w->n, y);
#endif
}

/* Rows of x (K apart; xsum rows of em_blocks, y rows ys apart) against panel p, each exactly as
   panel_float_row computes it alone. AVX-512 and AVX2 unpack each group once for up to EM_DECODE_ROWS rows
   (a verify call, a batched step): unpacking, not the multiply-adds, is most of a row's cost. */
static void panel_float_rows(const em_weight *w, int p, const float *x, const float *xsum, int rows, size_t ys, float *y) {
    const size_t K = (size_t)w->k, nb = (size_t)em_blocks(w);
#if EM_AVX512 || EM_AVX2
#if EM_AVX512
#define PANEL_DECODE panel_decode_f32
#else
#define PANEL_DECODE panel_decode_f32_avx2
#endif
    for (int s = 0, passes = (rows + EM_DECODE_ROWS - 1) / EM_DECODE_ROWS; s < rows; passes--) {
        const int R = (rows - s + passes - 1) / passes; /* even passes: 6 rows as 3 + 3, not 5 + 1 */
        switch (R) { /* the row count a constant in each case */
        case 1: PANEL_DECODE(w, p, x + s * K, xsum + s * nb, 1, ys, y + s * ys); break;
        case 2: PANEL_DECODE(w, p, x + s * K, xsum + s * nb, 2, ys, y + s * ys); break;
        case 3: PANEL_DECODE(w, p, x + s * K, xsum + s * nb, 3, ys, y + s * ys); break;
#if EM_DECODE_ROWS > 4
        case 4: PANEL_DECODE(w, p, x + s * K, xsum + s * nb, 4, ys, y + s * ys); break;
#endif
        default: PANEL_DECODE(w, p, x + s * K, xsum + s * nb, EM_DECODE_ROWS, ys, y + s * ys);
        }
        s += R;
    }
#undef PANEL_DECODE
#else
    for (int s = 0; s < rows; s++) panel_float_row(w, p, x + s * K, xsum + s * nb, y + s * ys);
#endif
}

/* Prefill matmuls hand out panels as threads ask for them (EM_PREFILL_SCHEDULE): a thread that
   other work on the core deschedules holds up one panel, not its half of the matrix. */
#define EM_PREFILL_SCHEDULE schedule(dynamic, 2)


/* A float32 or bfloat16 weight's panel p in panel_floats' layout: wf[k * 16 + j] = row 16p + j's
   weight at column k (zeros past the last row). AVX-512 widens and transposes 16 x 16 tiles. */
static void panel_widened(const em_weight *w, int p, float *wf) {
    const int K = w->k, rows = w->n - p * PANEL < PANEL ? w->n - p * PANEL : PANEL;
    const float *f = (const float *)w->data + (size_t)p * PANEL * K;
    const uint16_t *h = (const uint16_t *)w->data + (size_t)p * PANEL * K;
    int k0 = 0;
#if EM_AVX512
    for (; rows == PANEL && k0 + 16 <= K; k0 += 16) {
        __m512 r[16];
        for (int j = 0; j < PANEL; j++)
            r[j] = w->kind == EM_F32 ? _mm512_loadu_ps(f + (size_t)j * K + k0)
                                     : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                           _mm256_loadu_si256((const __m256i *)(h + (size_t)j * K + k0))), 16));
        em_transpose16(r);
        for (int i = 0; i < 16; i++) _mm512_storeu_ps(wf + (size_t)(k0 + i) * PANEL, r[i]);
    }
#endif
    for (int j = 0; j < PANEL; j++) {
        float *dst = wf + j;
        for (int k = k0; k < K; k++) {
            uint32_t bits = 0; /* bfloat16: the high half of a float */
            if (j < rows && w->kind == EM_F32) memcpy(&bits, f + (size_t)j * K + k, 4);
            else if (j < rows) bits = (uint32_t)h[(size_t)j * K + k] << 16;
            memcpy(dst + (size_t)k * PANEL, &bits, 4);
        }
    }
}

/* Rows of x taken together against one panel: a block of them stays in the core's cache while
   the team's panels pass over it (each panel widened or dequantized again per block, 1/256 of
   its multiply-adds). */
#define EM_ROW_BLOCK 256

#if EM_AVX512
/* Two panels (32 outputs) against 8 rows at a time: 16 accumulators, and per column two weight
   loads and 8 broadcasts for 16 multiply-adds (one panel against 8 rows takes 9 for 8, which
   the load ports, not the multipliers, then limit). */
static void panels_times_rows(const float *wf0, const float *wf1, int K, const float *x, int S, int p, int N, float *y) {
    int s = 0;
    for (; s + 8 <= S; s += 8) {
        __m512 a0[8], a1[8];
        for (int t = 0; t < 8; t++) a0[t] = a1[t] = _mm512_setzero_ps();
        const float *xs = x + (size_t)s * K;
        for (int k = 0; k < K; k++) {
            const __m512 w0 = _mm512_loadu_ps(wf0 + (size_t)k * PANEL), w1 = _mm512_loadu_ps(wf1 + (size_t)k * PANEL);
            for (int t = 0; t < 8; t++) {
                const __m512 xk = _mm512_set1_ps(xs[(size_t)t * K + k]);
                a0[t] = _mm512_fmadd_ps(w0, xk, a0[t]);
                a1[t] = _mm512_fmadd_ps(w1, xk, a1[t]);
            }
        }
        for (int t = 0; t < 8; t++) {
            float out[PANEL];
            _mm512_storeu_ps(out, a0[t]);
            store_panel(out, p, N, y + (size_t)(s + t) * N);
            _mm512_storeu_ps(out, a1[t]);
            store_panel(out, p + 1, N, y + (size_t)(s + t) * N);
        }
    }
    panel_times_rows(wf0, K, x + (size_t)s * K, S - s, p, N, y + (size_t)s * N);
    panel_times_rows(wf1, K, x + (size_t)s * K, S - s, p + 1, N, y + (size_t)s * N);
}
#define EM_PANELS_PER_ITEM 2
#else
#define EM_PANELS_PER_ITEM 1
#endif

static void panel_of(const em_weight *w, int p, float *wf) {
    if (em_integer_kind(w->kind)) panel_floats(w, p, wf);
    else panel_widened(w, p, wf);
}

/* y = x @ W^T with float activations, any weight kind but the codebooks: items of (a block of
   rows, EM_PANELS_PER_ITEM panels of 16 outputs), each panel in floats once per item. */
void em_matmul_rows(const float *x, int S, const em_weight *w, float *y) {
    const int K = w->k, P = panels(w), blocks = (S + EM_ROW_BLOCK - 1) / EM_ROW_BLOCK;
    /* two panels per item only while they take at most 1 MB of each thread's stack (K <= 8192) */
    const int per_item = (size_t)EM_PANELS_PER_ITEM * K * PANEL * sizeof(float) <= ((size_t)1 << 20) ? EM_PANELS_PER_ITEM : 1;
    const int items = (P + per_item - 1) / per_item;
#pragma omp parallel
    {
        float wf[(size_t)per_item * K * PANEL];
#pragma omp for EM_PREFILL_SCHEDULE
        for (int item = 0; item < blocks * items; item++) {
            const int b = item / items, p = item % items * per_item, first = b * EM_ROW_BLOCK;
            const int rows = S - first < EM_ROW_BLOCK ? S - first : EM_ROW_BLOCK;
            const float *xb = x + (size_t)first * K;
            float *yb = y + (size_t)first * w->n;
            panel_of(w, p, wf);
#if EM_AVX512
            if (per_item == 2 && p + 1 < P) {
                panel_of(w, p + 1, wf + (size_t)K * PANEL);
                panels_times_rows(wf, wf + (size_t)K * PANEL, K, xb, rows, p, w->n, yb);
                continue;
            }
#endif
            panel_times_rows(wf, K, xb, rows, p, w->n, yb);
        }
    }
}

/* ---- int8 activations ------------------------------------------------------------------ */

/* One block: xq = round(x / scale) (to nearest even), scale = max|x| / 127; returns sum(xq). */
static int quantize_block(const float *x, int len, int8_t *xq, float *scale) {
    float top = 0.0f;
    int c = 0, total = 0;
#if EM_AVX512
    if (len % 16 == 0) {
        __m512 m = _mm512_setzero_ps();
        for (; c < len; c += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + c)));
        top = _mm512_reduce_max_ps(m);
        const __m512 inv = _mm512_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
        __m512i sum = _mm512_setzero_si512();
        for (c = 0; c < len; c += 16) {
            const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + c), inv));
            _mm_storeu_si128((__m128i *)(xq + c), _mm512_cvtepi32_epi8(q));
            sum = _mm512_add_epi32(sum, q);
        }
        *scale = top / 127.0f;
        return _mm512_reduce_add_epi32(sum);
    }
#endif
    for (c = 0; c < len; c++) {
        const float a = fabsf(x[c]);
        top = a > top ? a : top;
    }
    const float inv = top > 0.0f ? 127.0f / top : 0.0f;
    for (c = 0; c < len; c++) {
        xq[c] = (int8_t)lrintf(x[c] * inv);
        total += xq[c];
    }
    *scale = top / 127.0f;
    return total;
}

/* Rows first..first+count-1, per weight block: xq, dx (the scale), xn = sum(xq) and xs = dx * sum(xq). */
static void quantize_rows(const float *x, int first, int count, const em_weight *w, int8_t *xq, float *dx, int32_t *xn,
                          float *xs) {
    const int K = w->k, nb = em_blocks(w);
    for (int s = first; s < first + count; s++)
        for (int b = 0; b < nb; b++) {
            const size_t at = (size_t)s * K + (size_t)b * w->block, i = (size_t)s * nb + b;
            xn[i] = quantize_block(x + at, block_len(w, b), xq + at, &dx[i]);
            xs[i] = dx[i] * (float)xn[i];
        }
}

static inline int32_t four_bytes(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* ---- a LoRA branch's down-projection on the quantized rows ------------------------------ */

/* t[s][c] = scale * A[c] . x'_s for rows whose x' the matmul has quantized (xq, dx and xn = sum(xq)
   per block), A as em_lora.a_quads: per block an exact integer sum_k A[c][k] xq[k], then
   fma(sum, dx, total) in the order of the blocks; so every instruction set gets the same t. With
   the activations the base already quantized, the branch costs integer dot products (4 inputs per
   lane per instruction) instead of widening A and multiplying floats, and A is read once, in order. */
#if (EM_AVX512 || EM_AVX2) && defined(__FMA__) /* (AVX-512 F without FMA, an odd -march: the portable C) */
#define EM_QUADS_X86 1
/* 8 components' sums of 4 products (A[c][4q..4q+3] . xq[4q..4q+3]) added to acc. VNNI's vpdpbusd
   multiplies A + 128 (unsigned) by xq: 128 * sum(xq) too much, taken off per block
   (QUADS_SHIFTED). Without it, vpmaddubsw takes |A| and xq with A's sign; its 16-bit pair sums
   stay below 2 x 128 x 127, no overflow. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define QUADS_SHIFTED 1
static inline __m256i quads_dot(__m256i acc, __m256i p, __m256i x4) { return _mm256_dpbusd_epi32(acc, p, x4); }
#elif defined(__AVXVNNI__)
#define QUADS_SHIFTED 1
static inline __m256i quads_dot(__m256i acc, __m256i p, __m256i x4) { return _mm256_dpbusd_avx_epi32(acc, p, x4); }
#else
#define QUADS_SHIFTED 0
static inline __m256i quads_dot(__m256i acc, __m256i p, __m256i x4) {
    const __m256i a = _mm256_xor_si256(p, _mm256_set1_epi8((char)0x80)); /* A, signed */
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(a), _mm256_sign_epi8(x4, a));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#endif

/* R rows (a compile-time constant after inlining: the sums stay in registers) of one group of 8
   components: each load of A serves every row. */
static inline __attribute__((always_inline)) void quads_group(const uint8_t *group, int K, int B, int R, const int8_t *xq,
                                                             const float *dx, const int32_t *xn, float *out) {
    const int Q = K / 4, nb = (K + B - 1) / B;
    __m256 total[4];
    for (int r = 0; r < R; r++) total[r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m256i sum[4];
        for (int r = 0; r < R; r++) sum[r] = _mm256_setzero_si256();
        const int last = (b + 1) * B / 4 < Q ? (b + 1) * B / 4 : Q;
        for (int q = b * B / 4; q < last; q++) {
            const __m256i p = _mm256_loadu_si256((const __m256i *)(group + (size_t)q * 32));
            for (int r = 0; r < R; r++) sum[r] = quads_dot(sum[r], p, _mm256_set1_epi32(four_bytes(xq + (size_t)r * K + 4 * q)));
        }
        for (int r = 0; r < R; r++) {
            if (QUADS_SHIFTED) sum[r] = _mm256_sub_epi32(sum[r], _mm256_set1_epi32(128 * xn[(size_t)r * nb + b]));
            total[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r]), _mm256_set1_ps(dx[(size_t)r * nb + b]), total[r]);
        }
    }
    for (int r = 0; r < R; r++) _mm256_storeu_ps(out + 8 * r, total[r]);
}
#endif

void em_lora_down_quads(const em_lora *l, int rows, const int8_t *xq, const float *dx, const int32_t *xn, int K, int B,
                        float *t) {
    const int C = l->columns, groups = (C + 7) / 8, Q = K / 4, nb = (K + B - 1) / B;
    for (int s = 0; s < rows;) {
        const int R = rows - s >= 4 ? 4 : 1;
        const int8_t *x = xq + (size_t)s * K;
        const float *d = dx + (size_t)s * nb;
        const int32_t *n = xn + (size_t)s * nb; /* (only vpdpbusd's shifted sums need them) */
        (void)n;
        for (int g = 0; g < groups; g++) {
            const uint8_t *group = l->a_quads + (size_t)g * Q * 32;
            float out[4 * 8]; /* row r's 8 components */
#if EM_QUADS_X86
            if (R == 4) quads_group(group, K, B, 4, x, d, n, out);
            else quads_group(group, K, B, 1, x, d, n, out);
#else /* (NEON too: the tests cannot run a LoRA branch on aarch64 here, so it keeps the tested C) */
            for (int r = 0; r < R; r++)
                for (int j = 0; j < 8; j++) {
                    float total = 0.0f;
                    for (int b = 0; b < nb; b++) {
                        int32_t sum = 0;
                        const int last = (b + 1) * B / 4 < Q ? (b + 1) * B / 4 : Q;
                        for (int q = b * B / 4; q < last; q++)
                            for (int i = 0; i < 4; i++) sum += ((int32_t)group[((size_t)q * 8 + j) * 4 + i] - 128) * x[(size_t)r * K + 4 * q + i];
                        total = fmaf((float)sum, d[(size_t)r * nb + b], total);
                    }
                    out[8 * r + j] = total;
                }
#endif
            for (int r = 0; r < R; r++)
                for (int j = 0; j < 8 && 8 * g + j < C; j++) {
                    const int c = 8 * g + j;
                    t[(size_t)(s + r) * C + c] = l->scale * (out[8 * r + j] * l->a_scale[c] * l->b_scale[c]);
                }
        }
        s += R;
    }
}

/* The branch's second half, y += t . B: t quantized per row to int16 (one scale, max|t| / 32767:
   int8 here raised the branch's logit error against float activations by half, 0.0062 -> 0.0096
   mean on a test model; int16 stays at float's), then per output an exact integer sum over the components and
   fma(sum, scale, y), so every instruction set gets the same y. B (int8) is read in pairs of
   components per output and widened to int16 (vpdpwssd: 2 products per lane). tq rows are
   TQ_STRIDE(columns) int16: the components rounded up to 2 and 2 spare, since a panel of a fused
   matmul may read one pair past its part (B is 0 there). Sums stay within int32 for up to 512
   columns (32767 x 128 x 512 = 2^31): wider branches keep float factors (runtime/native.py). */
#define TQ_STRIDE(columns) (((columns) + 1) / 2 * 2 + 2)

static void lora_quantize_t(const float *t, int rows, int C, int16_t *tq, float *st) {
    for (int r = 0; r < rows; r++) {
        const float *row = t + (size_t)r * C;
        int16_t *q = tq + (size_t)r * TQ_STRIDE(C);
        float top = 0.0f;
        for (int c = 0; c < C; c++) top = fabsf(row[c]) > top ? fabsf(row[c]) : top;
        const float inv = top > 0.0f ? 32767.0f / top : 0.0f;
        for (int c = 0; c < TQ_STRIDE(C); c++) q[c] = c < C ? (int16_t)lrintf(row[c] * inv) : 0;
        st[r] = top / 32767.0f;
    }
}

static inline int32_t two_halves(const int16_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Rows r < rows (tq rows TQ_STRIDE apart, y rows n apart) of panel p: y_r[16p + j] += st_r * sum_c tq_r[c] B[c][16p + j]. */
static void lora_up_pairs(const em_lora *l, const int16_t *tq, const float *st, int rows, int p, int n, float *y) {
    const int first = p * 16, count = n - first < 16 ? n - first : 16, stride = TQ_STRIDE(l->columns);
    const int PC = l->panel_offset ? l->panel_columns : l->columns, pairs = (PC + 1) / 2;
    const int8_t *b = l->b_pairs + (size_t)p * pairs * 32;
    tq += l->panel_offset ? l->panel_offset[p] : 0; /* this panel's components */
    for (int r = 0; r < rows; r++) {
        const int16_t *t = tq + (size_t)r * stride;
        float *yr = y + (size_t)r * n + first;
        int32_t sum[16];
#if EM_AVX512 && defined(__AVX512BW__) /* (AVX-512 F alone: the AVX2 code) */
        __m512i acc = _mm512_setzero_si512();
        for (int q = 0; q < pairs; q++) {
            const __m512i bq = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(b + 32 * q)));
            const __m512i t2 = _mm512_set1_epi32(two_halves(t + 2 * q));
#if defined(__AVX512VNNI__)
            acc = _mm512_dpwssd_epi32(acc, t2, bq);
#else
            acc = _mm512_add_epi32(acc, _mm512_madd_epi16(t2, bq));
#endif
        }
        if (count == 16) { /* (a masked load of the outputs just stored would wait for the stores to finish) */
            _mm512_storeu_ps(yr, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(st[r]), _mm512_loadu_ps(yr)));
            continue;
        }
        _mm512_storeu_si512(sum, acc);
#elif EM_AVX512 || EM_AVX2
        __m256i acc[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int q = 0; q < pairs; q++) {
            const __m256i t2 = _mm256_set1_epi32(two_halves(t + 2 * q));
            for (int h = 0; h < 2; h++)
                acc[h] = _mm256_add_epi32(acc[h], _mm256_madd_epi16(t2, _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 32 * q + 16 * h)))));
        }
        _mm256_storeu_si256((__m256i *)sum, acc[0]);
        _mm256_storeu_si256((__m256i *)(sum + 8), acc[1]);
#else
        for (int j = 0; j < 16; j++) {
            sum[j] = 0;
            for (int q = 0; q < pairs; q++) sum[j] += (int32_t)t[2 * q] * b[32 * q + 2 * j] + (int32_t)t[2 * q + 1] * b[32 * q + 2 * j + 1];
        }
#endif
        for (int j = 0; j < count; j++) yr[j] = fmaf((float)sum[j], st[r], yr[j]);
    }
}

#if defined(__AVX512VNNI__) && EM_AVX512
/* T activation rows (T <= 8, a compile-time constant after inlining) against panel p. */
static inline __attribute__((always_inline)) void panel_int8_vnni(const em_weight *w, int p, const int8_t *xq,
                                                                   const float *dx, const int32_t *xn, const float *xs,
                                                                   int s0, int T,
                                                                   float *y) {
    const int K = w->k, nb = em_blocks(w), B = w->block;
    const __m512i low = _mm512_set1_epi8(15);
    __m512 acc[8];
    for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = block_data(w, p, b);
        const int len = block_len(w, b);
        __m512i bacc[8];
        for (int t = 0; t < T; t++) bacc[t] = _mm512_setzero_si512();
        if (nibbles(w)) {
            const int H = high_bits(w);
            const size_t G = group_bytes(w);
            for (int g = 0; g < len / 8; g++) {
                const uint8_t *group = blk + G * g;
                _mm_prefetch((const char *)group + EM_PREFETCH, _MM_HINT_T0);
                const __m512i v = _mm512_loadu_si512(group);
                __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                for (int e = 0; e < H; e++) { /* q5, q6: byte i's bits 4 (and 5) from the masks */
                    const __m512i bit = _mm512_set1_epi8((char)(16 << e));
                    lo = _mm512_mask_add_epi8(lo, (__mmask64)high_mask(group, e, 0), lo, bit);
                    hi = _mm512_mask_add_epi8(hi, (__mmask64)high_mask(group, e, 1), hi, bit);
                }
                for (int t = 0; t < T; t++) {
                    const int8_t *xr = xq + (size_t)(s0 + t) * K + (size_t)b * B + 8 * g;
                    bacc[t] = _mm512_dpbusd_epi32(bacc[t], lo, _mm512_set1_epi32(four_bytes(xr)));
                    bacc[t] = _mm512_dpbusd_epi32(bacc[t], hi, _mm512_set1_epi32(four_bytes(xr + 4)));
                }
            }
        } else {
            for (int g = 0; g < len / 4; g++) {
                _mm_prefetch((const char *)blk + 64 * g + EM_PREFETCH, _MM_HINT_T0);
                const __m512i v = _mm512_loadu_si512(blk + 64 * g);
                for (int t = 0; t < T; t++) {
                    const int8_t *xr = xq + (size_t)(s0 + t) * K + (size_t)b * B + 4 * g;
                    bacc[t] = _mm512_dpbusd_epi32(bacc[t], v, _mm512_set1_epi32(four_bytes(xr)));
                }
            }
        }
        const __m512 d = scales16(w, p, b);
        const __m512 m = w->minimum ? minimums16(w, p, b, d) : _mm512_setzero_ps();
        for (int t = 0; t < T; t++) {
            const size_t i = (size_t)(s0 + t) * nb + b;
            if (!w->minimum) /* symmetric: the signed values' dot product, exactly */
                bacc[t] = _mm512_sub_epi32(bacc[t], _mm512_set1_epi32((int32_t)w->shift * xn[i]));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(bacc[t]), _mm512_mul_ps(d, _mm512_set1_ps(dx[i])), acc[t]);
            if (w->minimum) acc[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(xs[i]), acc[t]);
        }
    }
    for (int t = 0; t < T; t++) {
        float out[PANEL];
        _mm512_storeu_ps(out, acc[t]);
        store_panel(out, p, w->n, y + (size_t)(s0 + t) * w->n);
    }
}
#endif

#if defined(__ARM_FEATURE_DOTPROD) && defined(__aarch64__)
/* ARMv8.2 dot product: vdotq_s32 sums 4 byte products per lane, 4 rows per 16-byte load. */
static void panel_int8_neon(const em_weight *w, int p, const int8_t *xq, const float *dx, const int32_t *xn,
                            const float *xs, int s0, int T, float *y) {
    const int K = w->k, nb = em_blocks(w), B = w->block;
    for (int t = 0; t < T; t++) {
        float32x4_t acc[4] = {vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0)};
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = block_data(w, p, b);
            const int8_t *xr = xq + (size_t)(s0 + t) * K + (size_t)b * B;
            const size_t i = (size_t)(s0 + t) * nb + b;
            int32x4_t bacc[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
            if (nibbles(w)) { /* values 0..63 are valid signed bytes */
                const int H = high_bits(w);
                const size_t G = group_bytes(w);
                for (int g = 0; g < block_len(w, b) / 8; g++) {
                    const uint8_t *group = blk + G * g;
                    __builtin_prefetch(group + EM_PREFETCH);
                    const int8x16_t lo_x = vreinterpretq_s8_s32(vdupq_n_s32(four_bytes(xr + 8 * g)));
                    const int8x16_t hi_x = vreinterpretq_s8_s32(vdupq_n_s32(four_bytes(xr + 8 * g + 4)));
                    for (int r = 0; r < 4; r++) {
                        const uint8x16_t v = vld1q_u8(group + 16 * r);
                        uint8x16_t lo = vandq_u8(v, vdupq_n_u8(15)), hi = vshrq_n_u8(v, 4);
                        if (H) {
                            lo = vorrq_u8(lo, neon_high_bits(group, H, 0, r));
                            hi = vorrq_u8(hi, neon_high_bits(group, H, 1, r));
                        }
                        bacc[r] = vdotq_s32(bacc[r], vreinterpretq_s8_u8(lo), lo_x);
                        bacc[r] = vdotq_s32(bacc[r], vreinterpretq_s8_u8(hi), hi_x);
                    }
                }
            } else { /* u = (u - 128) + 128: signed bytes, then 128 * sum(xq) back */
                for (int g = 0; g < block_len(w, b) / 4; g++) {
                    __builtin_prefetch(blk + 64 * g + EM_PREFETCH);
                    const int8x16_t x4 = vreinterpretq_s8_s32(vdupq_n_s32(four_bytes(xr + 4 * g)));
                    for (int r = 0; r < 4; r++) {
                        const uint8x16_t v = vld1q_u8(blk + 64 * g + 16 * r);
                        bacc[r] = vdotq_s32(bacc[r], vreinterpretq_s8_u8(veorq_u8(v, vdupq_n_u8(0x80))), x4);
                    }
                }
                for (int r = 0; r < 4; r++) bacc[r] = vaddq_s32(bacc[r], vdupq_n_s32(128 * xn[i]));
            }
            float d[PANEL], m[PANEL];
            block_scales(w, p, b, d);
            block_minimums(w, p, b, d, m);
            for (int r = 0; r < 4; r++) {
                const float32x4_t dr = vld1q_f32(d + 4 * r), mr = vld1q_f32(m + 4 * r);
                if (!w->minimum) bacc[r] = vsubq_s32(bacc[r], vdupq_n_s32((int32_t)w->shift * xn[i])); /* signed, exactly */
                acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(bacc[r]), vmulq_n_f32(dr, dx[i]));
                if (w->minimum) acc[r] = vfmaq_n_f32(acc[r], mr, xs[i]);
            }
        }
        float out[PANEL];
        for (int r = 0; r < 4; r++) vst1q_f32(out + 4 * r, acc[r]);
        store_panel(out, p, w->n, y + (size_t)(s0 + t) * w->n);
    }
}
#endif

#if EM_AVX2
/* AVX2: 8 rows per 32 bytes. AVX-VNNI's vpdpbusd where the CPU has it; otherwise vpmaddubsw,
   whose 16-bit pair sums cannot overflow for q4 (2 x 15 x 127). q8 values (0..255) could: they
   are taken as signed (value - 128, so |value| <= 128 fits vpmaddubsw's unsigned side and the
   sign moves to the activation), and 128 x sum(xq) is added back per block. */
static inline __m256i dot_u8_s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

/* 32 mask bits -> 32 bytes of `value` or 0 (byte i: bit i). */
static inline __m256i bits_to_bytes(uint32_t bits, int value) {
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3,
                                            3, 3, 3, 3, 3); /* byte i <- source byte i / 8 */
    const __m256i select = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(bytes, select), select), _mm256_set1_epi8((char)value));
}

static void panel_int8_avx2(const em_weight *w, int p, const int8_t *xq, const float *dx, const int32_t *xn,
                            const float *xs, int s0, int T, float *y) {
    const int K = w->k, nb = em_blocks(w), B = w->block;
    const __m256i low = _mm256_set1_epi8(15);
    for (int t = 0; t < T; t++) {
        __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = block_data(w, p, b);
            const int8_t *xr = xq + (size_t)(s0 + t) * K + (size_t)b * B;
            const size_t i = (size_t)(s0 + t) * nb + b;
            __m256i bacc[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
            if (nibbles(w)) { /* q5, q6 values (< 64) keep vpmaddubsw's pair sums in range too */
                const int H = high_bits(w);
                const size_t G = group_bytes(w);
                for (int g = 0; g < block_len(w, b) / 8; g++) {
                    const uint8_t *group = blk + G * g;
                    __builtin_prefetch(group + EM_PREFETCH);
                    const __m256i lo_x = _mm256_set1_epi32(four_bytes(xr + 8 * g)), hi_x = _mm256_set1_epi32(four_bytes(xr + 8 * g + 4));
                    for (int h = 0; h < 2; h++) {
                        const __m256i v = _mm256_loadu_si256((const __m256i *)(group + 32 * h));
                        __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                        for (int e = 0; e < H; e++) {
                            lo = _mm256_add_epi8(lo, bits_to_bytes((uint32_t)(high_mask(group, e, 0) >> (32 * h)), 16 << e));
                            hi = _mm256_add_epi8(hi, bits_to_bytes((uint32_t)(high_mask(group, e, 1) >> (32 * h)), 16 << e));
                        }
                        bacc[h] = dot_u8_s8(bacc[h], lo, lo_x);
                        bacc[h] = dot_u8_s8(bacc[h], hi, hi_x);
                    }
                }
            } else {
                for (int g = 0; g < block_len(w, b) / 4; g++) {
                    __builtin_prefetch(blk + 64 * g + EM_PREFETCH);
                    const __m256i x4 = _mm256_set1_epi32(four_bytes(xr + 4 * g));
                    for (int h = 0; h < 2; h++) {
                        const __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 64 * g + 32 * h));
#if defined(__AVXVNNI__)
                        bacc[h] = dot_u8_s8(bacc[h], v, x4);
#else
                        const __m256i sv = _mm256_xor_si256(v, _mm256_set1_epi8((char)0x80));
                        bacc[h] = dot_u8_s8(bacc[h], _mm256_sign_epi8(sv, sv), _mm256_sign_epi8(x4, sv));
#endif
                    }
                }
#if !defined(__AVXVNNI__)
                for (int h = 0; h < 2; h++) bacc[h] = _mm256_add_epi32(bacc[h], _mm256_set1_epi32(128 * xn[i]));
#endif
            }
            float ds[PANEL], ms[PANEL];
            block_scales(w, p, b, ds);
            block_minimums(w, p, b, ds, ms);
            for (int h = 0; h < 2; h++) {
                const __m256 d = _mm256_loadu_ps(ds + 8 * h), m = _mm256_loadu_ps(ms + 8 * h);
                if (!w->minimum) /* symmetric: the signed values' dot product, exactly */
                    bacc[h] = _mm256_sub_epi32(bacc[h], _mm256_set1_epi32((int32_t)w->shift * xn[i]));
                acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(bacc[h]), _mm256_mul_ps(d, _mm256_set1_ps(dx[i])), acc[h]);
                if (w->minimum) acc[h] = _mm256_fmadd_ps(m, _mm256_set1_ps(xs[i]), acc[h]);
            }
        }
        float out[PANEL];
        _mm256_storeu_ps(out, acc[0]);
        _mm256_storeu_ps(out + 8, acc[1]);
        store_panel(out, p, w->n, y + (size_t)(s0 + t) * w->n);
    }
}
#endif

/* The same arithmetic in portable C (and the reference for the SIMD paths). */
__attribute__((unused)) static void panel_int8_portable(const em_weight *w, int p, const int8_t *xq, const float *dx,
                                                        const int32_t *xn, const float *xs, int s0,
                                int T, float *y) {
    const int K = w->k, nb = em_blocks(w), B = w->block;
    for (int t = 0; t < T; t++) {
        float acc[PANEL] = {0};
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = block_data(w, p, b);
            const int8_t *xr = xq + (size_t)(s0 + t) * K + (size_t)b * B;
            float d[PANEL], m[PANEL];
            block_scales(w, p, b, d);
            block_minimums(w, p, b, d, m);
            const size_t i = (size_t)(s0 + t) * nb + b;
            for (int j = 0; j < PANEL; j++) {
                int32_t dot = 0;
                for (int c = 0; c < block_len(w, b); c++) dot += stored_value(w, blk, j, c) * xr[c];
                /* fused multiply-adds, rounded as the SIMD paths round them */
                if (!w->minimum) dot -= (int32_t)w->shift * xn[i]; /* symmetric: signed, exactly */
                acc[j] = fmaf((float)dot, d[j] * dx[i], acc[j]);
                if (w->minimum) acc[j] = fmaf(m[j], xs[i], acc[j]);
            }
        }
        store_panel(acc, p, w->n, y + (size_t)(s0 + t) * w->n);
    }
}

/* Rows s0..s0+T-1 (T <= 8) of the int8-activation matmul against panel p, on the best path the
   target has. */
static inline __attribute__((always_inline)) void panel_int8(const em_weight *w, int p, const int8_t *xq,
                                                             const float *dx, const int32_t *xn, const float *xs,
                                                             int s0, int T, float *y) {
#if defined(__AVX512VNNI__) && EM_AVX512
    switch (T) { /* constant T per case: the accumulators stay in registers */
    case 1: panel_int8_vnni(w, p, xq, dx, xn, xs, s0, 1, y); break;
    case 2: panel_int8_vnni(w, p, xq, dx, xn, xs, s0, 2, y); break;
    case 3: panel_int8_vnni(w, p, xq, dx, xn, xs, s0, 3, y); break;
    case 4: panel_int8_vnni(w, p, xq, dx, xn, xs, s0, 4, y); break;
    case 5: panel_int8_vnni(w, p, xq, dx, xn, xs, s0, 5, y); break;
    case 6: panel_int8_vnni(w, p, xq, dx, xn, xs, s0, 6, y); break;
    case 7: panel_int8_vnni(w, p, xq, dx, xn, xs, s0, 7, y); break;
    default: panel_int8_vnni(w, p, xq, dx, xn, xs, s0, 8, y);
    }
#elif defined(__ARM_FEATURE_DOTPROD) && defined(__aarch64__)
    panel_int8_neon(w, p, xq, dx, xn, xs, s0, T, y);
#elif EM_AVX2
    panel_int8_avx2(w, p, xq, dx, xn, xs, s0, T, y);
#else
    panel_int8_portable(w, p, xq, dx, xn, xs, s0, T, y);
#endif
}

static void add_panel_residual(const float *residual, int p, int n, float *y) {
    const int first = p * PANEL, count = n - first < PANEL ? n - first : PANEL;
    for (int j = first; j < first + count; j++) y[j] += residual[j];
}

/* What a prefill matmul adds to each panel of outputs while they are in cache (em_matmul_fused):
   the LoRA branch (t [rows][columns]: its first half, em_lora_rows_down) and the residual [rows][N];
   either may be absent. A separate pass of each over y cost as much as the branch's products. */
typedef struct {
    const em_lora *lora;
    const float *t, *residual;
} panel_additions;

/* A branch with quads (no t given) runs here on the rows as quantized for the panels. */
static void matmul_int8_rows(const float *x, int S, const em_weight *w, float *y, const panel_additions *add) {
    const int K = w->k, nb = em_blocks(w);
    const em_lora *lora = add && add->lora && add->lora->columns > 0 ? add->lora : NULL;
    const int quads = lora && lora->a_quads && !add->t, C = lora ? lora->columns : 0;
    int8_t xq[(size_t)S * K];
    int16_t tq[quads ? (size_t)S * TQ_STRIDE(C) : 1];
    float dx[(size_t)S * nb], xs[(size_t)S * nb], t[quads ? (size_t)S * C : 1], st[S];
    int32_t xn[(size_t)S * nb];
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int s0 = 0; s0 < S; s0 += 4) { /* four rows at a time: what em_lora_down_quads takes together */
            const int rows = S - s0 < 4 ? S - s0 : 4;
            quantize_rows(x, s0, rows, w, xq, dx, xn, xs);
            if (quads) {
                em_lora_down_quads(lora, rows, xq + (size_t)s0 * K, dx + (size_t)s0 * nb, xn + (size_t)s0 * nb, K, w->block,
                                   t + (size_t)s0 * C);
                lora_quantize_t(t + (size_t)s0 * C, rows, C, tq + (size_t)s0 * TQ_STRIDE(C), st + s0);
            }
        }
#pragma omp for EM_PREFILL_SCHEDULE
        for (int p = 0; p < panels(w); p++)
            for (int s0 = 0; s0 < S; s0 += 8) {
                const int rows = S - s0 < 8 ? S - s0 : 8;
                panel_int8(w, p, xq, dx, xn, xs, s0, rows, y);
                if (quads) lora_up_pairs(lora, tq + (size_t)s0 * TQ_STRIDE(C), st + s0, rows, p, w->n, y + (size_t)s0 * w->n);
                else if (lora && add->t)
                    em_lora_panel_rows(lora, add->t + (size_t)s0 * C, rows, p, w->n, y + (size_t)s0 * w->n);
                for (int s = s0; add && add->residual && s < s0 + rows; s++)
                    add_panel_residual(add->residual + (size_t)s * w->n, p, w->n, y + (size_t)s * w->n);
            }
    }
}

/* The panel's outputs of one row: + the LoRA branch (t: the row's em_lora_down; or, with quads, tq
   and its scale st: lora_up_pairs), + the residual. */
static void finish_panel(const em_fusion *f, const float *t, const int16_t *tq, const float *st, const float *residual, int p,
                         int n, float *y) {
    if (tq) lora_up_pairs(f->lora, tq, st, 1, p, n, y);
    else if (t) em_lora_add(f->lora, t, n, p * PANEL, n - p * PANEL < PANEL ? n - p * PANEL : PANEL, y);
    if (residual) add_panel_residual(residual, p, n, y);
}

void em_team_matmul_integer(const float *x, const em_weight *w, float *y, const em_fusion *f) {
    const int K = w->k, nb = em_blocks(w), rows = em_fusion_rows(f);
    const size_t ys = f->y_stride ? (size_t)f->y_stride : (size_t)w->n;
    const size_t rs = f->residual_stride ? (size_t)f->residual_stride : (size_t)w->n;
    const int C = em_lora_on(f) ? f->lora->columns : 0, quads = C && f->lora->a_quads && w->int8_activations;
    /* The branch reads all of A before any panel: asked for now, it arrives while the input is
       prepared and quantized, rather than one cache miss at a time after. */
    for (size_t at = 0; quads && at < (size_t)((C + 7) / 8) * (K / 4) * 32; at += 64)
        __builtin_prefetch(f->lora->a_quads + at);
    float xp[(size_t)rows * K]; /* this thread's copy of the prepared input: no barrier before the panels */
    for (int s = 0; s < rows; s++) em_prepare_row(f, x, s, K, xp + (size_t)s * K);
    float t[(size_t)rows * C + 1];
    if (C && !quads) em_lora_down(f->lora, xp, rows, K, t);
    /* Each row is computed exactly as a one-row call computes it; the panel stays in cache for
       the rows after the first. */
    if (w->int8_activations) {
        int8_t xq[(size_t)rows * K];
        float dx[(size_t)rows * nb], xs[(size_t)rows * nb];
        int32_t xn[(size_t)rows * nb];
        quantize_rows(xp, 0, rows, w, xq, dx, xn, xs);
        int16_t tq[quads ? (size_t)rows * TQ_STRIDE(C) : 1];
        float st[rows];
        if (quads) {
            em_lora_down_quads(f->lora, rows, xq, dx, xn, K, w->block, t);
            lora_quantize_t(t, rows, C, tq, st);
        }
        /* rows N apart: one panel call for all of them (a row's sums do not depend on how many
           rows the call has, so each is still exactly the one-row result) */
        const int together = ys == (size_t)w->n;
#pragma omp for schedule(static)
        for (int p = 0; p < panels(w); p++) {
            if (together)
                for (int s0 = 0; s0 < rows; s0 += 8) panel_int8(w, p, xq, dx, xn, xs, s0, rows - s0 < 8 ? rows - s0 : 8, y);
            for (int s = 0; s < rows; s++) {
                const size_t i = (size_t)s * nb;
                if (!together) panel_int8(w, p, xq + (size_t)s * K, dx + i, xn + i, xs + i, 0, 1, y + s * ys);
                finish_panel(f, C ? t + (size_t)s * C : NULL, quads ? tq + (size_t)s * TQ_STRIDE(C) : NULL, st + s,
                             f->residual ? f->residual + s * rs : NULL, p, w->n, y + s * ys);
            }
        }
    } else {
        float xsum[(size_t)rows * nb];
        for (int s = 0; s < rows; s++)
            for (int b = 0; b < nb; b++) {
                float total = 0.0f;
                for (int c = 0; c < block_len(w, b); c++) total += xp[(size_t)s * K + b * w->block + c];
                xsum[(size_t)s * nb + b] = total;
            }
#pragma omp for schedule(static)
        for (int p = 0; p < panels(w); p++) {
            panel_float_rows(w, p, xp, xsum, rows, ys, y);
            for (int s = 0; s < rows; s++)
                finish_panel(f, C ? t + (size_t)s * C : NULL, NULL, NULL, f->residual ? f->residual + s * rs : NULL, p, w->n,
                             y + s * ys);
        }
    }
}

/* Activation rows quantized at a time: bounds the scratch on the caller's stack (64 x K bytes). */
#define EM_QUANTIZED_ROWS 64

static void matmul_int8_activations(const float *x, int S, const em_weight *w, float *y, const panel_additions *add) {
    for (int first = 0; first < S; first += EM_QUANTIZED_ROWS) {
        const int rows = S - first < EM_QUANTIZED_ROWS ? S - first : EM_QUANTIZED_ROWS;
        panel_additions part;
        if (add) {
            part = *add;
            if (part.t) part.t += (size_t)first * add->lora->columns;
            if (part.residual) part.residual += (size_t)first * w->n;
        }
        matmul_int8_rows(x + (size_t)first * w->k, rows, w, y + (size_t)first * w->n, add ? &part : NULL);
    }
}

int em_matmul_integer_finished(const float *x, int S, const em_weight *w, float *y, const em_lora *lora, const float *t,
                               const float *residual) {
    if (!em_integer_kind(w->kind) || !w->int8_activations) return 0;
    const panel_additions add = {lora, t, residual};
    matmul_int8_activations(x, S, w, y, &add);
    return 1;
}

void em_matmul_integer(const float *x, int S, const em_weight *w, float *y) {
    if (w->int8_activations) matmul_int8_activations(x, S, w, y, NULL);
    else if (!em_matmul_tiles(x, S, w, y)) em_matmul_rows(x, S, w, y);
}
