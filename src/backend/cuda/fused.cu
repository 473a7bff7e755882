/* fused.cu: the fused decode ops of backend.h as single CUDA kernels: several
 * matrix products in one launch, and the row-wise chains around them (AltUp
 * predict with its router and input norm; q/k/v norms + RoPE + cache store; the
 * attention/LAuReL residual with its norms; the MLP activation with Gaussian
 * top-k; the post-MLP norm + AltUp correct; the per-layer-input add). Each is
 * defined by its reference in cpu_ref.c (a sequence of basic ops) and tested
 * against it in tests/test_ops.c. Row-wise kernels run one block per token row.
 * (Several products in one launch, matmul_multi, live in gemv.cu.) */
#include "cuda_common.cuh"

#define MAXA 8
#define ROW_THREADS 1024

int cuda_fast_predict(cuda_ctx *c, float *pred, float *x, float *S, const float *ple, const float *ple_w,
                      const g3n_mat *router, const float *rnorm, const float *coefs, const float *innorm, int A,
                      int rows, int dim, float eps);
int cuda_fast_correct(cuda_ctx *c, float *out, const float *pred, float *qs, float *f, const float *s,
                      const float *w_ff, const g3n_mat *router, const float *rnorm, const float *coefs,
                      const float *oscale, int A, int rows, int dim, float eps);
int cuda_fast_planes(cuda_ctx *c, int op, float *out, float *S, const float *v, size_t vstride, const float *w, int A,
                     int rows, int dim, float floor_ms, float eps);
enum { PL_MATCH, PL_UNEMBED, PL_PLE_ADD }; /* cuda_fast_planes' ops */
template <int EPT> __global__ void k_mlp_act_reg(float *g, const float *up, int n, float kappa);
template <int P>
__global__ void k_attn_residual_reg(float *s, float *u, const float *att, const float *lau, const float *x,
                                    const float *a, const float *w_att, const float *w_lau, const float *w_ff, int dim,
                                    float eps, float rs);

/* Pairs of elements per thread of the register-resident row kernels for a row of
 * dim (at most 2048: their launch bounds are 1024 / P threads): 2 where dim is a
 * multiple of 128 (512 threads at 2048), else 1 where it is one of 64; 0 where
 * none fits. G3N_ROW_PAIRS=1 or 4 asks for another (4: 256 threads, measured
 * level with 2; 1 slower). */
static int row_pairs(int dim) {
    static int want = -1;
    if (want < 0) want = getenv("G3N_ROW_PAIRS") ? atoi(getenv("G3N_ROW_PAIRS")) : 2;
    if (dim > 2048) return 0;
    for (int p = want >= 4 ? 4 : want >= 2 ? 2 : 1; p >= 1; p /= 2)
        if (dim % (64 * p) == 0) return p;
    return 0;
}

/* CALL(p) with p the compile-time constant equal to P (1, 2 or 4) */
#define PAIRS_SWITCH(P, CALL) \
    switch (P) {              \
    case 4: CALL(4); break;   \
    case 2: CALL(2); break;   \
    default: CALL(1); break;  \
    }

/* ---- AltUp predict with router and input norm ----------------------------------------------- */

/* router: m[a] = tanh(sum_i R[a, i] * v[i]) for a < A, v in shared memory (dim);
 * all A sums reduced together */
__device__ void router_tanh(float *m_sh, const void *R, int rdtype, const float *v, int A, int dim,
                            float *red) {
    float acc[MAXA];
#pragma unroll
    for (int a = 0; a < MAXA; a++) acc[a] = 0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float vi = v[i];
#pragma unroll
        for (int a = 0; a < MAXA; a++)
            if (a < A) acc[a] += load_w(R, rdtype, (size_t)a * dim + i) * vi;
    }
    block_sum_n<MAXA>(acc, red);
    if (threadIdx.x < A) {
#pragma unroll
        for (int a = 0; a < MAXA; a++)
            if (a == (int)threadIdx.x) m_sh[a] = tanhf(acc[a]);
    }
    __syncthreads();
}

__global__ void __launch_bounds__(ROW_THREADS)
    k_altup_predict_fused(float *pred, float *x, float *S, const float *ple, const float *ple_w, const void *R,
                          int rdtype, const float *rnorm, const float *coefs, const float *innorm, int A, int rows,
                          int dim, float eps) {
    KERNEL_BEGIN();
    extern __shared__ float v[]; /* dim */
    __shared__ float red[32 * MAXA], m[MAXA], C[MAXA * MAXA];
    const int r = blockIdx.x;
    const size_t plane = (size_t)rows * dim;
    const float *s0 = S + (size_t)r * dim;
    float sums[2] = {0, 0}; /* |S0|^2, |ple|^2 */
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        sums[0] += s0[i] * s0[i];
        if (ple) sums[1] += ple[(size_t)r * dim + i] * ple[(size_t)r * dim + i];
    }
    block_sum_n<2>(sums, red);
    const float inv = rsqrtf(sums[0] / (float)dim + eps);
    const float inv_ple = rsqrtf(sums[1] / (float)dim + eps);
    const float inv_dim = 1.0f / (float)dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) v[i] = s0[i] * inv * rnorm[i] * inv_dim;
    __syncthreads();
    router_tanh(m, R, rdtype, v, A, dim, red);
    if (threadIdx.x < A * A) {
        float acc = 0;
        for (int j = 0; j < A; j++) acc += coefs[threadIdx.x * A + j] * m[j];
        C[threadIdx.x] = acc;
    }
    __syncthreads();
    float ss0 = 0;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        const size_t o = (size_t)r * dim + d;
        float sv[MAXA];
        const float g = ple ? ple[o] * inv_ple * ple_w[d] : 0.0f;
        for (int j = 0; j < A; j++) {
            sv[j] = S[j * plane + o];
            if (ple && j > 0) { /* the previous layer's per-layer input, into the state */
                sv[j] += g;
                S[j * plane + o] = sv[j];
            }
        }
        for (int i = 0; i < A; i++) {
            float acc = sv[i];
            for (int j = 0; j < A; j++) acc += C[i * A + j] * sv[j];
            pred[i * plane + o] = acc;
            if (i == 0) {
                v[d] = acc;
                ss0 += acc * acc;
            }
        }
    }
    const float inv0 = rsqrtf(block_sum(ss0, red) / (float)dim + eps);
    for (int d = threadIdx.x; d < dim; d += blockDim.x) x[(size_t)r * dim + d] = v[d] * inv0 * innorm[d];
}

void cuda_op_altup_predict_fused(g3n_backend *be, float *pred, float *x, float *S, float *ple_proj, g3n_vec ple_norm,
                                 const g3n_mat *router, g3n_vec router_norm, g3n_vec coefs, g3n_vec in_norm, int A,
                                 int rows, int dim, float eps) {
    cuda_ctx *c = CTX(be);
    G3N_ASSERT(A <= MAXA);
    PROF_BEGIN(c);
    if (!cuda_fast_predict(c, pred, x, S, ple_proj, ple_norm.data, router, router_norm.data, coefs.data, in_norm.data,
                           A, rows, dim, eps))
    launch(c, k_altup_predict_fused, dim3(rows), dim3(ROW_THREADS), sizeof(float) * dim, pred, x, S,
           (const float *)ple_proj, ple_norm.data, router->data, router->dtype, router_norm.data, coefs.data,
           in_norm.data, A, rows, dim, eps);
    PROF_END(c, ple_proj ? "altup_predict_fused (+ple)" : "altup_predict_fused", 0);
}

