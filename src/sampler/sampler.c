/* sampler.c: the token sampler behind the "sampler" section of g3n.h: penalties,
 * top-k, top-p, min-p, temperature and a seeded draw (or greedy argmax).
 * It only reads a row of logits; it knows nothing of models or tokenizers, and
 * it does not allocate after g3n_sampler_create (the history ring may grow in
 * g3n_sampler_accept, never in g3n_sampler_sample).
 *
 * The chain, in this order (llama.cpp's default order):
 *
 *  0. Clean:   NaN -> -inf (masked); +inf -> FLT_MAX (a finite, largest logit).
 *              A token whose logit is -inf is never chosen. If every logit is
 *              -inf/NaN there is nothing to choose and sample returns -1.
 *  1. Penalties over the window = the last repeat_last_n accepted tokens (-1: all
 *     of them, 0: none), applied once per distinct token t in the window with
 *     count c = occurrences of t in the window:
 *              l = l > 0 ? l / repeat_penalty : l * repeat_penalty   (llama.cpp)
 *              l = l - frequency_penalty * c - presence_penalty      (OpenAI)
 *     computed in double and clamped to +-FLT_MAX (penalties never mask a token;
 *     a masked -inf token stays masked). Tokens outside the window are untouched.
 *  2. Greedy:  temperature == 0 -> argmax of the penalized logits, lowest id on
 *              ties. Steps 3-6 are skipped and no random number is drawn.
 *  3. Top-k:   keep the top_k best tokens (top_k <= 0 or >= the number of unmasked
 *              tokens: keep all). "Best" is a total order: higher logit first, then
 *              lower id, so ties at the cut keep the lowest ids.
 *  4. Top-p:   on the UNTEMPERED (temperature 1) softmax of what step 3 kept,
 *              renormalized over that set: walk tokens best-first and keep the
 *              shortest prefix whose cumulative probability reaches top_p, i.e.
 *              the token at which the running sum first becomes >= top_p is kept
 *              and everything after it is dropped. "Reaches" uses a tolerance of
 *              1e-6 (sum >= top_p - 1e-6), so a boundary that is hit exactly in
 *              real numbers (.5 + .3 with top_p = .8) counts as hit despite float
 *              rounding. top_p == 1: off.
 *  5. Min-p:   also on the untempered distribution: keep tokens with
 *              p >= min_p * p_max, i.e. logit >= max_logit + log(min_p), with the
 *              same 1e-6 tolerance in log space (equality keeps the token).
 *              The best token always survives. min_p == 0: off.
 *  6. Sample:  softmax of the survivors at the temperature (logit / temperature),
 *              one uniform u in [0,1) from the PRNG, pick the first survivor (in a
 *              fixed order that depends only on the logits) at which the running
 *              sum of weights exceeds u * total.
 *
 * So temperature changes only the final draw; which tokens are allowed is decided
 * on the temperature-1 distribution (as llama.cpp does with its default chain).
 *
 * PRNG: xoshiro256** seeded through splitmix64 from the 64-bit seed; a uniform is
 * (next() >> 11) * 2^-53. Each non-greedy sample draws exactly one uniform.
 *
 * Cost for a vocabulary of V (nothing is ever sorted in full):
 *  - one pass cleans the logits and finds the maximum (SSE2 where available,
 *    else plain C giving the same bits; G3N_SAMPLER_SCALAR forces plain C);
 *  - top-k: a heap of k filled in one pass (a token costs one compare unless it
 *    beats the current k-th best); top_k > 2048: quickselect, then sort k;
 *  - top-p without top-k: the best 64 by the heap; if bounds on the total mass
 *    already settle the cut (the usual case for a peaked distribution) nothing
 *    else is read; otherwise one exp pass for the exact total and, if the 64
 *    are not enough, a histogram of the mass by logit (32 buckets per unit) so
 *    that only the bucket where the cumulative mass crosses top_p is sorted;
 *  - min-p without top-k/top-p: survivors are listed in one pass when they are
 *    at most V/4, else the draw runs over the whole vocabulary;
 *  - a whole-vocabulary draw: one vectorized exp pass (Taylor degree 7 after
 *    range reduction, within 2 ulp of expf) with per-block sums, then a walk. */
#include "common.h"
#include "g3n.h"

#include <float.h>
#include <math.h>

#if defined(__SSE2__) && !defined(G3N_SAMPLER_SCALAR)
#include <emmintrin.h>
#define USE_SSE2 1
#else
#define USE_SSE2 0
#endif

#define TOL 1e-6            /* top-p / min-p boundary tolerance (see steps 4, 5) */
#define HEAP_TOPK_MAX 2048  /* top_k up to this uses the one-pass heap */
#define TOPP_FIRST 64       /* top-p: first try with the best 64 */
#define BLOCK 256           /* weights are summed per block of this many tokens */
#define HIST_BPU 32         /* top-p histogram: buckets per unit of logit */
#define HIST_NB (88 * HIST_BPU + 1) /* 88 units (exp underflows past 87) + the rest */
#define EXP_LO -87.0f       /* fexp(x) = 0 below this */

typedef struct {
    float l;    /* logit (cleaned and penalized) */
    int32_t id; /* token id */
} cand;

