/* test_load.c: loading, and refusing bad input with a message and no crash.
 * Writes its own small and malformed safetensors files and model directories
 * (derived from the tiny causal fixture) under a temporary directory:
 * truncated files, huge header lengths, offsets past the end, overlapping data,
 * bad dtypes and shapes, missing tensors, bad configs. Under ASan/UBSan in
 * `make test` too. Also the config parser's accepted forms. */
#define _DEFAULT_SOURCE
#include <cjson/cJSON.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

#include "test.h"

#include "g3n.h"
#include "model/gemma3n.h"
#include "quant.h"

static char TMP[256];
static char ERR[1024];

static char *tmp_path(const char *name) {
    static char buf[4][512];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", TMP, name);
    return buf[k];
}

static void write_bytes(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    G3N_ASSERT(f);
    if (n) G3N_ASSERT(fwrite(p, 1, n, f) == n);
    fclose(f);
}

static void write_text(const char *path, const char *s) { write_bytes(path, s, strlen(s)); }

/* A safetensors file from a header string and n data bytes (pattern filled);
 * hlen_override != 0 writes that value as the header length instead. */
static void write_st(const char *path, const char *header, size_t ndata, uint64_t hlen_override) {
    size_t hl = strlen(header);
    uint64_t h = hlen_override ? hlen_override : hl;
    unsigned char *buf = malloc(8 + hl + ndata + 1);
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)(h >> (8 * i));
    memcpy(buf + 8, header, hl);
    for (size_t i = 0; i < ndata; i++) buf[8 + hl + i] = (unsigned char)(i * 7);
    write_bytes(path, buf, 8 + hl + ndata);
    free(buf);
}

/* Expect safetensors_open_file to fail with a message containing `want`. */
static void st_bad(const char *header, size_t ndata, uint64_t hlen, const char *want) {
    const char *p = tmp_path("bad.safetensors");
    write_st(p, header, ndata, hlen);
    ERR[0] = 0;
    safetensors *st = safetensors_open_file(p, ERR, sizeof ERR);
    CHECK_MSG(st == NULL, "accepted: %s", header);
    CHECK_MSG(strstr(ERR, want) != NULL, "message \"%s\" lacks \"%s\"", ERR, want);
    CHECK_MSG(strstr(ERR, "bad.safetensors") != NULL, "message \"%s\" does not name the file", ERR);
    safetensors_close(st);
}

TEST(safetensors_valid) {
    /* 8-byte aligned header; a = F32[2,3] at 0..24, b = BF16[4] at 24..32 */
    const char *h = "{\"__metadata__\":{\"format\":\"pt\"},\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],"
                    "\"data_offsets\":[0,24]},\"b\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[24,32]}}";
    char hb[256];
    snprintf(hb, sizeof hb, "%s", h);
    while (strlen(hb) % 8) strcat(hb, " ");
    const char *p = tmp_path("ok.safetensors");
    write_st(p, hb, 32, 0);
    safetensors *st = safetensors_open_file(p, ERR, sizeof ERR);
    CHECK_MSG(st != NULL, "%s", ERR);
    if (!st) return;
    CHECK(safetensors_count(st) == 2);
    const st_tensor *a = safetensors_find(st, "a"), *b = safetensors_find(st, "b");
    CHECK(a && a->dtype == G3N_F32 && a->ndim == 2 && a->shape[0] == 2 && a->shape[1] == 3 && a->nbytes == 24);
    CHECK(b && b->dtype == G3N_BF16 && b->numel == 4);
    CHECK(a && b && (const char *)b->data - (const char *)a->data == 24);
    CHECK(safetensors_find(st, "c") == NULL);
    safetensors_close(st);
}

