/* attention_mma.cu: prompt attention over an f16 K/V cache on the tensor cores.
 *
 * The same maths and the same work split as k_attn_tiled (attention.cu): a block
 * per (tile of tokens, KV head), its R = 16 * AM_WARPS query rows the tile's
 * tokens times the G heads that share the KV head (row r: token r / G, head
 * r % G), the visible keys walked in tiles of AM_KT with an online softmax, the
 * tile's tokens taken in runs of one sequence. Here each warp owns 16 query rows
 * and both products are mma.sync m16n8k16 with f32 sums:
 *   S = Q K^T   K from the cache as stored (f16, exact); Q as two f16 parts,
 *               q = hi + lo (lo = f16(q - hi)), two products: the scores keep
 *               ~22 bits of q (f32-like), not f16's 11;
 *   O += P V    P (the softmax weights, in [0, 1]) in two f16 parts the same way;
 *               V as stored.
 * So the result differs from k_attn_tiled's by f32 summation order only: the
 * cache's rounding is the one approximation, as everywhere with --kv-type f16.
 * The fragments come from shared memory by ldmatrix (K rows for the B operand
 * of Q K^T, V rows transposed for P V), rows padded to hd + 8 halves so the
 * eight rows of an 8x8 matrix fall in distinct banks. Keys and values stream
 * in by cp.async, two stages. A warp's S tile (16 x AM_KT) becomes P's A
 * fragments in registers (an mma's C layout for two adjacent n-tiles is an A
 * fragment of k 16). Rows outside the current run, and keys outside a row's
 * span, get -inf scores (weight 0). */
#include "cuda_common.cuh"

#define AM_WARPS 2 /* 16 query rows each: 32 rows a block */
#define AM_KT 32   /* keys a tile */

__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void *p) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void *p) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}
/* two floats as the hi and lo f16 pairs (lo = f16(x - hi)) */
__device__ __forceinline__ void split2(float x, float y, uint32_t &hi, uint32_t &lo) {
    const __half2 h = __floats2half2_rn(x, y);
    const float2 hf = __half22float2(h);
    const __half2 l = __floats2half2_rn(x - hf.x, y - hf.y);
    hi = *(const uint32_t *)&h;
    lo = *(const uint32_t *)&l;
}

