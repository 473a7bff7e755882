/* cuda.cu: the CUDA backend's host side: device and stream, memory, weight
 * upload (stored dtype, once), per-step metadata in fixed device buffers, the
 * host-resident gather tables (the PLE table stays in host memory; a step copies
 * only its rows), and recorded steps (CUDA graphs) replayed by key.
 * The kernels live in ops.cu, gemv.cu and attention.cu. */
#include "cuda_common.cuh"
#include "backend/cuda/launch_shape.h"
extern "C" {
#include "quant.h"
}

#include <string.h>

/* ---- memory ---------------------------------------------------------------------- */

static void *cu_alloc(g3n_backend *be, size_t bytes) {
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 256);
    if (e != cudaSuccess) {
        size_t fr = 0, tot = 0;
        cudaMemGetInfo(&fr, &tot);
        fprintf(stderr, "g3n: out of GPU memory allocating %.2f GB (%.2f GB free of %.2f GB)\n",
                bytes / 1e9, fr / 1e9, tot / 1e9);
        abort();
    }
    CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, CTX(be)->stream));
    return p;
}

static void cu_free(g3n_backend *be, void *p) {
    if (p) CUDA_CHECK(cudaFree(p));
}

static void cu_write(g3n_backend *be, void *dst, const void *src, size_t bytes) {
    cuda_copy_wait(CTX(be), dst, src, bytes, cudaMemcpyHostToDevice);
}

static void cu_read(g3n_backend *be, void *dst, const void *src, size_t bytes) {
    cuda_copy_wait(CTX(be), dst, src, bytes, cudaMemcpyDeviceToHost);
}

static void *cu_host_alloc(g3n_backend *be, size_t bytes) {
    void *p = NULL;
    CUDA_CHECK(cudaMallocHost(&p, bytes ? bytes : 64));
    return p;
}

static void cu_host_free(g3n_backend *be, void *p) {
    if (p) CUDA_CHECK(cudaFreeHost(p));
}

static size_t cu_memory_used(g3n_backend *be) {
    size_t fr = 0, tot = 0;
    if (cudaMemGetInfo(&fr, &tot) != cudaSuccess) return 0;
    return tot - fr;
}

static void cu_sync(g3n_backend *be) { CUDA_CHECK(cudaStreamSynchronize(CTX(be)->stream)); }

/* dst <- src on the backend's stream, and waited for. The stream is non-blocking:
 * a plain cudaMemcpy or cudaMemset (the legacy stream) is not ordered with its
 * kernels, and a pageable host-to-device cudaMemcpy may return before its last
 * bytes land, so a kernel launched next (a transpose at upload) could read them
 * before they arrive. */
void cuda_copy_wait(cuda_ctx *c, void *dst, const void *src, size_t bytes, cudaMemcpyKind kind) {
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, kind, c->stream));
    CUDA_CHECK(cudaStreamSynchronize(c->stream));
}

/* d (device memory) freed with the backend. */
void cuda_own(cuda_ctx *c, void *d) {
    c->owned = (void **)realloc(c->owned, sizeof(void *) * (size_t)(c->n_owned + 1));
    if (!c->owned) abort();
    c->owned[c->n_owned++] = d;
}

static int cu_mat_prepare(g3n_backend *be, g3n_mat *m, char *err, size_t errlen) {
    cuda_ctx *c = CTX(be);
    if (m->bits) return cuda_quant_prepare(c, m, err, errlen); /* mlx-quantized: quant.cu */
    if (m->dtype != G3N_F32 && m->dtype != G3N_F16 && m->dtype != G3N_BF16)
        return g3n_err(err, errlen, "%s: dtype %s is not supported by the CUDA backend",
                       m->name ? m->name : "?", g3n_dtype_name((g3n_dtype)m->dtype));
    if (!m->data) return 0;
    size_t bytes = (size_t)m->rows * m->cols * g3n_dtype_size((g3n_dtype)m->dtype);
    if (m->host_gather && !c->ple_on_gpu) {
        if (c->n_tables == CUDA_MAX_HOST_GATHER)
            return g3n_err(err, errlen, "%s: too many host-resident tables", m->name);
        cuda_host_table *t = &c->tables[c->n_tables++];
        memset(t, 0, sizeof(*t));
        t->host = m->data;
        t->dtype = m->dtype;
        t->cols = m->cols;
        t->rows = m->rows;
        t->row_bytes = (size_t)m->cols * g3n_dtype_size((g3n_dtype)m->dtype);
        return 0; /* m->data stays the host pointer: embed finds the table by it */
    }
    if (m->cols > c->max_cols) c->max_cols = m->cols;
    void *d = NULL;
    if (cudaMalloc(&d, bytes) != cudaSuccess) {
        size_t fr = 0, tot = 0;
        cudaMemGetInfo(&fr, &tot);
        return g3n_err(err, errlen, "%s: out of GPU memory (%.2f GB needed, %.2f GB free)",
                       m->name ? m->name : "?", bytes / 1e9, fr / 1e9);
    }
    cuda_copy_wait(c, d, m->data, bytes, cudaMemcpyHostToDevice);
    if (m->sparse_cols && m->rows % 8 == 0) {
        /* read by columns (exact sparsity): keep W^T so a column is one row */
        void *t = cuda_transpose_matrix(c, d, m->rows, m->cols, g3n_dtype_size((g3n_dtype)m->dtype));
        CUDA_CHECK(cudaFree(d));
        d = t;
        m->transposed = 1;
        cuda_sparse_reserve(c, m->rows, m->cols);
    }
    cuda_own(c, d);
    m->data = d;
    return 0;
}

