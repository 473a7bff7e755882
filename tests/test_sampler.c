/* test_sampler.c: tests of the token sampler (src/sampler/sampler.c) on fixed
 * distributions: parameter checks, greedy, top-k/top-p/min-p sets and their
 * boundaries, temperature, penalties, seeded frequencies (chi-square), seeds and
 * reset, NaN/inf, a 262400-wide vocabulary against brute force, and a printed
 * (not asserted) timing. No model or tokenizer is involved. */
#include "test.h"

#include "common.h"
#include "g3n.h"

#include <float.h>
#include <stdint.h>

/* Defined in sampler.c, not (yet) in g3n.h: the distribution sample draws from. */

/* ---- helpers ------------------------------------------------------------------------- */

/* Params with every filter and penalty off, temperature 1. */
static g3n_sampler_params plain(void) {
    g3n_sampler_params p = g3n_sampler_default_params();
    p.temperature = 1.0f;
    p.top_k = 0;
    p.top_p = 1.0f;
    p.min_p = 0.0f;
    p.repeat_penalty = 1.0f;
    p.presence_penalty = 0.0f;
    p.frequency_penalty = 0.0f;
    p.seed = 1234;
    return p;
}

static g3n_sampler *mk(const g3n_sampler_params *p, int n_vocab) {
    char err[256] = "";
    g3n_sampler *s = g3n_sampler_create(p, n_vocab, err, sizeof(err));
    if (!s) printf("  create failed: %s\n", err);
    return s;
}

/* logits = log(p) (p = 0 -> -inf) */
static void logits_from_probs(const double *p, int n, float *l) {
    for (int i = 0; i < n; i++) l[i] = p[i] > 0 ? (float)log(p[i]) : -INFINITY;
}

/* Run the chain on logits and compare the resulting distribution with want[]
 * (zeros must be exactly zero, the rest within tol). */
static int probs_are(g3n_sampler *s, const float *logits, const double *want, int n,
                     double tol) {
    float got[64];
    G3N_ASSERT(n <= 64);
    g3n_sampler_probs(s, logits, got);
    int ok = 1;
    for (int i = 0; i < n; i++) {
        if ((want[i] == 0) != (got[i] == 0) || fabs(got[i] - want[i]) > tol) ok = 0;
    }
    if (!ok) {
        printf("  probs:");
        for (int i = 0; i < n; i++) printf(" %d:%.6f/%.6f", i, got[i], want[i]);
        printf("  (got/want)\n");
    }
    return ok;
}

/* want = normalize(p^(1/t)) over the ids where keep[i] */
static void tempered(const double *p, const int *keep, int n, double t, double *want) {
    double z = 0;
    for (int i = 0; i < n; i++) z += keep[i] ? pow(p[i], 1.0 / t) : 0;
    for (int i = 0; i < n; i++) want[i] = keep[i] ? pow(p[i], 1.0 / t) / z : 0;
}

/* Pearson chi-square of counts against probabilities (bins with p = 0 must be
 * empty: any hit there returns +inf). *df receives the degrees of freedom. */
static double chi_square(const long *cnt, const double *p, int n, long draws, int *df) {
    double x = 0;
    int bins = 0;
    for (int i = 0; i < n; i++) {
        if (p[i] == 0) {
            if (cnt[i]) return INFINITY;
            continue;
        }
        double e = p[i] * (double)draws;
        x += ((double)cnt[i] - e) * ((double)cnt[i] - e) / e;
        bins++;
    }
    *df = bins - 1;
    return x;
}

/* Upper bound on chi-square for a correct sampler: for df <= 9 the chance that a
 * correct sampler exceeds 60 is < 2e-9 (df 9: 1.3e-9; df 5: 1.2e-11). */
#define CHI2_BOUND 60.0

/* Brute-force reference order: logit descending, id ascending. */
static const float *ref_logits;
static int cmp_ref(const void *a, const void *b) {
    int i = *(const int *)a, j = *(const int *)b;
    if (ref_logits[i] > ref_logits[j]) return -1;
    if (ref_logits[i] < ref_logits[j]) return 1;
    return i < j ? -1 : i > j;
}

/* ---- parameters ---------------------------------------------------------------------- */

static int rejects(g3n_sampler_params p, int n_vocab, const char *name) {
    char err[256] = "";
    g3n_sampler *s = g3n_sampler_create(&p, n_vocab, err, sizeof(err));
    if (s) {
        g3n_sampler_free(s);
        printf("  accepted a bad %s\n", name);
        return 0;
    }
    if (!strstr(err, name) || strchr(err, '\n')) {
        printf("  message for %s: \"%s\"\n", name, err);
        return 0;
    }
    return 1;
}

TEST(validation) {
    g3n_sampler_params d = g3n_sampler_default_params();
    g3n_sampler_params p;
#define BAD(field, value, name)                                                        \
    do {                                                                               \
        p = d;                                                                         \
        p.field = value;                                                               \
        CHECK(rejects(p, 10, name));                                                   \
    } while (0)
    CHECK(rejects(d, 0, "n_vocab"));
    CHECK(rejects(d, -5, "n_vocab"));
    CHECK(rejects(d, (1 << 30) + 1, "n_vocab"));
    BAD(temperature, -0.1f, "temperature");
    BAD(temperature, NAN, "temperature");
    BAD(temperature, INFINITY, "temperature");
    BAD(top_p, 0.0f, "top_p");
    BAD(top_p, 1.01f, "top_p");
    BAD(top_p, NAN, "top_p");
    BAD(min_p, -0.01f, "min_p");
    BAD(min_p, 1.5f, "min_p");
    BAD(min_p, NAN, "min_p");
    BAD(repeat_penalty, 0.0f, "repeat_penalty");
    BAD(repeat_penalty, -1.0f, "repeat_penalty");
    BAD(repeat_penalty, INFINITY, "repeat_penalty");
    BAD(repeat_penalty, NAN, "repeat_penalty");
    BAD(repeat_last_n, -2, "repeat_last_n");
    BAD(presence_penalty, INFINITY, "presence_penalty");
    BAD(presence_penalty, NAN, "presence_penalty");
    BAD(frequency_penalty, -INFINITY, "frequency_penalty");
    BAD(frequency_penalty, NAN, "frequency_penalty");

#undef BAD
    /* edges that are valid */
    char err[128];
    p = d;
    p.temperature = 0;
    p.top_p = 1;
    p.min_p = 1;
    p.repeat_last_n = -1;
    p.top_k = -3;
    p.presence_penalty = -2;
    p.frequency_penalty = 2;
    g3n_sampler *s = g3n_sampler_create(&p, 1, err, sizeof(err));
    CHECK(s != NULL);
    float one = 0.5f;
    if (s) CHECK(g3n_sampler_sample(s, &one) == 0);
    g3n_sampler_free(s);
    s = g3n_sampler_create(NULL, 10, err, sizeof(err)); /* NULL: defaults */
    CHECK(s != NULL);
    g3n_sampler_free(s);
    g3n_sampler_free(NULL);
    CHECK(d.temperature == 1.0f && d.top_k == 64 && d.top_p == 0.95f && d.min_p == 0.0f);
    CHECK(d.repeat_penalty == 1.0f && d.presence_penalty == 0 && d.frequency_penalty == 0);
}