/* ---- q/k/v norms, RoPE, cache store: block per (token, head slot) ----------------------------- */

__global__ void k_qkv_post(float *q, float *k, float *v, const float *qn, const float *kn, const g3n_kv_layer *kv,
                           int layer, const int32_t *pos, const int32_t *seq, int H, int Hkv, int hd, float theta,
                           float eps) {
    KERNEL_BEGIN();
    __shared__ float red[32];
    const int t = blockIdx.x, slot = blockIdx.y; /* 0..H-1 q, then k heads, then v heads */
    float *vec;
    const float *w = NULL;
    int rope = 1;
    if (slot < H) {
        vec = q + ((size_t)t * H + slot) * hd;
        w = qn;
    } else if (slot < H + Hkv) {
        vec = k + ((size_t)t * Hkv + (slot - H)) * hd;
        w = kn;
    } else {
        vec = v + ((size_t)t * Hkv + (slot - H - Hkv)) * hd;
        rope = 0;
    }
    float ss = 0;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) ss += vec[i] * vec[i];
    const float inv = rsqrtf(block_sum(ss, red) / (float)hd + eps);
    const int half = hd / 2;
    const float p = (float)pos[t];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float a = vec[i] * inv, b = vec[i + half] * inv;
        if (w) a *= w[i], b *= w[i + half];
        if (rope) {
            const float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)hd);
            float sn, cs;
            sincosf(inv_freq * p, &sn, &cs);
            const float a2 = a * cs - b * sn, b2 = b * cs + a * sn;
            a = a2, b = b2;
        }
        vec[i] = a;
        vec[i + half] = b;
    }
    if (slot < H) return;
    __syncthreads();
    const g3n_kv_layer L = kv[(size_t)seq[t] * G3N_KV_MAX_LAYERS + layer];
    const int kvd = Hkv * hd;
    const size_t cs_ = (size_t)(pos[t] % L.cap) * kvd;
    const size_t o = slot < H + Hkv ? cs_ + (size_t)(slot - H) * hd : cs_ + (size_t)(slot - H - Hkv) * hd;
    void *dst = slot < H + Hkv ? L.k : L.v;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) kv_st(L, dst, o + i, vec[i]);
}

void cuda_op_qkv_post(g3n_backend *be, float *q, float *k, float *v, g3n_vec q_norm, g3n_vec k_norm, int layer,
                      int n_head, int n_head_kv, int head_dim, float theta, float eps) {
    cuda_ctx *c = CTX(be);
    PROF_BEGIN(c);
    dim3 grid(c->n_tokens, n_head + (layer >= 0 ? 2 * n_head_kv : 0));
    launch(c, k_qkv_post, dim3(grid), dim3(128), 0, q, k, v, q_norm.data, k_norm.data, c->d_kv, layer, d_pos(c), d_seq(c),
                                            n_head, n_head_kv, head_dim, theta, eps);
    CUDA_LAUNCHED();
    PROF_END(c, "qkv_post", 0);
}

/* ---- attention + LAuReL residual ------------------------------------------------------------- */

__global__ void __launch_bounds__(ROW_THREADS)
    k_attn_residual(float *s, float *u, const float *att, const float *lau, const float *x, const float *a,
                    const float *w_att, const float *w_lau, const float *w_ff, int dim, float eps, float rs) {
    KERNEL_BEGIN();
    __shared__ float red[32];
    const size_t o = (size_t)blockIdx.x * dim;
    float s1 = 0, s2 = 0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        s1 += att[o + i] * att[o + i];
        s2 += lau[o + i] * lau[o + i];
    }
    const float i1 = rsqrtf(block_sum(s1, red) / (float)dim + eps);
    const float i2 = rsqrtf(block_sum(s2, red) / (float)dim + eps);
    float s3 = 0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float la = lau[o + i] * i2 * w_lau[i] + x[o + i];
        const float at = att[o + i] * i1 * w_att[i];
        const float sv = (a[o + i] + at + la) * rs;
        s[o + i] = sv;
        s3 += sv * sv;
    }
    const float i3 = rsqrtf(block_sum(s3, red) / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) u[o + i] = s[o + i] * i3 * w_ff[i];
}

void cuda_op_attn_residual(g3n_backend *be, float *s, float *u, float *att, float *lau_raw, const float *x,
                           const float *a, g3n_vec post_att, g3n_vec post_laurel, g3n_vec pre_ff, int rows, int dim,
                           float eps, float res_scale) {
    cuda_ctx *c = CTX(be);
    PROF_BEGIN(c);
    const int P = row_pairs(dim);
#define RES(P) launch(c, k_attn_residual_reg<P>, dim3(rows), dim3(dim / (2 * P)), 0, s, u, (const float *)att, \
                      (const float *)lau_raw, x, a, post_att.data, post_laurel.data, pre_ff.data, dim, eps, res_scale)
    if (P) {
        PAIRS_SWITCH(P, RES)
    } else
        launch(c, k_attn_residual, dim3(rows), dim3(ROW_THREADS), 0, s, u, att, lau_raw, x, a, post_att.data,
               post_laurel.data, pre_ff.data, dim, eps, res_scale);
#undef RES
    CUDA_LAUNCHED();
    PROF_END(c, "attn_residual", 0);
}

/* ---- MLP activation ---------------------------------------------------------------------------------- */

__global__ void __launch_bounds__(ROW_THREADS) k_mlp_act(float *g, const float *up, int n, float kappa) {
    KERNEL_BEGIN();
    __shared__ float red[32];
    float *gr = g + (size_t)blockIdx.x * n;
    const float *ur = up + (size_t)blockIdx.x * n;
    float cutoff = -INFINITY;
    if (kappa > 0) {
        float sm = 0;
        for (int i = threadIdx.x; i < n; i += blockDim.x) sm += gr[i];
        const float mean = block_sum(sm, red) / (float)n;
        float vv = 0;
        for (int i = threadIdx.x; i < n; i += blockDim.x) vv += (gr[i] - mean) * (gr[i] - mean);
        cutoff = mean + sqrtf(block_sum(vv, red) / (float)n) * kappa;
    }
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float z = gr[i];
        if (kappa > 0) z = z > cutoff ? z - cutoff : 0.0f;
        gr[i] = gelu_tanh_d(z) * ur[i];
    }
}

