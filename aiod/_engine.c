/* aiod._engine: the per-batch hot path of aiod, compiled.
 *
 * One call per batch fills iocbs from preallocated ops, stamps times, calls
 * io_submit (learning the errno of a rejected iocb, handing the rest back on
 * EAGAIN), reaps (io_getevents, or the mmapped completion ring when asked and
 * its magic checks out), classifies every completion and adds it to the
 * per-(job, op) counters and latency histograms, which live in C arrays.
 * Ring.cycle can run several such rounds of reap and resubmit in one call, so
 * that at low depth the Python around a call is paid once per many ops.
 *
 * Consistency: every counter is changed only by the thread that called into
 * the engine, while it holds the GIL, in stretches that make no Python
 * allocation (an allocation can run the garbage collector, which can run
 * Python code and switch threads). A snapshot copies the counters with the
 * GIL held before it builds any Python object. So every snapshot, from any
 * thread, sees each row with submitted == completed + cancelled + failed +
 * in_flight. The GIL is released only around syscalls, when no counter is
 * half changed; a call of several rounds holds to this in each round, and a
 * snapshot taken between two rounds sees the first one whole.
 *
 * Objects: Accounting (rows of counters), OpSet (a job's preallocated ops
 * and its offset pattern), Ring (one kernel context: submit, reap, cancel).
 * Setup and destroy of the context itself stay in aiod.aio (ctypes).
 */
#define PY_SSIZE_T_CLEAN
/* The stable ABI of 3.11: one build serves every later CPython (Debian 12's
 * 3.11 and 13's 3.13 alike). */
#define Py_LIMITED_API 0x030B0000
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NERR 256          /* errno counters per row; larger errnos share the last */
#define FINE_N 3712       /* log-linear buckets: exact below 128, 64 per octave to 2^63 */
#define AIO_RING_MAGIC 0xa10a10a1u
#define MAX_NOTES 4096    /* notes kept per OpSet between take_notes() calls */
/* cycle()'s io_submit size for a set whose reads and writes are all O_DIRECT.
 * One io_submit of everything ready keeps its ops from the device until the
 * call returns (the kernel plugs an io_submit of more than 2 iocbs), and the
 * completions that arrive meanwhile wait for the next reap. Measured here at
 * iodepth 32 (in-process A/B, switching every 100 ms): 2 or 4 per call beat
 * all-at-once by 3-20 % in IOPS, 2 and 4 alike; 4 costs ~12 % less CPU per op. */
#define DIRECT_BATCH 4

enum { OUT_COMPLETED = 0, OUT_CANCELLED = 1, OUT_FAILED = 2, OUT_REJECTED = 3, OUT_SHORT = 4 };
enum { PAT_FIXED = 0, PAT_SEQ = 1, PAT_RAND = 2 };

/* ------------------------------------------------------------------ time */
static inline int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline double wall_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static inline uint32_t fine_index(int64_t ns) {
    if (ns < 128) return ns > 0 ? (uint32_t)ns : 0;
    int bits = 64 - __builtin_clzll((uint64_t)ns);
    int shift = bits - 7;
    uint32_t idx = ((uint32_t)shift << 6) + (uint32_t)((uint64_t)ns >> shift);
    return idx < FINE_N ? idx : FINE_N - 1;
}

/* -------------------------------------------------------------- syscalls */
static inline long sys_submit(aio_context_t ctx, long n, struct iocb **p) {
    return syscall(SYS_io_submit, ctx, n, p);
}
static inline long sys_getevents(aio_context_t ctx, long mn, long mx, struct io_event *ev,
                                 struct timespec *ts) {
    return syscall(SYS_io_getevents, ctx, mn, mx, ev, ts);
}
static inline long sys_cancel(aio_context_t ctx, struct iocb *cb, struct io_event *ev) {
    return syscall(SYS_io_cancel, ctx, cb, ev);
}

/* Heap types (the stable ABI has no static ones): free, then drop the type. */
static void free_self(PyObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    freefunc f = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    f(self);
    Py_DECREF(tp);
}

/* ============================================================ Accounting */
typedef struct {
    uint64_t submitted, completed, cancelled, failed, shorts, in_flight, bytes;
    uint64_t lat_sum, lat_count;
    double last_completion;   /* wall clock; 0 = never */
    uint64_t errnos[NERR];
    uint64_t *buckets;        /* nbounds + 1, the last is +Inf */
    uint64_t *fine_clat;      /* FINE_N or NULL */
    uint64_t *fine_lat;
    int used;
} Row;

typedef struct {
    PyObject_HEAD
    Row *rows;
    Py_ssize_t nrows, cap;
    int64_t *bounds;
    int nbounds;
} Accounting;

static PyObject *AccountingType;

static void row_free(Row *r) {
    free(r->buckets);
    free(r->fine_clat);
    free(r->fine_lat);
    memset(r, 0, sizeof *r);
}

static int Accounting_init(Accounting *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"bounds_ns", NULL};
    PyObject *bounds;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O", kwlist, &bounds)) return -1;
    PyObject *seq = PySequence_Tuple(bounds);
    if (!seq) return -1;
    Py_ssize_t n = PyTuple_Size(seq);
    self->bounds = calloc(n ? n : 1, sizeof(int64_t));
    if (!self->bounds) { Py_DECREF(seq); PyErr_NoMemory(); return -1; }
    for (Py_ssize_t i = 0; i < n; i++) {
        long long v = PyLong_AsLongLong(PyTuple_GetItem(seq, i));
        if (v == -1 && PyErr_Occurred()) { Py_DECREF(seq); return -1; }
        if (i && v <= self->bounds[i - 1]) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "bounds_ns must increase");
            return -1;
        }
        self->bounds[i] = v;
    }
    Py_DECREF(seq);
    self->nbounds = (int)n;
    return 0;
}

static void Accounting_dealloc(Accounting *self) {
    for (Py_ssize_t i = 0; i < self->nrows; i++) row_free(&self->rows[i]);
    free(self->rows);
    free(self->bounds);
    free_self((PyObject *)self);
}

static PyObject *Accounting_add_row(Accounting *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fine", NULL};
    int fine = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p", kwlist, &fine)) return NULL;
    Py_ssize_t idx = -1;
    for (Py_ssize_t i = 0; i < self->nrows; i++)
        if (!self->rows[i].used) { idx = i; break; }
    if (idx < 0) {
        if (self->nrows == self->cap) {
            Py_ssize_t cap = self->cap ? self->cap * 2 : 8;
            Row *r = realloc(self->rows, cap * sizeof(Row));
            if (!r) return PyErr_NoMemory();
            memset(r + self->cap, 0, (cap - self->cap) * sizeof(Row));
            self->rows = r;
            self->cap = cap;
        }
        idx = self->nrows++;
    }
    Row *r = &self->rows[idx];
    memset(r, 0, sizeof *r);
    r->buckets = calloc(self->nbounds + 1, sizeof(uint64_t));
    if (fine) {
        r->fine_clat = calloc(FINE_N, sizeof(uint64_t));
        r->fine_lat = calloc(FINE_N, sizeof(uint64_t));
    }
    if (!r->buckets || (fine && (!r->fine_clat || !r->fine_lat))) {
        row_free(r);
        return PyErr_NoMemory();
    }
    r->used = 1;
    return PyLong_FromSsize_t(idx);
}

static Row *get_row(Accounting *self, Py_ssize_t i) {
    if (i < 0 || i >= self->nrows || !self->rows[i].used) {
        PyErr_Format(PyExc_IndexError, "no accounting row %zd", i);
        return NULL;
    }
    return &self->rows[i];
}

static PyObject *Accounting_drop_row(Accounting *self, PyObject *arg) {
    Py_ssize_t i = PyLong_AsSsize_t(arg);
    if (i == -1 && PyErr_Occurred()) return NULL;
    Row *r = get_row(self, i);
    if (!r) return NULL;
    if (r->in_flight) {
        PyErr_Format(PyExc_ValueError, "row %zd has %llu operations in flight", i,
                     (unsigned long long)r->in_flight);
        return NULL;
    }
    row_free(r);
    Py_RETURN_NONE;
}

/* A consistent copy of one row, then its Python form:
 * dict(submitted, completed, cancelled, failed: {errno: n}, short, in_flight,
 *      buckets: tuple, latency_sum_ns, latency_count, last_completion) */
