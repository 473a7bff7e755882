/* sched.c: the engine of `g3n serve`: one thread that owns the model's slots (one
 * g3n_session each) and runs continuous batching. Each iteration:
 *   1. admit queued requests into free slots (the free slot whose cached tokens
 *      share the longest prefix with the prompt; that prefix is kept),
 *   2. free the slots of cancelled requests (client gone),
 *   3. evaluate one prompt chunk (n_batch tokens) of one prefilling slot, so a
 *      long prompt delays the running streams by one chunk per step at most,
 *   4. one g3n_batch_decode_sample step over every decoding slot (each slot's
 *      sampler picks its next token; on a GPU from the device's candidates).
 * Text goes to the request through the streaming detokenizer and the stop-string
 * filter (text that may still become a stop string is held back). */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "server/server.h"

/* ---- requests --------------------------------------------------------------------------- */

static void *xrealloc(void *p, size_t n) {
    p = realloc(p, n ? n : 1);
    if (!p) {
        fprintf(stderr, "g3n serve: out of memory\n");
        abort();
    }
    return p;
}

srv_req *req_new(void) {
    srv_req *r = xrealloc(NULL, sizeof(*r));
    memset(r, 0, sizeof(*r));
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    r->refs = 1;
    r->max_tokens = -1;
    return r;
}

void req_unref(srv_req *r) {
    if (!r) return;
    pthread_mutex_lock(&r->mu);
    int left = --r->refs;
    pthread_mutex_unlock(&r->mu);
    if (left) return;
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    for (int i = 0; i < r->n_stop; i++) free(r->stop[i]);
    free(r->prompt);
    free(r->text);
    free(r);
}

char *req_take_text(srv_req *r, size_t *n) {
    char *t = xrealloc(NULL, r->n_text + 1);
    memcpy(t, r->text ? r->text : "", r->n_text);
    t[r->n_text] = 0;
    *n = r->n_text;
    r->n_text = 0;
    return t;
}

static void req_append(srv_req *r, const char *s, size_t n) {
    if (r->n_text + n + 1 > r->cap_text) {
        r->cap_text = (r->n_text + n + 1) * 2;
        r->text = xrealloc(r->text, r->cap_text);
    }
    memcpy(r->text + r->n_text, s, n);
    r->n_text += n;
}

/* ---- slots ---------------------------------------------------------------------------------- */

enum { SLOT_FREE, SLOT_PREFILL, SLOT_DECODE };

typedef struct {
    int state;
    srv_req *r;
    g3n_session *s;
    g3n_sampler *smp;
    int32_t *cached;   /* [n_ctx] ids whose K/V the session holds, in order */
    int n_cached;
    int32_t next;      /* decode: the token to feed */
    g3n_detok dt;
    char *hold;        /* text not yet released: may be the start of a stop string */
    size_t n_hold, cap_hold;
    uint64_t last_used;
} slot;

struct sched {
    g3n_model *m;
    g3n_tokenizer *tk;
    srv_config cfg;
    int n_vocab, n_vocab_text;
    int32_t stop_ids[3];
    int n_stop_ids;
    slot *slots;
    g3n_batcher *bt;
    g3n_session **bss;  /* [parallel] step arguments */
    int32_t *bids;
    int *bslot;
    g3n_sampler **bsmp; /* the slots' samplers, and the tokens they pick */
    int32_t *bout;
    int prefill_rr;     /* round robin over prefilling slots */
    uint64_t tick;

    pthread_t thread;
    pthread_mutex_t mu; /* guards everything below */
    pthread_cond_t cv;
    int quit;
    srv_req **queue;    /* FIFO of parallel + queue: admitted at the next step */
    int q_head, q_len, q_cap;
    int busy;           /* slots not free */
    long long served, tokens;
};

static int lcp(const int32_t *a, int na, const int32_t *b, int nb) {
    int i = 0;
    while (i < na && i < nb && a[i] == b[i]) i++;
    return i;
}

static int req_cancelled(srv_req *r) {
    pthread_mutex_lock(&r->mu);
    int c = r->cancelled;
    pthread_mutex_unlock(&r->mu);
    return c;
}

/* Finish the request of slot sl: release the text held back (nothing can
 * complete a stop string now; after a matched one there is none and the rest is
 * dropped), mark it done,
 * free the slot (its session and cached ids stay for prefix reuse). */
