/* cpu_internal.h: state and helpers shared by the two CPU backends (cpu_ref.c,
 * the oracle, and cpu.c, the threaded SIMD one). Not part of the contract. */
#ifndef G3N_CPU_INTERNAL_H
#define G3N_CPU_INTERNAL_H

#include "backend/backend.h"
#include "common.h"

#define G3N_CPU_MAX_ALTUP 8

typedef struct {
    g3n_batch batch; /* current step (arrays owned by the caller for the step) */
    float *scratch;  /* single-threaded scratch for the reference ops */
    size_t scratch_n;
    /* fast backend */
    float **tscratch; /* per-thread scratch */
    size_t *tscratch_n;
    int n_threads;
    void **owned;     /* W^T copies made at load (exact sparsity), freed with the backend */
    int n_owned;
    int *sp_idx;      /* exact sparsity: the surviving units of a row, and their activations */
    float *sp_act;
    size_t sp_n;
    float *xperm;     /* 4-bit products: x in the kernels' order (cpu.c q4_perm) */
    size_t xperm_n;
    float *att_part;  /* attention of a few tokens: every key chunk's partial (cpu.c) */
    size_t att_part_n;
} cpu_ctx;

/* A scratch buffer of at least count floats (reference ops, one thread). */
float *cpu_scratch(g3n_backend *be, size_t count);
float cpu_gelu_tanh(float z);
/* Kernel set of the fast backend: "avx512", "avx2" or "scalar". cpu_set_isa
 * (for tests) picks one this machine supports, else returns -1. */
const char *cpu_isa_name(void);
int cpu_set_isa(const char *name);

#endif