static PyObject *row_to_dict(const Row *c, const uint64_t *buckets, int nb) {
    PyObject *failed = PyDict_New();
    if (!failed) return NULL;
    for (int e = 0; e < NERR; e++) {
        if (!c->errnos[e]) continue;
        PyObject *k = PyLong_FromLong(e), *v = PyLong_FromUnsignedLongLong(c->errnos[e]);
        if (!k || !v || PyDict_SetItem(failed, k, v) < 0) {
            Py_XDECREF(k); Py_XDECREF(v); Py_DECREF(failed); return NULL;
        }
        Py_DECREF(k); Py_DECREF(v);
    }
    PyObject *bt = PyTuple_New(nb + 1);
    if (!bt) { Py_DECREF(failed); return NULL; }
    for (int i = 0; i <= nb; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(buckets[i]);
        if (!v) { Py_DECREF(bt); Py_DECREF(failed); return NULL; }
        PyTuple_SetItem(bt, i, v);
    }
    PyObject *last = c->last_completion > 0 ? PyFloat_FromDouble(c->last_completion)
                                            : (Py_INCREF(Py_None), Py_None);
    PyObject *d = Py_BuildValue(
        "{s:K,s:K,s:K,s:N,s:K,s:K,s:K,s:N,s:K,s:K,s:N}",
        "submitted", (unsigned long long)c->submitted,
        "completed", (unsigned long long)c->completed,
        "cancelled", (unsigned long long)c->cancelled,
        "failed", failed,
        "short", (unsigned long long)c->shorts,
        "in_flight", (unsigned long long)c->in_flight,
        "bytes", (unsigned long long)c->bytes,
        "buckets", bt,
        "latency_sum_ns", (unsigned long long)c->lat_sum,
        "latency_count", (unsigned long long)c->lat_count,
        "last_completion", last);
    return d;
}

/* snapshot() -> {row: dict} for every live row, all copied in one GIL hold. */
static PyObject *Accounting_snapshot(Accounting *self, PyObject *Py_UNUSED(ignored)) {
    Py_ssize_t n = self->nrows;
    int nb = self->nbounds;
    Row *copy = malloc((n ? n : 1) * sizeof(Row));
    uint64_t *bk = malloc((n ? n : 1) * (nb + 1) * sizeof(uint64_t));
    if (!copy || !bk) { free(copy); free(bk); return PyErr_NoMemory(); }
    /* No Python call between here and the end of the copy. */
    for (Py_ssize_t i = 0; i < n; i++) {
        copy[i] = self->rows[i];
        if (copy[i].used) memcpy(bk + i * (nb + 1), self->rows[i].buckets, (nb + 1) * sizeof(uint64_t));
    }
    PyObject *out = PyDict_New();
    for (Py_ssize_t i = 0; out && i < n; i++) {
        if (!copy[i].used) continue;
        PyObject *d = row_to_dict(&copy[i], bk + i * (nb + 1), nb);
        PyObject *k = PyLong_FromSsize_t(i);
        if (!d || !k || PyDict_SetItem(out, k, d) < 0) Py_CLEAR(out);
        Py_XDECREF(d); Py_XDECREF(k);
    }
    free(copy);
    free(bk);
    return out;
}

static PyObject *fine_dict(const uint64_t *h) {
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    for (int i = 0; i < FINE_N; i++) {
        if (!h[i]) continue;
        PyObject *k = PyLong_FromLong(i), *v = PyLong_FromUnsignedLongLong(h[i]);
        if (!k || !v || PyDict_SetItem(d, k, v) < 0) {
            Py_XDECREF(k); Py_XDECREF(v); Py_DECREF(d); return NULL;
        }
        Py_DECREF(k); Py_DECREF(v);
    }
    return d;
}

/* fine(row) -> (clat {index: n}, lat {index: n}); indexes as aiod.benchresult.hist_index. */
static PyObject *Accounting_fine(Accounting *self, PyObject *arg) {
    Py_ssize_t i = PyLong_AsSsize_t(arg);
    if (i == -1 && PyErr_Occurred()) return NULL;
    Row *r = get_row(self, i);
    if (!r) return NULL;
    if (!r->fine_clat) {
        PyErr_Format(PyExc_ValueError, "row %zd keeps no fine histogram", i);
        return NULL;
    }
    uint64_t *c = malloc(2 * FINE_N * sizeof(uint64_t));
    if (!c) return PyErr_NoMemory();
    memcpy(c, r->fine_clat, FINE_N * sizeof(uint64_t));
    memcpy(c + FINE_N, r->fine_lat, FINE_N * sizeof(uint64_t));
    PyObject *a = fine_dict(c), *b = a ? fine_dict(c + FINE_N) : NULL;
    free(c);
    if (!b) { Py_XDECREF(a); return NULL; }
    return Py_BuildValue("(NN)", a, b);
}

static PyMethodDef Accounting_methods[] = {
    {"add_row", (PyCFunction)(void (*)(void))Accounting_add_row, METH_VARARGS | METH_KEYWORDS,
     "add_row(fine=False) -> row index: a new (job, op) row at zero."},
    {"drop_row", (PyCFunction)Accounting_drop_row, METH_O,
     "drop_row(row): forget a row that has nothing in flight."},
    {"snapshot", (PyCFunction)Accounting_snapshot, METH_NOARGS,
     "snapshot() -> {row: counters}: every row, copied at one instant."},
    {"fine", (PyCFunction)Accounting_fine, METH_O,
     "fine(row) -> (clat, lat): the log-linear histograms, {bucket index: count}."},
    {NULL}
};

static PyObject *Accounting_get_nbuckets(Accounting *self, void *c) {
    return PyLong_FromLong(self->nbounds + 1);
}

static PyGetSetDef Accounting_getset[] = {
    {"nbuckets", (getter)Accounting_get_nbuckets, NULL, "Prometheus buckets per row (+Inf last)", NULL},
    {NULL}
};

static PyType_Slot Accounting_slots[] = {
    {Py_tp_doc, (void *)("Accounting(bounds_ns): per-(job, op) counters and histograms in C arrays.")},
    {Py_tp_new, (void *)PyType_GenericNew},
    {Py_tp_init, (void *)Accounting_init},
    {Py_tp_dealloc, (void *)Accounting_dealloc},
    {Py_tp_methods, Accounting_methods},
    {Py_tp_getset, Accounting_getset},
    {0, NULL},
};

static PyType_Spec Accounting_spec = {
    "aiod._engine.Accounting", sizeof(Accounting), 0, Py_TPFLAGS_DEFAULT, Accounting_slots,
};

/* ================================================================= OpSet */
struct Ring;
struct OpSet;

typedef struct Op {
    struct iocb cb;             /* aio_data points back here */
    struct Op *prev, *next;     /* the ring's in-flight list, oldest first */
    struct OpSet *set;
    struct Ring *ring;          /* set while in flight */
    int64_t sub_ns, iss_ns;
    uint32_t row, index;
    uint8_t cls, inflight, cancel_req, flagged;
} Op;

typedef struct { uint32_t index; uint8_t kind; int64_t value; } Note;

typedef struct OpSet {
    PyObject_HEAD
    Accounting *acct;
    Op *ops;
    uint32_t n, cap;
    uint32_t *free[2];
    uint32_t nfree[2];
    uint32_t *held;             /* refused during this cycle(): freed when it ends */
    uint32_t nheld;
    uint32_t ndata, ndirect;    /* reads and writes added; those on an O_DIRECT fd */
    uint32_t in_flight;
    uint32_t depth;             /* at most this many in flight (0: no limit) */
    PyObject *owners;           /* list: buffers the kernel touches, kept alive */
    int pattern;
    uint64_t nblocks, bs, seq, rng;
    double mix;                 /* chance that an op is of class 1 (randrw) */
    Note *notes;
    uint32_t nnotes;
    uint64_t notes_dropped;
} OpSet;

static PyObject *OpSetType;

