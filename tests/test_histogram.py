"""fastmesh._core.histogram: accuracy, merge, serialisation and edge cases."""
import math
import pickle
import random

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from fastmesh._core import histogram as H
from fastmesh._core.histogram import Histogram

US = 1_000
S = 1_000_000_000
LO, HI = 1 * US, 60 * S          # the range the error bound is promised for
REL = 0.01

values_in_range = st.integers(min_value=LO, max_value=HI)
quantiles = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)


def exact_percentile(sorted_values, q):
    """Same rank definition as the histogram: rank = max(1, ceil(q/100*n))."""
    n = len(sorted_values)
    rank = max(1, math.ceil(q / 100.0 * n))
    return sorted_values[min(rank, n) - 1]


def hist_of(values):
    h = Histogram()
    for v in values:
        h.add(v)
    return h


def assert_close(got, want):
    assert abs(got - want) <= REL * want, (got, want, abs(got - want) / max(want, 1))


# --- layout ---------------------------------------------------------------

def test_layout_bound_and_size():
    assert H.MAX_RELATIVE_ERROR < REL
    assert H.MAX_VALUE_NS >= HI
    assert H.BUCKETS * 8 <= 16 * 1024


def test_every_bucket_midpoint_within_bound():
    # Walk bucket edges: the low and high edge of each bucket map to it, and
    # its midpoint is within the bound of both edges.
    for idx in range(H.BUCKETS):
        mid = H.bucket_value(idx)
        assert H.bucket_index(mid) == idx
    v = 1
    while v < H.MAX_VALUE_NS:
        for x in (v - 1, v, v + 1, v + v // 3):
            if x <= 0 or x > H.MAX_VALUE_NS:
                continue
            mid = H.bucket_value(H.bucket_index(x))
            assert abs(mid - x) <= H.MAX_RELATIVE_ERROR * x
        v *= 2


def test_indices_monotonic():
    rng = random.Random(1)
    xs = sorted(rng.randrange(0, H.MAX_VALUE_NS) for _ in range(20000))
    idx = [H.bucket_index(x) for x in xs]
    assert idx == sorted(idx)
    assert H.bucket_index(H.MAX_VALUE_NS) == H.BUCKETS - 1


# --- accuracy -------------------------------------------------------------

@given(values_in_range, quantiles)
def test_single_value_every_percentile(v, q):
    h = hist_of([v])
    assert h.percentile(q) == v          # rank 1 == rank n: answered exactly
    assert h.min_ns == h.max_ns == v
    assert h.count == 1
    assert h.mean() == v


@given(st.lists(values_in_range, min_size=1, max_size=300), st.lists(quantiles, min_size=1, max_size=8))
@settings(max_examples=150, deadline=None)
def test_random_sets_relative_error(values, qs):
    h = hist_of(values)
    s = sorted(values)
    for q in qs:
        assert_close(h.percentile(q), exact_percentile(s, q))
    assert h.percentiles(qs) == [h.percentile(q) for q in qs]
    assert h.count == len(values)
    assert h.min_ns == s[0] and h.max_ns == s[-1]
    assert h.sum_ns == pytest.approx(sum(values))


def test_log_uniform_large_set():
    rng = random.Random(42)
    vals = [int(math.exp(rng.uniform(math.log(LO), math.log(HI)))) for _ in range(50000)]
    h = hist_of(vals)
    s = sorted(vals)
    for q in (0, 0.1, 1, 10, 25, 50, 75, 90, 99, 99.9, 99.99, 100):
        assert_close(h.percentile(q), exact_percentile(s, q))


def test_small_values_exact():
    h = hist_of(range(0, 128))
    s = list(range(0, 128))
    for q in range(0, 101):
        assert h.percentile(q) == exact_percentile(s, q)


# --- merge ----------------------------------------------------------------

@given(st.lists(values_in_range, max_size=100), st.lists(values_in_range, max_size=100))
@settings(max_examples=100, deadline=None)
def test_merge_equals_union(a, b):
    ha, hb = hist_of(a), hist_of(b)
    ha.merge(hb)
    hu = hist_of(a + b)
    assert ha.count == hu.count
    assert ha.min_ns == hu.min_ns and ha.max_ns == hu.max_ns
    assert ha.sum_ns == pytest.approx(hu.sum_ns)
    assert ha.percentiles([0, 1, 50, 90, 99, 100]) == hu.percentiles([0, 1, 50, 90, 99, 100])
    assert Histogram.loads(ha.dumps()).percentiles([50]) == hu.percentiles([50])


def test_merge_into_empty_and_self():
    h = hist_of([5 * US, 7 * US])
    e = Histogram()
    e.merge(h)
    assert (e.count, e.min_ns, e.max_ns) == (2, 5 * US, 7 * US)
    e.merge(Histogram())                      # merging an empty one changes nothing
    assert e.count == 2
    e.merge(e)
    assert e.count == 4 and e.sum_ns == 2 * h.sum_ns
    assert e.percentiles([0, 50, 100]) == hist_of([5 * US, 5 * US, 7 * US, 7 * US]).percentiles([0, 50, 100])
    with pytest.raises(TypeError):
        e.merge(None)


# --- serialisation --------------------------------------------------------

@given(st.lists(st.integers(min_value=-5, max_value=200 * S), max_size=200))
@settings(max_examples=100, deadline=None)
def test_dumps_loads_round_trip(values):
    h = hist_of(values)
    data = h.dumps()
    assert isinstance(data, bytes)
    g = Histogram.loads(data)
    assert g == h
    assert (g.count, g.min_ns, g.max_ns, g.sum_ns) == (h.count, h.min_ns, h.max_ns, h.sum_ns)
    qs = [0, 25, 50, 99, 100]
    assert g.percentiles(qs) == h.percentiles(qs)
    p = pickle.loads(pickle.dumps(h))
    assert p == h


def test_dumps_is_compact():
    h = hist_of([100 * US] * 10000 + [2 * S])
    assert len(h.dumps()) < 120
    assert len(Histogram().dumps()) < 60


def _doc(h):
    return msgpack.unpackb(h.dumps(), raw=False)


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(v=2),
    lambda d: d.update(lb=7),
    lambda d: d.update(n=4096),
    lambda d: d.update(count=d["count"] + 1),
    lambda d: d.update(count="3"),
    lambda d: d.update(min=d["max"] + 1),
    lambda d: d.update(max=1),
    lambda d: d.update(sum="x"),
    lambda d: d.update(b=d["b"][:-1]),
    lambda d: d.update(b=d["b"] + [0, 1]),          # repeated index
    lambda d: d.update(b=d["b"] + [5000, 1]),       # index out of range
    lambda d: d.update(b=[d["b"][0], 0] + d["b"][2:]),  # zero count
    lambda d: d.update(b=[-1] + d["b"][1:]),
    lambda d: d.pop("b"),
])
def test_loads_rejects_malformed(mutate):
    d = _doc(hist_of([3 * US, 3 * US, 9 * US, 40 * S]))
    mutate(d)
    with pytest.raises(ValueError):
        Histogram.loads(msgpack.packb(d))