void cuda_op_mlp_act(g3n_backend *be, float *gate, const float *up, int rows, int n_ff, float kappa) {
    cuda_ctx *c = CTX(be);
    PROF_BEGIN(c);
    if (n_ff == 4 * 1024) launch(c, k_mlp_act_reg<4>, dim3(rows), dim3(1024), 0, gate, up, n_ff, kappa);
    else if (n_ff == 8 * 1024) launch(c, k_mlp_act_reg<8>, dim3(rows), dim3(1024), 0, gate, up, n_ff, kappa);
    else if (n_ff == 16 * 1024) launch(c, k_mlp_act_reg<16>, dim3(rows), dim3(1024), 0, gate, up, n_ff, kappa);
    else if (n_ff == 32 * 1024) launch(c, k_mlp_act_reg<32>, dim3(rows), dim3(1024), 0, gate, up, n_ff, kappa);
    else launch(c, k_mlp_act, dim3(rows), dim3(ROW_THREADS), 0, gate, up, n_ff, kappa);
    CUDA_LAUNCHED();
    PROF_END(c, kappa > 0 ? "mlp_act (top-k)" : "mlp_act", 0);
}

/* ---- post-MLP norm + AltUp correct --------------------------------------------------------------------- */

__global__ void __launch_bounds__(ROW_THREADS)
    k_altup_correct_fused(float *pred, float *qs, float *f, const float *s, const float *w_ff, const void *R,
                          int rdtype, const float *rnorm, const float *coefs, const float *oscale, int A, int rows,
                          int dim, float eps) {
    KERNEL_BEGIN();
    extern __shared__ float v[]; /* dim */
    __shared__ float red[32 * MAXA], m[MAXA], kk[MAXA];
    const int r = blockIdx.x;
    const size_t o = (size_t)r * dim, plane = (size_t)rows * dim;
    float s1 = 0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) s1 += f[o + i] * f[o + i];
    const float i1 = rsqrtf(block_sum(s1, red) / (float)dim + eps);
    float s2 = 0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float ov = s[o + i] + f[o + i] * i1 * w_ff[i];
        f[o + i] = ov;
        s2 += ov * ov;
    }
    const float i2 = rsqrtf(block_sum(s2, red) / (float)dim + eps);
    const float inv_dim = 1.0f / (float)dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) v[i] = f[o + i] * i2 * rnorm[i] * inv_dim;
    __syncthreads();
    router_tanh(m, R, rdtype, v, A, dim, red);
    if (threadIdx.x < A) {
        float acc = 0;
        for (int j = 0; j < A; j++) acc += coefs[threadIdx.x * A + j] * m[j];
        kk[threadIdx.x] = acc + 1.0f;
    }
    __syncthreads();
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        const float delta = f[o + d] - pred[o + d];
        for (int i = 0; i < A; i++) pred[i * plane + o + d] += kk[i] * delta;
        qs[o + d] = oscale ? pred[o + d] * oscale[d] : pred[o + d];
    }
}

void cuda_op_altup_correct_fused(g3n_backend *be, float *pred, float *qs, float *f, const float *s, g3n_vec post_ff,
                                 const g3n_mat *router, g3n_vec router_norm, g3n_vec coefs, g3n_vec out_scale, int A,
                                 int rows, int dim, float eps) {
    cuda_ctx *c = CTX(be);
    G3N_ASSERT(A <= MAXA);
    PROF_BEGIN(c);
    if (!cuda_fast_correct(c, pred, pred, qs, f, s, post_ff.data, router, router_norm.data, coefs.data, out_scale.data, A,
                           rows, dim, eps))
    launch(c, k_altup_correct_fused, dim3(rows), dim3(ROW_THREADS), sizeof(float) * dim, 
        pred, qs, f, s, post_ff.data, router->data, router->dtype, router_norm.data, coefs.data, out_scale.data, A,
        rows, dim, eps);
    CUDA_LAUNCHED();
    PROF_END(c, "altup_correct_fused", 0);
}

/* ---- per-layer input add --------------------------------------------------------------------------------- */

__global__ void __launch_bounds__(ROW_THREADS)
    k_ple_add(float *pred, const float *proj, const float *w, int A, int rows, int dim, float eps) {
    KERNEL_BEGIN();
    __shared__ float red[32];
    const size_t o = (size_t)blockIdx.x * dim, plane = (size_t)rows * dim;
    float ss = 0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += proj[o + i] * proj[o + i];
    const float inv = rsqrtf(block_sum(ss, red) / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float g = proj[o + i] * inv * w[i];
        for (int k = 1; k < A; k++) pred[k * plane + o + i] += g;
    }
}

void cuda_op_ple_add(g3n_backend *be, float *pred, float *proj, g3n_vec post_norm, int A, int rows, int dim, float eps) {
    cuda_ctx *c = CTX(be);
    PROF_BEGIN(c);
    if (!cuda_fast_planes(c, PL_PLE_ADD, pred, pred, proj, 0, post_norm.data, A, rows, dim, 0, eps))
        launch(c, k_ple_add, dim3(rows), dim3(ROW_THREADS), 0, pred, proj, post_norm.data, A, rows, dim, eps);
    CUDA_LAUNCHED();
    PROF_END(c, "ple_add", 0);
}

/* ---- the planes collapsed before the lm_head: one block per row ------------------------------- */

#define UNEMBED_MAX 8 /* planes (G3N_MAX_ALTUP) */

/* ms[0] = mean square of S0's row o, ms[k] = the magnitude of v_k's (k < A):
 * sqrt(max(mean square, floor)); every thread of the block gets them */
__device__ __forceinline__ void planes_ms(float (&ms)[UNEMBED_MAX], const float *S0, const float *v, size_t vstride,
                                          int A, size_t o, int dim, float floor_ms, float *red) {
#pragma unroll
    for (int k = 0; k < UNEMBED_MAX; k++) ms[k] = 0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        ms[0] += S0[o + i] * S0[o + i];
#pragma unroll
        for (int k = 1; k < UNEMBED_MAX; k++)
            if (k < A) {
                const float x = v[(k - 1) * vstride + o + i];
                ms[k] += x * x;
            }
    }
    block_sum_n<UNEMBED_MAX>(ms, red);
    ms[0] /= (float)dim;
#pragma unroll
    for (int k = 1; k < UNEMBED_MAX; k++) ms[k] = sqrtf(fmaxf(ms[k] / (float)dim, floor_ms));
}

__global__ void __launch_bounds__(ROW_THREADS)
    k_altup_unembed(float *out, const float *S0, const float *v, size_t vstride, const float *w, int A, int dim,
                    float floor_ms, float eps) {
    KERNEL_BEGIN();
    __shared__ float red[32 * UNEMBED_MAX];
    const size_t o = (size_t)blockIdx.x * dim;
    float ms[UNEMBED_MAX];
    planes_ms(ms, S0, v, vstride, A, o, dim, floor_ms, red);
    const float target = sqrtf(ms[0]), inv_a = 1.0f / (float)A;
    float ss = 0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float h = S0[o + i];
#pragma unroll
        for (int k = 1; k < UNEMBED_MAX; k++)
            if (k < A) h = h + v[(k - 1) * vstride + o + i] * target / ms[k];
        h = h * inv_a;
        out[o + i] = h;
        ss += h * h;
    }
    const float inv = rsqrtf(block_sum(ss, red) / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) out[o + i] = w ? out[o + i] * inv * w[i] : out[o + i] * inv;
}

