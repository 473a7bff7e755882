/* mega.cu: the decoder layers of a one-token decode step as one kernel
 * (backend.h: decode_layers; the "mega" decode path, experimental: on the H100
 * it is still slower than the fused path, see docs/SPEED.md).
 *
 * Batch-1 decode reads every weight once. What keeps the per-op paths from the
 * bandwidth is everything between the matrix products: about 10 kernels per
 * layer, each a launch, a ramp-up and a drain, and single-block row kernels
 * (predict, residual, correct) that nothing overlaps. Here one cooperative
 * kernel, one block per SM, runs every layer:
 *
 *  - Every block holds the token's four AltUp planes in registers and computes
 *    each row-wise step itself (predict, the attention/LAuReL residual, the MLP
 *    activation, correct): the same inputs, the same order, so every block holds
 *    the same values, and only the products' outputs pass through global memory.
 *  - Each product's output rows are dealt round-robin to all warps of the grid.
 *    A warp streams its rows' weights through its own ring of shared-memory
 *    slots (cp.async, MG_TILE bytes a slot), and the ring runs ahead across
 *    phases: while the block waits at a grid barrier or computes a row step, the
 *    next phase's weights are already on their way.
 *  - Phases meet at grid barriers, seven per layer: q/LAuReL-left/k/v,
 *    attention (keys split over blocks; the last block of a KV head merges the
 *    splits, in split order), o/LAuReL-right, gate/up, down, per-layer gate,
 *    per-layer projection.
 *
 * Data written inside the kernel is read with ld.global.cg (from L2): an SM's L1
 * is not coherent with the others. Every sum has a fixed order, so results do
 * not depend on timing. The maths is decoder_layer_fused's (forward.c), op for
 * op; tests/test_model.c runs the fixtures through it.
 *
 * What the measurements taught (G3N_MEGA_TRACE=1 prints where a step's time
 * went; G3N_MEGA_FLAGS=1 leaves the weight loads out, 2 the row steps, for
 * timing only): the code must fit the instruction cache (each layer runs all of
 * it once: one loop body, no unrolled copies of big functions), registers must
 * not spill (L1 is nearly all shared memory here, so spills go to L2), every
 * row step should reach memory once, and the item loop costs about 400
 * instructions per 4 KB (the dot product 160, the stream's bookkeeping the
 * rest): next, contiguous row ranges per warp and rows sharing activation loads
 * (tensor cores). */
#include "cuda_common.cuh"

#define MG_NW 8                /* warps per block: 256 threads, up to 255 registers each (measured
                                  faster than 16 warps: 197 vs 186 tok/s, E4B on the H100) */
#define MG_NT (MG_NW * 32)
#define MG_EPT_WIDE (2048 / MG_NT) /* elements per thread of the instantiation for widths up to 2048 */
#define MG_SLOTS 3             /* ring slots per warp */
#define MG_TILE 4096           /* bytes per slot: a row, or a 4 KB segment of one */
#define MG_MAX_LAYERS 40
#define MG_PHASES 6            /* products per layer */
#define MG_KPS 16              /* keys per attention split (fewer splits for short contexts) */

typedef struct {
    const void *R;             /* AltUp router [4, D], in the products' dtype */
    const float *rnorm, *pcoef, *ccoef, *innorm, *qn, *kn, *w_att, *w_lau, *w_pre, *w_post, *oscale, *w_ple;
    const float *ple_in;       /* this layer's per-layer input [P] */
    int owns, kv_layer, window, I, topk;
    float theta, kappa;
} mg_layer;

/* The products of each phase (up to 4; gate and up are one phase, read row by
 * row in pairs): weights, row width, and the unit where the product ends.
 * Unused entries repeat the last product with end = the phase's units. */
typedef struct {
    const char *W;
    int K, end;
} mg_pd;

typedef struct {
    mg_layer L[MG_MAX_LAYERS];
    mg_pd tab[MG_MAX_LAYERS * MG_PHASES][4];
    int n_layer, D, H, Hkv, hd, P, R;
    int lr_off;                /* where LAuReL's inner vector sits in the activation buffer (phase 1) */
    float eps, rs;
    float *S;                  /* [4][D] planes in and out */
    float *q, *k, *v, *lt, *att, *o, *lau, *g, *up, *mlp, *pg, *ple_out; /* product outputs */
    float *part;               /* attention splits: [unit][G][hd + 2] */
    unsigned *sync;            /* zero at launch: [0] grid barrier; [1 + l * Hkv + h] attention splits done */
    const g3n_kv_layer *kv;
    const int32_t *pos, *seq;
    unsigned long long *trace; /* G3N_MEGA_TRACE: barrier arrival and exit times, else NULL */
    int flags;                 /* G3N_MEGA_FLAGS (timing only, wrong results): 1 no weight loads, 2 no row steps */
    float *ytab[MG_PHASES][4]; /* each phase's products' outputs */
    int act_n;                 /* floats of the activation buffer */
} mg_args;

/* ---- the weight stream: which rows a warp reads, in order -------------------------------- */

typedef struct {
    const char *W;
    float *y;
    int K, row, xoff;
} mg_prod;

/* The stream's bookkeeping runs for every item: it reads the product table
 * (made on the host, in shared memory with the other parameters). */
__device__ __forceinline__ int mg_units(const mg_args &a, int ph) { return a.tab[ph][3].end; }

__device__ __forceinline__ mg_prod mg_get(const mg_args &a, int ph, int u, int r) {
    const mg_pd *t = a.tab[ph];
    const int kind = ph % MG_PHASES;
    const int pi = kind == 2 ? r : (u >= t[0].end) + (u >= t[1].end) + (u >= t[2].end);
    mg_prod p;
    p.W = t[pi].W, p.K = t[pi].K;
    p.row = kind == 2 || pi == 0 ? u : u - t[pi - 1].end;
    p.y = a.ytab[kind][pi];
    p.xoff = kind == 1 && pi == 1 ? a.lr_off : 0;
    return p;
}

/* Units are dealt round-robin: warp gw of nwg takes units gw, gw + nwg, ... of
 * every phase. (Claiming them from per-phase atomic counters balanced the
 * phases better but cost more than it won, measured; see docs/SPEED.md.)
 * A warp's stream position (the issue side): phase, unit, row of the unit,
 * segment of the row. */
typedef struct {
    int ph, u, r, s;
} mg_it;

