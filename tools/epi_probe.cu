// epi_probe.cu: where a row op (a norm over a product's whole output) costs
// least in a recorded decode step. A chain of N "products" (132 blocks, each
// reading its share of a weight stream, loaded before the PDL wait, and the
// previous row op's 2048 floats, writing 16 outputs), each followed by a row op
// (RMS norm of the 2048 outputs). µs per product + row op, for:
//   split - the row op as its own one-block kernel (what g3n does now)
//   last  - the row op in the product's last block to finish (a fence and a
//           counter; the block that takes the count to the grid size does it)
//   redo  - no row op kernel: every block of the next product computes the
//           norm of the previous product's raw output itself
//   redo7 - as redo, with the attention residual's work (7 vectors, 3 sums)
// Weights: KB bytes a block, from a buffer larger than the L2.
// Build: nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -o epi_probe tools/epi_probe.cu
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
    fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); exit(1); } } while (0)

enum { D = 2048, NT = 512, NK = 100 };

__device__ __forceinline__ float block_sum(float s, float *red) {
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(~0u, s, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = s;
    __syncthreads();
    s = threadIdx.x < NT / 32 ? red[threadIdx.x] : 0.f;
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(~0u, s, o);
    return s;
}

/* the row op: out = in * rsqrt(mean(in^2)), 2048 floats, by one block of 512 */
__device__ __forceinline__ void row_op(const float *in, float *out, float *red) {
    float v[4], s = 0.f;
    for (int j = 0; j < 4; j++) v[j] = __ldcg(in + threadIdx.x + j * NT), s += v[j] * v[j];
    const float r = rsqrtf(block_sum(s, red) / D + 1e-6f);
    for (int j = 0; j < 4; j++) out[threadIdx.x + j * NT] = v[j] * r;
}

/* MODE 0: product only; 1: product + last-block row op; 2: product reading the
 * previous raw output and normalising it itself; 3: as 2, but the work of
 * g3n's attention residual: 7 vectors read (x, t0, lau, a and three norm
 * weights), two sums, then the norm of their mix, and block 0 stores it */
template <int MODE>
__global__ void __launch_bounds__(NT) k_prod(const float *x, float *y, float *yn, const uint4 *w, int wpb,
                                             unsigned *cnt, const float *wn) {
    __shared__ float red[32];
    __shared__ int last;
    /* the block's weights, before the wait (up to 8 x 16 B a thread in flight) */
    const uint4 *wb = w + (size_t)blockIdx.x * wpb;
    uint4 q[8];
    int n = 0;
    for (; n < 8 && threadIdx.x + n * NT < wpb; n++) q[n] = __ldcs(wb + threadIdx.x + n * NT);
    asm volatile("griddepcontrol.launch_dependents;");
    asm volatile("griddepcontrol.wait;" ::: "memory");
    float v[4], s = 0.f;
    for (int j = 0; j < 4; j++) v[j] = __ldcg(x + threadIdx.x + j * NT);
    if (MODE == 3) {
        float t[4], l[4], a[4], w1[4], w2[4], w3[4], s2 = 0.f;
        const float *xb = x + D; /* stand-ins for the other vectors: the next 6 x 2048 floats */
        for (int j = 0; j < 4; j++) {
            const int i = threadIdx.x + j * NT;
            t[j] = __ldcg(xb + i), l[j] = __ldcg(xb + D + i), a[j] = __ldcg(xb + 2 * D + i);
            w1[j] = __ldg(wn + i), w2[j] = __ldg(wn + D + i), w3[j] = __ldg(wn + 2 * D + i);
            s += t[j] * t[j], s2 += l[j] * l[j];
        }
        s = block_sum(s, red);
        s2 = block_sum(s2, red);
        const float r1 = rsqrtf(s / D + 1e-6f), r2 = rsqrtf(s2 / D + 1e-6f);
        s = 0.f;
        for (int j = 0; j < 4; j++) {
            v[j] = (a[j] + t[j] * r1 * w1[j] + l[j] * r2 * w2[j] + v[j]) * 0.7071f;
            s += v[j] * v[j];
        }
        const float r = rsqrtf(block_sum(s, red) / D + 1e-6f);
        if (blockIdx.x == 0)
            for (int j = 0; j < 4; j++) y[D + threadIdx.x + j * NT] = v[j];
        for (int j = 0; j < 4; j++) v[j] *= r * w3[j];
        s = 0.f;
    }
    if (MODE == 2) {
        for (int j = 0; j < 4; j++) s += v[j] * v[j];
        const float r = rsqrtf(block_sum(s, red) / D + 1e-6f);
        for (int j = 0; j < 4; j++) v[j] *= r;
        s = 0.f;
    }
    unsigned acc = 0;
    for (int k = 0; k < n; k++) acc ^= q[k].x ^ q[k].y ^ q[k].z ^ q[k].w;
    for (int k = 8 * NT + threadIdx.x; k < wpb; k += NT) { /* the rest of the block's share */
        const uint4 t = __ldcs(wb + k);
        acc ^= t.x ^ t.y ^ t.z ^ t.w;
    }
    for (int j = 0; j < 4; j++) s += v[j] * (float)((acc >> j) & 1) * 1e-3f + v[j] * 1e-4f;
    s = block_sum(s, red);
    /* 16 outputs a block */
    if (threadIdx.x < 16) y[(blockIdx.x * 16 + threadIdx.x) % D] = s + (float)threadIdx.x;
    if (MODE == 1) {
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();
            const unsigned old = atomicAdd(cnt, 1u);
            last = old == gridDim.x - 1;
            if (last) *cnt = 0;
        }
        __syncthreads();
        if (!last) return;
        __threadfence();
        row_op(y, yn, red);
    }
}

