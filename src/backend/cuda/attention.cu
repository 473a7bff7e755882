/* attention.cu: softmax(q . K^T) V over each token's own KV cache (ring or
 * full), scale 1, optional sliding window, grouped-query heads. One block per
 * (token, query head); each warp walks a share of the keys with an online
 * softmax (running max and sum), then the warps' partial results are merged.
 * Keys per query are read from device memory (positions), so a recorded step
 * replays correctly at any position. Prompt steps take the tiled kernel below
 * (k_attn_tiled: a block per tile of tokens and KV head, keys staged once per
 * tile); this one is left for short steps and shapes the tiled one does not
 * take (head_dim not a multiple of 4, or above 256). */
#include "cuda_common.cuh"

#define ATT_WARPS 4
#define ATT_PER_LANE (CUDA_MAX_HEAD_DIM / 32)

__global__ void __launch_bounds__(ATT_WARPS * 32)
    k_attention(float *out, const float *q, const g3n_kv_layer *kv, int layer, const int32_t *pos,
                const int32_t *seq, int n_head, int n_head_kv, int hd, int window) {
    KERNEL_BEGIN();
    __shared__ float s_m[ATT_WARPS], s_l[ATT_WARPS], s_acc[ATT_WARPS][CUDA_MAX_HEAD_DIM];
    const int t = blockIdx.x / n_head, h = blockIdx.x % n_head;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int hk = h / (n_head / n_head_kv), kvd = n_head_kv * hd;
    const g3n_kv_layer L = kv[(size_t)seq[t] * G3N_KV_MAX_LAYERS + layer];
    const int p = pos[t];
    const int lo = window > 0 ? max(0, p - window + 1) : 0;
    const float *qh = q + ((size_t)t * n_head + h) * hd;
    float qr[ATT_PER_LANE], acc[ATT_PER_LANE];
#pragma unroll
    for (int k = 0; k < ATT_PER_LANE; k++) {
        const int d = lane + 32 * k;
        qr[k] = d < hd ? qh[d] : 0.0f;
        acc[k] = 0;
    }
    float m = -INFINITY, l = 0;
    for (int j = lo + warp; j <= p; j += ATT_WARPS) {
        const size_t o = (size_t)(j % L.cap) * kvd + (size_t)hk * hd;
        float s = 0;
#pragma unroll
        for (int k = 0; k < ATT_PER_LANE; k++) {
            const int d = lane + 32 * k;
            if (d < hd) s += qr[k] * kv_ld(L, L.k, o + d);
        }
        s = warp_sum(s);
        const float m2 = fmaxf(m, s);
        const float corr = __expf(m - m2), e = __expf(s - m2);
        l = l * corr + e;
#pragma unroll
        for (int k = 0; k < ATT_PER_LANE; k++) {
            const int d = lane + 32 * k;
            acc[k] = acc[k] * corr + (d < hd ? e * kv_ld(L, L.v, o + d) : 0.0f);
        }
        m = m2;
    }
    if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
    }
#pragma unroll
    for (int k = 0; k < ATT_PER_LANE; k++) {
        const int d = lane + 32 * k;
        if (d < hd) s_acc[warp][d] = acc[k];
    }
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < ATT_WARPS; w++) M = fmaxf(M, s_m[w]);
    float Lsum = 0;
    for (int w = 0; w < ATT_WARPS; w++)
        if (s_l[w] > 0) Lsum += s_l[w] * __expf(s_m[w] - M);
    float *oh = out + ((size_t)t * n_head + h) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float a = 0;
        for (int w = 0; w < ATT_WARPS; w++)
            if (s_l[w] > 0) a += s_acc[w][d] * __expf(s_m[w] - M);
        oh[d] = a / Lsum;
    }
}

/* ---- prompts: tiled over queries and keys -------------------------------------------------
 *
 * One block per (tile of BQ consecutive tokens of the step, KV head). The G
 * query heads of that KV head for the BQ tokens are ROWS = 8 * RPW query rows
 * (row r: token r / G, head r % G), staged in shared memory; warp w owns rows
 * w * RPW .. w * RPW + RPW - 1. The visible keys are walked in tiles of 32,
 * their K and V staged in shared memory (cp.async, double-buffered where it
 * fits), so each key is read from memory once per tile of queries instead of
 * once per (token, head). In a key tile lane j scores key j against the warp's
 * rows (K rows padded to hd + 4 floats, so the lanes' float4 reads take
 * distinct banks; Q read as broadcasts), each row keeps an online softmax (a
 * running max shared by the warp, a sum per lane, added at the end), and
 * O += P V with lane owning dims lane + 32 k (the weights broadcast by
 * shuffles). f32 throughout, as k_attention; an f16 cache (KT = __half) is
 * staged as it is stored (K rows padded to hd + 8, read 8 at a time: a quarter
 * warp's 16-byte loads take distinct banks) and widened as it is read. The tile's tokens are taken in
 * runs of one sequence (a step may hold several); a row sees keys lo..p of its
 * own token, as in k_attention. Blocks take the tiles last first: later tokens
 * see more keys. */
#define AT_KT 32 /* keys per tile */

__device__ __forceinline__ float kv_f(float x) { return x; }
__device__ __forceinline__ float kv_f(__half x) { return __half2float(x); }

