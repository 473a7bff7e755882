/* unembed.cu: the best logits of a decode step (1..G3N_PRUNE_ROWS rows, each
 * on its own) through an 8-bit copy of an unquantized LM head (backend.h:
 * unembed_prepare, logits_pruned).
 *
 * A step whose sampler picks from the best m logits (greedy: the largest;
 * Gemma's top-k 64: the best 65) needs only those, but the tied LM head is
 * 262,144 x 2,048 weights: in bf16 1.07 GB a token, 14% of what an E4B step
 * reads and 25% of E2B's. Here such a step reads an 8-bit copy (0.57 GB) and
 * then the rows of the few that can still be among the best (16-bit, or f32):
 *
 *  1. a_v = W~[v] . h for every row v, W~ the copy (groups of 64, bf16 scale
 *     and bias, made at load by k_unembed_quant), through the 8-bit products
 *     of quant.cu;
 *  2. the logit that matmul computes, d_v, lies within cm[v] |h| of a_v, where at
 *     load, in double, cm[v] = |W[v] - W~[v]| + 2^-11 (|W[v]| + |P[v]|), norms
 *     of row v and P[v]_i = |s q_i| + |b| (its scale and bias terms):
 *     |(W[v] - W~[v]) . h| <= |W[v] - W~[v]| |h| (Cauchy-Schwarz), and 2^-11
 *     |W[v]| |h| and 2^-11 |P[v]| |h| bound every rounding of the two fp32
 *     sums (at most K <= 8,192 terms: gamma_K < 2^-11, by the sum of the
 *     terms' magnitudes; the 8-bit products round only the activations, to
 *     2^-21 of a chunk's largest, and their float finish; gamma_2048 is a
 *     quarter of 2^-11, and the rest covers the bounds' own float arithmetic).
 *     |h| is rounded up by 2^-10. k_unembed_bound takes each block's largest
 *     lower bound a_v - cm[v] |h|;
 *  3. k_unembed_exact (gemv.cu) takes the m-th largest of those, t (the
 *     sampler's best m: 1 greedy, top-k + 1 sampling), less 2^-10 |t|, and gives
 *     every row whose upper bound a_v + cm[v] |h| reaches it its exact logit,
 *     the matmul's arithmetic (so the same bits) soft-capped as softcap does;
 *     the others -inf. m rows have d at or above t, so a row left out has d_v <
 *     t <= the m-th largest d: the best m logits and every logit equal to the
 *     m-th are among the exact ones; the slack covers the bounds' own roundings
 *     and rows that differ from the m-th by less than the cap's rounding.
 *
 * The copy's error is about 0.6% of a row's norm, so on random checkpoints the
 * candidates are a handful of rows for m 1 and ~150 for m 65 (of 262,144).
 * Rows at or past n (the sampler's vocabulary) are never candidates. The copy
 * is made only where the GPU keeps room after it; G3N_PRUNE=0 turns it off. */
#include "cuda_common.cuh"

#define UQ_GROUP 64
#define UQ_KAPPA (1.0 / 2048.0) /* 2^-11 */

struct cuda_unembed {
    g3n_mat q8;      /* the copy, as quant.cu's products read a matrix */
    const void *W;   /* the matrix it copies (its data) */
    float *cm;       /* [rows] the error bound per unit of |h| */
    float *bmax;     /* [G3N_PRUNE_ROWS][nblk] each bound block's largest lower bound */
    float *xn;       /* [G3N_PRUNE_ROWS] |h|, rounded up; then an int: k_unembed_quant's bad flag */
    int nblk;
    void *mem[6];
};

__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float uq_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float uq_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float uq_f(float x) { return x; }

/* One warp per row: each group of 64 as codes q in 0..255 with a bf16 bias at
 * or below its smallest weight and a bf16 scale at or above (largest - bias) /
 * 255, and the row's bound cm (rounded up); *bad = 1 where a row has no finite
 * bound (a weight that is NaN or infinite). */
