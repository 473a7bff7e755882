/* tokenizer.c: the Gemma 3 / 3n tokenizer, read from tokenizer.json and run the
 * way the Hugging Face `tokenizers` library runs it: added/special tokens matched
 * in the raw text (leftmost-longest), the normalizer, the pre-tokenizer, BPE with
 * byte fallback (heap-ordered merges per word), the decoder, and a streaming
 * detokenizer. It implements the components Gemma's files use plus close
 * neighbours (see load_* below) and refuses anything else with an error naming
 * it: it is not a general port of `tokenizers` (no Unigram/WordPiece, no regex). */
#include "g3n.h"
#include "common.h"
#include "tokenizer.h"

#include <cjson/cJSON.h>
#include <limits.h>
#include <pthread.h>

/* Invalid UTF-8 in the text given to g3n_tokenizer_encode: every ill-formed
 * sequence is replaced by U+FFFD first, one U+FFFD per maximal subpart (the Unicode
 * recommendation, also what Python's bytes.decode('utf-8', 'replace') and JS
 * TextDecoder do). So encode(bytes) == HF encode(bytes.decode('utf-8','replace')),
 * and decode(encode(s)) == s for every valid s, except that the decoder turns a
 * literal U+2581 into a space. */

enum {
    F_PRESENT = 1, /* the id has a piece */
    F_MODEL = 2,   /* the piece is in model.vocab (BPE may produce it) */
    F_ADDED = 4,   /* listed in added_tokens */
    F_SPECIAL = 8, /* added token with "special": true (decode may skip it) */
    F_BYTE = 16,   /* the decoder sees it as a byte token <0xNN> */
};

#define ID_BITS 20                          /* ids < 2^20 - 1 in the merge table */
#define MAX_ID ((1 << ID_BITS) - 2)
#define RANK_BITS 24                        /* at most 2^24 merges */
#define MERGE_EMPTY UINT64_MAX
#define MAX_DECODED_PIECE 64                /* g3n.h promises pieces of <= 64 bytes */
#define HASH_MUL 0x9E3779B97F4A7C15ull

typedef struct {
    uint32_t tag;
    int32_t id; /* -1: empty */
    uint32_t off, len; /* copies of off[id], len[id]: one cache line per probe */
} vslot;

/* A byte trie of added-token contents, for leftmost-longest matching. */
typedef struct {
    int32_t root[256]; /* node of each first byte, -1 if none */
    int32_t *child, *sibling, *token;
    uint8_t *byte;
    int n, cap;
} trie;

typedef struct {
    int prepend;            /* 0: Replace(pat -> content); 1: Prepend(content) */
    char *pat, *content;
    size_t npat, ncontent;
} norm_step;

enum { SPLIT_REMOVED, SPLIT_ISOLATED, SPLIT_MERGED_PREV, SPLIT_MERGED_NEXT, SPLIT_CONTIGUOUS };

typedef struct {
    char *pat;
    size_t npat;
    int behavior, invert;
} split_step;

typedef struct {
    int strip;              /* 0: Replace(pat -> content); 1: Strip(content, start, stop) */
    char *pat, *content;
    size_t npat, ncontent;
    uint32_t strip_cp;
    int start, stop;
} dec_step;

struct g3n_tokenizer {
    int n_vocab;
    uint8_t *flags;
    char *arena;            /* raw pieces */
    uint32_t *off, *len;
    char *darena;           /* pieces after the decoder's per-token steps */
    uint32_t *doff;
    uint16_t *dlen;
    uint8_t *byte_val;      /* for F_BYTE ids */

    vslot *vslots;          /* piece -> id (model vocab, then added tokens) */
    uint32_t vbits;
    int32_t *bmp_id;        /* model id of each single-code-point piece below U+10000 */
    int32_t byte_id[256];   /* model id of <0xNN>, -1 if absent */
    int all_bytes;          /* every <0xNN> exists */

    uint64_t *mslots;       /* (left << 20 | right) << 24 | rank */
    uint32_t mbits;
    int32_t *merge_new;     /* rank -> id of the merged piece */
    uint64_t *can_left, *can_right; /* bitsets: id is the left/right of some merge */
    int n_merges;

    int unk_id, byte_fallback, fuse_unk, ignore_merges;
    int bos_id;

    trie raw_trie, norm_trie; /* added tokens with normalized false / true */

    norm_step *norm;
    int n_norm;
    split_step *split;
    int n_split;
    dec_step *dec;
    int n_dec;
    int dec_byte_fallback;
};

/* ---- small helpers ------------------------------------------------------------- */

/* FNV-1a over p[0..n) continuing from h (FNV_INIT to start): hash(a + b) is
 * fnv(fnv(FNV_INIT, a), b), which merges use to look up a + b without copying. */
static uint64_t fnv(uint64_t h, const void *p, size_t n) {
    const unsigned char *s = p;
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 0x100000001b3ull;
    }
    return h;
}
#define FNV_INIT 0xcbf29ce484222325ull

/* First occurrence of pat (np > 0 bytes) in s[0..n), or NULL. */
static const char *find_bytes(const char *s, size_t n, const char *pat, size_t np) {
    if (np > n) return NULL;
    const char *end = s + (n - np) + 1;
    const char *p = s;
    while (p < end) {
        p = memchr(p, (unsigned char)pat[0], (size_t)(end - p));
        if (!p) return NULL;
        if (memcmp(p, pat, np) == 0) return p;
        p++;
    }
    return NULL;
}

/* Growable buffers (bbuf is declared in tokenizer.h; chat.c uses it too). */

/* Room for `extra` more bytes in b (doubling; aborts when the heap is exhausted). */
void bbuf_reserve(bbuf *b, size_t extra) {
    if (b->n + extra <= b->cap) return;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->n + extra) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
        fprintf(stderr, "g3n: out of memory (%zu bytes)\n", cap);
        abort();
    }
    b->p = p;
    b->cap = cap;
}

/* Append s[0..n) to b. */
void bbuf_put(bbuf *b, const void *s, size_t n) {
    bbuf_reserve(b, n);
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
}

typedef struct {
    int32_t *v;
    size_t n, cap;
} ivec;

/* Append x to a (doubling; aborts when the heap is exhausted). */
static void ivec_push(ivec *a, int32_t x) {
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 64;
        int32_t *v = realloc(a->v, cap * sizeof *v);
        if (!v) {
            fprintf(stderr, "g3n: out of memory (%zu ids)\n", cap);
            abort();
        }
        a->v = v;
        a->cap = cap;
    }
    a->v[a->n++] = x;
}

/* Make sure *p (elements of size sz) holds at least n elements. */
static void ensure(void **p, size_t *cap, size_t n, size_t sz) {
    if (n <= *cap) return;
    size_t c = *cap ? *cap : 256;
    while (c < n) c *= 2;
    void *q = realloc(*p, c * sz);
    if (!q) {
        fprintf(stderr, "g3n: out of memory (%zu bytes)\n", c * sz);
        abort();
    }
    *p = q;
    *cap = c;
}

/* ---- vocabulary hash (open addressing, no per-entry allocation) ---------------- */

static inline uint32_t vtag(uint64_t h) { return (uint32_t)(h >> 32); }

/* The first slot probed for hash h (for prefetching). */
static inline const vslot *vslot_of(const g3n_tokenizer *tk, uint64_t h) {
    return &tk->vslots[(uint32_t)((h * HASH_MUL) >> (64 - tk->vbits))];
}

/* Id of the piece a[0..na) + b[0..nb) (nb may be 0) whose FNV hash is h, or -1. */
static int32_t vocab_lookup_h(const g3n_tokenizer *tk, uint64_t h, const char *a, size_t na,
                              const char *b, size_t nb) {
    uint64_t m = h * HASH_MUL;
    uint32_t mask = (1u << tk->vbits) - 1;
    uint32_t i = (uint32_t)(m >> (64 - tk->vbits));
    uint32_t tag = vtag(m);
    for (;;) {
        const vslot *s = &tk->vslots[i];
        if (s->id < 0) return -1;
        if (s->tag == tag && s->len == na + nb) {
            const char *p = tk->arena + s->off;
            if (memcmp(p, a, na) == 0 && (nb == 0 || memcmp(p + na, b, nb) == 0)) return s->id;
        }
        i = (i + 1) & mask;
    }
}

