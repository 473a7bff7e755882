/* cli_text.c: the commands a person uses with text: `generate` (continue a
 * prompt, streaming), `run` (chat with the template, interactive or one-shot) and
 * `tokenize`. Generated text goes to stdout as it is produced; load progress and
 * speed go to stderr. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cli/cli.h"

typedef struct {
    model_opts mo;
    const char *prompt;     /* -p */
    const char *file;       /* -f */
    const char *ids;        /* --ids */
    const char *tokenizer;  /* --tokenizer */
    int n_predict;
    int print_ids;
    int chat_template;
    g3n_sampler_params sp;
    int seed_set;
} gen_opts;

static void gen_opts_parse(gen_opts *o, int argc, char **argv, const char *cmd) {
    memset(o, 0, sizeof(*o));
    o->n_predict = -1;
    o->chat_template = 1;
    o->sp = g3n_sampler_default_params();
    for (int i = 2; i < argc; i++) {
        if (opt_model(&o->mo, argc, argv, &i)) continue;
        const char *a = argv[i];
        int has = i + 1 < argc;
        if ((!strcmp(a, "-p") || !strcmp(a, "--prompt")) && has) o->prompt = argv[++i];
        else if ((!strcmp(a, "-f") || !strcmp(a, "--file")) && has) o->file = argv[++i];
        else if (!strcmp(a, "--ids") && has) o->ids = argv[++i];
        else if (!strcmp(a, "--tokenizer") && has) o->tokenizer = argv[++i];
        else if ((!strcmp(a, "-n") || !strcmp(a, "--n-predict")) && has)
            o->n_predict = (int)parse_long(a, argv[++i], -1, 1 << 24);
        else if (!strcmp(a, "--temp") && has) o->sp.temperature = (float)parse_double(a, argv[++i], 0, 100);
        else if (!strcmp(a, "--top-k") && has) o->sp.top_k = (int)parse_long(a, argv[++i], 0, 1 << 24);
        else if (!strcmp(a, "--top-p") && has) o->sp.top_p = (float)parse_double(a, argv[++i], 1e-6, 1);
        else if (!strcmp(a, "--min-p") && has) o->sp.min_p = (float)parse_double(a, argv[++i], 0, 1);
        else if (!strcmp(a, "--repeat-penalty") && has)
            o->sp.repeat_penalty = (float)parse_double(a, argv[++i], 1e-3, 100);
        else if (!strcmp(a, "--repeat-last-n") && has)
            o->sp.repeat_last_n = (int)parse_long(a, argv[++i], -1, 1 << 24);
        else if (!strcmp(a, "--seed") && has) {
            char *end;
            errno = 0;
            unsigned long long v = strtoull(argv[++i], &end, 10);
            if (errno || *end || end == argv[i]) die("--seed: \"%s\" is not a non-negative integer", argv[i]);
            o->sp.seed = v;
            o->seed_set = 1;
        } else if (!strcmp(a, "--print-ids")) o->print_ids = 1;
        else if (!strcmp(a, "--no-chat-template")) o->chat_template = 0;
        else die("%s: unknown or incomplete option \"%s\" (see g3n --help)", cmd, a);
    }
    if (!o->seed_set) o->sp.seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
}

/* tokenizer.json from --tokenizer or the model directory; NULL if neither exists
 * and !required. */
g3n_tokenizer *open_tokenizer(const char *file, const char *dir, int required) {
    char path[4096];
    struct stat sd;
    if (!file && dir && (stat(dir, &sd) != 0 || !S_ISDIR(sd.st_mode))) die("%s: no such model directory", dir);
    if (file) snprintf(path, sizeof path, "%s", file);
    else if (dir) snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    else die("no tokenizer: give -m DIR or --tokenizer FILE");
    struct stat sb;
    if (!file && stat(path, &sb) != 0) {
        if (required) die("%s: no tokenizer.json in the model directory (or give --tokenizer FILE)", path);
        return NULL;
    }
    char err[1024];
    double t0 = now_s();
    g3n_tokenizer *tk = g3n_tokenizer_load(path, err, sizeof err);
    if (!tk) die("%s", err);
    if (!g3n_quiet) fprintf(stderr, "g3n: tokenizer %s loaded in %.3f s\n", path, now_s() - t0);
    return tk;
}

static char *read_text_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) die("%s: %s", path, strerror(errno));
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    size_t k;
    while (buf && (k = fread(buf + n, 1, cap - n - 1, f)) > 0) {
        n += k;
        if (cap - n - 1 == 0) buf = realloc(buf, cap *= 2);
    }
    if (!buf) die("out of memory");
    if (ferror(f)) die("%s: read failed", path);
    fclose(f);
    buf[n] = 0;
    return buf;
}