template <int RPW, int DPL, typename KT>
__global__ void __launch_bounds__(256)
    k_attn_tiled(float *out, const float *q, const g3n_kv_layer *kv, int layer, const int32_t *pos,
                 const int32_t *seq, int n_tokens, int n_head, int n_head_kv, int hd, int window, int nst) {
    constexpr int ROWS = 8 * RPW, EPC = 16 / sizeof(KT); /* cache elements a 16-byte copy */
    constexpr bool H16 = sizeof(KT) == 2;
    extern __shared__ float4 at_dyn[];
    const int G = n_head / n_head_kv, BQ = ROWS / G, kvd = n_head_kv * hd, qs = hd + 4, ks = H16 ? hd + 8 : hd + 4;
    const int n_tiles = (n_tokens + BQ - 1) / BQ;
    const int tile = n_tiles - 1 - (int)blockIdx.x / n_head_kv, hk = (int)blockIdx.x % n_head_kv;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *Qs = (float *)at_dyn;                   /* [ROWS][hd + 4] */
    KT *Ks = (KT *)(Qs + (size_t)ROWS * qs);       /* [nst][AT_KT][ks] */
    KT *Vs = Ks + (size_t)nst * AT_KT * ks;        /* [nst][AT_KT][hd] */
    const int t0 = tile * BQ, tend = min(t0 + BQ, n_tokens);
    KERNEL_BEGIN();
    for (int r0 = t0; r0 < tend;) { /* one run: tokens r0..r1-1 of sequence s */
        int r1, jlo, jhi;
        const int s = att_run(pos, seq, r0, tend, window, r1, jlo, jhi);
        const g3n_kv_layer L = kv[(size_t)s * G3N_KV_MAX_LAYERS + layer];
        /* the run's query rows (zeros for the tile's other tokens) */
        for (int i = threadIdx.x; i < ROWS * (hd / 4); i += blockDim.x) {
            const int r = i / (hd / 4), c4 = i % (hd / 4), t = t0 + r / G;
            float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
            if (t >= r0 && t < r1) v = *(const float4 *)(q + ((size_t)t * n_head + hk * G + r % G) * hd + 4 * c4);
            *(float4 *)(Qs + (size_t)r * qs + 4 * c4) = v;
        }
        int rlo[RPW], rhi[RPW]; /* each row's visible keys (empty for rows outside the run) */
#pragma unroll
        for (int i = 0; i < RPW; i++) {
            const int t = t0 + (warp * RPW + i) / G;
            rlo[i] = 1, rhi[i] = 0;
            if (t >= r0 && t < r1) rhi[i] = pos[t], rlo[i] = window > 0 ? max(0, rhi[i] - window + 1) : 0;
        }
        auto issue = [&](int jt, int buf) { /* key tile jt..jt+31 (those <= jhi) into buffer buf */
            KT *kd = Ks + (size_t)buf * AT_KT * ks, *vd = Vs + (size_t)buf * AT_KT * hd;
            const int nc = hd / EPC;
            for (int i = threadIdx.x; i < AT_KT * nc; i += blockDim.x) {
                const int jj = i / nc, c = i % nc, j = jt + jj;
                if (j > jhi) break;
                const size_t o = (size_t)(j % L.cap) * kvd + (size_t)hk * hd + EPC * c;
                cp_async16(kd + (size_t)jj * ks + EPC * c, (const KT *)L.k + o);
                cp_async16(vd + (size_t)jj * hd + EPC * c, (const KT *)L.v + o);
            }
            cp_async_commit();
        };
        float m[RPW], l[RPW], acc[RPW][DPL];
#pragma unroll
        for (int i = 0; i < RPW; i++) {
            m[i] = -INFINITY, l[i] = 0;
#pragma unroll
            for (int k = 0; k < DPL; k++) acc[i][k] = 0;
        }
        issue(jlo, 0);
        for (int jt = jlo, buf = 0; jt <= jhi; jt += AT_KT) {
            if (nst > 1) { /* the next tile streams in while this one is used */
                issue(jt + AT_KT, buf ^ 1);
                cp_async_wait<1>();
            } else
                cp_async_wait<0>();
            __syncthreads(); /* the tile (and, the first time, the query rows) are in place */
            const KT *kt = Ks + (size_t)buf * AT_KT * ks, *vt = Vs + (size_t)buf * AT_KT * hd;
            const int j = jt + lane;
            float sc[RPW];
#pragma unroll
            for (int i = 0; i < RPW; i++) sc[i] = 0;
            if (j <= jhi && H16)
                for (int d = 0; d < hd; d += 8) {
                    const uint4 raw = *(const uint4 *)(kt + (size_t)lane * ks + d);
                    const float2 k0 = __half22float2(*(const __half2 *)&raw.x), k1 = __half22float2(*(const __half2 *)&raw.y);
                    const float2 k2 = __half22float2(*(const __half2 *)&raw.z), k3 = __half22float2(*(const __half2 *)&raw.w);
#pragma unroll
                    for (int i = 0; i < RPW; i++) {
                        const float4 qa = *(const float4 *)(Qs + (size_t)(warp * RPW + i) * qs + d);
                        const float4 qb = *(const float4 *)(Qs + (size_t)(warp * RPW + i) * qs + d + 4);
                        sc[i] += qa.x * k0.x + qa.y * k0.y + qa.z * k1.x + qa.w * k1.y;
                        sc[i] += qb.x * k2.x + qb.y * k2.y + qb.z * k3.x + qb.w * k3.y;
                    }
                }
            else if (j <= jhi)
                for (int d = 0; d < hd; d += 4) {
                    const float4 kk = *(const float4 *)((const float *)kt + (size_t)lane * ks + d);
#pragma unroll
                    for (int i = 0; i < RPW; i++) {
                        const float4 qq = *(const float4 *)(Qs + (size_t)(warp * RPW + i) * qs + d);
                        sc[i] += qq.x * kk.x + qq.y * kk.y + qq.z * kk.z + qq.w * kk.w;
                    }
                }
#pragma unroll
            for (int i = 0; i < RPW; i++) { /* online softmax; sc becomes the weight */
                const float sv = j >= rlo[i] && j <= rhi[i] ? sc[i] : -INFINITY;
                const float m2 = fmaxf(m[i], warp_max(sv));
                if (m2 == -INFINITY) {
                    sc[i] = 0;
                    continue;
                }
                const float corr = __expf(m[i] - m2);
                sc[i] = sv == -INFINITY ? 0.0f : __expf(sv - m2);
                l[i] = l[i] * corr + sc[i];
#pragma unroll
                for (int k = 0; k < DPL; k++) acc[i][k] *= corr;
                m[i] = m2;
            }
            const int nk = min(AT_KT, jhi - jt + 1);
            for (int jj = 0; jj < nk; jj++) {
                float vv[DPL];
#pragma unroll
                for (int k = 0; k < DPL; k++) vv[k] = lane + 32 * k < hd ? kv_f(vt[(size_t)jj * hd + lane + 32 * k]) : 0.0f;
#pragma unroll
                for (int i = 0; i < RPW; i++) {
                    const float w = __shfl_sync(0xffffffffu, sc[i], jj);
#pragma unroll
                    for (int k = 0; k < DPL; k++) acc[i][k] += w * vv[k];
                }
            }
            __syncthreads(); /* every warp is done with buf before it is refilled */
            buf ^= nst > 1;
            if (nst == 1 && jt + AT_KT <= jhi) issue(jt + AT_KT, 0);
        }
        cp_async_wait<0>(); /* (the group past the last tile is empty) */
#pragma unroll
        for (int i = 0; i < RPW; i++) {
            const int r = warp * RPW + i, t = t0 + r / G;
            const float lt = warp_sum(l[i]);
            if (t >= r0 && t < r1) {
                float *o = out + ((size_t)t * n_head + hk * G + r % G) * hd;
#pragma unroll
                for (int k = 0; k < DPL; k++)
                    if (lane + 32 * k < hd) o[lane + 32 * k] = lt > 0 ? acc[i][k] / lt : 0.0f;
            }
        }
        __syncthreads(); /* the query rows are restaged for the next run */
        r0 = r1;
    }
}

/* The tiled kernel's dynamic shared memory: query rows, nst key tiles and value
 * tiles (cache elements of esz bytes) */
static size_t at_smem(int rpw, int hd, int nst, int esz) {
    return (size_t)8 * rpw * (hd + 4) * sizeof(float) + (size_t)nst * AT_KT * (2 * hd + (esz == 2 ? 8 : 4)) * esz;
}

template <int RPW, int D, typename KT>
static void at_launch(cuda_ctx *c, int nst, size_t smem, float *out, const float *q, int layer, int n_head,
                      int n_head_kv, int hd, int window) {
    static int raised; /* the kernel may take the most any launch asks (once per instantiation) */
    if (!raised) {
        CUDA_CHECK(cudaFuncSetAttribute(k_attn_tiled<RPW, D, KT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int)G3N_MIN(c->smem_optin, at_smem(RPW, 256, 2, sizeof(KT)))));
        raised = 1;
    }
    const int bq = 8 * RPW / (n_head / n_head_kv);
    launch(c, k_attn_tiled<RPW, D, KT>, dim3((unsigned)((c->n_tokens + bq - 1) / bq * n_head_kv)), dim3(256), smem,
           out, q, c->d_kv, layer, d_pos(c), d_seq(c), c->n_tokens, n_head, n_head_kv, hd, window, nst);
}

template <int RPW, typename KT>
static int at_launch_rpw(cuda_ctx *c, int dpl, int nst, size_t smem, float *out, const float *q, int layer,
                         int n_head, int n_head_kv, int hd, int window) {
#define AT(D) at_launch<RPW, D, KT>(c, nst, smem, out, q, layer, n_head, n_head_kv, hd, window)
    switch (dpl) {
    case 1: AT(1); return 1;
    case 2: AT(2); return 1;
    case 4: AT(4); return 1;
    case 8: AT(8); return 1;
    default: return 0;
    }
#undef AT
}

/* The tiled kernel where it applies: head_dim a multiple of 4 (8 with an f16
 * cache) up to 256, a
 * query-row count (8 x 1, 2, 4 or 8) that the group size divides, and steps of
 * at least 16 tokens. Rows per warp: the most that still give every SM a
 * block; two key stages where they fit. Read at each call (tests and timing):
 * G3N_ATT_TILED=0 never, 1 any step; G3N_ATT_RPW=r rows per warp where r fits;
 * G3N_ATT_NST=1 one key stage. */
