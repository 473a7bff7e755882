/* cuda_common.cuh: what every CUDA file of the backend shares: the backend's
 * state, CUDA_CHECK, warp/block reductions, dtype loads, and the launchers the
 * op files export to cuda.cu. Compiled as C++ by nvcc but written C-like: no STL,
 * no classes; entry points the C side calls are extern "C". */
#ifndef G3N_CUDA_COMMON_CUH
#define G3N_CUDA_COMMON_CUH

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "backend/backend.h"
#include "common.h"
}

#define CUDA_CHECK(x)                                                                   \
    do {                                                                                \
        cudaError_t e_ = (x);                                                           \
        if (e_ != cudaSuccess) {                                                        \
            fprintf(stderr, "g3n: CUDA error: %s (%s:%d: %s)\n", cudaGetErrorString(e_), \
                    __FILE__, __LINE__, #x);                                            \
            abort();                                                                    \
        }                                                                               \
    } while (0)

/* After a launch: catch bad configurations at once (not inside graph capture,
 * where errors surface at instantiation). */
#define CUDA_LAUNCHED() CUDA_CHECK(cudaPeekAtLastError())

#define BLAS_CHECK(x)                                                                          \
    do {                                                                                       \
        cublasStatus_t s_ = (x);                                                               \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                                     \
            fprintf(stderr, "g3n: cuBLAS error %d (%s:%d: %s)\n", (int)s_, __FILE__, __LINE__, #x); \
            abort();                                                                           \
        }                                                                                      \
    } while (0)

#define CUDA_MAX_GRAPHS 32
#define CUDA_SEEN_KEYS 64

/* logits_top (top.cu) */
#define TOP_SLICE 2048        /* logits per block of k_top_slices and k_top_max */
#define TOP_CAP 4096          /* keys k_top_merge and k_top_sort sort at most */
#define TOP_QUEUE_SLICES 1024 /* logits_top_queue: rows of at most this many slices */
#define TOP_QUEUE_WORDS (TOP_QUEUE_SLICES + TOP_CAP + 1)
#define TOP_QUEUE_HOST (TOP_QUEUE_SLICES * 8)
typedef struct {
    const float *logits;
    int rows, n, m;
} cuda_top_req;
#define CUDA_MAX_HOST_GATHER 16
#define CUDA_MAX_HEAD_DIM 256
#define CUDA_YSPLIT_BYTES ((size_t)64 << 20)

typedef struct {
    const void *host;  /* the matrix in host memory (the mmap) */
    int dtype, rows, cols;
    size_t row_bytes;
    void *h_stage;     /* pinned: the rows of the current step */
    void *d_stage;     /* device copy of h_stage */
    int cap_rows;
    g3n_mat qm;        /* quantized table (qm.bits > 0): a row staged as stored (its packed
                          words, then its scales, then its biases: q_words and q_groups
                          bytes, row_bytes rounded up to 16) and dequantized on the GPU */
    size_t q_words, q_groups;
} cuda_host_table;

#define CUDA_MAX_PROF 96

typedef struct {
    char name[48];
    double ms, bytes;
    long calls;
} cuda_prof;

#define QTRACE_RECS (1 << 22) /* G3N_QTRACE records (k_qgemv_s blocks) */
#define QTRACE_BYTES ((8 + (size_t)QTRACE_RECS * 8) * 8) /* a count, padding, 8 words a record */

/* byte ranges for the L2 prefetch (cuda.cu) */
#define PF_MAX 9
typedef struct {
    const char *p[PF_MAX];
    size_t n[PF_MAX];
    int k;
    unsigned stride; /* every stride-th chunk of each range (1: all of it) */
} pf_ranges;

typedef struct {
    int device;
    int n_sm; /* multiprocessors */
    cudaStream_t stream;
    int pdl; /* launch with programmatic dependent launch (sm_90+; G3N_CUDA_PDL=0 turns off) */
    /* G3N_CUDA_PROFILE=1: time every op with events (no graphs) and print a
     * table at exit: where a step's time goes */
    int profile;
    cudaEvent_t ev0, ev1;
    cuda_prof prof[CUDA_MAX_PROF];
    int n_prof;
    int no_graph, ple_on_gpu;
    /* G3N_CUDA_SKIP=name,name: kernels whose (mangled) name contains one of these
     * are not launched. Wrong results; for timing what the rest of a step costs. */
    char skip[256];
    int cluster_ok; /* thread-block clusters (sm_90+) */
    size_t smem_optin; /* shared memory a block may opt in to */
    /* current step */
    int n_tokens, n_seq;
    int one_per_seq; /* every token of the step is its own sequence's only one (decode) */
    int reach;       /* batch_reach: the context the step reaches */
    int carve;       /* the next launch takes all of L1 as shared memory (quant.cu says why) */
    int att_next;    /* attention_next: the matmul_multi under way is q/k/v, attention follows */
    int qkv_bits;    /* the bits of the last such q/k/v product (0: 16-bit weights) */
    int cap_tokens, cap_seq;
    int32_t *d_meta;       /* [3][cap_tokens]: ids, pos, seq */
    int32_t *h_meta;       /* pinned staging of the same */
    g3n_kv_layer *d_kv;    /* [cap_seq][G3N_KV_MAX_LAYERS] */
    g3n_kv_layer *h_kv;    /* pinned staging */
    int kv_sent, kv_skip;  /* entries of h_kv that d_kv holds: a step with the same table copies none */
    int stage_zc;          /* stage_direct: a decode step's host-table rows read from the pinned staging */
    cuda_host_table tables[CUDA_MAX_HOST_GATHER];
    int n_tables;
    /* weights uploaded by mat_prepare */
    void **owned;
    int n_owned;
    int max_cols;          /* widest matrix: sizes the activation-conversion scratch */
    /* prompt-sized and batched products: cuBLAS on activations split into bf16/f16 parts */
    cublasHandle_t blas;
    void *blas_ws;
    void *xconv;           /* [cap_tokens][3][max_cols] 16-bit parts */
    size_t xconv_bytes;
    float *ysplit;         /* the parts' products before they are added (CUDA_YSPLIT_BYTES) */
    size_t ysplit_n;       /* floats */
    int blas_rows;         /* decode steps of this many rows (up to 8) ... */
    size_t blas_bytes;     /* ... take cuBLAS for matrices of this size and more (gemv.cu use_blas) */
    size_t bmma_bytes;     /* bf16 products up to this size (G3N_BMMA_MB; 0: none) ... */
    int bmma_lo, bmma_hi;  /* ... of this many rows take k_bmma (gemv.cu use_bmma) */
    int gemv2_rows;        /* 16-bit products of this many rows and more (2..8) take two output rows a warp: */
    int gemv2w_rows;       /* k_gemv2 (rows up to 2048 wide, one warp a pair), k_gemv2w (longer: wpr warps) */
    /* exact sparsity (sparse.cu): sized at load by the transposed matrices */
    float *sp_part;
    size_t sp_part_n;
    int sp_rows;           /* steps of up to this many rows take the sparse MLP (G3N_SP_ROWS; 1..8) */
    /* G3N_QTRACE=file: per block of k_qgemv_s, its start, PDL release, staged
     * activations, last item and end (%globaltimer), a ring of QTRACE_RECS records
     * of 8 words after a count, written to the file at exit
     * (tools/qtrace_report.py reads it) */
    unsigned long long *qtrace;
    /* quantized prompt products (quant.cu): one dequantized f32 tile */
    float *qscratch;
    size_t qscratch_n;
    /* the whole-step decode kernel (mega.cu): attention splits, barrier counters */
    float *mg_part;
    unsigned *mg_sync;
    size_t mg_part_bytes, mg_sync_bytes;
    /* decode attention split over clusters (attention.cu): the chunks' partial
     * sums and a counter per (token, KV head, rank), kept at 0 between launches */
    float *att_part;
    unsigned *att_cnt;
    size_t att_part_n, att_cnt_n;
    /* k_qgemv_s's K slices reduced in memory (quant.cu, "flat"): the slices'
     * sums and a counter per block row, kept at 0 between launches */
    float *qs_part;
    unsigned *qs_cnt;
    size_t qs_part_n, qs_cnt_n;
    /* logits_top (top.cu): the slices' candidates and the result, its pinned copy */
    void *top_buf;
    float *top_host;
    size_t top_bytes, top_host_bytes;
    /* logits_top_queue (top.cu): the slices' maxima, the list and its count
     * (TOP_QUEUE_WORDS); the results, written by the kernels into pinned host
     * memory (TOP_QUEUE_HOST bytes); what the last step queued (m 0: nothing)
     * and what each recorded step queues */
    unsigned long long *tq_dev;
    void *tq_host;
    cuda_top_req tq, graph_tq[CUDA_MAX_GRAPHS];
    struct cuda_unembed *unembed; /* unembed.cu: the 8-bit copy of the unembedding and its bounds */
    unsigned long long *mg_trace; /* G3N_MEGA_TRACE=1: barrier times of the last step */
    int mg_trace_nbar;
    /* L2 prefetch of the next products' weights (cu_prefetch; G3N_PF=0 turns it
     * off): a side stream forked from the step's stream while a step is
     * recorded, joined at the step's end */
    int pf_on, pf_pending;
    pf_ranges pf_held;    /* a 16-bit share held back to the layer's attention (cuda.cu cuda_pf_release) */
    int pf_hold, pf_late; /* pf_held waits; shares are held back (G3N_PF_LATE=0: not) */
    size_t l2_bytes, pf_part, pf_part16; /* the spread share at 8 bits / 16-bit weights (cuda.cu) */
    cudaStream_t pf_stream;
    cudaEvent_t pf_fork, pf_join;
    /* recorded steps */
    uint64_t graph_key[CUDA_MAX_GRAPHS];
    cudaGraphExec_t graph_exec[CUDA_MAX_GRAPHS];
    uint64_t graph_used[CUDA_MAX_GRAPHS], graph_clock; /* when each was last launched (eviction: the oldest) */
    int n_graphs, max_graphs; /* max_graphs: CUDA_MAX_GRAPHS, or G3N_GRAPHS (tests) */
    uint64_t seen_key[CUDA_SEEN_KEYS]; /* steps run once, not recorded (cu_graph_begin) */
    int next_seen, graph_first;
    int capturing;
    uint64_t capture_key;
} cuda_ctx;

static inline cuda_ctx *CTX(g3n_backend *be) { return (cuda_ctx *)be->ctx; }

/* A decode step's rows of the host-resident tables are read by the embedding
 * kernel from the pinned staging itself (mapped: a few KB over the bus), with no
 * copy between; a prompt's are copied. */
static inline int stage_direct(const cuda_ctx *c) { return c->stage_zc && c->n_tokens <= 8; }

/* Profiling: PROF_BEGIN before an op's launches, PROF_END(name, bytes) after. */
void cuda_prof_end(cuda_ctx *c, const char *name, double bytes);
#define PROF_BEGIN(c) \
    do { if ((c)->profile) CUDA_CHECK(cudaEventRecord((c)->ev0, (c)->stream)); } while (0)
#define PROF_END(c, name, bytes) \
    do { if ((c)->profile) cuda_prof_end((c), (name), (double)(bytes)); } while (0)
static inline const int32_t *d_ids(cuda_ctx *c) { return c->d_meta; }
static inline const int32_t *d_pos(cuda_ctx *c) { return c->d_meta + c->cap_tokens; }
/* The step's caches hold f16 in `layer` (every cache of a model has one element type) */
static inline int cuda_kv_f16(const cuda_ctx *c, int layer) { return c->h_kv && c->n_seq > 0 && c->h_kv[layer].f16; }
static inline const int32_t *d_seq(cuda_ctx *c) { return c->d_meta + 2 * c->cap_tokens; }

/* ---- launching ---------------------------------------------------------------------- */

/* Every kernel starts with KERNEL_BEGIN (or calls pdl_wait before its first read
 * of data an earlier kernel wrote): with programmatic dependent launch a kernel
 * may start while the previous one still runs, and griddepcontrol.wait is where
 * it waits for that one's results. launch_dependents lets the next kernel start
 * launching at once. Both are no-ops without PDL. */
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}
#define KERNEL_BEGIN() \
    do { pdl_trigger(); pdl_wait(); } while (0)

