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

/* Scratch of the transposed products for a down matrix of rows x cols (sized at
 * load, before any recording): k_gemv_t's partials for up to 8 activation rows,
 * which also hold k_mlp_sparse's (cols / SP_R of them, one row). */
void cuda_sparse_reserve(cuda_ctx *c, int rows, int cols) {
    const size_t part = (size_t)(cols + T_CHUNK - 1) / T_CHUNK * (size_t)rows * 8;
    if (part > c->sp_part_n) {
        cudaFree(c->sp_part);
        CUDA_CHECK(cudaMalloc((void **)&c->sp_part, part * sizeof(float)));
        c->sp_part_n = part;
    }
}

/* ---- the sparse MLP of one row in one kernel ---------------------------------------------
 *
 * Block b owns gate entries [SP_R b, SP_R (b + 1)). Every block computes the
 * top-k cutoff over the whole gate row itself (the same code on the same values,
 * so every block gets the same cutoff), keeps its own survivors in ascending
 * order, computes their activations gelu(g - cutoff) * (Wu[i] . u), and adds
 * act_i * W_d^T[i] over them into its partial of the output: no selection
 * kernel, no global index list. k_reduce_t then adds the partials in block order. */

#define SP_R 256 /* gate entries per block = threads per block */

/* Row w of an up matrix dotted with us (shared memory, K floats) by one warp: 16-bit
 * or f32 weights 8 per lane and step (K % 8 == 0), quantized ones dequantized as
 * the reference does it (4 and 8 bits: 8 weights a step with one scale and bias;
 * other widths one at a time). The loads of SP_U steps are issued before any is
 * used: the kernel is a chain of dependent steps, each costing a memory latency. */
#define SP_U 8

/* Code j (0-7) of 8 consecutive BITS-wide codes (4 or 8) packed in w[0] (4 bits) or w[0..1] (8 bits). */
__device__ __forceinline__ uint32_t sp_code(const uint32_t *w, int bits, int j) {
    return bits == 4 ? (w[0] >> (4 * j)) & 15u : (w[j >> 2] >> (8 * (j & 3))) & 255u;
}

template <typename T>
__device__ float sp_dot(const T *w, const float *us, int K) {
    float acc = 0;
    for (int i0 = (threadIdx.x & 31) * 8; i0 < K; i0 += SP_U * 32 * 8) {
        raw8<T> rw[SP_U];
#pragma unroll
        for (int u = 0; u < SP_U; u++)
            if (i0 + u * 256 < K) ldraw(rw[u], w + i0 + u * 256);
#pragma unroll
        for (int u = 0; u < SP_U; u++)
            if (i0 + u * 256 < K) {
                float f[8];
                cvt8(rw[u], f);
#pragma unroll
                for (int j = 0; j < 8; j++) acc += f[j] * us[i0 + u * 256 + j];
            }
    }
    return warp_sum(acc);
}

__device__ float sp_qdot(const uint32_t *W, const void *S, const void *B, int sdt, int bits, int group, size_t r,
                         const float *us, int K) {
    const int lane = threadIdx.x & 31;
    float acc = 0;
    if (bits == 4 || bits == 8) { /* K % 8 == 0 and K % group == 0 (checked by the host) */
        const uint32_t *row = W + r * ((size_t)K * bits / 32);
        for (int i0 = lane * 8; i0 < K; i0 += SP_U * 256) {
            uint32_t w[SP_U][2];
            float sc[SP_U], bi[SP_U];
#pragma unroll
            for (int u = 0; u < SP_U; u++) {
                const int i = i0 + u * 256;
                if (i < K) {
                    const size_t g = r * (size_t)(K / group) + i / group;
                    sc[u] = load_w(S, sdt, g), bi[u] = load_w(B, sdt, g);
                    w[u][0] = row[(size_t)i * bits / 32];
                    w[u][1] = bits == 8 ? row[(size_t)i * bits / 32 + 1] : 0u;
                }
            }
#pragma unroll
            for (int u = 0; u < SP_U; u++) {
                const int i = i0 + u * 256;
                if (i < K)
#pragma unroll
                    for (int j = 0; j < 8; j++) {
                        acc += qaffine(sc[u], (float)sp_code(w[u], bits, j), bi[u]) * us[i + j];
                    }
            }
        }
    } else {
        for (int i = lane; i < K; i += 32) acc += qdeq(W, S, B, sdt, bits, group, K, r, i) * us[i];
    }
    return warp_sum(acc);
}

