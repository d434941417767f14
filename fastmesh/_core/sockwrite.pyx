# cython: language_level=3
"""Write a connection's next bytes to its socket with one send(), past uvloop's write().

uvloop's write() makes the same syscall after several Python-level steps (its buffer list,
length checks, the fd as a Python int, a list.clear call): most of a proxied request's time in
uvloop. The proxy (plain connections) and the TLS transport (its records) both write through
here. What the socket does not take at once, and everything while the transport holds bytes
(`queued`), goes through transport.write: its buffering, flow control (pause_writing) and
error handling, in order.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.errno cimport errno, EINTR

cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    int MSG_NOSIGNAL

try:
    from uvloop.loop import TCPTransport as _TCPTransport
except ImportError:                 # another event loop: every write goes through its transport
    _TCPTransport = None


cdef int socket_fd(object transport) except -2:
    """The socket of a plain uvloop TCP transport, which send_or_write may write to; else -1.

    uvloop closes that descriptor only after the protocol's connection_lost returned (its
    _call_connection_lost), so it is this connection's for as long as the protocol has the
    transport.
    """
    if _TCPTransport is None or type(transport) is not _TCPTransport:
        return -1
    sock = transport.get_extra_info("socket")
    return sock.fileno() if sock is not None else -1


cdef int send_or_write(int fd, bint* queued, object transport, object write,
                       const char* p, Py_ssize_t n, object data) except -1:
    """Send the `n` bytes at `p` on `fd` (from socket_fd; -1: never), else `write` them.

    `data` is the same bytes as an object, or None: then one is made only when the transport
    must take them. The caller checks that the transport is not closing.
    """
    cdef Py_ssize_t sent
    if fd >= 0:
        if queued[0] and not transport.get_write_buffer_size():
            queued[0] = False
        if not queued[0]:
            sent = send(fd, p, n, MSG_NOSIGNAL)
            while sent < 0 and errno == EINTR:
                sent = send(fd, p, n, MSG_NOSIGNAL)
            if sent == n:
                return 0
            queued[0] = True
            if sent > 0:
                data = PyBytes_FromStringAndSize(p + sent, n - sent)
    if data is None:
        data = PyBytes_FromStringAndSize(p, n)
    write(data)
    return 0
