/* test_ops.c: every op of every built backend against the reference backend
 * (cpu_ref.c): the fast CPU backend under each kernel set this machine has
 * (scalar, AVX2, AVX-512) and, in a CUDA build on a machine with a GPU, the CUDA
 * backend. Awkward shapes (1, odd, not multiples of 4/8/16/32), every weight
 * dtype, outputs poisoned with NaN first so an unwritten element fails. Plus a
 * few reference ops against values computed here, so the oracle is checked too,
 * and the CPU kernel property the model tests rely on: a row gives bitwise the
 * same output alone as inside a block of rows. */
#define _POSIX_C_SOURCE 200809L /* setenv */
#include <float.h>
#include <math.h>
#include <stdarg.h>

#include "test.h"

#include "backend/cpu/cpu_internal.h"
#include "quant.h"

static g3n_backend *REF, *B; /* reference, backend under test */
static double TOL = 2e-6;    /* relative L2 for B vs REF (looser on the GPU) */
static int B_IS_CPU;

static float *rnd(size_t n, float scale) {
    float *p = malloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) p[i] = test_randf() * scale;
    return p;
}

/* A copy of host floats in B's memory. */
static float *dev(const float *h, size_t n) {
    float *d = B->alloc(B, sizeof(float) * (n ? n : 1));
    if (n) B->write(B, d, h, sizeof(float) * n);
    return d;
}

/* B's memory poisoned with NaN. */
static float *dev_nan(size_t n) {
    float *h = malloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) h[i] = NAN;
    float *d = dev(h, n);
    free(h);
    return d;
}

static float *host(const float *d, size_t n) {
    float *h = malloc(sizeof(float) * (n ? n : 1));
    if (n) B->read(B, h, d, sizeof(float) * n);
    return h;
}

/* Dot-product results: each |got - ref| within tol * sum_k |W[o,k] x[r,k]| (the
 * scale of float rounding in a sum), so outputs that cancel to near zero are
 * judged by the size of their terms, not by their own size; NaN never passes. */
static void check_dots(const char *what, const float *got, const float *ref, const g3n_mat *W,
                       const float *x, int R, double tol) {
    float *row = malloc(sizeof(float) * (size_t)(W->cols ? W->cols : 1));
    int bad = 0;
    for (int o = 0; o < W->rows; o++) {
        g3n_mat_row(W, o, row);
        for (int r = 0; r < R; r++) {
            double scale = 0;
            for (int k = 0; k < W->cols; k++) scale += fabs((double)row[k] * x[(size_t)r * W->cols + k]);
            double d = fabs((double)got[(size_t)r * W->rows + o] - ref[(size_t)r * W->rows + o]);
            if (!(d <= tol * scale + 1e-30)) {
                if (bad++ < 3)
                    printf("  %s [r%d o%d]: got %.9g want %.9g (term scale %.3g)\n", what, r, o,
                           got[(size_t)r * W->rows + o], ref[(size_t)r * W->rows + o], scale);
            }
        }
    }
    if (bad) test_cur_failed = 1;
    free(row);
}

/* Compare B's result (device d) with the reference (host ref); frees d. */
/* k times the RMS of ref[0..n): an absolute bound for outputs that are sums of
 * terms about as large as the outputs, where one output may cancel to near zero
 * and keep the terms' rounding */
static double rms_tol(const float *ref, size_t n, double k) {
    double ss = 0;
    for (size_t i = 0; i < n; i++) ss += (double)ref[i] * ref[i];
    return n ? k * sqrt(ss / (double)n) : 0;
}

static void cmp(const char *what, float *d, const float *ref, size_t n, double tol, double abs_tol) {
    float *h = host(d, n);
    test_close(what, h, ref, n, tol, abs_tol);
    free(h);
    B->free(B, d);
}

/* f16 K/V caches: x rounded to f16; device bytes; and a device f16 array
 * against host halves, both widened (frees d) */
static uint16_t *f16_of(const float *x, size_t n) {
    uint16_t *h = malloc(2 * (n ? n : 1));
    for (size_t i = 0; i < n; i++) h[i] = g3n_f32_to_f16(x[i]);
    return h;
}
static void *dev_bytes(const void *h, size_t bytes) {
    void *d = B->alloc(B, bytes ? bytes : 1);
    if (bytes) B->write(B, d, h, bytes);
    return d;
}
static void cmp16(const char *what, void *d, const uint16_t *ref, size_t n, double tol, double abs_tol) {
    uint16_t *h = malloc(2 * (n ? n : 1));
    float *a = malloc(4 * (n ? n : 1)), *b = malloc(4 * (n ? n : 1));
    if (n) B->read(B, h, d, 2 * n);
    for (size_t i = 0; i < n; i++) a[i] = g3n_f16_to_f32(h[i]), b[i] = g3n_f16_to_f32(ref[i]);
    test_close(what, a, b, n, tol, abs_tol);
    free(h), free(a), free(b);
    B->free(B, d);
}
static int KV16; /* the attention cases below with f16 caches (both backends) */

/* Weight matrix of random values stored as dtype, prepared for REF and for B. */
typedef struct {
    g3n_mat ref, b;
    void *mem;
} tmat;

static tmat make_mat_ex(int dtype, int rows, int cols, int host_gather, int sparse_cols);
static tmat make_mat(int dtype, int rows, int cols, int host_gather) {
    return make_mat_ex(dtype, rows, cols, host_gather, 0);
}

/* Quantized (mlx affine) matrix of random weights: packed rows, then scales,
 * then biases (dtype sdtype) in one allocation, t.mem. */
static tmat make_qmat_ex(int bits, int group, int sdtype, int rows, int cols, int host_gather,
                         int sparse_cols, int row_kernel) {
    const size_t words = g3n_quant_row_words(cols, bits), ng = (size_t)(cols / group);
    const size_t es = g3n_dtype_size((g3n_dtype)sdtype);
    char *mem = malloc(4 * words * rows + 2 * es * ng * rows);
    uint32_t *q = (uint32_t *)mem;
    char *sc = mem + 4 * words * rows, *bi = sc + es * ng * rows;
    float *w = rnd((size_t)cols, 1.0f), *fs = malloc(4 * ng), *fb = malloc(4 * ng);
    for (int r = 0; r < rows; r++) {
        for (int c = 0; c < cols; c++) w[c] = test_randf();
        for (int c = 0; c < group; c++) { /* now and then a constant, an all-negative, an all-positive group */
            if (r % 10 == 3) w[c] = r % 20 == 3 ? 0.25f : -0.25f;
            if (r % 10 == 6) w[cols - 1 - c] = -fabsf(w[cols - 1 - c]);
            if (r % 10 == 9) w[cols - 1 - c] = fabsf(w[cols - 1 - c]);
        }
        g3n_quantize_row(w, cols, bits, group, q + r * words, fs, fb);
        for (size_t g = 0; g < ng; g++) {
            const size_t i = r * ng + g;
            if (sdtype == G3N_F32) ((float *)sc)[i] = fs[g], ((float *)bi)[i] = fb[g];
            else if (sdtype == G3N_BF16)
                ((uint16_t *)sc)[i] = g3n_f32_to_bf16(fs[g]), ((uint16_t *)bi)[i] = g3n_f32_to_bf16(fb[g]);
            else ((uint16_t *)sc)[i] = g3n_f32_to_f16(fs[g]), ((uint16_t *)bi)[i] = g3n_f32_to_f16(fb[g]);
        }
    }
    free(w), free(fs), free(fb);
    tmat t;
    t.mem = mem;
    g3n_mat m = {G3N_U32, rows, cols, q, "qtest", host_gather, sparse_cols, 0, 0, 0, 0, NULL, NULL, 0, 0, NULL};
    m.bits = bits, m.group_size = group, m.sdtype = sdtype, m.scales = sc, m.biases = bi;
    m.row_kernel = row_kernel;
    t.ref = t.b = m;
    char err[256];
    CHECK_MSG(B->mat_prepare(B, &t.b, err, sizeof err) == 0, "%s", err);
    return t;
}

static void test_fused_ops(void);

/* When QBITS is set, the fused-op tests build their bf16 matrices quantized. */
static int QBITS;

/* sparse_cols: the backend may store it transposed (exact sparsity) */
static tmat make_mat_ex(int dtype, int rows, int cols, int host_gather, int sparse_cols) {
    size_t n = (size_t)rows * cols;
    tmat t;
    if (QBITS && dtype == G3N_BF16 && cols % 32 == 0)
        return make_qmat_ex(QBITS, 32, G3N_BF16, rows, cols, host_gather, sparse_cols, rows <= 8);
    if (dtype == G3N_F32) {
        t.mem = rnd(n, 1.0f);
    } else {
        uint16_t *p = malloc(2 * (n ? n : 1));
        for (size_t i = 0; i < n; i++)
            p[i] = dtype == G3N_BF16 ? g3n_f32_to_bf16(test_randf()) : g3n_f32_to_f16(test_randf());
        t.mem = p;
    }
    g3n_mat m = {dtype, rows, cols, t.mem, "test", host_gather, sparse_cols, 0, 0, 0, 0, NULL, NULL, 0, 0, NULL};
    t.ref = t.b = m;
    char err[256];
    CHECK(B->mat_prepare(B, &t.b, err, sizeof err) == 0);
    return t;
}

static const int DTYPES[3] = {G3N_F32, G3N_F16, G3N_BF16};

/* Host memory a backend may keep reading until it is destroyed. */
static void *KEEP[64];
static int n_keep;
static void keep_alive(void *p) {
    G3N_ASSERT(n_keep < 64);
    KEEP[n_keep++] = p;
}
static void release_kept(void) {
    while (n_keep) free(KEEP[--n_keep]);
}

/* B's product of W (R rows of random x) against the reference; on the CPU also a
 * row alone == the same row inside the block, bit for bit. Frees W's memory. */
static void check_matmul(const char *what, tmat *W, int R) {
    const int O = W->ref.rows, K = W->ref.cols;
    float *x = rnd((size_t)R * K, 2.0f), *y0 = malloc(4 * (size_t)R * O);
    float *dx = dev(x, (size_t)R * K), *dy = dev_nan((size_t)R * O);
    REF->matmul(REF, y0, &W->ref, x, R);
    B->matmul(B, dy, &W->b, dx, R);
    float *y1 = host(dy, (size_t)R * O);
    check_dots(what, y1, y0, &W->ref, x, R, 2e-6);
    if (B_IS_CPU) { /* every row as it comes alone, whichever tile (6, 4 or 1 rows) took it in the block */
        float *y2 = malloc(4 * (size_t)O);
        for (int r = 0; r < R; r++) {
            B->matmul(B, y2, &W->b, x + (size_t)r * K, 1);
            CHECK_MSG(memcmp(y2, y1 + (size_t)r * O, 4 * (size_t)O) == 0, "%s: row %d differs alone", what, r);
        }
        free(y2);
    }
    free(y1), B->free(B, dy), B->free(B, dx), free(W->mem), free(x), free(y0);
}

TEST(matmul) {
    int rows_s[] = {1, 2, 3, 4, 5, 6, 7, 9, 12, 17};
    int out_s[] = {1, 3, 4, 5, 17, 33};
    int in_s[] = {1, 7, 8, 15, 16, 17, 31, 33, 64, 96, 100, 256, 257, 1032};
    for (int d = 0; d < 3; d++)
        for (size_t a = 0; a < sizeof rows_s / sizeof *rows_s; a++)
            for (size_t b = 0; b < sizeof out_s / sizeof *out_s; b++)
                for (size_t c = 0; c < sizeof in_s / sizeof *in_s; c++) {
                    int R = rows_s[a], O = out_s[b], K = in_s[c];
                    tmat W = make_mat(DTYPES[d], O, K, 0);
                    char what[96];
                    snprintf(what, sizeof what, "matmul %s R%d O%d K%d", g3n_dtype_name(DTYPES[d]), R, O, K);
                    check_matmul(what, &W, R);
                }
}

/* W[0..2] in one matmul_multi call, each with its own R rows of random input
 * (product 2 takes product 0's where their K are equal: an input several
 * products share, as q/k/v's), against the reference (check_dots, labelled
 * "what O.. K.."); product 0's input stays for the caller's epilogues in *x0
 * (host) and *dx0 (backend), which the caller frees. */
static void check_multi3(const char *what, tmat W[3], int R, float **x0, float **dx0) {
    float *x[3], *dx[3], *y0[3], *dy[3];
    const g3n_mat *Wr[3], *Wb[3];
    const int share = W[2].ref.cols == W[0].ref.cols;
    for (int i = 0; i < 3; i++) {
        const int O = W[i].ref.rows, K = W[i].ref.cols;
        if (i == 2 && share) x[i] = x[0], dx[i] = dx[0];
        else x[i] = rnd((size_t)R * K, 2.0f), dx[i] = dev(x[i], (size_t)R * K);
        y0[i] = malloc(4 * (size_t)R * O), dy[i] = dev_nan((size_t)R * O);
        Wr[i] = &W[i].ref, Wb[i] = &W[i].b;
    }
    const float *xr[3] = {x[0], x[1], x[2]}, *xb[3] = {dx[0], dx[1], dx[2]};
    REF->matmul_multi(REF, 3, Wr, y0, xr, R);
    B->matmul_multi(B, 3, Wb, dy, xb, R);
    for (int i = 0; i < 3; i++) {
        const int O = W[i].ref.rows, K = W[i].ref.cols;
        char label[128];
        snprintf(label, sizeof label, "%s O%d K%d", what, O, K);
        float *y1 = host(dy[i], (size_t)R * O);
        check_dots(label, y1, y0[i], &W[i].ref, x[i], R, 2e-6);
        free(y1), free(y0[i]), B->free(B, dy[i]);
        if (i && !(i == 2 && share)) free(x[i]), B->free(B, dx[i]);
    }
    *x0 = x[0], *dx0 = dx[0];
}

/* Several 16-bit products in one call and the gelu * m and gate/up epilogues for
 * 1-8 rows of input (on a GPU, 2-8 rows take two output rows a warp: k_gemv2)
 * and 12-24 (on a GPU bf16 on k_bmma, 24 in two passes; at 13 rows product
 * 2's K of 8 sends all three to cuBLAS, as f16 and gate/up always: one launch
 * splits the inputs, one adds the parts with the epilogue), each product with
 * its own rows, width and input (at even row counts products 0 and 2 share
 * theirs): odd row counts, a product of one row, K of 8 to 2048. */
TEST(matmul_multi_rows) {
    const int rows_s[] = {1, 2, 3, 4, 5, 7, 8, 12, 13, 16, 24};
    for (int d = 1; d < 3; d++) /* f16, bf16 */
        for (size_t a = 0; a < sizeof rows_s / sizeof *rows_s; a++) {
            const int R = rows_s[a], O[3] = {37, 6, 1}, K[3] = {64, 2048, R % 2 ? 8 : 64};
            tmat W[3];
            for (int i = 0; i < 3; i++) W[i] = make_mat(DTYPES[d], O[i], K[i], 0);
            char what[96];
            float *x0, *dx0;
            snprintf(what, sizeof what, "matmul_multi %s R%d", g3n_dtype_name(DTYPES[d]), R);
            check_multi3(what, W, R, &x0, &dx0);
            const size_t n = (size_t)R * O[0];
            float *mm = rnd(n, 1.0f), *dmm = dev(mm, n), *dg = dev_nan(n), *g0 = malloc(4 * n);
            REF->matmul_gelu_mul(REF, g0, &W[0].ref, x0, mm, R);
            B->matmul_gelu_mul(B, dg, &W[0].b, dx0, dmm, R);
            snprintf(what, sizeof what, "matmul_gelu_mul %s R%d", g3n_dtype_name(DTYPES[d]), R);
            cmp(what, dg, g0, n, 1e-5, 1e-5 + rms_tol(g0, n, 1e-5)); /* (cmp frees dg) */
            for (int i = 0; i < 2; i++) { /* gate/up: W[i] as the gate, a matrix of its shape as up */
                tmat Wu = make_mat(DTYPES[d], O[i], K[i], 0);
                const size_t ni = (size_t)R * O[i];
                float *xi = rnd((size_t)R * K[i], 1.0f), *dxi = dev(xi, (size_t)R * K[i]);
                float *a0 = malloc(4 * ni), *u0 = malloc(4 * ni), *da = dev_nan(ni), *du = dev_nan(ni);
                REF->matmul_gate_up(REF, a0, u0, &W[i].ref, &Wu.ref, xi, R);
                B->matmul_gate_up(B, da, du, &W[i].b, &Wu.b, dxi, R);
                snprintf(what, sizeof what, "matmul_gate_up %s O%d K%d R%d", g3n_dtype_name(DTYPES[d]), O[i], K[i], R);
                /* each dot's terms added in another order: rounding ~sqrt(K) * 2^-24 of
                 * the terms' size, and with 6 outputs one that cancels sets the relative
                 * L2 (K 2048, f16, the CPU's AVX2 kernel: 1.6e-5 in one draw) */
                const double tl = 1e-5 * sqrt(K[i] / 64.0);
                cmp(what, da, a0, ni, tl, 1e-5 + rms_tol(a0, ni, tl));
                free(a0), free(u0), free(xi), free(Wu.mem), B->free(B, du), B->free(B, dxi);
            }
            free(mm), free(g0), free(x0), B->free(B, dmm), B->free(B, dx0);
            for (int i = 0; i < 3; i++) free(W[i].mem);
        }
}

