# cython: language_level=3
"""TLS between a socket transport and a fastmesh protocol: the handshake by the ssl module,
the records by OpenSSL called directly.

Why not uvloop's SSL transport: per request it costs several Python calls per direction (a
deque of writes, `SSLObject.read` in a loop that joins chunks, flow-control bookkeeping, a
wake-up of its waiter), which was most of what mTLS added to a mesh hop (benches/tls_profile.py,
benches/mesh_chain.py --mtls). Here one object is both the socket's protocol and the app's
transport; a record in is one BIO_write plus SSL_read until OpenSSL wants more, a write out is
one SSL_write plus one BIO_read into a static buffer sent with one send() (fastmesh._core.
sockwrite, as the proxy's plain writes; the socket transport's write() when it holds bytes).

The TLS is still the standard library's: the ssl module makes the SSL object (`wrap_bio` on the
caller's SSLContext, so certificates, verification, SNI callbacks, ALPN, session tickets are what
that context says) and runs the handshake. Once it is done, the C pointers of that same SSL
object and its two memory BIOs are read from the ssl module's objects (their layout is the same
in CPython 3.11 to 3.14), checked against each other (SSL_get_rbio/SSL_get_wbio must return the
two BIOs), and the records go through OpenSSL's SSL_read/SSL_write, resolved with dlsym in the
libssl the ssl module itself loaded: no headers, no second OpenSSL. Where any of that is not
so (another Python, a statically linked _ssl, FASTMESH_TLS_NATIVE=0), the same class drives the
ssl module's own read/write/BIO methods instead: slower, identical behaviour.

Lifecycle: connection_made starts the handshake (and its timer); success calls the app's
connection_made with this object as its transport, then `on_handshake(self, None)`; failure or
timeout closes the socket and calls `on_handshake(self, exc)` (the app never hears of it). The
peer's close_notify is the app's eof_received; close() sends our close_notify first.
"""
import os
import ssl
import sys
from asyncio import get_running_loop

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE

from fastmesh._core.sockwrite cimport send_or_write, socket_fd

cdef extern from *:
    """
    #include <dlfcn.h>
    #include <limits.h>
    /* The start of CPython's PySSLSocket and PySSLMemoryBIO (Modules/_ssl.c, 3.11 to 3.14). */
    typedef struct { PyObject_HEAD PyObject *fm_socket; void *ssl; } fm_ssl_socket;
    typedef struct { PyObject_HEAD void *bio; } fm_memory_bio;

    static int (*fm_SSL_read)(void *, void *, int);
    static int (*fm_SSL_write)(void *, const void *, int);
    static int (*fm_SSL_get_error)(const void *, int);
    static int (*fm_SSL_shutdown)(void *);
    static void *(*fm_SSL_get_rbio)(const void *);
    static void *(*fm_SSL_get_wbio)(const void *);
    static int (*fm_BIO_read)(void *, void *, int);
    static int (*fm_BIO_write)(void *, const void *, int);
    static size_t (*fm_BIO_ctrl_pending)(void *);
    static void (*fm_ERR_clear_error)(void);
    static unsigned long (*fm_ERR_peek_error)(void);

    /* 1 when every function was found in the (already loaded) library at `path`. */
    static int fm_tls_load(const char *path) {
        void *h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
        if (!h) return 0;
        fm_SSL_read = (int (*)(void *, void *, int)) dlsym(h, "SSL_read");
        fm_SSL_write = (int (*)(void *, const void *, int)) dlsym(h, "SSL_write");
        fm_SSL_get_error = (int (*)(const void *, int)) dlsym(h, "SSL_get_error");
        fm_SSL_shutdown = (int (*)(void *)) dlsym(h, "SSL_shutdown");
        fm_SSL_get_rbio = (void *(*)(const void *)) dlsym(h, "SSL_get_rbio");
        fm_SSL_get_wbio = (void *(*)(const void *)) dlsym(h, "SSL_get_wbio");
        fm_BIO_read = (int (*)(void *, void *, int)) dlsym(h, "BIO_read");
        fm_BIO_write = (int (*)(void *, const void *, int)) dlsym(h, "BIO_write");
        fm_BIO_ctrl_pending = (size_t (*)(void *)) dlsym(h, "BIO_ctrl_pending");
        fm_ERR_clear_error = (void (*)(void)) dlsym(h, "ERR_clear_error");
        fm_ERR_peek_error = (unsigned long (*)(void)) dlsym(h, "ERR_peek_error");
        return fm_SSL_read && fm_SSL_write && fm_SSL_get_error && fm_SSL_shutdown
            && fm_SSL_get_rbio && fm_SSL_get_wbio && fm_BIO_read && fm_BIO_write
            && fm_BIO_ctrl_pending && fm_ERR_clear_error && fm_ERR_peek_error;
    }
    """
    ctypedef struct fm_ssl_socket:
        void* ssl
    ctypedef struct fm_memory_bio:
        void* bio
    int INT_MAX
    int fm_tls_load(const char* path)
    int fm_SSL_read(void* s, void* buf, int n)
    int fm_SSL_write(void* s, const void* buf, int n)
    int fm_SSL_get_error(const void* s, int ret)
    int fm_SSL_shutdown(void* s)
    void* fm_SSL_get_rbio(const void* s)
    void* fm_SSL_get_wbio(const void* s)
    int fm_BIO_read(void* b, void* buf, int n)
    int fm_BIO_write(void* b, const void* buf, int n)
    size_t fm_BIO_ctrl_pending(void* b)
    void fm_ERR_clear_error()
    unsigned long fm_ERR_peek_error()

