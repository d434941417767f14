"""The machinery for validating a parsed config and reporting every problem with its path.

The loader describes each entity as a handful of field reads; this module supplies:

- `Invalid`: raised by value parsers for one bad value; the reader turns it into a ConfigIssue at the
  value's path, so parsers never need to know where they are in the file.
- `Issues`: the collector, so validation carries on after the first problem and the user sees all of
  them in one run.
- `Fields`: reads one mapping (rejecting unknown keys, with a did-you-mean), its optional and required
  fields, lists with per-item paths, and nested sections.
- small value parsers (`string`, `boolean`, `integer`, `duration`, `size`, `name`, `host`, ...) that take
  the raw YAML value and return the normalized one or raise Invalid.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Any, Callable, Iterable, Iterator

from fastmesh.config.durations import duration_seconds, size_bytes
from fastmesh.config.model import ConfigIssue

Parser = Callable[[Any], Any]


def version_json(data, fallback=None, **options) -> str:
    """`data` (dataclasses within dicts, lists and tuples) as the canonical JSON that a config
    version hashes: sorted keys, no blanks, each dataclass as the dict of its fields, as
    dataclasses.asdict would give it. Not asdict itself: its deep copy of every leaf made the
    hash a third of loading 10,000 routes; here the json encoder walks the containers and
    Python only sees the dataclasses. `fallback`: for other values json cannot write."""
    def default(value):
        fields = getattr(value, "__dataclass_fields__", None)
        if fields is not None:
            return {name: getattr(value, name) for name in fields}
        if fallback is not None:
            return fallback(value)
        raise TypeError(f"{type(value).__name__} is not JSON serializable")

    import json
    return json.dumps(data, default=default, sort_keys=True, separators=(",", ":"), **options)


def entities_version(base: str, **entities: tuple) -> str:
    """The config version `base` extended with lists of entity dataclasses (upstreams, streams,
    listeners, ...): `base` itself when every list is empty, so a config without them keeps its
    version; else 12 hex digits of a SHA-256 over a canonical JSON of everything."""
    if not any(entities.values()):
        return base
    from fastmesh.osutil import sha256
    canonical = version_json({"base": base, **entities}, ensure_ascii=False)
    return sha256(canonical.encode()).hexdigest()[:12]


class Invalid(Exception):
    """One bad value; `message` says what was expected and what was found."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Issues:
    """Collects ConfigIssues for one source so validation can report them all at once."""

    def __init__(self, source: str):
        self.source = source
        self.items: list[ConfigIssue] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(ConfigIssue(self.source, path, message))

    def __bool__(self) -> bool:
        return bool(self.items)


def child(path: str, key: str) -> str:
    """`gateway` + `limits` -> `gateway.limits`; the top level has no prefix."""
    return f"{path}.{key}" if path else key


def item(path: str, index: int) -> str:
    return f"{path}[{index}]"


# --- describing values in messages -------------------------------------------------------------

