/* backend.h: the contract between the model (forward.c) and a compute backend.
 *
 * A backend owns memory (activations, KV caches, weights it uploads) and
 * implements exactly the ops forward.c needs, at that granularity, as a table of
 * plain C function pointers. Activations are f32 rows in backend memory: a
 * pointer `x` with `n` rows of `dim` floats, row-major. forward.c never touches
 * activation memory itself, so a GPU backend can run (and capture) the whole step.
 *
 * Per-step metadata (token ids, positions, which sequence each token belongs to)
 * is handed over once per step with batch_set; ops that need it read it there.
 * cpu_ref.c implements every op with plain loops and is the oracle for all the
 * others. A fused op is a new entry here, with its reference in cpu_ref.c first. */
#ifndef G3N_BACKEND_H
#define G3N_BACKEND_H

#include <stddef.h>
#include <stdint.h>

/* A weight matrix W[rows, cols] (rows = outputs) in its stored dtype, or mlx
 * affine-quantized (dtype U32, bits > 0; src/core/quant.h has the format). */
typedef struct {
    int dtype;         /* g3n_dtype: F32, F16, BF16, or U32 when quantized */
    int rows, cols;
    const void *data;  /* backend-visible; NULL when the tensor is absent */
    const char *name;  /* tensor name, for messages */
    int host_gather;   /* only rows are ever gathered (embed): a GPU backend may keep
                          it in host memory and copy the rows a step needs */
    int sparse_cols;   /* the input of products with this matrix is mostly exact
                          zeros (a down projection after Gaussian top-k): a backend
                          may store it transposed to read only the needed columns */
    int transposed;    /* set by the backend: data holds W^T [cols, rows] */
    /* quantized (bits > 0): data = packed rows [rows, cols*bits/32] u32,
     * scales and biases [rows, cols/group_size] of dtype sdtype */
    int bits, group_size, sdtype;
    const void *scales, *biases;
    int row_kernel;    /* also read element by element inside fused row kernels
                          (the AltUp router): a backend whose row kernels cannot
                          read the quantized form converts it at upload */
    size_t file_bytes; /* bytes as stored in the checkpoint (packed + scales + biases),
                          set by the loader: what the model reads, whatever form a
                          backend keeps */
    const void *tdata; /* set by a backend: W^T beside the packed form, for the
                          exact-sparsity gather of a quantized sparse_cols matrix,
                          in a form of the backend's (CUDA: the codes, scales and
                          biases transposed, or f32 values); NULL otherwise */
} g3n_mat;

/* Bytes of W as stored (packed weights + scales + biases when quantized). */
size_t g3n_mat_bytes(const g3n_mat *W);
/* Row r of W as f32 (W.cols floats), from host-readable W->data (cpu_ref.c). */
void g3n_mat_row(const g3n_mat *W, int r, float *out);

/* A small f32 vector (norm weights, scales, AltUp coefficients) in backend memory. */
typedef struct {
    int n;
    const float *data;
} g3n_vec;

/* One layer's K/V cache of one sequence. Position p lives in slot p % cap.
 * Sliding layers have cap >= window + n_batch - 1 (a ring); full layers cap = n_ctx.
 * Elements are f32, or f16 where f16 is set (g3n_model_params.kv_type): kv_store
 * rounds to nearest even, and attention uses every key and value, the step's own
 * included, as the cache holds it, so a token sees the same values in a prompt
 * and in a decode step. */
typedef struct {
    void *k, *v; /* [cap, n_head_kv * head_dim] each; NULL for layers that own none */
    int cap;
    int f16; /* elements are IEEE half (uint16_t) instead of float */
} g3n_kv_layer;

#define G3N_KV_MAX_LAYERS 128
#define G3N_TOP_MAX 256 /* logits_top: candidates at most */
#define G3N_PRUNE_ROWS 8 /* logits_pruned: rows at most */
typedef struct {
    g3n_kv_layer layer[G3N_KV_MAX_LAYERS];
} g3n_kv;

/* The tokens of one forward step. Token t belongs to sequence seq[t], whose
 * cache is kv[seq[t]], and sits at absolute position pos[t]. Within a sequence
 * positions are consecutive and increasing. */