static inline uint64_t next_rand(uint64_t *s) {    /* splitmix64 */
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static int OpSet_init(OpSet *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"accounting", "capacity", "pattern", "nblocks", "block_size",
                             "seed", "mix", "depth", NULL};
    PyObject *acct;
    Py_ssize_t cap;
    const char *pattern = "fixed";
    unsigned long long nblocks = 0, bs = 0, seed = 0;
    double mix = 0.0;
    unsigned int depth = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!n|sKKKdI", kwlist, (PyTypeObject *)AccountingType, &acct,
                                     &cap, &pattern, &nblocks, &bs, &seed, &mix, &depth))
        return -1;
    if (cap < 1 || cap > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "capacity must be between 1 and 16777216");
        return -1;
    }
    if (!strcmp(pattern, "fixed")) self->pattern = PAT_FIXED;
    else if (!strcmp(pattern, "seq")) self->pattern = PAT_SEQ;
    else if (!strcmp(pattern, "rand")) self->pattern = PAT_RAND;
    else { PyErr_SetString(PyExc_ValueError, "pattern must be 'fixed', 'seq' or 'rand'"); return -1; }
    if (self->pattern != PAT_FIXED && (nblocks == 0 || bs == 0)) {
        PyErr_SetString(PyExc_ValueError, "'seq' and 'rand' need nblocks >= 1 and block_size >= 1");
        return -1;
    }
    if (mix < 0.0 || mix > 1.0) { PyErr_SetString(PyExc_ValueError, "mix must be in [0, 1]"); return -1; }
    Py_INCREF(acct);
    self->acct = (Accounting *)acct;
    self->cap = (uint32_t)cap;
    self->ops = calloc(cap, sizeof(Op));
    self->free[0] = malloc(cap * sizeof(uint32_t));
    self->free[1] = malloc(cap * sizeof(uint32_t));
    self->held = malloc(cap * sizeof(uint32_t));
    self->notes = malloc(MAX_NOTES * sizeof(Note));
    self->owners = PyList_New(0);
    if (!self->ops || !self->free[0] || !self->free[1] || !self->held || !self->notes || !self->owners) {
        PyErr_NoMemory();
        return -1;
    }
    self->nblocks = nblocks;
    self->bs = bs;
    self->rng = seed;
    self->mix = mix;
    self->depth = depth;
    return 0;
}

static void OpSet_dealloc(OpSet *self) {
    /* Never reached with ops in flight: each in-flight op holds a reference. */
    free(self->ops);
    free(self->free[0]);
    free(self->free[1]);
    free(self->held);
    free(self->notes);
    Py_XDECREF(self->owners);
    Py_XDECREF((PyObject *)self->acct);
    free_self((PyObject *)self);
}

static inline int is_data(uint16_t code) {   /* the opcodes that take an offset */
    return code == IOCB_CMD_PREAD || code == IOCB_CMD_PWRITE || code == IOCB_CMD_PREADV ||
           code == IOCB_CMD_PWRITEV;
}

/* add(opcode, fd, buf, nbytes, row, cls=0, offset=0, rw_flags=0, owner=None) -> index */
static PyObject *OpSet_add(OpSet *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"opcode", "fd", "buf", "nbytes", "row", "cls", "offset",
                             "rw_flags", "owner", NULL};
    int opcode, fd, cls = 0, rw_flags = 0;
    unsigned long long buf, nbytes;
    long long offset = 0;
    Py_ssize_t row;
    PyObject *owner = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iiKKn|iLiO", kwlist, &opcode, &fd, &buf,
                                     &nbytes, &row, &cls, &offset, &rw_flags, &owner))
        return NULL;
    if (self->n == self->cap) { PyErr_SetString(PyExc_ValueError, "the OpSet is full"); return NULL; }
    if (cls != 0 && cls != 1) { PyErr_SetString(PyExc_ValueError, "cls must be 0 or 1"); return NULL; }
    if (!get_row(self->acct, row)) return NULL;
    if (owner != Py_None && PyList_Append(self->owners, owner) < 0) return NULL;
    uint32_t i = self->n++;
    Op *op = &self->ops[i];
    memset(op, 0, sizeof *op);
    op->cb.aio_lio_opcode = (uint16_t)opcode;
    op->cb.aio_fildes = (uint32_t)fd;
    op->cb.aio_buf = buf;
    op->cb.aio_nbytes = nbytes;
    op->cb.aio_offset = offset;
    op->cb.aio_rw_flags = rw_flags;
    op->set = self;
    op->row = (uint32_t)row;
    op->index = i;
    op->cls = (uint8_t)cls;
    self->free[cls][self->nfree[cls]++] = i;
    if (is_data(op->cb.aio_lio_opcode)) {
        int fl = fcntl(fd, F_GETFL);
        self->ndata++;
        if (fl != -1 && (fl & O_DIRECT)) self->ndirect++;
    }
    return PyLong_FromUnsignedLong(i);
}

static inline void add_note(OpSet *s, uint32_t index, uint8_t kind, int64_t value) {
    if (s->nnotes < MAX_NOTES) s->notes[s->nnotes++] = (Note){index, kind, value};
    else s->notes_dropped++;
}

/* take_notes() -> (list of (index, kind, value), dropped): failed, rejected, short ops. */
static PyObject *OpSet_take_notes(OpSet *self, PyObject *Py_UNUSED(ignored)) {
    static const char *kinds[] = {"completed", "cancelled", "failed", "rejected", "short"};
    PyObject *l = PyList_New(self->nnotes);
    if (!l) return NULL;
    for (uint32_t i = 0; i < self->nnotes; i++) {
        Note *n = &self->notes[i];
        PyObject *t = Py_BuildValue("(IsL)", n->index, kinds[n->kind], (long long)n->value);
        if (!t) { Py_DECREF(l); return NULL; }
        PyList_SetItem(l, i, t);
    }
    unsigned long long dropped = self->notes_dropped;
    self->nnotes = 0;
    self->notes_dropped = 0;
    return Py_BuildValue("(NK)", l, dropped);
}

/* overdue(now_ns, limit_ns) -> [index]: ops in flight longer than limit, each once per flight. */
static PyObject *OpSet_overdue(OpSet *self, PyObject *args) {
    long long now, limit;
    if (!PyArg_ParseTuple(args, "LL", &now, &limit)) return NULL;
    PyObject *l = PyList_New(0);
    if (!l) return NULL;
    for (uint32_t i = 0; i < self->n; i++) {
        Op *op = &self->ops[i];
        if (op->inflight && !op->flagged && now - op->sub_ns > limit) {
            op->flagged = 1;
            PyObject *v = PyLong_FromUnsignedLong(i);
            if (!v || PyList_Append(l, v) < 0) { Py_XDECREF(v); Py_DECREF(l); return NULL; }
            Py_DECREF(v);
        }
    }
    return l;
}

static PyObject *OpSet_op_info(OpSet *self, PyObject *arg) {
    Py_ssize_t i = PyLong_AsSsize_t(arg);
    if (i == -1 && PyErr_Occurred()) return NULL;
    if (i < 0 || (uint32_t)i >= self->n) { PyErr_SetString(PyExc_IndexError, "no such op"); return NULL; }
    Op *op = &self->ops[i];
    return Py_BuildValue("{s:i,s:i,s:L,s:K,s:K,s:n,s:i,s:O,s:L}", "opcode", op->cb.aio_lio_opcode,
                         "fd", (int)op->cb.aio_fildes, "offset", (long long)op->cb.aio_offset,
                         "buf", (unsigned long long)op->cb.aio_buf,
                         "nbytes", (unsigned long long)op->cb.aio_nbytes, "row", (Py_ssize_t)op->row,
                         "cls", op->cls, "in_flight", op->inflight ? Py_True : Py_False,
                         "submitted_ns", (long long)op->sub_ns);
}

/* release(index): give back an op that account_lost(keep_alive=True) kept
 * (neither free nor in flight), once io_destroy has returned after all. */
static PyObject *OpSet_release(OpSet *self, PyObject *arg) {
    Py_ssize_t i = PyLong_AsSsize_t(arg);
    if (i == -1 && PyErr_Occurred()) return NULL;
    if (i < 0 || (uint32_t)i >= self->n) { PyErr_SetString(PyExc_IndexError, "no such op"); return NULL; }
    Op *op = &self->ops[i];
    if (op->inflight) { PyErr_Format(PyExc_ValueError, "op %zd is in flight", i); return NULL; }
    for (uint32_t k = 0; k < self->nfree[op->cls]; k++)
        if (self->free[op->cls][k] == (uint32_t)i) {
            PyErr_Format(PyExc_ValueError, "op %zd is free already", i);
            return NULL;
        }
    self->free[op->cls][self->nfree[op->cls]++] = (uint32_t)i;
    Py_DECREF((PyObject *)self);    /* the reference the op held while kept */
    Py_RETURN_NONE;
}

static inline uint32_t ready(OpSet *s) {   /* ops that may be submitted now */
    uint32_t avail = s->nfree[0] + s->nfree[1];
    if (s->depth) {
        uint32_t room = s->in_flight >= s->depth ? 0 : s->depth - s->in_flight;
        if (avail > room) avail = room;
    }
    return avail;
}

