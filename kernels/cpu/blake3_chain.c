/* prefixkv._blake3: the host fast path of the prefixkv-v1 block hash (docs/hashing.md).
 *
 *   h_-1 = parent, h_i = BLAKE3 keyed_hash(key, h_{i-1} || le_u32(block i tokens) || extra_i)
 *
 * The chain of one sequence is sequential, so parallelism comes from running up to 8
 * sequences at once, one per SIMD lane (a work queue refills a lane when its sequence ends);
 * the last running sequence finishes on the scalar path. Portable C99 + the CPython API
 * (buffer protocol only, no numpy headers); the 8-lane path needs GCC/Clang vector
 * extensions and, on x86-64, AVX2 at run time (checked by CPUID); else all runs scalar.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK_LEN 64
#define CHUNK_LEN 1024
#define CHUNK_START (1u << 0)
#define CHUNK_END (1u << 1)
#define PARENT (1u << 2)
#define ROOT (1u << 3)
#define KEYED_HASH (1u << 4)
#define DERIVE_KEY_CONTEXT (1u << 5)
#define DERIVE_KEY_MATERIAL (1u << 6)


static const uint32_t IV[8] = {0x6A09E667u, 0xBB67AE85u, 0x3C6EF372u, 0xA54FF53Au,
                               0x510E527Fu, 0x9B05688Cu, 0x1F83D9ABu, 0x5BE0CD19u};

/* SCHEDULE[r] = message word order of round r: the permutation applied r times. */
static const uint8_t SCHEDULE[7][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8},
    {3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1},
    {10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6},
    {12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4},
    {9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7},
    {11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13},
};

static inline uint32_t load_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static inline void store_le32(uint8_t *p, uint32_t x)
{
    p[0] = (uint8_t)x;
    p[1] = (uint8_t)(x >> 8);
    p[2] = (uint8_t)(x >> 16);
    p[3] = (uint8_t)(x >> 24);
}

/* Scalar instance. */
typedef uint32_t lane_t;
#define HOT_TARGET
#define SPLAT(x) ((uint32_t)(x))
#define SUF _x1
#include "blake3_lanes.h"
#undef SPLAT
#undef SUF
#undef HOT_TARGET

#define LANES 8
#if (defined(__GNUC__) || defined(__clang__)) && !defined(PREFIXKV_SCALAR_ONLY)
#define HAVE_LANES 1
/* 8-lane instance on GCC/Clang vector extensions (lowered to the target's SIMD, e.g. NEON on
 * arm64). On x86-64 it is compiled for AVX2 (one 8 x u32 register per state word) and used
 * only where CPUID reports AVX2; without AVX2 the 16-word state of 8 lanes does not fit the
 * 16 SSE registers and the scalar path is faster, so every sequence runs scalar there. */
typedef uint32_t lane8_t __attribute__((vector_size(4 * LANES)));
#define lane_t lane8_t
#if defined(__x86_64__) || defined(__i386__)
#define HOT_TARGET __attribute__((target("avx2")))
#define LANES_USABLE() (__builtin_cpu_init(), __builtin_cpu_supports("avx2"))
#define LANES_NAME "avx2 x 8 lanes"
#else
#define HOT_TARGET
#define LANES_USABLE() 1
#define LANES_NAME "vector x 8 lanes"
#endif
#define SPLAT(x) ((lane8_t){(x), (x), (x), (x), (x), (x), (x), (x)})
#define SUF _x8
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized" /* GCC 12 false positive on SPLAT */
#include "blake3_lanes.h"
#pragma GCC diagnostic pop
#undef SUF
#undef lane_t
#else
#define HAVE_LANES 0
#define LANES_USABLE() 0
#define LANES_NAME "scalar"
#endif

/* The inputs of one chain call (validated by the caller). */
typedef struct {
    const int32_t *tokens;   /* num_tokens, values >= 0 */
    const int64_t *cu;       /* num_seqs + 1 */
    int64_t *first_block;    /* num_seqs + 1: index of each sequence's first output block */
    Py_ssize_t num_seqs, block_size;
    size_t msg_len, msg_words; /* bytes of a block message; words once padded */
    uint32_t key[8];
    const uint32_t *extra;   /* NULL or num_blocks * 4 */
    const uint32_t *parents; /* num_seqs * 8 */
    int use_lanes;           /* 0: scalar only (tests) */
    uint8_t *out;            /* num_blocks * 32 */
} chain_args;

