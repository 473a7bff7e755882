/* l2_probe.cu: how fast the L2 can be filled ahead of a read, and how fast a
 * read of what it holds then runs. A buffer of MB megabytes (default 38: E4B
 * 4-bit gate + up) is pushed out of the L2 by reading a 256 MB one; then a
 * "prefetch" kernel asks for it (bulk prefetch, per-line prefetch, or loads
 * whose values are discarded) and a streaming read kernel reads it. Printed:
 * the prefetch kernel's time and the read's, against the read of a cold and of
 * a warm (just read) buffer.
 *
 *   nvcc -O3 -gencode arch=compute_90a,code=sm_90a tools/l2_probe.cu -o l2_probe
 *   ./l2_probe [MB]
 */
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
    fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); exit(1); } } while (0)

__global__ void k_read(const float4 *p, size_t n, float *out) {
    float s = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float4 v = __ldg(p + i);
        s += v.x + v.y + v.z + v.w;
    }
    if (s == 1234.5f) *out = s;
}

__global__ void k_bulk(const char *p, size_t n, unsigned chunk) {
    const size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x, nt = (size_t)gridDim.x * blockDim.x;
    for (size_t o = tid * chunk; o < n; o += nt * chunk) {
        unsigned len = (unsigned)(n - o < chunk ? n - o : chunk);
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p + o), "r"(len) : "memory");
    }
}

__global__ void k_line(const char *p, size_t n) {
    const size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x, nt = (size_t)gridDim.x * blockDim.x;
    for (size_t o = tid * 128; o < n; o += nt * 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(p + o));
}

/* loads with the L2 kept (evict_last), values dropped */
__global__ void k_touch(const float4 *p, size_t n, float *out) {
    float s = 0;
    unsigned long long pol;
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(pol));
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float4 v;
        asm volatile("ld.global.L1::no_allocate.L2::cache_hint.v4.f32 {%0,%1,%2,%3}, [%4], %5;"
                     : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p + i), "l"(pol));
        s += v.x;
    }
    if (s == 1234.5f) *out = s;
}

__global__ void k_spin(unsigned ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); while (t - t0 < ns);
}

int main(int argc, char **argv) {
    const size_t mb = argc > 1 ? (size_t)atoi(argv[1]) : 38, n = mb << 20, big = (size_t)256 << 20;
    char *buf, *flush;
    float *out;
    CK(cudaMalloc(&buf, n));
    CK(cudaMalloc(&flush, big));
    CK(cudaMalloc(&out, 4));
    CK(cudaMemset(buf, 1, n));
    CK(cudaMemset(flush, 1, big));
    cudaEvent_t e0, e1, e2;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    CK(cudaEventCreate(&e2));
    auto cold = [&]() { k_read<<<528, 512>>>((const float4 *)flush, big / 16, out); };
    auto rd = [&]() { k_read<<<528, 512>>>((const float4 *)buf, n / 16, out); };
    printf("buffer %zu MB; each prefetch timed, then the read, at once or after a 30 us spin\n"
           "%-40s %12s %12s\n", mb, "prefetch", "pf us", "read us");
    for (int rep = 0; rep < 4; rep++) {
        for (int m = 0; m < 12; m++) {
            cold();
            CK(cudaEventRecord(e0));
            const char *name;
            char nb[64];
            switch (m) {
            case 0: name = "none (cold read)"; break;
            case 1: rd(); name = "read (warm read)"; break;
            case 2: k_bulk<<<16, 128>>>(buf, n, 16384); name = "bulk 16x128 16K"; break;
            case 3: k_bulk<<<32, 128>>>(buf, n, 16384); name = "bulk 32x128 16K"; break;
            case 4: k_bulk<<<132, 128>>>(buf, n, 8192); name = "bulk 132x128 8K"; break;
            case 5: k_bulk<<<16, 128>>>(buf, n, 4096); name = "bulk 16x128 4K"; break;
            case 6: k_bulk<<<132, 32>>>(buf, n, 65536); name = "bulk 132x32 64K"; break;
            case 7: k_line<<<16, 512>>>(buf, n); name = "line 16x512"; break;
            case 8: k_line<<<132, 512>>>(buf, n); name = "line 132x512"; break;
            case 9: k_touch<<<16, 1024>>>((const float4 *)buf, n / 16, out); name = "touch 16x1024"; break;
            case 10: k_touch<<<32, 1024>>>((const float4 *)buf, n / 16, out); name = "touch 32x1024"; break;
            default: k_touch<<<132, 1024>>>((const float4 *)buf, n / 16, out); name = "touch 132x1024"; break;
            }
            CK(cudaEventRecord(e1));
            if (rep & 1) k_spin<<<1, 32>>>(30000);
            rd();
            CK(cudaEventRecord(e2));
            CK(cudaEventSynchronize(e2));
            float a = 0, b = 0;
            CK(cudaEventElapsedTime(&a, e0, e1));
            CK(cudaEventElapsedTime(&b, e1, e2));
            snprintf(nb, sizeof nb, "%s%s", name, rep & 1 ? " +30us" : "");
            if (rep >= 2) printf("%-40s %12.1f %12.1f   (%.2f TB/s read)\n", nb, a * 1e3, b * 1e3, n / (b * 1e-3) / 1e12);
        }
    }
    return 0;
}