static int attention_tiled(cuda_ctx *c, float *out, const float *q, int layer, int n_head, int n_head_kv, int hd,
                           int window) {
    const char *e = getenv("G3N_ATT_TILED"), *er = getenv("G3N_ATT_RPW"), *em = getenv("G3N_ATT_MMA");
    const int mode = e ? atoi(e) : -1, want = er ? atoi(er) : 0, mma = em ? atoi(em) : -1;
    const int G = n_head / n_head_kv, f16 = cuda_kv_f16(c, layer), esz = f16 ? 2 : 4;
    /* an f16 cache: the tensor cores (attention_mma.cu) for the same steps, unless
     * a tiled shape is asked for (tests); G3N_ATT_MMA=0 never, 1 any step */
    if (f16 && mma != 0 && !er && mode != 0 && (mma == 1 || c->n_tokens >= 16) &&
        cuda_attention_mma(c, out, q, layer, n_head, n_head_kv, hd, window))
        return 1;
    if (mode == 0 || (mode < 0 && c->n_tokens < 16) || hd % (f16 ? 8 : 4) != 0 || hd > 256 || n_head % n_head_kv != 0)
        return 0;
    int rpw = 0;
    for (int r = 8; r >= 1; r /= 2) {
        if ((8 * r) % G != 0 || at_smem(r, hd, 1, esz) > c->smem_optin || (want > 0 && r > want)) continue;
        const long blocks = (long)(c->n_tokens + 8 * r / G - 1) / (8 * r / G) * n_head_kv;
        rpw = r; /* the smallest that fits, unless a larger one fills the GPU */
        if (want > 0 || blocks >= c->n_sm) break;
    }
    if (!rpw) return 0;
    const char *en = getenv("G3N_ATT_NST"); /* 1: one key stage (tests) */
    const int nst = at_smem(rpw, hd, 2, esz) <= c->smem_optin && !(en && atoi(en) == 1) ? 2 : 1;
    const int dpl = hd <= 32 ? 1 : hd <= 64 ? 2 : hd <= 128 ? 4 : 8;
    const size_t smem = at_smem(rpw, hd, nst, esz);
#define AT_RPW(T)                                                                                        \
    switch (rpw) {                                                                                       \
    case 8: return at_launch_rpw<8, T>(c, dpl, nst, smem, out, q, layer, n_head, n_head_kv, hd, window); \
    case 4: return at_launch_rpw<4, T>(c, dpl, nst, smem, out, q, layer, n_head, n_head_kv, hd, window); \
    case 2: return at_launch_rpw<2, T>(c, dpl, nst, smem, out, q, layer, n_head, n_head_kv, hd, window); \
    default: return at_launch_rpw<1, T>(c, dpl, nst, smem, out, q, layer, n_head, n_head_kv, hd, window); \
    }
    if (f16) AT_RPW(__half)
    AT_RPW(float)
#undef AT_RPW
}

void cuda_op_attention(g3n_backend *be, float *out, const float *q, int layer, int n_head, int n_head_kv,
                       int head_dim, int window) {
    cuda_ctx *c = CTX(be);
    G3N_ASSERT(head_dim <= CUDA_MAX_HEAD_DIM);
    PROF_BEGIN(c);
    if (!attention_tiled(c, out, q, layer, n_head, n_head_kv, head_dim, window))
        launch(c, k_attention, dim3(c->n_tokens * n_head), dim3(ATT_WARPS * 32), 0, out, q, c->d_kv, layer, d_pos(c),
               d_seq(c), n_head, n_head_kv, head_dim, window);
    CUDA_LAUNCHED();
    PROF_END(c, window > 0 ? "attention (sliding)" : "attention (full)", 0);
}

/* ---- decode: q/k/v norms, RoPE, cache store and attention in one kernel ----------------------
 *
 * For steps where every token is its own sequence's only token (decode of one or
 * several sequences). One cluster of `nsp` blocks per (token, KV head): each block
 * normalises and rotates the G = H/Hkv query heads that share the KV head (and,
 * in a layer that owns its cache, the new key and value), then takes an equal
 * share of the visible keys; its warps walk the keys two at a time with an online
 * softmax for all G heads at once, so each key and value is read once. The keys
 * and values stored by earlier steps stream into a per-warp ring of shared memory
 * (cp.async), the first nb of them before the PDL wait, while the q/k/v product
 * still runs. The block whose share holds the new position uses the new
 * key/value from shared memory and writes them to the cache. The partial results
 * meet through distributed shared memory: rank r of the cluster owns a slice of
 * the outputs, every block pushes its partial of that slice (and its softmax max
 * and sum) into rank r's memory, and after one cluster barrier each rank merges
 * its slice in rank order from its own memory: the result does not depend on
 * timing.
 *
 * Long contexts take nsg such clusters per (token, KV head), each a chunk of the
 * keys: rank r of each stores its slice's sums and the heads' max and sum in
 * memory, and the last rank-r block to arrive (a counter) adds the chunks in
 * chunk order.
 *
 * Built with -DATT_TRACE, thread 0 of each block (of launches with at least
 * -DATT_TRACE_MIN_NSG chunks) records %globaltimer at the PDL release and after
 * each stage, and the mean of each stage over the last half of the run's blocks
 * is printed at exit (how the stages below were measured;
 * docs/SPEED.md, ninth session). */
#include <cooperative_groups.h>
namespace cg = cooperative_groups;

#define DEC_WARPS 8
#define DEC_NSG 64 /* most clusters (chunks of the keys) per (token, KV head) */
#ifdef ATT_TRACE
__device__ unsigned long long att_tr[1 << 18][8];
__device__ unsigned att_trn;
#define ATT_T(k) unsigned long long tt##k = threadIdx.x == 0 ? gtime() : 0
#ifndef ATT_TRACE_MIN_NSG /* record the blocks of launches with at least this many chunks (long contexts) */
#define ATT_TRACE_MIN_NSG 1
#endif
#define ATT_DONE(nsg) if (threadIdx.x == 0 && (nsg) >= ATT_TRACE_MIN_NSG) { unsigned i_ = atomicAdd(&att_trn, 1); if (i_ < (1u << 18)) { \
    att_tr[i_][0] = tt0, att_tr[i_][1] = tt1, att_tr[i_][2] = tt2, att_tr[i_][3] = tt3, att_tr[i_][4] = tt4, \
    att_tr[i_][5] = tt5, att_tr[i_][6] = tt6, att_tr[i_][7] = tt7; } }
static void att_trace_dump(void) {
    unsigned n = 0;
    cudaMemcpyFromSymbol(&n, att_trn, sizeof n);
    if (n > (1u << 18)) n = 1u << 18;
    static unsigned long long h[1 << 18][8];
    cudaMemcpyFromSymbol(h, att_tr, (size_t)n * 64);
    double s[8] = {0};
    unsigned m = 0;
    for (unsigned i = n / 2; i < n; i++, m++) for (int k = 1; k < 8; k++) s[k] += (double)(h[i][k] - h[i][k - 1]);
    fprintf(stderr, "att trace: %u blocks (last %u):", n, m);
    for (int k = 1; k < 8; k++) fprintf(stderr, " %d:%.2f", k, s[k] / m / 1000.0);
    fprintf(stderr, " us\n");
}
#else
#define ATT_T(k)
#define ATT_DONE(nsg)
#endif

/* RoPE's cos and sin at position p for this lane's pairs of an hd = 32 * DPL
 * vector: pair i, i + hd/2 with i = lane + 32k (k < DPL/2), or for hd 32 the
 * pair (lane & 15, + 16) two lanes apart. Computed before the PDL wait: they
 * depend on the position only. */
template <int DPL>
__device__ __forceinline__ void rope_cs(float (&cs)[DPL], float (&sn)[DPL], float p, float theta) {
    constexpr int hd = 32 * DPL, np = DPL == 1 ? 1 : DPL / 2;
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int k = 0; k < np; k++) {
        const int i = DPL == 1 ? (lane & 15) : lane + 32 * k;
        const float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)hd);
        sincosf(inv_freq * p, &sn[k], &cs[k]);
    }
}

/* Per-head RMS norm (weight w, may be NULL) and RoPE (rope: with rope_cs's cos
 * and sin) of one hd-vector by one warp, lane-strided (dim lane + 32k; RoPE
 * pairs i, i + hd/2 fall in the same lane, except for hd 32), into dst; h16:
 * rounded as an f16 cache holds it. */
template <int DPL>
__device__ __forceinline__ void dec_norm_rope(float *dst, const float *src, const float *w, const float (&cs)[DPL],
                                              const float (&sn)[DPL], bool rope, float eps, bool h16 = false) {
    constexpr int hd = 32 * DPL, half = DPL / 2;
    const int lane = threadIdx.x & 31;
    float x[DPL], ss = 0;
#pragma unroll
    for (int k = 0; k < DPL; k++) {
        x[k] = src[lane + 32 * k];
        ss += x[k] * x[k];
    }
    const float inv = rsqrtf(warp_sum(ss) / (float)hd + eps);
#pragma unroll
    for (int k = 0; k < DPL; k++) x[k] *= w ? inv * w[lane + 32 * k] : inv;
    if (rope && DPL == 1) { /* hd 32: the pair (i, i + 16) is two lanes apart */
        const float other = __shfl_xor_sync(0xffffffffu, x[0], 16);
        x[0] = lane < 16 ? x[0] * cs[0] - other * sn[0] : x[0] * cs[0] + other * sn[0];
    } else if (rope)
#pragma unroll
        for (int k = 0; k < half; k++) {
            const float a = x[k], b = x[k + half];
            x[k] = a * cs[k] - b * sn[k];
            x[k + half] = b * cs[k] + a * sn[k];
        }
#pragma unroll
    for (int k = 0; k < DPL; k++) dst[lane + 32 * k] = kv_round(h16, x[k]);
}

