/* cpu.c: the fast CPU backend. OpenMP threads and AVX-512 / AVX2 kernels
 * (chosen at run time, with a portable fallback) for the ops that cost time:
 * matrix products, attention and the row-wise norms. Every other op is the
 * reference one from cpu_ref.c. Each op here is tested against its reference in
 * tests/test_ops.c. Accumulation is fp32; only the order differs from cpu_ref. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define G3N_X86 1
#endif

#include "backend/cpu/cpu_internal.h"
#include "quant.h"

/* ---- ISA selection ------------------------------------------------------------- */

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
static int cpu_isa = -1;

static int isa_detect(void) {
    const char *force = getenv("G3N_CPU_ISA"); /* scalar | avx2 | avx512: for tests */
#ifdef G3N_X86
    __builtin_cpu_init();
    int best = ISA_SCALAR;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
        best = ISA_AVX2;
    if (best == ISA_AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
        best = ISA_AVX512;
#else
    int best = ISA_SCALAR;
#endif
    if (force) {
        int want = strcmp(force, "avx512") == 0 ? ISA_AVX512 : strcmp(force, "avx2") == 0 ? ISA_AVX2 : ISA_SCALAR;
        if (want < best) best = want;
    }
    return best;
}

int cpu_set_isa(const char *name) {
    int best = isa_detect();
    int want = strcmp(name, "avx512") == 0 ? ISA_AVX512 : strcmp(name, "avx2") == 0 ? ISA_AVX2 : ISA_SCALAR;
    if (want > best) return -1;
    cpu_isa = want;
    return 0;
}

const char *cpu_isa_name(void) {
    if (cpu_isa < 0) cpu_isa = isa_detect();
    return cpu_isa == ISA_AVX512 ? "avx512" : cpu_isa == ISA_AVX2 ? "avx2" : "scalar";
}

/* ---- row conversion and dot products --------------------------------------------- */

static float dot_scalar(const float *a, const float *b, int n) {
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; i++) s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

/* Matrix-product kernels. Every output y[r][o] is one accumulator vector over
 * the K inputs in steps of the vector width, reduced in a fixed order, then the
 * tail added in order: whatever the tile shape or the number of rows, a given
 * (row, output) is summed the same way. So a prompt evaluated in one step, in
 * chunks or one token at a time gives bitwise the same logits (test_model.c
 * checks it). k1x4 reads W in its stored dtype; k4x4 reads f32 tiles. */

static inline float wval(int dtype, const void *w, int i) {
    switch (dtype) {
    case G3N_BF16: return g3n_bf16_to_f32(((const uint16_t *)w)[i]);
    case G3N_F16: return g3n_f16_to_f32(((const uint16_t *)w)[i]);
    default: return ((const float *)w)[i];
    }
}

static void k1x4_scalar(int dtype, const void *const w[4], const float *x, int K, float out[4]) {
    for (int o = 0; o < 4; o++) {
        float s = 0;
        for (int i = 0; i < K; i++) s += wval(dtype, w[o], i) * x[i];
        out[o] = s;
    }
}

static void k4x4_scalar(const float *W, size_t ldw, const float *X, size_t ldx, int K,
                        float out[4][4]) {
    for (int r = 0; r < 4; r++)
        for (int o = 0; o < 4; o++) {
            float s = 0;
            for (int i = 0; i < K; i++) s += W[o * ldw + i] * X[r * ldx + i];
            out[r][o] = s;
        }
}

#ifdef G3N_X86
__attribute__((target("avx2,fma"))) static float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) static float dot_avx2(const float *a, const float *b, int n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = hsum256(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

#define LD8_BF16(p) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define LD8_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define LD8_F32(p) _mm256_loadu_ps(p)

#define K1X4_AVX2(NAME, T, LOAD, DT)                                                        \
    __attribute__((target("avx2,fma,f16c"))) static void NAME(const void *const wv[4],      \
                                                              const float *x, int K,        \
                                                              float out[4]) {               \
        const T *w0 = wv[0], *w1 = wv[1], *w2 = wv[2], *w3 = wv[3];                         \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                         \
        int i = 0;                                                                          \
        for (; i + 8 <= K; i += 8) {                                                        \
            __m256 xv = _mm256_loadu_ps(x + i);                                             \
            a0 = _mm256_fmadd_ps(LOAD(w0 + i), xv, a0);                                     \
            a1 = _mm256_fmadd_ps(LOAD(w1 + i), xv, a1);                                     \
            a2 = _mm256_fmadd_ps(LOAD(w2 + i), xv, a2);                                     \
            a3 = _mm256_fmadd_ps(LOAD(w3 + i), xv, a3);                                     \
        }                                                                                   \
        out[0] = hsum256(a0), out[1] = hsum256(a1), out[2] = hsum256(a2), out[3] = hsum256(a3); \
        for (int o = 0; o < 4; o++)                                                         \
            for (int j = i; j < K; j++) out[o] += wval(DT, wv[o], j) * x[j];                \
    }
K1X4_AVX2(k1x4_bf16_avx2, uint16_t, LD8_BF16, G3N_BF16)
K1X4_AVX2(k1x4_f16_avx2, uint16_t, LD8_F16, G3N_F16)
K1X4_AVX2(k1x4_f32_avx2, float, LD8_F32, G3N_F32)

/* Two passes of 4 x rows against 2 W rows: 8 accumulators, which stay in
 * registers (AVX2 has 16; 4 x 4 at once spilled them, every FMA a load and a
 * store). Each output summed as k1x4 sums it (see above). */
__attribute__((target("avx2,fma"))) static void k4x4_avx2(const float *W, size_t ldw,
                                                          const float *X, size_t ldx, int K,
                                                          float out[4][4]) {
    for (int h = 0; h < 4; h += 2) {
        const float *Wa = W + (size_t)h * ldw, *Wb = Wa + ldw;
        __m256 acc[4][2];
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        int i = 0;
        for (; i + 8 <= K; i += 8) {
            const __m256 w0 = _mm256_loadu_ps(Wa + i), w1 = _mm256_loadu_ps(Wb + i);
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) {
                const __m256 xv = _mm256_loadu_ps(X + r * ldx + i);
                acc[r][0] = _mm256_fmadd_ps(w0, xv, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(w1, xv, acc[r][1]);
            }
        }
        for (int r = 0; r < 4; r++)
            for (int o = 0; o < 2; o++) {
                float s = hsum256(acc[r][o]);
                for (int j = i; j < K; j++) s += W[(h + o) * ldw + j] * X[r * ldx + j];
                out[r][h + o] = s;
            }
    }
}

__attribute__((target("avx2,fma,f16c"))) static void cvt_avx2(int dtype, const void *src,
                                                              float *dst, int n) {
    int i = 0;
    if (dtype == G3N_F32) {
        memcpy(dst, src, (size_t)n * 4);
        return;
    }
    const uint16_t *h = src;
    if (dtype == G3N_BF16)
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, LD8_BF16(h + i));
    else
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, LD8_F16(h + i));
    for (; i < n; i++) dst[i] = wval(dtype, h, i);
}