/* kernel<<<grid, block, smem, stream>>>(args), with PDL when the context allows;
 * launch_cluster also groups `cluster` consecutive blocks into a thread-block
 * cluster (sm_90: they share their shared memory). */
int cuda_skipped(cuda_ctx *c, const void *kernel);
/* attention_mma.cu: prompt attention over an f16 cache on the tensor cores; 0 where it does not apply */
int cuda_attention_mma(cuda_ctx *c, float *out, const float *q, int layer, int n_head, int n_head_kv, int hd,
                       int window);

template <typename... KArgs, typename... Args>
static inline void launch_cluster(cuda_ctx *c, unsigned cluster, void (*kernel)(KArgs...), dim3 grid, dim3 block,
                                  size_t smem, Args... args) {
    const int carve = c->carve;
    c->carve = 0;
    if (c->skip[0] && cuda_skipped(c, (const void *)kernel)) return;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = c->stream;
    cudaLaunchAttribute at[3];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = c->pdl;
    unsigned na = 1;
    if (cluster > 1) {
        at[na].id = cudaLaunchAttributeClusterDimension;
        at[na].val.clusterDim.x = cluster;
        at[na].val.clusterDim.y = 1;
        at[na++].val.clusterDim.z = 1;
    }
    if (carve) { /* this launch's SMs with all of their L1 as shared memory */
        at[na].id = cudaLaunchAttributePreferredSharedMemoryCarveout;
        at[na++].val.sharedMemCarveout = 100;
    }
    cfg.attrs = at;
    cfg.numAttrs = na;
    CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, (KArgs)args...));
}

