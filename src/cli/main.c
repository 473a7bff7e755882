/* main.c: the g3n command line. Subcommands: logits, generate, bench (and the
 * text-side ones from cli_text.c). Uses only the public API in g3n.h; every error
 * is one line on stderr and exit status 1. Only results go to stdout. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli/cli.h"

void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "g3n: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

long parse_long(const char *flag, const char *s, long lo, long hi) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        die("%s: \"%s\" is not an integer in [%ld, %ld]", flag, s, lo, hi);
    return v;
}

double parse_double(const char *flag, const char *s, double lo, double hi) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi))
        die("%s: \"%s\" is not a number in [%g, %g]", flag, s, lo, hi);
    return v;
}

int32_t *parse_ids(const char *s, int *n) {
    int cap = 16, k = 0;
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)cap);
    const char *p = s;
    if (!ids) die("out of memory");
    while (*p) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (errno || end == p || v < 0 || v > INT32_MAX || (*end && *end != ','))
            die("--ids: \"%s\" is not a comma-separated list of token ids", s);
        if (k == cap) {
            cap *= 2;
            ids = realloc(ids, sizeof(int32_t) * (size_t)cap);
            if (!ids) die("out of memory");
        }
        ids[k++] = (int32_t)v;
        p = *end ? end + 1 : end;
        if (*end == ',' && !*p) die("--ids: trailing comma in \"%s\"", s);
    }
    if (k == 0) die("--ids: no token ids given");
    *n = k;
    return ids;
}

/* ---- common options ---------------------------------------------------------------- */

/* Consume a model option at argv[*i] if it is one; returns 1 if consumed. */
int opt_model(model_opts *o, int argc, char **argv, int *i) {
    const char *a = argv[*i];
#define NEED() \
    do { if (*i + 1 >= argc) die("%s needs a value", a); } while (0)
    if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
        NEED();
        o->dir = argv[++*i];
    } else if (!strcmp(a, "--device")) {
        NEED();
        o->device = argv[++*i];
    } else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) {
        NEED();
        o->threads = (int)parse_long(a, argv[++*i], 0, 4096);
    } else if (!strcmp(a, "-c") || !strcmp(a, "--ctx-size")) {
        NEED();
        o->n_ctx = (int)parse_long(a, argv[++*i], 0, 1 << 24);
    } else if (!strcmp(a, "-b") || !strcmp(a, "--batch-size")) {
        NEED();
        o->n_batch = (int)parse_long(a, argv[++*i], 1, 65536);
    } else if (!strcmp(a, "--decode-path")) {
        NEED();
        o->decode_path = argv[++*i];
    } else if (!strcmp(a, "--kv-type")) {
        NEED();
        o->kv_type = argv[++*i];
    } else if (!strcmp(a, "--ple-on-gpu")) {
        o->ple_on_gpu = 1;
    } else if (!strcmp(a, "--sparse")) {
        o->sparse = 1;
    } else if (!strcmp(a, "--no-sparse")) {
        o->sparse = -1;
    } else if (!strcmp(a, "--no-graph")) {
        o->no_graph = 1;
    } else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) {
        g3n_quiet = 1;
    } else {
        return 0;
    }
#undef NEED
    return 1;
}

int g3n_quiet = 0;

g3n_model *open_model(const model_opts *o) {
    if (!o->dir) die("no model: give -m DIR (a checkpoint directory with config.json)");
    g3n_model_params p = g3n_model_default_params();
    if (o->device) p.device = o->device;
    p.n_threads = o->threads;
    p.ple_on_gpu = o->ple_on_gpu;
    p.no_graph = o->no_graph;
    p.decode_path = o->decode_path;
    p.kv_type = o->kv_type;
    p.sparse = o->sparse;
    char err[1024];
    double t0 = now_s();
    g3n_model *m = g3n_model_open(o->dir, &p, err, sizeof err);
    if (!m) die("%s", err);
    g3n_model_info mi = g3n_model_get_info(m);
    if (!g3n_quiet)
        fprintf(stderr, "g3n: loaded %s (%s, %d layers, %.2f GB of text weights) on %s in %.2f s; "
                "decode path %s (%s)%s, %s K/V cache\n",
                o->dir, mi.layout, mi.n_layer, mi.weight_bytes / 1e9, mi.backend, now_s() - t0,
                mi.decode_path, mi.decode_path_why, mi.sparse ? ", exact sparsity" : "", mi.kv_type);
    return m;
}

