/* gemma3n.h: the Gemma 3n text decoder as data: its configuration (from
 * config.json), its weights (a table of contents, one named field per tensor
 * with its shape) and the model object that ties them to a backend.
 *
 * Shapes are written [out, in] as stored (PyTorch layout). D = hidden_size,
 * L = num_hidden_layers, I_l = intermediate_size[l], Hq/Hkv heads of head_dim hd,
 * P = hidden_size_per_layer_input, R = laurel_rank, A = altup_num_inputs (4),
 * V = vocab_size, Vp = vocab_size_per_layer_input. See docs/MODEL.md. */
#ifndef G3N_GEMMA3N_H
#define G3N_GEMMA3N_H

#include "backend/backend.h"
#include "common.h"
#include "g3n.h"
#include "safetensors.h"

#define G3N_MAX_LAYERS 128
#define G3N_MAX_ALTUP 8

typedef struct {
    int n_vocab;       /* vocab_size V: rows of embed_tokens and of the logits */
    int n_vocab_ple;   /* vocab_size_per_layer_input Vp: rows of the PLE table */
    int n_embd;        /* hidden_size D */
    int n_layer;       /* num_hidden_layers L */
    int n_head;        /* num_attention_heads */
    int n_head_kv;     /* num_key_value_heads */
    int head_dim;      /* hd */
    int n_ple;         /* hidden_size_per_layer_input P */
    int laurel_rank;   /* R */
    int n_altup;       /* altup_num_inputs A */
    int n_ff[G3N_MAX_LAYERS];         /* intermediate_size per layer */
    int is_sliding[G3N_MAX_LAYERS];   /* layer_types[l] == "sliding_attention" */
    float sparsity[G3N_MAX_LAYERS];   /* activation_sparsity_pattern[l] (0 = dense) */
    float kappa[G3N_MAX_LAYERS];      /* std multiplier Phi^-1(sparsity[l]) (fp32) */
    int kv_source[G3N_MAX_LAYERS];    /* layer whose K/V cache layer l attends to */
    int n_kv_shared;   /* num_kv_shared_layers */
    int first_shared;  /* L - n_kv_shared */
    int sliding_window;
    int n_ctx_max;     /* max_position_embeddings */
    float rope_theta_full, rope_theta_sliding;
    float rms_eps;
    float final_softcap;  /* 0 = none */
    float altup_coef_clip; /* 0 = none */
    int altup_correct_scale;
    int bos_id, eos_id, pad_id;
} g3n_config;

/* Parse config.json text (nested "text_config" or flat). `path` names the file in
 * messages. Returns 0, or -1 with err naming the field. */
int config_parse(g3n_config *c, const char *json, size_t len, const char *path, char *err,
                 size_t errlen);

/* config.json's "quantization" block (mlx; "quantization_config" where only
 * that is written): the default bits and group size, and per-module overrides
 * keyed by module path ("language_model.model.layers.0.mlp.down_proj"). Whether
 * a module is quantized is decided by its .scales tensor, not by this. */
typedef struct {
    char *path;
    int bits, group;
} g3n_quant_override;

typedef struct {
    int bits, group; /* 0: no quantization block */
    g3n_quant_override *over;
    int n_over;
} g3n_quant_config;

/* Parse the block from config.json text; 0, or -1 with err naming the field.
 * Accepts only mode "affine", bits 2-6 or 8 and group sizes 32, 64, 128. */
int quant_config_parse(g3n_quant_config *q, const char *json, size_t len, const char *path,
                       char *err, size_t errlen);
void quant_config_free(g3n_quant_config *q);

/* Per-layer weights. Matrices are backend tensors (stored dtype); vectors are
 * converted to f32 at load (they are small) and live in the backend too. */
