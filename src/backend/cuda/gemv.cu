/* gemv.cu: y[r] = W . x[r] on the GPU with W in its stored dtype (bf16, f16,
 * f32) and f32 activations. One warp per output row; each lane streams 16-byte
 * chunks of the row (8 weights) with several loads in flight; up to 8 input rows
 * share each pass over W, so a decode step reads every weight once. Rows that
 * are not multiples of 8 weights take a scalar path. Prompt-sized products
 * repeat the pass per 8 rows (a cuBLAS path belongs here for prefill). */
#include "cuda_common.cuh"

__device__ __forceinline__ void load8(const __nv_bfloat16 *p, float f[8]) {
    const uint4 u = __ldcs((const uint4 *)p); /* weights: streamed once, not cached */
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ void load8(const __half *p, float f[8]) {
    const uint4 u = __ldcs((const uint4 *)p);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        __half2 h;
        memcpy(&h, &w[i], 4);
        const float2 v = __half22float2(h);
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
    }
}

__device__ __forceinline__ void load8(const float *p, float f[8]) {
    const float4 a = __ldcs((const float4 *)p), b = __ldcs((const float4 *)p + 1);
    f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}

template <int R>
__device__ __forceinline__ void fma8(float acc[R], const float wf[8], const float *x, int K, int c) {
#pragma unroll
    for (int r = 0; r < R; r++) {
        const float4 *xp = (const float4 *)(x + (size_t)r * K + (size_t)c * 8);
        const float4 a = __ldg(xp), b = __ldg(xp + 1);
        acc[r] += wf[0] * a.x + wf[1] * a.y + wf[2] * a.z + wf[3] * a.w + wf[4] * b.x + wf[5] * b.y +
                  wf[6] * b.z + wf[7] * b.w;
    }
}

/* K % 8 == 0: warp per output row, 4 chunks of 8 weights in flight per lane */
template <typename T, int R>
__global__ void __launch_bounds__(256) k_gemv(float *y, const T *W, const float *x, int O, int K) {
    const int row = (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (row >= O) return;
    const T *w = W + (size_t)row * K;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0;
    const int nc = K / 8;
    int c = lane;
    for (; c + 96 < nc; c += 128) {
        float w0[8], w1[8], w2[8], w3[8];
        load8(w + (size_t)c * 8, w0);
        load8(w + (size_t)(c + 32) * 8, w1);
        load8(w + (size_t)(c + 64) * 8, w2);
        load8(w + (size_t)(c + 96) * 8, w3);
        fma8<R>(acc, w0, x, K, c);
        fma8<R>(acc, w1, x, K, c + 32);
        fma8<R>(acc, w2, x, K, c + 64);
        fma8<R>(acc, w3, x, K, c + 96);
    }
    for (; c < nc; c += 32) {
        float w0[8];
        load8(w + (size_t)c * 8, w0);
        fma8<R>(acc, w0, x, K, c);
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        const float s = warp_sum(acc[r]);
        if (lane == 0) y[(size_t)r * O + row] = s;
    }
}

/* any K: warp per output row, one weight per lane step */
__global__ void k_gemv_scalar(float *y, const void *W, int dtype, const float *x, int O, int K, int rows) {
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
static void gemv_rows(cudaStream_t st, float *y, const T *W, const float *x, int O, int K, int R) {
    const unsigned grid = (unsigned)(((size_t)O * 32 + 255) / 256);
    switch (R) {
    case 1: k_gemv<T, 1><<<grid, 256, 0, st>>>(y, W, x, O, K); break;
    case 2: k_gemv<T, 2><<<grid, 256, 0, st>>>(y, W, x, O, K); break;
    case 3: k_gemv<T, 3><<<grid, 256, 0, st>>>(y, W, x, O, K); break;
    case 4: k_gemv<T, 4><<<grid, 256, 0, st>>>(y, W, x, O, K); break;
    case 5: k_gemv<T, 5><<<grid, 256, 0, st>>>(y, W, x, O, K); break;
    case 6: k_gemv<T, 6><<<grid, 256, 0, st>>>(y, W, x, O, K); break;
    case 7: k_gemv<T, 7><<<grid, 256, 0, st>>>(y, W, x, O, K); break;
    default: k_gemv<T, 8><<<grid, 256, 0, st>>>(y, W, x, O, K); break;
    }
    CUDA_LAUNCHED();
}

void cuda_op_matmul(g3n_backend *be, float *y, const g3n_mat *W, const float *x, int rows) {
    cudaStream_t st = CTX(be)->stream;
    const int O = W->rows, K = W->cols;
    if (rows <= 0 || O <= 0) return;
    if (K % 8 != 0) {
        k_gemv_scalar<<<(unsigned)(((size_t)O * 32 + 255) / 256), 256, 0, st>>>(y, W->data, W->dtype, x, O, K, rows);
        CUDA_LAUNCHED();
        return;
    }
    for (int r0 = 0; r0 < rows; r0 += 8) {
        const int R = rows - r0 < 8 ? rows - r0 : 8;
        float *yr = y + (size_t)r0 * O;
        const float *xr = x + (size_t)r0 * K;
        if (W->dtype == G3N_BF16) gemv_rows(st, yr, (const __nv_bfloat16 *)W->data, xr, O, K, R);
        else if (W->dtype == G3N_F16) gemv_rows(st, yr, (const __half *)W->data, xr, O, K, R);
        else gemv_rows(st, yr, (const float *)W->data, xr, O, K, R);
    }
}
