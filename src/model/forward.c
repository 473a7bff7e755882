/* forward.c: the Gemma 3n text decoder forward pass, written once, straight-line,
 * as calls into the backend (backend.h). One function per block, in data-flow
 * order: embeddings and per-layer inputs, AltUp init, then per layer AltUp
 * predict, LAuReL, attention (with KV sharing), MLP (with Gaussian top-k
 * sparsity), AltUp correct and the per-layer input injection, then the AltUp
 * collapse, the final norm, the tied LM head and soft-capping.
 *
 * It works on a batch of n token rows (one sequence's prompt chunk, or one token
 * of each of several sequences); it never touches activation memory itself and
 * allocates nothing: the scratch comes from fwd_scratch_create. The maths follows
 * ../shared/gemma3n/SPEC.md §3 and transformers' modeling_gemma3n.py in fp32. */
#include <math.h>
#include <string.h>

#include "model/forward.h"

struct fwd_scratch {
    uint64_t id;  /* unique per scratch ever made: recorded steps are keyed by it,
                     since a new scratch may reuse a freed one's address with
                     another layout */
    int rows;     /* capacity in token rows */
    int reach;    /* this step's batch_reach where it is a decode step, else 0 */
    int lm_rows;  /* rows of logits computed at once */
    void *arena;  /* one backend allocation holding every buffer below */
    float *e;     /* [rows, D] scaled embedding (plane 0 at init) */
    float *z;     /* [rows, L*P] PLE table rows */
    float *proj;  /* [rows, L*P] per-layer projection */
    float *ple;   /* [L][rows][P] per-layer inputs */
    float *S;     /* [A][rows][D] AltUp planes */
    float *pred;  /* [A][rows][D] predictions, then corrections */
    float *x;     /* [rows, D] normed active plane */
    float *rn;    /* [rows, D] router input */
    float *mod;   /* [rows, A] router output */
    float *lt;    /* [rows, R] LAuReL inner */
    float *lau;   /* [rows, D] LAuReL output */
    float *q;     /* [rows, Hq*hd] */
    float *k, *v; /* [rows, Hkv*hd] */
    float *att;   /* [rows, Hq*hd] attention output */
    float *t0;    /* [rows, D] */
    float *s;     /* [rows, D] residual after attention + LAuReL */
    float *u;     /* [rows, D] MLP input */
    float *gate;  /* [rows, Imax] */
    float *up;    /* [rows, Imax] */
    float *o;     /* [rows, D] layer output */
    float *pg;    /* [rows, P] per-layer gate */
    float *ple_out; /* [rows, D] per-layer input projection (fused path: added by the next layer) */
    float *parts;  /* [FWD_PARTS, D] a one-row step's down product as K-slice sums (matmul_parts) */
    float *logits; /* [lm_rows, V] */
    int top_m, top_n; /* fwd_set_top */
    int pruned;       /* rows of the last step's logits that hold only the candidates for their best
                         top_m of the first top_n (logits_pruned; 0: none); fwd_logits_need completes them */
};

static size_t fl(size_t n) { return (n + 15) & ~(size_t)15; } /* 64-byte alignment */

#define FWD_PARTS 8 /* most K-slice sums of the down product a one-row step keeps */