/* planes 1..A-1 of S matched to plane 0 (magnitude_match_planes) */
__global__ void __launch_bounds__(ROW_THREADS)
    k_magnitude_match_planes(float *S, size_t plane, int A, int dim, float floor_ms) {
    KERNEL_BEGIN();
    __shared__ float red[32 * UNEMBED_MAX];
    const size_t o = (size_t)blockIdx.x * dim;
    float ms[UNEMBED_MAX];
    planes_ms(ms, S, S + plane, plane, A, o, dim, floor_ms, red);
    const float target = sqrtf(ms[0]);
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
#pragma unroll
        for (int k = 1; k < UNEMBED_MAX; k++)
            if (k < A) S[k * plane + o + i] = S[k * plane + o + i] * target / ms[k];
}

void cuda_op_magnitude_match_planes(g3n_backend *be, float *S, size_t plane, int A, int rows, int dim,
                                    float floor_ms) {
    cuda_ctx *c = CTX(be);
    if (rows <= 0 || A < 2) return;
    G3N_ASSERT(A <= UNEMBED_MAX);
    PROF_BEGIN(c);
    if (!cuda_fast_planes(c, PL_MATCH, S, S, S + plane, plane, NULL, A, rows, dim, floor_ms, 0))
        launch(c, k_magnitude_match_planes, dim3(rows), dim3(ROW_THREADS), 0, S, plane, A, dim, floor_ms);
    CUDA_LAUNCHED();
    PROF_END(c, "magnitude_match_planes", 0);
}

void cuda_op_altup_unembed(g3n_backend *be, float *out, const float *S0, float *v, size_t vstride, g3n_vec norm,
                           int A, int rows, int dim, float floor_ms, float eps) {
    cuda_ctx *c = CTX(be);
    if (rows <= 0) return;
    G3N_ASSERT(A >= 1 && A <= UNEMBED_MAX);
    PROF_BEGIN(c);
    if (!cuda_fast_planes(c, PL_UNEMBED, out, (float *)S0, v, vstride, norm.data, A, rows, dim, floor_ms, eps))
        launch(c, k_altup_unembed, dim3(rows), dim3(ROW_THREADS), 0, out, S0, (const float *)v, vstride, norm.data, A,
               dim, floor_ms, eps);
    CUDA_LAUNCHED();
    PROF_END(c, "altup_unembed", 0);
}

/* ---- register-resident row kernels ----------------------------------------------------------
 * The same ops for the common shapes (dim a multiple of 64 up to 2048, one block
 * of dim / (2 P) threads, P pairs of adjacent elements per thread (row_pairs);
 * A known at compile time):
 * every global load is issued at the start (weights before the PDL wait), the
 * values stay in registers, and only the block reductions remain as steps. A
 * single block is latency-bound, so the fewer dependent steps, the faster. */

__device__ __forceinline__ float2 ld2(const float *p, int d) { return *(const float2 *)(p + d); }
__device__ __forceinline__ void st2(float *p, int d, float2 v) { *(float2 *)(p + d) = v; }

/* The AltUp router's weights at columns d, d + 1 of its A rows (loaded before
 * the PDL wait: they do not depend on the previous kernel). */
template <int A>
__device__ __forceinline__ void router_w2(float2 (&wr)[A], const void *R, int rdtype, int dim, int d) {
#pragma unroll
    for (int a = 0; a < A; a++)
        wr[a] = make_float2(load_w(R, rdtype, (size_t)a * dim + d), load_w(R, rdtype, (size_t)a * dim + d + 1));
}

/* Column d of this thread's pair k (P pairs a thread, blockDim dim / (2 P)):
 * fewer threads wait less for their block reductions and fit on an SM sooner
 * (512 threads instead of 1024: E4B 4-bit +2%, bf16 +1.5%; docs/SPEED.md,
 * eleventh session). */
template <int P>
__device__ __forceinline__ int pair_col(int k) { return 2 * ((int)threadIdx.x + k * (int)blockDim.x); }

template <int A, int P>
__global__ void __launch_bounds__(1024 / P)
    k_predict_reg(float *pred, float *x, float *S, const float *ple, const float *ple_w, const void *R, int rdtype,
                  const float *rnorm, const float *coefs, const float *innorm, int rows, int dim, float eps) {
    __shared__ float red[32 * (A + 2)], scoef[A * A * A];
    const int r = blockIdx.x;
    const size_t plane = (size_t)rows * dim, row = (size_t)r * dim;
    /* weights first: they do not depend on the previous kernel */
    float2 wr[P][A], rn[P], inn[P], pw[P];
#pragma unroll
    for (int k = 0; k < P; k++) {
        const int d = pair_col<P>(k);
        router_w2<A>(wr[k], R, rdtype, dim, d);
        rn[k] = ld2(rnorm, d), inn[k] = ld2(innorm, d), pw[k] = ple ? ld2(ple_w, d) : make_float2(0, 0);
    }
    for (int i = threadIdx.x; i < A * A * A; i += blockDim.x) scoef[i] = coefs[i]; /* read after the first block sum */
    KERNEL_BEGIN();
    float2 sv[P][A], p[P];
    /* one block sum for both norms and the router's dot products: the router
     * reads plane 0, which the per-layer input does not touch, and its norm's
     * 1/rms is a common factor, applied after the sum */
    float sums[2 + A] = {};
#pragma unroll
    for (int k = 0; k < P; k++) {
        const size_t o = row + pair_col<P>(k);
#pragma unroll
        for (int j = 0; j < A; j++) sv[k][j] = ld2(S + j * plane, (int)o);
        p[k] = ple ? ld2(ple + row, pair_col<P>(k)) : make_float2(0, 0);
        sums[0] += sv[k][0].x * sv[k][0].x + sv[k][0].y * sv[k][0].y, sums[1] += p[k].x * p[k].x + p[k].y * p[k].y;
#pragma unroll
        for (int a = 0; a < A; a++)
            sums[2 + a] += wr[k][a].x * (sv[k][0].x * rn[k].x) + wr[k][a].y * (sv[k][0].y * rn[k].y);
    }
    block_sum_n<2 + A>(sums, red);
    if (ple) { /* the previous layer's per-layer input joins planes 1.. of the state */
        const float ip = rsqrtf(sums[1] / (float)dim + eps);
#pragma unroll
        for (int k = 0; k < P; k++) {
            const float gx = p[k].x * ip * pw[k].x, gy = p[k].y * ip * pw[k].y;
#pragma unroll
            for (int j = 1; j < A; j++) {
                sv[k][j].x += gx, sv[k][j].y += gy;
                st2(S + j * plane, (int)row + pair_col<P>(k), sv[k][j]);
            }
        }
    }
    const float inv = rsqrtf(sums[0] / (float)dim + eps) / (float)dim;
    float m[A], c[A][A];
#pragma unroll
    for (int a = 0; a < A; a++) m[a] = tanhf(sums[2 + a] * inv);
#pragma unroll
    for (int i = 0; i < A; i++)
#pragma unroll
        for (int j = 0; j < A; j++) {
            c[i][j] = 0;
#pragma unroll
            for (int k = 0; k < A; k++) c[i][j] += scoef[(i * A + j) * A + k] * m[k];
        }
    float2 p0[P];
    float ss0 = 0;
#pragma unroll
    for (int k = 0; k < P; k++)
#pragma unroll
        for (int i = 0; i < A; i++) {
            float2 acc = sv[k][i];
#pragma unroll
            for (int j = 0; j < A; j++) acc.x += c[i][j] * sv[k][j].x, acc.y += c[i][j] * sv[k][j].y;
            st2(pred + i * plane, (int)row + pair_col<P>(k), acc);
            if (i == 0) p0[k] = acc, ss0 += acc.x * acc.x + acc.y * acc.y;
        }
    const float inv0 = rsqrtf(block_sum(ss0, red) / (float)dim + eps);
#pragma unroll
    for (int k = 0; k < P; k++)
        st2(x, (int)row + pair_col<P>(k), make_float2(p0[k].x * inv0 * inn[k].x, p0[k].y * inv0 * inn[k].y));
}

