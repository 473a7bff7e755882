// pdl_probe.cu: what a dependency between two kernels of a recorded step costs.
// A chain of N kernels, each reading the previous one's 2048-float output and
// writing its own, captured in a CUDA graph and replayed; µs per kernel for:
//   plain  - ordinary launches (each kernel waits for the previous grid's end)
//   pdl    - programmatic dependent launch: launch_dependents at the start,
//            griddepcontrol.wait before the first read (what g3n does now)
//   flag   - launched as pdl, but no griddepcontrol.wait: each block waits for
//            a counter the previous kernel's blocks bump after their writes
//            (release / acquire at gpu scope); counters zeroed at the step's start
// with 1 block (a row kernel) and 132 blocks (a product) per kernel, and
// "work" = a block reduction over the 2048 floats (a norm) or none.
// Build: nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -o pdl_probe tools/pdl_probe.cu
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
    fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); exit(1); } } while (0)

enum { D = 2048, NK = 200 };

__device__ __forceinline__ unsigned ld_acquire(const unsigned *p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

template <int MODE>
__global__ void k_step(const float *in, float *out, const unsigned *wait_on, unsigned wait_n,
                       unsigned *done, int work) {
    asm volatile("griddepcontrol.launch_dependents;");
    if (MODE == 1) asm volatile("griddepcontrol.wait;" ::: "memory");
    if (MODE == 2 && wait_on) {
        if (threadIdx.x == 0)
            while (ld_acquire(wait_on) < wait_n) __nanosleep(32);
        __syncthreads();
    }
    __shared__ float red[32];
    float s = 0.f;
    float v[4];
    for (int j = 0; j < 4; j++) {
        v[j] = in[threadIdx.x + j * 512];
        s += v[j] * v[j];
    }
    if (work) {
        for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(~0u, s, o);
        if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = s;
        __syncthreads();
        s = threadIdx.x < 16 ? red[threadIdx.x] : 0.f;
        for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(~0u, s, o);
        s = rsqrtf(s / D + 1e-6f);
    } else {
        s = 1.f;
    }
    // each block writes a slice; block 0 all of it when there is one block
    const int per = D / gridDim.x > 0 ? (D + gridDim.x - 1) / gridDim.x : 1;
    for (int j = 0; j < 4; j++) {
        const int i = threadIdx.x + j * 512;
        if (i / per == (int)blockIdx.x) out[i] = v[j] * s * 0.999f + 0.001f;
    }
    if (MODE == 2) {
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();
            atomicAdd(done, 1u);
        }
    }
}

template <int MODE>
static void launch(cudaStream_t st, int blocks, int pdl, const float *in, float *out,
                   const unsigned *w, unsigned wn, unsigned *d, int work) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(blocks);
    cfg.blockDim = dim3(512);
    cfg.stream = st;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = pdl;
    cfg.attrs = at;
    cfg.numAttrs = 1;
    CK(cudaLaunchKernelEx(&cfg, k_step<MODE>, in, out, w, wn, d, work));
}

int main() {
    float *buf;
    unsigned *cnt;
    CK(cudaMalloc(&buf, sizeof(float) * D * (NK + 1)));
    CK(cudaMalloc(&cnt, sizeof(unsigned) * NK));
    CK(cudaMemset(buf, 0, sizeof(float) * D * (NK + 1)));
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    const char *names[3] = {"plain", "pdl", "flag"};
    int nsm = 0;
    CK(cudaDeviceGetAttribute(&nsm, cudaDevAttrMultiProcessorCount, 0));
    for (int work = 0; work < 2; work++)
        for (int bi = 0; bi < 2; bi++) {
            const int blocks = bi ? nsm : 1;
            for (int mode = 0; mode < 3; mode++) {
                cudaGraph_t g;
                cudaGraphExec_t ge;
                CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
                if (mode == 2) CK(cudaMemsetAsync(cnt, 0, sizeof(unsigned) * NK, st));
                for (int k = 0; k < NK; k++) {
                    const float *in = buf + (size_t)k * D;
                    float *out = buf + (size_t)(k + 1) * D;
                    const unsigned *w = k ? cnt + k - 1 : nullptr;
                    if (mode == 0) launch<0>(st, blocks, 0, in, out, w, blocks, cnt + k, work);
                    if (mode == 1) launch<1>(st, blocks, 1, in, out, w, blocks, cnt + k, work);
                    if (mode == 2) launch<2>(st, blocks, k ? 1 : 0, in, out, w, blocks, cnt + k, work);
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
                float last;
                CK(cudaMemcpy(&last, buf + (size_t)NK * D + 7, 4, cudaMemcpyDeviceToHost));
                printf("blocks %3d work %d %-5s : %.3f us per kernel (check %g)\n", blocks, work,
                       names[mode], ms * 1000.f / reps / NK, last);
                CK(cudaGraphExecDestroy(ge));
                CK(cudaGraphDestroy(g));
            }
        }
    return 0;
}
