"""KServe v2 / Triton gRPC protocol: ``inference.proto`` (cvserve's subset) and the stubs
generated from it (``inference_pb2``, ``inference_pb2_grpc``; see ``regenerate.py``)."""