typedef struct {
    int n;
    const int32_t *ids; /* [n] */
    const int32_t *pos; /* [n] */
    const int32_t *seq; /* [n] */
    g3n_kv *const *kv;  /* [n_seq] */
    int n_seq;
} g3n_batch;

/* 1 when no two tokens of the batch belong to the same sequence: a decode step
 * of one or several sequences (seq values are < n_seq, so n > n_seq never is). */
static inline int batch_one_per_seq(const g3n_batch *b) {
    if (b->n > b->n_seq) return 0;
    for (int t = 0; t < b->n; t++)
        for (int u = 0; u < t; u++)
            if (b->seq[u] == b->seq[t]) return 0;
    return 1;
}

/* The context a step reaches: the smallest power of two, at least 256, above its
 * largest position. It is part of a recorded decode step's key (forward.c:
 * steps where batch_one_per_seq holds), so a backend may size a decode step's
 * attention work by it rather than by the cache's room. */
static inline int batch_reach(const g3n_batch *b) {
    int top = 0, r = 256;
    for (int t = 0; t < b->n; t++) top = b->pos[t] > top ? b->pos[t] : top;
    while (r <= top && r < (1 << 30)) r *= 2;
    return r;
}

/* The decoder as the whole-step decode op (decode_layers) sees it: per layer its
 * matrices and vectors (forward.c's decoder_layer_fused names them the same). */
typedef struct {
    const g3n_mat *q, *k, *v, *o, *laurel_left, *laurel_right, *gate, *up, *down, *ple_gate, *ple_proj,
        *router;
    g3n_vec in_norm, q_norm, k_norm, post_att, post_laurel, pre_ff, post_ff, out_scale, corr_coefs,
        pred_coefs, router_norm, post_ple_norm;
    int n_ff, owns_kv, kv_layer, window, topk; /* topk: Gaussian top-k with kappa */
    float theta, kappa;
} g3n_dec_layer;

typedef struct {
    int n_layer, dim, n_altup, n_head, n_head_kv, head_dim, n_ple, laurel_rank;
    float eps, res_scale;
    g3n_dec_layer *layer; /* [n_layer] */
} g3n_dec_model;

/* One token's buffers in backend memory: S [A][dim] planes in and out, ple
 * [L][P] per-layer inputs, and scratch for every product's output. */
typedef struct {
    float *S;
    const float *ple;
    float *q, *k, *v, *lt, *att, *o, *lau, *gate, *up, *mlp, *pg, *ple_out;
} g3n_dec_bufs;

typedef struct g3n_backend g3n_backend;

struct g3n_backend {
    const char *name;
    char device_name[96]; /* the hardware, for reports and the decode-path cache */
    void *ctx;
    int n_threads;

    /* ---- memory ---- */
    void *(*alloc)(g3n_backend *be, size_t bytes); /* zeroed; aborts on exhaustion */
    void (*free)(g3n_backend *be, void *p);
    void (*write)(g3n_backend *be, void *dst, const void *src, size_t bytes); /* host -> be */
    void (*read)(g3n_backend *be, void *dst, const void *src, size_t bytes);  /* be -> host */
    /* Host memory the backend copies to and from fastest (pinned on a GPU);
     * NULL: plain malloc/free. */
    void *(*host_alloc)(g3n_backend *be, size_t bytes);
    void (*host_free)(g3n_backend *be, void *p);
    /* Make a weight matrix usable by this backend (CPU: borrow the mapping). */
    int (*mat_prepare)(g3n_backend *be, g3n_mat *m, char *err, size_t errlen);
    void (*destroy)(g3n_backend *be);
    /* Benchmark support: measured read bandwidth (bytes/s) of the memory weights
     * live in, streaming `bytes` with this backend's threads (or kernels). */
    double (*read_bandwidth)(g3n_backend *be, size_t bytes);
    /* Device memory in use now (the whole device, this process's share
     * included); NULL where it does not apply (CPU). */
    size_t (*device_memory_used)(g3n_backend *be);

    /* ---- step metadata ---- */
    void (*batch_set)(g3n_backend *be, const g3n_batch *b);