@pytest.mark.parametrize("data", [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({1: 2}), b"\x93"])
def test_loads_rejects_garbage(data):
    with pytest.raises(ValueError):
        Histogram.loads(data)


# --- edge cases -----------------------------------------------------------

def test_empty():
    h = Histogram()
    assert not h.allocated                    # no bucket array until first record
    assert (h.count, h.min_ns, h.max_ns, h.sum_ns) == (0, 0, 0, 0.0)
    assert h.mean() == 0.0
    assert h.percentile(50) == 0 and h.percentile(0) == 0 and h.percentile(100) == 0
    assert h.percentiles([1, 50, 99]) == [0, 0, 0]
    g = Histogram.loads(h.dumps())
    assert g.count == 0 and not g.allocated
    repr(h)


def test_invalid_quantile():
    h = hist_of([1, 2, 3])
    for q in (-0.1, 100.01, float("nan")):
        with pytest.raises(ValueError):
            h.percentile(q)
        with pytest.raises(ValueError):
            h.percentiles([50, q])
    with pytest.raises(ValueError):
        Histogram().percentile(101)


def test_clamping_above_range():
    big = 10 * H.MAX_VALUE_NS
    h = hist_of([big, big, big])
    assert h.max_ns == big                    # exact extremes are kept
    assert h.percentile(100) == big
    assert H.bucket_index(big) == H.BUCKETS - 1
    h2 = hist_of([1 * US, big, big, big])
    top = H.bucket_value(H.BUCKETS - 1)
    assert h2.percentile(50) == top           # clamped into the last bucket
    assert abs(top - H.MAX_VALUE_NS) <= H.MAX_RELATIVE_ERROR * H.MAX_VALUE_NS
    h3 = hist_of([2 ** 63 - 1])               # int64 max does not overflow
    assert h3.count == 1


def test_zero_and_negative_recorded_as_zero():
    h = hist_of([0, -1, -10 ** 12, -(2 ** 63)])
    assert h.count == 4
    assert h.min_ns == h.max_ns == 0
    assert h.sum_ns == 0.0
    assert h.percentile(50) == 0
    h.add(10 * US)
    assert h.min_ns == 0 and h.max_ns == 10 * US
    assert h.percentile(50) == 0 and h.percentile(100) == 10 * US


def test_reset_keeps_working():
    h = hist_of([1 * US, 2 * US])
    h.reset()
    assert (h.count, h.min_ns, h.max_ns, h.sum_ns) == (0, 0, 0, 0.0)
    assert h.percentile(99) == 0
    h.add(3 * US)
    assert h.percentile(50) == 3 * US and h.count == 1


def test_add_many_and_aliases():
    h = Histogram()
    h.add_many([1 * US, 2 * US, 3 * US])
    h.record_py(4 * US)
    assert h.count == 4
    assert h.allocated
    with pytest.raises(TypeError):
        h.add("1")
    with pytest.raises(OverflowError):
        h.add(2 ** 64)
