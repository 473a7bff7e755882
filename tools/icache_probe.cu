/* icache_probe.cu: what straight-line code costs a kernel the first time an SM
 * runs it. Each kernel body<ID, KB> is KB kilobytes of independent FMAs (16
 * bytes of SASS each, eight chains so the issue is not latency-bound); every
 * block times itself with clock64. "warm" runs the kernel three times in a row
 * and times the third; "cold" first runs four other 64 KB kernels (256 KB of
 * other code) and then times it. The difference per KB is what a kernel's
 * once-per-launch code costs when the step's other kernels have pushed it out.
 *
 *   nvcc -O3 -gencode arch=compute_90a,code=sm_90a tools/icache_probe.cu -o icache_probe
 *   ./icache_probe [blocks] [threads]
 */
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
    fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); exit(1); } } while (0)

template <int ID, int KB>
__global__ void body(float *out, long long *t) {
    long long t0 = clock64();
    float a[8];
#pragma unroll
    for (int c = 0; c < 8; c++) a[c] = (float)(threadIdx.x + c);
#pragma unroll
    for (int i = 0; i < KB * 64 / 8; i++)
#pragma unroll
        for (int c = 0; c < 8; c++)
            asm volatile("fma.rn.f32 %0, %0, %1, %2;" : "+f"(a[c]) : "f"(1.0001f), "f"((float)(i * 8 + c + ID * 7)));
    float s = 0;
#pragma unroll
    for (int c = 0; c < 8; c++) s += a[c];
    __syncthreads();
    long long t1 = clock64();
    if (threadIdx.x == 0) t[blockIdx.x] = t1 - t0;
    if (s == 12345.f) out[threadIdx.x] = s;
}

typedef void (*kfn)(float *, long long *);

static double mean_us(long long *d_t, int nb, double ghz, double *mx) {
    static long long h[4096];
    CK(cudaMemcpy(h, d_t, sizeof(long long) * nb, cudaMemcpyDeviceToHost));
    double s = 0, m = 0;
    for (int i = 0; i < nb; i++) s += (double)h[i], m = h[i] > m ? (double)h[i] : m;
    *mx = m / ghz / 1000.0;
    return s / nb / ghz / 1000.0;
}

int main(int argc, char **argv) {
    int nb = argc > 1 ? atoi(argv[1]) : 132, nt = argc > 2 ? atoi(argv[2]) : 128;
    cudaDeviceProp p;
    CK(cudaGetDeviceProperties(&p, 0));
    int clk_khz = 0;
    CK(cudaDeviceGetAttribute(&clk_khz, cudaDevAttrClockRate, 0));
    double ghz = clk_khz / 1e6;
    float *out;
    long long *t;
    CK(cudaMalloc(&out, 4096 * 4));
    CK(cudaMalloc(&t, 4096 * 8));
    kfn flush[4] = {body<1, 64>, body<2, 64>, body<3, 64>, body<4, 64>};
    struct { int kb; kfn f; } ks[] = {{1, body<0, 1>}, {2, body<0, 2>}, {4, body<0, 4>}, {8, body<0, 8>},
                                      {16, body<0, 16>}, {32, body<0, 32>}, {64, body<5, 64>}};
    printf("%s, %d SMs, clock %.3f GHz, %d blocks x %d threads\n", p.name, p.multiProcessorCount, ghz, nb, nt);
    printf("%6s %12s %12s %12s %12s %14s\n", "KB", "warm mean", "warm max", "cold mean", "cold max", "cold-warm /KB");
    for (auto &k : ks) {
        double wm = 0, wx = 0, cm = 0, cx = 0;
        const int reps = 10;
        for (int r = 0; r < reps; r++) {
            double x;
            for (int i = 0; i < 3; i++) k.f<<<nb, nt>>>(out, t);
            CK(cudaDeviceSynchronize());
            wm += mean_us(t, nb, ghz, &x), wx += x;
            for (int i = 0; i < 4; i++) flush[i]<<<nb, nt>>>(out, t);
            k.f<<<nb, nt>>>(out, t);
            CK(cudaDeviceSynchronize());
            cm += mean_us(t, nb, ghz, &x), cx += x;
        }
        wm /= reps, wx /= reps, cm /= reps, cx /= reps;
        printf("%6d %10.3f us %10.3f us %10.3f us %10.3f us %12.3f us\n", k.kb, wm, wx, cm, cx, (cm - wm) / k.kb);
    }
    return 0;
}