fwd_scratch *fwd_scratch_create(g3n_model *m, int rows, int lm_rows) {
    const g3n_config *c = &m->cfg;
    size_t R = (size_t)rows, D = (size_t)c->n_embd, LP = (size_t)c->n_layer * c->n_ple;
    size_t A = (size_t)c->n_altup, qd = (size_t)c->n_head * c->head_dim;
    size_t kvd = (size_t)c->n_head_kv * c->head_dim, imax = 0;
    for (int l = 0; l < c->n_layer; l++) imax = G3N_MAX(imax, (size_t)c->n_ff[l]);
    static uint64_t next_id;
    fwd_scratch *f = g3n_calloc(1, sizeof(*f));
    f->id = __atomic_add_fetch(&next_id, 1, __ATOMIC_RELAXED);
    f->rows = rows;
    f->lm_rows = G3N_MAX(1, G3N_MIN(rows, lm_rows));
    size_t sizes[] = {R * D,    R * LP,   R * LP,   R * LP,   A * R * D, A * R * D,
                      R * D,    R * D,    R * A,    R * c->laurel_rank,    R * D,
                      R * qd,   R * kvd,  R * kvd,  R * qd,   R * D,     R * D,
                      R * D,    R * imax, R * imax, R * D,    R * c->n_ple,
                      (size_t)f->lm_rows * c->n_vocab, R * D, FWD_PARTS * D};
    float **dst[] = {&f->e,   &f->z,  &f->proj, &f->ple,  &f->S,    &f->pred, &f->x,
                     &f->rn,  &f->mod, &f->lt,  &f->lau,  &f->q,    &f->k,    &f->v,
                     &f->att, &f->t0, &f->s,    &f->u,    &f->gate, &f->up,   &f->o,
                     &f->pg,  &f->logits, &f->ple_out, &f->parts};
    size_t n = sizeof(sizes) / sizeof(sizes[0]), total = 0;
    G3N_ASSERT(n == sizeof(dst) / sizeof(dst[0]));
    for (size_t i = 0; i < n; i++) total += fl(sizes[i]);
    f->arena = m->be->alloc(m->be, total * sizeof(float));
    float *p = f->arena;
    for (size_t i = 0; i < n; i++) {
        *dst[i] = p;
        p += fl(sizes[i]);
    }
    return f;
}

void fwd_scratch_free(g3n_model *m, fwd_scratch *f) {
    if (!f) return;
    m->be->free(m->be, f->arena);
    free(f);
}


/* m[r] = tanh(W_router . (rmsnorm(x[r], router_norm) / D))   (SPEC §3.0) */
static void altup_router(g3n_model *M, fwd_scratch *f, const g3n_layer_weights *lw,
                         const float *x, int n) {
    g3n_backend *be = M->be;
    const g3n_config *c = &M->cfg;
    be->rmsnorm(be, f->rn, x, lw->altup_router_norm, n, c->n_embd, c->rms_eps);
    be->scale(be, f->rn, f->rn, 1.0f / (float)c->n_embd, (size_t)n * c->n_embd);
    be->matmul(be, f->mod, &lw->altup_router, f->rn, n);
    be->tanh_(be, f->mod, f->mod, (size_t)n * c->n_altup);
}

/* Embedding, per-layer inputs and the A AltUp planes (SPEC §3.1-3.3). */
static void embed_tokens(g3n_model *M, fwd_scratch *f, int n) {
    g3n_backend *be = M->be;
    const g3n_config *c = &M->cfg;
    const g3n_weights *w = &M->w;
    const size_t D = (size_t)c->n_embd, plane = (size_t)n * D;
    float *S0 = f->S;
    be->embed(be, S0, &w->embed_tokens, sqrtf((float)c->n_embd));
    be->embed(be, f->z, &w->embed_tokens_per_layer, sqrtf((float)c->n_ple));
    const int fused = M->fused && be->magnitude_match_planes;
    if (fused) { /* the per-layer projection and the planes' products in one pass */
        const g3n_mat *W[G3N_MAX_ALTUP] = {&w->per_layer_model_projection};
        float *y[G3N_MAX_ALTUP] = {f->proj};
        const float *x[G3N_MAX_ALTUP] = {S0};
        for (int k = 1; k < c->n_altup; k++)
            W[k] = &w->altup_projections[k - 1], y[k] = f->S + (size_t)k * plane, x[k] = S0;
        be->matmul_multi(be, c->n_altup, W, y, x, n);
    } else {
        be->matmul(be, f->proj, &w->per_layer_model_projection, S0, n);
    }
    be->ple_combine(be, f->ple, f->proj, f->z, w->per_layer_projection_norm, n, c->n_layer,
                    c->n_ple, (float)(1.0 / sqrt((double)c->n_embd)), c->rms_eps,
                    (float)(1.0 / sqrt(2.0)));
    if (fused) {
        be->magnitude_match_planes(be, f->S, plane, c->n_altup, n, c->n_embd, 1e-5f);
        return;
    }
    for (int k = 1; k < c->n_altup; k++) {
        float *Sk = f->S + (size_t)k * plane;
        be->matmul(be, Sk, &w->altup_projections[k - 1], S0, n);
        be->magnitude_match(be, Sk, S0, n, c->n_embd, 1e-5f);
    }
}