/* Clusters of `cs` blocks (`threads` threads, `smem` bytes of dynamic shared
 * memory) of `kernel` that the device holds at once; 0 where it does not answer.
 * A cluster must fit inside one GPC, so fewer are resident than SMs / cs. */
static inline int cuda_resident_clusters(const void *kernel, unsigned cs, int threads, size_t smem) {
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeClusterDimension;
    at[0].val.clusterDim.x = cs, at[0].val.clusterDim.y = 1, at[0].val.clusterDim.z = 1;
    cfg.gridDim = dim3(cs), cfg.blockDim = dim3((unsigned)threads), cfg.dynamicSmemBytes = smem;
    cfg.attrs = at, cfg.numAttrs = 1;
    int n = 0;
    if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) != cudaSuccess) {
        (void)cudaGetLastError();
        n = 0;
    }
    return n;
}

template <typename... KArgs, typename... Args>
static inline void launch(cuda_ctx *c, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Args... args) {
    launch_cluster(c, 1, kernel, grid, block, smem, args...);
}

/* CALL(r) with r the compile-time constant equal to R (1..8, the activation rows
 * of a decode product; larger R runs CALL(8)): the kernel templates' dispatch. */
#define ROWS_SWITCH(R, CALL)                                                                \
    switch (R) {                                                                            \
    case 1: CALL(1); break;                                                                 \
    case 2: CALL(2); break;                                                                 \
    case 3: CALL(3); break;                                                                 \
    case 4: CALL(4); break;                                                                 \
    case 5: CALL(5); break;                                                                 \
    case 6: CALL(6); break;                                                                 \
    case 7: CALL(7); break;                                                                 \
    default: CALL(8); break;                                                                \
    }

