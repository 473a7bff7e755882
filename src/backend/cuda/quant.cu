/* quant.cu: mlx affine-quantized weights on the GPU (src/core/quant.h has the
 * format): upload, decode GEMV with the same epilogues as gemv.cu, prompt-sized
 * products, embedding rows.
 *
 * Decode (up to 32 rows, 8 at a time): each lane takes chunks of 32 weights (`bits` u32 words:
 * one 16-byte load at 4 bits, two at 8), several in flight, loaded before the PDL
 * wait like gemv.cu. A chunk lies inside one group, so its contribution is
 * scale * sum(q * x) + bias * sum(x): the dequantized weight is never formed and
 * the result differs from the reference (fp32 s*q + b, then the dot) only in
 * rounding. `wpr` warps share a long row; partial sums are added in a fixed order.
 * 16-bit scales use k_qmma at 8 bits and for 2-8 rows at 4 (integer tensor-core
 * products per group; below), one row at 4 bits (and what k_qmma declines)
 * k_qgemv_s (integer dot products, 4 output rows per warp, weights through a
 * cp.async ring, K split over a cluster; below); G3N_QGEMV (qgemv_env) picks others for A/B timing. This
 * one-row-per-warp k_qgemv serves f32 scales, slices too wide for shared
 * memory and one-row 4-bit products under 1 MB (qmulti). 2, 3, 5 and 6 bits run the one-row kernel once per row
 * (correct, slower). G3N_QSPLIT=n (most K slices) and G3N_QJ=n (tiles per
 * warp) override k_qgemv_s's shape, for timing.
 * Prompt-sized products: tiles dequantized to three bf16 parts (exactly the
 * reference's weights) and multiplied by cuBLAS on the tensor cores in six
 * bf16 products with f32 sums (qmatmul_blas; f32 cuBLAS as the fallback).
 * Matrices read element by element inside fused row kernels (the AltUp router)
 * are dequantized to f32 at upload; host-resident gather tables (PLE) stay
 * quantized in host memory and the step's rows are dequantized when staged. */
#include <cooperative_groups.h>

#include "cuda_common.cuh"
#include "backend/cuda/launch_shape.h"
#include "quant.h"

namespace cg = cooperative_groups;

#define QMAX 8
#define QRPW 4 /* k_qgemv_s: output rows per warp */
#define QSCRATCH_MAX ((size_t)16 << 20) /* floats of dequantized tile for prompts (64 MB) */

typedef struct {
    const uint32_t *W[QMAX];
    const void *S[QMAX], *B[QMAX];
    float *y[QMAX];
    const float *x[QMAX];
    int O[QMAX], K[QMAX], G[QMAX], sdt[QMAX];
    int row0[QMAX + 1];
    int blk0[QMAX + 1]; /* k_qgemv_s: first block (along y) of each product */
    int gsh[QMAX];      /* k_qgemv_s: log2(G / 32) */
    int n, wpr;
    int ks, J;  /* k_qgemv_s: inputs per slice, tiles per warp (k_qmma: ks, groups per slice) */
    int rb, nr; /* k_qmma: row tiles per block, activation rows */
    int mode;   /* QPLAIN, QGELU_MUL (y = gelu(W.x) * m), QGATE_UP (y0 = gelu(W0.x) * W1.x) */
    const float *m;
    unsigned long long *trace; /* G3N_QTRACE: per block times (cuda.cu) */
    /* k_qgemv_s with K slices but no cluster ("flat"): each block's sums in part
     * ([y block][slice][J * 8 * rows per warp]), cnt[y block] counts the slices
     * done and is put back to 0 by the last, which adds them */
    float *part;
    unsigned *cnt;
    int flat;
    /* matmul_parts: the most K slices the caller keeps (pcap; 0: add them
     * here), and where k_qgemv_s leaves them (pstride: slice k's sums at
     * y + k * pstride; 0: not) and how many (nparts, host side) */
    int pcap, pstride, nparts;
    int trig; /* k_qmma: let the next kernel launch at the start (3), after staging (2), after the main loop (1), at the exit (0) */
} qargs;

enum { QPLAIN = 0, QGELU_MUL = 1, QGATE_UP = 2 };

template <int BITS, int R>
__global__ void __launch_bounds__(256) k_qgemv(qargs a) {
    __shared__ float part[8][R];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wpr = a.wpr;
    int grow = blockIdx.x * (8 / wpr) + warp / wpr;
    const int sub = warp % wpr;
    int total = a.row0[a.n];
    if (a.mode == QGATE_UP) { /* wpr 1: warps 0-3 gate rows i..i+3, warps 4-7 the same up rows */
        const int i = blockIdx.x * 4 + (warp & 3);
        grow = i < a.O[0] ? (warp < 4 ? 0 : a.row0[1]) + i : total;
    }
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0;
    int s = 0, row = 0, K = 32, G = 32;
    const bool valid = grow < total;
    if (valid) {
        while (grow >= a.row0[s + 1]) s++;
        row = grow - a.row0[s];
        K = a.K[s], G = a.G[s];
    }
    const uint32_t *w = a.W[s] + (size_t)row * (size_t)(K / 32 * BITS);
    const size_t g0 = (size_t)row * (size_t)(K / G);
    const void *S = a.S[s], *B = a.B[s];
    const int sdt = a.sdt[s];
    const float *x = a.x[s];
    const int nc = valid ? K / 32 : 0, step = 32 * wpr;
    int c = sub * 32 + lane;
    constexpr int U = 4;
    qchunk<BITS> q[U];
    float sc[U], bi[U];
#pragma unroll
    for (int u = 0; u < U; u++)
        if (c + u * step < nc) qfetch<BITS>(q[u], sc[u], bi[u], w, S, B, sdt, g0, G, c + u * step);
    KERNEL_BEGIN();
    for (;;) {
#pragma unroll
        for (int u = 0; u < U; u++)
            if (c + u * step < nc) {
                const int ch = c + u * step;
#pragma unroll
                for (int r = 0; r < R; r++) {
                    const float4 *xp = (const float4 *)(x + (size_t)r * K + (size_t)ch * 32);
                    float dq = 0, dx = 0;
#pragma unroll
                    for (int k = 0; k < 8; k++) {
                        const float4 v = __ldg(xp + k);
                        dq += qget<BITS>(q[u], 4 * k) * v.x + qget<BITS>(q[u], 4 * k + 1) * v.y +
                              qget<BITS>(q[u], 4 * k + 2) * v.z + qget<BITS>(q[u], 4 * k + 3) * v.w;
                        dx += (v.x + v.y) + (v.z + v.w);
                    }
                    acc[r] += sc[u] * dq + bi[u] * dx;
                }
            }
        c += U * step;
        if (c >= nc) break;
#pragma unroll
        for (int u = 0; u < U; u++)
            if (c + u * step < nc) qfetch<BITS>(q[u], sc[u], bi[u], w, S, B, sdt, g0, G, c + u * step);
    }
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = warp_sum(acc[r]);
    if (lane == 0)
#pragma unroll
        for (int r = 0; r < R; r++) part[warp][r] = acc[r];
    __syncthreads();
    if (a.mode == QGATE_UP) {
        if (warp < 4 && lane < R && valid)
            a.y[0][(size_t)lane * a.O[0] + row] = gelu_tanh_d(part[warp][lane]) * part[warp + 4][lane];
        return;
    }
    if (sub == 0 && lane < R && valid) {
        float v = 0;
        for (int k = 0; k < wpr; k++) v += part[warp + k][lane];
        const size_t o = (size_t)lane * a.O[s] + row;
        a.y[s][o] = a.mode == QGELU_MUL ? gelu_tanh_d(v) * a.m[o] : v;
    }
}

template <int BITS>
static void qlaunch_rows(cuda_ctx *c, const qargs &a, int R) {
    const dim3 grid(a.mode == QGATE_UP ? (unsigned)((a.O[0] + 3) / 4)
                                       : (unsigned)((a.row0[a.n] + 8 / a.wpr - 1) / (8 / a.wpr)));
#define L(r) launch(c, k_qgemv<BITS, r>, grid, 256, 0, a)
    ROWS_SWITCH(R, L)
#undef L
    CUDA_LAUNCHED();
}

/* 2, 3, 5, 6 bits: the one-row kernel once per row (pointers offset by row) */
template <int BITS>
static void qlaunch_each(cuda_ctx *c, const qargs &a, int rows) {
    const dim3 grid(a.mode == QGATE_UP ? (unsigned)((a.O[0] + 3) / 4)
                                       : (unsigned)((a.row0[a.n] + 8 / a.wpr - 1) / (8 / a.wpr)));
    for (int r = 0; r < rows; r++) {
        qargs b = a;
        for (int i = 0; i < a.n; i++) {
            b.x[i] = a.x[i] + (size_t)r * a.K[i];
            if (a.y[i]) b.y[i] = a.y[i] + (size_t)r * a.O[i];
        }
        if (a.m) b.m = a.m + (size_t)r * a.O[0];
        launch(c, k_qgemv<BITS, 1>, grid, 256, 0, b);
        CUDA_LAUNCHED();
    }
}

/* ---- decode GEMV at 4 and 8 bits: integer dot products, split over K ------------------
 *
 * k_qgemv_s: a block of 8 warps computes 8 tiles of QRPW consecutive output rows
 * of one product (QGATE_UP: 4 gate tiles and the same 4 up tiles; the last tile of
 * a product repeats its last row, not stored) over one slice of `ks` inputs. The
 * `nsplit` slices of a set of rows are the blocks of one thread-block cluster;
 * block 0 adds their partial sums in rank order through distributed shared memory
 * (deterministic, and the same whatever the number of activation rows R).
 *
 * Weights: a lane takes chunks of 32 weights (16 bytes at 4 bits, 32 at 8) at
 * chunk positions lane + 32u of the slice, for each row of its warp's tile, and
 * copies them with their scale and bias into a ring of QSTAGES slots in shared
 * memory (cp.async: the loads in flight hold no registers), issued QSTAGES - 1
 * items ahead, the first before the PDL wait.
 *
 * Activations: the block stages its slice once, each chunk of 32 as integers
 * with a shared power-of-two scale: x = 2^e * v, |v| < 2^22 (22 bits below the
 * chunk's largest element, as fine as fp32 rounding of that element), v split
 * into three signed bytes h*2^16 + m*2^8 + l. A chunk lies inside one group, so
 * its contribution is scale * 2^e * (65536 * q.h + 256 * q.m + q.l) + bias * sum(x):
 * the q.h, q.m, q.l are exact int32 dp4a sums (4 multiply-adds an instruction),
 * and the only roundings are the activation's (< 2^-23 of the chunk's largest
 * element) and the float combination. Chunks whose elements are all below 2^-100
 * count as zero. 4 bits: word w of a chunk (elements 8w..8w+7, nibble k at bits
 * 4k) is multiplied as w & 0x0F0F0F0F (elements 0,2,4,6) and (w >> 4) & 0x0F0F0F0F
 * (1,3,5,7), so the staged bytes are ordered to match; 8 bits: bytes in order.
 * Staged layout: [R][3 parts][chunk][8 words] with the two 16-byte halves of a
 * chunk swapped in every other group of 4 chunks (a warp's 16-byte reads of 32
 * consecutive chunks then touch every bank equally), then each chunk's scale 2^e
 * and its sum. */

/* The activations' integer form (k_qgemv_s, k_qmma): for a set of inputs whose
 * largest magnitude is mx, the exponent e with 2^e * 2^22 > mx and inv = 2^-e
 * (x * inv is exact: a power of two); a set below 2^-100 counts as zero (e = 0,
 * inv = 0). */
__device__ __forceinline__ int q_exponent(float mx, float &inv) {
    const bool nz = mx >= 0x1p-100f;
    const int e = nz ? (int)((__float_as_uint(mx) >> 23) & 0xff) - 127 - 21 : 0;
    inv = nz ? __uint_as_float((uint32_t)(127 - e) << 23) : 0.f;
    return e;
}

/* x * inv rounded to an integer v = 65536 h + 256 m + l in signed bytes, stored as
 * p[0][i] = h, p[1][i] = m, p[2][i] = l (each in the low byte) */
template <int N> __device__ __forceinline__ void q_bytes3(float x, float inv, uint32_t (&p)[3][N], int i) {
    const int iv = __float2int_rn(x * inv);
    const int l = (int)(int8_t)(iv & 0xff), iv1 = (iv - l) >> 8;
    const int m = (int)(int8_t)(iv1 & 0xff), h = (iv1 - m) >> 8;
    p[0][i] = (uint32_t)h & 0xffu, p[1][i] = (uint32_t)m & 0xffu, p[2][i] = (uint32_t)l & 0xffu;
}