/* move to this warp's first unit at or after (it.ph, it.u) (the end: ph = n_layer * MG_PHASES) */
__device__ __forceinline__ void mg_seek(const mg_args &a, mg_it &it, int gw) {
    const int nph = a.n_layer * MG_PHASES;
    it.r = 0, it.s = 0;
    while (it.ph < nph && it.u >= mg_units(a, it.ph)) it.ph++, it.u = gw;
}

template <typename T> __device__ __forceinline__ int mg_nseg(int K) {
    return (int)(((size_t)K * sizeof(T) + MG_TILE - 1) / MG_TILE);
}

template <typename T> __device__ __forceinline__ void mg_next(const mg_args &a, mg_it &it, int gw, int nwg) {
    if (it.ph >= a.n_layer * MG_PHASES) return; /* past the end: stays there */
    if (++it.s < mg_nseg<T>(mg_get(a, it.ph, it.u, it.r).K)) return;
    it.s = 0;
    if (++it.r < (it.ph % MG_PHASES == 2 ? 2 : 1)) return;
    it.u += nwg;
    mg_seek(a, it, gw);
}

/* start the copy of item `it` into a slot (one commit group, empty past the
 * end) and note what it is in the warp's queue entry for the consumer */
template <typename T>
__device__ __forceinline__ void mg_issue(const mg_args &a, const mg_it &it, char *slot, int4 *entry, int lane) {
    if (it.ph < a.n_layer * MG_PHASES && !(a.flags & 1)) {
        const mg_prod p = mg_get(a, it.ph, it.u, it.r);
        const size_t rb = (size_t)p.K * sizeof(T), off = (size_t)it.s * MG_TILE;
        const char *src = p.W + (size_t)p.row * rb + off;
        const int bytes = (int)min((size_t)MG_TILE, rb - off);
#pragma unroll
        for (int i = 0; i < MG_TILE / 16 / 32; i++)
            if ((lane + 32 * i) * 16 < bytes) cp_async16(slot + (lane + 32 * i) * 16, src + (lane + 32 * i) * 16);
    }
    cp_async_commit();
    if (lane == 0) *entry = make_int4(it.ph, it.u, it.r, it.s);
}

/* Where element k of the products' input vector sits in the activation buffer.
 * For 16-bit weights a lane multiplies 8 weights by 8 consecutive activations:
 * stored plainly, a warp's 32-byte reads conflict two ways in shared memory, so
 * elements 0-3 of each group of 8 go to the first half of the buffer and 4-7 to
 * the second (a.act_n / 2 floats on), and each read is 16 contiguous bytes.
 * f32 weights take 4 at a time: plain. */
template <typename T> __device__ __forceinline__ int mg_px(const mg_args &a, int k) {
    if (sizeof(T) == 4) return k;
    return (k >> 3) * 4 + (k & 3) + ((k & 4) ? a.act_n / 2 : 0);
}

/* 16 bytes of weights from shared memory as floats, times the same count of activations */
template <typename T> __device__ __forceinline__ float mg_dot16(const T *, const char *w, const float *x, int half) {
    raw8<T> r;
    r.u = *(const uint4 *)w;
    float f[8];
    cvt8(r, f);
    const float4 a = *(const float4 *)x, b = *(const float4 *)(x + half);
    return f[0] * a.x + f[1] * a.y + f[2] * a.z + f[3] * a.w + f[4] * b.x + f[5] * b.y + f[6] * b.z + f[7] * b.w;
}
__device__ __forceinline__ float mg_dot16(const float *, const char *w, const float *x, int) {
    const float4 f = *(const float4 *)w, a = *(const float4 *)x;
    return f.x * a.x + f.y * a.y + f.z * a.z + f.w * a.w;
}

/* This warp's items of phase ph: y = W . act, with the phase's epilogue. The
 * slot just consumed takes the stream's next item, whatever phase that is. */
template <typename T>
__device__ __forceinline__ void mg_phase(const mg_args &a, int ph, mg_it &iss, int &slot, char *ring, int4 *queue,
                                         const float *act, int gw, int nwg) {
    constexpr int EPC = 16 / sizeof(T), SEG = MG_TILE / sizeof(T);
    const int lane = threadIdx.x & 31;
    const mg_layer &L = a.L[ph / MG_PHASES];
    float acc = 0, first = 0;
    for (;;) {
        __syncwarp();
        const int4 e = queue[slot]; /* (phase, unit, row of unit, segment) */
        if (e.x != ph) break;       /* the next item is a later phase's: its data may still be on the way */
        cp_async_wait<MG_SLOTS - 1>();
        __syncwarp();
        const mg_prod p = mg_get(a, ph, e.y, e.z);
        const char *w = ring + slot * MG_TILE;
        const int k0 = e.w * SEG, n = min(SEG, p.K - k0) / EPC;
        const float *x = act + mg_px<T>(a, p.xoff + k0); /* 8 elements: x + 4c and x + 4c + act_n / 2 */
#pragma unroll
        for (int i = 0; i < MG_TILE / 16 / 32; i++) /* all of a slot's loads at once */
            if (lane + 32 * i < n) acc += mg_dot16((const T *)0, w + (lane + 32 * i) * 16, x + (lane + 32 * i) * 4, a.act_n / 2);
        __syncwarp();
        mg_issue<T>(a, iss, ring + slot * MG_TILE, queue + slot, lane);
        mg_next<T>(a, iss, gw, nwg);
        slot = slot + 1 == MG_SLOTS ? 0 : slot + 1;
        if (e.w != mg_nseg<T>(p.K) - 1) continue;
        const float v = warp_sum(acc);
        acc = 0;
        if (ph % MG_PHASES == 2) { /* gate, then up, of the same row */
            if (e.z == 0) first = v;
            else if (lane == 0) {
                if (L.topk) __stcg(a.g + e.y, first), __stcg(a.up + e.y, v);
                else __stcg(a.g + e.y, gelu_tanh_d(first) * v);
            }
        } else if (lane == 0) {
            __stcg(p.y + p.row, ph % MG_PHASES == 4 ? gelu_tanh_d(v) * __ldg(L.ple_in + p.row) : v);
        }
    }
}

/* ---- grid barrier ------------------------------------------------------------------------- */

__device__ __forceinline__ unsigned long long mg_clock() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
    return t;
}

