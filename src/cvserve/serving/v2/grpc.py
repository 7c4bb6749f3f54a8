"""The KServe v2 gRPC door: ``inference.GRPCInferenceService`` (the protocol Triton and
``tritonclient.grpc`` speak) on grpcio's asyncio server, in the HTTP server's process and
event loop, over the same :class:`~cvserve.serving.state.ServerState`.

It only translates: protobuf to :class:`~cvserve.serving.v2.types.InferRequest` and an
:class:`~cvserve.serving.v2.types.InferResponse` back (:mod:`cvserve.serving.v2.infer` runs
it through the core, :func:`cvserve.serving.door.handle` the per-request rules), and the
core's typed errors to gRPC status codes (:func:`grpc_status`, this door's one mapping). Stage times travel in the trailing metadata as ``server-timing``,
in the format of the HTTP ``Server-Timing`` header.
"""

from __future__ import annotations

import inspect
import logging
import math
import struct
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from cvserve.errors import RequestError
from cvserve.serving.control import load_parameters, repository
from cvserve.serving.core import Servable
from cvserve.serving.door import CLIENT_CLOSED, Answer, handle
from cvserve.serving.errors import BadRequest, http_status
from cvserve.serving.v2 import infer as v2
from cvserve.serving.v2.proto import inference_pb2 as pb
from cvserve.serving.v2.proto import inference_pb2_grpc as pb_grpc
from cvserve.serving.v2.types import (
    DATATYPES,
    InferRequest,
    InferResponse,
    RequestedOutput,
    Tensor,
)
from cvserve.trace import Trace, format_server_timing

if TYPE_CHECKING:
    from cvserve.serving.state import ServerState

__all__ = [
    "CLIENT_CLOSED",
    "GRPC_STATUS",
    "GrpcServer",
    "decode_bytes",
    "encode_bytes",
    "grpc_status",
    "request_from_proto",
    "response_to_proto",
]

log = logging.getLogger(__name__)

#: HTTP status of a core error -> gRPC status code, as Triton maps its errors. 413 (body or
#: pixels over a limit) is INVALID_ARGUMENT, not RESOURCE_EXHAUSTED: the same request will
#: fail again, while RESOURCE_EXHAUSTED is what clients and retry policies treat as "back off
#: and retry" (our 429). Only gRPC's own check of the message size (``max_body_bytes``, made
#: before cvserve sees the bytes) answers RESOURCE_EXHAUSTED for a message that is too big.
GRPC_STATUS: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

#: Trailing-metadata key of the stage times (the value is a Server-Timing header value).
TIMING_KEY = "server-timing"
#: How long health and metadata calls (which a drain does not wait for) get at shutdown.
STOP_GRACE_S = 5.0
#: Concurrent calls the server takes (more get RESOURCE_EXHAUSTED at once, before any of
#: their message is read), and concurrent streams on one connection. A call whose key has
#: not been checked holds at most its stream's flow-control window of memory.
MAX_CONCURRENT_RPCS = 256
MAX_STREAMS_PER_CONNECTION = 128

#: The InferTensorContents field of each datatype (FP16 travels only as raw bytes).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_LEN = struct.Struct("<I")


def grpc_status(error: BaseException) -> grpc.StatusCode:
    """The gRPC status code an error answers with (INTERNAL for anything unexpected)."""
    return GRPC_STATUS.get(http_status(error), grpc.StatusCode.INTERNAL)


# --- wire format <-> transport-neutral types --------------------------------------------
def decode_bytes(raw: bytes, where: str) -> list[bytes]:
    """A BYTES tensor in raw form: each element a 4-byte little-endian length, then data."""
    out: list[bytes] = []
    view = memoryview(raw)
    i = 0
    while i < len(view):
        if i + 4 > len(view):
            raise BadRequest(f"{where}: BYTES data ends inside an element's 4-byte length")
        (n,) = _LEN.unpack_from(view, i)
        i += 4
        if i + n > len(view):
            raise BadRequest(
                f"{where}: a BYTES element declares {n} bytes; {len(view) - i} are left"
            )
        out.append(bytes(view[i : i + n]))
        i += n
    return out


