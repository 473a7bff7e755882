/* server.c: the HTTP side of `g3n serve`, an OpenAI-compatible API over
 * libmicrohttpd (one thread per connection) and cJSON:
 *   POST /v1/chat/completions   messages through the Gemma chat template
 *   POST /v1/completions        a raw prompt (text, or token ids)
 *   GET  /v1/models, GET /health
 * A request is parsed and validated here, tokenized, and handed to the engine
 * (sched.c) as an srv_req; its text comes back through the request's buffer.
 * `stream: true` answers with server-sent events from a content-reader callback;
 * otherwise the connection thread waits and sends one JSON body. Both notice a
 * client that hangs up (poll for POLLRDHUP while waiting) and free its slot.
 * Every failure is OpenAI's error JSON with its status: 400 bad JSON or
 * parameters, 401 wrong key, 404 unknown route, 405 wrong method, 413 body too
 * large, 503 queue full or shutting down. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <math.h>
#include <microhttpd.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "server/server.h"

typedef struct {
    g3n_model *m;
    g3n_tokenizer *tk;
    const srv_config *cfg;
    sched *eng;
    int n_vocab_text;
    long created;
    volatile sig_atomic_t stopping;
    unsigned long long next_id;
    pthread_mutex_t mu; /* next_id */
} srv;

/* ---- responses ---------------------------------------------------------------------------- */

static enum MHD_Result send_text(struct MHD_Connection *c, unsigned status, const char *type, char *body) {
    struct MHD_Response *rs = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    MHD_add_response_header(rs, "Content-Type", type);
    enum MHD_Result ret = MHD_queue_response(c, status, rs);
    MHD_destroy_response(rs);
    return ret;
}

/* Send and free j. */
static enum MHD_Result send_json(struct MHD_Connection *c, unsigned status, cJSON *j) {
    char *s = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    return send_text(c, status, "application/json", s);
}

/* OpenAI's error shape: {"error": {"message", "type", "param", "code"}}. */
static enum MHD_Result send_error(struct MHD_Connection *c, unsigned status, const char *param,
                                  const char *code, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    const char *type = status == 401   ? "authentication_error"
                       : status == 404 ? "not_found_error"
                       : status == 503 ? "server_overloaded"
                       : status >= 500 ? "server_error"
                                       : "invalid_request_error";
    cJSON *e = cJSON_CreateObject(), *o = cJSON_AddObjectToObject(e, "error");
    cJSON_AddStringToObject(o, "message", msg);
    cJSON_AddStringToObject(o, "type", type);
    if (param) cJSON_AddStringToObject(o, "param", param);
    else cJSON_AddNullToObject(o, "param");
    if (code) cJSON_AddStringToObject(o, "code", code);
    else cJSON_AddNullToObject(o, "code");
    return send_json(c, status, e);
}

/* ---- request parameters --------------------------------------------------------------------- */

/* A parameter problem: which one, and what. */
typedef struct {
    const char *param;
    char msg[400];
} bad;

static int fail(bad *b, const char *param, const char *fmt, ...) {
    b->param = param;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b->msg, sizeof b->msg, fmt, ap);
    va_end(ap);
    return -1;
}

/* Optional number in [lo, hi] (null or absent: *v unchanged). integer: no fraction. */
static int get_num(cJSON *root, const char *name, double lo, double hi, int integer, double *v, bad *b) {
    cJSON *x = cJSON_GetObjectItemCaseSensitive(root, name);
    if (!x || cJSON_IsNull(x)) return 0;
    if (!cJSON_IsNumber(x) || !isfinite(x->valuedouble) || x->valuedouble < lo || x->valuedouble > hi ||
        (integer && x->valuedouble != floor(x->valuedouble)))
        return fail(b, name, "'%s' must be %s in [%.10g, %.10g]", name, integer ? "an integer" : "a number", lo, hi);
    *v = x->valuedouble;
    return 0;
}