/* trace: [block][barrier] arrival times, then [barrier] block 0's exit times */
__device__ __forceinline__ void mg_grid_sync(unsigned *bar, unsigned &target, unsigned long long *trace, int nbar) {
    const int k = (int)(target / gridDim.x);
    target += gridDim.x;
    __syncthreads();
    if (threadIdx.x == 0) {
        if (trace) trace[(size_t)blockIdx.x * nbar + k] = mg_clock();
        __threadfence();
        atomicAdd(bar, 1u);
        unsigned v;
        do {
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(bar) : "memory");
        } while (v < target);
        if (trace && blockIdx.x == 0) trace[(size_t)gridDim.x * nbar + k] = mg_clock();
    }
    __syncthreads();
}

/* ---- row steps: every block, on its registers (element tid + MG_NT * j) ------------------- */

#define MG_FOR(j, d) \
    _Pragma("unroll") for (int j = 0, d = threadIdx.x; j < EPT; j++, d += MG_NT)

/* Each row step loads everything it reads (its inputs and its constants) at
 * its start: one round trip to memory per step, not one per use. */

__device__ __forceinline__ float mg_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float mg_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float mg_f(float v) { return v; }

/* the router's weights at this thread's elements (stored in the products' dtype) */
template <typename T, int EPT>
__device__ __forceinline__ void mg_router_w(float (&R)[4][EPT], const mg_layer &L, int D) {
    const T *w = (const T *)L.R;
    MG_FOR(j, d) {
#pragma unroll
        for (int k = 0; k < 4; k++) R[k][j] = d < D ? mg_f(w[(size_t)k * D + d]) : 0.0f;
    }
}

/* m[k] = tanh(R[k] . (v * scale * rnorm / D)) over the block */
template <int EPT>
__device__ __forceinline__ void mg_router(float m[4], const float (&R)[4][EPT], const float (&rn)[EPT],
                                          const float (&v)[EPT], float scale, int D, float *red) {
#pragma unroll
    for (int k = 0; k < 4; k++) m[k] = 0;
    MG_FOR(j, d) {
        const float t = v[j] * scale * rn[j] * (1.0f / (float)D);
#pragma unroll
        for (int k = 0; k < 4; k++) m[k] += R[k][j] * t;
    }
    block_sum_n<4>(m, red);
#pragma unroll
    for (int k = 0; k < 4; k++) m[k] = tanhf(m[k]);
}

/* planes 1..3 += rmsnorm(ple_out, w) (the last layer's per-layer input) */
template <int EPT>
__device__ __forceinline__ void mg_ple_add(const mg_args &a, const float *w, float (&P)[4][EPT], float *red) {
    float pv[EPT], wv[EPT], ss = 0;
    MG_FOR(j, d) {
        pv[j] = d < a.D ? __ldcg(a.ple_out + d) : 0.0f;
        wv[j] = d < a.D ? w[d] : 0.0f;
        ss += pv[j] * pv[j];
    }
    const float ip = rsqrtf(block_sum(ss, red) / (float)a.D + a.eps);
    MG_FOR(j, d) {
#pragma unroll
        for (int i = 1; i < 4; i++) P[i][j] += pv[j] * ip * wv[j];
    }
}

/* The previous layer's per-layer input into planes 1..3, AltUp predict, and the
 * input norm: P = predict(P), X = rmsnorm(P[0]) -> act. coef: 64 floats of
 * shared memory. */
template <typename T, int EPT>
__device__ __forceinline__ void mg_predict(const mg_args &a, int l, float (&P)[4][EPT], float (&X)[EPT], float *act,
                                           float *coef, float *red) {
    const mg_layer &L = a.L[l];
    const int D = a.D;
    const float *wple = l > 0 ? a.L[l - 1].w_ple : NULL;
    if (threadIdx.x < 64) coef[threadIdx.x] = __ldg(L.pcoef + threadIdx.x);
    float pv[EPT], wp[EPT], rn[EPT], inn[EPT], R[4][EPT], sums[2] = {0, 0};
    MG_FOR(j, d) {
        const int ok = d < D;
        pv[j] = ok && wple ? __ldcg(a.ple_out + d) : 0.0f;
        wp[j] = ok && wple ? wple[d] : 0.0f;
        rn[j] = ok ? L.rnorm[d] : 0.0f;
        inn[j] = ok ? L.innorm[d] : 0.0f;
    }
    mg_router_w<T, EPT>(R, L, D);
    MG_FOR(j, d) sums[0] += P[0][j] * P[0][j], sums[1] += pv[j] * pv[j];
    block_sum_n<2>(sums, red);
    if (wple) {
        const float ip = rsqrtf(sums[1] / (float)D + a.eps);
        MG_FOR(j, d) {
#pragma unroll
            for (int i = 1; i < 4; i++) P[i][j] += pv[j] * ip * wp[j];
        }
    }
    float m[4];
    mg_router<EPT>(m, R, rn, P[0], rsqrtf(sums[0] / (float)D + a.eps), D, red);
    float C[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float c = 0;
#pragma unroll
            for (int k = 0; k < 4; k++) c += coef[(i * 4 + j) * 4 + k] * m[k];
            C[i][j] = c;
        }
    float ss0 = 0;
    MG_FOR(j, d) {
        float nv[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float acc = P[i][j];
#pragma unroll
            for (int k = 0; k < 4; k++) acc += C[i][k] * P[k][j];
            nv[i] = acc;
        }
#pragma unroll
        for (int i = 0; i < 4; i++) P[i][j] = nv[i];
        ss0 += nv[0] * nv[0];
    }
    const float inv0 = rsqrtf(block_sum(ss0, red) / (float)D + a.eps);
    MG_FOR(j, d) {
        X[j] = P[0][j] * inv0 * inn[j];
        if (d < D) act[mg_px<T>(a, d)] = X[j];
    }
    __syncthreads();
}

/* s = (a + rmsnorm(o) + rmsnorm(lau) + x) * rs -> Sr;  u = rmsnorm(s, pre_ff) -> act */
template <typename T, int EPT>
__device__ __forceinline__ void mg_residual(const mg_args &a, const mg_layer &L, const float (&P)[4][EPT],
                                            const float (&X)[EPT], float (&Sr)[EPT], float *act, float *red) {
    const int D = a.D;
    float at[EPT], la[EPT], wa[EPT], wl[EPT], wf[EPT], sums[2] = {0, 0};
    MG_FOR(j, d) {
        const int ok = d < D;
        at[j] = ok ? __ldcg(a.o + d) : 0.0f;
        la[j] = ok ? __ldcg(a.lau + d) : 0.0f;
        wa[j] = ok ? L.w_att[d] : 0.0f;
        wl[j] = ok ? L.w_lau[d] : 0.0f;
        wf[j] = ok ? L.w_pre[d] : 0.0f;
    }
    MG_FOR(j, d) sums[0] += at[j] * at[j], sums[1] += la[j] * la[j];
    block_sum_n<2>(sums, red);
    const float i1 = rsqrtf(sums[0] / (float)D + a.eps), i2 = rsqrtf(sums[1] / (float)D + a.eps);
    float ss = 0;
    MG_FOR(j, d) {
        Sr[j] = d < D ? (P[0][j] + at[j] * i1 * wa[j] + (la[j] * i2 * wl[j] + X[j])) * a.rs : 0.0f;
        ss += Sr[j] * Sr[j];
    }
    const float i3 = rsqrtf(block_sum(ss, red) / (float)D + a.eps);
    MG_FOR(j, d) if (d < D) act[mg_px<T>(a, d)] = Sr[j] * i3 * wf[j];
    __syncthreads();
}

