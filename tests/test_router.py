"""Routing table (fastmesh/_core/router.pyx): named precedence rules + a property
test against a naive reference matcher written here from the documented rules."""
import re
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmesh._core.router import Router


@dataclass(frozen=True)
class Rt:
    name: str
    index: int
    hosts: tuple = ()
    paths: tuple = ()
    methods: tuple = ()
    headers: tuple = ()
    priority: int = 0
    target: object = None


def mk(*specs):
    """mk(dict(...), ...) -> Router; name r<i>, index i, target = name unless given."""
    routes = []
    for i, kw in enumerate(specs):
        kw = dict(kw)
        kw.setdefault("name", "r%d" % i)
        kw.setdefault("index", i)
        kw.setdefault("target", kw["name"])
        routes.append(Rt(**kw))
    return Router(routes)


def win(router, host, path, method="GET", headers=None):
    m = router.match(host, path, method, headers)
    return None if m is None else m[0]


# ----------------------------------------------------------------------------- basics

def test_no_routes():
    r = Router([])
    assert len(r) == 0 and r.size == 0
    assert r.match("a.com", "/", "GET") is None
    assert r._match_c(b"a.com", b"/", b"GET") == (None, 0)
    assert r.explain("a.com", "/", "GET") == []


def test_catch_all_route():
    r = mk(dict())
    assert r.match("anything", "/x/y", "DELETE") == ("r0", 0)
    assert r.match("", "", "") == ("r0", 0)


def test_str_and_bytes_inputs_agree():
    r = mk(dict(hosts=("api.example.com",), paths=("/v1",)))
    assert r.match("api.example.com", "/v1/x", "GET") == ("r0", 3)
    assert r.match(b"api.example.com", b"/v1/x", b"GET") == ("r0", 3)


def test_match_c_contract():
    r = mk(dict(hosts=("api.example.com",), paths=("/v1",), target=None),
           dict(paths=("=/z",), target="z"))
    # a target of None is still returned; matched_len is written
    assert r._match_c(b"API.example.com:443", b"/v1/a", b"GET") == (None, 3)
    assert r._match_c(b"h", b"/z", b"GET") == ("z", 2)
    assert r._match_c(b"h", b"/nope", b"GET") == (None, 0)
    assert r.match("api.example.com", "/v1", "GET") == (None, 3)


# ----------------------------------------------------------------------------- hosts

def test_exact_host_beats_wildcard_beats_no_host():
    r = mk(dict(name="nohost", paths=("=/a",)),              # best path, worst host
           dict(name="wild", hosts=("*.example.com",), paths=("/",)),
           dict(name="exact", hosts=("api.example.com",), paths=("~/",)))
    assert win(r, "api.example.com", "/a") == "exact"
    assert win(r, "www.example.com", "/a") == "wild"
    assert win(r, "example.org", "/a") == "nohost"


def test_longer_wildcard_suffix_wins():
    r = mk(dict(name="short", hosts=("*.example.com",)),
           dict(name="long", hosts=("*.b.example.com",)),
           dict(name="tld", hosts=("*.com",)))
    assert win(r, "a.b.example.com", "/") == "long"
    assert win(r, "x.y.b.example.com", "/") == "long"
    assert win(r, "a.example.com", "/") == "short"
    assert win(r, "b.example.com", "/") == "short"        # *.b.example.com needs a label
    assert win(r, "example.com", "/") == "tld"
    assert win(r, "com", "/") is None


def test_wildcard_depth():
    r = mk(dict(hosts=("*.example.com",)))
    assert win(r, "a.example.com", "/") == "r0"
    assert win(r, "a.b.example.com", "/") == "r0"
    assert win(r, "a.b.c.d.example.com", "/") == "r0"
    assert win(r, "example.com", "/") is None
    assert win(r, "xexample.com", "/") is None
    assert win(r, ".example.com", "/") is None