def encode_bytes(items: list[bytes] | np.ndarray) -> bytes:
    """The raw form of a BYTES tensor (see :func:`decode_bytes`)."""
    parts = []
    for item in np.asarray(items, dtype=object).ravel():
        b = item.encode() if isinstance(item, str) else bytes(item)
        parts += (_LEN.pack(len(b)), b)
    return b"".join(parts)


def _param(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def _params(m: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    return {k: _param(v) for k, v in m.items()}


def _set_param(p: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool | np.bool_):
        p.bool_param = bool(value)
    elif isinstance(value, int | np.integer):
        if value > np.iinfo(np.int64).max:
            p.uint64_param = int(value)
        else:
            p.int64_param = int(value)
    elif isinstance(value, float | np.floating):
        p.double_param = float(value)
    else:
        p.string_param = str(value)


def _tensor(t: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> Tensor:
    where = f"input {t.name!r}"
    if t.datatype not in DATATYPES:
        raise BadRequest(
            f"{where}: datatype {t.datatype!r}; v2 datatypes: {', '.join(DATATYPES)}",
            datatypes=list(DATATYPES),
        )
    shape = [int(d) for d in t.shape]
    if any(d < 0 for d in shape):
        raise BadRequest(f"{where}: shape {shape} has a negative dimension")
    count = math.prod(shape)
    dtype = DATATYPES[t.datatype]
    if raw is not None:
        if dtype is None:
            items: list[bytes] | np.ndarray = decode_bytes(raw, where)
        else:
            if len(raw) != count * dtype.itemsize:
                raise BadRequest(
                    f"{where}: shape {shape} of {t.datatype} is {count * dtype.itemsize} "
                    f"bytes; raw_input_contents has {len(raw)}",
                    expected_bytes=count * dtype.itemsize,
                )
            items = np.frombuffer(raw, dtype.newbyteorder("<")).astype(dtype, copy=False)
    else:
        field = _CONTENTS_FIELD.get(t.datatype)
        if field is None:
            raise BadRequest(f"{where}: {t.datatype} data must be sent in raw_input_contents")
        values = getattr(t.contents, field)
        if dtype is None:
            items = list(values)
        else:
            wide = np.asarray(values)
            items = wide.astype(dtype)
            if wide.size and not np.array_equal(items, wide):
                raise BadRequest(f"{where}: a value in contents.{field} does not fit {t.datatype}")
    n = len(items)
    if n != count:
        raise BadRequest(
            f"{where}: shape {shape} holds {count} elements; the data has {n}",
            expected_elements=count,
        )
    data = items if dtype is None else items.reshape(shape)
    return Tensor(t.name, t.datatype, shape, data, _params(t.parameters))


def request_from_proto(msg: pb.ModelInferRequest) -> InferRequest:
    """A ``ModelInferRequest`` as the transport-neutral request (400 when malformed)."""
    raws = list(msg.raw_input_contents)
    if raws:
        if len(raws) != len(msg.inputs):
            raise BadRequest(
                f"raw_input_contents has {len(raws)} entries for {len(msg.inputs)} inputs; "
                "send one per input, or none"
            )
        if any(t.HasField("contents") for t in msg.inputs):
            raise BadRequest("inputs carry contents and raw_input_contents: send one or the other")
    inputs = [_tensor(t, raws[i] if raws else None) for i, t in enumerate(msg.inputs)]
    outputs = None
    if msg.outputs:
        outputs = []
        for o in msg.outputs:
            params = _params(o.parameters)
            k = params.pop("classification", 0)
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise BadRequest(
                    f"output {o.name!r}: the classification parameter must be an int64 >= 0"
                )
            outputs.append(RequestedOutput(o.name, classification=k, parameters=params))
    return InferRequest(
        model=msg.model_name,
        inputs=inputs,
        version=msg.model_version or None,
        id=msg.id or None,
        outputs=outputs,
        parameters=_params(msg.parameters),
    )


def response_to_proto(resp: InferResponse) -> pb.ModelInferResponse:
    """The transport-neutral response as a ``ModelInferResponse``: every output's data in
    ``raw_output_contents``, in the order of ``outputs`` (as Triton answers)."""
    msg = pb.ModelInferResponse(model_name=resp.model, model_version=resp.version, id=resp.id or "")
    for k, v in resp.parameters.items():
        _set_param(msg.parameters[k], v)
    for t in resp.outputs:
        out = msg.outputs.add(name=t.name, datatype=t.datatype, shape=[int(d) for d in t.shape])
        for k, v in t.parameters.items():
            _set_param(out.parameters[k], v)
        if t.datatype == "BYTES":
            raw = encode_bytes(t.data)
        else:
            dtype = DATATYPES[t.datatype].newbyteorder("<")
            raw = np.ascontiguousarray(t.data, dtype=dtype).tobytes()
        msg.raw_output_contents.append(raw)
    return msg


# --- the service ------------------------------------------------------------------------
def _timing(stages: Mapping[str, float], simulated: bool = False) -> tuple[tuple[str, str]]:
    return ((TIMING_KEY, format_server_timing(stages, simulated)),)


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over a :class:`ServerState`."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def _find(self, name: str, version: str = "") -> Servable:
        return v2.lookup(self.state.servables, name, version, self.state.versions)

    async def _answer(self, context: grpc.aio.ServicerContext, make) -> Any:
        """A call that is not an inference: its whole time is ``encode``; a typed error
        becomes its status code."""
        t0 = time.perf_counter()
        try:
            reply = make()
            if inspect.isawaitable(reply):  # a repository load or unload
                reply = await reply
        except RequestError as e:
            await context.abort(
                grpc_status(e), str(e), _timing({"encode": time.perf_counter() - t0})
            )
        context.set_trailing_metadata(_timing({"encode": time.perf_counter() - t0}))
        return reply

    async def ServerLive(self, request, context):
        return await self._answer(context, lambda: pb.ServerLiveResponse(live=True))

    async def ServerReady(self, request, context):
        return await self._answer(context, lambda: pb.ServerReadyResponse(ready=self.state.ready))

    async def ModelReady(self, request, context):
        def make():
            # an unknown model or version is NOT_FOUND, as Triton answers it with an error
            target = self._find(request.name, request.version)
            return pb.ModelReadyResponse(ready=self.state.model_ready(target))

        return await self._answer(context, make)

    async def ServerMetadata(self, request, context):
        return await self._answer(
            context, lambda: pb.ServerMetadataResponse(**v2.server_metadata())
        )

    async def ModelMetadata(self, request, context):
        def make():
            target = self._find(request.name, request.version)
            loaded = list(self.state.versions.get(target.name, {})) or None
            meta = v2.model_metadata(target, loaded)
            return pb.ModelMetadataResponse(
                name=meta["name"],
                versions=meta["versions"],
                platform=meta["platform"],
                inputs=[_tensor_meta(t) for t in meta["inputs"]],
                outputs=[_tensor_meta(t) for t in meta["outputs"]],
            )

        return await self._answer(context, make)

    async def ModelStatistics(self, request, context):
        def make():
            if request.name:
                targets = [self._find(request.name, request.version)]
            else:
                targets = list(self.state.servables.values())
            return pb.ModelStatisticsResponse(
                model_stats=[_statistics(t.stats.to_triton()) for t in targets]
            )

        return await self._answer(context, make)

    # -- the model repository extension (serving.control) ------------------------------
    async def RepositoryIndex(self, request, context):
        def make():
            rows = repository(self.state).index(request.ready)
            entry = pb.RepositoryIndexResponse.ModelIndex
            return pb.RepositoryIndexResponse(
                models=[
                    entry(name=r.name, version=r.version, state=r.state, reason=r.reason)
                    for r in rows
                ]  # fmt: skip
            )

        return await self._answer(context, make)

    async def RepositoryModelLoad(self, request, context):
        async def load():
            params = {k: _param(v) for k, v in request.parameters.items()}
            await repository(self.state).load(request.model_name, load_parameters(params))
            return pb.RepositoryModelLoadResponse()

        return await self._answer(context, load)

    async def RepositoryModelUnload(self, request, context):
        async def unload():
            await repository(self.state).unload(request.model_name)
            return pb.RepositoryModelUnloadResponse()

        return await self._answer(context, unload)

    async def ModelInfer(self, request, context):
        state = self.state
        name = request.model_name

        async def receive() -> InferRequest:
            return request_from_proto(request)

        async def run(target: Servable, req: InferRequest, trace: Trace, deadline: float):
            return await v2.infer(target, req, trace, deadline), req.images

        answer: Answer[pb.ModelInferResponse] = await handle(
            state, name, state.servables, lambda: self._find(name, request.model_version),
            receive, run, response_to_proto,
            timeout=context.time_remaining(),  # the client's deadline, if it set one
        )  # fmt: skip
        trailing: tuple[tuple[str, str], ...] = ((TIMING_KEY, answer.trace.server_timing()),)
        if answer.error is not None:
            if answer.retry_after_s is not None:
                trailing += (("retry-after", str(answer.retry_after_s)),)
            await context.abort(grpc_status(answer.error), answer.message, trailing)
        context.set_trailing_metadata(trailing)
        return answer.body


def _tensor_meta(t: Mapping[str, Any]) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=t["name"], datatype=t["datatype"], shape=[int(d) for d in t["shape"]]
    )


def _statistics(s: Mapping[str, Any]) -> pb.ModelStatistics:
    """Triton's ``model_stats`` entry (:meth:`ModelStats.to_triton`) as protobuf; cvserve's
    own per-stage entries (``cvserve_*``) have no field in the protocol."""
    inference = {
        k: pb.StatisticDuration(**v)
        for k, v in s["inference_stats"].items()
        if k in pb.InferStatistics.DESCRIPTOR.fields_by_name
    }
    return pb.ModelStatistics(
        name=s["name"],
        version=s["version"],
        last_inference=s["last_inference"],
        inference_count=s["inference_count"],
        execution_count=s["execution_count"],
        inference_stats=pb.InferStatistics(**inference),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=b["batch_size"],
                **{
                    k: pb.StatisticDuration(**v)
                    for k, v in b.items()
                    if k in ("compute_input", "compute_infer", "compute_output")
                },
            )
            for b in s["batch_stats"]
        ],
    )


