"""The balancer (fastmesh/_core/balancer.pyx): algorithms, passive health, circuit breaker.

Everything here runs on the Python wrappers of the C calls the proxy makes (pick_py, begin_py,
end_py, admit_py); time is a fake clock (set_clock / advance_clock) so ejection timing is exact.
"""
from __future__ import annotations

import collections
import math

import pytest
from hypothesis import given, settings, strategies as st

from fastmesh._core.balancer import (
    ABORTED, CONNECT_FAIL, RESET, RESPONSE, TIMEOUT, Balancer, Target, hash_key, request_hash_key,
)


def names(balancer: Balancer, count: int, key: bytes = b"") -> list[str]:
    return [balancer.pick_py(key).host for _ in range(count)]


def served(balancer: Balancer, key: bytes = b"", exclude=None, status: int = 200,
           latency_ns: int = 1_000_000, outcome: int = RESPONSE):
    """One full request: pick, begin, end. Returns the target (or None)."""
    t = balancer.pick_py(key, exclude)
    if t is not None:
        balancer.begin_py(t)
        balancer.end_py(t, latency_ns, outcome, status)
    return t


# --- smooth weighted round-robin ------------------------------------------------------------

def test_smooth_wrr_matches_nginx_sequence():
    b = Balancer("u", [("a", 1, 5), ("b", 1, 1), ("c", 1, 1)])
    assert names(b, 7) == ["a", "a", "b", "a", "c", "a", "a"]
    assert names(b, 7) == ["a", "a", "b", "a", "c", "a", "a"]   # the cycle repeats exactly


def test_smooth_wrr_has_no_bursts():
    """With weights 3:1 the light target is never starved for more than 3 picks in a row."""
    b = Balancer("u", [("a", 1, 300), ("b", 1, 100)])
    seq = names(b, 400)
    longest = max(len(run) for run in "".join(seq).replace("b", " ").split())
    assert longest <= 3
    assert seq.count("a") == 300 and seq.count("b") == 100


def test_equal_weights_alternate():
    b = Balancer("u", [("a", 1, 100), ("b", 1, 100), ("c", 1, 100)])
    assert names(b, 6) == ["a", "b", "c", "a", "b", "c"]


def test_live_wrr_used_when_cycle_is_too_long_is_still_exact():
    b = Balancer("u", [("a", 1, 5), ("b", 1, 1), ("c", 1, 1)], schedule_cap=4)
    assert names(b, 7) == ["a", "a", "b", "a", "c", "a", "a"]


@settings(max_examples=60, deadline=None)
@given(weights=st.lists(st.integers(1, 20), min_size=1, max_size=6),
       cycles=st.integers(1, 3), cap=st.sampled_from([65536, 3]))
def test_wrr_exact_proportions_over_whole_cycles(weights, cycles, cap):
    b = Balancer("u", [(f"t{i}", 1, w) for i, w in enumerate(weights)], schedule_cap=cap)
    counts = collections.Counter(names(b, cycles * sum(weights)))
    assert counts == {f"t{i}": cycles * w for i, w in enumerate(weights)}


def test_weight_zero_is_never_picked():
    b = Balancer("u", [("a", 1, 0), ("b", 1, 1)])
    assert set(names(b, 10)) == {"b"}


def test_exclude_goes_to_another_target_when_one_exists():
    b = Balancer("u", [("a", 1, 5), ("b", 1, 1)])
    a = b.targets[0]
    for _ in range(20):
        assert b.pick_py(b"", a).host == "b"
    solo = Balancer("u", [("a", 1, 1)])
    only = solo.targets[0]
    assert solo.pick_py(b"", only) is only          # no other target: the same one again


# --- least connections ----------------------------------------------------------------------

def test_least_connections_picks_fewest_in_flight():
    b = Balancer("u", [("a", 1, 1), ("b", 1, 1), ("c", 1, 1)], "least-connections")
    a, bb, c = b.targets
    for t in (a, a, bb, c, c, c):
        b.begin_py(t)
    assert b.pick_py().host == "b"
    b.begin_py(bb)
    b.begin_py(bb)                                   # a=2, b=3, c=3
    assert b.pick_py().host == "a"
    b.end_py(c)
    b.end_py(c)                                      # c=1
    assert b.pick_py().host == "c"


