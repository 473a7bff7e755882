/* cpu_ref.c: the reference backend. Every op of backend.h as plain loops with
 * double accumulation, single-threaded: slow on purpose, obvious on purpose.
 * It is the oracle that cpu.c (and later CUDA) are tested against, and it can
 * run the whole model (--device cpu-ref). It is not tuned and never will be. */
#define _POSIX_C_SOURCE 200809L
#include "backend/cpu/cpu_internal.h"
#include "quant.h"

#include <math.h>

/* ---- memory ------------------------------------------------------------------ */

static void *ref_alloc(g3n_backend *be, size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0) {
        fprintf(stderr, "g3n: out of memory allocating %zu bytes\n", bytes);
        abort();
    }
    memset(p, 0, bytes);
    return p;
}
static void ref_free(g3n_backend *be, void *p) { free(p); }
static void ref_copy(g3n_backend *be, void *dst, const void *src, size_t bytes) {
    memcpy(dst, src, bytes);
}
static int ref_mat_prepare(g3n_backend *be, g3n_mat *m, char *err, size_t errlen) {
    if (m->bits) return 0; /* quantized: checked by the loader, read by g3n_mat_row */
    if (m->dtype != G3N_F32 && m->dtype != G3N_F16 && m->dtype != G3N_BF16)
        return g3n_err(err, errlen, "%s: dtype %s is not supported by the CPU backend",
                       m->name ? m->name : "?", g3n_dtype_name((g3n_dtype)m->dtype));
    return 0;
}

static void ref_destroy(g3n_backend *be) {
    cpu_ctx *c = be->ctx;
    free(c->scratch);
    free(c);
    free(be);
}

static void ref_batch_set(g3n_backend *be, const g3n_batch *b) {
    cpu_ctx *c = be->ctx;
    c->batch = *b;
}

float *cpu_scratch(g3n_backend *be, size_t count) {
    cpu_ctx *c = be->ctx;
    if (count > c->scratch_n) {
        free(c->scratch);
        c->scratch = g3n_malloc(count * sizeof(float));
        c->scratch_n = count;
    }
    return c->scratch;
}

/* ---- weights ------------------------------------------------------------------- */

size_t g3n_mat_bytes(const g3n_mat *W) {
    const size_t n = (size_t)W->rows * (size_t)W->cols;
    if (!W->bits) return n * g3n_dtype_size((g3n_dtype)W->dtype);
    return (size_t)W->rows * g3n_quant_row_words(W->cols, W->bits) * 4 +
           2 * (n / (size_t)W->group_size) * g3n_dtype_size((g3n_dtype)W->sdtype);
}

void g3n_mat_row(const g3n_mat *W, int r, float *out) {
    size_t off = (size_t)r * (size_t)W->cols;
    if (W->bits) {
        const size_t ng = (size_t)(W->cols / W->group_size), es = g3n_dtype_size((g3n_dtype)W->sdtype);
        g3n_dequant_row((const uint32_t *)W->data + (size_t)r * g3n_quant_row_words(W->cols, W->bits),
                        (const char *)W->scales + (size_t)r * ng * es,
                        (const char *)W->biases + (size_t)r * ng * es, W->sdtype, W->bits,
                        W->group_size, W->cols, out);
        return;
    }
    switch (W->dtype) {
    case G3N_F32: memcpy(out, (const float *)W->data + off, (size_t)W->cols * 4); break;
    case G3N_BF16: {
        const uint16_t *p = (const uint16_t *)W->data + off;
        for (int i = 0; i < W->cols; i++) out[i] = g3n_bf16_to_f32(p[i]);
        break;
    }
    case G3N_F16: {
        const uint16_t *p = (const uint16_t *)W->data + off;
        for (int i = 0; i < W->cols; i++) out[i] = g3n_f16_to_f32(p[i]);
        break;
    }
    default: G3N_ASSERT(0 && "unsupported weight dtype");
    }
}

static void ref_matmul(g3n_backend *be, float *y, const g3n_mat *W, const float *x, int rows) {
    float *row = cpu_scratch(be, (size_t)W->cols);
    for (int o = 0; o < W->rows; o++) {
        g3n_mat_row(W, o, row);
        for (int r = 0; r < rows; r++) {
            const float *xr = x + (size_t)r * W->cols;
            double acc = 0;
            for (int i = 0; i < W->cols; i++) acc += (double)row[i] * xr[i];
            y[(size_t)r * W->rows + o] = (float)acc;
        }
    }
}