/* Elements [k0, k0 + n) of the products' input = src (global, written in this
 * kernel), 16 bytes a load, four in flight per thread; k0 a multiple of 8. No
 * barrier. */
template <typename T>
__device__ __forceinline__ void mg_fill(const mg_args &a, float *act, int k0, const float *src, int n) {
    const int n4 = n / 4;
    for (int i0 = threadIdx.x; i0 < n4; i0 += 4 * MG_NT) {
        float4 v[4];
#pragma unroll
        for (int k = 0; k < 4; k++)
            if (i0 + k * MG_NT < n4) v[k] = __ldcg((const float4 *)src + i0 + k * MG_NT);
#pragma unroll
        for (int k = 0; k < 4; k++)
            if (i0 + k * MG_NT < n4) *(float4 *)(act + mg_px<T>(a, k0 + 4 * (i0 + k * MG_NT))) = v[k];
    }
    for (int i = 4 * n4 + threadIdx.x; i < n; i += MG_NT) act[mg_px<T>(a, k0 + i)] = __ldcg(src + i);
}

/* the down product's input -> act: gelu(gate) * up (made by the gate/up phase),
 * or with Gaussian top-k on the whole gate row first */
template <typename T>
__device__ __forceinline__ void mg_mlp_act(const mg_args &a, const mg_layer &L, float *act, float *red) {
    const int I = L.I;
    mg_fill<T>(a, act, 0, a.g, I);
    __syncthreads();
    if (!L.topk) return;
    float sm = 0;
    for (int i = threadIdx.x; i < I; i += MG_NT) sm += act[mg_px<T>(a, i)];
    const float mean = block_sum(sm, red) / (float)I;
    float vv = 0;
    for (int i = threadIdx.x; i < I; i += MG_NT) vv += (act[mg_px<T>(a, i)] - mean) * (act[mg_px<T>(a, i)] - mean);
    const float cut = mean + sqrtf(block_sum(vv, red) / (float)I) * L.kappa;
#pragma unroll 8
    for (int i = threadIdx.x; i < I; i += MG_NT) {
        float *v = act + mg_px<T>(a, i);
        const float z = *v > cut ? *v - cut : 0.0f;
        *v = gelu_tanh_d(z) * __ldcg(a.up + i);
    }
    __syncthreads();
}

/* o = s + rmsnorm(mlp, post_ff); AltUp correct of P by o; P[0] * out_scale -> act.
 * coef: 16 floats of shared memory. */
template <typename T, int EPT>
__device__ __forceinline__ void mg_correct(const mg_args &a, const mg_layer &L, float (&P)[4][EPT],
                                           const float (&Sr)[EPT], float *act, float *coef, float *red) {
    const int D = a.D;
    if (threadIdx.x < 16) coef[threadIdx.x] = __ldg(L.ccoef + threadIdx.x);
    float ov[EPT], wf[EPT], rn[EPT], os[EPT], R[4][EPT], ss = 0;
    MG_FOR(j, d) {
        const int ok = d < D;
        ov[j] = ok ? __ldcg(a.mlp + d) : 0.0f;
        wf[j] = ok ? L.w_post[d] : 0.0f;
        rn[j] = ok ? L.rnorm[d] : 0.0f;
        os[j] = ok && L.oscale ? L.oscale[d] : 1.0f;
    }
    mg_router_w<T, EPT>(R, L, D);
    MG_FOR(j, d) ss += ov[j] * ov[j];
    const float i1 = rsqrtf(block_sum(ss, red) / (float)D + a.eps);
    float ss2 = 0;
    MG_FOR(j, d) {
        ov[j] = d < D ? Sr[j] + ov[j] * i1 * wf[j] : 0.0f;
        ss2 += ov[j] * ov[j];
    }
    float m[4];
    mg_router<EPT>(m, R, rn, ov, rsqrtf(block_sum(ss2, red) / (float)D + a.eps), D, red);
    float k[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float c = 0;
#pragma unroll
        for (int j = 0; j < 4; j++) c += coef[i * 4 + j] * m[j];
        k[i] = 1.0f + c;
    }
    MG_FOR(j, d) if (d < D) {
        const float dx = ov[j] - P[0][j];
#pragma unroll
        for (int i = 0; i < 4; i++) P[i][j] += k[i] * dx;
        act[mg_px<T>(a, d)] = P[0][j] * os[j];
    }
    __syncthreads();
}

/* Per-head RMS norm (w may be NULL) and RoPE (theta 0: none) of one hd-vector
 * by one warp into shared memory: attention.cu's dec_norm_rope, written compactly (one
 * copy, loops not unrolled) for the instruction cache. src was written in
 * this kernel: read from L2. */
__device__ __forceinline__ void mg_norm_rope(float *dst, const float *src, const float *w, float p, float theta,
                                          float eps, int hd) {
    const int lane = threadIdx.x & 31, half = hd / 2;
    float ss = 0;
    for (int i = lane; i < hd; i += 32) {
        const float x = __ldcg(src + i);
        dst[i] = x;
        ss += x * x;
    }
    const float inv = rsqrtf(warp_sum(ss) / (float)hd + eps);
    __syncwarp();
    for (int i = lane; i < half; i += 32) {
        float x0 = dst[i] * inv, x1 = dst[i + half] * inv;
        if (w) x0 *= w[i], x1 *= w[i + half];
        if (theta > 0) {
            const float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)hd);
            float sn, cs;
            sincosf(inv_freq * p, &sn, &cs);
            const float a0 = x0 * cs - x1 * sn;
            x1 = x1 * cs + x0 * sn;
            x0 = a0;
        }
        dst[i] = x0;
        dst[i + half] = x1;
    }
    __syncwarp();
}

