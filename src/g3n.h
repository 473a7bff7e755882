/* g3n.h: the public C API of g3n, a Gemma 3n text-decoder inference engine.
 *
 * Two objects carry all state:
 *   g3n_model    weights and configuration; read-only after g3n_model_open, so one
 *                model may serve many sessions (and threads, one session each).
 *   g3n_session  one sequence: its KV cache, position, scratch and last logits.
 * Plus the text side: g3n_tokenizer (tokenizer.json), the chat template, and a
 * sampler. The CLI, the benchmark and the server use this header only.
 *
 * Errors: functions that can fail take (char *err, size_t errlen), fill err with
 * one line naming the file, tensor or field, and return NULL or -1. Nothing here
 * exits the process. */
#ifndef G3N_H
#define G3N_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- model ------------------------------------------------------------------- */

typedef struct g3n_model g3n_model;

typedef struct {
    const char *device; /* "cuda", "cpu" or "cpu-ref" (plain reference ops, slow);
                           NULL: cuda when built in and a GPU is present, else cpu */
    int n_threads;      /* CPU threads; 0 = all cores */
    int ple_on_gpu;     /* cuda: keep the per-layer-embedding table on the GPU too
                           (default: in host memory, one row per token is copied) */
    int no_graph;       /* cuda: issue every op each step instead of replaying a
                           recorded step (for debugging and comparison) */
    int sparse;         /* exact activation sparsity in the layers with a top-k
                           target (decode steps read only the surviving up rows and
                           down columns; down matrices stored transposed). 1 on,
                           -1 off, 0 (default): on CUDA, on for checkpoints without
                           quantization (their down matrices are transposed in
                           place) and 4- and 8-bit ones (a transposed copy of the
                           top-k layers' down codes, scales and biases: ~0.2 GB
                           for E4B q4), faster on all (docs/SPEED.md), off for
                           other widths; off on the CPU, where it keeps a W^T copy
                           of each top-k layer's down matrix in RAM (E2B 0.34 GB,
                           E4B 0.67 GB; unquantized checkpoints only) for ~11%
                           faster decode, and decode then equals prefill to float
                           rounding instead of bitwise. */
    const char *decode_path; /* "fused", "split", "mega" or "auto" (NULL = auto):
                           the per-op path, the fused one, or (cuda, one-token
                           steps) every layer in one kernel; auto times a few
                           decode steps of each on this device at load and keeps
                           the fastest (cached in ~/.cache/g3n). "fused-nol2":
                           the fused path without the backend's L2 prefetch
                           hints (same results; auto keeps them) */
    const char *kv_type;  /* element type of the K/V cache: "f32" (NULL: the
                           default; exact) or "f16": half the cache's memory and
                           of what attention reads (at 32k tokens ~1 GB a token
                           of E4B in f32). f16 rounds each key and value to
                           nearest even when stored (up to 2^-12 relative), in a
                           prompt and in decode alike; on the random test
                           fixtures the logits then move ~5e-3 (relative L2)
                           from transformers' float32 ones, against ~1e-5. */
} g3n_model_params;

/* Defaults for g3n_model_params. */
g3n_model_params g3n_model_default_params(void);

/* Open a checkpoint directory (config.json plus model.safetensors or a sharded
 * index). The safetensors files are memory-mapped and validated; weights are used
 * in their stored dtype. Returns NULL and fills err on any problem. */
g3n_model *g3n_model_open(const char *dir, const g3n_model_params *params, char *err,
                          size_t errlen);
void g3n_model_close(g3n_model *m);

/* Write an mlx affine-quantized copy of checkpoint `src` to directory `dst`
 * (mlx-community layout: packed U32 weights + scales + biases, config.json with a
 * "quantization" block, tokenizer files copied). bits 2-6 or 8, group_size 32,
 * 64 or 128; the arithmetic is mlx's (src/core/quant.h). 0, or -1 and err. */
int g3n_quantize(const char *src, const char *dst, int bits, int group_size, char *err,
                 size_t errlen);