/* Optional boolean (null or absent: *v unchanged). */
static int get_bool(cJSON *root, const char *name, int *v, bad *b) {
    cJSON *x = cJSON_GetObjectItemCaseSensitive(root, name);
    if (!x || cJSON_IsNull(x)) return 0;
    if (!cJSON_IsBool(x)) return fail(b, name, "'%s' must be a boolean", name);
    *v = cJSON_IsTrue(x);
    return 0;
}

/* Sampling, limits and stop strings, common to both endpoints. */
static int parse_common(srv *sv, cJSON *root, srv_req *r, int *stream, int *usage, bad *b) {
    double v;
    g3n_sampler_params *p = &r->sp;
    *p = g3n_sampler_default_params();
    p->top_k = 0; /* OpenAI: temperature 1, top_p 1, nothing else */
    p->top_p = 1.0f;
    p->repeat_last_n = -1; /* presence/frequency over everything generated */
    v = p->temperature;
    if (get_num(root, "temperature", 0, 2, 0, &v, b)) return -1;
    p->temperature = (float)v;
    v = p->top_p;
    if (get_num(root, "top_p", 0, 1, 0, &v, b)) return -1;
    if (v <= 0) return fail(b, "top_p", "'top_p' must be in (0, 1]");
    p->top_p = (float)v;
    v = 0;
    if (get_num(root, "top_k", -1, 1 << 20, 1, &v, b)) return -1;
    p->top_k = (int)v;
    v = 0;
    if (get_num(root, "min_p", 0, 1, 0, &v, b)) return -1;
    p->min_p = (float)v;
    v = 0;
    if (get_num(root, "presence_penalty", -2, 2, 0, &v, b)) return -1;
    p->presence_penalty = (float)v;
    v = 0;
    if (get_num(root, "frequency_penalty", -2, 2, 0, &v, b)) return -1;
    p->frequency_penalty = (float)v;
    v = -1;
    if (get_num(root, "seed", -9.2e18, 9.2e18, 1, &v, b)) return -1;
    if (v != -1) {
        p->seed = (uint64_t)(int64_t)v;
    } else {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        p->seed = (uint64_t)ts.tv_nsec * 6364136223846793005ull ^ (uint64_t)ts.tv_sec;
    }
    v = -1;
    if (get_num(root, "max_tokens", 1, 1 << 24, 1, &v, b)) return -1;
    if (get_num(root, "max_completion_tokens", 1, 1 << 24, 1, &v, b)) return -1;
    r->max_tokens = (int)v;
    v = 1;
    if (get_num(root, "n", 1, 1, 1, &v, b)) return fail(b, "n", "only n = 1 is supported");
    int flag = 0;
    if (get_bool(root, "logprobs", &flag, b)) return -1;
    if (flag) return fail(b, "logprobs", "logprobs are not supported");
    if (get_bool(root, "echo", &flag, b)) return -1;
    if (flag) return fail(b, "echo", "echo is not supported");
    if (get_bool(root, "ignore_eos", &r->ignore_eos, b)) return -1;
    if (get_bool(root, "stream", stream, b)) return -1;
    cJSON *so = cJSON_GetObjectItemCaseSensitive(root, "stream_options");
    if (so && !cJSON_IsNull(so)) {
        if (!cJSON_IsObject(so)) return fail(b, "stream_options", "'stream_options' must be an object");
        if (get_bool(so, "include_usage", usage, b)) return fail(b, "stream_options", "'include_usage' must be a boolean");
    }
    cJSON *st = cJSON_GetObjectItemCaseSensitive(root, "stop");
    if (st && !cJSON_IsNull(st)) {
        int n = cJSON_IsString(st) ? 1 : cJSON_IsArray(st) ? cJSON_GetArraySize(st) : -1;
        if (n < 0 || n > SRV_MAX_STOP)
            return fail(b, "stop", "'stop' must be a string or an array of at most %d strings", SRV_MAX_STOP);
        for (int i = 0; i < n; i++) {
            cJSON *s = cJSON_IsString(st) ? st : cJSON_GetArrayItem(st, i);
            if (!cJSON_IsString(s) || !s->valuestring[0] || strlen(s->valuestring) > 256)
                return fail(b, "stop", "each stop sequence must be a non-empty string of at most 256 bytes");
            r->stop[r->n_stop++] = strdup(s->valuestring);
        }
    }
    (void)sv;
    return 0;
}