def test_host_normalisation():
    r = mk(dict(name="api", hosts=("api.example.com",)),
           dict(name="v6", hosts=("[::1]",)),
           dict(name="v6bare", hosts=("fe80::2",)))
    for h in ("api.example.com", "API.Example.COM", "api.example.com:8080",
              "api.example.com.", "Api.Example.Com.:80", " api.example.com "):
        assert win(r, h, "/") == "api", h
        assert r._match_c(h.encode(), b"/", b"GET")[0] == "api", h
    assert win(r, "[::1]:8000", "/") == "v6"
    assert win(r, "[::1]", "/") == "v6"
    assert win(r, "[FE80::2]:1", "/") == "v6bare"
    assert win(r, "[::1", "/") is None                       # malformed literal
    assert win(r, "api.example.com.evil", "/") is None
    assert win(r, "", "/") is None


def test_route_hosts_normalised_at_build():
    r = mk(dict(hosts=("API.example.com.",)), dict(hosts=("*.Example.ORG.",)))
    assert win(r, "api.example.com", "/") == "r0"
    assert win(r, "x.example.org", "/") == "r1"


def test_long_host_matches_only_hostless_routes():
    long_host = "a" * 250 + ".example.com"                   # > 255 bytes
    r = mk(dict(name="wild", hosts=("*.example.com",)), dict(name="any", paths=("/",)))
    assert win(r, long_host, "/x") == "any"
    assert win(r, "a" * 240 + ".example.com", "/x") == "wild"   # 252 bytes: fine


def test_multiple_hosts_on_one_route():
    r = mk(dict(name="multi", hosts=("a.com", "*.b.com"), paths=("/m",)),
           dict(name="any"))
    assert win(r, "a.com", "/m") == "multi"
    assert win(r, "x.b.com", "/m/1") == "multi"
    assert win(r, "b.com", "/m") == "any"


def test_host_route_falls_through_to_less_specific_groups():
    r = mk(dict(name="host_a", hosts=("api.example.com",), paths=("/a",)),
           dict(name="wild_b", hosts=("*.example.com",), paths=("/b",)),
           dict(name="any_c", paths=("/c",)))
    assert win(r, "api.example.com", "/a") == "host_a"
    assert win(r, "api.example.com", "/b") == "wild_b"
    assert win(r, "api.example.com", "/c") == "any_c"
    assert win(r, "api.example.com", "/d") is None


# ----------------------------------------------------------------------------- paths

def test_exact_beats_prefix_beats_regex_beats_pathless():
    r = mk(dict(name="pathless", priority=100),
           dict(name="regex", paths=("~/a",), priority=50),
           dict(name="prefix", paths=("/a",)),
           dict(name="exact", paths=("=/a/b",)))
    assert r.match("h", "/a/b", "GET") == ("exact", 4)
    assert r.match("h", "/a/bc", "GET") == ("prefix", 2)
    r2 = mk(dict(name="pathless", priority=100), dict(name="regex", paths=("~/a",)))
    assert r2.match("h", "/ax", "GET") == ("regex", 2)
    assert r2.match("h", "/x", "GET") == ("pathless", 0)


def test_longest_prefix_wins_regardless_of_priority_and_order():
    r = mk(dict(name="short", paths=("/api",), priority=9),
           dict(name="long", paths=("/api/v1",)),
           dict(name="root", paths=("/",), priority=99))
    assert r.match("h", "/api/v1/users", "GET") == ("long", 7)
    assert r.match("h", "/api/v2", "GET") == ("short", 4)
    assert r.match("h", "/other", "GET") == ("root", 1)


def test_prefix_is_a_plain_byte_prefix():
    r = mk(dict(paths=("/orders",)))
    for p in ("/orders", "/orders/1", "/orders-old", "/ordersX"):
        assert r.match("h", p, "GET") == ("r0", 7), p
    assert r.match("h", "/order", "GET") is None
    r2 = mk(dict(paths=("/orders/",)))
    assert r2.match("h", "/orders-old", "GET") is None


