/* cli_quantize.c: g3n quantize -m DIR -o OUT [--bits 4] [--group-size 64]. */
#include <string.h>

#include "cli/cli.h"

int cmd_quantize(int argc, char **argv) {
    const char *src = NULL, *dst = NULL;
    int bits = 4, group = 64;
    for (int i = 2; i < argc; i++) {
        if ((!strcmp(argv[i], "-m") || !strcmp(argv[i], "--model")) && i + 1 < argc) src = argv[++i];
        else if ((!strcmp(argv[i], "-o") || !strcmp(argv[i], "--out")) && i + 1 < argc) dst = argv[++i];
        else if (!strcmp(argv[i], "--bits") && i + 1 < argc) bits = (int)parse_long("--bits", argv[++i], 1, 64);
        else if (!strcmp(argv[i], "--group-size") && i + 1 < argc)
            group = (int)parse_long("--group-size", argv[++i], 1, 1 << 20);
        else die("quantize: unknown or incomplete option \"%s\" (see g3n --help)", argv[i]);
    }
    if (!src || !dst) die("quantize: -m DIR and -o OUT are required");
    if (!strcmp(src, dst)) die("quantize: -o must differ from -m");
    char err[1024];
    if (g3n_quantize(src, dst, bits, group, err, sizeof err)) die("%s", err);
    return 0;
}