def test_least_connections_ties_rotate_and_weights_count():
    b = Balancer("u", [("a", 1, 1), ("b", 1, 1), ("c", 1, 1)], "least-connections")
    assert names(b, 6) == ["a", "b", "c", "a", "b", "c"]
    w = Balancer("u", [("a", 1, 2), ("b", 1, 1)], "least-connections")
    a, bb = w.targets
    w.begin_py(a)
    w.begin_py(a)
    w.begin_py(bb)                                   # 2/2 == 1/1: a tie, weighted 2:1
    assert collections.Counter(names(w, 30)) == {"a": 20, "b": 10}
    w.begin_py(a)                                    # 3/2 > 1/1
    assert w.pick_py().host == "b"


def test_least_connections_exclude():
    b = Balancer("u", [("a", 1, 1), ("b", 1, 1)], "least-connections")
    a, bb = b.targets
    b.begin_py(bb)
    assert b.pick_py() is a
    assert b.pick_py(b"", a) is bb


# --- consistent hashing ---------------------------------------------------------------------

def ring(n: int, **kw) -> Balancer:
    return Balancer("u", [(f"10.0.0.{i}", 8080, 100) for i in range(n)], "consistent-hashing", **kw)


KEYS = [f"user-{i}".encode() for i in range(10_000)]


def assignment(b: Balancer) -> dict[bytes, str]:
    return {k: b.pick_py(k).host for k in KEYS}


def test_same_key_same_target():
    b = ring(5)
    first = assignment(b)
    assert assignment(b) == first
    assert assignment(ring(5)) == first              # a fresh balancer (another worker) agrees


def test_keys_spread_evenly():
    counts = collections.Counter(assignment(ring(5)).values())
    assert len(counts) == 5
    for count in counts.values():
        assert 1200 <= count <= 2800                 # 2000 expected; 160 vnodes keep it close


@pytest.mark.parametrize("n", [4, 5, 10])
def test_removing_one_target_moves_about_one_nth_of_keys(n):
    before = assignment(ring(n))
    smaller = Balancer("u", [(f"10.0.0.{i}", 8080, 100) for i in range(n) if i != 1],
                       "consistent-hashing")
    after = assignment(smaller)
    moved = sum(before[k] != after[k] for k in KEYS)
    owned = sum(v == "10.0.0.1" for v in before.values())
    assert moved == owned                            # only the removed target's keys move
    assert 0.5 / n <= moved / len(KEYS) <= 1.6 / n


def test_adding_one_target_moves_about_one_nth_of_keys():
    n = 5
    before = assignment(ring(n))
    after = assignment(ring(n + 1))
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == f"10.0.0.{n}" for k in moved)   # keys move only to the new target
    assert 0.5 / (n + 1) <= len(moved) / len(KEYS) <= 1.6 / (n + 1)


def test_unhealthy_target_keys_go_to_the_next_on_the_ring_and_come_back():
    b = ring(5)
    before = assignment(b)
    b.set_health("10.0.0.2:8080", False)
    during = assignment(b)
    assert all(during[k] == before[k] for k in KEYS if before[k] != "10.0.0.2")
    assert all(during[k] != "10.0.0.2" for k in KEYS)
    # marking unhealthy is exactly removal from the ring
    removed = Balancer("u", [(f"10.0.0.{i}", 8080, 100) for i in range(5) if i != 2],
                       "consistent-hashing")
    assert during == assignment(removed)
    b.set_health("10.0.0.2:8080", True)
    assert assignment(b) == before


def test_weights_scale_ring_share():
    b = Balancer("u", [("a", 1, 300), ("b", 1, 100)], "consistent-hashing")
    counts = collections.Counter(assignment(b).values())
    assert 0.65 <= counts["a"] / len(KEYS) <= 0.85