__global__ void __launch_bounds__(NT) k_row(const float *y, float *yn) {
    __shared__ float red[32];
    asm volatile("griddepcontrol.launch_dependents;");
    asm volatile("griddepcontrol.wait;" ::: "memory");
    row_op(y, yn, red);
}

template <typename F, typename... A> static void launch(cudaStream_t st, F f, int blocks, A... a) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(blocks);
    cfg.blockDim = dim3(NT);
    cfg.stream = st;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = at;
    cfg.numAttrs = 1;
    CK(cudaLaunchKernelEx(&cfg, f, a...));
}

int main(int argc, char **argv) {
    int nsm = 0;
    CK(cudaDeviceGetAttribute(&nsm, cudaDevAttrMultiProcessorCount, 0));
    float *buf;
    unsigned *cnt;
    uint4 *w;
    const size_t wbytes = (size_t)1 << 30;
    CK(cudaMalloc(&buf, sizeof(float) * D * 2 * (NK + 4)));
    float *wn;
    CK(cudaMalloc(&wn, sizeof(float) * D * 3));
    CK(cudaMemset(wn, 0, sizeof(float) * D * 3));
    CK(cudaMalloc(&cnt, sizeof(unsigned) * NK));
    CK(cudaMalloc(&w, wbytes));
    CK(cudaMemset(buf, 0, sizeof(float) * D * 2 * (NK + 4)));
    CK(cudaMemset(cnt, 0, sizeof(unsigned) * NK));
    CK(cudaMemset(w, 1, wbytes));
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    const char *names[4] = {"split", "last", "redo", "redo7"};
    const int kbs[] = {0, 16, 64, 128};
    for (int blocks_i = 0; blocks_i < 2; blocks_i++)
        for (int ki = 0; ki < 4; ki++) {
            const int blocks = blocks_i ? 2 * nsm : nsm, wpb = kbs[ki] * 1024 / 16;
            const size_t per_k = (size_t)blocks * wpb;
            for (int mode = 0; mode < 4; mode++) {
                cudaGraph_t g;
                cudaGraphExec_t ge;
                CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
                for (int k = 0; k < NK; k++) {
                    float *x = buf + (size_t)k * 2 * D, *y = x + D, *xn = x + 2 * D; /* next product's input */
                    const uint4 *wk = w + (per_k * k) % (wbytes / 16 - per_k);
                    if (mode == 0) {
                        launch(st, k_prod<0>, blocks, (const float *)x, y, (float *)nullptr, wk, wpb, cnt + k, (const float *)wn);
                        launch(st, k_row, 1, (const float *)y, xn);
                    } else if (mode == 1) {
                        launch(st, k_prod<1>, blocks, (const float *)x, y, xn, wk, wpb, cnt + k, (const float *)wn);
                    } else if (mode == 2) {
                        /* the raw output is the next product's input, normalised there */
                        launch(st, k_prod<2>, blocks, (const float *)x, xn, (float *)nullptr, wk, wpb, cnt + k, (const float *)wn);
                    } else {
                        launch(st, k_prod<3>, blocks, (const float *)x, xn, (float *)nullptr, wk, wpb, cnt + k, (const float *)wn);
                    }
                }
                CK(cudaStreamEndCapture(st, &g));
                CK(cudaGraphInstantiate(&ge, g, 0));
                for (int i = 0; i < 5; i++) CK(cudaGraphLaunch(ge, st));
                CK(cudaStreamSynchronize(st));
                cudaEvent_t e0, e1;
                CK(cudaEventCreate(&e0));
                CK(cudaEventCreate(&e1));
                const int reps = 50;
                CK(cudaEventRecord(e0, st));
                for (int i = 0; i < reps; i++) CK(cudaGraphLaunch(ge, st));
                CK(cudaEventRecord(e1, st));
                CK(cudaEventSynchronize(e1));
                float ms;
                CK(cudaEventElapsedTime(&ms, e0, e1));
                printf("blocks %3d weights %2d KB/block (%5.1f MB) %-5s: %.3f us per product+row op\n", blocks,
                       kbs[ki], per_k * 16 / 1e6, names[mode], ms * 1000.f / reps / NK);
                CK(cudaGraphExecDestroy(ge));
                CK(cudaGraphDestroy(g));
            }
        }
    (void)argc, (void)argv;
    return 0;
}
