/* Hamming distances of one query to n packed binary codes.
 *
 * The optional accelerator of quantize.hamming (numpy's bitwise_count is the
 * fallback). Measured at 1M × 384 bits on this project's 2-core x86 VM
 * (scripts/bench_search.py needs ≤ 4 ms for search to be 20× faster than
 * float32 brute force): numpy 13.6 ms, faiss IndexBinaryFlat 11 ms, simsimd's
 * hamming cdist 12.8 ms, sqlite-vec 255 ms; this loop ~4 ms on one core and
 * ~2.4 ms on two, about the memory bandwidth (48 MB read). scan_below keeps
 * only the codes within a cut-off, so the top-k never touches 1M distances.
 *
 * The codes are laid out as w rows of n uint64 words (word j of every code
 * contiguous), the layout the numpy path uses too.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

struct part {
    const uint64_t *c, *q;
    Py_ssize_t w, n, start, stop;
    uint16_t *d;
    /* scan_below only: keep codes at distance <= cut, in idx/dist (capacity cap); count, or -1 if full */
    Py_ssize_t cut, cap, count;
    int64_t *idx;
};

/* The 384-dim loop, compiled a second time for x86 CPUs with AVX-512 VPOPCNTDQ (eight codes per
 * popcount instruction), chosen at run time: the extension stays safe on any x86-64 with POPCNT. */
/* Distance of code i, with the six word rows in c0..c5 and the query's words in q0..q5. */
#define DIST6(i)                                                                                                    \
    ((unsigned)(__builtin_popcountll(c0[i] ^ q0) + __builtin_popcountll(c1[i] ^ q1) +                              \
                __builtin_popcountll(c2[i] ^ q2) + __builtin_popcountll(c3[i] ^ q3) +                              \
                __builtin_popcountll(c4[i] ^ q4) + __builtin_popcountll(c5[i] ^ q5)))

#define SCAN6_BODY                                                                                                  \
    for (Py_ssize_t i = 0; i < m; i++) d[i] = (uint16_t)DIST6(i);

#define SCAN6_ARGS                                                                                                  \
    const uint64_t *c0, const uint64_t *c1, const uint64_t *c2, const uint64_t *c3, const uint64_t *c4,            \
        const uint64_t *c5, uint64_t q0, uint64_t q1, uint64_t q2, uint64_t q3, uint64_t q4, uint64_t q5,         \
        uint16_t *d, Py_ssize_t m

static void scan6(SCAN6_ARGS) { SCAN6_BODY }

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target("avx512f,avx512bw,avx512vpopcntdq"))) static void scan6_avx512(SCAN6_ARGS) { SCAN6_BODY }
#define HAVE_AVX512_SCAN 1
#endif

/* Codes start..stop of every word row (the rows keep their stride n). */
static void scan_part(const struct part *p) {
    Py_ssize_t m = p->stop - p->start;
    uint16_t *d = p->d + p->start;
    if (p->w == 6) { /* 384 dims, the common case: unrolled over the six words */
        const uint64_t *c = p->c + p->start;
        const uint64_t *c0 = c, *c1 = c + p->n, *c2 = c + 2 * p->n, *c3 = c + 3 * p->n, *c4 = c + 4 * p->n,
                       *c5 = c + 5 * p->n;
        const uint64_t q0 = p->q[0], q1 = p->q[1], q2 = p->q[2], q3 = p->q[3], q4 = p->q[4], q5 = p->q[5];
#ifdef HAVE_AVX512_SCAN
        if (__builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("avx512bw")) {
            scan6_avx512(c0, c1, c2, c3, c4, c5, q0, q1, q2, q3, q4, q5, d, m);
            return;
        }
#endif
        scan6(c0, c1, c2, c3, c4, c5, q0, q1, q2, q3, q4, q5, d, m);
        return;
    }
    for (Py_ssize_t i = 0; i < m; i++) d[i] = 0;
    for (Py_ssize_t j = 0; j < p->w; j++) {
        const uint64_t *cj = p->c + j * p->n + p->start, qj = p->q[j];
        for (Py_ssize_t i = 0; i < m; i++) d[i] = (uint16_t)(d[i] + __builtin_popcountll(cj[i] ^ qj));
    }
}

static void *scan_thread(void *arg) {
    scan_part((const struct part *)arg);
    return NULL;
}

/* Like scan_part for 384 dims, but keeps only the codes within ``cut``: the caller never
 * writes or reads a distance per code, which at 1M codes is most of the top-k cost. */
