"""Regenerate the checked-in gRPC stubs from ``inference.proto`` (installing cvserve never
needs grpcio-tools)::

    pip install grpcio-tools==1.81.1
    python src/cvserve/serving/v2/proto/regenerate.py

which runs, from ``src/``::

    python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \\
        cvserve/serving/v2/proto/inference.proto

and then makes one edit to ``inference_pb2.py``: its descriptors go into a pool of their
own instead of protobuf's default pool. tritonclient.grpc registers Triton's full proto,
with the same ``inference.*`` message names, in the default pool, and two files defining
one name there cannot both load; with a pool of its own the server (and a test that drives
it with tritonclient) can import both. The wire format does not depend on the pool.

grpcio-tools 1.81.1 bundles protoc 33.5: the stubs need protobuf >= 6.33.5 and grpcio >=
1.81.1 at run time (pyproject.toml says so); it is the newest grpcio-tools whose protobuf
gencode (6.x) loads under the protobuf < 7 that tritonclient[grpc] requires.
"""

from __future__ import annotations

import sys
from pathlib import Path

GRPC_TOOLS_VERSION = "1.81.1"
PROTO = "cvserve/serving/v2/proto/inference.proto"
_DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
_OWN_POOL = (
    "_descriptor_pool.DescriptorPool().AddSerializedFile(  # own pool: see regenerate.py\n    "
)


def generate(out: Path, src: Path | None = None) -> list[Path]:
    """Write the stubs of ``src/PROTO`` under ``out`` (``out/cvserve/serving/v2/proto``)."""
    from importlib.metadata import version

    from grpc_tools import protoc

    got = version("grpcio-tools")
    if got != GRPC_TOOLS_VERSION:
        raise RuntimeError(f"grpcio-tools {got}: install grpcio-tools=={GRPC_TOOLS_VERSION}")
    src = src or Path(__file__).resolve().parents[4]
    args = ["protoc", f"-I{src}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", str(src / PROTO)]  # fmt: skip
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    where = out / Path(PROTO).parent
    pb2 = where / "inference_pb2.py"
    text = pb2.read_text()
    if text.count(_DEFAULT_POOL) != 1:
        raise RuntimeError(f"{pb2}: protoc's output changed shape; update regenerate.py")
    pb2.write_text(text.replace(_DEFAULT_POOL, _OWN_POOL))
    return [pb2, where / "inference_pb2.pyi", where / "inference_pb2_grpc.py"]


if __name__ == "__main__":
    src_dir = Path(__file__).resolve().parents[4]
    for path in generate(src_dir, src_dir):
        print(path.relative_to(src_dir.parent))
    sys.exit(0)