static PyObject *OpSet_get_free(OpSet *self, void *c) {
    return PyLong_FromUnsignedLong(self->nfree[0] + self->nfree[1]);
}
static PyObject *OpSet_get_ready(OpSet *self, void *c) {
    return PyLong_FromUnsignedLong(ready(self));
}
static PyObject *OpSet_get_in_flight(OpSet *self, void *c) {
    return PyLong_FromUnsignedLong(self->in_flight);
}
static PyObject *OpSet_get_size(OpSet *self, void *c) {
    return PyLong_FromUnsignedLong(self->n);
}
static inline int set_direct(const OpSet *s) {
    return s->ndata > 0 && s->ndirect == s->ndata;
}
static PyObject *OpSet_get_direct(OpSet *self, void *c) {
    return PyBool_FromLong(set_direct(self));
}

static PyMethodDef OpSet_methods[] = {
    {"add", (PyCFunction)(void (*)(void))OpSet_add, METH_VARARGS | METH_KEYWORDS,
     "add(opcode, fd, buf, nbytes, row, cls=0, offset=0, rw_flags=0, owner=None) -> index"},
    {"take_notes", (PyCFunction)OpSet_take_notes, METH_NOARGS,
     "take_notes() -> ([(index, kind, value)], dropped): failed (value errno), rejected "
     "(errno), short (bytes moved) since the last call."},
    {"overdue", (PyCFunction)OpSet_overdue, METH_VARARGS,
     "overdue(now_ns, limit_ns) -> [index]: in flight longer than limit, reported once per flight."},
    {"op_info", (PyCFunction)OpSet_op_info, METH_O, "op_info(index) -> dict (for logs and tests)."},
    {"release", (PyCFunction)OpSet_release, METH_O,
     "release(index): free an op account_lost(keep_alive=True) kept, once io_destroy returned."},
    {NULL}
};

static PyGetSetDef OpSet_getset[] = {
    {"free", (getter)OpSet_get_free, NULL, "ops not in flight", NULL},
    {"ready", (getter)OpSet_get_ready, NULL, "ops that may be submitted now (free, within depth)", NULL},
    {"in_flight", (getter)OpSet_get_in_flight, NULL, "ops in flight", NULL},
    {"size", (getter)OpSet_get_size, NULL, "ops added", NULL},
    {"direct", (getter)OpSet_get_direct, NULL,
     "every read and write added is on an O_DIRECT fd (and there is one)", NULL},
    {NULL}
};

static PyType_Slot OpSet_slots[] = {
    {Py_tp_doc, (void *)("OpSet(accounting, capacity, pattern='fixed', nblocks=0, block_size=0, seed=0, "
              "mix=0.0, depth=0): a job's preallocated ops and how their offsets are chosen.")},
    {Py_tp_new, (void *)PyType_GenericNew},
    {Py_tp_init, (void *)OpSet_init},
    {Py_tp_dealloc, (void *)OpSet_dealloc},
    {Py_tp_methods, OpSet_methods},
    {Py_tp_getset, OpSet_getset},
    {0, NULL},
};

static PyType_Spec OpSet_spec = {
    "aiod._engine.OpSet", sizeof(OpSet), 0, Py_TPFLAGS_DEFAULT, OpSet_slots,
};

/* ================================================================== Ring */
struct aio_ring {
    unsigned id, nr, head, tail, magic, compat_features, incompat_features, header_length;
    struct io_event io_events[];
};

typedef struct Ring {
    PyObject_HEAD
    aio_context_t ctx;
    int efd;
    Op head;                    /* sentinel of the in-flight list */
    uint32_t in_flight;
    struct iocb **ptrs;
    uint32_t ptrcap;
    struct io_event *events;
    uint32_t evcap;
    struct aio_ring *uring;     /* NULL: io_getevents only */
    int busy, closed;
    struct io_event *pending;   /* completions io_cancel handed back itself (old kernels) */
    uint32_t npending, pendcap;
    uint64_t user_reaped, sys_reaped;
    uint64_t submit_calls;      /* io_submit syscalls made */
    uint64_t cycle_rounds;      /* rounds of reap and resubmit cycle() has run */
} Ring;

static PyObject *RingType;

static int Ring_init(Ring *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"ctx_id", "nr_events", "eventfd", "user_reap", NULL};
    unsigned long long ctx;
    unsigned int nr;
    int efd = -1, user = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KI|ip", kwlist, &ctx, &nr, &efd, &user))
        return -1;
    if (ctx == 0 || nr == 0) { PyErr_SetString(PyExc_ValueError, "ctx_id and nr_events must be non-zero"); return -1; }
    self->ctx = (aio_context_t)ctx;
    self->efd = efd;
    self->head.next = self->head.prev = &self->head;
    self->evcap = nr < 16 ? 16 : (nr > 65536 ? 65536 : nr);
    self->events = malloc(self->evcap * sizeof(struct io_event));
    self->ptrcap = self->evcap;
    self->ptrs = malloc(self->ptrcap * sizeof(struct iocb *));
    if (!self->events || !self->ptrs) { PyErr_NoMemory(); return -1; }
    if (user) {
        /* The ring is mapped at the context's id. Trust it only when it says so. */
        struct aio_ring *r = (struct aio_ring *)(uintptr_t)ctx;
        if (r->magic == AIO_RING_MAGIC && r->incompat_features == 0 &&
            r->header_length == sizeof(struct aio_ring) && r->nr > 0)
            self->uring = r;
    }
    return 0;
}

static void Ring_dealloc(Ring *self) {
    /* Ops still listed were never accounted (account_lost() was not called):
     * they keep their OpSets; drop those references so nothing leaks. */
    /* Ops still listed were never accounted (account_lost() was not called)
     * and the kernel may still write into their buffers: their OpSets (and
     * so the buffers) are deliberately kept alive. */
    free(self->events);
    free(self->ptrs);
    free(self->pending);
    free_self((PyObject *)self);
}

static int enter(Ring *self) {
    if (self->closed) { PyErr_SetString(PyExc_ValueError, "the ring's context is gone"); return -1; }
    if (self->busy) { PyErr_SetString(PyExc_RuntimeError, "Ring used from two threads at once"); return -1; }
    self->busy = 1;
    return 0;
}

static inline void list_add(Ring *r, Op *op) {
    op->prev = r->head.prev;
    op->next = &r->head;
    r->head.prev->next = op;
    r->head.prev = op;
}
static inline void list_del(Op *op) {
    op->prev->next = op->next;
    op->next->prev = op->prev;
    op->prev = op->next = NULL;
}

typedef struct { uint64_t ok, rejected, unsubmitted; int last_errno; } SubmitOut;
typedef struct { uint64_t completed, cancelled, failed; int last_errno; } ReapOut;

/* Take n ops from the set, fill and submit them. Called with the GIL held;
 * the GIL is released around io_submit only. */
/* Move the free op `index` to the top of its free stack (for submit(indices=)). */
static int to_top(OpSet *s, uint32_t index) {
    if (index >= s->n) return -1;
    Op *op = &s->ops[index];
    uint32_t *st = s->free[op->cls], nf = s->nfree[op->cls];
    for (uint32_t k = 0; k < nf; k++)
        if (st[k] == index) { st[k] = st[nf - 1]; st[nf - 1] = index; return op->cls; }
    return -1;
}

static int do_submit_ix(Ring *self, OpSet *s, uint32_t n, const int64_t *offsets,
                        const uint32_t *indices, int hold, SubmitOut *out);
/* hold: an op the kernel refuses is set aside (OpSet.held), not freed, so
 * that later io_submits of the same cycle() do not pick it again. */