/* ---- greedy -------------------------------------------------------------------------- */

TEST(greedy_ties) {
    g3n_sampler_params p = plain();
    p.temperature = 0;
    p.top_k = 1, p.top_p = 0.1f, p.min_p = 0.9f; /* irrelevant when greedy */
    g3n_sampler *s = mk(&p, 6);
    float l[6] = {1, 5, 2, 5, -3, 5};
    for (int i = 0; i < 5; i++) CHECK(g3n_sampler_sample(s, l) == 1);
    float m[6] = {-INFINITY, -2, -1, -1, -INFINITY, -7};
    CHECK(g3n_sampler_sample(s, m) == 2);
    double want[6] = {0, 0, 1, 0, 0, 0};
    CHECK(probs_are(s, m, want, 6, 0));
    g3n_sampler_free(s);
}

TEST(greedy_nan_inf) {
    g3n_sampler_params p = plain();
    p.temperature = 0;
    g3n_sampler *s = mk(&p, 5);
    float a[5] = {NAN, -INFINITY, 0.5f, NAN, 0.25f};
    CHECK(g3n_sampler_sample(s, a) == 2);
    float b[5] = {NAN, NAN, NAN, NAN, NAN};
    CHECK(g3n_sampler_sample(s, b) == -1);
    float c[5] = {-INFINITY, -INFINITY, NAN, -INFINITY, -INFINITY};
    CHECK(g3n_sampler_sample(s, c) == -1);
    float probs[5];
    CHECK(g3n_sampler_probs(s, c, probs) == 0 && probs[0] == 0 && probs[4] == 0);
    float d[5] = {1, INFINITY, FLT_MAX, INFINITY, NAN}; /* +inf ties: lowest id */
    CHECK(g3n_sampler_sample(s, d) == 1);
    float e[5] = {-FLT_MAX, -1e30f, -FLT_MAX, NAN, -INFINITY};
    CHECK(g3n_sampler_sample(s, e) == 1);
    g3n_sampler_free(s);
}

TEST(greedy_after_penalty) {
    g3n_sampler_params p = plain();
    p.temperature = 0;
    p.repeat_penalty = 2.0f;
    p.repeat_last_n = 3;
    g3n_sampler *s = mk(&p, 4);
    float l[4] = {1.0f, 3.0f, 2.0f, -1.0f};
    CHECK(g3n_sampler_sample(s, l) == 1);
    g3n_sampler_accept(s, 1); /* 3 -> 1.5 < 2 */
    CHECK(g3n_sampler_sample(s, l) == 2);
    g3n_sampler_accept(s, 2); /* 2 -> 1: tie with token 0 at 1, and 1.5 wins */
    CHECK(g3n_sampler_sample(s, l) == 1);
    g3n_sampler_accept(s, 3);
    g3n_sampler_accept(s, 3); /* window now {2,3,3}: token 1 left it */
    CHECK(g3n_sampler_sample(s, l) == 1);
    g3n_sampler_reset(s);
    g3n_sampler_accept(s, 1);
    g3n_sampler_accept(s, 2); /* 1.5, 1 vs token 0 at 1 */
    CHECK(g3n_sampler_sample(s, l) == 1);
    g3n_sampler_free(s);

    p.repeat_penalty = 1.0f;
    p.presence_penalty = 1.0f; /* 3-1 = 2 ties token 2; lower id wins */
    s = mk(&p, 4);
    g3n_sampler_accept(s, 1);
    CHECK(g3n_sampler_sample(s, l) == 1);
    g3n_sampler_accept(s, 1); /* presence counts once: still 2 */
    CHECK(g3n_sampler_sample(s, l) == 1);
    g3n_sampler_free(s);
}

/* ---- top-k --------------------------------------------------------------------------- */

TEST(top_k_ties) {
    float l[5] = {1, 3, 3, 3, 2};
    g3n_sampler_params p = plain();
    p.top_k = 2;
    g3n_sampler *s = mk(&p, 5);
    double w2[5] = {0, 0.5, 0.5, 0, 0};
    CHECK(probs_are(s, l, w2, 5, 1e-6));
    g3n_sampler_free(s);

    p.top_k = 1;
    s = mk(&p, 5);
    double w1[5] = {0, 1, 0, 0, 0};
    CHECK(probs_are(s, l, w1, 5, 0));
    for (int i = 0; i < 20; i++) CHECK(g3n_sampler_sample(s, l) == 1);
    g3n_sampler_free(s);

    p.top_k = 4; /* 3 tied at 3 plus token 4 */
    s = mk(&p, 5);
    double e3 = exp(3.0), e2 = exp(2.0), z = 3 * e3 + e2;
    double w4[5] = {0, e3 / z, e3 / z, e3 / z, e2 / z};
    CHECK(probs_are(s, l, w4, 5, 1e-6));
    g3n_sampler_free(s);

    p.top_k = 100; /* more than the vocabulary: keep all */
    s = mk(&p, 5);
    z = 3 * e3 + e2 + exp(1.0);
    double wa[5] = {exp(1.0) / z, e3 / z, e3 / z, e3 / z, e2 / z};
    CHECK(probs_are(s, l, wa, 5, 1e-6));
    g3n_sampler_free(s);

    /* top-k counts unmasked tokens only: k=3 with two masked keeps 3 of the rest */
    float m[6] = {-INFINITY, 0, NAN, 1, 2, 0};
    p.top_k = 3;
    s = mk(&p, 6);
    z = exp(0.0) + exp(1.0) + exp(2.0);
    double wm[6] = {0, 1 / z, 0, exp(1.0) / z, exp(2.0) / z, 0};
    CHECK(probs_are(s, m, wm, 6, 1e-6));
    g3n_sampler_free(s);
}

/* ---- top-p --------------------------------------------------------------------------- */

/* Keeps tokens of .5,.3,.15,.05 (ids permuted by perm) at top_p and checks the
 * renormalized result at temperature t. */
static int check_top_p(float top_p, double t, const int *want_keep_sorted) {
    static const int perm[4] = {2, 0, 3, 1}; /* id of the i-th most likely */
    const double ps[4] = {0.5, 0.3, 0.15, 0.05};
    double p[4];
    int keep[4];
    for (int i = 0; i < 4; i++) {
        p[perm[i]] = ps[i];
        keep[perm[i]] = want_keep_sorted[i];
    }
    float l[4];
    logits_from_probs(p, 4, l);
    g3n_sampler_params sp = plain();
    sp.top_p = top_p;
    sp.temperature = (float)t;
    g3n_sampler *s = mk(&sp, 4);
    double want[4];
    tempered(p, keep, 4, t, want);
    int ok = probs_are(s, l, want, 4, 1e-6);
    if (!ok) printf("  top_p %.3f t %.2f\n", (double)top_p, t);
    g3n_sampler_free(s);
    return ok;
}