/* ---- device helpers ---------------------------------------------------------------- */

/* G3N_QTRACE (cuda_ctx.qtrace): %globaltimer, and one block's record: its
 * product (O, K), grid and index, SM, and five times t (start, PDL release,
 * activations staged, last item, end) */
__device__ __forceinline__ unsigned long long gtime() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ void trace_block(unsigned long long *trace, int O, int K, const unsigned long long t[5]) {
    unsigned smid;
    asm("mov.u32 %0, %%smid;" : "=r"(smid));
    const unsigned long long i = atomicAdd(trace, 1ull) % QTRACE_RECS;
    unsigned long long *rec = trace + 8 + i * 8;
    rec[0] = (unsigned long long)O << 32 | (unsigned)K;
    rec[1] = (unsigned long long)gridDim.x << 48 | (unsigned long long)gridDim.y << 32 | blockIdx.x << 16 | blockIdx.y;
    rec[2] = smid;
    for (int k = 0; k < 5; k++) rec[3 + k] = t[k];
}

/* Prompt attention's tiles (k_attn_tiled, k_attn_mma) are taken in runs of one
 * sequence: the run from token r0 (below tend) is of the returned sequence and
 * ends before r1, and its tokens together see keys [jlo, jhi]. */
__device__ __forceinline__ int att_run(const int32_t *pos, const int32_t *seq, int r0, int tend, int window, int &r1,
                                       int &jlo, int &jhi) {
    const int s = seq[r0];
    r1 = r0 + 1, jlo = INT_MAX, jhi = -1;
    while (r1 < tend && seq[r1] == s) r1++;
    for (int t = r0; t < r1; t++) {
        const int p = pos[t];
        jlo = min(jlo, window > 0 ? max(0, p - window + 1) : 0), jhi = max(jhi, p);
    }
    return s;
}

