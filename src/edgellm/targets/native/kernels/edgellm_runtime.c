/* The fixed part of every compiled model: map and check the weights file, open sessions, dispatch calls. */
#define _GNU_SOURCE /* sched_getaffinity */
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "edgellm_model.h"

/* The team size, chosen by measurement. Other work on the cores (a camera pipeline, a UI, a build)
   deschedules one of the team's threads now and then, and every barrier of a decode step (5 per
   layer) then waits for it: next to one busy process on 2 cores the full team kept 36% of its quiet
   decode speed. So the model times its decode steps (one-row calls of any session) and runs them
   with the full team or with one thread fewer, whichever stepped faster when last compared.
   (Prefill keeps the full team: its matmuls hand out panels as threads ask, so a descheduled
   thread holds up little, and a choice made under a neighbour that has since gone would otherwise
   cost the next prompt half its speed.) A comparison (a probe) runs the other team for two steps (the full team for
   three, the first not counting: it may wake sleeping threads) and sets their mean against the
   moving average of the team in use, which it must beat by 10% to take over (one lucky step on a
   busy machine is not a faster team). The full team in use is probed against the smaller one at
   its 8th step, whenever its steps have slowed by a third from what they were when it last won,
   and every 256 steps. The smaller team's own steps do not tell when the neighbour has gone (it
   had a core of its own), so while it is in use the idle time of the CPUs this process may run on
   is read (/proc/stat) every 100 ms: half a core idle starts a probe of the full team, as do 16
   steps, the interval doubling to 256 while the smaller team keeps winning. Quiet, all this costs
   two slower steps early in a process and two per 256 steps after. The measurements belong to the model, so a new session (the next
   request) starts with what earlier ones learned; sessions may run calls at once, so they are
   taken under a lock. */
typedef struct {
    double ns[2];      /* a decode step's time: [0] the full team, [1] one thread fewer (moving average) */
    double usual;      /* the full team's step time when it last won: what its slowdowns are measured against */
    double probed;     /* the probe's counted steps' time so far */
    int counted;       /* and how many */
    unsigned steps;    /* decode steps so far */
    unsigned probe_at; /* the step at which the next periodic probe starts */
    unsigned interval; /* steps from one probe of the full team to the next, while the smaller one wins */
    int probing;       /* probe steps still to run */
    int choice;        /* the team in use: 0 or 1 */
    double idle, read_at; /* while the smaller team is in use: the CPUs' idle seconds, read at (ns; 0: not yet) */
} em_team;

#define EM_TEAM_FIRST_PROBE 8
#define EM_TEAM_INTERVAL 16
#define EM_TEAM_MAX_INTERVAL 256
#define EM_TEAM_SLOWED 1.33

static int team_threads(int full, int which) { return which && full > 1 ? full - 1 : full; }

/* Which team a call takes: the full one but for decode steps, which may be (or start) a probe. */
static int team_pick(em_team *t, int full, int decode) {
    if (full <= 1 || !decode) return 0;
    if (!t->probing) {
        const int slowed = t->choice == 0 && t->usual > 0 && t->ns[0] > EM_TEAM_SLOWED * t->usual;
        if (t->steps >= t->probe_at || slowed) t->probing = t->choice == 0 ? 2 : 3;
    }
    return t->probing ? 1 - t->choice : t->choice;
}

/* Idle seconds so far of the CPUs this process may run on (/proc/stat: idle + iowait), or -1. */
static double idle_seconds(void) {
#if defined(__linux__)
    cpu_set_t allowed;
    FILE *f = sched_getaffinity(0, sizeof allowed, &allowed) == 0 ? fopen("/proc/stat", "r") : NULL;
    if (!f) return -1;
    char line[512];
    unsigned long long total = 0, user, nice, sys, idle, iowait;
    int cpu, found = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "cpu%d %llu %llu %llu %llu %llu", &cpu, &user, &nice, &sys, &idle, &iowait) == 6 &&
            cpu >= 0 && cpu < CPU_SETSIZE && CPU_ISSET(cpu, &allowed))
            total += idle + iowait, found = 1;
    fclose(f);
    return found ? (double)total / (double)sysconf(_SC_CLK_TCK) : -1;