def test_exact_path_is_exact():
    r = mk(dict(paths=("=/x",)))
    assert r.match("h", "/x", "GET") == ("r0", 2)
    assert r.match("h", "/x/", "GET") is None
    assert r.match("h", "/", "GET") is None


def test_route_with_several_path_kinds_uses_its_best():
    r = mk(dict(name="mixed", paths=("~/a.*", "/a", "/a/b", "=/a/b/c")),
           dict(name="other", paths=("/a/b/",), priority=5))
    assert r.match("h", "/a/b/c", "GET") == ("mixed", 6)     # its exact path
    assert r.match("h", "/a/b/d", "GET") == ("other", 5)     # longer prefix than /a/b
    assert r.match("h", "/a/x", "GET") == ("mixed", 2)
    assert r.match("h", "/ab", "GET") == ("mixed", 2)


def test_regex_matched_len_anchoring_and_first_regex():
    r = mk(dict(paths=("~/u/(\\d+)", "~/u/\\d+/x")))
    assert r.match("h", "/u/123/x", "GET") == ("r0", 6)      # first regex in declared order
    assert r.match("h", "/u/9abc", "GET") == ("r0", 4)       # re.match: no end anchor
    assert r.match("h", "/x/u/1", "GET") is None             # anchored at the start
    r2 = mk(dict(paths=("~/files/.*$",)))
    assert r2.match("h", "/files/a/b", "GET") == ("r0", 10)


def test_regex_priority_then_index_then_position():
    r = mk(dict(name="first", paths=("~/r",)),
           dict(name="second", paths=("~/r.*",)),
           dict(name="prio", paths=("~/r/\\d",), priority=3))
    assert win(r, "h", "/r/1") == "prio"
    assert win(r, "h", "/r/x") == "first"
    # index (declaration order), not position in the list, breaks ties
    r2 = Router([Rt("late", 5, paths=("~/r",), target="late"),
                 Rt("early", 1, paths=("~/r",), target="early")])
    assert win(r2, "h", "/r") == "early"


def test_priority_then_index_break_remaining_ties():
    r = Router([Rt("b", 2, paths=("/p",), target="b"),
                Rt("a", 1, paths=("/p",), target="a"),
                Rt("hi", 3, paths=("/p",), priority=1, target="hi")])
    assert win(r, "h", "/p/q") == "hi"
    r = Router([Rt("b", 2, paths=("=/p",), target="b"), Rt("a", 1, paths=("=/p",), target="a")])
    assert win(r, "h", "/p") == "a"
    r = Router([Rt("b", 2, target="b"), Rt("a", 1, target="a")])
    assert win(r, "h", "/") == "a"


def test_many_nested_prefixes_in_one_group():
    # > 64 nested prefixes of the same path exercise the hit-buffer overflow path
    routes = [Rt("p%d" % k, k, paths=("/" + "a" * k,), methods=("POST",) if k > 30 else (),
                 target=k) for k in range(1, 101)]
    r = Router(routes)
    assert r.match("h", "/" + "a" * 120, "POST") == (100, 101)
    assert r.match("h", "/" + "a" * 120, "GET") == (30, 31)
    assert r.match("h", "/" + "a" * 50 + "b", "GET") == (30, 31)
    assert r.match("h", "/" + "a" * 20 + "b", "GET") == (20, 21)
    assert r.match("h", "/" + "a" * 20 + "b", "POST") == (20, 21)
    assert r.match("h", "/b", "POST") is None


# ----------------------------------------------------------------------------- methods / headers

def test_method_filter_falls_through():
    r = mk(dict(name="post", hosts=("api.example.com",), paths=("=/x",), methods=("POST",)),
           dict(name="prefix_get", hosts=("api.example.com",), paths=("/x",), methods=("GET", "HEAD")),
           dict(name="any", paths=("/",)))
    assert win(r, "api.example.com", "/x", "POST") == "post"
    assert win(r, "api.example.com", "/x", "GET") == "prefix_get"
    assert win(r, "api.example.com", "/x", "HEAD") == "prefix_get"
    assert win(r, "api.example.com", "/x", "PUT") == "any"
    assert win(r, "api.example.com", "/x", "get") == "any"   # methods are case-sensitive
    assert win(r, "api.example.com", "/x", "") == "any"


