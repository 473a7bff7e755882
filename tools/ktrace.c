/* ktrace.c: a CUPTI injection library that writes every kernel's start and end
 * on the GPU (graph replays included) to a text file, for the timeline of a
 * decode step that ncu (kernels one at a time) cannot show. Not part of g3n.
 *
 *   cc -O2 -shared -fPIC -I/usr/local/cuda/include tools/ktrace.c \
 *      -L/usr/local/cuda/lib64 -lcupti -o libktrace.so
 *   CUDA_INJECTION64_PATH=$PWD/libktrace.so G3N_KTRACE=trace.txt ./g3n bench ...
 *   python3 tools/ktrace_report.py trace.txt
 *
 * Lines: start_ns end_ns grid_x grid_y grid_z block_x graph_node_id name (mangled);
 * copies and memsets as "memcpy_<kind>_<bytes>" / "memset_<bytes>" with grid 0. */
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>

static FILE *out;

static void CUPTIAPI buf_request(uint8_t **buf, size_t *size, size_t *max_records) {
    *size = 16u << 20;
    *buf = aligned_alloc(8, *size);
    *max_records = 0;
}

static void CUPTIAPI buf_complete(CUcontext ctx, uint32_t stream, uint8_t *buf, size_t size, size_t valid) {
    (void)ctx, (void)stream, (void)size;
    CUpti_Activity *r = NULL;
    while (cuptiActivityGetNextRecord(buf, valid, &r) == CUPTI_SUCCESS) {
        if (r->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
            const CUpti_ActivityMemcpy6 *m = (const CUpti_ActivityMemcpy6 *)r;
            fprintf(out, "%llu %llu 0 0 0 0 %llu memcpy_%d_%llu\n", (unsigned long long)m->start,
                    (unsigned long long)m->end, (unsigned long long)m->graphNodeId, (int)m->copyKind,
                    (unsigned long long)m->bytes);
            continue;
        }
        if (r->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
            const CUpti_ActivityMemset4 *m = (const CUpti_ActivityMemset4 *)r;
            fprintf(out, "%llu %llu 0 0 0 0 %llu memset_%llu\n", (unsigned long long)m->start,
                    (unsigned long long)m->end, (unsigned long long)m->graphNodeId, (unsigned long long)m->bytes);
            continue;
        }
        if (r->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL && r->kind != CUPTI_ACTIVITY_KIND_KERNEL) continue;
        const CUpti_ActivityKernel10 *k = (const CUpti_ActivityKernel10 *)r;
        fprintf(out, "%llu %llu %d %d %d %d %llu %s\n", (unsigned long long)k->start, (unsigned long long)k->end,
                k->gridX, k->gridY, k->gridZ, k->blockX, (unsigned long long)k->graphNodeId, k->name);
    }
    free(buf);
}

static void finish(void) {
    cuptiActivityFlushAll(1);
    if (out) fclose(out);
}

int InitializeInjection(void) {
    const char *path = getenv("G3N_KTRACE");
    out = fopen(path ? path : "ktrace.txt", "w");
    if (!out) return 0;
    if (cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) != CUPTI_SUCCESS ||
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY) != CUPTI_SUCCESS ||
        cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET) != CUPTI_SUCCESS ||
        cuptiActivityRegisterCallbacks(buf_request, buf_complete) != CUPTI_SUCCESS) {
        fprintf(stderr, "ktrace: CUPTI activity tracing unavailable\n");
        return 0;
    }
    atexit(finish);
    return 1;
}
