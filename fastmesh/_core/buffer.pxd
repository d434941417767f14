# A growable C byte buffer for building heads in one pass (one bytes object per head).
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdlib cimport realloc, free
from libc.string cimport memcpy, memmove


cdef struct Buf:
    char* data
    Py_ssize_t len
    Py_ssize_t cap


cdef inline int buf_reserve(Buf* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t need = b.len + extra
    cdef Py_ssize_t cap
    cdef char* p
    if need <= b.cap:
        return 0
    cap = b.cap * 2 if b.cap else 1024
    while cap < need:
        cap *= 2
    p = <char*>realloc(b.data, cap)
    if p == NULL:
        raise MemoryError()
    b.data = p
    b.cap = cap
    return 0


cdef inline int buf_add(Buf* b, const char* p, Py_ssize_t n) except -1:
    if b.len + n > b.cap:
        buf_reserve(b, n)
    memcpy(b.data + b.len, p, n)
    b.len += n
    return 0


cdef inline int buf_add_bytes(Buf* b, bytes s) except -1:
    return buf_add(b, <const char*>s, len(s))


cdef inline int buf_add_int(Buf* b, long long v) except -1:
    cdef char tmp[24]
    cdef int i = 24
    cdef bint neg = v < 0
    if neg:
        v = -v
    if v == 0:
        i -= 1
        tmp[i] = 48
    while v > 0:
        i -= 1
        tmp[i] = <char>(48 + v % 10)
        v //= 10
    if neg:
        i -= 1
        tmp[i] = 45
    return buf_add(b, tmp + i, 24 - i)


cdef inline void buf_consume(Buf* b, Py_ssize_t n) noexcept:
    """Drop the first n bytes (pipelined input left over after a message)."""
    if n >= b.len:
        b.len = 0
    else:
        memmove(b.data, b.data + n, b.len - n)
        b.len -= n


cdef inline bytes buf_take(Buf* b):
    """The buffer's bytes as a new bytes object; the buffer is emptied for reuse."""
    cdef bytes out = PyBytes_FromStringAndSize(b.data, b.len)
    b.len = 0
    return out


cdef inline void buf_free(Buf* b) noexcept:
    free(b.data)
    b.data = NULL
    b.len = 0
    b.cap = 0