/* k_correct_reg's maths for the row at `row` of a block of dim / (2 P) threads,
 * after the PDL wait: o = s + rmsnorm(f, w_ff) (into ov), the router from o,
 * then every plane of pred moved by its gain times (o - pred[0]) (into pv).
 * f is np <= NP partial sums (matmul_parts) at f + k * pst, added in order
 * k = 0.. as the product's own reduction adds them. */
#define QPARTS 8
template <int A, int P, int NP = 1>
__device__ __forceinline__ void correct_row(float2 (&pv)[P][A], float2 (&ov)[P], const float *pred, const float *f,
                                            const float *s, size_t plane, size_t row, const float2 (&wr)[P][A],
                                            const float2 (&wf)[P], const float2 (&rn)[P], const float (&cf)[A * A],
                                            int dim, float eps, float *red, int np = 1, size_t pst = 0) {
    float2 fv[P], sv[P];
    float ff = 0;
#pragma unroll
    for (int k = 0; k < P; k++) {
        const int o = (int)row + pair_col<P>(k);
        fv[k] = ld2(f, o), sv[k] = ld2(s, o);
        float2 fp[NP]; /* all the parts' loads in flight, then added in order */
#pragma unroll
        for (int j = 1; j < NP; j++)
            if (j < np) fp[j - 1] = ld2(f + j * pst, o);
#pragma unroll
        for (int j = 1; j < NP; j++)
            if (j < np) fv[k].x += fp[j - 1].x, fv[k].y += fp[j - 1].y;
#pragma unroll
        for (int j = 0; j < A; j++) pv[k][j] = ld2(pred + j * plane, o);
        ff += fv[k].x * fv[k].x + fv[k].y * fv[k].y;
    }
    const float i1 = rsqrtf(block_sum(ff, red) / (float)dim + eps);
    /* one block sum for the router input's norm and the router's dot products
     * (its 1/rms is a common factor, applied after the sum, as in k_predict_reg) */
    float sums[1 + A] = {};
#pragma unroll
    for (int k = 0; k < P; k++) {
        ov[k] = make_float2(sv[k].x + fv[k].x * i1 * wf[k].x, sv[k].y + fv[k].y * i1 * wf[k].y);
        sums[0] += ov[k].x * ov[k].x + ov[k].y * ov[k].y;
#pragma unroll
        for (int a = 0; a < A; a++) sums[1 + a] += wr[k][a].x * (ov[k].x * rn[k].x) + wr[k][a].y * (ov[k].y * rn[k].y);
    }
    block_sum_n<1 + A>(sums, red);
    const float i2 = rsqrtf(sums[0] / (float)dim + eps) / (float)dim;
    float m[A], g[A];
#pragma unroll
    for (int a = 0; a < A; a++) m[a] = tanhf(sums[1 + a] * i2);
#pragma unroll
    for (int i = 0; i < A; i++) {
        g[i] = 0;
#pragma unroll
        for (int j = 0; j < A; j++) g[i] += cf[i * A + j] * m[j];
        g[i] += 1.0f;
    }
#pragma unroll
    for (int k = 0; k < P; k++) {
        const float dx = ov[k].x - pv[k][0].x, dy = ov[k].y - pv[k][0].y;
#pragma unroll
        for (int i = 0; i < A; i++) pv[k][i].x += g[i] * dx, pv[k][i].y += g[i] * dy;
    }
}

/* correct_row's parameters, loaded before the PDL wait (they do not depend on
 * the previous kernel) */
template <int A, int P>
__device__ __forceinline__ void correct_params(float2 (&wr)[P][A], float2 (&wf)[P], float2 (&rn)[P], float2 (&os)[P],
                                               float (&cf)[A * A], const void *R, int rdtype, const float *w_ff,
                                               const float *rnorm, const float *oscale, const float *coefs, int dim) {
#pragma unroll
    for (int k = 0; k < P; k++) {
        const int d = pair_col<P>(k);
        router_w2<A>(wr[k], R, rdtype, dim, d);
        wf[k] = ld2(w_ff, d), rn[k] = ld2(rnorm, d), os[k] = oscale ? ld2(oscale, d) : make_float2(1, 1);
    }
#pragma unroll
    for (int k = 0; k < A * A; k++) cf[k] = coefs[k];
}

template <int A, int P>
__global__ void __launch_bounds__(1024 / P)
    k_correct_reg(float *out, const float *pred, float *qs, float *f, const float *s, const float *w_ff, const void *R,
                  int rdtype, const float *rnorm, const float *coefs, const float *oscale, int rows, int dim,
                  float eps) {
    __shared__ float red[32 * (A + 1)];
    const size_t plane = (size_t)rows * dim, row = (size_t)blockIdx.x * dim;
    float2 wr[P][A], wf[P], rn[P], os[P];
    float cf[A * A];
    correct_params<A, P>(wr, wf, rn, os, cf, R, rdtype, w_ff, rnorm, oscale, coefs, dim);
    KERNEL_BEGIN();
    float2 pv[P][A], ov[P];
    correct_row<A, P>(pv, ov, pred, f, s, plane, row, wr, wf, rn, cf, dim, eps, red);
#pragma unroll
    for (int k = 0; k < P; k++) {
        const int o = (int)row + pair_col<P>(k);
        st2(f, o, ov[k]);
#pragma unroll
        for (int i = 0; i < A; i++) st2(out + i * plane, o, pv[k][i]);
        st2(qs, o, make_float2(pv[k][0].x * os[k].x, pv[k][0].y * os[k].y));
    }
}

