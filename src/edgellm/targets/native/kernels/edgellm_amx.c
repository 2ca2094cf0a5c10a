/* Matmuls of many rows on AMX tiles (Intel Sapphire Rapids and later), for bfloat16 weights.

   A bfloat16 weight is the compile manual's A_BF16_W_BF16: activations are bfloat16 too. On a CPU
   with AMX-BF16 (and a kernel that grants the tile state) the prefill and image-encoder matmuls
   round their activation rows to bfloat16 (to nearest even) and multiply on the tiles; each tile
   product is 16 x 16 outputs of 32 columns, accumulated in float32. One decode row, and CPUs
   without AMX, keep float32 activations (em_matmul_rows' panels), so a build's numbers depend on
   the CPU it runs on only through that rounding (what `em_bf16_tiles()` says).

   Layout: the activation rows, rounded, go once per call into a buffer of whole 32-row, 32-column
   tiles (zeros past the end); each thread packs its two weight panels (32 outputs) into the tiles'
   pair layout, tile[i][j] = (w[j][32c + 2i], w[j][32c + 2i + 1]), and runs every row block
   against them: 4 accumulator tiles (32 rows x 32 outputs), 2 activation tiles, 2 weight tiles.

   Integer weights with float activations (a GGUF's own blocks, the default build) keep float32's
   precision on the same tiles: a stored value (0 .. 255 at most) is exact in bfloat16, and each
   activation row is split into three bfloat16 parts whose sum is the float (8 + 8 + 8 significant
   bits), so the three tile products of a block sum x * value as a float32 dot product does, in
   another order. The block's scale and minimum are applied after its products (a block is one or
   more tile columns of 32, or 16 for blocks of 16): y += d * sum(x * value) + m * sum(x). */
#include <stdlib.h>

#include "edgellm_simd.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>

#define TILE 16       /* rows of a tile */
#define TILE_K 32     /* bfloat16 columns of a tile row (64 bytes) */
#define ROWS_PER_PASS 32
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Whether Linux lets this process use the tile registers (asked once; the answer holds for the
   process: 1 granted, -1 refused, 0 not asked yet). */
static int tiles_granted;

static int tiles_allowed(void) {
    int granted = __atomic_load_n(&tiles_granted, __ATOMIC_ACQUIRE);
    if (granted == 0) {
        granted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
        __atomic_store_n(&tiles_granted, granted, __ATOMIC_RELEASE);
    }
    return granted == 1;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config;

/* Tiles 0-3 accumulate (rows r..r+15 | r+16..r+31) x (panel 0 | panel 1), 4-5 hold activations,
   6-7 weights; all 16 rows of 64 bytes. The configuration is per thread. */
static void configure_tiles(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.bytes_per_row[t] = 64;
        c.rows[t] = TILE;
    }
    _tile_loadconfig(&c);
}

/* The same, with products of `columns` (32 or 16) activation columns: the activation tiles 4-5
   are 16 rows of that many bfloat16, the weight tiles 6-7 columns / 2 rows of pairs. */
static void configure_column_tiles(int columns) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.bytes_per_row[t] = t == 4 || t == 5 ? (uint16_t)(2 * columns) : 64;
        c.rows[t] = t >= 6 ? (uint8_t)(columns / 2) : TILE;
    }
    _tile_loadconfig(&c);
}

/* The rounded rows' buffer, one per calling thread, kept between calls and grown as needed: a
   fresh one per call (hundreds of KB to MBs, which glibc maps and unmaps each time) cost page
   faults comparable to the tile products themselves. */
static __thread uint16_t *rows_buffer;
static __thread size_t rows_buffer_bytes;

static uint16_t *rows_scratch(size_t bytes) {
    if (bytes > rows_buffer_bytes) {
        free(rows_buffer);
        rows_buffer_bytes = 0;
        if (posix_memalign((void **)&rows_buffer, 64, bytes) != 0) return rows_buffer = NULL;
        rows_buffer_bytes = bytes;
    }
    return rows_buffer;
}