#else
    return -1;
#endif
}

/* While the smaller team is in use: has a core gone idle (the neighbour left)? */
static void watch_idle_cores(em_team *t, double now) {
    if (t->read_at && now - t->read_at < 1e8) return;
    const double idle = idle_seconds();
    if (idle >= 0 && t->read_at && (idle - t->idle) / ((now - t->read_at) / 1e9) >= 0.5) t->probe_at = t->steps;
    t->idle = idle;
    t->read_at = idle >= 0 ? now : 0;
}

static void team_record(em_team *t, int used, double ns, double now) {
    t->steps++;
    if (used == t->choice) {
        t->ns[used] = t->ns[used] == 0 ? ns : t->ns[used] + (ns - t->ns[used]) / 4;
        if (used == 0 && (t->usual == 0 || t->ns[0] < t->usual)) t->usual = t->ns[0];
        if (used == 1) watch_idle_cores(t, now);
        return;
    }
    if (!(used == 0 && t->probing == 3)) /* (the full team's first probe step may wake its threads) */
        t->probed += ns, t->counted++;
    if (--t->probing > 0) return;
    const double probe = t->probed / t->counted;
    t->probed = 0;
    t->counted = 0;
    t->ns[used] = probe;
    if (probe < 0.9 * t->ns[t->choice]) { /* the other team is faster now (by more than noise) */
        t->choice = used;
        t->interval = EM_TEAM_INTERVAL;
        t->read_at = 0;
        t->usual = used == 0 ? probe : t->usual;
    } else if (t->choice == 0) { /* the full team won: its present pace is the new usual */
        t->interval = EM_TEAM_MAX_INTERVAL;
        t->usual = t->ns[0];
    } else if (t->interval < EM_TEAM_MAX_INTERVAL) {
        t->interval *= 2;
    }
    t->probe_at = t->steps + t->interval;
}

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

struct em_model {
    const unsigned char *mapped;
    size_t mapped_size;
    int threads;
    em_weight *weights; /* EM_RECORDS bound to the mapping */
    pthread_mutex_t team_lock;
    em_team team; /* the team size its calls take (above) */
};

struct em_session {
    em_model *model; /* (not const: its team is updated) */
    float *arena;    /* activations of one call */
    float *logits;   /* every row's logits, for variants that write them all (em_variant.all_logits) */
    em_kv_value *kv; /* the KV cache: zeroed pages, touched only as the context fills */
    int length;      /* positions 0..length-1 hold this conversation's keys and values */
    em_lora *loras;  /* EM_LORA_SITE_COUNT branches (columns 0: no adapter) */
};

static _Thread_local char em_error[512]; /* per calling thread, as errno */

static void fail(const char *format, ...) {
    va_list args;
    va_start(args, format);
    vsnprintf(em_error, sizeof em_error, format, args);
    va_end(args);
}

#if defined(__x86_64__)
/* Built with -march for one machine: refuse, rather than die of an illegal instruction, on a CPU
   without an instruction-set extension the code was compiled for. Every extension the compiler
   may emit on its own is checked (the ones it enables and the CPU reports through
   __builtin_cpu_supports); the rest of -march's list (XSAVE, CLZERO, RDPID, ...) are system
   instructions it never emits for this code. Compiled for baseline x86-64 itself. */