__device__ __forceinline__ int dp4a_us(uint32_t a, uint32_t b, int c) {
    int d;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

/* word k (0..7) of a staged chunk: its position after the half swap */
__device__ __forceinline__ int qx_word(int ch, int k) { return (((k >> 2) ^ ((ch >> 2) & 1)) << 2) | (k & 3); }

/* acc[i][r] += row i's chunk . activation row r's chunk c of the staged slice
 * (xq: [R][3][ncs][8] words, xe and xsum: [R][ncs]). */
template <int BITS, int R>
__device__ __forceinline__ void qdot_s(float (&acc)[QRPW][R], const uint4 (&q)[QRPW][BITS / 4],
                                       const float (&sc)[QRPW], const float (&bi)[QRPW], const uint32_t *xq,
                                       const float *xe, const float *xsum, int ncs, int c) {
    uint32_t qw[QRPW][8]; /* the weight bytes in the order of the staged activation words */
#pragma unroll
    for (int i = 0; i < QRPW; i++)
#pragma unroll
        for (int j = 0; j < BITS / 4; j++) {
            const uint32_t w[4] = {q[i][j].x, q[i][j].y, q[i][j].z, q[i][j].w};
#pragma unroll
            for (int k = 0; k < 4; k++) {
                if (BITS == 4) {
                    qw[i][2 * k] = w[k] & 0x0F0F0F0Fu;
                    qw[i][2 * k + 1] = (w[k] >> 4) & 0x0F0F0F0Fu;
                } else {
                    qw[i][4 * j + k] = w[k];
                }
            }
        }
    const int sw = (c >> 2) & 1;
#pragma unroll
    for (int r = 0; r < R; r++) {
        int d[QRPW][3];
#pragma unroll
        for (int pt = 0; pt < 3; pt++) {
            const uint32_t *base = xq + ((size_t)(r * 3 + pt) * ncs + c) * 8;
            const uint4 h0 = *(const uint4 *)(base + 4 * sw), h1 = *(const uint4 *)(base + 4 * (sw ^ 1));
            const uint32_t xw[8] = {h0.x, h0.y, h0.z, h0.w, h1.x, h1.y, h1.z, h1.w};
#pragma unroll
            for (int i = 0; i < QRPW; i++) {
                int t = 0;
#pragma unroll
                for (int k = 0; k < 8; k++) t = dp4a_us(qw[i][k], xw[k], t);
                d[i][pt] = t;
            }
        }
        const float e = xe[r * ncs + c], dx = xsum[r * ncs + c];
#pragma unroll
        for (int i = 0; i < QRPW; i++) {
            const float dot = ((float)d[i][0] * 65536.0f + (float)d[i][1] * 256.0f) + (float)d[i][2];
            acc[i][r] += sc[i] * (dot * e) + bi[i] * dx;
        }
    }
}

/* A barrier over the blocks of the cluster (the decode kernels' clusters are
 * their gridDim.x K slices; sm_90), or over this block when it is alone. */
__device__ __forceinline__ void q_cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (gridDim.x > 1) {
        cg::this_cluster().sync();
        return;
    }
#endif
    __syncthreads();
}

/* Output `row` of activation row r from its sums v (and u, QGATE_UP's up row):
 * gelu(v) * u in product 0 (QGATE_UP), else v or gelu(v) * m (QGELU_MUL) in
 * product s. */
__device__ __forceinline__ void q_store(const qargs &a, float v, float u, int s, int row, int r) {
    if (a.mode == QGATE_UP) {
        if (row < a.O[0]) a.y[0][(size_t)r * a.O[0] + row] = gelu_tanh_d(v) * u;
    } else if (row < a.O[s]) {
        const size_t o = (size_t)r * a.O[s] + row;
        a.y[s][o] = a.mode == QGELU_MUL ? gelu_tanh_d(v) * a.m[o] : v;
    }
}

/* The end of a decode product split over the `gridDim.x` blocks of a cluster, on
 * rank 0: v (and u) added over the ranks' copies in shared memory in rank order
 * (all loads in flight together), then stored. */
__device__ __forceinline__ void q_finish(const qargs &a, float *pv, float *pu, int s, int row, int r) {
    float v = *pv, u = pu ? *pu : 0.f;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const int nsplit = gridDim.x;
    if (nsplit > 1) {
        cg::cluster_group cl = cg::this_cluster();
        float xv[8], xu[8];
#pragma unroll
        for (int k = 1; k < 8; k++)
            if (k < nsplit) {
                xv[k] = *cl.map_shared_rank(pv, k);
                xu[k] = pu ? *cl.map_shared_rank(pu, k) : 0.f;
            }
#pragma unroll
        for (int k = 1; k < 8; k++)
            if (k < nsplit) v += xv[k], u += xu[k];
    }
#endif
    q_store(a, v, u, s, row, r);
}

/* The end of a product whose K slices run without a cluster ("flat"), after
 * each block has stored its sums in a.part: whether this block is the last
 * slice of its row block b to arrive (its counter is then put back to 0 for the
 * next launch), which then adds the slices (flat_sum) and stores. */
__device__ __forceinline__ bool flat_last(const qargs &a, int b) {
    __shared__ int last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(&a.cnt[b], 1u) == gridDim.x - 1;
        if (last) a.cnt[b] = 0; /* every slice has counted */
    }
    __syncthreads();
    if (last) __threadfence();
    return last;
}

/* Sums iv (and iu where gu) of the nsplit slices of per floats at pb, in slice
 * order: the cluster's order, so the same bits as q_finish */
__device__ __forceinline__ void flat_sum(const float *pb, size_t per, int nsplit, int iv, int iu, int gu, float &v,
                                         float &u) {
    v = __ldcg(pb + iv), u = gu ? __ldcg(pb + iu) : 0.f;
    for (int k = 1; k < nsplit; k++) {
        v += __ldcg(pb + (size_t)k * per + iv);
        if (gu) u += __ldcg(pb + (size_t)k * per + iu);
    }
}

#define QJMAX 4   /* k_qgemv_s: tiles per warp, at most */
/* k_qgemv_s: ring slots per warp (QSTAGES - 1 items in flight): 3 at 4 bits, 2 at 8
 * (whose slots are twice as large), so that two blocks fit on an SM */
#define QSTAGES (BITS == 4 ? 3 : 2)


/* The 4-byte word holding element g of a 16-bit (SDT: G3N_BF16 or G3N_F16) scale or
 * bias array (cp.async copies at least 4 aligned bytes), and element g taken back
 * out of it. */
__device__ __forceinline__ const void *sb_word(const void *p, size_t g) { return (const uint32_t *)p + g / 2; }
template <int SDT> __device__ __forceinline__ float sb_value(uint32_t w, int g) { /* g: its parity only */
    const uint32_t h = (g & 1) ? w >> 16 : w & 0xffffu;
    if (SDT == G3N_BF16) return __uint_as_float(h << 16);
    return __half2float(__ushort_as_half((unsigned short)h));
}

/* A weight's 16 bytes into shared memory: 8-bit weights with the L2's
 * evict-first hint (cp_async16w: E4B 8-bit +3.2-4.2%, E2B +1.1%); 4-bit ones, whose
 * gate and up the L2 holds whole, without it (E2B 4-bit -1.7% with it; docs/SPEED.md,
 * twenty-seventh session). */
template <int BITS> __device__ __forceinline__ void cp_async16q(void *dst, const void *src) {
    if (BITS == 8)
        cp_async16w(dst, src);
    else
        cp_async16(dst, src);
}

/* A warp's ring slot: for each of its QRPW rows, every lane's chunk words, scale and bias word. */
template <int BITS> struct qslot {
    uint4 w[QRPW][BITS / 4][32];
    uint32_t sc[QRPW][32], bi[QRPW][32];
};

