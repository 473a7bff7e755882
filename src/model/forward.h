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
/* The logits of the last step in backend memory (row 0: the first row asked
 * for); fwd_run leaves them there when logits_host is NULL (at most lm_rows rows). */
const float *fwd_logits(const fwd_scratch *f);
/* The best m of the first n logits of each row that the samplers will ask for
 * after each later step (0: none): a step of up to m->prune_rows rows may then
 * read the LM head through the backend's copy (fwd_logits_need), and after a
 * step of one row the backend's logits_top_queue runs with the step, recorded
 * with it. */
void fwd_set_top(fwd_scratch *f, int m, int n);
/* Make the last step's logits rows what a reader of their best m of the first
 * n logits needs (m 0: the whole rows): a step run for its samplers' best m'
 * alone (fwd_set_top, where the backend reads the LM head through a cheaper
 * copy: m->prune_rows) left only the candidates for them, so a reader of more
 * than m' or of other n gets the rows recomputed here first. */
void fwd_logits_need(g3n_model *M, fwd_scratch *f, int m, int n);

/* Decode paths (m->fused): one op per step of the maths, the fused ops, or the
 * fused ops with every layer of a one-token step in one backend call. */
enum { FWD_SPLIT = 0, FWD_FUSED = 1, FWD_MEGA = 2 };
const char *fwd_path_name(int path);
int fwd_path_parse(const char *name); /* -1 if unknown */
/* The fused path without the backend's L2 prefetch hints (g3n_model.no_l2_hints) */
#define FWD_FUSED_NO_L2_HINTS "fused-nol2"
/* fwd_path_parse, and that name (*hints_off set) */
int fwd_path_parse_hints(const char *name, int *hints_off);

/* Fill m->dec from the weights and ask the backend whether it takes it whole
 * (m->mega_ok). Called once at load, after the weights; freed with the model. */
void fwd_dec_model_init(g3n_model *m);

/* Set m->fused from "fused", "split", "mega" or NULL/"auto" (measure on this
 * device, cached per device and model shape). Called once at load. */
void decode_path_choose(g3n_model *m, const char *want);
/* On a backend that records steps (a GPU): a short prompt and two decode steps
 * at load, so that the first use of each kernel, library path and scratch is
 * paid there rather than by the first request (G3N_WARMUP=0: not). */
void model_warm_up(g3n_model *m);

/* Debugging aid (tests, tools): called after every layer with the planes
 * [A][n][D] in backend memory. NULL in normal use. */
typedef void (*fwd_hook_fn)(g3n_model *m, int layer, const float *S, int n);
extern fwd_hook_fn fwd_debug_hook;

#endif
