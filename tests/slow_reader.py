"""A gRPC client that opens streams and never reads them: raw HTTP/2 over a socket, announcing a tiny stream
window and never sending WINDOW_UPDATE, so the server's writes block on flow control as they would for a
stalled client. It answers SETTINGS and PING (a client that stopped reading is still connected)."""

from __future__ import annotations

import socket
import struct
import threading

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
SETTINGS_ENABLE_PUSH, SETTINGS_INITIAL_WINDOW_SIZE = 0x2, 0x4


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id) + payload


def _hpack_int(value: int, prefix_bits: int = 7) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    out, value = [limit], value - limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    return bytes(out + [value])


def _hpack_literal(name: str, value: str) -> bytes:
    """A header as a literal without indexing, names and values without Huffman coding."""
    name_bytes, value_bytes = name.encode(), value.encode()
    return b"\x00" + _hpack_int(len(name_bytes)) + name_bytes + _hpack_int(len(value_bytes)) + value_bytes


class SlowReader:
    """One HTTP/2 connection whose streams get `window` bytes of DATA each and never more."""

    def __init__(self, address: str, window: int = 64):
        host, _, port = address.rpartition(":")
        self.authority = address
        self.sock = socket.create_connection((host, int(port)))
        self._send_lock = threading.Lock()
        self._next_stream_id = 1
        self.data_bytes: dict[int, int] = {}  # stream id -> DATA bytes received
        self.data: dict[int, bytearray] = {}  # stream id -> DATA received
        self.ended: dict[int, str] = {}  # stream id -> how it ended ("trailers" or "reset")
        self.trailers: dict[int, bytes] = {}  # stream id -> its trailers' HPACK block, as sent
        self.closed = threading.Event()
        self.settled = threading.Event()  # the server has acknowledged our settings: its streams get `window`
        settings = struct.pack(">HIHI", SETTINGS_ENABLE_PUSH, 0, SETTINGS_INITIAL_WINDOW_SIZE, window)
        self._send(PREFACE + _frame(SETTINGS, 0, 0, settings))
        self._reader = threading.Thread(target=self._read_frames, daemon=True)
        self._reader.start()

    def open_stream(self, path: str, message: bytes) -> int:
        """Send one request message on a new stream; returns the stream's id. Sent once the server has taken our
        settings: a stream opened before may start with the default window."""
        if not self.settled.wait(timeout=10):
            raise ConnectionError("the server did not acknowledge the client's settings within 10 s")
        stream_id, self._next_stream_id = self._next_stream_id, self._next_stream_id + 2
        headers = b"".join(_hpack_literal(k, v) for k, v in (
            (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", self.authority),
            ("content-type", "application/grpc"), ("te", "trailers")))
        body = b"\x00" + struct.pack(">I", len(message)) + message
        self.data_bytes[stream_id], self.data[stream_id] = 0, bytearray()
        self._send(_frame(HEADERS, END_HEADERS, stream_id, headers) + _frame(DATA, END_STREAM, stream_id, body))
        return stream_id

    def messages(self, stream_id: int) -> list[bytes]:
        """The gRPC messages received on a stream so far (each DATA payload is length-prefixed messages)."""
        data, out = bytes(self.data[stream_id]), []
        while len(data) >= 5:
            length = struct.unpack(">I", data[1:5])[0]
            out.append(data[5:5 + length])
            data = data[5 + length:]
        return out

    def read_everything(self) -> None:
        """Open every window wide: the client reads again."""
        more = struct.pack(">I", 1 << 30)
        self._send(b"".join(_frame(WINDOW_UPDATE, 0, stream_id, more) for stream_id in [0, *self.data_bytes]))

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._reader.join(timeout=5)

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def _recv_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def _read_frames(self) -> None:
        try:
            while True:
                header = self._recv_exactly(9)
                length = int.from_bytes(header[:3], "big")
                kind, flags = header[3], header[4]
                stream_id = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
                payload = self._recv_exactly(length)
                if kind == SETTINGS and not flags & ACK:
                    self._send(_frame(SETTINGS, ACK, 0))
                elif kind == SETTINGS:
                    self.settled.set()
                elif kind == PING and not flags & ACK:
                    self._send(_frame(PING, ACK, 0, payload))
                elif kind == DATA:
                    self.data_bytes[stream_id] = self.data_bytes.get(stream_id, 0) + length
                    self.data.setdefault(stream_id, bytearray()).extend(payload)
                elif kind == HEADERS and flags & END_STREAM:
                    self.ended.setdefault(stream_id, "trailers")
                    self.trailers[stream_id] = payload
                elif kind == RST_STREAM:
                    self.ended.setdefault(stream_id, "reset")
                elif kind == GOAWAY:
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed.set()
