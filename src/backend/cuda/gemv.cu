/* gemv.cu: y[r] = W . x[r] on the GPU, W in its stored dtype (bf16, f16, f32)
 * and f32 activations; also several products in one launch (matmul_multi).
 *
 * Decode (up to 8 rows): one kernel for one or many products. Each output row
 * is read by `wpr` warps (1-8, more for long rows or few rows so the whole GPU
 * streams); each lane loads 16-byte chunks (8 weights), eight in flight, and up
 * to 8 input rows share each pass, so a step reads every weight once; from 2
 * input rows a warp takes two output rows (k_gemv2, k_gemv2w), so that each
 * input chunk read serves both. Weights
 * are loaded before the kernel waits for the previous one (PDL): the stream of
 * weights starts while the previous kernel finishes. The partial sums of a row's
 * warps are added in a fixed order, so results do not depend on timing.
 * Prompt-sized products (more than 8 rows), and those of 3-8 rows with a matrix
 * of 16 MB or more (batched decode), go to cuBLAS on the tensor cores, with the
 * f32 activations split into 16-bit parts that sum to ~24 bits (one launch
 * splits all the inputs of a matmul_multi, one adds all their parts), except
 * the small bf16 products of 9-32-row steps: k_bmma (below). */
#include "cuda_common.cuh"

#define MULTI_MAX 8

typedef struct {
    const void *W[MULTI_MAX];
    float *y[MULTI_MAX];
    const float *x[MULTI_MAX];
    int O[MULTI_MAX], K[MULTI_MAX];
    int row0[MULTI_MAX + 1]; /* first global row of each product */
    int pair0[MULTI_MAX + 1]; /* k_gemv2: first row pair of each product */
    int tile0[MULTI_MAX + 1]; /* k_bmma: first 16-row tile of each product */
    int R;                    /* k_bmma: activation rows */
    int n;
    int wpr;  /* warps per output row: 1, 2, 4 or 8 */
    int mode; /* GEMV_PLAIN, GEMV_GELU_MUL (y = gelu(W.x) * m), GEMV_GATE_UP (two
                 products of equal shape, y = gelu(first) * second, into y[0]) */
    const float *m;
} multi_args;

enum { GEMV_PLAIN = 0, GEMV_GELU_MUL = 1, GEMV_GATE_UP = 2 };

/* a chunk's 8 products, added in order (the chunk's contribution to a row's sum) */
__device__ __forceinline__ float dot8(const float w[8], const float4 a, const float4 b) {
    return w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * b.x + w[5] * b.y + w[6] * b.z + w[7] * b.w;
}

/* chunk c of R input rows (8 floats each, from L1) against one chunk of weights
 * (fma8) or two rows' chunks at the same inputs (fma8x2) */
template <int R>
__device__ __forceinline__ void fma8(float acc[R], const float wf[8], const float *x, int K, int c) {
#pragma unroll
    for (int r = 0; r < R; r++) {
        const float4 *xp = (const float4 *)(x + (size_t)r * K + (size_t)c * 8);
        const float4 a = __ldg(xp), b = __ldg(xp + 1);
        acc[r] += dot8(wf, a, b);
    }
}
template <int R>
__device__ __forceinline__ void fma8x2(float acc0[R], float acc1[R], const float w0[8], const float w1[8],
                                       const float *x, int K, int c) {
#pragma unroll
    for (int r = 0; r < R; r++) {
        const float4 *xp = (const float4 *)(x + (size_t)r * K + (size_t)c * 8);
        const float4 a = __ldg(xp), b = __ldg(xp + 1);
        acc0[r] += dot8(w0, a, b);
        acc1[r] += dot8(w1, a, b);
    }
}

/* K % 8 == 0 for every product. Block = 8 warps = 8 / wpr output rows. */
template <typename T, int R>
__global__ void __launch_bounds__(256) k_gemv(multi_args a) {
    __shared__ float part[8][R];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wpr = a.wpr;
    int grow = blockIdx.x * (8 / wpr) + warp / wpr;
    const int sub = warp % wpr;
    const int total = a.row0[a.n];
    if (a.mode == GEMV_GATE_UP) /* wpr 1: warps 0-3 gate rows i..i+3, warps 4-7 the same up rows */
        grow = (warp < 4 ? 0 : a.row0[1]) + blockIdx.x * 4 + (warp & 3);
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0;
    int s = 0, row = 0, K = 0;
    if (grow < total) {
        while (grow >= a.row0[s + 1]) s++;
        row = grow - a.row0[s];
        K = a.K[s];
    }
    const T *w = (const T *)a.W[s] + (size_t)row * K;
    const float *x = a.x[s];
    const int nc = K / 8, step = 32 * wpr;
    int c = sub * 32 + lane;
    /* UNROLL chunks in flight per lane; the first batch of weights does not
     * depend on the previous kernel, so it is loaded before the PDL wait */
    constexpr int U = 8;
    raw8<T> q[U];
#pragma unroll
    for (int u = 0; u < U; u++)
        if (c + u * step < nc) ldraw(q[u], w + (size_t)(c + u * step) * 8);
    KERNEL_BEGIN();
    for (;;) {
#pragma unroll
        for (int u = 0; u < U; u++)
            if (c + u * step < nc) {
                float f[8];
                cvt8(q[u], f);
                fma8<R>(acc, f, x, K, c + u * step);
            }
        c += U * step;
        if (c >= nc) break;
#pragma unroll
        for (int u = 0; u < U; u++)
            if (c + u * step < nc) ldraw(q[u], w + (size_t)(c + u * step) * 8);
    }
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = warp_sum(acc[r]);
    if (a.mode == GEMV_GATE_UP) {
        if (lane == 0)
#pragma unroll
            for (int r = 0; r < R; r++) part[warp][r] = acc[r];
        __syncthreads();
        if (warp < 4 && lane < R && grow < a.row0[1])
            a.y[0][(size_t)lane * a.O[0] + row] = gelu_tanh_d(part[warp][lane]) * part[warp + 4][lane];
        return;
    }
    if (wpr == 1) {
        if (lane == 0 && grow < total)
#pragma unroll
            for (int r = 0; r < R; r++) {
                const size_t o = (size_t)r * a.O[s] + row;
                a.y[s][o] = a.mode == GEMV_GELU_MUL ? gelu_tanh_d(acc[r]) * a.m[o] : acc[r];
            }
        return;
    }
    if (lane == 0)
#pragma unroll
        for (int r = 0; r < R; r++) part[warp][r] = acc[r];
    __syncthreads();
    if (sub == 0 && lane < R && grow < total) {
        float v = 0;
        for (int k = 0; k < wpr; k++) v += part[warp + k][lane];
        const size_t o = (size_t)lane * a.O[s] + row;
        a.y[s][o] = a.mode == GEMV_GELU_MUL ? gelu_tanh_d(v) * a.m[o] : v;
    }
}