cdef enum:
    RECORD_MAX = 16384              # the most plaintext one TLS record carries (RFC 8446 5.1)
    WIRE_MAX = 65536                # what _flush sends from its static buffer (more: a bytes)
    SSL_ERROR_WANT_READ = 2         # openssl/ssl.h
    SSL_ERROR_ZERO_RETURN = 6

# One record's plaintext at a time; copied into a bytes object before the app sees it, so one
# buffer serves every connection of the (single-threaded) loop.
cdef char _record[RECORD_MAX]
# What OpenSSL wrote for the socket, on its way to send(): one buffer for the same reason.
cdef char _wire[WIRE_MAX]

cdef enum State:
    HANDSHAKE = 0
    OPEN = 1
    CLOSING = 2
    CLOSED = 3


# What a plain HTTP request sent to a TLS port gets (as nginx does, a 400 in clear text) instead
# of a closed connection the user cannot explain.
_PLAIN_BODY = b'{"message":"plain HTTP request sent to a TLS port: use https://"}'
PLAIN_HTTP_ANSWER = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_PLAIN_BODY)
                     + _PLAIN_BODY)


class HandshakeTimeout(TimeoutError):
    """The TLS handshake did not finish in time."""


def _libssl_path():
    """The libssl the ssl module loaded (one, or None: then there is nothing to be sure of)."""
    import _ssl  # noqa: F401  (loads libssl into this process)
    found = set()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rpartition(" ")[2].strip()
                if "/libssl.so" in path:
                    found.add(path)
    except OSError:
        return None
    return found.pop() if len(found) == 1 else None


def _native_available():
    if os.environ.get("FASTMESH_TLS_NATIVE", "1") == "0":
        return False
    if sys.implementation.name != "cpython" or not (3, 11) <= sys.version_info[:2] <= (3, 14):
        return False
    path = _libssl_path()
    return path is not None and fm_tls_load(os.fsencode(path)) == 1


cdef bint NATIVE = _native_available()
cdef object _SSLSocketType = getattr(ssl._ssl, "_SSLSocket", None)
cdef object _MemoryBIOType = ssl.MemoryBIO
SSLWantReadError = ssl.SSLWantReadError
SSLZeroReturnError = ssl.SSLZeroReturnError


def native() -> bool:
    """True when records go to OpenSSL directly (see the module's docstring)."""
    return NATIVE


