/* Optional accelerator of the read model's bulk fold (moldd/projection/readmodel.py, ReadModel.apply_rows; used
 * by the daemon's restore and `moldd-audit state`). Three functions, each giving exactly what its pure-Python
 * twin gives (tests/projection/test_foldrows.py holds them to it), or handing the case back:
 *
 *   read(uri, start, end, limit, typed=False) -> list of rows | None
 *       The rows of positions start..end (at most `limit`), in position order, in the fold's column order
 *       (FOLD_COLUMNS), as Python's sqlite3 module returns them (INTEGER -> int, TEXT -> str, BLOB -> bytes,
 *       REAL -> float, NULL -> None), read over its own read-only connection. The GIL is released while SQLite
 *       is read (the rows are copied out first, then turned into objects). Repeated stream ids, event types and
 *       actors within a call are one object each (event types interned). None on anything unusual (an SQLite
 *       error, text that is not UTF-8, with `typed` a position, schema version or time that is not an integer or an
 *       event type that is not text): the caller then reads that batch through sqlite3, which decides.
 *   iso_us(us) -> str
 *       ReadModel's iso_us (datetime.isoformat of microseconds since the Unix epoch, UTC); values outside
 *       years 1..9999 or not plain ints go to the Python function given to set_fallback.
 *   may_have_long_int(data) -> bool
 *       events.canonical.may_have_long_int: whether the bytes hold a run of 19 ASCII digits.
 *   decode(payload) -> value
 *       events.canonical.loads as ReadModel.apply_rows inlines it: for bytes without such a run the fast
 *       decoder (orjson.loads), unless it raises its error; otherwise the general one (canonical loads); both
 *       given to set_decoders.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sqlite3.h>
#include <stdint.h>
#include <string.h>

#define N_COLS 9

static const char *QUERY =
    "SELECT position, stream_id, stream_version, event_type, schema_version, recorded_at, actor, correlation_id, "
    "payload FROM events WHERE position >= ?1 AND position <= ?2 ORDER BY position LIMIT ?3";

typedef struct {
    int type; /* SQLITE_INTEGER, SQLITE_FLOAT, SQLITE_TEXT, SQLITE_BLOB, SQLITE_NULL */
    int64_t i;
    double d;
    size_t off; /* text/blob: offset into the arena */
    size_t len;
} cell_t;

#define CHUNK (1 << 20)

typedef struct {
    const char *uri;
    int64_t start, end, limit;
    int typed; /* refuse (None) rows whose position, event type, schema version or time has another type */
    cell_t *cells;
    size_t ncells, cap_cells;
    char **chunks; /* the copied texts and blobs, in chunks never moved (a pointer per cell stays valid) */
    size_t nchunks, cap_chunks;
    size_t used; /* in the newest chunk */
    size_t rows;
    int failed;
} batch_t;

/* A copy of n bytes, at a stable address (c->off holds the pointer). */
static int arena_put(batch_t *b, const void *p, size_t n, size_t *off) {
    if (!b->nchunks || b->used + n > CHUNK) {
        if (b->nchunks == b->cap_chunks) {
            size_t cap = b->cap_chunks ? b->cap_chunks * 2 : 16;
            char **c = realloc(b->chunks, cap * sizeof(char *));
            if (!c) return -1;
            b->chunks = c;
            b->cap_chunks = cap;
        }
        char *chunk = malloc(n > CHUNK ? n : CHUNK);
        if (!chunk) return -1;
        b->chunks[b->nchunks++] = chunk;
        b->used = 0;
    }
    char *dst = b->chunks[b->nchunks - 1] + b->used;
    if (n) memcpy(dst, p, n);
    *off = (size_t)(uintptr_t)dst;
    b->used += n;
    return 0;
}

static void batch_free(batch_t *b) {
    for (size_t i = 0; i < b->nchunks; i++) free(b->chunks[i]);
    free(b->chunks);
    free(b->cells);
}

#define AT(c) ((const char *)(uintptr_t)(c)->off)

