# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Rate limit counters shared by every worker process of one host.

**Window math: a sliding window from two fixed windows.** Time is cut into fixed windows of
`period` ms aligned to the epoch (a minute window starts at :00, as Kong's). A slot keeps the
count admitted in the current window (`cur`) and in the one before (`prev`). At `elapsed` ms into
the current window the estimate of the trailing period is

    estimate = prev * (period - elapsed) / period + cur

and a request of `cost` is admitted when `estimate + cost <= limit` (then `cur += cost`; refused
requests are not counted). Error bound: since `estimate >= cur`, no fixed window ever admits more
than `limit`; the estimate assumes the previous window's requests were spread evenly, so over an
arbitrary trailing interval of one period the admitted count is below `2 * limit` in the worst
case (the previous window's whole quota arriving at its very end, then the weight decaying), and
equals `limit` for evenly spread traffic. Bursts aligned to the windows get exactly `limit`.
Integer arithmetic throughout (the comparison is scaled by `period`), no rounding error.

**Sharing.** The table is one mapping (MAP_SHARED) of a file (under /dev/shm for the gateway, so
RAM only) or an anonymous shared mapping inherited over fork. It holds a power-of-two number of
64-byte slots, each a counter pair keyed by a 64-bit hash of (limit key, period); a key lives in
one of `PROBE` consecutive slots from `hash & mask` (open addressing, bounded probe, no deletes).
Every update of a slot happens under its own spinlock (`includes/atomics.h`: the holder's pid in
a word, `__atomic` compare-and-swap), so N workers share one limit rather than N x limit. A lock
whose holder died is taken over after a long spin (the dead holder's check is then lost).

**When the table is full** (the `PROBE` slots of a key are all taken by other keys), the slot
used least recently among them is taken over: a slot untouched for two of its periods holds no
information anyway; otherwise the evicted key restarts from zero (counted in `evictions`), so a
table too small for the live keys errs toward admitting. Memory is fixed: `nslots * 64` bytes.
Two hashes colliding (2**-64 per pair) would share one counter.

The file is created complete by the first process to open it (written aside, then published
with link(2)); every process holds a shared flock while it has the table mapped, so an owner can tell whether anyone still uses
it (fastmesh/plugins/rate_limiting.py removes it when the gateway stops).
"""
import os
import struct
import weakref

from libc.stdint cimport int64_t, uint32_t, uint64_t
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.stat cimport fstat, struct_stat
from posix.unistd cimport close as c_close, getpid, pread

cdef extern from "includes/atomics.h" nogil:
    uint64_t fm_load_u64(const uint64_t* p)
    void fm_store_u64(uint64_t* p, uint64_t v)
    void fm_lock(uint32_t* lock, uint32_t me)
    void fm_unlock(uint32_t* lock)
    void fm_count_add(uint64_t* p)
    int fm_errno()

cdef extern from "<sys/file.h>" nogil:
    int flock(int fd, int operation)
    enum: LOCK_SH

cdef extern from "<sys/mman.h>" nogil:
    enum: MAP_ANONYMOUS

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec* tp)
    enum: CLOCK_REALTIME

DEF MAGIC = 0x464d524c54424c31      # "FMRLTBL1"
DEF LAYOUT = 1

PROBE = 8
MAX_PERIODS = 4
DEFAULT_SLOTS = 65536
cdef int C_PROBE = 8


cdef inline uint64_t _mix(uint64_t z) noexcept nogil:
    # splitmix64's finalizer: FNV-1a alone spreads short keys poorly over the low bits
    z = (z ^ (z >> 30)) * <uint64_t>0xbf58476d1ce4e5b9
    z = (z ^ (z >> 27)) * <uint64_t>0x94d049bb133111eb
    return z ^ (z >> 31)


cdef uint64_t hash_key(const char* data, Py_ssize_t n, uint64_t salt) noexcept nogil:
    """FNV-1a 64 of the bytes, salted (the period), mixed; never 0 (0 marks an empty slot)."""
    cdef uint64_t h = <uint64_t>0xcbf29ce484222325
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ <unsigned char>data[i]) * <uint64_t>0x100000001b3
    h = _mix(h ^ _mix(salt + 1))
    return h if h != 0 else 1


cdef int64_t wall_ms() noexcept nogil:
    """Wall-clock ms: windows align to the epoch, the same on every host (as in Redis mode)."""
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


cdef inline int64_t _ceil_div(int64_t a, int64_t b) noexcept nogil:
    return -((-a) // b) if a > 0 else 0


cdef inline void _roll(Slot* s, int64_t period, int64_t now) noexcept nogil:
    """Bring the slot's windows up to the one containing `now`."""
    cdef int64_t w = now - now % period
    if s.period != period:
        s.period = period
        s.window = w
        s.cur = 0
        s.prev = 0
    elif s.window != w:
        s.prev = s.cur if s.window == w - period else 0
        s.cur = 0
        s.window = w


cdef int _decide(int64_t prev, int64_t cur, int64_t period, int64_t limit, int64_t elapsed,
                 int64_t cost, Decision* out) noexcept nogil:
    """The sliding-window verdict for `cost` more at `elapsed` ms into the current window; the
    same arithmetic serves the shared table and the Redis policy (counts read from Redis)."""
    cdef int64_t scaled, free_scaled, need
    # estimate * period, exact in integers
    scaled = prev * (period - elapsed) + cur * period
    out.limit = limit
    out.reset_ms = period - elapsed
    out.allowed = scaled + cost * period <= limit * period
    if out.allowed:
        out.retry_ms = 0
        free_scaled = limit * period - scaled - cost * period
        out.remaining = free_scaled // period if free_scaled > 0 else 0
    else:
        out.remaining = 0
        if cost > limit:
            out.retry_ms = out.reset_ms + period        # never admitted; say "a period"
        elif prev > 0 and cur + cost <= limit:
            # later in this window the previous window's weight will have decayed enough:
            # prev * (period - e) <= (limit - cur - cost) * period
            need = period - ((limit - cur - cost) * period) // prev
            out.retry_ms = need - elapsed if need > elapsed else 1
        else:
            # in the next window `cur` becomes the weighted previous count
            need = period - ((limit - cost) * period) // cur if cur > 0 else 0
            out.retry_ms = out.reset_ms + (need if need > 0 else 0)
    return out.allowed


def decide(int64_t prev, int64_t cur, int64_t period_ms, int64_t limit, int64_t elapsed_ms,
           int64_t cost=1):
    """(allowed, remaining, reset_ms, retry_ms) for counts kept elsewhere (the Redis policy)."""
    cdef Decision d
    if period_ms <= 0 or not 0 <= elapsed_ms < period_ms:
        raise ValueError("period must be > 0 and 0 <= elapsed < period")
    _decide(prev, cur, period_ms, limit, elapsed_ms, cost, &d)
    return bool(d.allowed), d.remaining, d.reset_ms, d.retry_ms


_tables = weakref.WeakSet()


def _after_fork():
    # a lock word holds its holder's pid: a forked child must lock in its own name
    for table in list(_tables):
        (<SharedTable>table).me = <uint32_t>getpid()


os.register_at_fork(after_in_child=_after_fork)


def key_hash(bytes key, int64_t salt=0):
    """The 64-bit hash of `key` salted with `salt` (tests and diagnostics)."""
    return hash_key(key, len(key), <uint64_t>salt)


def now_ms():
    return wall_ms()


def _open_or_create(path, Py_ssize_t nslots):
    """An fd of the table at `path`, creating it complete if missing.

    A new table is written to a temporary file and published with link(2), which fails if the
    name exists: every opener sees either no file or a whole one, and no lock has to be taken
    exclusively (the shared flock each process then holds says "mapped here").
    """
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            pass
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, sizeof(TableHead) + <size_t>nslots * sizeof(Slot))
            os.pwrite(fd, struct.pack("=8Q", MAGIC, LAYOUT, nslots, 0, os.getpid(), 0, 0, 0), 0)
            try:
                os.link(tmp, path)
            except FileExistsError:
                os.close(fd)
                continue            # another process published first: open theirs
            return fd
        except BaseException:
            try:
                os.close(fd)
            except OSError:
                pass
            raise
        finally:
            os.unlink(tmp)


cdef class SharedTable:
    """A fixed-size table of counter slots in shared memory (a file mapping, or anonymous)."""

    def __cinit__(self, path=None, Py_ssize_t nslots=DEFAULT_SLOTS):
        self.fd = -1
        self.head = NULL
        self.slots = NULL
        self.path = path

    def __init__(self, path=None, Py_ssize_t nslots=DEFAULT_SLOTS):
        """Map `path` (created if missing, with `nslots` slots) or, with no path, an anonymous
        shared mapping that forked children inherit."""
        cdef struct_stat st
        cdef TableHead head
        cdef void* base
        cdef bytes encoded
        if nslots < C_PROBE or nslots & (nslots - 1):
            raise ValueError(f"nslots must be a power of two >= {C_PROBE}, found {nslots}")
        self.me = <uint32_t>getpid()
        if path is None:
            self.length = sizeof(TableHead) + <size_t>nslots * sizeof(Slot)
            base = mmap(NULL, self.length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0)
            if base == MAP_FAILED:
                raise OSError(os.strerror(fm_errno()))
            self._attach(base, nslots, True)
            _tables.add(self)
            return
        self.fd = _open_or_create(path, nslots)
        try:
            if flock(self.fd, LOCK_SH) != 0 or fstat(self.fd, &st) != 0:
                raise OSError(fm_errno(), os.strerror(fm_errno()))
            if pread(self.fd, &head, sizeof(TableHead), 0) != sizeof(TableHead) \
                    or head.magic != MAGIC or head.layout != LAYOUT \
                    or head.nslots < <uint64_t>C_PROBE or head.nslots & (head.nslots - 1):
                raise ValueError(f"{path} is not a fastmesh rate limit table")
            nslots = head.nslots
            self.length = sizeof(TableHead) + <size_t>nslots * sizeof(Slot)
            if <size_t>st.st_size != self.length:
                raise ValueError(f"{path}: size {st.st_size} does not match {nslots} slots")
            base = mmap(NULL, self.length, PROT_READ | PROT_WRITE, MAP_SHARED, self.fd, 0)
            if base == MAP_FAILED:
                raise OSError(fm_errno(), os.strerror(fm_errno()))
            self._attach(base, nslots, False)
        except BaseException:
            self.close()
            raise
        _tables.add(self)

    cdef void _attach(self, void* base, Py_ssize_t nslots, bint fresh) noexcept:
        self.head = <TableHead*>base
        self.slots = <Slot*>(<char*>base + sizeof(TableHead))
        self.mask = <uint64_t>(nslots - 1)
        if fresh:
            self.head.layout = LAYOUT
            self.head.nslots = <uint64_t>nslots
            self.head.creator = <uint64_t>getpid()
            fm_store_u64(&self.head.magic, MAGIC)

    def close(self):
        """Unmap and drop the shared lock (the file stays: its owner removes it)."""
        if self.head != NULL:
            munmap(<void*>self.head, self.length)
            self.head = NULL
            self.slots = NULL
        if self.fd >= 0:
            c_close(self.fd)
            self.fd = -1

    def __dealloc__(self):
        if self.head != NULL:
            munmap(<void*>self.head, self.length)
        if self.fd >= 0:
            c_close(self.fd)

    @property
    def nslots(self):
        return self.mask + 1 if self.head != NULL else 0

    @property
    def evictions(self):
        self._check()
        return fm_load_u64(&self.head.evictions)

    @property
    def creator(self):
        self._check()
        return self.head.creator

    def used(self):
        """Slots that have ever held a key."""
        self._check()
        cdef uint64_t i, n = 0
        for i in range(self.mask + 1):
            if fm_load_u64(&self.slots[i].key) != 0:
                n += 1
        return n

    cdef int _check(self) except -1:
        if self.head == NULL:
            raise ValueError("rate limit table is closed")
        return 0

    cdef Slot* _find(self, uint64_t key, int64_t now, bint claim) noexcept nogil:
        """The slot of `key`, returned LOCKED; with `claim`, an empty or the least recently used
        of its probe slots is taken for it; NULL when absent and not claiming."""
        cdef int i
        cdef Slot* s
        cdef Slot* oldest = NULL
        cdef uint64_t k
        cdef uint64_t home = key & self.mask
        for i in range(C_PROBE):
            s = &self.slots[(home + <uint64_t>i) & self.mask]
            k = fm_load_u64(&s.key)
            if k == key or (k == 0 and claim):
                fm_lock(&s.lock, self.me)
                if s.key == key:
                    return s
                if s.key == 0:      # still empty: slots only ever go from empty to used
                    fm_store_u64(&s.key, key)
                    s.period = 0
                    s.touched = now
                    return s
                fm_unlock(&s.lock)  # lost the race for it to another key: keep probing
                continue
            if k == 0:
                return NULL         # no deletes, so nothing lies past an empty slot
            if oldest == NULL or s.touched < oldest.touched:
                oldest = s
        if not claim or oldest == NULL:
            return NULL
        fm_lock(&oldest.lock, self.me)
        if oldest.key != key:
            # stale (idle for two of its periods) is a free reuse; a live key is an eviction
            if oldest.period == 0 or now - oldest.touched < 2 * oldest.period:
                fm_count_add(&self.head.evictions)
            fm_store_u64(&oldest.key, key)
            oldest.period = 0
            oldest.touched = now
        return oldest

    cdef int hit(self, uint64_t key, int64_t period_ms, int64_t limit, int64_t cost,
                 int64_t now, Decision* out) noexcept nogil:
        cdef Slot* s = self._find(key, now, True)
        _roll(s, period_ms, now)
        if _decide(s.prev, s.cur, period_ms, limit, now - s.window, cost, out):
            s.cur += cost
        s.touched = now
        fm_unlock(&s.lock)
        return out.allowed

    cdef void undo(self, uint64_t key, int64_t period_ms, int64_t cost, int64_t now) noexcept nogil:
        cdef Slot* s = self._find(key, now, False)
        if s == NULL:
            return
        if s.period == period_ms and s.window == now - now % period_ms:
            s.cur = s.cur - cost if s.cur > cost else 0
        fm_unlock(&s.lock)

    def check(self, bytes key, int64_t period_ms, int64_t limit, int64_t cost=1, now=None):
        """One period: (allowed, remaining, reset_ms, retry_ms). For tests and diagnostics."""
        cdef Decision d
        cdef int64_t t = wall_ms() if now is None else now
        self._check()
        if period_ms <= 0 or limit < 0 or cost < 0:
            raise ValueError("period must be > 0, limit and cost >= 0")
        self.hit(hash_key(key, len(key), <uint64_t>period_ms), period_ms, limit, cost, t, &d)
        return bool(d.allowed), d.remaining, d.reset_ms, d.retry_ms


cdef class Limiter:
    """Up to four (period, limit) pairs checked together against one SharedTable.

    `take(key)` admits when every period admits; a later period refusing takes back what the
    earlier ones counted, so a refused request costs no quota. After the call `limit`,
    `remaining`, `reset_ms` (and `retry_ms` when refused) describe the most restrictive period:
    the refusing one, or the one with the least remaining. One call, no Python objects made.
    """

    def __init__(self, SharedTable table, periods):
        """`periods`: [(period_ms, limit)], 1 to 4 of them."""
        if not 1 <= len(periods) <= MAX_PERIODS:
            raise ValueError(f"1 to {MAX_PERIODS} periods, found {len(periods)}")
        self.table = table
        self.n = 0
        for period_ms, limit in periods:
            if period_ms <= 0 or limit < 0:
                raise ValueError("period must be > 0 and limit >= 0")
            self.periods[self.n] = period_ms
            self.limits[self.n] = limit
            self.remainings[self.n] = limit
            self.n += 1

    cdef int check(self, const char* key, Py_ssize_t n, int64_t cost, int64_t now) noexcept nogil:
        cdef Decision d
        cdef int i, j
        cdef uint64_t h
        cdef bint chosen = False
        for i in range(self.n):
            h = hash_key(key, n, <uint64_t>self.periods[i])
            if not self.table.hit(h, self.periods[i], self.limits[i], cost, now, &d):
                for j in range(i):
                    self.table.undo(hash_key(key, n, <uint64_t>self.periods[j]),
                                    self.periods[j], cost, now)
                self.limit = d.limit
                self.remaining = 0
                self.reset_ms = d.reset_ms
                self.retry_ms = d.retry_ms
                return 0
            self.remainings[i] = d.remaining
            if not chosen or d.remaining < self.remaining:
                chosen = True
                self.limit = d.limit
                self.remaining = d.remaining
                self.reset_ms = d.reset_ms
        self.retry_ms = 0
        return 1

    def take(self, bytes key, int64_t cost=1, now=None):
        """Count one request (of `cost`) for `key` in every period; True when admitted."""
        if self.table.head == NULL:
            raise ValueError("rate limit table is closed")
        return self.check(key, len(key), cost, wall_ms() if now is None else now) == 1

    def remaining_of(self, int i):
        """Remaining quota of period `i` after the last admitted `take`."""
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.remainings[i]
