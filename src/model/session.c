/* session.c: one sequence over a shared model: its KV cache, position, scratch
 * and last logits, and g3n_session_eval, which splits input into steps of at
 * most n_batch tokens. The forward pass itself is in forward.c. */
#include <sys/stat.h>

#include "model/forward.h"

struct g3n_session {
    g3n_model *m;
    uint64_t id;       /* unique per session ever made (g3n_batcher's table keys on it) */
    int n_ctx, n_batch;
    int pos;
    int hi;            /* highest position written since the last reset, + 1 */
    g3n_kv kv;         /* cache views, backend memory */
    void *kv_mem;      /* one allocation for every owning layer's K and V */
    fwd_scratch *fwd;
    int32_t *ids, *posv, *seqv; /* [n_batch] host step metadata */
    float *logits;     /* [n_vocab] host, last token */
    int have_logits;
    int logits_on_dev; /* the last logits are still only in fwd's device row: copied on demand */
    int top_m, top_n;  /* the last sample's candidates (m of the first n logits), queued with the next step */
};

/* One allocation for the K and V of every layer that owns a cache; views in *kv.
 * Sliding layers keep a ring of window + n_batch - 1 positions: enough for every
 * query of a step to see its whole window while the step writes. */
static void *kv_alloc(g3n_model *m, int n_ctx, int n_batch, g3n_kv *kv) {
    const g3n_config *c = &m->cfg;
    const size_t kvd = (size_t)c->n_head_kv * c->head_dim;
    size_t total = 0;
    int cap[G3N_MAX_LAYERS];
    for (int l = 0; l < c->n_layer; l++) {
        cap[l] = 0;
        if (c->kv_source[l] != l) continue;
        cap[l] = c->is_sliding[l] ? G3N_MIN(n_ctx, c->sliding_window + n_batch - 1) : n_ctx;
        total += 2 * (size_t)cap[l] * kvd;
    }
    const size_t esz = model_kv_esz(m);
    void *mem = m->be->alloc(m->be, total * esz);
    char *p = mem;
    memset(kv, 0, sizeof(*kv));
    for (int l = 0; l < c->n_layer; l++) {
        if (!cap[l]) continue;
        kv->layer[l].k = p;
        p += (size_t)cap[l] * kvd * esz;
        kv->layer[l].v = p;
        p += (size_t)cap[l] * kvd * esz;
        kv->layer[l].cap = cap[l];
        kv->layer[l].f16 = m->kv_f16;
    }
    return mem;
}

static float *logits_alloc(g3n_model *m, size_t rows) {
    const size_t lb = rows * (size_t)m->cfg.n_vocab * sizeof(float);
    return m->be->host_alloc ? m->be->host_alloc(m->be, lb) : g3n_malloc(lb);
}

static void logits_free(g3n_model *m, float *p) {
    if (m->be->host_free) m->be->host_free(m->be, p);
    else free(p);
}

g3n_session *g3n_session_create(g3n_model *m, int n_ctx, int n_batch, char *err, size_t errlen) {
    const g3n_config *c = &m->cfg;
    if (n_ctx <= 0) n_ctx = G3N_MIN(4096, c->n_ctx_max);
    if (n_batch <= 0) n_batch = strcmp(m->be->name, "cuda") == 0 ? 1024 : 256; /* (g3n.h) */
    if (n_ctx > c->n_ctx_max) {
        g3n_err(err, errlen, "context %d exceeds the model's max_position_embeddings (%d)", n_ctx,
                c->n_ctx_max);
        return NULL;
    }
    if (n_batch > 65536) {
        g3n_err(err, errlen, "batch size %d is too large (at most 65536)", n_batch);
        return NULL;
    }
    n_batch = G3N_MIN(n_batch, n_ctx);
    static uint64_t next_id;
    g3n_session *s = g3n_calloc(1, sizeof(*s));
    s->m = m;
    s->id = __atomic_add_fetch(&next_id, 1, __ATOMIC_RELAXED);
    s->n_ctx = n_ctx;
    s->n_batch = n_batch;
    s->kv_mem = kv_alloc(m, n_ctx, n_batch, &s->kv);
    s->fwd = fwd_scratch_create(m, n_batch, 16);
    s->ids = g3n_malloc((size_t)n_batch * sizeof(int32_t));
    s->posv = g3n_malloc((size_t)n_batch * sizeof(int32_t));
    s->seqv = g3n_calloc((size_t)n_batch, sizeof(int32_t));
    s->logits = logits_alloc(m, 1);
    return s;
}