/* Without the GIL: step the query, copying every cell out of SQLite. */
static void read_rows(batch_t *b) {
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_open_v2(b->uri, &db, SQLITE_OPEN_READONLY | SQLITE_OPEN_URI | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc != SQLITE_OK) goto fail;
    /* pages mapped, not copied by a read() each (1 KiB pages: several per row) */
    sqlite3_exec(db, "PRAGMA mmap_size=1073741824", NULL, NULL, NULL);
    if (sqlite3_prepare_v2(db, QUERY, -1, &st, NULL) != SQLITE_OK) goto fail;
    sqlite3_bind_int64(st, 1, b->start);
    sqlite3_bind_int64(st, 2, b->end);
    sqlite3_bind_int64(st, 3, b->limit);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (b->ncells + N_COLS > b->cap_cells) {
            size_t cap = b->cap_cells ? b->cap_cells * 2 : (size_t)(b->limit < 8192 ? b->limit + 1 : 8192) * N_COLS;
            cell_t *c = realloc(b->cells, cap * sizeof(cell_t));
            if (!c) goto fail;
            b->cells = c;
            b->cap_cells = cap;
        }
        for (int k = 0; k < N_COLS; k++) {
            cell_t *c = &b->cells[b->ncells++];
            c->type = sqlite3_column_type(st, k);
            switch (c->type) {
            case SQLITE_INTEGER:
                c->i = sqlite3_column_int64(st, k);
                break;
            case SQLITE_FLOAT:
                c->d = sqlite3_column_double(st, k);
                break;
            case SQLITE_TEXT: {
                const unsigned char *t = sqlite3_column_text(st, k);
                if (!t && sqlite3_errcode(db) == SQLITE_NOMEM) goto fail;
                c->len = (size_t)sqlite3_column_bytes(st, k);
                if (arena_put(b, t, c->len, &c->off)) goto fail;
                break;
            }
            case SQLITE_BLOB: {
                const void *p = sqlite3_column_blob(st, k);
                c->len = (size_t)sqlite3_column_bytes(st, k);
                if (!p && c->len) goto fail;
                if (arena_put(b, p, c->len, &c->off)) goto fail;
                break;
            }
            default:
                break;
            }
        }
        if (b->typed) {
            cell_t *row = &b->cells[b->ncells - N_COLS];
            if (row[0].type != SQLITE_INTEGER || row[3].type != SQLITE_TEXT || row[4].type != SQLITE_INTEGER ||
                row[5].type != SQLITE_INTEGER)
                goto fail;
        }
        b->rows++;
    }
    if (rc != SQLITE_DONE) goto fail;
    sqlite3_finalize(st);
    sqlite3_close(db);
    return;
fail:
    b->failed = 1;
    if (st) sqlite3_finalize(st);
    if (db) sqlite3_close(db);
}

/* ---- one object per distinct text of a column within a call (open addressing, bytes -> str) ---- */
typedef struct {
    uint64_t hash;
    const char *key;
    size_t len;
    PyObject *value; /* borrowed from the rows built */
} slot_t;

typedef struct {
    slot_t *slots;
    size_t mask;
} table_t;

static uint64_t hash_bytes(const unsigned char *p, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ (uint64_t)n;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ w) * 0xff51afd7ed558ccdULL;
        h ^= h >> 32;
        p += 8;
        n -= 8;
    }
    uint64_t w = 0;
    if (n > 0) memcpy(&w, p, n);
    h = (h ^ w) * 0xc4ceb9fe1a85ec53ULL;
    return h ^ (h >> 29);
}

#define MAX_PROBES 64

/* The str of a text cell: from the table when the same text was seen (NULL + no error: build it, then
 * table_put). A crafted log of colliding texts only makes the table give up (no sharing), never slow. */
static slot_t *table_find(table_t *t, const char *p, size_t n, uint64_t h) {
    size_t i = (size_t)h & t->mask;
    for (int probes = 0; probes < MAX_PROBES; probes++, i = (i + 1) & t->mask) {
        slot_t *s = &t->slots[i];
        if (!s->key) return s;
        if (s->hash == h && s->len == n && memcmp(s->key, p, n) == 0) return s;
    }
    return NULL;
}

static PyObject *text_object(table_t *t, const char *p, size_t n, int intern) {
    if (!t) return PyUnicode_DecodeUTF8(p, (Py_ssize_t)n, NULL);
    uint64_t h = hash_bytes((const unsigned char *)p, n);
    slot_t *s = table_find(t, p, n, h);
    if (s && s->key) {
        Py_INCREF(s->value);
        return s->value;
    }
    PyObject *o = PyUnicode_DecodeUTF8(p, (Py_ssize_t)n, NULL);
    if (!o) return NULL;
    if (intern) PyUnicode_InternInPlace(&o);
    if (s) {
        s->hash = h;
        s->key = p;
        s->len = n;
        s->value = o; /* the rows keep it alive until the call ends */
    }
    return o;
}

static PyObject *cell_object(cell_t *c, table_t *t, int intern) {
    switch (c->type) {
    case SQLITE_INTEGER:
        return PyLong_FromLongLong(c->i);
    case SQLITE_FLOAT:
        return PyFloat_FromDouble(c->d);
    case SQLITE_TEXT:
        return text_object(t, AT(c), c->len, intern);
    case SQLITE_BLOB:
        return PyBytes_FromStringAndSize(AT(c), (Py_ssize_t)c->len);
    default:
        Py_RETURN_NONE;
    }
}