def test_method_filter_on_regex_and_pathless():
    r = mk(dict(name="rx", paths=("~/x",), methods=("DELETE",), priority=5),
           dict(name="rx2", paths=("~/x",)),
           dict(name="pl_post", methods=("POST",), priority=1),
           dict(name="pl"))
    assert win(r, "h", "/x", "DELETE") == "rx"
    assert win(r, "h", "/x", "GET") == "rx2"
    assert win(r, "h", "/y", "POST") == "pl_post"
    assert win(r, "h", "/y", "GET") == "pl"


class CountingHeaders:
    def __init__(self, d):
        self.d = d
        self.calls = []

    def header_values(self, name):
        self.calls.append(name)
        return self.d.get(name, [])


def test_header_rules():
    r = mk(dict(name="v2", paths=("/api",), headers=(("x-version", ("V2", "v3")),)),
           dict(name="both", paths=("/api",), priority=-1,
                headers=(("x-a", ("1",)), ("x-b", ("yes",)))),
           dict(name="plain", paths=("/api",), priority=-5))
    assert win(r, "h", "/api", headers={"x-version": ["v2"]}) == "v2"
    assert win(r, "h", "/api", headers={"X-Version": "V3"}) == "v2"     # case-insensitive
    assert win(r, "h", "/api", headers={"x-version": ["v1", "v2"]}) == "v2"  # some value
    assert win(r, "h", "/api", headers={b"x-version": [b" v2 "]}) == "v2"
    assert win(r, "h", "/api", headers={"x-version": ["v1"]}) == "plain"
    assert win(r, "h", "/api", headers={}) == "plain"                  # missing header
    assert win(r, "h", "/api") == "plain"                              # no headers object
    assert win(r, "h", "/api", headers={"x-a": "1", "x-b": "YES"}) == "both"
    assert win(r, "h", "/api", headers={"x-a": "1"}) == "plain"         # all rules must hold


def test_header_presence_only_rule():
    r = mk(dict(name="has", headers=(("x-debug", ()),)), dict(name="plain", priority=-1))
    assert win(r, "h", "/", headers={"x-debug": ["anything"]}) == "has"
    assert win(r, "h", "/", headers={}) == "plain"


def test_header_values_only_consulted_for_candidates_with_rules():
    r = mk(dict(name="hdr", paths=("/h",), headers=(("x-k", ("v",)),)),
           dict(name="plain", paths=("/p",)))
    hs = CountingHeaders({b"x-k": [b"V"]})
    assert r._match_c(b"h", b"/p", b"GET", hs) == ("plain", 2)
    assert hs.calls == []
    assert r._match_c(b"h", b"/h", b"GET", hs) == ("hdr", 2)
    assert hs.calls == [b"x-k"]
    assert r._match_c(b"h", b"/h", b"GET", None) == (None, 0)


def test_header_values_exception_propagates():
    class Boom:
        def header_values(self, name):
            raise RuntimeError("boom")
    r = mk(dict(headers=(("x", ("1",)),)))
    with pytest.raises(RuntimeError):
        r._match_c(b"h", b"/", b"GET", Boom())


# ----------------------------------------------------------------------------- build errors

@pytest.mark.parametrize("host", ["ex*.com", "*", "*.", "a.*.com", "*.*.com", ""])
def test_unsupported_host_patterns_rejected(host):
    with pytest.raises(ValueError):
        mk(dict(hosts=(host,)))


def test_invalid_regex_rejected():
    with pytest.raises(ValueError, match="regex"):
        mk(dict(paths=("~/(unclosed",)))


# ----------------------------------------------------------------------------- explain / shadowed