static void slot_finish(sched *S, slot *sl, const char *why, int stop_matched) {
    srv_req *r = sl->r;
    char buf[64];
    size_t k = stop_matched ? 0 : g3n_detok_flush(S->tk, &sl->dt, buf, sizeof buf);
    pthread_mutex_lock(&S->mu); /* before done: a client that saw its answer sees the slot free */
    S->busy--;
    S->served++;
    pthread_mutex_unlock(&S->mu);
    pthread_mutex_lock(&r->mu);
    req_append(r, sl->hold, sl->n_hold);
    req_append(r, buf, k);
    r->done = 1;
    r->finish = why;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
    req_unref(r);
    g3n_sampler_free(sl->smp);
    sl->smp = NULL;
    sl->r = NULL;
    sl->state = SLOT_FREE;
    sl->n_hold = 0;
    sl->last_used = ++S->tick;
}

/* New text for sl's request: release all of it except a tail that could still
 * grow into a stop string; a complete stop string ends the request (it and what
 * follows are not sent). Returns 1 when a stop string matched. */
static int slot_text(sched *S, slot *sl, const char *t, size_t n) {
    srv_req *r = sl->r;
    if (sl->n_hold + n + 1 > sl->cap_hold) {
        sl->cap_hold = (sl->n_hold + n + 1) * 2;
        sl->hold = xrealloc(sl->hold, sl->cap_hold);
    }
    memcpy(sl->hold + sl->n_hold, t, n);
    sl->n_hold += n;
    size_t release = sl->n_hold, keep_from = sl->n_hold;
    int matched = 0;
    for (int i = 0; i < r->n_stop; i++) {
        const char *st = r->stop[i];
        size_t ls = strlen(st);
        char *at = memmem(sl->hold, sl->n_hold, st, ls);
        if (at && (size_t)(at - sl->hold) < release) {
            release = (size_t)(at - sl->hold);
            matched = 1;
        }
        /* the longest tail of hold that is a proper prefix of st */
        for (size_t k = ls - 1 < sl->n_hold ? ls - 1 : sl->n_hold; k > 0; k--)
            if (memcmp(sl->hold + sl->n_hold - k, st, k) == 0) {
                if (sl->n_hold - k < keep_from) keep_from = sl->n_hold - k;
                break;
            }
    }
    if (!matched) release = keep_from;
    if (release) {
        pthread_mutex_lock(&r->mu);
        req_append(r, sl->hold, release);
        pthread_cond_broadcast(&r->cv);
        pthread_mutex_unlock(&r->mu);
        memmove(sl->hold, sl->hold + release, sl->n_hold - release);
        sl->n_hold -= release;
    }
    if (matched) sl->n_hold = 0;
    return matched;
}

/* A token was sampled for sl from its session's last logits: send its text,
 * then either finish the request or queue the token for the next decode step. */
static void slot_token(sched *S, slot *sl, int32_t tok) {
    srv_req *r = sl->r;
    if (tok < 0) {
        fprintf(stderr, "g3n serve: every logit is -inf or NaN; ending the request\n");
        slot_finish(S, sl, "stop", 0);
        return;
    }
    pthread_mutex_lock(&r->mu);
    r->n_gen++;
    pthread_mutex_unlock(&r->mu);
    pthread_mutex_lock(&S->mu);
    S->tokens++;
    pthread_mutex_unlock(&S->mu);
    for (int i = 0; i < S->n_stop_ids && !r->ignore_eos; i++)
        if (tok == S->stop_ids[i]) {
            slot_finish(S, sl, "stop", 0);
            return;
        }
    g3n_sampler_accept(sl->smp, tok);
    char buf[160];
    size_t k = g3n_detok_push(S->tk, &sl->dt, tok, 1, buf, sizeof buf);
    if (k && slot_text(S, sl, buf, k)) {
        slot_finish(S, sl, "stop", 1);
        return;
    }
    if ((r->max_tokens >= 0 && r->n_gen >= r->max_tokens) ||
        g3n_session_pos(sl->s) >= g3n_session_n_ctx(sl->s)) {
        slot_finish(S, sl, "length", 0);
        return;
    }
    sl->next = tok;
    sl->state = SLOT_DECODE;
}