struct g3n_sampler {
    g3n_sampler_params p;
    int n_vocab;
    float *w;     /* n_vocab: cleaned, penalized logits of the current call */
    float *e;     /* n_vocab: weights exp((w - max) / t) */
    double *bsum; /* per BLOCK of e: its sum */
    cand *c;      /* n_vocab (+ 16 spare): candidates */
    double *hmass; /* HIST_NB: top-p histogram */
    int *hcnt;
    /* history window: per-token counts, and the list of ids whose count > 0 */
    uint32_t *count;
    int32_t *active;     /* ids with count > 0, in no particular order */
    int32_t *active_pos; /* active_pos[id] = index of id in active */
    int n_active;
    int32_t *ring;       /* last repeat_last_n ids (repeat_last_n > 0 only) */
    int ring_alloc, ring_len, ring_head;
    uint64_t rng[4];
};

/* ---- PRNG: splitmix64 (seeding) and xoshiro256** ------------------------------------- */

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static inline uint64_t rotl64(uint64_t x, int k) {
    return (x << k) | (x >> (64 - k));
}

/* Seed the four state words from seed through splitmix64 (whose consecutive
 * outputs are never all zero). */
static void rng_seed(uint64_t st[4], uint64_t seed) {
    uint64_t x = seed;
    for (int i = 0; i < 4; i++) st[i] = splitmix64(&x);
}

/* Next 64 bits of xoshiro256**. */
static uint64_t rng_next(uint64_t st[4]) {
    uint64_t r = rotl64(st[1] * 5, 7) * 9;
    uint64_t t = st[1] << 17;
    st[2] ^= st[0];
    st[3] ^= st[1];
    st[1] ^= st[2];
    st[0] ^= st[3];
    st[2] ^= t;
    st[3] = rotl64(st[3], 45);
    return r;
}

/* Uniform double in [0, 1) with 53 random bits. */
static double rng_uniform(uint64_t st[4]) {
    return (double)(rng_next(st) >> 11) * (1.0 / 9007199254740992.0);
}

/* ---- exp ----------------------------------------------------------------------------- */

/* e^x for x <= 0: 0 below EXP_LO (and for -inf/NaN), x > 0 is taken as 0.
 * k = round(x / ln2) by the 1.5 * 2^23 trick, r = x - k ln2 (ln2 split so k * hi
 * is exact), e^r by its Taylor series to degree 7 (|r| <= .347: truncation
 * < 6e-9), times 2^k. Within 2 ulp of exp. fexp4 does the same operations in the
 * same order, so both give identical bits. */
#define FEXP_LOG2E 1.44269504f
#define FEXP_MAGIC 12582912.0f
#define FEXP_LN2_HI 0.693359375f
#define FEXP_LN2_LO -2.12194440e-4f

static inline float fexp(float x) {
    if (!(x >= EXP_LO)) return 0.0f;
    if (x > 0.0f) x = 0.0f;
    float k = (x * FEXP_LOG2E + FEXP_MAGIC) - FEXP_MAGIC;
    float r = x - k * FEXP_LN2_HI;
    r = r - k * FEXP_LN2_LO;
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)k + 127) << 23;
    float sc;
    memcpy(&sc, &bits, 4);
    return p * sc;
}

#if USE_SSE2
static inline __m128 fexp4(__m128 x) {
    __m128 ok = _mm_cmpge_ps(x, _mm_set1_ps(EXP_LO));
    x = _mm_min_ps(_mm_max_ps(x, _mm_set1_ps(EXP_LO)), _mm_setzero_ps());
    __m128 magic = _mm_set1_ps(FEXP_MAGIC);
    __m128 k = _mm_sub_ps(_mm_add_ps(_mm_mul_ps(x, _mm_set1_ps(FEXP_LOG2E)), magic), magic);
    __m128 r = _mm_sub_ps(x, _mm_mul_ps(k, _mm_set1_ps(FEXP_LN2_HI)));
    r = _mm_sub_ps(r, _mm_mul_ps(k, _mm_set1_ps(FEXP_LN2_LO)));
    __m128 p = _mm_set1_ps(1.0f / 5040);
    p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.0f / 720));
    p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.0f / 120));
    p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.0f / 24));
    p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.0f / 6));
    p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(0.5f));
    p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.0f));
    p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.0f));
    __m128i ki = _mm_add_epi32(_mm_cvttps_epi32(k), _mm_set1_epi32(127));
    __m128 sc = _mm_castsi128_ps(_mm_slli_epi32(ki, 23));
    return _mm_and_ps(_mm_mul_ps(p, sc), ok);
}
#endif

/* ---- wide passes over the vocabulary ------------------------------------------------- */

static inline float clean1(float x) {
    x = x != x ? -INFINITY : x;
    return x > FLT_MAX ? FLT_MAX : x;
}