/* After the PDL wait, a decode attention block's heads (both kernels): the G
 * query heads of KV head hk of token t normalised and rotated into sq, and in a
 * layer that owns its cache the new key and value into snew (f16-rounded where
 * the cache is), one warp a vector. */
template <int G, int DPL, bool H16>
__device__ __forceinline__ void dec_heads(float (&sq)[G][32 * DPL], float (&snew)[2][32 * DPL], const float *q,
                                          const float *k, const float *v, const float *qn, const float *kn,
                                          const float (&cs)[DPL], const float (&sn)[DPL], int t, int hk, int Hkv,
                                          int owns, float theta, float eps) {
    constexpr int hd = 32 * DPL;
    const int warp = threadIdx.x >> 5, H = Hkv * G;
    for (int job = warp; job < G + 2 * owns; job += DEC_WARPS) {
        if (job < G) dec_norm_rope<DPL>(sq[job], q + ((size_t)t * H + hk * G + job) * hd, qn, cs, sn, theta > 0, eps);
        else if (job == G) dec_norm_rope<DPL>(snew[0], k + ((size_t)t * Hkv + hk) * hd, kn, cs, sn, theta > 0, eps, H16);
        else dec_norm_rope<DPL>(snew[1], v + ((size_t)t * Hkv + hk) * hd, NULL, cs, sn, false, eps, H16);
    }
}

/* The step's new key and value (snew) into the cache at position p, by the
 * one block whose share of the keys holds p */
template <int DPL>
__device__ __forceinline__ void dec_store_new(const g3n_kv_layer &L, const float (&snew)[2][32 * DPL], int p, int hk,
                                              int kvd) {
    constexpr int hd = 32 * DPL;
    const size_t o = (size_t)(p % L.cap) * kvd + (size_t)hk * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) kv_st(L, L.k, o + d, snew[0][d]), kv_st(L, L.v, o + d, snew[1][d]);
}

/* cp.async.wait_group with a run-time depth (the ring's nb, 1..DEC_RING) */
__device__ __forceinline__ void cp_async_wait_rt(int n) {
    switch (n) {
    case 0: cp_async_wait<0>(); break;
    case 1: cp_async_wait<1>(); break;
    case 2: cp_async_wait<2>(); break;
    case 3: cp_async_wait<3>(); break;
    case 4: cp_async_wait<4>(); break;
    case 5: cp_async_wait<5>(); break;
    case 6: cp_async_wait<6>(); break;
    default: cp_async_wait<7>(); break;
    }
}