def test_empty_key_falls_back_to_round_robin_and_exclude_moves():
    b = ring(3)
    assert names(b, 3) == ["10.0.0.0", "10.0.0.1", "10.0.0.2"]
    home = b.pick_py(b"user-1")
    assert b.pick_py(b"user-1", home) is not home


def test_hash_key_is_stable_across_processes():
    # fixed values: a change here would remap every user of every deployed ring
    assert hash_key(b"abc") == 0x33EBAF9927CBC5BD
    assert hash_key(b"") == 0xEFD01F60BA992926
    assert hash_key(b"user-1") != hash_key(b"user-2")


def test_request_hash_key_per_hash_on():
    headers = [(b"Host", b"x"), (b"X-User-Id", b" 42 "), (b"Cookie", b"a=1; session=s3; b=2")]
    assert request_hash_key("ip", client_ip=b"10.1.2.3") == b"10.1.2.3"
    assert request_hash_key("header", "x-user-id", headers=headers) == b"42"
    assert request_hash_key("header", "x-missing", headers=headers) == b""
    assert request_hash_key("cookie", "session", headers=headers) == b"s3"
    assert request_hash_key("path", path=b"/orders/1") == b"/orders/1"
    assert request_hash_key("query_arg", "u", query=b"a=1&u=7&u=8") == b"7"
    assert request_hash_key("query_arg", "z", query=b"a=1") == b""


# --- p2c-ewma -------------------------------------------------------------------------------

def test_p2c_ewma_prefers_the_faster_target():
    b = Balancer("u", [("fast", 1, 1), ("slow", 1, 1), ("mid", 1, 1)], "p2c-ewma", seed=7)
    b.set_clock(1_000_000_000)
    latency = {"fast": 1_000_000, "mid": 5_000_000, "slow": 20_000_000}
    counts = collections.Counter()
    for _ in range(3000):
        t = b.pick_py()
        counts[t.host] += 1
        b.begin_py(t)
        b.end_py(t, latency[t.host])
        b.advance_clock(0.001)
    assert counts["fast"] > 0.6 * 3000
    assert counts["fast"] > counts["mid"] > counts["slow"]
    ewma = {t.host: t.ewma_ns for t in b.targets}
    assert ewma["fast"] < ewma["mid"] < ewma["slow"]


def test_p2c_accounts_for_in_flight():
    b = Balancer("u", [("a", 1, 1), ("b", 1, 1)], "p2c-ewma", seed=1)
    b.set_clock(10**9)
    a, bb = b.targets
    for t in (a, bb):
        b.begin_py(t)
        b.end_py(t, 1_000_000)
    for _ in range(5):
        b.begin_py(a)                                # same latency, a is busier
    assert all(b.pick_py() is bb for _ in range(20))


def test_p2c_seeded_rng_is_deterministic():
    def run(seed):
        b = Balancer("u", [(f"t{i}", 1, 1) for i in range(10)], "p2c-ewma", seed=seed)
        b.set_clock(0)
        return names(b, 50)
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_p2c_idle_slow_target_is_retried_after_decay():
    """A target penalized once is not shunned forever: its cost decays while it is not used."""
    b = Balancer("u", [("a", 1, 1), ("b", 1, 1)], "p2c-ewma", seed=1, ewma_decay=1.0)
    b.set_clock(10**9)
    a, bb = b.targets
    b.begin_py(a)
    b.end_py(a, 0, CONNECT_FAIL, 0)                  # a failure counts as failure_penalty (1s)
    b.begin_py(bb)
    b.end_py(bb, 5_000_000)
    assert b.pick_py() is bb
    b.advance_clock(10.0)                            # a's 1 s decays to e^-10 s = 45 us
    b.begin_py(bb)
    b.end_py(bb, 5_000_000)                          # b, in use, is freshly measured at 5 ms
    assert b.pick_py() is a


# --- passive health -------------------------------------------------------------------------

