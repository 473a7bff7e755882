/* test_ops.c: every op of the fast CPU backend against the reference backend
 * (cpu_ref.c), across awkward shapes (1, odd, not multiples of 4/8/16/32), all
 * weight dtypes and every kernel set this machine has (scalar, AVX2, AVX-512).
 * Also a few reference ops against values computed independently here, so the
 * oracle itself is checked, and the kernel property the model tests rely on:
 * one row gives bitwise the same output alone as inside a block of rows. */
#include <math.h>

#include "test.h"

#include "backend/cpu/cpu_internal.h"

#define OP_TOL 2e-6

static g3n_backend *REF, *FAST;

static float *rnd(size_t n, float scale) {
    float *p = malloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) p[i] = test_randf() * scale;
    return p;
}

/* A weight matrix of random values stored as dtype (bf16/f16 rounded from f32). */
static g3n_mat make_mat(int dtype, int rows, int cols, void **mem) {
    size_t n = (size_t)rows * cols;
    g3n_mat m = {dtype, rows, cols, NULL, "test"};
    if (dtype == G3N_F32) {
        float *p = rnd(n, 1.0f);
        *mem = p;
    } else {
        uint16_t *p = malloc(2 * (n ? n : 1));
        for (size_t i = 0; i < n; i++)
            p[i] = dtype == G3N_BF16 ? g3n_f32_to_bf16(test_randf()) : g3n_f32_to_f16(test_randf());
        *mem = p;
    }
    m.data = *mem;
    return m;
}

static const int DTYPES[3] = {G3N_F32, G3N_F16, G3N_BF16};

TEST(matmul) {
    int rows_s[] = {1, 2, 3, 4, 5, 7, 9};
    int out_s[] = {1, 3, 4, 5, 17, 33};
    int in_s[] = {1, 7, 15, 16, 17, 31, 33, 64, 100, 257};
    for (int d = 0; d < 3; d++)
        for (size_t a = 0; a < sizeof rows_s / sizeof *rows_s; a++)
            for (size_t b = 0; b < sizeof out_s / sizeof *out_s; b++)
                for (size_t c = 0; c < sizeof in_s / sizeof *in_s; c++) {
                    int R = rows_s[a], O = out_s[b], K = in_s[c];
                    void *mem;
                    g3n_mat W = make_mat(DTYPES[d], O, K, &mem);
                    float *x = rnd((size_t)R * K, 2.0f);
                    float *y0 = malloc(4 * (size_t)R * O), *y1 = malloc(4 * (size_t)R * O);
                    for (int i = 0; i < R * O; i++) y1[i] = NAN; /* poison: every output written */
                    REF->matmul(REF, y0, &W, x, R);
                    FAST->matmul(FAST, y1, &W, x, R);
                    char what[96];
                    snprintf(what, sizeof what, "matmul %s R%d O%d K%d", g3n_dtype_name(DTYPES[d]), R, O, K);
                    test_close(what, y1, y0, (size_t)R * O, OP_TOL, 1e-5 * sqrt(K));
                    /* a row alone == the same row inside the block, bit for bit */
                    float *y2 = malloc(4 * (size_t)O);
                    FAST->matmul(FAST, y2, &W, x + (size_t)(R - 1) * K, 1);
                    CHECK_MSG(memcmp(y2, y1 + (size_t)(R - 1) * O, 4 * (size_t)O) == 0, "%s: row differs alone", what);
                    free(y2);
                    free(mem);
                    free(x);
                    free(y0);
                    free(y1);
                }
}

/* cpu_ref's matmul against a sum computed here in long double. */
TEST(matmul_ref_exact) {
    void *mem;
    g3n_mat W = make_mat(G3N_BF16, 5, 37, &mem);
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
    int dim_s[] = {1, 5, 16, 33, 256, 257};
    for (size_t a = 0; a < 3; a++)
        for (size_t b = 0; b < sizeof dim_s / sizeof *dim_s; b++)
            for (int with_w = 0; with_w < 2; with_w++) {
                int R = rows_s[a], N = dim_s[b];
                float *x = rnd((size_t)R * N, 3.0f), *w = rnd((size_t)N, 1.5f);
                float *y0 = malloc(4 * (size_t)R * N), *y1 = malloc(4 * (size_t)R * N);
                g3n_vec wv = {N, with_w ? w : NULL};
                REF->rmsnorm(REF, y0, x, wv, R, N, 1e-6f);
                FAST->rmsnorm(FAST, y1, x, wv, R, N, 1e-6f);
                char what[64];
                snprintf(what, sizeof what, "rmsnorm R%d N%d w%d", R, N, with_w);
                test_close(what, y1, y0, (size_t)R * N, OP_TOL, 1e-6);
                /* in place, as forward.c uses it */
                FAST->rmsnorm(FAST, x, x, wv, R, N, 1e-6f);
                CHECK(memcmp(x, y1, 4 * (size_t)R * N) == 0);
                /* independent check of the reference: mean of squares is 1 without w */
                if (!with_w && N > 8) {
                    double ss = 0;
                    for (int i = 0; i < N; i++) ss += (double)y0[i] * y0[i];
                    CHECK(fabs(ss / N - 1) < 1e-4);
                }
                free(x), free(w), free(y0), free(y1);
            }
}