/* Self-attention of layer l on the normed active plane f->x; result in f->t0,
 * already post-attention-normed. */
static void attention_block(g3n_model *M, fwd_scratch *f, int l, int n) {
    g3n_backend *be = M->be;
    const g3n_config *c = &M->cfg;
    const g3n_layer_weights *lw = &M->w.layers[l];
    const int hd = c->head_dim, H = c->n_head, Hkv = c->n_head_kv;
    const float theta = c->is_sliding[l] ? c->rope_theta_sliding : c->rope_theta_full;
    be->matmul(be, f->q, &lw->q_proj, f->x, n);
    be->rmsnorm(be, f->q, f->q, lw->q_norm, n * H, hd, c->rms_eps);
    be->rope(be, f->q, H, hd, theta);
    if (c->kv_source[l] == l) { /* this layer owns its K/V */
        g3n_vec none = {0, NULL};
        be->matmul(be, f->k, &lw->k_proj, f->x, n);
        be->rmsnorm(be, f->k, f->k, lw->k_norm, n * Hkv, hd, c->rms_eps);
        be->rope(be, f->k, Hkv, hd, theta);
        be->matmul(be, f->v, &lw->v_proj, f->x, n);
        be->rmsnorm(be, f->v, f->v, none, n * Hkv, hd, c->rms_eps);
        be->kv_store(be, l, f->k, f->v, Hkv * hd);
    }
    be->attention(be, f->att, f->q, c->kv_source[l], H, Hkv, hd,
                  c->is_sliding[l] ? c->sliding_window : 0);
    be->matmul(be, f->t0, &lw->o_proj, f->att, n);
    be->rmsnorm(be, f->t0, f->t0, lw->post_attention_layernorm, n, c->n_embd, c->rms_eps);
}

/* MLP of layer l on f->u; result in f->t0 (before its post-norm). */
static void mlp_block(g3n_model *M, fwd_scratch *f, int l, int n) {
    g3n_backend *be = M->be;
    const g3n_config *c = &M->cfg;
    const g3n_layer_weights *lw = &M->w.layers[l];
    const int I = c->n_ff[l];
    be->matmul(be, f->gate, &lw->gate_proj, f->u, n);
    if (c->sparsity[l] > 0) be->gaussian_topk(be, f->gate, n, I, c->kappa[l]);
    be->matmul(be, f->up, &lw->up_proj, f->u, n);
    be->gelu_mul(be, f->gate, f->gate, f->up, (size_t)n * I);
    be->matmul(be, f->t0, &lw->down_proj, f->gate, n);
}