__attribute__((target("arch=x86-64"))) static const char *em_missing_instructions(void) {
    __builtin_cpu_init();
#if defined(__SSE3__)
    if (!__builtin_cpu_supports("sse3")) return "SSE3";
#endif
#if defined(__SSSE3__)
    if (!__builtin_cpu_supports("ssse3")) return "SSSE3";
#endif
#if defined(__SSE4_1__)
    if (!__builtin_cpu_supports("sse4.1")) return "SSE4.1";
#endif
#if defined(__SSE4_2__)
    if (!__builtin_cpu_supports("sse4.2")) return "SSE4.2";
#endif
#if defined(__POPCNT__)
    if (!__builtin_cpu_supports("popcnt")) return "POPCNT";
#endif
#if defined(__AVX__)
    if (!__builtin_cpu_supports("avx")) return "AVX";
#endif
#if defined(__AVX2__)
    if (!__builtin_cpu_supports("avx2")) return "AVX2";
#endif
#if defined(__FMA__)
    if (!__builtin_cpu_supports("fma")) return "FMA";
#endif
#if defined(__F16C__)
    if (!__builtin_cpu_supports("f16c")) return "F16C";
#endif
#if defined(__BMI__)
    if (!__builtin_cpu_supports("bmi")) return "BMI1";
#endif
#if defined(__BMI2__)
    if (!__builtin_cpu_supports("bmi2")) return "BMI2";
#endif
#if defined(__LZCNT__)
    if (!__builtin_cpu_supports("lzcnt")) return "LZCNT";
#endif
#if defined(__MOVBE__)
    if (!__builtin_cpu_supports("movbe")) return "MOVBE";
#endif
#if defined(__AES__)
    if (!__builtin_cpu_supports("aes")) return "AES";
#endif
#if defined(__PCLMUL__)
    if (!__builtin_cpu_supports("pclmul")) return "PCLMUL";
#endif
#if defined(__SHA__)
    if (!__builtin_cpu_supports("sha")) return "SHA";
#endif
#if defined(__ADX__)
    if (!__builtin_cpu_supports("adx")) return "ADX";
#endif
#if defined(__GFNI__)
    if (!__builtin_cpu_supports("gfni")) return "GFNI";
#endif
#if defined(__VAES__)
    if (!__builtin_cpu_supports("vaes")) return "VAES";
#endif
#if defined(__VPCLMULQDQ__)
    if (!__builtin_cpu_supports("vpclmulqdq")) return "VPCLMULQDQ";
#endif
#if defined(__AVXVNNI__)
    if (!__builtin_cpu_supports("avxvnni")) return "AVX-VNNI";
#endif
#if defined(__AVX512F__)
    if (!__builtin_cpu_supports("avx512f")) return "AVX-512F";
#endif
#if defined(__AVX512BW__)
    if (!__builtin_cpu_supports("avx512bw")) return "AVX-512BW";
#endif
#if defined(__AVX512DQ__)
    if (!__builtin_cpu_supports("avx512dq")) return "AVX-512DQ";
#endif
#if defined(__AVX512VL__)
    if (!__builtin_cpu_supports("avx512vl")) return "AVX-512VL";
#endif
#if defined(__AVX512CD__)
    if (!__builtin_cpu_supports("avx512cd")) return "AVX-512CD";
#endif
#if defined(__AVX512VNNI__)
    if (!__builtin_cpu_supports("avx512vnni")) return "AVX-512 VNNI";
#endif
#if defined(__AVX512BF16__)
    if (!__builtin_cpu_supports("avx512bf16")) return "AVX-512 BF16";
#endif
#if defined(__AVX512FP16__)
    if (!__builtin_cpu_supports("avx512fp16")) return "AVX-512 FP16";
#endif
#if defined(__AVX512IFMA__)
    if (!__builtin_cpu_supports("avx512ifma")) return "AVX-512 IFMA";
#endif
#if defined(__AVX512VBMI__)
    if (!__builtin_cpu_supports("avx512vbmi")) return "AVX-512 VBMI";
#endif
#if defined(__AVX512VBMI2__)
    if (!__builtin_cpu_supports("avx512vbmi2")) return "AVX-512 VBMI2";
#endif
#if defined(__AVX512BITALG__)
    if (!__builtin_cpu_supports("avx512bitalg")) return "AVX-512 BITALG";
#endif
#if defined(__AVX512VPOPCNTDQ__)
    if (!__builtin_cpu_supports("avx512vpopcntdq")) return "AVX-512 VPOPCNTDQ";
#endif
#if defined(__AVX512VP2INTERSECT__)
    if (!__builtin_cpu_supports("avx512vp2intersect")) return "AVX-512 VP2INTERSECT";
#endif
#if defined(__AMX_TILE__)
    if (!__builtin_cpu_supports("amx-tile")) return "AMX-TILE";
#endif
#if defined(__AMX_INT8__)
    if (!__builtin_cpu_supports("amx-int8")) return "AMX-INT8";
#endif
#if defined(__AMX_BF16__)
    if (!__builtin_cpu_supports("amx-bf16")) return "AMX-BF16";
#endif
    return NULL;
}
#endif