/* Text of a message's content: a string, or an array of {"type":"text","text":...}
 * parts (joined). Heap string; NULL on another shape. */
static char *content_text(cJSON *c) {
    if (cJSON_IsString(c)) return strdup(c->valuestring);
    if (!cJSON_IsArray(c)) return NULL;
    size_t n = 0;
    char *out = calloc(1, 1);
    cJSON *part;
    cJSON_ArrayForEach(part, c) {
        cJSON *ty = cJSON_GetObjectItemCaseSensitive(part, "type");
        cJSON *tx = cJSON_GetObjectItemCaseSensitive(part, "text");
        if (!cJSON_IsString(ty) || strcmp(ty->valuestring, "text") || !cJSON_IsString(tx)) {
            free(out);
            return NULL;
        }
        size_t k = strlen(tx->valuestring);
        out = realloc(out, n + k + 1);
        memcpy(out + n, tx->valuestring, k + 1);
        n += k;
    }
    return out;
}

/* messages -> chat template -> ids */
static int chat_prompt(srv *sv, cJSON *root, srv_req *r, bad *b) {
    cJSON *msgs = cJSON_GetObjectItemCaseSensitive(root, "messages");
    int n = cJSON_IsArray(msgs) ? cJSON_GetArraySize(msgs) : 0;
    if (n <= 0 || n > 4096) return fail(b, "messages", "'messages' must be a non-empty array");
    g3n_chat_msg *cm = calloc((size_t)n, sizeof(*cm));
    char **texts = calloc((size_t)n, sizeof(char *));
    int rc = 0;
    for (int i = 0; i < n && !rc; i++) {
        cJSON *m = cJSON_GetArrayItem(msgs, i);
        cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
        if (!cJSON_IsString(role)) {
            rc = fail(b, "messages", "messages[%d].role must be a string", i);
            break;
        }
        const char *ro = role->valuestring;
        if (!strcmp(ro, "developer")) ro = "system";
        if (strcmp(ro, "system") && strcmp(ro, "user") && strcmp(ro, "assistant")) {
            rc = fail(b, "messages", "messages[%d].role must be system, developer, user or assistant", i);
            break;
        }
        texts[i] = content_text(cJSON_GetObjectItemCaseSensitive(m, "content"));
        if (!texts[i]) {
            rc = fail(b, "messages", "messages[%d].content must be a string or an array of text parts", i);
            break;
        }
        cm[i] = (g3n_chat_msg){ro, texts[i]};
    }
    char err[400];
    char *text = rc ? NULL : g3n_chat_format(cm, n, 1, err, sizeof err);
    if (!rc && !text) rc = fail(b, "messages", "%s", err);
    if (text) {
        r->n_prompt = g3n_tokenizer_encode(sv->tk, text, strlen(text), 0, &r->prompt, err, sizeof err);
        if (r->n_prompt < 0) rc = fail(b, "messages", "%s", err);
    }
    free(text);
    for (int i = 0; i < n; i++) free(texts[i]);
    free(texts);
    free(cm);
    return rc;
}

/* prompt: a string, an array of one string, or an array of token ids */
static int completion_prompt(srv *sv, cJSON *root, srv_req *r, bad *b) {
    cJSON *p = cJSON_GetObjectItemCaseSensitive(root, "prompt");
    if (cJSON_IsArray(p) && cJSON_GetArraySize(p) == 1 && cJSON_IsString(cJSON_GetArrayItem(p, 0)))
        p = cJSON_GetArrayItem(p, 0);
    char err[400];
    if (cJSON_IsString(p)) {
        r->n_prompt = g3n_tokenizer_encode(sv->tk, p->valuestring, strlen(p->valuestring), 1, &r->prompt, err, sizeof err);
        if (r->n_prompt < 0) return fail(b, "prompt", "%s", err);
        return 0;
    }
    int n = cJSON_IsArray(p) ? cJSON_GetArraySize(p) : 0;
    if (n <= 0 || n > (1 << 24))
        return fail(b, "prompt", "'prompt' must be a string, an array of one string, or an array of token ids");
    r->prompt = malloc(sizeof(int32_t) * (size_t)n);
    for (int i = 0; i < n; i++) {
        cJSON *x = cJSON_GetArrayItem(p, i);
        if (!cJSON_IsNumber(x) || x->valuedouble != floor(x->valuedouble) || x->valuedouble < 0 ||
            x->valuedouble >= sv->n_vocab_text)
            return fail(b, "prompt", "prompt[%d] is not a token id in [0, %d) (one prompt per request)", i,
                        sv->n_vocab_text);
        r->prompt[i] = (int32_t)x->valuedouble;
    }
    r->n_prompt = n;
    return 0;
}