/* One decoder layer: planes f->S in, planes f->S out (SPEC §3.4). */
static void decoder_layer(g3n_model *M, fwd_scratch *f, int l, int n) {
    g3n_backend *be = M->be;
    const g3n_config *c = &M->cfg;
    const g3n_layer_weights *lw = &M->w.layers[l];
    const int D = c->n_embd, A = c->n_altup;
    const size_t plane = (size_t)n * D;

    /* 1. AltUp predict: every plane from a router-weighted mix of all planes */
    altup_router(M, f, lw, f->S, n);
    be->altup_predict(be, f->pred, f->S, f->mod, lw->altup_prediction_coefs, A, n, D);
    const float *a = f->pred; /* the active plane */
    be->rmsnorm(be, f->x, a, lw->input_layernorm, n, D, c->rms_eps);

    /* 2. LAuReL: x + norm(right . left . x) */
    be->matmul(be, f->lt, &lw->laurel_left, f->x, n);
    be->matmul(be, f->lau, &lw->laurel_right, f->lt, n);
    be->rmsnorm(be, f->lau, f->lau, lw->post_laurel_norm, n, D, c->rms_eps);
    be->add(be, f->lau, f->lau, f->x, plane);

    /* 3. attention, then s = (a + attn + laurel) / sqrt(2) */
    attention_block(M, f, l, n);
    be->add3_scale(be, f->s, a, f->t0, f->lau, (float)(1.0 / sqrt(2.0)), plane);

    /* 4. MLP: o = s + norm(down(gelu(topk(gate(u))) * up(u))) */
    be->rmsnorm(be, f->u, f->s, lw->pre_feedforward_layernorm, n, D, c->rms_eps);
    mlp_block(M, f, l, n);
    be->rmsnorm(be, f->t0, f->t0, lw->post_feedforward_layernorm, n, D, c->rms_eps);
    be->add(be, f->o, f->s, f->t0, plane);

    /* 5. AltUp correct: every plane moves by its gain times (o - a) */
    altup_router(M, f, lw, f->o, n);
    be->altup_correct(be, f->pred, f->pred, f->o, f->mod, lw->altup_correction_coefs, A, n, D);

    /* 6. per-layer input: gate the corrected active plane, inject into planes 1.. */
    const float *c0 = f->pred;
    if (c->altup_correct_scale) {
        be->mul_vec(be, f->t0, c0, lw->altup_correct_output_scale, n, D);
        c0 = f->t0;
    }
    be->matmul(be, f->pg, &lw->per_layer_input_gate, c0, n);
    be->gelu_mul(be, f->pg, f->pg, f->ple + (size_t)l * n * c->n_ple, (size_t)n * c->n_ple);
    be->matmul(be, f->o, &lw->per_layer_projection, f->pg, n);
    be->rmsnorm(be, f->o, f->o, lw->post_per_layer_input_norm, n, D, c->rms_eps);
    for (int k = 1; k < A; k++) be->add(be, f->pred + k * plane, f->pred + k * plane, f->o, plane);

    float *tmp = f->S; /* the corrected planes become the state */
    f->S = f->pred;
    f->pred = tmp;
}

/* The backend's prefetch hint (backend.h) at a layer's start: the MLP's
 * matrices that its products read whole, in the order they are read (a sparse
 * layer reads its gate whole, few up rows and down columns). The ops before the
 * MLP (AltUp predict, attention, the small products) are bound by latency; the
 * memory can fetch these meanwhile, except where this layer's attention walks a
 * long context (kv_bytes: the keys and values a decode step's rows read here). */
static void prefetch_mlp(g3n_model *M, const fwd_scratch *f, int l, int n) {
    g3n_backend *be = M->be;
    const g3n_config *c = &M->cfg;
    const g3n_layer_weights *lw = &M->w.layers[l];
    if (!be->prefetch || M->no_l2_hints) return;
    const g3n_mat *W[3] = {&lw->gate_proj, &lw->up_proj, &lw->down_proj};
    const int keys = c->is_sliding[l] ? G3N_MIN(f->reach, c->sliding_window) : f->reach;
    be->prefetch(be, W, c->sparsity[l] > 0 && M->sparse ? 1 : 3, model_kv_bytes(M, (size_t)n * keys));
}

/* The same layer through the backend's fused ops (backend.h defines each as a
 * sequence of the basic ops above, in the same order): fewer passes over the
 * activations and fewer kernel launches on a GPU. */
