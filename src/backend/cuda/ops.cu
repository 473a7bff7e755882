/* ops.cu: the CUDA backend's small ops: embedding gathers, RMSNorm, RoPE, K/V
 * stores, elementwise maths, Gaussian top-k, AltUp predict/correct, magnitude
 * matching, per-layer inputs, and the bandwidth probe. One kernel per op, f32
 * activations, fp32 arithmetic. Matrix products are in gemv.cu, attention in
 * attention.cu. Each op is tested against cpu_ref.c in tests/test_ops.c. */
#include "cuda_common.cuh"

static inline unsigned nblk(size_t n, int t) { return (unsigned)((n + (size_t)t - 1) / (size_t)t); }

/* ---- embedding ---------------------------------------------------------------------- */

__global__ void k_embed(float *y, const void *W, int dtype, int rows, int cols, const int32_t *ids,
                        float scale) {
    KERNEL_BEGIN();
    const int t = blockIdx.y;
    int id = ids[t];
    if (id < 0 || id >= rows) id = 0;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < cols; i += gridDim.x * blockDim.x)
        y[(size_t)t * cols + i] = load_w(W, dtype, (size_t)id * cols + i) * scale;
}

/* rows already gathered into the staging buffer, in batch order */
__global__ void k_embed_staged(float *y, const void *stage, int dtype, int cols, float scale) {
    KERNEL_BEGIN();
    const int t = blockIdx.y;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < cols; i += gridDim.x * blockDim.x)
        y[(size_t)t * cols + i] = load_w(stage, dtype, (size_t)t * cols + i) * scale;
}

void cuda_op_embed(g3n_backend *be, float *y, const g3n_mat *W, float scale) {
    cuda_ctx *c = CTX(be);
    dim3 grid(nblk((size_t)W->cols, 256) > 64 ? 64 : nblk((size_t)W->cols, 256), c->n_tokens);
    PROF_BEGIN(c);
    for (int i = 0; i < c->n_tables; i++)
        if (c->tables[i].host == W->data) {
            const void *stage = stage_direct(c) ? c->tables[i].h_stage : c->tables[i].d_stage;
            if (c->tables[i].qm.bits) cuda_quant_embed_staged(c, y, &c->tables[i], stage, scale);
            else {
                launch(c, k_embed_staged, dim3(grid), dim3(256), 0, y, stage, c->tables[i].dtype, W->cols, scale);
                CUDA_LAUNCHED();
            }
            PROF_END(c, "embed (host table)", 0);
            return;
        }
    if (W->bits) return cuda_quant_embed(c, y, W, scale); /* quant.cu */
    launch(c, k_embed, dim3(grid), dim3(256), 0, y, W->data, W->dtype, W->rows, W->cols, d_ids(c), scale);
    CUDA_LAUNCHED();
    PROF_END(c, "embed", 0);
}

/* ---- RMSNorm: one block per row --------------------------------------------------------- */

__global__ void k_rmsnorm(float *y, const float *x, const float *w, int dim, float eps) {
    KERNEL_BEGIN();
    __shared__ float sh[32];
    const float *xr = x + (size_t)blockIdx.x * dim;
    float *yr = y + (size_t)blockIdx.x * dim;
    float ss = 0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, sh);
    const float inv = rsqrtf(ss / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = w ? xr[i] * inv * w[i] : xr[i] * inv;
}

static int threads_for(int dim) { return dim >= 1024 ? 256 : dim >= 256 ? 128 : dim >= 64 ? 64 : 32; }

void cuda_op_rmsnorm(g3n_backend *be, float *y, const float *x, g3n_vec w, int rows, int dim,
                     float eps) {
    if (rows <= 0) return;
    PROF_BEGIN(CTX(be));
    launch(CTX(be), k_rmsnorm, dim3(rows), dim3(threads_for(dim)), 0, y, x, w.data, dim, eps);
    CUDA_LAUNCHED();
    PROF_END(CTX(be), "rmsnorm", 0);
}

/* ---- RoPE ---------------------------------------------------------------------------------- */

