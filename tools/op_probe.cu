/* op_probe.cu: decode products alone on g3n's CUDA backend: cold (after a 256 MB
 * write pushed them out of the L2), warm (just read), after a bulk L2 prefetch of
 * their bytes with 16-132 blocks, and after a load sweep. Kernel times come from
 * ktrace (CUPTI); tools/ktrace_report.py does not group these, so print them in
 * order (start, end and name are a trace line's fields 1, 2 and 8). With
 * G3N_QTRACE=FILE the 4-bit products' per-block stages land in FILE
 * (tools/qtrace_report.py FILE STEP). docs/SPEED.md, twenty-eighth session.
 *
 *   make CUDA=1 REL=build/exp CUDA_ARCH="-gencode arch=compute_90a,code=sm_90a" build/exp/libg3n.a
 *   nvcc -O2 -std=c++17 -gencode arch=compute_90a,code=sm_90a -Isrc tools/op_probe.cu build/exp/libg3n.a \
 *        -o op_probe -lcublasLt -lcublas -lcjson -lgomp
 *   G3N_KTRACE=kt.txt CUDA_INJECTION64_PATH=libktrace.so ./op_probe O K BITS   (BITS 0: bf16, one matrix)
 */
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cuda_runtime.h>
extern "C" {
#include "backend/backend.h"
#include "core/common.h"
#include "core/quant.h"
}
__global__ void k_flush(float4 *p, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = make_float4(1, 2, 3, (float)i);
}
__global__ void k_bulkpf(const char *p, size_t n, unsigned chunk) {
    const size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x, nt = (size_t)gridDim.x * blockDim.x;
    for (size_t o = tid * chunk; o < n; o += nt * chunk) {
        unsigned len = (unsigned)(n - o < chunk ? n - o : chunk);
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p + o), "r"(len) : "memory");
    }
}
__global__ void k_touch(const float4 *p, size_t n, float *out) {
    float s = 0;
    const size_t nt = (size_t)gridDim.x * blockDim.x;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += nt * 8) {
        float4 v[8];
#pragma unroll
        for (int k = 0; k < 8; k++)
            v[k] = i + k * nt < n ? __ldcg(p + i + k * nt) : make_float4(0, 0, 0, 0);
#pragma unroll
        for (int k = 0; k < 8; k++)
            s += v[k].x;
    }
    if (s == 1234.5f)
        *out = s;
}
static float frand(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((*s >> 40) & 0xFFFFFF) / 16777216.0f - 0.5f;
}
static g3n_mat qmat(g3n_backend *be, int bits, int rows, int cols) {
    const int group = 64;
    const size_t words = g3n_quant_row_words(cols, bits), ng = (size_t)cols / group;
    char *mem = (char *)malloc(4 * words * rows + 4 * ng * rows);
    uint32_t *q = (uint32_t *)mem;
    uint16_t *sc = (uint16_t *)(mem + 4 * words * rows), *bi = sc + ng * rows;
    float *w = (float *)malloc(4 * cols), fs[256], fb[256];
    uint64_t st = 7 + rows;
    for (int r = 0; r < rows; r++) {
        for (int c = 0; c < cols; c++)
            w[c] = frand(&st);
        g3n_quantize_row(w, cols, bits, group, q + r * words, fs, fb);
        for (size_t g = 0; g < ng; g++)
            sc[r * ng + g] = g3n_f32_to_bf16(fs[g]), bi[r * ng + g] = g3n_f32_to_bf16(fb[g]);
    }
    free(w);
    g3n_mat m;
    memset(&m, 0, sizeof m);
    m.dtype = G3N_U32, m.rows = rows, m.cols = cols, m.data = q, m.name = "probe";
    m.bits = bits, m.group_size = group, m.sdtype = G3N_BF16, m.scales = sc, m.biases = bi;
    char err[256];
    if (be->mat_prepare(be, &m, err, sizeof err)) {
        fprintf(stderr, "%s\n", err);
        exit(1);
    }
    return m;
}
static g3n_mat bmat(g3n_backend *be, int rows, int cols) {
    uint16_t *h = (uint16_t *)malloc((size_t)rows * cols * 2);
    uint64_t st = 9;
    for (size_t i = 0; i < (size_t)rows * cols; i++)
        h[i] = g3n_f32_to_bf16(frand(&st));
    g3n_mat m;
    memset(&m, 0, sizeof m);
    m.dtype = G3N_BF16, m.rows = rows, m.cols = cols, m.data = h, m.name = "probe16";
    char err[256];
    if (be->mat_prepare(be, &m, err, sizeof err)) {
        fprintf(stderr, "%s\n", err);
        exit(1);
    }
    return m;
}
int main(int argc, char **argv) {
    const int O = argc > 1 ? atoi(argv[1]) : 16384, K = argc > 2 ? atoi(argv[2]) : 2048,
              bits = argc > 3 ? atoi(argv[3]) : 4;
    char err[256];
    g3n_cuda_opts o = {0, 0, 1};
    g3n_backend *be = cuda_backend_create(&o, err, sizeof err);
    if (!be) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    float4 *fl;
    size_t fn = (size_t)256 << 20;
    cudaMalloc(&fl, fn);
    float *x = (float *)be->alloc(be, (size_t)K * 4), *y = (float *)be->alloc(be, (size_t)O * 4),
          *u = (float *)be->alloc(be, (size_t)O * 4);
    float *hx = (float *)malloc((size_t)K * 4);
    uint64_t st = 3;
    for (int i = 0; i < K; i++)
        hx[i] = frand(&st);
    be->write(be, x, hx, (size_t)K * 4);
    float *sink;
    cudaMalloc(&sink, 4);
    auto flush = [&]() {
        be->sync(be);
        k_flush<<<1056, 256>>>(fl, fn / 16);
        cudaDeviceSynchronize();
    };
    if (bits) {
        g3n_mat Wg = qmat(be, bits, O, K), Wu = qmat(be, bits, O, K);
        const size_t wb = g3n_quant_row_words(K, bits) * 4 * O, sb = (size_t)O * (K / 64) * 2;
        printf("gate/up %dx%d q%d: %.1f MB\n", O, K, bits, 2 * (wb + 2 * sb) / 1e6);
        for (int r = 0; r < 10; r++) {
            flush();
            be->matmul_gate_up(be, y, u, &Wg, &Wu, x, 1);
            be->sync(be);
        } /* cold */
        for (int r = 0; r < 10; r++) {
            be->matmul_gate_up(be, y, u, &Wg, &Wu, x, 1);
            be->sync(be);
        } /* warm */
        const char *pp[6] = {(const char *)Wg.data, (const char *)Wg.scales, (const char *)Wg.biases,
                             (const char *)Wu.data, (const char *)Wu.scales, (const char *)Wu.biases};
        const size_t pn[6] = {wb, sb, sb, wb, sb, sb};
        for (int nb : {16, 32, 64, 132}) /* bulk prefetch with nb blocks, then the product */
            for (int r = 0; r < 5; r++) {
                flush();
                for (int i = 0; i < 6; i++)
                    k_bulkpf<<<nb, 128>>>(pp[i], pn[i] & ~(size_t)15, 16384);
                cudaDeviceSynchronize();
                be->matmul_gate_up(be, y, u, &Wg, &Wu, x, 1);
                be->sync(be);
            }
        for (int r = 0; r < 5; r++) { /* a load sweep, then the product */
            flush();
            for (int i = 0; i < 6; i++)
                k_touch<<<528, 256>>>((const float4 *)pp[i], pn[i] / 16, sink);
            cudaDeviceSynchronize();
            be->matmul_gate_up(be, y, u, &Wg, &Wu, x, 1);
            be->sync(be);
        }
    } else {
        g3n_mat W = bmat(be, O, K);
        printf("bf16 %dx%d: %.1f MB\n", O, K, (double)O * K * 2 / 1e6);
        for (int r = 0; r < 10; r++) {
            flush();
            be->matmul(be, y, &W, x, 1);
            be->sync(be);
        }
        for (int r = 0; r < 10; r++) {
            be->matmul(be, y, &W, x, 1);
            be->sync(be);
        }
    }
    be->destroy(be);
    printf("done\n");
    return 0;
}