/* w[i] = clean1(in[i]); *lmax = max of w, *n_fin = how many w > -inf. */
static void clean_max(const float *in, float *w, int n, float *lmax, int *n_fin) {
    float m = -INFINITY;
    int cnt = 0, i = 0;
#if USE_SSE2
    __m128 ninf = _mm_set1_ps(-INFINITY), big = _mm_set1_ps(FLT_MAX);
    __m128 m0 = ninf, m1 = ninf;
    __m128i c0 = _mm_setzero_si128(), c1 = _mm_setzero_si128();
    for (; i + 8 <= n; i += 8) {
        __m128 x0 = _mm_loadu_ps(in + i), x1 = _mm_loadu_ps(in + i + 4);
        __m128 o0 = _mm_cmpord_ps(x0, x0), o1 = _mm_cmpord_ps(x1, x1);
        x0 = _mm_or_ps(_mm_and_ps(o0, x0), _mm_andnot_ps(o0, ninf));
        x1 = _mm_or_ps(_mm_and_ps(o1, x1), _mm_andnot_ps(o1, ninf));
        x0 = _mm_min_ps(x0, big);
        x1 = _mm_min_ps(x1, big);
        _mm_storeu_ps(w + i, x0);
        _mm_storeu_ps(w + i + 4, x1);
        m0 = _mm_max_ps(m0, x0);
        m1 = _mm_max_ps(m1, x1);
        c0 = _mm_sub_epi32(c0, _mm_castps_si128(_mm_cmpgt_ps(x0, ninf)));
        c1 = _mm_sub_epi32(c1, _mm_castps_si128(_mm_cmpgt_ps(x1, ninf)));
    }
    float mv[4];
    int32_t cv[4];
    _mm_storeu_ps(mv, _mm_max_ps(m0, m1));
    _mm_storeu_si128((__m128i *)cv, _mm_add_epi32(c0, c1));
    for (int j = 0; j < 4; j++) {
        m = mv[j] > m ? mv[j] : m;
        cnt += cv[j];
    }
#endif
    /* plain C: four independent maxima (no single dependency chain) */
    float mq[4] = {m, m, m, m};
    for (; i + 4 <= n; i += 4) {
        for (int j = 0; j < 4; j++) {
            float x = clean1(in[i + j]);
            w[i + j] = x;
            mq[j] = x > mq[j] ? x : mq[j];
            cnt += x > -INFINITY;
        }
    }
    for (; i < n; i++) {
        float x = clean1(in[i]);
        w[i] = x;
        mq[0] = x > mq[0] ? x : mq[0];
        cnt += x > -INFINITY;
    }
    for (int j = 0; j < 4; j++) m = mq[j] > m ? mq[j] : m;
    *lmax = m;
    *n_fin = cnt;
}

/* Largest value of w[0..n). */
static float vec_max(const float *w, int n) {
    float m = -INFINITY;
    int i = 0;
#if USE_SSE2
    __m128 m0 = _mm_set1_ps(-INFINITY), m1 = m0;
    for (; i + 8 <= n; i += 8) {
        m0 = _mm_max_ps(m0, _mm_loadu_ps(w + i));
        m1 = _mm_max_ps(m1, _mm_loadu_ps(w + i + 4));
    }
    float mv[4];
    _mm_storeu_ps(mv, _mm_max_ps(m0, m1));
    for (int j = 0; j < 4; j++) m = mv[j] > m ? mv[j] : m;
#endif
    for (; i < n; i++) m = w[i] > m ? w[i] : m;
    return m;
}

/* Lowest i with w[i] == v, or -1. */
static int first_equal(const float *w, int n, float v) {
    int i = 0;
#if USE_SSE2
    __m128 vv = _mm_set1_ps(v);
    for (; i + 8 <= n; i += 8) {
        int mk = _mm_movemask_ps(_mm_cmpeq_ps(_mm_loadu_ps(w + i), vv)) |
                 _mm_movemask_ps(_mm_cmpeq_ps(_mm_loadu_ps(w + i + 4), vv)) << 4;
        if (mk) break;
    }
#endif
    for (; i < n; i++) {
        if (w[i] == v) return i;
    }
    return -1;
}

/* e[i] = w[i] >= thr ? fexp((w[i] - lmax) / t) : 0 for all i, bsum[b] = the sum
 * of block b (four interleaved double partial sums, combined as (0+2)+(1+3), the
 * same in both code paths). Returns the sum of the block sums, in block order. */
static double exp_weights(const float *w, float *e, double *bsum, int n, float lmax, float t,
                          float thr) {
    double tot = 0;
    for (int b = 0, i0 = 0; i0 < n; b++, i0 += BLOCK) {
        int i1 = G3N_MIN(n, i0 + BLOCK), i = i0;
        double acc[4] = {0, 0, 0, 0};
#if USE_SSE2
        __m128 vl = _mm_set1_ps(lmax), vt = _mm_set1_ps(t), vthr = _mm_set1_ps(thr);
        __m128d a01 = _mm_setzero_pd(), a23 = _mm_setzero_pd();
        for (; i + 4 <= i1; i += 4) {
            __m128 x = _mm_loadu_ps(w + i);
            __m128 v = fexp4(_mm_div_ps(_mm_sub_ps(x, vl), vt));
            v = _mm_and_ps(v, _mm_cmpge_ps(x, vthr));
            _mm_storeu_ps(e + i, v);
            a01 = _mm_add_pd(a01, _mm_cvtps_pd(v));
            a23 = _mm_add_pd(a23, _mm_cvtps_pd(_mm_movehl_ps(v, v)));
        }
        _mm_storeu_pd(acc, a01);
        _mm_storeu_pd(acc + 2, a23);
#endif
        for (; i < i1; i++) {
            float v = w[i] >= thr ? fexp((w[i] - lmax) / t) : 0.0f;
            e[i] = v;
            acc[(i - i0) & 3] += v;
        }
        bsum[b] = (acc[0] + acc[2]) + (acc[1] + acc[3]);
        tot += bsum[b];
    }
    return tot;
}

/* ---- ordering, heap, selection, sorting ---------------------------------------------- */

/* The total order of step 3: a comes before b when its logit is higher, or equal
 * with a lower id. Ids are unique, so no two candidates compare equal. */
static inline int before(cand a, cand b) {
    return a.l > b.l || (a.l == b.l && a.id < b.id);
}

static inline void swap_c(cand *a, cand *b) {
    cand t = *a;
    *a = *b;
    *b = t;
}

/* Sift h[i] down a heap of n whose root is the WORST element (every parent comes
 * after its children in the order). */