typedef struct {
    int n_vocab;           /* rows of the LM head (logit width) */
    int n_vocab_text;      /* vocab_size_per_layer_input: ids >= this are not text */
    int n_layer, n_embd, n_head, n_head_kv, head_dim;
    int n_ctx_max;         /* max_position_embeddings */
    int sliding_window;
    int first_shared_layer; /* layers >= this reuse another layer's K/V */
    int bos_id, eos_id, pad_id; /* from config.json (-1 when absent) */
    size_t weight_bytes;   /* bytes of the text weights as stored */
    size_t decode_bytes;   /* weight bytes one decoded token reads (dense) */
    size_t decode_bytes_sparse; /* the same with exact sparsity (expected: the top-k
                             layers' up/down bytes times 1 - target); 0 when off */
    size_t decode_bytes_greedy; /* the same for a step whose sampler picks from the best few
                             logits (greedy, top-k), where the backend reads the LM head
                             through a cheaper copy and then the exact rows of the few
                             candidates; 0 when it does not */
    const char *layout;    /* which tensor-name layout the files use */
    const char *backend;   /* backend in use */
    const char *device_name; /* the hardware it runs on */
    const char *decode_path; /* "fused", "fused-nol2", "split" or "mega" */
    const char *decode_paths; /* the ones this model and backend have, comma-separated */
    const char *decode_path_why; /* how it was chosen */
    int sparse;               /* exact activation sparsity on (g3n_model_params.sparse) */
    const char *kv_type;      /* "f16" or "f32" (g3n_model_params.kv_type) */
} g3n_model_info;

g3n_model_info g3n_model_get_info(const g3n_model *m);

/* Switch the decode path ("fused", "fused-nol2", "split" or "mega") of an open
 * model; -1 on another name or one the model lacks (decode_paths). For
 * benchmarks and tests. */
int g3n_model_set_decode_path(g3n_model *m, const char *path);

/* Benchmark support: read bandwidth in bytes/s of the memory the weights live
 * in, measured now by streaming `bytes` (0 = 1 GiB) with the model's backend.
 * Decode is bound by it: decode_bytes / bandwidth is the fastest a token can be. */
double g3n_model_read_bandwidth(g3n_model *m, size_t bytes);

/* Bytes of K/V cache one decoded token at position `pos` reads: every layer's
 * visible keys and values (a sliding layer's window, a KV-shared layer its
 * source's cache), as stored (f16 or f32: kv_type); 0 for pos < 0. Added to decode_bytes at
 * long contexts. */
size_t g3n_model_kv_read_bytes(const g3n_model *m, int pos);

/* Bytes of device memory in use on the model's GPU (0 on the CPU backends). */
size_t g3n_model_device_memory(g3n_model *m);

/* ---- session ----------------------------------------------------------------- */

typedef struct g3n_session g3n_session;

/* A session with room for n_ctx positions (0 = min(4096, max_position_embeddings)).
 * n_batch is the most tokens one forward step processes (longer inputs are split);
 * 0 = 1024 on a GPU (prompt chunks of 256 prefill at about half the speed:
 * docs/SPEED.md, twelfth session), 256 on the CPU. Everything it needs is
 * allocated here, nothing in the token loop. */
g3n_session *g3n_session_create(g3n_model *m, int n_ctx, int n_batch, char *err, size_t errlen);
void g3n_session_free(g3n_session *s);

/* Forget the sequence: position back to 0. */
void g3n_session_reset(g3n_session *s);
int g3n_session_pos(const g3n_session *s);
int g3n_session_n_ctx(const g3n_session *s);

/* Append n tokens at the current position and run them through the model.
 * If logits_out is not NULL it receives n x n_vocab soft-capped logits (row-major,
 * one row per token); the last token's logits are always kept in the session
 * (g3n_session_logits). Fails (leaving the session unchanged) on ids outside the
 * text vocabulary or when the context would overflow. */
int g3n_session_eval(g3n_session *s, const int32_t *ids, int n, float *logits_out, char *err,
                     size_t errlen);

/* Logits of the last evaluated token (n_vocab floats), NULL before any eval. On
 * a GPU the row is copied to the host at the first call after an eval. */
const float *g3n_session_logits(const g3n_session *s);

/* Keep the first n positions of the sequence and forget the rest (to reuse a
 * cached prompt prefix: truncate to the common prefix, then eval the remainder).
 * The last logits are forgotten. Fails, leaving the session unchanged, when
 * n > pos, or when the sliding-window layers' ring (window + n_batch - 1 slots)
 * was since overwritten where the window before n lived: that holds while the
 * session went less than about n_batch positions past n. */
int g3n_session_truncate(g3n_session *s, int n, char *err, size_t errlen);

/* ---- batched decode: many sessions, one forward step ------------------------------ */

/* A g3n_batcher runs one token of each of up to max_seqs sessions (of the same
 * model, each with its own KV cache and position) as one forward pass: the
 * weights are read once for all of them. It owns the step's scratch, allocated
 * here; nothing is allocated per step. One batcher per thread. */
typedef struct g3n_batcher g3n_batcher;

g3n_batcher *g3n_batcher_create(g3n_model *m, int max_seqs, char *err, size_t errlen);
void g3n_batcher_free(g3n_batcher *bt);