TEST(top_p_sets) {
    /* rule: keep the shortest best-first prefix whose cumulative probability
     * reaches top_p (>= top_p - 1e-6); the token that reaches it is kept */
    const int k1[4] = {1, 0, 0, 0}, k2[4] = {1, 1, 0, 0}, k3[4] = {1, 1, 1, 0};
    const int k4[4] = {1, 1, 1, 1};
    CHECK(check_top_p(0.8f, 1, k2));   /* .5 + .3 hits .8 exactly: {0,1} */
    CHECK(check_top_p(0.79f, 1, k2));
    CHECK(check_top_p(0.801f, 1, k3)); /* just past the boundary: one more */
    CHECK(check_top_p(0.5f, 1, k1));   /* the first token alone hits .5 */
    CHECK(check_top_p(0.49f, 1, k1));
    CHECK(check_top_p(0.01f, 1, k1));
    CHECK(check_top_p(0.501f, 1, k2));
    CHECK(check_top_p(0.95f, 1, k3));  /* .5+.3+.15 hits .95 exactly */
    CHECK(check_top_p(0.951f, 1, k4));
    CHECK(check_top_p(1.0f, 1, k4));   /* off */
}

TEST(top_p_untempered) {
    /* the set is decided at temperature 1; temperature only reshapes it */
    const int k2[4] = {1, 1, 0, 0}, k1[4] = {1, 0, 0, 0};
    CHECK(check_top_p(0.8f, 2.0, k2));  /* at t=2 the cumsum would need 3 */
    CHECK(check_top_p(0.8f, 0.25, k2)); /* at t=.25 the first would reach .8 */
    CHECK(check_top_p(0.5f, 3.0, k1));
}

TEST(top_p_with_top_k) {
    /* top-p sees the distribution renormalized over what top-k kept:
     * top_k 3 leaves .5,.3,.15 -> .526,.316,.158; top_p .85 needs all three */
    double p[4] = {0.5, 0.3, 0.15, 0.05};
    float l[4];
    logits_from_probs(p, 4, l);
    g3n_sampler_params sp = plain();
    sp.top_k = 3;
    sp.top_p = 0.85f;
    g3n_sampler *s = mk(&sp, 4);
    int keep[4] = {1, 1, 1, 0};
    double want[4];
    tempered(p, keep, 4, 1, want);
    CHECK(probs_are(s, l, want, 4, 1e-6));
    g3n_sampler_free(s);
    sp.top_p = 0.82f; /* (.5+.3)/.95 = .842 >= .82: {0,1}; unrenormalized .8 would not be */
    s = mk(&sp, 4);
    int keep2[4] = {1, 1, 0, 0};
    tempered(p, keep2, 4, 1, want);
    CHECK(probs_are(s, l, want, 4, 1e-6));
    g3n_sampler_free(s);
}

/* top-p over a wide, flat vocabulary (many chunks of the partial sort) against a
 * full sort; also with -inf holes and duplicate logits. */
TEST(top_p_wide_vs_brute) {
    enum { V = 20000 };
    static float l[V], probs[V];
    static int idx[V];
    const float tps[] = {0.05f, 0.3f, 0.6f, 0.9f, 0.99f, 0.999f};
    for (int trial = 0; trial < 4; trial++) {
        test_seed(100 + trial);
        for (int i = 0; i < V; i++) {
            float x = test_randf() * (trial == 0 ? 1.0f : trial == 1 ? 4.0f : 12.0f);
            if (trial == 3) x = floorf(x); /* many exact ties */
            if (trial >= 2 && (test_rand_u64() % 7) == 0) x = -INFINITY;
            l[i] = x;
        }
        ref_logits = l;
        int nfin = 0;
        for (int i = 0; i < V; i++) {
            if (l[i] > -INFINITY) idx[nfin++] = i;
        }
        qsort(idx, (size_t)nfin, sizeof(int), cmp_ref);
        double z = 0, lmax = l[idx[0]];
        for (int i = 0; i < nfin; i++) z += exp(l[idx[i]] - lmax);
        for (size_t t = 0; t < sizeof(tps) / sizeof(tps[0]); t++) {
            int nkeep = nfin;
            double cum = 0;
            for (int i = 0; i < nfin; i++) {
                cum += exp(l[idx[i]] - lmax);
                if (cum >= (tps[t] - 1e-6) * z) {
                    nkeep = i + 1;
                    break;
                }
            }
            g3n_sampler_params sp = plain();
            sp.top_p = tps[t];
            g3n_sampler *s = mk(&sp, V);
            int got = g3n_sampler_probs(s, l, probs);
            int bad = 0;
            for (int i = 0; i < nfin; i++) bad += (i < nkeep) != (probs[idx[i]] > 0);
            CHECK_MSG(got == nkeep && bad == 0, "trial %d top_p %g: kept %d want %d, %d differ",
                      trial, (double)tps[t], got, nkeep, bad);
            g3n_sampler_free(s);
        }
    }
}

/* ---- min-p --------------------------------------------------------------------------- */

TEST(min_p_threshold) {
    double p[4] = {0.15, 0.5, 0.05, 0.3}; /* best is id 1 */
    float l[4];
    logits_from_probs(p, 4, l);
    struct {
        float min_p;
        int keep[4];
    } cases[] = {
        {0.3f, {1, 1, 0, 1}},  /* threshold .15: equality keeps id 0 */
        {0.31f, {0, 1, 0, 1}}, /* .155 */
        {0.1f, {1, 1, 1, 1}},  /* .05: equality keeps id 2 */
        {0.6f, {0, 1, 0, 1}},  /* .3: equality keeps id 3 */
        {0.61f, {0, 1, 0, 0}},
        {1.0f, {0, 1, 0, 0}},
        {0.0f, {1, 1, 1, 1}},  /* off */
    };
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        for (int path = 0; path < 2; path++) { /* full-vocabulary and list paths */
            g3n_sampler_params sp = plain();
            sp.min_p = cases[c].min_p;
            if (path) sp.top_k = 3, cases[c].keep[2] = 0; /* top-k 3 drops id 2 anyway */
            g3n_sampler *s = mk(&sp, 4);
            double want[4];
            tempered(p, cases[c].keep, 4, 1, want);
            CHECK_MSG(probs_are(s, l, want, 4, 1e-6), "min_p %g path %d",
                      (double)cases[c].min_p, path);
            g3n_sampler_free(s);
        }
    }
    /* untempered: at t=2 the ratio .15/.5 becomes .548, but min_p .5 still drops
     * ids 0 and 2 (decided at t=1); temperature then reshapes {1,3} */
    g3n_sampler_params sp = plain();
    sp.min_p = 0.5f;
    sp.temperature = 2.0f;
    g3n_sampler *s = mk(&sp, 4);
    int keep[4] = {0, 1, 0, 1};
    double want[4];
    tempered(p, keep, 4, 2.0, want);
    CHECK(probs_are(s, l, want, 4, 1e-6));
    g3n_sampler_free(s);
    /* min-p after top-p: top-p .8 keeps {1,3}, min_p .7 (threshold .35) keeps {1} */
    sp = plain();
    sp.top_p = 0.8f;
    sp.min_p = 0.7f;
    s = mk(&sp, 4);
    double w1[4] = {0, 1, 0, 0};
    CHECK(probs_are(s, l, w1, 4, 0));
    g3n_sampler_free(s);
    /* min_p 1 keeps every token tied at the best */
    float t[4] = {2, 1, 2, 2};
    sp = plain();
    sp.min_p = 1.0f;
    s = mk(&sp, 4);
    double w3[4] = {1.0 / 3, 0, 1.0 / 3, 1.0 / 3};
    CHECK(probs_are(s, t, w3, 4, 1e-6));
    /* ... also when the threshold rounds up next to a huge logit */
    float big[4] = {1e6f, 1e6f - 0.0625f, 3e38f, -5};
    double wb[4] = {0, 0, 1, 0};
    CHECK(probs_are(s, big, wb, 4, 0));
    CHECK(g3n_sampler_sample(s, big) == 2);
    big[2] = -1;
    double wb2[4] = {1, 0, 0, 0};
    CHECK(probs_are(s, big, wb2, 4, 0));
    g3n_sampler_free(s);
    sp.top_k = 2; /* list path */
    s = mk(&sp, 4);
    CHECK(probs_are(s, big, wb2, 4, 0));
    CHECK(g3n_sampler_sample(s, big) == 0);
    g3n_sampler_free(s);
}