/* Quantized products: every bit width and group size the loader accepts, each
 * scale dtype, awkward row/output counts; on the CPU also bitwise row-alone ==
 * row-in-block (the decode kernels dequantize in registers, the prompt path
 * dequantizes whole rows first). */
TEST(qmatmul) {
    const int bits_s[] = {2, 3, 4, 5, 6, 8}, groups[] = {32, 64, 128}, sdt[] = {G3N_BF16, G3N_F16, G3N_F32};
    const int rows_s[] = {1, 2, 3, 5, 9, 12}, out_s[] = {1, 5, 17};
    for (int bi = 0; bi < 6; bi++)
        for (int gi = 0; gi < 3; gi++)
            for (int a = 0; a < 6; a++)
                for (int b = 0; b < 3; b++) {
                    const int R = rows_s[a], O = out_s[b], K = groups[gi] * (1 + (a + b) % 3);
                    const int sd = sdt[(bi + gi + a) % 3];
                    tmat W = make_qmat_ex(bits_s[bi], groups[gi], sd, O, K, 0, 0, 0);
                    char what[96];
                    snprintf(what, sizeof what, "qmatmul b%d g%d %s R%d O%d K%d", bits_s[bi], groups[gi],
                             g3n_dtype_name(sd), R, O, K);
                    check_matmul(what, &W, R);
                }
}

/* E2B/E4B decode shapes quantized, 1, 3 and 16 rows, and a prompt-sized product. */
TEST(qmatmul_large) {
    const int shapes[][2] = {{2048, 2048}, {16384, 2048}, {2048, 16384}, {8960, 2048}, {4, 2048}, {2048, 64}};
    const int bits_s[] = {4, 8}, rows_s[] = {1, 3, 16, 33};
    /* a prompt-sized step first: a GPU sizes its activation-split buffer there, which
     * its prompt products (R 33: dequantized bf16 hi + lo on the tensor cores, and
     * G3N_QBLAS_F32=1 the f32 fallback) need */
    int32_t ids[33] = {0}, pos[33], seq[33] = {0};
    for (int t = 0; t < 33; t++) pos[t] = t;
    g3n_batch bt = {33, ids, pos, seq, NULL, 1};
    REF->batch_set(REF, &bt);
    B->batch_set(B, &bt);
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++)
        for (int bi = 0; bi < 2; bi++)
            for (int ri = 0; ri < 4; ri++)
                for (int f32 = 0; f32 < (rows_s[ri] > 32 ? 2 : 1); f32++) {
                    const int O = shapes[s][0], K = shapes[s][1], R = rows_s[ri];
                    if (R > 3 && B_IS_CPU) continue; /* (the GPU's larger shapes take tiles of rows or columns) */
                    /* (R 16: a batched step, two passes of 8 rows on a GPU) */
                    tmat W = make_qmat_ex(bits_s[bi], 64, G3N_BF16, O, K, 0, 0, 0);
                    float *x = rnd((size_t)R * K, 1.0f), *y0 = malloc(4 * (size_t)R * O);
                    float *dx = dev(x, (size_t)R * K), *dy = dev_nan((size_t)R * O);
                    REF->matmul(REF, y0, &W.ref, x, R);
                    if (f32) setenv("G3N_QBLAS_F32", "1", 1);
                    B->matmul(B, dy, &W.b, dx, R);
                    unsetenv("G3N_QBLAS_F32");
                    char what[64];
                    snprintf(what, sizeof what, "qmatmul q%d %dx%d R%d%s", bits_s[bi], O, K, R, f32 ? " f32" : "");
                    float *y1 = host(dy, (size_t)R * O);
                    check_dots(what, y1, y0, &W.ref, x, R, 2e-6);
                    free(y1), B->free(B, dy), B->free(B, dx), free(W.mem), free(x), free(y0);
                }
}

/* One product of R rows of a bits-bit O x K matrix, run with env var `var` at
 * v0 and then at v1: the same bits (CHECK, labelled with var). */
static void check_env_bitwise(const char *var, const char *v0, const char *v1, int bits, int O, int K, int R) {
    const size_t n = (size_t)R * O;
    tmat W = make_qmat_ex(bits, 64, G3N_BF16, O, K, 0, 0, 0);
    float *x = rnd((size_t)R * K, 1.0f), *dx = dev(x, (size_t)R * K), *d0 = dev_nan(n), *d1 = dev_nan(n);
    setenv(var, v0, 1);
    B->matmul(B, d0, &W.b, dx, R);
    setenv(var, v1, 1);
    B->matmul(B, d1, &W.b, dx, R);
    unsetenv(var);
    float *h0 = host(d0, n), *h1 = host(d1, n);
    CHECK_MSG(memcmp(h0, h1, 4 * n) == 0, "q%d %dx%d R%d: %s=%s and %s differ", bits, O, K, R, var, v0, v1);
    free(h0), free(h1), free(x), free(W.mem), B->free(B, d0), B->free(B, d1), B->free(B, dx);
}

/* A GPU's K slices added in a cluster or through memory (G3N_QFLAT) give the
 * same bits: both add the slices' sums in slice order. E4B's and E2B's 4-bit
 * down shapes (the second flat only when every split product is), one row
 * (more take the tensor-core kernel). On the CPU backends both runs are the
 * same code. */
TEST(qmatmul_flat_bitwise) {
    check_env_bitwise("G3N_QFLAT", "0", "1", 4, 2048, 16384, 1);
    check_env_bitwise("G3N_QFLAT", "0", "2", 4, 2048, 8192, 1);
}

/* The same for the tensor-core kernel's K slices (G3N_MMFLAT: 0 in a cluster, 2
 * through memory, in the kernel's flat instantiations): E4B's and E2B's down
 * shapes at 4 and 8 bits in batched steps' row counts (one row at 8 bits: 4-bit
 * rows take k_qgemv_s; 9-16 rows two passes), and an odd one. */
TEST(qmatmul_mmflat_bitwise) {
    const struct { int O, K, bits, R; } cs[] = {{2048, 16384, 8, 3}, {2048, 8192, 8, 8},  {2048, 16384, 4, 8},
                                                {2048, 8192, 4, 4},  {300, 16384, 4, 5},  {2048, 16384, 8, 1},
                                                {2048, 8192, 8, 2},  {2048, 16384, 4, 2}, {2048, 16384, 4, 16},
                                                {2048, 8192, 8, 12}, {300, 16384, 4, 9}};
    for (size_t t = 0; t < sizeof cs / sizeof *cs; t++)
        check_env_bitwise("G3N_MMFLAT", "0", "2", cs[t].bits, cs[t].O, cs[t].K, cs[t].R);
}

/* matmul_parts (where a backend has it): the parts added in order on the host
 * are matmul's result bit for bit, on E4B's and E2B's 4-bit down shapes (split
 * over K into 8 and 4 slices on the H100), their 8-bit ones (the tensor-core
 * kernel's slices), and shapes that are not split (a short K, 3 rows); and
 * near the reference, also where the product is split into more slices than
 * the caller keeps (cap 2). */
TEST(matmul_parts) {
    if (!B->matmul_parts) return;
    const struct { int O, K, bits, G, sdt, R, cap; } cs[] = {
        {2048, 16384, 4, 64, G3N_BF16, 1, 8}, {2048, 8192, 4, 64, G3N_BF16, 1, 8}, {37, 16384, 4, 32, G3N_F16, 1, 8},
        {2048, 16384, 4, 64, G3N_BF16, 1, 2}, {300, 2048, 4, 64, G3N_BF16, 1, 8}, {2048, 8192, 8, 64, G3N_BF16, 1, 8},
        {2048, 8192, 4, 64, G3N_BF16, 3, 8}, {2048, 16384, 8, 64, G3N_BF16, 1, 8}};
    for (size_t t = 0; t < sizeof cs / sizeof *cs; t++) {
        const int O = cs[t].O, K = cs[t].K, R = cs[t].R, cap = cs[t].cap;
        const size_t n = (size_t)R * O;
        tmat W = make_qmat_ex(cs[t].bits, cs[t].G, cs[t].sdt, O, K, 0, 0, 0);
        float *x = rnd((size_t)R * K, 1.0f), *dx = dev(x, (size_t)R * K), *ref = malloc(4 * n);
        float *d0 = dev_nan(n), *dp = dev_nan(n * cap);
        REF->matmul(REF, ref, &W.ref, x, R);
        B->matmul(B, d0, &W.b, dx, R);
        const int np = B->matmul_parts(B, dp, &W.b, dx, R, cap);
        CHECK_MSG(np >= 1 && np <= cap, "parts %dx%d: %d parts, cap %d", O, K, np, cap);
        float *h0 = host(d0, n), *hp = host(dp, n * (size_t)np);
        for (int k = 1; k < np; k++)
            for (size_t i = 0; i < n; i++) hp[i] += hp[k * n + i];
        if (t < 2 && !B_IS_CPU) CHECK_MSG(np > 1, "parts %dx%d: not split", O, K);
        if (cap == 8) /* (cap 2 splits E4B's K in 2, where matmul splits it in 8) */
            CHECK_MSG(memcmp(h0, hp, 4 * n) == 0, "parts %dx%d q%d R%d (%d parts): not matmul's bits", O, K,
                      cs[t].bits, R, np);
        char what[64];
        snprintf(what, sizeof what, "matmul_parts %dx%d q%d R%d", O, K, cs[t].bits, R);
        cmp(what, dev(hp, n), ref, n, 1e-4, rms_tol(ref, n, 1e-5)); /* (frees the copy) */
        free(h0), free(hp), free(x), free(ref), free(W.mem);
        B->free(B, d0), B->free(B, dp), B->free(B, dx);
    }
}

/* 4- and 8-bit decode products in the shapes the tiled GPU kernels (4 or 16 output
 * rows per warp, several warps per row) find awkward: output counts not a multiple
 * of 4 or 16, several products of different shapes in one launch, long rows (more
 * than one batch of loads per lane), odd and even numbers of groups per row, 1-8
 * activation rows and batched steps of 13 and 32 (8 at a time), the fused
 * epilogues. */
TEST(qmatmul_fused_odd) {
    const int groups[] = {32, 64, 128}, sdt[] = {G3N_BF16, G3N_F16, G3N_F32}, rows_s[] = {1, 2, 3, 5, 8, 13, 32};
    for (int bits = 4; bits <= 8; bits += 4)
        for (int gi = 0; gi < 3; gi++)
            for (int a = 0; a < 7; a++) {
                const int R = rows_s[a], G = groups[gi], sd = sdt[(gi + a) % 3];
                if (B_IS_CPU && a > 1) continue;
                /* three products: O 37 / 6 / 1, K 3G / 16384 / G or 2G / 16384 / 2G (x shared by 0
                 * and 2 only if equal K): an odd number of groups in a row, which the tensor-core
                 * kernel declines, or even ones everywhere, which it takes (8 bits; 2-8 rows at 4) */
                const int odd = (gi + a) % 2, O[3] = {37, 6, 1}, K[3] = {(2 + odd) * G, 16384, (2 - odd) * G};
                tmat W[3];
                for (int i = 0; i < 3; i++) W[i] = make_qmat_ex(bits, G, sd, O[i], K[i], 0, 0, 0);
                float *x0, *dx0;
                {
                    char what[96];
                    snprintf(what, sizeof what, "qmatmul_multi q%d g%d %s R%d", bits, G, g3n_dtype_name(sd), R);
                    check_multi3(what, W, R, &x0, &dx0);
                }
                /* epilogues on product 0's shape (37 rows) */
                {
                    tmat Wu = make_qmat_ex(bits, G, sd, O[0], K[0], 0, 0, 0);
                    const size_t n = (size_t)R * O[0];
                    float *mm = rnd(n, 1.0f), *dmm = dev(mm, n), *g0 = malloc(4 * n), *u0 = malloc(4 * n);
                    float *dg = dev_nan(n), *du = dev_nan(n);
                    char what[96];
                    REF->matmul_gelu_mul(REF, g0, &W[0].ref, x0, mm, R);
                    B->matmul_gelu_mul(B, dg, &W[0].b, dx0, dmm, R);
                    snprintf(what, sizeof what, "qmatmul_gelu_mul q%d g%d R%d", bits, G, R);
                    cmp(what, dg, g0, n, 1e-5, 2e-3); /* terms up to ~1e3: float rounding ~1e-4 */
                    REF->matmul_gate_up(REF, g0, u0, &W[0].ref, &Wu.ref, x0, R);
                    B->matmul_gate_up(B, dg = dev_nan(n), du, &W[0].b, &Wu.b, dx0, R);
                    snprintf(what, sizeof what, "qmatmul_gate_up q%d g%d R%d", bits, G, R);
                    cmp(what, dg, g0, n, 1e-5, 2e-3); /* terms up to ~1e3: float rounding ~1e-4 */
                    free(Wu.mem), free(mm), free(g0), free(u0), B->free(B, dmm), B->free(B, du);
                }
                free(x0), B->free(B, dx0);
                for (int i = 0; i < 3; i++) free(W[i].mem);
            }
}

/* Quantized embedding rows (device table and host-gathered), exact; a decode
 * step's 4 rows and a prompt's 12 (a GPU may stage the two differently). */
TEST(qembed) {
    int32_t ids[12] = {3, 0, 70, 11, 63, 5, 5, 40, 1, 2, 62, 9}, z[12] = {0};
    for (int hg = 0; hg < 2; hg++)
        for (int bits = 2; bits <= 8; bits += bits == 6 ? 2 : 1)
            for (int nt = 4; nt <= 12; nt += 8) {
                g3n_batch bt = {nt, ids, z, z, NULL, 1};
                tmat W = make_qmat_ex(bits, 64, bits & 1 ? G3N_F16 : G3N_BF16, 64, 192, hg, 0, 0);
                float *y0 = malloc(4 * (size_t)nt * 192), *dy = dev_nan((size_t)nt * 192);
                REF->batch_set(REF, &bt);
                B->batch_set(B, &bt);
                REF->embed(REF, y0, &W.ref, 3.0f);
                B->embed(B, dy, &W.b, 3.0f);
                char what[48];
                snprintf(what, sizeof what, "qembed b%d host_gather %d rows %d", bits, hg, nt);
                cmp(what, dy, y0, (size_t)nt * 192, 0, 0);
                free(y0);
                if (hg) keep_alive(W.mem);
                else free(W.mem);
            }
}

TEST(fused_ops_q4) {
    QBITS = 4;
    test_fused_ops();
    QBITS = 0;
}

TEST(fused_ops_q8) {
    QBITS = 8;
    test_fused_ops();
    QBITS = 0;
}

/* The large shapes of E2B/E4B decode, one and two rows (a batched step of two:
 * on a GPU two output rows a warp): the GPU kernels' real sizes. */