template <int BITS, int R, int SDT>
__global__ void __launch_bounds__(256, R <= 2 ? 2 : 1) k_qgemv_s(qargs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
    if (gridDim.x > 1) __trap(); /* clusters: sm_90 and later (the host splits K only there) */
#endif
    constexpr int PER = QRPW * R;
    unsigned long long tt[5];
    tt[0] = gtime();
    extern __shared__ float4 qsm[]; /* staged slice, chunk scales and sums, [8][QSTAGES] slots */
    __shared__ float red[QJMAX][8][PER];
    const int ks = a.ks, ncs = ks / 32, J = a.J; /* chunk positions per slice, tiles per warp */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, split = blockIdx.x;
    const int b = blockIdx.y, gu = a.mode == QGATE_UP;
    int s = 0;
    while (b >= a.blk0[s + 1]) s++;
    const int sx = s; /* the product whose activations the block stages */
    /* warp's tiles: tile0 + j * tstep (QGATE_UP: warps 0-3 gate, 4-7 the same up tiles) */
    const int tile0 = gu ? b * 4 * J + (warp & 3) : (b - a.blk0[s]) * 8 * J + warp, tstep = gu ? 4 : 8;
    if (gu) s = warp >> 2;
    const int K = a.K[s], O = a.O[s];
    const int gsh = a.gsh[s]; /* chunk position -> group: >> gsh (G = 32 << gsh) */
    const int cbase = split * ncs, nch = G3N_MIN(K / 32 - cbase, ncs), gpr = K >> (gsh + 5);
    const size_t wstride = (size_t)(K / 32) * BITS; /* u32 words per row */
    const uint32_t *W = a.W[s];
    const void *S = a.S[s], *B = a.B[s];
    const int nbt = (ncs + 31) / 32; /* batches of chunk positions per tile */
    uint32_t *xq = (uint32_t *)qsm;
    float *xe = (float *)(xq + (size_t)R * 3 * ncs * 8), *xsum = xe + R * ncs;
    qslot<BITS> *ring = (qslot<BITS> *)(xsum + R * ncs) + warp * QSTAGES;
    /* items in order: tile j < J of the warp, batch bt < nbt of its chunk positions
     * (32 * bt + lane of the slice); one cursor issues, QSTAGES - 1 items ahead */
    int ij = 0, ibt = 0, islot = 0;
    const uint32_t *wrow[QRPW]; /* the issuing tile's rows: weights, and first group */
    int grow[QRPW];
    auto issue = [&]() {
        const int tile = tile0 + ij * tstep, ch = cbase + 32 * ibt + lane;
        if (ibt == 0)
#pragma unroll
            for (int i = 0; i < QRPW; i++) {
                const int row = min(tile * QRPW + i, O - 1);
                wrow[i] = W + (size_t)row * wstride, grow[i] = row * gpr;
            }
        if (ij < J && tile * QRPW < O && ch - cbase < nch) {
            qslot<BITS> &sl = ring[islot];
#pragma unroll
            for (int i = 0; i < QRPW; i++) {
                const int g = grow[i] + (ch >> gsh);
                const uint4 *p = (const uint4 *)(wrow[i] + ch * BITS);
#pragma unroll
                for (int j = 0; j < BITS / 4; j++) cp_async16q<BITS>(&sl.w[i][j][lane], p + j);
                cp_async4(&sl.sc[i][lane], sb_word(S, g));
                cp_async4(&sl.bi[i][lane], sb_word(B, g));
            }
        }
        cp_async_commit(); /* an empty group past the end keeps the wait count uniform */
        if (++ibt == nbt) ibt = 0, ij++;
        if (++islot == QSTAGES) islot = 0;
    };
#pragma unroll
    for (int k = 0; k < QSTAGES - 1; k++) issue();
    KERNEL_BEGIN();
    tt[1] = gtime();
    { /* stage the slice: 8 consecutive threads hold one chunk's 8 float4s (ks/4 is a multiple of 256) */
        const int Kx = a.K[sx], k0 = split * ks, n4 = ks / 4;
        const float *x = a.x[sx];
        auto ldx = [&](int r, int j) { /* float4 j of the slice of activation row r (zeros past K) */
            const int col = k0 + 4 * j;
            return col < Kx ? __ldg((const float4 *)(x + (size_t)r * Kx + col)) : make_float4(0.f, 0.f, 0.f, 0.f);
        };
        float4 vn = ldx(0, threadIdx.x); /* the next float4, loaded one step ahead */
        for (int r = 0, j = threadIdx.x; r < R;) {
            const float4 v = vn;
            const int ch = j >> 3, k = j & 7;
            uint32_t *dst = xq + (size_t)r * 3 * ncs * 8 + (size_t)ch * 8 + qx_word(ch, k);
            float *xsr = xsum + r * ncs, *xer = xe + r * ncs;
            if ((j += 256) >= n4) j = threadIdx.x, r++;
            if (r < R) vn = ldx(r, j);
            float sm = (v.x + v.y) + (v.z + v.w), mx = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
#pragma unroll
            for (int o = 1; o < 8; o <<= 1) {
                sm += __shfl_xor_sync(0xffffffffu, sm, o);
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            }
            float inv;
            const int e = q_exponent(mx, inv);
            const float xv[4] = {v.x, v.y, v.z, v.w};
            uint32_t part[3][4]; /* the three signed bytes of each element */
#pragma unroll
            for (int u = 0; u < 4; u++) q_bytes3(xv[u], inv, part, u);
#pragma unroll
            for (int pt = 0; pt < 3; pt++) {
                const uint32_t *b4 = part[pt];
                uint32_t wv;
                if (BITS == 4) { /* even k: elements 0,2 here and 4,6 in k+1; odd k: 1,3 in k-1 and here */
                    const uint32_t a16 = b4[0] | b4[2] << 8, b16 = b4[1] | b4[3] << 8;
                    const uint32_t mine = a16 | b16 << 16, other = __shfl_xor_sync(0xffffffffu, mine, 1);
                    wv = (k & 1) ? (other >> 16) | (b16 << 16) : a16 | (other << 16);
                } else {
                    wv = b4[0] | b4[1] << 8 | b4[2] << 16 | b4[3] << 24;
                }
                dst[(size_t)pt * ncs * 8] = wv;
            }
            if (k == 0) xsr[ch] = sm, xer[ch] = __uint_as_float((uint32_t)(127 + e) << 23) * (mx >= 0x1p-100f);
        }
    }
    __syncthreads();
    tt[2] = gtime();
    float acc[QRPW][R];
#pragma unroll
    for (int i = 0; i < QRPW; i++)
#pragma unroll
        for (int r = 0; r < R; r++) acc[i][r] = 0;
    for (int j = 0, slot = 0; j < J; j++) {
        const int tile = tile0 + j * tstep;
        int gpar[QRPW]; /* parity of each row's first group */
#pragma unroll
        for (int i = 0; i < QRPW; i++) gpar[i] = (min(tile * QRPW + i, O - 1) * gpr) & 1;
        for (int bt = 0; bt < nbt; bt++) {
            issue();
            cp_async_wait<QSTAGES - 1>(); /* this item's group is complete (each lane reads only its own copies) */
            const int p = 32 * bt + lane;
            if (tile * QRPW < O && p < nch) {
                const qslot<BITS> &sl = ring[slot];
                uint4 q[QRPW][BITS / 4];
                float sc[QRPW], bi[QRPW];
#pragma unroll
                for (int i = 0; i < QRPW; i++) {
                    const int g = gpar[i] + ((cbase + p) >> gsh); /* parity only */
#pragma unroll
                    for (int k = 0; k < BITS / 4; k++) q[i][k] = sl.w[i][k][lane];
                    sc[i] = sb_value<SDT>(sl.sc[i][lane], g);
                    bi[i] = sb_value<SDT>(sl.bi[i][lane], g);
                }
                qdot_s<BITS, R>(acc, q, sc, bi, xq, xe, xsum, ncs, p);
            }
            if (++slot == QSTAGES) slot = 0;
        }
#pragma unroll
        for (int i = 0; i < QRPW; i++) /* end of a tile: its warp sums into red */
#pragma unroll
            for (int r = 0; r < R; r++) {
                const float v = warp_sum(acc[i][r]);
                if (lane == 0) red[j][warp][r * QRPW + i] = v;
                acc[i][r] = 0;
            }
    }
    tt[3] = gtime();
    cp_async_wait<0>();
    const int nw = gu ? 4 : 8;
    if (a.pstride) { /* K slices left to the reader (matmul_parts; one plain product): stored apart */
        __syncthreads(); /* every warp's sums are in red */
        for (int t = threadIdx.x; t < J * 8 * PER; t += 256) {
            const int j = t / (8 * PER), ob = t / PER % 8, pi = t % PER, i = pi % QRPW, r = pi / QRPW;
            const int row = ((b - a.blk0[sx]) * 8 * J + ob + 8 * j) * QRPW + i;
            if (row < O) a.y[sx][(size_t)split * a.pstride + (size_t)r * O + row] = red[j][ob][pi];
        }
        if (a.trace && threadIdx.x == 0) {
            tt[4] = gtime();
            trace_block(a.trace, a.O[0], a.K[0], tt);
        }
        return;
    }
    if (a.flat) {
        /* K slices without a cluster: the sums to memory, and the last slice of
         * this row block to arrive adds them in slice order (the cluster's order:
         * the same bits), whichever that is. flat_last and flat_sum written out,
         * as this kernel was measured: calling them gave its one-row 4-bit
         * instantiations another schedule, E4B 4-bit tg128 -0.6-0.8% on the H200
         * (docs/SPEED.md, thirtieth session). */
        __shared__ int last;
        const int nsplit = gridDim.x, per = J * 8 * PER;
        float *mine = a.part + ((size_t)b * nsplit + split) * per;
        __syncthreads(); /* every warp's sums are in red */
        for (int t = threadIdx.x; t < per; t += 256) mine[t] = red[t / (8 * PER)][t / PER % 8][t % PER];
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) {
            last = atomicAdd(&a.cnt[b], 1u) == (unsigned)nsplit - 1;
            if (last) a.cnt[b] = 0; /* for the next launch: every slice has counted */
        }
        __syncthreads();
        if (last) {
            __threadfence();
            const float *pb = a.part + (size_t)b * nsplit * per;
            for (int t = threadIdx.x; t < J * nw * PER; t += 256) {
                const int j = t / (nw * PER), ob = t / PER % nw, pi = t % PER, i = pi % QRPW, r = pi / QRPW;
                const int tile = gu ? b * 4 * J + ob + 4 * j : (b - a.blk0[sx]) * 8 * J + ob + 8 * j;
                const int iv = (j * 8 + ob) * PER + pi, iu = iv + 4 * PER;
                float v = __ldcg(pb + iv), u = gu ? __ldcg(pb + iu) : 0.f;
                for (int k = 1; k < nsplit; k++) {
                    v += __ldcg(pb + (size_t)k * per + iv);
                    if (gu) u += __ldcg(pb + (size_t)k * per + iu);
                }
                q_store(a, v, u, sx, tile * QRPW + i, r);
            }
        }
        if (a.trace && threadIdx.x == 0) {
            tt[4] = gtime();
            trace_block(a.trace, a.O[0], a.K[0], tt);
        }
        return;
    }
    q_cluster_sync();
    /* block 0 of the cluster: element pi (row i, activation row r) of tile j of warp ob */
    if (split == 0) {
        for (int t = threadIdx.x; t < J * nw * PER; t += 256) {
            const int j = t / (nw * PER), ob = t / PER % nw, pi = t % PER, i = pi % QRPW, r = pi / QRPW;
            const int tile = gu ? b * 4 * J + ob + 4 * j : (b - a.blk0[sx]) * 8 * J + ob + 8 * j;
            const int row = tile * QRPW + i;
            q_finish(a, &red[j][ob][pi], gu ? &red[j][ob + 4][pi] : NULL, sx, row, r);
        }
    }
    q_cluster_sync(); /* keep this block's sums alive until rank 0 has read them */
    if (a.trace && threadIdx.x == 0) {
        tt[4] = gtime();
        trace_block(a.trace, a.O[0], a.K[0], tt);
    }
}

/* k_qgemv_s's dynamic shared memory: the staged slice (3 bytes, a scale and a sum
 * per chunk position) and the warps' rings */
template <int BITS> static size_t qs_smem(int R, int ks) {
    return (size_t)R * (ks / 32) * (3 * 32 + 2 * sizeof(float)) + 8 * QSTAGES * sizeof(qslot<BITS>);
}

/* The most dynamic shared memory k_qgemv_s takes: 200 KB, or less where the device allows less. */
static size_t qs_smem_max(const cuda_ctx *c) { return G3N_MIN((size_t)200 * 1024, c->smem_optin); }

/* Blocks of k_qgemv_s<BITS, R, SDT> resident per SM with a 2048-input slice (the
 * usual one). The first call per instantiation also lets the kernel take up to
 * qs_smem_max, so that no launch needs to raise it. */
template <int BITS, int SDT> static int qs_blocks_per_sm(const cuda_ctx *c, int R) {
    static int v[9];
    R = G3N_MIN(G3N_MAX(R, 1), 8);
    if (!v[R]) {
        const size_t smem = qs_smem<BITS>(R, 2048);
        int n = 1;
#define Q(r)                                                                                                  \
    do {                                                                                                      \
        CUDA_CHECK(cudaFuncSetAttribute(k_qgemv_s<BITS, r, SDT>, cudaFuncAttributeMaxDynamicSharedMemorySize, \
                                        (int)qs_smem_max(c)));                                                \
        CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, k_qgemv_s<BITS, r, SDT>, 256, smem));    \
    } while (0)
        ROWS_SWITCH(R, Q)
#undef Q
        v[R] = G3N_MAX(n, 1);
    }
    return v[R];
}

/* Clusters of `cs` blocks of 256 threads of `kernel` with `smem` bytes of shared
 * memory that the device holds at once (cuda_resident_clusters, remembered per
 * kernel, cs and smem; 0 where it does not answer): on the H100 32 clusters of
 * 8 (256 blocks) do not all fit where 264 single blocks do, and the last
 * clusters then run as a second wave. */
static int resident_clusters(const void *kernel, unsigned cs, size_t smem) {
    static struct {
        const void *kernel;
        unsigned cs;
        size_t smem;
        int n;
    } memo[64];
    static int n_memo;
    for (int i = 0; i < n_memo; i++)
        if (memo[i].kernel == kernel && memo[i].cs == cs && memo[i].smem == smem) return memo[i].n;
    const int n = cuda_resident_clusters(kernel, cs, 256, smem);
    if (n_memo < 64) memo[n_memo].kernel = kernel, memo[n_memo].cs = cs, memo[n_memo].smem = smem, memo[n_memo++].n = n;
    return n;
}

/* resident_clusters for k_qgemv_s<BITS, R, SDT>; where the device does not
 * answer, the blocks that fit, as if clusters cost nothing */
template <int BITS, int SDT> static int qs_resident_clusters(const cuda_ctx *c, int R, unsigned cs, size_t smem) {
    int n = 0;
#define Q(r) n = resident_clusters((const void *)k_qgemv_s<BITS, r, SDT>, cs, smem)
    ROWS_SWITCH(R, Q)
#undef Q
    return n > 0 ? n : c->n_sm * qs_blocks_per_sm<BITS, SDT>(c, R) / (int)cs;
}

