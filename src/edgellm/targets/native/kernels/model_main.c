/* model_main: prefill and greedy decode from token ids, no Python.
     model_main --tokens 1,2,3 [--gen 64] [--threads N] [--weights PATH]
   Prints the generated ids, then TTFT and decode tokens/s as the Python runtime measures them:
   TTFT from the start of prefill until the first answer token is known; tokens/s over the
   answer tokens after the first. Weights default to weights.bin beside the program. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "edgellm_model.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

int main(int argc, char **argv) {
    const char *tokens = NULL, *weights = NULL;
    int gen = 64, threads = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--tokens")) tokens = argv[i + 1];
        else if (!strcmp(argv[i], "--gen")) gen = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--threads")) threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--weights")) weights = argv[i + 1];
        else {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (!tokens || !*tokens || gen < 1) {
        fprintf(stderr, "usage: %s --tokens 1,2,3 [--gen N >= 1] [--threads N] [--weights PATH]\n", argv[0]);
        return 2;
    }
    char default_weights[4096];
    if (!weights) {
        const char *slash = strrchr(argv[0], '/');
        int dir = slash ? (int)(slash - argv[0] + 1) : 0;
        snprintf(default_weights, sizeof default_weights, "%.*sweights.bin", dir, argv[0]);
        weights = default_weights;
    }
    const em_model_info *info = em_info();
    int64_t *ids = malloc(sizeof(int64_t) * (size_t)(info->max_tokens + 1));
    int n = 0;
    for (char *p = (char *)tokens; *p;) {
        if (n == info->max_tokens) {
            fprintf(stderr, "--tokens: more than the %d tokens the context holds\n", info->max_tokens);
            return 2;
        }
        ids[n++] = strtoll(p, &p, 10);
        if (*p == ',') p++;
        else if (*p) {
            fprintf(stderr, "--tokens: expected comma-separated integers, got '%s'\n", p);
            return 2;
        }
    }
    em_model *model = em_open(weights, threads);
    em_session *session = model ? em_session_open(model) : NULL;
    if (!session) {
        fprintf(stderr, "%s\n", em_last_error());
        return 1;
    }
    float *logits = malloc(sizeof(float) * (size_t)info->vocab_size);
    double t0 = now();
    /* prefill in chunks of the group size; a short last chunk ends at the last token */
    int g = info->group_size;
    for (int pos = 0; pos < n;) {
        int start = n - pos >= g ? pos : (n > g ? n - g : 0);
        int count = (start + g < n ? start + g : n) - start;
        if (em_forward(session, ids + start, NULL, NULL, count, start, count - 1, logits, NULL) != 0) {
            fprintf(stderr, "%s\n", em_last_error());
            return 1;
        }
        pos = start + count;
    }
    int token = argmax(logits, info->vocab_size);
    double t_first = now();
    printf("%d", token);
    int produced = 1;
    for (; produced < gen && n < info->max_tokens; produced++) {
        ids[n] = token;
        if (em_forward(session, ids + n, NULL, NULL, 1, n, 0, logits, NULL) != 0) {
            fprintf(stderr, "%s\n", em_last_error());
            return 1;
        }
        n++;
        token = argmax(logits, info->vocab_size);
        printf(",%d", token);
    }
    double t_end = now();
    printf("\nTTFT %.1f ms, decode %.1f tokens/s (%d tokens)\n", (t_first - t0) * 1e3,
           produced > 1 ? (produced - 1) / (t_end - t_first) : 0.0, produced);
    em_session_close(session);
    em_close(model);
    free(logits);
    free(ids);
    return 0;
}