/* Id of the piece s[0..n) (model vocab or added token), or -1. */
static int32_t vocab_lookup(const g3n_tokenizer *tk, const char *s, size_t n) {
    return vocab_lookup_h(tk, fnv(FNV_INIT, s, n), s, n, NULL, 0);
}

/* Insert id (whose piece is already in the arena) unless the piece is present. */
static void vocab_insert(g3n_tokenizer *tk, int32_t id) {
    const char *p = tk->arena + tk->off[id];
    uint64_t m = fnv(FNV_INIT, p, tk->len[id]) * HASH_MUL;
    uint32_t mask = (1u << tk->vbits) - 1;
    uint32_t i = (uint32_t)(m >> (64 - tk->vbits));
    uint32_t tag = vtag(m);
    for (;;) {
        vslot *s = &tk->vslots[i];
        if (s->id < 0) {
            s->id = id;
            s->tag = tag;
            s->off = tk->off[id];
            s->len = tk->len[id];
            return;
        }
        if (s->tag == tag && s->len == tk->len[id] && memcmp(tk->arena + s->off, p, s->len) == 0)
            return;
        i = (i + 1) & mask;
    }
}

/* ---- merge table: pair of ids -> rank ------------------------------------------ */

static inline uint32_t merge_slot(uint64_t key, uint32_t bits) {
    return (uint32_t)((key * HASH_MUL) >> (64 - bits));
}

/* Rank of the merge (a, b), or -1. */
static inline int merge_rank(const g3n_tokenizer *tk, int32_t a, int32_t b) {
    /* most ids never start or end a merge: two small bitsets answer those */
    if (!((tk->can_left[a >> 6] >> (a & 63)) & 1) || !((tk->can_right[b >> 6] >> (b & 63)) & 1))
        return -1;
    uint64_t key = ((uint64_t)(uint32_t)a << ID_BITS) | (uint32_t)b;
    uint32_t mask = (1u << tk->mbits) - 1;
    uint32_t i = merge_slot(key, tk->mbits);
    for (;;) {
        uint64_t s = tk->mslots[i];
        if (s == MERGE_EMPTY) return -1;
        if ((s >> RANK_BITS) == key) return (int)(s & ((1u << RANK_BITS) - 1));
        i = (i + 1) & mask;
    }
}

/* Prefetch the first slot merge_rank(a, b) will probe. */
static inline void merge_prefetch(const g3n_tokenizer *tk, int32_t a, int32_t b) {
    uint64_t key = ((uint64_t)(uint32_t)a << ID_BITS) | (uint32_t)b;
    __builtin_prefetch(&tk->mslots[merge_slot(key, tk->mbits)]);
}

/* Insert or overwrite (a later duplicate wins, as in `tokenizers`). */
static void merge_insert(g3n_tokenizer *tk, int32_t a, int32_t b, int rank) {
    uint64_t key = ((uint64_t)(uint32_t)a << ID_BITS) | (uint32_t)b;
    uint32_t mask = (1u << tk->mbits) - 1;
    uint32_t i = merge_slot(key, tk->mbits);
    for (;;) {
        uint64_t s = tk->mslots[i];
        if (s == MERGE_EMPTY || (s >> RANK_BITS) == key) {
            tk->mslots[i] = (key << RANK_BITS) | (uint64_t)rank;
            return;
        }
        i = (i + 1) & mask;
    }
}

/* ---- added-token trie ------------------------------------------------------------- */

/* An empty trie (no allocation yet). */
static void trie_init(trie *t) {
    for (int i = 0; i < 256; i++) t->root[i] = -1;
}

/* A new childless node for `byte`; returns its index. */
static int32_t trie_node(trie *t, uint8_t byte) {
    if (t->n == t->cap) {
        int cap = t->cap ? t->cap * 2 : 1024;
        t->child = realloc(t->child, (size_t)cap * sizeof *t->child);
        t->sibling = realloc(t->sibling, (size_t)cap * sizeof *t->sibling);
        t->token = realloc(t->token, (size_t)cap * sizeof *t->token);
        t->byte = realloc(t->byte, (size_t)cap);
        if (!t->child || !t->sibling || !t->token || !t->byte) {
            fprintf(stderr, "g3n: out of memory (trie)\n");
            abort();
        }
        t->cap = cap;
    }
    int32_t k = t->n++;
    t->child[k] = t->sibling[k] = t->token[k] = -1;
    t->byte[k] = byte;
    return k;
}

/* Add the token s[0..n) (n > 0) with id. */
static void trie_add(trie *t, const char *s, size_t n, int32_t id) {
    const uint8_t *u = (const uint8_t *)s;
    int32_t *slot = &t->root[u[0]];
    if (*slot < 0) *slot = trie_node(t, u[0]);
    int32_t node = *slot;
    for (size_t i = 1; i < n; i++) {
        int32_t c = t->child[node];
        while (c >= 0 && t->byte[c] != u[i]) c = t->sibling[c];
        if (c < 0) {
            c = trie_node(t, u[i]);
            t->sibling[c] = t->child[node];
            t->child[node] = c;
        }
        node = c;
    }
    t->token[node] = id; /* a later duplicate wins */
}

/* Longest added token starting at s[0] (n > 0 bytes): returns its length and sets
 * *id, or 0. */
static size_t trie_match(const trie *t, const char *s, size_t n, int32_t *id) {
    const uint8_t *u = (const uint8_t *)s;
    int32_t node = t->root[u[0]];
    size_t best = 0;
    size_t i = 1;
    while (node >= 0) {
        if (t->token[node] >= 0) {
            best = i;
            *id = t->token[node];
        }
        if (i >= n) break;
        int32_t c = t->child[node];
        while (c >= 0 && t->byte[c] != u[i]) c = t->sibling[c];
        node = c;
        i++;
    }
    return best;
}

/* Free what trie_node allocated. */
static void trie_free(trie *t) {
    free(t->child);
    free(t->sibling);
    free(t->token);
    free(t->byte);
}

/* ---- loading ---------------------------------------------------------------------- */

void g3n_tokenizer_free(g3n_tokenizer *tk) {
    if (!tk) return;
    free(tk->flags);
    free(tk->arena);
    free(tk->off);
    free(tk->len);
    free(tk->darena);
    free(tk->doff);
    free(tk->dlen);
    free(tk->byte_val);
    free(tk->vslots);
    free(tk->bmp_id);
    free(tk->mslots);
    free(tk->merge_new);
    free(tk->can_left);
    free(tk->can_right);
    trie_free(&tk->raw_trie);
    trie_free(&tk->norm_trie);
    for (int i = 0; i < tk->n_norm; i++) {
        free(tk->norm[i].pat);
        free(tk->norm[i].content);
    }
    free(tk->norm);
    for (int i = 0; i < tk->n_split; i++) free(tk->split[i].pat);
    free(tk->split);
    for (int i = 0; i < tk->n_dec; i++) {
        free(tk->dec[i].pat);
        free(tk->dec[i].content);
    }
    free(tk->dec);
    free(tk);
}

/* o[key] when it is a string, else NULL. */
static const char *jstr(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* o[key] when it is a boolean, else dflt. */
static int jbool(const cJSON *o, const char *key, int dflt) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (cJSON_IsBool(v)) return cJSON_IsTrue(v);
    return dflt;
}

/* The String of a {"String": "..."} pattern; NULL (and err) for a Regex or junk. */
static const char *string_pattern(const cJSON *o, const char *path, const char *what, char *err,
                                  size_t errlen) {
    const cJSON *pat = cJSON_GetObjectItemCaseSensitive(o, "pattern");
    const char *s = jstr(pat, "String");
    if (!s) {
        if (cJSON_GetObjectItemCaseSensitive(pat, "Regex"))
            g3n_err(err, errlen, "%s: %s uses a Regex pattern, which g3n does not implement",
                    path, what);
        else
            g3n_err(err, errlen, "%s: %s has no pattern.String", path, what);
        return NULL;
    }
    if (!*s) {
        g3n_err(err, errlen, "%s: %s has an empty pattern", path, what);
        return NULL;
    }
    return s;
}