/* The ids a generation stops at: config eos, <eos>, <end_of_turn>. */
typedef struct {
    int32_t id[4];
    int n;
} stop_set;

static void stops_init(stop_set *st, g3n_model *m, g3n_tokenizer *tk) {
    st->n = 0;
    int32_t c[3] = {g3n_model_get_info(m).eos_id, tk ? g3n_tokenizer_find(tk, "<eos>") : -1,
                    tk ? g3n_tokenizer_find(tk, "<end_of_turn>") : -1};
    for (int i = 0; i < 3; i++)
        if (c[i] >= 0) st->id[st->n++] = c[i];
}

static int is_stop(const stop_set *st, int32_t id) {
    for (int i = 0; i < st->n; i++)
        if (st->id[i] == id) return 1;
    return 0;
}

typedef struct {
    g3n_model *m;
    g3n_session *s;
    g3n_tokenizer *tk; /* may be NULL: then only ids are printed */
    g3n_sampler *smp;
    stop_set stops;
    int32_t *out;      /* generated ids */
    int n_out, cap_out;
    double t_prompt, t_gen;
    int n_prompt_tok;
} gen_state;

typedef struct {
    gen_state *g;
    g3n_detok dt;
} gen_token;

/* Each picked token: kept, then a stop token ends it; else it enters the
 * sampler's history and its text is printed */
static int gen_on_token(void *ud, int32_t tok) {
    gen_token *gt = (gen_token *)ud;
    gen_state *g = gt->g;
    if (g->n_out == g->cap_out) {
        g->cap_out = g->cap_out ? 2 * g->cap_out : 256;
        g->out = realloc(g->out, sizeof(int32_t) * (size_t)g->cap_out);
        if (!g->out) die("out of memory");
    }
    g->out[g->n_out++] = tok;
    if (is_stop(&g->stops, tok)) return 1;
    g3n_sampler_accept(g->smp, tok);
    if (g->tk) {
        char buf[256];
        size_t k = g3n_detok_push(g->tk, &gt->dt, tok, 1, buf, sizeof buf);
        fwrite(buf, 1, k, stdout);
        fflush(stdout);
    }
    return 0;
}

/* Evaluate `ids` (appended to the session), then sample up to n_predict tokens
 * (-1: until a stop token or the context ends), streaming text to stdout.
 * Generated ids are appended to g->out; returns the number generated. The
 * stop token, if sampled, is not evaluated and not printed. */
static int generate(gen_state *g, const int32_t *ids, int n, int n_predict) {
    char err[1024];
    if (n > g3n_session_n_ctx(g->s) - g3n_session_pos(g->s))
        die("the prompt (%d tokens) is longer than the context left (%d of %d); use -c to enlarge it",
            n, g3n_session_n_ctx(g->s) - g3n_session_pos(g->s), g3n_session_n_ctx(g->s));
    double t0 = now_s();
    if (g3n_session_eval(g->s, ids, n, NULL, err, sizeof err)) die("%s", err);
    g->t_prompt += now_s() - t0;
    g->n_prompt_tok += n;
    for (int i = 0; i < n; i++) g3n_sampler_accept(g->smp, ids[i]);
    gen_token gt;
    memset(&gt, 0, sizeof gt);
    gt.g = g;
    t0 = now_s();
    const int made = g3n_session_generate(g->s, g->smp, n_predict < 0 ? INT_MAX : n_predict, gen_on_token, &gt, err,
                                          sizeof err);
    if (made < 0) die("%s", err);
    if (g->tk) {
        char buf[256];
        size_t k = g3n_detok_flush(g->tk, &gt.dt, buf, sizeof buf);
        fwrite(buf, 1, k, stdout);
        fflush(stdout);
    }
    g->t_gen += now_s() - t0;
    return made;
}

static void gen_state_init(gen_state *g, const gen_opts *o, int need_tokenizer) {
    memset(g, 0, sizeof(*g));
    g->tk = open_tokenizer(o->tokenizer, o->mo.dir, need_tokenizer);
    g->m = open_model(&o->mo);
    g->s = open_session(g->m, &o->mo);
    char err[1024];
    /* over the text vocabulary only: the vision/audio ids after it cannot be fed back */
    g->smp = g3n_sampler_create(&o->sp, g3n_model_get_info(g->m).n_vocab_text, err, sizeof err);
    if (!g->smp) die("%s", err);
    stops_init(&g->stops, g->m, g->tk);
}