template <typename T>
__global__ void k_unembed_quant(const T *W, int rows, int K, uint8_t *codes, __nv_bfloat16 *sc, __nv_bfloat16 *bi,
                                float *cm, int *bad) {
    const int row = (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T *w = W + (size_t)row * K;
    double d2 = 0, e2 = 0, p2 = 0;
    for (int g = 0; g < K / UQ_GROUP; g++) {
        const int i = g * UQ_GROUP + 2 * lane;
        const float x[2] = {uq_f(w[i]), uq_f(w[i + 1])};
        const float mn = warp_min(fminf(x[0], x[1])), mx = warp_max(fmaxf(x[0], x[1]));
        const __nv_bfloat16 bb = __float2bfloat16_rd(mn), sb = __float2bfloat16_ru((mx - __bfloat162float(bb)) / 255.f);
        const float b = __bfloat162float(bb), s = __bfloat162float(sb);
        unsigned q[2];
#pragma unroll
        for (int k = 0; k < 2; k++) {
            const float r = s > 0 ? rintf((x[k] - b) / s) : 0.f;
            q[k] = r >= 255.f ? 255u : r > 0.f ? (unsigned)r : 0u;
            const double y = (double)s * q[k] + (double)b, d = (double)x[k] - y, pk = (double)s * q[k] + fabs((double)b);
            d2 += d * d, e2 += (double)x[k] * x[k], p2 += pk * pk;
        }
        *(uint16_t *)(codes + (size_t)row * K + i) = (uint16_t)(q[0] | q[1] << 8);
        if (lane == 0) sc[(size_t)row * (K / UQ_GROUP) + g] = sb, bi[(size_t)row * (K / UQ_GROUP) + g] = bb;
    }
    d2 = warp_sum_d(d2), e2 = warp_sum_d(e2), p2 = warp_sum_d(p2);
    if (lane == 0) {
        const double c = (sqrt(d2) + UQ_KAPPA * (sqrt(e2) + sqrt(p2))) * (1.0 + 0x1p-20);
        if (!isfinite(c) || c > 3.0e38) *bad = 1;
        cm[row] = __double2float_ru(c);
    }
}

/* Each block's largest lower bound a_v - cm[v] |h| over its UP_ROWS rows below
 * n (UP_ROWS / UP_THREADS a thread, as k_unembed_exact takes them); block 0
 * also stores |h| (each block computes the same). Row blockIdx.y of h, a, bmax
 * and xn. */
__global__ void __launch_bounds__(UP_THREADS) k_unembed_bound(const float *a, const float *x, int K, const float *cm,
                                                               int rows, int n, float *bmax, float *xn) {
    constexpr int PT = UP_ROWS / UP_THREADS;
    __shared__ float red[32];
    const int v0 = blockIdx.x * UP_ROWS + threadIdx.x;
    a += (size_t)blockIdx.y * rows, x += (size_t)blockIdx.y * K, bmax += (size_t)blockIdx.y * gridDim.x;
    xn += blockIdx.y;
    float m[PT]; /* weights: before the wait */
#pragma unroll
    for (int k = 0; k < PT; k++) m[k] = v0 + k * UP_THREADS < rows ? cm[v0 + k * UP_THREADS] : 0.f;
    KERNEL_BEGIN();
    float ss = 0;
    for (int i = threadIdx.x; i < K; i += UP_THREADS) ss += x[i] * x[i];
    const float hn = sqrtf(block_sum(ss, red)) * (1.0f + 0x1p-10f);
    if (blockIdx.x == 0 && threadIdx.x == 0) *xn = hn;
    float lb = -INFINITY;
#pragma unroll
    for (int k = 0; k < PT; k++) {
        const int v = v0 + k * UP_THREADS;
        if (v < rows && v < n) lb = fmaxf(lb, a[v] - m[k] * hn);
    }
    lb = warp_max(lb);
    __syncthreads(); /* (red: block_sum's readers are done) */
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = lb;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < UP_THREADS / 32; w++) lb = fmaxf(lb, red[w]);
        bmax[blockIdx.x] = lb;
    }
}

void cuda_unembed_free(cuda_ctx *c) {
    cuda_unembed *u = c->unembed;
    if (!u) return;
    for (int i = 0; i < 6; i++)
        if (u->mem[i]) cudaFree(u->mem[i]);
    free(u);
    c->unembed = NULL;
}

