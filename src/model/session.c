/* session.c: one sequence over a shared model: its KV cache, position, scratch
 * and last logits, and g3n_session_eval, which splits input into steps of at
 * most n_batch tokens. The forward pass itself is in forward.c. */
#include <sys/stat.h>

#include "model/forward.h"

struct g3n_session {
    g3n_model *m;
    int n_ctx, n_batch;
    int pos;
    g3n_kv kv;         /* cache views, backend memory */
    void *kv_mem;      /* one allocation for every owning layer's K and V */
    fwd_scratch *fwd;
    int32_t *ids, *posv, *seqv; /* [n_batch] host step metadata */
    float *logits;     /* [n_vocab] host, last token */
    int have_logits;
};

g3n_session *g3n_session_create(g3n_model *m, int n_ctx, int n_batch, char *err, size_t errlen) {
    const g3n_config *c = &m->cfg;
    if (n_ctx <= 0) n_ctx = G3N_MIN(4096, c->n_ctx_max);
    if (n_batch <= 0) n_batch = 256;
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
    g3n_session *s = g3n_calloc(1, sizeof(*s));
    s->m = m;
    s->n_ctx = n_ctx;
    s->n_batch = n_batch;
    /* sliding layers keep a ring of window + n_batch - 1 positions: enough for
     * every query of a step to see its whole window while the step writes */
    const size_t kvd = (size_t)c->n_head_kv * c->head_dim;
    size_t total = 0;
    int cap[G3N_MAX_LAYERS];
    for (int l = 0; l < c->n_layer; l++) {
        cap[l] = 0;
        if (c->kv_source[l] != l) continue;
        cap[l] = c->is_sliding[l] ? G3N_MIN(n_ctx, c->sliding_window + n_batch - 1) : n_ctx;
        total += 2 * (size_t)cap[l] * kvd;
    }
    s->kv_mem = m->be->alloc(m->be, total * sizeof(float));
    float *p = s->kv_mem;
    for (int l = 0; l < c->n_layer; l++) {
        if (!cap[l]) continue;
        s->kv.layer[l].k = p;
        p += (size_t)cap[l] * kvd;
        s->kv.layer[l].v = p;
        p += (size_t)cap[l] * kvd;
        s->kv.layer[l].cap = cap[l];
    }
    s->fwd = fwd_scratch_create(m, n_batch);
    s->ids = g3n_malloc((size_t)n_batch * sizeof(int32_t));
    s->posv = g3n_malloc((size_t)n_batch * sizeof(int32_t));
    s->seqv = g3n_calloc((size_t)n_batch, sizeof(int32_t));
    const size_t lb = (size_t)c->n_vocab * sizeof(float);
    s->logits = m->be->host_alloc ? m->be->host_alloc(m->be, lb) : g3n_malloc(lb);
    return s;
}

void g3n_session_free(g3n_session *s) {
    if (!s) return;
    fwd_scratch_free(s->m, s->fwd);
    s->m->be->free(s->m->be, s->kv_mem);
    free(s->ids);
    free(s->posv);
    free(s->seqv);
    if (s->m->be->host_free) s->m->be->host_free(s->m->be, s->logits);
    else free(s->logits);
    free(s);
}

void g3n_session_reset(g3n_session *s) {
    s->pos = 0;
    s->have_logits = 0;
}

int g3n_session_pos(const g3n_session *s) { return s->pos; }
int g3n_session_n_ctx(const g3n_session *s) { return s->n_ctx; }
const float *g3n_session_logits(const g3n_session *s) { return s->have_logits ? s->logits : NULL; }

int g3n_session_eval(g3n_session *s, const int32_t *ids, int n, float *logits_out, char *err,
                     size_t errlen) {
    const g3n_config *c = &s->m->cfg;
    if (n <= 0) return g3n_err(err, errlen, "no tokens to evaluate");
    if (n > s->n_ctx - s->pos)
        return g3n_err(err, errlen, "%d tokens do not fit: context is %d, %d already used", n,
                       s->n_ctx, s->pos);
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= c->n_vocab_ple)
            return g3n_err(err, errlen,
                           "token id %d (position %d) is outside the text vocabulary 0..%d",
                           ids[i], i, c->n_vocab_ple - 1);
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
        if (logits_out) {
            fwd_run(s->m, s->fwd, &b, 0, logits_out + (size_t)i0 * V);
            if (last) memcpy(s->logits, logits_out + (size_t)(n - 1) * V, V * sizeof(float));
        } else {
            fwd_run(s->m, s->fwd, &b, last ? nb - 1 : nb, s->logits);
        }
        s->pos += nb;
    }
    s->have_logits = 1;
    return 0;
}

/* ---- decode path: fused or split, chosen by measurement ------------------------------- */

/* Seconds per decode step on path `fused`: a few recorded steps after warm-up. */
static double time_decode(g3n_model *m, int fused) {
    char err[256];
    int old = m->fused;
    m->fused = fused;
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

void decode_path_choose(g3n_model *m, const char *want) {
    char *why = m->path_why;
    if (want && strcmp(want, "fused") == 0) {
        m->fused = 1;
        snprintf(why, sizeof m->path_why, "asked for");
        return;
    }
    if (want && strcmp(want, "split") == 0) {
        m->fused = 0;
        snprintf(why, sizeof m->path_why, "asked for");
        return;
    }
    if (!m->be->graph_begin) { /* CPU: the fused ops are the split ops in sequence */
        m->fused = 0;
        snprintf(why, sizeof m->path_why, "the CPU backend runs the fused ops as the split ones");
        return;
    }
    /* auto on a GPU: cached measurement for this device and model shape, else measure */
    char key[512];
    const g3n_config *c = &m->cfg;
    snprintf(key, sizeof key, "%s|L%d|D%d|I%d|V%d|dt%d", m->be->device_name, c->n_layer, c->n_embd,
             c->n_ff[0], c->n_vocab, m->w.layers[0].gate_proj.dtype);
    for (char *p = key; *p; p++)
        if (*p == ' ' || *p == '\n') *p = '_';
    char *dir = cache_path(), file[1100] = "";
    if (dir) {
        snprintf(file, sizeof file, "%s/decode-path", dir);
        FILE *f = fopen(file, "r");
        char line[700];
        while (f && fgets(line, sizeof line, f)) {
            char k[600], v[32];
            if (sscanf(line, "%599s %31s", k, v) == 2 && strcmp(k, key) == 0) {
                m->fused = strcmp(v, "fused") == 0;
                snprintf(why, sizeof m->path_why, "measured earlier on this device (%.200s)", file);
                fclose(f);
                free(dir);
                return;
            }
        }
        if (f) fclose(f);
    }
    double tf = time_decode(m, 1), ts = time_decode(m, 0);
    m->fused = tf <= ts;
    snprintf(why, sizeof m->path_why, "measured at load: fused %.3f ms, split %.3f ms per step", tf * 1e3,
             ts * 1e3);
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
            fprintf(f, "%s %s\n", key, m->fused ? "fused" : "split");
            fclose(f);
        }
        free(dir);
    }
}

int g3n_model_set_decode_path(g3n_model *m, const char *path) {
    if (strcmp(path, "fused") == 0) m->fused = 1;
    else if (strcmp(path, "split") == 0) m->fused = 0;
    else return -1;
    return 0;
}