static void sift_worst(cand *h, int n, int i) {
    cand x = h[i];
    for (;;) {
        int ch = 2 * i + 1;
        if (ch >= n) break;
        if (ch + 1 < n && before(h[ch], h[ch + 1])) ch++; /* the worse child */
        if (!before(x, h[ch])) break;
        h[i] = h[ch];
        i = ch;
    }
    h[i] = x;
}

/* Sort a[0..n) best-first in O(n log n) worst case (fallback for the quick paths). */
static void heap_sort(cand *a, int n) {
    for (int i = n / 2 - 1; i >= 0; i--) sift_worst(a, n, i);
    for (int end = n - 1; end > 0; end--) {
        swap_c(&a[0], &a[end]);
        sift_worst(a, end, 0);
    }
}

static void insertion_sort(cand *a, int n) {
    for (int i = 1; i < n; i++) {
        cand x = a[i];
        int j = i - 1;
        while (j >= 0 && before(x, a[j])) {
            a[j + 1] = a[j];
            j--;
        }
        a[j + 1] = x;
    }
}

/* Partition a[0..n) (n >= 3) around a median-of-three pivot. Returns the pivot's
 * final index p: a[0..p) come before a[p], a(p..n) after it. */
static int partition(cand *a, int n) {
    int mid = n / 2;
    if (before(a[mid], a[0])) swap_c(&a[mid], &a[0]);
    if (before(a[n - 1], a[0])) swap_c(&a[n - 1], &a[0]);
    if (before(a[n - 1], a[mid])) swap_c(&a[n - 1], &a[mid]);
    /* now a[0], a[mid], a[n-1] are in order; the median becomes the pivot */
    swap_c(&a[mid], &a[n - 1]);
    cand piv = a[n - 1];
    int s = 0;
    for (int j = 0; j < n - 1; j++) {
        if (before(a[j], piv)) swap_c(&a[s++], &a[j]);
    }
    swap_c(&a[s], &a[n - 1]);
    return s;
}

static int depth_limit(int n) {
    int d = 0;
    while (n > 1) {
        n >>= 1;
        d++;
    }
    return 2 * d + 2;
}

/* Sort a[0..n) best-first: introsort (quicksort, heap sort past the depth limit,
 * insertion sort for short ranges). */
static void sort_cands(cand *a, int n, int depth) {
    while (n > 16) {
        if (depth-- <= 0) {
            heap_sort(a, n);
            return;
        }
        int p = partition(a, n);
        if (p < n - p - 1) {
            sort_cands(a, p, depth);
            a += p + 1;
            n -= p + 1;
        } else {
            sort_cands(a + p + 1, n - p - 1, depth);
            n = p;
        }
    }
    insertion_sort(a, n);
}

/* Rearrange a[0..n) so that a[0..m) hold the m best, in no particular order
 * (0 < m <= n). Expected O(n); heap sort past the depth limit. */
static void select_top(cand *a, int n, int m) {
    int lo = 0, hi = n, depth = depth_limit(n);
    while (hi - lo > 16) {
        if (depth-- <= 0) {
            heap_sort(a + lo, hi - lo);
            return;
        }
        int p = lo + partition(a + lo, hi - lo);
        if (p == m || p == m - 1) return;
        if (p < m) {
            lo = p + 1;
        } else {
            hi = p;
        }
    }
    insertion_sort(a + lo, hi - lo);
}

/* The best min(k, unmasked) tokens of w[0..n) into out, sorted best-first, in one
 * pass with a heap of k whose root is the current k-th best: a token enters only
 * if its logit is strictly higher (an equal logit has a higher id, so it is worse).
 * Returns how many were written. */
static int heap_top(const float *w, int n, int k, cand *out) {
    int m = 0, i = 0;
    for (; i < n && m < k; i++) {
        if (w[i] > -INFINITY) out[m++] = (cand){w[i], i};
    }
    for (int j = m / 2 - 1; j >= 0; j--) sift_worst(out, m, j);
    if (m == k) {
        float thr = out[0].l;
        while (i < n) {
#if USE_SSE2
            if (i + 8 <= n) { /* skip 8 at a time while none beats the k-th best */
                __m128 vt = _mm_set1_ps(thr);
                int mk = _mm_movemask_ps(_mm_cmpgt_ps(_mm_loadu_ps(w + i), vt)) |
                         _mm_movemask_ps(_mm_cmpgt_ps(_mm_loadu_ps(w + i + 4), vt));
                if (!mk) {
                    i += 8;
                    continue;
                }
            }
#endif
            for (int end = G3N_MIN(n, i + 8); i < end; i++) {
                if (w[i] > thr) {
                    out[0] = (cand){w[i], i};
                    sift_worst(out, k, 0);
                    thr = out[0].l;
                }
            }
        }
    }
    for (int end = m - 1; end > 0; end--) {
        swap_c(&out[0], &out[end]);
        sift_worst(out, end, 0);
    }
    return m;
}

/* ---- history ------------------------------------------------------------------------- */

static void hist_inc(g3n_sampler *s, int32_t id) {
    if (s->count[id]++ == 0) {
        s->active_pos[id] = s->n_active;
        s->active[s->n_active++] = id;
    }
}

static void hist_dec(g3n_sampler *s, int32_t id) {
    if (--s->count[id] == 0) {
        int pos = s->active_pos[id];
        int32_t last = s->active[--s->n_active];
        s->active[pos] = last;
        s->active_pos[last] = pos;
    }
}

/* ---- public API ---------------------------------------------------------------------- */

/* Gemma 3n's published generation settings (temperature 1, top_k 64, top_p 0.95),
 * no min-p, penalties off, window 64, seed 0 (deterministic; callers wanting a
 * different run each time pass their own seed). */