/* ---- profiling -------------------------------------------------------------------------- */

void cuda_prof_end(cuda_ctx *c, const char *name, double bytes) {
    CUDA_CHECK(cudaEventRecord(c->ev1, c->stream));
    CUDA_CHECK(cudaEventSynchronize(c->ev1));
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, c->ev0, c->ev1));
    int i = 0;
    while (i < c->n_prof && strcmp(c->prof[i].name, name) != 0) i++;
    if (i == c->n_prof) {
        if (c->n_prof == CUDA_MAX_PROF) return;
        snprintf(c->prof[c->n_prof++].name, sizeof c->prof[0].name, "%s", name);
    }
    c->prof[i].ms += ms;
    c->prof[i].bytes += bytes;
    c->prof[i].calls++;
}

static void prof_print(cuda_ctx *c) {
    double total = 0;
    for (int i = 0; i < c->n_prof; i++) total += c->prof[i].ms;
    /* sort by time, largest first */
    for (int i = 0; i < c->n_prof; i++)
        for (int j = i + 1; j < c->n_prof; j++)
            if (c->prof[j].ms > c->prof[i].ms) {
                cuda_prof t = c->prof[i];
                c->prof[i] = c->prof[j];
                c->prof[j] = t;
            }
    fprintf(stderr, "\ng3n: CUDA op profile (events around each op, graphs off)\n");
    fprintf(stderr, "%-40s %8s %10s %7s %9s %8s\n", "op", "calls", "ms", "%", "us/call", "GB/s");
    for (int i = 0; i < c->n_prof; i++) {
        const cuda_prof *p = &c->prof[i];
        fprintf(stderr, "%-40s %8ld %10.2f %6.1f%% %9.2f %8.0f\n", p->name, p->calls, p->ms, 100 * p->ms / total,
                1e3 * p->ms / p->calls, p->bytes > 0 ? p->bytes / (p->ms * 1e-3) / 1e9 : 0.0);
    }
    fprintf(stderr, "%-40s %8s %10.2f\n", "total", "", total);
}

/* ---- recorded steps -------------------------------------------------------------------- */

static void graphs_clear(cuda_ctx *c) {
    for (int i = 0; i < c->n_graphs; i++) CUDA_CHECK(cudaGraphExecDestroy(c->graph_exec[i]));
    c->n_graphs = 0;
}

static int cu_graph_begin(g3n_backend *be, uint64_t key) {
    cuda_ctx *c = CTX(be);
    if (c->no_graph) return 0;
    for (int i = 0; i < c->n_graphs; i++)
        if (c->graph_key[i] == key) {
            CUDA_CHECK(cudaGraphLaunch(c->graph_exec[i], c->stream));
            c->graph_used[i] = ++c->graph_clock;
            c->tq = c->graph_tq[i]; /* what it queues for logits_top */
            return 1;
        }
    /* A step is recorded the second time it comes: the first runs as it is.
     * Most prompt shapes never come back, and recording one costs more than
     * running it (instantiating an E4B 4-bit step of 4 prompt tokens, 1,449
     * nodes: 9.9 ms; a decode step, ~400 nodes: 0.8-2.3 ms; docs/SPEED.md,
     * fifteenth session). G3N_GRAPH_FIRST=1: record at once. */
    int seen = c->graph_first;
    for (int i = 0; i < CUDA_SEEN_KEYS && !seen; i++) seen = c->seen_key[i] == key;
    if (!seen) {
        c->seen_key[c->next_seen] = key;
        c->next_seen = (c->next_seen + 1) % CUDA_SEEN_KEYS;
        return 0;
    }
    CUDA_CHECK(cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal));
    c->capturing = 1;
    c->capture_key = key;
    return 0;
}

/* matmul_parts (backend.h): a quantized product split over K leaves its slices'
 * sums to the reader (the down product's to k_correct_gate), which spares it
 * the cluster barrier or the counter and second pass that add them; others
 * are plain products. */
static int cu_matmul_parts(g3n_backend *be, float *y, const g3n_mat *W, const float *x, int rows, int cap) {
    if (W->bits && W->data && !W->transposed) return cuda_quant_matmul_parts(CTX(be), y, W, x, rows, cap);
    cuda_op_matmul(be, y, W, x, rows);
    return 1;
}

/* attention_next (backend.h): the next matmul_multi's launch may be made so
 * that decode attention's blocks fit beside it (quant.cu: the carveout), and
 * attention's launch may depend on the product's kind (attention.cu
 * short_launch); cuda_op_matmul_multi clears the mark */
