"""Listening sockets: bound up front (a port in use is a one-line error), and closed
without resetting a connection in the accept queue."""

from __future__ import annotations

import errno
import logging
import socket
import struct
import sys

log = logging.getLogger(__name__)

__all__ = ["BACKLOG", "HANDSHAKE_WAIT_S", "bind_socket", "refuse_handshakes"]

BACKLOG = 2048


def bind_socket(host: str, port: int, *, reuse_port: bool = False, listen: bool = True):
    """A TCP socket bound to ``host:port`` (listening unless ``listen`` is False); OSError
    with a one-line message when the port cannot be had."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        # a restart must not wait for the old process's connections in TIME_WAIT
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        if listen:
            sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            why = "the address is in use by another process; choose another port"
            raise OSError(f"cannot listen on {host}:{port}: {why}") from None
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock


#: Classic BPF socket filter: drop a TCP segment with SYN set (a new handshake), pass the
#: rest. A socket filter sees the TCP header at offset 0; byte 13 holds the flags.
_DROP_SYN = (
    (0x30, 0, 0, 13),  # ldb [13]
    (0x45, 0, 1, 0x02),  # jset #SYN, next, skip 1
    (0x06, 0, 0, 0),  # ret #0: drop
    (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1: pass
)
#: How long handshakes already under way get to complete before the listener closes.
HANDSHAKE_WAIT_S = 0.25
_SO_ATTACH_FILTER = 26  # linux/asm-generic/socket.h


def refuse_handshakes(sock: socket.socket) -> bool:
    """Attach :data:`_DROP_SYN` to a listening socket (Linux's SO_ATTACH_FILTER, no
    privilege needed); False where there are no socket filters."""
    import ctypes

    class Insn(ctypes.Structure):  # struct sock_filter
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8),
                    ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]  # fmt: skip

    if not sys.platform.startswith("linux"):
        return False
    prog = (Insn * len(_DROP_SYN))(*(Insn(*insn) for insn in _DROP_SYN))
    fprog = struct.pack("HL", len(_DROP_SYN), ctypes.addressof(prog))  # struct sock_fprog
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    except OSError as e:
        log.debug("no socket filter (%s): the listener closes at once", e)
        return False
    return True