/* ---- attention: unit (KV head, split of the keys) per block ------------------------------- */

template <int G, int DPL>
__device__ __forceinline__ void mg_attention(const mg_args &a, int l, float *scr, float (*sq)[32 * DPL],
                                             float (*snew)[32 * DPL], int *flag) {
    constexpr int hd = 32 * DPL;
    const mg_layer &L = a.L[l];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, Hkv = a.Hkv, kvd = Hkv * hd;
    const int p = a.pos[0];
    const int lo = L.window > 0 ? max(0, p - L.window + 1) : 0, span = p - lo + 1;
    const int nsp = max(1, min((span + MG_KPS - 1) / MG_KPS, (int)gridDim.x / Hkv));
    const int unit = blockIdx.x;
    if (unit >= Hkv * nsp) return;
    const int hk = unit / nsp, sp = unit % nsp;
    const g3n_kv_layer C = a.kv[(size_t)a.seq[0] * G3N_KV_MAX_LAYERS + L.kv_layer]; /* f32 only: forward.c mega_ok */
    for (int job = warp; job < G + 2 * L.owns; job += MG_NW) {
        const int isq = job < G, isk = job == G;
        mg_norm_rope(isq ? sq[job] : snew[isk ? 0 : 1],
                     isq ? a.q + (size_t)(hk * G + job) * hd : (isk ? a.k : a.v) + (size_t)hk * hd,
                     isq ? L.qn : isk ? L.kn : NULL, (float)p, isq || isk ? L.theta : 0.0f, a.eps, hd);
    }
    __syncthreads();
    const int share = (span + nsp - 1) / nsp, j0 = lo + sp * share, j1 = min(j0 + share, p + 1);
    if (L.owns && p >= j0 && p < j1) { /* this split holds the new position: store it */
        const size_t o = (size_t)(p % C.cap) * kvd + (size_t)hk * hd;
        for (int d = threadIdx.x; d < hd; d += MG_NT) __stcg((float *)C.k + o + d, snew[0][d]), __stcg((float *)C.v + o + d, snew[1][d]);
    }
    /* warp w: keys j0 + w, + MG_NW, ..., two loaded at once, for all G query
     * heads of this KV head (each KV row read once) */
    float acc[G][DPL], m[G], lsum[G];
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY, lsum[g] = 0;
#pragma unroll
        for (int d = 0; d < DPL; d++) acc[g][d] = 0;
    }
    for (int jb = j0 + warp; jb < j1; jb += 2 * MG_NW) {
        float kr[2][DPL], vr[2][DPL];
#pragma unroll
        for (int t = 0; t < 2; t++) {
            const int j = jb + t * MG_NW, fresh = L.owns && j == p;
            const size_t o = (size_t)(j % C.cap) * kvd + (size_t)hk * hd;
#pragma unroll
            for (int d = 0; d < DPL; d++) {
                kr[t][d] = j >= j1 ? 0.0f : fresh ? snew[0][lane + 32 * d] : __ldcg((const float *)C.k + o + lane + 32 * d);
                vr[t][d] = j >= j1 ? 0.0f : fresh ? snew[1][lane + 32 * d] : __ldcg((const float *)C.v + o + lane + 32 * d);
            }
        }
#pragma unroll
        for (int t = 0; t < 2; t++) {
            if (jb + t * MG_NW >= j1) break;
#pragma unroll
            for (int g = 0; g < G; g++) {
                float sc = 0;
#pragma unroll
                for (int d = 0; d < DPL; d++) sc += sq[g][lane + 32 * d] * kr[t][d];
                sc = warp_sum(sc);
                const float m2 = fmaxf(m[g], sc), corr = __expf(m[g] - m2), e = __expf(sc - m2);
                lsum[g] = lsum[g] * corr + e;
#pragma unroll
                for (int d = 0; d < DPL; d++) acc[g][d] = acc[g][d] * corr + e * vr[t][d];
                m[g] = m2;
            }
        }
    }
    /* the warps' partials: scr[w][g][hd] values, then [w][g] maxima and sums */
    float *wacc = scr, *wm = scr + MG_NW * G * hd, *wl = wm + MG_NW * G;
#pragma unroll
    for (int g = 0; g < G; g++) {
        if (lane == 0) wm[warp * G + g] = m[g], wl[warp * G + g] = lsum[g];
#pragma unroll
        for (int d = 0; d < DPL; d++) wacc[(warp * G + g) * hd + lane + 32 * d] = acc[g][d];
    }
    __syncthreads();
    float *mine = a.part + (size_t)unit * G * (hd + 2);
    for (int i = threadIdx.x; i < G * hd; i += MG_NT) { /* merge the warps, in order */
        const int g = i / hd, d = i % hd;
        float M = -INFINITY, Ls = 0, As = 0;
        for (int w = 0; w < MG_NW; w++)
            if (wl[w * G + g] > 0) M = fmaxf(M, wm[w * G + g]);
        for (int w = 0; w < MG_NW; w++)
            if (wl[w * G + g] > 0) {
                const float e = __expf(wm[w * G + g] - M);
                Ls += wl[w * G + g] * e;
                As += wacc[(w * G + g) * hd + d] * e;
            }
        if (nsp == 1) {
            __stcg(a.att + (size_t)(hk * G + g) * hd + d, As / Ls);
        } else {
            __stcg(mine + g * (hd + 2) + d, As);
            if (d == 0) __stcg(mine + g * (hd + 2) + hd, M), __stcg(mine + g * (hd + 2) + hd + 1, Ls);
        }
    }
    if (nsp == 1) return;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) *flag = atomicAdd(a.sync + 1 + l * Hkv + hk, 1u) == (unsigned)nsp - 1;
    __syncthreads();
    if (!*flag) return;
    __threadfence(); /* the last split of this KV head merges them all, in split order */
    const float *first = a.part + (size_t)hk * nsp * G * (hd + 2);
    float *sw = scr, *sl = scr + nsp * G; /* each split's weight exp(m - M) (0 if empty), and its sum */
    for (int i = threadIdx.x; i < nsp * G; i += MG_NT) {
        sw[i] = __ldcg(first + (size_t)i * (hd + 2) + hd);
        sl[i] = __ldcg(first + (size_t)i * (hd + 2) + hd + 1);
    }
    __syncthreads();
    if (threadIdx.x < G) {
        const int g = threadIdx.x;
        float M = -INFINITY, Ls = 0;
        for (int s = 0; s < nsp; s++)
            if (sl[s * G + g] > 0) M = fmaxf(M, sw[s * G + g]);
        for (int s = 0; s < nsp; s++) {
            const float e = sl[s * G + g] > 0 ? __expf(sw[s * G + g] - M) : 0.0f;
            Ls += sl[s * G + g] * e;
            sw[s * G + g] = e;
        }
        sl[g] = Ls; /* read only below, after every thread's read of sl[s * G + g] above */
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * hd; i += MG_NT) {
        const int g = i / hd, d = i % hd;
        float As = 0;
#pragma unroll 4
        for (int s = 0; s < nsp; s++) As += __ldcg(first + ((size_t)s * G + g) * (hd + 2) + d) * sw[s * G + g];
        __stcg(a.att + (size_t)(hk * G + g) * hd + d, As / sl[g]);
    }
}