g3n_sampler_params g3n_sampler_default_params(void) {
    g3n_sampler_params p;
    p.temperature = 1.0f;
    p.top_k = 64;
    p.top_p = 0.95f;
    p.min_p = 0.0f;
    p.repeat_penalty = 1.0f;
    p.repeat_last_n = 64;
    p.presence_penalty = 0.0f;
    p.frequency_penalty = 0.0f;
    p.seed = 0;
    return p;
}

/* Validate p (NULL: defaults) and allocate everything sample needs. Returns NULL
 * and a one-line message naming the parameter on an out-of-range value. */
g3n_sampler *g3n_sampler_create(const g3n_sampler_params *p, int n_vocab, char *err,
                                size_t errlen) {
    g3n_sampler_params d = g3n_sampler_default_params();
    if (!p) p = &d;
    if (n_vocab <= 0 || n_vocab > (1 << 30)) {
        g3n_err(err, errlen, "sampler: n_vocab must be in 1..2^30 (got %d)", n_vocab);
        return NULL;
    }
    if (!isfinite(p->temperature) || p->temperature < 0) {
        g3n_err(err, errlen, "sampler: temperature must be finite and >= 0 (got %g)",
                (double)p->temperature);
        return NULL;
    }
    if (!(p->top_p > 0 && p->top_p <= 1)) {
        g3n_err(err, errlen, "sampler: top_p must be in (0, 1] (got %g)", (double)p->top_p);
        return NULL;
    }
    if (!(p->min_p >= 0 && p->min_p <= 1)) {
        g3n_err(err, errlen, "sampler: min_p must be in [0, 1] (got %g)", (double)p->min_p);
        return NULL;
    }
    if (!isfinite(p->repeat_penalty) || !(p->repeat_penalty > 0)) {
        g3n_err(err, errlen, "sampler: repeat_penalty must be finite and > 0 (got %g)",
                (double)p->repeat_penalty);
        return NULL;
    }
    if (p->repeat_last_n < -1) {
        g3n_err(err, errlen, "sampler: repeat_last_n must be >= -1 (got %d)", p->repeat_last_n);
        return NULL;
    }
    if (!isfinite(p->presence_penalty)) {
        g3n_err(err, errlen, "sampler: presence_penalty must be finite (got %g)",
                (double)p->presence_penalty);
        return NULL;
    }
    if (!isfinite(p->frequency_penalty)) {
        g3n_err(err, errlen, "sampler: frequency_penalty must be finite (got %g)",
                (double)p->frequency_penalty);
        return NULL;
    }
    g3n_sampler *s = g3n_calloc(1, sizeof(*s));
    s->p = *p;
    s->n_vocab = n_vocab;
    size_t n = (size_t)n_vocab;
    s->w = g3n_malloc(n * sizeof(float));
    s->e = g3n_malloc(n * sizeof(float));
    s->bsum = g3n_malloc((n + BLOCK - 1) / BLOCK * sizeof(double));
    s->c = g3n_malloc((n + 16) * sizeof(cand)); /* spare: top_p_full, gather_at_least */
    s->hmass = g3n_malloc(HIST_NB * sizeof(double));
    s->hcnt = g3n_malloc(HIST_NB * sizeof(int));
    s->count = g3n_calloc(n, sizeof(uint32_t));
    s->active = g3n_malloc(n * sizeof(int32_t));
    s->active_pos = g3n_malloc(n * sizeof(int32_t));
    if (p->repeat_last_n > 0) {
        s->ring_alloc = G3N_MIN(p->repeat_last_n, 1024);
        s->ring = g3n_malloc((size_t)s->ring_alloc * sizeof(int32_t));
    }
    rng_seed(s->rng, p->seed);
    return s;
}

/* Free s and everything it owns; NULL is a no-op. */
void g3n_sampler_free(g3n_sampler *s) {
    if (!s) return;
    free(s->w);
    free(s->e);
    free(s->bsum);
    free(s->c);
    free(s->hmass);
    free(s->hcnt);
    free(s->count);
    free(s->active);
    free(s->active_pos);
    free(s->ring);
    free(s);
}

/* Record id in the penalty window (the oldest token leaves once the window holds
 * repeat_last_n). Ids outside [0, n_vocab) are ignored and take no slot. The ring
 * grows here (up to repeat_last_n entries) rather than being sized up front. */
void g3n_sampler_accept(g3n_sampler *s, int32_t id) {
    if (id < 0 || id >= s->n_vocab) return;
    int cap = s->p.repeat_last_n;
    if (cap == 0) return;
    if (cap < 0) { /* unbounded: counts only */
        hist_inc(s, id);
        return;
    }
    if (s->ring_len == cap) { /* full: replace the oldest */
        hist_dec(s, s->ring[s->ring_head]);
        s->ring[s->ring_head] = id;
        s->ring_head = s->ring_head + 1 == cap ? 0 : s->ring_head + 1;
    } else { /* not yet full: the ring is a plain array (head 0) */
        if (s->ring_len == s->ring_alloc) {
            int na = s->ring_alloc > cap / 2 ? cap : s->ring_alloc * 2;
            int32_t *r = g3n_malloc((size_t)na * sizeof(int32_t));
            memcpy(r, s->ring, (size_t)s->ring_len * sizeof(int32_t));
            free(s->ring);
            s->ring = r;
            s->ring_alloc = na;
        }
        s->ring[s->ring_len++] = id;
    }
    hist_inc(s, id);
}