#define LD16_BF16(p)                                                                         \
    _mm512_castsi512_ps(                                                                    \
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define LD16_F16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define LD16_F32(p) _mm512_loadu_ps(p)

#define K1X4_AVX512(NAME, T, LOAD, DT)                                                      \
    __attribute__((target("avx512f,avx512bw"))) static void NAME(const void *const wv[4],   \
                                                                 const float *x, int K,     \
                                                                 float out[4]) {            \
        const T *w0 = wv[0], *w1 = wv[1], *w2 = wv[2], *w3 = wv[3];                         \
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                         \
        int i = 0;                                                                          \
        for (; i + 16 <= K; i += 16) {                                                      \
            __m512 xv = _mm512_loadu_ps(x + i);                                             \
            a0 = _mm512_fmadd_ps(LOAD(w0 + i), xv, a0);                                     \
            a1 = _mm512_fmadd_ps(LOAD(w1 + i), xv, a1);                                     \
            a2 = _mm512_fmadd_ps(LOAD(w2 + i), xv, a2);                                     \
            a3 = _mm512_fmadd_ps(LOAD(w3 + i), xv, a3);                                     \
        }                                                                                   \
        out[0] = _mm512_reduce_add_ps(a0), out[1] = _mm512_reduce_add_ps(a1);               \
        out[2] = _mm512_reduce_add_ps(a2), out[3] = _mm512_reduce_add_ps(a3);               \
        for (int o = 0; o < 4; o++)                                                         \
            for (int j = i; j < K; j++) out[o] += wval(DT, wv[o], j) * x[j];                \
    }
K1X4_AVX512(k1x4_bf16_avx512, uint16_t, LD16_BF16, G3N_BF16)
K1X4_AVX512(k1x4_f16_avx512, uint16_t, LD16_F16, G3N_F16)
K1X4_AVX512(k1x4_f32_avx512, float, LD16_F32, G3N_F32)

/* n (4 or 6, a constant where it is inlined) x rows against 4 W rows: 4n
 * accumulators, in registers (the r loop must unroll: a first k4x4 that did not
 * kept them in memory, a load and a store each FMA; 6 x 4 loads 10 vectors per
 * 24 FMAs). Each output summed as k1x4 sums it (see above). */
__attribute__((target("avx512f"), always_inline)) static inline void kNx4_avx512(const float *W, size_t ldw,
                                                                               const float *X, size_t ldx, int K,
                                                                               float out[][4], const int n) {
    __m512 acc[6][4];
#pragma GCC unroll 6
    for (int r = 0; r < n; r++)
        for (int o = 0; o < 4; o++) acc[r][o] = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= K; i += 16) {
        const __m512 w0 = _mm512_loadu_ps(W + i), w1 = _mm512_loadu_ps(W + ldw + i);
        const __m512 w2 = _mm512_loadu_ps(W + 2 * ldw + i), w3 = _mm512_loadu_ps(W + 3 * ldw + i);
#pragma GCC unroll 6
        for (int r = 0; r < n; r++) {
            const __m512 xv = _mm512_loadu_ps(X + r * ldx + i);
            acc[r][0] = _mm512_fmadd_ps(w0, xv, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(w1, xv, acc[r][1]);
            acc[r][2] = _mm512_fmadd_ps(w2, xv, acc[r][2]);
            acc[r][3] = _mm512_fmadd_ps(w3, xv, acc[r][3]);
        }
    }
    for (int r = 0; r < n; r++)
        for (int o = 0; o < 4; o++) {
            float s = _mm512_reduce_add_ps(acc[r][o]);
            for (int j = i; j < K; j++) s += W[o * ldw + j] * X[r * ldx + j];
            out[r][o] = s;
        }
}

__attribute__((target("avx512f"))) static void k4x4_avx512(const float *W, size_t ldw, const float *X, size_t ldx,
                                                           int K, float out[4][4]) {
    kNx4_avx512(W, ldw, X, ldx, K, out, 4);
}

__attribute__((target("avx512f"))) static void k6x4_avx512(const float *W, size_t ldw, const float *X, size_t ldx,
                                                           int K, float out[6][4]) {
    kNx4_avx512(W, ldw, X, ldx, K, out, 6);
}

__attribute__((target("avx512f,avx512bw"))) static void cvt_avx512(int dtype, const void *src,
                                                                   float *dst, int n) {
    int i = 0;
    if (dtype == G3N_F32) {
        memcpy(dst, src, (size_t)n * 4);
        return;
    }
    const uint16_t *h = src;
    if (dtype == G3N_BF16)
        for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, LD16_BF16(h + i));
    else
        for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, LD16_F16(h + i));
    for (; i < n; i++) dst[i] = wval(dtype, h, i);
}

__attribute__((target("avx512f"))) static float dot_avx512(const float *a, const float *b, int n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
    }
    for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    float s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}
#endif

static void cvt_row(int dtype, const void *src, float *dst, int n) {
#ifdef G3N_X86
    if (cpu_isa == ISA_AVX512) return cvt_avx512(dtype, src, dst, n);
    if (cpu_isa == ISA_AVX2) return cvt_avx2(dtype, src, dst, n);
#endif
    for (int i = 0; i < n; i++) dst[i] = wval(dtype, src, i);
}

static float dot(const float *a, const float *b, int n) {
#ifdef G3N_X86
    if (cpu_isa == ISA_AVX512) return dot_avx512(a, b, n);
    if (cpu_isa == ISA_AVX2) return dot_avx2(a, b, n);
#endif
    return dot_scalar(a, b, n);
}

/* acc[g * n + i] += p[g] * v[i] for g < G, i < n: one load of v for G rows. A
 * product then a sum (no fused multiply-add), so every ISA gives the same bits. */
#ifdef G3N_X86
__attribute__((target("avx512f"))) static void axpy_g_avx512(float *acc, const float *p, int G, const float *v, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 vv = _mm512_loadu_ps(v + i);
        for (int g = 0; g < G; g++) {
            float *a = acc + (size_t)g * n + i;
            _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), _mm512_mul_ps(_mm512_set1_ps(p[g]), vv)));
        }
    }
    for (; i < n; i++)
        for (int g = 0; g < G; g++) acc[(size_t)g * n + i] += p[g] * v[i];
}
__attribute__((target("avx2"))) static void axpy_g_avx2(float *acc, const float *p, int G, const float *v, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 vv = _mm256_loadu_ps(v + i);
        for (int g = 0; g < G; g++) {
            float *a = acc + (size_t)g * n + i;
            _mm256_storeu_ps(a, _mm256_add_ps(_mm256_loadu_ps(a), _mm256_mul_ps(_mm256_set1_ps(p[g]), vv)));
        }
    }
    for (; i < n; i++)
        for (int g = 0; g < G; g++) acc[(size_t)g * n + i] += p[g] * v[i];
}
#endif
static void axpy_g(float *acc, const float *p, int G, const float *v, int n) {
#ifdef G3N_X86
    if (cpu_isa == ISA_AVX512) return axpy_g_avx512(acc, p, G, v, n);
    if (cpu_isa == ISA_AVX2) return axpy_g_avx2(acc, p, G, v, n);
#endif
    for (int g = 0; g < G; g++)
        for (int i = 0; i < n; i++) acc[(size_t)g * n + i] += p[g] * v[i];
}

/* ---- quantized (mlx affine) products ---------------------------------------------------
 * The decode kernels dequantize in registers and multiply at once: per vector of
 * weights, w = scale * q + bias (product rounded, then the sum: g3n_quant_w) and
 * acc += w * x. The values are those g3n_mat_row gives and the accumulation is the
 * f32 kernels' (k1x4 / k4x4), so a row's sum is the same whether it came through
 * here (decode) or through dequantized rows (prompt): bitwise, as for bf16.
 *
 * 4 bits on AVX-512 / AVX2: a byte holds elements 2k (low nibble) and 2k+1, so
 * one zero-extension of QB/2 bytes gives QB/2 lanes of pairs, and a mask and a
 * shift split them into the even and the odd elements (QB = 32 / 16 elements a
 * block: two vectors). Both paths then run over K in that order, each block of QB
 * inputs as its evens then its odds (q4_perm: x, and the prompt path's
 * dequantized rows), so they still sum every output the same way. */

/* Elements of a 4-bit block whose evens and odds the kernels take apart (0: none). */
static int q4_block(int bits) {
#ifdef G3N_X86
    if (bits == 4 && cpu_isa == ISA_AVX512) return 32;
    if (bits == 4 && cpu_isa == ISA_AVX2) return 16;
#endif
    (void)bits;
    return 0;
}

/* dst = src with each block of qb elements as its evens, then its odds (K % qb == 0). */
static void q4_perm(float *dst, const float *src, int K, int qb) {
    for (int b = 0; b < K; b += qb)
        for (int j = 0; j < qb / 2; j++) dst[b + j] = src[b + 2 * j], dst[b + qb / 2 + j] = src[b + 2 * j + 1];
}