void g3n_session_free(g3n_session *s) {
    if (!s) return;
    fwd_scratch_free(s->m, s->fwd);
    s->m->be->free(s->m->be, s->kv_mem);
    free(s->ids);
    free(s->posv);
    free(s->seqv);
    logits_free(s->m, s->logits);
    free(s);
}

void g3n_session_reset(g3n_session *s) {
    s->pos = 0;
    s->hi = 0;
    s->have_logits = 0;
    s->logits_on_dev = 0;
}

int g3n_session_pos(const g3n_session *s) { return s->pos; }
int g3n_session_n_ctx(const g3n_session *s) { return s->n_ctx; }
const float *g3n_session_logits(const g3n_session *s) {
    if (!s->have_logits) return NULL;
    if (s->logits_on_dev) { /* a cache filled on first use: logically const */
        g3n_session *w = (g3n_session *)s;
        g3n_backend *be = s->m->be;
        fwd_logits_need(s->m, s->fwd, 0, 0);
        be->read(be, w->logits, fwd_logits(s->fwd), (size_t)s->m->cfg.n_vocab * sizeof(float));
        w->logits_on_dev = 0;
    }
    return s->logits;
}

/* The candidates g3n_session_sample and g3n_batch_decode_sample need: the largest
 * top_need of the samplers, 0 if one needs its whole row or the backend cannot. */
static int top_want(g3n_model *m, g3n_sampler *const *smps, int n) {
    if (!m->be->logits_top) return 0;
    int want = 0;
    for (int i = 0; i < n; i++) {
        const int k = g3n_sampler_top_need(smps[i]);
        if (k == 0 || g3n_sampler_vocab(smps[i]) != g3n_sampler_vocab(smps[0]) ||
            g3n_sampler_vocab(smps[i]) > m->cfg.n_vocab)
            return 0;
        want = G3N_MAX(want, k);
    }
    return want <= G3N_TOP_MAX ? want : 0;
}

int32_t g3n_session_sample(g3n_session *s, g3n_sampler *smp) {
    if (!s->have_logits || g3n_sampler_vocab(smp) > s->m->cfg.n_vocab) return -1;
    g3n_backend *be = s->m->be;
    const int m = top_want(s->m, &smp, 1);
    s->top_m = m, s->top_n = g3n_sampler_vocab(smp);
    if (m > 0 && s->logits_on_dev) {
        float vals[G3N_TOP_MAX];
        int32_t ids[G3N_TOP_MAX];
        uint8_t ok = 0;
        fwd_logits_need(s->m, s->fwd, m, g3n_sampler_vocab(smp));
        if (be->logits_top(be, fwd_logits(s->fwd), 1, 0, g3n_sampler_vocab(smp), m, vals, ids, &ok) && ok) {
            const int32_t t = g3n_sampler_sample_top(smp, vals, ids, m);
            if (t != -2) return t;
        }
    }
    return g3n_sampler_sample(smp, g3n_session_logits(s));
}

/* Position q < pos is still in every cache iff no later position q' < hi with
 * q' = q (mod cap) overwrote it: q >= hi - cap. Truncating to n needs the window
 * before n, positions n - window + 1 .. n - 1, in the sliding rings. */
int g3n_session_truncate(g3n_session *s, int n, char *err, size_t errlen) {
    const g3n_config *c = &s->m->cfg;
    if (n < 0 || n > s->pos)
        return g3n_err(err, errlen, "cannot keep %d positions of a session at position %d", n, s->pos);
    int ring = 0;
    for (int l = 0; l < c->n_layer; l++)
        if (s->kv.layer[l].cap && c->is_sliding[l]) ring = s->kv.layer[l].cap;
    if (n > 0 && n < s->pos && ring && ring < s->n_ctx &&
        G3N_MAX(0, n - c->sliding_window + 1) < s->hi - ring)
        return g3n_err(err, errlen,
                       "positions before %d are no longer in the sliding-window cache (written up to %d, "
                       "ring of %d)", n, s->hi, ring);
    if (n == s->pos) return 0;
    s->pos = n;
    s->have_logits = 0;
    return 0;
}