/* k_gemv's one-warp-a-row shape (wpr 1) for R >= c->gemv2_rows (2) input rows
 * of 16-bit weights, two output rows a warp: each lane loads both rows' chunks,
 * and each chunk of the inputs it reads (R rows of 8 floats, from L1) serves
 * both. With one row a warp every 16 bytes of weights took 16 R bytes of inputs
 * through L1, which bounded k_gemv<bf16, 8> at ~1.8 TB/s of weights (the q/k/v
 * and o products of a batched step of 8: 15-16 µs at E4B; docs/SPEED.md,
 * twenty-eighth session), and k_gemv<bf16, 2>'s gate/up at 2.8 TB/s on the
 * H200 (47.7 µs a layer at E4B; here 35-36: thirty-first session).
 * A row's sum takes k_gemv's steps (its chunks in order, then the warp's sum);
 * that it gives a one-row step's bits is not established (a bitwise test of
 * batched rows against rows alone failed a case on the H100 that was not
 * identified; docs/SPEED.md, twenty-eighth session). Block = 8 warps = 8 pairs
 * of rows; a pair never straddles two products (test_ops matmul_multi_rows).
 * GEMV_GATE_UP: the pair is gate row i and up row i (y = gelu(gate) * up). */
template <typename T, int R>
__global__ void __launch_bounds__(256, 2) k_gemv2(multi_args a) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int pair = blockIdx.x * 8 + warp;
    const bool gu = a.mode == GEMV_GATE_UP;
    if (pair >= a.pair0[gu ? 1 : a.n]) { KERNEL_BEGIN(); return; }
    int s = 0;
    while (!gu && pair >= a.pair0[s + 1]) s++;
    const int row = gu ? pair : 2 * (pair - a.pair0[s]), K = a.K[s], O = a.O[s], two = !gu && row + 1 < O;
    const T *w0 = (const T *)a.W[s] + (size_t)row * K;
    const T *w1 = gu ? (const T *)a.W[1] + (size_t)row * K : w0 + (two ? K : 0);
    const float *x = a.x[s];
    const int nc = K / 8;
    constexpr int U = 8; /* K <= 2048 (gemv_launch): one batch of chunks a lane */
    raw8<T> q0[U], q1[U];
#pragma unroll
    for (int u = 0; u < U; u++)
        if (lane + u * 32 < nc) {
            ldraw(q0[u], w0 + (size_t)(lane + u * 32) * 8);
            ldraw(q1[u], w1 + (size_t)(lane + u * 32) * 8);
        }
    KERNEL_BEGIN();
    float acc0[R], acc1[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc0[r] = acc1[r] = 0;
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int c = lane + u * 32;
        if (c < nc) {
            float f0[8], f1[8];
            cvt8(q0[u], f0), cvt8(q1[u], f1);
            fma8x2<R>(acc0, acc1, f0, f1, x, K, c);
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) acc0[r] = warp_sum(acc0[r]), acc1[r] = warp_sum(acc1[r]);
    if (lane < R) { /* lane r stores activation row r (a constant index per unrolled step) */
#pragma unroll
        for (int r = 0; r < R; r++)
            if (lane == r) {
                const size_t o = (size_t)r * O + row;
                if (gu) {
                    a.y[0][o] = gelu_tanh_d(acc0[r]) * acc1[r];
                    continue;
                }
                a.y[s][o] = a.mode == GEMV_GELU_MUL ? gelu_tanh_d(acc0[r]) * a.m[o] : acc0[r];
                if (two) a.y[s][o + 1] = a.mode == GEMV_GELU_MUL ? gelu_tanh_d(acc1[r]) * a.m[o + 1] : acc1[r];
            }
    }
}

/* k_gemv's shape for long rows (wpr 2-8 warps a row) with two output rows a
 * warp, for 2-8 input rows of 16-bit weights: a pair of rows is read by wpr
 * warps, each lane loading both rows' chunks, so each chunk of the inputs it
 * reads serves both (the down product of a batched step of 2: E4B's 16384-wide
 * rows on k_gemv<bf16, 2> ran at 2.4 TB/s on the H200, here 3.2: thirty-first
 * session). Each row's sum takes k_gemv's steps in k_gemv's order (a lane's
 * chunks in batches of U, the warp's sum, then the row's warps in order; not
 * compared bit for bit: test_ops checks both against the reference). Block = 8
 * warps = 8 / wpr pairs; a pair never straddles two products. */
