# Upstream connection pool per target: the contract the proxy cimports.

cdef class PooledConnection:
    cdef object transport
    cdef double idle_since         # monotonic seconds when it went idle
    cdef bint closed
    cdef bint reusable             # last response framing ended cleanly with keep-alive
    cdef Pool pool
    cdef void close(self)


cdef class Pool:
    cdef readonly str host
    cdef readonly int port
    cdef readonly int max_idle
    cdef readonly double idle_timeout
    cdef list idle                 # LIFO stack of PooledConnection
    cdef readonly Py_ssize_t active        # connections handed out and not yet released
    cdef readonly unsigned long long created
    cdef readonly unsigned long long reused
    cdef readonly unsigned long long expired
    # TLS upstreams (None for plain TCP): the client context, the name sent as SNI and
    # verified ("" sends none), and an extra check of the verified peer certificate:
    # peer_check(transport) returns None to accept or the reason it refuses the connection.
    cdef readonly object ssl
    cdef readonly str server_hostname
    cdef readonly object peer_check

    # An idle connection (most recently used first), or None: the caller connects.
    cdef PooledConnection acquire(self)
    # A connection was created for this pool and handed out.
    cdef void opened(self, PooledConnection conn)
    # Give a connection back; kept only when reusable, open and under max_idle.
    cdef void release(self, PooledConnection conn, double now)
    # A handed-out connection is gone for good (closed, broken).
    cdef void discard(self, PooledConnection conn)