/* The up matrix as the fused kernel reads it: 16-bit/f32 rows (dtype) or quantized (bits > 0). */
typedef struct {
    const void *W, *S, *B;
    int dtype, bits, group, sdt;
} sp_up;

/* The down matrix's columns as the fused kernel reads them: row i of W_d^T
 * ([n, O]), 8 outputs o..o+7 at a time (load, then cvt: the reference's values);
 * NB rows' loads in flight at once. */
template <typename T> struct dn_plain { /* stored transposed, 16-bit or f32 */
    static constexpr int NB = 16;
    const T *WT;
    int O;
    typedef raw8<T> raw;
    __device__ __forceinline__ void load(raw &x, int i, int o) const { ldraw(x, WT + (size_t)i * O + o); }
    __device__ __forceinline__ void cvt(const raw &x, float w[8]) const { cvt8(x, w); }
};
/* quantized (BITS 4 or 8, 16-bit scales ST): the transposed codes [n, O] and the
 * transposed scales and biases [n / G, O] (cuda_qtranspose) */
template <int BITS, typename ST> struct dn_quant {
    static constexpr int NB = 8;
    const uint32_t *qT;
    const ST *sT, *bT;
    int O, G;
    struct raw {
        uint32_t q[2];
        raw8<ST> s, b;
    };
    __device__ __forceinline__ void load(raw &x, int i, int o) const {
        const size_t e = (size_t)i * O + o, g = (size_t)(i / G) * O + o;
        if (BITS == 4) x.q[0] = __ldcs(qT + e / 8), x.q[1] = 0;
        else *(uint2 *)x.q = __ldcs((const uint2 *)(qT + e / 4));
        ldraw(x.s, sT + g);
        ldraw(x.b, bT + g);
    }
    __device__ __forceinline__ void cvt(const raw &x, float w[8]) const {
        float sc[8], bi[8];
        cvt8(x.s, sc);
        cvt8(x.b, bi);
#pragma unroll
        for (int j = 0; j < 8; j++) w[j] = qaffine(sc[j], (float)sp_code(x.q, BITS, j), bi[j]);
    }
};

/* Activation row r = blockIdx.y: partial[b][r][o] = sum over block b's survivors i
 * of act_i * W_d^T[i][o], for a gate row of n entries; K % 8 == 0, O % 8 == 0;
 * dynamic shared memory: K floats (the row of u). */