static void store_digest(uint8_t *o, const uint32_t w[8])
{
    for (int i = 0; i < 8; i++) store_le32(o + 4 * i, w[i]);
}

/* Blocks [b0, nb) of sequence s, from chaining value cv, one at a time. mw: msg_words words. */
static void chain_scalar(const chain_args *a, Py_ssize_t s, int64_t b0, uint32_t cv[8],
                         uint32_t *mw)
{
    const Py_ssize_t B = a->block_size;
    int64_t nb = a->first_block[s + 1] - a->first_block[s];
    for (int64_t b = b0; b < nb; b++) {
        int64_t ob = a->first_block[s] + b;
        const int32_t *t = a->tokens + a->cu[s] + b * B;
        for (int i = 0; i < 8; i++) mw[i] = cv[i];
        for (Py_ssize_t j = 0; j < B; j++) mw[8 + j] = (uint32_t)t[j];
        if (a->extra)
            for (int j = 0; j < 4; j++) mw[8 + B + j] = a->extra[4 * ob + j];
        hash_x1(a->key, mw, a->msg_len, KEYED_HASH, cv);
        store_digest(a->out + 32 * ob, cv);
    }
}

/* The whole batch. Returns 0, or -1 when out of memory. */
static int chain(chain_args *a)
{
    uint32_t *mw1 = (uint32_t *)calloc(a->msg_words, sizeof(uint32_t));
    if (!mw1) return -1;
    Py_ssize_t next = 0;
#if HAVE_LANES
    const Py_ssize_t B = a->block_size;
    if (!a->use_lanes || !LANES_USABLE()) goto scalar;
    /* Lane-interleaved message words, 32-byte aligned for the vector loads. */
    void *raw = calloc(a->msg_words * sizeof(lane8_t) + 32, 1);
    if (!raw) {
        free(mw1);
        return -1;
    }
    lane8_t *mw = (lane8_t *)(((uintptr_t)raw + 31) & ~(uintptr_t)31);
    lane8_t key8[8], cv8[8];
    Py_ssize_t lane_seq[LANES];
    int64_t lane_blk[LANES], lane_nblk[LANES];
    int active = 0;
    for (int i = 0; i < 8; i++) key8[i] = SPLAT(a->key[i]);
    for (int i = 0; i < 8; i++) cv8[i] = SPLAT(0u);
    for (int l = 0; l < LANES; l++) lane_seq[l] = -1;
    for (;;) {
        /* refill free lanes from the queue of sequences that have full blocks */
        for (int l = 0; l < LANES; l++) {
            if (lane_seq[l] >= 0) continue;
            while (next < a->num_seqs && a->first_block[next + 1] == a->first_block[next])
                next++;
            if (next >= a->num_seqs) break;
            lane_seq[l] = next;
            lane_blk[l] = 0;
            lane_nblk[l] = a->first_block[next + 1] - a->first_block[next];
            for (int i = 0; i < 8; i++) cv8[i][l] = a->parents[8 * next + i];
            next++;
            active++;
        }
        if (active == 0 || (active == 1 && next >= a->num_seqs)) break;
        for (int i = 0; i < 8; i++) mw[i] = cv8[i];
        for (int l = 0; l < LANES; l++) {
            if (lane_seq[l] < 0) continue;
            Py_ssize_t s = lane_seq[l];
            const int32_t *t = a->tokens + a->cu[s] + lane_blk[l] * B;
            for (Py_ssize_t j = 0; j < B; j++) mw[8 + j][l] = (uint32_t)t[j];
            if (a->extra) {
                const uint32_t *e = a->extra + 4 * (a->first_block[s] + lane_blk[l]);
                for (int j = 0; j < 4; j++) mw[8 + B + j][l] = e[j];
            }
        }
        hash_x8(key8, mw, a->msg_len, KEYED_HASH, cv8);
        for (int l = 0; l < LANES; l++) {
            if (lane_seq[l] < 0) continue;
            uint32_t w[8];
            for (int i = 0; i < 8; i++) w[i] = cv8[i][l];
            store_digest(a->out + 32 * (a->first_block[lane_seq[l]] + lane_blk[l]), w);
            if (++lane_blk[l] == lane_nblk[l]) {
                lane_seq[l] = -1;
                active--;
            }
        }
    }
    if (active == 1) { /* the last running sequence: scalar is faster than 1 of 8 lanes */
        int l = 0;
        while (lane_seq[l] < 0) l++;
        uint32_t cv[8];
        for (int i = 0; i < 8; i++) cv[i] = cv8[i][l];
        chain_scalar(a, lane_seq[l], lane_blk[l], cv, mw1);
    }
    free(raw);
scalar:
#endif
    for (; next < a->num_seqs; next++) { /* without vector extensions: all scalar */
        uint32_t cv[8];
        for (int i = 0; i < 8; i++) cv[i] = a->parents[8 * next + i];
        chain_scalar(a, next, 0, cv, mw1);
    }
    free(mw1);
    return 0;
}

