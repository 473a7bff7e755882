/* cli_bench.c: `g3n bench`, llama-bench style: prefill (pp) and decode (tg)
 * tokens per second over repetitions, mean and standard deviation, plus the
 * bytes one decoded token reads and that rate against the measured memory
 * bandwidth. Tokenization is excluded; decoding feeds back the greedy pick (timed
 * with the step: on a GPU the device's best logit, no copy of the row) and
 * prints a checksum of the ids, so a fast but wrong build shows.
 * --parallel P1,P2,...: aggregate decode of P sequences per batched step instead. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"

typedef struct {
    double mean, sd;
} stat2;

static stat2 stats(const double *v, int n) {
    stat2 s = {0, 0};
    for (int i = 0; i < n; i++) s.mean += v[i];
    s.mean /= n;
    for (int i = 0; i < n; i++) s.sd += (v[i] - s.mean) * (v[i] - s.mean);
    s.sd = n > 1 ? sqrt(s.sd / (n - 1)) : 0;
    return s;
}

/* A greedy sampler (the pick bench feeds back), or die. */
static g3n_sampler *greedy_sampler(int n_vocab) {
    char err[256];
    g3n_sampler_params gp = g3n_sampler_default_params();
    gp.temperature = 0;
    g3n_sampler *s = g3n_sampler_create(&gp, n_vocab, err, sizeof err);
    if (!s) die("%s", err);
    return s;
}

/* g3n_session_generate's callback: the picks into an FNV-1a hash (the checksum) */
static int fnv_token(void *ud, int32_t id) {
    uint64_t *h = (uint64_t *)ud;
    *h = (*h ^ (uint64_t)id) * 1099511628211ull;
    return 0;
}

/* --parallel 1,8,32: aggregate decode tok/s of P sequences stepped together
 * through g3n_batch_decode_sample (what `g3n serve` does with P busy slots). Each
 * sequence first gets its own n_prompt-token prompt; two untimed steps record
 * the batched step; then n_gen timed steps with each stream's greedy pick
 * (g3n_batch_decode_sample), fed back. */
