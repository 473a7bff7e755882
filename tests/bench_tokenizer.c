/* bench_tokenizer.c: a benchmark of the tokenizer, not a test (the Makefile does
 * not build it). Prints the load time of tokenizer.json and encode/decode speed on
 * a text file, the same measurements tools/tokenize_ref.py makes for HF
 * `tokenizers` (whole text, line by line; best of N; one thread). The build and run
 * commands are in tests/fixtures/tokenizer/README.md:
 *   build/bench_tokenizer TOKENIZER.json TEXT.txt [reps]
 */
#define _POSIX_C_SOURCE 200809L
#include "g3n.h"
#include "common.h"

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s tokenizer.json text.txt [reps]\n", argv[0]);
        return 2;
    }
    int reps = argc > 3 ? atoi(argv[3]) : 5;
    if (reps < 1) reps = 1;
    char err[512];
    double best_load = 1e9;
    g3n_tokenizer *tk = NULL;
    for (int r = 0; r < 3; r++) {
        double t0 = g3n_time_s();
        g3n_tokenizer *next = g3n_tokenizer_load(argv[1], err, sizeof err);
        double t = g3n_time_s() - t0;
        if (!next) {
            fprintf(stderr, "%s\n", err);
            return 1;
        }
        if (t < best_load) best_load = t;
        g3n_tokenizer_free(tk);
        tk = next;
    }
    size_t n;
    char *text = g3n_read_file(argv[2], &n, (size_t)1 << 31, err, sizeof err);
    if (!text) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    /* lines: split on '\n' only, as the reference tools do */
    size_t nl = 0, cap = 1024;
    size_t *start = g3n_malloc(cap * sizeof *start), *len = g3n_malloc(cap * sizeof *len);
    for (size_t i = 0, s = 0; i <= n; i++) {
        if (i == n || text[i] == '\n') {
            if (i == n && s == n) break;
            if (nl == cap) {
                cap *= 2;
                start = realloc(start, cap * sizeof *start);
                len = realloc(len, cap * sizeof *len);
            }
            start[nl] = s;
            len[nl++] = i - s;
            s = i + 1;
        }
    }
    double tw = 1e9, tl = 1e9, td = 1e9;
    int nids = 0;
    for (int r = 0; r < reps; r++) {
        int32_t *ids;
        double t0 = g3n_time_s();
        nids = g3n_tokenizer_encode(tk, text, n, 0, &ids, err, sizeof err);
        double t = g3n_time_s() - t0;
        if (nids < 0) {
            fprintf(stderr, "%s\n", err);
            return 1;
        }
        if (t < tw) tw = t;
        t0 = g3n_time_s();
        char *d = g3n_tokenizer_decode(tk, ids, (size_t)nids, 0, NULL);
        t = g3n_time_s() - t0;
        if (t < td) td = t;
        free(d);
        free(ids);
        t0 = g3n_time_s();
        for (size_t i = 0; i < nl; i++) {
            if (g3n_tokenizer_encode(tk, text + start[i], len[i], 0, &ids, err, sizeof err) < 0)
                return 1;
            free(ids);
        }
        t = g3n_time_s() - t0;
        if (t < tl) tl = t;
    }
    printf("g3n tokenizer, one thread, best of %d\n", reps);
    printf("load tokenizer.json: %.3f s (best of 3)\n", best_load);
    printf("text: %zu bytes, %zu lines, %d ids\n", n, nl, nids);
    printf("encode whole text:      %.4f s  %.2f MB/s\n", tw, n / tw / 1e6);
    printf("encode line by line:    %.4f s  %.2f MB/s\n", tl, n / tl / 1e6);
    printf("decode:                 %.4f s  %.2f MB/s\n", td, n / td / 1e6);
    free(start);
    free(len);
    free(text);
    g3n_tokenizer_free(tk);
    return 0;
}
