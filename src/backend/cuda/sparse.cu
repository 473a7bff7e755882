/* sparse.cu: exact activation sparsity for the MLPs with a Gaussian top-k
 * (layers 0-9 of E2B/E4B). After the top-k about 5% of the gate entries are
 * non-zero; only those up rows and down columns are read. The down matrix of
 * such a layer is stored transposed ([I, D]) at load, so a needed column is one
 * contiguous row. Steps (one token row):
 *   gate = Wg . u (gemv.cu / quant.cu)  ->  k_mlp_sparse: the cutoff, each
 *   block's survivors, their activations gelu(g - cutoff) * (Wu[i] . u) and
 *   partial sums of act_i * WdT[i]  ->  k_reduce_t: y in a fixed order
 *   (deterministic).
 * k_gemv_t + k_reduce_t are also the product with any transposed matrix (the
 * dense path through such a layer: prompts, batches). */
#include "cuda_common.cuh"

#define T_CHUNK 128 /* rows of W^T per block of k_gemv_t */

/* ---- transpose at load ----------------------------------------------------------------- */

template <typename E>
__global__ void k_transpose(E *dst, const E *src, int rows, int cols) {
    __shared__ E tile[32][33];
    const int c0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
    for (int i = threadIdx.y; i < 32; i += blockDim.y) {
        const int r = r0 + i, c = c0 + threadIdx.x;
        if (r < rows && c < cols) tile[i][threadIdx.x] = src[(size_t)r * cols + c];
    }
    __syncthreads();
    for (int i = threadIdx.y; i < 32; i += blockDim.y) {
        const int c = c0 + i, r = r0 + threadIdx.x;
        if (r < rows && c < cols) dst[(size_t)c * rows + r] = tile[threadIdx.x][i];
    }
}

/* W [rows, cols] on the device -> W^T [cols, rows] at t (2- or 4-byte elements), waited for. */
static void transpose_into(cuda_ctx *c, void *t, const void *w, int rows, int cols, size_t esize) {
    dim3 grid((cols + 31) / 32, (rows + 31) / 32), block(32, 8);
    if (esize == 2) k_transpose<uint16_t><<<grid, block, 0, c->stream>>>((uint16_t *)t, (const uint16_t *)w, rows, cols);
    else k_transpose<float><<<grid, block, 0, c->stream>>>((float *)t, (const float *)w, rows, cols);
    CUDA_LAUNCHED();
    CUDA_CHECK(cudaStreamSynchronize(c->stream));
}

/* W [rows, cols] on the device -> a new buffer holding W^T [cols, rows]. */
void *cuda_transpose_matrix(cuda_ctx *c, const void *w, int rows, int cols, size_t esize) {
    void *t = NULL;
    CUDA_CHECK(cudaMalloc(&t, (size_t)rows * cols * esize));
    transpose_into(c, t, w, rows, cols, esize);
    return t;
}

/* ---- the sparse MLP of one row in one kernel ---------------------------------------------
 *
 * Block b owns gate entries [per b, per (b + 1)). Every block computes the
 * top-k cutoff over the whole gate row itself (the same code on the same values,
 * so every block gets the same cutoff), keeps its own survivors in ascending
 * order, computes their activations gelu(g - cutoff) * (Wu[i] . u), and adds
 * act_i * W_d^T[i] over them into its partial of the output: no selection
 * kernel, no global index list. k_reduce_t then adds the partials in block order.
 *
 * The kernel is a chain of dependent memory round trips (the gate row, the up
 * rows, the down rows), so its shape is chosen to make that chain short: about
 * one block per SM (`per` gate entries each, sp_per: ~6 survivors at E4B's 5%),
 * one thread per 8 outputs (so no thread takes two turns at E4B's 2560), the
 * cutoff from registers (the row read once), the survivors' down rows copied
 * (cp.async) while their up rows are read (they need only the indices), and a
 * quantized matrix's scale and bias rows staged before the PDL wait. Its code
 * runs once per block, so it is kept short where it loops (sp_dot). Measured
 * stage by stage with -DSP_TRACE (docs/SPEED.md, tenth session). */

#define SP_RMAX 256 /* gate entries per block, at most */
#define SP_TMAX 320 /* threads per block, at most */

/* Code j (0-7) of 8 consecutive BITS-wide codes (4 or 8) packed in w[0] (4 bits) or w[0..1] (8 bits). */
__device__ __forceinline__ uint32_t sp_code(const uint32_t *w, int bits, int j) {
    return bits == 4 ? (w[0] >> (4 * j)) & 15u : (w[j >> 2] >> (8 * (j & 3))) & 255u;
}
__device__ __forceinline__ float sp_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float sp_f(__half v) { return __half2float(v); }

