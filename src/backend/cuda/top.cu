/* top.cu: the best m logits of a row on the device (backend.h: logits_top), so
 * that a decode step hands the sampler a few candidates instead of copying the
 * whole row (262,144 floats, 1 MB) to the host and scanning it there.
 *
 * The order is the sampler's (sampler.c: before): logit descending, then id
 * ascending, over the cleaned logits (NaN as -inf, +inf as FLT_MAX). Each (logit,
 * id) becomes one 64-bit key, the logit's bits made monotone in the high word and
 * ~id in the low one, so the order is the keys' descending order and no two keys
 * are equal.
 *
 *  1. k_top_slices: a block per slice of TOP_SLICE logits sorts the slice's keys
 *     (bitonic, in shared memory) and writes its best p2 (m rounded up to a power
 *     of two).
 *  2. k_top_merge: one block. The m-th best key of any m keys of the row is at
 *     most the row's m-th best, so every key of the row's best m is at least t,
 *     the m-th best of the union of each slice's first few: each slice
 *     contributes the prefix of its list at or above t. Those are sorted and
 *     the best m written with a count; more than TOP_CAP of them (the row's best
 *     crowded into a few slices) and the op declines, and the caller takes the
 *     whole row.
 * m = 1 (greedy) takes one pass instead: each block's best key, then a 64-bit
 * atomicMax (the maximum does not depend on the order).
 * m <= the number of slices (Gemma's vocabulary: 128 slices, so the sampler's
 * top-k 64) takes a threshold instead of sorting every slice (two full sorts
 * cost ~90 us a token; docs/SPEED.md, eleventh session):
 *  1. k_top_max: each slice's best key.
 *  2. k_top_gather: t, the m-th best of the slices' best keys, is at most the
 *     row's m-th best (those m keys are m keys of the row), so the row's best m
 *     are among its keys at or above t; every block appends its slice's finite
 *     ones to the row's list (atomic slots: the list's order varies, its set
 *     does not). -inf and NaN are left out, so that a row of few finite logits
 *     among -inf (logits_pruned's) does not fill the list with them; a row of
 *     fewer than m finite logits then declines (step 3).
 *  3. k_top_sort: one block sorts the list and writes the best m; more than
 *     TOP_CAP keys at or above t (ties of -inf, say) and it declines, and the
 *     row goes through the two steps above.
 * logits_top_queue runs m = 1 (k_top_max alone: each slice's best key, the
 * host takes the largest) or the threshold path with the step that writes the
 * logits, inside its recorded graph, into pinned host memory; logits_top then
 * only collects (top_collect). */
#include "cuda_common.cuh"
#include <float.h>

__device__ __forceinline__ unsigned long long top_key(float x, int id) {
    x = x != x ? -INFINITY : (x > FLT_MAX ? FLT_MAX : x);
    uint32_t u = __float_as_uint(x);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return (unsigned long long)u << 32 | (uint32_t)~(uint32_t)id;
}