    /* ---- optional: record a step once, replay it (NULL where unsupported) ----
     * graph_begin(key) returns 1 if it replayed the step recorded for `key` (the
     * caller then issues no ops), 0 if the caller should issue the ops, which are
     * recorded until graph_end and then run. Everything a recorded step touches
     * must sit at the same addresses on every replay; the per-step metadata of
     * batch_set is read from backend memory, so it may change (a decode
     * step's within the key's batch_reach). */
    int (*graph_begin)(g3n_backend *be, uint64_t key);
    void (*graph_end)(g3n_backend *be);
    /* Wait for queued work (timing). NULL: ops are synchronous. */
    void (*sync)(g3n_backend *be);

    /* ---- ops (all on the current batch's n rows unless a count is given) ---- */

    /* y[r, :] = W . x[r, :] for r < rows.  y: [rows, W.rows], x: [rows, W.cols] */
    void (*matmul)(g3n_backend *be, float *y, const g3n_mat *W, const float *x, int rows);

    /* y[t, :] = W[ids[t], :] * scale for the batch's tokens; ids >= W.rows use row 0. */
    void (*embed)(g3n_backend *be, float *y, const g3n_mat *W, float scale);

    /* y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w  (w.data NULL: no weight). rows x dim. */
    void (*rmsnorm)(g3n_backend *be, float *y, const float *x, g3n_vec w, int rows, int dim,
                    float eps);

    /* Rotate-half RoPE in place on x: [n, n_head * head_dim], batch positions. */
    void (*rope)(g3n_backend *be, float *x, int n_head, int head_dim, float theta);

    /* Store the batch's k, v rows ([n, kv_dim] each) into cache layer `layer` of
     * each token's sequence at slot pos % cap. */
    void (*kv_store)(g3n_backend *be, int layer, const float *k, const float *v, int kv_dim);

    /* out[t] = softmax(q[t] . K^T) V over cache layer `layer` of token t's sequence,
     * keys at positions j <= pos[t] and, if window > 0, pos[t] - j < window.
     * Scale 1. q, out: [n, n_head * head_dim]; query head h uses KV head
     * h / (n_head / n_head_kv). */
    void (*attention)(g3n_backend *be, float *out, const float *q, int layer, int n_head,
                      int n_head_kv, int head_dim, int window);

    /* Elementwise over count floats. */
    void (*add)(g3n_backend *be, float *y, const float *a, const float *b, size_t count);
    void (*scale)(g3n_backend *be, float *y, const float *x, float s, size_t count);
    /* y = (a + b + c) * s */
    void (*add3_scale)(g3n_backend *be, float *y, const float *a, const float *b, const float *c,
                       float s, size_t count);
    /* y[r, i] = x[r, i] * w[i]  (rows x dim) */
    void (*mul_vec)(g3n_backend *be, float *y, const float *x, g3n_vec w, int rows, int dim);
    /* y = gelu_tanh(g) * u  (u NULL: y = gelu_tanh(g)) */
    void (*gelu_mul)(g3n_backend *be, float *y, const float *g, const float *u, size_t count);
    /* Per row: x = max(0, x - (mean(x) + kappa * std(x))), population std. */
    void (*gaussian_topk)(g3n_backend *be, float *x, int rows, int dim, float kappa);
    /* y = tanh(x) */
    void (*tanh_)(g3n_backend *be, float *y, const float *x, size_t count);
    /* x = cap * tanh(x / cap) */
    void (*softcap)(g3n_backend *be, float *x, size_t count, float cap);