/* ---- temperature --------------------------------------------------------------------- */

TEST(temperature) {
    double p[5] = {0.4, 0.3, 0.2, 0.08, 0.02};
    float l[5];
    logits_from_probs(p, 5, l);
    int keep[5] = {1, 1, 1, 1, 1};
    const double ts[] = {0.5, 1.0, 2.0, 0.1, 10.0};
    for (size_t i = 0; i < sizeof(ts) / sizeof(ts[0]); i++) {
        g3n_sampler_params sp = plain();
        sp.temperature = (float)ts[i];
        g3n_sampler *s = mk(&sp, 5);
        double want[5];
        tempered(p, keep, 5, ts[i], want);
        CHECK_MSG(probs_are(s, l, want, 5, 1e-6), "t %g", ts[i]);
        g3n_sampler_free(s);
    }
    /* a tiny temperature is greedy over the tied maxima, never NaN */
    float tie[3] = {1, 3, 3};
    g3n_sampler_params sp = plain();
    sp.temperature = 1e-30f;
    g3n_sampler *s = mk(&sp, 3);
    double w[3] = {0, 0.5, 0.5};
    CHECK(probs_are(s, tie, w, 3, 1e-6));
    g3n_sampler_free(s);
}

/* ---- penalties ----------------------------------------------------------------------- */

/* Reference penalties: the counts of each id among hist[n_hist - window ..). */
static void ref_penalize(const float *l, float *out, int V, const int *hist, int n_hist,
                         int window, float rp, float pres, float freq) {
    int counts[64] = {0};
    int from = window < 0 ? 0 : n_hist - window < 0 ? 0 : n_hist - window;
    for (int i = from; i < n_hist; i++) {
        if (hist[i] >= 0 && hist[i] < V) counts[hist[i]]++;
    }
    for (int i = 0; i < V; i++) {
        double x = l[i];
        if (counts[i] && x > -INFINITY) {
            x = x > 0 ? x / rp : x * rp;
            x -= (double)freq * counts[i] + pres;
        }
        out[i] = (float)x;
    }
}

TEST(penalties_window) {
    enum { V = 40 };
    float l[V], pen[V], got[V];
    test_seed(7);
    for (int i = 0; i < V; i++) l[i] = test_randf() * 3; /* both signs */
    l[11] = -INFINITY;                                    /* masked, and in history */
    l[5] = 0.0f;                                          /* zero: multiplied */
    /* ids in range and out of range (ignored: no slot in the window) */
    const int hist[] = {3, 7, 7, 10, 3, 3, 5, 11, 39, 0, -1, 40, 7, 21, 3};
    const int nh = (int)(sizeof(hist) / sizeof(hist[0]));
    int hist_in[32], nin = 0;
    for (int i = 0; i < nh; i++) {
        if (hist[i] >= 0 && hist[i] < V) hist_in[nin++] = hist[i];
    }
    const int windows[] = {-1, 0, 1, 4, 8, 13, 100};
    for (size_t wi = 0; wi < sizeof(windows) / sizeof(windows[0]); wi++) {
        for (int variant = 0; variant < 4; variant++) {
            g3n_sampler_params sp = plain();
            sp.repeat_last_n = windows[wi];
            sp.repeat_penalty = variant == 0 || variant == 3 ? 1.7f : 1.0f;
            sp.presence_penalty = variant == 1 || variant == 3 ? 0.6f : 0.0f;
            sp.frequency_penalty = variant == 2 || variant == 3 ? 0.35f : 0.0f;
            if (variant == 2) sp.presence_penalty = -0.25f; /* negative: a bonus */
            g3n_sampler *s = mk(&sp, V);
            for (int i = 0; i < nh; i++) g3n_sampler_accept(s, hist[i]);
            ref_penalize(l, pen, V, hist_in, nin, windows[wi], sp.repeat_penalty,
                         sp.presence_penalty, sp.frequency_penalty);
            /* softmax of the reference */
            double m = -INFINITY, z = 0;
            for (int i = 0; i < V; i++) m = pen[i] > m ? pen[i] : m;
            for (int i = 0; i < V; i++) z += exp(pen[i] - m);
            g3n_sampler_probs(s, l, got);
            int bad = 0;
            for (int i = 0; i < V; i++) {
                double want = exp(pen[i] - m) / z;
                if (fabs(got[i] - want) > 1e-6 * (want > 1e-3 ? want * 1e3 : 1)) {
                    if (bad++ < 3)
                        printf("  window %d variant %d id %d: %.8f want %.8f\n", windows[wi],
                               variant, i, got[i], want);
                }
            }
            CHECK(bad == 0);
            CHECK(got[11] == 0);
            g3n_sampler_free(s);
        }
    }
}

/* A penalized token changes; every other token keeps its exact logit ratio. */
TEST(penalties_touch_only_window) {
    enum { V = 50 };
    float l[V], base[V], got[V];
    test_seed(9);
    for (int i = 0; i < V; i++) l[i] = test_randf() * 2;
    g3n_sampler_params sp = plain();
    sp.repeat_last_n = 3;
    sp.repeat_penalty = 1.3f;
    sp.presence_penalty = 0.2f;
    sp.frequency_penalty = 0.1f;
    g3n_sampler *s = mk(&sp, V);
    g3n_sampler_probs(s, l, base); /* empty history: no change */
    double z = 0;
    for (int i = 0; i < V; i++) z += exp(l[i]);
    int bad = 0;
    for (int i = 0; i < V; i++) bad += fabs(base[i] - exp(l[i]) / z) > 1e-7;
    CHECK(bad == 0);
    const int hist[] = {4, 4, 9, 17, 4, 9};
    for (int i = 0; i < 6; i++) g3n_sampler_accept(s, hist[i]);
    g3n_sampler_probs(s, l, got); /* window {17, 4, 9} */
    /* ratio got/base is one constant for every token outside the window */
    double r0 = (double)got[0] / base[0];
    for (int i = 0; i < V; i++) {
        int in = i == 4 || i == 9 || i == 17;
        double r = (double)got[i] / base[i];
        if (in)
            CHECK_MSG(fabs(r - r0) > 1e-3 * r0, "id %d in the window is unchanged", i);
        else
            CHECK_MSG(fabs(r - r0) < 1e-5 * r0, "id %d outside the window changed", i);
    }
    g3n_sampler_free(s);
}

