/* Kernels of edgellm's native target. Generated model code (model.c) calls these in graph order.

   Activations are float32, row-major [rows, cols]; rows = tokens in this call (S), or tokens x
   heads after a per-head reshape. Weights are read in place from the memory-mapped weights file,
   in the layouts targets/native/weights.py writes:

     f32   [N][K] float32 (a MatMul weight transposed: one output row is contiguous)
     bf16  [N][K] bfloat16 bits
   Integer weights (q4, q5, q6, q8) are unsigned and repacked in panels of 16 rows (the last
   panel padded with zero rows), block by block along K, so that one 64-byte load feeds a 16-row
   dot-product instruction (AVX-512 VNNI vpdpbusd) or four 16-lane float FMAs:
     q8    per panel, per block, per 4 columns: 64 bytes, byte 4j + i = row j, column 4g + i
     q4    per panel, per block, per 8 columns: 64 bytes, byte 4j + i holds row j's column
           8g + i in its low nibble and column 8g + 4 + i in its high nibble
     q5    as q4, then two 8-byte bit masks (64-bit little-endian): bit i of the first is bit 4
           of byte i's low-nibble value, of the second of its high-nibble value (80 bytes)
     q6    as q5, then two more masks with bit 5 of each (96 bytes)
   (GGUF's Q5_0, Q5_1, Q5_K and Q6_K keep their 5 and 6 bits at their own size.) With scale and
   minimum arrays [panels][blocks][16] (float16 bits): a weight is scale * q + minimum over its
   block. That one form holds symmetric blocks (minimum = -2^(bits-1) scale: not stored,
   derived from the scale), zero points (minimum = -scale * zero_point) and GGUF Q4_1's float
   minimums. Factored scales (GGUF K-quants: a float16 unit per super-block times an integer per
   block, which float16 alone cannot hold): scale (and minimum) are then int8 factors
   [panels][blocks][16] and scale_unit (minimum_unit) float16 [panels][blocks / unit_blocks][16].

   Codebook weights (cb2, cb3, cb4: K-means codebooks of 2^bits float16 entries per row and block,
   weight = codebook[index]) keep one row per output, indices bit-packed in groups of 16:
     uint32 low: bits 2i, 2i+1 = low two bits of index i
     cb4: uint32 high: bits 2i, 2i+1 = bits 2-3 of index i;  cb3: uint16 high: bit i = bit 2 of index i
   (2 x bits bytes per 16 weights), with the codebooks [N][blocks][2^bits] in `scale`.
*/
#ifndef EDGELLM_KERNELS_H
#define EDGELLM_KERNELS_H

#include <stdint.h>

enum em_weight_kind { EM_F32 = 0, EM_BF16 = 1, EM_Q4 = 2, EM_Q8 = 3, EM_CB2 = 4, EM_CB3 = 5, EM_CB4 = 6, EM_Q5 = 7, EM_Q6 = 8 };

typedef struct {
    int kind;            /* em_weight_kind */
    int n, k, block;     /* rows (outputs), columns (inputs), block length along K (integer kinds) */
    const void *data;    /* as above */
    const uint16_t *scale; /* integer kinds: [panels][blocks][16], float16 (int8 factors if
                              scale_unit); cb*: the codebooks */
    const void *minimum;     /* [panels][blocks][16], float16 (float32 if minimum_f32, int8 factors if
                                minimum_unit); NULL for symmetric blocks: minimum = -shift * scale */
    int minimum_f32;
    float shift;             /* 2^(bits-1): what storing signed values as unsigned added */
    int int8_activations;  /* integer kinds: quantize activations to int8 per block (integer dot products) */
    const uint16_t *scale_unit, *minimum_unit; /* factored scales: [panels][blocks / unit_blocks][16] */
    int unit_blocks;
} em_weight;

static inline int em_integer_kind(int kind) { return kind == EM_Q4 || kind == EM_Q5 || kind == EM_Q6 || kind == EM_Q8; }

/* y[S, N] = x[S, K] @ W^T; threaded over output rows. */
void em_matmul(const float *x, int S, const em_weight *w, float *y);
/* A matmul with the work around it folded in (targets/native/lower.py matches the patterns), so a
   decode step does not stop between them on one thread:
     input     EM_INPUT: x as it is; EM_RMSNORM: RMSNorm of x with `norm`, `eps`;
               EM_SILU_GATE / EM_GELU_GATE: act(x) * up, the gated MLP (x: the gate, rows K apart);
               EM_ATTENTION (one row): the decode attention's output, merged from the partial
               results of its chunks (x: em_team_attention's scratch, `merge` its shape)
     output    y = x' @ W^T, plus `residual` [S, N] if not NULL
   `scratch` [S, K] holds the prepared input the threads share (S > 1; one row goes through
   em_team_matmul). y must not overlap x, up or residual: with one row, threads write y while
   others still read them.
   `rows` (em_team_matmul only; 0 or 1: one row): the decode program run over a few rows at once
   (a speculative verify call) reads the weights once for all of them, computing each row exactly
   as one decode step does; rows are `*_stride` floats apart (0: K, or N for the output and the
   residual), and the EM_ATTENTION prologue's row r is the token at merge.start + r, or at
   merge.positions[r] where that is set (rows of several sessions, em_forward_rows). */