/* Row s of x (K floats) rounded to bfloat16, zeros from K to Kp. */
static void round_row(const float *x, int K, int Kp, uint16_t *out) {
    for (int k = 0; k < Kp; k += 32) {
        const int left = K - k;
        const __mmask16 lo = left >= 16 ? 0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
        const __mmask16 hi = left >= 32 ? 0xFFFF : left > 16 ? (__mmask16)((1u << (left - 16)) - 1) : 0;
        const __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, x + k + 16), _mm512_maskz_loadu_ps(lo, x + k));
        _mm512_storeu_si512((__m512i *)(out + k), (__m512i)pair);
    }
}

/* Panel p (outputs 16p..16p+15) of a bfloat16 [N, K] weight in tile pair layout: Kp / 32 tiles of
   16 rows x 64 bytes. Row j's 32 columns of a tile are 16 pairs (dwords): a 16 x 16 transpose of
   dwords turns rows into the tile's rows of pairs. Rows past N and columns past K are zeros. */
static void pack_panel(const em_weight *w, int p, int Kp, uint16_t *tiles) {
    const int K = w->k, outputs = w->n - p * TILE < TILE ? w->n - p * TILE : TILE;
    const uint16_t *h = (const uint16_t *)w->data + (size_t)p * TILE * K;
    for (int k = 0; k < Kp; k += TILE_K) {
        const int left = K - k;
        const __mmask32 m = left >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << left) - 1);
        __m512 r[16];
        for (int j = 0; j < TILE; j++)
            r[j] = j < outputs ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(m, h + (size_t)j * K + k)) : _mm512_setzero_ps();
        em_transpose16(r);
        for (int i = 0; i < TILE; i++) _mm512_storeu_ps((float *)(tiles + (size_t)k * TILE + (size_t)i * 32), r[i]);
    }
}

/* Where an accumulator tile's 16 rows x 16 outputs go: straight into y when they all lie in it,
   else through a staging tile (the last rows, the last outputs). */
typedef struct {
    float *at;
    size_t stride; /* bytes */
    int rows, outputs;
    float *y;      /* where its rows x outputs go */
    size_t y_stride;
} accumulator;

static void place(accumulator *a, float *y, int S, int N, int first, int output, float *stage) {
    a->rows = S - first < TILE ? S - first : TILE;
    a->outputs = N - output < TILE ? N - output : TILE;
    a->y = y + (size_t)first * N + output;
    a->y_stride = (size_t)N;
    if (a->rows <= 0 || a->outputs <= 0) {
        a->at = NULL;
    } else if (a->rows == TILE && a->outputs == TILE) {
        a->at = a->y, a->stride = (size_t)N * sizeof(float);
    } else {
        a->at = stage, a->stride = TILE * sizeof(float);
    }
}

static void unstage(const accumulator *a) {
    if (a->at && a->at != a->y)
        for (int t = 0; t < a->rows; t++) memcpy(a->y + t * a->y_stride, a->at + t * TILE, sizeof(float) * a->outputs);
}

/* Tile t (a constant, as the instructions need) goes to y, or to its staging tile. */
#define FINISH(t) do { if (acc[t].at) _tile_stored(t, acc[t].at, acc[t].stride); } while (0)

/* y rows [0, S) of panels p and p + 1 (`two`: whether p + 1 is one) from the rounded rows xb (Sp
   rows of Kp columns) and the packed panels. */