static void decoder_layer_fused(g3n_model *M, fwd_scratch *f, int l, int n) {
    g3n_backend *be = M->be;
    const g3n_config *c = &M->cfg;
    const g3n_layer_weights *lw = &M->w.layers[l];
    const int D = c->n_embd, A = c->n_altup, owns = c->kv_source[l] == l;
    const float eps = c->rms_eps;
    const float theta = c->is_sliding[l] ? c->rope_theta_sliding : c->rope_theta_full;

    /* the previous layer's per-layer input (in f->ple_out) is added here */
    float *ple_prev = l > 0 ? f->ple_out : NULL;
    prefetch_mlp(M, f, l, n);
    g3n_vec ple_norm = l > 0 ? M->w.layers[l - 1].post_per_layer_input_norm : (g3n_vec){0, NULL};
    be->altup_predict_fused(be, f->pred, f->x, f->S, ple_prev, ple_norm, &lw->altup_router,
                            lw->altup_router_norm, lw->altup_prediction_coefs, lw->input_layernorm,
                            A, n, D, eps);
    const g3n_mat *W1[4] = {&lw->q_proj, &lw->laurel_left, &lw->k_proj, &lw->v_proj};
    float *y1[4] = {f->q, f->lt, f->k, f->v};
    const float *x1[4] = {f->x, f->x, f->x, f->x};
    if (be->attention_next) be->attention_next(be);
    be->matmul_multi(be, owns ? 4 : 2, W1, y1, x1, n);
    be->qkv_attention(be, f->att, f->q, f->k, f->v, lw->q_norm, lw->k_norm, owns ? l : -1,
                      c->kv_source[l], c->n_head, c->n_head_kv, c->head_dim, theta, eps,
                      c->is_sliding[l] ? c->sliding_window : 0);
    const g3n_mat *W2[2] = {&lw->o_proj, &lw->laurel_right};
    float *y2[2] = {f->t0, f->lau};
    const float *x2[2] = {f->att, f->lt};
    be->matmul_multi(be, 2, W2, y2, x2, n);
    be->attn_residual(be, f->s, f->u, f->t0, f->lau, f->x, f->pred, lw->post_attention_layernorm,
                      lw->post_laurel_norm, lw->pre_feedforward_layernorm, n, D, eps,
                      (float)(1.0 / sqrt(2.0)));
    float *mlp_out = f->t0; /* the MLP's output, as mlp_parts partial sums */
    int mlp_parts = 1;
    if (c->sparsity[l] > 0 && M->sparse) { /* read only the surviving rows/columns */
        be->mlp_sparse(be, f->t0, f->gate, f->up, &lw->gate_proj, &lw->up_proj, &lw->down_proj, f->u,
                       n, c->kappa[l]);
    } else {
        if (c->sparsity[l] > 0) { /* top-k needs the whole gate row first */
            const g3n_mat *W3[2] = {&lw->gate_proj, &lw->up_proj};
            float *y3[2] = {f->gate, f->up};
            const float *x3[2] = {f->u, f->u};
            be->matmul_multi(be, 2, W3, y3, x3, n);
            be->mlp_act(be, f->gate, f->up, n, c->n_ff[l], c->kappa[l]);
        } else {
            be->matmul_gate_up(be, f->gate, f->up, &lw->gate_proj, &lw->up_proj, f->u, n);
        }
        if (n == 1 && be->matmul_parts && be->altup_correct_gate) {
            /* the down product's K slices, added by altup_correct_gate as it reads them */
            mlp_out = f->parts;
            mlp_parts = be->matmul_parts(be, f->parts, &lw->down_proj, f->gate, n, FWD_PARTS);
        } else {
            be->matmul(be, f->t0, &lw->down_proj, f->gate, n);
        }
    }
    g3n_vec none = {0, NULL};
    const g3n_vec oscale = c->altup_correct_scale ? lw->altup_correct_output_scale : none;
    const float *ple_l = f->ple + (size_t)l * n * c->n_ple;
    if (be->altup_correct_gate) { /* corrected planes into S (dead since predict): the new state */
        be->altup_correct_gate(be, f->S, f->pred, f->o, mlp_out, mlp_parts, f->s, lw->post_feedforward_layernorm,
                               &lw->altup_router, lw->altup_router_norm, lw->altup_correction_coefs,
                               oscale, f->pg, &lw->per_layer_input_gate, ple_l, A, n, D, eps);
    } else {
        be->altup_correct_fused(be, f->pred, f->o, f->t0, f->s, lw->post_feedforward_layernorm,
                                &lw->altup_router, lw->altup_router_norm, lw->altup_correction_coefs,
                                oscale, A, n, D, eps);
        be->matmul_gelu_mul(be, f->pg, &lw->per_layer_input_gate, f->o, ple_l, n);
        float *tmp = f->S; /* the corrected planes become the state */
        f->S = f->pred;
        f->pred = tmp;
    }
    be->matmul(be, f->ple_out, &lw->per_layer_projection, f->pg, n);
    if (l == c->n_layer - 1) be->ple_add(be, f->S, f->ple_out, lw->post_per_layer_input_norm, A, n, D, eps);
}