static void below_part(struct part *p) {
    const uint64_t *c = p->c;
    const Py_ssize_t n = p->n;
    const uint64_t *c0 = c, *c1 = c + n, *c2 = c + 2 * n, *c3 = c + 3 * n, *c4 = c + 4 * n, *c5 = c + 5 * n;
    const uint64_t q0 = p->q[0], q1 = p->q[1], q2 = p->q[2], q3 = p->q[3], q4 = p->q[4], q5 = p->q[5];
    const unsigned cut = (unsigned)p->cut;
    Py_ssize_t count = 0;
    for (Py_ssize_t i = p->start; i < p->stop; i++) {
        unsigned a = DIST6(i);
        if (a <= cut) {
            if (count == p->cap) {
                p->count = -1;
                return;
            }
            p->idx[count] = i;
            p->d[count++] = (uint16_t)a;
        }
    }
    p->count = count;
}

static void *below_thread(void *arg) {
    below_part((struct part *)arg);
    return NULL;
}

static PyObject *scan_below(PyObject *self, PyObject *args) {
    Py_buffer codes, query, idx, dist;
    Py_ssize_t n, cut, threads = 1;
    if (!PyArg_ParseTuple(args, "y*ny*nw*w*|n", &codes, &n, &query, &cut, &idx, &dist, &threads))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t cap = idx.len / 8 < dist.len / 2 ? idx.len / 8 : dist.len / 2;
    if (n < 0 || codes.len < (Py_ssize_t)(6 * n * 8) || query.len < 6 * 8 || cap < 2) {
        PyErr_SetString(PyExc_ValueError, "hamming.scan_below: 384-dim codes only; buffer sizes do not match n");
        goto done;
    }
    Py_ssize_t count;
    Py_BEGIN_ALLOW_THREADS
    struct part first = {(const uint64_t *)codes.buf, (const uint64_t *)query.buf, 6, n, 0, n,
                         (uint16_t *)dist.buf, cut, cap, 0, (int64_t *)idx.buf};
    if (threads > 1 && n >= 65536) {
        /* Each half fills its own half of the buffers; the second is moved up behind the first. */
        struct part second = first;
        first.stop = second.start = n / 2;
        first.cap = cap / 2;
        second.cap = cap - cap / 2;
        second.idx += cap / 2;
        second.d += cap / 2;
        pthread_t tid;
        int threaded = pthread_create(&tid, NULL, below_thread, &second) == 0;
        below_part(&first);
        if (threaded)
            pthread_join(tid, NULL);
        else
            below_part(&second);
        if (first.count < 0 || second.count < 0) {
            count = -1;
        } else {
            memmove(first.idx + first.count, second.idx, (size_t)second.count * sizeof(int64_t));
            memmove(first.d + first.count, second.d, (size_t)second.count * sizeof(uint16_t));
            count = first.count + second.count;
        }
    } else {
        below_part(&first);
        count = first.count;
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(count);
done:
    PyBuffer_Release(&codes);
    PyBuffer_Release(&query);
    PyBuffer_Release(&idx);
    PyBuffer_Release(&dist);
    return result;
}

static PyObject *scan(PyObject *self, PyObject *args) {
    Py_buffer codes, query, out;
    Py_ssize_t w, n, threads = 1;
    if (!PyArg_ParseTuple(args, "y*nny*w*|n", &codes, &w, &n, &query, &out, &threads))
        return NULL;
    PyObject *result = NULL;
    if (w < 1 || w > 64 || n < 0 || codes.len < (Py_ssize_t)(w * n * 8) || query.len < w * 8 || out.len < n * 2) {
        PyErr_SetString(PyExc_ValueError, "hamming.scan: buffer sizes do not match w and n");
        goto done;
    }
    struct part first = {(const uint64_t *)codes.buf, (const uint64_t *)query.buf, w, n, 0, n, (uint16_t *)out.buf,
                         0, 0, 0, NULL};
    Py_BEGIN_ALLOW_THREADS
    /* Bound by memory bandwidth, which a second core adds to. */
    if (threads > 1 && n >= 65536) {
        struct part second = first;
        first.stop = second.start = n / 2;
        pthread_t tid;
        if (pthread_create(&tid, NULL, scan_thread, &second) == 0) {
            scan_part(&first);
            pthread_join(tid, NULL);
        } else {
            scan_part(&first);
            scan_part(&second);
        }
    } else {
        scan_part(&first);
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&codes);
    PyBuffer_Release(&query);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, "scan(codes, w, n, query, out_uint16[, threads]): Hamming distances"},
    {"scan_below", scan_below, METH_VARARGS,
     "scan_below(codes, n, query, cut, idx_int64, dist_uint16[, threads]) -> count of codes within cut (-1: full)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_hamming", NULL, -1, methods};

PyMODINIT_FUNC PyInit__hamming(void) { return PyModule_Create(&module); }