/* ---- answers --------------------------------------------------------------------------------- */

typedef struct {
    int chat;
    int include_usage;
    char id[48];
    long created;
} answer_meta;

static cJSON *answer_base(srv *sv, const answer_meta *a, const char *object) {
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "id", a->id);
    cJSON_AddStringToObject(j, "object", object);
    cJSON_AddNumberToObject(j, "created", (double)a->created);
    cJSON_AddStringToObject(j, "model", sv->cfg->model_name);
    cJSON_AddStringToObject(j, "system_fingerprint", "g3n");
    return j;
}

static void add_usage(cJSON *j, srv_req *r) {
    cJSON *u = cJSON_AddObjectToObject(j, "usage");
    cJSON_AddNumberToObject(u, "prompt_tokens", r->n_prompt);
    cJSON_AddNumberToObject(u, "completion_tokens", r->n_gen);
    cJSON_AddNumberToObject(u, "total_tokens", r->n_prompt + r->n_gen);
    cJSON *d = cJSON_AddObjectToObject(u, "prompt_tokens_details");
    cJSON_AddNumberToObject(d, "cached_tokens", r->n_cached);
}

/* One choice: the whole text (non-stream), a delta (stream), or the final stream
 * chunk (text NULL, finish set). */
static cJSON *answer(srv *sv, const answer_meta *a, int stream, const char *text, const char *finish, int role) {
    cJSON *j = answer_base(sv, a, a->chat ? (stream ? "chat.completion.chunk" : "chat.completion")
                                          : "text_completion");
    cJSON *ch = cJSON_AddArrayToObject(j, "choices"), *c = cJSON_CreateObject();
    cJSON_AddItemToArray(ch, c);
    cJSON_AddNumberToObject(c, "index", 0);
    if (a->chat) {
        cJSON *m = cJSON_AddObjectToObject(c, stream ? "delta" : "message");
        if (role || !stream) cJSON_AddStringToObject(m, "role", "assistant");
        if (text) cJSON_AddStringToObject(m, "content", text);
    } else {
        cJSON_AddStringToObject(c, "text", text ? text : "");
    }
    cJSON_AddNullToObject(c, "logprobs");
    if (finish) cJSON_AddStringToObject(c, "finish_reason", finish);
    else cJSON_AddNullToObject(c, "finish_reason");
    return j;
}

/* 1 if the peer has closed its side (or the connection broke). */
static int client_gone(struct MHD_Connection *c) {
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci) return 0;
    struct pollfd p = {ci->connect_fd, POLLRDHUP, 0};
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR));
}

/* Wait until r is done (or, unless all, has text); 0 then, -1 if the client went
 * away or the server is stopping meanwhile (r is then cancelled). Called with
 * r->mu held. */
static int wait_output(srv *sv, srv_req *r, struct MHD_Connection *c, int all) {
    while (!r->done && (all || !r->n_text)) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 100 * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&r->cv, &r->mu, &ts);
        if (sv->stopping || client_gone(c)) { /* checked on every wake: a poll() */
            pthread_mutex_unlock(&r->mu);
            sched_cancel(sv->eng, r);
            pthread_mutex_lock(&r->mu);
            return -1;
        }
    }
    return 0;
}

/* ---- streaming (server-sent events) ---------------------------------------------------------- */

