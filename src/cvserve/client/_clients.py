""":class:`Client` (blocking) and :class:`AsyncClient` (asyncio): the same calls over one
kept-alive httpx connection pool each."""

from __future__ import annotations

from typing import Any

import httpx

from cvserve.client._wire import (
    Answer,
    ImageLike,
    Request,
    answer_from,
    build_request,
    describe,
    unreachable,
)

__all__ = ["AsyncClient", "Client"]

DEFAULT_URL = "http://127.0.0.1:8000"


def _options(
    url: str,
    api_key: str | None,
    api_key_file: str | None,
    timeout_s: float,
    headers: dict[str, str] | None,
    verify: bool | str,
) -> dict[str, Any]:
    if api_key is None and api_key_file is not None:
        from cvserve.serving.auth import read_key_file

        api_key = read_key_file(api_key_file)[0]  # read as the server reads it
    h = dict(headers or {})
    if api_key:
        h["Authorization"] = f"Bearer {api_key}"
    return {"base_url": url.rstrip("/"), "headers": h, "timeout": timeout_s, "verify": verify}


class _Calls:
    """The request of each call (shared by both clients)."""

    @staticmethod
    def _predict(kind: str, name: str, image: ImageLike, kw: dict[str, Any]) -> Request:
        return build_request(kind, name, [image], many=False, **kw)

    @staticmethod
    def _many(kind: str, name: str, images: list[ImageLike], kw: dict[str, Any]) -> Request:
        images = list(images)
        if not images:
            raise ValueError("predict_many needs at least one image")
        return build_request(kind, name, images, many=True, **kw)


class Client(_Calls):
    """A blocking client of one cvserve server.

    ``url``: the server; ``api_key`` (or ``api_key_file``, read as the server reads it)
    goes as ``Authorization: Bearer``; ``timeout_s``: how long to wait for an answer
    (the server's own deadline is ``deadline_ms`` per call); ``verify``: False or a CA
    file for a self-signed ``https://`` server. Use it as a context manager or ``close()``.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        api_key_file: str | None = None,
        timeout_s: float = 60.0,
        headers: dict[str, str] | None = None,
        verify: bool | str = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        opts = _options(url, api_key, api_key_file, timeout_s, headers, verify)
        self.url = opts["base_url"]
        self._http = httpx.Client(**opts, transport=transport)

    def predict(
        self,
        model: str,
        image: ImageLike,
        *,
        params: dict[str, Any] | None = None,
        deadline_ms: float | None = None,
        accept: str | None = None,
    ) -> Answer:
        """One image through ``model``: its answer, or the typed error of the refusal.
        ``params``: the task's query parameters (``{"top_k": 3}``); ``deadline_ms``: the
        server gives up (504) past it; ``accept``: ``image/png`` or ``application/x-npz``
        for a mask or depth map as PNG or arrays."""
        kw = {"params": params, "deadline_ms": deadline_ms, "accept": accept}
        return self._send(self._predict("model", model, image, kw))

    def predict_many(
        self,
        model: str,
        images: list[ImageLike],
        *,
        params: dict[str, Any] | None = None,
        deadline_ms: float | None = None,
    ) -> Answer:
        """Several images in one request (a multipart form): ``answer.result["results"]``
        holds one answer each, in order. If any image fails, this raises its error."""
        kw = {"params": params, "deadline_ms": deadline_ms, "accept": None}
        return self._send(self._many("model", model, images, kw))

    def pipeline(
        self,
        name: str,
        image: ImageLike,
        *,
        params: dict[str, Any] | None = None,
        deadline_ms: float | None = None,
    ) -> Answer:
        """One image through the pipeline ``name`` (e.g. ``ocr``)."""
        kw = {"params": params, "deadline_ms": deadline_ms, "accept": None}
        return self._send(self._predict("pipeline", name, image, kw))

    def models(self) -> list[dict[str, Any]]:
        """What the server serves: each model's description."""
        return self._get("/v1/models")["models"]

    def model(self, name: str) -> dict[str, Any]:
        return self._get(f"/v1/models/{name}")

    def pipelines(self) -> list[dict[str, Any]]:
        return self._get("/v1/pipelines")["pipelines"]

    def ready(self) -> bool:
        """True once the server has loaded everything it serves (``/readyz``)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, req: Request) -> Answer:
        try:
            r = self._http.post(
                req.path, content=req.content, files=req.files, params=req.params,
                headers=req.headers,
            )  # fmt: skip
        except httpx.TransportError as e:
            raise unreachable(self.url, e) from e
        return answer_from(r.status_code, r.headers, r.content)

    def _get(self, path: str) -> Any:
        try:
            r = self._http.get(path)
        except httpx.TransportError as e:
            raise unreachable(self.url, e) from e
        return describe(r.status_code, r.headers, r.content)


class AsyncClient(_Calls):
    """The asyncio twin of :class:`Client`: the same arguments and calls, awaited."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        api_key_file: str | None = None,
        timeout_s: float = 60.0,
        headers: dict[str, str] | None = None,
        verify: bool | str = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        opts = _options(url, api_key, api_key_file, timeout_s, headers, verify)
        self.url = opts["base_url"]
        self._http = httpx.AsyncClient(**opts, transport=transport)

    async def predict(
        self,
        model: str,
        image: ImageLike,
        *,
        params: dict[str, Any] | None = None,
        deadline_ms: float | None = None,
        accept: str | None = None,
    ) -> Answer:
        """See :meth:`Client.predict`."""
        kw = {"params": params, "deadline_ms": deadline_ms, "accept": accept}
        return await self._send(self._predict("model", model, image, kw))

    async def predict_many(
        self,
        model: str,
        images: list[ImageLike],
        *,
        params: dict[str, Any] | None = None,
        deadline_ms: float | None = None,
    ) -> Answer:
        """See :meth:`Client.predict_many`."""
        kw = {"params": params, "deadline_ms": deadline_ms, "accept": None}
        return await self._send(self._many("model", model, images, kw))

    async def pipeline(
        self,
        name: str,
        image: ImageLike,
        *,
        params: dict[str, Any] | None = None,
        deadline_ms: float | None = None,
    ) -> Answer:
        """See :meth:`Client.pipeline`."""
        kw = {"params": params, "deadline_ms": deadline_ms, "accept": None}
        return await self._send(self._predict("pipeline", name, image, kw))

    async def models(self) -> list[dict[str, Any]]:
        return (await self._get("/v1/models"))["models"]

    async def model(self, name: str) -> dict[str, Any]:
        return await self._get(f"/v1/models/{name}")

    async def pipelines(self) -> list[dict[str, Any]]:
        return (await self._get("/v1/pipelines"))["pipelines"]

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, req: Request) -> Answer:
        try:
            r = await self._http.post(
                req.path, content=req.content, files=req.files, params=req.params,
                headers=req.headers,
            )  # fmt: skip
        except httpx.TransportError as e:
            raise unreachable(self.url, e) from e
        return answer_from(r.status_code, r.headers, r.content)

    async def _get(self, path: str) -> Any:
        try:
            r = await self._http.get(path)
        except httpx.TransportError as e:
            raise unreachable(self.url, e) from e
        return describe(r.status_code, r.headers, r.content)
