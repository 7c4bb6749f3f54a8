"""The device-row mark: how a host batch row says "my pixels are already on the device".

GPU preprocessing (:mod:`cvserve.images.gpu`) writes an image straight into a row of the
device buffer and marks the host row; the CUDA runtime (:mod:`cvserve.runtime.cuda`) reads
the marks to find each device row wherever the batcher moved its host row. Both sides use
this module, so the format lives in one place.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["MARK_BYTES", "mark_row", "new_magic", "read_mark", "upload_plan"]

#: Bytes a mark takes at the start of a row: 8 of magic, 8 of row index.
MARK_BYTES = 16


def new_magic() -> bytes:
    """A random per-process magic: a mark no client can forge in its pixels."""
    return os.urandom(8)


def mark_row(host_row: np.ndarray, row: int, magic: bytes) -> None:
    """Say in a host batch row that its pixels are in row ``row`` of the device buffer.

    The mark (a per-process random ``magic`` and the row index, 16 bytes) travels with
    the row when the batcher squeezes a batch's holes out, so the runtime finds every
    device row wherever its host row ended up. Any host write of a row erases it."""
    flat = host_row.reshape(-1).view(np.uint8)
    flat[:8] = np.frombuffer(magic, dtype=np.uint8)
    flat[8:16] = np.frombuffer(int(row).to_bytes(8, "little"), dtype=np.uint8)


def read_mark(host_row: np.ndarray, magic: bytes) -> int | None:
    """The device row a host row points to (see :func:`mark_row`), or None."""
    flat = host_row.reshape(-1).view(np.uint8)
    if flat.size < MARK_BYTES or flat[:8].tobytes() != magic:
        return None
    return int.from_bytes(flat[8:16].tobytes(), "little")


def upload_plan(batch: np.ndarray, magic: bytes) -> list[tuple[str, int, int]]:
    """How a batch reaches the device, for every GPU runtime (onnxruntime's and torch's):
    ``("host", start, stop)`` copies host rows ``[start, stop)`` (contiguous runs, one copy
    each); ``("move", k, src)`` moves device row ``src`` to row ``k`` (GPU preprocessing
    wrote it at ``src``; the batcher squeezed its host row down to ``k``, so ``src >= k``
    and later rows never read an earlier ``k``). Moves with ``src == k`` are left out."""
    plan: list[tuple[str, int, int]] = []
    n = int(batch.shape[0])
    start = None
    for k in range(n + 1):
        src = read_mark(batch[k], magic) if k < n else -1
        if src is None:  # a host row
            if start is None:
                start = k
            continue
        if start is not None:
            plan.append(("host", start, k))
            start = None
        if k < n and src != k:
            plan.append(("move", k, src))
    return plan
