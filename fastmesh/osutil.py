"""Small OS questions several modules ask: has a watched file changed, is a process alive."""
from __future__ import annotations

import os


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
