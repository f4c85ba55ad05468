/* The access log's line, made in C.
 *
 * One call per request, as its exchange ends, on the event loop. The same line made in Python
 * (msgspec encoding an Entry: ingress/accesslog.py) costs about 16,000 instructions, close to
 * a tenth of all the proxy does for a small request; this makes it in about a tenth of that,
 * with no intermediate objects: the texts are read where they are (bytes as they came off the
 * wire, str as UTF-8), the durations are integer arithmetic, and only the finished line is
 * allocated. ingress/accesslog.py keeps the Python version, used when this module was not
 * built, and the tests hold the two to the same output.
 *
 * line(offset, t0, granted, answered, end, request_id, trace_id, client, method, path, host,
 *      service, instance, status, bytes_in, bytes_out) -> bytes
 *
 * Times are time.monotonic_ns() values; offset is the wall clock minus the monotonic one. A
 * time of -1 (granted, answered) means "never". Text arguments are bytes, str or None (null).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#if LONG_MAX < 0x7fffffffffffffffL
#error "ingress/_logline.c needs a 64-bit long (LP64)"
#endif

#define NARGS 16
#define SCRATCH 4096 /* most lines fit; longer ones take a heap buffer */

/* The date-and-time text of the last second seen: a second's lines share it. */
static long long cached_second = LLONG_MIN;
static char cached_date[19]; /* "YYYY-MM-DDTHH:MM:SS" */

static const char HEX[] = "0123456789abcdef";

/* What each byte becomes in a JSON string's content (RFC 8259 section 7), escaped as
 * msgspec does: 0 itself; 1 the controls as \u00XX; 2 (raw bytes only) UTF-8, below; else
 * the character after a backslash (the quote, the backslash, and the controls JSON has
 * short forms for). One table per kind of text, so the scan is one lookup a byte.
 *
 * Bytes from 0x80 up in raw bytes (the parser lets none through, but if one came) are read
 * as latin-1 and written as UTF-8, as the Python version's decode("latin-1") does: the line
 * stays UTF-8. In a str's UTF-8 they are parts of characters, copied as they are. */
static unsigned char ESCAPE_UTF8[256];
static unsigned char ESCAPE_RAW[256];

static void
init_escapes(void)
{
    for (int c = 0; c < 0x20; c++)
        ESCAPE_UTF8[c] = 1;
    ESCAPE_UTF8['"'] = '"';
    ESCAPE_UTF8['\\'] = '\\';
    ESCAPE_UTF8['\b'] = 'b';
    ESCAPE_UTF8['\f'] = 'f';
    ESCAPE_UTF8['\n'] = 'n';
    ESCAPE_UTF8['\r'] = 'r';
    ESCAPE_UTF8['\t'] = 't';
    memcpy(ESCAPE_RAW, ESCAPE_UTF8, sizeof ESCAPE_RAW);
    for (int c = 0x80; c < 0x100; c++)
        ESCAPE_RAW[c] = 2;
}

static char *
put_escaped(char *out, const unsigned char *s, Py_ssize_t n, const unsigned char *escape)
{
    Py_ssize_t i = 0;
    while (i < n) {
        Py_ssize_t run = i; /* copy the longest stretch that needs nothing at once */
        while (run < n && !escape[s[run]])
            run++;
        memcpy(out, s + i, (size_t)(run - i));
        out += run - i;
        if (run == n)
            break;
        unsigned char c = s[run];
        i = run + 1;
        switch (escape[c]) {
        case 1:
            memcpy(out, "\\u00", 4);
            out[4] = HEX[c >> 4];
            out[5] = HEX[c & 15];
            out += 6;
            break;
        case 2:
            *out++ = (char)(0xc0 | (c >> 6));
            *out++ = (char)(0x80 | (c & 0x3f));
            break;
        default:
            *out++ = '\\';
            *out++ = (char)escape[c];
        }
    }
    return out;
}