/* Returns 0 (nothing launched) when the staged slice does not fit in shared memory. */
template <int BITS, int SDT>
static int qlaunch_s(cuda_ctx *c, qargs &a, int R) {
    /* Fill the GPU's resident warps (two blocks of 8 per SM at R <= 2) about once:
     * K split into slices (multiples of 1024 inputs, at most 8: a portable cluster)
     * while there are fewer warp tiles than that, more tiles per warp while there
     * are more, so that each warp has several items to pipeline. Products under
     * 4 MB (G3N_QSPLIT_KB) are not split: for them a cluster's scheduling and
     * barriers cost more than its warps gain (docs/SPEED.md, eighth session). */
    const int slots = c->n_sm * 8 * qs_blocks_per_sm<BITS, SDT>(c, R);
    int kmax = 0, tiles = 0;
    size_t kb = 0; /* the products' packed KB */
    for (int i = 0; i < a.n; i++) {
        kmax = G3N_MAX(kmax, a.K[i]), tiles += (a.O[i] + QRPW - 1) / QRPW;
        kb += (size_t)a.O[i] * a.K[i] * BITS / 8 / 1024;
        for (a.gsh[i] = 0; (32 << a.gsh[i]) < a.G[i];) a.gsh[i]++;
    }
    static int max_split = -1, fix_j = -1, split_kb = 0, one_wave = 1, wide = 1; /* timing experiments: */
    if (max_split < 0) { /* G3N_QSPLIT, G3N_QJ, G3N_QSPLIT_KB, G3N_QWAVE, G3N_QWIDE */
        one_wave = getenv("G3N_QWAVE") ? atoi(getenv("G3N_QWAVE")) : 1;
        wide = getenv("G3N_QWIDE") ? atoi(getenv("G3N_QWIDE")) : 1;
        max_split = getenv("G3N_QSPLIT") ? atoi(getenv("G3N_QSPLIT")) : 8;
        fix_j = getenv("G3N_QJ") ? atoi(getenv("G3N_QJ")) : 0;
        split_kb = getenv("G3N_QSPLIT_KB") ? atoi(getenv("G3N_QSPLIT_KB")) : 4096;
    }
    /* Eight K slices of 2048 inputs or more are reduced in memory instead of in a
     * cluster ("flat"): a cluster of 8 must fit in one GPC, so the one-wave search
     * found 22 clusters (176 blocks on 132 SMs) for E4B's 4-bit down product, and
     * the blocks sharing an SM ended 3 µs after those alone; flat, 256 blocks
     * spread two an SM. Measured (docs/SPEED.md, fourteenth session): E4B q4
     * +1.3%; E2B's down flat as 8 slices of 1024 −1%, as 4 of 2048 −0.4%, so
     * smaller splits keep their clusters. G3N_QFLAT=0: never, 2: every split
     * product (timing, tests). */
    const char *flat_env = getenv("G3N_QFLAT"); /* read on each call: tests switch it */
    const int flat_on = flat_env ? atoi(flat_env) : 1;
    const int flat_ok = flat_on && c->qs_part != NULL;
    /* matmul_parts: slices without a cluster, as flat, but nothing added here:
     * each stores its own sums, and the reader adds them */
    const int parts = a.pcap > 1 && a.mode == QPLAIN && a.n == 1;
    auto use_flat = [&](int ns, int ks) {
        return parts ? ns > 1 : flat_ok && (flat_on >= 2 ? ns > 1 : ns >= 8 && ks >= 2048);
    };
    auto flat_fits = [&](int nb, int ns, int J, size_t sm) { /* (where use_flat) all resident at once, in the scratch */
        if (parts) return ns <= a.pcap && nb * ns <= qs_resident_clusters<BITS, SDT>(c, R, 1u, sm);
        return (size_t)nb * ns * J * 8 * QRPW * R <= c->qs_part_n && (size_t)nb <= c->qs_cnt_n &&
               nb * ns <= qs_resident_clusters<BITS, SDT>(c, R, 1u, sm);
    };
    int nsplit = 1;
    if ((c->cluster_ok || flat_ok || parts) && kb >= (size_t)split_kb)
        while (nsplit < max_split && tiles * nsplit < slots && kmax > 1024 * nsplit) nsplit *= 2;
    auto slice = [&](int ns) { /* inputs per slice for at most ns slices */
        return G3N_MAX(1024, ((kmax + ns - 1) / ns + 1023) / 1024 * 1024);
    };
    auto blocks = [&](int J) { /* the blocks along y for J tiles per warp (and a.blk0) */
        int nb = 0;
        a.blk0[0] = 0;
        if (a.mode == QGATE_UP) {
            nb = ((a.O[0] + QRPW - 1) / QRPW + 4 * J - 1) / (4 * J);
            a.blk0[1] = a.blk0[2] = nb;
        } else {
            for (int i = 0; i < a.n; i++) a.blk0[i + 1] = nb += ((a.O[i] + QRPW - 1) / QRPW + 8 * J - 1) / (8 * J);
        }
        return nb;
    };
    a.ks = slice(nsplit);
    nsplit = (kmax + a.ks - 1) / a.ks;
    /* two tiles per warp once the warps fill the GPU (measured best at 4 and 8 bits on E4B) */
    a.J = fix_j > 0 ? G3N_MIN(QJMAX, fix_j) : tiles * nsplit >= slots ? 2 : 1;
    if (one_wave && fix_j <= 0) {
        /* A launch that the GPU cannot hold at once runs its last clusters as a
         * second wave, which pays the whole ramp again (docs/SPEED.md, eighth
         * session). Of the shapes with as many or fewer slices and 1 to QJMAX
         * tiles per warp whose clusters are all resident at once, take the one
         * with the most blocks (the most loads in flight); none: the rule above.
         * A split product's slices take 2048 inputs or more and its warps two
         * tiles or more (G3N_QWIDE=0: any): E2B's 4-bit down product (2048 x
         * 8192) ran as 8 slices of 1024, 3 tiles a warp (176 blocks), and as 4
         * of 2048, 2 tiles a warp (128 blocks), 2.5% faster on an H200 and level
         * on the H100 (docs/SPEED.md, seventeenth session); 2048 x 2048 products
         * (AltUp's unembedding) then stay whole. */
        int best_ns = 0, best_j = 0, best_blocks = 0;
        for (int ns = nsplit; ns >= 1; ns /= 2) {
            const int ks = slice(ns), n = (kmax + ks - 1) / ks;
            const size_t sm = qs_smem<BITS>(R, ks);
            if (n != ns || sm > qs_smem_max(c)) continue;
            if (wide && ns > 1 && ks < 2048) continue;
            for (int J = wide && ns > 1 ? 2 : 1; J <= QJMAX; J++) {
                const int nb = blocks(J);
                if (use_flat(ns, ks) ? flat_fits(nb, ns, J, sm)
                                      : (ns == 1 || c->cluster_ok) && nb <= qs_resident_clusters<BITS, SDT>(c, R, (unsigned)ns, sm)) {
                    if (nb * ns > best_blocks) best_ns = ns, best_j = J, best_blocks = nb * ns;
                    break;
                }
            }
        }
        if (best_blocks) a.ks = slice(best_ns), nsplit = best_ns, a.J = best_j;
    }
    static const char *force = getenv("G3N_QFORCE"); /* "O,K,slices,J": that product's shape (timing) */
    static const int debug = getenv("G3N_QDEBUG") != NULL; /* print each launch's shape */
    int fo, fk, fs, fj;
    if (force && sscanf(force, "%d,%d,%d,%d", &fo, &fk, &fs, &fj) == 4 && fo == a.O[0] && fk == a.K[0] && fs >= 1 &&
        fs <= 8 && (fs == 1 || c->cluster_ok || flat_ok))
        a.ks = slice(fs), nsplit = (kmax + a.ks - 1) / a.ks, a.J = G3N_MIN(QJMAX, G3N_MAX(1, fj));
    if (nsplit > 1 && !c->cluster_ok && !use_flat(nsplit, a.ks)) /* no way to add the slices: one */
        a.ks = slice(1), nsplit = 1;
    const size_t smem = qs_smem<BITS>(R, a.ks);
    if (smem > qs_smem_max(c)) return 0;
    const int nb = blocks(a.J);
    if (nb > 65535) return 0;
    const int apart = use_flat(nsplit, a.ks) && flat_fits(nb, nsplit, a.J, smem); /* no cluster */
    a.flat = apart && !parts;
    a.pstride = apart && parts ? R * a.O[0] : 0;
    a.nparts = a.pstride ? nsplit : 1;
    if (nsplit > 1 && !apart && !c->cluster_ok) return 0;
    a.part = c->qs_part, a.cnt = c->qs_cnt;
    if (debug)
        fprintf(stderr, "qgemv_s O%d K%d n%d: slices %d%s J %d blocks %d resident clusters %d\n", a.O[0], a.K[0], a.n,
                nsplit, a.flat ? " (flat)" : a.pstride ? " (parts)" : "", a.J, nb,
                qs_resident_clusters<BITS, SDT>(c, R, apart ? 1u : (unsigned)nsplit, smem));
    const dim3 grid((unsigned)nsplit, (unsigned)nb);
    /* A decode layer's q, LAuReL-left, k and v (the product attention_next
     * marks) run as 98 blocks where the layer stores keys (E4B and E2B), one an
     * SM, and its SMs keep the L1/shared split they chose for two such blocks,
     * which leaves no room for a block of the decode attention that follows:
     * its clusters of 8 (a step past 256 keys) then found 8 free SMs in a GPC
     * only as q/k/v ended, and its keys' loads before the PDL wait came after
     * it (ktrace: attention starting 1.0 µs before q/k/v's end, against 5.9 in
     * a KV-shared layer, whose q/k/v has 66 blocks). This launch asks for all of
     * L1 as shared memory, so attention's blocks fit beside q/k/v's: attention
     * 12.2 -> 9.3 µs (docs/SPEED.md, twenty-fourth session; tg64 after 400-2000
     * tokens E4B 4-bit +2.3-3.3%, E2B 4-bit +2.7-2.9%). Not at 256 keys or
     * fewer (clusters of 4 find free SMs; there it cost 0.3-1%), nor where the
     * launch leaves half of the SMs free (a KV-shared layer's 66 blocks), nor
     * at 8 bits (k_qmma: -1.3%). G3N_CARVE=0: never. */
    static int carve_on = -1;
    if (carve_on < 0) carve_on = !(getenv("G3N_CARVE") && !atoi(getenv("G3N_CARVE")));
    c->carve = carve_on && c->att_next && BITS == 4 && R == 1 && c->one_per_seq && c->reach > 256 &&
               nb * nsplit > c->n_sm / 2;
#define L(r) launch_cluster(c, apart ? 1u : (unsigned)nsplit, k_qgemv_s<BITS, r, SDT>, grid, 256, smem, a)
    ROWS_SWITCH(R, L)
#undef L
    CUDA_LAUNCHED();
    return 1;
}

/* k_qgemv_s for 4 or 8 bits and 16-bit scales (all products alike); 0: not launched */
static int qlaunch_s_any(cuda_ctx *c, qargs &a, int bits, int R) {
    for (int i = 1; i < a.n; i++)
        if (a.sdt[i] != a.sdt[0]) return 0;
    if (a.sdt[0] == G3N_BF16) return bits == 4 ? qlaunch_s<4, G3N_BF16>(c, a, R) : qlaunch_s<8, G3N_BF16>(c, a, R);
    if (a.sdt[0] == G3N_F16) return bits == 4 ? qlaunch_s<4, G3N_F16>(c, a, R) : qlaunch_s<8, G3N_F16>(c, a, R);
    return 0;
}

/* ---- decode GEMV at 4 and 8 bits on tensor cores ------------------------------------------
 *
 * k_qmma: per group of G inputs, the integer products q . v as exact int32 sums on
 * tensor cores (mma m16n8k32: unsigned bytes of weights times signed bytes of
 * activations), finished in float with the group's scale and bias. A warp takes a
 * tile of 16 output rows over a range of groups; lane (g, t) (g = lane / 4, t = lane
 * % 4) takes rows g and g + 8, and in each group the t-th quarter of the row's
 * bytes (8 bytes at 4 bits and G = 64): its share of the A fragment in each of the
 * group's G / 32 mmas: at 4 bits word j of it, its even nibbles (w & 0x0F0F0F0F) as A
 * columns 4t..4t+3 and its odd ones ((w >> 4) & 0x0F0F0F0F) as 16+4t..16+4t+3; at
 * 8 bits words 2j and 2j + 1 as they are. The weights are used as stored: a sum
 * over K does not care which column holds which input, so the activations are
 * staged in the same order instead.
 *
 * Activations: each block stages its slice of groups once, as the dp4a kernel above
 * does but with one exponent per group: x = 2^e * v, |v| < 2^22 (22 bits below the
 * group's largest element), v = 65536 h + 256 m + l in signed bytes; B column 3r + p
 * holds part p of activation row r, in NCB n8 tiles (1-2 rows: one, 3-5: two, 6-8:
 * three; each A fragment serves them all). Each tile's C fragment (rows g, g + 8,
 * columns 2t, 2t + 1) is finished per lane and column:
 * acc += scale * (2^e * 2^16|2^8|1 * c), and in part-0 columns bias * sum(x of the
 * group); the columns of an activation row are added at the end. The only roundings
 * are the activations' (as in k_qgemv_s) and the float finishing.
 *
 * Work: a block's 8 warps take RB row tiles and 8 / RB ranges of the block's
 * groups; the blocks of a thread-block cluster take consecutive slices of K.
 * Partial sums are added in a fixed order (warps, then cluster ranks through
 * distributed shared memory), so results are deterministic. Weights stream through
 * a per-warp cp.async ring of whole 128-byte lines of the tile's rows (mmslot),
 * MM_NSLOT - 1 stages ahead, the first before the PDL wait; a lane's copies are
 * not its fragment, so the warp synchronizes on each stage.
 *
 * At 8 bits this is 1.2-1.3x faster per token than k_qgemv_s (H100, E4B/E2B q8);
 * at 4 bits with one row it is faster alone (no PDL, or events around each op) but
 * about level to 5% slower inside the PDL-chained step, so that case keeps
 * k_qgemv_s (qgemv_env); batched 4-bit steps of 4-16 rows are 1.2x faster.
 * It needs an even number of groups per row (scale words are copied two groups at
 * a time) and at most MM_RMAX activation rows. */

#define MM_RMAX 8 /* k_qmma: activation rows (three B columns each) */

