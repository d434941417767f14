# Log-linear latency histogram (HDR-like): the contract the proxy cimports.
from libc.stdint cimport int64_t, uint64_t

cdef class Histogram:
    cdef uint64_t* counts        # allocated on first record: an idle route costs ~nothing
    cdef readonly uint64_t count
    cdef readonly int64_t min_ns
    cdef readonly int64_t max_ns
    cdef readonly double sum_ns

    # O(1), no Python interaction. Values are nanoseconds; <= 0 is recorded as 0,
    # values above the top of the range are clamped into the last bucket.
    cdef void record(self, int64_t ns) noexcept
