"""The KServe v2 (Open Inference Protocol) front doors: HTTP/REST and gRPC, over the
same serving core as ``/v1``. ``types`` holds the transport-neutral request and response,
``infer`` runs one against a servable; ``http`` and ``grpc`` only translate wire formats
around :func:`cvserve.serving.door.handle` (the per-request rules every door shares).
"""
