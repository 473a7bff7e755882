/* test_chat.c: tests of g3n_chat_format (src/tokenizer/chat.c) against the
 * published Gemma 3n template as rendered by jinja2 (chat_expected_jinja.json,
 * committed) and by transformers' apply_chat_template (chat_expected_hf.json, when
 * tools/chat_template_ref.py has been run), plus a few direct checks. Needs no
 * tokenizer file; the fixtures are in tests/fixtures/tokenizer/. */
#define _POSIX_C_SOURCE 200809L
#include "g3n.h"
#include "common.h"
#include "test.h"

#include <cjson/cJSON.h>
#include <sys/stat.h>

#define FIX "tests/fixtures/tokenizer"

static cJSON *load_json(const char *path) {
    char err[256];
    size_t n;
    char *text = g3n_read_file(path, &n, (size_t)1 << 26, err, sizeof err);
    if (!text) {
        printf("  %s\n", err);
        return NULL;
    }
    cJSON *j = cJSON_ParseWithLength(text, n);
    free(text);
    if (!j) printf("  %s: JSON parse error\n", path);
    return j;
}

static const cJSON *find_case(const cJSON *cases, const char *name) {
    const cJSON *c;
    cJSON_ArrayForEach(c, cases) {
        const cJSON *n = cJSON_GetObjectItemCaseSensitive(c, "name");
        if (cJSON_IsString(n) && !strcmp(n->valuestring, name)) return c;
    }
    return NULL;
}

static void show(const char *what, const char *s) {
    printf("    %s: \"", what);
    for (const char *p = s; *p; p++) {
        if (*p == '\n') printf("\\n");
        else if (*p == '\t') printf("\\t");
        else putchar(*p);
    }
    printf("\"\n");
}

/* Every result in an expected-output file against g3n_chat_format. */
static void check_expected(const char *path) {
    cJSON *cases_doc = load_json(FIX "/chat_cases.json");
    cJSON *exp_doc = load_json(path);
    CHECK(cases_doc && exp_doc);
    if (!cases_doc || !exp_doc) {
        cJSON_Delete(cases_doc);
        cJSON_Delete(exp_doc);
        return;
    }
    const cJSON *cases = cJSON_GetObjectItemCaseSensitive(cases_doc, "cases");
    const cJSON *results = cJSON_GetObjectItemCaseSensitive(exp_doc, "results");
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(exp_doc, "format");
    CHECK_MSG(cJSON_IsString(fmt) && !strcmp(fmt->valuestring, "g3n-chat-expected 1"),
              "%s: \"format\" is not \"g3n-chat-expected 1\"", path);
    const cJSON *who = cJSON_GetObjectItemCaseSensitive(exp_doc, "rendered_by");
    printf("  %s: rendered by %s\n", path, cJSON_IsString(who) ? who->valuestring : "?");
    CHECK(cJSON_GetArraySize(results) >= 40);
    int bad = 0;
    const cJSON *r;
    cJSON_ArrayForEach(r, results) {
        const char *name = cJSON_GetObjectItemCaseSensitive(r, "name")->valuestring;
        int gen = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(r, "add_generation_prompt"));
        const cJSON *out = cJSON_GetObjectItemCaseSensitive(r, "output");
        const cJSON *c = find_case(cases, name);
        if (!c) {
            CHECK_MSG(0, "case %s not in chat_cases.json", name);
            continue;
        }
        const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(c, "messages");
        int n = cJSON_GetArraySize(msgs);
        g3n_chat_msg *m = g3n_calloc((size_t)(n ? n : 1), sizeof *m);
        int i = 0;
        const cJSON *x;
        cJSON_ArrayForEach(x, msgs) {
            m[i].role = cJSON_GetObjectItemCaseSensitive(x, "role")->valuestring;
            m[i].content = cJSON_GetObjectItemCaseSensitive(x, "content")->valuestring;
            i++;
        }
        char err[256] = "";
        char *got = g3n_chat_format(m, n, gen, err, sizeof err);
        if (cJSON_IsString(out)) {
            if (!got || strcmp(got, out->valuestring)) {
                bad++;
                printf("  %s gen=%d differs\n", name, gen);
                show("got ", got ? got : err);
                show("want", out->valuestring);
            }
        } else if (got) {
            bad++;
            printf("  %s gen=%d: the template refuses it, g3n rendered it\n", name, gen);
        } else if (!err[0]) {
            bad++;
            printf("  %s gen=%d: refused without a message\n", name, gen);
        }
        free(got);
        free(m);
    }
    CHECK_MSG(bad == 0, "%d renders differ from %s", bad, path);
    cJSON_Delete(cases_doc);
    cJSON_Delete(exp_doc);
}

TEST(jinja_expected) { check_expected(FIX "/chat_expected_jinja.json"); }

TEST(hf_expected) {
    struct stat st;
    if (stat(FIX "/chat_expected_hf.json", &st) != 0) {
        printf("  (no " FIX "/chat_expected_hf.json yet: transformers comparison skipped)\n");
        return;
    }
    check_expected(FIX "/chat_expected_hf.json");
}

TEST(direct) {
    char err[256];
    g3n_chat_msg one[] = {{"user", " Hi there \n"}};
    char *s = g3n_chat_format(one, 1, 1, err, sizeof err);
    CHECK(s && !strcmp(s, "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"));
    free(s);
    g3n_chat_msg sys[] = {{"system", "Sys"}, {"user", "U"}, {"assistant", " A "}};
    s = g3n_chat_format(sys, 3, 0, err, sizeof err);
    CHECK(s && !strcmp(s, "<bos><start_of_turn>user\nSys\n\nU<end_of_turn>\n"
                          "<start_of_turn>model\nA<end_of_turn>\n"));
    free(s);
    g3n_chat_msg bad[] = {{"user", "a"}, {"user", "b"}};
    err[0] = 0;
    CHECK(g3n_chat_format(bad, 2, 1, err, sizeof err) == NULL && strstr(err, "alternate"));
    g3n_chat_msg nul[] = {{"user", NULL}};
    CHECK(g3n_chat_format(nul, 1, 1, err, sizeof err) == NULL && strstr(err, "content"));
    g3n_chat_msg norole[] = {{NULL, "x"}};
    CHECK(g3n_chat_format(norole, 1, 1, err, sizeof err) == NULL && strstr(err, "role"));
    CHECK(g3n_chat_format(NULL, 0, 1, err, sizeof err) == NULL && strstr(err, "empty"));
    /* invalid UTF-8 at the edges is not whitespace and stays */
    g3n_chat_msg inv[] = {{"user", "\xff x \xe3\x80"}};
    s = g3n_chat_format(inv, 1, 0, err, sizeof err);
    CHECK(s && !strcmp(s, "<bos><start_of_turn>user\n\xff x \xe3\x80<end_of_turn>\n"));
    free(s);
    /* U+3000 trimmed, U+200B kept */
    g3n_chat_msg ws[] = {{"user", "\xe3\x80\x80\xe2\x80\x8bq\xe3\x80\x80"}};
    s = g3n_chat_format(ws, 1, 0, err, sizeof err);
    CHECK(s && !strcmp(s, "<bos><start_of_turn>user\n\xe2\x80\x8bq<end_of_turn>\n"));
    free(s);
}

int main(int argc, char **argv) {
    test_init(argc, argv);
    RUN(jinja_expected);
    RUN(hf_expected);
    RUN(direct);
    return test_summary();
}
