/* The integer LoRA branch (em_lora_down_quads, lora_up_pairs in edgellm_integer.c) against plain
   loops over the row-major factors: for the instruction set this file is compiled for, every value
   must be exactly what the integer sums and one fma per block give (test_lora.py compiles and runs
   it once per -march). Inputs are random: shapes with several blocks and a partial last one,
   component counts that are no multiple of 8 (a padded group) or odd (a padded pair), fused parts
   (panel_offset, a pair read past its part), rows in fours and singly. Prints the first mismatch;
   exit status 1 on one. */
#include "edgellm_integer.c"

#include <stdio.h>
#include <stdlib.h>

static int8_t random_int8(void) { return (int8_t)(rand() % 255 - 127); }

/* one shape: K inputs in blocks of B, C components (parts of C / parts each), N outputs */
static int check(int K, int B, int C, int parts, int N, int rows) {
    const int nb = (K + B - 1) / B, groups = (C + 7) / 8, rank = C / parts, P = (N + 15) / 16;
    int8_t *a = malloc((size_t)C * K), *b = calloc((size_t)C * N, 1), *xq = malloc((size_t)rows * K);
    uint8_t *quads = malloc((size_t)groups * 8 * K);
    float *x = malloc(sizeof(float) * rows * K), *dx = malloc(sizeof(float) * rows * nb), *t = malloc(sizeof(float) * rows * C);
    float *scale_a = malloc(sizeof(float) * C), *scale_b = malloc(sizeof(float) * C), st[64];
    int32_t *xn = malloc(sizeof(int32_t) * rows * nb);
    for (int i = 0; i < C * K; i++) a[i] = random_int8();
    for (int c = 0; c < C; c++) {
        scale_a[c] = 0.001f * (1 + rand() % 7);
        scale_b[c] = 0.002f * (1 + rand() % 5);
        for (int n = 0; n < N; n++) /* a fused matmul's part c / rank covers outputs of its own part only */
            if (parts == 1 || c / rank == n * parts / N) b[(size_t)c * N + n] = random_int8();
    }
    for (int g = 0; g < groups; g++) /* [C / 8][K / 4][8][4], A + 128 (runtime/native.py a_quads) */
        for (int q = 0; q < K / 4; q++)
            for (int j = 0; j < 8; j++)
                for (int i = 0; i < 4; i++)
                    quads[(((size_t)g * (K / 4) + q) * 8 + j) * 4 + i] =
                        8 * g + j < C ? (uint8_t)(a[(size_t)(8 * g + j) * K + 4 * q + i] + 128) : 128;
    int offsets[64];
    const int PC = parts > 1 ? rank : C, pairs = (PC + 1) / 2;
    int8_t *pairs_b = calloc((size_t)P * pairs * 32, 1); /* [N / 16][PC / 2][16][2] (runtime/native.py b_pairs) */
    for (int p = 0; p < P; p++) {
        offsets[p] = parts > 1 ? (16 * p * parts / N) * rank : 0;
        for (int q = 0; q < pairs; q++)
            for (int j = 0; j < 16 && 16 * p + j < N; j++)
                for (int i = 0; i < 2 && 2 * q + i < PC; i++)
                    pairs_b[(((size_t)p * pairs + q) * 16 + j) * 2 + i] = b[(size_t)(offsets[p] + 2 * q + i) * N + 16 * p + j];
    }
    em_lora l = {.columns = C, .int8 = 1, .a_scale = scale_a, .b_scale = scale_b, .scale = 0.75f, .a_quads = quads,
                 .b_pairs = pairs_b, .panel_columns = parts > 1 ? rank : 0, .panel_offset = parts > 1 ? offsets : NULL};
    for (int i = 0; i < rows * K; i++) x[i] = (float)rand() / RAND_MAX - 0.5f;
    for (int s = 0; s < rows; s++)
        for (int k = 0; k < nb; k++)
            xn[s * nb + k] = quantize_block(x + (size_t)s * K + k * B, K - k * B < B ? K - k * B : B, xq + (size_t)s * K + k * B,
                                            &dx[s * nb + k]);
    em_lora_down_quads(&l, rows, xq, dx, xn, K, B, t);
    for (int s = 0; s < rows; s++)
        for (int c = 0; c < C; c++) {
            float total = 0.0f;
            for (int k0 = 0; k0 < K; k0 += B) {
                int32_t sum = 0;
                for (int k = k0; k < K && k < k0 + B; k++) sum += a[(size_t)c * K + k] * xq[(size_t)s * K + k];
                total = fmaf((float)sum, dx[s * nb + k0 / B], total);
            }
            const float expected = l.scale * (total * scale_a[c] * scale_b[c]);
            if (t[s * C + c] != expected) {
                printf("down K=%d B=%d C=%d rows=%d: row %d component %d: %.9g, expected %.9g\n", K, B, C, rows, s, c,
                       t[s * C + c], expected);
                return 1;
            }
        }
    int16_t *tq = malloc(sizeof(int16_t) * rows * TQ_STRIDE(C));
    lora_quantize_t(t, rows, C, tq, st);
    float *y = malloc(sizeof(float) * rows * N), *start = malloc(sizeof(float) * rows * N);
    for (int i = 0; i < rows * N; i++) y[i] = start[i] = (float)rand() / RAND_MAX;
    for (int p = 0; p < P; p++) /* as the prefill panels call it: up to 8 rows at a time */
        for (int s0 = 0; s0 < rows; s0 += 8)
            lora_up_pairs(&l, tq + (size_t)s0 * TQ_STRIDE(C), st + s0, rows - s0 < 8 ? rows - s0 : 8, p, N, y + (size_t)s0 * N);
    for (int s = 0; s < rows; s++)
        for (int n = 0; n < N; n++) {
            int32_t sum = 0;
            for (int c = 0; c < C; c++) sum += tq[(size_t)s * TQ_STRIDE(C) + c] * b[(size_t)c * N + n];
            const float expected = fmaf((float)sum, st[s], start[s * N + n]);
            if (y[s * N + n] != expected) {
                printf("up C=%d parts=%d N=%d rows=%d: row %d output %d: %.9g, expected %.9g\n", C, parts, N, rows, s, n,
                       y[s * N + n], expected);
                return 1;
            }
        }
    free(a), free(b), free(xq), free(quads), free(x), free(dx), free(t), free(scale_a), free(scale_b), free(xn);
    free(pairs_b), free(tq), free(y), free(start);
    return 0;
}

int main(void) {
    srand(7);
    static const int shapes[][5] = { /* K, B, C, parts, N */
        {64, 32, 8, 1, 64}, {80, 32, 7, 1, 40}, {96, 96, 24, 3, 96}, {64, 16, 15, 3, 48}, {128, 32, 16, 2, 96}};
    static const int row_counts[] = {1, 3, 4, 9, 16};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        for (size_t r = 0; r < sizeof row_counts / sizeof row_counts[0]; r++)
            if (check(shapes[i][0], shapes[i][1], shapes[i][2], shapes[i][3], shapes[i][4], row_counts[r])) return 1;
    printf("ok\n");
    return 0;
}