def passive(**kw) -> Balancer:
    options = dict(passive_failures=3, passive_timeouts=2, passive_http_statuses=(502, 503, 504),
                   ejection_time=30.0)
    options.update(kw)
    b = Balancer("u", [("a", 1, 1), ("b", 1, 1)], **options)
    b.set_clock(10**9)
    return b


def fail(b: Balancer, t: Target, outcome: int = CONNECT_FAIL, status: int = 0) -> None:
    b.begin_py(t)
    b.end_py(t, 1000, outcome, status)


def test_passive_ejection_after_consecutive_failures():
    b = passive()
    a = b.targets[0]
    fail(b, a)
    fail(b, a, RESPONSE, 503)
    assert a.healthy and a.consecutive_failures == 2
    fail(b, a, RESET)
    assert not a.healthy and a.state_name == "ejected" and a.ejections == 1
    assert set(names(b, 5)) == {"b"}


def test_a_success_resets_the_consecutive_count():
    b = passive()
    a = b.targets[0]
    fail(b, a)
    fail(b, a)
    b.begin_py(a)
    b.end_py(a, 1000, RESPONSE, 200)
    fail(b, a)
    fail(b, a)
    assert a.healthy
    fail(b, a, RESPONSE, 500)                        # 500 is not in http_statuses: a success
    assert a.consecutive_failures == 0


def test_consecutive_timeouts_eject_sooner():
    b = passive()
    a = b.targets[0]
    fail(b, a, TIMEOUT)
    fail(b, a, TIMEOUT)
    assert a.state_name == "ejected"


def test_half_open_after_ejection_time_then_restored_by_success():
    b = passive()
    a = b.targets[0]
    for _ in range(3):
        fail(b, a)
    b.advance_clock(29.9)
    assert set(names(b, 4)) == {"b"}
    b.advance_clock(0.2)
    probe = [b.pick_py() for _ in range(4)]
    assert probe.count(a) == 1                       # exactly one probe request
    assert a.state_name == "probing"
    b.begin_py(a)
    b.end_py(a, 1000, RESPONSE, 200)
    assert a.state_name == "healthy" and a.healthy
    assert set(names(b, 4)) == {"a", "b"}


def test_failed_probe_re_ejects_for_another_ejection_time():
    b = passive()
    a = b.targets[0]
    for _ in range(3):
        fail(b, a)
    b.advance_clock(31)
    while b.pick_py() is not a:
        pass
    fail(b, a, RESPONSE, 502)
    assert a.state_name == "ejected" and a.ejections == 2
    b.advance_clock(29)
    assert set(names(b, 4)) == {"b"}
    b.advance_clock(2)
    assert a in [b.pick_py() for _ in range(2)]


def test_lost_probe_gives_way_to_another_after_its_deadline():
    b = passive()
    a = b.targets[0]
    for _ in range(3):
        fail(b, a)
    b.advance_clock(31)
    while b.pick_py() is not a:                      # probe picked, but never begun/ended
        pass
    assert set(names(b, 4)) == {"b"}
    b.advance_clock(31)
    assert a in [b.pick_py() for _ in range(2)]


def test_aborted_probe_is_inconclusive():
    b = passive()
    a = b.targets[0]
    for _ in range(3):
        fail(b, a)
    b.advance_clock(31)
    while b.pick_py() is not a:
        pass
    b.begin_py(a)
    b.end_py(a, 0, ABORTED, 0)
    assert a.state_name == "half-open" and a.failures == 3


def test_passive_off_never_ejects():
    b = Balancer("u", [("a", 1, 1)])
    a = b.targets[0]
    for _ in range(50):
        fail(b, a)
    assert a.healthy and a.failures == 50


def test_active_and_passive_both_must_agree():
    b = passive()
    a = b.targets[0]
    b.set_health(a, False)
    assert not a.healthy and set(names(b, 4)) == {"b"}
    b.set_health(a, True)
    for _ in range(3):
        fail(b, a)
    b.set_health(a, True)                            # active says fine; passive ejection stands
    assert not a.healthy


# --- all unhealthy --------------------------------------------------------------------------