/* Bind r to the free slot whose cache shares the longest prefix with its prompt. */
static void slot_admit(sched *S, srv_req *r) {
    int best = -1, best_l = -1;
    for (int i = 0; i < S->cfg.parallel; i++) {
        slot *sl = &S->slots[i];
        if (sl->state != SLOT_FREE) continue;
        int l = lcp(sl->cached, sl->n_cached, r->prompt, r->n_prompt);
        if (l > best_l || (l == best_l && sl->last_used < S->slots[best].last_used)) {
            best = i;
            best_l = l;
        }
    }
    slot *sl = &S->slots[best];
    char err[256];
    /* keep at least one prompt token to evaluate: its logits give the first token */
    int keep = best_l < r->n_prompt ? best_l : r->n_prompt - 1;
    if (g3n_session_truncate(sl->s, keep, err, sizeof err) != 0) {
        keep = 0;
        g3n_session_reset(sl->s);
    }
    sl->n_cached = keep;
    r->n_cached = keep;
    sl->r = r;
    sl->smp = g3n_sampler_create(&r->sp, S->n_vocab_text, err, sizeof err);
    if (!sl->smp) { /* parameters were checked by the HTTP side */
        fprintf(stderr, "g3n serve: %s\n", err);
        abort();
    }
    memset(&sl->dt, 0, sizeof sl->dt);
    sl->n_hold = 0;
    sl->state = SLOT_PREFILL;
}

/* One prompt chunk of the next prefilling slot (round robin). */
static void prefill_step(sched *S) {
    const int P = S->cfg.parallel;
    for (int k = 0; k < P; k++) {
        int i = (S->prefill_rr + k) % P;
        slot *sl = &S->slots[i];
        if (sl->state != SLOT_PREFILL) continue;
        S->prefill_rr = (i + 1) % P;
        srv_req *r = sl->r;
        int n = r->n_prompt - sl->n_cached;
        if (n > S->cfg.n_batch) n = S->cfg.n_batch;
        char err[256];
        if (g3n_session_eval(sl->s, r->prompt + sl->n_cached, n, NULL, err, sizeof err) != 0) {
            fprintf(stderr, "g3n serve: %s\n", err); /* checked before submit: not expected */
            slot_finish(S, sl, "stop", 0);
            return;
        }
        memcpy(sl->cached + sl->n_cached, r->prompt + sl->n_cached, sizeof(int32_t) * (size_t)n);
        sl->n_cached += n;
        if (sl->n_cached == r->n_prompt)
            slot_token(S, sl, g3n_session_sample(sl->s, sl->smp));
        return;
    }
}

static void decode_step(sched *S) {
    int n = 0;
    for (int i = 0; i < S->cfg.parallel; i++) {
        slot *sl = &S->slots[i];
        if (sl->state != SLOT_DECODE) continue;
        S->bss[n] = sl->s;
        S->bids[n] = sl->next;
        S->bsmp[n] = sl->smp;
        S->bslot[n++] = i;
    }
    if (!n) return;
    char err[256];
    if (g3n_batch_decode_sample(S->bt, S->bss, S->bids, n, S->bsmp, S->bout, err, sizeof err) != 0) {
        fprintf(stderr, "g3n serve: %s\n", err);
        abort(); /* every argument is the engine's own: a broken invariant */
    }
    for (int k = 0; k < n; k++) {
        slot *sl = &S->slots[S->bslot[k]];
        sl->cached[sl->n_cached++] = S->bids[k];
        slot_token(S, sl, S->bout[k]);
    }
}

static void *engine_main(void *arg) {
    sched *S = arg;
    for (;;) {
        pthread_mutex_lock(&S->mu);
        while (!S->quit && S->q_len == 0 && S->busy == 0) pthread_cond_wait(&S->cv, &S->mu);
        if (S->quit) {
            pthread_mutex_unlock(&S->mu);
            break;
        }
        /* admit: cancelled requests in the queue are dropped */
        while (S->q_len > 0 && (S->busy < S->cfg.parallel || req_cancelled(S->queue[S->q_head]))) {
            srv_req *r = S->queue[S->q_head];
            S->q_head = (S->q_head + 1) % S->q_cap;
            S->q_len--;
            if (req_cancelled(r)) {
                req_unref(r);
                continue;
            }
            S->busy++;
            slot_admit(S, r);
        }
        pthread_mutex_unlock(&S->mu);
        for (int i = 0; i < S->cfg.parallel; i++) {
            slot *sl = &S->slots[i];
            if (sl->state == SLOT_FREE) continue;
            if (req_cancelled(sl->r)) slot_finish(S, sl, "length", 0);
        }
        prefill_step(S);
        decode_step(S);
        if (S->cfg.step_delay_ms > 0) {
            struct timespec ts = {S->cfg.step_delay_ms / 1000, (long)(S->cfg.step_delay_ms % 1000) * 1000000L};
            nanosleep(&ts, NULL);
        }
    }
    return NULL;
}

/* ---- public -------------------------------------------------------------------------------- */

