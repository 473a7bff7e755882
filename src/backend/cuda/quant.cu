/* quant.cu: mlx affine-quantized weights on the GPU (src/core/quant.h has the
 * format): upload, decode GEMV with the same epilogues as gemv.cu, prompt-sized
 * products, embedding rows.
 *
 * Decode (up to 8 rows): each lane takes chunks of 32 weights (`bits` u32 words:
 * one 16-byte load at 4 bits, two at 8), several in flight, loaded before the PDL
 * wait like gemv.cu. A chunk lies inside one group, so its contribution is
 * scale * sum(q * x) + bias * sum(x): the dequantized weight is never formed and
 * the result differs from the reference (fp32 s*q + b, then the dot) only in
 * rounding. `wpr` warps share a long row; partial sums are added in a fixed order.
 * 4 and 8 bits use k_qgemv_t (4 output rows per warp, unpacking without
 * int->float conversion, below) for 1-8 rows at once; G3N_QGEMV=old selects this
 * one-row-per-warp k_qgemv instead (A/B timing). 2, 3, 5 and 6 bits run the
 * one-row kernel once per row (correct, slower).
 * Prompt-sized products: tiles of rows dequantized to f32 (exactly the
 * reference's weights) and multiplied by cuBLAS in f32.
 * Matrices read element by element inside fused row kernels (the AltUp router)
 * are dequantized to f32 at upload; host-resident gather tables (PLE) stay
 * quantized in host memory and the step's rows are dequantized when staged. */
#include "cuda_common.cuh"

#define QMAX 8
#define QRPW 4 /* k_qgemv_t: output rows per warp */
#define QSCRATCH_MAX ((size_t)16 << 20) /* floats of dequantized tile for prompts (64 MB) */

typedef struct {
    const uint32_t *W[QMAX];
    const void *S[QMAX], *B[QMAX];
    float *y[QMAX];
    const float *x[QMAX];
    int O[QMAX], K[QMAX], G[QMAX], sdt[QMAX];
    int row0[QMAX + 1];
    int tile0[QMAX + 1]; /* k_qgemv_t: first global tile (QRPW rows) of each product */
    int n, wpr, mode; /* mode: QPLAIN, QGELU_MUL (y = gelu(W.x) * m), QGATE_UP (y0 = gelu(W0.x) * W1.x) */
    const float *m;
} qargs;

enum { QPLAIN = 0, QGELU_MUL = 1, QGATE_UP = 2 };

/* 32 weights: `bits` words, loaded as wide as alignment allows (rows start on
 * 16-byte boundaries for 4 and 8 bits: K % 32 == 0). */
template <int BITS> struct qchunk { uint32_t w[BITS]; };

template <int BITS> __device__ __forceinline__ void qload(qchunk<BITS> &q, const uint32_t *p) {
    if (BITS % 4 == 0) {
#pragma unroll
        for (int i = 0; i < BITS / 4; i++) {
            const uint4 v = __ldcs((const uint4 *)p + i);
            q.w[4 * i] = v.x, q.w[4 * i + 1] = v.y, q.w[4 * i + 2] = v.z, q.w[4 * i + 3] = v.w;
        }
    } else if (BITS == 2) {
        const uint2 v = __ldcs((const uint2 *)p);
        q.w[0] = v.x, q.w[1] = v.y;
    } else {
#pragma unroll
        for (int i = 0; i < BITS; i++) q.w[i] = __ldcs(p + i);
    }
}

/* element j (0..31) of a chunk: bits [j*BITS, (j+1)*BITS) of the little-endian stream */
template <int BITS> __device__ __forceinline__ float qget(const qchunk<BITS> &q, int j) {
    const int p = j * BITS, w = p >> 5, off = p & 31;
    uint32_t v = q.w[w] >> off;
    if (off + BITS > 32) v |= q.w[w + 1] << (32 - off);
    return (float)(v & ((1u << BITS) - 1u));
}

/* chunk ch of a row: its words and its group's scale and bias */
template <int BITS>
__device__ __forceinline__ void qfetch(qchunk<BITS> &q, float &sc, float &bi, const uint32_t *w, const void *S,
                                       const void *B, int sdt, size_t g0, int G, int ch) {
    qload<BITS>(q, w + (size_t)ch * BITS);
    sc = load_w(S, sdt, g0 + (size_t)ch * 32 / G);
    bi = load_w(B, sdt, g0 + (size_t)ch * 32 / G);
}

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