/* Append ids[i] to session ss[i] for i < n (n <= max_seqs, sessions distinct, none
 * full) in one step. Each session's last logits are updated (g3n_session_logits);
 * logits_out, if not NULL, also receives n x n_vocab floats, row i for ss[i]. The
 * result for a session does not depend on the others in the step (on the CPU
 * backends it is bitwise what g3n_session_eval of that token gives). Fails,
 * changing nothing, on a bad argument. */
int g3n_batch_decode(g3n_batcher *bt, g3n_session **ss, const int32_t *ids, int n,
                     float *logits_out, char *err, size_t errlen);

/* ---- tokenizer (tokenizer.json as shipped with Gemma 3 / 3n) ------------------- */

typedef struct g3n_tokenizer g3n_tokenizer;

/* Load tokenizer.json. Returns NULL and fills err on failure (also for a component
 * g3n does not implement, named in err). The tokenizer is read-only afterwards:
 * one may serve many threads. */
g3n_tokenizer *g3n_tokenizer_load(const char *path, char *err, size_t errlen);
void g3n_tokenizer_free(g3n_tokenizer *tk);

int g3n_tokenizer_n_vocab(const g3n_tokenizer *tk);

/* Id of the token whose piece is exactly `piece` (e.g. "<end_of_turn>"), or -1. */
int32_t g3n_tokenizer_find(const g3n_tokenizer *tk, const char *piece);

/* Encode len bytes of text as the Hugging Face `tokenizers` library does with
 * add_special_tokens=False (special tokens written in the text are matched), and
 * prepend <bos> when add_bos. Invalid UTF-8 is read as U+FFFD, one per maximal
 * ill-formed subpart (as Python's bytes.decode('utf-8', 'replace') does). *ids is
 * heap memory the caller frees. Returns the number of ids, or -1 and fills err. */
int g3n_tokenizer_encode(const g3n_tokenizer *tk, const char *text, size_t len, int add_bos,
                         int32_t **ids, char *err, size_t errlen);

/* Decode ids to text (heap string, caller frees), as `tokenizers` does: ids outside
 * the vocabulary are dropped, and a run of byte tokens that is not valid UTF-8 as a
 * whole becomes one U+FFFD per byte. skip_special drops special tokens (<bos>,
 * <end_of_turn>, ...). *len receives the byte length (the text may hold NUL bytes
 * from byte tokens) when len is not NULL. */
char *g3n_tokenizer_decode(const g3n_tokenizer *tk, const int32_t *ids, size_t n,
                           int skip_special, size_t *len);

/* Streaming decoder: feed one id at a time and receive the bytes that are complete
 * UTF-8 (a character split across tokens is held back until its last byte comes).
 * Zero-initialise the state before the first call. The concatenated output equals
 * g3n_tokenizer_decode whenever every run of byte tokens is valid UTF-8 (always so
 * for ids from g3n_tokenizer_encode); otherwise each byte of an ill-formed or cut
 * sequence becomes one U+FFFD as soon as it is known to be bad. */
typedef struct {
    unsigned char pending[8];
    int n_pending;
    int n_tokens; /* tokens fed so far */
} g3n_detok;

/* Appends at most cap bytes to out and returns how many were written; the bytes
 * of a token never exceed 73 (a piece of at most 64 bytes, which load checks, after
 * at most three U+FFFD), so cap >= 128 always suffices. */
size_t g3n_detok_push(const g3n_tokenizer *tk, g3n_detok *st, int32_t id, int skip_special,
                      char *out, size_t cap);
/* Flush what is still held back (each byte of an incomplete character at the end
 * of the stream is emitted as U+FFFD). Returns the number of bytes written. */
size_t g3n_detok_flush(const g3n_tokenizer *tk, g3n_detok *st, char *out, size_t cap);

/* ---- chat template -------------------------------------------------------------- */

typedef struct {
    const char *role;    /* "system", "user", "assistant" (or "model") */
    const char *content;
} g3n_chat_msg;

/* Render a conversation in the Gemma 3n chat format, exactly as the published
 * template does:  <bos><start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n
 * A system message (first only) is folded into the first user turn as its content
 * + "\n\n", untrimmed; other contents are trimmed (Python str.strip()); "assistant"
 * is written "model". With add_generation_prompt, ends with "<start_of_turn>model\n".
 * The "<bos>" is text: encode the result with add_bos = 0. Heap string, caller
 * frees; NULL + err on a conversation the template rejects (empty, or roles that do
 * not alternate user/other/user/...). */
char *g3n_chat_format(const g3n_chat_msg *msgs, int n, int add_generation_prompt, char *err,
                      size_t errlen);

/* ---- sampler ---------------------------------------------------------------------- */

