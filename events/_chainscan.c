/* Optional accelerator of events.verify: one pass over a SQLite log's events that says whether the pure-Python
 * scan (events/verify.py, _scan_rows) would find NOTHING to report, and if so returns what that scan would have
 * computed (count, head, streams, ...). It never writes a report itself: on the first row the Python scan would
 * report (or on anything unusual: a column of an unexpected type, an SQLite error), it returns the position and
 * why, and events.verify runs the pure-Python scan, so a report is always the Python scan's report.
 *
 * The row checks are exactly those of the Python scan: positions follow from `start`, each row's prev_hash is the
 * previous row's hash, the hash recomputed as in events/chain.py (text columns as the bytes SQLite returns,
 * payload as stored), stream versions go 1, 2, 3... per stream, recorded_at never goes backwards, column types
 * are those the Python scan can hash (anything else would be a "malformed_row" there), and the highest schema
 * version of each event type is returned for the registry check (done in Python).
 *
 * The GIL is released while SQLite is read and rows are hashed (OpenSSL's SHA-256).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/evp.h>
#include <sqlite3.h>
#include <stdint.h>
#include <string.h>

#define HASH_SIZE 32
#define N_COLS 13

static const char *QUERY =
    "SELECT position, stream_id, stream_version, event_type, schema_version, recorded_at, actor, command_id, "
    "causation_id, correlation_id, payload, prev_hash, hash FROM events WHERE position >= ?1 AND position <= ?2 "
    "ORDER BY position";

/* ---- a small open-addressing map: bytes key -> int64 (last stream version, or highest schema version) ---- */
typedef struct {
    uint64_t hash;
    char *key; /* NULL = empty slot */
    int len;
    int64_t value;
    int64_t first; /* (a later range) the stream's first version in the range, checked at the seam */
    int fresh;     /* created by this lookup */
} slot_t;

typedef struct {
    slot_t *slots;
    size_t cap; /* a power of two */
    size_t used;
} map_t;

static uint64_t hash_bytes(const unsigned char *p, int n) {
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
    if (n > 0) memcpy(&w, p, (size_t)n);
    h = (h ^ w) * 0xc4ceb9fe1a85ec53ULL;
    return h ^ (h >> 29);
}

/* Keys crafted to collide (a forged log can hold any stream ids) must not make the scan quadratic: past this
 * many probes map_get gives up and the caller leaves the log to the Python scan (whose dict is SipHash'd). */
#define MAX_PROBES 512

static int map_init(map_t *m, size_t cap) {
    m->slots = calloc(cap, sizeof(slot_t));
    m->cap = cap;
    m->used = 0;
    return m->slots ? 0 : -1;
}

static void map_free(map_t *m) {
    if (!m->slots) return;
    for (size_t i = 0; i < m->cap; i++) free(m->slots[i].key);
    free(m->slots);
    m->slots = NULL;
}

static int map_grow(map_t *m) {
    size_t cap = m->cap * 2;
    slot_t *s = calloc(cap, sizeof(slot_t));
    if (!s) return -1;
    for (size_t i = 0; i < m->cap; i++) {
        slot_t *o = &m->slots[i];
        if (!o->key) continue;
        size_t j = o->hash & (cap - 1);
        while (s[j].key) j = (j + 1) & (cap - 1);
        s[j] = *o;
    }
    free(m->slots);
    m->slots = s;
    m->cap = cap;
    return 0;
}

/* The slot of `key` (created with value `absent` if new); NULL if out of memory or too many collisions. */
static slot_t *map_get(map_t *m, const unsigned char *key, int len, int64_t absent) {
    uint64_t h = hash_bytes(key, len);
    size_t j = h & (m->cap - 1);
    int probes = 0;
    while (m->slots[j].key) {
        slot_t *s = &m->slots[j];
        if (s->hash == h && s->len == len && memcmp(s->key, key, (size_t)len) == 0) return s;
        if (++probes > MAX_PROBES) return NULL;
        j = (j + 1) & (m->cap - 1);
    }
    if ((m->used + 1) * 2 > m->cap) {
        if (map_grow(m) < 0) return NULL;
        return map_get(m, key, len, absent);
    }
    char *copy = malloc(len > 0 ? (size_t)len : 1);
    if (!copy) return NULL;
    if (len > 0) memcpy(copy, key, (size_t)len);
    slot_t *s = &m->slots[j];
    s->hash = h;
    s->key = copy;
    s->len = len;
    s->value = absent;
    s->first = absent;
    s->fresh = 1;
    m->used++;
    return s;
}