enum em_prologue { EM_INPUT = 0, EM_RMSNORM = 1, EM_SILU_GATE = 2, EM_GELU_GATE = 3, EM_ATTENTION = 4 };
/* A LoRA branch (an adapter's factors for one matmul, set per session: em_set_lora):
   y += scale * B (A x'), x' the prepared input. A [columns][K]: row c is rank component c (a fused
   matmul's parts side by side); B in panels of 16 outputs, [N / 16][columns][16] (N rounded up,
   zero-padded; block-diagonal for a fused matmul), so the branch of a panel of outputs is
   `columns` vector multiply-adds over one contiguous run of bytes, read as the matmul's own panel
   is. int8 with one float scale per component (a_scale, b_scale), or float. columns 0: no
   adapter, the branch costs nothing. With panel_offset set, a panel lies in one part of a fused
   matmul, whose components are the only non-zero ones: B is [N / 16][panel_columns][16] and
   panel p reads components panel_offset[p].. (a third of the work of q/k/v's block-diagonal B).
   Where the matmul quantizes its activations (EM_LORA_SITE_QUADS), int8 factors come instead laid
   out for integer dot products (edgellm_integer.c): a_quads, groups of 8 components,
   [columns / 8][K / 4][8][4] bytes, each A + 128 (unsigned; 128 pads a group); b_pairs, per panel
   of 16 outputs its components 2 at a time, [N / 16][panel columns / 2][16][2] (0 pads). */
typedef struct {
    int columns, int8;
    const void *a, *b;
    const float *a_scale, *b_scale;
    float scale;
    int panel_columns;
    const int *panel_offset;
    const uint8_t *a_quads; /* last: a library built before them reads the fields above only */
    const int8_t *b_pairs;
} em_lora;
typedef struct {
    int start, window, heads, kv_heads, head_dim; /* as em_team_attention's arguments */
    const int *positions;                         /* NULL, or row r's position (instead of start + r) */
} em_merge;
typedef struct {
    int prologue;
    const float *norm;
    float eps;
    const float *up;
    const float *residual;
    float *scratch;
    em_merge merge;
    int rows, x_stride, up_stride, residual_stride, y_stride;
    const em_lora *lora; /* NULL, or this matmul's LoRA branch */
} em_fusion;
void em_matmul_fused(const float *x, int S, const em_weight *w, float *y, const em_fusion *f);
/* out[S, K] = rows ids[s] of an embedding table stored like a weight (n = vocab, k = hidden). */
void em_embed(const int64_t *ids, int S, const em_weight *w, float *out); /* rows with ids < 0 are left alone */
/* Rows s with ids[s] < 0 become the caller's embedding vectors (embeddings may be NULL: none). */
void em_embedding_rows(const int64_t *ids, const float *embeddings, int S, int hidden, float *out);

void em_rmsnorm(const float *x, int rows, int cols, const float *weight, float eps, float *y);
/* M-RoPE (Qwen2-VL): out[S][half], each row's rotary table row from its three positions
   rope[3 * s + 0..2] (time, height, width): the first `first` frequencies turn with the time
   position, the next `second` with the height, the rest with the width. table: [max_positions][half].
   em_rope then rotates with out at start 0. */
void em_rope_rows(const int64_t *rope, int S, const float *table, int half, int first, int second, float *out);
/* Rotary embedding, non-interleaved halves, on x[S, heads * head_dim] at positions start + s.
   cos/sin: [max_positions][rotary_dim / 2]. Columns past rotary_dim are copied. */
void em_rope(const float *x, int S, int start, int heads, int head_dim, int rotary_dim,
             const float *cos_table, const float *sin_table, float *y);
/* The KV cache, per layer: keys [kv_heads][cache_tokens / 16][head_dim][16] (blocks of 16
   positions, each stored transposed: the scores of 16 positions are then one vector), values
   [kv_heads][cache_tokens][head_dim]; cache_tokens is the context rounded up to 16. Both write S
   rows [S, kv_heads * head_dim] at positions start.. Its values are floats, or float16 (rounded
   to nearest even) in builds compiled with EM_KV_FLOAT16 (edgellm compile --kv_cache_dtype
   float16): half the memory, and half the bytes attention reads. */
#ifdef EM_KV_FLOAT16
typedef uint16_t em_kv_value;
#else
typedef float em_kv_value;
#endif
void em_cache_write_keys(em_kv_value *cache, const float *rows, int S, int start, int kv_heads, int head_dim,
                         int cache_tokens);
