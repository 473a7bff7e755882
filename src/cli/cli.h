/* cli.h: what the g3n command-line files share: option parsing helpers, model
 * opening, and the subcommand entry points. Programs only; not library code. */
#ifndef G3N_CLI_H
#define G3N_CLI_H

#include <stdint.h>

#include "g3n.h"

typedef struct {
    const char *dir;
    const char *device;
    int threads;
    int n_ctx;
    int n_batch;
    int ple_on_gpu, no_graph, sparse;
    const char *decode_path;
    const char *kv_type;
} model_opts;

extern int g3n_quiet;

/* Print "g3n: <message>" on stderr and exit with status 1. */
void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
long parse_long(const char *flag, const char *s, long lo, long hi);
double parse_double(const char *flag, const char *s, double lo, double hi);
/* "2,651,9" -> heap array (caller frees); dies on anything else. */
int32_t *parse_ids(const char *s, int *n);
/* Consume the model option at argv[*i] (advancing *i past its value); 1 if it was one. */
int opt_model(model_opts *o, int argc, char **argv, int *i);
g3n_model *open_model(const model_opts *o);
g3n_session *open_session(g3n_model *m, const model_opts *o);
double now_s(void);

int cmd_generate(int argc, char **argv);
int cmd_run(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_serve(int argc, char **argv);
/* tokenizer.json from `file`, else DIR/tokenizer.json; dies when required and
 * absent; NULL when not required and absent. */
g3n_tokenizer *open_tokenizer(const char *file, const char *dir, int required);
int cmd_quantize(int argc, char **argv);

#endif
