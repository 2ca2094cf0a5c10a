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
   against them: 4 accumulator tiles (32 rows x 32 outputs), 2 activation tiles, 2 weight tiles. */
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

int em_bf16_tiles(void) { return tiles_allowed(); }

int em_matmul_tiles(const float *x, int S, const em_weight *w, float *y) {
    if (w->kind != EM_BF16 || !tiles_allowed()) return 0;
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