/* Empty the penalty window and re-seed from params.seed, so the sampler behaves
 * exactly as freshly created. */
void g3n_sampler_reset(g3n_sampler *s) {
    for (int i = 0; i < s->n_active; i++) s->count[s->active[i]] = 0;
    s->n_active = 0;
    s->ring_len = 0;
    s->ring_head = 0;
    rng_seed(s->rng, s->p.seed);
}

/* ---- the chain ----------------------------------------------------------------------- */

enum { OUT_NONE, OUT_ONE, OUT_FULL, OUT_LIST };

/* What steps 0-5 leave for the draw. */
typedef struct {
    int kind;    /* OUT_NONE: nothing unmasked; OUT_ONE: only `id` (greedy, or one
                    unmasked token); OUT_FULL: every i with w[i] >= thr;
                    OUT_LIST: s->c[0..n) (not necessarily sorted) */
    int32_t id;  /* the best token */
    int n;
    float lmax;  /* its logit */
    float thr;   /* OUT_FULL: min-p threshold on w (-inf when off) */
} chain_out;

/* Steps 0 and 1: s->w = cleaned, penalized copy of logits; *lmax its maximum and
 * *n_fin the number of unmasked tokens. */
static void clean_and_penalize(g3n_sampler *s, const float *logits, float *lmax, int *n_fin) {
    float *w = s->w;
    clean_max(logits, w, s->n_vocab, lmax, n_fin);
    const g3n_sampler_params *p = &s->p;
    if (s->n_active == 0 || (p->repeat_penalty == 1.0f && p->presence_penalty == 0.0f &&
                             p->frequency_penalty == 0.0f))
        return;
    double rp = p->repeat_penalty, fp = p->frequency_penalty, pp = p->presence_penalty;
    for (int j = 0; j < s->n_active; j++) {
        int32_t id = s->active[j];
        double x = w[id];
        if (x == -INFINITY) continue;
        x = x > 0 ? x / rp : x * rp;
        x -= fp * (double)s->count[id] + pp;
        if (x > FLT_MAX) x = FLT_MAX;
        if (x < -FLT_MAX) x = -FLT_MAX;
        w[id] = (float)x;
    }
    *lmax = vec_max(w, s->n_vocab);
}

/* Top-p histogram bucket of a logit: HIST_BPU buckets per unit below the best,
 * everything past 88 units in the last; monotone, so a lower bucket never holds
 * a worse token than a higher one. */
static inline int hist_bucket(float l, float lmax) {
    float d = (lmax - l) * (float)HIST_BPU;
    return d < (float)(HIST_NB - 1) ? (int)d : HIST_NB - 1;
}

/* Top-p over the whole vocabulary (top-k off). n_fin = unmasked tokens. Leaves the
 * kept tokens in s->c (best-first except that the buckets above the boundary
 * bucket are in id order) and returns how many.
 *
 * First the best 64 by the heap. Their mass bounds the total Z from both sides:
 * Z >= (mass of the 64) and Z <= that + (n_fin - 64) * (weight of the 64th),
 * since no other token weighs more than the 64th. When the first prefix that
 * reaches top_p of the lower bound also reaches top_p of the upper bound, it
 * reaches top_p of Z and no shorter prefix does: done without touching the other
 * tokens (the usual case for a language model's peaked distribution). Otherwise
 * Z is summed exactly and, if the 64 still fall short, the histogram decides. */
static int top_p_full(g3n_sampler *s, int n_fin, float lmax) {
    const float *w = s->w;
    const float *e = s->e;
    int nv = s->n_vocab;
    cand *c = s->c;
    double pt = (double)s->p.top_p - TOL;

    int m = heap_top(w, nv, G3N_MIN(TOPP_FIRST, n_fin), c);
    double mass = 0;
    for (int i = 0; i < m; i++) mass += fexp(c[i].l - lmax);
    double z_hi = mass + (double)(n_fin - m) * fexp(c[m - 1].l - lmax);
    double cum = 0;
    for (int i = 0; i < m; i++) {
        cum += fexp(c[i].l - lmax);
        if (cum >= pt * mass) {
            if (cum >= pt * z_hi) return i + 1;
            break;
        }
    }

    double z = exp_weights(w, s->e, s->bsum, nv, lmax, 1.0f, -INFINITY);
    double target = pt * z;
    cum = 0;
    for (int i = 0; i < m; i++) {
        cum += e[c[i].id];
        if (cum >= target) return i + 1;
    }
    if (m == n_fin) return n_fin;

    /* otherwise: mass by bucket, then sort only the bucket where it crosses */
    memset(s->hmass, 0, HIST_NB * sizeof(double));
    memset(s->hcnt, 0, HIST_NB * sizeof(int));
    for (int i = 0; i < nv; i++) {
        if (w[i] > -INFINITY) {
            int b = hist_bucket(w[i], lmax);
            s->hmass[b] += e[i];
            s->hcnt[b]++;
        }
    }
    int bb = -1, n_above = 0;
    cum = 0;
    for (int b = 0; b < HIST_NB; b++) {
        if (cum + s->hmass[b] >= target) {
            bb = b;
            break;
        }
        cum += s->hmass[b];
        n_above += s->hcnt[b];
    }
    if (bb < 0) { /* rounding left the total a hair short: keep everything */
        int n = 0;
        for (int i = 0; i < nv; i++) {
            if (w[i] > -INFINITY) c[n++] = (cand){w[i], i};
        }
        return n;
    }
    /* Gather without branches (which bucket a token falls in is unpredictable):
     * each token is written to both regions and the write is kept by advancing
     * the region's end. Region A (buckets above bb) is c[0..n_above), region B
     * (bucket bb) starts one slot later, so A's spare write never lands in B;
     * B's spare write lands at most at n_vocab + 1. Masked tokens (bucket
     * HIST_NB - 1 > bb) are never kept. */
    int nb = s->hcnt[bb];
    int pa = 0, pb = n_above + 1;
    for (int i = 0; i < nv; i++) {
        cand x = {w[i], i};
        int b = hist_bucket(w[i], lmax);
        c[pa] = x;
        pa += b < bb;
        c[pb] = x;
        pb += b == bb;
    }
    G3N_ASSERT(pa == n_above && pb == n_above + 1 + nb);
    memmove(c + n_above, c + n_above + 1, (size_t)nb * sizeof(cand));
    sort_cands(c + n_above, nb, depth_limit(nb));
    for (int i = n_above; i < n_above + nb; i++) {
        cum += e[c[i].id];
        if (cum >= target) return i + 1;
    }
    return n_above + nb;
}