/* Check that ids are text tokens; name the first that is not. */
static int check_ids(const g3n_config *c, const int32_t *ids, int n, char *err, size_t errlen) {
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= c->n_vocab_ple)
            return g3n_err(err, errlen,
                           "token id %d (position %d) is outside the text vocabulary 0..%d",
                           ids[i], i, c->n_vocab_ple - 1);
    return 0;
}

int g3n_session_eval(g3n_session *s, const int32_t *ids, int n, float *logits_out, char *err,
                     size_t errlen) {
    const g3n_config *c = &s->m->cfg;
    if (n <= 0) return g3n_err(err, errlen, "no tokens to evaluate");
    if (n > s->n_ctx - s->pos)
        return g3n_err(err, errlen, "%d tokens do not fit: context is %d, %d already used", n,
                       s->n_ctx, s->pos);
    if (check_ids(c, ids, n, err, errlen)) return -1;
    g3n_kv *kvs[1] = {&s->kv};
    const size_t V = (size_t)c->n_vocab;
    for (int i0 = 0; i0 < n; i0 += s->n_batch) {
        int nb = G3N_MIN(s->n_batch, n - i0);
        for (int i = 0; i < nb; i++) {
            s->ids[i] = ids[i0 + i];
            s->posv[i] = s->pos + i;
        }
        g3n_batch b = {nb, s->ids, s->posv, s->seqv, kvs, 1};
        int last = i0 + nb == n;
        fwd_set_top(s->fwd, !logits_out && last ? s->top_m : 0, s->top_n);
        if (logits_out) {
            fwd_run(s->m, s->fwd, &b, 0, logits_out + (size_t)i0 * V);
            if (last) memcpy(s->logits, logits_out + (size_t)(n - 1) * V, V * sizeof(float));
        } else {
            fwd_run(s->m, s->fwd, &b, last ? nb - 1 : nb, NULL); /* the last row stays on the device */
        }
        s->logits_on_dev = !logits_out;
        if (!logits_out && last && s->m->be->sync) s->m->be->sync(s->m->be); /* eval returns when done */
        s->pos += nb;
        s->hi = G3N_MAX(s->hi, s->pos);
    }
    s->have_logits = 1;
    return 0;
}

int g3n_session_generate(g3n_session *s, g3n_sampler *smp, int n, g3n_token_fn on_token, void *ud, char *err,
                         size_t errlen) {
    int made = 0;
    while (made < n) {
        const int32_t t = g3n_session_sample(s, smp);
        if (t < 0)
            return g3n_err(err, errlen, s->have_logits ? "every logit is -inf or NaN: no token to pick"
                                                       : "no logits to pick from: evaluate a token first");
        made++;
        if ((on_token && on_token(ud, t)) || made == n || s->pos >= s->n_ctx) break;
        if (g3n_session_eval(s, &t, 1, NULL, err, errlen)) return -1;
    }
    return made;
}

/* ---- batched decode: one token of each of several sessions per step ---------------------- */

/* The step's sequences are named through a fixed table of KV caches, one entry
 * per session seen lately (keyed by session id), so that a recorded step (CUDA
 * graph, keyed by the table) stays valid while membership changes. On a backend
 * that records steps, a row count past 16 is rounded up to a multiple of 8 with
 * padding rows in a private cache, so that a handful of recorded steps covers
 * every n. */
struct g3n_batcher {
    g3n_model *m;
    int cap;            /* most sessions per step */
    int rows;           /* rows of the scratch: bucket(cap) */
    int pad;            /* round n up to a bucket (backend records steps): 0 no, else bucket's policy */
    fwd_scratch *fwd;
    int32_t *ids, *pos, *seq; /* [rows] */
    g3n_kv **kv;        /* [cap + BATCH_PAD_MAX]: cap session caches, then one entry per padding row */
    uint64_t *kv_sid;   /* [cap] session id per entry, 0 = free */
    uint64_t *kv_used;  /* [cap] step counter of last use */
    uint64_t step;
    g3n_kv pad_kv;      /* padding rows: position 0 of a private cache (each row its own entry) */
    void *pad_mem;
    float *logits;      /* [rows, n_vocab] host */
    float *top_vals;    /* [cap, G3N_TOP_MAX] g3n_batch_decode_sample's candidates */
    int32_t *top_ids;
    uint8_t *top_ok;    /* [cap] */
};