__global__ void k_rope(float *x, const int32_t *pos, int n_head, int head_dim, float theta) {
    KERNEL_BEGIN();
    const int t = blockIdx.x, half = head_dim / 2;
    const float p = (float)pos[t];
    for (int k = threadIdx.x; k < n_head * half; k += blockDim.x) {
        const int h = k / half, i = k % half;
        const float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)head_dim);
        float sn, cs;
        sincosf(inv_freq * p, &sn, &cs);
        float *v = x + ((size_t)t * n_head + h) * head_dim;
        const float a = v[i], b = v[i + half];
        v[i] = a * cs - b * sn;
        v[i + half] = b * cs + a * sn;
    }
}

void cuda_op_rope(g3n_backend *be, float *x, int n_head, int head_dim, float theta) {
    cuda_ctx *c = CTX(be);
    PROF_BEGIN(c);
    launch(c, k_rope, dim3(c->n_tokens), dim3(128), 0, x, d_pos(c), n_head, head_dim, theta);
    CUDA_LAUNCHED();
    PROF_END(c, "rope", 0);
}

/* ---- K/V store ----------------------------------------------------------------------------- */

__global__ void k_kv_store(const g3n_kv_layer *kv, int layer, const int32_t *pos, const int32_t *seq,
                           const float *k, const float *v, int kv_dim) {
    KERNEL_BEGIN();
    const int t = blockIdx.x;
    const g3n_kv_layer L = kv[(size_t)seq[t] * G3N_KV_MAX_LAYERS + layer];
    const size_t slot = (size_t)(pos[t] % L.cap);
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        kv_st(L, L.k, slot * kv_dim + i, k[(size_t)t * kv_dim + i]);
        kv_st(L, L.v, slot * kv_dim + i, v[(size_t)t * kv_dim + i]);
    }
}

void cuda_op_kv_store(g3n_backend *be, int layer, const float *k, const float *v, int kv_dim) {
    cuda_ctx *c = CTX(be);
    PROF_BEGIN(c);
    launch(c, k_kv_store, dim3(c->n_tokens), dim3(128), 0, c->d_kv, layer, d_pos(c), d_seq(c), k, v, kv_dim);
    CUDA_LAUNCHED();
    PROF_END(c, "kv_store", 0);
}

/* ---- elementwise ------------------------------------------------------------------------------ */

__global__ void k_add(float *y, const float *a, const float *b, size_t n) {
    KERNEL_BEGIN();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = a[i] + b[i];
}
__global__ void k_scale(float *y, const float *x, float s, size_t n) {
    KERNEL_BEGIN();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = x[i] * s;
}
__global__ void k_add3_scale(float *y, const float *a, const float *b, const float *c, float s, size_t n) {
    KERNEL_BEGIN();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = (a[i] + b[i] + c[i]) * s;
}
__global__ void k_mul_vec(float *y, const float *x, const float *w, int dim, size_t n) {
    KERNEL_BEGIN();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = x[i] * w[i % dim];
}
__global__ void k_gelu_mul(float *y, const float *g, const float *u, size_t n) {
    KERNEL_BEGIN();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = gelu_tanh_d(g[i]) * (u ? u[i] : 1.0f);
}
__global__ void k_tanh(float *y, const float *x, size_t n) {
    KERNEL_BEGIN();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = tanhf(x[i]);
}
__global__ void k_softcap(float *x, size_t n, float cap) {
    KERNEL_BEGIN();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] = cap * tanhf(x[i] / cap);
}

static unsigned grid_for(size_t n) {
    size_t b = (n + 255) / 256;
    return (unsigned)(b > 4096 ? 4096 : b ? b : 1);
}

