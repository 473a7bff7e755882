/* server.h: what the two halves of `g3n serve` share. server.c is the HTTP side
 * (libmicrohttpd threads: parse, validate, tokenize, stream out); sched.c is the
 * engine (one thread owns the model, the slots and the batcher, and runs the
 * continuous-batching loop). They meet in srv_req: the HTTP side fills its input
 * and submits it; the engine appends text to its output under req->mu and
 * signals req->cv. Program code over g3n.h only; not part of the library. */
#ifndef G3N_SERVER_H
#define G3N_SERVER_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "g3n.h"

#define SRV_MAX_STOP 4

typedef struct {
    const char *host;
    int port;
    int parallel;        /* slots: sequences decoded together */
    int n_ctx;           /* context per slot */
    int n_batch;         /* prompt tokens per engine step (one chunk) */
    int queue;           /* requests that may wait for a slot; beyond: 503 */
    const char *api_key; /* NULL: no authentication */
    const char *model_name;
    size_t max_body;     /* bytes; beyond: 413 */
    int timeout_s;       /* idle connection timeout */
    int max_conn;        /* concurrent connections */
    int step_delay_ms;   /* testing: sleep per engine step */
} srv_config;

typedef struct srv_req srv_req;
struct srv_req {
    /* input: set before sched_submit, read-only afterwards */
    int32_t *prompt;
    int n_prompt;
    int max_tokens;             /* -1: until the context ends */
    g3n_sampler_params sp;
    char *stop[SRV_MAX_STOP];   /* stop strings (heap) */
    int n_stop;
    int ignore_eos;

    /* output: guarded by mu */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    char *text;                 /* produced text not yet taken by the HTTP side */
    size_t n_text, cap_text;
    int done;
    const char *finish;         /* "stop" or "length" once done */
    int n_gen;                  /* completion tokens */
    int n_cached;               /* prompt tokens reused from a slot's cache */
    int cancelled;              /* set by the HTTP side: the client went away */
    int refs;                   /* HTTP side + engine; freed at 0 */
};

srv_req *req_new(void);
/* Drop one reference; frees the request at the last. */
void req_unref(srv_req *r);
/* Take (and clear) the text produced so far into a heap string the caller frees;
 * call with r->mu held. */
char *req_take_text(srv_req *r, size_t *n);

typedef struct sched sched;
typedef struct {
    int slots, slots_busy, queued;
    long long served, tokens_generated;
} sched_stats;

/* The engine: n slots of n_ctx positions over model m, and its thread. */
sched *sched_start(g3n_model *m, g3n_tokenizer *tk, const srv_config *cfg, char *err, size_t errlen);
void sched_stop(sched *s);
/* Queue r (the engine takes a reference). -1 when the queue is full. */
int sched_submit(sched *s, srv_req *r);
/* The client went away: the engine frees r's slot at its next step. */
void sched_cancel(sched *s, srv_req *r);
sched_stats sched_get_stats(sched *s);

/* HTTP: serve until SIGINT/SIGTERM. Returns 0, or -1 with err. */
int server_run(g3n_model *m, g3n_tokenizer *tk, const srv_config *cfg, char *err, size_t errlen);

#endif