static void bench_parallel(g3n_model *m, const model_opts *mo, const int *counts, int n_counts, int n_prompt,
                           int n_gen, int reps, int json) {
    g3n_model_info mi = g3n_model_get_info(m);
    char err[1024];
    double base = 0;
    if (!json) printf("| model | backend | streams | tg%d aggregate t/s | per stream t/s | vs 1 stream |\n|---|---|---|---|---|---|\n", n_gen);
    for (int c = 0; c < n_counts; c++) {
        const long P = counts[c];
        model_opts so = *mo;
        so.n_ctx = n_prompt + n_gen + 3;
        if (so.n_batch == 0) so.n_batch = n_prompt > 0 ? (n_prompt < 64 ? n_prompt : 64) : 1;
        g3n_session **ss = malloc(sizeof(*ss) * (size_t)P);
        int32_t *tok = malloc(sizeof(int32_t) * (size_t)P), *prompt = malloc(sizeof(int32_t) * (size_t)(n_prompt + 1));
        g3n_batcher *bt = g3n_batcher_create(m, (int)P, err, sizeof err);
        g3n_sampler **greedy = malloc(sizeof(*greedy) * (size_t)P);
        if (!ss || !tok || !prompt || !bt || !greedy) die("bench: %s", bt ? "out of memory" : err);
        for (int i = 0; i < P; i++) greedy[i] = greedy_sampler(mi.n_vocab_text);
        for (int i = 0; i < P; i++) ss[i] = open_session(m, &so);
        double *tg = calloc((size_t)reps, sizeof(double));
        uint64_t h = 1469598103934665603ull;
        for (int r = 0; r < reps; r++) {
            for (int i = 0; i < P; i++) { /* a different prompt per sequence */
                uint64_t st = 0x2545F4914F6CDD1Dull + (uint64_t)i;
                for (int k = 0; k < n_prompt; k++) {
                    st = st * 6364136223846793005ull + 1442695040888963407ull;
                    prompt[k] = (int32_t)(3 + (st >> 33) % (uint64_t)(mi.n_vocab_text - 3));
                }
                g3n_session_reset(ss[i]);
                prompt[n_prompt] = 2;
                if (g3n_session_eval(ss[i], n_prompt ? prompt : prompt + n_prompt, n_prompt ? n_prompt : 1, NULL, err, sizeof err))
                    die("%s", err);
                tok[i] = 2;
            }
            double spent = 0;
            h = 1469598103934665603ull;
            for (int k = 0; k < n_gen + 2; k++) { /* the step and every stream's greedy pick, as `g3n serve` */
                double t0 = now_s();
                if (g3n_batch_decode_sample(bt, ss, tok, (int)P, greedy, tok, err, sizeof err)) die("%s", err);
                if (k >= 2) spent += now_s() - t0;
                for (int i = 0; i < P; i++) h = (h ^ (uint64_t)tok[i]) * 1099511628211ull;
            }
            tg[r] = (double)P * n_gen / spent;
        }
        stat2 sg = stats(tg, reps);
        if (P == 1) base = sg.mean;
        if (json)
            printf("{\"model\": \"%s\", \"backend\": \"%s\", \"device\": \"%s\", \"streams\": %ld, \"n_prompt\": %d, "
                   "\"n_gen\": %d, \"reps\": %d, \"tg_aggregate_tok_s\": %.3f, \"tg_sd\": %.3f, \"per_stream_tok_s\": %.3f, "
                   "\"checksum\": \"%016llx\"}\n",
                   mo->dir, mi.backend, mi.device_name, P, n_prompt, n_gen, reps, sg.mean, sg.sd, sg.mean / P,
                   (unsigned long long)h);
        else if (base > 0)
            printf("| %s | %s | %ld | %.2f ± %.2f | %.2f | %.2fx |\n", mo->dir, mi.backend, P, sg.mean, sg.sd, sg.mean / P,
                   sg.mean / base);
        else
            printf("| %s | %s | %ld | %.2f ± %.2f | %.2f | |\n", mo->dir, mi.backend, P, sg.mean, sg.sd, sg.mean / P);
        fflush(stdout);
        for (int i = 0; i < P; i++) g3n_session_free(ss[i]), g3n_sampler_free(greedy[i]);
        free(greedy);
        g3n_batcher_free(bt);
        free(ss);
        free(tok);
        free(prompt);
        free(tg);
    }
}

/* The session holding the first `depth` ids (none: empty), evaluated untimed */
static void fill_context(g3n_session *s, const int32_t *ids, int depth) {
    char err[1024];
    g3n_session_reset(s);
    if (depth > 0 && g3n_session_eval(s, ids, depth, NULL, err, sizeof err)) die("%s", err);
}

/* Back to the first `depth` positions: cut the session there where it still
 * can, else fill it again */
static void back_to(g3n_session *s, const int32_t *ids, int depth) {
    char err[1024];
    if (depth > 0 && g3n_session_pos(s) >= depth && g3n_session_truncate(s, depth, err, sizeof err) == 0) return;
    fill_context(s, ids, depth);
}

