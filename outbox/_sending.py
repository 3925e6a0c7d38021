"""A pika ``SelectConnection`` that sends each message's frames at once, in one call.

pika buffers every frame it writes and sends it only after the ioloop reports the socket
writable. A message then costs two ``epoll_ctl`` calls, a poll and one ``send`` per frame
(method, header and body). :class:`EagerSendConnection` joins the frames of a message and
sends them at once when nothing is buffered. Only what the socket does not take goes to
pika's buffer, after everything sent before it.

The fast path reads attributes private to pika's plaintext transport. Where they are missing
(in another pika release, or with TLS, which this path does not handle), pika's buffer sends
the message as before.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from pika.adapters.select_connection import SelectConnection
from pika.adapters.utils import io_services_utils

_PLAINTEXT_TRANSPORT: type | None = getattr(io_services_utils, "_AsyncPlaintextTransport", None)


def idle_plaintext_socket(transport: Any) -> socket.socket | None:
    """Return the socket of an active plaintext transport with nothing buffered, else None."""
    if _PLAINTEXT_TRANSPORT is None or type(transport) is not _PLAINTEXT_TRANSPORT:
        return None
    active = getattr(transport, "_STATE_ACTIVE", None)
    if active is None or getattr(transport, "_state", None) != active:
        return None
    if getattr(transport, "_tx_buffers", True):
        return None
    sock = getattr(transport, "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


class EagerSendConnection(SelectConnection):  # type: ignore[misc]
    """A SelectConnection that sends a message's frames in one ``send`` call when written."""

    def _output_marshaled_frames(self, marshaled_frames: Sequence[bytes]) -> None:
        data = b"".join(marshaled_frames)
        self.bytes_sent += len(data)
        self.frames_sent += len(marshaled_frames)
        sock = idle_plaintext_socket(self._transport)
        if sock is not None:
            try:
                sent = sock.send(data)
            except OSError:
                # The socket would block or the connection failed. pika's own send after
                # the next poll meets the same state and handles it as usual.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        self._adapter_emit_data(data)