/* ---- the kernel ----------------------------------------------------------------------------- */

template <typename T, int EPT, int G, int DPL>
__global__ void __launch_bounds__(MG_NT, 1) k_mega(const __grid_constant__ mg_args pa) {
    extern __shared__ __align__(16) unsigned char mg_smem[];
    /* The parameters (about 21 KB: the layer and product tables) into shared
     * memory: read through the constant cache with per-layer indices they miss
     * to L2, and the stream's bookkeeping reads them for every item. */
    __shared__ __align__(16) mg_args a;
    for (int i = threadIdx.x; i < (int)(sizeof(mg_args) / 4); i += MG_NT) ((int *)&a)[i] = ((const int *)&pa)[i];
    __syncthreads();
    __shared__ float red[32 * 4], coef[64];
    __shared__ float sq[G][32 * DPL], snew[2][32 * DPL];
    __shared__ int flag;
    __shared__ int4 mg_queue[MG_NW][MG_SLOTS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    char *ring = (char *)mg_smem + warp * MG_SLOTS * MG_TILE;
    float *act = (float *)(mg_smem + MG_NW * MG_SLOTS * MG_TILE);
    unsigned target = 0;
    const int nbar = a.n_layer * 7;
    if (a.trace && blockIdx.x == 0 && threadIdx.x == 0) a.trace[(size_t)(gridDim.x + 1) * nbar] = mg_clock();
    /* trace: block 0, warp 0's times within each layer */
#define MG_MARK(k) \
    if (a.trace && blockIdx.x == 0 && threadIdx.x == 0) a.trace[(size_t)(gridDim.x + 1) * nbar + 1 + l * 14 + (k)] = mg_clock()
    /* the weights first: they do not depend on anything before this kernel */
    int4 *queue = mg_queue[warp];
    const int nwg = gridDim.x * MG_NW, gw = blockIdx.x * MG_NW + warp;
    mg_it iss;
    iss.ph = 0, iss.u = gw;
    mg_seek(a, iss, gw);
    for (int s = 0; s < MG_SLOTS; s++) {
        mg_issue<T>(a, iss, ring + s * MG_TILE, queue + s, lane);
        mg_next<T>(a, iss, gw, nwg);
    }
    int slot = 0;
    float P[4][EPT], X[EPT], Sr[EPT];
    MG_FOR(j, d) {
#pragma unroll
        for (int i = 0; i < 4; i++) P[i][j] = d < a.D ? __ldcg(a.S + (size_t)i * a.D + d) : 0.0f;
    }
    /* Seven stages a layer, each a row step, then (but for attention) a
     * product, then a grid barrier. One loop body, so that each piece of code
     * exists once: the kernel must fit the instruction cache. */
    for (int l = 0; l < a.n_layer; l++) {
        const mg_layer &L = a.L[l];
        for (int st = 0; st < 7; st++) {
            if (!(a.flags & 2)) switch (st) {
                case 0:
                    mg_predict<T, EPT>(a, l, P, X, act, coef, red);
                    break;
                case 1: { /* the state waits in shared memory: attention needs the registers */
                    float *keep = act + MG_NW * (a.H / a.Hkv) * (a.hd + 2);
                    MG_FOR(j, d) {
#pragma unroll
                        for (int i = 0; i < 4; i++) keep[i * MG_NT * EPT + j * MG_NT + threadIdx.x] = P[i][j];
                        keep[4 * MG_NT * EPT + j * MG_NT + threadIdx.x] = X[j];
                        keep[5 * MG_NT * EPT + j * MG_NT + threadIdx.x] = Sr[j];
                    }
                    mg_attention<G, DPL>(a, l, act, sq, snew, &flag);
                    MG_FOR(j, d) {
#pragma unroll
                        for (int i = 0; i < 4; i++) P[i][j] = keep[i * MG_NT * EPT + j * MG_NT + threadIdx.x];
                        X[j] = keep[4 * MG_NT * EPT + j * MG_NT + threadIdx.x];
                        Sr[j] = keep[5 * MG_NT * EPT + j * MG_NT + threadIdx.x];
                    }
                    break;
                }
                case 2: mg_fill<T>(a, act, 0, a.att, a.H * a.hd), mg_fill<T>(a, act, a.lr_off, a.lt, a.R); break;
                case 3: mg_residual<T, EPT>(a, L, P, X, Sr, act, red); break;
                case 4: mg_mlp_act<T>(a, L, act, red); break;
                case 5: mg_correct<T, EPT>(a, L, P, Sr, act, coef, red); break;
                default: mg_fill<T>(a, act, 0, a.pg, a.P); break;
                }
            __syncthreads();
            MG_MARK(2 * st);
            /* products: q/LAuReL-left/k/v, o/LAuReL-right, gate/up, down, per-layer gate, projection */
            if (st != 1) mg_phase<T>(a, l * MG_PHASES + (st ? st - 1 : 0), iss, slot, ring, queue, act, gw, nwg);
            MG_MARK(2 * st + 1);
            mg_grid_sync(a.sync, target, a.trace, nbar);
        }
    }
    mg_ple_add<EPT>(a, a.L[a.n_layer - 1].w_ple, P, red);
    if (blockIdx.x == 0) {
        MG_FOR(j, d) if (d < a.D) {
#pragma unroll
            for (int i = 0; i < 4; i++) a.S[(size_t)i * a.D + d] = P[i][j];
        }
    }
    cp_async_wait<0>();
}

/* ---- host side -------------------------------------------------------------------------------- */

typedef void (*mg_kernel)(mg_args);
static_assert(sizeof(mg_args) <= 32764, "kernel parameters are at most 32764 bytes");

/* elements per thread of the instantiation that takes width D */
static int ept_of(int D) { return D <= MG_NT ? 1 : MG_EPT_WIDE; }

/* The instantiation for this model and its shared memory, or NULL where none
 * takes it. */
static mg_kernel mg_pick(cuda_ctx *c, const g3n_dec_model *m, size_t *smem, int *act_n) {
    const int D = m->dim, G = m->n_head_kv > 0 ? m->n_head / m->n_head_kv : 0, dpl = m->head_dim / 32;
    const int ept = (D + MG_NT - 1) / MG_NT;
    if (m->n_altup != 4 || m->n_layer > MG_MAX_LAYERS || m->n_layer < 1 || D > 2048) return NULL;
    if (G * m->n_head_kv != m->n_head || m->head_dim % 32) return NULL; /* grouped heads of 32k dims */
    const g3n_mat *w0 = m->layer[0].q;
    int dt = w0->dtype;
    size_t es = g3n_dtype_size((g3n_dtype)dt);
    int imax = 0;
    for (int l = 0; l < m->n_layer; l++) {
        const g3n_dec_layer *L = &m->layer[l];
        const g3n_mat *W[11] = {L->q, L->k, L->v, L->o, L->laurel_left, L->laurel_right, L->gate, L->up, L->down,
                                L->ple_gate, L->ple_proj};
        for (int i = 0; i < 11; i++) {
            if ((i == 1 || i == 2) && !L->owns_kv) continue;
            /* one dtype, stored plainly, rows of whole 16-byte chunks */
            if (!W[i]->data || W[i]->bits || W[i]->transposed || W[i]->dtype != dt || (W[i]->cols * es) % 16)
                return NULL;
        }
        if (L->router->bits || L->router->dtype != dt) return NULL;
        imax = G3N_MAX(imax, L->n_ff);
    }
    const int qd = m->n_head * m->head_dim, lr_off = (qd + 7) & ~7;
    size_t act = (size_t)G3N_MAX(G3N_MAX(imax, D), G3N_MAX(lr_off + m->laurel_rank, m->n_ple));
    act = G3N_MAX(act, (size_t)MG_NW * G * (m->head_dim + 2) + 6 * MG_NT * ept_of(D));
    act = (act + 7) & ~(size_t)7; /* halves of whole groups of 4 (mg_px) */
    *act_n = (int)act;
    *smem = (size_t)MG_NW * MG_SLOTS * MG_TILE + act * sizeof(float);
    mg_kernel k = NULL;
#define MG_K(TT)                                                                            \
    do {                                                                                    \
        if (ept <= 1 && G == 2 && dpl == 1) k = k_mega<TT, 1, 2, 1>;                        \
        else if (ept <= MG_EPT_WIDE && G == 4 && dpl == 8) k = k_mega<TT, MG_EPT_WIDE, 4, 8>; \
    } while (0)
    if (dt == G3N_BF16) MG_K(__nv_bfloat16);
    else if (dt == G3N_F16) MG_K(__half);
    else if (dt == G3N_F32) MG_K(float);
#undef MG_K
    if (!k || *smem + 8192 + sizeof(mg_args) > c->smem_optin) return NULL;
    return k;
}

/* One phase's row of the product table: n products one after another, or
 * (pairs) products read row by row together, each over all of the phase's units. */
static void mg_table_set(mg_pd t[4], const g3n_mat *const *W, int n, int pairs) {
    int end = 0;
    for (int i = 0; i < 4; i++) {
        if (i < n) {
            t[i].W = (const char *)W[i]->data, t[i].K = W[i]->cols;
            end = pairs ? W[i]->rows : end + W[i]->rows;
            t[i].end = end;
        } else {
            t[i] = t[i - 1];
        }
    }
    for (int i = n; i < 4; i++) t[i].end = end;
}

/* backend.h decode_layers */
int cuda_op_decode_layers(g3n_backend *be, const g3n_dec_model *m, const g3n_dec_bufs *b) {
    cuda_ctx *c = CTX(be);
    size_t smem = 0;
    int act_n = 0;
    mg_kernel k = mg_pick(c, m, &smem, &act_n);
    if (!k) return 0;
    const int G = m->n_head / m->n_head_kv;
    if (!b) { /* at load: set up once, outside any recording */
        int coop = 0, nb = 0;
        CUDA_CHECK(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, c->device));
        if (!coop) return 0;
        CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, k, MG_NT, smem));
        if (nb < 1) return 0;
        const size_t part = (size_t)c->n_sm * G * (m->head_dim + 2) * sizeof(float);
        const size_t sync = (1 + (size_t)m->n_layer * m->n_head_kv) * sizeof(unsigned);
        if (c->mg_part_bytes < part) {
            if (c->mg_part) CUDA_CHECK(cudaFree(c->mg_part));
            CUDA_CHECK(cudaMalloc((void **)&c->mg_part, part));
            c->mg_part_bytes = part;
        }
        const char *tr = getenv("G3N_MEGA_TRACE");
        if (tr && atoi(tr) && !c->mg_trace) {
            c->mg_trace_nbar = m->n_layer * 7;
            CUDA_CHECK(cudaMalloc((void **)&c->mg_trace,
                                  ((size_t)(c->n_sm + 1) * c->mg_trace_nbar + 1 + 14 * (size_t)m->n_layer) * 8));
        }
        if (c->mg_sync_bytes < sync) {
            if (c->mg_sync) CUDA_CHECK(cudaFree(c->mg_sync));
            CUDA_CHECK(cudaMalloc((void **)&c->mg_sync, sync));
            c->mg_sync_bytes = sync;
        }
        return 1;
    }
    if (c->n_tokens != 1 || !c->mg_part || !c->mg_sync) return 0;
    mg_args a; /* about 21 KB of kernel parameters */
    memset(&a, 0, sizeof a);
    a.n_layer = m->n_layer, a.D = m->dim, a.H = m->n_head, a.Hkv = m->n_head_kv, a.hd = m->head_dim;
    a.P = m->n_ple, a.R = m->laurel_rank, a.lr_off = (a.H * a.hd + 7) & ~7, a.eps = m->eps, a.rs = m->res_scale;
    for (int l = 0; l < m->n_layer; l++) {
        const g3n_dec_layer *L = &m->layer[l];
        mg_layer *o = &a.L[l];
        /* the products of the layer's six phases, in the order the table's units run */
        const g3n_mat *P0[4] = {L->q, L->laurel_left, L->k, L->v}, *P1[2] = {L->o, L->laurel_right};
        const g3n_mat *P2[2] = {L->gate, L->up};
        mg_table_set(a.tab[l * MG_PHASES], P0, L->owns_kv ? 4 : 2, 0);
        mg_table_set(a.tab[l * MG_PHASES + 1], P1, 2, 0);
        mg_table_set(a.tab[l * MG_PHASES + 2], P2, 2, 1);
        mg_table_set(a.tab[l * MG_PHASES + 3], &L->down, 1, 0);
        mg_table_set(a.tab[l * MG_PHASES + 4], &L->ple_gate, 1, 0);
        mg_table_set(a.tab[l * MG_PHASES + 5], &L->ple_proj, 1, 0);
        o->R = L->router->data;
        o->rnorm = L->router_norm.data, o->pcoef = L->pred_coefs.data, o->ccoef = L->corr_coefs.data;
        o->innorm = L->in_norm.data, o->qn = L->q_norm.data, o->kn = L->k_norm.data;
        o->w_att = L->post_att.data, o->w_lau = L->post_laurel.data, o->w_pre = L->pre_ff.data;
        o->w_post = L->post_ff.data, o->oscale = L->out_scale.data, o->w_ple = L->post_ple_norm.data;
        o->ple_in = b->ple + (size_t)l * m->n_ple;
        o->owns = L->owns_kv, o->kv_layer = L->kv_layer, o->window = L->window, o->I = L->n_ff, o->topk = L->topk;
        o->theta = L->theta, o->kappa = L->kappa;
    }
    a.S = b->S, a.q = b->q, a.k = b->k, a.v = b->v, a.lt = b->lt, a.att = b->att, a.o = b->o, a.lau = b->lau;
    a.g = b->gate, a.up = b->up, a.mlp = b->mlp, a.pg = b->pg, a.ple_out = b->ple_out;
    a.part = c->mg_part, a.sync = c->mg_sync, a.kv = c->d_kv, a.pos = d_pos(c), a.seq = d_seq(c);
    a.act_n = act_n;
    float *yt[MG_PHASES][4] = {{a.q, a.lt, a.k, a.v}, {a.o, a.lau, a.lau, a.lau}, {a.g, a.up, a.up, a.up},
                               {a.mlp, a.mlp, a.mlp, a.mlp}, {a.pg, a.pg, a.pg, a.pg},
                               {a.ple_out, a.ple_out, a.ple_out, a.ple_out}};
    memcpy(a.ytab, yt, sizeof yt);
    a.trace = c->mg_trace && m->n_layer * 7 == c->mg_trace_nbar ? c->mg_trace : NULL;
    a.flags = getenv("G3N_MEGA_FLAGS") ? atoi(getenv("G3N_MEGA_FLAGS")) : 0;
    if (c->skip[0] && cuda_skipped(c, (const void *)k)) return 1;
    PROF_BEGIN(c);
    CUDA_CHECK(cudaMemsetAsync(c->mg_sync, 0, c->mg_sync_bytes, c->stream));
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)c->n_sm);
    cfg.blockDim = dim3(MG_NT);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = c->stream;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeCooperative;
    at[0].val.cooperative = 1;
    cfg.attrs = at;
    cfg.numAttrs = 1;
    CUDA_CHECK(cudaLaunchKernelEx(&cfg, k, a));
    PROF_END(c, "decode_layers (one kernel)", 0);
    return 1;
}