/* K/V for `n_seq` sequences, `n` query tokens at scattered positions (ring wrap,
 * window edges, GQA groups), against the reference. */
static void attention_case(int n_head, int n_head_kv, int hd, int window, int cap, int n,
                           int pos0) {
    int kvd = n_head_kv * hd;
    g3n_kv kv[2];
    memset(kv, 0, sizeof kv);
    float *mem[2];
    for (int s = 0; s < 2; s++) {
        mem[s] = rnd((size_t)2 * cap * kvd, 1.5f);
        kv[s].layer[3].k = mem[s];
        kv[s].layer[3].v = mem[s] + (size_t)cap * kvd;
        kv[s].layer[3].cap = cap;
    }
    g3n_kv *kvs[2] = {&kv[0], &kv[1]};
    int32_t pos[64], seq[64], ids[64] = {0};
    for (int t = 0; t < n; t++) {
        seq[t] = t % 2;
        pos[t] = pos0 + t / 2; /* each sequence's positions increase */
        if (window <= 0) G3N_ASSERT(pos[t] < cap);
    }
    g3n_batch b = {n, ids, pos, seq, kvs, 2};
    REF->batch_set(REF, &b);
    FAST->batch_set(FAST, &b);
    float *q = rnd((size_t)n * n_head * hd, 1.0f);
    float *o0 = malloc(4 * (size_t)n * n_head * hd), *o1 = malloc(4 * (size_t)n * n_head * hd);
    REF->attention(REF, o0, q, 3, n_head, n_head_kv, hd, window);
    FAST->attention(FAST, o1, q, 3, n_head, n_head_kv, hd, window);
    char what[96];
    snprintf(what, sizeof what, "attention H%d/%d hd%d win%d cap%d n%d pos%d", n_head, n_head_kv, hd,
             window, cap, n, pos0);
    test_close(what, o1, o0, (size_t)n * n_head * hd, 1e-5, 1e-5);
    free(q), free(o0), free(o1), free(mem[0]), free(mem[1]);
}

TEST(attention) {
    attention_case(4, 2, 32, 0, 64, 6, 0);
    attention_case(8, 2, 33, 0, 100, 7, 40);
    attention_case(3, 3, 5, 0, 20, 3, 17);
    attention_case(4, 1, 16, 8, 12, 10, 0);   /* sliding, ring of window + 4 */
    attention_case(4, 2, 32, 8, 15, 14, 93);  /* wrapped many times */
    attention_case(2, 1, 256, 512, 515, 4, 1000);
    attention_case(4, 4, 7, 1, 3, 5, 9);      /* window of one: only itself */
}

