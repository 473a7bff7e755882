/* launch_shape.h: the plain arithmetic behind a k_qmma launch (quant.cu) and
 * the L2 prefetch's plan (cuda.cu), in C with no CUDA types, so that
 * tests/test_launch.c sweeps it on the CPU, where CI runs: host code in a .cu
 * file is built there but never run, and a division by zero in it once crashed
 * test_ops on the H100 only (docs/SPEED.md, twenty-second session). The GPU's
 * part comes in as numbers: its SMs, whether it has thread-block clusters, and
 * G3N_QMMA's override. */
#ifndef G3N_LAUNCH_SHAPE_H
#define G3N_LAUNCH_SHAPE_H

#include <limits.h>
#include <stddef.h>

/* What a k_qmma launch computes (mm_shape_for's `kind`) */
enum { MM_PLAIN, MM_GATE_UP, MM_DOWN };

/* The kind of a launch of n products (gu: gate and up together), the first
 * O x K: a down product is one product with more inputs than outputs */
static inline int mm_kind(int gu, int n, int O, int K) {
    return gu ? MM_GATE_UP : n == 1 && K > O ? MM_DOWN : MM_PLAIN;
}

/* The shape of a k_qmma launch of `tiles` tiles of 16 rows over ng groups of G
 * inputs (kind: MM_GATE_UP, gate and up together, two tiles a row tile;
 * MM_DOWN, one product with K > O; else MM_PLAIN): row tiles per block
 * (*rb) and cluster slices of K (*cs), from a per-product sweep on the H100
 * (docs/SPEED.md): the best launches had about one block per SM or more, each
 * warp with 16-32 groups of 64 inputs (8-16 ring stages at 4 bits), and the
 * fewest cluster slices and most rows per block that give that (a block stages
 * its slice of the activations whatever its rows; clusters cost scheduling and a
 * barrier). The candidates in that order of preference; the first that passes
 * the strictest test wins. Stricter than all (twenty-third session, in the
 * decode step):
 * - a plain product that makes two blocks an SM without K slices takes them
 *   (E4B 8-bit's sparse-layer gate, 16384 x 2048: one block an SM streamed
 *   2.4 TB/s, two 3.4);
 * - a down product takes the most rows a block and K slices that give about
 *   one block an SM (E4B 8-bit's, 2048 x 16384: 16 x 8 blocks 12.8 µs, 32 x 4
 *   13.4, 64 x 2 15.0; tg128 E4B 8-bit +1.5-2%, E2B 8-bit 0-2%). Its blocks launch
 *   while gate/up runs and take one an SM (quant.cu, mm_launch), so each
 *   streams its rows from the start; more slices give each block more rows
 *   to stream at once.
 * Gate/up keeps the rule it was measured with. fix_rb, fix_cs (G3N_QMMA=rb,cs;
 * 0: none) override. */
static inline void mm_shape_for(int n_sm, int cluster_ok, int fix_rb, int fix_cs, int tiles, int ng, int G, int kind,
                                int *rb, int *cs) {
    static const int cand[][2] = {{8, 1}, {4, 1}, {8, 2}, {2, 1}, {4, 2}, {8, 4}, {2, 2}, {4, 4}, {8, 8},
                                  {1, 1}, {2, 4}, {4, 8}, {1, 2}, {2, 8}, {1, 4}, {1, 8}};
    const int n = (int)(sizeof cand / sizeof *cand), least = ng * G / 64 < 4 ? ng * G / 64 : 4;
    const int gu = kind == MM_GATE_UP;
    int best = -1, best_blocks = 0;
    for (int pass = 0; pass < 4 && best < 0; pass++)
        for (int i = 0; i < n; i++) {
            const int r = cand[i][0], s = cand[i][1];
            if ((gu && r < 2) || (s > 1 && !cluster_ok)) continue;
            const int blocks = (tiles + r - 1) / r * s, u = ng / (s * (8 / r)) * G / 64; /* per warp: groups of 64 */
            const int u_ok = u >= 16 && u <= 32, one_wave = blocks * 10 >= n_sm * 9 && u_ok;
            if (pass == 0 && kind == MM_PLAIN && s == 1 && blocks * 10 >= 2 * n_sm * 9 && u_ok) {
                best = i;
                break;
            }
            if (pass == 0 && kind == MM_DOWN && r == s && r >= 4 && blocks <= n_sm && one_wave) {
                best = i; /* {4, 4} before {8, 8} in the list: take the later */
                if (r == 8) break;
            }
            if (pass == 1 && one_wave) { best = i; break; }
            if (pass == 2 && blocks * 20 >= n_sm * 9 && u >= 8) { best = i; break; }
            if (pass == 3 && u >= least && blocks > best_blocks) best = i, best_blocks = blocks;
        }
    int r = best >= 0 ? cand[best][0] : 8, s = best >= 0 ? cand[best][1] : 1;
    if (fix_rb == 1 || fix_rb == 2 || fix_rb == 4 || fix_rb == 8) r = fix_rb > (gu ? 2 : 1) ? fix_rb : (gu ? 2 : 1);
    if (fix_cs >= 1 && fix_cs <= 8 && (cluster_ok || fix_cs == 1)) s = fix_cs;
    *rb = r, *cs = s;
}