/* K/V cache elements (g3n_kv_layer: f32, or f16 rounded to nearest even) */
__device__ __forceinline__ float kv_ld(const g3n_kv_layer &L, const void *p, size_t i) {
    return L.f16 ? __half2float(((const __half *)p)[i]) : ((const float *)p)[i];
}
__device__ __forceinline__ void kv_st(const g3n_kv_layer &L, void *p, size_t i, float x) {
    if (L.f16) ((__half *)p)[i] = __float2half_rn(x);
    else ((float *)p)[i] = x;
}
/* x as an f16 cache holds it (the step's own key and value, used from registers) */
__device__ __forceinline__ float kv_round(int f16, float x) { return f16 ? __half2float(__float2half_rn(x)) : x; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* N sums over the block at once (one pair of barriers); every thread gets them.
 * `sh` holds at least 32 * N floats. */
template <int N>
__device__ __forceinline__ void block_sum_n(float v[N], float *sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int k = 0; k < N; k++) v[k] = warp_sum(v[k]);
    __syncthreads();
    if (lane == 0)
#pragma unroll
        for (int k = 0; k < N; k++) sh[warp * N + k] = v[k];
    __syncthreads();
#pragma unroll
    for (int k = 0; k < N; k++) v[k] = warp_sum(lane < nw ? sh[lane * N + k] : 0.0f);
}

/* Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread
 * gets the result. `sh` holds at least 32 floats. */
__device__ __forceinline__ float block_sum(float v, float *sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads(); /* sh may still be read from a previous call */
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0f;
    return warp_sum(v);
}

/* A chunk of 8 weights as loaded (16 bytes for bf16/f16, 32 for f32): loads are
 * issued for several chunks before any is converted, so they are in flight together. */
template <typename T> struct raw8 { uint4 u; };
template <> struct raw8<float> { float4 a, b; };

__device__ __forceinline__ void ldraw(raw8<__nv_bfloat16> &r, const __nv_bfloat16 *p) { r.u = __ldcs((const uint4 *)p); }
__device__ __forceinline__ void ldraw(raw8<__half> &r, const __half *p) { r.u = __ldcs((const uint4 *)p); }
__device__ __forceinline__ void ldraw(raw8<float> &r, const float *p) {
    r.a = __ldcs((const float4 *)p);
    r.b = __ldcs((const float4 *)p + 1);
}