void em_cache_write_values(em_kv_value *cache, const float *rows, int S, int start, int kv_heads, int head_dim,
                           int cache_tokens);
/* Attention of q[S, heads * head_dim] at positions start + s over cache positions 0..start + s
   (window > 0: only the last `window`), grouped-query heads, optional tanh soft-capping. */
/* until: per row, the position before which it sees the keys (NULL: start + s + 1, causal; a row
   of an image whose rows see each other, Gemma 3: the image's end, within this call) */
void em_attention(const float *q, int S, int start, const em_kv_value *k_cache, const em_kv_value *v_cache,
                  int heads, int kv_heads, int head_dim, int cache_tokens, float scale, float softcap,
                  int window, const int64_t *until, float *out);

/* Team kernels. A decode step (em_model_single) runs as one OpenMP parallel region: every thread
   of the team calls these with the same arguments; they share the work among the team and end
   at a barrier, so the step pays one barrier per call instead of starting a parallel region per
   call. The other kernels run on one thread there (an omp single around them). Called outside a
   parallel region, they run on the calling thread alone.
     em_team_matmul      one row: y[N] = x' @ W^T (+ residual), any weight kind; every thread
                         prepares x' (em_fusion's prologue) for itself, `scratch` is not used
     em_team_attention   one token at position `start`, its rotary embedding and cache write
                         included: q [heads x head_dim], k and v [kv_heads x head_dim] are the
                         token's rows (rotated here with the tables if cos_table is not NULL);
                         k and v are written to the caches at `start` once the step no longer
                         reads them, so no barrier is needed between the write and the attention.
                         scratch: heads x EM_DECODE_CHUNKS x (head_dim + 2) floats, the partial
                         results of the context's chunks. out NULL: the chunks are left to the
                         next team matmul to merge (EM_ATTENTION), and the call ends without a
                         barrier */
#define EM_DECODE_CHUNKS 16
void em_team_matmul(const float *x, const em_weight *w, float *y, const em_fusion *f);
void em_team_attention(const float *q, const float *k, const float *v, const float *cos_table, const float *sin_table,
                       int rotary_dim, int start, em_kv_value *k_cache, em_kv_value *v_cache, int heads,
                       int kv_heads, int head_dim, int cache_tokens, float scale, float softcap, int window,
                       float *scratch, float *out);

void em_add(const float *a, const float *b, int n, float *y);
void em_add_row(const float *x, int rows, int cols, const float *row, float *y); /* + bias */
void em_mul(const float *a, const float *b, int n, float *y);
void em_scale(const float *x, int n, float c, float *y);
void em_sigmoid(const float *x, int n, float *y);
void em_tanh(const float *x, int n, float *y);
void em_gelu_tanh(const float *x, int n, float *y);
/* The gated MLP: y = silu(gate) * up, or gelu_tanh(gate) * up, in one pass. */
void em_silu_mul(const float *gate, const float *up, int n, float *y);
void em_gelu_tanh_mul(const float *gate, const float *up, int n, float *y);
/* y[rows, width] = x[rows, cols][:, first : first + width] */
void em_columns(const float *x, int rows, int cols, int first, int width, float *y);
/* y[rows, n] = x[rows, cols][:, index[j]] (act-order input permutation) */
void em_gather_columns(const float *x, int rows, int cols, const int64_t *index, int n, float *y);
void em_copy(const float *x, int n, float *y);

/* An image encoder's kernels (edgellm_encoder.c); rows x cols activations as above. */
void em_layernorm(const float *x, int rows, int cols, const float *weight, const float *bias, float eps, float *y);
void em_gelu(const float *x, int n, float *y); /* exact: 0.5 x (1 + erf(x / sqrt 2)) */
/* y[r] = x[index[r]] (gather) or y[index[r]] = x[r] (scatter), rows of cols floats */
void em_gather_rows(const float *x, int cols, const int64_t *index, int count, float *y);
void em_scatter_rows(const float *x, int cols, const int64_t *index, int count, float *y);
/* y[g] = the mean of rows g * per_group .. (g + 1) * per_group - 1 of x */
void em_mean_rows(const float *x, int groups, int per_group, int cols, float *y);
/* Attention of S rows among themselves, every row seeing every row (no mask, no positions):
   q, k, v [S, heads * head_dim]; the scratch caches hold heads x S (rounded up to 16) x head_dim
   values each (em_attention's layout: the keys and values take the KV cache's precision). */
void em_attention_rows(const float *q, const float *k, const float *v, int S, int heads, int head_dim, float scale,
                       em_kv_value *k_scratch, em_kv_value *v_scratch, float *out);

void em_set_threads(int threads);
int em_max_threads(void); /* OpenMP's default team size */

#endif