/* Row r of a 4-bit W dequantized as g3n_mat_row does it (g3n_quant_w), straight
 * into q4_perm order (byte j of a block: element 2j in its low nibble, 2j+1 high). */
static void q4_row_perm(const g3n_mat *W, int r, float *dst, int qb) {
    const int K = W->cols, G = W->group_size;
    const size_t ng = (size_t)(K / G), es = g3n_dtype_size((g3n_dtype)W->sdtype);
    const uint8_t *q = (const uint8_t *)((const uint32_t *)W->data + (size_t)r * g3n_quant_row_words(K, 4));
    const char *sp = (const char *)W->scales + (size_t)r * ng * es, *bp = (const char *)W->biases + (size_t)r * ng * es;
    for (int g = 0; g < K / G; g++) {
        const float sc = g3n_quant_param(sp, W->sdtype, (size_t)g), bi = g3n_quant_param(bp, W->sdtype, (size_t)g);
        for (int b = g * G; b < (g + 1) * G; b += qb)
            for (int j = 0; j < qb / 2; j++) {
                const uint32_t v = q[b / 2 + j];
                dst[b + j] = g3n_quant_w(sc, bi, v & 15u), dst[b + qb / 2 + j] = g3n_quant_w(sc, bi, v >> 4);
            }
    }
}

#ifdef G3N_X86
/* Elements c0..c0+7 (c0 a multiple of 8) of a row of 2, 3, 5 or 6 bits: they
 * take `bits` whole bytes from byte c0 * bits / 8 of the little-endian stream
 * (g3n_quant_get's order), read as one integer (exactly those bytes: a row's
 * last ones end the allocation). Element i is then bits i*bits.. of it. */
static inline uint64_t q_bytes8(const uint32_t *row, int bits, int c0) {
    const uint8_t *p = (const uint8_t *)row + (size_t)c0 * (size_t)bits / 8;
    /* whole-width loads put together in registers (one memcpy of 3, 5 or 6 bytes
     * into a zeroed integer went through the stack: 2x slower than this) */
    uint32_t w = 0;
    uint16_t h = 0;
    if (bits >= 4) {
        memcpy(&w, p, 4);
        if (bits == 6) memcpy(&h, p + 4, 2);
        return (uint64_t)w | (uint64_t)(bits == 6 ? h : bits == 5 ? p[4] : 0) << 32;
    }
    memcpy(&h, p, 2);
    return (uint64_t)h | (uint64_t)(bits == 3 ? p[2] : 0) << 16;
}

/* q of elements c0..c0+15 (c0 a multiple of 16) as 16 int32 lanes: 8 bits, or
 * 2, 3, 5 and 6 (q_bytes8); 4 bits take their own paths (above and below) */
__attribute__((target("avx512f,avx512bw"), always_inline)) static inline __m512i unpack16_avx512(const uint32_t *row,
                                                                                               int bits, int c0) {
    if (bits == 8) return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)((const uint8_t *)row + c0)));
    const __m512i sh = _mm512_set_epi64(7 * bits, 6 * bits, 5 * bits, 4 * bits, 3 * bits, 2 * bits, bits, 0);
    const __m512i m = _mm512_set1_epi64((1 << bits) - 1);
    const __m512i lo = _mm512_and_si512(_mm512_srlv_epi64(_mm512_set1_epi64((long long)q_bytes8(row, bits, c0)), sh), m);
    const __m512i hi =
        _mm512_and_si512(_mm512_srlv_epi64(_mm512_set1_epi64((long long)q_bytes8(row, bits, c0 + 8)), sh), m);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(lo)), _mm512_cvtepi64_epi32(hi), 1);
}

/* Row r of a quantized W (4 bits in q4_perm order, qb 32) dequantized as
 * q4_row_perm and g3n_mat_row give it, 16 weights a vector: scale * q rounded,
 * then + bias (the same bits). The prompt path dequantizes every row once per
 * step; element by element that was about as long as the products (E2B 4-bit
 * pp128 on 2 cores, docs/SPEED.md). 0: not taken (4 bits in another order). */
__attribute__((target("avx512f,avx512bw"))) static int qrow_avx512(const g3n_mat *W, int r, float *dst, int qb) {
    const int K = W->cols, G = W->group_size, bits = W->bits;
    if ((bits == 4 && qb != 32) || G % 32) return 0;
    const size_t ng = (size_t)(K / G), es = g3n_dtype_size((g3n_dtype)W->sdtype);
    const uint8_t *q = (const uint8_t *)((const uint32_t *)W->data + (size_t)r * g3n_quant_row_words(K, bits));
    const char *sp = (const char *)W->scales + (size_t)r * ng * es, *bp = (const char *)W->biases + (size_t)r * ng * es;
    for (int g = 0; g < K / G; g++) {
        const __m512 sc = _mm512_set1_ps(g3n_quant_param(sp, W->sdtype, (size_t)g));
        const __m512 bi = _mm512_set1_ps(g3n_quant_param(bp, W->sdtype, (size_t)g));
        if (bits == 4) /* a block of 32: the 16 low nibbles (elements 2j), then the 16 high ones */
            for (int b = g * G; b < (g + 1) * G; b += 32) {
                const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + b / 2)));
                const __m512 qe = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
                const __m512 qo = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
                _mm512_storeu_ps(dst + b, _mm512_add_ps(_mm512_mul_ps(sc, qe), bi));
                _mm512_storeu_ps(dst + b + 16, _mm512_add_ps(_mm512_mul_ps(sc, qo), bi));
            }
        else if (bits == 8)
            for (int b = g * G; b < (g + 1) * G; b += 16) {
                const __m512 qv = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + b))));
                _mm512_storeu_ps(dst + b, _mm512_add_ps(_mm512_mul_ps(sc, qv), bi));
            }
        else /* 2, 3, 5, 6 bits (through unpack16_avx512 at 8 bits, E2B 8-bit pp16 was 8% slower) */
            for (int b = g * G; b < (g + 1) * G; b += 16) {
                const __m512 qv = _mm512_cvtepi32_ps(unpack16_avx512((const uint32_t *)q, bits, b));
                _mm512_storeu_ps(dst + b, _mm512_add_ps(_mm512_mul_ps(sc, qv), bi));
            }
    }
    return 1;
}
#endif

/* Row r of a quantized W as the prompt path's kernels take it (qb: q4_block) */
static void qrow(const g3n_mat *W, int r, float *dst, int qb) {
#ifdef G3N_X86
    if (cpu_isa == ISA_AVX512 && qrow_avx512(W, r, dst, qb)) return;
#endif
    if (qb) q4_row_perm(W, r, dst, qb);
    else g3n_mat_row(W, r, dst);
}

typedef struct {
    const uint32_t *q[4]; /* packed rows */
    const void *s[4], *b[4];
    int bits, group, sdtype;
} qrows4;

static void qrows4_set(qrows4 *R, const g3n_mat *W, int o0) {
    const size_t words = g3n_quant_row_words(W->cols, W->bits), ng = (size_t)(W->cols / W->group_size);
    const size_t es = g3n_dtype_size((g3n_dtype)W->sdtype);
    for (int j = 0; j < 4; j++) {
        const size_t r = (size_t)G3N_MIN(o0 + j, W->rows - 1);
        R->q[j] = (const uint32_t *)W->data + r * words;
        R->s[j] = (const char *)W->scales + r * ng * es;
        R->b[j] = (const char *)W->biases + r * ng * es;
    }
    R->bits = W->bits, R->group = W->group_size, R->sdtype = W->sdtype;
}