static int do_submit(Ring *self, OpSet *s, uint32_t n, int hold, SubmitOut *out) {
    return do_submit_ix(self, s, n, NULL, NULL, hold, out);
}
static int do_submit_ix(Ring *self, OpSet *s, uint32_t n, const int64_t *offsets,
                        const uint32_t *indices, int hold, SubmitOut *out) {
    memset(out, 0, sizeof *out);
    uint32_t avail = s->nfree[0] + s->nfree[1];
    if (s->depth) avail = s->in_flight >= s->depth ? 0 : (avail < s->depth - s->in_flight ? avail : s->depth - s->in_flight);
    if (n > avail) n = avail;
    if (n == 0) return 0;
    if (n > self->ptrcap) {
        struct iocb **p = realloc(self->ptrs, n * sizeof(struct iocb *));
        if (!p) { PyErr_NoMemory(); return -1; }
        self->ptrs = p;
        self->ptrcap = n;
    }
    struct iocb **ptrs = self->ptrs;
    uint32_t flags = self->efd >= 0 ? IOCB_FLAG_RESFD : 0;
    for (uint32_t i = 0; i < n; i++) {
        int cls = 0;
        if (indices) {
            cls = to_top(s, indices[i]);
            if (cls < 0) {
                for (uint32_t k = 0; k < i; k++) {
                    Op *o = (Op *)(uintptr_t)ptrs[k]->aio_data;
                    s->free[o->cls][s->nfree[o->cls]++] = o->index;
                }
                PyErr_Format(PyExc_ValueError, "op %u is not free", indices[i]);
                return -1;
            }
        } else if (s->mix > 0.0) {
            cls = (double)(next_rand(&s->rng) >> 11) * 0x1.0p-53 < s->mix;
            if (!s->nfree[cls]) cls ^= 1;
        } else if (!s->nfree[0]) {
            cls = 1;
        }
        Op *op = &s->ops[s->free[cls][--s->nfree[cls]]];
        if (!s->acct->rows[op->row].used) {
            s->nfree[cls]++;
            for (uint32_t k = 0; k < i; k++) {
                Op *o = (Op *)(uintptr_t)ptrs[k]->aio_data;
                s->free[o->cls][s->nfree[o->cls]++] = o->index;
            }
            PyErr_Format(PyExc_ValueError, "op %u counts into dropped row %u", op->index, op->row);
            return -1;
        }
        if (!is_data(op->cb.aio_lio_opcode))
            ;   /* no offset: the kernel refuses one on POLL (EINVAL) */
        else if (offsets) op->cb.aio_offset = offsets[i];
        else if (s->pattern == PAT_RAND)
            op->cb.aio_offset = (int64_t)(((unsigned __int128)next_rand(&s->rng) * s->nblocks) >> 64) * (int64_t)s->bs;
        else if (s->pattern == PAT_SEQ) {
            op->cb.aio_offset = (int64_t)(s->seq * s->bs);
            if (++s->seq >= s->nblocks) s->seq = 0;
        }
        op->cb.aio_data = (uint64_t)(uintptr_t)op;
        op->cb.aio_flags = flags;
        op->cb.aio_resfd = flags ? (uint32_t)self->efd : 0;
        op->cancel_req = 0;
        op->flagged = 0;
        ptrs[i] = &op->cb;
    }
    int64_t t0 = mono_ns();
    uint32_t i = 0, bad = 0, stop = n;
    /* Rejected iocbs are moved to the end of ptrs' prefix; keep their positions. */
    int *errs = NULL;
    while (i < n) {
        long got;
        Py_BEGIN_ALLOW_THREADS
        got = sys_submit(self->ctx, n - i, ptrs + i);
        Py_END_ALLOW_THREADS
        self->submit_calls++;
        if (got == (long)(n - i)) { i = n; break; }
        if (got < 0) {
            int err = errno;
            if (err == EAGAIN || err == EINTR) { stop = i; break; }
            /* The kernel refused ptrs[i] with err: mark it and go on after it. */
            if (!errs) {
                errs = calloc(n, sizeof(int));
                if (!errs) { stop = i; break; }   /* hand the rest back */
            }
            errs[i] = err;
            bad++;
            out->last_errno = err;
            i++;
            continue;
        }
        i += (uint32_t)got;
    }
    if (i < stop) stop = i;
    int64_t t1 = mono_ns();
    /* Account: [0, stop) went to the kernel (or were refused), [stop, n) come back. */
    Row *rows = s->acct->rows;
    for (uint32_t k = 0; k < stop; k++) {
        Op *op = (Op *)(uintptr_t)ptrs[k]->aio_data;
        Row *r = &rows[op->row];
        r->submitted++;
        op->sub_ns = t0;
        op->iss_ns = t1;
        if (errs && errs[k]) {
            int e = errs[k] < NERR ? errs[k] : NERR - 1;
            r->failed++;
            r->errnos[e]++;
            if (hold) s->held[s->nheld++] = op->index;
            else s->free[op->cls][s->nfree[op->cls]++] = op->index;
            add_note(s, op->index, OUT_REJECTED, errs[k]);
            continue;
        }
        r->in_flight++;
        op->inflight = 1;
        op->ring = self;
        list_add(self, op);
        s->in_flight++;
        self->in_flight++;
        Py_INCREF((PyObject *)s);
        out->ok++;
    }
    for (uint32_t k = stop; k < n; k++) {
        Op *op = (Op *)(uintptr_t)ptrs[k]->aio_data;
        s->free[op->cls][s->nfree[op->cls]++] = op->index;
        out->unsubmitted++;
    }
    out->rejected = bad;
    free(errs);
    return 0;
}

/* Classify a batch of events and account for it. GIL held; no Python call
 * until every counter is done; OpSet references are dropped at the end. */
static void classify(Ring *self, struct io_event *ev, uint32_t got, ReapOut *out,
                     PyObject *detail, OpSet ***dropq, uint32_t *ndrop) {
    int64_t now = mono_ns();
    double wall = wall_s();
    for (uint32_t k = 0; k < got; k++) {
        Op *op = (Op *)(uintptr_t)ev[k].data;
        OpSet *s = op->set;
        Accounting *a = s->acct;
        Row *r = &a->rows[op->row];
        int64_t lat = now - op->sub_ns;
        int64_t res = ev[k].res;
        int kind;
        r->in_flight--;
        if (op->cancel_req) {
            kind = OUT_CANCELLED;
            r->cancelled++;
            out->cancelled++;
        } else {
            int lo = 0, hi = a->nbounds;  /* bisect_left over the bounds */
            while (lo < hi) { int mid = (lo + hi) >> 1; if (a->bounds[mid] < lat) lo = mid + 1; else hi = mid; }
            r->buckets[lo]++;
            r->lat_sum += (uint64_t)lat;
            r->lat_count++;
            r->last_completion = wall;
            if (res < 0) {
                int e = (int)-res;
                kind = OUT_FAILED;
                r->failed++;
                r->errnos[e < NERR ? e : NERR - 1]++;
                out->failed++;
                out->last_errno = e;
                add_note(s, op->index, OUT_FAILED, e);
            } else {
                kind = OUT_COMPLETED;
                r->completed++;
                r->bytes += (uint64_t)res;
                out->completed++;
                if (r->fine_clat) {   /* the bench's histograms: completed ops only */
                    r->fine_clat[fine_index(lat - (op->iss_ns - op->sub_ns))]++;
                    r->fine_lat[fine_index(lat)]++;
                }
                uint16_t code = op->cb.aio_lio_opcode;
                if ((code == IOCB_CMD_PREAD || code == IOCB_CMD_PWRITE) &&
                    (uint64_t)res < op->cb.aio_nbytes) {
                    r->shorts++;
                    add_note(s, op->index, OUT_SHORT, res);
                }
            }
        }
        list_del(op);
        op->inflight = 0;
        op->ring = NULL;
        s->in_flight--;
        self->in_flight--;
        s->free[op->cls][s->nfree[op->cls]++] = op->index;
        (*dropq)[(*ndrop)++] = s;
        if (detail) {
            /* detail is for tests and rare paths; its allocation comes after
             * this op's counters, and a snapshot in between sees each row whole. */
            PyObject *t = Py_BuildValue("(OIiLL)", (PyObject *)s, op->index, kind,
                                        (long long)res, (long long)lat);
            if (t) { PyList_Append(detail, t); Py_DECREF(t); }
        }
    }
}

static int reserve_drop(OpSet ***q, uint32_t *cap, uint32_t need) {
    if (need <= *cap) return 0;
    OpSet **n = realloc(*q, need * sizeof(OpSet *));
    if (!n) { PyErr_NoMemory(); return -1; }
    *q = n;
    *cap = need;
    return 0;
}

/* Reap: at least min_nr completions (fewer on timeout), at most max_nr.
 * timeout < 0: block. Releases the GIL only for a waiting io_getevents. */
