/* l2_read_probe.cu: read bandwidth of a buffer the L2 holds (read just before)
 * against DRAM, for buffers of 4 MB to 1 GB, with 1-16 independent 16-byte loads
 * in flight a thread and 2, 4 or 8 blocks of 256 an SM (__ldg, __ldcs, __ldcg).
 * tools/l2_probe.cu's read (one load a thread at a time) found a warm L2 no
 * faster than DRAM; with 4-8 loads in flight it reads 32-40 MB at 5.0-5.2 TB/s
 * on the H100 (docs/SPEED.md, twenty-eighth session). Small buffers are bound by
 * the launches (50 back to back).
 *
 *   nvcc -O3 -gencode arch=compute_90a,code=sm_90a tools/l2_read_probe.cu -o l2_read_probe && ./l2_read_probe
 */
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>
#define CK(x)                                                                                                          \
    do {                                                                                                               \
        cudaError_t e_ = (x);                                                                                          \
        if (e_ != cudaSuccess) {                                                                                       \
            fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e_));                                \
            exit(1);                                                                                                   \
        }                                                                                                              \
    } while (0)
template <int U, int MODE> __global__ void __launch_bounds__(256) k_rd(const float4 *p, size_t n, float *out) {
    float s = 0;
    const size_t nt = (size_t)gridDim.x * blockDim.x;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += nt * U) {
        float4 v[U];
#pragma unroll
        for (int k = 0; k < U; k++) {
            size_t j = i + k * nt;
            if (j < n) {
                if (MODE == 0)
                    v[k] = __ldg(p + j);
                else if (MODE == 1)
                    v[k] = __ldcs(p + j);
                else
                    v[k] = __ldcg(p + j);
            } else
                v[k] = make_float4(0, 0, 0, 0);
        }
#pragma unroll
        for (int k = 0; k < U; k++)
            s += v[k].x + v[k].y + v[k].z + v[k].w;
    }
    if (s == 1234.5f)
        *out = s;
}
template <int U, int MODE> float run(const float4 *p, size_t bytes, float *out, int blocks, int reps) {
    size_t n = bytes / 16;
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    k_rd<U, MODE><<<blocks, 256>>>(p, n, out);
    k_rd<U, MODE><<<blocks, 256>>>(p, n, out);
    cudaEventRecord(a);
    for (int r = 0; r < reps; r++)
        k_rd<U, MODE><<<blocks, 256>>>(p, n, out);
    cudaEventRecord(b);
    CK(cudaEventSynchronize(b));
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    return (float)(bytes * (double)reps / (ms * 1e-3) / 1e9);
}
int main() {
    int sm;
    cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, 0);
    size_t big = (size_t)1 << 30;
    char *buf;
    CK(cudaMalloc(&buf, big));
    CK(cudaMemset(buf, 1, big));
    float *out;
    CK(cudaMalloc(&out, 4));
    size_t mbs[] = {4, 8, 16, 24, 32, 40, 48, 64, 1024};
    for (int bpm : {2, 4, 8}) {
        int blocks = sm * bpm;
        printf("blocks %d (%d/SM)\n", blocks, bpm);
        for (size_t mb : mbs) {
            size_t bytes = mb << 20;
            int reps = mb >= 512 ? 5 : 50;
            printf(
                "  %5zu MB: U1 %6.0f  U4 %6.0f  U8 %6.0f  U8cs %6.0f  U8cg %6.0f  U16 %6.0f GB/s\n", mb,
                run<1, 0>((float4 *)buf, bytes, out, blocks, reps), run<4, 0>((float4 *)buf, bytes, out, blocks, reps),
                run<8, 0>((float4 *)buf, bytes, out, blocks, reps), run<8, 1>((float4 *)buf, bytes, out, blocks, reps),
                run<8, 2>((float4 *)buf, bytes, out, blocks, reps),
                run<16, 0>((float4 *)buf, bytes, out, blocks, reps));
        }
    }
    return 0;
}