/* Rows a step of n sessions runs: n, or on recording backends n up to 16 and
 * then multiples of 8 (at most BATCH_PAD_MAX padding rows). G3N_BUCKETS (for
 * timing) up to 8 rows: 1 the next of 1, 2, 4, 8 (before the thirty-first
 * session), 2 the next of 1, 2, 3, 4, 6, 8, 3 and 4 every n; past 8: 1-3 the
 * next multiple of 8 (the thirty-first session's), 4 the next multiple of 4;
 * 5 (the default) as described first. Steps of every n up to 8 were
 * the fastest on the H200 (5 streams +16-29% against powers of two, 7 streams
 * +5-7%), and of every n up to 16 (E4B 4-bit 9-12 streams +14-33% against
 * multiples of 8, bf16 +1-4%; docs/SPEED.md), at up to 16 recorded steps a
 * context bucket. */
#define BATCH_PAD_MAX 7
static int bucket(const g3n_batcher *bt, int n) {
    if (!bt->pad) return n;
    if (bt->pad == 4 && n > 8) return (n + 3) / 4 * 4;
    if (bt->pad == 5 && n <= 16) return n;
    if (n > 8) return (n + 7) / 8 * 8;
    if (bt->pad >= 3) return n;
    if (bt->pad == 2 && n <= 4) return n;
    int b = 1;
    while (b < n) b *= 2;
    return bt->pad == 2 && n <= 6 ? 6 : b;
}

g3n_batcher *g3n_batcher_create(g3n_model *m, int max_seqs, char *err, size_t errlen) {
    if (max_seqs < 1 || max_seqs > 1024) {
        g3n_err(err, errlen, "batcher: %d sequences per step is out of range (1..1024)", max_seqs);
        return NULL;
    }
    g3n_batcher *bt = g3n_calloc(1, sizeof(*bt));
    bt->m = m;
    bt->cap = max_seqs;
    const char *bk = getenv("G3N_BUCKETS");
    bt->pad = m->be->graph_begin == NULL ? 0 : bk ? G3N_MIN(G3N_MAX(atoi(bk), 1), 5) : 5;
    bt->rows = bucket(bt, max_seqs);
    bt->fwd = fwd_scratch_create(m, bt->rows, bt->rows);
    bt->ids = g3n_calloc((size_t)bt->rows, sizeof(int32_t));
    bt->pos = g3n_calloc((size_t)bt->rows, sizeof(int32_t));
    bt->seq = g3n_calloc((size_t)bt->rows, sizeof(int32_t));
    bt->kv = g3n_calloc((size_t)max_seqs + BATCH_PAD_MAX, sizeof(g3n_kv *));
    bt->kv_sid = g3n_calloc((size_t)max_seqs, sizeof(uint64_t));
    bt->kv_used = g3n_calloc((size_t)max_seqs, sizeof(uint64_t));
    bt->pad_mem = kv_alloc(m, bt->rows, bt->rows, &bt->pad_kv);
    for (int i = 0; i < max_seqs + BATCH_PAD_MAX; i++) bt->kv[i] = &bt->pad_kv;
    bt->logits = logits_alloc(m, (size_t)bt->rows);
    bt->top_vals = g3n_malloc(sizeof(float) * (size_t)max_seqs * G3N_TOP_MAX);
    bt->top_ids = g3n_malloc(sizeof(int32_t) * (size_t)max_seqs * G3N_TOP_MAX);
    bt->top_ok = g3n_calloc((size_t)max_seqs, 1);
    return bt;
}

void g3n_batcher_free(g3n_batcher *bt) {
    if (!bt) return;
    fwd_scratch_free(bt->m, bt->fwd);
    bt->m->be->free(bt->m->be, bt->pad_mem);
    logits_free(bt->m, bt->logits);
    free(bt->top_vals), free(bt->top_ids), free(bt->top_ok);
    free(bt->ids);
    free(bt->pos);
    free(bt->seq);
    free(bt->kv);
    free(bt->kv_sid);
    free(bt->kv_used);
    free(bt);
}

/* Table entry of session s: its own if it has one, else a free one, else the
 * least recently used one that this step does not use. */
static int kv_entry(g3n_batcher *bt, g3n_session *s) {
    int best = -1;
    for (int i = 0; i < bt->cap; i++) {
        if (bt->kv_sid[i] == s->id) {
            best = i;
            break;
        }
        if (bt->kv_used[i] == bt->step) continue; /* taken by this step */
        if (best < 0 || bt->kv_used[i] < bt->kv_used[best]) best = i;
    }
    G3N_ASSERT(best >= 0);
    bt->kv_sid[best] = s->id;
    bt->kv[best] = &s->kv;
    bt->kv_used[best] = bt->step;
    return best;
}