template <typename T, int R>
__global__ void __launch_bounds__(256) k_gemv2w(multi_args a) {
    __shared__ float part[8][2][R];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wpr = a.wpr, sub = warp % wpr;
    const int pair = blockIdx.x * (8 / wpr) + warp / wpr;
    const bool valid = pair < a.pair0[a.n];
    int s = 0, row = 0, K = 0, two = 0;
    if (valid) {
        while (pair >= a.pair0[s + 1]) s++;
        row = 2 * (pair - a.pair0[s]), K = a.K[s], two = row + 1 < a.O[s];
    }
    const T *w0 = (const T *)a.W[s] + (size_t)row * K, *w1 = w0 + (two ? K : 0);
    const float *x = a.x[s];
    const int nc = K / 8, step = 32 * wpr;
    int c = sub * 32 + lane;
    constexpr int U = 8;
    raw8<T> q0[U], q1[U];
#pragma unroll
    for (int u = 0; u < U; u++)
        if (c + u * step < nc) ldraw(q0[u], w0 + (size_t)(c + u * step) * 8), ldraw(q1[u], w1 + (size_t)(c + u * step) * 8);
    KERNEL_BEGIN();
    float acc0[R], acc1[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc0[r] = acc1[r] = 0;
    for (;;) {
#pragma unroll
        for (int u = 0; u < U; u++)
            if (c + u * step < nc) {
                float f0[8], f1[8];
                cvt8(q0[u], f0), cvt8(q1[u], f1);
                fma8x2<R>(acc0, acc1, f0, f1, x, K, c + u * step);
            }
        c += U * step;
        if (c >= nc) break;
#pragma unroll
        for (int u = 0; u < U; u++)
            if (c + u * step < nc)
                ldraw(q0[u], w0 + (size_t)(c + u * step) * 8), ldraw(q1[u], w1 + (size_t)(c + u * step) * 8);
    }
#pragma unroll
    for (int r = 0; r < R; r++) acc0[r] = warp_sum(acc0[r]), acc1[r] = warp_sum(acc1[r]);
    if (lane == 0)
#pragma unroll
        for (int r = 0; r < R; r++) part[warp][0][r] = acc0[r], part[warp][1][r] = acc1[r];
    __syncthreads();
    if (sub == 0 && lane < 2 * R && valid) { /* lane 2r + h: row + h of activation row r */
        const int r = lane >> 1, h = lane & 1;
        if (h && !two) return;
        float v = 0;
        for (int k = 0; k < wpr; k++) v += part[warp + k][h][r];
        const size_t o = (size_t)r * a.O[s] + row + h;
        a.y[s][o] = a.mode == GEMV_GELU_MUL ? gelu_tanh_d(v) * a.m[o] : v;
    }
}

/* ---- the best logits: the exact rows of a pruned unembedding (unembed.cu) --------------
 *
 * W . x for one row, as k_gemv computes it with one warp a row and one input row
 * (wpr 1, R 1: the tied lm_head's shape): the lane's chunks c, c + 32, ... in
 * batches of 8, each chunk's 8 products added in order and then to the sum,
 * then the warp's sum. The same operations in the same order, so the same bits
 * (test_ops unembed_pruned checks them against matmul). */
template <typename T> __device__ __forceinline__ float gemv_dot1(const T *w, const float *x, int K) {
    const int lane = threadIdx.x & 31, nc = K / 8;
    constexpr int U = 8;
    float acc[1] = {0.f};
    for (int c = lane; c < nc; c += U * 32) {
        raw8<T> q[U];
#pragma unroll
        for (int u = 0; u < U; u++)
            if (c + u * 32 < nc) ldraw(q[u], w + (size_t)(c + u * 32) * 8);
#pragma unroll
        for (int u = 0; u < U; u++)
            if (c + u * 32 < nc) {
                float f[8];
                cvt8(q[u], f);
                fma8<1>(acc, f, x, K, c + u * 32);
            }
    }
    return warp_sum(acc[0]);
}

/* Block b's UP_ROWS rows of the logits (UP_ROWS / UP_THREADS a thread): each
 * whose upper bound (its approximate logit, in logits, plus cm[v] |x|) reaches
 * t less a slack is a candidate and gets its exact softcapped logit; the others
 * -inf. Rows at or past n are not candidates. t is the m-th largest of the
 * blocks' largest lower bounds bmax[0..nblk) (k_unembed_bound): m rows (each
 * the largest of its block) have exact logits at or above it, so it is at most
 * the m-th largest exact logit (-inf where m > nblk). |x| is *xn. Row
 * blockIdx.y of x, logits, bmax and xn. */
template <typename T>
__global__ void __launch_bounds__(UP_THREADS)
    k_unembed_exact(float *logits, const T *W, const float *x, int K, const float *cm, const float *bmax, int nblk,
                    const float *xn, int rows, int n, int m, float cap) {
    constexpr int PT = UP_ROWS / UP_THREADS;
    __shared__ float bm[UP_THREADS], tsel;
    __shared__ int list[UP_ROWS], nl;
    const int v0 = blockIdx.x * UP_ROWS + threadIdx.x;
    logits += (size_t)blockIdx.y * rows, x += (size_t)blockIdx.y * K, bmax += (size_t)blockIdx.y * nblk;
    xn += blockIdx.y;
    float mg[PT]; /* the rows' bounds per unit of |x| (weights: before the wait) */
#pragma unroll
    for (int k = 0; k < PT; k++) mg[k] = v0 + k * UP_THREADS < rows ? cm[v0 + k * UP_THREADS] : 0.f;
    if (threadIdx.x == 0) nl = 0, tsel = -INFINITY;
    KERNEL_BEGIN();
    const bool sel = m <= nblk && nblk <= UP_THREADS;
    if (sel && threadIdx.x < nblk) bm[threadIdx.x] = bmax[threadIdx.x];
    __syncthreads();
    if (sel && threadIdx.x < nblk) { /* the m-th largest: fewer than m above it, m or more at or above */
        const float v = bm[threadIdx.x];
        int above = 0, same = 0;
        for (int j = 0; j < nblk; j++) above += bm[j] > v, same += bm[j] == v;
        if (above < m && above + same >= m) tsel = v; /* (ties write the same value) */
    }
    __syncthreads();
    float t = tsel;
    t -= fabsf(t) * 0x1p-10f; /* (the slack: roundings of the bounds and of ties) */
    const float hn = *xn;
#pragma unroll
    for (int k = 0; k < PT; k++) {
        const int v = v0 + k * UP_THREADS;
        if (v >= rows) break;
        const float a = logits[v];
        if (v < n && a + mg[k] * hn >= t) list[atomicAdd(&nl, 1)] = v;
        else logits[v] = -INFINITY;
    }
    __syncthreads();
    for (int i = threadIdx.x >> 5; i < nl; i += UP_THREADS / 32) {
        const int r = list[i];
        const float d = gemv_dot1<T>(W + (size_t)r * K, x, K);
        if ((threadIdx.x & 31) == 0) logits[r] = cap > 0 ? cap * tanhf(d / cap) : d;
    }
}

void cuda_unembed_exact(cuda_ctx *c, float *logits, const g3n_mat *W, const float *x, int xrows, const float *cm,
                        const float *bmax, int nblk, const float *xn, int n, int m, float cap) {
    const dim3 grid((unsigned)((W->rows + UP_ROWS - 1) / UP_ROWS), (unsigned)xrows), block(UP_THREADS);
    if (W->dtype == G3N_BF16)
        launch(c, k_unembed_exact<__nv_bfloat16>, grid, block, 0, logits, (const __nv_bfloat16 *)W->data, x,
               W->cols, cm, bmax, nblk, xn, W->rows, n, m, cap);
    else if (W->dtype == G3N_F16)
        launch(c, k_unembed_exact<__half>, grid, block, 0, logits, (const __half *)W->data, x, W->cols, cm,
               bmax, nblk, xn, W->rows, n, m, cap);
    else
        launch(c, k_unembed_exact<float>, grid, block, 0, logits, (const float *)W->data, x, W->cols, cm,
               bmax, nblk, xn, W->rows, n, m, cap);
}

/* ---- 9-32 rows of small bf16 products on the tensor cores (k_bmma) ------------------- *
 * On cuBLAS a product of a batched step takes three launches: one splitting the
 * input into bf16 parts, the product, one adding the parts' products; for the
 * small ones (q/k/v, o, LAuReL, the per-layer gate and projection: 0.25-8 MB)
 * they cost more than the bytes. k_bmma does one such product (or several, as
 * matmul_multi) in one launch, with PDL: a block is one tile of 16 output rows
 * and 16 activation rows (blockIdx.y: rows 16y..16y+15, so 17-32 rows read the
 * weights twice, the second time mostly from the L2), its 8 warps each take every eighth chunk of 32 inputs
 * (K <= 2048: at most 8 a warp, all loaded before the PDL wait). The
 * activations are split in registers into the same three bf16 parts as
 * k_split (exact: their sum is x), which are the B columns of mma.m16n8k16 (6
 * n8 tiles: part p of activation rows 0-7 and 8-15); a bf16 weight times a bf16
 * part is exact in f32, summed in f32. Within a chunk a lane's 16-byte load of
 * a row (8 inputs, 8t..8t+7) is its A fragment for two k16 steps: step s takes
 * inputs 8t+4s+{0,1} as the fragment's k 2t,2t+1 and 8t+4s+{2,3} as 2t+8,2t+9,
 * and the B fragments take the activations in the same order (a dot product
 * does not depend on the order its terms are named in). Each lane adds its
 * parts (0 + 1) + 2, the warps' sums are added in warp order through shared
 * memory: deterministic, the same whatever the rows. */
__device__ __forceinline__ void mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* v's three bf16 parts (exact: their sum is v), as 16-bit patterns: k_bmma's B fragments and split_at's parts */
__device__ __forceinline__ void split3(float v, uint32_t (&p)[3]) {
    const __nv_bfloat16 a = __float2bfloat16_rn(v);
    const float r = v - __bfloat162float(a);
    const __nv_bfloat16 b = __float2bfloat16_rn(r);
    p[0] = __bfloat16_as_ushort(a), p[1] = __bfloat16_as_ushort(b);
    p[2] = __bfloat16_as_ushort(__float2bfloat16_rn(r - __bfloat162float(b)));
}

/* the B fragments (b0, b1) of parts 0-2 of four consecutive inputs e */
__device__ __forceinline__ void bparts(float4 e, uint32_t (&b0)[2], uint32_t (&b1)[2], uint32_t (&b2)[2]) {
    uint32_t q0[3], q1[3], q2[3], q3[3];
    split3(e.x, q0), split3(e.y, q1), split3(e.z, q2), split3(e.w, q3);
    b0[0] = q0[0] | q1[0] << 16, b0[1] = q2[0] | q3[0] << 16;
    b1[0] = q0[1] | q1[1] << 16, b1[1] = q2[1] | q3[1] << 16;
    b2[0] = q0[2] | q1[2] << 16, b2[1] = q2[2] | q3[2] << 16;
}

#define BMMA_CH 8 /* chunks of 32 inputs a warp, at most: K <= 2048 */
__global__ void __launch_bounds__(256, 2) k_bmma(multi_args a) {
    __shared__ float red[8][16][17];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int s = 0;
    while ((int)blockIdx.x >= a.tile0[s + 1]) s++;
    /* blockIdx.y: activation rows 16y..16y+15 */
    const int o0 = ((int)blockIdx.x - a.tile0[s]) * 16, O = a.O[s], K = a.K[s], nch = K / 32;
    const int R = min(16, a.R - 16 * (int)blockIdx.y);
    const __nv_bfloat16 *W = (const __nv_bfloat16 *)a.W[s];
    const __nv_bfloat16 *w0 = W + (size_t)min(o0 + g, O - 1) * K + 8 * t;
    const __nv_bfloat16 *w1 = W + (size_t)min(o0 + g + 8, O - 1) * K + 8 * t;
    uint4 qa[BMMA_CH], qb[BMMA_CH];
#pragma unroll
    for (int u = 0; u < BMMA_CH; u++) {
        const int ch = warp + 8 * u;
        if (ch < nch) qa[u] = __ldcs((const uint4 *)(w0 + ch * 32)), qb[u] = __ldcs((const uint4 *)(w1 + ch * 32));
    }
    KERNEL_BEGIN();
    float acc[6][4];
#pragma unroll
    for (int j = 0; j < 6; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0;
    const float *xb = a.x[s] + (size_t)16 * blockIdx.y * K;
    const float *x0 = xb + (size_t)g * K + 8 * t, *x1 = xb + (size_t)(g + 8) * K + 8 * t;
    const bool v0 = g < R, v1 = g + 8 < R;
    const float4 zero = make_float4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < BMMA_CH; u++) {
        const int ch = warp + 8 * u;
        if (ch < nch) {
            const uint32_t A0[4] = {qa[u].x, qa[u].y, qa[u].z, qa[u].w}, A1[4] = {qb[u].x, qb[u].y, qb[u].z, qb[u].w};
#pragma unroll
            for (int st = 0; st < 2; st++) {
                const float4 e0 = v0 ? __ldg((const float4 *)(x0 + ch * 32 + 4 * st)) : zero;
                const float4 e1 = v1 ? __ldg((const float4 *)(x1 + ch * 32 + 4 * st)) : zero;
                uint32_t b[6][2]; /* n8 tile 2p + h: part p of activation rows 8h..8h+7 */
                bparts(e0, b[0], b[2], b[4]);
                bparts(e1, b[1], b[3], b[5]);
#pragma unroll
                for (int j = 0; j < 6; j++) mma_bf16(acc[j], A0[2 * st], A1[2 * st], A0[2 * st + 1], A1[2 * st + 1], b[j][0], b[j][1]);
            }
        }
    }
#pragma unroll
    for (int h = 0; h < 2; h++) { /* C: rows g, g + 8; columns 2t, 2t + 1 = activation rows 8h + 2t, + 1 */
        const int r = 8 * h + 2 * t;
        red[warp][g][r] = (acc[h][0] + acc[2 + h][0]) + acc[4 + h][0];
        red[warp][g][r + 1] = (acc[h][1] + acc[2 + h][1]) + acc[4 + h][1];
        red[warp][g + 8][r] = (acc[h][2] + acc[2 + h][2]) + acc[4 + h][2];
        red[warp][g + 8][r + 1] = (acc[h][3] + acc[2 + h][3]) + acc[4 + h][3];
    }
    __syncthreads();
    const int r = threadIdx.x >> 4, oo = threadIdx.x & 15, o = o0 + oo;
    if (r < R && o < O) {
        float v = 0;
#pragma unroll
        for (int w = 0; w < 8; w++) v += red[w][oo][r];
        const size_t i = (size_t)(16 * blockIdx.y + r) * O + o;
        a.y[s][i] = a.mode == GEMV_GELU_MUL ? gelu_tanh_d(v) * a.m[i] : v;
    }
}

/* Whether k_bmma takes W with `rows` activation rows (G3N_BMMA_MB: the largest
 * matrix it takes, 0: none; G3N_BMMA_ROWS=lo,hi: the rows). */
static int use_bmma(const cuda_ctx *c, const g3n_mat *W, int rows) {
    return rows >= c->bmma_lo && rows <= c->bmma_hi && W->dtype == G3N_BF16 && !W->bits && !W->transposed &&
           W->cols % 32 == 0 && W->cols <= 32 * 8 * BMMA_CH && (size_t)W->rows * W->cols * 2 <= c->bmma_bytes;
}

static void bmma_run(cuda_ctx *c, int n, const g3n_mat *const *W, float *const *y, const float *const *x, int rows,
                     int mode, const float *m) {
    multi_args a;
    memset(&a, 0, sizeof a);
    a.n = n, a.mode = mode, a.m = m, a.R = rows;
    for (int i = 0; i < n; i++) {
        a.W[i] = W[i]->data, a.y[i] = y[i], a.x[i] = x[i], a.O[i] = W[i]->rows, a.K[i] = W[i]->cols;
        a.tile0[i + 1] = a.tile0[i] + (W[i]->rows + 15) / 16;
    }
    const dim3 grid((unsigned)a.tile0[n], (unsigned)((rows + 15) / 16));
    launch(c, k_bmma, grid, 256, 0, a);
}


/* any K: one warp per output row, one weight per lane step */
__global__ void k_gemv_scalar(float *y, const void *W, int dtype, const float *x, int O, int K, int rows) {
    KERNEL_BEGIN();
    const int row = (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (row >= O) return;
    for (int r = 0; r < rows; r++) {
        float acc = 0;
        for (int i = lane; i < K; i += 32) acc += load_w(W, dtype, (size_t)row * K + i) * x[(size_t)r * K + i];
        acc = warp_sum(acc);
        if (lane == 0) y[(size_t)r * O + row] = acc;
    }
}

template <typename T>
static void gemv_launch(cuda_ctx *c, multi_args &a, int R) {
    if constexpr (sizeof(T) == 2) { /* 16-bit weights: two output rows a warp from 2 input rows */
        int kmax = 0;
        for (int i = 0; i < a.n; i++) kmax = G3N_MAX(kmax, a.K[i]);
        const bool gu = a.mode == GEMV_GATE_UP;
        const bool one = R >= c->gemv2_rows && a.wpr == 1 && kmax <= 2048; /* k_gemv2: a warp a pair */
        const bool wide = R >= c->gemv2w_rows && a.wpr > 1 && !gu;        /* k_gemv2w: wpr warps a pair */
        if (one || wide) {
            if (gu) a.pair0[1] = a.O[0]; /* a pair: gate row i, up row i */
            else
                for (int i = 0; i < a.n; i++) a.pair0[i + 1] = a.pair0[i] + (a.O[i] + 1) / 2;
            const int ppb = 8 / a.wpr; /* pairs a block */
            const dim3 grid((unsigned)((a.pair0[gu ? 1 : a.n] + ppb - 1) / ppb));
#define L(r)                                                                                                   \
    do {                                                                                                       \
        if (one) launch(c, k_gemv2<T, r>, grid, 256, 0, a);                                                    \
        else launch(c, k_gemv2w<T, r>, grid, 256, 0, a);                                                       \
    } while (0)
            if (R == 2) L(2);
            else if (R == 3) L(3);
            else if (R == 4) L(4);
            else if (R == 5) L(5);
            else if (R == 6) L(6);
            else if (R == 7) L(7);
            else L(8);
#undef L
            return;
        }
    }
    const int rows_per_block = 8 / a.wpr;
    const dim3 grid(a.mode == GEMV_GATE_UP ? (unsigned)((a.O[0] + 3) / 4)
                                           : (unsigned)((a.row0[a.n] + rows_per_block - 1) / rows_per_block));
    static const int debug = getenv("G3N_QDEBUG") != NULL; /* print each launch's shape */
    if (debug)
        fprintf(stderr, "gemv O%d K%d n%d rows %d: wpr %d blocks %u\n", a.O[0], a.K[0], a.n, R, a.wpr, grid.x);
#define L(r) launch(c, k_gemv<T, r>, grid, 256, 0, a)
    ROWS_SWITCH(R, L)
#undef L
}

/* Warps per row: enough that each lane loads at most 8 chunks, one batch, all
 * in flight before the PDL wait (measured best on the H100: 8 warps for the
 * 16384-wide down rows, 1 for 2048-wide rows: 5% faster E4B decode than 4 and
 * 2); products of few rows take more warps so the GPU still fills. */
static int pick_wpr(int total_rows, int min_k) {
    int wpr = 1;
    while (wpr < 8 && min_k / 8 > 256 * wpr) wpr *= 2;
    while (wpr < 8 && total_rows < 1024 && (size_t)total_rows * wpr < 8192 && min_k / 8 / (wpr * 2) >= 64) wpr *= 2;
    return wpr;
}

/* ---- prompt-sized and batched products: cuBLAS --------------------------------------- */

/* x (f32) -> parts in the weights' 16-bit type whose sum is x to ~24 bits:
 * three bf16 parts (8 bits each) or two f16 parts (11 bits each). The products
 * W.part, summed in f32 on the tensor cores, match the f32 product to float
 * rounding (products of a bf16 weight and a bf16 part are exact in f32).
 * Layout [rows][parts][K]: a row's parts side by side, so the parts of a run of
 * rows are one K x parts*rows column-major matrix, and one product reads W once
 * for all of them (three products, one per part, read it three times: what
 * batched decode steps of 4-32 rows paid before). Element i of x [rows, K]: */
__device__ __forceinline__ void split_at(__nv_bfloat16 *out, const float *x, size_t i, int K) {
    uint32_t p[3];
    split3(x[i], p);
    __nv_bfloat16 *o = out + (i / K) * 3 * K + i % K;
    o[0] = __ushort_as_bfloat16((unsigned short)p[0]);
    o[K] = __ushort_as_bfloat16((unsigned short)p[1]);
    o[2 * (size_t)K] = __ushort_as_bfloat16((unsigned short)p[2]);
}
/* f16: the low part is scaled by 2^11 so it does not underflow into f16's
 * subnormals; its product is scaled back by 2^-11 when the parts are added. */
#define F16_LO_SCALE 2048.0f
__device__ __forceinline__ void split_at(__half *out, const float *x, size_t i, int K) {
    const __half h = __float2half_rn(x[i]);
    __half *o = out + (i / K) * 2 * K + i % K;
    o[0] = h;
    o[K] = __float2half_rn((x[i] - __half2float(h)) * F16_LO_SCALE);
}

/* The inputs of one launch of k_split: input j (x[j], rows x K[j]) is elements
 * e0[j] .. e0[j+1] of the launch and its parts go to out + off[j]. */
typedef struct {
    const float *x[MULTI_MAX];
    size_t off[MULTI_MAX];
    size_t e0[MULTI_MAX + 1];
    int K[MULTI_MAX];
    int n;
} split_args;

template <typename T> __global__ void k_split(T *out, split_args a) {
    KERNEL_BEGIN();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < a.e0[a.n]; i += (size_t)gridDim.x * blockDim.x) {
        int j = 0;
        while (i >= a.e0[j + 1]) j++;
        split_at(out + a.off[j], a.x[j], i - a.e0[j], a.K[j]);
    }
}

/* The parts' products of one launch of k_sum: product s's are [rows][parts][O[s]]
 * at ys + yoff[s], its outputs elements e0[s] .. e0[s+1] of the launch, added in
 * part order (part 1 of two scaled back by lo) into y[s], or with mode's
 * epilogue (GEMV_GELU_MUL: y[0] = gelu(sum) * m; GEMV_GATE_UP: two products of
 * one shape, y[0] = gelu(first) * second). */
typedef struct {
    float *y[MULTI_MAX];
    const float *m;
    size_t yoff[MULTI_MAX];
    size_t e0[MULTI_MAX + 1];
    int O[MULTI_MAX];
    int n, parts, mode;
    float lo;
} sum_args;

__device__ __forceinline__ float parts_sum(const float *p, int O, int parts, float lo) {
    return parts == 3 ? (p[0] + p[O]) + p[2 * (size_t)O] : p[0] + p[O] * lo;
}

__global__ void k_sum(const float *ys, sum_args a) {
    KERNEL_BEGIN();
    const bool gu = a.mode == GEMV_GATE_UP;
    const size_t n = a.e0[gu ? 1 : a.n];
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        int s = 0;
        while (i >= a.e0[s + 1]) s++;
        const size_t e = i - a.e0[s];
        const int O = a.O[s];
        const size_t at = e / O * a.parts * O + e % O;
        const float v = parts_sum(ys + a.yoff[s] + at, O, a.parts, a.lo);
        if (gu) a.y[0][e] = gelu_tanh_d(v) * parts_sum(ys + a.yoff[1] + at, O, a.parts, a.lo);
        else a.y[s][e] = a.mode == GEMV_GELU_MUL ? gelu_tanh_d(v) * a.m[e] : v;
    }
}