/* Window larger than the initial ring allocation (it grows in accept). */
TEST(penalties_long_window) {
    enum { V = 16, N = 5000, W = 3000 };
    static int hist[N];
    float l[V], pen[V], got[V];
    for (int i = 0; i < V; i++) l[i] = 0.1f * (float)i;
    test_seed(11);
    for (int i = 0; i < N; i++) hist[i] = (int)(test_rand_u64() % V);
    g3n_sampler_params sp = plain();
    sp.repeat_last_n = W;
    sp.frequency_penalty = 0.001f;
    g3n_sampler *s = mk(&sp, V);
    for (int i = 0; i < N; i++) g3n_sampler_accept(s, hist[i]);
    int counts[V] = {0};
    for (int i = N - W; i < N; i++) counts[hist[i]]++;
    for (int i = 0; i < V; i++) pen[i] = l[i] - 0.001f * (float)counts[i];
    double m = -INFINITY, z = 0;
    for (int i = 0; i < V; i++) m = pen[i] > m ? pen[i] : m;
    for (int i = 0; i < V; i++) z += exp(pen[i] - m);
    g3n_sampler_probs(s, l, got);
    int bad = 0;
    for (int i = 0; i < V; i++) bad += fabs(got[i] - exp(pen[i] - m) / z) > 1e-6;
    CHECK(bad == 0);
    /* reset clears the window */
    g3n_sampler_reset(s);
    z = 0;
    for (int i = 0; i < V; i++) z += exp(l[i]);
    g3n_sampler_probs(s, l, got);
    bad = 0;
    for (int i = 0; i < V; i++) bad += fabs(got[i] - exp(l[i]) / z) > 1e-6;
    CHECK(bad == 0);
    g3n_sampler_free(s);
}

/* ---- seeded frequencies -------------------------------------------------------------- */

static double draw_chi2(g3n_sampler *s, const float *l, const double *want, int n, long draws,
                        double *chi2_wrong, const double *wrong) {
    long cnt[64] = {0};
    for (long d = 0; d < draws; d++) {
        int32_t id = g3n_sampler_sample(s, l);
        if (id < 0 || id >= n) return INFINITY;
        cnt[id]++;
    }
    int df;
    double x = chi_square(cnt, want, n, draws, &df);
    G3N_ASSERT(df <= 9);
    if (chi2_wrong) *chi2_wrong = chi_square(cnt, wrong, n, draws, &df);
    return x;
}

