/* safetensors.h: read-only access to safetensors files, memory-mapped.
 *
 * Opens one file or the shards named by model.safetensors.index.json, validates
 * every header entry against the file (header length, JSON, dtype, shape, data
 * offsets inside the file and not overlapping, alignment) and looks tensors up by
 * name. It knows nothing about Gemma; it never copies tensor data. */
#ifndef G3N_SAFETENSORS_H
#define G3N_SAFETENSORS_H

#include "common.h"

#define ST_MAX_DIMS 8

typedef struct {
    const char *name;
    const char *dtype_name; /* as written in the header ("BF16", "I64", ...) */
    int dtype;              /* a g3n_dtype, or -1 for dtypes g3n does not compute with */
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    size_t numel;
    size_t nbytes;
    const void *data; /* inside the mapping; valid until safetensors_close */
    int file;         /* index into the set's files */
} st_tensor;

typedef struct safetensors safetensors;

/* Open `dir`/model.safetensors.index.json and its shards if the index exists,
 * else `dir`/model.safetensors. NULL + err (naming the file) on any problem. */
safetensors *safetensors_open_dir(const char *dir, char *err, size_t errlen);

/* Open a single file. */
safetensors *safetensors_open_file(const char *path, char *err, size_t errlen);

void safetensors_close(safetensors *st);

/* The tensor called `name`, or NULL. */
const st_tensor *safetensors_find(const safetensors *st, const char *name);

int safetensors_count(const safetensors *st);
const st_tensor *safetensors_at(const safetensors *st, int i);
/* Path of the file that holds tensor t. */
const char *safetensors_file_path(const safetensors *st, const st_tensor *t);

#endif