TEST(matmul_large) {
    int shapes[][2] = {{2048, 2048}, {16384, 2048}, {2048, 16384}, {8960, 2048}, {4, 2048}, {64, 2048}, {2048, 64}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++)
        for (int R = 1; R <= 2; R++) {
            int O = shapes[s][0], K = shapes[s][1];
            tmat W = make_mat(G3N_BF16, O, K, 0);
            float *x = rnd((size_t)R * K, 1.0f), *y0 = malloc(4 * (size_t)R * O);
            float *dx = dev(x, (size_t)R * K), *dy = dev_nan((size_t)R * O);
            REF->matmul(REF, y0, &W.ref, x, R);
            B->matmul(B, dy, &W.b, dx, R);
            char what[64];
            snprintf(what, sizeof what, "matmul bf16 %dx%d R%d", O, K, R);
            float *y1 = host(dy, (size_t)R * O);
            check_dots(what, y1, y0, &W.ref, x, R, 2e-6);
            free(y1);
            B->free(B, dy);
            B->free(B, dx), free(W.mem), free(x), free(y0);
        }
}

/* Logits through the backend's cheaper copy of the LM head for a reader of
 * each row's best m (logits_pruned): every logit it computes is a one-row
 * matmul-then-softcap's, bit for bit; the best m of the first n and every one
 * equal to the m-th are among them; the rest are -inf; on random rows few are
 * computed; logits_top over the rows gives the whole rows' best m (queued
 * too). Gemma's row count and width and narrow ones, odd row counts, each
 * 16-bit dtype and f32, n below the rows, rows that differ from the best in
 * one weight (near ties) and copies of it (ties), m 1 (greedy), 3 and 65
 * (top-k 64), 1, 2, 3 and G3N_PRUNE_ROWS rows of h at once (a batched step). */
TEST(unembed_pruned) {
    if (!B->unembed_prepare) {
        printf("  (no logits_pruned on this backend)\n");
        return;
    }
    const struct { int dtype, rows, cols, n, kind; } cs[] = {
        {G3N_BF16, 20000, 2048, 20000, 0}, {G3N_BF16, 4099, 2048, 4000, 1}, {G3N_F16, 3001, 256, 3001, 0},
        {G3N_F32, 777, 64, 777, 1},        {G3N_BF16, 1000, 128, 1000, 2},  {G3N_F16, 515, 192, 300, 2},
        {G3N_F16, 262144, 64, 262144, 0},
    };
    const int ms[3] = {1, 3, 65}, hr[4] = {1, 2, 3, G3N_PRUNE_ROWS};
    enum { RMAX = G3N_PRUNE_ROWS };
    float vals[2][RMAX * 65];
    int32_t ids[2][RMAX * 65];
    uint8_t ok[2][RMAX];
    for (size_t ci = 0; ci < sizeof cs / sizeof *cs; ci++) {
        const int dt = cs[ci].dtype, O = cs[ci].rows, K = cs[ci].cols, n = cs[ci].n, kind = cs[ci].kind;
        const size_t N = (size_t)O * K, es = g3n_dtype_size((g3n_dtype)dt);
        float *w = rnd(N, 1.0f);
        const int top = 37 % n; /* a row made large, and its near or exact copies */
        for (int k = 0; k < K; k++) w[(size_t)top * K + k] *= 2.0f;
        for (int r = 100; kind && r < O && r < 140; r++) {
            memcpy(w + (size_t)r * K, w + (size_t)top * K, 4 * (size_t)K);
            if (kind == 1) w[(size_t)r * K + (r * 7) % K] *= 1.01f;
        }
        void *mem = malloc(es * N);
        for (size_t i = 0; i < N; i++) {
            if (dt == G3N_F32) ((float *)mem)[i] = w[i];
            else ((uint16_t *)mem)[i] = dt == G3N_BF16 ? g3n_f32_to_bf16(w[i]) : g3n_f32_to_f16(w[i]);
        }
        g3n_mat W = {dt, O, K, mem, "lm_head test", 0, 0, 0, 0, 0, 0, NULL, NULL, 0, 0, NULL};
        char err[256];
        CHECK_MSG(B->mat_prepare(B, &W, err, sizeof err) == 0, "%s", err);
        const size_t rb = B->unembed_prepare(B, &W);
        CHECK_MSG(rb > 0 && rb < es * N + (size_t)O * K, "case %zu: unembed_prepare gave %zu bytes", ci, rb);
        float *live[18] = {NULL}; /* freed after the case: a queued request names its logits by address */
        for (int pass = 0; pass < 6 && rb; pass++) {
            const float cap = pass % 2 ? 30.0f : 0.0f;
            const int m = ms[pass / 2], nblk = (O + 2047) / 2048; /* (the CUDA copy's blocks of rows) */
            const int R = hr[(ci + (size_t)pass) % 4]; /* rows of h */
            if (m > n) continue;
            float *x = rnd((size_t)R * K, 1.0f + pass % 2);
            float *dx = dev(x, (size_t)R * K), *dfull = dev_nan((size_t)R * O), *dpr = dev_nan((size_t)R * O);
            for (int r = 0; r < R; r++) B->matmul(B, dfull + (size_t)r * O, &W, dx + (size_t)r * K, 1);
            if (cap > 0) B->softcap(B, dfull, (size_t)R * O, cap);
            B->logits_pruned(B, dpr, &W, dx, R, n, m, cap);
            float *full = host(dfull, (size_t)R * O), *pr = host(dpr, (size_t)R * O);
            int *idx = malloc(sizeof(int) * (size_t)n);
            for (int r = 0; r < R; r++) {
                const float *fr = full + (size_t)r * O, *prr = pr + (size_t)r * O;
                test_logit_order(fr, n, idx);
                const float mth = fr[idx[m - 1]];
                int cand = 0, wrong = 0, missed = 0;
                for (int v = 0; v < O; v++) {
                    if (prr[v] == -INFINITY) {
                        missed += v < n && fr[v] >= mth;
                        continue;
                    }
                    cand++;
                    wrong += v >= n || memcmp(&prr[v], &fr[v], 4) != 0;
                }
                CHECK_MSG(!wrong && !missed,
                          "case %zu m %d cap %g row %d of %d: %d logits differ from matmul's, %d of the best left out",
                          ci, m, cap, r, R, wrong, missed);
                /* random rows: the copy's bound leaves a handful for m 1, a few hundred for 65 of 262,144 */
                CHECK_MSG(cand >= m && (kind || m > nblk || cand <= O / 20), "case %zu m %d row %d: %d candidates of %d",
                          ci, m, r, cand, O);
                if (cap == 0 && r == 0) printf("  case %zu m %d (%d rows): %d candidates of %d\n", ci, m, R, cand, O);
            }
            for (int q = 0; q < 2 && B->logits_top; q++) { /* the rows' best m from the pruned rows: plain, queued */
                const float *dl = q ? dpr : dfull;
                CHECK(B->logits_top(B, dl, R, (size_t)O, n, m, vals[q], ids[q], ok[q]));
                for (int r = 0; r < R; r++) CHECK_MSG(ok[q][r], "case %zu m %d: row %d declined", ci, m, r);
            }
            for (int q = 1; q < 2 && B->logits_top_queue && B->logits_top; q++) {
                if (!B->logits_top_queue(B, dpr, R, (size_t)O, n, m)) continue;
                float v2[RMAX * 65];
                int32_t i2[RMAX * 65];
                uint8_t ok2[RMAX] = {0};
                CHECK(B->logits_top(B, dpr, R, (size_t)O, n, m, v2, i2, ok2));
                for (int r = 0; r < R; r++) CHECK(ok2[r]);
                CHECK_MSG(!memcmp(v2, vals[0], 4 * (size_t)(R * m)) && !memcmp(i2, ids[0], 4 * (size_t)(R * m)),
                          "case %zu m %d: queued best of the pruned rows differ", ci, m);
            }
            if (B->logits_top)
                CHECK_MSG(!memcmp(vals[1], vals[0], 4 * (size_t)(R * m)) && !memcmp(ids[1], ids[0], 4 * (size_t)(R * m)),
                          "case %zu m %d: the pruned rows' best differ from the rows'", ci, m);
            free(full), free(pr), free(x), free(idx);
            live[3 * pass] = dx, live[3 * pass + 1] = dfull, live[3 * pass + 2] = dpr;
        }
        for (int i = 0; i < 18; i++)
            if (live[i]) B->free(B, live[i]);
        free(w);
        keep_alive(mem);
    }
}

/* The mlx format itself: packing (mlx's byte-wise extraction for 3, 5, 6 bits
 * written out), quantize -> dequantize error within half a step, the affine
 * endpoint rules (0 exact, constant groups). */
TEST(quant_format) {
    for (int bits = 2; bits <= 8; bits++) {
        if (!g3n_quant_bits_ok(bits)) continue;
        uint32_t packed[8] = {0};
        const int n = 256 / bits / 8 * 8; /* a whole number of 8-value packs */
        uint32_t v[128];
        for (int i = 0; i < n; i++) v[i] = (uint32_t)(i * 7 + 3) & ((1u << bits) - 1);
        for (int i = 0; i < n; i++) { /* LSB-first stream */
            for (int k = 0; k < bits; k++)
                if (v[i] >> k & 1) packed[(i * bits + k) / 32] |= 1u << ((i * bits + k) % 32);
        }
        for (int i = 0; i < n; i++) CHECK(g3n_quant_get(packed, bits, i) == v[i]);
        if (bits == 3) { /* mlx: 8 values in 3 bytes, value 2 = b0[7:6] | b1[0] << 2 */
            const uint8_t *b = (const uint8_t *)packed;
            CHECK(((b[0] & 0xc0) >> 6 | (b[1] & 1) << 2) == v[2]);
            CHECK(((b[1] & 0x80) >> 7 | (b[2] & 3) << 1) == v[5]);
        }
        if (bits == 5) { /* value 4 = b2[7:4] | b3[0] << 4 */
            const uint8_t *b = (const uint8_t *)packed;
            CHECK(((b[2] & 0xf0) >> 4 | (b[3] & 1) << 4) == v[4]);
        }
        if (bits == 6) { /* 4 values in 3 bytes, value 1 = b0[7:6] | b1[3:0] << 2 */
            const uint8_t *b = (const uint8_t *)packed;
            CHECK((((b[0] >> 6) & 3) | (b[1] & 0xf) << 2) == v[1]);
        }
        float w[128], d[128], sc[4], bs[4];
        uint32_t q[32];
        for (int i = 0; i < 128; i++) w[i] = test_randf() * 3;
        for (int i = 0; i < 32; i++) w[64 + i] = -0.5f;             /* constant group */
        for (int i = 0; i < 32; i++) w[96 + i] = fabsf(w[96 + i]) + 1; /* all positive */
        g3n_quantize_row(w, 128, bits, 32, q, sc, bs);
        g3n_dequant_row(q, sc, bs, G3N_F32, bits, 32, 128, d);
        for (int i = 0; i < 128; i++) { /* within half a step, but for the clamped ends (mlx
                                           moves the scale so that 0 is exact, which can push
                                           the far end of a group past 2^bits - 1) */
            const uint32_t qi = g3n_quant_get(q, bits, i);
            if (qi == 0 || qi == (1u << bits) - 1) continue;
            CHECK_MSG(fabsf(d[i] - w[i]) <= fabsf(sc[i / 32]) * 0.5001f + 1e-6f, "b%d w%d %g -> %g (scale %g)",
                      bits, i, w[i], d[i], sc[i / 32]);
        }
        CHECK(d[64] == -0.5f && bs[2] == -0.5f);
        for (int g = 0; g < 3; g++) { /* groups that straddle 0 represent it exactly */
            float zero = -bs[g] / sc[g];
            CHECK(fabsf(zero - roundf(zero)) < 1e-3f);
        }
    }
}

/* cpu_ref's matmul against a sum computed here in long double. */
TEST(matmul_ref_exact) {
    void *mem = malloc(2 * 5 * 37);
    for (int i = 0; i < 5 * 37; i++) ((uint16_t *)mem)[i] = g3n_f32_to_bf16(test_randf());
    g3n_mat W = {G3N_BF16, 5, 37, mem, "w", 0, 0, 0, 0, 0, 0, NULL, NULL, 0, 0, NULL};
    float *x = rnd(2 * 37, 1.0f), y[10];
    REF->matmul(REF, y, &W, x, 2);
    for (int r = 0; r < 2; r++)
        for (int o = 0; o < 5; o++) {
            long double s = 0;
            for (int i = 0; i < 37; i++)
                s += (long double)g3n_bf16_to_f32(((uint16_t *)mem)[o * 37 + i]) * x[r * 37 + i];
            CHECK(fabsl((long double)y[r * 5 + o] - s) < 1e-6L);
        }
    free(mem);
    free(x);
}

TEST(rmsnorm) {
    int rows_s[] = {1, 3, 70};
    int dim_s[] = {1, 5, 16, 33, 256, 257, 2048};
    for (size_t a = 0; a < 3; a++)
        for (size_t b = 0; b < sizeof dim_s / sizeof *dim_s; b++)
            for (int with_w = 0; with_w < 2; with_w++) {
                int R = rows_s[a], N = dim_s[b];
                float *x = rnd((size_t)R * N, 3.0f), *w = rnd((size_t)N, 1.5f), *y0 = malloc(4 * (size_t)R * N);
                float *dx = dev(x, (size_t)R * N), *dw = dev(w, (size_t)N), *dy = dev_nan((size_t)R * N);
                REF->rmsnorm(REF, y0, x, (g3n_vec){N, with_w ? w : NULL}, R, N, 1e-6f);
                B->rmsnorm(B, dy, dx, (g3n_vec){N, with_w ? dw : NULL}, R, N, 1e-6f);
                char what[64];
                snprintf(what, sizeof what, "rmsnorm R%d N%d w%d", R, N, with_w);
                cmp(what, dy, y0, (size_t)R * N, TOL, 1e-6);
                B->rmsnorm(B, dx, dx, (g3n_vec){N, with_w ? dw : NULL}, R, N, 1e-6f); /* in place */
                snprintf(what, sizeof what, "rmsnorm in place R%d N%d w%d", R, N, with_w);
                cmp(what, dx, y0, (size_t)R * N, TOL, 1e-6);
                if (!with_w && N > 8) { /* the reference itself: mean square 1 */
                    double ss = 0;
                    for (int i = 0; i < N; i++) ss += (double)y0[i] * y0[i];
                    CHECK(fabs(ss / N - 1) < 1e-4);
                }
                free(x), free(w), free(y0), B->free(B, dw);
            }
}

/* K/V of two sequences, n query tokens in runs of `per` taken from each in turn
 * at increasing positions (ring wrap, window edges, GQA groups), against the
 * reference. Prompt-sized steps take a GPU's tiled kernel: each case is also
 * run with it forced at every row count per warp and with one key stage. */
