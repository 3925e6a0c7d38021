"""A pika ``SelectConnection`` that sends each small message's frames at once, in one call.

pika buffers every frame it writes and sends it only after the ioloop reports the socket
writable. A message then costs two ``epoll_ctl`` calls, a poll and one ``send`` per frame
(method, header and body). :class:`EagerSendConnection` joins the frames of a message of
up to 128 KiB and sends them at once when nothing is buffered. Only what the socket does not
take goes to pika's buffer, after everything sent before it. Larger messages keep pika's
frame-by-frame path: after each partial ``send`` pika copies the rest of the chunk it
sends, so a chunk must stay as small as a frame.

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
from pika.exceptions import StreamLostError

_PLAINTEXT_TRANSPORT: type | None = getattr(io_services_utils, "_AsyncPlaintextTransport", None)
# Maximum size of a message whose frames are joined: pika's default frame_max.
JOIN_MAX_BYTES = 131_072


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
        size = sum(map(len, marshaled_frames))
        self.bytes_sent += size
        self.frames_sent += len(marshaled_frames)
        sock = idle_plaintext_socket(self._transport) if size <= JOIN_MAX_BYTES else None
        if sock is None:
            for frame in marshaled_frames:
                self._adapter_emit_data(frame)
            return
        data = b"".join(marshaled_frames)
        try:
            sent = sock.send(data)
        except OSError:
            # The socket would block or the connection failed. pika's own send after
            # the next poll meets the same state and handles it as usual.
            sent = 0
        if sent < size:
            self._adapter_emit_data(data[sent:])

    def abort(self, reason: str) -> None:
        """Close the socket at once, sending neither what is buffered nor a close frame.

        After an exception that interrupted a send, the stream may end inside a frame, and
        any byte sent after it would be read as the rest of that frame.
        """
        if not self.is_closed:
            self._terminate_stream(StreamLostError(reason))