/* ---- AltUp correct and the per-layer input's gate, one row, one kernel ----------------------
 * The gate's n_ple products read the corrected active plane, which one block
 * makes. So every block of k_correct_gate makes it (the same few loads and
 * block sums as k_correct_reg, from the L2) and then takes RPB of the gate's
 * rows, whose weights it loaded before the PDL wait: the gate's own launch,
 * wait and weight loads leave the chain. Block 0 alone stores the planes (out
 * of place: the others still read pred) and qs. Weights: GK 16 bf16, 17 f16, 32
 * f32 (chunks of 8), 4 and 8 bits (chunks of 32 with their group's scale and
 * bias). */
typedef struct {
    const void *W, *S, *B;
    int sdt, group, rows; /* scales' dtype, group size, n_ple */
    float *pg;
    const float *m;
} gate_args;

template <int GK> struct gate_chunk;
template <typename T> struct gate_chunk_f {
    static constexpr int N = 8;
    raw8<T> r;
    __device__ __forceinline__ void load(const gate_args &g, int K, int row, int c) {
        ldraw(r, (const T *)g.W + (size_t)row * K + (size_t)c * 8);
    }
    __device__ __forceinline__ float dot(const float *x) const { /* x: the chunk's inputs */
        float w[8], acc = 0;
        cvt8(r, w);
#pragma unroll
        for (int i = 0; i < 8; i++) acc += w[i] * x[i];
        return acc;
    }
};
template <> struct gate_chunk<16> : gate_chunk_f<__nv_bfloat16> {};
template <> struct gate_chunk<17> : gate_chunk_f<__half> {};
template <> struct gate_chunk<32> : gate_chunk_f<float> {};
template <int BITS> struct gate_chunk_q {
    static constexpr int N = 32;
    qchunk<BITS> q;
    float sc, bi;
    __device__ __forceinline__ void load(const gate_args &g, int K, int row, int c) {
        qfetch<BITS>(q, sc, bi, (const uint32_t *)g.W + (size_t)row * (K / 32 * BITS), g.S, g.B, g.sdt,
                     (size_t)row * (K / g.group), g.group, c);
    }
    __device__ __forceinline__ float dot(const float *x) const {
        float dq = 0, dx = 0;
#pragma unroll
        for (int j = 0; j < 32; j++) dq += qget<BITS>(q, j) * x[j], dx += x[j];
        return sc * dq + bi * dx;
    }
};
template <> struct gate_chunk<4> : gate_chunk_q<4> {};
template <> struct gate_chunk<8> : gate_chunk_q<8> {};

/* CPL: chunks of its row a lane loads before the PDL wait; rpb gate rows a block;
 * f as np <= NP partial sums */
template <int A, int P, int GK, int CPL, int NP>
__global__ void __launch_bounds__(1024 / P)
    k_correct_gate(float *out, const float *pred, float *qs, const float *f, int np, const float *s, const float *w_ff,
                   const void *R, int rdtype, const float *rnorm, const float *coefs, const float *oscale, int dim,
                   float eps, int rpb, gate_args g) {
    using CH = gate_chunk<GK>;
    __shared__ float red[32 * (A + 1)];
    __shared__ __align__(16) float xs[2048];
    __shared__ float part[32];
    const int nw = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wpr = nw / rpb; /* warps per gate row */
    /* warps past rpb * wpr (a width whose warps are not a power of two) idle */
    const int grow = warp < rpb * wpr ? blockIdx.x * rpb + warp / wpr : g.rows, sub = warp % wpr;
    const int nch = dim / CH::N;
    float2 wr[P][A], wf[P], rn[P], os[P];
    float cf[A * A];
    correct_params<A, P>(wr, wf, rn, os, cf, R, rdtype, w_ff, rnorm, oscale, coefs, dim);
    CH ch[CPL];
#pragma unroll
    for (int j = 0; j < CPL; j++) {
        const int c = sub * 32 + lane + j * 32 * wpr;
        if (grow < g.rows && c < nch) ch[j].load(g, dim, grow, c);
    }
    KERNEL_BEGIN();
    float2 pv[P][A], ov[P];
    correct_row<A, P, NP>(pv, ov, pred, f, s, (size_t)dim, 0, wr, wf, rn, cf, dim, eps, red, np, (size_t)dim);
#pragma unroll
    for (int k = 0; k < P; k++) {
        const int o = pair_col<P>(k);
        const float2 q = make_float2(pv[k][0].x * os[k].x, pv[k][0].y * os[k].y);
        st2(xs, o, q);
        if (blockIdx.x == 0) {
#pragma unroll
            for (int i = 0; i < A; i++) st2(out + (size_t)i * dim, o, pv[k][i]);
            st2(qs, o, q);
        }
    }
    __syncthreads();
    float acc = 0;
    if (grow < g.rows) {
#pragma unroll
        for (int j = 0; j < CPL; j++) {
            const int c = sub * 32 + lane + j * 32 * wpr;
            if (c < nch) acc += ch[j].dot(xs + c * CH::N);
        }
        for (int c = sub * 32 + lane + CPL * 32 * wpr; c < nch; c += 32 * wpr) { /* rows longer than the preload */
            CH x1;
            x1.load(g, dim, grow, c);
            acc += x1.dot(xs + c * CH::N);
        }
    }
    acc = warp_sum(acc);
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    if (sub == 0 && lane == 0 && grow < g.rows) {
        float v = 0;
        for (int k = 0; k < wpr; k++) v += part[warp + k];
        g.pg[grow] = gelu_tanh_d(v) * g.m[grow];
    }
}

template <int P>
__global__ void __launch_bounds__(1024 / P)
    k_attn_residual_reg(float *s, float *u, const float *att, const float *lau, const float *x, const float *a,
                        const float *w_att, const float *w_lau, const float *w_ff, int dim, float eps, float rs) {
    __shared__ float red[64];
    float2 wa[P], wl[P], wf[P], at[P], la[P], xv[P], av[P], sv[P];
    const size_t row = (size_t)blockIdx.x * dim;
#pragma unroll
    for (int k = 0; k < P; k++) {
        const int d = pair_col<P>(k);
        wa[k] = ld2(w_att, d), wl[k] = ld2(w_lau, d), wf[k] = ld2(w_ff, d);
    }
    KERNEL_BEGIN();
    float sums[2] = {0, 0};
#pragma unroll
    for (int k = 0; k < P; k++) {
        const int o = (int)row + pair_col<P>(k);
        at[k] = ld2(att, o), la[k] = ld2(lau, o), xv[k] = ld2(x, o), av[k] = ld2(a, o);
        sums[0] += at[k].x * at[k].x + at[k].y * at[k].y, sums[1] += la[k].x * la[k].x + la[k].y * la[k].y;
    }
    block_sum_n<2>(sums, red);
    const float i1 = rsqrtf(sums[0] / (float)dim + eps), i2 = rsqrtf(sums[1] / (float)dim + eps);
    float ss = 0;
#pragma unroll
    for (int k = 0; k < P; k++) {
        const float lx = la[k].x * i2 * wl[k].x + xv[k].x, ly = la[k].y * i2 * wl[k].y + xv[k].y;
        sv[k] = make_float2((av[k].x + at[k].x * i1 * wa[k].x + lx) * rs, (av[k].y + at[k].y * i1 * wa[k].y + ly) * rs);
        st2(s, (int)row + pair_col<P>(k), sv[k]);
        ss += sv[k].x * sv[k].x + sv[k].y * sv[k].y;
    }
    const float i3 = rsqrtf(block_sum(ss, red) / (float)dim + eps);
#pragma unroll
    for (int k = 0; k < P; k++)
        st2(u, (int)row + pair_col<P>(k), make_float2(sv[k].x * i3 * wf[k].x, sv[k].y * i3 * wf[k].y));
}