static void attention_case(int n_head, int n_head_kv, int hd, int window, int cap, int n, int pos0, int per) {
    int kvd = n_head_kv * hd;
    g3n_kv kv_ref[2], kv_b[2];
    memset(kv_ref, 0, sizeof kv_ref);
    memset(kv_b, 0, sizeof kv_b);
    void *mem[2], *dmem[2];
    const size_t esz = KV16 ? 2 : 4, half = (size_t)cap * kvd * esz; /* bytes of K (V follows) */
    for (int s = 0; s < 2; s++) {
        float *x = rnd((size_t)2 * cap * kvd, 1.5f);
        mem[s] = x;
        if (KV16) mem[s] = f16_of(x, (size_t)2 * cap * kvd), free(x);
        dmem[s] = dev_bytes(mem[s], 2 * half);
        kv_ref[s].layer[3] = (g3n_kv_layer){mem[s], (char *)mem[s] + half, cap, KV16};
        kv_b[s].layer[3] = (g3n_kv_layer){dmem[s], (char *)dmem[s] + half, cap, KV16};
    }
    g3n_kv *kr[2] = {&kv_ref[0], &kv_ref[1]}, *kb[2] = {&kv_b[0], &kv_b[1]};
    int32_t pos[512], seq[512], ids[512] = {0}, next[2] = {pos0, pos0};
    G3N_ASSERT(n <= 512);
    for (int t = 0; t < n; t++) {
        seq[t] = t / per % 2;
        pos[t] = next[seq[t]]++;
    }
    g3n_batch br = {n, ids, pos, seq, kr, 2}, bb = {n, ids, pos, seq, kb, 2};
    REF->batch_set(REF, &br);
    B->batch_set(B, &bb);
    size_t qn = (size_t)n * n_head * hd;
    float *q = rnd(qn, 1.0f), *o0 = malloc(4 * qn), *dq = dev(q, qn);
    REF->attention(REF, o0, q, 3, n_head, n_head_kv, hd, window);
    /* default; then (GPU) the tiled kernel at 1, 2, 4, 8 rows a warp, and with one key stage */
    static const char *const runs[][3] = {{NULL, NULL, NULL}, {"1", "1", NULL}, {"1", "2", NULL},
                                         {"1", "4", NULL},   {"1", "8", NULL}, {"1", "8", "1"}};
    const int n_runs = strcmp(B->name, "cuda") == 0 ? 6 : 1;
    for (int i = 0; i < n_runs; i++) {
        if (runs[i][0]) setenv("G3N_ATT_TILED", runs[i][0], 1), setenv("G3N_ATT_RPW", runs[i][1], 1);
        if (runs[i][2]) setenv("G3N_ATT_NST", runs[i][2], 1);
        float *dout = dev_nan(qn); /* (cmp frees it) */
        B->attention(B, dout, dq, 3, n_head, n_head_kv, hd, window);
        unsetenv("G3N_ATT_TILED"), unsetenv("G3N_ATT_RPW"), unsetenv("G3N_ATT_NST");
        char what[128];
        snprintf(what, sizeof what, "attention%s H%d/%d hd%d win%d cap%d n%d pos%d runs of %d%s%s%s",
                 KV16 ? " f16" : "", n_head, n_head_kv, hd, window, cap, n, pos0, per,
                 runs[i][0] ? ", tiled, rows a warp " : "", runs[i][0] ? runs[i][1] : "", runs[i][2] ? ", one stage" : "");
        cmp(what, dout, o0, qn, TOL * 5, 1e-5 + rms_tol(o0, qn, 1e-4));
    }
    if (KV16 && !B_IS_CPU) { /* the tensor-core kernel at any step size (by default: prompt steps of 16+) */
        setenv("G3N_ATT_MMA", "1", 1);
        float *dout = dev_nan(qn);
        B->attention(B, dout, dq, 3, n_head, n_head_kv, hd, window);
        unsetenv("G3N_ATT_MMA");
        char what[128];
        snprintf(what, sizeof what, "attention f16 H%d/%d hd%d win%d cap%d n%d pos%d runs of %d, tensor cores",
                 n_head, n_head_kv, hd, window, cap, n, pos0, per);
        cmp(what, dout, o0, qn, TOL * 5, 1e-5 + rms_tol(o0, qn, 1e-4));
    }
    free(q), free(o0), B->free(B, dq);
    for (int s = 0; s < 2; s++) free(mem[s]), B->free(B, dmem[s]);
}

TEST(attention) {
    attention_case(4, 2, 32, 0, 64, 6, 0, 1);
    attention_case(8, 2, 33, 0, 100, 7, 40, 1);
    attention_case(3, 3, 5, 0, 20, 3, 17, 1);
    attention_case(4, 1, 16, 8, 12, 10, 0, 1);  /* sliding, ring of window + 4 */
    attention_case(4, 2, 32, 8, 15, 14, 93, 1); /* wrapped many times */
    attention_case(2, 1, 256, 512, 515, 4, 1000, 1);
    attention_case(8, 2, 256, 0, 3000, 2, 2900, 1); /* long full-attention context */
    attention_case(4, 4, 7, 1, 3, 5, 9, 1);     /* window of one: only itself */
    /* prompt-sized steps (the tiled kernel by default on a GPU) */
    attention_case(8, 2, 256, 512, 512 + 63, 64, 600, 64); /* E4B sliding layer: one sequence, ring wrapped */
    attention_case(8, 2, 256, 0, 400, 96, 200, 96);        /* E4B full layer, 96 tokens after 200 */
    attention_case(8, 2, 256, 0, 200, 40, 0, 20);          /* two prompts from position 0, runs of 20 */
    attention_case(4, 2, 64, 16, 16 + 49, 50, 30, 7);      /* runs of 7 straddling the tiles, window 16 */
    attention_case(6, 3, 48, 0, 100, 24, 10, 24);          /* head_dim 48, G = 2 */
    attention_case(8, 1, 32, 0, 100, 33, 5, 33);           /* G = 8 */
    attention_case(2, 2, 128, 5, 5 + 31, 32, 3, 32);       /* G = 1, window 5 */
    attention_case(4, 1, 36, 0, 100, 20, 0, 20);           /* head_dim 36: a lane past the end */
}

/* f16 caches: the same kernels reading halves (the reference widens each) */
TEST(attention_f16) {
    KV16 = 1;
    attention_case(4, 2, 32, 0, 64, 6, 0, 1);
    attention_case(4, 2, 32, 8, 15, 14, 93, 1);             /* sliding, wrapped */
    attention_case(8, 2, 256, 0, 3000, 2, 2900, 1);         /* long full-attention context */
    attention_case(8, 2, 256, 512, 512 + 63, 64, 600, 64); /* prompt: tiled, ring wrapped */
    attention_case(8, 2, 256, 0, 200, 40, 0, 20);          /* two prompts, runs of 20 */
    attention_case(4, 2, 64, 16, 16 + 49, 50, 30, 7);      /* runs straddling the tiles */
    attention_case(2, 2, 128, 5, 5 + 31, 32, 3, 32);       /* G = 1 */
    attention_case(8, 1, 32, 0, 100, 33, 5, 33);           /* G = 8 */
    attention_case(4, 1, 36, 0, 100, 20, 0, 20);           /* head_dim 36: not a multiple of 8 */
    attention_case(6, 3, 44, 0, 100, 24, 10, 24);          /* head_dim 44: a multiple of 4, not 8 */
    attention_case(8, 2, 256, 0, 3000, 40, 2900, 20);      /* two prompts deep in a long context */
    attention_case(16, 1, 64, 0, 300, 40, 100, 40);        /* G = 16, hd 64 */
    attention_case(2, 2, 128, 0, 300, 70, 0, 70);          /* G = 1: 32 tokens a block */
    KV16 = 0;
}

/* The CPU backend's attention of a token is the same bits in a prompt step
 * (a thread per (token, KV head)) and alone (a thread per chunk of keys), also
 * where its span takes several chunks: what makes decode equal prefill there. */
TEST(attention_alone_bitwise) {
    if (!B_IS_CPU) return; /* a GPU takes other kernels for prompts and decode */
    const int H = 8, Hkv = 2, hd = 64, cap = 1600, n = 6, kvd = Hkv * hd;
    float *mem = rnd((size_t)2 * cap * kvd, 1.5f), *q = rnd((size_t)n * H * hd, 1.0f);
    uint16_t *mem16 = f16_of(mem, (size_t)2 * cap * kvd);
    float *all = malloc(sizeof(float) * n * H * hd), *one = malloc(sizeof(float) * H * hd);
    g3n_kv kv;
    memset(&kv, 0, sizeof kv);
    g3n_kv *kvs[1] = {&kv};
    int32_t pos[6], seq[6] = {0}, ids[6] = {0};
    for (int t = 0; t < n; t++) pos[t] = 1500 + t; /* spans of 1501..1506 keys: 3 chunks */
    for (int w = 0; w < 4; w++) { /* f32, then an f16 cache (rows widened per chunk) */
        kv.layer[0] = w < 2 ? (g3n_kv_layer){mem, mem + (size_t)cap * kvd, cap, 0}
                            : (g3n_kv_layer){mem16, mem16 + (size_t)cap * kvd, cap, 1};
        const int window = w % 2 ? 700 : 0; /* and 2 chunks of a window */
        g3n_batch b = {n, ids, pos, seq, kvs, 1};
        B->batch_set(B, &b);
        B->attention(B, all, q, 0, H, Hkv, hd, window);
        for (int t = 0; t < n; t++) {
            g3n_batch b1 = {1, ids, pos + t, seq, kvs, 1};
            B->batch_set(B, &b1);
            B->attention(B, one, q + (size_t)t * H * hd, 0, H, Hkv, hd, window);
            CHECK_MSG(memcmp(one, all + (size_t)t * H * hd, sizeof(float) * H * hd) == 0,
                      "attention of token %d (pos %d, window %d%s): alone differs from in the step", t, pos[t], window,
                      w < 2 ? "" : ", f16 cache");
        }
    }
    free(mem), free(mem16), free(q), free(all), free(one);
}

/* qkv_attention (q/k/v norms, RoPE, cache store, attention in one op) against
 * the reference's qkv_post + attention. Tokens of `n_seq` sequences; one token
 * per sequence is a decode step (a GPU's one-kernel path), more is a prompt. */
static void qkv_attention_case(int H, int Hkv, int hd, int window, int cap, int n_seq, int per_seq, int pos0,
                               int owns) {
    const int kvd = Hkv * hd, n = n_seq * per_seq;
    const size_t cn = (size_t)2 * cap * kvd;
    g3n_kv kv_ref[4], kv_b[4];
    memset(kv_ref, 0, sizeof kv_ref);
    memset(kv_b, 0, sizeof kv_b);
    void *mem[4], *dmem[4];
    const size_t esz = KV16 ? 2 : 4;
    for (int s = 0; s < n_seq; s++) {
        float *x = rnd(cn, 1.5f);
        mem[s] = x;
        if (KV16) mem[s] = f16_of(x, cn), free(x);
        dmem[s] = dev_bytes(mem[s], cn * esz);
        kv_ref[s].layer[5] = (g3n_kv_layer){mem[s], (char *)mem[s] + cn / 2 * esz, cap, KV16};
        kv_b[s].layer[5] = (g3n_kv_layer){dmem[s], (char *)dmem[s] + cn / 2 * esz, cap, KV16};
    }
    g3n_kv *kr[4] = {&kv_ref[0], &kv_ref[1], &kv_ref[2], &kv_ref[3]};
    g3n_kv *kb[4] = {&kv_b[0], &kv_b[1], &kv_b[2], &kv_b[3]};
    int32_t pos[64], seq[64], ids[64] = {0};
    for (int t = 0; t < n; t++) { /* sequences at different positions */
        seq[t] = t / per_seq;
        pos[t] = pos0 + 37 * seq[t] + t % per_seq;
    }
    g3n_batch br = {n, ids, pos, seq, kr, n_seq}, bb = {n, ids, pos, seq, kb, n_seq};
    REF->batch_set(REF, &br);
    B->batch_set(B, &bb);
    const size_t qn = (size_t)n * H * hd, kn_ = (size_t)n * kvd;
    float *q = rnd(qn, 1.0f), *k = rnd(kn_, 1.0f), *v = rnd(kn_, 1.0f), *wq = rnd(hd, 1.0f), *wk = rnd(hd, 1.0f);
    float *dq = dev(q, qn), *dk = dev(k, kn_), *dv = dev(v, kn_), *dwq = dev(wq, hd), *dwk = dev(wk, hd);
    float *o0 = malloc(4 * qn), *dout = dev_nan(qn);
    const int store = owns ? 5 : -1;
    /* a KV-shared layer has no k_norm (load.c does not read one) */
    const g3n_vec rk = owns ? (g3n_vec){hd, wk} : (g3n_vec){0, NULL}, bk = owns ? (g3n_vec){hd, dwk} : (g3n_vec){0, NULL};
    REF->qkv_attention(REF, o0, q, k, v, (g3n_vec){hd, wq}, rk, store, 5, H, Hkv, hd, 10000.0f, 1e-6f, window);
    B->qkv_attention(B, dout, dq, dk, dv, (g3n_vec){hd, dwq}, bk, store, 5, H, Hkv, hd, 10000.0f, 1e-6f, window);
    char what[128];
    snprintf(what, sizeof what, "qkv_attention%s H%d/%d hd%d win%d cap%d seqs%d x%d pos%d owns%d", KV16 ? " f16" : "",
             H, Hkv, hd, window, cap, n_seq, per_seq, pos0, owns);
    /* abs: Gemma's attention logits are unscaled (|s| up to ~50 here), so an f32
     * score is off by ~5e-6 against the double reference, and so is each
     * dominant weight; where their values cancel, an output is off by ~1e-5
     * (one of 2048 at pos 3000 reached 1.5e-5 with another random stream).
     * Bounded by a ten-thousandth of the outputs' RMS; rel L2 stays TOL * 5.
     * f16 caches: the two sides' f32 new key and value may round to f16 values
     * one step (2^-11 relative) apart, which moves an output by up to that
     * share of a value (|v| up to ~4 after its norm) times the new key's weight
     * (seen on the H100: rel L2 8.6e-5, max |d| 4.8e-4 at outputs' RMS ~0.3). */
    if (KV16) cmp(what, dout, o0, qn, 1e-3, 1e-5 + rms_tol(o0, qn, 4e-3));
    else cmp(what, dout, o0, qn, TOL * 5, 1e-5 + rms_tol(o0, qn, 1e-4));
    for (int s = 0; s < n_seq; s++) {
        snprintf(what, sizeof what, "qkv_attention%s cache of seq %d (H%d/%d hd%d cap%d)", KV16 ? " f16" : "", s, H,
                 Hkv, hd, cap);
        /* f16: the two sides' f32 keys differ by rounding, which may cross an
         * f16 rounding boundary (one f16 step: 2^-11 relative) */
        if (KV16) cmp16(what, dmem[s], mem[s], cn, 1e-4, 4e-3);
        else cmp(what, dmem[s], mem[s], cn, 1e-5, 1e-5);
        free(mem[s]);
    }
    free(q), free(k), free(v), free(wq), free(wk), free(o0);
    B->free(B, dq), B->free(B, dk), B->free(B, dv), B->free(B, dwq), B->free(B, dwk);
}

TEST(qkv_attention) {
    qkv_attention_case(8, 2, 256, 512, 515, 1, 1, 700, 1);  /* E4B sliding layer, decode */
    qkv_attention_case(8, 2, 256, 0, 4096, 1, 1, 3000, 1);  /* full layer, long context: 8 x 8 shares */
    qkv_attention_case(8, 2, 256, 0, 4096, 1, 1, 3000, 0);  /* a KV-shared layer reads the cache only */
    qkv_attention_case(8, 2, 256, 512, 515, 2, 1, 700, 0);  /* KV-shared, sliding, two sequences */
    qkv_attention_case(4, 2, 32, 8, 12, 3, 1, 5, 1);        /* three sequences, ring of window + 4 */
    qkv_attention_case(4, 4, 64, 0, 300, 4, 1, 0, 1);       /* G = 1; a sequence at position 0 */
    qkv_attention_case(4, 1, 128, 0, 200, 2, 1, 70, 1);     /* G = 4, hd 128 */
    qkv_attention_case(6, 3, 48, 0, 100, 2, 1, 20, 1);      /* hd not a multiple of 32 */
    qkv_attention_case(8, 1, 32, 0, 100, 1, 1, 50, 1);      /* G = 8 */
    qkv_attention_case(4, 2, 32, 8, 15, 2, 5, 30, 1);       /* prompt chunks of two sequences */
    qkv_attention_case(4, 2, 32, 0, 64, 1, 1, 63, 1);       /* the last slot of the cache */
    qkv_attention_case(8, 2, 256, 0, 300, 1, 1, 2, 1);      /* 3 keys over 4 blocks: shares left empty */
    qkv_attention_case(8, 2, 256, 0, 600, 3, 1, 400, 0);    /* KV-shared, 401-475 keys of a 512 reach */
}