static PyObject *build(batch_t *b) {
    size_t cap = 1;
    while (cap < 2 * b->rows + 16) cap <<= 1;
    table_t tables[3] = {{0}};
    PyObject *list = NULL;
    for (int k = 0; k < 3; k++) {
        tables[k].slots = calloc(cap, sizeof(slot_t));
        tables[k].mask = cap - 1;
        if (!tables[k].slots) {
            PyErr_NoMemory();
            goto done;
        }
    }
    list = PyList_New((Py_ssize_t)b->rows);
    if (!list) goto done;
    PyObject *last_corr = NULL; /* a job's events usually follow each other: one id object for them */
    cell_t *last_corr_cell = NULL;
    for (size_t r = 0; r < b->rows; r++) {
        cell_t *row = &b->cells[r * N_COLS];
        PyObject *tuple = PyTuple_New(N_COLS);
        if (!tuple) goto fail;
        PyList_SET_ITEM(list, (Py_ssize_t)r, tuple);
        for (int k = 0; k < N_COLS; k++) {
            cell_t *c = &row[k];
            PyObject *o;
            if (k == 7 && c->type == SQLITE_TEXT && last_corr && last_corr_cell->len == c->len &&
                memcmp(AT(last_corr_cell), AT(c), c->len) == 0) {
                Py_INCREF(last_corr);
                o = last_corr;
            } else {
                table_t *t = k == 1 ? &tables[0] : k == 3 ? &tables[1] : k == 6 ? &tables[2] : NULL;
                o = cell_object(c, t, k == 3);
            }
            if (!o) goto fail;
            PyTuple_SET_ITEM(tuple, k, o);
            if (k == 7 && c->type == SQLITE_TEXT) {
                last_corr = o; /* borrowed: the tuple holds it */
                last_corr_cell = c;
            }
        }
    }
    goto done;
fail:
    Py_CLEAR(list);
    if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
        PyErr_Clear(); /* text that is not UTF-8: sqlite3 reads this batch and raises its own error */
        list = Py_None;
        Py_INCREF(list);
    }
done:
    for (int k = 0; k < 3; k++) free(tables[k].slots);
    return list;
}

static PyObject *py_read(PyObject *self, PyObject *args) {
    (void)self;
    batch_t b;
    memset(&b, 0, sizeof b);
    if (!PyArg_ParseTuple(args, "sLLL|p", &b.uri, &b.start, &b.end, &b.limit, &b.typed)) return NULL;
    if (b.limit < 0) {
        PyErr_SetString(PyExc_ValueError, "limit must be >= 0");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS read_rows(&b);
    Py_END_ALLOW_THREADS PyObject *out;
    if (b.failed) {
        out = Py_None;
        Py_INCREF(out);
    } else {
        out = build(&b);
    }
    batch_free(&b);
    return out;
}

/* ---- iso_us ---- */
static PyObject *fallback_iso = NULL;

/* days since 1970-01-01 -> civil date (H. Hinnant's days_from_civil inverse), proleptic Gregorian */
static void civil(int64_t z, int64_t *y, unsigned *m, unsigned *d) {
    z += 719468;
    const int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    const unsigned doe = (unsigned)(z - era * 146097);
    const unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    const int64_t yy = (int64_t)yoe + era * 400;
    const unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    const unsigned mp = (5 * doy + 2) / 153;
    *d = doy - (153 * mp + 2) / 5 + 1;
    *m = mp < 10 ? mp + 3 : mp - 9;
    *y = yy + (*m <= 2);
}

#define MIN_US (-62135596800LL * 1000000LL)          /* 0001-01-01T00:00:00 */
#define MAX_US (253402300800LL * 1000000LL - 1LL)    /* 9999-12-31T23:59:59.999999 */

static PyObject *py_iso_us(PyObject *self, PyObject *arg) {
    (void)self;
    int overflow = 0;
    long long us = 0;
    if (PyLong_CheckExact(arg)) us = PyLong_AsLongLongAndOverflow(arg, &overflow);
    if (!PyLong_CheckExact(arg) || overflow || us < MIN_US || us > MAX_US) {
        if (PyErr_Occurred()) return NULL;
        if (!fallback_iso) {
            PyErr_SetString(PyExc_RuntimeError, "iso_us: no fallback set");
            return NULL;
        }
        return PyObject_CallOneArg(fallback_iso, arg);
    }
    int64_t sec = us >= 0 ? us / 1000000 : -((-us + 999999) / 1000000);
    int64_t micro = us - sec * 1000000;
    int64_t days = sec >= 0 ? sec / 86400 : -((-sec + 86399) / 86400);
    int64_t tod = sec - days * 86400;
    int64_t y;
    unsigned m, d;
    civil(days, &y, &m, &d);
    char buf[40];
    char *o = buf;
    int64_t yr = y;
    for (int k = 3; k >= 0; k--, yr /= 10) o[k] = (char)('0' + yr % 10);
    o += 4;
    unsigned vals[5] = {m, d, (unsigned)(tod / 3600), (unsigned)(tod / 60 % 60), (unsigned)(tod % 60)};
    const char seps[5] = {'-', '-', 'T', ':', ':'};
    for (int k = 0; k < 5; k++) {
        *o++ = seps[k];
        *o++ = (char)('0' + vals[k] / 10);
        *o++ = (char)('0' + vals[k] % 10);
    }
    if (micro) {
        *o++ = '.';
        int64_t mu = micro;
        for (int k = 5; k >= 0; k--, mu /= 10) o[k] = (char)('0' + mu % 10);
        o += 6;
    }
    memcpy(o, "+00:00", 6);
    o += 6;
    Py_ssize_t n = o - buf;
    return PyUnicode_FromStringAndSize(buf, n);
}

static PyObject *py_set_fallback(PyObject *self, PyObject *arg) {
    (void)self;
    if (!PyCallable_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "set_fallback needs a callable");
        return NULL;
    }
    Py_INCREF(arg);
    Py_XSETREF(fallback_iso, arg);
    Py_RETURN_NONE;
}