static void cu_attention_next(g3n_backend *be) { CTX(be)->att_next = 1; }

/* ---- L2 prefetch of the next products' weights --------------------------------------- */

/* Each thread asks the L2 for 16 KB chunks of the ranges, strided over the grid:
 * on sm_90 one bulk prefetch each (the copy engine fetches, the thread moves on),
 * before that one prefetch a 128-byte line. Nothing waits for the data. */
#define PF_CHUNK 16384u
__global__ void k_l2_prefetch(pf_ranges r) {
    const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x, nt = (size_t)gridDim.x * blockDim.x;
    for (int i = 0; i < r.k; i++) {
        const char *p = r.p[i];
        const size_t n = r.n[i] & ~(size_t)15;
        const size_t step = (size_t)r.stride * PF_CHUNK;
        for (size_t o = tid * step; o < n; o += nt * step) {
            const unsigned len = (unsigned)(n - o < PF_CHUNK ? n - o : PF_CHUNK);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
            asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p + o), "r"(len) : "memory");
#else
            for (unsigned b = 0; b < len; b += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(p + o + b));
#endif
        }
    }
}

/* The ranges asked for by a kernel on the side stream, forked from the step's
 * stream here (while a step is recorded) and joined at the step's end */
static void pf_issue(cuda_ctx *c, const pf_ranges *r) {
    if (!c->pf_stream) {
        CUDA_CHECK(cudaStreamCreateWithFlags(&c->pf_stream, cudaStreamNonBlocking));
        CUDA_CHECK(cudaEventCreateWithFlags(&c->pf_fork, cudaEventDisableTiming));
        CUDA_CHECK(cudaEventCreateWithFlags(&c->pf_join, cudaEventDisableTiming));
    }
    CUDA_CHECK(cudaEventRecord(c->pf_fork, c->stream));
    CUDA_CHECK(cudaStreamWaitEvent(c->pf_stream, c->pf_fork, 0));
    k_l2_prefetch<<<16, 128, 0, c->pf_stream>>>(*r);
    CUDA_LAUNCHED();
    c->pf_pending = 1;
}

/* The hint of backend.h, taken while a decode step is recorded: a kernel on a
 * side stream, forked here and joined at the step's end, asks the L2 for the
 * bytes of the first two matrices (gate and up) where they fit together in 3/4
 * of it (more would push out each other and everything else), so their
 * products read them from the L2. E4B 4-bit: 37.7 MB of the H100's 52. Not a
 * third (E2B 4-bit's down, which fits too): the side stream runs the layers'
 * prefetch kernels one after another, each ~40 µs with E2B's three matrices
 * (27 with two), and once the layers take less than that it falls behind and
 * the step's end waits for it (E2B 4-bit with the down product's slices left
 * to the reader: 672 tok/s with three, 710 with two; nineteenth session;
 * G3N_PF_WHOLE=n: at most n, for timing). Only matrices of 4 bits or fewer
 * (launch_shape.h's pf_plan): a bf16 gate fits alone at E2B (33.5 MB), so do
 * E4B 8-bit's (35.7 MB) and E2B 8-bit's gate and up together (35.7 MB), but
 * asking for them whole made those models slower than the spread share does
 * (tg128 on the H100, twenty-third session: E2B bf16 437 → 462, E2B 8-bit 545
 * → 552-556, E4B 8-bit 371-372 → 382-383; E4B 4-bit without its whole
 * matrices 550-556 → 548, the other way; E2B 4-bit level): their products
 * before the MLP read 2-4x the bytes of 4-bit ones, and a whole matrix asked
 * for at the layer's start takes the memory from them.
 * Where none is asked for whole (bf16, 8 bits), a spread share of the first
 * product's (below).
 * 16 blocks: more slow the small products that run meanwhile (docs/SPEED.md,
 * eleventh and sixteenth sessions). Whole matrices are not asked for where the
 * layer's attention reads more keys and values than they hold: that walk needs
 * the memory itself (after 32k tokens E4B 4-bit decodes 3-4% faster without
 * them in its full-attention layers, E2B 4-bit 1.6-2%, and after 8k with an
 * f32 cache 2.5%; eighteenth session). The spread share is asked for always
 * (E4B bf16 after 32k tokens: 1.5% faster with it). */
