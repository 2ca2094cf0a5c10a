/* The fixed part of every compiled model: map and check the weights file, dispatch calls. */
#define _DEFAULT_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "edgellm_model.h"

static const unsigned char *em_mapped;
static size_t em_mapped_size;
static char em_error[512];

const char *em_last_error(void) { return em_error; }
const em_model_info *em_info(void) { return &EM_MODEL; }

em_weight em_bind_weight(const em_weight_record *r, const unsigned char *base) {
    em_weight w = {r->kind, r->n, r->k, r->block, base + r->data, NULL, NULL, (float)r->shift, r->int8_activations};
    if (r->kind >= EM_CB2) w.scale = (const uint16_t *)(base + r->scale);
    if (r->kind == EM_Q4 || r->kind == EM_Q8) {
        w.scale = (const uint16_t *)(base + r->scale);
        w.minimum = r->minimum ? (const uint16_t *)(base + r->minimum) : NULL;
    }
    return w;
}

int em_init(const char *path, int threads) {
    em_close();
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        snprintf(em_error, sizeof em_error, "%s: cannot open the weights file", path);
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || (unsigned long long)st.st_size != EM_MODEL.weights_size) {
        snprintf(em_error, sizeof em_error, "%s: %lld bytes, but this program was built for %llu", path,
                 (long long)st.st_size, EM_MODEL.weights_size);
        close(fd);
        return -1;
    }
    void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (p == MAP_FAILED) {
        snprintf(em_error, sizeof em_error, "%s: mmap failed", path);
        return -1;
    }
    const unsigned char *h = p;
    if (memcmp(h, "EDGELLMW", 8) != 0 || memcmp(h + 24, EM_MODEL.weights_digest, 16) != 0) {
        snprintf(em_error, sizeof em_error, "%s: not the weights this program was built with (digest differs)", path);
        munmap(p, (size_t)st.st_size);
        return -1;
    }
    em_mapped = h;
    em_mapped_size = (size_t)st.st_size;
    em_set_threads(threads);
    em_model_bind(em_mapped);
    return 0;
}

int em_forward(const int64_t *ids, int n, int start, int logits_row, float *logits) {
    if (!em_mapped) {
        snprintf(em_error, sizeof em_error, "em_init has not loaded a weights file");
        return -1;
    }
    if (n < 1 || n > EM_MODEL.group_size || start < 0 || start + n > EM_MODEL.max_tokens || logits_row < 0 ||
        logits_row >= n) {
        snprintf(em_error, sizeof em_error, "bad call: %d tokens at position %d (at most %d per call, %d in all)", n,
                 start, EM_MODEL.group_size, EM_MODEL.max_tokens);
        return -1;
    }
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= EM_MODEL.vocab_size) {
            snprintf(em_error, sizeof em_error, "token id %lld outside the vocabulary of %d", (long long)ids[i],
                     EM_MODEL.vocab_size);
            return -1;
        }
    if (n == 1) em_model_single(1, start, ids, 0, logits);
    else em_model_group(n, start, ids, logits_row, logits);
    return 0;
}

void em_close(void) {
    if (em_mapped) munmap((void *)em_mapped, em_mapped_size);
    em_mapped = NULL;
}