def test_all_unhealthy_pick_returns_none():
    b = passive()
    for t in b.targets:
        b.set_health(t, False)
    assert b.pick_py() is None
    assert b.no_target == 1
    assert b.stats()["healthy_targets"] == 0


def test_all_unhealthy_fail_open_uses_all_targets():
    b = passive(fail_open=True)
    a, bb = b.targets
    for _ in range(3):
        fail(b, a)
    b.set_health(bb, False)
    assert b.failing_open
    assert set(names(b, 4)) == {"a", "b"}
    b.set_health(bb, True)
    assert not b.failing_open and set(names(b, 4)) == {"b"}


@pytest.mark.parametrize("algorithm", ["round-robin", "least-connections", "consistent-hashing",
                                       "p2c-ewma"])
def test_every_algorithm_skips_unhealthy_targets(algorithm):
    b = Balancer("u", [(f"t{i}", 1, 1) for i in range(4)], algorithm, seed=5)
    b.set_clock(10**9)
    b.set_health("t1:1", False)
    b.set_health("t3:1", False)
    seen = {served(b, f"k{i}".encode()).host for i in range(200)}
    assert seen == {"t0", "t2"}
    for t in b.targets:
        b.set_health(t, False)
    assert b.pick_py(b"k") is None


# --- circuit breaker ------------------------------------------------------------------------

def test_circuit_breaker_max_requests():
    b = Balancer("u", [("a", 1, 1)], max_requests=2)
    a = b.targets[0]
    assert b.admit_py()
    b.begin_py(a)
    assert b.admit_py()
    b.begin_py(a)
    assert not b.admit_py() and b.rejected == 1
    b.end_py(a)
    assert b.admit_py()


def test_circuit_breaker_pending_and_connections():
    b = Balancer("u", [("a", 1, 1)], max_pending=1, max_connections=2)
    b.pending_begin_py()
    assert not b.admit_py()
    b.pending_end_py()
    assert b.admit_py()
    b.conn_opened_py()
    assert b.admit_connection_py()
    b.conn_opened_py()
    assert not b.admit_connection_py()
    b.conn_closed_py()
    assert b.admit_connection_py()
    assert b.rejected == 2


def test_unlimited_by_default():
    b = Balancer("u", [("a", 1, 1)])
    a = b.targets[0]
    for _ in range(10000):
        b.begin_py(a)
    assert b.admit_py() and b.admit_connection_py()
    assert a.in_flight == 10000 and b.active_requests == 10000


# --- state across reloads, views ------------------------------------------------------------

def test_inherit_keeps_health_for_unchanged_addresses():
    old = passive()
    a = old.targets[0]
    for _ in range(3):
        fail(old, a)
    old.set_health("b:1", False)
    new = Balancer("u", [("a", 1, 1), ("b", 1, 1), ("c", 1, 1)], passive_failures=3)
    new.set_clock(10**9)
    new.inherit(old)
    assert [t.state_name for t in new.targets] == ["ejected", "healthy", "healthy"]
    assert [t.healthy for t in new.targets] == [False, False, True]
    new.advance_clock(31)
    assert new.targets[0] in [new.pick_py() for _ in range(3)]


def test_an_unchanged_round_robin_cycle_goes_on_across_rebuilds_and_new_plans():
    # 9:1 (a mesh canary): b is 6th in the cycle. A new Plan every 4 picks (registry changes
    # elsewhere) or a change in another tier must not restart the cycle, or b is never picked.
    targets = [("a", 1, 9000), ("b", 1, 1000)]
    b = Balancer("u", targets, algorithm="round-robin")
    picks = []
    for _ in range(20):
        picks += names(b, 4)
        new = Balancer("u", targets, algorithm="round-robin")
        new.inherit(b)
        b = new
    assert picks.count("b") == 8 and picks.count("a") == 72
    # Another tier's target coming and going leaves the pick set's cycle where it was.
    tiered = Balancer("u", [*targets, ("c", 1, 100, 1)], algorithm="round-robin",
                      passive_failures=1)
    seen = names(tiered, 3)
    fail(tiered, tiered.targets[2])             # c (tier 1) ejected: a rebuild
    seen += names(tiered, 7)
    assert seen == ["a"] * 5 + ["b"] + ["a"] * 4
    # A changed cycle starts over.
    changed = Balancer("u", [("a", 1, 1), ("b", 1, 1)], algorithm="round-robin")
    changed.inherit(b)
    assert names(changed, 2) == ["a", "b"]