def describe(value: object) -> str:
    """How a found value is shown: its YAML-ish type, plus the value itself when it is a scalar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"bool {str(value).lower()}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{type(value).__name__} {shown}"


def suggestion(word: object, choices: Iterable[str]) -> str:
    """' (did you mean 'paths'?)' when a close choice exists, else ''."""
    if not isinstance(word, str):
        return ""
    import difflib                   # only when a config has a mistake: not in a serving process
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --- reading mappings ------------------------------------------------------------------------

class Fields:
    """Reads the fields of one mapping, recording problems in `issues` instead of raising.

    Unknown keys are reported on construction. An absent field, or one set to null, takes its
    default (YAML `port:` with nothing after it means "not set", as in Kong). A field whose value is
    invalid is reported and also yields the default, so the caller can keep building and keep
    finding problems; the collected issues decide whether a Config is returned at all.
    """

    def __init__(self, issues: Issues, path: str, data: dict, allowed: Iterable[str]):
        self.issues = issues
        self.path = path
        self.data = data
        self.allowed = tuple(allowed)
        self._report_unknown()

    @classmethod
    def of(cls, issues: Issues, path: str, value: object, allowed: Iterable[str]) -> "Fields | None":
        """Fields over `value` if it is a mapping; otherwise report it and return None."""
        if not isinstance(value, dict):
            issues.add(path, f"expected a mapping, found {describe(value)}")
            return None
        return cls(issues, path, value, allowed)

    def _report_unknown(self) -> None:
        for key in self.data:
            if key not in self.allowed:
                shown = f"'{key}'" if isinstance(key, str) else describe(key)
                self.issues.add(child(self.path, str(key)),
                                f"unknown field {shown}{suggestion(key, self.allowed)}")

    def at(self, name: str) -> str:
        return child(self.path, name)

    def has(self, name: str) -> bool:
        """True when the field is present and not null."""
        return self.data.get(name) is not None

    def raw(self, name: str) -> Any:
        return self.data.get(name)

    def value(self, name: str, parse: Parser, default: Any = None, required: bool = False) -> Any:
        """The parsed field, or `default` when absent, null or invalid (the latter two reported)."""
        raw = self.data.get(name)
        if raw is None:
            if required:
                self.issues.add(self.path, f"missing required field '{name}'")
            return default
        return self.parse_at(self.at(name), raw, parse, default)

    def parse_at(self, path: str, raw: Any, parse: Parser, default: Any = None) -> Any:
        try:
            return parse(raw)
        except Invalid as problem:
            self.issues.add(path, problem.message)
            return default

    def items(self, name: str, what: str = "list") -> Iterator[tuple[str, Any]]:
        """(path, item) for each element of a list field; a non-list is reported and yields nothing."""
        raw = self.data.get(name)
        if raw is None:
            return
        if not isinstance(raw, list):
            self.issues.add(self.at(name), f"expected a {what}, found {describe(raw)}")
            return
        for index, element in enumerate(raw):
            yield item(self.at(name), index), element

    def values(self, name: str, parse: Parser, what: str) -> tuple:
        """A list field parsed item by item (each problem at `name[i]`), duplicates dropped."""
        parsed = []
        for path, element in self.items(name, what):
            value = self.parse_at(path, element, parse)
            if value is not None and value not in parsed:
                parsed.append(value)
        return tuple(parsed)

    def section(self, name: str, allowed: Iterable[str]) -> "Fields":
        """A nested mapping; absent or invalid reads as empty, so every field takes its default."""
        raw = self.data.get(name)
        if raw is None:
            return Fields(self.issues, self.at(name), {}, allowed)
        return Fields.of(self.issues, self.at(name), raw, allowed) or \
            Fields(self.issues, self.at(name), {}, allowed)


# --- scalar parsers ---------------------------------------------------------------------------

def string(value: object) -> str:
    if not isinstance(value, str):
        raise Invalid(f"expected a string, found {describe(value)}")
    return value


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, found {describe(value)}")
    return value


def is_integer(value: object) -> bool:
    """YAML booleans are Python ints; `true` must never pass as 1."""
    return isinstance(value, int) and not isinstance(value, bool)


def integer(low: int | None = None, high: int | None = None, what: str = "value") -> Parser:
    """A parser for an integer within [low, high] (either bound optional)."""
    def parse(value: object) -> int:
        if not is_integer(value):
            raise Invalid(f"expected an integer, found {describe(value)}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise Invalid(f"{what} must be {_bounds(low, high)}, found {value}")
        return value
    return parse


def _bounds(low: int | None, high: int | None) -> str:
    if high is None:
        return f">= {low}"
    if low is None:
        return f"<= {high}"
    return f"{low}..{high}"


def duration(value: object) -> float:
    """Seconds, > 0. A bare number means milliseconds (Kong's `connect_timeout: 60000`)."""
    if is_integer(value) or isinstance(value, float):
        seconds = value / 1000.0
    elif isinstance(value, str) and (parsed := duration_seconds(value)) is not None:
        seconds = parsed
    else:
        raise Invalid("expected a duration like '250ms', '5s', '1m', '1.5s' or an integer number "
                      f"of milliseconds, found {describe(value)}")
    if not seconds > 0:
        raise Invalid(f"duration must be greater than 0, found {value!r}")
    return seconds


def size(minimum: int = 0, what: str = "size") -> Parser:
    """A parser for a byte count: an int, or "32k" / "1m" / "1g" (k = 1024)."""
    def parse(value: object) -> int:
        if is_integer(value):
            count = value
        elif isinstance(value, str) and (parsed := size_bytes(value)) is not None:
            count = parsed
        else:
            raise Invalid(f"expected a size like 32768, '32k', '1m' or '1g', found {describe(value)}")
        if count < minimum:
            raise Invalid(f"{what} must be >= {minimum}, found {value!r}")
        return count
    return parse


_NAME = re.compile(r"[A-Za-z0-9._~-]+")


def name(value: object) -> str:
    """Entity names appear in logs, metrics and admin URLs, so they are URL-safe characters only."""
    text = string(value)
    if not _NAME.fullmatch(text):
        raise Invalid(f"name may contain only letters, digits and . _ ~ -, found {text!r}")
    return text


# --- hosts and addresses ----------------------------------------------------------------------

_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


def hostname(text: str) -> str:
    """A DNS name, lower-cased. All-numeric names must be valid IPv4 (so '10.0.0.256' is refused)."""
    lowered = text.lower()
    labels = lowered.split(".")
    if all(label.isdigit() for label in labels):
        raise Invalid(f"invalid IPv4 address {text!r}")
    if len(lowered) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise Invalid(f"invalid host name {text!r}: expected dot-separated labels of letters, "
                      "digits and '-' (1-63 characters each)")
    return lowered


def ip_literal(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address if `text` is an IPv4 or (unbracketed) IPv6 literal, else None."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def address_host(text: str) -> str:
    """A host to connect to or bind: host name, IPv4, or IPv6 (brackets optional, stored without)."""
    if text.startswith("[") and text.endswith("]"):
        address = ip_literal(text[1:-1])
        if not isinstance(address, ipaddress.IPv6Address):
            raise Invalid(f"invalid IPv6 address {text!r}")
        return address.compressed
    address = ip_literal(text)
    if address is not None:
        return address.compressed
    if ":" in text:
        raise Invalid(f"invalid host {text!r}: a port does not belong here, "
                      "and an IPv6 address must be a valid literal")
    return hostname(text)


def host(value: object) -> str:
    text = string(value)
    if not text:
        raise Invalid("host must not be empty")
    return address_host(text)


def split_host_port(text: str) -> tuple[str, str | None]:
    """'host:port' / '[v6]:port' / 'host' -> (host, port text or None). Brackets are kept."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise Invalid(f"unterminated '[' in {text!r}")
        rest = text[end + 1:]
        if rest and not rest.startswith(":"):
            raise Invalid(f"unexpected {rest!r} after ']' in {text!r}")
        return text[:end + 1], (rest[1:] if rest else None)
    if text.count(":") > 1:
        raise Invalid(f"IPv6 addresses must be written in brackets, e.g. '[::1]:8000', found {text!r}")
    host_part, colon, port_part = text.partition(":")
    return host_part, (port_part if colon else None)


def port_number(text: str, low: int = 1) -> int:
    if not text.isdigit():
        raise Invalid(f"port must be a number, found {text!r}")
    return integer(low, 65535, what="port")(int(text))


def listen_address(value: object) -> str:
    """'host:port' or '[v6]:port' to bind; port 0 asks the OS for a free port (handy in tests)."""
    text = string(value)
    host_part, port_part = split_host_port(text)
    if not host_part or port_part is None:
        raise Invalid(f"expected 'host:port' or '[ipv6]:port', found {text!r}")
    address_host(host_part)
    port_number(port_part, low=0)
    return text


# --- HTTP tokens ------------------------------------------------------------------------------

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def token(value: object, what: str) -> str:
    """An HTTP token (RFC 9110 tchar), as methods and header field names must be."""
    text = string(value)
    if not _TOKEN.fullmatch(text):
        raise Invalid(f"invalid {what} {text!r}: expected letters, digits or !#$%&'*+.^_`|~-")
    return text
