"""Broker URLs as logs and status pages may show them: passwords replaced by ``***``."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit

REDACTED = "***"
#: Query parameters that redis-py takes as secrets (``unix:///s.sock?password=...``).
SECRET_PARAMS = frozenset({"password", "ssl_password"})


def redact_url(url: str) -> str:
    """``url`` without its passwords (``redis://user:***@host:6379/0``); the user, host,
    path and the rest of the query (TLS file names, ``maxlen``) stay: they are no secrets."""
    parts = urlsplit(url)
    netloc, query = parts.netloc, parts.query
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:{REDACTED}@{host}"
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(k in SECRET_PARAMS for k, _ in pairs):
        query = urlencode([(k, REDACTED if k in SECRET_PARAMS else v) for k, v in pairs], safe="*/")
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    # by hand: urlunsplit drops the "//" of an empty host (unix:///path)
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
