/* test.h: the whole test harness. Named tests, CHECK macros, a tensor
 * comparison that reports max-abs, relative L2 and the first mismatches, and a
 * summary line "N passed, N failed" with a non-zero exit on failure.
 *
 * Use: TEST(name) { CHECK(x); ... }  and in main: RUN(name); return test_summary();
 * `./test_x name` runs only the tests whose name contains `name`. */
#ifndef G3N_TEST_H
#define G3N_TEST_H

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define G3N_TEST_MIN(a, b) ((a) < (b) ? (a) : (b))

static int test_passed, test_failed, test_cur_failed;
static const char *test_filter;

#define TEST(name) static void test_##name(void)

#define RUN(name)                                                                      \
    do {                                                                               \
        if (test_filter && !strstr(#name, test_filter)) break;                         \
        test_cur_failed = 0;                                                           \
        test_##name();                                                                 \
        if (test_cur_failed) {                                                         \
            test_failed++;                                                             \
            printf("FAIL %s\n", #name);                                                \
        } else {                                                                       \
            test_passed++;                                                             \
            printf("ok   %s\n", #name);                                                \
        }                                                                              \
        fflush(stdout);                                                                \
    } while (0)

#define CHECK(x)                                                                       \
    do {                                                                               \
        if (!(x)) {                                                                    \
            printf("  %s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #x);             \
            test_cur_failed = 1;                                                       \
        }                                                                              \
    } while (0)

#define CHECK_MSG(x, ...)                                                              \
    do {                                                                               \
        if (!(x)) {                                                                    \
            printf("  %s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #x);             \
            printf(__VA_ARGS__);                                                       \
            printf("\n");                                                              \
            test_cur_failed = 1;                                                       \
        }                                                                              \
    } while (0)

static inline void test_init(int argc, char **argv) {
    test_filter = argc > 1 ? argv[1] : NULL;
    setvbuf(stdout, NULL, _IOLBF, 0); /* a test that aborts still shows the ones before it */
}

static inline int test_summary(void) {
    printf("%d passed, %d failed\n", test_passed, test_failed);
    return test_failed ? 1 : 0;
}

/* Relative L2 error ||a-b|| / ||b|| in double. */
static inline double test_rel_l2(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        num += d * d;
        den += (double)b[i] * (double)b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* Compare got against ref: fails (and prints the first few mismatches) when any
 * value is NaN/Inf, when the relative L2 error exceeds rel_tol, or when an element
 * differs by more than abs_tol + rel_tol * |ref| * 10 (a loose elementwise guard).
 * Returns the relative L2 error. */
static inline double test_close(const char *what, const float *got, const float *ref, size_t n,
                                double rel_tol, double abs_tol) {
    double rel = test_rel_l2(got, ref, n);
    double maxd = 0;
    size_t shown = 0, bad = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)ref[i]);
        int nonfinite = !isfinite(got[i]) || !isfinite(ref[i]);
        if (d > maxd || nonfinite) maxd = nonfinite ? INFINITY : d;
        if (nonfinite || d > abs_tol + rel_tol * 10 * fabs((double)ref[i])) {
            bad++;
            if (shown < 5) {
                printf("  %s[%zu]: got %.9g want %.9g\n", what, i, got[i], ref[i]);
                shown++;
            }
        }
    }
    if (!(rel <= rel_tol) || bad) {
        printf("  %s: rel L2 %.3g (tol %.3g), max |d| %.3g, %zu of %zu outside\n", what, rel,
               rel_tol, maxd, bad, n);
        test_cur_failed = 1;
    }
    return rel;
}

/* Deterministic pseudo-random numbers for tests (xorshift64*). */
static unsigned long long test_rng_state = 0x9E3779B97F4A7C15ull;
static inline void test_seed(unsigned long long s) { test_rng_state = s ? s : 1; }
static inline unsigned long long test_rand_u64(void) {
    test_rng_state ^= test_rng_state >> 12;
    test_rng_state ^= test_rng_state << 25;
    test_rng_state ^= test_rng_state >> 27;
    return test_rng_state * 0x2545F4914F6CDD1Dull;
}
/* uniform in [-1, 1) */
static inline float test_randf(void) {
    return (float)((double)(test_rand_u64() >> 11) * (1.0 / 9007199254740992.0) * 2.0 - 1.0);
}

/* The sampler's order of a row of logits (logit descending, then id ascending;
 * NaN as -inf, +inf as FLT_MAX): idx[0..n) sorted that way, by qsort. */
static inline float test_clean_logit(float x) { return x != x ? -INFINITY : (x > FLT_MAX ? FLT_MAX : x); }
static const float *test_order_row;
static int test_order_cmp(const void *a, const void *b) {
    const int i = *(const int *)a, j = *(const int *)b;
    const float x = test_clean_logit(test_order_row[i]), y = test_clean_logit(test_order_row[j]);
    if (x != y) return x > y ? -1 : 1;
    return i < j ? -1 : 1;
}
static inline void test_logit_order(const float *row, int n, int *idx) {
    for (int i = 0; i < n; i++) idx[i] = i;
    test_order_row = row;
    qsort(idx, (size_t)n, sizeof(int), test_order_cmp);
}

#endif