__device__ __forceinline__ void cvt8(const raw8<__nv_bfloat16> &r, float f[8]) {
    const uint32_t w[4] = {r.u.x, r.u.y, r.u.z, r.u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ void cvt8(const raw8<__half> &r, float f[8]) {
    const uint32_t w[4] = {r.u.x, r.u.y, r.u.z, r.u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        __half2 h;
        memcpy(&h, &w[i], 4);
        const float2 v = __half22float2(h);
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
    }
}
__device__ __forceinline__ void cvt8(const raw8<float> &r, float f[8]) {
    f[0] = r.a.x, f[1] = r.a.y, f[2] = r.a.z, f[3] = r.a.w, f[4] = r.b.x, f[5] = r.b.y, f[6] = r.b.z, f[7] = r.b.w;
}

/* Gaussian top-k cutoff of a row of n values held EPT per thread in registers:
 * mean + kappa * population std, reduced over the block (every thread gets it). */
template <int EPT>
__device__ __forceinline__ float topk_cutoff(const float v[EPT], int n, float kappa, float *red) {
    float sm = 0;
#pragma unroll
    for (int k = 0; k < EPT; k++) sm += v[k];
    const float mean = block_sum(sm, red) / (float)n;
    float vv = 0;
#pragma unroll
    for (int k = 0; k < EPT; k++) vv += (v[k] - mean) * (v[k] - mean);
    return mean + sqrtf(block_sum(vv, red) / (float)n) * kappa;
}

/* cp.async: 16 bytes global -> shared, not through registers; 4-byte form */
__device__ __forceinline__ void cp_async16(void *dst, const void *src) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
}
/* The same for a weight's bytes, which a step reads once: the copy asks the L2
 * to evict them first (an access policy), so the stream does not push out what
 * is still to be read (the L2 prefetch of the MLP's matrices, keys and values).
 * E4B 8-bit +3.2-4.2% alone (docs/SPEED.md, twenty-seventh session). The 16-bit
 * products' `ld.cs` loads measured level with the same hint. Not in sparse.cu's
 * copies: there it made the kernel stop at an illegal instruction on the H100
 * (not understood). */
__device__ __forceinline__ void cp_async16w(void *dst, const void *src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    uint64_t pol;
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "l"(pol)
                 : "memory");
#else
    cp_async16(dst, src);
#endif
}
__device__ __forceinline__ void cp_async4(void *dst, const void *src) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(d), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ float load_w(const void *w, int dtype, size_t i) {
    if (dtype == G3N_BF16) return __bfloat162float(((const __nv_bfloat16 *)w)[i]);
    if (dtype == G3N_F16) return __half2float(((const __half *)w)[i]);
    return ((const float *)w)[i];
}

/* A quantized weight as the reference forms it (g3n_quant_w: the product
 * rounded, then the sum; no fused multiply-add). */
__device__ __forceinline__ float qaffine(float scale, float q, float bias) {
    return __fadd_rn(__fmul_rn(scale, q), bias);
}

/* Element col of row r of a quantized matrix (K columns), dequantized exactly as
 * the reference does it. */
__device__ __forceinline__ float qdeq(const uint32_t *W, const void *S, const void *B, int sdt, int bits, int group,
                                      int K, size_t r, int col) {
    const uint32_t *row = W + r * ((size_t)K * bits / 32);
    const size_t p = (size_t)col * bits;
    uint64_t v = row[p >> 5];
    if ((p & 31) + bits > 32) v |= (uint64_t)row[(p >> 5) + 1] << 32;
    const float q = (float)((uint32_t)(v >> (p & 31)) & ((1u << bits) - 1u));
    const size_t g = r * (size_t)(K / group) + col / group;
    return qaffine(load_w(S, sdt, g), q, load_w(B, sdt, g));
}

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

__device__ __forceinline__ float gelu_tanh_d(float z) {
    const float k = 0.7978845608028654f;
    return 0.5f * z * (1.0f + tanhf(k * (z + 0.044715f * z * z * z)));
}

/* ---- launchers (ops.cu, gemv.cu, attention.cu) ---------------------------------------- */

void cuda_op_matmul(g3n_backend *be, float *y, const g3n_mat *W, const float *x, int rows);
void cuda_op_embed(g3n_backend *be, float *y, const g3n_mat *W, float scale);
void cuda_op_rmsnorm(g3n_backend *be, float *y, const float *x, g3n_vec w, int rows, int dim, float eps);
void cuda_op_rope(g3n_backend *be, float *x, int n_head, int head_dim, float theta);
void cuda_op_kv_store(g3n_backend *be, int layer, const float *k, const float *v, int kv_dim);
void cuda_op_attention(g3n_backend *be, float *out, const float *q, int layer, int n_head,
                       int n_head_kv, int head_dim, int window);
