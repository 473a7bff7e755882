/* test_launch.c: the CUDA backend's launch arithmetic and L2 prefetch plan
 * (src/backend/cuda/launch_shape.h) swept on the CPU over GPUs of other sizes
 * and over every product shape in range, odd ones too: no division by zero,
 * and the properties k_qmma relies on (a slice is whole ring stages, the
 * slices cover the groups, no cluster where the GPU has none). CI has no GPU,
 * so this is where such host code runs before a GPU does. */
#include "test.h"

#include "backend/cuda/launch_shape.h"

static const int SMS[] = {1, 2, 8, 46, 66, 108, 132, 144, 170};
#define N_SMS ((int)(sizeof SMS / sizeof *SMS))

static int pow2_le8(int v) { return v == 1 || v == 2 || v == 4 || v == 8; }

/* Every shape's rows a block and slices are candidates, gate/up's rows a block
 * at least 2 (a row tile is one gate and one up tile), no slices without
 * clusters; G3N_QMMA's override wins where it is allowed. */
TEST(mm_shape) {
    int bad = 0;
    for (int a = 0; a < N_SMS; a++)
        for (int cl = 0; cl < 2; cl++)
            for (int G = 32; G <= 128; G *= 2)
                for (int kind = MM_PLAIN; kind <= MM_DOWN; kind++)
                    for (int tiles = 1; tiles <= 1100 && bad < 5; tiles += 7)
                        for (int ng = 0; ng <= 700 && bad < 5; ng += 3) {
                            int rb = 0, cs = 0;
                            mm_shape_for(SMS[a], cl, 0, 0, tiles, ng, G, kind, &rb, &cs);
                            const int ok =
                                pow2_le8(rb) && pow2_le8(cs) && (kind != MM_GATE_UP || rb >= 2) && (cl || cs == 1);
                            if (!ok) bad++;
                            CHECK_MSG(ok, "sms %d clusters %d G %d kind %d tiles %d ng %d: rb %d cs %d", SMS[a], cl, G,
                                      kind, tiles, ng, rb, cs);
                        }
    int rb, cs;
    mm_shape_for(132, 1, 4, 2, 300, 64, 64, 0, &rb, &cs);
    CHECK(rb == 4 && cs == 2);
    mm_shape_for(132, 1, 1, 0, 300, 64, 64, MM_GATE_UP, &rb, &cs); /* gate/up: at least 2 rows a block */
    CHECK(rb == 2);
    mm_shape_for(132, 0, 0, 4, 300, 64, 64, 0, &rb, &cs); /* no clusters: the override's slices are refused */
    CHECK(cs == 1);
    /* E4B's sparse-layer gate (16384 x 2048, plain): two blocks an SM, no slices;
     * its dense gate/up (two tiles a row tile) as before: 256 blocks of 8 */
    mm_shape_for(132, 1, 0, 0, 1024, 32, 64, 0, &rb, &cs);
    CHECK(rb == 4 && cs == 1);
    mm_shape_for(132, 1, 0, 0, 2048, 32, 64, MM_GATE_UP, &rb, &cs);
    CHECK(rb == 8 && cs == 1);
    /* E2B's (8192 x 2048): two blocks an SM would leave a warp 8 groups: one, as before */
    mm_shape_for(132, 1, 0, 0, 512, 32, 64, 0, &rb, &cs);
    CHECK(rb == 4 && cs == 1);
    /* the down products (E4B 2048 x 16384, E2B 2048 x 8192): 16 x 8 blocks, one an SM;
     * without clusters no slices (the plain rule: 128 blocks of one tile) */
    mm_shape_for(132, 1, 0, 0, 128, 256, 64, MM_DOWN, &rb, &cs);
    CHECK(rb == 8 && cs == 8);
    mm_shape_for(132, 1, 0, 0, 128, 128, 64, MM_DOWN, &rb, &cs);
    CHECK(rb == 8 && cs == 8);
    mm_shape_for(132, 0, 0, 0, 128, 256, 64, MM_DOWN, &rb, &cs);
    CHECK(cs == 1);
    /* a GPU with fewer SMs than those blocks (the H100 PCIe's 114): the plain rule */
    int prb, pcs;
    mm_shape_for(114, 1, 0, 0, 128, 256, 64, MM_DOWN, &rb, &cs);
    mm_shape_for(114, 1, 0, 0, 128, 256, 64, MM_PLAIN, &prb, &pcs);
    CHECK(rb == prb && cs == pcs && (128 + rb - 1) / rb * cs <= 114 * 2);
}

