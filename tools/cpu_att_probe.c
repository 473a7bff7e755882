/* cpu_att_probe.c: time the CPU backend's attention op alone, at Gemma 3n's
 * shapes (8 query heads, 2 KV heads of 256), one full-attention layer: n tokens
 * at the end of a ctx-key cache (n = 1: a decode step), optionally a window.
 *   make build/release/libg3n.a
 *   cc -O2 -fopenmp -Isrc -Isrc/core -o /tmp/cpu_att_probe tools/cpu_att_probe.c \
 *      build/release/libg3n.a -lcjson -lm -lpthread
 *   /tmp/cpu_att_probe CTX [N [WINDOW [THREADS [f16]]]]
 * Prints ms per call and a checksum of the output (equal checksums: the same
 * bits; how docs/SPEED.md, thirteenth session, compared two builds). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "backend/backend.h"
#include "common.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    const int ctx = argc > 1 ? atoi(argv[1]) : 8192, n = argc > 2 ? atoi(argv[2]) : 1;
    const int win = argc > 3 ? atoi(argv[3]) : 0, threads = argc > 4 ? atoi(argv[4]) : 2;
    const int f16 = argc > 5 && !strcmp(argv[5], "f16"); /* an f16 cache (--kv-type f16) */
    const int H = 8, Hkv = 2, hd = 256, kvd = Hkv * hd;
    if (ctx < 1 || n < 1 || n > 64 || n > ctx) {
        fprintf(stderr, "usage: cpu_att_probe CTX [N (1-64, <= CTX) [WINDOW [THREADS [f16]]]]\n");
        return 1;
    }
    char err[256];
    g3n_backend *be = cpu_backend_create(threads, err, sizeof err);
    if (!be) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    float *k = malloc(sizeof(float) * (size_t)ctx * kvd), *v = malloc(sizeof(float) * (size_t)ctx * kvd);
    for (size_t i = 0; i < (size_t)ctx * kvd; i++) {
        k[i] = (float)((i * 2654435761u) % 1000) / 1000.f - .5f;
        v[i] = (float)((i * 40503u) % 1000) / 1000.f - .5f;
    }
    g3n_kv kv;
    memset(&kv, 0, sizeof kv);
    kv.layer[0] = (g3n_kv_layer){k, v, ctx, f16};
    if (f16) { /* the same values as halves, in place (the first half of each array) */
        uint16_t *hk = (uint16_t *)k, *hv = (uint16_t *)v;
        for (size_t i = 0; i < (size_t)ctx * kvd; i++) hk[i] = g3n_f32_to_f16(k[i]), hv[i] = g3n_f32_to_f16(v[i]);
    }
    g3n_kv *kvs[1] = {&kv};
    int32_t ids[64] = {0}, pos[64], seq[64] = {0};
    for (int t = 0; t < n; t++) pos[t] = ctx - n + t;
    g3n_batch b = {n, ids, pos, seq, kvs, 1};
    be->batch_set(be, &b);
    float *q = malloc(sizeof(float) * (size_t)n * H * hd), *out = malloc(sizeof(float) * (size_t)n * H * hd);
    for (int i = 0; i < n * H * hd; i++) q[i] = (float)(i % 97) / 97.f - .5f;
    be->attention(be, out, q, 0, H, Hkv, hd, win);
    int reps = 0;
    const double t0 = now();
    while (now() - t0 < 2.0) {
        be->attention(be, out, q, 0, H, Hkv, hd, win);
        reps++;
    }
    const double dt = (now() - t0) / reps;
    double s = 0;
    for (int i = 0; i < n * H * hd; i++) s += out[i] * (i % 7);
    printf("ctx %d n %d window %d threads %d%s: %.3f ms per call, checksum %.9g\n", ctx, n, win, threads,
           f16 ? " f16" : "", dt * 1e3, s);
    be->destroy(be);
    free(k), free(v), free(q), free(out);
    return 0;
}