/* The step of g3n_batch_decode: check, run; the logits of rows 0..n-1 stay in
 * bt->fwd's backend memory (row i for ss[i]). */
static int batch_step(g3n_batcher *bt, g3n_session **ss, const int32_t *ids, int n, char *err, size_t errlen) {
    const g3n_config *c = &bt->m->cfg;
    if (n < 1 || n > bt->cap)
        return g3n_err(err, errlen, "batch decode of %d sessions (this batcher takes 1..%d)", n, bt->cap);
    for (int i = 0; i < n; i++) {
        g3n_session *s = ss[i];
        if (!s || s->m != bt->m)
            return g3n_err(err, errlen, "batch decode: session %d is missing or of another model", i);
        if (s->pos >= s->n_ctx)
            return g3n_err(err, errlen, "batch decode: session %d is full (context %d)", i, s->n_ctx);
        for (int j = 0; j < i; j++)
            if (ss[j] == s) return g3n_err(err, errlen, "batch decode: session %d appears twice", i);
        if (check_ids(c, ids + i, 1, err, errlen)) return -1;
    }
    bt->step++;
    for (int i = 0; i < n; i++) {
        bt->ids[i] = ids[i];
        bt->pos[i] = ss[i]->pos;
        bt->seq[i] = kv_entry(bt, ss[i]);
    }
    const int nr = bucket(bt, n);
    /* padding rows: each a sequence of its own (a step of one token per
     * sequence is a decode step: with two padding rows in one sequence, steps
     * of 5, 6 and 9-14 sessions ran as prompts, 30-50% slower), all at
     * position 0 of the padding cache, where they write the same K/V */
    G3N_ASSERT(nr - n <= BATCH_PAD_MAX);
    for (int i = n; i < nr; i++) {
        bt->ids[i] = ids[0];
        bt->pos[i] = 0;
        bt->seq[i] = bt->cap + (i - n);
    }
    g3n_batch b = {nr, bt->ids, bt->pos, bt->seq, bt->kv, bt->cap + BATCH_PAD_MAX};
    fwd_run(bt->m, bt->fwd, &b, 0, NULL);
    for (int i = 0; i < n; i++) {
        g3n_session *s = ss[i];
        s->have_logits = 0;
        s->logits_on_dev = 0;
        s->pos++;
        s->hi = G3N_MAX(s->hi, s->pos);
    }
    return 0;
}

/* Row i of the last batched step into session ss's host logits. */
static void batch_row(g3n_batcher *bt, g3n_session *s, int i) {
    const size_t V = (size_t)bt->m->cfg.n_vocab;
    bt->m->be->read(bt->m->be, s->logits, fwd_logits(bt->fwd) + (size_t)i * V, V * sizeof(float));
    s->have_logits = 1;
}

int g3n_batch_decode(g3n_batcher *bt, g3n_session **ss, const int32_t *ids, int n,
                     float *logits_out, char *err, size_t errlen) {
    fwd_set_top(bt->fwd, 0, 0); /* every row read whole */
    if (batch_step(bt, ss, ids, n, err, errlen)) return -1;
    const size_t V = (size_t)bt->m->cfg.n_vocab;
    g3n_backend *be = bt->m->be;
    be->read(be, bt->logits, fwd_logits(bt->fwd), (size_t)n * V * sizeof(float)); /* the real rows only */
    for (int i = 0; i < n; i++) {
        memcpy(ss[i]->logits, bt->logits + (size_t)i * V, V * sizeof(float));
        if (logits_out) memcpy(logits_out + (size_t)i * V, ss[i]->logits, V * sizeof(float));
        ss[i]->have_logits = 1;
    }
    return 0;
}

