/* common.c: the small helpers declared in common.h (dtype table, f16, errors,
 * allocation, file reading, time, logging). No model knowledge. */
#define _POSIX_C_SOURCE 200809L
#include "common.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <sys/stat.h>
#include <time.h>

int g3n_log_level = 1;

size_t g3n_dtype_size(g3n_dtype t) {
    switch (t) {
    case G3N_F32: return 4;
    case G3N_F16: return 2;
    case G3N_BF16: return 2;
    case G3N_U32: return 4;
    default: return 0;
    }
}

const char *g3n_dtype_name(g3n_dtype t) {
    switch (t) {
    case G3N_F32: return "F32";
    case G3N_F16: return "F16";
    case G3N_BF16: return "BF16";
    case G3N_U32: return "U32";
    default: return "?";
    }
}

float g3n_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    uint32_t u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: value = man * 2^-24 */
            float f = (float)man * 5.9604644775390625e-8f;
            memcpy(&u, &f, 4);
            u |= sign;
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t g3n_f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00; /* NaN */
    if (a >= 0x477ff000u) return sign | 0x7c00; /* overflow to inf (RNE) */
    if (a < 0x38800000u) { /* subnormal or zero: round a * 2^24 to an integer */
        float af;
        memcpy(&af, &a, 4);
        float m = af * 16777216.0f; /* exact scaling, < 1024 */
        return sign | (uint16_t)lrintf(m);
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - (112u << 23);
    return sign | (uint16_t)(r >> 13);
}

int g3n_err(char *err, size_t errlen, const char *fmt, ...) {
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

static void oom(size_t n) {
    fprintf(stderr, "g3n: out of memory allocating %zu bytes\n", n);
    abort();
}

void *g3n_malloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) oom(n);
    return p;
}

void *g3n_calloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) oom(n * size);
    return p;
}

char *g3n_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = g3n_malloc(n);
    memcpy(p, s, n);
    return p;
}

char *g3n_read_file(const char *path, size_t *len, size_t max_len, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        g3n_err(err, errlen, "%s: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(f);
        g3n_err(err, errlen, "%s: not a regular file", path);
        return NULL;
    }
    if ((uint64_t)st.st_size > max_len) {
        fclose(f);
        g3n_err(err, errlen, "%s: file too large (%lld bytes, limit %zu)", path,
                (long long)st.st_size, max_len);
        return NULL;
    }
    size_t n = (size_t)st.st_size;
    char *buf = g3n_malloc(n + 1);
    if (n && fread(buf, 1, n, f) != n) {
        fclose(f);
        free(buf);
        g3n_err(err, errlen, "%s: read failed", path);
        return NULL;
    }
    fclose(f);
    buf[n] = 0;
    if (len) *len = n;
    return buf;
}

char *g3n_path_join(const char *dir, const char *name) {
    size_t a = strlen(dir), b = strlen(name);
    char *p = g3n_malloc(a + b + 2);
    memcpy(p, dir, a);
    size_t k = a;
    if (a && dir[a - 1] != '/') p[k++] = '/';
    memcpy(p + k, name, b + 1);
    return p;
}

double g3n_time_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void g3n_log(const char *fmt, ...) {
    if (g3n_log_level <= 0) return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
}