static void k1x4q_scalar(const qrows4 *R, const float *x, int K, float out[4]) {
    for (int o = 0; o < 4; o++) {
        float s = 0;
        for (int g = 0; g < K / R->group; g++) {
            const float sc = g3n_quant_param(R->s[o], R->sdtype, (size_t)g);
            const float bi = g3n_quant_param(R->b[o], R->sdtype, (size_t)g);
            for (int i = g * R->group; i < (g + 1) * R->group; i++)
                s += g3n_quant_w(sc, bi, g3n_quant_get(R->q[o], R->bits, i)) * x[i];
        }
        out[o] = s;
    }
}

#ifdef G3N_X86
/* q of elements c0..c0+7 (c0 a multiple of 8) as 8 int32 lanes, as
 * unpack16_avx512 does (not 4 bits); bits a constant where the caller passes one */
__attribute__((target("avx2,fma"), always_inline)) static inline __m256i unpack8_avx2(const uint32_t *row,
                                                                                     int bits, int c0) {
    if (bits == 8) return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)((const uint8_t *)row + c0)));
    const __m256i u = _mm256_set1_epi64x((long long)q_bytes8(row, bits, c0)), m = _mm256_set1_epi64x((1 << bits) - 1);
    const __m256i lo = _mm256_and_si256(_mm256_srlv_epi64(u, _mm256_set_epi64x(3 * bits, 2 * bits, bits, 0)), m);
    const __m256i hi = _mm256_and_si256(_mm256_srlv_epi64(u, _mm256_set_epi64x(7 * bits, 6 * bits, 5 * bits, 4 * bits)), m);
    /* the low words of lo's 4 lanes, then hi's */
    const __m256i idx = _mm256_set_epi32(6, 4, 2, 0, 6, 4, 2, 0);
    return _mm256_permute2x128_si256(_mm256_permutevar8x32_epi32(lo, idx), _mm256_permutevar8x32_epi32(hi, idx), 0x30);
}

/* How far ahead in a row's bytes the quantized kernels ask for the weights: the
 * same place 4 rows on (the next call's row, rows of up to 2 KB), at most 8 KB.
 * The hardware prefetcher alone left the 4 interleaved row streams waiting:
 * E2B 4-bit decode 8.1-8.4 -> 11.2-11.9 tok/s on a 2-core Zen 4 (docs/SPEED.md,
 * seventeenth session; 2 KB ahead 9.8-10.0, 8 KB as 4 KB). */
static inline size_t q4_ahead(int K, int bits) {
    const size_t row = (size_t)g3n_quant_row_words(K, bits) * 4;
    return row * 4 < 8192 ? row * 4 : 8192;
}

/* Where the scales are 16-bit (bf16, f16: at most 11 significant bits) and q has
 * at most 8, the product scale * q is exact in f32, so g3n_quant_w's rounded
 * product and then sum round once, at the sum: one FMA, scale * q + bias, gives
 * the same bits (subnormal products too; an overflowing one, scale > 1.3e36, aside). f32 scales
 * keep the product and the sum. */
static inline int q_fma_exact(const qrows4 *R) { return R->sdtype != G3N_F32 && R->bits <= 8; }

/* fn(R, x, K, out, bits, ex) with the width, and at 4 (where fma4) and 8 bits
 * the FMA choice, as constants: each call is specialised (the loader admits
 * only 2, 3, 4, 5, 6 and 8 bits) */
#define Q_DISPATCH(fn, R, x, K, out, fma4)                                                                  \
    do {                                                                                                      \
        const int ex_ = q_fma_exact(R);                                                                       \
        switch ((R)->bits) {                                                                                  \
        case 4: if (ex_ && (fma4)) fn(R, x, K, out, 4, 1); else fn(R, x, K, out, 4, 0); break;               \
        case 8: if (ex_) fn(R, x, K, out, 8, 1); else fn(R, x, K, out, 8, 0); break;                         \
        case 6: fn(R, x, K, out, 6, ex_); break;                                                              \
        case 5: fn(R, x, K, out, 5, ex_); break;                                                              \
        case 3: fn(R, x, K, out, 3, ex_); break;                                                              \
        default: fn(R, x, K, out, 2, ex_); break;                                                             \
        }                                                                                                     \
    } while (0)

/* bits (and ex: q_fma_exact) are constants where the caller passes them: the
 * unpacking is specialised */
__attribute__((target("avx2,fma"), always_inline)) static inline void k1x4q_avx2_bits(const qrows4 *R,
                                                                                    const float *x, int K,
                                                                                    float out[4], const int bits,
                                                                                    const int ex) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const int G = R->group, ng = K / G, sdt = R->sdtype; /* locals, as in k1x4q_avx512_bits */
    const size_t ahead = q4_ahead(K, bits);
    for (int g = 0; g < ng; g++) {
        const size_t pos = (size_t)g * G * bits / 8;
#pragma GCC unroll 4
        for (int o = 0; o < 4; o++) _mm_prefetch((const char *)R->q[o] + pos + ahead, _MM_HINT_T0);
        __m256 sc[4], bi[4];
#pragma GCC unroll 4
        for (int o = 0; o < 4; o++) {
            sc[o] = _mm256_set1_ps(g3n_quant_param(R->s[o], sdt, (size_t)g));
            bi[o] = _mm256_set1_ps(g3n_quant_param(R->b[o], sdt, (size_t)g));
        }
        if (bits == 4) /* x in q4_perm order: 16 inputs as 8 evens, then 8 odds */
            for (int i = g * G; i < (g + 1) * G; i += 16) {
                const __m256 xe = _mm256_loadu_ps(x + i), xo = _mm256_loadu_ps(x + i + 8);
#pragma GCC unroll 4
                for (int o = 0; o < 4; o++) { /* unrolled: acc, sc, bi stay in registers */
                    const __m256i v =
                        _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)((const uint8_t *)R->q[o] + i / 2)));
                    const __m256 qe = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
                    const __m256 qo = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
                    const __m256 we = ex ? _mm256_fmadd_ps(sc[o], qe, bi[o]) : _mm256_add_ps(_mm256_mul_ps(sc[o], qe), bi[o]);
                    const __m256 wo = ex ? _mm256_fmadd_ps(sc[o], qo, bi[o]) : _mm256_add_ps(_mm256_mul_ps(sc[o], qo), bi[o]);
                    acc[o] = _mm256_fmadd_ps(we, xe, acc[o]);
                    acc[o] = _mm256_fmadd_ps(wo, xo, acc[o]);
                }
            }
        else
            for (int i = g * G; i < (g + 1) * G; i += 8) {
                const __m256 xv = _mm256_loadu_ps(x + i);
#pragma GCC unroll 4
                for (int o = 0; o < 4; o++) {
                    const __m256 q = _mm256_cvtepi32_ps(unpack8_avx2(R->q[o], bits, i));
                    const __m256 w = ex ? _mm256_fmadd_ps(sc[o], q, bi[o]) : _mm256_add_ps(_mm256_mul_ps(sc[o], q), bi[o]);
                    acc[o] = _mm256_fmadd_ps(w, xv, acc[o]);
                }
            }
    }
    for (int o = 0; o < 4; o++) out[o] = hsum256(acc[o]);
}

__attribute__((target("avx2,fma"))) static void k1x4q_avx2(const qrows4 *R, const float *x, int K, float out[4]) {
    Q_DISPATCH(k1x4q_avx2_bits, R, x, K, out, 1);
}


