# Writing a connection's bytes to its socket directly (see sockwrite.pyx).

cdef int socket_fd(object transport) except -2
cdef int send_or_write(int fd, bint* queued, object transport, object write,
                       const char* p, Py_ssize_t n, object data) except -1
