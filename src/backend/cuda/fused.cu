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
int cuda_fast_correct(cuda_ctx *c, float *pred, float *qs, float *f, const float *s, const float *w_ff,
                      const g3n_mat *router, const float *rnorm, const float *coefs, const float *oscale, int A,
                      int rows, int dim, float eps);
template <int EPT> __global__ void k_mlp_act_reg(float *g, const float *up, int n, float kappa);
__global__ void k_attn_residual_reg(float *s, float *u, const float *att, const float *lau, const float *x,
                                    const float *a, const float *w_att, const float *w_lau, const float *w_ff, int dim,
                                    float eps, float rs);

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
    float *dst = slot < H + Hkv ? L.k + cs_ + (size_t)(slot - H) * hd : L.v + cs_ + (size_t)(slot - H - Hkv) * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) dst[i] = vec[i];
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
    if (dim % 64 == 0 && dim <= 2048)
        launch(c, k_attn_residual_reg, dim3(rows), dim3(dim / 2), 0, s, u, (const float *)att, (const float *)lau_raw, x,
               a, post_att.data, post_laurel.data, pre_ff.data, dim, eps, res_scale);
    else
    launch(c, k_attn_residual, dim3(rows), dim3(ROW_THREADS), 0, s, u, att, lau_raw, x, a, post_att.data, post_laurel.data,
                                                         pre_ff.data, dim, eps, res_scale);
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
    if (!cuda_fast_correct(c, pred, qs, f, s, post_ff.data, router, router_norm.data, coefs.data, out_scale.data, A,
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
    launch(c, k_ple_add, dim3(rows), dim3(ROW_THREADS), 0, pred, proj, post_norm.data, A, rows, dim, eps);
    CUDA_LAUNCHED();
    PROF_END(c, "ple_add", 0);
}

/* ---- register-resident row kernels ----------------------------------------------------------
 * The same ops for the common shapes (dim a multiple of 64 up to 2048, one block
 * of dim/2 threads, two adjacent elements per thread; A known at compile time):
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

template <int A>
__global__ void __launch_bounds__(1024)
    k_predict_reg(float *pred, float *x, float *S, const float *ple, const float *ple_w, const void *R, int rdtype,
                  const float *rnorm, const float *coefs, const float *innorm, int rows, int dim, float eps) {
    __shared__ float red[32 * (A + 2)], scoef[A * A * A];
    const int r = blockIdx.x, d = 2 * threadIdx.x;
    const size_t plane = (size_t)rows * dim, o = (size_t)r * dim + d;
    /* weights first: they do not depend on the previous kernel */
    float2 wr[A];
    router_w2<A>(wr, R, rdtype, dim, d);
    const float2 rn = ld2(rnorm, d), inn = ld2(innorm, d), pw = ple ? ld2(ple_w, d) : make_float2(0, 0);
    for (int i = threadIdx.x; i < A * A * A; i += blockDim.x) scoef[i] = coefs[i]; /* read after the first block sum */
    KERNEL_BEGIN();
    float2 s[A];
#pragma unroll
    for (int j = 0; j < A; j++) s[j] = ld2(S + j * plane, (int)o);
    const float2 p = ple ? ld2(ple + (size_t)r * dim, d) : make_float2(0, 0);
    /* one block sum for both norms and the router's dot products: the router
     * reads plane 0, which the per-layer input does not touch, and its norm's
     * 1/rms is a common factor, applied after the sum */
    float sums[2 + A];
    sums[0] = s[0].x * s[0].x + s[0].y * s[0].y, sums[1] = p.x * p.x + p.y * p.y;
#pragma unroll
    for (int a = 0; a < A; a++) sums[2 + a] = wr[a].x * (s[0].x * rn.x) + wr[a].y * (s[0].y * rn.y);
    block_sum_n<2 + A>(sums, red);
    if (ple) { /* the previous layer's per-layer input joins planes 1.. of the state */
        const float ip = rsqrtf(sums[1] / (float)dim + eps);
        const float gx = p.x * ip * pw.x, gy = p.y * ip * pw.y;
#pragma unroll
        for (int j = 1; j < A; j++) {
            s[j].x += gx, s[j].y += gy;
            st2(S + j * plane, (int)o, s[j]);
        }
    }
    const float inv = rsqrtf(sums[0] / (float)dim + eps) / (float)dim;
    float m[A];
#pragma unroll
    for (int a = 0; a < A; a++) m[a] = tanhf(sums[2 + a] * inv);
    float2 p0;
    float ss0 = 0;
#pragma unroll
    for (int i = 0; i < A; i++) {
        float2 acc = s[i];
#pragma unroll
        for (int j = 0; j < A; j++) {
            float cij = 0;
#pragma unroll
            for (int k = 0; k < A; k++) cij += scoef[(i * A + j) * A + k] * m[k];
            acc.x += cij * s[j].x, acc.y += cij * s[j].y;
        }
        st2(pred + i * plane, (int)o, acc);
        if (i == 0) p0 = acc, ss0 = acc.x * acc.x + acc.y * acc.y;
    }
    const float inv0 = rsqrtf(block_sum(ss0, red) / (float)dim + eps);
    st2(x, (int)o, make_float2(p0.x * inv0 * inn.x, p0.y * inv0 * inn.y));
}