int g3n_batch_decode_sample(g3n_batcher *bt, g3n_session **ss, const int32_t *ids, int n, g3n_sampler **smps,
                            int32_t *out, char *err, size_t errlen) {
    const size_t V = (size_t)bt->m->cfg.n_vocab;
    if (n < 1 || n > bt->cap)
        return g3n_err(err, errlen, "batch decode of %d sessions (this batcher takes 1..%d)", n, bt->cap);
    for (int i = 0; i < n; i++) {
        if (!smps || !smps[i]) return g3n_err(err, errlen, "batch decode: sampler %d is missing", i);
        if ((size_t)g3n_sampler_vocab(smps[i]) > V)
            return g3n_err(err, errlen, "batch decode: sampler %d covers %d tokens, the model's logits %zu", i,
                           g3n_sampler_vocab(smps[i]), V);
    }
    /* the step may read only what the samplers' best m need (fwd_set_top, as
     * g3n_session_eval); a step of one session queues them with the step, the
     * rows of several are collected here after it */
    const int m = top_want(bt->m, smps, n);
    fwd_set_top(bt->fwd, m, m ? g3n_sampler_vocab(smps[0]) : 0);
    if (batch_step(bt, ss, ids, n, err, errlen)) return -1;
    g3n_backend *be = bt->m->be;
    float *vals = bt->top_vals;
    int32_t *cids = bt->top_ids;
    uint8_t *ok = bt->top_ok;
    memset(ok, 0, (size_t)n);
    if (m > 0 && !be->logits_top(be, fwd_logits(bt->fwd), n, V, g3n_sampler_vocab(smps[0]), m, vals, cids, ok))
        memset(ok, 0, (size_t)n);
    for (int i = 0; i < n; i++) {
        int32_t t = -2;
        if (ok[i]) { /* the sampler's own count of the row's best m (a sorted prefix) */
            const int k = g3n_sampler_top_need(smps[i]);
            t = g3n_sampler_sample_top(smps[i], vals + (size_t)i * m, cids + (size_t)i * m, k);
        }
        if (t == -2) {
            fwd_logits_need(bt->m, bt->fwd, 0, 0);
            batch_row(bt, ss[i], i);
            t = g3n_sampler_sample(smps[i], ss[i]->logits);
        }
        out[i] = t;
    }
    return 0;
}

/* ---- decode path: split, fused or mega, chosen by measurement ------------------------- */

/* Seconds per decode step on `path`: the best of a few recorded steps after warm-up. */
static double time_decode(g3n_model *m, int path) {
    char err[256];
    int old = m->fused;
    m->fused = path;
    g3n_session *s = g3n_session_create(m, 64, 1, err, sizeof err);
    double best = 1e30;
    if (s) {
        int32_t tok = m->cfg.bos_id >= 0 ? m->cfg.bos_id : 0;
        for (int i = 0; i < 24; i++) {
            double t0 = g3n_time_s();
            if (g3n_session_eval(s, &tok, 1, NULL, err, sizeof err) != 0) break;
            double dt = g3n_time_s() - t0;
            if (i >= 4 && dt < best) best = dt; /* 4 warm-up steps (recording) */
        }
        g3n_session_free(s);
    }
    m->fused = old;
    return best;
}

static char *cache_path(void) {
    const char *x = getenv("XDG_CACHE_HOME"), *h = getenv("HOME");
    char buf[1024];
    if (x && *x) snprintf(buf, sizeof buf, "%s/g3n", x);
    else if (h && *h) snprintf(buf, sizeof buf, "%s/.cache/g3n", h);
    else return NULL;
    return g3n_strdup(buf);
}

void model_warm_up(g3n_model *m) {
    const char *e = getenv("G3N_WARMUP");
    if (!m->be->graph_begin || (e && !atoi(e))) return;
    char err[256];
    g3n_session *s = g3n_session_create(m, 64, 16, err, sizeof err);
    if (!s) return;
    int32_t ids[12]; /* more than 8 rows: the prompt products' path */
    for (int i = 0; i < 12; i++) ids[i] = (i * 7919 + 3) % m->cfg.n_vocab_ple;
    if (g3n_session_eval(s, ids, 12, NULL, err, sizeof err) == 0)
        for (int i = 0; i < 2; i++)
            if (g3n_session_eval(s, ids + i, 1, NULL, err, sizeof err) != 0) break;
    g3n_session_free(s);
}

/* The running program's file (size and modification time): part of the
 * decode-path cache's key, so that a rebuilt or upgraded g3n (other kernels)
 * measures again instead of keeping an older build's choice. */
static void build_id(char *out, size_t n) {
    struct stat st;
    if (stat("/proc/self/exe", &st) == 0)
        snprintf(out, n, "b%lld.%lld", (long long)st.st_size, (long long)st.st_mtime);
    else
        snprintf(out, n, "b?");
}

