/* sparse.cu: exact activation sparsity for the MLPs with a Gaussian top-k
 * (layers 0-9 of E2B/E4B). After the top-k about 5% of the gate entries are
 * non-zero; only those up rows and down columns are read. The down matrix of
 * such a layer is stored transposed ([I, D]) at load, so a needed column is one
 * contiguous row. Steps (one token row):
 *   gate = Wg . u (gemv.cu)  ->  k_select: cutoff, the surviving indices in
 *   ascending order and gelu(gate - cutoff)  ->  k_up_sparse: act[k] = that *
 *   (Wu[idx[k]] . u)  ->  k_gemv_t: per-chunk partial sums of act[k] * WdT[idx[k]]
 *   ->  k_reduce_t: y in a fixed order (deterministic).
 * The same two last kernels, with no index list, are the product with any
 * transposed matrix (the dense path through such a layer). */
#include "cuda_common.cuh"

#define SEL_THREADS 1024
#define T_CHUNK_SPARSE 16   /* index-list entries per block */
#define T_CHUNK_DENSE 128   /* rows of W^T per block without a list */

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

/* W [rows, cols] on the device -> a new buffer holding W^T [cols, rows]. */
void *cuda_transpose_matrix(cuda_ctx *c, const void *w, int rows, int cols, size_t esize) {
    void *t = NULL;
    CUDA_CHECK(cudaMalloc(&t, (size_t)rows * cols * esize));
    dim3 grid((cols + 31) / 32, (rows + 31) / 32), block(32, 8);
    if (esize == 2) k_transpose<uint16_t><<<grid, block, 0, c->stream>>>((uint16_t *)t, (const uint16_t *)w, rows, cols);
    else k_transpose<float><<<grid, block, 0, c->stream>>>((float *)t, (const float *)w, rows, cols);
    CUDA_LAUNCHED();
    CUDA_CHECK(cudaStreamSynchronize(c->stream));
    return t;
}

/* Scratch of the gather path for a down matrix of rows x cols (sized at load,
 * before any recording). */
void cuda_sparse_reserve(cuda_ctx *c, int rows, int cols) {
    const size_t n = (size_t)cols;
    const size_t part = G3N_MAX((n + T_CHUNK_SPARSE - 1) / T_CHUNK_SPARSE * (size_t)rows,
                                (n + T_CHUNK_DENSE - 1) / T_CHUNK_DENSE * (size_t)rows * 8);
    if (n > c->sp_n) {
        cudaFree(c->sp_idx), cudaFree(c->sp_val), cudaFree(c->sp_act), cudaFree(c->sp_nnz);
        CUDA_CHECK(cudaMalloc((void **)&c->sp_idx, n * sizeof(int32_t)));
        CUDA_CHECK(cudaMalloc((void **)&c->sp_val, n * sizeof(float)));
        CUDA_CHECK(cudaMalloc((void **)&c->sp_act, n * sizeof(float)));
        CUDA_CHECK(cudaMalloc((void **)&c->sp_nnz, sizeof(int32_t)));
        c->sp_n = n;
    }
    if (part > c->sp_part_n) {
        cudaFree(c->sp_part);
        CUDA_CHECK(cudaMalloc((void **)&c->sp_part, part * sizeof(float)));
        c->sp_part_n = part;
    }
}

/* ---- selection: cutoff, surviving indices (ascending), gelu values -------------------- */

template <int EPT>
__global__ void __launch_bounds__(SEL_THREADS)
    k_select(const float *g, int32_t *idx, float *val, int32_t *nnz, int n, float kappa) {
    KERNEL_BEGIN();
    __shared__ float red[32];
    __shared__ int wsum[32];
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    float v[EPT];
#pragma unroll
    for (int k = 0; k < EPT / 4; k++) { /* contiguous per thread: ascending order below */
        const float4 a = *(const float4 *)(g + (size_t)t * EPT + 4 * k);
        v[4 * k] = a.x, v[4 * k + 1] = a.y, v[4 * k + 2] = a.z, v[4 * k + 3] = a.w;
    }
    const float cutoff = topk_cutoff<EPT>(v, n, kappa, red);
    int cnt = 0;
#pragma unroll
    for (int k = 0; k < EPT; k++) cnt += v[k] > cutoff;
    /* exclusive scan of the counts over the block */
    int incl = cnt;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
    }
    if (lane == 31) wsum[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        int w = lane < (int)(blockDim.x >> 5) ? wsum[lane] : 0, wi = w;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, wi, o);
            if (lane >= o) wi += y;
        }
        wsum[lane] = wi - w; /* exclusive prefix of warp totals */
        if (lane == 31) *nnz = wi;
    }
    __syncthreads();
    int pos = wsum[warp] + incl - cnt;