/* Append to c, in id order, every token with w[i] >= thr (a finite threshold);
 * returns how many, or 0 as soon as there are more than max_n. c needs room for
 * max_n + 8 (spare writes). */
static int gather_at_least(const float *w, int n, float thr, cand *c, int max_n) {
    int k = 0, i = 0;
    while (i < n) {
#if USE_SSE2
        if (i + 8 <= n) { /* skip 8 at a time while none passes */
            __m128 vt = _mm_set1_ps(thr);
            int mk = _mm_movemask_ps(_mm_cmpge_ps(_mm_loadu_ps(w + i), vt)) |
                     _mm_movemask_ps(_mm_cmpge_ps(_mm_loadu_ps(w + i + 4), vt));
            if (!mk) {
                i += 8;
                continue;
            }
        }
#endif
        for (int end = G3N_MIN(n, i + 8); i < end; i++) { /* no branch: written always, */
            c[k] = (cand){w[i], i};                          /* kept by advancing k */
            k += w[i] >= thr;
        }
        if (k > max_n) return 0;
    }
    return k;
}

/* Step 4 on a list: the best n candidates s->c[0..n) cut to the shortest prefix
 * holding top_p of their untempered mass. Returns the new n. */
static int top_p_list(g3n_sampler *s, int n, float lmax) {
    const cand *c = s->c;
    double z = 0;
    for (int i = 0; i < n; i++) z += fexp(c[i].l - lmax);
    double target = ((double)s->p.top_p - TOL) * z, cum = 0;
    for (int i = 0; i < n; i++) {
        cum += fexp(c[i].l - lmax);
        if (cum >= target) return i + 1;
    }
    return n;
}

/* Step 5's threshold: the smallest float f with f >= lmax + log(min_p) - TOL,
 * computed in double; finite, so masked tokens never pass. */
static float min_p_thr(const g3n_sampler *s, float lmax) {
    double t = (double)lmax + (log((double)s->p.min_p) - TOL);
    float thr = (float)t;
    if ((double)thr < t) thr = nextafterf(thr, INFINITY);
    if (thr > lmax) thr = lmax; /* cannot happen (lmax >= t); the best stays */
    if (thr < -FLT_MAX) thr = -FLT_MAX;
    return thr;
}

/* Step 5 on a list: keep the candidates at or above thr (the best always passes:
 * log(min_p) <= 0). Returns the new n. */
static int min_p_list(g3n_sampler *s, int n, float thr) {
    int k = 0;
    for (int i = 0; i < n; i++) {
        if (s->c[i].l >= thr) s->c[k++] = s->c[i];
    }
    return k;
}

/* Steps 0-5. */
static chain_out run_chain(g3n_sampler *s, const float *logits) {
    chain_out o = {OUT_NONE, -1, 0, -INFINITY, -INFINITY};
    float lmax;
    int n_fin;
    clean_and_penalize(s, logits, &lmax, &n_fin);
    const float *w = s->w;
    int nv = s->n_vocab;
    if (n_fin == 0) return o;
    o.lmax = lmax;
    o.id = first_equal(w, nv, lmax); /* lowest id among the best */
    const g3n_sampler_params *p = &s->p;
    if (p->temperature <= 0 || n_fin == 1) {
        o.kind = OUT_ONE;
        return o;
    }

    cand *c = s->c;
    int n = 0;
    o.kind = OUT_FULL;
    if (p->top_k > 0 && p->top_k < n_fin) { /* 3. top-k */
        if (p->top_k <= HEAP_TOPK_MAX) {
            n = heap_top(w, nv, p->top_k, c);
        } else {
            for (int i = 0; i < nv; i++) {
                if (w[i] > -INFINITY) c[n++] = (cand){w[i], i};
            }
            select_top(c, n, p->top_k);
            n = p->top_k;
            sort_cands(c, n, depth_limit(n));
        }
        o.kind = OUT_LIST;
    }
    if (p->top_p < 1.0f) { /* 4. top-p on the untempered distribution */
        if (o.kind == OUT_LIST) {
            n = top_p_list(s, n, lmax);
        } else {
            n = top_p_full(s, n_fin, lmax);
            o.kind = OUT_LIST;
        }
    }
    if (p->min_p > 0) { /* 5. min-p, relative to the best token */
        float thr = min_p_thr(s, lmax);
        if (o.kind == OUT_LIST) {
            n = min_p_list(s, n, thr);
        } else {
            /* few survivors: list them, so the draw skips the full-width exp */
            n = gather_at_least(w, nv, thr, c, nv / 4);
            if (n > 0) {
                o.kind = OUT_LIST;
            } else {
                o.thr = thr;
            }
        }
    }
    o.n = n;
    return o;
}