static void ref_embed(g3n_backend *be, float *y, const g3n_mat *W, float scale) {
    cpu_ctx *c = be->ctx;
    for (int t = 0; t < c->batch.n; t++) {
        int id = c->batch.ids[t];
        if (id < 0 || id >= W->rows) id = 0;
        float *yr = y + (size_t)t * W->cols;
        g3n_mat_row(W, id, yr);
        for (int i = 0; i < W->cols; i++) yr[i] *= scale;
    }
}

/* ---- norms and elementwise ---------------------------------------------------- */

static void ref_rmsnorm(g3n_backend *be, float *y, const float *x, g3n_vec w, int rows, int dim,
                        float eps) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * dim;
        float *yr = y + (size_t)r * dim;
        double ss = 0;
        for (int i = 0; i < dim; i++) ss += (double)xr[i] * xr[i];
        float inv = (float)(1.0 / sqrt(ss / dim + (double)eps));
        for (int i = 0; i < dim; i++) yr[i] = w.data ? xr[i] * inv * w.data[i] : xr[i] * inv;
    }
}

static void ref_rope(g3n_backend *be, float *x, int n_head, int head_dim, float theta) {
    cpu_ctx *c = be->ctx;
    int half = head_dim / 2;
    for (int t = 0; t < c->batch.n; t++) {
        float p = (float)c->batch.pos[t];
        for (int i = 0; i < half; i++) {
            /* fp32 angle as transformers computes it */
            float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)head_dim);
            float phi = inv_freq * p;
            float cs = cosf(phi), sn = sinf(phi);
            for (int h = 0; h < n_head; h++) {
                float *v = x + ((size_t)t * n_head + h) * head_dim;
                float a = v[i], b = v[i + half];
                v[i] = a * cs - b * sn;
                v[i + half] = b * cs + a * sn;
            }
        }
    }
}

/* Element i of cache array p (L->k or L->v), and storing one: f32, or f16 rounded to nearest even */
static float kv_get(const g3n_kv_layer *L, const void *p, size_t i) {
    return L->f16 ? g3n_f16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static void kv_put(const g3n_kv_layer *L, void *p, size_t i, float x) {
    if (L->f16) ((uint16_t *)p)[i] = g3n_f32_to_f16(x);
    else ((float *)p)[i] = x;
}

static void ref_kv_store(g3n_backend *be, int layer, const float *k, const float *v, int kv_dim) {
    cpu_ctx *c = be->ctx;
    for (int t = 0; t < c->batch.n; t++) {
        g3n_kv_layer *L = &c->batch.kv[c->batch.seq[t]]->layer[layer];
        G3N_ASSERT(L->k && L->cap > 0);
        size_t o = (size_t)(c->batch.pos[t] % L->cap) * kv_dim;
        for (int i = 0; i < kv_dim; i++) {
            kv_put(L, L->k, o + i, k[(size_t)t * kv_dim + i]);
            kv_put(L, L->v, o + i, v[(size_t)t * kv_dim + i]);
        }
    }
}

static void ref_attention(g3n_backend *be, float *out, const float *q, int layer, int n_head,
                          int n_head_kv, int head_dim, int window) {
    cpu_ctx *c = be->ctx;
    int group = n_head / n_head_kv;
    int kv_dim = n_head_kv * head_dim;
    for (int t = 0; t < c->batch.n; t++) {
        const g3n_kv_layer *L = &c->batch.kv[c->batch.seq[t]]->layer[layer];
        int p = c->batch.pos[t];
        int lo = window > 0 ? G3N_MAX(0, p - window + 1) : 0;
        int nk = p - lo + 1;
        G3N_ASSERT(nk <= L->cap);
        float *sc = cpu_scratch(be, (size_t)nk);
        for (int h = 0; h < n_head; h++) {
            const float *qh = q + ((size_t)t * n_head + h) * head_dim;
            int hk = h / group;
            double mx = -INFINITY;
            for (int j = 0; j < nk; j++) {
                const size_t kj = (size_t)((lo + j) % L->cap) * kv_dim + (size_t)hk * head_dim;
                double s = 0;
                for (int i = 0; i < head_dim; i++) s += (double)qh[i] * kv_get(L, L->k, kj + i);
                sc[j] = (float)s;
                if (s > mx) mx = s;
            }
            double sum = 0;
            for (int j = 0; j < nk; j++) sum += exp((double)sc[j] - mx);
            float *oh = out + ((size_t)t * n_head + h) * head_dim;
            for (int i = 0; i < head_dim; i++) {
                double acc = 0;
                for (int j = 0; j < nk; j++) {
                    const size_t vj = (size_t)((lo + j) % L->cap) * kv_dim + (size_t)hk * head_dim;
                    acc += exp((double)sc[j] - mx) * kv_get(L, L->v, vj + i);
                }
                oh[i] = (float)(acc / sum);
            }
        }
    }
}

static void ref_add(g3n_backend *be, float *y, const float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] = a[i] + b[i];
}
static void ref_scale(g3n_backend *be, float *y, const float *x, float s, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] = x[i] * s;
}
static void ref_add3_scale(g3n_backend *be, float *y, const float *a, const float *b,
                           const float *c, float s, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] = (a[i] + b[i] + c[i]) * s;
}
static void ref_mul_vec(g3n_backend *be, float *y, const float *x, g3n_vec w, int rows, int dim) {
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < dim; i++) y[(size_t)r * dim + i] = x[(size_t)r * dim + i] * w.data[i];
}