static dim3 elem_grid(size_t n) { return dim3((unsigned)G3N_MIN((n + 255) / 256, (size_t)4096)); }

/* One launch splitting the inputs of sa into c->xconv (16-bit type of dtype). */
static void split_launch(cuda_ctx *c, int dtype, const split_args &sa) {
    if (dtype == G3N_BF16) launch(c, k_split<__nv_bfloat16>, elem_grid(sa.e0[sa.n]), 256, 0, (__nv_bfloat16 *)c->xconv, sa);
    else launch(c, k_split<__half>, elem_grid(sa.e0[sa.n]), 256, 0, (__half *)c->xconv, sa);
}

/* x [rows, K] split into three bf16 parts in c->xconv ([rows][3][K]);
 * NULL when the buffer is not sized for it (no prompt-sized step yet). */
const __nv_bfloat16 *cuda_split_bf16(cuda_ctx *c, const float *x, int rows, int K) {
    const size_t n = (size_t)rows * K;
    if (!c->xconv || 3 * n * 2 > c->xconv_bytes) return NULL;
    split_args sa;
    memset(&sa, 0, sizeof sa);
    sa.x[0] = x, sa.K[0] = K, sa.e0[1] = n, sa.n = 1;
    split_launch(c, G3N_BF16, sa);
    return (const __nv_bfloat16 *)c->xconv;
}