static void cu_prefetch(g3n_backend *be, const g3n_mat *const *W, int n, size_t kv_bytes) {
    cuda_ctx *c = CTX(be);
    if (!c->pf_on || !c->capturing || c->n_tokens > 8) return;
    static int most = -1;
    if (most < 0) most = getenv("G3N_PF_WHOLE") ? G3N_MIN(atoi(getenv("G3N_PF_WHOLE")), PF_MAX / 3) : 2;
    pf_mat pm[PF_MAX / 3];
    n = G3N_MIN(n, PF_MAX / 3);
    for (int i = 0; i < n; i++)
        pm[i] = (pf_mat){g3n_mat_bytes(W[i]), W[i]->bits, W[i]->data && !W[i]->transposed};
    /* whole matrices, or where none is asked for whole every stride-th chunk of
     * the first product's matrices (gate and up read together; a sparse layer's
     * gate), so that its blocks find a share of their rows in the L2 all through
     * the product, while the rest streams from DRAM (G3N_PF_PART, G3N_PF_PART16:
     * that share's MB at 8 bits / 16-bit weights) */
    int spread;
    pf_ranges r = {};
    const int w16 = pm[0].bits == 0;
    const int whole = pf_plan(pm, n, most, c->l2_bytes, w16 ? c->pf_part16 : c->pf_part, kv_bytes, &spread, &r.stride);
    for (int i = 0; i < (spread ? spread : whole); i++) {
        const g3n_mat *m = W[i];
        /* all its bytes; of them the packed codes (or the values), then scales and biases alike */
        const size_t all = pm[i].bytes;
        const size_t db = m->bits ? (size_t)m->rows * g3n_quant_row_words(m->cols, m->bits) * 4 : all, sb = (all - db) / 2;
        r.p[r.k] = (const char *)m->data, r.n[r.k++] = db;
        if (sb) {
            r.p[r.k] = (const char *)m->scales, r.n[r.k++] = sb;
            r.p[r.k] = (const char *)m->biases, r.n[r.k++] = sb;
        }
    }
    if (!r.k) return;
    if (spread && w16 && c->pf_late) { /* held back to the layer's attention (cuda_pf_release) */
        c->pf_held = r, c->pf_hold = 1;
        return;
    }
    pf_issue(c, &r);
}

/* A 16-bit share held back by cu_prefetch, asked for where decode attention
 * starts (cuda_op_qkv_attention, after the q/k/v product's launch). Asked for
 * at the layer's start, the share took the memory from AltUp predict and the
 * q/k/v product (13 MB at E4B bf16); from here it fills the time attention, o
 * and the residual leave the memory idle, so it can be 4x as large: tg128 E4B
 * bf16 294.9 -> 302.3 tok/s with 32 MB (24: 298.6, 40: 301.7), 293.0 -> 294.9
 * at the layer's start with 16, and 293.3 held back with the old 8 MB; E2B bf16
 * +0.8-1.6%; after 2000 tokens E4B bf16 +2.7% (docs/SPEED.md, twenty-fifth
 * session). Not at 8 bits: held back with 24-40 MB, E4B 8-bit lost 3.5% (E2B
 * gained 1.2%). G3N_PF_LATE=0: at the layer's start. */
void cuda_pf_release(cuda_ctx *c) {
    if (!c->pf_hold) return;
    c->pf_hold = 0;
    if (c->capturing) pf_issue(c, &c->pf_held);
}

static void cu_graph_end(g3n_backend *be) {
    cuda_ctx *c = CTX(be);
    if (!c->capturing) return;
    c->pf_hold = 0; /* (one held back for an attention that did not come) */
    if (c->pf_pending) { /* join the side stream: a recorded step ends with it */
        CUDA_CHECK(cudaEventRecord(c->pf_join, c->pf_stream));
        CUDA_CHECK(cudaStreamWaitEvent(c->stream, c->pf_join, 0));
        c->pf_pending = 0;
    }
    cudaGraph_t g;
    CUDA_CHECK(cudaStreamEndCapture(c->stream, &g));
    c->capturing = 0;
    cudaGraphExec_t exec;
    CUDA_CHECK(cudaGraphInstantiate(&exec, g, 0));
    CUDA_CHECK(cudaGraphDestroy(g));
    /* a full set drops the step launched least recently: a server's decode
     * steps (one for each number of slots in use, launched every step) stay
     * while prompt chunks recorded once come and go (round robin dropped them
     * alike) */
    int slot = 0;
    if (c->n_graphs < c->max_graphs) {
        slot = c->n_graphs++;
    } else {
        for (int i = 1; i < c->n_graphs; i++)
            if (c->graph_used[i] < c->graph_used[slot]) slot = i;
        CUDA_CHECK(cudaGraphExecDestroy(c->graph_exec[slot]));
    }
    c->graph_used[slot] = ++c->graph_clock;
    c->graph_key[slot] = c->capture_key;
    c->graph_tq[slot] = c->tq;
    c->graph_exec[slot] = exec;
    CUDA_CHECK(cudaGraphLaunch(exec, c->stream));
}

/* ---- step metadata ---------------------------------------------------------------------- */