static int do_reap(Ring *self, uint32_t min_nr, uint32_t max_nr, double timeout, ReapOut *out,
                   PyObject *detail) {
    memset(out, 0, sizeof *out);
    OpSet **dropq = NULL;
    uint32_t ndrop = 0, dcap = 0;
    uint32_t total = 0;
    if (self->npending) {
        if (reserve_drop(&dropq, &dcap, self->npending) < 0) return -1;
        classify(self, self->pending, self->npending, out, detail, &dropq, &ndrop);
        total += self->npending;
        self->npending = 0;
        min_nr = 0;
    }
    if (max_nr == 0 || max_nr > self->evcap) max_nr = self->evcap;
    if (min_nr > self->in_flight) min_nr = self->in_flight;
    if (min_nr > max_nr) min_nr = max_nr;
    struct timespec ts, *tsp = NULL;
    if (timeout >= 0) {
        ts.tv_sec = (time_t)timeout;
        ts.tv_nsec = (long)((timeout - (double)ts.tv_sec) * 1e9);
        tsp = &ts;
    }
    uint32_t got = 0;
    if (self->uring && self->in_flight) {
        struct aio_ring *ring = self->uring;
        unsigned head = ring->head, nr = ring->nr;
        unsigned tail = __atomic_load_n(&ring->tail, __ATOMIC_ACQUIRE);
        while (head != tail && got < max_nr) {
            self->events[got++] = ring->io_events[head];
            head = head + 1 == nr ? 0 : head + 1;
        }
        if (got) __atomic_store_n(&ring->head, head, __ATOMIC_RELEASE);
        self->user_reaped += got;
    }
    if (self->in_flight > got && got < max_nr && (got < min_nr || !self->uring)) {
        uint32_t want = got < min_nr ? min_nr - got : 0;
        long n;
        if (want && timeout != 0) {
            Py_BEGIN_ALLOW_THREADS
            n = sys_getevents(self->ctx, want, max_nr - got, self->events + got, tsp);
            Py_END_ALLOW_THREADS
        } else {
            struct timespec zero = {0, 0};
            n = sys_getevents(self->ctx, 0, max_nr - got, self->events + got, &zero);
        }
        if (n < 0) {
            if (errno != EINTR) {
                int err = errno;
                if (got) {  /* account what the ring gave before failing */
                    if (reserve_drop(&dropq, &dcap, ndrop + got) == 0)
                        classify(self, self->events, got, out, detail, &dropq, &ndrop);
                }
                for (uint32_t k = 0; k < ndrop; k++) Py_DECREF((PyObject *)dropq[k]);
                free(dropq);
                errno = err;
                PyErr_SetFromErrno(PyExc_OSError);
                return -1;
            }
            n = 0;
        }
        self->sys_reaped += (uint64_t)n;
        got += (uint32_t)n;
    }
    if (got) {
        if (reserve_drop(&dropq, &dcap, ndrop + got) < 0) return -1;
        classify(self, self->events, got, out, detail, &dropq, &ndrop);
    }
    for (uint32_t k = 0; k < ndrop; k++) Py_DECREF((PyObject *)dropq[k]);
    free(dropq);
    return 0;
}

static int get_offsets(PyObject *obj, Py_buffer *view, uint32_t n) {
    if (obj == Py_None) return 0;
    if (PyObject_GetBuffer(obj, view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (view->itemsize != 8 || !view->format || (strcmp(view->format, "q") && strcmp(view->format, "l"))) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_TypeError, "offsets must be a buffer of signed 64-bit ints (array('q'))");
        return -1;
    }
    if ((uint64_t)(view->len / 8) < n) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "fewer offsets than operations");
        return -1;
    }
    return 1;
}

/* submit(opset, n, offsets=None, indices=None) -> (submitted, rejected, unsubmitted, last_errno)
 * indices: these free ops, in this order (tests and rare paths), instead of the pattern's pick. */
static PyObject *Ring_submit(Ring *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"opset", "n", "offsets", "indices", NULL};
    PyObject *set, *offs = Py_None, *idx = Py_None;
    unsigned int n;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!I|OO", kwlist, (PyTypeObject *)OpSetType, &set, &n, &offs, &idx))
        return NULL;
    uint32_t *ix = NULL;
    if (idx != Py_None) {
        PyObject *seq = PySequence_Tuple(idx);
        if (!seq) return NULL;
        Py_ssize_t m = PyTuple_Size(seq);
        if ((uint64_t)m != n) { Py_DECREF(seq); PyErr_SetString(PyExc_ValueError, "len(indices) != n"); return NULL; }
        ix = malloc((m ? m : 1) * sizeof(uint32_t));
        if (!ix) { Py_DECREF(seq); return PyErr_NoMemory(); }
        for (Py_ssize_t k = 0; k < m; k++) {
            long v = PyLong_AsLong(PyTuple_GetItem(seq, k));
            if (v < 0) { if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad index");
                         Py_DECREF(seq); free(ix); return NULL; }
            ix[k] = (uint32_t)v;
        }
        Py_DECREF(seq);
        if (n > ready((OpSet *)set)) {
            free(ix);
            PyErr_SetString(PyExc_ValueError, "more indices than ops ready (depth)");
            return NULL;
        }
    }
    Py_buffer view;
    int has = get_offsets(offs, &view, n);
    if (has < 0) { free(ix); return NULL; }
    if (enter(self) < 0) { if (has) PyBuffer_Release(&view); free(ix); return NULL; }
    SubmitOut so;
    int rc = do_submit_ix(self, (OpSet *)set, n, has ? (const int64_t *)view.buf : NULL, ix, 0, &so);
    self->busy = 0;
    free(ix);
    if (has) PyBuffer_Release(&view);
    if (rc < 0) return NULL;
    return Py_BuildValue("(KKKi)", (unsigned long long)so.ok, (unsigned long long)so.rejected,
                         (unsigned long long)so.unsubmitted, so.last_errno);
}

/* reap(min_nr=0, timeout=0.0, max_nr=0, detail=False)
 *   -> (completed, cancelled, failed, last_errno[, [(opset, index, kind, res, lat_ns)]])
 * timeout None blocks; kind 0 completed, 1 cancelled, 2 failed. */
static PyObject *Ring_reap(Ring *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"min_nr", "timeout", "max_nr", "detail", NULL};
    unsigned int min_nr = 0, max_nr = 0;
    PyObject *tobj = NULL;
    int detail = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|IOIp", kwlist, &min_nr, &tobj, &max_nr, &detail))
        return NULL;
    double timeout = 0.0;
    if (tobj == Py_None) timeout = -1;
    else if (tobj) {
        timeout = PyFloat_AsDouble(tobj);
        if (timeout == -1.0 && PyErr_Occurred()) return NULL;
        if (timeout < 0) timeout = 0;
    }
    PyObject *dl = NULL;
    if (detail && !(dl = PyList_New(0))) return NULL;
    if (enter(self) < 0) { Py_XDECREF(dl); return NULL; }
    ReapOut ro;
    int rc = do_reap(self, min_nr, max_nr, timeout, &ro, dl);
    self->busy = 0;
    if (rc < 0) { Py_XDECREF(dl); return NULL; }
    if (dl)
        return Py_BuildValue("(KKKiN)", (unsigned long long)ro.completed,
                             (unsigned long long)ro.cancelled, (unsigned long long)ro.failed,
                             ro.last_errno, dl);
    return Py_BuildValue("(KKKi)", (unsigned long long)ro.completed, (unsigned long long)ro.cancelled,
                         (unsigned long long)ro.failed, ro.last_errno);
}

/* Put back on the free lists the ops cycle() set aside as refused. */
static void release_held(OpSet *s) {
    for (uint32_t k = 0; k < s->nheld; k++) {
        Op *op = &s->ops[s->held[k]];
        s->free[op->cls][s->nfree[op->cls]++] = op->index;
    }
    s->nheld = 0;
}

/* One round of cycle(): reap (waiting for min_nr, up to timeout), then submit
 * the ready ops of s, batch per io_submit. Each ready op is tried at most once
 * per round: one the kernel refuses is held aside until the round ends, and
 * waits for the next one. */
static int cycle_round(Ring *self, OpSet *s, uint32_t min_nr, double timeout, uint32_t batch,
                       ReapOut *ro, SubmitOut *so, PyObject *dl) {
    SubmitOut part;
    int rc = 0;
    memset(ro, 0, sizeof *ro);
    memset(so, 0, sizeof *so);
    if (self->in_flight || self->npending) rc = do_reap(self, min_nr, 0, timeout, ro, dl);
    uint32_t budget = ready(s);
    while (rc == 0 && budget) {
        uint32_t avail = ready(s);
        if (avail > budget) avail = budget;
        if (!avail) break;
        uint32_t n = batch && batch < avail ? batch : avail;
        rc = do_submit(self, s, n, 1, &part);
        if (rc < 0) break;
        budget -= n;
        so->ok += part.ok;
        so->rejected += part.rejected;
        if (part.last_errno) so->last_errno = part.last_errno;
        if (part.unsubmitted) { so->unsubmitted += part.unsubmitted; break; }
    }
    release_held(s);
    return rc;
}