/* the bits of a key's logit (top_key's high word undone; host and device) */
__host__ __device__ __forceinline__ uint32_t top_bits(unsigned long long k) {
    const uint32_t u = (uint32_t)(k >> 32);
    return (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
}

__device__ __forceinline__ float top_value(unsigned long long k) { return __uint_as_float(top_bits(k)); }

/* Sort s[0..n) descending (n a power of two), all threads of the block. */
__device__ void top_bitonic(unsigned long long *s, int n) {
    for (int k = 2; k <= n; k <<= 1)
        for (int j = k >> 1; j > 0; j >>= 1) {
            __syncthreads();
            for (int i = threadIdx.x; i < n; i += blockDim.x) {
                const int p = i ^ j;
                if (p > i) {
                    const unsigned long long a = s[i], b = s[p];
                    const bool desc = (i & k) == 0; /* this run sorts descending */
                    if (desc ? a < b : a > b) s[i] = b, s[p] = a;
                }
            }
        }
    __syncthreads();
}

/* the best m of sorted keys s: m values, m ids (as floats' bits), the count m */
__device__ void top_write(float *out, const unsigned long long *s, int m) {
    for (int i = threadIdx.x; i < m; i += blockDim.x) {
        out[i] = top_value(s[i]);
        out[m + i] = __int_as_float((int)~(uint32_t)s[i]);
    }
    if (threadIdx.x == 0) out[2 * m] = (float)m;
}

__global__ void __launch_bounds__(256) k_top_slices(unsigned long long *cand, const float *x, size_t stride, int n,
                                                    int p2) {
    __shared__ unsigned long long s[TOP_SLICE];
    KERNEL_BEGIN();
    x += blockIdx.y * stride, cand += (size_t)blockIdx.y * gridDim.x * p2; /* row blockIdx.y */
    const int i0 = blockIdx.x * TOP_SLICE;
    for (int i = threadIdx.x; i < TOP_SLICE; i += blockDim.x) s[i] = i0 + i < n ? top_key(x[i0 + i], i0 + i) : 0ull;
    top_bitonic(s, TOP_SLICE);
    for (int i = threadIdx.x; i < p2; i += blockDim.x) cand[(size_t)blockIdx.x * p2 + i] = s[i];
}

/* out: m values, m ids (as floats' bits), then the count written (m, or 0: declined) */
__global__ void __launch_bounds__(1024) k_top_merge(float *out, const unsigned long long *cand, int nb, int p2, int m) {
    __shared__ unsigned long long s[TOP_CAP];
    __shared__ int off[1025];
    KERNEL_BEGIN();
    out += blockIdx.x * (2 * (size_t)m + 1), cand += (size_t)blockIdx.x * nb * p2; /* row blockIdx.x */
    /* t: the m-th best of the union of every slice's best q (at least m keys of
     * the row, so at most its m-th best), q such that the union is ~TOP_CAP / 2 */
    const int q = min(p2, max((m + nb - 1) / nb, TOP_CAP / 2 / nb));
    int nu = 1;
    while (nu < nb * q) nu <<= 1;
    for (int i = threadIdx.x; i < nu; i += blockDim.x) s[i] = i < nb * q ? cand[(size_t)(i / q) * p2 + i % q] : 0ull;
    top_bitonic(s, nu);
    const unsigned long long t = s[m - 1];
    __syncthreads();
    const int b = threadIdx.x; /* nb <= blockDim.x: a thread per slice */
    int lo = 0;
    if (b < nb) { /* the slice's prefix at or above t: the first index below it */
        int hi = p2;
        while (lo < hi) {
            const int mid = (lo + hi) / 2;
            if (cand[(size_t)b * p2 + mid] >= t) lo = mid + 1;
            else hi = mid;
        }
    }
    off[b + 1] = lo; /* inclusive scan over the slices (Hillis-Steele) */
    if (b == 0) off[0] = 0;
    __syncthreads();
    for (int d = 1; d < (int)blockDim.x; d <<= 1) {
        const int v = b >= d ? off[b + 1 - d] : 0;
        __syncthreads();
        off[b + 1] += v;
        __syncthreads();
    }
    const int total = off[nb];
    if (total > TOP_CAP) {
        if (threadIdx.x == 0) out[2 * m] = 0.0f;
        return;
    }
    if (b < nb)
        for (int i = 0; i < lo; i++) s[off[b] + i] = cand[(size_t)b * p2 + i];
    int n2 = 1;
    while (n2 < total) n2 <<= 1;
    for (int i = total + threadIdx.x; i < n2; i += blockDim.x) s[i] = 0ull;
    top_bitonic(s, n2);
    top_write(out, s, m);
}

/* The largest of the block's keys v (256 threads; wm: 8 words of shared
 * memory), in thread 0 */
__device__ __forceinline__ unsigned long long top_block_max(unsigned long long v, unsigned long long *wm) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    if ((threadIdx.x & 31) == 0) wm[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x == 0)
        for (int w = 1; w < 8; w++) v = max(v, wm[w]);
    return v;
}

/* The threshold path (steps 1-3 of the top): cnt[row] counts the row's list
 * (zeroed by step 1, which runs before step 2's first append) */