static void panels_on_tiles(const uint16_t *xb, int S, int Sp, int Kp, const uint16_t *w0, const uint16_t *w1, int two,
                            int p, int N, float *y) {
    const size_t stride = (size_t)Kp * 2;
    float stage[4][TILE * TILE] __attribute__((aligned(64)));
    for (int r = 0; r < Sp; r += ROWS_PER_PASS) {
        accumulator acc[4];
        for (int t = 0; t < 4; t++) /* tile t: rows r + 16 (t / 2), panel p + t % 2 */
            place(&acc[t], y, S, two || t % 2 == 0 ? N : 0, r + TILE * (t / 2), (p + t % 2) * TILE, stage[t]);
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        const uint16_t *a = xb + (size_t)r * Kp;
        for (int k = 0; k < Kp; k += TILE_K) {
            _tile_loadd(4, a + k, stride);
            _tile_loadd(5, a + (size_t)TILE * Kp + k, stride);
            _tile_loadd(6, w0 + (size_t)k * TILE, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(2, 5, 6);
            if (two) {
                _tile_loadd(7, w1 + (size_t)k * TILE, 64);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(3, 5, 7);
            }
        }
        FINISH(0);
        FINISH(1);
        FINISH(2);
        FINISH(3);
        for (int t = 0; t < 4; t++) unstage(&acc[t]);
    }
}

/* ---- integer weights, float activations ------------------------------------------------ */

#define PARTS 3                /* bfloat16 parts of an activation */
#define INTEGER_ROWS_FROM 16   /* fewer rows (a verify call) stay on em_matmul_rows' float panels */

/* Row x (K floats) as PARTS bfloat16 rows whose sum is x (zeros from K to Kp), part i at
   out + i * part_stride; and its sums per weight block (xs[b], in float32). */
static void split_row(const float *x, int K, int Kp, int block, uint16_t *out, size_t part_stride, float *xs) {
    for (int k = 0; k < Kp; k += 16) {
        const int left = K - k;
        const __mmask16 m = left >= 16 ? 0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
        __m512 rest = _mm512_maskz_loadu_ps(m, x + k);
        for (int i = 0; i < PARTS; i++) {
            const __m256i part = (__m256i)_mm512_cvtneps_pbh(rest);
            _mm256_storeu_si256((__m256i *)(out + i * part_stride + k), part);
            rest = _mm512_sub_ps(rest, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(part), 16)));
        }
    }
    for (int b = 0; b * block < K; b++) {
        const int len = K - b * block < block ? K - b * block : block;
        float sum = 0.0f;
        for (int c = 0; c < len; c++) sum += x[b * block + c];
        xs[b] = sum;
    }
}

/* y (yacc, 32 rows x 32 outputs) += d * products + m * sums, for block b of panels p, p + 1 (the
   range's first block sets y: yacc needs no zeroing). The loops walk each staged tile's rows with
   plain pointer steps (indexing the tile and its row from t cost as many instructions as the
   multiply-adds). */
static void add_block(float yacc[2 * TILE][2 * TILE], float stage[4][TILE * TILE], const float *scales, const float *xs,
                      int r, int rows, int B, int blocks, int b, int first_block, int two) {
    const int first = b == first_block;
    for (int h = 0; h < 1 + two; h++) { /* scales: [panel][block of the range][d 16, m 16] */
        const float *dm = scales + ((size_t)h * blocks + b - first_block) * 2 * TILE;
        const __m512 d = _mm512_loadu_ps(dm), m = _mm512_loadu_ps(dm + TILE);
        for (int q = 0; q * TILE < rows; q++) { /* row tile q: rows 16q .. */
            const int count = rows - q * TILE < TILE ? rows - q * TILE : TILE;
            const float *c = stage[h + 2 * q], *sums = xs + (size_t)(r + q * TILE) * B + b;
            float *out = &yacc[q * TILE][h * TILE];
            for (int t = 0; t < count; t++, c += TILE, sums += B, out += 2 * TILE) {
                const __m512 acc = _mm512_fmadd_ps(d, _mm512_loadu_ps(c), first ? _mm512_setzero_ps() : _mm512_loadu_ps(out));
                _mm512_storeu_ps(out, _mm512_fmadd_ps(m, _mm512_set1_ps(*sums), acc));
            }
        }
    }
}

/* Rows r .. r + 31 of panels p, p + 1 (`two`), block by block: the PARTS products of each tile
   column into 4 accumulator tiles, stored to a staging buffer; each block's scales are applied
   while the tiles work on the next one (reading the staged tiles at once stalled on the stores). */