sched *sched_start(g3n_model *m, g3n_tokenizer *tk, const srv_config *cfg, char *err, size_t errlen) {
    sched *S = xrealloc(NULL, sizeof(*S));
    memset(S, 0, sizeof(*S));
    S->m = m;
    S->tk = tk;
    S->cfg = *cfg;
    pthread_mutex_init(&S->mu, NULL);
    pthread_cond_init(&S->cv, NULL);
    g3n_model_info mi = g3n_model_get_info(m);
    S->n_vocab = mi.n_vocab;
    S->n_vocab_text = mi.n_vocab_text;
    int32_t c[3] = {mi.eos_id, g3n_tokenizer_find(tk, "<eos>"), g3n_tokenizer_find(tk, "<end_of_turn>")};
    for (int i = 0; i < 3; i++)
        if (c[i] >= 0) S->stop_ids[S->n_stop_ids++] = c[i];
    const int P = cfg->parallel;
    S->slots = xrealloc(NULL, sizeof(slot) * (size_t)P);
    memset(S->slots, 0, sizeof(slot) * (size_t)P);
    for (int i = 0; i < P; i++) {
        S->slots[i].s = g3n_session_create(m, cfg->n_ctx, cfg->n_batch, err, errlen);
        if (!S->slots[i].s) {
            S->cfg.parallel = i;
            sched_stop(S);
            return NULL;
        }
        S->slots[i].cached = xrealloc(NULL, sizeof(int32_t) * (size_t)g3n_session_n_ctx(S->slots[i].s));
    }
    S->bt = g3n_batcher_create(m, P, err, errlen);
    S->bss = xrealloc(NULL, sizeof(g3n_session *) * (size_t)P);
    S->bids = xrealloc(NULL, sizeof(int32_t) * (size_t)P);
    S->bslot = xrealloc(NULL, sizeof(int) * (size_t)P);
    S->bsmp = xrealloc(NULL, sizeof(g3n_sampler *) * (size_t)P);
    S->bout = xrealloc(NULL, sizeof(int32_t) * (size_t)P);
    S->q_cap = P + cfg->queue;
    S->queue = xrealloc(NULL, sizeof(srv_req *) * (size_t)S->q_cap);
    if (!S->bt || pthread_create(&S->thread, NULL, engine_main, S) != 0) {
        if (S->bt) snprintf(err, errlen, "cannot start the engine thread");
        g3n_batcher_free(S->bt);
        S->bt = NULL;
        sched_stop(S);
        return NULL;
    }
    return S;
}

void sched_stop(sched *S) {
    if (!S) return;
    if (S->bt) {
        pthread_mutex_lock(&S->mu);
        S->quit = 1;
        pthread_cond_signal(&S->cv);
        pthread_mutex_unlock(&S->mu);
        pthread_join(S->thread, NULL);
    }
    for (int i = 0; i < S->cfg.parallel; i++) {
        slot *sl = &S->slots[i];
        if (sl->r) slot_finish(S, sl, "length", 0);
        g3n_session_free(sl->s);
        free(sl->cached);
        free(sl->hold);
    }
    while (S->q_len > 0) {
        req_unref(S->queue[S->q_head]);
        S->q_head = (S->q_head + 1) % S->q_cap;
        S->q_len--;
    }
    pthread_mutex_destroy(&S->mu);
    pthread_cond_destroy(&S->cv);
    g3n_batcher_free(S->bt);
    free(S->slots);
    free(S->bss);
    free(S->bids);
    free(S->bslot);
    free(S->bsmp);
    free(S->bout);
    free(S->queue);
    free(S);
}

int sched_submit(sched *S, srv_req *r) {
    pthread_mutex_lock(&S->mu);
    /* at most parallel running and queue waiting */
    if (S->busy + S->q_len >= S->q_cap) {
        pthread_mutex_unlock(&S->mu);
        return -1;
    }
    pthread_mutex_lock(&r->mu);
    r->refs++;
    pthread_mutex_unlock(&r->mu);
    S->queue[(S->q_head + S->q_len) % S->q_cap] = r;
    S->q_len++;
    pthread_cond_signal(&S->cv);
    pthread_mutex_unlock(&S->mu);
    return 0;
}

void sched_cancel(sched *S, srv_req *r) {
    pthread_mutex_lock(&r->mu);
    r->cancelled = 1;
    pthread_mutex_unlock(&r->mu);
    pthread_mutex_lock(&S->mu);
    pthread_cond_signal(&S->cv);
    pthread_mutex_unlock(&S->mu);
}

sched_stats sched_get_stats(sched *S) {
    pthread_mutex_lock(&S->mu);
    sched_stats st = {S->cfg.parallel, S->busy, S->q_len, S->served, S->tokens};
    pthread_mutex_unlock(&S->mu);
    return st;
}