def test_health_rows():
    b = passive()
    a = b.targets[0]
    for _ in range(3):
        fail(b, a)
    rows = b.health()
    assert rows[0]["target"] == "a:1" and rows[0]["passive"] == "ejected"
    assert math.isclose(rows[0]["ejected_for_s"], 30.0)
    assert rows[0]["failures"] == 3 and rows[1]["healthy"] is True


def test_ipv6_address_and_lookup():
    b = Balancer("u", [("::1", 8080, 1)])
    assert b.targets[0].address == "[::1]:8080"
    assert b.target("[::1]:8080") is b.targets[0]


def test_duplicate_targets_refused():
    with pytest.raises(ValueError):
        Balancer("u", [("a", 1, 1), ("a", 1, 2)])


# --- priority tiers (failover) --------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["round-robin", "least-connections", "consistent-hashing",
                                       "p2c-ewma"])
def test_a_tier_takes_traffic_only_while_every_lower_one_has_no_healthy_target(algorithm):
    b = Balancer("u", [("a", 1, 100, 0), ("b", 1, 100, 0), ("c", 1, 100, 1), ("d", 1, 100, 2)],
                 algorithm, seed=3, passive_failures=1, ejection_time=10)
    b.set_clock(10**9)

    def seen() -> set[str]:
        return {served(b, f"k{i}".encode()).host for i in range(100)}

    assert seen() == {"a", "b"} and b.active_priority == 0
    fail(b, b.targets[0])
    assert seen() == {"b"}                      # one healthy target left in tier 0: it stays there
    fail(b, b.targets[1])
    assert seen() == {"c"} and b.active_priority == 1
    b.set_health("c:1", False)
    assert seen() == {"d"} and b.active_priority == 2
    b.set_health("c:1", True)
    assert seen() == {"c"}
    b.advance_clock(10)                         # a and b half-open: a probe brings tier 0 back
    assert served(b, b"k").priority == 0
    assert seen() <= {"a", "b"} and b.active_priority == 0
    assert [row["priority"] for row in b.health()] == [0, 0, 1, 2]


def test_a_retry_goes_to_the_next_tier_when_it_has_a_healthy_target():
    # A zone going down: its targets fail before any is ejected; retries spent inside the tier
    # could all fail, so a retry goes to another failure domain.
    b = Balancer("u", [("near1", 1, 100, 0), ("near2", 1, 100, 0), ("far1", 1, 100, 1),
                       ("far2", 1, 100, 1)], "p2c-ewma", seed=1)
    near1 = b.targets[0]
    assert {served(b).host for _ in range(40)} == {"near1", "near2"}
    retry = b.pick_py(b"", near1)
    assert retry.host in ("far1", "far2")
    b.begin_py(retry)
    assert b.pick_py(b"", near1).host == ({"far1", "far2"} - {retry.host}).pop()  # fewest in flight
    b.end_py(retry)
    b.set_health("far1:1", False)
    b.set_health("far2:1", False)
    assert b.pick_py(b"", near1).host == "near2"     # no later tier: the rest of its own
    single = Balancer("u", [("only", 1)], "p2c-ewma")
    assert single.pick_py(b"", single.targets[0]).host == "only"   # nowhere else: the same one


def test_failing_open_spans_all_tiers_and_priorities_are_checked():
    b = Balancer("u", [("a", 1, 100, 0), ("b", 1, 100, 1)], fail_open=True)
    for t in b.targets:
        b.set_health(t, False)
    assert b.failing_open and set(names(b, 4)) == {"a", "b"} and b.active_priority == -1
    with pytest.raises(ValueError):
        Balancer("u", [("a", 1, 100, -1)])
