/* The interface of a compiled model (libmodel.so): what the Python runtime calls through ctypes
   and model_main calls directly. One model per process: the KV cache and arena are static. */
#ifndef EDGELLM_MODEL_H
#define EDGELLM_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "edgellm_kernels.h"

typedef struct {
    int vocab_size, max_tokens, group_size, logits_rows;
    unsigned long long weights_size;
    const char *weights_digest; /* 16 hex digits, as in the weights file's header */
} em_model_info;

typedef struct {
    int kind, n, k, block, int8_activations, shift; /* shift: symmetric blocks store no minimum */
    int minimum_f32;                                /* minimums a float16 cannot hold exactly */
    unsigned long long data, scale, minimum; /* byte offsets into the weights file */
} em_weight_record;

/* 0 on success; otherwise -1 and em_last_error() says why (naming the file). */
int em_init(const char *weights_path, int threads);
/* Run n tokens (n <= group size; n == 1 uses the decode program) at positions start..start+n-1,
   writing the logits of row logits_row (or, for return_logits builds, of every row) to logits.
   0 on success, -1 on bad arguments (em_last_error). */
int em_forward(const int64_t *ids, int n, int start, int logits_row, float *logits);
const char *em_last_error(void);
const em_model_info *em_info(void);
void em_close(void);

/* Defined by the generated model.c */
extern const em_model_info EM_MODEL;
int em_model_bind(const unsigned char *base); /* -1 if the KV cache cannot be allocated */
void *em_cache_alloc(size_t bytes);
void em_model_group(int S, int start, const int64_t *ids, int logits_row, float *logits);
void em_model_single(int S, int start, const int64_t *ids, int logits_row, float *logits);
em_weight em_bind_weight(const em_weight_record *record, const unsigned char *base);

#endif
