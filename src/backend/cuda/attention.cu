/* attention.cu: softmax(q . K^T) V over each token's own KV cache (ring or
 * full), scale 1, optional sliding window, grouped-query heads. One block per
 * (token, query head); each warp walks a share of the keys with an online
 * softmax (running max and sum), then the warps' partial results are merged.
 * Keys per query are read from device memory (positions), so a recorded step
 * replays correctly at any position. Not tiled for long prompts yet. */
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
        const size_t slot = (size_t)(j % L.cap);
        const float *kj = L.k + slot * kvd + (size_t)hk * hd;
        const float *vj = L.v + slot * kvd + (size_t)hk * hd;
        float s = 0;
#pragma unroll
        for (int k = 0; k < ATT_PER_LANE; k++) {
            const int d = lane + 32 * k;
            if (d < hd) s += qr[k] * kj[d];
        }
        s = warp_sum(s);
        const float m2 = fmaxf(m, s);
        const float corr = __expf(m - m2), e = __expf(s - m2);
        l = l * corr + e;
#pragma unroll
        for (int k = 0; k < ATT_PER_LANE; k++) {
            const int d = lane + 32 * k;
            acc[k] = acc[k] * corr + (d < hd ? e * vj[d] : 0.0f);
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

void cuda_op_attention(g3n_backend *be, float *out, const float *q, int layer, int n_head, int n_head_kv,
                       int head_dim, int window) {
    cuda_ctx *c = CTX(be);
    G3N_ASSERT(head_dim <= CUDA_MAX_HEAD_DIM);
    PROF_BEGIN(c);
    launch(c, k_attention, dim3(c->n_tokens * n_head), dim3(ATT_WARPS * 32), 0, out, q, c->d_kv, layer, d_pos(c), d_seq(c),
                                                                        n_head, n_head_kv, head_dim, window);
    CUDA_LAUNCHED();
    PROF_END(c, window > 0 ? "attention (sliding)" : "attention (full)", 0);
}

/* ---- decode: q/k/v norms, RoPE, cache store and attention in one kernel ----------------------
 *
 * For steps where every token is its own sequence's only token (decode of one or
 * several sequences). One cluster of `nsp` blocks per (token, KV head): each block
 * normalises and rotates the G = H/Hkv query heads that share the KV head (and,
 * in a layer that owns its cache, the new key and value), then takes an equal
 * share of the visible keys; its warps walk the keys with an online softmax for
 * all G heads at once, so each key and value is read once. The block's partial
 * results meet in block 0 of the cluster through distributed shared memory and
 * are merged in rank order: the result does not depend on timing. The block
 * whose share holds the new position uses the new key/value from shared memory
 * and writes them to the cache. */
#include <cooperative_groups.h>
namespace cg = cooperative_groups;

#define DEC_WARPS 8

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
 * pairs i, i + hd/2 fall in the same lane, except for hd 32), into dst. */
template <int DPL>
__device__ __forceinline__ void dec_norm_rope(float *dst, const float *src, const float *w, const float (&cs)[DPL],
                                              const float (&sn)[DPL], bool rope, float eps) {
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
    for (int k = 0; k < DPL; k++) dst[lane + 32 * k] = x[k];
}

template <int G, int DPL>
__global__ void __launch_bounds__(DEC_WARPS * 32)
    k_attn_decode(float *out, const float *q, const float *k, const float *v, const float *qn, const float *kn,
                  const g3n_kv_layer *kv, int owns, int layer, const int32_t *pos, const int32_t *seq,
                  int Hkv, float theta, float eps, int window) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
    __trap(); /* clusters: sm_90 and later only (the host never launches it there) */
