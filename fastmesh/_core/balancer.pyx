# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Load balancing over an upstream's targets, with passive health (outlier ejection) and circuit
breaker counters. The contract is balancer.pxd; this is how the proxy uses it, per request:

    b = route's Balancer (None for a plain-host service)
    if not b.admit():                        # circuit breaker: max_requests / max_pending
        answer 503 {"message": "upstream 'NAME' is over its circuit breaker limits"}
    key = the hash key (consistent-hashing only; see `request_hash_key`), else NULL, 0
    t = b.pick(key, key_len, None)
    if t is None: answer 503 {"message": "no healthy upstream target"}   (b.no_target counts it)
    b.begin(t)                               # from here exactly one b.end(t, ...) must follow
    conn = (<Pool>t.pool).acquire()
    if conn is None:                         # a new connection is needed
        if not b.admit_connection(): b.end(t, 0, OUTCOME_ABORTED, 0); answer 503
        b.pending_begin(); connect ...; b.pending_end()
        connected: b.conn_opened()  ... when that connection closes for good: b.conn_closed()
    ... response head arrives (or a failure):
    b.end(t, now_ns() - t_sent, OUTCOME_RESPONSE, status)         # status decides passive health
    b.end(t, elapsed, OUTCOME_CONNECT_FAIL | OUTCOME_TIMEOUT | OUTCOME_RESET, 0)
    b.end(t, elapsed, OUTCOME_ABORTED, 0)    # client went away: counts only in_flight
    retry (when the retry rules allow): t2 = b.pick(key, key_len, t); b.begin(t2); ... b.end(t2, ...)

`end` for a response may be called as soon as the head is parsed (latency = time to first byte),
which is what the EWMA should measure; the in-flight count then ends a little early for streamed
bodies, which is fine for balancing.

Everything pick/begin/end/admit touch is C data: targets are reached through borrowed pointers,
the pick set and the round-robin cycle are int arrays rebuilt only when health changes.