/* ng >= 1 groups in at most cs K slices of whole ring stages (SG groups): the
 * groups a slice (*ks, a multiple of SG) and the slices that makes (<= cs) */
static inline int mm_slices(int ng, int cs, int SG, int *ks) {
    *ks = ((ng + cs - 1) / cs + SG - 1) / SG * SG;
    return (ng + *ks - 1) / *ks;
}

/* The blocks of a one-product k_qmma launch of O x K (what mm_launch makes
 * of it; a down product where K > O): whether its down product will be padded
 * is what gate/up's trigger asks. INT_MAX where no such quantized product
 * exists (K not a positive multiple of G: an odd test shape's gate/up, whose
 * "down" is O x K with K < G). */
static inline int mm_plain_blocks_for(int n_sm, int cluster_ok, int fix_rb, int fix_cs, int O, int K, int G,
                                      int SG) {
    int rb, cs, ks;
    const int tiles = (O + 15) / 16;
    if (G < 1 || K < G || K % G) return INT_MAX;
    mm_shape_for(n_sm, cluster_ok, fix_rb, fix_cs, tiles, K / G, G, mm_kind(0, 1, O, K), &rb, &cs);
    return (tiles + rb - 1) / rb * mm_slices(K / G, cs, SG, &ks);
}

/* One matrix the L2 prefetch may ask for: its bytes (codes, scales and biases
 * together), its bits (0: a bf16/f16/f32 matrix) and whether the kernel can
 * read it (on the GPU, not transposed). */
typedef struct {
    size_t bytes;
    int bits;
    int ok;
} pf_mat;

/* What the prefetch at a decode layer's start asks for, of the MLP's n
 * matrices in the order they are read (cuda.cu's cu_prefetch says why):
 * returns the first k matrices to ask for whole (k <= most), where k >= 1; or
 * 0 with *spread > 0 matrices of which every *stride-th chunk is asked for (a
 * share of about `part` bytes); or 0 and *spread = 0: nothing. Whole only at 4
 * bits or fewer, while they fit together in 3/4 of the L2 (l2 bytes), and not
 * where the layer's attention reads more (kv_bytes) than they hold. The spread
 * share covers the first matrix, or the first two where they are the same size
 * (gate and up). */
static inline int pf_plan(const pf_mat *m, int n, int most, size_t l2, size_t part, size_t kv_bytes, int *spread,
                          unsigned *stride) {
    size_t tot = 0;
    int whole = 0;
    *spread = 0, *stride = 1;
    for (int i = 0; i < n && i < most; i++) {
        if (!m[i].ok || m[i].bits < 1 || m[i].bits > 4 || tot + m[i].bytes > l2 / 4 * 3) break;
        tot += m[i].bytes;
        whole++;
    }
    if (whole) return kv_bytes > tot ? 0 : whole;
    if (!part || n < 1 || !m[0].ok || !m[0].bytes) return 0;
    *spread = n >= 2 && m[1].ok && m[1].bytes == m[0].bytes ? 2 : 1;
    const size_t sum = m[0].bytes * (size_t)*spread;
    const size_t st = (sum + part - 1) / part;
    *stride = st < 2 ? 2u : st > UINT_MAX ? UINT_MAX : (unsigned)st;
    return 0;
}

#endif