float cpu_gelu_tanh(float z) {
    const float k = 0.7978845608028654f; /* sqrt(2/pi) */
    return 0.5f * z * (1.0f + tanhf(k * (z + 0.044715f * z * z * z)));
}

static void ref_gelu_mul(g3n_backend *be, float *y, const float *g, const float *u, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] = cpu_gelu_tanh(g[i]) * (u ? u[i] : 1.0f);
}

static void ref_gaussian_topk(g3n_backend *be, float *x, int rows, int dim, float kappa) {
    for (int r = 0; r < rows; r++) {
        float *xr = x + (size_t)r * dim;
        double s = 0;
        for (int i = 0; i < dim; i++) s += xr[i];
        double mean = s / dim, v = 0;
        for (int i = 0; i < dim; i++) v += ((double)xr[i] - mean) * ((double)xr[i] - mean);
        float cutoff = (float)mean + (float)sqrt(v / dim) * kappa;
        for (int i = 0; i < dim; i++) xr[i] = xr[i] > cutoff ? xr[i] - cutoff : 0.0f;
    }
}

static void ref_tanh(g3n_backend *be, float *y, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] = tanhf(x[i]);
}
static void ref_softcap(g3n_backend *be, float *x, size_t n, float cap) {
    for (size_t i = 0; i < n; i++) x[i] = cap * tanhf(x[i] / cap);
}

/* ---- AltUp ---------------------------------------------------------------------- */

static void ref_altup_predict(g3n_backend *be, float *pred, const float *S, const float *m,
                              g3n_vec coefs, int A, int rows, int dim) {
    size_t plane = (size_t)rows * dim;
    for (int r = 0; r < rows; r++) {
        float C[G3N_CPU_MAX_ALTUP * G3N_CPU_MAX_ALTUP];
        for (int k = 0; k < A * A; k++) {
            double acc = 0;
            for (int j = 0; j < A; j++) acc += (double)coefs.data[k * A + j] * m[r * A + j];
            C[k] = (float)acc;
        }
        for (int i = 0; i < A; i++) {
            for (int d = 0; d < dim; d++) {
                size_t o = (size_t)r * dim + d;
                double acc = S[i * plane + o];
                for (int j = 0; j < A; j++) acc += (double)C[i * A + j] * S[j * plane + o];
                pred[i * plane + o] = (float)acc;
            }
        }
    }
}

static void ref_altup_correct(g3n_backend *be, float *corr, const float *pred, const float *o,
                              const float *m, g3n_vec coefs, int A, int rows, int dim) {
    size_t plane = (size_t)rows * dim;
    for (int r = 0; r < rows; r++) {
        float k[G3N_CPU_MAX_ALTUP];
        for (int i = 0; i < A; i++) {
            double acc = 0;
            for (int j = 0; j < A; j++) acc += (double)coefs.data[i * A + j] * m[r * A + j];
            k[i] = (float)acc + 1.0f;
        }
        for (int d = 0; d < dim; d++) {
            size_t off = (size_t)r * dim + d;
            float delta = o[off] - pred[off]; /* pred[0] */
            for (int i = 0; i < A; i++) corr[i * plane + off] = pred[i * plane + off] + k[i] * delta;
        }
    }
}

