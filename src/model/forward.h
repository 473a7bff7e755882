/* forward.h: the forward pass over a batch of token rows, and the activation
 * scratch it runs in. Used by session.c (one sequence) and, later, by the
 * batched server step (many sequences, one row each). Internal to the library. */
#ifndef G3N_FORWARD_H
#define G3N_FORWARD_H

#include "model/gemma3n.h"

typedef struct fwd_scratch fwd_scratch;

/* Activation scratch for up to `rows` token rows, in backend memory, with room
 * for the logits of lm_rows rows at once (a step that wants at most lm_rows
 * rows of logits can be recorded and replayed); freed by fwd_scratch_free. */
fwd_scratch *fwd_scratch_create(g3n_model *m, int rows, int lm_rows);
void fwd_scratch_free(g3n_model *m, fwd_scratch *f);

/* Run batch b (b->n <= rows) through the model, writing K/V into the caches the
 * batch names, and copy the soft-capped logits of rows [out_row0, n) into
 * logits_host ((n - out_row0) x n_vocab floats). Ids must already be validated. */
void fwd_run(g3n_model *m, fwd_scratch *f, const g3n_batch *b, int out_row0, float *logits_host);

/* Set m->fused from "fused", "split" or NULL/"auto" (measure on this device,
 * cached per device and model shape). Called once at load. */
void decode_path_choose(g3n_model *m, const char *want);

/* Debugging aid (tests, tools): called after every layer with the planes
 * [A][n][D] in backend memory. NULL in normal use. */
typedef void (*fwd_hook_fn)(g3n_model *m, int layer, const float *S, int n);
extern fwd_hook_fn fwd_debug_hook;

#endif