template <int HD>
__global__ void __launch_bounds__(AM_WARPS * 32)
    k_attn_mma(float *out, const float *q, const g3n_kv_layer *kv, int layer, const int32_t *pos, const int32_t *seq,
               int n_tokens, int n_head, int n_head_kv, int window) {
    constexpr int R = 16 * AM_WARPS, LD = HD + 8, NT = AM_KT / 8, ND = HD / 8;
    extern __shared__ __align__(16) __half am_dyn[];
    __half *Qh = am_dyn, *Ql = Qh + R * LD;       /* [R][LD] each */
    __half *Ks = Ql + R * LD;                     /* [2][AM_KT][LD] */
    __half *Vs = Ks + 2 * AM_KT * LD;             /* [2][AM_KT][LD] */
    const int G = n_head / n_head_kv, BQ = R / G, kvd = n_head_kv * HD;
    const int n_tiles = (n_tokens + BQ - 1) / BQ;
    const int tile = n_tiles - 1 - (int)blockIdx.x / n_head_kv, hk = (int)blockIdx.x % n_head_kv;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
    const int t0 = tile * BQ, tend = min(t0 + BQ, n_tokens);
    KERNEL_BEGIN();
    for (int r0 = t0; r0 < tend;) { /* one run: tokens r0..r1-1 of sequence s */
        int r1, jlo, jhi;
        const int s = att_run(pos, seq, r0, tend, window, r1, jlo, jhi);
        const g3n_kv_layer L = kv[(size_t)s * G3N_KV_MAX_LAYERS + layer];
        /* the run's query rows as hi and lo halves (zeros for the tile's other tokens) */
        for (int i = threadIdx.x; i < R * (HD / 2); i += blockDim.x) {
            const int r = i / (HD / 2), c2 = i % (HD / 2), t = t0 + r / G;
            float2 v = make_float2(0.f, 0.f);
            if (t >= r0 && t < r1) v = *(const float2 *)(q + ((size_t)t * n_head + hk * G + r % G) * HD + 2 * c2);
            uint32_t hi, lo;
            split2(v.x, v.y, hi, lo);
            *(uint32_t *)(Qh + r * LD + 2 * c2) = hi;
            *(uint32_t *)(Ql + r * LD + 2 * c2) = lo;
        }
        /* this thread's two rows (g and g + 8 of its warp's 16): their visible keys */
        int rlo[2], rhi[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int t = t0 + (warp * 16 + g + 8 * h) / G;
            rlo[h] = 1, rhi[h] = 0;
            if (t >= r0 && t < r1) rhi[h] = pos[t], rlo[h] = window > 0 ? max(0, rhi[h] - window + 1) : 0;
        }
        auto issue = [&](int jt, int buf) { /* keys jt..jt+AM_KT-1 (those <= jhi) into stage buf */
            __half *kd = Ks + buf * AM_KT * LD, *vd = Vs + buf * AM_KT * LD;
            constexpr int NC = HD / 8; /* 16-byte chunks a row */
            for (int i = threadIdx.x; i < AM_KT * NC; i += blockDim.x) {
                const int jj = i / NC, c = i % NC, j = jt + jj;
                if (j > jhi) { /* zeros: a weight of 0 times a stale value could be NaN */
                    *(uint4 *)(kd + jj * LD + 8 * c) = make_uint4(0, 0, 0, 0);
                    *(uint4 *)(vd + jj * LD + 8 * c) = make_uint4(0, 0, 0, 0);
                    continue;
                }
                const size_t o = (size_t)(j % L.cap) * kvd + (size_t)hk * HD + 8 * c;
                cp_async16(kd + jj * LD + 8 * c, (const __half *)L.k + o);
                cp_async16(vd + jj * LD + 8 * c, (const __half *)L.v + o);
            }
            cp_async_commit();
        };
        float o[ND][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
#pragma unroll
        for (int n = 0; n < ND; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
        issue(jlo, 0);
        for (int jt = jlo, buf = 0; jt <= jhi; jt += AM_KT, buf ^= 1) {
            issue(jt + AM_KT, buf ^ 1); /* (an empty group past the last tile) */
            cp_async_wait<1>();
            __syncthreads(); /* this tile (and, the first time, the query rows) in place */
            const __half *kt = Ks + buf * AM_KT * LD, *vt = Vs + buf * AM_KT * LD;
            const __half *qh = Qh + warp * 16 * LD, *ql = Ql + warp * 16 * LD;
            float sc[NT][4];
#pragma unroll
            for (int n = 0; n < NT; n++) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) {
                uint32_t ah[4], al[4];
                const int ar = (lane & 7) + ((lane >> 3) & 1) * 8, ac = kk * 16 + (lane >> 4) * 8;
                ldsm_x4(ah, qh + ar * LD + ac);
                ldsm_x4(al, ql + ar * LD + ac);
#pragma unroll
                for (int n = 0; n < NT; n += 2) { /* two key n-tiles a load */
                    uint32_t b[4];
                    ldsm_x4(b, kt + (n * 8 + (lane & 7) + (lane >> 4) * 8) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
                    mma16816(sc[n], ah, b[0], b[1]);
                    mma16816(sc[n], al, b[0], b[1]);
                    mma16816(sc[n + 1], ah, b[2], b[3]);
                    mma16816(sc[n + 1], al, b[2], b[3]);
                }
            }
            /* mask, online softmax per row (a row's 4 values a thread x NT, over the quad) */
            float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
            for (int n = 0; n < NT; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int h = e >> 1, j = jt + n * 8 + tig * 2 + (e & 1);
                    if (j < rlo[h] || j > rhi[h]) sc[n][e] = -INFINITY;
                    mx[h] = fmaxf(mx[h], sc[n][e]);
                }
            float corr[2];
#pragma unroll
            for (int h = 0; h < 2; h++) {
                mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
                mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
                const float m2 = fmaxf(m[h], mx[h]);
                corr[h] = m2 == -INFINITY ? 1.0f : __expf(m[h] - m2); /* (m = -inf: nothing yet to scale) */
                m[h] = m2;
                l[h] *= corr[h];
            }
#pragma unroll
            for (int n = 0; n < NT; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int h = e >> 1;
                    sc[n][e] = sc[n][e] == -INFINITY ? 0.0f : __expf(sc[n][e] - m[h]);
                    l[h] += sc[n][e];
                }
#pragma unroll
            for (int n = 0; n < ND; n++) o[n][0] *= corr[0], o[n][1] *= corr[0], o[n][2] *= corr[1], o[n][3] *= corr[1];
            /* O += P V: P's A fragments from the S tile, 16 keys at a time */
#pragma unroll
            for (int kc = 0; kc < AM_KT / 16; kc++) {
                uint32_t ph[4], pl[4];
                split2(sc[2 * kc][0], sc[2 * kc][1], ph[0], pl[0]);
                split2(sc[2 * kc][2], sc[2 * kc][3], ph[1], pl[1]);
                split2(sc[2 * kc + 1][0], sc[2 * kc + 1][1], ph[2], pl[2]);
                split2(sc[2 * kc + 1][2], sc[2 * kc + 1][3], ph[3], pl[3]);
#pragma unroll
                for (int n = 0; n < ND; n += 2) { /* two value n-tiles (16 dims) a load */
                    uint32_t b[4];
                    ldsm_x4_t(b, vt + (kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + n * 8 + (lane >> 4) * 8);
                    mma16816(o[n], ph, b[0], b[1]);
                    mma16816(o[n], pl, b[0], b[1]);
                    mma16816(o[n + 1], ph, b[2], b[3]);
                    mma16816(o[n + 1], pl, b[2], b[3]);
                }
            }
            __syncthreads(); /* every warp is done with this stage before it is refilled */
        }
        cp_async_wait<0>(); /* (the group past the last tile is empty) */
#pragma unroll
        for (int h = 0; h < 2; h++) {
            l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
            l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
            const int r = warp * 16 + g + 8 * h, t = t0 + r / G;
            if (t < r0 || t >= r1) continue;
            float *orow = out + ((size_t)t * n_head + hk * G + r % G) * HD;
            const float inv = l[h] > 0 ? 1.0f / l[h] : 0.0f;
#pragma unroll
            for (int n = 0; n < ND; n++)
                *(float2 *)(orow + n * 8 + tig * 2) = make_float2(o[n][2 * h] * inv, o[n][2 * h + 1] * inv);
        }
        __syncthreads(); /* the query rows are restaged for the next run */
        r0 = r1;
    }
}

static size_t am_smem(int hd) { return (size_t)(2 * 16 * AM_WARPS + 4 * AM_KT) * (hd + 8) * sizeof(__half); }

template <int HD>
static void am_launch(cuda_ctx *c, float *out, const float *q, int layer, int n_head, int n_head_kv, int window) {
    static int raised;
    const size_t smem = am_smem(HD);
    if (!raised) {
        CUDA_CHECK(cudaFuncSetAttribute(k_attn_mma<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        raised = 1;
    }
    const int bq = 16 * AM_WARPS / (n_head / n_head_kv);
    launch(c, k_attn_mma<HD>, dim3((unsigned)((c->n_tokens + bq - 1) / bq * n_head_kv)), dim3(AM_WARPS * 32), smem,
           out, q, c->d_kv, layer, d_pos(c), d_seq(c), c->n_tokens, n_head, n_head_kv, window);
}

/* Prompt attention on the tensor cores where it applies: an f16 cache, head_dim
 * 64, 128 or 256, a group size that divides the block's 32 query rows (the
 * build's oldest target, sm_80, has the mma). 0 where it does not (the caller
 * takes k_attn_tiled). */
int cuda_attention_mma(cuda_ctx *c, float *out, const float *q, int layer, int n_head, int n_head_kv, int hd,
                       int window) {
    const int G = n_head_kv > 0 ? n_head / n_head_kv : 0;
    if (!cuda_kv_f16(c, layer) || G < 1 || n_head % n_head_kv != 0 || (16 * AM_WARPS) % G != 0 ||
        am_smem(hd) > c->smem_optin)
        return 0;
    switch (hd) {
    case 64: am_launch<64>(c, out, q, layer, n_head, n_head_kv, window); return 1;
    case 128: am_launch<128>(c, out, q, layer, n_head, n_head_kv, window); return 1;
    case 256: am_launch<256>(c, out, q, layer, n_head, n_head_kv, window); return 1;
    default: return 0;
    }
}