void cuda_op_add(g3n_backend *be, float *y, const float *a, const float *b, size_t n) {
    PROF_BEGIN(CTX(be));
    launch(CTX(be), k_add, dim3(grid_for(n)), dim3(256), 0, y, a, b, n);
    CUDA_LAUNCHED();
    PROF_END(CTX(be), "add", 0);
}
void cuda_op_scale(g3n_backend *be, float *y, const float *x, float s, size_t n) {
    PROF_BEGIN(CTX(be));
    launch(CTX(be), k_scale, dim3(grid_for(n)), dim3(256), 0, y, x, s, n);
    CUDA_LAUNCHED();
    PROF_END(CTX(be), "scale", 0);
}
void cuda_op_add3_scale(g3n_backend *be, float *y, const float *a, const float *b, const float *c,
                        float s, size_t n) {
    PROF_BEGIN(CTX(be));
    launch(CTX(be), k_add3_scale, dim3(grid_for(n)), dim3(256), 0, y, a, b, c, s, n);
    CUDA_LAUNCHED();
    PROF_END(CTX(be), "add3_scale", 0);
}
void cuda_op_mul_vec(g3n_backend *be, float *y, const float *x, g3n_vec w, int rows, int dim) {
    size_t n = (size_t)rows * dim;
    PROF_BEGIN(CTX(be));
    launch(CTX(be), k_mul_vec, dim3(grid_for(n)), dim3(256), 0, y, x, w.data, dim, n);
    CUDA_LAUNCHED();
    PROF_END(CTX(be), "mul_vec", 0);
}
void cuda_op_gelu_mul(g3n_backend *be, float *y, const float *g, const float *u, size_t n) {
    PROF_BEGIN(CTX(be));
    launch(CTX(be), k_gelu_mul, dim3(grid_for(n)), dim3(256), 0, y, g, u, n);
    CUDA_LAUNCHED();
    PROF_END(CTX(be), "gelu_mul", 0);
}
void cuda_op_tanh(g3n_backend *be, float *y, const float *x, size_t n) {
    PROF_BEGIN(CTX(be));
    launch(CTX(be), k_tanh, dim3(grid_for(n)), dim3(256), 0, y, x, n);
    CUDA_LAUNCHED();
    PROF_END(CTX(be), "tanh", 0);
}
void cuda_op_softcap(g3n_backend *be, float *x, size_t n, float cap) {
    PROF_BEGIN(CTX(be));
    launch(CTX(be), k_softcap, dim3(grid_for(n)), dim3(256), 0, x, n, cap);
    CUDA_LAUNCHED();
    PROF_END(CTX(be), "softcap", 0);
}

/* ---- Gaussian top-k: one block per row ---------------------------------------------------------- */

__global__ void k_gaussian_topk(float *x, int dim, float kappa) {
    KERNEL_BEGIN();
    __shared__ float sh[32];
    float *xr = x + (size_t)blockIdx.x * dim;
    float s = 0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) s += xr[i];
    const float mean = block_sum(s, sh) / (float)dim;
    float v = 0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) v += (xr[i] - mean) * (xr[i] - mean);
    const float sd = sqrtf(block_sum(v, sh) / (float)dim);
    const float cutoff = mean + sd * kappa;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) xr[i] = xr[i] > cutoff ? xr[i] - cutoff : 0.0f;
}

void cuda_op_gaussian_topk(g3n_backend *be, float *x, int rows, int dim, float kappa) {
    PROF_BEGIN(CTX(be));
    launch(CTX(be), k_gaussian_topk, dim3(rows), dim3(1024), 0, x, dim, kappa);
    CUDA_LAUNCHED();
    PROF_END(CTX(be), "gaussian_topk", 0);
}

/* ---- AltUp ---------------------------------------------------------------------------------------- */

#define MAXA 8

/* one block per row: the A x A mix from the router output, then every plane */
__global__ void k_altup_predict(float *pred, const float *S, const float *m, const float *coefs, int A,
                                int rows, int dim) {
    KERNEL_BEGIN();
    __shared__ float C[MAXA * MAXA];
    const int r = blockIdx.x;
    if (threadIdx.x < A * A) {
        float acc = 0;
        for (int j = 0; j < A; j++) acc += coefs[threadIdx.x * A + j] * m[r * A + j];
        C[threadIdx.x] = acc;
    }
    __syncthreads();
    const size_t plane = (size_t)rows * dim;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        const size_t o = (size_t)r * dim + d;
        float s[MAXA];
        for (int j = 0; j < A; j++) s[j] = S[j * plane + o];
        for (int i = 0; i < A; i++) {
            float acc = s[i];
            for (int j = 0; j < A; j++) acc += C[i * A + j] * s[j];
            pred[i * plane + o] = acc;
        }
    }
}

