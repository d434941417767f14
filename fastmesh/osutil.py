"""Small OS questions several modules ask: has a watched file changed, is a process alive; and
the digest helpers they share."""
from __future__ import annotations

import os
from _operator import _compare_digest as compare_digest     # what hmac.compare_digest is

__all__ = ["compare_digest", "file_stamp", "pid_alive", "sha256"]

# SHA-256 (config versions, key digests) from CPython's own module rather than hashlib: hashlib
# loads OpenSSL's digest provider tables at import, ~0.8 MiB of RSS a sidecar or gateway process
# would keep for one hash of its config. Same digests; hashlib only where CPython lacks it.
try:
    from _sha2 import sha256                                # 3.12+
except ImportError:
    try:
        from _sha256 import sha256                          # 3.11
    except ImportError:
        from hashlib import sha256


def file_stamp(path: str) -> tuple:
    """What identifies a file's content cheaply: mtime, size and inode (so an atomic rename of a
    new file over the old one counts as a change), or ("missing", errno)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return ("missing", exc.errno)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def pid_alive(pid: int) -> bool:
    """Is there a process `pid` (one we may not signal counts as alive)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