int cmd_bench(int argc, char **argv) {
    model_opts mo = {0};
    int n_prompt = 512, n_gen = 128, reps = 3, json = 0, membw = 1, depth = 0;
    int counts[16], n_counts = 0;
    for (int i = 2; i < argc; i++) {
        if (opt_model(&mo, argc, argv, &i)) continue;
        const char *a = argv[i];
        if (!strcmp(a, "-p") && i + 1 < argc) n_prompt = (int)parse_long(a, argv[++i], 0, 1 << 20);
        else if (!strcmp(a, "-n") && i + 1 < argc) n_gen = (int)parse_long(a, argv[++i], 0, 1 << 20);
        else if (!strcmp(a, "-r") && i + 1 < argc) reps = (int)parse_long(a, argv[++i], 1, 1000);
        else if (!strcmp(a, "-d") && i + 1 < argc) depth = (int)parse_long(a, argv[++i], 0, 1 << 20);
        else if (!strcmp(a, "--json")) json = 1;
        else if (!strcmp(a, "--no-membw")) membw = 0;
        else if (!strcmp(a, "--parallel") && i + 1 < argc) {
            const char *list = argv[++i], *p = list;
            n_counts = 0;
            while (*p) { /* 1,8,32 */
                char *end;
                long v = strtol(p, &end, 10);
                if (end == p || v < 1 || v > 1024 || (*end && *end != ',') || n_counts == 16)
                    die("--parallel: \"%s\" is not a list of up to 16 stream counts in 1..1024, like 1,8,32", list);
                counts[n_counts++] = (int)v;
                p = *end ? end + 1 : end;
            }
            if (!n_counts) die("--parallel: no stream counts given");
        }
        else die("bench: unknown or incomplete option \"%s\" (see g3n --help)", a);
    }
    if (n_counts && depth) die("bench: -d is not taken with --parallel");
    g3n_model *m = open_model(&mo);
    if (n_counts) {
        bench_parallel(m, &mo, counts, n_counts, n_prompt, n_gen, reps, json);
        g3n_model_close(m);
        return 0;
    }
    g3n_model_info mi = g3n_model_get_info(m);
    /* the ids: a context of `depth` that pp and tg run after, then the pp prompt */
    const int n_ids = depth + n_prompt, need = depth + (n_prompt > n_gen + 1 ? n_prompt : n_gen + 1);
    if (mo.n_ctx == 0) mo.n_ctx = need;
    if (mo.n_batch == 0) { /* the pp prompt in one step; a context in steps of up to 1024 */
        const int fill = depth < 1024 ? depth : 1024;
        mo.n_batch = n_prompt > fill ? n_prompt : fill > 0 ? fill : 1;
    }
    if (need > mo.n_ctx) die("bench: -d %d -p %d -n %d needs a context of %d (-c)", depth, n_prompt, n_gen, need);
    g3n_session *s = open_session(m, &mo);
    char err[1024];

    /* deterministic prompt of text ids */
    int32_t *prompt = malloc(sizeof(int32_t) * (size_t)(n_ids + 1));
    uint64_t st = 0x2545F4914F6CDD1Dull;
    for (int i = 0; i < n_ids; i++) {
        st = st * 6364136223846793005ull + 1442695040888963407ull;
        prompt[i] = (int32_t)(3 + (st >> 33) % (uint64_t)(mi.n_vocab_text - 3));
    }
    /* warm-up: page in the weights, grow scratch, let libraries pick kernels
     * (and the greedy pick its buffers) */
    g3n_sampler *greedy = greedy_sampler(mi.n_vocab_text);
    int32_t w0 = 2;
    if (g3n_session_eval(s, &w0, 1, NULL, err, sizeof err)) die("%s", err);
    if (g3n_session_eval(s, &w0, 1, NULL, err, sizeof err)) die("%s", err);
    (void)g3n_session_sample(s, greedy);
    if (n_prompt > 0) { /* (and record the prompt step at this depth: a GPU backend records a
                         * step the second time it comes) */
        fill_context(s, prompt, depth);
        for (int w = 0; w < 2; w++) {
            back_to(s, prompt, depth);
            if (g3n_session_eval(s, prompt + depth, n_prompt, NULL, err, sizeof err)) die("%s", err);
        }
    }

    /* decode is timed on every path where they differ (GPU); the model's own
     * choice first; only the one a --decode-path other than auto names */
    const char *paths[3] = {mi.decode_path, NULL, NULL}, *all[3] = {"fused", "split", "mega"};
    int n_paths = 1;
    const int one_path = mo.decode_path && strcmp(mo.decode_path, "auto") != 0;
    for (int i = 0; i < 3 && strncmp(mi.backend, "cpu", 3) != 0 && n_gen > 0 && !one_path; i++)
        if (strcmp(all[i], paths[0]) && strstr(mi.decode_paths, all[i])) paths[n_paths++] = all[i];
    double *pp = calloc((size_t)reps, sizeof(double)), *tg = calloc((size_t)reps * 3, sizeof(double));
    uint64_t checksum[3] = {0, 0, 0};
    for (int r = 0; r < reps; r++) {
        if (n_prompt > 0) {
            back_to(s, prompt, depth);
            double t0 = now_s();
            if (g3n_session_eval(s, prompt + depth, n_prompt, NULL, err, sizeof err)) die("%s", err);
            pp[r] = n_prompt / (now_s() - t0);
        }
        for (int pi = 0; pi < n_paths && n_gen > 0; pi++) {
            g3n_model_set_decode_path(m, paths[pi]);
            back_to(s, prompt, depth);
            int32_t tok = 2; /* <bos> */
            uint64_t h = 1469598103934665603ull;
            if (r == 0) /* record this path's step before timing it: the first pick tells the
                           * session what the next steps queue for the sampler; a GPU backend
                           * records the step with it the second time it comes */
                for (int w = 0; w < 3; w++) {
                    if (g3n_session_eval(s, &tok, 1, NULL, err, sizeof err)) die("%s", err);
                    g3n_session_sample(s, greedy);
                    back_to(s, prompt, depth);
                }
            /* n_gen steps and their greedy picks as `g3n generate --temp 0` makes
             * them (g3n_session_generate; on a GPU the pick is the device's best
             * logit, not a copy of the row) */
            double t0 = now_s();
            if (g3n_session_eval(s, &tok, 1, NULL, err, sizeof err)) die("%s", err);
            if (g3n_session_generate(s, greedy, n_gen, fnv_token, &h, err, sizeof err) != n_gen) die("%s", err);
            const double spent = now_s() - t0;
            tg[pi * reps + r] = n_gen / spent;
            checksum[pi] = h;
        }
        g3n_model_set_decode_path(m, paths[0]);
        if (!g3n_quiet && !json)
            fprintf(stderr, "g3n: rep %d/%d: pp %.2f tok/s, tg %.2f tok/s (%s)%s\n", r + 1, reps, pp[r], tg[r],
                    paths[0], n_paths > 1 ? "" : "");
    }
    const size_t dev_mem = g3n_model_device_memory(m); /* everything is allocated by now */
    double bw = membw ? g3n_model_read_bandwidth(m, 0) : 0;
    stat2 sp = stats(pp, reps), sg = stats(tg, reps), sgp[3];
    for (int pi = 0; pi < n_paths; pi++) sgp[pi] = stats(tg + pi * reps, reps);
    /* bytes a token reads: dense, or with exact sparsity the expected share, and
     * for these greedy steps the LM head's cheaper copy where the backend reads
     * one (its candidates' exact rows are not counted: a handful); and the K/V
     * cache's, averaged over the timed positions */
    double kv_sum = 0;
    for (int i = 0; i < n_gen; i++) kv_sum += (double)g3n_model_kv_read_bytes(m, depth + i);
    const size_t kvb = n_gen > 0 ? (size_t)(kv_sum / n_gen) : 0;
    const size_t wb = mi.decode_bytes_greedy   ? mi.decode_bytes_greedy
                      : mi.decode_bytes_sparse ? mi.decode_bytes_sparse
                                               : mi.decode_bytes,
                 rd = wb + kvb;
    double gbs = rd * sg.mean / 1e9;
    if (json) {
        printf("{\"model\": \"%s\", \"backend\": \"%s\", \"device\": \"%s\", \"threads\": %d, "
               "\"n_prompt\": %d, \"n_gen\": %d, \"n_depth\": %d, \"reps\": %d, \"pp_tok_s\": %.3f, "
               "\"pp_sd\": %.3f, \"decode_path\": \"%s\", \"tg_tok_s\": %.3f, \"tg_sd\": %.3f, ",
               mo.dir, mi.backend, mi.device_name, mo.threads, n_prompt, n_gen, depth, reps, sp.mean, sp.sd,
               paths[0], sg.mean, sg.sd);
        for (int pi = 1; pi < n_paths; pi++)
            printf("\"tg_%s_tok_s\": %.3f, \"tg_%s_sd\": %.3f, ", paths[pi], sgp[pi].mean, paths[pi], sgp[pi].sd);
        printf("\"kv_type\": \"%s\", \"decode_bytes_per_token\": %zu, \"kv_bytes_per_token\": %zu, \"decode_bytes_dense\": %zu, "
               "\"decode_gb_s\": %.3f, "
               "\"read_bw_gb_s\": %.3f, \"bw_fraction\": %.4f, \"device_memory_gb\": %.3f, \"checksum\": \"%016llx\"}\n",
               mi.kv_type, rd, kvb, mi.decode_bytes + kvb, gbs, bw / 1e9, bw > 0 ? gbs * 1e9 / bw : 0, dev_mem / 1e9,
               (unsigned long long)checksum[0]);
    } else {
        printf("| model | backend | test | t/s |\n|---|---|---|---|\n");
        char ppn[48], tgn[48]; /* pp512 / tg128, or pp512 @ d4096 / tg128 @ d4096 after a context */
        snprintf(ppn, sizeof ppn, depth ? "pp%d @ d%d" : "pp%d", n_prompt, depth);
        snprintf(tgn, sizeof tgn, depth ? "tg%d @ d%d" : "tg%d", n_gen, depth);
        if (n_prompt > 0) printf("| %s | %s | %s | %.2f ± %.2f |\n", mo.dir, mi.backend, ppn, sp.mean, sp.sd);
        if (n_gen > 0)
            printf("| %s | %s (%s) | %s | %.2f ± %.2f |\n", mo.dir, mi.backend, paths[0], tgn, sg.mean, sg.sd);
        for (int pi = 1; pi < n_paths; pi++)
            printf("| %s | %s (%s) | %s | %.2f ± %.2f |\n", mo.dir, mi.backend, paths[pi], tgn, sgp[pi].mean,
                   sgp[pi].sd);
        printf("\ndevice %s; decode reads %.3f GB/token", mi.device_name, rd / 1e9);
        if (wb != mi.decode_bytes)
            printf(" with%s%s%s (expected; %.3f dense)", mi.decode_bytes_sparse ? " exact sparsity" : "",
                   mi.decode_bytes_sparse && mi.decode_bytes_greedy ? " and" : "",
                   mi.decode_bytes_greedy ? " the LM head read through its copy (greedy)" : "",
                   (mi.decode_bytes + kvb) / 1e9);
        if (depth) printf(" (%s K/V cache %.1f MB of it)", mi.kv_type, kvb / 1e6);
        printf(" -> %.2f GB/s", gbs);
        if (bw > 0) {
            printf("; measured read bandwidth %.2f GB/s; %.1f%% of the bandwidth limit (%.2f tok/s", bw / 1e9,
                   100.0 * gbs * 1e9 / bw, bw / rd);
            if (wb != mi.decode_bytes) printf("; dense limit %.2f tok/s", bw / (mi.decode_bytes + kvb));
            printf(")");
        }
        if (dev_mem) printf("\ndevice memory in use: %.2f GB", dev_mem / 1e9);
        printf("\ntoken checksum %016llx", (unsigned long long)checksum[0]);
        for (int pi = 1; pi < n_paths; pi++) printf(" (%s: %016llx)", paths[pi], (unsigned long long)checksum[pi]);
        printf("\n");
    }
    free(pp);
    free(tg);
    free(prompt);
    g3n_sampler_free(greedy);
    g3n_session_free(s);
    g3n_model_close(m);
    return 0;
}