/* Row r of an up matrix dotted with us (shared memory, K floats, K % 8 == 0) by one
 * warp. The row is first copied into the warp's buffer `buf` in shared memory
 * (cp.async, one round trip, no registers; quantized rows' scales and biases as
 * floats beside it), then a short loop takes chunks of 8 weights at chunk
 * positions lane, lane + 32, ... A short loop because each block runs this code
 * once: an unrolled one (the loads of all steps in registers, then all the
 * arithmetic) measured 5.6 us a row at 4 bits, mostly instruction fetches
 * (docs/SPEED.md, tenth session). Quantized weights are formed as the reference
 * forms them. The caller waits for every cp.async of the thread (the down rows'
 * too, issued just before). */
template <typename T>
__device__ float sp_dot(char *buf, const T *W, size_t r, const float *us, int K) {
    const int lane = threadIdx.x & 31, nc = K / 8; /* chunks of 8 */
    const uint4 *src = (const uint4 *)(W + r * (size_t)K);
    for (int c = lane; c < nc * (int)sizeof(T) / 2; c += 32) cp_async16((uint4 *)buf + c, src + c);
    cp_async_commit();
    cp_async_wait<0>();
    __syncwarp();
    float acc = 0;
#pragma unroll 1
    for (int c = lane; c < nc; c += 32) {
        raw8<T> x;
#pragma unroll
        for (int k = 0; k < (int)sizeof(T) / 2; k++) ((uint4 *)&x)[k] = ((const uint4 *)buf)[c * sizeof(T) / 2 + k];
        float f[8];
        cvt8(x, f);
        const float4 x0 = *(const float4 *)(us + 8 * c), x1 = *(const float4 *)(us + 8 * c + 4);
        const float xv[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
        for (int j = 0; j < 8; j++) acc += f[j] * xv[j];
    }
    __syncwarp(); /* buf is the warp's next row's */
    return warp_sum(acc);
}

/* 4 or 8 bits with 16-bit scales ST and a power-of-two group (1 << gsh); K % 32 == 0 */
template <int BITS, typename ST>
__device__ float sp_qdot_t(char *buf, const uint32_t *W, const ST *S, const ST *B, int gsh, size_t r, const float *us,
                           int K) {
    const int lane = threadIdx.x & 31, nc = K / 8, ng = K >> gsh;
    const uint4 *src = (const uint4 *)(W + r * (size_t)(K / 32 * BITS));
    for (int c = lane; c < K / 32 * BITS / 4; c += 32) cp_async16((uint4 *)buf + c, src + c);
    cp_async_commit();
    float *sc = (float *)(buf + (size_t)K * BITS / 8), *bi = sc + ng;
    for (int g = lane; g < ng; g += 32) sc[g] = sp_f(S[r * ng + g]), bi[g] = sp_f(B[r * ng + g]);
    cp_async_wait<0>();
    __syncwarp();
    float acc = 0;
#pragma unroll 1
    for (int c = lane; c < nc; c += 32) {
        uint32_t w[BITS / 4];
#pragma unroll
        for (int k = 0; k < BITS / 4; k++) w[k] = ((const uint32_t *)buf)[c * (BITS / 4) + k];
        const float s = sc[(8 * c) >> gsh], b = bi[(8 * c) >> gsh];
        const float4 x0 = *(const float4 *)(us + 8 * c), x1 = *(const float4 *)(us + 8 * c + 4);
        const float xv[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
        for (int j = 0; j < 8; j++) acc += qaffine(s, (float)sp_code(w, BITS, j), b) * xv[j];
    }
    __syncwarp();
    return warp_sum(acc);
}

/* Any other quantized row (other widths, f32 scales, other groups): one weight at
 * a time from global memory. */
__device__ float sp_qdot(const uint32_t *W, const void *S, const void *B, int sdt, int bits, int group, size_t r,
                         const float *us, int K) {
    float acc = 0;
    for (int i = threadIdx.x & 31; i < K; i += 32) acc += qdeq(W, S, B, sdt, bits, group, K, r, i) * us[i];
    return warp_sum(acc);
}

/* Shared memory a warp's up row takes in sp_dot / sp_qdot_t (16-byte multiples), 0 for sp_qdot. */
static size_t sp_up_bytes(const g3n_mat *Wu) {
    const int K = Wu->cols, G = Wu->group_size;
    if (!Wu->bits) return ((size_t)K * g3n_dtype_size((g3n_dtype)Wu->dtype) + 15) / 16 * 16;
    if ((Wu->bits == 4 || Wu->bits == 8) && (Wu->sdtype == G3N_BF16 || Wu->sdtype == G3N_F16) && K % 32 == 0 &&
        G >= 8 && (G & (G - 1)) == 0)
        return ((size_t)K * Wu->bits / 8 + 2 * sizeof(float) * (size_t)(K / G) + 15) / 16 * 16;
    return 0;
}

/* The up matrix as the fused kernel reads it: 16-bit/f32 rows (dtype) or quantized (bits > 0). */
typedef struct {
    const void *W, *S, *B;
    int dtype, bits, group, sdt;
    int ub; /* shared memory a warp's row takes (sp_up_bytes), 0: sp_qdot */
} sp_up;

/* The down matrix's columns as the fused kernel reads them: row i of W_d^T
 * ([n, O]), 8 outputs o..o+7 at a time, copied by cp.async into the thread's
 * part of a ring slot in shared memory (SB bytes a thread, stored [piece][thread]
 * for nt threads), then converted from there to the reference's values. What
 * the whole block's rows share (the quantized form's scale and bias rows of its
 * groups: GB bytes a thread per group, at most ngroups) is staged once, before
 * the PDL wait (weights: no earlier kernel writes them). */
template <typename T> struct dn_plain { /* stored transposed, 16-bit or f32 */
    static constexpr int SB = sizeof(T) * 8, GB = 0;
    const T *WT;
    int O;
    __host__ __device__ int ngroups(int per) const { return 0; }
    __device__ __forceinline__ void stage_groups(char *gs, int nt, int i0, int per, int n, int o) const {}
    __device__ __forceinline__ void stage(char *slot, int nt, int i, int o) const {
        const uint4 *src = (const uint4 *)(WT + (size_t)i * O + o);
#pragma unroll
        for (int k = 0; k < SB / 16; k++) cp_async16(slot + ((size_t)k * nt + threadIdx.x) * 16, src + k);
    }
    __device__ __forceinline__ void cvt(const char *slot, const char *gs, int nt, int i, int i0, float w[8]) const {
        raw8<T> x;
#pragma unroll
        for (int k = 0; k < SB / 16; k++) ((uint4 *)&x)[k] = ((const uint4 *)slot)[(size_t)k * nt + threadIdx.x];
        cvt8(x, w);
    }
};
/* quantized (BITS 4 or 8, 16-bit scales ST): the transposed codes [n, O] and the
 * transposed scales and biases [n / G, O] (cuda_qtranspose). A slot holds a
 * row's codes; the block's groups (those of entries i0..i0 + per - 1, at most
 * ceil(per / G) + 1) each hold their scale row, then their bias row. */
template <int BITS, typename ST> struct dn_quant {
    static constexpr int SB = BITS, GB = 32;
    const uint32_t *qT;
    const ST *sT, *bT;
    int O, G;
    __host__ __device__ int ngroups(int per) const { return (per + G - 1) / G + 1; } /* straddling groups too */
    __device__ __forceinline__ void stage_groups(char *gs, int nt, int i0, int per, int n, int o) const {
        const int t = threadIdx.x, g0 = i0 / G, g1 = (min(i0 + per, n) - 1) / G;
        for (int k = 0; k <= g1 - g0; k++) {
            const size_t g = (size_t)(g0 + k) * O + o;
            cp_async16(gs + ((size_t)(2 * k) * nt + t) * 16, sT + g);
            cp_async16(gs + ((size_t)(2 * k + 1) * nt + t) * 16, bT + g);
        }
    }
    __device__ __forceinline__ void stage(char *slot, int nt, int i, int o) const {
        const size_t e = (size_t)i * O + o;
#pragma unroll
        for (int k = 0; k < BITS / 4; k++)
            cp_async4(slot + ((size_t)threadIdx.x * (BITS / 4) + k) * 4, qT + e * BITS / 32 + k);
    }
    __device__ __forceinline__ void cvt(const char *slot, const char *gs, int nt, int i, int i0, float w[8]) const {
        const int t = threadIdx.x, k = i / G - i0 / G;
        raw8<ST> rs, rb;
        rs.u = ((const uint4 *)gs)[(size_t)(2 * k) * nt + t];
        rb.u = ((const uint4 *)gs)[(size_t)(2 * k + 1) * nt + t];
        uint32_t q[BITS / 4];
#pragma unroll
        for (int j = 0; j < BITS / 4; j++) q[j] = ((const uint32_t *)slot)[t * (BITS / 4) + j];
        float sc[8], bi[8];
        cvt8(rs, sc);
        cvt8(rb, bi);
#pragma unroll
        for (int j = 0; j < 8; j++) w[j] = qaffine(sc[j], (float)sp_code(q, BITS, j), bi[j]);
    }
};

/* k_mlp_sparse's gate entries per block for a gate row of n: about one block per
 * SM (a multiple of 32, 32 to SP_RMAX); G3N_SP_PER=k sets it (timing, and
 * test_ops' groups that straddle blocks), read at each call. */
static int sp_per(const cuda_ctx *c, int n) {
    const char *e = getenv("G3N_SP_PER");
    const int fixed = e ? atoi(e) : 0;
    const int per = fixed > 0 ? fixed : (n / G3N_MAX(c->n_sm, 1) + 31) / 32 * 32;
    return G3N_MIN(G3N_MAX(per, 32), SP_RMAX) / 32 * 32;
}

/* Scratch of the transposed products for a down matrix of rows x cols (sized at
 * load, before any recording): k_gemv_t's partials and k_mlp_sparse's, for up to
 * 8 activation rows. */
void cuda_sparse_reserve(cuda_ctx *c, int rows, int cols) {
    const int per = sp_per(c, cols);
    const size_t chunks = G3N_MAX((cols + T_CHUNK - 1) / T_CHUNK, (cols + per - 1) / per);
    const size_t part = chunks * (size_t)rows * 8;
    if (part > c->sp_part_n) {
        cudaFree(c->sp_part);
        CUDA_CHECK(cudaMalloc((void **)&c->sp_part, part * sizeof(float)));
        c->sp_part_n = part;
    }
}

/* Built with -DSP_TRACE, thread 0 of each block of k_mlp_sparse records
 * %globaltimer at its start, the PDL release, the cutoff, its survivors, the up
 * rows (its own warp's, and the block's) and the end; the mean and 90th
 * percentile of each stage over the last half of the run's blocks, warp 0's up
 * row and the mean number of survivors are printed at exit. G3N_SP_FLAGS=1 leaves
 * the up rows out, 2 the down rows' copies (timing only: the results are wrong).
 * docs/SPEED.md, tenth session. */
#ifdef SP_TRACE
#define SP_TRN (1 << 18)
__device__ unsigned long long sp_tr[SP_TRN][8];
__device__ unsigned sp_trn;
#define SP_T(k) const unsigned long long tt##k = threadIdx.x == 0 ? gtime() : 0
__device__ int sp_flags; /* G3N_SP_FLAGS */
#define SP_DONE() if (threadIdx.x == 0) { const unsigned i_ = atomicAdd(&sp_trn, 1); if (i_ < SP_TRN) { \
    sp_tr[i_][0] = tt0, sp_tr[i_][1] = tt1, sp_tr[i_][2] = tt2, sp_tr[i_][3] = tt3, sp_tr[i_][4] = tt4, \
    sp_tr[i_][5] = tt5, sp_tr[i_][6] = tt6, sp_tr[i_][7] = (unsigned long long)cnt; } }