enum { ST_ROLE, ST_BODY, ST_FINAL, ST_USAGE, ST_DONE, ST_END };

typedef struct {
    srv *sv;
    srv_req *r;
    struct MHD_Connection *conn;
    answer_meta a;
    int phase;
    char *out; /* the event being sent */
    size_t n_out, off;
} stream;

static void stream_set(stream *st, cJSON *j) {
    char *s = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    free(st->out);
    size_t k = strlen(s);
    st->out = malloc(k + 9);
    memcpy(st->out, "data: ", 6);
    memcpy(st->out + 6, s, k);
    memcpy(st->out + 6 + k, "\n\n", 3);
    st->n_out = k + 8;
    st->off = 0;
    free(s);
}

static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max) {
    stream *st = cls;
    srv_req *r = st->r;
    (void)pos;
    for (;;) {
        if (st->off < st->n_out) {
            size_t k = st->n_out - st->off < max ? st->n_out - st->off : max;
            memcpy(buf, st->out + st->off, k);
            st->off += k;
            return (ssize_t)k;
        }
        switch (st->phase) {
        case ST_ROLE:
            st->phase = ST_BODY;
            if (st->a.chat) stream_set(st, answer(st->sv, &st->a, 1, "", NULL, 1));
            break;
        case ST_BODY: {
            pthread_mutex_lock(&r->mu);
            if (wait_output(st->sv, r, st->conn, 0)) {
                pthread_mutex_unlock(&r->mu);
                return MHD_CONTENT_READER_END_WITH_ERROR;
            }
            size_t n;
            char *t = req_take_text(r, &n);
            if (r->done) st->phase = ST_FINAL;
            pthread_mutex_unlock(&r->mu);
            if (n) stream_set(st, answer(st->sv, &st->a, 1, t, NULL, 0));
            free(t);
            break;
        }
        case ST_FINAL:
            st->phase = st->a.include_usage ? ST_USAGE : ST_DONE;
            stream_set(st, answer(st->sv, &st->a, 1, NULL, r->finish, 0));
            break;
        case ST_USAGE: {
            st->phase = ST_DONE;
            cJSON *j = answer_base(st->sv, &st->a, st->a.chat ? "chat.completion.chunk" : "text_completion");
            cJSON_AddArrayToObject(j, "choices");
            add_usage(j, r);
            stream_set(st, j);
            break;
        }
        case ST_DONE:
            st->phase = ST_END;
            free(st->out);
            st->out = strdup("data: [DONE]\n\n");
            st->n_out = strlen(st->out);
            st->off = 0;
            break;
        default:
            return MHD_CONTENT_READER_END_OF_STREAM;
        }
    }
}

static void stream_free(void *cls) {
    stream *st = cls;
    sched_cancel(st->sv->eng, st->r); /* no-op for the engine once done */
    req_unref(st->r);
    free(st->out);
    free(st);
}

/* ---- the two completion endpoints -------------------------------------------------------------- */

