"""The device-row mark: how a host batch row says "my pixels are already on the device".

GPU preprocessing (:mod:`cvserve.images.gpu`) writes an image straight into a row of the
device buffer and marks the host row; the CUDA runtime (:mod:`cvserve.runtime.cuda`) reads
the marks to find each device row wherever the batcher moved its host row. Both sides use
this module, so the format lives in one place.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["MARK_BYTES", "mark_row", "new_magic", "read_mark"]

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
