/* config.c: config.json -> g3n_config, validated, with messages that name the field.
 *
 * Accepts both published forms: nested ("model_type": "gemma3n" with
 * "text_config") and flat ("model_type": "gemma3n_text"); rope bases as legacy
 * rope_theta / rope_local_base_freq or transformers-5 rope_parameters per layer
 * type; intermediate_size as a number or a per-layer list. It derives the
 * per-layer tables (K/V source, sparsity multiplier) and nothing else. */
#include <cjson/cJSON.h>
#include <math.h>

#include "model/gemma3n.h"
#include "quant.h"

typedef struct {
    const char *path;   /* file, for messages */
    const char *prefix; /* "text_config." or "" */
    char *err;
    size_t errlen;
} cfg_ctx;

static int field_err(cfg_ctx *c, const char *field, const char *what) {
    return g3n_err(c->err, c->errlen, "%s: %s%s: %s", c->path, c->prefix, field, what);
}

/* Integer field in [lo, hi]. Missing: default *out kept if !required. */
static int get_int(cfg_ctx *c, const cJSON *o, const char *field, int required, long lo, long hi,
                   int *out) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, field);
    if (!j || cJSON_IsNull(j)) return required ? field_err(c, field, "missing") : 0;
    if (!cJSON_IsNumber(j)) return field_err(c, field, "expected an integer");
    double d = j->valuedouble;
    if (d != floor(d) || d < (double)lo || d > (double)hi) {
        char msg[128];
        snprintf(msg, sizeof msg, "%g is not an integer in [%ld, %ld]", d, lo, hi);
        return field_err(c, field, msg);
    }
    *out = (int)d;
    return 0;
}

static int get_num(cfg_ctx *c, const cJSON *o, const char *field, int required, double lo,
                   double hi, float *out) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, field);
    if (!j || cJSON_IsNull(j)) return required ? field_err(c, field, "missing") : 0;
    if (!cJSON_IsNumber(j)) return field_err(c, field, "expected a number");
    double d = j->valuedouble;
    if (!(d >= lo && d <= hi)) {
        char msg[128];
        snprintf(msg, sizeof msg, "%g is outside [%g, %g]", d, lo, hi);
        return field_err(c, field, msg);
    }
    *out = (float)d;
    return 0;
}

/* Phi^-1(p) as torch computes Normal(0,1).icdf on an fp32 tensor: the argument is
 * rounded to fp32 first; the result is rounded to fp32 (erfinv in double here,
 * so it can differ from torch's fp32 erfinv by an ulp). */
static float normal_icdf(float p) {
    double y = (double)(2.0f * p - 1.0f); /* |y| < 1 */
    /* erfinv by Newton iterations on erf, from a log-based first guess */
    const double pi = 3.14159265358979323846, a = 0.147;
    double w = -log((1.0 - y) * (1.0 + y));
    double t1 = 2.0 / (pi * a) - w / 2;
    double x = copysign(sqrt(sqrt(t1 * t1 + w / a) - t1), y);
    for (int i = 0; i < 8; i++) {
        double e = erf(x) - y;
        x -= e / (2.0 / sqrt(pi) * exp(-x * x));
    }
    return (float)(x * sqrt(2.0));
}

/* JSON allows repeated keys; Python keeps the last, cJSON finds the first. */
static const char *duplicate_key(const cJSON *o) {
    for (const cJSON *a = o->child; a; a = a->next)
        for (const cJSON *b = a->next; b; b = b->next)
            if (a->string && b->string && strcmp(a->string, b->string) == 0) return a->string;
    return NULL;
}