static void integer_pass(const em_weight *w, const uint16_t *xb, size_t part_stride, const float *xs, int r, int S,
                         int first_block, int end_block, int end_column, int Ks, int columns, const uint32_t *pairs0,
                         const uint32_t *pairs1, const float *scales, int two, int p, float *y) {
    const int B = em_blocks(w), N = w->n, block = w->block, origin = first_block * block, blocks = end_block - first_block;
    const size_t stride = (size_t)Ks * 2;
    float yacc[2 * TILE][2 * TILE] __attribute__((aligned(64)));
    float stage[2][4][TILE * TILE] __attribute__((aligned(64)));
    const int rows = S - r < 2 * TILE ? S - r : 2 * TILE, second = rows > TILE; /* a last pass of <= 16 rows: one row tile */
    for (int b = first_block; b < end_block; b++) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        const int end = (b + 1) * block < end_column ? (b + 1) * block : end_column;
        for (int k = b * block; k < end; k += columns) {
            _tile_loadd(6, pairs0 + (size_t)(k - origin) / 2 * TILE, 64);
            if (two) _tile_loadd(7, pairs1 + (size_t)(k - origin) / 2 * TILE, 64);
            for (int i = 0; i < PARTS; i++) {
                const uint16_t *a = xb + i * part_stride + (size_t)r * Ks + k;
                _tile_loadd(4, a, stride);
                _tile_dpbf16ps(0, 4, 6);
                if (two) _tile_dpbf16ps(1, 4, 7);
                if (second) {
                    _tile_loadd(5, a + (size_t)TILE * Ks, stride);
                    _tile_dpbf16ps(2, 5, 6);
                    if (two) _tile_dpbf16ps(3, 5, 7);
                }
            }
        }
        if (b > first_block) add_block(yacc, stage[(b - 1) % 2], scales, xs, r, rows, B, blocks, b - 1, first_block, two);
        _tile_stored(0, stage[b % 2][0], 64);
        if (two) _tile_stored(1, stage[b % 2][1], 64);
        if (second) {
            _tile_stored(2, stage[b % 2][2], 64);
            if (two) _tile_stored(3, stage[b % 2][3], 64);
        }
    }
    add_block(yacc, stage[(end_block - 1) % 2], scales, xs, r, rows, B, blocks, end_block - 1, first_block, two);
    for (int h = 0; h < 1 + two; h++) { /* the first range of blocks stores, the others add */
        const int first = (p + h) * TILE, outputs = N - first < TILE ? N - first : TILE;
        const __mmask16 lanes = outputs == TILE ? 0xFFFF : (__mmask16)((1u << outputs) - 1);
        for (int t = 0; t < rows; t++) {
            float *out = y + (size_t)(r + t) * N + first;
            __m512 v = _mm512_loadu_ps(&yacc[t][h * TILE]);
            if (first_block > 0) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(lanes, out));
            _mm512_mask_storeu_ps(out, lanes, v);
        }
    }
}

/* The split rows of one range of blocks stay in the core's cache while every panel passes over
   them: at most this many bytes (half of a 2 MB L2). A wider matmul runs range by range, each
   adding to y (Qwen2.5-Coder-0.5B's down projection, 4864 inputs x 128 rows: 3.7 MB at once). */
#ifndef EM_TILE_RANGE_BYTES
#define EM_TILE_RANGE_BYTES (1 << 20) /* (a test builds with a few KB, to run many ranges) */
#endif