/* A text argument: its bytes, and whether they are raw bytes (else UTF-8 of a str).
 * Returns 0, or -1 with a TypeError set. A NULL data pointer means null. */
typedef struct {
    const unsigned char *data;
    Py_ssize_t size;
    int raw;
} text_t;

static int
get_text(PyObject *obj, text_t *t, const char *name, int nullable)
{
    if (obj == Py_None && nullable) {
        t->data = NULL;
        t->size = 0;
        t->raw = 0;
        return 0;
    }
    if (PyBytes_Check(obj)) {
        t->data = (const unsigned char *)PyBytes_AS_STRING(obj);
        t->size = PyBytes_GET_SIZE(obj);
        t->raw = 1;
        return 0;
    }
    if (PyUnicode_Check(obj)) {
        t->data = (const unsigned char *)PyUnicode_AsUTF8AndSize(obj, &t->size);
        t->raw = 0;
        return t->data == NULL ? -1 : 0;
    }
    PyErr_Format(PyExc_TypeError, "line(): %s must be bytes or str%s, not %.100s", name,
                 nullable ? " or None" : "", Py_TYPE(obj)->tp_name);
    return -1;
}

/* A literal's text, its length known when compiled. */
#define put_key(out, key) (memcpy((out), (key), sizeof(key) - 1), (out) + sizeof(key) - 1)

#define put_text(out, key, t) put_value(put_key((out), (key)), (t))

static char *
put_value(char *out, const text_t *t)
{
    if (t->data == NULL) {
        memcpy(out, "null", 4);
        return out + 4;
    }
    *out++ = '"';
    out = put_escaped(out, t->data, t->size, t->raw ? ESCAPE_RAW : ESCAPE_UTF8);
    *out++ = '"';
    return out;
}

static char *
put_int(char *out, long long v)
{
    char tmp[24];
    int n = 0;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        *out++ = '-';
    while (n)
        *out++ = tmp[--n];
    return out;
}

/* Python's a // b for b > 0 (C's / truncates toward zero). */
static inline long long
floordiv(long long a, long long b)
{
    long long q = a / b;
    return (a % b != 0 && a < 0) ? q - 1 : q;
}

/* a - b and a + b without signed overflow (undefined in C): they wrap. Real times are far
 * from the limits; this only keeps nonsense input from being undefined behaviour. */
static inline long long
sub(long long a, long long b)
{
    return (long long)((unsigned long long)a - (unsigned long long)b);
}

static inline long long
add(long long a, long long b)
{
    return (long long)((unsigned long long)a + (unsigned long long)b);
}

static inline void
put2(char *p, int v)
{
    p[0] = (char)('0' + v / 10 % 10);
    p[1] = (char)('0' + v % 10);
}

static char *
put_time(char *out, long long wall_ns)
{
    long long ms = floordiv(wall_ns, 1000000);
    long long second = floordiv(ms, 1000);
    int millis = (int)(ms - second * 1000);
    if (second != cached_second) {
        struct tm tm;
        time_t t = (time_t)second;
        if (gmtime_r(&t, &tm) == NULL)
            memset(&tm, 0, sizeof tm);
        int year = tm.tm_year + 1900;
        year = year < 0 ? 0 : year > 9999 ? 9999 : year;
        put2(cached_date, year / 100);
        put2(cached_date + 2, year % 100);
        cached_date[4] = '-';
        put2(cached_date + 5, tm.tm_mon + 1);
        cached_date[7] = '-';
        put2(cached_date + 8, tm.tm_mday);
        cached_date[10] = 'T';
        put2(cached_date + 11, tm.tm_hour);
        cached_date[13] = ':';
        put2(cached_date + 14, tm.tm_min);
        cached_date[16] = ':';
        put2(cached_date + 17, tm.tm_sec);
        cached_second = second;
    }
    memcpy(out, cached_date, 19);
    out += 19;
    *out++ = '.';
    *out++ = (char)('0' + millis / 100);
    *out++ = (char)('0' + millis / 10 % 10);
    *out++ = (char)('0' + millis % 10);
    *out++ = 'Z';
    return out;
}