/* cycle(opset, min_nr=1, timeout=None, batch=None, detail=False, rounds=1, until_ns=None):
 * one call per batch for a load: reap (waiting for min_nr), then submit every
 * ready op of opset, batch per io_submit (0: all in one; None: DIRECT_BATCH
 * when the set is O_DIRECT, else all in one).
 *
 * rounds > 1 (0: no limit, until_ns then required) repeats that reap and
 * resubmit inside the call: at iodepth 1 one Python call per op costs more
 * CPU than the op itself, and nothing else amortises it. Another round starts
 * only when the last one was uneventful: it reaped something and all of it
 * completed, and it left no note (no failure, cancel, short transfer, refusal
 * or EAGAIN: what the caller acts on comes back as promptly as with one
 * round), ops are still in flight to wait for, and CLOCK_MONOTONIC
 * (time.monotonic_ns) is before until_ns. A later round waits at most until
 * until_ns. A round that reaps nothing (its wait timed out, or a signal
 * interrupted it) ends the call, so ops that do not complete cost one timeout
 * per call, never a spin; a deadline already past runs one round.
 * Every counter moves round by round exactly as with one round per call.
 * -> the sums over the rounds: (completed, cancelled, failed, reap_errno,
 *     submitted, rejected, unsubmitted, submit_errno
 *     [, reaped: [(opset, index, kind, res, lat_ns)] when detail]); an errno
 *     is the last non-zero one. */
static PyObject *Ring_cycle(Ring *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"opset", "min_nr", "timeout", "batch", "detail", "rounds", "until_ns", NULL};
    PyObject *set, *tobj = Py_None, *bobj = Py_None, *uobj = Py_None;
    unsigned int min_nr = 1, rounds = 1;
    int detail = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!|IOOpIO", kwlist, (PyTypeObject *)OpSetType, &set, &min_nr,
                                     &tobj, &bobj, &detail, &rounds, &uobj))
        return NULL;
    double timeout = -1;
    if (tobj != Py_None) {
        timeout = PyFloat_AsDouble(tobj);
        if (timeout == -1.0 && PyErr_Occurred()) return NULL;
        if (timeout < 0) timeout = 0;
    }
    OpSet *s = (OpSet *)set;
    uint32_t batch = set_direct(s) ? DIRECT_BATCH : 0;
    if (bobj != Py_None) {
        long v = PyLong_AsLong(bobj);
        if (v == -1 && PyErr_Occurred()) return NULL;
        if (v < 0) { PyErr_SetString(PyExc_ValueError, "batch must be >= 0 (0: all at once) or None"); return NULL; }
        batch = v > UINT32_MAX ? UINT32_MAX : (uint32_t)v;
    }
    int has_until = uobj != Py_None;
    int64_t until = 0;
    if (has_until) {
        long long v = PyLong_AsLongLong(uobj);
        if (v == -1 && PyErr_Occurred()) return NULL;
        until = (int64_t)v;
    }
    if (rounds == 0 && !has_until) {
        PyErr_SetString(PyExc_ValueError, "rounds=0 (no limit) needs until_ns");
        return NULL;
    }
    PyObject *dl = NULL;
    if (detail && !(dl = PyList_New(0))) return NULL;
    if (enter(self) < 0) { Py_XDECREF(dl); return NULL; }
    ReapOut ro, rsum = {0};
    SubmitOut so, ssum = {0};
    double wait = timeout;
    int rc;
    unsigned int done = 0;
    for (;;) {
        uint32_t notes = s->nnotes;
        uint64_t dropped = s->notes_dropped;
        rc = cycle_round(self, s, min_nr, wait, batch, &ro, &so, dl);
        self->cycle_rounds++;
        rsum.completed += ro.completed;
        rsum.cancelled += ro.cancelled;
        rsum.failed += ro.failed;
        if (ro.last_errno) rsum.last_errno = ro.last_errno;
        ssum.ok += so.ok;
        ssum.rejected += so.rejected;
        ssum.unsubmitted += so.unsubmitted;
        if (so.last_errno) ssum.last_errno = so.last_errno;
        if (rc < 0 || ++done == rounds) break;
        if (!ro.completed || ro.cancelled || ro.failed || so.rejected || so.unsubmitted ||
            s->nnotes != notes || s->notes_dropped != dropped || !self->in_flight)
            break;
        if (has_until) {
            int64_t now = mono_ns();
            if (now >= until) break;
            double left = (double)(until - now) / 1e9;
            wait = timeout < 0 || timeout > left ? left : timeout;
        }
    }
    self->busy = 0;
    /* An error after whole rounds: the caller must still learn what those
     * rounds moved (its record is kept from these sums), so they come back
     * and the error is left for the next call, whose first round meets it. */
    if (rc < 0 && done > 0) { PyErr_Clear(); rc = 0; }
    if (rc < 0) { Py_XDECREF(dl); return NULL; }
    if (dl)
        return Py_BuildValue("(KKKiKKKiN)", (unsigned long long)rsum.completed,
                             (unsigned long long)rsum.cancelled, (unsigned long long)rsum.failed,
                             rsum.last_errno, (unsigned long long)ssum.ok, (unsigned long long)ssum.rejected,
                             (unsigned long long)ssum.unsubmitted, ssum.last_errno, dl);
    return Py_BuildValue("(KKKiKKKi)", (unsigned long long)rsum.completed,
                         (unsigned long long)rsum.cancelled, (unsigned long long)rsum.failed,
                         rsum.last_errno, (unsigned long long)ssum.ok, (unsigned long long)ssum.rejected,
                         (unsigned long long)ssum.unsubmitted, ssum.last_errno);
}

/* Ask the kernel to cancel one op. 1 started, 0 not cancellable, -1 error set. */
static int cancel_one(Ring *self, Op *op) {
    struct io_event ev;
    op->cancel_req = 1;
    long rc = sys_cancel(self->ctx, &op->cb, &ev);
    if (rc == 0) {
        /* Older kernels hand the completion back here instead of via the ring. */
        if (self->npending == self->pendcap) {
            uint32_t cap = self->pendcap ? self->pendcap * 2 : 16;
            struct io_event *p = realloc(self->pending, cap * sizeof *p);
            if (!p) { PyErr_NoMemory(); return -1; }
            self->pending = p;
            self->pendcap = cap;
        }
        self->pending[self->npending++] = ev;
        return 1;
    }
    if (errno == EINPROGRESS) return 1;
    op->cancel_req = 0;
    if (errno == EINVAL || errno == EAGAIN) return 0;
    PyErr_SetFromErrno(PyExc_OSError);
    return -1;
}

/* cancel(opset, index) -> bool */
static PyObject *Ring_cancel(Ring *self, PyObject *args) {
    PyObject *set;
    unsigned int index;
    if (!PyArg_ParseTuple(args, "O!I", (PyTypeObject *)OpSetType, &set, &index)) return NULL;
    OpSet *s = (OpSet *)set;
    if (index >= s->n) { PyErr_SetString(PyExc_IndexError, "no such op"); return NULL; }
    Op *op = &s->ops[index];
    if (!op->inflight || op->ring != self || op->cancel_req) Py_RETURN_FALSE;
    if (enter(self) < 0) return NULL;
    int rc = cancel_one(self, op);
    self->busy = 0;
    if (rc < 0) return NULL;
    return PyBool_FromLong(rc);
}

/* cancel_all() -> (requested, uncancellable) */
static PyObject *Ring_cancel_all(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (enter(self) < 0) return NULL;
    unsigned long long req = 0, unc = 0;
    for (Op *op = self->head.next; op != &self->head; op = op->next) {
        if (op->cancel_req) continue;
        int rc = cancel_one(self, op);
        if (rc < 0) { self->busy = 0; return NULL; }
        if (rc) req++; else unc++;
    }
    self->busy = 0;
    return Py_BuildValue("(KK)", req, unc);
}

/* account_lost() -> n: the context was destroyed; ops still in flight will
 * never complete to us. They are counted cancelled (as aiod always has). */
