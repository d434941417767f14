# Sliding-window rate limit counters in a table shared by the worker processes of one host: the
# contract a native plugin cimports (see ratelimit.pyx for the window math and its error bound).
from libc.stdint cimport int64_t, uint32_t, uint64_t

# One 64-byte slot (a cache line): a counter pair for one (limit key, period). All fields are
# read and written under `lock` (a pid, 0 = free), except `key`, which probes read atomically.
ctypedef struct Slot:
    uint64_t key            # 64-bit hash of the limit key and period; 0 = never used
    int64_t window          # start of the current fixed window, ms since the epoch
    int64_t period          # window length, ms
    int64_t cur             # admitted in the current window
    int64_t prev            # admitted in the window before it
    int64_t touched         # last use, ms since the epoch (eviction picks the oldest)
    uint32_t lock
    uint32_t _pad0
    uint64_t _pad1

ctypedef struct TableHead:
    uint64_t magic
    uint64_t layout         # bumped when Slot changes
    uint64_t nslots         # a power of two
    uint64_t evictions      # live slots taken over for another key (table full)
    uint64_t creator        # pid of the process that created the file
    uint64_t _pad[3]

# The outcome of one check, for the most restrictive period that was looked at.
ctypedef struct Decision:
    int allowed
    int64_t limit
    int64_t remaining       # after this request (0 when refused)
    int64_t reset_ms        # until the current window of that period ends
    int64_t retry_ms        # refused: until a request of the same cost would be admitted


cdef uint64_t hash_key(const char* data, Py_ssize_t n, uint64_t salt) noexcept nogil
cdef int64_t wall_ms() noexcept nogil


cdef class SharedTable:
    cdef TableHead* head
    cdef Slot* slots
    cdef uint64_t mask
    cdef size_t length
    cdef int fd
    cdef uint32_t me
    cdef readonly str path
    cdef object __weakref__

    cdef void _attach(self, void* base, Py_ssize_t nslots, bint fresh) noexcept
    cdef int _check(self) except -1
    cdef Slot* _find(self, uint64_t key, int64_t now, bint claim) noexcept nogil
    # Admit `cost` against (`key`, `period_ms`, `limit`) at `now`: 1 (counted) or 0 (refused).
    cdef int hit(self, uint64_t key, int64_t period_ms, int64_t limit, int64_t cost,
                 int64_t now, Decision* out) noexcept nogil
    # Take back a cost admitted in the window that contains `now` (another period refused).
    cdef void undo(self, uint64_t key, int64_t period_ms, int64_t cost, int64_t now) noexcept nogil


cdef class Limiter:
    cdef SharedTable table
    cdef int n
    cdef int64_t periods[4]
    cdef int64_t limits[4]
    cdef readonly int64_t limit
    cdef readonly int64_t remaining
    cdef readonly int64_t reset_ms
    cdef readonly int64_t retry_ms
    cdef int64_t remainings[4]

    cdef int check(self, const char* key, Py_ssize_t n, int64_t cost, int64_t now) noexcept nogil