/* The LM head over h [nr, D] into logits, soft-capped; where `best` > 0 (nr at
 * most G3N_PRUNE_ROWS), only what the best best_m of each row's first `best`
 * logits need (logits_pruned). */
static void unembed(g3n_model *M, float *logits, const float *h, int nr, int best, int best_m) {
    g3n_backend *be = M->be;
    const g3n_config *c = &M->cfg;
    const float cap = c->final_softcap > 0 ? c->final_softcap : 0;
    if (best > 0) {
        be->logits_pruned(be, logits, &M->w.embed_tokens, h, nr, best, best_m, cap);
        return;
    }
    be->matmul(be, logits, &M->w.embed_tokens, h, nr);
    if (cap > 0) be->softcap(be, logits, (size_t)nr * c->n_vocab, cap);
}

/* Collapse the planes of rows [r0, r0+nr) into logits (SPEC §3.7); best, best_m: unembed's. */
static void output_logits(g3n_model *M, fwd_scratch *f, int n, int r0, int nr, float *logits, int best, int best_m) {
    g3n_backend *be = M->be;
    const g3n_config *c = &M->cfg;
    const int D = c->n_embd, A = c->n_altup;
    const size_t plane = (size_t)n * D;
    const float *S0 = f->S + (size_t)r0 * D;
    float *h = f->t0; /* [nr, D] */
    if (M->fused && be->altup_unembed) { /* the A-1 products in one pass, then one op for the rest */
        const g3n_mat *W[G3N_MAX_ALTUP - 1];
        float *y[G3N_MAX_ALTUP - 1];
        const float *x[G3N_MAX_ALTUP - 1];
        for (int k = 1; k < A; k++) {
            W[k - 1] = &M->w.altup_unembed_projections[k - 1];
            y[k - 1] = f->pred + (size_t)k * plane; /* free now */
            x[k - 1] = f->S + k * plane + (size_t)r0 * D;
        }
        be->matmul_multi(be, A - 1, W, y, x, nr);
        be->altup_unembed(be, h, S0, f->pred + plane, plane, M->w.norm, A, nr, D, 1e-5f, c->rms_eps);
    } else {
        be->scale(be, h, S0, 1.0f, (size_t)nr * D);
        for (int k = 1; k < A; k++) {
            float *vk = f->pred + (size_t)k * plane; /* free now */
            be->matmul(be, vk, &M->w.altup_unembed_projections[k - 1], f->S + k * plane + (size_t)r0 * D, nr);
            be->magnitude_match(be, vk, S0, nr, D, 1e-5f);
            be->add(be, h, h, vk, (size_t)nr * D);
        }
        be->scale(be, h, h, 1.0f / (float)A, (size_t)nr * D);
        be->rmsnorm(be, h, h, M->w.norm, nr, D, c->rms_eps);
    }
    unembed(M, logits, h, nr, best, best_m);
}

const float *fwd_logits(const fwd_scratch *f) { return f->logits; }

void fwd_logits_need(g3n_model *M, fwd_scratch *f, int m, int n) {
    if (!f->pruned || (m >= 1 && m <= f->top_m && n == f->top_n)) return;
    unembed(M, f->logits, f->t0, f->pruned, 0, 0); /* h is still there: the next step writes it */
    f->pruned = 0;
}