Health = active verdict (set_health, from fastmesh.health) AND passive state, like Envoy: a target
whose /healthz answers 200 but whose real requests fail stays ejected. If no target is healthy the
pick returns None, or with fail_open (on_all_unhealthy: open) picks among all weighted targets.
"""
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcpy, memset
from libc.math cimport exp
from libc.stdint cimport int64_t, uint64_t
from cpython.object cimport PyObject

from fastmesh._core.includes.clock cimport now_ns

import os

ALGORITHMS = {"round-robin": ALG_ROUND_ROBIN, "least-connections": ALG_LEAST_CONN,
              "consistent-hashing": ALG_CONSISTENT_HASH, "p2c-ewma": ALG_P2C_EWMA}
ALGORITHM_NAMES = {v: k for k, v in ALGORITHMS.items()}
OUTCOMES = {"response": OUTCOME_RESPONSE, "connect_fail": OUTCOME_CONNECT_FAIL,
            "timeout": OUTCOME_TIMEOUT, "reset": OUTCOME_RESET, "aborted": OUTCOME_ABORTED}
STATE_NAMES = {STATE_HEALTHY: "healthy", STATE_EJECTED: "ejected", STATE_HALF_OPEN: "half-open",
               STATE_PROBING: "probing"}
# Python-visible copies of the enums (tests, health.py)
RESPONSE = OUTCOME_RESPONSE
CONNECT_FAIL = OUTCOME_CONNECT_FAIL
TIMEOUT = OUTCOME_TIMEOUT
RESET = OUTCOME_RESET
ABORTED = OUTCOME_ABORTED

DEFAULT_VNODES = 160           # ring points per target at average weight
DEFAULT_SCHEDULE_CAP = 65536   # longest precomputed round-robin cycle (sum of weights / gcd)


# --- hashing (stable across processes and runs: every worker and sidecar must agree) ----------

cdef inline uint64_t _fmix64(uint64_t k) noexcept nogil:
    k ^= k >> 33
    k *= 0xff51afd7ed558ccdULL
    k ^= k >> 33
    k *= 0xc4ceb9fe1a85ec53ULL
    k ^= k >> 33
    return k


cdef inline uint64_t _hash64(const char* p, Py_ssize_t n) noexcept nogil:
    """FNV-1a 64 with a murmur3 finalizer (FNV alone clusters on short similar keys)."""
    cdef uint64_t h = 0xcbf29ce484222325ULL
    cdef Py_ssize_t i
    for i in range(n):
        h ^= <unsigned char>p[i]
        h *= 0x100000001b3ULL
    return _fmix64(h)


def hash_key(bytes key):
    """The 64-bit hash consistent hashing places `key` with (exposed for tests and tools)."""
    return _hash64(key, len(key))


cdef inline uint64_t _next_rand(Balancer b) noexcept nogil:
    """splitmix64: fast, seedable, good enough to pick two targets."""
    b.rng += 0x9e3779b97f4a7c15ULL
    return _fmix64(b.rng)


cdef int64_t _gcd(int64_t a, int64_t b) noexcept nogil:
    while b:
        a, b = b, a % b
    return a


def request_hash_key(str hash_on, str name=None, bytes client_ip=b"", bytes path=b"",
                     bytes query=b"", headers=()):
    """The consistent-hashing key of a request, per `hash_on` (reference for the proxy's C code).

    - ip: the client's address as text (the peer address, not X-Forwarded-For), e.g. b"10.0.0.7"
    - header: the value of the first header named `name` (case-insensitive), surrounding
      whitespace trimmed
    - cookie: the value of cookie `name` from the Cookie header(s) (first occurrence)
    - path: the request path as sent, without the query string (no percent-decoding)
    - query_arg: the raw value of the first `name=` argument of the query string (no decoding);
      an argument present without '=' gives b""
    A missing header/cookie/argument gives b"": pick() then falls back to round-robin for that
    request (so a client without the key is still served, just not sticky).
    `headers` is a sequence of (name, value) bytes pairs.
    """
    if hash_on == "ip":
        return client_ip
    if hash_on == "path":
        return path
    if hash_on == "header":
        wanted = name.lower().encode("latin-1")
        for k, v in headers:
            if k.lower() == wanted:
                return v.strip(b" \t")
        return b""
    if hash_on == "cookie":
        wanted = name.encode("latin-1")
        for k, v in headers:
            if k.lower() != b"cookie":
                continue
            for part in v.split(b";"):
                ck, eq, cv = part.strip(b" \t").partition(b"=")
                if eq and ck == wanted:
                    return cv.strip(b'"')
        return b""
    if hash_on == "query_arg":
        wanted = name.encode("latin-1")
        for part in query.split(b"&"):
            qk, eq, qv = part.partition(b"=")
            if qk == wanted:
                return qv
        return b""
    raise ValueError(f"unknown hash_on {hash_on!r}")


# --- targets ------------------------------------------------------------------------------------

cdef class Target:
    def __init__(self, str host, int port, int weight=100, int index=0, int priority=0):
        if weight < 0:
            raise ValueError("weight must be >= 0")
        if priority < 0:
            raise ValueError("priority must be >= 0")
        self.host = host
        self.port = port
        self.weight = weight
        self.priority = priority
        self.index = index
        self.pool = None
        self.active_ok = True
        self.state = STATE_HEALTHY
        self.healthy = weight > 0

    @property
    def address(self):
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def state_name(self):
        return STATE_NAMES[self.state]

    def __repr__(self):
        return (f"<Target {self.address} weight={self.weight} priority={self.priority} "
                f"{self.state_name}>")


# --- the balancer -------------------------------------------------------------------------------

cdef class Balancer:
    def __cinit__(self):
        self.tp = NULL
        self.eligible = NULL
        self.schedule = NULL
        self.cw = NULL
        self.ring_hash = NULL
        self.ring_target = NULL
        self.fake_now = -1

    def __dealloc__(self):
        free(self.tp)
        free(self.eligible)
        free(self.schedule)
        free(self.cw)
        free(self.ring_hash)
        free(self.ring_target)

    def __init__(self, str name, targets, algorithm="round-robin", *, int passive_failures=0,
                 int passive_timeouts=0, passive_http_statuses=(), double ejection_time=30.0,
                 bint fail_open=False, max_connections=0, max_pending=0, max_requests=0,
                 seed=None, double ewma_decay=10.0, double failure_penalty=1.0,
                 int vnodes=DEFAULT_VNODES, Py_ssize_t schedule_cap=DEFAULT_SCHEDULE_CAP):
        """targets: (host, port[, weight[, priority]]) tuples or objects with .host/.port/
        .weight (and .priority, else 0).

        Durations are seconds. seed: the p2c RNG seed (None: random). Passive thresholds of 0
        disable that kind of ejection.
        """
        cdef Py_ssize_t i
        cdef int64_t total = 0
        self.name = name
        if isinstance(algorithm, str):
            if algorithm not in ALGORITHMS:
                raise ValueError(f"unknown algorithm {algorithm!r}")
            self.algorithm = ALGORITHMS[algorithm]
        else:
            self.algorithm = int(algorithm)
        built = []
        seen = set()
        priorities = set()
        for i, spec in enumerate(targets):
            if isinstance(spec, tuple):
                host, port = spec[0], spec[1]
                weight = spec[2] if len(spec) > 2 else 100
                priority = spec[3] if len(spec) > 3 else 0
            else:
                host, port, weight = spec.host, spec.port, spec.weight
                priority = getattr(spec, "priority", 0)
            if (host, port) in seen:
                raise ValueError(f"duplicate target {host}:{port}")
            seen.add((host, port))
            built.append(Target(host, port, weight, i, priority))
            priorities.add(priority)
            total += weight
        self.tiered = len(priorities) > 1
        self.targets = tuple(built)
        self.n = len(built)
        n = max(self.n, 1)
        self.tp = <PyObject**>malloc(n * sizeof(PyObject*))
        self.eligible = <int*>malloc(n * sizeof(int))
        self.cw = <int64_t*>calloc(n, sizeof(int64_t))
        if self.tp == NULL or self.eligible == NULL or self.cw == NULL:
            raise MemoryError()
        for i in range(self.n):
            self.tp[i] = <PyObject*>self.targets[i]
        self.sched_cap = min(total, schedule_cap) if total > 0 else 1
        self.schedule = <int*>malloc(self.sched_cap * sizeof(int))
        if self.schedule == NULL:
            raise MemoryError()
        if self.algorithm == ALG_CONSISTENT_HASH:
            self._build_ring(vnodes, total)
        self.rng = <uint64_t>((seed if seed is not None else int.from_bytes(os.urandom(8), "little"))
                             & 0xFFFFFFFFFFFFFFFF)
        self.decay_ns = ewma_decay * 1e9
        self.failure_penalty_ns = failure_penalty * 1e9
        self.passive_failures = passive_failures
        self.passive_timeouts = passive_timeouts
        memset(self.fail_status, 0, sizeof(self.fail_status))
        for status in passive_http_statuses:
            if not 100 <= status < 600:
                raise ValueError(f"status out of range: {status}")
            self.fail_status[status] = 1
        self.ejection_ns = <int64_t>(ejection_time * 1e9)
        self.fail_open = fail_open
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.max_requests = max_requests
        self._rebuild()

    def _build_ring(self, int vnodes, int64_t total):
        """Points for target i: max(1, round(vnodes * n * w_i / W)), at hash("host:port#k")."""
        cdef Py_ssize_t i
        points = []
        for i in range(self.n):
            t = self.targets[i]
            if t.weight <= 0:
                continue
            count = max(1, (vnodes * self.n * t.weight + total // 2) // total)
            prefix = f"{t.host}:{t.port}#".encode()
            for k in range(count):
                label = prefix + str(k).encode()
                points.append((hash_key(label), i))
        points.sort()
        self.ring_len = len(points)
        self.ring_hash = <uint64_t*>malloc(max(self.ring_len, 1) * sizeof(uint64_t))
        self.ring_target = <int*>malloc(max(self.ring_len, 1) * sizeof(int))
        if self.ring_hash == NULL or self.ring_target == NULL:
            raise MemoryError()
        for i, (h, idx) in enumerate(points):
            self.ring_hash[i] = h
            self.ring_target[i] = idx

    @classmethod
    def from_upstream(cls, upstream, seed=None, **overrides):
        """A Balancer for a validated fastmesh.config.upstreams.Upstream."""
        passive = upstream.healthchecks.passive if upstream.healthchecks is not None else None
        breaker = upstream.circuit_breaker
        options = dict(
            passive_failures=passive.failures if passive else 0,
            passive_timeouts=passive.timeouts if passive else 0,
            passive_http_statuses=passive.http_statuses if passive else (),
            ejection_time=passive.ejection_time if passive else 30.0,
            fail_open=upstream.on_all_unhealthy == "open",
            max_connections=breaker.max_connections if breaker else 0,
            max_pending=breaker.max_pending if breaker else 0,
            max_requests=breaker.max_requests if breaker else 0,
            seed=seed)
        options.update(overrides)
        return cls(upstream.name,
                   [(t.host, t.port, t.weight, t.priority) for t in upstream.targets],
                   upstream.algorithm, **options)

    # --- clock ---------------------------------------------------------------------------------

    cdef int64_t _now(self) noexcept:
        if self.fake_now >= 0:
            return self.fake_now
        return now_ns()

    def set_clock(self, now_ns_value):
        """Tests: use a fake monotonic clock (ns); None returns to the real one."""
        self.fake_now = -1 if now_ns_value is None else <int64_t>now_ns_value

    def advance_clock(self, double seconds):
        if self.fake_now < 0:
            raise RuntimeError("advance_clock needs set_clock first")
        self.fake_now += <int64_t>(seconds * 1e9)

    # --- pick set ------------------------------------------------------------------------------

    cdef void _rebuild(self) noexcept:
        """Recompute healthy flags, the pick set and the round-robin cycle (health changed).

        The pick set is the healthy targets of the lowest priority that has one: a tier takes
        traffic only while every lower one has no healthy target (failing open: all tiers)."""
        cdef Py_ssize_t i, k, m = 0, steps
        cdef Target t
        cdef int64_t g = 0, total = 0, best_cw
        cdef int best, tier = -1
        for i in range(self.n):
            t = (<Target>self.tp[i])
            t.healthy = t.weight > 0 and t.active_ok and (
                t.state == STATE_HEALTHY or t.state == STATE_HALF_OPEN)
            if t.healthy and (tier < 0 or t.priority < tier):
                tier = t.priority
        self.active_priority = tier
        for i in range(self.n):
            t = (<Target>self.tp[i])
            t.pickable = t.healthy and t.priority == tier
            if t.pickable:
                self.eligible[m] = <int>i
                m += 1
        self.failing_open = False
        if m == 0 and self.fail_open:
            for i in range(self.n):
                t = (<Target>self.tp[i])
                if t.weight > 0:
                    t.pickable = True
                    self.eligible[m] = <int>i
                    m += 1
            self.failing_open = m > 0
        self.n_eligible = m
        # the smooth weighted round-robin cycle over the pick set (weights divided by their gcd)
        for k in range(m):
            g = _gcd(g, (<Target>self.tp[self.eligible[k]]).weight)
        for k in range(m):
            total += (<Target>self.tp[self.eligible[k]]).weight // g
            self.cw[self.eligible[k]] = 0
        # An unchanged cycle keeps its position: a rebuild that changes nothing for it (a new
        # Plan, a target of another tier) must not restart it, or its first targets would be
        # picked more often than their weights say (a canary late in the cycle, never).
        same = total == self.sched_len
        if m == 0 or total > self.sched_cap:
            self.sched_len = 0      # live smooth WRR (cw) instead
            self.sched_pos = 0
            return
        for steps in range(total):
            best = -1
            best_cw = 0
            for k in range(m):
                i = self.eligible[k]
                self.cw[i] += (<Target>self.tp[i]).weight // g
                if best < 0 or self.cw[i] > best_cw:
                    best = <int>i
                    best_cw = self.cw[i]
            self.cw[best] -= total
            if same and self.schedule[steps] != best:
                same = False
            self.schedule[steps] = best
        self.sched_len = total
        if not same:
            self.sched_pos = 0
        for k in range(m):
            self.cw[self.eligible[k]] = 0

    cdef void _wake(self, int64_t now) noexcept:
        """Ejections whose time is over turn HALF_OPEN; lost probes too (their deadline passed)."""
        cdef Py_ssize_t i
        cdef Target t
        cdef int64_t nxt = 0
        cdef bint changed = False
        for i in range(self.n):
            t = (<Target>self.tp[i])
            if t.state == STATE_EJECTED or t.state == STATE_PROBING:
                if t.ejected_until <= now:
                    t.state = STATE_HALF_OPEN
                    self.n_waiting -= 1
                    changed = True
                elif nxt == 0 or t.ejected_until < nxt:
                    nxt = t.ejected_until
        self.next_wakeup = nxt
        if changed:
            self._rebuild()

    cdef void _eject(self, Target t, int64_t now) noexcept:
        if t.state != STATE_EJECTED and t.state != STATE_PROBING:
            self.n_waiting += 1
        t.state = STATE_EJECTED
        t.ejected_until = now + <int64_t>self.ejection_ns
        t.ejections += 1
        t.consecutive_failures = 0
        t.consecutive_timeouts = 0
        if self.n_waiting == 1 or t.ejected_until < self.next_wakeup:
            self.next_wakeup = t.ejected_until
        self._rebuild()

    # --- EWMA ----------------------------------------------------------------------------------

    cdef void _observe(self, Target t, double sample, int64_t now) noexcept:
        """Peak EWMA (Finagle): a slower sample is taken at once, faster ones pull it down with
        weight 1 - exp(-dt / decay), so the estimate follows time, not request count."""
        cdef double w
        if t.ewma_ns <= 0 or sample >= t.ewma_ns:
            t.ewma_ns = sample
        else:
            w = exp(-<double>(now - t.ewma_stamp) / self.decay_ns) if now > t.ewma_stamp else 1.0
            t.ewma_ns = t.ewma_ns * w + sample * (1.0 - w)
        t.ewma_stamp = now

    cdef double _cost(self, Target t, int64_t now) noexcept:
        """EWMA decayed toward 0 while unobserved (so an idle target gets tried again) x load."""
        cdef double c = t.ewma_ns
        if c > 0 and now > t.ewma_stamp:
            c *= exp(-<double>(now - t.ewma_stamp) / self.decay_ns)
        if c <= 0 and t.in_flight > 0:
            c = self.failure_penalty_ns      # unknown latency but busy: assume the worst
        return c * (t.in_flight + 1) / t.weight

    # --- algorithms: each returns a target index, or -1 ----------------------------------------

    cdef int _pick_rr(self, int ex) noexcept:
        cdef int i, j, best = -1
        cdef Py_ssize_t k
        cdef int64_t total = 0
        cdef Target t
        if self.n_eligible == 0:
            return -1
        if self.sched_len:
            i = self.schedule[self.sched_pos]
            self.sched_pos += 1
            if self.sched_pos == self.sched_len:
                self.sched_pos = 0
            if i != ex or self.n_eligible == 1:
                return i
            for k in range(self.sched_len):
                j = self.schedule[self.sched_pos]
                self.sched_pos += 1
                if self.sched_pos == self.sched_len:
                    self.sched_pos = 0
                if j != ex:
                    return j
            return i
        for k in range(self.n_eligible):         # live smooth WRR (cycle too long to precompute)
            i = self.eligible[k]
            if i == ex:
                continue
            t = (<Target>self.tp[i])
            self.cw[i] += t.weight
            total += t.weight
            if best < 0 or self.cw[i] > self.cw[best]:
                best = i
        if best < 0:
            return ex
        self.cw[best] -= total
        return best

    cdef int _pick_lc(self, int ex) noexcept:
        """Fewest in-flight per weight (nginx least_conn); ties by smooth WRR, so equal weights
        rotate and unequal ones keep their proportions at low concurrency."""
        cdef Py_ssize_t k
        cdef int i, best = -1, ties = 0
        cdef Target t, b
        cdef int64_t total = 0
        for k in range(self.n_eligible):
            i = self.eligible[k]
            if i == ex:
                continue
            t = (<Target>self.tp[i])
            if best < 0:
                best = i
                ties = 1
                continue
            b = (<Target>self.tp[best])
            if <int64_t>t.in_flight * b.weight < <int64_t>b.in_flight * t.weight:
                best = i
                ties = 1
            elif <int64_t>t.in_flight * b.weight == <int64_t>b.in_flight * t.weight:
                ties += 1
        if best < 0:
            return ex if self.n_eligible > 0 else -1
        if ties == 1:
            return best
        b = (<Target>self.tp[best])
        i = best
        best = -1
        for k in range(self.n_eligible):
            i = self.eligible[k]
            if i == ex:
                continue
            t = (<Target>self.tp[i])
            if <int64_t>t.in_flight * b.weight != <int64_t>b.in_flight * t.weight:
                continue
            self.cw[i] += t.weight
            total += t.weight
            if best < 0 or self.cw[i] > self.cw[best]:
                best = i
        self.cw[best] -= total
        return best

    cdef int _pick_hash(self, const char* key, Py_ssize_t key_len, int ex) noexcept:
        cdef uint64_t h
        cdef Py_ssize_t lo = 0, hi = self.ring_len, mid, k, pos
        cdef int i
        if key_len <= 0 or self.ring_len == 0:
            return self._pick_rr(ex)
        if self.n_eligible == 0:
            return -1
        h = _hash64(key, key_len)
        while lo < hi:                           # first point >= h
            mid = (lo + hi) >> 1
            if self.ring_hash[mid] < h:
                lo = mid + 1
            else:
                hi = mid
        pos = lo if lo < self.ring_len else 0
        for k in range(self.ring_len):           # clockwise to the first pickable target
            i = self.ring_target[pos]
            if i != ex and (<Target>self.tp[i]).pickable:
                return i
            pos += 1
            if pos == self.ring_len:
                pos = 0
        if ex >= 0 and (<Target>self.tp[ex]).pickable:
            return ex
        return -1

    cdef int _pick_p2c(self, int ex) noexcept:
        cdef Py_ssize_t m = self.n_eligible, a, b
        cdef int ia, ib
        cdef int64_t now
        if m == 0:
            return -1
        if m == 1:
            return self.eligible[0]
        a = <Py_ssize_t>(_next_rand(self) % <uint64_t>m)
        b = <Py_ssize_t>(_next_rand(self) % <uint64_t>(m - 1))
        if b >= a:
            b += 1
        ia = self.eligible[a]
        ib = self.eligible[b]
        if ia == ex:
            return ib
        if ib == ex:
            return ia
        now = self._now()
        if self._cost((<Target>self.tp[ib]), now) < self._cost((<Target>self.tp[ia]), now):
            return ib
        return ia

    cdef int _next_tier(self, int ex) noexcept:
        """For a retry after `ex`: a healthy target of a later tier than the pick set's (the
        lowest priority, then the fewest in flight), -1 when there is none. Its tier's targets
        may all be failing without being ejected yet (a zone going down): retrying there could
        spend every attempt on them."""
        cdef Py_ssize_t i
        cdef int best = -1
        cdef Target t, b
        for i in range(self.n):
            t = (<Target>self.tp[i])
            if i == ex or not t.healthy or t.pickable:
                continue
            if best < 0:
                best = <int>i
                continue
            b = (<Target>self.tp[best])
            if t.priority < b.priority or (t.priority == b.priority and t.in_flight < b.in_flight):
                best = <int>i
        return best

    # --- the contract --------------------------------------------------------------------------

    cdef Target pick(self, const char* key, Py_ssize_t key_len, Target exclude):
        cdef int ex = -1, i
        cdef int64_t now
        cdef Target t
        if self.n_waiting > 0:
            now = self._now()
            if now >= self.next_wakeup:
                self._wake(now)
        if exclude is not None and exclude.index < self.n and \
                self.tp[exclude.index] == <PyObject*>exclude:
            ex = exclude.index
        i = -1
        if ex >= 0 and self.tiered:
            i = self._next_tier(ex)              # a retry: another failure domain when there is one
        if i >= 0:
            pass
        elif self.algorithm == ALG_P2C_EWMA:
            i = self._pick_p2c(ex)
        elif self.algorithm == ALG_LEAST_CONN:
            i = self._pick_lc(ex)
        elif self.algorithm == ALG_CONSISTENT_HASH:
            i = self._pick_hash(key, key_len, ex)
        else:
            i = self._pick_rr(ex)
        if i < 0:
            self.no_target += 1
            return None
        t = (<Target>self.tp[i])
        if t.state == STATE_HALF_OPEN:           # this request is the probe
            now = self._now()
            t.state = STATE_PROBING
            t.ejected_until = now + <int64_t>self.ejection_ns
            self.n_waiting += 1
            if self.n_waiting == 1 or t.ejected_until < self.next_wakeup:
                self.next_wakeup = t.ejected_until
            self._rebuild()
        return t

    cdef void begin(self, Target t) noexcept:
        t.in_flight += 1
        t.requests += 1
        self.active_requests += 1

    cdef void end(self, Target t, int64_t latency_ns, int outcome, int status) noexcept:
        cdef int64_t now
        cdef bint failed
        cdef double sample
        if t.in_flight > 0:
            t.in_flight -= 1
        if self.active_requests > 0:
            self.active_requests -= 1
        if outcome == OUTCOME_ABORTED:
            if t.state == STATE_PROBING:         # inconclusive probe: let another request try
                t.state = STATE_HALF_OPEN
                self.n_waiting -= 1
                self._rebuild()
            return
        now = self._now()
        failed = outcome != OUTCOME_RESPONSE or (0 <= status < 600 and self.fail_status[status])
        sample = <double>latency_ns
        if failed and sample < self.failure_penalty_ns:
            sample = self.failure_penalty_ns
        self._observe(t, sample, now)
        if failed:
            t.failures += 1
            t.consecutive_failures += 1
            if outcome == OUTCOME_TIMEOUT:
                t.consecutive_timeouts += 1
            else:
                t.consecutive_timeouts = 0
            if t.state == STATE_PROBING or t.state == STATE_HALF_OPEN:
                self._eject(t, now)
            elif t.state == STATE_HEALTHY and (
                    (self.passive_failures > 0 and t.consecutive_failures >= self.passive_failures)
                    or (self.passive_timeouts > 0
                        and t.consecutive_timeouts >= self.passive_timeouts)):
                self._eject(t, now)
        else:
            t.consecutive_failures = 0
            t.consecutive_timeouts = 0
            if t.state == STATE_PROBING or t.state == STATE_HALF_OPEN:
                if t.state == STATE_PROBING:
                    self.n_waiting -= 1
                t.state = STATE_HEALTHY
                self._rebuild()

    cdef bint admit(self) noexcept:
        if (self.max_requests > 0 and self.active_requests >= self.max_requests) or \
                (self.max_pending > 0 and self.pending >= self.max_pending):
            self.rejected += 1
            return False
        return True

    cdef bint admit_connection(self) noexcept:
        if self.max_connections > 0 and self.connections >= self.max_connections:
            self.rejected += 1
            return False
        return True

    cdef void conn_opened(self) noexcept:
        self.connections += 1

    cdef void conn_closed(self) noexcept:
        if self.connections > 0:
            self.connections -= 1

    cdef void pending_begin(self) noexcept:
        self.pending += 1

    cdef void pending_end(self) noexcept:
        if self.pending > 0:
            self.pending -= 1

    # --- Python side (tests, active health checks, admin) --------------------------------------

    def pick_py(self, bytes key=b"", Target exclude=None):
        return self.pick(key, len(key), exclude)

    def begin_py(self, Target t not None):
        self.begin(t)

    def end_py(self, Target t not None, latency_ns=0, outcome=OUTCOME_RESPONSE, int status=200):
        if isinstance(outcome, str):
            outcome = OUTCOMES[outcome]
        self.end(t, <int64_t>latency_ns, outcome, status)

    def _bench(self, Py_ssize_t iterations, bytes key=b""):
        """ns per admit + pick + begin + end, all in C (benches/README: cost vs target count)."""
        cdef Py_ssize_t i
        cdef Target t
        cdef const char* k = key
        cdef Py_ssize_t klen = len(key)
        cdef int64_t start = now_ns()
        for i in range(iterations):
            if self.admit():
                t = self.pick(k, klen, None)
                if t is not None:
                    self.begin(t)
                    self.end(t, 1000000, OUTCOME_RESPONSE, 200)
        return (now_ns() - start) / <double>iterations

    def admit_py(self):
        return self.admit()

    def admit_connection_py(self):
        return self.admit_connection()

    def conn_opened_py(self):
        self.conn_opened()

    def conn_closed_py(self):
        self.conn_closed()

    def pending_begin_py(self):
        self.pending_begin()

    def pending_end_py(self):
        self.pending_end()

    def target(self, key):
        """A target by index, Target, or 'host:port' address."""
        if isinstance(key, Target):
            if key not in self.targets:
                raise KeyError(key)
            return key
        if isinstance(key, int):
            return self.targets[key]
        for t in self.targets:
            if t.address == key or f"{t.host}:{t.port}" == key:
                return t
        raise KeyError(key)

    def set_health(self, target, bint healthy):
        """The active checker's verdict for one target (index, Target or 'host:port')."""
        cdef Target t = self.target(target)
        if t.active_ok != healthy:
            t.active_ok = healthy
            self._rebuild()

    def eject(self, target):
        """Eject a target now, as passive health would (admin, tests)."""
        self._eject(self.target(target), self._now())

    def inherit(self, Balancer old not None):
        """Carry health, ejection and EWMA state over from the previous Plan's balancer, for
        targets with the same host:port (in-flight counts stay with the old objects)."""
        cdef Target t, o
        cdef Py_ssize_t i
        previous = {(o.host, o.port): o for o in old.targets}
        self.n_waiting = 0
        self.next_wakeup = 0
        for i in range(self.n):
            t = (<Target>self.tp[i])
            o = previous.get((t.host, t.port))
            if o is None:
                continue
            t.active_ok = o.active_ok
            t.state = STATE_HALF_OPEN if o.state == STATE_PROBING else o.state
            t.ejected_until = o.ejected_until
            t.consecutive_failures = o.consecutive_failures
            t.consecutive_timeouts = o.consecutive_timeouts
            t.ewma_ns = o.ewma_ns
            t.ewma_stamp = o.ewma_stamp
            t.requests = o.requests
            t.failures = o.failures
            t.ejections = o.ejections
            if t.state == STATE_EJECTED:
                self.n_waiting += 1
                if self.next_wakeup == 0 or t.ejected_until < self.next_wakeup:
                    self.next_wakeup = t.ejected_until
        # Over the same targets, the old round-robin cycle and its position are taken as this
        # one's: _rebuild keeps the position when it computes the same cycle.
        if old.sched_len and old.sched_len <= self.sched_cap and \
                [(t.host, t.port) for t in self.targets] == [(o.host, o.port) for o in old.targets]:
            memcpy(self.schedule, old.schedule, old.sched_len * sizeof(int))
            self.sched_len = old.sched_len
            self.sched_pos = old.sched_pos
        self._rebuild()

    @property
    def algorithm_name(self):
        return ALGORITHM_NAMES[self.algorithm]

    @property
    def eligible_targets(self):
        """The current pick set (healthy targets, or all when failing open)."""
        return [self.targets[self.eligible[k]] for k in range(self.n_eligible)]

    def health(self):
        """One dict per target: what an admin view or a log line shows."""
        cdef Target t
        now = self._now()
        rows = []
        for t in self.targets:
            rows.append({
                "upstream": self.name,
                "target": t.address,
                "weight": t.weight,
                "priority": t.priority,
                "healthy": bool(t.healthy),
                "active": "healthy" if t.active_ok else "unhealthy",
                "passive": STATE_NAMES[t.state],
                "ejected_for_s": (max(0.0, (t.ejected_until - now) / 1e9)
                                  if t.state == STATE_EJECTED else 0.0),
                "in_flight": t.in_flight,
                "ewma_ms": round(t.ewma_ns / 1e6, 3),
                "requests": t.requests,
                "failures": t.failures,
                "ejections": t.ejections,
                "consecutive_failures": t.consecutive_failures,
            })
        return rows

    def stats(self):
        return {"upstream": self.name, "algorithm": self.algorithm_name,
                "failing_open": bool(self.failing_open), "active_requests": self.active_requests,
                "connections": self.connections, "pending": self.pending,
                "rejected": self.rejected, "no_target": self.no_target,
                "healthy_targets": sum(1 for t in self.targets if t.healthy),
                "targets": len(self.targets), "active_priority": self.active_priority}

    def __repr__(self):
        return f"<Balancer {self.name} {self.algorithm_name} targets={len(self.targets)}>"