/* ng groups in at most cs slices of whole ring stages: ks a positive multiple
 * of SG, slices <= cs, the slices cover ng and none is empty. */
TEST(mm_slices) {
    int bad = 0;
    for (int ng = 1; ng <= 2000 && bad < 5; ng++)
        for (int cs = 1; cs <= 8; cs++)
            for (int SG = 1; SG <= 4; SG *= 2) {
                int ks = 0;
                const int n = mm_slices(ng, cs, SG, &ks);
                const int ok = ks >= SG && ks % SG == 0 && n >= 1 && n <= cs && n * ks >= ng && (n - 1) * ks < ng;
                if (!ok) bad++;
                CHECK_MSG(ok, "ng %d cs %d SG %d: %d slices of %d", ng, cs, SG, n, ks);
            }
}

/* Any O x K, including those that are no quantized product (K below one group
 * or not a multiple of it: the odd gate/up shapes of test_ops, whose "down"
 * crashed here with a division by zero, twenty-second session): a block count
 * of at least 1, or INT_MAX for no product; and the count is what the shape and
 * the slices make. */
TEST(mm_plain_blocks) {
    int bad = 0;
    for (int a = 0; a < N_SMS; a++)
        for (int cl = 0; cl < 2; cl++)
            for (int G = 32; G <= 128; G *= 2)
                for (int SG = 1; SG <= 4; SG *= 2)
                    for (int O = 1; O <= 20000 && bad < 5; O += 97)
                        for (int K = 0; K <= 20000 && bad < 5; K += 61) {
                            const int b = mm_plain_blocks_for(SMS[a], cl, 0, 0, O, K, G, SG);
                            int want = INT_MAX;
                            if (K >= G && K % G == 0) {
                                int rb, cs, ks;
                                mm_shape_for(SMS[a], cl, 0, 0, (O + 15) / 16, K / G, G, K > O ? MM_DOWN : MM_PLAIN,
                                             &rb, &cs);
                                want = ((O + 15) / 16 + rb - 1) / rb * mm_slices(K / G, cs, SG, &ks);
                            }
                            const int ok = b == want && b >= 1;
                            if (!ok) bad++;
                            CHECK_MSG(ok, "sms %d O %d K %d G %d SG %d: %d blocks, want %d", SMS[a], O, K, G, SG, b,
                                      want);
                        }
    CHECK(mm_plain_blocks_for(132, 1, 0, 0, 2048, 37, 64, 2) == INT_MAX); /* K < G */
    CHECK(mm_plain_blocks_for(132, 1, 0, 0, 2048, 96, 64, 2) == INT_MAX); /* K % G */
    CHECK(mm_plain_blocks_for(132, 1, 0, 0, 2048, 0, 64, 2) == INT_MAX);
    /* E4B's 8-bit down product (2048 x 16384, groups of 64): 128 blocks on the
     * H100, so gate/up triggers early and the down product is padded */
    CHECK(mm_plain_blocks_for(132, 1, 0, 0, 2048, 16384, 64, 2) == 128);
}

/* The MLP's matrices of the published shapes (gate, up, down; bytes with
 * scales and biases, groups of 64) */
static pf_mat mlp_mat(int D, int I, int bits) {
    const size_t n = (size_t)D * I;
    return (pf_mat){bits ? n * bits / 8 + n / 64 * 4 : n * 2, bits, 1};
}

/* The prefetch plan: whole matrices only at 4 bits or fewer, together within
 * 3/4 of the L2, none where the attention reads more; otherwise a share of
 * about `part` bytes spread over the first product's matrices. The published
 * shapes on the H100 (50 MB of L2): E4B 4-bit's gate and up whole (37.7 MB),
 * E2B bf16's gate (33.5 MB, which fits) spread, as measured faster
 * (docs/SPEED.md, twenty-third session). */
