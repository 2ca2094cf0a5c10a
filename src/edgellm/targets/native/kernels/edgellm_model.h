/* The interface of a compiled model (libmodel.so): what the Python runtime calls through ctypes
   and model_main calls directly. No mutable static state: a loaded model (em_model: the weights,
   mapped once) opens any number of sessions (em_session: one conversation's KV cache, activation
   arena and length), and calls on different sessions may run at the same time. */
#ifndef EDGELLM_MODEL_H
#define EDGELLM_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "edgellm_kernels.h"

typedef struct {
    int vocab_size, hidden_size, max_tokens, group_size;
    unsigned long long weights_size;
    const char *weights_digest; /* 16 hex digits, as in the weights file's header */
    size_t arena_bytes, cache_bytes; /* per session */
    int layers, kv_heads, head_dim, cache_tokens; /* the KV cache's layout (edgellm_kernels.h) */
} em_model_info;

typedef struct {
    int kind, n, k, block, int8_activations, shift; /* shift: symmetric blocks store no minimum */
    int minimum_f32;                                /* minimums a float16 cannot hold exactly */
    unsigned long long data, scale, minimum; /* byte offsets into the weights file */
    unsigned long long scale_unit, minimum_unit; /* factored scales' units (0: none) */
    int unit_blocks;
} em_weight_record;

typedef struct em_model em_model;
typedef struct em_session em_session;

/* NULL on failure, and em_last_error() says why (naming the file). threads <= 0: OpenMP's default. */
em_model *em_open(const char *weights_path, int threads);
/* Frees the model's mapping. Its sessions must be closed first. */
void em_close(em_model *model);
/* A new conversation with an empty KV cache; NULL (em_last_error) if its memory cannot be had. */
em_session *em_session_open(em_model *model);
void em_session_close(em_session *session);
/* Run n rows (1 <= n <= group size) at positions start..start+n-1 of the session, start at most its
   length (rows already cached may be recomputed). Row i is token ids[i], or, where ids[i] < 0, the
   embedding vector embeddings[i * hidden_size ..] (the hidden state entering layer 0). Writes the
   logits of rows logits_from..n-1 to logits ([n - logits_from][vocab]). The session's length becomes
   start + n. rope: an M-RoPE model's (Qwen2-VL) three positions per row, rope[3 * i + 0..2]; NULL:
   each row's own position for all three (right for text that no image precedes); other models
   ignore it. 0 on success, -1 on bad arguments (em_last_error). */
int em_forward(em_session *session, const int64_t *ids, const float *embeddings, const int64_t *until, int n,
               int start, int logits_from, float *logits, const int64_t *rope);
/* One row each of several sessions, or several rows of some (row i: token ids[i] at position
   positions[i] of sessions[i]; a session's rows in this call follow each other at consecutive
   positions from at most its length). The weights are read once for all rows: a batched decode
   step of many conversations. n is 1 to the verify variant's rows; sessions of one model; no
   embedding rows. Writes every row's logits ([n][vocab]). rope: as em_forward's. 0 on success, -1
   (em_last_error). */
int em_forward_rows(em_session *const *sessions, const int *positions, const int64_t *ids, int n, float *logits,
                    const int64_t *rope);
/* The session's LoRA branch at site i (EM_LORA_SITE_INFO[i]) from now on; a branch of 0 columns:
   none. The factors are the caller's memory, read by every later call. 0, or -1 (em_last_error). */
int em_set_lora(em_session *session, int site, const em_lora *branch);
/* Keep the first `length` positions (no more than the session holds): O(1), nothing is cleared. */
int em_truncate(em_session *session, int length);
int em_length(const em_session *session);
/* A copy of a session's first positions, kept outside any session (the server's store of
   finished conversations): em_cache_bytes(length) bytes. em_cache_save copies the first `length`
   positions (at most what the session holds) to out; em_cache_load makes the session hold the
   first `length` positions of a copy of `held` positions (length <= held), whatever it held
   before. Positions are copied in whole blocks of 16 (the keys' layout), so a copy of n positions
   takes n rounded up to 16. 0, or -1 (em_last_error). */
size_t em_cache_bytes(int length);
int em_cache_save(const em_session *session, int length, void *out);
int em_cache_load(em_session *session, const void *in, int held, int length);
/* A vision-language build's image encoder (em_encoder()->run is NULL in a text model): pixels
   [patches][patch_values] (the patches cut and flattened as the patch convolution reads them) ->
   features [tokens][hidden] (the image's prompt rows). It allocates its activations for the call
   (encoder_info.arena_bytes) and runs on the model's threads. 0, or -1 (em_last_error). */
int em_encode(em_model *model, const float *pixels, float *features);
/* 1 where bfloat16 weights meet many rows (prefill, the image encoder) on AMX tiles, activations
   rounded to bfloat16 (edgellm_amx.c); 0 where they stay float32 (no AMX, or Linux refused it). */
int em_bf16_tiles(void);
/* The last error of the calling thread. */
const char *em_last_error(void);
const em_model_info *em_info(void);

/* Defined by the generated model.c */
extern const em_model_info EM_MODEL;
extern const em_weight_record EM_RECORDS[];
extern const int EM_RECORD_COUNT;
/* A program variant runs up to max_rows rows per call; em_forward takes the first that fits. */
typedef void (*em_program)(const unsigned char *base, const em_weight *weights, float *arena, em_kv_value *kv,
                           const em_lora *loras, int S, int start, const int64_t *ids, const float *embeddings,
                           const int64_t *until, int logits_from, float *logits, const int64_t *rope);
/* The verify variant: row s at position positions[s] of the KV cache kvs[s] (its rows share loras) */
typedef void (*em_rows_program)(const unsigned char *base, const em_weight *weights, float *arena,
                                em_kv_value *const *kvs, const em_lora *loras, const int *positions, int S,
                                const int64_t *ids, const float *embeddings, int logits_from, float *logits,
                                const int64_t *rope);
/* The matmuls with a LoRA branch (LORA_BRANCH builds): name ("layer007.qkv_proj"), input and
   output width, branch columns (rank x parts) */
typedef struct {
    const char *name;
    int k, n, columns;
} em_lora_site;
extern const em_lora_site EM_LORA_SITE_INFO[];
extern const int EM_LORA_SITE_COUNT;
/* Per site, 1 where its matmul quantizes activations to int8 (K and the weight's block multiples of
   4): there an int8 adapter's factors come as em_lora.a_quads and b_pairs, never as `a` and `b`.
   (Its own array: the runtime reads a library built before it as having none.) */
extern const unsigned char EM_LORA_SITE_QUADS[];
typedef struct {
    const char *name;
    int max_rows;
    em_program run;
    em_rows_program run_rows; /* instead of run */
    int all_logits; /* writes every row's logits: em_forward gives the caller rows logits_from.. */
} em_variant;
extern const em_variant EM_VARIANTS[];
typedef void (*em_encoder_program)(const unsigned char *base, const em_weight *weights, float *arena,
                                   const float *pixels, float *features);
typedef struct {
    int patches, patch_values, tokens, hidden;
    size_t arena_bytes;
    em_encoder_program run; /* NULL: no image encoder */
} em_encoder_info;
extern const em_encoder_info EM_ENCODER;
const em_encoder_info *em_encoder(void);
extern const int EM_VARIANT_COUNT;
em_weight em_bind_weight(const em_weight_record *record, const unsigned char *base);

#endif