/* ---- decode GEMV at 4 and 8 bits: QRPW rows per warp -------------------------------------
 *
 * k_qgemv_t: a warp computes a tile of QRPW consecutive output rows of one
 * product (the last tile of a product repeats its last row, not stored), so each
 * activation float4 a lane loads serves QRPW rows. A lane takes chunks of 32
 * weights (16 bytes at 4 bits, 32 at 8), U chunk positions x QRPW rows = 8
 * 16-byte loads, all issued before the PDL wait. `wpr` warps share a tile's
 * chunk positions; partials are added in a fixed order.
 *
 * Unpacking without int->float conversion: a field masked in place,
 * n = q << (b*e) with n < 2^24, read as a float is exactly n * 2^-149 (a
 * subnormal, or the first normal binade, where the value is linear in the
 * bits). The activation it multiplies is pre-scaled by 2^(64 - b*e), so every
 * product is q * x * 2^-85, and the chunk's dot is dq * 2^85: one LOP3 (plus a
 * shift per word) and one FFMA per weight. The FFMA is non-FTZ PTX (fma.rn.f32)
 * so subnormal operands are kept whatever the build flags; exactness needs
 * |x| < 2^64 (no overflow of the pre-scaled x), and products |q*x| < 2^-41 lose
 * only absolute precision (< 2^-65 each). 4 bits: nibbles 0-3 of a word in
 * place, 4-7 after >> 16 (x scales 2^64, 2^60, 2^56, 2^52); 8 bits: bytes 0-2
 * in place, byte 3 after >> 8 into bits 16-23 (2^64, 2^56, 2^48, 2^48). */

__device__ __forceinline__ float qfma(float a, float b, float c) {
    float d;
    asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(d) : "f"(a), "f"(b), "f"(c));
    return d;
}