/* The planes' ends, register-resident (cuda_fast_planes): OP PL_MATCH,
 * magnitude_match_planes (planes 1.. of S, at v = S + plane, matched to S[0]);
 * PL_UNEMBED, altup_unembed (S0 and the v_k matched to it, averaged and normed
 * into out); PL_PLE_ADD, ple_add (planes 1.. of S += rmsnorm(v, w)). The
 * generic kernels' maths, in the same order; one block sum of every plane's
 * squares (magnitudes; for ple_add v's), and for altup_unembed one more. */
template <int A, int P, int OP>
__global__ void __launch_bounds__(1024 / P)
    k_planes_reg(float *out, float *S, const float *v, size_t vstride, const float *w, int dim, float floor_ms,
                 float eps) {
    __shared__ float red[32 * A];
    const size_t o = (size_t)blockIdx.x * dim, plane = (size_t)gridDim.x * dim;
    float2 wv[P];
#pragma unroll
    for (int k = 0; k < P; k++) wv[k] = w ? ld2(w, pair_col<P>(k)) : make_float2(1, 1);
    KERNEL_BEGIN();
    float2 sv[P][A]; /* OP PL_PLE_ADD: S's planes, then v in [k][0]; else S0 and the v_k */
    float sums[A] = {};
#pragma unroll
    for (int k = 0; k < P; k++) {
        const int d = (int)o + pair_col<P>(k);
#pragma unroll
        for (int j = 0; j < A; j++) {
            sv[k][j] = OP == PL_PLE_ADD ? (j ? ld2(S + j * plane, d) : ld2(v, d))
                                        : (j ? ld2(v + (j - 1) * vstride, d) : ld2(S, d));
            if (OP != PL_PLE_ADD || j == 0) sums[j] += sv[k][j].x * sv[k][j].x + sv[k][j].y * sv[k][j].y;
        }
    }
    block_sum_n<A>(sums, red);
    if (OP == PL_PLE_ADD) {
        const float inv = rsqrtf(sums[0] / (float)dim + eps);
#pragma unroll
        for (int k = 0; k < P; k++) {
            const int d = (int)o + pair_col<P>(k);
            const float gx = sv[k][0].x * inv * wv[k].x, gy = sv[k][0].y * inv * wv[k].y;
#pragma unroll
            for (int j = 1; j < A; j++) st2(S + j * plane, d, make_float2(sv[k][j].x + gx, sv[k][j].y + gy));
        }
        return;
    }
    float ms[A];
    const float target = sqrtf(sums[0] / (float)dim);
#pragma unroll
    for (int j = 1; j < A; j++) ms[j] = sqrtf(fmaxf(sums[j] / (float)dim, floor_ms));
    if (OP == PL_MATCH) {
#pragma unroll
        for (int k = 0; k < P; k++)
#pragma unroll
            for (int j = 1; j < A; j++)
                st2((float *)v + (j - 1) * vstride, (int)o + pair_col<P>(k),
                    make_float2(sv[k][j].x * target / ms[j], sv[k][j].y * target / ms[j]));
        return;
    }
    const float inv_a = 1.0f / (float)A;
    float2 h[P];
    float ss = 0;
#pragma unroll
    for (int k = 0; k < P; k++) {
        h[k] = sv[k][0];
#pragma unroll
        for (int j = 1; j < A; j++)
            h[k].x = h[k].x + sv[k][j].x * target / ms[j], h[k].y = h[k].y + sv[k][j].y * target / ms[j];
        h[k].x = h[k].x * inv_a, h[k].y = h[k].y * inv_a;
        ss += h[k].x * h[k].x + h[k].y * h[k].y;
    }
    const float inv = rsqrtf(block_sum(ss, red) / (float)dim + eps);
#pragma unroll
    for (int k = 0; k < P; k++)
        st2(out, (int)o + pair_col<P>(k),
            w ? make_float2(h[k].x * inv * wv[k].x, h[k].y * inv * wv[k].y) : make_float2(h[k].x * inv, h[k].y * inv));
}

/* top-k + gelu * up for n = EPT * 1024: EPT values per thread in registers */
template <int EPT>
__global__ void __launch_bounds__(1024) k_mlp_act_reg(float *g, const float *up, int n, float kappa) {
    KERNEL_BEGIN();
    __shared__ float red[32];
    float *gr = g + (size_t)blockIdx.x * n;
    const float *ur = up + (size_t)blockIdx.x * n;
    float v[EPT], uv[EPT];
#pragma unroll
    for (int k = 0; k < EPT / 4; k++) {
        const int i = (k * blockDim.x + threadIdx.x) * 4;
        const float4 a = *(const float4 *)(gr + i), b = *(const float4 *)(ur + i);
        v[4 * k] = a.x, v[4 * k + 1] = a.y, v[4 * k + 2] = a.z, v[4 * k + 3] = a.w;
        uv[4 * k] = b.x, uv[4 * k + 1] = b.y, uv[4 * k + 2] = b.z, uv[4 * k + 3] = b.w;
    }
    const float cutoff = kappa > 0 ? topk_cutoff<EPT>(v, n, kappa, red) : -INFINITY;
#pragma unroll
    for (int k = 0; k < EPT / 4; k++) {
        float r4[4];
#pragma unroll
        for (int q = 0; q < 4; q++) {
            float z = v[4 * k + q];
            if (kappa > 0) z = z > cutoff ? z - cutoff : 0.0f;
            r4[q] = gelu_tanh_d(z) * uv[4 * k + q];
        }
        *(float4 *)(gr + (k * blockDim.x + threadIdx.x) * 4) = make_float4(r4[0], r4[1], r4[2], r4[3]);
    }
}

int cuda_fast_predict(cuda_ctx *c, float *pred, float *x, float *S, const float *ple, const float *ple_w,
                      const g3n_mat *router, const float *rnorm, const float *coefs, const float *innorm, int A,
                      int rows, int dim, float eps) {
    const int P = row_pairs(dim);
    if (A != 4 || !P) return 0;
#define PRED(P) launch(c, k_predict_reg<4, P>, dim3(rows), dim3(dim / (2 * P)), 0, pred, x, S, ple, ple_w, \
                       router->data, router->dtype, rnorm, coefs, innorm, rows, dim, eps)
    PAIRS_SWITCH(P, PRED)
#undef PRED
    return 1;
}