/* A cluster barrier in two halves: arrive early, wait where it matters */
__device__ __forceinline__ void cluster_arrive_relaxed() { asm volatile("barrier.cluster.arrive.relaxed;" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait;" ::: "memory"); }

template <int G, int DPL, typename KT>
__global__ void __launch_bounds__(DEC_WARPS * 32, 1)
    k_attn_decode(float *out, const float *q, const float *k, const float *v, const float *qn, const float *kn,
                  const g3n_kv_layer *kv, int owns, int layer, const int32_t *pos, const int32_t *seq,
                  int Hkv, float theta, float eps, int window, int nb, int nsg, float *part, unsigned *cnt,
                  int trig_early) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
    __trap(); /* clusters: sm_90 and later only (the host never launches it there) */
#else
    constexpr int hd = 32 * DPL, EPC = 16 / sizeof(KT); /* cache elements a 16-byte copy */
    constexpr bool H16 = sizeof(KT) == 2;
    extern __shared__ float4 dec_dyn[]; /* per warp: nb slots of a key and its value; then its partial */
    __shared__ float sq[G][hd], snew[2][hd];
    __shared__ float wm[DEC_WARPS][G], wl[DEC_WARPS][G];
    __shared__ float we[DEC_WARPS][G];     /* the warps' weights in this block's partial */
    __shared__ float pm[8][G], pl[8][G];   /* every rank's max and sum, pushed by the ranks */
    __shared__ float pacc[G * hd + 8];     /* every rank's partial of this rank's outputs, pushed */
    __shared__ float hm[G], hl[G];         /* the cluster's max and sum per head */
    __shared__ float sw[DEC_NSG][G];       /* nsg > 1: each cluster's weight per head, in the final merge */
    __shared__ int last;
    cg::cluster_group cl = cg::this_cluster();
    const int nsp = (int)cl.num_blocks(), rank = (int)cl.block_rank();
    const int ncl = blockIdx.x / nsp, grp = ncl / nsg, chunk = ncl % nsg, t = grp / Hkv, hk = grp % Hkv;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, H = Hkv * G, kvd = Hkv * hd;
    const size_t wreg = (size_t)nb * 2 * hd * sizeof(KT) / sizeof(float); /* floats of a warp's ring (>= G hd) */
    KT *ring = (KT *)((float *)dec_dyn + (size_t)warp * wreg);
    /* Before the PDL wait, what does not depend on the previous kernel: the
     * position and cache (set before the step), RoPE's cos and sin, and the
     * loads of this warp's first nb keys and values stored by earlier steps
     * (the new one, p, is stored by this step: in this kernel, or for a
     * KV-shared layer by an earlier one, and is read after the wait). The warp
     * takes keys j0 + warp + i * DEC_WARPS; key i goes to slot i % nb, and each
     * slot's copy is one cp.async group, so the warp waits for its oldest only. */
    const int p = pos[t];
    const g3n_kv_layer L = kv[(size_t)seq[t] * G3N_KV_MAX_LAYERS + layer];
    float cs[DPL], sn[DPL];
    if (theta > 0) rope_cs<DPL>(cs, sn, (float)p, theta);
    const int lo = window > 0 ? max(0, p - window + 1) : 0, span = p - lo + 1;
    const int nblk = nsg * nsp, share = (span + nblk - 1) / nblk;
    const int j0 = lo + (chunk * nsp + rank) * share, j1 = min(j0 + share, p + 1);
    const int nw = j0 + warp < j1 ? (j1 - j0 - warp + DEC_WARPS - 1) / DEC_WARPS : 0;
    auto issue = [&](int i, KT *slot) {
        const int j = j0 + warp + i * DEC_WARPS;
        if (i < nw && j < p) {
            const size_t o = (size_t)(j % L.cap) * kvd + (size_t)hk * hd;
            for (int c = lane; c < hd / EPC; c += 32) {
                cp_async16(slot + EPC * c, (const KT *)L.k + o + EPC * c);
                cp_async16(slot + hd + EPC * c, (const KT *)L.v + o + EPC * c);
            }
        }
        cp_async_commit();
    };
    for (int i = 0; i < nb; i++) issue(i, ring + (size_t)i * 2 * hd);
    cluster_arrive_relaxed(); /* waited for before the first store to another block's memory */
    ATT_T(0);
    /* The wait, then the trigger: the next kernel (the o product) starts
     * launching only once q/k/v has ended. Triggering at the start (as the
     * other kernels do; trig_early, G3N_ATT_TRIG=0) let o, the attention
     * residual and gate/up launch, one after another, while q/k/v still ran,
     * and gate/up's blocks then loaded their first weights beside q/k/v's.
     * That kept 8-bit q/k/v from triggering at its own start (docs/SPEED.md,
     * twenty-first session). */
    if (trig_early) pdl_trigger();
    pdl_wait();
    if (!trig_early) pdl_trigger();
    ATT_T(1);
    dec_heads<G, DPL, H16>(sq, snew, q, k, v, qn, kn, cs, sn, t, hk, Hkv, owns, theta, eps);
    __syncthreads();
    ATT_T(2);
    if (owns && p >= j0 && p < j1) dec_store_new<DPL>(L, snew, p, hk, kvd); /* this block's share holds p */
    float qr[G][DPL], acc[G][DPL], m[G], l[G];
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY, l[g] = 0;
#pragma unroll
        for (int d = 0; d < DPL; d++) qr[g][d] = sq[g][lane + 32 * d], acc[g][d] = 0;
    }
    /* two keys an iteration: their dot products' reductions overlap. Key i
     * (ring slot si) into this lane's registers: the new one from shared memory
     * (owns) or the cache (a KV-shared layer: stored earlier in the step) */
    auto key_at = [&](int i, int si, float (&kr)[DPL], float (&vr)[DPL]) {
        const int j = j0 + warp + i * DEC_WARPS;
        if (j == p && owns) {
#pragma unroll
            for (int d = 0; d < DPL; d++) kr[d] = snew[0][lane + 32 * d], vr[d] = snew[1][lane + 32 * d];
            return;
        }
        const KT *kj = ring + (size_t)si * 2 * hd, *vj = kj + hd;
        if (j == p) {
            const size_t o = (size_t)(p % L.cap) * kvd + (size_t)hk * hd;
            kj = (const KT *)L.k + o, vj = (const KT *)L.v + o;
        }
#pragma unroll
        for (int d = 0; d < DPL; d++) kr[d] = kv_f(kj[lane + 32 * d]), vr[d] = kv_f(vj[lane + 32 * d]);
    };
    for (int i = 0, si = 0; i < nw; i += 2) {
        const int si2 = si + 1 == nb ? 0 : si + 1, two = i + 1 < nw;
        cp_async_wait_rt(nb - 2); /* keys i and i + 1: nb + i groups committed, at most nb - 2 pending */
        __syncwarp();
        float kr[2][DPL], vr[2][DPL];
        key_at(i, si, kr[0], vr[0]);
        key_at(two ? i + 1 : i, two ? si2 : si, kr[1], vr[1]);
        __syncwarp(); /* every lane has read the slots: refill them */
        issue(i + nb, ring + (size_t)si * 2 * hd);
        issue(i + 1 + nb, ring + (size_t)si2 * 2 * hd);
        si = si2 + 1 == nb ? 0 : si2 + 1;
        float sa[G], sb[G];
#pragma unroll
        for (int g = 0; g < G; g++) {
            sa[g] = 0, sb[g] = 0;
#pragma unroll
            for (int d = 0; d < DPL; d++) sa[g] += qr[g][d] * kr[0][d], sb[g] += qr[g][d] * kr[1][d];
        }
#pragma unroll
        for (int g = 0; g < G; g++) sa[g] = warp_sum(sa[g]), sb[g] = warp_sum(sb[g]);
#pragma unroll
        for (int g = 0; g < G; g++) {
            const float sbg = two ? sb[g] : -INFINITY;
            const float m2 = fmaxf(m[g], fmaxf(sa[g], sbg)), corr = __expf(m[g] - m2);
            const float ea = __expf(sa[g] - m2), eb = two ? __expf(sbg - m2) : 0.0f;
            l[g] = l[g] * corr + ea + eb;
#pragma unroll
            for (int d = 0; d < DPL; d++) acc[g][d] = acc[g][d] * corr + ea * vr[0][d] + eb * vr[1][d];
            m[g] = m2;
        }
    }
    cp_async_wait<0>(); /* (every group left is empty) */
    ATT_T(3);
    __syncwarp();
    float *wacc = (float *)dec_dyn; /* [DEC_WARPS][G][hd]: warp w's part lies in its own ring, wreg apart */
#pragma unroll
    for (int g = 0; g < G; g++) {
        if (lane == 0) wm[warp][g] = m[g], wl[warp][g] = l[g];
#pragma unroll
        for (int d = 0; d < DPL; d++) wacc[(size_t)warp * wreg + (size_t)g * hd + lane + 32 * d] = acc[g][d];
    }
    __syncthreads();
    /* Merge the warps, in order: each head's weights once (threads < G), then
     * every output a sum of independent shared-memory loads */
    if (threadIdx.x < G) {
        const int g = threadIdx.x;
        float M = -INFINITY, Ls = 0;
        for (int w = 0; w < DEC_WARPS; w++)
            if (wl[w][g] > 0) M = fmaxf(M, wm[w][g]);
        for (int w = 0; w < DEC_WARPS; w++) {
            const float e = wl[w][g] > 0 ? __expf(wm[w][g] - M) : 0.0f;
            we[w][g] = e;
            Ls += wl[w][g] * e;
        }
        /* push this block's max and sum to every rank of the cluster */
        cluster_wait(); /* every block has started (the arrive at the top) */
        for (int r = 0; r < nsp; r++) *cl.map_shared_rank(&pm[rank][g], r) = M, *cl.map_shared_rank(&pl[rank][g], r) = Ls;
    } else
        cluster_wait();
    __syncthreads();
    ATT_T(4);
    /* Merge the blocks, in rank order: rank r owns outputs [r per, (r + 1) per);
     * each block pushes its partial of those into rank r's shared memory, so
     * after one cluster barrier every rank reads its own memory only */
    const int per = (G * hd + nsp - 1) / nsp;
    for (int i = threadIdx.x; i < G * hd; i += blockDim.x) {
        const int g = i / hd, d = i % hd, dst = i / per;
        float As = 0;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; w++) As += wacc[(size_t)w * wreg + (size_t)g * hd + d] * we[w][g];
        *cl.map_shared_rank(&pacc[rank * per + i - dst * per], dst) = As;
    }
    ATT_T(5);
    cl.sync();
    ATT_T(6);
    const int i1 = min((rank + 1) * per, G * hd);
    if (nsg == 1) { /* the result: each output's heads' max and sum over the ranks, then its sum */
        for (int i = rank * per + threadIdx.x; i < i1; i += blockDim.x) {
            const int g = i / hd, d = i % hd;
            float M = -INFINITY, Ls = 0, As = 0;
            for (int r = 0; r < nsp; r++)
                if (pl[r][g] > 0) M = fmaxf(M, pm[r][g]);
            for (int r = 0; r < nsp; r++)
                if (pl[r][g] > 0) {
                    const float e = __expf(pm[r][g] - M);
                    Ls += pl[r][g] * e;
                    As += pacc[r * per + i - rank * per] * e;
                }
            out[((size_t)t * H + hk * G + g) * hd + d] = As / Ls;
        }
    }
    if (nsg > 1) {
        /* The chunks of a (token, KV head) meet in memory: each rank r stores its
         * outputs' sums and the heads' max and sum; the last of the nsg rank-r
         * blocks to count itself in (a counter per (token, KV head, rank), put
         * back to 0 by that block) adds them in chunk order: the result does not
         * depend on timing. */
        if (threadIdx.x < G) { /* each head's max and sum over the cluster's ranks */
            const int g = threadIdx.x;
            float M = -INFINITY, Ls = 0;
            for (int r = 0; r < nsp; r++)
                if (pl[r][g] > 0) M = fmaxf(M, pm[r][g]);
            for (int r = 0; r < nsp; r++)
                if (pl[r][g] > 0) Ls += pl[r][g] * __expf(pm[r][g] - M);
            hm[g] = M, hl[g] = Ls;
        }
        __syncthreads();
        const size_t pstride = (size_t)G * hd + (size_t)2 * G * nsp; /* floats of a chunk's partial */
        float *pg = part + (size_t)grp * nsg * pstride;             /* [nsg][G * hd], then [nsg][nsp][2G] */
        for (int i = rank * per + threadIdx.x; i < i1; i += blockDim.x) {
            const int g = i / hd;
            float As = 0;
            for (int r = 0; r < nsp; r++)
                if (pl[r][g] > 0) As += pacc[r * per + i - rank * per] * __expf(pm[r][g] - hm[g]);
            pg[(size_t)chunk * G * hd + i] = As;
        }
        float *st = pg + (size_t)nsg * G * hd;
        if (threadIdx.x < G) {
            float *sr = st + ((size_t)chunk * nsp + rank) * 2 * G;
            sr[threadIdx.x] = hm[threadIdx.x], sr[G + threadIdx.x] = hl[threadIdx.x];
        }
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) last = atomicAdd(&cnt[(size_t)grp * nsp + rank], 1u) == (unsigned)nsg - 1;
        __syncthreads();
        if (last) {
            __threadfence();
            if (threadIdx.x < G) {
                const int g = threadIdx.x;
                float M = -INFINITY, Ls = 0;
                for (int cI = 0; cI < nsg; cI++) {
                    const float *sr = st + ((size_t)cI * nsp + rank) * 2 * G;
                    if (__ldcg(sr + G + g) > 0) M = fmaxf(M, __ldcg(sr + g));
                }
                for (int cI = 0; cI < nsg; cI++) {
                    const float *sr = st + ((size_t)cI * nsp + rank) * 2 * G;
                    const float lc = __ldcg(sr + G + g), e = lc > 0 ? __expf(__ldcg(sr + g) - M) : 0.0f;
                    sw[cI][g] = e;
                    Ls += lc * e;
                }
                hl[g] = Ls;
            }
            __syncthreads();
            for (int i = rank * per + threadIdx.x; i < i1; i += blockDim.x) {
                const int g = i / hd, d = i % hd;
                float As = 0;
                for (int cI = 0; cI < nsg; cI++)
                    if (sw[cI][g] > 0) As += __ldcg(pg + (size_t)cI * G * hd + i) * sw[cI][g];
                out[((size_t)t * H + hk * G + g) * hd + d] = As / hl[g];
            }
            if (threadIdx.x == 0) cnt[(size_t)grp * nsp + rank] = 0;
        }
    }
    ATT_T(7); ATT_DONE(nsg);