void cuda_op_add(g3n_backend *be, float *y, const float *a, const float *b, size_t n);
void cuda_op_scale(g3n_backend *be, float *y, const float *x, float s, size_t n);
void cuda_op_add3_scale(g3n_backend *be, float *y, const float *a, const float *b, const float *c,
                        float s, size_t n);
void cuda_op_mul_vec(g3n_backend *be, float *y, const float *x, g3n_vec w, int rows, int dim);
void cuda_op_gelu_mul(g3n_backend *be, float *y, const float *g, const float *u, size_t n);
void cuda_op_gaussian_topk(g3n_backend *be, float *x, int rows, int dim, float kappa);
void cuda_op_tanh(g3n_backend *be, float *y, const float *x, size_t n);
void cuda_op_softcap(g3n_backend *be, float *x, size_t n, float cap);
void cuda_op_altup_predict(g3n_backend *be, float *pred, const float *S, const float *m,
                           g3n_vec coefs, int A, int rows, int dim);
void cuda_op_altup_correct(g3n_backend *be, float *corr, const float *pred, const float *o,
                           const float *m, g3n_vec coefs, int A, int rows, int dim);
void cuda_op_magnitude_match(g3n_backend *be, float *y, const float *ref, int rows, int dim,
                             float floor_ms);
void cuda_op_ple_combine(g3n_backend *be, float *out, const float *proj, const float *z,
                         g3n_vec norm, int rows, int L, int P, float proj_scale, float eps,
                         float out_scale);
double cuda_read_bandwidth(g3n_backend *be, size_t bytes);
void cuda_own(cuda_ctx *c, void *d);
void cuda_copy_wait(cuda_ctx *c, void *dst, const void *src, size_t bytes, cudaMemcpyKind kind);
void *cuda_transpose_matrix(cuda_ctx *c, const void *w, int rows, int cols, size_t esize);
void cuda_matmul_transposed(cuda_ctx *c, float *y, const g3n_mat *W, const float *x, int rows);
const __nv_bfloat16 *cuda_split_bf16(cuda_ctx *c, const float *x, int rows, int K);
void cuda_sparse_reserve(cuda_ctx *c, int rows, int cols);
int cuda_mlp_sparse(cuda_ctx *c, float *y, const float *gate, const g3n_mat *Wu, const g3n_mat *Wd, const float *u,
                    int rows, float kappa);
int cuda_qtranspose_ok(const g3n_mat *m);
void *cuda_qtranspose(cuda_ctx *c, const g3n_mat *m);
void cuda_op_mlp_sparse(g3n_backend *be, float *y, float *gate, float *up, const g3n_mat *Wg,
                        const g3n_mat *Wu, const g3n_mat *Wd, const float *u, int rows, float kappa);
void cuda_pf_release(cuda_ctx *c);
/* unembed.cu (the best logits through an 8-bit copy of the unembedding); the exact
 * rows in gemv.cu: UP_ROWS rows a block of UP_THREADS */
#define UP_ROWS 2048
#define UP_THREADS 256
size_t cuda_op_unembed_prepare(g3n_backend *be, const g3n_mat *W);
void cuda_op_logits_pruned(g3n_backend *be, float *logits, const g3n_mat *W, const float *h, int rows, int n, int m,
                           float cap);
void cuda_unembed_free(cuda_ctx *c);
void cuda_unembed_exact(cuda_ctx *c, float *logits, const g3n_mat *W, const float *x, int xrows, const float *cm,
                        const float *bmax, int nblk, const float *xn, int n, int m, float cap);
void cuda_op_matmul_multi(g3n_backend *be, int n, const g3n_mat *const *W, float *const *y,
                          const float *const *x, int rows);
void cuda_op_altup_predict_fused(g3n_backend *be, float *pred, float *x, float *S, float *ple_proj,
                                 g3n_vec ple_norm, const g3n_mat *router, g3n_vec router_norm,
                                 g3n_vec coefs, g3n_vec in_norm, int A, int rows, int dim, float eps);