__global__ void k_altup_correct(float *corr, const float *pred, const float *o, const float *m,
                                const float *coefs, int A, int rows, int dim) {
    KERNEL_BEGIN();
    __shared__ float kk[MAXA];
    const int r = blockIdx.x;
    if (threadIdx.x < A) {
        float acc = 0;
        for (int j = 0; j < A; j++) acc += coefs[threadIdx.x * A + j] * m[r * A + j];
        kk[threadIdx.x] = acc + 1.0f;
    }
    __syncthreads();
    const size_t plane = (size_t)rows * dim;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        const size_t off = (size_t)r * dim + d;
        const float delta = o[off] - pred[off];
        for (int i = 0; i < A; i++) corr[i * plane + off] = pred[i * plane + off] + kk[i] * delta;
    }
}

void cuda_op_altup_predict(g3n_backend *be, float *pred, const float *S, const float *m, g3n_vec coefs,
                           int A, int rows, int dim) {
    G3N_ASSERT(A <= MAXA);
    PROF_BEGIN(CTX(be));
    launch(CTX(be), k_altup_predict, dim3(rows), dim3(256), 0, pred, S, m, coefs.data, A, rows, dim);
    CUDA_LAUNCHED();
    PROF_END(CTX(be), "altup_predict", 0);
}

void cuda_op_altup_correct(g3n_backend *be, float *corr, const float *pred, const float *o, const float *m,
                           g3n_vec coefs, int A, int rows, int dim) {
    G3N_ASSERT(A <= MAXA);
    PROF_BEGIN(CTX(be));
    launch(CTX(be), k_altup_correct, dim3(rows), dim3(256), 0, corr, pred, o, m, coefs.data, A, rows, dim);
    CUDA_LAUNCHED();
    PROF_END(CTX(be), "altup_correct", 0);
}

__global__ void k_magnitude_match(float *y, const float *ref, int dim, float floor_ms) {
    KERNEL_BEGIN();
    __shared__ float sh[32];
    float *yr = y + (size_t)blockIdx.x * dim;
    const float *rr = ref + (size_t)blockIdx.x * dim;
    float a = 0, b = 0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        a += rr[i] * rr[i];
        b += yr[i] * yr[i];
    }
    a = block_sum(a, sh);
    b = block_sum(b, sh);
    const float target = sqrtf(a / (float)dim);
    const float ms = b / (float)dim;
    const float cur = sqrtf(ms > floor_ms ? ms : floor_ms);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = yr[i] * target / cur;
}

void cuda_op_magnitude_match(g3n_backend *be, float *y, const float *ref, int rows, int dim, float floor_ms) {
    PROF_BEGIN(CTX(be));
    launch(CTX(be), k_magnitude_match, dim3(rows), dim3(threads_for(dim)), 0, y, ref, dim, floor_ms);
    CUDA_LAUNCHED();
    PROF_END(CTX(be), "magnitude_match", 0);
}

/* ---- per-layer inputs: one block per (token, layer) ------------------------------------------------ */

__global__ void k_ple_combine(float *out, const float *proj, const float *z, const float *norm, int rows,
                              int L, int P, float proj_scale, float eps, float out_scale) {
    KERNEL_BEGIN();
    __shared__ float sh[32];
    const int t = blockIdx.x / L, l = blockIdx.x % L;
    const float *pr = proj + ((size_t)t * L + l) * P;
    const float *zr = z + ((size_t)t * L + l) * P;
    float ss = 0;
    for (int i = threadIdx.x; i < P; i += blockDim.x) {
        const float v = pr[i] * proj_scale;
        ss += v * v;
    }
    ss = block_sum(ss, sh);
    const float inv = rsqrtf(ss / (float)P + eps);
    float *o = out + ((size_t)l * rows + t) * P;
    for (int i = threadIdx.x; i < P; i += blockDim.x)
        o[i] = (pr[i] * proj_scale * inv * norm[i] + zr[i]) * out_scale;
}