static int parse_text(cfg_ctx *c, g3n_config *g, const cJSON *t) {
    int rc = 0;
    const char *dup = duplicate_key(t);
    if (dup) return field_err(c, dup, "appears twice");
    rc |= get_int(c, t, "vocab_size", 1, 1, 1 << 24, &g->n_vocab);
    if (!rc) rc |= get_int(c, t, "vocab_size_per_layer_input", 1, 1, 1 << 24, &g->n_vocab_ple);
    if (!rc) rc |= get_int(c, t, "hidden_size", 1, 1, 65536, &g->n_embd);
    if (!rc) rc |= get_int(c, t, "num_hidden_layers", 1, 1, G3N_MAX_LAYERS, &g->n_layer);
    if (!rc) rc |= get_int(c, t, "num_attention_heads", 1, 1, 1024, &g->n_head);
    if (!rc) rc |= get_int(c, t, "num_key_value_heads", 1, 1, 1024, &g->n_head_kv);
    if (!rc) rc |= get_int(c, t, "head_dim", 1, 2, 4096, &g->head_dim);
    if (!rc) rc |= get_int(c, t, "hidden_size_per_layer_input", 1, 1, 65536, &g->n_ple);
    if (!rc) rc |= get_int(c, t, "laurel_rank", 1, 1, 65536, &g->laurel_rank);
    g->n_altup = 4;
    if (!rc) rc |= get_int(c, t, "altup_num_inputs", 0, 2, G3N_MAX_ALTUP, &g->n_altup);
    int active = 0;
    if (!rc) rc |= get_int(c, t, "altup_active_idx", 0, 0, G3N_MAX_ALTUP, &active);
    if (!rc && active != 0) rc = field_err(c, "altup_active_idx", "only 0 is supported");
    if (!rc) rc |= get_int(c, t, "num_kv_shared_layers", 1, 0, G3N_MAX_LAYERS, &g->n_kv_shared);
    g->sliding_window = 512;
    if (!rc) rc |= get_int(c, t, "sliding_window", 1, 1, 1 << 24, &g->sliding_window);
    g->n_ctx_max = 32768;
    if (!rc) rc |= get_int(c, t, "max_position_embeddings", 0, 1, 1 << 24, &g->n_ctx_max);
    g->rms_eps = 1e-6f;
    if (!rc) rc |= get_num(c, t, "rms_norm_eps", 0, 0, 1, &g->rms_eps);
    g->final_softcap = 0;
    if (!rc) rc |= get_num(c, t, "final_logit_softcapping", 0, 0, 1e9, &g->final_softcap);
    g->altup_coef_clip = 0;
    if (!rc) rc |= get_num(c, t, "altup_coef_clip", 0, 0, 1e30, &g->altup_coef_clip);
    if (rc) return -1;

    if (g->head_dim % 2) return field_err(c, "head_dim", "must be even (RoPE rotates halves)");
    if (g->n_head % g->n_head_kv)
        return field_err(c, "num_key_value_heads", "must divide num_attention_heads");
    if (g->n_kv_shared >= g->n_layer)
        return field_err(c, "num_kv_shared_layers", "must be less than num_hidden_layers");
    if (g->n_vocab_ple > g->n_vocab)
        return field_err(c, "vocab_size_per_layer_input", "exceeds vocab_size");

    const cJSON *j = cJSON_GetObjectItemCaseSensitive(t, "altup_correct_scale");
    g->altup_correct_scale = 1;
    if (j && !cJSON_IsNull(j)) {
        if (!cJSON_IsBool(j)) return field_err(c, "altup_correct_scale", "expected true or false");
        g->altup_correct_scale = cJSON_IsTrue(j);
    }
    j = cJSON_GetObjectItemCaseSensitive(t, "hidden_activation");
    if (j && !cJSON_IsNull(j)) {
        if (!cJSON_IsString(j)) return field_err(c, "hidden_activation", "expected a string");
        if (strcmp(j->valuestring, "gelu_pytorch_tanh") != 0)
            return field_err(c, "hidden_activation", "only \"gelu_pytorch_tanh\" is supported");
    }
    j = cJSON_GetObjectItemCaseSensitive(t, "tie_word_embeddings");
    if (j && cJSON_IsFalse(j))
        return field_err(c, "tie_word_embeddings", "untied LM heads are not supported");
    j = cJSON_GetObjectItemCaseSensitive(t, "attention_bias");
    if (j && cJSON_IsTrue(j)) return field_err(c, "attention_bias", "biases are not supported");

    /* intermediate_size: number or per-layer list */
    j = cJSON_GetObjectItemCaseSensitive(t, "intermediate_size");
    if (!j) return field_err(c, "intermediate_size", "missing");
    if (cJSON_IsArray(j)) {
        if (cJSON_GetArraySize(j) != g->n_layer)
            return field_err(c, "intermediate_size", "list length differs from num_hidden_layers");
        int l = 0;
        for (const cJSON *e = j->child; e; e = e->next, l++) {
            if (!cJSON_IsNumber(e) || e->valuedouble != floor(e->valuedouble) ||
                e->valuedouble < 1 || e->valuedouble > (1 << 22))
                return field_err(c, "intermediate_size", "list holds a non-integer or bad value");
            g->n_ff[l] = (int)e->valuedouble;
        }
    } else {
        int v;
        if (get_int(c, t, "intermediate_size", 1, 1, 1 << 22, &v)) return -1;
        for (int l = 0; l < g->n_layer; l++) g->n_ff[l] = v;
    }

    /* layer_types: list of "sliding_attention" / "full_attention"; absent means
     * transformers' default (every 5th layer full). */
    j = cJSON_GetObjectItemCaseSensitive(t, "layer_types");
    if (j && !cJSON_IsNull(j)) {
        if (!cJSON_IsArray(j) || cJSON_GetArraySize(j) != g->n_layer)
            return field_err(c, "layer_types", "expected a list with one entry per layer");
        int l = 0;
        for (const cJSON *e = j->child; e; e = e->next, l++) {
            if (cJSON_IsString(e) && strcmp(e->valuestring, "sliding_attention") == 0)
                g->is_sliding[l] = 1;
            else if (cJSON_IsString(e) && strcmp(e->valuestring, "full_attention") == 0)
                g->is_sliding[l] = 0;
            else
                return field_err(c, "layer_types",
                                 "entries must be \"sliding_attention\" or \"full_attention\"");
        }
    } else {
        for (int l = 0; l < g->n_layer; l++) g->is_sliding[l] = (l + 1) % 5 != 0;
    }

    /* activation_sparsity_pattern: number or list; absent means transformers'
     * default (the first 10 layers at 0.95 when there are more than 10). */
    j = cJSON_GetObjectItemCaseSensitive(t, "activation_sparsity_pattern");
    if (j && !cJSON_IsNull(j)) {
        if (cJSON_IsNumber(j)) {
            for (int l = 0; l < g->n_layer; l++) g->sparsity[l] = (float)j->valuedouble;
        } else if (cJSON_IsArray(j) && cJSON_GetArraySize(j) == g->n_layer) {
            int l = 0;
            for (const cJSON *e = j->child; e; e = e->next, l++) {
                if (!cJSON_IsNumber(e))
                    return field_err(c, "activation_sparsity_pattern", "holds a non-number");
                g->sparsity[l] = (float)e->valuedouble;
            }
        } else {
            return field_err(c, "activation_sparsity_pattern",
                             "expected a number or a list with one entry per layer");
        }
    } else {
        int ns = g->n_layer > 10 ? 10 : 0;
        for (int l = 0; l < g->n_layer; l++) g->sparsity[l] = l < ns ? 0.95f : 0.0f;
    }
    for (int l = 0; l < g->n_layer; l++) {
        if (!(g->sparsity[l] >= 0 && g->sparsity[l] < 1))
            return field_err(c, "activation_sparsity_pattern", "entries must be in [0, 1)");
        g->kappa[l] = g->sparsity[l] > 0 ? normal_icdf(g->sparsity[l]) : 0;
    }

    /* RoPE bases */
    g->rope_theta_full = 1e6f;
    g->rope_theta_sliding = 1e4f;
    const cJSON *rp = cJSON_GetObjectItemCaseSensitive(t, "rope_parameters");
    if (rp && !cJSON_IsNull(rp)) {
        if (!cJSON_IsObject(rp)) return field_err(c, "rope_parameters", "expected an object");
        const char *kinds[2] = {"full_attention", "sliding_attention"};
        float *dst[2] = {&g->rope_theta_full, &g->rope_theta_sliding};
        for (int k = 0; k < 2; k++) {
            const cJSON *o = cJSON_GetObjectItemCaseSensitive(rp, kinds[k]);
            if (!o) continue;
            char name[96];
            snprintf(name, sizeof name, "rope_parameters.%s.rope_theta", kinds[k]);
            const cJSON *th = cJSON_GetObjectItemCaseSensitive(o, "rope_theta");
            if (!cJSON_IsObject(o) || !cJSON_IsNumber(th) || !(th->valuedouble > 0))
                return field_err(c, name, "missing or not a positive number");
            *dst[k] = (float)th->valuedouble;
            const cJSON *ty = cJSON_GetObjectItemCaseSensitive(o, "rope_type");
            if (ty && !(cJSON_IsString(ty) && strcmp(ty->valuestring, "default") == 0)) {
                snprintf(name, sizeof name, "rope_parameters.%s.rope_type", kinds[k]);
                return field_err(c, name, "only \"default\" RoPE is supported");
            }
        }
    } else {
        if (get_num(c, t, "rope_theta", 0, 1e-3, 1e30, &g->rope_theta_full)) return -1;
        if (get_num(c, t, "rope_local_base_freq", 0, 1e-3, 1e30, &g->rope_theta_sliding)) return -1;
        const cJSON *rs = cJSON_GetObjectItemCaseSensitive(t, "rope_scaling");
        if (rs && !cJSON_IsNull(rs)) {
            const cJSON *ty = cJSON_GetObjectItemCaseSensitive(rs, "rope_type");
            if (!(cJSON_IsString(ty) && strcmp(ty->valuestring, "default") == 0))
                return field_err(c, "rope_scaling", "only default RoPE (no scaling) is supported");
        }
    }

    /* token ids (optional) */
    g->bos_id = g->eos_id = g->pad_id = -1;
    get_int(c, t, "bos_token_id", 0, 0, g->n_vocab - 1, &g->bos_id);
    get_int(c, t, "pad_token_id", 0, 0, g->n_vocab - 1, &g->pad_id);
    j = cJSON_GetObjectItemCaseSensitive(t, "eos_token_id");
    if (cJSON_IsArray(j) && j->child && cJSON_IsNumber(j->child)) g->eos_id = (int)j->child->valuedouble;
    else if (cJSON_IsNumber(j)) g->eos_id = (int)j->valuedouble;

    /* KV sharing: a shared layer reads the last non-shared layer of its type */
    g->first_shared = g->n_layer - g->n_kv_shared;
    for (int l = 0; l < g->n_layer; l++) {
        g->kv_source[l] = l;
        if (l < g->first_shared) continue;
        int src = -1;
        for (int k = 0; k < g->first_shared; k++)
            if (g->is_sliding[k] == g->is_sliding[l]) src = k;
        if (src < 0)
            return field_err(c, "num_kv_shared_layers",
                             "a shared layer has no earlier layer of its type to share K/V with");
        g->kv_source[l] = src;
    }
    return 0;
}