__device__ __forceinline__ void mma_u8s8(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* One group of a lane's two rows (g, g + 8): its quarter of each row's words, the scales and biases. */
template <int WL> struct mmgrp {
    uint32_t a[WL], b[WL];
    float s, s8, z, z8;
};

/* k_qmma's weight ring: per warp, MM_NSLOT slots of one stage each, a stage being
 * 128 bytes of each of the tile's 16 rows (SG whole groups) with their scales and
 * biases; the 16-byte pieces of row r are stored XOR-swizzled by r % 8 so that
 * the fragment reads touch every bank equally. */
#define MM_NSLOT 4 /* measured against 2 and 3 (E4B q8 227 / 249 / 257 tok/s) */
/* Slots for an instantiation of RM rows: fewer where more rows are staged
 * (3-8: 55-74 KB of B fragments for 2048 inputs), so that two blocks fit an
 * SM; with four, a batched gate/up's 256 blocks ran one an SM, in two waves
 * (ncu: 12.5% occupancy, 43% of issue slots). E4B 4-bit 8 / 16 streams with
 * the flat down product: 1,764 / 1,915 -> 1,952 / 2,076 tok/s (twenty-ninth
 * session). */
#define MM_NSL(RM) ((RM) <= 2 ? MM_NSLOT : (RM) <= 5 ? 3 : 2)
template <int BITS, int G> struct mmslot {
    static constexpr int GB = G * BITS / 8, SG = GB >= 128 ? 1 : 128 / GB, SW = SG >= 2 ? SG / 2 : 1;
    uint4 w[16][8];
    uint32_t s[16][SW], z[16][SW];
};

/* RM: the most activation rows of the instantiation (2, 5 or 8), a.nr of them
 * used; FLAT: the K slices are added through memory (a.flat), not in a cluster */
template <int BITS, int G, int RM, int SDT, bool FLAT>
__global__ void __launch_bounds__(256, 2) k_qmma(qargs a) {
    constexpr int NS = G / 32;               /* mmas per group and n8 tile */
    constexpr int WL = G * BITS / 128;       /* words per lane and row in a group */
    constexpr int NCB = (3 * RM + 7) / 8;    /* n8 tiles of B columns */
    constexpr int UPG = G / 8;               /* staging units (8 inputs) per group */
    const int R = a.nr, NC = 3 * R;          /* activation rows; B columns in use */
    constexpr int GB = mmslot<BITS, G>::GB, SG = mmslot<BITS, G>::SG, SW = mmslot<BITS, G>::SW;
    extern __shared__ float4 mmsm[];
    __shared__ float red[8][16][RM], blk[8][16][RM];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int RB = a.rb, KW = 8 / RB, b = blockIdx.y, gu = a.mode == QGATE_UP;
    int s = 0;
    while (b >= a.blk0[s + 1]) s++;
    const int sx = s; /* the product whose activations the block stages */
    const int tl = warp % RB, sub = warp / RB;
    int tile;
    if (gu) tile = b * (RB / 2) + tl % (RB / 2), s = tl / (RB / 2);
    else tile = (b - a.blk0[s]) * RB + tl;
    const int K = a.K[s], O = a.O[s], NG = K / G;
    /* the block's groups (a.ks, a multiple of SG), and the warp's: whole stages */
    const int gs0 = blockIdx.x * a.ks, nsl = max(0, min(a.ks, a.K[sx] / G - gs0)), nst = (nsl + SG - 1) / SG;
    const int st_lo = gs0 / SG + sub * nst / KW, st_hi = tile * 16 < O ? gs0 / SG + (sub + 1) * nst / KW : st_lo;
    const int hi = min(st_hi * SG, gs0 + nsl);
    const size_t wrow = (size_t)(K / 32) * BITS;
    const unsigned short *S = (const unsigned short *)a.S[s], *Z = (const unsigned short *)a.B[s];
    float4 *mul = mmsm; /* [group][tile][t]: m(2t), m(2t+1), xs(2t), xs(2t+1) of the tile's columns */
    uint2 *xq = (uint2 *)(mul + (size_t)a.ks * NCB * 4); /* [group][step][column][t]: B fragments */
    constexpr int NSL = MM_NSL(RM);
    mmslot<BITS, G> *ring = (mmslot<BITS, G> *)(xq + (size_t)a.ks * NS * NC * 4) + warp * NSL;
    const unsigned char *wsrc[4]; /* the rows this lane copies pieces of */
    auto issue = [&](int st, int slot) {
        if (st < st_hi) {
            mmslot<BITS, G> &sl = ring[slot];
            const int gr0 = st * SG;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int row = i * 4 + (lane >> 3), p = lane & 7;
                if (gr0 + p * 16 / GB < hi) cp_async16q<BITS>(&sl.w[row][p ^ (row & 7)], wsrc[i] + (size_t)gr0 * GB + p * 16);
            }
#pragma unroll
            for (int i = 0; i < 2; i++) /* scale words then bias words: 16 rows x SW each */
#pragma unroll
                for (int k = lane; k < 16 * SW; k += 32) {
                    const int row = k / SW, wd = k % SW;
                    const size_t wi = ((size_t)min(tile * 16 + row, O - 1) * NG + gr0) / 2 + wd;
                    if (gr0 / 2 + wd < NG / 2) /* NG is even (host) */
                        cp_async4(i ? &sl.z[row][wd] : &sl.s[row][wd], (const uint32_t *)(i ? Z : S) + wi);
                }
        }
        cp_async_commit();
    };
#pragma unroll
    for (int i = 0; i < 4; i++)
        wsrc[i] = (const unsigned char *)(a.W[s] + (size_t)min(tile * 16 + i * 4 + (lane >> 3), O - 1) * wrow);
#pragma unroll
    for (int k = 0; k < NSL - 1; k++) issue(st_lo + k, k);
    /* launch_dependents where mm_launch puts it for this product (a.trig): here
     * (q/k/v), after the staging (gate/up), after the main loop, or nowhere (the
     * next kernel starts as these blocks exit). Every product triggering here,
     * as the other kernels do, was slower on the H100 at 8 bits (docs/SPEED.md,
     * fifth, twentieth and twenty-first sessions). */
    if (a.trig == 3) pdl_trigger();
    pdl_wait();
    { /* stage: unit u = (r, group, quarter tt, step j) is 8 inputs; a group's UPG units are consecutive lanes */
        const float *x = a.x[sx];
        const int Kx = a.K[sx], nun = R * nsl * UPG;
        for (int u0 = 0; u0 < nun; u0 += 256) {
            const int u = u0 + (int)threadIdx.x;
            const bool ok = u < nun;
            const int r = ok ? u / (nsl * UPG) : 0, ug = ok ? u % (nsl * UPG) : 0;
            const int grl = ug / UPG, q = ug % UPG, tt = q / NS, j = q % NS;
            float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            if (ok) {
                const float4 *p = (const float4 *)(x + (size_t)r * Kx + (size_t)(gs0 + grl) * G + tt * (G / 4) + 8 * j);
                const float4 v0 = __ldg(p), v1 = __ldg(p + 1);
                v[0] = v0.x, v[1] = v0.y, v[2] = v0.z, v[3] = v0.w, v[4] = v1.x, v[5] = v1.y, v[6] = v1.z, v[7] = v1.w;
            }
            float sm = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])), mx = 0;
#pragma unroll
            for (int i = 0; i < 8; i++) mx = fmaxf(mx, fabsf(v[i]));
#pragma unroll
            for (int o = 1; o < UPG; o <<= 1) { /* the same sum on every lane of the group (a butterfly) */
                sm += __shfl_xor_sync(0xffffffffu, sm, o);
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            }
            float inv;
            const int e = q_exponent(mx, inv);
            const bool nz = inv != 0.f;
            uint32_t by[3][8]; /* the three signed bytes of each input */
#pragma unroll
            for (int i = 0; i < 8; i++) q_bytes3(v[i], inv, by, i);
            if (ok) {
#pragma unroll
                for (int p = 0; p < 3; p++) {
                    const uint32_t *c = by[p];
                    const uint2 w = BITS == 4 ? make_uint2(c[0] | c[2] << 8 | c[4] << 16 | c[6] << 24,
                                                           c[1] | c[3] << 8 | c[5] << 16 | c[7] << 24)
                                              : make_uint2(c[0] | c[1] << 8 | c[2] << 16 | c[3] << 24,
                                                           c[4] | c[5] << 8 | c[6] << 16 | c[7] << 24);
                    xq[((size_t)(grl * NS + j) * NC + 3 * r + p) * 4 + tt] = w;
                }
                if (q == 0) { /* the group's multipliers for row r's columns (row 0: the unused ones too) */
                    float *mf = (float *)(mul + (size_t)grl * NCB * 4); /* column c: mf[c / 2 * 4 + c % 2] */
                    const float pw = nz ? __uint_as_float((uint32_t)(127 + e) << 23) : 0.f;
                    const float f[3] = {65536.f, 256.f, 1.f};
#pragma unroll
                    for (int p = 0; p < 3; p++) {
                        const int col = 3 * r + p;
                        mf[(col >> 1) * 4 + (col & 1)] = pw * f[p];
                        mf[(col >> 1) * 4 + 2 + (col & 1)] = p == 0 ? sm : 0.f;
                    }
                    if (r == 0)
                        for (int col = NC; col < 8 * NCB; col++)
                            mf[(col >> 1) * 4 + (col & 1)] = mf[(col >> 1) * 4 + 2 + (col & 1)] = 0.f;
                }
            }
        }
    }
    __syncthreads();
    if (a.trig == 2) pdl_trigger();
    float acc[NCB][4] = {}; /* per tile: rows g, g+8 x columns 2t, 2t+1 */
    auto group = [&](const mmgrp<WL> &d, int gr) {
        const int grl = gr - gs0;
        int c[NCB][4] = {};
#pragma unroll
        for (int j = 0; j < NS; j++) {
            uint32_t a0, a1, a2, a3;
            if (BITS == 4) {
                a0 = d.a[j] & 0x0F0F0F0Fu, a1 = d.b[j] & 0x0F0F0F0Fu;
                a2 = (d.a[j] >> 4) & 0x0F0F0F0Fu, a3 = (d.b[j] >> 4) & 0x0F0F0F0Fu;
            } else {
                a0 = d.a[2 * j], a1 = d.b[2 * j], a2 = d.a[2 * j + 1], a3 = d.b[2 * j + 1];
            }
#pragma unroll
            for (int cb = 0; cb < NCB; cb++) {
                const int col = cb * 8 + g;
                const uint2 bb = col < NC ? xq[((size_t)(grl * NS + j) * NC + col) * 4 + t] : make_uint2(0u, 0u);
                mma_u8s8(c[cb], a0, a1, a2, a3, bb.x, bb.y);
            }
        }
        const float s0 = d.s, s1 = d.s8, z0 = d.z, z1 = d.z8;
#pragma unroll
        for (int cb = 0; cb < NCB; cb++) {
            const float4 mq = mul[((size_t)grl * NCB + cb) * 4 + t];
            acc[cb][0] = fmaf(z0, mq.z, fmaf(s0, mq.x * (float)c[cb][0], acc[cb][0]));
            acc[cb][1] = fmaf(z0, mq.w, fmaf(s0, mq.y * (float)c[cb][1], acc[cb][1]));
            acc[cb][2] = fmaf(z1, mq.z, fmaf(s1, mq.x * (float)c[cb][2], acc[cb][2]));
            acc[cb][3] = fmaf(z1, mq.w, fmaf(s1, mq.y * (float)c[cb][3], acc[cb][3]));
        }
    };
    for (int st = st_lo, slot = 0; st < st_hi; st++) {
        issue(st + NSL - 1, slot == 0 ? NSL - 1 : slot - 1);
        cp_async_wait<NSL - 1>();
        __syncwarp(); /* every lane's copies of this stage are complete */
        const mmslot<BITS, G> &sl = ring[slot];
#pragma unroll
        for (int lg = 0; lg < SG; lg++) {
            const int gr = st * SG + lg;
            if (gr < hi) {
                mmgrp<WL> d;
                const int off = lg * GB + t * (GB / 4); /* this lane's quarter of the group's bytes */
#pragma unroll
                for (int h = 0; h < (WL + 3) / 4; h++) {
                    const int pc = off / 16 + h, in = off % 16 / 4;
                    const uint32_t *qa = (const uint32_t *)&sl.w[g][pc ^ g] + in;
                    const uint32_t *qb = (const uint32_t *)&sl.w[g + 8][pc ^ g] + in;
#pragma unroll
                    for (int k = 0; k < (WL < 4 ? WL : 4); k++) d.a[4 * h + k] = qa[k], d.b[4 * h + k] = qb[k];
                }
                const int wd = SG >= 2 ? lg >> 1 : 0, par = SG >= 2 ? lg & 1 : (st * SG) & 1;
                d.s = sb_value<SDT>(sl.s[g][wd], par), d.s8 = sb_value<SDT>(sl.s[g + 8][wd], par);
                d.z = sb_value<SDT>(sl.z[g][wd], par), d.z8 = sb_value<SDT>(sl.z[g + 8][wd], par);
                group(d, gr);
            }
        }
        __syncwarp(); /* all lanes are done with the slot before it is refilled */
        if (++slot == NSL) slot = 0;
    }
    cp_async_wait<0>();
    if (a.trig == 1) pdl_trigger();
    /* the columns of each activation row (in tile order), added over the four t-lanes */
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int i = 0; i < 2; i++) {
            float v = 0.f;
#pragma unroll
            for (int cb = 0; cb < NCB; cb++) {
                const int c0 = cb * 8 + 2 * t;
                v += (c0 / 3 == r ? acc[cb][2 * i] : 0.f) + ((c0 + 1) / 3 == r ? acc[cb][2 * i + 1] : 0.f);
            }
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            v += __shfl_xor_sync(0xffffffffu, v, 2);
            if (t == 0) red[warp][g + 8 * i][r] = v;
        }
    __syncthreads();
    for (int i = threadIdx.x; i < RB * 16 * R; i += 256) { /* the block's sum per tile, warps in order */
        const int ti = i / (16 * R), row = i / R % 16, r = i % R;
        float v = 0;
        for (int k = 0; k < KW; k++) v += red[k * RB + ti][row][r];
        blk[ti][row][r] = v;
        if constexpr (FLAT) a.part[((size_t)b * gridDim.x + blockIdx.x) * (RB * 16 * R) + i] = v;
    }
    /* K slices without a cluster (their own instantiation: the flat branch in
     * every one cost the one-row kernel 4-7%, another schedule): the last slice
     * of this row block to arrive adds them in rank order */
    if constexpr (FLAT) {
        const int nsplit = gridDim.x, per = RB * 16 * R;
        if (flat_last(a, b)) {
            const float *pb = a.part + (size_t)b * nsplit * per;
            const int nt = gu ? RB / 2 : RB;
            for (int i = threadIdx.x; i < nt * 16 * R; i += 256) {
                const int ti = i / (16 * R), row = i / R % 16, r = i % R;
                const int o = (gu ? b * (RB / 2) + ti : (b - a.blk0[sx]) * RB + ti) * 16 + row;
                float v, u;
                flat_sum(pb, per, nsplit, i, i + (RB / 2) * 16 * R, gu, v, u);
                q_store(a, v, u, sx, o, r);
            }
        }
        return;
    }
    if (a.pstride) { /* K slices left to the reader (matmul_parts; one plain product): stored apart */
        __syncthreads();
        for (int i = threadIdx.x; i < RB * 16 * R; i += 256) {
            const int ti = i / (16 * R), row = i / R % 16, r = i % R, o = ((b - a.blk0[sx]) * RB + ti) * 16 + row;
            if (o < a.O[sx]) a.y[sx][(size_t)blockIdx.x * a.pstride + (size_t)r * a.O[sx] + o] = blk[ti][row][r];
        }
        return;
    }
    q_cluster_sync();
    if (blockIdx.x == 0) { /* rank 0 adds the cluster's slices and finishes */
        const int nt = gu ? RB / 2 : RB;
        for (int i = threadIdx.x; i < nt * 16 * R; i += 256) {
            const int ti = i / (16 * R), row = i / R % 16, r = i % R;
            const int o = (gu ? b * (RB / 2) + ti : (b - a.blk0[sx]) * RB + ti) * 16 + row;
            q_finish(a, &blk[ti][row][r], gu ? &blk[ti + RB / 2][row][r] : NULL, sx, o, r);
        }
    }
    q_cluster_sync(); /* keep this block's sums alive until rank 0 has read them */
}

