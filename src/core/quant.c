/* quant.c: mlx affine quantization arithmetic (see quant.h). */
#include "quant.h"

#include <math.h>

int g3n_quant_bits_ok(int bits) {
    return bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8;
}

int g3n_quant_group_ok(int group) { return group == 32 || group == 64 || group == 128; }

void g3n_dequant_row(const uint32_t *packed, const void *scales, const void *biases, int sdtype,
                     int bits, int group, int cols, float *out) {
    for (int g = 0; g < cols / group; g++) {
        const float s = g3n_quant_param(scales, sdtype, (size_t)g);
        const float b = g3n_quant_param(biases, sdtype, (size_t)g);
        for (int c = g * group; c < (g + 1) * group; c++)
            out[c] = g3n_quant_w(s, b, g3n_quant_get(packed, bits, c));
    }
}

void g3n_quantize_row(const float *w, int cols, int bits, int group, uint32_t *packed,
                      float *scales, float *biases) {
    const float n_bins = (float)((1 << bits) - 1), eps = 1e-7f;
    memset(packed, 0, g3n_quant_row_words(cols, bits) * 4);
    for (int g = 0; g < cols / group; g++) {
        const float *wg = w + (size_t)g * group;
        float w_min = 3.40282347e38f, w_max = 0; /* as mlx's kernel: the max starts at 0 */
        for (int i = 0; i < group; i++) {
            w_min = fminf(w_min, wg[i]);
            w_max = fmaxf(w_max, wg[i]);
        }
        float scale = fmaxf((w_max - w_min) / n_bins, eps);
        const int side = fabsf(w_min) > fabsf(w_max);
        scale = side ? scale : -scale;
        const float edge = side ? w_min : w_max;
        const float q0 = roundf(edge / scale);
        float bias = 0;
        if (q0 != 0.0f) {
            scale = edge / q0;
            bias = edge;
        }
        scales[g] = scale;
        biases[g] = bias;
        for (int i = 0; i < group; i++) {
            float q = fminf(roundf((wg[i] - bias) / scale), n_bins);
            if (!(q >= 0)) q = 0; /* cannot happen but for rounding; NaN weights give 0 */
            const size_t c = (size_t)g * group + i, p = c * (size_t)bits;
            const uint64_t v = (uint64_t)(uint32_t)q << (p & 31);
            packed[p >> 5] |= (uint32_t)v;
            if ((p & 31) + (size_t)bits > 32) packed[(p >> 5) + 1] |= (uint32_t)(v >> 32);
        }
    }
}