/* The reference attention against a direct softmax computed here (one query). */
TEST(attention_ref_exact) {
    int hd = 8, cap = 6, p = 9, window = 4; /* keys 6..9 live in slots 0,1,2,3 */
    g3n_kv kv;
    memset(&kv, 0, sizeof kv);
    float *k = rnd((size_t)cap * hd, 1.0f), *v = rnd((size_t)cap * hd, 1.0f), *q = rnd(hd, 1.0f);
    kv.layer[0] = (g3n_kv_layer){k, v, cap};
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

/* Ops both backends share, checked against values computed here. */
TEST(small_ops_exact) {
    float x[7] = {-3, -0.5f, 0, 0.25f, 1, 2.5f, 10};
    float y[7];
    /* gelu_tanh at known points (torch.nn.functional.gelu(approximate="tanh")) */
    const double gelu_ref[7] = {-0.0036373921, -0.1542859902, 0, 0.1496753507, 0.8411919906, 2.4849157339, 10};
    FAST->gelu_mul(FAST, y, x, NULL, 7);
    for (int i = 0; i < 7; i++) CHECK_MSG(fabs(y[i] - gelu_ref[i]) < 2e-6, "gelu(%g)=%.8g", x[i], y[i]);
    /* gaussian top-k: mean 10/7, population std; only values above the cutoff survive */
    float g[7];
    memcpy(g, x, sizeof g);
    FAST->gaussian_topk(FAST, g, 1, 7, 1.6448533535f);
    double m = 0, v = 0;
    for (int i = 0; i < 7; i++) m += x[i];
    m /= 7;
    for (int i = 0; i < 7; i++) v += (x[i] - m) * (x[i] - m);
    double cut = m + sqrt(v / 7) * 1.6448533535;
    for (int i = 0; i < 7; i++) CHECK(fabs(g[i] - (x[i] > cut ? x[i] - cut : 0)) < 1e-5);
    CHECK(g[6] > 0 && g[5] == 0 && g[0] == 0);
    /* softcap */
    memcpy(y, x, sizeof y);
    FAST->softcap(FAST, y, 7, 30);
    for (int i = 0; i < 7; i++) CHECK(fabs(y[i] - 30 * tanh(x[i] / 30.0)) < 1e-6);
    /* magnitude match: y rescaled to ref's rms, with the 1e-5 mean-square floor */
    float a[4] = {1, 2, 3, 4}, r[4] = {2, 2, 2, 2}, z[4] = {1e-4f, 0, 0, 0};
    FAST->magnitude_match(FAST, a, r, 1, 4, 1e-5f);
    CHECK(fabs(a[0] * a[0] + a[1] * a[1] + a[2] * a[2] + a[3] * a[3] - 16) < 1e-4);
    FAST->magnitude_match(FAST, z, r, 1, 4, 1e-5f); /* ms 2.5e-9 < floor */
    CHECK(fabs(z[0] - 1e-4 * 2 / sqrt(1e-5)) < 1e-6);
}

/* AltUp predict/correct against the formulas of SPEC §3.4, written out here. */
TEST(altup_exact) {
    const int A = 4, R = 2, D = 5;
    float *S = rnd((size_t)A * R * D, 1.0f), *m = rnd((size_t)R * A, 1.0f);
    float *pc = rnd((size_t)A * A * A, 0.5f), *cc = rnd((size_t)A * A, 0.5f), *o = rnd((size_t)R * D, 1.0f);
    float *pred = malloc(4 * (size_t)A * R * D), *corr = malloc(4 * (size_t)A * R * D);
    FAST->altup_predict(FAST, pred, S, m, (g3n_vec){A * A * A, pc}, A, R, D);
    FAST->altup_correct(FAST, corr, pred, o, m, (g3n_vec){A * A, cc}, A, R, D);
    for (int r = 0; r < R; r++)
        for (int i = 0; i < A; i++)
            for (int d = 0; d < D; d++) {
                double p = S[(i * R + r) * D + d];
                for (int j = 0; j < A; j++) {
                    double c = 0;
                    for (int k = 0; k < A; k++) c += pc[(A * i + j) * A + k] * m[r * A + k];
                    p += c * S[(j * R + r) * D + d];
                }
                CHECK(fabs(p - pred[(i * R + r) * D + d]) < 1e-5);
                double gain = 1;
                for (int k = 0; k < A; k++) gain += cc[i * A + k] * m[r * A + k];
                double want = pred[(i * R + r) * D + d] + gain * (o[r * D + d] - pred[r * D + d]);
                CHECK(fabs(want - corr[(i * R + r) * D + d]) < 1e-5);
            }
    free(S), free(m), free(pc), free(cc), free(o), free(pred), free(corr);
}

/* RoPE: rotate-half pairs (i, i + hd/2), fp32 angles p / theta^(2i/hd). */
TEST(rope_exact) {
    int hd = 6, H = 2;
    float *x = rnd((size_t)2 * H * hd, 1.0f), y[24];
    memcpy(y, x, sizeof(float) * 2 * H * hd);
    int32_t pos[2] = {0, 37}, seq[2] = {0, 0}, ids[2] = {0, 0};
    g3n_batch b = {2, ids, pos, seq, NULL, 1};
    FAST->batch_set(FAST, &b);
    FAST->rope(FAST, y, H, hd, 10000.0f);
    for (int t = 0; t < 2; t++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < hd / 2; i++) {
                double ang = pos[t] / pow(10000.0, 2.0 * i / hd);
                const float *v = x + (t * H + h) * hd;
                double a = v[i] * cos(ang) - v[i + hd / 2] * sin(ang);
                double c = v[i + hd / 2] * cos(ang) + v[i] * sin(ang);
                CHECK(fabs(a - y[(t * H + h) * hd + i]) < 1e-5);
                CHECK(fabs(c - y[(t * H + h) * hd + i + hd / 2]) < 1e-5);
            }
    free(x);
}

static void run_all(void) {
    RUN(matmul);
    RUN(rmsnorm);
    RUN(attention);
    RUN(small_ops_exact);
    RUN(altup_exact);
    RUN(rope_exact);
}

int main(int argc, char **argv) {
    test_init(argc, argv);
    char err[256];
    REF = cpu_ref_backend_create(err, sizeof err);
    FAST = cpu_backend_create(2, err, sizeof err);
    RUN(matmul_ref_exact);
    RUN(attention_ref_exact);
    const char *isas[3] = {"avx512", "avx2", "scalar"};
    for (int i = 0; i < 3; i++) {
        if (cpu_set_isa(isas[i]) != 0) {
            printf("(kernel set %s not available on this machine)\n", isas[i]);
            continue;
        }
        printf("-- kernels: %s\n", cpu_isa_name());
        run_all();
    }
    REF->destroy(REF);
    FAST->destroy(FAST);
    return test_summary();
}