cdef class TLSTransport:
    """The socket's protocol and the app protocol's transport, with TLS between them."""

    cdef object context, sslobj, c_sslobj, incoming, outgoing
    cdef object transport, transport_write, transport_closing
    cdef int fd                     # the socket when records may be sent directly (sockwrite)
    cdef object app, app_data_received
    cdef object on_handshake, timer, error
    cdef str server_hostname
    cdef double handshake_timeout
    cdef bint server_side, native, eof_seen, queued
    cdef bint write_shut            # write_eof sent our close_notify: reading goes on
    cdef State state
    cdef void* ssl
    cdef void* rbio
    cdef void* wbio
    cdef dict extra

    def __init__(self, context, bint server_side, app, str server_hostname=None,
                 double handshake_timeout=10.0, on_handshake=None):
        self.context = context
        self.server_side = server_side
        self.app = app
        self.server_hostname = server_hostname
        self.handshake_timeout = handshake_timeout
        self.on_handshake = on_handshake
        self.state = HANDSHAKE
        self.fd = -1

    # -- the socket's side ------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        self.transport_write = transport.write
        self.transport_closing = transport.is_closing
        self.fd = socket_fd(transport)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        try:
            self.sslobj = self.context.wrap_bio(self.incoming, self.outgoing,
                                                server_side=self.server_side,
                                                server_hostname=self.server_hostname)
        except Exception as exc:
            self._handshake_failed(exc)
            return
        self.c_sslobj = self.sslobj._sslobj
        if self.handshake_timeout > 0:
            self.timer = get_running_loop().call_later(
                self.handshake_timeout, self._handshake_timed_out)
        self._handshake_step()

    def data_received(self, data):
        if self.state == OPEN:
            if self.native:
                self._feed_native(data)
            else:
                self._feed_python(data)
        elif self.state == HANDSHAKE:
            self.incoming.write(data)
            self._handshake_step()

    def eof_received(self):
        if self.state == HANDSHAKE:
            self._handshake_failed(ConnectionResetError(
                "the connection was closed during the TLS handshake"))
            return False
        if self.state != OPEN or self.eof_seen:
            return False
        self.eof_seen = True                # no close_notify: the app decides, as for TCP
        return self.app.eof_received()

    def connection_lost(self, exc):
        cdef State was = self.state
        self.state = CLOSED
        self._cancel_timer()
        self.transport = self.transport_write = self.transport_closing = None
        self.fd = -1
        if was == HANDSHAKE:
            self._report(exc or ConnectionResetError(
                "the connection was closed during the TLS handshake"))
        elif self.app is not None:
            app, self.app, self.app_data_received = self.app, None, None
            app.connection_lost(exc or self.error)

    def pause_writing(self):
        if self.state != HANDSHAKE and self.app is not None:
            self.app.pause_writing()

    def resume_writing(self):
        if self.state != HANDSHAKE and self.app is not None:
            self.app.resume_writing()

    # -- the handshake (ssl module) -----------------------------------------------------------
    cdef _handshake_step(self):
        try:
            self.sslobj.do_handshake()
        except SSLWantReadError:
            self._flush()
            return
        except Exception as exc:
            self._flush()                   # the alert, when OpenSSL wrote one
            self._handshake_failed(exc)
            return
        self._cancel_timer()
        self.state = OPEN
        self._go_native()
        self.app_data_received = self.app.data_received
        self._flush()
        self.app.connection_made(self)
        self._report(None)
        if self.state == OPEN and self.incoming.pending:
            self.data_received(b"")         # records that came with the handshake's end

    cdef _go_native(self):
        """Use OpenSSL directly when the objects are what this module expects (see top)."""
        cdef void* s
        if not NATIVE or type(self.c_sslobj) is not _SSLSocketType \
                or type(self.incoming) is not _MemoryBIOType \
                or type(self.outgoing) is not _MemoryBIOType:
            return
        s = (<fm_ssl_socket*><void*>self.c_sslobj).ssl
        if s == NULL:
            return
        self.rbio = (<fm_memory_bio*><void*>self.incoming).bio
        self.wbio = (<fm_memory_bio*><void*>self.outgoing).bio
        if fm_SSL_get_rbio(s) != self.rbio or fm_SSL_get_wbio(s) != self.wbio:
            return
        self.ssl = s
        self.native = True

    def _handshake_timed_out(self):
        self.timer = None
        if self.state == HANDSHAKE:
            self._handshake_failed(HandshakeTimeout(
                f"TLS handshake not done within {self.handshake_timeout:g} s"))

    cdef _handshake_failed(self, exc):
        self._cancel_timer()
        if self.state != HANDSHAKE:
            return
        self.state = CLOSING
        if self.transport is not None:
            if self.server_side and getattr(exc, "reason", None) == "HTTP_REQUEST":
                self.transport_write(PLAIN_HTTP_ANSWER)
            self.fd = -1
            self.transport.close()          # after the alert (or answer) already written
        self._report(exc)

    cdef _report(self, exc):
        cb, self.on_handshake = self.on_handshake, None
        if exc is not None:
            self.app = None
        if cb is not None:
            cb(self, exc)

    cdef _cancel_timer(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # -- records ------------------------------------------------------------------------------
    cdef _feed_native(self, object data):
        cdef const char* p = PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef int r, chunk
        if fm_ERR_peek_error():             # SSL_get_error reads the queue: start it empty
            fm_ERR_clear_error()            # (checked first: clearing walks all its slots)
        while n > 0:
            chunk = <int>n if n < INT_MAX else INT_MAX
            r = fm_BIO_write(self.rbio, p, chunk)
            if r <= 0:
                self._fatal(ssl.SSLError("cannot buffer received TLS bytes"))
                return
            p += r
            n -= r
        while self.state == OPEN:
            r = fm_SSL_read(self.ssl, _record, RECORD_MAX)
            if r > 0:
                self.app_data_received(PyBytes_FromStringAndSize(_record, r))
                continue
            r = fm_SSL_get_error(self.ssl, r)
            if r == SSL_ERROR_WANT_READ:    # the usual end: nothing queued to clear
                break
            fm_ERR_clear_error()
            if r == SSL_ERROR_ZERO_RETURN:
                self._peer_closed()
            else:
                self._fatal(ssl.SSLError(f"TLS record rejected (OpenSSL error {r})"))
            break
        if self.transport is not None and fm_BIO_ctrl_pending(self.wbio):
            self._flush()                   # what reading made OpenSSL send (a KeyUpdate)

    cdef _feed_python(self, object data):
        if data:
            self.incoming.write(data)
        read = self.c_sslobj.read
        while self.state == OPEN:
            try:
                chunk = read(RECORD_MAX)
            except SSLWantReadError:
                break
            except SSLZeroReturnError:
                self._peer_closed()
                break
            except ssl.SSLError as exc:
                self._fatal(exc)
                break
            if not chunk:
                self._peer_closed()
                break
            self.app_data_received(chunk)
        if self.transport is not None and self.outgoing.pending:
            self._flush()

    cdef _peer_closed(self):
        """close_notify: the peer sends no more; like a TCP EOF to the app."""
        if self.eof_seen:
            return
        self.eof_seen = True
        if not self.app.eof_received():
            self.close()

    cdef _fatal(self, exc):
        """A record OpenSSL refused: the stream cannot be trusted past it; the app is told why."""
        self.state = CLOSING
        self.error = exc
        self.fd = -1                        # abort closes the socket now: never send() again
        if self.transport is not None:
            self.transport.abort()

    cdef _flush(self):
        """Hand what OpenSSL wrote to its outgoing BIO to the socket: with a plain uvloop
        socket, open, from the static buffer in one send() (sockwrite); else in one bytes
        object through the socket transport's write."""
        cdef size_t n
        cdef object out
        cdef char* p
        cdef bint direct
        if self.transport is None:
            return
        if self.native:
            n = fm_BIO_ctrl_pending(self.wbio)
            if n == 0:
                return
            direct = self.fd >= 0 and not self.transport_closing()
            if direct and n <= WIRE_MAX:
                out, p = None, _wire
            else:
                out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>n)
                p = PyBytes_AS_STRING(out)
            if fm_BIO_read(self.wbio, p, <int>n) != <int>n:
                self._fatal(ssl.SSLError("cannot read TLS bytes to send"))
                return
            if direct:
                send_or_write(self.fd, &self.queued, self.transport, self.transport_write,
                              p, <Py_ssize_t>n, out)
                return
        else:
            out = self.outgoing.read()
            if not out:
                return
        self.transport_write(out)

    # -- the app's transport --------------------------------------------------------------------
    def write(self, data):
        cdef Py_buffer view
        if self.state != OPEN or self.write_shut:
            return
        if not self.native:
            self.c_sslobj.write(data)
            self._flush()
            return
        if type(data) is bytes:
            self._write_native(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
            return
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self._write_native(<const char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef _write_native(self, const char* p, Py_ssize_t n):
        cdef int r, chunk
        if n == 0:
            return
        if fm_ERR_peek_error():
            fm_ERR_clear_error()
        while n > 0:
            chunk = <int>n if n < INT_MAX else INT_MAX
            r = fm_SSL_write(self.ssl, p, chunk)
            if r <= 0:
                fm_ERR_clear_error()
                self._fatal(ssl.SSLError("TLS write failed"))
                return
            p += r
            n -= r
        self._flush()

    def writelines(self, list_of_data):
        self.write(b"".join(list_of_data))

    def write_eof(self):
        """Half-close: our close_notify says we send no more, and the peer's bytes are still
        read (TLS 1.3 allows it, RFC 8446 6.1; OpenSSL 3 keeps reading after SSL_shutdown).
        The relays of opaque TCP over mTLS need it (a client that shuts down its side)."""
        if not self.can_write_eof():
            raise NotImplementedError("half-close needs TLS 1.3 with native records")
        if self.write_shut:
            return
        self.write_shut = True
        fm_ERR_clear_error()
        fm_SSL_shutdown(self.ssl)
        fm_ERR_clear_error()
        self._flush()

    def can_write_eof(self):
        return self.state == OPEN and self.native and self.sslobj.version() == "TLSv1.3"

    def close(self):
        """Send close_notify, then close the socket once what is buffered has gone."""
        if self.state == HANDSHAKE:
            self._handshake_failed(ConnectionAbortedError("closed during the TLS handshake"))
            return
        if self.state != OPEN:
            return
        self.state = CLOSING
        try:
            if self.native:
                fm_ERR_clear_error()
                fm_SSL_shutdown(self.ssl)
                fm_ERR_clear_error()
            else:
                self.sslobj.unwrap()
        except ssl.SSLError:
            pass                            # SSLWantReadError: the peer's close_notify not awaited
        self._flush()
        self.fd = -1
        if self.transport is not None:
            self.transport.close()

    def abort(self):
        if self.state == HANDSHAKE:
            self._cancel_timer()
        self.state = CLOSING
        self.fd = -1
        if self.transport is not None:
            self.transport.abort()

    def is_closing(self):
        return self.state != OPEN

    def pause_reading(self):
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self):
        if self.transport is not None:
            self.transport.resume_reading()

    def is_reading(self):
        return self.transport is not None and self.transport.is_reading()

    def set_write_buffer_limits(self, high=None, low=None):
        if self.transport is not None:
            self.transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self):
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def get_protocol(self):
        return self.app

    def set_protocol(self, protocol):
        self.app = protocol
        self.app_data_received = protocol.data_received

    def get_extra_info(self, name, default=None):
        if name == "sslcontext":
            return self.sslobj.context if self.sslobj is not None else self.context
        if name == "ssl_object":
            return self.sslobj
        if self.sslobj is not None and self.state != HANDSHAKE:
            if name == "peercert":
                return self.sslobj.getpeercert()
            if name == "cipher":
                return self.sslobj.cipher()
            if name == "compression":
                return self.sslobj.compression()
        if self.transport is not None:
            return self.transport.get_extra_info(name, default)
        return default

    @property
    def native_records(self):
        """True when this connection's records go to OpenSSL directly (tests, /status)."""
        return self.native