TEST(chi_square_frequencies) {
    const long D = 100000;
    double p[8] = {0.3, 0.22, 0.18, 0.1, 0.08, 0.07, 0.04, 0.01};
    float l[8];
    logits_from_probs(p, 8, l);
    int all[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    double want[8], wrong[8];

    /* temperature 1, full-vocabulary path */
    g3n_sampler_params sp = plain();
    g3n_sampler *s = mk(&sp, 8);
    double bad;
    tempered(p, all, 8, 1.0, want);
    tempered(p, all, 8, 0.9, wrong); /* a sampler that got t slightly wrong */
    double x = draw_chi2(s, l, want, 8, D, &bad, wrong);
    printf("  t=1 full: chi2 %.2f (df 7, bound %.0f); vs t=.9 %.1f\n", x, CHI2_BOUND, bad);
    CHECK(x < CHI2_BOUND);
    CHECK(bad > 5 * CHI2_BOUND); /* the test has the power to see that */
    g3n_sampler_free(s);

    /* temperature 0.6 with top-k 6 (list path) */
    sp.temperature = 0.6f;
    sp.top_k = 6;
    s = mk(&sp, 8);
    int keep6[8] = {1, 1, 1, 1, 1, 1, 0, 0};
    tempered(p, keep6, 8, 0.6, want);
    x = draw_chi2(s, l, want, 8, D, NULL, NULL);
    printf("  t=.6 top_k 6: chi2 %.2f (df 5)\n", x);
    CHECK(x < CHI2_BOUND);
    g3n_sampler_free(s);

    /* temperature 1.5 with top-p .9 (keeps 6) and min-p .25 (drops p < .075: keeps 5):
     * top-p/min-p decide the set at t=1, then t reshapes */
    sp = plain();
    sp.temperature = 1.5f;
    sp.top_p = 0.9f;
    sp.min_p = 0.25f;
    s = mk(&sp, 8);
    int keep5[8] = {1, 1, 1, 1, 1, 0, 0, 0};
    tempered(p, keep5, 8, 1.5, want);
    tempered(p, keep5, 8, 1.0, wrong); /* temperature ignored */
    x = draw_chi2(s, l, want, 8, D, &bad, wrong);
    printf("  t=1.5 top_p .9 min_p .25: chi2 %.2f (df 4); vs t=1 %.1f\n", x, bad);
    CHECK(x < CHI2_BOUND);
    CHECK(bad > 5 * CHI2_BOUND);
    g3n_sampler_free(s);

    /* with penalties: the penalized distribution */
    sp = plain();
    sp.repeat_penalty = 1.5f;
    sp.repeat_last_n = 2;
    sp.frequency_penalty = 0.5f;
    s = mk(&sp, 8);
    g3n_sampler_accept(s, 0);
    g3n_sampler_accept(s, 0);
    float pl[8];
    for (int i = 0; i < 8; i++) pl[i] = l[i];
    pl[0] = (float)((double)l[0] * 1.5 - 1.0); /* log .3 < 0: multiplied; 2 x .5 */
    double q[8], z = 0;
    for (int i = 0; i < 8; i++) z += exp(pl[i]);
    for (int i = 0; i < 8; i++) q[i] = exp(pl[i]) / z;
    x = draw_chi2(s, l, q, 8, D, &bad, p);
    printf("  penalized: chi2 %.2f (df 7); vs unpenalized %.1f\n", x, bad);
    CHECK(x < CHI2_BOUND);
    CHECK(bad > 5 * CHI2_BOUND);
    g3n_sampler_free(s);
}

/* Frequencies over wide vocabularies, binned by id range (10 bins): the
 * full-vocabulary draw (block walk over 256-token blocks) and the top-p list
 * built by the histogram path. */
TEST(chi_square_wide) {
    enum { V = 4000, NBIN = 10 };
    static float l[V];
    static int idx[V];
    for (int variant = 0; variant < 2; variant++) {
        int nv = variant == 0 ? 1000 : V;
        long D = variant == 0 ? 100000 : 40000;
        float t = variant == 0 ? 0.8f : 1.2f;
        test_seed(500 + (uint64_t)variant);
        /* logits rise with the id (plus noise), so the bins differ in mass */
        for (int i = 0; i < nv; i++) l[i] = 4.0f * (float)i / (float)nv + test_randf();
        /* kept set: everything, or the top-p .9 prefix at temperature 1 */
        int nkeep = nv;
        for (int i = 0; i < nv; i++) idx[i] = i;
        if (variant == 1) {
            ref_logits = l;
            qsort(idx, (size_t)nv, sizeof(int), cmp_ref);
            double z = 0, cum = 0, lmax = l[idx[0]];
            for (int i = 0; i < nv; i++) z += exp(l[idx[i]] - lmax);
            for (int i = 0; i < nv; i++) {
                cum += exp(l[idx[i]] - lmax);
                if (cum >= (0.9 - 1e-6) * z) {
                    nkeep = i + 1;
                    break;
                }
            }
        }
        double want[NBIN] = {0}, wrong[NBIN] = {0}, zw = 0, zr = 0;
        for (int i = 0; i < nkeep; i++) {
            int id = idx[i];
            double a = exp(l[id] / t), b = exp(l[id]);
            want[id * NBIN / nv] += a;
            wrong[id * NBIN / nv] += b; /* temperature ignored */
            zw += a;
            zr += b;
        }
        for (int b = 0; b < NBIN; b++) {
            want[b] /= zw;
            wrong[b] /= zr;
        }
        g3n_sampler_params sp = plain();
        sp.temperature = t;
        if (variant == 1) sp.top_p = 0.9f;
        g3n_sampler *s = mk(&sp, nv);
        long cnt[NBIN] = {0};
        for (long d = 0; d < D; d++) {
            int32_t id = g3n_sampler_sample(s, l);
            CHECK(id >= 0 && id < nv);
            if (id >= 0 && id < nv) cnt[id * NBIN / nv]++;
        }
        int df = 0;
        double x = chi_square(cnt, want, NBIN, D, &df);
        double bad = chi_square(cnt, wrong, NBIN, D, &df);
        printf("  %s: kept %d of %d, chi2 %.2f (df %d); vs t=1 %.1f\n",
               variant ? "top_p .9 histogram path" : "full vocabulary", nkeep, nv, x, df, bad);
        CHECK(x < CHI2_BOUND);
        CHECK(bad > 3 * CHI2_BOUND);
        g3n_sampler_free(s);
    }
}

/* ---- seeds and reset ----------------------------------------------------------------- */

static void draw_seq(g3n_sampler *s, const float *l, int32_t *out, int n) {
    for (int i = 0; i < n; i++) out[i] = g3n_sampler_sample(s, l);
}

TEST(seeds_and_reset) {
    enum { V = 10, N = 200 };
    float l[V];
    for (int i = 0; i < V; i++) l[i] = 0.2f * (float)(i % 4);
    int32_t a[N], b[N], c[N];
    g3n_sampler_params sp = plain();
    sp.top_k = 8;
    sp.top_p = 0.97f;
    sp.seed = 42;
    g3n_sampler *s1 = mk(&sp, V), *s2 = mk(&sp, V);
    draw_seq(s1, l, a, N);
    draw_seq(s2, l, b, N);
    CHECK(memcmp(a, b, sizeof(a)) == 0); /* same seed, same sequence */
    g3n_sampler_reset(s1);
    draw_seq(s1, l, c, N);
    CHECK(memcmp(a, c, sizeof(a)) == 0); /* reset re-seeds */
    int distinct = 0;
    for (int i = 0; i < N; i++) distinct |= a[i] != a[0];
    CHECK(distinct);
    g3n_sampler_free(s2);

    /* different seeds (including 0 and neighbours) give different sequences */
    const uint64_t seeds[] = {0, 1, 2, 43, 0xFFFFFFFFFFFFFFFFull, 1ull << 63};
    for (size_t i = 0; i < sizeof(seeds) / sizeof(seeds[0]); i++) {
        sp.seed = seeds[i];
        s2 = mk(&sp, V);
        draw_seq(s2, l, b, N);
        CHECK_MSG(memcmp(a, b, sizeof(a)) != 0, "seed %llu matches seed 42",
                  (unsigned long long)seeds[i]);
        g3n_sampler_free(s2);
    }

    /* reset clears history, so penalties stop after reset */
    sp = plain();
    sp.temperature = 0;
    sp.presence_penalty = 2.0f;
    g3n_sampler_free(s1);
    s1 = mk(&sp, V);
    g3n_sampler_accept(s1, 3);
    float m[V] = {0, 0, 0, 1};
    CHECK(g3n_sampler_sample(s1, m) == 0);
    g3n_sampler_reset(s1);
    CHECK(g3n_sampler_sample(s1, m) == 3);
    g3n_sampler_free(s1);

    /* the stream of choices does not depend on the token history when penalties
     * are off, and greedy draws no random numbers */
    sp = plain();
    sp.seed = 5;
    s1 = mk(&sp, V);
    s2 = mk(&sp, V);
    draw_seq(s1, l, a, N);
    for (int i = 0; i < N; i++) {
        b[i] = g3n_sampler_sample(s2, l);
        g3n_sampler_accept(s2, b[i]);
    }
    CHECK(memcmp(a, b, sizeof(a)) == 0);
    g3n_sampler_free(s1);
    g3n_sampler_free(s2);
}

/* ---- NaN / inf / huge values when sampling ------------------------------------------- */

TEST(sampling_nan_inf) {
    enum { V = 8, D = 20000 };
    g3n_sampler_params sp = plain();
    sp.temperature = 1.3f;
    g3n_sampler *s = mk(&sp, V);
    float a[V] = {NAN, 0.1f, -INFINITY, 0.2f, NAN, -INFINITY, 0.0f, NAN};
    long cnt[V] = {0};
    for (int d = 0; d < D; d++) {
        int32_t id = g3n_sampler_sample(s, a);
        CHECK(id >= 0 && id < V);
        if (id >= 0 && id < V) cnt[id]++;
    }
    CHECK(cnt[0] == 0 && cnt[2] == 0 && cnt[4] == 0 && cnt[5] == 0 && cnt[7] == 0);
    CHECK(cnt[1] > 0 && cnt[3] > 0 && cnt[6] > 0);
    /* +inf logits share all the mass */
    float b[V] = {1, INFINITY, 2, INFINITY, NAN, FLT_MAX, -FLT_MAX, -INFINITY};
    double wb[V] = {0, 1.0 / 3, 0, 1.0 / 3, 0, 1.0 / 3, 0, 0};
    CHECK(probs_are(s, b, wb, V, 1e-6));
    for (int d = 0; d < 1000; d++) {
        int32_t id = g3n_sampler_sample(s, b);
        CHECK(id == 1 || id == 3 || id == 5);
    }
    /* huge spread */
    float c[V] = {3e38f, -3e38f, 1e38f, 3e38f, 0, -1, 1, 2};
    double wc[V] = {0.5, 0, 0, 0.5, 0, 0, 0, 0};
    CHECK(probs_are(s, c, wc, V, 1e-6));
    float d[V] = {NAN, NAN, NAN, NAN, NAN, NAN, NAN, NAN};
    CHECK(g3n_sampler_sample(s, d) == -1);
    g3n_sampler_free(s);

    /* the same with top-k, top-p and min-p on (list paths), and huge penalties */
    sp.top_k = 3;
    sp.top_p = 0.9f;
    sp.min_p = 0.01f;
    sp.presence_penalty = 3e38f;
    sp.frequency_penalty = -3e38f;
    sp.repeat_penalty = 1e30f;
    s = mk(&sp, V);
    CHECK(probs_are(s, b, wb, V, 1e-6));
    for (int i = 0; i < 5; i++) g3n_sampler_accept(s, 6);
    for (int i = 0; i < 5; i++) g3n_sampler_accept(s, 2);
    for (int dd = 0; dd < 1000; dd++) {
        int32_t id = g3n_sampler_sample(s, a);
        CHECK(id == 1 || id == 3 || id == 6);
    }
    float probs[V];
    g3n_sampler_probs(s, c, probs);
    for (int i = 0; i < V; i++) CHECK(probs[i] == probs[i]);
    CHECK(g3n_sampler_sample(s, d) == -1);
    g3n_sampler_free(s);

    /* one unmasked token is always chosen */
    sp = plain();
    s = mk(&sp, V);
    float one[V] = {NAN, -INFINITY, -INFINITY, -1e30f, NAN, -INFINITY, -INFINITY, NAN};
    for (int i = 0; i < 50; i++) CHECK(g3n_sampler_sample(s, one) == 3);
    g3n_sampler_free(s);
}

/* ---- full Gemma 3n vocabulary: sets against brute force, and timing ------------------ */

#define GEMMA_V 262400

/* "flat": logits uniform in [-10, 10) (top-p .95 needs ~39k tokens); "peaked"
 * adds 8 tokens at 22, 20.5, ... holding ~93% of the mass (top-p .95 needs ~2k
 * tokens); "sharp" is closer to a language model's usual next token: a bell-shaped
 * bulk (sum of three uniforms, sd 3.5) and 8 tokens at 28, 25.5, ... that hold
 * nearly all the mass (top-p .95 stops within the best 64). */
enum { FLAT, PEAKED, SHARP };
static const char *const shape_name[] = {"flat", "peaked", "sharp"};

static void fill_logits(float *l, int shape, uint64_t seed) {
    test_seed(seed);
    for (int i = 0; i < GEMMA_V; i++) {
        l[i] = shape == SHARP ? 3.5f * (test_randf() + test_randf() + test_randf())
                              : test_randf() * 10.0f;
    }
    if (shape != FLAT) {
        float top = shape == PEAKED ? 22.0f : 28.0f, step = shape == PEAKED ? 1.5f : 2.5f;
        for (int j = 0; j < 8; j++) l[(int)(test_rand_u64() % GEMMA_V)] = top - step * (float)j;
    }
}

TEST(gemma_vocab_vs_brute) {
    float *l = g3n_malloc(GEMMA_V * sizeof(float));
    float *probs = g3n_malloc(GEMMA_V * sizeof(float));
    int *idx = g3n_malloc(GEMMA_V * sizeof(int));
    for (int shape = FLAT; shape <= SHARP; shape++) {
        fill_logits(l, shape, 77 + (uint64_t)shape);
        for (int i = 0; i < GEMMA_V; i++) idx[i] = i;
        ref_logits = l;
        qsort(idx, GEMMA_V, sizeof(int), cmp_ref);
        /* greedy */
        g3n_sampler_params sp = plain();
        sp.temperature = 0;
        g3n_sampler *s = mk(&sp, GEMMA_V);
        CHECK(g3n_sampler_sample(s, l) == idx[0]);
        g3n_sampler_free(s);
        /* top-k 40 and 5000 (heap and quickselect paths) */
        const int ks[] = {40, 5000};
        for (int ki = 0; ki < 2; ki++) {
            sp = plain();
            sp.top_k = ks[ki];
            s = mk(&sp, GEMMA_V);
            int n = g3n_sampler_probs(s, l, probs);
            int bad = 0;
            for (int i = 0; i < GEMMA_V; i++) bad += (i < ks[ki]) != (probs[idx[i]] > 0);
            CHECK_MSG(n == ks[ki] && bad == 0, "top_k %d: %d kept, %d differ", ks[ki], n, bad);
            g3n_sampler_free(s);
        }
        /* top-p .95 without top-k */
        double z = 0, lmax = l[idx[0]], cum = 0;
        for (int i = 0; i < GEMMA_V; i++) z += exp(l[idx[i]] - lmax);
        int nkeep = GEMMA_V;
        for (int i = 0; i < GEMMA_V; i++) {
            cum += exp(l[idx[i]] - lmax);
            if (cum >= (0.95 - 1e-6) * z) {
                nkeep = i + 1;
                break;
            }
        }
        sp = plain();
        sp.top_p = 0.95f;
        s = mk(&sp, GEMMA_V);
        int n = g3n_sampler_probs(s, l, probs);
        int bad = 0;
        for (int i = 0; i < GEMMA_V; i++) bad += (i < nkeep) != (probs[idx[i]] > 0);
        CHECK_MSG(n == nkeep && bad == 0, "top_p: %d kept, want %d, %d differ", n, nkeep, bad);
        printf("  %s logits: top_p .95 keeps %d tokens\n", shape_name[shape], nkeep);
        g3n_sampler_free(s);
        /* min-p .05 (few survivors: listed) and 1e-6 (many: full-width draw) */
        const float mps[] = {0.05f, 1e-6f};
        for (int mi = 0; mi < 2; mi++) {
            double thr = lmax + log((double)mps[mi]) - 1e-6;
            int want = 0;
            while (want < GEMMA_V && (double)l[idx[want]] >= thr) want++;
            sp = plain();
            sp.min_p = mps[mi];
            s = mk(&sp, GEMMA_V);
            n = g3n_sampler_probs(s, l, probs);
            bad = 0;
            for (int i = 0; i < GEMMA_V; i++) bad += (i < want) != (probs[idx[i]] > 0);
            CHECK_MSG(n == want && bad == 0, "min_p %g: %d kept, want %d, %d differ",
                      (double)mps[mi], n, want, bad);
            g3n_sampler_free(s);
        }
    }
    free(l);
    free(probs);
    free(idx);
}

/* Prints a hash of sampled sequences over the wide vocabulary in every mode, to
 * compare builds (the SSE2 and the plain-C paths must agree bit for bit:
 * build once with -DG3N_SAMPLER_SCALAR and compare the lines). Asserts only that
 * every id is valid. */
/* The candidates path (g3n_sampler_top_need / sample_top, what g3n_session_sample
 * runs on a GPU) picks exactly what sample picks from the whole row, with the
 * same random draws: rows with ties, NaN, +-inf and only a few finite logits,
 * greedy and top-k with top-p, min-p and temperature. The candidates are the
 * row's best m in the sampler's order, made here by sorting. */
TEST(candidates_path) {
    enum { V = 4096 };
    float *l = g3n_malloc(V * sizeof(float)), vals[256];
    int *idx = g3n_malloc(V * sizeof(int));
    int32_t ids[256];
    struct { float t; int k; float top_p, min_p; } ps[] = {
        {0.0f, 0, 1.0f, 0.0f},  {1.0f, 64, 0.95f, 0.0f}, {1.0f, 1, 1.0f, 0.0f},   {0.7f, 10, 1.0f, 0.1f},
        {1.3f, 200, 0.9f, 0.05f}, {1.0f, 255, 1.0f, 0.0f}, {0.0f, 64, 0.95f, 0.0f}};
    int fallbacks = 0;
    for (size_t pi = 0; pi < sizeof ps / sizeof ps[0]; pi++) {
        g3n_sampler_params p = plain();
        p.temperature = ps[pi].t, p.top_k = ps[pi].k, p.top_p = ps[pi].top_p, p.min_p = ps[pi].min_p;
        g3n_sampler *a = mk(&p, V), *b = mk(&p, V);
        const int m = g3n_sampler_top_need(b);
        CHECK(m == (p.temperature <= 0 ? 1 : p.top_k + 1));
        for (int row = 0; row < 60; row++) {
            test_seed(1000 * pi + row);
            const int kind = row % 6;
            for (int i = 0; i < V; i++) {
                float x = test_randf() * 6.0f;
                if (kind == 1) x = floorf(x * 2.0f) * 0.5f; /* many ties */
                if (kind == 2 && i % 97 == 5) x = NAN;
                if (kind == 2 && i % 211 == 7) x = INFINITY;
                if (kind == 3 || kind == 4) x = -INFINITY;
                l[i] = x;
            }
            if (kind == 3) /* a few finite: fewer than m for most m */
                for (int j = 0; j < 12; j++) l[(j * 331 + row) % V] = test_randf();
            if (kind == 5) l[row * 13] = 40.0f; /* one dominant */
            test_logit_order(l, V, idx);
            for (int i = 0; i < m; i++) ids[i] = idx[i], vals[i] = test_clean_logit(l[idx[i]]);
            const int32_t want = g3n_sampler_sample(a, l);
            int32_t got = g3n_sampler_sample_top(b, vals, ids, m);
            if (got == -2) got = g3n_sampler_sample(b, l), fallbacks++;
            CHECK_MSG(got == want, "params %zu row %d: candidates %d, row %d", pi, row, (int)got, (int)want);
        }
        g3n_sampler_free(a), g3n_sampler_free(b);
    }
    CHECK(fallbacks > 0); /* the few-finite rows took the row */
    g3n_sampler_params p = plain();
    p.top_k = 64, p.repeat_penalty = 1.1f;
    g3n_sampler *s = mk(&p, V);
    CHECK(g3n_sampler_top_need(s) == 0); /* penalties: the whole row */
    g3n_sampler_free(s);
    p = plain();
    s = mk(&p, V);
    CHECK(g3n_sampler_top_need(s) == 0); /* no top-k: the whole row */
    g3n_sampler_free(s);
    free(l), free(idx);
}

TEST(fingerprint) {
    float *l = g3n_malloc(GEMMA_V * sizeof(float));
    uint64_t h = 1469598103934665603ull;
    for (int shape = FLAT; shape <= PEAKED; shape++) {
        fill_logits(l, shape, 31 + (uint64_t)shape);
        l[1000] = NAN;
        l[2000] = -INFINITY;
        for (int mode = 0; mode < 7; mode++) {
            g3n_sampler_params sp = plain();
            sp.seed = 99 + (uint64_t)mode;
            sp.temperature = mode == 6 ? 0.0f : 0.7f + 0.1f * (float)mode;
            sp.top_k = mode == 1 ? 40 : mode == 4 ? 3000 : 0;
            sp.top_p = mode == 2 || mode == 4 ? 0.9f : 1.0f;
            sp.min_p = mode == 3 || mode == 4 ? 0.02f : 0.0f;
            sp.repeat_penalty = mode == 5 ? 1.3f : 1.0f;
            sp.frequency_penalty = mode == 5 ? 0.5f : 0.0f;
            g3n_sampler *s = mk(&sp, GEMMA_V);
            for (int i = 0; i < 60; i++) {
                int32_t id = g3n_sampler_sample(s, l);
                CHECK(id >= 0 && id < GEMMA_V && id != 1000 && id != 2000);
                g3n_sampler_accept(s, id);
                h = (h ^ (uint64_t)(uint32_t)id) * 1099511628211ull;
            }
            g3n_sampler_free(s);
        }
    }
    printf("  fingerprint %016llx (%s)\n", (unsigned long long)h,
#if defined(G3N_SAMPLER_SCALAR)
           "plain C"
#else
           "default build"
#endif
    );
    free(l);
}

/* Prints the time per 262400-wide sample for several settings; asserts nothing. */
TEST(speed_report) {
    float *l = g3n_malloc(GEMMA_V * sizeof(float));
    struct {
        const char *name;
        float t;
        int k;
        float top_p, min_p, rp;
    } cfg[] = {
        {"greedy", 0, 0, 1, 0, 1},
        {"top_k=40", 1, 40, 1, 0, 1},
        {"top_p=0.95 (no top_k)", 1, 0, 0.95f, 0, 1},
        {"defaults (top_k 64, top_p .95)", 1, 64, 0.95f, 0, 1},
        {"min_p=0.05 (no top_k)", 1, 0, 1, 0.05f, 1},
        {"no filter, t=1", 1, 0, 1, 0, 1},
        {"top_k=40 + repeat_penalty (64)", 1, 40, 1, 0, 1.1f},
    };
    for (int shape = FLAT; shape <= SHARP; shape++) {
        fill_logits(l, shape, 5 + (uint64_t)shape);
        for (size_t c = 0; c < sizeof(cfg) / sizeof(cfg[0]); c++) {
            g3n_sampler_params sp = plain();
            sp.temperature = cfg[c].t;
            sp.top_k = cfg[c].k;
            sp.top_p = cfg[c].top_p;
            sp.min_p = cfg[c].min_p;
            sp.repeat_penalty = cfg[c].rp;
            g3n_sampler *s = mk(&sp, GEMMA_V);
            for (int i = 0; i < 64; i++) g3n_sampler_accept(s, i * 37);
            int reps = 0;
            long sink = 0;
            double t0 = g3n_time_s(), t1;
            do {
                sink += g3n_sampler_sample(s, l);
                reps++;
                t1 = g3n_time_s();
            } while (t1 - t0 < 0.05 && reps < 1000);
            printf("  speed %-6s %-32s %8.1f us/sample (%d reps)%s\n", shape_name[shape],
                   cfg[c].name, (t1 - t0) / reps * 1e6, reps,
                   sink < 0 ? "!" : "");
            g3n_sampler_free(s);
        }
    }
    free(l);
}

int main(int argc, char **argv) {
    test_init(argc, argv);
    RUN(validation);
    RUN(greedy_ties);
    RUN(greedy_nan_inf);
    RUN(greedy_after_penalty);
    RUN(top_k_ties);
    RUN(top_p_sets);
    RUN(top_p_untempered);
    RUN(top_p_with_top_k);
    RUN(top_p_wide_vs_brute);
    RUN(min_p_threshold);
    RUN(temperature);
    RUN(penalties_window);
    RUN(penalties_touch_only_window);
    RUN(penalties_long_window);
    RUN(chi_square_frequencies);
    RUN(chi_square_wide);
    RUN(seeds_and_reset);
    RUN(sampling_nan_inf);
    RUN(gemma_vocab_vs_brute);
    RUN(candidates_path);
    RUN(fingerprint);
    RUN(speed_report);
    return test_summary();
}