class GrpcServer:
    """The gRPC door's server: started and stopped on the HTTP server's event loop."""

    def __init__(
        self,
        state: ServerState,
        host: str,
        port: int,
        *,
        credentials: grpc.ServerCredentials | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self.state = state
        self.host = host
        self.port = port
        #: TLS (``grpc.ssl_server_credentials``); None: plaintext.
        self.credentials = credentials
        #: What every call passes first (``serving.v2.edge``: API keys, request ids).
        self.interceptors = tuple(interceptors)
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def start(self) -> None:
        """Bind and start serving; ``port`` becomes the bound port (0 picks a free one).
        OSError when the port cannot be bound."""
        limit = self.state.config.max_body_bytes
        server = grpc.aio.server(
            interceptors=self.interceptors,
            maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
            options=[
                # a message over the body limit is refused by gRPC itself
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
                ("grpc.max_send_message_length", -1),
                # never share a port with another server silently (gRPC's default does)
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(self.state), server)
        try:
            if self.credentials is not None:
                port = server.add_secure_port(self.address, self.credentials)
            else:
                port = server.add_insecure_port(self.address)
        except RuntimeError as e:  # newer grpcio raises, older ones return 0
            raise OSError(f"gRPC cannot bind {self.address}: {e}") from None
        if port == 0:
            raise OSError(f"gRPC cannot bind {self.address}")
        self.port = port
        await server.start()
        self._server = server
        log.info("KServe v2 gRPC on %s", self.address)

    async def stop(self, grace: float | None = STOP_GRACE_S) -> None:
        """Stop taking calls; calls still running get ``grace`` seconds (0: cancelled)."""
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