static enum MHD_Result completion(srv *sv, struct MHD_Connection *c, const char *body, size_t n, int chat) {
    cJSON *root = cJSON_ParseWithLength(body, n);
    if (!root) return send_error(c, 400, NULL, NULL, "the body is not valid JSON");
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return send_error(c, 400, NULL, NULL, "the body must be a JSON object");
    }
    srv_req *r = req_new();
    bad b = {0};
    int stream_on = 0, usage = 0;
    cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    int rc = model && !cJSON_IsNull(model) && !cJSON_IsString(model) ? fail(&b, "model", "'model' must be a string") : 0;
    if (!rc) rc = parse_common(sv, root, r, &stream_on, &usage, &b);
    if (!rc) rc = chat ? chat_prompt(sv, root, r, &b) : completion_prompt(sv, root, r, &b);
    cJSON_Delete(root);
    if (rc) {
        req_unref(r);
        return send_error(c, 400, b.param, NULL, "%s", b.msg);
    }
    if (r->n_prompt > sv->cfg->n_ctx) {
        int np = r->n_prompt;
        req_unref(r);
        return send_error(c, 400, chat ? "messages" : "prompt", "context_length_exceeded",
                          "the prompt is %d tokens, more than the context of %d (serve -c)", np, sv->cfg->n_ctx);
    }
    if (sv->stopping || sched_submit(sv->eng, r) != 0) {
        req_unref(r);
        return send_error(c, 503, NULL, NULL, "the server is busy: every slot and queue place is taken; retry later");
    }
    answer_meta a = {chat, usage, "", 0};
    pthread_mutex_lock(&sv->mu);
    unsigned long long id = ++sv->next_id;
    pthread_mutex_unlock(&sv->mu);
    a.created = (long)time(NULL);
    snprintf(a.id, sizeof a.id, "%s-%lx%06llx", chat ? "chatcmpl" : "cmpl", (unsigned long)sv->created, id);
    if (stream_on) {
        stream *st = calloc(1, sizeof(*st));
        *st = (stream){sv, r, c, a, ST_ROLE, NULL, 0, 0};
        struct MHD_Response *rs = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, stream_read, st, stream_free);
        MHD_add_response_header(rs, "Content-Type", "text/event-stream");
        MHD_add_response_header(rs, "Cache-Control", "no-cache");
        enum MHD_Result ret = MHD_queue_response(c, 200, rs);
        MHD_destroy_response(rs);
        return ret;
    }
    /* one body: wait here (this connection's thread) for the end */
    pthread_mutex_lock(&r->mu);
    wait_output(sv, r, c, 1);
    int ok = r->done && !r->cancelled;
    size_t k;
    char *text = req_take_text(r, &k);
    pthread_mutex_unlock(&r->mu);
    enum MHD_Result ret = MHD_NO; /* client gone: close */
    if (ok) {
        cJSON *j = answer(sv, &a, 0, text, r->finish, 0);
        add_usage(j, r);
        ret = send_json(c, 200, j);
    }
    free(text);
    req_unref(r);
    return ret;
}

/* ---- routing ---------------------------------------------------------------------------------- */

typedef struct {
    char *body;
    size_t n, cap;
    int too_big;
} upload;

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *data, size_t *data_size, void **req_cls) {
    srv *sv = cls;
    upload *u = *req_cls;
    (void)version;
    if (!u) { /* headers are in; the body (if any) comes in the next calls */
        u = calloc(1, sizeof(*u));
        *req_cls = u;
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
        if (cl && strtoull(cl, NULL, 10) > sv->cfg->max_body) u->too_big = 1;
        return MHD_YES;
    }
    if (*data_size) {
        if (!u->too_big && u->n + *data_size > sv->cfg->max_body) u->too_big = 1;
        if (!u->too_big) {
            if (u->n + *data_size + 1 > u->cap) {
                u->cap = (u->n + *data_size + 1) * 2;
                u->body = realloc(u->body, u->cap);
            }
            memcpy(u->body + u->n, data, *data_size);
            u->n += *data_size;
        }
        *data_size = 0;
        return MHD_YES;
    }
    int get = !strcmp(method, "GET"), post = !strcmp(method, "POST");
    if (!strcmp(url, "/health")) {
        if (!get) return send_error(c, 405, NULL, NULL, "use GET for /health");
        sched_stats s = sched_get_stats(sv->eng);
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "status", sv->stopping ? "stopping" : "ok");
        cJSON_AddNumberToObject(j, "slots_total", s.slots);
        cJSON_AddNumberToObject(j, "slots_busy", s.slots_busy);
        cJSON_AddNumberToObject(j, "slots_idle", s.slots - s.slots_busy);
        cJSON_AddNumberToObject(j, "queued", s.queued);
        cJSON_AddNumberToObject(j, "requests_served", (double)s.served);
        cJSON_AddNumberToObject(j, "tokens_generated", (double)s.tokens_generated);
        return send_json(c, 200, j);
    }
    int chat = !strcmp(url, "/v1/chat/completions"), cmpl = !strcmp(url, "/v1/completions");
    int models = !strcmp(url, "/v1/models");
    if (!chat && !cmpl && !models) return send_error(c, 404, NULL, "unknown_url", "no route %s %.200s", method, url);
    if (sv->cfg->api_key) {
        const char *auth = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
        if (!auth || strncmp(auth, "Bearer ", 7) || strcmp(auth + 7, sv->cfg->api_key))
            return send_error(c, 401, NULL, "invalid_api_key", "missing or wrong API key (Authorization: Bearer KEY)");
    }
    if (models) {
        if (!get) return send_error(c, 405, NULL, NULL, "use GET for /v1/models");
        cJSON *j = cJSON_CreateObject(), *d;
        cJSON_AddStringToObject(j, "object", "list");
        d = cJSON_AddArrayToObject(j, "data");
        cJSON *mo = cJSON_CreateObject();
        cJSON_AddStringToObject(mo, "id", sv->cfg->model_name);
        cJSON_AddStringToObject(mo, "object", "model");
        cJSON_AddNumberToObject(mo, "created", (double)sv->created);
        cJSON_AddStringToObject(mo, "owned_by", "g3n");
        cJSON_AddItemToArray(d, mo);
        return send_json(c, 200, j);
    }
    if (!post) return send_error(c, 405, NULL, NULL, "use POST for %s", url);
    if (u->too_big)
        return send_error(c, 413, NULL, "request_too_large", "the body is larger than %zu bytes", sv->cfg->max_body);
    return completion(sv, c, u->body ? u->body : "", u->n, chat);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **req_cls, enum MHD_RequestTerminationCode toe) {
    upload *u = *req_cls;
    (void)cls, (void)c, (void)toe;
    if (u) {
        free(u->body);
        free(u);
    }
    *req_cls = NULL;
}