/* normalizer: null, Replace(String), Prepend, or a Sequence of those. */
static int load_normalizer(g3n_tokenizer *tk, const cJSON *n, const char *path, char *err,
                           size_t errlen) {
    if (!n || cJSON_IsNull(n)) return 0;
    const char *type = jstr(n, "type");
    if (!type) return g3n_err(err, errlen, "%s: normalizer has no type", path);
    if (!strcmp(type, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(n, "normalizers");
        if (!cJSON_IsArray(list))
            return g3n_err(err, errlen, "%s: normalizer Sequence without normalizers", path);
        const cJSON *e;
        cJSON_ArrayForEach(e, list) {
            if (load_normalizer(tk, e, path, err, errlen)) return -1;
        }
        return 0;
    }
    norm_step st = {0};
    if (!strcmp(type, "Replace")) {
        const char *pat = string_pattern(n, path, "normalizer Replace", err, errlen);
        const char *content = jstr(n, "content");
        if (!pat) return -1;
        if (!content) return g3n_err(err, errlen, "%s: normalizer Replace has no content", path);
        st.pat = g3n_strdup(pat);
        st.npat = strlen(pat);
        st.content = g3n_strdup(content);
        st.ncontent = strlen(content);
    } else if (!strcmp(type, "Prepend")) {
        const char *content = jstr(n, "prepend");
        if (!content) return g3n_err(err, errlen, "%s: normalizer Prepend has no prepend", path);
        st.prepend = 1;
        st.content = g3n_strdup(content);
        st.ncontent = strlen(content);
    } else {
        return g3n_err(err, errlen, "%s: normalizer type \"%s\" is not implemented by g3n", path,
                       type);
    }
    tk->norm = realloc(tk->norm, (size_t)(tk->n_norm + 1) * sizeof *tk->norm);
    if (!tk->norm) abort();
    tk->norm[tk->n_norm++] = st;
    return 0;
}

/* pre_tokenizer: null, Split(String pattern), or a Sequence of Splits. */
static int load_pretokenizer(g3n_tokenizer *tk, const cJSON *p, const char *path, char *err,
                             size_t errlen) {
    if (!p || cJSON_IsNull(p)) return 0;
    const char *type = jstr(p, "type");
    if (!type) return g3n_err(err, errlen, "%s: pre_tokenizer has no type", path);
    if (!strcmp(type, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(p, "pretokenizers");
        if (!cJSON_IsArray(list))
            return g3n_err(err, errlen, "%s: pre_tokenizer Sequence without pretokenizers", path);
        const cJSON *e;
        cJSON_ArrayForEach(e, list) {
            if (load_pretokenizer(tk, e, path, err, errlen)) return -1;
        }
        return 0;
    }
    if (strcmp(type, "Split"))
        return g3n_err(err, errlen, "%s: pre_tokenizer type \"%s\" is not implemented by g3n",
                       path, type);
    const char *pat = string_pattern(p, path, "pre_tokenizer Split", err, errlen);
    if (!pat) return -1;
    const char *beh = jstr(p, "behavior");
    static const char *names[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext",
                                  "Contiguous"};
    int b = -1;
    for (int i = 0; i < 5; i++)
        if (beh && !strcmp(beh, names[i])) b = i;
    if (b < 0)
        return g3n_err(err, errlen, "%s: pre_tokenizer Split behavior \"%s\" is unknown", path,
                       beh ? beh : "(none)");
    split_step st = {g3n_strdup(pat), strlen(pat), b, jbool(p, "invert", 0)};
    tk->split = realloc(tk->split, (size_t)(tk->n_split + 1) * sizeof *tk->split);
    if (!tk->split) abort();
    tk->split[tk->n_split++] = st;
    return 0;
}

/* decoder: Replace(String)/Strip steps, then optionally ByteFallback, then
 * optionally Fuse (a Sequence, or one of them alone). */
static int load_decoder(g3n_tokenizer *tk, const cJSON *d, const char *path, int *stage,
                        char *err, size_t errlen) {
    const char *type = jstr(d, "type");
    if (!type) return g3n_err(err, errlen, "%s: decoder has no type", path);
    if (!strcmp(type, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(d, "decoders");
        if (!cJSON_IsArray(list))
            return g3n_err(err, errlen, "%s: decoder Sequence without decoders", path);
        const cJSON *e;
        cJSON_ArrayForEach(e, list) {
            if (load_decoder(tk, e, path, stage, err, errlen)) return -1;
        }
        return 0;
    }
    if (!strcmp(type, "ByteFallback")) {
        if (*stage > 0)
            return g3n_err(err, errlen, "%s: decoder ByteFallback after ByteFallback/Fuse", path);
        *stage = 1;
        tk->dec_byte_fallback = 1;
        return 0;
    }
    if (!strcmp(type, "Fuse")) {
        *stage = 2; /* joining is what decode does anyway */
        return 0;
    }
    dec_step st = {0};
    if (!strcmp(type, "Replace")) {
        const char *pat = string_pattern(d, path, "decoder Replace", err, errlen);
        const char *content = jstr(d, "content");
        if (!pat) return -1;
        if (!content) return g3n_err(err, errlen, "%s: decoder Replace has no content", path);
        st.pat = g3n_strdup(pat);
        st.npat = strlen(pat);
        st.content = g3n_strdup(content);
        st.ncontent = strlen(content);
    } else if (!strcmp(type, "Strip")) {
        const char *content = jstr(d, "content");
        const cJSON *start = cJSON_GetObjectItemCaseSensitive(d, "start");
        const cJSON *stop = cJSON_GetObjectItemCaseSensitive(d, "stop");
        uint32_t cp = 0;
        if (!content || !*content || g3n_utf8_decode((const unsigned char *)content,
                                                     strlen(content), &cp) != (int)strlen(content) ||
            !cJSON_IsNumber(start) || !cJSON_IsNumber(stop) || start->valueint < 0 ||
            stop->valueint < 0)
            return g3n_err(err, errlen, "%s: decoder Strip needs one content char, start, stop",
                           path);
        st.strip = 1;
        st.strip_cp = cp;
        st.start = start->valueint;
        st.stop = stop->valueint;
    } else {
        return g3n_err(err, errlen, "%s: decoder type \"%s\" is not implemented by g3n", path,
                       type);
    }
    if (*stage > 0) {
        free(st.pat);
        free(st.content);
        return g3n_err(err, errlen, "%s: decoder %s after ByteFallback/Fuse is not implemented",
                       path, type);
    }
    tk->dec = realloc(tk->dec, (size_t)(tk->n_dec + 1) * sizeof *tk->dec);
    if (!tk->dec) abort();
    tk->dec[tk->n_dec++] = st;
    return 0;
}

/* Apply the decoder's per-token steps to one piece, appending to out; a and b are
 * the caller's scratch buffers. */
static void decode_piece_steps(const g3n_tokenizer *tk, const char *s, size_t n, bbuf *out,
                               bbuf *a, bbuf *b) {
    if (tk->n_dec == 0) {
        bbuf_put(out, s, n);
        return;
    }
    a->n = 0;
    bbuf_put(a, s, n);
    for (int k = 0; k < tk->n_dec; k++) {
        const dec_step *st = &tk->dec[k];
        b->n = 0;
        if (!st->strip) {
            size_t i = 0;
            while (i < a->n) {
                const char *hit = find_bytes(a->p + i, a->n - i, st->pat, st->npat);
                size_t upto = hit ? (size_t)(hit - a->p) : a->n;
                bbuf_put(b, a->p + i, upto - i);
                if (!hit) break;
                bbuf_put(b, st->content, st->ncontent);
                i = upto + st->npat;
            }
        } else {
            /* Strip: drop up to `start` leading and `stop` trailing content chars. */
            size_t lo = 0, hi = a->n;
            for (int c = 0; c < st->start && lo < hi; c++) {
                uint32_t cp;
                int l = g3n_utf8_decode((unsigned char *)a->p + lo, hi - lo, &cp);
                if (l <= 0 || cp != st->strip_cp) break;
                lo += (size_t)l;
            }
            for (int c = 0; c < st->stop && hi > lo; c++) {
                size_t j = hi - 1;
                while (j > lo && ((unsigned char)a->p[j] & 0xC0) == 0x80) j--;
                uint32_t cp;
                int l = g3n_utf8_decode((unsigned char *)a->p + j, hi - j, &cp);
                if (l <= 0 || (size_t)l != hi - j || cp != st->strip_cp) break;
                hi = j;
            }
            bbuf_put(b, a->p + lo, hi - lo);
        }
        bbuf t = *a;
        *a = *b;
        *b = t;
    }
    bbuf_put(out, a->p, a->n);
}

/* Value of a hex digit, or -1. */
static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* "<0xNN>" as the ByteFallback decoder reads it (u8::from_str_radix on the two
 * characters after "<0x": hex digits, or '+' then one hex digit). */
static int byte_token_value(const char *s, size_t n) {
    if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') return -1;
    int h = hexval((unsigned char)s[3]), l = hexval((unsigned char)s[4]);
    if (s[3] == '+' && l >= 0) return l;
    if (h < 0 || l < 0) return -1;
    return h * 16 + l;
}

/* Build the model part: vocab, pieces arena, hash, single-char table, merges. */
static int load_model(g3n_tokenizer *tk, const cJSON *model, const cJSON *added, const char *path,
                      char *err, size_t errlen) {
    const char *type = jstr(model, "type");
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    if (type && strcmp(type, "BPE"))
        return g3n_err(err, errlen, "%s: model.type is \"%s\"; g3n implements only BPE", path,
                       type);
    if (!cJSON_IsObject(vocab)) return g3n_err(err, errlen, "%s: model.vocab is not an object", path);
    if (!cJSON_IsArray(merges)) return g3n_err(err, errlen, "%s: model.merges is not an array", path);
    const cJSON *dropout = cJSON_GetObjectItemCaseSensitive(model, "dropout");
    if (cJSON_IsNumber(dropout) && dropout->valuedouble > 0)
        return g3n_err(err, errlen, "%s: model.dropout %g (random BPE) is not implemented", path,
                       dropout->valuedouble);
    const char *cont = jstr(model, "continuing_subword_prefix");
    const char *eow = jstr(model, "end_of_word_suffix");
    if ((cont && *cont) || (eow && *eow))
        return g3n_err(err, errlen,
                       "%s: model.continuing_subword_prefix/end_of_word_suffix not implemented",
                       path);
    tk->byte_fallback = jbool(model, "byte_fallback", 0);
    tk->fuse_unk = jbool(model, "fuse_unk", 0);
    tk->ignore_merges = jbool(model, "ignore_merges", 0);

    /* Pass 1: ids and sizes. */
    int max_id = -1;
    size_t arena_bytes = 0, n_entries = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, vocab) {
        if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble > MAX_ID ||
            e->valuedouble != (double)e->valueint)
            return g3n_err(err, errlen, "%s: model.vocab[\"%s\"] is not an id in [0, %d]", path,
                           e->string, MAX_ID);
        if (e->valueint > max_id) max_id = e->valueint;
        arena_bytes += strlen(e->string);
        n_entries++;
    }
    int n_added = cJSON_GetArraySize(added);
    cJSON_ArrayForEach(e, added) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id");
        const char *content = jstr(e, "content");
        if (!cJSON_IsNumber(id) || id->valuedouble < 0 || id->valuedouble > MAX_ID ||
            id->valuedouble != (double)id->valueint || !content)
            return g3n_err(err, errlen, "%s: added_tokens entry without a valid id and content",
                           path);
        if (id->valueint > max_id) max_id = id->valueint;
        arena_bytes += strlen(content);
    }
    if (max_id < 0) return g3n_err(err, errlen, "%s: empty vocabulary", path);
    if (arena_bytes >= UINT32_MAX) return g3n_err(err, errlen, "%s: vocabulary too large", path);
    int nv = max_id + 1;
    tk->n_vocab = nv;
    tk->flags = g3n_calloc((size_t)nv, 1);
    tk->off = g3n_calloc((size_t)nv, sizeof *tk->off);
    tk->len = g3n_calloc((size_t)nv, sizeof *tk->len);
    tk->arena = g3n_malloc(arena_bytes + 1);
    uint32_t vb = 10;
    while ((1u << vb) < 2 * (n_entries + (size_t)n_added) + 16) vb++;
    tk->vbits = vb;
    tk->vslots = g3n_malloc(sizeof(vslot) << vb);
    for (size_t i = 0; i < ((size_t)1 << vb); i++) tk->vslots[i].id = -1;

    /* Pass 2: pieces and hash (model vocab first, so it wins on a clash). */
    size_t pos = 0;
    cJSON_ArrayForEach(e, vocab) {
        int id = e->valueint;
        if (tk->flags[id] & F_PRESENT)
            return g3n_err(err, errlen, "%s: model.vocab gives id %d to two pieces", path, id);
        size_t l = strlen(e->string);
        memcpy(tk->arena + pos, e->string, l);
        tk->off[id] = (uint32_t)pos;
        tk->len[id] = (uint32_t)l;
        pos += l;
        tk->flags[id] = F_PRESENT | F_MODEL;
        vocab_insert(tk, id);
    }
    cJSON_ArrayForEach(e, added) {
        int id = cJSON_GetObjectItemCaseSensitive(e, "id")->valueint;
        const char *content = jstr(e, "content");
        size_t l = strlen(content);
        if (l == 0) return g3n_err(err, errlen, "%s: added token %d has empty content", path, id);
        if (jbool(e, "lstrip", 0) || jbool(e, "rstrip", 0) || jbool(e, "single_word", 0))
            return g3n_err(err, errlen,
                           "%s: added token \"%s\" uses lstrip/rstrip/single_word, which g3n "
                           "does not implement",
                           path, content);
        if (tk->flags[id] & F_PRESENT) {
            if (tk->len[id] != l || memcmp(tk->arena + tk->off[id], content, l) != 0)
                return g3n_err(err, errlen,
                               "%s: added token \"%s\" has id %d, which model.vocab gives to "
                               "another piece",
                               path, content, id);
        } else {
            memcpy(tk->arena + pos, content, l);
            tk->off[id] = (uint32_t)pos;
            tk->len[id] = (uint32_t)l;
            pos += l;
        }
        int special = jbool(e, "special", 0);
        tk->flags[id] |= F_PRESENT | F_ADDED | (special ? F_SPECIAL : 0);
        vocab_insert(tk, id);
        int normalized = jbool(e, "normalized", !special);
        trie_add(normalized ? &tk->norm_trie : &tk->raw_trie, content, l, id);
    }

    /* Single code points below U+10000, and byte tokens. */
    tk->bmp_id = g3n_malloc(65536 * sizeof *tk->bmp_id);
    for (int i = 0; i < 65536; i++) tk->bmp_id[i] = -1;
    for (int id = 0; id < nv; id++) {
        if (!(tk->flags[id] & F_MODEL) || tk->len[id] > 3) continue;
        uint32_t cp;
        int l = g3n_utf8_decode((unsigned char *)tk->arena + tk->off[id], tk->len[id], &cp);
        if (l > 0 && (uint32_t)l == tk->len[id] && cp < 65536) tk->bmp_id[cp] = id;
    }
    tk->all_bytes = 1;
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        int32_t id = vocab_lookup(tk, name, 6);
        tk->byte_id[b] = (id >= 0 && (tk->flags[id] & F_MODEL)) ? id : -1;
        if (tk->byte_id[b] < 0) tk->all_bytes = 0;
    }
    const char *unk = jstr(model, "unk_token");
    tk->unk_id = -1;
    if (unk) {
        tk->unk_id = vocab_lookup(tk, unk, strlen(unk));
        if (tk->unk_id < 0 || !(tk->flags[tk->unk_id] & F_MODEL))
            return g3n_err(err, errlen, "%s: model.unk_token \"%s\" is not in model.vocab", path,
                           unk);
    }

    /* Merges: rank = index; the merged piece must be in the vocabulary. */
    int nm = cJSON_GetArraySize(merges);
    if (nm >= (1 << RANK_BITS)) return g3n_err(err, errlen, "%s: too many merges (%d)", path, nm);
    tk->n_merges = nm;
    uint32_t mb = 10;
    while ((1u << mb) < 2 * (size_t)nm + 16) mb++;
    tk->mbits = mb;
    tk->mslots = g3n_malloc(sizeof(uint64_t) << mb);
    memset(tk->mslots, 0xFF, sizeof(uint64_t) << mb);
    tk->merge_new = g3n_malloc((size_t)(nm ? nm : 1) * sizeof *tk->merge_new);
    tk->can_left = g3n_calloc((size_t)nv / 64 + 1, sizeof(uint64_t));
    tk->can_right = g3n_calloc((size_t)nv / 64 + 1, sizeof(uint64_t));
    /* Batches of merges: hash all, prefetch their slots, then look up (the tables
     * are far larger than the caches, so this hides most of the misses). */
    enum { BATCH = 16 };
    struct {
        const char *a, *b;
        size_t la, lb;
        uint64_t ha, hb, hab;
        int32_t ia, ib;
    } q[BATCH];
    int rank = 0;
    e = merges->child;
    while (e) {
        int nq = 0;
        for (; e && nq < BATCH; e = e->next, nq++) {
            const char *pa, *pb;
            size_t la, lb;
            if (cJSON_IsArray(e) && e->child && e->child->next && !e->child->next->next &&
                cJSON_IsString(e->child) && cJSON_IsString(e->child->next)) {
                pa = e->child->valuestring;
                pb = e->child->next->valuestring;
                la = strlen(pa);
                lb = strlen(pb);
            } else if (cJSON_IsString(e)) {
                pa = e->valuestring;
                const char *sp = strchr(pa, ' ');
                if (!sp || strchr(sp + 1, ' '))
                    return g3n_err(err, errlen, "%s: model.merges[%d] \"%s\" is not \"a b\"",
                                   path, rank + nq, pa);
                la = (size_t)(sp - pa);
                pb = sp + 1;
                lb = strlen(pb);
            } else {
                return g3n_err(err, errlen, "%s: model.merges[%d] is neither [a, b] nor \"a b\"",
                               path, rank + nq);
            }
            q[nq].a = pa;
            q[nq].b = pb;
            q[nq].la = la;
            q[nq].lb = lb;
            q[nq].ha = fnv(FNV_INIT, pa, la);
            q[nq].hb = fnv(FNV_INIT, pb, lb);
            q[nq].hab = fnv(q[nq].ha, pb, lb);
            __builtin_prefetch(vslot_of(tk, q[nq].ha));
            __builtin_prefetch(vslot_of(tk, q[nq].hb));
            __builtin_prefetch(vslot_of(tk, q[nq].hab));
        }
        for (int k = 0; k < nq; k++, rank++) {
            int32_t ia = vocab_lookup_h(tk, q[k].ha, q[k].a, q[k].la, NULL, 0);
            int32_t ib = vocab_lookup_h(tk, q[k].hb, q[k].b, q[k].lb, NULL, 0);
            int32_t ic = vocab_lookup_h(tk, q[k].hab, q[k].a, q[k].la, q[k].b, q[k].lb);
            if (ia < 0 || ib < 0 || ic < 0 || !(tk->flags[ia] & F_MODEL) ||
                !(tk->flags[ib] & F_MODEL) || !(tk->flags[ic] & F_MODEL))
                return g3n_err(err, errlen,
                               "%s: model.merges[%d] (\"%.*s\", \"%.*s\"): a piece or the "
                               "merged piece is not in model.vocab",
                               path, rank, (int)q[k].la, q[k].a, (int)q[k].lb, q[k].b);
            q[k].ia = ia;
            q[k].ib = ib;
            uint64_t key = ((uint64_t)(uint32_t)ia << ID_BITS) | (uint32_t)ib;
            __builtin_prefetch(&tk->mslots[merge_slot(key, tk->mbits)]);
            tk->merge_new[rank] = ic;
        }
        for (int k = 0; k < nq; k++) {
            merge_insert(tk, q[k].ia, q[k].ib, rank - nq + k);
            tk->can_left[q[k].ia >> 6] |= (uint64_t)1 << (q[k].ia & 63);
            tk->can_right[q[k].ib >> 6] |= (uint64_t)1 << (q[k].ib & 63);
        }
    }
    return 0;
}