void fwd_set_top(fwd_scratch *f, int m, int n) {
    f->top_m = m > 0 && n >= m ? m : 0;
    f->top_n = f->top_m ? n : 0;
}

const char *fwd_path_name(int path) {
    return path == FWD_MEGA ? "mega" : path == FWD_FUSED ? "fused" : "split";
}

int fwd_path_parse(const char *name) {
    if (strcmp(name, "split") == 0) return FWD_SPLIT;
    if (strcmp(name, "fused") == 0) return FWD_FUSED;
    if (strcmp(name, "mega") == 0) return FWD_MEGA;
    return -1;
}

int fwd_path_parse_hints(const char *name, int *hints_off) {
    *hints_off = strcmp(name, FWD_FUSED_NO_L2_HINTS) == 0;
    return *hints_off ? FWD_FUSED : fwd_path_parse(name);
}

void fwd_dec_model_init(g3n_model *M) {
    const g3n_config *c = &M->cfg;
    g3n_dec_model *d = &M->dec;
    d->n_layer = c->n_layer, d->dim = c->n_embd, d->n_altup = c->n_altup, d->n_head = c->n_head;
    d->n_head_kv = c->n_head_kv, d->head_dim = c->head_dim, d->n_ple = c->n_ple;
    d->laurel_rank = c->laurel_rank, d->eps = c->rms_eps, d->res_scale = (float)(1.0 / sqrt(2.0));
    d->layer = g3n_calloc((size_t)c->n_layer, sizeof(g3n_dec_layer));
    for (int l = 0; l < c->n_layer; l++) {
        const g3n_layer_weights *lw = &M->w.layers[l];
        g3n_dec_layer *o = &d->layer[l];
        o->q = &lw->q_proj, o->k = &lw->k_proj, o->v = &lw->v_proj, o->o = &lw->o_proj;
        o->laurel_left = &lw->laurel_left, o->laurel_right = &lw->laurel_right;
        o->gate = &lw->gate_proj, o->up = &lw->up_proj, o->down = &lw->down_proj;
        o->ple_gate = &lw->per_layer_input_gate, o->ple_proj = &lw->per_layer_projection;
        o->router = &lw->altup_router;
        o->in_norm = lw->input_layernorm, o->q_norm = lw->q_norm, o->k_norm = lw->k_norm;
        o->post_att = lw->post_attention_layernorm, o->post_laurel = lw->post_laurel_norm;
        o->pre_ff = lw->pre_feedforward_layernorm, o->post_ff = lw->post_feedforward_layernorm;
        o->out_scale = c->altup_correct_scale ? lw->altup_correct_output_scale : (g3n_vec){0, NULL};
        o->corr_coefs = lw->altup_correction_coefs, o->pred_coefs = lw->altup_prediction_coefs;
        o->router_norm = lw->altup_router_norm, o->post_ple_norm = lw->post_per_layer_input_norm;
        o->n_ff = c->n_ff[l], o->owns_kv = c->kv_source[l] == l, o->kv_layer = c->kv_source[l];
        o->window = c->is_sliding[l] ? c->sliding_window : 0;
        o->topk = c->sparsity[l] > 0, o->kappa = c->kappa[l];
        o->theta = c->is_sliding[l] ? c->rope_theta_sliding : c->rope_theta_full;
    }
    /* exact sparsity stores the down matrices transposed: the backend says no */
    /* the mega path reads f32 caches only */
    M->mega_ok = !M->kv_f16 && M->be->decode_layers && M->be->decode_layers(M->be, d, NULL);
}

/* Every layer of a one-token step in one backend call (FWD_MEGA); 0 if not taken. */
static int layers_whole(g3n_model *M, fwd_scratch *f, int n) {
    if (M->fused != FWD_MEGA || !M->mega_ok || n != 1 || fwd_debug_hook) return 0;
    g3n_dec_bufs b = {f->S,   f->ple, f->q,  f->k,    f->v,  f->lt, f->att,    f->t0,
                      f->lau, f->gate, f->up, f->s,    f->pg, f->ple_out};
    return M->be->decode_layers(M->be, &M->dec, &b);
}