__global__ void __launch_bounds__(256) k_top_max(unsigned long long *smax, unsigned *cnt, const float *x, size_t stride,
                                                 int n) {
    __shared__ unsigned long long wm[8];
    KERNEL_BEGIN();
    x += blockIdx.y * stride;
    const int i0 = blockIdx.x * TOP_SLICE, i1 = min(n, i0 + TOP_SLICE);
    unsigned long long v = 0;
    for (int i = i0 + threadIdx.x; i < i1; i += blockDim.x) v = max(v, top_key(x[i], i));
    v = top_block_max(v, wm);
    if (threadIdx.x == 0) {
        smax[(size_t)blockIdx.y * gridDim.x + blockIdx.x] = v;
        if (blockIdx.x == 0) cnt[blockIdx.y] = 0;
    }
}

__global__ void __launch_bounds__(1024) k_top_gather(unsigned long long *list, unsigned *cnt,
                                                    const unsigned long long *smax, const float *x, size_t stride,
                                                    int n, int m) {
    __shared__ unsigned long long sm[1024], t;
    KERNEL_BEGIN();
    const int nb = gridDim.x;
    x += blockIdx.y * stride, smax += (size_t)blockIdx.y * nb, list += (size_t)blockIdx.y * TOP_CAP;
    for (int i = threadIdx.x; i < nb; i += blockDim.x) sm[i] = smax[i];
    __syncthreads();
    if (threadIdx.x < nb) { /* the key with m - 1 keys above it (the keys differ) */
        const unsigned long long v = sm[threadIdx.x];
        int above = 0;
        for (int j = 0; j < nb; j++) above += sm[j] > v;
        if (above == m - 1) t = v;
    }
    __syncthreads();
    const int i0 = blockIdx.x * TOP_SLICE, i1 = min(n, i0 + TOP_SLICE);
    for (int i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
        const unsigned long long k = top_key(x[i], i);
        if (k >= t && x[i] > -INFINITY) { /* (-inf and NaN never: a row of fewer finite than m declines) */
            const unsigned slot = atomicAdd(&cnt[blockIdx.y], 1u);
            if (slot < TOP_CAP) list[slot] = k;
        }
    }
}

/* out as k_top_merge's */
__global__ void __launch_bounds__(1024) k_top_sort(float *out, const unsigned long long *list, const unsigned *cnt,
                                                  int m) {
    __shared__ unsigned long long s[TOP_CAP];
    KERNEL_BEGIN();
    out += blockIdx.x * (2 * (size_t)m + 1), list += (size_t)blockIdx.x * TOP_CAP;
    const unsigned total = cnt[blockIdx.x];
    if (total > TOP_CAP || total < (unsigned)m) { /* (fewer: fewer than m finite logits) */
        if (threadIdx.x == 0) out[2 * m] = 0.0f;
        return;
    }
    int n2 = 1;
    while (n2 < (int)total) n2 <<= 1;
    for (int i = threadIdx.x; i < n2; i += blockDim.x) s[i] = i < (int)total ? list[i] : 0ull;
    top_bitonic(s, n2);
    top_write(out, s, m);
}

/* m = 1 (greedy): the best key of the row in one pass, blocks meeting in a
 * 64-bit atomicMax (order-free: the maximum does not depend on timing) */
__global__ void __launch_bounds__(256) k_top1(unsigned long long *best, const float *x, size_t stride, int n) {
    __shared__ unsigned long long wm[8];
    KERNEL_BEGIN();
    x += blockIdx.y * stride, best += blockIdx.y; /* row blockIdx.y */
    unsigned long long v = 0;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) v = max(v, top_key(x[i], i));
    v = top_block_max(v, wm);
    if (threadIdx.x == 0) atomicMax(best, v);
}

/* The threshold path's three kernels over rows of nb slices; out: [rows][2m + 1] */
static void top_thresh_launch(cuda_ctx *c, unsigned long long *smax, unsigned long long *list, unsigned *cnt,
                              float *out, const float *logits, int rows, size_t stride, int n, int m, int nb) {
    launch(c, k_top_max, dim3(nb, rows), dim3(256), 0, smax, cnt, logits, stride, n);
    CUDA_LAUNCHED();
    launch(c, k_top_gather, dim3(nb, rows), dim3(1024), 0, list, cnt, (const unsigned long long *)smax, logits, stride,
           n, m);
    CUDA_LAUNCHED();
    launch(c, k_top_sort, dim3(rows), dim3(1024), 0, out, (const unsigned long long *)list, (const unsigned *)cnt, m);
    CUDA_LAUNCHED();
}