void cuda_op_ple_combine(g3n_backend *be, float *out, const float *proj, const float *z, g3n_vec norm,
                         int rows, int L, int P, float proj_scale, float eps, float out_scale) {
    PROF_BEGIN(CTX(be));
    launch(CTX(be), k_ple_combine, dim3(rows * L), dim3(threads_for(P)), 0, out, proj, z, norm.data, rows, L, P,
                                                                     proj_scale, eps, out_scale);
    CUDA_LAUNCHED();
    PROF_END(CTX(be), "ple_combine", 0);
}

/* ---- bandwidth probe --------------------------------------------------------------------------------- */

__global__ void k_read(const float4 *p, size_t n, float *sink) {
    KERNEL_BEGIN();
    float acc = 0;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) { /* four 16-byte loads in flight */
        const float4 a = __ldcs(p + i), b = __ldcs(p + i + stride), c = __ldcs(p + i + 2 * stride),
                     d = __ldcs(p + i + 3 * stride);
        acc += a.x + b.y + c.z + d.w;
    }
    for (; i < n; i += stride) acc += __ldcs(p + i).x;
    if (acc == 123.456f) *sink = acc; /* keep the loads */
}

__global__ void k_copy(float4 *dst, const float4 *src, size_t n) {
    KERNEL_BEGIN();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __ldcs(src + i);
}

/* Bytes read per second by a streaming read kernel over `bytes` (best of 10);
 * the copy bandwidth (read + write) is logged beside it. */
double cuda_read_bandwidth(g3n_backend *be, size_t bytes) {
    cuda_ctx *c = CTX(be);
    size_t n = bytes / sizeof(float4);
    float4 *a, *b;
    float *sink;
    CUDA_CHECK(cudaMalloc(&a, n * sizeof(float4)));
    CUDA_CHECK(cudaMalloc(&b, n * sizeof(float4)));
    CUDA_CHECK(cudaMalloc(&sink, sizeof(float)));
    CUDA_CHECK(cudaMemsetAsync(a, 1, n * sizeof(float4), c->stream));
    int sms = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c->device));
    cudaEvent_t e0, e1;
    CUDA_CHECK(cudaEventCreate(&e0));
    CUDA_CHECK(cudaEventCreate(&e1));
    double best_read = 0, best_copy = 0;
    for (int it = 0; it < 12; it++) {
        float ms;
        CUDA_CHECK(cudaEventRecord(e0, c->stream));
        launch(c, k_read, dim3(sms * 4), dim3(1024), 0, a, n, sink);
        CUDA_CHECK(cudaEventRecord(e1, c->stream));
        CUDA_CHECK(cudaEventSynchronize(e1));
        CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
        if (it >= 2 && n * sizeof(float4) / (ms * 1e-3) > best_read) best_read = n * sizeof(float4) / (ms * 1e-3);
        CUDA_CHECK(cudaEventRecord(e0, c->stream));
        launch(c, k_copy, dim3(sms * 8), dim3(512), 0, b, a, n);
        CUDA_CHECK(cudaEventRecord(e1, c->stream));
        CUDA_CHECK(cudaEventSynchronize(e1));
        CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
        if (it >= 2 && 2.0 * n * sizeof(float4) / (ms * 1e-3) > best_copy)
            best_copy = 2.0 * n * sizeof(float4) / (ms * 1e-3);
    }
    g3n_log("g3n: GPU bandwidth: read %.0f GB/s, copy (read + write) %.0f GB/s\n", best_read / 1e9,
            best_copy / 1e9);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaFree(a);
    cudaFree(b);
    cudaFree(sink);
    return best_read;
}