__attribute__((target("avx512f,avx512bw"), always_inline)) static inline void k1x4q_avx512_bits(
    const qrows4 *R, const float *x, int K, float out[4], const int bits, const int ex) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    /* locals: read through R inside the loops, the bounds and the group's parameters were
     * reloaded (and K / group divided) at every group, and the per-row setup went through the
     * stack; hoisted and unrolled, E2B 4-bit decode ran 30% faster (docs/SPEED.md) */
    const int G = R->group, ng = K / G, sdt = R->sdtype;
    const uint8_t *q[4] = {(const uint8_t *)R->q[0], (const uint8_t *)R->q[1], (const uint8_t *)R->q[2],
                           (const uint8_t *)R->q[3]};
    const size_t ahead = q4_ahead(K, bits);
    for (int g = 0; g < ng; g++) {
        const size_t pos = (size_t)g * G * bits / 8; /* the group's first byte in its row */
#pragma GCC unroll 4
        for (int o = 0; o < 4; o++) _mm_prefetch((const char *)(q[o] + pos + ahead), _MM_HINT_T0);
        __m512 sc[4], bi[4];
#pragma GCC unroll 4
        for (int o = 0; o < 4; o++) {
            sc[o] = _mm512_set1_ps(g3n_quant_param(R->s[o], sdt, (size_t)g));
            bi[o] = _mm512_set1_ps(g3n_quant_param(R->b[o], sdt, (size_t)g));
        }
        const float *xg = x + (size_t)g * G;
        if (bits == 4) { /* x in q4_perm order: 32 inputs as 16 evens, then 16 odds */
            /* The group's 16 weights, g3n_quant_w(sc, bi, k) for k < 16, as one
             * vector: each weight is then one permute by its nibble (vpermps reads
             * an index's low 4 bits, so the low nibble needs no mask), instead of
             * a convert, a product and a sum. The same bits as computing each. */
            const __m512 k16 = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
            __m512 lut[4];
#pragma GCC unroll 4
            for (int o = 0; o < 4; o++) lut[o] = _mm512_add_ps(_mm512_mul_ps(sc[o], k16), bi[o]);
            for (int i = 0; i < G; i += 32) {
                const __m512 xe = _mm512_loadu_ps(xg + i), xo = _mm512_loadu_ps(xg + i + 16);
#pragma GCC unroll 4
                for (int o = 0; o < 4; o++) { /* unrolled: acc and the tables stay in registers */
                    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q[o] + pos + i / 2)));
                    acc[o] = _mm512_fmadd_ps(_mm512_permutexvar_ps(v, lut[o]), xe, acc[o]);
                    acc[o] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut[o]), xo, acc[o]);
                }
            }
        } else
            for (int i = g * G; i < (g + 1) * G; i += 16) {
                const __m512 xv = _mm512_loadu_ps(x + i);
#pragma GCC unroll 4
                for (int o = 0; o < 4; o++) {
                    const __m512 qv = _mm512_cvtepi32_ps(unpack16_avx512(R->q[o], bits, i));
                    const __m512 w = ex ? _mm512_fmadd_ps(sc[o], qv, bi[o]) : _mm512_add_ps(_mm512_mul_ps(sc[o], qv), bi[o]);
                    acc[o] = _mm512_fmadd_ps(w, xv, acc[o]);
                }
            }
    }
    for (int o = 0; o < 4; o++) out[o] = _mm512_reduce_add_ps(acc[o]);
}

__attribute__((target("avx512f,avx512bw"))) static void k1x4q_avx512(const qrows4 *R, const float *x, int K,
                                                                     float out[4]) {
    Q_DISPATCH(k1x4q_avx512_bits, R, x, K, out, 0); /* 4 bits: a table a group, no product a weight */
}
#endif

/* One x row against 4 quantized W rows (K a multiple of the group size, >= 32). */
static void k1x4q(const qrows4 *R, const float *x, int K, float out[4]) {
#ifdef G3N_X86
    if (cpu_isa == ISA_AVX512) return k1x4q_avx512(R, x, K, out);
    if (cpu_isa == ISA_AVX2) return k1x4q_avx2(R, x, K, out);
#endif
    k1x4q_scalar(R, x, K, out);
}

/* One x row against 4 W rows of dtype `dtype`. */
static void k1x4(int dtype, const void *const w[4], const float *x, int K, float out[4]) {
#ifdef G3N_X86
    if (cpu_isa == ISA_AVX512) {
        if (dtype == G3N_BF16) return k1x4_bf16_avx512(w, x, K, out);
        if (dtype == G3N_F16) return k1x4_f16_avx512(w, x, K, out);
        return k1x4_f32_avx512(w, x, K, out);
    }
    if (cpu_isa == ISA_AVX2) {
        if (dtype == G3N_BF16) return k1x4_bf16_avx2(w, x, K, out);
        if (dtype == G3N_F16) return k1x4_f16_avx2(w, x, K, out);
        return k1x4_f32_avx2(w, x, K, out);
    }
#endif
    k1x4_scalar(dtype, w, x, K, out);
}

static void k4x4(const float *W, size_t ldw, const float *X, size_t ldx, int K, float out[4][4]) {
#ifdef G3N_X86
    if (cpu_isa == ISA_AVX512) return k4x4_avx512(W, ldw, X, ldx, K, out);
    if (cpu_isa == ISA_AVX2) return k4x4_avx2(W, ldw, X, ldx, K, out);
#endif
    k4x4_scalar(W, ldw, X, ldx, K, out);
}

/* ---- per-thread scratch ------------------------------------------------------------ */

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* *buf grown to at least count floats (its contents dropped), 64-byte aligned:
 * unaligned, every vector load of it would span two cache lines. */
static float *grow_aligned(float **buf, size_t *cap, size_t count) {
    if (count > *cap) {
        free(*buf);
        void *p = NULL;
        if (posix_memalign(&p, 64, count * sizeof(float)) != 0) abort();
        *buf = p;
        *cap = count;
    }
    return *buf;
}

/* Scratch of at least count floats for the calling thread (grows once, then stays). */
static float *tscratch(cpu_ctx *c, size_t count) {
    int t = thread_id();
    G3N_ASSERT(t < c->n_threads);
    return grow_aligned(&c->tscratch[t], &c->tscratch_n[t], count);
}

/* ---- matmul ------------------------------------------------------------------------- */

#define MM_BLOCK 16 /* W rows converted to f32 at once in the multi-row path */