/* G3N_MEGA_TRACE=1: where the last step's time went, per barrier of a layer
 * (averaged over the layers): from the previous barrier's exit to the first and
 * the last block's arrival (the phase's work, then its slowest block), and from
 * the last arrival to block 0's exit (the barrier itself). */
void cuda_mega_report(cuda_ctx *c) {
    if (!c->mg_trace) return;
    const int nbar = c->mg_trace_nbar, nb = c->n_sm, nl = nbar / 7;
    const size_t n = (size_t)(nb + 1) * nbar + 1;
    unsigned long long *t = (unsigned long long *)malloc((n + 14 * nl) * 8);
    cuda_copy_wait(c, t, c->mg_trace, (n + 14 * nl) * 8, cudaMemcpyDeviceToHost);
    const unsigned long long *exit_ = t + (size_t)nb * nbar, start = t[n - 1];
    static const char *name[7] = {"q/ll/k/v", "attention", "o/lr", "gate/up", "down", "ple gate", "ple proj"};
    double first[7] = {0}, last[7] = {0}, bar[7] = {0};
    for (int l = 0; l < nl; l++)
        for (int b = 0; b < 7; b++) {
            const int k = l * 7 + b;
            const unsigned long long prev = k ? exit_[k - 1] : start;
            unsigned long long lo = ~0ull, hi = 0;
            for (int i = 0; i < nb; i++) {
                lo = G3N_MIN(lo, t[(size_t)i * nbar + k]);
                hi = G3N_MAX(hi, t[(size_t)i * nbar + k]);
            }
            first[b] += (double)(lo - prev) / nl, last[b] += (double)(hi - prev) / nl;
            bar[b] += (double)(exit_[k] - hi) / nl;
        }
    fprintf(stderr, "\ng3n: mega kernel, last step: %.1f us over %d layers; per layer (us):\n",
            (exit_[nbar - 1] - start) / 1e3, nl);
    fprintf(stderr, "%-12s %12s %12s %10s\n", "phase", "first block", "last block", "barrier");
    for (int b = 0; b < 7; b++)
        fprintf(stderr, "%-12s %12.2f %12.2f %10.2f\n", name[b], first[b] / 1e3, last[b] / 1e3, bar[b] / 1e3);
    /* block 0, warp 0: marks 0..13 within a layer, relative to mark 0 */
    const unsigned long long *mk = t + n;
    double md[14] = {0};
    for (int l = 0; l < nl; l++)
        for (int k = l ? 0 : 1; k < 14; k++) md[k] += (double)(mk[l * 14 + k] - mk[l * 14 + k - 1]) / (k ? nl : nl - 1);
    static const char *mname[14] = {"barrier+predict", "q items", "barrier+attention", "-", "barrier+fill", "o items",
                                    "barrier+residual", "gate/up items", "barrier+mlp_act", "down items",
                                    "barrier+correct", "ple gate items", "barrier+fill", "ple proj items"};
    fprintf(stderr, "block 0 warp 0 (us):");
    for (int k = 0; k < 14; k++) fprintf(stderr, " %s %.2f;", mname[k], md[k] / 1e3);
    fprintf(stderr, "\n");
    free(t);
}