/* A key into the sampler's value and id */
static void top_unkey(unsigned long long k, float *val, int32_t *id) {
    const uint32_t bits = top_bits(k);
    memcpy(val, &bits, 4);
    *id = (int32_t)~(uint32_t)k;
}

/* A row's results (h: 2m + 1 floats, k_top_merge's and k_top_sort's layout)
 * into vals and ids; 0 where the kernel declined the row */
static int top_unpack(const float *h, int m, float *vals, int32_t *ids) {
    if (h[2 * m] != (float)m) return 0;
    for (int i = 0; i < m; i++) {
        vals[i] = h[i];
        memcpy(&ids[i], &h[m + i], sizeof(int32_t));
    }
    return 1;
}

static int top_off(void) { /* G3N_LOGITS_TOP=0: decline (the host takes the whole row; for comparisons) */
    static int off = -1;
    if (off < 0) off = getenv("G3N_LOGITS_TOP") && !atoi(getenv("G3N_LOGITS_TOP"));
    return off;
}

static int top_sort_all(void) { /* G3N_TOP_SORT=1: every slice sorted, never the threshold path */
    static int v = -1;
    if (v < 0) v = getenv("G3N_TOP_SORT") && atoi(getenv("G3N_TOP_SORT"));
    return v;
}

/* One row's best m with the step that writes it (recorded in its graph): m = 1
 * writes each slice's best key, m > 1 the threshold path's result, straight
 * into pinned host memory, so that nothing runs between the step and the
 * host's read (a graph's end to a kernel after it: 15-27 us on the H100;
 * docs/SPEED.md, fifteenth session). The sorted path is not queued. */
int cuda_op_logits_top_queue(g3n_backend *be, const float *logits, int rows, size_t stride, int n, int m) {
    cuda_ctx *c = CTX(be);
    c->tq.m = 0;
    static int queue_off = -1; /* G3N_TOP_QUEUE=0: decline (for comparisons) */
    if (queue_off < 0) queue_off = getenv("G3N_TOP_QUEUE") && !atoi(getenv("G3N_TOP_QUEUE"));
    if (queue_off || top_off() || rows != 1 || m < 1 || m > G3N_TOP_MAX || n < m) return 0;
    const int nb = (n + TOP_SLICE - 1) / TOP_SLICE;
    if (nb > TOP_QUEUE_SLICES || (m > 1 && (m > nb || top_sort_all()))) return 0;
    unsigned long long *smax = c->tq_dev, *list = smax + TOP_QUEUE_SLICES;
    unsigned *cnt = (unsigned *)(list + TOP_CAP);
    PROF_BEGIN(c);
    if (m == 1) {
        launch(c, k_top_max, dim3(nb, 1), dim3(256), 0, (unsigned long long *)c->tq_host, cnt, logits, stride, n);
        CUDA_LAUNCHED();
    } else {
        top_thresh_launch(c, smax, list, cnt, (float *)c->tq_host, logits, 1, stride, n, m, nb);
    }
    PROF_END(c, "logits_top_queue", (double)n * sizeof(float));
    c->tq = (cuda_top_req){logits, rows, n, m};
    return 1;
}

/* logits_top from what the step queued, if it queued this: 1 done, 0 not */
static int top_collect(cuda_ctx *c, const float *logits, int rows, int n, int m, float *vals, int32_t *ids,
                       uint8_t *ok) {
    const cuda_top_req q = c->tq;
    if (!q.m || q.logits != logits || q.rows != rows || q.n != n || q.m != m) return 0;
    CUDA_CHECK(cudaStreamSynchronize(c->stream));
    if (m == 1) {
        const unsigned long long *k = (const unsigned long long *)c->tq_host;
        unsigned long long best = 0;
        for (int i = 0; i < (n + TOP_SLICE - 1) / TOP_SLICE; i++) best = k[i] > best ? k[i] : best;
        top_unkey(best, vals, ids);
        return ok[0] = 1;
    }
    return ok[0] = (uint8_t)top_unpack((const float *)c->tq_host, m, vals, ids); /* declined: the sorted path */
}