#else
    constexpr int hd = 32 * DPL;
    __shared__ float sq[G][hd], snew[2][hd];
    __shared__ float wm[DEC_WARPS][G], wl[DEC_WARPS][G], wacc[DEC_WARPS][G][hd];
    __shared__ float bm[G], bl[G], bacc[G][hd]; /* this block's partial, read by rank 0 */
    cg::cluster_group cl = cg::this_cluster();
    const int nsp = (int)cl.num_blocks(), rank = (int)cl.block_rank();
    const int grp = blockIdx.x / nsp, t = grp / Hkv, hk = grp % Hkv;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, H = Hkv * G, kvd = Hkv * hd;
    /* Before the PDL wait, what does not depend on the previous kernel: the
     * position and cache (set before the step), RoPE's cos and sin, and this
     * warp's first key and value when that position was stored by an earlier
     * step (the new one, p, is stored by this step: in this kernel, or for a
     * KV-shared layer by an earlier one) */
    const int p = pos[t];
    const g3n_kv_layer L = kv[(size_t)seq[t] * G3N_KV_MAX_LAYERS + layer];
    float cs[DPL], sn[DPL];
    if (theta > 0) rope_cs<DPL>(cs, sn, (float)p, theta);
    const int lo = window > 0 ? max(0, p - window + 1) : 0, span = p - lo + 1;
    const int share = (span + nsp - 1) / nsp, j0 = lo + rank * share, j1 = min(j0 + share, p + 1);
    float kr[DPL], vr[DPL];
    bool have = j0 + warp < j1 && j0 + warp < p;
    if (have) {
        const size_t o = (size_t)((j0 + warp) % L.cap) * kvd + (size_t)hk * hd;
#pragma unroll
        for (int d = 0; d < DPL; d++) kr[d] = L.k[o + lane + 32 * d], vr[d] = L.v[o + lane + 32 * d];
    }
    KERNEL_BEGIN();
    for (int job = warp; job < G + 2 * owns; job += DEC_WARPS) {
        if (job < G) dec_norm_rope<DPL>(sq[job], q + ((size_t)t * H + hk * G + job) * hd, qn, cs, sn, theta > 0, eps);
        else if (job == G) dec_norm_rope<DPL>(snew[0], k + ((size_t)t * Hkv + hk) * hd, kn, cs, sn, theta > 0, eps);
        else dec_norm_rope<DPL>(snew[1], v + ((size_t)t * Hkv + hk) * hd, NULL, cs, sn, false, eps);
    }
    __syncthreads();
    if (owns && p >= j0 && p < j1) { /* this block's share holds the new position */
        const size_t o = (size_t)(p % L.cap) * kvd + (size_t)hk * hd;
        for (int d = threadIdx.x; d < hd; d += blockDim.x) L.k[o + d] = snew[0][d], L.v[o + d] = snew[1][d];
    }
    float qr[G][DPL], acc[G][DPL], m[G], l[G];
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY, l[g] = 0;
#pragma unroll
        for (int d = 0; d < DPL; d++) qr[g][d] = sq[g][lane + 32 * d], acc[g][d] = 0;
    }
    for (int j = j0 + warp; j < j1; j += DEC_WARPS) {
        if (!have) {
            const size_t o = (size_t)(j % L.cap) * kvd + (size_t)hk * hd;
            const float *kj = owns && j == p ? snew[0] : L.k + o;
            const float *vj = owns && j == p ? snew[1] : L.v + o;
#pragma unroll
            for (int d = 0; d < DPL; d++) kr[d] = kj[lane + 32 * d], vr[d] = vj[lane + 32 * d];
        }
        have = false;
        float s[G];
#pragma unroll
        for (int g = 0; g < G; g++) {
            s[g] = 0;
#pragma unroll
            for (int d = 0; d < DPL; d++) s[g] += qr[g][d] * kr[d];
            s[g] = warp_sum(s[g]);
            const float m2 = fmaxf(m[g], s[g]), corr = __expf(m[g] - m2), e = __expf(s[g] - m2);
            l[g] = l[g] * corr + e;
#pragma unroll
            for (int d = 0; d < DPL; d++) acc[g][d] = acc[g][d] * corr + e * vr[d];
            m[g] = m2;
        }
    }
