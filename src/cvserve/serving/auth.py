"""API keys and TLS material for the front doors.

Keys come from a file, one a line (blank lines and ``#`` comments skipped; printable
ASCII only; a UTF-8 byte-order mark is ignored; a warning if group or others may read the
file); a request
carries one as ``Authorization: Bearer KEY`` (gRPC: the ``authorization`` metadata). No
key: 401; a key that is not in the file: 403. Keys are compared as SHA-256 digests in
constant time, against every key, and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import ssl
from pathlib import Path

from cvserve.config import ConfigError

__all__ = ["ApiKeys", "check_tls_files", "read_key_file"]

log = logging.getLogger(__name__)

#: Paths every client may read without a key: liveness and readiness (load balancers and
#: orchestrators probe them without credentials).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})


class ApiKeys:
    """The accepted keys, kept as digests."""

    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ConfigError("no API keys given")
        self._digests = tuple(hashlib.sha256(k.encode()).digest() for k in keys)

    @classmethod
    def from_file(cls, path: str | Path) -> ApiKeys:
        return cls(read_key_file(path))

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self)} keys)"

    def check(self, authorization: str | bytes | None) -> int | None:
        """None when the ``Authorization`` value carries a valid key, else the HTTP status:
        401 (no bearer key) or 403 (a key that is not accepted)."""
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        if not authorization:
            return 401
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return 401
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        ok = False
        for known in self._digests:  # every key, no early exit
            ok |= hmac.compare_digest(digest, known)
        return None if ok else 403


def read_key_file(path: str | Path) -> list[str]:
    """The keys of an API key file, read as the server reads it (the module's docstring):
    the server's keys, and the key a client (``bench``, :mod:`cvserve.client`) sends."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a leading BOM is not the key's
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the API key file {path}: {e}") from None
    keys = [s for s in (line.strip() for line in text.splitlines()) if s and s[0] != "#"]
    if not keys:
        raise ConfigError(f"the API key file {path} holds no key (one key a line)")
    if any(len(k.split()) > 1 for k in keys):
        raise ConfigError(f"the API key file {path}: a key may not contain spaces")
    for n, key in enumerate(keys, 1):
        # a header carries ASCII: a key with other characters could never match
        if not (key.isascii() and key.isprintable()):
            raise ConfigError(
                f"the API key file {path}: key {n} has a character that is not printable "
                "ASCII (an HTTP header cannot carry it)"
            )
    if mode & 0o044:
        log.warning(
            "the API key file %s can be read by %s (mode %o): chmod 600 it",
            path, "others" if mode & 0o004 else "its group", mode & 0o777,
        )  # fmt: skip
    return keys


#: What a door answers for each status :meth:`ApiKeys.check` returns.
DENIED = {
    401: ("unauthorized", "this server needs an API key: send Authorization: Bearer <key>"),
    403: ("forbidden", "the API key is not accepted"),
}


def check_tls_files(cert: str, key: str) -> ssl.SSLContext:
    """Load a certificate chain and its key now, so a wrong file is a clear error at start."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as e:
        raise ConfigError(f"TLS: no such file: {e.filename}") from None
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"TLS: cannot load certificate {cert} with key {key}: {e}") from None
    return ctx