void decode_path_choose(g3n_model *m, const char *want) {
    char *why = m->path_why;
    int off = 0;
    const int asked = want ? fwd_path_parse_hints(want, &off) : -1;
    if (asked == FWD_MEGA && !m->mega_ok) {
        m->fused = FWD_FUSED;
        snprintf(why, sizeof m->path_why, "mega asked for, but the backend does not take this model whole%s: fused",
                 m->kv_f16 ? " (the mega path reads f32 K/V caches only)" : "");
        return;
    }
    if (asked >= 0) { /* fused-nol2 only when asked for: auto keeps the L2 hints (docs/ARCHITECTURE.md) */
        m->fused = asked;
        m->no_l2_hints = off;
        snprintf(why, sizeof m->path_why, "asked for");
        return;
    }
    if (!m->be->graph_begin) { /* CPU: the fused ops are the split ops in sequence */
        m->fused = m->sparse ? FWD_FUSED : FWD_SPLIT;
        snprintf(why, sizeof m->path_why, "%s", m->sparse ? "exact sparsity is an op of the fused path"
                                                         : "the CPU backend runs the fused ops as the split ones");
        return;
    }
    /* auto on a GPU: cached measurement for this device and model shape, else measure */
    char key[512];
    const g3n_config *c = &m->cfg;
    const g3n_mat *gp = &m->w.layers[0].gate_proj, *dp = &m->w.layers[c->n_layer - 1].down_proj;
    char bid[64];
    build_id(bid, sizeof bid);
    snprintf(key, sizeof key, "%s|L%d|D%d|I%d|V%d|dt%d|q%d.%d.%d|sp%d|kv%d|paths%d|%s", m->be->device_name,
             c->n_layer, c->n_embd, c->n_ff[0], c->n_vocab, gp->dtype, gp->bits, gp->group_size, dp->bits, m->sparse,
             m->kv_f16 ? 16 : 32, m->mega_ok ? 3 : 2, bid);
    for (char *p = key; *p; p++)
        if (*p == ' ' || *p == '\n') *p = '_';
    char *dir = cache_path(), file[1100] = "";
    if (dir) {
        snprintf(file, sizeof file, "%s/decode-path", dir);
        FILE *f = fopen(file, "r");
        char line[700];
        while (f && fgets(line, sizeof line, f)) {
            char k[600], v[32];
            if (sscanf(line, "%599s %31s", k, v) == 2 && strcmp(k, key) == 0 && fwd_path_parse(v) >= 0) {
                m->fused = fwd_path_parse(v);
                snprintf(why, sizeof m->path_why, "measured earlier on this device (%.200s)", file);
                fclose(f);
                free(dir);
                return;
            }
        }
        if (f) fclose(f);
    }
    const int n = m->mega_ok ? 3 : 2;
    double t[3];
    m->fused = FWD_SPLIT;
    for (int p = 0; p < n; p++) {
        t[p] = time_decode(m, p);
        if (t[p] <= t[m->fused]) m->fused = p; /* ties: the later (fewer launches) */
    }
    if (n == 3)
        snprintf(why, sizeof m->path_why, "measured at load: split %.3f, fused %.3f, mega %.3f ms per step",
                 t[0] * 1e3, t[1] * 1e3, t[2] * 1e3);
    else
        snprintf(why, sizeof m->path_why, "measured at load: split %.3f, fused %.3f ms per step", t[0] * 1e3,
                 t[1] * 1e3);
    if (dir) {
        char cmd[1200];
        snprintf(cmd, sizeof cmd, "%s", dir);
        /* mkdir -p of the cache directory, one level at a time */
        for (char *p = cmd + 1; *p; p++)
            if (*p == '/') {
                *p = 0;
                mkdir(cmd, 0755);
                *p = '/';
            }
        mkdir(cmd, 0755);
        FILE *f = fopen(file, "a");
        if (f) {
            fprintf(f, "%s %s\n", key, fwd_path_name(m->fused));
            fclose(f);
        }
        free(dir);
    }
}

int g3n_model_set_decode_path(g3n_model *m, const char *path) {
    int off;
    const int p = fwd_path_parse_hints(path, &off);
    if (p < 0 || (p == FWD_MEGA && !m->mega_ok)) return -1;
    m->fused = p;
    m->no_l2_hints = off;
    return 0;
}
