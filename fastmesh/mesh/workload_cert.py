"""Where a sidecar's workload certificate comes from, and keeping it fresh.

Two modes, one interface (files in a workload directory: cert.pem, key.pem, ca.pem):

- `CertificateSource.from_dir(out_dir)`: the files `fastmesh ca issue` writes; they are watched
  (fastmesh.osutil.file_stamp, every few seconds) and `on_change` runs once a complete new pair
  is there (the key matches the certificate, the certificate chains to ca.pem).
- `CertificateSource.from_ca_server(url, token, service, out_dir)`: the key is made here, only a
  CSR and the bootstrap token go to `fastmesh ca serve`; the answer is checked, written, and
  renewed at 2/3 of its lifetime (sooner, with backoff, after failures).

Either way an expired or nearly expired certificate is logged loudly (logger "fastmesh", once
per state change) and shows in status().

The files are checked with the ssl module alone (the pair loads together, and a TLS handshake in
memory verifies cert.pem against ca.pem and decodes it), not with `cryptography`, which would
add ~12 MiB to the RSS of every sidecar in mTLS. Only the CA server mode, which makes keys and
CSRs, loads it (with fastmesh.mesh.ca).
"""
from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from typing import Callable
from urllib.parse import urlsplit

from fastmesh import jsonbytes
from fastmesh.mesh.registry import (
    BUNDLE_FILE, CERT_FILE, KEY_FILE, lifetime_of, peer_identity, service_name, service_of,
)
from fastmesh.osutil import file_stamp, sha256
from fastmesh.tls import ALPN_HTTP1, harden, no_password

log = logging.getLogger("fastmesh")

OK, EXPIRING, EXPIRED = "ok", "expiring", "expired"
RENEW_AT = 2 / 3                    # of the lifetime
EXPIRING_FRACTION = 0.10            # "expiring": under 10 % of the lifetime left, or under an
EXPIRING_SECONDS = 3600.0           # hour, but never more than a quarter of the lifetime (a
EXPIRING_CAP = 0.25                 # certificate renewed on time at 2/3 is never "expiring")
MAX_RESPONSE = 1024 * 1024
MAX_BACKOFF = 60.0
# OpenSSL's X509_V_FLAG_NO_CHECK_TIME (ssl.VerifyFlags has no name for it): the issuer check
# leaves the validity period to _read, which says "expired" in its own words.
NO_CHECK_TIME = 0x200000
HANDSHAKE_ROUNDS = 10


class CertificateError(Exception):
    """No usable certificate (yet); the message says what is wrong."""


def expiring_threshold(lifetime: float) -> float:
    return min(max(EXPIRING_FRACTION * lifetime, EXPIRING_SECONDS), EXPIRING_CAP * lifetime)


class _Pair:
    """A checked (certificate, key, bundle) set as read from the workload directory."""

    def __init__(self, decoded: dict, der: bytes, identity: str, stamps: tuple):
        self.identity = identity
        self.issued, self.not_after = lifetime_of(ssl.cert_time_to_seconds(decoded["notBefore"]),
                                                  ssl.cert_time_to_seconds(decoded["notAfter"]))
        self.stamps = stamps
        self.fingerprint = sha256(der).digest()