/* The shape arithmetic (launch_shape.h) with this GPU's SMs and clusters and
 * G3N_QMMA=rb,cs's override (timing) */
static void mm_fix(int *rb, int *cs) {
    static int fix_rb = -1, fix_cs = 0;
    if (fix_rb < 0) {
        const char *e = getenv("G3N_QMMA");
        fix_rb = 0;
        if (e && sscanf(e, "%d,%d", &fix_rb, &fix_cs) != 2) fix_rb = 0, fix_cs = 0;
    }
    *rb = fix_rb, *cs = fix_cs;
}

static void mm_shape(const cuda_ctx *c, int tiles, int ng, int G, int kind, int *rb, int *cs) {
    int fr, fc;
    mm_fix(&fr, &fc);
    mm_shape_for(c->n_sm, c->cluster_ok, fr, fc, tiles, ng, G, kind, rb, cs);
}

static int mm_plain_blocks(const cuda_ctx *c, int O, int K, int G, int SG) {
    int fr, fc;
    mm_fix(&fr, &fc);
    return mm_plain_blocks_for(c->n_sm, c->cluster_ok, fr, fc, O, K, G, SG);
}

/* k_qmma's dynamic shared memory for a slice of `ks` groups: multipliers, B fragments, the warps' rings */
template <int BITS, int G> static size_t mm_smem(int R, int ks) {
    const size_t ncb = (size_t)(3 * R + 7) / 8;
    return (size_t)ks * (ncb * 4 * sizeof(float4) + (size_t)(G / 32) * 3 * R * 4 * sizeof(uint2)) +
           (size_t)8 * MM_NSL(R <= 2 ? 2 : R <= 5 ? 5 : 8) * sizeof(mmslot<BITS, G>);
}

/* resident_clusters for k_qmma (the instantiation for R rows; its shared memory
 * limit raised first); INT_MAX where the device does not answer */
template <int BITS, int G, int SDT> static int mm_resident_clusters(const cuda_ctx *c, int R, unsigned cs, size_t smem) {
    const void *k = R <= 2 ? (const void *)k_qmma<BITS, G, 2, SDT, false>
                    : R <= 5 ? (const void *)k_qmma<BITS, G, 5, SDT, false>
                             : (const void *)k_qmma<BITS, G, 8, SDT, false>;
    CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)qs_smem_max(c)));
    const int n = resident_clusters(k, cs, smem);
    return n > 0 ? n : INT_MAX;
}

template <int BITS, int G, int SDT>
static int mm_launch(cuda_ctx *c, qargs &a, int R) {
    constexpr int SG = mmslot<BITS, G>::SG;
    const int gu = a.mode == QGATE_UP;
    int ngmax = 0, tiles = 0;
    for (int i = 0; i < a.n; i++) {
        if ((a.K[i] / G) % 2) return 0; /* the ring copies scale words, two groups at a time */
        ngmax = G3N_MAX(ngmax, a.K[i] / G), tiles += (a.O[i] + 15) / 16;
    }
    const int kind = mm_kind(gu, a.n, a.O[0], a.K[0]), down = kind == MM_DOWN;
    int rb, cs;
    mm_shape(c, tiles, ngmax, G, kind, &rb, &cs);
    a.rb = rb;
    cs = mm_slices(ngmax, cs, SG, &a.ks);
    size_t smem = mm_smem<BITS, G>(R, a.ks);
    if (smem > qs_smem_max(c)) return 0;
    int nb = 0;
    a.blk0[0] = 0;
    if (gu) {
        nb = ((a.O[0] + 15) / 16 + rb / 2 - 1) / (rb / 2);
        a.blk0[1] = a.blk0[2] = nb;
    } else {
        for (int i = 0; i < a.n; i++) a.blk0[i + 1] = nb += ((a.O[i] + 15) / 16 + rb - 1) / rb;
    }
    if (nb > 65535) return 0;
    const dim3 grid((unsigned)cs, (unsigned)nb);
    a.nr = R;
    /* A down product (one product, K > O) whose blocks the SMs hold at once takes
     * one block an SM: its shared memory is padded past half an SM's. It then
     * starts launching while gate/up still runs (below), and as gate/up's blocks
     * leave, the SMs freed first would otherwise take two down blocks each while
     * others had none. Measured (docs/SPEED.md, twenty-first session) with
     * gate/up's trigger after its staging: E4B q8 363 -> 370 tok/s, E2B q8 533 ->
     * 546; gate/up's trigger without the padding was slower (343, 525), the
     * padding alone level. G3N_QMMA_PAD=0: neither. */
    static int pad_on = -1;
    if (pad_on < 0) pad_on = !(getenv("G3N_QMMA_PAD") && !atoi(getenv("G3N_QMMA_PAD")));
    const size_t one_sm = c->smem_optin / 2 + 1024; /* two such blocks do not fit an SM */
    if (pad_on && down && nb * cs <= c->n_sm && one_sm > smem && one_sm <= qs_smem_max(c)) smem = one_sm;
    /* Where the next kernel may start launching (PDL), so that its blocks are
     * resident (and attention's keys on their way) by the time this one ends:
     * - at the start in several products under 16 MB together (q/k/v: decode
     *   attention, which follows, triggers only after its wait, so the launches
     *   go no further while q/k/v runs);
     * - after the main loop in other products under 16 MB (the per-layer
     *   projection) and in a down product (one product, K > O);
     * - after its staging in gate/up, where its down product (K x O) will be
     *   padded (above; without the padding this was slower);
     * - at the exit in the rest (the lm_head, a sparse layer's gate).
     * Measured (docs/SPEED.md, twentieth and twenty-first sessions): the main
     * loop's trigger E4B q8 351-353 -> 363 tok/s, E2B q8 508-511 -> 532-533;
     * every small product at its start 328-329 (E4B q8); q/k/v at its start
     * 365-367 against 369-371 while attention triggered at its start, and with
     * attention's trigger after its wait 371 -> 373 (E4B q8), 549 -> 554 (E2B
     * q8). G3N_QMMA_TRIG=0: at the exit always. */
    static int trig_on = -1;
    if (trig_on < 0) trig_on = !(getenv("G3N_QMMA_TRIG") && !atoi(getenv("G3N_QMMA_TRIG")));
    size_t bytes = 0;
    for (int i = 0; i < a.n; i++) bytes += (size_t)a.O[i] * a.K[i] * BITS / 8;
    const int small = bytes < ((size_t)16 << 20);
    const int down_padded = gu && pad_on && mm_plain_blocks(c, a.K[0], a.O[0], G, SG) <= c->n_sm; /* (its down's) */
    a.trig = !trig_on ? 0 : gu ? (down_padded ? 2 : 0) : small && a.n >= 2 ? 3 : small || down;
    /* matmul_parts: the slices need no cluster; each stores its sums, the reader adds them */
    const int parts = cs > 1 && cs <= a.pcap && a.mode == QPLAIN && a.n == 1;
    a.pstride = parts ? R * a.O[0] : 0;
    a.nparts = parts ? cs : 1;
    /* K slices whose clusters the device cannot hold all at once (a cluster
     * must sit in one GPC: 16 clusters of 8 blocks at one block an SM leave the
     * last as a second wave on the H100) run without a cluster ("flat"): each
     * block stores its sums and the last slice of its row block to finish adds
     * them in rank order, the cluster's order. Measured (docs/SPEED.md,
     * twenty-ninth session, H100): the down products of batched 4- and 8-bit
     * steps (2048 x 8192|16384 at 4-8 rows: 16 clusters of 8, one block an SM
     * for their staged rows; 15 fit), E4B 4-bit 4 / 8 / 16 streams +11 / +10 /
     * +15% (+12 / +17 / +21% with MM_NSL's slots). Flat launches take their own
     * instantiation (FLAT): with the flat branch compiled into every one, the
     * one-row kernel took another schedule and ran 4-7% slower at 8 bits. So
     * the launches that stay in clusters lost their flat code, and 1-2 rows
     * may go flat too (a 2-stream step's down product; one stream's takes
     * matmul_parts): thirtieth session, H200, E4B 4-bit 2 / 4 / 8 / 16 streams
     * +10 / +3 / +3 / +1%, E4B 8-bit +11 / +3 / +7 / +9%. G3N_MMFLAT: 0 never,
     * 2 every split product (tests). */
    const char *fe = getenv("G3N_MMFLAT"); /* read on each call: tests switch it */
    const int flat_env = fe ? atoi(fe) : 1;
    a.flat = 0;
    if (cs > 1 && !parts && flat_env && c->qs_part &&
        (size_t)nb * cs * rb * 16 * R <= c->qs_part_n && (size_t)nb <= c->qs_cnt_n)
        a.flat = flat_env == 2 || nb > mm_resident_clusters<BITS, G, SDT>(c, R, (unsigned)cs, smem);
    a.part = c->qs_part, a.cnt = c->qs_cnt;
    static const int debug = getenv("G3N_QDEBUG") != NULL; /* print each launch's shape */
    if (debug)
        fprintf(stderr, "qmma O%d K%d n%d R%d: rb %d slices %d%s blocks %d resident clusters %d\n", a.O[0], a.K[0], a.n,
                R, rb, cs, a.flat ? " (flat)" : a.pstride ? " (parts)" : "", nb,
                cs > 1 ? mm_resident_clusters<BITS, G, SDT>(c, R, (unsigned)cs, smem) : 0);
    /* the instantiation: rows 2 (one n8 tile of B columns), 5 (two) or 8 (three), flat or not */
    const int ri = R <= 2 ? 0 : R <= 5 ? 1 : 2;
    static int attr[3][2]; /* the dynamic shared memory limit, raised once per instantiation */
#define L(rm, fl)                                                                                     \
    do {                                                                                              \
        if (!attr[ri][fl])                                                                            \
            CUDA_CHECK(cudaFuncSetAttribute(k_qmma<BITS, G, rm, SDT, fl>,                             \
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, (int)qs_smem_max(c))); \
        attr[ri][fl] = 1;                                                                             \
        launch_cluster(c, parts || fl ? 1u : (unsigned)cs, k_qmma<BITS, G, rm, SDT, fl>, grid, 256, smem, a); \
    } while (0)
    if (a.flat) {
        if (ri == 0) L(2, true);
        else if (ri == 1) L(5, true);
        else L(8, true);
    } else {
        if (ri == 0) L(2, false);
        else if (ri == 1) L(5, false);
        else L(8, false);
    }
#undef L
    CUDA_LAUNCHED();
    return 1;
}

/* k_qmma for 4 or 8 bits, 16-bit scales, groups of 32, 64 or 128 (all products
 * alike), at most MM_RMAX activation rows; 0: not launched */