g3n_session *open_session(g3n_model *m, const model_opts *o) {
    char err[1024];
    g3n_session *s = g3n_session_create(m, o->n_ctx, o->n_batch, err, sizeof err);
    if (!s) die("%s", err);
    return s;
}

double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- logits ------------------------------------------------------------------------- */

static int cmd_logits(int argc, char **argv) {
    model_opts mo = {0};
    const char *ids_s = NULL, *out = NULL;
    for (int i = 2; i < argc; i++) {
        if (opt_model(&mo, argc, argv, &i)) continue;
        if (!strcmp(argv[i], "--ids") && i + 1 < argc) ids_s = argv[++i];
        else if (!strcmp(argv[i], "--out") && i + 1 < argc) out = argv[++i];
        else die("logits: unknown or incomplete option \"%s\" (see g3n --help)", argv[i]);
    }
    if (!ids_s) die("logits: --ids is required");
    if (!out) die("logits: --out FILE is required");
    int n;
    int32_t *ids = parse_ids(ids_s, &n);
    g3n_model *m = open_model(&mo);
    if (mo.n_ctx == 0) mo.n_ctx = n;
    g3n_session *s = open_session(m, &mo);
    FILE *f = fopen(out, "wb");
    if (!f) die("%s: %s", out, strerror(errno));
    const int V = g3n_model_get_info(m).n_vocab;
    /* evaluate in steps so memory stays at one step of logits */
    int step = mo.n_batch > 0 ? mo.n_batch : 64;
    float *lg = malloc(sizeof(float) * (size_t)V * (size_t)step);
    if (!lg) die("out of memory");
    char err[1024];
    for (int i0 = 0; i0 < n; i0 += step) {
        int nb = n - i0 < step ? n - i0 : step;
        if (g3n_session_eval(s, ids + i0, nb, lg, err, sizeof err)) die("%s", err);
        if (fwrite(lg, sizeof(float), (size_t)nb * V, f) != (size_t)nb * V)
            die("%s: write failed", out);
    }
    if (fclose(f)) die("%s: write failed", out);
    free(lg);
    free(ids);
    g3n_session_free(s);
    g3n_model_close(m);
    return 0;
}

/* ---- help and dispatch ------------------------------------------------------------------- */