template <int A>
__global__ void __launch_bounds__(1024)
    k_correct_reg(float *pred, float *qs, float *f, const float *s, const float *w_ff, const void *R, int rdtype,
                  const float *rnorm, const float *coefs, const float *oscale, int rows, int dim, float eps) {
    __shared__ float red[32 * (A + 1)];
    const int r = blockIdx.x, d = 2 * threadIdx.x;
    const size_t plane = (size_t)rows * dim, o = (size_t)r * dim + d;
    float2 wr[A];
    router_w2<A>(wr, R, rdtype, dim, d);
    const float2 wf = ld2(w_ff, d), rn = ld2(rnorm, d), os = oscale ? ld2(oscale, d) : make_float2(1, 1);
    float cf[A * A];
#pragma unroll
    for (int k = 0; k < A * A; k++) cf[k] = coefs[k];
    KERNEL_BEGIN();
    float2 fv = ld2(f, (int)o), sv = ld2(s, (int)o), pv[A];
#pragma unroll
    for (int j = 0; j < A; j++) pv[j] = ld2(pred + j * plane, (int)o);
    const float i1 = rsqrtf(block_sum(fv.x * fv.x + fv.y * fv.y, red) / (float)dim + eps);
    const float2 ov = make_float2(sv.x + fv.x * i1 * wf.x, sv.y + fv.y * i1 * wf.y);
    st2(f, (int)o, ov);
    /* one block sum for the router input's norm and the router's dot products
     * (its 1/rms is a common factor, applied after the sum, as in k_predict_reg) */
    float sums[1 + A];
    sums[0] = ov.x * ov.x + ov.y * ov.y;
#pragma unroll
    for (int a = 0; a < A; a++) sums[1 + a] = wr[a].x * (ov.x * rn.x) + wr[a].y * (ov.y * rn.y);
    block_sum_n<1 + A>(sums, red);
    const float i2 = rsqrtf(sums[0] / (float)dim + eps) / (float)dim;
    float m[A];
#pragma unroll
    for (int a = 0; a < A; a++) m[a] = tanhf(sums[1 + a] * i2);
    const float dx = ov.x - pv[0].x, dy = ov.y - pv[0].y;
#pragma unroll
    for (int i = 0; i < A; i++) {
        float k = 0;
#pragma unroll
        for (int j = 0; j < A; j++) k += cf[i * A + j] * m[j];
        k += 1.0f;
        pv[i].x += k * dx, pv[i].y += k * dy;
        st2(pred + i * plane, (int)o, pv[i]);
    }
    st2(qs, (int)o, make_float2(pv[0].x * os.x, pv[0].y * os.y));
}

__global__ void __launch_bounds__(1024)
    k_attn_residual_reg(float *s, float *u, const float *att, const float *lau, const float *x, const float *a,
                        const float *w_att, const float *w_lau, const float *w_ff, int dim, float eps, float rs) {
    __shared__ float red[64];
    const int d = 2 * threadIdx.x;
    const size_t o = (size_t)blockIdx.x * dim + d;
    const float2 wa = ld2(w_att, d), wl = ld2(w_lau, d), wf = ld2(w_ff, d);
    KERNEL_BEGIN();
    const float2 at = ld2(att, (int)o), la = ld2(lau, (int)o), xv = ld2(x, (int)o), av = ld2(a, (int)o);
    float sums[2] = {at.x * at.x + at.y * at.y, la.x * la.x + la.y * la.y};
    block_sum_n<2>(sums, red);
    const float i1 = rsqrtf(sums[0] / (float)dim + eps), i2 = rsqrtf(sums[1] / (float)dim + eps);
    const float lx = la.x * i2 * wl.x + xv.x, ly = la.y * i2 * wl.y + xv.y;
    const float2 sv = make_float2((av.x + at.x * i1 * wa.x + lx) * rs, (av.y + at.y * i1 * wa.y + ly) * rs);
    st2(s, (int)o, sv);
    const float i3 = rsqrtf(block_sum(sv.x * sv.x + sv.y * sv.y, red) / (float)dim + eps);
    st2(u, (int)o, make_float2(sv.x * i3 * wf.x, sv.y * i3 * wf.y));
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

/* Dispatch: 1 when a register-resident kernel took the op. */
static int reg_shape_ok(int dim) { return dim % 64 == 0 && dim <= 2048; }

int cuda_fast_predict(cuda_ctx *c, float *pred, float *x, float *S, const float *ple, const float *ple_w,
                      const g3n_mat *router, const float *rnorm, const float *coefs, const float *innorm, int A,
                      int rows, int dim, float eps) {
    if (A != 4 || !reg_shape_ok(dim)) return 0;
    launch(c, k_predict_reg<4>, dim3(rows), dim3(dim / 2), 0, pred, x, S, ple, ple_w, router->data, router->dtype,
           rnorm, coefs, innorm, rows, dim, eps);
    return 1;
}

int cuda_fast_correct(cuda_ctx *c, float *pred, float *qs, float *f, const float *s, const float *w_ff,
                      const g3n_mat *router, const float *rnorm, const float *coefs, const float *oscale, int A,
                      int rows, int dim, float eps) {
    if (A != 4 || !reg_shape_ok(dim)) return 0;
    launch(c, k_correct_reg<4>, dim3(rows), dim3(dim / 2), 0, pred, qs, f, s, w_ff, router->data, router->dtype,
           rnorm, coefs, oscale, rows, dim, eps);
    return 1;
}
