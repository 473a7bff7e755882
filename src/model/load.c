/* load.c: open a checkpoint directory and build a g3n_model.
 *
 * Maps tensor names to the fields of g3n_weights in all three layouts
 * (model.language_model.* as published, model.* as Gemma3nForCausalLM saves it,
 * language_model.model.* as mlx-community publishes it), checks every shape and
 * dtype against the config, and hands matrices to the backend in their stored
 * dtype. Vision and audio tensors are never touched. It computes nothing. */
#include <sys/stat.h>

#include "model/forward.h"
#include "quant.h"

typedef struct {
    g3n_model *m;
    const char *prefix;
    char *err;
    size_t errlen;
    void **owned; /* backend allocations made here (vectors) */
    int n_owned;
} loader;

static const st_tensor *find(loader *L, const char *suffix, char *full, size_t fulllen) {
    snprintf(full, fulllen, "%s%s", L->prefix, suffix);
    return safetensors_find(L->m->st, full);
}

static int check_shape(loader *L, const st_tensor *t, const char *name, int ndim, int64_t d0,
                       int64_t d1) {
    int ok = t->ndim == ndim && t->shape[0] == d0 && (ndim < 2 || t->shape[1] == d1);
    if (ok) return 0;
    char got[128] = "[";
    for (int i = 0; i < t->ndim; i++) {
        char b[32];
        snprintf(b, sizeof b, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
        strncat(got, b, sizeof(got) - strlen(got) - 2);
    }
    strcat(got, "]");
    if (ndim == 1)
        return g3n_err(L->err, L->errlen, "%s: tensor %s has shape %s, config says [%lld]",
                       safetensors_file_path(L->m->st, t), name, got, (long long)d0);
    return g3n_err(L->err, L->errlen, "%s: tensor %s has shape %s, config says [%lld, %lld]",
                   safetensors_file_path(L->m->st, t), name, got, (long long)d0, (long long)d1);
}

static int check_float(loader *L, const st_tensor *t, const char *name) {
    if (t->dtype == G3N_F32 || t->dtype == G3N_F16 || t->dtype == G3N_BF16) return 0;
    return g3n_err(L->err, L->errlen, "%s: tensor %s has dtype %s (expected BF16, F16 or F32)",
                   safetensors_file_path(L->m->st, t), name, t->dtype_name);
}

/* A quantized module (mlx affine): <path>.weight packed U32 beside <path>.scales
 * and <path>.biases; bits and group size from config.json (the module's own
 * entry where there is one). Every shape is checked against them. */
static int get_qmat(loader *L, g3n_mat *out, const st_tensor *t, const char *name, int rows,
                    int cols) {
    const g3n_quant_config *q = &L->m->quant;
    const char *file = safetensors_file_path(L->m->st, t);
    const int mlen = (int)strlen(name) - 7; /* the module path: name without ".weight" */
    if (!q->bits)
        return g3n_err(L->err, L->errlen,
                       "%s: tensor %s is quantized (%.*s.scales exists) but config.json has no "
                       "\"quantization\" block", file, name, mlen, name);
    int bits = q->bits, group = q->group;
    for (int i = 0; i < q->n_over; i++)
        if ((int)strlen(q->over[i].path) == mlen && strncmp(q->over[i].path, name, (size_t)mlen) == 0)
            bits = q->over[i].bits, group = q->over[i].group;
    if (cols % group != 0)
        return g3n_err(L->err, L->errlen,
                       "%s: tensor %s: %d columns are not a multiple of the group size %d",
                       file, name, cols, group);
    if (t->dtype != G3N_U32)
        return g3n_err(L->err, L->errlen, "%s: tensor %s has dtype %s (quantized: expected U32)",
                       file, name, t->dtype_name);
    if (check_shape(L, t, name, 2, rows, (int64_t)cols * bits / 32)) return -1;
    const st_tensor *sb[2];
    const char *what[2] = {"scales", "biases"};
    char sname[2][300];
    for (int k = 0; k < 2; k++) {
        snprintf(sname[k], sizeof sname[k], "%.*s.%s", mlen, name, what[k]);
        sb[k] = safetensors_find(L->m->st, sname[k]);
        if (!sb[k])
            return g3n_err(L->err, L->errlen, "%s: missing tensor %s (%s is quantized)", L->m->dir,
                           sname[k], name);
        if (check_float(L, sb[k], sname[k]) || check_shape(L, sb[k], sname[k], 2, rows, cols / group))
            return -1;
    }
    if (sb[0]->dtype != sb[1]->dtype)
        return g3n_err(L->err, L->errlen, "%s: tensor %s has dtype %s but %s has %s", file, sname[1],
                       sb[1]->dtype_name, sname[0], sb[0]->dtype_name);
    out->dtype = G3N_U32;
    out->rows = rows;
    out->cols = cols;
    out->data = t->data;
    out->name = t->name;
    out->bits = bits;
    out->group_size = group;
    out->sdtype = sb[0]->dtype;
    out->scales = sb[0]->data;
    out->biases = sb[1]->data;
    out->file_bytes = t->nbytes + sb[0]->nbytes + sb[1]->nbytes;
    L->m->weight_bytes += out->file_bytes;
    return L->m->be->mat_prepare(L->m->be, out, L->err, L->errlen);
}

/* A weight matrix [rows, cols]. Absent and !required: an empty g3n_mat. */
static int get_mat(loader *L, g3n_mat *out, const char *suffix, int rows, int cols, int required) {
    char name[256];
    const int host_gather = out->host_gather, sparse_cols = out->sparse_cols;
    const int row_kernel = out->row_kernel;
    memset(out, 0, sizeof(*out));
    out->host_gather = host_gather;
    out->sparse_cols = sparse_cols;
    out->row_kernel = row_kernel;
    const st_tensor *t = find(L, suffix, name, sizeof name);
    if (!t) {
        if (!required) return 0;
        return g3n_err(L->err, L->errlen, "%s: missing tensor %s", L->m->dir, name);
    }
    char qname[300];
    size_t n = strlen(name);
    if (n > 7 && strcmp(name + n - 7, ".weight") == 0) {
        snprintf(qname, sizeof qname, "%.*s.scales", (int)(n - 7), name);
        if (safetensors_find(L->m->st, qname)) return get_qmat(L, out, t, name, rows, cols);
    }
    if (check_float(L, t, name) || check_shape(L, t, name, 2, rows, cols)) return -1;
    out->dtype = t->dtype;
    out->rows = rows;
    out->cols = cols;
    out->data = t->data;
    out->name = t->name;
    out->file_bytes = t->nbytes;
    L->m->weight_bytes += t->nbytes;
    return L->m->be->mat_prepare(L->m->be, out, L->err, L->errlen);
}

/* A small tensor of n0 x n1 elements (n1 = 0: 1-D), converted to f32 and
 * copied into backend memory. */
static int get_vec(loader *L, g3n_vec *out, const char *suffix, int n0, int n1) {
    char name[256];
    const st_tensor *t = find(L, suffix, name, sizeof name);
    if (!t) return g3n_err(L->err, L->errlen, "%s: missing tensor %s", L->m->dir, name);
    size_t n = strlen(name);
    char qname[300];
    snprintf(qname, sizeof qname, "%.*s.scales", (int)(n > 7 ? n - 7 : n), name);
    if (n > 7 && strcmp(name + n - 7, ".weight") == 0 && safetensors_find(L->m->st, qname))
        return g3n_err(L->err, L->errlen, "%s: tensor %s is quantized (%s exists); g3n reads it "
                       "as a small f32 vector and supports only unquantized ones",
                       safetensors_file_path(L->m->st, t), name, qname);
    if (check_float(L, t, name) || check_shape(L, t, name, n1 ? 2 : 1, n0, n1)) return -1;
    size_t count = (size_t)n0 * (size_t)(n1 ? n1 : 1);
    float *host = g3n_malloc(count * sizeof(float));
    for (size_t i = 0; i < count; i++) {
        const unsigned char *p = t->data;
        if (t->dtype == G3N_F32) memcpy(&host[i], p + 4 * i, 4);
        else {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            host[i] = t->dtype == G3N_BF16 ? g3n_bf16_to_f32(h) : g3n_f16_to_f32(h);
        }
    }
    g3n_backend *be = L->m->be;
    float *dev = be->alloc(be, count * sizeof(float));
    be->write(be, dev, host, count * sizeof(float));
    free(host);
    L->owned = realloc(L->owned, (size_t)(L->n_owned + 1) * sizeof(void *));
    if (!L->owned) abort();
    L->owned[L->n_owned++] = dev;
    out->n = (int)count;
    out->data = dev;
    L->m->weight_bytes += t->nbytes;
    return 0;
}

static const struct {
    const char *prefix;
    const char *layout;
} layouts[] = {
    {"model.language_model.", "conditional (model.language_model.*)"},
    {"language_model.model.", "mlx (language_model.model.*)"},
    {"model.", "causal (model.*)"},
};

int load_weights(g3n_model *m, char *err, size_t errlen) {
    const g3n_config *c = &m->cfg;
    loader L = {m, NULL, err, errlen, NULL, 0};
    for (size_t i = 0; i < sizeof(layouts) / sizeof(layouts[0]); i++) {
        char name[128];
        snprintf(name, sizeof name, "%sembed_tokens.weight", layouts[i].prefix);
        if (safetensors_find(m->st, name)) {
            L.prefix = layouts[i].prefix;
            m->layout = layouts[i].layout;
            break;
        }
    }
    if (!L.prefix)
        return g3n_err(err, errlen,
                       "%s: no text model found (no model.language_model.embed_tokens.weight, "
                       "language_model.model.embed_tokens.weight or model.embed_tokens.weight)",
                       m->dir);

    g3n_weights *w = &m->w;
    const int D = c->n_embd, LP = c->n_layer * c->n_ple, A = c->n_altup;
    const int qd = c->n_head * c->head_dim, kvd = c->n_head_kv * c->head_dim;
    int rc = 0;
    rc = rc ? rc : get_mat(&L, &w->embed_tokens, "embed_tokens.weight", c->n_vocab, D, 1);
    w->embed_tokens_per_layer.host_gather = 1; /* one row per token is ever read */
    rc = rc ? rc : get_mat(&L, &w->embed_tokens_per_layer, "embed_tokens_per_layer.weight",
                           c->n_vocab_ple, LP, 1);
    rc = rc ? rc : get_mat(&L, &w->per_layer_model_projection, "per_layer_model_projection.weight",
                           LP, D, 1);
    rc = rc ? rc : get_vec(&L, &w->per_layer_projection_norm, "per_layer_projection_norm.weight",
                           c->n_ple, 0);
    rc = rc ? rc : get_vec(&L, &w->norm, "norm.weight", D, 0);
    for (int k = 0; k < A - 1 && !rc; k++) {
        char s[96];
        snprintf(s, sizeof s, "altup_projections.%d.weight", k);
        rc = get_mat(&L, &w->altup_projections[k], s, D, D, 1);
        snprintf(s, sizeof s, "altup_unembed_projections.%d.weight", k);
        rc = rc ? rc : get_mat(&L, &w->altup_unembed_projections[k], s, D, D, 1);
    }
    w->layers = g3n_calloc((size_t)c->n_layer, sizeof(g3n_layer_weights));
    for (int l = 0; l < c->n_layer && !rc; l++) {
        g3n_layer_weights *lw = &w->layers[l];
        const int I = c->n_ff[l];
        const int owns_kv = l < c->first_shared;
        char s[160];
#define LNAME(suffix) (snprintf(s, sizeof s, "layers.%d.%s", l, suffix), s)
        rc = rc ? rc : get_vec(&L, &lw->input_layernorm, LNAME("input_layernorm.weight"), D, 0);
        rc = rc ? rc : get_mat(&L, &lw->q_proj, LNAME("self_attn.q_proj.weight"), qd, D, 1);
        /* shared layers may carry unused k/v weights (Google's files) or not
         * (transformers 5 saves none): checked when present, never used */
        rc = rc ? rc : get_mat(&L, &lw->k_proj, LNAME("self_attn.k_proj.weight"), kvd, D, owns_kv);
        rc = rc ? rc : get_mat(&L, &lw->v_proj, LNAME("self_attn.v_proj.weight"), kvd, D, owns_kv);
        rc = rc ? rc : get_mat(&L, &lw->o_proj, LNAME("self_attn.o_proj.weight"), D, qd, 1);
        rc = rc ? rc : get_vec(&L, &lw->q_norm, LNAME("self_attn.q_norm.weight"), c->head_dim, 0);
        if (owns_kv)
            rc = rc ? rc : get_vec(&L, &lw->k_norm, LNAME("self_attn.k_norm.weight"), c->head_dim, 0);
        rc = rc ? rc : get_vec(&L, &lw->post_attention_layernorm,
                               LNAME("post_attention_layernorm.weight"), D, 0);
        rc = rc ? rc : get_vec(&L, &lw->pre_feedforward_layernorm,
                               LNAME("pre_feedforward_layernorm.weight"), D, 0);
        rc = rc ? rc : get_mat(&L, &lw->gate_proj, LNAME("mlp.gate_proj.weight"), I, D, 1);
        rc = rc ? rc : get_mat(&L, &lw->up_proj, LNAME("mlp.up_proj.weight"), I, D, 1);
        lw->down_proj.sparse_cols = m->sparse && c->sparsity[l] > 0; /* input mostly zeros */
        rc = rc ? rc : get_mat(&L, &lw->down_proj, LNAME("mlp.down_proj.weight"), D, I, 1);
        rc = rc ? rc : get_vec(&L, &lw->post_feedforward_layernorm,
                               LNAME("post_feedforward_layernorm.weight"), D, 0);
        rc = rc ? rc : get_vec(&L, &lw->altup_correct_output_scale,
                               LNAME("altup.correct_output_scale"), D, 0);
        rc = rc ? rc : get_vec(&L, &lw->altup_correction_coefs,
                               LNAME("altup.correction_coefs.weight"), A, A);
        rc = rc ? rc : get_vec(&L, &lw->altup_prediction_coefs,
                               LNAME("altup.prediction_coefs.weight"), A * A, A);
        lw->altup_router.row_kernel = 1; /* read inside the fused AltUp kernels */
        rc = rc ? rc : get_mat(&L, &lw->altup_router, LNAME("altup.modality_router.weight"), A, D, 1);
        rc = rc ? rc : get_vec(&L, &lw->altup_router_norm, LNAME("altup.router_norm.weight"), D, 0);
        rc = rc ? rc : get_mat(&L, &lw->laurel_left, LNAME("laurel.linear_left.weight"),
                               c->laurel_rank, D, 1);
        rc = rc ? rc : get_mat(&L, &lw->laurel_right, LNAME("laurel.linear_right.weight"), D,
                               c->laurel_rank, 1);
        rc = rc ? rc : get_vec(&L, &lw->post_laurel_norm, LNAME("laurel.post_laurel_norm.weight"),
                               D, 0);
        rc = rc ? rc : get_mat(&L, &lw->per_layer_input_gate, LNAME("per_layer_input_gate.weight"),
                               c->n_ple, D, 1);
        rc = rc ? rc : get_mat(&L, &lw->per_layer_projection, LNAME("per_layer_projection.weight"),
                               D, c->n_ple, 1);
        rc = rc ? rc : get_vec(&L, &lw->post_per_layer_input_norm,
                               LNAME("post_per_layer_input_norm.weight"), D, 0);
#undef LNAME
        if (!owns_kv) { /* present but unused: not part of what a token reads */
            lw->k_proj.data = lw->v_proj.data = NULL;
        }
    }
    m->owned = L.owned;
    m->n_owned = L.n_owned;
    if (rc) return -1;

    /* bytes one decoded token reads: every layer matrix it uses, the global
     * projections, the whole tied LM head, one embedding row and one PLE row */
    size_t bytes = 0;
#define MB(x) ((x).file_bytes)
    for (int l = 0; l < c->n_layer; l++) {
        const g3n_layer_weights *lw = &w->layers[l];
        bytes += MB(lw->q_proj) + MB(lw->o_proj) + MB(lw->gate_proj) + MB(lw->up_proj) +
                 MB(lw->down_proj) + MB(lw->altup_router) + MB(lw->laurel_left) +
                 MB(lw->laurel_right) + MB(lw->per_layer_input_gate) +
                 MB(lw->per_layer_projection);
        if (lw->k_proj.data) bytes += MB(lw->k_proj) + MB(lw->v_proj);
    }
    for (int k = 0; k < A - 1; k++)
        bytes += MB(w->altup_projections[k]) + MB(w->altup_unembed_projections[k]);
    bytes += MB(w->per_layer_model_projection) + MB(w->embed_tokens);
    bytes += MB(w->embed_tokens_per_layer) / (size_t)c->n_vocab_ple;
    bytes += MB(w->embed_tokens) / (size_t)c->n_vocab;
    /* with exact sparsity a top-k layer reads its target's complement of the up
     * rows and down columns (in expectation: the cutoff is a Gaussian quantile),
     * where the backend keeps the down matrix in a form it gathers from (W^T, in
     * place or beside); else the layer runs dense */
    size_t skipped = 0;
    for (int l = 0; l < c->n_layer && m->sparse; l++)
        if (c->sparsity[l] > 0 && (w->layers[l].down_proj.transposed || w->layers[l].down_proj.tdata))
            skipped += (size_t)((double)(MB(w->layers[l].up_proj) + MB(w->layers[l].down_proj)) * c->sparsity[l]);
#undef MB
    m->decode_bytes = bytes;
    if (!skipped) m->sparse = 0; /* no layer the backend gathers from: dense, and said so */
    m->decode_bytes_sparse = m->sparse ? bytes - skipped : 0;
    return 0;
}

g3n_model_params g3n_model_default_params(void) {
    g3n_model_params p;
    memset(&p, 0, sizeof p);
    return p;
}

g3n_model *g3n_model_open(const char *dir, const g3n_model_params *params, char *err,
                          size_t errlen) {
    g3n_model_params p = params ? *params : g3n_model_default_params();
    struct stat sb;
    if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode)) {
        g3n_err(err, errlen, "%s: no such model directory", dir);
        return NULL;
    }
    g3n_model *m = g3n_calloc(1, sizeof(*m));
    m->dir = g3n_strdup(dir);
    char *cpath = g3n_path_join(dir, "config.json");
    size_t clen;
    char *ctext = g3n_read_file(cpath, &clen, 16u << 20, err, errlen);
    int rc = ctext ? config_parse(&m->cfg, ctext, clen, cpath, err, errlen) : -1;
    if (rc == 0) rc = quant_config_parse(&m->quant, ctext, clen, cpath, err, errlen);
    free(ctext);
    free(cpath);
    if (rc == 0) {
        m->st = safetensors_open_dir(dir, err, errlen);
        rc = m->st ? 0 : -1;
    }
    if (rc == 0) {
        const char *dev = p.device;
#ifdef G3N_CUDA
        if (!dev) dev = cuda_available() ? "cuda" : "cpu";
        if (strcmp(dev, "cuda") == 0) {
            g3n_cuda_opts co = {0, p.ple_on_gpu, p.no_graph};
            m->be = cuda_backend_create(&co, err, errlen);
        } else
#endif
        if (!dev || strcmp(dev, "cpu") == 0) m->be = cpu_backend_create(p.n_threads, err, errlen);
        else if (strcmp(dev, "cpu-ref") == 0) m->be = cpu_ref_backend_create(err, errlen);
#ifdef G3N_CUDA
        else g3n_err(err, errlen, "unknown device \"%s\" (this build has: cuda, cpu, cpu-ref)", dev);
#else
        else if (strcmp(dev, "cuda") == 0)
            g3n_err(err, errlen, "this g3n was built without CUDA (build with: make CUDA=1)");
        else g3n_err(err, errlen, "unknown device \"%s\" (this build has: cpu, cpu-ref)", dev);
#endif
        rc = m->be ? 0 : -1;
        /* exact sparsity by default where the backend gathers (CUDA): unquantized
         * checkpoints (down matrices transposed in place) and 4- and 8-bit ones
         * (codes, scales and biases transposed beside the packed rows; other
         * widths would need an f32 copy of W^T: docs/SPEED.md, tenth session) */
        m->sparse = p.sparse > 0 || (p.sparse == 0 && dev && !strcmp(dev, "cuda") &&
                                     (!m->quant.bits || m->quant.bits == 4 || m->quant.bits == 8));
    }
    if (rc == 0 && p.kv_type && strcmp(p.kv_type, "f16") && strcmp(p.kv_type, "f32"))
        rc = g3n_err(err, errlen, "K/V cache type \"%s\": expected f16 or f32", p.kv_type);
    m->kv_f16 = p.kv_type && !strcmp(p.kv_type, "f16");
    if (rc == 0) rc = load_weights(m, err, errlen);
    if (rc == 0) fwd_dec_model_init(m);
    if (rc == 0 && m->be->unembed_prepare) { /* greedy and top-k steps read a cheaper copy of the LM head */
        const size_t copy = m->be->unembed_prepare(m->be, &m->w.embed_tokens);
        const size_t base = m->decode_bytes_sparse ? m->decode_bytes_sparse : m->decode_bytes;
        /* batched steps too, up to G3N_PRUNE_ROWS rows (G3N_PRUNE_ROWS=n: fewer, for timing) */
        const char *pr = getenv("G3N_PRUNE_ROWS");
        m->prune_rows = copy == 0 ? 0 : pr ? G3N_MIN(G3N_MAX(atoi(pr), 0), G3N_PRUNE_ROWS) : G3N_PRUNE_ROWS;
        m->decode_bytes_greedy = copy ? base - m->w.embed_tokens.file_bytes + copy : 0;
    }
    int hints_off;
    if (rc == 0 && p.decode_path && fwd_path_parse_hints(p.decode_path, &hints_off) < 0 &&
        strcmp(p.decode_path, "auto"))
        rc = g3n_err(err, errlen, "decode path \"%s\": expected fused, fused-nol2, split, mega or auto",
                     p.decode_path);
    if (rc == 0) decode_path_choose(m, p.decode_path);
    if (rc == 0) model_warm_up(m);
    if (rc != 0) {
        g3n_model_close(m);
        return NULL;
    }
    return m;
}