#endif
}

/* Most slots per warp: all of a warp's keys of a 512-key window in flight at
 * once. An f16 cache's slots are half as large; 16 of them (the same memory)
 * were level with 8 at 32k keys (docs/SPEED.md, eighteenth session). */
#define DEC_RING 8

/* k_attn_decode's dynamic shared memory: each warp's ring of nb keys and values */
static size_t dec_smem(int nb, int hd, int esz) { return (size_t)DEC_WARPS * nb * 2 * hd * esz; }

template <int G, int DPL, typename KT>
static void dec_launch(cuda_ctx *c, unsigned nsp, int nsg, int keep, int nb, float *out, const float *q, const float *k,
                       const float *v, const float *qn, const float *kn, int owns, int layer, int Hkv, float theta,
                       float eps, int window) {
    static int raised; /* the kernel may take the widest ring (once per instantiation) */
#ifdef ATT_TRACE
    static int reg;
    if (!reg) atexit(att_trace_dump), reg = 1;
#endif
    const int esz = sizeof(KT);
    const size_t smem = dec_smem(nb, 32 * DPL, esz);
    static int trig_early = -1; /* G3N_ATT_TRIG=0: trigger at the start (timing) */
    if (trig_early < 0) trig_early = getenv("G3N_ATT_TRIG") && !atoi(getenv("G3N_ATT_TRIG"));
    if (!raised) {
        CUDA_CHECK(cudaFuncSetAttribute(k_attn_decode<G, DPL, KT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int)dec_smem(DEC_RING, 32 * DPL, esz)));
        raised = 1;
    }
    /* All of a step's clusters at once (on the H100 15 of 8 blocks with the
     * widest ring are resident): nsg is cut to what is (asked once per shape),
     * unless `keep` (a forced nsg: tests). */
    static int maxc[4][DEC_RING + 1];
    const int si = nsp == 8 ? 3 : nsp == 4 ? 2 : nsp == 2 ? 1 : 0;
    if (nsg > 1 && nsp > 1 && nb <= DEC_RING && !keep) {
        if (!maxc[si][nb]) {
            const int n = cuda_resident_clusters((const void *)k_attn_decode<G, DPL, KT>, nsp, DEC_WARPS * 32, smem);
            maxc[si][nb] = n > 0 ? n : 1 << 20; /* not answered: as if every cluster fits */
        }
        const long grp = (long)c->n_tokens * Hkv;
        if (grp * nsg > maxc[si][nb]) nsg = (int)G3N_MAX(1, maxc[si][nb] / grp);
    }
    launch_cluster(c, nsp, k_attn_decode<G, DPL, KT>, dim3((unsigned)c->n_tokens * Hkv * nsg * nsp),
                   dim3(DEC_WARPS * 32), smem, out, q, k, v, qn, kn, c->d_kv, owns, layer, d_pos(c), d_seq(c), Hkv,
                   theta, eps, window, nb, nsg, c->att_part, c->att_cnt, trig_early);
}

/* ---- decode attention over a short span: the scores exchanged, the values split by dims ----
 *
 * Where a step's tokens see few keys (at most 256 by default: a context under
 * 256 tokens; short_launch says why not more), one cluster of nsp blocks per
 * (token, KV head) as k_attn_decode, but the work is cut the other way after
 * the scores: block r computes the scores of its share of the keys (their K
 * rows, a warp two keys at a time), pushes them into every rank's shared
 * memory, and after one cluster barrier every block holds all of the span's
 * scores. It then takes the softmax itself and the outputs of its own
 * nd = hd / nsp dims of each head, over every key's values of those dims
 * (loaded before the PDL wait like the K rows): no partial outputs, no maxima
 * and sums to merge, one cluster barrier instead of k_attn_decode's two and
 * its warps' merge. A block reads the same bytes (its keys' K rows, every
 * key's V slice). The values' sum is split over the block's threads by key
 * (ks, ks + ksl, ...; four running sums a thread) and added in a fixed order:
 * the result does not depend on timing. Where k_attn_decode's stages took
 * 7.6 µs after the PDL wait at E4B 4-bit, this takes 5.5 (-DATT_TRACE). */

/* 4 consecutive cache elements (16- or 8-byte aligned in shared memory) as floats */
__device__ __forceinline__ void ld4f(const float *p, float (&x)[4]) {
    const float4 v = *(const float4 *)p;
    x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
}
__device__ __forceinline__ void ld4f(const __half *p, float (&x)[4]) {
    const uint2 u = *(const uint2 *)p;
    const float2 a = __half22float2(*(const __half2 *)&u.x), b = __half22float2(*(const __half2 *)&u.y);
    x[0] = a.x, x[1] = a.y, x[2] = b.x, x[3] = b.y;
}

#define ATT_SHORT_MAX 512 /* the most keys k_attn_short takes (G3N_ATT_SHORT_MAX up to it) */

template <int G, int DPL, typename KT>
__global__ void __launch_bounds__(DEC_WARPS * 32, 1)
    k_attn_short(float *out, const float *q, const float *k, const float *v, const float *qn, const float *kn,
                 const g3n_kv_layer *kv, int owns, int layer, const int32_t *pos, const int32_t *seq, int Hkv,
                 float theta, float eps, int window, int kcap, int scap) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
    __trap(); /* clusters: sm_90 and later only (the host never launches it there) */
#else
    constexpr int hd = 32 * DPL, EPC = 16 / sizeof(KT); /* cache elements a 16-byte copy */
    constexpr bool H16 = sizeof(KT) == 2;
    extern __shared__ float4 sh_dyn[]; /* scores [G][scap], K rows [kcap][hd], V slices [scap][nd] */
    __shared__ float sq[G][hd], snew[2][hd], hinv[G];
    __shared__ float4 red[DEC_WARPS * 32];
    cg::cluster_group cl = cg::this_cluster();
    const int nsp = (int)cl.num_blocks(), rank = (int)cl.block_rank();
    const int grp = blockIdx.x / nsp, t = grp / Hkv, hk = grp % Hkv;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, H = Hkv * G, kvd = Hkv * hd;
    const int nd = hd / nsp, d0 = rank * nd; /* this block's output dims of each head */
    float *sc = (float *)sh_dyn;
    KT *kb = (KT *)(sc + (size_t)G * scap), *vb = kb + (size_t)kcap * hd;
    /* Before the PDL wait: RoPE's cos and sin, this block's keys' K rows and
     * every key's V slice, except the step's own key p (stored by this step) */
    const int p = pos[t];
    const g3n_kv_layer L = kv[(size_t)seq[t] * G3N_KV_MAX_LAYERS + layer];
    float cs[DPL], sn[DPL];
    if (theta > 0) rope_cs<DPL>(cs, sn, (float)p, theta);
    const int lo = window > 0 ? max(0, p - window + 1) : 0, span = p - lo + 1;
    const int share = (span + nsp - 1) / nsp, j0 = lo + rank * share, j1 = min(j0 + share, p + 1);
    const KT *Kc = (const KT *)L.k + (size_t)hk * hd, *Vc = (const KT *)L.v + (size_t)hk * hd + d0;
    /* a warp a key (its lanes the row's 16-byte copies); the V slices kpw keys
     * a warp at once, vch copies each (powers of two) */
    constexpr int kch = hd / EPC;
    for (int jj = warp; jj < j1 - j0; jj += DEC_WARPS) {
        const int j = j0 + jj;
        if (j < p) {
            const KT *src = Kc + (size_t)(j % L.cap) * kvd;
            KT *dst = kb + (size_t)jj * hd;
            for (int c = lane; c < kch; c += 32) cp_async16(dst + c * EPC, src + c * EPC);
        }
    }
    const int vch = nd / EPC, vsh = __ffs(vch) - 1, kpw = vch >= 32 ? 1 : 32 >> vsh;
    const int sub = vch >= 32 ? 0 : lane >> vsh, c0 = vch >= 32 ? lane : lane & (vch - 1);
    for (int jj = warp * kpw + sub; jj < span - 1; jj += DEC_WARPS * kpw) {
        const KT *src = Vc + (size_t)((lo + jj) % L.cap) * kvd;
        KT *dst = vb + (size_t)jj * nd;
        for (int c = c0; c < vch; c += 32) cp_async16(dst + c * EPC, src + c * EPC);
    }
    cp_async_commit();
    cluster_arrive_relaxed(); /* waited for before the first store to another block's memory */
    ATT_T(0);
    pdl_wait();
    pdl_trigger(); /* after the wait, as k_attn_decode (it says why) */
    ATT_T(1);
    dec_heads<G, DPL, H16>(sq, snew, q, k, v, qn, kn, cs, sn, t, hk, Hkv, owns, theta, eps);
    cp_async_wait<0>();
    __syncthreads();
    ATT_T(2);
    if (owns && p >= j0 && p < j1) dec_store_new<DPL>(L, snew, p, hk, kvd); /* this block's share holds p */
    /* the scores of this block's keys, a warp two keys at a time (their sums
     * overlap), into every rank's sc */
    cluster_wait(); /* every block has started (the arrive above) */
    const int nk = j1 - j0;
    for (int jj = warp; jj < nk; jj += 2 * DEC_WARPS) {
        float kr[2][DPL], sg[2][G];
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const int ju = min(jj + u * DEC_WARPS, nk - 1), j = j0 + ju; /* (the second may repeat the first) */
            const KT *kp = j == p ? Kc + (size_t)(p % L.cap) * kvd : kb + (size_t)ju * hd; /* p: a KV-shared layer's */
#pragma unroll
            for (int d = 0; d < DPL; d++) kr[u][d] = j == p && owns ? snew[0][lane + 32 * d] : kv_f(kp[lane + 32 * d]);
        }