#pragma unroll
    for (int k = 0; k < EPT; k++)
        if (v[k] > cutoff) {
            idx[pos] = t * EPT + k;
            val[pos] = gelu_tanh_d(v[k] - cutoff);
            pos++;
        }
}

/* ---- up rows of the survivors ------------------------------------------------------------- */

template <typename T>
__global__ void __launch_bounds__(256)
    k_up_sparse(float *act, const T *Wu, const float *u, const int32_t *idx, const float *val, const int32_t *nnz,
                int K) {
    KERNEL_BEGIN();
    const int k = (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (k >= *nnz) return;
    const T *w = Wu + (size_t)idx[k] * K;
    float acc = 0;
    for (int i = lane * 2; i < K; i += 64) {
        const float2 xv = *(const float2 *)(u + i);
        acc += (float)w[i] * xv.x + (float)w[i + 1] * xv.y;
    }
    acc = warp_sum(acc);
    if (lane == 0) act[k] = val[k] * acc;
}

/* the same for a quantized Wu: each weight dequantized as the reference does it
 * (4 and 8 bits: 8 weights a step, one scale and bias each; else one at a time) */
__global__ void __launch_bounds__(256)
    k_qup_sparse(float *act, const uint32_t *W, const void *S, const void *B, int sdt, int bits, int group,
                 const float *u, const int32_t *idx, const float *val, const int32_t *nnz, int K) {
    KERNEL_BEGIN();
    const int k = (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (k >= *nnz) return;
    const size_t r = (size_t)idx[k];
    float acc = 0;
    if ((bits == 4 || bits == 8) && K % 8 == 0) {
        const uint32_t *row = W + r * ((size_t)K * bits / 32);
        for (int i = lane * 8; i < K; i += 32 * 8) {
            const size_t g = r * (size_t)(K / group) + i / group;
            const float sc = load_w(S, sdt, g), bi = load_w(B, sdt, g);
            uint32_t w[2] = {row[(size_t)i * bits / 32], bits == 8 ? row[(size_t)i * bits / 32 + 1] : 0u};
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const uint32_t q = bits == 4 ? (w[0] >> (4 * j)) & 15u : (w[j >> 2] >> (8 * (j & 3))) & 255u;
                acc += qaffine(sc, (float)q, bi) * u[i + j];
            }
        }
    } else {
        for (int i = lane; i < K; i += 32) acc += qdeq(W, S, B, sdt, bits, group, K, r, i) * u[i];
    }
    acc = warp_sum(acc);
    if (lane == 0) act[k] = val[k] * acc;
}

/* ---- products with a transposed matrix: partials per chunk, then a fixed-order sum ---------- */

/* Block b sums entries k in [b*CH, (b+1)*CH) of n (n = *nnz with a list, else K):
 * partial[b][r][o] = sum_k x_k[r] * WT[row_k][o], row_k = idx ? idx[k] : k,
 * x_k[r] = idx ? xs[k] (one row) : x[r*K + k]. O % 8 == 0. */
template <typename T>
__global__ void __launch_bounds__(256)
    k_gemv_t(float *partial, const T *WT, const float *x, const int32_t *idx, const int32_t *nnz, int K, int O,
             int rows, int CH) {
    KERNEL_BEGIN();
    const int n = idx ? *nnz : K;
    const int k0 = blockIdx.x * CH;
    if (k0 >= n) return;
    const int k1 = min(k0 + CH, n);
    for (int o = threadIdx.x * 8; o < O; o += blockDim.x * 8) {
        float acc[8][8];
#pragma unroll
        for (int r = 0; r < 8; r++)
#pragma unroll
            for (int j = 0; j < 8; j++) acc[r][j] = 0;
        for (int k = k0; k < k1; k++) {
            const int row = idx ? idx[k] : k;
            raw8<T> rw;
            float w[8];
            ldraw(rw, WT + (size_t)row * O + o);
            cvt8(rw, w);
#pragma unroll
            for (int r = 0; r < 8; r++) {
                if (r >= rows) break;
                const float xv = idx ? x[k] : x[(size_t)r * K + k];
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

__global__ void k_reduce_t(float *y, const float *partial, const int32_t *idx, const int32_t *nnz, int K, int O,
                           int rows, int CH) {
    KERNEL_BEGIN();
    const int n = idx ? *nnz : K, nch = (n + CH - 1) / CH;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < rows * O; i += gridDim.x * blockDim.x) {
        const int r = i / O, o = i % O;
        float s = 0;
        for (int ch = 0; ch < nch; ch++) s += partial[((size_t)ch * rows + r) * O + o];
        y[(size_t)r * O + o] = s;
    }
}

template <typename T>
static void gemv_t_launch(cuda_ctx *c, float *y, const T *WT, const float *x, const int32_t *idx, int K, int O,
                          int rows) {
    const int CH = idx ? T_CHUNK_SPARSE : T_CHUNK_DENSE;
    const dim3 grid((unsigned)((K + CH - 1) / CH));
    launch(c, k_gemv_t<T>, grid, dim3(256), 0, c->sp_part, WT, x, idx, (const int32_t *)c->sp_nnz, K, O, rows, CH);
    launch(c, k_reduce_t, dim3((unsigned)G3N_MIN((rows * O + 255) / 256, 1024)), dim3(256), 0, y,
           (const float *)c->sp_part, idx, (const int32_t *)c->sp_nnz, K, O, rows, CH);
}

/* The product with W's transposed form: W^T stored as W->data (transposed), or
 * a quantized matrix's dequantized f32 W^T (tdata); idx as in k_gemv_t. */
static void gemv_t_mat(cuda_ctx *c, float *y, const g3n_mat *W, const float *x, const int32_t *idx, int rows) {
    if (W->tdata) gemv_t_launch(c, y, (const float *)W->tdata, x, idx, W->cols, W->rows, rows);
    else if (W->dtype == G3N_BF16) gemv_t_launch(c, y, (const __nv_bfloat16 *)W->data, x, idx, W->cols, W->rows, rows);
    else if (W->dtype == G3N_F16) gemv_t_launch(c, y, (const __half *)W->data, x, idx, W->cols, W->rows, rows);
    else gemv_t_launch(c, y, (const float *)W->data, x, idx, W->cols, W->rows, rows);
}

/* y[rows, O] = x . W^T' for a matrix stored transposed (rows <= 8, O % 8 == 0). */
void cuda_matmul_transposed(cuda_ctx *c, float *y, const g3n_mat *W, const float *x, int rows) {
    G3N_ASSERT(rows <= 8 && W->rows % 8 == 0 && c->sp_part);
    gemv_t_mat(c, y, W, x, NULL, rows);
}

/* The sparse MLP for one row; 0 when the shapes do not fit (caller goes dense).
 * Up rows are read as stored (16-bit, f32 or quantized); down columns from W^T
 * (stored transposed, or a quantized matrix's dequantized W^T, tdata). */
int cuda_mlp_sparse_row(cuda_ctx *c, float *y, float *gate, const g3n_mat *Wu, const g3n_mat *Wd, const float *u,
                        float kappa) {
    const int n = Wu->rows, K = Wu->cols;
    if (!(Wd->transposed || Wd->tdata) || Wd->cols != n || Wd->rows % 8 || n % 4096 || n > 32768 || !c->sp_idx ||
        K % 2 || Wu->transposed)
        return 0;
    const int32_t *nnz = (const int32_t *)c->sp_nnz, *idx = (const int32_t *)c->sp_idx;
    switch (n / 1024) {
    case 4: launch(c, k_select<4>, dim3(1), dim3(SEL_THREADS), 0, (const float *)gate, c->sp_idx, c->sp_val, c->sp_nnz, n, kappa); break;
    case 8: launch(c, k_select<8>, dim3(1), dim3(SEL_THREADS), 0, (const float *)gate, c->sp_idx, c->sp_val, c->sp_nnz, n, kappa); break;
    case 16: launch(c, k_select<16>, dim3(1), dim3(SEL_THREADS), 0, (const float *)gate, c->sp_idx, c->sp_val, c->sp_nnz, n, kappa); break;
    case 32: launch(c, k_select<32>, dim3(1), dim3(SEL_THREADS), 0, (const float *)gate, c->sp_idx, c->sp_val, c->sp_nnz, n, kappa); break;
    default: return 0;
    }
    const dim3 grid((unsigned)(((size_t)n * 32 + 255) / 256));
    const float *val = (const float *)c->sp_val;
    if (Wu->bits)
        launch(c, k_qup_sparse, grid, dim3(256), 0, c->sp_act, (const uint32_t *)Wu->data, Wu->scales, Wu->biases,
               Wu->sdtype, Wu->bits, Wu->group_size, u, idx, val, nnz, K);
    else if (Wu->dtype == G3N_BF16)
        launch(c, k_up_sparse<__nv_bfloat16>, grid, dim3(256), 0, c->sp_act, (const __nv_bfloat16 *)Wu->data, u, idx,
               val, nnz, K);
    else if (Wu->dtype == G3N_F16)
        launch(c, k_up_sparse<__half>, grid, dim3(256), 0, c->sp_act, (const __half *)Wu->data, u, idx, val, nnz, K);
    else
        launch(c, k_up_sparse<float>, grid, dim3(256), 0, c->sp_act, (const float *)Wu->data, u, idx, val, nnz, K);
    gemv_t_mat(c, y, Wd, (const float *)c->sp_act, idx, 1); /* Wd->cols == n */
    return 1;
}