static int sp_cmp(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
static void sp_trace_dump(void) {
    unsigned n = 0;
    cudaMemcpyFromSymbol(&n, sp_trn, sizeof n);
    if (n > SP_TRN) n = SP_TRN;
    static unsigned long long h[SP_TRN][8];
    static double d[SP_TRN];
    cudaMemcpyFromSymbol(h, sp_tr, (size_t)n * sizeof h[0]);
    const unsigned m = n - n / 2;
    fprintf(stderr, "sp trace: %u blocks (last %u), stage mean/p90 us:", n, m);
    for (int k = 1; k < 6; k++) {
        double s = 0;
        for (unsigned i = n / 2; i < n; i++) s += d[i - n / 2] = (double)(h[i][k] - h[i][k - 1]) / 1000.0;
        qsort(d, m, sizeof d[0], sp_cmp);
        fprintf(stderr, " %d:%.2f/%.2f", k, m ? s / m : 0.0, m ? d[m * 9 / 10] : 0.0);
    }
    double u = 0, c = 0;
    for (unsigned i = n / 2; i < n; i++) u += (double)(h[i][6] - h[i][3]) / 1000.0, c += (double)h[i][7];
    fprintf(stderr, " warp0 up %.2f survivors %.2f", m ? u / m : 0.0, m ? c / m : 0.0);
    fprintf(stderr, "\n");
}
#else
#define SP_T(k)
#define SP_DONE()
#endif

/* Activation row r = blockIdx.y: partial[b][r][o] = sum over block b's survivors i
 * of act_i * W_d^T[i][o], for a gate row of n entries (n % 4 == 0, at most
 * 4 * SP_CV * blockDim.x); K % 8 == 0, O % 8 == 0; `per` (a multiple of 32, at most
 * SP_RMAX and blockDim.x) gate entries a block. Dynamic shared memory: K floats
 * (the row of u), the block's group rows (DN::ngroups(per) of DN::GB bytes a
 * thread), then nbs ring slots of down rows (DN::SB bytes a thread each). */
#define SP_CV 16 /* float4s of the gate row a thread holds for the cutoff */
template <typename DN>
__global__ void __launch_bounds__(SP_TMAX, 1)
    k_mlp_sparse(float *partial, const float *gate, const float *u, sp_up up, DN dn, int n, int K, int per, int nbs,
                 float kappa) {
    extern __shared__ float us[];
    __shared__ float red[32], sval[SP_RMAX];
    __shared__ int sidx[SP_RMAX], wcnt[SP_RMAX / 32];
    const int t = threadIdx.x, nt = blockDim.x, lane = t & 31, warp = t >> 5, r = blockIdx.y, O = dn.O;
    const int i0 = blockIdx.x * per, o0 = t * 8;
    const float *g = gate + (size_t)r * n;
    char *ub = (char *)(us + K), *gs = ub + (size_t)(nt / 32) * up.ub;
    char *ring = gs + (size_t)dn.ngroups(per) * nt * DN::GB;
    SP_T(0);
    if (o0 < O) dn.stage_groups(gs, nt, i0, per, n, o0);
    cp_async_commit();
    KERNEL_BEGIN();
    SP_T(1);
    /* the cutoff: mean + kappa * population std of the whole row, held in registers */
    float4 v[SP_CV];
#pragma unroll
    for (int k = 0; k < SP_CV; k++) {
        const int i = t + k * nt;
        v[k] = i < n / 4 ? ((const float4 *)g)[i] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    const bool mine = t < per && i0 + t < n;
    const float gv = mine ? g[i0 + t] : 0.0f;
#pragma unroll 8
    for (int i = t; i < K; i += nt) us[i] = u[(size_t)r * K + i];
    float sm = 0;
#pragma unroll
    for (int k = 0; k < SP_CV; k++) sm += (v[k].x + v[k].y) + (v[k].z + v[k].w);
    const float mean = block_sum(sm, red) / (float)n;
    float vv = 0;
#pragma unroll
    for (int k = 0; k < SP_CV; k++)
        if (t + k * nt < n / 4)
            vv += ((v[k].x - mean) * (v[k].x - mean) + (v[k].y - mean) * (v[k].y - mean)) +
                  ((v[k].z - mean) * (v[k].z - mean) + (v[k].w - mean) * (v[k].w - mean));
    const float cutoff = mean + sqrtf(block_sum(vv, red) / (float)n) * kappa;
    SP_T(2);
    /* this block's survivors, in ascending order */
    const int pw = per / 32;
    const bool keep = mine && gv > cutoff;
    const unsigned bal = __ballot_sync(0xffffffffu, keep);
    if (lane == 0 && warp < pw) wcnt[warp] = __popc(bal);
    __syncthreads();
    int pos = __popc(bal & ((1u << lane) - 1)), cnt = 0;
    for (int w = 0; w < pw; w++) {
        pos += w < warp ? wcnt[w] : 0;
        cnt += wcnt[w];
    }
    if (keep) sidx[pos] = i0 + t, sval[pos] = gelu_tanh_d(gv - cutoff);
    __syncthreads();
    SP_T(3);
    /* the first nbs survivors' down rows for this thread's first 8 outputs, in
     * flight (cp.async: no registers held) while the up rows are read; each thread
     * reads back only its own copies */
    const size_t slot = (size_t)nt * DN::SB;
    auto stage = [&](int j0, int o) {
        for (int w = 0; w < nbs && j0 + w < cnt; w++) dn.stage(ring + w * slot, nt, sidx[j0 + w], o);
        cp_async_commit();
    };
#ifdef SP_TRACE
    if (!(sp_flags & 2))
#endif
    if (o0 < O) stage(0, o0);
    /* their up rows: one warp per survivor (one loop per kind of matrix) */
#define SP_UP_ROWS(DOT)                                     \
    for (int j = warp; j < cnt; j += nt / 32) {             \
        const size_t i = (size_t)sidx[j];                   \
        const float d = DOT;                                \
        if (lane == 0) sval[j] *= d;                        \
    }
    char *wb = ub + (size_t)warp * up.ub; /* this warp's row */
#define SP_QT(NB, ST) sp_qdot_t<NB, ST>(wb, (const uint32_t *)up.W, (const ST *)up.S, (const ST *)up.B, gsh, i, us, K)
    const int q16 = up.sdt == G3N_BF16 ? 1 : up.sdt == G3N_F16 ? 2 : 0, gsh = __ffs(up.group) - 1;
#ifdef SP_TRACE
    if (sp_flags & 1) {
    } else
#endif
    if (!up.ub) SP_UP_ROWS(sp_qdot((const uint32_t *)up.W, up.S, up.B, up.sdt, up.bits, up.group, i, us, K))
    else if (up.bits == 4 && q16 == 1) SP_UP_ROWS(SP_QT(4, __nv_bfloat16))
    else if (up.bits == 4 && q16 == 2) SP_UP_ROWS(SP_QT(4, __half))
    else if (up.bits == 8 && q16 == 1) SP_UP_ROWS(SP_QT(8, __nv_bfloat16))
    else if (up.bits == 8 && q16 == 2) SP_UP_ROWS(SP_QT(8, __half))
    else if (up.dtype == G3N_BF16) SP_UP_ROWS(sp_dot(wb, (const __nv_bfloat16 *)up.W, i, us, K))
    else if (up.dtype == G3N_F16) SP_UP_ROWS(sp_dot(wb, (const __half *)up.W, i, us, K))
    else SP_UP_ROWS(sp_dot(wb, (const float *)up.W, i, us, K))
#undef SP_UP_ROWS
#undef SP_QT
    SP_T(6);
    __syncthreads();
    SP_T(4);
    /* their down rows, 8 outputs per thread (a block's group rows are those of
     * its first 8 * nt outputs: O > 8 * nt stages them again) */
    for (int o = o0; o < O; o += nt * 8) {
        if (o != o0) {
            cp_async_wait<0>();
            dn.stage_groups(gs, nt, i0, per, n, o);
        }
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int j0 = 0; j0 < cnt; j0 += nbs) {
            if (o != o0 || j0 != 0) stage(j0, o);
            cp_async_wait<0>();
            for (int w = 0; w < nbs && j0 + w < cnt; w++) {
                float wt[8];
                dn.cvt(ring + w * slot, gs, nt, sidx[j0 + w], i0, wt);
                const float a = sval[j0 + w];
#pragma unroll
                for (int q = 0; q < 8; q++) acc[q] += a * wt[q];
            }
        }
        float *p = partial + ((size_t)blockIdx.x * gridDim.y + r) * O + o;
        *(float4 *)p = make_float4(acc[0], acc[1], acc[2], acc[3]);
        *(float4 *)(p + 4) = make_float4(acc[4], acc[5], acc[6], acc[7]);
    }
    SP_T(5);
    SP_DONE();
}

/* ---- a quantized down matrix transposed (exact sparsity) --------------------------------- */

/* codes: qT[k][o] = q[o][k], BITS-wide, packed along o (O % 8 == 0) */
template <int BITS>
__global__ void k_qtranspose_codes(uint32_t *qT, const uint32_t *W, int O, int K) {
    constexpr int PW = 32 / BITS; /* codes per word */
    const size_t nw = (size_t)K * O / PW;
    for (size_t w = blockIdx.x * (size_t)blockDim.x + threadIdx.x; w < nw; w += (size_t)gridDim.x * blockDim.x) {
        const int k = (int)(w / (O / PW)), o0 = (int)(w % (O / PW)) * PW;
        uint32_t v = 0;
#pragma unroll
        for (int j = 0; j < PW; j++) {
            const size_t bit = (size_t)k * BITS;
            const uint32_t q = (W[(size_t)(o0 + j) * (K / PW) + bit / 32] >> (bit % 32)) & ((1u << BITS) - 1);
            v |= q << (BITS * j);
        }
        qT[w] = v;
    }
}

/* One allocation holding a quantized matrix [O, K] (4 or 8 bits, 16-bit scales)
 * transposed for column reads: codes [K, O], then scales and biases [K / G, O];
 * NULL when the form does not apply (cuda_qtranspose_ok; the caller keeps an
 * f32 W^T instead). */
int cuda_qtranspose_ok(const g3n_mat *m) {
    return (m->bits == 4 || m->bits == 8) && m->rows % 8 == 0 && m->cols % m->group_size == 0 &&
           (m->sdtype == G3N_BF16 || m->sdtype == G3N_F16);
}

void *cuda_qtranspose(cuda_ctx *c, const g3n_mat *m) {
    const int O = m->rows, K = m->cols, G = m->group_size, bits = m->bits;
    if (!cuda_qtranspose_ok(m)) return NULL;
    const size_t qb = (size_t)K * O * bits / 8, sb = (size_t)(K / G) * O * 2;
    char *t = NULL;
    CUDA_CHECK(cudaMalloc((void **)&t, qb + 2 * sb));
    const size_t nw = (size_t)K * O * bits / 32;
    const dim3 grid((unsigned)G3N_MIN((nw + 255) / 256, (size_t)65535));
    if (bits == 4) k_qtranspose_codes<4><<<grid, 256, 0, c->stream>>>((uint32_t *)t, (const uint32_t *)m->data, O, K);
    else k_qtranspose_codes<8><<<grid, 256, 0, c->stream>>>((uint32_t *)t, (const uint32_t *)m->data, O, K);
    CUDA_LAUNCHED();
    transpose_into(c, t + qb, m->scales, O, K / G, 2);
    transpose_into(c, t + qb + sb, m->biases, O, K / G, 2);
    return t;
}

/* ---- products with a transposed matrix: partials per chunk, then a fixed-order sum ---------- */

/* Block b sums rows k in [b*CH, (b+1)*CH) of W^T [K, O]:
 * partial[b][r][o] = sum_k x[r*K + k] * WT[k][o]. O % 8 == 0. */
template <typename T>
__global__ void __launch_bounds__(256)
    k_gemv_t(float *partial, const T *WT, const float *x, int K, int O, int rows, int CH) {
    KERNEL_BEGIN();
    const int k0 = blockIdx.x * CH, k1 = min(k0 + CH, K);
    for (int o = threadIdx.x * 8; o < O; o += blockDim.x * 8) {
        float acc[8][8];
#pragma unroll
        for (int r = 0; r < 8; r++)
#pragma unroll
            for (int j = 0; j < 8; j++) acc[r][j] = 0;
        for (int k = k0; k < k1; k++) {
            raw8<T> rw;
            float w[8];
            ldraw(rw, WT + (size_t)k * O + o);
            cvt8(rw, w);
#pragma unroll
            for (int r = 0; r < 8; r++) {
                if (r >= rows) break;
                const float xv = x[(size_t)r * K + k];
#pragma unroll
                for (int j = 0; j < 8; j++) acc[r][j] += xv * w[j];
            }
        }
        for (int r = 0; r < rows; r++) {
            float *p = partial + ((size_t)blockIdx.x * rows + r) * O + o;
            *(float4 *)p = make_float4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
            *(float4 *)(p + 4) = make_float4(acc[r][4], acc[r][5], acc[r][6], acc[r][7]);
        }
    }
}

/* y[r][o] = sum over the nch partials [nch][rows][O]: a block takes 32
 * consecutive outputs, its warp w the partials w, w + 8, ... (loads in flight
 * together), then warp 0 adds the 8 sums in order (deterministic). */
__global__ void __launch_bounds__(256) k_reduce_t(float *y, const float *partial, int nch, int O, int rows) {
    __shared__ float sm[8][32];
    KERNEL_BEGIN();
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, i = blockIdx.x * 32 + lane, n = rows * O;
    float s = 0;
    if (i < n)
#pragma unroll 8
        for (int ch = w; ch < nch; ch += 8) s += partial[(size_t)ch * n + i];
    sm[w][lane] = s;
    __syncthreads();
    if (w == 0 && i < n) {
        float t = 0;
#pragma unroll
        for (int k = 0; k < 8; k++) t += sm[k][lane];
        y[i] = t;
    }
}

static void reduce_launch(cuda_ctx *c, float *y, int nch, int O, int rows) {
    launch(c, k_reduce_t, dim3((unsigned)((rows * O + 31) / 32)), dim3(256), 0, y, (const float *)c->sp_part, nch, O,
           rows);
}

template <typename T>
static void gemv_t_launch(cuda_ctx *c, float *y, const T *WT, const float *x, int K, int O, int rows) {
    const int nch = (K + T_CHUNK - 1) / T_CHUNK;
    launch(c, k_gemv_t<T>, dim3((unsigned)nch), dim3(256), 0, c->sp_part, WT, x, K, O, rows, T_CHUNK);
    reduce_launch(c, y, nch, O, rows);
}

/* y[rows, O] = x . W^T' for a matrix stored transposed (W->data) or with a
 * dequantized f32 W^T beside it (tdata); rows <= 8, O % 8 == 0. */
void cuda_matmul_transposed(cuda_ctx *c, float *y, const g3n_mat *W, const float *x, int rows) {
    G3N_ASSERT(rows <= 8 && W->rows % 8 == 0 && c->sp_part);
    if (W->tdata) gemv_t_launch(c, y, (const float *)W->tdata, x, W->cols, W->rows, rows);
    else if (W->dtype == G3N_BF16) gemv_t_launch(c, y, (const __nv_bfloat16 *)W->data, x, W->cols, W->rows, rows);
    else if (W->dtype == G3N_F16) gemv_t_launch(c, y, (const __half *)W->data, x, W->cols, W->rows, rows);
    else gemv_t_launch(c, y, (const float *)W->data, x, W->cols, W->rows, rows);
}

/* k_mlp_sparse's launch: `per` gate entries and one thread per 8 outputs a block
 * (at least `per` and enough to hold the gate row, at most SP_TMAX), and as many
 * ring slots (up to SP_NBS) as shared memory holds; 0 when not even one fits. */
#define SP_NBS 16
template <typename DN>
static int mlp_sparse_n(cuda_ctx *c, float *y, const float *gate, const float *u, const sp_up &up, const DN &dn, int n,
                        int K, int rows, float kappa) {
    const int per = sp_per(c, n), nb = (n + per - 1) / per; /* blocks per row */
    const int nt = G3N_MIN(SP_TMAX, G3N_MAX(G3N_MAX(per, (dn.O / 8 + 31) / 32 * 32), (n / 4 + SP_CV * 32 - 1) / (SP_CV * 32) * 32));
    static size_t smax; /* per instantiation: the dynamic shared memory it may take, raised once */
    if (!smax) {
#ifdef SP_TRACE
        static int reg;
        if (!reg) atexit(sp_trace_dump), reg = 1;
        const int fl = getenv("G3N_SP_FLAGS") ? atoi(getenv("G3N_SP_FLAGS")) : 0;
        cudaMemcpyToSymbol(sp_flags, &fl, sizeof fl);
#endif
        cudaFuncAttributes fa;
        CUDA_CHECK(cudaFuncGetAttributes(&fa, k_mlp_sparse<DN>));
        smax = c->smem_optin > fa.sharedSizeBytes ? c->smem_optin - fa.sharedSizeBytes : 1;
        CUDA_CHECK(cudaFuncSetAttribute(k_mlp_sparse<DN>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smax));
    }
    const size_t base = (size_t)K * sizeof(float) + (size_t)(nt / 32) * up.ub + (size_t)dn.ngroups(per) * nt * DN::GB;
    const size_t slot = (size_t)nt * DN::SB;
    if (base + slot > smax || n % 4 || n / 4 > SP_CV * nt) return 0;
    static int nbs_max = -1; /* G3N_SP_NBS=k: at most k slots (timing) */
    if (nbs_max < 0) nbs_max = getenv("G3N_SP_NBS") ? G3N_MAX(1, atoi(getenv("G3N_SP_NBS"))) : SP_NBS;
    const int nbs = (int)G3N_MIN((size_t)nbs_max, (smax - base) / slot);
    G3N_ASSERT((size_t)nb * rows * dn.O <= c->sp_part_n);
    launch(c, k_mlp_sparse<DN>, dim3((unsigned)nb, (unsigned)rows), dim3((unsigned)nt), base + nbs * slot, c->sp_part,
           gate, u, up, dn, n, K, per, nbs, kappa);
    reduce_launch(c, y, nb, dn.O, rows);
    return 1;
}

/* The sparse MLP of up to 8 token rows after their gate product; 0 when the
 * shapes do not fit (the caller goes dense). Up rows are read as stored (16-bit,
 * f32 or quantized); down columns from W^T: stored transposed, or beside a
 * quantized matrix (tdata: cuda_qtranspose's form where it applies, else f32). */
int cuda_mlp_sparse(cuda_ctx *c, float *y, const float *gate, const g3n_mat *Wu, const g3n_mat *Wd, const float *u,
                    int rows, float kappa) {
    const int n = Wu->rows, K = Wu->cols, O = Wd->rows;
    if (!(Wd->transposed || Wd->tdata) || Wd->cols != n || O % 8 || K % 8 || Wu->transposed || !c->sp_part ||
        rows < 1 || rows > 8 || (size_t)K * sizeof(float) > 48 * 1024 || (Wu->bits && K % Wu->group_size))
        return 0;
    const sp_up up = {Wu->data,    Wu->scales, Wu->biases,          Wu->dtype,
                      Wu->bits,    Wu->group_size, Wu->sdtype, (int)sp_up_bytes(Wu)};
    if (Wd->tdata && cuda_qtranspose_ok(Wd)) {
        const uint32_t *qT = (const uint32_t *)Wd->tdata;
        const size_t qw = (size_t)n * O * Wd->bits / 32, sw = (size_t)(n / Wd->group_size) * O;
#define DNQ(B, T)                                                                                                   \
    do {                                                                                                            \
        const T *sT = (const T *)(qT + qw);                                                                         \
        const dn_quant<B, T> dn = {qT, sT, sT + sw, O, Wd->group_size};                                             \
        return mlp_sparse_n(c, y, gate, u, up, dn, n, K, rows, kappa);                                              \
    } while (0)
        if (Wd->bits == 4) {
            if (Wd->sdtype == G3N_BF16) DNQ(4, __nv_bfloat16);
            DNQ(4, __half);
        }
        if (Wd->sdtype == G3N_BF16) DNQ(8, __nv_bfloat16);
        DNQ(8, __half);
#undef DNQ
    }
    if (Wd->tdata) return mlp_sparse_n(c, y, gate, u, up, dn_plain<float>{(const float *)Wd->tdata, O}, n, K, rows, kappa);
    if (Wd->dtype == G3N_BF16)
        return mlp_sparse_n(c, y, gate, u, up, dn_plain<__nv_bfloat16>{(const __nv_bfloat16 *)Wd->data, O}, n, K, rows,
                            kappa);
    if (Wd->dtype == G3N_F16)
        return mlp_sparse_n(c, y, gate, u, up, dn_plain<__half>{(const __half *)Wd->data, O}, n, K, rows, kappa);
    return mlp_sparse_n(c, y, gate, u, up, dn_plain<float>{(const float *)Wd->data, O}, n, K, rows, kappa);
}