static const char *const TEXT_NAMES[] = {
    "request_id", "trace_id", "client", "method", "path", "host", "service", "instance",
};

static PyObject *
line(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != NARGS) {
        PyErr_Format(PyExc_TypeError, "line() takes %d arguments (%zd given)", NARGS, nargs);
        return NULL;
    }
    /* PyLong_AsLong, not AsLongLong: in CPython 3.11 the latter takes a slow path for any
     * int of more than 30 bits (nanosecond times are), and long is 64 bits on LP64 */
    long long num[5]; /* offset, t0, granted, answered, end */
    for (int i = 0; i < 5; i++) {
        num[i] = PyLong_AsLong(args[i]);
        if (num[i] == -1 && PyErr_Occurred())
            return NULL;
    }
    text_t text[8];
    Py_ssize_t size = 400; /* keys, numbers, punctuation: well under this */
    for (int i = 0; i < 8; i++) {
        /* request_id and client are always there; the others may be null */
        if (get_text(args[5 + i], &text[i], TEXT_NAMES[i], i != 0 && i != 2) < 0)
            return NULL;
        size += text[i].size * 6; /* the worst case: every byte as \u00XX */
    }
    long long counts[3]; /* status, bytes_in, bytes_out */
    for (int i = 0; i < 3; i++) {
        counts[i] = PyLong_AsLong(args[13 + i]);
        if (counts[i] == -1 && PyErr_Occurred())
            return NULL;
    }
    long long offset = num[0], t0 = num[1], granted = num[2], answered = num[3], end = num[4];

    char scratch[SCRATCH];
    char *buf = scratch;
    if (size > SCRATCH) {
        buf = PyMem_Malloc((size_t)size);
        if (buf == NULL)
            return PyErr_NoMemory();
    }
    char *out = buf;
    out = put_key(out, "{\"time\":\"");
    out = put_time(out, add(t0, offset));
    *out++ = '"';
    out = put_text(out, ",\"request_id\":", &text[0]);
    out = put_text(out, ",\"trace_id\":", &text[1]);
    out = put_text(out, ",\"client\":", &text[2]);
    out = put_text(out, ",\"method\":", &text[3]);
    out = put_text(out, ",\"path\":", &text[4]);
    out = put_text(out, ",\"host\":", &text[5]);
    out = put_text(out, ",\"service\":", &text[6]);
    out = put_text(out, ",\"instance\":", &text[7]);
    out = put_int(put_key(out, ",\"status\":"), counts[0]);
    out = put_int(put_key(out, ",\"bytes_in\":"), counts[1]);
    out = put_int(put_key(out, ",\"bytes_out\":"), counts[2]);
    long long queued_until = granted >= 0 ? granted : end;
    out = put_int(put_key(out, ",\"queue_us\":"), floordiv(sub(queued_until, t0), 1000));
    out = put_key(out, ",\"upstream_us\":");
    if (answered >= 0)
        out = put_int(out, floordiv(sub(answered, granted), 1000));
    else
        out = put_key(out, "null");
    out = put_int(put_key(out, ",\"total_us\":"), floordiv(sub(end, t0), 1000));
    out = put_key(out, "}\n");

    PyObject *result = PyBytes_FromStringAndSize(buf, out - buf);
    if (buf != scratch)
        PyMem_Free(buf);
    return result;
}

static PyMethodDef methods[] = {
    {"line", (PyCFunction)(void (*)(void))line, METH_FASTCALL,
     "line(offset, t0, granted, answered, end, request_id, trace_id, client, method, path, "
     "host, service, instance, status, bytes_in, bytes_out) -> bytes\n\n"
     "One access-log line, as JSON ending in a newline."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "ingress._logline",
    .m_doc = "The access log's line, made in C.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__logline(void)
{
    init_escapes();
    return PyModule_Create(&module);
}