typedef struct {
    g3n_vec input_layernorm;          /* [D] */
    g3n_mat q_proj;                   /* [Hq*hd, D] */
    g3n_mat k_proj, v_proj;           /* [Hkv*hd, D]; absent (no data) in shared layers */
    g3n_mat o_proj;                   /* [D, Hq*hd] */
    g3n_vec q_norm, k_norm;           /* [hd] */
    g3n_vec post_attention_layernorm; /* [D] */
    g3n_vec pre_feedforward_layernorm;  /* [D] */
    g3n_mat gate_proj, up_proj;       /* [I_l, D] */
    g3n_mat down_proj;                /* [D, I_l] */
    g3n_vec post_feedforward_layernorm; /* [D] */
    g3n_vec altup_correct_output_scale; /* [D] */
    g3n_vec altup_correction_coefs;   /* [A, A] as f32, row-major */
    g3n_vec altup_prediction_coefs;   /* [A*A, A] as f32, row-major */
    g3n_mat altup_router;             /* modality_router [A, D] */
    g3n_vec altup_router_norm;        /* [D] */
    g3n_mat laurel_left;              /* [R, D] */
    g3n_mat laurel_right;             /* [D, R] */
    g3n_vec post_laurel_norm;         /* [D] */
    g3n_mat per_layer_input_gate;     /* [P, D] */
    g3n_mat per_layer_projection;     /* [D, P] */
    g3n_vec post_per_layer_input_norm; /* [D] */
} g3n_layer_weights;

typedef struct {
    g3n_mat embed_tokens;            /* [V, D]; also the LM head (tied) */
    g3n_mat embed_tokens_per_layer;  /* [Vp, L*P], layer-major rows */
    g3n_mat per_layer_model_projection; /* [L*P, D] */
    g3n_vec per_layer_projection_norm;  /* [P] */
    g3n_mat altup_projections[G3N_MAX_ALTUP - 1];         /* A-1 x [D, D] */
    g3n_mat altup_unembed_projections[G3N_MAX_ALTUP - 1]; /* A-1 x [D, D] */
    g3n_vec norm;                    /* [D] final norm */
    g3n_layer_weights *layers;       /* [L] */
} g3n_weights;

struct g3n_model {
    g3n_config cfg;
    g3n_quant_config quant;
    g3n_weights w;
    safetensors *st;
    g3n_backend *be;
    const char *layout;  /* "conditional (model.language_model.*)", ... */
    char *dir;
    size_t weight_bytes; /* text weights as stored */
    size_t decode_bytes; /* weights read per decoded token (dense) */
    size_t decode_bytes_sparse; /* the same with exact sparsity, expected; 0 when off */
    void **owned;        /* backend allocations made by the loader (vectors) */
    int fused;           /* decode path (forward.c): FWD_SPLIT, FWD_FUSED or FWD_MEGA */
    g3n_dec_model dec;   /* the layers as the backend's decode_layers sees them */
    int mega_ok;         /* the backend takes this model whole (decode_layers) */
    int prune_rows;      /* steps of up to this many logits rows (0: none) read the best logits
                            (greedy, top-k) through the backend's cheaper copy of the LM head
                            (unembed_prepare, logits_pruned; forward.c unembed) */
    size_t decode_bytes_greedy; /* decode_bytes(_sparse) with that copy read instead of the LM head; 0: not */
    int sparse;          /* fused path: exact sparsity in the top-k layers */
    int kv_f16;          /* K/V caches in f16 (g3n_model_params.kv_type) */
    int no_l2_hints;     /* fused path: the backend's L2 prefetch hints left out (decode path "fused-nol2") */
    char path_why[256];  /* how the decode path was chosen */
    int n_owned;
};

/* Bytes of one K/V cache element, and of the keys and values of `keys`
 * positions of one layer (what attention reads over them) */
static inline size_t model_kv_esz(const g3n_model *m) { return m->kv_f16 ? 2 : sizeof(float); }
static inline size_t model_kv_bytes(const g3n_model *m, size_t keys) {
    return keys * 2 * (size_t)m->cfg.n_head_kv * (size_t)m->cfg.head_dim * model_kv_esz(m);
}

/* Resolve every tensor of `m->st` for the config in `m->cfg`, check shapes and
 * dtypes, and hand them to the backend. 0, or -1 with err naming the tensor. */
int load_weights(g3n_model *m, char *err, size_t errlen);

#endif