static void cpu_matmul(g3n_backend *be, float *y, const g3n_mat *W, const float *x, int rows) {
    cpu_ctx *c = be->ctx;
    const int O = W->rows, K = W->cols;
    const size_t esz = W->bits ? 0 : g3n_dtype_size((g3n_dtype)W->dtype);
    const char *wbase = W->data;
    const int qb = W->bits ? q4_block(W->bits) : 0;
    if (qb) { /* 4 bits: x (and below, the dequantized rows) in the kernels' order */
        float *xp = grow_aligned(&c->xperm, &c->xperm_n, (size_t)rows * K);
#pragma omp parallel for schedule(static) num_threads(c->n_threads) if (rows >= 8)
        for (int r = 0; r < rows; r++) q4_perm(xp + (size_t)r * K, x + (size_t)r * K, K, qb);
        x = xp;
    }
    if (rows < 4) {
        /* decode: one pass over W, 4 rows at a time, read in the stored dtype */
        const int ngrp = (O + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(c->n_threads)
        for (int g = 0; g < ngrp; g++) {
            const int o0 = g * 4;
            const void *wr[4];
            qrows4 qr;
            if (W->bits) qrows4_set(&qr, W, o0);
            else
                for (int j = 0; j < 4; j++) wr[j] = wbase + (size_t)G3N_MIN(o0 + j, O - 1) * K * esz;
            for (int r = 0; r < rows; r++) {
                float out[4];
                if (W->bits) k1x4q(&qr, x + (size_t)r * K, K, out);
                else k1x4(W->dtype, wr, x + (size_t)r * K, K, out);
                for (int j = 0; j < 4 && o0 + j < O; j++) y[(size_t)r * O + o0 + j] = out[j];
            }
        }
        return;
    }
    /* prompt: MM_BLOCK rows of W converted to f32 once, then 4x4 register tiles */
    const int nblk = (O + MM_BLOCK - 1) / MM_BLOCK;
#pragma omp parallel for schedule(static) num_threads(c->n_threads)
    for (int bi = 0; bi < nblk; bi++) {
        const int o0 = bi * MM_BLOCK, no = G3N_MIN(MM_BLOCK, O - o0);
        float *wt = tscratch(c, (size_t)MM_BLOCK * K);
        for (int j = 0; j < MM_BLOCK; j++) { /* short blocks repeat the last row */
            const int r = o0 + G3N_MIN(j, no - 1);
            if (W->bits) qrow(W, r, wt + (size_t)j * K, qb);
            else cvt_row(W->dtype, wbase + (size_t)r * K * esz, wt + (size_t)j * K, K);
        }
        for (int j = 0; j < no; j += 4) {
            const float *wj = wt + (size_t)j * K;
            int r = 0;
#ifdef G3N_X86
            for (; cpu_isa == ISA_AVX512 && r + 6 <= rows; r += 6) {
                float out[6][4];
                k6x4_avx512(wj, (size_t)K, x + (size_t)r * K, (size_t)K, K, out);
                for (int a = 0; a < 6; a++)
                    for (int b = 0; b < 4 && j + b < no; b++) y[(size_t)(r + a) * O + o0 + j + b] = out[a][b];
            }
#endif
            for (; r + 4 <= rows; r += 4) {
                float out[4][4];
                k4x4(wj, (size_t)K, x + (size_t)r * K, (size_t)K, K, out);
                for (int a = 0; a < 4; a++)
                    for (int b = 0; b < 4 && j + b < no; b++) y[(size_t)(r + a) * O + o0 + j + b] = out[a][b];
            }
            const void *wr[4] = {wj, wj + K, wj + 2 * (size_t)K, wj + 3 * (size_t)K};
            for (; r < rows; r++) {
                float out[4];
                k1x4(G3N_F32, wr, x + (size_t)r * K, K, out);
                for (int b = 0; b < 4 && j + b < no; b++) y[(size_t)r * O + o0 + j + b] = out[b];
            }
        }
    }
}

/* ---- attention -------------------------------------------------------------------------- */

/* A token's G query heads that share a KV head are done together, so each key
 * and value is read once for all of them (Gemma 3n: 4 heads a KV head). The
 * visible keys [lo, p] are taken in chunks of ATT_CHUNK from lo: per chunk and
 * head a two-pass softmax (the scores' max, their exponentials and sum, the
 * values' weighted sum), then the chunks merged in order. The chunks depend on
 * the token's own span only, so a token's result is the same in a prompt, a
 * decode step or a batch (bitwise); a span of one chunk (every sliding layer of
 * Gemma 3n) gives the plain two-pass softmax. Steps of few tokens (decode)
 * spread the chunks over the threads; prompts give a thread whole (token, KV
 * head) pairs. */
#define ATT_CHUNK 512

/* Row j of cache array p (L->k or L->v) from element koff, hd floats: in place
 * when the cache is f32, else converted into row */
static const float *att_row(const g3n_kv_layer *L, const void *p, int j, int kv_dim, size_t koff, int hd,
                            float *row) {
    const size_t o = (size_t)(j % L->cap) * kv_dim + koff;
    if (!L->f16) return (const float *)p + o;
    cvt_row(G3N_F16, (const uint16_t *)p + o, row, hd);
    return row;
}

/* Keys [j0, j1) of cache L for the G heads q (consecutive hd-vectors): head g's
 * max in pm[g], sum in pm[G + g], sum of weighted values in pm[2G + g * hd ..].
 * sc: (j1 - j0) * G floats (key j's G scores together), then hd floats (an f16
 * cache's row as f32). */
static void att_chunk(const float *q, const g3n_kv_layer *L, size_t koff, int kv_dim, int hd, int G, int j0,
                      int j1, float *sc, float *pm) {
    const int nk = j1 - j0;
    float *m = pm, *l = pm + G, *acc = pm + 2 * G, *row = sc + (size_t)nk * G;
    for (int g = 0; g < G; g++) m[g] = -INFINITY;
    for (int j = 0; j < nk; j++) {
        const float *kj = att_row(L, L->k, j0 + j, kv_dim, koff, hd, row);
        for (int g = 0; g < G; g++) {
            const float s = dot(q + (size_t)g * hd, kj, hd);
            sc[(size_t)j * G + g] = s;
            if (s > m[g]) m[g] = s;
        }
    }
    for (int g = 0; g < G; g++) {
        float sum = 0;
        for (int j = 0; j < nk; j++) {
            float *e = sc + (size_t)j * G + g;
            *e = expf(*e - m[g]);
            sum += *e;
        }
        l[g] = sum;
    }
    for (int i = 0; i < G * hd; i++) acc[i] = 0;
    for (int j = 0; j < nk; j++)
        axpy_g(acc, sc + (size_t)j * G, G, att_row(L, L->v, j0 + j, kv_dim, koff, hd, row), hd);
}

/* Merge nch chunk partials (stride floats apart) of G heads into out (G
 * consecutive hd-vectors), in chunk order. Each chunk's max is replaced by its
 * weight exp(max - M) (the partials are used once). */
static void att_merge(float *part, size_t stride, int nch, int G, int hd, float *out) {
    for (int g = 0; g < G; g++) {
        float M = -INFINITY, den = 0;
        for (int ch = 0; ch < nch; ch++) M = fmaxf(M, part[ch * stride + g]);
        for (int ch = 0; ch < nch; ch++) {
            float *w = part + ch * stride + g;
            *w = expf(*w - M);
            den += part[ch * stride + G + g] * *w;
        }
        const float inv = 1.0f / den;
        for (int i = 0; i < hd; i++) {
            float num = 0;
            for (int ch = 0; ch < nch; ch++) num += part[ch * stride + 2 * G + (size_t)g * hd + i] * part[ch * stride + g];
            out[(size_t)g * hd + i] = num * inv;
        }
    }
}

/* Token t's cache in this layer, the first key it sees (*lo) and how many (returned) */
static int att_span(const cpu_ctx *c, int t, int layer, int window, const g3n_kv_layer **L, int *lo) {
    *L = &c->batch.kv[c->batch.seq[t]]->layer[layer];
    *lo = window > 0 ? G3N_MAX(0, c->batch.pos[t] - window + 1) : 0;
    const int nk = c->batch.pos[t] - *lo + 1;
    G3N_ASSERT(nk <= (*L)->cap);
    return nk;
}

static int att_chunks(int nk) { return (nk + ATT_CHUNK - 1) / ATT_CHUNK; }

static void cpu_attention(g3n_backend *be, float *out, const float *q, int layer, int n_head,
                          int n_head_kv, int head_dim, int window) {
    cpu_ctx *c = be->ctx;
    const int G = n_head / n_head_kv, hd = head_dim, kv_dim = n_head_kv * head_dim, n = c->batch.n;
    const size_t stride = (size_t)G * (hd + 2); /* floats of a chunk's partial */
    if ((long)n * n_head_kv >= 2L * c->n_threads) { /* prompts: a (token, KV head) a task */
#pragma omp parallel for schedule(dynamic, 1) num_threads(c->n_threads)
        for (int th = 0; th < n * n_head_kv; th++) {
            const int t = th / n_head_kv, hk = th % n_head_kv;
            const g3n_kv_layer *L;
            int lo;
            const int nk = att_span(c, t, layer, window, &L, &lo), nch = att_chunks(nk);
            float *pm = tscratch(c, (size_t)nch * stride + (size_t)G * ATT_CHUNK + hd), *sc = pm + (size_t)nch * stride;
            const float *qh = q + ((size_t)t * n_head + (size_t)hk * G) * hd;
            for (int ch = 0; ch < nch; ch++)
                att_chunk(qh, L, (size_t)hk * hd, kv_dim, hd, G, lo + ch * ATT_CHUNK,
                          G3N_MIN(lo + nk, lo + (ch + 1) * ATT_CHUNK), sc, pm + ch * stride);
            att_merge(pm, stride, nch, G, hd, out + ((size_t)t * n_head + (size_t)hk * G) * hd);
        }
        return;
    }
    /* a few tokens: every (token, KV head, chunk) a task, partials in att_part;
     * the tasks of a token, and of its KV head, are consecutive */
    size_t tasks = 0;
    for (int t = 0; t < n; t++) {
        const g3n_kv_layer *L;
        int lo;
        tasks += (size_t)n_head_kv * att_chunks(att_span(c, t, layer, window, &L, &lo));
    }
    if (tasks * stride > c->att_part_n) {
        free(c->att_part);
        c->att_part = g3n_malloc(tasks * stride * sizeof(float));
        c->att_part_n = tasks * stride;
    }
    float *part = c->att_part;
#pragma omp parallel for schedule(dynamic, 1) num_threads(c->n_threads)
    for (size_t task = 0; task < tasks; task++) {
        const g3n_kv_layer *L;
        int lo, t = 0, nk = att_span(c, 0, layer, window, &L, &lo);
        size_t k = task; /* -> (t, hk, ch) */
        while (k >= (size_t)n_head_kv * att_chunks(nk)) {
            k -= (size_t)n_head_kv * att_chunks(nk);
            nk = att_span(c, ++t, layer, window, &L, &lo);
        }
        const int nch = att_chunks(nk), hk = (int)(k / (size_t)nch), ch = (int)(k % (size_t)nch);
        float *sc = tscratch(c, (size_t)G * ATT_CHUNK + hd);
        att_chunk(q + ((size_t)t * n_head + (size_t)hk * G) * hd, L, (size_t)hk * hd, kv_dim, hd, G,
                  lo + ch * ATT_CHUNK, G3N_MIN(lo + nk, lo + (ch + 1) * ATT_CHUNK), sc, part + task * stride);
    }
    size_t first = 0; /* the merges, one (token, KV head) a task */
    for (int t = 0; t < n; t++) {
        const g3n_kv_layer *L;
        int lo;
        const int nch = att_chunks(att_span(c, t, layer, window, &L, &lo));
#pragma omp parallel for schedule(static) num_threads(c->n_threads)
        for (int hk = 0; hk < n_head_kv; hk++)
            att_merge(part + (first + (size_t)hk * nch) * stride, stride, nch, G, hd,
                      out + ((size_t)t * n_head + (size_t)hk * G) * hd);
        first += (size_t)n_head_kv * nch;
    }
}

/* ---- norms --------------------------------------------------------------------------------- */

static void cpu_rmsnorm(g3n_backend *be, float *y, const float *x, g3n_vec w, int rows, int dim,
                        float eps) {
    cpu_ctx *c = be->ctx;
#pragma omp parallel for schedule(static) num_threads(c->n_threads) if (rows >= 64)
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * dim;
        float *yr = y + (size_t)r * dim;
        float inv = 1.0f / sqrtf(dot(xr, xr, dim) / (float)dim + eps);
        if (w.data)
            for (int i = 0; i < dim; i++) yr[i] = xr[i] * inv * w.data[i];
        else
            for (int i = 0; i < dim; i++) yr[i] = xr[i] * inv;
    }
}