/* ---- the daemon -------------------------------------------------------------------------------- */

int server_run(g3n_model *m, g3n_tokenizer *tk, const srv_config *cfg, char *err, size_t errlen) {
    srv sv = {0};
    sv.m = m;
    sv.tk = tk;
    sv.cfg = cfg;
    sv.n_vocab_text = g3n_model_get_info(m).n_vocab_text;
    sv.created = (long)time(NULL);
    pthread_mutex_init(&sv.mu, NULL);

    struct addrinfo hints = {0}, *ai = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    char port[16];
    snprintf(port, sizeof port, "%d", cfg->port);
    int gai = getaddrinfo(cfg->host, port, &hints, &ai);
    if (gai) {
        snprintf(err, errlen, "--host %s: %s", cfg->host, gai_strerror(gai));
        return -1;
    }
    /* signals: the main thread waits for them; every other thread blocks them */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    sv.eng = sched_start(m, tk, cfg, err, errlen);
    if (!sv.eng) {
        freeaddrinfo(ai);
        return -1;
    }
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION;
    if (ai->ai_family == AF_INET6) flags |= MHD_USE_IPv6;
    struct MHD_Daemon *d = MHD_start_daemon(
        flags, (uint16_t)cfg->port, NULL, NULL, on_request, &sv, MHD_OPTION_SOCK_ADDR, ai->ai_addr,
        MHD_OPTION_CONNECTION_LIMIT, (unsigned)cfg->max_conn, MHD_OPTION_CONNECTION_TIMEOUT,
        (unsigned)cfg->timeout_s, MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(64 * 1024),
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, &sv, MHD_OPTION_END);
    freeaddrinfo(ai);
    if (!d) {
        snprintf(err, errlen, "cannot listen on %s:%d (address in use, or not a local address?)", cfg->host, cfg->port);
        sched_stop(sv.eng);
        return -1;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
    fprintf(stderr, "g3n serve: listening on http://%s:%u (%d slots of %d tokens, queue %d)\n", cfg->host,
            di ? di->port : (unsigned)cfg->port, cfg->parallel, cfg->n_ctx, cfg->queue);
    int sig = 0;
    sigwait(&sigs, &sig);
    fprintf(stderr, "g3n serve: %s, stopping\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
    sv.stopping = 1; /* waiting handlers give up within 100 ms; new requests get 503 */
    MHD_stop_daemon(d);
    sched_stop(sv.eng);
    pthread_mutex_destroy(&sv.mu);
    return 0;
}