/* Decoded form of every piece (after Replace/Strip steps), byte tokens marked. */
static int build_decoded(g3n_tokenizer *tk, const char *path, char *err, size_t errlen) {
    int nv = tk->n_vocab;
    tk->doff = g3n_calloc((size_t)nv, sizeof *tk->doff);
    tk->dlen = g3n_calloc((size_t)nv, sizeof *tk->dlen);
    tk->byte_val = g3n_calloc((size_t)nv, 1);
    bbuf out = {0}, a = {0}, b = {0};
    for (int id = 0; id < nv; id++) {
        if (!(tk->flags[id] & F_PRESENT)) continue;
        size_t start = out.n;
        decode_piece_steps(tk, tk->arena + tk->off[id], tk->len[id], &out, &a, &b);
        size_t l = out.n - start;
        if (l > MAX_DECODED_PIECE) {
            free(out.p);
            free(a.p);
            free(b.p);
            return g3n_err(err, errlen,
                           "%s: token %d decodes to %zu bytes; g3n allows at most %d", path, id,
                           l, MAX_DECODED_PIECE);
        }
        tk->doff[id] = (uint32_t)start;
        tk->dlen[id] = (uint16_t)l;
        int bv = tk->dec_byte_fallback ? byte_token_value(out.p + start, l) : -1;
        if (bv >= 0) {
            tk->flags[id] |= F_BYTE;
            tk->byte_val[id] = (uint8_t)bv;
        }
    }
    free(a.p);
    free(b.p);
    bbuf_reserve(&out, 1);
    tk->darena = out.p;
    return 0;
}