size_t cuda_op_unembed_prepare(g3n_backend *be, const g3n_mat *W) {
    cuda_ctx *c = CTX(be);
    const char *e = getenv("G3N_PRUNE");
    if (e && !atoi(e)) return 0;
    if (!W->data || W->bits || W->transposed || (W->dtype != G3N_BF16 && W->dtype != G3N_F16 && W->dtype != G3N_F32) ||
        W->cols % UQ_GROUP || W->cols > 8192 || W->rows < 1)
        return 0;
    cudaPointerAttributes pa;
    if (cudaPointerGetAttributes(&pa, W->data) != cudaSuccess || pa.type != cudaMemoryTypeDevice) {
        cudaGetLastError();
        return 0; /* kept in host memory: not read by products */
    }
    cuda_unembed_free(c);
    const size_t R = (size_t)W->rows, ng = R * (W->cols / UQ_GROUP), nblk = (R + UP_ROWS - 1) / UP_ROWS;
    const size_t sz[6] = {R * W->cols, ng * 2, ng * 2, R * 4, G3N_PRUNE_ROWS * nblk * 4,
                          (G3N_PRUNE_ROWS + 1) * sizeof(float)};
    /* only where the GPU keeps room for what comes after the weights (K/V
     * caches, scratch): a tenth of it, at least 1 GB */
    size_t fr = 0, tot = 0;
    if (cudaMemGetInfo(&fr, &tot) != cudaSuccess ||
        fr < sz[0] + sz[1] + sz[2] + sz[3] + G3N_MAX(tot / 10, (size_t)1 << 30)) {
        cudaGetLastError();
        return 0;
    }
    cuda_unembed *u = (cuda_unembed *)g3n_calloc(1, sizeof(*u));
    c->unembed = u;
    u->nblk = (int)nblk;
    for (int i = 0; i < 6; i++)
        if (cudaMalloc(&u->mem[i], sz[i]) != cudaSuccess) {
            cudaGetLastError();
            cuda_unembed_free(c);
            return 0; /* no room for the copy: every step reads W */
        }
    u->W = W->data;
    u->cm = (float *)u->mem[3], u->bmax = (float *)u->mem[4], u->xn = (float *)u->mem[5];
    int *bad = (int *)(u->xn + G3N_PRUNE_ROWS);
    CUDA_CHECK(cudaMemsetAsync(bad, 0, sizeof(int), c->stream));
    const dim3 grid((unsigned)((R * 32 + 255) / 256));
    if (W->dtype == G3N_BF16)
        k_unembed_quant<<<grid, 256, 0, c->stream>>>((const __nv_bfloat16 *)W->data, W->rows, W->cols,
                                                     (uint8_t *)u->mem[0], (__nv_bfloat16 *)u->mem[1],
                                                     (__nv_bfloat16 *)u->mem[2], u->cm, bad);
    else if (W->dtype == G3N_F16)
        k_unembed_quant<<<grid, 256, 0, c->stream>>>((const __half *)W->data, W->rows, W->cols, (uint8_t *)u->mem[0],
                                                     (__nv_bfloat16 *)u->mem[1], (__nv_bfloat16 *)u->mem[2], u->cm,
                                                     bad);
    else
        k_unembed_quant<<<grid, 256, 0, c->stream>>>((const float *)W->data, W->rows, W->cols, (uint8_t *)u->mem[0],
                                                     (__nv_bfloat16 *)u->mem[1], (__nv_bfloat16 *)u->mem[2], u->cm,
                                                     bad);
    CUDA_LAUNCHED();
    int hbad = 0;
    cuda_copy_wait(c, &hbad, bad, sizeof hbad, cudaMemcpyDeviceToHost);
    if (hbad) {
        cuda_unembed_free(c);
        return 0;
    }
    g3n_mat *q = &u->q8;
    memset(q, 0, sizeof(*q));
    q->dtype = G3N_U32, q->rows = W->rows, q->cols = W->cols, q->data = u->mem[0], q->name = "LM head (8-bit copy)";
    q->bits = 8, q->group_size = UQ_GROUP, q->sdtype = G3N_BF16, q->scales = u->mem[1], q->biases = u->mem[2];
    q->file_bytes = sz[0] + sz[1] + sz[2];
    return q->file_bytes + sz[3];
}

void cuda_op_logits_pruned(g3n_backend *be, float *logits, const g3n_mat *W, const float *h, int rows, int n, int m,
                           float cap) {
    cuda_ctx *c = CTX(be);
    cuda_unembed *u = c->unembed;
    G3N_ASSERT(u && u->W == W->data && rows >= 1 && rows <= G3N_PRUNE_ROWS);
    PROF_BEGIN(c);
    cuda_quant_matmul(c, logits, &u->q8, h, rows);
    launch(c, k_unembed_bound, dim3((unsigned)u->nblk, (unsigned)rows), dim3(UP_THREADS), 0, (const float *)logits,
           h, W->cols, (const float *)u->cm, W->rows, n, u->bmax, u->xn);
    cuda_unembed_exact(c, logits, W, h, rows, u->cm, u->bmax, u->nblk, u->xn, n, m, cap);
    CUDA_LAUNCHED();
    PROF_END(c, "logits_pruned", (double)u->q8.file_bytes);
}