static void ref_magnitude_match(g3n_backend *be, float *y, const float *ref, int rows, int dim,
                                float floor_ms) {
    for (int r = 0; r < rows; r++) {
        float *yr = y + (size_t)r * dim;
        const float *rr = ref + (size_t)r * dim;
        double a = 0, b = 0;
        for (int i = 0; i < dim; i++) {
            a += (double)rr[i] * rr[i];
            b += (double)yr[i] * yr[i];
        }
        float target = (float)sqrt(a / dim);
        float ms = (float)(b / dim);
        float cur = sqrtf(ms > floor_ms ? ms : floor_ms);
        for (int i = 0; i < dim; i++) yr[i] = yr[i] * target / cur;
    }
}

static void ref_ple_combine(g3n_backend *be, float *out, const float *proj, const float *z,
                            g3n_vec norm, int rows, int L, int P, float proj_scale, float eps,
                            float out_scale) {
    float *tmp = cpu_scratch(be, (size_t)P);
    for (int t = 0; t < rows; t++) {
        for (int l = 0; l < L; l++) {
            const float *pr = proj + ((size_t)t * L + l) * P;
            const float *zr = z + ((size_t)t * L + l) * P;
            for (int i = 0; i < P; i++) tmp[i] = pr[i] * proj_scale;
            ref_rmsnorm(be, tmp, tmp, norm, 1, P, eps);
            float *o = out + ((size_t)l * rows + t) * P;
            for (int i = 0; i < P; i++) o[i] = (tmp[i] + zr[i]) * out_scale;
        }
    }
}

static double ref_read_bandwidth(g3n_backend *be, size_t bytes) {
    size_t n = bytes / sizeof(float);
    float *buf = ref_alloc(be, n * sizeof(float));
    double best = 0;
    volatile float sink = 0;
    for (int pass = 0; pass < 3; pass++) {
        double t0 = g3n_time_s();
        float s = 0;
        for (size_t i = 0; i < n; i++) s += buf[i];
        double dt = g3n_time_s() - t0;
        sink += s;
        if ((double)bytes / dt > best) best = (double)(n * sizeof(float)) / dt;
    }
    (void)sink;
    free(buf);
    return best;
}

/* ---- fused ops: by definition, these sequences of basic ops (through the
 * vtable, so a backend that overrides the basic ops runs them here too) ---- */

static void fused_matmul_multi(g3n_backend *be, int n, const g3n_mat *const *W, float *const *y,
                               const float *const *x, int rows) {
    for (int i = 0; i < n; i++) be->matmul(be, y[i], W[i], x[i], rows);
}

/* m[rows, A] = tanh(router . (rmsnorm(x, router_norm) / dim)); rows <= 64.
 * (The reference allocates its temporary; the engine's CPU path is the split one.) */
static void fused_router(g3n_backend *be, float *m, const float *x, const g3n_mat *router,
                         g3n_vec router_norm, int A, int rows, int dim, float eps) {
    float *rn = g3n_malloc(sizeof(float) * (size_t)rows * dim);
    be->rmsnorm(be, rn, x, router_norm, rows, dim, eps);
    be->scale(be, rn, rn, 1.0f / (float)dim, (size_t)rows * dim);
    float mm[64 * G3N_CPU_MAX_ALTUP];
    G3N_ASSERT(rows <= 64 && A <= G3N_CPU_MAX_ALTUP);
    be->matmul(be, mm, router, rn, rows);
    be->tanh_(be, m, mm, (size_t)rows * A);
    free(rn);
}

static void fused_ple_add(g3n_backend *be, float *pred, float *proj, g3n_vec post_norm, int A,
                          int rows, int dim, float eps);

static void fused_altup_predict(g3n_backend *be, float *pred, float *x, float *S, float *ple_proj,
                                g3n_vec ple_norm, const g3n_mat *router, g3n_vec router_norm,
                                g3n_vec coefs, g3n_vec in_norm, int A, int rows, int dim,
                                float eps) {
    if (ple_proj) fused_ple_add(be, S, ple_proj, ple_norm, A, rows, dim, eps);
    float m[64 * G3N_CPU_MAX_ALTUP];
    fused_router(be, m, S, router, router_norm, A, rows, dim, eps);
    be->altup_predict(be, pred, S, m, coefs, A, rows, dim);
    be->rmsnorm(be, x, pred, in_norm, rows, dim, eps);
}

static void fused_matmul_gelu_mul(g3n_backend *be, float *y, const g3n_mat *W, const float *x,
                                  const float *m, int rows) {
    be->matmul(be, y, W, x, rows);
    be->gelu_mul(be, y, y, m, (size_t)rows * W->rows);
}