/* The chain: penalties -> (greedy at temperature 0) -> top-k -> top-p -> min-p ->
 * temperature -> one draw. top-p and min-p see the untempered distribution. */
typedef struct {
    float temperature;       /* 0: greedy (argmax, lowest id on ties); must be >= 0 */
    int top_k;               /* <= 0: off */
    float top_p;             /* (0, 1]; 1: off */
    float min_p;             /* [0, 1]; 0: off */
    float repeat_penalty;    /* > 0; 1: off (llama.cpp semantics, over the last repeat_last_n) */
    int repeat_last_n;       /* tokens of history the penalties look at; -1 = all, 0 = none */
    float presence_penalty;  /* 0: off (OpenAI semantics) */
    float frequency_penalty; /* 0: off (OpenAI semantics) */
    uint64_t seed;           /* same seed, same choices */
} g3n_sampler_params;

/* Gemma's recommended sampling: temperature 1, top-k 64, top-p 0.95; penalties off. */
g3n_sampler_params g3n_sampler_default_params(void);

typedef struct g3n_sampler g3n_sampler;

/* A sampler over n_vocab logits; NULL + err on out-of-range parameters. */
g3n_sampler *g3n_sampler_create(const g3n_sampler_params *p, int n_vocab, char *err,
                                size_t errlen);
void g3n_sampler_free(g3n_sampler *s);
/* Record a token in the history the penalties see (prompt and generated ones). */
void g3n_sampler_accept(g3n_sampler *s, int32_t id);
/* Clear the history and re-seed. */
void g3n_sampler_reset(g3n_sampler *s);
/* Pick the next token from logits (n_vocab floats, not modified); -1 when every
 * logit is -inf or NaN. A sampler created with n_vocab = the text vocabulary
 * reads only that prefix of a logits row, so it never picks a non-text id. */
int32_t g3n_sampler_sample(g3n_sampler *s, const float *logits);
/* The distribution sample() would draw from (n_vocab floats into probs), with no
 * random draw. Returns the number of tokens with non-zero probability. */
int g3n_sampler_probs(g3n_sampler *s, const float *logits, float *probs);

/* The candidates path: sample reads only the best few logits (in the order logit
 * descending, then id ascending; NaN as -inf, +inf as FLT_MAX) when no penalty
 * is set and it is greedy (1) or has a top-k below 256 (top_k + 1). top_need
 * says how many, or 0 when it needs the whole row. sample_top picks from the
 * best m = top_need exactly what sample picks from the row, drawing the same
 * random number; -2 (no draw) when fewer than m logits are finite and the row
 * is needed after all, or when m is not top_need. */
int g3n_sampler_top_need(const g3n_sampler *s);
int g3n_sampler_vocab(const g3n_sampler *s); /* the n_vocab it was made with */
int32_t g3n_sampler_sample_top(g3n_sampler *s, const float *vals, const int32_t *ids, int m);

/* The next token by smp from the session's last logits: from the device's best
 * candidates where the backend and the sampler allow (no copy of the whole row
 * to the host), else from the row. -1 as g3n_sampler_sample, and when the
 * session has no logits (none evaluated, or g3n_batch_decode_sample kept none)
 * or the sampler covers more tokens than the model's logits. */
int32_t g3n_session_sample(g3n_session *s, g3n_sampler *smp);

/* What g3n_session_generate hands each token it picks: nonzero stops there
 * (that token is then not evaluated). */
typedef int (*g3n_token_fn)(void *ud, int32_t id);

/* Pick a token with smp from the session's last logits (g3n_session_sample),
 * hand it to on_token (may be NULL), evaluate it, and so on: at most n tokens
 * are picked, and neither the n-th nor one on_token stops at nor one that does
 * not fit the context is evaluated. Returns the number picked, or -1 and err
 * (no logits, every logit masked, an evaluation that failed). The loop of `g3n
 * generate` and of `g3n bench`'s decode. */
int g3n_session_generate(g3n_session *s, g3n_sampler *smp, int n, g3n_token_fn on_token, void *ud,
                         char *err, size_t errlen);

/* g3n_batch_decode, then the next token of ss[i] by sampler smps[i] into out[i],
 * what g3n_session_sample would pick from that session's logits (-1 when every
 * logit is masked): on a GPU from the device's best candidates where the
 * samplers allow, with no copy of the rows. The sessions' logits are not kept
 * (g3n_session_logits gives NULL) except where a row was needed whole. */
int g3n_batch_decode_sample(g3n_batcher *bt, g3n_session **ss, const int32_t *ids, int n,
                            g3n_sampler **smps, int32_t *out, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
#endif