TEST(safetensors_malformed) {
    const char *p = tmp_path("tiny.safetensors");
    write_bytes(p, "\x10\0\0", 3);
    CHECK(safetensors_open_file(p, ERR, sizeof ERR) == NULL && strstr(ERR, "truncated"));
    write_bytes(p, "", 0);
    CHECK(safetensors_open_file(p, ERR, sizeof ERR) == NULL && strstr(ERR, "truncated"));
    CHECK(safetensors_open_file(tmp_path("nonexistent.safetensors"), ERR, sizeof ERR) == NULL &&
          strstr(ERR, "nonexistent"));

    const char *ok = "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}    ";
    st_bad(ok, 8, (uint64_t)1 << 40, "limit");                 /* huge header length */
    st_bad(ok, 8, 5000, "truncated");                           /* header past the end */
    st_bad("{\"a\":{\"dtype\":\"F32\",\"sh", 0, 0, "JSON");     /* truncated JSON */
    st_bad("[1,2,3]", 0, 0, "JSON");                            /* not an object */
    st_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 8, 0, "past the end");
    st_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
           "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
           16, 0, "overlap");
    st_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 16, 0, "need");
    st_bad("{\"a\":{\"dtype\":\"Q4\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, 0, "dtype");
    st_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, 0, "shape");
    st_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2.5],\"data_offsets\":[0,8]}}", 8, 0, "shape");
    st_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[\"2\"],\"data_offsets\":[0,8]}}", 8, 0, "shape");
    st_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8, 0, "data_offsets");
    st_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0]}}", 8, 0, "data_offsets");
    st_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8, 0, "data_offsets");
    st_bad("{\"a\":7}", 8, 0, "not an object");
    st_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
           "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
           16, 0, "twice");
    /* numel overflow: 2^40 * 2^40 elements */
    st_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1099511627776,1099511627776],\"data_offsets\":[0,8]}}", 8, 0, "shape");
    /* data start at 8 + 61 = 69: a 4-byte element there is misaligned */
    st_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}       ", 4, 0, "aligned");
}

