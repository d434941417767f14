# Upstream load balancing, passive health and circuit breaking: the contract the proxy cimports.
#
# One Balancer per upstream per Plan (built from config with `Balancer.from_upstream`). The proxy,
# per request (see balancer.pyx's module docstring for the full sequence):
#
#     if not b.admit():                      -> 503 "upstream circuit breaker open" (b.rejected += 1)
#     t = b.pick(key, key_len, None)         -> None: 503 "no healthy upstream target"
#     b.begin(t)                             (every non-None pick MUST get begin, then exactly one end)
#     conn = (<Pool>t.pool).acquire(); if conn is None: if not b.admit_connection(): 503; connect
#     ... b.end(t, latency_ns, OUTCOME_*, status)
#     retry: t2 = b.pick(key, key_len, t)     (another target when one exists), begin(t2), end(t2, ...)
#
# Nothing in pick/begin/end/admit touches Python objects beyond reference counts; state is in C
# arrays filled at construction. Time comes from now_ns() (CLOCK_MONOTONIC) unless a test set a
# fake clock (Balancer.set_clock).
from libc.stdint cimport int64_t, uint64_t
from cpython.object cimport PyObject

# algorithm
cdef enum:
    ALG_ROUND_ROBIN = 0          # smooth weighted round-robin (nginx), O(1) via a precomputed cycle
    ALG_LEAST_CONN = 1           # fewest in-flight per weight; ties rotate
    ALG_CONSISTENT_HASH = 2      # ring with virtual nodes; empty key falls back to round-robin
    ALG_P2C_EWMA = 3             # two random targets, lower peak-EWMA latency x (in_flight + 1)

# outcome passed to end()
cdef enum:
    OUTCOME_RESPONSE = 0         # a response head arrived; `status` decides (passive http_statuses)
    OUTCOME_CONNECT_FAIL = 1     # connect refused / unreachable / connect timeout
    OUTCOME_TIMEOUT = 2          # read or write timeout after connecting
    OUTCOME_RESET = 3            # reset, closed or invalid response before a complete head
    OUTCOME_ABORTED = 4          # not the target's fault (client gone, cancelled): no health effect

# passive (outlier) state of a target
cdef enum:
    STATE_HEALTHY = 0
    STATE_EJECTED = 1            # until ejected_until
    STATE_HALF_OPEN = 2          # ejection over: the next pick is the one probe request
    STATE_PROBING = 3            # the probe is in flight; success -> HEALTHY, failure -> EJECTED


cdef class Target:
    """One upstream instance. The proxy reads `pool`; everything else is the balancer's."""
    cdef readonly str host
    cdef readonly int port
    cdef readonly int weight             # 0: never picked
    cdef readonly int priority           # tier, lower first (Balancer._rebuild)
    cdef readonly int index              # position in Balancer.targets
    cdef public object pool              # set by the plan compiler: Pool for host:port
    cdef readonly int in_flight          # begin() +1, end() -1
    cdef readonly double ewma_ns         # peak-EWMA latency (0 = no sample yet)
    cdef int64_t ewma_stamp              # when ewma_ns was last updated (ns)
    cdef readonly bint healthy           # eligible for picks: active_ok and state HEALTHY/HALF_OPEN
    cdef readonly bint active_ok         # last verdict of active checks (True until one says no)
    cdef readonly int state              # STATE_*
    cdef readonly int consecutive_failures   # any failure kind, reset by a success
    cdef readonly int consecutive_timeouts   # OUTCOME_TIMEOUT only, reset by any other outcome
    cdef readonly int64_t ejected_until  # ns; EJECTED: when it turns HALF_OPEN; PROBING: probe deadline
    cdef readonly uint64_t requests      # begin() calls
    cdef readonly uint64_t failures      # failed outcomes (any kind)
    cdef readonly uint64_t ejections     # times ejected (including failed probes)
    cdef bint pickable                   # in the current pick set (see Balancer._rebuild)