const char *em_last_error(void) { return em_error; }
const em_model_info *em_info(void) { return &EM_MODEL; }
const em_encoder_info *em_encoder(void) { return &EM_ENCODER; }

int em_encode(em_model *m, const float *pixels, float *features) {
    if (!EM_ENCODER.run) {
        fail("this build has no image encoder");
        return -1;
    }
    void *arena = NULL;
    if (posix_memalign(&arena, 64, EM_ENCODER.arena_bytes > 64 ? EM_ENCODER.arena_bytes : 64) != 0) {
        fail("cannot allocate the image encoder's %zu bytes of activations", EM_ENCODER.arena_bytes);
        return -1;
    }
    em_set_threads(m->threads); /* the OpenMP team size is per calling thread */
    EM_ENCODER.run(m->mapped, m->weights, arena, pixels, features);
    free(arena);
    return 0;
}

em_weight em_bind_weight(const em_weight_record *r, const unsigned char *base) {
    em_weight w = {r->kind, r->n, r->k, r->block, base + r->data, NULL, NULL, r->minimum_f32, (float)r->shift,
                   r->int8_activations, NULL, NULL, r->unit_blocks};
    if (r->kind >= EM_CB2 && r->kind <= EM_CB4) w.scale = (const uint16_t *)(base + r->scale);
    if (em_integer_kind(r->kind)) {
        w.scale = (const uint16_t *)(base + r->scale);
        w.minimum = r->minimum ? base + r->minimum : NULL;
        w.scale_unit = r->scale_unit ? (const uint16_t *)(base + r->scale_unit) : NULL;
        w.minimum_unit = r->minimum_unit ? (const uint16_t *)(base + r->minimum_unit) : NULL;
    }
    return w;
}

em_model *em_open(const char *path, int threads) {
#if defined(__x86_64__)
    const char *missing = em_missing_instructions();
    if (missing) {
        fail("%s: this program was compiled for a CPU with %s, which this one lacks; compile the model on this machine",
             path, missing);
        return NULL;
    }
#endif
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        fail("%s: cannot open the weights file", path);
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || (unsigned long long)st.st_size != EM_MODEL.weights_size) {
        fail("%s: %lld bytes, but this program was built for %llu", path, (long long)st.st_size, EM_MODEL.weights_size);
        close(fd);
        return NULL;
    }
    void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (p == MAP_FAILED) {
        fail("%s: mmap failed", path);
        return NULL;
    }
    const unsigned char *h = p;
    if (memcmp(h, "EDGELLMW", 8) != 0 || memcmp(h + 24, EM_MODEL.weights_digest, 16) != 0) {
        fail("%s: not the weights this program was built with (digest differs)", path);
        munmap(p, (size_t)st.st_size);
        return NULL;
    }
    em_model *m = calloc(1, sizeof *m);
    em_weight *weights = calloc((size_t)(EM_RECORD_COUNT > 0 ? EM_RECORD_COUNT : 1), sizeof *weights);
    if (!m || !weights) {
        free(m);
        free(weights);
        munmap(p, (size_t)st.st_size);
        fail("%s: out of memory", path);
        return NULL;
    }
    for (int i = 0; i < EM_RECORD_COUNT; i++) weights[i] = em_bind_weight(&EM_RECORDS[i], h);
    m->mapped = h;
    m->mapped_size = (size_t)st.st_size;
    m->threads = threads > 0 ? threads : em_max_threads();
    m->weights = weights;
    pthread_mutex_init(&m->team_lock, NULL);
    m->team.probe_at = EM_TEAM_FIRST_PROBE;
    m->team.interval = EM_TEAM_INTERVAL;
    return m;
}