    /* AltUp over A planes S: [A][rows][dim] (plane-major).
     * predict: c = coefs[A*A, A] . m[r] (coefs as f32 row-major), C[i][j] = c[A*i + j],
     *          pred[i][r] = S[i][r] + sum_j C[i][j] * S[j][r].          m: [rows, A]
     * correct: k = coefs[A, A] . m[r] + 1, corr[i][r] = pred[i][r] + k[i] * (o[r] - pred[0][r]).
     * (pred may not alias S; corr may alias pred.) */
    void (*altup_predict)(g3n_backend *be, float *pred, const float *S, const float *m,
                          g3n_vec coefs, int A, int rows, int dim);
    void (*altup_correct)(g3n_backend *be, float *corr, const float *pred, const float *o,
                          const float *m, g3n_vec coefs, int A, int rows, int dim);
    /* Per-layer inputs: out[l][t][:] = (rmsnorm(proj[t][l*P:(l+1)*P] * proj_scale, norm)
     * + z[t][l*P:(l+1)*P]) * out_scale for t < rows, l < L.  proj, z: [rows, L*P];
     * out is layer-major [L][rows][P] so that each layer reads a contiguous block. */
    void (*ple_combine)(g3n_backend *be, float *out, const float *proj, const float *z,
                        g3n_vec norm, int rows, int L, int P, float proj_scale, float eps,
                        float out_scale);
    /* Per row: y[r] *= sqrt(mean(ref[r]^2)) / sqrt(max(mean(y[r]^2), floor)). */
    void (*magnitude_match)(g3n_backend *be, float *y, const float *ref, int rows, int dim,
                            float floor_ms);

    /* ---- fused ops: the decode step in fewer passes. Each is defined as the
     * sequence of basic ops written in cpu_ref.c (cpu_ref_fused_*), which is
     * what the CPU backends run; a GPU backend implements them as single kernels
     * where it pays. forward.c uses them on the "fused" decode path. ---- */