cdef class Balancer:
    cdef readonly str name
    cdef readonly int algorithm
    cdef readonly tuple targets          # of Target, declaration order
    cdef PyObject** tp                   # borrowed pointers into `targets`
    cdef Py_ssize_t n
    # pick set: indices of pickable targets (healthy ones; all weighted ones when failing open)
    cdef int* eligible
    cdef Py_ssize_t n_eligible
    cdef readonly bint fail_open         # on_all_unhealthy: open
    cdef readonly bint failing_open      # no healthy target and fail_open: picking among all
    cdef readonly int active_priority    # the tier the pick set is from (-1: none)
    cdef bint tiered                     # targets of more than one priority
    # round-robin: one precomputed smooth-WRR cycle over the pick set, or live smooth WRR
    cdef int* schedule
    cdef Py_ssize_t sched_cap
    cdef Py_ssize_t sched_len            # 0: cycle too long, use live smooth WRR (cw)
    cdef Py_ssize_t sched_pos
    cdef int64_t* cw                     # current weights for live smooth WRR
    # consistent hashing
    cdef uint64_t* ring_hash
    cdef int* ring_target
    cdef Py_ssize_t ring_len
    # least-connections
    cdef Py_ssize_t rotor
    # p2c-ewma
    cdef uint64_t rng
    cdef double decay_ns                 # EWMA time constant
    cdef double failure_penalty_ns       # a failed request counts as at least this slow
    # passive health
    cdef int passive_failures            # consecutive failures to eject (0: off)
    cdef int passive_timeouts            # consecutive timeouts to eject (0: off)
    cdef unsigned char fail_status[600]  # response statuses that count as failures
    cdef int64_t ejection_ns
    cdef Py_ssize_t n_waiting            # targets EJECTED or PROBING (have a deadline)
    cdef int64_t next_wakeup             # earliest ejected_until among them
    # circuit breaker (0 = unlimited); counters are per upstream
    cdef readonly int64_t max_connections
    cdef readonly int64_t max_pending
    cdef readonly int64_t max_requests
    cdef readonly int64_t connections    # open upstream connections: conn_opened / conn_closed
    cdef readonly int64_t pending        # requests waiting for a new connection: pending_begin/end
    cdef readonly int64_t active_requests    # begin() +1, end() -1
    cdef readonly uint64_t rejected      # admit()/admit_connection() refusals
    cdef readonly uint64_t no_target     # picks that returned None
    cdef int64_t fake_now                # < 0: real clock

    # A target for this request, or None when there is none (caller answers 503). `exclude` (or None)
    # is avoided when another pickable target exists (retries; with priority tiers a retry goes to
    # a healthy target of a later tier when there is one); key is used by consistent hashing
    # only (key_len 0: round-robin fallback). Picking a HALF_OPEN target makes it the probe.
    cdef Target pick(self, const char* key, Py_ssize_t key_len, Target exclude)
    # The request is being sent to t.
    cdef void begin(self, Target t) noexcept
    # The request to t is over: feeds EWMA (latency_ns) and passive health (outcome, status).
    cdef void end(self, Target t, int64_t latency_ns, int outcome, int status) noexcept
    # Circuit breaker: may another request start (active_requests < max_requests and
    # pending < max_pending)? False counts in `rejected`.
    cdef bint admit(self) noexcept
    # May a new upstream connection be opened (connections < max_connections)?
    cdef bint admit_connection(self) noexcept
    cdef void conn_opened(self) noexcept
    cdef void conn_closed(self) noexcept
    cdef void pending_begin(self) noexcept
    cdef void pending_end(self) noexcept

    cdef int64_t _now(self) noexcept
    cdef void _rebuild(self) noexcept
    cdef void _wake(self, int64_t now) noexcept
    cdef void _eject(self, Target t, int64_t now) noexcept
    cdef void _observe(self, Target t, double sample, int64_t now) noexcept
    cdef double _cost(self, Target t, int64_t now) noexcept
    cdef int _pick_rr(self, int ex) noexcept
    cdef int _pick_lc(self, int ex) noexcept
    cdef int _pick_hash(self, const char* key, Py_ssize_t key_len, int ex) noexcept
    cdef int _pick_p2c(self, int ex) noexcept
    cdef int _next_tier(self, int ex) noexcept