void em_close(em_model *m) {
    if (!m) return;
    munmap((void *)m->mapped, m->mapped_size);
    pthread_mutex_destroy(&m->team_lock);
    free(m->weights);
    free(m);
}

em_session *em_session_open(em_model *m) {
    em_session *s = calloc(1, sizeof *s);
    void *arena = NULL;
    if (s && posix_memalign(&arena, 64, EM_MODEL.arena_bytes > 64 ? EM_MODEL.arena_bytes : 64) != 0) arena = NULL;
    size_t rows = 0;
    for (int i = 0; i < EM_VARIANT_COUNT; i++)
        if (EM_VARIANTS[i].all_logits && (size_t)EM_VARIANTS[i].max_rows > rows) rows = (size_t)EM_VARIANTS[i].max_rows;
    float *logits = rows ? malloc(sizeof(float) * rows * (size_t)EM_MODEL.vocab_size) : NULL;
    void *kv = mmap(NULL, EM_MODEL.cache_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                    -1, 0);
    em_lora *loras = calloc(EM_LORA_SITE_COUNT > 0 ? (size_t)EM_LORA_SITE_COUNT : 1, sizeof *loras);
    if (!s || !arena || kv == MAP_FAILED || (rows && !logits) || !loras) {
        fail("cannot allocate a session: %zu bytes of KV cache and %zu of activations", EM_MODEL.cache_bytes,
             EM_MODEL.arena_bytes);
        if (kv != MAP_FAILED) munmap(kv, EM_MODEL.cache_bytes);
        free(arena);
        free(logits);
        free(loras);
        free(s);
        return NULL;
    }
    s->loras = loras;
    s->model = m;
    s->arena = arena;
    s->logits = logits;
    s->kv = kv;
    return s;
}

void em_session_close(em_session *s) {
    if (!s) return;
    munmap(s->kv, EM_MODEL.cache_bytes);
    free(s->arena);
    free(s->logits);
    free(s->loras);
    free(s);
}

int em_set_lora(em_session *s, int site, const em_lora *branch) {
    if (site < 0 || site >= EM_LORA_SITE_COUNT || branch->columns < 0 || branch->columns > EM_LORA_SITE_INFO[site].columns ||
        /* (integer factors: int16 t times int8 B stays within int32 up to 512 columns) */
        (branch->columns > 0 && (!(branch->a_quads ? branch->int8 && branch->b_pairs && EM_LORA_SITE_QUADS[site] &&
                                                     branch->columns <= 512
                                                   : branch->a && branch->b && !branch->b_pairs) ||
                                 (branch->int8 && (!branch->a_scale || !branch->b_scale)))) ||
        (branch->panel_offset && (branch->panel_columns < 1 || branch->panel_columns > branch->columns))) {
        fail("bad LoRA branch: site %d of %d, %d columns", site, EM_LORA_SITE_COUNT, branch->columns);
        return -1;
    }
    s->loras[site] = *branch;
    return 0;
}

int em_truncate(em_session *s, int length) {
    if (length < 0 || length > s->length) {
        fail("cannot truncate a session of %d positions to %d", s->length, length);
        return -1;
    }
    s->length = length;
    return 0;
}

