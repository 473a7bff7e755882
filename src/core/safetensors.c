/* safetensors.c: mmap + validate safetensors files and shard indexes.
 *
 * Every number in a header is untrusted: lengths, offsets and shapes are checked
 * with overflow-safe arithmetic before anything points into the mapping. It does
 * not interpret tensor names or convert data. */
#define _POSIX_C_SOURCE 200809L
#include "safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define ST_MAX_HEADER (100u << 20) /* the reference implementation's limit */
#define ST_MAX_INDEX (64u << 20)

typedef struct {
    char *path;
    void *map;
    size_t size;
    size_t data_start; /* 8 + header length */
} st_file;

struct safetensors {
    st_file *files;
    int n_files;
    st_tensor *tensors;
    int n_tensors, cap_tensors;
    char **names; /* owned copies; tensors[i].name points here */
    int *table;   /* open addressing: index into tensors, -1 empty */
    size_t table_cap;
};

static uint64_t hash_str(const char *s) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

static const struct {
    const char *name;
    int size;
    int dtype;
} st_dtypes[] = {
    {"BF16", 2, G3N_BF16}, {"F16", 2, G3N_F16},   {"F32", 4, G3N_F32},  {"U32", 4, G3N_U32},
    {"F64", 8, -1},        {"I64", 8, -1},        {"U64", 8, -1},       {"I32", 4, -1},
    {"I16", 2, -1},        {"U16", 2, -1},        {"I8", 1, -1},        {"U8", 1, -1},
    {"BOOL", 1, -1},       {"F8_E4M3", 1, -1},    {"F8_E5M2", 1, -1},
};

/* A JSON number that is a non-negative integer no larger than max. */
static int json_uint(const cJSON *j, uint64_t max, uint64_t *out) {
    if (!cJSON_IsNumber(j)) return 0;
    double d = j->valuedouble;
    if (!(d >= 0) || d > (double)max || d != floor(d)) return 0;
    *out = (uint64_t)d;
    return 1;
}

static void st_add(safetensors *st, const st_tensor *t) {
    if (st->n_tensors == st->cap_tensors) {
        st->cap_tensors = st->cap_tensors ? st->cap_tensors * 2 : 256;
        st->tensors = realloc(st->tensors, (size_t)st->cap_tensors * sizeof(st_tensor));
        st->names = realloc(st->names, (size_t)st->cap_tensors * sizeof(char *));
        if (!st->tensors || !st->names) {
            fprintf(stderr, "g3n: out of memory\n");
            abort();
        }
    }
    st->tensors[st->n_tensors++] = *t;
}

static int cmp_offset(const void *a, const void *b) {
    const st_tensor *x = *(const st_tensor *const *)a, *y = *(const st_tensor *const *)b;
    uintptr_t p = (uintptr_t)x->data, q = (uintptr_t)y->data;
    return p < q ? -1 : p > q ? 1 : 0;
}

