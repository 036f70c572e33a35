"""A minimal websocket client (RFC 6455: text/binary/ping/close, fragmented messages)."""
from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
import struct
import time
import urllib.parse


class _WebSocketClosed(ConnectionError):
    pass


class _WebSocket:
    _GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, url: str, headers: dict | None = None, timeout: float = 30):
        parts = urllib.parse.urlsplit(url)
        secure = parts.scheme == "wss"
        host, port = parts.hostname, parts.port or (443 if secure else 80)
        sock = socket.create_connection((host, port), timeout=timeout)
        if secure:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        self.sock, self.buf, self._parts = sock, b"", []
        key = base64.b64encode(os.urandom(16)).decode()
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = host if ":" not in host else f"[{host}]"
        if parts.port:
            host_header += f":{parts.port}"
        lines = [f"GET {path} HTTP/1.1", f"Host: {host_header}", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buf:
            chunk = sock.recv(4096)
            if not chunk:
                raise _WebSocketClosed("connection closed during the websocket handshake")
            self.buf += chunk
            if len(self.buf) > 65536:
                raise _WebSocketClosed("websocket handshake: oversized answer")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        if " 101 " not in status_line + " ":
            raise _WebSocketClosed(f"websocket handshake refused: {status_line}")
        got = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        want = base64.b64encode(hashlib.sha1((key + self._GUID).encode()).digest()).decode()
        if got.get("sec-websocket-accept") != want:
            raise _WebSocketClosed("websocket handshake: bad Sec-WebSocket-Accept")

    def _send(self, opcode: int, payload: bytes = b""):
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + body)

    def _frame(self):
        """(fin, opcode, payload) from the buffer, or None when it holds no whole frame yet."""
        b = self.buf
        if len(b) < 2:
            return None
        fin, opcode, masked, n = b[0] & 0x80, b[0] & 0x0F, b[1] & 0x80, b[1] & 0x7F
        i = 2
        if n == 126:
            if len(b) < 4:
                return None
            n, i = struct.unpack("!H", b[2:4])[0], 4
        elif n == 127:
            if len(b) < 10:
                return None
            n, i = struct.unpack("!Q", b[2:10])[0], 10
        if masked:
            if len(b) < i + 4:
                return None
            mask, i = b[i:i + 4], i + 4
        if len(b) < i + n:
            return None
        payload = b[i:i + n]
        if masked:
            payload = bytes(c ^ mask[j % 4] for j, c in enumerate(payload))
        self.buf = b[i + n:]
        return bool(fin), opcode, payload

    def recv(self, timeout: float):
        """The next message (str for text, bytes for binary), or None when none came within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._frame()
            if frame is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.sock.settimeout(left)
                try:
                    chunk = self.sock.recv(1 << 16)
                except (socket.timeout, TimeoutError):
                    return None
                except OSError as e:
                    raise _WebSocketClosed(str(e)) from None
                if not chunk:
                    raise _WebSocketClosed("the server closed the websocket")
                self.buf += chunk
                continue
            fin, opcode, payload = frame
            if opcode == 0x8:
                try:
                    self._send(0x8, payload[:2])
                except OSError:
                    pass
                raise _WebSocketClosed("the server closed the websocket")
            if opcode == 0x9:
                self._send(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode in (0x1, 0x2):
                self._parts = [(opcode, payload)]
            elif opcode == 0x0 and self._parts:
                self._parts.append((0, payload))
            else:
                continue
            if fin:
                kind, data = self._parts[0][0], b"".join(p for _, p in self._parts)
                self._parts = []
                return data.decode("utf-8", errors="replace") if kind == 0x1 else data

    def close(self):
        try:
            self._send(0x8, struct.pack("!H", 1000))
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
