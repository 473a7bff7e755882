/* quant.h: mlx affine quantization, the format of mlx-community checkpoints
 * (../shared/gemma3n/SPEC.md §2.3). Pure arithmetic: no model, no backend.
 *
 * A quantized [rows, cols] matrix is three tensors:
 *   weight  U32 [rows, cols * bits / 32]  each row one little-endian bit stream,
 *                                         element c at stream bits [c*bits, (c+1)*bits)
 *   scales  [rows, cols / group]          F32, F16 or BF16 (the source dtype)
 *   biases  [rows, cols / group]          same dtype as scales
 * and w[r][c] = scale[r][c/group] * q[r][c] + bias[r][c/group], q unsigned.
 * g3n evaluates that in fp32, the product rounded before the sum (no FMA), so
 * every backend's dequantized weight is the same float. */
#ifndef G3N_QUANT_H
#define G3N_QUANT_H

#include "common.h"

/* The bit widths and group sizes mlx produces. */
int g3n_quant_bits_ok(int bits);
int g3n_quant_group_ok(int group);

/* u32 words of one packed row of `cols` elements (cols * bits / 32). */
static inline size_t g3n_quant_row_words(int cols, int bits) { return (size_t)cols * (size_t)bits / 32; }

/* Element c of a packed row. */
static inline uint32_t g3n_quant_get(const uint32_t *row, int bits, int c) {
    const size_t p = (size_t)c * (size_t)bits;
    const size_t w = p >> 5;
    const unsigned off = (unsigned)(p & 31);
    uint64_t v = row[w];
    if (off + (unsigned)bits > 32) v |= (uint64_t)row[w + 1] << 32;
    return (uint32_t)(v >> off) & ((1u << bits) - 1u);
}

/* The dequantized weight (the one definition every backend follows). */
static inline float g3n_quant_w(float scale, float bias, uint32_t q) {
    const float t = scale * (float)q; /* rounded: the build has -ffp-contract=off */
    return t + bias;
}

/* Read one scale or bias of dtype `dt` (F32, F16, BF16). Inline: decode loops
 * read one pair per group and row, and a call each was most of a 4-bit step. */
static inline float g3n_quant_param(const void *p, int dt, size_t i) {
    if (dt == G3N_BF16) return g3n_bf16_to_f32(((const uint16_t *)p)[i]);
    if (dt == G3N_F32) return ((const float *)p)[i];
    return g3n_f16_to_f32(((const uint16_t *)p)[i]);
}

/* Dequantize row `packed` (cols elements) with its group parameters. */
void g3n_dequant_row(const uint32_t *packed, const void *scales, const void *biases, int sdtype,
                     int bits, int group, int cols, float *out);

/* Quantize one row of cols floats as mlx's GPU kernel does (fp32 arithmetic):
 * per group, w_min = min(w), w_max = max(0, max(w)),
 *   scale = max((w_max - w_min) / (2^bits - 1), 1e-7), negated unless |w_min| > |w_max|,
 *   edge = the endpoint of larger magnitude, q0 = round(edge / scale),
 *   q0 != 0: scale = edge / q0, bias = edge;  q0 == 0: bias = 0,
 *   q = min(round((w - bias) / scale), 2^bits - 1)   (round: half away from zero).
 * Writes the packed row and the fp32 scale and bias of each group; the file stores
 * them rounded to the weight's dtype (the packed values use the fp32 ones). */
void g3n_quantize_row(const float *w, int cols, int bits, int group, uint32_t *packed,
                      float *scales, float *biases);

#endif