static void cu_batch_set(g3n_backend *be, const g3n_batch *b) {
    cuda_ctx *c = CTX(be);
    G3N_ASSERT(!c->capturing);
    c->tq.m = 0; /* a new step: nothing queued for logits_top yet */
    if (b->n > c->cap_tokens || b->n_seq > c->cap_seq) {
        /* addresses change: every recorded step is stale */
        CUDA_CHECK(cudaStreamSynchronize(c->stream));
        graphs_clear(c);
        c->cap_tokens = G3N_MAX(b->n, G3N_MAX(2 * c->cap_tokens, 64));
        c->cap_seq = G3N_MAX(b->n_seq, G3N_MAX(c->cap_seq, 8));
        if (c->d_meta) CUDA_CHECK(cudaFree(c->d_meta));
        if (c->h_meta) CUDA_CHECK(cudaFreeHost(c->h_meta));
        if (c->d_kv) CUDA_CHECK(cudaFree(c->d_kv));
        if (c->h_kv) CUDA_CHECK(cudaFreeHost(c->h_kv));
        CUDA_CHECK(cudaMalloc((void **)&c->d_meta, sizeof(int32_t) * 3 * (size_t)c->cap_tokens));
        CUDA_CHECK(cudaMallocHost((void **)&c->h_meta, sizeof(int32_t) * 3 * (size_t)c->cap_tokens));
        size_t kvn = (size_t)c->cap_seq * G3N_KV_MAX_LAYERS;
        CUDA_CHECK(cudaMalloc((void **)&c->d_kv, sizeof(g3n_kv_layer) * kvn));
        CUDA_CHECK(cudaMallocHost((void **)&c->h_kv, sizeof(g3n_kv_layer) * kvn));
        c->kv_sent = 0;
    } else {
        /* the pinned staging may still feed the previous step's copies */
        CUDA_CHECK(cudaStreamSynchronize(c->stream));
    }
    /* activation conversion scratch for cuBLAS products: sized before any
     * recording so a recorded step never allocates */
    size_t need = (size_t)3 * 2 * (size_t)c->cap_tokens * (size_t)G3N_MAX(c->max_cols, 16384);
    if (b->n >= G3N_MIN(9, c->blas_rows) && need > c->xconv_bytes) {
        CUDA_CHECK(cudaStreamSynchronize(c->stream));
        graphs_clear(c);
        if (c->xconv) CUDA_CHECK(cudaFree(c->xconv));
        CUDA_CHECK(cudaMalloc(&c->xconv, need));
        c->xconv_bytes = need;
        if (!c->ysplit) {
            CUDA_CHECK(cudaMalloc((void **)&c->ysplit, CUDA_YSPLIT_BYTES));
            c->ysplit_n = CUDA_YSPLIT_BYTES / sizeof(float);
        }
    }
    c->n_tokens = b->n;
    c->n_seq = b->n_seq;
    c->one_per_seq = batch_one_per_seq(b);
    c->reach = batch_reach(b);
    int32_t *h = c->h_meta;
    memcpy(h, b->ids, sizeof(int32_t) * (size_t)b->n);
    memcpy(h + c->cap_tokens, b->pos, sizeof(int32_t) * (size_t)b->n);
    memcpy(h + 2 * c->cap_tokens, b->seq, sizeof(int32_t) * (size_t)b->n);
    CUDA_CHECK(cudaMemcpyAsync(c->d_meta, h, sizeof(int32_t) * 3 * (size_t)c->cap_tokens,
                               cudaMemcpyHostToDevice, c->stream));
    if (b->kv) { /* the caches' table: copied when it changed (a session's decode steps: never) */
        const int n = b->n_seq * G3N_KV_MAX_LAYERS;
        int same = c->kv_skip && n <= c->kv_sent;
        for (int s = 0; s < b->n_seq; s++) {
            g3n_kv_layer *dst = c->h_kv + (size_t)s * G3N_KV_MAX_LAYERS;
            same = same && memcmp(dst, b->kv[s]->layer, sizeof(b->kv[s]->layer)) == 0;
            memcpy(dst, b->kv[s]->layer, sizeof(b->kv[s]->layer));
        }
        if (!same) {
            CUDA_CHECK(cudaMemcpyAsync(c->d_kv, c->h_kv, sizeof(g3n_kv_layer) * (size_t)n, cudaMemcpyHostToDevice,
                                       c->stream));
            c->kv_sent = n;
        }
    }
    /* host-resident tables: gather this step's rows, one copy each (a table
     * registered after the staging was sized gets its own now) */
    for (int i = 0; i < c->n_tables; i++) {
        cuda_host_table *t = &c->tables[i];
        if (t->cap_rows < c->cap_tokens) {
            CUDA_CHECK(cudaStreamSynchronize(c->stream));
            graphs_clear(c);
            if (t->d_stage) CUDA_CHECK(cudaFree(t->d_stage));
            if (t->h_stage) CUDA_CHECK(cudaFreeHost(t->h_stage));
            t->cap_rows = c->cap_tokens;
            CUDA_CHECK(cudaMalloc(&t->d_stage, t->row_bytes * (size_t)t->cap_rows));
            CUDA_CHECK(cudaMallocHost(&t->h_stage, t->row_bytes * (size_t)t->cap_rows));
        }
        for (int k = 0; k < b->n; k++) {
            int id = b->ids[k];
            if (id < 0 || id >= t->rows) id = 0;
            if (t->qm.bits) cuda_quant_host_row(t, id, (char *)t->h_stage + (size_t)k * t->row_bytes);
            else
                memcpy((char *)t->h_stage + (size_t)k * t->row_bytes,
                       (const char *)t->host + (size_t)id * t->row_bytes, t->row_bytes);
        }
        if (!stage_direct(c))
            CUDA_CHECK(cudaMemcpyAsync(t->d_stage, t->h_stage, t->row_bytes * (size_t)b->n, cudaMemcpyHostToDevice,
                                       c->stream));
    }
}