/* ---- bandwidth ---------------------------------------------------------------------------- */

#ifdef G3N_X86
__attribute__((target("avx512f"))) static float sum_avx512(const float *p, size_t n) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i + 64 <= n; i += 64) {
        a0 = _mm512_add_ps(a0, _mm512_load_ps(p + i));
        a1 = _mm512_add_ps(a1, _mm512_load_ps(p + i + 16));
        a2 = _mm512_add_ps(a2, _mm512_load_ps(p + i + 32));
        a3 = _mm512_add_ps(a3, _mm512_load_ps(p + i + 48));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}
__attribute__((target("avx2"))) static float sum_avx2(const float *p, size_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i + 32 <= n; i += 32) {
        a0 = _mm256_add_ps(a0, _mm256_load_ps(p + i));
        a1 = _mm256_add_ps(a1, _mm256_load_ps(p + i + 8));
        a2 = _mm256_add_ps(a2, _mm256_load_ps(p + i + 16));
        a3 = _mm256_add_ps(a3, _mm256_load_ps(p + i + 24));
    }
    return hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}
#endif

/* Sum of n floats (n a multiple of 64, p 64-byte aligned), streaming. */
static float sum_stream(const float *p, size_t n) {
#ifdef G3N_X86
    if (cpu_isa == ISA_AVX512) return sum_avx512(p, n);
    if (cpu_isa == ISA_AVX2) return sum_avx2(p, n);
#endif
    float s = 0;
    for (size_t i = 0; i < n; i++) s += p[i];
    return s;
}

/* Stream `bytes` of memory with every thread: best of 5 passes, in bytes/s. */
static double cpu_read_bandwidth(g3n_backend *be, size_t bytes) {
    cpu_ctx *c = be->ctx;
    const size_t chunk = (size_t)1 << 16; /* floats per work item */
    const long nchunk = (long)(bytes / sizeof(float) / chunk);
    if (nchunk <= 0) return 0;
    float *buf = NULL;
    if (posix_memalign((void **)&buf, 64, (size_t)nchunk * chunk * sizeof(float)) != 0) return 0;
#pragma omp parallel for schedule(static) num_threads(c->n_threads)
    for (long k = 0; k < nchunk; k++)
        for (size_t i = 0; i < chunk; i++) buf[(size_t)k * chunk + i] = (float)(i & 7);
    double best = 0;
    volatile float sink = 0;
    for (int pass = 0; pass < 5; pass++) {
        double t0 = g3n_time_s();
        float total = 0;
#pragma omp parallel for schedule(static) num_threads(c->n_threads) reduction(+ : total)
        for (long k = 0; k < nchunk; k++) total += sum_stream(buf + (size_t)k * chunk, chunk);
        double dt = g3n_time_s() - t0;
        sink += total;
        double bw = (double)nchunk * chunk * sizeof(float) / dt;
        if (bw > best) best = bw;
    }
    (void)sink;
    free(buf);
    return best;
}

/* ---- the reference's elementwise ops, on slices in parallel --------------------------
 * The MLP's activation (gelu_mul: 16,384 values a token at E2B and E4B), the
 * final soft-cap (262,144 logits) and the Gaussian top-k (a row at a time): the
 * reference op itself runs on each slice or row, so the bits are its bits.
 * Alone, in one thread, their tanhf and expm1f left the other idle: ~10% of an
 * E2B prompt's time went to libgomp's waiting (perf, docs/SPEED.md, twentieth
 * session). */
static void (*ref_gelu_mul)(g3n_backend *, float *, const float *, const float *, size_t);
static void (*ref_softcap)(g3n_backend *, float *, size_t, float);
static void (*ref_gaussian_topk)(g3n_backend *, float *, int, int, float);

#define EW_MIN 8192 /* elements below which one thread takes them all */

static void cpu_gelu_mul(g3n_backend *be, float *y, const float *g, const float *u, size_t n) {
    const int nt = n < EW_MIN ? 1 : ((cpu_ctx *)be->ctx)->n_threads;
    if (nt < 2) return ref_gelu_mul(be, y, g, u, n);
#pragma omp parallel for num_threads(nt)
    for (int t = 0; t < nt; t++) {
        const size_t a = n * (size_t)t / (size_t)nt, b = n * (size_t)(t + 1) / (size_t)nt;
        ref_gelu_mul(be, y + a, g + a, u ? u + a : NULL, b - a);
    }
}

static void cpu_softcap(g3n_backend *be, float *x, size_t n, float cap) {
    const int nt = n < EW_MIN ? 1 : ((cpu_ctx *)be->ctx)->n_threads;
    if (nt < 2) return ref_softcap(be, x, n, cap);
#pragma omp parallel for num_threads(nt)
    for (int t = 0; t < nt; t++) {
        const size_t a = n * (size_t)t / (size_t)nt, b = n * (size_t)(t + 1) / (size_t)nt;
        ref_softcap(be, x + a, b - a, cap);
    }
}

static void cpu_gaussian_topk(g3n_backend *be, float *x, int rows, int dim, float kappa) {
    const int nt = ((cpu_ctx *)be->ctx)->n_threads;
    if (rows < 2 || nt < 2) return ref_gaussian_topk(be, x, rows, dim, kappa);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int r = 0; r < rows; r++) ref_gaussian_topk(be, x + (size_t)r * dim, 1, dim, kappa);
}