/* cJSON allocation: parsing the 33 MB file makes ~2 million small nodes, and malloc
 * plus free of each was a third of the load time. While this thread parses a
 * tokenizer, cJSON's hooks take memory from a bump arena that is dropped whole
 * afterwards; for every other thread and at all other times they are plain
 * malloc/free. The hooks are installed once and never changed (nothing else in g3n
 * calls cJSON_InitHooks). */
typedef struct bump_block {
    struct bump_block *next;
} bump_block;

typedef struct {
    bump_block *blocks;
    char *cur, *end;
} bump;

static _Thread_local bump *tl_bump; /* non-NULL while this thread parses */

static void *hook_malloc(size_t n) {
    bump *b = tl_bump;
    if (!b) return malloc(n);
    n = (n + 15) & ~(size_t)15;
    if ((size_t)(b->end - b->cur) < n) {
        size_t sz = (size_t)32 << 20;
        if (sz < n + 64) sz = n + 64;
        bump_block *nb = malloc(sz);
        if (!nb) return NULL;
        nb->next = b->blocks;
        b->blocks = nb;
        b->cur = (char *)nb + 64;
        b->end = (char *)nb + sz;
    }
    void *p = b->cur;
    b->cur += n;
    return p;
}

/* cJSON free hook: a no-op for arena memory. */
static void hook_free(void *p) {
    if (!tl_bump) free(p); /* arena memory goes away with its blocks */
}

/* Install the hooks (once per process, through pthread_once). */
static void install_hooks(void) {
    cJSON_Hooks h = {hook_malloc, hook_free};
    cJSON_InitHooks(&h);
}

static pthread_once_t hooks_once = PTHREAD_ONCE_INIT;

/* Parse n bytes of JSON into the arena *ar; free the tree with arena_free (never
 * cJSON_Delete). */
static cJSON *parse_arena(const char *text, size_t n, bump *ar) {
    pthread_once(&hooks_once, install_hooks);
    ar->blocks = NULL;
    ar->cur = ar->end = NULL;
    tl_bump = ar;
    cJSON *root = cJSON_ParseWithLength(text, n);
    tl_bump = NULL;
    return root;
}

/* Free every block of the arena (the whole parsed tree). */
static void arena_free(bump *ar) {
    bump_block *b = ar->blocks;
    while (b) {
        bump_block *nx = b->next;
        free(b);
        b = nx;
    }
    ar->blocks = NULL;
}

/* Contract in g3n.h. Reads the file, parses it into the arena, builds the tables
 * and drops the tree; every failure frees what was built and names the field. */