/* ---- may_have_long_int, decode ---- */
static int has_digit_run(const unsigned char *p, Py_ssize_t len) {
    Py_ssize_t run = 0;
    for (Py_ssize_t i = 0; i < len; i++) {
        if (p[i] >= '0' && p[i] <= '9') {
            if (++run >= 19) return 1;
        } else {
            run = 0;
        }
    }
    return 0;
}

static PyObject *py_long_int(PyObject *self, PyObject *arg) {
    (void)self;
    if (PyBytes_CheckExact(arg))
        return PyBool_FromLong(has_digit_run((const unsigned char *)PyBytes_AS_STRING(arg), PyBytes_GET_SIZE(arg)));
    Py_buffer buf;
    if (PyObject_GetBuffer(arg, &buf, PyBUF_SIMPLE)) return NULL;
    int found = has_digit_run(buf.buf, buf.len);
    PyBuffer_Release(&buf);
    return PyBool_FromLong(found);
}

static PyObject *fast_loads = NULL, *fast_error = NULL, *general_loads = NULL;

/* events.canonical.loads as the fold inlines it: orjson for bytes without a run of 19 digits (what it refuses
 * goes on), the general decoder for everything else. */
static PyObject *py_decode(PyObject *self, PyObject *arg) {
    (void)self;
    if (!general_loads) {
        PyErr_SetString(PyExc_RuntimeError, "decode: set_decoders first");
        return NULL;
    }
    if (PyBytes_CheckExact(arg) &&
        !has_digit_run((const unsigned char *)PyBytes_AS_STRING(arg), PyBytes_GET_SIZE(arg))) {
        PyObject *r = PyObject_CallOneArg(fast_loads, arg);
        if (r || !PyErr_ExceptionMatches(fast_error)) return r;
        PyErr_Clear();
    }
    return PyObject_CallOneArg(general_loads, arg);
}

static PyObject *py_set_decoders(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *f, *e, *g;
    if (!PyArg_ParseTuple(args, "OOO", &f, &e, &g)) return NULL;
    Py_INCREF(f);
    Py_INCREF(e);
    Py_INCREF(g);
    Py_XSETREF(fast_loads, f);
    Py_XSETREF(fast_error, e);
    Py_XSETREF(general_loads, g);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"read", py_read, METH_VARARGS, "read(uri, start, end, limit, typed=False) -> rows in FOLD_COLUMNS order, or None"},
    {"iso_us", py_iso_us, METH_O, "iso_us(us) -> ISO 8601 text of microseconds since the Unix epoch (UTC)"},
    {"set_fallback", py_set_fallback, METH_O, "the Python iso_us, for values outside years 1..9999"},
    {"may_have_long_int", py_long_int, METH_O, "whether the bytes hold a run of 19 ASCII digits"},
    {"decode", py_decode, METH_O, "a stored payload decoded (orjson where it is exact, else the general decoder)"},
    {"set_decoders", py_set_decoders, METH_VARARGS, "set_decoders(orjson.loads, orjson.JSONDecodeError, loads)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "moldd.projection._foldrows", "Accelerator of the read model's fold (see readmodel.py).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__foldrows(void) { return PyModule_Create(&module); }