int em_length(const em_session *s) { return s->length; }

/* Every (layer, keys or values, KV head) of the cache is cache_tokens x head_dim values, keys in
   blocks of 16 positions: its first n positions, rounded up to 16, are its first values. A copy
   holds those of each in turn. */
static size_t cache_span(int length) { return (size_t)(length + 15) / 16 * 16 * (size_t)EM_MODEL.head_dim; }

size_t em_cache_bytes(int length) {
    return (size_t)EM_MODEL.layers * 2 * (size_t)EM_MODEL.kv_heads * cache_span(length) * sizeof(em_kv_value);
}

static void cache_copy(em_kv_value *to, size_t to_stride, const em_kv_value *from, size_t from_stride, size_t span) {
    for (int part = 0; part < EM_MODEL.layers * 2 * EM_MODEL.kv_heads; part++)
        memcpy(to + part * to_stride, from + part * from_stride, span * sizeof(em_kv_value));
}

int em_cache_save(const em_session *s, int length, void *out) {
    if (length < 0 || length > s->length) {
        fail("cannot copy %d positions of a session holding %d", length, s->length);
        return -1;
    }
    size_t span = cache_span(length);
    cache_copy(out, span, s->kv, (size_t)EM_MODEL.cache_tokens * EM_MODEL.head_dim, span);
    return 0;
}

int em_cache_load(em_session *s, const void *in, int held, int length) {
    if (length < 0 || length > held || held > EM_MODEL.max_tokens) {
        fail("cannot load %d positions of a copy holding %d (the context holds %d)", length, held, EM_MODEL.max_tokens);
        return -1;
    }
    cache_copy(s->kv, (size_t)EM_MODEL.cache_tokens * EM_MODEL.head_dim, in, cache_span(held), cache_span(length));
    s->length = length;
    return 0;
}

/* rope NULL: each row's own position, three times (what an M-RoPE model's text rows get when no
   image came before them) */
static const int64_t *own_positions(const int64_t *rope, int64_t *own, const int *positions, int start, int n) {
    if (rope) return rope;
    for (int i = 0; i < n; i++) own[3 * i] = own[3 * i + 1] = own[3 * i + 2] = positions ? positions[i] : start + i;
    return own;
}

int em_forward(em_session *s, const int64_t *ids, const float *embeddings, const int64_t *until, int n, int start,
               int logits_from, float *logits, const int64_t *rope) {
    if (n < 1 || n > EM_MODEL.group_size || start < 0 || start > s->length || start + n > EM_MODEL.max_tokens ||
        logits_from < 0 || logits_from >= n) {
        fail("bad call: %d rows at position %d of a session holding %d, logits from row %d (at most %d rows per call, "
             "%d positions in all)", n, start, s->length, logits_from, EM_MODEL.group_size, EM_MODEL.max_tokens);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        if (ids[i] >= EM_MODEL.vocab_size) {
            fail("token id %lld outside the vocabulary of %d", (long long)ids[i], EM_MODEL.vocab_size);
            return -1;
        }
        if (ids[i] < 0 && !embeddings) {
            fail("row %d: a row with a negative id takes an embedding vector, and no embeddings were given", i);
            return -1;
        }
    }
    for (int i = 0; until && i < n; i++)
        if (until[i] < start + i + 1 || until[i] > start + n) {
            fail("row %d: attend_until %lld outside its call (positions %d..%d)", i, (long long)until[i], start + i + 1,
                 start + n);
            return -1;
        }
    const em_variant *variant = NULL;
    /* rows that see later rows need the prefill program's attention (em_attention's until) */
    for (int i = 0; i < EM_VARIANT_COUNT && !variant; i++)
        if (n <= EM_VARIANTS[i].max_rows && !(until && EM_VARIANTS[i].run_rows)) variant = &EM_VARIANTS[i];
    em_model *model = s->model;
    const int decode = n == 1 && !embeddings;
    pthread_mutex_lock(&model->team_lock);
    const int team = team_pick(&model->team, model->threads, decode);
    pthread_mutex_unlock(&model->team_lock);
    em_set_threads(team_threads(s->model->threads, team)); /* the OpenMP team size is per calling thread */
    const double started = decode ? now_ns() : 0;
    float *out = variant->all_logits && logits_from > 0 ? s->logits : logits;
    int64_t own[3 * n];
    rope = own_positions(rope, own, NULL, start, n);
    if (variant->run_rows) {
        em_kv_value *kvs[n];
        int positions[n];
        for (int i = 0; i < n; i++) kvs[i] = s->kv, positions[i] = start + i;
        variant->run_rows(s->model->mapped, s->model->weights, s->arena, kvs, s->loras, positions, n, ids,
                          embeddings, logits_from, out, rope);
    } else {
        variant->run(s->model->mapped, s->model->weights, s->arena, s->kv, s->loras, n, start, ids, embeddings,
                     until, logits_from, out, rope);
    }
    if (decode && model->threads > 1) {
        const double now = now_ns();
        pthread_mutex_lock(&model->team_lock);
        team_record(&model->team, team, now - started, now);
        pthread_mutex_unlock(&model->team_lock);
    }
    if (out != logits)
        memcpy(logits, out + (size_t)logits_from * EM_MODEL.vocab_size,
               sizeof(float) * (size_t)(n - logits_from) * EM_MODEL.vocab_size);
    s->length = start + n;
    return 0;
}

