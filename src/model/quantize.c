/* quantize.c: write an mlx affine-quantized copy of a checkpoint directory
 * (`g3n quantize`). The layout is mlx-community's: the same tensor names, each
 * quantized module as <path>.weight (U32, packed) + <path>.scales + <path>.biases
 * in the source dtype, and config.json with a "quantization" block (and the
 * "quantization_config" copy mlx-lm writes). Which tensors: what mlx.nn.quantize
 * picks by default, every 2-D "*.weight" (Linear and Embedding weights) whose
 * last dimension is a multiple of the group size. The arithmetic is
 * g3n_quantize_row (src/core/quant.c), the same as tools/mlx_quantize.py. */
#define _DEFAULT_SOURCE
#include <cjson/cJSON.h>
#include <errno.h>
#include <sys/stat.h>

#include "g3n.h"
#include "model/gemma3n.h"
#include "quant.h"

static int quantizable(const st_tensor *t, int group) {
    size_t n = strlen(t->name);
    return t->ndim == 2 && n > 7 && strcmp(t->name + n - 7, ".weight") == 0 &&
           (t->dtype == G3N_F32 || t->dtype == G3N_F16 || t->dtype == G3N_BF16) &&
           t->shape[1] % group == 0 && t->shape[0] > 0;
}

static cJSON *entry(const char *dtype, int64_t d0, int64_t d1, size_t off, size_t bytes) {
    cJSON *e = cJSON_CreateObject(), *s = cJSON_AddArrayToObject(e, "shape"), *o;
    cJSON_AddStringToObject(e, "dtype", dtype);
    cJSON_AddItemToArray(s, cJSON_CreateNumber((double)d0));
    if (d1 >= 0) cJSON_AddItemToArray(s, cJSON_CreateNumber((double)d1));
    o = cJSON_AddArrayToObject(e, "data_offsets");
    cJSON_AddItemToArray(o, cJSON_CreateNumber((double)off));
    cJSON_AddItemToArray(o, cJSON_CreateNumber((double)(off + bytes)));
    return e;
}

static int put(FILE *f, const void *p, size_t n, const char *path, char *err, size_t errlen) {
    if (n && fwrite(p, 1, n, f) != n) return g3n_err(err, errlen, "%s: write failed (%s)", path, strerror(errno));
    return 0;
}

/* Quantize tensor t row by row into f: packed rows, then scales, then biases.
 * Blocks of rows are quantized in parallel (OpenMP) and written in order, so the
 * output does not depend on the thread count. */
static int write_quantized(FILE *f, const st_tensor *t, int bits, int group, const char *path, char *err,
                           size_t errlen) {
    enum { QBLOCK = 1024 };
    const int rows = (int)t->shape[0], cols = (int)t->shape[1], ng = cols / group;
    const size_t words = g3n_quant_row_words(cols, bits), es = g3n_dtype_size((g3n_dtype)t->dtype);
    uint32_t *qb = g3n_malloc(4 * words * QBLOCK);
    char *sb = g3n_malloc(2 * es * (size_t)ng * (size_t)rows); /* scales then biases, source dtype */
    const g3n_mat src = {t->dtype, rows, cols, t->data, t->name, 0, 0, 0, 0, 0, 0, NULL, NULL, 0, 0, NULL};
    int rc = 0;
    for (int r0 = 0; r0 < rows && !rc; r0 += QBLOCK) {
        const int nr = G3N_MIN(QBLOCK, rows - r0);
#pragma omp parallel
        {
            float *w = g3n_malloc(sizeof(float) * (size_t)cols), *s = g3n_malloc(sizeof(float) * (size_t)ng);
            float *b = g3n_malloc(sizeof(float) * (size_t)ng);
#pragma omp for schedule(static)
            for (int i = 0; i < nr; i++) {
                const int r = r0 + i;
                g3n_mat_row(&src, r, w);
                g3n_quantize_row(w, cols, bits, group, qb + (size_t)i * words, s, b);
                for (int g = 0; g < ng; g++) {
                    char *ps = sb + ((size_t)r * ng + g) * es, *pb = ps + es * (size_t)ng * (size_t)rows;
                    if (t->dtype == G3N_F32) memcpy(ps, &s[g], 4), memcpy(pb, &b[g], 4);
                    else {
                        uint16_t hs = t->dtype == G3N_BF16 ? g3n_f32_to_bf16(s[g]) : g3n_f32_to_f16(s[g]);
                        uint16_t hb = t->dtype == G3N_BF16 ? g3n_f32_to_bf16(b[g]) : g3n_f32_to_f16(b[g]);
                        memcpy(ps, &hs, 2), memcpy(pb, &hb, 2);
                    }
                }
            }
            free(w), free(s), free(b);
        }
        rc = put(f, qb, 4 * words * (size_t)nr, path, err, errlen);
    }
    if (!rc) rc = put(f, sb, 2 * es * (size_t)ng * (size_t)rows, path, err, errlen);
    free(qb), free(sb);
    return rc;
}

