/* cli_serve.c: `g3n serve`, the OpenAI-compatible HTTP server (src/server/):
 * options, then the model, the tokenizer and server_run until SIGINT/SIGTERM. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "server/server.h"

int cmd_serve(int argc, char **argv) {
    model_opts mo = {0};
    srv_config c = {0};
    const char *tokfile = NULL;
    c.host = "127.0.0.1";
    c.port = 8080;
    c.parallel = 4;
    c.queue = 64;
    c.max_body = (size_t)4 << 20;
    c.timeout_s = 30;
    c.max_conn = 256;
    for (int i = 2; i < argc; i++) {
        if (opt_model(&mo, argc, argv, &i)) continue;
        const char *a = argv[i];
        int has = i + 1 < argc;
        if (!strcmp(a, "--host") && has) c.host = argv[++i];
        else if (!strcmp(a, "--port") && has) c.port = (int)parse_long(a, argv[++i], 0, 65535);
        else if ((!strcmp(a, "--parallel") || !strcmp(a, "-np")) && has) c.parallel = (int)parse_long(a, argv[++i], 1, 1024);
        else if (!strcmp(a, "--queue") && has) c.queue = (int)parse_long(a, argv[++i], 0, 1 << 16);
        else if (!strcmp(a, "--api-key") && has) c.api_key = argv[++i];
        else if (!strcmp(a, "--alias") && has) c.model_name = argv[++i];
        else if (!strcmp(a, "--max-body") && has) c.max_body = (size_t)parse_long(a, argv[++i], 1024, 1L << 30);
        else if (!strcmp(a, "--timeout") && has) c.timeout_s = (int)parse_long(a, argv[++i], 1, 86400);
        else if (!strcmp(a, "--max-conn") && has) c.max_conn = (int)parse_long(a, argv[++i], 1, 65536);
        else if (!strcmp(a, "--tokenizer") && has) tokfile = argv[++i];
        else if (!strcmp(a, "--step-delay") && has) c.step_delay_ms = (int)parse_long(a, argv[++i], 0, 10000);
        else die("serve: unknown or incomplete option \"%s\" (see g3n --help)", a);
    }
    if (!mo.dir) die("no model: give -m DIR (a checkpoint directory with config.json)");
    if (!c.model_name) {
        const char *b = strrchr(mo.dir, '/');
        c.model_name = b && b[1] ? b + 1 : mo.dir;
    }
    g3n_tokenizer *tk = open_tokenizer(tokfile, mo.dir, 1);
    g3n_model *m = open_model(&mo);
    g3n_model_info mi = g3n_model_get_info(m);
    c.n_ctx = mo.n_ctx ? mo.n_ctx : (mi.n_ctx_max < 4096 ? mi.n_ctx_max : 4096);
    c.n_batch = mo.n_batch ? mo.n_batch : 256;
    if (c.n_batch > c.n_ctx) c.n_batch = c.n_ctx;
    char err[1024];
    int rc = server_run(m, tk, &c, err, sizeof err);
    g3n_model_close(m);
    g3n_tokenizer_free(tk);
    if (rc) die("%s", err);
    return 0;
}