/* ---- construction ------------------------------------------------------------------------- */

static void cu_destroy(g3n_backend *be) {
    cuda_ctx *c = CTX(be);
    cudaStreamSynchronize(c->stream);
    cuda_mega_report(c);
    cuda_unembed_free(c);
    if (c->qtrace) { /* G3N_QTRACE: the last QTRACE_RECS k_qgemv_s blocks */
        unsigned long long *h = (unsigned long long *)malloc(QTRACE_BYTES);
        FILE *f = fopen(getenv("G3N_QTRACE"), "wb");
        if (h && f && cudaMemcpy(h, c->qtrace, QTRACE_BYTES, cudaMemcpyDeviceToHost) == cudaSuccess)
            fwrite(h, 1, QTRACE_BYTES, f);
        if (f) fclose(f);
        free(h);
        cudaFree(c->qtrace);
    }
    if (c->profile) {
        prof_print(c);
        cudaEventDestroy(c->ev0);
        cudaEventDestroy(c->ev1);
    }
    graphs_clear(c);
    for (int i = 0; i < c->n_owned; i++) cudaFree(c->owned[i]);
    free(c->owned);
    for (int i = 0; i < c->n_tables; i++) {
        if (c->tables[i].d_stage) cudaFree(c->tables[i].d_stage);
        if (c->tables[i].h_stage) cudaFreeHost(c->tables[i].h_stage);
    }
    if (c->d_meta) cudaFree(c->d_meta);
    if (c->h_meta) cudaFreeHost(c->h_meta);
    if (c->xconv) cudaFree(c->xconv);
    if (c->ysplit) cudaFree(c->ysplit);
    if (c->qscratch) cudaFree(c->qscratch);
    cudaFree(c->sp_part);
    if (c->blas) cublasDestroy(c->blas);
    if (c->blas_ws) cudaFree(c->blas_ws);
    if (c->d_kv) cudaFree(c->d_kv);
    if (c->mg_part) cudaFree(c->mg_part);
    if (c->top_buf) cudaFree(c->top_buf);
    if (c->att_part) cudaFree(c->att_part);
    if (c->att_cnt) cudaFree(c->att_cnt);
    if (c->qs_part) cudaFree(c->qs_part);
    if (c->qs_cnt) cudaFree(c->qs_cnt);
    if (c->top_host) cudaFreeHost(c->top_host);
    if (c->tq_dev) cudaFree(c->tq_dev);
    if (c->tq_host) cudaFreeHost(c->tq_host);
    if (c->mg_sync) cudaFree(c->mg_sync);
    if (c->mg_trace) cudaFree(c->mg_trace);
    if (c->h_kv) cudaFreeHost(c->h_kv);
    if (c->pf_stream) {
        cudaStreamDestroy(c->pf_stream);
        cudaEventDestroy(c->pf_fork);
        cudaEventDestroy(c->pf_join);
    }
    cudaStreamDestroy(c->stream);
    free(c);
    free(be);
}