static int matmul_integer_tiles(const float *x, int S, const em_weight *w, float *y) {
    const int K = w->k, N = w->n, block = w->block, B = em_blocks(w);
    const int columns = block % TILE_K == 0 ? TILE_K : block == 16 ? 16 : 0;
    if (!columns || S < INTEGER_ROWS_FROM) return 0;
    const int Kp = (K + TILE_K - 1) / TILE_K * TILE_K, Sp = (S + ROWS_PER_PASS - 1) / ROWS_PER_PASS * ROWS_PER_PASS;
    const int P = (N + TILE - 1) / TILE;
    /* blocks per range: whole tile columns of 32, as many as EM_TILE_RANGE_BYTES of split rows hold */
    const int unit = block < TILE_K ? TILE_K / block : 1;
    int per_range = EM_TILE_RANGE_BYTES / (Sp * PARTS * 2) / block / unit * unit;
    if (per_range < unit) per_range = unit;
    if (per_range > B) per_range = B;
    const int width = (per_range * block + TILE_K - 1) / TILE_K * TILE_K; /* a range's columns, whole tiles */
    /* the split rows lie Ks apart: 32 bfloat16 more than Kp, so that a tile's 16 rows do not
       all fall in the same sets of the L1 cache when Kp is a multiple of 2048 */
    const int Ks = Kp + TILE_K;
    /* per thread on its stack: two packed panels of a range and their scales (at most 1 MB) */
    const size_t stack = (size_t)2 * width * TILE * 2 + (size_t)2 * per_range * 2 * TILE * 4;
    if (stack > ((size_t)1 << 20)) return 0;
    const size_t part_stride = (size_t)Sp * Ks;
    uint16_t *xb = rows_scratch(PARTS * part_stride * 2 + (size_t)Sp * B * sizeof(float));
    if (!xb) return 0;
    float *xs = (float *)(xb + PARTS * part_stride);
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int s = 0; s < Sp; s++) {
            if (s < S) {
                split_row(x + (size_t)s * K, K, Kp, block, xb + (size_t)s * Ks, part_stride, xs + (size_t)s * B);
            } else {
                for (int i = 0; i < PARTS; i++) memset(xb + i * part_stride + (size_t)s * Ks, 0, (size_t)Kp * 2);
                memset(xs + (size_t)s * B, 0, sizeof(float) * B);
            }
        }
        uint32_t pairs[(size_t)width * TILE] __attribute__((aligned(64))); /* two panels of width / 2 pair rows */
        float scales[(size_t)2 * per_range * 2 * TILE];
        configure_column_tiles(columns);
        for (int first = 0; first < B; first += per_range) { /* (the loop's barrier orders the ranges' adds) */
            const int end = first + per_range < B ? first + per_range : B;
            const int end_column = end == B ? Kp : end * block;
#pragma omp for schedule(dynamic, 1)
            for (int p = 0; p < P; p += 2) {
                const int two = p + 1 < P;
                for (int h = 0; h < 1 + two; h++) {
                    em_panel_pairs(w, p + h, first, end, width, pairs + (size_t)h * width / 2 * TILE);
                    for (int b = first; b < end; b++) {
                        float *dm = scales + ((size_t)h * (end - first) + b - first) * 2 * TILE;
                        em_panel_block(w, p + h, b, dm, dm + TILE);
                    }
                }
                for (int r = 0; r < S; r += ROWS_PER_PASS)
                    integer_pass(w, xb, part_stride, xs, r, S, first, end, end_column, Ks, columns, pairs,
                                 pairs + (size_t)width / 2 * TILE, scales, two, p, y);
            }
        }
        _tile_release();
    }
    return 1;
}

int em_bf16_tiles(void) { return tiles_allowed(); }

int em_matmul_tiles(const float *x, int S, const em_weight *w, float *y) {
    const int integer = em_integer_kind(w->kind) && !w->int8_activations;
    if ((!integer && w->kind != EM_BF16) || !tiles_allowed()) return 0; /* (other kinds never ask for the tiles) */
    if (integer) return matmul_integer_tiles(x, S, w, y);
    const int K = w->k, N = w->n, Kp = (K + TILE_K - 1) / TILE_K * TILE_K;
    const int Sp = (S + ROWS_PER_PASS - 1) / ROWS_PER_PASS * ROWS_PER_PASS, P = (N + TILE - 1) / TILE;
    /* two packed panels per thread on its stack: at most 1 MB (K <= 16384); wider stays float32 */
    if ((size_t)2 * Kp * TILE * 2 > ((size_t)1 << 20)) return 0;
    uint16_t *xb = rows_scratch((size_t)Sp * Kp * 2);
    if (!xb) return 0;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int s = 0; s < Sp; s++) {
            if (s < S) round_row(x + (size_t)s * K, K, Kp, xb + (size_t)s * Kp);
            else memset(xb + (size_t)s * Kp, 0, (size_t)Kp * 2);
        }
        uint16_t packed[(size_t)2 * Kp * TILE] __attribute__((aligned(64)));
        configure_tiles();
#pragma omp for schedule(dynamic, 1)
        for (int p = 0; p < P; p += 2) {
            const int two = p + 1 < P;
            pack_panel(w, p, Kp, packed);
            if (two) pack_panel(w, p + 1, Kp, packed + (size_t)Kp * TILE);
            panels_on_tiles(xb, S, Sp, Kp, packed, packed + (size_t)Kp * TILE, two, p, N, y);
        }
        _tile_release();
    }
    return 1;
}

#else

int em_bf16_tiles(void) { return 0; }
int em_matmul_tiles(const float *x, int S, const em_weight *w, float *y) {
    (void)x, (void)S, (void)w, (void)y;
    return 0;
}

#endif
