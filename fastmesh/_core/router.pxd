# Compiled routing table: the contract the proxy cimports.
#
# Built once per Plan from route specs; match() is called per request with
# pointers into the parsed head (no Python objects are created on the common
# path: exact host hash, wildcard host suffixes, exact path hash, prefix trie;
# regexes only for routes that could still match).

cdef class Router:
    cdef readonly Py_ssize_t size           # number of routes
    cdef object _impl_state                 # implementation-private Python state

    # host: raw Host header value (the router lower-cases it and drops ":port" itself).
    # path: request path without the query string.
    # headers: an object with a method header_values(lower_name: bytes) -> list[bytes],
    #          consulted only when a candidate route has header rules (may be None: then
    #          such routes do not match).
    # Returns the winning route's `target` object (or None) and stores in *matched_len the
    # length of the path part that the route's path rule matched (0 for routes without paths),
    # which strip_path removes.
    cdef object match_c(self, const char* host, Py_ssize_t host_len,
                        const char* path, Py_ssize_t path_len,
                        const char* method, Py_ssize_t method_len,
                        object headers, Py_ssize_t* matched_len)
