/* common.h: dtypes, bf16/f16 conversion, assertions, error strings, timing.
 *
 * Included by every module. It holds no model knowledge and allocates nothing.
 * Library code reports errors by filling a caller-owned buffer (err, errlen) and
 * returning -1 or NULL; only G3N_ASSERT (a bug, never bad input) aborts. */
#ifndef G3N_COMMON_H
#define G3N_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- dtypes --------------------------------------------------------------- */

typedef enum {
    G3N_F32 = 0,
    G3N_F16,
    G3N_BF16,
    G3N_U32, /* packed quantized weights (mlx affine); never an activation */
    G3N_DTYPE_COUNT
} g3n_dtype;

/* Size in bytes of one element of `t`. */
size_t g3n_dtype_size(g3n_dtype t);
/* Name as safetensors spells it ("BF16", ...). */
const char *g3n_dtype_name(g3n_dtype t);

static inline float g3n_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round-to-nearest-even, NaN kept quiet (as torch does). */
static inline uint16_t g3n_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float g3n_f16_to_f32(uint16_t h);
uint16_t g3n_f32_to_f16(float f);

/* ---- assertions and errors ------------------------------------------------- */

/* A broken invariant inside g3n: print the expression and where, then abort.
 * Never used for bad input; bad input gets an error message and a status. */
#define G3N_ASSERT(x)                                                                  \
    do {                                                                               \
        if (!(x)) {                                                                    \
            fprintf(stderr, "g3n: assertion failed: %s (%s:%d)\n", #x, __FILE__,       \
                    __LINE__);                                                         \
            abort();                                                                   \
        }                                                                              \
    } while (0)

#if defined(__GNUC__)
#define G3N_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define G3N_PRINTF(a, b)
#endif

/* Fill err (if not NULL) with a formatted message. Always returns -1 so that
 * `return g3n_err(err, errlen, "...")` reads naturally. */
int g3n_err(char *err, size_t errlen, const char *fmt, ...) G3N_PRINTF(3, 4);

/* malloc/calloc that abort on exhaustion of the heap (sizes here come from
 * validated shapes, so failure means the machine is out of memory). */
void *g3n_malloc(size_t n);
void *g3n_calloc(size_t n, size_t size);
char *g3n_strdup(const char *s);

/* a*b with overflow detection: returns 0 on overflow (and sets *ok = 0). */
static inline size_t g3n_mul_ok(size_t a, size_t b, int *ok) {
    if (a != 0 && b > SIZE_MAX / a) {
        *ok = 0;
        return 0;
    }
    return a * b;
}

/* Read a whole file into a NUL-terminated heap buffer; caller frees.
 * Returns NULL and fills err on failure. */
char *g3n_read_file(const char *path, size_t *len, size_t max_len, char *err, size_t errlen);

/* path join "dir/name" into a heap string; caller frees. */
char *g3n_path_join(const char *dir, const char *name);

/* ---- timing and logging ---------------------------------------------------- */

double g3n_time_s(void); /* monotonic seconds */

/* Verbosity for library progress messages on stderr: 0 quiet, 1 normal. */
extern int g3n_log_level;
void g3n_log(const char *fmt, ...) G3N_PRINTF(1, 2);

#define G3N_MIN(a, b) ((a) < (b) ? (a) : (b))
#define G3N_MAX(a, b) ((a) > (b) ? (a) : (b))

#endif