/* Map one file and append its tensors. Returns 0, or -1 with err set. */
static int st_load_file(safetensors *st, const char *path, char *err, size_t errlen) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return g3n_err(err, errlen, "%s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return g3n_err(err, errlen, "%s: not a regular file", path);
    }
    size_t size = (size_t)sb.st_size;
    if (size < 8) {
        close(fd);
        return g3n_err(err, errlen, "%s: truncated safetensors file (%zu bytes, no header)",
                       path, size);
    }
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return g3n_err(err, errlen, "%s: mmap failed: %s", path, strerror(errno));

    int fi = st->n_files++;
    st->files = realloc(st->files, (size_t)st->n_files * sizeof(st_file));
    if (!st->files) abort();
    st->files[fi] = (st_file){g3n_strdup(path), map, size, 0};

    const unsigned char *b = map;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | b[i];
    if (hlen > ST_MAX_HEADER)
        return g3n_err(err, errlen, "%s: header length %llu exceeds the %u-byte limit", path,
                       (unsigned long long)hlen, ST_MAX_HEADER);
    if (hlen > size - 8)
        return g3n_err(err, errlen,
                       "%s: truncated: header length %llu but only %zu bytes follow", path,
                       (unsigned long long)hlen, size - 8);
    size_t data_start = 8 + (size_t)hlen;
    size_t data_size = size - data_start;
    st->files[fi].data_start = data_start;

    cJSON *root = cJSON_ParseWithLength((const char *)b + 8, (size_t)hlen);
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return g3n_err(err, errlen, "%s: header is not a JSON object", path);
    }
    int first = st->n_tensors;
    int rc = 0;
    for (cJSON *e = root->child; e; e = e->next) {
        const char *name = e->string;
        if (!name) continue;
        if (strcmp(name, "__metadata__") == 0) continue;
        if (!cJSON_IsObject(e)) {
            rc = g3n_err(err, errlen, "%s: tensor %s: entry is not an object", path, name);
            break;
        }
        const cJSON *jd = cJSON_GetObjectItemCaseSensitive(e, "dtype");
        const cJSON *js = cJSON_GetObjectItemCaseSensitive(e, "shape");
        const cJSON *jo = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
        if (!cJSON_IsString(jd) || !cJSON_IsArray(js) || !cJSON_IsArray(jo)) {
            rc = g3n_err(err, errlen, "%s: tensor %s: needs dtype, shape and data_offsets", path,
                         name);
            break;
        }
        st_tensor t = {0};
        t.dtype = -2;
        int esize = 0;
        for (size_t k = 0; k < sizeof(st_dtypes) / sizeof(st_dtypes[0]); k++) {
            if (strcmp(jd->valuestring, st_dtypes[k].name) == 0) {
                t.dtype = st_dtypes[k].dtype;
                t.dtype_name = st_dtypes[k].name;
                esize = st_dtypes[k].size;
            }
        }
        if (t.dtype == -2) {
            rc = g3n_err(err, errlen, "%s: tensor %s: unknown dtype \"%.32s\"", path, name,
                         jd->valuestring);
            break;
        }
        int nd = cJSON_GetArraySize(js);
        if (nd > ST_MAX_DIMS) {
            rc = g3n_err(err, errlen, "%s: tensor %s: %d dimensions (at most %d)", path, name, nd,
                         ST_MAX_DIMS);
            break;
        }
        t.ndim = nd;
        int ok = 1;
        size_t numel = 1;
        int k = 0;
        for (const cJSON *d = js->child; d; d = d->next, k++) {
            uint64_t v;
            if (!json_uint(d, (uint64_t)1 << 48, &v)) {
                ok = 0;
                break;
            }
            t.shape[k] = (int64_t)v;
            int mok = 1;
            numel = g3n_mul_ok(numel, (size_t)v, &mok);
            if (!mok) {
                ok = 0;
                break;
            }
        }
        if (!ok) {
            rc = g3n_err(err, errlen, "%s: tensor %s: bad shape (not non-negative integers, or too large)", path, name);
            break;
        }
        int mok = 1;
        size_t nbytes = g3n_mul_ok(numel, (size_t)esize, &mok);
        uint64_t o0, o1;
        if (cJSON_GetArraySize(jo) != 2 || !json_uint(jo->child, UINT64_MAX >> 11, &o0) ||
            !json_uint(jo->child->next, UINT64_MAX >> 11, &o1) || o1 < o0) {
            rc = g3n_err(err, errlen, "%s: tensor %s: bad data_offsets", path, name);
            break;
        }
        if (!mok || o1 - o0 != nbytes) {
            rc = g3n_err(err, errlen,
                         "%s: tensor %s: data_offsets span %llu bytes but shape and dtype need %zu",
                         path, name, (unsigned long long)(o1 - o0), nbytes);
            break;
        }
        if (o1 > data_size) {
            rc = g3n_err(err, errlen,
                         "%s: tensor %s: data ends at byte %llu, past the end of the file "
                         "(%zu bytes of data)",
                         path, name, (unsigned long long)o1, data_size);
            break;
        }
        if ((data_start + (size_t)o0) % (size_t)esize != 0) {
            rc = g3n_err(err, errlen, "%s: tensor %s: data is not aligned to its %d-byte elements",
                         path, name, esize);
            break;
        }
        if (safetensors_find(st, name)) {
            rc = g3n_err(err, errlen, "%s: tensor %s appears twice", path, name);
            break;
        }
        t.numel = numel;
        t.nbytes = nbytes;
        t.data = b + data_start + o0;
        t.file = fi;
        char *nm = g3n_strdup(name);
        t.name = nm;
        st_add(st, &t);
        st->names[st->n_tensors - 1] = nm;
        /* insert into the hash table (grown here so lookups above stay valid) */
        if ((size_t)st->n_tensors * 2 > st->table_cap) {
            size_t cap = st->table_cap ? st->table_cap * 2 : 1024;
            while ((size_t)st->n_tensors * 2 > cap) cap *= 2;
            free(st->table);
            st->table = g3n_malloc(cap * sizeof(int));
            for (size_t i = 0; i < cap; i++) st->table[i] = -1;
            st->table_cap = cap;
            for (int i = 0; i < st->n_tensors; i++) {
                size_t h = hash_str(st->tensors[i].name) & (cap - 1);
                while (st->table[h] >= 0) h = (h + 1) & (cap - 1);
                st->table[h] = i;
            }
        } else {
            size_t h = hash_str(nm) & (st->table_cap - 1);
            while (st->table[h] >= 0) h = (h + 1) & (st->table_cap - 1);
            st->table[h] = st->n_tensors - 1;
        }
    }
    cJSON_Delete(root);
    if (rc) return rc;

    /* data regions of this file must not overlap */
    int n = st->n_tensors - first;
    if (n > 1) {
        const st_tensor **v = g3n_malloc((size_t)n * sizeof(*v));
        for (int i = 0; i < n; i++) v[i] = &st->tensors[first + i];
        qsort(v, (size_t)n, sizeof(*v), cmp_offset);
        for (int i = 1; i < n; i++) {
            const char *prev_end = (const char *)v[i - 1]->data + v[i - 1]->nbytes;
            if ((const char *)v[i]->data < prev_end && v[i]->nbytes && v[i - 1]->nbytes) {
                rc = g3n_err(err, errlen, "%s: tensors %s and %s overlap in the file", path,
                             v[i - 1]->name, v[i]->name);
                break;
            }
        }
        free(v);
    }
    return rc;
}