static PyObject *map_to_dict(map_t *m, int firsts) {
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    for (size_t i = 0; i < m->cap; i++) {
        slot_t *s = &m->slots[i];
        if (!s->key) continue;
        PyObject *k = PyBytes_FromStringAndSize(s->key, s->len);
        PyObject *v = PyLong_FromLongLong(firsts ? s->first : s->value);
        if (!k || !v || PyDict_SetItem(d, k, v) < 0) {
            Py_XDECREF(k);
            Py_XDECREF(v);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(k);
        Py_DECREF(v);
    }
    return d;
}

/* ---- the scan ---- */
typedef struct {
    /* inputs */
    const char *uri;
    int64_t start;
    int64_t end;
    int check_streams; /* 0: link + hash only; 1: also stream versions and time, from position 1; 2: the same
                          for a later range, each stream's first version and the first time kept for the seam */
    unsigned char prev[HASH_SIZE];
    int64_t last_ts;
    const unsigned char *tag;
    size_t tag_len;
    const int64_t *wanted; /* sorted ascending */
    size_t n_wanted;
    /* outputs */
    int64_t count;
    int64_t first_ts;
    int64_t expected; /* the next position */
    int64_t anomaly_position;
    const char *anomaly; /* NULL = clean */
    char sqlite_error[256];
    unsigned char (*wanted_hashes)[HASH_SIZE];
    char *wanted_found;
    map_t streams;
    map_t types;
} scan_t;

static void put_be(unsigned char *p, uint64_t v, int n) {
    for (int i = n - 1; i >= 0; i--) {
        p[i] = (unsigned char)(v & 0xff);
        v >>= 8;
    }
}

static int buf_reserve(unsigned char **buf, size_t *cap, size_t need) {
    if (need <= *cap) return 0;
    size_t c = *cap ? *cap : 4096;
    while (c < need) c *= 2;
    unsigned char *b = realloc(*buf, c);
    if (!b) return -1;
    *buf = b;
    *cap = c;
    return 0;
}

#define ANOMALY(pos, why)          \
    do {                           \
        sc->anomaly_position = pos; \
        sc->anomaly = why;         \
        goto done;                 \
    } while (0)

static void run_scan(scan_t *sc) {
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    EVP_MD_CTX *ctx = NULL;
    EVP_MD *md = NULL;
    unsigned char *buf = NULL;
    size_t cap = 0;
    size_t wi = 0;
    int rc;
    sc->expected = sc->start;
    sc->anomaly_position = sc->start;
    rc = sqlite3_open_v2(sc->uri, &db, SQLITE_OPEN_READONLY | SQLITE_OPEN_URI | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc != SQLITE_OK) ANOMALY(sc->start, "cannot open the log");
    rc = sqlite3_prepare_v2(db, QUERY, -1, &st, NULL);
    if (rc != SQLITE_OK) ANOMALY(sc->start, "cannot prepare the query");
    sqlite3_bind_int64(st, 1, sc->start);
    sqlite3_bind_int64(st, 2, sc->end);
    ctx = EVP_MD_CTX_new();
    md = EVP_MD_fetch(NULL, "SHA256", NULL);
    if (!ctx || !md) ANOMALY(sc->start, "no SHA-256");
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        int ty[N_COLS];
        for (int c = 0; c < N_COLS; c++) ty[c] = sqlite3_column_type(st, c);
        int64_t pos = sqlite3_column_int64(st, 0);
        if (ty[0] != SQLITE_INTEGER || pos != sc->expected) ANOMALY(sc->expected, "position_gap");
        if (ty[1] != SQLITE_TEXT || ty[2] != SQLITE_INTEGER || ty[3] != SQLITE_TEXT || ty[4] != SQLITE_INTEGER ||
            ty[5] != SQLITE_INTEGER || ty[6] != SQLITE_TEXT || ty[10] != SQLITE_BLOB || ty[11] != SQLITE_BLOB ||
            ty[12] != SQLITE_BLOB)
            ANOMALY(pos, "column type");
        for (int c = 7; c <= 9; c++)
            if (ty[c] != SQLITE_TEXT && ty[c] != SQLITE_NULL) ANOMALY(pos, "column type");
        int64_t sv = sqlite3_column_int64(st, 2);
        int64_t schv = sqlite3_column_int64(st, 4);
        int64_t ts = sqlite3_column_int64(st, 5);
        if (schv < 0 || schv > 0xFFFFFFFFLL) ANOMALY(pos, "malformed_row");
        const void *prev_h = sqlite3_column_blob(st, 11);
        int prev_len = sqlite3_column_bytes(st, 11);
        if (prev_len != HASH_SIZE || memcmp(prev_h, sc->prev, HASH_SIZE) != 0) ANOMALY(pos, "broken_link");
        /* text columns: the bytes SQLite returns (what Python decodes, then re-encodes for the hash) */
        const unsigned char *txt[6];
        int len[6];
        int is_null[6];
        static const int tcols[6] = {1, 3, 6, 7, 8, 9};
        size_t total = sc->tag_len + HASH_SIZE + 52;
        for (int k = 0; k < 6; k++) {
            is_null[k] = ty[tcols[k]] == SQLITE_NULL;
            txt[k] = is_null[k] ? NULL : sqlite3_column_text(st, tcols[k]);
            len[k] = is_null[k] ? 0 : sqlite3_column_bytes(st, tcols[k]);
            if (!is_null[k] && !txt[k] && len[k] > 0) ANOMALY(pos, "out of memory");
            total += (size_t)len[k];
        }
        const void *payload = sqlite3_column_blob(st, 10);
        int payload_len = sqlite3_column_bytes(st, 10);
        total += (size_t)payload_len;
        if (buf_reserve(&buf, &cap, total) < 0) ANOMALY(pos, "out of memory");
        unsigned char *p = buf;
        memcpy(p, sc->tag, sc->tag_len);
        p += sc->tag_len;
        memcpy(p, prev_h, HASH_SIZE);
        p += HASH_SIZE;
        put_be(p, (uint64_t)pos, 8);
        put_be(p + 8, (uint64_t)sv, 8);
        put_be(p + 16, (uint64_t)ts, 8);
        put_be(p + 24, (uint64_t)schv, 4);
        p += 28;
        for (int k = 0; k < 6; k++) {
            put_be(p, is_null[k] ? 0xFFFFFFFFu : (uint32_t)len[k], 4);
            p += 4;
        }
        for (int k = 0; k < 6; k++) {
            if (len[k] > 0) memcpy(p, txt[k], (size_t)len[k]);
            p += len[k];
        }
        if (payload_len > 0) memcpy(p, payload, (size_t)payload_len);
        p += payload_len;
        unsigned char digest[HASH_SIZE];
        unsigned int dlen = 0;
        if (!EVP_DigestInit_ex2(ctx, md, NULL) || !EVP_DigestUpdate(ctx, buf, (size_t)(p - buf)) ||
            !EVP_DigestFinal_ex(ctx, digest, &dlen) || dlen != HASH_SIZE)
            ANOMALY(pos, "SHA-256 failed");
        const void *h = sqlite3_column_blob(st, 12);
        if (sqlite3_column_bytes(st, 12) != HASH_SIZE || memcmp(h, digest, HASH_SIZE) != 0)
            ANOMALY(pos, "hash_mismatch");
        if (sc->check_streams) {
            /* stream version: sv must be the stream's previous version + 1 (0 before its first event) */
            slot_t *s = map_get(&sc->streams, txt[0] ? txt[0] : (const unsigned char *)"", len[0], 0);
            if (!s) ANOMALY(pos, "out of memory or too many hash collisions");
            if (s->fresh && sc->check_streams == 2)
                s->first = sv; /* the stream's first event in this range: the caller checks it at the seam */
            else if ((uint64_t)sv != (uint64_t)s->value + 1)
                ANOMALY(pos, "stream_version_gap");
            s->fresh = 0;
            s->value = sv;
            if (sc->count == 0) sc->first_ts = ts;
            if (ts < sc->last_ts) ANOMALY(pos, "time_backwards");
            sc->last_ts = ts;
            slot_t *t = map_get(&sc->types, txt[1] ? txt[1] : (const unsigned char *)"", len[1], -1);
            if (!t) ANOMALY(pos, "out of memory or too many hash collisions");
            if (schv > t->value) t->value = schv;
        }
        while (wi < sc->n_wanted && sc->wanted[wi] < pos) wi++;
        if (wi < sc->n_wanted && sc->wanted[wi] == pos) {
            memcpy(sc->wanted_hashes[wi], h, HASH_SIZE);
            sc->wanted_found[wi] = 1;
        }
        memcpy(sc->prev, h, HASH_SIZE);
        sc->expected = pos + 1;
        sc->count++;
    }
    if (rc != SQLITE_DONE) {
        snprintf(sc->sqlite_error, sizeof sc->sqlite_error, "%s", sqlite3_errmsg(db));
        ANOMALY(sc->expected, "unreadable");
    }
done:
    free(buf);
    if (md) EVP_MD_free(md);
    if (ctx) EVP_MD_CTX_free(ctx);
    if (st) sqlite3_finalize(st);
    if (db) sqlite3_close(db);
}

