"""redis-py's failures as the broker's typed errors, behind a deadline per call
(:class:`Guard`), and small helpers for reading replies. Used by
:mod:`cvserve.brokers.redis_streams`."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import BrokerError, BrokerUnavailable

__all__ = ["Guard", "as_str", "entry_fields", "no_group"]

_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)
_REFUSED = ("NOAUTH", "WRONGPASS")


class Guard:
    """A deadline around one call, and redis-py's failures turned into typed errors.

    Callers handle the replies they expect (NOGROUP, BUSYGROUP) inside the block.
    """

    __slots__ = ("where", "timeout", "_deadline")

    def __init__(self, where: str, timeout: float) -> None:
        self.where = where
        self.timeout = timeout
        self._deadline: asyncio.Timeout | None = None

    async def __aenter__(self) -> None:
        self._deadline = asyncio.timeout(self.timeout)
        await self._deadline.__aenter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        assert self._deadline is not None
        try:
            await self._deadline.__aexit__(exc_type, exc, tb)
        except TimeoutError as e:
            raise BrokerUnavailable(
                f"redis at {self.where} did not answer within {self.timeout:g} s"
            ) from e
        if isinstance(exc, AuthenticationError) or (
            isinstance(exc, ResponseError) and str(exc).startswith(_REFUSED)
        ):
            # Not "unavailable": waiting will not help, the URL's credentials must change.
            raise BrokerError(
                f"redis at {self.where} refused the credentials of the broker URL: {exc}"
            ) from exc
        if isinstance(exc, _UNAVAILABLE):
            raise BrokerUnavailable(f"redis at {self.where} unavailable: {exc}") from exc
        if isinstance(exc, RedisError):
            raise BrokerError(f"redis at {self.where}: {exc}") from exc


def no_group(exc: ResponseError) -> bool:
    return str(exc).startswith("NOGROUP")


def as_str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def entry_fields(flat: list[Any]) -> dict[bytes, bytes]:
    """A stream entry's fields from a script's flat ``[field, value, ...]`` reply."""
    return dict(zip(flat[::2], flat[1::2], strict=False))