static void gen_state_free(gen_state *g) {
    g3n_sampler_free(g->smp);
    g3n_session_free(g->s);
    g3n_model_close(g->m);
    g3n_tokenizer_free(g->tk);
    free(g->out);
}

static void print_speed(const gen_state *g) {
    if (g3n_quiet) return;
    int n_gen = g->n_out;
    fprintf(stderr, "\ng3n: prompt %d tokens in %.2f s (%.2f tok/s); generated %d tokens in %.2f s (%.2f tok/s)\n",
            g->n_prompt_tok, g->t_prompt, g->t_prompt > 0 ? g->n_prompt_tok / g->t_prompt : 0, n_gen,
            g->t_gen, g->t_gen > 0 ? n_gen / g->t_gen : 0);
}

static void print_ids_line(const int32_t *ids, int n) {
    for (int i = 0; i < n; i++) printf("%s%d", i ? "," : "", ids[i]);
    printf("\n");
}

int cmd_generate(int argc, char **argv) {
    gen_opts o;
    gen_opts_parse(&o, argc, argv, "generate");
    int n_src = !!o.prompt + !!o.file + !!o.ids;
    if (n_src != 1) die("generate: give exactly one of -p TEXT, -f FILE or --ids LIST");
    gen_state g;
    gen_state_init(&g, &o, !o.ids);
    int32_t *ids = NULL;
    int n = 0;
    if (o.ids) {
        ids = parse_ids(o.ids, &n);
    } else {
        char *text = o.file ? read_text_file(o.file) : strdup(o.prompt);
        char err[1024];
        n = g3n_tokenizer_encode(g.tk, text, strlen(text), 1, &ids, err, sizeof err);
        if (n < 0) die("%s", err);
        free(text);
    }
    generate(&g, ids, n, o.n_predict);
    if (g.tk && !o.print_ids) printf("\n");
    if (o.print_ids || !g.tk) {
        if (g.tk) printf("\n");
        print_ids_line(g.out, g.n_out);
    }
    print_speed(&g);
    free(ids);
    gen_state_free(&g);
    return 0;
}

/* Read one user message from stdin: a line; a line ending in '\' continues on
 * the next; a line that is exactly """ opens a block closed by another """.
 * Returns a heap string, or NULL at end of input. */
static char *read_message(void) {
    char *line = NULL, *msg = NULL;
    size_t cap = 0, len = 0;
    ssize_t k;
    int block = 0;
    while ((k = getline(&line, &cap, stdin)) >= 0) {
        while (k > 0 && (line[k - 1] == '\n' || line[k - 1] == '\r')) line[--k] = 0;
        int cont = 0;
        if (!block && strcmp(line, "\"\"\"") == 0 && len == 0) {
            block = 1;
            continue;
        }
        if (block && strcmp(line, "\"\"\"") == 0) break;
        if (!block && k > 0 && line[k - 1] == '\\') {
            line[--k] = 0;
            cont = 1;
        }
        msg = realloc(msg, len + (size_t)k + 2);
        if (!msg) die("out of memory");
        if (len) msg[len++] = '\n';
        memcpy(msg + len, line, (size_t)k);
        len += (size_t)k;
        msg[len] = 0;
        if (!block && !cont) break;
    }
    free(line);
    if (k < 0 && !msg) return NULL;
    if (!msg) msg = strdup("");
    return msg;
}

/* Encode `text` and append to *ids. */
static void encode_append(g3n_tokenizer *tk, const char *text, int32_t **ids, int *n) {
    int32_t *t = NULL;
    char err[1024];
    int k = g3n_tokenizer_encode(tk, text, strlen(text), 0, &t, err, sizeof err);
    if (k < 0) die("%s", err);
    *ids = realloc(*ids, sizeof(int32_t) * (size_t)(*n + k + 1));
    if (!*ids) die("out of memory");
    memcpy(*ids + *n, t, sizeof(int32_t) * (size_t)k);
    *n += k;
    free(t);
}

/* The tokens of one user turn. First turn: the whole template (with <bos> and a
 * system prompt folded in). Later turns: close the model's turn, then the user
 * turn and the model prefix, as the template renders them. */