/* ys [O, ncols] (column-major) = W . xp, xp the K x ncols column-major parts in
 * W's 16-bit type (a transposed matrix, W^T [K, O] row-major = W in
 * column-major, needs no transpose op). */
static void blas_gemm(cuda_ctx *c, const g3n_mat *W, const void *xp, int ncols, float *ys) {
    const int O = W->rows, K = W->cols;
    const float one = 1.0f, zero = 0.0f;
    const cudaDataType_t t = W->dtype == G3N_BF16 ? CUDA_R_16BF : CUDA_R_16F;
    BLAS_CHECK(cublasGemmEx(c->blas, W->transposed ? CUBLAS_OP_N : CUBLAS_OP_T, CUBLAS_OP_N, O, ncols, K, &one,
                            W->data, t, W->transposed ? O : K, xp, t, K, &zero, ys, CUDA_R_32F, O,
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

/* A batched step's products of one 16-bit dtype on cuBLAS, set up by blas_plan:
 * one launch splits every distinct input (an input several products take, as
 * q/k/v's, is split once), one product each, and one launch adds all their
 * parts with the epilogue. Against one split, product and sum each: 6 fewer
 * launches in q/k/v/LAuReL, 2-3 fewer in each gate/up. */
typedef struct {
    split_args sa;
    sum_args su;
    size_t xo[MULTI_MAX]; /* product i's input parts: c->xconv + xo[i] 16-bit elements */
} blas_plan_t;

/* Whether the n products fit the scratch at once (all 16-bit, one dtype); fills p. */
static int blas_plan(const cuda_ctx *c, int n, const g3n_mat *const *W, float *const *y, const float *const *x,
                     int rows, int mode, const float *m, blas_plan_t *p) {
    memset(p, 0, sizeof *p);
    if (n < 1 || n > MULTI_MAX || !c->xconv || !c->ysplit) return 0;
    const int parts = W[0]->dtype == G3N_BF16 ? 3 : 2;
    size_t xn = 0, yn = 0;
    for (int i = 0; i < n; i++) {
        const int O = W[i]->rows, K = W[i]->cols;
        if (W[i]->bits || W[i]->dtype != W[0]->dtype || (W[i]->dtype != G3N_BF16 && W[i]->dtype != G3N_F16)) return 0;
        split_args &sa = p->sa;
        int j = 0;
        while (j < sa.n && !(sa.x[j] == x[i] && sa.K[j] == K)) j++;
        if (j == sa.n) {
            sa.x[j] = x[i], sa.K[j] = K, sa.off[j] = xn, sa.e0[j + 1] = sa.e0[j] + (size_t)rows * K, sa.n++;
            xn += (size_t)parts * rows * K;
        }
        p->xo[i] = sa.off[j];
        sum_args &su = p->su;
        su.y[i] = y[i], su.O[i] = O, su.yoff[i] = yn, su.e0[i + 1] = su.e0[i] + (size_t)rows * O;
        yn += (size_t)parts * rows * O;
    }
    p->su.n = n, p->su.parts = parts, p->su.mode = mode, p->su.m = m, p->su.lo = 1.0f / F16_LO_SCALE;
    return 2 * xn <= c->xconv_bytes && yn <= c->ysplit_n;
}

static void blas_run(cuda_ctx *c, const g3n_mat *const *W, int rows, const blas_plan_t *p) {
    split_launch(c, W[0]->dtype, p->sa);
    for (int i = 0; i < p->su.n; i++)
        blas_gemm(c, W[i], (const uint16_t *)c->xconv + p->xo[i], p->su.parts * rows, c->ysplit + p->su.yoff[i]);
    const sum_args &su = p->su;
    launch(c, k_sum, elem_grid(su.e0[su.mode == GEMV_GATE_UP ? 1 : su.n]), 256, 0, (const float *)c->ysplit, su);
}

/* y[rows, O] = x[rows, K] . W^T with cuBLAS (column-major: y^T = W^T' x^T). */
static void matmul_blas(cuda_ctx *c, float *y, const g3n_mat *W, const float *x, int rows) {
    const int O = W->rows, K = W->cols;
    if (W->dtype == G3N_F32) {
        const float one = 1.0f, zero = 0.0f;
        BLAS_CHECK(cublasGemmEx(c->blas, W->transposed ? CUBLAS_OP_N : CUBLAS_OP_T, CUBLAS_OP_N, O, rows, K, &one,
                                W->data, CUDA_R_32F, W->transposed ? O : K, x, CUDA_R_32F, K, &zero, y, CUDA_R_32F, O,
                                CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        return;
    }
    blas_plan_t p;
    if (blas_plan(c, 1, &W, &y, &x, rows, GEMV_PLAIN, NULL, &p)) return blas_run(c, &W, rows, &p);
    /* the parts' products do not all fit (the 262k-row tied lm_head): the
     * input split once, then one product and sum per run of rows whose results
     * fit the scratch (21 rows at a time for that lm_head) */
    const int parts = p.su.parts;
    G3N_ASSERT(c->xconv && (size_t)parts * rows * K * 2 <= c->xconv_bytes && c->ysplit);
    split_launch(c, W->dtype, p.sa);
    const int run = (int)G3N_MAX((size_t)1, G3N_MIN((size_t)rows, c->ysplit_n / ((size_t)parts * O)));
    for (int r0 = 0; r0 < rows; r0 += run) {
        const int nr = G3N_MIN(run, rows - r0);
        blas_gemm(c, W, (const uint16_t *)c->xconv + (size_t)parts * r0 * K, parts * nr, c->ysplit);
        sum_args su = p.su;
        su.y[0] = y + (size_t)r0 * O, su.e0[1] = (size_t)nr * O;
        launch(c, k_sum, elem_grid(su.e0[1]), 256, 0, (const float *)c->ysplit, su);
    }
}

/* ---- entry points -------------------------------------------------------------------- */

static void multi_run(cuda_ctx *c, int n, const g3n_mat *const *W, float *const *y, const float *const *x,
                      int rows, int mode = GEMV_PLAIN, const float *m = NULL) {
    multi_args a;
    memset(&a, 0, sizeof a);
    a.n = n;
    a.mode = mode;
    a.m = m;
    int min_k = 1 << 30;
    for (int i = 0; i < n; i++) {
        a.W[i] = W[i]->data, a.y[i] = y[i], a.x[i] = x[i], a.O[i] = W[i]->rows, a.K[i] = W[i]->cols;
        a.row0[i + 1] = a.row0[i] + W[i]->rows;
        min_k = G3N_MIN(min_k, W[i]->cols);
    }
    a.wpr = mode == GEMV_GATE_UP ? 1 : pick_wpr(a.row0[n], min_k);
    if (W[0]->dtype == G3N_BF16) gemv_launch<__nv_bfloat16>(c, a, rows);
    else if (W[0]->dtype == G3N_F16) gemv_launch<__half>(c, a, rows);
    else gemv_launch<float>(c, a, rows);
}

/* Whether cuBLAS takes y = W . x of `rows` rows: more than 8 rows (k_gemv takes 8 at
 * most), or at least c->blas_rows of a matrix of c->blas_bytes or more, where one
 * tensor-core product reads W once at a higher rate than k_gemv's R-row loop
 * (G3N_BLAS_ROWS, G3N_BLAS_MB). */
static int use_blas(const cuda_ctx *c, const g3n_mat *W, int rows) {
    if (W->bits || !c->xconv || (size_t)rows * W->cols * 6 > c->xconv_bytes) return 0;
    return rows > 8 || (rows >= c->blas_rows && (size_t)W->rows * W->cols * g3n_dtype_size((g3n_dtype)W->dtype) >=
                                                    c->blas_bytes);
}

static void matmul_one(cuda_ctx *c, float *y, const g3n_mat *W, const float *x, int rows) {
    const int O = W->rows, K = W->cols;
    if (rows <= 0 || O <= 0) return;
    if (use_bmma(c, W, rows)) return bmma_run(c, 1, &W, &y, &x, rows, GEMV_PLAIN, NULL);
    if (use_blas(c, W, rows)) { /* prompt-sized, or a large matrix in a batched step: tensor cores */
        matmul_blas(c, y, W, x, rows);
        return;
    }
    if (W->transposed) { /* stored W^T (exact sparsity); 8 rows at a time */
        for (int r0 = 0; r0 < rows; r0 += 8)
            cuda_matmul_transposed(c, y + (size_t)r0 * O, W, x + (size_t)r0 * K, G3N_MIN(rows - r0, 8));
        return;
    }
    if (K % 8 != 0) {
        launch(c, k_gemv_scalar, dim3((unsigned)(((size_t)O * 32 + 255) / 256)), 256, 0, y, W->data, W->dtype, x, O,
               K, rows);
        return;
    }
    for (int r0 = 0; r0 < rows; r0 += 8)
        multi_run(c, 1, &W, &y, &x, G3N_MIN(rows - r0, 8)), y += (size_t)8 * O, x += (size_t)8 * K;
}

static double mat_bytes(const g3n_mat *W) {
    return (double)W->rows * W->cols * g3n_dtype_size((g3n_dtype)W->dtype);
}

void cuda_op_matmul(g3n_backend *be, float *y, const g3n_mat *W, const float *x, int rows) {
    cuda_ctx *c = CTX(be);
    if (W->bits) return cuda_quant_matmul(c, y, W, x, rows); /* profiled there, with its bytes */
    PROF_BEGIN(c);
    matmul_one(c, y, W, x, rows);
    if (c->profile) {
        char name[48];
        snprintf(name, sizeof name, "matmul %dx%d r%d", W->rows, W->cols, rows);
        PROF_END(c, name, mat_bytes(W));
    }
}

static void matmul_multi_any(g3n_backend *be, int n, const g3n_mat *const *W, float *const *y,
                             const float *const *x, int rows) {
    for (int i = 0; i < n; i++)
        if (W[i]->bits) return cuda_quant_op_multi(be, n, W, y, x, rows); /* quant.cu */
    cuda_ctx *c = CTX(be);
    int ok = n <= MULTI_MAX && rows <= 8, bm = n <= MULTI_MAX, blas = 1;
    for (int i = 0; i < n && ok; i++)
        ok = W[i]->cols % 8 == 0 && W[i]->dtype == W[0]->dtype && !W[i]->transposed && !use_blas(c, W[i], rows);
    for (int i = 0; i < n && bm; i++) bm = use_bmma(c, W[i], rows);
    for (int i = 0; i < n && blas; i++) blas = use_blas(c, W[i], rows);
    blas_plan_t p;
    if (!ok && !bm && !(blas && blas_plan(c, n, W, y, x, rows, GEMV_PLAIN, NULL, &p))) {
        /* unusual, or more than the scratch holds at once: one product at a time */
        for (int i = 0; i < n; i++) cuda_op_matmul(be, y[i], W[i], x[i], rows);
        return;
    }
    PROF_BEGIN(c);
    if (ok) multi_run(c, n, W, y, x, rows);
    else if (bm) bmma_run(c, n, W, y, x, rows, GEMV_PLAIN, NULL); /* 9-32 rows, small */
    else blas_run(c, W, rows, &p); /* prompt-sized or batched: cuBLAS, one split and one sum */
    if (c->profile) {
        char name[48];
        double bytes = 0;
        for (int i = 0; i < n; i++) bytes += mat_bytes(W[i]);
        snprintf(name, sizeof name, "matmul_multi x%d %dx%d.. r%d", n, W[0]->rows, W[0]->cols, rows);
        PROF_END(c, name, bytes);
    }
}

void cuda_op_matmul_multi(g3n_backend *be, int n, const g3n_mat *const *W, float *const *y,
                          const float *const *x, int rows) {
    cuda_ctx *c = CTX(be);
    if (c->att_next) c->qkv_bits = W[0]->bits; /* what attention's launch follows (attention.cu short_launch) */
    matmul_multi_any(be, n, W, y, x, rows);
    c->att_next = 0; /* attention_next marks one product */
}

/* The fused epilogues: one pass over the weights, the activation applied at the
 * end. Prompt-sized or unusual shapes fall back to the sequence of basic ops. */
__global__ void k_gelu_mul_ip(float *y, const float *m, size_t n) {
    KERNEL_BEGIN();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = gelu_tanh_d(y[i]) * m[i];
}

void cuda_op_matmul_gelu_mul(g3n_backend *be, float *y, const g3n_mat *W, const float *x, const float *m, int rows) {
    if (W->bits) return cuda_quant_op_gelu_mul(be, y, W, x, m, rows); /* quant.cu */
    cuda_ctx *c = CTX(be);
    if (use_bmma(c, W, rows)) {
        PROF_BEGIN(c);
        bmma_run(c, 1, &W, &y, &x, rows, GEMV_GELU_MUL, m);
        PROF_END(c, "matmul_gelu_mul (k_bmma)", mat_bytes(W));
        return;
    }
    blas_plan_t p;
    if (use_blas(c, W, rows) && blas_plan(c, 1, &W, &y, &x, rows, GEMV_GELU_MUL, m, &p)) {
        PROF_BEGIN(c);
        blas_run(c, &W, rows, &p); /* gelu(.) * m in the parts' sum */
        PROF_END(c, "matmul_gelu_mul (cuBLAS)", mat_bytes(W));
        return;
    }
    if (rows > 8 || W->cols % 8 != 0 || use_blas(c, W, rows)) {
        cuda_op_matmul(be, y, W, x, rows);
        const size_t n = (size_t)rows * W->rows;
        launch(c, k_gelu_mul_ip, elem_grid(n), dim3(256), 0, y, m, n);
        return;
    }
    PROF_BEGIN(c);
    multi_run(c, 1, &W, &y, &x, rows, GEMV_GELU_MUL, m);
    if (c->profile) {
        char name[48];
        snprintf(name, sizeof name, "matmul_gelu_mul %dx%d r%d", W->rows, W->cols, rows);
        PROF_END(c, name, mat_bytes(W));
    }
}

void cuda_op_matmul_gate_up(g3n_backend *be, float *act, float *up, const g3n_mat *Wg, const g3n_mat *Wu,
                            const float *x, int rows) {
    if (Wg->bits || Wu->bits) return cuda_quant_op_gate_up(be, act, up, Wg, Wu, x, rows); /* quant.cu */
    cuda_ctx *c = CTX(be);
    const bool same = Wg->dtype == Wu->dtype && Wg->rows == Wu->rows && Wg->cols == Wu->cols;
    const g3n_mat *W[2] = {Wg, Wu};
    float *y[2] = {act, up};
    const float *xs[2] = {x, x};
    blas_plan_t p;
    if (same && use_blas(c, Wg, rows) && blas_plan(c, 2, W, y, xs, rows, GEMV_GATE_UP, NULL, &p)) {
        PROF_BEGIN(c);
        blas_run(c, W, rows, &p); /* x split once, the act in the parts' sum */
        PROF_END(c, "matmul_gate_up (cuBLAS)", 2 * mat_bytes(Wg));
        return;
    }
    if (rows > 8 || Wg->cols % 8 != 0 || !same || use_blas(c, Wg, rows)) {
        const size_t n = (size_t)rows * Wg->rows;
        cuda_op_matmul(be, act, Wg, x, rows);
        cuda_op_matmul(be, up, Wu, x, rows);
        launch(c, k_gelu_mul_ip, elem_grid(n), dim3(256), 0, act,
               (const float *)up, n);
        return;
    }
    PROF_BEGIN(c);
    y[1] = NULL;
    multi_run(c, 2, W, y, xs, rows, GEMV_GATE_UP, NULL);
    if (c->profile) {
        char name[48];
        snprintf(name, sizeof name, "matmul_gate_up %dx%d r%d", Wg->rows, Wg->cols, rows);
        PROF_END(c, name, 2 * mat_bytes(Wg));
    }
}

void cuda_op_mlp_sparse(g3n_backend *be, float *y, float *gate, float *up, const g3n_mat *Wg, const g3n_mat *Wu,
                        const g3n_mat *Wd, const float *u, int rows, float kappa) {
    cuda_ctx *c = CTX(be);
    if (rows <= c->sp_rows && (Wd->transposed || Wd->tdata) && (Wg->bits || Wg->cols % 8 == 0) && !Wg->transposed) {
        PROF_BEGIN(c);
        /* the gate as matmul takes it: in a batched step of 3-8 rows a gate of
         * 16 MB or more on cuBLAS (use_blas), where k_gemv's 8 rows took 85 µs for
         * E4B's 67 MB (E4B bf16, 8 streams +10%; docs/SPEED.md, twenty-eighth session) */
        if (Wg->bits) cuda_quant_matmul(c, gate, Wg, u, rows);
        else matmul_one(c, gate, Wg, u, rows);
        const int done = cuda_mlp_sparse(c, y, gate, Wu, Wd, u, rows, kappa);
        PROF_END(c, done ? "mlp_sparse (gate, gather, reduce)" : "mlp_sparse gate", mat_bytes(Wg));
        if (done) return;
        cuda_op_matmul(be, up, Wu, u, rows);
    } else {
        const g3n_mat *W[2] = {Wg, Wu};
        float *ys[2] = {gate, up};
        const float *xs[2] = {u, u};
        cuda_op_matmul_multi(be, 2, W, ys, xs, rows);
    }
    cuda_op_mlp_act(be, gate, up, rows, Wg->rows, kappa);
    cuda_op_matmul(be, y, Wd, gate, rows);
}