__device__ __forceinline__ uint32_t u4word(const uint4 &v, int j) {
    return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

/* chunk position ch of the tile's rows: words (BITS u32 = BITS/4 uint4), scale, bias */
template <int BITS>
__device__ __forceinline__ void qfetch_t(uint4 (&q)[QRPW][BITS / 4], float (&sc)[QRPW], float (&bi)[QRPW],
                                         const uint32_t *W, const void *S, const void *B, int sdt,
                                         const int (&rowi)[QRPW], size_t wstride, int gpr, int G, int ch) {
#pragma unroll
    for (int i = 0; i < QRPW; i++) {
        const uint4 *p = (const uint4 *)(W + (size_t)rowi[i] * wstride + (size_t)ch * BITS);
#pragma unroll
        for (int j = 0; j < BITS / 4; j++) q[i][j] = __ldcs(p + j);
        const size_t g = (size_t)rowi[i] * gpr + (size_t)ch * 32 / G;
        sc[i] = load_w(S, sdt, g);
        bi[i] = load_w(B, sdt, g);
    }
}

/* acc[i][r] += row i's chunk ch . x[r] chunk ch, for the tile's QRPW rows. Per
 * float4 of the chunk: unpack its 4 elements of every row once, then apply them
 * to every activation row. */
template <int BITS, int R>
__device__ __forceinline__ void qdot_t(float (&acc)[QRPW][R], const uint4 (&q)[QRPW][BITS / 4],
                                       const float (&sc)[QRPW], const float (&bi)[QRPW], const float *x, int K,
                                       int ch) {
    const float4 *xp = (const float4 *)(x + (size_t)ch * 32);
    const size_t xs = (size_t)K / 4; /* float4s per activation row */
    float dq[QRPW][R], dx[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        dx[r] = 0;
#pragma unroll
        for (int i = 0; i < QRPW; i++) dq[i][r] = 0;
    }
#pragma unroll
    for (int k = 0; k < 8; k++) { /* elements 4k .. 4k+3 of the chunk */
        float f[QRPW][4];
#pragma unroll
        for (int i = 0; i < QRPW; i++) {
            if (BITS == 4) { /* word k/2, nibbles 4(k&1) .. 4(k&1)+3 */
                const uint32_t wd = u4word(q[i][0], k >> 1), t = (k & 1) ? wd >> 16 : wd;
                f[i][0] = __uint_as_float(t & 0xFu), f[i][1] = __uint_as_float(t & 0xF0u);
                f[i][2] = __uint_as_float(t & 0xF00u), f[i][3] = __uint_as_float(t & 0xF000u);
            } else { /* word k, bytes 0..3 */
                const uint32_t wd = u4word(q[i][k >> 2], k & 3);
                f[i][0] = __uint_as_float(wd & 0xFFu), f[i][1] = __uint_as_float(wd & 0xFF00u);
                f[i][2] = __uint_as_float(wd & 0xFF0000u), f[i][3] = __uint_as_float((wd >> 8) & 0xFF0000u);
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            const float4 v = __ldg(xp + r * xs + k);
            dx[r] += (v.x + v.y) + (v.z + v.w);
            const float x0 = v.x * 0x1p64f, x1 = v.y * (BITS == 4 ? 0x1p60f : 0x1p56f),
                        x2 = v.z * (BITS == 4 ? 0x1p56f : 0x1p48f), x3 = v.w * (BITS == 4 ? 0x1p52f : 0x1p48f);
#pragma unroll
            for (int i = 0; i < QRPW; i++) {
                dq[i][r] = qfma(f[i][0], x0, dq[i][r]);
                dq[i][r] = qfma(f[i][1], x1, dq[i][r]);
                dq[i][r] = qfma(f[i][2], x2, dq[i][r]);
                dq[i][r] = qfma(f[i][3], x3, dq[i][r]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < QRPW; i++)
#pragma unroll
        for (int r = 0; r < R; r++) acc[i][r] += sc[i] * (dq[i][r] * 0x1p85f) + bi[i] * dx[r];
}

/* Block = 8 warps = 8 / wpr tiles. QGATE_UP (wpr <= 4): the first half of the
 * tiles are gate tiles, the second half the same up tiles. */
template <int BITS, int R>
__global__ void __launch_bounds__(256, R <= 2 ? 2 : 1) k_qgemv_t(qargs a) {
    constexpr int U = BITS == 4 ? 2 : 1; /* chunk positions per lane per batch: 8 loads of 16 bytes */
    __shared__ float part[8][QRPW * R];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wpr = a.wpr;
    const int T = 8 / wpr, tb = warp / wpr, sub = warp % wpr;
    int s = 0, tile = 0;
    bool valid;
    if (a.mode == QGATE_UP) {
        const int half = T / 2;
        s = tb < half ? 0 : 1;
        tile = blockIdx.x * half + tb % half;
        valid = tile < a.tile0[1];
    } else {
        const int gt = blockIdx.x * T + tb;
        valid = gt < a.tile0[a.n];
        if (valid) {
            while (gt >= a.tile0[s + 1]) s++;
            tile = gt - a.tile0[s];
        }
    }
    if (!valid) s = 0, tile = 0;
    const int K = a.K[s], G = a.G[s], O = a.O[s], sdt = a.sdt[s];
    const int nc = valid ? K / 32 : 0, step = 32 * wpr, gpr = K / G;
    const size_t wstride = (size_t)(K / 32) * BITS; /* u32 words per row */
    int rowi[QRPW];
#pragma unroll
    for (int i = 0; i < QRPW; i++) rowi[i] = min(tile * QRPW + i, O - 1);
    const uint32_t *W = a.W[s];
    const void *S = a.S[s], *B = a.B[s];
    const float *x = a.x[s];
    float acc[QRPW][R];
#pragma unroll
    for (int i = 0; i < QRPW; i++)
#pragma unroll
        for (int r = 0; r < R; r++) acc[i][r] = 0;
    uint4 q[U][QRPW][BITS / 4];
    float sc[U][QRPW], bi[U][QRPW];
    int c = sub * 32 + lane;
#pragma unroll
    for (int u = 0; u < U; u++)
        if (c + u * step < nc) qfetch_t<BITS>(q[u], sc[u], bi[u], W, S, B, sdt, rowi, wstride, gpr, G, c + u * step);
    KERNEL_BEGIN();
    for (;;) {
#pragma unroll
        for (int u = 0; u < U; u++)
            if (c + u * step < nc) qdot_t<BITS, R>(acc, q[u], sc[u], bi[u], x, K, c + u * step);
        c += U * step;
        if (c >= nc) break;
#pragma unroll
        for (int u = 0; u < U; u++)
            if (c + u * step < nc)
                qfetch_t<BITS>(q[u], sc[u], bi[u], W, S, B, sdt, rowi, wstride, gpr, G, c + u * step);
    }
#pragma unroll
    for (int i = 0; i < QRPW; i++)
#pragma unroll
        for (int r = 0; r < R; r++) acc[i][r] = warp_sum(acc[i][r]);
    if (lane == 0)
#pragma unroll
        for (int i = 0; i < QRPW; i++)
#pragma unroll
            for (int r = 0; r < R; r++) part[warp][r * QRPW + i] = acc[i][r];
    __syncthreads();
    /* thread t: row i of activation row r of the block's tile ob */
    constexpr int PER = QRPW * R;
    const int t = threadIdx.x, i = t % QRPW, r = (t / QRPW) % R, ob = t / PER, pi = r * QRPW + i;
    if (a.mode == QGATE_UP) {
        const int half = T / 2, tile2 = blockIdx.x * half + ob, row = tile2 * QRPW + i;
        if (ob < half && tile2 < a.tile0[1] && row < a.O[0]) {
            float g = 0, u = 0;
            for (int k = 0; k < wpr; k++) g += part[ob * wpr + k][pi], u += part[(ob + half) * wpr + k][pi];
            a.y[0][(size_t)r * a.O[0] + row] = gelu_tanh_d(g) * u;
        }
        return;
    }
    const int gt = blockIdx.x * T + ob;
    if (ob < T && gt < a.tile0[a.n]) {
        int s2 = 0;
        while (gt >= a.tile0[s2 + 1]) s2++;
        const int row = (gt - a.tile0[s2]) * QRPW + i;
        if (row < a.O[s2]) {
            float v = 0;
            for (int k = 0; k < wpr; k++) v += part[ob * wpr + k][pi];
            const size_t o = (size_t)r * a.O[s2] + row;
            a.y[s2][o] = a.mode == QGELU_MUL ? gelu_tanh_d(v) * a.m[o] : v;
        }
    }
}

template <int BITS>
static void qlaunch_t(cuda_ctx *c, qargs &a, int R) {
    for (int i = 0; i < a.n; i++) a.tile0[i + 1] = a.tile0[i] + (a.O[i] + QRPW - 1) / QRPW;
    /* warps per tile: enough that a lane's chunk positions are one batch (U);
     * then more while the GPU has few warps (~2K) and each lane keeps >= 1 position */
    const int U = BITS == 4 ? 2 : 1, cap = a.mode == QGATE_UP ? 4 : 8;
    int max_np = 0, min_np = 1 << 30;
    for (int i = 0; i < a.n; i++) max_np = G3N_MAX(max_np, a.K[i] / 32), min_np = G3N_MIN(min_np, a.K[i] / 32);
    a.wpr = 1;
    while (a.wpr < cap && (max_np + 32 * a.wpr - 1) / (32 * a.wpr) > U) a.wpr *= 2;
    while (a.wpr < cap && (size_t)a.tile0[a.n] * a.wpr < 2048 && min_np >= 64 * a.wpr) a.wpr *= 2;
    const int T = 8 / a.wpr;
    const dim3 grid(a.mode == QGATE_UP ? (unsigned)((a.tile0[1] + T / 2 - 1) / (T / 2))
                                       : (unsigned)((a.tile0[a.n] + T - 1) / T));
#define L(r) launch(c, k_qgemv_t<BITS, r>, grid, 256, 0, a)
    ROWS_SWITCH(R, L)
#undef L
    CUDA_LAUNCHED();
}

/* G3N_QGEMV=old: the one-row-per-warp kernel (k_qgemv) at 4 and 8 bits too, for A/B timing */
static int qgemv_old(void) {
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("G3N_QGEMV");
        v = e && strcmp(e, "old") == 0;
    }
    return v;
}

/* n products of quantized matrices with equal bits, rows <= 8, in one launch per row set. */
static void qmulti(cuda_ctx *c, int n, const g3n_mat *const *W, float *const *y, const float *const *x, int rows,
                   int mode, const float *m) {
    qargs a;
    memset(&a, 0, sizeof a);
    a.n = n, a.mode = mode, a.m = m;
    int min_k = 1 << 30;
    for (int i = 0; i < n; i++) {
        a.W[i] = (const uint32_t *)W[i]->data, a.S[i] = W[i]->scales, a.B[i] = W[i]->biases;
        a.y[i] = y[i], a.x[i] = x[i], a.O[i] = W[i]->rows, a.K[i] = W[i]->cols;
        a.G[i] = W[i]->group_size, a.sdt[i] = W[i]->sdtype;
        a.row0[i + 1] = a.row0[i] + W[i]->rows;
        min_k = G3N_MIN(min_k, W[i]->cols);
    }
    if ((W[0]->bits == 4 || W[0]->bits == 8) && !qgemv_old()) {
        if (W[0]->bits == 4) qlaunch_t<4>(c, a, rows);
        else qlaunch_t<8>(c, a, rows);
        return;
    }
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
}

/* ---- prompt-sized products: dequantized tiles, cuBLAS f32 ------------------------------ */

__global__ void k_dequant(float *out, const uint32_t *W, const void *S, const void *B, int sdt, int bits, int group,
                          int K, int r0, int nr) {
    KERNEL_BEGIN();
    const size_t n = (size_t)nr * K, words = (size_t)K * bits / 32;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = (size_t)r0 + i / K;
        const int col = (int)(i % K);
        const uint32_t *row = W + r * words;
        const size_t p = (size_t)col * bits;
        uint64_t v = row[p >> 5];
        if ((p & 31) + bits > 32) v |= (uint64_t)row[(p >> 5) + 1] << 32;
        const float q = (float)((uint32_t)(v >> (p & 31)) & ((1u << bits) - 1u));
        const size_t g = r * (size_t)(K / group) + col / group;
        out[i] = __fadd_rn(__fmul_rn(load_w(S, sdt, g), q), load_w(B, sdt, g)); /* g3n_quant_w */
    }
}

static void qmatmul_blas(cuda_ctx *c, float *y, const g3n_mat *W, const float *x, int rows) {
    const int O = W->rows, K = W->cols;
    const int tile = (int)G3N_MIN((size_t)O, c->qscratch_n / (size_t)K);
    G3N_ASSERT(tile > 0);
    const float one = 1.0f, zero = 0.0f;
    for (int o0 = 0; o0 < O; o0 += tile) {
        const int nr = G3N_MIN(tile, O - o0);
        const size_t n = (size_t)nr * K;
        launch(c, k_dequant, dim3((unsigned)G3N_MIN((n + 255) / 256, (size_t)8192)), dim3(256), 0, c->qscratch,
               (const uint32_t *)W->data, W->scales, W->biases, W->sdtype, W->bits, W->group_size, K, o0, nr);
        CUDA_LAUNCHED();
        /* y[:, o0:o0+nr] (column-major nr x rows, ldc O) = tile^T' x^T */
        cublasStatus_t st = cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, nr, rows, K, &one, c->qscratch, CUDA_R_32F,
                                         K, x, CUDA_R_32F, K, &zero, y + o0, CUDA_R_32F, O, CUBLAS_COMPUTE_32F,
                                         CUBLAS_GEMM_DEFAULT);
        if (st != CUBLAS_STATUS_SUCCESS) {
            fprintf(stderr, "g3n: cuBLAS error %d (quantized prompt product)\n", (int)st);
            abort();
        }
    }
}

/* ---- entry points ------------------------------------------------------------------------ */

void cuda_quant_matmul(cuda_ctx *c, float *y, const g3n_mat *W, const float *x, int rows) {
    if (rows <= 0 || W->rows <= 0) return;
    PROF_BEGIN(c);
    if (rows > 8 && c->qscratch) qmatmul_blas(c, y, W, x, rows);
    else
        for (int r0 = 0; r0 < rows; r0 += 8) {
            float *yy = y + (size_t)r0 * W->rows;
            const float *xx = x + (size_t)r0 * W->cols;
            qmulti(c, 1, &W, &yy, &xx, G3N_MIN(rows - r0, 8), QPLAIN, NULL);
        }
    if (c->profile) {
        char name[48];
        snprintf(name, sizeof name, "qmatmul q%d %dx%d r%d", W->bits, W->rows, W->cols, rows);
        PROF_END(c, name, (double)g3n_mat_bytes(W));
    }
}

void cuda_quant_op_multi(g3n_backend *be, int n, const g3n_mat *const *W, float *const *y, const float *const *x,
                         int rows) {
    cuda_ctx *c = CTX(be);
    int ok = n <= QMAX && rows <= 8;
    for (int i = 0; i < n && ok; i++) ok = W[i]->bits == W[0]->bits;
    if (!ok) {
        for (int i = 0; i < n; i++) cuda_op_matmul(be, y[i], W[i], x[i], rows);
        return;
    }
    PROF_BEGIN(c);
    qmulti(c, n, W, y, x, rows, QPLAIN, NULL);
    PROF_END(c, "qmatmul_multi", 0);
}

void cuda_quant_op_gelu_mul(g3n_backend *be, float *y, const g3n_mat *W, const float *x, const float *m, int rows) {
    cuda_ctx *c = CTX(be);
    if (rows > 8) {
        cuda_op_matmul(be, y, W, x, rows);
        cuda_op_gelu_mul(be, y, y, m, (size_t)rows * W->rows);
        return;
    }
    PROF_BEGIN(c);
    qmulti(c, 1, &W, &y, &x, rows, QGELU_MUL, m);
    PROF_END(c, "qmatmul_gelu_mul", (double)g3n_mat_bytes(W));
}

void cuda_quant_op_gate_up(g3n_backend *be, float *act, float *up, const g3n_mat *Wg, const g3n_mat *Wu,
                           const float *x, int rows) {
    cuda_ctx *c = CTX(be);
    if (rows > 8 || Wg->bits != Wu->bits || Wg->rows != Wu->rows || Wg->cols != Wu->cols) {
        cuda_op_matmul(be, act, Wg, x, rows);
        cuda_op_matmul(be, up, Wu, x, rows);
        cuda_op_gelu_mul(be, act, act, up, (size_t)rows * Wg->rows);
        return;
    }
    PROF_BEGIN(c);
    const g3n_mat *W[2] = {Wg, Wu};
    float *y[2] = {act, NULL};
    const float *xs[2] = {x, x};
    qmulti(c, 2, W, y, xs, rows, QGATE_UP, NULL);
    PROF_END(c, "qmatmul_gate_up", 2.0 * (double)g3n_mat_bytes(Wg));
}

__global__ void k_qembed(float *y, const uint32_t *W, const void *S, const void *B, int sdt, int bits, int group,
                         int rows, int cols, const int32_t *ids, float scale) {
    KERNEL_BEGIN();
    const int t = blockIdx.y;
    int id = ids[t];
    if (id < 0 || id >= rows) id = 0;
    const uint32_t *row = W + (size_t)id * ((size_t)cols * bits / 32);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < cols; i += gridDim.x * blockDim.x) {
        const size_t p = (size_t)i * bits;
        uint64_t v = row[p >> 5];
        if ((p & 31) + bits > 32) v |= (uint64_t)row[(p >> 5) + 1] << 32;
        const float q = (float)((uint32_t)(v >> (p & 31)) & ((1u << bits) - 1u));
        const size_t g = (size_t)id * (size_t)(cols / group) + i / group;
        y[(size_t)t * cols + i] = __fadd_rn(__fmul_rn(load_w(S, sdt, g), q), load_w(B, sdt, g)) * scale;
    }
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

static void *upload(cuda_ctx *c, const void *src, size_t bytes) {
    void *d = NULL;
    if (cudaMalloc(&d, bytes ? bytes : 256) != cudaSuccess) return NULL;
    CUDA_CHECK(cudaMemcpy(d, src, bytes, cudaMemcpyHostToDevice));
    c->owned = (void **)realloc(c->owned, sizeof(void *) * (size_t)(c->n_owned + 1));
    if (!c->owned) abort();
    c->owned[c->n_owned++] = d;
    return d;
}

int cuda_quant_prepare(cuda_ctx *c, g3n_mat *m, char *err, size_t errlen) {
    if (!m->data) return 0;
    if (m->host_gather && !c->ple_on_gpu) { /* rows dequantized on the host when staged */
        if (c->n_tables == CUDA_MAX_HOST_GATHER)
            return g3n_err(err, errlen, "%s: too many host-resident tables", m->name);
        cuda_host_table *t = &c->tables[c->n_tables++];
        memset(t, 0, sizeof(*t));
        t->host = m->data;
        t->qm = *m;
        t->dtype = G3N_F32;
        t->cols = m->cols;
        t->rows = m->rows;
        t->row_bytes = (size_t)m->cols * sizeof(float);
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
    m->transposed = 0; /* exact sparsity reads quantized down matrices densely */
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

/* A quantized host table's row r as f32 (batch_set's staging). */
void cuda_quant_host_row(const cuda_host_table *t, int r, float *out) { g3n_mat_row(&t->qm, r, out); }
