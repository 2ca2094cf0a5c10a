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
static int em_threads;
static void *em_cache;
static size_t em_cache_size;

/* Zeroed pages, touched only as the context fills. */
void *em_cache_alloc(size_t bytes) {
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return NULL;
    em_cache = p;
    em_cache_size = bytes;
    return p;
}

#if defined(__x86_64__)
/* Built with -march for one machine: refuse, rather than die of an illegal instruction, on a CPU
   without the instruction sets the code was compiled for. Compiled for baseline x86-64 itself. */
__attribute__((target("arch=x86-64"))) static const char *em_missing_instructions(void) {
    __builtin_cpu_init();
#if defined(__AVX512F__)
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw")) return "AVX-512";
#endif
#if defined(__AVX512VNNI__)
    if (!__builtin_cpu_supports("avx512vnni")) return "AVX-512 VNNI";
#endif
#if defined(__AVX2__)
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return "AVX2 and FMA";
#endif
    return NULL;
}
#endif

const char *em_last_error(void) { return em_error; }
const em_model_info *em_info(void) { return &EM_MODEL; }

em_weight em_bind_weight(const em_weight_record *r, const unsigned char *base) {
    em_weight w = {r->kind, r->n, r->k, r->block, base + r->data, NULL, NULL, r->minimum_f32, (float)r->shift,
                   r->int8_activations};
    if (r->kind >= EM_CB2) w.scale = (const uint16_t *)(base + r->scale);
    if (r->kind == EM_Q4 || r->kind == EM_Q8) {
        w.scale = (const uint16_t *)(base + r->scale);
        w.minimum = r->minimum ? base + r->minimum : NULL;
    }
    return w;
}

int em_init(const char *path, int threads) {
    em_close();
#if defined(__x86_64__)
    const char *missing = em_missing_instructions();
    if (missing) {
        snprintf(em_error, sizeof em_error, "%s: this program was compiled for a CPU with %s, which this one lacks; "
                 "compile the model on this machine", path, missing);
        return -1;
    }
#endif
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
    if (em_model_bind(h) != 0) {
        snprintf(em_error, sizeof em_error, "%s: cannot allocate the KV cache", path);
        munmap(p, (size_t)st.st_size);
        return -1;
    }
    em_mapped = h;
    em_mapped_size = (size_t)st.st_size;
    em_threads = threads;
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
    em_set_threads(em_threads); /* the OpenMP team size is per calling thread */
    if (n == 1) em_model_single(1, start, ids, 0, logits);
    else em_model_group(n, start, ids, logits_row, logits);
    return 0;
}

void em_close(void) {
    if (em_mapped) munmap((void *)em_mapped, em_mapped_size);
    em_mapped = NULL;
    if (em_cache) munmap(em_cache, em_cache_size);
    em_cache = NULL;
    em_cache_size = 0;
}