void g3n_model_close(g3n_model *m) {
    if (!m) return;
    if (m->be) {
        for (int i = 0; i < m->n_owned; i++) m->be->free(m->be, m->owned[i]);
        m->be->destroy(m->be);
    }
    free(m->owned);
    free(m->w.layers);
    free(m->dec.layer);
    quant_config_free(&m->quant);
    safetensors_close(m->st);
    free(m->dir);
    free(m);
}

g3n_model_info g3n_model_get_info(const g3n_model *m) {
    const g3n_config *c = &m->cfg;
    g3n_model_info i;
    memset(&i, 0, sizeof i);
    i.n_vocab = c->n_vocab;
    i.n_vocab_text = c->n_vocab_ple;
    i.n_layer = c->n_layer;
    i.n_embd = c->n_embd;
    i.n_head = c->n_head;
    i.n_head_kv = c->n_head_kv;
    i.head_dim = c->head_dim;
    i.n_ctx_max = c->n_ctx_max;
    i.sliding_window = c->sliding_window;
    i.first_shared_layer = c->first_shared;
    i.bos_id = c->bos_id;
    i.eos_id = c->eos_id;
    i.pad_id = c->pad_id;
    i.weight_bytes = m->weight_bytes;
    i.decode_bytes = m->decode_bytes;
    i.decode_bytes_sparse = m->decode_bytes_sparse;
    i.decode_bytes_greedy = m->decode_bytes_greedy;
    i.layout = m->layout;
    i.backend = m->be ? m->be->name : "";
    i.device_name = m->be ? m->be->device_name : "";
    i.decode_path = m->fused == FWD_FUSED && m->no_l2_hints ? FWD_FUSED_NO_L2_HINTS : fwd_path_name(m->fused);
    i.decode_paths = m->mega_ok ? "fused,split,mega" : "fused,split";
    i.decode_path_why = m->path_why;
    i.sparse = m->sparse;
    i.kv_type = m->kv_f16 ? "f16" : "f32";
    return i;
}

double g3n_model_read_bandwidth(g3n_model *m, size_t bytes) {
    return m->be->read_bandwidth(m->be, bytes ? bytes : (size_t)1 << 30);
}

size_t g3n_model_kv_read_bytes(const g3n_model *m, int pos) {
    const g3n_config *c = &m->cfg;
    if (pos < 0) return 0;
    const size_t seen = (size_t)pos + 1;
    size_t keys = 0;
    for (int l = 0; l < c->n_layer; l++)
        keys += c->is_sliding[l] && seen > (size_t)c->sliding_window ? (size_t)c->sliding_window : seen;
    return model_kv_bytes(m, keys);
}

size_t g3n_model_device_memory(g3n_model *m) {
    return m->be->device_memory_used ? m->be->device_memory_used(m->be) : 0;
}