static int mm_launch_any(cuda_ctx *c, qargs &a, int bits, int R) {
    if (R > MM_RMAX || (bits != 4 && bits != 8)) return 0;
    for (int i = 0; i < a.n; i++)
        if (a.sdt[i] != a.sdt[0] || a.G[i] != a.G[0]) return 0;
    const int G = a.G[0], sd = a.sdt[0];
    if (sd != G3N_BF16 && sd != G3N_F16) return 0;
#define B3(bb, sdt)                                                     \
    (G == 32 ? mm_launch<bb, 32, sdt>(c, a, R) : G == 64 ? mm_launch<bb, 64, sdt>(c, a, R) \
                                                           : G == 128 ? mm_launch<bb, 128, sdt>(c, a, R) : 0)
    if (sd == G3N_BF16) return bits == 4 ? B3(4, G3N_BF16) : B3(8, G3N_BF16);
    return bits == 4 ? B3(4, G3N_F16) : B3(8, G3N_F16);
#undef B3
}

/* Which decode kernel takes 4- and 8-bit products (G3N_QGEMV, for A/B timing and
 * tests): by default k_qmma at 8 bits and for 2-8 rows at 4, k_qgemv_s for one row
 * at 4 bits, where each measured faster on the H100 (docs/SPEED.md); "mma" k_qmma
 * everywhere, "dp4a" k_qgemv_s everywhere, "old" the one-row-per-warp k_qgemv. */
enum { QK_DEFAULT, QK_MMA, QK_DP4A, QK_OLD };
static int qgemv_env(void) {
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("G3N_QGEMV");
        v = !e                    ? QK_DEFAULT
            : !strcmp(e, "mma")   ? QK_MMA
            : !strcmp(e, "dp4a")  ? QK_DP4A
            : !strcmp(e, "old")   ? QK_OLD
                                  : QK_DEFAULT;
    }
    return v;
}

/* n products of quantized matrices with equal bits, rows <= 8, in one launch per row set.
 * pcap > 1 (one plain product): its K slices may be left apart (matmul_parts);
 * returns how many (1: y is the product). */
static int qmulti(cuda_ctx *c, int n, const g3n_mat *const *W, float *const *y, const float *const *x, int rows,
                  int mode, const float *m, int pcap = 0) {
    qargs a;
    memset(&a, 0, sizeof a);
    a.n = n, a.mode = mode, a.m = m, a.pcap = pcap;
    int min_k = 1 << 30;
    for (int i = 0; i < n; i++) {
        a.W[i] = (const uint32_t *)W[i]->data, a.S[i] = W[i]->scales, a.B[i] = W[i]->biases;
        a.y[i] = y[i], a.x[i] = x[i], a.O[i] = W[i]->rows, a.K[i] = W[i]->cols;
        a.G[i] = W[i]->group_size, a.sdt[i] = W[i]->sdtype;
        a.row0[i + 1] = a.row0[i] + W[i]->rows;
        min_k = G3N_MIN(min_k, W[i]->cols);
    }
    const int bits = W[0]->bits;
    int k = qgemv_env();
    if (k == QK_DEFAULT && bits == 4 && rows == 1) {
        /* One-row 4-bit products under 1 MB packed (the per-layer input's gate and
         * projection) take the one-row kernel: its chain (weights before the PDL
         * wait, activations read as floats) is shorter than staging the slice as
         * integers (docs/SPEED.md, tenth session: E4B q4 +0.8-1.8%, E2B +0.5%).
         * G3N_QSMALL_KB sets the bound (0: none), for timing. */
        static int small_kb = -1;
        if (small_kb < 0) small_kb = getenv("G3N_QSMALL_KB") ? atoi(getenv("G3N_QSMALL_KB")) : 1024;
        size_t kb = 0;
        for (int i = 0; i < n; i++) kb += (size_t)W[i]->rows * W[i]->cols / 2 / 1024;
        if (kb < (size_t)small_kb) k = QK_OLD;
    }
    a.trace = c->qtrace;
    if ((k == QK_MMA || (k == QK_DEFAULT && (bits == 8 || rows >= 2))) && mm_launch_any(c, a, bits, rows))
        return a.nparts;
    if ((bits == 4 || bits == 8) && k != QK_OLD && qlaunch_s_any(c, a, bits, rows)) return a.nparts;
    /* warps per row: ~8K warps in flight, each with at least 8 chunks of its row */
    a.wpr = 1;
    while (mode != QGATE_UP && a.wpr < 8 && (size_t)a.row0[n] * a.wpr < 8192 && min_k / 32 / (a.wpr * 2) >= 8)
        a.wpr *= 2;
    switch (W[0]->bits) {
    case 4: qlaunch_rows<4>(c, a, rows); break;
    case 8: qlaunch_rows<8>(c, a, rows); break;
    case 2: qlaunch_each<2>(c, a, rows); break;
    case 3: qlaunch_each<3>(c, a, rows); break;
    case 5: qlaunch_each<5>(c, a, rows); break;
    default: qlaunch_each<6>(c, a, rows); break;
    }
    return 1;
}

/* Decode-sized products of up to QDECODE_ROWS rows: qmulti on 8 rows at a time
 * (the weights are read once per 8 rows; dequantizing for cuBLAS writes 6
 * bytes a weight and its six products read 12, which pays only for prompts:
 * through k_qmma 8 rows at a time a 512-token prompt took 2.3x as long,
 * docs/SPEED.md twelfth session). */
#define QDECODE_ROWS 32
static void qmulti_rows(cuda_ctx *c, int n, const g3n_mat *const *W, float *const *y, const float *const *x,
                        int rows, int mode, const float *m) {
    for (int r0 = 0; r0 < rows; r0 += 8) {
        float *yy[QMAX];
        const float *xx[QMAX];
        for (int i = 0; i < n; i++) {
            yy[i] = y[i] ? y[i] + (size_t)r0 * W[i]->rows : NULL;
            xx[i] = x[i] + (size_t)r0 * W[i]->cols;
        }
        qmulti(c, n, W, yy, xx, G3N_MIN(rows - r0, 8), mode, m ? m + (size_t)r0 * W[0]->rows : NULL);
    }
}

/* ---- prompt-sized products: dequantized tiles, cuBLAS on the tensor cores ----------------
 *
 * A tile of W's rows is dequantized (s * q + b in f32, as the reference) into
 * three bf16 matrices whose sum is w (hi = bf16(w), mid = bf16(w - hi), lo =
 * bf16(w - hi - mid): 24 bits), and the activations are split into three bf16
 * parts whose sum is x to ~24 bits (cuda_split_bf16, as bf16 weights take
 * them). Then
 *   y = hi . x1 + hi . x2 + mid . x1 + hi . x3 + mid . x2 + lo . x1
 * six bf16 products with f32 sums (cuBLAS, each adding into y: beta 1); left
 * out are the products below 2^-24 of a term (mid . x3, lo . x2, lo . x3), so
 * the result is the f32 product's to float rounding, as for bf16 weights. Two
 * weight parts and four products (hi + lo, 16 bits) were 1.2x faster still
 * (E4B 4-bit pp512) but ~2^-17 of each term off: 3e-4 on the test fixtures'
 * logits, where f32 rounding is ~1e-6. cuBLAS in f32 (G3N_QBLAS_F32=1, or no
 * split buffer sized yet) is the fallback: 1.5x (pp512) to 2x (pp4096) slower. */
__global__ void k_dequant(float *out, const uint32_t *W, const void *S, const void *B, int sdt, int bits, int group,
                          int K, int r0, int nr) {
    KERNEL_BEGIN();
    const size_t n = (size_t)nr * K;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = qdeq(W, S, B, sdt, bits, group, K, (size_t)r0 + i / K, (int)(i % K));
}

/* w as the sum of three bf16 values (exact: each difference is exact in f32) */
__device__ __forceinline__ void bf16x3(float w, __nv_bfloat16 &h, __nv_bfloat16 &m, __nv_bfloat16 &l) {
    h = __float2bfloat16_rn(w);
    const float r = w - __bfloat162float(h);
    m = __float2bfloat16_rn(r);
    l = __float2bfloat16_rn(r - __bfloat162float(m));
}

/* Rows r0..r0+nr-1, columns c0..c0+nc-1 of W as bf16 parts P[0..2] ([nr, nc]
 * each, `part` apart). 4 and 8 bits: a thread per packed word (8 or 4 weights
 * of one group, one store per part); other widths: a thread per weight. */
__global__ void k_dequant_bf16x3(__nv_bfloat16 *P, size_t part, const uint32_t *W, const void *S, const void *B,
                                 int sdt, int bits, int group, int K, int r0, int nr, int c0, int nc) {
    KERNEL_BEGIN();
    const size_t stride = (size_t)gridDim.x * blockDim.x, i0 = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (bits == 4 || bits == 8) {
        const int per = 32 / bits, wpr = nc / per;
        const uint32_t mask = (1u << bits) - 1u;
        const size_t n = (size_t)nr * wpr;
        for (size_t wi = i0; wi < n; wi += stride) {
            const size_t r = wi / wpr, row = (size_t)r0 + r;
            const int col = (int)(wi % wpr) * per;
            const uint32_t v = W[row * (K / per) + (c0 + col) / per];
            const size_t g = row * (size_t)(K / group) + (c0 + col) / group;
            const float sc = load_w(S, sdt, g), bi = load_w(B, sdt, g);
            union { __nv_bfloat16 h[8]; uint4 u; } o[3];
            for (int j = 0; j < per; j++)
                bf16x3(qaffine(sc, (float)((v >> (bits * j)) & mask), bi), o[0].h[j], o[1].h[j], o[2].h[j]);
            __nv_bfloat16 *d = P + r * nc + col;
            for (int k = 0; k < 3; k++, d += part) {
                if (per == 8) *(uint4 *)d = o[k].u;
                else *(uint2 *)d = make_uint2(o[k].u.x, o[k].u.y);
            }
        }
        return;
    }
    const size_t n = (size_t)nr * nc;
    for (size_t i = i0; i < n; i += stride)
        bf16x3(qdeq(W, S, B, sdt, bits, group, K, (size_t)r0 + i / nc, c0 + (int)(i % nc)), P[i], P[i + part],
               P[i + 2 * part]);
}

/* tile sizes: n split into about n / most equal parts, multiples of `mult` where that fits
 * (cuBLAS picks slow kernels for ragged sizes: tiles of 5461 rows took 6x) */
static int even_tile(int n, int most, int mult) {
    const int nt = (n + most - 1) / most, even = (n + nt - 1) / nt, up = (even + mult - 1) / mult * mult;
    return up <= most ? up : even;
}

static void qmatmul_blas(cuda_ctx *c, float *y, const g3n_mat *W, const float *x, int rows) {
    const int O = W->rows, K = W->cols;
    const float one = 1.0f, zero = 0.0f;
    const char *f32 = getenv("G3N_QBLAS_F32"); /* 1: the f32 products (tests, timing; read per call) */
    const __nv_bfloat16 *xs = f32 && atoi(f32) ? NULL : cuda_split_bf16(c, x, rows, K);
    if (!xs) { /* tiles of W's rows in f32 */
        const int tile = (int)G3N_MIN((size_t)O, c->qscratch_n / (size_t)K);
        G3N_ASSERT(tile > 0);
        for (int o0 = 0; o0 < O; o0 += tile) {
            const int nr = G3N_MIN(tile, O - o0);
            const size_t n = (size_t)nr * K;
            launch(c, k_dequant, dim3((unsigned)G3N_MIN((n + 255) / 256, (size_t)8192)), dim3(256), 0, c->qscratch,
                   (const uint32_t *)W->data, W->scales, W->biases, W->sdtype, W->bits, W->group_size, K, o0, nr);
            CUDA_LAUNCHED();
            /* y[:, o0:o0+nr] (column-major nr x rows, ldc O) = tile^T' x^T */
            BLAS_CHECK(cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, nr, rows, K, &one, c->qscratch, CUDA_R_32F, K,
                                    x, CUDA_R_32F, K, &zero, y + o0, CUDA_R_32F, O, CUBLAS_COMPUTE_32F,
                                    CUBLAS_GEMM_DEFAULT));
        }
        return;
    }
    /* Three bf16 parts of a tile of W in the scratch: tiles of rows for tall
     * matrices, of columns (whole groups; the products add into y) for wide ones,
     * so that each product has all of the wider side: a 512-row tile of the
     * 2048 x 16384 down matrix left most SMs idle (1.4x slower than by columns). */
    const size_t cap = c->qscratch_n * 2 / 3; /* weights a tile */
    const int by_cols = K > O && cap / (size_t)O >= (size_t)W->group_size;
    const int tr = by_cols ? O : even_tile(O, (int)G3N_MIN((size_t)O, cap / (size_t)K), 128);
    const int tc = by_cols ? even_tile(K / W->group_size, (int)(cap / (size_t)O / W->group_size), 1) * W->group_size : K;
    G3N_ASSERT(tr > 0 && tc > 0);
    __nv_bfloat16 *P = (__nv_bfloat16 *)c->qscratch;
    for (int o0 = 0; o0 < O; o0 += tr)
        for (int k0 = 0; k0 < K; k0 += tc) {
            const int nr = G3N_MIN(tr, O - o0), nc = G3N_MIN(tc, K - k0);
            const size_t n = (size_t)nr * nc;
            launch(c, k_dequant_bf16x3, dim3((unsigned)G3N_MIN((n + 255) / 256, (size_t)8192)), dim3(256), 0, P, n,
                   (const uint32_t *)W->data, W->scales, W->biases, W->sdtype, W->bits, W->group_size, K, o0, nr, k0,
                   nc);
            CUDA_LAUNCHED();
            /* weight part a[i] times activation part b[i]; activation part p of row r at
             * xs + (3 r + p) K: a column stride of 3 K */
            static const int a[6] = {0, 0, 1, 0, 1, 2}, b[6] = {0, 1, 0, 2, 1, 0};
            for (int i = 0; i < 6; i++)
                BLAS_CHECK(cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, nr, rows, nc, &one, P + a[i] * n,
                                        CUDA_R_16BF, nc, xs + (size_t)b[i] * K + k0, CUDA_R_16BF, 3 * K,
                                        i || k0 ? &one : &zero, y + o0, CUDA_R_32F, O, CUBLAS_COMPUTE_32F,
                                        CUBLAS_GEMM_DEFAULT));
        }
}