int cuda_fast_correct(cuda_ctx *c, float *out, const float *pred, float *qs, float *f, const float *s,
                      const float *w_ff, const g3n_mat *router, const float *rnorm, const float *coefs,
                      const float *oscale, int A, int rows, int dim, float eps) {
    const int P = row_pairs(dim);
    if (A != 4 || !P) return 0;
#define CORR(P) launch(c, k_correct_reg<4, P>, dim3(rows), dim3(dim / (2 * P)), 0, out, pred, qs, f, s, w_ff, \
                       router->data, router->dtype, rnorm, coefs, oscale, rows, dim, eps)
    PAIRS_SWITCH(P, CORR)
#undef CORR
    return 1;
}

/* k_planes_reg for the row kernels' shapes (A = 4, dim as row_pairs takes); 0 where it does not take it */
int cuda_fast_planes(cuda_ctx *c, int op, float *out, float *S, const float *v, size_t vstride, const float *w, int A,
                     int rows, int dim, float floor_ms, float eps) {
    const int P = row_pairs(dim);
    if (A != 4 || !P || rows <= 0) return 0;
#define PLR(P, OP) launch(c, k_planes_reg<4, P, OP>, dim3(rows), dim3(dim / (2 * P)), 0, out, S, v, vstride, w, dim, \
                          floor_ms, eps)
#define PLS(P)                                                     \
    switch (op) {                                                  \
    case PL_MATCH: PLR(P, PL_MATCH); break;                        \
    case PL_UNEMBED: PLR(P, PL_UNEMBED); break;                    \
    default: PLR(P, PL_PLE_ADD); break;                            \
    }
    PAIRS_SWITCH(P, PLS)
#undef PLS
#undef PLR
    return 1;
}

/* k_correct_gate's weight kind for the gate matrix W (gate_chunk), 0 where it has none */
static int gate_kind(const g3n_mat *W) {
    if (W->transposed || !W->data) return 0;
    if (W->bits) return (W->bits == 4 || W->bits == 8) && W->group_size >= 32 ? W->bits : 0;
    return W->dtype == G3N_BF16 ? 16 : W->dtype == G3N_F16 ? 17 : W->dtype == G3N_F32 ? 32 : 0;
}

void cuda_op_altup_correct_gate(g3n_backend *be, float *out, const float *pred, float *qs, float *f, int f_parts,
                                const float *s,
                                g3n_vec post_ff, const g3n_mat *router, g3n_vec router_norm, g3n_vec coefs,
                                g3n_vec out_scale, float *pg, const g3n_mat *gate, const float *ple, int A, int rows,
                                int dim, float eps) {
    cuda_ctx *c = CTX(be);
    /* timing knobs, read once: G3N_CORRECT_GATE=0 (the two ops), G3N_CG_PAIRS=4,
     * G3N_CG_RPB=n (below) */
    static int on = -1, pairs4, rpb_env;
    if (on < 0) {
        on = !(getenv("G3N_CORRECT_GATE") && !atoi(getenv("G3N_CORRECT_GATE")));
        pairs4 = getenv("G3N_CG_PAIRS") && atoi(getenv("G3N_CG_PAIRS")) == 4;
        rpb_env = getenv("G3N_CG_RPB") ? atoi(getenv("G3N_CG_RPB")) : 0;
    }
    int P = row_pairs(dim);
    if (pairs4 && P == 2 && dim % 256 == 0) P = 4;
    const int gk = gate_kind(gate);
    const int one = on && rows == 1 && A == 4 && P && gk && gate->cols == dim; /* k_correct_gate */
    /* f's parts (matmul_parts): added by k_correct_gate as it loads f where the
     * gate is quantized (the down products that leave parts are), else first, in order */
    const int np = one && (gk == 4 || gk == 8) && f_parts <= QPARTS ? f_parts : 1;
    const size_t n = (size_t)rows * dim;
    for (int k = 1; k < f_parts && np == 1; k++) cuda_op_add(be, f, f, f + k * n, n);
    if (one) {
        PROF_BEGIN(c);
        /* Gate rows a block (a power of two up to its warps): 8 for 16- and 32-bit
         * gates, 4 quantized: measured best of 4, 8 and 16 on E4B and E2B
         * (docs/SPEED.md, sixteenth session; G3N_CG_RPB, for timing) */
        const int nw = dim / (2 * P) / 32;
        const int want = rpb_env > 0 ? rpb_env : gk >= 16 ? 8 : 4;
        int rpb = 1; /* the largest power of two <= want and <= nw */
        while (rpb * 2 <= want && rpb * 2 <= nw) rpb *= 2;
        const int wpr = nw / rpb, nch = dim / (gk >= 16 ? 8 : 32), cpl = nch <= 64 * wpr ? 2 : 4;
        const gate_args g = {gate->data, gate->scales, gate->biases, gate->sdtype, gate->group_size, gate->rows, pg, ple};
        const dim3 grid((unsigned)((gate->rows + rpb - 1) / rpb));
#define CGN(P, GK, CPL, NP)                                                                                   \
    launch(c, k_correct_gate<4, P, GK, CPL, NP>, grid, dim3(dim / (2 * P)), 0, out, pred, qs, (const float *)f, np, \
           s, post_ff.data, router->data, router->dtype, router_norm.data, coefs.data, out_scale.data, dim, eps, rpb, g)
#define CG(P, GK)                                                                     \
    do {                                                                              \
        if (cpl == 2) CGN(P, GK, 2, 1);                                               \
        else CGN(P, GK, 4, 1);                                                        \
    } while (0)
#define CGQ(P, GK) /* quantized gates: f as parts, too */                             \
    do {                                                                              \
        if (np > 1 && cpl == 2) CGN(P, GK, 2, QPARTS);                                \
        else if (np > 1) CGN(P, GK, 4, QPARTS);                                       \
        else CG(P, GK);                                                               \
    } while (0)
#define CGK(P)                                  \
    switch (gk) {                               \
    case 16: CG(P, 16); break;                  \
    case 17: CG(P, 17); break;                  \
    case 32: CG(P, 32); break;                  \
    case 4: CGQ(P, 4); break;                   \
    default: CGQ(P, 8); break;                  \
    }
        PAIRS_SWITCH(P, CGK)
#undef CGK
#undef CGQ
#undef CG
#undef CGN
        CUDA_LAUNCHED();
        PROF_END(c, "altup_correct_gate", (double)g3n_mat_bytes(gate));
        return;
    }
    /* the two ops; correct out of place where the row kernel takes it, else on a copy */
    PROF_BEGIN(c);
    if (cuda_fast_correct(c, out, pred, qs, f, s, post_ff.data, router, router_norm.data, coefs.data, out_scale.data,
                          A, rows, dim, eps)) {
        CUDA_LAUNCHED();
        PROF_END(c, "altup_correct_fused", 0);
    } else {
        CUDA_CHECK(cudaMemcpyAsync(out, pred, sizeof(float) * (size_t)A * rows * dim, cudaMemcpyDeviceToDevice,
                                   c->stream));
        cuda_op_altup_correct_fused(be, out, qs, f, s, post_ff, router, router_norm, coefs, out_scale, A, rows, dim,
                                    eps);
    }
    cuda_op_matmul_gelu_mul(be, pg, gate, qs, ple, rows);
}