#pragma unroll
    for (int g = 0; g < G; g++) {
        if (lane == 0) wm[warp][g] = m[g], wl[warp][g] = l[g];
#pragma unroll
        for (int d = 0; d < DPL; d++) wacc[warp][g][lane + 32 * d] = acc[g][d];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * hd; i += blockDim.x) { /* merge the warps, in order */
        const int g = i / hd, d = i % hd;
        float M = -INFINITY, Ls = 0, As = 0;
        for (int w = 0; w < DEC_WARPS; w++)
            if (wl[w][g] > 0) M = fmaxf(M, wm[w][g]);
        for (int w = 0; w < DEC_WARPS; w++)
            if (wl[w][g] > 0) {
                const float e = __expf(wm[w][g] - M);
                Ls += wl[w][g] * e;
                As += wacc[w][g][d] * e;
            }
        bacc[g][d] = As;
        if (d == 0) bm[g] = M, bl[g] = Ls;
    }
    cl.sync();
    if (rank == 0)
        for (int i = threadIdx.x; i < G * hd; i += blockDim.x) { /* merge the blocks, in rank order */
            const int g = i / hd, d = i % hd;
            float M = -INFINITY, Ls = 0, As = 0;
            for (int r = 0; r < nsp; r++) {
                const float lr = *cl.map_shared_rank(&bl[g], r);
                if (lr > 0) M = fmaxf(M, *cl.map_shared_rank(&bm[g], r));
            }
            for (int r = 0; r < nsp; r++) {
                const float lr = *cl.map_shared_rank(&bl[g], r);
                if (lr > 0) {
                    const float e = __expf(*cl.map_shared_rank(&bm[g], r) - M);
                    Ls += lr * e;
                    As += *cl.map_shared_rank(&bacc[g][d], r) * e;
                }
            }
            out[((size_t)t * H + hk * G + g) * hd + d] = As / Ls;
        }
    cl.sync(); /* keep every block's shared memory alive until rank 0 has read it */
#endif
}

template <int G>
static int attn_decode_launch(cuda_ctx *c, int dpl, unsigned nsp, float *out, const float *q, const float *k,
                              const float *v, const float *qn, const float *kn, int owns, int layer, int Hkv,
                              float theta, float eps, int window) {
    const dim3 grid((unsigned)c->n_tokens * Hkv * nsp), block(DEC_WARPS * 32);
#define DEC(D) launch_cluster(c, nsp, k_attn_decode<G, D>, grid, block, 0, out, q, k, v, qn, kn, c->d_kv, owns, \
                              layer, d_pos(c), d_seq(c), Hkv, theta, eps, window)
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
    const int G = n_head / n_head_kv, dpl = head_dim / 32;
    int done = 0;
    static int off = -1;
    if (off < 0) off = getenv("G3N_ATT_DECODE") && !atoi(getenv("G3N_ATT_DECODE"));
    /* one kernel when the step is a decode step and the layer stores into the
     * cache it reads (or stores nothing: a KV-shared layer) */
    if (!off && c->one_per_seq && c->cluster_ok && head_dim % 32 == 0 && n_head % n_head_kv == 0 && q_norm.data &&
        (layer < 0 || (k_norm.data && layer == attn_layer))) { /* a KV-shared layer has no k_norm */
        /* blocks per (token, KV head): about 64 keys each for the widest cache any
         * sequence of the step has in this layer, at most 8 (a portable cluster) */
        int cap = 1;
        for (int s = 0; s < c->n_seq; s++) cap = G3N_MAX(cap, c->h_kv[(size_t)s * G3N_KV_MAX_LAYERS + attn_layer].cap);
        if (window > 0) cap = G3N_MIN(cap, window);
        unsigned nsp = 1;
        while (nsp < 8 && (int)nsp * 64 < cap) nsp *= 2;
        PROF_BEGIN(c);
#define DEC_G(g) done = attn_decode_launch<g>(c, dpl, nsp, out, q, k, v, q_norm.data, k_norm.data, layer >= 0, \
                                            attn_layer, n_head_kv, theta, eps, window)
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
