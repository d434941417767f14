"""llhttp (through httptools) as the reference parser for differential and fuzz tests."""
from __future__ import annotations

import httptools

# Methods llhttp knows (it rejects any other token; RFC 9110 allows any token, and so do we).
LLHTTP_METHODS = {
    "DELETE", "GET", "HEAD", "POST", "PUT", "CONNECT", "OPTIONS", "TRACE", "COPY", "LOCK",
    "MKCOL", "MOVE", "PROPFIND", "PROPPATCH", "SEARCH", "UNLOCK", "BIND", "REBIND", "UNBIND",
    "ACL", "REPORT", "MKACTIVITY", "CHECKOUT", "MERGE", "M-SEARCH", "NOTIFY", "SUBSCRIBE",
    "UNSUBSCRIBE", "PATCH", "PURGE", "MKCALENDAR", "LINK", "UNLINK", "SOURCE", "QUERY",
}
OWS = b" \t"


class Collector:
    """httptools callbacks collected into one dict per message."""

    def __init__(self, response: bool = False):
        self.response = response
        self.messages = []
        self.cur = None
        self.parser = None

    def on_message_begin(self):
        self.cur = {"url": b"", "headers": [], "trailers": [], "body": b"", "complete": False,
                    "hdone": False}
        self.messages.append(self.cur)

    def on_url(self, url):
        self.cur["url"] += url

    def on_status(self, status):
        self.cur["reason"] = self.cur.get("reason", b"") + status

    def on_header(self, name, value):
        # llhttp reports trailer fields through on_header too, after on_headers_complete
        self.cur["trailers" if self.cur["hdone"] else "headers"].append((name, value))

    def on_headers_complete(self):
        m, p = self.cur, self.parser
        m["hdone"] = True
        m["version"] = p.get_http_version()
        m["keep_alive"] = p.should_keep_alive()
        if self.response:
            m["status"] = p.get_status_code()
        else:
            m["method"] = p.get_method().decode("latin-1")

    def on_body(self, body):
        self.cur["body"] += body

    def on_message_complete(self):
        self.cur["complete"] = True


def run_llhttp(data: bytes, response: bool = False):
    """('ok'|'error', [message dicts]). Upgrade/CONNECT stop the parser: counted as ok."""
    cb = Collector(response)
    cls = httptools.HttpResponseParser if response else httptools.HttpRequestParser
    p = cb.parser = cls(cb)
    try:
        p.feed_data(data)
    except httptools.HttpParserUpgrade:
        return "ok", cb.messages
    except httptools.HttpParserError:
        return "error", cb.messages
    return "ok", cb.messages