int config_parse(g3n_config *g, const char *json, size_t len, const char *path, char *err,
                 size_t errlen) {
    memset(g, 0, sizeof(*g));
    cfg_ctx c = {path, "", err, errlen};
    cJSON *root = cJSON_ParseWithLength(json, len);
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return g3n_err(err, errlen, "%s: not valid JSON (truncated or malformed)", path);
    }
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(root, "model_type");
    const cJSON *tc = cJSON_GetObjectItemCaseSensitive(root, "text_config");
    const cJSON *t = root;
    int rc = 0;
    if (!cJSON_IsString(mt)) {
        rc = g3n_err(err, errlen, "%s: model_type: missing (expected \"gemma3n\" or \"gemma3n_text\")", path);
    } else if (strcmp(mt->valuestring, "gemma3n") == 0) {
        if (!cJSON_IsObject(tc))
            rc = g3n_err(err, errlen, "%s: text_config: missing (model_type \"gemma3n\" nests it)", path);
        t = tc;
        c.prefix = "text_config.";
    } else if (strcmp(mt->valuestring, "gemma3n_text") != 0) {
        rc = g3n_err(err, errlen, "%s: model_type: \"%.40s\" is not a Gemma 3n model", path,
                     mt->valuestring);
    }
    if (!rc) rc = parse_text(&c, g, t);
    cJSON_Delete(root);
    return rc;
}