/* ---- entry points ------------------------------------------------------------------------ */

void cuda_quant_matmul(cuda_ctx *c, float *y, const g3n_mat *W, const float *x, int rows) {
    if (rows <= 0 || W->rows <= 0) return;
    PROF_BEGIN(c);
    if (rows > QDECODE_ROWS && c->qscratch) qmatmul_blas(c, y, W, x, rows);
    else qmulti_rows(c, 1, &W, &y, &x, rows, QPLAIN, NULL);
    if (c->profile) {
        char name[48];
        snprintf(name, sizeof name, "qmatmul q%d %dx%d r%d", W->bits, W->rows, W->cols, rows);
        PROF_END(c, name, (double)g3n_mat_bytes(W));
    }
}

/* matmul_parts (backend.h) for a quantized W: one-row-sized steps only */
int cuda_quant_matmul_parts(cuda_ctx *c, float *y, const g3n_mat *W, const float *x, int rows, int cap) {
    if (rows <= 0 || W->rows <= 0) return 1;
    if (rows > 8 || cap < 2) {
        cuda_quant_matmul(c, y, W, x, rows);
        return 1;
    }
    PROF_BEGIN(c);
    const int parts = qmulti(c, 1, &W, &y, &x, rows, QPLAIN, NULL, cap);
    if (c->profile) {
        char name[64];
        snprintf(name, sizeof name, "qmatmul_parts q%d %dx%d r%d: %d", W->bits, W->rows, W->cols, rows, parts);
        PROF_END(c, name, (double)g3n_mat_bytes(W));
    }
    return parts;
}

void cuda_quant_op_multi(g3n_backend *be, int n, const g3n_mat *const *W, float *const *y, const float *const *x,
                         int rows) {
    cuda_ctx *c = CTX(be);
    int ok = n <= QMAX && rows <= QDECODE_ROWS;
    for (int i = 0; i < n && ok; i++) ok = W[i]->bits == W[0]->bits;
    if (!ok) {
        for (int i = 0; i < n; i++) cuda_op_matmul(be, y[i], W[i], x[i], rows);
        return;
    }
    PROF_BEGIN(c);
    qmulti_rows(c, n, W, y, x, rows, QPLAIN, NULL);
    PROF_END(c, "qmatmul_multi", 0);
}

void cuda_quant_op_gelu_mul(g3n_backend *be, float *y, const g3n_mat *W, const float *x, const float *m, int rows) {
    cuda_ctx *c = CTX(be);
    if (rows > QDECODE_ROWS) {
        cuda_op_matmul(be, y, W, x, rows);
        cuda_op_gelu_mul(be, y, y, m, (size_t)rows * W->rows);
        return;
    }
    PROF_BEGIN(c);
    qmulti_rows(c, 1, &W, &y, &x, rows, QGELU_MUL, m);
    PROF_END(c, "qmatmul_gelu_mul", (double)g3n_mat_bytes(W));
}

void cuda_quant_op_gate_up(g3n_backend *be, float *act, float *up, const g3n_mat *Wg, const g3n_mat *Wu,
                           const float *x, int rows) {
    cuda_ctx *c = CTX(be);
    if (rows > QDECODE_ROWS || Wg->bits != Wu->bits || Wg->rows != Wu->rows || Wg->cols != Wu->cols) {
        cuda_op_matmul(be, act, Wg, x, rows);
        cuda_op_matmul(be, up, Wu, x, rows);
        cuda_op_gelu_mul(be, act, act, up, (size_t)rows * Wg->rows);
        return;
    }
    PROF_BEGIN(c);
    const g3n_mat *W[2] = {Wg, Wu};
    float *y[2] = {act, NULL};
    const float *xs[2] = {x, x};
    qmulti_rows(c, 2, W, y, xs, rows, QGATE_UP, NULL);
    PROF_END(c, "qmatmul_gate_up", 2.0 * (double)g3n_mat_bytes(Wg));
}

__global__ void k_qembed(float *y, const uint32_t *W, const void *S, const void *B, int sdt, int bits, int group,
                         int rows, int cols, const int32_t *ids, float scale) {
    KERNEL_BEGIN();
    const int t = blockIdx.y;
    int id = ids[t];
    if (id < 0 || id >= rows) id = 0;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < cols; i += gridDim.x * blockDim.x)
        y[(size_t)t * cols + i] = qdeq(W, S, B, sdt, bits, group, cols, (size_t)id, i) * scale;
}

void cuda_quant_embed(cuda_ctx *c, float *y, const g3n_mat *W, float scale) {
    const unsigned gx = (unsigned)G3N_MIN(((size_t)W->cols + 255) / 256, (size_t)64);
    PROF_BEGIN(c);
    launch(c, k_qembed, dim3(gx, (unsigned)c->n_tokens), dim3(256), 0, y, (const uint32_t *)W->data, W->scales,
           W->biases, W->sdtype, W->bits, W->group_size, W->rows, W->cols, d_ids(c), scale);
    CUDA_LAUNCHED();
    PROF_END(c, "qembed", 0);
}

/* ---- upload -------------------------------------------------------------------------------- */

/* A copy on the device, zero-padded to a multiple of 16 bytes: the decode kernels
 * copy scales and biases in aligned 4-byte words, and the word holding the last
 * 16-bit value of an odd count reaches 2 bytes past it. */
static void *upload(cuda_ctx *c, const void *src, size_t bytes) {
    void *d = NULL;
    const size_t alloc = bytes ? (bytes + 15) / 16 * 16 : 256;
    if (cudaMalloc(&d, alloc) != cudaSuccess) return NULL;
    if (alloc > bytes) CUDA_CHECK(cudaMemsetAsync((char *)d + bytes, 0, alloc - bytes, c->stream));
    cuda_copy_wait(c, d, src, bytes, cudaMemcpyHostToDevice);
    cuda_own(c, d);
    return d;
}

int cuda_quant_prepare(cuda_ctx *c, g3n_mat *m, char *err, size_t errlen) {
    if (!m->data) return 0;
    if (m->host_gather && !c->ple_on_gpu) { /* rows staged as stored, dequantized on the GPU */
        if (c->n_tables == CUDA_MAX_HOST_GATHER)
            return g3n_err(err, errlen, "%s: too many host-resident tables", m->name);
        cuda_host_table *t = &c->tables[c->n_tables++];
        memset(t, 0, sizeof(*t));
        t->host = m->data;
        t->qm = *m;
        t->cols = m->cols;
        t->rows = m->rows;
        t->q_words = g3n_quant_row_words(m->cols, m->bits) * 4;
        t->q_groups = (size_t)(m->cols / m->group_size) * g3n_dtype_size((g3n_dtype)m->sdtype);
        t->row_bytes = (t->q_words + 2 * t->q_groups + 15) / 16 * 16;
        return 0;
    }
    if (m->row_kernel) { /* small, read inside fused kernels: exact f32 copy */
        float *h = (float *)g3n_malloc(sizeof(float) * (size_t)m->rows * m->cols);
        for (int r = 0; r < m->rows; r++) g3n_mat_row(m, r, h + (size_t)r * m->cols);
        void *d = upload(c, h, sizeof(float) * (size_t)m->rows * m->cols);
        free(h);
        if (!d) return g3n_err(err, errlen, "%s: out of GPU memory", m->name);
        m->data = d, m->dtype = G3N_F32, m->bits = 0, m->scales = m->biases = NULL;
        if (m->cols > c->max_cols) c->max_cols = m->cols;
        return 0;
    }
    const size_t pb = (size_t)m->rows * ((size_t)m->cols * m->bits / 32) * 4;
    const size_t sb = (size_t)m->rows * (size_t)(m->cols / m->group_size) * g3n_dtype_size((g3n_dtype)m->sdtype);
    void *d = upload(c, m->data, pb), *s = d ? upload(c, m->scales, sb) : NULL, *b = s ? upload(c, m->biases, sb) : NULL;
    if (!b) {
        size_t fr = 0, tot = 0;
        cudaMemGetInfo(&fr, &tot);
        return g3n_err(err, errlen, "%s: out of GPU memory (%.2f GB free)", m->name, fr / 1e9);
    }
    m->data = d, m->scales = s, m->biases = b;
    m->transposed = 0;
    if (m->sparse_cols && m->rows % 8 == 0) {
        /* exact sparsity reads columns: keep W^T beside the packed rows, which
         * dense products (prompts) still use: the codes, scales and biases
         * transposed (cuda_qtranspose), or else dequantized to f32 (the values
         * the reference multiplies) */
        void *t = cuda_qtranspose(c, m);
        if (!t) {
            float *tmp = NULL;
            const size_t n = (size_t)m->rows * m->cols;
            if (cudaMalloc((void **)&tmp, n * sizeof(float)) != cudaSuccess)
                return g3n_err(err, errlen, "%s: out of GPU memory (exact sparsity)", m->name);
            launch(c, k_dequant, dim3((unsigned)G3N_MIN((n + 255) / 256, (size_t)65535)), dim3(256), 0, tmp,
                   (const uint32_t *)d, (const void *)s, (const void *)b, m->sdtype, m->bits, m->group_size, m->cols, 0,
                   m->rows);
            CUDA_LAUNCHED();
            t = cuda_transpose_matrix(c, tmp, m->rows, m->cols, sizeof(float));
            CUDA_CHECK(cudaFree(tmp));
        }
        cuda_own(c, t);
        m->tdata = t;
        cuda_sparse_reserve(c, m->rows, m->cols);
    }
    if (m->cols > c->max_cols) c->max_cols = m->cols;
    const size_t want = G3N_MIN((size_t)m->rows * m->cols, QSCRATCH_MAX);
    if (want > c->qscratch_n) {
        if (c->qscratch) CUDA_CHECK(cudaFree(c->qscratch));
        c->qscratch = NULL;
        if (cudaMalloc((void **)&c->qscratch, want * sizeof(float)) != cudaSuccess)
            return g3n_err(err, errlen, "%s: out of GPU memory (prompt scratch)", m->name);
        c->qscratch_n = want;
    }
    return 0;
}

/* Row r of a quantized host table into a staging slot, as stored (cuda_host_table) */
void cuda_quant_host_row(const cuda_host_table *t, int r, void *slot) {
    const g3n_mat *m = &t->qm;
    char *o = (char *)slot;
    memcpy(o, (const char *)m->data + (size_t)r * t->q_words, t->q_words);
    memcpy(o + t->q_words, (const char *)m->scales + (size_t)r * t->q_groups, t->q_groups);
    memcpy(o + t->q_words + t->q_groups, (const char *)m->biases + (size_t)r * t->q_groups, t->q_groups);
}

/* Staged rows of a quantized host table (one a token, as cuda_quant_host_row
 * put them) dequantized as the reference does: y[t] = row * scale */
__global__ void k_qembed_staged(float *y, const char *stage, size_t row_bytes, size_t q_words, size_t q_groups,
                                int sdt, int bits, int group, int cols, float scale) {
    KERNEL_BEGIN();
    const int t = blockIdx.y;
    const char *s = stage + (size_t)t * row_bytes;
    const uint32_t *W = (const uint32_t *)s;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < cols; i += gridDim.x * blockDim.x)
        y[(size_t)t * cols + i] = qdeq(W, s + q_words, s + q_words + q_groups, sdt, bits, group, cols, 0, i) * scale;
}

void cuda_quant_embed_staged(cuda_ctx *c, float *y, const cuda_host_table *t, const void *stage, float scale) {
    const unsigned gx = (unsigned)G3N_MIN(((size_t)t->cols + 255) / 256, (size_t)64);
    launch(c, k_qembed_staged, dim3(gx, (unsigned)c->n_tokens), dim3(256), 0, y, (const char *)stage, t->row_bytes,
           t->q_words, t->q_groups, t->qm.sdtype, t->qm.bits, t->qm.group_size, t->cols, scale);
    CUDA_LAUNCHED();
}