/* The decode cases through each of the GPU's two decode kernels: the CUDA
 * backend takes k_attn_short where a step sees at most G3N_ATT_SHORT_MAX keys
 * (256 by default, 512 after a quantized q/k/v product where the step reaches
 * at most 512) and k_attn_decode beyond; here k_attn_decode everywhere
 * (G3N_ATT_SHORT=0), k_attn_short up to its 512 keys in clusters of
 * k_attn_decode's size (G3N_ATT_SHORT_NSP=0), and in 16-block clusters past
 * 256 keys (its default there, where the GPU has them), f32 and f16 caches. */
TEST(qkv_attention_kernels) {
    if (B_IS_CPU) return; /* (the CPU has one attention) */
    static const char *const runs[][3] = {{"0", NULL, NULL}, {"1", "512", "0"}, {"1", "512", NULL}};
    for (int i = 0; i < 3; i++) {
        setenv("G3N_ATT_SHORT", runs[i][0], 1);
        if (runs[i][1]) setenv("G3N_ATT_SHORT_MAX", runs[i][1], 1);
        if (runs[i][2]) setenv("G3N_ATT_SHORT_NSP", runs[i][2], 1);
        for (KV16 = 0; KV16 < 2; KV16++) {
            qkv_attention_case(8, 2, 256, 512, 515, 1, 1, 700, 1); /* sliding, ring wrapped: 512 keys */
            qkv_attention_case(8, 2, 256, 512, 515, 2, 1, 700, 0); /* KV-shared, two sequences */
            qkv_attention_case(8, 2, 256, 0, 600, 3, 1, 400, 0);   /* KV-shared, 401-475 keys */
            qkv_attention_case(4, 2, 32, 8, 12, 3, 1, 5, 1);
            qkv_attention_case(4, 4, 64, 0, 300, 4, 1, 0, 1);
            qkv_attention_case(4, 1, 128, 0, 200, 2, 1, 70, 1);
            qkv_attention_case(8, 2, 256, 0, 300, 1, 1, 2, 1);
        }
        KV16 = 0;
        unsetenv("G3N_ATT_SHORT"), unsetenv("G3N_ATT_SHORT_MAX"), unsetenv("G3N_ATT_SHORT_NSP");
    }
}

TEST(qkv_attention_f16) {
    KV16 = 1;
    qkv_attention_case(8, 2, 256, 512, 515, 1, 1, 700, 1); /* E4B sliding layer, decode */
    qkv_attention_case(8, 2, 256, 0, 4096, 1, 1, 3000, 1); /* full layer, long context */
    qkv_attention_case(8, 2, 256, 0, 4096, 1, 1, 3000, 0); /* KV-shared */
    qkv_attention_case(4, 2, 32, 8, 12, 3, 1, 5, 1);       /* three sequences, ring */
    qkv_attention_case(4, 1, 128, 0, 200, 2, 1, 70, 1);    /* G = 4, hd 128 */
    qkv_attention_case(6, 3, 48, 0, 100, 2, 1, 20, 1);     /* hd not a multiple of 32 */
    qkv_attention_case(8, 1, 32, 0, 100, 1, 1, 50, 1);     /* G = 8 */
    qkv_attention_case(4, 2, 32, 8, 15, 2, 5, 30, 1);      /* prompt chunks */
    qkv_attention_case(8, 2, 256, 0, 300, 1, 1, 2, 1);     /* 3 keys over 4 blocks */
    qkv_attention_case(8, 2, 256, 0, 600, 3, 1, 400, 0);   /* KV-shared, three sequences */
    if (!B_IS_CPU) { /* split into chunks of keys */
        setenv("G3N_ATT_NSG", "5", 1), setenv("G3N_ATT_KPB", "16", 1);
        qkv_attention_case(8, 2, 256, 0, 4096, 1, 1, 3000, 1);
        qkv_attention_case(8, 2, 256, 512, 515, 2, 1, 700, 0);
        unsetenv("G3N_ATT_NSG"), unsetenv("G3N_ATT_KPB");
    }
    KV16 = 0;
}

/* Decode attention split into chunks of the keys (on a GPU, clusters of blocks
 * whose partials meet in memory): forced chunk counts (G3N_ATT_NSG), some that
 * leave chunks without keys, and fewer keys a block (G3N_ATT_KPB) for wider
 * splits; full and sliding layers, KV-shared ones, several sequences. */
TEST(qkv_attention_split) {
    if (B_IS_CPU) return; /* the CPU's attention has no such splits; qkv_attention covers it */
    static const char *const runs[][2] = {{"3", NULL}, {"5", "16"}, {"8", NULL}, {"32", "8"}, {NULL, "8"}};
    for (int i = 0; i < 5; i++) {
        if (runs[i][0]) setenv("G3N_ATT_NSG", runs[i][0], 1);
        if (runs[i][1]) setenv("G3N_ATT_KPB", runs[i][1], 1);
        qkv_attention_case(8, 2, 256, 0, 4096, 1, 1, 3000, 1);
        qkv_attention_case(8, 2, 256, 0, 4096, 1, 1, 2000, 0); /* KV-shared */
        qkv_attention_case(8, 2, 256, 512, 515, 2, 1, 700, 1); /* sliding, two sequences */
        qkv_attention_case(4, 2, 32, 0, 300, 3, 1, 200, 1);    /* three sequences */
        qkv_attention_case(4, 1, 128, 0, 64, 1, 1, 5, 1);      /* 6 keys: most chunks empty */
        qkv_attention_case(6, 3, 64, 0, 100, 2, 1, 20, 1);     /* G = 2 */
        unsetenv("G3N_ATT_NSG"), unsetenv("G3N_ATT_KPB");
    }
}

/* The reference attention against a direct softmax computed here. */
TEST(attention_ref_exact) {
    int hd = 8, cap = 6, p = 9, window = 4; /* keys 6..9 live in slots 0,1,2,3 */
    g3n_kv kv;
    memset(&kv, 0, sizeof kv);
    float *k = rnd((size_t)cap * hd, 1.0f), *v = rnd((size_t)cap * hd, 1.0f), *q = rnd(hd, 1.0f);
    kv.layer[0] = (g3n_kv_layer){k, v, cap, 0};
    g3n_kv *kvs[1] = {&kv};
    int32_t pos[1] = {p}, seq[1] = {0}, ids[1] = {0};
    g3n_batch b = {1, ids, pos, seq, kvs, 1};
    REF->batch_set(REF, &b);
    float out[8];
    REF->attention(REF, out, q, 0, 1, 1, hd, window);
    double sc[4], mx = -1e30, sum = 0;
    for (int j = 0; j < 4; j++) {
        int slot = (6 + j) % cap;
        sc[j] = 0;
        for (int i = 0; i < hd; i++) sc[j] += (double)q[i] * k[slot * hd + i];
        if (sc[j] > mx) mx = sc[j];
    }
    for (int j = 0; j < 4; j++) sum += exp(sc[j] - mx);
    for (int i = 0; i < hd; i++) {
        double acc = 0;
        for (int j = 0; j < 4; j++) acc += exp(sc[j] - mx) / sum * v[((6 + j) % cap) * hd + i];
        CHECK(fabs(acc - out[i]) < 1e-6);
    }
    free(k), free(v), free(q);
}

/* kv_store, embed (device and host-gathered tables), rope: the batch ops. */
TEST(batch_ops) {
    const int n = 5, kvd = 24, cap = 7;
    /* sequence 0 at 10..13 wraps the ring of 7 (slots 3..6); one step never holds
     * two positions of a sequence that share a slot (the ring is sized for it) */
    int32_t ids[5] = {3, 0, 9, 3, 11}, pos[5] = {10, 11, 12, 13, 2}, seq[5] = {0, 0, 0, 0, 1};
    /* kv_store into a ring (pos % cap) for two sequences */
    float *kr = calloc(2 * 2 * cap * kvd, 4), *dk = dev(kr, 2 * 2 * cap * kvd);
    g3n_kv kv_ref[2], kv_b[2];
    memset(kv_ref, 0, sizeof kv_ref);
    memset(kv_b, 0, sizeof kv_b);
    for (int s = 0; s < 2; s++) {
        kv_ref[s].layer[1] = (g3n_kv_layer){kr + s * 2 * cap * kvd, kr + (s * 2 + 1) * cap * kvd, cap, 0};
        kv_b[s].layer[1] = (g3n_kv_layer){dk + s * 2 * cap * kvd, dk + (s * 2 + 1) * cap * kvd, cap, 0};
    }
    g3n_kv *pr[2] = {&kv_ref[0], &kv_ref[1]}, *pb[2] = {&kv_b[0], &kv_b[1]};
    g3n_batch br = {n, ids, pos, seq, pr, 2}, bb = {n, ids, pos, seq, pb, 2};
    REF->batch_set(REF, &br);
    B->batch_set(B, &bb);
    float *k = rnd((size_t)n * kvd, 1.0f), *v = rnd((size_t)n * kvd, 1.0f);
    float *dkk = dev(k, (size_t)n * kvd), *dv = dev(v, (size_t)n * kvd);
    REF->kv_store(REF, 1, k, v, kvd);
    B->kv_store(B, 1, dkk, dv, kvd);
    cmp("kv_store", dk, kr, 2 * 2 * cap * kvd, 0, 0);
    { /* into f16 caches: each value rounded to nearest even, the same bits on both */
        const size_t ne = (size_t)2 * 2 * cap * kvd;
        uint16_t *hr = calloc(ne, 2), *dh = dev_bytes(hr, ne * 2);
        g3n_kv hv_ref[2], hv_b[2];
        memset(hv_ref, 0, sizeof hv_ref);
        memset(hv_b, 0, sizeof hv_b);
        for (int s = 0; s < 2; s++) {
            hv_ref[s].layer[1] = (g3n_kv_layer){hr + s * 2 * cap * kvd, hr + (s * 2 + 1) * cap * kvd, cap, 1};
            hv_b[s].layer[1] = (g3n_kv_layer){dh + s * 2 * cap * kvd, dh + (s * 2 + 1) * cap * kvd, cap, 1};
        }
        g3n_kv *qr[2] = {&hv_ref[0], &hv_ref[1]}, *qb[2] = {&hv_b[0], &hv_b[1]};
        g3n_batch br16 = {n, ids, pos, seq, qr, 2}, bb16 = {n, ids, pos, seq, qb, 2};
        REF->batch_set(REF, &br16);
        B->batch_set(B, &bb16);
        REF->kv_store(REF, 1, k, v, kvd);
        B->kv_store(B, 1, dkk, dv, kvd);
        int stored = 0; /* (the values are random: most stored halves are not zero) */
        for (size_t i = 0; i < ne; i++) stored += hr[i] != 0;
        CHECK(stored > (int)ne / 4);
        cmp16("kv_store f16", dh, hr, ne, 0, 0);
        free(hr);
        REF->batch_set(REF, &br);
        B->batch_set(B, &bb);
    }
    /* embed from a device-resident table and from a host-gathered one */
    for (int hg = 0; hg < 2; hg++)
        for (int d = 0; d < 3; d++) {
            tmat E = make_mat(DTYPES[d], 12, 40, hg);
            B->batch_set(B, &bb); /* host-gathered rows are copied at batch_set */
            float y0[5 * 40], *dy = dev_nan(5 * 40);
            REF->embed(REF, y0, &E.ref, 3.5f);
            B->embed(B, dy, &E.b, 3.5f);
            char what[64];
            snprintf(what, sizeof what, "embed %s host_gather %d", g3n_dtype_name(DTYPES[d]), hg);
            cmp(what, dy, y0, 5 * 40, 0, 0);
            if (hg) keep_alive(E.mem); /* a GPU backend may read host tables at each batch_set */
            else free(E.mem);
        }
    /* rope with two bases and odd head counts */
    float thetas[2] = {10000.0f, 1e6f};
    for (int i = 0; i < 2; i++) {
        int H = 3, hd = 32;
        float *x = rnd((size_t)n * H * hd, 1.0f), *dx = dev(x, (size_t)n * H * hd);
        REF->rope(REF, x, H, hd, thetas[i]);
        B->rope(B, dx, H, hd, thetas[i]);
        cmp("rope", dx, x, (size_t)n * H * hd, 1e-6, 1e-6);
        free(x);
    }
    free(kr), free(k), free(v), B->free(B, dkk), B->free(B, dv);
}

/* The elementwise ops at a step's sizes (a prompt's activations, the logits):
 * near the reference on every backend, and on the CPU its bits (cpu.c runs the
 * reference op on slices in parallel; small_ops' 1000 elements stay in one). */
static void check_same(const char *what, float *d, const float *ref, size_t n, double tol) {
    float *h = host(d, n);
    if (B_IS_CPU) CHECK_MSG(memcmp(h, ref, sizeof(float) * n) == 0, "%s: not the reference's bits", what);
    test_close(what, h, ref, n, tol, tol);
    free(h);
    B->free(B, d);
}

TEST(elementwise_large) {
    const size_t n = 3 * 8192 + 5; /* uneven slices */
    float *a = rnd(n, 3.0f), *b = rnd(n, 3.0f), *y0 = malloc(sizeof(float) * n);
    float *da = dev(a, n), *db = dev(b, n), *dy;
    REF->gelu_mul(REF, y0, a, b, n);
    B->gelu_mul(B, dy = dev_nan(n), da, db, n);
    check_same("gelu_mul large", dy, y0, n, 1e-6);
    REF->gelu_mul(REF, y0, a, NULL, n);
    B->gelu_mul(B, dy = dev_nan(n), da, NULL, n);
    check_same("gelu large", dy, y0, n, 1e-6);
    memcpy(y0, a, sizeof(float) * n);
    REF->softcap(REF, y0, n, 30.0f);
    B->softcap(B, dy = dev(a, n), n, 30.0f);
    check_same("softcap large", dy, y0, n, 1e-6);
    const int R = 3, D = (int)(n / 3);
    memcpy(y0, a, sizeof(float) * n);
    REF->gaussian_topk(REF, y0, R, D, 1.6448533535f);
    B->gaussian_topk(B, dy = dev(a, n), R, D, 1.6448533535f);
    check_same("gaussian_topk rows", dy, y0, (size_t)R * D, 1e-5);
    free(a), free(b), free(y0), B->free(B, da), B->free(B, db);
}