def test_explain_lists_every_route_with_reasons():
    r = mk(dict(name="host_only", hosts=("api.example.com",), paths=("/a",)),
           dict(name="wrong_method", paths=("/",), methods=("POST",)),
           dict(name="wrong_header", paths=("/",), headers=(("x-k", ("v",)),)),
           dict(name="prefix", paths=("/b",)),
           dict(name="any"))
    ex = r.explain("Other.com:80", "/b/1", "GET", {"x-k": "nope"})
    assert [d["route"] for d in ex] == ["prefix", "any", "host_only", "wrong_method", "wrong_header"]
    assert ex[0]["winner"] and ex[0]["matched"] and ex[0]["matched_len"] == 2
    assert ex[0]["path"] == "prefix /b"
    assert not ex[1]["winner"] and ex[1]["matched"]
    assert "host" in ex[2]["reason"]
    assert "method" in ex[3]["reason"]
    assert "x-k" in ex[4]["reason"]
    assert all(not d["matched"] for d in ex[2:])
    assert r.match("Other.com:80", "/b/1", "GET", {"x-k": "nope"}) == ("prefix", 2)


def test_shadowed():
    r = mk(dict(name="a", paths=("/x",)),
           dict(name="b", paths=("/x",), methods=("GET",)),                  # a takes all of b
           dict(name="c", paths=("/x",), priority=1, methods=("GET",)),      # outranks a
           dict(name="d", paths=("/y",), headers=(("k", ("1",)),)),
           dict(name="e", paths=("/y",), headers=(("k", ("1",)), ("j", ("2",)))),
           dict(name="f", paths=("/y",), headers=(("k", ("1", "3")),)))
    # reported against the first route (in precedence order) that covers it
    assert sorted(r.shadowed()) == [("b", "c"), ("e", "d")]
    assert mk(dict(paths=("/x",)), dict(paths=("/x",), methods=("GET",))).shadowed() == [
        ("r1", "r0")]
    assert mk(dict(paths=("/x",), methods=("GET",)), dict(paths=("/x",))).shadowed() == []


# ----------------------------------------------------------------------------- scale

def test_ten_thousand_routes_pick_the_right_one():
    import random
    rnd = random.Random(7)
    routes = []
    for i in range(10000):
        h = "h%d.example.com" % i if i % 7 else "*.w%d.example.com" % i
        routes.append(Rt("r%d" % i, i, hosts=(h,), paths=("/p%d/" % (i % 13),), target=i))
    routes.append(Rt("fallback", 10000, paths=("/",), target="fb"))
    r = Router(routes)
    assert r.size == 10001
    for i in rnd.sample(range(10000), 300):
        host = ("h%d.example.com" if i % 7 else "x.y.w%d.example.com") % i
        assert r.match(host, "/p%d/abc" % (i % 13), "GET") == (i, len("/p%d/" % (i % 13)))
        assert r.match(host, "/q", "GET") == ("fb", 1)
    assert r.memory_usage() > 0


# ----------------------------------------------------------------------------- property test

def ref_norm_host(h):
    h = h.strip(" \t")
    if h.startswith("["):
        if "]" not in h:
            return None
        h = h[:h.index("]") + 1]
    else:
        h = h.split(":", 1)[0]
    h = h.rstrip(".").lower()
    return None if len(h) > 255 else h