static PyObject *Ring_account_lost(Ring *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"keep_alive", NULL};
    int keep = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p", kwlist, &keep)) return NULL;
    if (self->busy) { PyErr_SetString(PyExc_RuntimeError, "Ring used from two threads at once"); return NULL; }
    uint32_t n = self->in_flight;
    OpSet **dropq = malloc((n ? n : 1) * sizeof(OpSet *));
    if (!dropq) return PyErr_NoMemory();
    uint32_t nd = 0;
    /* ops whose completion io_cancel handed back are still listed */
    for (Op *op = self->head.next; op != &self->head;) {
        Op *nx = op->next;
        OpSet *s = op->set;
        Row *r = &s->acct->rows[op->row];
        r->in_flight--;
        r->cancelled++;
        list_del(op);
        op->inflight = 0;
        op->ring = NULL;
        s->in_flight--;
        /* keep_alive: io_destroy did not finish, the kernel may still write
         * into the buffers: the op is never reused and its OpSet never freed. */
        if (!keep) {
            s->free[op->cls][s->nfree[op->cls]++] = op->index;
            dropq[nd] = s;
        }
        nd++;
        op = nx;
    }
    self->in_flight = 0;
    self->npending = 0;
    self->closed = 1;
    if (!keep)
        for (uint32_t k = 0; k < nd; k++) Py_DECREF((PyObject *)dropq[k]);
    free(dropq);
    return PyLong_FromUnsignedLong(nd);
}

/* inflight_ops() -> [(opset, index)]: the ops in flight, oldest first (rare paths). */
static PyObject *Ring_inflight_ops(Ring *self, PyObject *Py_UNUSED(ignored)) {
    uint32_t n = 0;
    for (Op *op = self->head.next; op != &self->head; op = op->next) n++;
    Op **copy = malloc((n ? n : 1) * sizeof(Op *));
    if (!copy) return PyErr_NoMemory();
    n = 0;
    for (Op *op = self->head.next; op != &self->head; op = op->next) copy[n++] = op;
    /* Python objects only after the walk: an allocation may run other code. */
    PyObject *l = PyList_New(n);
    for (uint32_t k = 0; l && k < n; k++) {
        PyObject *t = Py_BuildValue("(OI)", (PyObject *)copy[k]->set, copy[k]->index);
        if (!t) { Py_CLEAR(l); break; }
        PyList_SetItem(l, k, t);
    }
    free(copy);
    return l;
}

static PyObject *Ring_get_in_flight(Ring *self, void *c) {
    return PyLong_FromUnsignedLong(self->in_flight);
}

/* oldest_submitted_ns: CLOCK_MONOTONIC (time.perf_counter_ns) of the oldest op in flight, or None. */
static PyObject *Ring_get_oldest(Ring *self, void *c) {
    if (self->head.next == &self->head) Py_RETURN_NONE;
    return PyLong_FromLongLong(self->head.next->sub_ns);
}

static PyObject *Ring_get_user_reap(Ring *self, void *c) {
    return PyBool_FromLong(self->uring != NULL);
}

static PyObject *Ring_get_submit_calls(Ring *self, void *c) {
    return PyLong_FromUnsignedLongLong(self->submit_calls);
}

static PyObject *Ring_get_cycle_rounds(Ring *self, void *c) {
    return PyLong_FromUnsignedLongLong(self->cycle_rounds);
}

static PyObject *Ring_get_reaped(Ring *self, void *c) {
    return Py_BuildValue("(KK)", (unsigned long long)self->user_reaped,
                         (unsigned long long)self->sys_reaped);
}

static PyMethodDef Ring_methods[] = {
    {"submit", (PyCFunction)(void (*)(void))Ring_submit, METH_VARARGS | METH_KEYWORDS,
     "submit(opset, n, offsets=None, indices=None) -> (submitted, rejected, unsubmitted, last_errno)"},
    {"reap", (PyCFunction)(void (*)(void))Ring_reap, METH_VARARGS | METH_KEYWORDS,
     "reap(min_nr=0, timeout=0.0, max_nr=0, detail=False) -> (completed, cancelled, failed, "
     "last_errno[, detail])"},
    {"cycle", (PyCFunction)(void (*)(void))Ring_cycle, METH_VARARGS | METH_KEYWORDS,
     "cycle(opset, min_nr=1, timeout=None, batch=None, detail=False, rounds=1, until_ns=None) -> "
     "(completed, cancelled, failed, reap_errno, submitted, rejected, unsubmitted, submit_errno"
     "[, reaped]); batch: ops per io_submit, 0 all at once, None the engine's choice (DIRECT_BATCH "
     "for an O_DIRECT set, else all); rounds: reap-and-resubmit rounds in this call (0: no limit), "
     "while each reaps and completes without a note and time.monotonic_ns() < until_ns; the sums"},
    {"cancel", (PyCFunction)Ring_cancel, METH_VARARGS, "cancel(opset, index) -> bool"},
    {"inflight_ops", (PyCFunction)Ring_inflight_ops, METH_NOARGS,
     "inflight_ops() -> [(opset, index)]: the ops in flight, oldest first."},
    {"cancel_all", (PyCFunction)Ring_cancel_all, METH_NOARGS,
     "cancel_all() -> (requested, uncancellable)"},
    {"account_lost", (PyCFunction)(void (*)(void))Ring_account_lost, METH_VARARGS | METH_KEYWORDS,
     "account_lost(keep_alive=False) -> n: after io_destroy, count what is still in flight as "
     "cancelled; keep_alive when io_destroy did not return (the kernel may still use the buffers)."},
    {NULL}
};

static PyGetSetDef Ring_getset[] = {
    {"in_flight", (getter)Ring_get_in_flight, NULL, "ops in flight", NULL},
    {"oldest_submitted_ns", (getter)Ring_get_oldest, NULL, "submit time of the oldest op in flight", NULL},
    {"user_reap", (getter)Ring_get_user_reap, NULL, "reaping from the mapped ring", NULL},
    {"reaped", (getter)Ring_get_reaped, NULL, "(from the ring, from io_getevents)", NULL},
    {"submit_calls", (getter)Ring_get_submit_calls, NULL, "io_submit syscalls made", NULL},
    {"cycle_rounds", (getter)Ring_get_cycle_rounds, NULL, "rounds of reap and resubmit cycle() ran", NULL},
    {NULL}
};

static PyType_Slot Ring_slots[] = {
    {Py_tp_doc, (void *)("Ring(ctx_id, nr_events, eventfd=-1, user_reap=False): submit and reap on one "
              "kernel AIO context.")},
    {Py_tp_new, (void *)PyType_GenericNew},
    {Py_tp_init, (void *)Ring_init},
    {Py_tp_dealloc, (void *)Ring_dealloc},
    {Py_tp_methods, Ring_methods},
    {Py_tp_getset, Ring_getset},
    {0, NULL},
};

static PyType_Spec Ring_spec = {
    "aiod._engine.Ring", sizeof(Ring), 0, Py_TPFLAGS_DEFAULT, Ring_slots,
};

/* ================================================================ module */
static PyObject *mod_fine_index(PyObject *m, PyObject *arg) {
    long long ns = PyLong_AsLongLong(arg);
    if (ns == -1 && PyErr_Occurred()) return NULL;
    return PyLong_FromUnsignedLong(fine_index(ns));
}

static PyMethodDef module_methods[] = {
    {"fine_index", mod_fine_index, METH_O, "fine_index(ns) -> the log-linear bucket of a latency"},
    {NULL}
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "aiod._engine", "aiod's compiled per-batch hot path.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__engine(void) {
    AccountingType = PyType_FromSpec(&Accounting_spec);
    OpSetType = AccountingType ? PyType_FromSpec(&OpSet_spec) : NULL;
    RingType = OpSetType ? PyType_FromSpec(&Ring_spec) : NULL;
    if (!RingType) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(AccountingType);
    Py_INCREF(OpSetType);
    Py_INCREF(RingType);
    if (PyModule_AddObject(m, "Accounting", AccountingType) < 0 ||
        PyModule_AddObject(m, "OpSet", OpSetType) < 0 ||
        PyModule_AddObject(m, "Ring", RingType) < 0 ||
        PyModule_AddIntConstant(m, "FINE_BUCKETS", FINE_N) < 0 ||
        PyModule_AddIntConstant(m, "ERRNO_SLOTS", NERR) < 0 ||
        PyModule_AddIntConstant(m, "DIRECT_BATCH", DIRECT_BATCH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