static void fused_matmul_gate_up(g3n_backend *be, float *act, float *up, const g3n_mat *Wg,
                                 const g3n_mat *Wu, const float *x, int rows) {
    be->matmul(be, act, Wg, x, rows);
    be->matmul(be, up, Wu, x, rows);
    be->gelu_mul(be, act, act, up, (size_t)rows * Wg->rows);
}

static void fused_qkv_post(g3n_backend *be, float *q, float *k, float *v, g3n_vec q_norm,
                           g3n_vec k_norm, int layer, int n_head, int n_head_kv, int head_dim,
                           float theta, float eps) {
    cpu_ctx *c = be->ctx;
    const int n = c->batch.n;
    be->rmsnorm(be, q, q, q_norm, n * n_head, head_dim, eps);
    be->rope(be, q, n_head, head_dim, theta);
    if (layer < 0) return;
    g3n_vec none = {0, NULL};
    be->rmsnorm(be, k, k, k_norm, n * n_head_kv, head_dim, eps);
    be->rope(be, k, n_head_kv, head_dim, theta);
    be->rmsnorm(be, v, v, none, n * n_head_kv, head_dim, eps);
    be->kv_store(be, layer, k, v, n_head_kv * head_dim);
}

static void fused_qkv_attention(g3n_backend *be, float *out, float *q, float *k, float *v,
                                g3n_vec q_norm, g3n_vec k_norm, int layer, int attn_layer,
                                int n_head, int n_head_kv, int head_dim, float theta, float eps,
                                int window) {
    be->qkv_post(be, q, k, v, q_norm, k_norm, layer, n_head, n_head_kv, head_dim, theta, eps);
    be->attention(be, out, q, attn_layer, n_head, n_head_kv, head_dim, window);
}

static void fused_attn_residual(g3n_backend *be, float *s, float *u, float *att, float *lau_raw,
                                const float *x, const float *a, g3n_vec post_att,
                                g3n_vec post_laurel, g3n_vec pre_ff, int rows, int dim, float eps,
                                float res_scale) {
    const size_t n = (size_t)rows * dim;
    be->rmsnorm(be, lau_raw, lau_raw, post_laurel, rows, dim, eps);
    be->add(be, lau_raw, lau_raw, x, n);
    be->rmsnorm(be, att, att, post_att, rows, dim, eps);
    be->add3_scale(be, s, a, att, lau_raw, res_scale, n);
    be->rmsnorm(be, u, s, pre_ff, rows, dim, eps);
}

static void fused_mlp_act(g3n_backend *be, float *gate, const float *up, int rows, int n_ff,
                          float kappa) {
    if (kappa > 0) be->gaussian_topk(be, gate, rows, n_ff, kappa);
    be->gelu_mul(be, gate, gate, up, (size_t)rows * n_ff);
}

static void fused_mlp_act(g3n_backend *be, float *gate, const float *up, int rows, int n_ff,
                          float kappa);

static void fused_mlp_sparse(g3n_backend *be, float *y, float *gate, float *up, const g3n_mat *Wg,
                             const g3n_mat *Wu, const g3n_mat *Wd, const float *u, int rows,
                             float kappa) {
    be->matmul(be, gate, Wg, u, rows);
    be->matmul(be, up, Wu, u, rows);
    fused_mlp_act(be, gate, up, rows, Wg->rows, kappa);
    be->matmul(be, y, Wd, gate, rows);
}

static void fused_altup_correct(g3n_backend *be, float *pred, float *qs, float *f, const float *s,
                                g3n_vec post_ff, const g3n_mat *router, g3n_vec router_norm,
                                g3n_vec coefs, g3n_vec out_scale, int A, int rows, int dim,
                                float eps) {
    const size_t n = (size_t)rows * dim;
    be->rmsnorm(be, f, f, post_ff, rows, dim, eps);
    be->add(be, f, s, f, n);
    float m[64 * G3N_CPU_MAX_ALTUP];
    fused_router(be, m, f, router, router_norm, A, rows, dim, eps);
    be->altup_correct(be, pred, pred, f, m, coefs, A, rows, dim);
    if (out_scale.data) be->mul_vec(be, qs, pred, out_scale, rows, dim);
    else be->scale(be, qs, pred, 1.0f, n);
}