/* elementwise, top-k, AltUp, magnitude match and per-layer inputs vs REF */
TEST(small_ops) {
    const size_t n = 1000;
    float *a = rnd(n, 3.0f), *b = rnd(n, 3.0f), *c = rnd(n, 3.0f), y0[1000];
    float *da = dev(a, n), *db = dev(b, n), *dc = dev(c, n), *dy;
    REF->add(REF, y0, a, b, n);
    B->add(B, dy = dev_nan(n), da, db, n);
    cmp("add", dy, y0, n, 1e-7, 0);
    REF->scale(REF, y0, a, 0.37f, n);
    B->scale(B, dy = dev_nan(n), da, 0.37f, n);
    cmp("scale", dy, y0, n, 1e-7, 0);
    REF->add3_scale(REF, y0, a, b, c, 0.7f, n);
    B->add3_scale(B, dy = dev_nan(n), da, db, dc, 0.7f, n);
    cmp("add3_scale", dy, y0, n, 1e-7, 0);
    float *w = rnd(40, 1.0f), *dw = dev(w, 40);
    REF->mul_vec(REF, y0, a, (g3n_vec){40, w}, 25, 40);
    B->mul_vec(B, dy = dev_nan(n), da, (g3n_vec){40, dw}, 25, 40);
    cmp("mul_vec", dy, y0, n, 1e-7, 0);
    REF->gelu_mul(REF, y0, a, b, n);
    B->gelu_mul(B, dy = dev_nan(n), da, db, n);
    cmp("gelu_mul", dy, y0, n, 1e-6, 1e-6);
    REF->gelu_mul(REF, y0, a, NULL, n);
    B->gelu_mul(B, dy = dev_nan(n), da, NULL, n);
    cmp("gelu", dy, y0, n, 1e-6, 1e-6);
    REF->tanh_(REF, y0, a, n);
    B->tanh_(B, dy = dev_nan(n), da, n);
    cmp("tanh", dy, y0, n, 1e-6, 1e-6);
    memcpy(y0, a, sizeof y0);
    REF->softcap(REF, y0, n, 2.0f);
    dy = dev(a, n);
    B->softcap(B, dy, n, 2.0f);
    cmp("softcap", dy, y0, n, 1e-6, 1e-6);
    int dims[] = {7, 200, 333};
    for (int i = 0; i < 3; i++) { /* gaussian top-k: rows of odd width */
        int D = dims[i], R = (int)(n / D);
        memcpy(y0, a, sizeof y0);
        REF->gaussian_topk(REF, y0, R, D, 1.6448533535f);
        dy = dev(a, n);
        B->gaussian_topk(B, dy, R, D, 1.6448533535f);
        cmp("gaussian_topk", dy, y0, (size_t)R * D, 1e-5, 1e-5);
    }
    /* magnitude match, with rows below the floor */
    float *m2 = rnd(n, 1.0f);
    for (int i = 0; i < 50; i++) m2[i] *= 1e-4f;
    memcpy(y0, m2, sizeof y0);
    REF->magnitude_match(REF, y0, a, 20, 50, 1e-5f);
    dy = dev(m2, n);
    B->magnitude_match(B, dy, da, 20, 50, 1e-5f);
    cmp("magnitude_match", dy, y0, n, 1e-6, 1e-6);
    /* AltUp with A = 4 over 3 rows of 37 */
    const int A = 4, R = 3, D = 37;
    size_t pn = (size_t)A * R * D;
    float *S = rnd(pn, 1.0f), *m = rnd((size_t)R * A, 1.0f), *pc = rnd(64, 0.5f), *cc = rnd(16, 0.5f);
    float *o = rnd((size_t)R * D, 1.0f), *pred = malloc(4 * pn), *corr = malloc(4 * pn);
    float *dS = dev(S, pn), *dm = dev(m, (size_t)R * A), *dpc = dev(pc, 64), *dcc = dev(cc, 16),
          *dO = dev(o, (size_t)R * D), *dpred = dev_nan(pn);
    REF->altup_predict(REF, pred, S, m, (g3n_vec){64, pc}, A, R, D);
    B->altup_predict(B, dpred, dS, dm, (g3n_vec){64, dpc}, A, R, D);
    float *hp = host(dpred, pn);
    test_close("altup_predict", hp, pred, pn, 1e-6, 1e-6);
    REF->altup_correct(REF, corr, pred, o, m, (g3n_vec){16, cc}, A, R, D);
    B->altup_correct(B, dpred, dpred, dO, dm, (g3n_vec){16, dcc}, A, R, D); /* in place */
    cmp("altup_correct", dpred, corr, pn, 1e-6, 1e-6);
    /* per-layer inputs: 3 tokens x 5 layers x 16 */
    const int T = 3, L = 5, P = 16;
    float *proj = rnd((size_t)T * L * P, 20.0f), *z = rnd((size_t)T * L * P, 1.0f), *nw = rnd(P, 1.0f);
    float *ple = malloc(4 * (size_t)T * L * P);
    float *dproj = dev(proj, (size_t)T * L * P), *dz = dev(z, (size_t)T * L * P), *dnw = dev(nw, P);
    REF->ple_combine(REF, ple, proj, z, (g3n_vec){P, nw}, T, L, P, 0.022f, 1e-6f, 0.7071f);
    B->ple_combine(B, dy = dev_nan((size_t)T * L * P), dproj, dz, (g3n_vec){P, dnw}, T, L, P, 0.022f, 1e-6f,
                   0.7071f);
    cmp("ple_combine", dy, ple, (size_t)T * L * P, 1e-6, 1e-6);
    free(a), free(b), free(c), free(w), free(m2), free(S), free(m), free(pc), free(cc), free(o);
    free(pred), free(corr), free(hp), free(proj), free(z), free(nw), free(ple);
    void *dev_ptrs[] = {da, db, dc, dw, dS, dm, dpc, dcc, dO, dproj, dz, dnw};
    for (size_t i = 0; i < sizeof dev_ptrs / sizeof *dev_ptrs; i++) B->free(B, dev_ptrs[i]);
}

/* The whole sparse MLP (gate, top-k, gathered up rows and down columns) of 1 and
 * 3 token rows on the backend against the reference; abs: the absolute bound's
 * floor (sums of ~I/20 terms: it also scales with their size). */
static void sparse_mlp_case(const char *what, tmat *Wg, tmat *Wu, tmat *Wd, int I, int DD, double abs) {
    for (int rows = 1; rows <= 3; rows += 2) {
        float *u = rnd((size_t)rows * DD, 1.0f), *du = dev(u, (size_t)rows * DD);
        float *g = malloc(4 * (size_t)rows * I), *up = malloc(4 * (size_t)rows * I);
        float *ys = malloc(4 * (size_t)rows * DD);
        float *dg = dev_nan((size_t)rows * I), *dup = dev_nan((size_t)rows * I), *dy = dev_nan((size_t)rows * DD);
        REF->mlp_sparse(REF, ys, g, up, &Wg->ref, &Wu->ref, &Wd->ref, u, rows, 1.6448533535f);
        B->mlp_sparse(B, dy, dg, dup, &Wg->b, &Wu->b, &Wd->b, du, rows, 1.6448533535f);
        char name[96];
        snprintf(name, sizeof name, "%s rows %d", what, rows);
        cmp(name, dy, ys, (size_t)rows * DD, 1e-5, abs + rms_tol(ys, (size_t)rows * DD, 2e-5));
        int nz = 0;
        for (int i = 0; i < I; i++) nz += g[i] != 0;
        CHECK_MSG(nz > I / 50 && nz < I / 8, "%s: top-k kept %d of %d", name, nz, I);
        free(u), free(g), free(up), free(ys), B->free(B, du), B->free(B, dg), B->free(B, dup); /* cmp freed dy */
    }
}

/* The fused ops against the reference's definition (sequences of basic ops). */
static float *vdev(float *h, int n) { return dev(h, (size_t)n); }

/* The register-resident row kernels (AltUp predict, the attention residual,
 * correct) at widths that take them: 64 (one pair of elements a thread), 256 and
 * 2048 (two by default, four with G3N_ROW_PAIRS=4); fused_ops' width 96 takes
 * the generic kernels. Each against the reference ops, one and two rows. */
/* cmp for row_kernels_case: "row kernels D<D> R<R> " and fmt name the values */
static void row_cmp(float *d, const float *ref, size_t n, int D, int R, const char *fmt, ...) {
    char what[128];
    int k = snprintf(what, sizeof what, "row kernels D%d R%d ", D, R);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what + k, sizeof what - (size_t)k, fmt, ap);
    va_end(ap);
    cmp(what, d, ref, n, 1e-5, 1e-5);
}

static void row_kernels_case(int D, int R) {
    const int A = 4;
    const size_t pn = (size_t)A * R * D, n = (size_t)R * D;
    const g3n_vec none = {0, NULL};
    float *S = rnd(pn, 1.0f), *rn = rnd(D, 1.0f), *pc = rnd(64, 0.3f), *cc = rnd(16, 0.3f), *inn = rnd(D, 1.0f);
    for (int i = 0; i < D; i++) rn[i] += 1.5f, inn[i] += 1.5f;
    float *pp = rnd(n, 3.0f), *w3 = rnd(3 * (size_t)D, 1.0f), *S2 = malloc(4 * pn), *pred = malloc(4 * pn);
    float *x = malloc(4 * n), *s_ = malloc(4 * n), *u_ = malloc(4 * n), *qs = malloc(4 * n);
    tmat router = make_mat(G3N_BF16, A, D, 0);
    float *drn = dev(rn, D), *dpc = dev(pc, 64), *dcc = dev(cc, 16), *dinn = dev(inn, D), *dpp = dev(pp, n);
    float *dw3 = dev(w3, 3 * (size_t)D);
    for (int ple = 0; ple < 2; ple++) { /* ple: the previous layer's per-layer input added to S first */
        memcpy(S2, S, 4 * pn);
        float *dS = dev(S, pn), *dpred = dev_nan(pn), *dx = dev_nan(n);
        REF->altup_predict_fused(REF, pred, x, S2, ple ? pp : NULL, ple ? (g3n_vec){D, inn} : none, &router.ref,
                                 (g3n_vec){D, rn}, (g3n_vec){64, pc}, (g3n_vec){D, inn}, A, R, D, 1e-6f);
        B->altup_predict_fused(B, dpred, dx, dS, ple ? dpp : NULL, ple ? (g3n_vec){D, dinn} : none, &router.b,
                               (g3n_vec){D, drn}, (g3n_vec){64, dpc}, (g3n_vec){D, dinn}, A, R, D, 1e-6f);
        row_cmp(dS, S2, pn, D, R, "predict%s S", ple ? "+ple" : "");
        row_cmp(dpred, pred, pn, D, R, "predict%s pred", ple ? "+ple" : "");
        row_cmp(dx, x, n, D, R, "predict%s x", ple ? "+ple" : "");
    }
    float *att = rnd(n, 2.0f), *lau = rnd(n, 2.0f), *a = rnd(n, 1.0f);
    float *datt = dev(att, n), *dlau = dev(lau, n), *da = dev(a, n), *dx = dev(x, n), *ds = dev_nan(n), *du = dev_nan(n);
    REF->attn_residual(REF, s_, u_, att, lau, x, a, (g3n_vec){D, w3}, (g3n_vec){D, w3 + D}, (g3n_vec){D, w3 + 2 * D},
                       R, D, 1e-6f, 0.7071f);
    B->attn_residual(B, ds, du, datt, dlau, dx, da, (g3n_vec){D, dw3}, (g3n_vec){D, dw3 + D},
                     (g3n_vec){D, dw3 + 2 * D}, R, D, 1e-6f, 0.7071f);
    row_cmp(ds, s_, n, D, R, "attn_residual s");
    row_cmp(du, u_, n, D, R, "attn_residual u");
    for (int sc = 0; sc < 2; sc++) { /* correct, without and with the output scale */
        float *f = rnd(n, 2.0f), *df = dev(f, n), *dsres = dev(s_, n), *dp2 = dev(pred, pn), *dqs = dev_nan(n);
        memcpy(S2, pred, 4 * pn);
        REF->altup_correct_fused(REF, S2, qs, f, s_, (g3n_vec){D, w3}, &router.ref, (g3n_vec){D, rn},
                                 (g3n_vec){16, cc}, (g3n_vec){D, sc ? inn : NULL}, A, R, D, 1e-6f);
        B->altup_correct_fused(B, dp2, dqs, df, dsres, (g3n_vec){D, dw3}, &router.b, (g3n_vec){D, drn},
                               (g3n_vec){16, dcc}, (g3n_vec){D, sc ? dinn : NULL}, A, R, D, 1e-6f);
        row_cmp(dp2, S2, pn, D, R, "correct%s pred", sc ? "+scale" : "");
        row_cmp(dqs, qs, n, D, R, "correct%s qs", sc ? "+scale" : "");
        row_cmp(df, f, n, D, R, "correct%s o", sc ? "+scale" : "");
        free(f), B->free(B, dsres);
    }
    { /* the planes' ends: ple_add, altup_unembed (one plane at its magnitude's floor), magnitude_match_planes */
        float *proj = rnd(n, 3.0f), *dproj = dev(proj, n), *dp3 = dev(pred, pn);
        memcpy(S2, pred, 4 * pn);
        REF->ple_add(REF, S2, proj, (g3n_vec){D, inn}, A, R, D, 1e-6f);
        B->ple_add(B, dp3, dproj, (g3n_vec){D, dinn}, A, R, D, 1e-6f);
        row_cmp(dp3, S2, pn, D, R, "ple_add");
        const size_t vn = (size_t)(A - 1) * n;
        float *vv = rnd(vn, 2.0f), *P = malloc(4 * (n + vn)), *v2 = malloc(4 * vn);
        for (size_t i = n; i < 2 * n; i++) vv[i] *= 1e-4f;
        float *dS0 = dev(pred, n), *dvv = dev(vv, vn), *dhu = dev_nan(n);
        for (int wn = 0; wn < 2; wn++) { /* with and without the final norm's weight */
            /* v is scratch (the reference matches it in place; twice, the floored plane moves again) */
            memcpy(v2, vv, 4 * vn);
            B->write(B, dvv, vv, 4 * vn);
            REF->altup_unembed(REF, u_, pred, v2, n, (g3n_vec){D, wn ? inn : NULL}, A, R, D, 1e-5f, 1e-6f);
            B->altup_unembed(B, dhu, dS0, dvv, n, (g3n_vec){D, wn ? dinn : NULL}, A, R, D, 1e-5f, 1e-6f);
            float *h = host(dhu, n);
            test_close(wn ? "row kernels altup_unembed" : "row kernels altup_unembed (no weight)", h, u_, n, 1e-5, 1e-5);
            free(h);
        }
        B->free(B, dhu);
        memcpy(P, pred, 4 * n), memcpy(P + n, vv, 4 * vn);
        float *dP = dev(P, n + vn);
        REF->magnitude_match_planes(REF, P, n, A, R, D, 1e-5f);
        B->magnitude_match_planes(B, dP, n, A, R, D, 1e-5f);
        row_cmp(dP, P, n + vn, D, R, "magnitude_match_planes");
        free(proj), free(vv), free(v2), free(P), B->free(B, dproj), B->free(B, dS0), B->free(B, dvv);
    }
    free(S), free(rn), free(pc), free(cc), free(inn), free(pp), free(w3), free(S2), free(pred), free(x), free(s_);
    free(u_), free(qs), free(att), free(lau), free(a), free(router.mem);
    void *d[] = {drn, dpc, dcc, dinn, dpp, dw3, datt, dlau, da, dx};
    for (size_t i = 0; i < sizeof d / sizeof *d; i++) B->free(B, d[i]);
}

TEST(row_kernels) {
    const int Ds[3] = {64, 256, 2048};
    for (int i = 0; i < 3; i++) row_kernels_case(Ds[i], 1), row_kernels_case(Ds[i], 2);
}

/* altup_correct_gate (AltUp correct, then the per-layer input's gate product,
 * corrected planes out of place; its MLP output f given as 1, 3 or 8 partial
 * sums, as matmul_parts leaves them) against the reference ops, for each kind of
 * gate matrix a GPU kernel takes (bf16, f16, f32, 4 and 8 bits), with and
 * without the output scale, n_ple 256 and 37 (a last block of gate rows
 * partly empty), widths 64, 256 and 2048, one row (the fused kernel) and two
 * (the two ops), and width 96 (the generic kernels, on a copy of the planes). */