/* Step 6 weights of the list candidates into s->e[0..n) (the untempered weights
 * there are no longer needed); returns their sum. */
static double list_weights(g3n_sampler *s, const chain_out *o) {
    double tot = 0;
    float t = s->p.temperature;
    for (int i = 0; i < o->n; i++) {
        s->e[i] = fexp((s->c[i].l - o->lmax) / t);
        tot += s->e[i];
    }
    return tot;
}

/* Step 6: the draw from the chain's result (one uniform unless greedy). */
static int32_t draw(g3n_sampler *s, const chain_out *o) {
    if (o->kind == OUT_NONE) return -1;
    float t = s->p.temperature;
    if (t <= 0) return o->id;
    double u = rng_uniform(s->rng); /* one draw per non-greedy sample, always */
    if (o->kind == OUT_ONE) return o->id;
    if (o->kind == OUT_LIST) {
        double r = u * list_weights(s, o), cum = 0;
        for (int i = 0; i < o->n; i++) {
            cum += s->e[i];
            if (s->e[i] > 0 && cum > r) return s->c[i].id;
        }
        return o->id; /* rounding: not reached in practice */
    }
    /* full vocabulary: find the block, then the token */
    double tot = exp_weights(s->w, s->e, s->bsum, s->n_vocab, o->lmax, t, o->thr);
    double r = u * tot, cum = 0;
    for (int b = 0, i0 = 0; i0 < s->n_vocab; b++, i0 += BLOCK) {
        if (cum + s->bsum[b] > r) {
            double c2 = cum;
            for (int i = i0, i1 = G3N_MIN(s->n_vocab, i0 + BLOCK); i < i1; i++) {
                c2 += s->e[i];
                if (s->e[i] > 0 && c2 > r) return i;
            }
        }
        cum += s->bsum[b];
    }
    return o->id; /* rounding: not reached in practice */
}

/* Run the chain on logits (n_vocab floats, unchanged) and return the chosen id, or
 * -1 when every logit is -inf or NaN. Draws one uniform unless greedy. */
int32_t g3n_sampler_sample(g3n_sampler *s, const float *logits) {
    chain_out o = run_chain(s, logits);
    return draw(s, &o);
}

/* The candidates path. The chain reads only the best top_k cleaned logits when
 * no penalty changes them and more than top_k are finite (steps 3-6 then run on
 * that list), and only the best one when greedy; with the best top_k + 1 the
 * second condition can be checked. */
#define SAMPLE_TOP_MAX 256

int g3n_sampler_vocab(const g3n_sampler *s) { return s->n_vocab; }

int g3n_sampler_top_need(const g3n_sampler *s) {
    const g3n_sampler_params *p = &s->p;
    if (p->repeat_penalty != 1.0f || p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f) return 0;
    if (p->temperature <= 0) return 1;
    if (p->top_k > 0 && p->top_k < SAMPLE_TOP_MAX && p->top_k < s->n_vocab) return p->top_k + 1;
    return 0;
}

int32_t g3n_sampler_sample_top(g3n_sampler *s, const float *vals, const int32_t *ids, int m) {
    const g3n_sampler_params *p = &s->p;
    if (m <= 0 || m != g3n_sampler_top_need(s)) return -2; /* not what this sampler can decide from */
    int n_fin = 0; /* finite ones come first */
    while (n_fin < m && vals[n_fin] > -INFINITY) n_fin++;
    chain_out o = {OUT_NONE, -1, 0, -INFINITY, -INFINITY};
    if (n_fin == 0) return -1;
    o.lmax = vals[0], o.id = ids[0];
    if (p->temperature <= 0 || n_fin == 1) {
        o.kind = OUT_ONE;
        return draw(s, &o);
    }
    if (n_fin < m) return -2; /* n_fin <= top_k: the chain skips top-k; it needs the row */
    int n = p->top_k;
    for (int i = 0; i < n; i++) s->c[i] = (cand){vals[i], ids[i]};
    o.kind = OUT_LIST;
    if (p->top_p < 1.0f) n = top_p_list(s, n, o.lmax);
    if (p->min_p > 0) n = min_p_list(s, n, min_p_thr(s, o.lmax));
    o.n = n;
    return draw(s, &o);
}

/* The distribution g3n_sampler_sample would draw
 * from for these logits, as n_vocab probabilities (0 for dropped tokens; one-hot
 * when greedy). Uses the penalty window but draws no random number. Returns the
 * number of tokens with probability > 0 (0 when everything is masked). */
int g3n_sampler_probs(g3n_sampler *s, const float *logits, float *probs) {
    chain_out o = run_chain(s, logits);
    int nv = s->n_vocab;
    memset(probs, 0, (size_t)nv * sizeof(float));
    if (o.kind == OUT_NONE) return 0;
    if (o.kind == OUT_ONE) {
        probs[o.id] = 1.0f;
        return 1;
    }
    float t = s->p.temperature;
    int k = 0;
    if (o.kind == OUT_LIST) {
        double tot = list_weights(s, &o);
        for (int i = 0; i < o.n; i++) {
            probs[s->c[i].id] = (float)(s->e[i] / tot);
            k += probs[s->c[i].id] > 0;
        }
        return k;
    }
    double tot = exp_weights(s->w, s->e, s->bsum, nv, o.lmax, t, o.thr);
    for (int i = 0; i < nv; i++) {
        probs[i] = (float)(s->e[i] / tot);
        k += probs[i] > 0;
    }
    return k;
}