g3n_tokenizer *g3n_tokenizer_load(const char *path, char *err, size_t errlen) {
    size_t n = 0;
    char *text = g3n_read_file(path, &n, (size_t)1 << 31, err, errlen);
    if (!text) return NULL;
    /* cJSON keeps strings NUL-terminated, so a \u0000 escape would cut a piece. */
    if (find_bytes(text, n, "\\u0000", 6)) {
        free(text);
        g3n_err(err, errlen, "%s: contains \\u0000, which g3n cannot represent in a piece", path);
        return NULL;
    }
    bump arena;
    cJSON *root = parse_arena(text, n, &arena);
    free(text);
    if (!root || !cJSON_IsObject(root)) {
        arena_free(&arena);
        g3n_err(err, errlen, "%s: not a JSON object (parse error)", path);
        return NULL;
    }
    g3n_tokenizer *tk = g3n_calloc(1, sizeof *tk);
    trie_init(&tk->raw_trie);
    trie_init(&tk->norm_trie);
    tk->bos_id = -1;
    int stage = 0;
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    const cJSON *decoder = cJSON_GetObjectItemCaseSensitive(root, "decoder");
    if (added && !cJSON_IsArray(added)) {
        g3n_err(err, errlen, "%s: added_tokens is not an array", path);
        goto fail;
    }
    if (!cJSON_IsObject(model)) {
        g3n_err(err, errlen, "%s: no model object", path);
        goto fail;
    }
    if (!cJSON_IsObject(decoder)) {
        g3n_err(err, errlen, "%s: no decoder (g3n needs one to decode)", path);
        goto fail;
    }
    if (load_model(tk, model, added, path, err, errlen) ||
        load_normalizer(tk, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), path, err,
                        errlen) ||
        load_pretokenizer(tk, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"), path, err,
                          errlen) ||
        load_decoder(tk, decoder, path, &stage, err, errlen) ||
        build_decoded(tk, path, err, errlen))
        goto fail;
    tk->bos_id = vocab_lookup(tk, "<bos>", 5);
    arena_free(&arena);
    return tk;
fail:
    arena_free(&arena);
    g3n_tokenizer_free(tk);
    return NULL;
}

/* Contract in g3n.h: 1 + the largest id of model.vocab and added_tokens. */
int g3n_tokenizer_n_vocab(const g3n_tokenizer *tk) { return tk->n_vocab; }

/* Contract in g3n.h. */
int32_t g3n_tokenizer_find(const g3n_tokenizer *tk, const char *piece) {
    if (!piece) return -1;
    return vocab_lookup(tk, piece, strlen(piece));
}

/* ---- encoding --------------------------------------------------------------------- */

/* Per-call scratch: nothing in the tokenizer is written during encode, so one
 * tokenizer may serve many threads. */
typedef struct {
    bbuf norm[2];
    int32_t *sym, *prev, *next;
    size_t sym_cap, prev_cap, next_cap;
    struct hent *heap;
    size_t heap_cap;
    size_t *spans, *spans2, *parts;
    size_t spans_cap, spans2_cap, parts_cap;
} scratch;

/* Free the scratch buffers of one encode call. */
static void scratch_free(scratch *sc) {
    free(sc->norm[0].p);
    free(sc->norm[1].p);
    free(sc->sym);
    free(sc->prev);
    free(sc->next);
    free(sc->heap);
    free(sc->spans);
    free(sc->spans2);
    free(sc->parts);
}

/* A queued merge: key = rank << 32 | position (the order `tokenizers` uses:
 * lowest rank, then leftmost), and the pair of ids it was queued for. The entry is
 * stale when the symbols at the position are no longer that pair; comparing ids
 * replaces a second probe of the merge table. */
struct hent {
    uint64_t key;
    int32_t left, right;
};

/* Min-heap on key: add x (room is the caller's). */
static inline void heap_push(struct hent *h, size_t *n, struct hent x) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) >> 1;
        if (h[p].key <= x.key) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = x;
}

/* Put x at i in the heap h[0..m) and sift it down. */
static inline void heap_down(struct hent *h, size_t m, size_t i, struct hent x) {
    for (;;) {
        size_t c = 2 * i + 1;
        if (c + 1 < m) {
            c += h[c + 1].key < h[c].key; /* branch-free pick of the smaller child */
        } else if (c >= m) {
            break;
        }
        if (h[c].key >= x.key) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = x;
}

/* Remove and return the smallest entry (*n > 0). */
static inline struct hent heap_pop(struct hent *h, size_t *n) {
    struct hent top = h[0];
    size_t m = --*n;
    if (m) heap_down(h, m, 0, h[m]);
    return top;
}

/* Id of the one-character piece s[0..l) (code point cp) in the model vocab, or -1. */
static inline int32_t char_id(const g3n_tokenizer *tk, const char *s, int l, uint32_t cp) {
    if (cp < 65536) return tk->bmp_id[cp];
    int32_t id = vocab_lookup(tk, s, (size_t)l);
    return (id >= 0 && (tk->flags[id] & F_MODEL)) ? id : -1;
}

/* BPE over one pre-token word w[0..n) (valid UTF-8), appending ids to out. Merges
 * are applied lowest rank first, leftmost first among equal ranks, exactly as
 * `tokenizers` (Word::merge_all) does, in O(n log n). */
static int bpe_word(const g3n_tokenizer *tk, scratch *sc, const char *w, size_t n, ivec *out,
                    char *err, size_t errlen) {
    if (n == 0) return 0;
    if (tk->ignore_merges) {
        int32_t id = vocab_lookup(tk, w, n);
        if (id >= 0 && (tk->flags[id] & F_MODEL)) {
            ivec_push(out, id);
            return 0;
        }
    }
    ensure((void **)&sc->sym, &sc->sym_cap, n + 1, sizeof *sc->sym);
    int32_t *sym = sc->sym;
    size_t ns = 0;
    int unk_pending = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        int l = g3n_utf8_decode((const unsigned char *)w + i, n - i, &cp);
        if (l < 0) { /* cannot happen on sanitized text; treat the byte as a char */
            l = 1;
            cp = 0xFFFFFFFFu;
        }
        int32_t id = cp == 0xFFFFFFFFu ? -1 : char_id(tk, w + i, l, cp);
        if (id >= 0) {
            if (unk_pending) {
                sym[ns++] = tk->unk_id;
                unk_pending = 0;
            }
            sym[ns++] = id;
        } else {
            int ok = tk->byte_fallback;
            if (ok && !tk->all_bytes)
                for (int k = 0; k < l; k++)
                    if (tk->byte_id[(unsigned char)w[i + k]] < 0) ok = 0;
            if (ok) {
                /* As `tokenizers` does, a pending <unk> stays pending here. */
                for (int k = 0; k < l; k++) sym[ns++] = tk->byte_id[(unsigned char)w[i + k]];
            } else if (tk->unk_id >= 0) {
                if (unk_pending && !tk->fuse_unk) sym[ns++] = tk->unk_id;
                unk_pending = 1;
            } else {
                return g3n_err(err, errlen,
                               "tokenizer: character at byte %zu of a word is not in the "
                               "vocabulary and there is no unk_token",
                               i);
            }
        }
        i += (size_t)l;
    }
    if (unk_pending) sym[ns++] = tk->unk_id;
    if (ns == 1) {
        ivec_push(out, sym[0]);
        return 0;
    }
    ensure((void **)&sc->prev, &sc->prev_cap, ns, sizeof *sc->prev);
    ensure((void **)&sc->next, &sc->next_cap, ns, sizeof *sc->next);
    ensure((void **)&sc->heap, &sc->heap_cap, 3 * ns, sizeof *sc->heap);
    int32_t *prev = sc->prev, *next = sc->next;
    struct hent *heap = sc->heap;
    size_t hn = 0;
    for (size_t i = 0; i < ns; i++) {
        prev[i] = (int32_t)i - 1;
        next[i] = i + 1 < ns ? (int32_t)i + 1 : -1;
    }
    /* Initial pairs: prefetch each pair's slot a few pairs ahead of its probe. */
    enum { AHEAD = 8 };
    for (size_t i = 0; i + 1 < ns && i < AHEAD; i++) merge_prefetch(tk, sym[i], sym[i + 1]);
    for (size_t i = 0; i + 1 < ns; i++) {
        if (i + AHEAD + 1 < ns) merge_prefetch(tk, sym[i + AHEAD], sym[i + AHEAD + 1]);
        int r = merge_rank(tk, sym[i], sym[i + 1]);
        if (r >= 0) heap[hn++] = (struct hent){((uint64_t)r << 32) | i, sym[i], sym[i + 1]};
    }
    for (size_t k = hn / 2; k-- > 0;) heap_down(heap, hn, k, heap[k]);
    while (hn > 0) {
        struct hent top = heap_pop(heap, &hn);
        int32_t p = (int32_t)(uint32_t)top.key;
        int32_t q = next[p];
        /* stale: p was absorbed (sym -1), is last, or the pair changed */
        if (q < 0 || sym[p] != top.left || sym[q] != top.right) continue;
        int32_t m = tk->merge_new[top.key >> 32];
        sym[p] = m;
        sym[q] = -1;
        next[p] = next[q];
        if (next[q] >= 0) prev[next[q]] = p;
        if (prev[p] >= 0) {
            int32_t l = sym[prev[p]];
            int r = merge_rank(tk, l, m);
            if (r >= 0)
                heap_push(heap, &hn, (struct hent){((uint64_t)r << 32) | (uint32_t)prev[p], l, m});
        }
        if (next[p] >= 0) {
            int32_t rr = sym[next[p]];
            int r = merge_rank(tk, m, rr);
            if (r >= 0) heap_push(heap, &hn, (struct hent){((uint64_t)r << 32) | (uint32_t)p, m, rr});
        }
    }
    for (int32_t i = 0; i >= 0; i = next[i]) ivec_push(out, sym[i]);
    return 0;
}