TEST(safetensors_index) {
    char *dir = tmp_path("idx");
    mkdir(dir, 0755);
    char path[600];
    const char *h = "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}  "; /* 56 */
    snprintf(path, sizeof path, "%s/s1.safetensors", dir);
    write_st(path, h, 8, 0);
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    struct {
        const char *index, *want;
    } cases[] = {
        {"{\"weight_map\":{\"w\":\"s1.safetensors\"}}", NULL},
        {"{\"weight_map\":{\"w\":\"../s1.safetensors\"}}", "plain file name"},
        {"{\"weight_map\":{\"w\":\"/etc/passwd\"}}", "plain file name"},
        {"{\"weight_map\":{\"w\":\"missing.safetensors\"}}", "missing.safetensors"},
        {"{\"weight_map\":{\"v\":\"s1.safetensors\"}}", "listed in the index"},
        {"{\"weight_map\":{}}", "empty"},
        {"{\"weight_map\":{\"w\":3}}", "plain file name"},
        {"{\"weight_map\":", "weight_map"},
        {"{}", "weight_map"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        write_text(path, cases[i].index);
        ERR[0] = 0;
        safetensors *st = safetensors_open_dir(dir, ERR, sizeof ERR);
        if (!cases[i].want) {
            CHECK_MSG(st && safetensors_find(st, "w"), "%s", ERR);
        } else {
            CHECK_MSG(!st && strstr(ERR, cases[i].want), "index %s: \"%s\"", cases[i].index, ERR);
        }
        safetensors_close(st);
    }
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    unlink(path);
    CHECK(safetensors_open_dir(dir, ERR, sizeof ERR) == NULL && strstr(ERR, "no model.safetensors"));
}

/* ---- config ------------------------------------------------------------------------ */

static const char *BASE_TEXT =
    "{\"vocab_size\":400,\"vocab_size_per_layer_input\":384,\"hidden_size\":64,"
    "\"hidden_size_per_layer_input\":16,\"num_hidden_layers\":6,\"num_attention_heads\":4,"
    "\"num_key_value_heads\":2,\"head_dim\":32,\"laurel_rank\":8,\"num_kv_shared_layers\":1,"
    "\"sliding_window\":8,\"intermediate_size\":10}";

/* The base text config with the members of `over` (a JSON object) replacing or
 * adding to it, nested under text_config or flat, through config_parse. */
static int parse_cfg(g3n_config *c, const char *over, int nested) {
    cJSON *t = cJSON_Parse(BASE_TEXT), *o = cJSON_Parse(over);
    G3N_ASSERT(t && o);
    for (cJSON *e = o->child; e; e = e->next) {
        cJSON *d = cJSON_Duplicate(e, 1);
        if (cJSON_GetObjectItemCaseSensitive(t, e->string))
            cJSON_ReplaceItemInObjectCaseSensitive(t, e->string, d);
        else
            cJSON_AddItemToObject(t, e->string, d);
    }
    cJSON *root;
    if (nested) {
        root = cJSON_CreateObject();
        cJSON_AddStringToObject(root, "model_type", "gemma3n");
        cJSON_AddItemToObject(root, "text_config", t);
    } else {
        root = t;
        cJSON_AddStringToObject(root, "model_type", "gemma3n_text");
    }
    char *text = cJSON_PrintUnformatted(root);
    ERR[0] = 0;
    int rc = config_parse(c, text, strlen(text), "config.json", ERR, sizeof ERR);
    cJSON_free(text);
    cJSON_Delete(root);
    cJSON_Delete(o);
    return rc;
}

TEST(config_forms) {
    g3n_config c;
    /* int intermediate size, no layer_types, no sparsity pattern, legacy rope keys */
    CHECK_MSG(parse_cfg(&c, "{\"rope_theta\":123.0,\"rope_local_base_freq\":45.0,\"intermediate_size\":100}", 1) == 0, "%s", ERR);
    CHECK(c.n_layer == 6 && c.n_ff[0] == 100 && c.n_ff[5] == 100);
    CHECK(c.is_sliding[0] && !c.is_sliding[4] && c.is_sliding[5]); /* every 5th is full */
    CHECK(c.sparsity[0] == 0.0f);                                  /* <= 10 layers: dense */
    CHECK(c.rope_theta_full == 123.0f && c.rope_theta_sliding == 45.0f);
    CHECK(c.first_shared == 5 && c.kv_source[5] == 3 && c.kv_source[4] == 4);
    CHECK(c.eos_id == -1 && c.rms_eps == 1e-6f);
    /* transformers-5 rope_parameters, lists, eos list */
    CHECK_MSG(parse_cfg(&c,
                        "{\"layer_types\":[\"sliding_attention\",\"full_attention\",\"sliding_attention\","
                        "\"full_attention\",\"sliding_attention\",\"full_attention\"],"
                        "\"activation_sparsity_pattern\":[0.95,0.5,0,0,0,0],\"eos_token_id\":[1,106],"
                        "\"rope_parameters\":{\"full_attention\":{\"rope_type\":\"default\",\"rope_theta\":1e6},"
                        "\"sliding_attention\":{\"rope_type\":\"default\",\"rope_theta\":1e4}},"
                        "\"intermediate_size\":[10,20,30,40,50,60]}", 0) == 0,
              "%s", ERR);
    CHECK(c.n_ff[5] == 60 && !c.is_sliding[1] && c.eos_id == 1);
    CHECK(fabsf(c.kappa[0] - 1.6448533535f) < 3e-7f && c.kappa[1] == 0.0f && c.kappa[2] == 0.0f);
    CHECK(c.rope_theta_full == 1e6f && c.rope_theta_sliding == 1e4f);
    /* the shared layer 5 (full) reads the last full layer before it, 3 */
    CHECK(c.kv_source[5] == 3 && c.kv_source[4] == 4 && c.kv_source[3] == 3);
    /* more than 10 layers: the default sparsity is 0.95 for the first 10 */
    char text[1024];
    snprintf(text, sizeof text,
             "{\"model_type\":\"gemma3n_text\",\"vocab_size\":10,\"vocab_size_per_layer_input\":10,"
             "\"hidden_size\":8,\"hidden_size_per_layer_input\":4,\"num_hidden_layers\":12,"
             "\"num_attention_heads\":2,\"num_key_value_heads\":1,\"head_dim\":4,\"laurel_rank\":2,"
             "\"num_kv_shared_layers\":2,\"sliding_window\":4,\"intermediate_size\":16}");
    CHECK_MSG(config_parse(&c, text, strlen(text), "config.json", ERR, sizeof ERR) == 0, "%s", ERR);
    CHECK(c.sparsity[9] == 0.95f && c.sparsity[10] == 0.0f);
}

TEST(config_errors) {
    g3n_config c;
    struct {
        const char *over, *want;
    } cases[] = {
        {"{\"hidden_size\":\"64\"}", "hidden_size: expected an integer"},
        {"{\"max_position_embeddings\":\"big\"}", "max_position_embeddings"},
        {"{\"num_kv_shared_layers\":2}", "num_kv_shared_layers"}, /* layer 4 (full) has no producer */
        {"{\"num_kv_shared_layers\":6}", "num_kv_shared_layers"},
        {"{\"intermediate_size\":\"many\"}", "intermediate_size"},
        {"{\"intermediate_size\":[1,2,3]}", "intermediate_size"},
        {"{\"intermediate_size\":[1,2,3,4,5,-6]}", "intermediate_size"},
        {"{\"intermediate_size\":null}", "intermediate_size"},
        {"{\"layer_types\":[\"sliding_attention\"]}", "layer_types"},
        {"{\"layer_types\":[1,2,3,4,5,6]}", "layer_types"},
        {"{\"activation_sparsity_pattern\":[1.5,0,0,0,0,0]}", "activation_sparsity_pattern"},
        {"{\"activation_sparsity_pattern\":\"x\"}", "activation_sparsity_pattern"},
        {"{\"rope_parameters\":{\"full_attention\":{\"rope_type\":\"yarn\",\"rope_theta\":1}}}", "rope_type"},
        {"{\"rope_parameters\":{\"full_attention\":{\"rope_theta\":\"big\"}}}", "rope_theta"},
        {"{\"rope_theta\":\"x\"}", "rope_theta"},
        {"{\"hidden_activation\":\"relu\"}", "hidden_activation"},
        {"{\"altup_active_idx\":1}", "altup_active_idx"},
        {"{\"altup_num_inputs\":99}", "altup_num_inputs"},
        {"{\"rms_norm_eps\":\"tiny\"}", "rms_norm_eps"},
        {"{\"tie_word_embeddings\":false}", "tie_word_embeddings"},
        {"{\"num_key_value_heads\":3}", "num_key_value_heads"},
        {"{\"head_dim\":31}", "head_dim"},
        {"{\"vocab_size_per_layer_input\":999}", "vocab_size_per_layer_input"},
        {"{\"vocab_size\":1e30}", "vocab_size"},
        {"{\"num_hidden_layers\":1000}", "num_hidden_layers"},
        {"{\"hidden_size\":-64}", "hidden_size"},
        {"{\"vocab_size\":null}", "vocab_size: missing"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        int rc = parse_cfg(&c, cases[i].over, (int)(i % 2));
        CHECK_MSG(rc != 0 && strstr(ERR, cases[i].want) && strstr(ERR, "config.json"),
                  "case %s: rc %d, \"%s\"", cases[i].over, rc, ERR);
    }
    CHECK(parse_cfg(&c, "{\"hidden_size\":\"64\"}", 1) != 0 && strstr(ERR, "text_config.hidden_size"));
    const char *dup = "{\"model_type\":\"gemma3n_text\",\"hidden_size\":64,\"hidden_size\":65}";
    CHECK(config_parse(&c, dup, strlen(dup), "config.json", ERR, sizeof ERR) != 0 && strstr(ERR, "hidden_size: appears twice"));
    const char *bad[] = {"", "{", "{\"model_type\":\"llama\"}", "{\"model_type\":\"gemma3n\"}",
                         "{\"text_config\":{}}", "{\"model_type\":\"gemma3n_text\"}", "[]",
                         "{\"model_type\":\"gemma3n_text\",\"vocab_size\":1e30}"};
    const char *want[] = {"JSON", "JSON", "llama", "text_config", "model_type", "missing", "JSON", "vocab_size"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        CHECK_MSG(config_parse(&c, bad[i], strlen(bad[i]), "config.json", ERR, sizeof ERR) != 0 &&
                      strstr(ERR, want[i]),
                  "\"%s\" -> \"%s\"", bad[i], ERR);
    }
}

/* ---- model directories ------------------------------------------------------------- */

static const char *FIX_CAUSAL = "tests/fixtures/tiny/causal"; /* make_dir's source */

static void copy_file(const char *src, const char *dst, size_t limit) {
    size_t n;
    char *buf = g3n_read_file(src, &n, (size_t)1 << 30, ERR, sizeof ERR);
    G3N_ASSERT(buf);
    write_bytes(dst, buf, n < limit ? n : limit);
    free(buf);
}

/* A model dir "name" with the fixture's config.json (or `config` if given) and a
 * model.safetensors rebuilt from the fixture by `edit` (NULL: copied as is). */
typedef void (*edit_fn)(cJSON *header, const char *name);

static char *make_dir(const char *name, const char *config, edit_fn edit, size_t truncate_to) {
    char *dir = g3n_strdup(tmp_path(name));
    mkdir(dir, 0755);
    char src[512], dst[600];
    snprintf(dst, sizeof dst, "%s/config.json", dir);
    if (config) write_text(dst, config);
    else {
        snprintf(src, sizeof src, "%s/config.json", FIX_CAUSAL);
        copy_file(src, dst, SIZE_MAX);
    }
    snprintf(src, sizeof src, "%s/model.safetensors", FIX_CAUSAL);
    snprintf(dst, sizeof dst, "%s/model.safetensors", dir);
    if (!edit) {
        copy_file(src, dst, truncate_to);
        return dir;
    }
    /* re-write the header through cJSON, keep the data bytes */
    size_t n;
    unsigned char *buf = (unsigned char *)g3n_read_file(src, &n, (size_t)1 << 30, ERR, sizeof ERR);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = (hl << 8) | buf[i];
    cJSON *h = cJSON_ParseWithLength((const char *)buf + 8, (size_t)hl);
    edit(h, name);
    char *hs = cJSON_PrintUnformatted(h);
    size_t hn = strlen(hs);
    char *hp = malloc(hn + 8);
    memcpy(hp, hs, hn);
    while (hn % 8) hp[hn++] = ' ';
    unsigned char *out = malloc(8 + hn + (n - 8 - hl));
    for (int i = 0; i < 8; i++) out[i] = (unsigned char)((uint64_t)hn >> (8 * i));
    memcpy(out + 8, hp, hn);
    memcpy(out + 8 + hn, buf + 8 + hl, n - 8 - hl);
    write_bytes(dst, out, 8 + hn + (n - 8 - hl));
    free(out), free(hp), cJSON_free(hs), cJSON_Delete(h), free(buf);
    return dir;
}

static void edit_drop(cJSON *h, const char *name) {
    cJSON_DeleteItemFromObjectCaseSensitive(h, "model.layers.3.mlp.up_proj.weight");
}
static void edit_dtype(cJSON *h, const char *name) {
    cJSON *t = cJSON_GetObjectItemCaseSensitive(h, "model.layers.1.input_layernorm.weight");
    cJSON_ReplaceItemInObjectCaseSensitive(t, "dtype", cJSON_CreateString("I32"));
}
static void edit_shape(cJSON *h, const char *name) {
    /* same bytes, other shape: [400*64] f32 read as [64, 400] */
    cJSON *t = cJSON_GetObjectItemCaseSensitive(h, "model.embed_tokens.weight");
    cJSON *s = cJSON_CreateArray();
    cJSON_AddItemToArray(s, cJSON_CreateNumber(64));
    cJSON_AddItemToArray(s, cJSON_CreateNumber(400));
    cJSON_ReplaceItemInObjectCaseSensitive(t, "shape", s);
}
static void edit_quant(cJSON *h, const char *name) {
    /* a .scales beside a weight marks an mlx-quantized module */
    cJSON *t = cJSON_Duplicate(cJSON_GetObjectItemCaseSensitive(h, "model.layers.0.input_layernorm.weight"), 1);
    cJSON_AddItemToObject(h, "model.layers.0.mlp.gate_proj.scales", t);
}
static void edit_past_end(cJSON *h, const char *name) {
    cJSON *t = cJSON_GetObjectItemCaseSensitive(h, "model.norm.weight");
    cJSON *o = cJSON_CreateArray();
    cJSON_AddItemToArray(o, cJSON_CreateNumber(1e12));
    cJSON_AddItemToArray(o, cJSON_CreateNumber(1e12 + 256));
    cJSON_ReplaceItemInObjectCaseSensitive(t, "data_offsets", o);
}
static void edit_overlap(cJSON *h, const char *name) {
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(h, "model.norm.weight");
    cJSON *b = cJSON_GetObjectItemCaseSensitive(h, "model.layers.2.input_layernorm.weight");
    cJSON_ReplaceItemInObjectCaseSensitive(
        b, "data_offsets", cJSON_Duplicate(cJSON_GetObjectItemCaseSensitive(a, "data_offsets"), 1));
}

static void model_bad(const char *dir, const char *want) {
    ERR[0] = 0;
    g3n_model *m = g3n_model_open(dir, NULL, ERR, sizeof ERR);
    CHECK_MSG(m == NULL, "%s: accepted", dir);
    CHECK_MSG(strstr(ERR, want) != NULL, "%s: message \"%s\" lacks \"%s\"", dir, ERR, want);
    g3n_model_close(m);
}

TEST(model_dirs) {
    char *d;
    d = make_dir("ok", NULL, NULL, SIZE_MAX);
    g3n_model *m = g3n_model_open(d, NULL, ERR, sizeof ERR);
    CHECK_MSG(m != NULL, "%s", ERR);
    g3n_model_close(m);
    free(d);

    model_bad(tmp_path("no-such-dir"), "no such model directory");
    d = make_dir("truncated", NULL, NULL, 100000);
    model_bad(d, "past the end");
    free(d);
    d = make_dir("truncated-header", NULL, NULL, 300);
    model_bad(d, "truncated");
    free(d);
    d = make_dir("missing-tensor", NULL, edit_drop, 0);
    model_bad(d, "missing tensor model.layers.3.mlp.up_proj.weight");
    free(d);
    d = make_dir("wrong-dtype", NULL, edit_dtype, 0);
    model_bad(d, "model.layers.1.input_layernorm.weight has dtype I32");
    free(d);
    d = make_dir("wrong-shape", NULL, edit_shape, 0);
    model_bad(d, "model.embed_tokens.weight has shape [64, 400], config says [400, 64]");
    free(d);
    d = make_dir("quantized", NULL, edit_quant, 0);
    model_bad(d, "quantized");
    free(d);
    d = make_dir("past-end", NULL, edit_past_end, 0);
    model_bad(d, "model.norm.weight");
    free(d);
    d = make_dir("overlap", NULL, edit_overlap, 0);
    model_bad(d, "overlap");
    free(d);

    /* config problems, with the fixture's weights */
    size_t n;
    char src[512];
    snprintf(src, sizeof src, "%s/config.json", FIX_CAUSAL);
    char *cfg = g3n_read_file(src, &n, 1 << 20, ERR, sizeof ERR);
    d = make_dir("cfg-truncated", "{\"model_type\": \"gemma3n_text\", \"hidden", NULL, SIZE_MAX);
    model_bad(d, "not valid JSON");
    free(d);
    char *c2 = g3n_strdup(cfg);
    char *p = strstr(c2, "\"hidden_size\": 64");
    G3N_ASSERT(p);
    memcpy(p, "\"hidden_size\":\"x\"", 17);
    d = make_dir("cfg-nonnumeric", c2, NULL, SIZE_MAX);
    model_bad(d, "hidden_size: expected an integer");
    free(d);
    free(c2);
    c2 = g3n_strdup(cfg);
    p = strstr(c2, "\"laurel_rank\": 8");
    G3N_ASSERT(p);
    p[15] = '9';
    d = make_dir("cfg-shape", c2, NULL, SIZE_MAX);
    model_bad(d, "laurel.linear_left.weight has shape [8, 64], config says [9, 64]");
    free(d);
    free(c2);
    free(cfg);
    d = make_dir("no-config", "{}", NULL, SIZE_MAX);
    char path[600];
    snprintf(path, sizeof path, "%s/config.json", d);
    unlink(path);
    model_bad(d, "config.json");
    snprintf(path, sizeof path, "%s/model.safetensors", d);
    unlink(path);
    free(d);
}

/* ---- quantized (mlx) checkpoints ---------------------------------------------------------- */

#define FIX_Q4 "tests/fixtures/tiny/mlx-q4"
static const char *Q_EDIT; /* tensor the edit functions below change */

static void edit_q_drop(cJSON *h, const char *name) { cJSON_DeleteItemFromObjectCaseSensitive(h, Q_EDIT); }
static void edit_q_dtype(cJSON *h, const char *name) {
    cJSON *t = cJSON_GetObjectItemCaseSensitive(h, Q_EDIT);
    const int weight = strstr(Q_EDIT, ".weight") != NULL; /* same element size: F32 for U32 */
    cJSON_ReplaceItemInObjectCaseSensitive(t, "dtype", cJSON_CreateString(weight ? "F32" : "I16"));
}
static void edit_q_shape(cJSON *h, const char *name) { /* same bytes: [64, 8] u32 read as [32, 16] */
    cJSON *t = cJSON_GetObjectItemCaseSensitive(h, Q_EDIT);
    cJSON *s = cJSON_CreateArray();
    cJSON_AddItemToArray(s, cJSON_CreateNumber(32));
    cJSON_AddItemToArray(s, cJSON_CreateNumber(16));
    cJSON_ReplaceItemInObjectCaseSensitive(t, "shape", s);
}

/* The q4 fixture's config.json with its "quantization" block changed by `edit`
 * (a JSON fragment replacing the block's text), as a heap string. */
static char *q4_config(const char *block) {
    size_t n;
    char *cfg = g3n_read_file(FIX_Q4 "/config.json", &n, 1 << 20, ERR, sizeof ERR);
    G3N_ASSERT(cfg);
    cJSON *j = cJSON_Parse(cfg);
    free(cfg);
    cJSON_DeleteItemFromObjectCaseSensitive(j, "quantization_config");
    cJSON_DeleteItemFromObjectCaseSensitive(j, "quantization");
    if (block) cJSON_AddItemToObject(j, "quantization", cJSON_Parse(block));
    char *out = cJSON_Print(j);
    cJSON_Delete(j);
    char *r = g3n_strdup(out);
    cJSON_free(out);
    return r;
}

/* Hostile quantization configs and files: each refused with one line naming the
 * field or tensor (under ASan/UBSan in make test too). */
TEST(quantized_bad) {
    const char *saved = FIX_CAUSAL;
    FIX_CAUSAL = FIX_Q4;
    g3n_model *m = g3n_model_open(FIX_Q4, NULL, ERR, sizeof ERR);
    CHECK_MSG(m != NULL, "%s", ERR);
    g3n_model_close(m);
    struct {
        const char *block, *want;
    } cfgs[] = {
        {"{\"group_size\": 32, \"bits\": 7}", "quantization.bits: 7 is not a bit width mlx produces"},
        {"{\"group_size\": 48, \"bits\": 4}", "quantization.group_size: 48 is not a group size"},
        {"{\"bits\": 4}", "quantization.group_size: missing"},
        {"{\"group_size\": 32, \"bits\": 4, \"mode\": \"mxfp4\"}", "only \"affine\""},
        {"{\"group_size\": 32, \"bits\": 4, \"language_model.model.layers.1.mlp.gate_proj\": {\"bits\": 9}}",
         "quantization.language_model.model.layers.1.mlp.gate_proj.bits: 9 is not a bit width"},
        {"{\"group_size\": 32, \"bits\": \"4\"}", "quantization.bits: expected an integer"},
        {"[4]", "quantization: expected an object"},
        {NULL, "has no \"quantization\" block"},
        /* valid but not what the files hold: every packed shape is checked */
        {"{\"group_size\": 32, \"bits\": 8}", "config says"},
        {"{\"group_size\": 64, \"bits\": 4}", "scales has shape"},
        {"{\"group_size\": 32, \"bits\": 4}", "gate_proj.weight has shape [520, 16], config says [520, 8]"},
    };
    for (size_t i = 0; i < sizeof cfgs / sizeof *cfgs; i++) {
        char *c = q4_config(cfgs[i].block), name[32];
        snprintf(name, sizeof name, "qcfg-%zu", i);
        char *d = make_dir(name, c, NULL, SIZE_MAX);
        model_bad(d, cfgs[i].want);
        free(d), free(c);
    }
    struct {
        const char *tensor;
        edit_fn edit;
        const char *want;
    } files[] = {
        {"language_model.model.layers.0.mlp.up_proj.biases", edit_q_drop,
         "missing tensor language_model.model.layers.0.mlp.up_proj.biases"},
        {"language_model.model.layers.0.mlp.up_proj.scales", edit_q_dtype,
         "language_model.model.layers.0.mlp.up_proj.scales has dtype I16"},
        {"language_model.model.layers.0.mlp.up_proj.weight", edit_q_dtype,
         "up_proj.weight has dtype F32 (quantized: expected U32)"},
        {"language_model.model.layers.0.self_attn.k_proj.weight", edit_q_shape,
         "k_proj.weight has shape [32, 16], config says [64, 8]"},
    };
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        char name[32];
        snprintf(name, sizeof name, "qfile-%zu", i);
        Q_EDIT = files[i].tensor;
        char *d = make_dir(name, NULL, files[i].edit, 0);
        model_bad(d, files[i].want);
        free(d);
    }
    FIX_CAUSAL = saved;
}

/* g3n quantize writes what tools/mlx_quantize.py (numpy) wrote: the same tensors
 * byte for byte, so they dequantize to the same values; and the result loads. */
static void quantize_matches(const char *fixture, int bits, int group) {
    char *out = g3n_strdup(tmp_path(fixture + strlen("tests/fixtures/tiny/")));
    int rc = g3n_quantize("tests/fixtures/tiny/mlx", out, bits, group, ERR, sizeof ERR);
    CHECK_MSG(rc == 0, "%s", ERR);
    safetensors *a = rc ? NULL : safetensors_open_dir(out, ERR, sizeof ERR);
    safetensors *b = safetensors_open_dir(fixture, ERR, sizeof ERR);
    CHECK(a && b);
    if (a && b) {
        CHECK(safetensors_count(a) == safetensors_count(b));
        int nq = 0;
        for (int i = 0; i < safetensors_count(b); i++) {
            const st_tensor *tb = safetensors_at(b, i), *ta = safetensors_find(a, tb->name);
            CHECK_MSG(ta != NULL, "%s: no %s", out, tb->name);
            if (!ta) continue;
            nq += ta->dtype == G3N_U32;
            CHECK_MSG(ta->dtype == tb->dtype && ta->nbytes == tb->nbytes && ta->ndim == tb->ndim &&
                          memcmp(ta->shape, tb->shape, sizeof ta->shape) == 0 &&
                          memcmp(ta->data, tb->data, ta->nbytes) == 0,
                      "%s: %s differs from %s", out, tb->name, fixture);
        }
        CHECK(nq > 70);
    }
    safetensors_close(a), safetensors_close(b);
    g3n_model *m = g3n_model_open(out, NULL, ERR, sizeof ERR);
    CHECK_MSG(m != NULL, "%s", ERR);
    g3n_model_close(m);
    /* a quantized checkpoint, bad widths, a missing source: refused */
    CHECK(g3n_quantize(out, tmp_path("again"), bits, group, ERR, sizeof ERR) != 0 && strstr(ERR, "already quantized"));
    CHECK(g3n_quantize("tests/fixtures/tiny/mlx", tmp_path("x"), 7, 64, ERR, sizeof ERR) != 0 && strstr(ERR, "--bits 7"));
    CHECK(g3n_quantize("tests/fixtures/tiny/mlx", tmp_path("x"), 4, 16, ERR, sizeof ERR) != 0 &&
          strstr(ERR, "--group-size 16"));
    CHECK(g3n_quantize(tmp_path("none"), tmp_path("x"), 4, 64, ERR, sizeof ERR) != 0 && strstr(ERR, "none"));
    free(out);
}

TEST(quantize_cli_equals_numpy) {
    quantize_matches("tests/fixtures/tiny/mlx-q8", 8, 64);
    quantize_matches("tests/fixtures/tiny/mlx-q3", 3, 32);
}

/* The 8-bit fixture dequantizes to within a step of the f16 weights it came from. */
TEST(quantized_near_source) {
    safetensors *q = safetensors_open_dir("tests/fixtures/tiny/mlx-q8", ERR, sizeof ERR);
    safetensors *f = safetensors_open_dir("tests/fixtures/tiny/mlx", ERR, sizeof ERR);
    CHECK(q && f);
    for (int i = 0; q && f && i < safetensors_count(q); i++) {
        const st_tensor *t = safetensors_at(q, i);
        if (t->dtype != G3N_U32) continue;
        char mod[300];
        snprintf(mod, sizeof mod, "%.*s.scales", (int)strlen(t->name) - 7, t->name);
        const st_tensor *s = safetensors_find(q, mod), *w = safetensors_find(f, t->name);
        snprintf(mod, sizeof mod, "%.*s.biases", (int)strlen(t->name) - 7, t->name);
        const st_tensor *bb = safetensors_find(q, mod);
        CHECK(s && bb && w && w->dtype == G3N_F16);
        if (!s || !bb || !w) continue;
        const int rows = (int)w->shape[0], cols = (int)w->shape[1], ng = (int)s->shape[1], gs = cols / ng;
        float *d = malloc(sizeof(float) * cols);
        int bad = 0;
        for (int r = 0; r < rows; r++) {
            g3n_dequant_row((const uint32_t *)t->data + (size_t)r * cols / 4, (const uint16_t *)s->data + (size_t)r * ng,
                            (const uint16_t *)bb->data + (size_t)r * ng, G3N_F16, 8, gs, cols, d);
            for (int c = 0; c < cols; c++) {
                float src = g3n_f16_to_f32(((const uint16_t *)w->data)[(size_t)r * cols + c]);
                float sc = fabsf(g3n_f16_to_f32(((const uint16_t *)s->data)[(size_t)r * ng + c / gs]));
                uint32_t qv = g3n_quant_get((const uint32_t *)t->data + (size_t)r * cols / 4, 8, c);
                if (qv != 0 && qv != 255 && !(fabsf(d[c] - src) <= sc + 1e-3f * fabsf(src))) bad++;
            }
        }
        CHECK_MSG(bad == 0, "%s: %d values more than a step from the source", t->name, bad);
        free(d);
    }
    safetensors_close(q), safetensors_close(f);
}

static void rm_rf(const char *dir) {
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) printf("  (could not remove %s)\n", dir);
}

int main(int argc, char **argv) {
    test_init(argc, argv);
    snprintf(TMP, sizeof TMP, "/tmp/g3n-test-load-XXXXXX");
    if (!mkdtemp(TMP)) {
        printf("cannot make a temporary directory\n");
        return 1;
    }
    RUN(safetensors_valid);
    RUN(safetensors_malformed);
    RUN(safetensors_index);
    RUN(config_forms);
    RUN(config_errors);
    RUN(model_dirs);
    RUN(quantized_bad);
    RUN(quantize_cli_equals_numpy);
    RUN(quantized_near_source);
    rm_rf(TMP);
    return test_summary();
}