TEST(correct_gate) {
    const int A = 4, Ds[4] = {64, 96, 256, 2048}, Ps[2] = {256, 37};
    const int kinds[6][3] = {{G3N_BF16, 0, 0}, {G3N_F16, 0, 0}, {G3N_F32, 0, 0}, {0, 4, 32}, {0, 4, 64}, {0, 8, 64}};
    for (int di = 0; di < 4; di++)
        for (int R = 1; R <= 2; R++)
            for (int ki = 0; ki < 6; ki++) {
                const int D = Ds[di], NP = Ps[(di + ki) % 2], sc = (ki + R) % 2;
                const int nf = (di + ki + R) % 3 == 0 ? 1 : (di + ki + R) % 3 == 1 ? 3 : 8; /* f as nf parts */
                if (kinds[ki][1] && D % kinds[ki][2]) continue;
                if (B_IS_CPU && (di < 3 || ki % 2)) continue; /* the same code as the reference there */
                const size_t pn = (size_t)A * R * D, n = (size_t)R * D, np = (size_t)R * NP;
                float *pred = rnd(pn, 1.0f), *f = rnd(n * nf, 2.0f), *sres = rnd(n, 1.0f), *w = rnd(3 * (size_t)D, 1.0f);
                float *cc = rnd(16, 0.3f), *m = rnd(np, 1.0f), *out = malloc(4 * pn), *qs = malloc(4 * n);
                float *pg = malloc(4 * np), *f2 = malloc(4 * n * nf);
                for (int i = 0; i < D; i++) w[D + i] += 1.5f;
                memcpy(f2, f, 4 * n * nf);
                tmat router = make_mat(G3N_BF16, A, D, 0);
                tmat gate = kinds[ki][1] ? make_qmat_ex(kinds[ki][1], kinds[ki][2], G3N_BF16, NP, D, 0, 0, 0)
                                         : make_mat(kinds[ki][0], NP, D, 0);
                const g3n_vec none = {0, NULL};
                REF->altup_correct_gate(REF, out, pred, qs, f2, nf, sres, (g3n_vec){D, w}, &router.ref,
                                        (g3n_vec){D, w + D}, (g3n_vec){16, cc}, sc ? (g3n_vec){D, w + 2 * D} : none,
                                        pg, &gate.ref, m, A, R, D, 1e-6f);
                float *dpred = dev(pred, pn), *df = dev(f, n * nf), *ds = dev(sres, n), *dw = dev(w, 3 * (size_t)D);
                float *dcc = dev(cc, 16), *dm = dev(m, np), *dout = dev_nan(pn), *dqs = dev_nan(n), *dpg = dev_nan(np);
                B->altup_correct_gate(B, dout, dpred, dqs, df, nf, ds, (g3n_vec){D, dw}, &router.b, (g3n_vec){D, dw + D},
                                      (g3n_vec){16, dcc}, sc ? (g3n_vec){D, dw + 2 * D} : none, dpg, &gate.b, dm, A,
                                      R, D, 1e-6f);
                char what[96];
                snprintf(what, sizeof what, "correct_gate D%d R%d n_ple %d kind %d%s, %d parts", D, R, NP, ki,
                         sc ? " +scale" : "", nf);
                char w2[112];
                snprintf(w2, sizeof w2, "%s planes", what);
                cmp(w2, dout, out, pn, 1e-5, 1e-5);
                snprintf(w2, sizeof w2, "%s qs", what);
                cmp(w2, dqs, qs, n, 1e-5, 1e-5);
                snprintf(w2, sizeof w2, "%s pg", what);
                cmp(w2, dpg, pg, np, 1e-4, rms_tol(pg, np, 1e-5));
                float *hp = host(dpred, pn); /* pred only read */
                CHECK_MSG(memcmp(hp, pred, 4 * pn) == 0, "%s: pred changed", what);
                free(hp), free(pred), free(f), free(sres), free(w), free(cc), free(m), free(out), free(qs), free(pg);
                free(f2), free(router.mem), free(gate.mem);
                void *d[] = {dpred, df, ds, dw, dcc, dm};
                for (size_t i = 0; i < sizeof d / sizeof *d; i++) B->free(B, d[i]);
            }
}

TEST(fused_ops) {
    const int A = 4, R = 2, D = 96, H = 4, Hkv = 2, hd = 32, cap = 16;
    const size_t pn = (size_t)A * R * D, n = (size_t)R * D;
    float *S = rnd(pn, 1.0f), *rn = rnd(D, 1.0f), *pc = rnd(64, 0.3f), *cc = rnd(16, 0.3f), *inn = rnd(D, 1.0f);
    for (int i = 0; i < D; i++) rn[i] += 1.5f, inn[i] += 1.5f;
    tmat router = make_mat(G3N_BF16, A, D, 0);
    float *dS = dev(S, pn), *drn = vdev(rn, D), *dpc = vdev(pc, 64), *dcc = vdev(cc, 16), *dinn = vdev(inn, D);
    /* altup_predict_fused */
    float *pred = malloc(4 * pn), *x = malloc(4 * n);
    g3n_vec none = {0, NULL};
    REF->altup_predict_fused(REF, pred, x, S, NULL, none, &router.ref, (g3n_vec){D, rn}, (g3n_vec){64, pc},
                             (g3n_vec){D, inn}, A, R, D, 1e-6f);
    float *dpred = dev_nan(pn), *dx = dev_nan(n);
    B->altup_predict_fused(B, dpred, dx, dS, NULL, none, &router.b, (g3n_vec){D, drn}, (g3n_vec){64, dpc},
                           (g3n_vec){D, dinn}, A, R, D, 1e-6f);
    float *hp = host(dpred, pn);
    test_close("altup_predict_fused pred", hp, pred, pn, 1e-5, 1e-5);
    cmp("altup_predict_fused x", dx, x, n, 1e-5, 1e-5);
    { /* with the previous layer's per-layer input added to S first */
        float *S2 = malloc(4 * pn), *pp = rnd(n, 3.0f), *pred2 = malloc(4 * pn), x2r[200];
        memcpy(S2, S, 4 * pn);
        float *dS2 = dev(S, pn), *dpp = dev(pp, n), *dpred2 = dev_nan(pn), *dx2r = dev_nan(n);
        REF->altup_predict_fused(REF, pred2, x2r, S2, pp, (g3n_vec){D, inn}, &router.ref, (g3n_vec){D, rn},
                                 (g3n_vec){64, pc}, (g3n_vec){D, inn}, A, R, D, 1e-6f);
        B->altup_predict_fused(B, dpred2, dx2r, dS2, dpp, (g3n_vec){D, dinn}, &router.b, (g3n_vec){D, drn},
                               (g3n_vec){64, dpc}, (g3n_vec){D, dinn}, A, R, D, 1e-6f);
        cmp("altup_predict_fused+ple S", dS2, S2, pn, 1e-5, 1e-5);
        cmp("altup_predict_fused+ple pred", dpred2, pred2, pn, 1e-5, 1e-5);
        cmp("altup_predict_fused+ple x", dx2r, x2r, n, 1e-5, 1e-5);
        free(S2), free(pp), free(pred2), B->free(B, dpp);
    }
    /* matmul_multi: two products with different inputs and one shared */
    tmat W1 = make_mat(G3N_BF16, 40, D, 0), W2 = make_mat(G3N_BF16, 24, 64, 0), W3 = make_mat(G3N_BF16, 8, D, 0);
    float *x2 = rnd((size_t)R * 64, 1.0f), *dx2 = dev(x2, (size_t)R * 64), *dxx = dev(x, n);
    float y1[80], y2[48], y3[16];
    const g3n_mat *Wr[3] = {&W1.ref, &W2.ref, &W3.ref}, *Wb[3] = {&W1.b, &W2.b, &W3.b};
    float *yr[3] = {y1, y2, y3};
    const float *xr[3] = {x, x2, x};
    REF->matmul_multi(REF, 3, Wr, yr, xr, R);
    float *dy1 = dev_nan(80), *dy2 = dev_nan(48), *dy3 = dev_nan(16);
    float *yb[3] = {dy1, dy2, dy3};
    const float *xb[3] = {dxx, dx2, dxx};
    B->matmul_multi(B, 3, Wb, yb, xb, R);
    cmp("matmul_multi 0", dy1, y1, 80, 1e-5, 1e-5);
    cmp("matmul_multi 1", dy2, y2, 48, 1e-5, 1e-5);
    cmp("matmul_multi 2", dy3, y3, 16, 1e-5, 1e-5);
    /* the GEMV epilogues: gelu(W.x) * m, and gelu(Wg.x) * (Wu.x) */
    {
        tmat Wg = make_mat(G3N_BF16, 37, D, 0), Wu = make_mat(G3N_BF16, 37, D, 0);
        float *mm = rnd((size_t)R * 37, 1.0f), *dmm = dev(mm, (size_t)R * 37), y0[80], up[80];
        REF->matmul_gelu_mul(REF, y0, &Wg.ref, x, mm, R);
        float *dy = dev_nan((size_t)R * 37), *dup = dev_nan((size_t)R * 37);
        B->matmul_gelu_mul(B, dy, &Wg.b, dxx, dmm, R);
        cmp("matmul_gelu_mul", dy, y0, (size_t)R * 37, 1e-5, 1e-5 + rms_tol(y0, (size_t)R * 37, 1e-5));
        REF->matmul_gate_up(REF, y0, up, &Wg.ref, &Wu.ref, x, R);
        B->matmul_gate_up(B, dy = dev_nan((size_t)R * 37), dup, &Wg.b, &Wu.b, dxx, R);
        cmp("matmul_gate_up", dy, y0, (size_t)R * 37, 1e-5, 1e-5 + rms_tol(y0, (size_t)R * 37, 1e-5));
        free(Wg.mem), free(Wu.mem), free(mm), B->free(B, dmm), B->free(B, dup);
    }
    /* exact sparsity: products with a matrix the backend may store transposed,
     * and the whole sparse MLP (one row: the gather path; three: dense) */
    {
        for (int d = 0; d < 3; d++) {
            tmat Wt = make_mat_ex(DTYPES[d], 64, 200, 0, 1);
            int rs[3] = {1, 5, 9};
            for (int k = 0; k < 3; k++) {
                float *xt = rnd((size_t)rs[k] * 200, 1.0f), *dxt = dev(xt, (size_t)rs[k] * 200);
                float yt[9 * 64], *dyt = dev_nan((size_t)rs[k] * 64);
                REF->matmul(REF, yt, &Wt.ref, xt, rs[k]);
                B->matmul(B, dyt, &Wt.b, dxt, rs[k]);
                float *hy = host(dyt, (size_t)rs[k] * 64);
                char what[64];
                snprintf(what, sizeof what, "matmul (sparse_cols) %s R%d", g3n_dtype_name(DTYPES[d]), rs[k]);
                check_dots(what, hy, yt, &Wt.ref, xt, rs[k], 2e-6);
                free(hy), free(xt), B->free(B, dyt), B->free(B, dxt);
            }
            free(Wt.mem);
        }
        /* (I, D, dtype): gate rows over many and few blocks of the gather kernel, an
         * n_ff that is not a multiple of its block's entries, more than 256 groups of 8
         * outputs (more threads than gate entries), more than 2560 outputs (on a GPU
         * a thread's second turn over the down rows), and every stored dtype of the up
         * and down matrices */
        const int shapes[9][4] = {{4096, 64, G3N_BF16, G3N_BF16}, {8192, 96, G3N_BF16, G3N_BF16},
                                  {1056, 64, G3N_BF16, G3N_BF16}, {2048, 2112, G3N_BF16, G3N_BF16},
                                  {2048, 3072, G3N_BF16, G3N_BF16},
                                  {4096, 64, G3N_F16, G3N_F16},   {4096, 64, G3N_F32, G3N_BF16},
                                  {4096, 64, G3N_BF16, G3N_F32},  {4096, 64, G3N_F32, G3N_F32}};
        for (int sh = 0; sh < 9; sh++) {
            const int I = shapes[sh][0], DD = shapes[sh][1], dt = shapes[sh][2], dtd = shapes[sh][3];
            tmat Wg = make_mat(G3N_BF16, I, DD, 0), Wu = make_mat(dt, I, DD, 0);
            tmat Wd = make_mat_ex(dtd, DD, I, 0, 1);
            char what[64];
            snprintf(what, sizeof what, "mlp_sparse %s/%s I %d D %d", g3n_dtype_name(dt), g3n_dtype_name(dtd), I, DD);
            sparse_mlp_case(what, &Wg, &Wu, &Wd, I, DD, QBITS ? 1e-4 : 1e-5);
            free(Wg.mem), free(Wu.mem), free(Wd.mem);
        }
        if (!QBITS) { /* 4 bits in groups of 128 that straddle the gather kernel's blocks (96 entries
                       * each, G3N_SP_PER, read when the matrices are uploaded and at each launch) */
            setenv("G3N_SP_PER", "96", 1);
            const int I = 4096, DD = 128;
            tmat Wg = make_qmat_ex(4, 128, G3N_BF16, I, DD, 0, 0, 0), Wu = make_qmat_ex(4, 128, G3N_BF16, I, DD, 0, 0, 0);
            tmat Wd = make_qmat_ex(4, 128, G3N_BF16, DD, I, 0, 1, 0);
            sparse_mlp_case("mlp_sparse q4 g128, 96 entries a block", &Wg, &Wu, &Wd, I, DD, 1e-4);
            free(Wg.mem), free(Wu.mem), free(Wd.mem);
            unsetenv("G3N_SP_PER");
        }
    }
    /* qkv_post with a cache store, two tokens at positions 3 and 20 */
    float *q = rnd((size_t)R * H * hd, 1.0f), *k = rnd((size_t)R * Hkv * hd, 1.0f), *v = rnd((size_t)R * Hkv * hd, 1.0f);
    float *qn = rnd(hd, 1.0f), *kn = rnd(hd, 1.0f);
    float *cache = calloc((size_t)2 * cap * Hkv * hd, 4), *dcache = dev(cache, (size_t)2 * cap * Hkv * hd);
    g3n_kv kvr, kvb;
    memset(&kvr, 0, sizeof kvr);
    memset(&kvb, 0, sizeof kvb);
    kvr.layer[2] = (g3n_kv_layer){cache, cache + cap * Hkv * hd, cap, 0};
    kvb.layer[2] = (g3n_kv_layer){dcache, dcache + cap * Hkv * hd, cap, 0};
    g3n_kv *pr[1] = {&kvr}, *pb[1] = {&kvb};
    int32_t ids[2] = {0, 0}, pos[2] = {3, 20}, seq[2] = {0, 0};
    g3n_batch br = {R, ids, pos, seq, pr, 1}, bb = {R, ids, pos, seq, pb, 1};
    REF->batch_set(REF, &br);
    B->batch_set(B, &bb);
    float *dq = dev(q, (size_t)R * H * hd), *dk = dev(k, (size_t)R * Hkv * hd), *dv = dev(v, (size_t)R * Hkv * hd);
    float *dqn = vdev(qn, hd), *dkn = vdev(kn, hd);
    REF->qkv_post(REF, q, k, v, (g3n_vec){hd, qn}, (g3n_vec){hd, kn}, 2, H, Hkv, hd, 10000.0f, 1e-6f);
    B->qkv_post(B, dq, dk, dv, (g3n_vec){hd, dqn}, (g3n_vec){hd, dkn}, 2, H, Hkv, hd, 10000.0f, 1e-6f);
    cmp("qkv_post q", dq, q, (size_t)R * H * hd, 1e-5, 1e-5);
    cmp("qkv_post cache", dcache, cache, (size_t)2 * cap * Hkv * hd, 1e-5, 1e-5);
    /* attn_residual */
    float *att = rnd(n, 2.0f), *lau = rnd(n, 2.0f), *a = rnd(n, 1.0f), *w3 = rnd(3 * D, 1.0f), s_[200], u_[200];
    float *datt = dev(att, n), *dlau = dev(lau, n), *da = dev(a, n), *dw3 = vdev(w3, 3 * D);
    REF->attn_residual(REF, s_, u_, att, lau, x, a, (g3n_vec){D, w3}, (g3n_vec){D, w3 + D}, (g3n_vec){D, w3 + 2 * D}, R,
                       D, 1e-6f, 0.7071f);
    float *ds = dev_nan(n), *du = dev_nan(n);
    B->attn_residual(B, ds, du, datt, dlau, dxx, da, (g3n_vec){D, dw3}, (g3n_vec){D, dw3 + D},
                     (g3n_vec){D, dw3 + 2 * D}, R, D, 1e-6f, 0.7071f);
    cmp("attn_residual s", ds, s_, n, 1e-5, 1e-5);
    cmp("attn_residual u", du, u_, n, 1e-5, 1e-5);
    /* mlp_act, with and without top-k, over odd widths */
    int ffs[2] = {333, 1031};
    for (int i = 0; i < 2; i++)
        for (int tk = 0; tk < 2; tk++) {
            size_t m = (size_t)R * ffs[i];
            float *g = rnd(m, 2.0f), *up = rnd(m, 2.0f), *dg = dev(g, m), *dup = dev(up, m);
            REF->mlp_act(REF, g, up, R, ffs[i], tk ? 1.6448533535f : 0.0f);
            B->mlp_act(B, dg, dup, R, ffs[i], tk ? 1.6448533535f : 0.0f);
            cmp(tk ? "mlp_act top-k" : "mlp_act", dg, g, m, 1e-5, 1e-5);
            free(g), free(up), B->free(B, dup);
        }
    /* altup_correct_fused (with and without the output scale) */
    for (int sc = 0; sc < 2; sc++) {
        float *f = rnd(n, 2.0f), *sres = rnd(n, 1.0f), *p2 = malloc(4 * pn), qs[200];
        memcpy(p2, pred, 4 * pn);
        float *df = dev(f, n), *dsres = dev(sres, n), *dp2 = dev(pred, pn), *dqs = dev_nan(n);
        REF->altup_correct_fused(REF, p2, qs, f, sres, (g3n_vec){D, w3}, &router.ref, (g3n_vec){D, rn},
                                 (g3n_vec){16, cc}, (g3n_vec){D, sc ? inn : NULL}, A, R, D, 1e-6f);
        B->altup_correct_fused(B, dp2, dqs, df, dsres, (g3n_vec){D, dw3}, &router.b, (g3n_vec){D, drn},
                               (g3n_vec){16, dcc}, (g3n_vec){D, sc ? dinn : NULL}, A, R, D, 1e-6f);
        cmp("altup_correct_fused pred", dp2, p2, pn, 1e-5, 1e-5);
        cmp("altup_correct_fused qs", dqs, qs, n, 1e-5, 1e-5);
        free(f), free(sres), free(p2), B->free(B, df), B->free(B, dsres);
    }
    /* ple_add */
    float *proj = rnd(n, 3.0f), *dproj = dev(proj, n), *p3 = malloc(4 * pn), *dp3 = dev(pred, pn);
    memcpy(p3, pred, 4 * pn);
    REF->ple_add(REF, p3, proj, (g3n_vec){D, inn}, A, R, D, 1e-6f);
    B->ple_add(B, dp3, dproj, (g3n_vec){D, dinn}, A, R, D, 1e-6f);
    cmp("ple_add", dp3, p3, pn, 1e-5, 1e-5);
    /* altup_unembed, one of the planes so small that its magnitude is the floor */
    if (B->altup_unembed) {
        const size_t vn = (size_t)(A - 1) * n;
        float *S0 = rnd(n, 1.0f), *vv = rnd(vn, 2.0f), hu[200];
        for (size_t i = n; i < 2 * n; i++) vv[i] *= 1e-4f;
        float *dS0 = dev(S0, n), *dvv = dev(vv, vn), *dhu = dev_nan(n);
        REF->altup_unembed(REF, hu, S0, vv, n, (g3n_vec){D, inn}, A, R, D, 1e-5f, 1e-6f);
        B->altup_unembed(B, dhu, dS0, dvv, n, (g3n_vec){D, dinn}, A, R, D, 1e-5f, 1e-6f);
        cmp("altup_unembed", dhu, hu, n, 1e-5, 1e-5);
        if (B->magnitude_match_planes) { /* the same planes after S0, matched to it */
            float *P = malloc(4 * (n + vn));
            memcpy(P, S0, 4 * n), memcpy(P + n, vv, 4 * vn);
            float *dP = dev(P, n + vn);
            REF->magnitude_match_planes(REF, P, n, A, R, D, 1e-5f);
            B->magnitude_match_planes(B, dP, n, A, R, D, 1e-5f);
            cmp("magnitude_match_planes", dP, P, n + vn, 1e-5, 1e-5);
            free(P);
        }
        free(S0), free(vv), B->free(B, dS0), B->free(B, dvv);
    }
    free(S), free(rn), free(pc), free(cc), free(inn), free(pred), free(x), free(hp), free(x2), free(q), free(k);
    free(v), free(qn), free(kn), free(cache), free(att), free(lau), free(a), free(w3), free(proj), free(p3);
    free(router.mem), free(W1.mem), free(W2.mem), free(W3.mem);
    void *d[] = {dS, drn, dpc, dcc, dinn, dx2, dxx, dk, dv, dqn, dkn, datt, dlau, da, dw3, dproj, dpred};
    for (size_t i = 0; i < sizeof d / sizeof *d; i++) B->free(B, d[i]);
}

