/* chat.c: the Gemma 3n chat template (g3n_chat_format), hand-translated from the
 * published Jinja template (quoted in tools/chat_template_ref.py) so that the
 * output is byte-identical to transformers' apply_chat_template for text-only
 * messages. It is not a Jinja interpreter and knows no other model's format. */
#include "g3n.h"
#include "common.h"
#include "tokenizer.h"

/* Python's str.isspace() set, which Jinja's `trim` filter (str.strip()) uses. */
static int py_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
           c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
           c == 0x202F || c == 0x205F || c == 0x3000;
}

/* Trim s[0..n) like Python's str.strip(): sets *start and returns the length. An
 * ill-formed byte at either end stops the trimming there. */
static size_t py_strip(const char *s, size_t n, size_t *start) {
    const unsigned char *u = (const unsigned char *)s;
    size_t lo = 0, hi = n;
    while (lo < hi) {
        uint32_t cp;
        int l = g3n_utf8_decode(u + lo, hi - lo, &cp);
        if (l <= 0 || !py_space(cp)) break;
        lo += (size_t)l;
    }
    while (hi > lo) {
        size_t j = hi - 1;
        while (j > lo && (u[j] & 0xC0) == 0x80 && hi - j < 4) j--;
        uint32_t cp;
        int l = g3n_utf8_decode(u + j, hi - j, &cp);
        if (l <= 0 || (size_t)l != hi - j || !py_space(cp)) break;
        hi = j;
    }
    *start = lo;
    return hi - lo;
}

/* Append s[0..n) to b, keeping it NUL-terminated (aborts when out of memory). */
static void put(bbuf *b, const char *s, size_t n) {
    bbuf_reserve(b, n + 1);
    bbuf_put(b, s, n);
    b->p[b->n] = 0;
}

/* Append the C string s to b. */
static void puts_(bbuf *b, const char *s) { put(b, s, strlen(s)); }

/* The template, for string contents:
 *   "<bos>"; if messages[0] is "system": prefix = its content (NOT trimmed) + "\n\n"
 *   and the loop starts at messages[1]. Loop message k must be "user" exactly when
 *   k is even (else: "Conversation roles must alternate..."). Each renders as
 *   "<start_of_turn>" + ("model" if role == "assistant" else role) + "\n"
 *   + (prefix if k == 0) + trim(content) + "<end_of_turn>\n"; then
 *   "<start_of_turn>model\n" when add_generation_prompt. A lone system message
 *   therefore renders as "<bos>" alone (the template drops it), and roles other
 *   than user/assistant at odd positions are written as given. */
char *g3n_chat_format(const g3n_chat_msg *msgs, int n, int add_generation_prompt, char *err,
                      size_t errlen) {
    if (n <= 0 || !msgs) {
        g3n_err(err, errlen, "chat: empty conversation (the template needs messages[0])");
        return NULL;
    }
    for (int i = 0; i < n; i++) {
        if (!msgs[i].role) {
            g3n_err(err, errlen, "chat: message %d has no role", i);
            return NULL;
        }
        if (!msgs[i].content) {
            g3n_err(err, errlen, "chat: message %d: Invalid content type (NULL)", i);
            return NULL;
        }
    }
    int first = 0;
    const char *prefix = NULL;
    if (!strcmp(msgs[0].role, "system")) {
        prefix = msgs[0].content;
        first = 1;
    }
    for (int i = first; i < n; i++) {
        int k = i - first;
        int is_user = !strcmp(msgs[i].role, "user");
        if (is_user != (k % 2 == 0)) {
            g3n_err(err, errlen,
                    "chat: message %d (%s): Conversation roles must alternate "
                    "user/assistant/user/assistant/...",
                    i, msgs[i].role);
            return NULL;
        }
    }
    bbuf b = {0};
    puts_(&b, "<bos>");
    for (int i = first; i < n; i++) {
        const char *role = msgs[i].role;
        puts_(&b, "<start_of_turn>");
        puts_(&b, !strcmp(role, "assistant") ? "model" : role);
        puts_(&b, "\n");
        if (i == first && prefix) {
            puts_(&b, prefix);
            puts_(&b, "\n\n");
        }
        size_t start, len = py_strip(msgs[i].content, strlen(msgs[i].content), &start);
        put(&b, msgs[i].content + start, len);
        puts_(&b, "<end_of_turn>\n");
    }
    if (add_generation_prompt) puts_(&b, "<start_of_turn>model\n");
    return b.p;
}