template <typename DN>
__global__ void __launch_bounds__(SP_R, 1)
    k_mlp_sparse(float *partial, const float *gate, const float *u, sp_up up, DN dn, int n, int K, float kappa) {
    extern __shared__ float us[];
    __shared__ float red[32], sval[SP_R];
    __shared__ int sidx[SP_R], wcnt[SP_R / 32];
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5, r = blockIdx.y, O = dn.O;
    const float *g = gate + (size_t)r * n;
    KERNEL_BEGIN();
#pragma unroll 8
    for (int i = t; i < K; i += SP_R) us[i] = u[(size_t)r * K + i];
    /* the cutoff: mean + kappa * population std of the whole row (16 loads a
     * thread in flight at once; the second pass reads the row again from L1) */
    float sm = 0, vv = 0;
    if (n % 4 == 0) {
        const float4 *g4 = (const float4 *)g;
#pragma unroll 16
        for (int i = t; i < n / 4; i += SP_R) {
            const float4 x = g4[i];
            sm += (x.x + x.y) + (x.z + x.w);
        }
    } else {
#pragma unroll 16
        for (int i = t; i < n; i += SP_R) sm += g[i];
    }
    const float mean = block_sum(sm, red) / (float)n;
    if (n % 4 == 0) {
        const float4 *g4 = (const float4 *)g;
#pragma unroll 16
        for (int i = t; i < n / 4; i += SP_R) {
            const float4 x = g4[i];
            vv += ((x.x - mean) * (x.x - mean) + (x.y - mean) * (x.y - mean)) +
                  ((x.z - mean) * (x.z - mean) + (x.w - mean) * (x.w - mean));
        }
    } else {
#pragma unroll 16
        for (int i = t; i < n; i += SP_R) vv += (g[i] - mean) * (g[i] - mean);
    }
    const float cutoff = mean + sqrtf(block_sum(vv, red) / (float)n) * kappa;
    /* this block's survivors, in ascending order */
    const int i0 = blockIdx.x * SP_R;
    const float gv = i0 + t < n ? g[i0 + t] : 0.0f;
    const bool keep = i0 + t < n && gv > cutoff;
    const unsigned bal = __ballot_sync(0xffffffffu, keep);
    if (lane == 0) wcnt[warp] = __popc(bal);
    __syncthreads();
    int pos = __popc(bal & ((1u << lane) - 1)), cnt = 0;
#pragma unroll
    for (int w = 0; w < SP_R / 32; w++) {
        pos += w < warp ? wcnt[w] : 0;
        cnt += wcnt[w];
    }
    if (keep) sidx[pos] = i0 + t, sval[pos] = gelu_tanh_d(gv - cutoff);
    __syncthreads();
    /* their up rows: one warp per survivor */
    for (int j = warp; j < cnt; j += SP_R / 32) {
        const int i = sidx[j];
        float d;
        if (up.bits) d = sp_qdot((const uint32_t *)up.W, up.S, up.B, up.sdt, up.bits, up.group, (size_t)i, us, K);
        else if (up.dtype == G3N_BF16) d = sp_dot((const __nv_bfloat16 *)up.W + (size_t)i * K, us, K);
        else if (up.dtype == G3N_F16) d = sp_dot((const __half *)up.W + (size_t)i * K, us, K);
        else d = sp_dot((const float *)up.W + (size_t)i * K, us, K);
        if (lane == 0) sval[j] *= d;
    }
    __syncthreads();
    /* their down columns, 8 outputs per thread */
    for (int o = t * 8; o < O; o += SP_R * 8) {
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int j0 = 0; j0 < cnt; j0 += DN::NB) {
            typename DN::raw rw[DN::NB];
#pragma unroll
            for (int u = 0; u < DN::NB; u++)
                if (j0 + u < cnt) dn.load(rw[u], sidx[j0 + u], o);
#pragma unroll
            for (int u = 0; u < DN::NB; u++)
                if (j0 + u < cnt) {
                    float w[8];
                    dn.cvt(rw[u], w);
                    const float a = sval[j0 + u];
#pragma unroll
                    for (int q = 0; q < 8; q++) acc[q] += a * w[q];
                }
        }
        float *p = partial + ((size_t)blockIdx.x * gridDim.y + r) * O + o;
        *(float4 *)p = make_float4(acc[0], acc[1], acc[2], acc[3]);
        *(float4 *)(p + 4) = make_float4(acc[4], acc[5], acc[6], acc[7]);
    }
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

template <typename DN>
static int mlp_sparse_n(cuda_ctx *c, float *y, const float *gate, const float *u, const sp_up &up, const DN &dn, int n,
                        int K, int rows, float kappa) {
    const int nb = (n + SP_R - 1) / SP_R; /* blocks per row, one per SP_R gate entries */
    launch(c, k_mlp_sparse<DN>, dim3((unsigned)nb, (unsigned)rows), dim3(SP_R), (size_t)K * sizeof(float), c->sp_part,
           gate, u, up, dn, n, K, kappa);
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
    const sp_up up = {Wu->data, Wu->scales, Wu->biases, Wu->dtype, Wu->bits, Wu->group_size, Wu->sdtype};
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