def ref_match(routes, host, path, method, headers):
    """Filter every matching route, sort by the documented key, take the first."""
    hn = ref_norm_host(host)
    hdr = {}
    for k, v in (headers or {}).items():
        hdr.setdefault(k.lower(), []).extend([v] if isinstance(v, str) else v)
    found = []
    for pos, r in enumerate(routes):
        if r.hosts:
            ranks = []
            for h in r.hosts:
                if h.startswith("*."):
                    suffix = h[1:]
                    if hn and hn.endswith(suffix) and len(hn) > len(suffix):
                        ranks.append((1, -len(suffix)))
                elif hn and hn == h:
                    ranks.append((0,))
            if not ranks:
                continue
            hrank = min(ranks)
        else:
            hrank = (2,)
        if r.paths:
            cands = []
            for p in r.paths:
                if p.startswith("="):
                    if path == p[1:]:
                        cands.append(((0,), len(path)))
                elif p.startswith("~"):
                    pass
                elif path.startswith(p):
                    cands.append(((1, -len(p)), len(p)))
            if not cands:
                for p in r.paths:               # first regex in declared order
                    if p.startswith("~"):
                        m = re.match(p[1:].encode(), path.encode())
                        if m:
                            cands.append(((2,), m.end()))
                            break
            if not cands:
                continue
            prank, mlen = min(cands)
        else:
            prank, mlen = (3,), 0
        if r.methods and method not in r.methods:
            continue
        if r.headers:
            if headers is None:
                continue
            ok = True
            for name, allowed in r.headers:
                vals = [v.strip().lower() for v in hdr.get(name, [])]
                if not vals or (allowed and not any(v in [a.lower() for a in allowed]
                                                    for v in vals)):
                    ok = False
            if not ok:
                continue
        found.append(((hrank, prank, -r.priority, r.index, pos), r.target, mlen))
    if not found:
        return None
    found.sort(key=lambda f: f[0])
    return found[0][1], found[0][2]


ROUTE_HOSTS = ["api.example.com", "example.com", "a.example.com", "*.example.com",
               "*.a.example.com", "x.org", "*.org", "[::1]"]
ROUTE_PATHS = ["=/", "=/a", "=/a/b", "/", "/a", "/a/", "/ab", "/a/b", "/x",
               "~/a/\\d+", "~/a", "~/(x|a)b?", "~/.*"]
REQ_HOSTS = ["api.example.com", "API.Example.com:8080", "example.com.", "a.example.com",
             "b.a.example.com", "c.b.a.example.com", "x.org", "y.x.org", "[::1]:8000", "",
             "other.net"]
REQ_PATHS = ["", "/", "/a", "/a/", "/a/1", "/a/12/x", "/a/b", "/a/bc", "/ab", "/abc", "/x",
             "/xb", "/zz"]
HEADER_RULES = [(), (("x-v", ("a", "B")),), (("x-v", ("a",)), ("x-w", ()))]
REQ_HEADERS = [None, {}, {"x-v": ["A"]}, {"X-V": ["c", "b "]}, {"x-w": "zz", "x-v": ["a"]}]


@st.composite
def route_sets(draw):
    n = draw(st.integers(0, 8))
    indices = draw(st.permutations(list(range(n))))
    routes = []
    for i in range(n):
        routes.append(Rt(
            name="r%d" % i, index=indices[i],
            hosts=tuple(draw(st.lists(st.sampled_from(ROUTE_HOSTS), max_size=2, unique=True))),
            paths=tuple(draw(st.lists(st.sampled_from(ROUTE_PATHS), max_size=3, unique=True))),
            methods=tuple(draw(st.lists(st.sampled_from(["GET", "POST"]), max_size=1))),
            headers=draw(st.sampled_from(HEADER_RULES)),
            priority=draw(st.integers(0, 2)),
            target="t%d" % i))
    return routes


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(routes=route_sets(),
       reqs=st.lists(st.tuples(st.sampled_from(REQ_HOSTS), st.sampled_from(REQ_PATHS),
                               st.sampled_from(["GET", "POST", "PUT"]),
                               st.sampled_from(range(len(REQ_HEADERS)))),
                     min_size=1, max_size=6))
def test_matches_reference(routes, reqs):
    r = Router(routes)
    for host, path, method, hi in reqs:
        headers = REQ_HEADERS[hi]
        want = ref_match(routes, host, path, method, headers)
        assert r.match(host, path, method, headers) == want, (host, path, method, headers)
        ex = r.explain(host, path, method, headers)
        assert len(ex) == len(routes)
        winners = [d for d in ex if d["winner"]]
        if want is None:
            assert winners == []
        else:
            assert winners[0]["route"] == ex[0]["route"] and ex[0]["matched_len"] == want[1]
            assert "t" + ex[0]["route"][1:] == want[0]