/* Shared ops checked against values computed here (the oracle itself). */
TEST(ref_ops_exact) {
    float x[7] = {-3, -0.5f, 0, 0.25f, 1, 2.5f, 10};
    float y[7];
    /* torch.nn.functional.gelu(approximate="tanh") at these points */
    const double gelu_ref[7] = {-0.0036373921, -0.1542859902, 0, 0.1496753507, 0.8411919906, 2.4849157339, 10};
    REF->gelu_mul(REF, y, x, NULL, 7);
    for (int i = 0; i < 7; i++) CHECK_MSG(fabs(y[i] - gelu_ref[i]) < 2e-6, "gelu(%g)=%.8g", x[i], y[i]);
    float g[7];
    memcpy(g, x, sizeof g);
    REF->gaussian_topk(REF, g, 1, 7, 1.6448533535f);
    double mean = 0, var = 0;
    for (int i = 0; i < 7; i++) mean += x[i];
    mean /= 7;
    for (int i = 0; i < 7; i++) var += (x[i] - mean) * (x[i] - mean);
    double cut = mean + sqrt(var / 7) * 1.6448533535;
    for (int i = 0; i < 7; i++) CHECK(fabs(g[i] - (x[i] > cut ? x[i] - cut : 0)) < 1e-5);
    CHECK(g[6] > 0 && g[5] == 0 && g[0] == 0);
    memcpy(y, x, sizeof y);
    REF->softcap(REF, y, 7, 30);
    for (int i = 0; i < 7; i++) CHECK(fabs(y[i] - 30 * tanh(x[i] / 30.0)) < 1e-6);
    float a[4] = {1, 2, 3, 4}, r[4] = {2, 2, 2, 2}, z[4] = {1e-4f, 0, 0, 0};
    REF->magnitude_match(REF, a, r, 1, 4, 1e-5f);
    CHECK(fabs(a[0] * a[0] + a[1] * a[1] + a[2] * a[2] + a[3] * a[3] - 16) < 1e-4);
    REF->magnitude_match(REF, z, r, 1, 4, 1e-5f); /* mean square 2.5e-9 < floor */
    CHECK(fabs(z[0] - 1e-4 * 2 / sqrt(1e-5)) < 1e-6);
    /* AltUp: SPEC §3.4 written out */
    const int A = 4, R = 2, D = 5;
    float *S = rnd((size_t)A * R * D, 1.0f), *m = rnd((size_t)R * A, 1.0f);
    float *pc = rnd((size_t)A * A * A, 0.5f), *cc = rnd((size_t)A * A, 0.5f), *o = rnd((size_t)R * D, 1.0f);
    float *pred = malloc(4 * (size_t)A * R * D), *corr = malloc(4 * (size_t)A * R * D);
    REF->altup_predict(REF, pred, S, m, (g3n_vec){A * A * A, pc}, A, R, D);
    REF->altup_correct(REF, corr, pred, o, m, (g3n_vec){A * A, cc}, A, R, D);
    for (int rr = 0; rr < R; rr++)
        for (int i = 0; i < A; i++)
            for (int d = 0; d < D; d++) {
                double p = S[(i * R + rr) * D + d];
                for (int j = 0; j < A; j++) {
                    double cf = 0;
                    for (int k = 0; k < A; k++) cf += pc[(A * i + j) * A + k] * m[rr * A + k];
                    p += cf * S[(j * R + rr) * D + d];
                }
                CHECK(fabs(p - pred[(i * R + rr) * D + d]) < 1e-5);
                double gain = 1;
                for (int k = 0; k < A; k++) gain += cc[i * A + k] * m[rr * A + k];
                double want = pred[(i * R + rr) * D + d] + gain * (o[rr * D + d] - pred[rr * D + d]);
                CHECK(fabs(want - corr[(i * R + rr) * D + d]) < 1e-5);
            }
    free(S), free(m), free(pc), free(cc), free(o), free(pred), free(corr);
    /* RoPE: rotate-half pairs (i, i + hd/2), angle p / theta^(2i/hd) */
    int hd = 6, H = 2;
    float *xr = rnd((size_t)2 * H * hd, 1.0f), yr[24];
    memcpy(yr, xr, sizeof(float) * 2 * H * hd);
    int32_t pos[2] = {0, 37}, seq[2] = {0, 0}, ids[2] = {0, 0};
    g3n_batch bt = {2, ids, pos, seq, NULL, 1};
    REF->batch_set(REF, &bt);
    REF->rope(REF, yr, H, hd, 10000.0f);
    for (int t = 0; t < 2; t++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < hd / 2; i++) {
                double ang = pos[t] / pow(10000.0, 2.0 * i / hd);
                const float *vv = xr + (t * H + h) * hd;
                CHECK(fabs(vv[i] * cos(ang) - vv[i + hd / 2] * sin(ang) - yr[(t * H + h) * hd + i]) < 1e-5);
                CHECK(fabs(vv[i + hd / 2] * cos(ang) + vv[i] * sin(ang) - yr[(t * H + h) * hd + i + hd / 2]) < 1e-5);
            }
    free(xr);
}

/* logits_top (where a backend offers it) against a sort in the sampler's order:
 * rows the width of Gemma's vocabulary and a narrow one, with ties, NaN, +-inf,
 * all -inf but a few, and the best crowded into one slice. */
TEST(logits_top) {
    if (!B->logits_top) {
        printf("  (no logits_top on this backend)\n");
        return;
    }
    /* rows of Gemma's width, a narrow one, one narrower than a slice; three rows
     * of each at a stride wider than a row */
    const int ns[3] = {262144, 5000, 700}, ms[5] = {1, 2, 65, 201, 256}, R = 3;
    float vals[3 * 256];
    int32_t ids[3 * 256];
    uint8_t ok[3];
    for (int ni = 0; ni < 3; ni++)
        for (int kind = 0; kind < 5; kind++) {
            const int n = ns[ni];
            const size_t stride = (size_t)n + 37;
            float *l = malloc(4 * stride * R);
            int *idx = malloc(sizeof(int) * (size_t)n * R);
            for (size_t i = 0; i < stride * R; i++) {
                const int c = (int)(i % stride);
                float x = test_randf() * 8.0f;
                if (kind == 1) x = floorf(x); /* ties */
                if (kind == 2 && c % 101 == 3) x = NAN;
                if (kind == 2 && c % 307 == 9) x = c % 2 ? INFINITY : -INFINITY;
                if (kind == 3) x = -INFINITY;
                if (kind == 4 && c >= 2048 * 1 && c < 2048 * 1 + 600) x += 100.0f; /* one slice */
                l[i] = c < n ? x : 1e30f; /* past the row: never a candidate */
            }
            if (kind == 3)
                for (int r = 0; r < R; r++)
                    for (int j = 0; j < 40; j++) l[r * stride + (size_t)((j * 7919 + r) % n)] = test_randf();
            for (int r = 0; r < R; r++) test_logit_order(l + r * stride, n, idx + (size_t)r * n);
            float *dl = dev(l, stride * R);
            for (int mi = 0; mi < 5; mi++) {
                const int m = ms[mi];
                if (!B->logits_top(B, dl, R, stride, n, m, vals, ids, ok)) {
                    CHECK_MSG(0, "logits_top declined n %d kind %d m %d", n, kind, m);
                    continue;
                }
                int bad = 0;
                for (int r = 0; r < R; r++) {
                    CHECK_MSG(ok[r], "logits_top row %d not done: n %d kind %d m %d", r, n, kind, m);
                    for (int i = 0; i < m && ok[r]; i++) {
                        const int want_id = idx[(size_t)r * n + i];
                        const float want = test_clean_logit(l[r * stride + (size_t)want_id]);
                        bad += ids[r * m + i] != want_id || memcmp(&vals[r * m + i], &want, 4) != 0;
                    }
                }
                CHECK_MSG(!bad, "logits_top n %d kind %d m %d: %d of the best differ", n, kind, m, bad);
            }
            for (int mi = 0; mi < 5 && B->logits_top_queue; mi++) { /* row 0, queued as with a step */
                const int m = ms[mi];
                const int q = B->logits_top_queue(B, dl, 1, stride, n, m);
                CHECK_MSG(q || m > 1, "logits_top_queue declined m 1 (n %d kind %d)", n, kind);
                if (!B->logits_top(B, dl, 1, 0, n, m, vals, ids, ok) || !ok[0]) {
                    CHECK_MSG(0, "logits_top after its queue declined n %d kind %d m %d", n, kind, m);
                    continue;
                }
                int bad = 0;
                for (int i = 0; i < m; i++) {
                    const float want = test_clean_logit(l[idx[i]]);
                    bad += ids[i] != idx[i] || memcmp(&vals[i], &want, 4) != 0;
                }
                CHECK_MSG(!bad, "logits_top queued n %d kind %d m %d (queued %d): %d of the best differ", n, kind, m, q,
                          bad);
            }
            if (B->logits_top_queue && ni == 0 && kind == 0) { /* the results are the queued step's */
                for (int mi = 0; mi < 3; mi++) {
                    const int m = ms[mi];
                    CHECK(B->logits_top_queue(B, dl, 1, stride, n, m));
                    float *l2 = malloc(4 * (size_t)n);
                    for (int i = 0; i < n; i++) l2[i] = -l[i]; /* another order */
                    B->write(B, dl, l2, 4 * (size_t)n);
                    CHECK(B->logits_top(B, dl, 1, 0, n, m, vals, ids, ok) && ok[0]);
                    CHECK_MSG(ids[0] == idx[0] && ids[m - 1] == idx[m - 1], "logits_top m %d: not the queued logits", m);
                    B->write(B, dl, l, 4 * (size_t)n);
                    free(l2);
                }
            }
            B->free(B, dl), free(l), free(idx);
        }
}

static void run_backend(void) {
    /* a wide step first: lets a GPU backend size its prompt-product scratch, so
     * the products of more than a few rows take that path */
    static int32_t z[64];
    g3n_batch wide = {64, z, z, z, NULL, 1};
    B->batch_set(B, &wide);
    RUN(matmul);
    RUN(matmul_large);
    RUN(matmul_multi_rows);
    RUN(qmatmul);
    RUN(qmatmul_large);
    RUN(qmatmul_flat_bitwise);
    RUN(qmatmul_mmflat_bitwise);
    RUN(matmul_parts);
    RUN(qmatmul_fused_odd);
    RUN(qembed);
    RUN(rmsnorm);
    RUN(attention);
    RUN(attention_f16);
    RUN(qkv_attention);
    RUN(qkv_attention_f16);
    RUN(qkv_attention_split);
    RUN(qkv_attention_kernels);
    RUN(attention_alone_bitwise);
    RUN(batch_ops);
    RUN(small_ops);
    RUN(elementwise_large);
    RUN(fused_ops);
    RUN(row_kernels);
    RUN(correct_gate);
    RUN(fused_ops_q4);
    RUN(fused_ops_q8);
    RUN(logits_top);
    RUN(unembed_pruned);
}

int main(int argc, char **argv) {
    test_init(argc, argv);
    char err[256];
    REF = cpu_ref_backend_create(err, sizeof err);
    B = REF;
    RUN(matmul_ref_exact);
    RUN(attention_ref_exact);
    RUN(ref_ops_exact);
    RUN(quant_format);
    B = cpu_backend_create(2, err, sizeof err);
    B_IS_CPU = 1;
    const char *isas[3] = {"avx512", "avx2", "scalar"};
    const int cpu = !getenv("G3N_TEST_CUDA_ONLY"); /* on the GPU machine: the CUDA ops only */
    for (int i = 0; i < 3 && cpu; i++) {
        if (cpu_set_isa(isas[i]) != 0) {
            printf("(kernel set %s not available on this machine)\n", isas[i]);
            continue;
        }
        printf("-- cpu, kernels: %s\n", cpu_isa_name());
        run_backend();
    }
    B->destroy(B);
    release_kept();
#ifdef G3N_CUDA
    if (cuda_available()) {
        g3n_cuda_opts o = {0, 0, 0};
        B = cuda_backend_create(&o, err, sizeof err);
        CHECK_MSG(B != NULL, "%s", err);
        if (B) {
            B_IS_CPU = 0;
            TOL = 1e-5;
            printf("-- cuda\n");
            run_backend();
            B->destroy(B);
            release_kept();
        }
    } else {
        printf("(no GPU: CUDA ops not tested)\n");
        CHECK(getenv("G3N_REQUIRE_CUDA") == NULL);
    }
#endif
    REF->destroy(REF);
    return test_summary();
}