static int copy_if_present(const char *src_dir, const char *dst_dir, const char *name, char *err, size_t errlen) {
    char *src = g3n_path_join(src_dir, name), *dst = g3n_path_join(dst_dir, name);
    struct stat sb;
    int rc = 0;
    if (stat(src, &sb) == 0) {
        size_t n;
        char *buf = g3n_read_file(src, &n, (size_t)1 << 31, err, errlen);
        FILE *f = buf ? fopen(dst, "wb") : NULL;
        if (!buf) rc = -1;
        else if (!f) rc = g3n_err(err, errlen, "%s: cannot create (%s)", dst, strerror(errno));
        else {
            rc = put(f, buf, n, dst, err, errlen);
            if (fclose(f) != 0 && !rc) rc = g3n_err(err, errlen, "%s: write failed", dst);
        }
        free(buf);
    }
    free(src), free(dst);
    return rc;
}

int g3n_quantize(const char *src, const char *dst, int bits, int group, char *err, size_t errlen) {
    if (!g3n_quant_bits_ok(bits))
        return g3n_err(err, errlen, "--bits %d: mlx quantizes to 2, 3, 4, 5, 6 or 8 bits", bits);
    if (!g3n_quant_group_ok(group))
        return g3n_err(err, errlen, "--group-size %d: mlx uses groups of 32, 64 or 128", group);
    char *cpath = g3n_path_join(src, "config.json");
    size_t clen;
    char *ctext = g3n_read_file(cpath, &clen, 16u << 20, err, errlen);
    cJSON *cfg = ctext ? cJSON_ParseWithLength(ctext, clen) : NULL;
    free(ctext);
    int rc = 0;
    if (!ctext) rc = -1;
    else if (!cJSON_IsObject(cfg)) rc = g3n_err(err, errlen, "%s: not valid JSON", cpath);
    else if (cJSON_GetObjectItemCaseSensitive(cfg, "quantization"))
        rc = g3n_err(err, errlen, "%s: the checkpoint is already quantized", cpath);
    free(cpath);
    safetensors *st = rc ? NULL : safetensors_open_dir(src, err, errlen);
    if (!rc && !st) rc = -1;
    if (!rc && mkdir(dst, 0755) != 0 && errno != EEXIST)
        rc = g3n_err(err, errlen, "%s: cannot create the directory (%s)", dst, strerror(errno));

    /* header: every tensor in the source's order, quantized ones as three */
    cJSON *h = cJSON_CreateObject();
    size_t off = 0, n_q = 0, in_bytes = 0;
    const int nt = st ? safetensors_count(st) : 0;
    for (int i = 0; i < nt && !rc; i++) {
        const st_tensor *t = safetensors_at(st, i);
        in_bytes += t->nbytes;
        if (t->dtype == G3N_U32) {
            rc = g3n_err(err, errlen, "%s: tensor %s is already quantized", safetensors_file_path(st, t), t->name);
            break;
        }
        if (!quantizable(t, group)) {
            cJSON *e = cJSON_CreateObject(), *s = cJSON_AddArrayToObject(e, "shape"), *o;
            cJSON_AddStringToObject(e, "dtype", t->dtype_name);
            for (int d = 0; d < t->ndim; d++) cJSON_AddItemToArray(s, cJSON_CreateNumber((double)t->shape[d]));
            o = cJSON_AddArrayToObject(e, "data_offsets");
            cJSON_AddItemToArray(o, cJSON_CreateNumber((double)off));
            cJSON_AddItemToArray(o, cJSON_CreateNumber((double)(off + t->nbytes)));
            cJSON_AddItemToObject(h, t->name, e);
            off += t->nbytes;
            continue;
        }
        const int64_t rows = t->shape[0], cols = t->shape[1];
        const size_t pb = (size_t)rows * g3n_quant_row_words((int)cols, bits) * 4;
        const size_t sb = (size_t)rows * (size_t)(cols / group) * g3n_dtype_size((g3n_dtype)t->dtype);
        char name[600];
        const int mlen = (int)strlen(t->name) - 7;
        cJSON_AddItemToObject(h, t->name, entry("U32", rows, cols * bits / 32, off, pb));
        snprintf(name, sizeof name, "%.*s.scales", mlen, t->name);
        cJSON_AddItemToObject(h, name, entry(t->dtype_name, rows, cols / group, off + pb, sb));
        snprintf(name, sizeof name, "%.*s.biases", mlen, t->name);
        cJSON_AddItemToObject(h, name, entry(t->dtype_name, rows, cols / group, off + pb + sb, sb));
        off += pb + 2 * sb;
        n_q++;
    }
    cJSON *meta = cJSON_AddObjectToObject(h, "__metadata__");
    cJSON_AddStringToObject(meta, "format", "mlx");

    char *opath = g3n_path_join(dst, "model.safetensors");
    FILE *f = rc ? NULL : fopen(opath, "wb");
    if (!rc && !f) rc = g3n_err(err, errlen, "%s: cannot create (%s)", opath, strerror(errno));
    if (!rc) {
        char *hs = cJSON_PrintUnformatted(h);
        size_t hn = strlen(hs), pad = (8 - hn % 8) % 8;
        unsigned char len8[8];
        for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)(hn + pad) >> (8 * i));
        rc = put(f, len8, 8, opath, err, errlen);
        if (!rc) rc = put(f, hs, hn, opath, err, errlen);
        if (!rc) rc = put(f, "        ", pad, opath, err, errlen);
        cJSON_free(hs);
    }
    double t0 = g3n_time_s(), last = t0;
    for (int i = 0; i < nt && !rc; i++) {
        const st_tensor *t = safetensors_at(st, i);
        if (quantizable(t, group)) rc = write_quantized(f, t, bits, group, opath, err, errlen);
        else rc = put(f, t->data, t->nbytes, opath, err, errlen);
        if (g3n_time_s() - last > 5) {
            g3n_log("g3n: quantize: %d of %d tensors\n", i + 1, nt);
            last = g3n_time_s();
        }
    }
    if (f && fclose(f) != 0 && !rc) rc = g3n_err(err, errlen, "%s: write failed", opath);
    free(opath);
    cJSON_Delete(h);

    if (!rc) { /* config.json with the quantization block */
        cJSON *q = cJSON_CreateObject();
        cJSON_AddNumberToObject(q, "group_size", group);
        cJSON_AddNumberToObject(q, "bits", bits);
        cJSON_DeleteItemFromObjectCaseSensitive(cfg, "quantization_config");
        cJSON_AddItemToObject(cfg, "quantization", q);
        cJSON_AddItemToObject(cfg, "quantization_config", cJSON_Duplicate(q, 1));
        char *text = cJSON_Print(cfg), *p = g3n_path_join(dst, "config.json");
        FILE *cf = fopen(p, "wb");
        if (!cf) rc = g3n_err(err, errlen, "%s: cannot create (%s)", p, strerror(errno));
        else {
            rc = put(cf, text, strlen(text), p, err, errlen);
            if (!rc) rc = put(cf, "\n", 1, p, err, errlen);
            if (fclose(cf) != 0 && !rc) rc = g3n_err(err, errlen, "%s: write failed", p);
        }
        cJSON_free(text), free(p);
    }
    const char *extra[] = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                           "generation_config.json", "chat_template.jinja", "chat_template.json",
                           "tokenizer.model"};
    for (size_t i = 0; i < sizeof extra / sizeof *extra && !rc; i++)
        rc = copy_if_present(src, dst, extra[i], err, errlen);
    if (!rc)
        g3n_log("g3n: quantize: %zu matrices to %d bits (group %d): %.2f GB -> %.2f GB in %.1f s\n", n_q,
                bits, group, in_bytes / 1e9, off / 1e9, g3n_time_s() - t0);
    cJSON_Delete(cfg);
    safetensors_close(st);
    return rc;
}
