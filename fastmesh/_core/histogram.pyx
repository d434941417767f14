# cython: language_level=3, boundscheck=False, wraparound=False
"""Log-linear latency histogram (HDR-like) over nanoseconds.

Layout (``LINEAR_BITS`` = 6, so 64 linear sub-buckets per power of two):

* values ``0 .. 127`` ns have one exact bucket each (indices 0..127);
* a value ``v`` in ``[2**e, 2**(e+1))`` with ``e >= 7`` falls into one of 64
  equal-width sub-buckets of width ``w = 2**(e-6)``; its index is
  ``(e-6)*64 + (v >> (e-6))``, which continues the exact range seamlessly.

A bucket is reported by its midpoint ``lo + w/2``, so the relative error of any
reported value is at most ``(w/2)/lo = 2**-7`` (0.78 %), for every value in the
range.  The range ends at ``MAX_VALUE_NS = 2**37 - 1`` ns (~137 s): larger values
are clamped into the last bucket; values ``<= 0`` are recorded as 0.  That is
``BUCKETS = 2048`` counters (16 KiB), allocated on the first ``record`` only, so
an idle per-route histogram costs just the object header.

Percentile rank definition (also used by the tests): for ``q`` in [0, 100] and
``n`` samples, ``rank = max(1, ceil(q/100 * n))`` and the answer is the value of
the ``rank``-th smallest sample.  Rank 1 and rank n are answered exactly from
``min_ns``/``max_ns``; other ranks return the midpoint of the bucket holding that
sample, clamped into ``[min_ns, max_ns]``.
"""
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset
from libc.math cimport ceil, isnan


cdef extern from *:
    """
    #if defined(_MSC_VER)
    #include <intrin.h>
    static inline int fm_hist_log2(unsigned long long v) {
        unsigned long idx; _BitScanReverse64(&idx, v); return (int)idx;
    }
    #else
    static inline int fm_hist_log2(unsigned long long v) {
        return 63 - __builtin_clzll(v);
    }
    #endif
    """
    int fm_hist_log2(unsigned long long v) nogil   # v > 0

cdef enum:
    _LINEAR_BITS = 6                     # 64 linear sub-buckets per power of two
    _SUB = 64                            # 1 << _LINEAR_BITS
    _EXACT = 128                         # exact buckets for 0 .. 127 ns (2 * _SUB)
    _TOP_EXP = 37                        # range is [0, 2**37) ns, ~137 s
    # exact region + one block of _SUB buckets per exponent 7 .. 36
    NBUCKETS = _EXACT + (_TOP_EXP - 1 - _LINEAR_BITS) * _SUB      # 2048

cdef int64_t MAX_NS = (<int64_t>1 << _TOP_EXP) - 1

FORMAT_VERSION = 1
LINEAR_BITS = _LINEAR_BITS
BUCKETS = NBUCKETS
MAX_VALUE_NS = MAX_NS
MAX_RELATIVE_ERROR = 1.0 / _EXACT          # half a bucket width over its low edge: 2**-7


cdef inline int _index(int64_t ns) noexcept nogil:
    cdef uint64_t v
    cdef int shift
    if ns <= 0:
        return 0
    if ns > MAX_NS:
        ns = MAX_NS
    v = <uint64_t>ns
    if v < _EXACT:
        return <int>v
    shift = fm_hist_log2(v) - _LINEAR_BITS
    return (shift << _LINEAR_BITS) + <int>(v >> shift)


cdef inline int64_t _midpoint(int idx) noexcept nogil:
    cdef int shift
    cdef int64_t lo
    if idx < _EXACT:
        return idx
    shift = (idx >> _LINEAR_BITS) - 1
    lo = (<int64_t>((idx & (_SUB - 1)) + _SUB)) << shift
    return lo + ((<int64_t>1 << shift) >> 1)


def bucket_index(ns):
    """Index of the bucket ``ns`` falls into (for tests and tooling)."""
    return _index(ns)


def bucket_value(int idx):
    """The value (midpoint) reported for bucket ``idx``."""
    if idx < 0 or idx >= NBUCKETS:
        raise IndexError(idx)
    return _midpoint(idx)


