# cython: language_level=3, boundscheck=False, wraparound=False
"""Keep-alive connection pools, one per upstream target.

A connection is pooled only when its last response ended cleanly with
keep-alive (the protocol sets `reusable`); idle connections expire after
`idle_timeout` and at most `max_idle` are kept. LIFO reuse keeps the hottest
connections warm and lets the idle tail expire.
"""


cdef class PooledConnection:
    cdef void close(self):
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()


cdef class Pool:
    def __init__(self, str host, int port, int max_idle=64, double idle_timeout=60.0,
                 ssl=None, str server_hostname=None, peer_check=None):
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.peer_check = peer_check
        self.host = host
        self.port = port
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.idle = []

    cdef PooledConnection acquire(self):
        cdef PooledConnection conn
        while self.idle:
            conn = <PooledConnection>self.idle.pop()
            if conn.closed:
                continue
            self.active += 1
            self.reused += 1
            return conn
        return None

    cdef void opened(self, PooledConnection conn):
        conn.pool = self
        self.active += 1
        self.created += 1

    cdef void release(self, PooledConnection conn, double now):
        self.active -= 1
        if conn.closed or not conn.reusable or len(self.idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = now
        self.idle.append(conn)

    cdef void discard(self, PooledConnection conn):
        self.active -= 1
        conn.close()

    def sweep(self, double now):
        """Close idle connections older than idle_timeout; returns how many."""
        cdef PooledConnection conn
        cdef list keep = []
        cdef int n = 0
        for conn in self.idle:
            if conn.closed:
                continue
            if now - conn.idle_since >= self.idle_timeout:
                conn.close()
                n += 1
            else:
                keep.append(conn)
        self.idle = keep
        self.expired += n
        return n

    def close_idle(self):
        """Close every idle connection (used when a pool is dropped)."""
        cdef PooledConnection conn
        for conn in self.idle:
            conn.close()
        self.idle = []

    @property
    def idle_count(self):
        return len(self.idle)

    def stats(self):
        return {
            "target": f"{self.host}:{self.port}",
            "tls": self.ssl is not None,
            "active": self.active,
            "idle": len(self.idle),
            "created": self.created,
            "reused": self.reused,
            "expired": self.expired,
        }