PyDoc_STRVAR(scan_doc,
             "scan(uri, start, end, prev_hash, last_ts, tag, wanted, check_streams) -> tuple\n\n"
             "('clean', count, next_position, head_hash, last_ts, {stream_id: version}, {event_type: max schema "
             "version}, {position: hash}, {stream_id: first version in the range} (check_streams=2), first_ts) "
             "or ('anomaly', position, why): see events/verify.py.");

static PyObject *scan(PyObject *self, PyObject *args) {
    const char *uri;
    long long start, end, last_ts;
    int check_streams;
    Py_buffer prev, tag;
    PyObject *wanted_obj;
    (void)self;
    if (!PyArg_ParseTuple(args, "sLLy*Ly*Oi", &uri, &start, &end, &prev, &last_ts, &tag, &wanted_obj,
                          &check_streams)) return NULL;
    PyObject *result = NULL;
    scan_t sc;
    memset(&sc, 0, sizeof sc);
    PyObject *wanted_seq = NULL;
    int64_t *wanted = NULL;
    if (check_streams < 0 || check_streams > 2) {
        PyErr_SetString(PyExc_ValueError, "check_streams must be 0, 1 or 2");
        goto out;
    }
    if (prev.len != HASH_SIZE) {
        PyErr_SetString(PyExc_ValueError, "prev_hash must be 32 bytes");
        goto out;
    }
    wanted_seq = PySequence_Fast(wanted_obj, "wanted must be a sequence of positions");
    if (!wanted_seq) goto out;
    Py_ssize_t nw = PySequence_Fast_GET_SIZE(wanted_seq);
    wanted = PyMem_Calloc((size_t)nw + 1, sizeof(int64_t));
    sc.wanted_hashes = PyMem_Calloc((size_t)nw + 1, HASH_SIZE);
    sc.wanted_found = PyMem_Calloc((size_t)nw + 1, 1);
    if (!wanted || !sc.wanted_hashes || !sc.wanted_found) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < nw; i++) {
        wanted[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(wanted_seq, i));
        if (wanted[i] == -1 && PyErr_Occurred()) goto out;
        if (i > 0 && wanted[i] < wanted[i - 1]) {
            PyErr_SetString(PyExc_ValueError, "wanted positions must be sorted");
            goto out;
        }
    }
    if (map_init(&sc.streams, 1024) < 0 || map_init(&sc.types, 64) < 0) {
        PyErr_NoMemory();
        goto out;
    }
    sc.uri = uri;
    sc.start = start;
    sc.end = end;
    sc.check_streams = check_streams;
    memcpy(sc.prev, prev.buf, HASH_SIZE);
    sc.last_ts = last_ts;
    sc.first_ts = last_ts;
    sc.tag = tag.buf;
    sc.tag_len = (size_t)tag.len;
    sc.wanted = wanted;
    sc.n_wanted = (size_t)nw;
    Py_BEGIN_ALLOW_THREADS run_scan(&sc);
    Py_END_ALLOW_THREADS if (sc.anomaly) {
        result = Py_BuildValue("(sLs)", "anomaly", (long long)sc.anomaly_position, sc.anomaly);
        goto out;
    }
    PyObject *streams = map_to_dict(&sc.streams, 0);
    PyObject *firsts = streams ? (check_streams == 2 ? map_to_dict(&sc.streams, 1) : PyDict_New()) : NULL;
    PyObject *types = firsts ? map_to_dict(&sc.types, 0) : NULL;
    PyObject *hashes = types ? PyDict_New() : NULL;
    for (Py_ssize_t i = 0; hashes && i < nw; i++) {
        if (!sc.wanted_found[i]) continue;
        PyObject *k = PyLong_FromLongLong(wanted[i]);
        PyObject *v = PyBytes_FromStringAndSize((const char *)sc.wanted_hashes[i], HASH_SIZE);
        if (!k || !v || PyDict_SetItem(hashes, k, v) < 0) Py_CLEAR(hashes);
        Py_XDECREF(k);
        Py_XDECREF(v);
    }
    if (hashes)
        result = Py_BuildValue("(sLLy#LOOOOL)", "clean", (long long)sc.count, (long long)sc.expected,
                               (const char *)sc.prev, (Py_ssize_t)HASH_SIZE, (long long)sc.last_ts, streams, types,
                               hashes, firsts, (long long)sc.first_ts);
    Py_XDECREF(streams);
    Py_XDECREF(firsts);
    Py_XDECREF(types);
    Py_XDECREF(hashes);
out:
    map_free(&sc.streams);
    map_free(&sc.types);
    PyMem_Free(wanted);
    PyMem_Free(sc.wanted_hashes);
    PyMem_Free(sc.wanted_found);
    Py_XDECREF(wanted_seq);
    PyBuffer_Release(&prev);
    PyBuffer_Release(&tag);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, scan_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "events._chainscan", "Accelerator of events.verify (see events/verify.py).", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__chainscan(void) { return PyModule_Create(&module); }