static void usage(FILE *f) {
    fprintf(f,
            "g3n: Gemma 3n inference\n"
            "\n"
            "usage: g3n COMMAND [options]\n"
            "\n"
            "commands:\n"
            "  generate   continue a prompt (-p TEXT or --ids LIST), streaming text\n"
            "  run        chat with the model (interactive, or one-shot with -p)\n"
            "  logits     write the logits of every position: --ids LIST --out FILE\n"
            "             (little-endian float32, T x vocab_size, row-major)\n"
            "  bench      prefill and decode speed (pp/tg): -p 512 -n 128 [-d 0] [-r 3] [--json]\n"
            "  tokenize   print the token ids of a text\n"
            "  serve      OpenAI-compatible HTTP server (see serve options)\n"
            "  quantize   write an mlx 4/8-bit (2-6, 8) copy: -m DIR -o OUT --bits 4 --group-size 64\n"
            "\n"
            "model options (all commands):\n"
            "  -m, --model DIR        checkpoint directory (config.json + safetensors)\n"
            "  --device NAME          cuda, cpu or cpu-ref (reference ops, slow); default: cuda\n"
            "                         when built with CUDA and a GPU is present, else cpu\n"
            "  --ple-on-gpu           cuda: keep the per-layer-embedding table on the GPU\n"
            "                         (default: host memory; one row per token is copied)\n"
            "  --no-graph             cuda: launch every kernel each step (no CUDA graph)\n"
            "  --decode-path P        fused, split, mega (cuda: all layers in one kernel) or auto\n"
            "                         (default: auto, measured per device); fused-nol2: fused\n"
            "                         without the L2 prefetch hints (never chosen by auto)\n"
            "  --sparse, --no-sparse  exact activation sparsity in the top-k layers (decode\n"
            "                         reads ~5%% of their up/down weights); default on cuda:\n"
            "                         on for unquantized, 4- and 8-bit checkpoints;\n"
            "                         cpu: off (--sparse: unquantized only, a W^T copy in RAM)\n"
            "  --kv-type T            K/V cache elements: f32 (default, exact) or f16 (half\n"
            "                         the memory and attention's reads; rounds K and V)\n"
            "  -t, --threads N        CPU threads (default: all cores)\n"
            "  -c, --ctx-size N       context length (default: 4096 or the model's maximum)\n"
            "  -b, --batch-size N     tokens per forward step (default 1024 on cuda, 256 on cpu)\n"
            "  -q, --quiet            no progress messages on stderr\n"
            "\n"
            "generation options (generate, run):\n"
            "  -p, --prompt TEXT      prompt text (needs tokenizer.json in the model dir)\n"
            "  -f, --file FILE        read the prompt from FILE\n"
            "  --ids LIST             prompt as comma-separated token ids\n"
            "  -n, --n-predict N      tokens to generate (-1: until EOS or the context ends)\n"
            "  --temp T               temperature (0 = greedy; default 1.0, Gemma's)\n"
            "  --top-k N              keep the N most likely tokens (default 64, 0 = off)\n"
            "  --top-p P              nucleus sampling (default 0.95, 1 = off)\n"
            "  --min-p P              drop tokens below P x the top probability (default 0 = off)\n"
            "  --repeat-penalty F     penalise repeated tokens (default 1.0 = off)\n"
            "  --repeat-last-n N      tokens the penalty looks back over (default 64)\n"
            "  --seed S               random seed (default: from the clock)\n"
            "  --print-ids            print the generated ids as the last line of stdout\n"
            "  --no-chat-template     (run) send raw text instead of chat turns\n"
            "  --tokenizer FILE       tokenizer.json to use instead of the model dir's\n"
            "\n"
            "bench options:\n"
            "  -p N  -n N  -r REPS    prompt tokens, generated tokens, repetitions\n"
            "  -d N                   prefill and decode after an N-token context (pp512 @ dN, tg128 @ dN)\n"
            "  --json                 machine-readable output on stdout\n"
            "  --parallel 1,8,32      aggregate decode tok/s of P sequences per batched step\n"
            "\n"
            "serve options (POST /v1/chat/completions, /v1/completions; GET /v1/models, /health):\n"
            "  --host H --port P      address to listen on (default 127.0.0.1:8080; port 0: any)\n"
            "  --parallel N           slots decoded together in one batched step (default 4)\n"
            "  --queue N              requests that may wait for a slot; more get 503 (default 64)\n"
            "  --api-key KEY          require Authorization: Bearer KEY on /v1/*\n"
            "  --alias NAME           model name in answers (default: the directory's name)\n"
            "  --max-body BYTES       larger request bodies get 413 (default 4 MiB)\n"
            "  --timeout S            idle connection timeout (default 30)\n"
            "  --max-conn N           concurrent connections (default 256)\n"
            "  -c N (per slot), -b N (prompt tokens per engine step), --tokenizer FILE\n"
            "  --step-delay MS        (tests) sleep MS after every engine step\n");
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 1;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help") || !strcmp(cmd, "help")) {
        usage(stdout);
        return 0;
    }
    for (int i = 2; i < argc; i++)
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            usage(stdout);
            return 0;
        }
    if (!strcmp(cmd, "logits")) return cmd_logits(argc, argv);
    if (!strcmp(cmd, "generate")) return cmd_generate(argc, argv);
    if (!strcmp(cmd, "run")) return cmd_run(argc, argv);
    if (!strcmp(cmd, "bench")) return cmd_bench(argc, argv);
    if (!strcmp(cmd, "serve")) return cmd_serve(argc, argv);
    if (!strcmp(cmd, "tokenize")) return cmd_tokenize(argc, argv);
    if (!strcmp(cmd, "quantize")) return cmd_quantize(argc, argv);
    die("unknown command \"%s\" (try g3n --help)", cmd);
    return 1;
}