/* ---- exact sparsity ----------------------------------------------------------------------
 * In the top-k layers (SPEC §3.5) ~95% of the activations that reach the down
 * projection are exact zeros. After the dense gate product and the Gaussian top-k
 * only the surviving units are read: their up rows (one dot each) and their down
 * columns, as rows of W^T, a copy in the stored dtype made at load (m->tdata).
 * Decode steps of up to 8 rows; larger steps and quantized matrices take the
 * dense composition (the reference op). Sums run in unit order, so only their
 * order differs from the dense path. */

static int (*ref_mat_prepare)(g3n_backend *, g3n_mat *, char *, size_t);
static void (*ref_mlp_sparse)(g3n_backend *, float *, float *, float *, const g3n_mat *, const g3n_mat *,
                              const g3n_mat *, const float *, int, float);

#define SP_TILE 64
static int cpu_mat_prepare(g3n_backend *be, g3n_mat *m, char *err, size_t errlen) {
    cpu_ctx *c = be->ctx;
    int rc = ref_mat_prepare(be, m, err, errlen);
    if (rc || !m->sparse_cols || m->bits || !m->data) return rc;
    const int R = m->rows, C = m->cols;
    const size_t esz = g3n_dtype_size((g3n_dtype)m->dtype);
    char *t = malloc((size_t)R * C * esz);
    void **own = realloc(c->owned, sizeof(void *) * (size_t)(c->n_owned + 1));
    if (!t || !own) {
        free(t);
        if (own) c->owned = own;
        return g3n_err(err, errlen, "%s: out of memory for its transposed copy (%.2f GB)", m->name ? m->name : "?",
                       (double)R * C * esz / 1e9);
    }
    c->owned = own;
    c->owned[c->n_owned++] = t;
    const char *w = m->data;
    const int nr = (R + SP_TILE - 1) / SP_TILE, nc = (C + SP_TILE - 1) / SP_TILE;
#pragma omp parallel for schedule(static) num_threads(c->n_threads)
    for (int b = 0; b < nr * nc; b++) { /* 64 x 64 tiles: W[r][col] -> T[col][r] */
        const int r0 = b / nc * SP_TILE, c0 = b % nc * SP_TILE;
        for (int r = r0; r < G3N_MIN(r0 + SP_TILE, R); r++)
            for (int col = c0; col < G3N_MIN(c0 + SP_TILE, C); col++)
                memcpy(t + ((size_t)col * R + r) * esz, w + ((size_t)r * C + col) * esz, esz);
    }
    m->tdata = t;
    return 0;
}

static void cpu_mlp_sparse(g3n_backend *be, float *y, float *gate, float *up, const g3n_mat *Wg, const g3n_mat *Wu,
                           const g3n_mat *Wd, const float *u, int rows, float kappa) {
    cpu_ctx *c = be->ctx;
    if (!Wd->tdata || Wd->bits || Wu->bits || rows > 8 || kappa <= 0) {
        ref_mlp_sparse(be, y, gate, up, Wg, Wu, Wd, u, rows, kappa);
        return;
    }
    const int I = Wg->rows, D = Wd->rows, K = Wu->cols;
    const size_t eu = g3n_dtype_size((g3n_dtype)Wu->dtype), ed = g3n_dtype_size((g3n_dtype)Wd->dtype);
    if ((size_t)I > c->sp_n) {
        free(c->sp_idx), free(c->sp_act);
        c->sp_idx = g3n_malloc(sizeof(int) * (size_t)I), c->sp_act = g3n_malloc(sizeof(float) * (size_t)I);
        c->sp_n = (size_t)I;
    }
    be->matmul(be, gate, Wg, u, rows);
    be->gaussian_topk(be, gate, rows, I, kappa);
    int *idx = c->sp_idx;
    float *act = c->sp_act;
    for (int r = 0; r < rows; r++) {
        const float *g = gate + (size_t)r * I, *ur = u + (size_t)r * K;
        int n = 0;
        for (int i = 0; i < I; i++)
            if (g[i] != 0) idx[n++] = i;
#pragma omp parallel for schedule(static) num_threads(c->n_threads)
        for (int k0 = 0; k0 < n; k0 += 4) { /* the survivors' up rows, four at a time (the matmul kernel) */
            const void *wr[4];
            float out[4];
            for (int j = 0; j < 4; j++) wr[j] = (const char *)Wu->data + (size_t)idx[G3N_MIN(k0 + j, n - 1)] * K * eu;
            k1x4(Wu->dtype, wr, ur, K, out);
            for (int j = 0; j < 4 && k0 + j < n; j++) act[k0 + j] = cpu_gelu_tanh(g[idx[k0 + j]]) * out[j];
        }
        /* y[o] = sum over survivors of act * W^T[unit][o], in unit order, 256 outputs a task */
        const int nt = (D + 255) / 256;
#pragma omp parallel for schedule(static) num_threads(c->n_threads)
        for (int t = 0; t < nt; t++) {
            const int o0 = t * 256, no = G3N_MIN(256, D - o0);
            float *acc = tscratch(c, 512), *col = acc + 256;
            for (int o = 0; o < no; o++) acc[o] = 0;
            for (int k = 0; k < n; k++) {
                cvt_row(Wd->dtype, (const char *)Wd->tdata + ((size_t)idx[k] * D + o0) * ed, col, no);
                const float a = act[k];
                for (int o = 0; o < no; o++) acc[o] += a * col[o];
            }
            memcpy(y + (size_t)r * D + o0, acc, sizeof(float) * (size_t)no);
        }
    }
}

static void cpu_destroy(g3n_backend *be) {
    cpu_ctx *c = be->ctx;
    for (int i = 0; i < c->n_owned; i++) free(c->owned[i]);
    free(c->owned);
    free(c->sp_idx), free(c->sp_act), free(c->xperm), free(c->att_part);
    for (int t = 0; t < c->n_threads; t++) free(c->tscratch[t]);
    free(c->tscratch);
    free(c->tscratch_n);
    free(c->scratch);
    free(c);
    free(be);
}

g3n_backend *cpu_backend_create(int n_threads, char *err, size_t errlen) {
    if (cpu_isa < 0) cpu_isa = isa_detect();
#ifdef _OPENMP
    if (n_threads <= 0) n_threads = omp_get_num_procs();
#endif
    if (n_threads <= 0) n_threads = 1;
#ifndef _OPENMP
    n_threads = 1;
#endif
    g3n_backend *be = g3n_calloc(1, sizeof(*be));
    cpu_ctx *c = g3n_calloc(1, sizeof(cpu_ctx));
    c->n_threads = n_threads;
    c->tscratch = g3n_calloc((size_t)n_threads, sizeof(float *));
    c->tscratch_n = g3n_calloc((size_t)n_threads, sizeof(size_t));
    be->ctx = c;
    be->name = "cpu";
    snprintf(be->device_name, sizeof be->device_name, "cpu (%s, %d threads)", cpu_isa_name(), n_threads);
    be->n_threads = n_threads;
    cpu_ref_fill_ops(be);
    ref_mat_prepare = be->mat_prepare, ref_mlp_sparse = be->mlp_sparse;
    ref_gelu_mul = be->gelu_mul, ref_softcap = be->softcap, ref_gaussian_topk = be->gaussian_topk;
    be->gelu_mul = cpu_gelu_mul;
    be->softcap = cpu_softcap;
    be->gaussian_topk = cpu_gaussian_topk;
    be->mat_prepare = cpu_mat_prepare;
    be->mlp_sparse = cpu_mlp_sparse;
    be->destroy = cpu_destroy;
    be->matmul = cpu_matmul;
    be->attention = cpu_attention;
    be->rmsnorm = cpu_rmsnorm;
    be->read_bandwidth = cpu_read_bandwidth;
    return be;
}