/* ---- quantization (mlx) --------------------------------------------------------------- */

static int quant_params(cfg_ctx *c, const cJSON *o, int *bits, int *group) {
    if (get_int(c, o, "bits", 0, 0, 64, bits) || get_int(c, o, "group_size", 0, 0, 1 << 20, group))
        return -1;
    if (!g3n_quant_bits_ok(*bits)) {
        char msg[96];
        snprintf(msg, sizeof msg, "%d is not a bit width mlx produces (2, 3, 4, 5, 6 or 8)", *bits);
        return field_err(c, "bits", msg);
    }
    if (!g3n_quant_group_ok(*group)) {
        char msg[96];
        snprintf(msg, sizeof msg, "%d is not a group size mlx produces (32, 64 or 128)", *group);
        return field_err(c, "group_size", msg);
    }
    return 0;
}

int quant_config_parse(g3n_quant_config *q, const char *json, size_t len, const char *path,
                       char *err, size_t errlen) {
    memset(q, 0, sizeof(*q));
    cfg_ctx c = {path, "quantization.", err, errlen};
    cJSON *root = cJSON_ParseWithLength(json, len);
    if (!root) return g3n_err(err, errlen, "%s: not valid JSON (truncated or malformed)", path);
    const cJSON *b = cJSON_GetObjectItemCaseSensitive(root, "quantization");
    if (!b || cJSON_IsNull(b)) { /* transformers-style copy mlx-lm also writes */
        const cJSON *qc = cJSON_GetObjectItemCaseSensitive(root, "quantization_config");
        if (cJSON_IsObject(qc) && cJSON_GetObjectItemCaseSensitive(qc, "bits")) {
            b = qc;
            c.prefix = "quantization_config.";
        } else {
            b = NULL;
        }
    }
    int rc = 0;
    if (!b) goto done;
    if (!cJSON_IsObject(b)) {
        rc = g3n_err(err, errlen, "%s: quantization: expected an object", path);
        goto done;
    }
    const char *dup = duplicate_key(b);
    if (dup) {
        rc = field_err(&c, dup, "appears twice");
        goto done;
    }
    const cJSON *mode = cJSON_GetObjectItemCaseSensitive(b, "mode");
    if (mode && !(cJSON_IsString(mode) && strcmp(mode->valuestring, "affine") == 0)) {
        rc = field_err(&c, "mode", "only \"affine\" quantization is supported");
        goto done;
    }
    if (!cJSON_GetObjectItemCaseSensitive(b, "bits") || !cJSON_GetObjectItemCaseSensitive(b, "group_size")) {
        rc = field_err(&c, cJSON_GetObjectItemCaseSensitive(b, "bits") ? "group_size" : "bits", "missing");
        goto done;
    }
    rc = quant_params(&c, b, &q->bits, &q->group);
    for (const cJSON *e = b->child; e && !rc; e = e->next) {
        if (!cJSON_IsObject(e)) continue; /* bits, group_size, mode; per-module true/false */
        char prefix[320];
        snprintf(prefix, sizeof prefix, "%s%.200s.", c.prefix, e->string);
        cfg_ctx ce = {path, prefix, err, errlen};
        g3n_quant_override o = {NULL, q->bits, q->group};
        rc = quant_params(&ce, e, &o.bits, &o.group);
        if (rc) break;
        q->over = realloc(q->over, sizeof(*q->over) * (size_t)(q->n_over + 1));
        if (!q->over) abort();
        o.path = g3n_strdup(e->string);
        q->over[q->n_over++] = o;
    }
done:
    cJSON_Delete(root);
    if (rc) quant_config_free(q);
    return rc;
}

void quant_config_free(g3n_quant_config *q) {
    for (int i = 0; i < q->n_over; i++) free(q->over[i].path);
    free(q->over);
    memset(q, 0, sizeof(*q));
}