/* ------------------------------------------------------------------------------ Python API */

static int get_buffer(PyObject *obj, Py_buffer *view, const char *name, Py_ssize_t itemsize,
                      int writable)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) {
        PyErr_Format(PyExc_TypeError, "%s: expected a C-contiguous%s buffer", name,
                     writable ? " writable" : "");
        return -1;
    }
    if (itemsize > 1 && view->len % itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: byte length %zd is not a multiple of %zd", name,
                     view->len, itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(chain_doc,
"chain(tokens, block_size, cu_lens, key, extra, parents, out, use_lanes=True)\n\n"
"prefixkv-v1 block chain, inputs already validated by prefixkv.paged.hashing.\n"
"tokens: int32 buffer; cu_lens: int64 buffer [num_seqs+1]; key: 32 bytes;\n"
"extra: None or uint32 buffer [num_full_blocks*4]; parents: uint32 buffer [num_seqs*8];\n"
"out: writable buffer of num_full_blocks*32 bytes (digests, in order).\n"
"use_lanes=False runs every sequence on the scalar path (for tests).");

static PyObject *py_chain(PyObject *self, PyObject *args)
{
    PyObject *tok_o, *cu_o, *key_o, *extra_o, *par_o, *out_o;
    Py_ssize_t block_size;
    PyObject *result = NULL;
    (void)self;
    int use_lanes = 1;
    if (!PyArg_ParseTuple(args, "OnOOOOO|p", &tok_o, &block_size, &cu_o, &key_o, &extra_o, &par_o,
                          &out_o, &use_lanes))
        return NULL;
    if (block_size < 1) return PyErr_Format(PyExc_ValueError, "block_size: expected >= 1");
    Py_buffer tok, cu, key, extra = {0}, par, out;
    int have_extra = extra_o != Py_None;
    if (get_buffer(tok_o, &tok, "tokens", 4, 0) < 0) return NULL;
    if (get_buffer(cu_o, &cu, "cu_lens", 8, 0) < 0) goto fail_tok;
    if (get_buffer(key_o, &key, "key", 1, 0) < 0) goto fail_cu;
    if (have_extra && get_buffer(extra_o, &extra, "extra", 16, 0) < 0) goto fail_key;
    if (get_buffer(par_o, &par, "parents", 32, 0) < 0) goto fail_extra;
    if (get_buffer(out_o, &out, "out", 32, 1) < 0) goto fail_par;

    Py_ssize_t num_seqs = cu.len / 8 - 1;
    const int64_t *cup = (const int64_t *)cu.buf;
    int64_t nblocks = 0;
    if (key.len != 32) {
        PyErr_SetString(PyExc_ValueError, "key: expected 32 bytes");
        goto done;
    }
    if (num_seqs < 0 || par.len != 32 * num_seqs) {
        PyErr_SetString(PyExc_ValueError, "parents: expected num_seqs * 8 words");
        goto done;
    }
    for (Py_ssize_t s = 0; s < num_seqs; s++) {
        if (cup[s + 1] < cup[s] || cup[s] < 0 || cup[s + 1] > tok.len / 4) {
            PyErr_SetString(PyExc_ValueError, "cu_lens: out of range or decreasing");
            goto done;
        }
        nblocks += (cup[s + 1] - cup[s]) / block_size;
    }
    if (out.len != 32 * nblocks || (have_extra && extra.len != 16 * nblocks)) {
        PyErr_SetString(PyExc_ValueError, "out/extra: size does not match the full blocks");
        goto done;
    }
    chain_args a;
    a.tokens = (const int32_t *)tok.buf;
    a.cu = cup;
    a.num_seqs = num_seqs;
    a.block_size = block_size;
    a.msg_len = 32 + 4 * (size_t)block_size + (have_extra ? 16 : 0);
    a.msg_words = (a.msg_len + BLOCK_LEN - 1) / BLOCK_LEN * (BLOCK_LEN / 4);
    for (int i = 0; i < 8; i++) a.key[i] = load_le32((const uint8_t *)key.buf + 4 * i);
    a.extra = have_extra ? (const uint32_t *)extra.buf : NULL;
    a.parents = (const uint32_t *)par.buf;
    a.use_lanes = use_lanes;
    a.out = (uint8_t *)out.buf;
    a.first_block = (int64_t *)malloc(sizeof(int64_t) * (size_t)(num_seqs + 1));
    if (!a.first_block) {
        PyErr_NoMemory();
        goto done;
    }
    a.first_block[0] = 0;
    for (Py_ssize_t s = 0; s < num_seqs; s++)
        a.first_block[s + 1] = a.first_block[s] + (cup[s + 1] - cup[s]) / block_size;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = chain(&a);
    Py_END_ALLOW_THREADS
    free(a.first_block);
    if (rc < 0) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&out);
fail_par:
    PyBuffer_Release(&par);
fail_extra:
    if (have_extra) PyBuffer_Release(&extra);
fail_key:
    PyBuffer_Release(&key);
fail_cu:
    PyBuffer_Release(&cu);
fail_tok:
    PyBuffer_Release(&tok);
    return result;
}

