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