def _check_files(out_dir: str, cert_file: str, key_file: str, ca_file: str) -> tuple[dict, bytes]:
    """cert.pem as ssl decodes it (getpeercert()) and its DER, once key.pem belongs to it and it
    was issued by a certificate in ca.pem; else CertificateError saying which of those failed."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        server.load_cert_chain(cert_file, key_file, password=no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise CertificateError(f"{out_dir}: key.pem does not belong to cert.pem") from None
        raise CertificateError(f"{out_dir}: cert.pem or key.pem is not valid PEM") from None
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    # Issued by any certificate of the bundle (a root, or an intermediate taken as the anchor).
    client.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN | NO_CHECK_TIME
    try:
        client.load_verify_locations(cafile=ca_file)
    except ssl.SSLError:                    # no certificate in it
        raise CertificateError(f"{out_dir}: cert.pem was not issued by ca.pem") from None
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    ours = client.wrap_bio(to_client, to_server)
    theirs = server.wrap_bio(to_server, to_client, server_side=True)
    for _ in range(HANDSHAKE_ROUNDS):
        try:
            ours.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:                # the verification failed
            raise CertificateError(f"{out_dir}: cert.pem was not issued by ca.pem") from None
        try:
            theirs.do_handshake()
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            raise CertificateError(f"{out_dir}: cert.pem cannot be used: {exc.reason or exc}") \
                from None
    else:
        raise CertificateError(f"{out_dir}: cert.pem could not be checked (no handshake)")
    return ours.getpeercert(), ours.getpeercert(binary_form=True)


class CertificateSource:
    """A sidecar's workload certificate (see the module doc). Build it with from_dir() or
    from_ca_server(); start(on_change) once; read cert_file/key_file/ca_file after on_change."""

    def __init__(self, out_dir: str, *, service: str | None = None, url: str | None = None,
                 token: str | None = None, ttl: float | None = None,
                 server_ca: str | None = None, poll_interval: float = 2.0,
                 start_timeout: float = 15.0, request_timeout: float = 5.0):
        self.out_dir = out_dir
        self._service = service_name(service) if service is not None else None
        self.url = url
        self._token = token
        self.ttl = ttl
        self.server_ca = server_ca
        self.poll_interval = poll_interval
        self.start_timeout = start_timeout
        self.request_timeout = request_timeout
        self.mode = "ca-server" if url else "files"
        self.current: _Pair | None = None
        self.last_error: str | None = None
        self.renewals = 0
        self._on_change: Callable[[], None] | None = None
        self._state = OK
        self._tasks: list[asyncio.Task] = []

    def __repr__(self) -> str:                 # never the token
        return f"CertificateSource({self.mode}, {self.out_dir!r}, service={self._service!r})"

    @classmethod
    def from_dir(cls, out_dir: str, service: str | None = None, *, poll_interval: float = 2.0,
                 start_timeout: float = 15.0) -> "CertificateSource":
        """Files made by `fastmesh ca issue`; with `service`, a certificate for another service
        is refused."""
        return cls(out_dir, service=service, poll_interval=poll_interval,
                   start_timeout=start_timeout)

    @classmethod
    def from_ca_server(cls, url: str, token: str, service: str, out_dir: str, *,
                       ttl: float | None = None, server_ca: str | None = None,
                       poll_interval: float = 1.0, start_timeout: float = 15.0,
                       request_timeout: float = 5.0) -> "CertificateSource":
        """Certificates from `fastmesh ca serve` at `url` (http:// or https://; https verifies
        the service with `server_ca`, else with out_dir/ca.pem from an earlier run)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CertificateError(f"CA server URL must be http://HOST:PORT or https://..., "
                                   f"found {url!r}")
        if not token:
            raise CertificateError("a bootstrap token is required ('fastmesh ca token')")
        return cls(out_dir, service=service, url=url, token=token, ttl=ttl, server_ca=server_ca,
                   poll_interval=poll_interval, start_timeout=start_timeout,
                   request_timeout=request_timeout)

    # --- what the sidecar reads ---

    @property
    def cert_file(self) -> str:
        return os.path.join(self.out_dir, CERT_FILE)

    @property
    def key_file(self) -> str:
        return os.path.join(self.out_dir, KEY_FILE)

    @property
    def ca_file(self) -> str:
        return os.path.join(self.out_dir, BUNDLE_FILE)

    @property
    def expires_at(self) -> float | None:
        return self.current.not_after if self.current else None

    @property
    def identity(self) -> str | None:
        return self.current.identity if self.current else None

    @property
    def service(self) -> str | None:
        if self._service is not None:
            return self._service
        return service_of(self.identity) if self.current else None

    def state(self, now: float | None = None) -> str:
        if self.current is None:
            return EXPIRED
        now = time.time() if now is None else now
        left = self.current.not_after - now
        if left <= 0:
            return EXPIRED
        if left < expiring_threshold(self.current.not_after - self.current.issued):
            return EXPIRING
        return OK

    def status(self) -> dict:
        now = time.time()
        pair = self.current
        return {"identity": self.identity, "service": self.service, "mode": self.mode,
                "not_after": pair.not_after if pair else None,
                "seconds_left": round(pair.not_after - now, 3) if pair else None,
                "state": self.state(now), "last_error": self.last_error,
                "renewals": self.renewals}

    # --- lifecycle ---

    async def start(self, on_change: Callable[[], None]) -> None:
        """Return once the files hold a valid certificate (raise CertificateError after
        start_timeout), then keep them fresh in the background."""
        self._on_change = on_change
        if self.mode == "files":
            await self._first_files()
        else:
            await self._first_from_server()
        self._state = self.state()
        if self._state != OK:
            self._log_state(self._state)
        self._tasks.append(asyncio.ensure_future(self._monitor()))
        if self.mode == "ca-server":
            self._tasks.append(asyncio.ensure_future(self._renew_loop()))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass

    # --- reading and checking the files ---

    def _read(self) -> _Pair:
        """The files as a checked pair, or CertificateError saying what is wrong."""
        stamps = (file_stamp(self.cert_file), file_stamp(self.key_file), file_stamp(self.ca_file))
        try:
            for path in (self.cert_file, self.key_file, self.ca_file):
                with open(path, "rb"):
                    pass
            decoded, der = _check_files(self.out_dir, self.cert_file, self.key_file, self.ca_file)
        except OSError as exc:
            raise CertificateError(f"cannot read {exc.filename}: {exc.strerror}") from None
        identity = peer_identity(decoded)
        if identity is None or service_of(identity) is None:
            raise CertificateError(f"{self.out_dir}: cert.pem has no spiffe://.../svc/NAME id")
        if self._service is not None and service_of(identity) != self._service:
            raise CertificateError(f"{self.out_dir}: cert.pem is for {identity}, not for "
                                   f"service '{self._service}'")
        pair = _Pair(decoded, der, identity, stamps)
        if pair.not_after <= time.time():
            raise CertificateError(f"{self.out_dir}: cert.pem ({identity}) expired at "
                                   f"{_when(pair.not_after)}")
        return pair

    async def _first_files(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                self.current = self._read()
                self.last_error = None
                return
            except CertificateError as exc:
                self.last_error = str(exc)
            if time.monotonic() >= deadline:
                raise CertificateError(f"no valid workload certificate in {self.out_dir} after "
                                       f"{self.start_timeout:g}s: {self.last_error} (write it "
                                       "with 'fastmesh ca issue --out DIR')")
            await asyncio.sleep(min(0.1, self.poll_interval))

    def _poll_files(self) -> None:
        stamps = (file_stamp(self.cert_file), file_stamp(self.key_file), file_stamp(self.ca_file))
        if self.current is not None and stamps == self.current.stamps:
            return
        try:
            pair = self._read()
        except CertificateError as exc:
            if str(exc) != self.last_error:       # half-written or bad: keep the old pair
                log.warning("workload certificate: %s (still using the previous one)", exc)
            self.last_error = str(exc)
            return
        self.last_error = None
        changed = self.current is None or pair.fingerprint != self.current.fingerprint
        self.current = pair
        if changed:
            self.renewals += 1
            log.info("workload certificate %s reloaded, valid until %s", pair.identity,
                     _when(pair.not_after))
            self._changed()

    def _changed(self) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change()
        except Exception:                        # a broken callback must not stop renewals
            log.exception("workload certificate: on_change failed")

    # --- expiry watch ---

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            if self.mode == "files":
                self._poll_files()
            state = self.state()
            if state != self._state:
                self._state = state
                self._log_state(state)

    def _log_state(self, state: str) -> None:
        pair = self.current
        if pair is None:
            return
        left = pair.not_after - time.time()
        why = f" (last error: {self.last_error})" if self.last_error else ""
        if state == EXPIRED:
            log.error("workload certificate %s EXPIRED at %s: peers will refuse it%s",
                      pair.identity, _when(pair.not_after), why)
        elif state == EXPIRING:
            log.warning("workload certificate %s expires in %.0fs (at %s) and has not been "
                        "renewed%s", pair.identity, left, _when(pair.not_after), why)
        else:
            log.info("workload certificate %s is valid until %s", pair.identity,
                     _when(pair.not_after))

    # --- the signing service ---

    async def _first_from_server(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        delay = 0.2
        while True:
            try:
                await self._fetch()
                return
            except CertificateError as exc:
                self.last_error = str(exc)
                final = getattr(exc, "final", False)
            if final or time.monotonic() + delay >= deadline:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        try:                       # the service is down: a valid pair from an earlier run will do
            self.current = self._read()
        except CertificateError:
            raise CertificateError(f"no certificate for '{self._service}' from {self.url}: "
                                   f"{self.last_error}") from None
        log.warning("workload certificate: the CA server did not answer (%s); using %s until "
                    "%s", self.last_error, self.current.identity, _when(self.current.not_after))

    async def _renew_loop(self) -> None:
        failures = 0
        while True:
            pair = self.current
            due = pair.issued + RENEW_AT * (pair.not_after - pair.issued)
            if failures:
                left = pair.not_after - time.time()
                due = time.time() + min(MAX_BACKOFF, 2.0 ** (failures - 1),
                                        max(1.0, left / 10 if left > 0 else 1.0))
            await asyncio.sleep(max(0.5, due - time.time()))
            try:
                await self._fetch()
                failures = 0
                self.renewals += 1
                log.info("workload certificate %s renewed, valid until %s",
                         self.current.identity, _when(self.current.not_after))
                self._changed()
            except CertificateError as exc:
                failures += 1
                self.last_error = str(exc)
                log.warning("workload certificate: renewal failed (%s); retrying", exc)

    async def _fetch(self) -> None:
        """One CSR round trip: a new key here, the certificate from the service, files written."""
        from cryptography import x509

        from fastmesh.mesh.ca import (
            cert_identity, generate_key, make_csr, private_key_pem, write_workload,
        )
        key = generate_key()
        csr = make_csr(key)
        request = {"service": self._service, "csr": csr.decode(), "token": self._token}
        if self.ttl is not None:
            request["ttl"] = self.ttl
        status, answer = await self._post("/v1/sign", jsonbytes.dumps(request))
        if status != 200:
            error = CertificateError(f"the CA server answered {status}: "
                                     f"{answer.get('message', '?')}")
            error.final = status in (400, 403)       # retrying will not change the answer
            raise error
        cert_pem, ca_pem = answer.get("certificate"), answer.get("ca")
        if not isinstance(cert_pem, str) or not isinstance(ca_pem, str):
            raise CertificateError("the CA server's answer has no certificate and ca")
        try:
            cert = x509.load_pem_x509_certificate(cert_pem.encode())
        except ValueError:
            raise CertificateError("the CA server sent an invalid certificate") from None
        roots = _load_bundle(ca_pem.encode())
        if self.server_ca is not None:
            try:
                with open(self.server_ca, "rb") as f:
                    roots = _load_bundle(f.read())
            except OSError as exc:
                raise CertificateError(f"cannot read {self.server_ca}: {exc.strerror}") from None
        if _spki(cert.public_key()) != _spki(key.public_key()):
            raise CertificateError("the CA server's certificate is not for the key sent")
        if not _issued_by_any(cert, roots):
            raise CertificateError("the CA server's certificate does not chain to its root")
        identity = cert_identity(cert)
        if service_of(identity) != self._service:
            raise CertificateError(f"the CA server's certificate names {identity}, not "
                                   f"service '{self._service}'")
        try:
            write_workload(self.out_dir, cert_pem, private_key_pem(key), ca_pem)
            self.current = self._read()
        except OSError as exc:
            raise CertificateError(f"cannot write {self.out_dir}: {exc}") from None
        self.last_error = None

    async def _post(self, path: str, body: bytes) -> tuple[int, dict]:
        parts = urlsplit(self.url)
        tls = parts.scheme == "https"
        host = parts.hostname
        port = parts.port or (443 if tls else 80)
        ctx = None
        if tls:
            ctx = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
            ctx.set_alpn_protocols(ALPN_HTTP1)
            trust = self.server_ca or (self.ca_file if os.path.exists(self.ca_file) else None)
            if trust is None:
                error = CertificateError("an https CA server needs its ca.pem (server_ca) to be "
                                         "verified")
                error.final = True
                raise error
            try:
                ctx.load_verify_locations(trust)
            except (OSError, ssl.SSLError) as exc:
                raise CertificateError(f"cannot load {trust}: {exc}") from None
        target = (parts.path.rstrip("/") + path) or path
        authority = f"[{host}]" if ":" in host else host
        head = (f"POST {target} HTTP/1.1\r\nHost: {authority}:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode("latin-1")
        writer = None
        try:
            async with asyncio.timeout(self.request_timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=ctx, server_hostname=host if tls else None)
                writer.write(head + body)
                data = b""
                while len(data) <= MAX_RESPONSE:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    data += chunk
        except TimeoutError:
            raise CertificateError(f"no answer from {self.url} within "
                                   f"{self.request_timeout:g}s") from None
        except ssl.SSLError as exc:
            raise CertificateError(f"TLS with {self.url} failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise CertificateError(f"cannot reach {self.url}: {exc.strerror or exc}") from None
        finally:
            if writer is not None:
                writer.close()
        return _parse_answer(data)


def _spki(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _issued_by_any(cert, roots: list) -> bool:
    from cryptography.exceptions import InvalidSignature
    for root in roots:
        try:
            cert.verify_directly_issued_by(root)
            return True
        except (ValueError, TypeError, InvalidSignature):
            continue
    return False


def _load_bundle(pem: bytes) -> list:
    from cryptography import x509
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []


def _parse_answer(data: bytes) -> tuple[int, dict]:
    from fastmesh._core.http1 import HTTPParseError, parse_response
    try:
        resp = parse_response(data)
    except HTTPParseError as exc:
        raise CertificateError(f"the CA server's answer is not HTTP ({exc.message})") from None
    if resp is None:
        raise CertificateError("the CA server closed the connection without a whole answer")
    body = data[resp.consumed:]
    if resp.content_length is not None:
        body = body[:resp.content_length]
    try:
        answer = jsonbytes.loads(body)
    except ValueError:
        answer = {"message": body[:200].decode("utf-8", "replace")}
    return resp.status, answer if isinstance(answer, dict) else {"message": str(answer)[:200]}


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