static void user_turn_ids(g3n_tokenizer *tk, const char *system, const char *msg, int first,
                          int chat, int32_t **ids, int *n) {
    *n = 0;
    if (!chat) {
        if (first) {
            *ids = malloc(sizeof(int32_t));
            (*ids)[(*n)++] = g3n_tokenizer_find(tk, "<bos>");
        }
        encode_append(tk, msg, ids, n);
        return;
    }
    g3n_chat_msg conv[2];
    int k = 0;
    if (first && system) conv[k++] = (g3n_chat_msg){"system", system};
    conv[k++] = (g3n_chat_msg){"user", msg};
    char err[1024];
    char *text = g3n_chat_format(conv, k, 1, err, sizeof err);
    if (!text) die("%s", err);
    const char *body = text;
    if (!first) {
        if (strncmp(body, "<bos>", 5) == 0) body += 5;
        encode_append(tk, "<end_of_turn>\n", ids, n);
    }
    encode_append(tk, body, ids, n);
    free(text);
}

int cmd_run(int argc, char **argv) {
    gen_opts o;
    gen_opts_parse(&o, argc, argv, "run");
    if (o.ids) die("run: --ids is not supported; use generate");
    gen_state g;
    gen_state_init(&g, &o, 1);
    const char *system = NULL; /* reserved for a --system option */
    int interactive = !o.prompt && !o.file;
    int first = 1;
    int tty = isatty(0);
    for (;;) {
        char *msg;
        if (!interactive) {
            msg = o.file ? read_text_file(o.file) : strdup(o.prompt);
        } else {
            if (!g3n_quiet || tty) fprintf(stderr, "> ");
            fflush(stderr);
            msg = read_message();
            if (!msg) break;
            if (strcmp(msg, "/bye") == 0) {
                free(msg);
                break;
            }
            if (strcmp(msg, "/clear") == 0) {
                g3n_session_reset(g.s);
                g3n_sampler_reset(g.smp);
                first = 1;
                if (!g3n_quiet) fprintf(stderr, "(conversation cleared)\n");
                free(msg);
                continue;
            }
        }
        int32_t *ids = NULL;
        int n = 0;
        user_turn_ids(g.tk, system, msg, first, o.chat_template, &ids, &n);
        free(msg);
        int left = g3n_session_n_ctx(g.s) - g3n_session_pos(g.s);
        if (n >= left) {
            if (!interactive) die("the prompt (%d tokens) is longer than the context (%d); use -c to enlarge it", n, left);
            fprintf(stderr, "g3n: that message (%d tokens) does not fit in the %d tokens of context left; /clear to start over\n", n, left);
            free(ids);
            continue;
        }
        int before = g.n_out;
        generate(&g, ids, n, o.n_predict);
        printf("\n");
        fflush(stdout);
        /* the model's turn ends in the session without its stop token; the next
         * turn's ids begin by closing it */
        if (g.n_out > before && is_stop(&g.stops, g.out[g.n_out - 1])) {
            /* nothing: <end_of_turn> is re-added by user_turn_ids */
        }
        first = 0;
        free(ids);
        if (!interactive) break;
    }
    if (o.print_ids) print_ids_line(g.out, g.n_out);
    print_speed(&g);
    gen_state_free(&g);
    return 0;
}

int cmd_tokenize(int argc, char **argv) {
    const char *dir = NULL, *file = NULL, *tokfile = NULL, *text = NULL;
    int bos = 1;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        int has = i + 1 < argc;
        if ((!strcmp(a, "-m") || !strcmp(a, "--model")) && has) dir = argv[++i];
        else if (!strcmp(a, "--tokenizer") && has) tokfile = argv[++i];
        else if ((!strcmp(a, "-f") || !strcmp(a, "--file")) && has) file = argv[++i];
        else if ((!strcmp(a, "-p") || !strcmp(a, "--prompt")) && has) text = argv[++i];
        else if (!strcmp(a, "--no-bos")) bos = 0;
        else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) g3n_quiet = 1;
        else if (a[0] != '-' && !text) text = a;
        else die("tokenize: unknown or incomplete option \"%s\" (see g3n --help)", a);
    }
    if (!!text + !!file != 1) die("tokenize: give the text as an argument, with -p TEXT, or --file FILE");
    g3n_tokenizer *tk = open_tokenizer(tokfile, dir, 1);
    char *owned = file ? read_text_file(file) : NULL;
    const char *t = owned ? owned : text;
    int32_t *ids = NULL;
    char err[1024];
    int n = g3n_tokenizer_encode(tk, t, strlen(t), bos, &ids, err, sizeof err);
    if (n < 0) die("%s", err);
    print_ids_line(ids, n);
    free(ids);
    free(owned);
    g3n_tokenizer_free(tk);
    return 0;
}