/* Split [a, b) of s by one Split step into pieces appended to spans (pairs). The
 * behaviours follow NormalizedString::split in `tokenizers`; empty pieces drop. */
static void split_span(const split_step *st, scratch *sc, const char *s, size_t a, size_t b,
                       size_t **spans, size_t *cap, size_t *ns) {
    /* parts: (start, end, is_match) covering [a, b) */
    size_t np = 0;
    size_t i = a;
    while (i < b) {
        const char *hit = find_bytes(s + i, b - i, st->pat, st->npat);
        size_t m = hit ? (size_t)(hit - s) : b;
        ensure((void **)&sc->parts, &sc->parts_cap, 3 * (np + 2), sizeof *sc->parts);
        if (m > i) {
            sc->parts[3 * np] = i;
            sc->parts[3 * np + 1] = m;
            sc->parts[3 * np + 2] = st->invert;
            np++;
        }
        if (!hit) break;
        sc->parts[3 * np] = m;
        sc->parts[3 * np + 1] = m + st->npat;
        sc->parts[3 * np + 2] = !st->invert;
        np++;
        i = m + st->npat;
    }
    size_t *P = sc->parts;
    size_t first = *ns;
#define EMIT(x, y)                                                                     \
    do {                                                                               \
        ensure((void **)spans, cap, 2 * (*ns + 1), sizeof **spans);                    \
        (*spans)[2 * *ns] = (x);                                                       \
        (*spans)[2 * *ns + 1] = (y);                                                   \
        (*ns)++;                                                                       \
    } while (0)
    int prev_match = 0;
    switch (st->behavior) {
    case SPLIT_REMOVED:
        for (size_t k = 0; k < np; k++)
            if (!P[3 * k + 2]) EMIT(P[3 * k], P[3 * k + 1]);
        break;
    case SPLIT_ISOLATED:
        for (size_t k = 0; k < np; k++) EMIT(P[3 * k], P[3 * k + 1]);
        break;
    case SPLIT_MERGED_PREV:
        for (size_t k = 0; k < np; k++) {
            int m = (int)P[3 * k + 2];
            if (m && !prev_match && *ns > first) (*spans)[2 * (*ns - 1) + 1] = P[3 * k + 1];
            else EMIT(P[3 * k], P[3 * k + 1]);
            prev_match = m;
        }
        break;
    case SPLIT_MERGED_NEXT:
        for (size_t k = np; k-- > 0;) {
            int m = (int)P[3 * k + 2];
            if (m && !prev_match && *ns > first) (*spans)[2 * (*ns - 1)] = P[3 * k];
            else EMIT(P[3 * k], P[3 * k + 1]);
            prev_match = m;
        }
        /* reverse what this call added */
        for (size_t x = first, y = *ns - 1; *ns > first && x < y; x++, y--) {
            size_t t0 = (*spans)[2 * x], t1 = (*spans)[2 * x + 1];
            (*spans)[2 * x] = (*spans)[2 * y];
            (*spans)[2 * x + 1] = (*spans)[2 * y + 1];
            (*spans)[2 * y] = t0;
            (*spans)[2 * y + 1] = t1;
        }
        break;
    case SPLIT_CONTIGUOUS:
        for (size_t k = 0; k < np; k++) {
            int m = (int)P[3 * k + 2];
            if (m == prev_match && *ns > first) (*spans)[2 * (*ns - 1) + 1] = P[3 * k + 1];
            else EMIT(P[3 * k], P[3 * k + 1]);
            prev_match = m;
        }
        break;
    }
#undef EMIT
}

/* Pre-tokenize the normalized s[0..n) and run BPE on each word. */
static int pretok_bpe(const g3n_tokenizer *tk, scratch *sc, const char *s, size_t n, ivec *out,
                      char *err, size_t errlen) {
    if (tk->n_split == 0) return bpe_word(tk, sc, s, n, out, err, errlen);
    size_t ns = 1;
    ensure((void **)&sc->spans, &sc->spans_cap, 2, sizeof *sc->spans);
    sc->spans[0] = 0;
    sc->spans[1] = n;
    for (int k = 0; k < tk->n_split; k++) {
        size_t ns2 = 0;
        for (size_t j = 0; j < ns; j++)
            split_span(&tk->split[k], sc, s, sc->spans[2 * j], sc->spans[2 * j + 1], &sc->spans2,
                       &sc->spans2_cap, &ns2);
        size_t *t = sc->spans;
        sc->spans = sc->spans2;
        sc->spans2 = t;
        size_t tc = sc->spans_cap;
        sc->spans_cap = sc->spans2_cap;
        sc->spans2_cap = tc;
        ns = ns2;
    }
    for (size_t j = 0; j < ns; j++) {
        size_t a = sc->spans[2 * j], b = sc->spans[2 * j + 1];
        if (b > a && bpe_word(tk, sc, s + a, b - a, out, err, errlen)) return -1;
    }
    return 0;
}

/* Run the normalizer over s[0..n); returns the result (s itself when there is no
 * normalizer) and its length in *nout. */
static const char *normalize(const g3n_tokenizer *tk, scratch *sc, const char *s, size_t n,
                             size_t *nout) {
    const char *cur = s;
    size_t ncur = n;
    int which = 0;
    for (int k = 0; k < tk->n_norm; k++) {
        const norm_step *st = &tk->norm[k];
        bbuf *b = &sc->norm[which];
        b->n = 0;
        if (st->prepend) {
            if (ncur == 0) continue; /* Prepend leaves an empty string alone */
            bbuf_put(b, st->content, st->ncontent);
            bbuf_put(b, cur, ncur);
        } else if (st->npat == 1) {
            char c = st->pat[0];
            bbuf_reserve(b, ncur + 16);
            for (size_t i = 0; i < ncur; i++) {
                if (cur[i] == c) {
                    bbuf_put(b, st->content, st->ncontent);
                } else {
                    if (b->n == b->cap) bbuf_reserve(b, 1);
                    b->p[b->n++] = cur[i];
                }
            }
        } else {
            size_t i = 0;
            while (i < ncur) {
                const char *hit = find_bytes(cur + i, ncur - i, st->pat, st->npat);
                size_t upto = hit ? (size_t)(hit - cur) : ncur;
                bbuf_put(b, cur + i, upto - i);
                if (!hit) break;
                bbuf_put(b, st->content, st->ncontent);
                i = upto + st->npat;
            }
        }
        cur = b->p;
        ncur = b->n;
        which ^= 1;
    }
    *nout = ncur;
    return cur;
}