static void fused_altup_correct_gate(g3n_backend *be, float *out, const float *pred, float *qs, float *f,
                                     int f_parts, const float *s, g3n_vec post_ff, const g3n_mat *router,
                                     g3n_vec router_norm, g3n_vec coefs, g3n_vec out_scale, float *pg,
                                     const g3n_mat *gate, const float *ple, int A, int rows, int dim,
                                     float eps) {
    const size_t n = (size_t)rows * dim;
    for (int k = 1; k < f_parts; k++) be->add(be, f, f, f + k * n, n);
    be->scale(be, out, pred, 1.0f, (size_t)A * rows * dim);
    be->altup_correct_fused(be, out, qs, f, s, post_ff, router, router_norm, coefs, out_scale, A, rows, dim,
                            eps);
    be->matmul_gelu_mul(be, pg, gate, qs, ple, rows);
}

static void fused_ple_add(g3n_backend *be, float *pred, float *proj, g3n_vec post_norm, int A,
                          int rows, int dim, float eps) {
    const size_t n = (size_t)rows * dim;
    be->rmsnorm(be, proj, proj, post_norm, rows, dim, eps);
    for (int k = 1; k < A; k++) be->add(be, pred + k * n, pred + k * n, proj, n);
}

static void fused_magnitude_match_planes(g3n_backend *be, float *S, size_t plane, int A, int rows, int dim,
                                         float floor_ms) {
    for (int k = 1; k < A; k++) be->magnitude_match(be, S + (size_t)k * plane, S, rows, dim, floor_ms);
}

static void fused_altup_unembed(g3n_backend *be, float *out, const float *S0, float *v, size_t vstride,
                                g3n_vec norm, int A, int rows, int dim, float floor_ms, float eps) {
    const size_t n = (size_t)rows * dim;
    be->scale(be, out, S0, 1.0f, n);
    for (int k = 1; k < A; k++) {
        float *vk = v + (size_t)(k - 1) * vstride;
        be->magnitude_match(be, vk, S0, rows, dim, floor_ms);
        be->add(be, out, out, vk, n);
    }
    be->scale(be, out, out, 1.0f / (float)A, n);
    be->rmsnorm(be, out, out, norm, rows, dim, eps);
}

/* ---- construction ------------------------------------------------------------------ */

void cpu_ref_fill_ops(g3n_backend *be) {
    be->alloc = ref_alloc;
    be->free = ref_free;
    be->write = ref_copy;
    be->read = ref_copy;
    be->mat_prepare = ref_mat_prepare;
    be->destroy = ref_destroy;
    be->batch_set = ref_batch_set;
    be->matmul = ref_matmul;
    be->embed = ref_embed;
    be->rmsnorm = ref_rmsnorm;
    be->rope = ref_rope;
    be->kv_store = ref_kv_store;
    be->attention = ref_attention;
    be->add = ref_add;
    be->scale = ref_scale;
    be->add3_scale = ref_add3_scale;
    be->mul_vec = ref_mul_vec;
    be->gelu_mul = ref_gelu_mul;
    be->gaussian_topk = ref_gaussian_topk;
    be->tanh_ = ref_tanh;
    be->softcap = ref_softcap;
    be->altup_predict = ref_altup_predict;
    be->altup_correct = ref_altup_correct;
    be->magnitude_match = ref_magnitude_match;
    be->ple_combine = ref_ple_combine;
    be->read_bandwidth = ref_read_bandwidth;
    be->matmul_multi = fused_matmul_multi;
    be->altup_predict_fused = fused_altup_predict;
    be->matmul_gelu_mul = fused_matmul_gelu_mul;
    be->matmul_gate_up = fused_matmul_gate_up;
    be->qkv_post = fused_qkv_post;
    be->qkv_attention = fused_qkv_attention;
    be->attn_residual = fused_attn_residual;
    be->mlp_act = fused_mlp_act;
    be->mlp_sparse = fused_mlp_sparse;
    be->altup_correct_fused = fused_altup_correct;
    be->altup_correct_gate = fused_altup_correct_gate;
    be->ple_add = fused_ple_add;
    be->altup_unembed = fused_altup_unembed;
    be->magnitude_match_planes = fused_magnitude_match_planes;
}

g3n_backend *cpu_ref_backend_create(char *err, size_t errlen) {
    g3n_backend *be = g3n_calloc(1, sizeof(*be));
    be->name = "cpu-ref";
    snprintf(be->device_name, sizeof be->device_name, "cpu");
    be->ctx = g3n_calloc(1, sizeof(cpu_ctx));
    be->n_threads = 1;
    cpu_ref_fill_ops(be);
    return be;
}