    /* Several products in one pass: y[i] = W[i] . x[i] (rows each). */
    void (*matmul_multi)(g3n_backend *be, int n, const g3n_mat *const *W, float *const *y,
                         const float *const *x, int rows);
    /* y = gelu_tanh(W . x) * m   (m: [rows, W.rows]) */
    void (*matmul_gelu_mul)(g3n_backend *be, float *y, const g3n_mat *W, const float *x,
                            const float *m, int rows);
    /* Optional (NULL: matmul): y = W . x left as `parts` partial sums over slices
     * of K, part k ([rows, W.rows]) at y + k * rows * W.rows, for 1 <= parts <=
     * cap; returns parts. Adding them in order k = 0, 1, ... gives matmul's
     * result (on CUDA bit for bit, where matmul splits K the same way): the
     * adding is left to the op that reads y (altup_correct_gate's f), which
     * saves a GPU product split over K its own reduction. */
    int (*matmul_parts)(g3n_backend *be, float *y, const g3n_mat *W, const float *x, int rows,
                        int cap);
    /* act = gelu_tanh(Wg . x) * (Wu . x): a dense MLP's first half (Wg, Wu same
     * shape); up is scratch of act's size that a backend may use. */
    void (*matmul_gate_up)(g3n_backend *be, float *act, float *up, const g3n_mat *Wg,
                           const g3n_mat *Wu, const float *x, int rows);
    /* AltUp predict with its router and the input norm, after the previous layer's
     * per-layer input when ple_proj is not NULL:
     *   ple_add(S, ple_proj, ple_norm)   (planes 1.. of S += rmsnorm(ple_proj), in place)
     *   m = tanh(router . (rmsnorm(S[0], router_norm) / dim)),  pred = predict(S, m, coefs),
     *   x = rmsnorm(pred[0], in_norm). */
    void (*altup_predict_fused)(g3n_backend *be, float *pred, float *x, float *S,
                                float *ple_proj, g3n_vec ple_norm, const g3n_mat *router,
                                g3n_vec router_norm, g3n_vec coefs, g3n_vec in_norm, int A,
                                int rows, int dim, float eps);
    /* q: per-head rmsnorm (q_norm) then RoPE, in place. If layer >= 0 also k
     * (k_norm, RoPE) and v (norm without weight), stored into cache `layer`. */
    void (*qkv_post)(g3n_backend *be, float *q, float *k, float *v, g3n_vec q_norm,
                     g3n_vec k_norm, int layer, int n_head, int n_head_kv, int head_dim,
                     float theta, float eps);
    /* qkv_post(q, k, v, ..., layer) then attention(out, q, attn_layer, ..., window):
     * the whole attention of a layer after its q/k/v products. q, k and v are
     * scratch afterwards. */
    void (*qkv_attention)(g3n_backend *be, float *out, float *q, float *k, float *v,
                          g3n_vec q_norm, g3n_vec k_norm, int layer, int attn_layer, int n_head,
                          int n_head_kv, int head_dim, float theta, float eps, int window);
    /* After attention and LAuReL:  att_n = rmsnorm(att, post_att),
     * lau = rmsnorm(lau_raw, post_laurel) + x,  s = (a + att_n + lau) * res_scale,
     * u = rmsnorm(s, pre_ff).  att and lau_raw are overwritten (scratch). */
    void (*attn_residual)(g3n_backend *be, float *s, float *u, float *att, float *lau_raw,
                          const float *x, const float *a, g3n_vec post_att, g3n_vec post_laurel,
                          g3n_vec pre_ff, int rows, int dim, float eps, float res_scale);
    /* The whole MLP of a layer with a sparsity target, reading only the up rows
     * and down columns whose activation survives the top-k cutoff:
     *   gate = Wg . u,  up = Wu . u,  act = gelu_tanh(topk(gate, kappa)) * up,
     *   y = Wd . act   (gate, up: scratch [rows, I]).
     * Skipped terms are exact zeros, so only the order of the sums differs. */
    void (*mlp_sparse)(g3n_backend *be, float *y, float *gate, float *up, const g3n_mat *Wg,
                       const g3n_mat *Wu, const g3n_mat *Wd, const float *u, int rows,
                       float kappa);
    /* MLP activation: gate = gelu_tanh(topk(gate)) * up  (kappa 0: no top-k). */
    void (*mlp_act)(g3n_backend *be, float *gate, const float *up, int rows, int n_ff,
                    float kappa);
    /* After the MLP:  o = s + rmsnorm(f, post_ff) (into f),  m = router(o),
     * corr = correct(pred, o, m) in place in pred,  qs = pred[0] * out_scale
     * (out_scale.data NULL: qs = pred[0]). */
    void (*altup_correct_fused)(g3n_backend *be, float *pred, float *qs, float *f, const float *s,
                                g3n_vec post_ff, const g3n_mat *router, g3n_vec router_norm,
                                g3n_vec coefs, g3n_vec out_scale, int A, int rows, int dim,
                                float eps);
    /* Optional (NULL): altup_correct_fused and then the per-layer input's gate,
     * the corrected planes written out of place:
     *   out = pred (copied), altup_correct_fused(out, qs, f, s, ...),
     *   pg = gelu_tanh(gate . qs) * ple   (matmul_gelu_mul).
     * f is f_parts partial sums (matmul_parts), part k at f + k * rows * dim,
     * added in order first (f_parts 1: f itself).
     * pred is only read; f is scratch afterwards; out must not overlap pred or f.
     * (A GPU backend computes the correction in every block of the gate's
     * product, so none may update pred in place.) */
    void (*altup_correct_gate)(g3n_backend *be, float *out, const float *pred, float *qs, float *f,
                               int f_parts, const float *s, g3n_vec post_ff, const g3n_mat *router,
                               g3n_vec router_norm, g3n_vec coefs, g3n_vec out_scale, float *pg,
                               const g3n_mat *gate, const float *ple, int A, int rows, int dim,
                               float eps);
    /* AltUp's planes made (SPEC §3.3), after the products S[k] = proj_k . S[0]
     * (k = 1..A-1, S[k] at S + k * plane): S[k] = magnitude_match(S[k], S[0],
     * floor_ms) for each k. May be NULL (forward.c then runs magnitude_match). */
    void (*magnitude_match_planes)(g3n_backend *be, float *S, size_t plane, int A, int rows, int dim,
                                   float floor_ms);
    /* The planes collapsed into the final hidden state (SPEC §3.7), after the
     * products v_k = unembed_k . S[k] (k = 1..A-1, v_k at v + (k-1) * vstride):
     *   out = S0;  out += magnitude_match(v_k, S0, floor_ms) for each k;
     *   out *= 1/A;  out = rmsnorm(out, norm).  v is overwritten (scratch).
     * May be NULL (forward.c then runs the basic ops). */
    void (*altup_unembed)(g3n_backend *be, float *out, const float *S0, float *v, size_t vstride,
                          g3n_vec norm, int A, int rows, int dim, float floor_ms, float eps);
    /* Per-layer input: planes 1..A-1 of pred += rmsnorm(proj, post_norm). */
    void (*ple_add)(g3n_backend *be, float *pred, float *proj, g3n_vec post_norm, int A, int rows,
                    int dim, float eps);
    /* Optional (NULL): a hint that the ops after the next few read W[0..n)
     * whole, in that order (a layer's MLP products, hinted at the layer's
     * start). A GPU backend may pull them, or the first of them, into its cache
     * while the ops before them run, which are bound by latency and leave the
     * memory idle, unless the step's attention in this layer reads kv_bytes of
     * keys and values (a long context) and needs the memory itself. No result
     * changes. */
    void (*prefetch)(g3n_backend *be, const g3n_mat *const *W, int n, size_t kv_bytes);
    /* Optional (NULL): a hint that the next matmul_multi is a layer's query/key/
     * value product, which qkv_attention reads next. A GPU backend may launch
     * it so that attention's blocks fit beside its own and start early. No
     * result changes. */
    void (*attention_next)(g3n_backend *be);
    /* Optional (NULL): every decoder layer of a step of one token in one pass
     * (the "mega" decode path), the maths of decoder_layer_fused over all
     * layers, then the last layer's per-layer input added to planes 1..: S in,
     * S out. Returns 0, doing nothing, where the backend does not take this
     * model or step. bufs NULL: at load, prepare and answer whether it would. */
    int (*decode_layers)(g3n_backend *be, const g3n_dec_model *m, const g3n_dec_bufs *bufs);
    /* Optional (NULL): for each of `rows` rows of n logits in backend memory
     * (row r at logits + r * stride), its best m (1..G3N_TOP_MAX) in the
     * sampler's order (logit descending, then id ascending; NaN counts as -inf,
     * +inf as FLT_MAX) into host arrays vals and ids ([rows][m]), and ok[r] = 1;
     * ok[r] = 0 where it could not (the caller reads that row). Returns 0 where
     * it declines the whole call. */
    int (*logits_top)(g3n_backend *be, const float *logits, int rows, size_t stride, int n, int m, float *vals,
                      int32_t *ids, uint8_t *ok);
    /* Optional (NULL): logits_top's device work queued with the step that
     * writes the logits (a GPU backend records it in the step's graph). The next
     * logits_top call for the same logits, rows, n and m, before another step
     * (batch_set), then only collects the results. Returns 0 where it declines
     * (logits_top then does all the work). */
    int (*logits_top_queue)(g3n_backend *be, const float *logits, int rows, size_t stride, int n, int m);
    /* Optional (NULL): rows of logits (1..G3N_PRUNE_ROWS) read through a
     * cheaper copy of the unembedding W (unquantized) for a reader of each
     * row's best m alone. unembed_prepare, at load: make the copy and return
     * the bytes logits_pruned reads in W's place (0: no copy, do not call
     * logits_pruned). logits_pruned, h [rows, W->cols] into logits [rows,
     * W->rows]: logits[v] = softcap(W[v] . h) (cap 0: none), exactly as a
     * one-row matmul then softcap compute it, for every v < n that could be
     * among the best m of the first n of its row, -inf for the others: those
     * best m and every logit tied with the m-th are exact, the rest of the row
     * is not (the caller recomputes the rows if they are asked for). */
    size_t (*unembed_prepare)(g3n_backend *be, const g3n_mat *W);
    void (*logits_pruned)(g3n_backend *be, float *logits, const g3n_mat *W, const float *h, int rows, int n, int m,
                          float cap);
};

/* Constructors. NULL + err when the backend cannot start. */
g3n_backend *cpu_ref_backend_create(char *err, size_t errlen);
g3n_backend *cpu_backend_create(int n_threads, char *err, size_t errlen);
/* CUDA (built with `make CUDA=1`): device index, options. */
typedef struct {
    int device;
    int ple_on_gpu; /* keep host_gather matrices on the GPU too */
    int no_graph;   /* issue ops every step instead of replaying a recorded one */
} g3n_cuda_opts;
g3n_backend *cuda_backend_create(const g3n_cuda_opts *o, char *err, size_t errlen);
/* 1 if this build has the CUDA backend and a GPU is usable. */
int cuda_available(void);

/* Fill every op of `be` with the reference implementation (used by backends
 * that override only some ops). */
void cpu_ref_fill_ops(g3n_backend *be);

#endif