cdef class Histogram:
    """Latency histogram over nanoseconds; see the module docstring."""

    def __cinit__(self):
        self.counts = NULL
        self.count = 0
        self.min_ns = 0
        self.max_ns = 0
        self.sum_ns = 0.0

    def __dealloc__(self):
        if self.counts != NULL:
            free(self.counts)
            self.counts = NULL

    cdef void record(self, int64_t ns) noexcept:
        if self.counts == NULL:
            self.counts = <uint64_t*>calloc(NBUCKETS, sizeof(uint64_t))
            if self.counts == NULL:
                return                      # out of memory: drop the sample
        if ns < 0:
            ns = 0
        self.counts[_index(ns)] += 1
        if self.count == 0:
            self.min_ns = ns
            self.max_ns = ns
        elif ns < self.min_ns:
            self.min_ns = ns
        elif ns > self.max_ns:
            self.max_ns = ns
        self.count += 1
        self.sum_ns += <double>ns

    # -- Python API ---------------------------------------------------------

    def add(self, int64_t ns):
        """Record one value in nanoseconds (Python-callable ``record``)."""
        self.record(ns)

    def record_py(self, int64_t ns):
        """Alias of :meth:`add`."""
        self.record(ns)

    def add_many(self, values):
        """Record every value of an iterable of ints."""
        cdef int64_t v
        for v in values:
            self.record(v)

    @property
    def allocated(self):
        """True once the bucket array exists (after the first record)."""
        return self.counts != NULL

    def mean(self):
        if self.count == 0:
            return 0.0
        return self.sum_ns / <double>self.count

    def percentile(self, double q):
        """Value at percentile ``q`` (0..100), in ns; 0 when empty."""
        cdef uint64_t rank
        cdef int start = 0
        cdef uint64_t seen = 0
        if self.count == 0:
            _rank(self, q)                   # still validate q
            return 0
        rank = _rank(self, q)
        return _value_at_rank(self, rank, &start, &seen)

    def percentiles(self, qs):
        """Values at several percentiles (one pass over the buckets), in input order."""
        qs = list(qs)
        cdef list ranks = [_rank(self, q) for q in qs]     # validates every q
        cdef list out = [0] * len(qs)
        cdef int start = 0
        cdef uint64_t seen = 0
        if self.count == 0:
            return out
        for j in sorted(range(len(qs)), key=ranks.__getitem__):
            out[j] = _value_at_rank(self, ranks[j], &start, &seen)
        return out

    def merge(self, Histogram other not None):
        """Add ``other``'s samples into this histogram."""
        cdef int i
        if other.count == 0 or other.counts == NULL:
            return
        if self.counts == NULL:
            self.counts = <uint64_t*>calloc(NBUCKETS, sizeof(uint64_t))
            if self.counts == NULL:
                raise MemoryError()
        for i in range(NBUCKETS):
            self.counts[i] += other.counts[i]
        if self.count == 0:
            self.min_ns = other.min_ns
            self.max_ns = other.max_ns
        else:
            if other.min_ns < self.min_ns:
                self.min_ns = other.min_ns
            if other.max_ns > self.max_ns:
                self.max_ns = other.max_ns
        self.count += other.count
        self.sum_ns += other.sum_ns

    def reset(self):
        """Forget all samples (keeps the bucket array if one was allocated)."""
        if self.counts != NULL:
            memset(self.counts, 0, NBUCKETS * sizeof(uint64_t))
        self.count = 0
        self.min_ns = 0
        self.max_ns = 0
        self.sum_ns = 0.0

    def copy(self):
        cdef Histogram h = Histogram()
        h.merge(self)
        return h

    # -- serialisation ------------------------------------------------------
    #
    # msgpack map:
    #   {"v": 1, "lb": LINEAR_BITS, "n": BUCKETS,
    #    "count": int, "min": int, "max": int, "sum": float,
    #    "b": [gap0, count0, gap1, count1, ...]}
    # "b" lists the non-empty buckets in ascending index order, each as the gap
    # from the previous non-empty index (the first from index 0) and its count.
    # Gaps and most counts fit msgpack's 1-byte fixints.

    def dumps(self):
        cdef list b = []
        cdef int i
        cdef int prev = 0
        if self.counts != NULL and self.count:
            for i in range(NBUCKETS):
                if self.counts[i]:
                    b.append(i - prev)
                    b.append(self.counts[i])
                    prev = i
        import msgpack          # here: only workers that report histograms pay for it
        return msgpack.packb({
            "v": FORMAT_VERSION, "lb": _LINEAR_BITS, "n": NBUCKETS,
            "count": self.count, "min": self.min_ns, "max": self.max_ns,
            "sum": self.sum_ns, "b": b,
        }, use_bin_type=True)

    @staticmethod
    def loads(data):
        """Rebuild a histogram from :meth:`dumps` output; ValueError if malformed."""
        import msgpack
        try:
            d = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as e:
            raise ValueError(f"histogram: not valid msgpack: {e}") from None
        if not isinstance(d, dict):
            raise ValueError("histogram: expected a map")
        if d.get("v") != FORMAT_VERSION:
            raise ValueError(f"histogram: unsupported format version {d.get('v')!r}")
        if d.get("lb") != _LINEAR_BITS or d.get("n") != NBUCKETS:
            raise ValueError("histogram: bucket layout differs "
                             f"(lb={d.get('lb')!r}, n={d.get('n')!r})")
        count, mn, mx, sm, b = (d.get(k) for k in ("count", "min", "max", "sum", "b"))
        for name, val in (("count", count), ("min", mn), ("max", mx)):
            if type(val) is not int:
                raise ValueError(f"histogram: {name} must be an integer")
        if type(sm) not in (int, float):
            raise ValueError("histogram: sum must be a number")
        if not isinstance(b, list) or len(b) % 2:
            raise ValueError("histogram: b must be a list of (gap, count) pairs")
        if count < 0 or count >= 2 ** 64:
            raise ValueError("histogram: count out of range")
        if count == 0:
            if b or mn or mx:
                raise ValueError("histogram: empty histogram with data")
            return Histogram()
        if not (0 <= mn <= mx < 2 ** 63):
            raise ValueError("histogram: need 0 <= min <= max")
        cdef Histogram h = Histogram()
        h.counts = <uint64_t*>calloc(NBUCKETS, sizeof(uint64_t))
        if h.counts == NULL:
            raise MemoryError()
        idx = 0
        first = 0
        total = 0
        for k in range(0, len(b), 2):
            gap, c = b[k], b[k + 1]
            if type(gap) is not int or type(c) is not int:
                raise ValueError("histogram: bucket entries must be integers")
            if (gap <= 0 and k > 0) or gap < 0:
                raise ValueError("histogram: bucket indices must increase")
            idx += gap
            if idx >= NBUCKETS:
                raise ValueError(f"histogram: bucket index {idx} out of range")
            if c <= 0 or c >= 2 ** 64:
                raise ValueError("histogram: bucket counts must be positive")
            h.counts[idx] = c
            if k == 0:
                first = idx
            total += c
        if _index(mn) != first or _index(mx) != idx:
            raise ValueError("histogram: min/max do not match the non-empty buckets")
        if total != count:
            raise ValueError(f"histogram: bucket counts sum to {total}, count is {count}")
        h.count = count
        h.min_ns = mn
        h.max_ns = mx
        h.sum_ns = sm
        return h

    def __reduce__(self):
        return (_histogram_loads, (self.dumps(),))

    def __eq__(self, other):
        if not isinstance(other, Histogram):
            return NotImplemented
        return self.dumps() == (<Histogram>other).dumps()

    __hash__ = None

    def __repr__(self):
        if self.count == 0:
            return "<Histogram empty>"
        p50, p99 = self.percentiles((50, 99))
        return (f"<Histogram count={self.count} min={self.min_ns} p50={p50} "
                f"p99={p99} max={self.max_ns}>")


def _histogram_loads(data):
    return Histogram.loads(data)


cdef uint64_t _rank(Histogram self, double q) except 0:
    if isnan(q) or q < 0.0 or q > 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {q!r}")
    cdef double r = ceil(q / 100.0 * <double>self.count)
    if r < 1.0:
        return 1
    if r > <double>self.count:
        return self.count
    return <uint64_t>r

cdef int64_t _value_at_rank(Histogram self, uint64_t rank, int* start, uint64_t* seen) noexcept:
    # Walk buckets from *start with *seen samples already passed; resumable
    # so that several ascending ranks cost one pass.
    cdef int i = start[0]
    cdef uint64_t acc = seen[0]
    cdef int64_t v
    if rank <= 1:
        return self.min_ns
    if rank >= self.count:
        return self.max_ns
    while i < NBUCKETS:
        if acc + self.counts[i] >= rank:
            break
        acc += self.counts[i]
        i += 1
    start[0] = i
    seen[0] = acc
    if i >= NBUCKETS:                   # unreachable when counts are consistent
        return self.max_ns
    v = _midpoint(i)
    if v < self.min_ns:
        v = self.min_ns
    elif v > self.max_ns:
        v = self.max_ns
    return v