TEST(pf_plan) {
    const size_t l2 = 50u << 20, part = l2 / 6;
    static const int BITS[] = {0, 2, 3, 4, 5, 6, 8};
    int bad = 0;
    for (int b = 0; b < 7; b++)
        for (int D = 64; D <= 4096 && bad < 5; D += 192)
            for (int I = 64; I <= 20000 && bad < 5; I += 997)
                for (int n = 1; n <= 3; n++)
                    for (int most = 0; most <= 3; most++)
                        for (int kv = 0; kv < 3; kv++) {
                            pf_mat m[3] = {mlp_mat(D, I, BITS[b]), mlp_mat(D, I, BITS[b]), mlp_mat(I, D, BITS[b])};
                            const size_t kvb = kv == 0 ? 0 : kv == 1 ? m[0].bytes : (size_t)1 << 40;
                            int spread = -1;
                            unsigned stride = 0;
                            const int w = pf_plan(m, n, most, l2, part, kvb, &spread, &stride);
                            size_t tot = 0;
                            for (int i = 0; i < w; i++) tot += m[i].bytes;
                            int ok = w >= 0 && w <= n && w <= most && tot <= l2 / 4 * 3;
                            if (w) ok = ok && BITS[b] >= 1 && BITS[b] <= 4 && kvb <= tot && spread == 0;
                            if (!w && spread) {
                                const size_t sum = m[0].bytes * (size_t)spread;
                                ok = ok && spread <= n && stride >= 2 && sum / stride <= part &&
                                     (stride == 2 || sum / (stride - 1) > part);
                            }
                            /* 4 bits or fewer, nothing in the way, the first fits: it is asked for whole */
                            if (BITS[b] >= 1 && BITS[b] <= 4 && most >= 1 && kv == 0 && m[0].bytes <= l2 / 4 * 3)
                                ok = ok && w >= 1;
                            if (BITS[b] == 0 || BITS[b] > 4) ok = ok && w == 0 && spread >= 1;
                            if (!ok) bad++;
                            CHECK_MSG(ok, "bits %d D %d I %d n %d most %d kv %d: whole %d spread %d stride %u",
                                      BITS[b], D, I, n, most, kv, w, spread, stride);
                        }
    pf_mat e4b_q4[3] = {mlp_mat(2048, 16384, 4), mlp_mat(2048, 16384, 4), mlp_mat(16384, 2048, 4)};
    int spread;
    unsigned stride;
    CHECK(pf_plan(e4b_q4, 3, 2, l2, part, 0, &spread, &stride) == 2);
    pf_mat e2b_bf16[3] = {mlp_mat(2048, 8192, 0), mlp_mat(2048, 8192, 0), mlp_mat(8192, 2048, 0)};
    CHECK(pf_plan(e2b_bf16, 3, 2, l2, part, 0, &spread, &stride) == 0 && spread == 2 && stride == 8);
    CHECK(pf_plan(e2b_bf16, 1, 2, l2, part, 0, &spread, &stride) == 0 && spread == 1 && stride == 4);
    pf_mat e2b_q8[3] = {mlp_mat(2048, 8192, 8), mlp_mat(2048, 8192, 8), mlp_mat(8192, 2048, 8)};
    CHECK(pf_plan(e2b_q8, 3, 2, l2, part, 0, &spread, &stride) == 0 && spread == 2);
    CHECK(pf_plan(e2b_q8, 3, 2, l2, 0, 0, &spread, &stride) == 0 && spread == 0); /* no share asked for */
    /* the share the backend asks for now at 8 bits (5/8 of the L2, cuda.cu):
     * every third 16 KB of E4B 8-bit's gate and up (71.3 MB) */
    pf_mat e4b_q8[3] = {mlp_mat(2048, 16384, 8), mlp_mat(2048, 16384, 8), mlp_mat(16384, 2048, 8)};
    CHECK(pf_plan(e4b_q8, 3, 2, l2, l2 / 8 * 5, 0, &spread, &stride) == 0 && spread == 2 && stride == 3);
    e4b_q4[0].ok = 0; /* not on the GPU: nothing */
    CHECK(pf_plan(e4b_q4, 3, 2, l2, part, 0, &spread, &stride) == 0 && spread == 0);
}

int main(int argc, char **argv) {
    test_init(argc, argv);
    RUN(mm_shape);
    RUN(mm_slices);
    RUN(mm_plain_blocks);
    RUN(pf_plan);
    return test_summary();
}