static void layers_run(g3n_model *M, fwd_scratch *f, int n) {
    if (layers_whole(M, f, n)) return;
    for (int l = 0; l < M->cfg.n_layer; l++) {
        if (M->fused) decoder_layer_fused(M, f, l, n);
        else decoder_layer(M, f, l, n);
        if (fwd_debug_hook) fwd_debug_hook(M, l, f->S, n);
    }
}

fwd_hook_fn fwd_debug_hook;

/* Everything a recorded step depends on besides the per-step metadata. */
static uint64_t step_key(const g3n_model *M, const fwd_scratch *f, const g3n_batch *b, int out_row0) {
    uint64_t h = 1469598103934665603ull;
#define MIX(v) (h = (h ^ (uint64_t)(v)) * 1099511628211ull)
    MIX(f->id);
    MIX(b->n);
    MIX(out_row0);
    MIX(b->n_seq);
    MIX(M->fused);
    MIX(M->no_l2_hints);
    MIX(f->top_m);
    MIX(f->top_n);
    MIX(f->pruned);                   /* the LM head read through the backend's copy (unembed) */
    const int decode = batch_one_per_seq(b);
    MIX(decode);                      /* a backend may take another path for decode steps */
    if (decode) MIX(batch_reach(b)); /* ... sized by the context reached */
    for (int i = 0; i < b->n_seq; i++) MIX((uintptr_t)b->kv[i]);
#undef MIX
    return h;
}

void fwd_run(g3n_model *M, fwd_scratch *f, const g3n_batch *b, int out_row0, float *logits_host) {
    g3n_backend *be = M->be;
    const int n = b->n;
    G3N_ASSERT(n > 0 && n <= f->rows && out_row0 >= 0 && out_row0 <= n);
    be->batch_set(be, b);
    f->reach = batch_one_per_seq(b) ? batch_reach(b) : 0;
    float *S_orig = f->S, *pred_orig = f->pred;
    const size_t V = (size_t)M->cfg.n_vocab;
    const int n_out = n - out_row0;
    /* a step whose samplers take from the best m logits needs no other (unembed) */
    f->pruned = n_out >= 1 && n_out <= M->prune_rows && f->top_m >= 1 && !logits_host ? n_out : 0;
    if (n_out <= f->lm_rows) {
        /* one step, one block of logits: recordable and replayable */
        int replayed = 0, recording = be->graph_begin && !fwd_debug_hook;
        if (recording) replayed = be->graph_begin(be, step_key(M, f, b, out_row0));
        if (!replayed) {
            embed_tokens(M, f, n);
            layers_run(M, f, n);
            if (n_out > 0) output_logits(M, f, n, out_row0, n_out, f->logits, f->pruned ? f->top_n : 0, f->top_m);
            if (n_out == 1 && f->top_m && be->logits_top_queue) /* the sampler's candidates, with the step */
                be->logits_top_queue(be, f->logits, 1, (size_t)M->cfg.n_vocab, f->top_n, f->top_m);
            f->S = S_orig;
            f->pred = pred_orig;
            if (recording) be->graph_end(be);
        }
        if (n_out > 0 && logits_host) be->read(be, logits_host, f->logits, (size_t)n_out * V * sizeof(float));
        return;
    }
    G3N_ASSERT(logits_host);
    embed_tokens(M, f, n);
    layers_run(M, f, n);
    for (int r0 = out_row0; r0 < n; r0 += f->lm_rows) {
        int nr = G3N_MIN(f->lm_rows, n - r0);
        output_logits(M, f, n, r0, nr, f->logits, 0, 0);
        be->read(be, logits_host + (size_t)(r0 - out_row0) * V, f->logits, (size_t)nr * V * sizeof(float));
    }
    f->S = S_orig;
    f->pred = pred_orig;
}