const st_tensor *safetensors_find(const safetensors *st, const char *name) {
    if (!st->table_cap) return NULL;
    size_t h = hash_str(name) & (st->table_cap - 1);
    while (st->table[h] >= 0) {
        const st_tensor *t = &st->tensors[st->table[h]];
        if (strcmp(t->name, name) == 0) return t;
        h = (h + 1) & (st->table_cap - 1);
    }
    return NULL;
}

void safetensors_close(safetensors *st) {
    if (!st) return;
    for (int i = 0; i < st->n_files; i++) {
        if (st->files[i].map) munmap(st->files[i].map, st->files[i].size);
        free(st->files[i].path);
    }
    for (int i = 0; i < st->n_tensors; i++) free(st->names[i]);
    free(st->files);
    free(st->tensors);
    free(st->names);
    free(st->table);
    free(st);
}

safetensors *safetensors_open_file(const char *path, char *err, size_t errlen) {
    safetensors *st = g3n_calloc(1, sizeof(*st));
    if (st_load_file(st, path, err, errlen) != 0) {
        safetensors_close(st);
        return NULL;
    }
    return st;
}

/* A shard file name from an index: a plain file name, no directories. */
static int shard_name_ok(const char *s) {
    if (!s[0] || strcmp(s, ".") == 0 || strcmp(s, "..") == 0) return 0;
    for (const char *p = s; *p; p++)
        if (*p == '/' || *p == '\\') return 0;
    return 1;
}

safetensors *safetensors_open_dir(const char *dir, char *err, size_t errlen) {
    char *ipath = g3n_path_join(dir, "model.safetensors.index.json");
    struct stat sb;
    if (stat(ipath, &sb) != 0) {
        free(ipath);
        char *fpath = g3n_path_join(dir, "model.safetensors");
        if (stat(fpath, &sb) != 0) {
            g3n_err(err, errlen, "%s: no model.safetensors or model.safetensors.index.json", dir);
            free(fpath);
            return NULL;
        }
        safetensors *st = safetensors_open_file(fpath, err, errlen);
        free(fpath);
        return st;
    }
    size_t len;
    char *text = g3n_read_file(ipath, &len, ST_MAX_INDEX, err, errlen);
    if (!text) {
        free(ipath);
        return NULL;
    }
    safetensors *st = g3n_calloc(1, sizeof(*st));
    cJSON *root = cJSON_ParseWithLength(text, len);
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    int rc = 0;
    if (!root || !cJSON_IsObject(wm)) {
        rc = g3n_err(err, errlen, "%s: not JSON with a \"weight_map\" object", ipath);
    }
    /* open each distinct shard once, in order of first mention */
    char **shards = NULL;
    int n_shards = 0;
    for (const cJSON *e = wm ? wm->child : NULL; !rc && e; e = e->next) {
        if (!cJSON_IsString(e) || !shard_name_ok(e->valuestring)) {
            rc = g3n_err(err, errlen, "%s: weight_map[%s]: not a plain file name", ipath,
                         e->string ? e->string : "?");
            break;
        }
        int seen = 0;
        for (int i = 0; i < n_shards; i++) seen |= strcmp(shards[i], e->valuestring) == 0;
        if (seen) continue;
        shards = realloc(shards, (size_t)(n_shards + 1) * sizeof(char *));
        if (!shards) abort();
        shards[n_shards++] = e->valuestring;
        char *spath = g3n_path_join(dir, e->valuestring);
        rc = st_load_file(st, spath, err, errlen);
        free(spath);
    }
    if (!rc && n_shards == 0) rc = g3n_err(err, errlen, "%s: weight_map is empty", ipath);
    /* every indexed tensor must be in the shard the index names */
    for (const cJSON *e = wm ? wm->child : NULL; !rc && e; e = e->next) {
        const st_tensor *t = safetensors_find(st, e->string);
        if (!t) {
            rc = g3n_err(err, errlen, "%s: tensor %s is listed in the index but not in %s", ipath,
                         e->string, e->valuestring);
        } else {
            const char *p = st->files[t->file].path;
            size_t pl = strlen(p), sl = strlen(e->valuestring);
            if (pl < sl || strcmp(p + pl - sl, e->valuestring) != 0)
                rc = g3n_err(err, errlen, "%s: tensor %s is indexed in %s but found in %s", ipath,
                             e->string, e->valuestring, p);
        }
    }
    free(shards);
    cJSON_Delete(root);
    free(text);
    free(ipath);
    if (rc) {
        safetensors_close(st);
        return NULL;
    }
    return st;
}

int safetensors_count(const safetensors *st) { return st->n_tensors; }
const st_tensor *safetensors_at(const safetensors *st, int i) { return &st->tensors[i]; }
const char *safetensors_file_path(const safetensors *st, const st_tensor *t) {
    return st->files[t->file].path;
}