int cuda_op_logits_top(g3n_backend *be, const float *logits, int rows, size_t stride, int n, int m, float *vals,
                       int32_t *ids, uint8_t *ok) {
    cuda_ctx *c = CTX(be);
    if (top_off() || rows < 1 || rows > 65535 || m < 1 || m > G3N_TOP_MAX || n < m) return 0;
    if (top_collect(c, logits, rows, n, m, vals, ids, ok)) return 1;
    int p2 = 1;
    while (p2 < m) p2 <<= 1;
    const int nb = (n + TOP_SLICE - 1) / TOP_SLICE;
    if (nb > 1024) return 0;
    const int thresh = m > 1 && m <= nb && !top_sort_all();
    /* device scratch: the sorted path's candidates [rows][nb][p2], or the
     * threshold path's slice maxima [rows][nb], lists [rows][TOP_CAP] and counts
     * [rows]; then the results [rows][2m + 1] */
    const size_t per = 2 * (size_t)m + 1, res = (size_t)rows * per * sizeof(float);
    const size_t sorted_b = (size_t)rows * nb * p2 * sizeof(unsigned long long);
    const size_t thresh_b = (size_t)rows * ((size_t)nb + TOP_CAP + 1) * sizeof(unsigned long long);
    const size_t need = G3N_MAX(sorted_b, thresh_b) + res;
    if (c->top_bytes < need) { /* grows, never shrinks */
        if (c->top_buf) CUDA_CHECK(cudaFree(c->top_buf));
        CUDA_CHECK(cudaMalloc(&c->top_buf, need));
        c->top_bytes = need;
    }
    const size_t hneed = G3N_MAX(res, (size_t)rows * sizeof(unsigned long long)); /* the results */
    if (c->top_host_bytes < hneed) {
        if (c->top_host) CUDA_CHECK(cudaFreeHost(c->top_host));
        CUDA_CHECK(cudaMallocHost(&c->top_host, hneed));
        c->top_host_bytes = hneed;
    }
    unsigned long long *cand = (unsigned long long *)c->top_buf;
    float *out = (float *)(cand + G3N_MAX(sorted_b, thresh_b) / sizeof(unsigned long long));
    PROF_BEGIN(c);
    if (m == 1) {
        CUDA_CHECK(cudaMemsetAsync(cand, 0, (size_t)rows * sizeof(unsigned long long), c->stream));
        launch(c, k_top1, dim3(c->n_sm * 2, rows), dim3(256), 0, cand, logits, stride, n);
        CUDA_LAUNCHED();
        cuda_copy_wait(c, c->top_host, cand, (size_t)rows * sizeof(unsigned long long), cudaMemcpyDeviceToHost);
        for (int r = 0; r < rows; r++) {
            unsigned long long k;
            memcpy(&k, (const char *)c->top_host + (size_t)r * sizeof k, sizeof k);
            top_unkey(k, &vals[r], &ids[r]);
            ok[r] = 1;
        }
    } else {
        for (int pass = !thresh; pass < 2; pass++) {
            if (pass == 0) { /* the threshold path */
                unsigned long long *smax = cand, *list = smax + (size_t)rows * nb;
                unsigned *cnt = (unsigned *)(list + (size_t)rows * TOP_CAP);
                top_thresh_launch(c, smax, list, cnt, out, logits, rows, stride, n, m, nb);
            } else { /* every slice sorted */
                launch(c, k_top_slices, dim3(nb, rows), dim3(256), 0, cand, logits, stride, n, p2);
                CUDA_LAUNCHED();
                launch(c, k_top_merge, dim3(rows), dim3(1024), 0, out, (const unsigned long long *)cand, nb, p2, m);
                CUDA_LAUNCHED();
            }
            cuda_copy_wait(c, c->top_host, out, (size_t)rows * per * sizeof(float), cudaMemcpyDeviceToHost);
            int declined = 0;
            for (int r = 0; r < rows; r++) declined |= c->top_host[(size_t)r * per + 2 * m] != (float)m;
            if (!declined) break; /* (a row the threshold path declined: every row again, sorted) */
        }
        for (int r = 0; r < rows; r++)
            ok[r] = (uint8_t)top_unpack(c->top_host + (size_t)r * per, m, vals + (size_t)r * m, ids + (size_t)r * m);
    }
    PROF_END(c, m == 1 ? "logits_top (1)" : "logits_top", (double)rows * n * sizeof(float));
    return 1;
}