void cuda_op_matmul_gelu_mul(g3n_backend *be, float *y, const g3n_mat *W, const float *x, const float *m,
                             int rows);
void cuda_op_matmul_gate_up(g3n_backend *be, float *act, float *up, const g3n_mat *Wg,
                            const g3n_mat *Wu, const float *x, int rows);
void cuda_op_qkv_attention(g3n_backend *be, float *out, float *q, float *k, float *v, g3n_vec q_norm,
                           g3n_vec k_norm, int layer, int attn_layer, int n_head, int n_head_kv, int head_dim,
                           float theta, float eps, int window);
void cuda_op_qkv_post(g3n_backend *be, float *q, float *k, float *v, g3n_vec q_norm, g3n_vec k_norm,
                      int layer, int n_head, int n_head_kv, int head_dim, float theta, float eps);
void cuda_op_attn_residual(g3n_backend *be, float *s, float *u, float *att, float *lau_raw,
                           const float *x, const float *a, g3n_vec post_att, g3n_vec post_laurel,
                           g3n_vec pre_ff, int rows, int dim, float eps, float res_scale);
void cuda_op_mlp_act(g3n_backend *be, float *gate, const float *up, int rows, int n_ff, float kappa);
void cuda_op_altup_correct_fused(g3n_backend *be, float *pred, float *qs, float *f, const float *s,
                                 g3n_vec post_ff, const g3n_mat *router, g3n_vec router_norm,
                                 g3n_vec coefs, g3n_vec out_scale, int A, int rows, int dim,
                                 float eps);
void cuda_op_altup_correct_gate(g3n_backend *be, float *out, const float *pred, float *qs, float *f, int f_parts,
                                const float *s,
                                g3n_vec post_ff, const g3n_mat *router, g3n_vec router_norm, g3n_vec coefs,
                                g3n_vec out_scale, float *pg, const g3n_mat *gate, const float *ple, int A, int rows,
                                int dim, float eps);
/* quant.cu: mlx affine-quantized matrices (W->bits > 0) */
int cuda_quant_prepare(cuda_ctx *c, g3n_mat *m, char *err, size_t errlen);
void cuda_quant_matmul(cuda_ctx *c, float *y, const g3n_mat *W, const float *x, int rows);
int cuda_quant_matmul_parts(cuda_ctx *c, float *y, const g3n_mat *W, const float *x, int rows, int cap);
void cuda_quant_op_multi(g3n_backend *be, int n, const g3n_mat *const *W, float *const *y,
                         const float *const *x, int rows);
void cuda_quant_op_gelu_mul(g3n_backend *be, float *y, const g3n_mat *W, const float *x, const float *m, int rows);
void cuda_quant_op_gate_up(g3n_backend *be, float *act, float *up, const g3n_mat *Wg, const g3n_mat *Wu,
                           const float *x, int rows);
void cuda_quant_embed(cuda_ctx *c, float *y, const g3n_mat *W, float scale);
void cuda_quant_host_row(const cuda_host_table *t, int r, void *slot);
void cuda_quant_embed_staged(cuda_ctx *c, float *y, const cuda_host_table *t, const void *stage, float scale);
void cuda_op_magnitude_match_planes(g3n_backend *be, float *S, size_t plane, int A, int rows, int dim,
                                    float floor_ms);
void cuda_op_altup_unembed(g3n_backend *be, float *out, const float *S0, float *v, size_t vstride, g3n_vec norm,
                           int A, int rows, int dim, float floor_ms, float eps);
void cuda_op_ple_add(g3n_backend *be, float *pred, float *proj, g3n_vec post_norm, int A, int rows,
                     int dim, float eps);
int cuda_op_logits_top_queue(g3n_backend *be, const float *logits, int rows, size_t stride, int n, int m);
int cuda_op_logits_top(g3n_backend *be, const float *logits, int rows, size_t stride, int n, int m, float *vals,
                       int32_t *ids, uint8_t *ok);
int cuda_op_decode_layers(g3n_backend *be, const g3n_dec_model *m, const g3n_dec_bufs *b);
void cuda_mega_report(cuda_ctx *c);

#endif