int em_forward_rows(em_session *const *sessions, const int *positions, const int64_t *ids, int n, float *logits,
                    const int64_t *rope) {
    const em_variant *rows = NULL;
    for (int i = 0; i < EM_VARIANT_COUNT; i++)
        if (EM_VARIANTS[i].run_rows) rows = &EM_VARIANTS[i];
    if (!rows || n < 1 || n > rows->max_rows) {
        fail("bad call: %d rows of sessions (1 to %d per call)", n, rows ? rows->max_rows : 0);
        return -1;
    }
    const em_model *model = sessions[0]->model;
    for (int i = 0; i < n; i++) {
        const em_session *s = sessions[i];
        int next = s->length; /* the position this row may take: at most the session's length, */
        int follows = 0;      /* or right after this session's previous row in the call */
        for (int j = 0; j < i; j++)
            if (sessions[j] == s) next = positions[j] + 1, follows = 1;
        if (EM_LORA_SITE_COUNT > 0 && memcmp(s->loras, sessions[0]->loras, sizeof(em_lora) * EM_LORA_SITE_COUNT)) {
            fail("bad call: row %d's session has other LoRA branches than row 0's (one call, one adapter)", i);
            return -1;
        }
        if (s->model != model || positions[i] < 0 || positions[i] > next || (follows && positions[i] != next) ||
            positions[i] >= EM_MODEL.max_tokens || ids[i] < 0 || ids[i] >= EM_MODEL.vocab_size) {
            fail("bad call: row %d (token %lld at position %d of a session holding %d; %d positions, %d tokens)", i,
                 (long long)ids[i], positions[i], s->length, EM_MODEL.max_tokens, EM_MODEL.vocab_size);
            return -1;
        }
    }
    em_kv_value *kvs[n];
    for (int i = 0; i < n; i++) kvs[i] = sessions[i]->kv;
    em_set_threads(team_threads(model->threads, model->team.choice)); /* (one int: read without the lock) */
    int64_t own[3 * n];
    rope = own_positions(rope, own, positions, 0, n);
    rows->run_rows(model->mapped, model->weights, sessions[0]->arena, kvs, sessions[0]->loras, positions, n, ids, NULL,
                   0, logits, rope);
    for (int i = 0; i < n; i++) sessions[i]->length = positions[i] + 1;
    return 0;
}
