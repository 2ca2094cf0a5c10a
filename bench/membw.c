/* Read bandwidth of this machine, as the benchmark's yardstick for "achieved weight bandwidth":
   threads stream through a buffer far larger than the caches with wide loads, as a decode step
   streams through the weights. Prints GB/s (the best of 5 passes) on one line.
     membw THREADS [MEGABYTES]                                                       */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <omp.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    const int threads = argc > 1 ? atoi(argv[1]) : 1;
    const size_t bytes = (size_t)(argc > 2 ? atoi(argv[2]) : 512) << 20, n = bytes / sizeof(uint64_t);
    uint64_t *buffer = aligned_alloc(64, bytes);
    if (!buffer) return 1;
    memset(buffer, 1, bytes);
    omp_set_num_threads(threads);
    double best = 0.0;
    volatile uint64_t sink = 0; /* keeps the reads */
    for (int pass = 0; pass < 5; pass++) {
        const double t0 = now();
        uint64_t total = 0;
#pragma omp parallel for reduction(^ : total) schedule(static)
        for (size_t i = 0; i < n; i += 8) /* one cache line per step; the compiler vectorizes */
            total ^= buffer[i] ^ buffer[i + 1] ^ buffer[i + 2] ^ buffer[i + 3] ^ buffer[i + 4] ^ buffer[i + 5] ^
                     buffer[i + 6] ^ buffer[i + 7];
        const double gbs = bytes / (now() - t0) / 1e9;
        if (gbs > best) best = gbs;
        sink = sink ^ total;
    }
    printf("%.2f\n", best);
    free(buffer);
    return 0;
}