PyDoc_STRVAR(hash_doc,
"hash(data, key, flags) -> bytes\n\n"
"32-byte BLAKE3 of data. key: 32 bytes (the IV bytes for hash/derive-key-context modes);\n"
"flags: 0 (hash), 16 (keyed_hash), 32 (derive_key context), 64 (derive_key material).");

static PyObject *py_hash(PyObject *self, PyObject *args)
{
    Py_buffer data, key;
    unsigned int flags;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*I", &data, &key, &flags)) return NULL;
    PyObject *result = NULL;
    if (key.len != 32) {
        PyErr_SetString(PyExc_ValueError, "key: expected 32 bytes");
        goto done;
    }
    size_t len = (size_t)data.len;
    size_t nwords = len < BLOCK_LEN ? BLOCK_LEN / 4 : (len + BLOCK_LEN - 1) / BLOCK_LEN * 16;
    uint32_t *mw = (uint32_t *)calloc(nwords, sizeof(uint32_t));
    uint8_t *tail = (uint8_t *)calloc(4, 1);
    if (!mw || !tail) {
        free(mw);
        free(tail);
        PyErr_NoMemory();
        goto done;
    }
    const uint8_t *d = (const uint8_t *)data.buf;
    for (size_t i = 0; i < len / 4; i++) mw[i] = load_le32(d + 4 * i);
    if (len % 4) {
        memcpy(tail, d + len / 4 * 4, len % 4);
        mw[len / 4] = load_le32(tail);
    }
    free(tail);
    uint32_t k1[8], o1[8];
    for (int i = 0; i < 8; i++) k1[i] = load_le32((const uint8_t *)key.buf + 4 * i);
    hash_x1(k1, mw, len, flags, o1);
    free(mw);
    uint8_t digest[32];
    store_digest(digest, o1);
    result = PyBytes_FromStringAndSize((const char *)digest, 32);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&key);
    return result;
}

PyDoc_STRVAR(split_doc, "split32(buffer) -> list of 32-byte bytes objects");

static PyObject *py_split32(PyObject *self, PyObject *arg)
{
    Py_buffer b;
    (void)self;
    if (get_buffer(arg, &b, "digests", 32, 0) < 0) return NULL;
    Py_ssize_t n = b.len / 32;
    PyObject *list = PyList_New(n);
    if (list) {
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *d = PyBytes_FromStringAndSize((const char *)b.buf + 32 * i, 32);
            if (!d) {
                Py_CLEAR(list);
                break;
            }
            PyList_SET_ITEM(list, i, d);
        }
    }
    PyBuffer_Release(&b);
    return list;
}

static PyMethodDef methods[] = {
    {"chain", py_chain, METH_VARARGS, chain_doc},
    {"hash", py_hash, METH_VARARGS, hash_doc},
    {"split32", py_split32, METH_O, split_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_blake3",
    "prefixkv-v1 host fast path: portable C BLAKE3, 8 chains per SIMD loop.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__blake3(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddStringConstant(m, "simd", LANES_USABLE() ? LANES_NAME : "scalar") < 0)
        Py_CLEAR(m);
    return m;
}