#pragma unroll
        for (int g = 0; g < G; g++) {
            sg[0][g] = 0, sg[1][g] = 0;
#pragma unroll
            for (int d = 0; d < DPL; d++) {
                const float qv = sq[g][lane + 32 * d];
                sg[0][g] += qv * kr[0][d], sg[1][g] += qv * kr[1][d];
            }
        }
#pragma unroll
        for (int g = 0; g < G; g++) sg[0][g] = warp_sum(sg[0][g]), sg[1][g] = warp_sum(sg[1][g]);
        if (lane < nsp) {
            float *dst = cl.map_shared_rank(sc, lane) + (j0 - lo) + jj;
#pragma unroll
            for (int g = 0; g < G; g++) {
                dst[(size_t)g * scap] = sg[0][g];
                if (jj + DEC_WARPS < nk) dst[(size_t)g * scap + DEC_WARPS] = sg[1][g];
            }
        }
    }
    ATT_T(3);
    cl.sync();
    ATT_T(4);
    /* each head's softmax over the span (warp g), the weights left in sc */
    if (warp < G) {
        float *sg = sc + (size_t)warp * scap, M = -INFINITY, Ls = 0;
        for (int j = lane; j < span; j += 32) M = fmaxf(M, sg[j]);
        M = warp_max(M);
        for (int j = lane; j < span; j += 32) {
            const float e = __expf(sg[j] - M);
            sg[j] = e, Ls += e;
        }
        Ls = warp_sum(Ls);
        if (lane == 0) hinv[warp] = 1.0f / Ls;
    }
    __syncthreads();
    ATT_T(5);
    /* outputs: 4 dims of one head a thread (npair of them), the keys split over ksl threads */
    const int npair = G * nd / 4, ksl = blockDim.x / npair, pr = threadIdx.x % npair, ks = threadIdx.x / npair;
    const int g = pr / (nd / 4), d4 = pr % (nd / 4) * 4;
    const float *wg = sc + (size_t)g * scap;
    float4 a[4];
#pragma unroll
    for (int u = 0; u < 4; u++) a[u] = make_float4(0.f, 0.f, 0.f, 0.f);
    int jj = ks;
    for (; jj + 3 * ksl < span - 1; jj += 4 * ksl) /* four keys at a time, the step's own not among them */
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int ju = jj + u * ksl;
            const float w = wg[ju];
            float x[4];
            ld4f(vb + (size_t)ju * nd + d4, x);
            a[u].x += w * x[0], a[u].y += w * x[1], a[u].z += w * x[2], a[u].w += w * x[3];
        }
    for (; jj < span; jj += ksl) {
        const float w = wg[jj];
        float x[4];
        if (jj == span - 1) { /* the step's own key */
            const KT *vp = Vc + (size_t)(p % L.cap) * kvd + d4;
#pragma unroll
            for (int e = 0; e < 4; e++) x[e] = owns ? snew[1][d0 + d4 + e] : kv_f(vp[e]);
        } else {
            ld4f(vb + (size_t)jj * nd + d4, x);
        }
        a[0].x += w * x[0], a[0].y += w * x[1], a[0].z += w * x[2], a[0].w += w * x[3];
    }
#pragma unroll
    for (int u = 1; u < 4; u++) a[0].x += a[u].x, a[0].y += a[u].y, a[0].z += a[u].z, a[0].w += a[u].w;
    red[threadIdx.x] = a[0];
    __syncthreads();
    ATT_T(6);
    if (ks == 0) {
        float4 r = a[0];
        for (int k2 = 1; k2 < ksl; k2++) {
            const float4 b = red[k2 * npair + pr];
            r.x += b.x, r.y += b.y, r.z += b.z, r.w += b.w;
        }
        const float iv = hinv[g];
        float *o = out + ((size_t)t * H + hk * G + g) * hd + d0 + d4;
        o[0] = r.x * iv, o[1] = r.y * iv, o[2] = r.z * iv, o[3] = r.w * iv;
    }
    ATT_T(7);
    ATT_DONE(1);
#endif
}

/* k_attn_short's dynamic shared memory */
static size_t short_smem(int G, int hd, int nsp, int kcap, int scap, int esz) {
    return (size_t)G * scap * sizeof(float) + (size_t)kcap * hd * esz + (size_t)scap * (hd / nsp) * esz;
}

/* k_attn_short where it applies (at most G3N_ATT_SHORT_MAX keys, at most
 * ATT_SHORT_MAX; each block's dims whole 16-byte copies, its shared memory
 * within the SM's): 1 if launched. Measured (docs/SPEED.md, twenty-fourth and
 * twenty-fifth sessions) at 256 keys a step (tg from an empty context): E2B
 * 4-bit +3.9%, E4B 4-bit +2.1%, 8-bit +2-2.5%, bf16 +0.5%. Past 256 keys it
 * takes 16-block clusters (a non-portable size: the H100 has them), and only
 * where the whole step reaches at most 512 keys after a quantized q/k/v
 * product (`wide`): tg64 after 400 tokens E2B 8-bit +5.6%, E4B 8-bit +3.8%,
 * E4B 4-bit +1.5%, E2B 4-bit +0.6%, but bf16 -2.6% (E4B) and -3.9% (E2B):
 * bf16's q/k/v (k_gemv, 392 blocks, 3 an SM by registers) leaves no free
 * half-GPC for such a cluster until it ends. With the sliding layers at 512
 * keys and the global ones past it (-d 2000) it was 2.6-3.4% slower at 4 bits
 * (and in clusters of 8, slower at 400 and at 2000), so other steps keep
 * k_attn_decode past 256 keys. G3N_ATT_SHORT=0: never; G3N_ATT_SHORT_MAX=k:
 * up to k keys in any step; G3N_ATT_SHORT_NSP=n: clusters of n (0: of
 * k_attn_decode's size). All three read on each call (the tests switch them). */