def _handshake_waiter(loop):
    """A future and the on_handshake callback that settles it."""
    done = loop.create_future()

    def finished(tls, exc):
        if not done.done():
            if exc is None:
                done.set_result(tls)
            else:
                done.set_exception(exc)
    return done, finished


async def _established(TLSTransport tls, done):
    try:
        return await done
    except BaseException:
        tls.abort()
        raise


async def connect(loop, app, str host, int port, context, str server_hostname=None,
                  double handshake_timeout=10.0):
    """Open a TLS connection for `app` (a protocol): returns once the handshake is done, after
    app.connection_made; raises what the handshake raised (HandshakeTimeout on time out)."""
    done, finished = _handshake_waiter(loop)
    tls = TLSTransport(context, False, app, server_hostname, handshake_timeout, finished)
    await loop.create_connection(lambda: tls, host, port)
    return await _established(tls, done)


async def accept(loop, app, sock, context, double handshake_timeout=10.0):
    """Serve an accepted socket over TLS for `app`: returns once the handshake is done;
    raises what the handshake raised (HandshakeTimeout on time out)."""
    done, finished = _handshake_waiter(loop)
    tls = TLSTransport(context, True, app, None, handshake_timeout, finished)
    await loop.connect_accepted_socket(lambda: tls, sock)
    return await _established(tls, done)