/* One stretch of text between raw added tokens: normalize, split out normalized
 * added tokens, pre-tokenize, BPE. */
static int encode_segment(const g3n_tokenizer *tk, scratch *sc, const char *s, size_t n,
                          ivec *out, char *err, size_t errlen) {
    if (n == 0) return 0;
    size_t nn;
    const char *t = normalize(tk, sc, s, n, &nn);
    if (tk->norm_trie.n == 0) return pretok_bpe(tk, sc, t, nn, out, err, errlen);
    size_t start = 0;
    for (size_t i = 0; i < nn;) {
        int32_t id;
        size_t m = tk->norm_trie.root[(unsigned char)t[i]] >= 0
                       ? trie_match(&tk->norm_trie, t + i, nn - i, &id)
                       : 0;
        if (m) {
            if (i > start && pretok_bpe(tk, sc, t + start, i - start, out, err, errlen)) return -1;
            ivec_push(out, id);
            i += m;
            start = i;
        } else {
            i++;
        }
    }
    if (nn > start) return pretok_bpe(tk, sc, t + start, nn - start, out, err, errlen);
    return 0;
}

/* Contract in g3n.h. Sanitize (U+FFFD), split on raw added tokens, then each
 * stretch through encode_segment; scratch is per call, nothing is cached. */
int g3n_tokenizer_encode(const g3n_tokenizer *tk, const char *text, size_t len, int add_bos,
                         int32_t **ids, char *err, size_t errlen) {
    *ids = NULL;
    if (!text && len) return g3n_err(err, errlen, "tokenizer: NULL text");
    if (add_bos && tk->bos_id < 0) return g3n_err(err, errlen, "tokenizer: no <bos> token");
    /* Invalid UTF-8: replace each maximal ill-formed subpart with U+FFFD. */
    char *clean = NULL;
    size_t valid = g3n_utf8_valid_prefix((const unsigned char *)text, len);
    if (valid < len) {
        bbuf b = {0};
        bbuf_put(&b, text, valid);
        size_t i = valid;
        while (i < len) {
            uint32_t cp;
            int l = g3n_utf8_decode((const unsigned char *)text + i, len - i, &cp);
            if (l > 0) {
                bbuf_put(&b, text + i, (size_t)l);
                i += (size_t)l;
            } else {
                bbuf_put(&b, "\xEF\xBF\xBD", 3);
                i += (size_t)(-l);
            }
        }
        clean = b.p;
        text = clean;
        len = b.n;
    }
    ivec out = {0};
    scratch sc = {0};
    if (add_bos) ivec_push(&out, tk->bos_id);
    int rc = 0;
    size_t start = 0;
    const trie *rt = &tk->raw_trie;
    for (size_t i = 0; i < len;) {
        if (rt->root[(unsigned char)text[i]] < 0) {
            i++;
            continue;
        }
        int32_t id;
        size_t m = trie_match(rt, text + i, len - i, &id);
        if (!m) {
            i++;
            continue;
        }
        if (i > start && (rc = encode_segment(tk, &sc, text + start, i - start, &out, err, errlen)))
            break;
        ivec_push(&out, id);
        i += m;
        start = i;
    }
    if (!rc && len > start) rc = encode_segment(tk, &sc, text + start, len - start, &out, err, errlen);
    scratch_free(&sc);
    free(clean);
    if (rc) {
        free(out.v);
        return -1;
    }
    if (out.n > INT_MAX) {
        free(out.v);
        return g3n_err(err, errlen, "tokenizer: too many tokens");
    }
    if (!out.v) out.v = g3n_malloc(sizeof(int32_t));
    *ids = out.v;
    return (int)out.n;
}

/* ---- decoding ---------------------------------------------------------------------- */

static inline int id_skipped(const g3n_tokenizer *tk, int32_t id, int skip_special) {
    if (id < 0 || id >= tk->n_vocab || !(tk->flags[id] & F_PRESENT)) return 1;
    return skip_special && (tk->flags[id] & F_SPECIAL);
}

/* End of a run of byte tokens occupying b->p[start..b->n): as the ByteFallback
 * decoder does, a run that is not valid UTF-8 as a whole becomes one U+FFFD per
 * byte. */
static void close_byte_run(bbuf *b, size_t start) {
    size_t n = b->n - start;
    if (n == 0 || g3n_utf8_valid_prefix((unsigned char *)b->p + start, n) == n) return;
    b->n = start;
    for (size_t i = 0; i < n; i++) bbuf_put(b, "\xEF\xBF\xBD", 3);
}

/* Contract in g3n.h. */
char *g3n_tokenizer_decode(const g3n_tokenizer *tk, const int32_t *ids, size_t n,
                           int skip_special, size_t *len) {
    bbuf b = {0};
    bbuf_reserve(&b, n * 4 + 1);
    size_t run = SIZE_MAX; /* start of the current byte-token run */
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id_skipped(tk, id, skip_special)) continue;
        if (tk->flags[id] & F_BYTE) {
            if (run == SIZE_MAX) run = b.n;
            bbuf_put(&b, &tk->byte_val[id], 1);
            continue;
        }
        if (run != SIZE_MAX) {
            close_byte_run(&b, run);
            run = SIZE_MAX;
        }
        bbuf_put(&b, tk->darena + tk->doff[id], tk->dlen[id]);
    }
    if (run != SIZE_MAX) close_byte_run(&b, run);
    bbuf_put(&b, "", 1);
    if (len) *len = b.n - 1;
    return b.p;
}

/* Append up to cap - *w bytes of s[0..n) to out. */
static void put_capped(char *out, size_t cap, size_t *w, const void *s, size_t n) {
    if (*w >= cap) return;
    if (n > cap - *w) n = cap - *w;
    memcpy(out + *w, s, n);
    *w += n;
}

/* Streaming rule: complete characters go out at once; each byte of an ill-formed
 * or (at a non-byte token or the end) truncated sequence becomes one U+FFFD. This
 * equals g3n_tokenizer_decode whenever every run of byte tokens is valid UTF-8
 * (always so for ids from g3n_tokenizer_encode); on an ill-formed run the batch
 * decoder, like `tokenizers`, also replaces the run's valid characters. */
static void detok_drain(g3n_detok *st, char *out, size_t cap, size_t *w) {
    int k = 0;
    while (k < st->n_pending) {
        uint32_t cp;
        int l = g3n_utf8_decode(st->pending + k, (size_t)(st->n_pending - k), &cp);
        if (l > 0) {
            put_capped(out, cap, w, st->pending + k, (size_t)l);
            k += l;
        } else if (k - l == st->n_pending && st->pending[k] >= 0xC2 && st->pending[k] <= 0xF4) {
            break; /* a valid but incomplete prefix: wait for more bytes */
        } else {
            for (int j = 0; j < -l; j++) put_capped(out, cap, w, "\xEF\xBF\xBD", 3);
            k += -l;
        }
    }
    memmove(st->pending, st->pending + k, (size_t)(st->n_pending - k));
    st->n_pending -= k;
}

/* Contract in g3n.h. A byte token joins the held bytes, which go out as soon as
 * they are complete (or known bad); any other piece first flushes them. */
size_t g3n_detok_push(const g3n_tokenizer *tk, g3n_detok *st, int32_t id, int skip_special,
                      char *out, size_t cap) {
    size_t w = 0;
    st->n_tokens++;
    if (id_skipped(tk, id, skip_special)) return 0;
    if (tk->flags[id] & F_BYTE) {
        if (st->n_pending >= (int)sizeof st->pending) detok_drain(st, out, cap, &w);
        st->pending[st->n_pending++] = tk->byte_val[id];
        detok_drain(st, out, cap, &w);
        return w;
    }
    w = g3n_detok_flush(tk, st, out, cap);
    put_capped(out, cap, &w, tk->darena + tk->doff[id], tk->dlen[id]);
    return w;
}

/* Contract in g3n.h. */
size_t g3n_detok_flush(const g3n_tokenizer *tk, g3n_detok *st, char *out, size_t cap) {
    (void)tk;
    size_t w = 0;
    detok_drain(st, out, cap, &w);
    for (int i = 0; i < st->n_pending; i++) put_capped(out, cap, &w, "\xEF\xBF\xBD", 3);
    st->n_pending = 0;
    return w;
}