extern "C" int cuda_available(void) {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

extern "C" g3n_backend *cuda_backend_create(const g3n_cuda_opts *o, char *err, size_t errlen) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        g3n_err(err, errlen, "no CUDA device (%s)", e != cudaSuccess ? cudaGetErrorString(e) : "none found");
        return NULL;
    }
    int dev = o ? o->device : 0;
    if (dev < 0 || dev >= n) {
        g3n_err(err, errlen, "CUDA device %d does not exist (%d found)", dev, n);
        return NULL;
    }
    CUDA_CHECK(cudaSetDevice(dev));
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
    g3n_backend *be = (g3n_backend *)g3n_calloc(1, sizeof(*be));
    cuda_ctx *c = (cuda_ctx *)g3n_calloc(1, sizeof(cuda_ctx));
    c->device = dev;
    c->no_graph = o ? o->no_graph : 0;
    c->ple_on_gpu = o ? o->ple_on_gpu : 0;
    CUDA_CHECK(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
    if (cublasCreate(&c->blas) != CUBLAS_STATUS_SUCCESS) {
        g3n_err(err, errlen, "cuBLAS could not start");
        cudaStreamDestroy(c->stream);
        free(c);
        free(be);
        return NULL;
    }
    const size_t ws = (size_t)32 << 20; /* fixed workspace: recordable in graphs */
    CUDA_CHECK(cudaMalloc(&c->blas_ws, ws));
    cublasSetStream(c->blas, c->stream);
    cublasSetWorkspace(c->blas, c->blas_ws, ws);
    cublasSetMathMode(c->blas, CUBLAS_DEFAULT_MATH); /* no TF32 */
    const char *pdl = getenv("G3N_CUDA_PDL");
    c->n_sm = prop.multiProcessorCount;
    c->cluster_ok = prop.major >= 9;
    c->smem_optin = (size_t)prop.sharedMemPerBlockOptin;
    c->pdl = prop.major >= 9 && !(pdl && strcmp(pdl, "0") == 0);
    const char *br = getenv("G3N_BLAS_ROWS"), *bm = getenv("G3N_BLAS_MB");
    if (getenv("G3N_QTRACE")) {
        CUDA_CHECK(cudaMalloc((void **)&c->qtrace, QTRACE_BYTES));
        CUDA_CHECK(cudaMemset(c->qtrace, 0, QTRACE_BYTES));
    }
    /* decode attention's chunk partials: a step's blocks fit the SMs once, so
     * at most n_sm chunks of G * head_dim + 16 G floats (G <= 8, head_dim <= 256) */
    c->att_part_n = (size_t)c->n_sm * (8 * 256 + 16 * 8);
    c->att_cnt_n = (size_t)c->n_sm * 2;
    CUDA_CHECK(cudaMalloc((void **)&c->att_part, c->att_part_n * sizeof(float)));
    CUDA_CHECK(cudaMalloc((void **)&c->att_cnt, c->att_cnt_n * sizeof(unsigned)));
    CUDA_CHECK(cudaMemset(c->att_cnt, 0, c->att_cnt_n * sizeof(unsigned)));
    /* k_qgemv_s's flat K slices: at most two blocks an SM (one-row products), so
     * 2 n_sm blocks of at most 4 tiles x 8 warps x 4 rows x 8 activation rows */
    c->qs_part_n = (size_t)c->n_sm * 2 * 4 * 8 * 4 * 8;
    c->qs_cnt_n = (size_t)c->n_sm * 2;
    CUDA_CHECK(cudaMalloc((void **)&c->qs_part, c->qs_part_n * sizeof(float)));
    CUDA_CHECK(cudaMalloc((void **)&c->qs_cnt, c->qs_cnt_n * sizeof(unsigned)));
    CUDA_CHECK(cudaMemset(c->qs_cnt, 0, c->qs_cnt_n * sizeof(unsigned)));
    CUDA_CHECK(cudaMalloc((void **)&c->tq_dev, TOP_QUEUE_WORDS * sizeof(unsigned long long)));
    CUDA_CHECK(cudaMallocHost(&c->tq_host, TOP_QUEUE_HOST));
    c->blas_rows = br ? G3N_MAX(2, atoi(br)) : 3; /* measured: docs/SPEED.md, seventh session */
    c->blas_bytes = (size_t)(bm ? G3N_MAX(0, atoi(bm)) : 16) << 20;
    const char *bmm = getenv("G3N_BMMA_MB"); /* for timing */
    c->bmma_bytes = (size_t)(bmm ? G3N_MAX(0, atoi(bmm)) : 16) << 20;
    /* k_bmma from 9 rows (k_gemv2 was faster at 2-8: -0.6 to -6% with k_bmma) to 32
     * (past 16 in passes of 16 rows; cuBLAS was slower at 24 and 32: docs/SPEED.md,
     * thirty-third session) */
    const char *bmr = getenv("G3N_BMMA_ROWS");
    if (!bmr || sscanf(bmr, "%d,%d", &c->bmma_lo, &c->bmma_hi) != 2) c->bmma_lo = 9, c->bmma_hi = 32;
    const char *g2 = getenv("G3N_GEMV2_ROWS"), *g2w = getenv("G3N_GEMV2W_ROWS"); /* for timing: 9 never */
    c->gemv2_rows = g2 ? G3N_MAX(2, atoi(g2)) : 2;
    c->gemv2w_rows = g2w ? G3N_MAX(2, atoi(g2w)) : 2;
    const char *spr = getenv("G3N_SP_ROWS"); /* for timing */
    c->sp_rows = spr ? G3N_MIN(G3N_MAX(atoi(spr), 1), 8) : 8;
    /* G3N_STAGE_ZC=0, G3N_KV_SKIP=0: a decode step copies its host-table rows and
     * its caches' table as a prompt does (comparisons; docs/SPEED.md, fifteenth session) */
    c->stage_zc = !(getenv("G3N_STAGE_ZC") && !atoi(getenv("G3N_STAGE_ZC")));
    c->kv_skip = !(getenv("G3N_KV_SKIP") && !atoi(getenv("G3N_KV_SKIP")));
    c->graph_first = getenv("G3N_GRAPH_FIRST") && atoi(getenv("G3N_GRAPH_FIRST"));
    const char *mg = getenv("G3N_GRAPHS"); /* fewer recorded steps kept (tests: eviction) */
    c->max_graphs = mg ? G3N_MIN(G3N_MAX(atoi(mg), 1), CUDA_MAX_GRAPHS) : CUDA_MAX_GRAPHS;
    const char *pf = getenv("G3N_PF");
    c->pf_on = !(pf && strcmp(pf, "0") == 0);
    c->l2_bytes = (size_t)prop.l2CacheSize;
    const char *pp = getenv("G3N_PF_PART");
    /* 5/8 of the L2 at 8 bits too, since their products' copies ask the L2 to
     * evict the weights first (cp_async16w): tg128 E4B 8-bit 421.9 -> 437.6 tok/s
     * against 1/6 (the sixteenth session's share), E2B 8-bit 579.5 -> 581.2
     * (docs/SPEED.md, twenty-seventh session) */
    const size_t share = c->l2_bytes / 8 * 5;
    c->pf_part = pp ? (size_t)G3N_MAX(0, atoi(pp)) << 20 : share;
    const char *pp16 = getenv("G3N_PF_PART16"), *pl = getenv("G3N_PF_LATE");
    c->pf_part16 = pp16 ? (size_t)G3N_MAX(0, atoi(pp16)) << 20 : share; /* cuda_pf_release says why */
    c->pf_late = !(pl && !atoi(pl));
    const char *sk = getenv("G3N_CUDA_SKIP");
    if (sk) snprintf(c->skip, sizeof c->skip, "%s", sk);
    const char *pe = getenv("G3N_CUDA_PROFILE");
    if (pe && *pe && strcmp(pe, "0") != 0) {
        c->profile = 1;
        c->no_graph = 1;
        CUDA_CHECK(cudaEventCreate(&c->ev0));
        CUDA_CHECK(cudaEventCreate(&c->ev1));
    }
    be->ctx = c;
    be->name = "cuda";
    snprintf(be->device_name, sizeof be->device_name, "%.95s", prop.name);
    be->n_threads = 1;
    be->alloc = cu_alloc;
    be->free = cu_free;
    be->write = cu_write;
    be->read = cu_read;
    be->host_alloc = cu_host_alloc;
    be->host_free = cu_host_free;
    be->mat_prepare = cu_mat_prepare;
    be->destroy = cu_destroy;
    be->read_bandwidth = cuda_read_bandwidth;
    be->batch_set = cu_batch_set;
    be->graph_begin = cu_graph_begin;
    be->graph_end = cu_graph_end;
    be->sync = cu_sync;
    be->device_memory_used = cu_memory_used;
    be->matmul = cuda_op_matmul;
    be->embed = cuda_op_embed;
    be->rmsnorm = cuda_op_rmsnorm;
    be->rope = cuda_op_rope;
    be->kv_store = cuda_op_kv_store;
    be->attention = cuda_op_attention;
    be->add = cuda_op_add;
    be->scale = cuda_op_scale;
    be->add3_scale = cuda_op_add3_scale;
    be->mul_vec = cuda_op_mul_vec;
    be->gelu_mul = cuda_op_gelu_mul;
    be->gaussian_topk = cuda_op_gaussian_topk;
    be->tanh_ = cuda_op_tanh;
    be->softcap = cuda_op_softcap;
    be->altup_predict = cuda_op_altup_predict;
    be->altup_correct = cuda_op_altup_correct;
    be->magnitude_match = cuda_op_magnitude_match;
    be->ple_combine = cuda_op_ple_combine;
    be->matmul_multi = cuda_op_matmul_multi;
    be->altup_predict_fused = cuda_op_altup_predict_fused;
    be->matmul_gelu_mul = cuda_op_matmul_gelu_mul;
    be->matmul_gate_up = cuda_op_matmul_gate_up;
    be->qkv_post = cuda_op_qkv_post;
    be->qkv_attention = cuda_op_qkv_attention;
    be->attn_residual = cuda_op_attn_residual;
    be->mlp_act = cuda_op_mlp_act;
    be->mlp_sparse = cuda_op_mlp_sparse;
    be->altup_correct_fused = cuda_op_altup_correct_fused;
    be->altup_correct_gate = cuda_op_altup_correct_gate;
    /* G3N_PARTS=0: the down product adds its K slices itself (timing) */
    be->matmul_parts = getenv("G3N_PARTS") && !atoi(getenv("G3N_PARTS")) ? NULL : cu_matmul_parts;
    be->ple_add = cuda_op_ple_add;
    const char *ue = getenv("G3N_ALTUP_FUSED"); /* 0: the planes made and collapsed by the basic ops (comparisons) */
    const int altup_fused = !(ue && strcmp(ue, "0") == 0);
    be->altup_unembed = altup_fused ? cuda_op_altup_unembed : NULL;
    be->magnitude_match_planes = altup_fused ? cuda_op_magnitude_match_planes : NULL;
    be->decode_layers = cuda_op_decode_layers;
    be->logits_top = cuda_op_logits_top;
    be->logits_top_queue = cuda_op_logits_top_queue;
    be->unembed_prepare = cuda_op_unembed_prepare;
    be->logits_pruned = cuda_op_logits_pruned;
    be->prefetch = cu_prefetch;
    be->attention_next = cu_attention_next;
    return be;
}

int cuda_skipped(cuda_ctx *c, const void *kernel) {
    const char *name = NULL;
    if (cudaFuncGetName(&name, kernel) != cudaSuccess || !name) return 0;
    char list[sizeof c->skip];
    memcpy(list, c->skip, sizeof list);
    for (char *save = NULL, *t = strtok_r(list, ",", &save); t; t = strtok_r(NULL, ",", &save))
        if (*t && strstr(name, t)) return 1;
    return 0;
}