template <int G, int DPL, typename KT>
static int short_launch(cuda_ctx *c, unsigned nsp, int cap, float *out, const float *q, const float *k, const float *v,
                        const float *qn, const float *kn, int owns, int layer, int Hkv, float theta, float eps,
                        int window) {
    const char *e = getenv("G3N_ATT_SHORT"), *em = getenv("G3N_ATT_SHORT_MAX"), *en = getenv("G3N_ATT_SHORT_NSP");
    const int wide = c->reach > 0 && c->reach <= ATT_SHORT_MAX && c->qkv_bits > 0;
    const int smax = em ? atoi(em) : wide ? ATT_SHORT_MAX : 256, snsp = en ? atoi(en) : cap > 256 ? 16 : 0;
    if ((e && !atoi(e)) || cap > smax || cap > ATT_SHORT_MAX) return 0;
    if (snsp > 0 && snsp <= 16) nsp = (unsigned)snsp; /* 16: a non-portable cluster (H100: up to 16) */
#ifdef ATT_TRACE
    static int reg;
    if (!reg) atexit(att_trace_dump), reg = 1;
#endif
    constexpr int hd = 32 * DPL, esz = sizeof(KT);
    if ((hd / (int)nsp) % (16 / esz) || G * (hd / (int)nsp) / 4 > DEC_WARPS * 32) return 0;
    const int scap = (cap + 7) / 8 * 8, kcap = (cap + (int)nsp - 1) / (int)nsp;
    const size_t smem = short_smem(G, hd, (int)nsp, kcap, scap, esz);
    const size_t lim = c->smem_optin - 12 * 1024; /* past the static arrays (10 KB at G 4, hd 256) */
    if (smem > lim) return 0;
    static int raised;
    if (!raised) {
        CUDA_CHECK(cudaFuncSetAttribute(k_attn_short<G, DPL, KT>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)lim));
        CUDA_CHECK(cudaFuncSetAttribute(k_attn_short<G, DPL, KT>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
        raised = 1;
    }
    if (nsp > 8 && cuda_resident_clusters((const void *)k_attn_short<G, DPL, KT>, nsp, DEC_WARPS * 32, smem) < 1)
        return 0; /* no such cluster on this GPU */
    launch_cluster(c, nsp, k_attn_short<G, DPL, KT>, dim3((unsigned)c->n_tokens * Hkv * nsp), dim3(DEC_WARPS * 32),
                   smem, out, q, k, v, qn, kn, c->d_kv, owns, layer, d_pos(c), d_seq(c), Hkv, theta, eps, window,
                   kcap, scap);
    return 1;
}

template <int G, typename KT>
static int attn_decode_launch(cuda_ctx *c, int dpl, unsigned nsp, int nsg, int keep, int nb, int cap, float *out,
                              const float *q, const float *k, const float *v, const float *qn, const float *kn, int owns,
                              int layer, int Hkv, float theta, float eps, int window) {
#define DEC(D)                                                                                                     \
    if (nsg > 1 || keep ||                                                                                         \
        !short_launch<G, D, KT>(c, nsp, cap, out, q, k, v, qn, kn, owns, layer, Hkv, theta, eps, window))          \
    dec_launch<G, D, KT>(c, nsp, nsg, keep, nb, out, q, k, v, qn, kn, owns, layer, Hkv, theta, eps, window)
    switch (dpl) {
    case 1: DEC(1); return 1;
    case 2: DEC(2); return 1;
    case 4: DEC(4); return 1;
    case 8: if (G <= 4) { DEC(8); return 1; } return 0;
    default: return 0;
    }
#undef DEC
}

void cuda_op_qkv_attention(g3n_backend *be, float *out, float *q, float *k, float *v, g3n_vec q_norm, g3n_vec k_norm,
                           int layer, int attn_layer, int n_head, int n_head_kv, int head_dim, float theta, float eps,
                           int window) {
    cuda_ctx *c = CTX(be);
    cuda_pf_release(c);
    const int G = n_head / n_head_kv, dpl = head_dim / 32;
    int done = 0;
    static int off = -1;
    if (off < 0) off = getenv("G3N_ATT_DECODE") && !atoi(getenv("G3N_ATT_DECODE"));
    /* one kernel when the step is a decode step and the layer stores into the
     * cache it reads (or stores nothing: a KV-shared layer) */
    if (!off && c->one_per_seq && c->cluster_ok && head_dim % 32 == 0 && n_head % n_head_kv == 0 && q_norm.data &&
        (layer < 0 || (k_norm.data && layer == attn_layer))) { /* a KV-shared layer has no k_norm */
        /* The keys a step's tokens may see in this layer: up to the context the
         * step reaches (c->reach, part of a recorded decode step's key), the
         * widest cache and the window */
        int cap = 1;
        for (int s = 0; s < c->n_seq; s++) cap = G3N_MAX(cap, c->h_kv[(size_t)s * G3N_KV_MAX_LAYERS + attn_layer].cap);
        if (c->reach > 0) cap = G3N_MIN(cap, c->reach);
        if (window > 0) cap = G3N_MIN(cap, window);
        /* Blocks per (token, KV head): about `kpb` keys each (64), as a cluster of
         * nsp (at most 8, a portable cluster) times nsg clusters, while the
         * step's blocks fit the SMs once (one block an SM: the rings take most of
         * its shared memory) and the partials fit the scratch. An SM streams
         * ~16-23 GB/s, so a long context needs most SMs: at 32k keys (E4B 4-bit)
         * 8 blocks a head gave 226 tok/s, 64 gave 391 (docs/SPEED.md, thirteenth
         * session); 8-32 keys a block were level or slower. G3N_ATT_KPB,
         * G3N_ATT_NSP (most blocks a cluster) and G3N_ATT_NSG (read on each
         * call) set them for tests and timing. */
        const char *kpb_env = getenv("G3N_ATT_KPB"), *nsg_env = getenv("G3N_ATT_NSG"), *nsp_env = getenv("G3N_ATT_NSP");
        const int kpb = kpb_env && atoi(kpb_env) > 0 ? atoi(kpb_env) : 64;
        const unsigned nsp_max = nsp_env && atoi(nsp_env) > 0 ? (unsigned)G3N_MIN(atoi(nsp_env), 8) : 8;
        unsigned nsp = 1;
        while (nsp < nsp_max && (int)nsp * kpb < cap) nsp *= 2;
        const long grp = (long)c->n_tokens * n_head_kv;
        int nsg = 1;
        while (nsg < DEC_NSG && (long)nsg * nsp * kpb < cap && grp * 2 * nsg * nsp <= c->n_sm) nsg *= 2;
        const int keep = nsg_env && atoi(nsg_env) > 0;
        if (keep) nsg = G3N_MIN(atoi(nsg_env), DEC_NSG);
        const size_t pstride = (size_t)G * head_dim + (size_t)2 * G * nsp;
        if ((size_t)grp * nsg * pstride > c->att_part_n || (size_t)grp * nsp > c->att_cnt_n) nsg = 1;
        /* ring slots per warp: as many as its keys at that width, at most
         * DEC_RING, at least the two keys an iteration takes, and enough to hold
         * the warp's partial (G f32 vectors) after the walk */
        static int nb_env = -1;
        if (nb_env < 0) nb_env = getenv("G3N_ATT_RING") ? atoi(getenv("G3N_ATT_RING")) : 0;
        const int f16 = cuda_kv_f16(c, attn_layer);
        int nb = (cap + nsg * (int)nsp * DEC_WARPS - 1) / (nsg * (int)nsp * DEC_WARPS);
        if (nb_env > 0) nb = nb_env;
        nb = G3N_MAX(G3N_MIN(nb, DEC_RING), G3N_MAX(2, f16 ? G : (G + 1) / 2));
        PROF_BEGIN(c);
#define DEC_G(g)                                                                                                 \
    done = f16                                                                                                   \
               ? attn_decode_launch<g, __half>(c, dpl, nsp, nsg, keep, nb, cap, out, q, k, v, q_norm.data, k_norm.data, \
                                               layer >= 0, attn_layer, n_head_kv, theta, eps, window)           \
               : attn_decode_launch<g, float>(c, dpl, nsp, nsg, keep, nb, cap, out, q, k, v, q_norm.data, k_norm.data, \
                                              layer >= 0, attn_layer, n_head_kv, theta, eps, window)
        if (G == 1) DEC_G(1);
        else if (G == 2) DEC_G(2);
        else if (G == 4) DEC_G(4);
#undef DEC_G
        if (done) PROF_END(c, "qkv_attention (decode)", 0);
    }
    if (done) return;
    cuda_op_qkv_post(be, q, k, v, q_norm, k_norm, layer, n_head, n_head_kv, head_dim, theta, eps);
    cuda_op_attention(be, out, q, attn_layer, n_head, n_head_kv, head_dim, window);
}
